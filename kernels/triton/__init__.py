"""Triton backends: CUDA GPUs, or CPU tensors under TRITON_INTERPRET=1.

Each kernel module also lists `AOT_SPECS`: its kernels at production configurations, which
`profiling.static` compiles ahead of time for sm_90 (no GPU needed) to report registers, spills and
shared memory.
"""
from dataclasses import dataclass, field

import torch

from kernels.registry import FP8_OPS, OPS, batch_variant, family_backends


@dataclass(frozen=True)
class AotSpec:
    """One @triton.jit kernel at one configuration, for triton.compile(ASTSource(...), target=sm_90).

    name:       a label for the table, e.g. "gdr_chunk_h[K=128,V=128,bf16]".
    kernel:     "package.module:attr" of the @triton.jit function.
    signature:  argument name -> Triton type ("*bf16", "*fp32", "i32", "fp32", "constexpr").
    constexprs: values of the constexpr arguments.
    divisible_by_16: integer arguments that are multiples of 16 at this configuration (Triton specialises such
                values at launch; without the hint the AOT build is not the code that runs).
    """

    name: str
    kernel: str
    signature: dict
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    divisible_by_16: tuple = ()


BACKENDS = family_backends("kernels.triton", "triton", ("cuda", "interpret"), requires=("triton",),
                           dtypes=(torch.float32, torch.float16, torch.bfloat16),
                           ops=tuple(op for op in OPS if op not in FP8_OPS))

# ---- batch invariance, measured under TRITON_INTERPRET=1 by tests/test_invariance.py (a separate edit: keep it
# when this file is rewritten).
BACKENDS = batch_variant(BACKENDS, {
    "moe": "under TRITON_INTERPRET=1 the tile products are NumPy matmuls, which round a row by its position in the "
           "tile, and a token alone sits in another row of its expert's block than in a batch; on a GPU (not "
           "measured) the decode (N <= 64, BLOCK_M 16) and prefill paths also take different tiles (GEMM_CONFIGS)",
})
