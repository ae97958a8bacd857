"""A/B of benchmark rows: two commits of a results CSV, two CSV files, or two revisions run interleaved.

    python -m bench.compare A B [--device cpu] [--csv PATH] [--op ...] [--backend ...] [--shape ...] [--out DIR]
    python -m bench.compare --base CSV --new CSV [--device cpu] [--op ...] [--backend ...] [--out DIR]
    python -m bench.compare --interleave REV_A REV_B --op OP [--quick] [--backend ...] [--device cpu]
                            [--rounds 3] [--threads 1] [--shape KEY ...] [--out DIR]

Commits: A and B (hash prefixes, or git revisions) name values of the CSV's `commit` column (default
reports/<device>/results.csv). A rerun of a sweep replaces its rows in that file, so the rows of A and B are
looked up in the file on disk and in every committed version of it (git log), the newest row per commit and
key. Files: the rows of two CSVs (e.g. a CI run against the committed reports/cpu/<host>/results.csv). Interleaved:
the only trustworthy comparison on a shared machine, whose load drifts over minutes: both revisions are
checked out as detached git worktrees in a temporary folder, and the same `python -m bench.sweep` runs in each
in turn (its cwd that worktree, so that worktree's packages are imported: checked before the first round),
A then B, then B then A in the next round, so that order effects cancel. The sweep gets only options that
both revisions' `bench.sweep --help` list (else refused: e.g. --shape at a revision older than it).

Rows are paired by (op, backend, shape, dtype, device); rows that did not pass their check or have no time
count as absent. For each pair, with base and new times m (median), lo (p20) and hi (p80):

    ratio = m_new / m_base,   spread [lo_new / hi_base, hi_new / lo_base]

The change is beyond the noise only when the two p20-p80 intervals do not overlap, that is when the spread
excludes 1: "faster" (hi_new < lo_base) or "slower" (lo_new > hi_base); otherwise "within noise". A row timed
by a single call (the reference's row) has no spread to judge: "single call". Interleaved rows combine the
rounds: m is the median of the per-round medians; lo = min(p20 of the per-round medians, median of the
per-round p20s), hi = max(p80 of the per-round medians, median of the per-round p80s), so the interval covers
both the drift between rounds and the spread within one. The summary gives the count of each verdict and the
geometric mean ratio over the compared rows; rows on one side only are listed, not compared.

Written under --out (default reports/<device>/compare/): <name>.md (table, summary, one-sided rows), <name>.csv
(one row per key, both sides) and <name>.png (ratio per row on a log axis, its spread as a bar), <name> being
<A>_vs_<B>, base_vs_new or interleaved_<A>_vs_<B>. Bad input (unknown commit, no common rows, missing CSV)
is refused with one line naming what would have been valid, exit status 2, and nothing written.
"""
from __future__ import annotations

import io
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from bench import cli, plots, report  # noqa: E402
from bench.results import KEY, text_column  # noqa: E402
from bench import results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TIMES = ["median_ms", "p20_ms", "p80_ms"]
# The columns kept of each side's rows; samples = timed calls behind the row (repeats, summed over rounds),
# rounds = the interleaved rounds that measured it (1 for a CSV's row).
SIDE = TIMES + ["samples", "rounds", "commit", "threads", "device_name", "timestamp", "error"]
VERDICTS = ["faster", "slower", "within noise", "single call"]
COLORS = {"faster": "tab:green", "slower": "tab:red", "within noise": "0.45", "single call": "0.55"}
MAX_PLOTTED = 80  # rows drawn in the plot
SHOWN_ONE_SIDED = 12  # one-sided rows printed on the terminal (all are in the Markdown)


class Refused(ValueError):
    """Bad input, "ARGUMENT: what is wrong; valid: ...": main refuses it as bench.cli does (one line, exit
    status 2) before anything is written."""


class SweepFailed(RuntimeError):
    """An interleaved turn that gave no rows of its revision: main prints its line and exits with status 1."""


# ------------------------------------------------------------------------------------------------ rows

def read_rows(source, name: str) -> pd.DataFrame:
    """The rows of one results CSV (a path or a file object; `name` for messages), with the columns the
    comparison needs (SIDE): KEY, median_ms, p20_ms, p80_ms, samples (from repeats), rounds (1), commit,
    threads, device_name, timestamp, error ("" when it passed)."""
    try:
        frame = results.read(source)
    except results.Damaged as exc:  # never compared: its path and line say where
        raise Refused(f"{name}: {exc}") from None
    except (OSError, pd.errors.EmptyDataError) as exc:
        raise Refused(f"{name}: cannot be read ({exc})") from None
    missing = [c for c in KEY + TIMES if c not in frame]
    if missing:
        raise Refused(f"{name}: not a bench.sweep results CSV (no column {', '.join(missing)})")
    frame = frame.rename(columns={"repeats": "samples"}).assign(rounds=1)
    for column in SIDE:
        if column not in frame:
            frame[column] = math.nan
    for column in ("commit", "device_name", "timestamp", "error"):  # those the CSV may lack: "" as results.read does
        frame[column] = text_column(frame[column])
    return frame[KEY + SIDE]


def newest(frame: pd.DataFrame, by=KEY) -> pd.DataFrame:
    """One row per value of the columns `by`: the one with the latest timestamp."""
    return frame.sort_values("timestamp", kind="stable").drop_duplicates(by, keep="last").reset_index(drop=True)


def _git(repo, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)


def csv_history(path: Path) -> pd.DataFrame:
    """Rows of the CSV at path and of every version of it committed to git (where it is in a git work tree),
    one row per (key, commit): the newest."""
    if not path.is_file():
        raise Refused(f"--csv: no results CSV at {path} (the default: the published reports/<device>/results.csv); "
                      "valid: a results CSV's path")
    frames = [read_rows(path, f"--csv {path}")]
    top = _git(path.resolve().parent, "rev-parse", "--show-toplevel")
    if top.returncode == 0:
        repo = Path(top.stdout.strip())
        relative = path.resolve().relative_to(repo.resolve()).as_posix()
        for rev in _git(repo, "log", "--format=%H", "--", relative).stdout.split():
            shown = _git(repo, "show", f"{rev}:{relative}")
            if shown.returncode == 0:
                frames.append(read_rows(io.StringIO(shown.stdout), f"--csv {path} at {rev[:7]}"))
    return newest(pd.concat(frames, ignore_index=True), KEY + ["commit"])


def _commits_present(frame: pd.DataFrame) -> str:
    """'abc1234 (120 rows, 2026-11-29), ...', newest first."""
    found = frame.groupby("commit").agg(rows=("op", "size"), last=("timestamp", "max"))
    found = found.sort_values("last", ascending=False)
    return ", ".join(f"{c} ({n} rows, {str(t)[:16].replace('T', ' ')})"
                     for c, n, t in zip(found.index, found["rows"], found["last"]))


def find_commit(frame: pd.DataFrame, argument: str, wanted: str, where: str, repo: Path) -> str:
    """The value of the commit column that `wanted` (given as `argument`, for messages) names: itself, a hash
    prefix of it (4 hex digits at least), a longer hash it is a prefix of, or a git revision of repo that
    resolves to one of those."""
    present = sorted(set(frame["commit"]))

    def matching(name):
        if name in present:
            return [name]
        if re.fullmatch(r"[0-9a-fA-F]{4,40}", name):
            return [c for c in present if c.startswith(name.lower()) or name.lower().startswith(c)]
        return []

    found = matching(wanted)
    if not found:
        resolved = _git(repo, "rev-parse", "--verify", "--quiet", f"{wanted}^{{commit}}")
        found = matching(resolved.stdout.strip()) if resolved.returncode == 0 else []
    if len(found) > 1:
        raise Refused(f"{argument} {wanted}: ambiguous in {where}; valid: one of {', '.join(found)}")
    if not found:
        raise Refused(f"{argument} {wanted}: no rows of that commit in {where}; valid: the commits present, "
                      + _commits_present(frame))
    return found[0]


def select(frame: pd.DataFrame, where: str, **wanted) -> pd.DataFrame:
    """Rows whose columns take one of the wanted values (a None or empty list keeps all); refused when a
    filter leaves none, naming the values present."""
    for column, values in wanted.items():
        if not values:
            continue
        kept = frame[frame[column].isin(values)]
        if kept.empty:
            present = ", ".join(sorted(set(frame[column]))) or "none"
            raise Refused(f"--{column} {' '.join(values)}: no such rows in {where}; valid: {present}")
        frame = kept
    return frame


# ------------------------------------------------------------------------------------------- pairing

def pair(base: pd.DataFrame, new: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(compared, one_sided) from two frames of read_rows' columns, one row per key on each side.

    compared: KEY, base_<col> and new_<col> for every SIDE column, ratio, ratio_low, ratio_high (the spread
    of the module docstring) and verdict; sorted by ratio. one_sided: KEY, side ("base" or "new": where it
    was measured; "neither") and reason (the other side's error, or "absent")."""
    merged = base.merge(new, on=KEY, how="outer", suffixes=("_base", "_new"), indicator=True)

    def measured(side):
        return merged[f"error_{side}"].fillna("").eq("") & merged[f"median_ms_{side}"].notna()

    ok_base, ok_new = measured("base"), measured("new")
    both = merged[ok_base & ok_new].copy()
    compared = both[KEY].copy()
    for side in ("base", "new"):
        for column in SIDE:
            compared[f"{side}_{column}"] = both[f"{column}_{side}"]
    compared["ratio"] = compared["new_median_ms"] / compared["base_median_ms"]
    compared["ratio_low"] = compared["new_p20_ms"] / compared["base_p80_ms"]
    compared["ratio_high"] = compared["new_p80_ms"] / compared["base_p20_ms"]
    single = (compared["base_samples"] <= 1) | (compared["new_samples"] <= 1)  # NaN (unknown) compares False
    compared["verdict"] = np.select(
        [single, compared["ratio_high"] < 1, compared["ratio_low"] > 1], ["single call", "faster", "slower"],
        "within noise")
    compared = compared.sort_values(["ratio", *KEY], kind="stable").reset_index(drop=True)

    rest = merged[~(ok_base & ok_new)]
    one_sided = rest[KEY].copy()
    one_sided["side"] = np.select([ok_base[rest.index], ok_new[rest.index]], ["base", "new"], "neither")
    present = {"base": rest["_merge"].isin(["both", "left_only"]), "new": rest["_merge"].isin(["both", "right_only"])}
    reasons = []
    for index, side in zip(rest.index, one_sided["side"]):
        reasons.append("; ".join(f"{s}: " + ((rest.at[index, f"error_{s}"] or "no time") if present[s][index]
                                             else "absent") for s in ("base", "new") if s != side))
    one_sided["reason"] = reasons
    return compared, one_sided.sort_values(["side", *KEY], kind="stable").reset_index(drop=True)


def geomean(ratios: pd.Series) -> float:
    return float(np.exp(np.log(ratios).mean())) if len(ratios) else math.nan


def summary(compared: pd.DataFrame, one_sided: pd.DataFrame) -> str:
    """One line: the count of each verdict, the geometric mean ratio, the rows not compared."""
    counts = compared["verdict"].value_counts()
    verdicts = ", ".join(f"{counts.get(v, 0)} {v}" for v in VERDICTS if v != "single call" or counts.get(v, 0))
    sides = one_sided["side"].value_counts()
    alone = ", ".join(f"{sides[s]} {label}" for s, label in (("base", "only in base"), ("new", "only in new"),
                                                            ("neither", "measured on neither side")) if s in sides)
    return (f"{len(compared)} rows compared: {verdicts}; geometric mean ratio new/base "
            f"{geomean(compared['ratio']):.3f}x" + (f"; not compared: {alone}" if alone else ""))


def fmt_time(ms: float) -> str:
    """A time with its unit, 3 significant digits: 850 us, 12.4 ms, 3.22 s."""
    if math.isnan(ms):
        return ""
    if ms >= 1000:
        return f"{ms / 1000:.3g} s"
    return f"{ms:.3g} ms" if ms >= 1 else f"{ms * 1000:.3g} us"


def _spread(low: float, high: float, fmt) -> str:
    return f"{fmt(low)} - {fmt(high)}"


def table_rows(compared: pd.DataFrame, devices: bool) -> tuple[list[str], list[list[str]]]:
    """(header, cells) of the comparison table, times with units, ratios as 'x' factors."""
    header = ["op", "backend", "shape", "dtype"] + (["device"] if devices else []) + [
        "base median", "base p20 - p80", "new median", "new p20 - p80", "new/base (x)", "spread (x)", "verdict"]
    cells = []
    for row in compared.itertuples(index=False):
        cells.append([row.op, row.backend, row.shape, row.dtype] + ([row.device] if devices else []) + [
            fmt_time(row.base_median_ms), _spread(row.base_p20_ms, row.base_p80_ms, fmt_time),
            fmt_time(row.new_median_ms), _spread(row.new_p20_ms, row.new_p80_ms, fmt_time),
            f"{row.ratio:.3f}", _spread(row.ratio_low, row.ratio_high, lambda r: f"{r:.3f}"), row.verdict])
    return header, cells


def text_table(header: list[str], cells: list[list[str]]) -> str:
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells])


def _one_sided_lines(one_sided: pd.DataFrame) -> list[str]:
    where = {"base": "only in base", "new": "only in new", "neither": "measured on neither side"}
    return [f"{where[r.side]}: {r.op} {r.backend} {r.shape} {r.dtype} {r.device} ({r.reason})"
            for r in one_sided.itertuples(index=False)]


def _sides(compared: pd.DataFrame, labels: dict) -> list[str]:
    """Per side: its label, commits, device names and threads of the compared rows (those the CSV has); a
    warning when the two sides ran on different machines or thread counts."""
    lines, seen = [], {}
    for side in ("base", "new"):
        facts = {what: ", ".join(sorted({str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)
                                         for v in compared[f"{side}_{what}"].dropna() if v != ""}))
                 for what in ("commit", "device_name", "threads")}
        seen[side] = facts
        said = [f"{prefix}{facts[what]}" for what, prefix in (("commit", "commit "), ("device_name", ""),
                                                             ("threads", "threads ")) if facts[what]]
        lines.append(f"{side}: {labels[side]} ({'; '.join(said)})")
    for what in ("device_name", "threads"):
        if seen["base"][what] and seen["new"][what] and seen["base"][what] != seen["new"][what]:
            lines.append(f"warning: the sides differ in {what} ({seen['base'][what]} against {seen['new'][what]})")
    return lines


def plot(compared: pd.DataFrame, title: str, subtitle: str, path: Path) -> Path:
    """Ratio per row (the table's order, first at the top) with its spread, log x axis, 1.0 marked, rows
    beyond the noise coloured, the legend outside the data. Of more than MAX_PLOTTED rows, those that
    changed most (|log ratio|) are drawn: a taller figure would have labels no one can read."""
    if len(compared) > MAX_PLOTTED:
        moved = compared["ratio"].map(lambda r: abs(math.log(r))).nlargest(MAX_PLOTTED).index
        subtitle += f". Drawn: the {MAX_PLOTTED} rows that changed most (all {len(compared)} in the table)"
        compared = compared.loc[sorted(moved)]
    n = len(compared)
    devices = compared["device"].nunique() > 1
    dtypes = compared["dtype"].nunique() > 1
    labels = [" ".join([r.op, r.backend, r.shape] + ([r.dtype] if dtypes else []) + ([r.device] if devices else [])
                       + [f"({r.ratio:.3f}x)"]) for r in compared.itertuples(index=False)]
    fig, ax = plt.subplots(figsize=(11, 1.6 + 0.24 * n))
    y = np.arange(n)[::-1]
    for verdict in VERDICTS:
        rows = (compared["verdict"] == verdict).to_numpy()
        if not rows.any():
            continue
        part = compared[rows]
        beyond = ", beyond noise" if verdict in ("faster", "slower") else ""
        bars = [part["ratio"] - part["ratio_low"], part["ratio_high"] - part["ratio"]]
        ax.errorbar(part["ratio"], y[rows], xerr=bars,
                    fmt="o", ms=5, capsize=2, lw=1.2, color=COLORS[verdict], label=f"{verdict}{beyond} ({rows.sum()})",
                    mfc="white" if verdict == "single call" else COLORS[verdict])
    ax.axvline(1.0, color="k", lw=1, label="1x: no change")
    ax.set_xscale("log")
    low = min(compared["ratio_low"].min(), compared["ratio"].min(), 0.9)
    high = max(compared["ratio_high"].max(), compared["ratio"].max(), 1 / 0.9)
    ax.set_xlim(low / 1.08, high * 1.08)
    # finer ticks on a narrow range (on a wider one their labels overlap)
    fine = (0.33, 0.5, 0.67, 0.8, 0.9, 1, 1.1, 1.25, 1.5, 2, 3) if high / low < 4 else ()
    ticks = [t for t in sorted({0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, *fine})
             if low / 1.08 <= t <= high * 1.08]
    ax.xaxis.set_major_locator(ticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ticker.FixedFormatter([f"{t:g}x" for t in ticks]))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_ylim(-0.7, n - 0.3)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_xlabel("time new / base (median; bar: p20 new / p80 base to p80 new / p20 base); left of 1x: faster")
    ax.set_title("\n".join([title, *textwrap.wrap(subtitle, 110)]), fontsize=9, loc="left")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def write(compared: pd.DataFrame, one_sided: pd.DataFrame, labels: dict, title: str, out: Path, name: str,
          notes: list[str] = ()) -> dict:
    """Print the table and write out/<name>.{md,csv,png}. labels: {"base": ..., "new": ...}, notes: lines
    said before the table (how the rows were made). Returns {"md", "csv", "png": path}."""
    devices = compared["device"].nunique() > 1
    header, cells = table_rows(compared, devices)
    line = summary(compared, one_sided)
    sides = _sides(compared, labels)
    lonely = _one_sided_lines(one_sided)
    print(f"{title}\n" + "\n".join([*notes, *sides]) + "\n\n" + text_table(header, cells) + f"\n\n{line}")
    for text in lonely[:SHOWN_ONE_SIDED]:
        print("  " + text)
    if len(lonely) > SHOWN_ONE_SIDED:
        print(f"  ... and {len(lonely) - SHOWN_ONE_SIDED} more rows not compared (all in {out / name}.md)")

    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / f"{name}.md", "csv": out / f"{name}.csv", "png": out / f"{name}.png"}
    plot(compared, title, line, paths["png"])
    md = [f"# {title}", "", "Generated by `python -m bench.compare`.", "", *[f"- {x}" for x in [*notes, *sides]], "",
          f"**{line}**", "", f"![{name}]({paths['png'].name})", "",
          ("ratio = new median / base median; spread = [new p20 / base p80, new p80 / base p20]. Beyond the noise "
           "(faster, slower) only when the two p20-p80 intervals do not overlap, i.e. the spread excludes 1; a row "
           "timed by one call has no spread (single call). Sorted by ratio."), "",
          report._table(header, cells), ""]
    if lonely:
        md += [f"## Not compared ({len(lonely)})", "", *[f"- {x}" for x in lonely], ""]
    paths["md"].write_text("\n".join(md))
    one = one_sided.assign(verdict=one_sided["side"].map(
        {"base": "only in base", "new": "only in new", "neither": "measured on neither side"}))
    pd.concat([compared, one], ignore_index=True).to_csv(paths["csv"], index=False)
    print("-> " + ", ".join(str(p) for p in paths.values()))
    return paths


# ---------------------------------------------------------------------------------------- interleaved

# Run in a worktree: the sweep's --help, then the top-level packages it imported that have a folder in the
# worktree but were imported from elsewhere (an installed copy shadowing the revision's code).
PROBE = r"""
import os, runpy, sys
root = os.path.realpath(os.getcwd())
sys.argv = ["python -m bench.sweep", "--help"]
try:
    runpy.run_module("bench.sweep", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
strays = sorted(f"{name} from {os.path.dirname(module.__file__)}" for name, module in list(sys.modules.items())
                if "." not in name and getattr(module, "__file__", None) and os.path.isdir(os.path.join(root, name))
                and not os.path.realpath(module.__file__).startswith(root + os.sep))
print("\nimported from outside the worktree: " + "; ".join(strays))
"""


def resolve_revision(repo: Path, rev: str) -> tuple[str, str]:
    """(full hash, short hash) of a git revision of repo; refused, naming recent commits, if there is none."""
    found = _git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if found.returncode != 0:
        recent = _git(repo, "log", "--format=%h", "-8").stdout.split()
        raise Refused(f"--interleave {rev}: no such revision in {repo}; valid: a commit, branch or tag, e.g. "
                      f"the recent commits {', '.join(recent) or '(none)'}")
    full = found.stdout.strip()
    return full, _git(repo, "rev-parse", "--short", full).stdout.strip()


def probe(tree: Path, who: str) -> str:
    """The --help text of the worktree's bench.sweep, after checking that running `python -m bench.sweep` with
    cwd = tree imports tree's packages."""
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=tree, capture_output=True, text=True, check=False)
    text, marker, strays = done.stdout.rpartition("\nimported from outside the worktree: ")
    if done.returncode != 0 or not marker or "--op" not in text:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise Refused(f"--interleave: {who}: `python -m bench.sweep --help` failed in its worktree: {tail}")
    if strays.strip():
        raise Refused(f"--interleave: {who}: the sweep in its worktree imported packages from elsewhere: "
                      + strays.strip())
    return text


def sweep_arguments(helps: dict, ops, device, quick, backends, threads, shapes) -> list[str]:
    """The sweep's arguments (all but --out), each option checked against every revision's --help."""
    wanted = {"--op": ops, "--device": [device], "--threads": [str(threads)], "--no-report": []}
    if quick:
        wanted["--quick"] = []
    if backends:
        wanted["--backend"] = backends
    if shapes:
        wanted["--shape"] = shapes
    for who, text in helps.items():
        options = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", text))
        missing = [flag for flag in wanted if flag not in options]
        if missing:
            raise Refused(f"{', '.join(missing)}: the bench.sweep of {who} does not take it; valid: its options "
                          + ", ".join(sorted(options)))
    args = []
    for flag, values in wanted.items():
        # `--shape A B` where every revision takes several values after one flag, else `--shape A --shape B`
        several = flag != "--shape" or all(re.search(r"--shape (\S+) \[\1 \.\.\.\]", t) for t in helps.values())
        args += [flag, *values] if several else [item for v in values for item in (flag, v)]
    return args


def aggregate(rounds: pd.DataFrame) -> pd.DataFrame:
    """One row per key from the rows of several rounds (read_rows' columns): median = median of the per-round
    medians; p20 = min(p20 of the per-round medians, median of the per-round p20s); p80 = max(p80 of the
    per-round medians, median of the per-round p80s); samples summed; rounds = rounds measured. A key measured
    in no round keeps its last round's row (its error)."""
    out = []
    for _, group in rounds.groupby(KEY, sort=False):
        good = plots.measured(group)
        if good.empty:
            out.append(group.iloc[-1])
            continue
        medians, lows, highs = (good[c].to_numpy(float) for c in TIMES)
        row = good.iloc[-1].copy()
        row["median_ms"] = float(np.median(medians))
        row["p20_ms"] = float(min(np.percentile(medians, 20), np.median(lows)))
        row["p80_ms"] = float(max(np.percentile(medians, 80), np.median(highs)))
        row["samples"] = good["samples"].sum(min_count=1)
        row["rounds"] = len(good)
        out.append(row)
    return pd.DataFrame(out).reset_index(drop=True)


def interleave(repo: Path, revisions: dict, sweep_options: dict, rounds: int) -> tuple[dict, dict, list[str]]:
    """Run the sweep `rounds` times in detached worktrees of revisions ({"A": rev, "B": rev}), A B, then B A,
    ...; returns ({"A": rows, "B": rows} aggregated over the rounds, {"A": short hash, "B": ...}, notes on
    how). The worktrees live in a temporary folder, removed afterwards, also on an error or Ctrl-C."""
    resolved = {label: resolve_revision(repo, rev) for label, rev in revisions.items()}  # before any worktree
    tmp = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    trees = {}
    try:
        for label, (full, short) in resolved.items():
            tree = tmp / f"{label}-{short}"
            made = _git(repo, "worktree", "add", "--detach", str(tree), full)
            if made.returncode != 0:
                raise SweepFailed(f"git worktree add {short} failed: {made.stderr.strip()}")
            trees[label] = tree
        who = {label: f"revision {label} ({revisions[label]}, {short})" for label, (_, short) in resolved.items()}
        helps = {who[label]: probe(tree, who[label]) for label, tree in trees.items()}
        args = sweep_arguments(helps, **sweep_options)
        found = {label: [] for label in resolved}
        turns = []
        for r in range(1, rounds + 1):
            for label in (list(resolved) if r % 2 else list(resolved)[::-1]):
                short = resolved[label][1]
                out = tmp / "results" / f"{label}-{short}" / f"round{r}"
                print(f"round {r}/{rounds}: {label} ({short}) ...", flush=True)
                start = time.perf_counter()
                done = subprocess.run([sys.executable, "-m", "bench.sweep", *args, "--out", str(out)],
                                      cwd=trees[label], capture_output=True, text=True, check=False)
                seconds = time.perf_counter() - start
                csv = out / "results.csv"
                said = ((done.stderr or done.stdout).strip().splitlines() or ["no output"])[-1]
                if not csv.is_file() and done.returncode == 2:  # the sweep refused its arguments
                    raise Refused(f"--interleave: the sweep of {who[label]} refused: {said}")
                if not csv.is_file():
                    raise SweepFailed(f"the sweep of {who[label]} in round {r} failed (exit {done.returncode}): "
                                      + said)
                rows = read_rows(csv, str(csv))
                wrong = sorted({c for c in rows["commit"] if not (c.startswith(short) or short.startswith(c))})
                if wrong:
                    raise SweepFailed(f"the sweep of {who[label]} wrote rows of commit {', '.join(wrong)}: "
                                      "it did not run that revision's code")
                found[label].append(rows.assign(round=r))
                turns.append(label)
                status = "" if done.returncode == 0 else f", exit {done.returncode}"
                print(f"  {label} ({short}): {seconds:.1f} s, {len(rows)} rows{status}", flush=True)
    finally:
        for tree in trees.values():
            _git(repo, "worktree", "remove", "--force", str(tree))
        shutil.rmtree(tmp, ignore_errors=True)
        _git(repo, "worktree", "prune")
    order = " | ".join(" ".join(turns[i:i + 2]) for i in range(0, len(turns), 2))
    notes = [(f"interleaved: {rounds} rounds of `python -m bench.sweep {' '.join(args)}` in detached worktrees, "
              f"turns {order}"),
             ("per row: median of the per-round medians; p20 - p80 covering the per-round medians' p20 - p80 and "
              "the median of the per-round p20s and p80s")]
    sides = {label: aggregate(pd.concat(frames, ignore_index=True)) for label, frames in found.items()}
    return sides, {label: short for label, (_, short) in resolved.items()}, notes


# ------------------------------------------------------------------------------------------------- CLI

def _sharing(rows: pd.DataFrame, commit: str) -> str:
    """Commits with measured rows of the same keys as commit's, most shared first: 'abc1234 (18 rows), ...'."""
    measured = plots.measured(rows)
    keys = measured[KEY].apply(tuple, axis=1)
    mine = set(keys[measured["commit"] == commit])
    counts = keys[measured["commit"] != commit].isin(mine).groupby(measured["commit"]).sum()
    counts = counts[counts > 0].sort_values(ascending=False)
    return ", ".join(f"{c} ({n} rows)" for c, n in counts.items()) or "none"


def parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("commits", nargs="*", metavar="A B",
                        help="base and new commit of the CSV's commit column (hash prefixes or git revisions)")
    parser.add_argument("--csv", type=cli.existing_file,
                        help="the results CSV of A and B (default reports/<device>/results.csv)")
    parser.add_argument("--base", type=cli.existing_file, help="compare two CSV files: the base rows")
    parser.add_argument("--new", type=cli.existing_file, help="compare two CSV files: the new rows")
    parser.add_argument("--interleave", nargs=2, metavar=("REV_A", "REV_B"),
                        help="run the sweep alternately at two git revisions (base A, new B) and compare")
    parser.add_argument("--device", default="cpu", help="rows of this device; reports/<device>/ (default cpu)")
    parser.add_argument("--op", nargs="+", help="only these ops (--interleave: the ops to sweep)")
    parser.add_argument("--backend", nargs="+", help="only these backends")
    parser.add_argument("--shape", nargs="+", metavar="KEY", help="only these shapes (the CSV's shape strings)")
    parser.add_argument("--out", type=cli.out_folder,
                        help="folder of the table and plot (default reports/<device>/compare)")
    parser.add_argument("--quick", action="store_true", help="--interleave: the quick sweep")
    parser.add_argument("--rounds", type=cli.positive_int, help="--interleave: turns of each revision (default 3)")
    parser.add_argument("--threads", type=cli.positive_int, help="--interleave: the sweep's --threads (default 1)")
    return parser


def _check_mode(args) -> str:
    """"commits", "files" or "interleave", from the arguments given; refused when they mix or lack some."""
    files = args.base is not None or args.new is not None
    modes = [name for name, given in (("A B", bool(args.commits)), ("--base/--new", files),
                                      ("--interleave", args.interleave is not None)) if given]
    if len(modes) != 1:
        raise Refused(f"{' and '.join(modes) or 'A B'}: " + ("one of them only" if modes else "missing")
                      + "; valid: two commits A B, or --base CSV --new CSV, or --interleave REV_A REV_B")
    if args.commits and len(args.commits) != 2:
        raise Refused(f"A B {' '.join(args.commits)}: {len(args.commits)} given; valid: two commits, base then new")
    if files and (args.base is None or args.new is None):
        raise Refused(f"{'--new' if args.new is None else '--base'}: missing; valid: --base CSV and --new CSV together")
    if args.csv is not None and not args.commits:
        raise Refused("--csv: names the CSV of two commits A B; valid with files: --base CSV --new CSV")
    if not args.interleave:
        given = [flag for flag, value in (("--quick", args.quick), ("--rounds", args.rounds),
                                          ("--threads", args.threads)) if value]
        if given:
            raise Refused(f"{', '.join(given)}: only with --interleave")
        return "commits" if args.commits else "files"
    if not args.op:
        raise Refused("--op: missing; valid: --interleave REV_A REV_B --op OP (the sweep to run at both)")
    return "interleave"


def run(args) -> int:
    mode = _check_mode(args)
    out = args.out or ROOT / "reports" / args.device / "compare"
    if problem := cli.writable_problem(out):  # before the sweeps of --interleave, not after them
        raise Refused(f"--out: {problem}")
    filters = {"op": args.op, "backend": args.backend, "shape": args.shape}
    notes = []
    if mode == "commits":
        path = args.csv or ROOT / "reports" / args.device / "results.csv"
        where = f"{path} (and its committed versions)"
        rows = select(csv_history(path), where, device=[args.device])
        repo = path.resolve().parent
        a, b = (find_commit(rows, argument, wanted, where, repo) for argument, wanted in zip("AB", args.commits))
        base, new = (select(rows[rows["commit"] == c], f"{where} at commit {c}", **filters) for c in (a, b))
        labels = {"base": str(path), "new": str(path)}
        title, name = f"bench.compare: {b} against {a} on {args.device}", f"{a}_vs_{b}"
        no_common = (f"A B {a} {b}: no common measured rows; valid: commits sharing rows with {a}, "
                     + _sharing(rows, a))
    elif mode == "files":
        base, new = (newest(select(read_rows(p, f"{flag} {p}"), f"{flag} {p}", device=[args.device], **filters))
                     for flag, p in (("--base", args.base), ("--new", args.new)))
        labels = {"base": str(args.base), "new": str(args.new)}
        title, name = f"bench.compare: {args.new} against {args.base} on {args.device}", "base_vs_new"
        ops = {side: ", ".join(sorted(set(rows["op"]))) for side, rows in (("base", base), ("new", new))}
        no_common = (f"--base/--new: no common measured rows (op, backend, shape, dtype, device) in {args.base} "
                     f"and {args.new}; the base has ops {ops['base']}, the new {ops['new']}")
    else:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=False)
        if top.returncode != 0:
            raise Refused(f"--interleave: {os.getcwd()} is in no git work tree; valid: run it in the lab's")
        revisions = dict(zip("AB", args.interleave))
        options = {"ops": args.op, "device": args.device, "quick": args.quick, "backends": args.backend,
                   "threads": args.threads or 1, "shapes": args.shape}
        sides, shorts, notes = interleave(Path(top.stdout.strip()), revisions, options, args.rounds or 3)
        (base, new), (a, b) = (sides["A"], sides["B"]), (shorts["A"], shorts["B"])
        labels = {"base": f"revision {args.interleave[0]}", "new": f"revision {args.interleave[1]}"}
        title = f"bench.compare, interleaved: {b} against {a} on {args.device} ({', '.join(args.op)})"
        name = f"interleaved_{a}_vs_{b}"
        no_common = f"--interleave {a} {b}: the sweeps at the two revisions have no common measured rows"
    compared, one_sided = pair(base, new)
    if compared.empty:
        raise Refused(no_common)
    write(compared, one_sided, labels, title, out, name, notes)
    return 0


def main(argv=None) -> int:
    """Exit status 0; 2 on bad input (one line on stderr, nothing written); 1 when an interleaved sweep fails."""
    parse = parser()
    args = parse.parse_args(argv)
    try:
        return run(args)
    except Refused as exc:
        parse.error(str(exc))
    except SweepFailed as exc:
        print(f"bench.compare: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench.compare: interrupted; its worktrees are removed, nothing written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
