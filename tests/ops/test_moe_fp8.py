"""fp8 experts: the block quantization helpers (kernellab/fp8.py), grouped_gemm_fp8 and moe_fp8 of every backend
against their dequantizing float64 reference (edge cases of the routing included), the error of the fp8 layer
against the bf16 one, and bad input."""
import math

import pytest
import torch

import kernellab
from bench.check import rel_err
from bench.ops import make
from bench.ops.moe_fp8 import FP8_FLIP_TOLERANCE
from kernellab.fp8 import (ACTIVATION_BLOCK, FP8, FP8_MAX, WEIGHT_BLOCK, _expand, dequantize, quantize,
                           quantize_activations, quantize_weights, quantized_bytes, scale_shape)
from tests.helpers import (assert_close, assert_unchanged, check_bad_input, gpu_backends, lab_backends,
                           poisoned_allocations, snapshot, to_float64, tolerance)

FP8_UNIT_ROUNDOFF = 2.0 ** -4  # float8_e4m3fn: 3 mantissa bits


# -------------------------------------------------------------------------------------------- quantization

@pytest.mark.parametrize("shape, block", [((5, 300), ACTIVATION_BLOCK), ((3, 200, 300), WEIGHT_BLOCK),
                                          ((1, 128), ACTIVATION_BLOCK), ((2, 128, 256), WEIGHT_BLOCK)])
def test_quantize_round_trip(shape, block, seed):
    """Every element within half an fp8 step of its block's scale grid; scales amax / 448 per block (ragged
    blocks at the edges); the largest element of a block lands on 448."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen) * torch.logspace(-3, 3, shape[-1])  # blocks of very different ranges
    q, scale = quantize(x, block)
    assert q.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == scale_shape(shape, block)
    back = dequantize(q, scale, block)
    s = _expand(scale, shape, block)
    assert ((back - x).abs() <= FP8_UNIT_ROUNDOFF * x.abs() + s * 2.0 ** -9 + 1e-30).all()  # 2^-9: subnormal step
    assert (q.float().abs().amax() <= FP8_MAX) and torch.isclose(q.float().abs().amax(), torch.tensor(FP8_MAX))
    rows, cols = shape[-2:]
    for i in range(0, rows, block[0]):
        for j in range(0, cols, block[1]):
            tile = x[..., i:i + block[0], j:j + block[1]]
            expected = tile.abs().amax(dim=(-2, -1)) / FP8_MAX
            torch.testing.assert_close(scale[..., i // block[0], j // block[1]], expected, rtol=1e-6, atol=0)


def test_quantize_zeros_and_edges():
    x = torch.zeros(2, 130)
    x[1, 129] = -3.0
    q, scale = quantize_activations(x)
    assert torch.equal(dequantize(q, scale, ACTIVATION_BLOCK), x)  # zero blocks stay zero, a lone value is exact
    assert (scale > 0).all()
    assert quantized_bytes((256, 1024, 2048)) == 256 * 1024 * 2048 + 4 * 256 * 8 * 16
    w = torch.randn(4, 64, 64, dtype=torch.bfloat16)
    assert quantize_weights(w)[1].shape == (4, 1, 1)


# --------------------------------------------------------------------------------- the ops against the reference

GEMM_CASES = {
    "uniform": dict(N=64, E=8, top_k=2, K=256, Nout=192),
    "ragged_dims": dict(N=40, E=4, top_k=2, K=200, Nout=72),
    "empty_experts": dict(N=16, E=16, top_k=2, K=128, Nout=128, routing="skewed"),
    "one_expert": dict(N=33, E=8, top_k=1, K=128, Nout=64, routing="one_expert"),
    "one_token": dict(N=1, E=4, top_k=2, K=128, Nout=128),
}
MOE_CASES = {
    "uniform": dict(N=48, D=256, E=8, I=128, top_k=2),
    "ragged_dims": dict(N=20, D=200, E=4, I=72, top_k=2),
    "dropped_slots": dict(N=30, D=128, E=8, I=128, top_k=3, drop=0.3),
    "all_dropped": dict(N=5, D=128, E=4, I=128, top_k=2, drop=1.0),
    "one_expert": dict(N=17, D=128, E=8, I=128, top_k=1, routing="one_expert"),
    "one_token_int64": dict(N=1, D=128, E=4, I=128, top_k=2, id_dtype=torch.int64),
}


def _check(op, backend, args, seed, tol):
    before = snapshot(args)
    with poisoned_allocations():
        out = getattr(kernellab, op)(**args, backend=backend)
    assert_unchanged(args, before)
    ref = getattr(kernellab, op)(**to_float64(args), backend="reference")
    assert out.dtype == args["x"].dtype and out.shape == ref.shape
    assert_close(out, ref, args["x"].dtype, f"{backend} {op}", seed, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", GEMM_CASES)
@pytest.mark.parametrize("backend", lab_backends("grouped_gemm_fp8"))
def test_grouped_gemm_fp8_matches_reference(backend, case, dtype, seed):
    args = make("grouped_gemm_fp8", dtype=dtype, seed=seed, **GEMM_CASES[case])
    _check("grouped_gemm_fp8", backend, args, seed, max(tolerance(dtype, "cpu"), FP8_FLIP_TOLERANCE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", MOE_CASES)
@pytest.mark.parametrize("backend", lab_backends("moe_fp8"))
def test_moe_fp8_matches_reference(backend, case, dtype, seed):
    args = make("moe_fp8", dtype=dtype, seed=seed, **MOE_CASES[case])
    _check("moe_fp8", backend, args, seed, max(tolerance(dtype, "cpu"), FP8_FLIP_TOLERANCE))


def test_reference_is_the_dequantized_gemm(seed):
    """The reference by hand: x quantized per 1 x 128, w per 128 x 128, one float64 matmul per expert."""
    args = make("grouped_gemm_fp8", seed=seed, **GEMM_CASES["ragged_dims"])
    x = dequantize(*quantize_activations(args["x"]), ACTIVATION_BLOCK, torch.float64)
    w = dequantize(args["w"], args["w_scale"], WEIGHT_BLOCK, torch.float64)
    bounds = args["offsets"].tolist()
    expected = torch.cat([x[s:e] @ w[i].T for i, (s, e) in enumerate(zip(bounds, bounds[1:]))])
    assert torch.equal(kernellab.grouped_gemm_fp8(**to_float64(args), backend="reference"), expected)


def test_moe_fp8_is_moe_on_the_dequantized_weights_up_to_the_activations(seed):
    """With activations that quantize exactly (multiples of a power of two, few bits), moe_fp8 is moe on the
    dequantized weights."""
    args = make("moe_fp8", seed=seed, **MOE_CASES["uniform"])
    args["x"] = torch.randint(-8, 9, args["x"].shape).float() / 4  # exact in fp8 for any block scale
    dense = dict(x=args["x"], weights=args["weights"], ids=args["ids"],
                 w_gate_up=dequantize(args["w_gate_up"], args["w_gate_up_scale"], WEIGHT_BLOCK),
                 w_down=dequantize(args["w_down"], args["w_down_scale"], WEIGHT_BLOCK))
    # h is not exact in fp8: its quantization is the one difference, bounded by fp8's step
    error = rel_err(kernellab.moe_fp8(**args, backend="reference"), kernellab.moe(**to_float64(dense), backend="reference"))
    assert 0 < error < FP8_UNIT_ROUNDOFF


def test_fp8_layer_against_the_bf16_layer(seed):
    """The error the fp8 format costs: the fp8 layer (x, h and weights each rounded to 3 mantissa bits) against
    the exact layer on the unquantized weights, next to the bf16 layer's. Four quantized operands, each off by
    about fp8's unit roundoff over sqrt(3) (uniform rounding), add in quadrature: ~2 x 2^-4 / sqrt(3) = 7%."""
    shape = dict(N=64, D=512, E=8, I=256, top_k=2)
    dense = make("moe", seed=seed, **shape)
    exact = kernellab.moe(**to_float64(dense), backend="reference")
    quantized = make("moe_fp8", seed=seed, **shape)  # the same weights, quantized
    fp8 = rel_err(kernellab.moe_fp8(**quantized, backend="torch"), exact)
    bf16 = rel_err(kernellab.moe(**{k: v.bfloat16() if k in ("x", "w_gate_up", "w_down") else v
                                  for k, v in dense.items()}, backend="torch"), exact)
    assert bf16 < tolerance(torch.bfloat16, "cpu")
    assert 3 * bf16 < fp8 < 2 * FP8_UNIT_ROUNDOFF / math.sqrt(3) * 1.5


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("backend", lab_backends("moe_fp8"))
def test_bad_fp8_inputs_raise_and_write_nothing(backend, seed):
    args = make("moe_fp8", seed=seed, N=8, D=256, E=4, I=128, top_k=2)
    bad = [
        (dict(w_gate_up=args["w_gate_up"].float()), "w_gate_up must have dtype"),
        (dict(w_gate_up_scale=args["w_gate_up_scale"][:, :1]), "w_gate_up_scale must have shape"),
        (dict(w_down_scale=args["w_down_scale"].half()), "w_down_scale must have dtype"),
        (dict(w_down=args["w_down"][:, :128], w_down_scale=args["w_down_scale"][:, :1]), "w_down must have shape"),
        (dict(x=args["x"][:, :128]), "w_gate_up must be"),
        (dict(x=args["x"].to(FP8)), "x must have dtype"),
        (dict(ids=torch.full_like(args["ids"], 4)), "ids must lie in"),
        (dict(weights=args["weights"][:, :1]), "weights must have shape"),
    ]
    for change, match in bad:
        check_bad_input("moe_fp8", backend, args | change, match)


@pytest.mark.parametrize("backend", lab_backends("grouped_gemm_fp8"))
def test_bad_fp8_gemm_inputs_raise_and_write_nothing(backend, seed):
    args = make("grouped_gemm_fp8", seed=seed, N=8, E=4, top_k=2, K=256, Nout=128)
    bad = [
        (dict(w=args["w"].bfloat16()), "w must have dtype"),
        (dict(w_scale=args["w_scale"][..., :1]), "w_scale must have shape"),
        (dict(x=args["x"][:, :128]), "w must be"),
        (dict(offsets=args["offsets"][:-1]), "offsets must"),
        (dict(w_scale=args["w_scale"].to("meta")), "w_scale is on meta"),
    ]
    for change, match in bad:
        check_bad_input("grouped_gemm_fp8", backend, args | change, match)


# ------------------------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("case", ["uniform", "dropped_slots", "one_expert"])
@pytest.mark.parametrize("backend", gpu_backends("moe_fp8"))
def test_moe_fp8_on_gpu(backend, case, seed):
    args = make("moe_fp8", dtype=torch.bfloat16, seed=seed, device="cuda", **MOE_CASES[case])
    with poisoned_allocations():
        out = kernellab.moe_fp8(**args, backend=backend)
    ref = kernellab.moe_fp8(**to_float64({k: v.cpu() for k, v in args.items()}), backend="reference")
    assert_close(out, ref, torch.bfloat16, f"{backend} moe_fp8", seed)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["uniform", "empty_experts", "one_token"])
@pytest.mark.parametrize("backend", gpu_backends("grouped_gemm_fp8"))
def test_grouped_gemm_fp8_on_gpu(backend, case, seed):
    args = make("grouped_gemm_fp8", dtype=torch.bfloat16, seed=seed, device="cuda", **GEMM_CASES[case])
    with poisoned_allocations():
        out = kernellab.grouped_gemm_fp8(**args, backend=backend)
    ref = kernellab.grouped_gemm_fp8(**to_float64({k: v.cpu() for k, v in args.items()}), backend="reference")
    assert_close(out, ref, torch.bfloat16, f"{backend} grouped_gemm_fp8", seed)


@pytest.mark.skipif("triton" not in kernellab.backends("moe_fp8"), reason="needs Triton (a GPU, or TRITON_INTERPRET=1)")
def test_triton_quantization_is_kernels_fp8s(seed):
    """kernellab.triton.moe_fp8's quantization (its own float32 -> e4m3 rounding, then an exact cast) gives
    kernellab.fp8's bits: every e4m3 midpoint (ties to even), subnormals, saturation, blocks of 10^-8 to 10^4."""
    from kernellab.triton.moe_fp8 import quantize_activations as triton_quantize

    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[torch.isfinite(grid)].unique()
    midpoints = (grid[1:] + grid[:-1]) / 2
    exact = torch.cat([grid, midpoints, torch.full((3,), FP8_MAX)])  # one 448 per row: scale 1, x / scale = x
    body = torch.zeros(-(-exact.numel() // 127) * 127)
    body[: exact.numel()] = exact
    rows = torch.cat([torch.full((body.numel() // 127, 1), FP8_MAX), body.view(-1, 127)], dim=1)
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(32, 384, generator=gen) * torch.logspace(-8, 4, 384)
    for x in (rows, wide):
        q, scale = triton_quantize(x)
        want_q, want_scale = quantize_activations(x)
        assert torch.equal(scale, want_scale)
        assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
