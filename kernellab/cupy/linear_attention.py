"""Scalar-gated linear attention as a CuPy array program, chunked: sequences padded to whole chunks (padding has
k = v = g = 0 and leaves the state alone), then per chunk, with G the cumulative log decay inside it,
    o = scale (e^G q S + tril(q k^T e^{G_i - G_j}) v);  S = e^{G_last} S + (e^{G_last - G} k)^T v,
the intra-chunk part for all chunks at once and the state carried by one batched matmul per chunk."""
from kernellab.cupy._array import (array_module, as_array, as_tensor, pad_sequences, padded_positions, torch_stream,
                                 unpad_sequences)
from kernellab.validate import check_state_dtype

CHUNK = 64


def linear_attention(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, mode, state_dtype):
    """q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H] or None; initial_state [N, H, K, V] or None.
    Returns o [B, T, H, V] in v's dtype and the float32 final state (or None). Both modes run the chunked
    program (the same function). state_dtype: float32 only (CuPy has no bfloat16 arrays)."""
    check_state_dtype(state_dtype, v, "cupy", "linear_attention")
    xp = array_module(v)
    B, T, H, K = q.shape
    V = v.shape[3]
    with torch_stream(v.device):
        qa, ka, va = (as_array(t, xp) for t in (q, k, v))
        ga = xp.zeros((B, T, H), dtype=xp.float32) if g is None else as_array(g, xp)
        index, valid = padded_positions(xp, B, T, cu_seqlens, CHUNK)
        qp, kp, vp, gp = (pad_sequences(a, index, valid) for a in (qa, ka, va, ga[..., None]))
        N, Tp = index.shape
        C, nC = CHUNK, Tp // CHUNK
        G = xp.cumsum(gp[..., 0].reshape(N, H, nC, C), axis=-1)
        qc, kc, vc = qp.reshape(N, H, nC, C, K), kp.reshape(N, H, nC, C, K), vp.reshape(N, H, nC, C, V)
        lower = xp.tril(xp.ones((C, C), dtype=bool))
        gate = xp.exp(xp.where(lower, G[..., :, None] - G[..., None, :], -xp.inf)).astype(xp.float32)
        S = xp.zeros((N, H, K, V), dtype=xp.float32) if initial_state is None else as_array(initial_state, xp).copy()
        states = xp.empty((N, H, nC, K, V), dtype=xp.float32)
        for c in range(nC):
            states[:, :, c] = S
            last = G[:, :, c, -1]
            decayed_k = kc[:, :, c] * xp.exp(last[..., None] - G[:, :, c])[..., None]
            S = xp.exp(last)[..., None, None] * S + xp.matmul(decayed_k.swapaxes(-1, -2), vc[:, :, c])
        o = xp.matmul(qc * xp.exp(G)[..., None], states) + xp.matmul(xp.matmul(qc, kc.swapaxes(-1, -2)) * gate, vc)
        o = xp.float32(scale) * o.reshape(N, H, Tp, V)
        out = as_tensor(unpad_sequences(xp, o, index, valid, B, T)).to(v.dtype)
        return out, (as_tensor(S) if output_final_state else None)
