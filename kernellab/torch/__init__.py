"""Vectorised PyTorch backends: run wherever torch runs (CPU and CUDA). Backward: the chunked linear attentions'
and the MoE ops' own (`<op>_backward` beside each forward); attention through SDPA's autograd, route through
softmax / top-k's."""
from dataclasses import replace

from kernellab.ops import NAMES
from kernellab.registry import AUTOGRAD, BESIDE, batch_variant, family_backends
from kernellab.serving import KEYWORDS, OPS as SERVING_OPS

# Every op of kernellab/ops.py: torch is the baseline every op has (tests/toolchains/test_registry.py), at
# kernellab/torch/<family>.py:<op>, its backward beside it (<op>_backward) but where OTHER_BACKWARD says otherwise
# (tests/toolchains/test_registry.py finds each function without importing it): a new op adds no line here.
OPS = NAMES
OTHER_BACKWARD = {"attention": AUTOGRAD, "route": AUTOGRAD,
                  "grouped_gemm_fp8": None, "moe_fp8": None}  # the fp8 ops are inference ops
# Batch invariance measured on CPU by tests/ops/test_invariance.py (a part of a batch alone against its part of the
# batch's outputs).
_ALL = [replace(b, serving=KEYWORDS) if b.op in SERVING_OPS else b  # every serving keyword of the linear attentions
        for b in family_backends("kernellab.torch", "torch", ("cpu", "cuda"), OPS,
                                 backward={op: OTHER_BACKWARD.get(op, BESIDE) for op in OPS})]
BACKENDS = batch_variant(_ALL, {
    "gated_delta_rule": "mode 'recurrent': a one-token sequence alone (T = 1, no cu_seqlens) runs decode_step, "
                        "whose batched ops round in the last bits otherwise than the token loop that the same "
                        "token takes packed with other sequences",
    "moe": "CPU GEMM blocking depends on M: an expert's GEMM over the rows of its tokens (MKL's matrix-vector "
           "kernel at M = 1) rounds a token's sums otherwise with the other tokens routed to that expert",
    "moe_fp8": "as moe: its float32 GEMMs on the dequantized weights block by the rows of an expert's tokens",
})
