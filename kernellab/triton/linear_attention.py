"""Chunked scalar-gated linear attention in Triton: the chunk state pass and output of `_chunk`, no inverse.

Per head: S_t = exp(g_t) S_{t-1} + k_t v_t^T;  o_t = scale S_t^T q_t (see kernellab.linear_attention).
Stages (chunk 64): within-chunk cumsum of g -> sequential state pass over chunks -> output.
Backward: the same stages recomputed, then _chunk's backward kernels: dv through the output (chunk_dv), the state
pass in reverse (chunk_dh: dv, the state's gradient per chunk, the initial state's), dq, dk, dg (chunk_dqkwg).
"""
import torch

from kernellab.triton._chunk import (CHUNK, aot_specs, chunk_cumsum, chunk_dh, chunk_dqkwg, chunk_dv, chunk_output,
                                   chunk_state, prepare_chunk_layout)
from kernellab.triton._serving import state_arguments


def _inputs(q, k, v, g, cu_seqlens, chunk_layout, A_log=None, dt_bias=None):
    """Contiguous q, k, v; the chunk layout (packed sequences); g's within-chunk cumsum (fused gating first: A_log,
    dt_bias [H] gate the raw a in g)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    layout = (None, None)
    if cu_seqlens is not None:
        layout = chunk_layout or prepare_chunk_layout(cu_seqlens, q.shape[1])
    g_cum = None if g is None else chunk_cumsum(g.contiguous(), cu_seqlens, layout[0], A_log, dt_bias)[0]
    return q, k, v, layout, g_cum


def linear_attention(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, mode, state_dtype,
                     chunk_layout=None, state_indices=None, output_state_indices=None, chunk_states_every=None,
                     A_log=None, dt_bias=None):
    """q, k [B, T, H, K]; v [B, T, H, V]; g None or [B, T, H]; initial_state None or [N, H, K, V] (in state_dtype
    when given; a pool [P, H, K, V] with state_indices); cu_seqlens None or int [N + 1] (B = 1). Both modes run the
    chunked kernels (the same function), the state rounded to state_dtype after every chunk. chunk_layout: optional
    precomputed `_chunk.prepare_chunk_layout(cu_seqlens, T)`, to share between calls.
    Returns (o [B, T, H, V] in v's dtype, final state [N, H, K, V] in state_dtype or None), and a StateTrace with
    chunk_states_every. The serving keywords (docs/api.md) in the kernels (kernellab/triton/_serving.py), but
    output_intermediate_states (no token-by-token kernel here).
    """
    q, k, v, (chunk_indices, chunk_offsets), g_cum = _inputs(q, k, v, g, cu_seqlens, chunk_layout, A_log, dt_bias)
    B, T, H, K = k.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    states = state_arguments(initial_state, output_final_state, state_dtype, N, H, K, v.shape[3], B, T, cu_seqlens,
                             v, step=CHUNK, state_indices=state_indices, output_state_indices=output_state_indices,
                             chunk_states_every=chunk_states_every)
    h, _ = chunk_state(k, v, g_cum, states.kernel, cu_seqlens, chunk_offsets, state_dtype=state_dtype)
    o = chunk_output(q, k, v, h, g_cum, scale, cu_seqlens, chunk_indices)
    return states.finish(o, False, output_final_state, state_dtype, cu_seqlens)


def linear_attention_backward(grads, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, mode,
                              state_dtype, chunk_layout=None):
    """The gradients of linear_attention (kernellab.autograd's contract): grads {"o": [B, T, H, V] or None,
    "final_state": [N, H, K, V] or None}; the inputs as the forward's. The states are recomputed in float32
    whatever state_dtype (its rounding passes the gradient straight through). Returns float32 {q, k [B, T, H, K], v
    [B, T, H, V], g [B, T, H] (None when g is None), initial_state [N, H, K, V] (None when it is None)}."""
    q, k, v, (chunk_indices, chunk_offsets), g_cum = _inputs(q, k, v, g, cu_seqlens, chunk_layout)
    B, T, H, K = k.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    h0 = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    states = state_arguments(h0, False, torch.float32, N, H, K, v.shape[3], B, T, cu_seqlens, v)
    h, _ = chunk_state(k, v, g_cum, states.kernel, cu_seqlens, chunk_offsets)
    do = torch.zeros_like(v) if grads["o"] is None else grads["o"].contiguous()
    dv = chunk_dv(q, k, g_cum, do, scale, cu_seqlens, chunk_indices)
    dh, dh0 = chunk_dh(q, k, g_cum, do, dv, scale, grads["final_state"], h0 is not None, cu_seqlens, chunk_offsets)
    dq, dk, _, dg_parts = chunk_dqkwg(q, k, v, h, g_cum, do, dh, dv, scale, cu_seqlens, chunk_indices, use_w=False)
    return dict(q=dq, k=dk, v=dv, g=None if g is None else dg_parts.sum(-1), initial_state=dh0)


# Qwen3.5's linear-attention layers at TP1, were they plain gated linear attention: 32 heads, K = V = 128.
AOT_SPECS = aot_specs("linear_attention.", HV=32, HK=32, K=128, V=128, dtype=torch.bfloat16, use_w=False,
                      use_g=True, use_qk_scale=False)
