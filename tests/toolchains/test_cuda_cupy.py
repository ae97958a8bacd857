"""The cuda (CUDA C++ through NVRTC) and cupy backends.

Without a GPU: every kernellab/cuda/*.cu compiles with nvcc for sm_90 with no register spills in its main kernels,
the grouped GEMM is built on tensor-core instructions, and the host-side part of the cuda chunked gated delta
rule (torch's WY solve and outputs around the CUDA state pass) is exact when a torch model of the kernel stands in
for it. On a GPU (marked gpu): parity of every cuda and cupy backend with the float64 reference in float32,
float16 and bfloat16, edge cases included.
"""
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import kernellab
from bench.check import state_tolerance
from bench.ops import make
from kernellab import registry
from kernellab.cuda import SOURCES
from profiling.static import parse_ptxas
from tests.helpers import TOLERANCE, TOLERANCE_TF32, assert_close, poisoned_allocations, to_float64

CUDA_DIR = Path(kernellab.__file__).parent / "cuda"
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) not found on this machine")


def _nvcc(source, *flags):
    result = subprocess.run([NVCC, "-arch=sm_90", "-std=c++17", "-I", str(CUDA_DIR), *flags, str(CUDA_DIR / source)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"nvcc failed on {source}:\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_cu_compiles_for_sm90_without_spills(source, tmp_path):
    report = _nvcc(source, "-cubin", "-Xptxas", "-v", "-o", str(tmp_path / "kernel.cubin"))
    entries = parse_ptxas(report.stdout + report.stderr)
    for prefix in SOURCES[source]:
        found = {name: entry for name, entry in entries.items() if prefix in name}
        assert found, f"{source}: no instantiation of {prefix} in the cubin"
        for name, entry in found.items():
            assert entry["spill_store_bytes"] == 0 and entry["spill_load_bytes"] == 0, f"{name} spills: {entry}"
            assert entry["stack_bytes"] == 0, f"{name} uses a stack frame (local memory): {entry}"


@needs_nvcc
def test_grouped_gemm_runs_on_tensor_cores(tmp_path):
    """Every instantiation of moe_grouped_gemm issues warp-level MMA (wmma.mma.sync in PTX, HMMA in SASS)."""
    _nvcc("moe.cu", "-ptx", "-o", str(tmp_path / "moe.ptx"))
    ptx = (tmp_path / "moe.ptx").read_text()
    bodies = re.split(r"\.visible \.entry ", ptx)[1:]
    gemms = {body.split("(", 1)[0]: body for body in bodies if "moe_grouped_gemm" in body.split("(", 1)[0]}
    assert len(gemms) == 3, f"expected float, half and bfloat16 instantiations, got {list(gemms)}"
    for name, body in gemms.items():
        assert "wmma.mma.sync" in body, f"{name} has no tensor-core MMA"


def _torch_state_pass(k, w, u, gcum, h0, state_dtype):
    """What gdr_chunk_state computes, in torch (kernellab/cuda/gated_delta_rule.cu documents it); w None: linear
    attention's state pass. The state is float32, rounded to state_dtype after every chunk; h and the final state
    are returned in state_dtype."""
    from kernellab.cuda.gated_delta_rule import CHUNK

    N, Hv, Tp, K = k.shape
    S = torch.zeros(N, Hv, K, u.shape[-1]) if h0 is None else h0.to(state_dtype).float()
    states, values = [], []
    for start in range(0, Tp, CHUNK):
        span = slice(start, start + CHUNK)
        states.append(S.clone())
        v_new = u[:, :, span] if w is None else u[:, :, span] - w[:, :, span] @ S
        values.append(v_new)
        last = gcum[:, :, start + CHUNK - 1]
        decay = (last[..., None] - gcum[:, :, span]).exp()
        S = last.exp()[..., None, None] * S + (k[:, :, span] * decay[..., None]).transpose(-1, -2) @ v_new
        S = S.to(state_dtype).float()
    return torch.stack(states, 2).to(state_dtype), torch.cat(values, 2), S.to(state_dtype)


GDR_CASES = {
    "one_token": dict(T=1),
    "chunk_tail_initial_state": dict(T=70, initial_state=True),
    "packed_with_length_one": dict(seqlens=[5, 1, 130], initial_state=True),
    "strong_decay_beta_high_no_l2norm": dict(B=2, T=64, gate="strong", beta="high", use_qk_l2norm=False),
    "no_decay_beta_low": dict(T=40, gate="zero", beta="low"),
}


def _with_state_dtype(args, state_dtype):
    """args with their initial state (if any) in state_dtype, checked by kernellab.validate with that state_dtype."""
    if args["initial_state"] is not None:
        args["initial_state"] = args["initial_state"].to(state_dtype)
    return args | dict(state_dtype=state_dtype)


def _state_tolerances(dtype, state_dtype, T):
    """(o's, the state's) tolerance: the input dtype's (float32's for the state), plus a state_dtype state's
    rounding, once per chunk at most (T times)."""
    if state_dtype == torch.float32:
        return TOLERANCE[dtype], TOLERANCE[torch.float32]
    return state_tolerance(dtype, "cpu", state_dtype, T), state_tolerance(torch.float32, "cpu", state_dtype, T)


@pytest.mark.parametrize("case", GDR_CASES.values(), ids=GDR_CASES.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_chunk_host_side_on_cpu(case, dtype, state_dtype, seed):
    from kernellab.cuda.gated_delta_rule import chunk_gated_delta_rule

    raw = _with_state_dtype(make("gated_delta_rule", dtype=dtype, seed=seed, **case), state_dtype)
    args = kernellab.validate.gated_delta_rule(**raw)
    ref_o, ref_s = kernellab.get("gated_delta_rule", "reference")(**to_float64(args))
    del args["mode"]
    with poisoned_allocations():
        o, s = chunk_gated_delta_rule(**args, state_pass=_torch_state_pass)
    assert o.dtype == dtype and s.dtype == state_dtype
    o_tol, s_tol = _state_tolerances(dtype, state_dtype, args["q"].shape[1])
    assert_close(o, ref_o, dtype, "chunk o", seed, o_tol)
    assert_close(s, ref_s, torch.float32, "chunk final state", seed, s_tol)


LA_CASES = {
    "one_token": dict(T=1),
    "chunk_tail_initial_state": dict(T=70, initial_state=True),
    "packed_with_length_one": dict(seqlens=[5, 1, 130], initial_state=True),
    "no_gate": dict(B=2, T=65, gate=None),
    "strong_decay": dict(T=64, gate="strong"),
}


@pytest.mark.parametrize("case", LA_CASES.values(), ids=LA_CASES.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_cuda_linear_attention_host_side_on_cpu(case, dtype, state_dtype, seed):
    from kernellab.cuda.linear_attention import linear_attention

    raw = _with_state_dtype(make("linear_attention", dtype=dtype, seed=seed, **case), state_dtype)
    args = kernellab.validate.linear_attention(**raw)
    ref_o, ref_s = kernellab.get("linear_attention", "reference")(**to_float64(args))
    with poisoned_allocations():
        o, s = linear_attention(**args, state_pass=_torch_state_pass)
    assert o.dtype == dtype and s.dtype == state_dtype
    o_tol, s_tol = _state_tolerances(dtype, state_dtype, args["q"].shape[1])
    assert_close(o, ref_o, dtype, "linear attention o", seed, o_tol)
    assert_close(s, ref_s, torch.float32, "linear attention final state", seed, s_tol)


def _serving_call(K, seed, device, *, mode, verify, fused, out_rows):
    """A packed gated delta rule call on a pool with the serving keywords: sequences of 130, 1, 64 tokens and a
    padding slot (-1), pool [5, 2, K, 16] float32; verify (the state after every token, the pool left as is) or
    chunk_states_every=64; fused gating (raw a, A_log, dt_bias, beta logits); out_rows: output_state_indices
    overlapping the rows read. Returns the arguments (float32, on device)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [130, 1, 64, 7]
    T, V, Hv = sum(lengths), 16, 2
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    k = randn(1, T, 1, K)
    args = dict(q=randn(1, T, 1, K), k=k / k.norm(dim=-1, keepdim=True), v=randn(1, T, Hv, V),
                initial_state=randn(5, Hv, K, V), cu_seqlens=torch.tensor([0, 130, 131, 195, 202]),
                state_indices=torch.tensor([3, 0, -1, 1], dtype=torch.int32), mode=mode)
    if fused:
        args |= dict(g=randn(1, T, Hv), A_log=randn(Hv) * 0.5, dt_bias=randn(Hv), beta=randn(1, T, Hv),
                     beta_logits=True)
    else:
        args |= dict(g=-torch.rand(1, T, Hv, generator=gen, dtype=torch.float64) * 0.5,
                     beta=torch.rand(1, T, Hv, generator=gen, dtype=torch.float64))
    if verify:
        args["output_intermediate_states"] = True
    else:
        args["chunk_states_every"] = 128
    if out_rows:
        args["output_state_indices"] = torch.tensor([0, 4, -1, 3], dtype=torch.int32)
    return {name: (x.to(device, torch.float32) if isinstance(x, torch.Tensor) and x.is_floating_point()
                   else x.to(device) if isinstance(x, torch.Tensor) else x) for name, x in args.items()}


def _check_serving(call, args, seed, tol):
    """call(**args) against the reference in float64: outputs, the trace, the pool (written rows, untouched rows
    bitwise)."""
    ref_args = {name: (x.cpu().double() if isinstance(x, torch.Tensor) and x.is_floating_point()
                       else x.cpu() if isinstance(x, torch.Tensor) else x) for name, x in args.items()}
    o_ref, _, trace_ref = kernellab.gated_delta_rule(**ref_args, backend="reference")
    before = args["initial_state"].clone()
    o, s, trace = call(**args)
    assert s is None
    assert_close(o.cpu(), o_ref, torch.float32, "o", seed, tol=tol)
    assert_close(trace.states.cpu(), trace_ref.states, torch.float32, "trace", seed, tol=tol)
    assert torch.equal(trace.sequence.cpu(), trace_ref.sequence) and torch.equal(trace.position.cpu(),
                                                                                 trace_ref.position)
    pool, pool_ref = args["initial_state"].cpu(), ref_args["initial_state"]
    written = set() if args.get("output_intermediate_states") else {
        int(r) for r in args.get("output_state_indices", args["state_indices"]) if r >= 0}
    for row in range(pool.shape[0]):
        if row in written:
            assert_close(pool[row], pool_ref[row], torch.float32, f"pool row {row}", seed, tol=tol)
        else:
            assert torch.equal(pool[row], before[row].cpu()), f"pool row {row} changed"


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("out_rows", [False, True])
def test_cuda_chunk_serving_host_side_on_cpu(fused, out_rows, seed):
    """The chunked mode's serving keywords (serving.serve around the host side) with the torch model of the
    state pass: pool with a padding slot, chunk states every 128 tokens, fused gating."""
    from kernellab.cuda.gated_delta_rule import gated_delta_rule

    args = _serving_call(16, seed, "cpu", mode="chunk", verify=False, fused=fused, out_rows=out_rows)

    def call(q, k, v, g, beta, **rest):
        return gated_delta_rule(q, k, v, g, beta, K ** -0.5, rest.pop("initial_state"), False, False,
                                rest.pop("cu_seqlens"), rest.pop("mode"), torch.float32,
                                state_pass=_torch_state_pass, **rest)

    K = args["q"].shape[-1]
    _check_serving(call, args, seed, TOLERANCE[torch.float32])


# ---- GPU parity (skipped without a CUDA GPU) ----
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GPU_BACKENDS = [name for name in ("cuda", "cupy") if name in registry.registered("moe_permute")]


def _names(op):
    return [name for name in GPU_BACKENDS if name in registry.registered(op)]


def _tolerance(dtype):
    return TOLERANCE_TF32 if dtype == torch.float32 else TOLERANCE[dtype]


GPU_GDR_CASES = dict(GDR_CASES, decode_batch=dict(B=64, T=1, Hk=16, Hv=32, K=128, V=128, initial_state=True),
                     head_dim_128=dict(B=2, T=200, Hk=2, Hv=4, K=128, V=128, initial_state=True),
                     odd_head_dims=dict(T=9, K=24, V=40))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["recurrent", "chunk"])
@pytest.mark.parametrize("case", GPU_GDR_CASES.values(), ids=GPU_GDR_CASES.keys())
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("backend", _names("gated_delta_rule"))
def test_gated_delta_rule_on_gpu(backend, dtype, case, mode, seed):
    args = make("gated_delta_rule", dtype=dtype, seed=seed, device="cuda", **case)
    ref_o, ref_s = kernellab.get("gated_delta_rule", "reference")(**to_float64(args))
    before = None if args["initial_state"] is None else args["initial_state"].clone()
    with poisoned_allocations():
        o, s = kernellab.gated_delta_rule(**args, mode=mode, backend=backend)
    assert o.dtype == dtype and s.dtype == torch.float32
    # the chunked host side runs float32 matmuls, which may use tf32
    tol = max(_tolerance(dtype), TOLERANCE_TF32) if mode == "chunk" else TOLERANCE[dtype]
    assert_close(o, ref_o, dtype, f"{backend} {mode} o", seed, tol=tol)
    assert_close(s, ref_s, torch.float32, f"{backend} {mode} state", seed, tol=max(tol, TOLERANCE[torch.float32]))
    if before is not None:
        assert torch.equal(args["initial_state"], before), "the caller's initial state was written"


@pytest.mark.gpu
@pytest.mark.parametrize("K", [24, 128])
@pytest.mark.parametrize("mode, verify", [("recurrent", False), ("recurrent", True), ("chunk", False),
                                          ("chunk", True)])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("out_rows", [False, True])
@pytest.mark.parametrize("backend", [name for name in _names("gated_delta_rule")
                                     if registry.registered("gated_delta_rule")[name].serving])
def test_gated_delta_rule_serving_on_gpu(backend, K, mode, verify, fused, out_rows, seed):
    """The serving keywords on the GPU kernels against the float64 reference: a pool read and written in place
    (a padding slot, output_state_indices overlapping the rows read, rows not indexed bitwise untouched), the
    verify trace (the pool left as is) or the chunk states, fused gating."""
    args = _serving_call(K, seed, "cuda", mode=mode, verify=verify, fused=fused, out_rows=out_rows)
    tol = TOLERANCE_TF32 if mode == "chunk" and not verify else TOLERANCE[torch.float32]
    _check_serving(lambda **a: kernellab.gated_delta_rule(**a, backend=backend), args, seed, tol)


@pytest.mark.gpu
@pytest.mark.parametrize("case", LA_CASES.values(), ids=LA_CASES.keys())
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("backend", _names("linear_attention"))
def test_linear_attention_on_gpu(backend, dtype, case, seed):
    args = make("linear_attention", dtype=dtype, seed=seed, device="cuda", **case)
    ref_o, ref_s = kernellab.get("linear_attention", "reference")(**to_float64(args))
    with poisoned_allocations():
        o, s = kernellab.linear_attention(**args, backend=backend)
    assert o.dtype == dtype and s.dtype == torch.float32
    tol = max(_tolerance(dtype), TOLERANCE_TF32)  # float32 matmuls around the kernel may use tf32
    assert_close(o, ref_o, dtype, f"{backend} o", seed, tol=tol)
    assert_close(s, ref_s, torch.float32, f"{backend} state", seed, tol=TOLERANCE_TF32)


MOE_CASES = {
    "one_token": dict(N=1, E=4, top_k=2),
    "uniform": dict(N=300, E=8, top_k=2),
    "skewed_empty_experts": dict(N=64, E=16, top_k=4, routing="skewed"),
    "one_expert": dict(N=33, E=8, top_k=1, routing="one_expert"),
    "top_k_equals_E_int64": dict(N=16, E=4, top_k=4, id_dtype=torch.int64),
    "dropped_slots_int64": dict(N=600, E=8, top_k=3, drop=0.3, id_dtype=torch.int64),
    "all_dropped": dict(N=5, E=4, top_k=2, drop=1.0),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", MOE_CASES.values(), ids=MOE_CASES.keys())
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("backend", _names("moe_permute"))
def test_moe_kernels_on_gpu(backend, dtype, case, seed):
    args = make("moe_permute", D=72, dtype=dtype, seed=seed, device="cuda", **case)
    expected = kernellab.moe_permute(**args, backend="reference")
    with poisoned_allocations():
        p = kernellab.moe_permute(**args, backend=backend)
    assert torch.equal(p.x, expected.x), f"{backend}: permuted rows differ (seed={seed})"
    assert torch.equal(p.offsets.cpu(), expected.offsets.cpu()) and p.offsets.dtype == torch.int32
    assert torch.equal(p.source.cpu(), expected.source.cpu())
    args = make("moe_unpermute", D=72, dtype=dtype, seed=seed, device="cuda", **case)
    ref = kernellab.moe_unpermute(**to_float64(args), backend="reference")
    with poisoned_allocations():
        out = kernellab.moe_unpermute(**args, backend=backend)
    assert_close(out, ref, dtype, f"{backend} unpermute", seed)
    gemm_case = {k: v for k, v in case.items() if k != "id_dtype"}
    args = make("grouped_gemm", K=96, Nout=80, dtype=dtype, seed=seed, device="cuda", **gemm_case)
    ref = kernellab.grouped_gemm(**to_float64(args), backend="reference")
    with poisoned_allocations():
        out = kernellab.grouped_gemm(**args, backend=backend)
    assert_close(out, ref, dtype, f"{backend} grouped_gemm", seed, tol=_tolerance(dtype))
    args = make("moe", D=64, I=48, dtype=dtype, seed=seed, device="cuda", **case)
    ref = kernellab.moe(**to_float64(args), backend="reference")
    with poisoned_allocations():
        out = kernellab.moe(**args, backend=backend)
    assert_close(out, ref, dtype, f"{backend} moe", seed, tol=_tolerance(dtype))


# ---- the cupy programs on CPU tensors: the same array code through NumPy (the fused CuPy kernels' bodies are
# checked only on a GPU) ----
CUPY_CASES = [
    ("gated_delta_rule", dict(T=1), dict(mode="chunk")),
    ("gated_delta_rule", dict(T=70, initial_state=True), dict(mode="chunk")),
    ("gated_delta_rule", dict(seqlens=[5, 1, 130], initial_state=True), dict(mode="chunk")),
    ("gated_delta_rule", dict(B=2, T=64, gate="strong", beta="high", use_qk_l2norm=False), dict(mode="chunk")),
    ("gated_delta_rule", dict(T=33, gate="zero", beta="low", Hk=3, Hv=3), dict(mode="chunk")),
    ("gated_delta_rule", dict(T=1), dict(mode="recurrent")),
    ("gated_delta_rule", dict(seqlens=[5, 1, 20], initial_state=True), dict(mode="recurrent")),
    ("gated_delta_rule", dict(B=2, T=9, gate="strong", beta="high"), dict(mode="recurrent")),
    ("linear_attention", dict(T=1), {}),
    ("linear_attention", dict(T=70, initial_state=True), {}),
    ("linear_attention", dict(seqlens=[5, 1, 130], initial_state=True), {}),
    ("linear_attention", dict(T=65, gate=None), {}),
    ("linear_attention", dict(B=2, T=64, gate="strong"), {}),
    ("attention", dict(T=1), {}),
    ("attention", dict(T=37), {}),
    ("attention", dict(T=5, Tk=20), {}),
    ("attention", dict(T=9, causal=False), {}),
    ("attention", dict(T=16, Hq=4, Hkv=1), {}),
    ("attention", dict(seqlens=[1, 37, 0, 5]), {}),
    ("attention", dict(B=3, T=2, Tk=30, kv_lens=[2, 17, 30]), {}),
    ("attention", dict(B=2, T=1, Tk=30, kv_lens=[1, 9], causal=False), {}),
    ("route", dict(N=20, E=8, top_k=3), {}),
    ("route", dict(N=1, E=4, top_k=4, renormalize=False), {}),
    *[(op, case, {}) for op in ("moe_permute", "moe_unpermute", "grouped_gemm", "moe") for case in (
        dict(N=1, E=4, top_k=2), dict(N=37, E=8, top_k=3, drop=0.3), dict(N=16, E=8, top_k=1, routing="one_expert"),
        dict(N=16, E=4, top_k=4), dict(N=5, E=4, top_k=2, drop=1.0), dict(N=64, E=16, top_k=4, routing="skewed"))],
]


def _outputs(result):
    if isinstance(result, kernellab.Permutation):
        return dict(x=result.x, offsets=result.offsets, source=result.source)
    return dict(enumerate(result)) if isinstance(result, tuple) else {0: result}


@pytest.mark.parametrize("op, case, extra", CUPY_CASES, ids=[f"{op}-{i}" for i, (op, _, _) in enumerate(CUPY_CASES)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cupy_programs_through_numpy(op, case, extra, dtype, seed):
    if op == "route" and dtype == torch.bfloat16:
        dtype = torch.float16  # route's logits: a second half-precision dtype instead
    args = getattr(kernellab.validate, op)(**make(op, dtype=dtype, seed=seed, **case), **extra)
    exact = op == "moe_permute"  # rows are moved, not computed: compared with the reference on the same dtype
    reference = _outputs(kernellab.get(op, "reference")(**(args if exact else to_float64(args))))
    with poisoned_allocations():
        result = _outputs(registry.registered(op)["cupy"].impl(**args))
    for key, ref in reference.items():
        if ref is None:
            assert result[key] is None
        elif not ref.is_floating_point() or exact:  # ids, offsets, source, permuted rows
            assert torch.equal(result[key].cpu(), ref.cpu()), f"cupy {op} {key} differs (seed={seed})"
            assert result[key].dtype == ref.dtype
        else:
            assert result[key].dtype == (torch.float32 if key == 1 or op == "route" else dtype)
            assert_close(result[key], ref, torch.float32 if key == 1 or op == "route" else dtype,
                         f"cupy {op} {key}", seed)


@pytest.mark.gpu
@pytest.mark.parametrize("op, case, extra", CUPY_CASES, ids=[f"{op}-{i}" for i, (op, _, _) in enumerate(CUPY_CASES)])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_cupy_on_gpu(op, case, extra, dtype, seed):
    args = make(op, dtype=dtype, seed=seed, device="cuda", **case)
    exact = op == "moe_permute"
    reference = _outputs(kernellab.get(op, "reference")(**(args if exact else to_float64(args)), **extra))
    with poisoned_allocations():
        result = _outputs(kernellab.get(op, "cupy")(**args, **extra))
    for key, ref in reference.items():
        if ref is None:
            assert result[key] is None
        elif not ref.is_floating_point() or exact:
            assert torch.equal(result[key].cpu(), ref.cpu()), f"cupy {op} {key} differs (seed={seed})"
        else:
            wide = key == 1 or op == "route"
            assert_close(result[key], ref, torch.float32 if wide else dtype, f"cupy {op} {key}", seed,
                         tol=TOLERANCE_TF32 if wide or dtype == torch.float32 else TOLERANCE[dtype])


def measure_gpu_targets(hbm_bytes_per_s=4.8e12):
    """The issue's GPU targets, printed: the cuda recurrent gated delta rule at decode (B = 64, Hv = 32, d = 128)
    against HBM bandwidth on the state bytes, and every custom kernel against its cupy baseline (and numba_cuda).
    `python -m tests.toolchains.test_cuda_cupy` on a GPU machine (H200 bandwidth by default)."""
    import os
    import statistics

    os.environ["KERNELLAB_TRUST_INPUTS"] = "1"  # no host reads of ids / offsets inside the timed calls

    def milliseconds(fn, repeats=50):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    decode = make("gated_delta_rule", B=64, T=1, Hk=16, Hv=32, K=128, V=128, dtype=torch.bfloat16, device="cuda",
                                     initial_state=True)
    state_bytes = 2 * 64 * 32 * 128 * 128 * 4
    for name in ("cuda", "cupy", "numba_cuda"):
        ms = milliseconds(lambda: kernellab.gated_delta_rule(**decode, mode="recurrent", backend=name))
        print(f"gated_delta_rule decode [{name}]: {ms * 1e3:.1f} us, {state_bytes / ms / 1e9:.0f} GB/s on the "
              f"state = {state_bytes / ms * 1e3 / hbm_bytes_per_s:.0%} of HBM")
    prefill = make("gated_delta_rule", B=1, T=4096, Hk=16, Hv=32, K=128, V=128, dtype=torch.bfloat16, device="cuda",
                                      initial_state=True)
    for name in ("cuda", "cupy"):
        print(f"gated_delta_rule chunk T=4096 [{name}]: "
              f"{milliseconds(lambda: kernellab.gated_delta_rule(**prefill, mode='chunk', backend=name), 10):.3f} ms")
    shapes = dict(N=4096, E=256, top_k=8)
    cases = {
        "moe_permute": make("moe_permute", D=2048, dtype=torch.bfloat16, device="cuda", **shapes),
        "moe_unpermute": make("moe_unpermute", D=2048, dtype=torch.bfloat16, device="cuda", **shapes),
        "grouped_gemm": make("grouped_gemm", K=2048, Nout=1024, dtype=torch.bfloat16, device="cuda", **shapes),
        "moe": make("moe", D=2048, I=512, dtype=torch.bfloat16, device="cuda", **shapes),
    }
    for op, args in cases.items():
        for name in ("cuda", "cupy", "numba_cuda"):
            if name in registry.registered(op):
                print(f"{op} N=4096 E=256 top-8 bf16 [{name}]: "
                      f"{milliseconds(lambda: kernellab.get(op, name)(**args), 10):.3f} ms")


if __name__ == "__main__":
    measure_gpu_targets()
