"""Decoding with the lab's model as a server would: the static cache, batches of prompts of different lengths
(packed prefill, per-sequence positions, sequences that stop at different times), sampling, and bad input.

Per sequence, a batch gives the logits and greedy tokens of that sequence run alone, on every CPU backend of
every op the model calls (the other ops on the torch backend); interpreted Triton runs the packed prefill
only (a whole decode through the interpreter takes minutes). The parity with transformers is tests/model/test_model.py.
"""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import model
from model.generate import SMALL_CONFIG, write_random_checkpoint
from model.model import OPS
from model.sampling import Sampler, sample
from tests.helpers import rel_err
from tests.model.test_model import CASES, CASES_DECODE

LOGITS_TOL = 1e-4
VOCAB = SMALL_CONFIG["vocab_size"]
LENGTHS = [5, 70, 1, 33]  # unequal, one of length 1, one past a 64-token chunk


@pytest.fixture(autouse=True)
def _inference():
    """Inference tests: outside generate the model's forward is differentiable, and most backends have no
    backward."""
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("small") / "ckpt", seed=4321)


@pytest.fixture(scope="module")
def torch_model(checkpoint):
    return model.from_pretrained(checkpoint, backend="torch")


def _load(checkpoint, op, name):
    """The model with `name` for op and the torch backend for the other ops."""
    return model.from_pretrained(checkpoint, backend={o: name if o == op else "torch" for o in OPS})


def _prompts(seed, lengths=LENGTHS):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(VOCAB, (n,), generator=gen) for n in lengths]


def _packed(prompts):
    cu = torch.tensor([0, *torch.tensor([len(p) for p in prompts]).cumsum(0).tolist()], dtype=torch.int32)
    return torch.cat(prompts)[None], cu


# ---- the static cache ---------------------------------------------------------------------------------------

def test_cache_buffers_are_allocated_once(torch_model, seed):
    """Prefill and decode steps write the cache's buffers in place: every data_ptr and the byte count stay."""
    m = torch_model
    cache = m.new_cache(2, 40)
    pointers, size = [t.data_ptr() for t in cache.tensors()], cache.nbytes()
    ids = torch.randint(VOCAB, (2, 30), generator=torch.Generator().manual_seed(seed))
    m(ids, cache)
    for t in range(3):
        m(ids[:, t:t + 1], cache)
    assert [t.data_ptr() for t in cache.tensors()] == pointers and cache.nbytes() == size
    assert cache.host_lengths == [33, 33] and cache.lengths.tolist() == [33, 33]


def _decode_step_bytes(m, context):
    """Bytes allocated on the CPU by one decode step after a prefill of `context` tokens (torch.profiler)."""
    ids = torch.randint(VOCAB, (1, context), generator=torch.Generator().manual_seed(0))
    cache = m.new_cache(1, context + 4)
    m(ids, cache)
    m(ids[:, -1:], cache)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        m(ids[:, -1:], cache)
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0), cache


def test_decode_step_allocations_do_not_grow_with_the_kv_cache(torch_model):
    """A cache that grew by concatenation would copy its keys and values every step; the static one writes one
    position. What a step allocates (activations: a few hundred KB here) grows with the context by the attention
    scores only, under a tenth of the KV buffers' growth."""
    short, short_cache = _decode_step_bytes(torch_model, 64)
    long, long_cache = _decode_step_bytes(torch_model, 1024)
    assert long - short < 0.1 * (long_cache.nbytes() - short_cache.nbytes()), (short, long)


def test_static_cache_gives_the_tokens_of_recomputing_everything(torch_model, seed):
    """Greedy decoding with the cache = argmax of a full forward over the whole sequence at every step (what
    the cache must reproduce; tests/model/test_model.py matches it to transformers' own cache)."""
    m = torch_model
    ids = torch.randint(VOCAB, (2, 20), generator=torch.Generator().manual_seed(seed))
    out = m.generate(ids, 5)
    recomputed = ids
    for _ in range(5):
        recomputed = torch.cat([recomputed, m(recomputed)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, recomputed)


def test_cache_keep_moves_rows_in_place(torch_model, seed):
    """After keep([2, 0]), rows 0 and 1 continue sequences 2 and 0 exactly as if they had never shared a batch."""
    m = torch_model
    prompts = _prompts(seed, [4, 9, 6])
    cache = m.new_cache(3, 12)
    m.prefill_logits(prompts, cache)
    pointers = [t.data_ptr() for t in cache.tensors()]
    cache.keep([2, 0])
    assert [t.data_ptr() for t in cache.tensors()] == pointers and cache.host_lengths[:2] == [6, 4]
    token = torch.tensor([[7], [8]])
    batched = m(token, cache)[:, -1]
    for row, (index, t) in enumerate(((2, 7), (0, 8))):
        alone = m.new_cache(1, 12)
        m.prefill_logits([prompts[index]], alone)
        assert rel_err(batched[row], m(torch.tensor([[t]]), alone)[0, -1]) <= LOGITS_TOL


@pytest.mark.gpu
def test_cuda_graph_decode_gives_the_eager_tokens(checkpoint, seed):
    """--cuda-graph: the decode step replayed from a CUDA graph gives the eager tokens (triton backends)."""
    m = model.from_pretrained(checkpoint, backend="triton", device="cuda")
    prompts = [p.cuda() for p in _prompts(seed)]
    eager = m.generate(prompts, [6, 3, 8, 5])
    graphed = m.generate(prompts, [6, 3, 8, 5], cuda_graph=True)
    assert all(torch.equal(a, b) for a, b in zip(eager, graphed))


# ---- batches of unequal prompts -----------------------------------------------------------------------------

@pytest.mark.parametrize("op, name", CASES)
def test_packed_prefill_logits_equal_each_prompt_alone(checkpoint, op, name, seed):
    """One packed forward (cu_seqlens, no padding) over prompts of lengths 5, 70, 1, 33: each sequence's logits
    are those of its own forward."""
    m = _load(checkpoint, op, name)
    prompts = _prompts(seed)
    ids, cu = _packed(prompts)
    packed = m(ids, cu_seqlens=cu)[0]
    for i, prompt in enumerate(prompts):
        alone = m(prompt[None])[0]
        err = rel_err(packed[cu[i]:cu[i + 1]], alone)
        assert err <= LOGITS_TOL, f"{op}={name}: prompt {i} (length {len(prompt)}): {err:.2e} (seed={seed})"


@pytest.mark.parametrize("op, name", CASES_DECODE)
def test_batch_decode_logits_equal_each_sequence_alone(checkpoint, op, name, seed):
    """A packed prefill into the cache, then decode steps of all rows at their own positions: the logits of each
    row are those of its sequence decoded alone."""
    m = _load(checkpoint, op, name)
    prompts = _prompts(seed)
    cache = m.new_cache(len(prompts), max(LENGTHS) + 3)
    steps = torch.randint(VOCAB, (len(prompts), 3), generator=torch.Generator().manual_seed(seed + 1))
    batched = [m.prefill_logits(prompts, cache)] + [m(steps[:, t:t + 1], cache)[:, -1] for t in range(3)]
    for i, prompt in enumerate(prompts):
        alone = m.new_cache(1, len(prompt) + 3)
        mine = [m.prefill_logits([prompt], alone)] + [m(steps[i:i + 1, t:t + 1], alone)[:, -1] for t in range(3)]
        for t, (a, b) in enumerate(zip(batched, mine)):
            err = rel_err(a[i], b[0])
            assert err <= LOGITS_TOL, f"{op}={name}: sequence {i}, step {t}: {err:.2e} (seed={seed})"


@pytest.mark.parametrize("op, name", CASES_DECODE)
def test_batch_greedy_tokens_equal_each_sequence_alone(checkpoint, op, name, seed):
    """Sequences that stop at different times (their own max_new_tokens, or EOS) leave the batch; the others'
    tokens are those each gives alone."""
    m = _load(checkpoint, op, name)
    prompts = _prompts(seed)
    budgets = [6, 2, 9, 0]
    alone = [m.generate(p[None], n)[0] for p, n in zip(prompts, budgets)]
    out = m.generate(prompts, budgets)
    for i, (a, b) in enumerate(zip(out, alone)):
        assert torch.equal(a, b), f"{op}={name}: sequence {i}: {a[len(prompts[i]):].tolist()} != " \
                                  f"{b[len(prompts[i]):].tolist()} (seed={seed})"
    # EOS: the third token of sequence 2 stops it there; the others do not produce it first, or stop too
    eos = int(alone[2][len(prompts[2]) + 2])
    stopped = m.generate(prompts, budgets, eos_token_id=eos)
    for i, (a, b) in enumerate(zip(stopped, alone)):
        new = b[len(prompts[i]):].tolist()
        expected = b[:len(prompts[i]) + new.index(eos) + 1] if eos in new else b
        assert torch.equal(a, expected), f"{op}={name}: sequence {i} with EOS {eos} (seed={seed})"


def test_stream_yields_tokens_as_they_come(torch_model, seed):
    """stream() yields (sequence, token) per step, every live sequence once per step, in batch order."""
    prompts = _prompts(seed, [3, 8])
    events = list(torch_model.stream(prompts, [2, 4]))
    assert [i for i, _ in events] == [0, 1, 0, 1, 1, 1]
    out = torch_model.generate(prompts, [2, 4])
    assert [t for i, t in events if i == 1] == out[1][8:].tolist()


def test_tensor_input_pads_stopped_rows_with_eos(torch_model, seed):
    ids = torch.randint(VOCAB, (2, 6), generator=torch.Generator().manual_seed(seed))
    free = torch_model.generate(ids, 4)
    eos = int(free[0, 7])  # row 0's second new token
    out = torch_model.generate(ids, 4, eos_token_id=eos)
    assert out.shape == (2, 10) and torch.equal(out[0, :8], free[0, :8]) and (out[0, 8:] == eos).all()


# ---- sampling -----------------------------------------------------------------------------------------------

def _logits(seed, rows=3, vocab=50):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 2


def test_greedy_is_argmax_bit_for_bit(seed):
    logits = _logits(seed)
    assert torch.equal(sample(logits), logits.argmax(-1))
    assert torch.equal(Sampler(seed=seed)(logits), logits.argmax(-1))  # a seed alone does not sample


def test_sampling_follows_the_softmax(seed):
    logits = torch.tensor([[0.0, 1.0, -1.0, 0.5]])
    draws = torch.stack([sample(logits.expand(1000, 4), 1.0, generator=torch.Generator().manual_seed(seed + i))
                         for i in range(20)]).flatten()
    frequency = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert (frequency - logits[0].softmax(-1)).abs().max() < 0.02, frequency


@pytest.mark.parametrize("top_k", [1, 5])
def test_top_k_never_emits_an_excluded_token(top_k, seed):
    logits = _logits(seed)
    allowed = logits.topk(top_k, dim=-1).indices
    gen = torch.Generator().manual_seed(seed)
    draws = torch.stack([sample(logits, 1.5, top_k=top_k, generator=gen) for _ in range(400)], dim=1)  # [3, 400]
    for row in range(3):
        assert set(draws[row].tolist()) <= set(allowed[row].tolist())
        assert len(set(draws[row].tolist())) == top_k  # each allowed token does come up in 400 draws


@pytest.mark.parametrize("top_p", [0.3, 0.8])
def test_top_p_never_emits_an_excluded_token(top_p, seed):
    logits = _logits(seed)
    probs, order = (logits / 0.7).softmax(-1).sort(dim=-1, descending=True)
    gen = torch.Generator().manual_seed(seed)
    draws = torch.stack([sample(logits, 0.7, top_p=top_p, generator=gen) for _ in range(400)], dim=1)
    for row in range(3):
        # the smallest set of most likely tokens whose probability reaches top_p
        size = int((probs[row].cumsum(0) < top_p).sum()) + 1
        assert set(draws[row].tolist()) <= set(order[row, :size].tolist()), (top_p, size)


def test_top_k_and_top_p_together(seed):
    logits = _logits(seed)
    gen = torch.Generator().manual_seed(seed)
    draws = torch.stack([sample(logits, 1.0, top_k=10, top_p=0.5, generator=gen) for _ in range(200)], dim=1)
    top10 = logits.topk(10, dim=-1).indices
    for row in range(3):
        probs = logits[row, top10[row]].softmax(-1)  # renormalised over the top 10, sorted
        size = int((probs.cumsum(0) < 0.5).sum()) + 1
        assert set(draws[row].tolist()) <= set(top10[row, :size].tolist())


def test_a_seed_reproduces_a_sampled_batch(torch_model, seed):
    prompts = _prompts(seed, [4, 11])
    settings = dict(temperature=0.9, top_k=40, top_p=0.95)
    first = torch_model.generate(prompts, 8, seed=seed, **settings)
    again = torch_model.generate(prompts, 8, seed=seed, **settings)
    other = torch_model.generate(prompts, 8, seed=seed + 1, **settings)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert any(not torch.equal(a, b) for a, b in zip(first, other))  # 16 draws from ~40 tokens each
    greedy = torch_model.generate(prompts, 8)
    assert all(torch.equal(a, b) for a, b in zip(greedy, torch_model.generate(prompts, 8, temperature=1.0, top_k=1,
                                                                              seed=seed)))


# ---- bad input ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompts, kwargs, match", [
    ([[]], {}, "prompt 0 is empty"),
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([], {}, "non-empty list"),
    ([[1, VOCAB]], {}, f"outside the vocabulary \\[0, {VOCAB}\\)"),
    ([[-1, 3]], {}, "outside the vocabulary"),
    ([[0.5, 1.0]], {}, "1-D sequence of token ids"),
    ([[[1, 2]]], {}, "1-D sequence"),
    ([[1] * SMALL_CONFIG["max_position_embeddings"]], {}, "more than the model's max_position_embeddings"),
    ([[1, 2]], dict(max_new_tokens=-1), "max_new_tokens must be an int >= 0"),
    ([[1, 2]], dict(max_new_tokens=[1, 2]), "max_new_tokens has 2 entries for 1 prompts"),
    ([[1, 2]], dict(eos_token_id=VOCAB), "eos_token_id"),
    ([[1, 2]], dict(temperature=-1.0), "temperature"),
    ([[1, 2]], dict(temperature=1.0, top_k=0), "top_k"),
    ([[1, 2]], dict(temperature=1.0, top_p=0.0), "top_p"),
    ([[1, 2]], dict(temperature=1.0, top_p=1.5), "top_p"),
], ids=lambda v: str(v)[:30])
def test_bad_input(torch_model, prompts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        torch_model.generate(prompts, **({"max_new_tokens": 2} | kwargs))


def test_bad_packing(torch_model):
    m = torch_model
    ids = torch.zeros(1, 10, dtype=torch.int64)
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to T = 10"):
        m(ids, cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="needs input_ids \\[1, T\\]"):
        m(torch.zeros(2, 5, dtype=torch.int64), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    cache = m.new_cache(2, 12)
    m(ids[:, :3].expand(2, 3), cache)
    with pytest.raises(ValueError, match="go into empty cache rows"):
        m(ids, cache, cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="the cache holds 12 positions per row"):
        m(ids.expand(2, 10), cache)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m.new_cache(1, SMALL_CONFIG["max_position_embeddings"] + 1)


# ---- text in and out ----------------------------------------------------------------------------------------

TEXTS = ["Return the number of items.", "  two  spaces, tabs\tand\nnew lines", "Grüße, ☃ and 数字 1234 🙂",
         "def f(x):\n    return {'a': [x, 2.5e-3]}"]


def test_tokenizer_round_trips(checkpoint):
    from model.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(checkpoint)
    assert tok.vocab_size == VOCAB and tok.eos_token_ids == [0]
    for text in TEXTS:
        ids = tok.encode(text)
        assert max(ids) < VOCAB and tok.decode(ids) == text
    assert len(tok.encode(TEXTS[0])) < len(TEXTS[0].encode()) / 2  # merges learnt: fewer tokens than bytes


def test_text_stream_holds_back_unfinished_characters(checkpoint):
    """Byte-level tokens can split a character: pieces pushed one token at a time join into the whole text and
    none ends in half a character."""
    from model.tokenizer import TextStream, Tokenizer

    tok = Tokenizer.from_folder(checkpoint)
    for text in TEXTS:
        stream = TextStream(tok)
        pieces = [stream.push(token) for token in tok.encode(text)]
        assert "".join(pieces) == text and not any("\N{REPLACEMENT CHARACTER}" in piece for piece in pieces)
        assert stream.flush() == ""
    stream = TextStream(tok)
    cut = tok.encode("☃")[:-1]  # the character's first bytes only
    assert [stream.push(token) for token in cut] == [""] * len(cut) and stream.flush() == "\N{REPLACEMENT CHARACTER}"


def test_generate_prints_text_as_it_is_generated(checkpoint, capsys):
    from model import generate
    from model.tokenizer import Tokenizer

    generate.main(["--checkpoint", str(checkpoint), "--backend", "torch", "--prompt", "Return the",
                   "--new-tokens", "6", "--ignore-eos"])
    out, err = capsys.readouterr()
    prompt = Tokenizer.from_folder(checkpoint).encode("Return the")
    expected = model.from_pretrained(checkpoint, backend="torch").generate([torch.tensor(prompt)], 6)[0]
    assert out == Tokenizer.from_folder(checkpoint).decode(expected.tolist()) + "\n"
    assert "6 new tokens" in err


def test_generate_a_batch_of_text_prompts(checkpoint, capsys):
    from model import generate

    generate.main(["--checkpoint", str(checkpoint), "--backend", "torch", "--prompt", "a", "--prompt",
                   "a longer prompt", "--new-tokens", "3", "--temperature", "0.8", "--top-k", "20", "--seed", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("[0] a") and lines[1].startswith("[1] a longer prompt")


@pytest.mark.parametrize("argv, expected", [
    (["--prompt-ids", f"1 {VOCAB}"], ["--prompt-ids", f"token id {VOCAB}", f"[0, {VOCAB})"]),
    (["--prompt-ids", " ".join(["1"] * SMALL_CONFIG["max_position_embeddings"])],
     ["--prompt-ids", "needs 4112 positions", "more than the model's 4096"]),
    (["--prompt", "x" * 40000], ["--prompt", "more than the model's 4096"]),
])
def test_generate_refuses_prompts_the_model_cannot_take(checkpoint, argv, expected, capsys):
    from model import generate
    from tests.test_cli import refused

    refused(generate.main, ["--checkpoint", str(checkpoint), *argv], capsys, *expected)


def test_generate_refuses_text_without_a_tokenizer(tmp_path, capsys):
    from model import generate
    from tests.test_cli import refused

    folder = write_random_checkpoint(tmp_path / "bare", tokenizer=False, num_hidden_layers=1,
                                     layer_types=["full_attention"])
    capsys.readouterr()  # the writer's progress bar
    refused(generate.main, ["--checkpoint", str(folder), "--prompt", "hi"], capsys, "--prompt",
            "no tokenizer.json", "--prompt-ids")


def test_numba_uses_a_pool_that_sleeps():
    """kernels makes numba's thread pool the workqueue one: the default OpenMP pool spins after each parallel
    region and slowed every later torch op of a decode step (after an mkl prefill) up to 500x on 2 cores."""
    import os
    import subprocess
    import sys

    code = ("import kernellab, numba\n@numba.njit(parallel=True)\ndef f(x):\n    for i in numba.prange(x.shape[0]):\n"
            "        x[i] += 1\nimport numpy as np\nf(np.zeros(8))\nprint(numba.threading_layer())\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.stdout.strip().splitlines()[-1] == "workqueue", run.stderr[-2000:]
