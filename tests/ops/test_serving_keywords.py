"""The serving keywords of the linear attentions (docs/api.md "Serving keywords"): state pools read and written in
place, verify (output_intermediate_states) then kernellab.commit_states, chunk states, fused gating, gradients
through a pool and through fused gating, bad input refused with nothing written, and a backend lacking a keyword
refusing it by name.

Every test runs over every backend of each op that declares the keyword it needs (kernellab.registry.Backend.serving):
a backend that declares one later is tested here without a line changed. Shapes stay small (T <= 130, K = V = 16).
"""
import dataclasses

import pytest
import torch

import kernellab
from kernellab import registry, serving
from tests.helpers import lab_backends, rel_err
from tests.ops.test_layouts import relayout

OPS = serving.OPS
MODES = ("chunk", "recurrent")
K = 16
P = 6  # pool rows
TOL = 2e-5  # float32 against the float64 reference (relative)
# Backends that gate in their kernels (exp, log and sigmoid of the kernel's math, not torch's): the fused call
# matches the unfused one on torch's gates within a few float32 ulps of g, not bitwise.
KERNEL_GATING = ("triton", "cuda")


def declaring(op, *keywords):
    """The backends of op that run here (the reference included) and declare every keyword."""
    table = registry.registered(op)
    return [name for name in ["reference", *lab_backends(op)] if set(keywords) <= table[name].serving]


def cases(*keywords, modes=MODES):
    return [(op, name, mode) for op in OPS for name in declaring(op, *keywords) for mode in modes]


def gated(found):
    """The cases of `found` whose backend fuses all of its op's gating: A_log and dt_bias, and beta_logits where the
    op has a beta (every op but linear_attention)."""
    return [(op, name, mode) for op, name, mode in found
            if op == "linear_attention" or "beta_logits" in registry.registered(op)[name].serving]


def inputs(op, B, T, seed, dtype=torch.float32, fused=False, cu_seqlens=None):
    """q, k [B, T, Hk, K]; v [B, T, Hv, K] (Hv = 2 Hk but for linear attention); g [B, T, Hv] ([B, T, Hv, K] for
    kda), beta [B, T, Hv]; fused: g the raw gate input a and beta logits, with A_log [Hv] and dt_bias ([Hv], or
    [Hv, K] for kda)."""
    gen = torch.Generator().manual_seed(seed)
    Hk, Hv = (2, 2) if op == "linear_attention" else (1, 2)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    k = randn(B, T, Hk, K)
    args = dict(q=randn(B, T, Hk, K), k=k / k.norm(dim=-1, keepdim=True), v=randn(B, T, Hv, K))
    gate = (B, T, Hv, K) if op == "kda" else (B, T, Hv)
    if fused:
        args |= dict(g=randn(*gate), A_log=randn(Hv) * 0.5, dt_bias=randn(*((Hv, K) if op == "kda" else (Hv,))))
        if op != "linear_attention":
            args |= dict(beta=randn(B, T, Hv), beta_logits=True)
    else:
        args["g"] = -torch.rand(*gate, generator=gen, dtype=torch.float64).to(dtype) * 0.5
        if op != "linear_attention":
            args["beta"] = torch.rand(B, T, Hv, generator=gen, dtype=torch.float64).to(dtype)
    if cu_seqlens is not None:
        args["cu_seqlens"] = torch.tensor(cu_seqlens, dtype=torch.int32)
    return args


def pool_of(op, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randn(P, 2, K, K, generator=gen, dtype=torch.float64).to(dtype)


def call(op, backend, **args):
    return getattr(kernellab, op)(**args, backend=backend)


def rows(state_indices):
    return torch.tensor(state_indices, dtype=torch.int32)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("op, backend, mode", cases("state_indices", "output_state_indices"))
def test_pool_is_gather_then_scatter(op, backend, mode, packed, seed):
    """A pooled call equals the plain call on the gathered states (bitwise, same backend), writes exactly the rows
    indexed (to output_state_indices when given), zeros a padding slot's outputs, leaves other rows untouched;
    and matches the float64 reference."""
    lengths = [5, 0, 70] if packed else None
    args = inputs(op, 1 if packed else 3, 75 if packed else 70, seed,
                  cu_seqlens=None if lengths is None else [0, 5, 5, 75])
    pool = pool_of(op, seed)
    indices, outputs = rows([4, -1, 1]), rows([0, 3, 5])
    for out_rows in (None, outputs):
        written = pool.clone()
        extra = {} if out_rows is None else dict(output_state_indices=out_rows)
        o, S = call(op, backend, **args, initial_state=written, state_indices=indices, mode=mode, **extra)
        assert S is None
        live = torch.tensor([0, 2])
        if packed:  # the padding slot is the empty middle sequence
            plain = args | dict(cu_seqlens=torch.tensor([0, 5, 75], dtype=torch.int32))
        else:
            plain = {name: x[live] if x.ndim > 2 else x for name, x in args.items()}
        plain_o, plain_S = call(op, backend, **plain, initial_state=pool[indices[live].long()].contiguous(),
                                mode=mode, output_final_state=True)
        targets = (indices if out_rows is None else out_rows)[live].long()
        assert torch.equal(written[targets], plain_S), "the pool's written rows differ from the plain final states"
        untouched = [r for r in range(P) if r not in targets.tolist()]
        assert torch.equal(written[untouched], pool[untouched]), "a row not written changed"
        if packed:
            assert torch.equal(o[:, :5], plain_o[:, :5]) and torch.equal(o[:, 5:], plain_o[:, 5:])
        else:
            assert torch.equal(o[live], plain_o) and not o[1].any(), "a padding slot's outputs are not zeros"
        ref_pool = pool.clone()
        ref_o, _ = call(op, "reference", **args, initial_state=ref_pool, state_indices=indices, **extra)
        assert rel_err(o, ref_o) < TOL and rel_err(written, ref_pool) < TOL, f"seed={seed}"



@pytest.mark.parametrize("op, backend, mode", cases("state_indices", "output_state_indices"))
def test_an_output_row_of_minus_one_is_not_written(op, backend, mode, seed):
    """-1 in output_state_indices with no padding slot in state_indices: that sequence's final state is not
    written, the others are, as the reference writes them (a -1 there reached index_copy_ and raised)."""
    args = inputs(op, 2, 9, seed)
    pool = pool_of(op, seed)
    written, ref_pool = pool.clone(), pool.clone()
    extra = dict(state_indices=rows([0, 1]), output_state_indices=rows([2, -1]))
    o, _ = call(op, backend, **args, initial_state=written, mode=mode, **extra)
    ref_o, _ = call(op, "reference", **args, initial_state=ref_pool, **extra)
    untouched = [0, 1, 3, 4, 5]
    assert torch.equal(written[untouched], pool[untouched]), "a row not written changed"
    assert rel_err(o, ref_o) < TOL and rel_err(written, ref_pool) < TOL, f"seed={seed}"

@pytest.mark.parametrize("how", ["transposed", "sliced"])
@pytest.mark.parametrize("op, backend, mode", cases("state_indices"))
def test_a_strided_pool_is_read_and_written_through_its_view(op, backend, mode, how, seed):
    """A pool in another memory layout (column-major, or every other element of a NaN-poisoned buffer: a read or a
    write outside the view shows) is read and written in place through the view, as the reference does a
    contiguous one (issue 24's silent wrong results came from layouts)."""
    args = inputs(op, 2, 21, seed)
    pool, indices = pool_of(op, seed), rows([4, 1])
    written = relayout(pool, how)
    o, _ = call(op, backend, **args, initial_state=written, state_indices=indices, mode=mode)
    ref_pool = pool.clone()
    ref_o, _ = call(op, "reference", **args, initial_state=ref_pool, state_indices=indices)
    assert rel_err(o, ref_o) < TOL and rel_err(written, ref_pool) < TOL, f"seed={seed}"


BAD = {
    "a duplicate": dict(state_indices=rows([2, 2, 0])),
    "out of range": dict(state_indices=rows([0, P, 1])),
    "below -1": dict(state_indices=rows([0, -2, 1])),
    "float indices": dict(state_indices=torch.tensor([0.0, 1.0, 2.0])),
    "a wrong length": dict(state_indices=rows([0, 1])),
    "output duplicates": dict(state_indices=rows([0, 1, 2]), output_state_indices=rows([3, 3, -1])),
    "output out of range": dict(state_indices=rows([0, 1, 2]), output_state_indices=rows([3, 4, P])),
    "a final state too": dict(state_indices=rows([0, 1, 2]), output_final_state=True),
    "output rows alone": dict(output_state_indices=rows([0, 1, 2])),
    "two traces": dict(state_indices=rows([0, 1, 2]), output_intermediate_states=True, chunk_states_every=64),
    "chunk states not a multiple": dict(state_indices=rows([0, 1, 2]), chunk_states_every=48),
}
BAD_NAMES = {"a final state too": "output_final_state", "output rows alone": "output_state_indices",
             "two traces": "chunk_states_every", "chunk states not a multiple": "chunk_states_every"}


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("op, backend, mode", cases("state_indices", "output_state_indices", modes=("chunk",)))
def test_bad_indices_are_refused_with_nothing_written(op, backend, mode, bad, seed):
    args = inputs(op, 3, 8, seed)
    pool = pool_of(op, seed)
    before = pool.clone()
    name = BAD_NAMES.get(bad, "output_state_indices" if "output" in bad else "state_indices")
    with pytest.raises(ValueError, match=name):  # (a backend lacking a keyword refuses it by name)
        call(op, backend, **args, initial_state=pool, mode=mode, **BAD[bad])
    assert torch.equal(pool, before)


@pytest.mark.parametrize("op, backend, mode", cases("state_indices", "output_state_indices"))
def test_output_rows_that_others_read(op, backend, mode, seed):
    """output_state_indices writing rows that other sequences read (a rotation of the rows): every row is read
    before any is written, so the pool ends as the plain call's final states on the gathered rows (bitwise)."""
    args = inputs(op, 3, 9, seed)
    pool = pool_of(op, seed)
    indices, outputs = rows([4, 1, 0]), rows([1, 0, 4])
    written = pool.clone()
    call(op, backend, **args, initial_state=written, state_indices=indices, output_state_indices=outputs, mode=mode)
    _, plain_S = call(op, backend, **args, initial_state=pool[indices.long()], output_final_state=True, mode=mode)
    assert torch.equal(written[outputs.long()], plain_S), "a row was written before another sequence read it"
    assert torch.equal(written[[2, 3, 5]], pool[[2, 3, 5]])


def test_state_indices_need_a_pool(seed):
    with pytest.raises(ValueError, match="state_indices needs initial_state"):
        kernellab.gated_delta_rule(**inputs("gated_delta_rule", 3, 4, seed), state_indices=rows([0, 1, 2]))


def _decode_steps(op, backend, args, pool, indices, T):
    """T decode calls (one token per sequence, recurrent mode) on a copy of pool: the outputs [B, T, Hv, V] and the
    pool after each step (T + 1 snapshots, the first the pool as given)."""
    pool, snapshots, outputs = pool.clone(), [pool.clone()], []
    for t in range(T):
        step = {name: (x[:, t:t + 1] if name in ("q", "k", "v", "g", "beta") else x) for name, x in args.items()}
        o, _ = call(op, backend, **step, initial_state=pool, state_indices=indices, mode="recurrent")
        outputs.append(o)
        snapshots.append(pool.clone())
    return torch.cat(outputs, dim=1), snapshots


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("op, backend, mode", cases("state_indices", "output_intermediate_states",
                                                    modes=("recurrent",)))
def test_verify_then_commit_equals_decode_steps(op, backend, mode, fused, seed):
    """A verify call of T = 4 draft tokens per sequence leaves the pool untouched; committing k accepted tokens
    writes the state after token k: bitwise k decode steps in float32 on the same backend (their outputs too), the
    float64 reference within 1e-12."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    B, T = 4, 4
    args = inputs(op, B, T, seed, dtype=dtype, fused=fused)
    pool = pool_of(op, seed, dtype)
    indices = rows([3, -1, 0, 5])
    verified = pool.clone()
    o, S, trace = call(op, backend, **args, initial_state=verified, state_indices=indices,
                       output_intermediate_states=True, mode=mode)
    assert S is None and torch.equal(verified, pool), "a verify call wrote the pool"
    assert trace.states.shape == (B * T, 2, K, K) and trace.states.dtype == dtype
    assert trace.sequence.tolist() == [n for n in range(B) for _ in range(T)]
    assert trace.position.tolist() == list(range(1, T + 1)) * B
    assert not trace.states[T:2 * T].any() and not o[1].any(), "a padding slot's trace or outputs are not zeros"
    steps_o, snapshots = _decode_steps(op, backend, args, pool, indices, T)
    exact = backend != "reference"
    if exact:
        assert torch.equal(o, steps_o), "verify's outputs differ from the decode steps'"
    else:
        assert rel_err(o, steps_o) < 1e-12
    accepted = torch.tensor([2, 3, 0, 4])
    committed = kernellab.commit_states(pool.clone(), trace.states, indices, torch.arange(0, B * T + 1, T), accepted)
    for n, row in enumerate(indices.tolist()):
        if row < 0:
            continue
        expected = snapshots[int(accepted[n])][row]
        assert (torch.equal(committed[row], expected) if exact else
                (committed[row] - expected).abs().max() <= 1e-12 * expected.abs().max()), f"sequence {n}"
    untouched = [r for r in range(P) if r not in (3, 5)]  # row 0's sequence accepted nothing
    assert torch.equal(committed[untouched], pool[untouched])


@pytest.mark.parametrize("op, backend, mode", cases("output_intermediate_states"))
def test_intermediate_states_of_packed_sequences(op, backend, mode, seed):
    """Packed sequences: the trace holds the state after every token, packed like the tokens (the reference's
    per-token states), whatever the mode; with a plain initial state and its final state returned too."""
    args = inputs(op, 1, 11, seed, cu_seqlens=[0, 4, 5, 11])
    s0 = pool_of(op, seed)[:3]
    o, S, trace = call(op, backend, **args, initial_state=s0, output_final_state=True,
                       output_intermediate_states=True, mode=mode)
    ref_o, ref_S, ref = call(op, "reference", **{n: x.double() if x.is_floating_point() else x for n, x in
                                                  args.items()}, initial_state=s0.double(), output_final_state=True,
                             output_intermediate_states=True)
    assert trace.sequence.tolist() == [0] * 4 + [1] + [2] * 6
    assert trace.position.tolist() == [1, 2, 3, 4, 1, 1, 2, 3, 4, 5, 6]
    assert rel_err(trace.states, ref.states) < TOL and rel_err(o, ref_o) < TOL and rel_err(S, ref_S) < TOL
    assert torch.equal(trace.states[[3, 4, 10]], S), "the last state of each sequence is not its final state"


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("op, backend, mode", cases("chunk_states_every"))
def test_chunk_states_are_the_recurrent_states_there(op, backend, mode, packed, seed):
    """chunk_states_every=64: the states after 64, 128 tokens of each sequence long enough, equal to the
    reference's per-token states at those positions; outputs and final states as without it (bitwise)."""
    lengths = [130, 40, 64] if packed else [130, 130]
    args = inputs(op, 1 if packed else 2, sum(lengths) if packed else 130, seed,
                  cu_seqlens=[0, 130, 170, 234] if packed else None)
    s0 = pool_of(op, seed)[:len(lengths)]
    o, S, trace = call(op, backend, **args, initial_state=s0, output_final_state=True, chunk_states_every=64,
                       mode=mode)
    plain_o, plain_S = call(op, backend, **args, initial_state=s0, output_final_state=True, mode=mode)
    assert torch.equal(o, plain_o) and torch.equal(S, plain_S)
    expected = [(n, p) for n, length in enumerate(lengths) for p in range(64, length + 1, 64)]
    assert list(zip(trace.sequence.tolist(), trace.position.tolist())) == expected
    _, _, ref = call(op, "reference", **{n: x.double() if x.is_floating_point() else x for n, x in args.items()},
                     initial_state=s0.double(), output_intermediate_states=True)
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    at = [starts[n] + p - 1 for n, p in expected]
    assert rel_err(trace.states, ref.states[at]) < TOL, f"seed={seed}"


@pytest.mark.parametrize("op, backend, mode", gated(cases("A_log", "dt_bias")))
def test_fused_gating_equals_unfused(op, backend, mode, seed):
    """g = -exp(A_log) softplus(a + dt_bias) and beta = sigmoid(logits) inside the backend: the unfused call on
    the same backend with g and beta computed so in float32 (bitwise; within 1e-6 where the kernel gates,
    KERNEL_GATING), and the reference's within tolerance."""
    args = inputs(op, 2, 70, seed, fused=True)
    fused_o, fused_S = call(op, backend, **args, output_final_state=True, mode=mode)
    plain = {name: x for name, x in args.items() if name not in ("A_log", "dt_bias", "beta_logits")}
    dtype = torch.float64 if backend == "reference" else torch.float32  # the reference gates in float64
    decay = args["A_log"].to(dtype).exp()
    plain["g"] = -(decay[:, None] if op == "kda" else decay) * torch.nn.functional.softplus(
        args["g"].to(dtype) + args["dt_bias"].to(dtype))
    if "beta" in plain:
        plain["beta"] = torch.sigmoid(args["beta"].to(dtype))
    o, S = call(op, backend, **plain, output_final_state=True, mode=mode)
    if backend in KERNEL_GATING:
        assert rel_err(fused_o, o) < 1e-6 and rel_err(fused_S, S) < 1e-6, f"seed={seed}"
    else:
        assert torch.equal(fused_o, o) and torch.equal(fused_S, S)
    ref_o, ref_S = call(op, "reference", **{n: x.double() if isinstance(x, torch.Tensor) else x
                                            for n, x in args.items()}, output_final_state=True)
    assert rel_err(fused_o, ref_o) < TOL and rel_err(fused_S, ref_S) < TOL, f"seed={seed}"


def _grad_backends(*keywords):
    return [(op, name, mode) for op, name, mode in cases(*keywords) if name != "reference"
            and registry.registered(op)[name].backward is not None
            and torch.float64 in registry.registered(op)[name].dtypes]


@pytest.mark.parametrize("op, backend, mode", gated(_grad_backends("state_indices", "A_log", "dt_bias")))
def test_gradients_through_fused_gating_and_a_pool(op, backend, mode, seed):
    """Gradients of a pooled, fused-gating call (float64) against the reference's autograd: q, k, v, a, A_log,
    dt_bias, the beta logits and the pool (its rows read only); the pool's write carries none."""
    args = inputs(op, 3, 70, seed, dtype=torch.float64, fused=True)
    pool = pool_of(op, seed, torch.float64)
    indices = rows([4, -1, 1])
    weight = torch.randn(3, 70, 2, K, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    found = {}
    for name in (backend, "reference"):
        leaves = {n: x.clone().requires_grad_() for n, x in args.items() if isinstance(x, torch.Tensor)}
        leaf_pool = pool.clone().requires_grad_()
        o, _ = call(op, name, **(args | leaves), initial_state=leaf_pool, state_indices=indices, mode=mode)
        (o * weight).sum().backward()
        found[name] = {n: x.grad for n, x in leaves.items()} | {"pool": leaf_pool.grad}
        # the forward wrote the final states into the leaf's rows without autograd
        assert not torch.equal(leaf_pool.detach()[4], pool[4])
    for n, ref in found["reference"].items():
        got = found[backend][n]
        assert got is not None and rel_err(got, ref) < 1e-9, f"the gradient of {n}: seed={seed}"
    assert not found[backend]["pool"][[0, 2, 3, 5]].any(), "a pool row not read got a gradient"


@pytest.mark.parametrize("op, backend, mode", [
    (op, name, mode) for op, name, mode in gated(cases("state_indices", "A_log", "dt_bias")) if name != "reference"
    and registry.registered(op)[name].backward is not None and torch.float64 not in registry.registered(op)[name].dtypes])
def test_float32_gradients_through_fused_gating_and_a_pool(op, backend, mode, seed):
    """The same for the backends without float64 (triton): float32 inputs, the reference's float64 autograd on the
    same values as the yardstick, float32's gradient tolerance."""
    args = inputs(op, 2, 40, seed, fused=True)
    pool, indices = pool_of(op, seed), rows([4, 1])
    weight = torch.randn(2, 40, 2, K, generator=torch.Generator().manual_seed(seed + 2))
    found = {}
    for name, dtype in ((backend, torch.float32), ("reference", torch.float64)):
        leaves = {n: x.to(dtype).clone().requires_grad_() for n, x in args.items() if isinstance(x, torch.Tensor)}
        leaf_pool = pool.to(dtype).clone().requires_grad_()
        o, _ = call(op, name, **(args | leaves), initial_state=leaf_pool, state_indices=indices, mode=mode)
        (o * weight.to(dtype)).sum().backward()
        found[name] = {n: x.grad for n, x in leaves.items()} | {"pool": leaf_pool.grad}
    for n, ref in found["reference"].items():
        got = found[backend][n]
        assert got is not None and rel_err(got.double(), ref) < 1e-4, f"the gradient of {n}: seed={seed}"
    assert not found[backend]["pool"][[0, 2, 3, 5]].any(), "a pool row not read got a gradient"


@pytest.mark.parametrize("op", OPS)
def test_a_backend_lacking_a_keyword_refuses_it_by_name(op, seed):
    """The registry refuses a serving keyword that a backend does not declare (ValueError naming both), on every
    backend here that lacks one, and on a torch backend stripped of its declarations."""
    args = inputs(op, 3, 4, seed)
    table = registry.registered(op)
    for name in lab_backends(op):
        for keyword, value in (("state_indices", rows([0, 1, 2])), ("chunk_states_every", 64)):
            if keyword not in table[name].serving:
                pool = pool_of(op, seed)[:None if keyword == "state_indices" else 3]
                with pytest.raises(ValueError, match=f"{keyword}: backend '{name}'"):
                    call(op, name, **args, initial_state=pool, **{keyword: value})
    stripped = dataclasses.replace(table["torch"], serving=frozenset({"A_log", "dt_bias"}))
    with pytest.raises(ValueError, match="state_indices: backend 'torch'"):
        registry.check_serving(stripped, ["state_indices"])


def test_commit_states_refuses_bad_input_with_nothing_written(seed):
    pool = pool_of("gated_delta_rule", seed)
    states = torch.randn(8, 2, K, K)
    before = pool.clone()
    good = dict(states=states, state_indices=rows([1, 2]), cu_seqlens=torch.tensor([0, 4, 8]),
                accepted=torch.tensor([1, 4]))
    for bad, name in ((dict(accepted=torch.tensor([5, 0])), "accepted"), (dict(accepted=torch.tensor([-1, 0])),
                      "accepted"), (dict(state_indices=rows([1, 1])), "state_indices"),
                      (dict(cu_seqlens=torch.tensor([0, 4, 9])), "cu_seqlens"),
                      (dict(states=states.double()), "states")):
        with pytest.raises(ValueError, match=name):
            kernellab.commit_states(pool, **(good | bad))
        assert torch.equal(pool, before)
    kernellab.commit_states(pool, **good)
    assert torch.equal(pool[1], states[0]) and torch.equal(pool[2], states[7])
    assert torch.equal(pool[[0, 3, 4, 5]], before[[0, 3, 4, 5]])
