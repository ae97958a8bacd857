"""state_dtype of the linear attentions: the recurrent state stored in float32, bfloat16 or float16 between steps
(token by token) or chunks, the arithmetic in float32.

Every lab backend either honours a state dtype or refuses it with a ValueError naming state_dtype. Those that
honour it are compared with two yardsticks: the reference with the same state_dtype (a float64 token loop that
rounds its state after every token: the rounding alone) for the token-by-token mode, and the exact float64
reference for both modes, within a tolerance derived from the rounding (bench.check.state_tolerance).
A bfloat16 state at T = 16K must be measurably worse than a float32 one, so the option is real."""
import math

import pytest
import torch

import kernellab
from bench.check import UNIT_ROUNDOFF, rel_err, state_tolerance
from bench.ops import make
from tests.helpers import (assert_close, assert_unchanged, check_bad_input, gpu_backends, lab_backends,
                           poisoned_allocations, snapshot, to_float64)

OPS = ("linear_attention", "gated_delta_rule", "kda")
# The backends that store their state in float32 only, and say so (the rest implement state_dtype).
FLOAT32_STATE_ONLY = {"numba", "numba_cuda", "cupy", "transformers", "fla"}
# Backends whose linear attention has one algorithm, chunked, for both modes: their state is rounded per chunk in
# "recurrent" too, so the reference that rounds after every token is not their yardstick.
CHUNKED_ONLY = {("linear_attention", "triton"), ("linear_attention", "cuda")}
STATE_DTYPES = (torch.bfloat16, torch.float16)
CASES = {
    "T1": dict(T=1, initial_state=True),
    "T130_initial_state": dict(T=130, initial_state=True),
    "packed": dict(seqlens=[37, 1, 70], initial_state=True),
    "g_zero": dict(T=100, gate="zero"),
}


def _args(op, state_dtype, dtype=torch.float32, seed=0, **case):
    """The op's inputs with the initial state (if any) in state_dtype."""
    if op == "linear_attention":
        case = {"H": 2, **case}
    args = make(op, dtype=dtype, seed=seed, **case)
    if args["initial_state"] is not None:
        args["initial_state"] = args["initial_state"].to(state_dtype)
    return args


def _rounded_reference(op, args, state_dtype):
    """The reference on the same inputs in float64 with the state rounded to state_dtype after every token."""
    wide = to_float64(args)
    if args["initial_state"] is not None:
        wide["initial_state"] = args["initial_state"]
    return getattr(kernellab, op)(**wide, state_dtype=state_dtype, backend="reference")


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("state_dtype", STATE_DTYPES, ids=["bf16_state", "fp16_state"])
@pytest.mark.parametrize("op, backend", [(op, b) for op in OPS for b in lab_backends(op)])
def test_state_dtype_matches_its_yardsticks(op, backend, state_dtype, case, mode, seed):
    args = _args(op, state_dtype, seed=seed, **CASES[case])
    if backend in FLOAT32_STATE_ONLY:
        check_bad_input(op, backend, args | dict(mode=mode, state_dtype=state_dtype), "state_dtype: backend")
        return
    before = snapshot(args)
    with poisoned_allocations():
        o, state = getattr(kernellab, op)(**args, mode=mode, state_dtype=state_dtype, backend=backend)
    assert_unchanged(args, before)
    assert o.dtype == args["v"].dtype and state.dtype == state_dtype
    exact_o, exact_state = getattr(kernellab, op)(**to_float64(args), backend="reference")
    T = args["q"].shape[1]
    if mode == "recurrent" and (op, backend) not in CHUNKED_ONLY:
        # the same roundings as the reference's: only where float32 arithmetic lands a value on the other side of a
        # rounding boundary do they differ, far less than one rounding's worth
        rounded_o, rounded_state = _rounded_reference(op, args, state_dtype)
        tol = state_tolerance(torch.float32, "cpu", state_dtype, 1)
        assert_close(o, rounded_o, torch.float32, f"{backend} o vs the rounding reference", seed, tol)
        assert_close(state, rounded_state, torch.float32, f"{backend} state vs the rounding reference", seed, tol)
    # a state rounded at most once per token, T times
    tol = state_tolerance(torch.float32, "cpu", state_dtype, T)
    assert_close(o, exact_o, torch.float32, f"{backend} {mode} o vs exact", seed, tol)
    assert_close(state, exact_state, torch.float32, f"{backend} {mode} state vs exact", seed, tol)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", ["torch", "mkl"])
def test_stored_chunk_states_round_less_than_every_token(op, backend, seed):
    """The chunked path rounds only the state it stores between chunks: closer to the exact result than the
    reference that rounds after every token."""
    if backend not in kernellab.backends(op):
        pytest.skip(f"{backend} does not run here")
    args = _args(op, torch.bfloat16, seed=seed, T=256, initial_state=True)
    o, state = kernellab.get(op, backend)(**args, mode="chunk", state_dtype=torch.bfloat16)
    exact_o, exact_state = getattr(kernellab, op)(**to_float64(args), backend="reference")
    every_token_o, _ = _rounded_reference(op, args, torch.bfloat16)
    assert rel_err(o, exact_o) < rel_err(every_token_o, exact_o), "chunk rounding is no better than every token's"


@pytest.mark.parametrize("op", OPS)
def test_float16_inputs_with_bfloat16_state(op, seed):
    args = _args(op, torch.bfloat16, dtype=torch.float16, seed=seed, T=70, initial_state=True)
    o, state = getattr(kernellab, op)(**args, mode="recurrent", state_dtype=torch.bfloat16, backend="torch")
    assert o.dtype == torch.float16 and state.dtype == torch.bfloat16
    rounded_o, rounded_state = _rounded_reference(op, args, torch.bfloat16)
    tol = state_tolerance(torch.float16, "cpu", torch.bfloat16, 1)
    assert_close(o, rounded_o, torch.float16, "fp16 inputs, bf16 state: o", seed, tol)
    assert_close(state, rounded_state, torch.float16, "fp16 inputs, bf16 state: state", seed, tol)


@pytest.mark.parametrize("op", OPS)
def test_float32_state_is_the_default(op, seed):
    """state_dtype=float32 named is the call without it, bit for bit."""
    args = _args(op, torch.float32, seed=seed, T=70, initial_state=True)
    for mode in ("chunk", "recurrent"):
        default = getattr(kernellab, op)(**args, mode=mode, backend="torch")
        named = getattr(kernellab, op)(**args, mode=mode, state_dtype=torch.float32, backend="torch")
        assert torch.equal(default[0], named[0]) and torch.equal(default[1], named[1])


def test_reference_rounds_the_stored_state_only():
    """One token: the output reads the state before it is rounded; the returned state is that state rounded."""
    args = _args("gated_delta_rule", torch.bfloat16, T=1, initial_state=True)
    exact_o, exact_state = kernellab.gated_delta_rule(**to_float64(args), backend="reference")
    o, state = _rounded_reference("gated_delta_rule", args, torch.bfloat16)
    assert torch.equal(o, exact_o)
    assert state.dtype == torch.bfloat16 and torch.equal(state, exact_state.to(torch.bfloat16))


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_bfloat16_state_at_16k_tokens_is_measurably_worse(op, mode):
    """T = 16384, the torch backend: a bfloat16 state's error is many times float32's (the option is real) and
    within its rounding's bound; the float32 state stays at float32's level."""
    T = 16384
    args = _args(op, torch.float32, seed=7, T=T, K=32, V=32, initial_state=False)
    exact_o, exact_state = getattr(kernellab, op)(**to_float64(args), mode="chunk", backend="torch")
    errors = {}
    for state_dtype in (torch.float32, torch.bfloat16):
        o, state = getattr(kernellab, op)(**args, mode=mode, state_dtype=state_dtype, backend="torch")
        errors[state_dtype] = rel_err(o, exact_o), rel_err(state, exact_state)
    f32, bf16 = errors[torch.float32], errors[torch.bfloat16]
    assert max(f32) < 1e-4, f"float32 state: errors {f32}"
    assert min(bf16) > 100 * max(f32), f"bf16 {bf16} not measurably worse than float32 {f32}"
    assert max(bf16) < state_tolerance(torch.float32, "cpu", torch.bfloat16, T), f"bf16 {bf16} past its bound"


def test_the_float64_chunked_yardstick_of_16k_matches_the_reference():
    """The test above measures against the torch backend's chunked float64 run (the reference's loop is too slow
    at 16K): at T = 300 it is the reference within float64's tolerance."""
    for op in OPS:
        args = to_float64(_args(op, torch.float32, seed=3, T=300, K=32, V=32))
        o, state = getattr(kernellab, op)(**args, mode="chunk", backend="torch")
        ref_o, ref_state = getattr(kernellab, op)(**args, backend="reference")
        assert_close(o, ref_o, torch.float64, f"{op} float64 chunked o", 3)
        assert_close(state, ref_state, torch.float64, f"{op} float64 chunked state", 3)


def test_unit_roundoff_table():
    for dtype, u in UNIT_ROUNDOFF.items():
        assert torch.tensor(1 + 2 * u, dtype=torch.float64).to(dtype).item() == 1 + 2 * u
        assert torch.tensor(1 + u, dtype=torch.float64).to(dtype).item() == 1.0  # a tie, to even
        assert math.isclose(torch.finfo(dtype).eps, 2 * u)


# --------------------------------------------------------------------------------- mkl's rounding in numba

@pytest.mark.skipif("mkl" not in kernellab.backends("gated_delta_rule"), reason="needs torch built with MKL (x86)")
@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
def test_mkl_rounding_is_torchs(state_dtype):
    """kernellab.mkl.chunked._store rounds float32 bits as torch's conversions do: normal numbers and ties,
    float16's subnormals and overflow to infinity, signed zeros."""
    from kernellab.mkl.chunked import _store
    from kernellab.validate import STATE_ROUNDING

    gen = torch.Generator().manual_seed(0)
    exponents = torch.randint(-40, 20, (64, 64), generator=gen).float()
    x = torch.randn(64, 64, generator=gen) * 2.0 ** exponents
    edge = torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, -70000.0, 2.0 ** -24, 3 * 2.0 ** -25, 2.0 ** -14,
                         1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 3.0e38, 1e-45])
    x[0, :edge.numel()] = edge
    expected = x.to(state_dtype).float()
    got = x.clone()
    _store(got.numpy(), STATE_ROUNDING[state_dtype])
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("op", OPS)
def test_bad_state_dtype_raises_and_writes_nothing(op, seed):
    args = _args(op, torch.float32, seed=seed, T=20, initial_state=True)
    for bad, match in [(torch.int32, "state_dtype must be"), ("bfloat16", "state_dtype must be"),
                       (torch.float64, "state_dtype must be"), (torch.float8_e4m3fn, "state_dtype must be")]:
        check_bad_input(op, "reference", args | dict(state_dtype=bad), match)
    # a named state_dtype fixes the initial state's dtype
    check_bad_input(op, "torch", args | dict(state_dtype=torch.bfloat16), "initial_state must have dtype state_dtype")
    check_bad_input(op, "torch", args | dict(initial_state=args["initial_state"].half(), state_dtype=torch.bfloat16),
                    "initial_state must have dtype state_dtype")


def test_float64_inputs_take_a_float64_or_rounded_state(seed):
    """float64 inputs: the state defaults to float64, and a narrower one rounds it (the chunked yardstick of the
    rounding); the torch backend's float64 runs agree with the reference's."""
    args = to_float64(_args("gated_delta_rule", torch.float32, seed=seed, T=70))
    o, state = kernellab.gated_delta_rule(**args, state_dtype=torch.float64, backend="torch")
    assert state.dtype == torch.float64
    o, state = kernellab.gated_delta_rule(**args, mode="recurrent", state_dtype=torch.bfloat16, backend="torch")
    ref_o, ref_state = kernellab.gated_delta_rule(**args, state_dtype=torch.bfloat16, backend="reference")
    assert o.dtype == torch.float64 and state.dtype == torch.bfloat16
    assert_close(o, ref_o, torch.float32, "float64 inputs, bf16 state", seed, UNIT_ROUNDOFF[torch.bfloat16])


# ------------------------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("state_dtype", STATE_DTYPES, ids=["bf16_state", "fp16_state"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op, backend", [(op, b) for op in OPS for b in gpu_backends(op) if b not in FLOAT32_STATE_ONLY])
def test_state_dtype_on_gpu(op, backend, dtype, state_dtype, mode, seed):
    """The GPU kernels (cuda's, torch's on cuda) against the same yardsticks, at a long enough T that rounding
    dominates: K = V = 128, T = 1000, two packed sequences and an initial state."""
    args = _args(op, state_dtype, dtype=dtype, seed=seed, seqlens=[700, 300], K=128, V=128, initial_state=True)
    cuda_args = {key: value.cuda() if isinstance(value, torch.Tensor) else value for key, value in args.items()}
    with poisoned_allocations():
        o, state = getattr(kernellab, op)(**cuda_args, mode=mode, state_dtype=state_dtype, backend=backend)
    assert o.dtype == dtype and state.dtype == state_dtype
    if mode == "recurrent" and (op, backend) not in CHUNKED_ONLY:
        rounded_o, rounded_state = _rounded_reference(op, args, state_dtype)
        tol = state_tolerance(dtype, "cuda", state_dtype, 1)
        assert_close(o, rounded_o, dtype, f"{backend} o vs the rounding reference", seed, tol)
        assert_close(state, rounded_state, dtype, f"{backend} state vs the rounding reference", seed, tol)
    exact_o, exact_state = getattr(kernellab, op)(**to_float64(args), backend="reference")
    tol = state_tolerance(dtype, "cuda", state_dtype, 700)
    assert_close(o, exact_o, dtype, f"{backend} {mode} o vs exact", seed, tol)
    assert_close(state, exact_state, dtype, f"{backend} {mode} state vs exact", seed, tol)
