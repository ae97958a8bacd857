"""The gated delta rule, one token at a time."""
import torch

from reference._common import f64, sequences, stored, stored_state_dtype


def l2norm(x, eps=1e-6):
    """x / sqrt(sum(x^2) + eps) over the last dim (as fla and transformers do)."""
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)


def gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm=False, cu_seqlens=None, mode="auto", state_dtype=None):
    """q, k [B, T, Hk, K]; v [B, T, Hv, V]; g, beta [B, T, Hv]; initial_state [N, Hv, K, V].

    Value head h reads key head h // (Hv // Hk). Per value head:
      S' = exp(g_t) S_{t-1};  u_t = beta_t (v_t - S'^T k_t);  S_t = S' + k_t u_t^T;  o_t = scale S_t^T q_t.
    `mode` is accepted and ignored: every mode computes this recurrence. The state is rounded to state_dtype after
    every token's output (the rounding of a stored state, in isolation: all arithmetic is float64).
    Returns o [B, T, Hv, V] in v's dtype and the final states [N, Hv, K, V] in state_dtype (or None)."""
    return delta_rule(q, k, v, g.unsqueeze(-1), beta, scale, initial_state, output_final_state, use_qk_l2norm,
                      cu_seqlens, state_dtype)


def delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens, state_dtype):
    """The token loop of the gated delta rule and of KDA (reference/kda.py): g [B, T, Hv, 1] (a decay per head)
    or [B, T, Hv, K] (per key channel); exp(g_t) scales the state's rows, S' = exp(g_t)[:, None] * S, the same
    float64 operations either way."""
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
