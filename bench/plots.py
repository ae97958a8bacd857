"""Plots from a results CSV only (bench.sweep's long format), with matplotlib's Agg backend.

- <op>_<axis>[_<what is held>].png: latency (median, p20-p80 bars) and throughput (TFLOP/s, or GB/s for ops
  without FLOPs) against one shape axis, one line per backend, the host, the dtype and the other axes held fixed
  (one file per fixed group with at least three points on a numeric axis, two on another; where an axis has
  several, each file's name says the values that set it apart, e.g. gated_delta_rule_T_B4_bfloat16.png). A
  figure never mixes hosts (device_name).
- <op>_roofline.png: the fraction of the roofline floor each backend reaches, every shape.
- linear_vs_quadratic.png: the fastest lab backend of linear attention, the gated delta rule and softmax
  attention against sequence length at matched heads, the crossover marked.
"""
from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import pandas as pd  # noqa: E402

from bench import results  # noqa: E402
from bench.ops import OPS  # noqa: E402

MAX_GROUPS_PER_AXIS = 3


def load(path) -> pd.DataFrame:
    frame = results.read(path)
    for column in ("error", "preset", "best_peer", "checked_against"):
        if column not in frame:
            frame[column] = ""
    frame["peer"] = frame["peer"].astype(str).str.lower().eq("true")
    # rows written before the sweep timed backward passes are forward rows
    frame["pass"] = ["forward" if pd.isna(v) or v == "" else str(v) for v in frame["pass"]] if "pass" in frame \
        else "forward"
    return frame


def forward_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows that time the forward pass (every plot and table but the report's training section)."""
    return frame[frame["pass"] == "forward"]


def measured(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows that passed their check and have a time."""
    return frame[frame["error"].eq("") & frame["median_ms"].notna()]


def _label(values):
    return "/".join(str(int(v)) if isinstance(v, float) and v.is_integer() else str(v) for v in values)


def _groups(rows, op, columns):
    """Groups of rows with every other axis (and dtype) equal and >= 3 distinct values on a numeric axis (>= 2
    on a categorical or compound one), the largest first."""
    fixed = ["device_name", "dtype"] + [a for a in OPS[op].axes if a not in columns and a in rows]
    found = []
    for key, group in rows.groupby(fixed, dropna=False):
        categorical = len(columns) > 1 or not pd.api.types.is_numeric_dtype(group[columns[0]])
        if group[columns].drop_duplicates().shape[0] >= (2 if categorical else 3):
            found.append((dict(zip(fixed, key if isinstance(key, tuple) else (key,))), group))
    found.sort(key=lambda item: -item[1][columns].drop_duplicates().shape[0])
    return found[:MAX_GROUPS_PER_AXIS]


def _throughput(group, rows):
    """A backend's rate (FLOP/s, or GB/s for ops without FLOPs) in the unit that fits all of `rows`."""
    if rows["flops"].fillna(0).gt(0).any():
        if rows["tflops"].max() < 1:  # CPUs
            return group["tflops"] * 1e3, "GFLOP/s"
        return group["tflops"], "TFLOP/s"
    return group["gbps"], "GB/s"


def _held(fixed: dict, every: list[dict]) -> str:
    """The file name's suffix of one group: the fixed values that set it apart from the axis' other groups
    ("_B4_bfloat16"; a host as its folder name and threads, "_intel-xeon-2threads"; "" when the axis has one
    group)."""
    from bench.timing import model_slug

    parts = []
    for key, value in fixed.items():
        if len({str(f[key]) for f in every}) <= 1:
            continue
        if key == "device_name":
            threads = re.search(r"\((\d+) threads?\)", str(value))
            parts.append(model_slug(str(value)) + (f"-{threads.group(1)}threads" if threads else ""))
        else:
            parts.append(_label([value]) if key == "dtype" else f"{key}{_label([value])}")
    return "".join(f"_{re.sub(r'[^A-Za-z0-9.+-]+', '-', part)}" for part in parts)


def plot_axis(frame: pd.DataFrame, op: str, axis: str, out: Path) -> list[Path]:
    """Latency and throughput of op against `axis`, one figure per group of fixed other axes."""
    columns = list(OPS[op].plot_axes[axis])
    rows = measured(frame[frame["op"] == op])
    written = []
    groups = _groups(rows, op, columns)
    for fixed, group in groups:
        numeric = len(columns) == 1 and pd.api.types.is_numeric_dtype(group[columns[0]])
        order = group[columns].drop_duplicates().sort_values(columns)
        position = {tuple(v): i for i, v in enumerate(order.itertuples(index=False))}
        fig, (left, right) = plt.subplots(1, 2, figsize=(12.5, 4))
        for backend, lines in group.groupby("backend"):
            lines = lines.sort_values(columns)
            x = lines[columns[0]] if numeric else [position[tuple(v)] for v in lines[columns].itertuples(index=False)]
            style = "--" if lines["peer"].any() else "-"
            left.errorbar(x, lines["median_ms"], yerr=[(lines["median_ms"] - lines["p20_ms"]).clip(lower=0),
                                                       (lines["p80_ms"] - lines["median_ms"]).clip(lower=0)],
                          fmt="o" + style, capsize=3, label=backend)
            values, unit = _throughput(lines, group)
            right.plot(x, values, "o" + style, label=backend)
        for ax, title in ((left, "latency (ms, median, p20-p80)"), (right, f"throughput ({unit})")):
            ax.set_xlabel("/".join(columns))
            ax.set_title(title, fontsize=10)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            if numeric:
                swept = sorted(group[columns[0]].unique())
                if swept[0] > 0 and swept[-1] / swept[0] > 8:
                    ax.set_xscale("log", base=2)
                ax.set_xticks(swept, [_label([v]) for v in swept], rotation=45 if len(swept) > 6 else 0)
                ax.minorticks_off()
            else:
                ax.set_xticks(range(len(position)), [_label(k) for k in position])
            _readable_log_axis(ax.yaxis)
        _legend_outside(right)
        fig.suptitle(f"{op} on {group['device_name'].iloc[0]}: " + ", ".join(f"{k}={_label([v])}" for k, v in fixed.items()),
                     fontsize=9)
        fig.tight_layout()
        path = out / f"{op}_{axis}{_held(fixed, [f for f, _ in groups])}.png"
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
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(backends) + 4), 4))
    for i, backend in enumerate(backends):
        values = rows[rows["backend"] == backend]
        for bound, marker in (("compute", "o"), ("memory", "s")):
            part = values[values["bound"] == bound]
            jitter = [i + 0.25 * ((j % 7) / 6 - 0.5) for j in range(len(part))]
            ax.scatter(jitter, part["roofline_fraction"], marker=marker, alpha=0.7, color=f"C{i}")
    for bound, marker in (("compute", "o"), ("memory", "s")):  # the legend says the markers, the ticks the colours
        ax.scatter([], [], marker=marker, color="gray", label=f"{bound}-bound shapes")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(backends)), backends)
    ax.set_yscale("log")
    ax.set_ylabel("roofline floor / time")
    _readable_log_axis(ax.yaxis)
    ax.set_title(f"{op}: fraction of the roofline floor (measured ceilings)", fontsize=10)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    _legend_outside(ax)
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


def _paired(rows, spec, dtype, values):
    """spec's rows (a linear op) of dtype whose columns pair with the attention shape `values` (spec.versus)."""
    part = rows[(rows["op"] == spec.name) & (rows["dtype"] == dtype)]
    for column, theirs in spec.versus.same.items():
        part = part[part[column] == values[theirs]]
    for column, value in spec.versus.fixed.items():
        part = part[part[column] == value]
    return part


def linear_vs_quadratic(frame: pd.DataFrame) -> dict | None:
    """The linear ops (those whose declaration pairs them with a quadratic attention, bench.ops Versus) against
    that attention at one shape: the matched sweeps with the most attention rows, the best lab backend of each
    against T, and the crossovers: the smallest swept T from which a linear op is at least as fast at every longer
    swept T, against the best lab and the best peer attention.
    Returns {"quadratic": op, "shape", "dtype", "device_name", "ms": {series: Series of ms by T}, "backend":
    {series: Series}, "crossover": {(linear op, "lab" | "peer"): T or None}}; series are "lab" and "peer" (the
    attention's) and each linear op's name."""
    rows = measured(frame)
    linear = [spec for spec in OPS.values() if spec.versus]
    best = None
    for quadratic in dict.fromkeys(spec.versus.op for spec in linear):
        axes = [a for a in OPS[quadratic].axes if a != "T"]
        for key, att in rows[rows["op"] == quadratic].groupby(["dtype", *axes]):
            dtype, *shape = key
            values = dict(zip(axes, shape))
            paired = {}
            for spec in (s for s in linear if s.versus.op == quadratic):
                part = _paired(rows, spec, dtype, values)
                shared = set(part["T"]) & set(att["T"])
                if len(shared) >= 2:
                    paired[spec.name] = part[part["T"].isin(shared)]
            if paired and (best is None or len(att) > len(best[3])):
                best = (quadratic, dtype, values, att, paired)
    if best is None:
        return None
    quadratic, dtype, values, att, paired = best
    result = {"quadratic": quadratic, "dtype": dtype, "device_name": att["device_name"].iloc[0], "ms": {},
              "backend": {}, "crossover": {},
              "shape": ", ".join(f"{axis}={_label([value])}" for axis, value in values.items())}
    result["ms"]["lab"], result["backend"]["lab"] = _best_by_T(att)
    result["ms"]["peer"], result["backend"]["peer"] = _best_by_T(att[att["peer"]], lab_only=False)
    for name, part in paired.items():
        result["ms"][name], result["backend"][name] = _best_by_T(part)
        for against in ("lab", "peer"):
            result["crossover"][(name, against)] = _crossover(result["ms"][name], result["ms"][against])
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
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    quadratic = found["quadratic"]
    linear = [name for name in found["ms"] if name not in ("lab", "peer")]
    styles = {"lab": (f"{quadratic} (best lab)", "k", "-"), "peer": (f"{quadratic} (best peer)", "gray", "--")}
    styles |= {name: (f"{name} (best lab)", f"C{i}", "-") for i, name in enumerate(linear)}
    for key, (label, color, style) in styles.items():
        values = found["ms"][key]
        if len(values):
            ax.plot(values.index, values.values, style, marker="o", color=color, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    swept = sorted(found["ms"]["lab"].index)
    ax.set_xticks(swept, [_label([T]) for T in swept])
    ax.minorticks_off()
    _readable_log_axis(ax.yaxis)
    for i, name in enumerate(linear):
        T = found["crossover"][(name, "lab")]
        if T is not None:
            ax.axvline(T, color=f"C{i}", ls=":", lw=1.2, label=f"{name} crossover: T = {int(T)}")
    ax.set_xlabel("sequence length T (tokens)")
    ax.set_ylabel("time per call (ms, median)")
    ax.set_title(f"linear vs quadratic attention, {found['shape']}, {found['dtype']}\n{found['device_name']}",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    _legend_outside(ax)
    fig.tight_layout()
    path = out / "linear_vs_quadratic.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _plain(value, _position=None) -> str:
    """A tick label for a person: 6, 0.3, 1200, never 6 x 10^0."""
    return f"{value:.3g}" if value < 1e5 else f"{value:.0e}"


def _readable_log_axis(axis):
    """Log-axis ticks as plain numbers (minor ticks labelled too when the axis spans under a decade or two)."""
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(_plain))
    low, high = axis.get_view_interval()
    if low > 0 and high / low < 100:  # label the minor ticks 2 and 5 of each decade
        axis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
            lambda v, _: _plain(v) if f"{v:.0e}"[0] in "25" else ""))


def _legend_outside(ax, **options):
    """The legend to the right of the axes, never over the data."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, **options)


def plot_all(frame: pd.DataFrame, out: Path) -> dict[str, list[Path]]:
    """Every plot of every op in frame; {op: [paths]} plus "linear_vs_quadratic"."""
    out.mkdir(parents=True, exist_ok=True)
    for op in [name for name, spec in OPS.items() if spec.registry]:  # earlier plots (others draw their own)
        # this op's names only: "moe_*" would take moe_permute's and moe_dispatch's too
        own = re.compile(rf"{re.escape(op)}_({'|'.join(map(re.escape, [*OPS[op].plot_axes, 'roofline']))})(_.+)?")
        for stale in out.glob(f"{op}_*.png"):  # a smaller table may draw fewer
            if own.fullmatch(stale.stem):
                stale.unlink()
    (out / "linear_vs_quadratic.png").unlink(missing_ok=True)
    written = {}
    for op in frame["op"].unique():
        paths = []
        for axis in OPS[op].plot_axes if op in OPS else ():
            paths += plot_axis(frame, op, axis, out)
        roof = plot_roofline_fraction(frame, op, out)
        written[op] = paths + ([roof] if roof else [])
    lvq = plot_linear_vs_quadratic(frame, out)
    written["linear_vs_quadratic"] = [lvq] if lvq else []
    return written

