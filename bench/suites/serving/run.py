"""The serving bench at kernel level: the gated delta rule as a server calls it, at Qwen3.5-35B-A3B's linear-attention
shape (Hk = 16, Hv = 32, K = V = 128), float32, on every lab backend that declares the keyword a part needs
(kernellab.registry.Backend.serving; the float64 reference is the yardstick, not timed).

    python -m bench.sweep --op serving [--quick] [--backend torch mkl numba] [--out DIR] [--resume]

Backends by default: those that declare state_indices; a part needing a keyword a backend lacks gets a row that
says so (_timed).

Parts, one piece each (bench.suites.pieces: a stopped run resumes at the next piece):
  ledger   the bytes one decode step of the whole model moves at batch B (Qwen3.5-35B-A3B, bf16 weights, KV and conv
           state, float32 recurrent state): weights (dense, once per step), experts (those B tokens reach under
           uniform routing), recurrent state (read + write), conv state (read + write), KV at a context
           (bench.suites.model.floor's decode_step_bytes and cache_bytes_from_shapes on the model built on the meta
           device); the step's floor at the read / copy bandwidth measured on a working set of that size (at most
           LEDGER_MAX_BYTES: past the last-level cache the rate is the memory's);
  pooled   one layer's decode step (T = 1, mode "recurrent") on B sequences whose states are rows of a pool of 2B
           rows, scattered (state_indices: read and written in place), beside the floor of its state traffic
           (2 B Hv K V 4 bytes at the read / copy bandwidth measured on that working set): the state part of the
           ledger, measured;
  gather   the same step as servers without state_indices run it: index_select the rows, call, index_copy_ back;
  verify   speculative verify: T = 2..8 draft tokens per sequence in one call (output_intermediate_states, the pool
           read and left untouched) and commit_states of the accepted tokens (every sequence accepts all T: every
           row written), at one batch;
  steps    k = 1..8 decode steps in a row (pooled, in place) at that batch: what verify replaces;
  prefix   a prefill of one sequence (mode "chunk") with and without chunk_states_every = C (the prefix cache's
           states), against its length;
  model    bench/suites/serving/model_part.py's model_rows (speculative decoding and prefix-cached prefill through
           the model), per backend, where that module exists (left out with a note until then).

Rows: op "serving", phase (the part), backend, B, T, k, every (0: no chunk states), median_ms, p20_ms, p80_ms,
repeats, state_bytes (what the call must move of states: the floor's bytes), read_gbps, copy_gbps (measured on a
working set of state_bytes), floor_ms, x_floor; the ledger's rows *_bytes by part and context. The plan and its
estimated time are printed first (plan, describe); `sweep(quick, device, out, backends)` returns the rows and writes
the report's PNGs into out (report.plot).
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

import torch

import kernellab
import model
from bench import timing
from bench.ops import make
from bench.suites import pieces
from bench.suites.model.floor import cache_bytes_from_shapes, decode_step_bytes
from bench.suites.precision.run import QWEN35
from bench.sweep import trusted_inputs
from model.model import resolve_backends

OP = "gated_delta_rule"


DTYPE = torch.float32


LEDGER_MAX_BYTES = 2**30  # the largest working set the ledger's bandwidth is measured on


MODEL_PART = "bench.suites.serving.model_part"




@dataclass(frozen=True)
class Grid:
    """What one scale of the sweep runs: batches of pooled / gather decode, batches and contexts of the ledger, the
    verify batch, its draft lengths T and step counts k, prefix lengths and chunk-state intervals, seconds of timed
    calls per case."""

    batches: tuple[int, ...]
    ledger_batches: tuple[int, ...]
    contexts: tuple[int, ...]
    verify_batch: int
    drafts: tuple[int, ...]
    steps: tuple[int, ...]
    prefixes: tuple[int, ...]
    every: tuple[int, ...]
    budget_s: float


GRIDS = {True: Grid((1, 8, 64), (1, 64), (4096,), 4, (2, 4, 8), (1, 2, 4, 8), (256, 512, 1024), (64,), 0.05),
         False: Grid(tuple(2 ** i for i in range(9)), (1, 8, 64, 256), (4096, 32768), 8, tuple(range(2, 9)),
                     tuple(range(1, 9)), (512, 1024, 2048, 4096, 8192), (64, 512), 0.3)}


# Rough rates of a 2-core CPU, 1 thread per core, for the plan's estimate: state bytes moved per second by a decode
# step, chunked prefill FLOP/s, seconds per call besides (dispatch, checks), seconds to flush the caches.
COST = dict(state_gbps=2.0, prefill_gflops=15.0, call_s=2e-3, flush_s=0.01)


STATE_BYTES = QWEN35.Hv * QWEN35.K * QWEN35.V * DTYPE.itemsize  # one sequence's state in one layer


def lab_backends(device: str, keywords=()) -> list[str]:
    """The lab backends of the gated delta rule on device that declare every keyword of `keywords` (the reference,
    the yardstick, and the peers left out)."""
    registered = kernellab.registry.registered(OP)
    return [n for n in kernellab.backends(OP, device) if n != "reference" and not registered[n].peer
            and set(keywords) <= registered[n].serving]


# ------------------------------------------------------------------------------------------------------- inputs

def token_inputs(B: int, T: int, device: str, seed: int = 0) -> dict:
    """q, k, v, g, beta of B sequences of T tokens at the Qwen3.5 heads (bench.ops' maker: log-sigmoid gates,
    sigmoid beta), use_qk_l2norm=True; no initial_state, no output_final_state."""
    inputs = make(OP, B=B, T=T, Hk=QWEN35.Hk, Hv=QWEN35.Hv, K=QWEN35.K, V=QWEN35.V, dtype=DTYPE, device=device,
                  seed=seed)
    del inputs["initial_state"], inputs["output_final_state"]
    return inputs


def pool_of(rows: int, device: str, seed: int = 0) -> torch.Tensor:
    """A pool of states [rows, Hv, K, V] float32, drawn in float32 (a float64 draw of 256 rows is 1 GiB more)."""
    gen = torch.Generator().manual_seed(seed)
    return (0.1 * torch.randn(rows, QWEN35.Hv, QWEN35.K, QWEN35.V, generator=gen, dtype=DTYPE)).to(device)


def scattered(B: int, rows: int, device: str, seed: int = 0) -> torch.Tensor:
    """int32 [B]: B distinct rows of a pool of `rows`, in random order (a running batch's slots)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(rows, generator=gen)[:B].to(torch.int32).to(device)


# ------------------------------------------------------------------------------------------------------ ledger

@cache
def bandwidth(device: str, nbytes: int, budget_s: float) -> tuple[float, float]:
    """(read, copy) GB/s measured on a working set of nbytes (caches flushed before each call, as the rows are
    timed), once per size."""
    return (timing.read_gbps(device, nbytes, budget_s),
            timing.copy_gbps(device, budget_s, nbytes, flush_cache=True))


def floor_columns(state_bytes: int, median_ms: float, device: str, budget_s: float) -> dict:
    """The floor of moving state_bytes at the higher of the read and copy rates measured on that working set."""
    read, copy = bandwidth(device, state_bytes, budget_s)
    floor_ms = state_bytes / (max(read, copy) * 1e9) * 1e3
    return dict(state_bytes=state_bytes, read_gbps=read, copy_gbps=copy, floor_ms=floor_ms,
                x_floor=median_ms / floor_ms if median_ms == median_ms else math.nan)


def step_bytes(cfg: model.ModelConfig, per_sequence: dict, batch: int, context: int) -> dict:
    """Bytes one decode step of `batch` sequences at `context` tokens moves, by part: per_sequence is
    decode_step_bytes of one sequence; the experts B tokens reach under uniform routing, E (1 - (1 - k/E)^B) of
    them; recurrent and conv states split by cache_bytes_from_shapes' state_bytes (read and written)."""
    E, top_k = cfg.num_experts, cfg.num_experts_per_tok
    dtype_bytes = per_sequence["dtype_bytes"]
    conv = 2 * cache_bytes_from_shapes(cfg, batch, 0, dtype_bytes, state_bytes=0)
    recurrent = 2 * cache_bytes_from_shapes(cfg, batch, 0, dtype_bytes) - conv
    reached = E * (1 - (1 - top_k / E) ** batch)
    return dict(weights_bytes=per_sequence["weights"], experts_bytes=round(per_sequence["experts"] * reached / top_k),
                state_bytes=recurrent, conv_bytes=conv, kv_bytes=batch * per_sequence["kv"][context])


def ledger_rows(device: str, batches, contexts, budget_s: float) -> list[dict]:
    """Rows of phase "ledger" (module docstring): per batch and context, the step's bytes by part, its floor at the
    bandwidth measured on min(step bytes, LEDGER_MAX_BYTES), and the recurrent state's share."""
    cfg = model.ModelConfig()  # transformers' defaults: Qwen3.5-35B-A3B
    with torch.device("meta"):  # shapes only: 35B parameters are never allocated
        m = model.Qwen35Moe(cfg, resolve_backends("reference", "cpu")).to(torch.bfloat16)
    one = {context: decode_step_bytes(m, context) for context in contexts}
    per_sequence = dict(one[contexts[0]], dtype_bytes=2, kv={c: parts["kv"] for c, parts in one.items()})
    rows = []
    for B in batches:
        for context in contexts:
            parts = step_bytes(cfg, per_sequence, B, context)
            total = sum(parts.values())
            measured_on = min(total, LEDGER_MAX_BYTES)
            read, copy = bandwidth(device, measured_on, budget_s)
            rows.append(dict(op="serving", phase="ledger", backend="any", device=device, dtype="bfloat16",
                             shape=f"Qwen3.5-35B-A3B,phase=ledger,B={B},context={context}", B=B, context=context,
                             **parts, step_bytes=total, measured_on_bytes=measured_on, read_gbps=read, copy_gbps=copy,
                             floor_ms=total / (max(read, copy) * 1e9) * 1e3, state_share=parts["state_bytes"] / total,
                             linear_layers=sum(kind == "linear_attention" for kind in cfg.layer_types)))
    return rows


# ------------------------------------------------------------------------------------------------ timed parts

def _row(phase: str, backend: str, device: str, B: int, T: int = 1, k: int = 0, every: int = 0) -> dict:
    return dict(op="serving", phase=phase, backend=backend, device=device, dtype="float32", heads=QWEN35.key, B=B,
                T=T, k=k, every=every, shape=f"{QWEN35.key},phase={phase},B={B},T={T},k={k},every={every}")


def _timed(row: dict, backend: str, needs, run, device: str, budget_s: float, state_bytes: int) -> dict:
    """row with run()'s time and its floor, or why not: a backend that does not declare the serving keywords of
    `needs`, or one that refuses the call. run is called once, checked (kernellab.validate), then timed with the
    value checks off (bench.sweep.trusted_inputs)."""
    missing = sorted(set(needs) - kernellab.registry.registered(OP)[backend].serving)
    if missing:
        return dict(row, error=f"backend {backend!r} does not declare {', '.join(missing)}")
    try:
        run()
        with trusted_inputs():
            t = timing.time_call(run, device, budget_s)
    except (ValueError, kernellab.BackendUnavailable) as error:
        return dict(row, error=f"{type(error).__name__}: {error}"[:300])
    return dict(row, median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, repeats=t.repeats, threads=t.threads,
                **floor_columns(state_bytes, t.median_ms, device, budget_s))


def decode_calls(call, inputs: dict, pool: torch.Tensor, index: torch.Tensor):
    """(pooled, gathered): one decode step of the sequences of inputs from rows `index` of pool, written back to
    them, with state_indices (in place) and by gather / scatter (index_select, the call, index_copy_)."""
    wide = index.long()

    def pooled():
        call(**inputs, initial_state=pool, state_indices=index, mode="recurrent")

    def gathered():
        _, final = call(**inputs, initial_state=pool.index_select(0, wide), output_final_state=True, mode="recurrent")
        pool.index_copy_(0, wide, final)

    return pooled, gathered


def verify_call(call, drafted: dict, pool: torch.Tensor, index: torch.Tensor, accepted: torch.Tensor):
    """A verify of the T tokens per sequence of drafted (output_intermediate_states, the pool read only), then
    commit_states of `accepted` tokens of each: what a speculative step does to the states."""
    B, T = drafted["q"].shape[:2]
    cu = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=pool.device)

    def verify():
        _, _, trace = call(**drafted, initial_state=pool, state_indices=index, output_intermediate_states=True,
                           mode="recurrent")
        kernellab.commit_states(pool, trace.states, index, cu, accepted)

    return verify


def steps_call(call, singles: list[dict], pool: torch.Tensor, index: torch.Tensor, k: int):
    """k decode steps in a row (pooled, in place), step t on the one-token inputs singles[t]."""
    def decode():
        for t in range(k):
            call(**singles[t], initial_state=pool, state_indices=index, mode="recurrent")

    return decode


def decode_rows(device: str, backends, B: int, budget_s: float) -> list[dict]:
    """Rows of phases "pooled" and "gather" at batch B: one layer's decode step on B scattered rows of a pool of 2B
    (module docstring), the same state traffic 2 B STATE_BYTES as their floor."""
    inputs = token_inputs(B, 1, device, seed=B)
    pool = pool_of(2 * B, device, seed=B)
    index = scattered(B, 2 * B, device, seed=B)
    rows = []
    for backend in backends:
        pooled, gathered = decode_calls(kernellab.get(OP, backend), inputs, pool, index)
        for phase, run, needs in (("pooled", pooled, ("state_indices",)), ("gather", gathered, ())):
            rows.append(_timed(_row(phase, backend, device, B), backend, needs, run, device, budget_s,
                               2 * B * STATE_BYTES))
    return rows


def verify_rows(device: str, backends, B: int, drafts, steps, budget_s: float) -> list[dict]:
    """Rows of phase "verify" (T draft tokens in one call keeping the states, the pool untouched, then commit_states
    of all T) and "steps" (k decode steps in a row, pooled) at batch B. State traffic: verify reads B states and
    writes B T, commit reads and writes B; k steps read and write B states k times."""
    longest = max((*drafts, *steps))
    tokens = token_inputs(B, longest, device, seed=1)
    pool = pool_of(2 * B, device, seed=1)
    index = scattered(B, 2 * B, device, seed=1)
    window = lambda start, T: {key: value[:, start:start + T].contiguous() if key in ("q", "k", "v", "g", "beta")  # noqa: E731
                               else value for key, value in tokens.items()}
    rows = []
    for backend in backends:
        call = kernellab.get(OP, backend)
        for T in drafts:
            verify = verify_call(call, window(0, T), pool, index, torch.full((B,), T, dtype=torch.int32, device=device))
            rows.append(_timed(_row("verify", backend, device, B, T=T, k=T), backend,
                               ("state_indices", "output_intermediate_states"), verify, device, budget_s,
                               (B + B * T + 2 * B) * STATE_BYTES))
        singles = [window(t, 1) for t in range(longest)]
        for k in steps:
            rows.append(_timed(_row("steps", backend, device, B, k=k), backend, ("state_indices",),
                               steps_call(call, singles, pool, index, k), device,
                               budget_s, 2 * k * B * STATE_BYTES))
    return rows


def prefix_rows(device: str, backends, T: int, every, budget_s: float) -> list[dict]:
    """Rows of phase "prefix": a chunked prefill of one sequence of T tokens keeping its final state, without
    (every = 0) and with chunk_states_every = C for C in every (T // C states kept; their bytes the floor's beside
    the final state's)."""
    inputs = token_inputs(1, T, device, seed=T)
    rows = []
    for backend in backends:
        call = kernellab.get(OP, backend)
        for C in (0, *every):
            kept = {"chunk_states_every": C} if C else {}
            run = partial(call, **inputs, output_final_state=True, mode="chunk", **kept)
            rows.append(_timed(_row("prefix", backend, device, 1, T=T, every=C), backend,
                               ("chunk_states_every",) if C else (), run, device, budget_s,
                               (1 + (T // C if C else 0)) * STATE_BYTES))
    return rows


def model_rows(quick: bool, device: str, backend: str) -> list[dict]:
    """The model part's rows of one backend (bench/suites/serving/model_part.py), imported here: the piece is planned
    only where that module exists."""
    from bench.suites.serving.model_part import model_rows as rows_of

    return rows_of(quick, device, backend)


# -------------------------------------------------------------------------------------------------------- plan

def _case_s(call_s: float, budget_s: float) -> float:
    """Seconds bench.timing.time_cpu spends on one case of calls of call_s: a check call and a warm-up, then calls
    (each after a cache flush) until the budget is spent, at least 3 unless that passes 5 budgets."""
    each = call_s + COST["flush_s"]
    return 2 * call_s + max(budget_s, min(3 * each, max(5 * budget_s, each)))


def _bandwidth_s(nbytes: int, budget_s: float) -> float:
    """Seconds to measure read and copy bandwidth on nbytes (allocation, a fill, timed calls)."""
    return 2 * _case_s(nbytes / (COST["state_gbps"] * 1e9), budget_s) + nbytes / 1e9


def plan(quick: bool, device: str, backends) -> list[tuple[str, str, float]]:
    """The sweep's pieces in order, each (label, what it runs, estimated seconds) from COST's rough rates."""
    grid = GRIDS[quick]
    budget = grid.budget_s
    step_s = lambda B, k=1: COST["call_s"] * k + 2 * k * B * STATE_BYTES / (COST["state_gbps"] * 1e9)  # noqa: E731
    n = len(backends)
    jobs = [("ledger", f"bytes per decode step at B = {_list(grid.ledger_batches)}, contexts {_list(grid.contexts)}",
             5 + _bandwidth_s(LEDGER_MAX_BYTES, budget))]
    for B in grid.batches:
        jobs.append((f"decode B={B}", "pooled and gather / scatter decode",
                     n * 2 * _case_s(step_s(B), budget) + _bandwidth_s(2 * B * STATE_BYTES, budget)
                     + 2 * B * STATE_BYTES / 1e8))  # the pool's draw
    B = grid.verify_batch
    jobs.append((f"verify B={B}", f"verify T = {_list(grid.drafts)} and commit; k = {_list(grid.steps)} decode steps",
                 n * (sum(_case_s(step_s(B, T) * (T + 3) / (2 * T), budget) for T in grid.drafts)
                      + sum(_case_s(step_s(B, k), budget) for k in grid.steps))
                 + sum(_bandwidth_s(bytes_ * B * STATE_BYTES, budget) for bytes_ in
                       {*(T + 3 for T in grid.drafts), *(2 * k for k in grid.steps)})))
    for T in grid.prefixes:
        flops = T * QWEN35.Hv * (6 * QWEN35.K * QWEN35.V + 64 * 7 * QWEN35.K)
        jobs.append((f"prefix T={T}", f"prefill with chunk states every {_list(grid.every)} and without",
                     n * (1 + len(grid.every)) * _case_s(flops / (COST["prefill_gflops"] * 1e9), budget)))
    if importlib.util.find_spec(MODEL_PART) is not None:
        jobs += [(f"model {backend}", "model_part.model_rows: speculative decoding, prefix-cached prefill", 0.0)
                 for backend in backends]
    return jobs


def _list(values) -> str:
    return ", ".join(str(v) for v in values)


def describe(jobs, device: str, quick: bool, backends) -> str:
    """The plan as printed before anything runs: the total, then a line per piece with its estimate."""
    lines = [f"serving sweep on {device}, {torch.get_num_threads()} thread(s){', quick' if quick else ''}, backends "
             f"{', '.join(backends) or 'none'}: {len(jobs)} pieces, about {sum(s for *_, s in jobs) / 60:.1f} min "
             "(estimated from rough 2-core CPU rates; a loaded machine takes longer)"]
    lines += [f"  {label:>14}: {what}" + (f" (~{seconds:.0f} s)" if seconds else " (its own time)")
              for label, what, seconds in jobs]
    if importlib.util.find_spec(MODEL_PART) is None:
        lines.append(f"  note: {MODEL_PART} does not exist yet: the model part is left out")
    return "\n".join(lines)


def sweep(quick: bool = False, device: str = "cpu", out: str | Path = "reports/cpu", backends=None, on_rows=None,
          done=frozenset()) -> list[dict]:
    """The rows of every part (module docstring), in pieces (bench.suites.pieces: on_rows gets each piece's rows
    as it finishes, the labels in done are skipped); prints the plan first; writes the plots into out."""
    from bench.suites.serving.report import plot  # report reads this module's constants: imported here

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    backends = list(backends or lab_backends(device, ("state_indices",)))  # a part a backend lacks: a row saying so
    grid = GRIDS[quick]
    budget = grid.budget_s
    jobs = plan(quick, device, backends)
    print(describe(jobs, device, quick, backends), flush=True)
    makers = {"ledger": partial(ledger_rows, device, grid.ledger_batches, grid.contexts, budget)}
    makers |= {f"decode B={B}": partial(decode_rows, device, backends, B, budget) for B in grid.batches}
    makers[f"verify B={grid.verify_batch}"] = partial(verify_rows, device, backends, grid.verify_batch, grid.drafts,
                                                      grid.steps, budget)
    makers |= {f"prefix T={T}": partial(prefix_rows, device, backends, T, grid.every, budget) for T in grid.prefixes}
    makers |= {f"model {backend}": partial(model_rows, quick, device, backend) for backend in backends}
    rows = pieces([(label, makers[label]) for label, *_ in jobs], on_rows, done)
    if not done:  # resumed: these rows are part of the run's; bench.report plots them all from its CSV
        plot(rows, out)
    return rows
