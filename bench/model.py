"""The whole model: prefill time and decode tokens/s against context length, per backend, for the hybrid
Qwen3.5-MoE layer pattern and for its all-attention twin (every layer full attention), to 32K tokens on a CPU
(128K on a GPU); the bytes a decode step moves (weights, active experts, states, keys and values) against the copy
bandwidth measured on a working set of that size: the decode floor, beside the measured step; cache memory
against context; training tokens/s (model.train.train_step: forward, backward, AdamW step, each part timed) on
2K-token sequences for each backend with a backward; on CPU, transformers' own Qwen3_5MoeForCausalLM (prefill,
decode, training) and llama.cpp (bench/llama_cpp.py, when llama-cpp-python is installed) on the same checkpoint.

    python -m bench.model [--quick] [--device cpu] [--out reports/cpu] [--threads 1] [--backend torch]
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
import contextlib
import math
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import torch

import kernellab
import model
from bench import cli, llama_cpp, timing
from bench.ops import OPS
from model.generate import write_random_checkpoint
from model.train import STEP_PARTS, backward_problem, train_step, training_backends

# Qwen3.5-35B-A3B's proportions at a quarter of its width, so a 2-core CPU runs 2K-token prefills: Gated
# DeltaNet key dim = hidden, value dim = 2 x hidden (Hv = 2 Hk, head dim 128); attention queries 2 x hidden
# (head dim 256, rotary on a quarter; 4 query heads per KV head where the real model has 8); 3 linear : 1 full.
BENCH_CONFIG = dict(vocab_size=4096, hidden_size=512, num_hidden_layers=8, num_attention_heads=4,
                    num_key_value_heads=1, head_dim=256, linear_num_key_heads=4, linear_num_value_heads=8,
                    linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
                    num_experts=32, num_experts_per_tok=4, moe_intermediate_size=128,
                    shared_expert_intermediate_size=128, max_position_embeddings=262144, tie_word_embeddings=False)
CONTEXTS = {"cpu": (512, 1024, 2048, 4096, 8192, 16384, 32768),
            "cuda": (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)}
QUICK_CONTEXTS = (128, 512)
MEMORY_CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768)
MAX_DECODE_STEPS = 256  # room in the KV cache for the timed decode steps
WARMUP_CONTEXT = 64  # each runner's first prefill and decode (compilation, autotuning) at this length, untimed
# Training steps (forward, backward, AdamW step) on one sequence of this many tokens, the hybrid only: the issue's
# target is training tokens/s on 2K-token sequences.
TRAIN_CONTEXT = 2048
QUICK_TRAIN_CONTEXT = 64
TRAIN_LR = 1e-4  # small: the timed steps must not drive the random checkpoint's loss to NaN
# A 2K-token step takes seconds on a CPU: with this budget, steps up to ~16 s get bench.timing's 3 repeats.
TRAIN_BUDGET_S = 10.0


@contextlib.contextmanager
def transformers_torch_path(calls: dict | None = None):
    """With flash-linear-attention installed, transformers sends its Gated DeltaNet to fla's GPU kernels,
    which fail on CPU tensors: within the block it uses its pure-torch originals (`__wrapped__`), counting
    their calls into `calls` when given."""
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as hf_module

    saved = {}
    for name in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule"):
        fn = saved[name] = getattr(hf_module, name)
        original = getattr(fn, "__wrapped__", fn)

        def run(*args, _original=original, _name=name, **kwargs):
            if calls is not None:
                calls[_name] = calls.get(_name, 0) + 1
            return _original(*args, **kwargs)

        setattr(hf_module, name, run)
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(hf_module, name, fn)


def cache_bytes_from_shapes(cfg: model.ModelConfig, batch: int, context: int, dtype_bytes: int,
                            state_bytes: int = 4) -> int:
    """Bytes of the cache at `context` tokens, from the config alone: per Gated DeltaNet layer the conv
    state [B, C, kernel - 1] (model dtype) and the recurrent state [B, Hv, K, V] (state_bytes per element: 4,
    float32, unless the model stores another state_dtype); per attention layer keys and values
    [B, context, Hkv, Dh]."""
    conv_dim = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + cfg.linear_num_value_heads * \
        cfg.linear_value_head_dim
    linear = batch * (conv_dim * (cfg.linear_conv_kernel_dim - 1) * dtype_bytes + cfg.linear_num_value_heads *
                      cfg.linear_key_head_dim * cfg.linear_value_head_dim * state_bytes)
    full = 2 * batch * context * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes
    return sum(linear if kind == "linear_attention" else full for kind in cfg.layer_types)


def decode_step_bytes(m: model.Qwen35Moe, context: int) -> dict[str, int]:
    """Bytes one decode step of one sequence at `context` tokens must move, by part: "weights" (every dense
    parameter once: projections, norms, router, shared expert, LM head; one row of the embedding), "experts"
    (top_k of the E experts of each layer), "states" (each Gated DeltaNet layer's recurrent and conv state, read
    and written), "kv" (each attention layer's keys and values at `context` positions)."""
    cfg = m.config
    weights = experts = 0
    for name, p in m.named_parameters():  # a tied LM head is the embedding: named once
        size = p.numel() * p.element_size()
        if name.startswith("embed_tokens."):
            size = size // cfg.vocab_size * (cfg.vocab_size if cfg.tie_word_embeddings else 1)
        if ".experts." in name:
            experts += size * cfg.num_experts_per_tok // cfg.num_experts
        else:
            weights += size
    dtype_bytes = m.embed_tokens.weight.element_size()
    linear = sum(kind == "linear_attention" for kind in cfg.layer_types)
    states = 2 * (cache_bytes_from_shapes(cfg, 1, 0, dtype_bytes) if linear else 0)
    kv = cache_bytes_from_shapes(cfg, 1, context, dtype_bytes) - states // 2
    return dict(weights=weights, experts=experts, states=states, kv=kv)


class Lab:
    """Prefill and decode of the lab model."""

    def __init__(self, path, backend, device, dtype):
        self.m = model.from_pretrained(path, backend=backend, dtype=dtype, device=device)

    def prefill(self, ids):
        """ids [1, T] into a fresh cache; the last position's logits (all that generation needs)."""
        cache = self.m.new_cache(ids.shape[0], ids.shape[1] + MAX_DECODE_STEPS)
        return self.m.lm_head(self.m.hidden_states(ids, cache)[:, -1:]), cache

    def decode(self, token, cache, position: int):
        """One step at `position` (the cache rewound there first: repeated timed steps all see that context)."""
        cache.lengths.fill_(position)
        cache.host_lengths[0] = position
        return self.m(token, cache)

    def cache_bytes(self, cache):
        """Bytes of a cache sized for exactly the tokens seen (the timed one has room for decode steps)."""
        return cache_bytes_from_shapes(self.m.config, 1, cache.position, self.m.embed_tokens.weight.element_size())


class Transformers:
    """Prefill and decode of transformers' Qwen3_5MoeForCausalLM (its default CPU kernels: sdpa attention,
    grouped_mm experts, the torch Gated DeltaNet)."""

    def __init__(self, path, device, dtype):
        from transformers import Qwen3_5MoeForCausalLM

        self.m = Qwen3_5MoeForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()

    @torch.inference_mode()
    def prefill(self, ids):
        out = self.m(ids, use_cache=True, logits_to_keep=1)
        return out.logits, out.cache

    @torch.inference_mode()
    def decode(self, token, cache, position: int):
        """One step after the tokens so far (its cache cannot be rewound: repeated steps extend the context by a
        few tokens, at most the timer's repeats)."""
        return self.m(token, cache=cache, use_cache=True).logits

    @staticmethod
    def cache_bytes(cache):
        return None  # its DynamicCache grows by concatenation: not comparable tensor for tensor


def shape_label(cfg) -> str:
    """e.g. "B1 D512 L8(6 GDN + 2 ATT) E32k4 GDN(4,8)x128 ATT(4,1)x256"."""
    linear = sum(kind == "linear_attention" for kind in cfg.layer_types)
    return (f"B1 D{cfg.hidden_size} L{cfg.num_hidden_layers}({linear} GDN + {cfg.num_hidden_layers - linear} ATT) "
            f"E{cfg.num_experts}k{cfg.num_experts_per_tok} "
            f"GDN({cfg.linear_num_key_heads},{cfg.linear_num_value_heads})x{cfg.linear_key_head_dim} "
            f"ATT({cfg.num_attention_heads},{cfg.num_key_value_heads})x{cfg.head_dim}")


def dense_share(fn) -> float:
    """Fraction of one call of fn spent in nn.Linear (aten::linear and the GEMM under it), from torch.profiler:
    the dense projections (mixers' in/out projections, router, shared expert, lm_head), the same GEMMs on the same
    weights in every implementation of the model. By Amdahl's law no implementation beats this one by more than
    1 / share while it runs those GEMMs as fast (the profiler's own overhead makes the share an underestimate)."""
    from torch.profiler import profile

    with profile() as prof:
        start = time.perf_counter()
        fn()
        wall_s = time.perf_counter() - start
    linear_us = sum(event.cpu_time_total for event in prof.key_averages() if event.key == "aten::linear")
    return linear_us / 1e6 / wall_s


def measure(runner, ids, device, budget_s) -> list[dict]:
    """Prefill of ids [1, T] into a fresh cache (the runner warmed up already: at long contexts a call may be
    timed once), then decode steps at context T (bench.timing's timer, caches not flushed between steps). Two
    rows; transformers' with the share of a call's time in dense projections (dense_share)."""
    context = ids.shape[1]
    last = []  # the last timed prefill's cache: a long prefill is not run again for the decode steps

    def prefill_once():
        last[:] = [runner.prefill(ids)[1]]

    prefill = timing.time_call(prefill_once, device, budget_s, warmup=0)
    cache = last[0]
    size = runner.cache_bytes(cache)
    token = ids[:, -1:]
    decode = timing.time_call(lambda: runner.decode(token, cache, context), device, budget_s / 4, flush_cache=False)
    # transformers' share only: its experts (grouped_mm) and Gated DeltaNet (matmul) are not nn.Linear calls
    shares = {"prefill": dense_share(lambda: runner.prefill(ids)), "decode": dense_share(
        lambda: runner.decode(token, cache, context))} if isinstance(runner, Transformers) else {}
    return [dict(context=context, phase=phase, median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                 repeats=t.repeats, threads=t.threads, tokens_per_s=tokens / (t.median_ms / 1e3), cache_bytes=size,
                 dense_share=shares.get(phase))
            for phase, t, tokens in (("prefill", prefill, context), ("decode", decode, 1))]


def _error(exc) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def make_runner(path, name, device, dtype, longest: int):
    """The runner called `name`: "transformers", a llama.cpp GGUF ("llama.cpp-f32", "llama.cpp-q8_0") with room
    for `longest` tokens and the decode steps, or a lab backend."""
    if name == "transformers":
        return Transformers(path, device, dtype)
    if name in llama_cpp.RUNNERS:
        return llama_cpp.Runner(path, llama_cpp.RUNNERS[name], torch.get_num_threads(), longest + MAX_DECODE_STEPS)
    return Lab(path, name, device, dtype)


def measure_runner(path, variant, name, contexts, device, dtype, budget_s, threads) -> list[dict]:
    """One runner on one checkpoint at every context, after an untimed prefill and decode at WARMUP_CONTEXT.
    Runs in a process of its own (see sweep), with `threads` torch (and llama.cpp) threads."""
    torch.set_num_threads(threads)
    cfg = model.ModelConfig.from_folder(path)
    base = dict(op="model", backend=name, device=device, dtype=str(dtype).removeprefix("torch."),
                shape=shape_label(cfg), variant=variant, params=_params(path),
                peer=name == "transformers" or name in llama_cpp.RUNNERS)
    rows = []
    with torch.inference_mode(), transformers_torch_path():
        try:
            runner = make_runner(path, name, device, dtype, max(contexts))
            warm = torch.randint(cfg.vocab_size, (1, WARMUP_CONTEXT), generator=torch.Generator().manual_seed(1))
            _, cache = runner.prefill(warm.to(device))
            runner.decode(warm[:, -1:].to(device), cache, WARMUP_CONTEXT)
        except Exception as exc:
            return [dict(base, error=_error(exc))]
        base["backends"] = ";".join(f"{op}={b}" for op, b in getattr(runner.m, "backends", {}).items())
        gen = torch.Generator().manual_seed(0)
        for context in contexts:
            ids = torch.randint(cfg.vocab_size, (1, context), generator=gen).to(device)
            try:
                rows += [dict(base, **r) for r in measure(runner, ids, device, budget_s)]
            except Exception as exc:  # a failing context must not lose the others' rows
                rows.append(dict(base, context=context, error=_error(exc)))
                print(f"  {name:>14} {variant:>13} T={context:>6}: {rows[-1]['error']}", flush=True)
                break
            print(f"  {name:>14} {variant:>13} T={context:>6}: prefill {rows[-2]['tokens_per_s']:8.1f} tok/s,"
                  f" decode {rows[-1]['tokens_per_s']:7.2f} tok/s", flush=True)
    return rows


def training_model(path, name, device, dtype):
    """(module, logits) that `name` trains: transformers' Qwen3_5MoeForCausalLM, or the lab model on
    model.train.training_backends(name); logits: ids [B, T] -> [B, T, vocab]."""
    if name == "transformers":
        from transformers import Qwen3_5MoeForCausalLM

        m = Qwen3_5MoeForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        return m, lambda ids: m(ids, use_cache=False).logits
    m = model.from_pretrained(path, backend=training_backends(name, device), dtype=dtype, device=device)
    return m, m


def measure_training(path, variant, name, context, device, dtype, budget_s, threads) -> list[dict]:
    """Training steps of one runner (model.train.train_step: forward, backward, AdamW step) on one sequence of
    `context` tokens, after an untimed step on it (compilation, autotuning, the optimizer's state), with
    bench.timing's timer (caches not flushed: a step's working set far exceeds them). One row, phase "train":
    median, p20, p80 of the whole step, tokens_per_s = context / median, and the median of each part
    (forward_ms, backward_ms, optimizer_ms). Runs in a process of its own (see sweep), with `threads` threads."""
    torch.set_num_threads(threads)
    cfg = model.ModelConfig.from_folder(path)
    base = dict(op="model", backend=name, device=device, dtype=str(dtype).removeprefix("torch."),
                shape=shape_label(cfg), variant=variant, params=_params(path), peer=name == "transformers",
                context=context, phase="train")
    ids = torch.randint(cfg.vocab_size, (1, context), generator=torch.Generator().manual_seed(0)).to(device)
    parts = {part: [] for part in STEP_PARTS}

    def step():
        for part, seconds in train_step(m, ids, optimizer, logits, lambda: timing.synchronize(device))[1].items():
            parts[part].append(seconds * 1e3)

    with transformers_torch_path():
        try:
            m, logits = training_model(path, name, device, dtype)
            m.train()
            base["backends"] = ";".join(f"{op}={b}" for op, b in getattr(m, "backends", {}).items())
            optimizer = torch.optim.AdamW(m.parameters(), lr=TRAIN_LR, weight_decay=0.0)
            step()
            for samples in parts.values():
                samples.clear()
            t = timing.time_call(step, device, budget_s, warmup=0, flush_cache=False)
        except Exception as exc:
            return [dict(base, error=_error(exc))]
    row = dict(base, median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, repeats=t.repeats, threads=t.threads,
               tokens_per_s=context / (t.median_ms / 1e3),
               **{f"{part}_ms": statistics.median(samples) for part, samples in parts.items()})
    print(f"  {name:>14} {variant:>13} T={context:>6}: train {row['tokens_per_s']:8.1f} tok/s (forward "
          f"{row['forward_ms']:.0f} + backward {row['backward_ms']:.0f} + optimizer {row['optimizer_ms']:.0f} ms)",
          flush=True)
    return [row]


def floor_rows(rows, paths, device, dtype) -> None:
    """Adds to every decode row its step's bytes by part (decode_step_bytes: *_bytes, step_bytes), the copy
    bandwidth of a working set that size (floor_gbps, measured now, once per size), the floor (floor_ms = bytes /
    bandwidth) and x_floor = median / floor."""
    gbps = {}
    for variant, path in paths.items():
        m = model.from_pretrained(path, backend="reference", dtype=dtype, device=device)
        for row in rows:
            if row.get("phase") != "decode" or row["variant"] != variant or row.get("error"):
                continue
            parts = decode_step_bytes(m, int(row["context"]))
            total = sum(parts.values())
            if total not in gbps:
                gbps[total] = timing.copy_gbps(device, budget_s=0.3, nbytes=total)
            row.update({f"{part}_bytes": n for part, n in parts.items()}, step_bytes=total, floor_gbps=gbps[total],
                       floor_ms=total / (gbps[total] * 1e9) * 1e3)
            row["x_floor"] = row["median_ms"] / row["floor_ms"]


def memory_rows(paths, device, dtype):
    """Cache bytes against context, measured on allocated caches (zero pages: nothing is touched) and, for
    the real Qwen3.5-35B-A3B shape, computed from the config."""
    rows = []
    for variant, path in paths.items():
        m = model.from_pretrained(path, backend="reference", dtype=dtype, device=device)
        for context in MEMORY_CONTEXTS:
            measured = m.new_cache(1, context).nbytes()
            assert measured == cache_bytes_from_shapes(m.config, 1, context, m.embed_tokens.weight.element_size())
            rows.append(dict(op="model", backend="any", device=device, dtype=str(dtype).removeprefix("torch."),
                             shape="bench config", context=context, phase="cache", variant=variant,
                             cache_bytes=measured, how="measured"))
    real = model.ModelConfig()  # transformers' defaults are Qwen3.5-35B-A3B
    for variant, cfg in {"hybrid": real, "all_attention": model.ModelConfig(
            num_hidden_layers=real.num_hidden_layers, layer_types=("full_attention",) * real.num_hidden_layers)}.items():
        for context in MEMORY_CONTEXTS:
            rows.append(dict(op="model", backend="any", device=device, dtype="bfloat16", shape="Qwen3.5-35B-A3B",
                             context=context, phase="cache", variant=variant,
                             cache_bytes=cache_bytes_from_shapes(cfg, 1, context, 2), how="computed from shapes"))
    return rows


VARIANT_STYLE = {"hybrid": "-o", "all_attention": "--s"}


def _series(rows, phase, key="tokens_per_s"):
    """{(backend, variant): [(context, value)]} of the measured rows of a phase."""
    found = {}
    for r in rows:
        if r.get("phase") == phase and not r.get("error") and r.get(key) is not None:
            found.setdefault((r["backend"], r["variant"]), []).append((int(r["context"]), r[key]))
    return {k: sorted(v) for k, v in sorted(found.items())}


def _colors(rows):
    import matplotlib.pyplot as plt

    names = sorted({r["backend"] for r in rows if r.get("phase") in ("prefill", "decode", "train")})
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {name: cycle[i % len(cycle)] for i, name in enumerate(names)}


def _legend_below(fig, axes, columns=3):
    """One legend for the figure, under the axes (never over the data)."""
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=columns, fontsize=7,
               frameon=False)


def plot(rows, out: Path):
    """model_cache_memory.png, model_tokens_per_s.png, model_gap.png, model_decode_floor.png and, with training
    rows, model_train.png into out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = _colors(rows)
    fig, ax = plt.subplots(figsize=(6, 4.6), layout="constrained")
    for shape, color in (("bench config", "C0"), ("Qwen3.5-35B-A3B", "C1")):
        for variant, style in VARIANT_STYLE.items():
            pts = [(r["context"], r["cache_bytes"] / 2**20) for r in rows
                   if r.get("phase") == "cache" and r["shape"] == shape and r["variant"] == variant]
            if pts:
                ax.plot(*zip(*pts), style, color=color, label=f"{shape}, {variant}")
    ax.set(xscale="log", yscale="log", ylabel="cache (MiB, batch 1)", title="Recurrent state + KV cache")
    _context_axis(ax, list(MEMORY_CONTEXTS))
    _legend_below(fig, [ax], 2)
    fig.savefig(out / "model_cache_memory.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8), layout="constrained")
    for ax, phase in zip(axes, ("prefill", "decode")):
        for (backend, variant), pts in _series(rows, phase).items():
            ax.plot(*zip(*pts), VARIANT_STYLE[variant], color=colors[backend], label=f"{backend}, {variant}")
        ax.set(xscale="log", yscale="log", ylabel="tokens/s", title=phase)
        _context_axis(ax, sorted({c for pts in _series(rows, phase).values() for c, _ in pts}))
    fig.suptitle("The model: hybrid (3 Gated DeltaNet : 1 attention) and its all-attention twin")
    _legend_below(fig, axes, 4)
    fig.savefig(out / "model_tokens_per_s.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8), layout="constrained")
    for ax, phase in zip(axes, ("prefill", "decode")):
        series = _series(rows, phase)
        for backend in sorted({b for b, _ in series}):
            hybrid, twin = dict(series.get((backend, "hybrid"), [])), dict(series.get((backend, "all_attention"), []))
            pts = [(c, hybrid[c] / twin[c]) for c in sorted(hybrid) if c in twin]
            if pts:
                ax.plot(*zip(*pts), "-o", color=colors[backend], label=backend)
        if phase == "decode":  # what bandwidth alone predicts: the twin's bytes per step over the hybrid's
            steps = _series(rows, "decode", "step_bytes")
            hybrid = dict(next((v for (b, var), v in steps.items() if var == "hybrid"), []))
            twin = dict(next((v for (b, var), v in steps.items() if var == "all_attention"), []))
            pts = [(c, twin[c] / hybrid[c]) for c in sorted(hybrid) if c in twin]
            if pts:
                ax.plot(*zip(*pts), ":", color="black", label="bytes per step, all-attention / hybrid")
        ax.axhline(1, color="grey", linewidth=0.8)
        ax.set(xscale="log", ylabel="hybrid tokens/s / all-attention tokens/s", title=f"{phase}: the hybrid's lead")
        _context_axis(ax, sorted({c for pts in series.values() for c, _ in pts}))
    _legend_below(fig, axes, 4)
    fig.savefig(out / "model_gap.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.8), layout="constrained", width_ratios=(1.3, 1, 1))
    ax = axes[0]
    for (backend, variant), pts in _series(rows, "decode", "median_ms").items():
        ax.plot(*zip(*pts), VARIANT_STYLE[variant][-1], color=colors[backend], label=f"{backend}, {variant}")
    floors = _series(rows, "decode", "floor_ms")
    for variant, style in VARIANT_STYLE.items():
        pts = next((v for (b, var), v in floors.items() if var == variant), None)
        if pts:
            ax.plot(*zip(*pts), style[:-1], color="black", label=f"floor, {variant}")
    ax.set(xscale="log", yscale="log", ylabel="ms per decode step (batch 1)",
           title="decode step: measured (markers), floor (lines)")
    parts = {"weights": "C7", "experts": "C2", "states": "C4", "kv": "C3"}
    top = 0
    for ax, variant in zip(axes[1:], VARIANT_STYLE):
        by_part = {part: dict(next((v for (b, var), v in _series(rows, "decode", f"{part}_bytes").items()
                                    if var == variant), [])) for part in parts}
        contexts = sorted(by_part["weights"])
        if contexts:
            ax.stackplot(contexts, *[[by_part[part][c] / 2**20 for c in contexts] for part in parts],
                         colors=list(parts.values()), labels=[f"bytes: {part}" for part in parts], alpha=0.8)
            top = max(top, sum(by_part[part][contexts[-1]] for part in parts) / 2**20)
        ax.set(xscale="log", ylabel="MiB moved per decode step", title=f"bytes per step, {variant}")
    for ax in axes[1:]:
        ax.set_ylim(0, 1.05 * top or 1)
    for ax in axes:
        _context_axis(ax, sorted({int(r["context"]) for r in rows if r.get("phase") == "decode"}))
    _legend_below(fig, axes, 5)
    fig.savefig(out / "model_decode_floor.png", dpi=120)
    plt.close(fig)

    train = _measured(rows, "train")
    if train:
        _plot_training(train, out / "model_train.png")


def _plot_training(train, path: Path) -> None:
    """Horizontal bars, one per runner at the longest trained context: ms per training step split into forward,
    backward and optimizer (the median of each part), the step's p20-p80 as a whisker, tokens/s at the end."""
    import matplotlib.pyplot as plt

    context = max(int(r["context"]) for r in train)
    at = sorted((r for r in train if int(r["context"]) == context), key=lambda r: r["tokens_per_s"])
    theirs = next((r for r in at if r["backend"] == "transformers"), None)
    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.45 * len(at)), layout="constrained")
    y = range(len(at))
    left = [0.0] * len(at)
    for part, color in zip(STEP_PARTS, ("C0", "C1", "C2")):
        widths = [r[f"{part}_ms"] for r in at]
        ax.barh(y, widths, left=left, color=color, height=0.6, label=part)
        left = [a + b for a, b in zip(left, widths)]
    ax.errorbar([r["median_ms"] for r in at], y, xerr=[[r["median_ms"] - r["p20_ms"] for r in at],
                                                     [r["p80_ms"] - r["median_ms"] for r in at]],
                fmt="none", color="black", capsize=3, linewidth=1, label="whole step, p20-p80")
    for i, r in enumerate(at):
        vs = f", {r['tokens_per_s'] / theirs['tokens_per_s']:.2f}x transformers" if theirs and r is not theirs else ""
        ax.annotate(f" {r['tokens_per_s']:.0f} tok/s{vs}", (max(r["p80_ms"], left[i]), i), va="center", fontsize=8)
    ax.set_yticks(list(y), [r["backend"] + (" (peer)" if _peer(r) else "") for r in at])
    ax.set_xlim(0, 1.35 * max(max(r["p80_ms"], w) for r, w in zip(at, left)))
    ax.set(xlabel="ms per training step (median of each part)",
           title=f"Training step (forward, backward, AdamW) on {context} tokens, batch 1, {at[0]['dtype']}")
    _legend_below(fig, [ax], 4)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _context_axis(ax, contexts):
    """Ticks at the measured contexts, written 512, 1K, ..., 32K."""
    from matplotlib.ticker import NullLocator

    if contexts:
        ax.set_xticks(contexts, [f"{c // 1024}K" if c >= 1024 else str(c) for c in contexts])
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("context (tokens)")


def _params(path) -> int:
    """Number of parameters stored in a checkpoint folder."""
    from safetensors import safe_open

    total = 0
    for file in Path(path).glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total


def model_dtype(device: str) -> torch.dtype:
    """The model's dtype in the benchmark: float32 on CPU, bfloat16 on a GPU."""
    return torch.float32 if device == "cpu" else torch.bfloat16


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


def summary(rows) -> list[str]:
    """The targets: ours / transformers at the longest context (prefill, decode), cache at 32K."""
    lines = []
    longest = max((int(r["context"]) for r in rows if r.get("phase") == "prefill"), default=None)
    for phase in ("prefill", "decode"):
        at = {r["backend"]: r["tokens_per_s"] for r in rows
              if r.get("phase") == phase and r["context"] == longest and r["variant"] == "hybrid"}
        for backend, tps in at.items():
            if backend != "transformers" and "transformers" in at:
                lines.append(f"{phase} at {longest}: {backend} {tps:.1f} tok/s = {tps / at['transformers']:.2f}x "
                             f"transformers ({at['transformers']:.1f} tok/s)")
        share = next((r.get("dense_share") for r in rows if r.get("phase") == phase and r["context"] == longest
                      and r["variant"] == "hybrid" and r["backend"] == "transformers"), None)
        if share is not None and share == share:  # not NaN
            lines.append(f"{phase} at {longest}: transformers spends {share:.0%} of its time in dense projections "
                         f"(nn.Linear), the same GEMMs in any implementation: at most {1 / share:.1f}x faster "
                         f"while they run as fast")
    lines += _floor_summary(rows) + _llama_summary(rows) + _train_summary(rows)
    for shape in ("bench config", "Qwen3.5-35B-A3B"):
        mem = {r["variant"]: r["cache_bytes"] for r in rows
               if r.get("phase") == "cache" and r["context"] == 32768 and r["shape"] == shape}
        if len(mem) == 2:
            lines.append(f"cache at 32K ({shape}): hybrid {mem['hybrid'] / 2**20:.1f} MiB, all-attention "
                         f"{mem['all_attention'] / 2**20:.1f} MiB, ratio {mem['hybrid'] / mem['all_attention']:.3f}")
    return lines


def _measured(rows, phase):
    return [r for r in rows if r.get("phase") == phase and not r.get("error") and r.get("median_ms") is not None]


def _peer(row) -> bool:
    """Whether the row is a peer's (the CSV may hold the flag as text)."""
    return str(row.get("peer")).lower() == "true"


def _at_most(rows, context):
    """The longest measured context up to `context` (the shortest beyond it when none is that short)."""
    found = sorted({int(r["context"]) for r in rows})
    return max((c for c in found if c <= context), default=found[0] if found else None)


def _floor_summary(rows) -> list[str]:
    """The decode floor's targets: the fastest lab backend at 2K (hybrid) and at the longest context (both
    variants), as multiples of their floors; the bytes per step of the twin over the hybrid's there."""
    # rows without a floor (written before the floor was measured, or a NaN read back from the CSV) are left out
    decode = [r for r in _measured(rows, "decode") if not _peer(r) and math.isfinite(r.get("x_floor", math.nan))]
    if not decode:
        return []
    lines = []
    longest = max(int(r["context"]) for r in decode)
    short = _at_most(decode, 2048)
    for context, variants in ((short, ("hybrid",) if short != longest else ()), (longest, ("hybrid", "all_attention"))):
        for variant in variants:
            at = [r for r in decode if int(r["context"]) == context and r["variant"] == variant]
            if at:
                best = min(at, key=lambda r: r["median_ms"])
                lines.append(f"decode floor at {context} ({variant}): {best['backend']} {best['median_ms']:.1f} ms "
                             f"per step = {best['x_floor']:.2f}x its floor ({best['floor_ms']:.1f} ms: "
                             f"{best['step_bytes'] / 2**20:.0f} MiB at {best['floor_gbps']:.1f} GB/s)")
    by_variant = {r["variant"]: r["step_bytes"] for r in decode if int(r["context"]) == longest}
    if len(by_variant) == 2:
        lines.append(f"bytes per decode step at {longest}: all-attention / hybrid = "
                     f"{by_variant['all_attention'] / by_variant['hybrid']:.2f}")
    return lines


def _llama_summary(rows) -> list[str]:
    """The lab's fastest backend against llama.cpp (F32) at 2K: decode and prefill tokens/s; the parity rows."""
    lines = []
    for phase in ("prefill", "decode"):
        measured = [r for r in _measured(rows, phase) if r["variant"] == "hybrid"]
        context = _at_most(measured, 2048)
        at = [r for r in measured if int(r["context"]) == context]
        theirs = next((r for r in at if r["backend"] == "llama.cpp-f32"), None)
        ours = [r for r in at if not _peer(r)]
        if theirs and ours:
            best = max(ours, key=lambda r: r["tokens_per_s"])
            lines.append(f"{phase} at {context}: {best['backend']} {best['tokens_per_s']:.1f} tok/s = "
                         f"{best['tokens_per_s'] / theirs['tokens_per_s']:.2f}x llama.cpp F32 "
                         f"({theirs['tokens_per_s']:.1f} tok/s, same threads)")
    for r in rows:
        if r.get("phase") == "parity":
            lines.append(f"{r['backend']} ({r['variant']}): " + (r["error"] if r.get("error") else
                         f"prompt logits within {r['rel_err']:.1e} of the lab's; greedy tokens "
                         + ("identical" if r["tokens_equal"] else f"differ {r['divergence']}")))
        elif r.get("error") and r["backend"] in llama_cpp.RUNNERS and r.get("phase") is None:
            lines.append(f"{r['backend']} ({r['variant']}) skipped: {r['error']}")
    return lines


def _train_summary(rows) -> list[str]:
    """Training tokens/s of each runner at the longest trained context, its step split into forward, backward and
    optimizer; the lab's fastest against transformers there (the target declared in bench.ops' model spec)."""
    train = _measured(rows, "train")
    if not train:
        return []
    context = max(int(r["context"]) for r in train)
    at = sorted((r for r in train if int(r["context"]) == context), key=lambda r: -r["tokens_per_s"])
    lines = [f"train at {context}: {r['backend']} {r['tokens_per_s']:.1f} tok/s, {r['median_ms']:.0f} ms per step "
             f"(forward {r['forward_ms']:.0f} + backward {r['backward_ms']:.0f} + optimizer {r['optimizer_ms']:.0f} "
             f"ms)" for r in at]
    theirs = next((r for r in at if r["backend"] == "transformers"), None)
    ours = [r for r in at if not _peer(r)]
    if theirs and ours:
        target = next(t for t in OPS["model"].targets if t.match.get("phase") == "train")
        ratio = ours[0]["tokens_per_s"] / theirs["tokens_per_s"]
        lines.append(f"train at {context}: {ours[0]['backend']} (the lab's fastest) = {ratio:.2f}x transformers' "
                     f"tokens/s on the same checkpoint (target: at least {target.threshold:g}x at "
                     f"{target.match['context']} tokens)")
    return lines


def main(argv=None):
    parser = cli.ArgumentParser(prog="python -m bench.model", description=__doc__,
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


if __name__ == "__main__":
    main()
