"""Parity of every MoE backend (route, moe_permute, moe_unpermute, grouped_gemm, moe) with the float64 reference,
over the MoE edge cases, plus the checks every backend shares on bad input.

Shapes stay small (N <= 64, D <= 64, E <= 16): Triton runs here under its interpreter."""
import pytest
import torch

import kernellab
from bench.ops import make
from tests.helpers import (assert_close, assert_unchanged, gpu_backends, lab_backends, poisoned_allocations, snapshot,
                           to_float64, tolerance)

DTYPES = [torch.float32, torch.float16]
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# The MoE edge cases, as keywords of the input makers (bench/ops/moe.py) (N tokens, E experts, top_k slots per token).
ROUTINGS = {
    "one_token": dict(N=1, E=4, top_k=2),
    "uniform": dict(N=37, E=8, top_k=2),
    "skewed_empty_experts": dict(N=64, E=16, top_k=4, routing="skewed"),
    "every_token_on_one_expert": dict(N=33, E=8, top_k=1, routing="one_expert"),
    "top_k_equals_E": dict(N=16, E=4, top_k=4, id_dtype=torch.int64),
    "dropped_slots": dict(N=40, E=8, top_k=3, drop=0.3, id_dtype=torch.int64),
    "all_slots_dropped": dict(N=5, E=4, top_k=2, drop=1.0),
}
NO_ID_DTYPE = ("id_dtype",)


def _without(case, *keys):
    return {k: v for k, v in case.items() if k not in keys}


# ----------------------------------------------------------------------------------------------- route

def _check_route(backend, args, seed):
    with poisoned_allocations():
        weights, ids = kernellab.route(**args, backend=backend)
    logits, top_k = args["router_logits"], args["top_k"]
    N = logits.shape[0]
    assert weights.shape == ids.shape == (N, top_k)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    probs = torch.softmax(logits.double(), dim=-1)
    ref_ids = kernellab.route(**args, backend="reference")[1]
    if logits.dtype == torch.float32:
        assert torch.equal(ids.cpu(), ref_ids.cpu()), f"ids differ from the reference (seed={seed})"
    else:  # half-precision logits tie: the chosen probabilities must be the top_k largest, in descending order
        chosen = probs.gather(1, ids.long()).cpu()
        assert torch.equal(chosen, probs.topk(top_k, dim=-1).values.cpu()), f"ids are not the top_k (seed={seed})"
        assert (ids.sort(-1).values.diff(dim=-1) > 0).all(), f"repeated expert in a token's ids (seed={seed})"
    ref_weights = probs.gather(1, ids.long())
    if args["renormalize"]:
        ref_weights = ref_weights / ref_weights.sum(-1, keepdim=True)
    # the softmax runs in float32 whatever the logits' dtype
    assert_close(weights, ref_weights, torch.float32, "weights", seed)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ROUTINGS, ids=str)
@pytest.mark.parametrize("backend", lab_backends("route"))
def test_route(backend, case, dtype, renormalize, seed):
    shape = _without(ROUTINGS[case], "drop", "id_dtype")
    _check_route(backend, make("route", **shape, dtype=dtype, seed=seed, renormalize=renormalize), seed)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("backend", gpu_backends("route"))
def test_route_gpu(backend, dtype, seed):
    args = make("route", N=300, E=64, top_k=8, dtype=dtype, seed=seed, device="cuda")
    _check_route(backend, args, seed)


# ------------------------------------------------------------------------------------------ moe_permute

def _check_permute(backend, args, seed):
    before = snapshot(args)
    with poisoned_allocations():
        p = kernellab.moe_permute(**args, backend=backend)
    assert_unchanged(args, before)
    ref = kernellab.moe_permute(**{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in args.items()},
                              backend="reference")
    assert isinstance(p, kernellab.Permutation)
    assert (p.num_tokens, p.top_k) == tuple(args["ids"].shape)
    assert p.offsets.dtype == torch.int32, f"offsets must be int32, got {p.offsets.dtype}"
    assert p.source.dtype in (torch.int32, torch.int64)
    assert p.x.dtype == args["x"].dtype and p.x.device == args["x"].device
    assert torch.equal(p.offsets.cpu(), ref.offsets), f"offsets differ (seed={seed})"
    assert torch.equal(p.source.cpu().long(), ref.source), f"source differs (seed={seed})"
    assert torch.equal(p.x.cpu(), ref.x), f"rows differ (seed={seed})"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ROUTINGS, ids=str)
@pytest.mark.parametrize("backend", lab_backends("moe_permute"))
def test_moe_permute(backend, case, dtype, seed):
    _check_permute(backend, make("moe_permute", **ROUTINGS[case], D=24, dtype=dtype, seed=seed), seed)


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("backend", lab_backends("moe_permute"))
def test_moe_permute_id_dtypes(backend, id_dtype, seed):
    args = make("moe_permute", N=29, E=8, top_k=2, drop=0.2, id_dtype=id_dtype, seed=seed)
    _check_permute(backend, args, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", ["uniform", "dropped_slots", "every_token_on_one_expert"], ids=str)
@pytest.mark.parametrize("backend", gpu_backends("moe_permute"))
def test_moe_permute_gpu(backend, case, dtype, seed):
    shape = ROUTINGS[case] | dict(N=500, E=64)
    _check_permute(backend, make("moe_permute", **shape, D=128, dtype=dtype, seed=seed, device="cuda"), seed)


# ---------------------------------------------------------------------------------------- moe_unpermute

def _dropped_slots(p):
    """bool [N, top_k]: the slots with no row in p (ids == -1)."""
    dropped = torch.ones(p.num_tokens * p.top_k, dtype=torch.bool)
    dropped[p.source.cpu().long()] = False
    return dropped.view(p.num_tokens, p.top_k)


def _check_unpermute(backend, args, seed, device="cpu"):
    # the weight of a slot with no expert must not reach y, even when it is NaN
    args["weights"][_dropped_slots(args["p"]).to(args["weights"].device)] = float("nan")
    before = snapshot(args)
    with poisoned_allocations():
        y = kernellab.moe_unpermute(**args, backend=backend)
    assert_unchanged(args, before)
    dtype = args["y_sorted"].dtype
    assert y.dtype == dtype and y.device == args["y_sorted"].device
    ref = kernellab.moe_unpermute(**to_float64(args), backend="reference")
    assert_close(y, ref, dtype, "y", seed, tol=tolerance(dtype, device))
    assert (y[_dropped_slots(args["p"]).all(1).to(y.device)] == 0).all(), f"tokens with no expert not 0 (seed={seed})"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ROUTINGS, ids=str)
@pytest.mark.parametrize("backend", lab_backends("moe_unpermute"))
def test_moe_unpermute(backend, case, dtype, seed):
    _check_unpermute(backend, make("moe_unpermute", **ROUTINGS[case], D=40, dtype=dtype, seed=seed), seed)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", ["uniform", "dropped_slots", "top_k_equals_E"], ids=str)
@pytest.mark.parametrize("backend", gpu_backends("moe_unpermute"))
def test_moe_unpermute_gpu(backend, case, dtype, seed):
    shape = ROUTINGS[case] | dict(N=500)
    args = make("moe_unpermute", **shape, D=256, dtype=dtype, seed=seed, device="cuda")
    _check_unpermute(backend, args, seed, device="cuda")


# ----------------------------------------------------------------------------------------- grouped_gemm

def _check_grouped_gemm(backend, args, seed, device="cpu"):
    before = snapshot(args)
    with poisoned_allocations():
        y = kernellab.grouped_gemm(**args, backend=backend)
    assert_unchanged(args, before)
    dtype = args["x"].dtype
    assert y.dtype == dtype and y.device == args["x"].device
    ref = kernellab.grouped_gemm(**to_float64(args), backend="reference")
    assert_close(y, ref, dtype, "y", seed, tol=tolerance(dtype, device))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ROUTINGS, ids=str)
@pytest.mark.parametrize("backend", lab_backends("grouped_gemm"))
def test_grouped_gemm(backend, case, dtype, seed):
    shape = _without(ROUTINGS[case], *NO_ID_DTYPE)
    _check_grouped_gemm(backend, make("grouped_gemm", **shape, K=32, Nout=48, dtype=dtype, seed=seed), seed)


@pytest.mark.parametrize("K, Nout", [(64, 16), (8, 40)])
@pytest.mark.parametrize("backend", lab_backends("grouped_gemm"))
def test_grouped_gemm_shapes(backend, K, Nout, seed):
    _check_grouped_gemm(backend, make("grouped_gemm", N=45, E=8, top_k=2, K=K, Nout=Nout, seed=seed), seed)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", ["uniform", "skewed_empty_experts", "every_token_on_one_expert"], ids=str)
@pytest.mark.parametrize("backend", gpu_backends("grouped_gemm"))
def test_grouped_gemm_gpu(backend, case, dtype, seed):
    shape = _without(ROUTINGS[case], *NO_ID_DTYPE) | dict(N=700)
    args = make("grouped_gemm", **shape, K=256, Nout=384, dtype=dtype, seed=seed, device="cuda")
    _check_grouped_gemm(backend, args, seed, device="cuda")


# -------------------------------------------------------------------------------------------------- moe

def _check_moe(backend, args, seed, device="cpu"):
    args["weights"][args["ids"] < 0] = float("nan")  # a slot with no expert contributes nothing
    before = snapshot(args)
    with poisoned_allocations():
        y = kernellab.moe(**args, backend=backend)
    assert_unchanged(args, before)
    dtype = args["x"].dtype
    assert y.dtype == dtype and y.device == args["x"].device
    ref = kernellab.moe(**to_float64(args), backend="reference")
    assert_close(y, ref, dtype, "y", seed, tol=tolerance(dtype, device))
    assert (y[(args["ids"] < 0).all(1)] == 0).all(), f"tokens with no expert must be 0 (seed={seed})"
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ROUTINGS, ids=str)
@pytest.mark.parametrize("backend", lab_backends("moe"))
def test_moe(backend, case, dtype, seed):
    _check_moe(backend, make("moe", **ROUTINGS[case], D=32, I=16, dtype=dtype, seed=seed), seed)


@pytest.mark.parametrize("D, I", [(64, 8), (16, 48)])
@pytest.mark.parametrize("backend", lab_backends("moe"))
def test_moe_shapes(backend, D, I, seed):
    _check_moe(backend, make("moe", N=50, E=16, top_k=4, D=D, I=I, seed=seed), seed)


@pytest.mark.parametrize("backend", lab_backends("moe"))
def test_moe_is_deterministic(backend, seed):
    args = make("moe", N=48, E=4, top_k=4, D=32, I=16, seed=seed)
    assert torch.equal(kernellab.moe(**args, backend=backend), kernellab.moe(**args, backend=backend))


@pytest.mark.parametrize("case", ["uniform", "dropped_slots", "all_slots_dropped", "skewed_empty_experts"])
def test_torch_moe_host_and_device_grouping_agree(case, seed, monkeypatch):
    """The torch backend groups slots on the host for small N and by a device sort above: same result, bitwise."""
    from kernellab.torch import moe as torch_moe

    args = make("moe", **ROUTINGS[case], D=32, I=16, seed=seed)
    monkeypatch.setattr(torch_moe, "HOST_GROUPING_MAX_SLOTS", 10**9)
    on_host = _check_moe("torch", args, seed)
    monkeypatch.setattr(torch_moe, "HOST_GROUPING_MAX_SLOTS", 0)
    on_device = _check_moe("torch", args, seed)
    assert torch.equal(on_host, on_device)


@pytest.mark.parametrize("rows", [1, 4, 5, 64, 65, 130])
def test_torch_moe_expert_row_counts(rows, seed, monkeypatch):
    """Every token on one expert: rows on both sides of the bounds of the torch backend's transposed GEMMs
    (TRANSPOSED_ROWS), so that each GEMM form is checked, in the layer and in grouped_gemm."""
    from kernellab.torch import moe as torch_moe

    monkeypatch.setattr(torch_moe, "STREAMED_WEIGHT_BYTES", 0)  # small test weights take the streamed form too
    _check_moe("torch", make("moe", N=rows, E=2, top_k=1, routing="one_expert", D=32, I=16, seed=seed), seed)
    _check_grouped_gemm("torch", make("grouped_gemm", N=rows, E=2, top_k=1, routing="one_expert", K=32,
                                             Nout=24, seed=seed), seed)


@pytest.mark.parametrize("backend", ["mkl", "onednn"])
def test_packed_weights_follow_their_tensor(backend, seed, monkeypatch):
    """mkl packs expert weights once per weight tensor, onednn reorders them (kernellab.mkl.packed's cache, one kind
    each): an in-place write to them, a write no version counter sees, or other tensors, must be seen by the next
    call; the cache lets go of a tensor's packs when the tensor dies."""
    if backend not in kernellab.backends("moe"):
        pytest.skip(f"needs torch built with {'MKL' if backend == 'mkl' else 'oneDNN'}, as its x86 CPU builds are")
    from kernellab.mkl import packed
    from kernellab.onednn import moe as onednn_moe

    monkeypatch.setattr(onednn_moe, "STREAM_ROWS", 0)  # every expert on the reordered copies
    args = make("moe", N=40, E=4, top_k=2, D=32, I=16, seed=seed)
    _check_moe(backend, args, seed)
    args["w_gate_up"].mul_(-0.5)
    args["w_down"][1].add_(0.25)  # through a view: one version counter for the whole tensor
    _check_moe(backend, args, seed)
    args["w_down"].data[2].neg_()  # no version counter sees it: the experts' fingerprints do
    _check_moe(backend, args, seed)
    _check_moe(backend, dict(args, w_down=args["w_down"].clone()), seed)
    cached = len(packed._CACHE)
    if backend == "mkl":
        gg = make("grouped_gemm", N=30, E=4, top_k=2, K=32, Nout=24, seed=seed)
        _check_grouped_gemm("mkl", gg, seed)
        gg["w"][2].neg_()
        _check_grouped_gemm("mkl", gg, seed)
        cached = len(packed._CACHE)
        del gg
        cached -= 1
        assert len(packed._CACHE) == cached
    else:
        del args
        cached -= 2  # w_gate_up's and w_down's entries
        assert len(packed._CACHE) == cached
    with torch.inference_mode():  # inference tensors have no version counter: not packed, still right
        frozen = make("moe", N=40, E=4, top_k=2, D=32, I=16, seed=seed)
        _check_moe(backend, frozen, seed)
    assert len(packed._CACHE) == cached


@pytest.mark.skipif("mkl" not in kernellab.backends("moe"),
                    reason="needs torch built with MKL, as its x86 CPU builds are (not ARM ones)")
def test_mkl_gate_over_the_float32_range(seed):
    """mkl's gate builds exp from a series and exponent bits: silu(gate) * up * weight against float64 from gates
    of +-100 (where exp over- and underflows) down to subnormal ones, and zero. Gates under the floor give
    exactly 0."""
    import numpy as np

    from kernellab.mkl.moe import _GATE_FLOOR, _gate_row

    gen = torch.Generator().manual_seed(seed)
    magnitudes = torch.logspace(-40, 2, 500, dtype=torch.float64)
    gate = torch.cat([magnitudes, -magnitudes, torch.zeros(1, dtype=torch.float64),
                      torch.randn(1000, generator=gen, dtype=torch.float64) * 8]).float()
    up = torch.randn(gate.shape[0], generator=gen)
    activated = np.full(gate.shape[0], np.nan, dtype=np.float32)
    _gate_row(torch.cat([gate, up]).numpy(), activated, gate.shape[0], np.float32(0.7),
              np.empty(gate.shape[0], np.int32), np.empty(gate.shape[0], np.float32))
    activated = torch.from_numpy(activated).double()
    expected = torch.nn.functional.silu(gate.double()) * up.double() * 0.7
    kept = gate >= _GATE_FLOOR
    error = (activated - expected)[kept].abs()
    # (a few float32 roundings; results in the subnormal range hold fewer bits: their ulp is 1.4e-45)
    assert (error <= 4e-7 * expected[kept].abs() + 1e-44).all(), f"seed {seed}: worst error {error.max().item():.3g}"
    assert (activated[~kept] == 0).all() and (~kept).any()


def test_torch_moe_takes_zero_tokens(seed):
    args = make("moe", N=0, E=4, top_k=2, D=16, I=8, seed=seed)
    assert kernellab.moe(**args, backend="torch").shape == (0, 16)
    p = kernellab.moe_permute(args["x"], args["ids"], 4, backend="torch")
    assert p.x.shape == (0, 16) and p.offsets.tolist() == [0] * 5
    assert kernellab.moe_unpermute(p.x, p, args["weights"], backend="torch").shape == (0, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", ["one_token", "uniform", "dropped_slots", "every_token_on_one_expert"], ids=str)
@pytest.mark.parametrize("backend", gpu_backends("moe"))
def test_moe_gpu(backend, case, dtype, seed):
    shape = ROUTINGS[case] | (dict() if case == "one_token" else dict(N=300, E=32))
    args = make("moe", **shape, D=256, I=128, dtype=dtype, seed=seed, device="cuda")
    _check_moe(backend, args, seed, device="cuda")


# ------------------------------------------------------------------------------------------ bad input

def _route_bad(seed):
    good = make("route", N=6, E=4, top_k=2, seed=seed)
    logits = good["router_logits"]
    return {
        "logits rank 1": dict(good, router_logits=logits[0]),
        "logits rank 3": dict(good, router_logits=logits[None]),
        "logits int": dict(good, router_logits=logits.to(torch.int32)),
        "top_k 0": dict(good, top_k=0),
        "top_k > E": dict(good, top_k=5),
        "top_k bool": dict(good, top_k=True),
        "top_k float": dict(good, top_k=2.0),
    }


def _moe_permute_bad(seed):
    good = make("moe_permute", N=6, D=8, E=4, top_k=2, seed=seed)
    x, ids = good["x"], good["ids"]
    return {
        "x rank 1": dict(good, x=x[0]),
        "x rank 3": dict(good, x=x[None]),
        "x int": dict(good, x=x.to(torch.int32)),
        "ids rank 1": dict(good, ids=ids[:, 0]),
        "ids float": dict(good, ids=ids.float()),
        "ids rows != N": dict(good, ids=ids[:5]),
        "ids no columns": dict(good, ids=ids[:, :0]),
        "ids >= E": dict(good, ids=torch.where(ids == ids.max(), 4, ids)),
        "ids < -1": dict(good, ids=torch.where(ids == ids.max(), -2, ids)),
        "num_experts 0": dict(good, num_experts=0),
        "num_experts float": dict(good, num_experts=4.0),
        "x on another device": dict(good, x=x.to("meta")),
    }


def _moe_unpermute_bad(seed):
    good = make("moe_unpermute", N=6, D=8, E=4, top_k=2, seed=seed)
    y, p, weights = good["y_sorted"], good["p"], good["weights"]
    return {
        "p not a Permutation": dict(good, p=(p.x, p.offsets, p.source)),
        "y_sorted rank 1": dict(good, y_sorted=y[:, 0]),
        "y_sorted rows != M": dict(good, y_sorted=y[1:]),
        "y_sorted int": dict(good, y_sorted=y.to(torch.int32)),
        "weights shape": dict(good, weights=weights[:, :1]),
        "weights rank 1": dict(good, weights=weights.reshape(-1)),
        "weights int": dict(good, weights=weights.to(torch.int32)),
        "weights on another device": dict(good, weights=weights.to("meta")),
    }


def _grouped_gemm_bad(seed):
    good = make("grouped_gemm", N=12, E=4, top_k=2, K=8, Nout=16, seed=seed)
    x, w, offsets = good["x"], good["w"], good["offsets"]
    swapped = offsets.clone()
    swapped[1], swapped[2] = offsets[2] + 1, offsets[1]
    return {
        "x rank 3": dict(good, x=x[None]),
        "w rank 2": dict(good, w=w[0]),
        "w dtype != x": dict(good, w=w.half()),
        "w K != x K": dict(good, w=w[:, :, :4]),
        "offsets non-monotone": dict(good, offsets=swapped),
        "offsets wrong length": dict(good, offsets=torch.cat([offsets, offsets[-1:]])),
        "offsets end != M": dict(good, offsets=torch.cat([offsets[:-1], offsets[-1:] + 1])),
        "offsets start != 0": dict(good, offsets=torch.cat([offsets[:1] + 1, offsets[1:]])),
        "offsets float": dict(good, offsets=offsets.float()),
        "offsets rank 2": dict(good, offsets=offsets[None]),
        "w on another device": dict(good, w=w.to("meta")),
    }


def _moe_bad(seed):
    good = make("moe", N=6, D=8, E=4, I=4, top_k=2, seed=seed)
    x, weights, ids, w_gate_up, w_down = (good[k] for k in ("x", "weights", "ids", "w_gate_up", "w_down"))
    return {
        "x rank 1": dict(good, x=x[0]),
        "x int": dict(good, x=x.to(torch.int32)),
        "w_gate_up odd rows": dict(good, w_gate_up=w_gate_up[:, :7]),
        "w_gate_up D != x D": dict(good, w_gate_up=w_gate_up[:, :, :4]),
        "w_down shape": dict(good, w_down=w_down[:, :, :3]),
        "w_down experts": dict(good, w_down=w_down[:3]),
        "w_down dtype": dict(good, w_down=w_down.half()),
        "ids >= E": dict(good, ids=torch.where(ids == ids.max(), 4, ids)),
        "ids < -1": dict(good, ids=torch.where(ids == ids.max(), -2, ids)),
        "ids float": dict(good, ids=ids.float()),
        "ids rows != N": dict(good, ids=ids[:5], weights=weights[:5]),
        "weights shape": dict(good, weights=weights[:, :1]),
        "w_down on another device": dict(good, w_down=w_down.to("meta")),
    }


BAD_INPUTS = {"route": _route_bad, "moe_permute": _moe_permute_bad, "moe_unpermute": _moe_unpermute_bad,
              "grouped_gemm": _grouped_gemm_bad, "moe": _moe_bad}


@pytest.mark.parametrize("op, backend, case", [(op, name, case) for op in BAD_INPUTS
                                               for name in kernellab.backends(op, "cpu") for case in BAD_INPUTS[op](0)])
def test_bad_input_raises_value_error_and_writes_nothing(op, backend, case, seed):
    args = BAD_INPUTS[op](seed)[case]
    before = snapshot(args)
    try:
        kernellab.get(op, backend)(**args)
    except ValueError:
        pass
    else:
        pytest.fail(f"{op}[{backend}] accepted bad input: {case} (seed={seed})")
    assert_unchanged(args, before, f"{op}[{backend}], {case}: ")


def test_transformers_peer_holds_the_callers_weights():
    """The transformers peer wraps the given expert weights without copying them."""
    pytest.importorskip("transformers")
    from kernellab.peers.moe import _transformers_experts

    args = make("moe", N=4, E=4, top_k=2, D=16, I=8)
    experts = _transformers_experts(args["w_gate_up"], args["w_down"])
    assert experts.gate_up_proj.data_ptr() == args["w_gate_up"].data_ptr()
    assert experts.down_proj.data_ptr() == args["w_down"].data_ptr()


@pytest.mark.parametrize("backend", ["reference", *lab_backends("route")])
def test_route_breaks_ties_by_the_lower_expert(backend):
    """Equal probabilities (exact ties, as half-precision logits give): the lower expert index comes first in every
    backend (torch.topk leaves the order of ties unspecified: the reference and torch sort stably)."""
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 1.0, 0.5, 1.0], [0.0, 2.0, 1.0, 2.0, 2.0, 1.0, 0.0, 2.0]])
    _, ids = kernellab.route(logits, 5, renormalize=False, backend=backend)
    assert ids.tolist() == [[1, 2, 4, 0, 5], [1, 3, 4, 7, 2]]


@pytest.mark.parametrize("rows", [1, 2, 4, 5])
def test_onednn_streamed_and_blocked_experts(rows, seed):
    """Every token on one expert: up to STREAM_ROWS (4) rows take onednn's compiled streamed loop, more its blocked
    GEMM; D and 2 I not multiples of the four weight rows the stream reads at a time (its tail)."""
    if "onednn" not in kernellab.backends("moe"):
        pytest.skip("needs torch built with oneDNN, as its x86 CPU builds are")
    _check_moe("onednn", make("moe", N=rows, E=2, top_k=1, routing="one_expert", D=30, I=7, seed=seed), seed)


def test_onednn_streamed_and_blocked_experts_in_one_call(seed, monkeypatch):
    """Experts on both sides of STREAM_ROWS in one call (the streamed loop adds into y first, the GEMMs after), and
    slots with no expert (ids -1)."""
    if "onednn" not in kernellab.backends("moe"):
        pytest.skip("needs torch built with oneDNN, as its x86 CPU builds are")
    from kernellab.onednn import moe as onednn_moe

    args = make("moe", N=24, E=8, top_k=2, D=40, I=12, seed=seed, drop=0.2)
    counts = torch.bincount(args["ids"][args["ids"] >= 0].long(), minlength=8)
    monkeypatch.setattr(onednn_moe, "STREAM_ROWS", int(counts[counts > 0].min()))
    assert (counts > onednn_moe.STREAM_ROWS).any() and ((counts > 0) & (counts <= onednn_moe.STREAM_ROWS)).any()
    _check_moe("onednn", args, seed)
