"""kernellab.distributed.moe_ep on CPU: gloo worlds of 2 and 4 processes on the loopback (127.0.0.1), spawned here.

Starting a world costs seconds (each process imports torch), so one world per size runs every case of that size
in turn (module fixtures), and each test reads its case's results. Every rank builds the whole problem from the
same seed (all tokens, all experts), takes its share of both, runs the EP layer and compares with
single-process kernellab.moe on all experts; the workers send back numbers and messages only (a queue). A world
that outlives its deadline is killed and its unfinished cases fail: nothing hangs.
"""
import os
import queue
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kernellab
from bench.ops import make
from bench.ops.moe import routing_ids
from kernellab import registry
from tests.helpers import (assert_raised_everywhere, lab_backends, poisoned_allocations, raises, ranks, rel_err,
                           snapshot, tolerance, world_fixtures)

# A collective stuck longer than this raises in the worker; a world older than WORLD_DEADLINE is killed.
COLLECTIVE_TIMEOUT = timedelta(seconds=60)
WORLD_DEADLINE = 240.0
# Tiny layers: D hidden, I expert size; E experts in all.
D, I = 16, 8
# The spawned processes share the machine's cores: one thread each (several OpenMP / numba pools on two cores
# spin against each other: a 12-row index_add_ took 80 ms with two threads).
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
# The lab's CPU moe backends, run as the local experts (the reference too: tiny shapes). Peers are left out: they
# take the same path through kernellab.get, and importing transformers costs each process 5-15 s.
CPU_BACKENDS = ["reference"] + [name for name in lab_backends("moe", "cpu")
                                 if not registry.registered("moe")[name].peer]


# ---------------------------------------------------------------------------------------------- the EP problem
def _problem(world, seed, tokens, E, top_k, dtype=torch.float32, routing="uniform", drop=0.0,
             id_dtype=torch.int32, experts=None, drop_first=False):
    """All ranks' inputs: tokens[r] tokens on rank r, E experts; ids drawn among the first `experts` experts
    (default E: all of them); drop_first: every slot of the first token (rank 0's, else the next rank's) -1."""
    a = make("moe", N=sum(tokens), D=D, E=E, I=I, top_k=top_k, dtype=dtype, seed=seed, routing=routing, drop=drop,
                   id_dtype=id_dtype)
    if experts is not None:
        a["weights"], a["ids"] = routing_ids(sum(tokens), experts, top_k, seed=seed, routing=routing,
                                                    drop=drop, id_dtype=id_dtype)
    if drop_first:
        a["ids"][0] = -1
    return a


def _shard(a, world, rank, tokens):
    """Rank's share of the problem: its tokens and its contiguous E / world experts."""
    start = sum(tokens[:rank])
    rows = slice(start, start + tokens[rank])
    local = a["w_gate_up"].shape[0] // world
    experts = slice(rank * local, (rank + 1) * local)
    return dict(x=a["x"][rows], weights=a["weights"][rows], ids=a["ids"][rows], w_gate_up=a["w_gate_up"][experts],
                w_down=a["w_down"][experts]), rows


def _parity(world, rank, seed, tokens, E, top_k, backend="torch", reference=None, **problem):
    """moe_ep on rank's share against kernellab.moe on the whole problem (backend `reference`, default `backend`):
    the relative error, the dtype, whether a second call is bitwise equal and whether any caller tensor was
    written."""
    from kernellab.distributed import moe_ep

    a = _problem(world, seed, tokens, E, top_k, **problem)
    mine, rows = _shard(a, world, rank, tokens)
    before = snapshot(mine)
    with poisoned_allocations():
        y = moe_ep(**mine, backend=backend)
    again = moe_ep(**mine, backend=backend)
    ref = kernellab.moe(**a, backend=reference or backend)[rows]
    written = [key for key, value in before.items() if not torch.equal(value, mine[key])]
    return dict(err=rel_err(y, ref), shape=tuple(y.shape), expected_shape=tuple(ref.shape), dtype=str(y.dtype),
                finite=bool(torch.isfinite(y).all()), deterministic=torch.equal(y, again), written=written)


# ---------------------------------------------------------------------------------------------- the cases
def uneven_tokens(world):
    return [6, 3, 9, 5][:world]


def case_uniform(world, rank, seed):
    return _parity(world, rank, seed, uneven_tokens(world), E=8, top_k=2)


def case_skewed(world, rank, seed):
    return _parity(world, rank, seed, uneven_tokens(world), E=16, top_k=4, routing="skewed")


def case_no_local_tokens(world, rank, seed):
    tokens = [0, 7, 0, 4][:world] if world > 2 else [0, 9]
    return _parity(world, rank, seed, tokens, E=8, top_k=2)


def case_all_experts(world, rank, seed):
    """top_k = E, a third of the slots -1."""
    return _parity(world, rank, seed, uneven_tokens(world), E=2 * world, top_k=2 * world, drop=0.3)


def case_dropped(world, rank, seed):
    """Half the slots -1 (int64 ids), and every slot of rank 0's first token -1 (its output row is 0)."""
    return _parity(world, rank, seed, uneven_tokens(world), E=8, top_k=3, drop=0.5, id_dtype=torch.int64,
                   drop_first=True)


def case_bfloat16(world, rank, seed):
    return _parity(world, rank, seed, uneven_tokens(world), E=8, top_k=2, dtype=torch.bfloat16)


def case_halves_no_rows(world, rank, seed):
    """dispatch and combine by hand, with no slot on the last rank's experts (it receives nothing): rows sent
    and received per rank, and the parity of the result."""
    from kernellab.distributed import combine, dispatch

    E, tokens = 8, uneven_tokens(world)
    a = _problem(world, seed, tokens, E, top_k=2, drop=0.2, experts=E - E // world)
    mine, rows = _shard(a, world, rank, tokens)
    d = dispatch(mine["x"], mine["ids"], E)
    experts_out = kernellab.moe(d.x, torch.ones(d.ids.shape), d.ids, mine["w_gate_up"], mine["w_down"],
                              backend="torch")
    y = combine(experts_out, mine["weights"], d)
    ref = kernellab.moe(**a, backend="torch")[rows]
    local, first = E // world, rank * (E // world)
    here = a["ids"][(a["ids"] >= first) & (a["ids"] < first + local)] - first  # every rank's slots on my experts
    return dict(err=rel_err(y, ref), sent=d.permutation.x.shape[0], routed=int((mine["ids"] >= 0).sum()),
                send_splits=d.send_splits, received=d.x.shape[0], routed_here=here.numel(),
                local_ids_ok=torch.equal(torch.bincount(d.ids.view(-1).long(), minlength=local),
                                         torch.bincount(here.long(), minlength=local)))


def case_backends(world, rank, seed):
    """Each CPU moe backend as the local experts of one rank, `world` backends per call (rank r runs the r-th;
    ranks short of one run torch), against kernellab.moe's torch backend: each process compiles or imports only its
    own backends (mkl's numba loop: 8-30 s), beside the others'. Tiny shapes, -1 slots, a rank without tokens.
    Returns {backend: the parity of the call it ran in}."""
    tokens = [5, 0, 4, 3][:world]
    found = {}
    for start in range(0, len(CPU_BACKENDS), world):
        names = CPU_BACKENDS[start:start + world]
        mine = names[rank] if rank < len(names) else "torch"
        result = _parity(world, rank, seed, tokens, E=4, top_k=2, backend=mine, reference="torch", drop=0.2)
        found |= {name: dict(result, ranks=names) for name in names}
    return found


def case_bad_inputs(world, rank, seed):
    """Each bad input on ONE rank (the last one; rank 0 for wrong weights): what every rank raised. Then a good
    call, to show the world is still usable."""
    from kernellab.distributed import moe_ep

    tokens = uneven_tokens(world)
    a = _problem(world, seed, tokens, E=2 * world, top_k=2)
    good, _ = _shard(a, world, rank, tokens)
    last = rank == world - 1
    ids_out = good["ids"].clone()
    if last:
        ids_out[0, 0] = 2 * world
    narrow = dict(good, x=good["x"][:, :D - 4], w_gate_up=good["w_gate_up"][..., :D - 4],
                  w_down=good["w_down"][:, :D - 4]) if last else good
    uneven = dict(good, w_gate_up=good["w_gate_up"][:1], w_down=good["w_down"][:1]) if last else good
    cases = {
        "ids": lambda: moe_ep(**dict(good, ids=ids_out)),
        "D": lambda: moe_ep(**narrow),
        "experts": lambda: moe_ep(**uneven),
        "num_experts": lambda: moe_ep(**good, num_experts=2 * world + (1 if last else 0)),
        "num_experts_all": lambda: moe_ep(**good, num_experts=2 * world - 1),
        "weights": lambda: moe_ep(**dict(good, weights=good["weights"][:, :1] if rank == 0 else good["weights"])),
        "dtype": lambda: moe_ep(**{k: v.double() if last and k in ("x", "w_gate_up", "w_down") else v
                                   for k, v in good.items()}),
        "backend": lambda: moe_ep(**good, backend="no_such_backend" if last else "torch"),
    }
    raised = {name: raises(call) for name, call in cases.items()}
    raised["after"] = raises(lambda: moe_ep(**good))
    return raised


CASES = {name.removeprefix("case_"): fn for name, fn in globals().items() if name.startswith("case_")}
WORLD_CASES = {2: list(CASES), 4: [name for name in CASES if name not in ("backends", "bfloat16")]}


# ---------------------------------------------------------------------------------------------- the worlds
def _worker(rank, world, port, names, seed, results):
    """One rank: join the gloo world, run the cases in order (a barrier between them), report each. After a case
    raises, the world may be left inside a collective: the rank reports it and stops."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        for name in names:
            try:
                results.put((rank, name, CASES[name](world, rank, seed)))
            except Exception:  # noqa: BLE001 (reported to the test, which fails with it)
                results.put((rank, name, {"error": traceback.format_exc()}))
                break
            dist.barrier()
    finally:
        results.put((rank, None, None))
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_world(world, seed):
    """Spawn `world` ranks running every case of WORLD_CASES[world]: {case: [result of rank 0, 1, ...]}; a case a
    rank did not finish in time holds {"error": ...} for that rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    names = WORLD_CASES[world]
    port = _free_port()
    saved = {key: os.environ.get(key) for key in WORKER_ENV}
    os.environ.update(WORKER_ENV)  # the children's environment, read before they import numba or MKL
    try:
        procs = [ctx.Process(target=_worker, args=(rank, world, port, names, seed, results), daemon=True)
                 for rank in range(world)]
        for p in procs:
            p.start()
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    found = {name: [{"error": f"rank {rank} did not report (killed at the {WORLD_DEADLINE:.0f} s deadline or "
                              f"stopped after an earlier case failed)"} for rank in range(world)] for name in names}
    finished, deadline = set(), time.monotonic() + WORLD_DEADLINE
    while len(finished) < world and time.monotonic() < deadline:
        try:
            rank, name, result = results.get(timeout=1.0)
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                break
            continue
        if name is None:
            finished.add(rank)
        else:
            found[name][rank] = result
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()) + 5)
        if p.is_alive():
            p.kill()
            p.join()
    return found


world2, world4, world = world_fixtures(_run_world)


def _check_parity(result, what, seed, dtype=torch.float32):
    tol = 1e-5 if dtype == torch.float32 else tolerance(dtype, "cpu")
    assert result["shape"] == result["expected_shape"], f"{what}: shape {result['shape']} (seed={seed})"
    assert result["dtype"] == str(dtype), f"{what}: dtype {result['dtype']} (seed={seed})"
    assert result["finite"], f"{what}: non-finite or unwritten elements (seed={seed})"
    assert result["err"] <= tol, f"{what}: relative error {result['err']:.3e} > {tol:.0e} (seed={seed})"
    assert result["deterministic"], f"{what}: a second call differs bitwise (seed={seed})"
    assert not result["written"], f"{what}: wrote the caller's {result['written']} (seed={seed})"


# ---------------------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("case", ["uniform", "skewed", "no_local_tokens", "all_experts", "dropped"])
def test_moe_ep_matches_moe(world, case):
    per_rank, seed = ranks(world, case)
    for rank, result in enumerate(per_rank):
        _check_parity(result, f"{case}, rank {rank} of {world[0]}", seed)


def test_moe_ep_bfloat16(world2):
    per_rank, seed = ranks((2, *world2), "bfloat16")
    for rank, result in enumerate(per_rank):
        _check_parity(result, f"bfloat16, rank {rank}", seed, torch.bfloat16)


def test_rank_without_rows(world):
    """No slot goes to the last rank's experts: it receives no rows, every rank still gets moe's result; each
    rank sends exactly its routed slots (-1 slots stay home) and receives exactly the slots on its experts."""
    per_rank, seed = ranks(world, "halves_no_rows")
    size = world[0]
    assert per_rank[-1]["received"] == 0, f"the last rank received {per_rank[-1]['received']} rows (seed={seed})"
    assert all(r["send_splits"][-1] == 0 for r in per_rank), f"rows sent to the last rank (seed={seed})"
    for rank, result in enumerate(per_rank):
        what = f"rank {rank} of {size} (seed={seed})"
        assert result["err"] <= 1e-5, f"{what}: relative error {result['err']:.3e}"
        assert result["sent"] == result["routed"] == sum(result["send_splits"]), f"{what}: {result}"
        assert result["received"] == result["routed_here"], f"{what}: {result}"
        assert result["local_ids_ok"], f"{what}: the received rows' local expert ids miscount the slots routed here"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_local_backends(world2, backend):
    """backend as one rank's local experts (the other rank ran another): both ranks get moe's result."""
    per_rank, seed = ranks((2, *world2), "backends")
    for rank, result in enumerate(per_rank):
        _check_parity(result[backend], f"local backends {result[backend]['ranks']}, rank {rank}", seed)


BAD = {
    "ids": ("ValueError", r"ids must lie in \[-1, {E}\).*on rank {last}"),
    "D": ("ValueError", r"x must have the same D"),
    "experts": ("ValueError", r"w_gate_up must hold E / world experts on every rank.*do not split evenly"),
    "num_experts": ("ValueError", r"num_experts = {E_plus} is not divisible by the world size"),
    "num_experts_all": ("ValueError", r"num_experts = {E_minus} is not divisible by the world size"),
    "weights": ("ValueError", r"weights must have shape.*on rank 0"),
    "dtype": ("ValueError", r"x must have the same dtype on every rank"),
    "backend": ("BackendUnavailable", r"no_such_backend.*on rank {last}"),
}


@pytest.mark.parametrize("bad", list(BAD))
def test_bad_input_on_one_rank_raises_everywhere(world, bad):
    """A bad input on one rank: every rank raises the same error naming the argument, none hangs; the world
    then still runs a good call."""
    per_rank, seed = ranks(world, "bad_inputs")
    size = world[0]
    kind, pattern = BAD[bad]
    pattern = pattern.format(E=2 * size, last=size - 1, E_plus=2 * size + 1, E_minus=2 * size - 1)
    assert_raised_everywhere(per_rank, bad, kind, pattern, seed)
    for rank, result in enumerate(per_rank):
        assert result["after"] == ("none", ""), f"rank {rank}: the good call after the bad ones: {result['after']}"
