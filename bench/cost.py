"""Analytic FLOPs and bytes of one call of each op, from its inputs.

FLOPs count a multiply-add as 2. Bytes are the fewest the call must move through memory: every input
read once and every output written once (weights of experts that receive no token are not read).
Element sizes are those of the tensors given, so a bf16 call moves half the bytes of a float32 one.

One function per op, named after it, returns (flops, bytes) of one call; its argument is the dict of keyword
arguments of the public op (as `bench.inputs.make` returns it), plus `mode` for the gated delta rule. Each op's
declaration (bench/ops.py) names its function.
"""
from __future__ import annotations

import torch

# Chunk length the chunked FLOP models assume (fla, FlashQLA and the lab's chunked kernels use 64).
CHUNK = 64


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _state_bytes(inputs, num_seqs, heads, K, V) -> int:
    """Initial state read (when given) and final state written (when asked for), float32 [N, H, K, V]."""
    state = num_seqs * heads * K * V * 4
    return state * (inputs.get("initial_state") is not None) + state * bool(inputs.get("output_final_state"))


def _num_seqs(inputs) -> int:
    cu = inputs.get("cu_seqlens")
    return inputs["q"].shape[0] if cu is None else cu.shape[0] - 1


def linear_attention_flops(tokens: int, heads: int, K: int, V: int, chunk: int = CHUNK) -> int:
    """Chunked scalar-gated linear attention, per token per head:
        4 K V            (inter-chunk output Q S and state update K^T V, one K x V product each)
      + chunk (K + V)    (intra-chunk Q K^T and P V, causal halves: 2 chunk K / 2 + 2 chunk V / 2)."""
    return tokens * heads * (4 * K * V + chunk * (K + V))


def gated_delta_rule_flops(tokens: int, heads: int, K: int, V: int, mode: str = "chunk", chunk: int = CHUNK) -> int:
    """Gated delta rule per token per value head.

    chunk (the WY form of fla / FlashQLA, chunk C):
        6 K V          three K x V products per token: W S (state seen by the keys), Q S (inter-chunk
                       output) and K^T U (state update)
      + C (4 K + 3 V)  intra-chunk, causal halves counted half: (beta K) K^T and Q K^T (C K each),
                       P U (C V), and the dense products of the inverted triangular matrix with beta K
                       (2 C K) and beta V (2 C V). The C^3 / 3 triangular solve per chunk is left out.
      With K = V = d = 128 and C = 64 that is 9.5 d^2, the count ANCHORS.md quotes (FlashInfer's
      "useful" count is 4 d^2).
    recurrent (token by token): 6 K V: S'^T k, k u^T and S^T q, one K x V product each."""
    per_token = 6 * K * V + (chunk * (4 * K + 3 * V) if mode == "chunk" else 0)
    return tokens * heads * per_token


def linear_attention(inputs) -> tuple[int, int]:
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    B, T, H, K = q.shape
    V = v.shape[-1]
    flops = linear_attention_flops(B * T, H, K, V)
    moved = _nbytes(q, k, v, inputs.get("g"), inputs.get("cu_seqlens")) + _nbytes(v)  # o has v's shape
    return flops, moved + _state_bytes(inputs, _num_seqs(inputs), H, K, V)


def gated_delta_rule(inputs) -> tuple[int, int]:
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    flops = gated_delta_rule_flops(B * T, Hv, K, V, inputs.get("mode", "chunk"))
    moved = _nbytes(q, k, v, inputs["g"], inputs["beta"], inputs.get("cu_seqlens")) + _nbytes(v)
    return flops, moved + _state_bytes(inputs, _num_seqs(inputs), Hv, K, V)


def attention_pairs(Tq: int, Tk: int, causal: bool = True) -> int:
    """(query, key) pairs a query sees: Tq Tk, or Tq (Tk - Tq) + Tq (Tq + 1) / 2 under the causal mask."""
    return Tq * (Tk - Tq) + Tq * (Tq + 1) // 2 if causal else Tq * Tk


def attention(inputs) -> tuple[int, int]:
    """4 D FLOPs per visible (query, key) pair per query head: scores q k^T and the weighted sum P V.
    Bytes: q, k, v read once, o written once (the flash-attention floor; scores never reach memory)."""
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    B, Tq, Hq, D = q.shape
    flops = 4 * B * Hq * D * attention_pairs(Tq, k.shape[1], inputs.get("causal", True))
    return flops, _nbytes(q, k, v) + _nbytes(q)


def _active_experts(ids, num_experts) -> int:
    used = ids[ids >= 0].long()
    return int(torch.bincount(used.cpu(), minlength=num_experts).gt(0).sum())


def route(inputs) -> tuple[int, int]:
    """No matmul FLOPs (softmax and top-k: a few operations per logit). Bytes: router_logits [N, E] read, weights
    float32 and ids int32 [N, top_k] written."""
    logits, top_k = inputs["router_logits"], inputs["top_k"]
    return 0, _nbytes(logits) + logits.shape[0] * top_k * (4 + 4)


def moe_permute(inputs) -> tuple[int, int]:
    """No FLOPs. Bytes: x [N, D] and ids read, M = (ids >= 0) rows of D written, with offsets [E + 1]
    and source [M] (int64)."""
    x, ids = inputs["x"], inputs["ids"]
    M = int((ids >= 0).sum())
    written = M * x.shape[1] * x.element_size() + (inputs["num_experts"] + 1) * 4 + M * 8
    return 0, _nbytes(x, ids) + written


def moe_unpermute(inputs) -> tuple[int, int]:
    """2 FLOPs per routed element (a multiply-add of the weighted sum): 2 M D'. Bytes: y_sorted [M, D'], source
    [M] and weights [N, top_k] read, y [N, D'] written."""
    y_sorted, p = inputs["y_sorted"], inputs["p"]
    M, D = y_sorted.shape
    return 2 * M * D, _nbytes(y_sorted, p.source, inputs["weights"]) + p.num_tokens * D * y_sorted.element_size()


def grouped_gemm(inputs) -> tuple[int, int]:
    """2 M K Nout FLOPs. Bytes: x [M, K], the weights [Nout, K] of experts with at least one row, y [M, Nout]."""
    x, w, offsets = inputs["x"], inputs["w"], inputs["offsets"]
    M, K = x.shape
    Nout = w.shape[1]
    active = int((offsets[1:] > offsets[:-1]).sum())
    return 2 * M * K * Nout, _nbytes(x, offsets) + active * Nout * K * w.element_size() + M * Nout * x.element_size()


def moe(inputs) -> tuple[int, int]:
    """Per routed slot (M = number of ids >= 0): gate and up projections 2 D (2 I), down projection 2 I D,
    SiLU-and-multiply and the weighted sum (about 5 I + 2 D): 6 D I + 5 I + 2 D.
    Bytes: x, weights, ids read, y written, and the gate_up [2I, D] and down [D, I] weights of every expert
    that receives a token (the decode floor: at N = 1 the active experts' weights dominate)."""
    x, ids = inputs["x"], inputs["ids"]
    N, D = x.shape
    E, two_I, _ = inputs["w_gate_up"].shape
    I = two_I // 2
    M = int((ids >= 0).sum())
    flops = M * (6 * D * I + 5 * I + 2 * D)
    weight_bytes = _active_experts(ids, E) * 3 * I * D * inputs["w_gate_up"].element_size()
    return flops, _nbytes(x, inputs["weights"], ids) + weight_bytes + _nbytes(x)


# ------------------------------------------------------------------------------------------------ backward
#
# `<op>_backward(inputs)`: (FLOPs, bytes) of one backward call: the gradients of every differentiable input
# (kernellab.autograd.DIFFERENTIABLE) from the gradients of the outputs. Bytes: the inputs the backward reads (the
# forward's inputs, recomputed from, and the outputs' gradients) once, the inputs' gradients written once.
# Forward + backward is the sum of the two models.

def linear_attention_backward_flops(tokens: int, heads: int, K: int, V: int, chunk: int = CHUNK) -> int:
    """Chunked linear attention backward (the lab's torch algorithm), per token per head:
        10 K V            state recomputed (K^T V), the reverse pass over chunks (Kd dS and (gamma q)^T do),
                          then do S0^T (dq) and v dS1^T (dk), one K x V product each
      + chunk (3 K + 2 V) intra-chunk, causal halves: Q K^T recomputed, dP = do v^T, P^T do, dP k, dP^T q."""
    return tokens * heads * (10 * K * V + chunk * (3 * K + 2 * V))


def gated_delta_rule_backward_flops(tokens: int, heads: int, K: int, V: int, chunk: int = CHUNK) -> int:
    """Chunked gated delta rule backward (the lab's torch algorithm, WY form), per token per value head:
        16 K V             the state pass recomputed (W S and K^T v_new), the reverse pass (Kd dS, (gamma q)^T do,
                           W^T dv_new), then do S0^T, v_new dS1^T and dv_new S0^T
      + chunk (12 K + 7 V) the forward's intra-chunk products recomputed but P U (chunk (4 K + 2 V)), and their
                           backward: dP = do v_new^T, P^T do, dP k, dP^T q (causal halves), the solve's
                           T^T dv_new and T^T dW (dense), dL = d(beta v) u^T + d(beta gamma k) w^T (strict lower
                           halves) and (dL' + dL'^T) k (dense). The triangular solve itself is left out."""
    return tokens * heads * (16 * K * V + chunk * (12 * K + 7 * V))


def _recurrent_backward_bytes(inputs, differentiable) -> int:
    """Inputs read and their gradients written (the same sizes), plus the gradients of o and of the final state
    read."""
    given = [inputs.get(name) for name in differentiable]
    v = inputs["v"]
    final = _num_seqs(inputs) * v.shape[2] * inputs["q"].shape[-1] * v.shape[-1] * 4 * bool(inputs.get(
        "output_final_state"))
    return 2 * _nbytes(*given) + _nbytes(v) + final


def linear_attention_backward(inputs) -> tuple[int, int]:
    q, v = inputs["q"], inputs["v"]
    B, T, H, K = q.shape
    flops = linear_attention_backward_flops(B * T, H, K, v.shape[-1])
    return flops, _recurrent_backward_bytes(inputs, ("q", "k", "v", "g", "initial_state"))


def gated_delta_rule_backward(inputs) -> tuple[int, int]:
    q, v = inputs["q"], inputs["v"]
    B, T, Hk, K = q.shape
    flops = gated_delta_rule_backward_flops(B * T, v.shape[2], K, v.shape[3])
    return flops, _recurrent_backward_bytes(inputs, ("q", "k", "v", "g", "beta", "initial_state"))


def attention_backward(inputs) -> tuple[int, int]:
    """10 D FLOPs per visible (query, key) pair per query head (FlashAttention's backward: scores recomputed,
    dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q). Bytes: q, k, v, o and do read, dq, dk, dv written."""
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    B, Tq, Hq, D = q.shape
    flops = 10 * B * Hq * D * attention_pairs(Tq, k.shape[1], inputs.get("causal", True))
    return flops, 2 * _nbytes(q, k, v) + 2 * _nbytes(q)


def route_backward(inputs) -> tuple[int, int]:
    """No matmul FLOPs (the softmax's backward, a few operations per logit). Bytes: router_logits read (the
    softmax recomputed), the weights' gradient [N, top_k] float32 read, the logits' gradient written."""
    logits, top_k = inputs["router_logits"], inputs["top_k"]
    return 0, 2 * _nbytes(logits) + logits.shape[0] * top_k * 4


def moe_permute_backward(inputs) -> tuple[int, int]:
    """No FLOPs (each token's rows summed: M D additions, memory-bound). Bytes: the rows' gradient [M, D] and ids
    read, x's gradient [N, D] written."""
    x, ids = inputs["x"], inputs["ids"]
    M = int((ids >= 0).sum())
    return 0, M * x.shape[1] * x.element_size() + _nbytes(ids) + _nbytes(x)


def moe_unpermute_backward(inputs) -> tuple[int, int]:
    """3 FLOPs per routed element: the rows' gradient weights[n, j] dy[n] (M D') and the weights' gradient, a dot
    product dy[n] . y_sorted[row] (2 M D'). Bytes: dy [N, D'], y_sorted, source and weights read; y_sorted's and
    the weights' gradients written."""
    y_sorted, p = inputs["y_sorted"], inputs["p"]
    M, D = y_sorted.shape
    return 3 * M * D, (p.num_tokens * D * y_sorted.element_size() + 2 * _nbytes(y_sorted) + _nbytes(p.source)
                       + 2 * _nbytes(inputs["weights"]))


def grouped_gemm_backward(inputs) -> tuple[int, int]:
    """4 M K Nout FLOPs: dX = dY W and dW = dY^T X per group. Bytes: dy [M, Nout], x and the active experts'
    weights read; dx and the active experts' weight gradients written."""
    x, w, offsets = inputs["x"], inputs["w"], inputs["offsets"]
    M, K = x.shape
    Nout = w.shape[1]
    active = int((offsets[1:] > offsets[:-1]).sum())
    weights = active * Nout * K * w.element_size()
    return 4 * M * K * Nout, M * Nout * x.element_size() + 2 * _nbytes(x) + 2 * weights + _nbytes(offsets)


def moe_backward(inputs) -> tuple[int, int]:
    """Per routed slot: the gate and up projections recomputed (4 D I), dW_down and dH (4 D I), dW_gate_up and
    dx (8 D I), the gate's backward and the weight's dot product (about 10 I): 16 D I + 10 I.
    Bytes: x, dy, weights, ids read; the active experts' weights read and their gradients written; dx and the
    weights' gradient written."""
    x, ids = inputs["x"], inputs["ids"]
    N, D = x.shape
    E, two_I, _ = inputs["w_gate_up"].shape
    I = two_I // 2
    M = int((ids >= 0).sum())
    weight_bytes = _active_experts(ids, E) * 3 * I * D * inputs["w_gate_up"].element_size()
    return M * (16 * D * I + 10 * I), 3 * _nbytes(x) + 2 * _nbytes(inputs["weights"]) + _nbytes(ids) + 2 * weight_bytes
