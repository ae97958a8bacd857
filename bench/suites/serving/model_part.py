"""The model part of the serving sweep (issue 27's model targets), called by the sweep's piece (bench.suites.serving):
speculative decoding with the prompt-lookup draft against plain greedy decoding on a repetitive prompt (tokens/s,
identical output, drafts accepted), and a second request sharing a 2K-token prefix against the first (prefill time
with model.cache.PrefixCache).

The model is the small random checkpoint with a 32-token vocabulary: its greedy output soon repeats itself (what a
repetitive prompt gives a trained model); drafts are taken from that repetition. Acceptance is in the rows, so a
ratio is read with the share of drafts accepted beside it."""
from __future__ import annotations

import time

import torch

import model
from model.cache import PrefixCache
from model.generate import write_random_checkpoint

VOCAB = 32
SPECULATIVE = 4  # draft tokens per step
TARGETS = {"speculative": 1.5, "prefix_cache": 5.0}  # speedups the issue asks for


def _checkpoint(folder):
    return write_random_checkpoint(folder, seed=27, tokenizer=False, vocab_size=VOCAB)


def _best(fn, repeats: int):
    """(the fastest of `repeats` calls in seconds, its result)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def speculative_row(m, new_tokens: int, repeats: int, backend: str, device: str) -> dict:
    """Plain greedy decoding against speculative decoding (SPECULATIVE draft tokens) of one repetitive prompt."""
    prompt = torch.arange(8).repeat(4) % VOCAB
    plain_s, plain = _best(lambda: m.generate([prompt], new_tokens), repeats)
    stats = {}
    spec_s, spec = _best(lambda: m.generate([prompt], new_tokens, speculative=SPECULATIVE, stats=stats), repeats)
    return dict(part="model", case="speculative", backend=backend, device=device,
                shape=f"prompt {len(prompt)}, new {new_tokens}, T {SPECULATIVE}", baseline_s=plain_s,
                serving_s=spec_s, baseline_tokens_per_s=new_tokens / plain_s,
                serving_tokens_per_s=new_tokens / spec_s,
                speedup=plain_s / spec_s, target=TARGETS["speculative"],
                met=plain_s / spec_s >= TARGETS["speculative"],
                identical=torch.equal(plain[0], spec[0]), drafted=stats["drafted"], accepted=stats["accepted"],
                steps=stats["steps"])


def prefix_row(m, prefix: int, suffix: int, repeats: int, backend: str, device: str) -> dict:
    """The prefill of a first request (prefix + suffix tokens) against a second sharing its prefix (a cache hit
    at the last 64-token boundary inside it): the time to the first token of each."""
    gen = torch.Generator().manual_seed(0)
    shared = torch.randint(VOCAB, (prefix,), generator=gen)
    first, second = (torch.cat([shared, torch.randint(VOCAB, (suffix,), generator=gen)]) for _ in range(2))
    first_s, second_s, same = float("inf"), float("inf"), True
    for _ in range(repeats):
        cache = PrefixCache()
        start = time.perf_counter()
        m.generate([first], 1, prefix_cache=cache)
        first_s = min(first_s, time.perf_counter() - start)
        stats = {}
        start = time.perf_counter()
        hit = m.generate([second], 1, prefix_cache=cache, stats=stats)
        second_s = min(second_s, time.perf_counter() - start)
        same = same and torch.equal(hit[0], m.generate([second], 1)[0])
    return dict(part="model", case="prefix_cache", backend=backend, device=device,
                shape=f"prefix {prefix}, suffix {suffix}", baseline_s=first_s, serving_s=second_s,
                speedup=first_s / second_s, target=TARGETS["prefix_cache"],
                met=first_s / second_s >= TARGETS["prefix_cache"],
                identical=same, reused=stats["reused"], prefilled=stats["prefilled"])


def model_rows(quick: bool, device: str = "cpu", backend: str = "torch", folder=None) -> list[dict]:
    """The model rows: speculative decoding and prefix caching on the small random checkpoint (vocabulary 32).
    quick: tiny sizes (a smoke run: 48 new tokens, a 256-token prefix, one repeat); else 256 new tokens and a
    2048-token prefix, best of 3."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        m = model.from_pretrained(_checkpoint(folder or f"{tmp}/ckpt"), backend=backend, device=device)
        repeats = 1 if quick else 3
        m.generate([torch.arange(8)], 4, speculative=2)  # warm-up: first calls of the backends
        return [speculative_row(m, 48 if quick else 256, repeats, backend, device),
                prefix_row(m, 256 if quick else 2048, 32 if quick else 64, repeats, backend, device)]


if __name__ == "__main__":
    import sys

    for row in model_rows("--quick" in sys.argv):
        print(row)
