"""The results CSV (bench.results) and the sweep's use of it: damaged files reported by path and line and never
merged, concurrent writers that both keep their rows, atomic replacement, rows written as they finish, the plan,
--resume after a SIGINT, and the default run folder outside the published reports."""
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench import results, sweep, timing

ROOT = Path(__file__).resolve().parents[2]
CEILINGS = {"device_name": "test cpu", "threads": 1, "matmul_tflops": {"float32": 0.1}, "copy_gbps": 20.0}
ROUTE = ["--op", "route", "--quick", "--backend", "torch", "reference", "--threads", "1", "--no-report"]
SHAPES = [f"N={n},E=64,top_k=8,routing=uniform" for n in (1, 4, 16, 64, 256)]


def _row(backend: str, shape: str, ms: float, **more) -> dict:
    return dict(op="route", backend=backend, device="cpu", dtype="float32", shape=shape, median_ms=ms, p20_ms=ms,
                p80_ms=ms, peer=False, error="", commit="0501666", **more)


def _table(path: Path, n: int = 4) -> Path:
    ms = [random.uniform(0.5, 5.0) for _ in range(n)]
    results.merge(path, [_row("torch", f"N={i}", t) for i, t in enumerate(ms)])
    return path


# ------------------------------------------------------------------------------------------------ reading

def test_round_trip_keeps_text_and_numbers(tmp_path):
    ms = random.uniform(0.1, 9.0)
    frame = results.merge(tmp_path / "results.csv", [_row("torch", "N=1", ms), _row("reference", "N=1", 4 * ms)])
    back = results.read(tmp_path / "results.csv")
    assert list(back.columns) == list(frame.columns) and len(back) == 2
    assert back["commit"].tolist() == ["0501666"] * 2  # a hash of digits stays text
    torch_row = back[back["backend"] == "torch"].iloc[0]
    assert torch_row["median_ms"] == pytest.approx(ms, rel=1e-12)
    assert torch_row["speedup_vs_reference"] == pytest.approx(4.0, rel=1e-12)
    assert torch_row["pass"] == "forward"
    assert results.keys(back) == {("route", "torch", "N=1", "float32", "cpu", "forward"),
                                  ("route", "reference", "N=1", "float32", "cpu", "forward")}


def _damage(text: str, how: str) -> tuple[str, int]:
    """text damaged `how`, and the line the damage is on."""
    lines = text.splitlines(keepends=True)
    if how == "truncated":  # cut mid-row, as a killed writer of the old code left it
        return "".join(lines[:3]) + lines[3][:len(lines[3]) // 2], 4
    if how == "junk row":
        return "".join(lines[:2]) + "hello,world\n" + "".join(lines[2:]), 3
    if how == "garbled number":
        head = lines[0].split(",")
        fields = lines[2].split(",")
        fields[head.index("median_ms")] = "1.2.3"
        return "".join(lines[:2]) + ",".join(fields) + "".join(lines[3:]), 3
    if how == "empty":
        return "", 1
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "junk row", "garbled number", "empty"])
def test_a_damaged_csv_is_reported_with_path_and_line_and_never_merged(tmp_path, how):
    path = _table(tmp_path / "results.csv")
    damaged, line = _damage(path.read_text(), how)
    path.write_text(damaged)
    before = path.read_bytes()
    with pytest.raises(results.Damaged) as raised:
        results.read(path)
    assert f"{path}:{line}:" in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(results.Damaged):
        results.merge(path, [_row("torch", "N=99", 1.0)])
    assert path.read_bytes() == before  # not rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.csv.lock"]  # no temporary left


def test_bytes_that_are_no_text_are_damage(tmp_path):
    path = _table(tmp_path / "results.csv")
    path.write_bytes(path.read_bytes() + b"\xff\xfe\x00junk\n")
    with pytest.raises(results.Damaged, match=r":6: not text"):
        results.read(path)


# ------------------------------------------------------------------------------------------------ writing

def _writer(path: str, name: str, count: int, start) -> None:
    start.wait()
    for i in range(count):  # one row at a time, as a sweep appends them
        results.append(Path(path), [_row(name, f"N={i}", 1.0 + i)])


def test_two_writers_at_once_both_keep_every_row(tmp_path):
    """Two processes appending into one CSV at the same moment, six times over: no row lost, none torn."""
    context = multiprocessing.get_context("fork")
    for trial in range(6):
        path = tmp_path / f"trial{trial}" / "results.csv"
        start = context.Barrier(2)
        writers = [context.Process(target=_writer, args=(str(path), name, 8, start)) for name in ("torch", "numba")]
        for w in writers:
            w.start()
        for w in writers:
            w.join(120)
            assert w.exitcode == 0
        frame = results.read(path)
        assert sorted(frame["backend"] + " " + frame["shape"]) == sorted(
            f"{name} N={i}" for name in ("torch", "numba") for i in range(8))


def test_a_write_that_fails_leaves_the_old_table(tmp_path, monkeypatch):
    path = _table(tmp_path / "results.csv")
    before = path.read_bytes()

    def broken(self, *args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(pd.DataFrame, "to_csv", broken)
    with pytest.raises(OSError, match="disk full"):
        results.merge(path, [_row("torch", "N=99", 1.0)])
    assert path.read_bytes() == before


def test_check_folder(tmp_path):
    results.check_folder(tmp_path / "new" / "deeper")  # may be made
    assert not (tmp_path / "new").exists()  # the check writes nothing
    (tmp_path / "file").write_text("x")
    with pytest.raises(PermissionError, match="is a file"):
        results.check_folder(tmp_path / "file" / "below")
    path = _table(tmp_path / "ok" / "results.csv")
    results.check_folder(path.parent)
    path.write_text(path.read_text()[:-10])
    with pytest.raises(results.Damaged):
        results.check_folder(path.parent)


# ------------------------------------------------------------------------------------------------ the sweep

@pytest.fixture
def quiet_ceilings(monkeypatch):
    monkeypatch.setattr(timing, "ceilings", lambda device, dtypes, budget_s=0.5: CEILINGS)


def test_rows_are_written_as_they_finish_after_the_plan(tmp_path, monkeypatch, capsys, quiet_ceilings):
    written = []
    real = results.append

    def spy(path, rows):
        written.append(len(results.read(path)) if path.exists() else 0)  # rows on disk before this one
        real(path, rows)

    monkeypatch.setattr(results, "append", spy)
    out = tmp_path / "out"
    assert sweep.main([*ROUTE, "--shape", *SHAPES[:2], "--budget", "0.01", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("plan: 4 rows on cpu") and "route: torch, reference" in printed
    assert written == [0, 1, 2, 3]  # one row at a time, each after the previous one is on disk
    assert len(results.read(out / "results.csv")) == 4


def test_refuses_an_unwritable_or_damaged_folder_before_timing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(timing, "ceilings", lambda *a, **k: pytest.fail("measured ceilings for a refused run"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as raised:
        sweep.main([*ROUTE, "--out", str(tmp_path / "file" / "below")])
    err = capsys.readouterr().err
    assert raised.value.code == 2 and "--out:" in err and "is a file" in err and len(err.strip().splitlines()) == 1
    path = _table(tmp_path / "damaged" / "results.csv")
    path.write_text(path.read_text() + "junk\n")
    with pytest.raises(SystemExit) as raised:
        sweep.main([*ROUTE, "--out", str(path.parent)])
    err = capsys.readouterr().err
    assert raised.value.code == 2 and f"{path}:6:" in err and len(err.strip().splitlines()) == 1


def test_default_folder_is_a_run_folder_that_git_ignores(tmp_path, monkeypatch, quiet_ceilings, capsys):
    monkeypatch.setattr(sweep, "RUNS", tmp_path / "runs")
    assert sweep.main([*ROUTE, "--shape", SHAPES[0], "--budget", "0.01"]) == 0
    (folder,) = (tmp_path / "runs").iterdir()
    host = timing.host_slug("cpu")
    assert folder.name.startswith(f"route-{host}-") and len(folder.name) == len(f"route-{host}-") + 15
    assert len(results.read(folder / "results.csv")) == 2
    # --resume without --out continues the newest run folder of the same op and host
    assert sweep.main([*ROUTE, "--shape", *SHAPES[:2], "--budget", "0.01", "--resume"]) == 0
    assert "2 rows already in" in capsys.readouterr().out and len(list((tmp_path / "runs").iterdir())) == 1
    assert len(results.read(folder / "results.csv")) == 4
    paths = ["runs/route-x-20260101-000000/results.csv", "reports/cpu/results.csv.lock"]
    ignored = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True, check=False)
    assert ignored.stdout.split() == paths


def test_resume_without_a_run_folder_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep, "RUNS", tmp_path / "runs")
    with pytest.raises(SystemExit) as raised:
        sweep.main([*ROUTE, "--resume"])
    assert raised.value.code == 2 and "--resume: no run folder" in capsys.readouterr().err


def _sweep_command(out: Path, *more: str) -> list[str]:
    # a budget long enough that the SIGINT lands before the last row on a starved core (at 0.3 s a busy one-core
    # run finished every row before the poll saw the first)
    return [sys.executable, "-m", "bench.sweep", *ROUTE, "--shape", *SHAPES, "--budget", "1.0", "--out", str(out),
            *more]


def test_a_sweep_stopped_by_sigint_keeps_its_rows_and_resumes(tmp_path):
    """Interrupted after its first rows, then resumed: the same keys as a run straight through."""
    csv = tmp_path / "stopped" / "results.csv"
    # SIGINT at its default in the child: a pytest-xdist worker ignores it, and a child inherits that (Python then
    # installs no KeyboardInterrupt handler, and the sweep ran to its end)
    proc = subprocess.Popen(_sweep_command(csv.parent), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if csv.is_file() and csv.read_text().count("\n") >= 2:  # a header and a row (the CSV is replaced whole)
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    kept = results.keys(results.read(csv))
    assert 1 <= len(kept) < 2 * len(SHAPES), kept  # stopped part way
    assert "--resume" in err
    resumed = subprocess.run(_sweep_command(csv.parent, "--resume"), cwd=ROOT, capture_output=True, text=True,
                             timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(kept)} rows already in" in resumed.stdout
    straight = tmp_path / "straight"
    done = subprocess.run(_sweep_command(straight), cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert results.keys(results.read(csv)) == results.keys(results.read(straight / "results.csv"))
    assert len(results.read(csv)) == 2 * len(SHAPES)
    before = {k: t for k, t in zip(map(tuple, results.read(csv)[results.KEY].values), results.read(csv)["timestamp"])}
    assert all(before[k] for k in kept)  # the rows kept were not measured again


def test_plan_counts_what_the_sweep_runs(monkeypatch):
    found = sweep.plan(["route"], "cpu", [torch.float32], True, {"route": ["torch"]}, None,
                       0.1, CEILINGS, shapes=SHAPES[:3])
    assert found["rows"] == 3 and found["backends"] == {"route": ["torch"]}
    assert found["seconds"] >= 3 * 0.1
    done = {("route", "torch", SHAPES[0], "float32", "cpu", "forward")}
    assert sweep.plan(["route"], "cpu", [torch.float32], True, {"route": ["torch"]}, None,
                      0.1, CEILINGS, shapes=SHAPES[:3], done=done)["rows"] == 2


def test_threads_beyond_the_cores_are_refused(capsys, tmp_path):
    cores = len(os.sched_getaffinity(0))
    with pytest.raises(SystemExit) as raised:
        sweep.main(["--op", "route", "--quick", "--threads", str(cores + 1), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert raised.value.code == 2 and f"--threads {cores + 1}: more than the {cores} cores" in err
    assert not (tmp_path / "out").exists()


def test_a_suite_stopped_part_way_keeps_its_pieces_and_resumes(tmp_path, monkeypatch, quiet_ceilings):
    """A sweep of its own (bench.suites) hands each piece's rows to the CSV as it finishes: stopped in its third
    piece, the first two are kept, and --resume runs only the rest: the same rows as a run straight through."""
    spec = sweep.OPS["precision"]
    labels = ["error a", "error b", "memory", "decode"]
    made = []

    def fake(quick, device, out, backends, on_rows, done, stop_at=None):
        from bench.suites import pieces

        def piece(label):
            if label == stop_at:
                raise KeyboardInterrupt
            made.append(label)
            return [dict(op="precision", backend="torch", device="cpu", dtype="float32", shape=f"{label},T={t}",
                         median_ms=random.uniform(1, 2), phase=label.split()[0]) for t in (1, 2)]

        return pieces([(label, lambda label=label: piece(label)) for label in labels], on_rows, done)

    args = ["--op", "precision", "--quick", "--threads", "1", "--no-report"]
    monkeypatch.setattr(spec.sweep.run, "sweep", lambda **kw: fake(**kw, stop_at="memory"))
    assert sweep.main([*args, "--out", str(tmp_path / "stopped")]) == 130
    kept = results.read(tmp_path / "stopped" / "results.csv")
    assert sorted(set(kept["piece"])) == ["error a", "error b"] and len(kept) == 4
    made.clear()
    # another op's piece of the same label in the folder (the model sweep's "memory"): not this op's, so not done
    results.append(tmp_path / "stopped" / "results.csv",
                   [dict(op="model", backend="torch", device="cpu", dtype="float32", shape="memory,T=1",
                         median_ms=1.0, piece="memory")])
    monkeypatch.setattr(spec.sweep.run, "sweep", lambda **kw: fake(**kw))
    assert sweep.main([*args, "--out", str(tmp_path / "stopped"), "--resume"]) == 0
    assert made == ["memory", "decode"]
    assert sweep.main([*args, "--out", str(tmp_path / "straight")]) == 0
    resumed, straight = (results.read(tmp_path / name / "results.csv") for name in ("stopped", "straight"))
    resumed = resumed[resumed["op"] == "precision"]
    assert results.keys(resumed) == results.keys(straight) and len(resumed) == 8
    assert list(resumed.sort_values("shape")["piece"]) == list(straight.sort_values("shape")["piece"])
