"""Vectorised PyTorch backends: run wherever torch runs (CPU and CUDA)."""
from kernels.registry import batch_variant, family_backends

# Measured on CPU by tests/test_invariance.py (a part of a batch alone against its part of the batch's outputs).
BACKENDS = batch_variant(family_backends("kernels.torch", "torch", ("cpu", "cuda")), {
    "gated_delta_rule": "mode 'recurrent': a one-token sequence alone (T = 1, no cu_seqlens) runs decode_step, "
                        "whose batched ops round in the last bits otherwise than the token loop that the same "
                        "token takes packed with other sequences",
    "moe": "CPU GEMM blocking depends on M: an expert's GEMM over the rows of its tokens (MKL's matrix-vector "
           "kernel at M = 1) rounds a token's sums otherwise with the other tokens routed to that expert",
})
