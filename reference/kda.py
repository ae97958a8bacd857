"""Kimi Delta Attention (the gated delta rule with a decay per key channel), one token at a time."""
import torch

from kernellab import serving
from reference.gated_delta_rule import delta_rule


def kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, use_qk_l2norm=False,
        cu_seqlens=None, mode="auto", state_dtype=None, state_indices=None, output_state_indices=None,
        output_intermediate_states=False, chunk_states_every=None, A_log=None, dt_bias=None, beta_logits=False):
    """q, k [B, T, Hk, K]; v [B, T, Hv, V]; g [B, T, Hv, K] (log decay per key channel, <= 0); beta [B, T, Hv];
    initial_state [N, Hv, K, V] (a pool [P, Hv, K, V] with state_indices).

    Value head h reads key head h // (Hv // Hk). Per value head:
      S' = Diag(exp(g_t)) S_{t-1};  u_t = beta_t (v_t - S'^T k_t);  S_t = S' + k_t u_t^T;  o_t = scale S_t^T q_t.
    The gated delta rule's token loop (reference.gated_delta_rule.delta_rule) with exp(g_t) a [K, 1] column
    instead of a scalar: with g equal across K the two compute the same float64 operations (tests/ops/test_kda.py
    checks they agree bitwise). `mode` is accepted and ignored; the state is rounded to state_dtype after every
    token's output, as there. The serving keywords as docs/api.md's (fused gating in float64, dt_bias [Hv, K]).
    Returns o [B, T, Hv, V] in v's dtype and the final states [N, Hv, K, V] in state_dtype (or None), and a
    StateTrace with output_intermediate_states or chunk_states_every."""
    g, beta = serving.gates(g, beta, A_log, dt_bias, beta_logits, torch.float64)
    return delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens,
                      state_dtype, state_indices, output_state_indices, output_intermediate_states,
                      chunk_states_every)
