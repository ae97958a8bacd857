"""The registry: names, availability, "auto", strict keywords, and a light `import kernellab`."""
import ast
import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernellab
from bench.ops import make
from kernellab import registry


def test_import_is_light():
    code = ("import sys, kernellab; heavy = [m for m in ('triton', 'numba', 'cupy', 'transformers', 'fla') "
            "if m in sys.modules]; print(heavy); sys.exit(bool(heavy))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, f"import kernellab pulled in {done.stdout.strip()}"


@pytest.mark.parametrize("op", registry.OPS)
def test_every_op_has_reference_and_torch(op):
    names = kernellab.backends(op, "cpu")
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
    with pytest.raises(kernellab.BackendUnavailable, match="no backend 'nope'"):
        kernellab.get("moe", "nope")
    with pytest.raises(ValueError, match="op must be one of"):
        kernellab.backends("softmax")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a CUDA GPU")
def test_gpu_only_backend_names_why():
    with pytest.raises(kernellab.BackendUnavailable, match="runs on cuda"):
        kernellab.get("gated_delta_rule", "fla")


def test_a_probe_says_why_a_backend_cannot_run(monkeypatch):
    """mkl's probe: without MKL's packed GEMM in torch's build the backend is not listed, and asking for it
    names the reason."""
    from kernellab.mkl import packed

    monkeypatch.setattr(packed, "_library", lambda: None)
    assert "mkl" not in kernellab.backends("moe") and "mkl" in registry.registered("moe")
    with pytest.raises(kernellab.BackendUnavailable, match="needs torch built with MKL"):
        kernellab.get("moe", "mkl")(**make("moe", N=4, E=2, top_k=1, D=8, I=4))


CALLS = []


def spy(x, w, offsets, tag):
    """A stand-in implementation: records the extra keyword it was given."""
    CALLS.append(tag)
    return x


def test_extra_keywords_pass_through_to_the_implementation(seed, monkeypatch):
    table = registry._table()["grouped_gemm"]
    monkeypatch.setitem(table, "spy", registry.Backend("grouped_gemm", "spy", f"{__name__}:spy", ("cpu",)))
    CALLS.clear()
    kernellab.grouped_gemm(**make("grouped_gemm", seed=seed), backend="spy", tag="hello")
    assert CALLS == ["hello"]


def test_bad_input_raises_before_the_backend_runs(seed):
    args = make("grouped_gemm", seed=seed)
    args["offsets"] = args["offsets"].flip(0)
    with pytest.raises(ValueError, match="offsets"):
        kernellab.grouped_gemm(**args, backend="reference")


def test_a_misspelt_keyword_names_the_backend_and_the_keyword(seed):
    args = make("gated_delta_rule", T=8, seed=seed)
    with pytest.raises(ValueError, match=r"backend 'torch' of gated_delta_rule takes no keyword 'chunk_sise'.*chunk_size"):
        kernellab.gated_delta_rule(**args, backend="torch", chunk_sise=16)
    with pytest.raises(ValueError, match="backend 'reference' of moe takes no keyword 'path'"):
        kernellab.moe(**make("moe", N=4, seed=seed), backend="reference", path="decode")


def _function_node(target):
    """The ast of the function at "module:name", found without importing the module (a re-export is followed)."""
    module, _, name = target.partition(":")
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"{target}: no module {module}"
    path = spec.origin
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return _function_node(f"{node.module}:{alias.name}")
    raise AssertionError(f"{target}: no function {name!r} in {path}")


@pytest.mark.parametrize("op", registry.OPS)
def test_no_implementation_swallows_unknown_keywords(op):
    """An implementation names every keyword it takes: a **kwargs would let `chunk_sise=` time the default."""
    for name, backend in registry.registered(op).items():
        node = _function_node(backend.target)
        assert node.args.kwarg is None, f"{op}/{name} ({backend.target}) takes **{node.args.kwarg.arg}"


def _targets(backend):
    """The "module:function" names a registration points to: its forward, and its backward when it names one."""
    return [backend.target] + ([backend.backward] if backend.backward not in (None, registry.AUTOGRAD) else [])


@pytest.mark.parametrize("op", registry.OPS)
def test_every_registered_target_exists(op):
    """Every backend's forward and backward are functions in files that exist, read with ast (no heavy import):
    a toolchain cannot register an op whose file or function is missing (whether or not it runs here)."""
    for name, backend in registry.registered(op).items():
        for target in _targets(backend):
            node = _function_node(target)
            assert isinstance(node, ast.FunctionDef), f"{op}/{name}: {target} is not a function"


def test_every_toolchain_lists_its_ops_explicitly():
    """family_backends takes the ops a toolchain implements (no default of every op), and refuses an unknown one."""
    with pytest.raises(TypeError):
        registry.family_backends("kernellab.torch", "torch", ("cpu",))  # noqa: the ops are required
    with pytest.raises(ValueError, match="softmax"):
        registry.family_backends("kernellab.torch", "torch", ("cpu",), ("softmax",))


@pytest.mark.parametrize("op", registry.OPS)
def test_every_op_record_has_its_function_validation_and_reference(op):
    """Each record of kernellab/ops.py: the public function kernellab.<op>, its check kernellab.validate.<op>, and
    reference/<family>.py's <op> (whose file is the family's)."""
    from kernellab import ops, validate

    record = ops.OPS[op]
    assert callable(getattr(kernellab, op)) and op in kernellab.__all__
    assert callable(getattr(validate, op))
    assert _function_node(f"reference.{record.family}:{op}")
    assert set(record.constant_outputs) <= set(record.outputs)
    assert next(iter(registry.registered(op))) == "reference"


def test_an_op_without_a_written_function_gets_one_from_its_check(seed):
    """kernellab._public makes kernellab.<op> from kernellab.validate.<op> for a new op: the written function's
    results (positional or keyword), its signature plus backend, bad input refused naming the argument."""
    import inspect

    args = make("grouped_gemm", seed=seed)
    made = kernellab._public("grouped_gemm")
    assert list(inspect.signature(made).parameters) == ["x", "w", "offsets", "backend", "kwargs"]
    expected = kernellab.grouped_gemm(**args, backend="torch")
    assert torch.equal(made(**args, backend="torch"), expected)
    assert torch.equal(made(args["x"], args["w"], args["offsets"], backend="torch"), expected)
    with pytest.raises(ValueError, match="offsets"):
        made(**args | {"offsets": args["offsets"].flip(0)}, backend="torch")


@pytest.mark.parametrize("mode", ["chunked", "", None])
def test_linear_attention_mode_is_validated(mode, seed):
    args = make("linear_attention", T=8, seed=seed)
    with pytest.raises(ValueError, match="mode must be 'auto', 'chunk' or 'recurrent'"):
        kernellab.linear_attention(**args, mode=mode, backend="reference")


def test_auto_is_resolved_once_per_op_device_and_dtype(monkeypatch, seed):
    registry.reset()
    probes = []
    original = registry.Backend.unavailable_reason
    monkeypatch.setattr(registry.Backend, "unavailable_reason", lambda self: probes.append(self.name) or original(self))
    args = make("grouped_gemm", seed=seed)
    kernellab.grouped_gemm(**args)
    first = len(probes)
    assert first > 0
    for _ in range(3):
        kernellab.grouped_gemm(**args)
    # later calls probe only the chosen backend (is it still here?), never the whole order again
    assert len(probes) - first <= 3, probes[first:]
    monkeypatch.undo()
    registry.reset()


def test_auto_takes_the_first_backend_that_takes_the_dtype(monkeypatch):
    registry.reset()
    table = registry._table()["moe"]
    monkeypatch.setitem(table, "torch", dataclasses.replace(table["torch"], dtypes=(torch.float32,)))
    assert registry.auto_backend("moe", "cpu", torch.float32) == "torch"
    assert registry.auto_backend("moe", "cpu", torch.float64) != "torch"
    registry.reset()
