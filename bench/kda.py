"""Kimi Delta Attention in the bench: its input maker, its cost model (forward and backward) and its OpSpec.

One file for the op (the lead moves it into bench/ops/kda.py, the one-file-per-family layout): bench/ops.py's OPS
table lists `spec(GATED_DELTA_RULE)`; bench.inputs.MAKERS["kda"] calls `make_inputs`.

The sweep shares the gated delta rule's axes and grid, so that `--op gated_delta_rule kda` times both at the same
shapes in one run (and gpu_check sweeps kda with the gated delta rule: swept_with).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from bench import cost, inputs


def make_inputs(B=1, T=64, Hk=2, Hv=4, K=32, V=32, *, dtype=torch.float32, device="cpu", seed=0, gate="mild",
                beta="sigmoid", initial_state=False, seqlens=None, use_qk_l2norm=True, output_final_state=True):
    """The gated delta rule's inputs (bench.inputs.gated_delta_rule, the same draws) with g [B, T, Hv, K], one log
    decay per key channel drawn as that maker's gate kind; gate "equal": the mild draw of the gated delta rule's
    g [B, T, Hv], repeated across K (KDA then computes the gated delta rule)."""
    found = inputs.gated_delta_rule(B, T, Hk, Hv, K, V, dtype=dtype, device=device, seed=seed,
                                    gate="mild" if gate == "equal" else gate, beta=beta, initial_state=initial_state,
                                    seqlens=seqlens, use_qk_l2norm=use_qk_l2norm,
                                    output_final_state=output_final_state)
    scalar = found["g"]
    if gate == "equal":
        g = scalar[..., None].expand(*scalar.shape, K).contiguous()
    else:
        # a generator of its own (seed + 1): the other inputs are the gated delta rule's at the same seed
        g = inputs._gate(inputs._gen(seed + 1), gate, *scalar.shape, K).to(scalar.dtype).to(device)
    return found | dict(g=g)


def kda_flops(tokens: int, heads: int, K: int, V: int, mode: str = "chunk", chunk: int = cost.CHUNK) -> int:
    """Kimi Delta Attention per token per value head: the gated delta rule's count (bench.cost) plus, in chunk
    mode, C K for the per-channel decays inside the two pair products: (beta K) K^T and Q K^T take
    q_id k_jd D_ijd over the causal half, 3 FLOPs per (i, j, d) where the gated delta rule's take 2, so
    C (5 K + 3 V) intra-chunk; 6 K V + C (5 K + 3 V) in all, 10.5 d^2 at K = V = d = 128, C = 64. The C K / 2
    exponentials of D per token are not FLOPs and are left out (fla's chunk_kda computes them in sub-chunks).
    recurrent: 6 K V, as the gated delta rule (the K V decay of the state is the scalar gate's too)."""
    extra = chunk * K if mode == "chunk" else 0
    return cost.gated_delta_rule_flops(tokens, heads, K, V, mode, chunk) + tokens * heads * extra


def kda_backward_flops(tokens: int, heads: int, K: int, V: int, chunk: int = cost.CHUNK) -> int:
    """The backward: the gated delta rule's (bench.cost) plus 3 C K per token per value head for the decayed pair
    products: their recompute (C K, as in the forward) and their backward's extra factor in dq and dk and the
    per-channel gradient of D, sum over pairs of dA_ij q_id k_jd D_ijd (2 C K)."""
    return cost.gated_delta_rule_backward_flops(tokens, heads, K, V, chunk) + tokens * heads * 3 * chunk * K


def kda(found) -> tuple[int, int]:
    """(FLOPs, bytes) of one call: the gated delta rule's bytes with g K times larger."""
    q, v = found["q"], found["v"]
    B, T, _, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    moved = cost._nbytes(q, found["k"], v, found["g"], found["beta"], found.get("cu_seqlens")) + cost._nbytes(v)
    return (kda_flops(B * T, Hv, K, V, found.get("mode", "chunk")),
            moved + cost._state_bytes(found, cost._num_seqs(found), Hv, K, V))


def kda_backward(found) -> tuple[int, int]:
    """(FLOPs, bytes) of the backward: the gated delta rule's bytes with g K times larger (bench.cost's model)."""
    q, v = found["q"], found["v"]
    B, T, _, K = q.shape
    return (kda_backward_flops(B * T, v.shape[2], K, v.shape[3]),
            cost._recurrent_backward_bytes(found, ("q", "k", "v", "g", "beta", "initial_state")))


def spec(gated_delta_rule):
    """kda's OpSpec: the gated delta rule's declaration (gated_delta_rule, bench/ops.py: axes, grid, presets, make,
    call, affordability) with KDA's cost and FlashKDA's published times; no targets of its own. gpu_check sweeps it
    in the gated delta rule's run (swept_with): the two at the same shapes, one after the other."""
    from bench.ops import Anchor  # called by bench/ops.py once Anchor is defined there

    return replace(
        gated_delta_rule, name="kda", cost=kda, backward_cost=kda_backward, targets=(),
        swept_with="gated_delta_rule", versus=None,
        anchors=tuple(
            # MoonshotAI/FlashKDA, BENCHMARK_H20.md and the README's GB200 numbers (docs/anchors.md)
            Anchor(
                f"KDA prefill B1 T8192 H96 D128, {device}", "ms", times, device, source,
                dict(B=1, T=8192, Hv=96, K=128, V=128))
            for device, times, source in [
                ("H20", "FlashKDA 2.622 / fla chunk_kda 4.839", "MoonshotAI/FlashKDA BENCHMARK_H20.md"),
                ("GB200", "FlashKDA 1.009 / fla chunk_kda 2.327", "MoonshotAI/FlashKDA README")]),
        flop_model="chunked Kimi Delta Attention: 6 K V + 64 (5 K + 3 V) FLOPs per token per value head (the gated "
                   "delta rule's count plus C K for the per-channel decays inside the pair products; 10.5 d^2 at "
                   "d = 128), 6 K V in recurrent mode.",
        backward_flop_model="16 K V + 64 (15 K + 7 V) FLOPs per token per value head (the gated delta rule's "
                            "backward plus 3 C K for the decayed pair products; the solve left out).")
