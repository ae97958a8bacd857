"""Chunked linear attention on CPU: chunks by kernellab.mkl.chunked (float32; one compiled loop of MKL calls on the
inputs where they lie). float64 inputs and the token-by-token mode run the torch backend's code."""
import torch

from kernellab import serving
from kernellab.mkl.chunked import CHUNK_SIZE, chunked, chunked_backward, serving_loop
from kernellab.torch import linear_attention as torch_la


def linear_attention(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, mode, state_dtype,
                     chunk_size=None, state_indices=None, output_state_indices=None, output_intermediate_states=False,
                     chunk_states_every=None, A_log=None, dt_bias=None):
    """As kernellab.torch.linear_attention.linear_attention: q, k [B, T, H, K]; v [B, T, H, V]; g None or [B, T, H];
    initial_state None or [N, H, K, V] in state_dtype (a pool [P, H, K, V] with state_indices). Returns o
    [B, T, H, V] in v's dtype and the final state [N, H, K, V] in state_dtype or None, and a StateTrace with a
    trace. chunk_size: default kernellab.mkl.chunked's. The serving keywords as the gated delta rule's (mkl)."""
    if mode != "chunk" or v.dtype == torch.float64 or output_intermediate_states:
        return torch_la.linear_attention(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, mode,
                                         state_dtype, chunk_size, state_indices, output_state_indices,
                                         output_intermediate_states, chunk_states_every, A_log, dt_bias)
    g, _ = serving.gates(g, None, A_log, dt_bias, False, torch.float32)
    if g is None:
        g = torch.zeros(v.shape[:3], dtype=torch.float32)
    B, T = v.shape[:2]

    def run(tokens, bounds, s0):
        return chunked(*tokens.values(), None, scale, s0, bounds, state_dtype, chunk_size=chunk_size)

    loop = serving_loop(run, dict(q=q, k=k, v=v, g=g), B, T, cu_seqlens)
    return serving.serve(loop, "mkl", torch_la.chunk_states_multiple("chunk", chunk_size or CHUNK_SIZE), B, T,
                         initial_state, output_final_state, cu_seqlens, state_dtype, state_indices,
                         output_state_indices, output_intermediate_states, chunk_states_every)


def linear_attention_backward(grads, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, mode,
                              state_dtype, chunk_size=None):
    """As kernellab.torch.linear_attention.linear_attention_backward (kernellab.autograd's contract): grads
    {"o": [B, T, H, V] or None, "final_state": [N, H, K, V] or None}; the inputs as the forward's. The chunked
    backward of kernellab.mkl.chunked (one compiled loop of MKL calls, float32) whatever the forward's mode, the
    state float32 whatever state_dtype (its rounding's gradient straight through, as the torch backend's);
    float64 inputs take the torch backend's. Returns {q, k, v: their shapes, g: [B, T, H] (None when g is None),
    initial_state: [N, H, K, V] (None when it is None)} in float32 (float64 for float64 inputs)."""
    if v.dtype == torch.float64:
        return torch_la.linear_attention_backward(grads, q, k, v, g, scale, initial_state, output_final_state,
                                                  cu_seqlens, mode, state_dtype, chunk_size)
    gates = torch.zeros(v.shape[:3], dtype=torch.float32) if g is None else g
    dq, dk, dv, dg, _, d_state = chunked_backward(q, k, v, gates, None, scale, initial_state, cu_seqlens, grads["o"],
                                                  grads["final_state"], chunk_size=chunk_size)
    return dict(q=dq, k=dk, v=dv, g=None if g is None else dg,
                initial_state=None if initial_state is None else d_state)
