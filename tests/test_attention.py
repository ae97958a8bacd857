"""Parity of every attention backend with the float64 reference (grouped KV heads, causal and not, a KV cache
longer than the queries), and the checks on bad input.

Shapes stay small (T <= 130, D in {16, 32}): Triton runs here under its interpreter."""
import math

import pytest
import torch

import kernels
from bench import inputs
from tests.helpers import (DTYPES, GPU_DTYPES, assert_close, assert_unchanged, backend_dtypes, bad_case_names,
                           check_bad_case, gpu_backends, lab_backends, poisoned_allocations, snapshot, to_float64,
                           tolerance)

# As keywords of bench.inputs.attention (Hq = 4, Hkv = 2, D = 32 unless said).
CASES = {
    "T1": dict(T=1),
    "decode_with_cache": dict(T=1, Tk=77),
    "causal": dict(T=64),
    "T_odd": dict(T=130),
    "not_causal": dict(T=70, causal=False),
    "kv_cache_causal": dict(T=33, Tk=100),
    "kv_cache_not_causal": dict(T=20, Tk=45, causal=False),
    "Hq_equals_Hkv": dict(T=50, Hq=2, Hkv=2),
    "Hq_4Hkv": dict(T=50, Hq=4, Hkv=1, D=16),
    "batch2": dict(B=2, T=40, Tk=48),
}


def _check(backend, args, seed, scale=None):
    before = snapshot(args)
    with poisoned_allocations():
        o = kernels.attention(**args, scale=scale, backend=backend)
    assert_unchanged(args, before)
    ref = kernels.attention(**to_float64(args), scale=scale, backend="reference")
    dtype = args["v"].dtype
    assert o.dtype == dtype, f"o has dtype {o.dtype}, v has {dtype}"
    assert_close(o, ref, dtype, f"{backend} o", seed, tolerance(dtype, args["v"].device.type))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend, dtype", backend_dtypes(lab_backends("attention"), "attention", DTYPES))
def test_matches_reference(backend, dtype, case, seed):
    _check(backend, inputs.make("attention", dtype=dtype, seed=seed, **CASES[case]), seed)


@pytest.mark.parametrize("backend", lab_backends("attention"))
def test_custom_scale(backend, seed):
    _check(backend, inputs.make("attention", T=40, Tk=50, seed=seed), seed, scale=0.05)


def test_torch_float64(seed):
    args = inputs.make("attention", T=50, Tk=60, dtype=torch.float64, seed=seed)
    ref = kernels.attention(**args, backend="reference")
    assert_close(kernels.attention(**args, backend="torch"), ref, torch.float64, "torch o", seed)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["T_odd", "kv_cache_causal", "decode_with_cache", "not_causal"])
@pytest.mark.parametrize("backend, dtype", backend_dtypes(gpu_backends("attention"), "attention", GPU_DTYPES))
def test_matches_reference_gpu(backend, dtype, case, seed):
    _check(backend, inputs.make("attention", dtype=dtype, device="cuda", seed=seed, **CASES[case]), seed)


def _bad_inputs(args):
    """(name, changed arguments, message) for every kind of bad input of API.md."""
    q, k, v = args["q"], args["k"], args["v"]
    return [
        ("q_rank", dict(q=q[0]), "q must have 4 dimensions"),
        ("k_v_shapes", dict(v=v[:, :-1]), "k and v must have the same shape"),
        ("head_dim", dict(k=k[..., :-1], v=v[..., :-1]), "head dim"),
        ("batch", dict(k=k[:1], v=v[:1]), "batch"),
        ("kv_shorter_than_q", dict(k=k[:, :-1], v=v[:, :-1]), "at least the"),
        ("Hq_not_multiple_of_Hkv", dict(k=k[:, :, :1].expand(-1, -1, 3, -1), v=v[:, :, :1].expand(-1, -1, 3, -1)),
         "not a multiple"),
        ("dtype_mismatch", dict(v=v.half()), "v has dtype"),
        ("int_dtype", dict(q=q.long(), k=k.long(), v=v.long()), "q must have dtype"),
        ("device_mismatch", dict(k=k.to("meta")), "k is on meta"),
        ("scale_nan", dict(scale=math.nan), "scale must be"),
    ]


def _bad_args(seed):
    return inputs.make("attention", B=2, T=20, seed=seed)


@pytest.mark.parametrize("case", bad_case_names(_bad_inputs, _bad_args))
@pytest.mark.parametrize("backend", lab_backends("attention"))
def test_bad_input_raises_and_writes_nothing(backend, case, seed):
    check_bad_case("attention", backend, _bad_inputs, _bad_args, case, seed)


def test_unknown_and_unavailable_backends():
    args = inputs.make("attention", T=8)
    with pytest.raises(kernels.BackendUnavailable, match="no backend 'nope'"):
        kernels.attention(**args, backend="nope")
    if not torch.cuda.is_available():
        with pytest.raises(kernels.BackendUnavailable):
            kernels.attention(**args, backend="flash_attn")
