"""Vectorised PyTorch backends: run wherever torch runs (CPU and CUDA). Backward: the chunked linear attentions'
and the MoE ops' own (`<op>_backward` beside each forward); attention through SDPA's autograd, route through
softmax / top-k's."""
from kernels.registry import AUTOGRAD, BESIDE, family_backends

BACKENDS = family_backends("kernels.torch", "torch", ("cpu", "cuda"), backward={
    "linear_attention": BESIDE, "gated_delta_rule": BESIDE, "attention": AUTOGRAD, "route": AUTOGRAD,
    "moe_permute": BESIDE, "moe_unpermute": BESIDE, "grouped_gemm": BESIDE, "moe": BESIDE})
