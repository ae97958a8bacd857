"""cupy backends: the NumPy-minded GPU baseline, array-level CuPy programs (cuBLAS matmuls, batched where
possible, plus fused ElementwiseKernel / ReductionKernel parts). Declared here, imported on first use. The same
programs run on NumPy arrays for CPU tensors (tests/test_cuda_cupy.py checks them that way without a GPU)."""
import torch

from kernellab.registry import FP8_OPS, OPS, family_backends

BACKENDS = family_backends("kernellab.cupy", "cupy", ("cuda",), requires=("cupy",),
                           dtypes=(torch.float32, torch.float16, torch.bfloat16),
                           ops=tuple(op for op in OPS if op not in FP8_OPS + ("kda",)))
