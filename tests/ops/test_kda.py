"""Kimi Delta Attention: parity of every kda backend with the float64 reference in both modes over the gated delta
rule's edge cases, KDA with a gate equal across K against the gated delta rule, gradients against the reference's
autograd in float64, and bad input. The generic checks run over kda too: gradients in float32 and float16, one
output only, several groups of chunks (tests/ops/test_backward.py), state_dtype (tests/ops/test_state_dtype.py),
determinism and batch invariance (tests/ops/test_invariance.py).

Shapes stay small (T <= 130, K, V in {16, 32}): Triton runs here under its interpreter."""
import pytest
import torch

import kernellab
from bench.ops import make
from kernellab import registry
from tests.helpers import (DTYPES, GPU_DTYPES, TOLERANCE, backend_dtypes, bad_case_names, bad_packed_inputs,
                           check_bad_case, check_recurrent_op, gpu_backends, lab_backends, rel_err, to_float64)
from tests.ops.test_backward import check_gradients, with_backward
from tests.ops.test_gated_delta_rule import CASES, MODES, _bad_inputs

OP = "kda"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend, dtype", backend_dtypes(lab_backends(OP), OP, DTYPES))
def test_matches_reference(backend, dtype, case, mode, seed):
    args = make(OP, dtype=dtype, seed=seed, **CASES[case])
    check_recurrent_op(OP, backend, args | dict(mode=mode), seed)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", lab_backends(OP))
def test_custom_scale_and_no_final_state(backend, mode, seed):
    args = make(OP, T=70, seed=seed, initial_state=True, output_final_state=False)
    check_recurrent_op(OP, backend, args | dict(scale=0.3, mode=mode), seed)


@pytest.mark.parametrize("mode", MODES)
def test_torch_float64(mode, seed):
    """float64 inputs: computed and returned in float64 (the state too)."""
    args = make(OP, T=100, dtype=torch.float64, seed=seed, initial_state=True)
    check_recurrent_op(OP, "torch", args | dict(mode=mode), seed)


def test_the_channels_decay_apart(seed):
    """The per-channel gate matters: kda differs from the gated delta rule with the channels' mean gate (a test
    that would pass if a backend read one channel's gate for all)."""
    args = to_float64(make(OP, T=40, gate="strong", seed=seed, initial_state=True))
    o, _ = kernellab.kda(**args, backend="reference")
    mean, _ = kernellab.gated_delta_rule(**(args | dict(g=args["g"].mean(-1))), backend="reference")
    assert rel_err(o, mean) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("case", ["T_not_multiple_of_chunk", "packed_unequal", "Hv_4Hk", "beta_near_1_no_l2norm"])
def test_equal_gates_is_the_gated_delta_rule(case, seed):
    """g equal across K: the reference computes the gated delta rule's float64 operations (bitwise equal); every
    kda backend agrees with the gated delta rule within its dtype's tolerance, in both modes."""
    args = make(OP, gate="equal", seed=seed, **CASES[case])
    scalar = args | dict(g=args["g"][..., 0].contiguous())
    wide, wide_scalar = to_float64(args), to_float64(scalar)
    for got, want in zip(kernellab.kda(**wide, backend="reference"),
                         kernellab.gated_delta_rule(**wide_scalar, backend="reference")):
        assert torch.equal(got, want), f"the references differ (seed={seed})"
    want, want_state = kernellab.gated_delta_rule(**wide_scalar, backend="reference")
    for backend in lab_backends(OP):
        for mode in MODES:
            o, state = kernellab.kda(**args, mode=mode, backend=backend)
            assert rel_err(o, want) <= TOLERANCE[torch.float32], f"{backend} {mode} o (seed={seed})"
            assert rel_err(state, want_state) <= TOLERANCE[torch.float32], f"{backend} {mode} state (seed={seed})"


@pytest.mark.parametrize("case", ["T_not_multiple_of_chunk", "packed_unequal", "strong_decay"])
def test_torch_several_groups_of_chunks(case, seed, monkeypatch):
    """Chunks of 2 in groups of one chunk (GROUP_ELEMENTS): the groups' states carried from one to the next, in
    the forward and in the backward's recompute, give the reference's outputs and gradients."""
    from kernellab.torch import kda as torch_kda

    monkeypatch.setattr(torch_kda, "GROUP_ELEMENTS", 1)
    args = make(OP, seed=seed, **CASES[case])
    check_recurrent_op(OP, "torch", args | dict(mode="chunk"), seed, chunk_size=2)
    short = make(OP, seed=seed, **(CASES[case] | dict(T=30) if "T" in CASES[case] else
                                          dict(CASES[case], seqlens=[13, 1, 9])))
    check_gradients(OP, "torch", short | dict(mode="chunk"), seed, chunk_size=2)


# ------------------------------------------------------------------------------------------------- gradients

GRADIENT_CASES = {
    "T1": dict(T=1),
    "T_not_multiple_of_chunk": dict(T=45, initial_state=True, mode="chunk"),
    "Hv_2Hk_recurrent": dict(Hk=2, Hv=4, T=20, initial_state=True, mode="recurrent"),
    "packed_with_length_1": dict(seqlens=[21, 1, 40], initial_state=True, mode="chunk"),
    "strong_decay": dict(T=40, gate="strong", initial_state=True, mode="chunk"),
    "g_zero": dict(T=40, gate="zero", initial_state=True, mode="chunk"),
    "beta_near_0": dict(T=40, beta="low", initial_state=True, mode="chunk"),
    "beta_near_1_no_l2norm": dict(T=40, beta="high", use_qk_l2norm=False, initial_state=True, mode="chunk"),
}


def test_torch_decay_gradient_at_g_zero():
    """g = 0 puts every log decay of the torch backward at exactly 0: the decays' gradient there must be exp(0) = 1,
    not a clamp's boundary subgradient (which torch leaves unspecified: torch 2.14.1 gave dg = 0 in the g_zero
    case); below the floor, where the decay is flushed to 0, the gradient is 0."""
    from kernellab.torch.kda import _decay
    from kernellab.torch.linear_attention import LOG_DECAY_FLOOR

    x = torch.tensor([0.0, -0.0, -1.0, LOG_DECAY_FLOOR - 2, -float("inf")], dtype=torch.float64, requires_grad=True)
    _decay(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, torch.e ** -1, 0.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("case", GRADIENT_CASES)
@pytest.mark.parametrize("backend", [name for name in with_backward(OP)
                                     if torch.float64 in registry.registered(OP)[name].dtypes])
def test_gradients_in_float64(backend, case, seed):
    """Every backend's backward that takes float64 inputs against the reference's autograd (float64 gradients:
    only the algorithm differs, so the gate is tight). The float32 gradients of every backend with a backward,
    fla's included: tests/ops/test_backward.py."""
    shape = dict(GRADIENT_CASES[case])
    mode = shape.pop("mode", "auto")
    args = make(OP, dtype=torch.float64, seed=seed, **shape) | dict(mode=mode)
    check_gradients(OP, backend, args, seed, tol=1e-10)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["T_not_multiple_of_chunk", "packed_unequal", "strong_decay", "Hv_equals_Hk",
                                  "beta_near_1_no_l2norm"])
@pytest.mark.parametrize("backend, dtype", backend_dtypes(gpu_backends(OP), OP, GPU_DTYPES))
def test_matches_reference_gpu(backend, dtype, case, mode, seed):
    args = make(OP, dtype=dtype, device="cuda", seed=seed, **CASES[case])
    check_recurrent_op(OP, backend, args | dict(mode=mode), seed)


# ------------------------------------------------------------------------------------------------- bad input

def _bad_kda_inputs(args):
    """The gated delta rule's bad inputs (g_shape cuts g's last dim: K here), and g of the scalar gate's rank."""
    return _bad_inputs(args) + [
        ("g_rank", dict(g=args["g"][..., 0]), "g must have 4 dimensions"),
        ("g_heads", dict(g=args["g"][:, :, :1]), "g must have shape"),
        ("g_device", dict(g=args["g"].to("meta")), "g is on meta"),
    ]


def _bad_args(seed):
    return make(OP, B=2, T=40, seed=seed, initial_state=True)


def _bad_packed_args(seed):
    return make(OP, seqlens=[20, 1, 19], seed=seed, initial_state=True)


@pytest.mark.parametrize("case", bad_case_names(_bad_kda_inputs, _bad_args))
@pytest.mark.parametrize("backend", ["reference"] + lab_backends(OP))
def test_bad_input_raises_and_writes_nothing(backend, case, seed):
    check_bad_case(OP, backend, _bad_kda_inputs, _bad_args, case, seed)


@pytest.mark.parametrize("case", bad_case_names(bad_packed_inputs, _bad_packed_args))
@pytest.mark.parametrize("backend", lab_backends(OP))
def test_bad_packed_input_raises_and_writes_nothing(backend, case, seed):
    check_bad_case(OP, backend, bad_packed_inputs, _bad_packed_args, case, seed)
