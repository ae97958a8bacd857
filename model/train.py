"""Training the Qwen3.5-MoE model on the lab's kernels: optimizer steps on a token stream, a loss curve, a checkpoint.

    python -m model.train                       # the small random checkpoint, a built-in token stream
    python -m model.train --checkpoint PATH --backend torch --steps 200 --batch 8 --seq-len 128 --lr 1e-3

Every op of the model runs forward and backward on the backend chosen (one that has a backward: kernellab/autograd.py;
"auto" takes the first of the auto order that has one). AdamW steps on the next-token cross-entropy of random
windows of the stream, with the gradient norm clipped at 1; a progress bar with the loss; then, under --out,
loss.png (the loss curve) and checkpoint/ (config.json and model.safetensors, with transformers' names), which
`model.from_pretrained` loads back. Training that diverges (a loss that is not finite: too high an --lr) stops
at that step with exit status 1 and saves nothing.

The built-in stream: tokens that follow a fixed random successor map (token -> successor[token]) with a random
token every RESTART_EVERY positions, so that the loss can fall from ln(vocab) towards ln(vocab) / RESTART_EVERY.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kernellab.validate import NotFinite

RESTART_EVERY = 16
STREAM_TOKENS = 1 << 16


def token_stream(vocab_size: int, length: int = STREAM_TOKENS, seed: int = 0) -> torch.Tensor:
    """int64 [length]: stream[t + 1] = successor[stream[t]] for a fixed random permutation `successor` of the
    vocabulary, except every RESTART_EVERY-th token, drawn at random."""
    gen = torch.Generator().manual_seed(seed)
    successor = torch.randperm(vocab_size, generator=gen)
    column = torch.randint(vocab_size, (-(-length // RESTART_EVERY),), generator=gen)  # each block's first token
    columns = [column]
    for _ in range(RESTART_EVERY - 1):
        columns.append(column := successor[column])
    return torch.stack(columns, dim=1).reshape(-1)[:length]


def batch_of(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """int64 [batch, seq_len]: windows of the stream at random starts."""
    starts = torch.randint(stream.shape[0] - seq_len + 1, (batch,), generator=gen)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [B, T, vocab] at positions 0..T-2 against ids [B, T] at 1..T-1, in float32."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


STEP_PARTS = ("forward", "backward", "optimizer")


def train_step(m, ids: torch.Tensor, optimizer, logits=None, sync=None) -> tuple[torch.Tensor, dict[str, float]]:
    """One optimizer step of m (in place) on ids [B, T]: "forward" (logits, the next-token loss), "backward"
    (gradients zeroed, then backpropagated), "optimizer" (gradient norm clipped at 1, optimizer.step()). logits:
    ids [B, T] -> [B, T, vocab] (default m itself; transformers' model needs `.logits` of its output). sync: called
    before each clock reading (a GPU's synchronize: its work is asynchronous). Returns the loss (detached, a 0-d
    tensor: no host sync) and the seconds of each part (STEP_PARTS) by time.perf_counter."""
    logits = logits or m
    sync = sync or (lambda: None)
    clock = [time.perf_counter()]

    def tick():
        sync()
        clock.append(time.perf_counter())

    loss = next_token_loss(logits(ids), ids)
    tick()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    tick()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    optimizer.step()
    tick()
    return loss.detach(), {part: b - a for part, a, b in zip(STEP_PARTS, clock, clock[1:])}


class Diverged(RuntimeError):
    """Training whose loss (or parameters) stopped being finite: nothing of it is worth saving."""


def train(m, stream: torch.Tensor, steps: int, batch: int, seq_len: int, lr: float, seed: int = 0,
          progress: bool = True) -> list[float]:
    """AdamW steps of m (in place) on batches of the stream (train_step); returns the loss of every step.
    Diverged at the first step whose loss or updated parameters are not finite."""
    from tqdm import tqdm

    m.train()
    device = m.embed_tokens.weight.device
    optimizer = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    with tqdm(total=steps, desc="train", unit="step", disable=not progress) as bar:
        for step in range(1, steps + 1):
            try:
                loss, _ = train_step(m, batch_of(stream, batch, seq_len, gen).to(device), optimizer)
            except NotFinite as exc:  # finite but huge weights overflow the activations: an op refuses them
                raise Diverged(f"activations are not finite at step {step} of {steps} (lr {lr:g}; {exc}): training "
                               f"diverged") from None
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                raise Diverged(f"the loss is {losses[-1]} at step {step} of {steps} (lr {lr:g}): training diverged")
            # after every update, not only the last: the next forward would refuse non-finite activations (the
            # ops' validation) before its loss could say so; one pass over the parameters, small beside a step
            if not all(torch.isfinite(p).all() for p in m.parameters()):
                raise Diverged(f"parameters are not finite after step {step} of {steps} (lr {lr:g}): training "
                               f"diverged")
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def save_checkpoint(m, folder: str | Path, config: dict) -> Path:
    """Write m as a Hugging Face checkpoint folder: config.json (the given config.json dict) and
    model.safetensors with transformers' tensor names (model.weights.to_checkpoint_state_dict)."""
    from safetensors.torch import save_file

    from model.weights import SINGLE_FILE, to_checkpoint_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(to_checkpoint_state_dict(m.state_dict(), m.config), folder / SINGLE_FILE, metadata={"format": "pt"})
    return folder


def plot_losses(losses: list[float], path: str | Path, title: str) -> Path:
    """The loss curve (loss against step) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("next-token cross-entropy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def training_backends(name: str, device) -> dict[str, str]:
    """{op: backend} for the model's ops when training: `name` for every op registered under it (each must have
    a backward), "auto" resolved to the first backend of the auto order that has one elsewhere."""
    from kernellab import registry
    from model.model import OPS

    return {op: name if name != "auto" and name in registry.registered(op)
            else registry.auto_backend(op, device, torch.float32, grad=True) for op in OPS}


def backward_problem(name: str, device: str) -> str | None:
    """Why backend `name` cannot train the model (an op it is registered for has no backward), or None."""
    from kernellab import registry
    from model import cli
    from model.model import OPS

    def lacking(backend):
        return [op for op in OPS if backend in registry.registered(op)
                and registry.registered(op)[backend].backward is None]

    if not lacking(name):
        return None
    able = [b for b in cli.model_backends(device, torch.float32) if not lacking(b)]
    return f"backend {name!r} has no backward for {', '.join(lacking(name))}; the model trains here with: " \
           f"{', '.join(able)}"


def main(argv=None):
    from model import cli
    from model.generate import SMALL_CONFIG

    parser = cli.ArgumentParser(prog="python -m model.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=cli.existing_folder,
                        help="Hugging Face checkpoint folder to start from (default: the small random one)")
    parser.add_argument("--backend", default="auto", help="backend of every op that has it (default: auto)")
    parser.add_argument("--steps", type=cli.positive_int, default=60)
    parser.add_argument("--batch", type=cli.positive_int, default=4)
    parser.add_argument("--seq-len", type=cli.positive_int, default=64, help="tokens per sequence (at least 2)")
    parser.add_argument("--lr", type=cli.positive_float, default=3e-3, help="AdamW's learning rate")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--seed", type=cli.seed, default=0, help="of the batches and the stream (< 2**64)")
    parser.add_argument("--threads", type=cli.positive_int, default=None,
                        help="torch CPU threads (on a busy machine 1 avoids oversubscription)")
    parser.add_argument("--out", type=cli.out_folder, default=Path("out/train"),
                        help="folder for loss.png and checkpoint/ (default: out/train)")
    args = parser.parse_args(argv)
    if args.seq_len < 2:
        parser.error(f"--seq-len: expected an integer >= 2 (a next token to predict), got {args.seq_len}")
    if args.checkpoint and not (args.checkpoint / "config.json").is_file():
        parser.error(f"--checkpoint: no config.json in {args.checkpoint} (a Hugging Face checkpoint folder holds "
                     f"config.json and *.safetensors)")
    from model.config import ModelConfig

    cfg = cli.check_checkpoint(parser, "--checkpoint", args.checkpoint) if args.checkpoint else \
        ModelConfig(**SMALL_CONFIG)
    longest = min(STREAM_TOKENS, cfg.max_position_embeddings)  # windows of the stream, within the positions
    if args.seq_len > longest:
        parser.error(f"--seq-len {args.seq_len}: more than the "
                     + ("stream's" if longest == STREAM_TOKENS else "model's max_position_embeddings")
                     + f" {longest} tokens; valid: 2 to {longest}")
    device = cli.check_device(parser, "--device", args.device) or "cpu"
    if args.backend != "auto" and (problem := cli.model_backend_problem(args.backend, device, torch.float32)
                                   or backward_problem(args.backend, device)):
        parser.error(f"--backend: {problem} (or auto)")
    cli.check_writable(parser, "--out", args.out)  # before training, not after it
    if args.threads:
        torch.set_num_threads(args.threads)

    import model
    from model.generate import default_checkpoint
    from model.weights import CheckpointError

    path = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    try:
        m = model.from_pretrained(path, backend=training_backends(args.backend, device), dtype=torch.float32,
                                  device=device)
    except CheckpointError as exc:
        parser.error(f"--checkpoint: {exc}")
    stream = token_stream(m.config.vocab_size, seed=args.seed)
    print(f"checkpoint {path}; backends {m.backends}; {sum(p.numel() for p in m.parameters()):,} parameters; "
          f"{args.steps} steps of {args.batch} x {args.seq_len} tokens")
    try:
        losses = train(m, stream, args.steps, args.batch, args.seq_len, args.lr, seed=args.seed)
    except Diverged as exc:
        print(f"python -m model.train: {exc}; nothing saved (try a smaller --lr)", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    curve = plot_losses(losses, args.out / "loss.png", f"{path.name}, backends {set(m.backends.values())}, "
                                                       f"batch {args.batch} x {args.seq_len}, lr {args.lr:g}")
    saved = save_checkpoint(m, args.out / "checkpoint", json.loads((path / "config.json").read_text()))
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; loss curve {curve}; checkpoint {saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
