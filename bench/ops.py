"""One declaration per op: everything the sweep, the report, gpu_check and the tests know about it.

An `OpSpec` holds the op's name (the API's: the registry op, `--op` of the sweep, the CSV's op column, the
report's section and the plots' file names), its shape axes, how a shape becomes the op's inputs (a bench.inputs
maker), its sweep grid at each scale and its model presets, its cost model (bench.cost), how large a case the slow
float64 reference may check, the axes its plots are drawn against, and the targets the report computes. `OPS` lists
them in report order. Adding an op to the lab is its OpSpec here, its reference and its backends; nothing else in
bench/ names an op.

A shape is a dict axis -> value (ints; strings for the categorical axes, mode and routing); a `Case` is an op's
shape with the model preset it came from, and its key is the shape string of the CSV ("N=64,D=512,...").
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

from bench import cost, inputs, kda
from bench.presets import MODELS, PRESET_MAX_GB, PRESET_TOKENS, SEQ_LENS, TOKENS, scale_of, seqlens, vary

CATEGORICAL_AXES = ("mode", "routing")
# What a sweep row times: the op's forward call, its backward alone (the gradients of every differentiable input
# from fixed random output gradients, on a graph built once) or both in one call.
PASSES = ("forward", "backward", "forward+backward")


@dataclass(frozen=True)
class Target:
    """A published or issued target the report computes from the rows, its heading saying the target.

    kind: "ceiling" (best lab row's FLOP/s over the matmul ceiling of its run >= threshold), "floor" (best lab
    row's time over its bytes at the run's copy bandwidth <= threshold), "peer" (the peer's time over the best lab
    row's >= threshold), "crossover" (this linear op is at least as fast as the best lab softmax attention from
    T <= threshold on), "op" (the best lab row of op `peer` on the same match over this op's best lab row, in
    time, >= threshold: the same FLOPs in another form, as the fp8 layer against the bf16 one). match: the rows it
    reads (columns -> values)."""

    title: str
    kind: str
    threshold: float
    match: dict = field(default_factory=dict)
    peer: str = ""


@dataclass(frozen=True)
class Anchor:
    """A published figure (ANCHORS.md) the report stands beside our best row.

    what, metric, published, device, source: as published. match: our comparable rows (columns -> values);
    best: the column whose best value is ours ("median_ms": the lowest; a rate: the highest); crossover: ours is
    this op's crossover over softmax attention instead (the report's linear-vs-quadratic section)."""

    what: str
    metric: str
    published: str
    device: str
    source: str
    match: dict = field(default_factory=dict)
    best: str = "median_ms"
    crossover: bool = False


@dataclass(frozen=True)
class Versus:
    """How a linear op's rows pair with the quadratic attention's at one sequence length: same[linear column] =
    attention column; fixed: the linear rows' other columns held at these values."""

    op: str
    same: dict
    fixed: dict


@dataclass(frozen=True)
class OpSpec:
    """One op of the lab, as the bench sees it.

    name:        the API name, used everywhere (CLI, CSV, report, files).
    axes:        shape axes, in the order of the shape string.
    make:        shape -> keywords of the op's bench.inputs maker (dtype, device, seed added by the caller).
    grid:        scale ("quick", "cpu", "cuda") -> shapes; one axis varied at a time around a base shape.
    presets:     scale ("cpu", "cuda") -> [(model, shape)]: the shapes of real models (ANCHORS.md).
    cost:        the op's inputs (plus call keywords) -> (FLOPs, bytes): bench.cost.
    backward_cost: the same for its backward (bench.cost.<op>_backward): a differentiable op, whose sweep may
                 time the passes "backward" and "forward+backward" (PASSES) beside "forward"; None: forward only.
    affordable:  (shape, quick) -> whether the float64 reference's loops check this case in seconds.
    backward_affordable: the same for the reference's autograd, the gradients' yardstick (default: affordable);
                 where it is not, the torch backward in float64 is the yardstick.
    gigabytes:   (shape, element size) -> rough size of the inputs.
    call:        shape -> extra keywords of the call (the gated delta rule's mode).
    check_head:  (input names, rows): when the reference is unaffordable, check these inputs' first rows only.
    plot_axes:   plotted axis -> the shape columns it varies (a compound axis varies several).
    versus:      how this linear op pairs with quadratic attention (the report's linear-vs-quadratic section).
    targets:     the report's targets on this op's rows.
    anchors:     published figures (ANCHORS.md) the report puts beside this op's rows.
    flop_model:  a sentence on the FLOP model, for the report (backward_flop_model: its backward's).
    sweep:       "module:function" of a sweep of its own (the model's), run instead of the registry's backends:
                 (quick, device, out, backends) -> rows, and a `preset` keyword when the op has presets (its
                 cases are then the op's own: grid and presets as above); such an op has no registry entry and runs
                 alone.
    backend_ops: for such an op, the registry ops whose backends its --backend names.
    summary:     "module:function" of lines for the report from such an op's rows (its targets): each a sentence
                 the report makes a bullet, or a Markdown line kept as it is (empty, a heading "#...", a table
                 row "|...").
    table:       "module:function" of the markdown table of such an op's rows (default: every column that has a
                 value, one line per row).
    tolerance:   the least parity gate of this op's rows (its own rounding's floor), beside the dtype's.
    swept_with:  the op whose sweep this one joins in gpu_check's run (one sweep of both: their ratio measured in one
                 run, and one share of the run's time).
    """

    name: str
    axes: tuple[str, ...] = ()
    make: Callable[[dict], dict] | None = None
    grid: Callable[[str], list[dict]] = lambda scale: []
    presets: Callable[[str], list[tuple[str, dict]]] = lambda scale: []
    cost: Callable[[dict], tuple[int, int]] | None = None
    backward_cost: Callable[[dict], tuple[int, int]] | None = None
    affordable: Callable[[dict, bool], bool] = lambda shape, quick: True
    backward_affordable: Callable[[dict, bool], bool] | None = None
    gigabytes: Callable[[dict, int], float] = lambda shape, itemsize: 0.0
    call: Callable[[dict], dict] = lambda shape: {}
    check_head: tuple[tuple[str, ...], int] | None = None
    plot_axes: dict = field(default_factory=dict)
    versus: Versus | None = None
    targets: tuple[Target, ...] = ()
    anchors: tuple[Anchor, ...] = ()
    flop_model: str = ""
    backward_flop_model: str = ""
    sweep: str | None = None
    backend_ops: tuple[str, ...] = ()
    summary: str | None = None
    table: str | None = None
    swept_with: str | None = None
    tolerance: float = 0.0

    @property
    def registry(self) -> bool:
        """Whether the op is a registry op (checked and timed per backend by bench.sweep)."""
        return self.sweep is None

    def cases(self, device: str = "cpu", quick: bool = False, preset: str | None = None) -> list[Case]:
        """The sweep on `device` ("cpu" or "cuda"), without duplicate shapes: the grid (quick: a CPU-sized sweep of
        every axis), plus the model presets unless quick; with `preset`, only that model's shapes."""
        scale = scale_of(device, quick)
        model_scale = "cuda" if device == "cuda" else "cpu"
        if preset:
            if preset not in MODELS:
                raise ValueError(f"preset must be one of {', '.join(MODELS)}, got {preset!r}")
            found = [Case(self.name, shape, model) for model, shape in self.presets(model_scale) if model == preset]
        else:
            found = [Case(self.name, shape) for shape in self.grid(scale)]
            if not quick:
                found += [Case(self.name, shape, model) for model, shape in self.presets(model_scale)]
        unique = {}
        for case in found:
            unique.setdefault(case.key, case)
        return list(unique.values())

    def inputs(self, case: Case, dtype, device, seed: int) -> dict:
        """The keyword arguments of kernellab.<op> for the case."""
        return inputs.make(self.name, **self.make(case.shape), dtype=dtype, device=device, seed=seed)


@dataclass(frozen=True)
class Case:
    """One shape of one op. shape: axis -> value (ints, or strings for mode and routing)."""

    op: str
    shape: dict = field(hash=False)
    preset: str = ""

    @property
    def key(self) -> str:
        """The compact shape string, e.g. "B=1,T=2048,seqs=1,Hk=2,Hv=4,K=128,V=128,mode=chunk"."""
        return ",".join(f"{axis}={self.shape[axis]}" for axis in OPS[self.op].axes)


# ------------------------------------------------------------------------------------ linear attention family

def _recurrent_grid(gdr: bool):
    """Linear attention and the gated delta rule: T, batch, packed sequences, heads, head dim, and decode (one token
    per sequence, from a state, for a growing batch)."""
    def grid(scale):
        if scale == "cuda":
            heads, base_T = ((16, 32), (16, 64), (8, 16)), 4096
        else:
            heads, base_T = ((1, 2), (2, 4), (4, 8)), 1024 if scale == "quick" else 2048
        hk, hv = heads[0] if scale == "cuda" else heads[1]
        base = dict(B=1, T=base_T, seqs=1, K=128, V=128) | (dict(Hk=hk, Hv=hv, mode="chunk") if gdr else dict(H=hv))
        head_values = [dict(Hk=a, Hv=b) if gdr else dict(H=b) for a, b in heads]
        dims = [dict(K=64, V=64), dict(K=128, V=128)] + ([dict(K=256, V=256)] if scale == "cuda" else [])
        shapes = (vary(base, "T", SEQ_LENS[scale]) + vary(base, "B", (1, 2, 4) if scale != "cuda" else (1, 2, 4, 8))
                  + vary(base, "seqs", (1, 4, 16)) + vary(base, "heads", head_values) + vary(base, "dim", dims))
        decode = dict(base, T=1) | (dict(mode="recurrent") if gdr else {})
        return shapes + vary(decode, "B", (1, 8, 32) if scale != "cuda" else (1, 8, 32, 128, 512))
    return grid


def _gdr_presets(scale):
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


def _recurrent_gigabytes(heads_k, heads_v):
    def gigabytes(s, itemsize):
        hk, hv = s[heads_k], s[heads_v]
        elems = s["B"] * s["T"] * (2 * hk * s["K"] + 2 * hv * s["V"]) + 2 * s["B"] * s["seqs"] * hv * s["K"] * s["V"]
        return elems * itemsize / 2**30
    return gigabytes


def _token_loop_affordable(heads, full=2**29):
    """The reference's token loop: about B T H K V multiply-adds in float64, some 2^29 a few seconds here. Its
    autograd keeps every token's state (B H K V float64 each: 13 GB at 2^29) and runs a graph of T steps: 2^26."""
    return lambda s, quick: s["B"] * s["T"] * s[heads] * s["K"] * s["V"] <= (min(full, 2**26) if quick else full)


_GDR_CPU_8K = dict(dtype="float32", device="cpu", B=1, T=8192, seqs=1, Hk=2, Hv=4, K=128, V=128, mode="chunk")
_RECURRENT_PLOTS = {"T": ("T",), "B": ("B",), "seqs": ("seqs",), "dim": ("K", "V")}

LINEAR_ATTENTION = OpSpec(
    "linear_attention", ("B", "T", "seqs", "H", "K", "V"),
    make=lambda s: dict(B=s["B"], T=s["T"], H=s["H"], K=s["K"], V=s["V"], seqlens=seqlens(s["T"], s["seqs"]),
                        initial_state=True, output_final_state=True),
    grid=_recurrent_grid(gdr=False), cost=cost.linear_attention, backward_cost=cost.linear_attention_backward,
    affordable=_token_loop_affordable("H"), backward_affordable=_token_loop_affordable("H", 2**26),
    gigabytes=_recurrent_gigabytes("H", "H"), plot_axes=_RECURRENT_PLOTS | {"heads": ("H",)},
    versus=Versus("attention", same=dict(B="B", H="Hq", K="D", V="D"), fixed=dict(seqs=1)),
    targets=(Target("Linear attention at least as fast as the best lab softmax attention from T = 1024 on "
                    "(CPU, float32)", "crossover", 1024),),
    flop_model="chunked linear attention: 4 K V + 64 (K + V) FLOPs per token per head.",
    backward_flop_model="10 K V + 64 (3 K + 2 V) FLOPs per token per head (recompute, reverse state pass, "
                        "gradients).")

GATED_DELTA_RULE = OpSpec(
    "gated_delta_rule", ("B", "T", "seqs", "Hk", "Hv", "K", "V", "mode"),
    make=lambda s: dict(B=s["B"], T=s["T"], Hk=s["Hk"], Hv=s["Hv"], K=s["K"], V=s["V"],
                        seqlens=seqlens(s["T"], s["seqs"]), initial_state=True, output_final_state=True),
    grid=_recurrent_grid(gdr=True), presets=_gdr_presets, cost=cost.gated_delta_rule,
    backward_cost=cost.gated_delta_rule_backward,
    affordable=_token_loop_affordable("Hv"), backward_affordable=_token_loop_affordable("Hv", 2**26),
    gigabytes=_recurrent_gigabytes("Hk", "Hv"),
    call=lambda s: {"mode": s["mode"]}, plot_axes=_RECURRENT_PLOTS | {"heads": ("Hk", "Hv")},
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
               _GDR_CPU_8K | {"pass": "forward+backward"}, peer="transformers"),
        Target("Gated delta rule backward, same shape: at least 50% of the matmul ceiling on the backward's FLOPs",
               "ceiling", 0.5, _GDR_CPU_8K | {"pass": "backward"})),
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
                        "solve left out), whatever the forward's mode.")


# ------------------------------------------------------------------------------------------------- attention

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
    "attention", ("B", "T", "Hq", "Hkv", "D"),
    make=lambda s: dict(B=s["B"], T=s["T"], Hq=s["Hq"], Hkv=s["Hkv"], D=s["D"]),
    grid=_attention_grid, presets=_attention_presets, cost=cost.attention, backward_cost=cost.attention_backward,
    affordable=lambda s, quick: s["B"] * s["Hq"] * s["T"] ** 2 <= 2**26,  # full float64 score matrices
    gigabytes=lambda s, itemsize: s["B"] * s["T"] * (2 * s["Hq"] + 2 * s["Hkv"]) * s["D"] * itemsize / 2**30,
    plot_axes={"T": ("T",), "B": ("B",), "heads": ("Hq", "Hkv"), "D": ("D",)},
    anchors=(Anchor("FlashAttention-2 forward, best", "TFLOP/s", "335", "H100", "FlashAttention-2 paper", best="tflops"),
             Anchor("FlashAttention-3 fp16 forward, best (75% of peak)", "TFLOP/s", "740", "H100",
                    "FlashAttention-3 paper", best="tflops")),
    flop_model="4 D FLOPs per visible (query, key) pair per query head.",
    backward_flop_model="10 D FLOPs per visible pair per query head (FlashAttention's backward).")


# ------------------------------------------------------------------------------------------------------- MoE

def _moe_presets(shape_of, gigabytes):
    """Every model of MODELS whose inputs fit (PRESET_MAX_GB, float32 on CPU, bf16 on a GPU), at the preset token
    counts. shape_of(N, D, E, top_k, I) -> the op's shape."""
    def presets(scale):
        found = []
        for model, m in MODELS.items():
            for N in TOKENS["cuda"] if scale == "cuda" else PRESET_TOKENS:
                shape = shape_of(N, m["hidden"], m["experts"], m["top_k"], m["expert_size"]) | dict(routing="uniform")
                if gigabytes(shape, 2 if scale == "cuda" else 4) <= PRESET_MAX_GB[scale]:
                    found.append((model, shape))
        return found
    return presets


def _moe_axes_grid(base_of, axes_values):
    """Grids of the MoE ops: base_of(scale) -> the base shape; axes_values(scale) -> {axis: values}; then top-k and
    routing, the same for every MoE op."""
    def grid(scale):
        base = base_of(scale)
        shapes = [s for axis, values in axes_values(scale).items() for s in vary(base, axis, values)]
        return shapes + vary(base, "top_k", (1, 2, 4, 8, 10)) + vary(base, "routing", ("uniform", "skewed"))
    return grid


_MOE_PLOTS = {"N": ("N",), "E": ("E",), "top_k": ("top_k",), "routing": ("routing",)}
_ROUTED = lambda s: dict(N=s["N"], E=s["E"], top_k=s["top_k"], routing=s["routing"])  # noqa: E731
_PERMUTED = lambda s: _ROUTED(s) | dict(D=s["D"])  # noqa: E731


def _permute_gigabytes(s, itemsize):
    return s["N"] * s["D"] * (1 + s["top_k"]) * itemsize / 2**30


def _permute_grid():
    return _moe_axes_grid(
        lambda scale: dict(N=256, D=1024 if scale == "quick" else 2048, E=64, top_k=8, routing="uniform"),
        lambda scale: dict(N=TOKENS[scale], E=(8, 64, 256, 512), D=(512, 1024, 2048, 4096)))


ROUTE = OpSpec(
    "route", ("N", "E", "top_k", "routing"),
    make=_ROUTED,
    grid=_moe_axes_grid(lambda scale: dict(N=4096 if scale == "cuda" else 256, E=256 if scale == "cuda" else 64,
                                           top_k=8, routing="uniform"),
                        lambda scale: dict(N=TOKENS[scale], E=(8, 64, 128, 256, 512))),
    presets=_moe_presets(lambda N, D, E, k, I: dict(N=N, E=E, top_k=k), lambda s, itemsize: s["N"] * s["E"] * itemsize / 2**30),
    cost=cost.route, backward_cost=cost.route_backward, affordable=lambda s, quick: s["N"] * s["E"] <= 2**26,
    gigabytes=lambda s, itemsize: s["N"] * s["E"] * itemsize / 2**30, plot_axes=_MOE_PLOTS,
    flop_model="no matmul FLOPs: softmax and top-k are a few operations per logit (memory-bound).")

MOE_PERMUTE = OpSpec(
    "moe_permute", ("N", "D", "E", "top_k", "routing"),
    make=_PERMUTED, grid=_permute_grid(),
    presets=_moe_presets(lambda N, D, E, k, I: dict(N=N, D=D, E=E, top_k=k), _permute_gigabytes),
    cost=cost.moe_permute, backward_cost=cost.moe_permute_backward, affordable=lambda s, quick: s["N"] * s["top_k"] * s["E"] <= 4_000_000,  # a slot x expert loop
    gigabytes=_permute_gigabytes, plot_axes=_MOE_PLOTS | {"D": ("D",)},
    anchors=(Anchor("vLLM moe_align_block_size, per dispatch", "ms", "0.020 to 0.027", "GPU", "vLLM PR 55225",
                    dict(N=1)),),
    flop_model="no FLOPs: a gather of the routed rows (memory-bound).")

MOE_UNPERMUTE = OpSpec(
    "moe_unpermute", ("N", "D", "E", "top_k", "routing"),
    make=_PERMUTED, grid=_permute_grid(),
    presets=_moe_presets(lambda N, D, E, k, I: dict(N=N, D=D, E=E, top_k=k), _permute_gigabytes),
    cost=cost.moe_unpermute, backward_cost=cost.moe_unpermute_backward, affordable=lambda s, quick: s["N"] * s["top_k"] <= 300_000,  # a Python loop over rows
    gigabytes=_permute_gigabytes, plot_axes=_MOE_PLOTS | {"D": ("D",)},
    flop_model="2 FLOPs per routed element (the weighted sum): memory-bound.")


def _grouped_gemm_gigabytes(s, itemsize):
    return (s["E"] * s["Nout"] * s["K"] + s["N"] * s["top_k"] * (s["K"] + s["Nout"])) * itemsize / 2**30


GROUPED_GEMM = OpSpec(
    "grouped_gemm", ("N", "E", "top_k", "K", "Nout", "routing"),
    make=lambda s: _ROUTED(s) | dict(K=s["K"], Nout=s["Nout"]),
    grid=_moe_axes_grid(
        lambda scale: (dict(N=4096, E=256, top_k=8, K=2048, Nout=1024, routing="uniform") if scale == "cuda" else
                       dict(N=256, E=64, top_k=8, K=512 if scale == "quick" else 1024,
                            Nout=256 if scale == "quick" else 512, routing="uniform")),
        lambda scale: dict(N=TOKENS[scale], E=(8, 64, 256) if scale == "quick" else (8, 64, 256, 512),
                           K=(512, 1024, 2048), Nout=(256, 512, 1024))),
    presets=_moe_presets(lambda N, D, E, k, I: dict(N=N, E=E, top_k=k, K=D, Nout=2 * I), _grouped_gemm_gigabytes),
    cost=cost.grouped_gemm, backward_cost=cost.grouped_gemm_backward, affordable=lambda s, quick: _grouped_gemm_gigabytes(s, 8) <= 2,
    gigabytes=_grouped_gemm_gigabytes, plot_axes=_MOE_PLOTS | {"K": ("K",), "Nout": ("Nout",)},
    anchors=(Anchor("CUTLASS grouped bf16 GEMM, 8 groups of 4096 x 768 x 2048", "TFLOP/s", "650.6", "H100",
                    "TransformerEngine", dict(dtype="bfloat16"), best="tflops"),),
    flop_model="2 M K Nout FLOPs (M routed rows).",
    backward_flop_model="4 M K Nout FLOPs (dX = dY W, dW = dY^T X).")


def _moe_gigabytes(s, itemsize):
    return (3 * s["E"] * s["I"] * s["D"] + 2 * s["N"] * s["D"]) * itemsize / 2**30


def _moe_base(scale):
    if scale == "cpu":
        return dict(N=256, D=1024, E=64, I=256, top_k=8, routing="uniform")
    if scale == "cuda":
        return dict(N=4096, D=2048, E=256, I=512, top_k=8, routing="uniform")
    return dict(N=64, D=512, E=64, I=128, top_k=8, routing="uniform")


_QWEN35_MOE = dict(dtype="float32", device="cpu", preset="Qwen3.5-35B-A3B")
MOE = OpSpec(
    "moe", ("N", "D", "E", "I", "top_k", "routing"),
    make=lambda s: _PERMUTED(s) | dict(I=s["I"]),
    grid=_moe_axes_grid(_moe_base, lambda scale: dict(
        N=TOKENS[scale], E=(8, 64, 256) if scale == "quick" else (8, 64, 256, 512),
        I=(64, 128, 256) if scale == "quick" else (64, 128, 256, 512),
        D=(256, 512, 1024) if scale == "quick" else (256, 512, 1024, 2048))),
    presets=_moe_presets(lambda N, D, E, k, I: dict(N=N, D=D, E=E, I=I, top_k=k), _moe_gigabytes),
    cost=cost.moe, backward_cost=cost.moe_backward, affordable=lambda s, quick: s["N"] * s["top_k"] * 3 * s["I"] * s["D"] <= (2e8 if quick else 2e9),
    gigabytes=_moe_gigabytes, check_head=(("x", "weights", "ids"), 64),
    plot_axes=_MOE_PLOTS | {"D": ("D",), "I": ("I",)},
    targets=(Target("MoE layer decode, Qwen3.5-35B shape, N = 1 (CPU, float32): at most 1.5x the memory floor "
                    "(its active experts' weights at the copy bandwidth)", "floor", 1.5, _QWEN35_MOE | dict(N=1)),
             Target("MoE layer prefill, Qwen3.5-35B shape, N = 4096 (CPU, float32): at least 80% of the matmul "
                    "ceiling", "ceiling", 0.8, _QWEN35_MOE | dict(N=4096)),
             Target("MoE layer forward+backward, Qwen3.5-35B shape, N = 4096 (CPU, float32): at least 70% of the "
                    "matmul ceiling", "ceiling", 0.7, _QWEN35_MOE | {"N": 4096, "pass": "forward+backward"})),
    anchors=(Anchor("Liger fused MoE, Qwen3-30B-A3B shape, bf16 inference", "TFLOP/s", "523", "H100", "Liger kernel",
                    dict(preset="Qwen3-30B-A3B"), best="tflops"),
             Anchor("torch._grouped_mm full MoE forward, Qwen3-30B shape", "TFLOP/s", "242", "H100", "VeOmni PR 460",
                    dict(preset="Qwen3-30B-A3B"), best="tflops"),
             Anchor("torch._grouped_mm full MoE forward, Qwen3-Next shape", "TFLOP/s", "181", "H100", "VeOmni PR 460",
                    dict(preset="Qwen3-Next-80B-A3B"), best="tflops"),
             Anchor("MoE decode, fraction of the memory roofline", "fraction", "0.34", "GPU", "ANCHORS.md",
                    dict(N=1), best="roofline_fraction"),
             Anchor("Liger fused MoE, Qwen3-30B-A3B shape, bf16 forward + backward", "TFLOP/s", "413", "H100",
                    "Liger kernel", {"preset": "Qwen3-30B-A3B", "pass": "forward+backward"}, best="tflops")),
    flop_model="6 D I + 5 I + 2 D FLOPs per routed slot; bytes include the active experts' weights.",
    backward_flop_model="16 D I + 10 I FLOPs per routed slot (the projections recomputed, dX, dW).")

# The expert ops on float8_e4m3fn weights with block scales (kernellab/fp8.py): the shapes, reference budget and cost
# models of their bf16 counterparts (bench.cost reads the weights' element size: 1 byte).
# x's quantization (and h's, inside moe_fp8) runs on values computed in float32 by a backend and in float64 by the
# reference: where the two land on either side of an fp8 rounding boundary, one element moves by an fp8 step. Rare
# (about float32's rounding over fp8's step), so the outputs agree far within this.
FP8_FLIP_TOLERANCE = 1e-3
GROUPED_GEMM_FP8 = replace(
    GROUPED_GEMM, name="grouped_gemm_fp8", backward_cost=None, backward_flop_model="",  # inference only
    swept_with="grouped_gemm", tolerance=FP8_FLIP_TOLERANCE,
    anchors=(Anchor("DeepGEMM fp8 grouped contiguous GEMM (prefill)", "TFLOP/s", "1214 to 1346", "H800", "DeepGEMM",
                    best="tflops"),
             Anchor("DeepGEMM fp8 grouped masked GEMM (decode)", "TFLOP/s", "815 to 1233", "H800", "DeepGEMM",
                    best="tflops")),
    flop_model="2 M K Nout FLOPs (M routed rows); bytes: the fp8 weights (1 byte) of the active experts.")
MOE_FP8 = replace(
    MOE, name="moe_fp8", check_head=None, backward_cost=None, backward_flop_model="",  # inference only
    swept_with="moe", tolerance=FP8_FLIP_TOLERANCE,
    targets=(Target("fp8 MoE layer, Qwen3.5-35B shape, N = 4096 (GPU, bfloat16 activations): at least 1.6x the "
                    "bf16 layer's TFLOP/s", "op", 1.6,
                    dict(device="cuda", dtype="bfloat16", N=4096, D=2048, E=256, I=512, top_k=8, routing="uniform"),
                    peer="moe"),),
    anchors=(), flop_model="6 D I + 5 I + 2 D FLOPs per routed slot; bytes include the active experts' fp8 weights.")

# The Qwen3.5-MoE model's prefill and decode (bench/model.py), on the backends of the ops it runs.
MODEL = OpSpec("model", sweep="bench.model:sweep", backend_ops=("gated_delta_rule", "attention", "route", "moe"),
               summary="bench.model:summary",
               targets=(Target("Model training (forward, backward, AdamW step) on 2K-token sequences, bench checkpoint "
                               "(CPU, float32): at least 5x the tokens/s of transformers' Qwen3_5MoeForCausalLM",
                               "peer", 5.0, dict(phase="train", context=2048, variant="hybrid", device="cpu",
                                                 dtype="float32"), peer="transformers"),))


# ---------------------------------------------------------------------------------------- expert parallelism

def _dispatch_grid(scale):
    """kernellab.distributed's exchange against tokens per rank N, hidden size D and top-k around a base shape, and
    skewed routing at the base, at each world size: 2 and 4 processes on CPU (1 too in the quick sweep, the
    exchange with nothing to send away: what a one-GPU machine runs), 1 to 8 GPUs on a GPU machine (bench.dispatch
    runs the worlds the machine has GPUs for)."""
    if scale == "cuda":
        worlds, base = (1, 2, 4, 8), dict(N=4096, D=4096, E=256, I=512, top_k=8, routing="uniform")
        axes = dict(N=(128, 512, 2048, 4096, 16384), D=(2048, 4096, 7168), top_k=(1, 2, 4, 8, 10))
    elif scale == "cpu":
        worlds, base = (2, 4), dict(N=1024, D=1024, E=64, I=256, top_k=8, routing="uniform")
        axes = dict(N=(64, 256, 1024, 4096), D=(512, 1024, 2048, 4096), top_k=(1, 2, 4, 8))
    else:
        worlds, base = (1, 2, 4), dict(N=256, D=256, E=16, I=64, top_k=4, routing="uniform")
        axes = dict(N=(16, 256, 1024), D=(128, 256, 512), top_k=(1, 4, 8))
    shapes = []
    for world in worlds:
        at = dict(world=world) | base
        shapes += [s for axis, values in axes.items() for s in vary(at, axis, values)]
        shapes += vary(at, "routing", ("uniform", "skewed"))
    return shapes


def _dispatch_presets(scale):
    """The MoE shapes of Qwen3.5 at 4096 tokens per rank: Qwen3.5-35B-A3B on 2 CPU processes (the issue's target;
    the grid has 4); both Qwen3.5 models on 1 to 8 GPUs."""
    models, worlds = (("Qwen3.5-35B-A3B",), (2,)) if scale == "cpu" else \
        (("Qwen3.5-35B-A3B", "Qwen3.5-397B-A17B"), (1, 2, 4, 8))
    return [(model, dict(world=world, N=4096, D=MODELS[model]["hidden"], E=MODELS[model]["experts"],
                         I=MODELS[model]["expert_size"], top_k=MODELS[model]["top_k"], routing="uniform"))
            for model in models for world in worlds]


# Expert parallelism's exchange (bench/dispatch.py): dispatch and combine against all_to_all_single, moe_ep against
# kernellab.moe in one process, in processes of its own; --backend names the moe_permute / moe_unpermute backend of
# the exchange and the moe backend of the local experts (each name for the ops it has).
MOE_DISPATCH = OpSpec("moe_dispatch", ("world", "N", "D", "E", "I", "top_k", "routing"), grid=_dispatch_grid,
                      presets=_dispatch_presets, sweep="bench.dispatch:sweep", backend_ops=("moe_permute", "moe"),
                      summary="bench.dispatch:summary")

# The gated delta rule's state dtype: error against float64 as the sequence grows, memory and decode time
# (bench/precision.py), on the backends that implement state_dtype.
PRECISION = OpSpec("precision", sweep="bench.precision:sweep", backend_ops=("gated_delta_rule",),
                   summary="bench.precision:summary", table="bench.precision:table")

OPS: dict[str, OpSpec] = {spec.name: spec for spec in (
    GATED_DELTA_RULE, LINEAR_ATTENTION, ATTENTION, ROUTE, MOE_PERMUTE, MOE_UNPERMUTE, GROUPED_GEMM, MOE,
    GROUPED_GEMM_FP8, MOE_FP8, MODEL, MOE_DISPATCH, PRECISION, kda.spec(GATED_DELTA_RULE))}
# Every axis of every op, in order: the CSV's shape columns.
ALL_AXES = tuple(dict.fromkeys(axis for spec in OPS.values() for axis in spec.axes))
# Names the sweep's command line still accepts, with the name each stands for (said when used).
RENAMED = {"moe_gemm": "grouped_gemm"}
