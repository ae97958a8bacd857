"""The benchmark harness on tiny cases: CSV schema, keyed append, the correctness gate, the cost model, plots."""
import json
import math

import pandas as pd
import pytest
import torch

import kernellab
from bench import check, gpu_check, plots, report, results, sweep, timing
from bench.ops import OPS, PASSES, Case, make
from bench.ops.attention import attention_backward_cost, attention_cost
from bench.ops.gated_delta_rule import gated_delta_rule_backward_cost, gated_delta_rule_cost
from bench.ops.moe import grouped_gemm_backward_cost, grouped_gemm_cost, moe_backward_cost, moe_cost
from kernellab.registry import Backend

CEILINGS = {"device_name": "test cpu", "threads": 1, "matmul_tflops": {"float32": 0.1}, "copy_gbps": 20.0}
# A tiny case of every registry op: its family file's (OpSpec.tiny)
TINY = {name: Case(name, spec.tiny) for name, spec in OPS.items() if spec.registry}


def wrong_moe(x, weights, ids, w_gate_up, w_down):
    """A deliberately wrong MoE layer: ignores the routing weights."""
    from reference.moe import moe

    return moe(x, torch.ones_like(weights), ids, w_gate_up, w_down)


def exploding_moe(x, weights, ids, w_gate_up, w_down):
    raise RuntimeError("out of memory (simulated)")


@pytest.fixture
def fake_backends(monkeypatch):
    """Registers two fake moe backends (wrong output, raising) in the registry's table for this test."""
    table = {op: dict(backends) for op, backends in kernellab.registry._table().items()}
    table["moe"]["wrong"] = Backend("moe", "wrong", "tests.bench.test_bench:wrong_moe", ("cpu",))
    table["moe"]["exploding"] = Backend("moe", "exploding", "tests.bench.test_bench:exploding_moe", ("cpu",))
    monkeypatch.setattr(kernellab.registry, "_table", lambda: table)
    return table


def _tiny_sweep(monkeypatch, op, backends, case=None, passes=("forward",)):
    case = case or TINY[op]
    monkeypatch.setattr(sweep, "planned", lambda *a, **k: [case])
    return sweep.sweep(op, "cpu", (torch.float32,), quick=True, wanted=backends, budget_s=0.01,
                       ceil=CEILINGS, progress=False, passes=passes)


def test_gate_records_wrong_and_raising_backends_and_goes_on(monkeypatch, fake_backends):
    rows = {r["backend"]: r for r in _tiny_sweep(monkeypatch, "moe", ["reference", "wrong", "exploding", "torch"])}
    assert set(rows) == {"reference", "wrong", "exploding", "torch"}
    assert rows["wrong"]["error"].startswith("parity vs reference: rel_err")
    assert rows["wrong"]["rel_err"] > 1e-3 and "median_ms" not in rows["wrong"]
    assert rows["exploding"]["error"] == "RuntimeError: out of memory (simulated)"
    torch_row = rows["torch"]
    if not torch_row["error"]:  # the torch backend is someone else's: if it fails, its error is in its row
        assert torch_row["rel_err"] <= 5e-5 and torch_row["median_ms"] > 0
    frame = results.add_speedups(results.ordered(pd.DataFrame(list(rows.values()))))
    by_backend = frame.set_index("backend")
    assert math.isnan(by_backend.loc["wrong", "speedup_vs_reference"])
    assert math.isnan(by_backend.loc["exploding", "speedup_vs_reference"])


def test_unavailable_backend_is_a_row(monkeypatch):
    rows = _tiny_sweep(monkeypatch, "attention", ["no_such_backend"])
    assert rows[0]["error"].startswith("BackendUnavailable")


def test_row_metrics_and_schema(monkeypatch, tmp_path):
    rows = _tiny_sweep(monkeypatch, "gated_delta_rule", ["reference"])
    (row,) = rows
    assert row["checked_against"].startswith("(is the yardstick")
    flops, nbytes = row["flops"], row["bytes"]
    floor = max(flops / 0.1e12, nbytes / 20e9)
    assert row["roofline_fraction"] == pytest.approx(floor / (row["median_ms"] * 1e-3))
    assert row["tflops"] == pytest.approx(flops / (row["median_ms"] * 1e-3) / 1e12)
    frame = results.merge(tmp_path / "results.csv", rows)
    required = ["op", "backend", "device", "dtype", "shape", "pass", "B", "T", "Hk", "Hv", "K", "V", "median_ms", "p20_ms",
                "p80_ms", "flops", "bytes", "tflops", "gbps", "peak_tflops", "peak_gbps", "roofline_fraction",
                "rel_err", "error", "speedup_vs_reference", "threads", "torch_version", "commit", "timestamp",
                "device_name"]
    written = pd.read_csv(tmp_path / "results.csv")
    assert set(required) <= set(written.columns)
    assert list(written.columns) == list(frame.columns)
    assert written.loc[0, "shape"] == "B=1,T=40,seqs=2,Hk=1,Hv=2,K=16,V=16,mode=chunk"


def _row(backend, shape, median, op="moe", peer=False, error=""):
    return dict(op=op, backend=backend, shape=shape, dtype="float32", device="cpu", median_ms=median, peer=peer,
                error=error, device_name="test cpu")


def test_keyed_append_replaces_own_rows_only(tmp_path):
    path = tmp_path / "results.csv"
    results.merge(path, [_row("reference", "N=1", 10.0), _row("torch", "N=1", 2.0), _row("torch", "N=2", 4.0),
                       _row("transformers", "N=1", 5.0, peer=True)])
    frame = results.merge(path, [_row("torch", "N=1", 1.0), _row("torch", "N=3", 3.0)])
    assert len(frame) == 5
    torch_rows = frame[frame["backend"] == "torch"].set_index("shape")
    assert torch_rows.loc["N=1", "median_ms"] == 1.0 and torch_rows.loc["N=2", "median_ms"] == 4.0
    assert torch_rows.loc["N=1", "speedup_vs_reference"] == pytest.approx(10.0)
    assert torch_rows.loc["N=1", "speedup_vs_transformers"] == pytest.approx(5.0)
    assert torch_rows.loc["N=1", "best_peer"] == "transformers"
    assert math.isnan(torch_rows.loc["N=3", "speedup_vs_reference"])
    # another device's CSV row in the same file survives, and a failed rerun loses its speedup
    frame = results.merge(path, [dict(_row("torch", "N=1", 9.0), device="cuda"),
                               _row("torch", "N=1", math.nan, error="parity vs reference: rel_err 1e-1")])
    assert len(frame) == 6
    failed = frame[(frame["backend"] == "torch") & (frame["shape"] == "N=1") & (frame["device"] == "cpu")]
    assert failed["error"].iloc[0].startswith("parity") and math.isnan(failed["speedup_vs_reference"].iloc[0])


def test_cost_model():
    gdr = make("gated_delta_rule", B=1, T=128, Hk=1, Hv=2, K=128, V=128, initial_state=True)
    flops, nbytes = gated_delta_rule_cost(gdr | {"mode": "chunk"})
    assert flops == 128 * 2 * 9.5 * 128**2  # ANCHORS.md: 9.5 d^2 per token per head at d = 128, chunk 64
    state = 2 * 128 * 128 * 4
    inputs_bytes = 4 * 128 * (2 * 128 + 2 * 128 + 2 * 2)  # q, k, v, g, beta in float32
    assert nbytes == inputs_bytes + 4 * 128 * 2 * 128 + 2 * state  # + o, + initial and final state
    att = make("attention", B=1, T=4, Hq=1, Hkv=1, D=8)
    assert attention_cost(att)[0] == 4 * 8 * (1 + 2 + 3 + 4)
    moe = make("moe", N=1, D=16, E=8, I=4, top_k=2)
    flops, nbytes = moe_cost(moe)
    assert flops == 2 * (6 * 16 * 4 + 5 * 4 + 2 * 16)
    assert nbytes >= 2 * 3 * 4 * 16 * 4  # the two active experts' weights
    gg = make("grouped_gemm", N=4, E=3, top_k=1, K=8, Nout=6)
    active = int((gg["offsets"][1:] > gg["offsets"][:-1]).sum())
    assert grouped_gemm_cost(gg) == (2 * 4 * 8 * 6, 4 * (4 * 8 + active * 6 * 8 + 4 * 6) + 4 * 4)


def test_compare_catches_unwritten_and_wrong_indices():
    ref = torch.randn(3, 4, dtype=torch.float64)
    assert check.compare(ref.float(), ref)[1] == ""
    bad = ref.clone()
    bad[1, 2] = float("nan")
    assert "non-finite" in check.compare(bad, ref)[1]
    p = kernellab.Permutation(ref, torch.tensor([0, 2, 3], dtype=torch.int32), torch.tensor([0, 1, 2]), 3, 1)
    q = kernellab.Permutation(ref, torch.tensor([0, 1, 3], dtype=torch.int32), torch.tensor([0, 1, 2]), 3, 1)
    assert "offsets differs" in check.compare(q, p)[1]


def test_timer_and_ceilings(monkeypatch):
    events = []
    monkeypatch.setattr(timing, "flush_cpu_caches", lambda: events.append("flush"))
    measured = timing.time_cpu(lambda: events.append("call"), budget_s=0.01, min_repeats=5)
    assert measured.repeats >= 5 and measured.p20_ms <= measured.median_ms <= measured.p80_ms
    assert events == ["call"] + ["flush", "call"] * measured.repeats, "warm-up, then a flush before each timed call"
    assert timing.last_level_cache_bytes() > 0
    ceil = timing.ceilings("cpu", [torch.float32], budget_s=0.01)
    assert ceil["matmul_tflops"]["float32"] > 0 and ceil["copy_gbps"] > 0


@pytest.mark.parametrize("op", [name for name, spec in OPS.items() if spec.registry])
def test_every_op_has_quick_cases_with_all_axes(op):
    axes = OPS[op].axes
    found = OPS[op].cases("cpu", quick=True)
    assert found and all(set(c.shape) == set(axes) for c in found), op
    assert len({c.key for c in found}) == len(found)
    varied = {a for a in axes if len({c.shape[a] for c in found}) > 1}
    assert varied >= set(axes) - {"V", "Hkv", "Hk", "mode", "seqs"} - ({"H"} if op != "linear_attention" else set()), op


def test_plots_and_report_from_csv(tmp_path):
    rows = []
    for T in (256, 512, 1024):
        rows += [dict(_row("torch", f"T={T}", T / 100, op="gated_delta_rule"), B=1, T=T, seqs=1, Hk=2, Hv=4, K=128,
                      V=128, mode="chunk", p20_ms=T / 110, p80_ms=T / 90, flops=1e9, bytes=1e6, tflops=0.1, gbps=1.0,
                      peak_tflops=0.1, peak_gbps=20.0, roofline_fraction=0.5, bound="compute", floor_ms=1.0),
                 dict(_row("torch", f"T={T}", T * T / 5e4, op="attention"), B=1, T=T, Hq=4, Hkv=2, D=128,
                      p20_ms=1.0, p80_ms=2.0, flops=1e9, bytes=1e6, tflops=0.1, gbps=1.0, peak_tflops=0.1,
                      peak_gbps=20.0, roofline_fraction=0.2, bound="compute", floor_ms=1.0)]
    results.merge(tmp_path / "results.csv", rows)
    found = plots.linear_vs_quadratic(plots.load(tmp_path / "results.csv"))
    assert found["crossover"][("gated_delta_rule", "lab")] == 512  # 5.12 <= 5.24 ms at 512, 2.56 > 1.31 at 256
    readme = report.write(tmp_path, "cpu")
    assert (tmp_path / "linear_vs_quadratic.png").stat().st_size > 0
    assert (tmp_path / "gated_delta_rule_T.png").exists() and (tmp_path / "attention_roofline.png").exists()
    text = readme.read_text()
    assert "## gated_delta_rule" in text and "Where the time goes" in text and "FlashQLA" in text
    # a contents list and the scoreboard open the report; the raw rows are folded
    assert text.index("## Contents") < text.index("## Scoreboard") < text.index("## Measured ceilings")
    assert "- [Scoreboard](#scoreboard)" in text and "- [gated_delta_rule](#gated_delta_rule)" in text
    board = text.split("## Scoreboard")[1].split("\n## ")[0]
    assert "| [gated_delta_rule](#gated_delta_rule) | `torch` (3 of 3 shapes) |  | 50% | " in board
    assert "met: T = 512 (from T <= 1024)" in board  # the crossover target with its number
    assert "<details>\n<summary>The 3 rows of gated_delta_rule</summary>" in text


def _host_rows(name, Ts=(256, 512, 1024), B=1, quick=None):
    more = {} if quick is None else dict(quick=quick)
    return [dict(_row("torch", f"B={B},T={T}", T / 100, op="gated_delta_rule"), device_name=name, B=B, T=T, seqs=1,
                 Hk=2, Hv=4, K=128, V=128, mode="chunk", p20_ms=T / 110, p80_ms=T / 90, flops=1e9, bytes=1e6,
                 tflops=0.1, gbps=1.0, **more) for T in Ts]


def test_plot_files_say_what_they_hold_and_never_mix_hosts(tmp_path):
    """Two groups along T (B = 1 and B = 4) on two hosts: one file per host and B, named by them, no "_1"."""
    rows = [r for name in ("Intel(R) Xeon(R) Processor (1 threads)", "AMD EPYC family 25 model 17 (1 threads)")
            for B in (1, 4) for r in _host_rows(name, B=B)]
    plots.MAX_GROUPS_PER_AXIS, saved = 4, plots.MAX_GROUPS_PER_AXIS
    try:
        written = plots.plot_axis(pd.DataFrame(rows).assign(peer=False), "gated_delta_rule", "T", tmp_path)
    finally:
        plots.MAX_GROUPS_PER_AXIS = saved
    assert sorted(p.name for p in written) == sorted(
        f"gated_delta_rule_T_{host}-1threads_B{B}.png" for host in ("intel-xeon", "amd-epyc-family-25-model-17")
        for B in (1, 4))
    one = plots.plot_axis(pd.DataFrame(_host_rows("test cpu")).assign(peer=False), "gated_delta_rule", "T", tmp_path)
    assert [p.name for p in one] == ["gated_delta_rule_T.png"]  # one group: nothing to tell apart


def test_publish_writes_one_report_per_host_from_full_runs(tmp_path, capsys):
    """A run holding two hosts' rows (one under the old name "AMD EPYC") lands in two folders under
    reports/cpu/<host>/, each report from its own rows; a quick run, or a folder without results.csv, is refused
    naming it, and nothing is written; bench.report without --out or --publish refuses to guess."""
    run, root = tmp_path / "run", tmp_path / "reports"
    old_peer = dict(_row("transformers", "bench", 5.0, op="model"), device_name="AMD EPYC (1 threads)", phase="decode",
                    context=512, variant="hybrid")  # written before the model sweep marked its peers
    results.merge(run / "results.csv", _host_rows("Intel(R) Xeon(R) Processor (1 threads)") + _host_rows(
        "AMD EPYC (1 threads)", Ts=(128, 256, 512)) + [old_peer])
    (run / "ceilings.json").write_text(json.dumps([dict(CEILINGS, device_name="AMD EPYC (1 threads)",
                                                        timestamp="2026-12-01T00:00:00+00:00")]))
    readmes = report.publish([run], root)
    assert sorted(p.parent.name for p in readmes) == ["amd-epyc-family-not-recorded", "intel-xeon"]
    amd = root / "cpu" / "amd-epyc-family-not-recorded"
    frame = pd.read_csv(amd / "results.csv")
    assert set(frame["device_name"]) == {"AMD EPYC family not recorded (1 threads)"} and len(frame) == 4
    assert frame.loc[frame["op"] == "model", "peer"].tolist() == [True]
    assert json.loads((amd / "ceilings.json").read_text())[0]["device_name"] == frame["device_name"][0]
    assert not (root / "cpu" / "intel-xeon" / "ceilings.json").exists()  # no ceilings of that host in the run
    assert "# Benchmarks on cpu: AMD EPYC family not recorded (1 threads)" in (amd / "README.md").read_text()
    assert (amd / "gated_delta_rule_T.png").exists()

    quick = tmp_path / "quick"
    results.merge(quick / "results.csv", _host_rows("test cpu", quick=True))
    for runs, message in (([quick], f"{quick} holds rows of a quick run"), ([tmp_path / "none"], "no results.csv")):
        with pytest.raises(ValueError, match=message):
            report.publish(runs, root)
    assert not (root / "cpu" / "test").exists()
    with pytest.raises(SystemExit) as exit:
        report.main(["--device", "cpu"])
    assert exit.value.code == 2 and "--publish" in capsys.readouterr().err


def test_model_op_delegates_to_its_suite(monkeypatch, tmp_path):
    import dataclasses
    import types

    from bench.suites import pieces

    seen = {}

    def fake_sweep(quick, device, out, backends=None, on_rows=None, done=frozenset()):
        seen.update(quick=quick, device=device, out=out, done=done)
        return pieces([("prefill", lambda: [dict(op="model", backend="torch", device=device, dtype="float32",
                                                 shape="ctx=64,phase=prefill", median_ms=3.0, p20_ms=2.9, p80_ms=3.1,
                                                 phase="prefill")])], on_rows, done)

    suite = types.SimpleNamespace(run=types.SimpleNamespace(sweep=fake_sweep))
    monkeypatch.setitem(OPS, "model", dataclasses.replace(OPS["model"], sweep=suite))
    monkeypatch.setattr(timing, "ceilings", lambda device, dtypes, budget_s=0.5: CEILINGS)
    assert sweep.main(["--op", "model", "--quick", "--out", str(tmp_path), "--no-report"]) == 0
    assert seen == dict(quick=True, device="cpu", out=tmp_path, done=set())
    row = pd.read_csv(tmp_path / "results.csv").iloc[0]
    assert row["op"] == "model" and row["phase"] == "prefill" and row["device_name"] == "test cpu"
    assert row["piece"] == "prefill"


def test_several_ops_are_interleaved_by_sequence_length():
    plans = [OPS["attention"].cases("cpu", quick=True), OPS["gated_delta_rule"].cases("cpu", quick=True)]
    plan = sweep.interleaved(plans)
    assert len(plan) == sum(map(len, plans))
    first = [(case.op, case.shape["T"]) for case in plan[:4]]
    assert first == [("attention", 256), ("gated_delta_rule", 256), ("attention", 512), ("gated_delta_rule", 512)]


def test_the_declarations_are_the_registry_ops():
    assert {name for name, spec in OPS.items() if spec.registry} == set(kernellab.registry.OPS)
    for name, spec in OPS.items():
        assert set(spec.plot_axes) <= set(spec.axes) | {"heads", "dim"}, name
        assert all(set(columns) <= set(spec.axes) for columns in spec.plot_axes.values()), name
        # a sweep of its own matches its own columns (the model's phase, context, variant)
        columns = set(spec.axes) | {"dtype", "device", "preset", "pass", "backend"} | (set() if spec.registry else
                                                                           set(report.OWN_COLUMNS))
        for target in spec.targets:
            assert target.kind in ("ceiling", "floor", "peer", "crossover", "op", "speedup", "cost"), (name, target)
            assert set(target.match) | set(target.against) <= columns, (name, target)
            assert target.match.get("pass", "forward") in PASSES, (name, target)
        for anchor in spec.anchors:
            assert set(anchor.match) <= set(spec.axes) | {"dtype", "device", "preset", "pass"}, (name, anchor)
            assert anchor.match.get("pass", "forward") in PASSES, (name, anchor)
        if spec.registry:  # the family file's names: <op>_inputs, <op>_cost, <op>_backward_cost
            assert spec.maker is not None and spec.maker.__name__ == f"{name}_inputs", name
        if spec.registry and not name.endswith("_fp8"):  # differentiable (kernellab/autograd.py): a backward cost
            assert spec.cost.__name__ == f"{name}_cost", name
            assert spec.backward_cost is not None and spec.backward_cost.__name__ == f"{name}_backward_cost", name
        elif spec.registry:  # the fp8 ops are inference ops
            assert spec.backward_cost is None, name


@pytest.mark.parametrize("op", [name for name, spec in OPS.items() if spec.registry])
def test_every_declaration_makes_inputs_and_costs_them(op, seed):
    """The smallest quick case of each op: its inputs run through the reference, its cost is positive bytes, and
    the reference budget admits it."""
    spec = OPS[op]
    case = min(spec.cases("cpu", quick=True), key=lambda c: spec.gigabytes(c.shape, 4))
    args = spec.inputs(case, torch.float32, "cpu", seed)
    flops, nbytes = spec.cost(args | spec.call(case.shape))
    assert flops >= 0 and nbytes > 0
    assert spec.affordable(case.shape, True)
    kernellab.get(op, "reference")(**args, **spec.call(case.shape))


def test_no_module_of_the_harness_names_an_op():
    """What bench knows of an op is its declaration: the sweep, the report, the plots and gpu_check never branch
    on an op's name (a string literal equal to one)."""
    import ast

    names = set(OPS)
    for module in (sweep, report, plots, gpu_check):
        found = [node.value for node in ast.walk(ast.parse(open(module.__file__).read()))
                 if isinstance(node, ast.Constant) and node.value in names]
        assert not found, f"{module.__name__} names ops {found}"


@pytest.mark.parametrize("op", list(TINY))
def test_every_op_sweeps_its_tiny_case(monkeypatch, op):
    """Every registry op's family file is enough for a sweep: the reference its yardstick, torch checked and timed
    on each pass its declaration has, with its cost models."""
    passes = PASSES if OPS[op].backward_cost else ("forward",)
    rows = {(r["backend"], r["pass"]): r for r in _tiny_sweep(monkeypatch, op, ["reference", "torch"], passes=passes)}
    assert rows["reference", "forward"]["checked_against"].startswith("(is the yardstick")
    for which in passes:
        row = rows["torch", which]
        assert row["error"] == "" and row["rel_err"] <= 1e-5 and row["median_ms"] > 0, row
        assert row["bytes"] > 0 and row["shape"] == TINY[op].key, row


@pytest.mark.parametrize("argv, message", [
    (["--op", "moe", "--backend", "nosuch", "--quick"], "--backend nosuch: moe has no backend 'nosuch' (registered: reference, torch"),
    (["--op", "attention", "--backend", "mkl", "--quick"], "--backend mkl: attention has no backend 'mkl'"),
    (["--op", "moe", "--preset", "DeepSeek-V3"], "no shapes of moe for preset DeepSeek-V3"),
    (["--op", "moe", "--quick", "--shape", "N=3"], "--shape N=3: no such case of moe"),
    (["--op", "moe", "--quick", "--threads", "0"], "--threads: expected an integer >= 1"),
    (["--op", "model", "attention"], "--op model runs alone"),
    (["--op", "nosuch"], "invalid choice: 'nosuch'"),
    (["--op", "moe", "--device", "cuda"], "no CUDA GPU") if not torch.cuda.is_available() else
    (["--op", "moe", "--dtype", "float64"], "invalid choice"),
])
def test_sweep_refuses_bad_arguments_before_anything_runs(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(timing, "ceilings", lambda *a, **k: pytest.fail("measured ceilings for a refused run"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit:
        sweep.main(argv + ["--out", str(out)])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_renamed_op_is_said_and_runs_under_its_name(monkeypatch, capsys):
    args = sweep.parse(["--op", "moe_gemm", "--quick"])
    assert args.op == ["grouped_gemm"]
    assert "moe_gemm is called grouped_gemm now" in capsys.readouterr().err


def test_shape_filter_and_all(monkeypatch):
    args = sweep.parse(["--op", "all", "--quick"])
    assert set(args.op) == set(kernellab.registry.OPS)
    key = OPS["route"].cases("cpu", quick=True)[0].key
    assert [c.key for c in sweep.planned("route", "cpu", True, None, [key])] == [key]


def test_numbers_read_as_a_person_reads_them():
    assert report.fmt(4096.0) == "4,096" and report.fmt(12) == "12" and report.fmt(0.1234) == "0.123"
    assert report.fmt(1234.5) == "1,234" and report.fmt(3e-6) == "3.0e-06"
    assert report.fmt_bytes(4.19e6) == "4 MiB" and report.fmt_bytes(512) == "512 B"
    assert report.fmt_bytes(3 * 2**30) == "3 GiB"
    assert report.fmt_ms(0.0123) == "12.3 us" and report.fmt_ms(12.3) == "12.3 ms" and report.fmt_ms(4500) == "4.5 s"
    assert report.fmt_flops(0.116) == "116 GFLOP/s" and report.fmt_flops(650.6) == "651 TFLOP/s"


# ---- the model benchmark (bench/suites/model/, bench/peers/llama_cpp.py): its byte model, plots and skips ----

@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    from model.generate import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("m") / "c", tokenizer=False)


@pytest.fixture(scope="module")
def small_model(small_checkpoint):
    import model

    return model.from_pretrained(small_checkpoint, backend="torch")


def test_decode_step_bytes_count_every_weight_once(small_model):
    from bench.suites.model.floor import decode_step_bytes

    m, cfg = small_model, small_model.config
    parts = decode_step_bytes(m, 100)
    total = sum(p.numel() * 4 for p in m.parameters())
    experts = sum(p.numel() * 4 for name, p in m.named_parameters() if ".experts." in name)
    embedding = m.embed_tokens.weight.numel() * 4
    assert parts["experts"] == experts * cfg.num_experts_per_tok // cfg.num_experts
    assert parts["weights"] == total - experts - embedding + embedding // cfg.vocab_size  # one embedding row
    cache = m.new_cache(1, 100)
    linear = [s for s in cache.states if hasattr(s, "recurrent")]
    assert parts["states"] == 2 * sum(s.conv.nbytes + s.recurrent.nbytes for s in linear)  # read and written
    assert parts["kv"] == cache.nbytes() - parts["states"] // 2
    assert decode_step_bytes(m, 200)["kv"] == 2 * parts["kv"]


def _model_rows():
    rows = []
    for variant, kv in (("hybrid", 1), ("all_attention", 4)):
        for context in (512, 1024, 2048):
            for backend, peer, speed in (("torch", False, 1.0), ("transformers", True, 0.5)):
                ms = (10 + kv * context / 512) / speed
                rows += [dict(op="model", backend=backend, peer=peer, variant=variant, context=context,
                              phase="prefill", median_ms=context * (1 + kv / 4), tokens_per_s=1e3 / (1 + kv / 4),
                              error=""),
                         dict(op="model", backend=backend, peer=peer, variant=variant, context=context,
                              phase="decode", median_ms=ms, tokens_per_s=1e3 / ms, error="", weights_bytes=8e7,
                              experts_bytes=2e7, states_bytes=6e6 if variant == "hybrid" else 0,
                              kv_bytes=kv * context * 4096, step_bytes=1e8 + kv * context * 4096, floor_gbps=10.0,
                              floor_ms=(1e8 + kv * context * 4096) / 1e7, x_floor=ms / ((1e8 + kv * context * 4096) / 1e7))]
        rows.append(dict(op="model", backend="llama.cpp-f32", peer=True, variant=variant, error="not installed"))
    for backend, peer, parts in (("torch", False, (100, 200, 20)), ("mkl", False, (50, 100, 20)),
                                 ("transformers", True, (400, 1000, 40))):
        ms = sum(parts)
        rows.append(dict(op="model", backend=backend, peer=peer, variant="hybrid", context=2048, phase="train",
                         dtype="float32",
                         median_ms=ms, p20_ms=0.9 * ms, p80_ms=1.1 * ms, tokens_per_s=2048 / (ms / 1e3), error="",
                         **dict(zip(("forward_ms", "backward_ms", "optimizer_ms"), parts))))
    return rows


def test_model_plots_and_summary(tmp_path):
    from bench.suites.model import report as model_report

    rows = _model_rows()
    model_report.plot(rows, tmp_path)
    for name in ("model_tokens_per_s", "model_gap", "model_decode_floor", "model_cache_memory", "model_train"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    lines = model_report.summary(rows)
    assert "train at 2048: mkl 12047.1 tok/s, 170 ms per step (forward 50 + backward 100 + optimizer 20 ms)" in lines
    assert "train at 2048: mkl (the lab's fastest) = 8.47x transformers' tokens/s on the same checkpoint " \
           "(target: at least 5x at 2048 tokens)" in lines
    assert any(line.startswith("decode floor at 2048 (all_attention): torch") for line in lines)
    assert any("all-attention / hybrid = " in line for line in lines)
    assert any(line.startswith("llama.cpp-f32 (hybrid) skipped: not installed") for line in lines)
    assert not any("filled" in line for line in lines)  # rows of a sweep that prefilled every context
    filled = model_report.summary([dict(r, cache_fill="filled") if r.get("phase") == "decode" else r for r in rows])
    assert filled[0].startswith("decode steps timed on caches filled to each context (512 to 2048 tokens)")


def test_model_training_target_in_the_report(tmp_path):
    """The train rows meet the model's declared target in the report (ours / transformers' time per step), and the
    step's parts are columns of the model's table."""
    from bench.suites.model import report as model_report

    rows = [dict(r, shape="bench", device="cpu") for r in _model_rows() if r.get("phase") == "train"]
    model_report.plot(rows, tmp_path)  # the model's sweep draws its own PNGs; the report links them
    results.merge(tmp_path / "results.csv", [dict(r, peak_tflops=0.1, peak_gbps=20.0, device_name="test cpu")
                                           for r in rows])
    text = report.write(tmp_path, "cpu").read_text()
    target = text.split("### Model training")[1].split("\n### ")[0]
    assert "`mkl` 170 ms; `transformers` 1.44 s: **8.47x**: met." in target
    # the scoreboard: the fastest lab backend against the fastest peer on the same case, the target's verdict
    assert "| [model](#model) | `mkl` (1 of 1 shapes) | 8.47x |  | met: 8.47x (>= 5x); not measured (>= 1x); not " \
           "measured (>= 1x) |" in text  # the bf16 targets against vLLM's engine: no rows of theirs
    model_section = text.split("## model")[1]
    assert "| median | p20 | p80 | tokens/s | forward | backward | optimizer |" in model_section
    assert "| mkl | float32 | bench | hybrid | train | 2,048 | 170 ms |" in model_section
    assert "![model_train](model_train.png)" in model_section


def test_training_step_of_the_lab_and_transformers(small_checkpoint):
    """A tiny real train phase: the lab's torch backend and transformers, one sequence of 12 tokens of the small
    checkpoint, timed steps whose parts add up to about the step."""
    from bench.suites.model import measure

    with sweep.one_thread():
        for name in ("torch", "transformers"):
            (row,) = measure.measure_training(small_checkpoint, "hybrid", name, 12, "cpu", torch.float32, 0.05,
                                                  1)
            assert not row.get("error"), row
            assert row["phase"] == "train" and row["context"] == 12 and row["repeats"] >= 1
            assert row["peer"] == (name == "transformers")
            assert row["backends"] == ("" if name == "transformers" else
                                       "gated_delta_rule=torch;attention=torch;route=torch;moe=torch")
            assert row["tokens_per_s"] == pytest.approx(12 / (row["median_ms"] / 1e3))
            parts = [row[f"{part}_ms"] for part in ("forward", "backward", "optimizer")]
            assert min(parts) > 0 and 0.5 * row["median_ms"] < sum(parts) < 2 * row["median_ms"], row


def test_prefill_and_decode_rows_of_a_real_runner(small_checkpoint):
    """A tiny real prefill/decode run of the model sweep (CI leaves the sweep itself out): the lab's torch backend
    and transformers, a prefill row at one context, then decode rows on caches filled to two contexts (no prefill
    of them), tokens/s from their medians."""
    from bench.suites.model import measure

    with sweep.one_thread():
        for name in ("torch", "transformers"):
            rows = measure.measure_runner(small_checkpoint, "hybrid", name, (16,), (16, 40), "cpu", torch.float32,
                                          0.05, 1)
            assert [(r["context"], r["phase"]) for r in rows] == [(16, "prefill"), (16, "decode"), (40, "decode")], rows
            for row in rows:
                assert not row.get("error") and row["peer"] == (name == "transformers") and row["median_ms"] > 0
            assert [r.get("cache_fill") for r in rows[1:]] == ["filled", "filled"]
            prefill = rows[0]
            assert prefill["tokens_per_s"] == pytest.approx(16 / (prefill["median_ms"] / 1e3))
            assert rows[2]["tokens_per_s"] == pytest.approx(1 / (rows[2]["median_ms"] / 1e3))


def test_model_plan_prefills_the_twin_once_and_fits_the_budget(capsys):
    """The plan: every runner decodes on filled caches at every decode context but llama.cpp (after its prefills);
    the all-attention twin's prefill is run by the first lab backend alone (peers keep theirs); training at 2K for
    the trained runners; the full CPU sweep of three lab backends and three peers estimated under 20 minutes."""
    from bench.suites.model import config, run

    names, peers = ["torch", "mkl", "numba"], ["transformers", "llama.cpp-f32", "llama.cpp-q8_0"]
    jobs = run.plan(False, "cpu", names, peers, names + ["transformers"])
    measured = {(j.variant, j.name): j for j in jobs if j.kind == "measure"}
    assert set(measured) == {(v, n) for v in run.VARIANTS for n in names + peers}
    twin_prefills = [n for (v, n), j in measured.items() if v == "all_attention" and j.prefill]
    assert twin_prefills == ["torch"] + peers
    for (variant, name), job in measured.items():
        assert job.decode == (() if name.startswith("llama.cpp") else config.DECODE_CONTEXTS["cpu"])
        assert job.prefill in ((), config.PREFILL_CONTEXTS["cpu"])
        assert max(job.prefill, default=0) <= 8192  # no long prefill per context any more
    assert [(j.name, j.train) for j in jobs if j.kind == "train"] == [(n, 2048) for n in names + ["transformers"]]
    assert [j.variant for j in jobs if j.kind == "parity"] == list(run.VARIANTS)
    with sweep.one_thread():
        total = sum(run.estimate_s(j, "cpu", False) for j in jobs)
        text = run.describe(jobs, "cpu", False)
    assert 5 * 60 < total < 20 * 60, total
    assert text.splitlines()[0].startswith("model sweep on cpu, 1 thread(s): 18 processes, about ")
    assert "decode on caches filled to 512, 1K, 2K, 4K, 8K, 16K, 32K" in text
    assert "llama.cpp-f32 all_attention: prefill 512, 2K, 8K; decode after each prefill" in text


def test_llama_cpp_says_why_it_skips(monkeypatch, tmp_path):
    """Without llama-cpp-python, every runner of every checkpoint; and never the all-attention twin (llama.cpp
    aborts loading a qwen35moe checkpoint without linear-attention layers)."""
    from bench.peers import llama_cpp
    from model.generate import write_random_checkpoint

    layers = 4
    paths = {"hybrid": write_random_checkpoint(tmp_path / "hybrid", seed=0, tokenizer=False, vocab_size=64,
                                               num_hidden_layers=layers),
             "all_attention": write_random_checkpoint(tmp_path / "twin", seed=0, tokenizer=False, vocab_size=64,
                                                      num_hidden_layers=layers,
                                                      layer_types=["full_attention"] * layers)}
    monkeypatch.setattr(llama_cpp.importlib.util, "find_spec", lambda name: None)
    skipped = llama_cpp.prepare(paths)
    assert set(skipped) == {(variant, name) for variant in paths for name in llama_cpp.RUNNERS}
    assert all("llama-cpp-python is not installed" in why for (variant, _), why in skipped.items()
               if variant == "hybrid")
    assert all("without linear-attention layers" in why for (variant, _), why in skipped.items()
               if variant == "all_attention")


# ------------------------------------------------------------------------------------------- backward passes

def _wrong_backward(grads, x, weights, ids, w_gate_up, w_down):
    """A deliberately wrong backward: every gradient zero."""
    return {"x": torch.zeros_like(x), "weights": torch.zeros_like(weights), "w_gate_up": torch.zeros_like(w_gate_up),
            "w_down": torch.zeros_like(w_down)}


@pytest.mark.parametrize("op", ["gated_delta_rule", "moe", "attention"])
def test_backward_passes_are_rows_beside_the_forward(monkeypatch, op):
    """Each pass its row: forward for every backend, backward and forward+backward for those with a backward (not
    the reference, the gradients' yardstick), their gradients checked and their FLOPs from the backward model."""
    names = ["reference", "torch"] + (["numba"] if op != "attention" else [])
    rows = _tiny_sweep(monkeypatch, op, names, passes=PASSES)
    by = {(r["backend"], r["pass"]): r for r in rows}
    assert {key for key in by if key[1] != "forward"} == {("torch", "backward"), ("torch", "forward+backward")}
    assert {key[0] for key in by if key[1] == "forward"} == set(names)
    forward, backward, both = (by["torch", which] for which in PASSES)
    args = OPS[op].inputs(TINY[op], torch.float32, "cpu", sweep.seed_of(op, TINY[op].key)) | OPS[op].call(TINY[op].shape)
    assert (backward["flops"], backward["bytes"]) == OPS[op].backward_cost(args)
    assert both["flops"] == forward["flops"] + backward["flops"] and both["bytes"] == forward["bytes"] + backward["bytes"]
    for row in (backward, both):
        assert row["error"] == "" and row["checked_against"] == "reference", row
        assert row["rel_err"] <= 5e-5 and row["median_ms"] > 0 and row["shape"] == forward["shape"]


def test_a_wrong_backward_fails_the_gradient_gate(monkeypatch, fake_backends):
    fake_backends["moe"]["zero_grads"] = Backend("moe", "zero_grads", fake_backends["moe"]["torch"].target, ("cpu",),
                                                 backward="tests.bench.test_bench:_wrong_backward")
    (row,) = [r for r in _tiny_sweep(monkeypatch, "moe", ["zero_grads"], passes=("backward",))]
    assert row["pass"] == "backward" and row["error"].startswith("gradient parity vs reference: rel_err")
    assert "median_ms" not in row


def test_forward_rows_keep_their_key_beside_backward_rows(tmp_path):
    """A CSV written before the pass column: its rows are forward rows; backward rows of the same shape join them
    under their own key, and a rerun of a pass replaces that pass's rows only."""
    path = tmp_path / "results.csv"
    pd.DataFrame([_row("torch", "N=1", 2.0), _row("reference", "N=1", 10.0)]).to_csv(path, index=False)
    frame = results.merge(path, [dict(_row("torch", "N=1", 5.0), **{"pass": "backward"})])
    assert len(frame) == 3 and set(frame["pass"]) == {"forward", "backward"}
    forward = frame[(frame["backend"] == "torch") & (frame["pass"] == "forward")]
    assert forward["median_ms"].iloc[0] == 2.0 and forward["speedup_vs_reference"].iloc[0] == pytest.approx(5.0)
    backward = frame[frame["pass"] == "backward"]
    assert math.isnan(backward["speedup_vs_reference"].iloc[0])  # no reference row of that pass
    frame = results.merge(path, [dict(_row("torch", "N=1", 4.0), **{"pass": "backward"})])
    assert len(frame) == 3 and frame.loc[frame["pass"] == "backward", "median_ms"].iloc[0] == 4.0
    assert frame.loc[(frame["pass"] == "forward") & (frame["backend"] == "torch"), "median_ms"].iloc[0] == 2.0


def test_report_has_a_training_section(tmp_path):
    common = dict(B=1, T=512, seqs=1, Hk=2, Hv=4, K=128, V=128, mode="chunk", p20_ms=1.0, p80_ms=2.0, flops=1e9,
                  bytes=1e6, tflops=0.1, gbps=1.0, peak_tflops=0.1, peak_gbps=20.0, roofline_fraction=0.5,
                  bound="compute", floor_ms=1.0, rel_err=1e-7, checked_against="reference")
    rows = [dict(_row("torch", "T=512", 1.5, op="gated_delta_rule"), **common),
            dict(_row("torch", "T=512", 3.0, op="gated_delta_rule"), **common, **{"pass": "backward"}),
            dict(_row("transformers", "T=512", 30.0, op="gated_delta_rule", peer=True), **common,
                 **{"pass": "forward+backward"}),
            dict(_row("torch", "T=512", 6.0, op="gated_delta_rule"), **common, **{"pass": "forward+backward"})]
    results.merge(tmp_path / "results.csv", rows)
    text = report.write(tmp_path, "cpu").read_text()
    training = text.split("## Training: backward and forward+backward")[1].split("\n## ")[0]
    assert "FlashQLA 0.789 / fla 1.444" in training and "Backward FLOP model" in training
    assert "| torch | float32 | `T=512` | backward | 3 ms" in training and "2.00x" in training  # x its forward
    assert "5.00x (transformers)" in training  # forward+backward against the peer's forward+backward
    per_op = text.split("## gated_delta_rule")[1]
    assert "backward" not in per_op.split("|---|")[1].split("\n\n")[0]  # the op's own table: forward rows


@pytest.mark.parametrize("argv, message", [
    (["--op", "moe", "--quick", "--pass", "backward", "--backend", "numba"],
     "--backend numba: has no backward for moe; --pass backward times backends with a backward"),
    (["--op", "moe", "--quick", "--pass", "backward", "--backend", "reference"],
     "--backend reference: is the yardstick of the gradients"),
    (["--op", "model", "--pass", "backward"], "--op model has a sweep of its own, which takes no --pass"),
    (["--op", "moe", "--pass", "sideways"], "argument --pass: invalid choice: 'sideways'"),
])
def test_sweep_refuses_bad_passes(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(timing, "ceilings", lambda *a, **k: pytest.fail("measured ceilings for a refused run"))
    with pytest.raises(SystemExit) as exit:
        sweep.main(argv + ["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_backward_cost_models():
    gdr = make("gated_delta_rule", B=1, T=128, Hk=1, Hv=2, K=128, V=128, initial_state=True)
    flops, nbytes = gated_delta_rule_backward_cost(gdr | {"mode": "chunk"})
    assert flops == 128 * 2 * 25.5 * 128**2  # 16 d^2 + 64 (19 d) = 25.5 d^2 per token per head at d = 128
    forward_bytes = gated_delta_rule_cost(gdr | {"mode": "chunk"})[1]  # inputs, initial state, o, final state
    o, state = 4 * 128 * 2 * 128, 2 * 128 * 128 * 4
    # the inputs and the initial state read and their gradients written, do and the final state's gradient read
    assert nbytes == 2 * (forward_bytes - o - state) + o + state
    gg = make("grouped_gemm", N=4, E=3, top_k=1, K=8, Nout=6)
    assert grouped_gemm_backward_cost(gg)[0] == 2 * grouped_gemm_cost(gg)[0]  # dX and dW
    att = make("attention", B=1, T=4, Hq=1, Hkv=1, D=8)
    assert attention_backward_cost(att)[0] == 10 * 8 * (1 + 2 + 3 + 4)
    moe = make("moe", N=1, D=16, E=8, I=4, top_k=2)
    assert moe_backward_cost(moe)[0] == 2 * (16 * 16 * 4 + 10 * 4)


def test_report_shows_the_ceilings_of_the_run(tmp_path):
    """The report's ceilings come from the run's ceilings.json alone (tiny measured ones here): each GEMM's rate per
    dtype, the best of them, a GEMM that could not run or missed the tolerance said so, the physical peak with how it
    was obtained, and read / copy bandwidth per working-set size beside the rows whose working set sits there."""
    ceil = timing.ceilings("cpu", [torch.float32], budget_s=0.01, gemm_n=64, bandwidth_sizes=(2**16, 2**20))
    gemms = ceil["matmul"]["float32"]["gemms"]
    gemms["broken"] = {"error": "RuntimeError: not here"}
    gemms["sloppy"] = {"tflops": 1e3, "rel_err": 0.5}
    ceil["physical_peak"] = dict(ceil["physical_peak"], how="flags say so; clock 2.000 GHz from a test")
    sweep.save_ceilings(tmp_path, ceil)
    rows = [dict(_row("torch", f"T={T}", 1.0, op="gated_delta_rule"), device_name=ceil["device_name"], bytes=nbytes)
            for T, nbytes in ((1, 2**16), (2, 2**15), (3, 2**21))]
    text = "\n".join(report.ceilings_section(tmp_path, "cpu", pd.DataFrame(rows)))
    gemm_lines = text.split("### The GEMMs of")[1].split("###")[0]
    best = ceil["matmul"]["float32"]["best"]
    assert best and f"{report.fmt_flops(ceil['matmul_tflops']['float32'])} ({best})" in gemm_lines
    for name, found in gemms.items():
        assert f"`{name}`" in gemm_lines and ("error" in found or report.fmt_flops(found["tflops"]) in gemm_lines)
    assert "not run: RuntimeError: not here" in gemm_lines and "(rel err 0.5: not the dtype's GEMM)" in gemm_lines
    peak = ceil["physical_peak"]["tflops"]["float32"]
    assert report.fmt_flops(peak) in gemm_lines and report.fmt_share(ceil["matmul_tflops"]["float32"] / peak) in gemm_lines
    assert "How: flags say so; clock 2.000 GHz from a test." in text
    lines = text.split("### Bandwidth of")[1].splitlines()
    by_size = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ") and "GB/s" not in line}
    bandwidth = ceil["bandwidth"]
    assert by_size["64 KiB"] == f"| 64 KiB | {bandwidth['read_gbps'][0]:.1f} | {bandwidth['copy_gbps'][0]:.1f} | 2 |"
    assert by_size["1 MiB"].endswith(" | 1 |")
