"""The gated delta rule in vectorised PyTorch (CPU and GPU): chunked (WY / UT form) and token by token.

Chunk form, per value head and chunk, with gcum the within-chunk cumulative log decay, gamma = exp(gcum) and the
state S0 at the chunk's start (see fla's chunk_gated_delta_rule and the DeltaNet papers):
  A = I + strictly_lower(beta_i (k_i . k_j) exp(gcum_i - gcum_j))            unit lower triangular
  u = A^-1 (beta v),  w = A^-1 (beta gamma k)                                 the WY representation
  v_new = u - w S0                                                             the delta-rule correction
  o = (gamma q) S0 + (q k^T * exp(gcum_i - gcum_j), j <= i) v_new
  S1 = exp(gcum_C) S0 + (k exp(gcum_C - gcum))^T v_new
Everything but v_new, o's first term and S1 is computed for all chunks at once; k k^T and q k^T once per key
head (value head h reads key head h // (Hv // Hk)), never on repeated keys. The sequential pass over chunks does
two matmuls per chunk: [w; gamma q] S0 fused in one, then the state write (kernels/torch/linear_attention.py).
"""
import torch

from kernels.torch.linear_attention import (CHUNK_SIZE, ChunkLayout, compute_dtype, decay_matrix, initial_states,
                                            l2norm_, recurrent_pass, state_pass)


def wy_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
               state: torch.Tensor) -> torch.Tensor:
    """Chunk-major inputs: q (already scaled), k [NC, N, Hk, C, K]; v [NC, N, Hk, G, C, V];
    g, beta [NC, N, Hk, G, C]; state [N, Hk * G, K, V], updated in place. Returns o [NC, N, Hk, G, C, V]."""
    NC, N, Hk, C, K = k.shape
    G, V = v.shape[3], v.shape[-1]
    M = N * Hk * G
    gcum = g.cumsum(-1)
    gamma = gcum.exp()
    decay = decay_matrix(gcum)  # [NC, N, Hk, G, C, C]
    kt = k.transpose(-1, -2)
    attn = torch.matmul(q, kt).unsqueeze(3) * decay
    # Only the strict lower triangle of A - I is read (unitriangular solve): no mask needed on the diagonal.
    lower = decay.mul_(torch.matmul(k, kt).unsqueeze(3)).mul_(beta[..., None])
    rhs = torch.empty(NC, N, Hk, G, C, V + K, dtype=v.dtype, device=v.device)
    torch.mul(v, beta[..., None], out=rhs[..., :V])
    torch.mul(k.unsqueeze(3), (beta * gamma)[..., None], out=rhs[..., V:])
    uw = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True)
    reads = torch.empty(NC, N, Hk, G, 2 * C, K, dtype=v.dtype, device=v.device)
    reads[..., :C, :] = uw[..., V:]
    torch.mul(q.unsqueeze(3), gamma[..., None], out=reads[..., C:, :])
    keys = k.unsqueeze(3) * (gcum[..., -1:] - gcum).exp_()[..., None]
    values = uw[..., :V]
    out = state_pass(reads.view(NC, M, 2 * C, K), keys.view(NC, M, C, K), values.view(NC, M, C, V),
                     gamma[..., -1].reshape(NC, M), state.view(M, K, V), delta=True)
    return out.view(NC, N, Hk, G, 2 * C, V)[..., C:, :].add_(torch.matmul(attn, values))


@torch.no_grad()
def gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens, mode,
                     chunk_size=CHUNK_SIZE, **_):
    """q, k [B, T, Hk, K]; v [B, T, Hv, V]; g, beta [B, T, Hv]; initial_state None or [N, Hv, K, V].
    Value head h reads key head h // (Hv // Hk). mode "chunk" (chunks of chunk_size) or "recurrent".
    Returns o [B, T, Hv, V] in v's dtype and the final state [N, Hv, K, V] (float32, float64 for float64
    inputs) or None. Computes in float32 (float64 for float64 inputs)."""
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    G = Hv // Hk
    dtype = compute_dtype(v)
    layout = ChunkLayout.of(B, T, cu_seqlens, chunk_size if mode == "chunk" else 1, q.device)
    NC, N, C = layout.num_chunks, layout.num_seqs, layout.size
    qc, kc = layout.to_chunks(q, dtype), layout.to_chunks(k, dtype)  # [NC, N, Hk, C, K]
    if use_qk_l2norm:
        l2norm_(qc, scale)
        l2norm_(kc)
    else:
        qc.mul_(scale)
    vc = layout.to_chunks(v, dtype).view(NC, N, Hk, G, C, V)
    gc, bc = (layout.to_chunks(x, dtype).view(NC, N, Hk, G, C) for x in (g, beta))
    state = initial_states(initial_state, N, Hv, K, V, dtype, q.device)
    if mode == "chunk":
        o = wy_chunked(qc, kc, vc, gc, bc, state)
    else:
        by_key_head = state.view(N, Hk, G, K, V).transpose(2, 3).contiguous()  # [N, Hk, K, G, V]
        o = recurrent_pass(qc[..., 0, :], kc[..., 0, :], vc[..., 0, :], gc[..., 0], bc[..., 0], by_key_head)
        state.view(N, Hk, G, K, V).copy_(by_key_head.transpose(2, 3))
    o = layout.from_chunks(o.reshape(NC, N, Hv, C, V), v.dtype)
    return o, state if output_final_state else None
