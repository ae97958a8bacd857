"""Chunk machinery shared by the chunked linear-attention family (linear_attention, gated_delta_rule).

Time is cut into chunks of BT = 64 tokens. Per chunk and value head, with G the within-chunk cumulative
sum of the log decay g and S the state [K, V] at the chunk start:
    state pass:  S_next = exp(G_last) S + sum_j exp(G_last - G_j) k_j u_j^T     (sequential over chunks)
    output:      o_i = scale (exp(G_i) S^T q_i + sum_{j <= i} exp(G_i - G_j) (q_i . k_j) u_j)
where u = v (linear attention) or u = v_new = u_wy - w S (gated delta rule, w and u_wy from the WY form).

With use_qk_l2norm, q and k stay as given and their inverse norms (float32, one per row) scale the products
in float32 (q_scale, k_scale), so no normalised copy is rounded to the input dtype.

Layout is BTHD throughout. Packed sequences (cu_seqlens) are described on the device by a chunk layout,
built with torch ops only (no host synchronisation): see `prepare_chunk_layout`.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernellab.triton import aot_spec
from kernellab.triton._autotune import TRITON_DTYPE, autotune, dot_precision, given
from kernellab.triton._serving import (GATE_POINTERS, STATE_POINTERS, fused_gate, keep_state, load_state, state_row,
                                     store_state)
from kernellab.validate import STATE_ROUNDING

CHUNK = 64
# fp32 elements of a [BK, BV] state tile kept in registers by one program (64 registers per thread at 4 warps).
STATE_TILE = 128 * 64


def prepare_chunk_layout(cu_seqlens, T, chunk=CHUNK):
    """Chunks of packed sequences, computed on the device without reading cu_seqlens on the host.

    cu_seqlens: int [N + 1]; T: total packed tokens. Returns
      chunk_indices: int32 [T // chunk + N, 2], (sequence, chunk within it) of each chunk in order; the rows
                     past the last real chunk (the count is only bounded on the host) hold (-1, -1);
      chunk_offsets: int32 [N + 1], index of the first chunk of each sequence (exclusive cumsum of counts).
    """
    cu = cu_seqlens.to(torch.int64)
    N = cu.shape[0] - 1
    counts = (cu[1:] - cu[:-1] + chunk - 1) // chunk
    offsets = F.pad(counts.cumsum(0), (1, 0))
    index = torch.arange(T // chunk + N, device=cu.device)
    sequence = torch.searchsorted(offsets[1:], index, right=True)  # skips empty sequences
    real = sequence < N
    local = index - offsets[sequence.clamp(max=N - 1)]
    chunk_indices = torch.stack([torch.where(real, sequence, -1), torch.where(real, local, -1)], dim=1)
    return chunk_indices.to(torch.int32).contiguous(), offsets.to(torch.int32)


def num_chunks(B, T, cu_seqlens, chunk=CHUNK):
    """Programs along the chunk axis: cdiv(T, chunk) per batch row, or the upper bound for packed sequences."""
    return triton.cdiv(T, chunk) if cu_seqlens is None else T // chunk + cu_seqlens.shape[0] - 1


@triton.jit
def _chunk_bounds(cu_seqlens, chunk_indices, i_t, i_b, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(bos, T of the sequence, local chunk index, global chunk index (into h)); local = -1 for a padding chunk."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int64)
        i_local = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int64)
        bos = tl.load(cu_seqlens + tl.maximum(i_n, 0)).to(tl.int64)
        eos = tl.load(cu_seqlens + tl.maximum(i_n, 0) + 1).to(tl.int64)
        return bos, eos - bos, i_local, i_t
    else:
        return i_b * T, T, i_t, i_b * tl.cdiv(T, BT) + i_t


@triton.heuristics({"IS_VARLEN": given("cu_seqlens"), "FUSED_GATE": given("A_log"), "BETA_LOGITS": given("beta")})
@triton.jit(do_not_specialize=["T"])
def chunk_cumsum_kernel(g, g_cum, cu_seqlens, chunk_indices, T, A_log, dt_bias, beta, beta_out, HV: tl.constexpr,
                        BHV: tl.constexpr, BT: tl.constexpr, IS_VARLEN: tl.constexpr, FUSED_GATE: tl.constexpr,
                        BETA_LOGITS: tl.constexpr):
    """g [B, T, HV] -> g_cum float32 [B, T, HV], the cumulative sum within each chunk. Grid (chunks, B).
    The fused gating's prologue (_serving): FUSED_GATE, g holds the raw a, gated by A_log, dt_bias [HV] in float32
    before the sum; BETA_LOGITS, beta_out float32 [B, T, HV] = sigmoid(beta [B, T, HV])."""
    i_t, i_b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    bos, T, i_t, _ = _chunk_bounds(cu_seqlens, chunk_indices, i_t, i_b, T, BT, IS_VARLEN)
    if i_t < 0:
        return
    o_t = i_t * BT + tl.arange(0, BT)
    o_h = tl.arange(0, BHV)
    mask = (o_t < T)[:, None] & (o_h < HV)[None, :]
    offsets = (bos + o_t)[:, None] * HV + o_h[None, :]
    b_g = tl.load(g + offsets, mask=mask, other=0.).to(tl.float32)
    if FUSED_GATE:
        b_g = fused_gate(b_g, tl.load(A_log + o_h, mask=o_h < HV, other=0.)[None, :],
                         tl.load(dt_bias + o_h, mask=o_h < HV, other=0.)[None, :])
    tl.store(g_cum + offsets, tl.cumsum(b_g, axis=0), mask=mask)
    if BETA_LOGITS:
        tl.store(beta_out + offsets, tl.sigmoid(tl.load(beta + offsets, mask=mask, other=0.).to(tl.float32)),
                 mask=mask)


def chunk_cumsum(g, cu_seqlens, chunk_indices, A_log=None, dt_bias=None, beta=None):
    """g [B, T, HV] (any float dtype) -> float32 [B, T, HV] cumulative sums within chunks of CHUNK tokens.
    Fused gating (kernellab/triton/_serving.py): A_log, dt_bias [HV] gate the raw a in g first; beta [B, T, HV]
    logits (or None). Returns (g_cum, sigmoid(beta) float32 [B, T, HV] or None)."""
    B, T, HV = g.shape
    g_cum = torch.empty(B, T, HV, device=g.device, dtype=torch.float32)
    beta_out = None if beta is None else torch.empty_like(g_cum)
    chunk_cumsum_kernel[(num_chunks(B, T, cu_seqlens), B)](
        g, g_cum, cu_seqlens, chunk_indices, T, A_log, dt_bias, beta, beta_out, HV=HV, BHV=triton.next_power_of_2(HV),
        BT=CHUNK, num_warps=4)
    return g_cum, beta_out


@triton.jit
def stored_state(x, STATE_ROUNDING: tl.constexpr):
    """x float32 -> the value a state stored in its state dtype keeps, in float32 (kernellab.validate.STATE_ROUNDING:
    0 float32, 1 bfloat16, 2 float16), rounded to nearest even. bfloat16 on the float32 bits: Triton's interpreter
    truncates its float32 -> bfloat16 conversion (a GPU rounds to nearest), and a truncated state drifts."""
    if STATE_ROUNDING == 1:
        bits = x.to(tl.uint32, bitcast=True)
        x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    elif STATE_ROUNDING == 2:
        x = x.to(tl.float16).to(tl.float32)
    return x


def _fits_state_tile(configs, named_args, **kwargs):
    """Keep the configs whose [BK, BV] state tile fits in registers, and no wider than V needs."""
    args = {**named_args, **kwargs}
    kept = [c for c in configs if args["BK"] * c.kwargs["BV"] <= STATE_TILE
            and c.kwargs["BV"] <= max(16, triton.next_power_of_2(args["V"]))]
    return kept or configs[-1:]


@triton.heuristics({"USE_W": given("w"), "USE_G": given("g"), "USE_K_SCALE": given("k_scale"),
                    "USE_INITIAL_STATE": given("h0"), "STORE_FINAL_STATE": given("ht"),
                    "IS_VARLEN": given("cu_seqlens"), "USE_H0_INDEX": given("h0_index"),
                    "USE_HT_INDEX": given("ht_index"), "KEEP": given("kept")})
@autotune(configs=[triton.Config({"BV": BV}, num_warps=num_warps, num_stages=num_stages)
                   for BV in (64, 32, 16) for num_warps in (4, 8) for num_stages in (2, 3)],
          key=["HV", "HK", "K", "V", "USE_W", "USE_G", "USE_K_SCALE"], prune=_fits_state_tile)
@triton.jit(do_not_specialize=["T", "h0_stride", "ht_stride", "every"])
def chunk_state_kernel(k, v, w, g, k_scale, h, v_new, h0, ht, cu_seqlens, chunk_offsets, T, h0_index, ht_index,
                       h0_stride, ht_stride, kept, kept_offsets, every, HV: tl.constexpr, HK: tl.constexpr,
                       K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       USE_W: tl.constexpr, USE_G: tl.constexpr, USE_K_SCALE: tl.constexpr,
                       USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr,
                       PRECISION: tl.constexpr, STATE_ROUNDING: tl.constexpr, USE_H0_INDEX: tl.constexpr,
                       USE_HT_INDEX: tl.constexpr, KEEP: tl.constexpr):
    """The sequential pass over chunks. One program per (V tile, sequence, value head) keeps the state
    [BK = K padded, BV] in float32 registers and walks its sequence chunk by chunk, rounding it after every chunk
    to the state dtype (STATE_ROUNDING, stored_state).

    k [B, T, HK, K]; v [B, T, HV, V] (u of the WY form when USE_W); w [B, T, HV, K]; g [B, T, HV] float32
    within-chunk cumsum; k_scale [B, T, HK] float32 (rows of k are k * k_scale); writes h [chunks, HV, K, V]
    (state at each chunk start, in k's dtype), v_new
    [B, T, HV, V] = v - w S (when USE_W), ht [N, HV, K, V] from h0 [N, HV, K, V] in the state dtype.
    The serving keywords (kernellab/triton/_serving.py): h0, ht rows h0_stride / ht_stride apart, read from row
    h0_index[n] and written to row ht_index[n] (-1: zeros read, nothing written); kept: the state after every
    `every`-th whole chunk.
    """
    i_v, i_nh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_n, i_h = i_nh // HV, i_nh % HV
    i_hk = i_h // (HV // HK)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
        boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        bos = i_n * T
        boh = i_n * tl.cdiv(T, BT)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    state_offsets = o_k[:, None] * V + o_v[None, :]
    head_offsets = i_h * K * V + state_offsets

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        h0_row = state_row(h0_index, i_n, USE_H0_INDEX)
        b_h += load_state(h0, h0_row, h0_stride, head_offsets, m_kv, USE_H0_INDEX)
    for i_t in range(tl.cdiv(T, BT)):
        tl.store(h + ((boh + i_t) * HV + i_h) * K * V + state_offsets, b_h.to(h.dtype.element_ty), mask=m_kv)
        rows = bos + i_t * BT + o_t
        m_t = i_t * BT + o_t < T
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(k + (rows * HK + i_hk)[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
        b_v = tl.load(v + (rows * HV + i_h)[:, None] * V + o_v[None, :], mask=m_tv, other=0.).to(tl.float32)
        if USE_W:
            b_w = tl.load(w + (rows * HV + i_h)[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
            b_v -= tl.dot(b_w, b_h.to(b_w.dtype), input_precision=PRECISION)
            tl.store(v_new + (rows * HV + i_h)[:, None] * V + o_v[None, :], b_v.to(v_new.dtype.element_ty),
                     mask=m_tv)
        if USE_G:
            last = tl.minimum((i_t + 1) * BT, T) - 1
            b_g_last = tl.load(g + (bos + last) * HV + i_h)
            b_g = tl.load(g + rows * HV + i_h, mask=m_t, other=0.)
            b_v *= tl.where(m_t, tl.exp(b_g_last - b_g), 0.)[:, None]
            b_h *= tl.exp(b_g_last)
        if USE_K_SCALE:
            b_v *= tl.load(k_scale + rows * HK + i_hk, mask=m_t, other=0.)[:, None]
        b_h = stored_state(tl.dot(tl.trans(b_k), b_v.to(b_k.dtype), b_h, input_precision=PRECISION), STATE_ROUNDING)
        if KEEP:
            if (i_t + 1) * BT <= T:  # whole chunks only
                keep_state(kept, kept_offsets, i_n, i_t + 1, every, head_offsets, b_h, m_kv, HV * K * V)
    if STORE_FINAL_STATE:
        ht_row = state_row(ht_index, i_n, USE_HT_INDEX)
        store_state(ht, ht_row, ht_stride, head_offsets, b_h, m_kv, USE_HT_INDEX)


def chunk_state(k, v, g, states, cu_seqlens, chunk_offsets, w=None, k_scale=None, state_dtype=torch.float32):
    """k [B, T, HK, K]; v [B, T, HV, V]; g None or float32 [B, T, HV] (within-chunk cumsum); w None or
    [B, T, HV, K] (gated delta rule: v is then u of the WY form and v_new = v - w S is returned); k_scale None or
    float32 [B, T, HK], the inverse norms of k's rows; states: the initial and final states (and those kept),
    _serving.state_arguments(..., step=CHUNK).kernel, in state_dtype (the state is rounded to it after every
    chunk). Returns h [chunks, HV, K, V] in k's dtype and v_new [B, T, HV, V] or None; the states go where
    `states` says.
    """
    B, T, HK, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    h = k.new_empty(B * num_chunks(B, T, cu_seqlens), HV, K, V)  # B = 1 when packed
    v_new = torch.empty_like(v) if w is not None else None
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), N * HV)  # noqa: E731
    chunk_state_kernel[grid](
        k=k, v=v, w=w, g=g, k_scale=k_scale, h=h, v_new=v_new, cu_seqlens=cu_seqlens, chunk_offsets=chunk_offsets,
        T=T, **states, HV=HV, HK=HK, K=K, V=V, BT=CHUNK, BK=triton.next_power_of_2(K),
        PRECISION=dot_precision(k.dtype), STATE_ROUNDING=STATE_ROUNDING[state_dtype])
    return h, v_new


@triton.heuristics({"USE_G": given("g"), "USE_QK_SCALE": given("q_scale"), "IS_VARLEN": given("cu_seqlens")})
@autotune(configs=[triton.Config({"BK": BK, "BV": BV}, num_warps=num_warps, num_stages=num_stages)
                   for BK, BV in ((32, 64), (64, 64), (32, 128)) for num_warps in (8, 4) for num_stages in (2, 3)],
          key=["HV", "HK", "K", "V", "USE_G", "USE_QK_SCALE"])
@triton.jit(do_not_specialize=["T"])
def chunk_output_kernel(q, k, v, h, g, q_scale, k_scale, o, cu_seqlens, chunk_indices, scale, T, HV: tl.constexpr,
                        HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                        BV: tl.constexpr, USE_G: tl.constexpr, USE_QK_SCALE: tl.constexpr, IS_VARLEN: tl.constexpr,
                        PRECISION: tl.constexpr):
    """o = scale (exp(G) Q S + (causal(Q K^T) * exp(G_i - G_j)) U) per chunk. Grid (V tiles, chunks, B * HV).

    q, k [B, T, HK, K]; v [B, T, HV, V] (u or v_new); h [chunks, HV, K, V]; g [B, T, HV] float32 cumsum;
    q_scale, k_scale [B, T, HK] float32 inverse row norms (when USE_QK_SCALE); o [B, T, HV, V]. K is read in
    tiles of BK, V in tiles of BV.
    """
    i_v, i_t, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // HV, i_bh % HV
    i_hk = i_h // (HV // HK)
    bos, T, i_t, i_th = _chunk_bounds(cu_seqlens, chunk_indices, i_t, i_b, T, BT, IS_VARLEN)
    if i_t < 0:
        return
    o_t = tl.arange(0, BT)
    rows = bos + i_t * BT + o_t
    m_t = i_t * BT + o_t < T
    o_v = i_v * BV + tl.arange(0, BV)
    m_tv = m_t[:, None] & (o_v < V)[None, :]

    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_q = tl.load(q + (rows * HK + i_hk)[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
        b_k = tl.load(k + (rows * HK + i_hk)[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
        b_h = tl.load(h + (i_th * HV + i_h) * K * V + o_k[:, None] * V + o_v[None, :],
                      mask=(o_k < K)[:, None] & (o_v < V)[None, :], other=0.)
        b_o = tl.dot(b_q, b_h.to(b_q.dtype), b_o, input_precision=PRECISION)
        b_A = tl.dot(b_q, tl.trans(b_k), b_A, input_precision=PRECISION)
    causal = (o_t[:, None] >= o_t[None, :]) & m_t[:, None] & m_t[None, :]
    if USE_G:
        b_g = tl.load(g + rows * HV + i_h, mask=m_t, other=0.)
        b_o *= tl.exp(b_g)[:, None]
        b_A *= tl.exp(tl.where(causal, b_g[:, None] - b_g[None, :], float("-inf")))  # exp(-inf) = 0, no overflow
    else:
        b_A = tl.where(causal, b_A, 0.)
    if USE_QK_SCALE:
        b_rq = tl.load(q_scale + rows * HK + i_hk, mask=m_t, other=0.)
        b_o *= b_rq[:, None]
        b_A *= b_rq[:, None] * tl.load(k_scale + rows * HK + i_hk, mask=m_t, other=0.)[None, :]
    b_v = tl.load(v + (rows * HV + i_h)[:, None] * V + o_v[None, :], mask=m_tv, other=0.)
    b_o = tl.dot(b_A.to(b_v.dtype), b_v, b_o, input_precision=PRECISION)
    tl.store(o + (rows * HV + i_h)[:, None] * V + o_v[None, :], (b_o * scale).to(o.dtype.element_ty), mask=m_tv)


def chunk_output(q, k, v, h, g, scale, cu_seqlens, chunk_indices, q_scale=None, k_scale=None):
    """q, k [B, T, HK, K]; v [B, T, HV, V]; h [chunks, HV, K, V]; g None or float32 [B, T, HV] cumsum.
    q_scale, k_scale: None or float32 [B, T, HK] inverse row norms. Returns o [B, T, HV, V] in v's dtype."""
    B, T, HK, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    o = torch.empty_like(v)
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), num_chunks(B, T, cu_seqlens), B * HV)  # noqa: E731
    chunk_output_kernel[grid](
        q=q, k=k, v=v, h=h, g=g, q_scale=q_scale, k_scale=k_scale, o=o, cu_seqlens=cu_seqlens,
        chunk_indices=chunk_indices, scale=scale, T=T, HV=HV, HK=HK, K=K, V=V, BT=CHUNK,
        PRECISION=dot_precision(q.dtype))
    return o


def aot_specs(prefix, HV, HK, K, V, dtype, use_w, use_g, use_qk_scale):
    """AotSpecs of the shared chunk kernels at one production configuration, with the configs that compile
    for sm_90 without spills (BV = 16 also gives the state pass 8 programs per head on one long sequence; the
    output kernel's K tiles of 64 reach 255 registers and spill, those of 32 take 142)."""
    dt = TRITON_DTYPE[dtype]
    label = f"K={K},V={V},HV={HV},HK={HK},{dt}"
    common = dict(HV=HV, HK=HK, K=K, V=V, BT=CHUNK, IS_VARLEN=False, PRECISION=dot_precision(dtype))
    packing = dict(cu_seqlens="i32", chunk_indices="i32")
    cumsum = dict(g="fp32", g_cum="fp32", beta="fp32", beta_out="fp32", **packing, **GATE_POINTERS)
    state = dict(k=dt, v=dt, w=dt, g="fp32", k_scale="fp32", h=dt, v_new=dt, h0="fp32", ht="fp32", cu_seqlens="i32",
                 chunk_offsets="i32", **STATE_POINTERS)
    state_constexprs = dict(common, BK=triton.next_power_of_2(K), BV=16, USE_W=use_w, USE_G=use_g,
                            USE_K_SCALE=use_qk_scale, USE_INITIAL_STATE=True, STATE_ROUNDING=0)
    return [
        aot_spec(f"{prefix}chunk_cumsum[HV={HV}]", chunk_cumsum_kernel,
                 dict(HV=HV, BHV=triton.next_power_of_2(HV), BT=CHUNK, IS_VARLEN=False, FUSED_GATE=False,
                      BETA_LOGITS=False), pointers=cumsum),
        # serving: the gating fused into the cumsum (a, A_log, dt_bias; beta's logits with the delta rule's beta)
        aot_spec(f"{prefix}chunk_cumsum[HV={HV},fused gate]", chunk_cumsum_kernel,
                 dict(HV=HV, BHV=triton.next_power_of_2(HV), BT=CHUNK, IS_VARLEN=True, FUSED_GATE=True,
                      BETA_LOGITS=use_w), pointers=cumsum),
        aot_spec(f"{prefix}chunk_state[{label},BV=16]", chunk_state_kernel,
                 dict(state_constexprs, STORE_FINAL_STATE=True, USE_H0_INDEX=False, USE_HT_INDEX=False, KEEP=False),
                 pointers=state, num_warps=4, num_stages=2),
        # serving: a pool's rows read and written in place, the states kept every few chunks (a prefix cache)
        aot_spec(f"{prefix}chunk_state[{label},BV=16,pool,chunk states]", chunk_state_kernel,
                 dict(state_constexprs, IS_VARLEN=True, STORE_FINAL_STATE=True, USE_H0_INDEX=True, USE_HT_INDEX=True,
                      KEEP=True),
                 pointers=state, num_warps=4, num_stages=2),
        aot_spec(f"{prefix}chunk_output[{label},BK=32,BV=64,w8]", chunk_output_kernel,
                 dict(common, BK=32, BV=64, USE_G=use_g, USE_QK_SCALE=use_qk_scale),
                 pointers=dict(q=dt, k=dt, v=dt, h=dt, g="fp32", q_scale="fp32", k_scale="fp32", o=dt, **packing),
                 floats=("scale",), num_warps=8, num_stages=2),
        *backward_aot_specs(prefix, HV, HK, K, V, dtype, use_w, use_g, use_qk_scale),
    ]


def backward_aot_specs(prefix, HV, HK, K, V, dtype, use_w, use_g, use_qk_scale):
    """AotSpecs of the shared backward kernels at one production configuration."""
    dt = TRITON_DTYPE[dtype]
    label = f"K={K},V={V},HV={HV},HK={HK},{dt}"
    common = dict(HV=HV, HK=HK, K=K, V=V, BT=CHUNK, USE_G=use_g, IS_VARLEN=False, PRECISION=dot_precision(dtype))
    packing = dict(cu_seqlens="i32", chunk_indices="i32")
    scales = dict(q_scale="fp32", k_scale="fp32")
    return [
        aot_spec(f"{prefix}chunk_dv[{label},BK=64,BV=64,w4]", chunk_dv_kernel,
                 dict(common, BK=64, BV=64, USE_QK_SCALE=use_qk_scale),
                 pointers=dict(q=dt, k=dt, g="fp32", **scales, do=dt, dv="fp32", **packing), floats=("scale",),
                 num_warps=4, num_stages=2),
        aot_spec(f"{prefix}chunk_dh[{label},BV=16]", chunk_dh_kernel,
                 dict(common, BK=triton.next_power_of_2(K), BV=16, USE_W=use_w, USE_QK_SCALE=use_qk_scale,
                      USE_FINAL_STATE_GRADIENT=True, STORE_INITIAL_STATE_GRADIENT=True),
                 pointers=dict(q=dt, k=dt, w=dt, g="fp32", **scales, do=dt, dv="fp32", dh=dt, dht="fp32", dh0="fp32",
                               cu_seqlens="i32", chunk_offsets="i32"), floats=("scale",), num_warps=4, num_stages=2),
        aot_spec(f"{prefix}chunk_dqkwg[{label},BK={dqkwg_block_k(K)},BV=64,w8]", chunk_dqkwg_kernel,
                 dict(common, BK=dqkwg_block_k(K), BV=64, USE_W=use_w, USE_QK_SCALE=use_qk_scale),
                 pointers=dict(q=dt, k=dt, v=dt, h=dt, g="fp32", **scales, do=dt, dh=dt, dv="fp32", dq="fp32",
                               dk="fp32", dw="fp32", dg="fp32", **packing), floats=("scale",), num_warps=8,
                 num_stages=2),
    ]


# ------------------------------------------------------------------------------------------------ backward
#
# Per chunk and value head, with S0 and S1 the states at the chunk's start and end (h holds S0), q and k the
# (normalised) rows, P = causal(q k^T) * exp(G_i - G_j), u the values the state pass reads (v, or v_new) and dS1
# the gradient of S1:
#   du  = scale P^T do + exp(G_last - G) k dS1                         (chunk_dv_kernel, then chunk_dh_kernel)
#   dS0 = exp(G_last) dS1 + scale (exp(G) q)^T do - w^T du             (chunk_dh_kernel, chunks in reverse)
#   dq  = scale (exp(G) (do S0^T) + (dP * Gamma) k),  dP = do u^T       (chunk_dqkwg_kernel)
#   dk  = exp(G_last - G) (u dS1^T) + scale (dP * Gamma)^T q;  dw = -du S0^T
# and dg: each decay exp(..) holding g_t adds (its gradient x its value) to dg_t: exp(G_i) to t <= i, exp(G_last
# - G_i) to t > i, exp(G_last) to every t, exp(G_i - G_j) to j < t <= i. The last are summed as such (a reverse
# cumulative sum over i, then a sum over j < t: `_pair_decay_gradient`), not as the difference of row and column
# sums of a gradient with respect to G, which cancels in float32.

@triton.jit
def _pair_decay_gradient(b_X, o_t):
    """[BT] dg_t = sum over j < t <= i of X_ij, for X [BT, BT] (the gradients of the decays exp(G_i - G_j) times
    their values)."""
    below = tl.cumsum(b_X, axis=0, reverse=True)  # [t, j]: the sum over i >= t of X_ij
    return tl.sum(tl.where(o_t[None, :] < o_t[:, None], below, 0.), axis=1)


@triton.jit
def _row_factor(x, rows, H, i_h, mask, USE: tl.constexpr):
    """x[rows, i_h] of a float32 [.., H] tensor (zero where masked), or ones where not masked when not USE."""
    if USE:
        return tl.load(x + rows * H + i_h, mask=mask, other=0.)
    else:
        return tl.where(mask, 1., 0.)


@triton.heuristics({"USE_G": given("g"), "USE_QK_SCALE": given("q_scale"), "IS_VARLEN": given("cu_seqlens")})
@autotune(configs=[triton.Config({"BK": BK, "BV": BV}, num_warps=num_warps, num_stages=num_stages)
                   for BK, BV in ((64, 64), (32, 64), (64, 128)) for num_warps in (4, 8) for num_stages in (2, 3)],
          key=["HV", "HK", "K", "V", "USE_G", "USE_QK_SCALE"])
@triton.jit(do_not_specialize=["T"])
def chunk_dv_kernel(q, k, g, q_scale, k_scale, do, dv, cu_seqlens, chunk_indices, scale, T, HV: tl.constexpr,
                    HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                    BV: tl.constexpr, USE_G: tl.constexpr, USE_QK_SCALE: tl.constexpr, IS_VARLEN: tl.constexpr,
                    PRECISION: tl.constexpr):
    """dv = scale P^T do per chunk, P = causal(Q K^T) * exp(G_i - G_j) (rows of q, k scaled by q_scale, k_scale):
    the gradient of the values through the output's intra-chunk term. Grid (chunks, B * HV).

    q, k [B, T, HK, K]; g [B, T, HV] float32 cumsum; do [B, T, HV, V]; writes dv float32 [B, T, HV, V].
    """
    i_t, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // HV, i_bh % HV
    i_hk = i_h // (HV // HK)
    bos, T, i_t, _ = _chunk_bounds(cu_seqlens, chunk_indices, i_t, i_b, T, BT, IS_VARLEN)
    if i_t < 0:
        return
    o_t = tl.arange(0, BT)
    rows = bos + i_t * BT + o_t
    m_t = i_t * BT + o_t < T
    b_At = tl.zeros([BT, BT], dtype=tl.float32)  # [j, i]: k_j . q_i
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_q = tl.load(q + (rows * HK + i_hk)[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
        b_k = tl.load(k + (rows * HK + i_hk)[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
        b_At = tl.dot(b_k, tl.trans(b_q), b_At, input_precision=PRECISION)
    causal = (o_t[:, None] <= o_t[None, :]) & m_t[:, None] & m_t[None, :]
    if USE_G:
        b_g = tl.load(g + rows * HV + i_h, mask=m_t, other=0.)
        b_At *= tl.exp(tl.where(causal, b_g[None, :] - b_g[:, None], float("-inf")))
    else:
        b_At = tl.where(causal, b_At, 0.)
    if USE_QK_SCALE:
        b_At *= (tl.load(k_scale + rows * HK + i_hk, mask=m_t, other=0.)[:, None]
                 * tl.load(q_scale + rows * HK + i_hk, mask=m_t, other=0.)[None, :])
    b_At *= scale
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        b_do = tl.load(do + (rows * HV + i_h)[:, None] * V + o_v[None, :], mask=m_tv, other=0.)
        b_dv = tl.dot(b_At.to(b_do.dtype), b_do, input_precision=PRECISION)
        tl.store(dv + (rows * HV + i_h)[:, None] * V + o_v[None, :], b_dv, mask=m_tv)


@triton.heuristics({"USE_W": given("w"), "USE_G": given("g"), "USE_QK_SCALE": given("q_scale"),
                    "USE_FINAL_STATE_GRADIENT": given("dht"), "STORE_INITIAL_STATE_GRADIENT": given("dh0"),
                    "IS_VARLEN": given("cu_seqlens")})
@autotune(configs=[triton.Config({"BV": BV}, num_warps=num_warps, num_stages=num_stages)
                   for BV in (64, 32, 16) for num_warps in (4, 8) for num_stages in (2, 3)],
          key=["HV", "HK", "K", "V", "USE_W", "USE_G", "USE_QK_SCALE"], prune=_fits_state_tile)
@triton.jit(do_not_specialize=["T"])
def chunk_dh_kernel(q, k, w, g, q_scale, k_scale, do, dv, dh, dht, dh0, cu_seqlens, chunk_offsets, scale, T,
                    HV: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr, USE_W: tl.constexpr, USE_G: tl.constexpr,
                    USE_QK_SCALE: tl.constexpr, USE_FINAL_STATE_GRADIENT: tl.constexpr,
                    STORE_INITIAL_STATE_GRADIENT: tl.constexpr, IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr):
    """The pass over chunks in reverse. One program per (V tile, sequence, value head) keeps the state's gradient
    dS [BK = K padded, BV] in float32 registers, from the final state's gradient back to the initial state's; per
    chunk, last first:
        dh[chunk] = dS                                   (the gradient of the state at the chunk's end)
        dv += exp(G_last - G) k dS                       (in place: dv_local in, the values' gradient out)
        dS = exp(G_last) dS + scale (exp(G) q)^T do - w^T dv

    q, k [B, T, HK, K]; w [B, T, HV, K] (gated delta rule); g [B, T, HV] float32 cumsum; do [B, T, HV, V];
    dv float32 [B, T, HV, V]; writes dh [chunks, HV, K, V] (in k's dtype) and dh0 float32 [N, HV, K, V] from
    dht float32 [N, HV, K, V] (zero when not given).
    """
    i_v, i_nh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_n, i_h = i_nh // HV, i_nh % HV
    i_hk = i_h // (HV // HK)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
        boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        bos = i_n * T
        boh = i_n * tl.cdiv(T, BT)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    state_offsets = o_k[:, None] * V + o_v[None, :]

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dh += tl.load(dht + i_nh * K * V + state_offsets, mask=m_kv, other=0.)
    for i_t in range(tl.cdiv(T, BT) - 1, -1, -1):
        tl.store(dh + ((boh + i_t) * HV + i_h) * K * V + state_offsets, b_dh.to(dh.dtype.element_ty), mask=m_kv)
        rows = bos + i_t * BT + o_t
        m_t = i_t * BT + o_t < T
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(k + (rows * HK + i_hk)[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
        b_q = tl.load(q + (rows * HK + i_hk)[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
        b_do = tl.load(do + (rows * HV + i_h)[:, None] * V + o_v[None, :], mask=m_tv, other=0.).to(tl.float32)
        p_dv = dv + (rows * HV + i_h)[:, None] * V + o_v[None, :]
        b_kf = _row_factor(k_scale, rows, HK, i_hk, m_t, USE_QK_SCALE)
        b_qf = _row_factor(q_scale, rows, HK, i_hk, m_t, USE_QK_SCALE) * scale
        if USE_G:
            last = tl.minimum((i_t + 1) * BT, T) - 1
            b_g_last = tl.load(g + (bos + last) * HV + i_h)
            b_g = tl.load(g + rows * HV + i_h, mask=m_t, other=0.)
            b_kf *= tl.where(m_t, tl.exp(b_g_last - b_g), 0.)
            b_qf *= tl.where(m_t, tl.exp(b_g), 0.)
        b_dv = tl.load(p_dv, mask=m_tv, other=0.)
        b_dv += tl.dot(b_k, b_dh.to(b_k.dtype), input_precision=PRECISION) * b_kf[:, None]
        tl.store(p_dv, b_dv, mask=m_tv)
        if USE_G:
            b_dh *= tl.exp(b_g_last)
        b_dh = tl.dot(tl.trans(b_q), (b_do * b_qf[:, None]).to(b_q.dtype), b_dh, input_precision=PRECISION)
        if USE_W:
            b_w = tl.load(w + (rows * HV + i_h)[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
            b_dh = tl.dot(tl.trans(b_w), (-b_dv).to(b_w.dtype), b_dh, input_precision=PRECISION)
    if STORE_INITIAL_STATE_GRADIENT:
        tl.store(dh0 + i_nh * K * V + state_offsets, b_dh, mask=m_kv)


@triton.heuristics({"USE_W": given("dw"), "USE_G": given("g"), "USE_QK_SCALE": given("q_scale"),
                    "IS_VARLEN": given("cu_seqlens")})
@autotune(configs=[triton.Config({"BV": BV}, num_warps=num_warps, num_stages=num_stages)
                   for BV in (64, 32) for num_warps in (4, 8) for num_stages in (2, 3)],
          key=["HV", "HK", "K", "V", "BK", "USE_W", "USE_G", "USE_QK_SCALE"])
@triton.jit(do_not_specialize=["T"])
def chunk_dqkwg_kernel(q, k, v, h, g, q_scale, k_scale, do, dh, dv, dq, dk, dw, dg, cu_seqlens, chunk_indices, scale,
                       T, HV: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, USE_W: tl.constexpr, USE_G: tl.constexpr,
                       USE_QK_SCALE: tl.constexpr, IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr):
    """The gradients of q, k (of the normalised rows, per value head), w and this K tile's part of g's, per chunk.
    Grid (K tiles, chunks, B * HV).

    q, k [B, T, HK, K]; v [B, T, HV, V] (the values the state pass read: v, or v_new); h, dh [chunks, HV, K, V] (the
    state at each chunk's start, the gradient of the state at its end); g [B, T, HV] float32 cumsum; do
    [B, T, HV, V]; dv float32 [B, T, HV, V] (the gradient of v_new: read for dw). Writes float32 dq, dk
    [B, T, HV, K], dw = -dv S0^T [B, T, HV, K] (gated delta rule), and dg [B, T, HV, K tiles]: the part of g's
    gradient from each K tile (their sum is g's gradient through the output and the state pass).
    """
    i_k, i_t, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // HV, i_bh % HV
    i_hk = i_h // (HV // HK)
    bos, T, i_t, i_th = _chunk_bounds(cu_seqlens, chunk_indices, i_t, i_b, T, BT, IS_VARLEN)
    if i_t < 0:
        return
    o_t = tl.arange(0, BT)
    rows = bos + i_t * BT + o_t
    m_t = i_t * BT + o_t < T
    o_k = i_k * BK + tl.arange(0, BK)
    m_tk = m_t[:, None] & (o_k < K)[None, :]
    state = (i_th * HV + i_h) * K * V

    b_ds = tl.zeros([BT, BT], dtype=tl.float32)  # do u^T
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    if USE_W:
        b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_whole = 0.  # sum(S0 * dS1) over this K tile
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
        b_v = tl.load(v + (rows * HV + i_h)[:, None] * V + o_v[None, :], mask=m_tv, other=0.)
        b_do = tl.load(do + (rows * HV + i_h)[:, None] * V + o_v[None, :], mask=m_tv, other=0.)
        b_h = tl.load(h + state + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.)
        b_dh = tl.load(dh + state + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.)
        b_ds = tl.dot(b_do, tl.trans(b_v.to(b_do.dtype)), b_ds, input_precision=PRECISION)
        b_dq = tl.dot(b_do, tl.trans(b_h.to(b_do.dtype)), b_dq, input_precision=PRECISION)
        b_dk = tl.dot(b_v, tl.trans(b_dh.to(b_v.dtype)), b_dk, input_precision=PRECISION)
        if USE_W:
            b_dv = tl.load(dv + (rows * HV + i_h)[:, None] * V + o_v[None, :], mask=m_tv, other=0.)
            b_dw = tl.dot(b_dv.to(b_v.dtype), tl.trans(b_h.to(b_v.dtype)), b_dw, input_precision=PRECISION)
        if USE_G:
            b_whole += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32))
    b_q = tl.load(q + (rows * HK + i_hk)[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
    b_k = tl.load(k + (rows * HK + i_hk)[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
    b_rq = _row_factor(q_scale, rows, HK, i_hk, m_t, USE_QK_SCALE)
    b_rk = _row_factor(k_scale, rows, HK, i_hk, m_t, USE_QK_SCALE)
    causal = (o_t[:, None] >= o_t[None, :]) & m_t[:, None] & m_t[None, :]
    if USE_G:
        last = tl.minimum((i_t + 1) * BT, T) - 1
        b_g_last = tl.load(g + (bos + last) * HV + i_h)
        b_g = tl.load(g + rows * HV + i_h, mask=m_t, other=0.)
        b_dq *= (scale * tl.where(m_t, tl.exp(b_g), 0.))[:, None]
        b_dk *= tl.where(m_t, tl.exp(b_g_last - b_g), 0.)[:, None]
        # the decays' gradients times the decays: exp(G_i) (t <= i), exp(G_last - G_i) (t > i), exp(G_last) (all)
        suffix = b_rq * tl.sum(b_dq * b_q.to(tl.float32), axis=1)
        prefix = b_rk * tl.sum(b_dk * b_k.to(tl.float32), axis=1)
        b_dg = tl.cumsum(suffix, axis=0, reverse=True) + tl.cumsum(prefix, axis=0) - prefix + b_whole * tl.exp(b_g_last)
        b_E = b_ds * tl.exp(tl.where(causal, b_g[:, None] - b_g[None, :], float("-inf"))) * scale
    else:
        b_dq *= scale
        b_E = tl.where(causal, b_ds, 0.) * scale
    # b_E: the gradient of q_i . k_j (both normalised)
    b_dq = tl.dot((b_E * b_rk[None, :]).to(b_k.dtype), b_k, b_dq, input_precision=PRECISION)
    b_dk = tl.dot(tl.trans((b_E * b_rq[:, None]).to(b_q.dtype)), b_q, b_dk, input_precision=PRECISION)
    p_grad = (rows * HV + i_h)[:, None] * K + o_k[None, :]
    tl.store(dq + p_grad, b_dq, mask=m_tk)
    tl.store(dk + p_grad, b_dk, mask=m_tk)
    if USE_W:
        tl.store(dw + p_grad, -b_dw, mask=m_tk)
    if USE_G:
        b_qk = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * b_rq[:, None] * b_rk[None, :]
        b_dg += _pair_decay_gradient(b_E * b_qk, o_t)  # dP * P: the gradients of exp(G_i - G_j) times their values
        tl.store(dg + (rows * HV + i_h) * tl.num_programs(0) + i_k, b_dg, mask=m_t)


def dqkwg_block_k(K):
    """K tile of chunk_dqkwg_kernel: fixed at launch (not autotuned), since g's gradient comes out in one part
    per K tile."""
    return min(64, max(16, triton.next_power_of_2(K)))


def chunk_dv(q, k, g, do, scale, cu_seqlens, chunk_indices, q_scale=None, k_scale=None):
    """q, k [B, T, HK, K]; g None or float32 [B, T, HV] cumsum; do [B, T, HV, V]; q_scale, k_scale None or float32
    [B, T, HK]. Returns float32 [B, T, HV, V]: scale P^T do per chunk (chunk_dv_kernel)."""
    B, T, HK, K = q.shape
    HV, V = do.shape[2], do.shape[3]
    dv = torch.empty(B, T, HV, V, device=q.device, dtype=torch.float32)
    chunk_dv_kernel[(num_chunks(B, T, cu_seqlens), B * HV)](
        q=q, k=k, g=g, q_scale=q_scale, k_scale=k_scale, do=do, dv=dv, cu_seqlens=cu_seqlens,
        chunk_indices=chunk_indices, scale=scale, T=T, HV=HV, HK=HK, K=K, V=V, BT=CHUNK,
        PRECISION=dot_precision(q.dtype))
    return dv


def chunk_dh(q, k, g, do, dv, scale, final_state_gradient, initial_state_gradient, cu_seqlens, chunk_offsets, w=None,
             q_scale=None, k_scale=None):
    """The reverse pass over chunks (chunk_dh_kernel). q, k [B, T, HK, K]; g None or float32 [B, T, HV] cumsum;
    do [B, T, HV, V]; dv float32 [B, T, HV, V], updated in place from the intra-chunk part to the gradient of the
    values the state pass read; final_state_gradient None or [N, HV, K, V]; initial_state_gradient: whether to
    return the initial state's; w None or [B, T, HV, K] (gated delta rule). Returns dh [chunks, HV, K, V] in k's
    dtype (the gradient of each chunk's end state) and the initial state's gradient float32 [N, HV, K, V] or None.
    """
    B, T, HK, K = k.shape
    HV, V = do.shape[2], do.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    dh = k.new_empty(B * num_chunks(B, T, cu_seqlens), HV, K, V)
    dh0 = k.new_empty(N, HV, K, V, dtype=torch.float32) if initial_state_gradient else None
    dht = None if final_state_gradient is None else final_state_gradient.to(torch.float32).contiguous()
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), N * HV)  # noqa: E731
    chunk_dh_kernel[grid](
        q=q, k=k, w=w, g=g, q_scale=q_scale, k_scale=k_scale, do=do, dv=dv, dh=dh, dht=dht, dh0=dh0,
        cu_seqlens=cu_seqlens, chunk_offsets=chunk_offsets, scale=scale, T=T, HV=HV, HK=HK, K=K, V=V, BT=CHUNK,
        BK=triton.next_power_of_2(K), PRECISION=dot_precision(k.dtype))
    return dh, dh0


def chunk_dqkwg(q, k, v, h, g, do, dh, dv, scale, cu_seqlens, chunk_indices, use_w, q_scale=None, k_scale=None):
    """q, k [B, T, HK, K]; v [B, T, HV, V] (v, or v_new); h, dh [chunks, HV, K, V]; g None or float32 [B, T, HV];
    do [B, T, HV, V]; dv float32 [B, T, HV, V] (read when use_w). Returns float32 dq, dk [B, T, HV, K] (per value
    head, of the normalised rows), dw [B, T, HV, K] or None (not use_w), and g's gradient in parts
    [B, T, HV, K tiles] or None (g None) (chunk_dqkwg_kernel)."""
    B, T, HK, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    BK = dqkwg_block_k(K)
    empty = lambda *shape: torch.empty(*shape, device=q.device, dtype=torch.float32)  # noqa: E731
    dq, dk = empty(B, T, HV, K), empty(B, T, HV, K)
    dw = empty(B, T, HV, K) if use_w else None
    dg = empty(B, T, HV, triton.cdiv(K, BK)) if g is not None else None
    chunk_dqkwg_kernel[(triton.cdiv(K, BK), num_chunks(B, T, cu_seqlens), B * HV)](
        q=q, k=k, v=v, h=h, g=g, q_scale=q_scale, k_scale=k_scale, do=do, dh=dh, dv=dv, dq=dq, dk=dk, dw=dw, dg=dg,
        cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, scale=scale, T=T, HV=HV, HK=HK, K=K, V=V, BT=CHUNK,
        BK=BK, PRECISION=dot_precision(q.dtype))
    return dq, dk, dw, dg
