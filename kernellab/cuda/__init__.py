"""cuda backends: CUDA C++ kernels (kernellab/cuda/*.cu) compiled at run time by NVRTC through CuPy, launched on
torch tensors without copies. Declared here, imported on first use.

Each .cu compiles standalone too (`nvcc -arch=sm_90 -cubin -Xptxas -v -std=c++17`, tests/toolchains/test_cuda_cupy.py):
SOURCES lists them with the kernels whose ptxas report must show no spills.
"""
import torch

from kernellab.registry import family_backends

# .cu file -> name prefixes of its main kernels (zero spills asserted for every instantiation)
SOURCES = {
    "gated_delta_rule.cu": ("gdr_recurrent", "gdr_chunk_state"),
    "moe.cu": ("moe_grouped_gemm", "moe_place", "moe_unpermute", "moe_gather_rows"),
}


BACKENDS = family_backends("kernellab.cuda", "cuda", ("cuda",), requires=("cupy",), row_major=True,
                           dtypes=(torch.float32, torch.float16, torch.bfloat16),
                           ops=("linear_attention", "gated_delta_rule", "moe_permute", "moe_unpermute",
                                "grouped_gemm", "moe"))
