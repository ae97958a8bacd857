"""The serving bench's report: the summary lines (the ledger, pooled against gather / scatter, verify against decode
steps, the chunk states' cost, tables in Markdown) and the PNGs (plot)."""
from __future__ import annotations

import math
from pathlib import Path

PARTS = (("weights_bytes", "weights"), ("experts_bytes", "experts"), ("state_bytes", "recurrent state"),
         ("conv_bytes", "conv state"), ("kv_bytes", "KV"))


OWN_PHASES = ("ledger", "pooled", "gather", "verify", "steps", "prefix")


def _timed(rows, phase):
    """Measured rows of a phase (no error, a time)."""
    return [r for r in rows if r.get("phase") == phase and not r.get("error") and r.get("median_ms") is not None
            and r["median_ms"] == r["median_ms"]]


def _at(rows, **match):
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def _ms(ms: float) -> str:
    return f"{ms * 1e3:.0f} us" if ms < 1 else f"{ms:.2f} ms" if ms < 100 else f"{ms / 1e3:.2f} s"


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def plot(rows, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.plots import _legend_outside

    out, written = Path(out), []
    backends = sorted({r["backend"] for r in rows if r.get("phase") in OWN_PHASES[1:] and not r.get("error")})

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    ledger = [r for r in rows if r.get("phase") == "ledger"]
    if ledger:
        contexts = sorted({int(r["context"]) for r in ledger})
        fig, axes = plt.subplots(1, len(contexts), figsize=(5.5 * len(contexts) + 1.5, 3.8), squeeze=False)
        for ax, context in zip(axes[0], contexts):
            at = sorted((r for r in ledger if r["context"] == context), key=lambda r: r["B"])
            labels = [str(int(r["B"])) for r in at]
            bottom = [0.0] * len(at)
            for column, name in PARTS:  # shares: the step grows 40x from B = 1 to 256
                heights = [r[column] / r["step_bytes"] for r in at]
                ax.bar(labels, heights, bottom=bottom, label=name)
                bottom = [b + h for b, h in zip(bottom, heights)]
            for x, r in enumerate(at):
                ax.annotate(f"{_bytes(r['step_bytes'])}\nfloor {_ms(r['floor_ms'])}", (x, 1.0), ha="center",
                            va="bottom", fontsize=7)
            ax.set(ylim=(0, 1.15), xlabel="batch B", ylabel="share of the step's bytes",
                   title=f"Qwen3.5-35B-A3B decode step at {context // 1024}K tokens")
            ax.title.set_fontsize(9)
        _legend_outside(axes[0][-1])
        save(fig, "serving_ledger.png")
    decode = _timed(rows, "pooled") + _timed(rows, "gather")
    if decode:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        for backend in backends:
            for phase, style in (("pooled", "-o"), ("gather", "--s")):
                pts = sorted((r["B"], r["median_ms"], r["floor_ms"]) for r in decode
                             if (r["backend"], r["phase"]) == (backend, phase))
                if pts:
                    axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, markersize=4,
                                 label=f"{backend}, {'pooled (in place)' if phase == 'pooled' else 'gather / scatter'}")
            ratio = sorted((r["B"], _at(decode, backend=backend, phase="gather", B=r["B"])["median_ms"] / r["median_ms"])
                           for r in decode if (r["backend"], r["phase"]) == (backend, "pooled")
                           and _at(decode, backend=backend, phase="gather", B=r["B"]))
            if ratio:
                axes[1].plot(*zip(*ratio), "-o", markersize=4, label=backend)
        floor = sorted({(r["B"], r["floor_ms"]) for r in decode})
        axes[0].plot(*zip(*floor), ":", color="grey", label="floor: state bytes at measured bandwidth")
        axes[0].set(xscale="log", yscale="log", xlabel="batch B (pool of 2B rows)", ylabel="ms per decode step",
                    title="One layer's decode step, Qwen3.5-35B-A3B heads, float32")
        axes[1].axhline(1.3, color="grey", linewidth=0.6, linestyle=":")
        axes[1].set(xscale="log", xlabel="batch B", ylabel="gather / scatter time over pooled",
                    title="Pooled decode's speedup (target 1.3x at B = 64)")
        for ax in axes:
            ax.title.set_fontsize(9)
            _legend_outside(ax)
        save(fig, "serving_decode.png")
    verify, steps = _timed(rows, "verify"), _timed(rows, "steps")
    if verify or steps:
        fig, ax = plt.subplots(figsize=(7.5, 4))
        for backend in backends:
            pts = sorted((r["T"], r["median_ms"]) for r in verify if r["backend"] == backend)
            if pts:
                ax.plot(*zip(*pts), "-o", markersize=4, label=f"{backend}: verify T tokens + commit")
            pts = sorted((r["k"], r["median_ms"]) for r in steps if r["backend"] == backend)
            if pts:
                ax.plot(*zip(*pts), "--s", markersize=4, label=f"{backend}: k decode steps")
        B = int((verify or steps)[0]["B"])
        ax.set(xlabel="draft tokens T / decode steps k", ylabel="ms", title=f"Speculative verify against decode "
               f"steps, B = {B}, one layer")
        ax.title.set_fontsize(9)
        _legend_outside(ax)
        save(fig, "serving_verify.png")
    prefix = _timed(rows, "prefix")
    if prefix:
        fig, ax = plt.subplots(figsize=(7.5, 4))
        for backend in backends:
            for every in sorted({int(r["every"]) for r in prefix}):
                pts = sorted((r["T"], r["median_ms"]) for r in prefix if (r["backend"], r["every"]) == (backend, every))
                if pts:
                    ax.plot(*zip(*pts), "-o" if every == 0 else "--s", markersize=4,
                            label=f"{backend}, " + (f"chunk states every {every}" if every else "no chunk states"))
        ax.set(xscale="log", yscale="log", xlabel="prefix length T (tokens)", ylabel="ms per prefill",
               title="Prefill of one sequence, with and without chunk_states_every")
        ax.title.set_fontsize(9)
        _legend_outside(ax)
        save(fig, "serving_prefix.png")
    return written


def _ledger_lines(rows) -> list[str]:
    ledger = sorted((r for r in rows if r.get("phase") == "ledger"), key=lambda r: (r["context"], r["B"]))
    if not ledger:
        return []
    pooled = _timed(rows, "pooled")
    lines = ["", "Bytes of one decode step of Qwen3.5-35B-A3B (bf16 weights, KV, conv state; float32 recurrent state), "
             "its floor at the bandwidth measured on that working set (at most 1 GiB), and the recurrent state's "
             "part measured: one layer's pooled decode step (fastest backend) against its floor, times the linear "
             "layers", "",
             "| B | context | " + " | ".join(name for _, name in PARTS) + " | step | state share | step floor | "
             "state part: one layer measured / floor | all linear layers |", "|" + "---|" * 12]
    for r in ledger:
        best = min((p for p in pooled if p["B"] == r["B"]), key=lambda p: p["median_ms"], default=None)
        layers = int(r["linear_layers"])
        measured = (f"{_ms(best['median_ms'])} / {_ms(best['floor_ms'])} ({best['x_floor']:.1f}x, `{best['backend']}`)"
                    if best else "not measured")
        total = f"{_ms(layers * best['median_ms'])}" if best else ""
        lines.append(f"| {int(r['B'])} | {int(r['context'])} | "
                     + " | ".join(_bytes(r[column]) for column, _ in PARTS)
                     + f" | {_bytes(r['step_bytes'])} | {r['state_share']:.1%} | {_ms(r['floor_ms'])} | {measured} | "
                       f"{total} |")
    return lines + [""]


def summary(rows) -> list[str]:
    """The report's answers: pooled against gather / scatter decode per batch, verify of T tokens against one and
    against k decode steps (from what k a verify of T pays), what keeping chunk states adds to a prefill, the
    ledger's table, and the model part's rows."""
    lines = []
    decode = _timed(rows, "pooled") + _timed(rows, "gather")
    for backend in sorted({r["backend"] for r in decode}):
        pairs = [(r, _at(decode, backend=backend, phase="gather", B=r["B"])) for r in
                 sorted(decode, key=lambda r: r["B"]) if (r["backend"], r["phase"]) == (backend, "pooled")]
        said = ", ".join(f"B = {int(p['B'])} {g['median_ms'] / p['median_ms']:.2f}x ({_ms(p['median_ms'])}, "
                         f"{p['x_floor']:.1f}x its floor)" for p, g in pairs if g)
        if said:
            lines.append(f"pooled decode (state_indices, in place) over gather / scatter decode [{backend}]: {said}")
    verify, steps = _timed(rows, "verify"), _timed(rows, "steps")
    for backend in sorted({r["backend"] for r in verify}):
        one = _at(steps, backend=backend, k=1)
        if one is None:
            continue
        said = []
        for r in sorted((r for r in verify if r["backend"] == backend), key=lambda r: r["T"]):
            pays = next((int(s["k"]) for s in sorted(steps, key=lambda s: s["k"])
                         if s["backend"] == backend and s["median_ms"] >= r["median_ms"]), None)
            said.append(f"T = {int(r['T'])} {r['median_ms'] / one['median_ms']:.2f}x one step ("
                        + (f"pays from k = {pays} accepted" if pays else "k steps measured are all cheaper") + ")")
        lines.append(f"speculative verify + commit at B = {int(one['B'])} [{backend}], against one decode step of "
                     f"{_ms(one['median_ms'])}: " + "; ".join(said))
    prefix = _timed(rows, "prefix")
    for backend in sorted({r["backend"] for r in prefix}):
        plain = {r["T"]: r["median_ms"] for r in prefix if r["backend"] == backend and r["every"] == 0}
        for every in sorted({int(r["every"]) for r in prefix if r["every"]}):
            said = ", ".join(f"T = {int(r['T'])} {r['median_ms'] / plain[r['T']] - 1:+.1%}"
                             for r in sorted(prefix, key=lambda r: r["T"])
                             if (r["backend"], r["every"]) == (backend, every) and r["T"] in plain)
            if said:
                lines.append(f"prefill keeping the states every {every} tokens (chunk_states_every) against none "
                             f"[{backend}]: {said}")
    lines += _ledger_lines(rows)
    for r in rows:
        if r.get("phase") not in OWN_PHASES:  # the model part's rows (model_part.py)
            measured = {k: r[k] for k in ("median_ms", "tokens_per_s", "accepted", "drafted", "reused")
                        if isinstance(r.get(k), (int, float)) and not math.isnan(r[k])}
            lines.append(f"model part, {r.get('shape')} [{r.get('backend')}]: "
                         + (r["error"] if r.get("error") else ", ".join(f"{k} {v:.4g}" for k, v in measured.items())))
    return lines
