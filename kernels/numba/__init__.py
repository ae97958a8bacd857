"""numba backends; declared here, imported on first use.

"numba": CPU kernels (numba.njit(parallel=True)). "numba_cuda": numba.cuda kernels, on a CUDA GPU or on CPU
tensors under the simulator (NUMBA_ENABLE_CUDASIM=1, slow: tiny sizes only).
"""
from dataclasses import dataclass

import torch

from kernels.registry import Backend

_CPU = ("cpu",)
_CUDA = ("cuda", "cudasim")
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # computed in float32: no float64 yardstick runs



@dataclass(frozen=True)
class NumbaAotSpec:
    """One numba.cuda kernel at one signature, for profiling.static (numba.cuda.compile_ptx for sm_90, then ptxas).

    name: a label for the table; kernel: "package.module:attr" of the @cuda.jit kernel; signature: a numba
    signature string; threads: threads per block of its launches."""

    name: str
    kernel: str
    signature: str
    threads: int | None = None


BACKENDS = [
    Backend("gated_delta_rule", "numba", "kernels.numba.gated_delta_rule:gated_delta_rule", _CPU, requires=("numba",)),
    Backend("moe_permute", "numba", "kernels.numba.moe:moe_permute", _CPU, requires=("numba",)),
    Backend("moe_unpermute", "numba", "kernels.numba.moe:moe_unpermute", _CPU, requires=("numba",)),
    Backend("moe", "numba", "kernels.numba.moe:moe", _CPU, requires=("numba",)),
    Backend("gated_delta_rule", "numba_cuda", "kernels.numba.gpu_gated_delta_rule:gated_delta_rule", _CUDA,
            requires=("numba",), dtypes=_CUDA_DTYPES),
    Backend("moe_permute", "numba_cuda", "kernels.numba.gpu_moe:moe_permute", _CUDA, requires=("numba",),
            dtypes=_CUDA_DTYPES),
    Backend("moe_unpermute", "numba_cuda", "kernels.numba.gpu_moe:moe_unpermute", _CUDA, requires=("numba",),
            dtypes=_CUDA_DTYPES),
    Backend("grouped_gemm", "numba_cuda", "kernels.numba.gpu_moe:grouped_gemm", _CUDA, requires=("numba",),
            dtypes=_CUDA_DTYPES),
]
