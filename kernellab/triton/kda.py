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
from kernellab.triton._chunk import STATE_TILE, stored_state
from kernellab.triton.gated_delta_rule import L2NORM_EPS, _recurrent_gated_delta_rule, recurrent_kernel
from kernellab.validate import STATE_ROUNDING

CHUNK = 16  # tl.dot's least size; the C^2 K pair products grow with it
# At 4 warps the chunk kernel takes 255 registers a thread at K = V = 128 (sm_90, no spills yet); 8 warps halve
# the tiles' share.
CHUNK_WARPS = 8


@triton.heuristics({"USE_INITIAL_STATE": given("h0"), "STORE_FINAL_STATE": given("ht"),
                    "IS_VARLEN": given("cu_seqlens")})
@triton.jit(do_not_specialize=["T"])
def chunk_kernel(q, k, v, g, beta, o, h0, ht, cu_seqlens, scale, T, HV: tl.constexpr, HK: tl.constexpr,
                 K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
                 USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, USE_QK_L2NORM: tl.constexpr,
                 IS_VARLEN: tl.constexpr, STATE_ROUNDING: tl.constexpr, PRECISION: tl.constexpr):
    """Chunk by chunk. Grid (cdiv(V, BV), N * HV). q, k [B, T, HK, K]; v, o [B, T, HV, V]; g [B, T, HV, K];
    beta [B, T, HV]; h0, ht [N, HV, K, V] in the state dtype. Rows past a sequence's end load as k = v = 0,
    g = beta = 0: they leave the state as it is and their outputs are not stored."""
    i_v, i_nh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_n, i_h = i_nh // HV, i_nh % HV
    i_hk = i_h // (HV // HK)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
    else:
        bos = i_n * T
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_t = tl.arange(0, BT)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    lower = o_t[:, None] >= o_t[None, :]
    strict = o_t[:, None] > o_t[None, :]
    eye = tl.where(o_t[:, None] == o_t[None, :], 1.0, 0.0)
    state_offsets = i_nh * K * V + o_k[:, None] * V + o_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + state_offsets, mask=m_kv, other=0.).to(tl.float32)
    for t0 in range(0, T, BT):
        rows = bos + t0 + o_t
        m_t = (t0 + o_t) < T
        m_tk = m_t[:, None] & m_k[None, :]
        b_q = tl.load(q + (rows[:, None] * HK + i_hk) * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
        b_k = tl.load(k + (rows[:, None] * HK + i_hk) * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
        if USE_QK_L2NORM:
            b_q = b_q / tl.sqrt(tl.sum(b_q * b_q, 1) + L2NORM_EPS)[:, None]
            b_k = b_k / tl.sqrt(tl.sum(b_k * b_k, 1) + L2NORM_EPS)[:, None]
        b_q = b_q * scale
        b_v = tl.load(v + (rows[:, None] * HV + i_h) * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :],
                      other=0.).to(tl.float32)
        b_g = tl.load(g + (rows[:, None] * HV + i_h) * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
        b_beta = tl.load(beta + rows * HV + i_h, mask=m_t, other=0.).to(tl.float32)
        b_gc = tl.cumsum(b_g, 0)
        # column j of the pair products: row i >= j decays by exp(gcum_i - gcum_j) <= 1 per channel
        b_Aqk = tl.zeros([BT, BT], dtype=tl.float32)
        b_Akk = tl.zeros([BT, BT], dtype=tl.float32)
        for j in range(BT):
            at_j = (o_t == j)[:, None]
            b_kj = tl.sum(tl.where(at_j, b_k, 0.), 0)
            b_gj = tl.sum(tl.where(at_j, b_gc, 0.), 0)
            b_dk = tl.exp(tl.minimum(b_gc - b_gj[None, :], 0.)) * b_kj[None, :]
            b_Aqk = tl.where(o_t[None, :] == j, tl.sum(b_q * b_dk, 1)[:, None], b_Aqk)
            b_Akk = tl.where(o_t[None, :] == j, tl.sum(b_k * b_dk, 1)[:, None], b_Akk)
        b_Aqk = tl.where(lower, b_Aqk, 0.)
        b_L = tl.where(strict, b_Akk * b_beta[:, None], 0.)
        # T = (I + L)^-1, row after row: T_i = e_i - sum_{j < i} L_ij T_j (the rows above are final)
        b_T = eye
        for i in range(1, BT):
            at_i = (o_t == i)[:, None]
            b_li = tl.sum(tl.where(at_i, b_L, 0.), 0)
            b_T = tl.where(at_i, b_T - tl.sum(b_li[:, None] * b_T, 0)[None, :], b_T)
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
    if STORE_FINAL_STATE:
        tl.store(ht + state_offsets, b_h.to(ht.dtype.element_ty), mask=m_kv)


def _block_v(K, V):
    """The V tile: the state slice [BK, BV] within STATE_TILE registers, at least 16 (tl.dot) and no wider than V."""
    BK = triton.next_power_of_2(K)
    return max(16, min(triton.next_power_of_2(V), STATE_TILE // BK))


def _chunk_kda(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens, state_dtype):
    B, T, HK, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    o = torch.empty_like(v)
    final = k.new_empty(N, HV, K, V, dtype=state_dtype) if output_final_state else None
    BV = _block_v(K, V)
    chunk_kernel[(triton.cdiv(V, BV), N * HV)](
        q, k, v, g, beta, o, initial_state, final, cu_seqlens, scale, T, HV=HV, HK=HK, K=K, V=V,
        BK=max(16, triton.next_power_of_2(K)), BV=BV, BT=CHUNK, USE_QK_L2NORM=use_qk_l2norm,
        STATE_ROUNDING=STATE_ROUNDING[state_dtype], PRECISION=dot_precision(q.dtype), num_warps=CHUNK_WARPS)
    return o, final


def kda(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens, mode, state_dtype):
    """q, k [B, T, HK, K]; v [B, T, HV, V]; g [B, T, HV, K]; beta [B, T, HV]; initial_state None or [N, HV, K, V]
    (in state_dtype when given); cu_seqlens None or int [N + 1] (B = 1); mode "chunk" or "recurrent".
    Returns (o [B, T, HV, V] in v's dtype, final state [N, HV, K, V] in state_dtype or None). The state is rounded
    to state_dtype after every chunk (chunk) or token (recurrent); the arithmetic is float32."""
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    h0 = None if initial_state is None else initial_state.to(state_dtype).contiguous()
    run = _chunk_kda if mode == "chunk" else _recurrent_gated_delta_rule
    return run(q, k, v, g, beta, scale, h0, output_final_state, use_qk_l2norm, cu_seqlens, state_dtype)


def _aot_specs(HV, HK, K, V, dtype):
    dt = TRITON_DTYPE[dtype]
    label = f"K={K},V={V},HV={HV},HK={HK},{dt}"
    common = dict(HV=HV, HK=HK, K=K, V=V, BK=triton.next_power_of_2(K), USE_INITIAL_STATE=True,
                  STORE_FINAL_STATE=True, USE_QK_L2NORM=True, IS_VARLEN=True)
    specs = []
    for state_dtype, state_label in ((torch.float32, ""), (torch.bfloat16, ",state=bf16")):
        pointers = dict(q=dt, k=dt, v=dt, g="fp32", beta="fp32", o=dt, h0=TRITON_DTYPE[state_dtype],
                        ht=TRITON_DTYPE[state_dtype], cu_seqlens="i32")
        rounding = STATE_ROUNDING[state_dtype]
        specs += [
            aot_spec(f"kda.chunk[{label},BT={CHUNK},BV={_block_v(K, V)}{state_label}]", chunk_kernel,
                     dict(common, BV=_block_v(K, V), BT=CHUNK, STATE_ROUNDING=rounding,
                          PRECISION=dot_precision(dtype)), pointers=pointers, floats=("scale",),
                     num_warps=CHUNK_WARPS),
            aot_spec(f"kda.recurrent[{label},BV=32{state_label}]", recurrent_kernel,
                     dict(common, BV=32, STATE_ROUNDING=rounding, KEY_GATE=True), pointers=pointers,
                     floats=("scale",))]
    return specs


# Kimi Linear (48B-A3B: 32 heads, Hk = Hv, K = V = 128) and FlashKDA's benchmark heads (96), bf16.
AOT_SPECS = _aot_specs(32, 32, 128, 128, torch.bfloat16) + _aot_specs(96, 96, 128, 128, torch.bfloat16)
