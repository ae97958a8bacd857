"""The expert ops on float8_e4m3fn weights with block scales (kernellab/fp8.py) in Triton: tl.dot on fp8 operands
(Hopper's fp8 wgmma, e4m3 x e4m3 -> float32; QGMMA in SASS), the block scales applied per 128-wide step of K.

Scales: A (activations) has one float32 scale per row and 128 columns, W one per 128 x 128 block of each expert.
With BLOCK_K = 128 every K step of a tile lies in one scale column, so
    acc += dot(A_q[rows, k-step], W_q[e, cols, k-step]^T) * a_scale[rows, k] * w_scale[e, cols // 128, k]
is the product of the dequantized operands (DeepGEMM promotes its fp8 partial sums the same way).

grouped_gemm_fp8: x quantized per 1 x 128 (_quantize_kernel), then the persistent GEMM over the block table of
kernellab.triton.moe_align (as kernellab.triton.grouped_gemm, rows gathered and scattered through row_map).
moe_fp8: x quantized; the gate/up GEMM gathers its rows through row_map, and its epilogue computes
h = silu(gate) * up and quantizes it (BLOCK_N = 128: a tile's columns are one scale block of h) into fp8 with its
scales; the down GEMM applies the routing weights; the combine sums each token's slots in order
(kernellab.triton.moe_permute). No host synchronisation.
"""
import torch
import triton
import triton.language as tl

from kernellab.fp8 import BLOCK, FP8_MAX, MIN_AMAX
from kernellab.triton import aot_spec
from kernellab.triton._autotune import INTERPRET, given
from kernellab.triton.grouped_gemm import gemm_block_m
from kernellab.triton.moe import DECODE_MAX_TOKENS
from kernellab.triton.moe_align import DECODE_BLOCK_M, align_slots, block_table, max_aligned_blocks
from kernellab.triton.moe_permute import combine

_FP8_MAX = tl.constexpr(FP8_MAX)
_MIN_AMAX = tl.constexpr(MIN_AMAX)


@triton.jit
def _round_to_e4m3(x):
    """x float32, |x| <= 448 -> the nearest float8_e4m3fn value (ties to even), still float32: 3 mantissa bits
    kept of 23 for normal numbers, steps of 2^-9 below 2^-6 (the subnormals). The cast to fp8 after it is exact:
    Triton's interpreter mis-rounds the conversion where rounding carries into the exponent (127.8 -> 64)."""
    bits = x.to(tl.uint32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    magic = 12582912.0  # 1.5 * 2^23: adding and subtracting it rounds |x| * 512 to an integer, ties to even
    steps = (tl.abs(x) * 512.0 + magic) - magic
    subnormal = ((steps / 512.0).to(tl.uint32, bitcast=True) | (bits & 0x80000000)).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(x) < 0.015625, subnormal, normal)


@triton.jit
def _quantized_block(x, valid, FP8_DTYPE: tl.constexpr):
    """x [R, 128] float32 (valid: its real entries) -> (q [R, 128] fp8, scale [R]) as kernellab.fp8.quantize:
    scale = max(amax, MIN_AMAX) / 448 per row, q = round(x / scale) clamped to +-448."""
    amax = tl.max(tl.where(valid, tl.abs(x), 0.0), axis=1)
    scale = tl.maximum(amax, _MIN_AMAX) / _FP8_MAX
    q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale[:, None]), -_FP8_MAX), _FP8_MAX)
    return _round_to_e4m3(q).to(FP8_DTYPE), scale


@triton.jit
def _quantize_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, BLOCK_R: tl.constexpr, FP8_DTYPE: tl.constexpr):
    """x [M, K] -> q [M, K] fp8, s [M, cdiv(K, 128)] float32. Grid (cdiv(M, BLOCK_R), cdiv(K, 128))."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * 128 + tl.arange(0, 128)
    valid = (rows < M)[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=valid, other=0.0)
    q, scale = _quantized_block(x.to(tl.float32), valid, FP8_DTYPE)
    tl.store(q_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], q, mask=valid)
    tl.store(s_ptr + rows.to(tl.int64) * tl.cdiv(K, 128) + tl.program_id(1), scale, mask=rows < M)


def quantize_activations(x):
    """x [M, K] -> (q float8_e4m3fn [M, K], scale float32 [M, cdiv(K, 128)]): kernellab.fp8.quantize_activations on
    the device."""
    M, K = x.shape
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(M, triton.cdiv(K, BLOCK), dtype=torch.float32, device=x.device)
    if M and K:
        block_r = 16
        _quantize_kernel[(triton.cdiv(M, block_r), triton.cdiv(K, BLOCK))](
            x, q, scale, M, K, x.stride(0), BLOCK_R=block_r, FP8_DTYPE=tl.float8e4nv)
    return q, scale


@triton.heuristics({"SCALED": given("row_scale_ptr")})
@triton.jit
def _grouped_gemm_fp8_kernel(a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, out_ptr, out_scale_ptr, row_map_ptr,
                             block_expert_ptr, num_blocks_ptr, row_scale_ptr, N, K, a_row_div, up_offset,
                             stride_am, stride_we, stride_wn, stride_om,
                             A_MAPPED: tl.constexpr, OUT_MAPPED: tl.constexpr, GATED: tl.constexpr,
                             QUANTIZE_OUT: tl.constexpr, SCALED: tl.constexpr, FP8_DTYPE: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Persistent over the num_blocks * cdiv(N, BLOCK_N) tiles, as kernellab.triton.grouped_gemm's kernel, on fp8
    a [*, K] with a_scale [*, cdiv(K, 128)] (rows as a's) and w [E, *, K] with w_scale [E, *, cdiv(K, 128)]
    (the scale rows of w's 128-row blocks); unit strides along K. GATED: silu(gate) * up of the columns cols and
    up_offset + cols. QUANTIZE_OUT (BLOCK_N = 128): out is fp8 and out_scale [*, cdiv(N, 128)] its per-row
    scale of the tile. SCALED: times row_scale[slot]."""
    BLOCK_K: tl.constexpr = 128
    k_blocks = tl.cdiv(K, BLOCK_K)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    num_tiles = tl.load(num_blocks_ptr) * num_n_tiles
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        block = tile // num_n_tiles
        n_tile = tile % num_n_tiles
        cols = n_tile * BLOCK_N + offs_n
        col_ok = cols < N
        expert = tl.load(block_expert_ptr + block).to(tl.int64)
        positions = block.to(tl.int64) * BLOCK_M + offs_m
        mapped = tl.load(row_map_ptr + positions).to(tl.int64)
        present = mapped >= 0
        if A_MAPPED:
            a_rows = tl.where(present, mapped // a_row_div, 0)
        else:
            a_rows = positions
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
        w_ptrs = w_ptr + expert * stride_we + cols.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
        a_scales = a_scale_ptr + a_rows * k_blocks
        # w's scale rows: cdiv(up_offset + N, 128) per expert (w holds up_offset + N rows: 2I gated, N otherwise)
        w_scale_rows = w_scale_ptr + expert * tl.cdiv(up_offset + N, 128) * k_blocks
        w_scales = w_scale_rows + (cols // 128) * k_blocks
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if GATED:
            acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kb in range(0, k_blocks):
            k_ok = offs_k < K - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=present[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            a_s = tl.load(a_scales + kb, mask=present, other=0.0)
            w_s = tl.load(w_scales + kb, mask=col_ok, other=0.0)
            acc += tl.dot(a, w) * a_s[:, None] * w_s[None, :]
            if GATED:
                w_up = tl.load(w_ptrs + up_offset * stride_wn, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                w_up_s = tl.load(w_scale_rows + ((up_offset + cols) // 128) * k_blocks + kb, mask=col_ok, other=0.0)
                acc_up += tl.dot(a, w_up) * a_s[:, None] * w_up_s[None, :]
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if GATED:
            acc = acc / (1.0 + tl.exp(-acc)) * acc_up
        if SCALED:
            acc *= tl.load(row_scale_ptr + mapped, mask=present, other=0.0)[:, None]
        if OUT_MAPPED:
            out_rows = mapped
        else:
            out_rows = positions
        valid = present[:, None] & col_ok[None, :]
        out_ptrs = out_ptr + out_rows[:, None] * stride_om + cols[None, :]
        if QUANTIZE_OUT:
            q, scale = _quantized_block(acc, valid, FP8_DTYPE)
            tl.store(out_ptrs, q, mask=valid)
            tl.store(out_scale_ptr + out_rows * num_n_tiles + n_tile, scale, mask=present)
        else:
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid)


# (BLOCK_N, num_warps, num_stages) per BLOCK_M on a GPU (BLOCK_K is 128: one scale column). QUANTIZE_OUT needs
# BLOCK_N = 128. The gated GEMM holds two accumulators: at 128 x 128 they spill (sm_90 static table), so the
# fused layer's prefill tile is 64 rows.
FP8_CONFIGS = {16: (128, 4, 4), 64: (128, 8, 3), 128: (128, 8, 3)}
LAYER_PREFILL_BLOCK_M = 64


def _launch(a, a_scale, w, w_scale, out, row_map, block_expert, num_blocks, *, N, K, block_m, a_mapped,
            a_row_div=1, out_mapped, gated=False, up_offset=0, out_scale=None, row_scale=None):
    """Runs _grouped_gemm_fp8_kernel over the block table (num_blocks on device). a, w fp8 with unit K stride."""
    max_tiles = block_expert.numel() * triton.cdiv(N, 128)
    block_n, warps, stages = FP8_CONFIGS[block_m]
    programs = min(4 if INTERPRET else torch.cuda.get_device_properties(a.device).multi_processor_count,
                   max(1, max_tiles))
    _grouped_gemm_fp8_kernel[(programs,)](
        a, a_scale, w, w_scale, out, out_scale, row_map, block_expert, num_blocks, row_scale, N, K, a_row_div,
        up_offset, a.stride(0), w.stride(0), w.stride(1), out.stride(0), A_MAPPED=a_mapped, OUT_MAPPED=out_mapped,
        GATED=gated, QUANTIZE_OUT=out_scale is not None, FP8_DTYPE=tl.float8e4nv, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=warps, num_stages=stages)


def grouped_gemm_fp8(x, w, w_scale, offsets):
    """y[offsets[e]:offsets[e + 1]] = x_q[same rows] @ dequant(w[e])^T. x [M, K] grouped by expert (quantized here
    in blocks of 1 x 128); w float8_e4m3fn [E, N, K], w_scale [E, cdiv(N, 128), cdiv(K, 128)]; offsets int
    [E + 1]. Returns [M, N] in x's dtype."""
    M, K = x.shape
    E, N, _ = w.shape
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    xq, x_scale = quantize_activations(x)
    block_m = gemm_block_m(M / E)
    max_blocks = max_aligned_blocks(M, E, block_m)
    row_map = torch.empty(max_blocks * block_m, dtype=torch.int32, device=x.device)
    block_expert, num_blocks = block_table(offsets, row_map, max_blocks, block_m, contiguous=True)
    _launch(xq, x_scale, w.contiguous(), w_scale.float().contiguous(), y, row_map, block_expert, num_blocks, N=N,
            K=K, block_m=block_m, a_mapped=True, out_mapped=True)
    return y


def moe_fp8(x, weights, ids, w_gate_up, w_gate_up_scale, w_down, w_down_scale):
    """Qwen3.5 experts on fp8 weights. x [N, D]; weights, ids [N, top_k]; w_gate_up float8_e4m3fn [E, 2I, D],
    w_down [E, D, I] with their 128 x 128 block scales. Returns [N, D] in x's dtype."""
    N, D = x.shape
    E, two_I, _ = w_gate_up.shape
    I = two_I // 2
    top_k = ids.shape[1]
    if N == 0:
        return torch.zeros_like(x)
    block_m = DECODE_BLOCK_M if N <= DECODE_MAX_TOKENS else LAYER_PREFILL_BLOCK_M
    row_map, block_expert, num_blocks, _ = align_slots(ids, E, block_m, one_program=N <= DECODE_MAX_TOKENS)
    xq, x_scale = quantize_activations(x)
    h = torch.empty(row_map.numel(), I, dtype=torch.float8_e4m3fn, device=x.device)
    h_scale = torch.empty(row_map.numel(), triton.cdiv(I, BLOCK), dtype=torch.float32, device=x.device)
    _launch(xq, x_scale, w_gate_up.contiguous(), w_gate_up_scale.float().contiguous(), h, row_map, block_expert,
            num_blocks, N=I, K=D, block_m=block_m, a_mapped=True, a_row_div=top_k, out_mapped=False, gated=True,
            up_offset=I, out_scale=h_scale)
    y_slots = torch.empty(N * top_k, D, dtype=x.dtype, device=x.device)
    _launch(h, h_scale, w_down.contiguous(), w_down_scale.float().contiguous(), y_slots, row_map, block_expert,
            num_blocks, N=D, K=I, block_m=block_m, a_mapped=False, out_mapped=True,
            row_scale=weights.to(torch.float32).reshape(-1).contiguous())
    return combine(y_slots, ids.reshape(-1), None, N, top_k, rows_are_slots=True)


def _spec(label, flags, block_m, N, K, out="bf16"):
    block_n, warps, stages = FP8_CONFIGS[block_m]
    return aot_spec(f"{label}[N={N},K={K},fp8e4m3,BM={block_m},BN={block_n},w={warps},s={stages}]",
                    _grouped_gemm_fp8_kernel,
                    dict(**flags, FP8_DTYPE=tl.float8e4nv, BLOCK_M=block_m, BLOCK_N=block_n),
                    pointers=dict(a_ptr="fp8e4nv", a_scale_ptr="fp32", w_ptr="fp8e4nv", w_scale_ptr="fp32",
                                  out_ptr=out, out_scale_ptr="fp32", row_map_ptr="i32", block_expert_ptr="i32",
                                  num_blocks_ptr="i32", row_scale_ptr="fp32"),
                    divisible_by_16=("N", "K", "up_offset", "stride_am", "stride_we", "stride_wn", "stride_om"),
                    num_warps=warps, num_stages=stages)


# Qwen3.5-35B-A3B's experts (hidden 2048, expert size 512): the grouped GEMM of the gate/up weights and the fused
# layer's two GEMMs, at the decode and prefill tiles.
_PLAIN = dict(A_MAPPED=True, OUT_MAPPED=True, GATED=False, QUANTIZE_OUT=False, SCALED=False)
_GATE_UP = dict(A_MAPPED=True, OUT_MAPPED=False, GATED=True, QUANTIZE_OUT=True, SCALED=False)
_DOWN = dict(A_MAPPED=False, OUT_MAPPED=True, GATED=False, QUANTIZE_OUT=False, SCALED=True)
AOT_SPECS = [
    _spec("grouped_gemm_fp8", _PLAIN, 128, 1024, 2048),
    *(spec for block_m in (DECODE_BLOCK_M, LAYER_PREFILL_BLOCK_M) for spec in (
        _spec("moe_fp8.gate_up", _GATE_UP, block_m, 512, 2048, out="fp8e4nv"),
        _spec("moe_fp8.down", _DOWN, block_m, 2048, 512))),
]
