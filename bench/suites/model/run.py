"""The whole model: prefill time and decode tokens/s against context length, per backend, for the hybrid
Qwen3.5-MoE layer pattern and for its all-attention twin (every layer full attention), to 32K tokens on a CPU
(128K on a GPU); the bytes a decode step moves (weights, active experts, states, keys and values) against the copy
bandwidth measured on a working set of that size: the decode floor, beside the measured step; cache memory
against context; training tokens/s (model.train.train_step: forward, backward, AdamW step, each part timed) on
2K-token sequences for each backend with a backward; on CPU, transformers' own Qwen3_5MoeForCausalLM (prefill,
decode, training) and llama.cpp (bench/peers/llama_cpp.py, when llama-cpp-python is installed) on the same checkpoint.

    python -m bench.suites.model.run [--quick] [--device cpu] [--out reports/cpu] [--threads 1] [--backend torch]
    python -m bench.sweep --op model [--quick]     # the same sweep, rows merged into results.csv

`sweep(quick, device, out)` returns the rows (bench.sweep --op model calls it) and writes model_tokens_per_s.png,
model_gap.png, model_decode_floor.png, model_cache_memory.png and model_train.png into out. Each runner (a lab
backend, transformers, llama.cpp) runs in a process of its own, and so does each one's training. Decode steps
are timed without flushing the caches between them (a server's steps follow one another; a small checkpoint stays
in a large L3), and the floor's bandwidth is measured the same way on a working set of the step's size.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import tempfile
from pathlib import Path

import torch

import kernellab
import model
from bench import cli
from bench.peers import llama_cpp
from bench.suites.model.config import BENCH_CONFIG, CONTEXTS, QUICK_CONTEXTS, TRAIN_CONTEXT, QUICK_TRAIN_CONTEXT, TRAIN_BUDGET_S, model_dtype, shape_label
from bench.suites.model.floor import floor_rows, memory_rows
from bench.suites.model.measure import measure_runner, measure_training
from bench.suites.model.report import plot, summary
from model.generate import write_random_checkpoint
from model.train import backward_problem


def sweep(quick: bool = False, device: str = "cpu", out: str | Path = "reports/cpu", backends=None) -> list[dict]:
    """Rows: op="model", backend, peer, device, dtype, shape, context, phase ("prefill", "decode"; "train" for
    training steps, the hybrid at TRAIN_CONTEXT tokens (QUICK_TRAIN_CONTEXT when quick), each lab backend with a
    backward and transformers; "cache" for memory-only rows; "parity" for llama.cpp's agreement with the lab
    model), median_ms, p20_ms, p80_ms, tokens_per_s, cache_bytes, variant ("hybrid", "all_attention"), params,
    backends (the backend of each op); decode rows also the floor's columns (floor_rows), train rows forward_ms,
    backward_ms, optimizer_ms (measure_training). Writes the PNGs into out (plot)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = model_dtype(device)
    contexts = QUICK_CONTEXTS if quick else CONTEXTS[torch.device(device).type]
    budget_s = 0.5 if quick else 2.0
    # the lab's backends: every CPU (or GPU) backend of the gated delta rule but the slow reference
    names = backends or [n for n in kernellab.backends("gated_delta_rule", device)
                         if n != "reference" and not kernellab.registry.registered("gated_delta_rule")[n].peer]
    peers = ["transformers", *llama_cpp.RUNNERS] if device == "cpu" else []
    rows = []
    all_attention = ["full_attention"] * BENCH_CONFIG["num_hidden_layers"]
    with tempfile.TemporaryDirectory(prefix="bench-model-") as folder:
        paths = {"hybrid": write_random_checkpoint(Path(folder) / "hybrid", **BENCH_CONFIG),
                 "all_attention": write_random_checkpoint(Path(folder) / "all_attention", **BENCH_CONFIG,
                                                          layer_types=all_attention)}
        runners = {variant: names + peers for variant in paths}
        if device == "cpu":
            skipped = llama_cpp.prepare(paths)  # GGUF conversions; a row saying why for each one not made
            rows += [dict(op="model", backend=name, peer=True, device=device, dtype="float32", variant=variant,
                          shape=shape_label(model.ModelConfig.from_folder(paths[variant])), error=why)
                     for (variant, name), why in skipped.items()]
            runners = {variant: [n for n in found if (variant, n) not in skipped] for variant, found in runners.items()}
        # One process per runner: numba's thread pool, once started, slows every later torch call in its
        # process (measured: transformers' prefill 6x slower after a numba run), so no runner follows another.
        spawn = multiprocessing.get_context("spawn")
        for variant, path in paths.items():
            for name in runners[variant]:
                with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
                    rows += pool.submit(measure_runner, path, variant, name, contexts, device, dtype, budget_s,
                                        torch.get_num_threads()).result()
            if device == "cpu" and llama_cpp.RUNNERS.keys() & set(runners[variant]):
                with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
                    rows += pool.submit(llama_cpp.parity_rows, path, variant, shape_label(
                        model.ModelConfig.from_folder(path)), [n for n in runners[variant] if n in llama_cpp.RUNNERS],
                        torch.get_num_threads()).result()
        # Training on the hybrid: each lab backend with a backward (model.train.training_backends) and transformers
        train_context = QUICK_TRAIN_CONTEXT if quick else TRAIN_CONTEXT
        for name in [n for n in runners["hybrid"] if n not in llama_cpp.RUNNERS]:
            if name != "transformers" and (problem := backward_problem(name, device)):
                print(f"  {name:>14} not trained: {problem}", flush=True)
                continue
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
                rows += pool.submit(measure_training, paths["hybrid"], "hybrid", name, train_context, device, dtype,
                                    budget_s if quick else TRAIN_BUDGET_S, torch.get_num_threads()).result()
        with torch.inference_mode():
            floor_rows(rows, paths, device, dtype)
            rows += memory_rows(paths, device, dtype)
    plot(rows, out)
    return rows


def main(argv=None):
    parser = cli.ArgumentParser(prog="python -m bench.suites.model.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two short contexts, fewer repeats")
    parser.add_argument("--device", default="cpu", choices=cli.DEVICES)
    parser.add_argument("--out", type=cli.out_folder, default=None, help="output folder (default reports/<device>)")
    parser.add_argument("--backend", action="append", help="lab backend(s) to run (default: every one here)")
    parser.add_argument("--threads", type=cli.positive_int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    cli.check_device(parser, "--device", args.device)
    for name in args.backend or ():
        if problem := cli.model_backend_problem(name, args.device, model_dtype(args.device), peers=False):
            parser.error(f"--backend: {problem}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or f"reports/{args.device}")
    rows = sweep(args.quick, args.device, out, args.backend)
    import pandas as pd

    pd.DataFrame(rows).to_csv(out / "model.csv", index=False)
    print("\n".join(summary(rows)))
    print(f"wrote {out / 'model.csv'} and model_*.png")
