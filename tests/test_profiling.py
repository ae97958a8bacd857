"""profiling/ and bench.gpu_check: the static sm_90 table, traces, rooflines and the GPU run script, on CPU."""
import csv
import importlib
import json
import shutil
import textwrap
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


def test_cuda_aot_lines():
    configs = static.cuda_configs("// aot: decode threads=128 dynamic_smem=4096 -DK=128 -DV=128\n__global__ ...")
    assert configs == [dict(label="decode", threads=128, dynamic_smem=4096, flags=["-DK=128", "-DV=128"])]
    assert static.cuda_configs("__global__ void f() {}")[0]["label"] == "default"


_TRITON_SAMPLE = '''
import triton
import triton.language as tl
from kernels.triton import AotSpec


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
            {"a": "*bf16", "b": "*bf16", "c": "*bf16", "K": "i32", "BM": "constexpr", "BN": "constexpr",
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


@needs_nvcc
def test_static_table_of_sample_kernels(tmp_path, monkeypatch):
    """Our own small kernels, one per toolchain, through the whole pipeline: compile for sm_90 in worker
    processes, ptxas report, SASS, occupancy, the CSV and Markdown files, and the cache."""
    (tmp_path / "profiling_sample_triton.py").write_text(_TRITON_SAMPLE)
    (tmp_path / "profiling_sample_numba.py").write_text(_NUMBA_SAMPLE)
    cu = tmp_path / "sample.cu"
    cu.write_text(_CUDA_SAMPLE)
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers get the parent's sys.path
    jobs = [static.Job("triton", "profiling_sample_triton.py", dict(module="profiling_sample_triton")),
            static.Job("numba", "profiling_sample_numba.py", dict(module="profiling_sample_numba")),
            *(static.Job("cuda", str(cu), config) for config in static.cuda_configs(_CUDA_SAMPLE))]
    rows = static.build_table(jobs, {}, workers=2)
    by_name = {(row["kernel"], row["config"]): row for row in rows}
    assert all(row["status"] == "ok" for row in rows if row["kernel"] != "profiling_sample_numba.without_spec"), rows

    matmul = next(row for row in rows if row["kernel"] == "tile_matmul[64x64x32,bf16]")
    assert matmul["threads"] == 128 and matmul["registers"] > 0 and matmul["shared_bytes"] > 0
    assert matmul["tensor_ops"].startswith("HGMMA"), matmul  # Triton uses wgmma on sm_90
    scale = next(row for row in rows if row["kernel"] == "scale[1024,fp32]")
    assert scale["tensor_ops"] == "none" and scale["occupancy"] > 0

    assert by_name[("wmma_tile", "small -DTILE=16")]["tensor_ops"] == "HMMA:2"
    assert by_name[("wmma_tile", "small -DTILE=16")]["threads"] == 128  # from the aot line
    assert by_name[("wmma_tile", "large -DTILE=64")]["occupancy"] is None  # no launch bounds, no threads=
    assert by_name[("shared_copy", "small -DTILE=16")]["threads"] == 256  # __launch_bounds__ wins
    assert by_name[("shared_copy", "small -DTILE=16")]["shared_bytes"] == 16 * 16 * 4
    assert by_name[("shared_copy", "large -DTILE=64")]["shared_bytes"] == 64 * 64 * 4

    numba_row = next(row for row in rows if row["kernel"] == "double[fp32]")
    assert numba_row["registers"] > 0 and numba_row["threads"] == 256
    assert next(row for row in rows if row["kernel"].endswith("without_spec"))["status"].startswith("skipped")

    csv_path, md_path = static.write_table(rows, tmp_path / "out")
    assert "tile_matmul[64x64x32,bf16]" in md_path.read_text()
    cache = static.load_cache(csv_path)
    assert cache[matmul["source_hash"]][0]["registers"] == matmul["registers"]
    # A second run takes every compiled row from the cache.
    again = static.build_table(jobs[:1], cache, workers=1)
    assert [row["source_hash"] for row in again] == [matmul["source_hash"], scale["source_hash"]]


def _registered_triton_specs():
    """(module, spec name) of every AotSpec of every kernels/triton module, found by importing them."""
    expected = []
    for module_name in static._modules("kernels.triton"):
        module = importlib.import_module(module_name)
        specs = getattr(module, "AOT_SPECS", None)
        assert specs, f"{module_name} defines no AOT_SPECS (profiling.static compiles its kernels from them)"
        expected += [(static._source_of(module_name), spec.name) for spec in specs]
    return expected


@needs_nvcc
def test_static_table_covers_every_gpu_kernel(tmp_path):
    """Every AotSpec of every Triton module and every .cu file of the lab compiles for sm_90 and has a row.
    Rows of the committed table are reused when their source hash still matches."""
    committed = static.DEFAULT_OUT / "kernels.csv"
    rows = static.build_table(static.discover(), static.load_cache(committed), workers=2)
    static.write_table(rows, tmp_path)
    failed = [f"{row['kernel']} ({row['source']}): {row['status']}" for row in rows if row["status"].startswith("error")]
    assert not failed, "\n".join(failed)
    have = {(row["source"], row["kernel"]) for row in rows if row["toolchain"] == "triton"}
    missing = [spec for spec in _registered_triton_specs() if spec not in have]
    assert not missing, f"Triton kernels missing from the table: {missing}"
    cu_files = sorted(str(p.relative_to(static.ROOT)) for p in (static.ROOT / "kernels" / "cuda").glob("*.cu"))
    compiled = {row["source"] for row in rows if row["toolchain"] == "cuda" and row["status"] == "ok"}
    assert [f for f in cu_files if f not in compiled] == []
