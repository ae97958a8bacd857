"""The state dtype's report: where a bfloat16 state's error passes THRESHOLD (crossing), the summary lines, the table
of the rows, and the PNGs (plot)."""
from __future__ import annotations

import math
from pathlib import Path

from bench.suites.precision.run import CONTEXTS, GATES, GPU_MEMORY_BYTES, MODES, QWEN35, THRESHOLD


_COLORS = {"float32": "tab:blue", "bfloat16": "tab:red", "float16": "tab:green"}


_STYLES = {"recurrent": "-o", "chunk": "--s"}


def plot(rows, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from bench.plots import _legend_outside

    def tokens_axis(ax, values):  # ticks at the grid's T, every other one when many: 256, 1K, 64K
        ticks = sorted(values)[::2 if len(values) > 6 else 1]
        ax.set_xticks(ticks, [f"{t // 1024}K" if t >= 1024 else str(t) for t in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())

    errors = [r for r in rows if r.get("phase") == "error" and not r.get("error")]
    written = []
    panels = sorted({(r["heads"], r["gate"]) for r in errors}, key=lambda p: (GATES.index(p[1]), p[0]))
    dtypes = [d for d in ("float32", "bfloat16", "float16") if any(r["dtype"] == d for r in errors)]
    for column, what in (("rel_err_o", "o (tokens since the previous T)"), ("rel_err_state", "final state")):
        if not panels:
            break
        fig, axes = plt.subplots(len(dtypes), len(panels), figsize=(4.2 * len(panels) + 2.2, 3.2 * len(dtypes)),
                                 squeeze=False, sharex="col")
        for i, dtype in enumerate(dtypes):
            for j, (shape, gate) in enumerate(panels):
                ax = axes[i][j]
                for backend in sorted({r["backend"] for r in errors}):
                    for mode in MODES:
                        for sd in _COLORS:
                            pts = sorted((r["T"], r[column]) for r in errors if (r["dtype"], r["heads"], r["gate"],
                                         r["backend"], r["mode"], r["state_dtype"]) == (dtype, shape, gate, backend,
                                                                                        mode, sd))
                            if pts:
                                ax.plot(*zip(*pts), _STYLES[mode], color=_COLORS[sd], markersize=3,
                                        label=f"{sd} state, {mode}" + (f" [{backend}]" if backend != "torch" else ""))
                ax.axhline(THRESHOLD, color="grey", linewidth=0.6, linestyle=":")
                ax.set(xscale="log", yscale="log", title=f"{dtype} inputs, gate {gate}\n{shape}")
                ax.title.set_fontsize(8)
                tokens_axis(ax, {r["T"] for r in errors if (r["heads"], r["gate"]) == (shape, gate)})
                if i == len(dtypes) - 1:
                    ax.set_xlabel("T (tokens)")
                if j == 0:
                    ax.set_ylabel(f"rel. error of {column.removeprefix('rel_err_')}")
        _legend_outside(axes[0][-1])
        fig.suptitle(f"Gated delta rule: error of {what} against float64, by state dtype", fontsize=10)
        fig.tight_layout()
        path = out / f"precision_error_{column.removeprefix('rel_err_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    memory = [r for r in rows if r.get("phase") == "memory"]
    if memory:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
        sizes = {"float32": "float32 state", "bfloat16": "16-bit state (bf16 or fp16)"}  # fp16's bytes are bf16's
        for label, marker in (("bf16", "-o"), ("fp8 experts", "--s")):
            for sd, name in sizes.items():
                pts = sorted((r["context"], r["sequences"]) for r in memory
                             if r["state_dtype"] == sd and r["weights"] == label)
                axes[1].plot(*zip(*pts), marker, color=_COLORS[sd], label=f"{name}, {label} weights")
        for sd, name in sizes.items():
            pts = sorted((r["context"], r["cache_bytes"] / 2**20) for r in memory
                         if r["state_dtype"] == sd and r["weights"] == "bf16")
            axes[0].plot(*zip(*pts), "-o", color=_COLORS[sd], label=name)
        axes[0].set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="MiB per sequence",
                    title="Cache of one sequence, Qwen3.5-35B-A3B")
        axes[1].set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="sequences",
                    title=f"Sequences in {GPU_MEMORY_BYTES / 1e9:.0f} GB beside the weights")
        for ax in axes:
            tokens_axis(ax, CONTEXTS)
            _legend_outside(ax)
        fig.tight_layout()
        path = out / "precision_memory.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def crossing(rows, threshold: float = THRESHOLD):
    """The first T whose rel_err_o reaches threshold in these rows (sorted by T), or None."""
    return next((r["T"] for r in sorted(rows, key=lambda r: r["T"]) if r["rel_err_o"] >= threshold), None)


def summary(rows) -> list[str]:
    """The report's answers: where a bfloat16 state's output error passes 1 % (Qwen3.5-35B shape and the
    extremes), and what a float32 state costs against bfloat16 in memory and decode time."""
    lines = []
    errors = [r for r in rows if r.get("phase") == "error" and r.get("rel_err_o") == r.get("rel_err_o")
              and r.get("rel_err_o") is not None and not r.get("error")]
    order = lambda key: (key[0] != QWEN35.key, key)  # noqa: E731  (the 35B shape first)
    for key in sorted({(r["heads"], r["gate"], r["dtype"], r["mode"], r["backend"]) for r in errors}, key=order):
        shape, gate, dtype, mode, backend = key
        series = {sd: [r for r in errors if (r["heads"], r["gate"], r["dtype"], r["mode"], r["backend"]) == key
                       and r["state_dtype"] == sd] for sd in ("bfloat16", "float32")}
        if not series["bfloat16"]:
            continue
        top = max(series["bfloat16"], key=lambda r: r["T"])
        at = crossing(series["bfloat16"])
        f32 = next((r["rel_err_o"] for r in series["float32"] if r["T"] == top["T"]), math.nan)
        if at is None:
            verdict = f"stays under 1% up to T = {int(top['T'])}"
        elif at == min(r["T"] for r in series["bfloat16"]):
            verdict = f"is past 1% from the first T measured, {int(at)},"
        else:
            verdict = f"passes 1% at T = {int(at)}"
        lines.append(f"{shape}, gate {gate}, {dtype} inputs, {mode} [{backend}]: a bfloat16 state's output error "
                     + verdict
                     + f" ({top['rel_err_o']:.2e} at T = {int(top['T'])}; float32 state {f32:.2e})")
    for r in rows:
        if r.get("phase") == "fp8" and not r.get("error"):
            lines.append(f"expert layer {r['heads']} [{r['backend']}], {r['layer']}: relative error "
                         f"{r['rel_err_o']:.2e} against the float64 layer on the unquantized weights")
        if r.get("phase") == "model" and not r.get("error"):
            lines.append(f"model ({r['heads']}, {r['variant']}) against the float32 model over {int(r['new_tokens'])} "
                         f"greedy tokens: first differing token at step {int(r['first_divergence'])}; "
                         f"teacher-forced, {r['token_agreement']:.1%} of the greedy tokens agree, logits' relative "
                         f"error median {r['logits_rel_err_median']:.1e}, max {r['logits_rel_err_max']:.1e}")
    memory = {(r["state_dtype"], r["context"], r["weights"]): r for r in rows if r.get("phase") == "memory"}
    for context in CONTEXTS:
        f32, bf16 = memory.get(("float32", context, "bf16")), memory.get(("bfloat16", context, "bf16"))
        if f32 and bf16:
            lines.append(f"memory at {context} tokens (Qwen3.5-35B-A3B, bf16 weights): a float32 state takes "
                         f"{f32['state_bytes'] / 2**20:.1f} MiB per sequence against {bf16['state_bytes'] / 2**20:.1f} "
                         f"(cache {f32['cache_bytes'] / 2**20:.1f} against {bf16['cache_bytes'] / 2**20:.1f} MiB): "
                         f"{int(f32['sequences'])} sequences fit in {GPU_MEMORY_BYTES / 1e9:.0f} GB against "
                         f"{int(bf16['sequences'])} ({bf16['sequences'] / max(f32['sequences'], 1):.2f}x)")
    decode = [r for r in rows if r.get("phase") == "decode" and r.get("median_ms") == r.get("median_ms")
              and r.get("median_ms") is not None and not r.get("error")]
    for backend, B in sorted({(r["backend"], r["B"]) for r in decode}):
        at = {r["state_dtype"]: r["median_ms"] for r in decode if (r["backend"], r["B"]) == (backend, B)}
        if "float32" in at and "bfloat16" in at:
            device = decode[0]["device"]
            lines.append(f"decode step of one layer, B = {int(B)} [{backend}, {device}]: float32 state "
                         f"{at['float32'] * 1e3:.1f} us, bfloat16 {at['bfloat16'] * 1e3:.1f} us "
                         f"({at['float32'] / at['bfloat16']:.2f}x)" + (
                             "; timed on a shared CPU, not the final number: `python -m bench.suites.precision.run --device "
                             "cuda` on a GPU" if device == "cpu" else ""))
    return lines


def table(rows) -> str:
    """The error rows as one line per (shape, gate, inputs, mode, state dtype): rel_err_o at each T."""
    from bench.report import _table

    errors = [r for r in rows if r.get("phase") == "error"]
    if not errors:
        return ""
    Ts = sorted({int(r["T"]) for r in errors})
    lines = {}
    for r in errors:
        key = (r["heads"], r["gate"], r["dtype"], r["mode"], r["state_dtype"], r["backend"])
        lines.setdefault(key, {})[int(r["T"])] = "error" if r.get("error") else f"{r['rel_err_o']:.1e}"
    body = [[f"`{k[0]}`", *k[1:], *[v.get(T, "") for T in Ts]] for k, v in sorted(lines.items())]
    return _table(["heads", "gate", "inputs", "mode", "state", "backend", *[f"T={T}" for T in Ts]], body)
