"""The gated delta rule on CPU: chunks by kernellab.mkl.chunked (float32; the WY form as one compiled loop of MKL
calls on the inputs where they lie). float64 inputs and the token-by-token mode run the torch backend's code."""
import torch

from kernellab.mkl.chunked import chunked, chunked_backward
from kernellab.torch import gated_delta_rule as torch_gdr


def gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens, mode,
                     state_dtype, chunk_size=None):
    """As kernellab.torch.gated_delta_rule.gated_delta_rule: q, k [B, T, Hk, K]; v [B, T, Hv, V]; g, beta
    [B, T, Hv]; initial_state None or [N, Hv, K, V] in state_dtype. Returns o [B, T, Hv, V] in v's dtype and the
    final state [N, Hv, K, V] in state_dtype or None. chunk_size: default kernellab.mkl.chunked's."""
    if mode != "chunk" or v.dtype == torch.float64:
        return torch_gdr.gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm,
                                          cu_seqlens, mode, state_dtype, chunk_size=chunk_size)
    o, state = chunked(q, k, v, g, beta, scale, initial_state, cu_seqlens, state_dtype, use_qk_l2norm, chunk_size)
    return o, state if output_final_state else None


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
