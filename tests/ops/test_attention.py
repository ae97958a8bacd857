"""Parity of every attention backend with the float64 reference (grouped KV heads, causal and not, a KV cache
longer than the queries, packed sequences by cu_seqlens with a length-1 and an empty one, KV buffers of
per-sequence lengths by kv_lens), and the checks on bad input.

Shapes stay small (T <= 130, D in {16, 32}): Triton runs here under its interpreter."""
import math

import pytest
import torch

import kernellab
from bench.ops import make
from tests.helpers import (DTYPES, GPU_DTYPES, assert_close, assert_unchanged, backend_dtypes, bad_case_names,
                           check_bad_case, gpu_backends, lab_backends, poisoned_allocations, snapshot, to_float64,
                           tolerance)

# As keywords of bench.ops.attention.attention_inputs (Hq = 4, Hkv = 2, D = 32 unless said).
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
    "packed": dict(seqlens=[1, 70, 0, 3, 64]),
    "packed_not_causal": dict(seqlens=[5, 1, 66], causal=False),
    "packed_one": dict(seqlens=[1]),
    "kv_lens_decode": dict(B=3, T=1, Tk=80, kv_lens=[1, 33, 80]),
    "kv_lens_chunk": dict(B=2, T=5, Tk=70, kv_lens=[5, 69], Hq=4, Hkv=1),
    "kv_lens_not_causal": dict(B=2, T=3, Tk=40, kv_lens=[3, 40], causal=False),
}


def _check(backend, args, seed, scale=None):
    before = snapshot(args)
    with poisoned_allocations():
        o = kernellab.attention(**args, scale=scale, backend=backend)
    assert_unchanged(args, before)
    ref = kernellab.attention(**to_float64(args), scale=scale, backend="reference")
    dtype = args["v"].dtype
    assert o.dtype == dtype, f"o has dtype {o.dtype}, v has {dtype}"
    assert_close(o, ref, dtype, f"{backend} o", seed, tolerance(dtype, args["v"].device.type))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend, dtype", backend_dtypes(lab_backends("attention"), "attention", DTYPES))
def test_matches_reference(backend, dtype, case, seed):
    _check(backend, make("attention", dtype=dtype, seed=seed, **CASES[case]), seed)


@pytest.mark.parametrize("backend", lab_backends("attention"))
def test_custom_scale(backend, seed):
    _check(backend, make("attention", T=40, Tk=50, seed=seed), seed, scale=0.05)


def test_torch_float64(seed):
    args = make("attention", T=50, Tk=60, dtype=torch.float64, seed=seed)
    ref = kernellab.attention(**args, backend="reference")
    assert_close(kernellab.attention(**args, backend="torch"), ref, torch.float64, "torch o", seed)


def test_packed_equals_one_call_per_sequence(seed):
    """Each packed sequence gets the output of its own call: nothing leaks across the sequences' boundaries."""
    seqlens = [3, 1, 40]
    args = make("attention", seqlens=seqlens, seed=seed)
    o = kernellab.attention(**args, backend="torch")
    bounds = args["cu_seqlens"].tolist()
    for start, end in zip(bounds, bounds[1:]):
        alone = kernellab.attention(*(args[key][:, start:end] for key in ("q", "k", "v")), backend="reference")
        assert_close(o[:, start:end], alone, torch.float32, f"sequence {start}:{end}", seed)


def test_kv_lens_ignores_the_buffer_past_each_length(seed):
    """Keys and values past kv_lens[b] (here huge, but finite: SDPA's masked scores still multiply them) do not
    reach the output."""
    args = make("attention", B=2, T=2, Tk=30, kv_lens=[4, 30], seed=seed)
    ref = kernellab.attention(**to_float64(args), backend="reference")
    args["k"][0, 4:], args["v"][0, 4:] = 1e4, -1e4
    for backend in lab_backends("attention"):
        assert_close(kernellab.attention(**args, backend=backend), ref, torch.float32, backend, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["T_odd", "kv_cache_causal", "decode_with_cache", "not_causal", "packed",
                                  "kv_lens_decode", "kv_lens_chunk"])
@pytest.mark.parametrize("backend, dtype", backend_dtypes(gpu_backends("attention"), "attention", GPU_DTYPES))
def test_matches_reference_gpu(backend, dtype, case, seed):
    _check(backend, make("attention", dtype=dtype, device="cuda", seed=seed, **CASES[case]), seed)


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
        ("kv_lens_shape", dict(kv_lens=torch.tensor([20], dtype=torch.int32)), "kv_lens must have shape"),
        ("kv_lens_float", dict(kv_lens=torch.tensor([20.0, 20.0])), "kv_lens must have dtype"),
        ("kv_lens_too_long", dict(kv_lens=torch.tensor([20, 21], dtype=torch.int32)), "kv_lens must lie in"),
        ("kv_lens_shorter_than_q", dict(kv_lens=torch.tensor([19, 20], dtype=torch.int32)), "kv_lens must lie in"),
        ("cu_seqlens_batch2", dict(cu_seqlens=torch.tensor([0, 20], dtype=torch.int32)), "batch size 1"),
    ]


def _bad_packed(args):
    """Bad cu_seqlens on packed inputs [1, 20]."""
    k, v = args["k"], args["v"]
    return [
        ("not_monotone", dict(cu_seqlens=torch.tensor([0, 12, 5, 20], dtype=torch.int32)), "non-decreasing"),
        ("end_short", dict(cu_seqlens=torch.tensor([0, 5, 19], dtype=torch.int32)), "cu_seqlens must start"),
        ("float", dict(cu_seqlens=torch.tensor([0.0, 20.0])), "cu_seqlens must have dtype"),
        ("kv_longer", dict(k=torch.cat([k, k], 1), v=torch.cat([v, v], 1)), "with cu_seqlens, k and v"),
        ("with_kv_lens", dict(kv_lens=torch.tensor([20], dtype=torch.int32)), "cu_seqlens and kv_lens"),
    ]


def _bad_args(seed):
    return make("attention", B=2, T=20, seed=seed)


@pytest.mark.parametrize("case", bad_case_names(_bad_inputs, _bad_args))
@pytest.mark.parametrize("backend", lab_backends("attention"))
def test_bad_input_raises_and_writes_nothing(backend, case, seed):
    check_bad_case("attention", backend, _bad_inputs, _bad_args, case, seed)


def _packed_args(seed):
    return make("attention", seqlens=[8, 12], seed=seed)


@pytest.mark.parametrize("case", bad_case_names(_bad_packed, _packed_args))
@pytest.mark.parametrize("backend", lab_backends("attention"))
def test_bad_packing_raises_and_writes_nothing(backend, case, seed):
    check_bad_case("attention", backend, _bad_packed, _packed_args, case, seed)


def test_unknown_and_unavailable_backends():
    args = make("attention", T=8)
    with pytest.raises(kernellab.BackendUnavailable, match="no backend 'nope'"):
        kernellab.attention(**args, backend="nope")
    if not torch.cuda.is_available():
        with pytest.raises(kernellab.BackendUnavailable):
            kernellab.attention(**args, backend="flash_attn")
