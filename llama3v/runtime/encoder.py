"""Encode image tiles with libmtmd (llama.cpp's vision graph) into LLM-ready embeddings."""

from __future__ import annotations

import ctypes
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from llama3v import gguf_schema as S
from llama3v.errors import Llama3vError, Llama3vWarning
from llama3v.gguf_header import read_tensor
from llama3v.runtime import engine, selfcheck
from llama3v.runtime.gguf_check import check_mmproj, is_mllama, read_gguf
from llama3v.runtime.image_processing import ImageSpec
from llama3v.runtime.s2 import S2Head

_FLASH_ATTN = {None: -1, False: 0, True: 1}  # llama_flash_attn_type: auto, disabled, enabled
_verdict: dict[str, str] = {}  # the engine self-check runs once per process


class VisionEncoder:
    """An mmproj loaded in libmtmd: uint8 RGB tiles of the tower's size in, float32 rows out."""

    def __init__(
        self,
        mmproj_path: str | Path,
        text_model: object = None,
        n_threads: int | None = None,
        use_gpu: bool = True,
        flash_attn: bool | None = None,
        check_engine: bool = True,
    ):
        self.path = Path(mmproj_path)
        info = read_gguf(self.path, arrays=(S.GRID_PINPOINTS, S.S2_SCALES))
        if is_mllama(info):  # its states are cross-attention inputs, not context rows: runtime/mllama.py encodes it
            raise info.fail("a Llama-3.2-Vision (mllama) mmproj: its vision states are not rows of the context, so "
                            "libmtmd does not take it; run it with its model (docs/mllama.md)")
        self.n_embd = check_mmproj(info)
        if S.FEATURE_LAYER not in info.kv:
            warnings.warn(_missing_feature_layer(self.path, int(info.get(S.BLOCK_COUNT))), Llama3vWarning, stacklevel=2)
        self.crop_size = size = int(info.get(S.IMAGE_SIZE))  # what libmtmd encodes in one pass
        self.grid = size // int(info.get(S.PATCH_SIZE))  # patches per tile side
        self.tokens_per_tile = self.grid ** 2
        # S2: a tile is the image at the largest scale; libmtmd's output is the tower's, projected here, so
        # libmtmd must not hold it to the LLM's width.
        self.s2 = S2Head.from_gguf(info) if S.S2_SCALES in info.kv else None
        self._crop_width = self.n_embd
        if self.s2 is not None:
            size, text_model = self.s2.scales[-1], None
            self._crop_width = int(info.get(S.EMBEDDING_LENGTH))
        flat = info.get(S.GRID_PINPOINTS) or []
        pinpoints = tuple((flat[i + 1], flat[i]) for i in range(0, len(flat) - 1, 2))  # stored (width, height)
        self.spec = ImageSpec(size=size, mode=str(info.get(S.PREPROCESS_MODE, "resize")),
                              mean=tuple(info.get(S.IMAGE_MEAN)), grid_pinpoints=pinpoints)
        self.newline = read_tensor(info, S.IMAGE_NEWLINE) if S.IMAGE_NEWLINE in info.tensors else None
        # HF-faithful arrangement where the checkpoint had LLaVA-NeXT's newline vector, else libmtmd's.
        self.default_layout = "hf" if self.newline is not None else "llama.cpp"
        if S.CLASS_EMBD in info.tensors and check_engine:
            require_fixed_engine()
        _, mtmd = engine.libs()
        self._mtmd = mtmd
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = n_threads or engine.default_threads()
        params.print_timings = False
        params.warmup = False  # a warm-up pass is a full encode; the first real one warms up instead
        params.flash_attn_type = _FLASH_ATTN[flash_attn]
        engine.take_log()
        self._ctx = mtmd.mtmd_init_from_file(str(self.path).encode(), text_model, params)
        if not self._ctx:
            raise engine.failure(f"{self.path}: libmtmd could not load this mmproj")
        self.n_encodes = 0  # tiles encoded by libmtmd (caches are measured against this)

    def encode(self, tile: np.ndarray) -> np.ndarray:
        """Embeddings of one tile, [tokens_per_tile, n_embd] float32."""
        size = self.spec.size
        if tile.shape != (size, size, 3) or tile.dtype != np.uint8:
            raise Llama3vError(f"tiles must be uint8 [{size}, {size}, 3], got {tile.dtype} {list(tile.shape)}")
        rows = self._encode_crop(tile) if self.s2 is None else self.s2.encode(tile, self._encode_crop, self.grid)
        self.n_encodes += 1
        return rows

    def _encode_crop(self, tile: np.ndarray) -> np.ndarray:
        """libmtmd's output for one tile of the tower's size."""
        size = self.crop_size
        m = self._mtmd
        data = np.ascontiguousarray(tile)
        bitmap = m.mtmd_bitmap_init(size, size, data.ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte)))
        chunks = m.mtmd_input_chunks_init()
        try:
            part = m.mtmd_input_part(text=None, bitmap=bitmap)
            parts = (ctypes.POINTER(m.mtmd_input_part) * 1)(ctypes.pointer(part))
            if m.mtmd_tokenize_from_parts(self._ctx, chunks, parts, 1, False) != 0:
                raise engine.failure(f"{self.path}: libmtmd could not prepare the image")
            chunk = m.mtmd_input_chunks_get(chunks, 0)
            n_tok = m.mtmd_input_chunk_get_n_tokens(chunk)
            if m.mtmd_input_chunk_get_type(chunk) != m.MTMD_INPUT_CHUNK_TYPE_IMAGE or n_tok != self.tokens_per_tile:
                raise Llama3vError(
                    f"{self.path}: libmtmd made {n_tok} tokens of a tile, expected {self.tokens_per_tile}")
            if m.mtmd_encode_chunk(self._ctx, chunk) != 0:
                raise engine.failure(f"{self.path}: libmtmd failed to encode the image")
            out = m.mtmd_get_output_embd(self._ctx)
            width = self._crop_width
            rows = np.ctypeslib.as_array(out, shape=(n_tok * width,)).reshape(n_tok, width).copy()
        finally:
            m.mtmd_input_chunks_free(chunks)
            m.mtmd_bitmap_free(bitmap)
        return rows

    def close(self) -> None:
        """Free the libmtmd context."""
        if getattr(self, "_ctx", None):
            self._mtmd.mtmd_free(self._ctx)
            self._ctx = None

    def __del__(self) -> None:
        self.close()


def engine_verdict() -> str:
    """Run the self-check probe (runtime/selfcheck.py) through this process's libmtmd once; FIXED, UNPATCHED or
    UNEXPECTED."""
    if "verdict" not in _verdict:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "probe.gguf"
            selfcheck.write_probe(path)
            encoder = VisionEncoder(path, n_threads=1, check_engine=False, flash_attn=False)
            try:
                output = encoder.encode(selfcheck.probe_pixels())
            finally:
                encoder.close()
        _verdict["verdict"] = selfcheck.classify(output, *selfcheck.predictions())
    return _verdict["verdict"]


def require_fixed_engine() -> None:
    """Raise unless libmtmd handles the class token correctly (skippable for measurements)."""
    if os.environ.get(selfcheck.SKIP_ENV) == "1":
        return
    verdict = engine_verdict()
    if verdict == selfcheck.UNPATCHED:
        raise Llama3vError(selfcheck.INSTALL_HINT)
    if verdict == selfcheck.UNEXPECTED:
        raise Llama3vError("libmtmd gave an unexpected result on llama3v's built-in probe; " + selfcheck.INSTALL_HINT)


def _missing_feature_layer(path: Path, blocks: int) -> str:
    """What an mmproj without clip.vision.feature_layer does in libmtmd, and the fix (docs/formats.md)."""
    return (f"{path} has no clip.vision.feature_layer: libmtmd runs only {blocks - 1} of its {blocks} vision blocks "
            "(llama.cpp #25817), so its image embeddings are not the checkpoint's. Files from llama.cpp's legacy "
            f"LLaVA converter need all {blocks}: run `llama3v fix-mmproj {path}` (adds feature_layer = [{blocks}]), "
            "or convert the checkpoint with `llama3v convert`")
