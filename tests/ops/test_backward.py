"""Gradients: every backend that has a backward against the reference's autograd in float64, over the forward's
edge cases; torch.autograd.gradcheck of the torch backward on tiny float64 shapes; forward outputs bitwise
unchanged by requires_grad; a backend without a backward raises BackendUnavailable; the backward contract
(kernellab/autograd.py) enforced.

Each gradient is that of a random projection of every differentiable output (the final state's included), drawn
from the case's seed: sum(o * R_o) + sum(S * R_S)."""
import inspect

import pytest
import torch

import kernellab
from bench.ops import OPS, make
from bench.ops.moe import routing_ids
from kernellab import ops, registry, serving
from tests.helpers import TOLERANCE, lab_backends, rel_err, to_float64, tolerance

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # many tiny ops (conftest.py)


RECURRENT = ("linear_attention", "gated_delta_rule")

# The gradients' edge cases: each op's family file's (OpSpec.gradient_cases, as input maker keywords plus the
# forward's mode). Backends with a backward of their own run every case: torch for every op, mkl where its backward
# sits beside its forward (the linear attentions' compiled loop). The others run the op's two spot checks
# (OpSpec.gradient_spot_checks): their backward is torch's (mkl's MoE ops: the same function) or torch's autograd
# (the peers), which the torch backend's full list of cases checks; these check the wiring.


def _cases(op):
    return list(OPS[op].gradient_cases)


def runs_every_case(op, name):
    backend = registry.registered(op)[name]
    own = backend.backward not in (None, registry.AUTOGRAD) and \
        backend.backward.partition(":")[0] == backend.target.partition(":")[0]
    return name == "torch" or (name == "mkl" and own)


def with_backward(op):
    """The backends of op that run on CPU tensors here and have a backward, the reference excluded."""
    table = registry.registered(op)
    return [name for name in lab_backends(op) if table[name].backward is not None]


def without_backward(op):
    """The backends of op that run on CPU tensors here (simulated ones included) and have no backward."""
    table = registry.registered(op)
    return [name for name in lab_backends(op, simulated=True) if table[name].backward is None]


def _differentiable(op, args):
    return [name for name in ops.OPS[op].differentiable if isinstance(args.get(name), torch.Tensor)]


def _leaves(op, args):
    """A copy of args whose differentiable tensors are fresh leaves that require grad."""
    return args | {name: args[name].detach().clone().requires_grad_(True) for name in _differentiable(op, args)}


def _outputs(op, out):
    """The differentiable outputs of a result (kernellab/ops.py's), as a list (None for a final state not
    returned)."""
    record = ops.OPS[op]
    flat = (out.x, out.offsets, out.source) if isinstance(out, kernellab.Permutation) else \
        out if isinstance(out, tuple) else (out,)
    named = dict(zip(record.outputs, flat, strict=True))
    return [named[name] for name in record.differentiable_outputs]


def projected_loss(op, out, seed):
    """sum over the differentiable outputs of (output * R), R drawn from seed (float64, the same for every run)."""
    gen = torch.Generator().manual_seed(seed)
    loss = 0
    for y in _outputs(op, out):
        if y is not None:
            loss = loss + (y.double() * torch.randn(y.shape, generator=gen, dtype=torch.float64)).sum()
    return loss


def gradients(op, backend, args, seed, **extra):
    """{input name: gradient} of projected_loss through backend; the forward's result too."""
    leaves = _leaves(op, args)
    out = getattr(kernellab, op)(**leaves, backend=backend, **extra)
    projected_loss(op, out, seed).backward()
    return {name: leaves[name].grad for name in _differentiable(op, leaves)}, out


def _make(op, case, seed, dtype=torch.float32):
    shape = dict(OPS[op].gradient_cases[case])
    mode = shape.pop("mode", None)
    args = make(op, **shape, dtype=dtype, seed=seed) | ({} if mode is None else dict(mode=mode))
    if op in ("moe", "moe_unpermute") and case == "dropped_slots":
        # the weight of a slot with no expert reaches neither y nor any gradient, even when it is NaN
        args["weights"][args["ids"] < 0 if op == "moe" else _dropped(args["p"])] = float("nan")
    return args


def _dropped(p):
    dropped = torch.ones(p.num_tokens * p.top_k, dtype=torch.bool)
    dropped[p.source.long()] = False
    return dropped.view(p.num_tokens, p.top_k)


def _on(args, device):
    """args with every tensor (a Permutation's fields too) on device."""
    def move(value):
        if isinstance(value, kernellab.Permutation):
            return kernellab.Permutation(*(move(t) for t in (value.x, value.offsets, value.source)), value.num_tokens,
                                       value.top_k)
        return value.to(device) if isinstance(value, torch.Tensor) else value

    return {key: move(value) for key, value in args.items()}


def check_gradients(op, backend, args, seed, tol=None, device="cpu", **extra):
    """backend's gradients (on args moved to device) against the reference's autograd on the same inputs in float64
    on the CPU, per input."""
    got, _ = gradients(op, backend, _on(args, device), seed, **extra)
    got = {name: None if grad is None else grad.cpu() for name, grad in got.items()}
    ref, _ = gradients(op, "reference", to_float64(args), seed)
    dtype = args[_differentiable(op, args)[0]].dtype  # q, x, y_sorted, router_logits
    tol = tolerance(dtype, device) if tol is None else tol
    for name, grad in got.items():
        assert grad is not None, f"{backend}: no gradient for {name} (seed={seed})"
        assert grad.dtype == args[name].dtype and grad.shape == args[name].shape, f"{backend}: {name}'s gradient"
        if op in ("moe", "moe_unpermute") and name == "weights":
            nan = ~torch.isfinite(args[name])
            assert (grad[nan] == 0).all(), f"{backend}: dropped slots' weights got a gradient (seed={seed})"
            grad, ref[name] = grad[~nan], ref[name][~nan]
        assert torch.isfinite(grad).all(), f"{backend}: non-finite gradient of {name} (seed={seed})"
        err = rel_err(grad, ref[name])
        assert err <= tol, f"{backend} {op}: d{name} relative error {err:.2e} > {tol:.0e} ({dtype}, seed={seed})"


CASES = [pytest.param(op, backend, case, id=f"{op}-{backend}-{case}")
         for op in registry.OPS for backend in with_backward(op)
         for case in (_cases(op) if runs_every_case(op, backend) else OPS[op].gradient_spot_checks)]


@pytest.mark.parametrize("op, backend, case", CASES)
def test_gradients_match_reference(op, backend, case, seed):
    check_gradients(op, backend, _make(op, case, seed), seed)


GPU_CASES = [pytest.param(op, case, dtype, id=f"{op}-{case}-{str(dtype).removeprefix('torch.')}")
             for op in registry.OPS for case in OPS[op].gradient_spot_checks
             for dtype in (torch.float32, torch.bfloat16)]


@pytest.mark.gpu
@pytest.mark.parametrize("op, case, dtype", GPU_CASES)
def test_torch_gradients_on_gpu(op, case, dtype, seed):
    """The torch backward on CUDA tensors (float32 within the tf32 tolerance, bfloat16 within its own)."""
    check_gradients(op, "torch", _make(op, case, seed, dtype), seed, device="cuda")


@pytest.mark.parametrize("op, backend", [(op, backend) for op in RECURRENT + ("moe", "grouped_gemm")
                                         for backend in with_backward(op) if runs_every_case(op, backend)])
@pytest.mark.slow
def test_half_precision_gradients(op, backend, seed):
    """float16 inputs: gradients in float16, within the forward's float16 tolerance."""
    case = "recurrent_initial_state" if op in RECURRENT else "dropped_slots"
    check_gradients(op, backend, _make(op, case, seed, torch.float16), seed)


@pytest.mark.parametrize("op, backend", [(op, backend) for op in RECURRENT for backend in with_backward(op)
                                         if runs_every_case(op, backend)])
@pytest.mark.parametrize("case", [dict(T=70, initial_state=True), dict(seqlens=[21, 1, 70], initial_state=True),
                                  dict(T=70, gate="strong", initial_state=True)], ids=["T70", "packed", "strong_decay"])
@pytest.mark.slow
def test_backward_over_several_groups_of_chunks(op, backend, case, seed):
    """chunk_size 2: more than a group of chunks (torch's CHUNK_GROUP, mkl's STATE_GROUP), so the backward's
    forward pass over groups and its recompute of each group in reverse both run."""
    if backend == "mkl":
        from kernellab.mkl.chunked import STATE_GROUP as group
    else:
        from kernellab.torch.linear_attention import CHUNK_GROUP as group

    args = make(op, seed=seed, **case)
    cu = args["cu_seqlens"]
    assert (args["q"].shape[1] if cu is None else int(cu.diff().max())) / 2 > group + 1
    check_gradients(op, backend, args | dict(mode="chunk"), seed, chunk_size=2)


@pytest.mark.parametrize("case", ["uniform", "dropped_slots", "skewed_empty_experts"])
def test_torch_moe_backward_host_and_device_grouping_agree(case, seed, monkeypatch):
    """The torch moe groups slots on the host for small N and by a device sort above: the same gradients, bitwise."""
    from kernellab.torch import moe as torch_moe

    args = _make("moe", case, seed)
    monkeypatch.setattr(torch_moe, "HOST_GROUPING_MAX_SLOTS", 10**9)
    on_host, _ = gradients("moe", "torch", args, seed)
    monkeypatch.setattr(torch_moe, "HOST_GROUPING_MAX_SLOTS", 0)
    on_device, _ = gradients("moe", "torch", args, seed)
    for name, grad in on_host.items():
        assert torch.equal(grad, on_device[name]), f"d{name} differs between host and device grouping"


@pytest.mark.parametrize("op", [op for op in RECURRENT if "mkl" in registry.registered(op)])
def test_mkl_backward_with_a_half_precision_state(op, seed):
    """state_dtype bfloat16: mkl's backward keeps its state in float32 and passes the rounding's gradient straight
    through, as torch's: the same gradients (bfloat16 initial state and final-state gradient included)."""
    args = _make(op, "packed_with_length_1", seed)
    args["initial_state"] = args["initial_state"].to(torch.bfloat16)
    got, _ = gradients(op, "mkl", args, seed, state_dtype=torch.bfloat16)
    ref, _ = gradients(op, "torch", args, seed, state_dtype=torch.bfloat16)
    for name, grad in got.items():
        assert grad.dtype == args[name].dtype, f"d{name}'s dtype {grad.dtype}"
        err = rel_err(grad, ref[name])  # the initial state's gradient within bfloat16's (its rounding to it)
        assert err <= TOLERANCE[grad.dtype], f"d{name}: {err:.2e} from torch's (seed={seed})"


@pytest.mark.parametrize("op", RECURRENT)
@pytest.mark.parametrize("which", ["o", "final_state"])
def test_gradient_from_one_output_only(op, which, seed):
    """The loss reads only o, or only the final state: the other output's gradient is None in the backward."""
    args = _make(op, "packed_with_length_1", seed)
    results = {}
    for backend, case_args in (("torch", args), ("reference", to_float64(args))):
        leaves = _leaves(op, case_args)
        o, state = getattr(kernellab, op)(**leaves, backend=backend)
        (o if which == "o" else state).double().square().sum().backward()
        results[backend] = {name: leaves[name].grad for name in _differentiable(op, leaves)}
    for name, grad in results["torch"].items():
        ref = results["reference"][name]  # None where the output read does not depend on the input (q, S)
        err = rel_err(grad, torch.zeros_like(grad) if ref is None else ref)
        assert err <= TOLERANCE[torch.float32], f"d{name} from {which} only: {err:.2e} (seed={seed})"


def test_permutation_carries_its_gradient_through_x(seed):
    """moe_permute -> grouped_gemm -> moe_unpermute: gradients reach x through p.x, and w and the weights, as the
    reference's composition gives them."""
    weights, ids = routing_ids(N=30, E=6, top_k=2, seed=seed, drop=0.2)
    gen = torch.Generator().manual_seed(seed)
    x, w = torch.randn(30, 16, generator=gen), torch.randn(6, 24, 16, generator=gen) * 0.25
    grads = {}
    for backend, dtype in (("torch", torch.float32), ("reference", torch.float64)):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (x, w, weights)]
        p = kernellab.moe_permute(leaves[0], ids, 6, backend=backend)
        y = kernellab.moe_unpermute(kernellab.grouped_gemm(p.x, leaves[1], p.offsets, backend=backend), p, leaves[2],
                                  backend=backend)
        projected_loss("moe", y, seed).backward()
        grads[backend] = [t.grad for t in leaves]
    for name, got, ref in zip(("x", "w", "weights"), *grads.values()):
        assert rel_err(got, ref) <= TOLERANCE[torch.float32], f"d{name}: {rel_err(got, ref):.2e} (seed={seed})"


# ------------------------------------------------------------------------------------------------ gradcheck

def _gradcheck(op, args, **extra):
    """torch.autograd.gradcheck of the torch backend on float64 args, with respect to every differentiable input."""
    names = _differentiable(op, args)

    def fn(*tensors):
        out = getattr(kernellab, op)(**(args | dict(zip(names, tensors))), backend="torch", **extra)
        return tuple(y for y in _outputs(op, out) if y is not None)

    leaves = tuple(args[name].detach().clone().requires_grad_(True) for name in names)
    # fast mode: the Jacobian's product with random vectors on both sides, against finite differences
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("case", [dict(T=5, initial_state=True), dict(seqlens=[2, 1, 3], initial_state=True),
                                  dict(T=5, use_qk_l2norm=False, beta="high")])
def test_gradcheck_gated_delta_rule(case, seed):
    args = make("gated_delta_rule", Hk=1, Hv=2, K=3, V=2, dtype=torch.float64, seed=seed, **case)
    _gradcheck("gated_delta_rule", args, mode="chunk", chunk_size=2)


@pytest.mark.parametrize("case", [dict(T=5, initial_state=True), dict(seqlens=[2, 1, 3], initial_state=True)])
def test_gradcheck_linear_attention(case, seed):
    args = make("linear_attention", H=2, K=3, V=2, dtype=torch.float64, seed=seed, **case)
    _gradcheck("linear_attention", args, mode="chunk", chunk_size=2)


@pytest.mark.parametrize("op", ("moe_permute", "moe_unpermute", "grouped_gemm", "moe", "attention"))
def test_gradcheck_moe_ops_and_attention(op, seed):
    """(route is left out: its softmax runs in float32 whatever the logits' dtype, too coarse for finite
    differences; its gradient is torch's autograd, checked against the reference above.)"""
    shape = dict(T=4, Hq=2, Hkv=1, D=4) if op == "attention" else dict(N=5, E=3, top_k=2, D=4)
    if op == "moe":
        shape |= dict(I=3, drop=0.2)
    elif op == "grouped_gemm":
        shape = dict(N=5, E=3, top_k=2, K=4, Nout=3)
    args = make(op, **shape, dtype=torch.float64, seed=seed)
    _gradcheck(op, to_float64(args))


# ------------------------------------------------------------------------------- the contract around the backward

@pytest.mark.parametrize("op", registry.OPS)
def test_forward_outputs_bitwise_unchanged_by_requires_grad(op, seed):
    """Every backend with a backward (and the reference): the same outputs, bit for bit, with and without inputs
    that require grad."""
    args = _make(op, OPS[op].gradient_spot_checks[1], seed)
    for backend in ["reference"] + with_backward(op):
        plain = _outputs(op, getattr(kernellab, op)(**args, backend=backend))
        tracked = _outputs(op, getattr(kernellab, op)(**_leaves(op, args), backend=backend))
        for a, b in zip(plain, tracked):
            assert b is None or b.requires_grad, f"{backend}: an output does not require grad"
            assert (a is None and b is None) or torch.equal(a, b.detach()), f"{backend}: outputs differ (seed={seed})"


NO_BACKWARD = [pytest.param(op, backend, id=f"{op}-{backend}") for op in registry.OPS
               for backend in without_backward(op)]


@pytest.mark.parametrize("op, backend", NO_BACKWARD)
def test_backend_without_backward_raises(op, backend, seed):
    """Asked for a gradient, a backend without a backward raises BackendUnavailable naming itself, before it
    runs."""
    args = _make(op, _cases(op)[1], seed)
    with pytest.raises(kernellab.BackendUnavailable, match=rf"backend '{backend}' of {op} has no backward"):
        getattr(kernellab, op)(**_leaves(op, args), backend=backend)


def test_inference_with_inputs_that_require_grad_runs_without_a_backward(seed):
    """Under torch.no_grad (or inference_mode) a call needs no gradient: a backend without a backward runs it."""
    args = _leaves("moe", _make("moe", "uniform", seed))
    with torch.no_grad():
        y = kernellab.moe(**args, backend="transformers")
    with torch.inference_mode():
        assert torch.equal(y, kernellab.moe(**args, backend="transformers"))
    assert not y.requires_grad


def test_auto_with_gradients_takes_a_backend_with_a_backward(monkeypatch, seed):
    registry.reset()
    table = registry._table()["grouped_gemm"]
    monkeypatch.setitem(table, "torch", registry.Backend("grouped_gemm", "torch", table["torch"].target, ("cpu",)))
    assert registry.auto_backend("grouped_gemm", "cpu") == "torch"
    chosen = registry.auto_backend("grouped_gemm", "cpu", torch.float32, grad=True)
    assert chosen != "torch" and table[chosen].backward is not None
    args = _make("grouped_gemm", "uniform", seed)
    got, _ = gradients("grouped_gemm", "auto", args, seed)
    assert got["x"] is not None and got["w"] is not None
    registry.reset()


def bad_backward(grads, x, w, offsets):
    """A backward that forgets w's gradient."""
    return dict(x=torch.zeros_like(x))


def test_a_backward_that_misses_a_gradient_is_an_error(monkeypatch, seed):
    table = registry._table()["grouped_gemm"]
    spy = registry.Backend("grouped_gemm", "spy", table["torch"].target, ("cpu",), backward=f"{__name__}:bad_backward")
    monkeypatch.setitem(table, "spy", spy)
    leaves = _leaves("grouped_gemm", _make("grouped_gemm", "uniform", seed))
    y = kernellab.grouped_gemm(**leaves, backend="spy")
    with pytest.raises(RuntimeError, match="backend 'spy' of grouped_gemm: its backward .* gave nothing for the "
                                           "gradient of w"):
        y.sum().backward()


def _backward_targets():
    for op in registry.OPS:
        for name, backend in registry.registered(op).items():
            if backend.backward not in (None, registry.AUTOGRAD):
                yield pytest.param(backend, id=f"{op}-{name}")


@pytest.mark.parametrize("backend", list(_backward_targets()))
def test_a_backward_takes_the_forwards_keywords(backend):
    """`<op>_backward(grads, **inputs, **extra)`: the forward's keywords, named (no **kwargs), after grads; but the
    serving keywords, which never reach a backward (kernellab.autograd runs the Function on the plain arguments)."""
    if backend.unavailable_reason() is not None:
        pytest.skip(f"{backend.name} cannot be imported here: {backend.unavailable_reason()}")
    forward = inspect.signature(backend.impl).parameters
    backward = inspect.signature(registry.resolve(backend.backward)).parameters
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in backward.values())
    assert list(backward)[0] == "grads" and set(backward) - {"grads"} == set(forward) - serving.KEYWORDS, \
        backend.backward


def test_every_op_has_a_torch_backward():
    """Every op the model trains through has a torch backward; the fp8 ops are inference ops (the reference alone
    differentiates them). Every reference differentiates by autograd."""
    for op in registry.OPS:
        fp8 = op.endswith("_fp8")
        assert (registry.registered(op)["torch"].backward is None) == fp8, op
        assert registry.registered(op)["reference"].backward == registry.AUTOGRAD
