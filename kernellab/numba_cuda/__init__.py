"""numba_cuda backend: numba.cuda kernels, on a CUDA GPU or on CPU tensors under the simulator
(NUMBA_ENABLE_CUDASIM=1, slow: tiny sizes only); declared here, imported on first use."""
from dataclasses import dataclass

import torch

from kernellab.registry import family_backends


@dataclass(frozen=True)
class NumbaAotSpec:
    """One numba.cuda kernel at one signature, for profiling.static (numba.cuda.compile_ptx for sm_90, then ptxas).

    name: a label for the table; kernel: "package.module:attr" of the @cuda.jit kernel; signature: a numba
    signature string; threads: threads per block of its launches."""

    name: str
    kernel: str
    signature: str
    threads: int | None = None


# computed in float32: no float64 yardstick runs
BACKENDS = family_backends("kernellab.numba_cuda", "numba_cuda", ("cuda", "cudasim"), requires=("numba",),
                           row_major=True, dtypes=(torch.float32, torch.float16, torch.bfloat16),
                           ops=("gated_delta_rule", "moe_permute", "moe_unpermute", "grouped_gemm"))
