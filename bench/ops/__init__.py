"""The bench's knowledge of every op: one file per op family (tritonbench keeps one operator per folder), and here
what they share.

A family file (linear_attention.py, gated_delta_rule.py, attention.py, moe.py, moe_fp8.py; model.py,
moe_dispatch.py and precision.py for the sweeps of their own) holds, for each of its ops, its input maker
(`<op>_inputs`: the keyword arguments of kernellab.<op>, shared by the tests and the benchmarks), its forward and
backward cost (`<op>_cost`, `<op>_backward_cost`: analytic FLOPs and bytes), its sweep grid at each scale (the
"quick" one CI's) and its model presets, its yardstick policy (how large a case the slow float64 reference may
check, its tolerance), the targets and anchors the report computes, and the tests' cases (a tiny sweep case,
the gradients' edge cases, the batch-invariance batches), in an `OpSpec`; the file lists its specs in `SPECS`. `OPS` below collects them: the lab's ops in the order of kernellab/ops.py, then the sweeps of
their own. A new op family is a new file here; nothing else in bench/ names an op.

An `OpSpec` holds the op's name (the API's: the registry op, `--op` of the sweep, the CSV's op column, the
report's section and the plots' file names). A shape is a dict axis -> value (ints; strings for the categorical
axes, mode and routing); a `Case` is an op's shape with the model preset it came from, and its key is the shape
string of the CSV ("N=64,D=512,...").

Input makers draw fresh from `seed` on the CPU generator (so a seed means the same numbers on every device) and
then move to `device`. Value ranges follow the models: log-sigmoid gates, sigmoid beta, unit-scale weights.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable

import torch

from kernellab.ops import NAMES as LAB_OPS

CATEGORICAL_AXES = ("mode", "routing")
# What a sweep row times: the op's forward call, its backward alone (the gradients of every differentiable input
# from fixed random output gradients, on a graph built once) or both in one call.
PASSES = ("forward", "backward", "forward+backward")


FASTEST_PEER = "fastest peer"  # Target.peer of a "peer" target against whichever peer is fastest on its rows


@dataclass(frozen=True)
class Target:
    """A published or issued target the report computes from the rows, its heading saying the target.

    kind: "ceiling" (best lab row's FLOP/s over the matmul ceiling of its run >= threshold), "floor" (best lab
    row's time over its bytes at the run's copy bandwidth <= threshold), "peer" (the peer's time over the best lab
    row's >= threshold; peer FASTEST_PEER: the fastest peer row on those rows), "crossover" (this linear op is at least as fast as the best lab softmax attention from
    T <= threshold on), "op" (the best lab row of op `peer` on the same match over this op's best lab row, in
    time, >= threshold: the same FLOPs in another form, as the fp8 layer against the bf16 one), "speedup" (per lab
    backend, its rows matching `against` over its rows matching `match`, in time, >= threshold: the same backend in
    two ways, as pooled against gather / scatter decode), "cost" (the same ratio the other way up, <= threshold: a
    verify call against one decode step). match: the rows it reads (columns -> values)."""

    title: str
    kind: str
    threshold: float
    match: dict = field(default_factory=dict)
    peer: str = ""
    against: dict = field(default_factory=dict)


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
    maker:       the op's input maker: keywords -> the keyword arguments of kernellab.<op> (dtype, device and seed
                 among its keywords: drawn on the CPU generator from the seed, then moved to device).
    make:        shape -> keywords of the op's maker (dtype, device, seed added by the caller).
    grid:        scale ("quick", "cpu", "cuda") -> shapes; one axis varied at a time around a base shape.
    presets:     scale ("cpu", "cuda") -> [(model, shape)]: the shapes of real models (ANCHORS.md).
    cost:        the op's inputs (plus call keywords) -> (FLOPs, bytes) of one call (the family file's
                 <op>_cost: a multiply-add counts 2; bytes the fewest the call must move).
    backward_cost: the same for its backward (the family file's <op>_backward_cost): a differentiable op, whose
                 sweep may time the passes "backward" and "forward+backward" (PASSES) beside "forward"; None:
                 forward only.
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
    sweep:       the package of a sweep of its own (bench.suites.<name>), run instead of the registry's
                 backends: its run.sweep(quick, device, out, backends, on_rows, done) -> rows, made in
                 bench.suites.pieces (each piece's rows to on_rows as it finishes; the pieces in done, already in a
                 resumed run's CSV, skipped), with a `preset` keyword when the op has presets (its cases are then the op's own: grid and presets as above); its report.summary(rows)
                 -> lines for the report (its targets: each a sentence the report makes a bullet, or a Markdown line
                 kept as it is: empty, a heading "#...", a table row "|..."), and report.table(rows) -> the Markdown
                 table of its rows where it has one (default: every column that has a value, one line per row).
                 Such an op has no registry entry and runs alone.
    tolerance:   the least parity gate of this op's rows (its own rounding's floor), beside the dtype's.
    tiny:        a shape of the sweep's axes small enough for the tests' sweeps (tests/bench/test_bench.py).
    gradient_cases: the edge cases of the op's gradients (tests/ops/test_backward.py): case name -> keywords of the
                 maker, plus the forward's `mode` where it has one; short, the reference's autograd runs them.
    gradient_spot_checks: the two of gradient_cases that a backend whose backward is not its own (another's,
                 or a peer's autograd) runs, and the GPU's.
    invariance:  the batches of tests/ops/test_invariance.py: how the backend reaches CPU tensors ("cpu",
                 "interpret", "cudasim") -> {part kind: keywords of the maker}; the part kinds: "batch" and "packed"
                 (a recurrent op's sequences, of a batch or packed), "rows" (attention's batch rows), "token"
                 (an MoE op's tokens), "expert" (grouped_gemm's expert blocks).
    swept_with:  the op whose sweep this one joins in gpu_check's run (one sweep of both: their ratio measured in one
                 run, and one share of the run's time).
    """

    name: str
    axes: tuple[str, ...] = ()
    maker: Callable[..., dict] | None = None
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
    sweep: ModuleType | None = None
    backend_ops: tuple[str, ...] = ()
    swept_with: str | None = None
    tolerance: float = 0.0
    tiny: dict = field(default_factory=dict)
    gradient_cases: dict = field(default_factory=dict)
    gradient_spot_checks: tuple[str, ...] = ()
    invariance: dict = field(default_factory=dict)

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
        return self.maker(**self.make(case.shape), dtype=dtype, device=device, seed=seed)


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


# ------------------------------------------------------------------- shapes the sweeps share (real models, scales)

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
PRESET_TOKENS = (1, 16, 64, 256, 512, 4096)
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


# ------------------------------------------------------------------------------------- what input makers share

def generator(seed):
    return torch.Generator().manual_seed(seed)


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def to_device(inputs, dtype, device, keep_dtype=()):
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and key not in keep_dtype:
                value = value.to(dtype)
            value = value.to(device)
        out[key] = value
    return out


def cu_seqlens_of(seqlens, device="cpu"):
    """int32 [N + 1] offsets of packed sequences of the given lengths."""
    return torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def time_layout(B, T, seqlens):
    """(B, T, cu_seqlens or None, N): packed sequences put all of them in one row of batch 1."""
    if seqlens is None:
        return B, T, None, B
    return 1, int(sum(seqlens)), cu_seqlens_of(seqlens), len(seqlens)


def nbytes(*tensors) -> int:
    """The bytes of the tensors among the arguments (None and other values count 0), for the cost models."""
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


# ------------------------------------------------------------------------------------------------ the op table

def _collect() -> dict[str, OpSpec]:
    """Every family file's SPECS: the lab's ops in kernellab/ops.py's order, then the sweeps of their own by file
    name. Family files are found, not listed: a new one needs no line here (a module named _* is a helper)."""
    found: dict[str, OpSpec] = {}
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
        for spec in importlib.import_module(f"{__name__}.{module}").SPECS:
            if spec.name in found:
                raise RuntimeError(f"bench/ops/{module}.py declares {spec.name!r}, declared before")
            if spec.registry and spec.name not in LAB_OPS:
                raise RuntimeError(f"bench/ops/{module}.py declares {spec.name!r}, not an op of kernellab/ops.py")
            found[spec.name] = spec
    lab = [found.pop(name) for name in LAB_OPS if name in found]
    return {spec.name: spec for spec in lab + list(found.values())}


OPS: dict[str, OpSpec] = _collect()
# Every axis of every op, in order: the CSV's shape columns.
ALL_AXES = tuple(dict.fromkeys(axis for spec in OPS.values() for axis in spec.axes))
# Names the sweep's command line still accepts, with the name each stands for (said when used).
RENAMED = {"moe_gemm": "grouped_gemm"}
# The input maker of each op: make(op, **keywords) -> kernellab.<op>'s keyword arguments.
MAKERS = {name: spec.maker for name, spec in OPS.items() if spec.maker is not None}


def make(op: str, **keywords) -> dict:
    """Inputs of op: kernellab.<op>(**make(op, ...)); keywords: its maker's (shape, dtype, device, seed, ...)."""
    return MAKERS[op](**keywords)
