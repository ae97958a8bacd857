"""The MoE layer on oneDNN, the GEMM library inside torch's CPU build (CPU, float32), its expert weights reordered
once into oneDNN's blocked layout.

Why oneDNN: torch's CPU build carries two GEMMs. MKL takes a slower code path on AMD CPUs: on the Zen 5 host of
issue 26 its fp32 GEMM ran at 90-97 GFLOP/s, oneDNN's at 210-216 (it dispatches on the ISA it finds: AVX-512
there); the packed MKL GEMM of kernellab/mkl/moe.py is capped by MKL's rate. Each expert's [2I, D] and [D, I]
weights are reordered by torch.ops.mkldnn._reorder_linear_weight on first use and cached per weight tensor with
kernellab.mkl.packed's staleness guard (the version counter, and each expert's content fingerprint before each use
unless KERNELLAB_TRUST_INPUTS=1); the reordered copies add the weights' size to memory.

Per active expert: one GEMM of its rows against the fused gate-up weight ([n, D] x [D, 2I]), silu(gate) * up
scaled by the slot weights (the [n, I] activation, a quarter of the [n, D] output's multiplies at D = 4 I), one
GEMM against the down weight, the rows added into y expert after expert (deterministic). Rows of one expert up to
STREAM_ROWS (decode: a token hits 8 of 256 experts, about 2 rows each at N = 64) take the weights as they are
stored through torch's F.linear (MKL's matrix-vector kernel, which streams the contiguous rows at read bandwidth):
oneDNN's blocked GEMM is tuned for many rows. Inputs other than float32 take the torch backend's code.
"""
import torch
import torch.nn.functional as F

from kernellab.mkl.packed import PackedExperts, packed_experts
from kernellab.torch import moe as torch_moe

# Expert row counts up to this take MKL's matrix-vector path on the stored weights (see the module's note).
STREAM_ROWS = 2


def unavailable_reason():
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return "needs torch built with oneDNN (torch.ops.mkldnn._reorder_linear_weight / _linear_pointwise), absent"
    return None


class ReorderedExperts(PackedExperts):
    """oneDNN-reordered copies of w[e] for w [E, Nout, K] float32 CPU (opaque tensors for _linear_pointwise), each
    made on first use and checked for staleness as PackedExperts' MKL packs."""

    @staticmethod
    def _pack(we):
        return torch.ops.mkldnn._reorder_linear_weight(we.contiguous(), None)


def usable(x, w):
    """float32 CPU tensors with something to multiply, w not an inference tensor (no version counter: an in-place
    write to it could not be seen)."""
    return (x.device.type == "cpu" and x.dtype == w.dtype == torch.float32 and w.numel() > 0
            and not w.is_inference() and unavailable_reason() is None)


def _linear(x, w, packs, e):
    """x [n, K] @ w[e]^T -> [n, Nout]: the stored weight's matrix-vector product for few rows, else oneDNN's GEMM on
    the reordered copy."""
    if x.shape[0] <= STREAM_ROWS:
        return F.linear(x, w[e])
    return torch.ops.mkldnn._linear_pointwise(x, packs.packed_weight(e), None, "none", [], "")


def moe(x, weights, ids, w_gate_up, w_down):
    """The Qwen3.5 experts, as kernellab.torch.moe.moe: x [N, D]; weights, ids [N, top_k] (ids in [-1, E));
    w_gate_up [E, 2I, D]; w_down [E, D, I]. Returns [N, D] in x's dtype."""
    if not (usable(x, w_gate_up) and usable(x, w_down)):
        return torch_moe.moe(x, weights, ids, w_gate_up, w_down)
    N, top_k = ids.shape
    I = w_down.shape[2]
    experts, bounds, source = torch_moe.group_slots(ids, w_gate_up.shape[0])
    gate_up = packed_experts(w_gate_up, ReorderedExperts)
    down = packed_experts(w_down, ReorderedExperts)
    x = x.detach()
    y = torch.zeros(N, x.shape[1], dtype=torch.float32)
    tokens = source // top_k
    gathered = x.index_select(0, tokens)
    slot_weights = weights.reshape(-1).to(torch.float32).index_select(0, source)[:, None]
    for e, start, end in zip(experts, bounds, bounds[1:]):
        projected = _linear(gathered[start:end], w_gate_up, gate_up, e)
        activated = F.silu(projected[:, :I]).mul_(projected[:, I:]).mul_(slot_weights[start:end])
        y.index_add_(0, tokens[start:end], _linear(activated, w_down, down, e))
    return y
