"""Softmax attention with grouped KV heads (kernellab.attention), the quadratic baseline of the linear attentions."""
from __future__ import annotations

import torch

from bench.ops import MODELS, SEQ_LENS, Anchor, OpSpec, generator, nbytes, randn, time_layout, to_device, vary


# ------------------------------------------------------------------------------------------------------ inputs

def attention_inputs(B=1, T=64, Hq=4, Hkv=2, D=32, *, dtype=torch.float32, device="cpu", seed=0, causal=True,
                     Tk=None, seqlens=None, kv_lens=None):
    """q [B, T, Hq, D]; k, v [B, Tk, Hkv, D] (Tk = T unless a KV cache is longer). seqlens: packed sequences of
    these lengths (B = 1, cu_seqlens); kv_lens: per batch row, the valid keys of the [B, Tk] buffers."""
    gen = generator(seed)
    B, T, cu, _ = time_layout(B, T, seqlens)
    Tk = T if Tk is None else Tk
    inputs = dict(q=randn(gen, B, T, Hq, D), k=randn(gen, B, Tk, Hkv, D), v=randn(gen, B, Tk, Hkv, D),
                  causal=causal)
    if cu is not None:
        inputs["cu_seqlens"] = cu
    if kv_lens is not None:
        inputs["kv_lens"] = torch.tensor(kv_lens, dtype=torch.int32)
    return to_device(inputs, dtype, device)


# -------------------------------------------------------------------------------------------------------- cost
# (conventions: linear_attention.py's)

def attention_pairs(Tq: int, Tk: int, causal: bool = True) -> int:
    """(query, key) pairs a query sees: Tq Tk, or Tq (Tk - Tq) + Tq (Tq + 1) / 2 under the causal mask."""
    return Tq * (Tk - Tq) + Tq * (Tq + 1) // 2 if causal else Tq * Tk


def attention_cost(inputs) -> tuple[int, int]:
    """4 D FLOPs per visible (query, key) pair per query head: scores q k^T and the weighted sum P V.
    Bytes: q, k, v read once, o written once (the flash-attention floor; scores never reach memory)."""
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    B, Tq, Hq, D = q.shape
    flops = 4 * B * Hq * D * attention_pairs(Tq, k.shape[1], inputs.get("causal", True))
    return flops, nbytes(q, k, v) + nbytes(q)


def attention_backward_cost(inputs) -> tuple[int, int]:
    """10 D FLOPs per visible (query, key) pair per query head (FlashAttention's backward: scores recomputed,
    dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q). Bytes: q, k, v, o and do read, dq, dk, dv written."""
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    B, Tq, Hq, D = q.shape
    flops = 10 * B * Hq * D * attention_pairs(Tq, k.shape[1], inputs.get("causal", True))
    return flops, 2 * nbytes(q, k, v) + 2 * nbytes(q)


# ------------------------------------------------------------------------------------- sweep and yardstick policy

def _attention_grid(scale):
    base = dict(B=1, T=1024 if scale == "quick" else 2048, Hq=4, Hkv=2, D=128)
    if scale == "cuda":
        base = dict(B=1, T=4096, Hq=32, Hkv=16, D=128)  # the GDR base's heads: 32 of 128 reading 16
    heads = ([dict(Hq=4, Hkv=1), dict(Hq=4, Hkv=4), dict(Hq=8, Hkv=2)] if scale != "cuda"
             else [dict(Hq=16, Hkv=2), dict(Hq=32, Hkv=2), dict(Hq=32, Hkv=32)])
    return (vary(base, "T", SEQ_LENS[scale]) + vary(base, "B", (1, 2, 4) if scale != "cuda" else (1, 2, 4, 8))
            + vary(base, "heads", heads) + vary(base, "D", (64, 128, 256)))


def _attention_presets(scale):
    T = 2048 if scale == "cpu" else 8192
    return [(model, dict(B=1, T=T, Hq=m["attn_heads"][0], Hkv=m["attn_heads"][1], D=m["attn_dim"]))
            for model, m in MODELS.items() if "attn_heads" in m]


ATTENTION = OpSpec(
    "attention", ("B", "T", "Hq", "Hkv", "D"), maker=attention_inputs,
    make=lambda s: dict(B=s["B"], T=s["T"], Hq=s["Hq"], Hkv=s["Hkv"], D=s["D"]),
    grid=_attention_grid, presets=_attention_presets, cost=attention_cost,
    backward_cost=attention_backward_cost,
    affordable=lambda s, quick: s["B"] * s["Hq"] * s["T"] ** 2 <= 2**26,  # full float64 score matrices
    gigabytes=lambda s, itemsize: s["B"] * s["T"] * (2 * s["Hq"] + 2 * s["Hkv"]) * s["D"] * itemsize / 2**30,
    plot_axes={"T": ("T",), "B": ("B",), "heads": ("Hq", "Hkv"), "D": ("D",)},
    anchors=(Anchor("FlashAttention-2 forward, best", "TFLOP/s", "335", "H100", "FlashAttention-2 paper", best="tflops"),
             Anchor("FlashAttention-3 fp16 forward, best (75% of peak)", "TFLOP/s", "740", "H100",
                    "FlashAttention-3 paper", best="tflops")),
    flop_model="4 D FLOPs per visible (query, key) pair per query head.",
    backward_flop_model="10 D FLOPs per visible pair per query head (FlashAttention's backward).",
    tiny=dict(B=1, T=32, Hq=2, Hkv=1, D=16),
    gradient_cases={"T1": dict(T=1), "gqa": dict(T=37, Hq=4, Hkv=2), "kv_cache": dict(T=5, Tk=19),
                    "not_causal": dict(T=20, causal=False)},
    gradient_spot_checks=("gqa", "kv_cache"),
    invariance={"cpu": dict(rows=dict(B=3, T=40, Tk=48)), "interpret": dict(rows=dict(B=3, T=20, Tk=24, D=16))})


SPECS = (ATTENTION,)
