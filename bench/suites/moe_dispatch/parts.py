"""The expert-parallel exchange's problem and its measured parts: each rank's tokens and experts, every part of
a case timed on one rank of a world (_measure), the world's worker, and kernellab.moe in one process (one_process)."""
from __future__ import annotations

import os
import traceback

import torch

import kernellab
from bench import timing
from bench.ops.moe import routing_ids
from bench.suites.moe_dispatch.worlds import COLLECTIVE_TIMEOUT, WORKER_ENV, _free_port, spawn
from bench.sweep import seed_of, trusted_inputs


OP = "moe_dispatch"


EXCHANGE = ("dispatch", "combine", "dispatch+combine", "all_to_all")


LOCAL = ("permute", "unpermute")  # the exchange's own work beside the transport: moe_permute, moe_unpermute


FIRST_TOUCH = "first_touch"  # a fresh buffer of the received rows' size, allocated and written once


LAYER = ("experts", "moe_ep", "moe")


# moe_ep's output on each rank's first tokens is checked against kernellab.moe in one process.
CHECK_TOKENS = 8


# The layer parts run where one process can hold all experts and run them in seconds, by (device, quick): on CPU
# the grid's shapes, not Qwen3.5-35B's at 4096 tokens per rank (0.4 TFLOP in one process: a minute per timed call
# here); on a GPU every shape whose experts fit (bf16).
LAYER_MAX_FLOPS = {("cpu", True): 2e10, ("cpu", False): 2e11, ("cuda", True): 1e13, ("cuda", False): 1e15}


LAYER_MAX_WEIGHT_GB = {"cpu": 4.0, "cuda": 40.0}


def dtype_of(device: str) -> torch.dtype:
    """The exchange's dtype: float32 on CPU, bfloat16 on a GPU (the model's dtypes there)."""
    return torch.float32 if device == "cpu" else torch.bfloat16


def transport_of(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


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


def run_world(world: int, transport: str, cases: list, setting: dict, deadline_s: float) -> dict:
    """Spawn `world` ranks on 127.0.0.1 that measure every case of `cases` (all of this world size): {case key:
    rank 0's result (see _measure), or {"error": ...}}."""
    port = _free_port()
    return spawn(_worker, [(world, port, transport, cases, setting)] * world, [case.key for case in cases],
                 deadline_s, WORKER_ENV if transport == "gloo" else {})


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
