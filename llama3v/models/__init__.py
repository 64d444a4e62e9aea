"""PyTorch reference models (vision tower, projector, Llama-3 decoder, LLaVA) and the tiny checkpoint factory.

Submodules are imported on demand: `from llama3v.models.llava import LlavaReference`. Importing this
package alone does not import torch.
"""
