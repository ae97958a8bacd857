"""Parity of every linear_attention backend with the float64 reference over the edge cases, the torch backend's
two modes, and the checks on bad input.

Shapes stay small (T <= 130, K, V in {16, 32}): Triton runs here under its interpreter."""
import math

import pytest
import torch

import kernellab
from bench.ops import cu_seqlens_of, make
from tests.helpers import (DTYPES, GPU_DTYPES, backend_dtypes, bad_case_names, bad_packed_inputs,
                           check_bad_case, check_recurrent_op, gpu_backends, lab_backends)

# ---------------------------------------------------------------------------------------------- parity

# The edge cases, as keywords of bench.ops.linear_attention.linear_attention_inputs (chunk 64 in the chunked backends).
CASES = {
    "T1": dict(T=1),
    "one_chunk": dict(T=64, initial_state=True),
    "T_not_multiple_of_chunk": dict(T=130, initial_state=True),
    "batch2": dict(B=2, T=70, initial_state=True),
    "packed_unequal": dict(seqlens=[37, 1, 70], initial_state=True),
    "packed_no_initial_state": dict(seqlens=[1, 64, 5]),
    "no_gate": dict(T=80, gate=None, initial_state=True),
    "g_zero": dict(T=80, gate="zero"),
    "strong_decay": dict(T=80, gate="strong", initial_state=True),
    "K16_V32": dict(T=70, K=16, V=32, initial_state=True),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend, dtype", backend_dtypes(lab_backends("linear_attention"), "linear_attention",
                                                          DTYPES))
def test_matches_reference(backend, dtype, case, seed):
    check_recurrent_op("linear_attention", backend, make("linear_attention", dtype=dtype, seed=seed,
                                                                **CASES[case]), seed)


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", [b for b in ("torch", "mkl") if b in kernellab.backends("linear_attention")])
def test_cpu_modes(backend, mode, case, seed):
    """The torch and mkl backends' chunked and token-by-token paths (their extra keyword `mode`): "auto" runs
    short sequences token by token, so the parity test above alone would not reach their chunked code on them."""
    args = make("linear_attention", seed=seed, **CASES[case])
    check_recurrent_op("linear_attention", backend, args, seed, mode=mode)


@pytest.mark.skipif("mkl" not in kernellab.backends("linear_attention"), reason="needs torch built with MKL (x86)")
@pytest.mark.parametrize("case", ["T_not_multiple_of_chunk", "packed_unequal", "no_gate", "strong_decay"])
@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_mkl_chunk_sizes(chunk_size, case, seed):
    """mkl's chunked loop at other chunk sizes (see the gated delta rule's test of the same name)."""
    args = make("linear_attention", seed=seed, **CASES[case])
    check_recurrent_op("linear_attention", "mkl", args, seed, mode="chunk", chunk_size=chunk_size)


@pytest.mark.parametrize("backend", lab_backends("linear_attention"))
def test_custom_scale_and_no_final_state(backend, seed):
    args = make("linear_attention", T=70, seed=seed, initial_state=True, output_final_state=False)
    check_recurrent_op("linear_attention", backend, args | dict(scale=0.3), seed)


def test_torch_float64(seed):
    """float64 inputs: computed and returned in float64 (the state too)."""
    args = make("linear_attention", T=100, dtype=torch.float64, seed=seed, initial_state=True)
    check_recurrent_op("linear_attention", "torch", args, seed)


def test_torch_decay_factors_flush_to_zero_not_subnormal(seed):
    """The torch backends' decay factors: exp(x) down to the floor, exactly 0 below it (no subnormal numbers,
    which slow CPU matmuls a hundredfold); flush_tiny_ zeroes magnitudes under 2^-60 and keeps the rest."""
    from kernellab.torch.linear_attention import LOG_DECAY_FLOOR, decay_exp_, decay_matrix, flush_tiny_

    gen = torch.Generator().manual_seed(seed)
    log_decay = -torch.rand(1000, generator=gen) * 3 * abs(LOG_DECAY_FLOOR)
    decay = decay_exp_(log_decay.clone())
    kept = log_decay >= LOG_DECAY_FLOOR
    assert torch.equal(decay[kept], log_decay[kept].exp()) and kept.any()
    assert (decay[~kept] == 0).all() and (~kept).any()
    gcum = (-torch.rand(8, 64, generator=gen) * 5).cumsum(-1)  # strong decay: the floor is crossed in a chunk
    matrix = decay_matrix(gcum)
    assert torch.equal(matrix.triu(1), torch.zeros_like(matrix))
    expected = (gcum[:, :, None] - gcum[:, None, :]).exp().tril()
    expected[expected < math.exp(LOG_DECAY_FLOOR)] = 0
    assert torch.equal(matrix, expected)
    x = torch.tensor([1.0, -2.0 ** -59, 2.0 ** -61, -1e-40, 0.5])
    assert flush_tiny_(x).tolist() == [1.0, -2.0 ** -59, 0.0, 0.0, 0.5]


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["T_not_multiple_of_chunk", "packed_unequal", "strong_decay", "no_gate"])
@pytest.mark.parametrize("backend, dtype", backend_dtypes(gpu_backends("linear_attention"), "linear_attention",
                                                          GPU_DTYPES))
def test_matches_reference_gpu(backend, dtype, case, seed):
    args = make("linear_attention", dtype=dtype, device="cuda", seed=seed, **CASES[case])
    check_recurrent_op("linear_attention", backend, args, seed)


# ------------------------------------------------------------------------------------------- bad input

def _bad_inputs(args):
    """(name, changed arguments, message) for every kind of bad input of API.md."""
    q, k, v, g, s0 = args["q"], args["k"], args["v"], args["g"], args["initial_state"]
    B, T, H, K = q.shape
    return [
        ("q_rank", dict(q=q[0]), "q must have 4 dimensions"),
        ("k_shape", dict(k=k[..., :-1]), "k must have shape"),
        ("v_time", dict(v=v[:, :-1]), "v must have batch and time"),
        ("v_heads", dict(v=torch.cat([v, v], dim=2), g=torch.cat([g, g], dim=2), initial_state=None),
         "v must have the"),
        ("g_shape", dict(g=g[..., :1]), "g must have shape"),
        ("dtype_mismatch", dict(k=k.half()), "k has dtype"),
        ("int_dtype", dict(q=q.long(), k=k.long(), v=v.long()), "q must have dtype"),
        ("device_mismatch", dict(v=v.to("meta")), "v is on meta"),
        ("state_shape", dict(initial_state=s0[:, :, :-1]), "initial_state must have shape"),
        ("state_dtype", dict(initial_state=s0.half()), "initial_state must have dtype"),
        ("cu_seqlens_batch", dict(cu_seqlens=cu_seqlens_of([T])), "cu_seqlens needs batch size 1"),
        ("scale_nan", dict(scale=math.nan), "scale must be"),
    ]


def _bad_args(seed):
    return make("linear_attention", B=2, T=40, seed=seed, initial_state=True)


def _bad_packed_args(seed):
    return make("linear_attention", seqlens=[20, 1, 19], seed=seed, initial_state=True)


@pytest.mark.parametrize("case", bad_case_names(_bad_inputs, _bad_args))
@pytest.mark.parametrize("backend", lab_backends("linear_attention"))
def test_bad_input_raises_and_writes_nothing(backend, case, seed):
    check_bad_case("linear_attention", backend, _bad_inputs, _bad_args, case, seed)


@pytest.mark.parametrize("case", bad_case_names(bad_packed_inputs, _bad_packed_args))
@pytest.mark.parametrize("backend", lab_backends("linear_attention"))
def test_bad_packed_input_raises_and_writes_nothing(backend, case, seed):
    check_bad_case("linear_attention", backend, bad_packed_inputs, _bad_packed_args, case, seed)


def test_unknown_and_unavailable_backends():
    args = make("linear_attention", T=8)
    with pytest.raises(kernellab.BackendUnavailable, match="no backend 'nope'"):
        kernellab.linear_attention(**args, backend="nope")
    if not torch.cuda.is_available():
        with pytest.raises(kernellab.BackendUnavailable):
            kernellab.linear_attention(**args, backend="fla")
