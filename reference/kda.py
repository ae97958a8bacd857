"""Kimi Delta Attention (the gated delta rule with a decay per key channel), one token at a time."""
import torch

from reference._common import f64, sequences, stored, stored_state_dtype
from reference.gated_delta_rule import l2norm


def kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, use_qk_l2norm=False,
        cu_seqlens=None, mode="auto", state_dtype=None):
    """q, k [B, T, Hk, K]; v [B, T, Hv, V]; g [B, T, Hv, K] (log decay per key channel, <= 0); beta [B, T, Hv];
    initial_state [N, Hv, K, V].

    Value head h reads key head h // (Hv // Hk). Per value head:
      S' = Diag(exp(g_t)) S_{t-1};  u_t = beta_t (v_t - S'^T k_t);  S_t = S' + k_t u_t^T;  o_t = scale S_t^T q_t.
    The gated delta rule's reference with exp(g_t) a [K, 1] column instead of a scalar: with g equal across K the
    two compute the same float64 operations (tests/ops/test_kda.py checks they agree bitwise). `mode` is accepted and
    ignored; the state is rounded to state_dtype after every token's output, as there.
    Returns o [B, T, Hv, V] in v's dtype and the final states [N, Hv, K, V] in state_dtype (or None)."""
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    scale = K ** -0.5 if scale is None else scale
    dtype = stored_state_dtype(v, state_dtype)
    q, k, vv, g, beta, s0 = f64(q, k, v, g, beta, initial_state)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    key_head = torch.arange(Hv, device=q.device) // (Hv // Hk)
    q, k = q[:, :, key_head], k[:, :, key_head]  # [B, T, Hv, K]
    o = torch.zeros(B, T, Hv, V, dtype=torch.float64, device=q.device)
    finals = []
    for n, (b, start, end) in enumerate(sequences(B, T, cu_seqlens)):
        S = s0[n].clone() if s0 is not None else torch.zeros(Hv, K, V, dtype=torch.float64, device=q.device)
        for t in range(start, end):
            S = g[b, t].exp()[:, :, None] * S
            u = beta[b, t][:, None] * (vv[b, t] - torch.einsum("hkv,hk->hv", S, k[b, t]))
            S = S + k[b, t][:, :, None] * u[:, None, :]
            o[b, t] = scale * torch.einsum("hkv,hk->hv", S, q[b, t])
            S = stored(S, dtype)  # the step's output reads the state before it is stored
        finals.append(S)
    final = torch.stack(finals).to(dtype) if output_final_state else None
    return o.to(v.dtype), final
