"""The precision sweep: what the gated delta rule's state dtype costs in error, memory and decode time.

    python -m bench.sweep --op precision [--quick] [--device cpu|cuda] [--backend torch ...]
    python -m bench.suites.precision.run [--device cuda]     # only the decode-step timing, batches 1 to 256

Error: o and the final state of every state dtype (float32, bfloat16, float16) against a float64 yardstick as
the sequence grows, decoded token by token (mode "recurrent": the state stored after every token) and prefilled
in chunks ("chunk": after every chunk), for float32, bfloat16 and float16 inputs (q, k, v; g and beta stay
float32), at three kinds of decay:
  checkpoint  g = -exp(A_log) softplus(a + dt_bias) as Qwen3.5 computes it, A_log and dt_bias per head from the
              ranges its linear-attention layers are initialised in (fla / Mamba2: A in [1, 16], dt in
              [0.001, 0.1] log-uniform, dt_bias = softplus^-1(dt); no trained checkpoint is at hand), a ~ N(0, 1)
              per token: decays from exp(-0.001) (slow heads) to exp(-2) per token;
  zero        g = 0 (no decay: the extreme where roundings pile up);
  strong      g = -8 (g << 0: the state forgets almost everything every token).
The checkpoint decays run at Qwen3.5-35B-A3B's linear-attention shape (Hk = 16, Hv = 32, K = V = 128); the two
extremes, uniform over heads (so four heads show what 32 would), at its head dims with Hk = 2, Hv = 4 and to
longer sequences. The sequence runs in pieces, each continuing from the state the last left (in the state dtype:
the same computation as one call, pieces being whole chunks); the error of o is taken over the tokens since the
last T of the grid (the second half of the sequence: the error where the sequence has got to), the state's at T.
The yardstick: the torch backend on float64 inputs (the same rounded q, k, v), token by token with a float64
state, batched over heads (tests/bench/test_precision.py checks it against the reference at short T).

Memory: the bytes of one sequence's cache at Qwen3.5-35B-A3B (30 Gated DeltaNet layers' recurrent states in the
state dtype and conv states, 10 attention layers' KV cache, bfloat16) at a few contexts, and how many sequences
fit in 141 GB (an H200) beside the weights (bfloat16, or fp8 experts).

fp8 experts: the MoE layer at Qwen3.5-35B-A3B's expert shape with bf16 weights and with the same weights in
float8_e4m3fn (kernellab.moe_fp8), against the float64 layer.

Model: the bench checkpoint (random weights) loaded with a bf16 / fp16 state and fp8 experts, against the float32
model: greedy tokens over a long generation, free and teacher-forced, and the logits' error.

Decode time: one decode step of one layer (T = 1 per sequence, from a state in the state dtype) per state dtype
and batch, per backend; on CPU only a tiny version (B = 1, a short budget: timings on a shared CPU say little).

`sweep(quick, device, out, backends)` returns the rows (bench.sweep --op precision calls it) and writes
precision_error_o.png, precision_error_state.png and precision_memory.png into out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

import kernellab
from bench import cli, timing
from bench.check import rel_err
from bench.ops import make
from bench.suites import pieces
from bench.suites.model.floor import cache_bytes_from_shapes
from bench.sweep import dtype_name
from kernellab.fp8 import quantized_bytes
from model.config import ModelConfig
from model.weights import checkpoint_shapes


OP = "gated_delta_rule"


STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


MODES = ("recurrent", "chunk")


GATES = ("checkpoint", "zero", "strong")


STRONG_LOG_DECAY = -8.0


PIECE = 4096  # tokens per call at most (inputs are made piece by piece: 64K tokens of the 35B shape are GBs)


TOKEN_BLOCK = 32  # inputs are drawn in blocks of this many tokens, each from its own seed


GPU_MEMORY_BYTES = 141e9  # an H200


CONTEXTS = (4096, 32768, 262144)


THRESHOLD = 1e-2  # the report's question: from what T on a bfloat16 state's output error passes 1 %


@dataclass(frozen=True)
class Heads:
    """A linear-attention head layout: Hk key heads, Hv value heads, head dims K and V."""

    Hk: int
    Hv: int
    K: int
    V: int

    @property
    def key(self) -> str:
        return f"Hk={self.Hk},Hv={self.Hv},K={self.K},V={self.V}"


QWEN35 = Heads(16, 32, 128, 128)  # Qwen3.5-35B-A3B's Gated DeltaNet layers


FEW = Heads(2, 4, 128, 128)  # its head dims, four value heads


def grid(device: str, quick: bool) -> list[tuple[Heads, tuple[str, ...], tuple[int, ...]]]:
    """(heads, gates run side by side as batch rows, T grid) of the sweep."""
    if quick:
        return [(Heads(1, 2, 64, 64), GATES, (256, 512, 1024, 2048))]
    doubling = lambda top: tuple(2 ** i for i in range(8, int(math.log2(top)) + 1))  # noqa: E731
    if device == "cuda":
        return [(QWEN35, ("checkpoint",), doubling(2 ** 18)), (FEW, ("zero", "strong"), doubling(2 ** 20))]
    return [(QWEN35, ("checkpoint",), doubling(2 ** 14)), (FEW, ("zero", "strong"), doubling(2 ** 16))]


def head_decays(Hv: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_log, dt_bias) [Hv] float64 of the checkpoint decays (module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.empty(Hv, dtype=torch.float64).uniform_(1, 16, generator=gen)
    dt = torch.exp(torch.empty(Hv, dtype=torch.float64).uniform_(math.log(1e-3), math.log(1e-1), generator=gen))
    return A.log(), dt + torch.log(-torch.expm1(-dt))  # dt_bias = softplus^-1(dt)


def log_decays(gate: str, gen: torch.Generator, T: int, Hv: int, heads_decay) -> torch.Tensor:
    """g [T, Hv] float64 of one batch row (module docstring)."""
    if gate == "zero":
        return torch.zeros(T, Hv, dtype=torch.float64)
    if gate == "strong":
        return torch.full((T, Hv), STRONG_LOG_DECAY, dtype=torch.float64)
    if gate == "checkpoint":
        A_log, dt_bias = heads_decay
        a = torch.randn(T, Hv, generator=gen, dtype=torch.float64)
        return -A_log.exp() * F.softplus(a + dt_bias)
    raise ValueError(f"gate must be one of {GATES}, got {gate!r}")


def _token_block(heads: Heads, gates, index: int, decays, seed: int) -> dict:
    """float64 q, k, v, g, beta of tokens index * TOKEN_BLOCK .. + TOKEN_BLOCK of every batch row (one per gate),
    drawn from their own seed: a token's inputs do not depend on how the sequence is cut into pieces."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    B, L = len(gates), TOKEN_BLOCK
    return dict(q=torch.randn(B, L, heads.Hk, heads.K, generator=gen, dtype=torch.float64),
                k=torch.randn(B, L, heads.Hk, heads.K, generator=gen, dtype=torch.float64),
                v=torch.randn(B, L, heads.Hv, heads.V, generator=gen, dtype=torch.float64),
                beta=torch.sigmoid(torch.randn(B, L, heads.Hv, generator=gen, dtype=torch.float64)),
                g=torch.stack([log_decays(gate, gen, L, heads.Hv, decays) for gate in gates]))


def piece_inputs(heads: Heads, gates, start: int, length: int, dtype, device, seed: int) -> tuple[dict, dict]:
    """The gated delta rule's inputs for tokens start .. start + length (multiples of TOKEN_BLOCK) of every batch
    row (one per gate): q, k, v in dtype, g and beta float32 (as bench.ops.make makes them); and the same values in
    float64 for the yardstick."""
    decays = head_decays(heads.Hv, seed)
    blocks = [_token_block(heads, gates, i, decays, seed)
              for i in range(start // TOKEN_BLOCK, (start + length) // TOKEN_BLOCK)]
    drawn = {key: torch.cat([block[key] for block in blocks], dim=1) for key in blocks[0]}
    narrow = dict(q=drawn["q"].to(dtype), k=drawn["k"].to(dtype), v=drawn["v"].to(dtype),
                  g=drawn["g"].to(torch.float32), beta=drawn["beta"].to(torch.float32))
    narrow = {key: value.to(device) for key, value in narrow.items()}
    wide = {key: value.to(torch.float64) for key, value in narrow.items()}
    return narrow, wide


def yardstick(wide: dict, state):
    """(o, final state) in float64: the torch backend token by token on float64 inputs, a float64 state."""
    return kernellab.gated_delta_rule(**wide, initial_state=state, output_final_state=True, use_qk_l2norm=True,
                                    mode="recurrent", backend="torch")


class Window:
    """Squared errors and squared yardstick summed over the tokens of a window, per batch row."""

    def __init__(self, rows: int):
        self.error = torch.zeros(rows, dtype=torch.float64)
        self.norm = torch.zeros(rows, dtype=torch.float64)

    def add(self, out: torch.Tensor, ref: torch.Tensor):
        diff = (out.double() - ref).flatten(1)
        self.error += diff.square().sum(1).cpu()
        self.norm += ref.flatten(1).square().sum(1).cpu()

    def relative(self) -> list[float]:
        return (self.error / self.norm).sqrt().tolist()


def error_rows(heads: Heads, gates, t_grid, dtype, device, backends, seed: int = 0) -> list[dict]:
    """Rows of phase "error": per backend, mode, state dtype, gate and T of t_grid: rel_err_o over the tokens since
    the previous T, rel_err_state at T."""
    configs = [(b, mode, sd) for b in backends for mode in MODES for sd in STATE_DTYPES]
    states = dict.fromkeys(configs)
    windows = {c: Window(len(gates)) for c in configs}
    failed: dict[tuple, str] = {}
    ref_state, rows = None, []
    bounds = sorted(set(t_grid) | set(range(PIECE, t_grid[-1], PIECE)))
    start = 0
    for end in bounds:
        narrow, wide = piece_inputs(heads, gates, start, end - start, dtype, device, seed)
        ref_o, ref_state = yardstick(wide, ref_state)
        for config in configs:
            if config in failed:
                continue
            backend, mode, sd = config
            try:
                o, states[config] = kernellab.gated_delta_rule(
                    **narrow, initial_state=states[config], output_final_state=True, use_qk_l2norm=True, mode=mode,
                    state_dtype=sd, backend=backend)
            except (ValueError, kernellab.BackendUnavailable) as error:  # a backend without this state dtype
                failed[config] = f"{type(error).__name__}: {error}"[:300]
                continue
            windows[config].add(o, ref_o)
        if end in t_grid:
            for config in configs:
                backend, mode, sd = config
                name = str(sd).removeprefix("torch.")
                base = dict(op="precision", phase="error", backend=backend, device=device,
                            dtype=str(dtype).removeprefix("torch."), heads=heads.key, mode=mode, state_dtype=name,
                            T=end, yardstick="torch-f64 recurrent")
                series = [dict(base, gate=gate, shape=f"{heads.key},gate={gate},mode={mode},state={name}")
                          for gate in gates]
                if config in failed:
                    rows += [dict(row, error=failed[config]) for row in series]
                    continue
                o_errors = windows[config].relative()
                for i, row in enumerate(series):
                    rows.append(dict(row, rel_err_o=o_errors[i],
                                     rel_err_state=rel_err(states[config][i], ref_state[i])))
                windows[config] = Window(len(gates))
        start = end
    return rows


def weight_bytes(cfg: ModelConfig, fp8_experts: bool) -> int:
    """The checkpoint's bytes in bfloat16, or with the routed experts in float8_e4m3fn with 128 x 128 block
    scales (kernellab.fp8)."""
    total = 0
    for name, shape in checkpoint_shapes(cfg).items():
        expert = name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))
        total += quantized_bytes(shape) if fp8_experts and expert else 2 * math.prod(shape)
    return total


def memory_rows(device: str) -> list[dict]:
    """Rows of phase "memory" at Qwen3.5-35B-A3B: per state dtype and context, the cache bytes of one sequence
    and the sequences that fit in GPU_MEMORY_BYTES beside the weights (bfloat16; fp8 experts)."""
    cfg = ModelConfig()  # transformers' defaults: Qwen3.5-35B-A3B
    weights = {"bf16": weight_bytes(cfg, False), "fp8 experts": weight_bytes(cfg, True)}
    rows = []
    for sd in STATE_DTYPES:
        size = torch.empty((), dtype=sd).element_size()
        recurrent = sum(kind == "linear_attention" for kind in cfg.layer_types) * cfg.linear_num_value_heads * \
            cfg.linear_key_head_dim * cfg.linear_value_head_dim * size
        for context in CONTEXTS:
            per_sequence = cache_bytes_from_shapes(cfg, 1, context, 2, state_bytes=size)
            for label, held in weights.items():
                name = str(sd).removeprefix("torch.")
                rows.append(dict(op="precision", phase="memory", backend="any", device=device, dtype="bfloat16",
                                 shape=f"Qwen3.5-35B-A3B,state={name},weights={label}", heads="Qwen3.5-35B-A3B",
                                 state_dtype=name, context=context,
                                 weights=label, weight_bytes=held, state_bytes=recurrent, cache_bytes=per_sequence,
                                 sequences=int((GPU_MEMORY_BYTES - held) // per_sequence)))
    return rows


def fp8_rows(device: str, backends=("torch",), tokens: int = 64, experts: int = 32) -> list[dict]:
    """Rows of phase "fp8": the MoE layer at Qwen3.5-35B-A3B's expert shape (D = 2048, I = 512, top-8; `experts`
    of its 256 experts: the error of a slot does not depend on how many others there are) with bf16 weights
    (moe) and with the same weights in float8_e4m3fn (moe_fp8, per backend), against the float64 layer on the
    unquantized weights; and the grouped GEMM of its gate/up projection likewise."""
    from kernellab.fp8 import quantize_weights

    shape = dict(N=tokens, D=2048, E=experts, I=512, top_k=8)
    dense = make("moe", **shape, seed=0)
    exact = kernellab.moe(**{k: v.double() if k in ("x", "w_gate_up", "w_down") else v for k, v in dense.items()},
                        backend="reference")
    quantized = {**dense, "x": dense["x"].bfloat16()}
    (quantized["w_gate_up"], quantized["w_gate_up_scale"]), (quantized["w_down"], quantized["w_down_scale"]) = map(
        quantize_weights, (dense["w_gate_up"], dense["w_down"]))
    experts_shape = f"N={tokens},D=2048,E={experts},I=512,top_k=8"
    base = dict(op="precision", phase="fp8", device=device, dtype="bfloat16", heads=experts_shape,
                yardstick="reference moe, float64 weights")
    on = lambda args: {k: v.to(device) for k, v in args.items()}  # noqa: E731
    bf16 = {k: v.bfloat16() if k in ("x", "w_gate_up", "w_down") else v for k, v in dense.items()}
    rows = [dict(base, backend="torch", layer="moe, bf16 weights", shape=f"{experts_shape},layer=moe",
                 rel_err_o=rel_err(kernellab.moe(**on(bf16), backend="torch"), exact))]
    for backend in backends:
        try:
            out = kernellab.moe_fp8(**on(quantized), backend=backend)
        except (ValueError, kernellab.BackendUnavailable) as error:
            rows.append(dict(base, backend=backend, layer="moe_fp8", shape=f"{experts_shape},layer=moe_fp8",
                             error=f"{type(error).__name__}: {error}"[:300]))
            continue
        rows.append(dict(base, backend=backend, layer="moe_fp8, fp8 weights", shape=f"{experts_shape},layer=moe_fp8",
                         rel_err_o=rel_err(out, exact)))
    return rows


MODEL_VARIANTS = {"bf16 state": dict(state_dtype=torch.bfloat16), "fp16 state": dict(state_dtype=torch.float16),
                  "fp8 experts": dict(fp8_experts=True),
                  "bf16 state + fp8 experts": dict(state_dtype=torch.bfloat16, fp8_experts=True)}


def _forced_logits(m, prompt, tokens):
    """Logits [n, vocab] predicting tokens[:, i] (i < n) when the model decodes tokens one at a time after the
    prompt (a prefill, then decode steps fed the given tokens: teacher forcing)."""
    cache = m.new_cache(1, prompt.shape[1] + tokens.shape[1])
    logits = [m(prompt, cache)[0, -1:]]
    for i in range(tokens.shape[1] - 1):
        logits.append(m(tokens[:, i:i + 1], cache)[0])
    return torch.cat(logits).float()


def model_rows(device: str, backend: str = "torch", prompt_len: int = 64, new_tokens: int = 512) -> list[dict]:
    """Rows of phase "model": the bench checkpoint (bench/suites/model's BENCH_CONFIG, random weights) loaded with each of
    MODEL_VARIANTS against the float32 model (float32 weights and state): greedy tokens decoded freely (the
    first step where they differ) and teacher-forced on the float32 model's tokens (the share of steps whose
    greedy token agrees, the logits' relative error per step)."""
    import tempfile

    import model
    from bench.suites.model.config import BENCH_CONFIG
    from model.generate import write_random_checkpoint

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as folder, torch.inference_mode():
        path = write_random_checkpoint(Path(folder) / "bench", **BENCH_CONFIG)
        base = model.from_pretrained(path, backend=backend, dtype=torch.float32, device=device)
        prompt = torch.randint(BENCH_CONFIG["vocab_size"], (1, prompt_len), generator=torch.Generator().manual_seed(0))
        prompt = prompt.to(device)
        reference = base.generate(prompt, new_tokens)[:, prompt_len:]
        ref_logits = _forced_logits(base, prompt, reference)
        for variant, options in MODEL_VARIANTS.items():
            m = model.from_pretrained(path, backend=backend, dtype=torch.float32, device=device, **options)
            free = m.generate(prompt, new_tokens)[:, prompt_len:]
            differs = (free != reference)[0].nonzero()
            logits = _forced_logits(m, prompt, reference)
            errors = (logits - ref_logits).norm(dim=-1) / ref_logits.norm(dim=-1)
            rows.append(dict(op="precision", phase="model", backend=backend, device=device, dtype="float32",
                             shape=f"bench checkpoint,variant={variant}", heads="bench checkpoint", variant=variant,
                             prompt=prompt_len, new_tokens=new_tokens,
                             first_divergence=int(differs[0]) if len(differs) else new_tokens,
                             token_agreement=float((logits.argmax(-1) == reference[0]).float().mean()),
                             logits_rel_err_median=float(errors.median()), logits_rel_err_max=float(errors.max()),
                             logits_rel_err_last=float(errors[-1])))
    return rows


def decode_rows(device: str, backends, batches, budget_s: float) -> list[dict]:
    """Rows of phase "decode": one decode step of one Qwen3.5-35B-A3B Gated DeltaNet layer (T = 1 per sequence,
    from a state in the state dtype, the new state returned) per backend, state dtype and batch; state_gbps
    counts the state's bytes read and written (traffic_bytes)."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    rows = []
    for B in batches:
        args = kernellab.validate.gated_delta_rule(**_decode_inputs(B, dtype, device), mode="recurrent")
        for backend in backends:
            for sd in STATE_DTYPES:
                step = dict(args, initial_state=args["initial_state"].to(sd), state_dtype=sd)
                name = str(sd).removeprefix("torch.")
                base = dict(op="precision", phase="decode", backend=backend, device=device,
                            dtype=str(dtype).removeprefix("torch."), shape=f"{QWEN35.key},B={B},state={name},decode",
                            heads=QWEN35.key, B=B, mode="recurrent", state_dtype=name)
                try:
                    call = kernellab.get(OP, backend)
                    call(**step)
                    t = timing.time_call(lambda: call(**step), device, budget_s)
                except (ValueError, kernellab.BackendUnavailable) as error:
                    rows.append(dict(base, error=f"{type(error).__name__}: {error}"[:300]))
                    continue
                state = 2 * B * QWEN35.Hv * QWEN35.K * QWEN35.V * torch.empty((), dtype=sd).element_size()
                rows.append(dict(base, median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, repeats=t.repeats,
                                 threads=t.threads, traffic_bytes=state, state_gbps=state / t.median_ms / 1e6))
    return rows


def _decode_inputs(B, dtype, device):
    return make("gated_delta_rule", B=B, T=1, Hk=QWEN35.Hk, Hv=QWEN35.Hv, K=QWEN35.K, V=QWEN35.V, dtype=dtype,
                device=device, initial_state=True)


def default_backends(device: str) -> list[str]:
    """The lab backends of the gated delta rule that run on device and implement state_dtype (the reference's
    loop is the short-T yardstick of the tests, too slow here)."""
    names = [n for n in kernellab.backends(OP, device) if n != "reference" and not
             kernellab.registry.registered(OP)[n].peer]
    return [n for n in names if n in ("torch", "cuda", "triton")] if device == "cuda" else ["torch"]


def sweep(quick: bool = False, device: str = "cpu", out: str | Path = "reports/cpu", backends=None, on_rows=None,
          done=frozenset()) -> list[dict]:
    """Rows of phases "error", "memory" and "decode" (module docstring), in pieces (bench.suites.pieces: on_rows
    gets each piece's rows as it finishes, the labels in done are skipped); writes the plots into out."""
    from bench.suites.precision.report import plot  # report reads this module's constants: imported here
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    backends = backends or default_backends(device)
    jobs = [(f"error {heads.key} {'/'.join(gates)} {dtype_name(dtype)}",
             partial(error_rows, heads, gates, t_grid, dtype, device, backends))
            for heads, gates, t_grid in grid(device, quick) for dtype in INPUT_DTYPES]
    jobs += [("memory", partial(memory_rows, device)),
             ("fp8", partial(fp8_rows, device, [b for b in kernellab.backends("moe_fp8", device) if b != "reference"])),
             ("model", partial(model_rows, device, new_tokens=32 if quick else 512)),
             ("decode", partial(decode_rows, device, backends, (1, 8, 64, 256) if device == "cuda" else (1,),
                                budget_s=0.5 if device == "cuda" else 0.1))]
    rows = pieces(jobs, on_rows, done)
    if not done:  # resumed: these rows are part of the run's; bench.report plots them all from its CSV
        plot(rows, out)
    return rows


def main(argv=None):
    """The decode-step timing alone (the sweep's "decode" rows at batches 1 to 256), printed."""
    parser = cli.ArgumentParser(prog="python -m bench.suites.precision.run", description=main.__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=cli.DEVICES)
    parser.add_argument("--backend", action="append", help="gated_delta_rule backend(s) (default: those with "
                                                           "state_dtype that run here)")
    parser.add_argument("--budget", type=cli.positive_float, default=0.5, help="seconds of timed calls per case")
    args = parser.parse_args(argv)
    cli.check_device(parser, "--device", args.device)
    for name in args.backend or ():
        cli.check_backend(parser, "--backend", OP, name, args.device)
    rows = decode_rows(args.device, args.backend or default_backends(args.device), (1, 8, 64, 256), args.budget)
    for row in rows:
        print(row.get("backend"), row.get("B"), row.get("state_dtype"),
              f"{row['median_ms'] * 1e3:.1f} us, {row['state_gbps']:.0f} GB/s" if "median_ms" in row else row["error"])
    from bench.suites.precision.report import summary

    print("\n".join(summary(rows)))


if __name__ == "__main__":
    main()
