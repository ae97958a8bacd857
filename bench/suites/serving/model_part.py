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

import kernellab
import model
from model.cache import PrefixCache
from model.generate import write_random_checkpoint

VOCAB = 32
SPECULATIVE = 4  # draft tokens per step


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


def _row(phase: str, shape: str, seconds: float, backend: str, device: str, tokens: int, **more) -> dict:
    """One timed row of the model part: its phase in the shape (one results KEY per row), the best time."""
    return dict(op="serving", part="model", phase=phase, backend=backend, device=device, dtype="float32",
                shape=f"{shape},phase={phase}", median_ms=seconds * 1e3, p20_ms=seconds * 1e3, p80_ms=seconds * 1e3,
                repeats=1, tokens_per_s=tokens / seconds, **more)


def speculative_rows(m, new_tokens: int, repeats: int, backend: str, device: str) -> list[dict]:
    """Plain greedy decoding ("plain_decode") and speculative decoding ("speculative", SPECULATIVE draft tokens) of
    one repetitive prompt; the speculative row is an error row when its tokens differ from plain decoding's."""
    prompt = torch.arange(8).repeat(4) % VOCAB
    plain_s, plain = _best(lambda: m.generate([prompt], new_tokens), repeats)
    stats = {}
    spec_s, spec = _best(lambda: m.generate([prompt], new_tokens, speculative=SPECULATIVE, stats=stats), repeats)
    shape = f"prompt={len(prompt)},new={new_tokens},T={SPECULATIVE}"
    differs = {} if torch.equal(plain[0], spec[0]) else {"error": "speculative output differs from plain decoding"}
    return [_row("plain_decode", shape, plain_s, backend, device, new_tokens),
            _row("speculative", shape, spec_s, backend, device, new_tokens, drafted=stats["drafted"],
                 accepted=stats["accepted"], steps=stats["steps"], **differs)]


def prefix_rows(m, prefix: int, suffix: int, repeats: int, backend: str, device: str) -> list[dict]:
    """The prefill of a first request (prefix + suffix tokens: "prefill_first") against a second sharing its prefix
    ("prefill_hit": a cache hit at the last 64-token boundary inside it): the time to the first token of each; the
    hit is an error row when its token differs from the same prompt's without the cache."""
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
    shape = f"prefix={prefix},suffix={suffix}"
    differs = {} if same else {"error": "the prefix-cached output differs from a prefill of the whole prompt"}
    return [_row("prefill_first", shape, first_s, backend, device, prefix + suffix),
            _row("prefill_hit", shape, second_s, backend, device, prefix + suffix, reused=stats["reused"],
                 prefilled=stats["prefilled"], **differs)]


def model_rows(quick: bool, device: str = "cpu", backend: str = "torch", folder=None) -> list[dict]:
    """The model rows: speculative decoding and prefix caching on the small random checkpoint (vocabulary 32).
    quick: tiny sizes (a smoke run: 48 new tokens, a 256-token prefix, one repeat); else 256 new tokens and a
    2048-token prefix, best of 3. A part whose keyword the backend's gated delta rule lacks is an error row saying
    so (numba keeps no chunk states: no prefix cache)."""
    import tempfile

    takes = kernellab.registry.registered("gated_delta_rule")[backend].serving
    with tempfile.TemporaryDirectory() as tmp:
        m = model.from_pretrained(_checkpoint(folder or f"{tmp}/ckpt"), backend=backend, device=device)
        repeats, rows = 1 if quick else 3, []
        # warm-up: first calls of the backends
        m.generate([torch.arange(8)], 4, speculative=2 if "output_intermediate_states" in takes else 0)
        for keyword, phase, shape, make in (
                ("output_intermediate_states", "speculative", f"prompt=32,new={48 if quick else 256},T={SPECULATIVE}",
                 lambda: speculative_rows(m, 48 if quick else 256, repeats, backend, device)),
                ("chunk_states_every", "prefill_hit", f"prefix={256 if quick else 2048},suffix={32 if quick else 64}",
                 lambda: prefix_rows(m, 256 if quick else 2048, 32 if quick else 64, repeats, backend, device))):
            if keyword in takes:
                rows += make()
            else:
                rows.append(dict(op="serving", part="model", phase=phase, backend=backend, device=device,
                                 dtype="float32", shape=f"{shape},phase={phase}",
                                 error=f"the {backend} gated delta rule takes no {keyword}"))
        return rows


if __name__ == "__main__":
    import sys

    for row in model_rows("--quick" in sys.argv):
        print(row)
