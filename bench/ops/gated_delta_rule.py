"""The gated delta rule (kernellab.gated_delta_rule): linear attention's file holds what the two share."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.ops import MODELS, Anchor, OpSpec, Target, Versus, generator, nbytes, randn, seqlens, time_layout, to_device
from bench.ops.linear_attention import (CHUNK, RECURRENT_PLOTS, draw_gate, num_seqs, recurrent_backward_bytes,
                                        recurrent_gigabytes, recurrent_grid, recurrent_invariance, state_bytes,
                                        token_loop_affordable, wide_states)

BETAS = ("sigmoid", "low", "high")  # low: near 0, high: near 1


# ------------------------------------------------------------------------------------------------------ inputs

def draw_beta(gen, kind, *shape):
    u = torch.rand(*shape, generator=gen, dtype=torch.float64)
    if kind == "sigmoid":
        return torch.sigmoid(randn(gen, *shape))
    if kind == "low":
        return 1e-3 * u + 1e-6
    if kind == "high":
        return 1 - 1e-3 * u
    raise ValueError(f"beta must be one of {BETAS}, got {kind!r}")


def gated_delta_rule_inputs(B=1, T=64, Hk=2, Hv=4, K=32, V=32, *, dtype=torch.float32, device="cpu", seed=0,
                            gate="mild", beta="sigmoid", initial_state=False, seqlens=None, use_qk_l2norm=True,
                            output_final_state=True):
    """q, k [B, T, Hk, K], v [B, T, Hv, V], g, beta [B, T, Hv]. With use_qk_l2norm=False, k is drawn unit-norm
    (the delta rule is only stable for ||k|| <= 1 with beta in (0, 1))."""
    gen = generator(seed)
    B, T, cu, N = time_layout(B, T, seqlens)
    k = randn(gen, B, T, Hk, K)
    inputs = dict(q=randn(gen, B, T, Hk, K), k=k if use_qk_l2norm else F.normalize(k, dim=-1),
                  v=randn(gen, B, T, Hv, V), g=draw_gate(gen, gate, B, T, Hv), beta=draw_beta(gen, beta, B, T, Hv),
                  initial_state=randn(gen, N, Hv, K, V) if initial_state else None,
                  output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm, cu_seqlens=cu)
    return (to_device(inputs, dtype, device, keep_dtype=("g", "beta", "initial_state"))
            | wide_states(inputs, dtype, device))


# -------------------------------------------------------------------------------------------------------- cost
# (conventions: linear_attention.py's)

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


def gated_delta_rule_cost(inputs) -> tuple[int, int]:
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    flops = gated_delta_rule_flops(B * T, Hv, K, V, inputs.get("mode", "chunk"))
    moved = nbytes(q, k, v, inputs["g"], inputs["beta"], inputs.get("cu_seqlens")) + nbytes(v)
    return flops, moved + state_bytes(inputs, num_seqs(inputs), Hv, K, V)


def gated_delta_rule_backward_flops(tokens: int, heads: int, K: int, V: int, chunk: int = CHUNK) -> int:
    """Chunked gated delta rule backward (the lab's torch algorithm, WY form), per token per value head:
        16 K V             the state pass recomputed (W S and K^T v_new), the reverse pass (Kd dS, (gamma q)^T do,
                           W^T dv_new), then do S0^T, v_new dS1^T and dv_new S0^T
      + chunk (12 K + 7 V) the forward's intra-chunk products recomputed but P U (chunk (4 K + 2 V)), and their
                           backward: dP = do v_new^T, P^T do, dP k, dP^T q (causal halves), the solve's
                           T^T dv_new and T^T dW (dense), dL = d(beta v) u^T + d(beta gamma k) w^T (strict lower
                           halves) and (dL' + dL'^T) k (dense). The triangular solve itself is left out."""
    return tokens * heads * (16 * K * V + chunk * (12 * K + 7 * V))


def gated_delta_rule_backward_cost(inputs) -> tuple[int, int]:
    q, v = inputs["q"], inputs["v"]
    B, T, Hk, K = q.shape
    flops = gated_delta_rule_backward_flops(B * T, v.shape[2], K, v.shape[3])
    return flops, recurrent_backward_bytes(inputs, ("q", "k", "v", "g", "beta", "initial_state"))


# ------------------------------------------------------------------------------------- sweep and yardstick policy

def gdr_presets(scale):
    """FlashQLA's H200 shapes (ANCHORS.md) on a GPU; on CPU the Qwen3.5 heads at short lengths."""
    def shape(model, T, seqs):
        hk, hv = MODELS[model]["linear_heads"]
        d = MODELS[model]["linear_dim"]
        return model, dict(B=1, T=T, seqs=seqs, Hk=hk, Hv=hv, K=d, V=d, mode="chunk")
    if scale == "cuda":
        return [shape("Qwen3.5-35B-A3B", 32768, 1), shape("Qwen3.5-35B-A3B", 4096, 1),
                shape("Qwen3.5-35B-A3B", 32768, 4), shape("Qwen3.5-397B-A17B", 32768, 1),
                shape("Qwen3.5-397B-A17B", 8192, 1), shape("Qwen3.5-397B-A17B", 2048, 1)]
    return [shape("Qwen3.5-35B-A3B", 1024, 1), shape("Qwen3.5-35B-A3B", 4096, 1)]


GDR_CPU_8K = dict(dtype="float32", device="cpu", B=1, T=8192, seqs=1, Hk=2, Hv=4, K=128, V=128, mode="chunk")


# The gradients' edge cases (tests/ops/test_backward.py; the forward's own in tests/ops/test_gated_delta_rule.py): token by
# token ("recurrent", or "auto" for short sequences) and chunked, both forward paths meet the one backward.
GRADIENT_CASES = {
    "T1": dict(T=1),
    "T1_batch2_initial_state": dict(B=2, T=1, initial_state=True),
    "T_not_multiple_of_chunk": dict(T=70, initial_state=True, mode="chunk"),
    "recurrent_initial_state": dict(Hk=2, Hv=4, T=20, initial_state=True, mode="recurrent"),
    "Hv_4Hk_no_l2norm": dict(Hk=1, Hv=4, T=40, use_qk_l2norm=False, mode="chunk"),
    "packed_with_length_1": dict(seqlens=[21, 1, 40], initial_state=True, mode="chunk"),
    "packed_no_initial_state": dict(seqlens=[1, 33, 5], mode="recurrent"),
    "g_zero": dict(T=40, gate="zero", initial_state=True, mode="chunk"),
    "strong_decay": dict(T=40, gate="strong", initial_state=True, mode="chunk"),
    "beta_near_0": dict(T=40, beta="low", initial_state=True, mode="chunk"),
    "beta_near_1_no_l2norm": dict(T=40, beta="high", use_qk_l2norm=False, initial_state=True, mode="chunk"),
    "no_final_state": dict(T=40, initial_state=True, output_final_state=False, mode="chunk"),
}

GATED_DELTA_RULE = OpSpec(
    "gated_delta_rule", ("B", "T", "seqs", "Hk", "Hv", "K", "V", "mode"), maker=gated_delta_rule_inputs,
    make=lambda s: dict(B=s["B"], T=s["T"], Hk=s["Hk"], Hv=s["Hv"], K=s["K"], V=s["V"],
                        seqlens=seqlens(s["T"], s["seqs"]), initial_state=True, output_final_state=True),
    grid=recurrent_grid(gdr=True), presets=gdr_presets, cost=gated_delta_rule_cost,
    backward_cost=gated_delta_rule_backward_cost,
    affordable=token_loop_affordable("Hv"), backward_affordable=token_loop_affordable("Hv", 2**26),
    gigabytes=recurrent_gigabytes("Hk", "Hv"),
    call=lambda s: {"mode": s["mode"]}, plot_axes=RECURRENT_PLOTS | {"heads": ("Hk", "Hv")},
    versus=Versus("attention", same=dict(B="B", Hv="Hq", Hk="Hkv", K="D", V="D"), fixed=dict(seqs=1, mode="chunk")),
    targets=(
        Target("Gated delta rule prefill, T = 8192, Hk = 2, Hv = 4, K = V = 128 (CPU, float32): at least 50% of the "
               "matmul ceiling", "ceiling", 0.5,
               dict(dtype="float32", device="cpu", B=1, T=8192, seqs=1, Hk=2, Hv=4, K=128, V=128, mode="chunk")),
        Target("Gated delta rule prefill, same shape: at least 4x transformers' torch_chunk_gated_delta_rule",
               "peer", 4.0,
               dict(dtype="float32", device="cpu", B=1, T=8192, seqs=1, Hk=2, Hv=4, K=128, V=128, mode="chunk"),
               peer="transformers"),
        Target("Gated delta rule at least as fast as the best lab softmax attention from T = 1024 on (CPU, float32)",
               "crossover", 1024),
        Target("Gated delta rule forward+backward, T = 8192, Hk = 2, Hv = 4, K = V = 128 (CPU, float32): at least 15x "
               "transformers' torch_chunk_gated_delta_rule under autograd", "peer", 15.0,
               GDR_CPU_8K | {"pass": "forward+backward"}, peer="transformers"),
        Target("Gated delta rule backward, same shape: at least 40% of the matmul ceiling on the backward's FLOPs",
               "ceiling", 0.4, GDR_CPU_8K | {"pass": "backward"}),
        Target("Gated delta rule prefill, same shape: ahead of AMD's zentorch (its CPU gated delta rule)", "peer", 1.0,
               GDR_CPU_8K, peer="zentorch")),
    anchors=(
        *[Anchor(f"GDR prefill {model} ({hk}, {hv}) x 128, {seqs} x {T // seqs}, bf16", "ms",
                 f"FlashQLA {a} / FlashInfer {b} / fla {c}", "H200", "QwenLM/FlashQLA benchmark/benchmark_results_H200.txt",
                 dict(dtype="bfloat16", Hk=hk, Hv=hv, K=128, V=128, T=T, seqs=seqs))
          for model, hk, hv, seqs, T, a, b, c in [
              ("Qwen3.5-35B", 16, 32, 1, 32768, "0.877", "1.550", "1.890"),
              ("Qwen3.5-35B", 16, 32, 1, 4096, "0.173", "0.201", "0.247"),
              ("Qwen3.5-35B", 16, 32, 4, 32768, "0.611", "0.425", "1.898"),
              ("Qwen3.5-397B", 16, 64, 1, 32768, "1.521", "1.552", "3.331"),
              ("Qwen3.5-397B", 16, 64, 1, 8192, "0.397", "0.392", "0.814"),
              ("Qwen3.5-397B", 16, 64, 1, 2048, "0.113", "0.105", "0.220")]],
        Anchor("chunk GDN fwd vs FlashAttention-2, B1 T8192 H96 D128 causal", "ms", "GDN 1.265 / FA2 3.753", "GB200",
               "flash-linear-attention README", dict(B=1, T=8192, Hv=96, K=128)),
        Anchor("chunk GDN fwd vs FlashAttention-2, B4 T2048 H16 D128 causal", "ms", "GDN 0.753 / FA2 0.346", "GB200",
               "flash-linear-attention README", dict(B=4, T=2048, Hv=16, K=128)),
        Anchor("crossover of chunked GDN against FlashAttention", "tokens", "2K to 8K", "Hopper",
               "ANCHORS.md (expected)", crossover=True),
        *[Anchor(f"GDR backward Qwen3.5-35B (16, 32) x 128, 1 x {T}, bf16", "ms", f"FlashQLA {a} / fla {b}", "H200",
                 "QwenLM/FlashQLA benchmark/benchmark_results_H200.txt",
                 {"dtype": "bfloat16", "Hk": 16, "Hv": 32, "K": 128, "V": 128, "T": T, "seqs": 1, "pass": "backward"})
          for T, a, b in [(8192, "0.789", "1.444"), (32768, "2.515", "5.697")]],
        Anchor("chunk GDN forward + backward, B2 T16384 H16 D128", "ms", "3.616 (forward 1.029)", "GB200",
               "flash-linear-attention README", {"B": 2, "T": 16384, "Hv": 16, "K": 128,
                                                 "pass": "forward+backward"})),
    flop_model="chunked gated delta rule: 6 K V + 64 (4 K + 3 V) FLOPs per token per value head (9.5 d^2 at "
               "d = 128), 6 K V in recurrent mode.",
    backward_flop_model="16 K V + 64 (12 K + 7 V) FLOPs per token per value head (25.5 d^2 at d = 128; the "
                        "solve left out), whatever the forward's mode.",
    tiny=dict(B=1, T=40, seqs=2, Hk=1, Hv=2, K=16, V=16, mode="chunk"),
    gradient_cases=GRADIENT_CASES, gradient_spot_checks=("T_not_multiple_of_chunk", "packed_with_length_1"),
    invariance=recurrent_invariance(cudasim=True))


SPECS = (GATED_DELTA_RULE,)
