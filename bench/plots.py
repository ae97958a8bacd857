"""Plots from a results CSV only (bench.sweep's long format), with matplotlib's Agg backend.

- <op>_<axis>[_<n>].png: latency (median, p20-p80 bars) and throughput (TFLOP/s, or GB/s for ops without
  FLOPs) against one shape axis, one line per backend, the other axes held fixed (one file per fixed group
  with at least three points on a numeric axis, two on another).
- <op>_roofline.png: the fraction of the roofline floor each backend reaches, every shape.
- linear_vs_quadratic.png: the fastest lab backend of linear attention, the gated delta rule and softmax
  attention against sequence length at matched heads, the crossover marked.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from bench import presets  # noqa: E402

# Axes plotted together: a compound axis varies several columns at once (heads, head dim).
PLOT_AXES = {
    "linear_attention": {"T": ["T"], "B": ["B"], "seqs": ["seqs"], "heads": ["H"], "dim": ["K", "V"]},
    "gated_delta_rule": {"T": ["T"], "B": ["B"], "seqs": ["seqs"], "heads": ["Hk", "Hv"], "dim": ["K", "V"]},
    "attention": {"T": ["T"], "B": ["B"], "heads": ["Hq", "Hkv"], "D": ["D"]},
    "moe_permute": {"N": ["N"], "D": ["D"], "E": ["E"], "top_k": ["top_k"], "routing": ["routing"]},
    "moe_gemm": {"N": ["N"], "E": ["E"], "top_k": ["top_k"], "K": ["K"], "Nout": ["Nout"], "routing": ["routing"]},
    "moe": {"N": ["N"], "D": ["D"], "E": ["E"], "I": ["I"], "top_k": ["top_k"], "routing": ["routing"]},
}
REGISTRY_OP = {"moe_gemm": "grouped_gemm"}
MAX_GROUPS_PER_AXIS = 3


def load(path) -> pd.DataFrame:
    frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
    for column in ("error", "preset", "best_peer", "checked_against"):
        frame[column] = ["" if pd.isna(v) else str(v) for v in frame[column]] if column in frame else ""
    frame["peer"] = frame["peer"].astype(str).str.lower().eq("true")
    return frame


def measured(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows that passed their check and have a time."""
    return frame[frame["error"].eq("") & frame["median_ms"].notna()]


def _axes_of(op):
    return list(presets.AXES.get(REGISTRY_OP.get(op, op), ()))


def _label(values):
    return "/".join(str(int(v)) if isinstance(v, float) and v.is_integer() else str(v) for v in values)


def _groups(rows, op, columns):
    """Groups of rows with every other axis (and dtype) equal and >= 3 distinct values on a numeric axis (>= 2
    on a categorical or compound one), the largest first."""
    fixed = ["dtype"] + [a for a in _axes_of(op) if a not in columns and a in rows]
    found = []
    for key, group in rows.groupby(fixed, dropna=False):
        categorical = len(columns) > 1 or not pd.api.types.is_numeric_dtype(group[columns[0]])
        if group[columns].drop_duplicates().shape[0] >= (2 if categorical else 3):
            found.append((dict(zip(fixed, key if isinstance(key, tuple) else (key,))), group))
    found.sort(key=lambda item: -item[1][columns].drop_duplicates().shape[0])
    return found[:MAX_GROUPS_PER_AXIS]


def _throughput(group):
    if group["flops"].fillna(0).gt(0).any():
        return group["tflops"], "TFLOP/s"
    return group["gbps"], "GB/s"


def plot_axis(frame: pd.DataFrame, op: str, axis: str, out: Path) -> list[Path]:
    """Latency and throughput of op against `axis`, one figure per group of fixed other axes."""
    columns = PLOT_AXES[op][axis]
    rows = measured(frame[frame["op"] == op])
    written = []
    for n, (fixed, group) in enumerate(_groups(rows, op, columns)):
        numeric = len(columns) == 1 and pd.api.types.is_numeric_dtype(group[columns[0]])
        order = group[columns].drop_duplicates().sort_values(columns)
        position = {tuple(v): i for i, v in enumerate(order.itertuples(index=False))}
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for backend, lines in group.groupby("backend"):
            lines = lines.sort_values(columns)
            x = lines[columns[0]] if numeric else [position[tuple(v)] for v in lines[columns].itertuples(index=False)]
            style = "--" if lines["peer"].any() else "-"
            left.errorbar(x, lines["median_ms"], yerr=[(lines["median_ms"] - lines["p20_ms"]).clip(lower=0),
                                                       (lines["p80_ms"] - lines["median_ms"]).clip(lower=0)],
                          fmt="o" + style, capsize=3, label=backend)
            values, unit = _throughput(lines)
            right.plot(x, values, "o" + style, label=backend)
        for ax, title in ((left, "latency (ms, median, p20-p80)"), (right, f"throughput ({unit})")):
            ax.set_xlabel("/".join(columns))
            ax.set_title(title, fontsize=10)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            if numeric and group[columns[0]].min() > 0 and group[columns[0]].max() / group[columns[0]].min() > 8:
                ax.set_xscale("log", base=2)
            if not numeric:
                ax.set_xticks(range(len(position)), [_label(k) for k in position])
        left.legend(fontsize=8)
        fig.suptitle(f"{op} on {group['device_name'].iloc[0]}: " + ", ".join(f"{k}={_label([v])}" for k, v in fixed.items()),
                     fontsize=9)
        fig.tight_layout()
        path = out / f"{op}_{axis}{'' if n == 0 else f'_{n}'}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def plot_roofline_fraction(frame: pd.DataFrame, op: str, out: Path) -> Path | None:
    """Fraction of the roofline floor, every measured shape, per backend (strip plot, log scale)."""
    rows = measured(frame[frame["op"] == op]).dropna(subset=["roofline_fraction"])
    if rows.empty:
        return None
    backends = sorted(rows["backend"].unique())
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(backends) + 2), 4))
    for i, backend in enumerate(backends):
        values = rows[rows["backend"] == backend]
        for bound, marker in (("compute", "o"), ("memory", "s")):
            part = values[values["bound"] == bound]
            jitter = [i + 0.25 * ((j % 7) / 6 - 0.5) for j in range(len(part))]
            ax.scatter(jitter, part["roofline_fraction"], marker=marker, alpha=0.7,
                       label=f"{bound}-bound shapes" if i == 0 else None, color=f"C{i}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(backends)), backends)
    ax.set_yscale("log")
    ax.set_ylabel("roofline floor / time")
    ax.set_title(f"{op}: fraction of the roofline floor (measured ceilings)", fontsize=10)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"{op}_roofline.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _best_by_T(rows, lab_only=True):
    rows = rows[~rows["peer"] & (rows["backend"] != "reference")] if lab_only else rows
    if rows.empty:
        return pd.Series(dtype=float), pd.Series(dtype=object)
    best = rows.loc[rows.groupby("T")["median_ms"].idxmin()]
    return best.set_index("T")["median_ms"], best.set_index("T")["backend"]


def linear_vs_quadratic(frame: pd.DataFrame) -> dict | None:
    """Matched sweeps of attention and the linear ops (same dtype, batch, value heads = query heads, head dim,
    one sequence per row, chunked mode), the best lab backend of each against T, and the crossovers: the
    smallest swept T from which the linear op is at least as fast at every longer swept T.
    Returns {"shape", "dtype", "T", "attention", "attention_peer", <linear op>: Series, "crossover": {...}}."""
    rows = measured(frame)
    attention = rows[rows["op"] == "attention"]
    best = None
    for (dtype, B, Hq, Hkv, D), att in attention.groupby(["dtype", "B", "Hq", "Hkv", "D"]):
        linear = {}
        gdr = rows[(rows["op"] == "gated_delta_rule") & (rows["dtype"] == dtype) & (rows["B"] == B)
                   & (rows["seqs"] == 1) & (rows["Hv"] == Hq) & (rows["Hk"] == Hkv) & (rows["K"] == D)
                   & (rows["V"] == D) & (rows["mode"] == "chunk")]
        lin = rows[(rows["op"] == "linear_attention") & (rows["dtype"] == dtype) & (rows["B"] == B)
                   & (rows["seqs"] == 1) & (rows["H"] == Hq) & (rows["K"] == D) & (rows["V"] == D)]
        for name, part in (("gated_delta_rule", gdr), ("linear_attention", lin)):
            shared = sorted(set(part["T"]) & set(att["T"]))
            if len(shared) >= 2:
                linear[name] = part[part["T"].isin(shared)]
        if linear and (best is None or len(att) > len(best[1])):
            best = ((dtype, B, Hq, Hkv, D), att, linear)
    if best is None:
        return None
    (dtype, B, Hq, Hkv, D), att, linear = best
    result = {"shape": f"B={int(B)}, heads {int(Hq)} (kv/k {int(Hkv)}) x {int(D)}", "dtype": dtype,
              "device_name": att["device_name"].iloc[0], "crossover": {}}
    result["attention"], result["attention_backend"] = _best_by_T(att)
    peers = att[att["peer"]]
    result["attention_peer"], result["attention_peer_backend"] = _best_by_T(peers, lab_only=False)
    for name, part in linear.items():
        result[name], result[f"{name}_backend"] = _best_by_T(part)
        for against in ("attention", "attention_peer"):
            result["crossover"][(name, against)] = _crossover(result[name], result[against])
    return result


def _crossover(linear: pd.Series, quadratic: pd.Series):
    """Smallest shared T from which linear <= quadratic at every longer shared T; None if it never wins."""
    shared = sorted(set(linear.index) & set(quadratic.index))
    crossover = None
    for T in reversed(shared):
        if linear[T] <= quadratic[T]:
            crossover = T
        else:
            break
    return crossover


def plot_linear_vs_quadratic(frame: pd.DataFrame, out: Path) -> Path | None:
    found = linear_vs_quadratic(frame)
    if found is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = [("attention", "softmax attention (best lab)", "k", "-"),
              ("attention_peer", "softmax attention (best peer)", "gray", "--"),
              ("gated_delta_rule", "gated delta rule (best lab)", "C0", "-"),
              ("linear_attention", "linear attention (best lab)", "C1", "-")]
    for key, label, color, style in series:
        values = found.get(key)
        if values is not None and len(values):
            ax.plot(values.index, values.values, style, marker="o", color=color, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    for i, ((name, against), T) in enumerate(found["crossover"].items()):
        if T is not None and against == "attention":
            ax.axvline(T, color="C0" if name == "gated_delta_rule" else "C1", ls=":", lw=1.2)
            ax.annotate(f"{name} crossover: T={int(T)}", (T, 0.03 + 0.04 * i), xycoords=("data", "axes fraction"),
                        xytext=(4, 0), textcoords="offset points", fontsize=8)
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("ms per call (median)")
    ax.set_title(f"linear vs quadratic attention, {found['shape']}, {found['dtype']}\n{found['device_name']}",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "linear_vs_quadratic.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_all(frame: pd.DataFrame, out: Path) -> dict[str, list[Path]]:
    """Every plot of every op in frame; {op: [paths]} plus "linear_vs_quadratic"."""
    out.mkdir(parents=True, exist_ok=True)
    for op in PLOT_AXES:  # this function's earlier plots: a smaller table may draw fewer
        for stale in out.glob(f"{op}_*.png"):
            stale.unlink()
    (out / "linear_vs_quadratic.png").unlink(missing_ok=True)
    written = {}
    for op in frame["op"].unique():
        paths = []
        for axis in PLOT_AXES.get(op, {}):
            paths += plot_axis(frame, op, axis, out)
        roof = plot_roofline_fraction(frame, op, out)
        written[op] = paths + ([roof] if roof else [])
    lvq = plot_linear_vs_quadratic(frame, out)
    written["linear_vs_quadratic"] = [lvq] if lvq else []
    return written

