"""Sweeps of their own: each package is an op of bench.ops (spec.sweep names the package) whose rows its own code
times instead of the registry's backends. Every package has run.py (sweep(quick, device, out, backends, ...) ->
rows) and report.py (summary(rows) -> the report's lines; table(rows) -> a Markdown table where the default does
not fit), loaded on first use: bench.ops names the packages while bench.sweep, which their run.py imports, loads."""
import importlib


def lazy_parts(package: str):
    """A module __getattr__ for a suite's package: package.run and package.report are imported when first read
    (bench.ops holds the package before they can be imported without a cycle)."""

    def __getattr__(name):
        if name in ("run", "report"):
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
