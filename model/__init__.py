"""A Qwen3.5-MoE text model whose linear attention, attention, routing and experts run on the lab's kernels."""
from model.config import ModelConfig
from model.model import Cache, Qwen35Moe, from_pretrained

__all__ = ["Cache", "ModelConfig", "Qwen35Moe", "from_pretrained"]
