"""A torch.profiler trace of a few calls of one backend of one op.

    python -m profiling.trace --op gated_delta_rule --backend torch --shape T=1024 --shape Hv=8 [--dtype float32]
                              [--device cpu|cuda] [--calls 5] [--warmup 2] [--out DIR] [--plain]

Inputs come from `bench.ops.make(op, **shape)` (seed 0), so a shape means the same numbers as in the tests
and the sweeps. Writes under --out (default reports/<device>/traces/):
- trace_<op>_<backend>.json: the Chrome trace (open in chrome://tracing or https://ui.perfetto.dev);
- top_<op>_<backend>.txt / .csv: the operators, functions and kernels that take the most time (self time, on
  the GPU for a CUDA run);
and prints the table. On a GPU it also prints the Nsight Compute command line for the kernels found, with
`--clock-control none` (leave the card's clocks as they are) and a kernel-name filter; `--plain` is the mode that
command runs: the same calls without torch.profiler (which would compete with ncu for the counters), the
profiled ones between cudaProfilerStart and cudaProfilerStop so that warm-up and autotuning stay out.
"""
from __future__ import annotations

import ast
import csv
import os
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
               "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64", "fp64": "float64"}


def parse_value(text: str):
    """A --shape value: an int, float, bool, None, a comma list ("3,1,4" -> [3, 1, 4]) or a string."""
    if "," in text:
        return [parse_value(part) for part in text.split(",") if part]
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_shape(items: list[str]) -> dict:
    """["T=1024", "seqlens=1,7,64"] -> {"T": 1024, "seqlens": [1, 7, 64]}."""
    shape = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--shape takes key=value, got {item!r}")
        shape[key] = parse_value(value)
    return shape


def _kernel_base_name(name: str) -> str:
    """The function name Nsight Compute matches by default: without return type, template and parameters."""
    name = name.removeprefix("void ")
    return re.split(r"[<(]", name, maxsplit=1)[0].strip()


def ncu_command(kernel_names: list[str], launches: int, report: Path, rerun: list[str]) -> str:
    """The `ncu` command line that profiles the first `launches` launches of `kernel_names` inside the
    cudaProfilerStart/Stop region of the program `rerun` (its warm-up, autotuning included, stays outside),
    leaving the GPU clocks alone."""
    bases = sorted({_kernel_base_name(n) for n in kernel_names if _kernel_base_name(n)})
    pattern = "regex:^(" + "|".join(re.escape(b) for b in bases) + ")$"
    cmd = ["ncu", "--clock-control", "none", "--target-processes", "all", "--profile-from-start", "off",
           "--set", "full", "--kernel-name", pattern, "--launch-count", str(launches), "-o", str(report), *rerun]
    return shlex.join(cmd)


def gpu_kernels(averages) -> list:
    """The GPU kernels among the profiler's averaged events (not the CPU operators that launched them, whose
    device time counts the same kernels again, nor our per-call annotations)."""
    return [e for e in averages if not e.is_user_annotation and e.self_device_time_total > 0
            and (e.device_type.name == "CUDA" or e.cpu_time_total == 0)]  # kernels take no CPU time


def top_rows(averages, device: str, limit: int) -> list[dict]:
    """The `limit` events with the most self time, as dicts in microseconds: on a GPU the kernels by device time,
    on the CPU the operators and our per-call ranges by CPU time."""
    on_gpu = device == "cuda"
    events = gpu_kernels(averages) if on_gpu else list(averages)
    key = (lambda e: e.self_device_time_total) if on_gpu else (lambda e: e.self_cpu_time_total)
    total = sum(key(e) for e in events) or 1.0
    rows = []
    for event in sorted(events, key=key, reverse=True)[:limit]:
        if key(event) <= 0:
            break
        rows.append(dict(name=event.key, calls=event.count, self_us=round(key(event), 3),
                         self_percent=round(100 * key(event) / total, 2),
                         total_cpu_us=round(event.cpu_time_total, 3),
                         total_device_us=round(getattr(event, "device_time_total", 0.0), 3)))
    return rows


def _format_table(rows: list[dict], device: str) -> str:
    head = f"{'self ' + ('GPU' if device == 'cuda' else 'CPU') + ' us':>14} {'%':>6} {'calls':>6}  name"
    lines = [head, "-" * len(head)]
    lines += [f"{r['self_us']:>14.1f} {r['self_percent']:>6.1f} {r['calls']:>6}  {r['name'][:110]}" for r in rows]
    return "\n".join(lines)


def _prepare_environment(device: str):
    """Without a GPU, Triton kernels run under the interpreter and numba.cuda under the simulator; both must be
    chosen before those packages are imported (as the tests do)."""
    if device == "cpu":
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
            os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")


def make_call(op: str, backend: str, shape: dict, dtype_name: str, device: str):
    """A no-argument function that runs kernellab.<op> through `backend` once on fixed inputs, and the inputs."""
    import torch

    import kernellab
    from bench.ops import RENAMED, make

    op = RENAMED.get(op, op)
    dtype = getattr(torch, DTYPE_NAMES[dtype_name])
    made = make(op, dtype=dtype, device=device, seed=0, **shape)
    fn = kernellab.get(op, backend)

    def call():
        return fn(**made)

    return call, made


def _synchronize(device: str):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def trace(op: str, backend: str, shape: dict, dtype_name: str = "float32", device: str = "cpu", calls: int = 5,
          warmup: int = 2, out: Path | None = None, limit: int = 20, call=None) -> dict:
    """Profile `calls` calls after `warmup` unprofiled ones (of `call`, when main has made it already: else
    make_call's). Returns paths and the table's rows (and the ncu command on a GPU)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    out = Path(out) if out is not None else ROOT / "reports" / device / "traces"
    out.mkdir(parents=True, exist_ok=True)
    if call is None:
        call, _ = make_call(op, backend, shape, dtype_name, device)
    for _ in range(warmup):  # compilation, autotuning and allocator growth stay out of the trace
        call()
    _synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(calls):
            # One name for every call: its self time is what the backend spends outside torch operators
            # (Python, the Triton interpreter, launches of non-torch kernels).
            with record_function(f"{op}[{backend}]"):
                call()
            _synchronize(device)
    stem = f"{op}_{backend}"
    trace_path = out / f"trace_{stem}.json"
    prof.export_chrome_trace(str(trace_path))
    averages = prof.key_averages()
    rows = top_rows(averages, device, limit)
    table = _format_table(rows, device)
    header = (f"{op} backend={backend} device={device} dtype={dtype_name} shape={shape} calls={calls} "
              f"warmup={warmup} torch={torch.__version__}")
    (out / f"top_{stem}.txt").write_text(header + "\n\n" + table + "\n")
    with (out / f"top_{stem}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["name", "calls", "self_us", "self_percent", "total_cpu_us",
                                               "total_device_us"])
        writer.writeheader()
        writer.writerows(rows)
    result = dict(trace=trace_path, table=out / f"top_{stem}.txt", csv=out / f"top_{stem}.csv", rows=rows,
                  text=header + "\n\n" + table, ncu=None)
    if device == "cuda":
        kernels_seen = gpu_kernels(averages)
        if kernels_seen:
            launches_per_call = max(1, round(sum(e.count for e in kernels_seen) / calls))
            rerun = [sys.executable, "-m", "profiling.trace", "--op", op, "--backend", backend, "--device", device,
                     "--dtype", dtype_name, "--calls", "1", "--warmup", str(warmup), "--plain",
                     *(arg for key, value in shape.items() for arg in ("--shape", f"{key}={_unparse(value)}"))]
            result["ncu"] = ncu_command([e.key for e in kernels_seen], launches_per_call, out / f"ncu_{stem}", rerun)
    return result


def _unparse(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def checked_call(parser, args, device: str):
    """make_call for main, after checking what the command line asks for: op, backend on device and dtype,
    the shape's keys (the op's input maker's keywords (bench/ops/<family>.py)) and values (the op's input checks, before any
    call). Refuses through parser.error."""
    import inspect

    import torch

    from bench import cli
    from bench.ops import MAKERS, RENAMED
    from kernellab import validate

    op = RENAMED.get(args.op, args.op)
    cli.check_backend(parser, "--backend", op, args.backend, device, getattr(torch, DTYPE_NAMES[args.dtype]))
    try:
        shape = parse_shape(args.shape)
    except ValueError as exc:
        parser.error(str(exc))
    keys = [k for k in inspect.signature(MAKERS[op]).parameters if k not in ("dtype", "device", "seed")]
    if unknown := [k for k in shape if k not in keys]:
        parser.error(f"--shape: {', '.join(unknown)} not a keyword of {op}'s inputs; valid: {', '.join(keys)}")
    try:
        call, made = make_call(args.op, args.backend, shape, args.dtype, device)
        getattr(validate, op)(**made)  # the checks every call of the op runs first, without running it
    except (ValueError, TypeError, RuntimeError) as exc:
        parser.error(f"--shape {' '.join(args.shape)}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    return call, shape


def main(argv=None) -> int:
    from bench import cli
    from bench.ops import RENAMED
    from kernellab.registry import OPS

    parser = cli.ArgumentParser(prog="python -m profiling.trace", description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", required=True, choices=[*OPS, *RENAMED], help="an op of kernels")
    parser.add_argument("--backend", required=True, help="a backend name (kernellab.backends(op) lists them)")
    parser.add_argument("--shape", action="append", default=[], metavar="KEY=VALUE",
                        help="a keyword of the op's input maker (bench/ops/<family>.py) (repeatable); lists as 1,7,64")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPE_NAMES))
    parser.add_argument("--device", default=None, choices=cli.DEVICES, help="default: cuda when present")
    parser.add_argument("--calls", type=cli.positive_int, default=5, help="profiled calls")
    parser.add_argument("--warmup", type=cli.nonnegative_int, default=2, help="unprofiled calls first")
    parser.add_argument("--rows", type=cli.positive_int, default=20, help="rows of the table")
    parser.add_argument("--out", type=cli.out_folder, default=None, help="default reports/<device>/traces")
    parser.add_argument("--plain", action="store_true", help="run the calls without the profiler (for ncu)")
    args = parser.parse_args(argv)
    import torch

    device = cli.check_device(parser, "--device", args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    _prepare_environment(device)
    call, shape = checked_call(parser, args, device)
    if args.plain:
        for _ in range(args.warmup):
            call()
        _synchronize(device)
        if device == "cuda":  # the region `ncu --profile-from-start off` profiles
            torch.cuda.profiler.start()
        for _ in range(args.calls):
            call()
        _synchronize(device)
        if device == "cuda":
            torch.cuda.profiler.stop()
        return 0
    result = trace(args.op, args.backend, shape, args.dtype, device, args.calls, args.warmup, args.out, args.rows,
                   call)
    print(result["text"])
    print(f"\nChrome trace: {result['trace']}\ntable: {result['table']}")
    if result["ncu"]:
        print(f"\nNsight Compute, for the kernels above:\n  {result['ncu']}")
    elif device == "cpu":
        print("\n(no ncu command: a CPU run; on a GPU this prints one)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
