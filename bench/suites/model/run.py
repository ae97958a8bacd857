"""The whole model, measured the way a server runs it: decode steps at each context timed on a cache filled to
that context (model.cache.fill: the states, keys and values of a short real prefill, no prefill of the context
itself), prefill timed at a few contexts; per backend, for the hybrid Qwen3.5-MoE layer pattern and for its
all-attention twin (every layer full attention; its prefill, the same SDPA in every lab backend, is timed once, by
the first lab backend), to 32K tokens on a CPU (128K on a GPU). Beside every decode row the decode floor: the bytes
the step moves (weights, active experts, states, keys and values) over the copy bandwidth measured on a working
set of that size. Cache memory against context; training tokens/s (model.train.train_step: forward, backward,
AdamW step, each part timed) on 2K-token sequences for each backend with a backward. On CPU in the same run,
transformers' own Qwen3_5MoeForCausalLM (prefill, decode on its cache filled the same way, training) and llama.cpp
(bench/peers/llama_cpp.py, when llama-cpp-python is installed: its cache cannot be filled from outside, so it
decodes after each of its prefills) on the same checkpoint; vLLM's CPU engine in bf16 (bench/peers/vllm_engine.py,
when its environment exists: the hybrid's prefill contexts, decoding after each prefill like llama.cpp) beside the
lab's backends in bf16 at the same contexts (decode on filled caches), and its greedy tokens against the lab's.

    python -m bench.sweep --op model [--quick]     # rows merged into results.csv, the report's model section
    python -m bench.suites.model.run [--quick] [--device cpu] [--out runs/NAME] [--threads 1] [--backend torch]

The plan, with its estimated time, is printed first (plan, COST in config.py): under 20 minutes on 2 cores with
1 thread. `sweep(quick, device, out)` returns the rows and writes model_tokens_per_s.png, model_gap.png,
model_decode_floor.png, model_cache_memory.png and model_train.png into out. Each runner (a lab backend,
transformers, llama.cpp) runs in a process of its own, and so does each one's training. Decode steps are timed
without flushing the caches between them (a server's steps follow one another; a small checkpoint stays in a large
L3), and the floor's bandwidth is measured the same way on a working set of the step's size.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import math
import multiprocessing
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

import kernellab
import model
from bench import cli, timing
from bench.peers import llama_cpp, vllm_engine
from bench.suites import pieces
from bench.suites.model.config import (BENCH_CONFIG, BF16_CONTEXTS, BUDGET_S, COST, DECODE_CONTEXTS, PREFILL_CONTEXTS,
                                       QUICK_DECODE_CONTEXTS, QUICK_PREFILL_CONTEXTS, QUICK_TRAIN_CONTEXT,
                                       TRAIN_BUDGET_S, TRAIN_CONTEXT, model_dtype, shape_label)
from bench.suites.model.floor import floor_rows, memory_rows
from bench.suites.model.measure import measure_runner, measure_training
from bench.suites.model.report import plot, summary
from model.cache import SAMPLE_TOKENS
from model.generate import write_random_checkpoint
from model.train import backward_problem

VARIANTS = ("hybrid", "all_attention")


@dataclass(frozen=True)
class Job:
    """One process of the sweep: runner `name` on checkpoint `variant`; kind "measure" (prefill rows at `prefill`,
    decode rows at `decode`), "train" (steps on `train` tokens) or "parity" (llama.cpp or vLLM's engine against the
    lab model); dtype: the model's ("bfloat16" for the comparison with vLLM's engine on CPU), None: the sweep's."""

    kind: str
    variant: str
    name: str
    prefill: tuple[int, ...] = ()
    decode: tuple[int, ...] = ()
    train: int = 0
    dtype: str | None = None


def lab_backends(device: str) -> list[str]:
    """The lab's backends of the model: every lab backend of one of its ops on the device but the slow reference
    and the peers, the gated delta rule's first (a name runs every op that has it, "auto" the others: onednn is the
    MoE layer on oneDNN beside the auto choices)."""
    names = []
    for op in model.model.OPS:
        registered = kernellab.registry.registered(op)
        names += [n for n in kernellab.backends(op, device) if n != "reference" and not registered[n].peer
                  and n not in names]
    return names


def plan(quick: bool, device: str, names: list[str], peers: list[str], trained: list[str]) -> list[Job]:
    """The sweep's processes in order. Every runner (lab backends `names`, then `peers`) on each variant: prefill at
    the prefill contexts (the all-attention twin's by the first lab backend only: the rest run the same SDPA) and
    decode at the decode contexts on filled caches (llama.cpp: after its prefills); llama.cpp's parity per variant;
    with vLLM's engine in `peers`, the bf16 comparison on the hybrid: each lab backend in bf16 at BF16_CONTEXTS
    (prefill, and decode on caches filled to them), the engine's prefills (decoding after each) and its parity;
    training on the hybrid for `trained` (lab backends with a backward, and transformers)."""
    scale = torch.device(device).type
    prefill = QUICK_PREFILL_CONTEXTS if quick else PREFILL_CONTEXTS[scale]
    decode = QUICK_DECODE_CONTEXTS if quick else DECODE_CONTEXTS[scale]
    jobs, first = [], names[0] if names else None  # the twin's prefill: the first lab backend's alone
    float32_peers = [name for name in peers if name != vllm_engine.NAME]
    for variant in VARIANTS:
        for name in names + float32_peers:
            once = variant == "hybrid" or name in peers or name == first
            jobs.append(Job("measure", variant, name, prefill if once else (),
                            () if name in llama_cpp.RUNNERS else decode))
        if llama_cpp.RUNNERS.keys() & set(peers):
            jobs.append(Job("parity", variant, "llama.cpp"))
    if vllm_engine.NAME in peers:  # at the target's context alone (BF16_CONTEXTS): the sweep keeps under 20 min
        bf16 = prefill if quick else BF16_CONTEXTS
        jobs += [Job("measure", "hybrid", name, bf16, bf16, dtype="bfloat16") for name in names]
        jobs += [Job("measure", "hybrid", vllm_engine.NAME, bf16, dtype="bfloat16"),
                 Job("parity", "hybrid", vllm_engine.NAME, dtype="bfloat16")]
    jobs += [Job("train", "hybrid", name, train=QUICK_TRAIN_CONTEXT if quick else TRAIN_CONTEXT) for name in trained]
    return jobs


def _timer_s(call_s: float, budget_s: float, warmup: int) -> float:
    """Seconds bench.timing.time_cpu spends on calls of call_s: warm-up calls, then calls until the budget is
    spent, at least 3 unless 3 would pass 5 budgets."""
    calls = max(math.ceil(budget_s / call_s), 3 if 3 * call_s <= 5 * budget_s else 1)
    return (calls + warmup) * call_s


def estimate_s(job: Job, device: str, quick: bool) -> float:
    """The seconds a job should take on this device (config.COST's rough rates for the bench checkpoint, 1 thread):
    its process, its timed calls by bench.timing's rules, the fills' short prefills; the attention layers'
    quadratic part by the variant's count of them."""
    cost, budget = COST[torch.device(device).type], BUDGET_S[quick]
    attention = BENCH_CONFIG["num_hidden_layers"] // 4 if job.variant == "hybrid" else BENCH_CONFIG["num_hidden_layers"]

    def prefill_s(T):
        return cost["token_s"] * T + cost["attention_s"] * attention * T * T

    extra = 1 if job.name == "transformers" else 0  # its dense_share profiles one more call
    seconds = cost["process_s"] + sum(_timer_s(prefill_s(T), budget, extra) for T in job.prefill)
    seconds += sum(prefill_s(min(T, SAMPLE_TOKENS)) + _timer_s(cost["step_s"], budget / 4, 1 + extra)
                   for T in job.decode)
    if job.name in (*llama_cpp.RUNNERS, vllm_engine.NAME):  # decodes after each prefill
        seconds += sum(_timer_s(cost["step_s"], budget / 4, 1) for T in job.prefill)
    if job.name == vllm_engine.NAME:  # the engine's start: its own imports, compilation and warm-up
        seconds += cost["engine_s"]
    if job.kind == "train":  # forward, backward (about twice the forward) and the optimizer: about 3 prefills
        step = 3 * prefill_s(job.train)
        seconds += _timer_s(step, budget if quick else TRAIN_BUDGET_S, 1)
    if job.kind == "parity":
        seconds += prefill_s(llama_cpp.PARITY_PROMPT) + llama_cpp.PARITY_NEW * cost["step_s"]  # vllm_engine's alike
    return seconds


def _contexts(contexts) -> str:
    return ", ".join(f"{c // 1024}K" if c >= 1024 and c % 1024 == 0 else str(c) for c in contexts)


def describe(jobs: list[Job], device: str, quick: bool) -> str:
    """The plan as printed before anything runs: one line per job with its estimate, then the total (the floor's
    bandwidth measurements and the memory rows add seconds)."""
    lines = [f"model sweep on {device}, {torch.get_num_threads()} thread(s){', quick' if quick else ''}: "
             f"{len(jobs)} processes, about {sum(estimate_s(j, device, quick) for j in jobs) / 60:.1f} min "
             f"(estimated from the bench checkpoint's rates on a 2-core CPU; a loaded machine takes longer)"]
    for job in jobs:
        if job.kind == "measure":
            what = "; ".join(part for part in (
                f"prefill {_contexts(job.prefill)}" if job.prefill else "",
                f"decode on caches filled to {_contexts(job.decode)}" if job.decode else
                ("decode after each prefill" if job.prefill else "")) if part)
        elif job.kind == "train":
            what = f"training steps on {job.train} tokens"
        else:
            what = "parity with the lab model"
        lines.append(f"  {job.name:>14} {job.variant:>13}{' ' + job.dtype if job.dtype else ''}: {what} "
                     f"(~{estimate_s(job, device, quick):.0f} s)")
    return "\n".join(lines)


def sweep(quick: bool = False, device: str = "cpu", out: str | Path = "reports/cpu", backends=None, on_rows=None,
          done=frozenset()) -> list[dict]:
    """Rows: op="model", backend, peer, device, dtype, shape, context, phase ("prefill", "decode"; "train" for
    training steps, the hybrid at TRAIN_CONTEXT tokens (QUICK_TRAIN_CONTEXT when quick), each lab backend with a
    backward and transformers; "cache" for memory-only rows; "parity" for llama.cpp's agreement with the lab
    model or vLLM's engine's), median_ms, p20_ms, p80_ms, tokens_per_s, cache_bytes, variant ("hybrid",
    "all_attention"), params, backends (the backend of each op); decode rows also cache_fill ("filled",
    "prefilled": measure_decode) and the floor's columns (floor_rows), train rows forward_ms, backward_ms,
    optimizer_ms (measure_training). Prints the plan and its estimated time first (plan, describe). A piece per job (bench.suites.pieces: on_rows gets each
    job's rows as it finishes, the labels in done are skipped). Writes the PNGs into out (plot)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    budget_s = BUDGET_S[quick]
    names = backends or lab_backends(device)
    peers = ["transformers", *(llama_cpp.RUNNERS if llama_cpp.unavailable() is None else ())] \
        if device == "cpu" else []
    no_engine = vllm_engine.unavailable() if device == "cpu" else None  # a CPU build: no row on a GPU
    if device == "cpu" and no_engine is None:
        peers.append(vllm_engine.NAME)
    trained = []
    for name in names:  # training: each lab backend with a backward (model.train.training_backends), transformers
        if problem := backward_problem(name, device):
            print(f"  {name:>14} not trained: {problem}", flush=True)
        else:
            trained.append(name)
    jobs = plan(quick, device, names, peers, trained + [p for p in peers if p == "transformers"])
    print(describe(jobs, device, quick), flush=True)
    all_attention = ["full_attention"] * BENCH_CONFIG["num_hidden_layers"]
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="bench-model-") as folder:
        paths = {"hybrid": write_random_checkpoint(Path(folder) / "hybrid", **BENCH_CONFIG),
                 "all_attention": write_random_checkpoint(Path(folder) / "all_attention", **BENCH_CONFIG,
                                                          layer_types=all_attention)}
        skipped = {}
        if device == "cpu":
            skipped = llama_cpp.prepare(paths)  # GGUF conversions; a row saying why for each one not made
        if no_engine:
            print(f"  {vllm_engine.NAME:>14} {'hybrid':>13}: skipped: {no_engine}", flush=True)
            skipped["hybrid", vllm_engine.NAME] = no_engine
        work = [("skipped peers", lambda: [
            dict(op="model", backend=name, peer=True, device=device, variant=variant,
                 dtype="bfloat16" if name == vllm_engine.NAME else "float32",
                 shape=shape_label(model.ModelConfig.from_folder(paths[variant])), error=why)
            for (variant, name), why in skipped.items()])] if skipped else []
        for job in jobs:
            path = paths[job.variant]
            dtype = getattr(torch, job.dtype) if job.dtype else model_dtype(device)
            if job.kind == "parity" and job.name == vllm_engine.NAME:
                call = (vllm_engine.parity_rows, path, job.variant, shape_label(model.ModelConfig.from_folder(path)),
                        threads)
            elif job.kind == "parity":
                found = [n for n in llama_cpp.RUNNERS if (job.variant, n) not in skipped]
                call = (llama_cpp.parity_rows, path, job.variant, shape_label(model.ModelConfig.from_folder(path)),
                        found, threads)
                if not found:
                    continue
            elif (job.variant, job.name) in skipped:
                continue
            elif job.kind == "train":
                call = (measure_training, path, job.variant, job.name, job.train, device, dtype,
                        budget_s if quick else TRAIN_BUDGET_S, threads)
            else:
                call = (measure_runner, path, job.variant, job.name, job.prefill, job.decode, device, dtype, budget_s,
                        threads)
            floors = {job.variant: path} if job.kind == "measure" else {}
            # its phase in the shape: a measure and a train job of one backend that both die are two rows
            died = dict(op="model", backend=job.name, device=device, dtype=str(dtype).removeprefix("torch."),
                        variant=job.variant, peer=job.name in peers, phase=job.kind,
                        shape=f"{shape_label(model.ModelConfig.from_folder(path))},phase={job.kind}",
                        error=f"the {job.kind} process died (a native abort: its output above says why)")
            work.append((f"{job.kind} {job.name} {job.variant}{' ' + job.dtype if job.dtype else ''}",
                         partial(_job_rows, call, floors, device, dtype, died)))
        work.append(("memory", partial(memory_rows, paths, device, model_dtype(device))))
        rows = pieces(work, on_rows, done)
    if not done:  # resumed: these rows are part of the run's; bench.report plots them all from its CSV
        plot(rows, out)
    return rows


def _job_rows(call, paths, device, dtype, died: dict) -> list[dict]:
    """One job's rows, made in a process of its own (numba's thread pool, once started, slows every later torch
    call in its process (measured: transformers' prefill 6x slower after a numba run), so no runner follows
    another), its decode rows beside their floor (floor_rows on paths: {variant: checkpoint}). The phase and context
    join the shape: the rows' results KEY (one row per key in the CSV). A native abort (llama.cpp's GGML_ASSERT on
    the all-attention twin) ends that job's process, not the sweep: the row `died` says so."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            rows = pool.submit(*call).result()
        except concurrent.futures.process.BrokenProcessPool:
            print(f"  {died['backend']:>14} {died['variant']:>13}: {died['error']}", flush=True)
            return [died]
    with torch.inference_mode():
        floor_rows(rows, paths, device, dtype)
    for row in rows:
        row["shape"] += "".join(f",{k}={row[k]}" for k in ("phase", "context") if row.get(k) not in (None, ""))
    return rows


def main(argv=None):
    parser = cli.ArgumentParser(prog="python -m bench.suites.model.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short contexts, fewer repeats")
    parser.add_argument("--device", default="cpu", choices=cli.DEVICES)
    parser.add_argument("--out", type=cli.out_folder, default=None,
                        help="output folder (default runs/model-<host>-<time>: the published reports are rewritten by "
                             "python -m bench.report --publish only)")
    parser.add_argument("--backend", action="append", help="lab backend(s) to run (default: every one here)")
    parser.add_argument("--threads", type=cli.positive_int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    cli.check_device(parser, "--device", args.device)
    for name in args.backend or ():
        if problem := cli.model_backend_problem(name, args.device, model_dtype(args.device), peers=False):
            parser.error(f"--backend: {problem}")
    if args.threads:
        torch.set_num_threads(args.threads)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"runs/model-{timing.host_slug(args.device)}-{stamp}")
    rows = sweep(args.quick, args.device, out, args.backend)
    import pandas as pd

    pd.DataFrame(rows).to_csv(out / "model.csv", index=False)
    print("\n".join(summary(rows)))
    print(f"wrote {out / 'model.csv'} and model_*.png")


if __name__ == "__main__":
    main()
