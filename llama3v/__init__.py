"""llama3v: local LLaVA-style vision-language models on llama.cpp."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

# libllama and libmtmd run OpenMP pools on few cores; spinning waiters stall each other (~385 ms an
# encode on 2 cores, and hundreds of times slower when torch's libgomp is shared). OpenMP reads this
# when the first OpenMP library loads, which may be torch's, so it is set as early as llama3v loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from llama3v.errors import Llama3vError, Llama3vWarning

if TYPE_CHECKING:
    from llama3v.runtime.session import Session

__version__ = "0.1.0"
__all__ = ["Llama3vError", "Llama3vWarning", "load", "__version__"]


def load(model_path: str, mmproj_path: str | None = None, **options: object) -> Session:
    """Load a model GGUF and (optionally) its mmproj into a Session; options as Session takes them."""
    from llama3v.runtime.session import Session

    return Session(model_path, mmproj_path, **options)
