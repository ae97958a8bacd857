"""Flash attention (forward) in Triton, with grouped KV heads: the quadratic baseline on the same toolchain.

o_t = softmax(scale q_t K^T + causal mask) V. One program per (BM query rows, batch, query head) streams the
keys and values of its KV head in blocks of BN with an online softmax (running max m, running sum l) in
float32. Causal: key blocks past the last query row are skipped, and only the blocks that cross the diagonal
pay for the mask. K, V longer than q (a KV cache) align bottom-right: query i sits at key position Tk - Tq + i
(kv_lens[b] - Tq + i when only the first kv_lens[b] keys of a buffer are valid). Packed sequences (cu_seqlens)
run as blocks of (sequence, query block) listed on the device: each attends within its own sequence.
"""
import math

import torch
import triton
import triton.language as tl

from kernellab.triton import aot_spec
from kernellab.triton._autotune import TRITON_DTYPE, autotune, dot_precision, given
from kernellab.triton._chunk import prepare_chunk_layout

LOG2E = math.log2(math.e)


@triton.jit
def _attend_block(b_q, k, v, o_n, o_m, o_d, b_acc, b_m, b_l, qk_scale, shift, Tk, HKV, D: tl.constexpr,
                  MASK: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """One key block: scores in log2 units (qk_scale = scale * log2(e)), online-softmax update of
    (b_acc [BM, BD], b_m, b_l). k, v point at the (batch, KV head) row 0; o_n are the block's key positions."""
    m_n = o_n < Tk
    rows = o_n.to(tl.int64)  # Tk * HKV * D may pass 2^31 on long caches
    b_k = tl.load(k + rows[:, None] * HKV * D + o_d[None, :], mask=m_n[:, None] & (o_d < D)[None, :], other=0.)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
    if MASK:
        visible = m_n[None, :]
        if CAUSAL:
            visible &= o_n[None, :] <= shift + o_m[:, None]
        b_s = tl.where(visible, b_s, float("-inf"))
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
    b_p = tl.math.exp2(b_s - b_m_new[:, None])
    b_alpha = tl.math.exp2(b_m - b_m_new)
    b_v = tl.load(v + rows[:, None] * HKV * D + o_d[None, :], mask=m_n[:, None] & (o_d < D)[None, :], other=0.)
    b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc * b_alpha[:, None], input_precision=PRECISION)
    return b_acc, b_m_new, b_l * b_alpha + tl.sum(b_p, 1)


def _fits_registers(configs, named_args, **kwargs):
    """Past head dim 128, the configs that compile for sm_90 without spills: blocks of 32 keys on 8 warps (as
    launched, with 16-byte aligned pointers, the others spill 32 to 240 bytes at D = 256 on Triton 3.9 and 3.6)."""
    if {**named_args, **kwargs}["BD"] <= 128:
        return configs
    return [c for c in configs if c.kwargs["BN"] == 32 and c.num_warps == 8] or configs


BLOCK_M = 64  # query rows per program; packed sequences are cut into blocks of this many on the device


@triton.heuristics({"IS_VARLEN": given("cu_seqlens"), "HAS_KV_LENS": given("kv_lens")})
@autotune(configs=[triton.Config({"BM": BLOCK_M, "BN": BN}, num_warps=num_warps, num_stages=num_stages)
                   for BN in (64, 32) for num_warps in (4, 8) for num_stages in (2, 3)],
          key=["HQ", "HKV", "D", "CAUSAL", "IS_VARLEN", "HAS_KV_LENS"], prune=_fits_registers)
@triton.jit(do_not_specialize=["Tq", "Tk"])
def attention_kernel(q, k, v, o, cu_seqlens, chunk_indices, kv_lens, qk_scale, Tq, Tk, HQ: tl.constexpr,
                     HKV: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_KV_LENS: tl.constexpr,
                     PRECISION: tl.constexpr):
    """q [B, Tq, HQ, D]; k, v [B, Tk, HKV, D]; o [B, Tq, HQ, D]; qk_scale = scale * log2(e).
    Grid (cdiv(Tq, BM), B * HQ); packed sequences (IS_VARLEN, B = 1): grid (rows of chunk_indices, HQ), each
    program one block of BM queries of one sequence (cu_seqlens [N + 1], chunk_indices [n, 2] of (sequence,
    block), -1 for padding). HAS_KV_LENS: only the first kv_lens[b] keys of batch row b are valid.
    BD = D padded to a power of two."""
    i_m, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    i_hk = i_h // (HQ // HKV)
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_m * 2).to(tl.int64)
        i_m = tl.load(chunk_indices + i_m * 2 + 1).to(tl.int64)
        if i_m < 0:
            return
        q_row = tl.load(cu_seqlens + i_n).to(tl.int64)  # the sequence's first token, in q and in k
        k_row = q_row
        seq_q = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - q_row
        seq_k = seq_q
    else:
        q_row, k_row, seq_q = i_b * Tq, i_b * Tk, Tq
        if HAS_KV_LENS:
            seq_k = tl.load(kv_lens + i_b).to(tl.int64)
        else:
            seq_k = Tk
    o_m = i_m * BM + tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    m_md = (o_m < seq_q)[:, None] & (o_d < D)[None, :]
    q_offsets = ((q_row + o_m) * HQ + i_h)[:, None] * D + o_d[None, :]
    b_q = tl.load(q + q_offsets, mask=m_md, other=0.)
    k += (k_row * HKV + i_hk) * D
    v += (k_row * HKV + i_hk) * D

    shift = seq_k - seq_q  # query row i sits at key position shift + i
    if CAUSAL:
        # Keys up to the first row's position are visible to the whole block: no mask before `unmasked_end`.
        unmasked_end = (shift + i_m * BM + 1) // BN * BN
        end = tl.minimum(seq_k, shift + (i_m + 1) * BM)
    else:
        unmasked_end = seq_k // BN * BN
        end = seq_k
    b_acc = tl.zeros([BM, BD], dtype=tl.float32)
    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    for start in range(0, unmasked_end, BN):
        b_acc, b_m, b_l = _attend_block(b_q, k, v, start + tl.arange(0, BN), o_m, o_d, b_acc, b_m, b_l, qk_scale,
                                        shift, seq_k, HKV, D, False, CAUSAL, PRECISION)
    for start in range(unmasked_end, end, BN):
        b_acc, b_m, b_l = _attend_block(b_q, k, v, start + tl.arange(0, BN), o_m, o_d, b_acc, b_m, b_l, qk_scale,
                                        shift, seq_k, HKV, D, True, CAUSAL, PRECISION)
    # Every row sees key 0 at least, so b_l > 0 (padding rows past seq_q too: they are not stored).
    tl.store(o + q_offsets, (b_acc / b_l[:, None]).to(o.dtype.element_ty), mask=m_md)


def attention(q, k, v, causal, scale, cu_seqlens, kv_lens):
    """q [B, Tq, HQ, D]; k, v [B, Tk, HKV, D] (Tk >= Tq, HQ % HKV == 0); cu_seqlens [N + 1] (B = 1) or kv_lens [B].
    Returns o [B, Tq, HQ, D] in v's dtype. Nothing is read on the host (the block layout of packed sequences is
    built on the device)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, Tq, HQ, D = q.shape
    Tk, HKV = k.shape[1], k.shape[2]
    o = torch.empty_like(q, dtype=v.dtype)
    chunk_indices = None
    if cu_seqlens is not None:
        chunk_indices, _ = prepare_chunk_layout(cu_seqlens, Tq, chunk=BLOCK_M)
        grid = (chunk_indices.shape[0], HQ)
    else:
        grid = lambda meta: (triton.cdiv(Tq, meta["BM"]), B * HQ)  # noqa: E731
    attention_kernel[grid](q=q, k=k, v=v, o=o, cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, kv_lens=kv_lens,
                           qk_scale=scale * LOG2E, Tq=Tq, Tk=Tk, HQ=HQ, HKV=HKV, D=D, BD=triton.next_power_of_2(D),
                           CAUSAL=causal, PRECISION=dot_precision(q.dtype))
    return o


def _aot_spec(HQ, HKV, D, BM, BN, num_warps, dtype=torch.bfloat16):
    dt = TRITON_DTYPE[dtype]
    return aot_spec(f"attention[HQ={HQ},HKV={HKV},D={D},{dt},BM={BM},BN={BN},w{num_warps}]", attention_kernel,
                    dict(HQ=HQ, HKV=HKV, D=D, BD=triton.next_power_of_2(D), BM=BM, BN=BN, CAUSAL=True,
                         IS_VARLEN=False, HAS_KV_LENS=False, PRECISION=dot_precision(dtype)),
                    pointers=dict(q=dt, k=dt, v=dt, o=dt, cu_seqlens="i32", chunk_indices="i32", kv_lens="i32"),
                    floats=("qk_scale",), num_warps=num_warps, num_stages=2)


# Qwen3.5-35B-A3B's attention layers (HQ 16, HKV 2, D 256) and Qwen3-30B-A3B's (HQ 32, HKV 4, D 128).
AOT_SPECS = [_aot_spec(16, 2, 256, 64, 32, 8), _aot_spec(32, 4, 128, 64, 64, 4)]
