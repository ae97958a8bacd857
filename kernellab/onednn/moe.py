"""The MoE layer on oneDNN, the GEMM library inside torch's CPU build (CPU, float32), its expert weights reordered
once into oneDNN's blocked layout.

Why oneDNN: torch's CPU build carries two GEMMs. MKL takes a slower code path on AMD CPUs: on the Zen 5 host of
issue 26 its fp32 GEMM ran at 90-97 GFLOP/s, oneDNN's at 210-216 (it dispatches on the ISA it finds: AVX-512
there); the packed MKL GEMM of kernellab/mkl/moe.py is capped by MKL's rate. Each expert's [2I, D] and [D, I]
weights are reordered by torch.ops.mkldnn._reorder_linear_weight on first use and cached per weight tensor with
kernellab.mkl.packed's staleness guard (the version counter, and each expert's content fingerprint before each use
unless KERNELLAB_TRUST_INPUTS=1); the reordered copies add the weights' size to memory.

Per active expert with more than STREAM_ROWS rows: one GEMM of its rows against the fused gate-up weight ([n, D] x
[D, 2I]), silu(gate) * up scaled by the slot weights (the [n, I] activation, a quarter of the [n, D] output's
multiplies at D = 4 I), one GEMM against the down weight, the rows added into y expert after expert
(deterministic). The experts with up to STREAM_ROWS rows (decode: a token hits 8 of 256 experts; at 64 tokens
most experts get 1 to 4) run first, in one numba-compiled loop (gather, products, kernellab.mkl.moe's gate, weighted
add; no per-expert dispatch or temporaries) whose products read the weights as they are stored, once, streaming
four weight rows at a time (four streams the prefetchers follow together) against every row: at 1 row about 1.7x
the read rate of MKL's matrix-vector kernel (F.linear) and oneDNN's blocked GEMM (tuned for many rows); on the
Qwen3.5-35B-A3B layer at 64 tokens, streaming experts of up to 4 rows rather than 1 took about a third off the
layer's time (indicative, a shared machine). Inputs other than float32 take the torch backend's code.
"""
import numba
import numpy as np
import torch
import torch.nn.functional as F

from kernellab.mkl.moe import _gate_row, _scratch
from kernellab.mkl.packed import PackedExperts, packed_experts
from kernellab.torch import moe as torch_moe

# Experts with up to this many rows take the compiled streamed loop on the stored weights (the module's note).
STREAM_ROWS = 4


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


@numba.njit(fastmath=True)
def _stream(x, w, out):
    """out [n, Nout] = x [n, K] @ w [Nout, K]^T (rows of w contiguous), w read from memory once: four of its rows
    at a time, each against every row of x (those four rows stay in L1 between the rows of x)."""
    Nout, K = w.shape
    whole = Nout - Nout % 4
    for j in range(0, whole, 4):
        for r in range(x.shape[0]):
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for k in range(K):
                v = x[r, k]
                a0 += w[j, k] * v
                a1 += w[j + 1, k] * v
                a2 += w[j + 2, k] * v
                a3 += w[j + 3, k] * v
            out[r, j], out[r, j + 1], out[r, j + 2], out[r, j + 3] = a0, a1, a2, a3
    for j in range(whole, Nout):
        for r in range(x.shape[0]):
            acc = np.float32(0.0)
            for k in range(K):
                acc += w[j, k] * x[r, k]
            out[r, j] = acc


@numba.njit
def _streamed(x, y, tokens, slot_weights, experts, starts, counts, w_gate_up, w_down):
    """y [N, D] += the weighted MLP of each expert experts[i] on its counts[i] rows (slots starts[i] onwards of
    tokens int64 [M], slot_weights float32 [M]), both products streamed from the stored w_gate_up [E, 2I, D] and
    w_down [E, D, I]; x [N, D]. One compiled loop: no per-expert dispatch or temporaries (decode: 8 experts per
    token, each a few microseconds of weights)."""
    D, inter = x.shape[1], w_down.shape[2]
    rows = np.max(counts)
    gathered, projected, activated, expert_out, powers, series = _scratch(rows, D, inter)
    for i in range(experts.shape[0]):
        start, n = starts[i], counts[i]
        for r in range(n):
            gathered[r] = x[tokens[start + r]]
        _stream(gathered[:n], w_gate_up[experts[i]], projected[:n])
        for r in range(n):
            _gate_row(projected[r], activated[r], inter, slot_weights[start + r], powers, series)
        _stream(activated[:n], w_down[experts[i]], expert_out[:n])
        for r in range(n):
            row = y[tokens[start + r]]
            for d in range(D):
                row[d] += expert_out[r, d]


def _linear(x, packs, e):
    """x [n, K] @ w[e]^T -> [n, Nout] float32 by oneDNN's GEMM on w[e]'s reordered copy (packs: w's)."""
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
    x = x.detach().contiguous()
    y = torch.zeros(N, x.shape[1], dtype=torch.float32)
    tokens = source // top_k
    slot_weights = weights.reshape(-1).to(torch.float32).index_select(0, source)
    counts = np.diff(bounds)
    streamed = counts <= STREAM_ROWS
    if streamed.any():
        _streamed(x.numpy(), y.numpy(), tokens.numpy(), slot_weights.numpy(), np.asarray(experts)[streamed],
                  np.asarray(bounds[:-1])[streamed], counts[streamed], w_gate_up.detach().numpy(),
                  w_down.detach().numpy())
    if streamed.all():
        return y
    gathered = x.index_select(0, tokens)
    slot_weights = slot_weights[:, None]
    for e, start, end in zip(experts, bounds, bounds[1:]):
        if end - start <= STREAM_ROWS:
            continue
        projected = _linear(gathered[start:end], gate_up, e)
        activated = F.silu(projected[:, :I]).mul_(projected[:, I:]).mul_(slot_weights[start:end])
        y.index_add_(0, tokens[start:end], _linear(activated, down, e))
    return y
