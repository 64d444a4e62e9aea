"""Read a Hugging Face checkpoint directory: config, tokenizer files and tensors, lazily.

Safetensors are parsed here (header + memory map) rather than through a framework, so bf16
weights load without torch by widening the raw uint16 to float32. `.bin` files need torch and
are loaded with `weights_only=True`, which refuses pickled code.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llama3v.errors import Llama3vError

_SAFETENSORS_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # widened to float32 on read
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
}


@dataclass
class _SafetensorsEntry:
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass
class Checkpoint:
    """A checkpoint's config and tensors; tensors are read one at a time, as float32 arrays."""

    root: Path
    config: dict
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    _entries: dict[str, _SafetensorsEntry] = field(default_factory=dict, repr=False)
    _bin_files: dict[str, Path] = field(default_factory=dict, repr=False)
    _bin_cache: dict[Path, dict] = field(default_factory=dict, repr=False)

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def get(self, name: str) -> np.ndarray:
        """Return tensor `name` as a float32 array (bf16/f16 widened)."""
        if name in self._entries:
            return _read_safetensors(self._entries[name])
        if name in self._bin_files:
            path = self._bin_files[name]
            if path not in self._bin_cache:
                self._bin_cache.clear()  # keep one shard in memory at a time
                self._bin_cache[path] = _load_bin(path)
            return self._bin_cache[path][name].float().numpy()
        raise Llama3vError(f"{self.root}: tensor {name!r} not found")

    def read_json(self, filename: str) -> dict | None:
        """Return a JSON file beside the weights, or None when absent."""
        path = self.root / filename
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise Llama3vError(f"{path}: not valid JSON ({e})") from e

    def read_text(self, filename: str) -> str | None:
        """Return a text file beside the weights, or None when absent."""
        path = self.root / filename
        return path.read_text(encoding="utf-8") if path.is_file() else None


def open_checkpoint(path: str | Path, weights_required: bool = True) -> Checkpoint:
    """Index a checkpoint directory (single or sharded safetensors, or .bin) without loading weights."""
    root = Path(path)
    if not root.is_dir():
        raise Llama3vError(f"{root}: not a checkpoint directory")
    config_path = root / "config.json"
    if not config_path.is_file():
        raise Llama3vError(f"{root}: no config.json (expected a Hugging Face checkpoint directory)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise Llama3vError(f"{config_path}: not valid JSON ({e})") from e
    except RecursionError:
        raise Llama3vError(f"{config_path}: JSON nested too deeply") from None
    if not isinstance(config, dict):
        raise Llama3vError(f"{config_path}: must hold a JSON object, not a {type(config).__name__}")

    ckpt = Checkpoint(root=root, config=config, shapes={}, dtypes={})
    st_files = _weight_files(root, "model.safetensors", "model.safetensors.index.json", ".safetensors")
    if st_files:
        for f in st_files:
            for name, entry in _read_safetensors_header(f).items():
                ckpt._entries[name] = entry
                ckpt.shapes[name] = entry.shape
                ckpt.dtypes[name] = entry.dtype
        return ckpt
    bin_files = _weight_files(root, "pytorch_model.bin", "pytorch_model.bin.index.json", ".bin")
    if bin_files:
        for f in bin_files:
            for name, t in _load_bin(f).items():
                ckpt._bin_files[name] = f
                ckpt.shapes[name] = tuple(t.shape)
                ckpt.dtypes[name] = str(t.dtype).removeprefix("torch.")
        return ckpt
    if weights_required:
        raise Llama3vError(f"{root}: no weights found (*.safetensors or pytorch_model*.bin)")
    return ckpt


def _weight_files(root: Path, single: str, index: str, suffix: str) -> list[Path]:
    if (root / index).is_file():
        try:
            weight_map = json.loads((root / index).read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError) as e:
            raise Llama3vError(f"{root / index}: not a valid shard index ({e})") from e
        files = sorted({root / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise Llama3vError(f"{root}: shards listed in {index} are missing: {', '.join(missing)}")
        return files
    if (root / single).is_file():
        return [root / single]
    return sorted(p for p in root.glob(f"*{suffix}") if p.is_file() and "training_args" not in p.name)


def _read_safetensors_header(path: Path) -> dict[str, _SafetensorsEntry]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise Llama3vError(f"{path}: truncated safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise Llama3vError(f"{path}: corrupt safetensors header (length {n} > file size)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise Llama3vError(f"{path}: corrupt safetensors header ({e})") from e
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info["dtype"]
        if dtype not in _SAFETENSORS_DTYPES:
            raise Llama3vError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        start, end = info["data_offsets"]
        entry = _SafetensorsEntry(path, dtype, tuple(info["shape"]), 8 + n + start, 8 + n + end)
        expected = int(np.prod(entry.shape, dtype=np.int64)) * np.dtype(_SAFETENSORS_DTYPES[dtype]).itemsize
        if entry.end > size or entry.end - entry.start != expected:
            raise Llama3vError(f"{path}: tensor {name!r} lies outside the file (truncated download?)")
        entries[name] = entry
    return entries


def _read_safetensors(e: _SafetensorsEntry) -> np.ndarray:
    count = (e.end - e.start) // np.dtype(_SAFETENSORS_DTYPES[e.dtype]).itemsize
    raw = np.fromfile(e.path, dtype=_SAFETENSORS_DTYPES[e.dtype], count=count, offset=e.start)
    if e.dtype == "BF16":
        raw = (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False).reshape(e.shape)


def _load_bin(path: Path) -> dict:
    try:
        import torch
    except ImportError as e:
        raise Llama3vError(
            f"{path}: reading .bin checkpoints needs torch (pip install 'llama3v[reference]'); "
            "safetensors checkpoints do not"
        ) from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe pickles
        raise Llama3vError(f"{path}: cannot load as a weights-only PyTorch file ({e})") from e
    if not isinstance(state, dict):
        raise Llama3vError(f"{path}: expected a state dict of tensors")
    return state


def read_safetensors_file(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of one (small) safetensors file, as float32 arrays."""
    return {name: _read_safetensors(e) for name, e in _read_safetensors_header(Path(path)).items()}
