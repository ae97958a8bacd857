"""The precision sweep (bench/suites/precision/): its yardstick, its pieces, its memory model, its answers, and the
sweep CLI and report around it, at tiny sizes."""
import math

import pandas as pd
import pytest
import torch

import kernellab
from bench import sweep
from bench.check import rel_err
from bench.suites.precision import report as precision_report, run as precision
from bench.suites.precision.run import Heads

TINY = Heads(1, 2, 16, 16)


def test_yardstick_is_the_reference_at_short_T():
    """The sweep's float64 yardstick (torch, token by token, a float64 state) against the reference's token loop:
    every gate, from a state, within float64's rounding."""
    narrow, wide = precision.piece_inputs(TINY, precision.GATES, 0, 160, torch.float32, "cpu", seed=1)
    state = torch.randn(len(precision.GATES), TINY.Hv, TINY.K, TINY.V, dtype=torch.float64)
    o, final = precision.yardstick(wide, state)
    ref_o, ref_final = kernellab.gated_delta_rule(**wide, initial_state=state, output_final_state=True,
                                                use_qk_l2norm=True, backend="reference")
    assert rel_err(o, ref_o) < 1e-12 and rel_err(final, ref_final) < 1e-12


def test_gates():
    """checkpoint decays span slow and fast heads, the extremes are what they say."""
    narrow, _ = precision.piece_inputs(Heads(1, 32, 8, 8), precision.GATES, 0, 64, torch.float32, "cpu", seed=0)
    checkpoint, zero, strong = narrow["g"]
    per_head = checkpoint.mean(0)
    assert (checkpoint < 0).all() and per_head.max() > -0.05 and per_head.min() < -0.3
    assert (zero == 0).all() and (strong == precision.STRONG_LOG_DECAY).all()


def test_pieces_are_one_call(monkeypatch):
    """The sequence in pieces (each from the last one's stored state) gives the rows of one call: the same outputs
    and states bit for bit (only the window's float64 sum of squares adds in another order)."""
    args = (TINY, ("checkpoint", "zero"), (64, 128, 256), torch.float32, "cpu", ["torch"])
    monkeypatch.setattr(precision, "PIECE", 32)
    pieces = precision.error_rows(*args)
    monkeypatch.setattr(precision, "PIECE", 4096)
    whole = precision.error_rows(*args)
    assert len(pieces) == len(whole) == 2 * 3 * 2 * 3  # modes x state dtypes x gates x T
    for a, b in zip(pieces, whole):
        assert math.isclose(a.pop("rel_err_o"), b.pop("rel_err_o"), rel_tol=1e-12) and a == b


def test_error_rows_say_what_a_state_dtype_costs():
    rows = precision.error_rows(TINY, ("zero",), (256, 512), torch.float32, "cpu", ["torch"])
    assert len({(r["shape"], r["T"]) for r in rows}) == len(rows)  # a series per shape string: bench.sweep's key
    by = {(r["mode"], r["state_dtype"], r["T"]): r for r in rows}
    for mode in precision.MODES:
        f32, bf16 = by[(mode, "float32", 512)], by[(mode, "bfloat16", 512)]
        assert f32["rel_err_o"] < 1e-5 and f32["rel_err_state"] < 1e-5
        assert bf16["rel_err_o"] > 100 * f32["rel_err_o"]
    assert by[("recurrent", "bfloat16", 512)]["rel_err_o"] > by[("chunk", "bfloat16", 512)]["rel_err_o"]


def test_a_backend_without_the_state_dtype_gets_error_rows():
    rows = precision.error_rows(TINY, ("zero",), (64,), torch.float32, "cpu", ["numba"])
    if "numba" not in kernellab.backends("gated_delta_rule"):
        pytest.skip("numba is not installed (its refusal is what this checks)")
    refused = [r for r in rows if r["state_dtype"] != "float32"]
    assert refused and all("state_dtype" in r["error"] for r in refused)
    assert all(not r.get("error") for r in rows if r["state_dtype"] == "float32")


def test_memory_rows():
    rows = precision.memory_rows("cpu")
    cfg = precision.ModelConfig()
    layers = sum(kind == "linear_attention" for kind in cfg.layer_types)
    by = {(r["state_dtype"], r["context"], r["weights"]): r for r in rows}
    f32, bf16 = by[("float32", 4096, "bf16")], by[("bfloat16", 4096, "bf16")]
    assert layers == 30 and f32["state_bytes"] == 30 * 32 * 128 * 128 * 4 == 2 * bf16["state_bytes"]
    assert f32["cache_bytes"] - bf16["cache_bytes"] == bf16["state_bytes"]
    assert f32["sequences"] == int((precision.GPU_MEMORY_BYTES - f32["weight_bytes"]) // f32["cache_bytes"])
    assert bf16["sequences"] > f32["sequences"]
    fp8 = by[("float32", 4096, "fp8 experts")]
    assert fp8["weight_bytes"] < 0.6 * f32["weight_bytes"]  # the experts are most of the 35B parameters
    params = sum(math.prod(s) for s in precision.checkpoint_shapes(cfg).values())
    assert f32["weight_bytes"] == 2 * params and 30e9 < params < 40e9


def test_summary_answers_the_questions():
    rows = [dict(phase="error", shape="s", heads="s", gate="zero", dtype="float32", mode="recurrent", backend="torch",
                 state_dtype=sd, T=T, rel_err_o=err, rel_err_state=err, error="")
            for sd, errs in (("bfloat16", (3e-3, 2e-2, 4e-2)), ("float32", (1e-7, 1e-7, 2e-7)))
            for T, err in zip((256, 512, 1024), errs)]
    rows += precision.memory_rows("cpu")
    rows += [dict(phase="decode", backend="torch", device="cpu", B=1, state_dtype=sd, median_ms=ms, error="")
             for sd, ms in (("float32", 2.0), ("bfloat16", 1.0))]
    lines = precision_report.summary(rows)
    assert any("passes 1% at T = 512" in line and "float32 state 2.00e-07" in line for line in lines)
    assert any(line.startswith("memory at 4096 tokens") for line in lines)
    assert any("float32 state 2000.0 us, bfloat16 1000.0 us (2.00x)" in line for line in lines)
    assert "T=512" in precision_report.table(rows)


@pytest.mark.slow
def test_sweep_cli_and_report(monkeypatch, tmp_path):
    """bench.sweep --op precision runs the precision sweep (a tiny grid here), merges its rows into the CSV, and
    the report has its section: the answers, the plots, the table."""
    monkeypatch.setattr(precision, "grid", lambda device, quick: [(TINY, ("zero", "strong"), (64, 128))])
    monkeypatch.setattr(precision, "decode_rows", lambda device, backends, batches, budget_s: [])
    monkeypatch.setattr(precision, "model_rows", lambda device, new_tokens: [])
    monkeypatch.setattr(precision, "fp8_rows", lambda device, backends: [])
    assert sweep.main(["--op", "precision", "--quick", "--out", str(tmp_path)]) == 0
    frame = pd.read_csv(tmp_path / "results.csv")
    errors = frame[frame["phase"] == "error"]
    assert set(errors["state_dtype"]) == {"float32", "bfloat16", "float16"} and set(errors["T"]) == {64, 128}
    for name in ("precision_error_o.png", "precision_error_state.png", "precision_memory.png"):
        assert (tmp_path / name).is_file()
    readme = (tmp_path / "README.md").read_text()
    section = readme[readme.index("## precision"):]
    assert "a bfloat16 state's output error" in section and "precision_error_o.png" in section
    assert "| heads | gate | inputs | mode | state | backend | T=64 | T=128 |" in section


def test_decode_rows_time_every_state_dtype():
    rows = precision.decode_rows("cpu", ["torch"], (1,), budget_s=0.01)
    assert {r["state_dtype"] for r in rows} == {"float32", "bfloat16", "float16"}
    assert all(r["median_ms"] > 0 and r["traffic_bytes"] > 0 for r in rows)
    f32 = next(r for r in rows if r["state_dtype"] == "float32")
    assert f32["traffic_bytes"] == 2 * 32 * 128 * 128 * 4
    assert len({(r["op"], r["backend"], r["shape"], r["dtype"], r["device"]) for r in rows}) == len(rows)


# ------------------------------------------------------------------------------------ the model's load options

@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    from model.generate import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("small"))


def test_model_with_a_bfloat16_state(small_checkpoint):
    """state_dtype at load: the cache holds bfloat16 recurrent states, decoding continues from them, and the
    logits stay near the float32 model's without being its."""
    import model

    ids = torch.randint(512, (2, 12), generator=torch.Generator().manual_seed(0))
    base = model.from_pretrained(small_checkpoint, backend="torch", dtype="float32")
    m = model.from_pretrained(small_checkpoint, backend="torch", dtype="float32", state_dtype="bfloat16")
    cache, base_cache = m.new_cache(2, 20), base.new_cache(2, 20)
    assert cache.states[0].recurrent.dtype == torch.bfloat16
    assert cache.nbytes() < base_cache.nbytes()
    logits = [m(ids, cache)]
    ref = [base(ids, base_cache)]
    for token in ids[:, :6].T:  # decode steps, token by token
        logits.append(m(token[:, None], cache))
        ref.append(base(token[:, None], base_cache))
    assert cache.states[0].recurrent.dtype == torch.bfloat16
    error = rel_err(torch.cat(logits, 1), torch.cat(ref, 1))
    assert 0 < error < 1e-2


def test_model_with_fp8_experts(small_checkpoint):
    """fp8_experts at load: the experts' weights become float8_e4m3fn with block scales (a quarter of the float32
    bytes), the layers run moe_fp8, and the logits move by about fp8's rounding."""
    import model

    ids = torch.randint(512, (1, 10), generator=torch.Generator().manual_seed(1))
    base = model.from_pretrained(small_checkpoint, backend="torch", dtype="float32")
    m = model.from_pretrained(small_checkpoint, backend="torch", dtype="float32", fp8_experts=True)
    experts = m.layers[0].mlp.experts
    assert experts.fp8 and experts.gate_up_proj.dtype == torch.float8_e4m3fn
    assert experts.gate_up_proj_scale.shape == (8, 1, 1) and m.backends["moe_fp8"] == "torch"
    dense = base.layers[0].mlp.experts.gate_up_proj
    assert experts.gate_up_proj.numel() == dense.numel() and experts.gate_up_proj.element_size() == 1
    with torch.no_grad():
        error = rel_err(m(ids), base(ids))
    assert 1e-3 < error < 0.5
    with pytest.raises(kernellab.BackendUnavailable, match="backend 'torch' of moe_fp8 has no backward"):
        m(ids)  # grad mode on: the parameters require grad, and moe_fp8 has no backward


def test_model_load_options_refuse_bad_values(small_checkpoint):
    import model

    with pytest.raises(ValueError, match="state_dtype must be"):
        model.from_pretrained(small_checkpoint, state_dtype="float64")
    with pytest.raises(ValueError, match="state_dtype must be"):
        model.from_pretrained(small_checkpoint, state_dtype=torch.int8)


def test_model_rows(monkeypatch, small_checkpoint):
    """The sweep's model agreement on a small config: every variant measured, the state variants agreeing on
    every greedy token over a short generation."""
    from bench.suites.model import config as model_config
    from model.generate import SMALL_CONFIG

    monkeypatch.setattr(model_config, "BENCH_CONFIG", SMALL_CONFIG)
    rows = precision.model_rows("cpu", prompt_len=8, new_tokens=6)
    assert [r["variant"] for r in rows] == list(precision.MODEL_VARIANTS)
    by = {r["variant"]: r for r in rows}
    for variant in ("bf16 state", "fp16 state"):
        assert by[variant]["token_agreement"] == 1.0 and 0 < by[variant]["logits_rel_err_max"] < 1e-2
    assert by["fp8 experts"]["logits_rel_err_median"] > by["bf16 state"]["logits_rel_err_median"]


def test_fp8_rows():
    rows = precision.fp8_rows("cpu", ["torch"], tokens=4, experts=8)
    by = {r["layer"]: r["rel_err_o"] for r in rows}
    assert by["moe, bf16 weights"] < 1e-2 < by["moe_fp8, fp8 weights"] < 0.1
