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
