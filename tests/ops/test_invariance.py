"""Determinism and batch invariance of every backend that runs on CPU tensors here, against its registration
(kernellab.registry.Backend: deterministic, batch_invariant, variance_note).

- determinism: two calls on the same inputs give bitwise equal outputs (every output: o and the final state,
  a Permutation's x, offsets and source);
- batch invariance: a part of a batch computed alone gives bitwise its part of the batch's outputs: a sequence
  of a batch of 3, and of 3 sequences of unequal lengths packed with cu_seqlens (initial states given; both
  modes where the backend has two), a batch row of attention, one token of route / moe_permute / moe_unpermute
  / moe (N = 1 against its row), one expert's rows of grouped_gemm (alone against its group's block of y).
Where a backend declares a property False its outputs must still agree within the dtype's tolerance, and its
variance_note says why. Triton runs here under its interpreter and numba.cuda under the simulator, on tiny
shapes: what they show is the kernels' own order of work, not the GPU's arithmetic."""
import inspect

import pytest
import torch

import kernellab
from bench.ops import OPS, make
from kernellab import ops, registry
from kernellab.types import Permutation
from tests.helpers import DTYPES, assert_close, lab_backends, tolerance

# Each op's batches: its family file's OpSpec.invariance, by how the backend reaches CPU tensors: natively ("cpu"),
# under Triton's interpreter ("interpret"), under the numba.cuda simulator ("cudasim", every thread in Python).
TOKENS = (0, 1, -1)  # the tokens of a batch checked alone (route, moe_permute, moe_unpermute, moe)


def _runs_on(backend):
    """How backend reaches CPU tensors here: "cpu", "interpret" or "cudasim"."""
    return next(place for place in ("cpu", "interpret", "cudasim") if place in backend.places)


def _modes(op, name):
    """The modes to run: the gated delta rule's two (an API keyword), linear attention's where the backend
    takes the keyword, else the one way the backend runs (None)."""
    if op in ("gated_delta_rule", "kda") or (
            op == "linear_attention" and "mode" in inspect.signature(registry.registered(op)[name].impl).parameters):
        return ("chunk", "recurrent")
    return (None,)


def _cases():
    """(op, backend, dtype, batch kind, mode) of every backend of every op that runs on CPU tensors here."""
    for op in registry.OPS:
        for name in lab_backends(op, simulated=True):
            backend = registry.registered(op)[name]
            for kind in OPS[op].invariance[_runs_on(backend)]:
                for dtype in DTYPES:
                    for mode in _modes(op, name) if dtype in backend.dtypes else ():
                        yield pytest.param(op, name, dtype, kind, mode, id="-".join(
                            [op, name, str(dtype).removeprefix("torch."), kind] + ([mode] if mode else [])))


CASES = list(_cases())


def _make(op, name, dtype, kind, seed):
    shape = OPS[op].invariance[_runs_on(registry.registered(op)[name])][kind]
    return make(op, **shape, dtype=dtype, seed=seed)


def _run(op, name, args, mode):
    """The outputs of op through backend name, by name (kernellab/ops.py's outputs)."""
    result = kernellab.get(op, name)(**args, **({} if mode is None else dict(mode=mode)))
    if isinstance(result, Permutation):
        result = (result.x, result.offsets, result.source)
    return dict(zip(ops.OPS[op].outputs, result if isinstance(result, tuple) else (result,), strict=True))


def _assert_same(got, expected, bitwise, dtype, what, seed):
    """got matches expected, output by output: bitwise where declared (and always for integer outputs), else within
    dtype's tolerance."""
    for key, want in expected.items():
        have = got[key]
        if want is None or have is None:
            assert have is None and want is None, f"{what}: {key} is None in one of the two"
        elif bitwise or not want.is_floating_point():
            assert have.shape == want.shape and have.dtype == want.dtype, f"{what}: {key} shape or dtype differs"
            diff = (have.double() - want.double()).abs().max().item() if have.numel() else 0.0
            assert torch.equal(have, want), (
                f"{what}: {key} not bitwise equal (max |difference| {diff:.3g}, seed={seed}); if that is the "
                f"backend's nature, declare it False with a variance_note in its registration")
        else:
            assert_close(have, want, dtype, f"{what}: {key}", seed, tolerance(dtype, "cpu"))


# ------------------------------------------------------------------------------------------------ the parts

def _sequences(args, kind):
    """(what, args of sequence i alone, its part of the outputs) for each sequence of a recurrent op's batch
    (kind "batch": batch row i; "packed": sequence i of cu_seqlens, alone in a row of its own)."""
    state = args["initial_state"]
    if kind == "batch":
        spans = [(f"batch row {i}", (slice(i, i + 1), slice(None))) for i in range(state.shape[0])]
    else:
        bounds = args["cu_seqlens"].tolist()
        spans = [(f"packed sequence {i} (tokens {s}:{e})", (slice(None), slice(s, e)))
                 for i, (s, e) in enumerate(zip(bounds, bounds[1:]))]
    parts = []
    for i, (what, rows) in enumerate(spans):
        alone = {key: value[rows] if key in ("q", "k", "v", "g", "beta") else value for key, value in args.items()}
        alone |= dict(initial_state=state[i:i + 1], cu_seqlens=None)
        parts.append((what, alone, lambda out, rows=rows, i=i: dict(o=out["o"][rows],
                                                                   final_state=out["final_state"][i:i + 1])))
    return parts


def _attention_rows(args):
    """(what, args of batch row i alone, its rows of o) for each row of attention's batch."""
    return [(f"batch row {i}", {key: value[i:i + 1] if key in ("q", "k", "v") else value
                                for key, value in args.items()},
             lambda out, i=i: dict(o=out["o"][i:i + 1])) for i in range(args["q"].shape[0])]


def _token_alone(p, n):
    """The rows of token n in Permutation p (in p's order: by expert, then slot) and the Permutation of token n
    alone (N = 1) that they make."""
    rows = torch.nonzero(p.source // p.top_k == n).squeeze(1)
    expert = torch.searchsorted(p.offsets[1:].long(), rows, right=True)
    counts = torch.bincount(expert, minlength=p.num_experts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(p.offsets.dtype)
    return rows, Permutation(p.x[rows], offsets, p.source[rows] - n * p.top_k, 1, p.top_k)


def _tokens(op, args):
    """(what, args of token n alone, its part of the outputs) for a few tokens n of an MoE op's batch."""
    N = next(args[key] for key in ("router_logits", "ids", "weights") if key in args).shape[0]
    parts = []
    for n in sorted({t % N for t in TOKENS}):
        one = slice(n, n + 1)
        if op == "route":
            alone = dict(args, router_logits=args["router_logits"][one])
            part = lambda out, one=one: dict(weights=out["weights"][one], ids=out["ids"][one])  # noqa: E731
        elif op == "moe_permute":
            alone = dict(args, x=args["x"][one], ids=args["ids"][one])

            def part(out, n=n):
                batch = Permutation(out["x"], out["offsets"], out["source"], N, args["ids"].shape[1])
                token = _token_alone(batch, n)[1]
                return dict(x=token.x, offsets=token.offsets, source=token.source)
        elif op == "moe_unpermute":
            rows, p = _token_alone(args["p"], n)
            alone = dict(y_sorted=args["y_sorted"][rows], p=p, weights=args["weights"][one])
            part = lambda out, one=one: dict(y=out["y"][one])  # noqa: E731
        else:  # moe
            alone = dict(args, x=args["x"][one], weights=args["weights"][one], ids=args["ids"][one])
            part = lambda out, one=one: dict(y=out["y"][one])  # noqa: E731
        parts.append((f"token {n} of {N}", alone, part))
    return parts


def _experts(args):
    """(what, args of expert e's rows alone, its group's block of y) for every expert with rows."""
    bounds = args["offsets"].tolist()
    parts = []
    for e, (start, end) in enumerate(zip(bounds, bounds[1:])):
        if end > start:
            alone_offsets = torch.tensor([0] * (e + 1) + [end - start] * (len(bounds) - e - 1), dtype=torch.int32)
            alone = dict(args, x=args["x"][start:end], offsets=alone_offsets)
            parts.append((f"expert {e} (rows {start}:{end})", alone,
                          lambda out, start=start, end=end: dict(y=out["y"][start:end])))
    return parts


def _parts(op, args, kind):
    """The parts of a batch by their kind (OpSpec.invariance's)."""
    if kind in ("batch", "packed"):
        return _sequences(args, kind)
    if kind == "rows":
        return _attention_rows(args)
    if kind == "expert":
        return _experts(args)
    return _tokens(op, args)


# ------------------------------------------------------------------------------------------------ the tests

@pytest.mark.parametrize("op, backend, dtype, kind, mode", CASES)
def test_deterministic(op, backend, dtype, kind, mode, seed):
    """Two calls on the same inputs: bitwise equal outputs where the backend declares determinism."""
    declared = registry.registered(op)[backend].deterministic
    args = _make(op, backend, dtype, kind, seed)
    first = _run(op, backend, args, mode)
    _assert_same(_run(op, backend, args, mode), first, declared, dtype, f"{op}[{backend}] second call", seed)


@pytest.mark.parametrize("op, backend, dtype, kind, mode", CASES)
def test_batch_invariant(op, backend, dtype, kind, mode, seed):
    """Each part of a batch (a sequence, a batch row, a token, an expert's rows) alone gives its part of the
    batch's outputs: bitwise where the backend declares batch invariance."""
    declared = registry.registered(op)[backend].batch_invariant
    args = _make(op, backend, dtype, kind, seed)
    batch = _run(op, backend, args, mode)
    parts = _parts(op, args, kind)
    assert len(parts) >= 2, "the batch must hold more than one part"
    for what, alone, part in parts:
        _assert_same(_run(op, backend, alone, mode), part(batch), declared, dtype, f"{op}[{backend}] {what} alone",
                     seed)


@pytest.mark.parametrize("op", registry.OPS)
def test_variance_is_explained(op):
    """Every backend that declares itself non-deterministic or not batch invariant says why; a note stands only
    beside such a declaration (a stale one would mislead)."""
    for name, backend in registry.registered(op).items():
        varies = not (backend.deterministic and backend.batch_invariant)
        assert bool(backend.variance_note.strip()) == varies, (
            f"{op}/{name}: deterministic={backend.deterministic}, batch_invariant={backend.batch_invariant}, "
            f"variance_note={backend.variance_note!r}: a note is needed exactly where one of them is False")
