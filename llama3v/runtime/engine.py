"""Load llama.cpp (libllama and libmtmd from llama-cpp-python) once, with this process's settings.

llama.cpp reports failures on its log, not through return values, so the log is captured: the
recent warnings and errors are attached to the Llama3vError raised for a failed call, and the
rest is shown only with `verbose`.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from collections import deque
from pathlib import Path
from types import ModuleType

from llama3v.errors import Llama3vError

# OMP_WAIT_POLICY=PASSIVE is set by llama3v/__init__.py, before any OpenMP library (torch's too) loads.

_WARN, _ERROR, _CONT = 3, 4, 5  # ggml_log_level
_state: dict = {}
_recent: deque[str] = deque(maxlen=20)
verbose = False


def set_verbose(flag: bool) -> None:
    """Show llama.cpp's own log on stderr (off by default)."""
    global verbose
    verbose = flag


def _on_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    msg = text.decode("utf-8", "replace") if text else ""
    if verbose:
        sys.stderr.write(msg)
    if level in (_WARN, _ERROR):
        _recent.append(msg.strip())
    elif level == _CONT and _recent:
        _recent[-1] += msg.rstrip("\n")


def _preload_blas() -> None:
    """An engine built with LLAMA3V_BLAS=mkl links pip's libmkl_rt, which lives in the environment's
    lib directory, outside the library path: load it first so the engine's reference resolves."""
    mkl = Path(sys.prefix) / "lib" / "libmkl_rt.so.3"
    spec = importlib.util.find_spec("llama_cpp")
    lib_dir = os.environ.get("LLAMA_CPP_LIB_PATH") or (spec and spec.origin and Path(spec.origin).parent / "lib")
    if lib_dir and (Path(lib_dir) / "libggml-blas.so").exists() and mkl.exists():
        ctypes.CDLL(str(mkl), mode=ctypes.RTLD_GLOBAL)


def libs() -> tuple[ModuleType, ModuleType]:
    """Return (llama_cpp, mtmd_cpp), importing and initialising them on first use."""
    if "llama" not in _state:
        _preload_blas()
        try:
            import llama_cpp
            import llama_cpp.mtmd_cpp as mtmd
        except (ImportError, OSError) as e:
            raise Llama3vError(
                f"cannot load llama.cpp through llama-cpp-python ({e}); run `make setup` in the llama3v "
                "checkout, or see README.md, section 'The engine'") from e
        callback = llama_cpp.llama_log_callback(_on_log)
        llama_cpp.llama_log_set(callback, ctypes.c_void_p())
        mtmd.mtmd_log_set(callback, ctypes.c_void_p())
        llama_cpp.llama_backend_init()
        _state.update(llama=llama_cpp, mtmd=mtmd, callback=callback)  # keep the callback alive
    return _state["llama"], _state["mtmd"]


def take_log() -> str:
    """The warnings and errors llama.cpp logged since the last call, joined (for error messages)."""
    text = "; ".join(m for m in _recent if m)
    _recent.clear()
    return text


def failure(what: str) -> Llama3vError:
    """An error for a failed llama.cpp call, with what llama.cpp logged about it."""
    detail = take_log()
    return Llama3vError(f"{what}: {detail}" if detail else what)


def default_threads() -> int:
    """Threads for compute: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


# llama3v's mllama API (patches/0005 and 0006), which llama-cpp-python's bindings do not declare.
_F32P = ctypes.POINTER(ctypes.c_float)
_MLLAMA_API = {
    "llama_mllama_add_image": ([ctypes.c_void_p, _F32P, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32,
                                ctypes.c_int32], ctypes.c_int32),
    "llama_mllama_clear_images": ([ctypes.c_void_p], None),
    "llama_mllama_n_images": ([ctypes.c_void_p], ctypes.c_int32),
    "llama_mllama_vision_load": ([ctypes.c_char_p], ctypes.c_void_p),
    "llama_mllama_vision_free": ([ctypes.c_void_p], None),
    "llama_mllama_vision_n_rows": ([ctypes.c_void_p], ctypes.c_int32),
    "llama_mllama_vision_n_embd": ([ctypes.c_void_p], ctypes.c_int32),
    "llama_mllama_vision_encode": ([ctypes.c_void_p, _F32P, ctypes.c_int32, ctypes.c_int32, ctypes.c_bool, _F32P,
                                    ctypes.c_int32], ctypes.c_int32),
}


def mllama_lib() -> ctypes.CDLL:
    """libllama with the mllama functions declared; a clear error when this engine lacks them."""
    if "mllama" not in _state:
        llama, _ = libs()
        lib = llama.llama_cpp._lib
        for name, (args, res) in _MLLAMA_API.items():
            try:
                fn = getattr(lib, name)
            except AttributeError:
                raise Llama3vError("mllama inference needs llama3v's mllama engine patch (patches/0005, 0006), which "
                                   "this llama-cpp-python lacks: build the engine with `make setup` "
                                   "(docs/mllama.md)") from None
            fn.argtypes, fn.restype = args, res
        _state["mllama"] = lib
    return _state["mllama"]
