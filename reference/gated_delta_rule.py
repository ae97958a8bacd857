"""The gated delta rule, one token at a time."""
import torch

from kernellab import serving
from reference._common import f64, stored_state_dtype, token_loop


def l2norm(x, eps=1e-6):
    """x / sqrt(sum(x^2) + eps) over the last dim (as fla and transformers do)."""
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)


def gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm=False, cu_seqlens=None, mode="auto", state_dtype=None, state_indices=None,
                     output_state_indices=None, output_intermediate_states=False, chunk_states_every=None, A_log=None,
                     dt_bias=None, beta_logits=False):
    """q, k [B, T, Hk, K]; v [B, T, Hv, V]; g, beta [B, T, Hv]; initial_state [N, Hv, K, V] (a pool [P, Hv, K, V]
    with state_indices).

    Value head h reads key head h // (Hv // Hk). Per value head:
      S' = exp(g_t) S_{t-1};  u_t = beta_t (v_t - S'^T k_t);  S_t = S' + k_t u_t^T;  o_t = scale S_t^T q_t.
    `mode` is accepted and ignored: every mode computes this recurrence. The state is rounded to state_dtype after
    every token's output (the rounding of a stored state, in isolation: all arithmetic is float64). The serving
    keywords as docs/api.md's (fused gating in float64).
    Returns o [B, T, Hv, V] in v's dtype and the final states [N, Hv, K, V] in state_dtype (or None), and a
    StateTrace with output_intermediate_states or chunk_states_every."""
    g, beta = serving.gates(g, beta, A_log, dt_bias, beta_logits, torch.float64)
    return delta_rule(q, k, v, g.unsqueeze(-1), beta, scale, initial_state, output_final_state, use_qk_l2norm,
                      cu_seqlens, state_dtype, state_indices, output_state_indices, output_intermediate_states,
                      chunk_states_every)


def delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens, state_dtype,
               state_indices=None, output_state_indices=None, output_intermediate_states=False,
               chunk_states_every=None):
    """The token loop of the gated delta rule and of KDA (reference/kda.py): g [B, T, Hv, 1] (a decay per head)
    or [B, T, Hv, K] (per key channel); exp(g_t) scales the state's rows, S' = exp(g_t)[:, None] * S, the same
    float64 operations either way. The serving keywords through kernellab.serving.serve."""
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    scale = K ** -0.5 if scale is None else scale
    dtype = stored_state_dtype(v, state_dtype)
    q, k, vv, g, beta = f64(q, k, v, g, beta)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    key_head = torch.arange(Hv, device=q.device) // (Hv // Hk)
    q, k = q[:, :, key_head], k[:, :, key_head]  # [B, T, Hv, K]

    def step(S, b, t):
        S = g[b, t].exp()[:, :, None] * S
        u = beta[b, t][:, None] * (vv[b, t] - torch.einsum("hkv,hk->hv", S, k[b, t]))
        S = S + k[b, t][:, :, None] * u[:, None, :]
        return S, scale * torch.einsum("hkv,hk->hv", S, q[b, t])

    loop = token_loop(step, (B, T, Hv, K, V), cu_seqlens, dtype, v.dtype, q.device)
    return serving.serve(loop, "reference", serving.CHUNK_MULTIPLE, B, T, initial_state, output_final_state,
                         cu_seqlens, dtype, state_indices, output_state_indices, output_intermediate_states,
                         chunk_states_every)
