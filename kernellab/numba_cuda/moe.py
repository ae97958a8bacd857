"""MoE permutation, unpermutation and a tiled grouped GEMM as numba.cuda kernels (a GPU, or CPU tensors under
NUMBA_ENABLE_CUDASIM=1).

Permutation is a stable counting sort in tiles of TILE slots: per-tile expert counts (atomics), one block that
scans them per expert into tile bases and expert offsets, then each slot's rank among the earlier slots of its
tile with the same expert gives its row. The grouped GEMM takes a host-built tile schedule (expert, first row) for
every TM-row tile of every group and runs all groups in one launch, TM x TN outputs per block from TM x TK and
TN x TK shared-memory tiles.
"""
import torch
from numba import cuda, float32, int64

from kernellab.numba_cuda import NumbaAotSpec
from kernellab.numba._edge import device_array, float32_contiguous
from kernellab.types import Permutation

TILE = 128  # slots per permutation tile
MAX_EXPERTS = 1024  # experts the scan block handles (one thread each)
TM = TN = TK = 16  # grouped GEMM tile
TK_PADDED = 17  # shared tile rows padded by one word against bank conflicts (a literal: numba sizes shared arrays)


@cuda.jit
def _tile_counts(ids, num_experts, counts):
    """counts[tile, e] = number of slots of the tile with expert e. ids [S] flat; counts [tiles, E] zeroed."""
    slot = cuda.grid(1)
    if slot < ids.shape[0] and ids[slot] >= 0:
        cuda.atomic.add(counts, (slot // TILE, ids[slot]), 1)


@cuda.jit
def _scan_counts(counts, tile_base, offsets):
    """tile_base[tile, e] = slots of expert e in earlier tiles; offsets [E + 1] = exclusive scan of the totals.
    One block, one thread per expert."""
    totals = cuda.shared.array(MAX_EXPERTS, int64)
    e = cuda.threadIdx.x
    num_experts = counts.shape[1]
    if e < num_experts:
        running = 0
        for tile in range(counts.shape[0]):
            tile_base[tile, e] = running
            running += counts[tile, e]
        totals[e] = running
    cuda.syncthreads()
    if e == 0:
        running = 0
        offsets[0] = 0
        for expert in range(num_experts):
            running += totals[expert]
            offsets[expert + 1] = running


@cuda.jit
def _place(ids, tile_base, offsets, source):
    """source[row] = slot, row = offsets[e] + tile_base[tile, e] + rank of the slot among its tile's earlier
    slots of expert e. Block = one tile of TILE slots."""
    experts = cuda.shared.array(TILE, int64)
    tx = cuda.threadIdx.x
    slot = cuda.blockIdx.x * TILE + tx
    e = ids[slot] if slot < ids.shape[0] else -1
    experts[tx] = e
    cuda.syncthreads()
    if e >= 0:
        rank = 0
        for other in range(tx):
            if experts[other] == e:
                rank += 1
        source[offsets[e] + tile_base[cuda.blockIdx.x, e] + rank] = slot


@cuda.jit
def _gather_rows(x, source, top_k, out):
    """out[r] = x[source[r] // top_k]. Block r copies one row, threads striding over D."""
    r = cuda.blockIdx.x
    n = source[r] // top_k
    for d in range(cuda.threadIdx.x, out.shape[1], cuda.blockDim.x):
        out[r, d] = x[n, d]


@cuda.jit
def _invert_source(source, row_of_slot):
    """row_of_slot[source[r]] = r (row_of_slot pre-filled with -1)."""
    r = cuda.grid(1)
    if r < source.shape[0]:
        row_of_slot[source[r]] = r


@cuda.jit
def _unpermute(y_sorted, row_of_slot, weights, out):
    """out[n, d] = sum_j weights[n, j] y_sorted[row_of_slot[n * top_k + j], d] (j ascending, float32).
    Block n, threads striding over D."""
    n = cuda.blockIdx.x
    top_k = weights.shape[1]
    for d in range(cuda.threadIdx.x, out.shape[1], cuda.blockDim.x):
        acc = float32(0.0)
        for j in range(top_k):
            r = row_of_slot[n * top_k + j]
            if r >= 0:
                acc += weights[n, j] * y_sorted[r, d]
        out[n, d] = acc


@cuda.jit
def _grouped_gemm(x, w, tile_expert, tile_row, offsets, y):
    """y[rows of e] = x[rows of e] @ w[e]^T for the tile (tile_expert[b], tile_row[b]) of block b.x and columns
    b.y * TN ...; x [M, K], w [E, N, K], y [M, N] float32. Block (TN, TM) threads, one output each."""
    xs = cuda.shared.array((TM, TK_PADDED), float32)
    ws = cuda.shared.array((TN, TK_PADDED), float32)
    e = tile_expert[cuda.blockIdx.x]
    row0 = tile_row[cuda.blockIdx.x]
    row_end = offsets[e + 1]
    col0 = cuda.blockIdx.y * TN
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    K = x.shape[1]
    Nout = w.shape[1]
    acc = float32(0.0)
    for k0 in range(0, K, TK):
        # thread (tx, ty) loads x[row0 + ty, k0 + tx] and w[e, col0 + ty, k0 + tx]
        xr = row0 + ty
        wc = col0 + ty
        kk = k0 + tx
        xs[ty, tx] = x[xr, kk] if xr < row_end and kk < K else 0.0
        ws[ty, tx] = w[e, wc, kk] if wc < Nout and kk < K else 0.0
        cuda.syncthreads()
        for i in range(TK):
            acc += xs[ty, i] * ws[tx, i]
        cuda.syncthreads()
    row = row0 + ty
    col = col0 + tx
    if row < row_end and col < Nout:
        y[row, col] = acc


def _cdiv(a, b):
    return (a + b - 1) // b


def moe_permute(x, ids, num_experts):
    """x [N, D]; ids [N, top_k] in [-1, E). Returns a Permutation (x [M, D] in x's dtype, rows moved exactly as
    stored (bfloat16 as 16-bit integers: numba has no bfloat16), offsets int32 [E + 1], source int64 [M])."""
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"the numba_cuda permutation takes num_experts <= {MAX_EXPERTS}, got {num_experts}")
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    tiles = _cdiv(flat.shape[0], TILE)
    counts = torch.zeros(tiles, num_experts, dtype=torch.int64, device=x.device)
    tile_base = torch.empty_like(counts)
    offsets = torch.empty(num_experts + 1, dtype=torch.int64, device=x.device)
    d_flat, d_counts, d_base, d_offsets = map(device_array, (flat, counts, tile_base, offsets))
    _tile_counts[tiles, TILE](d_flat, num_experts, d_counts)
    _scan_counts[1, num_experts](d_counts, d_base, d_offsets)
    M = int(offsets[-1])  # the output's size: one read back
    source = torch.empty(M, dtype=torch.int64, device=x.device)
    _place[tiles, TILE](d_flat, d_base, d_offsets, device_array(source))
    rows_in = x.contiguous() if x.dtype != torch.bfloat16 else x.view(torch.int16).contiguous()
    rows = torch.empty(M, x.shape[1], dtype=rows_in.dtype, device=x.device)
    if M:
        _gather_rows[M, 128](device_array(rows_in), device_array(source), ids.shape[1], device_array(rows))
    return Permutation(rows.view(x.dtype), offsets.to(torch.int32), source, ids.shape[0], ids.shape[1])


def moe_unpermute(y_sorted, p, weights):
    """y_sorted [M, D']; weights [N, top_k]. Returns [N, D'] in y_sorted's dtype, summed in float32."""
    row_of_slot = torch.full((p.num_tokens * p.top_k,), -1, dtype=torch.int64, device=y_sorted.device)
    M = p.source.shape[0]
    if M:
        _invert_source[_cdiv(M, 128), 128](device_array(p.source.to(torch.int64).contiguous()),
                                           device_array(row_of_slot))
    out = torch.empty(p.num_tokens, y_sorted.shape[1], dtype=torch.float32, device=y_sorted.device)
    _unpermute[p.num_tokens, 128](device_array(float32_contiguous(y_sorted)), device_array(row_of_slot),
                                  device_array(float32_contiguous(weights)), device_array(out))
    return out.to(y_sorted.dtype)


def grouped_gemm(x, w, offsets):
    """x [M, K] grouped by expert; w [E, N, K]; offsets int32 [E + 1]. Returns [M, N] in x's dtype (float32
    accumulation). The tile schedule is built on the host from offsets (one read back)."""
    M, Nout = x.shape[0], w.shape[1]
    bounds = offsets.tolist()
    tile_expert, tile_row = [], []
    for e in range(w.shape[0]):
        for row in range(bounds[e], bounds[e + 1], TM):
            tile_expert.append(e)
            tile_row.append(row)
    y = torch.empty(M, Nout, dtype=torch.float32, device=x.device)
    if tile_expert:
        schedule = [torch.tensor(a, dtype=torch.int64, device=x.device) for a in (tile_expert, tile_row)]
        args = [device_array(t) for t in (float32_contiguous(x), float32_contiguous(w), *schedule,
                                          offsets.to(torch.int64).contiguous(), y)]
        _grouped_gemm[(len(tile_expert), _cdiv(Nout, TN)), (TN, TM)](*args)
    return y.to(x.dtype)


_I1, _I2, _F2 = "int64[::1]", "int64[:, ::1]", "float32[:, ::1]"
AOT_SPECS = [NumbaAotSpec(f"{name}[numba_cuda]", f"{__name__}:{name}", signature, threads) for name, signature, threads in (
    ("_tile_counts", f"void({_I1}, int64, {_I2})", TILE),
    ("_scan_counts", f"void({_I2}, {_I2}, {_I1})", MAX_EXPERTS),
    ("_place", f"void({_I1}, {_I2}, {_I1}, {_I1})", TILE),
    ("_gather_rows", f"void({_F2}, {_I1}, int64, {_F2})", 128),
    ("_invert_source", f"void({_I1}, {_I1})", 128),
    ("_unpermute", f"void({_F2}, {_I1}, {_F2}, {_F2})", 128),
    ("_grouped_gemm", f"void({_F2}, float32[:, :, ::1], {_I1}, {_I1}, {_I1}, {_F2})", TM * TN),
)]
