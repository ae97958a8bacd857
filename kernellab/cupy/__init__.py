"""cupy backends: the NumPy-minded GPU baseline, array-level CuPy programs (cuBLAS matmuls, batched where
possible, plus fused ElementwiseKernel / ReductionKernel parts). Declared here, imported on first use. The same
programs run on NumPy arrays for CPU tensors (tests/toolchains/test_cuda_cupy.py checks them that way without a GPU)."""
import torch

from kernellab.registry import family_backends

# Not the fp8 ops: no kernellab/cupy/moe_fp8.py.
OPS = ("linear_attention", "gated_delta_rule", "attention", "route", "moe_permute", "moe_unpermute", "grouped_gemm",
       "moe")
BACKENDS = family_backends("kernellab.cupy", "cupy", ("cuda",), OPS, requires=("cupy",), row_major=True,
                           dtypes=(torch.float32, torch.float16, torch.bfloat16))
