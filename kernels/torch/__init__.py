"""Vectorised PyTorch backends: run wherever torch runs (CPU and CUDA)."""
from kernels.registry import Backend

_ANYWHERE = ("cpu", "cuda")

BACKENDS = [
    Backend("linear_attention", "torch", "kernels.torch.linear_attention:linear_attention", _ANYWHERE),
    Backend("gated_delta_rule", "torch", "kernels.torch.gated_delta_rule:gated_delta_rule", _ANYWHERE),
    Backend("attention", "torch", "kernels.torch.attention:attention", _ANYWHERE),
    Backend("route", "torch", "kernels.torch.moe:route", _ANYWHERE),
    Backend("moe_permute", "torch", "kernels.torch.moe:moe_permute", _ANYWHERE),
    Backend("moe_unpermute", "torch", "kernels.torch.moe:moe_unpermute", _ANYWHERE),
    Backend("grouped_gemm", "torch", "kernels.torch.moe:grouped_gemm", _ANYWHERE),
    Backend("moe", "torch", "kernels.torch.moe:moe", _ANYWHERE),
]
