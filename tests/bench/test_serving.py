"""The serving sweep (bench/suites/serving/): what its timed calls compute, its ledger's bytes, its pieces and plan,
the model part's hook, its report and targets, at tiny sizes (no timing asserted)."""
import dataclasses
import sys
import types

import pandas as pd
import pytest
import torch

import kernellab
import model
from bench import report
from bench.ops import OPS
from bench.suites.model.floor import decode_step_bytes
from bench.suites.serving import report as serving_report, run as serving
from model.model import resolve_backends

TINY = serving.Grid((1, 2), (1, 4), (64,), 2, (2, 3), (1, 2), (128,), (64,), 0.001)


@pytest.mark.parametrize("backend", ["torch", "mkl"])
def test_pooled_and_gathered_steps_agree(backend):
    """The pooled step writes its rows of the pool in place as gather / scatter does, and leaves the other rows."""
    inputs = serving.token_inputs(2, 1, "cpu", seed=3)
    index = serving.scattered(2, 4, "cpu", seed=3)
    pools = [serving.pool_of(4, "cpu", seed=3) for _ in range(2)]
    before = pools[0].clone()
    pooled, _ = serving.decode_calls(kernellab.get("gated_delta_rule", backend), inputs, pools[0], index)
    _, gathered = serving.decode_calls(kernellab.get("gated_delta_rule", backend), inputs, pools[1], index)
    pooled(), gathered()
    torch.testing.assert_close(pools[0], pools[1], rtol=1e-6, atol=1e-6)
    untouched = [r for r in range(4) if r not in index.tolist()]
    assert torch.equal(pools[0][untouched], before[untouched]) and not torch.equal(pools[0], before)


@pytest.mark.parametrize("backend", ["torch", "mkl"])
def test_verify_then_commit_is_T_decode_steps(backend):
    """The timed verify + commit of all T tokens leaves the pool as T pooled decode steps do."""
    B, T = 2, 3
    tokens = serving.token_inputs(B, T, "cpu", seed=4)
    index = serving.scattered(B, 2 * B, "cpu", seed=4)
    pools = [serving.pool_of(2 * B, "cpu", seed=4) for _ in range(2)]
    call = kernellab.get("gated_delta_rule", backend)
    serving.verify_call(call, tokens, pools[0], index, torch.full((B,), T, dtype=torch.int32))()
    singles = [{k: v[:, t:t + 1].contiguous() if isinstance(v, torch.Tensor) else v for k, v in tokens.items()}
               for t in range(T)]
    serving.steps_call(call, singles, pools[1], index, T)()
    torch.testing.assert_close(pools[0], pools[1], rtol=1e-5, atol=1e-6)


def test_ledger_bytes_are_the_model_floors():
    """At batch 1 the ledger's parts are decode_step_bytes' (states split into recurrent and conv); experts grow
    with the batch to all of them at most; the recurrent state is B times its batch-1 bytes."""
    cfg = model.ModelConfig()
    with torch.device("meta"):
        m = model.Qwen35Moe(cfg, resolve_backends("reference", "cpu")).to(torch.bfloat16)
    parts = decode_step_bytes(m, 64)
    one = serving.step_bytes(cfg, dict(parts, dtype_bytes=2, kv={64: parts["kv"]}), 1, 64)
    assert one["weights_bytes"] == parts["weights"] and one["experts_bytes"] == parts["experts"]
    assert one["state_bytes"] + one["conv_bytes"] == parts["states"] and one["kv_bytes"] == parts["kv"]
    assert one["state_bytes"] == 2 * 30 * serving.STATE_BYTES  # 30 linear layers' float32 states, read and written
    many = serving.step_bytes(cfg, dict(parts, dtype_bytes=2, kv={64: parts["kv"]}), 64, 64)
    assert one["experts_bytes"] < many["experts_bytes"] <= parts["experts"] * cfg.num_experts // 8
    assert many["state_bytes"] == 64 * one["state_bytes"]


def test_a_backend_without_the_keyword_gets_an_error_row():
    """A lab backend that does not declare a part's keyword is not called: its row says which keyword."""
    lacking = next(n for n, b in kernellab.registry.registered("gated_delta_rule").items()
                   if "state_indices" not in b.serving)
    row = serving._timed({}, lacking, ("state_indices",), lambda: 1 / 0, "cpu", 0.001, 1)
    assert "state_indices" in row["error"] and "median_ms" not in row


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(serving.GRIDS, True, TINY)
    monkeypatch.setattr(serving, "LEDGER_MAX_BYTES", 2**20)
    monkeypatch.setattr(serving, "bandwidth", lambda device, nbytes, budget_s: (10.0, 20.0))  # not measured here


def test_the_sweep_makes_every_part_and_resumes(tiny, tmp_path, capsys, monkeypatch):
    """Every part's rows, keys told apart (bench.suites.pieces refuses repeats), the plan printed first; a resumed
    run skips the pieces done; the plots drawn. (The model part left out: the next tests.)"""
    monkeypatch.setattr(serving.importlib.util, "find_spec", lambda name: None)
    rows = serving.sweep(quick=True, out=tmp_path, backends=["torch"])
    printed = capsys.readouterr().out
    assert printed.startswith("serving sweep on cpu") and "model_part does not exist" in printed
    phases = {r["phase"] for r in rows}
    assert phases == {"ledger", "pooled", "gather", "verify", "steps", "prefix"}
    assert not [r for r in rows if r.get("error")]
    assert len({(r["backend"], r["shape"]) for r in rows}) == len(rows)
    assert {(r["T"], r["every"]) for r in rows if r["phase"] == "prefix"} == {(128, 0), (128, 64)}
    assert all(r["floor_ms"] > 0 and r["x_floor"] > 0 for r in rows if r["phase"] != "ledger")
    assert {p.name for p in tmp_path.glob("serving_*.png")} == {"serving_ledger.png", "serving_decode.png",
                                                                 "serving_verify.png", "serving_prefix.png"}
    done = {r["piece"] for r in rows} - {"prefix T=128"}
    again = serving.sweep(quick=True, out=tmp_path, backends=["torch"], done=done)
    assert {r["piece"] for r in again} == {"prefix T=128"}


def test_the_model_part_runs_where_its_module_exists(tiny, tmp_path, monkeypatch):
    """With bench.suites.serving.model_part present, its model_rows runs once per backend, as a piece of its own."""
    calls = []
    part = types.ModuleType(serving.MODEL_PART)
    part.model_rows = lambda quick, device, backend: calls.append(backend) or [
        dict(op="serving", phase="speculative", backend=backend, device=device, dtype="float32",
             shape=f"model,phase=speculative,{backend}", tokens_per_s=1.0)]
    monkeypatch.setitem(sys.modules, serving.MODEL_PART, part)
    monkeypatch.setattr(serving.importlib.util, "find_spec", lambda name: object())
    rows = serving.sweep(quick=True, out=tmp_path, backends=["torch"], done={label for label, *_ in serving.plan(
        True, "cpu", ["torch"]) if not label.startswith("model")})
    assert calls == ["torch"] and [r["piece"] for r in rows] == ["model torch"]
    assert any(line.startswith("model part") for line in serving_report.summary(rows))


def test_the_model_part_decodes_as_plain_decoding():
    """The model part on the small checkpoint (quick sizes): speculative decoding and a prefix-cache hit, each beside
    its baseline, with outputs equal to plain decoding (no error row), drafts accepted and a prefix reused."""
    from bench.suites.serving import model_part

    rows = model_part.model_rows(True, "cpu", "torch")
    assert [r["phase"] for r in rows] == ["plain_decode", "speculative", "prefill_first", "prefill_hit"]
    assert not [r for r in rows if r.get("error")] and all(r["median_ms"] > 0 for r in rows)
    assert rows[1]["accepted"] > 0 and rows[3]["reused"] > 0
    assert len({r["shape"] for r in rows}) == 4


def test_targets_read_a_backend_against_itself():
    """The speedup and cost targets: each backend's rows against its own, the best backend's verdict."""
    spec = OPS["serving"]
    rows = [dict(phase="pooled", B=64, median_ms=1.0, backend="torch"), dict(phase="gather", B=64, median_ms=1.5,
            backend="torch"), dict(phase="pooled", B=64, median_ms=1.0, backend="mkl"),
            dict(phase="gather", B=64, median_ms=1.1, backend="mkl"),
            dict(phase="verify", T=4, median_ms=3.0, backend="torch"), dict(phase="steps", k=1, median_ms=1.0,
                                                                           backend="torch")]
    frame = pd.DataFrame([dict(r, op="serving", peer=False, error="", **{"pass": "forward"}) for r in rows])
    verify, pooled = spec.targets[:2]
    said = " ".join(report.target_lines(frame, spec, pooled, {}, None))
    assert "**1.50x**" in said and said.endswith("met.") and "not met" not in said and "`mkl` 1.10x" in said
    said = " ".join(report.target_lines(frame, spec, verify, {}, None))
    assert "**3.00x**" in said and said.endswith("not met.")
    assert "Not measured" in report.target_lines(frame[frame["phase"] != "gather"], spec, pooled, {}, None)[0]


def test_the_sweep_cli_takes_the_op(monkeypatch, tmp_path):
    """python -m bench.sweep --op serving runs the suite alone, with the backends asked for."""
    from bench import sweep

    seen = {}
    suite = types.SimpleNamespace(run=types.SimpleNamespace(sweep=lambda **kw: seen.update(kw) or []))
    monkeypatch.setitem(OPS, "serving", dataclasses.replace(OPS["serving"], sweep=suite))
    monkeypatch.setattr(sweep.timing, "ceilings", lambda device, dtypes: dict(
        device_name="cpu", matmul_tflops={}, copy_gbps=1.0, threads=1))
    monkeypatch.setattr(sweep, "save_ceilings", lambda out, ceil: None)
    sweep.main(["--op", "serving", "--backend", "torch", "--quick", "--out", str(tmp_path), "--no-report"])
    assert seen["backends"] == ["torch"] and seen["quick"]
