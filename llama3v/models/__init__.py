"""PyTorch reference models: vision tower, projector, Llama-3 decoder, LLaVA, and the video sampling reference.

Submodules are imported on demand: `from llama3v.models.llava import LlavaReference`. Importing this
package alone does not import torch. Checkpoints are read through llama3v.hf, as the converter reads them.
"""
