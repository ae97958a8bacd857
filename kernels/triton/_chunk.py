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

from kernels.triton import aot_spec
from kernels.triton._autotune import TRITON_DTYPE, autotune, dot_precision, given

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


@triton.heuristics({"IS_VARLEN": given("cu_seqlens")})
@triton.jit(do_not_specialize=["T"])
def chunk_cumsum_kernel(g, g_cum, cu_seqlens, chunk_indices, T, HV: tl.constexpr, BHV: tl.constexpr,
                        BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """g [B, T, HV] -> g_cum float32 [B, T, HV], the cumulative sum within each chunk. Grid (chunks, B)."""
    i_t, i_b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    bos, T, i_t, _ = _chunk_bounds(cu_seqlens, chunk_indices, i_t, i_b, T, BT, IS_VARLEN)
    if i_t < 0:
        return
    o_t = i_t * BT + tl.arange(0, BT)
    o_h = tl.arange(0, BHV)
    mask = (o_t < T)[:, None] & (o_h < HV)[None, :]
    offsets = (bos + o_t)[:, None] * HV + o_h[None, :]
    b_g = tl.load(g + offsets, mask=mask, other=0.).to(tl.float32)
    tl.store(g_cum + offsets, tl.cumsum(b_g, axis=0), mask=mask)


def chunk_cumsum(g, cu_seqlens, chunk_indices):
    """g [B, T, HV] (any float dtype) -> float32 [B, T, HV] cumulative sums within chunks of CHUNK tokens."""
    B, T, HV = g.shape
    g_cum = torch.empty(B, T, HV, device=g.device, dtype=torch.float32)
    chunk_cumsum_kernel[(num_chunks(B, T, cu_seqlens), B)](
        g, g_cum, cu_seqlens, chunk_indices, T, HV=HV, BHV=triton.next_power_of_2(HV), BT=CHUNK, num_warps=4)
    return g_cum


def _fits_state_tile(configs, named_args, **kwargs):
    """Keep the configs whose [BK, BV] state tile fits in registers, and no wider than V needs."""
    args = {**named_args, **kwargs}
    kept = [c for c in configs if args["BK"] * c.kwargs["BV"] <= STATE_TILE
            and c.kwargs["BV"] <= max(16, triton.next_power_of_2(args["V"]))]
    return kept or configs[-1:]


@triton.heuristics({"USE_W": given("w"), "USE_G": given("g"), "USE_K_SCALE": given("k_scale"),
                    "USE_INITIAL_STATE": given("h0"), "STORE_FINAL_STATE": given("ht"),
                    "IS_VARLEN": given("cu_seqlens")})
@autotune(configs=[triton.Config({"BV": BV}, num_warps=num_warps, num_stages=num_stages)
                   for BV in (64, 32, 16) for num_warps in (4, 8) for num_stages in (2, 3)],
          key=["HV", "HK", "K", "V", "USE_W", "USE_G", "USE_K_SCALE"], prune=_fits_state_tile)
@triton.jit(do_not_specialize=["T"])
def chunk_state_kernel(k, v, w, g, k_scale, h, v_new, h0, ht, cu_seqlens, chunk_offsets, T, HV: tl.constexpr,
                       HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                       BV: tl.constexpr, USE_W: tl.constexpr, USE_G: tl.constexpr, USE_K_SCALE: tl.constexpr,
                       USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
                       IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr):
    """The sequential pass over chunks. One program per (V tile, sequence, value head) keeps the state
    [BK = K padded, BV] in float32 registers and walks its sequence chunk by chunk.

    k [B, T, HK, K]; v [B, T, HV, V] (u of the WY form when USE_W); w [B, T, HV, K]; g [B, T, HV] float32
    within-chunk cumsum; k_scale [B, T, HK] float32 (rows of k are k * k_scale); writes h [chunks, HV, K, V]
    (state at each chunk start, in k's dtype), v_new
    [B, T, HV, V] = v - w S (when USE_W), ht [N, HV, K, V] float32. h0 [N, HV, K, V] float32.
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

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + i_nh * K * V + state_offsets, mask=m_kv, other=0.)
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
        b_h = tl.dot(tl.trans(b_k), b_v.to(b_k.dtype), b_h, input_precision=PRECISION)
    if STORE_FINAL_STATE:
        tl.store(ht + i_nh * K * V + state_offsets, b_h, mask=m_kv)


def chunk_state(k, v, g, initial_state, output_final_state, cu_seqlens, chunk_offsets, w=None, k_scale=None):
    """k [B, T, HK, K]; v [B, T, HV, V]; g None or float32 [B, T, HV] (within-chunk cumsum); w None or
    [B, T, HV, K] (gated delta rule: v is then u of the WY form and v_new = v - w S is returned); k_scale None or
    float32 [B, T, HK], the inverse norms of k's rows.
    Returns h [chunks, HV, K, V] in k's dtype, v_new [B, T, HV, V] or None, final state [N, HV, K, V] float32 or None.
    """
    B, T, HK, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    h = k.new_empty(B * num_chunks(B, T, cu_seqlens), HV, K, V)  # B = 1 when packed
    v_new = torch.empty_like(v) if w is not None else None
    final = k.new_empty(N, HV, K, V, dtype=torch.float32) if output_final_state else None
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), N * HV)  # noqa: E731
    chunk_state_kernel[grid](
        k=k, v=v, w=w, g=g, k_scale=k_scale, h=h, v_new=v_new, h0=initial_state, ht=final, cu_seqlens=cu_seqlens,
        chunk_offsets=chunk_offsets, T=T, HV=HV, HK=HK, K=K, V=V, BT=CHUNK, BK=triton.next_power_of_2(K),
        PRECISION=dot_precision(k.dtype))
    return h, v_new, final


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
    return [
        aot_spec(f"{prefix}chunk_cumsum[HV={HV}]", chunk_cumsum_kernel,
                 dict(HV=HV, BHV=triton.next_power_of_2(HV), BT=CHUNK, IS_VARLEN=False),
                 pointers=dict(g="fp32", g_cum="fp32", **packing)),
        aot_spec(f"{prefix}chunk_state[{label},BV=16]", chunk_state_kernel,
                 dict(common, BK=triton.next_power_of_2(K), BV=16, USE_W=use_w, USE_G=use_g, USE_K_SCALE=use_qk_scale,
                      USE_INITIAL_STATE=True, STORE_FINAL_STATE=True),
                 pointers=dict(k=dt, v=dt, w=dt, g="fp32", k_scale="fp32", h=dt, v_new=dt, h0="fp32", ht="fp32",
                               cu_seqlens="i32", chunk_offsets="i32"),
                 num_warps=4, num_stages=2),
        aot_spec(f"{prefix}chunk_output[{label},BK=32,BV=64,w8]", chunk_output_kernel,
                 dict(common, BK=32, BV=64, USE_G=use_g, USE_QK_SCALE=use_qk_scale),
                 pointers=dict(q=dt, k=dt, v=dt, h=dt, g="fp32", q_scale="fp32", k_scale="fp32", o=dt, **packing),
                 floats=("scale",), num_warps=8, num_stages=2),
    ]
