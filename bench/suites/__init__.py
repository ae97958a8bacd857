"""Sweeps of their own: each package is an op of bench.ops (spec.sweep names the package) whose rows its own code
times instead of the registry's backends. Every package has run.py (sweep(quick, device, out, backends, on_rows,
done, ...) -> rows, made in `pieces`) and report.py (summary(rows) -> the report's lines; table(rows) -> a Markdown
table where the default does not fit), loaded on first use: bench.ops names the packages while bench.sweep, which
their run.py imports, loads."""
import importlib


def lazy_parts(package: str):
    """A module __getattr__ for a suite's package: package.run and package.report are imported when first read
    (bench.ops holds the package before they can be imported without a cycle)."""

    def __getattr__(name):
        if name in ("run", "report"):
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


def pieces(jobs, on_rows=None, done=frozenset()) -> list[dict]:
    """The rows of jobs [(label, make)], made one piece at a time in order: each piece's rows (make() -> rows) are
    tagged piece=label and handed to on_rows as soon as they are made (bench.sweep appends them to the CSV, so a
    suite stopped part way keeps its finished pieces); labels in done (the pieces already in the CSV of a run
    resumed with --resume) are skipped. Returns the rows made here.

    ValueError when a piece's row has the results KEY of an earlier piece's: appended, it would replace that row
    (a suite's rows must be told apart by their KEY: the phase or context goes into `shape` where it varies)."""
    from bench.results import key_of

    rows, owner = [], {}
    for label, make in jobs:
        if label in done:
            print(f"  {label}: in the run folder already, skipped (--resume)", flush=True)
            continue
        new = [dict(row, piece=label) for row in make()]
        for row in new:
            if owner.setdefault(key_of(row), label) != label:
                raise ValueError(f"piece {label!r} repeats the key {key_of(row)} of piece {owner[key_of(row)]!r}")
        print(f"  {label}: {len(new)} rows", flush=True)
        if on_rows is not None:
            on_rows(new)
        rows += new
    return rows
