"""bench.compare on hand-built rows (no timing): pairing, the ratio and its spread, the verdicts, the files it
writes, bad input refused, and the interleaved mode end to end on a tiny git repository whose fake
bench/sweep.py writes fixed rows."""
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bench import compare

COLUMNS = ["op", "backend", "shape", "dtype", "device", "median_ms", "p20_ms", "p80_ms", "repeats", "commit",
           "timestamp", "error"]


def csv_text(commit, *cells):
    """A results CSV: one row per (backend, shape, median, p20, p80, repeats[, error]) of op moe on cpu."""
    rows = [dict(zip(COLUMNS, ["moe", b, s, "float32", "cpu", m, lo, hi, n, commit, "2026-01-01T00:00:00Z",
                               rest[0] if rest else ""]))
            for b, s, m, lo, hi, n, *rest in cells]
    return pd.DataFrame(rows, columns=COLUMNS).to_csv(index=False)


def refused(argv, capsys, *expected) -> str:
    """compare.main(argv) exits 2 with one line on stderr, no traceback, containing every `expected` text, and
    prints nothing on stdout (as tests/test_cli.py asks of every CLI). Returns that line."""
    with pytest.raises(SystemExit) as raised:
        compare.main(argv)
    out, err = capsys.readouterr()
    assert raised.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and out == "", (out, err)
    assert err.startswith("python -m bench.compare: error: "), err
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"
    return err


def frame(commit, *cells):
    return compare.read_rows(io.StringIO(csv_text(commit, *cells)), "test rows")


BASE = [("torch", "N=1", 10, 9, 11, 10), ("torch", "N=2", 10, 9, 11, 10), ("torch", "N=3", 10, 9, 11, 10),
        ("torch", "N=4", 10, 9, 11, 10), ("reference", "N=1", 10, 10, 10, 1), ("torch", "N=5", 10, 9, 11, 10),
        ("torch", "N=7", 10, 9, 11, 10)]
NEW = [("torch", "N=1", 5, 4.5, 5.5, 10),     # faster: 5.5 < 9
       ("torch", "N=2", 12, 11.5, 13, 10),    # slower: 11.5 > 11
       ("torch", "N=3", 10.5, 10, 12, 10),    # within noise: the intervals overlap
       ("torch", "N=4", 12, 11, 12.5, 10),    # within noise: they touch (new p20 = base p80)
       ("reference", "N=1", 8, 8, 8, 1),      # one call: no spread to judge
       ("torch", "N=6", 3, 2, 4, 10),         # only in new
       ("torch", "N=7", math.nan, math.nan, math.nan, math.nan, "RuntimeError: boom")]  # failed in new


def test_pair_ratio_spread_and_verdicts():
    compared, one_sided = compare.pair(frame("aaaa111", *BASE), frame("bbbb222", *NEW))
    by = compared.set_index(["backend", "shape"])
    assert list(compared["ratio"]) == sorted(compared["ratio"])
    assert by.loc[("torch", "N=1"), "ratio"] == pytest.approx(0.5)
    assert by.loc[("torch", "N=1"), "ratio_low"] == pytest.approx(4.5 / 11)
    assert by.loc[("torch", "N=1"), "ratio_high"] == pytest.approx(5.5 / 9)
    assert by.loc[("torch", "N=2"), ["ratio", "ratio_low", "ratio_high"]].tolist() == pytest.approx(
        [1.2, 11.5 / 11, 13 / 9])
    verdicts = {shape: v for (backend, shape), v in by["verdict"].items() if backend == "torch"}
    assert verdicts == {"N=1": "faster", "N=2": "slower", "N=3": "within noise", "N=4": "within noise"}
    assert by.loc[("reference", "N=1"), "verdict"] == "single call"
    assert by.loc[("torch", "N=1"), "base_commit"] == "aaaa111" and by.loc[("torch", "N=1"), "new_commit"] == "bbbb222"
    lonely = {(r.shape, r.side): r.reason for r in one_sided.itertuples()}
    assert lonely == {("N=5", "base"): "new: absent", ("N=7", "base"): "new: RuntimeError: boom",
                      ("N=6", "new"): "base: absent"}
    line = compare.summary(compared, one_sided)
    geomean = (0.5 * 1.2 * 1.05 * 1.2 * 0.8) ** (1 / 5)
    assert line == (f"5 rows compared: 1 faster, 1 slower, 2 within noise, 1 single call; geometric mean ratio "
                    f"new/base {geomean:.3f}x; not compared: 2 only in base, 1 only in new")


def test_commits_that_look_like_numbers_stay_text():
    rows = frame("0501666", ("torch", "N=1", 1, 1, 1, 5))
    assert list(rows["commit"]) == ["0501666"]
    assert list(frame("1e51234", ("torch", "N=1", 1, 1, 1, 5))["commit"]) == ["1e51234"]


def test_fmt_time_has_units():
    assert [compare.fmt_time(t) for t in (0.85, 12.44, 3220.0)] == ["850 us", "12.4 ms", "3.22 s"]


def _write_pair(tmp_path):
    base, new = tmp_path / "base.csv", tmp_path / "new.csv"
    base.write_text(csv_text("aaaa111", *BASE))
    new.write_text(csv_text("bbbb222", *NEW))
    return base, new


def test_files_mode_writes_markdown_csv_png(tmp_path, capsys):
    base, new = _write_pair(tmp_path)
    out = tmp_path / "out"
    assert compare.main(["--base", str(base), "--new", str(new), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "new/base (x)" in printed and "5 ms" in printed and "5.5 ms" in printed
    assert "5 rows compared: 1 faster, 1 slower" in printed and "only in new: moe torch N=6" in printed
    md = (out / "base_vs_new.md").read_text()
    assert "| op | backend | shape | dtype | base median |" in md and "![base_vs_new](base_vs_new.png)" in md
    assert "## Not compared (3)" in md and "new: RuntimeError: boom" in md
    written = pd.read_csv(out / "base_vs_new.csv", keep_default_na=False, na_values=[""])
    assert len(written) == 8  # 5 compared, 3 one-sided
    assert set(written["verdict"]) == {"faster", "slower", "within noise", "single call", "only in base", "only in new"}
    png = (out / "base_vs_new.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.parametrize("argv, says", [
    (["--base", "{tmp}/missing.csv", "--new", "{new}"], "argument --base: no file at"),
    (["--base", "{base}", "--new", "{new}", "--op", "attention"], "--op attention: no such rows in --base"),
    (["--base", "{base}", "--new", "{new}", "--device", "cuda"], "--device cuda: no such rows in --base"),
    (["--base", "{base}", "--new", "{other}"], "--base/--new: no common measured rows"),
    (["--base", "{base}"], "--new: missing; valid: --base CSV and --new CSV together"),
    (["--base", "{base}", "--new", "{new}", "--rounds", "2"], "--rounds: only with --interleave"),
    (["--base", "{base}", "--new", "{new}", "--interleave", "a", "b"], "--base/--new and --interleave: one of"),
    (["aaaa111"], "A B aaaa111: 1 given; valid: two commits, base then new"),
    (["a", "b", "--rounds", "0"], "argument --rounds: expected an integer >= 1, got 0"),
    ([], "A B: missing; valid: two commits A B, or --base CSV --new CSV, or --interleave REV_A REV_B"),
    (["--base", "{damaged}", "--new", "{new}"], "--base {damaged}: {damaged}:3: 1 fields, the header has 12"),
    (["--base", "{base}", "--new", "{new}", "--out", "{tmp}/file/below"], "--out: {tmp}/file is a file"),
])
def test_bad_input_is_refused_with_one_line_and_nothing_written(tmp_path, capsys, argv, says):
    base, new = _write_pair(tmp_path)
    other = tmp_path / "other.csv"
    other.write_text(csv_text("cccc333", ("triton", "N=1", 1, 1, 1, 5)))
    damaged = tmp_path / "damaged.csv"  # a junk row on line 3: never compared
    lines = base.read_text().splitlines(keepends=True)
    damaged.write_text("".join(lines[:2]) + "junk\n" + "".join(lines[2:]))
    (tmp_path / "file").write_text("x")
    out = tmp_path / "out"
    names = dict(tmp=tmp_path, base=base, new=new, other=other, damaged=damaged)
    argv = [a.format(**names) for a in argv]
    refused(argv + ([] if "--out" in argv else ["--out", str(out)]), capsys, says.format(**names))
    assert not out.exists()


# ------------------------------------------------------------------------------------- git repositories

def git(repo, *args):
    env = os.environ | {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def commit_all(repo, message):
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "--short", "HEAD")


@pytest.fixture
def repo(tmp_path):
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q")
    return path


def test_commits_are_found_in_the_csv_and_its_committed_versions(repo, tmp_path, capsys):
    csv = repo / "reports" / "cpu" / "results.csv"
    csv.parent.mkdir(parents=True)
    csv.write_text(csv_text("aaaa111", *BASE))
    commit_all(repo, "first sweep")
    csv.write_text(csv_text("bbbb222", *NEW))  # a rerun replaced every row: aaaa111's live in git only
    out = tmp_path / "out"
    assert compare.main(["aaaa", "bbbb222", "--csv", str(csv), "--out", str(out)]) == 0
    assert "5 rows compared" in capsys.readouterr().out
    assert (out / "aaaa111_vs_bbbb222.md").is_file() and (out / "aaaa111_vs_bbbb222.png").is_file()
    refused(["ffff", "bbbb222", "--csv", str(csv), "--out", str(tmp_path / "bad")], capsys,
            "A ffff: no rows of that commit in", "valid: the commits present, ", "aaaa111 (7 rows", "bbbb222 (7 rows")
    assert not (tmp_path / "bad").exists()


FAKE_SWEEP = '''\
"""A stand-in for bench.sweep: fixed rows per round (its number from --out), a line per turn in $FAKE_SWEEP_LOG."""
import argparse, os, subprocess
from pathlib import Path

VERSION = {version!r}
TIMES = {times!r}  # shape -> median ms in rounds 1, 2, 3; p20 and p80 are 1 ms either side


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.sweep")
    parser.add_argument("--op", nargs="+")
    parser.add_argument("--backend", nargs="+")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--no-report", action="store_true")
    parser.add_argument("--out", type=Path)
    {shape_option}
    args = parser.parse_args()
    if args.op == ["broken"]:
        raise RuntimeError("broken op")
    if args.op == ["nosuch"]:
        parser.error("--op nosuch: no such op")
    r = int(args.out.name.removeprefix("round"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                            capture_output=True, text=True).stdout.strip()
    with open(os.environ["FAKE_SWEEP_LOG"], "a") as log:
        log.write(f"{{VERSION}} {{r}} {{os.path.realpath(__file__)}} {{args.threads}} {{args.quick}}\\n")
    lines = ["op,backend,shape,dtype,device,median_ms,p20_ms,p80_ms,repeats,commit,timestamp,error"]
    for shape, times in TIMES.items():
        if getattr(args, "shape", None) and shape not in args.shape:
            continue
        m = times[r - 1]
        lines.append(f"{{args.op[0]}},torch,{{shape}},float32,{{args.device}},{{m}},{{m - 1}},{{m + 1}},5,{{commit}},"
                     f"2026-01-01T00:00:0{{r}}Z,")
    args.out.mkdir(parents=True)
    (args.out / "results.csv").write_text("\\n".join(lines) + "\\n")


if __name__ == "__main__":
    main()
'''
SHAPE_OPTION = 'parser.add_argument("--shape", nargs="+")'


def fake_revision(repo, version, times, shape=True):
    """Commit a fake bench/sweep.py; returns the commit's short hash."""
    (repo / "bench").mkdir(exist_ok=True)
    (repo / "bench" / "__init__.py").write_text("")
    (repo / "bench" / "sweep.py").write_text(FAKE_SWEEP.format(version=version, times=times,
                                                               shape_option=SHAPE_OPTION if shape else ""))
    return commit_all(repo, version)


@pytest.fixture
def revisions(repo, tmp_path, monkeypatch):
    """Three fake revisions: v0 (no --shape), v1, v2 (faster on N=1, a new shape N=3); the test runs in repo,
    temporary folders under tmp_path/tmp, the fake's turns logged to tmp_path/turns.log."""
    v0 = fake_revision(repo, "v0", {"N=1": [10, 12, 11], "N=2": [10, 10, 10]}, shape=False)
    v1 = fake_revision(repo, "v1", {"N=1": [10, 12, 11], "N=2": [10, 10, 10]})
    v2 = fake_revision(repo, "v2", {"N=1": [5, 5, 5], "N=2": [10, 10, 10], "N=3": [7, 7, 7]})
    monkeypatch.chdir(repo)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(compare.tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setenv("FAKE_SWEEP_LOG", str(tmp_path / "turns.log"))
    return {"v0": v0, "v1": v1, "v2": v2}


def _turns(tmp_path):
    log = tmp_path / "turns.log"
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def _clean(repo, tmp_path):
    """No worktree left registered, no temporary folder left."""
    return git(repo, "worktree", "list").count("\n") == 0 and not any((tmp_path / "tmp").iterdir())


def test_interleave_alternates_the_revisions_and_pairs_their_rows(repo, tmp_path, revisions, capsys):
    out = tmp_path / "out"
    v1, v2 = revisions["v1"], revisions["v2"]
    assert compare.main(["--interleave", v1, "HEAD", "--op", "moe", "--quick", "--out", str(out)]) == 0
    turns = _turns(tmp_path)
    assert [(version, int(r)) for version, r, *_ in turns] == [
        ("v1", 1), ("v2", 1), ("v2", 2), ("v1", 2), ("v1", 3), ("v2", 3)]
    files = {version: {path for v, _, path, *_ in turns if v == version} for version in ("v1", "v2")}
    for paths in files.values():  # each turn ran its revision's own file, in a worktree, not in repo
        (path,) = paths
        assert path.endswith(os.path.join("bench", "sweep.py")) and not path.startswith(str(repo.resolve()))
    assert files["v1"] != files["v2"]
    assert {(threads, quick) for *_, threads, quick in turns} == {("1", "True")}  # --threads 1 by default
    printed = capsys.readouterr().out
    assert printed.index("round 1/3: A") < printed.index("round 1/3: B") < printed.index("round 2/3: B") \
        < printed.index("round 2/3: A")
    assert f"  A ({v1}): " in printed and " s, 2 rows" in printed and "interleaved" in printed

    written = pd.read_csv(out / f"interleaved_{v1}_vs_{v2}.csv", keep_default_na=False, na_values=[""],
                          dtype={"base_commit": str, "new_commit": str})  # a hash may be all digits
    by = written.set_index("shape")
    # v1's N=1: medians 10, 12, 11 -> 11; p20 = min(p20 of the medians 10.4, median of the p20s 10) = 10;
    # p80 = max(p80 of the medians 11.6, median of the p80s 12) = 12.
    assert by.loc["N=1", ["base_median_ms", "base_p20_ms", "base_p80_ms"]].tolist() == pytest.approx([11, 10, 12])
    assert by.loc["N=1", ["new_median_ms", "new_p20_ms", "new_p80_ms"]].tolist() == pytest.approx([5, 4, 6])
    assert by.loc["N=1", ["ratio", "ratio_low", "ratio_high"]].tolist() == pytest.approx([5 / 11, 4 / 12, 6 / 10])
    assert by.loc["N=1", "verdict"] == "faster" and by.loc["N=2", "verdict"] == "within noise"
    assert by.loc["N=1", "base_samples"] == 15 and by.loc["N=1", "base_rounds"] == 3
    assert by.loc["N=3", "verdict"] == "only in new"
    assert by.loc["N=1", "base_commit"] == v1 and by.loc["N=1", "new_commit"] == v2
    md = (out / f"interleaved_{v1}_vs_{v2}.md").read_text()
    assert "# bench.compare, interleaved:" in md and "turns A B | B A | A B" in md
    assert (out / f"interleaved_{v1}_vs_{v2}.png").is_file()
    assert _clean(repo, tmp_path)


def test_interleave_passes_shapes_through(repo, tmp_path, revisions, capsys):
    out = tmp_path / "out"
    argv = ["--interleave", revisions["v1"], revisions["v2"], "--op", "moe", "--rounds", "2", "--threads", "2",
            "--shape", "N=2", "N=3", "--out", str(out)]
    assert compare.main(argv) == 0
    assert [turn[0] for turn in _turns(tmp_path)] == ["v1", "v2", "v2", "v1"]
    assert {turn[3] for turn in _turns(tmp_path)} == {"2"}
    written = pd.read_csv(out / f"interleaved_{revisions['v1']}_vs_{revisions['v2']}.csv")
    verdicts = sorted(zip(written["shape"], written["verdict"], strict=True))
    assert verdicts == [("N=2", "within noise"), ("N=3", "only in new")]
    assert _clean(repo, tmp_path)


def test_interleave_refuses_bad_revisions_and_missing_options(repo, tmp_path, revisions, capsys):
    out = tmp_path / "out"
    refused(["--interleave", "nosuch", revisions["v2"], "--op", "moe", "--out", str(out)], capsys,
            "--interleave nosuch: no such revision in", f"the recent commits {revisions['v2']}")
    assert _clean(repo, tmp_path)  # refused before any worktree was made

    argv = ["--interleave", revisions["v0"], revisions["v2"], "--op", "moe", "--shape", "N=1", "--out", str(out)]
    refused(argv, capsys, f"--shape: the bench.sweep of revision A ({revisions['v0']}, {revisions['v0']}) does not "
            "take it; valid: its options --backend, --device, --help, --no-report, --op, --out, --quick, --threads")
    assert _turns(tmp_path) == [] and not out.exists() and _clean(repo, tmp_path)


def test_interleave_refuses_a_sweep_that_imports_packages_from_elsewhere(repo, tmp_path, revisions, capsys):
    # A folder named like a package the sweep imports from elsewhere (here the standard library's json).
    (repo / "json").mkdir()
    (repo / "json" / "README").write_text("not a package\n")
    sweep = repo / "bench" / "sweep.py"
    sweep.write_text("import json\n" + sweep.read_text())
    shadowed = commit_all(repo, "v3: imports json, has a json folder")
    argv = ["--interleave", revisions["v2"], shadowed, "--op", "moe", "--out", str(tmp_path / "out")]
    refused(argv, capsys, "the sweep in its worktree imported packages from elsewhere: json from")
    assert _clean(repo, tmp_path)


def test_interleave_stops_at_a_failed_turn(repo, tmp_path, revisions, capsys):
    out = tmp_path / "out"
    assert compare.main(["--interleave", revisions["v1"], revisions["v2"], "--op", "broken", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"the sweep of revision A ({revisions['v1']}, {revisions['v1']}) in round 1 failed (exit 1): " \
        "RuntimeError: broken op" in err
    assert not out.exists() and _clean(repo, tmp_path)
    with pytest.raises(SystemExit) as raised:  # a sweep that refuses its arguments: bad input, after round 1's line
        compare.main(["--interleave", revisions["v1"], revisions["v2"], "--op", "nosuch", "--out", str(out)])
    printed, err = capsys.readouterr()
    assert raised.value.code == 2 and printed.startswith("round 1/3: A") and len(err.splitlines()) == 1
    assert err == (f"python -m bench.compare: error: --interleave: the sweep of revision A ({revisions['v1']}, "
                   f"{revisions['v1']}) refused: python -m bench.sweep: error: --op nosuch: no such op\n")
    assert not out.exists() and _clean(repo, tmp_path)


def test_interleave_cleans_up_on_ctrl_c(repo, tmp_path, revisions, capsys, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "read_rows", interrupted)  # as if Ctrl-C came at the end of the first turn
    out = tmp_path / "out"
    assert compare.main(["--interleave", revisions["v1"], revisions["v2"], "--op", "moe", "--out", str(out)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert len(_turns(tmp_path)) == 1 and not out.exists() and _clean(repo, tmp_path)


def test_cli_runs_as_a_module(tmp_path):
    base, new = _write_pair(tmp_path)
    argv = ["--base", str(base), "--new", str(new), "--out", str(tmp_path / "out")]
    done = subprocess.run([sys.executable, "-m", "bench.compare", *argv], capture_output=True, text=True,
                          cwd=Path(compare.__file__).parents[1], check=False)
    assert done.returncode == 0, done.stderr
    assert "geometric mean ratio" in done.stdout and (tmp_path / "out" / "base_vs_new.png").is_file()
