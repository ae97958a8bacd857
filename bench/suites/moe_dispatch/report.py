"""The exchange's report: the target, the exchange against all_to_all, the EP layer against one process, the
bytes-per-token check, the model on several processes, the projection (summary); the three PNGs (plot)."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from bench.ops import OPS
from bench.suites.moe_dispatch.parallel_model import MODEL
from bench.suites.moe_dispatch.parts import EXCHANGE, FIRST_TOUCH, LAYER, LOCAL, OP
from bench.suites.moe_dispatch.projection import (DEEPEP, DEEPEP_LOW_LATENCY_US, EXPERT_RATE_SOURCE, EXPERT_TFLOPS,
                                                  GPUS_PER_NODE, HBM_GBPS, INFINIBAND, NVLINK, PROJECTED_EP,
                                                  PROJECTED_MODEL, PROJECTED_TOKENS, bytes_per_token, project)
from bench.suites.moe_dispatch.worlds import _ranks


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _text(value) -> str:
    """A text column's value, "" for a missing one (NaN when read from a CSV)."""
    return value if isinstance(value, str) else ""


def _measured(rows) -> list[dict]:
    return [r for r in rows if not _text(r.get("error")) and _number(r.get("median_ms")) > 0]


def bytes_check(rows) -> list[dict]:
    """The projection's input against the runs: for each measured dispatch+combine row with uniform routing, its
    bytes per token (counted from the split sizes the ranks used) and bytes_per_token's model for its world, top_k,
    D and dtype. [{shape, world, measured, model, ratio}]."""
    found = []
    for r in _measured(rows):
        if r.get("part") != "dispatch+combine" or r.get("routing") != "uniform":
            continue
        itemsize = torch.empty(0, dtype=getattr(torch, r["dtype"])).element_size()
        model = bytes_per_token(int(r["world"]), int(r["top_k"]), int(r["D"]), itemsize, int(r["E"]), int(r["N"]))
        measured = _number(r["bytes_per_token"])
        found.append(dict(shape=r["shape"], world=int(r["world"]), measured=measured, model=model,
                          ratio=measured / model if model else math.nan))
    return found


def _kib(n) -> str:
    return f"{n / 2**10:.1f} KiB" if n >= 2**10 else f"{n:.0f} B"


def _ms(ms) -> str:
    return f"{ms * 1e3:.0f} us" if ms < 1 else f"{ms:.2f} ms"


# The target: CPU, gloo, 2 processes, Qwen3.5-35B's MoE shape, 4096 tokens per rank.
TARGET = dict(device="cpu", transport="gloo", world=2, N=4096, preset="Qwen3.5-35B-A3B", part="dispatch+combine")


TARGET_SHARE = 0.5


def _on(r) -> str:
    cores = _number(r.get("cores"))
    return f"load {_number(r.get('load')):.1f}" + (f" on {int(cores)} cores" if cores > 0 else "")


def _target_lines(rows) -> list[str]:
    """The issue's target, one line per permute backend measured at its shape."""
    hits = [r for r in _measured(rows) if all(str(r.get(k)) == str(v) or _number(r.get(k)) == _number(v)
                                              for k, v in TARGET.items())]
    title = (f"Target: dispatch + combine at >= {TARGET_SHARE:.0%} of the all_to_all bandwidth of the same run "
             f"(CPU, gloo, 2 processes, Qwen3.5-35B-A3B MoE shape, 4096 tokens per rank)")
    if not hits:
        return [f"{title}: not measured in this CSV (python -m bench.sweep --op {OP} --preset Qwen3.5-35B-A3B)"]
    lines = []
    for r in sorted(hits, key=lambda r: -_number(r["of_all_to_all"])):
        share = _number(r["of_all_to_all"])
        lines.append(f"{title}, moe_permute / moe_unpermute `{r['backend']}`: **{share:.0%}** ({r['gbps']:.2f} GB/s "
                     f"out and back in {_ms(r['median_ms'])}, all_to_all {r['gbps'] / share:.2f} GB/s on the same "
                     f"bytes; {_on(r)}, commit {r.get('commit', '?')}): "
                     + ("met" if share >= TARGET_SHARE else "not met"))
    return lines


def _exchange_lines(rows) -> list[str]:
    ok = _measured(rows)
    lines = []
    for transport, backend in sorted({(_text(r.get("transport")), r["backend"]) for r in ok
                                      if r.get("part") == "dispatch+combine"}):
        shares = [(_number(r["of_all_to_all"]), r) for r in ok if r.get("part") == "dispatch+combine"
                  and r["transport"] == transport and r["backend"] == backend]
        low, high = min(shares, key=lambda s: s[0]), max(shares, key=lambda s: s[0])
        lines.append(f"{transport}, `{backend}`: dispatch + combine at {low[0]:.0%} to {high[0]:.0%} of the "
                     f"all_to_all's GB/s over {len(shares)} cases (lowest at `{low[1]['shape']}`)")
    by = {(r["shape"].rsplit(",part=", 1)[0], r["part"], r["backend"]): r for r in ok}
    for (key, part, backend), r in by.items():  # where a round trip's time goes, at the preset shapes
        if part != "dispatch+combine" or not _text(r.get("preset")):
            continue
        a2a = next((v for (k, p, _), v in by.items() if k == key and p == "all_to_all"), None)
        touch = next((v for (k, p, _), v in by.items() if k == key and p == FIRST_TOUCH), None)
        local = [by.get((key, p, backend)) for p in LOCAL]
        if a2a is None or touch is None or None in local:
            continue
        rest = r["median_ms"] - 2 * a2a["median_ms"] - local[0]["median_ms"] - local[1]["median_ms"]
        lines.append(f"where a round trip goes at {r['preset']}, {int(r['world'])} ranks x {int(r['N'])} tokens "
                     f"(`{backend}`): {_ms(r['median_ms'])} = two all_to_alls of the rows ({_ms(a2a['median_ms'])} "
                     f"each, on buffers written before) + moe_permute ({_ms(local[0]['median_ms'])}) + "
                     f"moe_unpermute ({_ms(local[1]['median_ms'])}) + the rest ({_ms(rest)}: the counts' "
                     f"all_to_all, the host sync, and dispatch's receive buffer, new every call: a fresh buffer of "
                     f"its size takes {_ms(touch['median_ms'])} to write once)")
    for r in ok:
        if r.get("part") == "moe_ep" and _number(r.get("vs_one_process")) > 0 and _text(r.get("preset")):
            lines.append(f"the EP layer at {r['preset']}'s shape, {int(r['world'])} ranks x {int(r['N'])} tokens "
                         f"(`{r['backend']}`): {_ms(r['median_ms'])} against kernellab.moe in one process "
                         f"{_ms(r['median_ms'] * r['vs_one_process'])} on the same tokens "
                         f"({r['vs_one_process']:.2f}x; rel err {r['rel_err']:.1e})")
    checks = [c for c in bytes_check(rows) if c["model"] > 0]  # one rank alone sends nothing away
    if checks:
        ratios = [c["ratio"] for c in checks]
        lines.append(f"bytes per token per layer, measured (the ranks' split sizes) against the projection's model "
                     f"(top_k (W - 1) / W D itemsize out and back, plus the counts): measured / model from "
                     f"{min(ratios):.3f} to {max(ratios):.3f} over {len(checks)} uniform-routing runs at worlds "
                     f"{', '.join(map(str, sorted({c['world'] for c in checks})))}")
    loads = [_number(r.get("load")) for r in ok if _number(r.get("load")) >= 0]
    if loads:
        cores = max(_number(r.get("cores")) for r in ok)
        lines.append(f"load average while measuring: {min(loads):.1f} to {max(loads):.1f} on {cores:.0f} cores "
                     f"(each rank runs one thread: worlds larger than the cores share them)")
    return lines


def projection_lines() -> list[str]:
    """The projection as lines of the report: a heading and the table of project() as Markdown, then sentences
    (bench.report makes them bullets)."""
    found = project()
    m = found[0]
    lines = ["", f"#### Projection: {PROJECTED_MODEL}'s dispatch + combine at EP {', '.join(map(str, PROJECTED_EP))}",
             "", "| EP | tokens per rank | bytes per token (out + back) | dispatch over NVLink / InfiniBand | "
             "InfiniBand, once per node | dispatch + combine at link rates | at DeepEP's rates | experts | hidden by "
             "the experts (link / DeepEP) |", "|---|---|---|---|---|---|---|---|---|"]
    for p in found:
        hidden = lambda ms: "yes" if ms <= p["experts_ms"] else f"no, {ms / p['experts_ms']:.1f}x"  # noqa: E731
        lines.append(f"| {p['world']} | {p['N']} | {_kib(p['bytes_per_token'])} | {p['nvlink_bytes'] / 2**20:.1f} / "
                     f"{p['ib_bytes'] / 2**20:.1f} MiB | {p['ib_bytes_per_node'] / 2**20:.1f} MiB | "
                     f"{_ms(p['link_ms'])} | {_ms(p['deepep_ms'])} | {_ms(p['experts_ms'])} | "
                     f"{hidden(p['link_ms'])} / {hidden(p['deepep_ms'])} |")
    lines += ["", f"Per rank and MoE layer, bf16, D = {m['D']}, top_k = {m['top_k']}, E = {m['E']}, I = {m['I']}, "
              f"{GPUS_PER_NODE} GPUs per node. Bytes per token: the model that the measured runs check above. Links: "
              f"{NVLINK.what} {NVLINK.dispatch_gbps:.0f} GB/s per direction ({NVLINK.source}); {INFINIBAND.what} "
              f"{INFINIBAND.dispatch_gbps:.0f} GB/s ({INFINIBAND.source}); DeepEP's measured bottleneck bandwidth "
              f"({', '.join(f'EP {w}: {r.dispatch_gbps:.0f} / {r.combine_gbps:.0f} GB/s' for w, r in DEEPEP.items())}"
              f", {DEEPEP[16].source}, H800, DeepSeek-V3 settings). Experts: {EXPERT_TFLOPS:.0f} TFLOP/s "
              f"({EXPERT_RATE_SOURCE}) or their weights at {HBM_GBPS / 1e3:.1f} TB/s (H200), whichever is slower"]
    for N in PROJECTED_TOKENS:
        at = [p for p in found if p["N"] == N]
        stops = {how: min((p["world"] for p in at if p[key] > p["experts_ms"]), default=None)
                 for how, key in (("link rates", "link_ms"), ("DeepEP's rates", "deepep_ms"))}
        said = "; ".join(f"at {how} " + (f"compute stops hiding it at EP {w}" if w else
                                        f"the experts hide it up to EP {at[-1]['world']}") for how, w in stops.items())
        worst = at[-1]
        lines.append(f"{N} tokens per rank: {said}. At EP {worst['world']}, "
                     f"{worst['ib_bytes'] / (worst['nvlink_bytes'] + worst['ib_bytes']):.0%} of the slots that "
                     f"leave a rank cross InfiniBand ({INFINIBAND.dispatch_gbps:.0f} GB/s against NVLink's "
                     f"{NVLINK.dispatch_gbps:.0f}): dispatch + combine take {_ms(worst['link_ms'])} against the "
                     f"experts' {_ms(worst['experts_ms'])}; sending a token once per node it reaches, as DeepEP "
                     f"does, instead of once per slot, would cut InfiniBand's bytes "
                     f"{worst['ib_bytes'] / worst['ib_bytes_per_node']:.1f}x")
    latency = ", ".join(f"EP {w}: {d} + {c} us" for w, (d, c) in DEEPEP_LOW_LATENCY_US.items())
    lines.append(f"DeepEP's internode figures count logical bytes (a token crosses once per node and is forwarded "
                 f"over NVLink there), hence EP 32's {DEEPEP[32].dispatch_gbps:.0f} GB/s above the "
                 f"{INFINIBAND.dispatch_gbps:.0f} GB/s link: applied to this exchange's bytes, one per slot, they "
                 f"are the rate DeepEP's transport reaches, not what its scheme would take")
    lines.append(f"At decode sizes latency, not bandwidth, sets the floor: DeepEP's low-latency kernels take {latency} "
                 f"(dispatch + combine, 128 tokens per rank, DeepSeek-V3 shape, H800; docs/legacy.md, EP 8 in "
                 f"ANCHORS.md), against the experts' "
                 + ", ".join(f"{_ms(p['experts_ms'])} at EP {p['world']}" for p in found if p["N"] == 128))
    lines.append("Hiding assumes overlap: one micro-batch's exchange runs while another's experts compute (DeepEP's "
                 "two-micro-batch scheme); without it a layer takes the sum. The shared expert, computed where its "
                 "token is, would hide more; uneven routing makes the busiest rank's share the one that counts")
    return lines


def _model_lines(rows) -> list[str]:
    """The model part: tokens/s at each world size, and whether its tokens are one process's."""
    model = sorted((r for r in rows if r.get("part") == MODEL), key=lambda r: int(r["world"]))
    if not model:
        return []
    ok = _measured(model)
    rates = ", ".join(f"{_ranks(int(r['world']))}: {r['tokens_per_s']:.1f} tokens/s ({r['decode_tokens_per_s']:.1f} "
                      f"decoding, prefill {_ms(r['prefill_ms'])})" for r in ok)
    failed = [f"{_ranks(int(r['world']))}: {r['error']}" for r in model if _text(r.get("error"))]
    r = model[0]
    same = "; greedy tokens identical to one process's at every world size measured" if ok and not failed else ""
    return [f"the model on several processes (model.generate's small random checkpoint split tp = ep = W ways, "
            f"`{r['backend']}`, a greedy batch of {int(r['batch'])} x {int(r['N']) // int(r['batch'])} prompt "
            f"tokens and {int(r['new_tokens'])} new, one thread per process): {rates or 'none measured'}{same}"
            + (f"; failed: {'; '.join(failed)}" if failed else "")]


def summary(rows) -> list[str]:
    """The report's lines: the target, the exchange against all_to_all, the EP layer against one process, the
    bytes-per-token check, the model's tokens/s on 1, 2 and 4 processes, then the projection (Markdown: a heading
    and a table)."""
    return _target_lines(rows) + _exchange_lines(rows) + _model_lines(rows) + projection_lines()



def _mode(values):
    values = list(values)
    return max(set(values), key=values.count) if values else None


def _along(rows, axis):
    """Rows of the one-axis sweep along `axis`: every other shape axis at its most common value (the grid's base),
    world and part free."""
    others = [a for a in OPS[OP].axes if a not in (axis, "world")]
    base = {a: _mode(r[a] for r in rows) for a in others}
    return [r for r in rows if all(r[a] == base[a] for a in others)], base


def plot(rows, out: Path) -> None:
    """moe_dispatch_exchange.png (latency and GB/s of the exchange parts against N, D, top_k; one line per part
    and world), moe_dispatch_layer.png (the layer parts against N), moe_dispatch_projection.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from bench.plots import _legend_outside, _readable_log_axis

    ok = _measured(rows)
    worlds = sorted({r["world"] for r in ok})
    styles = {w: s for w, s in zip(worlds, ("-o", "--s", ":^", "-.v"))}
    exchange = [r for r in ok if r["part"] in EXCHANGE]
    # one colour per (part, backend): the exchange's parts per permute backend, the all_to_all; the layer's parts
    series = sorted({(r["part"], r["backend"]) for r in ok}, key=lambda s: ((EXCHANGE + LAYER).index(s[0])
                                                                            if s[0] in EXCHANGE + LAYER else 99, s))
    colors = {s: f"C{i % 10}" for i, s in enumerate(series)}
    if exchange:
        fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
        for column, axis in enumerate(("N", "D", "top_k")):
            line, base = _along(exchange, axis)
            for part, backend in (s for s in series if s[0] in EXCHANGE):
                for world in worlds:
                    pts = sorted((r[axis], r["median_ms"], r["gbps"]) for r in line
                                 if (r["part"], r["backend"]) == (part, backend) and r["world"] == world)
                    if len(pts) < 2:
                        continue
                    x, ms, gbps = zip(*pts)
                    label = f"{part} ({backend}), {_ranks(world)}"
                    for row, values in ((0, ms), (1, gbps)):
                        axes[row, column].plot(x, values, styles[world], color=colors[(part, backend)], label=label)
            fixed = ", ".join(f"{k}={v}" for k, v in base.items())
            for row, title in ((0, "time per call (ms, median)"), (1, "GB/s per rank (bytes sent / time)")):
                ax = axes[row, column]
                ax.set(xscale="log", yscale="log", xlabel=axis, title=f"{title}\n{fixed}")
                ax.title.set_fontsize(8)
                ax.grid(True, which="both", alpha=0.3)
                _readable_log_axis(ax.yaxis)
                swept = sorted({r[axis] for r in line})
                ax.set_xticks(swept, [str(v) for v in swept])
                ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        legend = {}  # every line's label once, whichever panel drew it
        for ax in axes[0]:
            legend |= dict(zip(*reversed(ax.get_legend_handles_labels())))
        if legend:
            _legend_outside(axes[0, 2], handles=list(legend.values()), labels=list(legend))
        fig.suptitle(f"{OP}: the exchange of kernellab.distributed against all_to_all_single on the same bytes "
                     f"({ok[0]['device']}, {ok[0]['dtype']})", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / f"{OP}_exchange.png", dpi=90)
        plt.close(fig)
    layer = [r for r in ok if r["part"] in LAYER + ("dispatch+combine",)]
    if any(r["part"] in LAYER for r in layer):
        line, base = _along(layer, "N")
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for part, backend in (s for s in series if s[0] in LAYER + ("dispatch+combine",)):
            for world in worlds:
                pts = sorted((r["N"], r["median_ms"]) for r in line
                             if (r["part"], r["backend"]) == (part, backend) and r["world"] == world)
                if pts:
                    who = f"{world} x N tokens" if part == "moe" else _ranks(world)
                    ax.plot(*zip(*pts), styles[world], color=colors[(part, backend)],
                            label=f"{part} ({backend}), {who}")
        ax.set(xscale="log", yscale="log", xlabel="N (tokens per rank)", ylabel="time per call (ms, median)",
               title="EP layer against kernellab.moe in one process on the same tokens\n"
                     + ", ".join(f"{k}={v}" for k, v in base.items()))
        ax.title.set_fontsize(9)
        ax.grid(True, which="both", alpha=0.3)
        _readable_log_axis(ax.yaxis)
        _legend_outside(ax)
        fig.tight_layout()
        fig.savefig(out / f"{OP}_layer.png", dpi=90)
        plt.close(fig)
    found = project()
    fig, axes = plt.subplots(1, len(PROJECTED_TOKENS), figsize=(12, 4.2))
    for ax, N in zip(axes, PROJECTED_TOKENS):
        at = [p for p in found if p["N"] == N]
        eps = [p["world"] for p in at]
        ax.plot(eps, [p["link_ms"] for p in at], "-o", label="dispatch + combine, link rates")
        ax.plot(eps, [p["deepep_ms"] for p in at], "--s", label="dispatch + combine, DeepEP's measured rates")
        ax.plot(eps, [p["experts_ms"] for p in at], "-^", color="k", label="experts (compute or weights)")
        ax.set(xscale="log", yscale="log", xlabel="EP size (ranks)", ylabel="ms per MoE layer and rank",
               title=f"{PROJECTED_MODEL}, {N} tokens per rank, bf16 (projected)")
        ax.title.set_fontsize(9)
        ax.set_xticks(eps, [str(e) for e in eps])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(True, which="both", alpha=0.3)
        _readable_log_axis(ax.yaxis)
    _legend_outside(axes[-1])
    fig.tight_layout()
    fig.savefig(out / f"{OP}_projection.png", dpi=90)
    plt.close(fig)
