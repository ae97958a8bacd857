"""Shapes of the sweeps: real models (ANCHORS.md's shapes table) and the grid of each op.

A case is an op and a dict of shape axes (`Case.shape`), which `maker_kwargs` turns into the keywords of
the op's `bench.inputs` maker and `call_kwargs` into extra keywords of the call. Each grid is a base shape
varied along one axis at a time (so a plot against an axis holds the others fixed), plus preset shapes.
The sequence lengths of the three attention ops are the same list (SEQ_LENS), so the linear and the
quadratic attention sweeps can be drawn on one plot.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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

# Axes of each registry op, in the order of the shape string.
AXES = {
    "linear_attention": ("B", "T", "seqs", "H", "K", "V"),
    "gated_delta_rule": ("B", "T", "seqs", "Hk", "Hv", "K", "V", "mode"),
    "attention": ("B", "T", "Hq", "Hkv", "D"),
    "moe_permute": ("N", "D", "E", "top_k", "routing"),
    "grouped_gemm": ("N", "E", "top_k", "K", "Nout", "routing"),
    "moe": ("N", "D", "E", "I", "top_k", "routing"),
}
ALL_AXES = tuple(dict.fromkeys(a for axes in AXES.values() for a in axes))
CATEGORICAL_AXES = ("mode", "routing")

# Sequence lengths shared by linear_attention, gated_delta_rule and attention.
SEQ_LENS = {"quick": (256, 512, 1024, 2048), "cpu": (256, 512, 1024, 2048, 4096, 8192),
            "cuda": (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)}
TOKENS = {"quick": (1, 4, 16, 64, 256, 1024), "cpu": (1, 4, 16, 64, 256, 1024, 4096),
          "cuda": (1, 4, 16, 64, 256, 1024, 4096, 16384)}


@dataclass(frozen=True)
class Case:
    """One shape of one registry op. shape: axis -> value (ints, or strings for mode and routing)."""

    op: str
    shape: dict = field(hash=False)
    preset: str = ""

    @property
    def key(self) -> str:
        """The compact shape string, e.g. "B=1,T=2048,seqs=1,Hk=2,Hv=4,K=128,V=128,mode=chunk"."""
        return ",".join(f"{axis}={self.shape[axis]}" for axis in AXES[self.op])


def _seqlens(T, seqs):
    """seqs packed sequences of unequal lengths summing to T (the last one longer), or None for one."""
    if seqs == 1:
        return None
    base = T // seqs
    return [base] * (seqs - 1) + [T - base * (seqs - 1)]


def maker_kwargs(case: Case) -> dict:
    """Keywords of bench.inputs.make(case.op, ...) for this shape (dtype, device and seed added by the caller)."""
    s = case.shape
    if case.op == "linear_attention":
        return dict(B=s["B"], T=s["T"], H=s["H"], K=s["K"], V=s["V"], seqlens=_seqlens(s["T"], s["seqs"]),
                    initial_state=True, output_final_state=True)
    if case.op == "gated_delta_rule":
        return dict(B=s["B"], T=s["T"], Hk=s["Hk"], Hv=s["Hv"], K=s["K"], V=s["V"],
                    seqlens=_seqlens(s["T"], s["seqs"]), initial_state=True, output_final_state=True)
    if case.op == "attention":
        return dict(B=s["B"], T=s["T"], Hq=s["Hq"], Hkv=s["Hkv"], D=s["D"])
    if case.op == "moe_permute":
        return dict(N=s["N"], D=s["D"], E=s["E"], top_k=s["top_k"], routing=s["routing"])
    if case.op == "grouped_gemm":
        return dict(N=s["N"], E=s["E"], top_k=s["top_k"], K=s["K"], Nout=s["Nout"], routing=s["routing"])
    if case.op == "moe":
        return dict(N=s["N"], D=s["D"], E=s["E"], I=s["I"], top_k=s["top_k"], routing=s["routing"])
    raise ValueError(f"no shapes for op {case.op!r}")


def call_kwargs(case: Case) -> dict:
    """Extra keywords of the op call: the gated delta rule's mode is chosen by the case, not by "auto"."""
    return {"mode": case.shape["mode"]} if case.op == "gated_delta_rule" else {}


def input_gigabytes(case: Case, itemsize: int = 4) -> float:
    """Rough size of the inputs (the makers draw in float64 first, so twice this is needed briefly)."""
    s = case.shape
    if case.op in ("linear_attention", "gated_delta_rule"):
        heads_k, heads_v = (s["H"], s["H"]) if case.op == "linear_attention" else (s["Hk"], s["Hv"])
        elems = s["B"] * s["T"] * (2 * heads_k * s["K"] + 2 * heads_v * s["V"]) + 2 * s["B"] * s["seqs"] * heads_v * s["K"] * s["V"]
    elif case.op == "attention":
        elems = s["B"] * s["T"] * (2 * s["Hq"] + 2 * s["Hkv"]) * s["D"]
    elif case.op == "moe_permute":
        elems = s["N"] * s["D"] * (1 + s["top_k"])
    elif case.op == "grouped_gemm":
        elems = s["E"] * s["Nout"] * s["K"] + s["N"] * s["top_k"] * (s["K"] + s["Nout"])
    else:
        elems = 3 * s["E"] * s["I"] * s["D"] + 2 * s["N"] * s["D"]
    return elems * itemsize / 2**30


def _vary(op, base, axis, values, preset=""):
    return [Case(op, {**base, **(value if isinstance(value, dict) else {axis: value})}, preset) for value in values]


def _scale(quick, device):
    return "quick" if quick else ("cuda" if device == "cuda" else "cpu")


def _recurrent_cases(op, scale):
    """Linear attention and the gated delta rule: T, batch, packed sequences, heads, head dim, decode."""
    gdr = op == "gated_delta_rule"
    if scale == "cuda":
        heads, base_T = ((16, 32), (16, 64), (8, 16)), 4096
    else:
        heads, base_T = ((1, 2), (2, 4), (4, 8)), 1024 if scale == "quick" else 2048
    hk, hv = heads[0] if scale == "cuda" else heads[1]
    base = dict(B=1, T=base_T, seqs=1, K=128, V=128) | (dict(Hk=hk, Hv=hv, mode="chunk") if gdr else dict(H=hv))
    head_values = [dict(Hk=a, Hv=b) if gdr else dict(H=b) for a, b in heads]
    batches = (1, 2, 4) if scale != "cuda" else (1, 2, 4, 8)
    cases = (_vary(op, base, "T", SEQ_LENS[scale]) + _vary(op, base, "B", batches)
             + _vary(op, base, "seqs", (1, 4, 16)) + _vary(op, base, "heads", head_values)
             + _vary(op, base, "dim", [dict(K=64, V=64), dict(K=128, V=128)]
                     + ([dict(K=256, V=256)] if scale == "cuda" else [])))
    # decode: one token per sequence, from a state, for a growing batch
    decode = dict(base, T=1) | (dict(mode="recurrent") if gdr else {})
    cases += _vary(op, decode, "B", (1, 8, 32) if scale != "cuda" else (1, 8, 32, 128, 512))
    if gdr and scale != "quick":
        cases += _gdr_presets(scale)
    return cases


def _gdr_presets(scale):
    """FlashQLA's H200 shapes (ANCHORS.md) on a GPU; on CPU the Qwen3.5 heads at short lengths."""
    def case(model, T, seqs):
        hk, hv = MODELS[model]["linear_heads"]
        d = MODELS[model]["linear_dim"]
        return Case("gated_delta_rule", dict(B=1, T=T, seqs=seqs, Hk=hk, Hv=hv, K=d, V=d, mode="chunk"), model)
    if scale == "cuda":
        return [case("Qwen3.5-35B-A3B", 32768, 1), case("Qwen3.5-35B-A3B", 4096, 1),
                case("Qwen3.5-35B-A3B", 32768, 4), case("Qwen3.5-397B-A17B", 32768, 1),
                case("Qwen3.5-397B-A17B", 8192, 1), case("Qwen3.5-397B-A17B", 2048, 1)]
    return [case("Qwen3.5-35B-A3B", 1024, 1), case("Qwen3.5-35B-A3B", 4096, 1)]


def _attention_cases(scale):
    base = dict(B=1, T=1024 if scale == "quick" else 2048, Hq=4, Hkv=2, D=128)
    if scale == "cuda":
        base = dict(B=1, T=4096, Hq=32, Hkv=16, D=128)  # the GDR base's heads: 32 of 128 reading 16
    heads = ([dict(Hq=4, Hkv=1), dict(Hq=4, Hkv=4), dict(Hq=8, Hkv=2)] if scale != "cuda"
             else [dict(Hq=16, Hkv=2), dict(Hq=32, Hkv=2), dict(Hq=32, Hkv=32)])
    cases = (_vary("attention", base, "T", SEQ_LENS[scale])
             + _vary("attention", base, "B", (1, 2, 4) if scale != "cuda" else (1, 2, 4, 8))
             + _vary("attention", base, "heads", heads)
             + _vary("attention", base, "D", (64, 128, 256)))
    if scale != "quick":
        T = 2048 if scale == "cpu" else 8192
        for model, spec in MODELS.items():
            if "attn_heads" in spec:
                hq, hkv = spec["attn_heads"]
                cases.append(Case("attention", dict(B=1, T=T, Hq=hq, Hkv=hkv, D=spec["attn_dim"]), model))
    return cases


def _moe_presets(op, scale):
    """Every model of MODELS whose inputs fit: at most 4 GB at float32 on CPU, 24 GB at bf16 on a GPU."""
    cases = []
    for model, spec in MODELS.items():
        D, E, k, I = spec["hidden"], spec["experts"], spec["top_k"], spec["expert_size"]
        tokens = TOKENS[scale] if scale == "cuda" else (1, 16, 256, 4096)
        for N in tokens:
            shape = {"moe": dict(N=N, D=D, E=E, I=I, top_k=k), "grouped_gemm": dict(N=N, E=E, top_k=k, K=D, Nout=2 * I),
                     "moe_permute": dict(N=N, D=D, E=E, top_k=k)}[op]
            case = Case(op, shape | dict(routing="uniform"), model)
            if input_gigabytes(case, 2 if scale == "cuda" else 4) <= (24 if scale == "cuda" else 4):
                cases.append(case)
    return cases


def _moe_cases(op, scale):
    small = scale == "quick"
    if op == "moe_permute":
        base = dict(N=256, D=1024 if small else 2048, E=64, top_k=8, routing="uniform")
        cases = (_vary(op, base, "N", TOKENS[scale]) + _vary(op, base, "E", (8, 64, 256, 512))
                 + _vary(op, base, "D", (512, 1024, 2048, 4096)))
    elif op == "grouped_gemm":
        base = dict(N=256, E=64, top_k=8, K=512 if small else 1024, Nout=256 if small else 512, routing="uniform")
        if scale == "cuda":
            base = dict(N=4096, E=256, top_k=8, K=2048, Nout=1024, routing="uniform")
        cases = (_vary(op, base, "N", TOKENS[scale]) + _vary(op, base, "E", (8, 64, 256) if small else (8, 64, 256, 512))
                 + _vary(op, base, "K", (512, 1024, 2048)) + _vary(op, base, "Nout", (256, 512, 1024)))
    else:
        base = dict(N=64, D=512, E=64, I=128, top_k=8, routing="uniform")
        if scale == "cpu":
            base = dict(N=256, D=1024, E=64, I=256, top_k=8, routing="uniform")
        elif scale == "cuda":
            base = dict(N=4096, D=2048, E=256, I=512, top_k=8, routing="uniform")
        cases = (_vary(op, base, "N", TOKENS[scale]) + _vary(op, base, "E", (8, 64, 256) if small else (8, 64, 256, 512))
                 + _vary(op, base, "I", (64, 128, 256) if small else (64, 128, 256, 512))
                 + _vary(op, base, "D", (256, 512, 1024) if small else (256, 512, 1024, 2048)))
    cases += _vary(op, base, "top_k", (1, 2, 4, 8, 10)) + _vary(op, base, "routing", ("uniform", "skewed"))
    if not small:
        cases += _moe_presets(op, scale)
    return cases


def cases(op: str, device: str = "cpu", quick: bool = False, preset: str | None = None) -> list[Case]:
    """The sweep of registry op `op` on `device` ("cpu" or "cuda"), without duplicate shapes.
    quick: a CPU-sized sweep of every axis. preset: only that model's shapes."""
    scale = _scale(quick, device)
    if op in ("linear_attention", "gated_delta_rule"):
        found = _recurrent_cases(op, scale)
    elif op == "attention":
        found = _attention_cases(scale)
    elif op in ("moe_permute", "grouped_gemm", "moe"):
        found = _moe_cases(op, scale)
    else:
        raise ValueError(f"no sweep for op {op!r}")
    if preset:
        if preset not in MODELS:
            raise ValueError(f"preset must be one of {', '.join(MODELS)}, got {preset!r}")
        found = [c for c in _all_scales_presets(op, device) if c.preset == preset]
    unique = {}
    for case in found:
        unique.setdefault(case.key, case)
    return list(unique.values())


def _all_scales_presets(op, device):
    scale = "cuda" if device == "cuda" else "cpu"
    if op == "gated_delta_rule":
        return _gdr_presets(scale)
    if op == "attention":
        return [c for c in _attention_cases(scale) if c.preset]
    if op in ("moe_permute", "grouped_gemm", "moe"):
        return _moe_presets(op, scale)
    return []
