"""MoE routing, permutation, grouped GEMM and the expert layer as CuPy array programs: sorts, bincounts and
fancy indexing for the permutation, padded batched matmuls (one strided-batched cuBLAS call over the active
experts) for the grouped GEMM, and a fused silu(gate) * up kernel. Float32 inside; half-precision inputs are
converted at the edge (CuPy has no bfloat16)."""

from kernellab.cupy._array import array_module, as_array, as_bits, as_tensor, silu_mul, softmax, torch_stream
from kernellab.types import Permutation


def route(router_logits, top_k, renormalize):
    """router_logits [N, E] -> (weights float32 [N, top_k], ids int32 [N, top_k]), largest first."""
    xp = array_module(router_logits)
    with torch_stream(router_logits.device):
        probs = softmax(xp, as_array(router_logits, xp))
        ids = xp.argsort(-probs, axis=-1, kind="stable")[:, :top_k]  # ties: the lower expert first, as the reference
        weights = xp.take_along_axis(probs, ids, axis=-1)
        if renormalize:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        return as_tensor(weights), as_tensor(ids.astype(xp.int32))


def _permutation(xp, ids, num_experts):
    """ids [N, top_k] -> (source int64 [M] sorted by (expert, slot), offsets int32 [E + 1])."""
    flat = ids.reshape(-1).astype(xp.int64)
    slots = flat.shape[0]
    valid = flat >= 0
    key = xp.where(valid, flat, num_experts) * slots + xp.arange(slots)  # unique keys: the sort is stable
    source = xp.argsort(key)[: int(valid.sum())]
    counts = xp.bincount(flat[valid], minlength=num_experts)
    offsets = xp.concatenate([xp.zeros(1, dtype=xp.int64), xp.cumsum(counts)]).astype(xp.int32)
    return source, offsets


def _unpermute(xp, y_sorted, source, weights):
    """y[n] = sum_j weights[n, j] y_sorted[row of (n, j)] as one batched matmul [N, 1, k] @ [N, k, D]."""
    N, top_k = weights.shape
    M, D = y_sorted.shape
    row_of_slot = xp.full(N * top_k, M, dtype=xp.int64)  # row M: an appended zero row for empty slots
    row_of_slot[source] = xp.arange(M)
    rows = xp.concatenate([y_sorted, xp.zeros((1, D), dtype=y_sorted.dtype)])[row_of_slot]
    return xp.matmul(weights[:, None, :], rows.reshape(N, top_k, D))[:, 0]


def _grouped_gemm(xp, x, w, offsets):
    """y[rows of e] = x[rows of e] @ w[e]^T: the active groups zero-padded to the largest, one batched matmul."""
    bounds = offsets.tolist()
    counts = [b - a for a, b in zip(bounds, bounds[1:])]
    active = [e for e, c in enumerate(counts) if c]
    M, K = x.shape
    y = xp.empty((M, w.shape[1]), dtype=x.dtype)
    if not active:
        return y
    expert_of_row = xp.repeat(xp.arange(len(active)), [counts[e] for e in active])
    starts = xp.asarray([bounds[e] for e in active])
    position = xp.arange(M) - starts[expert_of_row]
    padded = xp.zeros((len(active), max(counts), K), dtype=x.dtype)
    padded[expert_of_row, position] = x
    weights = w if len(active) == w.shape[0] else w[xp.asarray(active)]
    y[...] = xp.matmul(padded, weights.swapaxes(-1, -2))[expert_of_row, position]
    return y


def moe_permute(x, ids, num_experts):
    """x [N, D]; ids [N, top_k] in [-1, E). Returns a Permutation (rows moved exactly, in x's dtype)."""
    xp = array_module(x)
    with torch_stream(x.device):
        source, offsets = _permutation(xp, as_array(ids, xp, dtype=None), num_experts)
        rows = as_bits(x, xp)[source // ids.shape[1]]
        return Permutation(as_tensor(rows).view(x.dtype), as_tensor(offsets), as_tensor(source), *ids.shape)


def moe_unpermute(y_sorted, p, weights):
    """y_sorted [M, D']; weights [N, top_k]. Returns [N, D'] in y_sorted's dtype."""
    xp = array_module(y_sorted)
    with torch_stream(y_sorted.device):
        y = _unpermute(xp, as_array(y_sorted, xp), as_array(p.source, xp, dtype=None), as_array(weights, xp))
        return as_tensor(y).to(y_sorted.dtype)


def grouped_gemm(x, w, offsets):
    """x [M, K] grouped by expert; w [E, N, K]; offsets int32 [E + 1]. Returns [M, N] in x's dtype."""
    xp = array_module(x)
    with torch_stream(x.device):
        return as_tensor(_grouped_gemm(xp, as_array(x, xp), as_array(w, xp), offsets)).to(x.dtype)


def moe(x, weights, ids, w_gate_up, w_down):
    """x [N, D]; weights, ids [N, top_k]; w_gate_up [E, 2I, D]; w_down [E, D, I]. Returns [N, D] in x's dtype."""
    xp = array_module(x)
    I = w_down.shape[2]
    with torch_stream(x.device):
        source, offsets = _permutation(xp, as_array(ids, xp, dtype=None), w_gate_up.shape[0])
        rows = as_array(x, xp)[source // ids.shape[1]]
        gate_up = _grouped_gemm(xp, rows, as_array(w_gate_up, xp), offsets)
        act = silu_mul(xp, gate_up[:, :I], gate_up[:, I:])
        y_sorted = _grouped_gemm(xp, act, as_array(w_down, xp), offsets)
        return as_tensor(_unpermute(xp, y_sorted, source, as_array(weights, xp))).to(x.dtype)
