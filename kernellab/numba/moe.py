"""MoE permutation, unpermutation and the expert layer as numba CPU kernels.

Permutation is a counting sort (one sequential pass over the N * top_k slots, then rows gathered in parallel; rows
are moved as raw bits, so every dtype is copied exactly). The expert layer runs permute -> gate/up rows ->
silu(gate) * up -> down rows -> weighted unpermute; at decode (N = 1) it streams each active expert's weights once.

The matrix-vector products take 8 weight rows at a time against one input row: 8 independent float32 sums give the
CPU enough work per loaded x element to stream weights near memory speed without reassociating any sum
(fastmath stays off, so a single dot product would not vectorise).
"""
import numba
import numpy as np
import torch

from kernellab.numba._edge import as_array, as_bits, compute_dtype, from_bits
from kernellab.types import Permutation

ROWS = 8  # weight rows per matrix-vector job


@numba.njit(fastmath=False, cache=True)
def _permutation_index(flat_ids, num_experts):
    """flat_ids [N * top_k] in [-1, E) -> offsets int32 [E + 1], source int64 [M] (stable: ascending slot)."""
    counts = np.zeros(num_experts + 1, dtype=np.int64)
    for slot in range(flat_ids.shape[0]):
        if flat_ids[slot] >= 0:
            counts[flat_ids[slot] + 1] += 1
    offsets = np.cumsum(counts)
    cursor = offsets[:-1].copy()
    source = np.empty(offsets[-1], dtype=np.int64)
    for slot in range(flat_ids.shape[0]):
        e = flat_ids[slot]
        if e >= 0:
            source[cursor[e]] = slot
            cursor[e] += 1
    return offsets.astype(np.int32), source


@numba.njit(parallel=True, fastmath=False, cache=True)
def _gather_rows(x, source, top_k, out):
    """out[r] = x[source[r] // top_k]; x [N, D], out [M, D] of any element type."""
    for r in numba.prange(source.shape[0]):
        out[r, :] = x[source[r] // top_k, :]


@numba.njit(parallel=True, fastmath=False, cache=True)
def _unpermute(y_sorted, source, weights, out):
    """out[n] = sum_j weights[n, j] y_sorted[row of slot n * top_k + j], j ascending; 0 for rows with no slot.
    y_sorted [M, D]; source [M]; weights [N, top_k]; out [N, D]."""
    N, top_k = weights.shape
    row_of_slot = np.full(N * top_k, -1, dtype=np.int64)
    for r in range(source.shape[0]):
        row_of_slot[source[r]] = r
    for n in numba.prange(N):
        out[n, :] = 0
        for j in range(top_k):
            r = row_of_slot[n * top_k + j]
            if r >= 0:
                w = weights[n, j]
                for d in range(out.shape[1]):
                    out[n, d] += w * y_sorted[r, d]


@numba.njit(parallel=True, fastmath=False, cache=True)
def _expert_rows(x, x_row, w, experts, slot_of_expert, offsets, y):
    """y[m, r] = w[slot_of_expert[e], r] . x[x_row[m]] for every m in offsets[e]:offsets[e+1], e in experts.
    x [*, Din]; x_row [M]; w [E', R, Din]; y [M, R]. One job = one expert x ROWS weight rows, against all the
    expert's rows of x (the weight rows stay in cache while the tokens stream by)."""
    R = w.shape[1]
    blocks = (R + ROWS - 1) // ROWS
    for job in numba.prange(experts.shape[0] * blocks):
        e = experts[job // blocks]
        W = w[slot_of_expert[e]]
        r = (job % blocks) * ROWS
        for m in range(offsets[e], offsets[e + 1]):
            xm = x[x_row[m]]
            if r + ROWS <= R:
                s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = y.dtype.type(0)
                for i in range(xm.shape[0]):
                    xi = xm[i]
                    s0 += W[r, i] * xi
                    s1 += W[r + 1, i] * xi
                    s2 += W[r + 2, i] * xi
                    s3 += W[r + 3, i] * xi
                    s4 += W[r + 4, i] * xi
                    s5 += W[r + 5, i] * xi
                    s6 += W[r + 6, i] * xi
                    s7 += W[r + 7, i] * xi
                y[m, r], y[m, r + 1], y[m, r + 2], y[m, r + 3] = s0, s1, s2, s3
                y[m, r + 4], y[m, r + 5], y[m, r + 6], y[m, r + 7] = s4, s5, s6, s7
            else:
                for rr in range(r, R):
                    s = y.dtype.type(0)
                    for i in range(xm.shape[0]):
                        s += W[rr, i] * xm[i]
                    y[m, rr] = s


@numba.njit(parallel=True, fastmath=False, cache=True)
def _silu_and_mul(gate_up, act):
    """act[m, i] = silu(gate_up[m, i]) * gate_up[m, I + i]; gate_up [M, 2I], act [M, I]."""
    I = act.shape[1]
    for m in numba.prange(act.shape[0]):
        for i in range(I):
            a = gate_up[m, i]
            act[m, i] = a / (1 + np.exp(-a)) * gate_up[m, I + i]


def _index(ids, num_experts):
    """(offsets int32 [E + 1], source int64 [M]) as NumPy arrays for ids [N, top_k] (int32 or int64)."""
    return _permutation_index(ids.contiguous().view(-1).cpu().numpy(), num_experts)


def moe_permute(x, ids, num_experts):
    """x [N, D]; ids [N, top_k] in [-1, E). Returns a Permutation (x [M, D] in x's dtype, offsets int32 [E + 1],
    source int64 [M])."""
    offsets, source = _index(ids, num_experts)
    bits = as_bits(x)
    rows = np.empty((source.shape[0], x.shape[1]), dtype=bits.dtype)
    _gather_rows(bits, source, ids.shape[1], rows)
    return Permutation(from_bits(rows, x.dtype), torch.from_numpy(offsets), torch.from_numpy(source),
                       ids.shape[0], ids.shape[1])


def moe_unpermute(y_sorted, p, weights):
    """y_sorted [M, D']; p a Permutation of N tokens x top_k slots; weights [N, top_k]. Returns [N, D'] in
    y_sorted's dtype (summed in float32, float64 for float64 inputs)."""
    dtype = compute_dtype(y_sorted)
    out = np.empty((p.num_tokens, y_sorted.shape[1]), dtype=np.float64 if dtype == torch.float64 else np.float32)
    _unpermute(as_array(y_sorted, dtype), as_array(p.source, torch.int64), as_array(weights, dtype), out)
    return torch.from_numpy(out).to(y_sorted.dtype)


def moe(x, weights, ids, w_gate_up, w_down):
    """x [N, D]; weights, ids [N, top_k]; w_gate_up [E, 2I, D]; w_down [E, D, I]. Returns [N, D] in x's dtype.
    Float32 (float64) weights are read in place; half-precision ones are converted to float32 for the active
    experts only."""
    E, I = w_gate_up.shape[0], w_down.shape[2]
    dtype = compute_dtype(x)
    offsets, source = _index(ids, E)
    experts = np.flatnonzero(offsets[1:] > offsets[:-1]).astype(np.int64)
    if w_gate_up.dtype == dtype:
        slot_of_expert = np.arange(E, dtype=np.int64)
        w1, w2 = as_array(w_gate_up), as_array(w_down)
    else:
        slot_of_expert = np.full(E, -1, dtype=np.int64)
        slot_of_expert[experts] = np.arange(experts.shape[0])
        active = torch.from_numpy(experts)
        w1, w2 = as_array(w_gate_up[active], dtype), as_array(w_down[active], dtype)
    M = source.shape[0]
    gate_up = np.empty((M, 2 * I), dtype=w1.dtype)
    _expert_rows(as_array(x, dtype), source // ids.shape[1], w1, experts, slot_of_expert, offsets, gate_up)
    act = np.empty((M, I), dtype=w1.dtype)
    _silu_and_mul(gate_up, act)
    y_sorted = np.empty((M, x.shape[1]), dtype=w1.dtype)
    _expert_rows(act, np.arange(M, dtype=np.int64), w2, experts, slot_of_expert, offsets, y_sorted)
    out = np.empty(x.shape, dtype=w1.dtype)
    _unpermute(y_sorted, source, as_array(weights, dtype), out)
    return torch.from_numpy(out).to(x.dtype)
