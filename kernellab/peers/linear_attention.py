"""Peers of the lab's linear attention ops, on the lab's API (BTHD, value head h reads key head h // (Hv // Hk)).

transformers: the pure-torch Gated DeltaNet of Qwen3.5 (torch_chunk_gated_delta_rule, chunk 64, and
torch_recurrent_gated_delta_rule), reached through `__wrapped__` so that no hub kernel replaces it. It computes in
float32, always scales by K^-0.5, and has no packed sequences: a custom scale raises ValueError, and packed
sequences run one at a time.
fla: flash-linear-attention's Triton kernels (GPU only): chunk_gated_delta_rule / fused_recurrent_gated_delta_rule
and chunk_simple_gla, which take the lab's arguments nearly as they are.
"""
import torch

from kernellab.validate import check_state_dtype

__all__ = ["transformers_gated_delta_rule", "fla_gated_delta_rule", "fla_linear_attention"]


def _transformers_functions():
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as qwen

    return {mode: getattr(fn, "__wrapped__", fn) for mode, fn in (
        ("chunk", qwen.torch_chunk_gated_delta_rule), ("recurrent", qwen.torch_recurrent_gated_delta_rule))}


def transformers_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm,
                                  cu_seqlens, mode, state_dtype):
    """q, k [B, T, Hk, K]; v [B, T, Hv, V]; g, beta [B, T, Hv]; initial_state None or [N, Hv, K, V].
    Returns o [B, T, Hv, V] in v's dtype and the final state [N, Hv, K, V] float32 (or None); no other
    state_dtype."""
    check_state_dtype(state_dtype, v, "transformers", "gated_delta_rule")
    K = q.shape[-1]
    if scale != K ** -0.5:
        raise ValueError(f"backend 'transformers' of gated_delta_rule always scales by K^-0.5 = {K ** -0.5}, "
                         f"got scale = {scale}")
    fn = _transformers_functions()[mode]

    def run(s, e, h0):
        return fn(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e], initial_state=h0,
                  output_final_state=True, use_qk_l2norm_in_kernel=use_qk_l2norm)

    if cu_seqlens is None:
        o, state = run(0, q.shape[1], initial_state)
        return o.to(v.dtype), state if output_final_state else None
    B, T, Hv, V = v.shape
    o = torch.empty(B, T, Hv, V, dtype=v.dtype, device=v.device)
    states = []
    bounds = cu_seqlens.tolist()
    for n, (s, e) in enumerate(zip(bounds, bounds[1:])):
        h0 = None if initial_state is None else initial_state[n:n + 1]
        if e == s:  # an empty sequence keeps its state
            states.append(torch.zeros(1, Hv, K, V, device=v.device) if h0 is None else h0.float())
            continue
        o[:, s:e], state = run(s, e, h0)
        states.append(state)
    return o, torch.cat(states) if output_final_state else None


def fla_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens,
                         mode, state_dtype):
    """fla's chunk_gated_delta_rule (mode "chunk") or fused_recurrent_gated_delta_rule ("recurrent"); both take
    [B, T, Hk, K] keys with [B, T, Hv, V] values (grouped value heads) and [N, Hv, K, V] float32 states."""
    check_state_dtype(state_dtype, v, "fla", "gated_delta_rule")
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    fn = chunk_gated_delta_rule if mode == "chunk" else fused_recurrent_gated_delta_rule
    return fn(q, k, v, g=g, beta=beta, scale=scale, initial_state=initial_state,
              output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm,
              cu_seqlens=None if cu_seqlens is None else cu_seqlens.long())


def fla_linear_attention(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, mode, state_dtype):
    """fla's chunk_simple_gla (head-wise scalar gate g [B, T, H] in log space, None for no decay); both modes run
    it (the same function); float32 states only."""
    check_state_dtype(state_dtype, v, "fla", "linear_attention")
    from fla.ops.simple_gla import chunk_simple_gla

    return chunk_simple_gla(q, k, v, g=g, scale=scale, initial_state=initial_state,
                            output_final_state=output_final_state,
                            cu_seqlens=None if cu_seqlens is None else cu_seqlens.long())
