"""Reading Hugging Face checkpoints: configuration, tensor-name key formats, the safetensors/.bin reader, and
Hub ids resolved to local snapshots (hub.py).

The converter and the PyTorch reference both read checkpoints through this package, so neither
depends on the other.
"""
