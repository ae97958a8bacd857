"""MoE token permutation in Triton: `moe_permute` groups the rows of x by expert, `moe_unpermute` sums them back.

    moe_permute:   count / scan / scatter of kernellab.triton.moe_align (unpadded): source [M], the slot
                   n * top_k + j of each row in expert order (stable), then x_sorted[r] = x[source[r] // top_k]
    moe_unpermute: row_of_slot[source[r]] = r (invert), then y[n] = sum_j weights[n, j] * y_sorted[row of
                   (n, j)] in float32, j ascending: a deterministic combine, no atomics

The combine kernel also sums the fused layer's weighted slot outputs (rows in slot order: kernellab.triton.moe).
Row indices and program ids are cast to int64 before they multiply a stride (tensors past 2^31 elements).
"""
import torch
import triton
import triton.language as tl

from kernellab.triton import aot_spec
from kernellab.triton._autotune import INTERPRET, given
from kernellab.triton.moe_align import expert_offsets, scatter
from kernellab.types import Permutation


@triton.jit
def _gather_rows_kernel(x_ptr, source_ptr, out_ptr, num_rows, D, top_k,
                        stride_xn, stride_xd, stride_om, stride_od, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[r] = x[source[r] // top_k] (zeros where source[r] < 0). out [num_rows, D]."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < num_rows
    col_ok = cols < D
    slot = tl.load(source_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    token = slot // top_k
    values = tl.load(x_ptr + token[:, None] * stride_xn + cols[None, :] * stride_xd,
                     mask=(slot >= 0)[:, None] & col_ok[None, :], other=0.0)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_od, values,
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _invert_kernel(source_ptr, row_of_slot_ptr, num_rows, BLOCK: tl.constexpr):
    """row_of_slot[source[r]] = r for every row r with source[r] >= 0."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    slot = tl.load(source_ptr + rows, mask=rows < num_rows, other=-1).to(tl.int64)
    tl.store(row_of_slot_ptr + slot, rows, mask=slot >= 0)


@triton.heuristics({"WEIGHTED": given("weights_ptr")})
@triton.jit
def _combine_kernel(y_ptr, slot_map_ptr, weights_ptr, out_ptr, N, D, top_k,
                    stride_ym, stride_yd, stride_on, stride_od,
                    ROWS_ARE_SLOTS: tl.constexpr, WEIGHTED: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[n] = sum over j = 0..top_k-1 of (weights[n, j] *) y[row of slot n * top_k + j], in float32, in that
    order (deterministic). Slot s is present when slot_map[s] >= 0; its row is s itself (ROWS_ARE_SLOTS: y is
    in slot order and slot_map holds the expert ids) or slot_map[s]. out [N, D]. WEIGHTED: weights given."""
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    token_ok = tokens < N
    col_ok = cols < D
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for j in range(top_k):
        slots = tokens * top_k + j
        mapped = tl.load(slot_map_ptr + slots, mask=token_ok, other=-1).to(tl.int64)
        present = mapped >= 0
        if ROWS_ARE_SLOTS:
            rows = slots
        else:
            rows = mapped
        y = tl.load(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yd,
                    mask=present[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        if WEIGHTED:
            y *= tl.load(weights_ptr + slots, mask=present, other=0.0).to(tl.float32)[:, None]
        acc += y
    tl.store(out_ptr + tokens[:, None] * stride_on + cols[None, :] * stride_od, acc.to(out_ptr.dtype.element_ty),
             mask=token_ok[:, None] & col_ok[None, :])


def combine(y, slot_map, weights, num_tokens, top_k, rows_are_slots):
    """Launches the combine kernel: [num_tokens, D] in y's dtype. slot_map: flat [num_tokens * top_k]; weights:
    None (unweighted) or flat [num_tokens * top_k]."""
    D = y.shape[1]
    out = torch.empty(num_tokens, D, dtype=y.dtype, device=y.device)
    if num_tokens == 0 or D == 0:
        return out
    block_d = min(triton.next_power_of_2(D), 256 if INTERPRET else 1024)
    block_t = 16 if INTERPRET else 1
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(D, block_d))
    _combine_kernel[grid](y, slot_map, weights, out, num_tokens, D, top_k, y.stride(0), y.stride(1),
                          out.stride(0), out.stride(1), ROWS_ARE_SLOTS=rows_are_slots, BLOCK_T=block_t,
                          BLOCK_D=block_d, num_warps=4)
    return out


def _sorted_source(ids_flat, num_experts, max_rows):
    """(offsets int32 [E + 1], source int64 [M or max_rows]): the slots of ids_flat with an expert in expert order
    (stable); without max_rows one host synchronisation reads M, with it the rows past M hold -1."""
    offsets, chunk_prefix = expert_offsets(ids_flat, num_experts)
    if max_rows is None:
        source = torch.empty(int(offsets[-1]), dtype=torch.int64, device=ids_flat.device)
    else:
        source = torch.full((int(max_rows),), -1, dtype=torch.int64, device=ids_flat.device)
    if source.numel():
        scatter(ids_flat, offsets, chunk_prefix, source, 0)
    return offsets, source


def _row_of_slot(source, num_slots):
    """int32 [num_slots]: the row of each slot in source's order (source[row] = slot), -1 for slots not in it."""
    row_of_slot = torch.full((num_slots,), -1, dtype=torch.int32, device=source.device)
    num_rows = source.shape[0]
    if num_rows:
        block = 256
        _invert_kernel[(triton.cdiv(num_rows, block),)](source, row_of_slot, num_rows, BLOCK=block)
    return row_of_slot


def moe_permute(x, ids, num_experts, max_rows=None):
    """Group the rows of x [N, D] by expert for ids [N, top_k] (int32/int64, -1 = no expert).

    Without max_rows: one host synchronisation (to read M, the number of ids >= 0); returns
    Permutation(x [M, D], offsets int32 [E + 1], source int64 [M], N, top_k), exactly API.md's order.
    With max_rows (an upper bound on M, e.g. N * top_k): no host synchronisation; x is [max_rows, D] and source
    [max_rows]; rows offsets[E]:max_rows (M is offsets[E], on device) have source -1 and x zero, so
    moe_unpermute ignores them. Rows past max_rows, if the bound is too small, are dropped."""
    N, top_k = ids.shape
    offsets, source = _sorted_source(ids.reshape(-1), num_experts, max_rows)
    rows = source.shape[0]
    out = torch.empty(rows, x.shape[1], dtype=x.dtype, device=x.device)
    D = x.shape[1]
    if rows and D:
        block_d = min(triton.next_power_of_2(D), 256 if INTERPRET else 512)
        block_r = 16 if INTERPRET else 4
        _gather_rows_kernel[(triton.cdiv(rows, block_r), triton.cdiv(D, block_d))](
            x, source, out, rows, D, top_k, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
            BLOCK_R=block_r, BLOCK_D=block_d)
    return Permutation(out, offsets, source, N, top_k)


def moe_unpermute(y_sorted, p, weights):
    """y[n] = sum over present slots j of weights[n, j] * y_sorted[row of (n, j)], float32 sums in slot order,
    no atomics. y_sorted [M, D'] (M may be a moe_permute max_rows bound: rows with source -1 are ignored);
    weights [N, top_k]. Returns [N, D'] in y_sorted's dtype; tokens with no expert get 0."""
    row_of_slot = _row_of_slot(p.source, p.num_tokens * p.top_k)
    return combine(y_sorted, row_of_slot, weights.contiguous(), p.num_tokens, p.top_k, rows_are_slots=False)


# ------------------------------------------------------------------------------------------------ backward

def moe_permute_backward(grads, x, ids, num_experts, max_rows=None):
    """The gradient of moe_permute (kernellab.autograd's contract): grads {"x": [M, D] (or [max_rows, D]) or None, the
    gradient of p.x}. dx[n] = the sum of the rows of token n's slots, in slot order (the combine kernel, unweighted,
    through the slots' rows: deterministic). Returns {"x": [N, D]} in x's dtype."""
    d_rows = grads["x"]
    N, top_k = ids.shape
    if d_rows is None or N == 0:
        return dict(x=torch.zeros_like(x))
    _, source = _sorted_source(ids.reshape(-1), num_experts, max_rows)
    return dict(x=combine(d_rows, _row_of_slot(source, N * top_k), None, N, top_k, rows_are_slots=False))


@triton.jit
def _unpermute_backward_kernel(dy_ptr, y_ptr, source_ptr, weights_ptr, dy_sorted_ptr, d_weights_ptr, num_rows, D,
                               top_k, stride_dn, stride_dd, stride_ym, stride_yd, stride_om, stride_od,
                               BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """For each row r with slot s = source[r] >= 0 (token n = s // top_k): dy_sorted[r] = weights[s] dy[n] and
    d_weights[s] = dy[n] . y[r] (float32); rows with source -1 get dy_sorted 0. dy [N, D]; y, dy_sorted
    [num_rows, D]; weights, d_weights float32 [N * top_k]. Grid (cdiv(num_rows, BLOCK_R),)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    slot = tl.load(source_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    present = slot >= 0
    token = slot // top_k
    weight = tl.load(weights_ptr + slot, mask=present, other=0.0)[:, None]
    d_weight = tl.zeros([BLOCK_R], dtype=tl.float32)
    for first in range(0, D, BLOCK_D):
        cols = first + tl.arange(0, BLOCK_D)
        mask = present[:, None] & (cols < D)[None, :]
        dy = tl.load(dy_ptr + token[:, None] * stride_dn + cols[None, :] * stride_dd, mask=mask, other=0.0)
        y = tl.load(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yd, mask=mask, other=0.0)
        d_weight += tl.sum(dy.to(tl.float32) * y.to(tl.float32), axis=1)
        tl.store(dy_sorted_ptr + rows[:, None] * stride_om + cols[None, :] * stride_od,
                 (dy.to(tl.float32) * weight).to(dy_sorted_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (cols < D)[None, :])
    tl.store(d_weights_ptr + slot, d_weight, mask=present)


UNPERMUTE_BLOCK_R, UNPERMUTE_BLOCK_D = (16, 64) if INTERPRET else (4, 512)


def moe_unpermute_backward(grads, y_sorted, p, weights):
    """The gradients of moe_unpermute (kernellab.autograd's contract): grads {"y": [N, D'] or None}. For the row r of
    slot (n, j): dy_sorted[r] = weights[n, j] dy[n], dweights[n, j] = dy[n] . y_sorted[r]; slots without an expert
    (and rows with source -1) get 0. Returns {"y_sorted": [M, D'] in y_sorted's dtype, "weights": float32
    [N, top_k]} (_unpermute_backward_kernel: each row and slot written once)."""
    dy = grads["y"]
    N, top_k = p.num_tokens, p.top_k
    d_weights = torch.zeros(N * top_k, dtype=torch.float32, device=y_sorted.device)
    num_rows, D = y_sorted.shape
    if dy is None or num_rows == 0:
        return dict(y_sorted=torch.zeros_like(y_sorted), weights=d_weights.view(N, top_k))
    dy_sorted = torch.empty_like(y_sorted)
    _unpermute_backward_kernel[(triton.cdiv(num_rows, UNPERMUTE_BLOCK_R),)](
        dy, y_sorted, p.source, weights.to(torch.float32).reshape(-1).contiguous(), dy_sorted, d_weights, num_rows,
        D, top_k, dy.stride(0), dy.stride(1), y_sorted.stride(0), y_sorted.stride(1), dy_sorted.stride(0),
        dy_sorted.stride(1), BLOCK_R=UNPERMUTE_BLOCK_R, BLOCK_D=UNPERMUTE_BLOCK_D)
    return dict(y_sorted=dy_sorted, weights=d_weights.view(N, top_k))


def combine_spec(name, dt, rows_are_slots, weighted=None):
    """The combine kernel's AotSpec on rows of dt, 1024 columns or more, as its launches specialise it: weighted
    with rows from slot_map (moe_unpermute), unweighted with rows in slot order (the fused layer), or unweighted with
    rows from slot_map (weighted=False: moe_permute's backward)."""
    return aot_spec(name, _combine_kernel,
                    dict(stride_yd=1, stride_od=1, ROWS_ARE_SLOTS=rows_are_slots,
                         WEIGHTED=not rows_are_slots if weighted is None else weighted, BLOCK_T=1, BLOCK_D=1024),
                    pointers=dict(y_ptr=dt, slot_map_ptr="i32", weights_ptr="fp32", out_ptr=dt))


def _aot_specs(D=2048, dt="bf16"):
    """The permutation's kernels at the Qwen3.5-35B-A3B hidden size (2048) in bf16. Unit strides are constexpr
    1, as Triton specialises them at launch."""
    return [
        aot_spec("moe_permute.invert", _invert_kernel, dict(BLOCK=256),
                 pointers=dict(source_ptr="i64", row_of_slot_ptr="i32")),
        aot_spec(f"moe_permute.gather_rows[D={D},{dt}]", _gather_rows_kernel,
                 dict(stride_xd=1, stride_od=1, BLOCK_R=4, BLOCK_D=512),
                 pointers=dict(x_ptr=dt, source_ptr="i64", out_ptr=dt)),
        combine_spec(f"moe_permute.combine[unpermute,D={D},{dt}]", dt, rows_are_slots=False),
        combine_spec(f"moe_permute.combine[permute_backward,D={D},{dt}]", dt, rows_are_slots=False, weighted=False),
        aot_spec(f"moe_permute.unpermute_backward[D={D},{dt}]", _unpermute_backward_kernel,
                 dict(stride_dd=1, stride_yd=1, stride_od=1, BLOCK_R=UNPERMUTE_BLOCK_R, BLOCK_D=UNPERMUTE_BLOCK_D),
                 pointers=dict(dy_ptr=dt, y_ptr=dt, source_ptr="i64", weights_ptr="fp32", dy_sorted_ptr=dt,
                               d_weights_ptr="fp32"),
                 divisible_by_16=("D", "stride_dn", "stride_ym", "stride_om")),
    ]


AOT_SPECS = _aot_specs()
