"""The expert-parallel exchange of kernellab.distributed, measured: dispatch and combine beside the all_to_all_single
they are built on, the EP layer (moe_ep) beside kernellab.moe in one process on the same tokens, and a projection
of Qwen3.5-397B's exchange at EP 8, 16 and 32 from the measured bytes per token.

    python -m bench.sweep --op moe_dispatch [--quick] [--preset Qwen3.5-35B-A3B] [--device cuda] [--backend torch numba]

`sweep(quick, device, out, backends, preset)` returns the rows (bench.sweep --op moe_dispatch calls it) and draws
moe_dispatch_exchange.png, moe_dispatch_layer.png and moe_dispatch_projection.png into out; `summary(rows)` is
the report's section (the target, the bytes per token against their model, the projection).

Each world size runs as a world of its own: W processes spawned here (torch.multiprocessing, "spawn"), joined
on 127.0.0.1 (gloo on CPU, one thread each; NCCL on a GPU machine, one GPU each: a world needs W GPUs), that run
every case of that size in turn; a world that outlives its deadline is killed and its unfinished cases get an
error row, and a collective stuck for COLLECTIVE_TIMEOUT raises in the worker: nothing hangs. kernellab.moe in one
process runs in a process of its own too, on the world's W x N tokens and all E experts, with min(W, cores)
threads on CPU (the cores the W one-thread ranks occupy; at most torch's threads in the caller, so --threads 1
gives it one: on a loaded machine two threads stall at their barriers).

Shapes (bench/ops/moe_dispatch.py, MOE_DISPATCH): world = W ranks, N = tokens per rank, D hidden, E experts in all (E / W per
rank, contiguous), I expert size, top_k, routing ("uniform": random router logits; "skewed": a Zipf-like bias
towards low expert ids, so rank 0's experts receive most rows). Every rank draws its own tokens, and its own
experts, from the case's seed and its rank.

Parts, one row each (shape = the case's shape string + ",part=PART"), timed with bench.timing.time_collective
(each call the slowest rank's wall-clock time, after a barrier, caches flushed before it):
- dispatch:          kernellab.distributed.dispatch (moe_permute, the counts' all_to_all, one host sync, the rows'
                     all_to_all with uneven splits);
- combine:           kernellab.distributed.combine (the rows back, moe_unpermute with the routing weights);
- dispatch+combine:  the two in one call, with no experts between them (the exchange's round trip);
- all_to_all:        all_to_all_single alone on buffers allocated beforehand, with dispatch's split sizes: the
                     transport's own rate on the same bytes;
- permute, unpermute: kernellab.moe_permute and kernellab.moe_unpermute alone on the same rows: the exchange's own
                     work beside the transport's;
- first_touch:       a fresh buffer of the received rows' size, allocated and written once (backend torch): what
                     dispatch's receive buffer, new every call, costs beyond the transport's copy;
- experts:           the local experts alone (kernellab.moe on the received rows);
- moe_ep:            the whole EP layer (check_inputs, dispatch, experts, combine);
- moe:               kernellab.moe in one process on the same tokens (all ranks' tokens, all experts).
- model:             model.generate's small random checkpoint on 1, 2 and 4 processes (MODEL_WORLDS; without
                     --preset), split tp = ep = W ways (model/parallel.py), greedy: the whole generate's time,
                     prefill_ms, tokens_per_s, decode_tokens_per_s, vs_one_process; an error row when its tokens
                     differ from one process's (model_rows).
The backend column: the moe_permute / moe_unpermute backend on dispatch, combine, dispatch+combine, permute and
unpermute; the process group's (gloo, nccl) on all_to_all; the moe backend on experts, moe_ep (whose exchange
uses the same name where it is a permute backend too, else "auto"), moe and model (the model's for every op that
has it). --backend NAME runs NAME for each of these that it has (default: every lab permute backend that runs
natively on the device, "auto"'s first, and "auto"'s moe backend: the layer costs seconds per call).
Columns beside the common ones: world, part, transport (gloo, nccl; "" for one process), bytes (the bytes one rank
sends in the part, mean over ranks, its own rows included: all_to_all_single copies them too; the rows permuted
for permute and unpermute), gbps (bytes / median time; twice the bytes for dispatch+combine), bytes_per_token
(bytes that leave a rank per token in the part: remote rows, plus dispatch's counts), of_all_to_all (the part's
GB/s over the all_to_all's, same run and bytes), imbalance (rows received by the busiest rank / the mean),
vs_one_process (moe's time / moe_ep's; the model's time on one process / on W), rel_err (moe_ep's first
CHECK_TOKENS tokens of every rank against kernellab.moe in one process), load (the 1-minute load average when the
case started), cores; on the model's rows batch, new_tokens, prefill_ms, tokens_per_s, decode_tokens_per_s (N: the
batch's prompt tokens).
"""
from __future__ import annotations

import contextlib
import math
import os
import queue
import socket
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

import kernellab
from bench import ops, timing
from bench.check import rel_err, tolerance
from bench.ops import MODELS, OPS
from bench.ops.moe import routing_ids
from bench.sweep import dtype_name, seed_of, sweep_backends, trusted_inputs

OP = "moe_dispatch"
EXCHANGE = ("dispatch", "combine", "dispatch+combine", "all_to_all")
LOCAL = ("permute", "unpermute")  # the exchange's own work beside the transport: moe_permute, moe_unpermute
FIRST_TOUCH = "first_touch"  # a fresh buffer of the received rows' size, allocated and written once
LAYER = ("experts", "moe_ep", "moe")
# A collective stuck longer than this raises in the worker; a world older than its deadline is killed.
COLLECTIVE_TIMEOUT = timedelta(seconds=120)
WORLD_DEADLINE_S = {True: 240.0, False: 1800.0}  # by quick
# moe_ep's output on each rank's first tokens is checked against kernellab.moe in one process.
CHECK_TOKENS = 8
# The layer parts run where one process can hold all experts and run them in seconds, by (device, quick): on CPU
# the grid's shapes, not Qwen3.5-35B's at 4096 tokens per rank (0.4 TFLOP in one process: a minute per timed call
# here); on a GPU every shape whose experts fit (bf16).
LAYER_MAX_FLOPS = {("cpu", True): 2e10, ("cpu", False): 2e11, ("cuda", True): 1e13, ("cuda", False): 1e15}
LAYER_MAX_WEIGHT_GB = {"cpu": 4.0, "cuda": 40.0}
# Spawned ranks share the machine's cores: one thread each (OpenMP / numba pools on shared cores spin against
# each other). Read by the children as they start, before they import torch.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}


def dtype_of(device: str) -> torch.dtype:
    """The exchange's dtype: float32 on CPU, bfloat16 on a GPU (the model's dtypes there)."""
    return torch.float32 if device == "cpu" else torch.bfloat16


def transport_of(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


# ---------------------------------------------------------------------------------------------- the problem

def tokens(shape: dict, rank: int, seed: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank's tokens: x [N, D] (unit normal), weights float32 and ids int32 [N, top_k] (bench.ops.moe.routing_ids:
    top_k distinct experts of E per token)."""
    N, D = shape["N"], shape["D"]
    weights, ids = routing_ids(N, shape["E"], shape["top_k"], seed=seed + rank, routing=shape["routing"])
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(seed + rank))
    return x.to(dtype).to(device), weights.to(device), ids.to(device)


def experts(shape: dict, rank: int, seed: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank's experts rank E / W .. (rank + 1) E / W - 1: w_gate_up [E / W, 2I, D], w_down [E / W, D, I], scaled
    like nn.Linear's init (drawn in float32: the layer's weights are GBs)."""
    local, D, I = shape["E"] // shape["world"], shape["D"], shape["I"]
    gen = torch.Generator().manual_seed(seed + 1_000_003 * (rank + 1))
    w_gate_up = torch.randn(local, 2 * I, D, generator=gen) * D ** -0.5
    w_down = torch.randn(local, D, I, generator=gen) * I ** -0.5
    return w_gate_up.to(dtype).to(device), w_down.to(dtype).to(device)


def layer_flops(shape: dict) -> float:
    """FLOPs of the layer on the world's W N tokens (bench.ops.moe.moe_cost's per-slot count, every slot routed)."""
    D, I = shape["D"], shape["I"]
    return shape["world"] * shape["N"] * shape["top_k"] * (6 * D * I + 5 * I + 2 * D)


def layer_affordable(shape: dict, quick: bool, device: str = "cpu") -> bool:
    """Whether the layer parts run on this case: one process holds all experts (in the device's dtype) and runs the
    world's tokens through them in seconds."""
    itemsize = torch.empty(0, dtype=dtype_of(device)).element_size()
    weight_gb = 3 * shape["E"] * shape["I"] * shape["D"] * itemsize / 2**30
    return layer_flops(shape) <= LAYER_MAX_FLOPS[(device, quick)] and weight_gb <= LAYER_MAX_WEIGHT_GB[device]


# ------------------------------------------------------------------------------------------------ one world

def _timed(t: timing.Timing) -> dict:
    return dict(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, repeats=t.repeats)


def _measure(case, world: int, rank: int, device, setting: dict) -> dict:
    """Every part of one case on this rank (the collectives with the other ranks), for each permute backend of
    setting["permute"] and moe backend of setting["backends"]. Returns, identical on every rank: {"times": {part
    or (part, backend): timing columns}, "stats": per-rank counts [W, 4] (rows sent, rows sent to other ranks, rows
    received, count bytes sent to other ranks), "heads": {backend: moe_ep's output on the first CHECK_TOKENS tokens
    of every rank, [W, CHECK_TOKENS, D] float64}, "load"}."""
    import torch.distributed as dist

    from kernellab.distributed import dispatch, moe_ep

    shape, dtype = case.shape, setting["dtype"]
    E, seed = shape["E"], seed_of(OP, case.key)
    load = os.getloadavg()[0]
    x, weights, ids = tokens(shape, rank, seed, dtype, device)
    time_it = lambda fn: _timed(timing.time_collective(  # noqa: E731
        fn, device=device, budget_s=setting["budget_s"], min_repeats=setting["min_repeats"]))
    times, heads = {}, {}
    with trusted_inputs():
        d = dispatch(x, ids, E)  # the split sizes, and the rows the local experts receive
        if case.key in setting["layer"]:  # first: the torch calls before any numba pool starts in this process
            w_gate_up, w_down = experts(shape, rank, seed, dtype, device)
            ones = torch.ones(d.ids.shape, dtype=torch.float32, device=device)
            for name, permute in setting["backends"].items():
                fn = kernellab.get("moe", name)
                layer = lambda: moe_ep(x, weights, ids, w_gate_up, w_down, backend=name,  # noqa: E731
                                       permute_backend=permute)
                times[("experts", name)] = time_it(lambda: fn(d.x, ones, d.ids, w_gate_up, w_down)
                                                   if d.x.shape[0] else None)
                times[("moe_ep", name)] = time_it(layer)
                head = layer()[:CHECK_TOKENS].contiguous()
                gathered = [torch.empty_like(head) for _ in range(world)]
                dist.all_gather(gathered, head)
                heads[name] = torch.stack(gathered).double().cpu().numpy()
            del w_gate_up, w_down
        times["all_to_all"] = _all_to_all(d, time_it)
        times[(FIRST_TOUCH, "torch")] = _first_touch(d, time_it)
        for name in setting["permute"]:
            times |= {(part, name): t for part, t in _exchange(x, weights, ids, E, name, time_it).items()}
    mine = torch.tensor([sum(d.send_splits), sum(d.send_splits) - d.send_splits[rank], d.x.shape[0],
                         (world - 1) * (E // world) * 8], dtype=torch.int64, device=device)
    stats = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(stats, mine)
    return dict(times=times, stats=torch.stack(stats).cpu().tolist(), heads=heads, load=load)


def _all_to_all(d, time_it) -> dict:
    """all_to_all_single alone with the split sizes of the Dispatched d, on buffers allocated here beforehand."""
    import torch.distributed as dist

    sent, received = torch.empty_like(d.permutation.x), torch.empty_like(d.x)
    return time_it(lambda: dist.all_to_all_single(received, sent, output_split_sizes=d.recv_splits,
                                                  input_split_sizes=d.send_splits))


def _first_touch(d, time_it) -> dict:
    """A fresh buffer of the received rows' size, allocated and written once: what dispatch's receive buffer
    (new every call) costs beyond the transport's copy (on CPU, a page fault per 4 KiB page of it)."""
    return time_it(lambda: torch.empty_like(d.x).fill_(0))


def _exchange(x, weights, ids, E: int, name: str, time_it) -> dict:
    """{part: timing} of dispatch, combine, the two in one call, moe_permute and moe_unpermute with the permute
    backend `name`."""
    from kernellab.distributed import combine, dispatch

    d = dispatch(x, ids, E, permute_backend=name)

    def round_trip():  # the exchange without experts: the received rows go straight back
        step = dispatch(x, ids, E, permute_backend=name)
        return combine(step.x, weights, step)

    return {"dispatch": time_it(lambda: dispatch(x, ids, E, permute_backend=name)),
            "combine": time_it(lambda: combine(d.x, weights, d)),
            "dispatch+combine": time_it(round_trip),
            "permute": time_it(lambda: kernellab.moe_permute(x, ids, E, backend=name)),
            "unpermute": time_it(lambda: kernellab.moe_unpermute(d.permutation.x, d.permutation, weights,
                                                              backend=name))}


def _worker(rank, world, port, transport, cases, setting, results):
    """One rank: join the world, measure every case in turn, rank 0 reporting each; a rank whose case raises
    reports the error and stops (the others would wait for it in a collective: the parent ends the world)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if transport == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(transport, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        for case in cases:
            try:
                found = _measure(case, world, rank, device, setting)
            except Exception:  # noqa: BLE001 - reported as the case's error row
                results.put((rank, case.key, {"error": f"rank {rank}: {traceback.format_exc(limit=4)}"}))
                break
            if rank == 0:
                results.put((rank, case.key, found))
    finally:
        results.put((rank, None, None))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _environment(values: dict):
    """os.environ with `values` set within the block (spawned children read it as they start)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def spawn(target, args: list[tuple], keys: list, deadline_s: float, env: dict) -> dict:
    """Run target(rank, *args[rank], results) in len(args) spawned processes (environment `env`) and collect what
    they put on `results`: (rank, key, result) per result, (rank, None, None) when a process is done; a result
    holding "error" ends them all (the others may be waiting for that one in a collective), as does the deadline.
    Returns {key: its result, or {"error": why} for each key of `keys` none was reported for}."""
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    with _environment(env):
        procs = [ctx.Process(target=target, args=(rank, *rank_args, results), daemon=True)
                 for rank, rank_args in enumerate(args)]
        for p in procs:
            p.start()
    found, finished, failed = {}, set(), False
    deadline = time.monotonic() + deadline_s
    while len(finished) < len(procs) and not failed and time.monotonic() < deadline:
        try:
            rank, key, result = results.get(timeout=1.0)
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                break
            continue
        if key is None:
            finished.add(rank)
        else:
            found.setdefault(key, result)
            failed = "error" in result
    for p in procs:  # done, or past the deadline, or failed: a short grace to exit, then killed
        p.join(timeout=5.0 if len(finished) == len(procs) else 1.0)
        if p.is_alive():
            p.kill()
            p.join()
    why = ("not measured: an earlier case failed" if failed else
           f"not measured: not finished by the {deadline_s:.0f} s deadline, or a process died")
    return {key: found.get(key, {"error": why}) for key in keys}


def run_world(world: int, transport: str, cases: list, setting: dict, deadline_s: float) -> dict:
    """Spawn `world` ranks on 127.0.0.1 that measure every case of `cases` (all of this world size): {case key:
    rank 0's result (see _measure), or {"error": ...}}."""
    port = _free_port()
    return spawn(_worker, [(world, port, transport, cases, setting)] * world, [case.key for case in cases],
                 deadline_s, WORKER_ENV if transport == "gloo" else {})


# ------------------------------------------------------------------------------------------- one process

def one_process(rank, cases: list, backends: list[str], device: str, dtype, budget_s: float, threads: int,
                results) -> None:
    """kernellab.moe in this process (spawned: rank 0 of one) on each case's W N tokens and E experts (the world's,
    from the same seeds), with `threads` torch threads. Puts (rank, (case key, backend), {"timing": columns,
    "heads": its output on the first CHECK_TOKENS tokens of every rank [W, c, D]}) per result."""
    torch.set_num_threads(threads)
    try:
        for case in cases:
            shape, seed = case.shape, seed_of(OP, case.key)
            world, N = shape["world"], shape["N"]
            parts = [tokens(shape, r, seed, dtype, device) for r in range(world)]
            x, weights, ids = (torch.cat(columns) for columns in zip(*parts))
            shards = [experts(shape, r, seed, dtype, device) for r in range(world)]
            w_gate_up, w_down = (torch.cat(columns) for columns in zip(*shards))
            del parts, shards
            for name in backends:
                try:
                    fn = kernellab.get("moe", name)
                    heads = fn(x, weights, ids, w_gate_up, w_down).view(world, N, -1)[:, :CHECK_TOKENS]
                    with trusted_inputs():
                        t = timing.time_call(lambda: fn(x, weights, ids, w_gate_up, w_down), device, budget_s)
                    found = {"timing": _timed(t), "heads": heads.double().cpu().numpy()}
                except Exception:  # noqa: BLE001 - the case's error row
                    found = {"error": traceback.format_exc(limit=4)}
                results.put((rank, (case.key, name), found))
    finally:
        results.put((rank, None, None))


# ------------------------------------------------------------------------------------------------- the model

MODEL = "model"  # the part: the small random model on W processes, split tp = ep = W ways
MODEL_WORLDS = (1, 2, 4)  # its 4 linear-attention value heads, 4 query heads and 8 experts split 4 ways at most
MODEL_RUN = {True: dict(batch=2, prompt=16, new=8), False: dict(batch=4, prompt=128, new=32)}  # by quick


def _model_worker(rank, world, port, transport, checkpoint, setting, results):
    """One rank of the model split tp = ep = world ways (world 1: the model alone, no process group): times greedy
    generate of setting's batch of random prompts with 1 new token (the prefill and its token) and with `new`, and
    puts (rank, MODEL, {"first", "whole": timing columns, "tokens": the new tokens [batch, new], "load"}) from rank
    0, or the error from any rank."""
    import torch.distributed as dist

    import model

    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if transport == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group(transport, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=COLLECTIVE_TIMEOUT)
    try:
        try:
            load = os.getloadavg()[0]
            m = model.from_pretrained(checkpoint, backend=setting["backend"], device=device, tp=world, ep=world)
            gen = torch.Generator().manual_seed(seed_of(OP, MODEL))
            prompts = torch.randint(0, m.config.vocab_size, (setting["batch"], setting["prompt"]), generator=gen)
            prompts = prompts.to(device)
            if world > 1:
                time_it = lambda fn: _timed(timing.time_collective(  # noqa: E731
                    fn, device=device, budget_s=setting["budget_s"], min_repeats=setting["min_repeats"]))
            else:
                time_it = lambda fn: _timed(timing.time_call(fn, device, setting["budget_s"]))  # noqa: E731
            found = dict(first=time_it(lambda: m.generate(prompts, 1)),
                         whole=time_it(lambda: m.generate(prompts, setting["new"])),
                         tokens=m.generate(prompts, setting["new"])[:, setting["prompt"]:].cpu().tolist(), load=load)
        except Exception:  # noqa: BLE001 - the part's error row
            found = {"error": f"rank {rank}: {traceback.format_exc(limit=4)}"}
        if rank == 0 or "error" in found:
            results.put((rank, MODEL, found))
    finally:
        results.put((rank, None, None))
        if world > 1:
            dist.destroy_process_group()


def model_rows(quick: bool, device: str, backend: str, deadline_s: float, worlds=None) -> list[dict]:
    """The model part: model.generate's small random checkpoint on each world of `worlds` (default MODEL_WORLDS,
    those the machine runs), split tp = ep = W ways, backend `backend` for every op that has it, greedy, one thread
    per process. One row per world (shape: the model's MoE shape, N = the batch's prompt tokens, routing "model":
    its own router's), with the time of the whole generate (median_ms), prefill_ms (generate of one token),
    tokens_per_s (new tokens of the batch / the whole time), decode_tokens_per_s (the tokens after the first / the
    time after the prefill), vs_one_process; an error when its tokens differ from one process's."""
    from model.config import ModelConfig
    from model.generate import default_checkpoint

    checkpoint = default_checkpoint()  # written here once, read by every rank
    cfg = ModelConfig.from_folder(checkpoint)
    run, transport = MODEL_RUN[quick], transport_of(device)
    setting = dict(run, backend=backend, budget_s=0.1 if quick else 1.0, min_repeats=3 if device == "cpu" else 10)
    shape = dict(N=run["batch"] * run["prompt"], D=cfg.hidden_size, E=cfg.num_experts, I=cfg.moe_intermediate_size,
                 top_k=cfg.num_experts_per_tok, routing=MODEL)
    worlds, skipped = _runnable_worlds(MODEL_WORLDS if worlds is None else worlds, device)
    if skipped:
        print(f"note: the model on {', '.join(map(str, skipped))} processes needs as many GPUs: not run", flush=True)
    rows, one = [], None
    for world in worlds:
        print(f"  {OP}: the model on {_ranks(world)} (tp = ep = {world}, {transport if world > 1 else 'alone'})",
              flush=True)
        found = spawn(_model_worker, [(world, _free_port(), transport, str(checkpoint), setting)] * world, [MODEL],
                      deadline_s, WORKER_ENV if device == "cpu" else {})[MODEL]
        key = ops.Case(OP, dict(world=world) | shape).key
        row = dict(op=OP, device=device, dtype=cfg.dtype or "float32", preset="",
                   transport=transport if world > 1 else "", threads=1, cores=os.cpu_count(), backend=backend,
                   shape=f"{key},part={MODEL}", part=MODEL, world=world, **shape,
                   batch=run["batch"], new_tokens=run["new"])
        if "error" in found:
            rows.append(dict(row, error=found["error"].strip().splitlines()[-1][:300]))
            continue
        whole, first = found["whole"], found["first"]["median_ms"]
        row |= dict(whole, prefill_ms=first, load=found["load"],
                    tokens_per_s=run["batch"] * run["new"] / (whole["median_ms"] / 1e3),
                    decode_tokens_per_s=run["batch"] * (run["new"] - 1) / max(whole["median_ms"] - first, 1e-9) * 1e3)
        if one is None and world == 1:
            one = (found["tokens"], whole["median_ms"])
        if one is not None:
            row["vs_one_process"] = one[1] / whole["median_ms"]
            if found["tokens"] != one[0]:
                row["error"] = f"greedy tokens differ from one process's: {found['tokens']} != {one[0]}"
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------------ rows

def _case_rows(case, found: dict, device: str, dtype, transport: str, permute: list[str]) -> list[dict]:
    """The rows of one case from its world's result (see the module's docstring for the columns); permute: the
    permute backends it ran (an error row for each of their parts when the world failed)."""
    base = dict(op=OP, device=device, dtype=dtype_name(dtype), preset=case.preset, transport=transport, threads=1,
                cores=os.cpu_count(), **case.shape)
    part_row = lambda part, backend, **more: dict(base, backend=backend, shape=f"{case.key},part={part}",  # noqa: E731
                                                  part=part, **more)
    if "error" in found:
        error = found["error"].strip().splitlines()[-1][:300]
        return [part_row("all_to_all", transport, error=error), part_row(FIRST_TOUCH, "torch", error=error)] + [
            part_row(part, name, error=error) for name in permute for part in EXCHANGE[:3] + LOCAL]
    stats = found["stats"]  # per rank: rows sent, rows sent to other ranks, rows received, count bytes sent away
    world, N, D = case.shape["world"], case.shape["N"], case.shape["D"]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    row_bytes = sum(s[0] for s in stats) / world * D * itemsize
    away = sum(s[1] for s in stats) / world * D * itemsize / max(N, 1)
    counts = sum(s[3] for s in stats) / world / max(N, 1)
    imbalance = max(s[2] for s in stats) / max(sum(s[2] for s in stats) / world, 1)
    times, rows = found["times"], []
    a2a_gbps = row_bytes / (times["all_to_all"]["median_ms"] * 1e6)
    moved = dict(dispatch=(row_bytes, away + counts), combine=(row_bytes, away), all_to_all=(row_bytes, away),
                 permute=(row_bytes, 0.0), unpermute=(row_bytes, 0.0), first_touch=(row_bytes, 0.0))
    moved["dispatch+combine"] = (2 * row_bytes, 2 * away + counts)
    for key, t in times.items():
        part, name = (key, transport) if isinstance(key, str) else key
        more = dict(load=found["load"])
        if part in moved:
            nbytes, per_token = moved[part]
            gbps = nbytes / (t["median_ms"] * 1e6)
            more.update(bytes=nbytes, gbps=gbps, bytes_per_token=per_token, imbalance=imbalance,
                        of_all_to_all=gbps / a2a_gbps if part in EXCHANGE[:3] else math.nan)
        rows.append(part_row(part, name, **t, **more))
    return rows


def _one_process_row(case, name: str, found: dict, device: str, dtype, threads: int) -> dict:
    """The row of kernellab.moe in one process on a case's tokens."""
    row = dict(op=OP, device=device, dtype=dtype_name(dtype), preset=case.preset, transport="", threads=threads,
               cores=os.cpu_count(), backend=name, shape=f"{case.key},part=moe", part="moe", **case.shape)
    if "error" in found:
        return dict(row, error=found["error"].strip().splitlines()[-1][:300])
    return dict(row, **found["timing"])


def _check(ep: dict, one: dict, ep_heads, heads, dtype, device: str) -> None:
    """moe_ep's row gets its parity against kernellab.moe in one process (the first CHECK_TOKENS tokens of every
    rank) and vs_one_process; an error when the parity fails."""
    err = rel_err(torch.from_numpy(ep_heads), torch.from_numpy(heads))
    ep.update(rel_err=err, checked_against=f"kernellab.moe in one process ({ep['backend']}), the first {CHECK_TOKENS} "
                                           f"tokens of every rank", vs_one_process=one["median_ms"] / ep["median_ms"])
    if err > tolerance(dtype, device):
        ep["error"] = f"parity vs one process: rel_err {err:.2e} > {tolerance(dtype, device):.0e}"


def permute_backends(device: str) -> list[str]:
    """The exchange's default moe_permute / moe_unpermute backends: "auto"'s choice first, then every other lab
    backend that runs natively on the device (bench.sweep's choice, less the reference's loops and peers)."""
    registered = kernellab.registry.registered("moe_permute")
    lab = [n for n in sweep_backends("moe_permute", device, None) if n != "reference" and not registered[n].peer]
    auto = kernellab.registry.auto_backend("moe_permute", device)
    return [auto] + [n for n in lab if n != auto]


def _runnable_worlds(worlds, device: str) -> tuple[list[int], list[int]]:
    """(world sizes this machine runs, those it cannot): NCCL needs one GPU per rank."""
    if device != "cuda":
        return sorted(worlds), []
    gpus = torch.cuda.device_count()
    return sorted(w for w in worlds if w <= gpus), sorted(w for w in worlds if w > gpus)


def sweep(quick: bool = False, device: str = "cpu", out: str | Path = "reports/cpu", backends=None,
          preset: str | None = None) -> list[dict]:
    """Rows of every case of bench.ops' MOE_DISPATCH on `device` (see the module's docstring): a world per world
    size, then kernellab.moe in one process; draws the three PNGs into out. backends: the moe backends of the layer
    parts (default: "auto"'s choice on the device); preset: only that model's shapes."""
    out = Path(out)
    dtype, transport = dtype_of(device), transport_of(device)
    runs = {op: kernellab.backends(op, device) for op in ("moe", "moe_permute")}
    permute = [n for n in backends or () if n in runs["moe_permute"]] or permute_backends(device)
    names = [n for n in backends or () if n in runs["moe"]] or [kernellab.registry.auto_backend("moe", device)]
    cases = OPS[OP].cases(device, quick, preset)
    worlds, skipped = _runnable_worlds({case.shape["world"] for case in cases}, device)
    if skipped:
        print(f"note: worlds of {', '.join(map(str, skipped))} ranks need as many GPUs; this machine has "
              f"{torch.cuda.device_count()}: not run", flush=True)
    layer = [case for case in cases if case.shape["world"] in worlds and layer_affordable(case.shape, quick, device)]
    budget_s, deadline_s = (0.1 if quick else 1.0), WORLD_DEADLINE_S[quick]
    # a layer backend that also permutes does both (as the model's --backend does); the others permute with "auto"
    setting = dict(dtype=dtype, budget_s=budget_s, min_repeats=3 if device == "cpu" else 10, permute=permute,
                   backends={name: name if name in runs["moe_permute"] else "auto" for name in names},
                   layer={case.key for case in layer})
    rows, ep = [], {}
    for world in worlds:
        here = [case for case in cases if case.shape["world"] == world]
        print(f"  {OP}: a world of {world} ({transport}), {len(here)} cases (permute: {', '.join(permute)}), "
              f"{sum(c in layer for c in here)} with the layer ({', '.join(names)})", flush=True)
        found = run_world(world, transport, here, setting, deadline_s)
        for case in here:
            rows += _case_rows(case, found[case.key], device, dtype, transport, permute)
            for name, heads in found[case.key].get("heads", {}).items():
                ep[(case.key, name)] = (next(r for r in rows if r["shape"] == f"{case.key},part=moe_ep"
                                             and r["backend"] == name), heads)
    if layer:
        print(f"  {OP}: kernellab.moe in one process, {len(layer)} cases", flush=True)
        # the cores the W one-thread ranks occupy, at most the threads torch was given here (--threads)
        threads = min(max(case.shape["world"] for case in layer), os.cpu_count() or 1, torch.get_num_threads())
        keys = [(case.key, name) for case in layer for name in names]
        single = spawn(one_process, [(layer, names, "cuda:0" if device == "cuda" else "cpu", dtype, budget_s,
                                      threads)], keys, deadline_s, WORKER_ENV if device == "cpu" else {})
        by_key = {case.key: case for case in layer}
        for (key, name), found in single.items():
            rows.append(_one_process_row(by_key[key], name, found, device, dtype, threads))
            if (key, name) in ep and "error" not in found:
                ep_row, ep_heads = ep[(key, name)]
                _check(ep_row, rows[-1], ep_heads, found["heads"], dtype, device)
    if preset is None:  # the small model's part: no preset's shape
        rows += model_rows(quick, device, names[0], deadline_s)
    out.mkdir(parents=True, exist_ok=True)
    plot(rows, out)
    return rows


# ------------------------------------------------------------------------------------------------ projection

@dataclass(frozen=True)
class Rate:
    """A published rate: GB/s per GPU and direction (dispatch, combine), where it was measured, its source."""

    what: str
    dispatch_gbps: float
    combine_gbps: float
    source: str


GPUS_PER_NODE = 8  # an HGX H200 node: 8 GPUs on NVLink, one 400 Gb/s NIC each
NVLINK = Rate("NVLink 4 link rate, H200", 450.0, 450.0,
              "NVIDIA H200 datasheet: 900 GB/s per GPU, both directions together")
INFINIBAND = Rate("InfiniBand NDR link rate", 50.0, 50.0, "ConnectX-7, 400 Gb/s per GPU's NIC")
# DeepEP V1 normal kernels, H800 (NVLink ~160 GB/s, CX7 400 Gb/s), DeepSeek-V3 settings (4096 tokens, 7168 hidden,
# top-8, fp8 dispatch, bf16 combine): the bottleneck bandwidth by EP size (docs/legacy.md; EP 8 in ANCHORS.md).
# Its low-latency kernels, 128 tokens, same settings: (dispatch, combine) us by EP size.
DEEPEP_LOW_LATENCY_US = {8: (77, 114), 16: (118, 195), 32: (155, 273)}
DEEPEP = {8: Rate("DeepEP intranode, NVLink, H800", 153.0, 158.0, "ANCHORS.md; deepseek-ai/DeepEP docs/legacy.md"),
          16: Rate("DeepEP internode, RDMA, H800", 43.0, 43.0, "deepseek-ai/DeepEP docs/legacy.md"),
          32: Rate("DeepEP internode, RDMA, H800", 58.0, 57.0, "deepseek-ai/DeepEP docs/legacy.md")}
# The experts' compute: the best published fused-MoE rate of ANCHORS.md (Liger, H100, bf16 inference; an H200 has
# the H100's tensor cores and clocks) and H200's HBM bandwidth (datasheet, ANCHORS.md).
EXPERT_TFLOPS = 523.0
EXPERT_RATE_SOURCE = "Liger fused MoE, bf16 inference, H100 (ANCHORS.md)"
HBM_GBPS = 4800.0
PROJECTED_MODEL = "Qwen3.5-397B-A17B"
PROJECTED_EP = (8, 16, 32)
PROJECTED_TOKENS = (128, 4096)  # per rank: a decode batch (DeepEP's low-latency setting), a prefill chunk


def bytes_per_token(world: int, top_k: int, D: int, itemsize: int, E: int, N: int, part: str = "dispatch+combine",
                    others: int | None = None) -> float:
    """Bytes that leave a rank per token per MoE layer in the exchange of kernellab.distributed, under uniform
    routing: each of a token's top_k slots lands on any of the W ranks alike, so (W - 1) / W of them go away, D
    elements each (out in dispatch, back in combine); dispatch also sends its per-expert counts (E / W int64) to
    each other rank once per call (N tokens). others: count only the slots and counts for that many of the W - 1
    other ranks (those inside the node, or outside it)."""
    others = world - 1 if others is None else others
    rows = top_k * others / world * D * itemsize
    counts = others * (E // world) * 8 / N
    return {"dispatch": rows + counts, "combine": rows, "dispatch+combine": 2 * rows + counts}[part]


def nodes_reached(world: int, top_k: int, E: int, gpus_per_node: int = GPUS_PER_NODE) -> float:
    """Expected number of other nodes that one token's top_k distinct experts reach (uniform routing): what crosses
    the network per token when a token is sent once per node and forwarded inside it (DeepEP's scheme)."""
    nodes = world // gpus_per_node
    if nodes <= 1:
        return 0.0
    per_node = E // nodes
    missed = math.comb(E - per_node, top_k) / math.comb(E, top_k)
    return (nodes - 1) * (1 - missed)


def project(model: str = PROJECTED_MODEL, worlds=PROJECTED_EP, tokens_per_rank=PROJECTED_TOKENS,
            itemsize: int = 2) -> list[dict]:
    """The exchange and the experts of one MoE layer of `model` (bench.ops.MODELS) on one rank, at each EP
    size and tokens per rank, in a dtype of `itemsize` bytes (bf16). One dict each with
    bytes_per_token: out and back (bytes_per_token);
    nvlink_bytes, ib_bytes: the rank's dispatch bytes to the other ranks of its node (NVLink) and to those outside
      it (InfiniBand), GPUS_PER_NODE GPUs per node (combine sends as many back, without the counts);
    ib_bytes_per_node: what InfiniBand would carry if each token crossed once per node reached (nodes_reached);
    link_ms: dispatch + combine at the link rates (NVLINK, INFINIBAND), both links busy at once (the slower one
      decides);
    deepep_ms: the same at DeepEP's measured bottleneck bandwidth (NVLink bytes at its intranode rate, InfiniBand
      bytes at its RDMA rate of that EP size);
    expert_flops, expert_weight_bytes, experts_ms: the rank's local experts on its N top_k slots (balanced), at
      EXPERT_TFLOPS or reading the weights of its active experts at HBM_GBPS, whichever takes longer."""
    m = MODELS[model]
    D, E, k, I = m["hidden"], m["experts"], m["top_k"], m["expert_size"]
    found = []
    for world in worlds:
        inside = min(world, GPUS_PER_NODE) - 1  # other ranks on the same node
        for N in tokens_per_rank:
            link_s = deepep_s = 0.0
            for part in ("dispatch", "combine"):
                nvl = N * bytes_per_token(world, k, D, itemsize, E, N, part, others=inside)
                ib = N * bytes_per_token(world, k, D, itemsize, E, N, part, others=world - 1 - inside)
                link_s += max(nvl / (getattr(NVLINK, f"{part}_gbps") * 1e9),
                              ib / (getattr(INFINIBAND, f"{part}_gbps") * 1e9))
                deepep_s += max(nvl / (getattr(DEEPEP[GPUS_PER_NODE], f"{part}_gbps") * 1e9),
                                ib / (getattr(DEEPEP[world], f"{part}_gbps") * 1e9) if ib else 0.0)
                if part == "dispatch":
                    nvlink_bytes, ib_bytes = nvl, ib
            flops = N * k * (6 * D * I + 5 * I + 2 * D)
            active = E / world * (1 - (1 - k / E) ** (N * world))  # local experts that the world's tokens reach
            weight_bytes = active * 3 * D * I * itemsize
            experts_s = max(flops / (EXPERT_TFLOPS * 1e12), weight_bytes / (HBM_GBPS * 1e9))
            found.append(dict(model=model, world=world, N=N, D=D, E=E, top_k=k, I=I, itemsize=itemsize,
                              bytes_per_token=bytes_per_token(world, k, D, itemsize, E, N),
                              nvlink_bytes=nvlink_bytes, ib_bytes=ib_bytes,
                              ib_bytes_per_node=N * nodes_reached(world, k, E) * D * itemsize,
                              link_ms=link_s * 1e3, deepep_ms=deepep_s * 1e3, expert_flops=flops,
                              expert_weight_bytes=weight_bytes, experts_ms=experts_s * 1e3))
    return found


# ------------------------------------------------------------------------------------------------- summary

def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _text(value) -> str:
    """A text column's value, "" for a missing one (NaN when read from a CSV)."""
    return value if isinstance(value, str) else ""


def _measured(rows) -> list[dict]:
    return [r for r in rows if not _text(r.get("error")) and _number(r.get("median_ms")) > 0]


def bytes_check(rows) -> list[dict]:
    """The projection's input against the runs: for each measured dispatch+combine row with uniform routing, its
    bytes per token (counted from the split sizes the ranks used) and bytes_per_token's model for its world, top_k,
    D and dtype. [{shape, world, measured, model, ratio}]."""
    found = []
    for r in _measured(rows):
        if r.get("part") != "dispatch+combine" or r.get("routing") != "uniform":
            continue
        itemsize = torch.empty(0, dtype=getattr(torch, r["dtype"])).element_size()
        model = bytes_per_token(int(r["world"]), int(r["top_k"]), int(r["D"]), itemsize, int(r["E"]), int(r["N"]))
        measured = _number(r["bytes_per_token"])
        found.append(dict(shape=r["shape"], world=int(r["world"]), measured=measured, model=model,
                          ratio=measured / model if model else math.nan))
    return found


def _kib(n) -> str:
    return f"{n / 2**10:.1f} KiB" if n >= 2**10 else f"{n:.0f} B"


def _ms(ms) -> str:
    return f"{ms * 1e3:.0f} us" if ms < 1 else f"{ms:.2f} ms"


# The target: CPU, gloo, 2 processes, Qwen3.5-35B's MoE shape, 4096 tokens per rank.
TARGET = dict(device="cpu", transport="gloo", world=2, N=4096, preset="Qwen3.5-35B-A3B", part="dispatch+combine")
TARGET_SHARE = 0.5


def _on(r) -> str:
    cores = _number(r.get("cores"))
    return f"load {_number(r.get('load')):.1f}" + (f" on {int(cores)} cores" if cores > 0 else "")


def _target_lines(rows) -> list[str]:
    """The issue's target, one line per permute backend measured at its shape."""
    hits = [r for r in _measured(rows) if all(str(r.get(k)) == str(v) or _number(r.get(k)) == _number(v)
                                              for k, v in TARGET.items())]
    title = (f"Target: dispatch + combine at >= {TARGET_SHARE:.0%} of the all_to_all bandwidth of the same run "
             f"(CPU, gloo, 2 processes, Qwen3.5-35B-A3B MoE shape, 4096 tokens per rank)")
    if not hits:
        return [f"{title}: not measured in this CSV (python -m bench.sweep --op {OP} --preset Qwen3.5-35B-A3B)"]
    lines = []
    for r in sorted(hits, key=lambda r: -_number(r["of_all_to_all"])):
        share = _number(r["of_all_to_all"])
        lines.append(f"{title}, moe_permute / moe_unpermute `{r['backend']}`: **{share:.0%}** ({r['gbps']:.2f} GB/s "
                     f"out and back in {_ms(r['median_ms'])}, all_to_all {r['gbps'] / share:.2f} GB/s on the same "
                     f"bytes; {_on(r)}, commit {r.get('commit', '?')}): "
                     + ("met" if share >= TARGET_SHARE else "not met"))
    return lines


def _exchange_lines(rows) -> list[str]:
    ok = _measured(rows)
    lines = []
    for transport, backend in sorted({(_text(r.get("transport")), r["backend"]) for r in ok
                                      if r.get("part") == "dispatch+combine"}):
        shares = [(_number(r["of_all_to_all"]), r) for r in ok if r.get("part") == "dispatch+combine"
                  and r["transport"] == transport and r["backend"] == backend]
        low, high = min(shares, key=lambda s: s[0]), max(shares, key=lambda s: s[0])
        lines.append(f"{transport}, `{backend}`: dispatch + combine at {low[0]:.0%} to {high[0]:.0%} of the "
                     f"all_to_all's GB/s over {len(shares)} cases (lowest at `{low[1]['shape']}`)")
    by = {(r["shape"].rsplit(",part=", 1)[0], r["part"], r["backend"]): r for r in ok}
    for (key, part, backend), r in by.items():  # where a round trip's time goes, at the preset shapes
        if part != "dispatch+combine" or not _text(r.get("preset")):
            continue
        a2a = next((v for (k, p, _), v in by.items() if k == key and p == "all_to_all"), None)
        touch = next((v for (k, p, _), v in by.items() if k == key and p == FIRST_TOUCH), None)
        local = [by.get((key, p, backend)) for p in LOCAL]
        if a2a is None or touch is None or None in local:
            continue
        rest = r["median_ms"] - 2 * a2a["median_ms"] - local[0]["median_ms"] - local[1]["median_ms"]
        lines.append(f"where a round trip goes at {r['preset']}, {int(r['world'])} ranks x {int(r['N'])} tokens "
                     f"(`{backend}`): {_ms(r['median_ms'])} = two all_to_alls of the rows ({_ms(a2a['median_ms'])} "
                     f"each, on buffers written before) + moe_permute ({_ms(local[0]['median_ms'])}) + "
                     f"moe_unpermute ({_ms(local[1]['median_ms'])}) + the rest ({_ms(rest)}: the counts' "
                     f"all_to_all, the host sync, and dispatch's receive buffer, new every call: a fresh buffer of "
                     f"its size takes {_ms(touch['median_ms'])} to write once)")
    for r in ok:
        if r.get("part") == "moe_ep" and _number(r.get("vs_one_process")) > 0 and _text(r.get("preset")):
            lines.append(f"the EP layer at {r['preset']}'s shape, {int(r['world'])} ranks x {int(r['N'])} tokens "
                         f"(`{r['backend']}`): {_ms(r['median_ms'])} against kernellab.moe in one process "
                         f"{_ms(r['median_ms'] * r['vs_one_process'])} on the same tokens "
                         f"({r['vs_one_process']:.2f}x; rel err {r['rel_err']:.1e})")
    checks = [c for c in bytes_check(rows) if c["model"] > 0]  # one rank alone sends nothing away
    if checks:
        ratios = [c["ratio"] for c in checks]
        lines.append(f"bytes per token per layer, measured (the ranks' split sizes) against the projection's model "
                     f"(top_k (W - 1) / W D itemsize out and back, plus the counts): measured / model from "
                     f"{min(ratios):.3f} to {max(ratios):.3f} over {len(checks)} uniform-routing runs at worlds "
                     f"{', '.join(map(str, sorted({c['world'] for c in checks})))}")
    loads = [_number(r.get("load")) for r in ok if _number(r.get("load")) >= 0]
    if loads:
        cores = max(_number(r.get("cores")) for r in ok)
        lines.append(f"load average while measuring: {min(loads):.1f} to {max(loads):.1f} on {cores:.0f} cores "
                     f"(each rank runs one thread: worlds larger than the cores share them)")
    return lines


def projection_lines() -> list[str]:
    """The projection as lines of the report: a heading and the table of project() as Markdown, then sentences
    (bench.report makes them bullets)."""
    found = project()
    m = found[0]
    lines = ["", f"#### Projection: {PROJECTED_MODEL}'s dispatch + combine at EP {', '.join(map(str, PROJECTED_EP))}",
             "", "| EP | tokens per rank | bytes per token (out + back) | dispatch over NVLink / InfiniBand | "
             "InfiniBand, once per node | dispatch + combine at link rates | at DeepEP's rates | experts | hidden by "
             "the experts (link / DeepEP) |", "|---|---|---|---|---|---|---|---|---|"]
    for p in found:
        hidden = lambda ms: "yes" if ms <= p["experts_ms"] else f"no, {ms / p['experts_ms']:.1f}x"  # noqa: E731
        lines.append(f"| {p['world']} | {p['N']} | {_kib(p['bytes_per_token'])} | {p['nvlink_bytes'] / 2**20:.1f} / "
                     f"{p['ib_bytes'] / 2**20:.1f} MiB | {p['ib_bytes_per_node'] / 2**20:.1f} MiB | "
                     f"{_ms(p['link_ms'])} | {_ms(p['deepep_ms'])} | {_ms(p['experts_ms'])} | "
                     f"{hidden(p['link_ms'])} / {hidden(p['deepep_ms'])} |")
    lines += ["", f"Per rank and MoE layer, bf16, D = {m['D']}, top_k = {m['top_k']}, E = {m['E']}, I = {m['I']}, "
              f"{GPUS_PER_NODE} GPUs per node. Bytes per token: the model that the measured runs check above. Links: "
              f"{NVLINK.what} {NVLINK.dispatch_gbps:.0f} GB/s per direction ({NVLINK.source}); {INFINIBAND.what} "
              f"{INFINIBAND.dispatch_gbps:.0f} GB/s ({INFINIBAND.source}); DeepEP's measured bottleneck bandwidth "
              f"({', '.join(f'EP {w}: {r.dispatch_gbps:.0f} / {r.combine_gbps:.0f} GB/s' for w, r in DEEPEP.items())}"
              f", {DEEPEP[16].source}, H800, DeepSeek-V3 settings). Experts: {EXPERT_TFLOPS:.0f} TFLOP/s "
              f"({EXPERT_RATE_SOURCE}) or their weights at {HBM_GBPS / 1e3:.1f} TB/s (H200), whichever is slower"]
    for N in PROJECTED_TOKENS:
        at = [p for p in found if p["N"] == N]
        stops = {how: min((p["world"] for p in at if p[key] > p["experts_ms"]), default=None)
                 for how, key in (("link rates", "link_ms"), ("DeepEP's rates", "deepep_ms"))}
        said = "; ".join(f"at {how} " + (f"compute stops hiding it at EP {w}" if w else
                                        f"the experts hide it up to EP {at[-1]['world']}") for how, w in stops.items())
        worst = at[-1]
        lines.append(f"{N} tokens per rank: {said}. At EP {worst['world']}, "
                     f"{worst['ib_bytes'] / (worst['nvlink_bytes'] + worst['ib_bytes']):.0%} of the slots that "
                     f"leave a rank cross InfiniBand ({INFINIBAND.dispatch_gbps:.0f} GB/s against NVLink's "
                     f"{NVLINK.dispatch_gbps:.0f}): dispatch + combine take {_ms(worst['link_ms'])} against the "
                     f"experts' {_ms(worst['experts_ms'])}; sending a token once per node it reaches, as DeepEP "
                     f"does, instead of once per slot, would cut InfiniBand's bytes "
                     f"{worst['ib_bytes'] / worst['ib_bytes_per_node']:.1f}x")
    latency = ", ".join(f"EP {w}: {d} + {c} us" for w, (d, c) in DEEPEP_LOW_LATENCY_US.items())
    lines.append(f"DeepEP's internode figures count logical bytes (a token crosses once per node and is forwarded "
                 f"over NVLink there), hence EP 32's {DEEPEP[32].dispatch_gbps:.0f} GB/s above the "
                 f"{INFINIBAND.dispatch_gbps:.0f} GB/s link: applied to this exchange's bytes, one per slot, they "
                 f"are the rate DeepEP's transport reaches, not what its scheme would take")
    lines.append(f"At decode sizes latency, not bandwidth, sets the floor: DeepEP's low-latency kernels take {latency} "
                 f"(dispatch + combine, 128 tokens per rank, DeepSeek-V3 shape, H800; docs/legacy.md, EP 8 in "
                 f"ANCHORS.md), against the experts' "
                 + ", ".join(f"{_ms(p['experts_ms'])} at EP {p['world']}" for p in found if p["N"] == 128))
    lines.append("Hiding assumes overlap: one micro-batch's exchange runs while another's experts compute (DeepEP's "
                 "two-micro-batch scheme); without it a layer takes the sum. The shared expert, computed where its "
                 "token is, would hide more; uneven routing makes the busiest rank's share the one that counts")
    return lines


def _model_lines(rows) -> list[str]:
    """The model part: tokens/s at each world size, and whether its tokens are one process's."""
    model = sorted((r for r in rows if r.get("part") == MODEL), key=lambda r: int(r["world"]))
    if not model:
        return []
    ok = _measured(model)
    rates = ", ".join(f"{_ranks(int(r['world']))}: {r['tokens_per_s']:.1f} tokens/s ({r['decode_tokens_per_s']:.1f} "
                      f"decoding, prefill {_ms(r['prefill_ms'])})" for r in ok)
    failed = [f"{_ranks(int(r['world']))}: {r['error']}" for r in model if _text(r.get("error"))]
    r = model[0]
    same = "; greedy tokens identical to one process's at every world size measured" if ok and not failed else ""
    return [f"the model on several processes (model.generate's small random checkpoint split tp = ep = W ways, "
            f"`{r['backend']}`, a greedy batch of {int(r['batch'])} x {int(r['N']) // int(r['batch'])} prompt "
            f"tokens and {int(r['new_tokens'])} new, one thread per process): {rates or 'none measured'}{same}"
            + (f"; failed: {'; '.join(failed)}" if failed else "")]


def summary(rows) -> list[str]:
    """The report's lines: the target, the exchange against all_to_all, the EP layer against one process, the
    bytes-per-token check, the model's tokens/s on 1, 2 and 4 processes, then the projection (Markdown: a heading
    and a table)."""
    return _target_lines(rows) + _exchange_lines(rows) + _model_lines(rows) + projection_lines()


# ---------------------------------------------------------------------------------------------------- plots

def _ranks(world) -> str:
    return f"{world} rank" + ("s" if world > 1 else "")


def _mode(values):
    values = list(values)
    return max(set(values), key=values.count) if values else None


def _along(rows, axis):
    """Rows of the one-axis sweep along `axis`: every other shape axis at its most common value (the grid's base),
    world and part free."""
    others = [a for a in OPS[OP].axes if a not in (axis, "world")]
    base = {a: _mode(r[a] for r in rows) for a in others}
    return [r for r in rows if all(r[a] == base[a] for a in others)], base


def plot(rows, out: Path) -> None:
    """moe_dispatch_exchange.png (latency and GB/s of the exchange parts against N, D, top_k; one line per part
    and world), moe_dispatch_layer.png (the layer parts against N), moe_dispatch_projection.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from bench.plots import _legend_outside, _readable_log_axis

    ok = _measured(rows)
    worlds = sorted({r["world"] for r in ok})
    styles = {w: s for w, s in zip(worlds, ("-o", "--s", ":^", "-.v"))}
    exchange = [r for r in ok if r["part"] in EXCHANGE]
    # one colour per (part, backend): the exchange's parts per permute backend, the all_to_all; the layer's parts
    series = sorted({(r["part"], r["backend"]) for r in ok}, key=lambda s: ((EXCHANGE + LAYER).index(s[0])
                                                                            if s[0] in EXCHANGE + LAYER else 99, s))
    colors = {s: f"C{i % 10}" for i, s in enumerate(series)}
    if exchange:
        fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
        for column, axis in enumerate(("N", "D", "top_k")):
            line, base = _along(exchange, axis)
            for part, backend in (s for s in series if s[0] in EXCHANGE):
                for world in worlds:
                    pts = sorted((r[axis], r["median_ms"], r["gbps"]) for r in line
                                 if (r["part"], r["backend"]) == (part, backend) and r["world"] == world)
                    if len(pts) < 2:
                        continue
                    x, ms, gbps = zip(*pts)
                    label = f"{part} ({backend}), {_ranks(world)}"
                    for row, values in ((0, ms), (1, gbps)):
                        axes[row, column].plot(x, values, styles[world], color=colors[(part, backend)], label=label)
            fixed = ", ".join(f"{k}={v}" for k, v in base.items())
            for row, title in ((0, "time per call (ms, median)"), (1, "GB/s per rank (bytes sent / time)")):
                ax = axes[row, column]
                ax.set(xscale="log", yscale="log", xlabel=axis, title=f"{title}\n{fixed}")
                ax.title.set_fontsize(8)
                ax.grid(True, which="both", alpha=0.3)
                _readable_log_axis(ax.yaxis)
                swept = sorted({r[axis] for r in line})
                ax.set_xticks(swept, [str(v) for v in swept])
                ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        legend = {}  # every line's label once, whichever panel drew it
        for ax in axes[0]:
            legend |= dict(zip(*reversed(ax.get_legend_handles_labels())))
        if legend:
            _legend_outside(axes[0, 2], handles=list(legend.values()), labels=list(legend))
        fig.suptitle(f"{OP}: the exchange of kernellab.distributed against all_to_all_single on the same bytes "
                     f"({ok[0]['device']}, {ok[0]['dtype']})", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / f"{OP}_exchange.png", dpi=90)
        plt.close(fig)
    layer = [r for r in ok if r["part"] in LAYER + ("dispatch+combine",)]
    if any(r["part"] in LAYER for r in layer):
        line, base = _along(layer, "N")
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for part, backend in (s for s in series if s[0] in LAYER + ("dispatch+combine",)):
            for world in worlds:
                pts = sorted((r["N"], r["median_ms"]) for r in line
                             if (r["part"], r["backend"]) == (part, backend) and r["world"] == world)
                if pts:
                    who = f"{world} x N tokens" if part == "moe" else _ranks(world)
                    ax.plot(*zip(*pts), styles[world], color=colors[(part, backend)],
                            label=f"{part} ({backend}), {who}")
        ax.set(xscale="log", yscale="log", xlabel="N (tokens per rank)", ylabel="time per call (ms, median)",
               title="EP layer against kernellab.moe in one process on the same tokens\n"
                     + ", ".join(f"{k}={v}" for k, v in base.items()))
        ax.title.set_fontsize(9)
        ax.grid(True, which="both", alpha=0.3)
        _readable_log_axis(ax.yaxis)
        _legend_outside(ax)
        fig.tight_layout()
        fig.savefig(out / f"{OP}_layer.png", dpi=90)
        plt.close(fig)
    found = project()
    fig, axes = plt.subplots(1, len(PROJECTED_TOKENS), figsize=(12, 4.2))
    for ax, N in zip(axes, PROJECTED_TOKENS):
        at = [p for p in found if p["N"] == N]
        eps = [p["world"] for p in at]
        ax.plot(eps, [p["link_ms"] for p in at], "-o", label="dispatch + combine, link rates")
        ax.plot(eps, [p["deepep_ms"] for p in at], "--s", label="dispatch + combine, DeepEP's measured rates")
        ax.plot(eps, [p["experts_ms"] for p in at], "-^", color="k", label="experts (compute or weights)")
        ax.set(xscale="log", yscale="log", xlabel="EP size (ranks)", ylabel="ms per MoE layer and rank",
               title=f"{PROJECTED_MODEL}, {N} tokens per rank, bf16 (projected)")
        ax.title.set_fontsize(9)
        ax.set_xticks(eps, [str(e) for e in eps])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(True, which="both", alpha=0.3)
        _readable_log_axis(ax.yaxis)
    _legend_outside(axes[-1])
    fig.tight_layout()
    fig.savefig(out / f"{OP}_projection.png", dpi=90)
    plt.close(fig)
