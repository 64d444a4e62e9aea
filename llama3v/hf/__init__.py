"""Reading Hugging Face checkpoints: configuration, tensor-name key formats and the safetensors/.bin reader.

The converter and the PyTorch reference both read checkpoints through this package, so neither
depends on the other.
"""
