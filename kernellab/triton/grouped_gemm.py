"""The persistent grouped GEMM of the MoE ops in Triton: y[rows of group e] = x[rows] @ w[e]^T for every group.

One kernel walks the (block, N-tile) pairs of the block-aligned layout (kernellab.triton.moe_align: block_expert
and row_map, num_blocks on device, no host synchronisation), so empty experts cost nothing and a 1-row expert
costs one BLOCK_M tile. Its variants serve the fused layer too (kernellab.triton.moe): A rows gathered through
row_map in the loads (A_MAPPED), outputs scattered through it (OUT_MAPPED), SwiGLU of the gate and up products
in the epilogue (GATED), the routing weight in the epilogue (SCALED).

BLOCK_M follows the mean rows per expert: 16 for decode-sized groups, 64, or 128. On a GPU the N and K tiles are
autotuned (key: N, K, BLOCK_M and the variant, never the token count) for the larger weights; under
TRITON_INTERPRET=1 one small config is used directly.
"""
import functools

import torch
import triton
import triton.language as tl

from kernellab.triton import aot_spec
from kernellab.triton._autotune import INTERPRET, given
from kernellab.triton.moe_align import DECODE_BLOCK_M, block_table, max_aligned_blocks


@triton.heuristics({"SCALED": given("row_scale_ptr")})
@triton.jit
def _grouped_gemm_kernel(a_ptr, w_ptr, out_ptr, row_map_ptr, block_expert_ptr, num_blocks_ptr, row_scale_ptr,
                         N, K, a_row_div, up_offset,
                         stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_om, stride_on,
                         A_MAPPED: tl.constexpr, OUT_MAPPED: tl.constexpr, GATED: tl.constexpr,
                         SCALED: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Persistent: each program walks tiles pid, pid + programs, ... of the num_blocks * cdiv(N, BLOCK_N) tiles.

    Tile (b, n): positions p = b * BLOCK_M + [0, BLOCK_M) of the block-aligned layout, expert
    e = block_expert[b], present rows r = row_map[p] >= 0. It computes acc = A[rows] @ w[e, n-tile]^T over K
    with A rows a[r // a_row_div] (A_MAPPED: a gather fused into the loads) or a[p]; then
      GATED:  acc = silu(acc) * (A[rows] @ w[e, up_offset + n-tile]^T)   (SwiGLU; N = I)
      SCALED: acc *= row_scale[r]                                          (routing weight per slot)
    and stores it at out[r] (OUT_MAPPED) or out[p]. a [*, K]; w [E, *, K]; out [*, N]."""
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    num_tiles = tl.load(num_blocks_ptr) * num_n_tiles
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        block = tile // num_n_tiles
        cols = (tile % num_n_tiles) * BLOCK_N + offs_n
        col_ok = cols < N
        expert = tl.load(block_expert_ptr + block).to(tl.int64)
        positions = block.to(tl.int64) * BLOCK_M + offs_m
        mapped = tl.load(row_map_ptr + positions).to(tl.int64)
        present = mapped >= 0
        if A_MAPPED:
            a_rows = mapped // a_row_div
        else:
            a_rows = positions
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
        w_ptrs = w_ptr + expert * stride_we + cols.to(tl.int64)[None, :] * stride_wn + offs_k[:, None] * stride_wk
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if GATED:
            acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            k_ok = offs_k < K - k
            a = tl.load(a_ptrs, mask=present[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, w, acc)
            if GATED:
                w_up = tl.load(w_ptrs + up_offset * stride_wn, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                acc_up = tl.dot(a, w_up, acc_up)
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk
        if GATED:
            acc = acc / (1.0 + tl.exp(-acc)) * acc_up
        if SCALED:
            acc *= tl.load(row_scale_ptr + mapped, mask=present, other=0.0)[:, None]
        if OUT_MAPPED:
            out_rows = mapped
        else:
            out_rows = positions
        tl.store(out_ptr + out_rows[:, None] * stride_om + cols[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=present[:, None] & col_ok[None, :])


# (BLOCK_N, BLOCK_K, num_warps, num_stages) candidates per BLOCK_M, for the GPU autotuner. The gated variant
# holds two accumulators and streams two weight tiles: with 128 x 128 tiles it spills at 4 warps and exceeds
# sm_90's shared memory at BLOCK_K = 128 (sm_90 compiles with 16-byte aligned arguments, as at launch), so those
# are left out.
GEMM_CONFIGS = {
    16: [(64, 128, 4, 4), (128, 128, 4, 3), (64, 256, 4, 3), (32, 256, 4, 4)],
    64: [(128, 64, 4, 4), (64, 64, 4, 4), (128, 64, 8, 3)],
    128: [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4), (64, 128, 4, 3)],
}


# Weight matrices smaller than this (toy and test shapes) take the first config: compiling every candidate would
# cost more than it saves. The Qwen3.5 experts (512 x 2048 and up) are autotuned.
AUTOTUNE_MIN_NK = 1 << 20


@functools.cache
def _tuned_gemm(block_m):
    configs = [triton.Config(dict(BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=s)
               for bn, bk, w, s in GEMM_CONFIGS[block_m]]
    return triton.autotune(configs, key=["N", "K", "A_MAPPED", "GATED"])(_grouped_gemm_kernel)


@functools.cache
def _num_sms(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def gemm_block_m(rows_per_expert):
    """BLOCK_M from the mean rows per expert (a host number: no synchronisation)."""
    if rows_per_expert <= DECODE_BLOCK_M:
        return DECODE_BLOCK_M
    return 64 if rows_per_expert <= 64 or INTERPRET else 128


def launch_gemm(a, w, out, row_map, block_expert, num_blocks, *, N, K, block_m, a_mapped, a_row_div=1,
                out_mapped, gated=False, up_offset=0, row_scale=None):
    """Runs _grouped_gemm_kernel over the block table (no host synchronisation: num_blocks stays on device).
    a [*, K]; w [E, *, K]; out [*, N]; row_scale None or float32 [slots], multiplied into each output row."""
    max_tiles = block_expert.numel() * triton.cdiv(N, 64)
    args = (a, w, out, row_map, block_expert, num_blocks, row_scale, N, K, a_row_div, up_offset, a.stride(0),
            a.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1))
    flags = dict(A_MAPPED=a_mapped, OUT_MAPPED=out_mapped, GATED=gated, BLOCK_M=block_m)
    if INTERPRET:
        block_n = min(64, max(16, triton.next_power_of_2(N)))
        block_k = min(64, max(16, triton.next_power_of_2(K)))
        _grouped_gemm_kernel[(min(4, max_tiles),)](*args, **flags, BLOCK_N=block_n, BLOCK_K=block_k)
    else:
        # Decode tiles are small and memory-bound: two resident programs per SM keep more loads in flight.
        per_sm = 2 if block_m == DECODE_BLOCK_M else 1
        programs = min(per_sm * _num_sms(a.device.index or 0), max_tiles)
        if N * K >= AUTOTUNE_MIN_NK:
            _tuned_gemm(block_m)[(programs,)](*args, **flags)
        else:
            block_n, block_k, warps, stages = GEMM_CONFIGS[block_m][0]
            _grouped_gemm_kernel[(programs,)](*args, **flags, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
                                              num_stages=stages)


def _grouped_rows(offsets, M, E, block_m, device):
    """The block table of rows already grouped by expert (offsets [E + 1]): (block_m, row_map, block_expert,
    num_blocks), block_m chosen from the mean rows per expert unless given."""
    block_m = block_m or gemm_block_m(M / E)
    max_blocks = max_aligned_blocks(M, E, block_m)
    row_map = torch.empty(max_blocks * block_m, dtype=torch.int32, device=device)
    block_expert, num_blocks = block_table(offsets, row_map, max_blocks, block_m, contiguous=True)
    return block_m, row_map, block_expert, num_blocks


def grouped_gemm(x, w, offsets, block_m=None):
    """y[offsets[e]:offsets[e + 1]] = x[same rows] @ w[e]^T. x [M, K] grouped by expert; w [E, N, K];
    offsets int [E + 1]. Returns [M, N] in x's dtype. block_m (16, 64 or 128) overrides the tile height,
    chosen otherwise from the mean rows per expert."""
    M, K = x.shape
    E, N, _ = w.shape
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.zero_()
    block_m, row_map, block_expert, num_blocks = _grouped_rows(offsets, M, E, block_m, x.device)
    launch_gemm(x, w, y, row_map, block_expert, num_blocks, N=N, K=K, block_m=block_m, a_mapped=True,
                out_mapped=True)
    return y


# ------------------------------------------------------------------------------------------------ backward
#
# dX = dY W runs on the grouped GEMM kernel above with the weight's strides transposed (w[e]^T is [K, N]); the
# weights' gradient dW[e] = dY[rows of e]^T X[rows of e] is a grouped GEMM over the tokens: one program per tile
# of dW[e], walking the rows of its expert (_weight_grad_kernel). Each tile is written once: no atomics.

@triton.jit
def _weight_grad_kernel(a_ptr, b_ptr, out_ptr, row_map_ptr, starts_ptr, ends_ptr, N, K, a_row_div, b_row_div,
                        stride_am, stride_an, stride_bm, stride_bk, stride_oe, stride_on, stride_ok,
                        A_MAPPED: tl.constexpr, B_MAPPED: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[e] = A[rows of e]^T B[rows of e] ([N, K], float32 sums) for every group e. Grid (cdiv(N, BLOCK_N) *
    cdiv(K, BLOCK_K), E).

    Group e's rows are the positions p = starts[e] .. ends[e] - 1; A's row at p is a[row_map[p] // a_row_div]
    (A_MAPPED: a gather fused into the loads) or a[p], B's likewise. An empty group's out[e] is 0. a [*, N];
    b [*, K]; out [E, N, K]."""
    tile, expert = tl.program_id(0), tl.program_id(1).to(tl.int64)
    num_k_tiles = tl.cdiv(K, BLOCK_K)
    cols_n = (tile // num_k_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_k = (tile % num_k_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok, k_ok = cols_n < N, cols_k < K
    start = tl.load(starts_ptr + expert)
    end = tl.load(ends_ptr + expert)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for first in range(start, end, BLOCK_M):
        positions = first + tl.arange(0, BLOCK_M)
        row_ok = positions < end
        positions = positions.to(tl.int64)
        if A_MAPPED or B_MAPPED:
            mapped = tl.load(row_map_ptr + positions, mask=row_ok, other=0).to(tl.int64)
        if A_MAPPED:
            a_rows = mapped // a_row_div
        else:
            a_rows = positions
        if B_MAPPED:
            b_rows = mapped // b_row_div
        else:
            b_rows = positions
        a_t = tl.load(a_ptr + a_rows[None, :] * stride_am + cols_n[:, None] * stride_an,
                      mask=n_ok[:, None] & row_ok[None, :], other=0.0)
        b = tl.load(b_ptr + b_rows[:, None] * stride_bm + cols_k[None, :] * stride_bk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(a_t, b.to(a_t.dtype), acc)
    tl.store(out_ptr + expert * stride_oe + cols_n[:, None] * stride_on + cols_k[None, :] * stride_ok,
             acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the weight-gradient kernel: a [128, 128] float32 tile of
# dW per program over 8 warps, rows in steps of 64.
WEIGHT_GRAD_CONFIG = (64, 128, 128, 8, 3)


def launch_weight_grad(a, b, out, starts, ends, row_map=None, *, a_row_div=1, b_row_div=1, a_mapped=False,
                       b_mapped=False):
    """out[e] = a[rows of e]^T b[rows of e] (_weight_grad_kernel). a [*, N]; b [*, K]; out [E, N, K]; starts, ends
    int32 [E]: the positions of each group; row_map int32 (the slots of the positions) when a or b is mapped."""
    E, N, K = out.shape
    if INTERPRET:
        block_m, warps, stages = 16, 4, 1
        block_n, block_k = (min(64, max(16, triton.next_power_of_2(size))) for size in (N, K))
    else:
        block_m, block_n, block_k, warps, stages = WEIGHT_GRAD_CONFIG
    grid = (triton.cdiv(N, block_n) * triton.cdiv(K, block_k), E)
    _weight_grad_kernel[grid](a, b, out, row_map, starts, ends, N, K, a_row_div, b_row_div, a.stride(0), a.stride(1),
                              b.stride(0), b.stride(1), out.stride(0), out.stride(1), out.stride(2), A_MAPPED=a_mapped,
                              B_MAPPED=b_mapped, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
                              num_stages=stages)


def grouped_gemm_backward(grads, x, w, offsets, block_m=None):
    """The gradients of grouped_gemm (kernellab.autograd's contract): grads {"y": [M, N] or None}. Per group e:
    dx[rows] = dy[rows] @ w[e] (the grouped GEMM kernel on w's transposed strides) and dw[e] = dy[rows]^T @ x[rows]
    (_weight_grad_kernel; 0 for an empty group). Returns {"x": [M, K], "w": [E, N, K]} in x's dtype."""
    dy = grads["y"]
    M, K = x.shape
    E, N, _ = w.shape
    if dy is None or M == 0 or N == 0 or K == 0:
        return dict(x=torch.zeros_like(x), w=torch.zeros_like(w))
    block_m, row_map, block_expert, num_blocks = _grouped_rows(offsets, M, E, block_m, x.device)
    dx = torch.empty_like(x)
    launch_gemm(dy, w.transpose(1, 2), dx, row_map, block_expert, num_blocks, N=K, K=N, block_m=block_m,
                a_mapped=True, out_mapped=True)
    dw = torch.empty_like(w)
    launch_weight_grad(dy, x, dw, offsets[:-1], offsets[1:])
    return dict(x=dx, w=dw)


def gemm_spec(label, shape, flags, block_m, config, dt="bf16", out_dt=None, transposed_w=False):
    """The grouped GEMM kernel's AotSpec, named label[shape,dt,BM=..,BN=..,BK=..,w=..,s=..], for one variant
    (flags: A_MAPPED, OUT_MAPPED, GATED, SCALED), BLOCK_M and config (BLOCK_N, BLOCK_K, num_warps, num_stages) of
    GEMM_CONFIGS, at a shape where every size and stride but a_row_div (top_k = 8, or 1) is a multiple of 16.
    Unit strides are constexpr 1, as Triton specialises them at launch. out_dt: the output's element type (default
    dt); transposed_w: the weight read through its transposed strides (the backward's dX = dY W)."""
    block_n, block_k, warps, stages = config
    unit_w, strided_w = ("stride_wn", "stride_wk") if transposed_w else ("stride_wk", "stride_wn")
    return aot_spec(f"{label}[{shape},{dt},BM={block_m},BN={block_n},BK={block_k},w={warps},s={stages}]",
                    _grouped_gemm_kernel,
                    {"stride_ak": 1, unit_w: 1, "stride_on": 1, **flags, "BLOCK_M": block_m, "BLOCK_N": block_n,
                     "BLOCK_K": block_k},
                    pointers=dict(a_ptr=dt, w_ptr=dt, out_ptr=out_dt or dt, row_map_ptr="i32", block_expert_ptr="i32",
                                  num_blocks_ptr="i32", row_scale_ptr="fp32"),
                    divisible_by_16=("N", "K", "up_offset", "stride_am", "stride_we", strided_w, "stride_om"),
                    num_warps=warps, num_stages=stages)


def weight_grad_spec(label, shape, a_mapped, b_mapped, dt="bf16", config=WEIGHT_GRAD_CONFIG):
    """The weight-gradient kernel's AotSpec at its GPU config, on contiguous rows (unit strides constexpr 1, every
    other size and stride a multiple of 16 but the row divisors, top_k or 1)."""
    block_m, block_n, block_k, warps, stages = config
    return aot_spec(f"{label}[{shape},{dt},BM={block_m},BN={block_n},BK={block_k},w={warps},s={stages}]",
                    _weight_grad_kernel,
                    dict(stride_an=1, stride_bk=1, stride_ok=1, A_MAPPED=a_mapped, B_MAPPED=b_mapped,
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k),
                    pointers=dict(a_ptr=dt, b_ptr=dt, out_ptr=dt, row_map_ptr="i32", starts_ptr="i32",
                                  ends_ptr="i32"),
                    divisible_by_16=("N", "K", "stride_am", "stride_bm", "stride_oe", "stride_on"),
                    num_warps=warps, num_stages=stages)


# grouped_gemm on the gate/up weights of a Qwen3.5-35B-A3B layer ([256, 1024, 2048], bf16) at the prefill tile, and
# its backward (dX = dY W on the transposed weight, dW over the tokens); the fused layer's variants are
# kernellab.triton.moe's.
_GROUPED = dict(A_MAPPED=True, OUT_MAPPED=True, GATED=False, SCALED=False)
AOT_SPECS = [gemm_spec("grouped_gemm", "N=1024,K=2048", _GROUPED, 128, GEMM_CONFIGS[128][0]),
             gemm_spec("grouped_gemm.dx", "N=2048,K=1024", _GROUPED, 128, GEMM_CONFIGS[128][0], transposed_w=True),
             weight_grad_spec("grouped_gemm.weight_grad", "N=1024,K=2048", a_mapped=False, b_mapped=False)]
