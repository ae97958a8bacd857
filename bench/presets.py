"""Shapes the sweeps share: real models (ANCHORS.md's shapes table), the sequence lengths and token counts of the
grids, and the helper that varies a base shape along one axis. Each op's own grid is in its declaration
(bench/ops.py).

The sequence lengths of the three attention ops are the same list (SEQ_LENS), so the linear and the quadratic
attention sweeps can be drawn on one plot.
"""
from __future__ import annotations

# ANCHORS.md, "Shapes". Linear-attention heads (qk, v) x dim; attention heads (q, kv) x dim.
MODELS = {
    "Qwen3.5-35B-A3B": dict(hidden=2048, experts=256, top_k=8, expert_size=512, linear_heads=(16, 32),
                            linear_dim=128, attn_heads=(16, 2), attn_dim=256),
    "Qwen3-Next-80B-A3B": dict(hidden=2048, experts=512, top_k=10, expert_size=512, linear_heads=(16, 32),
                               linear_dim=128, attn_heads=(16, 2), attn_dim=256),
    "Qwen3.5-397B-A17B": dict(hidden=4096, experts=512, top_k=10, expert_size=1024, linear_heads=(16, 64),
                              linear_dim=128, attn_heads=(32, 2), attn_dim=256),
    "Qwen3-30B-A3B": dict(hidden=2048, experts=128, top_k=8, expert_size=768, attn_heads=(32, 4), attn_dim=128),
    "DeepSeek-V3": dict(hidden=7168, experts=256, top_k=8, expert_size=2048),
    "Mixtral-8x7B": dict(hidden=4096, experts=8, top_k=2, expert_size=14336, attn_heads=(32, 8), attn_dim=128),
}

# Grid scales: "quick" (a CPU-sized sweep of every axis, CI's), "cpu", "cuda".
SCALES = ("quick", "cpu", "cuda")
# Sequence lengths shared by linear_attention, gated_delta_rule and attention.
SEQ_LENS = {"quick": (256, 512, 1024, 2048), "cpu": (256, 512, 1024, 2048, 4096, 8192),
            "cuda": (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)}
# Token counts of the MoE ops' N axis; PRESET_TOKENS: those of the model presets on CPU (on a GPU, TOKENS["cuda"]).
TOKENS = {"quick": (1, 4, 16, 64, 256, 1024), "cpu": (1, 4, 16, 64, 256, 1024, 4096),
          "cuda": (1, 4, 16, 64, 256, 1024, 4096, 16384)}
PRESET_TOKENS = (1, 16, 256, 4096)
# Model presets whose inputs exceed this many GB (float32 on CPU, bf16 on a GPU) are left out.
PRESET_MAX_GB = {"cpu": 4, "cuda": 24}


def scale_of(device: str, quick: bool) -> str:
    return "quick" if quick else ("cuda" if device == "cuda" else "cpu")


def vary(base: dict, axis: str, values) -> list[dict]:
    """Shapes equal to `base` but along `axis`: each value is the axis' value, or a dict of several axes' values
    (a compound axis such as the heads (Hk, Hv))."""
    return [{**base, **(value if isinstance(value, dict) else {axis: value})} for value in values]


def seqlens(T: int, seqs: int) -> list[int] | None:
    """seqs packed sequences of unequal lengths summing to T (the last one longer), or None for one."""
    if seqs == 1:
        return None
    base = T // seqs
    return [base] * (seqs - 1) + [T - base * (seqs - 1)]
