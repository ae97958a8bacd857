"""The gated delta rule in Triton: chunked (prefill, WY/UT form) and recurrent (decode).

Per value head h of HV (key head h // (HV // HK) of HK):
    S' = exp(g_t) S_{t-1};  u_t = beta_t (v_t - S'^T k_t);  S_t = S' + k_t u_t^T;  o_t = scale S_t^T q_t.

Chunked, chunk BT = 64, G = within-chunk cumsum of g, S the state at the chunk start:
    L = strictly lower (diag(beta) K K^T * exp(G_i - G_j)),  T = (I + L)^{-1}      (chunk_kkt_solve_kernel)
    w = T (beta exp(G) K),  u = T (beta V)                                          (chunk_wy_kernel)
    v_new = u - w S;  S_next = exp(G_last) S + K^T (exp(G_last - G) v_new)          (_chunk.chunk_state_kernel)
    o = scale (exp(G) Q S + (causal(Q K^T) * exp(G_i - G_j)) v_new)                (_chunk.chunk_output_kernel)
The inverse is computed as fla does: forward substitution on the four 16 x 16 diagonal blocks, then the
block merge. With use_qk_l2norm the chunked kernels read q and k as given and apply their inverse row norms
(float32, inverse_norm_kernel) to the products, instead of rounding normalised copies to the input dtype.
Recurrent: one program per (sequence, value head, V tile) holds its state slice in registers
and walks its tokens (recurrent_kernel).
"""
import torch
import triton
import triton.language as tl

from kernellab.triton import aot_spec
from kernellab.triton._autotune import TRITON_DTYPE, autotune, dot_precision, given
from kernellab.triton._chunk import (CHUNK, STATE_TILE, _chunk_bounds, _pair_decay_gradient, aot_specs, chunk_cumsum,
                                   chunk_dh, chunk_dqkwg, chunk_dv, chunk_output, chunk_state, dqkwg_block_k,
                                   num_chunks, prepare_chunk_layout, stored_state)
from kernellab.triton._serving import (GATE_POINTERS, STATE_POINTERS, fused_gate, keep_state, load_state, prepare,
                                     state_arguments, state_row, store_state)
from kernellab.validate import STATE_ROUNDING

L2NORM_EPS = tl.constexpr(1e-6)  # use_qk_l2norm: x / sqrt(sum(x^2) + 1e-6), as fla and transformers
SUB = 16  # the diagonal blocks of the forward substitution


@triton.jit(do_not_specialize=["rows"])
def inverse_norm_kernel(x, r, rows, D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr):
    """r = 1 / sqrt(sum(x^2) + L2NORM_EPS) over the last dim, for x [rows, D]; r float32 [rows].
    Grid (cdiv(rows, BR),)."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    mask = (o_r < rows)[:, None] & (o_d < D)[None, :]
    b_x = tl.load(x + o_r[:, None] * D + o_d[None, :], mask=mask, other=0.).to(tl.float32)
    tl.store(r + o_r, 1. / tl.sqrt(tl.sum(b_x * b_x, axis=1) + L2NORM_EPS), mask=o_r < rows)


def inverse_norms(x):
    """x [B, T, H, D] -> float32 [B, T, H]: 1 / sqrt(sum(x^2) + 1e-6) over the last dim (x / that is l2norm(x))."""
    D = x.shape[-1]
    r = torch.empty(x.shape[:-1], device=x.device, dtype=torch.float32)
    rows = r.numel()
    BD = triton.next_power_of_2(D)
    BR = max(1, 4096 // BD)
    inverse_norm_kernel[(triton.cdiv(rows, BR),)](x, r, rows, D=D, BD=BD, BR=BR, num_warps=4)
    return r


@triton.jit
def _gated_block(b_A, b_gi, b_gj, b_si, b_sj, m_i, m_j, DIAG: tl.constexpr):
    """One [SUB, SUB] block of L: s_i s_j exp(G_i - G_j) (k_i . k_j) with s_i = beta_i r_i and s_j = r_j (r the
    inverse norms of k, or 1), zero outside the valid rows and columns (and on and above the diagonal for a
    diagonal block)."""
    mask = m_i[:, None] & m_j[None, :]
    if DIAG:
        o_i = tl.arange(0, b_A.shape[0])
        mask &= o_i[:, None] > o_i[None, :]
    return b_A * tl.exp(tl.where(mask, b_gi[:, None] - b_gj[None, :], float("-inf"))) * b_si[:, None] * b_sj[None, :]


@triton.jit
def _diagonal_inverse(b_L, n_rows, BC: tl.constexpr):
    """(I + L)^{-1} of a strictly lower [BC, BC] block whose first n_rows rows are valid (the rest of L is 0),
    by forward substitution row by row: row i of Y = (I + L)^{-1} - I is -L_i (I + Y), which reads only the
    finished rows j < i of Y since L_ij = 0 for j >= i. Rows 0 and 1 are -L_i already. Each step is one small
    dot (in full float32) instead of two cross-thread reductions."""
    o_i = tl.arange(0, BC)
    eye = tl.where(o_i[:, None] == o_i[None, :], 1., 0.)
    b_Y = -b_L
    for i in range(2, tl.minimum(BC, n_rows)):
        b_row = -tl.dot(b_L, eye + b_Y, input_precision="ieee")
        b_Y = tl.where((o_i == i)[:, None], b_row, b_Y)
    return b_Y + eye


@triton.jit
def _load_scale(x, rows, H, i_h, mask, USE: tl.constexpr):
    """x[rows, i_h] of a float32 [.., H] tensor (zero where masked), or ones when not USE."""
    if USE:
        return tl.load(x + rows * H + i_h, mask=mask, other=0.)
    else:
        return tl.full(rows.shape, 1., tl.float32)


@triton.jit
def _load_rows(x, rows, H, i_h, o_d, D, mask):
    """x[rows, i_h, o_d] of a [.., H, D] tensor, zero where masked."""
    return tl.load(x + (rows * H + i_h)[:, None] * D + o_d[None, :], mask=mask[:, None] & (o_d < D)[None, :],
                   other=0.)


@triton.heuristics({"USE_K_SCALE": given("k_scale"), "IS_VARLEN": given("cu_seqlens")})
@autotune(configs=[triton.Config({"BK": BK}, num_warps=num_warps) for BK in (64, 32) for num_warps in (4, 2)],
          key=["HV", "HK", "K", "USE_K_SCALE"])
@triton.jit(do_not_specialize=["T"])
def chunk_kkt_solve_kernel(k, g, beta, k_scale, A, cu_seqlens, chunk_indices, T, HV: tl.constexpr, HK: tl.constexpr,
                           K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                           USE_K_SCALE: tl.constexpr, IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr):
    """A = (I + L)^{-1} per chunk, L = strictly lower(diag(beta) K K^T * exp(G_i - G_j)). Grid (chunks, B * HV).

    k [B, T, HK, K]; g [B, T, HV] float32 within-chunk cumsum; beta [B, T, HV]; k_scale [B, T, HK] float32
    inverse row norms of k (when USE_K_SCALE); writes A [B, T, HV, BT] on and
    below the diagonal of each chunk (the rest is never read). BT = 4 BC: ten [BC, BC] blocks of K K^T
    accumulate over K tiles of BK, the four diagonal blocks are inverted by forward substitution, then merged.
    """
    i_t, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // HV, i_bh % HV
    i_hk = i_h // (HV // HK)
    bos, T, i_t, _ = _chunk_bounds(cu_seqlens, chunk_indices, i_t, i_b, T, BT, IS_VARLEN)
    if i_t < 0:
        return
    o_i = tl.arange(0, BC)
    t0 = i_t * BT + o_i
    t1, t2, t3 = t0 + BC, t0 + 2 * BC, t0 + 3 * BC
    m0, m1, m2, m3 = t0 < T, t1 < T, t2 < T, t3 < T
    r0, r1, r2, r3 = bos + t0, bos + t1, bos + t2, bos + t3

    b_A00 = tl.zeros([BC, BC], dtype=tl.float32)
    b_A10 = tl.zeros([BC, BC], dtype=tl.float32)
    b_A11 = tl.zeros([BC, BC], dtype=tl.float32)
    b_A20 = tl.zeros([BC, BC], dtype=tl.float32)
    b_A21 = tl.zeros([BC, BC], dtype=tl.float32)
    b_A22 = tl.zeros([BC, BC], dtype=tl.float32)
    b_A30 = tl.zeros([BC, BC], dtype=tl.float32)
    b_A31 = tl.zeros([BC, BC], dtype=tl.float32)
    b_A32 = tl.zeros([BC, BC], dtype=tl.float32)
    b_A33 = tl.zeros([BC, BC], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_k0 = _load_rows(k, r0, HK, i_hk, o_k, K, m0)
        b_k1 = _load_rows(k, r1, HK, i_hk, o_k, K, m1)
        b_k2 = _load_rows(k, r2, HK, i_hk, o_k, K, m2)
        b_k3 = _load_rows(k, r3, HK, i_hk, o_k, K, m3)
        b_A00 = tl.dot(b_k0, tl.trans(b_k0), b_A00, input_precision=PRECISION)
        b_A10 = tl.dot(b_k1, tl.trans(b_k0), b_A10, input_precision=PRECISION)
        b_A11 = tl.dot(b_k1, tl.trans(b_k1), b_A11, input_precision=PRECISION)
        b_A20 = tl.dot(b_k2, tl.trans(b_k0), b_A20, input_precision=PRECISION)
        b_A21 = tl.dot(b_k2, tl.trans(b_k1), b_A21, input_precision=PRECISION)
        b_A22 = tl.dot(b_k2, tl.trans(b_k2), b_A22, input_precision=PRECISION)
        b_A30 = tl.dot(b_k3, tl.trans(b_k0), b_A30, input_precision=PRECISION)
        b_A31 = tl.dot(b_k3, tl.trans(b_k1), b_A31, input_precision=PRECISION)
        b_A32 = tl.dot(b_k3, tl.trans(b_k2), b_A32, input_precision=PRECISION)
        b_A33 = tl.dot(b_k3, tl.trans(b_k3), b_A33, input_precision=PRECISION)

    b_g0 = tl.load(g + r0 * HV + i_h, mask=m0, other=0.)
    b_g1 = tl.load(g + r1 * HV + i_h, mask=m1, other=0.)
    b_g2 = tl.load(g + r2 * HV + i_h, mask=m2, other=0.)
    b_g3 = tl.load(g + r3 * HV + i_h, mask=m3, other=0.)
    b_s0 = _load_scale(k_scale, r0, HK, i_hk, m0, USE_K_SCALE)
    b_s1 = _load_scale(k_scale, r1, HK, i_hk, m1, USE_K_SCALE)
    b_s2 = _load_scale(k_scale, r2, HK, i_hk, m2, USE_K_SCALE)
    b_s3 = _load_scale(k_scale, r3, HK, i_hk, m3, USE_K_SCALE)
    b_b0 = tl.load(beta + r0 * HV + i_h, mask=m0, other=0.).to(tl.float32) * b_s0
    b_b1 = tl.load(beta + r1 * HV + i_h, mask=m1, other=0.).to(tl.float32) * b_s1
    b_b2 = tl.load(beta + r2 * HV + i_h, mask=m2, other=0.).to(tl.float32) * b_s2
    b_b3 = tl.load(beta + r3 * HV + i_h, mask=m3, other=0.).to(tl.float32) * b_s3
    b_A00 = _gated_block(b_A00, b_g0, b_g0, b_b0, b_s0, m0, m0, True)
    b_A10 = _gated_block(b_A10, b_g1, b_g0, b_b1, b_s0, m1, m0, False)
    b_A11 = _gated_block(b_A11, b_g1, b_g1, b_b1, b_s1, m1, m1, True)
    b_A20 = _gated_block(b_A20, b_g2, b_g0, b_b2, b_s0, m2, m0, False)
    b_A21 = _gated_block(b_A21, b_g2, b_g1, b_b2, b_s1, m2, m1, False)
    b_A22 = _gated_block(b_A22, b_g2, b_g2, b_b2, b_s2, m2, m2, True)
    b_A30 = _gated_block(b_A30, b_g3, b_g0, b_b3, b_s0, m3, m0, False)
    b_A31 = _gated_block(b_A31, b_g3, b_g1, b_b3, b_s1, m3, m1, False)
    b_A32 = _gated_block(b_A32, b_g3, b_g2, b_b3, b_s2, m3, m2, False)
    b_A33 = _gated_block(b_A33, b_g3, b_g3, b_b3, b_s3, m3, m3, True)

    b_Ai00 = _diagonal_inverse(b_A00, T - i_t * BT - 0 * BC, BC)
    b_Ai11 = _diagonal_inverse(b_A11, T - i_t * BT - 1 * BC, BC)
    b_Ai22 = _diagonal_inverse(b_A22, T - i_t * BT - 2 * BC, BC)
    b_Ai33 = _diagonal_inverse(b_A33, T - i_t * BT - 3 * BC, BC)
    # Block forward substitution: Ai_rc = -Ai_rr sum_{c <= j < r} L_rj Ai_jc.
    b_Ai10 = -tl.dot(tl.dot(b_Ai11, b_A10, input_precision=PRECISION), b_Ai00, input_precision=PRECISION)
    b_Ai21 = -tl.dot(tl.dot(b_Ai22, b_A21, input_precision=PRECISION), b_Ai11, input_precision=PRECISION)
    b_Ai32 = -tl.dot(tl.dot(b_Ai33, b_A32, input_precision=PRECISION), b_Ai22, input_precision=PRECISION)
    b_Ai20 = -tl.dot(b_Ai22, tl.dot(b_A20, b_Ai00, input_precision=PRECISION)
                     + tl.dot(b_A21, b_Ai10, input_precision=PRECISION), input_precision=PRECISION)
    b_Ai31 = -tl.dot(b_Ai33, tl.dot(b_A31, b_Ai11, input_precision=PRECISION)
                     + tl.dot(b_A32, b_Ai21, input_precision=PRECISION), input_precision=PRECISION)
    b_Ai30 = -tl.dot(b_Ai33, tl.dot(b_A30, b_Ai00, input_precision=PRECISION)
                     + tl.dot(b_A31, b_Ai10, input_precision=PRECISION)
                     + tl.dot(b_A32, b_Ai20, input_precision=PRECISION), input_precision=PRECISION)

    dtype = A.dtype.element_ty
    tl.store(A + (r0 * HV + i_h)[:, None] * BT + o_i[None, :], b_Ai00.to(dtype), mask=m0[:, None])
    tl.store(A + (r1 * HV + i_h)[:, None] * BT + o_i[None, :], b_Ai10.to(dtype), mask=m1[:, None])
    tl.store(A + (r1 * HV + i_h)[:, None] * BT + BC + o_i[None, :], b_Ai11.to(dtype), mask=m1[:, None])
    tl.store(A + (r2 * HV + i_h)[:, None] * BT + o_i[None, :], b_Ai20.to(dtype), mask=m2[:, None])
    tl.store(A + (r2 * HV + i_h)[:, None] * BT + BC + o_i[None, :], b_Ai21.to(dtype), mask=m2[:, None])
    tl.store(A + (r2 * HV + i_h)[:, None] * BT + 2 * BC + o_i[None, :], b_Ai22.to(dtype), mask=m2[:, None])
    tl.store(A + (r3 * HV + i_h)[:, None] * BT + o_i[None, :], b_Ai30.to(dtype), mask=m3[:, None])
    tl.store(A + (r3 * HV + i_h)[:, None] * BT + BC + o_i[None, :], b_Ai31.to(dtype), mask=m3[:, None])
    tl.store(A + (r3 * HV + i_h)[:, None] * BT + 2 * BC + o_i[None, :], b_Ai32.to(dtype), mask=m3[:, None])
    tl.store(A + (r3 * HV + i_h)[:, None] * BT + 3 * BC + o_i[None, :], b_Ai33.to(dtype), mask=m3[:, None])


@triton.heuristics({"USE_K_SCALE": given("k_scale"), "IS_VARLEN": given("cu_seqlens")})
@autotune(configs=[triton.Config({"BK": 64, "BV": 64}, num_warps=num_warps, num_stages=num_stages)
                   for num_warps in (4, 8) for num_stages in (2, 3)],
          key=["HV", "HK", "K", "V", "USE_K_SCALE"])
@triton.jit(do_not_specialize=["T"])
def chunk_wy_kernel(k, v, beta, g, k_scale, A, w, u, cu_seqlens, chunk_indices, T, HV: tl.constexpr,
                    HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                    BV: tl.constexpr, USE_K_SCALE: tl.constexpr, IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr):
    """w = A (beta exp(G) K), u = A (beta V) per chunk (K's rows scaled by k_scale when USE_K_SCALE).
    Grid (chunks, B * HV).

    k [B, T, HK, K]; v [B, T, HV, V]; beta [B, T, HV]; g [B, T, HV] float32 cumsum; A [B, T, HV, BT] from
    chunk_kkt_solve_kernel (only its lower triangle is read); writes w [B, T, HV, K], u [B, T, HV, V].
    """
    i_t, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // HV, i_bh % HV
    i_hk = i_h // (HV // HK)
    bos, T, i_t, _ = _chunk_bounds(cu_seqlens, chunk_indices, i_t, i_b, T, BT, IS_VARLEN)
    if i_t < 0:
        return
    o_t = tl.arange(0, BT)
    m_t = i_t * BT + o_t < T
    rows = bos + i_t * BT + o_t
    b_A = tl.load(A + (rows * HV + i_h)[:, None] * BT + o_t[None, :],
                  mask=m_t[:, None] & (o_t[:, None] >= o_t[None, :]), other=0.)
    b_beta = tl.load(beta + rows * HV + i_h, mask=m_t, other=0.).to(tl.float32)
    b_g = tl.load(g + rows * HV + i_h, mask=m_t, other=0.)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        b_v = _load_rows(v, rows, HV, i_h, o_v, V, m_t)
        b_u = tl.dot(b_A, (b_v * b_beta[:, None]).to(b_A.dtype), input_precision=PRECISION)
        tl.store(u + (rows * HV + i_h)[:, None] * V + o_v[None, :], b_u.to(u.dtype.element_ty),
                 mask=m_t[:, None] & (o_v < V)[None, :])
    b_kscale = b_beta * tl.exp(b_g) * _load_scale(k_scale, rows, HK, i_hk, m_t, USE_K_SCALE)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_k = _load_rows(k, rows, HK, i_hk, o_k, K, m_t)
        b_w = tl.dot(b_A, (b_k * b_kscale[:, None]).to(b_A.dtype), input_precision=PRECISION)
        tl.store(w + (rows * HV + i_h)[:, None] * K + o_k[None, :], b_w.to(w.dtype.element_ty),
                 mask=m_t[:, None] & (o_k < K)[None, :])


def _wy_state(q, k, v, g, beta, states, use_qk_l2norm, cu_seqlens, layout, state_dtype, A_log=None, dt_bias=None,
              BETA_LOGITS=False):
    """The chunked forward up to the output: g's within-chunk cumsum (fused gating first: A_log, dt_bias, beta
    logits), the inverse norms (use_qk_l2norm), the WY inverse A, w, u, and the state pass (h, v_new; the states
    where `states`, _serving.state_arguments(...).kernel, says; stored between chunks in state_dtype). Shared by
    the forward and the backward (which recomputes them from the inputs)."""
    B, T, HK, K = k.shape
    HV = v.shape[2]
    chunk_indices, chunk_offsets = layout if cu_seqlens is not None else (None, None)
    g_cum, beta_sigmoid = chunk_cumsum(g, cu_seqlens, chunk_indices, A_log, dt_bias, beta if BETA_LOGITS else None)
    beta = beta if beta_sigmoid is None else beta_sigmoid
    q_scale, k_scale = (inverse_norms(q), inverse_norms(k)) if use_qk_l2norm else (None, None)
    grid = (num_chunks(B, T, cu_seqlens), B * HV)
    common = dict(cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, T=T, HV=HV, HK=HK, K=K, BT=CHUNK,
                  PRECISION=dot_precision(k.dtype))
    A = k.new_empty(B, T, HV, CHUNK)
    chunk_kkt_solve_kernel[grid](k=k, g=g_cum, beta=beta, k_scale=k_scale, A=A, BC=SUB, **common)
    w = k.new_empty(B, T, HV, K)
    u = torch.empty_like(v)
    chunk_wy_kernel[grid](k=k, v=v, beta=beta, g=g_cum, k_scale=k_scale, A=A, w=w, u=u, V=v.shape[3], **common)
    h, v_new = chunk_state(k, u, g_cum, states, cu_seqlens, chunk_offsets, w=w, k_scale=k_scale,
                           state_dtype=state_dtype)
    return dict(g_cum=g_cum, q_scale=q_scale, k_scale=k_scale, A=A, w=w, h=h, v_new=v_new,
                chunk_indices=chunk_indices, chunk_offsets=chunk_offsets)


def _fits_recurrent_tile(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    kept = [c for c in configs if args["BK"] * c.kwargs["BV"] <= STATE_TILE
            and c.kwargs["BV"] <= max(8, triton.next_power_of_2(args["V"]))]
    return kept or configs[-1:]


@triton.heuristics({"USE_INITIAL_STATE": given("h0"), "STORE_FINAL_STATE": given("ht"),
                    "IS_VARLEN": given("cu_seqlens"), "USE_H0_INDEX": given("h0_index"),
                    "USE_HT_INDEX": given("ht_index"), "KEEP": given("kept"), "FUSED_GATE": given("A_log")})
@autotune(configs=[triton.Config({"BV": BV}, num_warps=num_warps)
                   for BV in (32, 16, 8, 64) for num_warps in (4, 2, 8)],
          key=["HV", "HK", "K", "V"], prune=_fits_recurrent_tile)
@triton.jit(do_not_specialize=["T", "h0_stride", "ht_stride", "every"])
def recurrent_kernel(q, k, v, g, beta, o, h0, ht, cu_seqlens, scale, T, h0_index, ht_index, h0_stride, ht_stride,
                     kept, kept_offsets, every, A_log, dt_bias, HV: tl.constexpr, HK: tl.constexpr, K: tl.constexpr,
                     V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
                     STORE_FINAL_STATE: tl.constexpr, USE_QK_L2NORM: tl.constexpr, IS_VARLEN: tl.constexpr,
                     STATE_ROUNDING: tl.constexpr, KEY_GATE: tl.constexpr, USE_H0_INDEX: tl.constexpr,
                     USE_HT_INDEX: tl.constexpr, KEEP: tl.constexpr, FUSED_GATE: tl.constexpr,
                     BETA_LOGITS: tl.constexpr):
    """Token by token. One program per (V tile, sequence, value head) reads its state slice [BK, BV] once,
    walks the sequence's tokens, and writes the slice once. Grid (cdiv(V, BV), N * HV). The slice stays float32 in
    registers, rounded after each token's output to the state dtype (STATE_ROUNDING, _chunk.stored_state).

    q, k [B, T, HK, K]; v [B, T, HV, V]; g, beta [B, T, HV]; o [B, T, HV, V]; h0, ht in the state dtype (rows
    [HV, K, V] h0_stride / ht_stride elements apart). KEY_GATE (Kimi Delta Attention, kernellab/triton/kda.py):
    g [B, T, HV, K], row d of the state decays by exp(g_t[d]).
    The serving keywords (kernellab/triton/_serving.py): h0_index, ht_index int32 [N] the pool rows read and
    written in place (a program whose row is -1 writes zeros to its outputs and touches no state); kept: the state
    after every `every`-th token; FUSED_GATE: g holds the raw a and A_log [HV], dt_bias [HV] ([HV, K] with KEY_GATE)
    gate it in float32; BETA_LOGITS: beta holds logits (sigmoid in float32).
    """
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
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    head_offsets = i_h * K * V + o_k[:, None] * V + o_v[None, :]
    h0_row = state_row(h0_index, i_n, USE_H0_INDEX)
    if USE_H0_INDEX:
        if h0_row < 0:  # a padding slot
            for t in range(T):
                tl.store(o + ((bos + t) * HV + i_h) * V + o_v, tl.zeros([BV], dtype=o.dtype.element_ty), mask=m_v)
            return
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += load_state(h0, h0_row, h0_stride, head_offsets, m_kv, USE_H0_INDEX)
    if FUSED_GATE:
        b_A_log = tl.load(A_log + i_h)
        if KEY_GATE:
            b_dt_bias = tl.load(dt_bias + i_h * K + o_k, mask=m_k, other=0.)
        else:
            b_dt_bias = tl.load(dt_bias + i_h)
    for t in range(T):
        row = bos + t
        b_q = tl.load(q + (row * HK + i_hk) * K + o_k, mask=m_k, other=0.).to(tl.float32)
        b_k = tl.load(k + (row * HK + i_hk) * K + o_k, mask=m_k, other=0.).to(tl.float32)
        b_v = tl.load(v + (row * HV + i_h) * V + o_v, mask=m_v, other=0.).to(tl.float32)
        if KEY_GATE:
            b_g = tl.load(g + (row * HV + i_h) * K + o_k, mask=m_k, other=0.).to(tl.float32)
        else:
            b_g = tl.load(g + row * HV + i_h).to(tl.float32)
        if FUSED_GATE:
            b_g = fused_gate(b_g, b_A_log, b_dt_bias)
        if KEY_GATE:
            b_g = b_g[:, None]
        b_beta = tl.load(beta + row * HV + i_h).to(tl.float32)
        if BETA_LOGITS:
            b_beta = tl.sigmoid(b_beta)
        if USE_QK_L2NORM:
            b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + L2NORM_EPS)
            b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + L2NORM_EPS)
        b_h *= tl.exp(b_g)
        b_u = b_beta * (b_v - tl.sum(b_h * b_k[:, None], 0))
        b_h += b_k[:, None] * b_u[None, :]
        b_o = tl.sum(b_h * b_q[:, None], 0) * scale
        tl.store(o + (row * HV + i_h) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
        b_h = stored_state(b_h, STATE_ROUNDING)  # after the output: the state as carried to the next token
        if KEEP:
            keep_state(kept, kept_offsets, i_n, t + 1, every, head_offsets, b_h, m_kv, HV * K * V)
    if STORE_FINAL_STATE:
        ht_row = state_row(ht_index, i_n, USE_HT_INDEX)
        store_state(ht, ht_row, ht_stride, head_offsets, b_h, m_kv, USE_HT_INDEX)


def recurrent(q, k, v, g, beta, scale, cu_seqlens, states, gating, use_qk_l2norm, state_dtype):
    """The recurrent kernel's launch (gated delta rule, and kda with g [B, T, HV, K]): q, k [B, T, HK, K]; v
    [B, T, HV, V]; states: _serving.state_arguments(...).kernel; gating: _serving.gate_arguments(...).
    Returns o [B, T, HV, V]; the states go where `states` says."""
    B, T, HK, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    o = torch.empty_like(v)
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), N * HV)  # noqa: E731
    recurrent_kernel[grid](
        q=q, k=k, v=v, g=g, beta=beta, o=o, cu_seqlens=cu_seqlens, scale=scale, T=T, **states, **gating,
        HV=HV, HK=HK, K=K, V=V, BK=triton.next_power_of_2(K), USE_QK_L2NORM=use_qk_l2norm,
        STATE_ROUNDING=STATE_ROUNDING[state_dtype], KEY_GATE=g.ndim == 4)
    return o


def gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens, mode,
                     state_dtype, chunk_layout=None, state_indices=None, output_state_indices=None,
                     output_intermediate_states=False, chunk_states_every=None, A_log=None, dt_bias=None,
                     beta_logits=False):
    """q, k [B, T, HK, K]; v [B, T, HV, V]; g, beta [B, T, HV]; initial_state None or [N, HV, K, V] (in
    state_dtype when given; a pool [P, HV, K, V] with state_indices); cu_seqlens None or int [N + 1] (B = 1); mode
    "chunk" or "recurrent". chunk_layout: optional precomputed `_chunk.prepare_chunk_layout(cu_seqlens, T)`
    (chunked mode), to share between layers.
    Returns (o [B, T, HV, V] in v's dtype, final state [N, HV, K, V] in state_dtype or None), and a StateTrace
    with a trace. The state is rounded to state_dtype after every token (recurrent) or chunk (chunk); the
    arithmetic is float32. The serving keywords (docs/api.md) in the kernels (kernellab/triton/_serving.py): the
    pool's rows read and written in place, the states kept on the way (output_intermediate_states runs the
    recurrent kernel in either mode), fused gating in float32.
    """
    (q, k, v, g, beta), mode, states, gating = prepare(
        q, k, v, g, beta, initial_state, output_final_state, state_dtype, cu_seqlens, mode, CHUNK, state_indices,
        output_state_indices, output_intermediate_states, chunk_states_every, A_log, dt_bias, beta_logits)
    T = q.shape[1]
    if mode == "recurrent":
        o = recurrent(q, k, v, g, beta, scale, cu_seqlens, states.kernel, gating, use_qk_l2norm, state_dtype)
    else:
        if cu_seqlens is not None and chunk_layout is None:
            chunk_layout = prepare_chunk_layout(cu_seqlens, T)
        f = _wy_state(q, k, v, g, beta, states.kernel, use_qk_l2norm, cu_seqlens, chunk_layout, state_dtype,
                      **gating)
        o = chunk_output(q, k, f["v_new"], f["h"], f["g_cum"], scale, cu_seqlens, f["chunk_indices"],
                         q_scale=f["q_scale"], k_scale=f["k_scale"])
    return states.finish(o, output_intermediate_states, output_final_state, state_dtype, cu_seqlens)


# ------------------------------------------------------------------------------------------------ backward
#
# The chunks' backward of _chunk (chunk_dv, chunk_dh, chunk_dqkwg) gives the gradients of q, k through the output
# and the state pass, of v_new (du) and of w (dw); the WY form's backward (chunk_wy_backward_kernel) takes du and dw
# back through u = A (beta v), w = A (beta exp(G) k) and A = (I + L)^-1:
#   d(beta v) = A^T du,   d(beta exp(G) k) = A^T dw,   dL = -strictly_lower(A^T dA A^T),
#   dA = du (beta v)^T + dw (beta exp(G) k)^T,   L_ij = beta_i (k_i . k_j) exp(G_i - G_j).

@triton.heuristics({"USE_K_SCALE": given("k_scale"), "IS_VARLEN": given("cu_seqlens")})
@autotune(configs=[triton.Config({"BK": 64, "BV": 64}, num_warps=num_warps, num_stages=num_stages)
                   for num_warps in (4, 8) for num_stages in (2, 3)],
          key=["HV", "HK", "K", "V", "NK", "USE_K_SCALE"])
@triton.jit(do_not_specialize=["T"])
def chunk_wy_backward_kernel(k, v, beta, g, k_scale, A, dw, dv, dk, dg_parts, dbeta, dg, cu_seqlens, chunk_indices,
                             T, NK: tl.constexpr, HV: tl.constexpr, HK: tl.constexpr, K: tl.constexpr,
                             V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                             USE_K_SCALE: tl.constexpr, IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr):
    """The WY form's backward per chunk and value head. Grid (chunks, B * HV).

    k [B, T, HK, K] (rows scaled by k_scale [B, T, HK] float32 when USE_K_SCALE); v [B, T, HV, V]; beta, g
    [B, T, HV] (g float32 cumsum); A [B, T, HV, BT] (chunk_kkt_solve_kernel's); dw float32 [B, T, HV, K]; in place:
    dv float32 [B, T, HV, V], the gradient of v_new in, v's out, and dk float32 [B, T, HV, K], the normalised k's
    gradient through the output and the state pass in, plus the WY form's out. dg_parts float32 [B, T, HV, NK]
    (chunk_dqkwg_kernel's parts of g's gradient). Writes dbeta and dg float32 [B, T, HV].
    """
    i_t, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // HV, i_bh % HV
    i_hk = i_h // (HV // HK)
    bos, T, i_t, _ = _chunk_bounds(cu_seqlens, chunk_indices, i_t, i_b, T, BT, IS_VARLEN)
    if i_t < 0:
        return
    o_t = tl.arange(0, BT)
    m_t = i_t * BT + o_t < T
    rows = bos + i_t * BT + o_t
    b_At = tl.trans(tl.load(A + (rows * HV + i_h)[:, None] * BT + o_t[None, :],
                            mask=m_t[:, None] & (o_t[:, None] >= o_t[None, :]), other=0.).to(tl.float32))
    b_beta = tl.load(beta + rows * HV + i_h, mask=m_t, other=0.).to(tl.float32)
    b_g = tl.load(g + rows * HV + i_h, mask=m_t, other=0.)
    b_gamma = tl.where(m_t, tl.exp(b_g), 0.)
    b_rk = _load_scale(k_scale, rows, HK, i_hk, m_t, USE_K_SCALE)

    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        p_dv = dv + (rows * HV + i_h)[:, None] * V + o_v[None, :]
        b_v = _load_rows(v, rows, HV, i_h, o_v, V, m_t).to(tl.float32)
        b_du = tl.load(p_dv, mask=m_tv, other=0.)
        b_dbv = tl.dot(b_At, b_du, input_precision=PRECISION)  # d(beta v)
        b_dbeta += tl.sum(b_dbv * b_v, axis=1)
        b_dA = tl.dot(b_du, tl.trans(b_v * b_beta[:, None]), b_dA, input_precision=PRECISION)
        tl.store(p_dv, b_dbv * b_beta[:, None], mask=m_tv)
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    b_suffix = tl.zeros([BT], dtype=tl.float32)  # exp(G_i)'s gradient times exp(G_i), through w
    b_wk = b_beta * b_gamma
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        p_dk = dk + (rows * HV + i_h)[:, None] * K + o_k[None, :]
        b_k = _load_rows(k, rows, HK, i_hk, o_k, K, m_t)
        b_kk = tl.dot(b_k, tl.trans(b_k), b_kk, input_precision=PRECISION)
        b_k = b_k.to(tl.float32) * b_rk[:, None]
        b_dw = tl.load(dw + (rows * HV + i_h)[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
        b_dbk = tl.dot(b_At, b_dw, input_precision=PRECISION)  # d(beta exp(G) k)
        b_dk_dot = tl.sum(b_dbk * b_k, axis=1)
        b_dbeta += b_gamma * b_dk_dot
        b_suffix += b_wk * b_dk_dot
        b_dA = tl.dot(b_dw, tl.trans(b_k * b_wk[:, None]), b_dA, input_precision=PRECISION)
        tl.store(p_dk, tl.load(p_dk, mask=m_tk, other=0.) + b_dbk * b_wk[:, None], mask=m_tk)
    strict = (o_t[:, None] > o_t[None, :]) & m_t[:, None] & m_t[None, :]
    b_dL = -tl.dot(tl.dot(b_At, b_dA, input_precision=PRECISION), b_At, input_precision=PRECISION)
    b_decay = tl.exp(tl.where(strict, b_g[:, None] - b_g[None, :], float("-inf")))
    b_kk *= b_rk[:, None] * b_rk[None, :]
    b_dkk = b_dL * b_decay  # dL * exp(G_i - G_j): beta_i times the gradient of k_i . k_j
    b_dbeta += tl.sum(b_dkk * b_kk, axis=1)
    b_dkk *= b_beta[:, None]
    b_dg = tl.cumsum(b_suffix, axis=0, reverse=True) + _pair_decay_gradient(b_dkk * b_kk, o_t)  # dL * L
    for i_part in range(NK):
        b_dg += tl.load(dg_parts + (rows * HV + i_h) * NK + i_part, mask=m_t, other=0.)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        p_dk = dk + (rows * HV + i_h)[:, None] * K + o_k[None, :]
        b_k = _load_rows(k, rows, HK, i_hk, o_k, K, m_t).to(tl.float32) * b_rk[:, None]
        b_dk = tl.dot(b_dkk, b_k, input_precision=PRECISION) + tl.dot(tl.trans(b_dkk), b_k, input_precision=PRECISION)
        tl.store(p_dk, tl.load(p_dk, mask=m_tk, other=0.) + b_dk, mask=m_tk)
    tl.store(dbeta + rows * HV + i_h, b_dbeta, mask=m_t)
    tl.store(dg + rows * HV + i_h, b_dg, mask=m_t)


@triton.heuristics({"USE_SCALE": given("r")})
@triton.jit(do_not_specialize=["rows"])
def qk_gradient_kernel(dx, x, r, out, rows, G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr,
                       USE_SCALE: tl.constexpr):
    """out = the sum over G value heads of dx, taken back through the l2 normalisation when USE_SCALE: for
    x_hat = x r and d that sum, r (d - x_hat (x_hat . d)). dx float32 [rows, G, D]; x [rows, D]; r float32 [rows]
    (inverse_norm_kernel's); out float32 [rows, D]. Grid (cdiv(rows, BR),)."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    mask = (o_r < rows)[:, None] & (o_d < D)[None, :]
    b_d = tl.zeros([BR, BD], dtype=tl.float32)
    for i_g in range(G):
        b_d += tl.load(dx + (o_r * G + i_g)[:, None] * D + o_d[None, :], mask=mask, other=0.)
    if USE_SCALE:
        b_r = tl.load(r + o_r, mask=o_r < rows, other=0.)
        b_x = tl.load(x + o_r[:, None] * D + o_d[None, :], mask=mask, other=0.).to(tl.float32) * b_r[:, None]
        b_d = (b_d - b_x * tl.sum(b_x * b_d, axis=1)[:, None]) * b_r[:, None]
    tl.store(out + o_r[:, None] * D + o_d[None, :], b_d, mask=mask)


def qk_gradient(dx, x, r):
    """dx float32 [B, T, HV, D] (per value head); x [B, T, HK, D]; r None or float32 [B, T, HK]. Returns float32
    [B, T, HK, D]: the gradient of x (qk_gradient_kernel)."""
    D = x.shape[-1]
    out = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    rows = out.numel() // D
    BD = triton.next_power_of_2(D)
    BR = max(1, 4096 // BD)
    qk_gradient_kernel[(triton.cdiv(rows, BR),)](dx, x, r, out, rows, G=dx.shape[2] // x.shape[2], D=D, BD=BD,
                                                BR=BR, num_warps=4)
    return out


def gated_delta_rule_backward(grads, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm,
                              cu_seqlens, mode, state_dtype, chunk_layout=None):
    """The gradients of gated_delta_rule (kernellab.autograd's contract), chunked whatever the forward's mode (the
    same function); the states recomputed in float32 whatever state_dtype (its rounding passes the gradient
    straight through). grads {"o": [B, T, HV, V] or None, "final_state": [N, HV, K, V] or None}; the inputs as the
    forward's. Recomputes the forward's chunk intermediates, then chunk_dv, the reverse state pass chunk_dh,
    chunk_dqkwg, the WY backward and qk_gradient. Returns float32 {q, k [B, T, HK, K], v [B, T, HV, V], g, beta
    [B, T, HV], initial_state [N, HV, K, V] (None when it is None)}."""
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    B, T, HK, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    h0 = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    if cu_seqlens is not None and chunk_layout is None:
        chunk_layout = prepare_chunk_layout(cu_seqlens, T)
    states = state_arguments(h0, False, torch.float32, N, HV, K, V, B, T, cu_seqlens, v)
    f = _wy_state(q, k, v, g, beta, states.kernel, use_qk_l2norm, cu_seqlens, chunk_layout, torch.float32)
    do = torch.zeros_like(v) if grads["o"] is None else grads["o"].contiguous()
    scales = dict(q_scale=f["q_scale"], k_scale=f["k_scale"])
    dv = chunk_dv(q, k, f["g_cum"], do, scale, cu_seqlens, f["chunk_indices"], **scales)
    dh, dh0 = chunk_dh(q, k, f["g_cum"], do, dv, scale, grads["final_state"], h0 is not None, cu_seqlens,
                       f["chunk_offsets"], w=f["w"], **scales)
    dq, dk, dw, dg_parts = chunk_dqkwg(q, k, f["v_new"], f["h"], f["g_cum"], do, dh, dv, scale, cu_seqlens,
                                       f["chunk_indices"], use_w=True, **scales)
    dbeta, dg = (torch.empty(B, T, HV, device=q.device, dtype=torch.float32) for _ in range(2))
    chunk_wy_backward_kernel[(num_chunks(B, T, cu_seqlens), B * HV)](
        k=k, v=v, beta=beta, g=f["g_cum"], k_scale=f["k_scale"], A=f["A"], dw=dw, dv=dv, dk=dk, dg_parts=dg_parts,
        dbeta=dbeta, dg=dg, cu_seqlens=cu_seqlens, chunk_indices=f["chunk_indices"], T=T, NK=dg_parts.shape[-1],
        HV=HV, HK=HK, K=K, V=V, BT=CHUNK, PRECISION=dot_precision(k.dtype))
    return dict(q=qk_gradient(dq, q, f["q_scale"]), k=qk_gradient(dk, k, f["k_scale"]), v=dv, g=dg, beta=dbeta,
                initial_state=dh0)


def _aot_specs(HV, HK, K, V, dtype):
    dt = TRITON_DTYPE[dtype]
    label = f"K={K},V={V},HV={HV},HK={HK},{dt}"
    common = dict(HV=HV, HK=HK, K=K, BT=CHUNK, USE_K_SCALE=True, IS_VARLEN=False, PRECISION=dot_precision(dtype))
    packing = dict(cu_seqlens="i32", chunk_indices="i32")
    return [
        aot_spec(f"gated_delta_rule.inverse_norm[K={K},{dt}]", inverse_norm_kernel,
                 dict(D=K, BD=triton.next_power_of_2(K), BR=4096 // triton.next_power_of_2(K)),
                 pointers=dict(x=dt, r="fp32")),
        aot_spec(f"gated_delta_rule.chunk_kkt_solve[{label},BK=64]", chunk_kkt_solve_kernel,
                 dict(common, BC=SUB, BK=64),
                 pointers=dict(k=dt, g="fp32", beta="fp32", k_scale="fp32", A=dt, **packing)),
        aot_spec(f"gated_delta_rule.chunk_wy[{label},BK=64,BV=64,w8]", chunk_wy_kernel,
                 dict(common, V=V, BK=64, BV=64),
                 pointers=dict(k=dt, v=dt, beta="fp32", g="fp32", k_scale="fp32", A=dt, w=dt, u=dt, **packing),
                 num_warps=8, num_stages=2),
        *aot_specs("gated_delta_rule.", HV=HV, HK=HK, K=K, V=V, dtype=dtype, use_w=True, use_g=True,
                   use_qk_scale=True),
        aot_spec(f"gated_delta_rule.chunk_wy_backward[{label},BK=64,BV=64,w8]", chunk_wy_backward_kernel,
                 dict(common, V=V, NK=triton.cdiv(K, dqkwg_block_k(K)), BK=64, BV=64),
                 pointers=dict(k=dt, v=dt, beta="fp32", g="fp32", k_scale="fp32", A=dt, dw="fp32", dv="fp32",
                               dk="fp32", dg_parts="fp32", dbeta="fp32", dg="fp32", **packing),
                 num_warps=8, num_stages=2),
        aot_spec(f"gated_delta_rule.qk_gradient[K={K},{dt},G={HV // HK}]", qk_gradient_kernel,
                 dict(G=HV // HK, D=K, BD=triton.next_power_of_2(K), BR=4096 // triton.next_power_of_2(K),
                      USE_SCALE=True),
                 pointers=dict(dx="fp32", x=dt, r="fp32", out="fp32")),
        # the decode kernel with a float32 and a bfloat16 state (rounded every token, half the state's bytes)
        *(aot_spec(f"gated_delta_rule.recurrent[{label},BV=32{state_label}]", recurrent_kernel,
                   recurrent_constexprs(HV, HK, K, V, state_dtype, pool=False, keep=False, fused=False),
                   pointers=recurrent_pointers(dt, state_dtype), floats=("scale",))
          for state_dtype, state_label in ((torch.float32, ""), (torch.bfloat16, ",state=bf16"))),
        # serving: decode on a pool in place with fused gating; a verify keeping every token's state (no write)
        aot_spec(f"gated_delta_rule.recurrent[{label},BV=32,pool,fused gate]", recurrent_kernel,
                 recurrent_constexprs(HV, HK, K, V, torch.float32, pool=True, keep=False, fused=True),
                 pointers=recurrent_pointers(dt, torch.float32), floats=("scale",)),
        aot_spec(f"gated_delta_rule.recurrent[{label},BV=32,pool,verify,fused gate]", recurrent_kernel,
                 dict(recurrent_constexprs(HV, HK, K, V, torch.float32, pool=True, keep=True, fused=True),
                      STORE_FINAL_STATE=False, USE_HT_INDEX=False),
                 pointers=recurrent_pointers(dt, torch.float32), floats=("scale",)),
    ]


def recurrent_constexprs(HV, HK, K, V, state_dtype, pool, keep, fused, key_gate=False):
    """The recurrent kernel's constexprs at BV = 32 for the static table: pool (state_indices in place), keep (the
    state after every token kept), fused (gating and beta's logits in the kernel)."""
    return dict(HV=HV, HK=HK, K=K, V=V, BK=triton.next_power_of_2(K), BV=32, USE_INITIAL_STATE=True,
                STORE_FINAL_STATE=True, USE_QK_L2NORM=True, IS_VARLEN=True, STATE_ROUNDING=STATE_ROUNDING[state_dtype],
                KEY_GATE=key_gate, USE_H0_INDEX=pool, USE_HT_INDEX=pool, KEEP=keep, FUSED_GATE=fused,
                BETA_LOGITS=fused)


def recurrent_pointers(dt, state_dtype):
    """The recurrent kernel's pointer types for the static table: inputs in dt, states in state_dtype."""
    state = TRITON_DTYPE[state_dtype]
    return dict(q=dt, k=dt, v=dt, g="fp32", beta="fp32", o=dt, h0=state, ht=state, cu_seqlens="i32",
                **STATE_POINTERS | dict(kept=state), **GATE_POINTERS)


# Qwen3.5-35B-A3B (HK 16, HV 32) and Qwen3.5-397B-A17B (HK 16, HV 64) at TP1, K = V = 128, bf16.
AOT_SPECS = _aot_specs(32, 16, 128, 128, torch.bfloat16) + _aot_specs(64, 16, 128, 128, torch.bfloat16)
