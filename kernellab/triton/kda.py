"""Kimi Delta Attention in Triton: chunked (prefill) and recurrent (decode).

Recurrent: the gated delta rule's recurrent kernel (kernellab/triton/gated_delta_rule.py) with KEY_GATE, row d of
the state decaying by exp(g_t[d]): one program per (sequence, value head, V tile) walks its tokens with its state
slice in registers.

Chunked (chunk_kernel): one program per (sequence, value head, V tile) walks the sequence's chunks of BT = 16
tokens with its state slice [K, BV] in registers. Per chunk, with gcum [BT, K] the cumulative log decay of every
key channel and S the state at the chunk's start (fla's chunk_kda; kernellab/torch/kda.py states the algebra):
  A_qk[i, j] = sum_d q_id k_jd exp(gcum_id - gcum_jd), j <= i;   L[i, j] = beta_i sum_d k_id k_jd exp(...), j < i
  T = (I + L)^-1 by forward substitution;  w = T (beta exp(gcum) k);  u = T (beta v)
  v_new = u - w S;  o = (exp(gcum) q) S + A_qk v_new;  S = Diag(exp(gcum_last)) S + (exp(gcum_last - gcum) k)^T v_new
The pair products are built column by column (BT passes over the [BT, K] tiles) with every decay exp(x <= 0): the
per-channel decays cannot be folded into q and k without exp(-gcum), which overflows at strong decays. The state is
rounded to state_dtype after every chunk; the arithmetic is float32. Each V tile recomputes the chunk's A_qk, T and
w (they do not depend on V).
"""
import torch
import triton
import triton.language as tl

from kernellab.triton import aot_spec
from kernellab.triton._autotune import TRITON_DTYPE, dot_precision, given
from kernellab.triton._chunk import STATE_TILE, num_chunks, prepare_chunk_layout, stored_state
from kernellab.triton._serving import (GATE_POINTERS, STATE_POINTERS, fused_gate, gate_arguments, keep_state,
                                     load_state, prepare, state_arguments, state_row, store_state)
from kernellab.triton.gated_delta_rule import (L2NORM_EPS, inverse_norms, qk_gradient, recurrent, recurrent_constexprs,
                                             recurrent_kernel, recurrent_pointers)
from kernellab.validate import STATE_ROUNDING

CHUNK = 16  # tl.dot's least size; the C^2 K pair products grow with it
# At 4 warps the chunk kernel takes 255 registers a thread at K = V = 128 (sm_90, no spills yet); 8 warps halve
# the tiles' share.
CHUNK_WARPS = 8


@triton.jit
def _pair_products(b_q, b_k, b_gc, o_t, BT: tl.constexpr):
    """The chunk's decayed pair products [BT, BT]: A_qk[i, j] = sum_d q_id k_jd exp(gcum_id - gcum_jd) for j <= i
    (0 above), and the same of k with k, whose entries on and above the diagonal the caller masks. Built column by
    column (BT passes over the [BT, K] tiles), every decay exp(x <= 0)."""
    b_Aqk = tl.zeros([BT, BT], dtype=tl.float32)
    b_Akk = tl.zeros([BT, BT], dtype=tl.float32)
    for j in range(BT):
        at_j = (o_t == j)[:, None]
        b_kj = tl.sum(tl.where(at_j, b_k, 0.), 0)
        b_gj = tl.sum(tl.where(at_j, b_gc, 0.), 0)
        b_dk = tl.exp(tl.minimum(b_gc - b_gj[None, :], 0.)) * b_kj[None, :]
        b_Aqk = tl.where(o_t[None, :] == j, tl.sum(b_q * b_dk, 1)[:, None], b_Aqk)
        b_Akk = tl.where(o_t[None, :] == j, tl.sum(b_k * b_dk, 1)[:, None], b_Akk)
    return tl.where(o_t[:, None] >= o_t[None, :], b_Aqk, 0.), b_Akk


@triton.jit
def _unit_lower_inverse(b_L, o_t, BT: tl.constexpr):
    """(I + L)^-1 of a strictly lower [BT, BT] L, row after row: T_i = e_i - sum_{j < i} L_ij T_j (the rows above
    are final)."""
    b_T = tl.where(o_t[:, None] == o_t[None, :], 1.0, 0.0)
    for i in range(1, BT):
        at_i = (o_t == i)[:, None]
        b_li = tl.sum(tl.where(at_i, b_L, 0.), 0)
        b_T = tl.where(at_i, b_T - tl.sum(b_li[:, None] * b_T, 0)[None, :], b_T)
    return b_T


@triton.jit
def _load_chunk(q, k, v, g, beta, rows, m_t, o_k, o_v, i_h, i_hk, scale, HV: tl.constexpr, HK: tl.constexpr,
                K: tl.constexpr, V: tl.constexpr, USE_QK_L2NORM: tl.constexpr, A_log, dt_bias,
                FUSED_GATE: tl.constexpr, BETA_LOGITS: tl.constexpr):
    """One chunk's rows in float32: q (l2-normalised on request, then scaled), k (normalised on request) [BT, BK],
    v [BT, BV], g's within-chunk cumulative sum [BT, BK] and beta [BT]; rows past the sequence's end (m_t false) 0.
    FUSED_GATE: g holds the raw a, gated by A_log [HV] and dt_bias [HV, K] before the sum; BETA_LOGITS: beta holds
    logits (kernellab/triton/_serving.py)."""
    m_tk = m_t[:, None] & (o_k < K)[None, :]
    b_q = tl.load(q + (rows[:, None] * HK + i_hk) * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
    b_k = tl.load(k + (rows[:, None] * HK + i_hk) * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
    if USE_QK_L2NORM:
        b_q = b_q / tl.sqrt(tl.sum(b_q * b_q, 1) + L2NORM_EPS)[:, None]
        b_k = b_k / tl.sqrt(tl.sum(b_k * b_k, 1) + L2NORM_EPS)[:, None]
    b_v = tl.load(v + (rows[:, None] * HV + i_h) * V + o_v[None, :], mask=m_t[:, None] & (o_v < V)[None, :],
                  other=0.).to(tl.float32)
    b_g = tl.load(g + (rows[:, None] * HV + i_h) * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
    b_beta = tl.load(beta + rows * HV + i_h, mask=m_t, other=0.).to(tl.float32)
    if FUSED_GATE:  # rows past the end stay 0: they must not decay the state
        b_g = tl.where(m_tk, fused_gate(b_g, tl.load(A_log + i_h),
                                        tl.load(dt_bias + i_h * K + o_k, mask=o_k < K, other=0.)[None, :]), 0.)
    if BETA_LOGITS:
        b_beta = tl.where(m_t, tl.sigmoid(b_beta), 0.)
    return b_q * scale, b_k, b_v, tl.cumsum(b_g, 0), b_beta


@triton.jit
def _sequence(cu_seqlens, chunk_offsets, i_n, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr,
              CHUNK_OFFSETS: tl.constexpr):
    """(first row, length, index of the first chunk in the per-chunk states: read when CHUNK_OFFSETS) of sequence
    i_n."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        length = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
        first = tl.load(chunk_offsets + i_n).to(tl.int64) if CHUNK_OFFSETS else 0
        return bos, length, first
    else:
        return i_n * T, T, i_n * tl.cdiv(T, BT)


@triton.jit
def _tiles(i_v, K, V, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr):
    """The offsets of a program's K columns, V tile i_v and chunk rows, and the masks of the K and V columns and of
    the state tile [BK, BV]."""
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    return o_k, o_v, tl.arange(0, BT), m_k, m_v, m_k[:, None] & m_v[None, :]


@triton.heuristics({"USE_INITIAL_STATE": given("h0"), "STORE_FINAL_STATE": given("ht"), "STORE_STATES": given("h"),
                    "IS_VARLEN": given("cu_seqlens"), "USE_H0_INDEX": given("h0_index"),
                    "USE_HT_INDEX": given("ht_index"), "KEEP": given("kept"), "FUSED_GATE": given("A_log")})
@triton.jit(do_not_specialize=["T", "h0_stride", "ht_stride", "every"])
def chunk_kernel(q, k, v, g, beta, o, h0, ht, h, cu_seqlens, chunk_offsets, scale, T, h0_index, ht_index, h0_stride,
                 ht_stride, kept, kept_offsets, every, A_log, dt_bias, HV: tl.constexpr, HK: tl.constexpr,
                 K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
                 USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, STORE_STATES: tl.constexpr,
                 USE_QK_L2NORM: tl.constexpr, IS_VARLEN: tl.constexpr, STATE_ROUNDING: tl.constexpr,
                 PRECISION: tl.constexpr, USE_H0_INDEX: tl.constexpr, USE_HT_INDEX: tl.constexpr,
                 KEEP: tl.constexpr, FUSED_GATE: tl.constexpr, BETA_LOGITS: tl.constexpr):
    """Chunk by chunk. Grid (cdiv(V, BV), N * HV). q, k [B, T, HK, K]; v, o [B, T, HV, V]; g [B, T, HV, K];
    beta [B, T, HV]; h0, ht [N, HV, K, V] in the state dtype; h (STORE_STATES, for the backward) float32
    [chunks, HV, K, V]: the state at each chunk's start, chunk_offsets int32 [N + 1] its sequences' first chunks
    (packed). Rows past a sequence's end load as k = v = 0, g = beta = 0: they leave the state as it is and their
    outputs are not stored. The serving keywords (kernellab/triton/_serving.py): h0, ht rows h0_stride / ht_stride
    apart, read from row h0_index[n] and written to row ht_index[n] (-1: zeros read, nothing written); kept: the
    state after every `every`-th whole chunk; FUSED_GATE, BETA_LOGITS: _load_chunk's."""
    i_v, i_nh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_n, i_h = i_nh // HV, i_nh % HV
    i_hk = i_h // (HV // HK)
    bos, T, boh = _sequence(cu_seqlens, chunk_offsets, i_n, T, BT, IS_VARLEN, STORE_STATES)
    o_k, o_v, o_t, m_k, m_v, m_kv = _tiles(i_v, K, V, BK, BV, BT)
    strict = o_t[:, None] > o_t[None, :]
    tile = o_k[:, None] * V + o_v[None, :]
    head_offsets = i_h * K * V + tile
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        h0_row = state_row(h0_index, i_n, USE_H0_INDEX)
        b_h += load_state(h0, h0_row, h0_stride, head_offsets, m_kv, USE_H0_INDEX)
    for t0 in range(0, T, BT):
        rows = bos + t0 + o_t
        m_t = (t0 + o_t) < T
        if STORE_STATES:
            tl.store(h + ((boh + t0 // BT) * HV + i_h) * K * V + tile, b_h, mask=m_kv)
        b_q, b_k, b_v, b_gc, b_beta = _load_chunk(q, k, v, g, beta, rows, m_t, o_k, o_v, i_h, i_hk, scale, HV, HK,
                                                   K, V, USE_QK_L2NORM, A_log, dt_bias, FUSED_GATE, BETA_LOGITS)
        b_Aqk, b_Akk = _pair_products(b_q, b_k, b_gc, o_t, BT)
        b_T = _unit_lower_inverse(tl.where(strict, b_Akk * b_beta[:, None], 0.), o_t, BT)
        b_gamma = tl.exp(b_gc)
        b_w = tl.dot(b_T, b_beta[:, None] * b_gamma * b_k, input_precision=PRECISION)
        b_vn = tl.dot(b_T, b_beta[:, None] * b_v, input_precision=PRECISION)
        b_vn -= tl.dot(b_w, b_h, input_precision=PRECISION)
        b_o = tl.dot(b_q * b_gamma, b_h, input_precision=PRECISION)
        b_o += tl.dot(b_Aqk, b_vn, input_precision=PRECISION)
        tl.store(o + (rows[:, None] * HV + i_h) * V + o_v[None, :], b_o.to(o.dtype.element_ty),
                 mask=m_t[:, None] & m_v[None, :])
        # padded rows repeat the last token's cumulative decay (their g is 0)
        b_glast = tl.sum(tl.where((o_t == BT - 1)[:, None], b_gc, 0.), 0)
        b_kd = b_k * tl.exp(tl.minimum(b_glast[None, :] - b_gc, 0.))
        b_h = b_h * tl.exp(b_glast)[:, None]
        b_h = stored_state(tl.dot(tl.trans(b_kd), b_vn, b_h, input_precision=PRECISION), STATE_ROUNDING)
        if KEEP:
            if t0 + BT <= T:  # whole chunks only
                keep_state(kept, kept_offsets, i_n, t0 // BT + 1, every, head_offsets, b_h, m_kv, HV * K * V)
    if STORE_FINAL_STATE:
        ht_row = state_row(ht_index, i_n, USE_HT_INDEX)
        store_state(ht, ht_row, ht_stride, head_offsets, b_h, m_kv, USE_HT_INDEX)


def _block_v(K, V):
    """The V tile: the state slice [BK, BV] within STATE_TILE registers, at least 16 (tl.dot) and no wider than V."""
    BK = triton.next_power_of_2(K)
    return max(16, min(triton.next_power_of_2(V), STATE_TILE // BK))


def _chunk_kda(q, k, v, g, beta, scale, states, gating, use_qk_l2norm, cu_seqlens, state_dtype, chunk_states=None,
               chunk_offsets=None):
    """The chunked forward: states, gating: _serving.state_arguments(..., step=CHUNK).kernel and
    _serving.gate_arguments(...); chunk_states (the backward's recompute): None, or float32 [chunks, HV, K, V] to
    receive the state at each chunk's start (chunk_offsets: the packed sequences' first chunks,
    _chunk.prepare_chunk_layout's). Returns o [B, T, HV, V]."""
    B, T, HK, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    o = torch.empty_like(v)
    BV = _block_v(K, V)
    chunk_kernel[(triton.cdiv(V, BV), N * HV)](
        q, k, v, g, beta, o, h=chunk_states, cu_seqlens=cu_seqlens, chunk_offsets=chunk_offsets, scale=scale, T=T,
        **states, **gating, HV=HV, HK=HK, K=K, V=V, BK=_block_k(K), BV=BV, BT=CHUNK, USE_QK_L2NORM=use_qk_l2norm,
        STATE_ROUNDING=STATE_ROUNDING[state_dtype], PRECISION=dot_precision(q.dtype), num_warps=CHUNK_WARPS)
    return o


def kda(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens, mode, state_dtype,
        state_indices=None, output_state_indices=None, output_intermediate_states=False, chunk_states_every=None,
        A_log=None, dt_bias=None, beta_logits=False):
    """q, k [B, T, HK, K]; v [B, T, HV, V]; g [B, T, HV, K]; beta [B, T, HV]; initial_state None or [N, HV, K, V]
    (in state_dtype when given; a pool [P, HV, K, V] with state_indices); cu_seqlens None or int [N + 1] (B = 1);
    mode "chunk" or "recurrent".
    Returns (o [B, T, HV, V] in v's dtype, final state [N, HV, K, V] in state_dtype or None), and a StateTrace with
    a trace. The state is rounded to state_dtype after every chunk (chunk) or token (recurrent); the arithmetic is
    float32. The serving keywords as the gated delta rule's (dt_bias [HV, K]), in the kernels."""
    (q, k, v, g, beta), mode, states, gating = prepare(
        q, k, v, g, beta, initial_state, output_final_state, state_dtype, cu_seqlens, mode, CHUNK, state_indices,
        output_state_indices, output_intermediate_states, chunk_states_every, A_log, dt_bias, beta_logits)
    if mode == "chunk":
        o = _chunk_kda(q, k, v, g, beta, scale, states.kernel, gating, use_qk_l2norm, cu_seqlens, state_dtype)
    else:
        o = recurrent(q, k, v, g, beta, scale, cu_seqlens, states.kernel, gating, use_qk_l2norm, state_dtype)
    return states.finish(o, output_intermediate_states, output_final_state, state_dtype, cu_seqlens)


# ------------------------------------------------------------------------------------------------ backward
#
# One program per (V tile, sequence, value head) walks its chunks last first with the gradient of the state at the
# chunk's end, dS1 [BK, BV], in registers; the state at the chunk's start S0 comes from the forward's recompute
# (chunk_kernel's per-chunk states), the rest of the chunk's forward (A_qk, L, T, w, u, v_new) is recomputed. With
# X = beta exp(gcum) k, Y = beta v, kd = exp(gcum_last - gcum) k, Qg = exp(gcum) q:
#   dv_new = A_qk^T do + kd dS1;   dS0 = exp(gcum_last) dS1 + Qg^T do - w^T dv_new
#   dA_qk = lower(do v_new^T);  dQg = do S0^T;  dkd = v_new dS1^T;  dw = -dv_new S0^T
#   dY = T^T dv_new;  dX = T^T dw;  dL = -strictly_lower(T^T (dv_new Y^T + dw X^T) T^T)
# and the decayed pair products' backward column by column, as the forward builds them. g's gradient is summed per
# token directly (a reverse cumulative sum over the rows each decay spans), not as the difference of the gradients of
# gcum, which cancels in float32 (_chunk._pair_decay_gradient's reason). Everything but dv and dS0 sums over V:
# each V tile writes its part, summed on the host.

@triton.heuristics({"USE_FINAL_STATE_GRADIENT": given("dht"), "STORE_INITIAL_STATE_GRADIENT": given("dh0"),
                    "IS_VARLEN": given("cu_seqlens")})
@triton.jit(do_not_specialize=["T"])
def chunk_backward_kernel(q, k, v, g, beta, h, do, dht, dq, dk, dv, dg, dbeta, dh0, cu_seqlens, chunk_offsets, scale,
                          T, HV: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                          BV: tl.constexpr, BT: tl.constexpr, USE_QK_L2NORM: tl.constexpr,
                          USE_FINAL_STATE_GRADIENT: tl.constexpr, STORE_INITIAL_STATE_GRADIENT: tl.constexpr,
                          IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr):
    """The reverse pass over chunks. Grid (NV = cdiv(V, BV), N * HV). q, k [B, T, HK, K]; v, do [B, T, HV, V];
    g [B, T, HV, K]; beta [B, T, HV]; h float32 [chunks, HV, K, V] (the state at each chunk's start); dht, dh0
    float32 [N, HV, K, V]. Writes this V tile's parts float32 dq, dk, dg [B, T, HV, NV, K] (dq, dk: of the
    normalised rows, q's scaled by scale) and dbeta [B, T, HV, NV], and float32 dv [B, T, HV, V]."""
    i_v, i_nh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    NV = tl.num_programs(0)
    i_n, i_h = i_nh // HV, i_nh % HV
    i_hk = i_h // (HV // HK)
    bos, T, boh = _sequence(cu_seqlens, chunk_offsets, i_n, T, BT, IS_VARLEN, True)
    o_k, o_v, o_t, m_k, m_v, m_kv = _tiles(i_v, K, V, BK, BV, BT)
    lower = o_t[:, None] >= o_t[None, :]
    strict = o_t[:, None] > o_t[None, :]
    tile = o_k[:, None] * V + o_v[None, :]
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dh += tl.load(dht + i_nh * K * V + tile, mask=m_kv, other=0.)
    for i_t in range(tl.cdiv(T, BT) - 1, -1, -1):
        rows = bos + i_t * BT + o_t
        m_t = (i_t * BT + o_t) < T
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_q, b_k, b_v, b_gc, b_beta = _load_chunk(q, k, v, g, beta, rows, m_t, o_k, o_v, i_h, i_hk, scale, HV, HK,
                                                   K, V, USE_QK_L2NORM, None, None, False, False)
        b_do = tl.load(do + (rows[:, None] * HV + i_h) * V + o_v[None, :], mask=m_tv, other=0.).to(tl.float32)
        b_h = tl.load(h + ((boh + i_t) * HV + i_h) * K * V + tile, mask=m_kv, other=0.)
        # the chunk's forward
        b_Aqk, b_Akk = _pair_products(b_q, b_k, b_gc, o_t, BT)
        b_T = _unit_lower_inverse(tl.where(strict, b_Akk * b_beta[:, None], 0.), o_t, BT)
        b_gamma = tl.exp(b_gc)
        b_X = b_beta[:, None] * b_gamma * b_k
        b_Y = b_beta[:, None] * b_v
        b_w = tl.dot(b_T, b_X, input_precision=PRECISION)
        b_vn = tl.dot(b_T, b_Y, input_precision=PRECISION) - tl.dot(b_w, b_h, input_precision=PRECISION)
        b_glast = tl.sum(tl.where((o_t == BT - 1)[:, None], b_gc, 0.), 0)
        b_tail = tl.exp(tl.minimum(b_glast[None, :] - b_gc, 0.))
        b_Qg = b_q * b_gamma
        # its backward
        b_dvn = tl.dot(tl.trans(b_Aqk), b_do, input_precision=PRECISION)
        b_dvn = tl.dot(b_k * b_tail, b_dh, b_dvn, input_precision=PRECISION)
        b_dAqk = tl.where(lower, tl.dot(b_do, tl.trans(b_vn), input_precision=PRECISION), 0.)
        b_dQg = tl.dot(b_do, tl.trans(b_h), input_precision=PRECISION)
        b_dkd = tl.dot(b_vn, tl.trans(b_dh), input_precision=PRECISION)
        b_dlast = tl.sum(b_h * b_dh, 1) * tl.exp(b_glast)  # exp(gcum_last)'s gradient times its value [BK]
        b_dw = -tl.dot(b_dvn, tl.trans(b_h), input_precision=PRECISION)
        b_dh = b_dh * tl.exp(b_glast)[:, None]
        b_dh = tl.dot(tl.trans(b_Qg), b_do, b_dh, input_precision=PRECISION)
        b_dh = tl.dot(tl.trans(-b_w), b_dvn, b_dh, input_precision=PRECISION)
        b_Tt = tl.trans(b_T)
        b_dY = tl.dot(b_Tt, b_dvn, input_precision=PRECISION)
        b_dX = tl.dot(b_Tt, b_dw, input_precision=PRECISION)
        b_dT = tl.dot(b_dvn, tl.trans(b_Y), input_precision=PRECISION)
        b_dT = tl.dot(b_dw, tl.trans(b_X), b_dT, input_precision=PRECISION)
        b_dL = -tl.dot(tl.dot(b_Tt, b_dT, input_precision=PRECISION), b_Tt, input_precision=PRECISION)
        b_dL = tl.where(strict, b_dL, 0.)
        b_dAkk = b_dL * b_beta[:, None]
        b_dbeta = tl.sum(b_dL * b_Akk, 1) + tl.sum(b_dY * b_v, 1) + tl.sum(b_dX * b_gamma * b_k, 1)
        b_dq = b_dQg * b_gamma
        b_kdk = b_k * b_tail * b_dkd  # exp(gcum_last - gcum_i)'s gradient times its value
        b_dk = b_dX * b_beta[:, None] * b_gamma + b_dkd * b_tail
        # g_t's gradient: exp(gcum_i) spans t <= i, exp(gcum_last - gcum_i) t > i, exp(gcum_last) every t
        b_dg = tl.cumsum(b_X * b_dX + b_Qg * b_dQg, 0, reverse=True) + tl.cumsum(b_kdk, 0) - b_kdk + b_dlast[None, :]
        for j in range(BT):
            at_j = (o_t == j)[:, None]
            b_kj = tl.sum(tl.where(at_j, b_k, 0.), 0)
            b_gj = tl.sum(tl.where(at_j, b_gc, 0.), 0)
            b_E = tl.exp(tl.minimum(b_gc - b_gj[None, :], 0.))  # D_ij per channel (rows i < j get no gradient)
            b_aq = tl.sum(tl.where(o_t[None, :] == j, b_dAqk, 0.), 1)
            b_ak = tl.sum(tl.where(o_t[None, :] == j, b_dAkk, 0.), 1)
            b_Ek = b_E * b_kj[None, :]
            b_M = b_aq[:, None] * b_q + b_ak[:, None] * b_k
            b_dq += b_aq[:, None] * b_Ek
            b_dk += b_ak[:, None] * b_Ek + tl.where(at_j, tl.sum(b_M * b_E, 0)[None, :], 0.)
            # D_ij spans j < t <= i: the pair's gradient times D_ij to every such t
            b_dg += tl.where(o_t[:, None] > j, tl.cumsum(b_M * b_Ek, 0, reverse=True), 0.)
        parts = ((rows[:, None] * HV + i_h) * NV + i_v) * K + o_k[None, :]
        tl.store(dq + parts, b_dq * scale, mask=m_tk)
        tl.store(dk + parts, b_dk, mask=m_tk)
        tl.store(dg + parts, b_dg, mask=m_tk)
        tl.store(dbeta + (rows * HV + i_h) * NV + i_v, b_dbeta, mask=m_t)
        tl.store(dv + (rows[:, None] * HV + i_h) * V + o_v[None, :], b_dY * b_beta[:, None], mask=m_tv)
    if STORE_INITIAL_STATE_GRADIENT:
        tl.store(dh0 + i_nh * K * V + tile, b_dh, mask=m_kv)


def kda_backward(grads, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens, mode,
                 state_dtype):
    """The gradients of kda (kernellab.autograd's contract), chunked whatever the forward's mode (the same
    function). grads {"o": [B, T, HV, V] or None, "final_state": [N, HV, K, V] or None}; the inputs as the
    forward's. The forward's recompute keeps the state at every chunk's start (rounded to state_dtype between chunks,
    as the forward's; the rounding passes the gradient straight through), then chunk_backward_kernel, the V tiles'
    parts summed, and the gated delta rule's qk_gradient (the value heads of a key head summed, the l2
    normalisation's backward). Returns float32 {q, k [B, T, HK, K], v [B, T, HV, V], g [B, T, HV, K],
    beta [B, T, HV], initial_state [N, HV, K, V] (None when it is None)}."""
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    B, T, HK, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    chunk_offsets = None if cu_seqlens is None else prepare_chunk_layout(cu_seqlens, T, CHUNK)[1]
    states = torch.empty(B * num_chunks(B, T, cu_seqlens, CHUNK), HV, K, V, device=q.device, dtype=torch.float32)
    forward = state_arguments(initial_state, False, state_dtype, N, HV, K, V, B, T, cu_seqlens, v)
    h0 = forward.kernel["h0"]
    _chunk_kda(q, k, v, g, beta, scale, forward.kernel, gate_arguments(None, None, False), use_qk_l2norm, cu_seqlens,
               state_dtype, states, chunk_offsets)
    do = torch.zeros_like(v) if grads["o"] is None else grads["o"].contiguous()
    dht = None if grads["final_state"] is None else grads["final_state"].to(torch.float32).contiguous()
    BV = _block_v(K, V)
    NV = triton.cdiv(V, BV)
    empty = lambda *shape: torch.empty(*shape, device=q.device, dtype=torch.float32)  # noqa: E731
    dq, dk, dg = (empty(B, T, HV, NV, K) for _ in range(3))
    dbeta, dv = empty(B, T, HV, NV), empty(B, T, HV, V)
    dh0 = None if h0 is None else empty(N, HV, K, V)
    chunk_backward_kernel[(NV, N * HV)](
        q, k, v, g, beta, states, do, dht, dq, dk, dv, dg, dbeta, dh0, cu_seqlens, chunk_offsets, scale, T, HV=HV,
        HK=HK, K=K, V=V, BK=_block_k(K), BV=BV, BT=CHUNK, USE_QK_L2NORM=use_qk_l2norm,
        PRECISION=dot_precision(q.dtype), num_warps=CHUNK_WARPS)
    norms = (inverse_norms(q), inverse_norms(k)) if use_qk_l2norm else (None, None)
    return dict(q=qk_gradient(dq.sum(3), q, norms[0]), k=qk_gradient(dk.sum(3), k, norms[1]), v=dv, g=dg.sum(3),
                beta=dbeta.sum(3), initial_state=dh0)


def _block_k(K):
    return max(16, triton.next_power_of_2(K))


def _aot_specs(HV, HK, K, V, dtype):
    dt = TRITON_DTYPE[dtype]
    label = f"K={K},V={V},HV={HV},HK={HK},{dt}"
    common = dict(HV=HV, HK=HK, K=K, V=V, BK=_block_k(K), USE_QK_L2NORM=True, IS_VARLEN=True)
    specs = [aot_spec(f"kda.chunk_backward[{label},BT={CHUNK},BV={_block_v(K, V)}]", chunk_backward_kernel,
                      dict(common, BV=_block_v(K, V), BT=CHUNK, USE_FINAL_STATE_GRADIENT=True,
                           STORE_INITIAL_STATE_GRADIENT=True, PRECISION=dot_precision(dtype)),
                      pointers=dict(q=dt, k=dt, v=dt, g="fp32", beta="fp32", h="fp32", do=dt, dht="fp32", dq="fp32",
                                    dk="fp32", dv="fp32", dg="fp32", dbeta="fp32", dh0="fp32", cu_seqlens="i32",
                                    chunk_offsets="i32"),
                      floats=("scale",), num_warps=CHUNK_WARPS)]
    chunk_constexprs = dict(common, BV=_block_v(K, V), BT=CHUNK, USE_INITIAL_STATE=True, STORE_FINAL_STATE=True,
                            STORE_STATES=False, PRECISION=dot_precision(dtype))
    serving = dict(USE_H0_INDEX=False, USE_HT_INDEX=False, KEEP=False, FUSED_GATE=False, BETA_LOGITS=False)
    for state_dtype, state_label in ((torch.float32, ""), (torch.bfloat16, ",state=bf16")):
        pointers = dict(q=dt, k=dt, v=dt, g="fp32", beta="fp32", o=dt, h0=TRITON_DTYPE[state_dtype],
                        ht=TRITON_DTYPE[state_dtype], h="fp32", cu_seqlens="i32", chunk_offsets="i32",
                        **STATE_POINTERS | dict(kept=TRITON_DTYPE[state_dtype]), **GATE_POINTERS)
        specs += [
            aot_spec(f"kda.chunk[{label},BT={CHUNK},BV={_block_v(K, V)}{state_label}]", chunk_kernel,
                     dict(chunk_constexprs, STATE_ROUNDING=STATE_ROUNDING[state_dtype], **serving),
                     pointers=pointers, floats=("scale",), num_warps=CHUNK_WARPS),
            aot_spec(f"kda.recurrent[{label},BV=32{state_label}]", recurrent_kernel,
                     recurrent_constexprs(HV, HK, K, V, state_dtype, pool=False, keep=False, fused=False,
                                          key_gate=True),
                     pointers=recurrent_pointers(dt, state_dtype), floats=("scale",))]
    # serving: a pool in place, chunk states (a prefix cache) and fused gating in the chunked kernel; decode on a
    # pool with fused gating
    specs += [
        aot_spec(f"kda.chunk[{label},BT={CHUNK},BV={_block_v(K, V)},pool,chunk states,fused gate]", chunk_kernel,
                 dict(chunk_constexprs, STATE_ROUNDING=0, USE_H0_INDEX=True, USE_HT_INDEX=True, KEEP=True,
                      FUSED_GATE=True, BETA_LOGITS=True),
                 pointers=pointers | dict(h0="fp32", ht="fp32", kept="fp32"), floats=("scale",),
                 num_warps=CHUNK_WARPS),
        aot_spec(f"kda.recurrent[{label},BV=32,pool,fused gate]", recurrent_kernel,
                 recurrent_constexprs(HV, HK, K, V, torch.float32, pool=True, keep=False, fused=True, key_gate=True),
                 pointers=recurrent_pointers(dt, torch.float32), floats=("scale",))]
    return specs


# Kimi Linear (48B-A3B: 32 heads, Hk = Hv, K = V = 128) and FlashKDA's benchmark heads (96), bf16.
AOT_SPECS = _aot_specs(32, 32, 128, 128, torch.bfloat16) + _aot_specs(96, 96, 128, 128, torch.bfloat16)
