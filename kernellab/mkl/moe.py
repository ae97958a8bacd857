"""grouped_gemm and the MoE layer on expert weights packed once for MKL's GEMM (CPU, float32).

Each expert GEMM runs by cblas_sgemm_compute on the expert's packed weight (kernellab.mkl.packed). The first call
on a weight tensor packs the experts it reaches (a copy of their weights: time and memory); later calls reuse
them while the tensor lives unmodified. The layer is one numba-compiled loop over the active experts (gather,
GEMM, gate, GEMM, weighted add) on buffers made once per call: through torch, each of those steps allocated
its output anew (page faults on every MB-sized buffer) and the loop paid per-op dispatch: 5-13% of the
Qwen3.5-35B layer at N = 4096, 13-23% at 1 to 1024 tokens (1 thread). Inputs other than float32 take the torch
backend's code.
"""
import math

import numba
import numpy as np
import torch

from kernellab.mkl.packed import _NO_TRANS, _PACKED, _ROW_MAJOR, _library, packable, packed_experts
from kernellab.torch import moe as torch_moe

_compute = _library().cblas_sgemm_compute if _library() is not None else None


def grouped_gemm(x, w, offsets):
    """x [M, K] grouped by expert; w [E, Nout, K]; offsets int32 [E + 1]. y[offsets[e]:offsets[e + 1]] =
    x[same rows] @ w[e]^T, each group written in place by one packed GEMM. Returns [M, Nout] in x's dtype."""
    if not packable(x, w):
        return torch_moe.grouped_gemm(x, w, offsets)
    experts = packed_experts(w)
    y = x.new_empty(x.shape[0], w.shape[1])
    bounds = offsets.tolist()
    for e, (start, end) in enumerate(zip(bounds, bounds[1:])):
        if end > start:
            experts.linear(x[start:end], e, out=y[start:end])
    return y


# exp(x) = 2^n e^r, n = round(x log2 e), r = x - n ln 2 taken in two parts (Cody and Waite: n ln2_hi is exact in
# float32), e^r for |r| <= ln(2) / 2 by its Taylor series to degree 7 (relative error 5e-9).
_LOG2E = np.float32(1 / math.log(2))
_LN2_HI, _LN2_LO = np.float32(0.693359375), np.float32(math.log(2) - 0.693359375)
_EXP_TAYLOR = tuple(np.float32(1 / math.factorial(i)) for i in range(8))
# Gates below this give silu(gate) under 1e-26: written as exactly 0, never as subnormal GEMM operands.
_GATE_FLOOR = np.float32(-64.0)


@numba.njit(fastmath=True, inline="always")
def _gate_row(projected, activated, inter, weight, powers, series):
    """activated[:I] = silu(projected[:I]) * projected[I:2I] * weight for one row, I = inter, float32 (0 where the
    gate is under _GATE_FLOOR). silu(a) = a / (1 + exp(-a)), exp as above in loops LLVM vectorises, 2^n made from
    its exponent bits (powers: int32 scratch, series: float32 scratch): libm's scalar exp, all numba has without
    Intel's SVML, would cost ~5x the gate's time."""
    for j in range(inter):
        x = min(max(-projected[j], np.float32(-87.0)), -_GATE_FLOOR)
        n = np.floor(x * _LOG2E + np.float32(0.5))
        r = (x - n * _LN2_HI) - n * _LN2_LO
        p = _EXP_TAYLOR[7]
        for c in range(6, -1, -1):
            p = p * r + _EXP_TAYLOR[c]
        series[j] = p
        powers[j] = (np.int32(n) + np.int32(127)) << np.int32(23)
    scale = powers.view(np.float32)
    for j in range(inter):
        gate = projected[j]
        value = gate / (np.float32(1.0) + series[j] * scale[j]) * projected[inter + j] * weight
        activated[j] = np.float32(0.0) if gate < _GATE_FLOOR else value


@numba.njit
def _scratch(rows, D, inter):
    """A layer loop's buffers for experts of up to `rows` rows, I = inter: the gathered rows [rows, D], gate-up
    products [rows, 2I], activation [rows, I], expert outputs [rows, D] (float32), and _gate_row's scratch
    (int32 [I], float32 [I])."""
    return (np.empty((rows, D), np.float32), np.empty((rows, 2 * inter), np.float32),
            np.empty((rows, inter), np.float32), np.empty((rows, D), np.float32), np.empty(inter, np.int32),
            np.empty(inter, np.float32))


@numba.njit
def _experts(x, y, tokens, slot_weights, bounds, experts, gate_up, down, inter):
    """y [N, D] += each expert's weighted MLP on its rows. x [N, D]; tokens int64 [M] (the rows of the slots,
    grouped by expert), slot_weights float32 [M]; expert experts[i] owns slots bounds[i] .. bounds[i + 1];
    gate_up, down: addresses of the experts' packed [2I, D] and [D, I] weights; inter = I. The buffers are made
    once per call, sized for the largest expert, and stay in cache from one expert to the next."""
    D = x.shape[1]
    rows = np.max(bounds[1:] - bounds[:-1])
    gathered, projected, activated, expert_out, powers, series = _scratch(rows, D, inter)
    for i in range(experts.shape[0]):
        start, n = bounds[i], bounds[i + 1] - bounds[i]
        for r in range(n):
            gathered[r] = x[tokens[start + r]]
        _compute(_ROW_MAJOR, _NO_TRANS, _PACKED, n, 2 * inter, D, gathered.ctypes.data, D, gate_up[experts[i]], D,
                 0.0, projected.ctypes.data, 2 * inter)
        for r in range(n):
            _gate_row(projected[r], activated[r], inter, slot_weights[start + r], powers, series)
        _compute(_ROW_MAJOR, _NO_TRANS, _PACKED, n, D, inter, activated.ctypes.data, inter, down[experts[i]], inter,
                 0.0, expert_out.ctypes.data, D)
        for r in range(n):
            row = y[tokens[start + r]]
            for d in range(D):
                row[d] += expert_out[r, d]


def moe(x, weights, ids, w_gate_up, w_down):
    """The Qwen3.5 experts, as kernellab.torch.moe.moe: x [N, D]; weights, ids [N, top_k]; w_gate_up [E, 2I, D];
    w_down [E, D, I]. Returns [N, D] in x's dtype. One compiled loop over the active experts: gather their rows,
    the packed gate-up GEMM, the gate, the packed down GEMM, the weighted add into the tokens' rows."""
    if not (packable(x, w_gate_up) and packable(x, w_down)):
        return torch_moe.moe(x, weights, ids, w_gate_up, w_down)
    N, top_k = ids.shape
    experts, bounds, source = torch_moe.group_slots(ids, w_gate_up.shape[0])
    gate_up, down = packed_experts(w_gate_up), packed_experts(w_down)
    y = torch.zeros(N, x.shape[1], dtype=torch.float32)
    if experts:
        _experts(x.detach().contiguous().numpy(), y.numpy(), (source // top_k).numpy(),
                 weights.reshape(-1).to(torch.float32)[source].numpy(), np.array(bounds, dtype=np.int64),
                 np.array(experts, dtype=np.int64), gate_up.addresses(experts), down.addresses(experts),
                 w_down.shape[2])
    return y
