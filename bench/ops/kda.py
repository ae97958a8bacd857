"""Kimi Delta Attention (kernellab.kda): the gated delta rule with a log decay per key channel. Its sweep is the
gated delta rule's declaration (axes, grid, presets, yardstick policy, test cases) with KDA's inputs and cost, so
that `--op gated_delta_rule kda` times both at the same shapes in one run (gpu_check sweeps them together)."""
from __future__ import annotations

from dataclasses import replace

import torch

from bench.ops import Anchor, Target, generator, nbytes
from bench.ops.gated_delta_rule import (GDR_CPU_8K, GATED_DELTA_RULE, gated_delta_rule_backward_flops,
                                        gated_delta_rule_flops, gated_delta_rule_inputs)
from bench.ops.linear_attention import (CHUNK, draw_gate, num_seqs, recurrent_backward_bytes, recurrent_invariance,
                                        state_bytes)


def kda_inputs(B=1, T=64, Hk=2, Hv=4, K=32, V=32, *, dtype=torch.float32, device="cpu", seed=0, gate="mild",
               beta="sigmoid", initial_state=False, seqlens=None, use_qk_l2norm=True, output_final_state=True):
    """The gated delta rule's inputs (the same draws at the same seed) with g [B, T, Hv, K], one log decay per key
    channel drawn as that maker's gate kind; gate "equal": the gated delta rule's mild g [B, T, Hv] repeated across
    K (KDA then computes the gated delta rule)."""
    found = gated_delta_rule_inputs(B, T, Hk, Hv, K, V, dtype=dtype, device=device, seed=seed,
                                    gate="mild" if gate == "equal" else gate, beta=beta, initial_state=initial_state,
                                    seqlens=seqlens, use_qk_l2norm=use_qk_l2norm,
                                    output_final_state=output_final_state)
    scalar = found["g"]
    if gate == "equal":
        g = scalar[..., None].expand(*scalar.shape, K).contiguous()
    else:  # a generator of its own (seed + 1): the other inputs are the gated delta rule's at the same seed
        g = draw_gate(generator(seed + 1), gate, *scalar.shape, K).to(scalar.dtype).to(device)
    return found | dict(g=g)


def kda_flops(tokens: int, heads: int, K: int, V: int, mode: str = "chunk", chunk: int = CHUNK) -> int:
    """Per token per value head: the gated delta rule's count plus, in chunk mode, C K for the per-channel decays
    inside the two pair products ((beta K) K^T and Q K^T take q_id k_jd D_ijd over the causal half: 3 FLOPs per
    (i, j, d) where the gated delta rule's take 2): 6 K V + C (5 K + 3 V), 10.5 d^2 at K = V = d = 128, C = 64.
    The C K / 2 exponentials of D per token are not FLOPs. recurrent: 6 K V, as the gated delta rule."""
    extra = chunk * K if mode == "chunk" else 0
    return gated_delta_rule_flops(tokens, heads, K, V, mode, chunk) + tokens * heads * extra


def kda_backward_flops(tokens: int, heads: int, K: int, V: int, chunk: int = CHUNK) -> int:
    """The gated delta rule's backward plus 3 C K per token per value head for the decayed pair products: their
    recompute (C K) and their backward's extra factor in dq, dk and the per-channel gradient of D (2 C K)."""
    return gated_delta_rule_backward_flops(tokens, heads, K, V, chunk) + tokens * heads * 3 * chunk * K


def kda_cost(inputs) -> tuple[int, int]:
    """(FLOPs, bytes) of one call: the gated delta rule's bytes with g K times larger."""
    q, v = inputs["q"], inputs["v"]
    B, T, _, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    moved = nbytes(q, inputs["k"], v, inputs["g"], inputs["beta"], inputs.get("cu_seqlens")) + nbytes(v)
    return (kda_flops(B * T, Hv, K, V, inputs.get("mode", "chunk")),
            moved + state_bytes(inputs, num_seqs(inputs), Hv, K, V))


def kda_backward_cost(inputs) -> tuple[int, int]:
    q, v = inputs["q"], inputs["v"]
    B, T, _, K = q.shape
    return (kda_backward_flops(B * T, v.shape[2], K, v.shape[3]),
            recurrent_backward_bytes(inputs, ("q", "k", "v", "g", "beta", "initial_state")))


# Issue 28's targets, at the gated delta rule's CPU shape (T = 8192, Hk = 2, Hv = 4, K = V = 128, float32, 1 thread):
# the sweep's default CPU grid has it, so one run of both ops measures all of them (the commands: docs/api.md's KDA
# contract). The ratio to the gated delta rule is per CPU backend (the report's "op" target on rows of one backend).
TARGETS = (
    *(Target(f"KDA chunked forward, T = 8192, Hk = 2, Hv = 4, K = V = 128 (CPU, float32, `{backend}`): at most 1.5x "
             f"the gated delta rule's time on `{backend}`", "op", 1 / 1.5, GDR_CPU_8K | {"backend": backend},
             peer="gated_delta_rule")
      for backend in ("mkl", "torch")),
    Target("KDA chunked forward, same shape: at least 5x fla's naive_chunk_kda", "peer", 5.0, GDR_CPU_8K,
           peer="fla"),
    Target("KDA forward+backward, same shape: at least 10x fla's naive_chunk_kda under autograd", "peer", 10.0,
           GDR_CPU_8K | {"pass": "forward+backward"}, peer="fla"),
    Target("KDA backward, same shape: at least 40% of the matmul ceiling on the backward's FLOPs", "ceiling", 0.4,
           GDR_CPU_8K | {"pass": "backward"}))

KDA = replace(
    GATED_DELTA_RULE, name="kda", maker=kda_inputs, cost=kda_cost, backward_cost=kda_backward_cost, targets=TARGETS,
    swept_with="gated_delta_rule", versus=None, invariance=recurrent_invariance(),
    anchors=tuple(
        # MoonshotAI/FlashKDA: BENCHMARK_H20.md and its README's GB200 numbers (docs/anchors.md)
        Anchor(f"KDA prefill B1 T8192 H96 D128, {device}", "ms", times, device, source,
               dict(B=1, T=8192, Hv=96, K=128, V=128))
        for device, times, source in [
            ("H20", "FlashKDA 2.622 / fla chunk_kda 4.839", "MoonshotAI/FlashKDA BENCHMARK_H20.md"),
            ("GB200", "FlashKDA 1.009 / fla chunk_kda 2.327", "MoonshotAI/FlashKDA README")]),
    flop_model="chunked Kimi Delta Attention: 6 K V + 64 (5 K + 3 V) FLOPs per token per value head (the gated "
               "delta rule's count plus C K for the per-channel decays inside the pair products; 10.5 d^2 at "
               "d = 128), 6 K V in recurrent mode.",
    backward_flop_model="16 K V + 64 (15 K + 7 V) FLOPs per token per value head (the gated delta rule's backward "
                        "plus 3 C K for the decayed pair products; the solve left out).")

SPECS = (KDA,)
