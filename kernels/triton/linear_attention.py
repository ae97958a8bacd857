"""Chunked scalar-gated linear attention in Triton: the chunk state pass and output of `_chunk`, no inverse.

Per head: S_t = exp(g_t) S_{t-1} + k_t v_t^T;  o_t = scale S_t^T q_t (see kernels.linear_attention).
Stages (chunk 64): within-chunk cumsum of g -> sequential state pass over chunks -> output.
"""
import torch

from kernels.triton._chunk import aot_specs, chunk_cumsum, chunk_output, chunk_state, prepare_chunk_layout


def linear_attention(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, mode, chunk_layout=None):
    """q, k [B, T, H, K]; v [B, T, H, V]; g None or [B, T, H]; initial_state None or float32 [N, H, K, V];
    cu_seqlens None or int [N + 1] (B = 1). Both modes run the chunked kernels (the same function).
    chunk_layout: optional precomputed
    `_chunk.prepare_chunk_layout(cu_seqlens, T)`, to share between calls.
    Returns (o [B, T, H, V] in v's dtype, final state float32 [N, H, K, V] or None).
    """
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    chunk_indices = chunk_offsets = None
    if cu_seqlens is not None:
        chunk_indices, chunk_offsets = chunk_layout or prepare_chunk_layout(cu_seqlens, q.shape[1])
    g_cum = None if g is None else chunk_cumsum(g.contiguous(), cu_seqlens, chunk_indices)
    h0 = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    h, _, final = chunk_state(k, v, g_cum, h0, output_final_state, cu_seqlens, chunk_offsets)
    o = chunk_output(q, k, v, h, g_cum, scale, cu_seqlens, chunk_indices)
    return o, final


# Qwen3.5's linear-attention layers at TP1, were they plain gated linear attention: 32 heads, K = V = 128.
AOT_SPECS = aot_specs("linear_attention.", HV=32, HK=32, K=128, V=128, dtype=torch.bfloat16, use_w=False,
                      use_g=True, use_qk_scale=False)
