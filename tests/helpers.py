"""Helpers shared by the test files: comparison with the float64 reference, poisoned allocations, snapshots
of the caller's tensors, the backends to test, and the checks the recurrent ops and the bad-input cases share.
(tests/conftest.py sets up the interpreter / simulator environment and the fixtures.)"""
import contextlib

import pytest
import torch

import kernellab
from bench import check
from bench.check import TOLERANCE, TOLERANCE_TF32, rel_err, to_float64, tolerance  # noqa: F401 (for the tests)
from kernellab import registry

DTYPES = [torch.float32, torch.float16]
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close(out, ref, dtype, what, seed, tol=None):
    """out matches ref within the tolerance of dtype (bench.check.compare: shapes, integer outputs exact); NaN
    anywhere (a poisoned, unwritten element) fails."""
    tol = TOLERANCE[dtype] if tol is None else tol
    err, problem = check.compare(out, ref)
    assert not problem, f"{what}: {problem} (seed={seed})"
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


def lab_backends(op, device="cpu", simulated=False):
    """Every backend of op that runs on `device` tensors here, the reference and the CPU engines' kernels
    (kernellab.peers.ENGINE_PEERS: tests/toolchains/test_cpu_peers.py) excluded. Backends that reach the CPU only through the
    numba.cuda simulator are left out unless `simulated` (too slow for the full edge-case list: their own test file
    runs them at tiny sizes)."""
    from kernellab.peers import ENGINE_PEERS

    registered = kernellab.registry.registered(op)
    return [name for name in kernellab.backends(op, device) if name != "reference" and name not in ENGINE_PEERS
            and (simulated or device != "cpu" or registered[name].places != ("cuda", "cudasim"))]


def gpu_backends(op):
    """Every registered non-reference backend of op that can run on a CUDA GPU (skipped here without one)."""
    return [name for name, b in kernellab.registry.registered(op).items() if name != "reference" and "cuda" in b.places]


def _caller_tensors(args):
    """The caller's tensors among the arguments, by name (a Permutation's fields too); meta tensors hold nothing."""
    found = {}
    for key, value in args.items():
        if isinstance(value, kernellab.Permutation):
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


def backend_dtypes(names, op, dtypes):
    """(backend, dtype) pairs of names x dtypes that the backend's registration admits."""
    registered = registry.registered(op)
    return [pytest.param(name, dtype, id=f"{name}-{str(dtype).removeprefix('torch.')}")
            for name in names for dtype in dtypes if dtype in registered[name].dtypes]


def check_recurrent_op(op, backend, args, seed, tol=None, **extra):
    """Run op through backend on args (poisoned allocations), compare o and the final state with the float64
    reference on the same inputs, and check dtypes, the None state and that no input was written."""
    before = snapshot(args)
    with poisoned_allocations():
        o, state = getattr(kernellab, op)(**args, backend=backend, **extra)
    assert_unchanged(args, before)
    ref_o, ref_state = getattr(kernellab, op)(**to_float64(args), backend="reference")
    dtype = args["v"].dtype
    tol = tolerance(dtype, args["v"].device.type) if tol is None else tol
    assert o.dtype == dtype, f"o has dtype {o.dtype}, v has {dtype}"
    assert_close(o, ref_o, dtype, f"{backend} o", seed, tol)
    if not args["output_final_state"]:
        assert state is None, "the final state must be None unless output_final_state"
        return
    wide = extra.get("state_dtype") or args.get("state_dtype") or (torch.float64 if dtype == torch.float64
                                                                    else torch.float32)
    assert state.dtype == wide, f"final state has dtype {state.dtype}, expected {wide}"
    assert_close(state, ref_state, dtype, f"{backend} final state", seed, tol)


def check_bad_input(op, backend, args, match):
    """op raises ValueError naming the problem (match) and writes none of the caller's tensors."""
    before = snapshot(args)
    with pytest.raises(ValueError, match=match):
        getattr(kernellab, op)(**args, backend=backend)
    assert_unchanged(args, before)


def bad_case_names(cases, make_args):
    """The names of the bad-input cases (name, change, message) that cases(args) lists, to parametrize over (one
    test id per case); make_args(seed) makes the good args they change."""
    return [name for name, _, _ in cases(make_args(0))]


def check_bad_case(op, backend, cases, make_args, name, seed):
    """check_bad_input on the case called name of cases(args), args = make_args(seed) (see bad_case_names)."""
    args = make_args(seed)
    change, match = next((change, match) for case, change, match in cases(args) if case == name)
    check_bad_input(op, backend, args | change, match)


def bad_packed_inputs(args):
    """(name, change, message) of bad packing for args made with seqlens=[...] and an initial state; shared by the
    recurrent ops (the gated delta rule's tests import it)."""
    T = args["q"].shape[1]
    return [
        ("cu_seqlens_not_monotone", dict(cu_seqlens=torch.tensor([0, 30, 10, T], dtype=torch.int32)),
         "cu_seqlens must be non-decreasing"),
        ("cu_seqlens_end_short", dict(cu_seqlens=torch.tensor([0, 10, T - 1], dtype=torch.int32)),
         "cu_seqlens must start"),
        ("cu_seqlens_end_long", dict(cu_seqlens=torch.tensor([0, 10, T + 1], dtype=torch.int32)),
         "cu_seqlens must start"),
        ("cu_seqlens_float", dict(cu_seqlens=torch.tensor([0.0, T])), "cu_seqlens must have dtype"),
        ("state_count", dict(initial_state=args["initial_state"][:2]), "initial_state must have shape"),
    ]


# ---------------------------------------------------------------------------------------------- spawned worlds
def world_fixtures(run, needs=()):
    """The fixtures of a test module that runs its cases on spawned torch.distributed worlds of 2 and 4 processes:
    `world2, world4, world = world_fixtures(run)`. run(size, seed, *the values of the fixtures named in needs) ->
    {case: [result of rank 0, 1, ...]} (a result holding "error" fails its tests). world2 / world4: module-scoped,
    (seed, run's result), the seed --seed's or a fresh one (printed); world: (size, seed, run's result) of both
    sizes in turn. Tests read a case's results with `ranks`."""
    import secrets

    def sized(size):
        @pytest.fixture(scope="module")
        def fixture(request):
            seed = request.config.getoption("--seed")
            seed = secrets.randbelow(2**31) if seed is None else seed
            print(f"world {size}: seed={seed}")
            return seed, run(size, seed, *(request.getfixturevalue(name) for name in needs))
        return fixture

    @pytest.fixture(params=[2, 4], ids=["world2", "world4"])
    def world(request):
        seed, found = request.getfixturevalue(f"world{request.param}")
        return request.param, seed, found
    return sized(2), sized(4), world


def ranks(world, case):
    """(case's per-rank results, seed) of a `world` fixture's value; fails with a rank's error if it has one."""
    size, seed, found = world
    per_rank = found[case]
    for rank, result in enumerate(per_rank):
        assert "error" not in result, f"{case}, rank {rank} of {size} (seed={seed}):\n{result['error']}"
    return per_rank, seed


def raises(call):
    """(exception type name, message) of call(), or ("none", "") when it returns: what a rank raised, for a test
    that compares every rank's."""
    try:
        call()
    except Exception as error:  # noqa: BLE001 (the test compares what every rank raised)
        return type(error).__name__, str(error)
    return "none", ""


def assert_raised_everywhere(per_rank, bad, kind, pattern, seed):
    """Every rank's result[bad] (raises' (type name, message)): the same message on every rank, of type `kind`,
    matching the regular expression `pattern`."""
    import re

    messages = {result[bad][1] for result in per_rank}
    assert len(messages) == 1, f"{bad}: the ranks raised different errors: {[r[bad] for r in per_rank]} (seed={seed})"
    for rank, result in enumerate(per_rank):
        raised, message = result[bad]
        assert raised == kind and re.search(pattern, message), \
            f"{bad}, rank {rank} of {len(per_rank)}: raised {raised}: {message!r}, expected {kind} matching " \
            f"{pattern!r} (seed={seed})"
