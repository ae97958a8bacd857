"""Text generation from the command line: the prompt's continuation printed as it is generated.

    python -m model.generate --prompt "Return the"             # a small random checkpoint (with its tokenizer)
    python -m model.generate --checkpoint PATH --prompt "..." --temperature 0.7 --top-p 0.9 --seed 1
    python -m model.generate --prompt "a" --prompt "longer prompt"  # a batch of prompts of different lengths
    python -m model.generate --prompt-ids "1 2 3" --new-tokens 8      # token ids in, token ids out
    python -m model.generate --prompt-len 64 --new-tokens 32 --batch 2  # random prompts: tokens/s only
    python -m model.generate --prompt-ids "1 2 3 1 2 3 1 2" --speculative 4   # prompt-lookup drafts, verified
    python -m model.generate --prompt "a b" --prompt "a c" --prefix-cache --max-batch 1  # a pool, a prefix cache
    torchrun --nproc-per-node 2 -m model.generate --tp 2 --ep 2 --prompt "Return the"  # on 2 processes

On several processes (torchrun sets WORLD_SIZE, RANK, LOCAL_RANK and the rendezvous), --tp splits the token
mixers' heads and --ep the experts over them (model/parallel.py; each divides the number of processes); every
rank reads its shard of the checkpoint, rank 0 prints. NCCL with --device cuda (rank r on cuda:LOCAL_RANK), gloo
on CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

# A small Qwen3.5-MoE text config: the real layer pattern (3 Gated DeltaNet layers then 1 attention layer),
# Hv = 2 Hk, partial rotary, a shared expert; every size shrunk so it runs in seconds on a CPU.
SMALL_CONFIG = dict(vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                    linear_key_head_dim=32, linear_value_head_dim=32, linear_conv_kernel_dim=4,
                    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                    shared_expert_intermediate_size=64, max_position_embeddings=4096, tie_word_embeddings=False)


def write_random_checkpoint(folder: str | Path, seed: int = 0, tokenizer: bool = True, **overrides) -> Path:
    """Build transformers' Qwen3_5MoeForCausalLM from SMALL_CONFIG (plus overrides) with random weights and
    save_pretrained it (safetensors) into folder, with a byte-level BPE tokenizer of the config's vocab_size
    trained on built-in text (model/tokenizer.py) unless `tokenizer` is False. Norm weights and dt_bias are
    randomised too, so a model that ignored them would not match."""
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    from model.tokenizer import train_byte_level_bpe

    config = {**SMALL_CONFIG, **overrides}
    torch.manual_seed(seed)
    hf = Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**config)).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("norm.weight", "dt_bias")):
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(folder, safe_serialization=True)
    if tokenizer:
        train_byte_level_bpe(config["vocab_size"], folder)
    return Path(folder)


def default_checkpoint() -> Path:
    """The small random checkpoint, written once into the cache dir (or a temp dir); processes started together
    (torchrun) take turns on a lock, so one writes it and the others read it."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwen35-kernel-lab" / "small-random"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        root = Path(tempfile.mkdtemp(prefix="qwen35-small-"))
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "tokenizer.json").is_file():  # written last: a folder without it is incomplete or older
            write_random_checkpoint(root)
    return root


DTYPES = ("float32", "bfloat16", "float16", "float64")


def _parser():
    from model import cli

    parser = cli.ArgumentParser(prog="python -m model.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=cli.existing_folder,
                        help="Hugging Face checkpoint folder (default: a small random one)")
    parser.add_argument("--prompt", type=cli.nonempty_text, action="append",
                        help="text to continue (repeat for a batch of prompts)")
    parser.add_argument("--prompt-ids", type=cli.token_ids, action="append",
                        help="token ids to continue, e.g. '1 2 3' (repeat for a batch)")
    parser.add_argument("--backend", default="auto", help="backend of every op that has it (default: auto)")
    parser.add_argument("--prompt-len", type=cli.positive_int, default=32,
                        help="without --prompt: random prompts of this many tokens")
    parser.add_argument("--batch", type=cli.positive_int, default=1, help="without --prompt: random prompts")
    parser.add_argument("--new-tokens", type=cli.nonnegative_int, default=16, help="new tokens per prompt at most")
    parser.add_argument("--temperature", type=cli.nonnegative_float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top-k", type=cli.positive_int, default=None, help="sample among the k likeliest")
    parser.add_argument("--top-p", type=cli.probability, default=None,
                        help="sample among the likeliest tokens whose probability reaches p")
    parser.add_argument("--seed", type=cli.seed, default=0, help="of the sampling and of random prompts (< 2**64)")
    parser.add_argument("--ignore-eos", action="store_true", help="always make --new-tokens tokens")
    parser.add_argument("--dtype", default=None, choices=DTYPES, help="default: the checkpoint's")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--cuda-graph", action="store_true", help="replay each decode step as a CUDA graph (GPU)")
    parser.add_argument("--max-batch", type=cli.positive_int, default=None,
                        help="decode at most this many prompts at once; the others join as slots free (state pool)")
    parser.add_argument("--prefix-cache", action="store_true",
                        help="prompts sharing a prefix prefill it once (states at 64-token boundaries, its KV)")
    parser.add_argument("--speculative", type=cli.nonnegative_int, default=0,
                        help="draft up to this many tokens per step and verify them in one call (greedy)")
    parser.add_argument("--draft", default="ngram", choices=("ngram",),
                        help="the speculative draft: ngram (prompt lookup, the default)")
    parser.add_argument("--threads", type=cli.positive_int, default=None,
                        help="torch CPU threads (on a busy machine 1 avoids oversubscription)")
    parser.add_argument("--tp", type=cli.positive_int, default=1,
                        help="tensor-parallel size: the heads split over this many processes (torchrun)")
    parser.add_argument("--ep", type=cli.positive_int, default=1,
                        help="expert-parallel size: the experts split over this many processes (torchrun)")
    return parser


def world_size() -> int:
    """The number of processes started together (torchrun's WORLD_SIZE; 1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _check(parser, args) -> str:
    """Every refusal that needs no tensor of the checkpoint (its config.json and files' headers are checked);
    returns the device."""
    from model import cli
    from model.config import ModelConfig

    if args.checkpoint and not (args.checkpoint / "config.json").is_file():
        parser.error(f"--checkpoint: no config.json in {args.checkpoint} (a Hugging Face checkpoint folder holds "
                     f"config.json and *.safetensors)")
    cfg = cli.check_checkpoint(parser, "--checkpoint", args.checkpoint) if args.checkpoint else \
        ModelConfig(**SMALL_CONFIG)
    if not (args.prompt or args.prompt_ids) and args.prompt_len + args.new_tokens > cfg.max_position_embeddings:
        parser.error(f"--prompt-len {args.prompt_len}: with --new-tokens {args.new_tokens} it needs "
                     f"{args.prompt_len + args.new_tokens} positions, more than the model's "
                     f"{cfg.max_position_embeddings}; valid: --prompt-len 1 to "
                     f"{max(cfg.max_position_embeddings - args.new_tokens, 1)}")
    if args.prompt and args.prompt_ids:
        parser.error("--prompt-ids: give prompts as text (--prompt) or as token ids, not both")
    if args.checkpoint and args.prompt and not (args.checkpoint / "tokenizer.json").is_file():
        parser.error(f"--prompt: no tokenizer.json in {args.checkpoint} to encode text with (give --prompt-ids)")
    if args.speculative and args.temperature:
        parser.error("--speculative: verifies drafts against greedy decoding; give --temperature 0")
    if args.cuda_graph and (args.speculative or args.prefix_cache or args.max_batch):
        parser.error("--cuda-graph: the pool's flags (--max-batch, --prefix-cache, --speculative) run without it")
    if args.temperature == 0 and (args.top_k or args.top_p):
        parser.error("--top-k/--top-p: they filter sampling; give a --temperature > 0 (0 is greedy)")
    device = cli.check_device(parser, "--device", args.device) or "cpu"
    if args.cuda_graph and torch.device(device).type != "cuda":
        parser.error(f"--cuda-graph: needs --device cuda (the step is captured on a GPU), got {device}")
    _check_layout(parser, args, cfg)
    if args.backend != "auto" and (problem := cli.model_backend_problem(
            args.backend, device, args.dtype and getattr(torch, args.dtype))):
        parser.error(f"--backend: {problem} (or auto)")
    return device


def _check_layout(parser, args, cfg):
    """Refuse --tp / --ep that do not split this checkpoint (its config cfg) over the processes started (the same
    answer on every rank: each reads the same arguments, config and WORLD_SIZE, before any collective)."""
    from model.parallel import layout_problem

    world = world_size()
    if world > 1 and args.tp == args.ep == 1:
        parser.error(f"--tp/--ep: {world} processes (WORLD_SIZE), but tp = ep = 1 splits nothing; give --tp, --ep "
                     f"or both, each dividing {world}")
    needed = math.lcm(args.tp, args.ep)  # the fewest processes these sizes split over
    if problem := layout_problem(cfg, args.tp, args.ep, world if world > 1 else None):
        parser.error(f"--{problem[0]}: {problem[1]}")
    if world == 1 and needed > 1:
        parser.error(f"--tp/--ep: tp = {args.tp}, ep = {args.ep} need {needed} processes (or a multiple), this is "
                     f"one: start them with torchrun --nproc-per-node {needed} -m model.generate ...")
    if args.cuda_graph and world > 1:
        parser.error(f"--cuda-graph: a decode step is captured on one process, not {world}")


def _check_prompts(parser, argument: str, prompts: list[list[int]], path: Path, new_tokens: int):
    """Refuse prompts with ids outside the vocabulary, or too long for the model's positions."""
    config = json.loads((path / "config.json").read_text())
    config = config.get("text_config", config)
    vocab, positions = config["vocab_size"], config.get("max_position_embeddings", 32768)
    for i, ids in enumerate(prompts):
        if max(ids) >= vocab:
            parser.error(f"{argument}: prompt {i} holds token id {max(ids)}, outside the vocabulary [0, {vocab})")
        if len(ids) + new_tokens > positions:
            parser.error(f"{argument}: prompt {i} is {len(ids)} tokens; with --new-tokens {new_tokens} it needs "
                         f"{len(ids) + new_tokens} positions, more than the model's {positions}")


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    device = _check(parser, args)
    path = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from model.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_folder(path)
    prompts = args.prompt_ids or ([tokenizer.encode(text) for text in args.prompt] if args.prompt else None)
    if prompts:
        _check_prompts(parser, "--prompt" if args.prompt else "--prompt-ids", prompts, path, args.new_tokens)
    if args.threads:
        torch.set_num_threads(args.threads)

    import model
    from model.weights import CheckpointError

    with _processes(device) as device:
        try:
            m = model.from_pretrained(path, backend=args.backend, dtype=args.dtype, device=device, tp=args.tp,
                                      ep=args.ep)
        except CheckpointError as exc:  # what the headers could not tell (a tensor's data): still before any work
            parser.error(f"--checkpoint: {exc}")
        split = f"; tp {args.tp}, ep {args.ep} on {world_size()} processes" if m.layout else ""
        print(f"checkpoint {path}; backends {m.backends}; dtype {m.embed_tokens.weight.dtype}; device {device}"
              f"{split}", file=sys.stderr if prompts else sys.stdout)
        sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                        cuda_graph=args.cuda_graph, max_batch=args.max_batch, prefix_cache=args.prefix_cache,
                        speculative=args.speculative, draft=args.draft)
        if prompts:
            eos = None if args.ignore_eos or tokenizer is None else tokenizer.eos_token_ids
            _generate_text(m, tokenizer, prompts, args.new_tokens, eos, sampling, as_text=bool(args.prompt))
        else:
            _generate_random(m, tokenizer, args, sampling)


@contextlib.contextmanager
def _processes(device: str):
    """On one process: yields device. On several (WORLD_SIZE > 1): joins the process group (NCCL on CUDA, rank
    on cuda:LOCAL_RANK unless an index is given; gloo on CPU), yields this rank's device with only rank 0
    printing, and leaves the group at the end."""
    if world_size() == 1:
        yield device
        return
    import torch.distributed as dist

    cuda = torch.device(device).type == "cuda"
    if cuda and torch.device(device).index is None:
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        with contextlib.ExitStack() as quiet:
            if dist.get_rank():
                devnull = quiet.enter_context(open(os.devnull, "w"))
                quiet.enter_context(contextlib.redirect_stdout(devnull))
                quiet.enter_context(contextlib.redirect_stderr(devnull))
            yield device
    finally:
        dist.destroy_process_group()


def _generate_text(m, tokenizer, prompts, new_tokens, eos, sampling, as_text):
    """One prompt: its text, then each new piece as it is generated. Several: each continuation when done."""
    from model.tokenizer import TextStream

    decode = as_text or tokenizer is not None
    streams = [TextStream(tokenizer) if decode else None for _ in prompts]
    single = len(prompts) == 1
    if single:
        print(tokenizer.decode(prompts[0]) if decode else prompts[0], end="" if decode else "\n", flush=True)
    new = [[] for _ in prompts]
    start = time.perf_counter()
    first = None
    stats = {}
    for index, token in m.stream([torch.tensor(p) for p in prompts], new_tokens, eos, stats=stats, **sampling):
        first = first or time.perf_counter()
        new[index].append(token)
        if single:
            print(streams[0].push(token) if decode else token, end="" if decode else " ", flush=True)
    end = time.perf_counter()
    print(streams[0].flush() if single and decode else "")
    if not single:
        for i, (prompt, tokens) in enumerate(zip(prompts, new)):
            text = tokenizer.decode(prompt) + tokenizer.decode(tokens) if decode else prompt + tokens
            print(f"[{i}] {text}")
    made = sum(map(len, new))
    if made:
        steps = max(map(len, new)) - 1
        rate = f", decode {steps / (end - first):.1f} steps/s" if steps > 0 and end > first else ""
        # the first token's wait includes the backends' first-call compilation (numba, Triton)
        print(f"-- {made} new tokens; the first after {first - start:.2f} s (prefill of {sum(map(len, prompts))} "
              f"tokens){rate}", file=sys.stderr)
        if sampling["speculative"] or sampling["prefix_cache"]:
            print(f"-- {stats['steps']} decode calls, {stats['accepted']} of {stats['drafted']} draft tokens "
                  f"accepted; {stats['reused']} prompt tokens from the prefix cache", file=sys.stderr)


def _generate_random(m, tokenizer, args, sampling):
    """Random prompts [batch, prompt_len]: the new tokens, and prefill and decode tokens/s."""
    device = m.embed_tokens.weight.device
    prompt = torch.randint(m.config.vocab_size, (args.batch, args.prompt_len),
                           generator=torch.Generator().manual_seed(args.seed)).to(device)
    m.generate(prompt[:, :8], 2, **sampling)  # warm-up
    start = time.perf_counter()
    m.generate(prompt, 1, **sampling)  # the prefill (and one token from its logits)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    out = m.generate(prompt, args.new_tokens, **sampling)
    total_s = time.perf_counter() - start
    print("new tokens:", out[:, args.prompt_len:].tolist())
    if tokenizer is not None:
        for row in out[:, args.prompt_len:].tolist():
            print("text:", repr(tokenizer.decode(row)))
    print(f"prefill: {args.batch * args.prompt_len / prefill_s:.1f} tokens/s ({prefill_s * 1e3:.1f} ms for "
          f"{args.batch} x {args.prompt_len} tokens)")
    if args.new_tokens > 1:
        decode_s = max(total_s - prefill_s, 1e-9)
        print(f"decode:  {args.batch * (args.new_tokens - 1) / decode_s:.1f} tokens/s "
              f"({decode_s * 1e3 / (args.new_tokens - 1):.2f} ms per step, batch {args.batch})")
    print(f"overall: {args.batch * args.new_tokens / total_s:.1f} new tokens/s ({total_s:.3f} s)")


if __name__ == "__main__":
    main()
