"""The model sweep's report: the targets and floors in lines (summary), the PNGs (plot)."""
from __future__ import annotations

import math
from pathlib import Path

from bench.ops import OPS
from bench.peers import llama_cpp, vllm_engine
from bench.suites.model.config import MEMORY_CONTEXTS
from model.train import STEP_PARTS


VARIANT_STYLE = {"hybrid": "-o", "all_attention": "--s"}


def _name(row) -> str:
    """The runner of a row in the plots: its backend, "torch bf16" for a lab backend's bf16 rows on CPU (beside
    vLLM's engine; the CPU sweep's own rows are float32)."""
    bf16 = not _peer(row) and row.get("device") == "cpu" and row.get("dtype") == "bfloat16"
    return row["backend"] + (" bf16" if bf16 else "")


def _series(rows, phase, key="tokens_per_s"):
    """{(runner, variant): [(context, value)]} of the measured rows of a phase (runner: _name)."""
    found = {}
    for r in rows:
        if r.get("phase") == phase and not r.get("error") and r.get(key) is not None:
            found.setdefault((_name(r), r["variant"]), []).append((int(r["context"]), r[key]))
    return {k: sorted(v) for k, v in sorted(found.items())}


def _colors(rows):
    import matplotlib.pyplot as plt

    names = sorted({_name(r) for r in rows if r.get("phase") in ("prefill", "decode", "train")})
    # tab20 past the default cycle's ten: a runner per colour (the bf16 rows make more than ten)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"] if len(names) <= 10 else \
        [plt.get_cmap("tab20")(i) for i in range(20)]
    return {name: cycle[i % len(cycle)] for i, name in enumerate(names)}


def _legend_below(fig, axes, columns=3):
    """One legend for the figure, under the axes (never over the data)."""
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=columns, fontsize=7,
               frameon=False)


def plot(rows, out: Path):
    """model_cache_memory.png, model_tokens_per_s.png, model_gap.png, model_decode_floor.png and, with training
    rows, model_train.png into out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = _colors(rows)
    fig, ax = plt.subplots(figsize=(6, 4.6), layout="constrained")
    for shape, color in (("bench config", "C0"), ("Qwen3.5-35B-A3B", "C1")):
        for variant, style in VARIANT_STYLE.items():
            pts = [(r["context"], r["cache_bytes"] / 2**20) for r in rows
                   if r.get("phase") == "cache" and r["shape"] == shape and r["variant"] == variant]
            if pts:
                ax.plot(*zip(*pts), style, color=color, label=f"{shape}, {variant}")
    ax.set(xscale="log", yscale="log", ylabel="cache (MiB, batch 1)", title="Recurrent state + KV cache")
    _context_axis(ax, list(MEMORY_CONTEXTS))
    _legend_below(fig, [ax], 2)
    fig.savefig(out / "model_cache_memory.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8), layout="constrained")
    for ax, phase in zip(axes, ("prefill", "decode")):
        for (backend, variant), pts in _series(rows, phase).items():
            ax.plot(*zip(*pts), VARIANT_STYLE[variant], color=colors[backend], label=f"{backend}, {variant}")
        ax.set(xscale="log", yscale="log", ylabel="tokens/s", title=phase)
        _context_axis(ax, sorted({c for pts in _series(rows, phase).values() for c, _ in pts}))
    fig.suptitle("The model: hybrid (3 Gated DeltaNet : 1 attention) and its all-attention twin")
    _legend_below(fig, axes, 4)
    fig.savefig(out / "model_tokens_per_s.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8), layout="constrained")
    for ax, phase in zip(axes, ("prefill", "decode")):
        series = _series(rows, phase)
        for backend in sorted({b for b, _ in series}):
            hybrid, twin = dict(series.get((backend, "hybrid"), [])), dict(series.get((backend, "all_attention"), []))
            pts = [(c, hybrid[c] / twin[c]) for c in sorted(hybrid) if c in twin]
            if pts:
                ax.plot(*zip(*pts), "-o", color=colors[backend], label=backend)
        if phase == "decode":  # what bandwidth alone predicts: the twin's bytes per step over the hybrid's
            steps = _series(rows, "decode", "step_bytes")
            hybrid = dict(next((v for (b, var), v in steps.items() if var == "hybrid"), []))
            twin = dict(next((v for (b, var), v in steps.items() if var == "all_attention"), []))
            pts = [(c, twin[c] / hybrid[c]) for c in sorted(hybrid) if c in twin]
            if pts:
                ax.plot(*zip(*pts), ":", color="black", label="bytes per step, all-attention / hybrid")
        ax.axhline(1, color="grey", linewidth=0.8)
        ax.set(xscale="log", ylabel="hybrid tokens/s / all-attention tokens/s", title=f"{phase}: the hybrid's lead")
        _context_axis(ax, sorted({c for pts in series.values() for c, _ in pts}))
    _legend_below(fig, axes, 4)
    fig.savefig(out / "model_gap.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.8), layout="constrained", width_ratios=(1.3, 1, 1))
    ax = axes[0]
    for (backend, variant), pts in _series(rows, "decode", "median_ms").items():
        ax.plot(*zip(*pts), VARIANT_STYLE[variant][-1], color=colors[backend], label=f"{backend}, {variant}")
    floors = _series(rows, "decode", "floor_ms")
    for variant, style in VARIANT_STYLE.items():
        # the floor is the checkpoint's (any backend's rows give it): the series over the most contexts
        pts = max((v for (b, var), v in floors.items() if var == variant), key=len, default=None)
        if pts:
            ax.plot(*zip(*pts), style[:-1], color="black", label=f"floor, {variant}")
    ax.set(xscale="log", yscale="log", ylabel="ms per decode step (batch 1)",
           title="decode step: measured (markers), floor (lines)")
    parts = {"weights": "C7", "experts": "C2", "states": "C4", "kv": "C3"}
    top = 0
    for ax, variant in zip(axes[1:], VARIANT_STYLE):
        by_part = {part: dict(max((v for (b, var), v in _series(rows, "decode", f"{part}_bytes").items()
                                   if var == variant), key=len, default=[])) for part in parts}
        contexts = sorted(by_part["weights"])
        if contexts:
            ax.stackplot(contexts, *[[by_part[part][c] / 2**20 for c in contexts] for part in parts],
                         colors=list(parts.values()), labels=[f"bytes: {part}" for part in parts], alpha=0.8)
            top = max(top, sum(by_part[part][contexts[-1]] for part in parts) / 2**20)
        ax.set(xscale="log", ylabel="MiB moved per decode step", title=f"bytes per step, {variant}")
    for ax in axes[1:]:
        ax.set_ylim(0, 1.05 * top or 1)
    for ax in axes:
        _context_axis(ax, sorted({int(r["context"]) for r in rows if r.get("phase") == "decode"}))
    _legend_below(fig, axes, 5)
    fig.savefig(out / "model_decode_floor.png", dpi=120)
    plt.close(fig)

    train = _measured(rows, "train")
    if train:
        _plot_training(train, out / "model_train.png")


def _plot_training(train, path: Path) -> None:
    """Horizontal bars, one per runner at the longest trained context: ms per training step split into forward,
    backward and optimizer (the median of each part), the step's p20-p80 as a whisker, tokens/s at the end."""
    import matplotlib.pyplot as plt

    context = max(int(r["context"]) for r in train)
    at = sorted((r for r in train if int(r["context"]) == context), key=lambda r: r["tokens_per_s"])
    theirs = next((r for r in at if r["backend"] == "transformers"), None)
    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.45 * len(at)), layout="constrained")
    y = range(len(at))
    left = [0.0] * len(at)
    for part, color in zip(STEP_PARTS, ("C0", "C1", "C2")):
        widths = [r[f"{part}_ms"] for r in at]
        ax.barh(y, widths, left=left, color=color, height=0.6, label=part)
        left = [a + b for a, b in zip(left, widths)]
    ax.errorbar([r["median_ms"] for r in at], y, xerr=[[r["median_ms"] - r["p20_ms"] for r in at],
                                                     [r["p80_ms"] - r["median_ms"] for r in at]],
                fmt="none", color="black", capsize=3, linewidth=1, label="whole step, p20-p80")
    for i, r in enumerate(at):
        vs = f", {r['tokens_per_s'] / theirs['tokens_per_s']:.2f}x transformers" if theirs and r is not theirs else ""
        ax.annotate(f" {r['tokens_per_s']:.0f} tok/s{vs}", (max(r["p80_ms"], left[i]), i), va="center", fontsize=8)
    ax.set_yticks(list(y), [r["backend"] + (" (peer)" if _peer(r) else "") for r in at])
    ax.set_xlim(0, 1.35 * max(max(r["p80_ms"], w) for r, w in zip(at, left)))
    ax.set(xlabel="ms per training step (median of each part)",
           title=f"Training step (forward, backward, AdamW) on {context} tokens, batch 1, {at[0]['dtype']}")
    _legend_below(fig, [ax], 4)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _context_axis(ax, contexts):
    """Ticks at the measured contexts, written 512, 1K, ..., 32K."""
    from matplotlib.ticker import NullLocator

    if contexts:
        ax.set_xticks(contexts, [f"{c // 1024}K" if c >= 1024 else str(c) for c in contexts])
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("context (tokens)")


def summary(rows) -> list[str]:
    """How decode was timed; the targets: ours / transformers at the longest prefill context (prefill, decode),
    the floors, llama.cpp, training, cache at 32K."""
    filled = sorted({int(r["context"]) for r in _measured(rows, "decode") if r.get("cache_fill") == "filled"})
    lines = [f"decode steps timed on caches filled to each context ({filled[0]} to {filled[-1]} tokens) from a short "
             f"real prefill's states, keys and values (model.cache.fill), not after a prefill of the context; "
             f"llama.cpp's (its cache cannot be filled from outside) after its prefills"] if filled else []
    longest = max((int(r["context"]) for r in _measured(rows, "prefill")), default=None)
    for phase in ("prefill", "decode"):
        hybrid = [r for r in _measured(rows, phase) if r["context"] == longest and r["variant"] == "hybrid"]
        dtype = next((r.get("dtype") for r in hybrid if r["backend"] == "transformers"), None)
        at = {r["backend"]: r["tokens_per_s"] for r in hybrid if r.get("dtype") == dtype}  # transformers' dtype
        for backend, tps in at.items():
            if backend != "transformers" and "transformers" in at:
                lines.append(f"{phase} at {longest}: {backend} {tps:.1f} tok/s = {tps / at['transformers']:.2f}x "
                             f"transformers ({at['transformers']:.1f} tok/s)")
        share = next((r.get("dense_share") for r in rows if r.get("phase") == phase and r["context"] == longest
                      and r["variant"] == "hybrid" and r["backend"] == "transformers"), None)
        if share is not None and share == share:  # not NaN
            lines.append(f"{phase} at {longest}: transformers spends {share:.0%} of its time in dense projections "
                         f"(nn.Linear), the same GEMMs in any implementation: at most {1 / share:.1f}x faster "
                         f"while they run as fast")
    lines += _floor_summary(rows) + _peer_summary(rows) + _train_summary(rows)
    for shape in ("bench config", "Qwen3.5-35B-A3B"):
        mem = {r["variant"]: r["cache_bytes"] for r in rows
               if r.get("phase") == "cache" and r["context"] == 32768 and r["shape"] == shape}
        if len(mem) == 2:
            lines.append(f"cache at 32K ({shape}): hybrid {mem['hybrid'] / 2**20:.1f} MiB, all-attention "
                         f"{mem['all_attention'] / 2**20:.1f} MiB, ratio {mem['hybrid'] / mem['all_attention']:.3f}")
    return lines


def _measured(rows, phase):
    return [r for r in rows if r.get("phase") == phase and not r.get("error") and r.get("median_ms") is not None]


def _peer(row) -> bool:
    """Whether the row is a peer's (the CSV may hold the flag as text)."""
    return str(row.get("peer")).lower() == "true"


def _at_most(rows, context):
    """The longest measured context up to `context` (the shortest beyond it when none is that short)."""
    found = sorted({int(r["context"]) for r in rows})
    return max((c for c in found if c <= context), default=found[0] if found else None)


def _floor_summary(rows) -> list[str]:
    """The decode floor's targets: the fastest lab backend at 2K (hybrid) and at the longest context (both
    variants), as multiples of their floors; the bytes per step of the twin over the hybrid's there."""
    # rows without a floor (written before the floor was measured, or a NaN read back from the CSV) are left out
    decode = [r for r in _measured(rows, "decode") if not _peer(r) and math.isfinite(r.get("x_floor", math.nan))]
    if not decode:
        return []
    lines = []
    longest = max(int(r["context"]) for r in decode)
    short = _at_most(decode, 2048)
    for context, variants in ((short, ("hybrid",) if short != longest else ()), (longest, ("hybrid", "all_attention"))):
        for variant in variants:
            at = [r for r in decode if int(r["context"]) == context and r["variant"] == variant]
            if at:
                best = min(at, key=lambda r: r["median_ms"])
                lines.append(f"decode floor at {context} ({variant}): {best['backend']} {best['median_ms']:.1f} ms "
                             f"per step = {best['x_floor']:.2f}x its floor ({best['floor_ms']:.1f} ms: "
                             f"{best['step_bytes'] / 2**20:.0f} MiB at {best['floor_gbps']:.1f} GB/s)")
    by_variant = {r["variant"]: r["step_bytes"] for r in decode if int(r["context"]) == longest}
    if len(by_variant) == 2:
        lines.append(f"bytes per decode step at {longest}: all-attention / hybrid = "
                     f"{by_variant['all_attention'] / by_variant['hybrid']:.2f}")
    return lines


def _peer_summary(rows) -> list[str]:
    """The lab's fastest backend against llama.cpp (F32; the lab's rows of the sweep's dtype) and vLLM's engine (the
    lab's bf16 rows) at 2K: prefill and decode tokens/s; the parity rows; the peers skipped."""
    lines = []
    for peer, label, bf16 in (("llama.cpp-f32", "llama.cpp F32", False), (vllm_engine.NAME, "vLLM's engine bf16", True)):
        for phase in ("prefill", "decode"):
            measured = [r for r in _measured(rows, phase) if r["variant"] == "hybrid"]
            context = _at_most(measured, 2048)
            at = [r for r in measured if int(r["context"]) == context]
            theirs = next((r for r in at if r["backend"] == peer), None)
            ours = [r for r in at if not _peer(r) and (_name(r) != r["backend"]) == bf16]
            if theirs and ours:
                best = max(ours, key=lambda r: r["tokens_per_s"])
                lines.append(f"{phase} at {context}: {_name(best)} {best['tokens_per_s']:.1f} tok/s = "
                             f"{best['tokens_per_s'] / theirs['tokens_per_s']:.2f}x {label} "
                             f"({theirs['tokens_per_s']:.1f} tok/s, same threads)")
    for r in rows:
        if r.get("phase") == "parity":
            rel, top = r.get("rel_err"), r.get("argmax_agree")  # llama.cpp's, vLLM's engine's (NaN: the other's)
            said = (f"prompt logits within {rel:.1e} of the lab's; " if rel is not None and rel == rel else "") + (
                f"top token after each prompt position as the lab's bf16 at {top:.0%} (the lab's bf16 as its float32: "
                f"{r['argmax_agree_lab']:.0%}); " if top is not None and top == top else "")
            lines.append(f"{r['backend']} ({r['variant']}): " + (r["error"] if r.get("error") else
                         said + "greedy tokens " + ("identical" if r["tokens_equal"] else
                                                    f"differ {r['divergence']}")))
        elif r.get("error") and r["backend"] in (*llama_cpp.RUNNERS, vllm_engine.NAME) and r.get("phase") is None:
            lines.append(f"{r['backend']} ({r['variant']}) skipped: {r['error']}")
    return lines


def _train_summary(rows) -> list[str]:
    """Training tokens/s of each runner at the longest trained context, its step split into forward, backward and
    optimizer; the lab's fastest against transformers there (the target declared in bench.ops' model spec)."""
    train = _measured(rows, "train")
    if not train:
        return []
    context = max(int(r["context"]) for r in train)
    at = sorted((r for r in train if int(r["context"]) == context), key=lambda r: -r["tokens_per_s"])
    lines = [f"train at {context}: {r['backend']} {r['tokens_per_s']:.1f} tok/s, {r['median_ms']:.0f} ms per step "
             f"(forward {r['forward_ms']:.0f} + backward {r['backward_ms']:.0f} + optimizer {r['optimizer_ms']:.0f} "
             f"ms)" for r in at]
    theirs = next((r for r in at if r["backend"] == "transformers"), None)
    ours = [r for r in at if not _peer(r)]
    if theirs and ours:
        target = next(t for t in OPS["model"].targets if t.match.get("phase") == "train")
        ratio = ours[0]["tokens_per_s"] / theirs["tokens_per_s"]
        lines.append(f"train at {context}: {ours[0]['backend']} (the lab's fastest) = {ratio:.2f}x transformers' "
                     f"tokens/s on the same checkpoint (target: at least {target.threshold:g}x at "
                     f"{target.match['context']} tokens)")
    return lines
