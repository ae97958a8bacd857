"""The one GPU run: parity on the GPU, a short sweep of every op, plots and a summary, in under 8 minutes.

    python -m bench.gpu_check [--out DIR] [--budget 480] [--op gated_delta_rule moe ...] [--skip-tests]

On a CUDA machine, in this order, each step in its own process with its own timeout:
1. the GPU-marked parity tests, `pytest -m gpu tests/` (they cover bfloat16, float16 and float32), with a JUnit
   XML report from which the summary counts passes and failures per dtype;
2. a short sweep of every op on the GPU (`python -m bench.sweep --op OP --device cuda` at the Qwen3.5-35B-A3B
   shapes, or `--quick` where the op has no model preset), each sweep checking every backend against the
   reference before timing it;
3. the sweep's plots and report (`python -m bench.report`) and the roofline (`profiling.roofline`);
4. SUMMARY.md: the machine, the pytest result lines, parity per dtype, each step's outcome and the sweep tables.
Everything goes under reports/<gpu name>/ (e.g. reports/h200/ for "NVIDIA H200").

Exit codes: 0 all passed; 1 parity failed (a GPU test failed, or a sweep row failed its check); 2 a step timed
out or crashed (and parity did not fail); 3 no CUDA GPU here (nothing was run).
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from bench.ops import OPS

ROOT = Path(__file__).resolve().parent.parent
EXIT_OK, EXIT_PARITY, EXIT_STEP, EXIT_NO_GPU = 0, 1, 2, 3
BUDGET_S = 480
TESTS_LIMIT_S = 190  # leaves each of the eight sweeps (the fp8 ops join their bf16 ops') over 30 s of a 480 s run
# Seconds kept after the sweeps for the report and the roofline, and of those for the roofline.
REPORT_RESERVE_S = 45
ROOFLINE_RESERVE_S = 15
PRESET = "Qwen3.5-35B-A3B"
# (sweep op, its arguments) of every registry op (bench/ops/): the model's own shapes where the op has them,
# else the quick axes.
SWEEPS = [(spec.name, ["--preset", PRESET] if any(model == PRESET for model, _ in spec.presets("cuda")) else ["--quick"])
          for spec in OPS.values() if spec.registry]
SWEEP_SECONDS_PER_SHAPE = "0.2"  # bench.sweep --budget: timed seconds per backend and shape
DTYPE_TOKENS = {"bfloat16": {"bfloat16", "bf16"}, "float16": {"float16", "fp16", "half"},
                "float32": {"float32", "fp32"}}
TABLE_COLUMNS = ["op", "backend", "dtype", "shape", "median_ms", "tflops", "gbps", "roofline_fraction",
                 "speedup_vs_best_peer", "error"]


@dataclasses.dataclass
class Step:
    """One command of the run and how it ended."""

    name: str
    cmd: list[str]
    rc: int | None = None  # None: not run (no time left)
    seconds: float = 0.0
    timed_out: bool = False
    log: Path | None = None

    @property
    def outcome(self) -> str:
        if self.rc is None:
            return "not run (time budget spent)"
        if self.timed_out:
            return f"timed out after {self.seconds:.0f} s"
        return "ok" if self.rc == 0 else f"exit {self.rc}"


def gpu_slug(name: str) -> str:
    """A folder name for a GPU: "NVIDIA H200" -> "h200", "NVIDIA H100 80GB HBM3" -> "h100-80gb-hbm3"."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return re.sub(r"^nvidia-", "", slug) or "gpu"


def run_step(step: Step, timeout: float, log: Path) -> Step:
    """Run step.cmd from the repository root with its output to `log`; kill it (and its children) at timeout."""
    step.log = log
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.monotonic()
    with log.open("w") as sink:
        process = subprocess.Popen(step.cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        try:
            step.rc = process.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
            step.rc, step.timed_out = -9, True
    step.seconds = time.monotonic() - start
    return step


def _dtype_of(test_name: str) -> str:
    tokens = set(re.split(r"[^a-z0-9]+", test_name.lower()))
    return next((d for d, names in DTYPE_TOKENS.items() if tokens & names), "other")


_VERBOSE_RESULT = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def parity_by_dtype(junit_xml: Path, log: Path | None = None) -> dict[str, dict[str, int]]:
    """dtype ("bfloat16", "float16", "float32", "other") -> counts of passed / failed / skipped test cases, from
    pytest's JUnit XML; when pytest was killed before writing it, from the PASSED / FAILED lines of its -v log."""
    counts = {d: dict(passed=0, failed=0, skipped=0) for d in (*DTYPE_TOKENS, "other")}
    if junit_xml.exists():
        for case in ElementTree.parse(junit_xml).iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                outcome = "failed"
            else:
                outcome = "skipped" if case.find("skipped") is not None else "passed"
            counts[_dtype_of(case.get("name", ""))][outcome] += 1
    elif log is not None and log.exists():
        for line in log.read_text(errors="replace").splitlines():
            if m := _VERBOSE_RESULT.match(line):
                outcome = {"PASSED": "passed", "XFAIL": "passed", "SKIPPED": "skipped"}.get(m.group(2), "failed")
                counts[_dtype_of(m.group(1).rsplit("::", 1)[-1])][outcome] += 1
    return counts


def pytest_result_lines(log: Path) -> list[str]:
    """The FAILED / ERROR lines and the final "N passed, M failed in S s" line of a pytest log."""
    if not log.exists():
        return []
    lines = log.read_text(errors="replace").splitlines()
    keep = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]
    keep += [line for line in lines if re.search(r"\b(passed|failed|error|no tests ran)\b.* in [\d.]+s", line)][-1:]
    return keep


def sweep_table(results_csv: Path, ops: list[str], since: datetime.datetime | None = None) -> list[dict]:
    """The GPU rows of the swept ops written at or after `since` (the CSV keeps earlier runs too), with
    TABLE_COLUMNS."""
    if not results_csv.exists():
        return []
    import pandas as pd

    from bench import results

    frame = results.read(results_csv)
    frame = frame[(frame["device"].astype(str) == "cuda") & frame["op"].isin(ops)]
    if since is not None and "timestamp" in frame:
        written = pd.to_datetime(frame["timestamp"], utc=True, errors="coerce")
        frame = frame[written >= pd.Timestamp(since).floor("s")]
    rows = []
    for record in frame.to_dict("records"):
        rows.append({c: ("" if c not in record or _missing(record[c]) else record[c]) for c in TABLE_COLUMNS})
    return rows


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")[:160]


def write_summary(out: Path, machine: dict, steps: list[Step], parity: dict, pytest_lines: list[str],
                  table: list[dict], exit_code: int) -> Path:
    """SUMMARY.md under out: machine, verdict, parity per dtype, pytest lines, steps and the sweep tables."""
    verdict = {EXIT_OK: "PASSED", EXIT_PARITY: "PARITY FAILED", EXIT_STEP: "INCOMPLETE (a step timed out or crashed)"}
    lines = [f"# GPU check: {machine.get('name', '?')}", "",
             f"Verdict: **{verdict.get(exit_code, exit_code)}** (exit code {exit_code}). "
             f"Written by `python -m bench.gpu_check` on {machine.get('time', '?')}.", "",
             "| machine | |", "|---|---|"]
    lines += [f"| {key} | {_fmt(value)} |" for key, value in machine.items()]
    lines += ["", "## Parity on the GPU (`pytest -m gpu tests/`)", "",
              "| dtype | passed | failed | skipped |", "|---|---|---|---|"]
    lines += [f"| {dtype} | {c['passed']} | {c['failed']} | {c['skipped']} |" for dtype, c in parity.items()
              if any(c.values())]
    lines += ["", "```", *(pytest_lines or ["(no pytest result line: see the steps below)"]), "```", "",
              "## Steps", "", "| step | outcome | seconds | command | log |", "|---|---|---|---|---|"]
    for step in steps:
        log = step.log.name if step.log else ""
        lines.append(f"| {step.name} | {step.outcome} | {step.seconds:.0f} | `{' '.join(step.cmd[2:])}` | {log} |")
    lines += ["", "## Sweep results of this run", "",
              "Each row was checked against the reference before it was timed; `error` says why a check failed.", ""]
    ops = list(dict.fromkeys(row["op"] for row in table))
    if not ops:
        lines.append("No sweep rows were written.")
    for op in ops:
        lines += [f"### {op}", "", "| " + " | ".join(TABLE_COLUMNS[1:]) + " |", "|" + "---|" * (len(TABLE_COLUMNS) - 1)]
        lines += ["| " + " | ".join(_fmt(row[c]) for c in TABLE_COLUMNS[1:]) + " |" for row in table if row["op"] == op]
        lines.append("")
    plots = sorted(p.name for p in out.glob("*.png"))
    if plots:
        lines += ["## Plots", "", *(f"![{name}]({name})" for name in plots), ""]
    path = out / "SUMMARY.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def machine_info() -> dict:
    import torch

    info = dict(name=torch.cuda.get_device_name(0), time=datetime.datetime.now(datetime.timezone.utc)
                .isoformat(timespec="seconds"), torch=torch.__version__, cuda=torch.version.cuda)
    props = torch.cuda.get_device_properties(0)
    info.update(multiprocessors=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip()
        info["driver"] = driver or "?"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def plan(out: Path, ops: list[str], skip_tests: bool) -> list[Step]:
    """The commands of the run, in order."""
    python = sys.executable
    steps = []
    if not skip_tests:
        steps.append(Step("parity tests", [python, "-m", "pytest", "-m", "gpu", "tests/", "-v", "-rfE",
                                           "-p", "no:cacheprovider", f"--junitxml={out / 'pytest.xml'}"]))
    for op, args in SWEEPS:
        joined = [o for o in ops if OPS[o].swept_with == op]  # swept in this op's run (bench/ops/ swept_with)
        if op in ops and OPS[op].swept_with not in ops:
            steps.append(Step(f"sweep {'+'.join([op, *joined])}",
                              [python, "-m", "bench.sweep", "--op", op, *joined, "--device", "cuda", *args,
                               "--budget", SWEEP_SECONDS_PER_SHAPE, "--no-report", "--out", str(out)]))
    steps.append(Step("report", [python, "-m", "bench.report", "--device", "cuda", "--out", str(out)]))
    steps.append(Step("roofline", [python, "-m", "profiling.roofline", "--csv", str(out / "results.csv"),
                                   "--device", "cuda", "--out", str(out)]))
    return steps


def execute(steps: list[Step], out: Path, budget: float, runner=run_step, clock=time.monotonic) -> list[Step]:
    """Run the steps within `budget` seconds, even if every one runs to its limit: the tests get at most
    TESTS_LIMIT_S, each sweep an equal share of what is left (less the report's reserve), the report and the
    roofline the rest."""
    deadline = clock() + budget
    sweeps_left = sum(step.name.startswith("sweep") for step in steps)
    for step in steps:
        left = deadline - clock()
        if step.name == "parity tests":
            limit = min(TESTS_LIMIT_S, left - REPORT_RESERVE_S)
        elif step.name.startswith("sweep"):
            limit = (left - REPORT_RESERVE_S) / max(1, sweeps_left)
            sweeps_left -= 1
        elif step.name == "report":
            limit = left - ROOFLINE_RESERVE_S
        else:
            limit = left
        if limit < 5:
            continue  # rc None: "not run"
        slug = re.sub(r"[^a-z0-9]+", "_", step.name)
        runner(step, limit, out / f"{slug}.log")
    return steps


def verdict(steps: list[Step], parity: dict, failures: list[dict]) -> int:
    tests = next((s for s in steps if s.name == "parity tests"), None)
    if any(c["failed"] for c in parity.values()) or failures or (tests is not None and tests.rc == 1):
        return EXIT_PARITY
    # pytest exit 5: no GPU test collected, which is no failure of parity.
    if any(s.rc is None or s.timed_out or s.rc not in (0, 5 if s.name == "parity tests" else 0) for s in steps):
        return EXIT_STEP
    return EXIT_OK


def check(out: Path, ops: list[str], budget: float, skip_tests: bool, runner=run_step, machine: dict | None = None):
    """The whole run; returns (exit code, SUMMARY.md path)."""
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    steps = execute(plan(out, ops, skip_tests), out, budget, runner)
    tests = next((s for s in steps if s.name == "parity tests"), None)
    parity = parity_by_dtype(out / "pytest.xml", tests.log if tests else None)
    pytest_lines = pytest_result_lines(tests.log) if tests and tests.log else []
    swept = [op for op, _ in SWEEPS if op in ops]
    table = sweep_table(out / "results.csv", swept, since=started)
    code = verdict(steps, parity, [row for row in table if row["error"]])
    summary = write_summary(out, machine or machine_info(), steps, parity, pytest_lines, table, code)
    return code, summary


def _starts_tests_or_a_sweep(budget: float, ops: list[str], skip_tests: bool) -> bool:
    """Whether a run with this budget starts the parity tests or a sweep (execute, with nothing run)."""
    started = []
    execute(plan(Path("."), ops, skip_tests), Path("."), budget, runner=lambda step, limit, log: started.append(step),
            clock=lambda: 0.0)
    return any(step.name not in ("report", "roofline") for step in started)


def main(argv=None) -> int:
    from bench import cli

    parser = cli.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=cli.out_folder, default=None, help="default reports/<gpu name>/")
    parser.add_argument("--budget", type=cli.positive_float, default=BUDGET_S,
                        help="seconds for the whole run (default 480)")
    parser.add_argument("--op", dest="ops", nargs="+", default=[op for op, _ in SWEEPS],
                        choices=[op for op, _ in SWEEPS], help="the ops to sweep (default: all of them)")
    parser.add_argument("--skip-tests", action="store_true", help="only the sweeps and the summary")
    args = parser.parse_args(argv)
    if not _starts_tests_or_a_sweep(args.budget, args.ops, args.skip_tests):
        shortest = next(b for b in range(1, BUDGET_S + 1) if _starts_tests_or_a_sweep(b, args.ops, args.skip_tests))
        first = "a sweep" if args.skip_tests else "the parity tests"
        parser.error(f"--budget {args.budget:g}: too short to start {first} after the report's reserve of "
                     f"{REPORT_RESERVE_S} s; valid: {shortest} s or more")
    import torch

    if not torch.cuda.is_available():
        print("bench.gpu_check: no CUDA GPU on this machine; nothing was run (exit 3).", file=sys.stderr)
        return EXIT_NO_GPU
    out = args.out or ROOT / "reports" / gpu_slug(torch.cuda.get_device_name(0))
    code, summary = check(out, args.ops, args.budget, args.skip_tests)
    print(summary.read_text())
    print(f"-> {summary} (exit {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
