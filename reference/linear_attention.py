"""Scalar-gated linear attention, one token at a time."""
import torch

from kernellab import serving
from reference._common import f64, stored_state_dtype, token_loop


def linear_attention(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                     mode="auto", state_dtype=None, state_indices=None, output_state_indices=None,
                     output_intermediate_states=False, chunk_states_every=None, A_log=None, dt_bias=None):
    """q, k [B, T, H, K]; v [B, T, H, V]; g None or [B, T, H]; initial_state [N, H, K, V] (a pool [P, H, K, V]
    with state_indices).

    Per head: S_t = exp(g_t) S_{t-1} + k_t v_t^T;  o_t = scale S_t^T q_t.
    Returns o [B, T, H, V] in v's dtype and the final states [N, H, K, V] in state_dtype (or None), and a
    StateTrace with output_intermediate_states or chunk_states_every. Every mode runs the token loop (the same
    function); the state is rounded to state_dtype after every token's output. The serving keywords as
    docs/api.md's (fused gating in float64)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    dtype = stored_state_dtype(v, state_dtype)
    g, _ = serving.gates(g, None, A_log, dt_bias, False, torch.float64)
    q, k, vv, g = f64(q, k, v, g)

    def step(S, b, t):
        decay = torch.ones(H, dtype=torch.float64, device=q.device) if g is None else g[b, t].exp()
        S = decay[:, None, None] * S + k[b, t][:, :, None] * vv[b, t][:, None, :]
        return S, scale * torch.einsum("hkv,hk->hv", S, q[b, t])

    loop = token_loop(step, (B, T, H, K, V), cu_seqlens, dtype, v.dtype, q.device)
    return serving.serve(loop, "reference", serving.CHUNK_MULTIPLE, B, T, initial_state, output_final_state,
                         cu_seqlens, dtype, state_indices, output_state_indices, output_intermediate_states,
                         chunk_states_every)
