"""CPU backends on MKL (the MKL inside torch's x86 CPU build): expert GEMMs on weights packed once per weight
tensor, and the chunked linear attentions as one numba-compiled loop of MKL calls (kernellab/mkl/chunked.py).
The MoE ops are not an "auto" choice: their packed copies add to the weights' memory.

Backward: the linear attentions' is kernellab.mkl.chunked's, one compiled loop of MKL calls as their forward
(`<op>_backward` beside each forward); the MoE ops compute the torch backend's function (the same expert
products), so they take the torch backend's backward, which recomputes what it needs from the inputs.
The linear attentions take every serving keyword (kernellab/serving.py): their chunk states from the compiled loop
run segment by segment, the rest as the torch backend's code."""
from kernellab.registry import BESIDE, batch_variant, family_backends
from kernellab.serving import KEYWORDS

_PROBE = "kernellab.mkl.packed:unavailable_reason"
_TORCH_BACKWARD = {op: f"kernellab.torch.moe:{op}_backward" for op in ("grouped_gemm", "moe")}
# kda's forward and backward are mkl's own (kernellab/mkl/kda.py: the gated delta rule's loops, decays per channel)
_KDA = family_backends("kernellab.mkl", "mkl", ("cpu",), ops=("kda",), requires=("numba",), probe=_PROBE,
                       row_major=True, backward={"kda": "kernellab.mkl.kda:kda_backward"}, serving=KEYWORDS)
# Batch invariance measured on CPU by tests/ops/test_invariance.py (a part of a batch alone against its part of the
# batch's outputs).
BACKENDS = batch_variant(
    family_backends("kernellab.mkl", "mkl", ("cpu",), ops=("grouped_gemm", "moe"), probe=_PROBE,
                    backward=_TORCH_BACKWARD, row_major=True)
    + family_backends("kernellab.mkl", "mkl", ("cpu",), ops=("linear_attention", "gated_delta_rule"),
                      requires=("numba",), probe=_PROBE, row_major=True, serving=KEYWORDS,
                      backward={op: BESIDE for op in ("linear_attention", "gated_delta_rule")}) + _KDA, {
        "gated_delta_rule": "mode 'recurrent' runs the torch backend's code: a one-token sequence alone (T = 1, no "
                            "cu_seqlens) takes its decode_step, rounded otherwise than the token loop it takes "
                            "packed with other sequences",
        "moe": "CPU GEMM blocking depends on M: MKL's packed GEMM over an expert's rows (torch's GEMMs for "
               "half-precision inputs) rounds a token's sums otherwise with the other tokens routed to that "
               "expert",
    })
