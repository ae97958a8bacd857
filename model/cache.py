"""A static cache brought to a context without prefilling it: what a decode step at that context reads, for
timing decode the way a server runs it (its requests arrive with long contexts already cached).

The model's cache (model.model.Cache) holds per Gated DeltaNet layer a conv state and a recurrent state of fixed
size, and per attention layer key and value buffers of which the first `lengths` positions are read. A decode
step's time depends on those sizes (and the weights), not on which tokens produced the values; what it must see is
values of a real prefill's scale (no zeros, no NaN: a state of zeros is read as fast, but a kernel that skips or
saturates on them would not be timed honestly). fill() takes them from a short real prefill."""
from __future__ import annotations

import torch

from model.layers import KVState, LinearAttentionState

SAMPLE_TOKENS = 256  # the real prefill whose states and keys/values fill the cache: seconds at most on a CPU


@torch.inference_mode()
def fill(m, cache, context: int, sample_tokens: int = SAMPLE_TOKENS, seed: int = 0) -> None:
    """Brings every row of `cache` (of model `m`, Qwen35Moe.new_cache(B, max_len)) to `context` tokens: a real
    prefill of S = min(context, sample_tokens) random tokens per row into a scratch cache; each Gated DeltaNet
    layer's conv [B, C, kernel - 1] and recurrent [B, Hv, K, V] states are that prefill's final ones; each attention
    layer's keys and values [B, context, Hkv, Dh] repeat the prefill's S positions (position p holds those of
    p mod S: their rotary phases and statistics are a real prefill's). lengths become `context`, so the next
    forward call decodes at position `context` exactly as after a prefill of `context` tokens, in the time of a
    prefill of S. ValueError when context is not in [1, max_len) (the step needs one free position)."""
    if not isinstance(context, int) or isinstance(context, bool) or not 1 <= context < cache.max_len:
        raise ValueError(f"context: expected an int in [1, {cache.max_len}) for a cache of max_len {cache.max_len} "
                         f"(the decode step needs one free position), got {context!r}")
    if not isinstance(sample_tokens, int) or sample_tokens < 1:
        raise ValueError(f"sample_tokens: expected an int >= 1, got {sample_tokens!r}")
    batch, sample = cache.lengths.shape[0], min(context, sample_tokens)
    ids = torch.randint(m.config.vocab_size, (batch, sample), generator=torch.Generator().manual_seed(seed))
    scratch = m.new_cache(batch, sample)
    m.hidden_states(ids.to(cache.lengths.device), scratch)
    repeat = torch.arange(context, device=cache.lengths.device) % sample
    for target, source in zip(cache.states, scratch.states):
        if isinstance(target, LinearAttentionState):
            target.conv.copy_(source.conv)
            target.recurrent.copy_(source.recurrent)
        elif isinstance(target, KVState):
            target.k[:, :context] = source.k[:, repeat]
            target.v[:, :context] = source.v[:, repeat]
        else:
            raise TypeError(f"fill: a cache state of type {type(target).__name__} is not known here")
    cache.lengths.fill_(context)
    cache.host_lengths[:] = [context] * batch


PREFIX_CHUNK = 64  # the prefix cache's boundaries: a multiple of every backend's chunk (kernellab's chunk_states_every)


class PrefixCache:
    """The states of prompts prefilled before, for prompts that share their prefix (vLLM's prefix caching, with the
    recurrent states a linear attention needs): per prompt, at every `every` tokens of it, each Gated DeltaNet
    layer's recurrent state [Hv, K, V] (the prefill's chunk_states_every) and conv state [C, kernel - 1] (the
    kernel - 1 inputs before the boundary), and each attention layer's keys and values [L, Hkv, Dh] up to the last
    boundary. Holds the latest `capacity` prompts (the oldest dropped first)."""

    def __init__(self, every: int = PREFIX_CHUNK, capacity: int = 16):
        if every < 1 or every % PREFIX_CHUNK:
            raise ValueError(f"every: expected a multiple of {PREFIX_CHUNK}, got {every!r}")
        self.every, self.capacity = every, capacity
        self.entries = []  # (tokens int64 [L], {boundary: [(recurrent, conv) per Gated DeltaNet layer]}, [(k, v)])
        self.hits = 0  # tokens whose prefill a hit saved, over every lookup

    def clear(self) -> None:
        self.entries, self.hits = [], 0

    def lookup(self, prompt: torch.Tensor):
        """(entry, boundary) of the longest usable shared prefix of prompt (1-D int64): the last boundary within
        the tokens it shares with an entry, leaving at least one token to prefill (its logits); None without."""
        best = None
        for entry in self.entries:
            tokens = entry[0]
            size = min(len(tokens), len(prompt) - 1)
            same = tokens[:size] == prompt[:size]
            shared = size if bool(same.all()) else int((~same).nonzero()[0])
            boundary = max((b for b in entry[1] if b <= shared), default=0)
            if boundary and (best is None or boundary > best[1]):
                best = entry, boundary
        return best

    @torch.inference_mode()
    def prefill(self, m, cache, prompt: torch.Tensor, slot: int) -> torch.Tensor:
        """Prefill prompt (1-D int64) into the empty cache slot `slot` of model m, from the longest cached prefix:
        logits [1, vocab] of its last token. Its states at every boundary are then kept for the next prompts."""
        hit = self.lookup(prompt)
        start = 0
        if hit is not None:
            entry, start = hit
            self._load(cache, slot, entry, start)
            self.hits += start
        device = m.embed_tokens.weight.device
        cache.use([slot], record=self.every)
        logits = m.lm_head(m.hidden_states(prompt[start:].to(device)[None], cache)[:, -1])
        self._store(cache, slot, prompt, start, hit)
        return logits

    def _load(self, cache, slot: int, entry, boundary: int) -> None:
        """Cache slot <- the entry's states at boundary and its keys and values before it."""
        states, kv = iter(entry[1][boundary]), iter(entry[2])
        for target in cache.states:
            if isinstance(target, LinearAttentionState):
                recurrent, conv = next(states)
                target.recurrent[slot].copy_(recurrent)
                target.conv[slot].copy_(conv)
            else:
                k, v = next(kv)
                target.k[slot, :boundary] = k[:boundary]
                target.v[slot, :boundary] = v[:boundary]
        cache.lengths[slot] = boundary
        cache.host_lengths[slot] = boundary

    def _store(self, cache, slot: int, prompt: torch.Tensor, start: int, hit) -> None:
        """Keep the boundaries the prefill from `start` recorded (cache.kept), with those of the hit before it."""
        boundaries = {} if hit is None else {b: s for b, s in hit[0][1].items() if b <= start}
        for kept in cache.kept:
            taps = kept.state.conv.shape[-1]
            for state, position in zip(kept.trace.states, kept.trace.position.tolist()):
                conv = kept.window[0, position:position + taps]  # the inputs before the boundary
                boundaries.setdefault(start + position, []).append((state.clone(), conv.t().clone()))
        if not boundaries or max(boundaries) <= start:
            return
        last = max(boundaries)
        kv = [(s.k[slot, :last].clone(), s.v[slot, :last].clone()) for s in cache.states
              if not isinstance(s, LinearAttentionState)]
        self.entries.append((prompt.clone(), boundaries, kv))
        del self.entries[:-self.capacity]
