"""Image loading and single-tile preprocessing against transformers' own PIL-backend processors.

The oracle for pixels is HF: `CLIPImageProcessorPil` (resize: shortest edge + centre crop),
`SiglipImageProcessorPil` (squash) and `LlavaImageProcessorPil(do_pad=True)` (pad to a square with
the mean colour, then as CLIP), run with rescaling and normalisation off so they hand back the
uint8 pixels the tower would see. The bound (docs/fidelity.md): identical when both use the same function.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers.image_transforms import convert_to_rgb as hf_convert_to_rgb
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from llama3v.errors import Llama3vError
from llama3v.evaluation.scenes import scene
from llama3v.runtime.image_processing import ImageSpec, load_image, prepare_tile

ODD_SIZES = [(672, 336), (800, 600), (1000, 300), (300, 300), (1, 4000), (57, 13)]
TOWERS = (336, 384, 56)
MODES = ("resize", "squash", "pad")
OFF = {"do_rescale": False, "do_normalize": False}


def hf_processor(mode: str, n: int, mean: tuple[float, float, float] | None = None):
    """HF's processor for a mode, returning raw uint8 pixels."""
    extra = {"image_mean": list(mean)} if mean is not None else {}
    if mode == "resize":
        return CLIPImageProcessorPil(size={"shortest_edge": n}, crop_size={"height": n, "width": n}, **OFF, **extra)
    if mode == "squash":
        return SiglipImageProcessorPil(size={"height": n, "width": n}, **OFF, **extra)
    return LlavaImageProcessorPil(size={"shortest_edge": n}, crop_size={"height": n, "width": n}, do_pad=True,
                                  **OFF, **extra)


def hf_tile(image: Image.Image, mode: str, n: int, mean: tuple[float, float, float] | None = None):
    """HF's tile as uint8 [n, n, 3], plus the spec ours needs to do the same (the mean comes from HF)."""
    proc = hf_processor(mode, n, mean)
    out = proc(image, return_tensors="np")["pixel_values"]
    # With rescale and normalise off HF hands back the uint8 pixels, channels first, one per image.
    assert out.dtype == np.uint8 and out.shape == (1, 3, n, n), (out.dtype, out.shape)
    return out[0].transpose(1, 2, 0), ImageSpec(n, mode, tuple(proc.image_mean))


def _cases():
    for w, h in ODD_SIZES:
        for n in TOWERS:
            for mode in MODES:
                # HF's shortest-edge resize of a 1-pixel-wide image to 336 makes a 336 x 1,344,000 intermediate
                # (~10 s on each side); the small tower covers that shape in resize mode.
                if (w, h) == (1, 4000) and mode == "resize" and n != 56:
                    continue
                yield pytest.param(w, h, n, mode, id=f"{w}x{h}-{n}-{mode}")


@pytest.mark.parametrize("w,h,n,mode", list(_cases()))
def test_prepare_tile_equals_hf(w, h, n, mode):
    image = scene(w * 7 + h, w, h)
    expected, spec = hf_tile(image, mode, n)
    ours = prepare_tile(image, spec)
    assert ours.dtype == np.uint8 and ours.shape == (n, n, 3)
    diff = np.abs(ours.astype(int) - expected.astype(int))
    assert diff.max() == 0, f"{int((diff > 0).sum())} values differ, by up to {diff.max()}"


@pytest.mark.parametrize("n", TOWERS)
@pytest.mark.parametrize("mode", MODES)
def test_prepare_tile_of_the_real_photo_equals_hf(photo, mode, n):
    raw = Image.open(photo)
    expected, spec = hf_tile(raw, mode, n)
    np.testing.assert_array_equal(prepare_tile(load_image(photo), spec), expected)


def test_pad_uses_the_mean_colour_it_is_given():
    image = scene(3, 1000, 300)
    for mean in ((0.5, 0.5, 0.5), (0.48145466, 0.4578275, 0.40821073)):
        expected, spec = hf_tile(image, "pad", 56, mean)
        ours = prepare_tile(image, spec)
        np.testing.assert_array_equal(ours, expected)
        # A 1000x300 picture padded to a square: the top and bottom rows are the padding colour.
        colour = [int(m * 255) for m in mean]
        assert ours[0].tolist() == [colour] * 56 and ours[-1].tolist() == [colour] * 56


def test_modes_give_different_tiles():
    """The three modes are told apart: on a wide picture no two of them agree (the HF comparison is not vacuous)."""
    image = scene(5, 800, 300)
    tiles = {mode: prepare_tile(image, ImageSpec(56, mode)) for mode in MODES}
    for a, b in (("resize", "squash"), ("resize", "pad"), ("squash", "pad")):
        assert np.abs(tiles[a].astype(int) - tiles[b].astype(int)).mean() > 5, (a, b)


def test_extreme_aspect_ratio_does_not_exhaust_memory():
    """A 1x100000 picture (a thousandth of the pixel limit) must give a tile or a clean refusal.

    Run in a child process capped at 2 GiB of address space: uncapped, `resize` builds a
    336 x 33,600,000 intermediate (~45 GB) and `pad` a 100000 x 100000 canvas (~40 GB).
    """
    code = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
        "import numpy as np\n"
        "from llama3v.errors import Llama3vError\n"
        "from llama3v.runtime.image_processing import ImageSpec, load_image, prepare_tile\n"
        "image = load_image(np.full((100000, 1, 3), 200, np.uint8))\n"
        "for mode in ('squash', 'resize', 'pad'):\n"
        "    try:\n"
        "        tile = prepare_tile(image, ImageSpec(336, mode))\n"
        "        print(mode, 'tile', tile.shape, flush=True)\n"
        "    except Llama3vError as e:\n"
        "        print(mode, 'refused', e, flush=True)\n"
        "    except MemoryError:\n"
        "        print(mode, 'MemoryError', flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert lines["squash"] == "tile (336, 336, 3)"
    bad = {m: lines[m] for m in ("resize", "pad") if not (lines[m] == "tile (336, 336, 3)" or
                                                       lines[m].startswith("refused"))}
    assert not bad, f"neither a tile nor a Llama3vError: {bad}"


# ---- load_image: every kind of source and pixel format gives an upright RGB small ----

W, H = 96, 64  # odd enough: wider than tall, so a rotation shows in the size


@pytest.fixture(scope="module")
def small() -> Image.Image:
    return scene(11, W, H)


def _png(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **kw)
    return buf.getvalue()


def _jpeg(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def _rgb(image: Image.Image) -> np.ndarray:
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    return np.asarray(image)


def _alpha_ramp() -> np.ndarray:
    """Alpha: opaque left third, transparent right third, a ramp between."""
    alpha = np.empty((H, W), np.uint8)
    alpha[:, : W // 3] = 255
    alpha[:, 2 * W // 3:] = 0
    alpha[:, W // 3: 2 * W // 3] = np.linspace(250, 5, 2 * W // 3 - W // 3).astype(np.uint8)
    return alpha


def test_path_str_and_bytes_give_the_same_pixels(small, tmp_path):
    path = tmp_path / "scene.png"
    small.save(path)
    want = np.asarray(small)
    for source in (path, str(path), path.read_bytes(), small):
        got = load_image(source)
        assert got.size == (W, H)
        np.testing.assert_array_equal(_rgb(got), want)


@pytest.mark.parametrize("shape", ["HxW", "HxWx1", "HxWx3", "HxWx4"])
def test_uint8_arrays(small, shape):
    rgb = np.asarray(small)
    grey = rgb[..., 1]
    arr = {"HxW": grey, "HxWx1": grey[..., None], "HxWx3": rgb,
           "HxWx4": np.dstack([rgb, np.full((H, W), 255, np.uint8)])}[shape]
    got = _rgb(load_image(np.ascontiguousarray(arr)))
    assert got.shape == (H, W, 3)
    want = rgb if shape in ("HxWx3", "HxWx4") else np.repeat(grey[..., None], 3, axis=2)
    np.testing.assert_array_equal(got, want)


def test_cmyk_jpeg(small, tmp_path):
    path = tmp_path / "cmyk.jpg"
    small.convert("CMYK").save(path, "JPEG", quality=95)
    assert Image.open(path).mode == "CMYK"
    got = _rgb(load_image(path))
    assert got.shape == (H, W, 3)
    np.testing.assert_array_equal(got, np.asarray(Image.open(path).convert("RGB")))
    # Colours survive (not inverted, as an Adobe-CMYK mix-up would give): close to the source small.
    assert np.abs(got.astype(int) - np.asarray(small).astype(int)).mean() < 6


def test_palette_png_with_transparency_opaque_pixels(small):
    pal = small.quantize(16)
    data = _png(pal, transparency=255)  # an index no pixel uses: every pixel stays opaque
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == "P" and "transparency" in opened.info
    got = _rgb(load_image(data))
    np.testing.assert_array_equal(got, np.asarray(pal.convert("RGB")))


def test_rgba_and_la_opaque_pixels_keep_their_colour(small):
    alpha = _alpha_ramp()
    rgb = np.asarray(small)
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    la = Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA")
    for image, want in ((rgba, rgb), (la, np.repeat(rgb[..., :1], 3, axis=2))):
        data = _png(image)
        assert Image.open(io.BytesIO(data)).mode == image.mode
        got = _rgb(load_image(data))
        assert got.shape == (H, W, 3)
        np.testing.assert_array_equal(got[:, : W // 3], want[:, : W // 3])


def _transparent_sources(small) -> dict[str, Image.Image]:
    alpha = _alpha_ramp()
    rgb = np.asarray(small)
    pal = small.quantize(16)
    pal_arr = np.asarray(pal).copy()
    pal_arr[:, 2 * W // 3:] = 15  # index 15 is transparent
    pal_img = Image.fromarray(pal_arr, "P")
    pal_img.putpalette(pal.getpalette())
    return {
        "RGBA": Image.open(io.BytesIO(_png(Image.fromarray(np.dstack([rgb, alpha]), "RGBA")))),
        "LA": Image.open(io.BytesIO(_png(Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA")))),
        "P+transparency": Image.open(io.BytesIO(_png(pal_img, transparency=15))),
    }


@pytest.mark.parametrize("kind", ["RGBA", "LA", "P+transparency"])
def test_transparency_is_flattened_as_hf_does(small, kind):
    """HF's processors composite transparent pixels onto white (image_transforms.convert_to_rgb); so must we,
    or a transparent PNG reaches the tower with other pixels than HF's LLaVA would give it."""
    image = _transparent_sources(small)[kind]
    want = hf_convert_to_rgb(image, return_numpy=True)
    got = _rgb(load_image(image))
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() == 0, f"{kind}: {int((diff > 0).sum())} values differ from HF, by up to {diff.max()}"
    # And so the tiles: the end-to-end claim.
    expected, spec = hf_tile(image, "resize", 56)
    np.testing.assert_array_equal(prepare_tile(load_image(image), spec), expected)


def test_transparent_rgba_array_is_flattened_as_hf_does(small):
    arr = np.dstack([np.asarray(small), _alpha_ramp()])
    want = hf_convert_to_rgb(arr, return_numpy=True)  # HF blends arrays in float and rounds
    got = _rgb(load_image(arr))
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # PIL's integer composite vs HF's float: 1 step


@pytest.mark.parametrize("name,values", [
    ("full-range ramp", np.linspace(0, 65535, W * H)),
    ("uniform mid-grey", np.full(W * H, 0x8080)),
    ("dark ramp", np.linspace(0, 4096, W * H)),
])
def test_16_bit_greyscale_is_rescaled_not_clipped(name, values):
    """A 16-bit value v is the intensity v / 65535: it becomes round(v * 255 / 65535), whatever the others are."""
    arr = values.round().astype(np.uint16).reshape(H, W)
    data = _png(Image.fromarray(arr))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    got = _rgb(load_image(data))
    assert got.shape == (H, W, 3)
    want = np.round(arr.astype(np.float64) * 255 / 65535).astype(int)
    diff = np.abs(got[..., 0].astype(int) - want)
    assert diff.max() <= 1, f"{name}: off by up to {diff.max()} (e.g. {int(got[0, 0, 0])} for {int(arr[0, 0])})"
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()


@pytest.mark.parametrize("orientation,k", [(6, -1), (8, 1)])  # 6: rotate 90 clockwise to view; 8: anticlockwise
def test_exif_rotated_jpeg_is_returned_upright(small, tmp_path, orientation, k):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _jpeg(small, exif=exif.tobytes())
    stored = Image.open(io.BytesIO(data))
    assert stored.size == (W, H) and stored.getexif()[0x0112] == orientation
    upright = np.rot90(np.asarray(stored.convert("RGB")), k)
    path = tmp_path / "rotated.jpg"
    path.write_bytes(data)
    for source in (data, path, Image.open(io.BytesIO(data))):
        got = load_image(source)
        assert got.size == (H, W)
        np.testing.assert_array_equal(_rgb(got), upright)
    # The small the camera saw, upright: close to the source rotated, far from the opposite rotation.
    near = np.abs(np.asarray(got).astype(int) - np.rot90(np.asarray(small), k).astype(int)).mean()
    far = np.abs(np.asarray(got).astype(int) - np.rot90(np.asarray(small), -k).astype(int)).mean()
    assert near < 8 and far > 40, (near, far)  # JPEG loss at quality 95 is ~4.4 on this picture


# ---- bad inputs: a Llama3vError naming the problem, never a crash ----

def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (RGB, 8 bit), with an empty IDAT: nothing to decode."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bad(tmp_path_factory, small) -> dict[str, tuple[object, str]]:
    d = tmp_path_factory.mktemp("bad-images")
    jpeg = _jpeg(scene(4, 320, 240))
    files = {
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "noise.png": np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "empty.jpg": b"",
        "notes.txt": b"this is not a small\n",
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    (d / "folder.png").mkdir()
    return {
        "truncated jpeg (path)": (d / "truncated.jpg", "not a readable image"),
        "truncated jpeg (bytes)": (files["truncated.jpg"], "not a readable image"),
        "random bytes": (d / "noise.png", "not a readable image"),
        "empty file": (d / "empty.jpg", "not a readable image"),
        "empty bytes": (b"", "not a readable image"),
        "text file": (d / "notes.txt", "not a readable image"),
        "directory": (d / "folder.png", "no such image file"),
        "missing path": (d / "missing.png", "no such image file"),
        "float array": (np.zeros((8, 8, 3), np.float32), "must be uint8"),
        "5-channel array": (np.zeros((8, 8, 5), np.uint8), r"HxW, HxWx3 or HxWx4"),
        "empty array": (np.zeros((0, 8, 3), np.uint8), "empty"),
        "header claims 100000x100000": (_png_header(100_000, 100_000), "too large|pixel limit"),
        "header claims 11000x10000": (_png_header(11_000, 10_000), "too large|pixel limit"),
    }


BAD = ["truncated jpeg (path)", "truncated jpeg (bytes)", "random bytes", "empty file", "empty bytes", "text file",
       "directory", "missing path", "float array", "5-channel array", "empty array", "header claims 100000x100000",
       "header claims 11000x10000"]


@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_a_clean_error(bad, name):
    source, match = bad[name]
    with pytest.raises(Llama3vError, match=match) as info:
        load_image(source)
    if isinstance(source, Path):
        assert str(source) in str(info.value)  # the message names the file


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    """A 5000x5000 header with no pixel data: refused by the limit, not by the missing data."""
    path = tmp_path / "big.png"
    path.write_bytes(_png_header(5000, 5000))
    with pytest.raises(Llama3vError, match=r"5000x5000 image exceeds the 1,000,000-pixel limit"):
        load_image(path, max_pixels=1_000_000)
    with pytest.raises(Llama3vError, match="not a readable image"):  # under the limit, the missing data shows
        load_image(path, max_pixels=30_000_000)


@pytest.mark.parametrize("kind", ["path", "bytes", "PIL image", "array"])
def test_pixel_limit_applies_to_every_source(small, tmp_path, kind):
    path = tmp_path / "scene.png"
    small.save(path)
    source = {"path": path, "bytes": path.read_bytes(), "PIL image": small, "array": np.asarray(small)}[kind]
    with pytest.raises(Llama3vError, match=f"{W}x{H} image exceeds the 1,000-pixel limit"):
        load_image(source, max_pixels=1000)
    assert load_image(source, max_pixels=W * H).size == (W, H)  # exactly at the limit is fine


def test_valid_input_still_loads_after_bad_ones(bad, small):
    for name in BAD:
        with pytest.raises(Llama3vError):
            load_image(bad[name][0])
    np.testing.assert_array_equal(_rgb(load_image(_png(small))), np.asarray(small))
