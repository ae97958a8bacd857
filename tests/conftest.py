"""Shared machinery of the parity suite.

Without a GPU, Triton kernels run under the interpreter (TRITON_INTERPRET=1) and numba.cuda kernels under
the simulator (NUMBA_ENABLE_CUDASIM=1); both must be set before those packages are imported, hence here.
"""
import os
import secrets

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import contextlib  # noqa: E402

import pytest  # noqa: E402

import kernels  # noqa: E402
from reference.tolerance import TOLERANCE, TOLERANCE_TF32, rel_err, tolerance  # noqa: E402,F401 (for the tests)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_addoption(parser):
    parser.addoption("--seed", type=int, default=None, help="replay a failing case with this seed")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped on machines without one")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (this machine has none)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed(request):
    """A fresh seed per test case, printed with the test's report so a failure can be replayed (--seed)."""
    value = request.config.getoption("--seed")
    value = secrets.randbelow(2**31) if value is None else value
    request.node.user_properties.append(("seed", value))
    print(f"seed={value}")
    return value


def assert_close(out, ref, dtype, what, seed, tol=None):
    """out matches ref within the tolerance of dtype; NaN anywhere (a poisoned, unwritten element) fails."""
    tol = TOLERANCE[dtype] if tol is None else tol
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)} (seed={seed})"
    assert torch.isfinite(out.detach().double()).all(), f"{what}: non-finite or unwritten elements (seed={seed})"
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} for {dtype} (seed={seed})"


_POISON_INT = -77777


def _poison(t):
    if t.is_floating_point():
        return t.fill_(float("nan"))
    if t.dtype in (torch.int32, torch.int64, torch.int16):
        return t.fill_(_POISON_INT)
    return t


@contextlib.contextmanager
def poisoned_allocations():
    """Within the block, every torch.empty / empty_like / new_empty / empty_strided is filled with NaN
    (floats) or -77777 (ints), so an element a kernel forgets to write shows up in the comparison."""
    originals = (torch.empty, torch.empty_like, torch.Tensor.new_empty, torch.empty_strided)
    torch.empty = lambda *a, **k: _poison(originals[0](*a, **k))
    torch.empty_like = lambda *a, **k: _poison(originals[1](*a, **k))
    torch.Tensor.new_empty = lambda self, *a, **k: _poison(originals[2](self, *a, **k))
    torch.empty_strided = lambda *a, **k: _poison(originals[3](*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty, torch.empty_strided = originals


def to_float64(inputs):
    """The same inputs in float64 (floating tensors only), for the reference run."""
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}


def lab_backends(op, device="cpu", simulated=False):
    """Every backend of op that runs on `device` tensors here, the reference excluded. Backends that reach the
    CPU only through the numba.cuda simulator are left out unless `simulated` (too slow for the full edge-case
    list: their own test file runs them at tiny sizes)."""
    registered = kernels.registry.registered(op)
    return [name for name in kernels.backends(op, device) if name != "reference"
            and (simulated or device != "cpu" or registered[name].places != ("cuda", "cudasim"))]


def gpu_backends(op):
    """Every registered non-reference backend of op that can run on a CUDA GPU (skipped here without one)."""
    return [name for name, b in kernels.registry.registered(op).items() if name != "reference" and "cuda" in b.places]


def _caller_tensors(args):
    """The caller's tensors among the arguments, by name (a Permutation's fields too); meta tensors hold nothing."""
    found = {}
    for key, value in args.items():
        if isinstance(value, kernels.Permutation):
            found |= {f"{key}.{field}": getattr(value, field) for field in ("x", "offsets", "source")}
        elif isinstance(value, torch.Tensor):
            found[key] = value
    return {key: value for key, value in found.items() if value.device.type != "meta"}


def snapshot(args):
    """Copies of the caller's tensors among args, to show later that a call wrote none of them."""
    return {key: value.clone() for key, value in _caller_tensors(args).items()}


def assert_unchanged(args, before, what=""):
    now = _caller_tensors(args)
    for key, value in before.items():
        torch.testing.assert_close(now[key], value, rtol=0, atol=0, equal_nan=True, msg=f"{what}{key} was written")
