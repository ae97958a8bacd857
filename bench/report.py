"""The Markdown report of one host, written from its results CSV (and ceilings.json) only.

    python -m bench.report --out RUN [--device cpu]         # the report of a run, in its own folder
    python -m bench.report --publish RUN [RUN ...]          # the published reports: reports/<device>/<host>/

Writes the plots (bench.plots) and README.md: a contents list and a one-screen scoreboard (per op the fastest lab
backend, its speedup over the best peer, its median fraction of the roofline, its targets met or not with their
numbers), the machine and its measured ceilings, the targets of the ops' declarations (bench/ops/) computed from
the rows, linear versus quadratic attention, the published numbers of the declarations' anchors (ANCHORS.md)
beside ours, which backends are deterministic and batch-invariant, per op a short "where the time goes", the
plots and the rows (forward rows, folded), and a training section: the backward and forward+backward rows beside
each backend's forward, with the published backward numbers.

The published reports are one per host (the exact device of the rows' device_name: reports/cpu/intel-xeon/,
reports/cpu/amd-epyc-family-25-model-17/, ...); only --publish rewrites them, from full runs (rows not marked quick):
each run's rows are merged into the results.csv of their host's folder, its ceilings into that ceilings.json, and
the host's report is regenerated.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import kernellab
from bench import plots
from bench.check import tolerance
from bench.peers import llama_cpp
from bench.ops import FASTEST_PEER, OPS


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
        peer = rows[rows["peer"].astype(bool)] if target.peer == FASTEST_PEER else rows[rows["backend"] == target.peer]
        if peer.empty:
            return [f"{said}; `{target.peer}` not measured in this CSV."]
        fastest = peer.loc[peer["median_ms"].idxmin()]
        ratio = fastest["median_ms"] / best["median_ms"]
        return [f"{said}; `{fastest['backend']}` {fmt_ms(fastest['median_ms'])}: **{ratio:.2f}x**: "
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
    if target.kind in ("speedup", "cost"):
        return _same_backend_ratio(plots.measured(frame[frame["op"] == spec.name]), lab, target)
    raise ValueError(f"unknown target kind {target.kind!r} of {spec.name}")


def _same_backend_ratio(measured, lab, target) -> list[str]:
    """A "speedup" or "cost" target: per lab backend, the time of its fastest row (of the op's measured rows)
    matching target.against over that of its fastest row of `lab` (those matching target.match) ("speedup",
    >= threshold) or the inverse ("cost", <= threshold); the verdict is the best backend's."""
    against = _lab(_select(measured, **({"pass": "forward"} | target.against)))
    ratios = {}
    for backend, ours in lab.groupby("backend")["median_ms"].min().items():
        theirs = against.loc[against["backend"] == backend, "median_ms"]
        if not theirs.empty:
            ratios[backend] = (theirs.min() / ours if target.kind == "speedup" else ours / theirs.min(), ours,
                               theirs.min())
    if not ratios:
        return [f"Not measured against {target.against} in this CSV."]
    pick = max if target.kind == "speedup" else min
    best = pick(ratios, key=lambda b: ratios[b][0])
    others = "; ".join(f"`{b}` {r:.2f}x ({fmt_ms(ours)} against {fmt_ms(theirs)})"
                       for b, (r, ours, theirs) in ratios.items() if b != best)
    ratio, ours, theirs = ratios[best]
    met = ratio >= target.threshold if target.kind == "speedup" else ratio <= target.threshold
    return [f"`{best}` {fmt_ms(ours)} against {fmt_ms(theirs)} ({', '.join(f'{k}={v}' for k, v in target.against.items())})"
            + (f" (others: {others})" if others else "") + f": **{ratio:.2f}x**: {'met' if met else 'not met'}."]


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
OWN_COLUMNS = ["backend", "dtype", "shape", "variant", "phase", "context", "cache_fill", "transport", "median_ms",
               "p20_ms", "p80_ms", "tokens_per_s", "forward_ms", "backward_ms", "optimizer_ms", "dense_share",
               "step_bytes", "floor_ms", "x_floor", "cache_bytes", "bytes", "gbps", "bytes_per_token", "of_all_to_all",
               "imbalance", "vs_one_process", "rel_err", "tokens_equal", "divergence", "load", "error"]
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
    declaration says (tests/ops/test_invariance.py checks them), with the note."""
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


def _gemm_cell(found: dict, tol: float) -> str:
    """One GEMM's measured rate in the ceilings table, with why it does not count where it does not."""
    if "error" in found:
        return f"not run: {found['error']}"
    cell = fmt_flops(found["tflops"])
    return cell if found["rel_err"] <= tol else f"{cell} (rel err {fmt(found['rel_err'])}: not the dtype's GEMM)"


def gemm_table(run: dict, device: str) -> str:
    """Per dtype of a ceilings.json run: each GEMM's rate on the n^3 product (bench.timing.gemm_rates), the fastest
    within tolerance (the matmul ceiling), the physical peak and the ceiling's share of it."""
    matmul, peak = run["matmul"], run.get("physical_peak") or {}
    names = list(dict.fromkeys(name for found in matmul.values() for name in found["gemms"]))
    body = []
    for dtype, found in matmul.items():
        tol = tolerance(getattr(torch, dtype), device)
        top = peak.get("tflops", {}).get(dtype)
        body.append([dtype, fmt(found["n"])] + [_gemm_cell(found["gemms"][n], tol) if n in found["gemms"] else ""
                                                for n in names]
                    + [f"{fmt_flops(found['tflops'])} ({found['best']})" if found["best"] else "none",
                       fmt_flops(top), fmt_share(found["tflops"] / top) if top else ""])
    return _table(["dtype", "n"] + [f"`{n}`" for n in names] + ["ceiling (best)", "physical peak", "ceiling / peak"],
                  body)


def bandwidth_rows(run: dict, rows) -> str:
    """The read and copy bandwidth of a ceilings.json run per working-set size, and how many of the device's rows
    (their `bytes`) sit nearest each size in log scale: the sizes their floors were read at (bench.timing.bandwidth_at
    interpolates between them)."""
    table = run["bandwidth"]
    sizes = np.log2(np.asarray(table["nbytes"], dtype=np.float64))
    used = np.zeros(len(sizes), dtype=int)
    nbytes = pd.to_numeric(rows["bytes"], errors="coerce") if "bytes" in rows else pd.Series(dtype=float)
    for n in nbytes[nbytes > 0]:
        used[np.abs(sizes - math.log2(n)).argmin()] += 1
    body = [[fmt_bytes(n), f"{read:.1f}", f"{copy:.1f}", fmt(int(count))]
            for n, read, copy, count in zip(table["nbytes"], table["read_gbps"], table["copy_gbps"], used)]
    return _table(["working set", "read GB/s", "copy GB/s (read + write)", "rows nearest"], body)


def ceilings_section(out: Path, device: str, frame=None) -> list[str]:
    """The measured ceilings of each device of ceilings.json (its last run): the summary, then, where the run
    recorded them, every GEMM's rate per dtype beside the physical peak and how it is obtained, and the bandwidth per
    working-set size beside the rows (of `frame`) that used it."""
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
    md = [_table(["device", "measured at", "threads", "matmul by dtype", "copy GB/s (read + write)"], rows),
          "", f"Published for comparison: {published} ({source}). {len(runs)} runs recorded in ceilings.json; "
          "each row of results.csv keeps the ceilings of its own run (peak_tflops, peak_gbps)."]
    for name, run in last.items():
        if "matmul" in run:
            md += ["", f"### The GEMMs of {name}", "",
                   "Each GEMM on the n x n x n product, interleaved round after round in one process, fastest call "
                   "(bench.timing.gemm_rates); the matmul ceiling is the fastest within the dtype's tolerance "
                   "against float64.", "", gemm_table(run, device)]
        peak = run.get("physical_peak")
        if peak:
            per_cycle = ", ".join(f"{d} {fmt(r)}" for d, r in peak["flop_per_cycle"].items())
            md += ["", f"Physical peak: FLOP per cycle per core ({per_cycle}) x {peak['ghz']:.3f} GHz x "
                   f"{peak['cores']} core(s). How: {peak['how']}."]
        if run.get("bandwidth"):
            mine = frame[frame["device_name"] == name] if frame is not None else pd.DataFrame()
            md += ["", f"### Bandwidth of {name}", "",
                   "Caches flushed before each call (bench.timing.bandwidth_table); a row's floor takes the higher of "
                   "read and copy at its own working set, interpolated in log size.", "", bandwidth_rows(run, mine)]
    return md


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
        md += _folded(f"The backward rows of {spec.name}", training_table(training[training["op"] == spec.name],
                                                                         forward[forward["op"] == spec.name]))
    return md


# ---------------------------------------------------------------------------------------------- report

# How each kind of target states its threshold in the scoreboard.
GOALS = {"ceiling": lambda t: f">= {t:.0%} of the matmul ceiling", "floor": lambda t: f"<= {t:g}x the memory floor",
         "peer": lambda t: f">= {t:g}x", "op": lambda t: f">= {t:g}x", "crossover": lambda t: f"from T <= {t:g}",
         "speedup": lambda t: f">= {t:g}x", "cost": lambda t: f"<= {t:g}x"}


def _target_cell(frame, spec, target, highest: dict, lvq) -> str:
    """A target in a few words: met or not, its number (from the bold figure of its sentence) and its goal."""
    import re

    text = " ".join(target_lines(frame, spec, target, highest, lvq))
    bold = text.split("**")[1] if text.count("**") >= 2 else ""
    figure = re.search(r"T = \d+|never|[\d.,]+\s*[x%]?", bold)
    said = re.findall(r"\b(not met|met)\b", text)  # the sentence's verdict is its last
    verdict = said[-1] if said else "not measured"
    goal = GOALS.get(target.kind, lambda t: f"{t:g}")(target.threshold)
    return f"{verdict}: {figure.group(0).strip() if figure else ''} ({goal})" if figure else f"{verdict} ({goal})"


def scoreboard(frame, highest: dict | None = None) -> list[str]:
    """One line per op measured: the lab backend fastest on most shapes, the median over those shapes of its speedup
    over the fastest peer on the same case and of its fraction of the roofline, and each declared target met or not
    with its number."""
    forward = plots.forward_rows(frame)
    lvq = plots.linear_vs_quadratic(forward)
    body = []
    for spec in OPS.values():
        rows = forward[forward["op"] == spec.name]
        if rows.empty:
            continue
        ok = plots.measured(rows)
        lab = _lab(ok)
        best, speedup, roofline = "none measured", "", ""
        if not lab.empty:
            # one case: a shape of a registry op; a sweep of its own's rows differ by phase, context, part too
            case = [c for c in ("shape", "dtype", "variant", "phase", "context", "part") if c in lab]
            fastest = lab.loc[lab.groupby(case, dropna=False)["median_ms"].idxmin()]
            wins = fastest["backend"].value_counts()
            best = f"`{wins.index[0]}` ({wins.iloc[0]} of {len(fastest)} shapes)"
            own = fastest[fastest["backend"] == wins.index[0]]
            peers = ok[ok["peer"]].groupby(case, dropna=False)["median_ms"].min().rename("peer_ms")
            ratios = own.join(peers, on=case)["peer_ms"] / own["median_ms"]
            if ratios.notna().any():
                speedup = f"{ratios.median():.2f}x"
            if "roofline_fraction" in own and own["roofline_fraction"].notna().any():
                roofline = fmt_share(own["roofline_fraction"].median())
        cells = "; ".join(_target_cell(frame, spec, t, highest or {}, lvq) for t in spec.targets)
        body.append([f"[{spec.name}](#{spec.name})", best, speedup, roofline, cells])
    return [_table(["op", "fastest lab backend", "x best peer (median)", "roofline (median)", "targets"], body),
            "", "x best peer and roofline: medians over the shapes where that backend is the fastest lab backend; "
            "targets: met or not, with the number its section below explains.", ""]


def _contents(sections: list[str]) -> list[str]:
    """Links to the report's sections (GitHub's anchors: lower case, spaces as dashes, punctuation dropped)."""
    def anchor(title):
        import re

        return re.sub(r"[^a-z0-9 _-]", "", title.lower()).replace(" ", "-")

    return [f"- [{title}](#{anchor(title)})" for title in sections] + [""]


def _folded(summary: str, body: str) -> list[str]:
    """A section folded away (<details>): the raw rows under the plots."""
    return ["<details>", f"<summary>{summary}</summary>", "", body, "", "</details>", ""]


def write(out: Path, device: str) -> Path:
    """Regenerate the plots and README.md of out/results.csv."""
    out = Path(out)
    frame = plots.load(out / "results.csv")
    forward = plots.forward_rows(frame)
    written = plots.plot_all(forward, out)
    ok = plots.measured(frame)
    names = _values(frame, "device_name")
    md = [f"# Benchmarks on {device}: {names}", "",
          "Generated by `python -m bench.report` from `results.csv` (rows of `python -m bench.sweep --op OP --device "
          + device + "`; the published reports by `python -m bench.report --publish RUN`, full runs only). Do not "
          "edit by hand.", "",
          f"{fmt(len(frame))} rows, {fmt(len(ok))} measured, {fmt(int((frame['error'] != '').sum()))} with an error; "
          f"commits {_values(frame, 'commit')}; torch {_values(frame, 'torch_version')}; threads "
          f"{_values(frame, 'threads')}; from {frame['timestamp'].min()} to {frame['timestamp'].max()}.", ""]
    present = set(forward["op"])
    sections = ["Scoreboard", "Measured ceilings", "Targets", "Linear versus quadratic attention",
                "Published numbers beside ours", "Determinism and batch invariance",
                "Training: backward and forward+backward"] + [s.name for s in OPS.values() if s.name in present]
    md += ["## Contents", "", *_contents(sections), "## Scoreboard", "", *scoreboard(frame, highest_ceilings(out))]
    over = plots.measured(forward)[plots.measured(forward)["roofline_fraction"] > 1]
    if len(over):
        md += [f"{len(over)} rows run faster than their roofline floor (fraction > 1): their working set fits in a "
               "cache while the copy bandwidth is measured on a buffer far larger than the caches, or the load of "
               "the machine dropped after the ceilings were measured at the start of their run.", ""]
    lvq = plots.linear_vs_quadratic(forward)
    md += ["Columns: median, p20, p80 over adaptive repeats (bench.timing); FLOP/s and GB/s from the analytic "
           "models of bench/ops/<family>.py; roofline = max(FLOPs / matmul ceiling, bytes / bandwidth at the row's "
           "working set) / time, with the ceilings measured at the start of the run (Measured ceilings); `rel err (vs)`: relative Frobenius error against the float64 "
           "yardstick named; `x ref`, `x best peer`: speedups on the same shape (none when a check failed).", "",
           "## Measured ceilings", "", *ceilings_section(out, device, frame), "",
           "## Targets", "", *targets(frame, highest_ceilings(out)),
           "## Linear versus quadratic attention", "", *_linear_vs_quadratic(lvq),
           "## Published numbers beside ours", "",
           "Published numbers are leads from other machines: only a side-by-side run on one machine settles a "
           "comparison.", "", anchors_table(frame), "",
           "## Determinism and batch invariance", "",
           "As each backend declares it (kernellab/*/__init__.py) and tests/ops/test_invariance.py checks on this machine: "
           "deterministic = repeated calls give bitwise equal outputs; batch-invariant = one sequence's or token's "
           "output is bitwise the same whatever else shares its batch.", "", invariance_table(frame), "",
           "## Training: backward and forward+backward", "", *training_section(frame)]
    for spec in [s for s in OPS.values() if s.name in present]:
        rows = forward[forward["op"] == spec.name]
        md += [f"## {spec.name}", "", "### Where the time goes", ""]
        if spec.registry:  # a sweep of its own says where its time goes in its summary
            md += [f"- {line}" for line in where_time_goes(rows, spec)]
        else:
            lines = spec.sweep.report.summary(rows.to_dict("records"))
            md += [line if _markdown(line) else f"- {line}." for line in lines]
        md += [""] + ([f"FLOP model: {spec.flop_model}", ""] if spec.flop_model else [])
        if not spec.registry:  # a sweep of its own draws its plots: again here, from these rows alone
            spec.sweep.report.plot(rows.to_dict("records"), out)
        drawn = written.get(spec.name, []) + (sorted(out.glob(f"{spec.name}_*.png")) if not spec.registry else [])
        md += [f"![{path.stem}]({path.name})" for path in drawn]
        if spec.registry:
            table = _rows_table(rows)
        else:
            own = getattr(spec.sweep.report, "table", None)
            table = own(rows.to_dict("records")) if own else _own_table(rows)
        md += ["", *_folded(f"The {len(rows)} rows of {spec.name}", table)]
    readme = out / "README.md"
    readme.write_text("\n".join(md))
    return readme


# ------------------------------------------------------------------------------------------- publishing

# Rows written before bench.timing.device_model added a CPU's family and model name only the vendor's "AMD EPYC":
# which EPYC (the development machines have reported Zen 4 and Zen 5 parts) was not recorded, so they keep a host
# of their own rather than joining a measured one.
LEGACY_DEVICE_MODELS = {"AMD EPYC": "AMD EPYC family not recorded"}
REPORTS = Path(__file__).resolve().parent.parent / "reports"


def exact_device_name(name: str) -> str:
    """A row's device_name with the exact model where an old row has only the vendor's name
    ("AMD EPYC (1 threads)" -> "AMD EPYC family not recorded (1 threads)")."""
    model, bracket, rest = str(name).partition(" (")
    return LEGACY_DEVICE_MODELS.get(model, model) + bracket + rest


def host_folder(root: Path, device: str, device_name: str) -> Path:
    """reports/<device type>/<host>/ of a row: its exact model as a folder name (bench.timing.model_slug; the
    threads it ran on left out: one host, one report)."""
    from bench.timing import model_slug

    return Path(root) / device / model_slug(exact_device_name(device_name))


def _merge_ceilings(source: Path, target: Path, names: set[str]) -> None:
    """Append to target (a ceilings.json) the runs of source measured on `names` that it does not hold yet."""
    runs = json.loads(target.read_text()) if target.exists() else []
    seen = {(r["device_name"], r["timestamp"]) for r in runs}
    for run in json.loads(source.read_text()) if source.exists() else []:
        run = dict(run, device_name=exact_device_name(run["device_name"]))
        if run["device_name"] in names and (run["device_name"], run["timestamp"]) not in seen:
            runs.append(run)
    if runs:
        from bench import results

        target.parent.mkdir(parents=True, exist_ok=True)
        results.write_atomic(target, json.dumps(sorted(runs, key=lambda r: r["timestamp"]), indent=1) + "\n")


def publish(runs: list[Path], root: Path = REPORTS) -> list[Path]:
    """The published reports from full runs: every run folder's rows (its results.csv; ValueError naming it when
    it has none, or holds rows of a quick run) merged into the results.csv of their host's folder
    (host_folder: rows of several hosts go to several folders), its ceilings into that folder's ceilings.json;
    then each host's plots and README.md regenerated from its folder alone. Returns the READMEs written. Old rows
    are read with what is known of them now: the exact model of their host (exact_device_name), transformers and
    llama.cpp marked as peers."""
    from bench import results

    frames = []
    for run in map(Path, runs):
        if not (run / results.NAME).is_file():
            raise ValueError(f"no {results.NAME} in {run}")
        frame = results.read(run / results.NAME)
        if "quick" in frame and frame["quick"].astype(str).str.lower().eq("true").any():
            raise ValueError(f"{run} holds rows of a quick run (bench.sweep --quick): only full runs are "
                             f"published")
        frame = frame.assign(device_name=frame["device_name"].map(exact_device_name))
        # transformers and llama.cpp are peers wherever they run (old rows of the model sweep did not say so)
        frame.loc[frame["backend"].isin(["transformers", *llama_cpp.RUNNERS]), "peer"] = "True"
        frames.append((run, frame))
    hosts = {}
    for run, frame in frames:
        for (device, name), rows in frame.groupby(["device", "device_name"]):
            folder = host_folder(root, device, name)
            results.merge(folder / results.NAME, rows.to_dict("records"))
            _merge_ceilings(run / "ceilings.json", folder / "ceilings.json", {name})
            hosts[folder] = device
    return [write(folder, device) for folder, device in sorted(hosts.items())]


def main(argv=None) -> int:
    from bench import cli, results

    parser = cli.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="the device type of --out's rows (cpu, cuda)")
    parser.add_argument("--out", type=cli.existing_folder,
                        help="the run folder whose report to write: its results.csv is read, its plots and "
                             "README.md written")
    parser.add_argument("--publish", nargs="+", type=Path, metavar="RUN",
                        help="merge these full runs' rows into reports/<device>/<host>/ and rewrite those reports")
    args = parser.parse_args(argv)
    if args.publish:
        if args.out:
            parser.error("--out and --publish: --publish writes the published reports, --out a run's own")
        try:
            for readme in publish(args.publish):
                print(readme)
        except ValueError as exc:  # results.Damaged included: nothing published from a table that cannot be trusted
            parser.error(f"--publish: {exc}")
        return 0
    if args.out is None:
        parser.error("--out RUN (a run's own report) or --publish RUN ... (the published reports under "
                     "reports/<device>/<host>/, rewritten by --publish only)")
    if not (args.out / results.NAME).is_file():
        parser.error(f"--out: no {results.NAME} in {args.out} (run python -m bench.sweep first)")
    try:
        results.read(args.out / results.NAME)
    except results.Damaged as exc:  # nothing plotted from a table that cannot be trusted
        parser.error(f"--out: {exc}")
    print(write(args.out, args.device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
