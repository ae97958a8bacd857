"""cuda backends: CUDA C++ kernels (kernels/cuda/*.cu) compiled at run time by NVRTC through CuPy, launched on
torch tensors without copies. Declared here, imported on first use.

Each .cu compiles standalone too (`nvcc -arch=sm_90 -cubin -Xptxas -v -std=c++17`, tests/test_cuda_cupy.py):
SOURCES lists them with the kernels whose ptxas report must show no spills.
"""
import torch

from kernels.registry import Backend

_PLACES = ("cuda",)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# .cu file -> name prefixes of its main kernels (zero spills asserted for every instantiation)
SOURCES = {
    "gated_delta_rule.cu": ("gdr_recurrent", "gdr_chunk_state"),
    "moe.cu": ("moe_grouped_gemm", "moe_place", "moe_unpermute", "moe_gather_rows"),
}


def _backend(op, module):
    return Backend(op, "cuda", f"kernels.cuda.{module}:{op}", _PLACES, requires=("cupy",), dtypes=_DTYPES)


BACKENDS = [
    _backend("linear_attention", "linear_attention"),
    _backend("gated_delta_rule", "gated_delta_rule"),
    _backend("moe_permute", "moe"),
    _backend("moe_unpermute", "moe"),
    _backend("grouped_gemm", "moe"),
    _backend("moe", "moe"),
]
