"""Video: sampling indices, reading frames (seeking vs sequential), bad input, the token budget vs the reference."""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from llama3v.errors import Llama3vError
from llama3v.models import video as ref
from llama3v.runtime import video
from llama3v.runtime.video import Limits, Sampling, VideoReader, read_video, sample_indices
from llama3v.runtime.video_budget import BudgetPlan, default_budget, plan_budget, pool2x2, timestamp_text


def _scene(w: int, h: int, n: int, static_until: int = 0, seed: int = 0) -> list[np.ndarray]:
    """BGR frames: a textured background, a fixed bar, and a square that moves from frame `static_until` on."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    bg = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), 96 + 0 * x], axis=2).astype(np.uint8)
    bg = cv2.add(bg, rng.integers(0, 40, (h, w, 3), dtype=np.uint8))
    cv2.rectangle(bg, (w // 10, h * 2 // 3), (w // 2, h * 2 // 3 + max(h // 12, 2)), (20, 200, 20), -1)
    side = max(min(w, h) // 5, 3)
    frames = []
    for i in range(n):
        f = bg.copy()
        x0 = (max(i - static_until, 0) * max(w // 16, 2)) % max(w - side, 1)
        cv2.rectangle(f, (x0, h // 6), (x0 + side, h // 6 + side), (0, 0, 255), -1)
        frames.append(f)
    return frames


def _write(path: Path, frames: list[np.ndarray], fps: float, fourcc: str = "mp4v", opencv_mjpeg: bool = False) -> Path:
    # OpenCV's own MJPEG writer keeps odd sizes; FFmpeg's writers round them down to even.
    api = cv2.CAP_OPENCV_MJPEG if opencv_mjpeg else cv2.CAP_FFMPEG
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), api, cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    assert writer.isOpened()
    for f in frames:
        writer.write(f)
    writer.release()
    return path


def _sequential(path: Path) -> list[np.ndarray]:
    """Every frame, decoded in order by OpenCV directly, as RGB."""
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    out = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        out.append(cv2.cvtColor(f, cv2.COLOR_BGR2RGB))
    cap.release()
    return out


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


VIDEOS = {  # name: (fourcc, OpenCV's MJPEG writer, width, height, fps, frames, decoded width x height)
    "mp4v-64x48-24fps": ("mp4v", False, 64, 48, 24, 50, (64, 48)),
    "mjpg-97x61-10fps": ("MJPG", True, 97, 61, 10, 40, (97, 61)),
    "mp4v-97x61-30fps": ("mp4v", False, 97, 61, 30, 120, (96, 60)),
    "mjpg-160x90-30fps": ("MJPG", False, 160, 90, 30, 150, (160, 90)),
    "mp4v-single-frame": ("mp4v", False, 64, 48, 24, 1, (64, 48)),
    "mjpg-single-frame": ("MJPG", True, 33, 17, 10, 1, (33, 17)),
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    out = {}
    for name, (fourcc, own, w, h, fps, n, _) in VIDEOS.items():
        ext = "mp4" if fourcc == "mp4v" else "avi"
        out[name] = _write(root / f"{name}.{ext}", _scene(w, h, n), fps, fourcc, own)
    return out


# --- sampling ------------------------------------------------------------------------------------

@pytest.mark.parametrize("count,fps,sampling,expected", [
    (300, 30, Sampling(5), [0, 75, 150, 224, 299]),  # 149.5 rounds up
    (300, 30, Sampling(1), [149]),
    (10, 10, Sampling(16), list(range(10))),
    (1, 24, Sampling(8), [0]),
    (300, 30, Sampling(3, start=2, end=4), [60, 90, 119]),  # [2 s, 4 s) is frames 60..119
    (300, 30, Sampling(100, fps=2), list(range(0, 300, 15))),
    (300, 30, Sampling(4, fps=2), [0, 100, 199, 299]),  # 20 frames at 2 fps exceed 4: uniform instead
    (50, 10, Sampling(100, fps=25), list(range(50))),  # faster than the video: every frame
    (240, 24, Sampling(10, fps=1, start=1.5, end=5), [36, 60, 84, 108]),
    (100, 10, Sampling(2, start=5, end=99), [50, 99]),  # an end past the clip is its end
    (240, 23.883660038213858, Sampling(6, fps=0.5), [0, 47, 95, 143, 191, 238]),  # every 47.77 frames
])
def test_sample_indices_exact(count, fps, sampling, expected):
    assert sample_indices(count, fps, sampling) == expected
    assert ref.sample_indices(count, fps, sampling.frames, sampling.fps, sampling.start, sampling.end) == expected


def test_sample_indices_match_reference():
    rng = np.random.default_rng(0)
    for _ in range(400):
        count = int(rng.integers(1, 600))
        fps = float(rng.choice([10, 23.976, 24, 25, 29.97, 30, 60, 7.5]))
        duration = count / fps
        start = float(rng.choice([0.0, round(rng.uniform(0, duration * 0.9), 2)]))
        end = None if rng.random() < 0.5 else start + round(float(rng.uniform(0.01, duration + 0.5)), 2)
        target = None if rng.random() < 0.5 else float(rng.choice([0.5, 1, 2, 3, 24, 100]))
        sampling = Sampling(int(rng.integers(1, 40)), target, start, end)
        try:
            ours = sample_indices(count, fps, sampling)
        except Llama3vError:
            with pytest.raises(ValueError):
                ref.sample_indices(count, fps, sampling.frames, target, start, end)
            continue
        assert ours == ref.sample_indices(count, fps, sampling.frames, target, start, end), (count, fps, sampling)
        assert ours == sorted(set(ours)) and len(ours) <= sampling.frames


@pytest.mark.parametrize("kwargs", [{"frames": 0}, {"fps": -1.0}, {"fps": float("nan")}, {"start": -1.0},
                                    {"start": 2.0, "end": 2.0}])
def test_sampling_rejects_nonsense(kwargs):
    with pytest.raises(Llama3vError):
        Sampling(**kwargs)


def test_window_outside_the_clip(videos):
    path = videos["mp4v-64x48-24fps"]  # 50 frames at 24 fps: 2.083 s
    for sampling in (Sampling(4, start=3.0), Sampling(4, start=2.09)):
        with pytest.raises(Llama3vError, match=f"{path}.*starts at"):
            read_video(path, sampling)
    with pytest.raises(Llama3vError, match="holds no frame"):
        read_video(path, Sampling(4, start=1.01, end=1.03))  # frames at 1.0 and 1.0417 s


# --- reading -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(VIDEOS))
def test_frames_equal_sequential_decode(videos, name):
    path = videos[name]
    *_, fps, n, (w, h) = VIDEOS[name]
    everything = _sequential(path)
    assert len(everything) == n
    window = Sampling(4, start=0.5, end=1.5)
    if n / fps <= window.start:  # the single-frame clips end before the window starts
        with pytest.raises(Llama3vError, match="starts at"):
            read_video(path, window)
    for sampling in (Sampling(3), Sampling(8), Sampling(64, fps=5)) + ((window,) if n / fps > window.start else ()):
        for mode in ("auto", "grab", "seek"):
            info, frames = read_video(path, sampling, mode=mode)
            assert (info.width, info.height, info.frame_count, info.fps) == (w, h, n, fps)
            assert [f.index for f in frames] == sample_indices(n, fps, sampling)
            for f in frames:
                assert f.timestamp == f.index / fps
                assert f.rgb.dtype == np.uint8 and f.rgb.shape == (h, w, 3)
                assert np.array_equal(f.rgb, everything[f.index]), (name, mode, f.index)


def test_reader_reads_any_order_of_calls(videos):
    path = videos["mp4v-97x61-30fps"]
    everything = _sequential(path)
    with VideoReader(path) as reader:
        for indices in ([0, 70, 119], [3, 4, 5], [118], [0, 119], [60]):  # later calls go back in the file
            for f in reader.frames(indices):
                assert np.array_equal(f.rgb, everything[f.index])


class _LateSeeks:
    """A capture whose frame seeks land one frame late, as inexact seeking in some H.264 files does."""

    def __init__(self, cap: cv2.VideoCapture):
        self._cap = cap

    def set(self, prop: int, value: float) -> bool:
        return self._cap.set(prop, value + 1 if prop == cv2.CAP_PROP_POS_FRAMES else value)

    def __getattr__(self, name: str):
        return getattr(self._cap, name)


def test_inexact_seeking_falls_back_to_grabbing(videos, monkeypatch):
    path = videos["mp4v-97x61-30fps"]
    everything = _sequential(path)
    real_open = video._open
    for mode in ("auto", "seek"):
        with VideoReader(path) as reader:
            monkeypatch.setattr(video, "_open", lambda *args: _LateSeeks(real_open(*args)))
            reader._cap = _LateSeeks(reader._cap)
            frames = list(reader.frames([0, 59, 119], mode))
            assert reader._seek_ok is False  # the probe (auto) or the landing check (seek) caught it
        monkeypatch.setattr(video, "_open", real_open)
        assert [f.index for f in frames] == [0, 59, 119]
        for f in frames:
            assert np.array_equal(f.rgb, everything[f.index])


def test_a_count_that_overstates_by_a_frame_is_tolerated(videos, tmp_path):
    path = videos["mjpg-160x90-30fps"]
    everything = _sequential(path)
    data = path.read_bytes()
    short = tmp_path / "short.avi"
    short.write_bytes(data[:data.rfind(b"00dc", 0, data.rfind(b"idx1"))])  # the last frame and the index gone
    info, frames = read_video(short, Sampling(8))
    assert info.frame_count == len(everything) - 1
    assert [f.index for f in frames][-1] == len(everything) - 2
    assert all(np.array_equal(f.rgb, everything[f.index]) for f in frames)
    with VideoReader(path) as reader:  # a stream that ends just short of its count: reading stops there
        reader.info = dataclasses.replace(reader.info, frame_count=len(everything) + 1)
        assert [f.index for f in reader.frames([0, len(everything)], "grab")] == [0]


def test_auto_mode_seeks_once_verified(videos):
    path = videos["mp4v-97x61-30fps"]
    with VideoReader(path) as reader:
        list(reader.frames([0, 59, 119]))
        assert reader._seek_ok is True


def test_real_h264_clip(real_clip):
    path = real_clip
    everything = _sequential(path)
    for mode in ("auto", "grab", "seek"):
        info, frames = read_video(path, Sampling(8), mode=mode)
        assert (info.width, info.height, info.frame_count, info.codec) == (720, 358, 240, "h264")
        assert [f.index for f in frames] == [0, 34, 68, 102, 137, 171, 205, 239]
        assert all(np.array_equal(f.rgb, everything[f.index]) for f in frames)
    _, frames = read_video(path, Sampling(32, fps=2, start=4.0))
    assert frames[0].timestamp >= 4.0 and len(frames) == 12


def _tag_rotation(src: Path, dst: Path, degrees: int) -> Path:
    """Copy an MP4 with its track header's display matrix set to rotate `degrees` clockwise."""
    data = bytearray(src.read_bytes())
    at = data.find(b"tkhd")
    assert data[at + 4] == 0  # version 0 header: the matrix sits 40 bytes after the version field
    matrix = {90: (0, 1, -1, 0), 180: (-1, 0, 0, -1), 270: (0, -1, 1, 0)}[degrees]
    a, b, c, d = (v << 16 for v in matrix)
    data[at + 44:at + 80] = struct.pack(">9i", a, b, 0, c, d, 0, 0, 0, 1 << 30)
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_rotation_metadata_gives_upright_frames(videos, tmp_path, degrees):
    src = videos["mp4v-64x48-24fps"]
    stored = _sequential(src)
    info, frames = read_video(_tag_rotation(src, tmp_path / "rotated.mp4", degrees), Sampling(3))
    assert info.rotation == degrees
    assert (info.width, info.height) == ((48, 64) if degrees % 180 else (64, 48))
    for f in frames:
        assert np.array_equal(f.rgb, np.rot90(stored[f.index], k=-degrees // 90))  # clockwise


# --- bad input -----------------------------------------------------------------------------------

def _bad_inputs(root: Path, good_mp4: Path, good_avi: Path) -> dict[str, tuple[Path, dict, str]]:
    """name: (path, read_video kwargs, expected message fragment)."""
    mp4, avi = good_mp4.read_bytes(), good_avi.read_bytes()
    (root / "dir.mp4").mkdir()
    (root / "empty.mp4").write_bytes(b"")
    (root / "truncated.mp4").write_bytes(mp4[:len(mp4) // 2])
    (root / "truncated.avi").write_bytes(avi[:len(avi) // 2])
    corrupt = bytearray(avi)
    rng = np.random.default_rng(0)
    for i in rng.integers(len(avi) // 3, len(avi) - 200, 300):
        corrupt[i] = int(rng.integers(256))
    (root / "corrupt.avi").write_bytes(bytes(corrupt))
    (root / "codec.avi").write_bytes(avi.replace(b"MJPG", b"ZZZZ"))
    no_frames = bytearray(avi)
    at = no_frames.find(b"00dc")
    while at >= 0:  # every frame's JPEG data zeroed: the container is intact, nothing decodes
        size = struct.unpack("<I", no_frames[at + 4:at + 8])[0]
        no_frames[at + 8:at + 8 + size] = bytes(size)
        at = no_frames.find(b"00dc", at + 8 + size)
    (root / "noframes.avi").write_bytes(bytes(no_frames))
    writer = cv2.VideoWriter(str(root / "zero.avi"), cv2.CAP_OPENCV_MJPEG, cv2.VideoWriter_fourcc(*"MJPG"), 10,
                             (32, 32))
    writer.release()
    (root / "notes.mp4").write_text("#EXTM3U\nhttp://example.com/a.ts\n")
    cv2.imwrite(str(root / "still.jpg"), np.zeros((8, 8, 3), np.uint8))
    return {
        "missing": (root / "nope.mp4", {}, "no such video file"),
        "directory": (root / "dir.mp4", {}, "directory"),
        "empty": (root / "empty.mp4", {}, "empty"),
        "truncated mp4": (root / "truncated.mp4", {}, "cannot open"),
        "truncated avi": (root / "truncated.avi", {}, "truncated"),
        "corrupt avi": (root / "corrupt.avi", {}, "corrupt"),
        "unsupported codec": (root / "codec.avi", {}, "unsupported codec"),
        "no decodable frame": (root / "noframes.avi", {}, "no frame decodes"),
        "zero frames": (root / "zero.avi", {}, "no frame decodes"),
        "text": (root / "notes.mp4", {}, "text file"),
        "image": (root / "still.jpg", {}, "image, not a video"),
        "window": (good_mp4, {"sampling": Sampling(2, start=60.0)}, "starts at"),
        "huge frames": (good_mp4, {"limits": Limits(max_frame_pixels=1000)}, "pixel limit"),
        "many frames": (good_mp4, {"limits": Limits(max_frame_count=10)}, "frames, more than the limit"),
        "fast": (good_mp4, {"limits": Limits(max_fps=5)}, "frame rate"),
        "too many samples": (good_mp4, {"sampling": Sampling(8), "limits": Limits(max_sampled_frames=4)},
                             "more than the limit"),
    }


def test_bad_input_is_a_clean_error_and_leaves_nothing_open(videos, tmp_path):
    cases = _bad_inputs(tmp_path, videos["mp4v-97x61-30fps"], videos["mjpg-160x90-30fps"])
    read_video(videos["mp4v-64x48-24fps"])  # warm up OpenCV and FFmpeg before counting descriptors
    for name, (path, kwargs, fragment) in cases.items():
        before = _open_fds()
        with pytest.raises(Llama3vError) as err:
            read_video(path, **kwargs)
        assert str(path) in str(err.value) and fragment in str(err.value), (name, str(err.value))
        assert _open_fds() == before, name
    # valid inputs still succeed afterwards, and reading them leaves nothing open either
    before = _open_fds()
    _, frames = read_video(videos["mp4v-97x61-30fps"], Sampling(5))
    assert len(frames) == 5 and _open_fds() == before


def test_a_reader_closed_mid_iteration_releases_the_file(videos):
    before = _open_fds()
    with VideoReader(videos["mjpg-160x90-30fps"]) as reader:
        for _ in reader.frames([0, 50, 100]):
            break
    assert _open_fds() == before


# --- token budget --------------------------------------------------------------------------------

G, S, D = 8, 112, 24  # stand-in tower: 8x8 patches of 14 px on a 112 px tile, 24-wide rows


def _standin(rgb: np.ndarray, grid: int = G, width: int = D) -> np.ndarray:
    """Stand-in embeddings, a fixed function of each patch's pixels: [grid^2, width]."""
    h = rgb.shape[0] // grid
    patches = rgb[:h * grid, :h * grid].reshape(grid, h, grid, h, 3).transpose(0, 2, 1, 3, 4).reshape(grid * grid, -1)
    proj = np.random.default_rng(1).standard_normal((patches.shape[1], width)) / np.sqrt(patches.shape[1])
    return np.tanh((patches / 255.0 - 0.5) @ proj).astype(np.float32)


@pytest.fixture(scope="module")
def static_then_motion(tmp_path_factory: pytest.TempPathFactory):
    """12 tiles sampled from a clip that is still for 3 s then moves (MJPG: still frames decode identically)."""
    path = _write(tmp_path_factory.mktemp("budget") / "still-then-moving.avi", _scene(S, S, 60, static_until=30), 10,
                  "MJPG")
    _, frames = read_video(path, Sampling(12))
    tiles = [f.rgb for f in frames]
    moving = [f.index > 30 for f in frames]
    return tiles, [_standin(t) for t in tiles], moving


def _fit(emb: list[np.ndarray], tiles: list[np.ndarray], grid: int, budget: int, measure: str = "pixels"
         ) -> tuple[BudgetPlan, list[np.ndarray]]:
    """Plan (with only the measure's input) and the kept rows of every frame."""
    plan = plan_budget(len(emb), grid, budget, **{measure: tiles if measure == "pixels" else emb}, measure=measure)
    return plan, [plan.take(f, e) for f, e in enumerate(emb)]


def test_generous_budget_changes_nothing(static_then_motion):
    tiles, emb, _ = static_then_motion
    plan, rows = _fit(emb, tiles, G, len(emb) * G * G)
    assert not plan.pooled and plan.threshold == 0 and plan.n_tokens == len(emb) * G * G and plan.side == G
    for p, r, e in zip(plan.positions, rows, emb, strict=True):
        assert np.array_equal(p, np.arange(G * G)) and np.array_equal(r, e)


def test_budget_pools_before_pruning(static_then_motion):
    tiles, emb, _ = static_then_motion
    cells = (G // 2) ** 2
    plan, rows = _fit(emb, tiles, G, len(emb) * G * G - 1)
    assert plan.pooled and plan.threshold == 0 and plan.n_tokens == len(emb) * cells  # pooled, nothing pruned
    assert plan.side == G // 2 and np.array_equal(rows[3], pool2x2(emb[3], G))


@pytest.mark.parametrize("measure", ["pixels", "embeddings"])
def test_pruning_drops_the_still_part_and_keeps_the_motion(static_then_motion, measure):
    tiles, emb, moving = static_then_motion
    cells = (G // 2) ** 2
    budget = len(emb) * cells // 2
    plan, _ = _fit(emb, tiles, G, budget, measure)
    assert plan.pooled and plan.threshold > 0 and plan.n_tokens <= budget
    assert plan.frames_used == list(range(len(emb)))
    assert np.array_equal(plan.positions[0], np.arange(cells))  # the first frame stays whole
    still = [len(p) for p, m in zip(plan.positions[1:], moving[1:], strict=True) if not m]
    kept = [len(p) for p, m in zip(plan.positions[1:], moving[1:], strict=True) if m]
    assert still and max(still) == 0
    assert min(kept) > 0
    for p in plan.positions:
        assert np.all(np.diff(p) > 0)  # raster order
    # the square's cells: where the red channel changed between consecutive moving frames
    for k in range(1, len(tiles)):
        if moving[k] and moving[k - 1]:
            changed = np.abs(tiles[k].astype(int) - tiles[k - 1].astype(int))[..., 0] > 100
            cells_changed = changed.reshape(G // 2, S // (G // 2), G // 2, S // (G // 2)).mean(axis=(1, 3)) > 0.1
            assert set(np.flatnonzero(cells_changed)) <= set(plan.positions[k]), k


def test_pruning_meets_every_budget_only_as_far_as_needed(static_then_motion):
    tiles, emb, _ = static_then_motion
    cells = (G // 2) ** 2
    pruner = ref.Pruner(emb, tiles, G, "pixels")  # counts kept cells at any threshold, independently
    cap, step = ref.MAX_CHANGE["pixels"], ref.MAX_CHANGE["pixels"] * ref.TOLERANCE
    n = len(emb)
    for budget in range(n * cells - 1, cells - 1, -7):
        plan = plan_budget(n, G, budget, pixels=tiles)
        assert plan.n_tokens <= budget and plan.pooled
        if len(plan.frames_used) < n:  # frames dropped only where pruning up to the cap cannot fit one more
            assert pruner.count(ref.spread(n, len(plan.frames_used) + 1), cap) > budget
        if plan.threshold > 0:  # the smallest threshold that fits, to the bisection's resolution
            assert pruner.count(plan.frames_used, plan.threshold - step) > budget
            assert pruner.count(plan.frames_used, plan.threshold) == plan.n_tokens


def test_budget_below_pruning_limit_drops_whole_frames():
    rng = np.random.default_rng(3)
    tiles = [rng.integers(0, 256, (S, S, 3), dtype=np.uint8) for _ in range(10)]  # every cell changes a lot
    cells = (G // 2) ** 2
    plan = plan_budget(len(tiles), G, 3 * cells, pixels=tiles)
    assert plan.n_tokens <= 3 * cells and plan.frames_used == [0, 5, 9]  # 3 frames, spread (4.5 rounds up), ends kept
    assert np.array_equal(plan.positions[0], np.arange(cells))
    assert [len(p) for f, p in enumerate(plan.positions) if f not in plan.frames_used] == [0] * 7
    with pytest.raises(Llama3vError, match="below one pooled frame"):
        plan_budget(len(tiles), G, cells - 1, pixels=tiles)
    with pytest.raises(Llama3vError, match="needs the embeddings"):
        plan_budget(len(tiles), G, 3 * cells, pixels=tiles, measure="embeddings")


def test_pixel_plans_need_no_embeddings(static_then_motion):
    tiles, emb, _ = static_then_motion
    budget = len(emb) * (G // 2) ** 2 // 2
    plan = plan_budget(len(tiles), G, budget, pixels=tiles)  # before any frame is encoded
    skipped = [f for f, p in enumerate(plan.positions) if len(p) == 0]
    assert skipped and plan.take(skipped[0], emb[skipped[0]]).shape == (0, D)
    with pytest.raises(Llama3vError, match="rows, expected"):
        plan.take(0, emb[0][:-1])


def test_pooling_an_odd_grid_keeps_the_edge():
    rows = np.arange(9 * 2, dtype=np.float32).reshape(9, 2)  # a 3x3 grid
    pooled = pool2x2(rows, 3)
    grid = rows.reshape(3, 3, 2)
    expected = [grid[:2, :2].mean((0, 1)), grid[:2, 2].mean(0), grid[2, :2].mean(0), grid[2, 2]]
    np.testing.assert_array_equal(pooled, np.stack(expected))
    np.testing.assert_array_equal(ref.pool2x2(rows, 3), pooled)


@pytest.mark.parametrize("grid,tile", [(8, 112), (7, 100), (5, 61)])
@pytest.mark.parametrize("measure", ["pixels", "embeddings"])
def test_budget_matches_the_reference(static_then_motion, grid, tile, measure):
    frames, _, _ = static_then_motion
    tiles = [cv2.resize(t, (tile, tile), interpolation=cv2.INTER_AREA) for t in frames]
    emb = [_standin(t, grid) for t in tiles]
    cells = ((grid + 1) // 2) ** 2
    n = len(emb)
    for budget in (n * grid * grid, n * grid * grid - 1, n * cells, n * cells - 1, n * cells // 3, 2 * cells, cells):
        plan, ours = _fit(emb, tiles, grid, budget, measure)
        positions, rows, threshold = ref.fit_budget(emb, tiles, grid, budget, measure)
        assert plan.threshold == threshold, budget
        for f, (p, a, b) in enumerate(zip(plan.positions, ours, rows, strict=True)):
            assert np.array_equal(p, positions[f]), (budget, f)
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_timestamps_and_default_budget():
    assert timestamp_text(12.5) == "<t=12.5s>"
    assert timestamp_text(0.04) == "<t=0.0s>"
    assert timestamp_text(59.96) == "<t=60.0s>"
    assert default_budget(4096, 300, 256) == 3540
    assert default_budget(4096, 300, 256, n_videos=2) == 1770
    with pytest.raises(Llama3vError, match="no room for video"):
        default_budget(512, 400, 256)
