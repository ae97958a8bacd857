"""numba backend: CPU kernels (numba.njit(parallel=True)); declared here, imported on first use. The numba.cuda
kernels are the `numba_cuda` backend (kernellab/numba_cuda)."""
from kernellab.registry import family_backends

BACKENDS = family_backends("kernellab.numba", "numba", ("cpu",), requires=("numba",), row_major=True,
                           ops=("gated_delta_rule", "moe_permute", "moe_unpermute", "moe"))
