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
