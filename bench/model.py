"""The whole model: prefill and decode tokens/s against context length, per backend, for the hybrid
Qwen3.5-MoE layer pattern and for the same model with every layer full attention; cache memory (recurrent
state + KV cache) against context; on CPU, transformers' own Qwen3_5MoeForCausalLM on the same checkpoint.

    python -m bench.model [--quick] [--device cpu] [--out reports/cpu] [--threads 1] [--backend torch]

`sweep(quick, device, out)` returns the rows (bench.sweep --op model calls it) and writes
model_cache_memory.png and model_tokens_per_s.png into out. Each runner (a lab backend, or transformers)
runs in a process of its own; cache_bytes is measured on the lab's cache tensors.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import math
import multiprocessing
import tempfile
import time
from pathlib import Path

import torch

import kernels
import model
from bench import cli, timing
from model.generate import write_random_checkpoint

# Qwen3.5-35B-A3B's proportions at a quarter of its width, so a 2-core CPU runs 2K-token prefills: Gated
# DeltaNet key dim = hidden, value dim = 2 x hidden (Hv = 2 Hk, head dim 128); attention queries 2 x hidden
# (head dim 256, rotary on a quarter; 4 query heads per KV head where the real model has 8); 3 linear : 1 full.
BENCH_CONFIG = dict(vocab_size=4096, hidden_size=512, num_hidden_layers=8, num_attention_heads=4,
                    num_key_value_heads=1, head_dim=256, linear_num_key_heads=4, linear_num_value_heads=8,
                    linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
                    num_experts=32, num_experts_per_tok=4, moe_intermediate_size=128,
                    shared_expert_intermediate_size=128, max_position_embeddings=32768, tie_word_embeddings=False)
CONTEXTS = (256, 512, 1024, 2048)
QUICK_CONTEXTS = (128, 512)
MEMORY_CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768)
MAX_DECODE_STEPS = 256  # room in the KV cache for the timed decode steps


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


class Lab:
    """Prefill and decode of the lab model."""

    def __init__(self, path, backend, device, dtype):
        self.m = model.from_pretrained(path, backend=backend, dtype=dtype, device=device)

    def prefill(self, ids):
        cache = self.m.new_cache(ids.shape[0], ids.shape[1] + MAX_DECODE_STEPS)
        return self.m(ids, cache), cache

    def decode(self, token, cache):
        return self.m(token, cache)

    def cache_bytes(self, cache):
        """Bytes of a cache sized for exactly the tokens seen (the timed one has room for decode steps)."""
        return self.m.new_cache(1, cache.position).nbytes()


class Transformers:
    """Prefill and decode of transformers' Qwen3_5MoeForCausalLM (its default CPU kernels: sdpa attention,
    grouped_mm experts, the torch Gated DeltaNet)."""

    def __init__(self, path, device, dtype):
        from transformers import Qwen3_5MoeForCausalLM

        self.m = Qwen3_5MoeForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()

    @torch.inference_mode()
    def prefill(self, ids):
        out = self.m(ids, use_cache=True)
        return out.logits, out.cache

    @torch.inference_mode()
    def decode(self, token, cache):
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
    """Prefill of ids [1, T] into a fresh cache, then decode steps extending that cache by one token each
    (bench.timing's timer: a warm-up call, then repeats within the budget). Two rows; transformers' with the share
    of a call's time in dense projections (dense_share)."""
    context = ids.shape[1]
    prefill = timing.time_call(lambda: runner.prefill(ids), device, budget_s)
    _, cache = runner.prefill(ids)
    size = runner.cache_bytes(cache)
    token = ids[:, -1:]
    decode = timing.time_call(lambda: runner.decode(token, cache), device, budget_s / 4)
    # transformers' share only: its experts (grouped_mm) and Gated DeltaNet (matmul) are not nn.Linear calls
    shares = {"prefill": dense_share(lambda: runner.prefill(ids)), "decode": dense_share(
        lambda: runner.decode(token, cache))} if isinstance(runner, Transformers) else {}
    return [dict(context=context, phase=phase, median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                 repeats=t.repeats, threads=t.threads, tokens_per_s=tokens / (t.median_ms / 1e3), cache_bytes=size,
                 dense_share=shares.get(phase))
            for phase, t, tokens in (("prefill", prefill, context), ("decode", decode, 1))]


def _error(exc) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def measure_runner(path, variant, name, contexts, device, dtype, budget_s, threads) -> list[dict]:
    """One runner ("transformers" or a lab backend name) on one checkpoint at every context. Runs in a
    process of its own (see sweep), with `threads` torch threads."""
    torch.set_num_threads(threads)
    cfg = model.ModelConfig.from_folder(path)
    base = dict(op="model", backend=name, device=device, dtype=str(dtype).removeprefix("torch."),
                shape=shape_label(cfg), variant=variant, params=_params(path))
    rows = []
    with torch.inference_mode(), transformers_torch_path():
        try:
            runner = Transformers(path, device, dtype) if name == "transformers" else Lab(path, name, device, dtype)
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
                print(f"  {name:>12} {variant:>13} T={context:>5}: {rows[-1]['error']}", flush=True)
                break
            print(f"  {name:>12} {variant:>13} T={context:>5}: prefill {rows[-2]['tokens_per_s']:8.1f} tok/s,"
                  f" decode {rows[-1]['tokens_per_s']:7.2f} tok/s", flush=True)
    return rows


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


def plot(rows, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for shape in ("bench config", "Qwen3.5-35B-A3B"):
        for variant, style in (("hybrid", "-o"), ("all_attention", "--s")):
            pts = [(r["context"], r["cache_bytes"] / 2**20) for r in rows
                   if r.get("phase") == "cache" and r["shape"] == shape and r["variant"] == variant]
            if pts:
                ax.plot(*zip(*pts), style, label=f"{shape}, {variant}")
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="cache (MiB, batch 1)",
           title="Recurrent state + KV cache")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "model_cache_memory.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, phase in zip(axes, ("prefill", "decode")):
        series = sorted({(r["backend"], r["variant"]) for r in rows if r.get("phase") == phase})
        for backend, variant in series:
            pts = [(r["context"], r["tokens_per_s"]) for r in rows
                   if r.get("phase") == phase and r["backend"] == backend and r["variant"] == variant]
            ax.plot(*zip(*pts), "-o" if variant == "hybrid" else "--s", label=f"{backend}, {variant}")
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="tokens/s", title=phase)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "model_tokens_per_s.png", dpi=120)
    plt.close(fig)


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
    """Rows: op="model", backend, device, dtype, shape, context, phase ("prefill", "decode", or "cache" for
    memory-only rows), median_ms, p20_ms, p80_ms, tokens_per_s, cache_bytes, variant ("hybrid",
    "all_attention"), params, backends (the backend of each op). Writes the two PNGs into out."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = model_dtype(device)
    contexts = QUICK_CONTEXTS if quick else CONTEXTS
    budget_s = 0.5 if quick else 2.0
    # the lab's backends: every CPU (or GPU) backend of the gated delta rule but the slow reference
    names = backends or [n for n in kernels.backends("gated_delta_rule", device)
                         if n != "reference" and not kernels.registry.registered("gated_delta_rule")[n].peer]
    runners = names + (["transformers"] if device == "cpu" else [])
    rows = []
    all_attention = ["full_attention"] * BENCH_CONFIG["num_hidden_layers"]
    with tempfile.TemporaryDirectory(prefix="bench-model-") as folder:
        paths = {"hybrid": write_random_checkpoint(Path(folder) / "hybrid", **BENCH_CONFIG),
                 "all_attention": write_random_checkpoint(Path(folder) / "all_attention", **BENCH_CONFIG,
                                                          layer_types=all_attention)}
        # One process per runner: numba's thread pool, once started, slows every later torch call in its
        # process (measured: transformers' prefill 6x slower after a numba run), so no runner follows another.
        spawn = multiprocessing.get_context("spawn")
        for variant, path in paths.items():
            for name in runners:
                with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
                    rows += pool.submit(measure_runner, path, variant, name, contexts, device, dtype, budget_s,
                                        torch.get_num_threads()).result()
        with torch.inference_mode():
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
    for shape in ("bench config", "Qwen3.5-35B-A3B"):
        mem = {r["variant"]: r["cache_bytes"] for r in rows
               if r.get("phase") == "cache" and r["context"] == 32768 and r["shape"] == shape}
        if len(mem) == 2:
            lines.append(f"cache at 32K ({shape}): hybrid {mem['hybrid'] / 2**20:.1f} MiB, all-attention "
                         f"{mem['all_attention'] / 2**20:.1f} MiB, ratio {mem['hybrid'] / mem['all_attention']:.3f}")
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
    print(f"wrote {out / 'model.csv'}, {out / 'model_cache_memory.png'}, {out / 'model_tokens_per_s.png'}")


if __name__ == "__main__":
    main()
