"""bench.timing's ceilings: the GEMMs timed interleaved and the fastest exact one taken, the physical peak from the
ISA and the clock, the bandwidth ceilings per working-set size and how a row reads them. Small sizes only: the
numbers measured here mean nothing on a shared machine, the bookkeeping around them does."""
import json
import math

import pytest
import torch

from bench import sweep, timing


def _fake_gemm(log, name, error=0.0):
    """A GEMM maker whose calls append `name` to log; error: a relative error added to the product."""
    def make(a, b):
        def call():
            log.append(name)
            return (a.double() @ b.double() * (1 + error)).to(a.dtype)
        return call
    return make


def test_gemms_are_timed_interleaved_and_the_fastest_exact_one_is_the_ceiling(monkeypatch):
    log = []
    monkeypatch.setitem(timing.GEMMS, "cpu", {"a": _fake_gemm(log, "a"), "b": _fake_gemm(log, "b"),
                                              "lossy": _fake_gemm(log, "lossy", error=1e-3)})
    found = timing.gemm_rates(torch.float32, "cpu", n=32, budget_s=0.01, min_rounds=3)
    calls = log[3:]  # after one checked warm-up call of each
    assert log[:3] == ["a", "b", "lossy"] and len(calls) == 3 * found["rounds"] and found["rounds"] >= 3
    assert calls == ["a", "b", "lossy"] * found["rounds"], "one call of each GEMM per round"
    assert found["gemms"]["lossy"]["rel_err"] == pytest.approx(1e-3, rel=1e-2)
    assert found["gemms"]["a"]["rel_err"] < 1e-6
    exact = {name: found["gemms"][name]["tflops"] for name in ("a", "b")}
    assert found["best"] == max(exact, key=exact.get) and found["tflops"] == exact[found["best"]]
    assert found["n"] == 32


def test_a_gemm_that_cannot_run_is_recorded_with_its_reason(monkeypatch):
    def broken(a, b):
        raise RuntimeError("no such library here")

    monkeypatch.setitem(timing.GEMMS, "cpu", {"ok": _fake_gemm([], "ok"), "broken": broken})
    found = timing.gemm_rates(torch.float32, "cpu", n=16, budget_s=0.01)
    assert found["gemms"]["broken"] == {"error": "RuntimeError: no such library here"}
    assert found["best"] == "ok"
    monkeypatch.setitem(timing.GEMMS, "cpu", {"broken": broken})
    nothing = timing.gemm_rates(torch.float32, "cpu", n=16, budget_s=0.01)
    assert nothing["best"] is None and math.isnan(nothing["tflops"])


def test_the_real_gemms_compute_the_product(seed):
    """Each GEMM this machine offers either ran, within float32 of the float64 product, or says why not."""
    found = timing.gemm_rates(torch.float32, "cpu", n=64, budget_s=0.01)
    assert set(found["gemms"]) == set(timing.GEMMS["cpu"])
    assert "torch.matmul" in found["gemms"] and found["gemms"]["torch.matmul"]["tflops"] > 0
    for name, row in found["gemms"].items():
        assert ("error" in row) != ("tflops" in row), name
        if "tflops" in row:
            assert row["tflops"] > 0 and row["rel_err"] < 1e-5, (name, row)
    bf16 = timing.gemm_rates(torch.bfloat16, "cpu", n=64, budget_s=0.01)
    assert "error" in bf16["gemms"]["mkl_packed"]  # MKL's packed sgemm is float32 only
    assert bf16["best"] is not None and bf16["gemms"][bf16["best"]]["rel_err"] < 1e-2


ZEN4 = {"vendor_id": "AuthenticAMD", "cpu family": "25", "model": "17", "cpu MHz": "2600.000", "siblings": "2",
        "cpu cores": "2", "flags": "fpu sse avx avx2 fma avx512f avx512_bf16 hypervisor"}


@pytest.mark.parametrize("info, fp32, bf16, how", [
    (ZEN4, 32, 64, "table: AuthenticAMD family 25 model 17 is Zen 4: 2 FMA pipes x 8 fp32 lanes x 2 FLOP"),
    (ZEN4 | {"cpu family": "26", "model": "2"}, 64, 128,
     "table: AuthenticAMD family 26 model 2 is Zen 5: 2 FMA pipes x 16 fp32 lanes x 2 FLOP"),
    (ZEN4 | {"vendor_id": "GenuineIntel", "cpu family": "6", "model": "143",
             "flags": "avx avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile"}, 64, 2048, "/proc/cpuinfo flags (avx512f)"),
    (ZEN4 | {"vendor_id": "GenuineIntel", "cpu family": "6", "flags": "avx avx2 fma"}, 32, 32,
     "/proc/cpuinfo flags (avx2+fma)"),
    (ZEN4 | {"vendor_id": "GenuineIntel", "cpu family": "6", "flags": "sse sse2"}, 8, 8, "/proc/cpuinfo flags (sse)"),
])
def test_flop_per_cycle_from_the_flags_and_the_table(monkeypatch, info, fp32, bf16, how):
    monkeypatch.setattr(timing, "_cpuinfo", lambda: info)
    per_cycle, found = timing.cpu_flop_per_cycle()
    assert per_cycle["float32"] == fp32 and per_cycle["bfloat16"] == bf16 and per_cycle["float64"] == fp32 // 2
    assert found.startswith(how), found


def test_physical_peak_and_the_clock_it_says_it_used(monkeypatch, tmp_path):
    monkeypatch.setattr(timing, "_cpuinfo", lambda: ZEN4)
    monkeypatch.setattr(timing, "CPUFREQ_MAX", str(tmp_path / "absent"))
    monkeypatch.setattr(timing.os, "sched_getaffinity", lambda pid: {0, 1})
    peak = timing.physical_peak("cpu", threads=1)
    assert peak["ghz"] == 2.6 and peak["cores"] == 1 and "/proc/cpuinfo cpu MHz" in peak["how"]
    assert peak["tflops"]["float32"] == pytest.approx(32 * 2.6e9 / 1e12)
    (tmp_path / "max").write_text("3700000\n")  # kHz
    monkeypatch.setattr(timing, "CPUFREQ_MAX", str(tmp_path / "max"))
    two = timing.physical_peak("cpu", threads=4)  # 4 threads on 2 cores: 2 cores' FMA units
    assert two["ghz"] == 3.7 and two["cores"] == 2 and str(tmp_path / "max") in two["how"]
    assert two["tflops"]["float32"] == pytest.approx(2 * 32 * 3.7e9 / 1e12)
    assert timing.physical_peak("cuda") is None


def test_a_measured_rate_above_the_tables_peak_falls_back_to_the_flags(monkeypatch, tmp_path):
    """A hypervisor may show a CPU model that is not the host's: the measurement disproves the table."""
    monkeypatch.setattr(timing, "_cpuinfo", lambda: ZEN4)
    monkeypatch.setattr(timing, "CPUFREQ_MAX", str(tmp_path / "absent"))
    monkeypatch.setattr(timing.os, "sched_getaffinity", lambda pid: {0})
    table_peak = 32 * 2.6e9 / 1e12
    assert timing.physical_peak("cpu", 1, measured={"float32": table_peak * 0.9})["flop_per_cycle"]["float32"] == 32
    beaten = timing.physical_peak("cpu", 1, measured={"float32": table_peak * 1.5})
    assert beaten["flop_per_cycle"]["float32"] == 64 and "beaten by this run's float32 GEMM" in beaten["how"]


def test_bandwidth_at_a_rows_size():
    table = {"nbytes": [2**16, 2**20, 2**24], "read_gbps": [4.0, 20.0, 16.0], "copy_gbps": [6.0, 10.0, 18.0]}
    ceil = {"copy_gbps": 18.0, "bandwidth": table}
    assert timing.bandwidth_at(ceil, 2**16) == 6.0  # the higher of read and copy at each size
    assert timing.bandwidth_at(ceil, 2**20) == 20.0
    assert timing.bandwidth_at(ceil, 2**18) == pytest.approx(13.0)  # halfway in log size between 6 and 20
    assert timing.bandwidth_at(ceil, 100) == 6.0 and timing.bandwidth_at(ceil, 2**40) == 18.0  # the ends' rates
    assert timing.bandwidth_at(ceil) == 18.0 and timing.bandwidth_at(ceil, 0) == 18.0  # no size: the largest
    assert timing.bandwidth_at({"copy_gbps": 7.0}, 2**20) == 7.0  # an older ceilings dict


def test_bandwidth_is_measured_with_the_caches_flushed(monkeypatch):
    events = []
    monkeypatch.setattr(timing, "flush_cpu_caches", lambda: events.append("flush"))
    assert timing.read_gbps("cpu", 2**16, budget_s=0.001) > 0
    assert events and events.count("flush") >= 3, "a flush before each timed call"
    events.clear()
    assert timing.copy_gbps("cpu", 0.001, 2**16) > 0 and not events  # bench.model's: unflushed by default
    assert timing.copy_gbps("cpu", 0.001, 2**16, flush_cache=True) > 0 and events
    table = timing.bandwidth_table("cpu", 0.004, sizes=[2**12, 2**16])
    assert table["nbytes"] == [2**12, 2**16] and all(r > 0 for r in table["read_gbps"] + table["copy_gbps"])


def test_ceilings_keep_every_gemm_and_the_rows_read_them(monkeypatch):
    ceil = timing.ceilings("cpu", [torch.float32, torch.bfloat16], budget_s=0.004, gemm_n=32,
                           bandwidth_sizes=[2**12, 2**16])
    json.loads(json.dumps(ceil))  # goes into ceilings.json as it is
    for name in ("float32", "bfloat16"):
        assert ceil["matmul_tflops"][name] == ceil["matmul"][name]["tflops"] > 0
        assert set(ceil["matmul"][name]["gemms"]) == set(timing.GEMMS["cpu"])
    assert set(ceil["physical_peak"]["tflops"]) >= {"float32", "bfloat16"} and ceil["physical_peak"]["how"]
    assert ceil["copy_gbps"] == ceil["bandwidth"]["copy_gbps"][-1] and ceil["read_gbps"] > 0
    row = sweep.base_row("moe", "torch", "cpu", torch.float32, ceil, nbytes=2**12)
    assert row["peak_gbps"] == timing.bandwidth_at(ceil, 2**12)
    assert row["peak_tflops"] == ceil["matmul_tflops"]["float32"]
    assert sweep.base_row("moe", "torch", "cpu", torch.float32, ceil)["peak_gbps"] == timing.bandwidth_at(ceil)
