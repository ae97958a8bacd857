"""The parity suite's environment and fixtures (helpers the test files share: tests/helpers.py).

Without a GPU, Triton kernels run under the interpreter (TRITON_INTERPRET=1) and numba.cuda kernels under
the simulator (NUMBA_ENABLE_CUDASIM=1); both must be set before those packages are imported, hence here.
"""
import os
import secrets

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--seed", type=int, default=None, help="replay a failing case with this seed")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped on machines without one")
    config.addinivalue_line("markers", "slow: seconds or more each; the inner loop leaves them out (-m 'not slow')")
    config.addinivalue_line("markers", "interpreted: runs GPU code on the CPU: Triton kernels under TRITON_INTERPRET=1, "
                                       "numba.cuda under NUMBA_ENABLE_CUDASIM=1 (set here without a GPU)")


# Without a GPU, a test that names one of these in its id runs their kernels through the interpreter / simulator.
INTERPRETED = ("triton", "numba_cuda", "cudasim")
# Folders whose tests are slow as a whole (whole models, spawned process worlds): the inner loop leaves them out.
SLOW_FOLDERS = ("model", "distributed")


def pytest_collection_modifyitems(config, items):
    """Markers set from where a test is and what it runs: `interpreted` (GPU code on the CPU, no GPU here),
    `slow` (tests/model/, tests/distributed/); and the `gpu` tests skipped without a GPU."""
    gpu = torch.cuda.is_available()
    skip = pytest.mark.skip(reason="needs a CUDA GPU (this machine has none)")
    for item in items:
        folder = item.path.parent.name
        if not gpu and any(name in item.nodeid.lower() for name in INTERPRETED):
            item.add_marker(pytest.mark.interpreted)
        if folder in SLOW_FOLDERS:
            item.add_marker(pytest.mark.slow)
        if not gpu and "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed(request):
    """A fresh seed per test case, printed with the test's report so a failure can be replayed (--seed)."""
    value = request.config.getoption("--seed")
    value = secrets.randbelow(2**31) if value is None else value
    request.node.user_properties.append(("seed", value))
    print(f"seed={value}")
    return value


@pytest.fixture(scope="module")
def torch_one_thread():
    """torch on one thread for a module of many tiny ops (autograd graphs, training steps of the small model): on a
    shared machine each parallel region waits for a second thread to be scheduled and spins meanwhile (a training
    step of the small model measured 0.1 s of CPU on one thread, 5 s on two)."""
    from bench.sweep import one_thread

    with one_thread():
        yield
