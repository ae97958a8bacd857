"""Scalar-gated linear attention, one token at a time."""
import torch

from reference._common import f64, sequences, stored, stored_state_dtype


def linear_attention(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                     mode="auto", state_dtype=None):
    """q, k [B, T, H, K]; v [B, T, H, V]; g None or [B, T, H]; initial_state [N, H, K, V].

    Per head: S_t = exp(g_t) S_{t-1} + k_t v_t^T;  o_t = scale S_t^T q_t.
    Returns o [B, T, H, V] in v's dtype and the final states [N, H, K, V] in state_dtype (or None). Every mode runs
    the token loop (the same function); the state is rounded to state_dtype after every
    token's output."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    dtype = stored_state_dtype(v, state_dtype)
    q, k, vv, g, s0 = f64(q, k, v, g, initial_state)
    o = torch.zeros(B, T, H, V, dtype=torch.float64, device=q.device)
    finals = []
    for n, (b, start, end) in enumerate(sequences(B, T, cu_seqlens)):
        S = s0[n].clone() if s0 is not None else torch.zeros(H, K, V, dtype=torch.float64, device=q.device)
        for t in range(start, end):
            decay = torch.ones(H, dtype=torch.float64, device=q.device) if g is None else g[b, t].exp()
            S = decay[:, None, None] * S + k[b, t][:, :, None] * vv[b, t][:, None, :]
            o[b, t] = scale * torch.einsum("hkv,hk->hv", S, q[b, t])
            S = stored(S, dtype)  # the step's output reads the state before it is stored
        finals.append(S)
    final = torch.stack(finals).to(dtype) if output_final_state else None
    return o.to(v.dtype), final
