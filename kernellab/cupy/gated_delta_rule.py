"""The gated delta rule as a CuPy array program: sequences padded to whole chunks ([N, Hv, Tp, d]; padding has
k = v = beta = g = 0 and leaves the state alone), then

- chunk: the WY form. A = strict_tril(beta_i e^{G_i - G_j} k_i . k_j); w, u = (I + A)^-1 (beta e^G k, beta v)
  by batched forward substitution over all chunks at once; one batched-matmul step per chunk carries the state
  (h_c = S; v_new = u - w S; S = e^{G_last} S + (e^{G_last - G} k)^T v_new); the outputs
  o = scale (e^G q h_c + tril(q k^T e^{G_i - G_j}) v_new) in two batched matmuls.
- recurrent: one token at a time over all (sequence, head) pairs: batched matrix-vector products and the fused
  state update decay * S + k u^T.
Float32 inside; half-precision inputs are converted at the edge.
"""
from kernellab.validate import check_state_dtype

from kernellab.cupy._array import (array_module, as_array, as_tensor, decay_rank1, l2normalize, pad_sequences,
                                 padded_positions, torch_stream, unpad_sequences)

CHUNK = 64


def _chunk(xp, q, k, v, g, beta, S, scale):
    """q, k [N, H, Tp, K]; v [N, H, Tp, V]; g, beta [N, H, Tp]; S [N, H, K, V] (updated). Returns o like v."""
    N, H, Tp, K = k.shape
    V = v.shape[-1]
    C, nC = CHUNK, Tp // CHUNK
    G = xp.cumsum(g.reshape(N, H, nC, C), axis=-1)
    qc, kc = q.reshape(N, H, nC, C, K), k.reshape(N, H, nC, C, K)
    vc, bc = v.reshape(N, H, nC, C, V), beta.reshape(N, H, nC, C)
    lower = xp.tril(xp.ones((C, C), dtype=bool))
    gate = xp.exp(xp.where(lower, G[..., :, None] - G[..., None, :], -xp.inf)).astype(q.dtype)
    A = xp.tril(xp.matmul(kc, kc.swapaxes(-1, -2)) * gate * bc[..., :, None], -1)
    wu = xp.concatenate([kc * (bc * xp.exp(G))[..., None], vc * bc[..., None]], axis=-1)
    for i in range(1, C):  # forward substitution: row i of (I + A)^-1 applied to [beta e^G k, beta v]
        wu[..., i, :] -= xp.matmul(A[..., i:i + 1, :i], wu[..., :i, :])[..., 0, :]
    w, u = wu[..., :K], wu[..., K:]
    states = xp.empty((N, H, nC, K, V), dtype=q.dtype)
    v_new = xp.empty_like(u)
    for c in range(nC):
        states[:, :, c] = S
        v_new[:, :, c] = u[:, :, c] - xp.matmul(w[:, :, c], S)
        last = G[:, :, c, -1]
        decayed_k = kc[:, :, c] * xp.exp(last[..., None] - G[:, :, c])[..., None]
        S[...] = xp.exp(last)[..., None, None] * S + xp.matmul(decayed_k.swapaxes(-1, -2), v_new[:, :, c])
    o = xp.matmul(qc * xp.exp(G)[..., None], states) + xp.matmul(xp.matmul(qc, kc.swapaxes(-1, -2)) * gate, v_new)
    return scale * o.reshape(N, H, Tp, V)


def _recurrent(xp, q, k, v, g, beta, S, scale):
    """As _chunk, one token at a time."""
    o = xp.empty_like(v)
    for t in range(q.shape[2]):
        decay = xp.exp(g[:, :, t])[..., None, None]
        k_t = k[:, :, t]
        kS = xp.matmul(k_t[:, :, None, :], S)[:, :, 0]
        u = beta[:, :, t, None] * (v[:, :, t] - decay[..., 0] * kS)
        S[...] = decay_rank1(xp, S, decay, k_t[..., None], u[:, :, None, :])
        o[:, :, t] = scale * xp.matmul(q[:, :, t, None, :], S)[:, :, 0]
    return o


def gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens,
                     mode, state_dtype):
    """q, k [B, T, Hk, K]; v [B, T, Hv, V]; g, beta [B, T, Hv]; initial_state [N, Hv, K, V] or None.
    Returns o [B, T, Hv, V] in v's dtype and the float32 final state [N, Hv, K, V] (or None). state_dtype: float32
    only (CuPy has no bfloat16 arrays)."""
    check_state_dtype(state_dtype, v, "cupy", "gated_delta_rule")
    xp = array_module(v)
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    with torch_stream(v.device):
        qa, ka, va, ga, ba = (as_array(t, xp) for t in (q, k, v, g, beta))
        if use_qk_l2norm:
            qa, ka = l2normalize(xp, qa), l2normalize(xp, ka)
        qa, ka = xp.repeat(qa, Hv // Hk, axis=2), xp.repeat(ka, Hv // Hk, axis=2)
        index, valid = padded_positions(xp, B, T, cu_seqlens, CHUNK if mode == "chunk" else 1)
        qp, kp, vp, gp, bp = (pad_sequences(a, index, valid) for a in (qa, ka, va, ga[..., None], ba[..., None]))
        gp, bp = gp[..., 0], bp[..., 0]
        N = index.shape[0]
        S = (xp.zeros((N, Hv, K, V), dtype=xp.float32) if initial_state is None
             else as_array(initial_state, xp).copy())
        program = _chunk if mode == "chunk" else _recurrent
        o = program(xp, qp, kp, vp, gp, bp, S, xp.float32(scale))
        out = as_tensor(unpad_sequences(xp, o, index, valid, B, T)).to(v.dtype)
        return out, (as_tensor(S) if output_final_state else None)
