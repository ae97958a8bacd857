"""Worlds of spawned processes on 127.0.0.1: spawn bounds a world by a deadline and ends it when a rank reports an
error; a collective stuck for COLLECTIVE_TIMEOUT raises in the worker. Nothing hangs."""
from __future__ import annotations

import contextlib
import os
import queue
import socket
import time
from datetime import timedelta

import torch


# A collective stuck longer than this raises in the worker; a world older than its deadline is killed.
COLLECTIVE_TIMEOUT = timedelta(seconds=120)


# Spawned ranks share the machine's cores: one thread each (OpenMP / numba pools on shared cores spin against
# each other). Read by the children as they start, before they import torch.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}


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


def _runnable_worlds(worlds, device: str) -> tuple[list[int], list[int]]:
    """(world sizes this machine runs, those it cannot): NCCL needs one GPU per rank."""
    if device != "cuda":
        return sorted(worlds), []
    gpus = torch.cuda.device_count()
    return sorted(w for w in worlds if w <= gpus), sorted(w for w in worlds if w > gpus)

def _ranks(world) -> str:
    return f"{world} rank" + ("s" if world > 1 else "")
