"""CPU backends on MKL (the MKL inside torch's x86 CPU build): expert GEMMs on weights packed once per weight
tensor, and the chunked linear attentions as one numba-compiled loop of MKL calls (kernels/mkl/chunked.py).
The MoE ops are not an "auto" choice: their packed copies add to the weights' memory.

Backward: each forward computes the torch backend's function (the same chunked WY algorithm, the same expert
products), so each takes the torch backend's backward, which recomputes what it needs from the inputs; an MKL
backward of its own (one compiled loop, as the forward) is later work."""
from kernels.registry import family_backends

_PROBE = "kernels.mkl.packed:unavailable_reason"
_TORCH_BACKWARD = {op: f"kernels.torch.{module}:{op}_backward" for op, module in (
    ("grouped_gemm", "moe"), ("moe", "moe"), ("linear_attention", "linear_attention"),
    ("gated_delta_rule", "gated_delta_rule"))}
BACKENDS = (family_backends("kernels.mkl", "mkl", ("cpu",), ops=("grouped_gemm", "moe"), probe=_PROBE,
                            backward={op: _TORCH_BACKWARD[op] for op in ("grouped_gemm", "moe")})
            + family_backends("kernels.mkl", "mkl", ("cpu",), ops=("linear_attention", "gated_delta_rule"),
                              requires=("numba",), probe=_PROBE,
                              backward={op: _TORCH_BACKWARD[op] for op in ("linear_attention", "gated_delta_rule")}))
