"""cupy backends: the NumPy-minded GPU baseline, array-level CuPy programs (cuBLAS matmuls, batched where
possible, plus fused ElementwiseKernel / ReductionKernel parts). Declared here, imported on first use. The same
programs run on NumPy arrays for CPU tensors (tests/test_cuda_cupy.py checks them that way without a GPU)."""
import torch

from kernels.registry import Backend

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _backend(op, module):
    return Backend(op, "cupy", f"kernels.cupy.{module}:{op}", ("cuda",), requires=("cupy",), dtypes=_DTYPES)


BACKENDS = [
    _backend("linear_attention", "linear_attention"),
    _backend("gated_delta_rule", "gated_delta_rule"),
    _backend("attention", "attention"),
    _backend("route", "moe"),
    _backend("moe_permute", "moe"),
    _backend("moe_unpermute", "moe"),
    _backend("grouped_gemm", "moe"),
    _backend("moe", "moe"),
]
