"""The Markdown report of one device, written from its results CSV (and ceilings.json) only.

    python -m bench.report --device cpu [--dir reports/cpu]

Writes the plots (bench.plots) and README.md: the machine and its measured ceilings, the targets of the ops'
declarations (bench/ops/) computed from the rows, linear versus quadratic attention, the published numbers of
the declarations' anchors (ANCHORS.md) beside ours, which backends are deterministic and batch-invariant, per
op a short "where the time goes", the plots and the table of rows (forward rows), and a training section: the
backward and forward+backward rows beside each backend's forward, with the published backward numbers.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd

import kernellab
from bench import plots
from bench.ops import OPS
from kernellab.registry import resolve

CEILING_ANCHORS = {"cpu": ("116 GFLOP/s fp32 matmul, 22 GB/s copy", "the 2-core development machines, measured once"),
                   "cuda": ("H200: 989 TFLOP/s bf16 datasheet (about 790 measured), HBM 4.8 TB/s", "datasheet, ANCHORS.md")}


# ---------------------------------------------------------------------------------------------- numbers

def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt(value, digits=3) -> str:
    """A number for a person: integers as integers (4096, 1,048,576), others to `digits` significant digits, with
    thousands separators from 1000 on; tiny magnitudes (errors) in scientific notation."""
    if _missing(value):
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if float(value).is_integer():
        return f"{int(value):,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.{digits}g}"


def fmt_ms(ms) -> str:
    """A time with its unit: ns, us, ms or s."""
    if _missing(ms):
        return ""
    for scale, unit in ((1e3, "s"), (1.0, "ms"), (1e-3, "us")):
        if abs(ms) >= scale:
            return f"{ms / scale:.3g} {unit}"
    return f"{ms * 1e6:.3g} ns"


def fmt_bytes(n) -> str:
    """A size in B, KiB, MiB or GiB."""
    if _missing(n):
        return ""
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if abs(n) >= 2**shift:
            return f"{n / 2**shift:.3g} {unit}"
    return f"{int(n)} B"


def fmt_flops(tflops) -> str:
    """A FLOP rate in TFLOP/s, or GFLOP/s below one TFLOP/s (CPUs)."""
    if _missing(tflops):
        return ""
    return f"{tflops:.3g} TFLOP/s" if tflops >= 1 else f"{tflops * 1e3:.3g} GFLOP/s"


def fmt_share(fraction) -> str:
    return "" if _missing(fraction) else f"{fraction:.0%}" if fraction >= 0.01 else f"{fraction:.2%}"


def _values(frame, column) -> str:
    """The distinct values of a column, as text ("" for none)."""
    found = {int(v) if isinstance(v, float) and v.is_integer() else v for v in frame[column].dropna()}
    return ", ".join(sorted(str(v) for v in found))


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _lab(rows):
    return rows[~rows["peer"] & (rows["backend"] != "reference")]


def _select(rows, **match):
    for column, value in match.items():
        if column in rows:
            rows = rows[rows[column] == value]
        else:
            return rows.iloc[0:0]
    return rows


# --------------------------------------------------------------------------------------------- targets

def _against_highest(row, highest: dict) -> str:
    """The row's rate against the highest float32 matmul ceiling any run measured on its device: a ceiling taken
    while the machine was busy is low, and a fraction of it flatters."""
    best = highest.get(row["device_name"])
    if not best or best <= row["peak_tflops"]:
        return ""
    return f", {row['tflops'] / best:.0%} of the highest ceiling measured on this machine ({fmt_flops(best)})"


def target_lines(frame, spec, target, highest: dict, lvq) -> list[str]:
    """The measured value of one target of spec (bench.ops.Target) and whether it is met."""
    if target.kind == "crossover":
        if not lvq or (spec.name, "lab") not in lvq["crossover"]:
            return ["Not measured in this CSV (no matched sweeps of this op and softmax attention)."]
        T = lvq["crossover"][(spec.name, "lab")]
        met = T is not None and T <= target.threshold
        return [f"At {lvq['shape']}, {lvq['dtype']}: " + (f"from **T = {int(T)}** on" if T is not None else
                "**never** in the swept range") + f" ({'met' if met else 'not met'})."]
    rows = _select(plots.measured(frame[frame["op"] == spec.name]), **({"pass": "forward"} | target.match))
    lab = _lab(rows)
    if lab.empty:
        return ["Not measured in this CSV."]
    best = lab.loc[lab["median_ms"].idxmin()]
    said = f"`{best['backend']}` {fmt_ms(best['median_ms'])}"
    if target.kind == "ceiling":
        fraction = best["tflops"] / best["peak_tflops"]
        return [f"{said}, {fmt_flops(best['tflops'])} = **{fraction:.0%} of the matmul ceiling measured at the start "
                f"of its run** ({fmt_flops(best['peak_tflops'])}{_against_highest(best, highest)}): "
                f"{'met' if fraction >= target.threshold else 'not met'}."]
    if target.kind == "floor":
        floor_ms = best["bytes"] / (best["peak_gbps"] * 1e9) * 1e3
        ratio = best["median_ms"] / floor_ms
        return [f"{said} against a memory floor of {fmt_ms(floor_ms)} ({fmt_bytes(best['bytes'])} at "
                f"{best['peak_gbps']:.1f} GB/s): **{ratio:.2f}x the floor**: "
                f"{'met' if ratio <= target.threshold else 'not met'}."]
    if target.kind == "peer":
        peer = rows[rows["backend"] == target.peer]
        if peer.empty:
            return [f"{said}; `{target.peer}` not measured in this CSV."]
        ratio = peer["median_ms"].iloc[0] / best["median_ms"]
        return [f"{said}; `{target.peer}` {fmt_ms(peer['median_ms'].iloc[0])}: **{ratio:.2f}x**: "
                f"{'met' if ratio >= target.threshold else 'not met'}."]
    if target.kind == "op":
        other = _lab(_select(plots.measured(frame[frame["op"] == target.peer]), **target.match))
        if other.empty:
            return [f"{said}; {target.peer} not measured on the same rows in this CSV."]
        theirs = other.loc[other["median_ms"].idxmin()]
        ratio = theirs["median_ms"] / best["median_ms"]
        return [f"{said}, {fmt_flops(best['tflops'])}; the best {target.peer} row `{theirs['backend']}` "
                f"{fmt_ms(theirs['median_ms'])}, {fmt_flops(theirs['tflops'])}: **{ratio:.2f}x**: "
                f"{'met' if ratio >= target.threshold else 'not met'}."]
    raise ValueError(f"unknown target kind {target.kind!r} of {spec.name}")


def targets(frame, highest: dict | None = None) -> list[str]:
    """Every declared target with a heading that says it, and its measured value below (a target's pass is
    forward unless its match names another)."""
    lvq = plots.linear_vs_quadratic(plots.forward_rows(frame))
    lines = []
    for spec in OPS.values():
        for target in spec.targets:
            lines += [f"### {target.title}", "", *target_lines(frame, spec, target, highest or {}, lvq), ""]
    return lines


# ------------------------------------------------------------------------------------ where the time goes

def where_time_goes(rows, spec) -> list[str]:
    """A few sentences from the data: the best lab backend on the heaviest shape, its bound and roofline
    fraction, the spread over shapes, and how it compares with the peers."""
    ok = plots.measured(rows)
    lab = _lab(ok)
    if lab.empty:
        errors = rows[rows["error"] != ""]
        return [f"No lab backend measured{': ' + errors['error'].iloc[0] if not errors.empty else ''}."]
    lines = []
    work = lab["flops"].where(lab["flops"] > 0, lab["bytes"])
    if work.isna().all():  # rows without a cost model (an op with a sweep of its own): only the ranking
        wins = lab.loc[lab.groupby(["shape", "dtype"])["median_ms"].idxmin(), "backend"].value_counts()
        return ["No FLOP or byte model for these rows. Fastest lab backend per shape: "
                + ", ".join(f"`{b}` {n}x" for b, n in wins.items()) + "."]
    heavy_shape = lab.loc[work.idxmax(), "shape"]
    heavy = lab[lab["shape"] == heavy_shape]
    best = heavy.loc[heavy["median_ms"].idxmin()]
    compute = best["tflops"] / best["peak_tflops"] if best["peak_tflops"] else math.nan
    memory = best["gbps"] / best["peak_gbps"] if best["peak_gbps"] else math.nan
    lines.append(f"Heaviest shape `{heavy_shape}` ({best['dtype']}): `{best['backend']}` takes "
                 f"{fmt_ms(best['median_ms'])}; the cost model makes it {best['bound']}-bound (floor "
                 f"{fmt_ms(best['floor_ms'])}), and it runs at {fmt_share(best['roofline_fraction'])} of that floor "
                 f"({fmt_share(compute)} of the matmul ceiling, {fmt_share(memory)} of copy bandwidth).")
    per_shape = lab.loc[lab.groupby(["shape", "dtype"])["median_ms"].idxmin()]
    fractions = per_shape["roofline_fraction"].dropna()
    if len(fractions) > 1:
        worst = per_shape.loc[fractions.idxmin()]
        bounds = per_shape["bound"].value_counts().to_dict()
        small = worst["flops"] + worst["bytes"] <= (per_shape["flops"] + per_shape["bytes"]).median()
        lines.append(f"Over {len(per_shape)} shapes the fastest lab backend reaches a median "
                     f"{fmt_share(fractions.median())} of the roofline floor "
                     f"({', '.join(f'{v} {k}-bound' for k, v in bounds.items())}); lowest at `{worst['shape']}` "
                     f"({fmt_share(worst['roofline_fraction'])}, {fmt_ms(worst['median_ms'])} against a "
                     f"{fmt_ms(worst['floor_ms'])} floor"
                     + ("; one of the smaller shapes, where fixed per-call costs weigh most)." if small else ")."))
    wins = per_shape["backend"].value_counts()
    lines.append("Fastest lab backend per shape: " + ", ".join(f"`{b}` {n}x" for b, n in wins.items()) + ".")
    speed = lab.dropna(subset=["speedup_vs_best_peer"])
    if not speed.empty:
        best_rows = speed.loc[speed.groupby(["shape", "dtype"])["median_ms"].idxmin()]
        values = best_rows["speedup_vs_best_peer"]
        lines.append(f"Against the fastest peer on the same shape, the fastest lab backend is {values.min():.2g}x to "
                     f"{values.max():.2g}x (median {values.median():.2g}x) over {len(values)} shapes.")
    failed = rows[rows["error"] != ""]
    if not failed.empty:
        summary = failed.groupby("backend")["error"].agg(lambda e: (len(e), e.iloc[0]))
        lines.append("Errors: " + "; ".join(f"`{b}` on {n} shape(s), e.g. {msg[:160]}"
                                            for b, (n, msg) in summary.items()) + ".")
    return lines


# Units of the columns an op with a sweep of its own may write (the model's, the EP exchange's): how each is printed.
OWN_COLUMN_FORMATS = {"median_ms": fmt_ms, "p20_ms": fmt_ms, "p80_ms": fmt_ms, "forward_ms": fmt_ms,
                      "backward_ms": fmt_ms, "optimizer_ms": fmt_ms, "cache_bytes": fmt_bytes,
                      "dense_share": fmt_share, "tokens_per_s": fmt, "step_bytes": fmt_bytes, "floor_ms": fmt_ms,
                      "x_floor": lambda v: "" if pd.isna(v) else f"{v:.2f}x",
                      "rel_err": lambda v: "" if pd.isna(v) else f"{v:.1e}", "bytes": fmt_bytes,
                      "bytes_per_token": fmt_bytes, "of_all_to_all": fmt_share}
OWN_COLUMNS = ["backend", "dtype", "shape", "variant", "phase", "context", "transport", "median_ms", "p20_ms",
               "p80_ms", "tokens_per_s", "forward_ms", "backward_ms", "optimizer_ms", "dense_share", "step_bytes",
               "floor_ms", "x_floor", "cache_bytes", "bytes", "gbps", "bytes_per_token", "of_all_to_all", "imbalance",
               "vs_one_process", "rel_err", "tokens_equal", "divergence", "load", "error"]
# The order of an own table's rows: by these columns, those it has.
OWN_SORT = ("variant", "phase", "context", "world", "routing", "D", "top_k", "N", "part", "backend")


def _own_table(rows) -> str:
    """Rows of an op with a sweep of its own carry their own columns: those that have a value."""
    filled = lambda column: (column.notna() & column.astype(str).str.strip().ne("")).any()  # noqa: E731
    columns = [c for c in OWN_COLUMNS if c in rows and filled(rows[c])]
    sort = [c for c in OWN_SORT if c in rows and rows[c].notna().any()]
    body = [[OWN_COLUMN_FORMATS.get(c, fmt)(v) if not isinstance(v, str) else v for c, v in zip(columns, values)]
            for values in rows.sort_values(sort)[columns].values.tolist()]
    names = {"median_ms": "median", "p20_ms": "p20", "p80_ms": "p80", "tokens_per_s": "tokens/s",
             "forward_ms": "forward", "backward_ms": "backward", "optimizer_ms": "optimizer", "cache_bytes": "cache"}
    return _table([names.get(c, c) for c in columns], body)


def _markdown(line: str) -> bool:
    """Whether a summary line is Markdown to keep as it is (a blank line, a heading, a table row), not a sentence."""
    return not line or line.startswith(("#", "|"))


def _rows_table(rows) -> str:
    header = ["backend", "dtype", "shape", "median", "p20-p80", "FLOP/s", "GB/s", "roofline", "bound",
              "rel err (vs)", "x ref", "x best peer", "error"]
    body = []
    for _, r in rows.sort_values(["dtype", "shape", "median_ms"]).iterrows():
        spread = "" if pd.isna(r["p20_ms"]) else f"{fmt_ms(r['p20_ms'])} - {fmt_ms(r['p80_ms'])}"
        err = "" if pd.isna(r["rel_err"]) else f"{r['rel_err']:.1e} ({r.get('checked_against', '')})"
        peer = "" if pd.isna(r["speedup_vs_best_peer"]) else f"{r['speedup_vs_best_peer']:.2f}x ({r['best_peer']})"
        ref = "" if pd.isna(r["speedup_vs_reference"]) else f"{fmt(r['speedup_vs_reference'])}x"
        body.append([r["backend"] + (" (peer)" if r["peer"] else ""), r["dtype"], f"`{r['shape']}`",
                     fmt_ms(r["median_ms"]), spread, fmt_flops(r["tflops"]) if r["flops"] else "",
                     "" if pd.isna(r["gbps"]) else f"{r['gbps']:.3g}", fmt_share(r["roofline_fraction"]),
                     r["bound"] if isinstance(r["bound"], str) else "", err, ref, peer, r["error"][:120]])
    return _table(header, body)


# ----------------------------------------------------------------------------------------------- anchors

def _anchor_pass(anchor) -> str:
    return anchor.match.get("pass", "forward")


def anchors_table(frame, training: bool = False) -> str:
    """The published figures beside our best comparable row: the forward anchors, or (training) those of the
    backward passes."""
    ok = plots.measured(frame)
    ours = ok["device_name"].iloc[0] if not ok.empty else "(nothing measured)"
    lvq = plots.linear_vs_quadratic(plots.forward_rows(frame))
    body = []
    for spec in OPS.values():
        for anchor in [a for a in spec.anchors if (_anchor_pass(a) != "forward") == training]:
            value, detail = "not measured here", ""
            if anchor.crossover:
                if lvq and (spec.name, "lab") in lvq["crossover"]:
                    T = lvq["crossover"][(spec.name, "lab")]
                    value = f"T = {int(T)}" if T else "none in range"
                    detail = f"{lvq['shape']}, {lvq['dtype']}"
            else:
                rows = _select(ok[ok["op"] == spec.name], **({"pass": "forward"} | anchor.match))
                if not rows.empty:
                    best = anchor.best
                    pick = rows.loc[rows[best].idxmin() if best == "median_ms" else rows[best].idxmax()]
                    value = {"median_ms": fmt_ms, "tflops": fmt_flops, "roofline_fraction": fmt_share}[best](pick[best])
                    detail = f"`{pick['backend']}`, {pick['dtype']}, `{pick['shape']}`"
            differs = "same kind" if anchor.device in ours else f"differs: ours is {ours}"
            body.append([anchor.what, anchor.metric, anchor.published, f"{anchor.device} ({anchor.source})", value,
                         detail, differs])
    return _table(["published figure", "unit", "published", "device (source)", "ours", "our row", "device"], body)


def invariance_table(frame) -> str:
    """Per backend in the CSV: deterministic (repeated calls bitwise equal) and batch-invariant, as its registry
    declaration says (tests/test_invariance.py checks them), with the note."""
    body = []
    for spec in OPS.values():
        if not spec.registry or spec.name not in set(frame["op"]):
            continue
        registered = kernellab.registry.registered(spec.name)
        for name in sorted(set(frame.loc[frame["op"] == spec.name, "backend"]) & set(registered)):
            b = registered[name]
            body.append([spec.name, name, "yes" if b.deterministic else "no", "yes" if b.batch_invariant else "no",
                         b.variance_note])
    return _table(["op", "backend", "deterministic", "batch-invariant", "why not"], body)


def highest_ceilings(out: Path) -> dict:
    """device name -> the highest float32 matmul ceiling (TFLOP/s) among the runs of ceilings.json."""
    path = out / "ceilings.json"
    highest = {}
    for run in json.loads(path.read_text()) if path.exists() else []:
        rate = run["matmul_tflops"].get("float32")
        if rate:
            highest[run["device_name"]] = max(rate, highest.get(run["device_name"], 0.0))
    return highest


def ceilings_section(out: Path, device: str) -> list[str]:
    path = out / "ceilings.json"
    if not path.exists():
        return ["No ceilings.json: run bench.sweep."]
    runs = json.loads(path.read_text())
    last = {}
    for run in runs:
        last[run["device_name"]] = run
    rows = [[name, run["timestamp"], fmt(run["threads"]),
             ", ".join(f"{k} {fmt_flops(v)}" for k, v in run["matmul_tflops"].items()), f"{run['copy_gbps']:.1f}"]
            for name, run in last.items()]
    published, source = CEILING_ANCHORS.get(device, ("", ""))
    return [_table(["device", "measured at", "threads", "matmul by dtype", "copy GB/s (read + write)"], rows),
            "", f"Published for comparison: {published} ({source}). {len(runs)} runs recorded in ceilings.json; "
            "each row of results.csv keeps the ceilings of its own run (peak_tflops, peak_gbps)."]


def _linear_vs_quadratic(lvq) -> list[str]:
    if not lvq:
        return ["Not enough matched rows (attention and a linear op at the same heads and sequence lengths).", ""]
    series = list(lvq["ms"])
    names = {"lab": f"{lvq['quadratic']} (best lab)", "peer": f"{lvq['quadratic']} (best peer)"}
    body = [[fmt(T)] + [f"{fmt_ms(lvq['ms'][k][T])} ({lvq['backend'][k][T]})" if T in lvq["ms"][k].index else ""
                        for k in series]
            for T in sorted(lvq["ms"]["lab"].index)]
    md = ["![linear vs quadratic](linear_vs_quadratic.png)", "",
          f"Best backend per op (median time) at {lvq['shape']}, {lvq['dtype']}:", "",
          _table(["T (tokens)"] + [names.get(k, k) for k in series], body), ""]
    for (name, against), T in lvq["crossover"].items():
        md.append(f"- {name} is at least as fast as the best {against} {lvq['quadratic']} from "
                  + (f"T = {int(T)} on." if T is not None else "no swept T (it never wins in range)."))
    return md + [""]


def training_table(rows, forward) -> str:
    """The backward passes' rows, each beside its backend's forward row on the same shape and dtype."""
    times = {(r["backend"], r["shape"], r["dtype"]): r["median_ms"] for _, r in plots.measured(forward).iterrows()}
    header = ["backend", "dtype", "shape", "pass", "median", "p20-p80", "FLOP/s", "roofline", "x its forward",
              "rel err (vs)", "x best peer", "error"]
    body = []
    for _, r in rows.sort_values(["dtype", "shape", "pass", "median_ms"]).iterrows():
        spread = "" if pd.isna(r["p20_ms"]) else f"{fmt_ms(r['p20_ms'])} - {fmt_ms(r['p80_ms'])}"
        err = "" if pd.isna(r["rel_err"]) else f"{r['rel_err']:.1e} ({r.get('checked_against', '')})"
        peer = "" if pd.isna(r["speedup_vs_best_peer"]) else f"{r['speedup_vs_best_peer']:.2f}x ({r['best_peer']})"
        fwd = times.get((r["backend"], r["shape"], r["dtype"]))
        ratio = "" if fwd is None or pd.isna(r["median_ms"]) else f"{r['median_ms'] / fwd:.2f}x"
        body.append([r["backend"] + (" (peer)" if r["peer"] else ""), r["dtype"], f"`{r['shape']}`", r["pass"],
                     fmt_ms(r["median_ms"]), spread, fmt_flops(r["tflops"]) if r["flops"] else "",
                     fmt_share(r["roofline_fraction"]), ratio, err, peer, r["error"][:120]])
    return _table(header, body)


def training_section(frame) -> list[str]:
    """The backward and forward+backward rows per op, the published backward numbers beside them."""
    forward = plots.forward_rows(frame)
    training = frame[frame["pass"] != "forward"]
    if training.empty:
        return ["No backward passes in this CSV: `python -m bench.sweep --op OP --pass forward backward "
                "forward+backward` measures them.", ""]
    md = ["Each backend with a backward (kernellab/autograd.py): `backward` times the gradients of every "
          "differentiable input from fixed output gradients on a graph built once; `forward+backward` both in one "
          "call. Gradients are checked against the float64 yardstick's autograd first. `x its forward`: this row's "
          "time over the same backend's forward row.", "",
          "Published backward numbers beside ours:", "", anchors_table(frame, training=True), ""]
    for spec in [s for s in OPS.values() if s.name in set(training["op"])]:
        md += [f"### {spec.name}", ""]
        if spec.backward_flop_model:
            md += [f"Backward FLOP model: {spec.backward_flop_model}", ""]
        md += [training_table(training[training["op"] == spec.name], forward[forward["op"] == spec.name]), ""]
    return md


# ---------------------------------------------------------------------------------------------- report

def write(out: Path, device: str) -> Path:
    """Regenerate the plots and README.md of out/results.csv."""
    out = Path(out)
    frame = plots.load(out / "results.csv")
    forward = plots.forward_rows(frame)
    written = plots.plot_all(forward, out)
    ok = plots.measured(frame)
    names = _values(frame, "device_name")
    md = [f"# Benchmarks on {device}: {names}", "",
          "Generated by `python -m bench.report --device " + device + "` from `results.csv` (written by "
          "`python -m bench.sweep --op OP --device " + device + "`). Do not edit by hand.", "",
          f"{fmt(len(frame))} rows, {fmt(len(ok))} measured, {fmt(int((frame['error'] != '').sum()))} with an error; "
          f"commits {_values(frame, 'commit')}; torch {_values(frame, 'torch_version')}; threads "
          f"{_values(frame, 'threads')}; from {frame['timestamp'].min()} to {frame['timestamp'].max()}.", ""]
    if device == "cpu":
        md += ["Timing on a shared 2-core machine is noisy: the p20-p80 spread of each row says how much; ratios "
               "taken within one run are more trustworthy than absolute times. Rerun a sweep on a quiet machine to "
               "confirm a number.", ""]
    over = plots.measured(forward)[plots.measured(forward)["roofline_fraction"] > 1]
    if len(over):
        md += [f"{len(over)} rows run faster than their roofline floor (fraction > 1): their working set fits in a "
               "cache while the copy bandwidth is measured on a buffer far larger than the caches, or the load of "
               "the machine dropped after the ceilings were measured at the start of their run.", ""]
    lvq = plots.linear_vs_quadratic(forward)
    md += ["Columns: median, p20, p80 over adaptive repeats (bench.timing); FLOP/s and GB/s from the analytic "
           "models of bench/ops/<family>.py; roofline = max(FLOPs / matmul ceiling, bytes / copy bandwidth) / time, with the "
           "ceilings measured at the start of the run; `rel err (vs)`: relative Frobenius error against the float64 "
           "yardstick named; `x ref`, `x best peer`: speedups on the same shape (none when a check failed).", "",
           "## Measured ceilings", "", *ceilings_section(out, device), "",
           "## Targets", "", *targets(frame, highest_ceilings(out)),
           "## Linear versus quadratic attention", "", *_linear_vs_quadratic(lvq),
           "## Published numbers beside ours", "",
           "Published numbers are leads from other machines: only a side-by-side run on one machine settles a "
           "comparison.", "", anchors_table(frame), "",
           "## Determinism and batch invariance", "",
           "As each backend declares it (kernellab/*/__init__.py) and tests/test_invariance.py checks on this machine: "
           "deterministic = repeated calls give bitwise equal outputs; batch-invariant = one sequence's or token's "
           "output is bitwise the same whatever else shares its batch.", "", invariance_table(frame), "",
           "## Training: backward and forward+backward", "", *training_section(frame)]
    present = set(forward["op"])
    for spec in [s for s in OPS.values() if s.name in present]:
        rows = forward[forward["op"] == spec.name]
        md += [f"## {spec.name}", "", "### Where the time goes", ""]
        if spec.registry or not spec.summary:  # a sweep of its own says where its time goes in its summary
            md += [f"- {line}" for line in where_time_goes(rows, spec)]
        if spec.summary:
            md += [line if _markdown(line) else f"- {line}." for line in resolve(spec.summary)(rows.to_dict("records"))]
        md += [""] + ([f"FLOP model: {spec.flop_model}", ""] if spec.flop_model else [])
        drawn = written.get(spec.name, []) + (sorted(out.glob(f"{spec.name}_*.png")) if not spec.registry else [])
        md += [f"![{path.stem}]({path.name})" for path in drawn]
        own = resolve(spec.table)(rows.to_dict("records")) if spec.table else _own_table(rows)
        md += ["", _rows_table(rows) if spec.registry else own, ""]
    readme = out / "README.md"
    readme.write_text("\n".join(md))
    return readme


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="reports/<device>/ (cpu, cuda)")
    parser.add_argument("--dir", type=Path, help="results folder (default reports/<device>)")
    args = parser.parse_args(argv)
    out = args.dir or Path(__file__).resolve().parent.parent / "reports" / args.device
    if not (out / "results.csv").is_file():
        parser.exit(2, f"python -m bench.report: error: no results.csv in {out} (run python -m bench.sweep first)\n")
    print(write(out, args.device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
