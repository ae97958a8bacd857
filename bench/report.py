"""The Markdown report of one device, written from its results CSV (and ceilings.json) only.

    python -m bench.report --device cpu [--dir reports/cpu]

Writes the plots (bench.plots) and README.md: the machine and its measured ceilings, the issue's targets
computed from the rows, linear versus quadratic attention, and per op a short "where the time goes", the
plots and the table of rows; the published numbers of ANCHORS.md stand beside ours, with their source and
device.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd

from bench import plots

OP_ORDER = ["gated_delta_rule", "linear_attention", "attention", "moe_permute", "moe_gemm", "moe", "model"]
REFERENCE_CHUNK_MODEL = "chunked gated delta rule: 6 K V + 64 (4 K + 3 V) FLOPs per token per value head"

# Published numbers (ANCHORS.md). match: how to find our comparable rows (None: nothing comparable here).
ANCHORS = [
    # FlashQLA benchmark_results_H200.txt: (model, Hk, Hv, seqs, total T) -> FlashQLA / FlashInfer / fla ms
    *[dict(what=f"GDR prefill {model} ({hk}, {hv}) x 128, {seqs} x {T // seqs}, bf16", metric="ms",
           published=f"FlashQLA {a} / FlashInfer {b} / fla {c}", device="H200",
           source="QwenLM/FlashQLA benchmark/benchmark_results_H200.txt",
           match=dict(op="gated_delta_rule", dtype="bfloat16", Hk=hk, Hv=hv, K=128, V=128, T=T, seqs=seqs))
      for model, hk, hv, seqs, T, a, b, c in [
          ("Qwen3.5-35B", 16, 32, 1, 32768, 0.877, 1.550, 1.890), ("Qwen3.5-35B", 16, 32, 1, 4096, 0.173, 0.201, 0.247),
          ("Qwen3.5-35B", 16, 32, 4, 32768, 0.611, 0.425, 1.898),
          ("Qwen3.5-397B", 16, 64, 1, 32768, 1.521, 1.552, 3.331), ("Qwen3.5-397B", 16, 64, 1, 8192, 0.397, 0.392, 0.814),
          ("Qwen3.5-397B", 16, 64, 1, 2048, 0.113, 0.105, 0.220)]],
    dict(what="chunk GDN fwd vs FlashAttention-2, B1 T8192 H96 D128 causal", metric="ms",
         published="GDN 1.265 / FA2 3.753", device="GB200", source="flash-linear-attention README",
         match=dict(op="gated_delta_rule", B=1, T=8192, Hv=96, K=128)),
    dict(what="chunk GDN fwd vs FlashAttention-2, B4 T2048 H16 D128 causal", metric="ms",
         published="GDN 0.753 / FA2 0.346", device="GB200", source="flash-linear-attention README",
         match=dict(op="gated_delta_rule", B=4, T=2048, Hv=16, K=128)),
    dict(what="FlashAttention-2 forward, best", metric="TFLOP/s", published="335", device="H100",
         source="FlashAttention-2 paper", match=dict(op="attention", best="tflops")),
    dict(what="FlashAttention-3 fp16 forward, best (75% of peak)", metric="TFLOP/s", published="740", device="H100",
         source="FlashAttention-3 paper", match=dict(op="attention", best="tflops")),
    dict(what="crossover of chunked GDN against FlashAttention", metric="tokens", published="2K to 8K",
         device="Hopper", source="ANCHORS.md (expected)", match=dict(crossover=True)),
    dict(what="Liger fused MoE, Qwen3-30B-A3B shape, bf16 inference", metric="TFLOP/s", published="523",
         device="H100", source="Liger kernel", match=dict(op="moe", preset="Qwen3-30B-A3B", best="tflops")),
    dict(what="torch._grouped_mm full MoE forward, Qwen3-30B shape", metric="TFLOP/s", published="242",
         device="H100", source="VeOmni PR 460", match=dict(op="moe", preset="Qwen3-30B-A3B", best="tflops")),
    dict(what="torch._grouped_mm full MoE forward, Qwen3-Next shape", metric="TFLOP/s", published="181",
         device="H100", source="VeOmni PR 460", match=dict(op="moe", preset="Qwen3-Next-80B-A3B", best="tflops")),
    dict(what="DeepGEMM fp8 grouped contiguous GEMM", metric="TFLOP/s", published="1214 to 1346", device="H800",
         source="DeepGEMM", match=dict(op="moe_gemm", best="tflops")),
    dict(what="vLLM moe_align_block_size, per dispatch", metric="ms", published="0.020 to 0.027", device="GPU",
         source="vLLM PR 55225", match=dict(op="moe_permute", N=1, best="median_ms")),
    dict(what="MoE decode, fraction of the memory roofline", metric="fraction", published="0.34", device="GPU",
         source="ANCHORS.md", match=dict(op="moe", N=1, best="roofline_fraction")),
]
CEILING_ANCHORS = {"cpu": ("116 GFLOP/s fp32 matmul, 22 GB/s copy", "the 2-core development machines, measured once"),
                   "cuda": ("H200: 989 TFLOP/s bf16 datasheet (about 790 measured), HBM 4.8 TB/s", "datasheet, ANCHORS.md")}


def _fmt(value, digits=3):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000 or abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.{digits}g}"
    return str(value)


def _values(frame, column) -> str:
    """The distinct values of a column, as text ("" for none)."""
    found = {int(v) if isinstance(v, float) and v.is_integer() else v for v in frame[column].dropna()}
    return ", ".join(sorted(str(v) for v in found))


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
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
    return f", {row['tflops'] / best:.0%} of the highest ceiling measured on this machine ({best * 1e3:.0f} GFLOP/s)"


def targets(frame, highest: dict | None = None) -> list[str]:
    """The issue's targets, computed from whatever rows exist (CPU, float32). highest: device name -> the highest
    float32 matmul ceiling (TFLOP/s) of its runs in ceilings.json."""
    ok = plots.measured(frame)
    highest = highest or {}
    lines = []
    gdr = _select(ok, op="gated_delta_rule", dtype="float32", B=1, T=8192, seqs=1, Hk=2, Hv=4, K=128, V=128,
                  mode="chunk")
    lab, peer = _lab(gdr), gdr[gdr["backend"] == "transformers"]
    if not lab.empty:
        best = lab.loc[lab["median_ms"].idxmin()]
        fraction = best["tflops"] / best["peak_tflops"]
        text = (f"- GDR chunked fp32 B=1 Hk=2 Hv=4 K=V=128 T=8192: best lab backend `{best['backend']}` "
                f"{best['median_ms']:.1f} ms, {best['tflops'] * 1e3:.1f} GFLOP/s = **{fraction:.0%} of the matmul "
                f"ceiling measured at the start of its run** ({best['peak_tflops'] * 1e3:.0f} GFLOP/s"
                f"{_against_highest(best, highest)}; target >= 50%)")
        if not peer.empty:
            ratio = peer["median_ms"].iloc[0] / best["median_ms"]
            text += f"; transformers' torch_chunk_gated_delta_rule {peer['median_ms'].iloc[0]:.1f} ms: **{ratio:.2f}x** (target >= 4x)"
        lines.append(text + ".")
    else:
        lines.append("- GDR chunked fp32 T=8192 (Hk=2, Hv=4, K=V=128): not measured in this CSV (full CPU sweep).")
    found = plots.linear_vs_quadratic(frame)
    if found:
        for (name, against), T in found["crossover"].items():
            if against == "attention":
                lines.append(f"- Crossover of {name} (best lab) over the best lab softmax attention at {found['shape']}, "
                             f"{found['dtype']}: **" + (f"T = {int(T)}**" if T is not None else "none in the swept range**")
                             + " (target <= 1024).")
    moe = _select(ok, op="moe", dtype="float32", preset="Qwen3.5-35B-A3B")
    for N, what in ((1, "memory"), (4096, "compute")):
        lab = _lab(moe[moe["N"] == N])
        if lab.empty:
            lines.append(f"- MoE Qwen3.5-35B fp32 N={N}: not measured in this CSV.")
            continue
        best = lab.loc[lab["median_ms"].idxmin()]
        if what == "memory":
            floor = best["bytes"] / (best["peak_gbps"] * 1e9) * 1e3
            lines.append(f"- MoE Qwen3.5-35B fp32 N=1: `{best['backend']}` {best['median_ms']:.2f} ms vs memory floor "
                         f"{floor:.2f} ms (active experts' weights over {best['peak_gbps']:.1f} GB/s): "
                         f"**{best['median_ms'] / floor:.2f}x the floor** (target <= 1.5x).")
        else:
            lines.append(f"- MoE Qwen3.5-35B fp32 N=4096: `{best['backend']}` {best['median_ms']:.0f} ms, "
                         f"{best['tflops'] * 1e3:.1f} GFLOP/s = **{best['tflops'] / best['peak_tflops']:.0%} of the matmul "
                         f"ceiling measured at the start of its run** ({best['peak_tflops'] * 1e3:.0f} GFLOP/s"
                         f"{_against_highest(best, highest)}; target >= 80%).")
    return lines


# ------------------------------------------------------------------------------------ where the time goes

def where_time_goes(rows, op) -> list[str]:
    """A few sentences from the data: the best lab backend on the heaviest shape, its bound and roofline
    fraction, the spread over shapes, and how it compares with the peers."""
    ok = plots.measured(rows)
    lab = _lab(ok)
    if lab.empty:
        errors = rows[rows["error"] != ""]
        return [f"No lab backend measured{': ' + errors['error'].iloc[0] if not errors.empty else ''}."]
    lines = []
    work = lab["flops"].where(lab["flops"] > 0, lab["bytes"])
    if work.isna().all():  # rows without a cost model (the model's): only the ranking
        wins = lab.loc[lab.groupby(["shape", "dtype"])["median_ms"].idxmin(), "backend"].value_counts()
        lines = ["No FLOP or byte model for these rows. Fastest lab backend per shape: "
                 + ", ".join(f"`{b}` {n}x" for b, n in wins.items()) + "."]
        if op == "model":  # the targets, and the share of dense projections that bounds any speedup
            from bench.model import summary

            lines += [line + "." for line in summary(rows.to_dict("records"))]
        return lines
    heavy_shape = lab.loc[work.idxmax(), "shape"]
    heavy = lab[lab["shape"] == heavy_shape]
    best = heavy.loc[heavy["median_ms"].idxmin()]
    compute = best["tflops"] / best["peak_tflops"] if best["peak_tflops"] else math.nan
    memory = best["gbps"] / best["peak_gbps"] if best["peak_gbps"] else math.nan
    lines.append(f"Heaviest shape `{heavy_shape}` ({best['dtype']}): `{best['backend']}` takes {best['median_ms']:.3g} ms; "
                 f"the cost model makes it {best['bound']}-bound (floor {best['floor_ms']:.3g} ms), and it runs at "
                 f"{best['roofline_fraction']:.0%} of that floor ({compute:.0%} of the matmul ceiling, "
                 f"{memory:.0%} of copy bandwidth).")
    per_shape = lab.loc[lab.groupby(["shape", "dtype"])["median_ms"].idxmin()]
    fractions = per_shape["roofline_fraction"].dropna()
    if len(fractions) > 1:
        worst = per_shape.loc[fractions.idxmin()]
        bounds = per_shape["bound"].value_counts().to_dict()
        lines.append(f"Over {len(per_shape)} shapes the fastest lab backend reaches a median {fractions.median():.0%} of the "
                     f"roofline floor ({', '.join(f'{v} {k}-bound' for k, v in bounds.items())}); lowest at `{worst['shape']}` "
                     f"({worst['roofline_fraction']:.1%}, {worst['median_ms']:.3g} ms against a {worst['floor_ms']:.3g} ms floor"
                     + ("; one of the smaller shapes, where fixed per-call costs weigh most)."
                        if worst["flops"] + worst["bytes"] <= (per_shape["flops"] + per_shape["bytes"]).median() else ")."))
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
        lines.append("Errors: " + "; ".join(f"`{b}` on {n} shape(s), e.g. {msg[:160]}" for b, (n, msg) in summary.items()) + ".")
    return lines


MODEL_COLUMNS = ["backend", "dtype", "shape", "variant", "phase", "context", "median_ms", "p20_ms", "p80_ms",
                 "tokens_per_s", "dense_share", "cache_bytes", "error"]


def _model_table(rows) -> str:
    """The model's rows carry their own columns (bench.model): those that have a value."""
    columns = [c for c in MODEL_COLUMNS if c in rows and rows[c].astype(str).str.strip().replace("nan", "").ne("").any()]
    sort = [c for c in ("variant", "phase", "context", "backend") if c in columns]
    return _table(columns, rows.sort_values(sort)[columns].values.tolist())


def _rows_table(rows) -> str:
    if rows["op"].eq("model").all():
        return _model_table(rows)
    header = ["backend", "dtype", "shape", "median ms", "p20-p80 ms", "TFLOP/s", "GB/s", "roofline", "bound",
              "rel err (vs)", "x ref", "x best peer", "error"]
    body = []
    for _, r in rows.sort_values(["dtype", "shape", "median_ms"]).iterrows():
        spread = "" if pd.isna(r["p20_ms"]) else f"{_fmt(r['p20_ms'])}-{_fmt(r['p80_ms'])}"
        against = r.get("checked_against", "")
        err = "" if pd.isna(r["rel_err"]) else f"{r['rel_err']:.1e} ({against})"
        peer = "" if pd.isna(r["speedup_vs_best_peer"]) else f"{r['speedup_vs_best_peer']:.2f} ({r['best_peer']})"
        body.append([r["backend"] + (" (peer)" if r["peer"] else ""), r["dtype"], f"`{r['shape']}`", r["median_ms"],
                     spread, r["tflops"], r["gbps"], r["roofline_fraction"], r["bound"] if isinstance(r["bound"], str) else "",
                     err, r["speedup_vs_reference"], peer, r["error"][:120]])
    return _table(header, body)


# ----------------------------------------------------------------------------------------------- anchors

def anchors_table(frame, device) -> str:
    ok = plots.measured(frame)
    ours = ok["device_name"].iloc[0] if not ok.empty else "(nothing measured)"
    body = []
    lvq = plots.linear_vs_quadratic(frame)
    for anchor in ANCHORS:
        match = dict(anchor["match"])
        value, detail = "not measured here", ""
        if match.pop("crossover", False):
            T = lvq and lvq["crossover"].get(("gated_delta_rule", "attention"))
            if lvq:
                value = f"T = {int(T)}" if T else "none in range"
                detail = f"{lvq['shape']}, {lvq['dtype']}"
        else:
            best = match.pop("best", "median_ms")
            rows = _select(ok, **match)
            if not rows.empty:
                pick = rows.loc[rows[best].idxmin() if best == "median_ms" else rows[best].idxmax()]
                value = _fmt(float(pick[best]))
                detail = f"`{pick['backend']}`, {pick['dtype']}, `{pick['shape']}`"
        differs = "same kind" if anchor["device"] in ours else f"differs: ours is {ours}"
        body.append([anchor["what"], anchor["metric"], anchor["published"], f"{anchor['device']} ({anchor['source']})",
                     value, detail, differs])
    return _table(["published figure", "unit", "published", "device (source)", "ours", "our row", "device"], body)


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
    rows = [[name, run["timestamp"], run["threads"], ", ".join(f"{k} {v * 1e3:.1f}" if device == "cpu" else
                                                                f"{k} {v:.1f}" for k, v in run["matmul_tflops"].items()),
             f"{run['copy_gbps']:.1f}"] for name, run in last.items()]
    unit = "GFLOP/s" if device == "cpu" else "TFLOP/s"
    published, source = CEILING_ANCHORS.get(device, ("", ""))
    return [_table(["device", "measured at", "threads", f"matmul {unit} by dtype", "copy GB/s (read + write)"], rows),
            "", f"Published for comparison: {published} ({source}). {len(runs)} runs recorded in ceilings.json; "
            "each row of results.csv keeps the ceilings of its own run (peak_tflops, peak_gbps)."]


# ---------------------------------------------------------------------------------------------- report

def write(out: Path, device: str) -> Path:
    """Regenerate the plots and README.md of out/results.csv."""
    out = Path(out)
    frame = plots.load(out / "results.csv")
    written = plots.plot_all(frame, out)
    ok = plots.measured(frame)
    names = _values(frame, "device_name")
    md = [f"# Benchmarks on {device}: {names}", "",
          "Generated by `python -m bench.report --device " + device + "` from `results.csv` (written by "
          "`python -m bench.sweep --op OP --device " + device + "`). Do not edit by hand.", "",
          f"{len(frame)} rows, {len(ok)} measured, {int((frame['error'] != '').sum())} with an error; commits "
          f"{_values(frame, 'commit')}; torch {_values(frame, 'torch_version')}; threads {_values(frame, 'threads')}; "
          f"from {frame['timestamp'].min()} to {frame['timestamp'].max()}.", ""]
    if device == "cpu":
        md += ["Timing on a shared 2-core machine is noisy: the p20-p80 spread of each row says how much; ratios "
               "taken within one run are more trustworthy than absolute times. Rerun a sweep on a quiet machine to "
               "confirm a number.", ""]
    over = ok[ok["roofline_fraction"] > 1]
    if len(over):
        md += [f"{len(over)} rows run faster than their roofline floor (fraction > 1): their working set fits in a "
               "cache while the copy bandwidth is measured on a buffer far larger than the caches, or the load of "
               "the machine dropped after the ceilings were measured at the start of their run.", ""]
    md += ["Columns: median, p20, p80 over adaptive repeats (bench.timing); TFLOP/s and GB/s from the analytic "
           "models of bench/cost.py; roofline = max(FLOPs / matmul ceiling, bytes / copy bandwidth) / time, with the "
           f"ceilings measured at the start of the run; `rel err (vs)`: relative Frobenius error against the float64 "
           "yardstick named; `x ref`, `x best peer`: speedups on the same shape (none when a check failed).", "",
           "## Measured ceilings", "", *ceilings_section(out, device), "",
           "## Targets (issue 5)", "", *targets(frame, highest_ceilings(out)), "",
           "## Linear versus quadratic attention", ""]
    lvq = plots.linear_vs_quadratic(frame)
    if lvq:
        md += ["![linear vs quadratic](linear_vs_quadratic.png)", ""]
        table_T = sorted(lvq["attention"].index)
        header = ["T", "attention (best lab)", "attention (best peer)", "gated delta rule", "linear attention"]
        body = [[int(T)] + [f"{_fmt(float(lvq[k][T]))} ({lvq[k + '_backend'][T]})" if k in lvq and T in lvq[k].index else ""
                            for k in ("attention", "attention_peer", "gated_delta_rule", "linear_attention")]
                for T in table_T]
        md += [f"Best lab backend per op (ms, median) at {lvq['shape']}, {lvq['dtype']}:", "", _table(header, body), ""]
        for (name, against), T in lvq["crossover"].items():
            who = "the best lab" if against == "attention" else "the best peer"
            md.append(f"- {name} is at least as fast as {who} softmax attention from "
                      + (f"T = {int(T)} on." if T is not None else "no swept T (it never wins in range)."))
        md.append("")
    else:
        md += ["Not enough matched rows (attention and a linear op at the same heads and sequence lengths).", ""]
    md += ["## Published numbers beside ours", "",
           "Published numbers are leads from other machines: only a side-by-side run on one machine settles a "
           "comparison.", "", anchors_table(frame, device), ""]
    for op in [o for o in OP_ORDER if o in set(frame["op"])] + sorted(set(frame["op"]) - set(OP_ORDER)):
        rows = frame[frame["op"] == op]
        md += [f"## {op}", "", "### Where the time goes", "", *[f"- {line}" for line in where_time_goes(rows, op)], ""]
        if op == "gated_delta_rule":
            md += [f"FLOP model: {REFERENCE_CHUNK_MODEL} (9.5 d^2 at d = 128), 6 K V in recurrent mode.", ""]
        extra = sorted(out.glob("model_*.png")) if op == "model" else []  # drawn by bench.model
        for path in written.get(op, []) + extra:
            md.append(f"![{path.stem}]({path.name})")
        md += ["", _rows_table(rows), ""]
    readme = out / "README.md"
    readme.write_text("\n".join(md))
    return readme


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="reports/<device>/ (cpu, cuda)")
    parser.add_argument("--dir", type=Path, help="results folder (default reports/<device>)")
    args = parser.parse_args(argv)
    out = args.dir or Path(__file__).resolve().parent.parent / "reports" / args.device
    print(write(out, args.device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
