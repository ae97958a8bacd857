"""The gated delta rule on CPU: chunks by kernellab.mkl.chunked (float32; the WY form as one compiled loop of MKL
calls on the inputs where they lie). float64 inputs and the token-by-token mode run the torch backend's code."""
import torch

from kernellab import serving
from kernellab.mkl.chunked import CHUNK_SIZE, chunked, chunked_backward, serving_loop
from kernellab.torch import gated_delta_rule as torch_gdr
from kernellab.torch.linear_attention import chunk_states_multiple


def gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens, mode,
                     state_dtype, chunk_size=None, state_indices=None, output_state_indices=None,
                     output_intermediate_states=False, chunk_states_every=None, A_log=None, dt_bias=None,
                     beta_logits=False):
    """As kernellab.torch.gated_delta_rule.gated_delta_rule: q, k [B, T, Hk, K]; v [B, T, Hv, V]; g, beta
    [B, T, Hv]; initial_state None or [N, Hv, K, V] in state_dtype (a pool [P, Hv, K, V] with state_indices).
    Returns o [B, T, Hv, V] in v's dtype and the final state [N, Hv, K, V] in state_dtype or None, and a StateTrace
    with a trace. chunk_size: default kernellab.mkl.chunked's. The serving keywords: those of the torch backend's
    code where it runs it (and for output_intermediate_states: a token loop); chunk states from the compiled loop
    run segment by segment (kernellab.mkl.chunked.by_segments)."""
    serving_keywords = dict(state_indices=state_indices, output_state_indices=output_state_indices,
                            output_intermediate_states=output_intermediate_states,
                            chunk_states_every=chunk_states_every, A_log=A_log, dt_bias=dt_bias,
                            beta_logits=beta_logits)
    if mode != "chunk" or v.dtype == torch.float64 or output_intermediate_states:
        return torch_gdr.gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm,
                                          cu_seqlens, mode, state_dtype, chunk_size=chunk_size, **serving_keywords)
    g, beta = serving.gates(g, beta, A_log, dt_bias, beta_logits, torch.float32)
    B, T = v.shape[:2]

    def run(tokens, bounds, s0):
        return chunked(*tokens.values(), scale, s0, bounds, state_dtype, use_qk_l2norm, chunk_size)

    loop = serving_loop(run, dict(q=q, k=k, v=v, g=g, beta=beta), B, T, cu_seqlens)
    return serving.serve(loop, "mkl", chunk_states_multiple("chunk", chunk_size or CHUNK_SIZE), B, T, initial_state,
                         output_final_state, cu_seqlens, state_dtype, state_indices, output_state_indices,
                         output_intermediate_states, chunk_states_every)


def gated_delta_rule_backward(grads, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm,
                              cu_seqlens, mode, state_dtype, chunk_size=None):
    """As kernellab.torch.gated_delta_rule.gated_delta_rule_backward (kernellab.autograd's contract): grads
    {"o": [B, T, Hv, V] or None, "final_state": [N, Hv, K, V] or None}; the inputs as the forward's. The chunked
    backward of kernellab.mkl.chunked (one compiled loop of MKL calls, float32) whatever the forward's mode, the
    state float32 whatever state_dtype (its rounding's gradient straight through, as the torch backend's);
    float64 inputs take the torch backend's. Returns {q, k [B, T, Hk, K], v [B, T, Hv, V], g, beta [B, T, Hv],
    initial_state [N, Hv, K, V] (None when it is None)} in float32 (float64 for float64 inputs)."""
    if v.dtype == torch.float64:
        return torch_gdr.gated_delta_rule_backward(grads, q, k, v, g, beta, scale, initial_state, output_final_state,
                                                   use_qk_l2norm, cu_seqlens, mode, state_dtype,
                                                   chunk_size=chunk_size)
    dq, dk, dv, dg, dbeta, d_state = chunked_backward(q, k, v, g, beta, scale, initial_state, cu_seqlens, grads["o"],
                                                      grads["final_state"], use_qk_l2norm, chunk_size)
    return dict(q=dq, k=dk, v=dv, g=dg, beta=dbeta, initial_state=None if initial_state is None else d_state)
