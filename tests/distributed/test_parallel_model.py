"""The model split over several processes (model/parallel.py: tensor parallelism of the token mixers, expert
parallelism of the MoE layers) against the model in one process, on CPU: gloo worlds of 2 and 4 processes on the
loopback (127.0.0.1), spawned here.

One world per size (a module fixture) runs every case of that size in turn; each test reads its case's results.
Every rank loads the whole model (one process's) and the split one from the same random checkpoint (attention
biases on: o_proj's bias is added once, after the all_reduce) and compares them on the same inputs; the workers
send back numbers and messages only. bench.suites.moe_dispatch.worlds.spawn bounds the world by a deadline and a collective by
COLLECTIVE_TIMEOUT: a case that does not finish fails, nothing hangs.
"""
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import model
from model import weights
from model.config import ModelConfig
from tests.helpers import assert_raised_everywhere, raises, ranks, rel_err, world_fixtures

COLLECTIVE_TIMEOUT = timedelta(seconds=60)
WORLD_DEADLINE_S = 300.0
BACKEND = "torch"  # every op's torch backend: no numba compile in each of the spawned processes
# (tp, ep) per world size: both split, TP groups repeated (tp < world), EP groups repeated (ep < world), KV and key
# heads replicated (tp = 4 > the small model's 2 of each)
LAYOUTS = {2: [(2, 2), (2, 1), (1, 2)], 4: [(4, 4), (2, 4), (4, 2)]}
PROMPT_LENGTHS = [7, 3, 12]  # unequal: a packed prefill, then decode steps of the rows still going
NEW_TOKENS = 5
TOL = 1e-5


def _ids(seed, shape, vocab):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


class _CountingOpen:
    """safetensors.safe_open, counting the elements every read takes out of the file (get_tensor, get_slice[...])
    in `read`."""

    read = 0

    def __init__(self, *args, **kwargs):
        self.file = _CountingOpen.opener(*args, **kwargs)

    def __enter__(self):
        self.file.__enter__()
        return self

    def __exit__(self, *exc):
        return self.file.__exit__(*exc)

    def keys(self):
        return self.file.keys()

    def get_tensor(self, name):
        return _CountingOpen.count(self.file.get_tensor(name))

    def get_slice(self, name):
        return _CountingSlice(self.file.get_slice(name))

    @staticmethod
    def count(t):
        _CountingOpen.read += t.numel()
        return t


class _CountingSlice:
    def __init__(self, part):
        self.part = part

    def get_shape(self):
        return self.part.get_shape()

    def __getitem__(self, index):
        return _CountingOpen.count(self.part[index])


def _read_counts(checkpoint, layout):
    """(elements read from the file, elements held) of read_checkpoint with this layout (None: the whole model)."""
    _CountingOpen.opener, _CountingOpen.read = weights.safe_open, 0
    weights.safe_open = _CountingOpen
    try:
        held = weights.read_checkpoint(checkpoint, ModelConfig.from_folder(checkpoint), layout=layout)
    finally:
        weights.safe_open = _CountingOpen.opener
    return _CountingOpen.read, sum(t.numel() for t in held.values())


# ---------------------------------------------------------------------------------------------- the cases
def case_layout(world, rank, seed, checkpoint, whole, tp, ep):
    """tp x ep against the whole model: each layer's token mixer and MoE layer on the same packed input, the
    logits without a cache, through a cache (prefill then a decode step), the greedy tokens of unequal prompts,
    and what this rank read of the checkpoint."""
    cfg = whole.config
    split = model.from_pretrained(checkpoint, backend=BACKEND, tp=tp, ep=ep)
    layout = split.layout
    found = {"reads": _read_counts(checkpoint, layout), "whole_reads": _read_counts(checkpoint, None)}
    experts = layout.experts(cfg.num_experts)
    held, all_experts = split.layers[0].mlp.experts.gate_up_proj, whole.layers[0].mlp.experts.gate_up_proj
    found["experts_held"] = (held.shape[0], cfg.num_experts // ep,
                             torch.equal(held, all_experts[experts.start:experts.stop]))

    torch.manual_seed(seed)  # the same inputs on every rank
    cu_seqlens = torch.tensor([0, 5, 6, 13], dtype=torch.int32)  # packed sequences of 5, 1 and 7 tokens
    T = int(cu_seqlens[-1])
    errors = {}
    with torch.no_grad():
        step, whole_step = split.step(1, T, None, cu_seqlens), whole.step(1, T, None, cu_seqlens)
        for i, (mine, one) in enumerate(zip(split.layers, whole.layers)):
            x = torch.randn(1, T, cfg.hidden_size)
            mixer = "linear_attn" if mine.kind == "linear_attention" else "self_attn"
            errors[f"layer {i} {mixer}"] = rel_err(getattr(mine, mixer)(x, step), getattr(one, mixer)(x, whole_step))
            errors[f"layer {i} mlp"] = rel_err(mine.mlp(x[0]), one.mlp(x[0]))
        ids = _ids(seed, (2, 9), cfg.vocab_size)
        errors["logits"] = rel_err(split(ids), whole(ids))
        packed = _ids(seed + 1, (1, T), cfg.vocab_size)
        errors["logits, packed"] = rel_err(split(packed, cu_seqlens=cu_seqlens), whole(packed, cu_seqlens=cu_seqlens))
    caches = split.new_cache(2, 16), whole.new_cache(2, 16)
    errors["logits, prefill"] = rel_err(split(ids[:, :8], caches[0]), whole(ids[:, :8], caches[1]))
    errors["logits, decode"] = rel_err(split(ids[:, 8:], caches[0]), whole(ids[:, 8:], caches[1]))
    found["errors"] = errors
    prompts = [_ids(seed + 2 + i, (n,), cfg.vocab_size) for i, n in enumerate(PROMPT_LENGTHS)]
    found["tokens"] = [t.tolist() for t in split.generate(prompts, NEW_TOKENS)]
    found["whole_tokens"] = [t.tolist() for t in whole.generate(prompts, NEW_TOKENS)]
    return found


def case_bad(world, rank, seed, checkpoint, whole):
    """Each bad argument on ONE rank (the last): what every rank raised. Then a good load and generate, to show
    the world is still usable."""
    tp, ep = LAYOUTS[world][0]  # ep > 1
    last = rank == world - 1
    cfg = whole.config
    split = model.from_pretrained(checkpoint, backend=BACKEND, tp=tp, ep=ep)
    prompt = _ids(seed, (4,), cfg.vocab_size)
    other = prompt.clone()
    other[0] = (other[0] + 1) % cfg.vocab_size
    cases = {
        "tp": lambda: model.from_pretrained(checkpoint, backend=BACKEND, tp=3 if last else tp, ep=ep),
        "ep": lambda: model.from_pretrained(checkpoint, backend=BACKEND, tp=tp, ep=1 if last else ep),
        "experts": lambda: model.from_pretrained(checkpoint, backend=BACKEND, tp=tp, ep=3 if last else ep),
        "checkpoint": lambda: model.from_pretrained(checkpoint.parent / "absent" if last else checkpoint,
                                                    backend=BACKEND, tp=tp, ep=ep),
        "backend": lambda: model.from_pretrained(checkpoint, backend="no_such_backend" if last else BACKEND, tp=tp,
                                                 ep=ep),
        "fp8_experts": lambda: model.from_pretrained(checkpoint, backend=BACKEND, tp=tp, ep=ep, fp8_experts=last),
        "input_ids": lambda: split(_ids(seed, (1, 5 if last else 4), cfg.vocab_size)),
        "prompts": lambda: split.generate([other if last else prompt], 2),
        "vocab": lambda: split.generate([torch.tensor([cfg.vocab_size]) if last else prompt], 2),
        "max_new_tokens": lambda: split.generate([prompt], 3 if last else 2),
    }
    raised = {name: raises(call) for name, call in cases.items()}
    again = model.from_pretrained(checkpoint, backend=BACKEND, tp=tp, ep=ep)
    raised["after"] = (again.generate([prompt], 2)[0].tolist(), whole.generate([prompt], 2)[0].tolist())
    return raised


def _cases(world):
    """{name: (function, extra arguments)} of every case of a world of this size."""
    cases = {f"tp{tp}_ep{ep}": (case_layout, (tp, ep)) for tp, ep in LAYOUTS[world]}
    return cases | {"bad": (case_bad, ())}


# ---------------------------------------------------------------------------------------------- the worlds
def _worker(rank, world, port, checkpoint, seed, results):
    """One rank: join the gloo world, load the whole model, run the cases in order (a barrier between them),
    report each; after a case raises the rank reports it and stops (bench.suites.moe_dispatch.worlds.spawn then ends the world)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        whole = model.from_pretrained(checkpoint, backend=BACKEND)
        for name, (case, extra) in _cases(world).items():
            try:
                results.put((rank, (name, rank), case(world, rank, seed, checkpoint, whole, *extra)))
            except Exception:  # noqa: BLE001 (reported to the test, which fails with it)
                results.put((rank, (name, rank), {"error": f"rank {rank}: {traceback.format_exc()}"}))
                break
            dist.barrier()
    finally:
        results.put((rank, None, None))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from model.generate import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("parallel") / "ckpt", seed=4321, tokenizer=False,
                                   attention_bias=True)


def _run_world(world, seed, checkpoint):
    """Spawn `world` ranks running every case of that size: {case: [result of rank 0, 1, ...]}."""
    from bench.suites.moe_dispatch.worlds import WORKER_ENV, _free_port, spawn  # the parent only: bench imports cost seconds

    keys = [(name, rank) for name in _cases(world) for rank in range(world)]
    found = spawn(_worker, [(world, _free_port(), checkpoint, seed)] * world, keys, WORLD_DEADLINE_S, WORKER_ENV)
    return {name: [found[(name, rank)] for rank in range(world)] for name in _cases(world)}


world2, world4, world = world_fixtures(_run_world, needs=("checkpoint",))


def _layouts(size):
    return [f"tp{tp}_ep{ep}" for tp, ep in LAYOUTS[size]]


# ---------------------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("index", range(3), ids=lambda i: f"layout{i}")
def test_layers_and_logits_match_one_process(world, index):
    """Every TP token mixer and EP MoE layer, and the logits (batched, packed, prefill and decode through the
    cache), within 1e-5 of the model in one process, on every rank."""
    case = _layouts(world[0])[index]
    per_rank, seed = ranks(world, case)
    for rank, result in enumerate(per_rank):
        for what, err in result["errors"].items():
            assert err <= TOL, f"{case}, rank {rank} of {world[0]}: {what}: relative error {err:.3e} (seed={seed})"


@pytest.mark.parametrize("index", range(3), ids=lambda i: f"layout{i}")
def test_greedy_tokens_match_one_process(world, index):
    case = _layouts(world[0])[index]
    per_rank, seed = ranks(world, case)
    for rank, result in enumerate(per_rank):
        assert result["tokens"] == result["whole_tokens"], \
            f"{case}, rank {rank}: {result['tokens']} != one process's {result['whole_tokens']} (seed={seed})"
        assert [len(t) for t in result["tokens"]] == [n + NEW_TOKENS for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("index", range(3), ids=lambda i: f"layout{i}")
def test_each_rank_reads_only_its_shard(world, index):
    """A rank reads from the file exactly the elements it holds: its experts (the right ones), its heads' rows and
    columns, and the replicated rest; less than the whole model whenever tp or ep splits something."""
    size = world[0]
    case = _layouts(size)[index]
    tp, ep = LAYOUTS[size][index]
    per_rank, seed = ranks(world, case)
    for rank, result in enumerate(per_rank):
        (read, held), (whole_read, whole_held) = result["reads"], result["whole_reads"]
        assert whole_read == whole_held, f"one process read {whole_read} elements for {whole_held}"
        assert read == held < whole_held, f"{case}, rank {rank}: read {read} elements, holds {held} of {whole_held}"
        count, expected, same = result["experts_held"]
        assert count == expected and same, f"{case}, rank {rank}: experts {result['experts_held']}"


BAD = {
    "tp": ("ValueError", r"^tp: tp = 3 does not divide the world size {W}.*on rank {last} of {W}"),
    "ep": ("ValueError", r"^ep must be the same on every rank"),
    "experts": ("ValueError", r"^ep: ep = 3 does not divide the world size {W}.*on rank {last}"),
    "checkpoint": ("FileNotFoundError", r"absent does not exist.*on rank {last}"),
    "backend": ("ValueError", r"^backend must be the same on every rank.*'no_such_backend'"),
    "fp8_experts": ("ValueError", r"^fp8_experts: .*needs ep = 1.*on rank {last}"),
    "input_ids": ("ValueError", r"^input_ids' shape must be the same on every rank"),
    "prompts": ("ValueError", r"^prompts must be the same on every rank"),
    "vocab": ("ValueError", r"prompt.*on rank {last}"),
    "max_new_tokens": ("ValueError", r"^max_new_tokens must be the same on every rank"),
}


@pytest.mark.parametrize("bad", list(BAD))
def test_bad_argument_on_one_rank_raises_everywhere(world, bad):
    """A bad argument on one rank: every rank raises the same error naming it, none hangs; the world then still
    loads and generates what one process does."""
    size = world[0]
    per_rank, seed = ranks(world, "bad")
    kind, pattern = BAD[bad]
    pattern = pattern.format(W=size, last=size - 1)
    assert_raised_everywhere(per_rank, bad, kind, pattern, seed)
    for rank, result in enumerate(per_rank):
        tokens, one = result["after"]
        assert tokens == one, f"rank {rank}: after the bad calls, {tokens} != one process's {one}"
