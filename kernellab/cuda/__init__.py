"""cuda backends: CUDA C++ kernels (kernellab/cuda/*.cu) compiled at run time by NVRTC through CuPy, launched on
torch tensors without copies. Declared here, imported on first use.

Each .cu compiles standalone too (`nvcc -arch=sm_90 -cubin -Xptxas -v -std=c++17`, tests/toolchains/test_cuda_cupy.py):
SOURCES lists them with the kernels whose ptxas report must show no spills.
"""
from dataclasses import replace

import torch

from kernellab.registry import family_backends
from kernellab.serving import KEYWORDS

# .cu file -> name prefixes of its main kernels (zero spills asserted for every instantiation)
SOURCES = {
    "gated_delta_rule.cu": ("gdr_recurrent", "gdr_chunk_state"),
    "moe.cu": ("moe_grouped_gemm", "moe_place", "moe_unpermute", "moe_gather_rows"),
}


# The gated delta rule takes every serving keyword (kernellab/cuda/gated_delta_rule.py: in the recurrent kernel;
# the chunked mode through kernellab.serving.serve).
BACKENDS = [replace(backend, serving=KEYWORDS) if backend.op == "gated_delta_rule" else backend
            for backend in family_backends("kernellab.cuda", "cuda", ("cuda",), requires=("cupy",), row_major=True,
                                           dtypes=(torch.float32, torch.float16, torch.bfloat16),
                                           ops=("linear_attention", "gated_delta_rule", "moe_permute",
                                                "moe_unpermute", "grouped_gemm", "moe"))]
