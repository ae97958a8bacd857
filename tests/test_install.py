"""The lab's package names: its own, importable from anywhere, shadowing nothing installed.

Hugging Face's `kernels` distribution (a hard dependency of transformers 5.x) took the import name the lab once
used: transformers then imported the lab's package in its place from the repository root. These tests keep that
from coming back."""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAB_DISTRIBUTION = "qwen35-kernel-lab"


def _top_level_packages():
    return sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))


def test_no_top_level_package_shares_a_name_with_an_installed_distribution():
    owners = importlib.metadata.packages_distributions()
    clashes = {name: [d for d in owners.get(name, []) if d.replace("_", "-").lower() != LAB_DISTRIBUTION]
               for name in _top_level_packages()}
    assert not {name: dists for name, dists in clashes.items() if dists}, (
        f"a top-level package of the lab has the import name of an installed distribution: {clashes}")


def test_installed_package_imported_from_another_directory_is_the_labs(tmp_path):
    code = "import kernellab, sys; print(kernellab.__file__); print(kernellab.gated_delta_rule.__module__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    path, module = done.stdout.split()
    assert Path(path).resolve() == ROOT / "kernellab" / "__init__.py"
    assert module == "kernellab"


@pytest.mark.slow
def test_transformers_qwen35_moe_imports_from_the_repository_root():
    code = ("from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as m; "
            "import kernels; assert 'site-packages' in kernels.__file__ or 'dist-packages' in kernels.__file__, "
            "kernels.__file__; print(m.Qwen3_5MoeForCausalLM.__name__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Qwen3_5MoeForCausalLM" in done.stdout
