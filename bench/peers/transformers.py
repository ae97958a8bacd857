"""transformers as a bench peer: its Qwen3_5MoeForCausalLM as a runner of the model sweep (Transformers: prefill,
decode on a cache filled to a context, transformers_torch_path), and the issue's measurement on CPU: the lab's torch
backend against transformers' pure-torch Qwen3.5 code (main):

    python -m bench.peers.transformers [--parts gdr moe] [--repeats 5]

(a) Chunked gated delta rule, B = 1, Hk = 2, Hv = 4, K = V = 128, float32, T = 2048 and 8192, q/k l2-normalised,
    final state written: kernels' torch backend (mode="chunk") vs transformers' torch_chunk_gated_delta_rule.
(b) The MoE experts at N = 1 and N = 512 tokens (hidden 2048, 256 experts, top-8, expert size 512, float32):
    kernels' torch backend vs transformers' eager Qwen3_5MoeExperts.

Each pair: a warm-up call each, then --repeats rounds of one timed call of each, interleaved (so that both
see the same load on a shared machine), under torch.inference_mode; median, p20 and p80 per side, the
speedup as the ratio of medians and as the median of the per-round ratios; the relative difference of
their outputs (parity). The copy bandwidth and matmul rate of the machine are measured first.
Exits 2, measuring nothing, when a part's backends cannot run here (e.g. transformers is not installed); 1
when a part failed while it ran.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
import traceback

import numpy as np
import torch

import kernellab
from bench import cli
from bench.ops import make
from bench.ops.moe import routing_ids
from bench.timing import copy_gbps, device_name, matmul_tflops
from model.cache import SAMPLE_TOKENS

GDR_SHAPE = dict(B=1, Hk=2, Hv=4, K=128, V=128)
GDR_LENGTHS = (2048, 8192)
MOE_SHAPE = dict(D=2048, E=256, top_k=8, I=512)
MOE_TOKENS = (1, 512)


def _rel_diff(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _line(label, samples_ms):
    p20, median, p80 = np.percentile(samples_ms, [20, 50, 80])
    return f"  {label:<14} median {median:10.2f} ms   p20 {p20:10.2f}   p80 {p80:10.2f}   ({len(samples_ms)} runs)"


def _compare(title, ours, theirs, args, parity):
    """Times ours() and theirs(): a warm-up call each, then args.repeats interleaved rounds of one call each.
    Prints the pair; returns the median milliseconds of ours."""
    print(title)
    ours_ms, theirs_ms = [], []
    with torch.inference_mode():
        ours_out, theirs_out = ours(), theirs()
        for _ in range(args.repeats):
            for fn, samples in ((ours, ours_ms), (theirs, theirs_ms)):
                start = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - start) * 1e3)
    print(_line("kernellab.torch", ours_ms))
    print(_line("transformers", theirs_ms))
    ratios = np.array(theirs_ms) / np.array(ours_ms)
    print(f"  speedup: {np.median(theirs_ms) / np.median(ours_ms):.2f}x (ratio of medians), "
          f"{np.median(ratios):.2f}x (median of per-round ratios)   parity: {parity(ours_out, theirs_out)}")
    return float(np.median(ours_ms))


def _transformers_chunk_gdr():
    """transformers' pure-torch chunked gated delta rule (the original under its hub-kernel decorator)."""
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as qwen

    fn = qwen.torch_chunk_gated_delta_rule
    return getattr(fn, "__wrapped__", fn)


def gated_delta_rule_part(args):
    ours_fn = kernellab.get("gated_delta_rule", "torch")  # BackendUnavailable / ImportError if missing
    theirs_fn = _transformers_chunk_gdr()
    for T in GDR_LENGTHS:
        x = make("gated_delta_rule", **GDR_SHAPE, T=T, seed=T, use_qk_l2norm=True, output_final_state=True)

        def ours():
            return ours_fn(**x, mode="chunk")

        def theirs():
            return theirs_fn(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=None,
                             output_final_state=True, use_qk_l2norm_in_kernel=True)

        def parity(a, b):
            return f"rel diff o {_rel_diff(a[0], b[0]):.1e}, final state {_rel_diff(a[1], b[1]):.1e}"

        _compare(f"gated delta rule, chunk, T = {T}, {GDR_SHAPE}, float32", ours, theirs, args, parity)


def _expert_weights(D, E, I, seed=0):
    """w_gate_up [E, 2I, D], w_down [E, D, I] drawn directly in float32 (bench.ops.moe.moe_inputs draws float64 first,
    which at this size is 6.4 GB), scaled like nn.Linear's init."""
    gen = torch.Generator().manual_seed(seed)
    w_gate_up = torch.randn(E, 2 * I, D, generator=gen).mul_(D ** -0.5)
    w_down = torch.randn(E, D, I, generator=gen).mul_(I ** -0.5)
    return w_gate_up, w_down


def moe_part(args):
    D, E, top_k, I = (MOE_SHAPE[k] for k in ("D", "E", "top_k", "I"))
    w_gate_up, w_down = _expert_weights(D, E, I)
    ours_fn, theirs_fn = kernellab.get("moe", "torch"), kernellab.get("moe", "transformers")
    for N in MOE_TOKENS:
        weights, ids = routing_ids(N, E, top_k, seed=N)
        x = torch.randn(N, D, generator=torch.Generator().manual_seed(N + 1))
        active = int(ids.unique().numel())
        floor_ms = active * 3 * D * I * 4 / (args.copy_gbps * 1e9) * 1e3
        flops = 2 * N * top_k * 3 * D * I

        def ours():
            return ours_fn(x, weights, ids, w_gate_up, w_down)

        def theirs():
            return theirs_fn(x, weights, ids, w_gate_up, w_down)

        def parity(a, b):
            return f"rel diff y {_rel_diff(a, b):.1e}"

        ours_ms = _compare(f"MoE experts, N = {N}, {MOE_SHAPE}, float32 ({active} active experts)",
                           ours, theirs, args, parity)
        print(f"  kernellab.torch: {flops / ours_ms / 1e6:.1f} GFLOP/s (matmul ceiling {args.matmul_gflops:.0f}); "
              f"floor of reading the active experts' weights {floor_ms:.2f} ms at {args.copy_gbps:.1f} GB/s "
              f"(reached {floor_ms / ours_ms:.0%})")


PARTS = {"gdr": gated_delta_rule_part, "moe": moe_part}
# The registry backends each part calls, or whose requirements stand for the transformers code it calls.
PART_BACKENDS = {"gdr": [("gated_delta_rule", "torch"), ("gated_delta_rule", "transformers")],
                 "moe": [("moe", "torch"), ("moe", "transformers")]}


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

    @torch.inference_mode()
    def fill(self, context: int, sample_tokens: int = SAMPLE_TOKENS, seed: int = 0):
        """Its DynamicCache brought to `context` tokens as model.cache.fill brings the lab's: a real prefill of
        min(context, sample_tokens) random tokens, whose linear-attention states are kept and whose keys and
        values [B, Hkv, T, Dh] are repeated along T to `context` positions; the layers' token counts set to
        `context`. Returns the cache."""
        sample = min(context, sample_tokens)
        ids = torch.randint(self.m.config.vocab_size, (1, sample), generator=torch.Generator().manual_seed(seed))
        cache = self.prefill(ids.to(self.m.device))[1]
        repeat = torch.arange(context, device=self.m.device) % sample
        for layer in cache.layers:
            if hasattr(layer, "cumulative_length_linear"):  # a Gated DeltaNet layer: states of fixed size
                layer.cumulative_length_linear.fill_(context)
            else:
                layer.keys = layer.keys[:, :, repeat].contiguous()
                layer.values = layer.values[:, :, repeat].contiguous()
        if cache.get_seq_length() != context:
            raise RuntimeError(f"transformers' cache holds {cache.get_seq_length()} tokens after filling {context}: "
                               f"its cache layout changed")
        return cache

    @staticmethod
    def cache_bytes(cache):
        return None  # its DynamicCache grows by concatenation: not comparable tensor for tensor



def main(argv=None):
    parser = cli.ArgumentParser(prog="python -m bench.peers.transformers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--repeats", type=cli.positive_int, default=5,
                        help="timed calls per variant, after a warm-up call")
    args = parser.parse_args(argv)
    for part in args.parts:
        for op, name in PART_BACKENDS[part]:
            if problem := cli.backend_problem(op, name, "cpu", torch.float32):
                parser.error(f"--parts {part}: {problem}")

    print(f"device: {device_name('cpu')}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    args.copy_gbps = copy_gbps("cpu")
    args.matmul_gflops = matmul_tflops(torch.float32, "cpu") * 1e3
    print(f"measured now: copy {args.copy_gbps:.1f} GB/s (read + write), float32 matmul "
          f"{args.matmul_gflops:.0f} GFLOP/s\n")
    failed = []
    for name in args.parts:
        try:
            PARTS[name](args)
        except Exception:  # report the part that could not run, then go on with the others
            print(f"PART {name!r} FAILED:\n{traceback.format_exc()}")
            failed.append(name)
        print()
    if failed:
        print(f"failed parts: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
