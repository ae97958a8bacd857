"""Bad input at the command line is refused before anything runs: exit status 2, one line on stderr that names
the argument and what would have been valid, no traceback, nothing written into the folders given.

Each CLI's `main(argv)` runs in-process; one subprocess per machine-dependent check that the environment
decides (the Triton interpreter) and per CLI for the whole path `python -m ...` (no traceback reaches stderr).
"""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernellab
from bench import cli

ROOT = Path(__file__).resolve().parent.parent


def refused(main, argv, capsys, *expected) -> str:
    """main(argv) exits 2 with one line on stderr (no traceback) containing every `expected` text, and prints
    nothing on stdout. Returns that line."""
    with pytest.raises(SystemExit) as raised:
        main(argv)
    out, err = capsys.readouterr()
    assert raised.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert out == "", out
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"
    return err


def empty(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine as one without a CUDA GPU, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


# ----------------------------------------------------------------------------------------- bench.cli

def test_backend_problem_names_registered_and_runnable():
    registered = kernellab.registry.registered("moe")
    here = kernellab.backends("moe", "cpu")
    problem = cli.backend_problem("moe", "nosuch", "cpu")
    assert "'nosuch'" in problem and all(name in problem for name in registered)
    assert problem.endswith(f"run here on cpu: {', '.join(here)})")
    assert cli.backend_problem("moe", "torch", "cpu", torch.float32) is None
    # the cuda backend runs on CUDA tensors only (and needs cupy): never on CPU tensors
    assert "backend 'cuda' of moe" in cli.backend_problem("moe", "cuda", "cpu")
    if "triton" in here:  # under TRITON_INTERPRET=1
        assert "not float64" in cli.backend_problem("moe", "triton", "cpu", torch.float64)
        assert "triton" not in cli.runnable("moe", "cpu", torch.float64)


def test_model_backends_run_every_op_they_name():
    from model.model import OPS

    names = cli.model_backends("cpu", torch.float32)
    assert "torch" in names and "reference" in names and "cuda" not in names
    for name in names:
        ops = [op for op in OPS if name in kernellab.registry.registered(op)]
        assert ops and all(name in kernellab.backends(op, "cpu") for op in ops)
    lab = cli.model_backends("cpu", torch.float32, peers=False)
    assert "transformers" in names and "transformers" not in lab
    assert "peer" in cli.model_backend_problem("transformers", "cpu", peers=False)


def test_check_device(monkeypatch, capsys):
    parser = cli.ArgumentParser(prog="prog")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for device in ("cpu", "cuda", "cuda:0"):
        assert cli.check_device(parser, "--device", device) == device
    refused(lambda argv: cli.check_device(parser, "--device", "cuda:1"), [], capsys,
            "--device cuda:1: no such GPU here", "valid here: cpu, cuda, cuda:0")
    refused(lambda argv: cli.check_device(parser, "--device", "mps"), [], capsys,
            "--device: unknown device 'mps'", "cpu, cuda")


def test_errors_are_one_line(capsys):
    parser = cli.ArgumentParser(prog="prog")
    refused(lambda argv: parser.error("two\nlines"), [], capsys, "prog: error: two lines")


# ----------------------------------------------------------------------------------------- every CLI

# (module, argv, texts the line must hold); OUT stands for a folder under tmp_path that must stay empty, TMP for
# tmp_path itself.
TRACE = ["--op", "moe", "--backend", "torch", "--device", "cpu", "--out", "OUT"]
REFUSALS = [
    ("bench.suites.model.run", ["--backend", "nosuch"], ["--backend", "'nosuch'", "the model runs here with: reference, torch"]),
    ("bench.suites.model.run", ["--backend", "transformers"], ["--backend", "peer", "torch"]),
    ("bench.suites.model.run", ["--backend", "torch", "--backend", "cuda"], ["--backend", "backend 'cuda'", "torch"]),
    ("bench.suites.model.run", ["--device", "mps"], ["argument --device", "'cpu', 'cuda'"]),
    ("bench.suites.model.run", ["--threads", "0"], ["argument --threads", ">= 1"]),
    ("model.generate", ["--checkpoint", "/nonexistent/ckpt"], ["argument --checkpoint", "no folder at /nonexistent"]),
    ("model.generate", ["--checkpoint", "TMP"], ["--checkpoint", "no config.json", "config.json and *.safetensors"]),
    ("model.generate", ["--backend", "nosuch"], ["--backend", "'nosuch'", "torch", "(or auto)"]),
    ("model.generate", ["--backend", "cuda"], ["--backend", "backend 'cuda'", "torch", "(or auto)"]),
    ("model.generate", ["--dtype", "int8"], ["argument --dtype", "'float32', 'bfloat16', 'float16'"]),
    ("model.generate", ["--device", "mps"], ["--device", "unknown device 'mps'", "cpu, cuda"]),
    ("model.generate", ["--prompt-len", "0"], ["argument --prompt-len", ">= 1"]),
    ("model.generate", ["--batch", "-2"], ["argument --batch", ">= 1"]),
    ("model.generate", ["--new-tokens", "-1"], ["argument --new-tokens", ">= 0"]),
    ("model.generate", ["--threads", "0"], ["argument --threads", ">= 1"]),
    ("model.generate", ["--prompt", ""], ["argument --prompt", "empty prompt"]),
    ("model.generate", ["--prompt", "  "], ["argument --prompt", "empty prompt"]),
    ("model.generate", ["--prompt-ids", ""], ["argument --prompt-ids", "empty prompt"]),
    ("model.generate", ["--prompt-ids", "1 -2"], ["argument --prompt-ids", ">= 0"]),
    ("model.generate", ["--prompt-ids", "1 x"], ["argument --prompt-ids", "token ids"]),
    ("model.generate", ["--prompt", "a", "--prompt-ids", "1"], ["--prompt-ids", "not both"]),
    ("model.generate", ["--temperature", "-1"], ["argument --temperature", ">= 0"]),
    ("model.generate", ["--temperature", "1", "--top-p", "1.5"], ["argument --top-p", "(0, 1]"]),
    ("model.generate", ["--temperature", "1", "--top-k", "0"], ["argument --top-k", ">= 1"]),
    ("model.generate", ["--top-k", "5"], ["--top-k/--top-p", "--temperature > 0"]),
    ("model.generate", ["--cuda-graph"], ["--cuda-graph", "needs --device cuda"]),
    ("model.generate", ["--tp", "0"], ["argument --tp", ">= 1"]),
    ("model.generate", ["--tp", "3"], ["--tp", "tp = 3 does not divide the 4 linear-attention value heads", "1, 2, 4"]),
    ("model.generate", ["--ep", "3"], ["--ep", "ep = 3 does not divide the 8 experts", "1, 2, 4, 8"]),
    ("model.generate", ["--tp", "2", "--ep", "4"], ["--tp/--ep", "need 4 processes", "torchrun --nproc-per-node 4"]),
    ("model.generate", ["--prompt-len", "5000"], ["--prompt-len 5000", "5016 positions", "the model's 4096",
                                                  "valid: --prompt-len 1 to 4080"]),
    ("model.generate", ["--seed", str(2**64)], ["argument --seed", "below 2**64"]),
    ("model.generate", ["--seed", "-1"], ["argument --seed", ">= 0"]),
    ("model.train", ["--checkpoint", "/nonexistent/ckpt"], ["argument --checkpoint", "no folder at /nonexistent"]),
    ("model.train", ["--checkpoint", "TMP"], ["--checkpoint", "no config.json", "config.json and *.safetensors"]),
    ("model.train", ["--backend", "nosuch"], ["--backend", "'nosuch'", "torch", "(or auto)"]),
    ("model.train", ["--backend", "numba"], ["--backend", "backend 'numba' has no backward for gated_delta_rule, moe",
                                             "trains here with: reference, torch", "(or auto)"]),
    ("model.train", ["--steps", "0"], ["argument --steps", ">= 1"]),
    ("model.train", ["--batch", "0"], ["argument --batch", ">= 1"]),
    ("model.train", ["--seq-len", "1"], ["--seq-len", ">= 2"]),
    ("model.train", ["--lr", "0"], ["argument --lr", "> 0"]),
    ("model.train", ["--lr", "fast"], ["argument --lr", "'fast'"]),
    ("model.train", ["--device", "mps"], ["--device", "unknown device 'mps'", "cpu, cuda"]),
    ("model.train", ["--threads", "0"], ["argument --threads", ">= 1"]),
    ("model.train", ["--seq-len", "100000"], ["--seq-len 100000", "max_position_embeddings 4096",
                                              "valid: 2 to 4096"]),
    ("model.train", ["--seed", str(2**64)], ["argument --seed", "below 2**64"]),
    ("model.train", ["--out", "TMP/file/below"], ["--out", "file is a file"]),
    ("bench.sweep", ["--op", "route", "--quick", "--threads", "100000"], ["--threads 100000", "cores",
                                                                          "os.sched_getaffinity"]),
    ("bench.sweep", ["--op", "route", "--quick", "--out", "TMP/file/below"], ["--out", "file is a file"]),
    ("bench.report", ["--out", "/nonexistent/reports"], ["argument --out", "no folder at /nonexistent"]),
    ("bench.report", ["--out", "TMP"], ["--out", "no results.csv in"]),
    ("bench.peers.transformers", ["--parts", "nosuch"], ["argument --parts", "'gdr', 'moe'"]),
    ("bench.peers.transformers", ["--repeats", "0"], ["argument --repeats", ">= 1"]),
    ("bench.gpu_check", ["--budget", "0"], ["argument --budget", "> 0"]),
    ("bench.gpu_check", ["--budget", "-5"], ["argument --budget", "> 0"]),
    ("bench.gpu_check", ["--budget", "20"], ["--budget 20", "parity tests", "valid: 50 s or more"]),
    ("bench.gpu_check", ["--budget", "20", "--skip-tests", "--op", "moe"], ["--budget 20", "a sweep", "50 s or more"]),
    ("bench.gpu_check", ["--op", "nosuch"], ["argument --op", "'gated_delta_rule'", "'moe'"]),
    ("profiling.static", ["--only", "nosuch"], ["--only 'nosuch'", "kernellab/triton/moe.py", "kernellab/cuda/"]),
    ("profiling.static", ["--workers", "0"], ["argument --workers", ">= 1"]),
    ("profiling.static", ["--cache", "/nonexistent/kernels.csv"], ["argument --cache", "no file at /nonexistent"]),
    ("profiling.trace", ["--op", "nosuch", "--backend", "torch"],
     ["argument --op", "'gated_delta_rule'", "'moe_gemm'"]),
    ("profiling.trace", ["--op", "moe", "--backend", "nosuch"], ["--backend", "moe has no backend 'nosuch'",
                                                                  "registered: reference",
                                                                  "run here on cpu float32: reference, torch"]),
    ("profiling.trace", ["--op", "moe", "--backend", "cuda"], ["--backend", "backend 'cuda' of moe", "on cpu float32"]),
    ("profiling.trace", [*TRACE, "--dtype", "int8"], ["argument --dtype", "'bfloat16'", "'float32'"]),
    ("profiling.trace", [*TRACE, "--shape", "X=1"], ["--shape", "X not a keyword of moe", "N, D, E, I"]),
    ("profiling.trace", [*TRACE, "--shape", "N"], ["--shape takes key=value, got 'N'"]),
    ("profiling.trace", [*TRACE, "--shape", "N=-1"], ["--shape N=-1", "negative dimension"]),
    ("profiling.trace", [*TRACE, "--op", "gated_delta_rule", "--shape", "Hk=3", "--shape", "Hv=4"],
     ["--shape Hk=3 Hv=4", "Hv % Hk != 0"]),
    ("profiling.trace", [*TRACE, "--shape", "routing=nosuch"], ["--shape routing=nosuch", "'uniform'"]),
    ("profiling.trace", [*TRACE, "--calls", "0"], ["argument --calls", ">= 1"]),
    ("profiling.trace", [*TRACE, "--warmup", "-1"], ["argument --warmup", ">= 0"]),
    ("profiling.trace", [*TRACE, "--rows", "0"], ["argument --rows", ">= 1"]),
    ("profiling.roofline", ["--csv", "OUT/missing.csv"], ["--csv", "no sweep CSV at", "present: "]),
]


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    """The cache folder model.generate writes its default checkpoint into, empty."""
    folder = tmp_path / "cache"
    folder.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder))
    return folder


def _main(module: str, argv: list[str], out: Path):
    """module's main, and argv with OUT and TMP replaced by `out` and its parent (--out OUT added where the CLI
    writes into a default folder otherwise, --device cpu for the trace)."""
    if module in ("bench.suites.model.run", "bench.gpu_check", "profiling.static", "profiling.trace", "model.train",
                  "bench.sweep") and "--out" not in argv:
        argv = [*argv, "--out", "OUT"]
    if module == "profiling.trace" and "--device" not in argv:
        argv = [*argv, "--device", "cpu"]
    folders = {"OUT": str(out), "TMP": str(out.parent)}

    def place(arg):
        head, sep, rest = arg.partition("/")
        return f"{folders[head]}{sep}{rest}" if head in folders else arg

    return importlib.import_module(module).main, [place(arg) for arg in argv]


@pytest.mark.parametrize("module, argv, expected", REFUSALS, ids=[f"{m} {' '.join(a)}" for m, a, _ in REFUSALS])
def test_refuses(module, argv, expected, tmp_path, cache_home, capsys):
    out = tmp_path / "out"
    (tmp_path / "file").write_text("a file, where a folder is needed")
    refused(*_main(module, argv, out), capsys, *expected)
    # no CSV, plot, trace, table or default checkpoint written (matplotlib, imported, may cache its fonts there)
    assert empty(out) and not [p for p in cache_home.iterdir() if p.name != "matplotlib"]


@pytest.mark.parametrize("module", ["bench.suites.model.run", "model.generate", "model.train", "profiling.trace"])
def test_refuses_cuda_without_gpu(module, no_gpu, tmp_path, cache_home, capsys):
    out = tmp_path / "out"
    argv = ["--device", "cuda"] + (["--op", "moe", "--backend", "torch"] if module == "profiling.trace" else [])
    refused(*_main(module, argv, out), capsys, "--device cuda: no CUDA GPU", "valid here: cpu")
    assert empty(out) and empty(cache_home)


@pytest.mark.parametrize("module", ["bench.suites.model.run", "bench.gpu_check", "profiling.static", "profiling.trace",
                                    "profiling.roofline", "model.train"])
def test_refuses_a_file_as_out(module, tmp_path, capsys):
    (tmp_path / "out").write_text("a file")
    argv = ["--op", "moe", "--backend", "torch"] if module == "profiling.trace" else []
    refused(*_main(module, [*argv, "--out", "OUT"], tmp_path / "out"), capsys, "argument --out", "is a file")


def test_generate_runs_with_the_smallest_arguments(tmp_path, cache_home, capsys):
    from model import generate

    checkpoint = generate.write_random_checkpoint(tmp_path / "ckpt")
    generate.main(["--checkpoint", str(checkpoint), "--backend", "torch", "--prompt-len", "3", "--new-tokens", "2"])
    out = capsys.readouterr().out
    assert "new tokens: [[" in out and "'gated_delta_rule': 'torch'" in out
    assert empty(cache_home)


def test_vs_transformers_refuses_a_part_whose_backends_cannot_run(monkeypatch, capsys):
    from bench.peers import transformers as vs_transformers

    # as on a machine where moe's second backend is missing: the cuda backend never runs on CPU tensors
    monkeypatch.setitem(vs_transformers.PART_BACKENDS, "moe", [("moe", "torch"), ("moe", "cuda")])
    monkeypatch.setattr(vs_transformers, "copy_gbps", lambda device: pytest.fail("measured before refusing"))
    refused(vs_transformers.main, ["--parts", "gdr", "moe"], capsys, "--parts moe", "backend 'cuda' of moe",
            "run here on cpu float32: ", "torch")


def test_gpu_check_shortest_budget_starts_the_tests():
    from bench import gpu_check

    assert gpu_check._starts_tests_or_a_sweep(50, ["moe"], False)
    assert not gpu_check._starts_tests_or_a_sweep(49.9, ["moe"], False)


def test_trace_refuses_a_dtype_the_backend_does_not_take(tmp_path, capsys):
    from profiling import trace

    if "triton" not in kernellab.backends("moe", "cpu"):
        pytest.skip("the triton backend runs on CPU only under TRITON_INTERPRET=1, which is not set here")
    refused(trace.main, ["--op", "moe", "--backend", "triton", "--dtype", "float64", "--device", "cpu", "--out",
                         str(tmp_path / "out")], capsys, "--backend", "not float64", "run here on cpu float64")
    assert empty(tmp_path / "out")


def test_roofline_refuses_csvs_without_what_it_plots(tmp_path, capsys):
    from profiling import roofline

    out = tmp_path / "out"
    sweep_csv = tmp_path / "results.csv"
    sweep_csv.write_text("op,backend,device,dtype,median_ms,flops,bytes\nmoe,torch,cpu,float32,1.0,1e6,1e6\n")
    refused(roofline.main, ["--csv", str(sweep_csv), "--device", "cuda", "--out", str(out)], capsys,
            "--device cuda", "no rows of it", "valid: cpu")
    (tmp_path / "empty.csv").write_text("")
    refused(roofline.main, ["--csv", str(tmp_path / "empty.csv"), "--out", str(out)], capsys,
            "--csv", "not a readable CSV")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    refused(roofline.main, ["--csv", str(tmp_path / "other.csv"), "--out", str(out)], capsys,
            "--csv", "not a sweep CSV")
    assert empty(out)


# ------------------------------------------------------------------------------ the whole command line

def _run(module: str, *argv, env=None):
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env, check=False)


@pytest.mark.parametrize("module, argv, expected", [
    ("bench.suites.model.run", ["--backend", "nosuch", "--out", "OUT"], "--backend"),
    ("model.generate", ["--checkpoint", "/nonexistent"], "--checkpoint"),
    ("model.train", ["--backend", "numba", "--out", "OUT"], "--backend"),
    ("profiling.trace", ["--op", "moe", "--backend", "nosuch", "--device", "cpu", "--out", "OUT"], "--backend"),
    ("profiling.roofline", ["--csv", "/nonexistent.csv", "--out", "OUT"], "--csv"),
])
def test_python_m_refuses_in_one_line(module, argv, expected, tmp_path):
    out = tmp_path / "out"
    result = _run(module, *(str(out) if arg == "OUT" else arg for arg in argv))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr and expected in lines[0], result.stderr
    assert result.stdout == "" and empty(out)


def test_generate_refuses_triton_on_cpu_without_the_interpreter(tmp_path):
    """Whether the triton backend runs on CPU tensors depends on TRITON_INTERPRET, set before anything starts."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NUMBA_ENABLE_CUDASIM")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    result = _run("model.generate", "--backend", "triton", "--device", "cpu", env=env)
    assert result.returncode == 2, result.stderr
    assert "--backend: backend 'triton' of" in result.stderr and "TRITON_INTERPRET" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert empty(tmp_path / "cache")


# ------------------------------------------------------------------------------------ bad checkpoints, divergence

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from model.generate import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "small", tokenizer=False)


def _damaged(checkpoint: Path, folder: Path, how: str) -> tuple[Path, str]:
    """A copy of checkpoint damaged `how`, and the text its refusal must hold."""
    import json
    import shutil

    shutil.copytree(checkpoint, folder)
    weights, config = folder / "model.safetensors", folder / "config.json"
    if how == "truncated safetensors":
        data = weights.read_bytes()
        weights.write_bytes(data[:len(data) * 2 // 3])
        return folder, f"{weights} is not a whole safetensors file"
    if how == "garbled safetensors":
        weights.write_bytes(b"\x00garbage" * 100)
        return folder, f"{weights} is not a whole safetensors file"
    if how == "invalid config.json":
        config.write_text(config.read_text()[:-20])
        return folder, f"{config} is not valid JSON"
    if how == "another model_type":
        config.write_text(json.dumps(json.loads(config.read_text()) | {"model_type": "llama"}))
        return folder, "model_type 'llama' is not a Qwen3.5-MoE model"
    if how == "a wrong shape":
        config.write_text(json.dumps(json.loads(config.read_text()) | {"hidden_size": 96}))
        return folder, "expected (512, 96) from config.json"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated safetensors", "garbled safetensors", "invalid config.json",
                                 "another model_type", "a wrong shape"])
@pytest.mark.parametrize("module", ["model.generate", "model.train"])
def test_a_bad_checkpoint_is_refused_before_any_work(module, how, checkpoint, tmp_path, cache_home, capsys):
    folder, says = _damaged(checkpoint, tmp_path / "bad", how)
    out = tmp_path / "out"
    main, argv = _main(module, ["--checkpoint", str(folder), "--backend", "torch"], out)
    refused(main, argv, capsys, "--checkpoint", says)
    assert empty(out) and empty(cache_home)


def test_training_that_diverges_stops_and_saves_nothing(checkpoint, tmp_path, capsys):
    from model import train

    out = tmp_path / "out"
    code = train.main(["--checkpoint", str(checkpoint), "--backend", "torch", "--lr", "1e30", "--steps", "4",
                       "--batch", "1", "--seq-len", "8", "--threads", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "training diverged" in err and "nothing saved" in err, err
    assert empty(out)
    # the same run at a sane rate trains and saves
    assert train.main(["--checkpoint", str(checkpoint), "--backend", "torch", "--lr", "1e-3", "--steps", "2",
                       "--batch", "1", "--seq-len", "8", "--threads", "1", "--out", str(out)]) == 0
    assert (out / "checkpoint" / "model.safetensors").is_file()


def test_report_refuses_a_damaged_csv_with_its_line(tmp_path, capsys):
    from bench import report

    (tmp_path / "results.csv").write_text("op,backend,median_ms\nmoe,torch,1.0\nmoe,torch,fast\n")
    refused(report.main, ["--out", str(tmp_path)], capsys, "--out", f"{tmp_path / 'results.csv'}:3:",
            "median_ms is 'fast', not a number")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]  # no plot, no README.md


def test_the_model_clis_import_no_bench():
    """model <- bench, never the reverse: the model's CLIs, refusing or checking backends, load no bench module."""
    code = ("import sys\nfrom model import generate, train\n"
            "for main in (generate.main, train.main):\n"
            "    try:\n        main(['--backend', 'nosuch'])\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'bench'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
