"""Imports go one way: profiling > bench > model > reference > kernellab (each imports only the layers below it),
the reference never reaches a backend, and no import circle inside kernellab, reference or model. The contracts
are pyproject.toml's [tool.importlinter]; `lint-imports` checks them (function-level imports included)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("profiling", "bench", "model", "reference", "kernellab")
# import-linter is a dev dependency (pyproject.toml): without it this fails, as the layering is then unchecked
LINT = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))


def lint(root: Path) -> subprocess.CompletedProcess:
    """lint-imports on the packages under root, with root's pyproject.toml (root first on the import path)."""
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run([LINT, "--no-cache", "--no-logo"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_import_contracts_hold():
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_the_contracts_catch_an_upward_import_and_a_circle(tmp_path):
    """A copy of the packages with a lazy import of bench inside reference, and a lazy import of the registry inside
    kernellab/ops.py (which the registry imports): lint-imports fails, naming both. The contracts are not empty."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "*.cu*"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "reference" / "_common.py", "a") as f:
        f.write("\n\ndef _upward():\n    from bench import ops  # noqa: F401\n")
    with open(tmp_path / "kernellab" / "ops.py", "a") as f:
        f.write("\n\ndef _circle():\n    from kernellab import registry  # noqa: F401\n")
    done = lint(tmp_path)
    assert done.returncode != 0, done.stdout
    assert "reference is not allowed to import bench" in done.stdout, done.stdout
    assert "no import circles among the modules of kernellab, reference and model BROKEN" in done.stdout, done.stdout
    assert "kernellab.ops" in done.stdout and "kernellab.registry" in done.stdout, done.stdout
