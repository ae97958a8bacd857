"""The model on several processes: model.generate's small random checkpoint split tp = ep = W ways (model/parallel.py),
against one process."""
from __future__ import annotations

import os
import traceback

import torch

from bench import ops, timing
from bench.suites.moe_dispatch.parts import COLLECTIVE_TIMEOUT, OP, _timed, transport_of
from bench.suites.moe_dispatch.worlds import WORKER_ENV, _free_port, _ranks, _runnable_worlds, spawn
from bench.sweep import seed_of


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
