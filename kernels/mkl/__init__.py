"""CPU backends on MKL's packed GEMM (the MKL inside torch's x86 CPU build): expert weights packed once per weight
tensor and reused by every call. Not an "auto" choice: the packed copies add to the weights' memory."""
from kernels.registry import family_backends

BACKENDS = family_backends("kernels.mkl", "mkl", ("cpu",), ops=("grouped_gemm", "moe"),
                           probe="kernels.mkl.packed:unavailable_reason")
