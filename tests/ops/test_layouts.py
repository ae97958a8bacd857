"""Every op on tensors in every layout, against the float64 reference (issue 24: backends read transposed states
and gradients as row-major and returned silently wrong results).

One table (SAMPLES) lists each op's sample inputs and their tensor arguments, in the manner of PyTorch's OpInfo
sample inputs; each tensor argument is then given contiguous, transposed (column-major), sliced from a larger
poisoned buffer, and expanded (stride 0, where the values may repeat) to every CPU backend (triton under the
interpreter), and for the ops with a backward, every incoming gradient too. Values stay in the domain; the same
values, contiguous and in float64, give the reference. The unmarked cases (everything strided at once, per
backend) are the inner loop; one argument at a time is @slow, Triton's cases @interpreted.
"""
import pytest
import torch
import torch.nn.functional as F

import kernellab
from tests.helpers import assert_close, lab_backends, snapshot, assert_unchanged, to_float64
from kernellab import registry

LAYOUTS = ("transposed", "sliced", "expanded")
FLOAT = torch.float32


def relayout(x: torch.Tensor, how: str) -> torch.Tensor:
    """x's values (x's own when how keeps them) in another memory layout:
    transposed: column-major strides (every dimension's order reversed);
    sliced: every other element of a buffer twice as long in its last dimension, starting one in, the rest NaN
            (floats) or a huge index (ints), so that a read outside the view shows;
    expanded: stride 0 along the first dimension longer than 1 (the values of its first entry repeated: the
            values change, the caller compares with the reference on the same values)."""
    if how == "contiguous":
        return x.clone()
    if how == "transposed":
        order = tuple(range(x.ndim))[::-1]
        return x.permute(order).contiguous().permute(order)
    if how == "sliced":
        fill = float("nan") if x.is_floating_point() else 2 ** 30
        buffer = torch.full((*x.shape[:-1], 2 * x.shape[-1] + 1), fill, dtype=x.dtype)
        view = buffer[..., 1::2]
        view.copy_(x)
        return view
    if how == "expanded":
        dim = next((d for d, n in enumerate(x.shape) if n > 1), None)
        if dim is None:
            return x.clone()
        return x.narrow(dim, 0, 1).expand(x.shape)
    raise ValueError(how)


def _gdr(seed, T=24, cu=False):
    gen = torch.Generator().manual_seed(seed)
    B, Hk, Hv, K, V = (1 if cu else 2), 2, 4, 8, 8
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    args = dict(q=r(B, T, Hk, K), k=F.normalize(r(B, T, Hk, K), dim=-1), v=r(B, T, Hv, V),
                g=F.logsigmoid(r(B, T, Hv)), beta=torch.rand(B, T, Hv, generator=gen),
                initial_state=r(3 if cu else B, Hv, K, V) * 0.1, output_final_state=True, mode="chunk")
    if cu:
        args["cu_seqlens"] = torch.tensor([0, 5, 5 + T // 2, T], dtype=torch.int32)
    return args


def _la(seed, cu=False):
    args = _gdr(seed, cu=cu)
    args.pop("beta")
    H = args["q"].shape[2]
    args["v"], args["g"], args["initial_state"] = (args["v"][:, :, :H], args["g"][:, :, :H],
                                                   args["initial_state"][:, :H])
    return args


def _kda(seed, cu=False):
    args = _gdr(seed, cu=cu)
    K = args["q"].shape[-1]
    gen = torch.Generator().manual_seed(seed + 1)
    args["g"] = F.logsigmoid(torch.randn(*args["g"].shape, K, generator=gen))  # a decay per key channel
    return args


def _attention(seed):
    gen = torch.Generator().manual_seed(seed)
    return dict(q=torch.randn(2, 3, 4, 8, generator=gen), k=torch.randn(2, 9, 2, 8, generator=gen),
                v=torch.randn(2, 9, 2, 8, generator=gen), kv_lens=torch.tensor([6, 9], dtype=torch.int32))


def _ids(gen, N, top_k, E):
    ids = torch.stack([torch.randperm(E, generator=gen)[:top_k] for _ in range(N)]).to(torch.int32)
    ids[0, -1] = -1  # a slot routed to no expert
    return ids


def _moe(seed):
    gen = torch.Generator().manual_seed(seed)
    N, D, I, E, top_k = 5, 8, 6, 3, 2
    return dict(x=torch.randn(N, D, generator=gen), weights=torch.rand(N, top_k, generator=gen),
                ids=_ids(gen, N, top_k, E), w_gate_up=torch.randn(E, 2 * I, D, generator=gen) * 0.3,
                w_down=torch.randn(E, D, I, generator=gen) * 0.3)


def _grouped_gemm(seed):
    gen = torch.Generator().manual_seed(seed)
    # an empty group in the middle; K a multiple of 4 float32s (torch_grouped_mm's 16-byte rows)
    return dict(x=torch.randn(7, 8, generator=gen), w=torch.randn(3, 5, 8, generator=gen),
                offsets=torch.tensor([0, 3, 3, 7], dtype=torch.int32))


def _permute(seed):
    gen = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(6, 8, generator=gen), ids=_ids(gen, 6, 2, 4), num_experts=4)


def _unpermute(seed):
    args = _permute(seed)
    p = kernellab.moe_permute(**args, backend="reference")
    gen = torch.Generator().manual_seed(seed + 1)
    return dict(y_sorted=torch.randn(p.x.shape[0], 5, generator=gen), p=p,
                weights=torch.rand(*args["ids"].shape, generator=gen))


def _route(seed):
    return dict(router_logits=torch.randn(6, 8, generator=torch.Generator().manual_seed(seed)), top_k=3)


# op -> (its sample inputs (seed -> keywords), the tensor arguments to relayout, those that must not repeat along
# a dimension (indices, offsets: expanding them changes the structure, not the layout)).
SAMPLES = {
    "gated_delta_rule": (_gdr, ("q", "k", "v", "g", "beta", "initial_state")),
    "gated_delta_rule/cu_seqlens": (lambda s: _gdr(s, cu=True), ("q", "v", "g", "initial_state", "cu_seqlens")),
    "kda": (_kda, ("q", "k", "v", "g", "beta", "initial_state")),
    "kda/cu_seqlens": (lambda s: _kda(s, cu=True), ("k", "g", "beta", "initial_state", "cu_seqlens")),
    "linear_attention": (_la, ("q", "k", "v", "g", "initial_state")),
    "linear_attention/cu_seqlens": (lambda s: _la(s, cu=True), ("k", "v", "initial_state", "cu_seqlens")),
    "attention": (_attention, ("q", "k", "v", "kv_lens")),
    "route": (_route, ("router_logits",)),
    "moe_permute": (_permute, ("x", "ids")),
    "moe_unpermute": (_unpermute, ("y_sorted", "weights", "p.source")),
    "grouped_gemm": (_grouped_gemm, ("x", "w", "offsets")),
    "moe": (_moe, ("x", "weights", "ids", "w_gate_up", "w_down")),
}
STRUCTURAL = ("cu_seqlens", "kv_lens", "ids", "offsets", "p.source")
# the differentiable outputs whose incoming gradients are relayouted, per op with a backward here
GRADIENT_OUTPUTS = {"gated_delta_rule": ("o", "final_state"), "kda": ("o", "final_state"),
                    "linear_attention": ("o", "final_state"),
                    "grouped_gemm": ("y",), "moe": ("y",)}


def _op(sample):
    return sample.split("/")[0]


def _with_layout(args, name, how):
    """args with argument `name` (p.source: the Permutation's field) in layout `how`."""
    if name == "p.source":
        p = args["p"]
        return args | {"p": kernellab.Permutation(p.x, p.offsets, relayout(p.source, how), p.num_tokens, p.top_k)}
    return args | {name: relayout(args[name], how)}


def _dense(args):
    """The same values, contiguous (a Permutation's fields too)."""
    out = {}
    for key, value in args.items():
        if isinstance(value, torch.Tensor):
            value = value.contiguous()
        elif isinstance(value, kernellab.Permutation):
            value = kernellab.Permutation(value.x.contiguous(), value.offsets.contiguous(),
                                          value.source.contiguous(), value.num_tokens, value.top_k)
        out[key] = value
    return out


def _outputs(result):
    if isinstance(result, kernellab.Permutation):
        return (result.x, result.offsets, result.source)
    return result if isinstance(result, tuple) else (result,)


def check_layouts(sample, backend, layouts, seed):
    """Run sample's op through backend with the arguments in layouts ({name: how}) and compare every output with
    the reference on the same values, contiguous and in float64; the caller's tensors stay unwritten."""
    make, _ = SAMPLES[sample]
    op = _op(sample)
    args = make(seed)
    for name, how in layouts.items():
        args = _with_layout(args, name, how)
    before = snapshot(args)
    outs = _outputs(getattr(kernellab, op)(**args, backend=backend))
    assert_unchanged(args, before)
    refs = _outputs(getattr(kernellab, op)(**to_float64(_dense(args)), backend="reference"))
    for i, (out, ref) in enumerate(zip(outs, refs)):
        if out is None:
            continue
        if out.is_floating_point():
            assert_close(out, ref, FLOAT, f"{sample}[{backend}] output {i} with {layouts}", seed)
        else:
            assert torch.equal(out.cpu(), ref.cpu()), f"{sample}[{backend}] output {i} with {layouts} (seed={seed})"


def _params(samples, every_argument):
    """(sample, backend, layouts) cases: all arguments strided at once in each layout (the inner loop), or one
    argument at a time (slow)."""
    cases = []
    for sample in samples:
        op = _op(sample)
        _, names = SAMPLES[sample]
        for backend in lab_backends(op):
            marks = [pytest.mark.interpreted, pytest.mark.slow] if backend == "triton" else []
            for how in LAYOUTS:
                movable = [n for n in names if not (how == "expanded" and n in STRUCTURAL)]
                if every_argument:
                    for name in movable:
                        cases.append(pytest.param(sample, backend, {name: how}, id=f"{sample}-{backend}-{name}-{how}",
                                                  marks=marks + [pytest.mark.slow]))
                else:
                    cases.append(pytest.param(sample, backend, dict.fromkeys(movable, how),
                                              id=f"{sample}-{backend}-all-{how}", marks=marks))
    return cases


@pytest.mark.parametrize("sample, backend, layouts", _params(SAMPLES, every_argument=False))
def test_every_argument_strided(sample, backend, layouts, seed):
    check_layouts(sample, backend, layouts, seed)


@pytest.mark.parametrize("sample, backend, layouts", _params(SAMPLES, every_argument=True))
def test_one_argument_strided(sample, backend, layouts, seed):
    check_layouts(sample, backend, layouts, seed)


def _backward_params():
    cases = []
    for op in GRADIENT_OUTPUTS:
        for backend in lab_backends(op):
            if registry.registered(op)[backend].backward is None:
                continue
            marks = [pytest.mark.interpreted, pytest.mark.slow] if backend == "triton" else []
            for how in LAYOUTS:
                cases.append(pytest.param(op, backend, how, id=f"{op}-{backend}-{how}", marks=marks))
    return cases


@pytest.mark.parametrize("op, backend, how", _backward_params())
def test_incoming_gradients_strided(op, backend, how, seed):
    """The gradients reaching the backward (o's, the final state's) in each layout, the inputs strided too: every
    input's gradient matches the reference's for the same incoming gradients, given contiguous."""
    make, names = SAMPLES[op]
    args = make(seed)
    for name in names:
        if not (how == "expanded" and name in STRUCTURAL):
            args = _with_layout(args, name, how)
    gen = torch.Generator().manual_seed(seed + 7)

    def gradients(backend, inputs, incoming):
        leaves = {k: v.detach().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point()
                  else v for k, v in inputs.items()}
        outs = [o for o in _outputs(getattr(kernellab, op)(**leaves, backend=backend)) if o is not None]
        torch.autograd.backward(outs, incoming)
        return {k: v.grad for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad}

    dense_outs = _outputs(getattr(kernellab, op)(**args, backend="torch"))
    incoming = [relayout(torch.randn(o.shape, generator=gen), how) for o in dense_outs if o is not None]
    got = gradients(backend, args, incoming)
    ref = gradients("reference", to_float64(_dense(args)), [g.double().contiguous() for g in incoming])
    for name, grad in ref.items():
        assert_close(got[name], grad, FLOAT, f"{op}[{backend}] gradient of {name} ({how})", seed)
