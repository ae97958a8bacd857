"""The sweep CLI: every backend of an op over its shape axes, checked, timed and written to a CSV.

    python -m bench.sweep --op gated_delta_rule [--backend torch ...] [--device cpu|cuda] [--dtype float32 ...]
                          [--quick] [--preset Qwen3.5-35B-A3B] [--shape KEY ...] [--out DIR] [--resume]
                          [--threads N] [--list]
    python -m bench.sweep --op all --quick          # every registry op, their cases interleaved
    python -m bench.sweep --op gated_delta_rule --pass forward backward forward+backward   # training passes

What the sweep knows of an op is its declaration in bench/ops/<family>.py. For each shape and dtype, the inputs come
from the op's input maker (OpSpec.maker), seeded by the shape. Each backend of the op that runs on the device
(kernellab.backends: new backends join by registering) is first checked against a float64 yardstick (the
reference; where its loops are too slow, the reference on the first tokens when the op declares it, else the
torch backend on float64 inputs: the row says which), then timed (bench.timing). With --pass backward or
forward+backward (the passes of bench.ops.PASSES, a column of the CSV and of its key), each backend that has a
backward is checked on the gradients of every differentiable input (from fixed output gradients, exact in every
dtype) against the same yardstick's autograd, then its backward alone (on a graph built once) or its forward and
backward together is timed; forward rows are unchanged by the passes. A backend that fails the check,
or raises, gets its error in its row and no speedup, and the sweep goes on. Bad arguments (an unknown op,
backend or shape, a backend that cannot run on the device or dtype, an empty selection) are refused before
anything runs, and nothing is written.

Before the first timed call the sweep checks that it can write its folder (and that a CSV there is whole),
measures the ceilings and prints its plan: the rows, the backends and a lower bound of the time it will take
(sweep.plan: the roofline floor of each row at those ceilings, the timing budget, the yardstick's floor).

Results go to DIR/results.csv (--out DIR; default a run folder of its own, runs/<op>-<host>-<YYYYmmdd-HHMMSS>/,
which git ignores: the published reports/ change only by bench.report --publish), one long-format row per (op,
backend, shape, dtype, device, pass), each written as soon as it is measured (bench.results: atomic, locked): a
rerun replaces its own rows and keeps every other, and a sweep stopped part way (Ctrl-C: exit 130) keeps the rows
it finished; --resume runs only the rows not yet in the folder's CSV (by that key; without --out, in the newest
run folder of the same ops and host). The ceilings measured at the start of the run are stored in each row and
in DIR/ceilings.json. Plots and README.md are then regenerated from the CSV (bench.report).
"""
from __future__ import annotations

import datetime
import functools
import itertools
import json
import math
import os
import subprocess
import sys
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import torch

import kernellab
from bench import cli, results, timing
from bench.check import outputs, parity, to_float64
from bench.ops import MODELS, OPS, PASSES, RENAMED, Case

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}



@functools.cache
def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                               cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def seed_of(op: str, shape: str) -> int:
    """The inputs' seed: fixed per (op, shape), so every backend and every rerun sees the same numbers."""
    return zlib.crc32(f"{op}|{shape}".encode()) & 0x7FFFFFFF


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------- checking

@contextmanager
def one_thread():
    """Untimed float64 work runs on one thread: on a loaded machine, torch's threads wait on each other
    (seen: the reference's token loop 15x slower on 2 threads than on 1 with 8 processes on 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def yardstick(case: Case, inputs: dict, extra: dict, max_check_gb: float, quick: bool = False):
    """(label, float64 output, how to cut a backend's output to the yardstick's rows, seconds of the reference
    on the whole case or None). The reference's own time is its row's time (its one call is the check)."""
    spec = OPS[case.op]
    reference = kernellab.get(case.op, "reference")
    if spec.affordable(case.shape, quick):
        start = time.perf_counter()
        ref = reference(**to_float64(inputs), **extra)
        timing.synchronize(inputs_device(inputs))
        return "reference", ref, None, time.perf_counter() - start
    if spec.check_head:
        names, tokens = spec.check_head
        head = {k: (v[:tokens] if k in names else v) for k, v in inputs.items()}
        return (f"reference (first {tokens} tokens)", reference(**to_float64(head), **extra),
                lambda out: out[:tokens], None)
    if "torch" in kernellab.backends(case.op, inputs_device(inputs)) and \
            2 * spec.gigabytes(case.shape, 8) <= max_check_gb:
        return "torch-f64", kernellab.get(case.op, "torch")(**to_float64(inputs), **extra), None, None
    return "none (too large for a float64 yardstick)", None, None, None


def differentiable(op: str, inputs: dict) -> list[str]:
    """The names of op's differentiable inputs (kernellab.autograd.DIFFERENTIABLE) given in inputs."""
    from kernellab.autograd import DIFFERENTIABLE

    return [name for name in DIFFERENTIABLE[op] if isinstance(inputs.get(name), torch.Tensor)]


def _float_outputs(out) -> list[torch.Tensor]:
    """The floating-point tensors of a result (integer outputs carry no gradient)."""
    return [t for t in outputs(out).values() if t.is_floating_point()]


def output_gradients(outputs, seed: int) -> list[torch.Tensor]:
    """Fixed gradients of the outputs: multiples of 1/8 in [-4, 4], exact in every float dtype, so that a backend
    in bfloat16 and its float64 yardstick start from the same numbers."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(-32, 33, tuple(t.shape), generator=gen) / 8).to(t.dtype).to(t.device) for t in outputs]


def grad_call(op: str, fn, inputs: dict, extra: dict, seed: int, which: str):
    """A call of backend fn computing the gradients of op's differentiable inputs: `which` "backward" (the forward
    runs once here, the call is its backward alone, on the retained graph) or "forward+backward" (both in each
    call). Returns the call, which returns the gradients (a tuple, in differentiable()'s order)."""
    names = differentiable(op, inputs)
    leaves = inputs | {name: inputs[name].detach().clone().requires_grad_(True) for name in names}
    wrt = [leaves[name] for name in names]
    outputs = _float_outputs(fn(**leaves, **extra))
    grads = output_gradients(outputs, seed)
    if which == "backward":
        return lambda: torch.autograd.grad(outputs, wrt, grads, retain_graph=True, allow_unused=True)
    return lambda: torch.autograd.grad(_float_outputs(fn(**leaves, **extra)), wrt, grads, allow_unused=True)


def gradient_yardstick(case: Case, inputs: dict, extra: dict, max_check_gb: float, seed: int, quick: bool = False):
    """(label, float64 gradients or None): the reference's autograd where its loops are affordable, else the torch
    backend's backward on float64 inputs where it fits in memory."""
    spec = OPS[case.op]
    device = inputs_device(inputs)
    if (spec.backward_affordable or spec.affordable)(case.shape, quick):
        name = "reference"
    elif kernellab.registry.registered(case.op)["torch"].backward is not None and \
            "torch" in kernellab.backends(case.op, device) and 4 * spec.gigabytes(case.shape, 8) <= max_check_gb:
        name = "torch-f64"
    else:
        return "none (too large for a float64 yardstick)", None
    backend = "reference" if name == "reference" else "torch"
    return name, grad_call(case.op, kernellab.get(case.op, backend), to_float64(inputs), extra, seed, "backward")()


def run_gradients(case, backend, inputs, extra, check, dtype, device, budget_s, which, seed) -> dict:
    """Check one backend's gradients on one case, then time its pass `which`. Returns the measured columns."""
    label, ref = check
    fn = kernellab.get(case.op, backend)
    call = grad_call(case.op, fn, inputs, extra, seed, which)
    found = dict(checked_against=label, rel_err=math.nan)
    got = call()  # also the warm-up
    if ref is not None:
        found["rel_err"], failure = parity(case.op, tuple(got), tuple(ref), dtype, device)
        if failure:
            found["error"] = f"gradient parity vs {label}: {failure}"
            return found
    del got
    with trusted_inputs():
        measured = timing.time_call(call, device, budget_s, warmup=0 if device == "cpu" else 2)
    found.update(median_ms=measured.median_ms, p20_ms=measured.p20_ms, p80_ms=measured.p80_ms,
                 repeats=measured.repeats, threads=measured.threads, cuda_graph=False)
    return found


def pass_cost(spec, inputs: dict, which: str) -> tuple[int, int]:
    """(FLOPs, bytes) of one call of pass `which` of spec's op (its OpSpec's cost models: forward, backward, their sum)."""
    if which == "forward":
        return spec.cost(inputs)
    backward = spec.backward_cost(inputs)
    if which == "backward":
        return backward
    forward = spec.cost(inputs)
    return forward[0] + backward[0], forward[1] + backward[1]


def inputs_device(inputs: dict) -> torch.device:
    return next(v.device for v in inputs.values() if isinstance(v, torch.Tensor))


# ------------------------------------------------------------------------------------------------ rows

def metrics(flops: float, nbytes: float, median_ms: float, peak_tflops: float, peak_gbps: float) -> dict:
    """Rates and the roofline: floor = max(flops / peak, bytes / bandwidth); fraction = floor / time."""
    seconds = median_ms * 1e-3
    compute_s, memory_s = flops / (peak_tflops * 1e12), nbytes / (peak_gbps * 1e9)
    floor_s = max(compute_s, memory_s)
    return dict(tflops=flops / seconds / 1e12, gbps=nbytes / seconds / 1e9, floor_ms=floor_s * 1e3,
                bound="compute" if compute_s >= memory_s else "memory", roofline_fraction=floor_s / seconds)


def base_row(op: str, backend: str, device: str, dtype: torch.dtype, ceil: dict, nbytes: float | None = None) -> dict:
    """The columns every row has, whoever times it (a suite of bench/suites/ fills the rest the same way). peak_gbps:
    the bandwidth ceiling of a working set of the row's nbytes (bench.timing.bandwidth_at; the largest one's without)."""
    return dict(op=op, backend=backend, device=device, device_name=ceil["device_name"], dtype=dtype_name(dtype),
                peak_tflops=ceil["matmul_tflops"].get(dtype_name(dtype), math.nan),
                peak_gbps=timing.bandwidth_at(ceil, nbytes),
                threads=torch.get_num_threads(), torch_version=torch.__version__, commit=commit(),
                timestamp=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), error="")


@contextmanager
def trusted_inputs():
    """While timing: skip the host-side value checks of kernellab.validate (a sync on a GPU); the check
    before timing ran them on the same inputs."""
    before = os.environ.get("KERNELLAB_TRUST_INPUTS")
    os.environ["KERNELLAB_TRUST_INPUTS"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["KERNELLAB_TRUST_INPUTS"]
        else:
            os.environ["KERNELLAB_TRUST_INPUTS"] = before


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def run_backend(case, backend, inputs, extra, check, dtype, device, budget_s, cuda_graph) -> dict:
    """Check one backend on one case, then time it. Returns the measured columns (or an error)."""
    label, ref, cut, _ = check
    fn = kernellab.get(case.op, backend)
    out = fn(**inputs, **extra)  # also the warm-up: compilation and autotuning happen here
    found = dict(checked_against=label, rel_err=math.nan)
    if ref is not None:
        found["rel_err"], failure = parity(case.op, cut(out) if cut else out, ref, dtype, device)
        if failure:
            found["error"] = f"parity vs {label}: {failure}"
            return found
    del out
    with trusted_inputs():
        call = lambda: fn(**inputs, **extra)  # noqa: E731
        measured = timing.time_call(call, device, budget_s, warmup=0 if device == "cpu" else 2)  # warm: checked
        graph = False
        if device == "cuda" and cuda_graph != "off" and (cuda_graph == "on" or measured.median_ms < 0.05):
            try:
                measured, graph = timing.time_cuda(call, budget_s, cuda_graph=True, device=device), True
            except RuntimeError:  # a backend that syncs with the host cannot be captured: keep the eager time
                pass
    found.update(median_ms=measured.median_ms, p20_ms=measured.p20_ms, p80_ms=measured.p80_ms,
                 repeats=measured.repeats, threads=measured.threads, cuda_graph=graph)
    return found


def _reference_row(seconds: float) -> dict:
    """The reference's row: the time of its one float64 call on the case (on one thread), which was the check."""
    ms = seconds * 1e3
    return dict(median_ms=ms, p20_ms=ms, p80_ms=ms, repeats=1, threads=1, cuda_graph=False, rel_err=0.0,
                checked_against="(is the yardstick: one float64 call, 1 thread)")


def sweep_backends(op: str, device: str, wanted: list[str] | None) -> list[str]:
    """Backends of op to sweep on device: those asked for (an unavailable one gets a row saying why), else
    every one that runs there, except on CPU those that reach it only through the Triton interpreter or the
    numba.cuda simulator (their times mean nothing)."""
    if wanted is not None:
        return wanted
    registered = kernellab.registry.registered(op)
    return [name for name in kernellab.backends(op, device) if device != "cpu" or "cpu" in registered[name].places]


def interleaved(plans: list[list]) -> list:
    """Round-robin over several ops' case lists: their T sweeps come first and in the same order, so attention
    and the linear ops are timed at each sequence length within moments of each other (the load of a shared
    machine drifts over minutes)."""
    return [item for group in itertools.zip_longest(*plans) for item in group if item is not None]


def planned(op: str, device: str, quick: bool, preset: str | None, shapes=None) -> list[Case]:
    """op's cases on device (bench.ops), only those whose shape string is in `shapes` when given."""
    found = OPS[op].cases(device, quick, preset)
    return [case for case in found if shapes is None or case.key in shapes]


def sweep(ops, device: str = "cpu", dtypes=(torch.float32,), quick: bool = False, wanted=None,
          preset: str | None = None, budget_s: float | None = None, cuda_graph: str = "auto",
          max_check_gb: float = 8.0, ceil: dict | None = None, progress: bool = True, shapes=None,
          passes=("forward",), done=frozenset(), on_rows=None) -> list[dict]:
    """Check and time every backend of each registry op of `ops` (one name or several, whose cases are then
    interleaved) over its cases; one row dict per (case, dtype, backend, pass). wanted: backend names for every
    op, or {op: names}; shapes: only these shape strings; passes: of PASSES (the backward ones for the backends
    that have a backward, of the ops that declare a backward cost); done: row keys (results.KEY tuples) not to
    run again (--resume); on_rows: called with each row as it finishes (written at once: a killed sweep keeps
    it)."""
    from tqdm import tqdm

    ops = [ops] if isinstance(ops, str) else list(ops)
    ceil = ceil or timing.ceilings(device, dtypes)
    budget_s = budget_s if budget_s is not None else (0.1 if quick else 0.5)
    names = {op: sweep_backends(op, device, wanted.get(op) if isinstance(wanted, dict) else wanted) for op in ops}
    plan = interleaved([planned(op, device, quick, preset, shapes) for op in ops])
    rows = []

    def finished(row):
        rows.append(row)
        if on_rows is not None:
            on_rows([row])

    bar = tqdm(total=sum(len(names[case.op]) for case in plan) * len(dtypes) * len(passes),
               desc=f"{'+'.join(ops)} on {device}", disable=not progress, unit="run")
    for case in plan:
        spec = OPS[case.op]
        registered = kernellab.registry.registered(case.op)
        for dtype in dtypes:
            shape = case.key
            todo = {which: [name for name in names[case.op]
                            if row_key(case.op, name, shape, dtype, device, which) not in done] for which in passes}
            if not any(todo.values()):  # resumed: every row of this case and dtype is in the CSV
                bar.update(len(names[case.op]) * len(passes))
                continue
            inputs = spec.inputs(case, dtype, device, seed_of(case.op, shape))
            extra = spec.call(case.shape)
            if spec.backward_cost is not None and set(passes) - {"forward"}:
                for row in gradient_rows(case, names[case.op], inputs, extra, dtype, device, ceil, budget_s,
                                         max_check_gb, quick, [which for which in passes if which != "forward"], bar,
                                         todo):
                    finished(row)
            if "forward" not in passes:
                continue
            if not todo["forward"]:
                bar.update(len(names[case.op]))
                continue
            flops, nbytes = spec.cost(inputs | extra)
            try:
                with one_thread():
                    check = yardstick(case, inputs, extra, max_check_gb, quick)
            except Exception as exc:  # noqa: BLE001 - a broken yardstick is recorded, the backends still run
                check = (f"none (yardstick failed: {_error_text(exc)})", None, None, None)
            for name in names[case.op]:
                bar.set_postfix_str(f"{case.op} {name} {shape}", refresh=False)
                bar.update()
                if name in registered and dtype not in registered[name].dtypes or name not in todo["forward"]:
                    continue
                row = base_row(case.op, name, device, dtype, ceil, nbytes) | dict(
                    shape=shape, preset=case.preset, flops=flops, bytes=nbytes, **{"pass": "forward"},
                    peer=bool(name in registered and registered[name].peer), **case.shape)
                if name == "reference":
                    if check[3] is None:
                        continue  # its loops would take minutes here: no reference row
                    row.update(_reference_row(check[3]))
                    row.update(metrics(flops, nbytes, row["median_ms"], row["peak_tflops"], row["peak_gbps"]))
                    finished(row)
                    continue
                finished(measured(row, functools.partial(run_backend, case, name, inputs, extra, check, dtype,
                                                         device, budget_s, cuda_graph), flops, nbytes, device))
            del inputs, check
    bar.close()
    return rows


def row_key(op: str, backend: str, shape: str, dtype: torch.dtype, device: str, which: str) -> tuple[str, ...]:
    """The results.KEY tuple of a row (as results.keys reads it from the CSV): what --resume skips."""
    return op, backend, shape, dtype_name(dtype), device, which


PASS_WORK = {"forward": 1, "backward": 2, "forward+backward": 3}  # in forwards: a backward costs about two


def plan(ops, device: str, dtypes, quick: bool, wanted, preset, budget_s: float | None, ceil: dict, shapes=None,
         passes=("forward",), done=frozenset()) -> dict:
    """What sweep() with these arguments will run, and a lower bound of its time from the cost model and the
    ceilings: {"rows", "backends" {op: names}, "cases", "seconds"}. Per row max(budget, MIN_REPEATS x floor) +
    2 x floor (the warm-up and the check), floor = max(flops / peak, bytes / bandwidth); per case and dtype the
    float64 yardstick's floor (at half the float32 rate), all scaled by PASS_WORK. Rows in `done` are left out."""
    ops = [ops] if isinstance(ops, str) else list(ops)
    budget_s = budget_s if budget_s is not None else (0.1 if quick else 0.5)
    repeats = 10 if torch.device(device).type == "cuda" else 3  # the timers' least number of timed calls
    names = {op: sweep_backends(op, device, wanted.get(op) if isinstance(wanted, dict) else wanted) for op in ops}
    bandwidth = ceil["copy_gbps"] * 1e9
    rows, seconds, cases = 0, 0.0, 0
    for case in interleaved([planned(op, device, quick, preset, shapes) for op in ops]):
        spec = OPS[case.op]
        registered = kernellab.registry.registered(case.op)
        for dtype in dtypes:
            compute = ceil["matmul_tflops"].get(dtype_name(dtype), math.nan) * 1e12
            flops, nbytes = _rough_cost(case, dtype)
            for which in passes:
                if which != "forward" and spec.backward_cost is None:
                    continue
                runs = [name for name in names[case.op]
                        if row_key(case.op, name, case.key, dtype, device, which) not in done
                        and (name not in registered or dtype in registered[name].dtypes)
                        and (which == "forward" and (name != "reference" or spec.affordable(case.shape, quick))
                             or which != "forward" and name != "reference" and name in registered
                             and registered[name].backward is not None)]
                if not runs:
                    continue
                cases += 1
                work = PASS_WORK[which]
                floor = work * max(flops / compute if compute > 0 else 0.0, nbytes / bandwidth)
                yard = work * max(flops / (compute / 2) if compute > 0 else 0.0,
                                  nbytes * 8 / dtype.itemsize / bandwidth)
                rows += len(runs)
                seconds += yard + sum(max(budget_s, repeats * floor) + 2 * floor
                                      for name in runs if name != "reference")
    return {"rows": rows, "backends": names, "cases": cases, "seconds": seconds}


def _rough_cost(case: Case, dtype) -> tuple[float, float]:
    """(FLOPs, bytes) of one forward call of case: the cost model on the inputs where they are small (made on the
    CPU), else the inputs' size alone (spec.gigabytes)."""
    spec = OPS[case.op]
    gigabytes = spec.gigabytes(case.shape, dtype.itemsize)
    if spec.cost is not None and gigabytes <= 0.25:
        try:
            inputs = spec.inputs(case, dtype, "cpu", seed_of(case.op, case.key))
            return spec.cost(inputs | spec.call(case.shape))
        except Exception:  # noqa: BLE001 - an estimate: the size below will do
            pass
    return 0.0, gigabytes * 2**30


def plan_text(found: dict, device: str, dtypes, passes, budget_s: float | None, quick: bool) -> str:
    """The plan printed before the first timed call."""
    backends = "; ".join(f"{op}: {', '.join(names)}" for op, names in found["backends"].items())
    budget = budget_s if budget_s is not None else (0.1 if quick else 0.5)
    return (f"plan: {found['rows']} rows on {device} ({found['cases']} case x dtype x pass; "
            f"{', '.join(map(dtype_name, dtypes))}; {', '.join(passes)}); backends {backends}; "
            f"estimated {_duration(found['seconds'])} at least (per row max(budget {budget:g} s, the timer's "
            f"repeats x the roofline floor at the ceilings just measured), plus the float64 yardstick's floor)")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def measured(row: dict, measure, flops, nbytes, device) -> dict:
    """row with measure()'s fields and their metrics, or with the error it raised: BackendUnavailable, OOM, a
    crash are recorded in the row and the sweep goes on."""
    try:
        row.update(measure())
    except Exception as exc:  # noqa: BLE001 - in the row, go on
        row["error"] = _error_text(exc)
        if device == "cuda":
            torch.cuda.empty_cache()
    if not row.get("error"):
        row.update(metrics(flops, nbytes, row["median_ms"], row["peak_tflops"], row["peak_gbps"]))
    return row


def gradient_rows(case, names, inputs, extra, dtype, device, ceil, budget_s, max_check_gb, quick, passes, bar,
                  todo=None):
    """The rows of the backward passes of one case and dtype, one at a time (a generator): each backend of `names`
    that has a backward (the reference is the yardstick, not timed) checked on its gradients against the float64
    yardstick's, then timed. todo: {pass: backend names still to run} (default: all)."""
    spec = OPS[case.op]
    registered = kernellab.registry.registered(case.op)
    seed = seed_of(case.op, case.key)
    todo = todo or {which: names for which in passes}
    runs = [name for name in names if name != "reference" and name in registered
            and dtype in registered[name].dtypes and registered[name].backward is not None]
    bar.update(len(names) * len(passes) - len(runs) * len(passes))
    if not any(name in todo[which] for which in passes for name in runs):
        bar.update(len(runs) * len(passes))
        return
    try:
        with one_thread():
            check = gradient_yardstick(case, inputs, extra, max_check_gb, seed, quick)
    except Exception as exc:  # noqa: BLE001 - a broken yardstick is recorded, the backends still run
        check = (f"none (yardstick failed: {_error_text(exc)})", None)
    for which in passes:
        flops, nbytes = pass_cost(spec, inputs | extra, which)
        for name in runs:
            bar.set_postfix_str(f"{case.op} {name} {which} {case.key}", refresh=False)
            bar.update()
            if name not in todo[which]:
                continue
            row = base_row(case.op, name, device, dtype, ceil, nbytes) | dict(
                shape=case.key, preset=case.preset, flops=flops, bytes=nbytes, peer=registered[name].peer,
                **{"pass": which}, **case.shape)
            yield measured(row, functools.partial(run_gradients, case, name, inputs, extra, check, dtype, device,
                                                  budget_s, which, seed), flops, nbytes, device)


# ------------------------------------------------------------------------------------------------- CSV

def save_ceilings(out: Path, ceil: dict) -> None:
    """Append this run's ceilings to out/ceilings.json (a list, newest last)."""
    path = out / "ceilings.json"
    with results.locked(path):  # two sweeps into one folder: both runs kept, the file never torn
        runs = json.loads(path.read_text()) if path.exists() else []
        runs.append(ceil | {"timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                            "commit": commit(), "torch_version": torch.__version__})
        results.write_atomic(path, json.dumps(runs, indent=1) + "\n")


# ------------------------------------------------------------------------------------------------- CLI

def backends_of(ops: list[str], device: str, dtypes, wanted: list[str] | None, refuse) -> dict | None:
    """{registry op: backend names} of the --backend list on `device`: each name must run there for at least one
    of the ops (refuse(message) otherwise, with what would have been valid) and take one of the dtypes; a name is
    swept for the ops where it runs. None (every backend that runs there) without --backend."""
    if not wanted:
        return None
    chosen = {op: [] for op in ops}
    for name in dict.fromkeys(wanted):
        problems = {op: cli.backend_problem(op, name, device) for op in ops}
        runs = [op for op in ops if problems[op] is None]
        if not runs:
            refuse(f"--backend {name}: " + "; ".join(problems.values()))
        takes = [op for op in runs if set(dtypes) & set(kernellab.registry.registered(op)[name].dtypes)]
        if not takes:
            refuse(f"--backend {name}: {cli.backend_problem(runs[0], name, device, dtypes[0])}")
        for op in takes:
            chosen[op].append(name)
    return chosen


def list_everything() -> str:
    lines = ["ops: backends registered [runs here on cpu / cuda]"]
    for name, spec in OPS.items():
        if not spec.registry:
            lines.append(f"  {name}: a sweep of its own ({spec.sweep.__name__}; backends of {', '.join(spec.backend_ops)})")
            continue
        here = {d: set(kernellab.backends(name, d)) for d in ("cpu", "cuda")}
        described = []
        for backend, b in kernellab.registry.registered(name).items():
            where = "/".join(d for d in ("cpu", "cuda") if backend in here[d]) or "not here"
            described.append(f"{backend}{' (peer)' if b.peer else ''} [{where}]")
        lines.append(f"  {name} ({', '.join(spec.axes)}): {', '.join(described)}")
    lines.append("  all: every op above but " + ", ".join(n for n, s in OPS.items() if not s.registry))
    lines.append("presets (ANCHORS.md shapes): " + ", ".join(MODELS))
    lines.append("dtypes: " + ", ".join(DTYPES))
    return "\n".join(lines)


def set_threads(threads: int) -> None:
    """Threads of torch and of numba's parallel loops (on a shared machine, 1 thread gives steady medians:
    with 2 threads and 8 busy processes on 2 cores, torch calls were seen to stall 100x at its barriers)."""
    torch.set_num_threads(threads)
    import importlib.util

    if importlib.util.find_spec("numba") is not None:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m bench.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", nargs="+", choices=[*OPS, "all", *RENAMED], metavar="OP",
                        help=f"one op, or several whose cases are interleaved (e.g. the attention ops), or all: "
                             f"{', '.join(OPS)}")
    parser.add_argument("--backend", nargs="+", help="only these backends (default: every one that runs here)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--quick", action="store_true", help="a small CPU-sized sweep of every axis")
    parser.add_argument("--preset", choices=list(MODELS), help="only this model's shapes")
    parser.add_argument("--shape", nargs="+", metavar="KEY",
                        help="only the cases with these shape strings (as in the CSV, e.g. N=64,D=512,...)")
    parser.add_argument("--out", type=cli.out_folder,
                        help="results folder (default: a run folder of its own, runs/<op>-<host>-<time>/)")
    parser.add_argument("--resume", action="store_true",
                        help="skip the rows already in the folder's CSV (--out, default the newest run folder of "
                             "the same op and host): continues a sweep that was stopped")
    parser.add_argument("--budget", type=cli.positive_float, help="seconds of timed calls per backend and shape")
    parser.add_argument("--cuda-graph", default="auto", choices=["auto", "on", "off"],
                        help="time CUDA-graph replays (auto: for calls under 50 us)")
    parser.add_argument("--pass", dest="passes", nargs="+", choices=PASSES, default=["forward"], metavar="PASS",
                        help=f"what each row times: {', '.join(PASSES)} (default: forward; the backward passes run "
                             f"the backends that have a backward)")
    parser.add_argument("--threads", type=cli.positive_int,
                        help="threads of torch and numba (default: theirs; at most the cores this process may use)")
    parser.add_argument("--no-report", action="store_true", help="skip the plots and README.md")
    parser.add_argument("--list", action="store_true", help="print ops, backends and presets")
    return parser


def parse(argv=None, machine: bool = False):
    """The arguments, with --op resolved to op names ("all" expanded, renamed names said and mapped); machine:
    also refuse what this machine cannot run (bench.sweep's main does). Every refusal exits 2 with one line,
    before anything runs."""
    parser_ = parser()
    args = parser_.parse_args(argv)
    if args.list:
        return args
    if not args.op:
        parser_.error("--op is required (or --list)")
    ops = []
    args.op_given = args.op
    for name in args.op:
        if name in RENAMED:
            print(f"note: --op {name} is called {RENAMED[name]} now (the API's name, in the CSV and the report)",
                  file=sys.stderr)
        ops += [n for n, s in OPS.items() if s.registry] if name == "all" else [RENAMED.get(name, name)]
    args.op = list(dict.fromkeys(ops))
    args.label = "all" if "all" in args.op_given else "+".join(args.op)
    own = [op for op in args.op if not OPS[op].registry]
    if own and len(args.op) > 1:
        parser_.error(f"--op {own[0]} runs alone (it has a sweep of its own)")
    if own and args.shape:
        parser_.error(f"--op {own[0]} takes no --shape (it has a sweep of its own)")
    if own and args.preset and not OPS[own[0]].presets("cpu") + OPS[own[0]].presets("cuda"):
        parser_.error(f"--op {own[0]} takes no --preset (it has no model presets)")
    args.passes = list(dict.fromkeys(args.passes))
    if own and args.passes != ["forward"]:
        parser_.error(f"--pass {' '.join(args.passes)}: --op {own[0]} has a sweep of its own, which takes no --pass")
    if "forward" not in args.passes:
        flat = [op for op in args.op if OPS[op].backward_cost is None]
        if flat:
            parser_.error(f"--pass {' '.join(args.passes)}: {', '.join(flat)} has no backward cost model (bench/ops/)")
    args.dtype = [DTYPES[d] for d in (args.dtype or (["float32"] if args.device == "cpu" else ["bfloat16"]))]
    return check(args, parser_) if machine else args


def check(args, parser):
    """Refuse (parser.error: one line, exit 2) what cannot run here: a GPU device without a GPU, a backend that
    does not run on the device or dtype, a shape or preset that selects nothing. Resolves
    --backend to {op: names} (None: every backend that runs here)."""
    cli.check_device(parser, "--device", args.device)
    cores = len(os.sched_getaffinity(0))
    if args.threads and args.threads > cores:
        parser.error(f"--threads {args.threads}: more than the {cores} cores this process may run on "
                     f"(os.sched_getaffinity); valid: 1 to {cores}")
    spec = OPS[args.op[0]]
    if not spec.registry:
        args.backend = backends_of(list(spec.backend_ops), args.device, args.dtype, args.backend, parser.error)
        if args.preset and not planned(spec.name, args.device, args.quick, args.preset):
            parser.error(f"no shapes of {spec.name} for preset {args.preset} on {args.device}: nothing would run")
        return args
    args.backend = backends_of(args.op, args.device, args.dtype, args.backend, parser.error)
    if args.backend is not None and "forward" not in args.passes:
        for name in dict.fromkeys(n for names in args.backend.values() for n in names):
            ops = [op for op in args.op if name in args.backend[op]]
            if name == "reference" or all(kernellab.registry.registered(op)[name].backward is None for op in ops):
                why = "is the yardstick of the gradients (not timed)" if name == "reference" else \
                    f"has no backward for {', '.join(ops)}"
                parser.error(f"--backend {name}: {why}; --pass {' '.join(args.passes)} times backends with a "
                             f"backward (or add --pass forward)")
    if args.backend is not None:
        for op in [op for op in args.op if not args.backend[op]]:
            print(f"note: no backend of --backend runs {op} on {args.device}: {op} is left out", file=sys.stderr)
        args.op = [op for op in args.op if args.backend[op]]
    cases = {op: planned(op, args.device, args.quick, args.preset) for op in args.op}
    keys = {case.key for found in cases.values() for case in found}
    if not keys:
        parser.error(f"no shapes of {' '.join(args.op)}" + (f" for preset {args.preset}" if args.preset else "")
                     + f" on {args.device}: nothing would run")
    if args.shape:
        unknown = [key for key in args.shape if key not in keys]
        if unknown:
            valid = sorted(keys)
            parser.error(f"--shape {unknown[0]}: no such case of {' '.join(args.op)} with these options; valid "
                         f"shapes ({len(valid)}): {'; '.join(valid[:12])}{' ...' if len(valid) > 12 else ''}")
    return args


RUNS = Path(__file__).resolve().parent.parent / "runs"


def run_folder(label: str, device: str, resume: bool) -> Path | None:
    """The default results folder: runs/<label>-<host>-<YYYYmmdd-HHMMSS>/ (ignored by git, apart from the
    published reports/), or with resume the newest such folder of label and host (None if there is none)."""
    prefix = f"{label}-{timing.host_slug(device)}-"
    if resume:
        found = sorted(p for p in RUNS.glob(prefix + "*") if (p / results.NAME).is_file())
        return found[-1] if found else None
    return RUNS / (prefix + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))


def main(argv=None) -> int:
    parser_ = parser()
    args = parse(argv, machine=True)
    if args.list:
        print(list_everything())
        return 0
    out = args.out or run_folder(args.label, args.device, args.resume)
    if out is None:
        parser_.error(f"--resume: no run folder runs/{args.label}-{timing.host_slug(args.device)}-* with a "
                      f"{results.NAME}; valid: --resume --out DIR (a folder a sweep wrote)")
    csv = out / results.NAME
    try:  # before the first timed call: a sweep that cannot write its rows does not start
        results.check_folder(out)
        before = results.read(csv) if args.resume and csv.is_file() else None
    except (PermissionError, results.Damaged) as exc:
        parser_.error(f"--out: {exc}")
    if args.threads:
        set_threads(args.threads)
    ceil = timing.ceilings(args.device, args.dtype)
    spec = OPS[args.op[0]]

    def quick(rows):  # bench.report --publish takes the rows of full runs only
        for row in rows:
            row["quick"] = args.quick
        return rows

    save_ceilings(out, ceil)
    rows, started = [], time.perf_counter()

    def finished(new):  # rows as they finish, into the CSV at once: a sweep stopped later keeps them
        rows.extend(quick(new))
        results.append(csv, new)

    try:
        if not spec.registry:  # a sweep of its own: its pieces already in the CSV are skipped
            # (this op's: pieces of other ops may share a label in the folder's CSV)
            done = set() if before is None or "piece" not in before else \
                set(before.loc[before["op"] == spec.name, "piece"].dropna()) - {""}
            names = None if args.backend is None else list(dict.fromkeys(n for found in args.backend.values()
                                                                        for n in found))
            chosen = {"preset": args.preset} if args.preset else {}

            def filled(new):  # columns these rows may leave out, filled the way every other row has them
                for row in new:
                    for column, value in base_row(spec.name, row["backend"], args.device, args.dtype[0],
                                                  ceil).items():
                        if column not in ("dtype",) and row.get(column) in (None, ""):
                            row[column] = value
                finished(new)

            spec.sweep.run.sweep(quick=args.quick, device=args.device, out=out, backends=names, on_rows=filled,
                                 done=done, **chosen)
        else:
            done = set() if before is None else results.keys(before)
            found = plan(args.op, args.device, args.dtype, args.quick, args.backend, args.preset, args.budget, ceil,
                         args.shape, args.passes, done)
            print(plan_text(found, args.device, args.dtype, args.passes, args.budget, args.quick)
                  + (f"; {len(done)} rows already in {csv} are skipped" if done else ""), flush=True)
            sweep(args.op, args.device, args.dtype, args.quick, args.backend, args.preset, args.budget,
                  args.cuda_graph, ceil=ceil, shapes=args.shape, passes=args.passes, done=done, on_rows=finished)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the {len(rows)} rows finished are in {csv}; `python -m bench.sweep ... --resume "
              f"--out {out}` continues", file=sys.stderr)
        return 130
    print(f"took {_duration(time.perf_counter() - started)}"
          + (f" (planned: {_duration(found['seconds'])} at least)" if spec.registry else ""))
    frame = results.read(csv) if csv.is_file() else None
    failed = [r for r in rows if r.get("error")]
    print(f"{len(rows)} rows ({len(failed)} with an error) -> {csv} ({0 if frame is None else len(frame)} rows in "
          f"all)")
    for row in failed:
        print(f"  {row['op']} {row['backend']} {row['shape']} {row['dtype']} {row.get('pass', 'forward')}: "
              f"{row['error']}")
    if not args.no_report and frame is not None:
        from bench import report

        report.write(out, args.device)
        print(f"plots and report -> {out}")
    if rows and len(failed) == len(rows):
        print("every backend failed on every shape: nothing was measured", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
