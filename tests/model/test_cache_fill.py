"""model.cache.fill: a static cache brought to a context without prefilling it, for decode timed the way a
server runs (bench/suites/model). Exact where the sample covers the context; otherwise the right sizes, a real
prefill's values, every position written, and the next step decoding at that context."""
import pytest
import torch

import model
from model.cache import fill
from model.generate import write_random_checkpoint
from model.layers import KVState, LinearAttentionState


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return model.from_pretrained(write_random_checkpoint(tmp_path_factory.mktemp("m") / "c", tokenizer=False),
                                 backend="torch")


def _poisoned(m, batch, max_len):
    """A cache whose every buffer is NaN: a position fill leaves unwritten shows in the output."""
    cache = m.new_cache(batch, max_len)
    for state in cache.states:
        for t in vars(state).values():
            t.fill_(float("nan"))
    return cache


@pytest.mark.parametrize("batch", [1, 2])
def test_a_sample_covering_the_context_is_a_real_prefill(small, batch):
    """With sample_tokens >= context, fill is the prefill of its own random tokens: the next decode step's logits
    equal those after prefilling the same tokens (and the states equal, bit for bit)."""
    context, seed = 24, int(torch.randint(1 << 30, ()))
    ids = torch.randint(small.config.vocab_size, (batch, context), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        prefilled = small.new_cache(batch, 32)
        small.hidden_states(ids, prefilled)
        filled = _poisoned(small, batch, 32)
        fill(small, filled, context, sample_tokens=64, seed=seed)
        token = torch.randint(small.config.vocab_size, (batch, 1))
        expected, found = small(token, prefilled), small(token, filled)
    assert filled.host_lengths == [context + 1] * batch and filled.lengths.tolist() == [context + 1] * batch
    assert torch.equal(found, expected)


def test_a_long_context_repeats_a_short_prefill(small):
    """context > sample: the linear-attention states are the sample prefill's, keys and values at position p are
    the sample's at p mod S, no position before the context is left unwritten, and a decode step at the context
    gives finite logits and writes position `context`."""
    context, sample = 70, 16
    with torch.inference_mode():
        cache = _poisoned(small, 1, 80)
        fill(small, cache, context, sample_tokens=sample, seed=3)
        scratch = small.new_cache(1, sample)
        ids = torch.randint(small.config.vocab_size, (1, sample), generator=torch.Generator().manual_seed(3))
        small.hidden_states(ids, scratch)
        kinds = set()
        for state, source in zip(cache.states, scratch.states):
            kinds.add(type(state))
            if isinstance(state, LinearAttentionState):
                assert torch.equal(state.recurrent, source.recurrent) and torch.equal(state.conv, source.conv)
                assert state.recurrent.abs().max() > 0  # a real prefill's state, not zeros
            else:
                assert not state.k[:, :context].isnan().any() and not state.v[:, :context].isnan().any()
                assert torch.equal(state.k[:, :context], source.k[:, torch.arange(context) % sample])
                assert torch.equal(state.v[:, sample:2 * sample], source.v)
                assert state.k[:, context:].isnan().all()  # nothing written past the context
        assert kinds == {LinearAttentionState, KVState}
        logits = small(torch.tensor([[5]]), cache)
    assert logits.shape == (1, 1, small.config.vocab_size) and torch.isfinite(logits).all()
    assert cache.host_lengths == [context + 1]
    kv = next(s for s in cache.states if isinstance(s, KVState))
    assert not kv.k[:, context].isnan().any()  # the step wrote its key at position `context`


@pytest.mark.parametrize("context, message", [(0, "context"), (80, "context"), (2.5, "context"), (True, "context")])
def test_bad_context_is_refused_naming_it(small, context, message):
    cache = small.new_cache(1, 80)
    before = [t.clone() for t in cache.tensors()]
    with pytest.raises(ValueError, match=message):
        fill(small, cache, context)
    assert all(torch.equal(a, b) for a, b in zip(before, cache.tensors()))  # nothing written when it raises


def test_bad_sample_is_refused_naming_it(small):
    with pytest.raises(ValueError, match="sample_tokens"):
        fill(small, small.new_cache(1, 80), 10, sample_tokens=0)
