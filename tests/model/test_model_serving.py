"""The model served as engines serve it: requests in a state pool (joining and leaving a running batch), prefix
caching, speculative decoding with a prompt-lookup draft. Each gives the greedy tokens of plain decoding: every
prompt alone, prefilled into rows 0..0 of its own cache and decoded one token per call (no pool, no draft, no
prefix), on the torch backend and with the float64 reference gated delta rule.
"""
import pytest
import torch

import model
from model.generate import main, write_random_checkpoint
from model.sampling import draft_ngram

VOCAB = 64  # a small vocabulary: greedy decoding of a random model soon repeats itself, and drafts hit
BACKENDS = ["torch", pytest.param({"gated_delta_rule": "reference"}, id="reference")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("serving") / "ckpt", seed=77, tokenizer=False,
                                   vocab_size=VOCAB)


@pytest.fixture(scope="module", params=BACKENDS)
def m(checkpoint, request):
    return model.from_pretrained(checkpoint, backend=request.param)


def _plain(m, prompt, budget, eos=()):
    """Plain greedy decoding of one prompt: a prefill into rows 0..0, then one token per forward call."""
    cache = m.new_cache(1, len(prompt) + budget)
    logits, new = m.prefill_logits([prompt], cache), []
    while True:
        new.append(int(logits.argmax(-1)))
        if len(new) == budget or new[-1] in eos:
            return torch.cat([prompt, torch.tensor(new)])
        logits = m(torch.tensor([[new[-1]]]), cache)[:, -1]


def _random(seed, *lengths):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(VOCAB, (n,), generator=gen) for n in lengths]


def _check(out, expected, what):
    for i, (a, b) in enumerate(zip(out, expected)):
        assert torch.equal(a, b), f"{what}: sequence {i}: {a.tolist()} != {b.tolist()}"


# ---- the pool -----------------------------------------------------------------------------------------------

def test_pooled_batch_with_joining_and_leaving_requests(m, seed):
    """Five prompts through a pool of 2 slots: each joins when a slot frees and leaves at its own budget (or EOS);
    every sequence's tokens are those of plain decoding."""
    prompts = _random(seed, 5, 70, 1, 33, 12)
    budgets = [6, 2, 9, 4, 7]
    plain = [_plain(m, p, n) for p, n in zip(prompts, budgets)]
    for max_batch in (2, None):
        _check(m.generate(prompts, budgets, max_batch=max_batch), plain, f"max_batch={max_batch}")
    eos = int(plain[2][len(prompts[2]) + 3])
    stopped = [_plain(m, p, n, {eos}) for p, n in zip(prompts, budgets)]
    _check(m.generate(prompts, budgets, eos_token_id=eos, max_batch=3), stopped, f"max_batch=3, EOS {eos}")


def test_a_step_on_slots_leaves_the_other_rows_untouched(m, seed):
    """A decode step of pool rows [2, 0] reads and writes those rows in place: rows 1 and 3 of every buffer keep
    their bits, no buffer moves, and each row's logits are those of its sequence alone."""
    prompts = _random(seed, 4, 9, 6, 3)
    cache = m.new_cache(4, 12)
    m.prefill_logits(prompts, cache)
    before = [t.clone() for t in cache.tensors()]
    pointers = [t.data_ptr() for t in cache.tensors()]
    cache.use([2, 0])
    step = m(torch.tensor([[7], [8]]), cache)[:, -1]
    assert [t.data_ptr() for t in cache.tensors()] == pointers and cache.host_lengths == [5, 9, 7, 3]
    for t, b in zip(cache.tensors(), before):
        assert torch.equal(t[[1, 3]], b[[1, 3]])
    for row, (index, token) in enumerate(((2, 7), (0, 8))):
        alone = m.new_cache(1, 12)
        m.prefill_logits([prompts[index]], alone)
        assert torch.allclose(step[row], m(torch.tensor([[token]]), alone)[0, -1], rtol=1e-4, atol=1e-4)


# ---- prefix caching -----------------------------------------------------------------------------------------

def test_a_prefix_cached_request_gives_plain_tokens(m, seed):
    """A second request sharing 140 tokens of a 150-token prompt starts from the states at token 128 (the last
    64-token boundary inside the shared prefix) and prefills 32 tokens; a third, the first prompt's first 129
    tokens, prefills 1. Each gives plain decoding's tokens."""
    first, tail = _random(seed, 150, 20)
    second, third = torch.cat([first[:140], tail]), first[:129]
    cache = model.cache.PrefixCache()
    stats = {}
    for prompt, reused in ((first, 0), (second, 128), (third, 128)):
        out = m.generate([prompt], 5, prefix_cache=cache, stats=stats)
        _check(out, [_plain(m, prompt, 5)], f"prompt of {len(prompt)} tokens")
        assert stats["reused"] == reused and stats["prefilled"] == len(prompt) - reused, stats


def test_prefix_cache_on_a_batch_and_the_models_own(m, seed):
    """Prompts of one batch share a prefix: the later ones hit what the first stored (prefix_cache=True: the
    model's own cache, kept across calls)."""
    base, a, b = _random(seed, 70, 10, 5)
    prompts = [torch.cat([base, a]), torch.cat([base, b]), base[:3]]
    m.prefixes = None
    stats = {}
    out = m.generate(prompts, [4, 6, 3], prefix_cache=True, max_batch=2, stats=stats)
    _check(out, [_plain(m, p, n) for p, n in zip(prompts, [4, 6, 3])], "shared prefix")
    assert stats["reused"] == 64 and m.prefixes.hits == 64


# ---- speculative decoding -----------------------------------------------------------------------------------

def test_speculative_decoding_on_a_repetitive_prompt(m, seed):
    """A prompt that repeats a phrase: the drafts are accepted (fewer model calls than tokens), the tokens are
    plain decoding's."""
    phrase = _random(seed, 11)[0]
    prompt = phrase.repeat(6)
    plain = _plain(m, prompt, 24)
    stats = {}
    out = m.generate([prompt], 24, speculative=4, stats=stats)
    _check(out, [plain], "repetitive prompt")
    assert stats["accepted"] > 0 and stats["steps"] < 23, stats


def test_speculative_decoding_with_rejected_drafts(m, seed):
    """Random prompts (a batch, budgets differ, one joins late): drafts from chance repeats are mostly rejected;
    the tokens are plain decoding's, also with EOS and a prefix cache."""
    prompts = _random(seed, 40, 9, 66)
    prompts[1] = torch.cat([prompts[1], prompts[1][:5]])  # a repeat: a draft to verify (and likely reject)
    budgets = [10, 7, 12]
    plain = [_plain(m, p, n) for p, n in zip(prompts, budgets)]
    stats = {}
    _check(m.generate(prompts, budgets, speculative=3, max_batch=2, stats=stats), plain, "random prompts")
    assert stats["drafted"] > stats["accepted"], stats
    eos = int(plain[0][len(prompts[0]) + 2])
    stopped = [_plain(m, p, n, {eos}) for p, n in zip(prompts, budgets)]
    _check(m.generate(prompts, budgets, eos_token_id=eos, speculative=5, prefix_cache=model.cache.PrefixCache()),
           stopped, f"EOS {eos}")


def test_speculative_decoding_beside_a_row_at_its_budget(m, seed, monkeypatch):
    """A long prompt near its budget beside a short one that drafts: the row at its budget is padded to the other's
    draft past its own positions (the cache must hold them); the tokens are plain decoding's. The draft proposes
    on every step (its tokens mostly rejected) so that the padding happens."""
    monkeypatch.setattr(model.model, "draft_ngram", lambda tokens, count, **kwargs: [tokens[-1]] * max(count, 0))
    prompts = _random(seed, 50, 5)
    budgets = [6, 20]
    plain = [_plain(m, p, n) for p, n in zip(prompts, budgets)]
    _check(m.generate(prompts, budgets, speculative=4), plain, "a row at its budget")

def test_draft_ngram():
    assert draft_ngram([1, 2, 3, 9, 1, 2, 3], 3) == [9, 1, 2]  # after the latest earlier 1 2 3
    assert draft_ngram([5, 1, 2, 6, 1, 2], 2) == [6, 1]
    assert draft_ngram([4, 7, 4], 5) == [7, 4]  # one-token match near the end: what follows it, no more
    assert draft_ngram([1, 2, 3], 4) == [] and draft_ngram([1, 1], 0) == [] and draft_ngram([3], 2) == []


# ---- refusals and the command line --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(speculative=2, temperature=0.5), "speculative: verifies drafts against greedy"),
    (dict(speculative=-1), "speculative must be an int >= 0"),
    (dict(max_batch=0), "max_batch must be None or an int >= 1"),
    (dict(draft="eagle", speculative=2), "draft: the drafts known are 'ngram'"),
    (dict(prefix_cache="yes"), "prefix_cache must be a bool"),
])
def test_bad_serving_arguments(checkpoint, kwargs, match):
    m = model.from_pretrained(checkpoint, backend="torch")
    with pytest.raises(ValueError, match=match):
        m.generate([torch.tensor([1, 2, 3])], 2, **kwargs)


def test_a_backend_without_pools_refuses_them(checkpoint, seed):
    """numba's gated delta rule keeps no chunk states: a prefix cache is refused by name; its pools decode."""
    m = model.from_pretrained(checkpoint, backend={"gated_delta_rule": "numba"})
    with pytest.raises(ValueError, match="prefix_cache: needs a gated_delta_rule backend that takes "
                                         "chunk_states_every"):
        m.generate([torch.tensor([1, 2, 3])], 2, prefix_cache=True)
    prompts = _random(seed, 5, 8)
    _check(m.generate(prompts, [3, 5]), [_plain(m, p, n) for p, n in zip(prompts, [3, 5])], "numba")


def test_generate_cli_flags(checkpoint, capsys):
    ids = " ".join(map(str, [3, 1, 4, 1, 5, 9, 2, 6] * 3))  # ids below VOCAB
    argv = ["--checkpoint", str(checkpoint), "--backend", "torch", "--prompt-ids", ids, "--new-tokens", "10"]
    main(argv)
    plain = capsys.readouterr().out
    main(argv + ["--speculative", "4", "--prefix-cache", "--max-batch", "1"])
    assert capsys.readouterr().out == plain
