"""One runner (a lab backend, transformers, llama.cpp, vLLM's engine) timed in a process of its own: prefill, decode, training."""
from __future__ import annotations

import statistics
import time

import torch

import model
from bench import timing
from bench.peers import llama_cpp, vllm_engine
from bench.peers.transformers import Transformers, transformers_torch_path
from bench.suites.model.config import MAX_DECODE_STEPS, TRAIN_LR, WARMUP_CONTEXT, _params, shape_label
from bench.suites.model.floor import cache_bytes_from_shapes
from model.cache import fill
from model.train import STEP_PARTS, train_step, training_backends


class Lab:
    """Prefill and decode of the lab model."""

    def __init__(self, path, backend, device, dtype):
        self.m = model.from_pretrained(path, backend=backend, dtype=dtype, device=device)

    def prefill(self, ids):
        """ids [1, T] into a fresh cache; the last position's logits (all that generation needs)."""
        cache = self.m.new_cache(ids.shape[0], ids.shape[1] + MAX_DECODE_STEPS)
        return self.m.lm_head(self.m.hidden_states(ids, cache)[:, -1:]), cache

    def fill(self, context: int):
        """A cache of one sequence brought to `context` tokens without prefilling them (model.cache.fill)."""
        cache = self.m.new_cache(1, context + 1)
        fill(self.m, cache, context)
        return cache

    def decode(self, token, cache, position: int):
        """One step at `position` (the cache rewound there first: repeated timed steps all see that context)."""
        cache.lengths.fill_(position)
        cache.host_lengths[0] = position
        return self.m(token, cache)

    def cache_bytes(self, cache):
        """Bytes of a cache sized for exactly the tokens seen (the timed one has room for decode steps)."""
        return cache_bytes_from_shapes(self.m.config, 1, cache.position, self.m.embed_tokens.weight.element_size())


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


def _timed(phase: str, context: int, t, tokens: int, **more) -> dict:
    return dict(context=context, phase=phase, median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                repeats=t.repeats, threads=t.threads, tokens_per_s=tokens / (t.median_ms / 1e3), **more)


def measure_prefill(runner, ids, device, budget_s) -> tuple[dict, object]:
    """Prefill of ids [1, T] into a fresh cache (the runner warmed up already: at long contexts a call may be timed
    once): its row (transformers' with dense_share) and the last timed call's cache."""
    last = []  # the last timed prefill's cache, for a runner that decodes only after a prefill

    def prefill_once():
        last[:] = [runner.prefill(ids)[1]]

    t = timing.time_call(prefill_once, device, budget_s, warmup=0)
    # transformers' share only: its experts (grouped_mm) and Gated DeltaNet (matmul) are not nn.Linear calls
    share = dense_share(lambda: runner.prefill(ids)) if isinstance(runner, Transformers) else None
    return _timed("prefill", ids.shape[1], t, ids.shape[1], cache_bytes=runner.cache_bytes(last[0]),
                  dense_share=share), last[0]


def measure_decode(runner, cache, token, context: int, device, budget_s, cache_fill: str) -> dict:
    """Decode steps at `context` on `cache` (bench.timing's timer, caches not flushed between steps: a server's
    steps follow one another). cache_fill says how the cache got there: "filled" (model.cache.fill, or the peer's
    fill: a short prefill's states, keys and values repeated) or "prefilled" (a prefill of `context` tokens)."""
    size = runner.cache_bytes(cache)
    t = timing.time_call(lambda: runner.decode(token, cache, context), device, budget_s, flush_cache=False)
    share = dense_share(lambda: runner.decode(token, cache, context)) if isinstance(runner, Transformers) else None
    return _timed("decode", context, t, 1, cache_bytes=size, dense_share=share, cache_fill=cache_fill)


def _error(exc) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def make_runner(path, name, device, dtype, longest: int):
    """The runner called `name`: "transformers", a llama.cpp GGUF ("llama.cpp-f32", "llama.cpp-q8_0") or vLLM's
    engine (bf16) with room for `longest` tokens and the decode steps, or a lab backend. Those with a fill(context)
    method decode on caches filled to each context; llama.cpp's and vLLM's cannot be filled from outside: they decode
    after their prefills."""
    if name == "transformers":
        return Transformers(path, device, dtype)
    if name in llama_cpp.RUNNERS:
        return llama_cpp.Runner(path, llama_cpp.RUNNERS[name], torch.get_num_threads(), longest + MAX_DECODE_STEPS)
    if name == vllm_engine.NAME:
        return vllm_engine.Runner(path, torch.get_num_threads(), longest + MAX_DECODE_STEPS)
    return Lab(path, name, device, dtype)


def measure_runner(path, variant, name, prefill_contexts, decode_contexts, device, dtype, budget_s,
                   threads) -> list[dict]:
    """One runner on one checkpoint, after an untimed prefill and decode at WARMUP_CONTEXT: a prefill row at each
    of prefill_contexts, then a decode row at each of decode_contexts on a cache filled to it (Lab.fill,
    Transformers.fill); a runner without fill (llama.cpp, vLLM's engine) decodes after each of its prefills instead. The decode
    steps get a quarter of `budget_s`. Runs in a process of its own (see sweep), with `threads` torch (and
    llama.cpp) threads."""
    torch.set_num_threads(threads)
    cfg = model.ModelConfig.from_folder(path)
    base = dict(op="model", backend=name, device=device, dtype=str(dtype).removeprefix("torch."),
                shape=shape_label(cfg), variant=variant, params=_params(path),
                peer=name in ("transformers", vllm_engine.NAME) or name in llama_cpp.RUNNERS)
    rows = []

    def failed(phase, context, exc) -> None:  # a failing context must not lose the others' rows
        rows.append(dict(base, phase=phase, context=context, error=_error(exc)))
        print(f"  {name:>14} {variant:>13} T={context:>6}: {rows[-1]['error']}", flush=True)

    with torch.inference_mode(), transformers_torch_path():
        try:
            runner = make_runner(path, name, device, dtype, max((*prefill_contexts, *decode_contexts), default=1))
            warm = torch.randint(cfg.vocab_size, (1, WARMUP_CONTEXT), generator=torch.Generator().manual_seed(1))
            _, cache = runner.prefill(warm.to(device))
            runner.decode(warm[:, -1:].to(device), cache, WARMUP_CONTEXT)
        except Exception as exc:
            print(f"  {name:>14} {variant:>13}: {_error(exc)}", flush=True)  # a runner that cannot start shows
            return [dict(base, phase="start", error=_error(exc))]
        # a peer (llama.cpp's Runner) has no lab model, hence no backends
        backends = getattr(getattr(runner, "m", None), "backends", {})
        base["backends"] = ";".join(f"{op}={b}" for op, b in backends.items())
        fills = hasattr(runner, "fill")
        gen = torch.Generator().manual_seed(0)
        for context in prefill_contexts:
            ids = torch.randint(cfg.vocab_size, (1, context), generator=gen).to(device)
            try:
                row, cache = measure_prefill(runner, ids, device, budget_s)
                rows.append(dict(base, **row))
                if not fills:
                    rows.append(dict(base, **measure_decode(runner, cache, ids[:, -1:], context, device, budget_s / 4,
                                                            "prefilled")))
            except Exception as exc:
                failed("prefill", context, exc)
                break
            print(f"  {name:>14} {variant:>13} T={context:>6}: prefill {row['tokens_per_s']:8.1f} tok/s", flush=True)
        token = torch.randint(cfg.vocab_size, (1, 1), generator=gen).to(device)
        for context in decode_contexts if fills else ():
            try:
                row = measure_decode(runner, runner.fill(context), token, context, device, budget_s / 4, "filled")
            except Exception as exc:
                failed("decode", context, exc)
                break
            rows.append(dict(base, **row))
            print(f"  {name:>14} {variant:>13} T={context:>6}: decode {row['tokens_per_s']:7.2f} tok/s on a filled "
                  f"cache", flush=True)
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
            # fused: one pass per parameter (torch's CPU kernel); the same optimizer for every runner, whose time would
            # otherwise (foreach: about half of a step here) bound every runner's ratio to transformers'
            optimizer = torch.optim.AdamW(m.parameters(), lr=TRAIN_LR, weight_decay=0.0, fused=True)
            step()
            for samples in parts.values():
                samples.clear()
            t = timing.time_call(step, device, budget_s, warmup=0, flush_cache=False)
        except Exception as exc:
            return [dict(base, phase="start", error=_error(exc))]
    row = dict(base, median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, repeats=t.repeats, threads=t.threads,
               tokens_per_s=context / (t.median_ms / 1e3),
               **{f"{part}_ms": statistics.median(samples) for part, samples in parts.items()})
    print(f"  {name:>14} {variant:>13} T={context:>6}: train {row['tokens_per_s']:8.1f} tok/s (forward "
          f"{row['forward_ms']:.0f} + backward {row['backward_ms']:.0f} + optimizer {row['optimizer_ms']:.0f} ms)",
          flush=True)
    return [row]
