"""The registry: names, availability, "auto", and a light `import kernels`."""
import subprocess
import sys

import pytest
import torch

import kernels
from kernels import registry
from bench import inputs


def test_import_is_light():
    code = ("import sys, kernels; heavy = [m for m in ('triton', 'numba', 'cupy', 'transformers', 'fla') "
            "if m in sys.modules]; print(heavy); sys.exit(bool(heavy))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, f"import kernels pulled in {done.stdout.strip()}"


@pytest.mark.parametrize("op", registry.OPS)
def test_every_op_has_reference_and_torch(op):
    names = kernels.backends(op, "cpu")
    assert "reference" in names and "torch" in names


@pytest.mark.parametrize("op", registry.OPS)
def test_every_declared_backend_points_to_a_callable(op):
    for name, backend in registry.registered(op).items():
        if backend.unavailable_reason() is None:
            assert callable(backend.impl), f"{op}/{name}: {backend.target} is not callable"


def test_auto_on_cpu_is_a_lab_backend():
    for op in registry.OPS:
        name = registry.auto_backend(op, "cpu")
        assert not registry.registered(op)[name].peer


def test_unknown_backend_and_op():
    with pytest.raises(kernels.BackendUnavailable, match="no backend 'nope'"):
        kernels.get("moe", "nope")
    with pytest.raises(ValueError, match="op must be one of"):
        kernels.backends("softmax")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a CUDA GPU")
def test_gpu_only_backend_names_why():
    with pytest.raises(kernels.BackendUnavailable, match="runs on cuda"):
        kernels.get("gated_delta_rule", "fla")


def test_a_probe_says_why_a_backend_cannot_run(monkeypatch):
    """mkl's probe: without MKL's packed GEMM in torch's build the backend is not listed, and asking for it
    names the reason."""
    from kernels.mkl import packed

    monkeypatch.setattr(packed, "_library", lambda: None)
    assert "mkl" not in kernels.backends("moe") and "mkl" in registry.registered("moe")
    with pytest.raises(kernels.BackendUnavailable, match="needs torch built with MKL"):
        kernels.get("moe", "mkl")(**inputs.make("moe", N=4, E=2, top_k=1, D=8, I=4))


CALLS = []


def spy(x, w, offsets, tag):
    """A stand-in implementation: records the extra keyword it was given."""
    CALLS.append(tag)
    return x


def test_extra_keywords_pass_through_to_the_implementation(seed, monkeypatch):
    table = registry._table()["grouped_gemm"]
    monkeypatch.setitem(table, "spy", registry.Backend("grouped_gemm", "spy", f"{__name__}:spy", ("cpu",)))
    CALLS.clear()
    kernels.grouped_gemm(**inputs.make("grouped_gemm", seed=seed), backend="spy", tag="hello")
    assert CALLS == ["hello"]


def test_bad_input_raises_before_the_backend_runs(seed):
    args = inputs.make("grouped_gemm", seed=seed)
    args["offsets"] = args["offsets"].flip(0)
    with pytest.raises(ValueError, match="offsets"):
        kernels.grouped_gemm(**args, backend="reference")
