"""Vectorised PyTorch backends: run wherever torch runs (CPU and CUDA). Backward: the chunked linear attentions'
and the MoE ops' own (`<op>_backward` beside each forward); attention through SDPA's autograd, route through
softmax / top-k's."""
from kernellab.registry import AUTOGRAD, BESIDE, batch_variant, family_backends

# Batch invariance measured on CPU by tests/test_invariance.py (a part of a batch alone against its part of the
# batch's outputs).
BACKENDS = batch_variant(family_backends("kernellab.torch", "torch", ("cpu", "cuda"), backward={
    "linear_attention": BESIDE, "gated_delta_rule": BESIDE, "kda": BESIDE, "attention": AUTOGRAD, "route": AUTOGRAD,
    "moe_permute": BESIDE, "moe_unpermute": BESIDE, "grouped_gemm": BESIDE, "moe": BESIDE}), {
    "gated_delta_rule": "mode 'recurrent': a one-token sequence alone (T = 1, no cu_seqlens) runs decode_step, "
                        "whose batched ops round in the last bits otherwise than the token loop that the same "
                        "token takes packed with other sequences",
    "moe": "CPU GEMM blocking depends on M: an expert's GEMM over the rows of its tokens (MKL's matrix-vector "
           "kernel at M = 1) rounds a token's sums otherwise with the other tokens routed to that expert",
    "moe_fp8": "as moe: its float32 GEMMs on the dequantized weights block by the rows of an expert's tokens",
})
