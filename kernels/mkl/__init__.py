"""CPU backends on MKL (the MKL inside torch's x86 CPU build): expert GEMMs on weights packed once per weight
tensor, and the chunked linear attentions as one numba-compiled loop of MKL calls (kernels/mkl/chunked.py).
The MoE ops are not an "auto" choice: their packed copies add to the weights' memory."""
from kernels.registry import family_backends

_PROBE = "kernels.mkl.packed:unavailable_reason"
BACKENDS = (family_backends("kernels.mkl", "mkl", ("cpu",), ops=("grouped_gemm", "moe"), probe=_PROBE)
            + family_backends("kernels.mkl", "mkl", ("cpu",), ops=("linear_attention", "gated_delta_rule"),
                              requires=("numba",), probe=_PROBE))
