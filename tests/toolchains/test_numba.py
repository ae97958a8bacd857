"""The numba backends against the float64 references.

- "numba" (CPU kernels): both gated-delta-rule modes and the MoE kernels on the edge cases that their
  structure makes risky (chunk boundaries, tail rows of the 8-row matrix-vector jobs, half-precision weights
  converted for the active experts only). The generic suites (tests/ops/test_*.py) also run them on every edge case.
- "numba_cuda" (numba.cuda kernels): under the simulator (NUMBA_ENABLE_CUDASIM=1, set by conftest without a GPU)
  at tiny sizes, and on a GPU (marked gpu) in every input dtype.

`python -m tests.toolchains.test_numba` prints the CPU timings of the issue's targets (MoE decode against the memory floor,
recurrent gated delta rule against the reference).
"""
import csv
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import kernellab
from bench.ops import make
from kernellab import registry
from tests.helpers import assert_close, poisoned_allocations, to_float64

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" and not torch.cuda.is_available()
needs_cuda_kernels = pytest.mark.skipif(
    "cpu" not in registry.registered("moe_permute")["numba_cuda"].devices() and not torch.cuda.is_available(),
    reason="numba.cuda kernels need a CUDA GPU or NUMBA_ENABLE_CUDASIM=1")

GDR_CASES = {
    "one_token": dict(T=1),
    "chunk_tail_initial_state": dict(T=70, initial_state=True),
    "two_chunks_and_tail": dict(B=2, T=131, K=16, V=24),
    "packed_with_length_one": dict(seqlens=[5, 1, 70], initial_state=True),
    "strong_decay_beta_high": dict(T=65, gate="strong", beta="high"),
    "no_decay_beta_low_no_l2norm": dict(T=33, gate="zero", beta="low", use_qk_l2norm=False),
    "equal_heads": dict(T=20, Hk=3, Hv=3),
}


def _check_gdr(backend, case, dtype, seed, device="cpu", **extra):
    args = make("gated_delta_rule", dtype=dtype, seed=seed, device=device, **case)
    ref_o, ref_s = kernellab.get("gated_delta_rule", "reference")(**to_float64(args))
    with poisoned_allocations():
        o, s = kernellab.get("gated_delta_rule", backend)(**args, **extra)
    assert o.dtype == args["v"].dtype and s.dtype == torch.float32
    assert_close(o, ref_o, dtype, f"{backend} o", seed)
    assert_close(s, ref_s, torch.float32 if dtype != torch.float64 else dtype, f"{backend} final state", seed)


@pytest.mark.parametrize("mode", ["recurrent", "chunk"])
@pytest.mark.parametrize("case", GDR_CASES.values(), ids=GDR_CASES.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_numba_gated_delta_rule(case, mode, dtype, seed):
    _check_gdr("numba", case, dtype, seed, mode=mode)


def test_numba_gated_delta_rule_small_chunks_leave_inputs_alone(seed):
    """chunk_size 16 puts several chunk boundaries inside each sequence; the caller's state is not written."""
    args = make("gated_delta_rule", seqlens=[40, 1, 17], initial_state=True, seed=seed)
    before = args["initial_state"].clone()
    ref_o, ref_s = kernellab.get("gated_delta_rule", "reference")(**to_float64(args))
    o, s = kernellab.gated_delta_rule(**args, mode="chunk", backend="numba", chunk_size=16)
    assert torch.equal(args["initial_state"], before)
    assert_close(o, ref_o, torch.float32, "numba chunk_size=16 o", seed)
    assert_close(s, ref_s, torch.float32, "numba chunk_size=16 state", seed)


MOE_CASES = {
    "decode": dict(N=1, E=8, top_k=4),
    "tail_rows": dict(N=9, D=20, I=13, E=4, top_k=2),  # 2I = 26 and D = 20: rows not a multiple of 8
    "dropped_int64": dict(N=33, E=8, top_k=3, drop=0.3, id_dtype=torch.int64),
    "all_dropped": dict(N=3, E=4, top_k=2, drop=1.0),
    "one_expert": dict(N=16, E=8, top_k=1, routing="one_expert"),
    "top_k_equals_E": dict(N=5, E=4, top_k=4),
}


@pytest.mark.parametrize("case", MOE_CASES.values(), ids=MOE_CASES.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_numba_moe(case, dtype, seed):
    args = make("moe", dtype=dtype, seed=seed, **case)
    ref = kernellab.get("moe", "reference")(**to_float64(args))
    with poisoned_allocations():
        out = kernellab.moe(**args, backend="numba")
    assert out.dtype == dtype
    assert_close(out, ref, dtype, "numba moe", seed)


@pytest.mark.parametrize("case", MOE_CASES.values(), ids=MOE_CASES.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_numba_permute_unpermute(case, dtype, seed):
    shape = {k: v for k, v in case.items() if k != "I"}
    args = make("moe_permute", dtype=dtype, seed=seed, **shape)
    expected = kernellab.moe_permute(**args, backend="reference")
    p = kernellab.moe_permute(**args, backend="numba")
    assert torch.equal(p.x, expected.x) and p.x.dtype == dtype, f"rows differ (seed={seed})"
    assert torch.equal(p.offsets, expected.offsets) and p.offsets.dtype == torch.int32
    assert torch.equal(p.source, expected.source)
    args = make("moe_unpermute", dtype=dtype, seed=seed, **shape)
    ref = kernellab.moe_unpermute(**to_float64(args), backend="reference")
    assert_close(kernellab.moe_unpermute(**args, backend="numba"), ref, dtype, "numba unpermute", seed)


# numba.cuda kernels: tiny sizes (the simulator runs every thread in Python)
SIM_GDR_CASES = {
    "one_token": dict(T=1, K=8, V=8),
    "v_tail_initial_state": dict(B=2, T=3, K=16, V=40, initial_state=True),  # V = 40: a partial V tile
    "packed_with_length_one": dict(seqlens=[3, 1, 2], K=8, V=8, initial_state=True, gate="strong"),
    "no_l2norm_beta_high": dict(T=4, K=8, V=8, use_qk_l2norm=False, gate="zero", beta="high"),
}
SIM_MOE_CASES = {
    "one_token": dict(N=1, E=4, top_k=2),
    "dropped_int64": dict(N=9, E=5, top_k=2, drop=0.3, id_dtype=torch.int64),
    "one_expert": dict(N=6, E=4, top_k=1, routing="one_expert"),
    "top_k_equals_E_empty_experts": dict(N=3, E=6, top_k=6, drop=0.4),
    "all_dropped": dict(N=2, E=3, top_k=2, drop=1.0),
}
CUDA_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@needs_cuda_kernels
@pytest.mark.parametrize("case", SIM_GDR_CASES.values(), ids=SIM_GDR_CASES.keys())
def test_numba_cuda_gated_delta_rule(case, seed):
    _check_gdr("numba_cuda", case, torch.float32, seed, device=CUDA_DEVICE, mode="recurrent")


@needs_cuda_kernels
@pytest.mark.parametrize("case", SIM_MOE_CASES.values(), ids=SIM_MOE_CASES.keys())
def test_numba_cuda_moe_kernels(case, seed):
    dtype = torch.float32
    args = make("moe_permute", D=8, dtype=dtype, seed=seed, device=CUDA_DEVICE, **case)
    expected = kernellab.moe_permute(**args, backend="reference")
    with poisoned_allocations():
        p = kernellab.moe_permute(**args, backend="numba_cuda")
    assert torch.equal(p.x, expected.x), f"rows differ (seed={seed})"
    assert torch.equal(p.offsets, expected.offsets) and torch.equal(p.source, expected.source)
    args = make("moe_unpermute", D=8, dtype=dtype, seed=seed, device=CUDA_DEVICE, **case)
    ref = kernellab.moe_unpermute(**to_float64(args), backend="reference")
    with poisoned_allocations():
        out = kernellab.moe_unpermute(**args, backend="numba_cuda")
    assert_close(out, ref, dtype, "numba_cuda unpermute", seed)
    gemm = {k: v for k, v in case.items() if k != "id_dtype"}
    args = make("grouped_gemm", K=20, Nout=18, dtype=dtype, seed=seed, device=CUDA_DEVICE, **gemm)
    ref = kernellab.grouped_gemm(**to_float64(args), backend="reference")
    with poisoned_allocations():
        out = kernellab.grouped_gemm(**args, backend="numba_cuda")
    assert_close(out, ref, dtype, "numba_cuda grouped_gemm", seed)


@pytest.mark.skipif(shutil.which("ptxas") is None and not Path("/usr/local/cuda/bin/ptxas").exists(),
                    reason="ptxas (CUDA toolkit) not found on this machine")
def test_numba_cuda_kernels_compile_for_sm90(tmp_path):
    """The simulator accepts code the real compiler rejects (shared arrays sized by expressions, for one): every
    numba.cuda kernel compiles for sm_90 through profiling.static (its AOT_SPECS), with no spills."""
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "TRITON_INTERPRET")}
    result = subprocess.run([sys.executable, "-m", "profiling.static", "--only", "kernellab/numba_cuda/", "--out",
                             str(tmp_path), "--workers", "1", "--force"], capture_output=True, text=True, env=env,
                            cwd=Path(__file__).parents[2], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    with (tmp_path / "kernels.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 8, f"expected every numba.cuda kernel, got {[row['kernel'] for row in rows]}"
    for row in rows:
        assert row["status"] == "ok", f"{row['kernel']}: {row['status']}"
        assert row["spill_store_bytes"] in ("0", ""), f"{row['kernel']} spills"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_numba_cuda_on_gpu(dtype, seed):
    """Production-like sizes on the GPU, every input dtype, torch tensors passed without copies."""
    _check_gdr("numba_cuda", dict(B=4, T=37, Hk=4, Hv=8, K=128, V=128, initial_state=True), dtype, seed,
               device="cuda", mode="recurrent")
    case = dict(N=300, E=16, top_k=4, drop=0.1)
    args = make("moe_permute", D=256, dtype=dtype, seed=seed, device="cuda", **case)
    p, expected = (kernellab.moe_permute(**args, backend=name) for name in ("numba_cuda", "reference"))
    assert torch.equal(p.x, expected.x) and torch.equal(p.source, expected.source)
    args = make("moe_unpermute", D=256, dtype=dtype, seed=seed, device="cuda", **case)
    ref = kernellab.moe_unpermute(**to_float64(args), backend="reference")
    assert_close(kernellab.moe_unpermute(**args, backend="numba_cuda"), ref, dtype, "unpermute", seed)
    args = make("grouped_gemm", N=300, E=16, top_k=4, K=256, Nout=192, dtype=dtype, seed=seed, device="cuda")
    ref = kernellab.grouped_gemm(**to_float64(args), backend="reference")
    assert_close(kernellab.grouped_gemm(**args, backend="numba_cuda"), ref, dtype, "grouped_gemm", seed)


def _median_seconds(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_targets():
    """The issue's CPU targets, printed (noisy on a shared machine: re-run on a quiet one)."""
    gen = torch.Generator().manual_seed(0)
    E, D, I, top_k = 64, 2048, 512, 8  # the Qwen3.5-35B expert shape; 64 of its 256 experts keep memory small
    x = torch.randn(1, D, generator=gen)
    w_gate_up = torch.randn(E, 2 * I, D, generator=gen) * D ** -0.5
    w_down = torch.randn(E, D, I, generator=gen) * I ** -0.5
    routes = [(torch.softmax(torch.randn(1, top_k, generator=gen), -1),
               torch.randperm(E, generator=gen)[:top_k].to(torch.int32)[None]) for _ in range(16)]
    calls = iter(routes * 100)
    seconds = _median_seconds(lambda: kernellab.moe(x, *next(calls), w_gate_up, w_down, backend="numba"), 15)
    floor = top_k * 3 * I * D * 4 / 22e9
    print(f"numba moe decode (N=1, D={D}, I={I}, top_k={top_k}, float32): {seconds * 1e3:.2f} ms; floor "
          f"(active weights / 22 GB/s) {floor * 1e3:.2f} ms -> {seconds / floor:.2f}x")
    args = make("gated_delta_rule", B=1, T=1024, Hk=4, Hv=8, K=128, V=128)
    seconds = {mode: _median_seconds(lambda: kernellab.gated_delta_rule(**args, mode=mode, backend="numba"), 5)
               for mode in ("recurrent", "chunk")}
    ref = _median_seconds(lambda: kernellab.gated_delta_rule(**args, backend="reference"), 1)
    for mode, ours in seconds.items():
        print(f"numba gated delta rule {mode} (T=1024, Hv=8, d=128): {1024 / ours:.0f} tokens/s, "
              f"{ref / ours:.1f}x the reference's {1024 / ref:.0f} tokens/s")


if __name__ == "__main__":
    measure_targets()
