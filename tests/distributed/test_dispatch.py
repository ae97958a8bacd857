"""bench.suites.moe_dispatch, the expert-parallel exchange's benchmark (python -m bench.sweep --op moe_dispatch): the sweep on
tiny shapes end to end (gloo worlds of 2 and 4 spawned on 127.0.0.1: rows, columns, files, the report), the bytes
each rank counted against the ids it routed and against the projection's model, bad arguments refused before
anything runs, the projection's arithmetic, the collective timer, the deadline that bounds a spawned world.

Spawning a world costs seconds (each process imports torch), so the end-to-end sweep runs once per module.
"""
import dataclasses
import math
import time
from datetime import timedelta

import pandas as pd
import pytest
import torch
import torch.distributed as dist

from bench import ops, sweep, timing
from bench.ops import MODELS
from bench.suites.moe_dispatch import parallel_model, projection, report, worlds
from bench.suites.moe_dispatch import parts as exchange, run as dispatch_run
from tests.bench.test_bench import CEILINGS

OP = exchange.OP
# Tiny cases: 512 tokens per rank with 4 slots each, so that the remote share of the slots sits within a few
# percent of (W - 1) / W; a skewed case (rank 0's experts take most rows).
TINY = [dict(world=2, N=512, D=16, E=8, I=8, top_k=4, routing="uniform"),
        dict(world=4, N=512, D=16, E=8, I=8, top_k=4, routing="uniform"),
        dict(world=2, N=64, D=32, E=8, I=8, top_k=2, routing="skewed")]
TINY_KEYS = [ops.Case(OP, shape).key for shape in TINY]
OWN_COLUMNS = ["world", "part", "transport", "bytes", "gbps", "bytes_per_token", "of_all_to_all", "imbalance",
               "vs_one_process", "rel_err", "load", "cores"]


MODEL_WORLDS = (1, 2)  # the model part's worlds here (4 processes more would cost seconds each)


def _tiny(monkeypatch):
    monkeypatch.setitem(ops.OPS, OP, dataclasses.replace(ops.OPS[OP], grid=lambda scale: TINY, presets=lambda s: []))
    monkeypatch.setattr(parallel_model, "MODEL_WORLDS", MODEL_WORLDS)


def _model_keys():
    from model.generate import SMALL_CONFIG

    run = parallel_model.MODEL_RUN[True]
    shape = dict(N=run["batch"] * run["prompt"], D=SMALL_CONFIG["hidden_size"], E=SMALL_CONFIG["num_experts"],
                 I=SMALL_CONFIG["moe_intermediate_size"], top_k=SMALL_CONFIG["num_experts_per_tok"],
                 routing=parallel_model.MODEL)
    return [f"{ops.Case(OP, dict(world=world) | shape).key},part={parallel_model.MODEL}" for world in MODEL_WORLDS]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """python -m bench.sweep --op moe_dispatch --quick on the TINY cases (ceilings stubbed): (out folder, frame)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        _tiny(monkeypatch)
        monkeypatch.setattr(timing, "ceilings", lambda device, dtypes, budget_s=0.5: CEILINGS)
        out = tmp_path_factory.mktemp("dispatch")
        # two backends of both the permutations and the experts (reference: slow loops, but tiny shapes)
        assert sweep.main(["--op", OP, "--quick", "--backend", "torch", "reference", "--out", str(out)]) == 0
    return out, pd.read_csv(out / "results.csv", keep_default_na=False, na_values=[""])


def test_sweep_end_to_end(swept):
    out, frame = swept
    rows = frame[frame["op"] == OP]
    assert set(OWN_COLUMNS) <= set(frame.columns)
    parts = exchange.EXCHANGE + exchange.LOCAL + exchange.LAYER
    expected = {(f"{key},part={part}", "gloo" if part == "all_to_all" else backend)
                for key in TINY_KEYS for part in parts for backend in ("torch", "reference")}
    expected |= {(f"{key},part={exchange.FIRST_TOUCH}", "torch") for key in TINY_KEYS}
    expected |= {(key, "torch") for key in _model_keys()}  # the model on the first --backend
    found = set(zip(rows["shape"], rows["backend"]))
    assert found == expected, found ^ expected
    assert rows["error"].fillna("").eq("").all(), rows.loc[rows["error"].fillna("") != "", ["shape", "error"]]
    assert (rows["median_ms"] > 0).all() and (rows["p20_ms"] <= rows["p80_ms"]).all()
    moved = rows[rows["part"].isin(exchange.EXCHANGE + exchange.LOCAL + (exchange.FIRST_TOUCH,))]
    assert (moved["transport"] == "gloo").all()
    assert (moved["gbps"] > 0).all() and (moved["bytes"] > 0).all()
    shares = moved[moved["part"].isin(exchange.EXCHANGE[:3])]["of_all_to_all"]
    assert (shares > 0).all() and moved[~moved["part"].isin(exchange.EXCHANGE[:3])]["of_all_to_all"].isna().all()
    # dispatch+combine moves each row out and back: twice dispatch's bytes, twice combine's per token plus counts
    for key in TINY_KEYS:
        part = {p: rows[(rows["shape"] == f"{key},part={p}") & rows["backend"].isin(["torch", "gloo"])].iloc[0]
                for p in exchange.EXCHANGE}
        assert part["dispatch+combine"]["bytes"] == 2 * part["dispatch"]["bytes"] == 2 * part["all_to_all"]["bytes"]
        assert part["dispatch+combine"]["bytes_per_token"] == pytest.approx(
            part["dispatch"]["bytes_per_token"] + part["combine"]["bytes_per_token"])
    ep = rows[rows["part"] == "moe_ep"]
    assert (ep["rel_err"] <= 1e-5).all() and (ep["vs_one_process"] > 0).all()
    assert ep["checked_against"].str.startswith("kernellab.moe in one process").all()
    assert rows[rows["part"] == "moe"]["transport"].isna().all()
    skewed = rows[(rows["routing"] == "skewed") & (rows["part"] == "dispatch")]
    assert (skewed["imbalance"] > 1).all(), "rank 0's experts take most rows under skewed routing"
    for name in ("results.csv", "ceilings.json", "README.md", f"{OP}_exchange.png", f"{OP}_layer.png",
                 f"{OP}_projection.png"):
        assert (out / name).stat().st_size > 0, name
    readme = (out / "README.md").read_text()
    assert f"## {OP}" in readme and "#### Projection: Qwen3.5-397B-A17B" in readme
    assert "\n| 8 | 4096 |" in readme and "- - " not in readme and "|." not in readme
    assert f"![{OP}_projection]({OP}_projection.png)" in readme


def test_model_rows(swept):
    """The model on 1 and 2 processes (tp = ep = W): its tokens/s, and tokens identical to one process's (else the
    row would hold an error, which test_sweep_end_to_end refuses); the report's line."""
    out, frame = swept
    model = frame[frame["part"] == parallel_model.MODEL].sort_values("world")
    assert list(model["world"]) == list(MODEL_WORLDS) and list(model["shape"]) == _model_keys()
    assert (model["tokens_per_s"] > 0).all() and (model["decode_tokens_per_s"] > 0).all()
    assert (model["prefill_ms"] < model["median_ms"]).all() and (model["vs_one_process"] > 0).all()
    assert list(model["transport"].fillna("")) == ["", "gloo"]
    readme = (out / "README.md").read_text()
    assert "the model on several processes" in readme and "2 ranks:" in readme and "identical" in readme


def test_measured_bytes_are_the_routed_slots(swept):
    """Each uniform case's bytes per token: exactly the slots of every rank's ids whose expert lives on another
    rank (D elements each), plus the counts; and within 5% of the projection's model for that world."""
    _, frame = swept
    for shape, key in zip(TINY, TINY_KEYS):
        world, N, D, E = shape["world"], shape["N"], shape["D"], shape["E"]
        seed = sweep.seed_of(OP, key)
        away = 0
        for rank in range(world):
            _, _, ids = exchange.tokens(shape, rank, seed, torch.float32, "cpu")
            away += int(((ids // (E // world)) != rank).sum())
        row = frame[frame["shape"] == f"{key},part=dispatch"].iloc[0]
        counts = (world - 1) * (E // world) * 8
        assert row["bytes_per_token"] == pytest.approx((away / world * D * 4 + counts) / N, rel=1e-12), key
    checks = report.bytes_check(frame.to_dict("records"))
    assert {c["world"] for c in checks} == {2, 4}
    for c in checks:
        assert c["ratio"] == pytest.approx(1.0, abs=0.05), c


@pytest.mark.parametrize("argv, message", [
    (["--backend", "nosuch"], "--backend nosuch: moe_permute has no backend 'nosuch'"),
    (["--backend", "cuda"], "--backend cuda: backend 'cuda' of moe"),
    (["--shape", TINY_KEYS[0]], f"--op {OP} takes no --shape"),
    (["--preset", "DeepSeek-V3"], f"no shapes of {OP} for preset DeepSeek-V3"),
    (["moe"], f"--op {OP} runs alone"),
    (["--device", "cuda"], "no CUDA GPU") if not torch.cuda.is_available() else (["--dtype", "int8"], "invalid"),
    (["--threads", "0"], "--threads: expected an integer >= 1"),
])
def test_bad_arguments_are_refused_before_anything_runs(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(timing, "ceilings", lambda *a, **k: pytest.fail("measured ceilings for a refused run"))
    for module in (exchange, dispatch_run, parallel_model):  # each calls the spawn it imported
        monkeypatch.setattr(module, "spawn", lambda *a, **k: pytest.fail("spawned processes for a refused run"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit:
        sweep.main(["--op", OP, *argv, "--out", str(out)])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_preset_selects_its_shapes_and_the_model_takes_none(capsys):
    args = sweep.parse(["--op", OP, "--preset", "Qwen3.5-35B-A3B"], machine=True)
    assert args.preset == "Qwen3.5-35B-A3B"
    keys = [case.key for case in sweep.planned(OP, "cpu", False, args.preset)]
    assert keys == ["world=2,N=4096,D=2048,E=256,I=512,top_k=8,routing=uniform"]  # the target
    with pytest.raises(SystemExit) as exit:
        sweep.parse(["--op", "model", "--preset", "Qwen3.5-35B-A3B"])
    assert exit.value.code == 2 and "--op model takes no --preset" in capsys.readouterr().err


def test_grids_vary_every_axis_at_each_world():
    for scale in ("quick", "cpu", "cuda"):
        shapes = ops.OPS[OP].grid(scale)
        for world in {s["world"] for s in shapes}:
            here = [s for s in shapes if s["world"] == world]
            for axis in ("N", "D", "top_k", "routing"):
                assert len({s[axis] for s in here}) > 1, (scale, world, axis)
            assert all(s["E"] % world == 0 for s in here)
    assert {s["world"] for s in ops.OPS[OP].grid("cpu")} == {2, 4}
    assert 1 in {s["world"] for s in ops.OPS[OP].grid("quick")}, "a one-GPU machine runs the quick sweep"


def test_the_layer_runs_where_one_process_affords_it():
    cpu = [shape for _, shape in ops.OPS[OP].presets("cpu")]
    assert cpu and not any(exchange.layer_affordable(s, False, "cpu") for s in cpu)  # minutes per call here
    assert all(exchange.layer_affordable(s, True, "cpu") for s in ops.OPS[OP].grid("quick") if s["N"] <= 256)
    base = dict(world=2, N=1024, D=1024, E=64, I=256, top_k=8, routing="uniform")
    assert exchange.layer_affordable(base, False, "cpu")
    assert all(exchange.layer_affordable(s, False, "cuda") for _, s in ops.OPS[OP].presets("cuda"))


# ----------------------------------------------------------------------------------------------- projection

def test_bytes_per_token_arithmetic():
    # Qwen3.5-397B at EP 8, bf16: 10 slots, 7 of 8 away, 8 KiB each, out and back; counts 64 int64 to 7 ranks
    assert projection.bytes_per_token(8, 10, 4096, 2, 512, 4096, "combine") == 10 * 7 / 8 * 4096 * 2
    assert projection.bytes_per_token(8, 10, 4096, 2, 512, 4096, "dispatch") == 10 * 7 / 8 * 4096 * 2 + 7 * 64 * 8 / 4096
    assert projection.bytes_per_token(8, 10, 4096, 2, 512, 4096) == 2 * 71680 + 0.875
    assert projection.bytes_per_token(1, 10, 4096, 2, 512, 4096) == 0  # one rank: nothing leaves
    inside = projection.bytes_per_token(32, 10, 4096, 2, 512, 4096, "combine", others=7)
    outside = projection.bytes_per_token(32, 10, 4096, 2, 512, 4096, "combine", others=24)
    assert inside + outside == projection.bytes_per_token(32, 10, 4096, 2, 512, 4096, "combine")
    assert outside == 10 * 24 / 32 * 8192 and outside == pytest.approx(24 / 7 * inside)


def test_nodes_reached():
    assert projection.nodes_reached(8, 10, 512) == 0.0  # one node
    assert projection.nodes_reached(16, 10, 512) == pytest.approx(1 - math.comb(256, 10) / math.comb(512, 10))
    four = projection.nodes_reached(32, 10, 512)
    assert four == pytest.approx(3 * (1 - math.comb(384, 10) / math.comb(512, 10))) and 2.5 < four < 3


def test_projection_arithmetic():
    m = MODELS["Qwen3.5-397B-A17B"]
    D, E, k, I = m["hidden"], m["experts"], m["top_k"], m["expert_size"]
    found = {(p["world"], p["N"]): p for p in projection.project()}
    assert set(found) == {(w, n) for w in (8, 16, 32) for n in (128, 4096)}
    p = found[(8, 4096)]
    slots = 4096 * k * 7 / 8 * D * 2
    assert p["nvlink_bytes"] == slots + 7 * 64 * 8 and p["ib_bytes"] == 0 and p["ib_bytes_per_node"] == 0
    assert p["link_ms"] == pytest.approx((2 * slots + 7 * 64 * 8) / 450e9 * 1e3)
    assert p["deepep_ms"] == pytest.approx(((slots + 7 * 64 * 8) / 153e9 + slots / 158e9) * 1e3)
    flops = 4096 * k * (6 * D * I + 5 * I + 2 * D)
    assert p["expert_flops"] == flops and p["experts_ms"] == pytest.approx(flops / 523e12 * 1e3)  # compute-bound
    p = found[(16, 4096)]  # 7 of 16 ranks on the node, 8 across InfiniBand: the IB half decides
    assert p["ib_bytes"] == 4096 * k * 8 / 16 * D * 2 + 8 * 32 * 8
    assert p["link_ms"] == pytest.approx((2 * 4096 * k * 8 / 16 * D * 2 + 8 * 32 * 8) / 50e9 * 1e3)
    assert p["ib_bytes_per_node"] == pytest.approx(4096 * projection.nodes_reached(16, k, E) * D * 2)
    p = found[(8, 128)]  # decode: the 64 local experts' weights from HBM take longer than their FLOPs
    assert p["expert_weight_bytes"] == pytest.approx(64 * (1 - (1 - k / E) ** 1024) * 3 * D * I * 2)
    assert p["experts_ms"] == pytest.approx(p["expert_weight_bytes"] / 4.8e12 * 1e3)
    assert p["experts_ms"] > p["expert_flops"] / 523e12 * 1e3
    text = "\n".join(report.projection_lines())
    assert "4096 tokens per rank: at link rates compute stops hiding it at EP 16; at DeepEP's rates compute stops " \
           "hiding it at EP 8" in text
    assert "128 tokens per rank: at link rates compute stops hiding it at EP 16" in text


def test_summary_reads_the_target_row():
    shape = dict(world=2, N=4096, D=2048, E=256, I=512, top_k=8, routing="uniform")
    row = dict(op=OP, backend="torch", device="cpu", transport="gloo", preset="Qwen3.5-35B-A3B",
               part="dispatch+combine", shape="x", dtype="float32", median_ms=100.0, gbps=6.0, of_all_to_all=0.6,
               bytes_per_token=16384.5, load=0.4, cores=2, commit="abc", error="", **shape)
    lines = report.summary([row])
    assert "**60%**" in lines[0] and lines[0].endswith(": met") and "all_to_all 10.00 GB/s" in lines[0]
    assert "load 0.4 on 2 cores" in lines[0]
    low = report.summary([dict(row, of_all_to_all=0.4)])[0]
    assert low.endswith(": not met")
    assert "not measured in this CSV" in report.summary([dict(row, world=4)])[0]


# ----------------------------------------------------------------------------------------- timer and world

@pytest.fixture
def world_of_one():
    """A gloo group of this process alone on 127.0.0.1, destroyed afterwards."""
    port = worlds._free_port()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=timedelta(seconds=30))
    yield
    dist.destroy_process_group()


def test_time_collective_flushes_then_times_each_call(world_of_one, monkeypatch):
    events = []
    monkeypatch.setattr(timing, "flush_cpu_caches", lambda: events.append("flush"))
    measured = timing.time_collective(lambda: events.append("call"), budget_s=60.0, max_repeats=4)
    assert measured.repeats == 4 and 0 <= measured.p20_ms <= measured.median_ms <= measured.p80_ms
    assert events == ["call"] + ["flush", "call"] * 4


def sleeper(rank, seconds, results):
    """A spawned process that reports nothing in time."""
    time.sleep(seconds)


def test_a_world_past_its_deadline_is_killed():
    start = time.monotonic()
    found = worlds.spawn(sleeper, [(120,), (120,)], ["a", "b"], deadline_s=2.0, env={})
    assert time.monotonic() - start < 60
    assert set(found) == {"a", "b"} and all("deadline" in found[k]["error"] for k in found)
