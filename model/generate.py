"""Greedy generation from the command line.

    python -m model.generate                       # writes a small random checkpoint, then runs it
    python -m model.generate --checkpoint PATH --backend torch --prompt-len 64 --new-tokens 32 --dtype float32
"""
from __future__ import annotations

import argparse
import os
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


def write_random_checkpoint(folder: str | Path, seed: int = 0, **overrides) -> Path:
    """Build transformers' Qwen3_5MoeForCausalLM from SMALL_CONFIG (plus overrides) with random weights and
    save_pretrained it (safetensors) into folder. Norm weights and dt_bias are randomised too, so a model
    that ignored them would not match."""
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    torch.manual_seed(seed)
    hf = Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**{**SMALL_CONFIG, **overrides})).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("norm.weight", "dt_bias")):
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def default_checkpoint() -> Path:
    """The small random checkpoint, written once into the cache dir (or a temp dir)."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwen35-kernel-lab" / "small-random"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        root = Path(tempfile.mkdtemp(prefix="qwen35-small-"))
    if not (root / "config.json").is_file():
        write_random_checkpoint(root)
    return root


DTYPES = ("float32", "bfloat16", "float16", "float64")


def main(argv=None):
    from bench import cli

    parser = cli.ArgumentParser(prog="python -m model.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=cli.existing_folder,
                        help="Hugging Face checkpoint folder (default: a small random one)")
    parser.add_argument("--backend", default="auto", help="backend of every op that has it (default: auto)")
    parser.add_argument("--prompt-len", type=cli.positive_int, default=32)
    parser.add_argument("--new-tokens", type=cli.nonnegative_int, default=16)
    parser.add_argument("--batch", type=cli.positive_int, default=1)
    parser.add_argument("--dtype", default=None, choices=DTYPES, help="default: the checkpoint's")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=cli.positive_int, default=None,
                        help="torch CPU threads (on a busy machine 1 avoids oversubscription)")
    args = parser.parse_args(argv)
    if args.checkpoint and not (args.checkpoint / "config.json").is_file():
        parser.error(f"--checkpoint: no config.json in {args.checkpoint} (a Hugging Face checkpoint folder holds "
                     f"config.json and *.safetensors)")
    device = cli.check_device(parser, "--device", args.device) or "cpu"
    if args.backend != "auto" and (problem := cli.model_backend_problem(
            args.backend, device, args.dtype and getattr(torch, args.dtype))):
        parser.error(f"--backend: {problem} (or auto)")
    if args.threads:
        torch.set_num_threads(args.threads)

    import model

    path = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    m = model.from_pretrained(path, backend=args.backend, dtype=args.dtype, device=args.device)
    device = m.embed_tokens.weight.device
    prompt = torch.randint(m.config.vocab_size, (args.batch, args.prompt_len),
                           generator=torch.Generator().manual_seed(args.seed)).to(device)
    print(f"checkpoint {path}; backends {m.backends}; dtype {m.embed_tokens.weight.dtype}; device {device}")
    m.generate(prompt[:, :8], 2)  # warm-up
    start = time.perf_counter()
    m.generate(prompt, 1)  # the prefill (and one token from its logits)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    out = m.generate(prompt, args.new_tokens)
    total_s = time.perf_counter() - start
    print("new tokens:", out[:, args.prompt_len:].tolist())
    print(f"prefill: {args.batch * args.prompt_len / prefill_s:.1f} tokens/s ({prefill_s * 1e3:.1f} ms for "
          f"{args.batch} x {args.prompt_len} tokens)")
    if args.new_tokens > 1:
        decode_s = max(total_s - prefill_s, 1e-9)
        print(f"decode:  {args.batch * (args.new_tokens - 1) / decode_s:.1f} tokens/s "
              f"({decode_s * 1e3 / (args.new_tokens - 1):.2f} ms per step, batch {args.batch})")
    print(f"overall: {args.batch * args.new_tokens / total_s:.1f} new tokens/s ({total_s:.3f} s)")


if __name__ == "__main__":
    main()
