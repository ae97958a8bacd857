"""profiling/ and bench.gpu_check: the static sm_90 table, traces, rooflines and the GPU run script, on CPU."""
import csv
import importlib
import json
from pathlib import Path

import pytest
import torch

from profiling import static

# A ptxas -v report as Triton 3.9 prints it for sm_90a (ptxas-blackwell), plus a device function that was not
# inlined and an nvcc report with static shared memory: the three shapes the parser meets.
PTXAS_SAMPLE = """\
ptxas-blackwell info    : 0 bytes gmem
ptxas-blackwell info    : Compiling entry function 'chunk_output' for 'sm_90a'
ptxas-blackwell info    : Function properties for chunk_output
    0 bytes stack frame, 56 bytes spill stores, 48 bytes spill loads
ptxas-blackwell info    : Used 255 registers, used 1 barriers
ptxas-blackwell info    : Compile time = 141.757 ms
ptxas info    : Function properties for helper
    16 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Compiling entry function '_Z4gemmPK6__halfPf' for 'sm_90'
ptxas info    : Function properties for _Z4gemmPK6__halfPf
    32 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 16384 bytes smem, 380 bytes cmem[0]
"""

SASS_SAMPLE = """\
\tcode for sm_90
\t\tFunction : chunk_output
\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0160*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24, gsb0 ;  /* 0x00000000041879f0 */
        /*0170*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;  /* 0x00000000081879f0 */
        /*0180*/              @!P0 STL [R1], R2 ;                                        /* 0x0000000201008387 */
        /*0190*/                   LDL R2, [R1] ;                                        /* 0x0000000001027983 */
\t\tFunction : gemm
        /*0100*/                   HMMA.16816.F32 R16, R4.reuse, R12, RZ ;               /* 0x0000000c0410723c */
        /*0110*/                   FFMA R0, R1, R2, R3 ;                                 /* 0x0000000201007223 */
"""


def test_parse_ptxas_reads_entries_only():
    entries = static.parse_ptxas(PTXAS_SAMPLE)
    assert set(entries) == {"chunk_output", "_Z4gemmPK6__halfPf"}
    assert entries["chunk_output"] == dict(registers=255, shared_bytes=0, stack_bytes=0, spill_store_bytes=56,
                                           spill_load_bytes=48)
    assert entries["_Z4gemmPK6__halfPf"] == dict(registers=40, shared_bytes=16384, stack_bytes=32,
                                                 spill_store_bytes=0, spill_load_bytes=0)


def test_parse_sass_counts_opcodes_per_function():
    counts = static.parse_sass(SASS_SAMPLE)
    assert static.tensor_summary(counts["chunk_output"]) == "HGMMA:2"
    assert counts["chunk_output"]["LDL"] == 1 and counts["chunk_output"]["STL"] == 1
    assert static.tensor_summary(counts["gemm"]) == "HMMA:1"
    assert static.tensor_summary(counts["gemm"] - counts["gemm"]) == "none"


@pytest.mark.parametrize("registers, shared, threads, warps, limiter", [
    (32, 0, 256, 64, "warps"),                # 8 blocks of 8 warps fill the SM
    (255, 0, 256, 8, "registers"),            # 255 -> 256 regs/thread = 8192 per warp: 8 warps
    (128, 0, 128, 16, "registers"),           # 4096 per warp: 16 warps
    (16, 0, 32, 32, "blocks"),                # 32 blocks of one warp
    (32, 100 * 1024, 128, 8, "shared memory"),  # 101 KB per block (1 KB reserved): 2 blocks
    (32, 230 * 1024, 128, 0, "does not fit (shared memory)"),
])
def test_occupancy_on_sm90(registers, shared, threads, warps, limiter):
    result = static.occupancy(registers, shared, threads)
    assert (result["warps_per_sm"], result["limiter"]) == (warps, limiter)
    assert result["occupancy"] == round(warps / 64, 3)


def test_occupancy_needs_threads():
    assert static.occupancy(32, 0, None)["warps_per_sm"] is None


def test_findings_flag_spills_misfits_and_mma_sync():
    base = dict(config="c", status="ok", spill_store_bytes=0, spill_load_bytes=0, local_ops=0, registers=64,
                limiter="warps", shared_bytes=0, tensor_ops="none")
    rows = [dict(base, kernel="clean"), dict(base, kernel="spilly", spill_store_bytes=8, spill_load_bytes=8, local_ops=4),
            dict(base, kernel="huge", limiter="does not fit (shared memory)", shared_bytes=240000),
            dict(base, kernel="old_mma", tensor_ops="HMMA:16"), dict(base, kernel="wgmma", tensor_ops="HGMMA:8 HMMA:2"),
            dict(base, kernel="broken", status="error: ptxas failed")]
    notes = "\n".join(static.findings(rows))
    assert "clean" not in notes and "wgmma`" not in notes
    assert "`spilly`: spills 8 B stored / 8 B loaded, 4 local-memory" in notes
    assert "`huge`" in notes and "`old_mma`: matrix products on mma.sync" in notes and "ptxas failed" in notes
    both = static.findings([dict(base, kernel="k", toolchain="cuda", config="big -DT=64", spill_store_bytes=4,
                                 tensor_ops="HMMA:1")])
    assert both == ["- `k` (big -DT=64): spills 4 B stored / 0 B loaded, 0 local-memory instructions at 64 "
                    "registers; matrix products on mma.sync (HMMA), not Hopper's wgmma (HGMMA)"]


def test_triton_signature_hints():
    """Pointers are aligned as at launch; integers only when the spec says so ("i32:16" or divisible_by_16)."""
    from types import SimpleNamespace

    spec = SimpleNamespace(signature={"x": "*bf16", "n": "i32:16", "t": "i32", "s": "i64", "B": "constexpr"},
                           divisible_by_16=("s",))
    signature, divisible = static.triton_signature(spec)
    assert signature == {"x": "*bf16", "n": "i32", "t": "i32", "s": "i64", "B": "constexpr"}
    assert divisible == ["x", "n", "s"]


def test_cuda_aot_lines():
    configs = static.cuda_configs("// aot: decode threads=128 dynamic_smem=4096 -DK=128 -DV=128\n__global__ ...")
    assert configs == [dict(label="decode", threads=128, dynamic_smem=4096, flags=["-DK=128", "-DV=128"])]
    assert static.cuda_configs("__global__ void f() {}")[0]["label"] == "default"


_TRITON_SAMPLE = '''
import triton
import triton.language as tl
from kernellab.triton import AotSpec


@triton.jit
def tile_matmul(a, b, c, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for k in range(0, K, BK):
        acc += tl.dot(tl.load(a + rm[:, None] * K + (k + rk)[None, :]), tl.load(b + (k + rk)[:, None] * BN + rn[None, :]))
    tl.store(c + rm[:, None] * BN + rn[None, :], acc.to(c.dtype.element_ty))


@triton.jit
def scale(x, y, n, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y + offs, tl.load(x + offs, mask=offs < n) * alpha, mask=offs < n)


AOT_SPECS = [
    AotSpec("tile_matmul[64x64x32,bf16]", "profiling_sample_triton:tile_matmul",
            {"a": "*bf16", "b": "*bf16", "c": "*bf16", "K": "i32:16", "BM": "constexpr", "BN": "constexpr",
             "BK": "constexpr"}, dict(BM=64, BN=64, BK=32), num_warps=4, num_stages=2),
    AotSpec("scale[1024,fp32]", "profiling_sample_triton:scale",
            {"x": "*fp32", "y": "*fp32", "n": "i32", "alpha": "fp32", "BLOCK": "constexpr"}, dict(BLOCK=1024),
            num_warps=4, num_stages=1),
]
'''

_CUDA_SAMPLE = r'''
// aot: small threads=128 -DTILE=16
// aot: large -DTILE=64
#include <cuda_fp16.h>
#include <mma.h>
#ifndef TILE
#define TILE 32
#endif
extern "C" __global__ void __launch_bounds__(256) shared_copy(float* y, const float* x, int n) {
    __shared__ float buffer[TILE * TILE];
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    buffer[threadIdx.x % (TILE * TILE)] = i < n ? x[i] : 0.f;
    __syncthreads();
    if (i < n) y[i] = buffer[(threadIdx.x + 1) % (TILE * TILE)];
}
extern "C" __global__ void wmma_tile(const half* a, const half* b, float* c) {
    using namespace nvcuda;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
    wmma::fill_fragment(fc, 0.f);
    wmma::load_matrix_sync(fa, a, 16);
    wmma::load_matrix_sync(fb, b, 16);
    wmma::mma_sync(fc, fa, fb, fc);
    wmma::store_matrix_sync(c, fc, 16, wmma::mem_row_major);
}
'''

_NUMBA_SAMPLE = '''
from types import SimpleNamespace
from numba import cuda


@cuda.jit
def double(x, y):
    i = cuda.grid(1)
    if i < x.shape[0]:
        y[i] = 2 * x[i]


@cuda.jit
def without_spec(x):
    x[0] = 1


AOT_SPECS = [SimpleNamespace(name="double[fp32]", kernel="profiling_sample_numba:double",
                             signature="void(float32[:], float32[:])", threads=256)]
'''

needs_nvcc = pytest.mark.skipif(static.find_tool("nvcc") is None, reason="needs nvcc (the CUDA toolkit)")


def _sample_module(tmp_path, monkeypatch, name, text):
    (tmp_path / f"{name}.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers get the parent's sys.path
    return static.Job("triton" if "triton" in name else "numba", f"{name}.py", dict(module=name))


def test_static_table_of_a_sample_triton_module(tmp_path, monkeypatch):
    """Our own small Triton kernels through the whole pipeline: AOT compile for sm_90 in a worker process (no
    GPU, no CUDA toolkit: Triton bundles ptxas and cuobjdump), ptxas report, SASS, occupancy, the CSV and
    Markdown files, and the cache."""
    jobs = [_sample_module(tmp_path, monkeypatch, "profiling_sample_triton", _TRITON_SAMPLE)]
    rows = static.build_table(jobs, {}, workers=1)
    assert [row["status"] for row in rows] == ["ok", "ok"], rows
    matmul, scale = rows
    assert matmul["kernel"] == "tile_matmul[64x64x32,bf16]" and matmul["toolchain"] == "triton"
    assert matmul["config"].endswith("div16=K")
    assert matmul["threads"] == 128 and matmul["registers"] > 0 and matmul["shared_bytes"] > 0
    assert matmul["tensor_ops"].startswith("HGMMA"), matmul  # Triton uses wgmma on sm_90
    assert scale["tensor_ops"] == "none" and scale["occupancy"] > 0 and scale["spill_store_bytes"] == 0

    csv_path, md_path = static.write_table(rows, tmp_path / "out")
    assert "tile_matmul[64x64x32,bf16]" in md_path.read_text()
    cache = static.load_cache(csv_path)
    assert cache[matmul["source_hash"]][0]["registers"] == matmul["registers"]
    # A second run takes every compiled row from the cache: same rows, no compile.
    assert static.build_table(jobs, cache, workers=1) == [cache[r["source_hash"]][0] for r in rows]


@needs_nvcc
def test_static_table_of_sample_cuda_and_numba_kernels(tmp_path, monkeypatch):
    """A .cu file with two `// aot:` configurations (nvcc -cubin -Xptxas -v) and a numba.cuda module with one
    kernel named by AOT_SPECS and one not (numba.cuda.compile_ptx for sm_90, then ptxas)."""
    cu = tmp_path / "sample.cu"
    cu.write_text(_CUDA_SAMPLE)
    jobs = [_sample_module(tmp_path, monkeypatch, "profiling_sample_numba", _NUMBA_SAMPLE),
            *(static.Job("cuda", str(cu), config) for config in static.cuda_configs(_CUDA_SAMPLE))]
    rows = static.build_table(jobs, {}, workers=2)
    by_name = {(row["kernel"], row["config"]): row for row in rows}
    assert all(row["status"] == "ok" for row in rows if row["kernel"] != "profiling_sample_numba.without_spec"), rows

    assert by_name[("wmma_tile", "small -DTILE=16")]["tensor_ops"] == "HMMA:2"
    assert by_name[("wmma_tile", "small -DTILE=16")]["threads"] == 128  # from the aot line
    assert by_name[("wmma_tile", "large -DTILE=64")]["occupancy"] is None  # no launch bounds, no threads=
    assert by_name[("shared_copy", "small -DTILE=16")]["threads"] == 256  # __launch_bounds__ wins
    assert by_name[("shared_copy", "small -DTILE=16")]["shared_bytes"] == 16 * 16 * 4
    assert by_name[("shared_copy", "large -DTILE=64")]["shared_bytes"] == 64 * 64 * 4

    numba_row = by_name[("double[fp32]", "void(float32[:], float32[:])")]
    assert numba_row["registers"] > 0 and numba_row["threads"] == 256 and numba_row["occupancy"] > 0
    assert by_name[("profiling_sample_numba.without_spec", "-")]["status"].startswith("skipped")


def _registered_triton_specs():
    """(module, spec name) of every AotSpec of every kernellab/triton module, found by importing them."""
    expected = []
    for module_name in static._modules("kernellab.triton"):
        module = importlib.import_module(module_name)
        specs = getattr(module, "AOT_SPECS", None)
        assert specs, f"{module_name} defines no AOT_SPECS (profiling.static compiles its kernels from them)"
        expected += [(static._source_of(module_name), spec.name) for spec in specs]
    return expected


def _table_of(toolchain, tmp_path):
    """The rows of one toolchain's kernels, reusing rows of the committed table whose source hash still matches."""
    committed = static.DEFAULT_OUT / "kernels.csv"
    jobs = [job for job in static.discover() if job.toolchain == toolchain]
    rows = static.build_table(jobs, static.load_cache(committed), workers=2)
    static.write_table(rows, tmp_path)
    failed = [f"{row['kernel']} ({row['source']}): {row['status']}" for row in rows if row["status"].startswith("error")]
    assert not failed, "\n".join(failed)
    return rows


def test_static_table_covers_every_triton_kernel(tmp_path):
    """Every AotSpec of every kernellab/triton module compiles for sm_90 and has its row."""
    rows = _table_of("triton", tmp_path)
    have = {(row["source"], row["kernel"]) for row in rows if row["status"] == "ok"}
    missing = [spec for spec in _registered_triton_specs() if spec not in have]
    assert not missing, f"Triton kernels missing from the table: {missing}"


@pytest.mark.slow
@needs_nvcc
def test_static_table_covers_every_cu_file(tmp_path):
    """Every kernellab/cuda/*.cu compiles with nvcc for sm_90 and contributes at least one kernel row."""
    rows = _table_of("cuda", tmp_path)
    cu_files = sorted(str(p.relative_to(static.ROOT)) for p in (static.ROOT / "kernellab" / "cuda").glob("*.cu"))
    compiled = {row["source"] for row in rows if row["status"] == "ok" and row["registers"] is not None}
    assert [f for f in cu_files if f not in compiled] == []


# ---------------------------------------------------------------------------------------------- trace

def test_parse_shape_values():
    from profiling.trace import parse_shape

    assert parse_shape(["T=1024", "seqlens=1,7,64", "gate=strong", "initial_state=true", "scale=0.5"]) == dict(
        T=1024, seqlens=[1, 7, 64], gate="strong", initial_state=True, scale=0.5)
    with pytest.raises(ValueError, match="key=value"):
        parse_shape(["T"])


def test_ncu_command_filters_kernels_and_keeps_clocks():
    from profiling.trace import ncu_command

    cmd = ncu_command(["void moe_place<int>(int const*, long long)", "chunk_output"], 3, Path("/tmp/r"),
                      ["python", "-m", "profiling.trace", "--plain"])
    assert "--clock-control none" in cmd and "--profile-from-start off" in cmd
    assert "'regex:^(chunk_output|moe_place)$'" in cmd
    assert "--launch-count 3" in cmd and cmd.endswith("--plain")


def test_top_rows_on_gpu_lists_kernels_only():
    """On a GPU the table ranks kernels by device time; the operators that launched them and our annotations
    (which carry the same device time again) stay out. Fake profiler events stand in for a CUDA run."""
    from types import SimpleNamespace

    from profiling.trace import top_rows

    def event(key, kind, device_us, annotation=False):
        return SimpleNamespace(key=key, device_type=SimpleNamespace(name=kind), is_user_annotation=annotation,
                               self_device_time_total=device_us, self_cpu_time_total=5.0, count=2,
                               cpu_time_total=0.0 if kind == "CUDA" else 9.0, device_time_total=device_us)

    averages = [event("aten::mm", "CPU", 300.0), event("moe[triton]", "CUDA", 400.0, annotation=True),
                event("_grouped_gemm_kernel", "CUDA", 300.0), event("_route_kernel", "CUDA", 100.0)]
    rows = top_rows(averages, "cuda", 10)
    assert [(r["name"], r["self_percent"]) for r in rows] == [("_grouped_gemm_kernel", 75.0), ("_route_kernel", 25.0)]


def test_trace_on_cpu(tmp_path):
    """A real torch.profiler run of the torch backend: Chrome trace, top table with aten ops, no ncu line."""
    from profiling import trace

    result = trace.trace("gated_delta_rule", "torch", dict(T=40, Hk=1, Hv=2, K=16, V=16), "float32", "cpu",
                         calls=2, warmup=1, out=tmp_path, limit=10)
    events = json.loads(result["trace"].read_text())["traceEvents"]
    assert sum(e.get("name") == "gated_delta_rule[torch]" for e in events) == 2  # one range per profiled call
    assert result["rows"] and all(row["self_us"] > 0 for row in result["rows"])
    assert any(row["name"].startswith("aten::") for row in result["rows"])
    assert result["ncu"] is None
    with result["csv"].open() as f:
        assert len(list(csv.DictReader(f))) == len(result["rows"])
    assert "self CPU us" in result["table"].read_text()


# ---------------------------------------------------------------------------------------------- roofline

def _sweep_csv(path, device="cpu", errors=("",) * 5):
    """A small CSV shaped like bench.sweep's: two backends, two ops, measured ceilings, one failed row."""
    header = ["op", "backend", "device", "device_name", "dtype", "shape", "median_ms", "flops", "bytes", "tflops",
              "gbps", "peak_tflops", "peak_gbps", "roofline_fraction", "error"]
    rows = [
        ["moe", "torch", device, "test cpu", "float32", "N=1", 2.0, 2e6, 4e6, 1e-3, 2.0, 0.1, 20.0, 0.1, errors[0]],
        ["moe", "numba", device, "test cpu", "float32", "N=1", 1.0, 2e6, 4e6, 2e-3, 4.0, 0.1, 20.0, 0.2, errors[1]],
        ["moe", "torch", device, "test cpu", "float32", "N=4096", 50.0, 4e9, 1e8, 0.08, 2.0, 0.1, 20.0, 0.8, errors[2]],
        ["gated_delta_rule", "torch", device, "test cpu", "float32", "T=1024", 10.0, 5e8, 2e7, 0.05, 2.0, 0.1, 20.0,
         0.5, errors[3]],
        ["gated_delta_rule", "numba", device, "test cpu", "float32", "T=1024", 1.0, 5e8, 2e7, 0.5, 20.0, 0.1, 20.0,
         0.5, errors[4]],
    ]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_roofline_from_synthetic_csv(tmp_path):
    from profiling import roofline

    path = _sweep_csv(tmp_path / "results.csv", errors=("", "", "", "", "parity: relative error 1e-1"))
    frame = roofline.load(path)
    measured = roofline.points(frame)
    assert len(measured) == 4  # the failed row is left out
    assert measured["intensity"].tolist()[:1] == [0.5]
    assert measured["flops_per_s"].tolist()[:1] == [1e9]  # 2e6 FLOP in 2 ms
    assert roofline.ceilings(frame) == {"float32": (0.1e12, 20e9)}
    written = roofline.write(path, "cpu")
    assert written == [tmp_path / "roofline.png"]
    assert written[0].read_bytes()[:4] == b"\x89PNG" and written[0].stat().st_size > 10_000
    assert roofline.main(["--csv", str(path), "--out", str(tmp_path / "other")]) == 0
    assert (tmp_path / "other" / "roofline.png").exists()
    with pytest.raises(ValueError, match="no rows of device"):
        roofline.write(path, "cuda")


# ---------------------------------------------------------------------------------------------- gpu_check

def test_gpu_slug():
    from bench.gpu_check import gpu_slug

    assert gpu_slug("NVIDIA H200") == "h200"
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert gpu_slug("") == "gpu"


def test_gpu_check_without_gpu_exits_3(monkeypatch, tmp_path, capsys):
    from bench import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path)]) == gpu_check.EXIT_NO_GPU == 3
    assert "no CUDA GPU" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


_JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="5">
<testcase classname="tests.ops.test_moe" name="test_moe_gpu[torch.bfloat16-triton]" time="0.1"/>
<testcase classname="tests.ops.test_moe" name="test_moe_gpu[torch.float16-triton]" time="0.1"/>
<testcase classname="tests.ops.test_moe" name="test_moe_gpu[torch.float32-triton]" time="0.1">{failure}</testcase>
<testcase classname="tests.test_gdr" name="test_gdr_gpu[bf16-cuda]" time="0.1"/>
<testcase classname="tests.test_gdr" name="test_gdr_gpu_decode" time="0.1"><skipped message="x"/></testcase>
</testsuite></testsuites>"""


def _fake_runner(failing_test=False, sweep_error="", timeout_step=None):
    """Stands for run_step: writes what each real step would write (pytest log and XML, the sweep's CSV)."""
    def run(step, limit, log):
        step.log, step.seconds = log, 1.0
        out = Path(step.cmd[step.cmd.index("--out") + 1]) if "--out" in step.cmd else log.parent
        if step.name == "parity tests":
            failure = '<failure message="relative error 3e-2 &gt; 1.5e-2"/>' if failing_test else ""
            (log.parent / "pytest.xml").write_text(_JUNIT.format(failure=failure))
            lines = (["FAILED tests/ops/test_moe.py::test_moe_gpu[torch.float32-triton] - AssertionError"]
                     if failing_test else []) + [f"{3 if failing_test else 4} passed, {1 if failing_test else 0} "
                                                 "failed, 1 skipped in 12.34s"]
            log.write_text("\n".join(lines) + "\n")
            step.rc = 1 if failing_test else 0
        elif step.name.startswith("sweep"):
            op = step.cmd[step.cmd.index("--op") + 1]
            results = out / "results.csv"
            if not results.exists():
                _sweep_csv(results, device="cuda", errors=("", sweep_error, "", "", ""))
            log.write_text(f"swept {op}\n")
            step.rc = 0
        else:
            log.write_text("ok\n")
            step.rc = 0
        if step.name == timeout_step:
            step.rc, step.timed_out = -9, True
        return step
    return run


_MACHINE = dict(name="NVIDIA H200", time="2026-11-29T06:00:00+00:00", torch="2.x", cuda="13.0")


def test_gpu_check_summary_and_exit_codes(tmp_path):
    from bench import gpu_check

    ops = ["gated_delta_rule", "moe"]
    code, summary = gpu_check.check(tmp_path / "ok", ops, 480, False, _fake_runner(), _MACHINE)
    text = summary.read_text()
    assert code == gpu_check.EXIT_OK and "PASSED" in text
    assert "4 passed, 0 failed, 1 skipped in 12.34s" in text
    assert "| bfloat16 | 2 | 0 | 0 |" in text and "| float32 | 1 | 0 | 0 |" in text and "| other | 0 | 0 | 1 |" in text
    assert "### moe" in text and "### gated_delta_rule" in text and "| numba | float32 | N=1 | 1 |" in text
    assert "sweep moe" in text and "bench.sweep --op moe --device cuda --preset Qwen3.5-35B-A3B" in text

    code, summary = gpu_check.check(tmp_path / "bad", ops, 480, False, _fake_runner(failing_test=True), _MACHINE)
    text = summary.read_text()
    assert code == gpu_check.EXIT_PARITY and "PARITY FAILED" in text
    assert "FAILED tests/ops/test_moe.py::test_moe_gpu[torch.float32-triton]" in text and "| float32 | 0 | 1 | 0 |" in text

    code, _ = gpu_check.check(tmp_path / "sweep", ops, 480, True, _fake_runner(sweep_error="parity: 2e-1"), _MACHINE)
    assert code == gpu_check.EXIT_PARITY

    code, summary = gpu_check.check(tmp_path / "slow", ops, 480, False, _fake_runner(timeout_step="sweep moe"),
                                    _MACHINE)
    assert code == gpu_check.EXIT_STEP and "timed out" in summary.read_text()


def test_gpu_check_budget(tmp_path):
    """Tests get at most TESTS_LIMIT_S, the sweeps share the rest less the report's reserve, nothing overruns."""
    from bench import gpu_check
    from bench.ops import OPS

    limits, now = {}, [0.0]

    def run_to_the_limit(step, limit, log):  # the worst case: every step runs until it is killed
        limits[step.name] = limit
        now[0] += limit
        step.rc, step.log = 0, log
        return step

    steps = gpu_check.execute(gpu_check.plan(tmp_path, [op for op, _ in gpu_check.SWEEPS], False), tmp_path, 480,
                              run_to_the_limit, clock=lambda: now[0])
    assert limits["parity tests"] == gpu_check.TESTS_LIMIT_S
    sweeps = [v for k, v in limits.items() if k.startswith("sweep")]
    joined = [op for op, _ in gpu_check.SWEEPS if OPS[op].swept_with]  # the fp8 ops, in their bf16 ops' sweeps
    assert joined and "sweep moe+moe_fp8" in limits
    assert len(sweeps) == len(gpu_check.SWEEPS) - len(joined) and min(sweeps) > 30
    assert sum(sweeps) == pytest.approx(480 - gpu_check.TESTS_LIMIT_S - gpu_check.REPORT_RESERVE_S)
    assert now[0] == pytest.approx(480) and all(step.rc == 0 for step in steps)
    starved = gpu_check.execute(gpu_check.plan(tmp_path, ["moe"], False), tmp_path, 3, run_to_the_limit)
    assert all(step.rc is None for step in starved)
    assert gpu_check.verdict(starved, gpu_check.parity_by_dtype(tmp_path / "none.xml"), []) == gpu_check.EXIT_STEP


def test_gpu_check_commands_match_the_sweep_cli(tmp_path):
    """Every sweep command of the plan parses with bench.sweep's own argument parser (so a change of its CLI
    fails here, not on the GPU machine), for every op the sweep knows."""
    from bench import gpu_check, sweep
    from bench.ops import OPS

    steps = gpu_check.plan(tmp_path, [op for op, _ in gpu_check.SWEEPS], skip_tests=False)
    assert {op for op, _ in gpu_check.SWEEPS} == {name for name, spec in OPS.items() if spec.registry}
    for step in steps:
        if step.name.startswith("sweep"):
            args = sweep.parse(step.cmd[3:])
            assert args.device == "cuda" and args.out == tmp_path and args.no_report
    assert steps[0].cmd[1:4] == ["-m", "pytest", "-m"] and "gpu" in steps[0].cmd


def test_sweep_table_keeps_this_runs_gpu_rows(tmp_path):
    import datetime

    from bench.gpu_check import sweep_table

    path = tmp_path / "results.csv"
    path.write_text("op,backend,device,dtype,shape,median_ms,error,timestamp\n"
                    "moe,triton,cuda,bfloat16,N=1,0.5,,2026-11-29T05:00:00Z\n"
                    "moe,triton,cuda,bfloat16,N=4,0.7,,2026-11-29T06:00:05Z\n"
                    "moe,torch,cpu,float32,N=4,9.0,,2026-11-29T06:00:05Z\n"
                    "attention,sdpa,cuda,bfloat16,T=8,0.1,,2026-11-29T06:00:05Z\n")
    since = datetime.datetime(2026, 11, 29, 6, 0, 0, 500000, tzinfo=datetime.timezone.utc)
    rows = sweep_table(path, ["moe"], since=since)
    assert [(r["backend"], r["shape"], r["median_ms"], r["error"]) for r in rows] == [("triton", "N=4", 0.7, "")]
    assert len(sweep_table(path, ["moe", "attention"])) == 3


def test_parity_from_the_log_when_pytest_was_killed(tmp_path):
    """No JUnit XML (pytest killed at its timeout): the per-dtype counts come from the -v lines written so far."""
    from bench.gpu_check import parity_by_dtype

    log = tmp_path / "parity_tests.log"
    log.write_text("tests/ops/test_moe.py::test_moe_gpu[torch.bfloat16-triton] PASSED          [  1%]\n"
                   "tests/ops/test_moe.py::test_moe_gpu[torch.float16-cuda] FAILED             [  2%]\n"
                   "tests/toolchains/test_numba.py::test_numba_cuda_on_gpu[dtype2] SKIPPED (x)       [  3%]\n"
                   "tests/test_gdr.py::test_gdr_gpu[fp32-triton] PASSED                   [  4%]\n")
    counts = parity_by_dtype(tmp_path / "missing.xml", log)
    assert counts["bfloat16"]["passed"] == 1 and counts["float16"]["failed"] == 1
    assert counts["other"]["skipped"] == 1 and counts["float32"]["passed"] == 1


def test_gpu_check_run_step_logs_and_kills_at_timeout(tmp_path):
    import sys

    from bench.gpu_check import Step, run_step

    done = run_step(Step("echo", [sys.executable, "-c", "print('hello from the step')"]), 60, tmp_path / "a.log")
    assert (done.rc, done.timed_out, done.outcome) == (0, False, "ok")
    assert "hello from the step" in (tmp_path / "a.log").read_text()
    slow = run_step(Step("slow", [sys.executable, "-c", "import time; print('start', flush=True); time.sleep(60)"]),
                    2, tmp_path / "b.log")
    assert slow.timed_out and slow.seconds < 30 and slow.outcome.startswith("timed out")
    assert "start" in (tmp_path / "b.log").read_text()
