"""Parity of every gated_delta_rule backend with the float64 reference, in both modes, over the edge cases, and
the checks on bad input.

Shapes stay small (T <= 130, K, V in {16, 32}): Triton runs here under its interpreter."""
import math

import pytest
import torch

import kernellab
from bench.ops import cu_seqlens_of, make
from tests.helpers import (DTYPES, GPU_DTYPES, backend_dtypes, bad_case_names, bad_packed_inputs,
                           check_bad_case, check_bad_input, check_recurrent_op, gpu_backends, lab_backends)

MODES = ["chunk", "recurrent"]

# The edge cases, as keywords of bench.ops.gated_delta_rule.gated_delta_rule_inputs (Hk = 2, Hv = 4 unless said). Lengths are named
# for chunks of 64 (the GPU kernels'); the torch backend on CPU runs chunks of 32, so "one_chunk" is two there.
CASES = {
    "T1": dict(T=1),
    "T1_batch2_no_l2norm": dict(B=2, T=1, initial_state=True, use_qk_l2norm=False),
    "one_chunk": dict(T=64, initial_state=True),
    "T_not_multiple_of_chunk": dict(T=130, initial_state=True),
    "batch2": dict(B=2, T=70, initial_state=True),
    "Hv_equals_Hk": dict(Hk=2, Hv=2, T=67, initial_state=True),
    "Hv_4Hk": dict(Hk=1, Hv=4, T=66),
    "packed_unequal": dict(seqlens=[37, 1, 70], initial_state=True),
    "packed_no_initial_state": dict(seqlens=[1, 64, 5]),
    "g_zero": dict(T=80, gate="zero", initial_state=True),
    "strong_decay": dict(T=80, gate="strong", initial_state=True),
    "beta_near_0": dict(T=80, beta="low", initial_state=True),
    "beta_near_1_no_l2norm": dict(T=80, beta="high", use_qk_l2norm=False, initial_state=True),
    "K16_V32": dict(T=70, K=16, V=32, initial_state=True),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend, dtype", backend_dtypes(lab_backends("gated_delta_rule"), "gated_delta_rule",
                                                          DTYPES))
def test_matches_reference(backend, dtype, case, mode, seed):
    args = make("gated_delta_rule", dtype=dtype, seed=seed, **CASES[case])
    check_recurrent_op("gated_delta_rule", backend, args | dict(mode=mode), seed)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", lab_backends("gated_delta_rule"))
def test_custom_scale_and_no_final_state(backend, mode, seed):
    args = make("gated_delta_rule", T=70, seed=seed, initial_state=True, output_final_state=False)
    args |= dict(scale=0.3, mode=mode)
    if backend == "transformers":  # it always scales by K^-0.5: it must refuse rather than compute another thing
        check_bad_input("gated_delta_rule", backend, args, "scale")
    else:
        check_recurrent_op("gated_delta_rule", backend, args, seed)


@pytest.mark.parametrize("mode", MODES)
def test_torch_float64(mode, seed):
    """float64 inputs: computed and returned in float64 (the state too)."""
    args = make("gated_delta_rule", T=100, dtype=torch.float64, seed=seed, initial_state=True)
    check_recurrent_op("gated_delta_rule", "torch", args | dict(mode=mode), seed)


@pytest.mark.parametrize("case", ["T_not_multiple_of_chunk", "packed_unequal", "strong_decay"])
@pytest.mark.parametrize("chunk_size", [1, 2])
def test_torch_small_chunks(chunk_size, case, seed):
    """The torch backend's chunk_size keyword: many chunks, so that several groups of chunks (CHUNK_GROUP) run
    one after the other, as they do from T = 1024 at the CPU's chunk of 32."""
    from kernellab.torch.gated_delta_rule import CHUNK_GROUP

    args = make("gated_delta_rule", seed=seed, **CASES[case])
    cu = args["cu_seqlens"]
    longest = args["q"].shape[1] if cu is None else int(cu.diff().max())
    assert longest / chunk_size > CHUNK_GROUP + 1, "the case must span more than one group of chunks"
    check_recurrent_op("gated_delta_rule", "torch", args | dict(mode="chunk"), seed, chunk_size=chunk_size)


@pytest.mark.skipif("mkl" not in kernellab.backends("gated_delta_rule"), reason="needs torch built with MKL (x86)")
@pytest.mark.parametrize("case", ["T_not_multiple_of_chunk", "packed_unequal", "strong_decay", "Hv_4Hk",
                                  "beta_near_1_no_l2norm", "T1"])
@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_mkl_chunk_sizes(chunk_size, case, seed):
    """mkl's chunked loop at other chunk sizes: one token, a size that divides nothing, one longer than some
    sequences (the last chunk of a sequence is short; nothing is padded)."""
    args = make("gated_delta_rule", seed=seed, **CASES[case])
    check_recurrent_op("gated_delta_rule", "mkl", args | dict(mode="chunk"), seed, chunk_size=chunk_size)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["T_not_multiple_of_chunk", "packed_unequal", "strong_decay", "Hv_equals_Hk",
                                  "beta_near_1_no_l2norm"])
@pytest.mark.parametrize("backend, dtype", backend_dtypes(gpu_backends("gated_delta_rule"), "gated_delta_rule",
                                                          GPU_DTYPES))
def test_matches_reference_gpu(backend, dtype, case, mode, seed):
    args = make("gated_delta_rule", dtype=dtype, device="cuda", seed=seed, **CASES[case])
    check_recurrent_op("gated_delta_rule", backend, args | dict(mode=mode), seed)


# ------------------------------------------------------------------------------------------- bad input

def _bad_inputs(args):
    """(name, changed arguments, message) for every kind of bad input of API.md."""
    q, k, v, g, beta, s0 = (args[key] for key in ("q", "k", "v", "g", "beta", "initial_state"))
    T = q.shape[1]
    return [
        ("q_rank", dict(q=q[0]), "q must have 4 dimensions"),
        ("k_shape", dict(k=k[..., :-1]), "k must have shape"),
        ("v_time", dict(v=v[:, :-1]), "v must have batch and time"),
        ("g_shape", dict(g=g[..., :1]), "g must have shape"),
        ("g_none", dict(g=None), "g must be a tensor"),
        ("beta_shape", dict(beta=beta[:, :-1]), "beta must have shape"),
        ("beta_none", dict(beta=None), "beta must be a tensor"),
        ("Hv_not_multiple_of_Hk", dict(v=v[:, :, :3], g=g[..., :3], beta=beta[..., :3], initial_state=None),
         "Hv % Hk != 0"),
        ("dtype_mismatch", dict(v=v.half()), "v has dtype"),
        ("int_dtype", dict(q=q.long(), k=k.long(), v=v.long()), "q must have dtype"),
        ("device_mismatch", dict(k=k.to("meta")), "k is on meta"),
        ("state_shape", dict(initial_state=s0[:, :, :, :-1]), "initial_state must have shape"),
        ("state_dtype", dict(initial_state=s0.half()), "initial_state must have dtype"),
        ("cu_seqlens_batch", dict(cu_seqlens=cu_seqlens_of([T])), "cu_seqlens needs batch size 1"),
        ("mode", dict(mode="parallel"), "mode must be"),
        ("scale_inf", dict(scale=math.inf), "scale must be"),
    ]


def _bad_args(seed):
    return make("gated_delta_rule", B=2, T=40, seed=seed, initial_state=True)


def _bad_packed_args(seed):
    return make("gated_delta_rule", seqlens=[20, 1, 19], seed=seed, initial_state=True)


@pytest.mark.parametrize("case", bad_case_names(_bad_inputs, _bad_args))
@pytest.mark.parametrize("backend", lab_backends("gated_delta_rule"))
def test_bad_input_raises_and_writes_nothing(backend, case, seed):
    check_bad_case("gated_delta_rule", backend, _bad_inputs, _bad_args, case, seed)


@pytest.mark.parametrize("case", bad_case_names(bad_packed_inputs, _bad_packed_args))
@pytest.mark.parametrize("backend", lab_backends("gated_delta_rule"))
def test_bad_packed_input_raises_and_writes_nothing(backend, case, seed):
    check_bad_case("gated_delta_rule", backend, bad_packed_inputs, _bad_packed_args, case, seed)


def test_unknown_and_unavailable_backends():
    args = make("gated_delta_rule", T=8)
    with pytest.raises(kernellab.BackendUnavailable, match="no backend 'nope'"):
        kernellab.gated_delta_rule(**args, backend="nope")
    if not torch.cuda.is_available():
        with pytest.raises(kernellab.BackendUnavailable, match="runs on cuda"):
            kernellab.gated_delta_rule(**args, backend="fla")
