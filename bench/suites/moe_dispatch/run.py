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
process runs in a process of its own after each world, on the world's W x N tokens and all E experts, with min(W,
cores) threads on CPU (the cores the W one-thread ranks occupy; at most torch's threads in the caller, so --threads 1
gives it one: on a loaded machine two threads stall at their barriers).

Shapes (bench/ops.py, MOE_DISPATCH): world = W ranks, N = tokens per rank, D hidden, E experts in all (E / W per
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

import math
import os
from functools import partial
from pathlib import Path

import torch

import kernellab
from bench.ops import OPS
from bench.suites import pieces
from bench.suites.moe_dispatch.parallel_model import model_rows
from bench.suites.moe_dispatch.parts import (CHECK_TOKENS, EXCHANGE, FIRST_TOUCH, LOCAL, OP, dtype_of, layer_affordable,
                                             one_process, run_world, transport_of)
from bench.suites.moe_dispatch.report import plot
from bench.suites.moe_dispatch.worlds import WORKER_ENV, _runnable_worlds, spawn
from bench.sweep import dtype_name, sweep_backends
from bench.check import rel_err, tolerance


WORLD_DEADLINE_S = {True: 240.0, False: 1800.0}  # by quick


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


def sweep(quick: bool = False, device: str = "cpu", out: str | Path = "reports/cpu", backends=None,
          preset: str | None = None, on_rows=None, done=frozenset()) -> list[dict]:
    """Rows of every case of bench.ops' MOE_DISPATCH on `device` (see the module's docstring), in pieces
    (bench.suites.pieces: on_rows gets each piece's rows as it finishes, the labels in done are skipped): a world
    per world size with kernellab.moe in one process on its cases, then the model; draws the three PNGs into out.
    backends: the moe backends of the layer parts (default: "auto"'s choice on the device); preset: only that
    model's shapes."""
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

    def world_rows(world: int) -> list[dict]:
        here = [case for case in cases if case.shape["world"] == world]
        mine = [case for case in layer if case.shape["world"] == world]
        print(f"  {OP}: a world of {world} ({transport}), {len(here)} cases (permute: {', '.join(permute)}), "
              f"{len(mine)} with the layer ({', '.join(names)})", flush=True)
        found, rows, ep = run_world(world, transport, here, setting, deadline_s), [], {}
        for case in here:
            rows += _case_rows(case, found[case.key], device, dtype, transport, permute)
            for name, heads in found[case.key].get("heads", {}).items():
                ep[(case.key, name)] = (next(r for r in rows if r["shape"] == f"{case.key},part=moe_ep"
                                             and r["backend"] == name), heads)
        if mine:  # kernellab.moe in one process on the same tokens, on the cores the W one-thread ranks occupy
            threads = min(world, os.cpu_count() or 1, torch.get_num_threads())
            keys = [(case.key, name) for case in mine for name in names]
            single = spawn(one_process, [(mine, names, "cuda:0" if device == "cuda" else "cpu", dtype, budget_s,
                                          threads)], keys, deadline_s, WORKER_ENV if device == "cpu" else {})
            by_key = {case.key: case for case in mine}
            for (key, name), found in single.items():
                rows.append(_one_process_row(by_key[key], name, found, device, dtype, threads))
                if (key, name) in ep and "error" not in found:
                    ep_row, ep_heads = ep[(key, name)]
                    _check(ep_row, rows[-1], ep_heads, found["heads"], dtype, device)
        return rows

    jobs = [(f"world {world}", partial(world_rows, world)) for world in worlds]
    if preset is None:  # the small model's part: no preset's shape
        jobs.append(("model", partial(model_rows, quick, device, names[0], deadline_s)))
    rows = pieces(jobs, on_rows, done)
    out.mkdir(parents=True, exist_ok=True)
    if not done:  # resumed: these rows are part of the run's; bench.report plots them all from its CSV
        plot(rows, out)
    return rows
