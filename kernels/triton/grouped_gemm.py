"""The persistent grouped GEMM of the MoE ops in Triton: y[rows of group e] = x[rows] @ w[e]^T for every group.

One kernel walks the (block, N-tile) pairs of the block-aligned layout (kernels.triton.moe_align: block_expert
and row_map, num_blocks on device, no host synchronisation), so empty experts cost nothing and a 1-row expert
costs one BLOCK_M tile. Its variants serve the fused layer too (kernels.triton.moe): A rows gathered through
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

from kernels.triton import aot_spec
from kernels.triton._autotune import INTERPRET, given
from kernels.triton.moe_align import DECODE_BLOCK_M, block_table, max_aligned_blocks


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
    block_m = block_m or gemm_block_m(M / E)
    max_blocks = max_aligned_blocks(M, E, block_m)
    row_map = torch.empty(max_blocks * block_m, dtype=torch.int32, device=x.device)
    block_expert, num_blocks = block_table(offsets, row_map, max_blocks, block_m, contiguous=True)
    launch_gemm(x, w, y, row_map, block_expert, num_blocks, N=N, K=K, block_m=block_m, a_mapped=True,
                out_mapped=True)
    return y


def gemm_spec(label, shape, flags, block_m, config, dt="bf16"):
    """The grouped GEMM kernel's AotSpec, named label[shape,dt,BM=..,BN=..,BK=..,w=..,s=..], for one variant
    (flags: A_MAPPED, OUT_MAPPED, GATED, SCALED), BLOCK_M and config (BLOCK_N, BLOCK_K, num_warps, num_stages) of
    GEMM_CONFIGS, at a shape where every size and stride but a_row_div (top_k = 8, or 1) is a multiple of 16.
    Unit strides are constexpr 1, as Triton specialises them at launch."""
    block_n, block_k, warps, stages = config
    return aot_spec(f"{label}[{shape},{dt},BM={block_m},BN={block_n},BK={block_k},w={warps},s={stages}]",
                    _grouped_gemm_kernel,
                    dict(stride_ak=1, stride_wk=1, stride_on=1, **flags, BLOCK_M=block_m, BLOCK_N=block_n,
                         BLOCK_K=block_k),
                    pointers=dict(a_ptr=dt, w_ptr=dt, out_ptr=dt, row_map_ptr="i32", block_expert_ptr="i32",
                                  num_blocks_ptr="i32", row_scale_ptr="fp32"),
                    divisible_by_16=("N", "K", "up_offset", "stride_am", "stride_we", "stride_wn", "stride_om"),
                    num_warps=warps, num_stages=stages)


# grouped_gemm on the gate/up weights of a Qwen3.5-35B-A3B layer ([256, 1024, 2048], bf16) at the prefill tile;
# the fused layer's variants are kernels.triton.moe's.
AOT_SPECS = [gemm_spec("grouped_gemm", "N=1024,K=2048", dict(A_MAPPED=True, OUT_MAPPED=True, GATED=False,
                                                             SCALED=False), 128, GEMM_CONFIGS[128][0])]
