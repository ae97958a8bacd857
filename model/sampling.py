"""Choosing the next token from logits: greedy (the default, bit-exact argmax), or sampled with a temperature,
top-k and top-p (nucleus) filtering and a seed."""
from __future__ import annotations

import math

import torch


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [n, vocab] -> token ids int64 [n].

    temperature 0: argmax (greedy). Otherwise a draw from softmax(logits / temperature) restricted to the top_k
    largest logits (ties with the k-th kept) and then to the smallest set of most likely tokens whose probability
    reaches top_p (the most likely token always stays); `generator` makes the draw reproducible."""
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits.float() / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    if top_p is not None and top_p < 1:
        ordered, order = scaled.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        # drop a token when the more likely ones before it already reach top_p
        ordered = ordered.masked_fill(probs.cumsum(-1) - probs >= top_p, -math.inf)
        scaled = scaled.scatter(-1, order, ordered)
    return torch.multinomial(scaled.softmax(-1), 1, generator=generator)[:, 0]


class Sampler:
    """sample() with fixed settings and its own generator (seeded on `device` when seed is given); ValueError
    naming the setting on bad values."""

    def __init__(self, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, device: str | torch.device = "cpu"):
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
                math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                                  or not 0 < top_p <= 1):
            raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be None or an int, got {seed!r}")
        self.temperature, self.top_k, self.top_p = float(temperature), top_k, top_p
        self.generator = None
        if seed is not None and temperature > 0:
            self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [n, vocab] -> token ids int64 [n]."""
        return sample(logits, self.temperature, self.top_k, self.top_p, self.generator)


def draft_ngram(tokens: list[int], count: int, longest: int = 3, shortest: int = 1) -> list[int]:
    """A prompt-lookup draft (vLLM's n-gram speculation): the up to `count` tokens that followed the latest earlier
    occurrence of the last n tokens of `tokens` (prompt and output so far), n from `longest` down to `shortest`;
    [] when none occurs before."""
    if count <= 0:
        return []
    size = len(tokens)
    for n in range(min(longest, size - 1), shortest - 1, -1):
        suffix = tokens[size - n:]
        for start in range(size - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + count]
    return []
