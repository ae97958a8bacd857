"""The results CSV: its schema, reading, merging and appending. Nothing else reads or writes results.csv.

    frame = results.read(path)                 # text columns as text, numbers as numbers; Damaged if it is not a CSV
    results.append(path, rows)                 # rows as they finish: a killed sweep keeps them
    frame = results.merge(path, rows)          # the same, returning the whole table
    results.check_folder(folder)               # before the first timed call: writable, its CSV readable

One long-format row per KEY (op, backend, shape, dtype, device, pass): writing a row replaces the row of its key
and keeps every other; speedups are recomputed over the whole table. Every write is a read-modify-write under
an exclusive lock (fcntl.flock on `results.csv.lock` beside the CSV), and the new table replaces the old in one
step (a temporary file in the same folder, then os.replace): two sweeps finishing together both keep their rows,
and a sweep killed while writing leaves the old table whole. A damaged CSV (truncated, garbled, a junk row) is
reported with its path and line (Damaged), never merged.
"""
from __future__ import annotations

import csv
import fcntl
import io
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from bench.ops import ALL_AXES, CATEGORICAL_AXES
from model.cli import writable_problem

NAME = "results.csv"
KEY = ["op", "backend", "shape", "dtype", "device", "pass"]
COLUMNS = (["op", "backend", "peer", "device", "device_name", "dtype", "shape", "pass", "preset", *ALL_AXES,
            "median_ms", "p20_ms", "p80_ms", "repeats", "cuda_graph", "flops", "bytes", "tflops", "gbps",
            "peak_tflops", "peak_gbps", "floor_ms", "bound", "roofline_fraction", "rel_err", "checked_against",
            "error", "speedup_vs_reference", "best_peer", "speedup_vs_best_peer"]
           + ["threads", "torch_version", "commit", "timestamp"])
PEER_PREFIX = "speedup_vs_"
# Columns of text: read as text (a commit hash like 0501666 is no int), "" where empty.
TEXT_COLUMNS = ("op", "backend", "device", "device_name", "dtype", "shape", "preset", *CATEGORICAL_AXES,
                "checked_against", "error", "best_peer", "bound", "commit", "torch_version", "timestamp", "peer",
                "variant", "phase", "how", "transport", "part", "pass", "piece")
# Columns that hold numbers in every row that has them: a value that is no number there is a garbled row.
NUMBER_COLUMNS = ("median_ms", "p20_ms", "p80_ms", "repeats", "flops", "bytes", "tflops", "gbps", "peak_tflops",
                  "peak_gbps", "floor_ms", "roofline_fraction", "rel_err", "speedup_vs_reference",
                  "speedup_vs_best_peer", "threads")


class Damaged(ValueError):
    """A results CSV that cannot be trusted: "PATH:LINE: what is wrong". Nothing was merged into it."""

    def __init__(self, path, line: int | None, problem: str):
        self.path, self.line = str(path), line
        super().__init__(f"{path}{f':{line}' if line else ''}: {problem} (a damaged results CSV: fix or move it; "
                         "nothing was written to it)")


# ------------------------------------------------------------------------------------------------ reading

def _text_of(source) -> tuple[str, str]:
    """(the CSV's text, its name for messages) of a path or a file object."""
    if hasattr(source, "read"):
        text = source.read()
        return (text.decode() if isinstance(text, bytes) else text), getattr(source, "name", "<stream>")
    try:
        return Path(source).read_text(encoding="utf-8"), str(source)
    except UnicodeDecodeError as exc:
        raw = Path(source).read_bytes()
        line = raw[:exc.start].count(b"\n") + 1
        raise Damaged(source, line, f"not text (byte {raw[exc.start]:#04x} is no UTF-8)") from None


def validate(text: str, name: str) -> None:
    """Raise Damaged naming the first bad line: a row with more or fewer fields than the header (a junk row, or the
    last row of a truncated file), a file that does not end with a newline (cut off mid-row), a number column
    (NUMBER_COLUMNS) holding text."""
    if not text.strip():
        raise Damaged(name, 1, "empty: no header")
    if "\x00" in text:
        raise Damaged(name, text[:text.index("\x00")].count("\n") + 1, "holds NUL bytes")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
        numbers = [(i, c) for i, c in enumerate(header) if c in NUMBER_COLUMNS]
        for fields in reader:
            line = reader.line_num
            if len(fields) != len(header):
                raise Damaged(name, line, f"{len(fields)} fields, the header has {len(header)}")
            for i, column in numbers:
                value = fields[i]
                if value not in ("", "nan", "inf", "-inf"):
                    try:
                        float(value)
                    except ValueError:
                        raise Damaged(name, line, f"{column} is {value[:40]!r}, not a number") from None
    except csv.Error as exc:
        raise Damaged(name, reader.line_num, f"not CSV ({exc})") from None
    if not text.endswith("\n"):
        raise Damaged(name, text.count("\n") + 1, "cut off: the last row has no line end (a truncated file)")


def read(source) -> pd.DataFrame:
    """A results CSV (a path or a file object) with its text columns as text ("" for empty), the rest parsed as
    numbers, and its pass column (forward where a row has none). Damaged (path and line) if it is not whole."""
    text, name = _text_of(source)
    validate(text, name)
    frame = pd.read_csv(io.StringIO(text), keep_default_na=False, na_values=[""],
                        dtype={c: str for c in TEXT_COLUMNS})
    for column in TEXT_COLUMNS:
        if column in frame:
            frame[column] = text_column(frame[column])
    return with_pass(frame)


def text_column(values: pd.Series) -> list[str]:
    """A column of text with "" for missing values (read_csv makes an all-empty column float NaN)."""
    return ["" if pd.isna(v) else str(v) for v in values]


def with_pass(frame: pd.DataFrame) -> pd.DataFrame:
    """frame with its pass column, "forward" where a row has none (rows written before passes were swept, rows of
    a sweep of its own)."""
    frame["pass"] = frame["pass"].fillna("forward").replace("", "forward") if "pass" in frame else "forward"
    return frame


def keys(frame: pd.DataFrame) -> set[tuple[str, ...]]:
    """The KEY tuples of frame's rows, as text."""
    return set(map(tuple, with_pass(frame.copy())[KEY].astype(str).values)) if len(frame) else set()


def key_of(row: dict) -> tuple[str, ...]:
    """The KEY tuple of one row dict, as keys() gives it."""
    return tuple(str(row.get(c) or ("forward" if c == "pass" else "")) for c in KEY)


# ------------------------------------------------------------------------------------------------ the table

def ordered(frame: pd.DataFrame) -> pd.DataFrame:
    """frame with every COLUMNS column (empty where it had none), the peers' speedups after best_peer, other
    columns last; rows sorted by op, dtype, shape, pass, backend."""
    frame = with_pass(frame)
    for column in COLUMNS:
        if column not in frame:
            frame[column] = math.nan if column not in ("error", "best_peer", "preset") else ""
    peers = sorted(c for c in frame.columns if c.startswith(PEER_PREFIX) and c not in COLUMNS)
    rest = [c for c in frame.columns if c not in COLUMNS and c not in peers]
    frame = frame[COLUMNS[:COLUMNS.index("speedup_vs_best_peer") + 1] + peers
                  + COLUMNS[COLUMNS.index("speedup_vs_best_peer") + 1:] + rest]
    return frame.sort_values(["op", "dtype", "shape", "pass", "backend"], kind="stable").reset_index(drop=True)


def add_speedups(frame: pd.DataFrame) -> pd.DataFrame:
    """speedup_vs_reference, speedup_vs_<peer> for every peer and speedup_vs_best_peer, from the rows of the
    same (op, shape, dtype, device, pass) that passed their check. Rows with an error get none. (Plain lists, not
    per-cell pandas writes: a sweep rewrites the whole table after every row.)"""
    frame = frame.drop(columns=[c for c in frame.columns if c.startswith(PEER_PREFIX)] + ["best_peer"],
                       errors="ignore")
    n = len(frame)
    ok = (frame["error"].fillna("").eq("") & frame["median_ms"].notna()).tolist()
    peer = frame["peer"].astype(str).str.lower().eq("true").tolist()
    backend, median = frame["backend"].tolist(), frame["median_ms"].tolist()
    columns = [frame[c].tolist() for c in ("op", "shape", "dtype", "device", "pass")]
    groups: dict[tuple, list[int]] = {}
    for i in range(n):
        key = tuple(column[i] for column in columns)
        if ok[i] and not any(pd.isna(k) for k in key):
            groups.setdefault(key, []).append(i)
    vs_reference, best_peer, vs_best = [math.nan] * n, [""] * n, [math.nan] * n
    vs_peer: dict[str, list[float]] = {}
    for rows in groups.values():
        times = {backend[i]: median[i] for i in rows}
        first = {}
        for i in rows:
            first.setdefault(backend[i], i)
        peers = {b: t for b, t in times.items() if peer[first[b]]}
        for i in rows:
            if "reference" in times and backend[i] != "reference":
                vs_reference[i] = times["reference"] / median[i]
            others = {b: t for b, t in peers.items() if b != backend[i]}
            for name, t in others.items():
                vs_peer.setdefault(name, [math.nan] * n)[i] = t / median[i]
            if others:
                best = min(others, key=others.get)
                best_peer[i], vs_best[i] = best, others[best] / median[i]
    frame["speedup_vs_reference"] = vs_reference
    frame["best_peer"] = best_peer
    frame["speedup_vs_best_peer"] = vs_best
    for name in sorted(vs_peer):
        frame[PEER_PREFIX + name] = vs_peer[name]
    return frame


def combined(old: pd.DataFrame | None, rows: list[dict]) -> pd.DataFrame:
    """old's rows with those of rows' keys replaced by rows, speedups recomputed, ordered."""
    new = with_pass(pd.DataFrame(rows))
    if len(new) and (missing := [c for c in KEY if c not in new or new[c].isna().any()]):
        bad = next((r for r in rows if any(pd.isna(r.get(c)) for c in missing)), rows[0])  # None or NaN
        raise ValueError(f"a row without its key column(s) {missing} (results.KEY) cannot be written: {bad}")
    if old is not None:
        replaced = keys(new)
        keep = [tuple(k) not in replaced for k in old[KEY].astype(str).values]
        new = pd.concat([old[keep], new], ignore_index=True) if len(new) else old
    for column in ("error", "preset", "best_peer"):
        if column in new:
            new[column] = text_column(new[column])
    return ordered(add_speedups(ordered(new)))


# ------------------------------------------------------------------------------------------------ writing

@contextmanager
def locked(path: Path):
    """An exclusive lock on path's table (fcntl.flock on PATH.lock beside it) for a read-modify-write; waits for
    another process's write to finish. The lock file stays (removing it would race with a waiting process)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_atomic(path: Path, text: str) -> None:
    """path's new content in one step: written to a temporary file beside it, flushed, then os.replace. A reader
    sees the old file or the new one, never a mix; a crash leaves the old one."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def merge(path: Path, rows: list[dict]) -> pd.DataFrame:
    """Write rows into the CSV at path (made with its folder if missing): rows with the same KEY are replaced,
    all others kept; speedups recomputed over the whole table. Locked and atomic; Damaged (nothing written) if
    the CSV there is not whole. Returns the table written."""
    path = Path(path)
    with locked(path):
        old = read(path) if path.exists() else None
        frame = combined(old, rows)
        write_atomic(path, frame.to_csv(index=False))
    return frame


def append(path: Path, rows: list[dict]) -> None:
    """merge, for rows as they finish (a sweep killed later keeps them)."""
    if rows:
        merge(path, rows)


def check_folder(folder: Path) -> None:
    """Before the first timed call: PermissionError (its message says why) when results cannot be written into
    folder, Damaged when the CSV there is not whole (it would be merged into)."""
    if problem := writable_problem(folder):
        raise PermissionError(problem)
    if (Path(folder) / NAME).exists():
        read(Path(folder) / NAME)
