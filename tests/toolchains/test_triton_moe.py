"""The Triton MoE kernels (kernellab/triton/{route, moe_align, moe_permute, grouped_gemm, moe}.py) beyond the shared
parity suite (tests/ops/test_moe.py): tie breaking in routing, permutation across chunk boundaries, the row-bound (no
synchronisation) path, the block-aligned layout's invariants, forced BLOCK_M of the grouped GEMM, the decode and
prefill paths of the fused layer, and an ahead-of-time sm_90 compile of representative kernels. CPU tests run
under TRITON_INTERPRET=1 at small shapes; GPU-marked tests check bf16 and addressing past 2^31 elements."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernellab
from bench.ops import make
from bench.ops.moe import group_offsets, routing_ids
from tests.helpers import assert_close, poisoned_allocations, to_float64

tm = pytest.importorskip("kernellab.triton.moe")
from kernellab.triton import (grouped_gemm as tgg, moe_align as talign, moe_permute as tperm,  # noqa: E402
                            route as troute)

MOE_MODULES = (troute, talign, tperm, tgg, tm)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16]
ROOT = Path(__file__).resolve().parents[2]

# (N, E, top_k, routing keywords): the MoE edge cases, at sizes that cross the interpreter's chunks of 64 slots.
CASES = {
    "one_token": dict(N=1, E=8, top_k=8),
    "empty_experts_skewed": dict(N=50, E=16, top_k=3, routing="skewed"),
    "one_expert": dict(N=40, E=8, top_k=1, routing="one_expert"),
    "top_k_equals_E": dict(N=20, E=6, top_k=6),
    "dropped_int64": dict(N=45, E=8, top_k=3, drop=0.3, id_dtype=torch.int64),
    "all_dropped": dict(N=6, E=4, top_k=2, drop=1.0),
}


class NoHostSync:
    """Within the block, reading a tensor's values on the host (item, tolist, int, bool, float) raises."""

    def __enter__(self):
        def refuse(*args, **kwargs):
            raise AssertionError("host synchronisation")
        self.saved = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__int__", "__bool__",
                                                                     "__float__", "__index__")}
        for name in self.saved:
            setattr(torch.Tensor, name, refuse)

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(torch.Tensor, name, fn)


def _moe_args(case, dtype, seed, **shape):
    args = make("moe", **(CASES[case] | shape), dtype=dtype, seed=seed, device=DEVICE)
    return args, kernellab.moe(**to_float64({k: v.cpu() for k, v in args.items()}), backend="reference")


# ------------------------------------------------------------------------------------------------- route

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_route_breaks_ties_by_lowest_index(dtype):
    """Equal probabilities: the lower expert index comes first, as torch.topk does on distinct values."""
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 1.0, 0.5, 1.0]] * 3, dtype=dtype, device=DEVICE)
    weights, ids = troute.route(logits, 5, renormalize=False)
    assert ids.tolist() == [[1, 2, 4, 0, 5]] * 3
    probs = torch.softmax(logits.double(), -1)
    assert_close(weights, probs[:, [1, 2, 4, 0, 5]], torch.float32, "weights", seed=None)


@pytest.mark.parametrize("E, top_k", [(10, 3), (5, 5), (40, 8)])
def test_route_matches_reference_across_blocks(E, top_k, seed):
    """N = 37 spans several token blocks; E not a power of two leaves masked columns."""
    args = make("route", N=37, E=E, top_k=top_k, seed=seed, routing="skewed", device=DEVICE)
    with poisoned_allocations():
        weights, ids = troute.route(**args)
    ref_weights, ref_ids = kernellab.route(**{k: v.cpu() if torch.is_tensor(v) else v for k, v in args.items()},
                                         backend="reference")
    assert ids.dtype == torch.int32 and torch.equal(ids.cpu(), ref_ids), f"seed={seed}"
    assert_close(weights, ref_weights.double(), torch.float32, "weights", seed)


# ------------------------------------------------------------------------------------------ permutation

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_permute_matches_reference(case, dtype, seed):
    args = make("moe_permute", **CASES[case], D=20, dtype=dtype, seed=seed, device=DEVICE)
    with poisoned_allocations():
        p = tperm.moe_permute(**args)
    ref = kernellab.moe_permute(**{k: v.cpu() if torch.is_tensor(v) else v for k, v in args.items()},
                              backend="reference")
    assert p.offsets.dtype == torch.int32 and p.source.dtype == torch.int64
    assert torch.equal(p.offsets.cpu(), ref.offsets), f"seed={seed}"
    assert torch.equal(p.source.cpu(), ref.source), f"seed={seed}"
    assert torch.equal(p.x.cpu(), ref.x), f"seed={seed}"


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
def test_permute_with_row_bound_does_not_synchronise(id_dtype, seed):
    """max_rows = N * top_k: no host read; the first M rows are API.md's, the rest have source -1 and x 0, and
    moe_unpermute of the bounded permutation equals the reference."""
    N, E, top_k = 70, 8, 3
    args = make("moe_permute", N=N, D=12, E=E, top_k=top_k, drop=0.25, id_dtype=id_dtype, seed=seed,
                       device=DEVICE)
    with poisoned_allocations(), NoHostSync():
        p = tperm.moe_permute(**args, max_rows=N * top_k)
    ref = kernellab.moe_permute(**{k: v.cpu() if torch.is_tensor(v) else v for k, v in args.items()},
                              backend="reference")
    M = int(ref.offsets[-1])
    assert p.x.shape == (N * top_k, 12) and p.source.shape == (N * top_k,)
    assert torch.equal(p.offsets.cpu(), ref.offsets)
    assert torch.equal(p.source[:M].cpu(), ref.source) and (p.source[M:] == -1).all()
    assert torch.equal(p.x[:M].cpu(), ref.x) and (p.x[M:] == 0).all()

    weights = torch.rand(N, top_k, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    y_sorted = torch.randn(N * top_k, 12, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)
    with poisoned_allocations(), NoHostSync():
        y = tperm.moe_unpermute(y_sorted, p, weights)
    ref.x = ref.x.double()
    expected = kernellab.moe_unpermute(y_sorted[:M].cpu().double(), ref, weights.cpu().double(), backend="reference")
    assert_close(y, expected, torch.float32, "y", seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["one_token", "dropped_int64", "top_k_equals_E"], ids=str)
def test_unpermute_matches_reference(case, dtype, seed):
    args = make("moe_unpermute", **CASES[case], D=24, dtype=dtype, seed=seed)
    args = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in args.items()}
    args["p"].source = args["p"].source.to(DEVICE)
    with poisoned_allocations():
        y = tperm.moe_unpermute(**args)
    ref = kernellab.moe_unpermute(**to_float64({k: v.cpu() if torch.is_tensor(v) else v for k, v in args.items()}),
                                backend="reference")
    assert_close(y, ref, dtype, "y", seed)


def _check_block_aligned(row_map, block_expert, num_blocks, ids_flat, E, block_m, contiguous_rows=None):
    """The invariants of the block-aligned layout (see kernellab.triton.moe_align.align_slots)."""
    row_map, block_expert, ids_flat = row_map.cpu().long(), block_expert.cpu().long(), ids_flat.cpu().long()
    counts = torch.bincount(ids_flat[ids_flat >= 0], minlength=E)
    blocks = int(num_blocks)
    # Exactly one partly filled block per non-empty expert at most, none for an empty one.
    assert blocks == int(((counts + block_m - 1) // block_m).sum())
    assert blocks <= talign.max_aligned_blocks(ids_flat.numel(), E, block_m)
    assert (block_expert[blocks:] == -1).all()
    used = block_expert[:blocks]
    assert (used >= 0).all() and (used.diff() >= 0).all(), "blocks in ascending expert order"
    assert torch.equal(torch.bincount(used, minlength=E), (counts + block_m - 1) // block_m)
    rows = row_map[:blocks * block_m].view(blocks, block_m)
    start = 0
    for e in range(E):
        mine = rows[used == e].reshape(-1)
        n = int(counts[e])
        assert (mine[n:] == -1).all(), f"expert {e}: padding only after its rows"
        if contiguous_rows is None:  # slots of expert e, ascending (stable)
            expected = torch.nonzero(ids_flat == e).reshape(-1)
        else:  # rows already grouped: offsets[e] + i
            expected = torch.arange(start, start + n)
        assert torch.equal(mine[:n], expected), f"expert {e}: rows"
        start += n


@pytest.mark.parametrize("one_program", [False, True], ids=["spread", "one_program"])
@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_block_aligned_layout_invariants(case, block_m, one_program, seed):
    weights, ids = routing_ids(**CASES[case], seed=seed, device=DEVICE)
    E = CASES[case]["E"]
    with poisoned_allocations(), NoHostSync():
        row_map, block_expert, num_blocks, offsets = talign.align_slots(ids, E, block_m, one_program=one_program)
    _check_block_aligned(row_map, block_expert, num_blocks, ids.reshape(-1), E, block_m)
    assert torch.equal(offsets.cpu(), group_offsets(ids.cpu(), E))


def test_block_table_of_grouped_rows(seed):
    """grouped_gemm's table from offsets: row_map holds offsets[e] + i, empty groups get no block."""
    _, ids = routing_ids(N=60, E=16, top_k=2, routing="skewed", seed=seed, device=DEVICE)
    offsets = group_offsets(ids, 16)
    sorted_ids = torch.sort(ids.reshape(-1)[ids.reshape(-1) >= 0].cpu()).values
    M, block_m = int(offsets[-1]), 16
    max_blocks = talign.max_aligned_blocks(M, 16, block_m)
    row_map = torch.empty(max_blocks * block_m, dtype=torch.int32, device=DEVICE)
    block_expert, num_blocks = talign.block_table(offsets, row_map, max_blocks, block_m, contiguous=True)
    _check_block_aligned(row_map, block_expert, num_blocks, sorted_ids, 16, block_m, contiguous_rows=True)


def test_decode_layout_does_not_pad_to_the_prefill_tile():
    """One token, top-8 of 256 experts: 8 blocks of 16 rows (128), not 8 x 64 = 512."""
    ids = torch.randperm(256)[:8].to(torch.int32).view(1, 8).to(DEVICE)
    row_map, block_expert, num_blocks, _ = talign.align_slots(ids, 256, talign.DECODE_BLOCK_M, one_program=True)
    assert int(num_blocks) == 8 and row_map.numel() <= 9 * 16


# ----------------------------------------------------------------------------------------- grouped GEMM

@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["one_token", "empty_experts_skewed", "one_expert", "all_dropped"], ids=str)
def test_grouped_gemm_forced_block_m(case, dtype, block_m, seed):
    shape = {k: v for k, v in CASES[case].items() if k != "id_dtype"}
    args = make("grouped_gemm", **shape, K=40, Nout=24, dtype=dtype, seed=seed, device=DEVICE)
    with poisoned_allocations(), NoHostSync():
        y = tgg.grouped_gemm(**args, block_m=block_m)
    ref = kernellab.grouped_gemm(**to_float64({k: v.cpu() for k, v in args.items()}), backend="reference")
    assert_close(y, ref, dtype, "y", seed, tol=1e-3 if DEVICE == "cuda" and dtype == torch.float32 else None)


# ------------------------------------------------------------------------------------------ fused layer

@pytest.mark.parametrize("path", ["decode", "prefill"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fused_layer_paths(case, dtype, path, seed):
    args, ref = _moe_args(case, dtype, seed, D=24, I=20)
    with poisoned_allocations(), NoHostSync():
        y = tm.moe(**args, path=path)
    assert y.dtype == dtype
    assert_close(y, ref, dtype, f"y ({path})", seed, tol=1e-3 if DEVICE == "cuda" and dtype == torch.float32
                 else None)


def test_fused_layer_is_deterministic_and_ignores_dropped_weights(seed):
    args, ref = _moe_args("dropped_int64", torch.float32, seed, D=16, I=16)
    args["weights"] = args["weights"].masked_fill(args["ids"] < 0, float("nan"))
    first = tm.moe(**args, path="prefill")
    assert torch.equal(first, tm.moe(**args, path="prefill"))
    assert_close(first, ref, torch.float32, "y", seed, tol=1e-3 if DEVICE == "cuda" else None)


def test_fused_layer_rejects_unknown_path():
    args, _ = _moe_args("one_token", torch.float32, 0, D=16, I=16)
    with pytest.raises(ValueError, match="path"):
        tm.moe(**args, path="fast")


# ------------------------------------------------------------------------------------------ ahead of time

AOT_CHECK = """
import json, sys, importlib, triton
from triton.backends.compiler import GPUTarget
from profiling.static import triton_source
MODULES = ("route", "moe_align", "moe_permute", "grouped_gemm", "moe")
found = {}
for spec in (spec for name in MODULES for spec in importlib.import_module(f"kernellab.triton.{name}").AOT_SPECS):
    if not any(part in spec.name for part in sys.argv[1:]):
        continue
    k = triton.compile(triton_source(spec), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    found[spec.name] = dict(wgmma="wgmma" in k.asm["ptx"], mma="mma.sync" in k.asm["ptx"], shared=k.metadata.shared)
print(json.dumps(found))
"""


def test_aot_specs_name_every_kernel_and_compile_for_sm90():
    """Every @triton.jit kernel of the MoE modules (named *_kernel) has a spec; the fused prefill GEMM reaches wgmma
    and the decode one mma.sync in bf16 (a compile without GPU; the full table is profiling.static's)."""
    specs = [spec for module in MOE_MODULES for spec in module.AOT_SPECS]
    jitted = {f"{module.__name__}:{name}" for module in MOE_MODULES for name, value in vars(module).items()
              if isinstance(value, tgg.triton.runtime.KernelInterface)
              and name.endswith("_kernel")}  # helpers called from kernellab (e.g. _padded_starts) are inlined
    assert jitted == {spec.kernel for spec in specs}
    def representative(name):
        prefill_gemm = name.startswith(("moe.gemm[gate_up,", "moe.gemm[down,")) and ",w=8,s=3]" in name
        decode_gemm = name.startswith("moe.gemm[down,") and "BM=16,BN=64,BK=128" in name
        return prefill_gemm or decode_gemm or name.startswith(("route[", "moe_align.align_one_program"))

    picks = [spec.name for spec in specs if representative(spec.name)]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NUMBA_ENABLE_CUDASIM")}
    run = subprocess.run([sys.executable, "-c", AOT_CHECK, *picks], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(found) == set(picks)
    for name, info in found.items():
        if "BM=128" in name:
            assert info["wgmma"], f"{name}: no wgmma"
        if "BM=16" in name:
            assert info["mma"], f"{name}: no mma.sync"


# ----------------------------------------------------------------------------------------------- on a GPU

@pytest.mark.gpu
@pytest.mark.parametrize("path", ["decode", "prefill"])
@pytest.mark.parametrize("case", ["one_token", "empty_experts_skewed", "dropped_int64"], ids=str)
def test_fused_layer_bf16_gpu(case, path, seed):
    args, ref = _moe_args(case, torch.bfloat16, seed, N=64 if path == "decode" else 300, D=256, I=128)
    y = tm.moe(**args, path=path)
    assert_close(y, ref, torch.bfloat16, "y", seed)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["moe_permute", "grouped_gemm"])
def test_bf16_gpu_ops(op, seed):
    if op == "moe_permute":
        args = make(op, N=777, D=256, E=64, top_k=8, drop=0.1, dtype=torch.bfloat16, seed=seed,
                           device="cuda")
        p = tperm.moe_permute(**args)
        ref = kernellab.moe_permute(**{k: v.cpu() if torch.is_tensor(v) else v for k, v in args.items()},
                                  backend="reference")
        assert torch.equal(p.source.cpu(), ref.source) and torch.equal(p.x.cpu(), ref.x)
    else:
        args = make(op, N=777, E=64, top_k=8, K=512, Nout=256, dtype=torch.bfloat16, seed=seed,
                           device="cuda", routing="skewed")
        ref = kernellab.grouped_gemm(**to_float64({k: v.cpu() for k, v in args.items()}), backend="reference")
        assert_close(tgg.grouped_gemm(**args), ref, torch.bfloat16, "y", seed)


@pytest.mark.gpu
def test_grouped_gemm_addresses_past_2_31_elements_gpu(seed):
    """x and y hold more than 2^31 elements: the last group's rows must land where they belong."""
    K, Nout = 2048, 2048
    M = 2**31 // K + 1000
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.randn(2, Nout, K, device="cuda", dtype=torch.bfloat16, generator=gen) * K ** -0.5
    offsets = torch.tensor([0, M - 300, M], dtype=torch.int32, device="cuda")
    y = tgg.grouped_gemm(x, w, offsets)
    assert_close(y[-300:], x[-300:].double() @ w[1].double().T, torch.bfloat16, "y tail", seed)
    assert_close(y[:300], x[:300].double() @ w[0].double().T, torch.bfloat16, "y head", seed)
