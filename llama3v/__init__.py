"""llama3v: local LLaVA-style vision-language models on llama.cpp."""

__version__ = "0.1.0"
