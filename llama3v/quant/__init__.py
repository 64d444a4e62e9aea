"""Quantization: the one table of types, which type each tensor is stored in, the encoders, and the
quantizers for existing files (mmproj: ours; LLM: llama.cpp's).
"""
