"""Roofline plots from the sweep's CSV: each backend's achieved FLOP/s against operational intensity, under the
ceilings measured in the same run.

    python -m profiling.roofline [--csv reports/cpu/<host>/results.csv] [--device cpu] [--out DIR]

Reads the long-format CSV of `bench.sweep` (columns op, backend, device, dtype, shape, median_ms, flops, bytes,
peak_tflops, peak_gbps, error, ...). For each device in it (or only --device), writes roofline.png into --out
(default: the CSV's folder, e.g. reports/<device>/<host>/); with several devices and no --device, roofline_<device>.png.
A point is one (op, backend, shape, dtype) row that passed its check: x = flops / bytes (the analytic models of
bench/ops' cost models: FLOP per byte of compulsory traffic), y = flops / median time. The lines are the roofs
min(peak FLOP/s, intensity x peak bandwidth) per dtype, with the peaks measured at the start of the sweep
(matmul rate, copy bandwidth). Colours are backends, markers ops.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
MARKERS = "osD^vP*Xh<>p"


def load(path: Path) -> pd.DataFrame:
    from bench import results

    frame = results.read(path)
    if "error" not in frame:
        frame["error"] = ""
    return frame


def points(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows that passed their check and have a cost model: with intensity (FLOP/byte) and achieved FLOP/s."""
    rows = frame[(frame["error"] == "")].copy()
    for column in ("flops", "bytes", "median_ms"):
        rows[column] = pd.to_numeric(rows[column], errors="coerce")
    rows = rows[(rows["flops"] > 0) & (rows["bytes"] > 0) & (rows["median_ms"] > 0)]
    rows["intensity"] = rows["flops"] / rows["bytes"]
    rows["flops_per_s"] = rows["flops"] / (rows["median_ms"] * 1e-3)
    return rows


def ceilings(frame: pd.DataFrame) -> dict[str, tuple[float, float]]:
    """dtype -> (peak FLOP/s, peak bytes/s): the median of the measured peaks stored in that dtype's rows."""
    found = {}
    for dtype, rows in frame.groupby("dtype"):
        flops = pd.to_numeric(rows.get("peak_tflops"), errors="coerce").dropna()
        bandwidth = pd.to_numeric(rows.get("peak_gbps"), errors="coerce").dropna()
        if len(flops) and len(bandwidth):
            found[str(dtype)] = (float(flops.median()) * 1e12, float(bandwidth.median()) * 1e9)
    return found


def _device_title(rows: pd.DataFrame, device: str) -> str:
    names = sorted({str(n) for n in rows.get("device_name", pd.Series(dtype=str)).dropna() if str(n)})
    return f"{device} ({', '.join(names)})" if names else device


def plot(frame: pd.DataFrame, device: str, path: Path) -> Path:
    """Draw the roofline of the rows of `device` into `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = frame[frame["device"].astype(str) == device]
    measured = points(rows)
    roofs = ceilings(rows)
    failed = int((rows["error"] != "").sum())
    fig, ax = plt.subplots(figsize=(10, 6.5))
    if len(measured):
        low = max(measured["intensity"].min() / 4, 1e-3)
        high = measured["intensity"].max() * 4
    else:
        low, high = 1e-2, 1e3
    for peak_flops, peak_bytes in roofs.values():
        high = max(high, 4 * peak_flops / peak_bytes)  # keep each ridge point in view
    x = np.logspace(np.log10(low), np.log10(high), 200)
    line_styles = ["-", "--", ":", "-."]
    for (dtype, (peak_flops, peak_bytes)), style in zip(sorted(roofs.items()), line_styles * 4):
        ax.plot(x, np.minimum(peak_flops, x * peak_bytes), style, color="black", linewidth=1.2,
                label=f"roof {dtype}: {peak_flops / 1e12:.3g} TFLOP/s, {peak_bytes / 1e9:.4g} GB/s")
        ax.axvline(peak_flops / peak_bytes, color="grey", linestyle=style, linewidth=0.6)
    backends = sorted(measured["backend"].astype(str).unique()) if len(measured) else []
    ops = sorted(measured["op"].astype(str).unique()) if len(measured) else []
    colors = plt.get_cmap("tab10" if len(backends) <= 10 else "tab20")
    for i, backend in enumerate(backends):
        for j, op in enumerate(ops):
            part = measured[(measured["backend"].astype(str) == backend) & (measured["op"].astype(str) == op)]
            if len(part):
                ax.scatter(part["intensity"], part["flops_per_s"], color=colors(i % colors.N),
                           marker=MARKERS[j % len(MARKERS)], s=28, alpha=0.8, edgecolors="none")
    # Legend entries for colours (backends) and markers (ops) separately, so it stays short.
    for i, backend in enumerate(backends):
        ax.scatter([], [], color=colors(i % colors.N), marker="o", label=backend)
    for j, op in enumerate(ops):
        ax.scatter([], [], color="grey", marker=MARKERS[j % len(MARKERS)], label=op)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("operational intensity (FLOP / byte of compulsory traffic)")
    ax.set_ylabel("achieved FLOP/s")
    subtitle = f"{len(measured)} measured points" + (f", {failed} row{'s' if failed != 1 else ''} failed its check (left out)" if failed else "")
    ax.set_title(f"Roofline on {_device_title(rows, device)}\n{subtitle}", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def devices(frame: pd.DataFrame, device: str | None = None) -> list[str]:
    """The devices to plot: `device`, or every one in the CSV; ValueError when it has no rows of `device`."""
    found = sorted(frame["device"].astype(str).unique()) if "device" in frame else []
    if device and device not in found:
        raise ValueError(f"no rows of device {device!r} in the CSV (devices: {', '.join(found) or 'none'})")
    return [device] if device else found


def write(csv_path: Path, device: str | None = None, out: Path | None = None) -> list[Path]:
    """Roofline plot(s) of the CSV at csv_path; returns the files written."""
    frame = load(csv_path)
    out = Path(out) if out is not None else Path(csv_path).parent
    chosen = devices(frame, device)
    single = len(chosen) == 1
    return [plot(frame, d, out / ("roofline.png" if single else f"roofline_{d}.png")) for d in chosen]


def main(argv=None) -> int:
    from bench import cli

    parser = cli.ArgumentParser(prog="python -m profiling.roofline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", type=Path, default=None,
                        help="the sweep's CSV (default: this host's published rows, reports/<device>/<host>/results.csv)")
    parser.add_argument("--device", default=None, help="only rows of this device (the CSV's device column)")
    parser.add_argument("--out", type=cli.out_folder, default=None, help="folder of the plot (default: the CSV's)")
    args = parser.parse_args(argv)
    csv_path = args.csv
    if csv_path is None:  # this host's published rows
        import torch

        from bench.timing import host_slug

        device = args.device or "cpu"
        here = host_slug(device) if device == "cpu" or torch.cuda.is_available() else "no-gpu-here"
        csv_path = ROOT / "reports" / device / here / "results.csv"
    if not csv_path.is_file():
        present = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("reports/*/*/results.csv"))
        argument = "--csv" if args.csv else f"--device {args.device or 'cpu'} (its CSV)"
        parser.error(f"{argument}: no sweep CSV at {csv_path} (python -m bench.sweep writes one); present: "
                     f"{', '.join(present) or 'none'}")
    try:
        found = devices(load(csv_path))
    except ValueError as exc:  # pandas' parse errors are ValueErrors
        parser.error(f"--csv {csv_path}: not a readable CSV ({str(exc).splitlines()[0]})")
    if not found:
        parser.error(f"--csv {csv_path}: no rows with a device: not a sweep CSV")
    if args.device and args.device not in found:
        parser.error(f"--device {args.device}: no rows of it in {csv_path}; valid: {', '.join(found)}")
    for path in write(csv_path, args.device, args.out):
        print(f"roofline -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
