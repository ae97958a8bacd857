"""numba backend: CPU kernels (numba.njit(parallel=True)); declared here, imported on first use. The numba.cuda
kernels are the `numba_cuda` backend (kernellab/numba_cuda).

The gated delta rule takes the serving keywords but chunk_states_every (kernellab/serving.py): a pool of states read
and written in place by its token loop, the state after every token, fused gating."""
from dataclasses import replace

from kernellab.registry import family_backends
from kernellab.serving import KEYWORDS

SERVING = KEYWORDS - {"chunk_states_every"}  # (the chunked kernel keeps no states on its way)
BACKENDS = [replace(b, serving=SERVING) if b.op == "gated_delta_rule" else b
            for b in family_backends("kernellab.numba", "numba", ("cpu",), requires=("numba",), row_major=True,
                                     ops=("gated_delta_rule", "moe_permute", "moe_unpermute", "moe"))]
