"""The Triton attention family (kernellab/triton/{gated_delta_rule, linear_attention, attention}.py and their shared
chunk machinery kernellab/triton/_chunk.py) against the float64 references, beyond the shared parity suites.

CPU: under TRITON_INTERPRET=1 (set by conftest), fp32 and fp16, at small sizes over the edge cases: T = 1, T not a
multiple of the chunk (65, 130), Hv = 2 Hk, initial states, packed sequences of unequal length (one of length 1,
one empty), g = 0, strong decay, beta near 0 and 1, use_qk_l2norm on and off, K and V up to 256; attention with
Hq = 2 Hkv, T not a multiple of the block, Tk > Tq, head dims 256 and 80, packed sequences (cu_seqlens) and KV
buffers of per-sequence lengths (kv_lens). Also: no host synchronisation in the
chunked path, and an ahead-of-time compile of the kernels for sm_90 (no GPU needed).
GPU-marked: bf16 parity at larger sizes, and no recompilation when only the sequence length changes.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernellab
from tests.helpers import assert_close, poisoned_allocations, to_float64

tg = pytest.importorskip("kernellab.triton.gated_delta_rule")
tl_attention = pytest.importorskip("kernellab.triton.attention")
from bench.ops import cu_seqlens_of, make
from kernellab.triton import _chunk, jit_function, linear_attention as tla  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16]
ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(Hk=1, Hv=2, K=16, V=32)  # Hv = 2 Hk; K != V

GDR_CASES = {
    "T1": dict(T=1),
    "T65_g0_no_l2norm": dict(T=65, gate="zero", use_qk_l2norm=False),
    "T130_initial_strong_decay": dict(T=130, initial_state=True, gate="strong"),
    "packed_unequal": dict(seqlens=[1, 70, 0, 3, 64], initial_state=True),
    "batch2_beta_low": dict(B=2, T=65, beta="low"),
    "beta_high_initial": dict(T=65, beta="high", initial_state=True, use_qk_l2norm=False),
    "K256_V256": dict(T=65, initial_state=True, Hk=1, Hv=2, K=256, V=256),
}
# Token by token, the chunk boundaries of T = 130 add nothing to T = 65, and each token costs the interpreter.
# K = V = 256 token by token costs the interpreter 8 V tiles per head: fewer tokens there.
RECURRENT_CASES = {name: case | (dict(T=9) if name == "K256_V256" else {}) for name, case in GDR_CASES.items()
                   if name != "T130_initial_strong_decay"}
LA_CASES = {
    "T1": dict(T=1),
    "T65_no_gate": dict(T=65, gate=None),
    "T130_initial_strong_decay": dict(T=130, initial_state=True, gate="strong"),
    "packed_unequal": dict(seqlens=[1, 70, 0, 3, 64], initial_state=True),
    "batch2_g0": dict(B=2, T=65, gate="zero", initial_state=True),
}
ATTENTION_CASES = {
    "T1": dict(T=1),
    "T65": dict(T=65),
    "T130_Tk200": dict(T=130, Tk=200),
    "decode_T1_Tk77": dict(T=1, Tk=77),
    "non_causal_T70": dict(T=70, causal=False),
    "non_causal_Tk_longer_D80": dict(T=33, Tk=40, causal=False, D=80),
    "D256": dict(T=65, Tk=90, D=256, Hq=2, Hkv=1),
    "packed_1_70_0_3_64": dict(seqlens=[1, 70, 0, 3, 64]),
    "packed_non_causal": dict(seqlens=[65, 1, 2], causal=False),
    "kv_lens_decode": dict(B=3, T=1, Tk=150, kv_lens=[1, 64, 150]),
    "kv_lens_T5_not_causal": dict(B=2, T=5, Tk=70, kv_lens=[5, 66], causal=False),
}


def _parity(op, args, dtype, seed, **extra):
    """Run op's triton backend on args (allocations poisoned) and compare every output with the reference."""
    ref = getattr(kernellab, op)(**to_float64({k: v.cpu() if torch.is_tensor(v) else v for k, v in args.items()}),
                               backend="reference")
    with poisoned_allocations():
        out = getattr(kernellab, op)(**args, backend="triton", **extra)
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    for name, got, want in zip(("o", "final_state"), outs, refs):
        if want is not None:
            assert got.dtype == (args["v"].dtype if name == "o" else torch.float32), name
            assert_close(got, want, dtype, name, seed)


def _shape(case):
    return SMALL | case if "K" not in case else case


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GDR_CASES, ids=str)
def test_gated_delta_rule_chunk(case, dtype, seed):
    args = make("gated_delta_rule", **_shape(GDR_CASES[case]), dtype=dtype, seed=seed, device=DEVICE)
    _parity("gated_delta_rule", args, dtype, seed, mode="chunk")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", RECURRENT_CASES, ids=str)
def test_gated_delta_rule_recurrent(case, dtype, seed):
    args = make("gated_delta_rule", **_shape(RECURRENT_CASES[case]), dtype=dtype, seed=seed, device=DEVICE)
    _parity("gated_delta_rule", args, dtype, seed, mode="recurrent")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LA_CASES, ids=str)
def test_linear_attention(case, dtype, seed):
    args = make("linear_attention", H=2, K=16, V=32, **LA_CASES[case], dtype=dtype, seed=seed, device=DEVICE)
    _parity("linear_attention", args, dtype, seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
def test_attention(case, dtype, seed):
    args = make("attention", **(dict(Hq=4, Hkv=2, D=32) | ATTENTION_CASES[case]), dtype=dtype, seed=seed,
                       device=DEVICE)
    _parity("attention", args, dtype, seed)


# ------------------------------------------------------------------------------------------- chunk layout

class NoHostSync:
    """Within the block, reading a tensor's values on the host (item, tolist, int, bool, float) raises."""

    NAMES = ("item", "tolist", "__int__", "__bool__", "__float__", "__index__")

    def __enter__(self):
        def refuse(*args, **kwargs):
            raise AssertionError("host synchronisation")
        self.saved = {name: getattr(torch.Tensor, name) for name in self.NAMES}
        for name in self.NAMES:
            setattr(torch.Tensor, name, refuse)

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(torch.Tensor, name, fn)


@pytest.mark.parametrize("seqlens", [[1], [64], [65, 0, 1], [0, 130, 64, 63, 2]], ids=str)
def test_chunk_layout_on_device(seqlens):
    """Chunk indices and offsets of packed sequences, built without reading cu_seqlens on the host."""
    cu = cu_seqlens_of(seqlens, device=DEVICE)
    with NoHostSync():
        indices, offsets = _chunk.prepare_chunk_layout(cu, sum(seqlens))
    expected = [(n, c) for n, length in enumerate(seqlens) for c in range(-(-length // 64))]
    assert indices.shape == (sum(seqlens) // 64 + len(seqlens), 2)
    assert [tuple(row) for row in indices.tolist()] == expected + [(-1, -1)] * (indices.shape[0] - len(expected))
    counts = [-(-length // 64) for length in seqlens]
    assert offsets.tolist() == [sum(counts[:n]) for n in range(len(seqlens) + 1)]


def test_chunked_path_does_not_synchronise(seed):
    """The implementation behind validation (which itself reads cu_seqlens) never reads a tensor on the host,
    with or without a precomputed chunk layout, and both give the same result."""
    args = make("gated_delta_rule", **SMALL, seqlens=[3, 66, 1], initial_state=True, dtype=torch.float32,
                       seed=seed, device=DEVICE)
    scale = SMALL["K"] ** -0.5
    with NoHostSync():
        o, final = tg.gated_delta_rule(**args, scale=scale, mode="chunk", state_dtype=torch.float32)
        layout = _chunk.prepare_chunk_layout(args["cu_seqlens"], args["q"].shape[1])
        o2, final2 = tg.gated_delta_rule(**args, scale=scale, mode="chunk", state_dtype=torch.float32,
                                         chunk_layout=layout)
        o3, _ = tla.linear_attention(args["q"], args["k"], args["v"][:, :, :1], args["g"][:, :, :1], scale, None,
                                     False, args["cu_seqlens"], "chunk", torch.float32)
    assert torch.equal(o, o2) and torch.equal(final, final2)
    ref_o, _ = kernellab.gated_delta_rule(**to_float64(args), backend="reference")
    assert_close(o, ref_o, torch.float32, "o", seed)
    assert o3.shape == (1, 70, 1, SMALL["V"])


def test_chunk_and_recurrent_agree_in_fp32(seed):
    """The two modes compute the same function: equal to float32 rounding on one mixed case."""
    args = make("gated_delta_rule", **SMALL, seqlens=[65, 2], initial_state=True, gate="strong",
                       dtype=torch.float32, seed=seed, device=DEVICE)
    o_chunk, s_chunk = kernellab.gated_delta_rule(**args, backend="triton", mode="chunk")
    o_rec, s_rec = kernellab.gated_delta_rule(**args, backend="triton", mode="recurrent")
    assert_close(o_chunk, o_rec, torch.float32, "o", seed)
    assert_close(s_chunk, s_rec, torch.float32, "final_state", seed)


# ------------------------------------------------------------------------------------------ ahead of time

AOT_CHECK = """
import json, os, subprocess, sys, importlib, tempfile, triton
from triton.backends.compiler import GPUTarget
from profiling.static import triton_source
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
found = {}
for module_name in sys.argv[1:]:
    for spec in importlib.import_module(module_name).AOT_SPECS:
        attr = spec.kernel.split(":")[1]
        k = triton.compile(triton_source(spec), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        fields = dict(item.split(":", 1) for item in usage.split("Function", 1)[1].split()[1:] if ":" in item)
        found[spec.name] = dict(kernel=attr, regs=int(fields["REG"]), local=int(fields["LOCAL"]),
                                stack=int(fields["STACK"]), shared=k.metadata.shared,
                                wgmma="wgmma" in k.asm["ptx"], mma="mma.sync" in k.asm["ptx"])
print(json.dumps(found))
"""
AOT_MODULES = ("kernellab.triton.gated_delta_rule", "kernellab.triton.linear_attention", "kernellab.triton.attention")


def _jitted_kernels(module):
    return {name for name, value in vars(module).items()
            if isinstance(value, tg.triton.runtime.KernelInterface) and name.endswith("_kernel")}


def test_aot_specs_compile_for_sm90_without_spills():
    """Every @triton.jit kernel (named *_kernel) of the three modules and of _chunk has a spec at production
    sizes (K = V = 128, chunk 64, Qwen3.5 head counts, bf16; attention D = 128 and 256); each compiles for sm_90,
    specialised as launched (profiling.static.triton_source), with no local memory (spills) and at most 255
    registers, and the tensor-core kernels reach wgmma or mma. The registers / shared memory table is printed
    (pytest -s) and tabulated by profiling.static."""
    specs = [spec for name in AOT_MODULES for spec in __import__(name, fromlist=["AOT_SPECS"]).AOT_SPECS]
    named = {spec.kernel for spec in specs}
    for module in (tg, tla, tl_attention, _chunk):
        for name in _jitted_kernels(module):
            if jit_function(vars(module)[name]).fn.__module__ == module.__name__:
                assert f"{module.__name__}:{name}" in named, f"{module.__name__}:{name} has no AotSpec"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NUMBA_ENABLE_CUDASIM")}
    run = subprocess.run([sys.executable, "-c", AOT_CHECK, *AOT_MODULES], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(found) == {spec.name for spec in specs}
    print(f"\n{'kernel [config]':78s} regs  local  stack  shared  tensor cores")
    for name, info in found.items():
        cores = "wgmma" if info["wgmma"] else "mma.sync" if info["mma"] else "-"
        print(f"{name:78s} {info['regs']:4d} {info['local']:6d} {info['stack']:6d} {info['shared']:7d}  {cores}")
    for name, info in found.items():
        assert info["local"] == 0 and info["stack"] == 0, f"{name} spills: {info}"
        if info["kernel"] in ("chunk_output_kernel", "chunk_wy_kernel", "attention_kernel"):
            assert info["wgmma"] or info["mma"], f"{name}: no tensor-core instruction"


# ----------------------------------------------------------------------------------------------- on a GPU

@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("case", ["single", "packed", "batch"], ids=str)
def test_gated_delta_rule_bf16_gpu(case, mode, seed):
    shape = dict(single=dict(T=1000), packed=dict(seqlens=[1, 300, 64, 777]), batch=dict(B=3, T=200))[case]
    args = make("gated_delta_rule", Hk=4, Hv=8, K=128, V=128, **shape, initial_state=True,
                       dtype=torch.bfloat16, seed=seed, device="cuda")
    _parity("gated_delta_rule", args, torch.bfloat16, seed, mode=mode)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["single", "packed"], ids=str)
def test_linear_attention_bf16_gpu(case, seed):
    shape = dict(single=dict(T=1000), packed=dict(seqlens=[1, 300, 64, 777]))[case]
    args = make("linear_attention", H=4, K=128, V=128, **shape, initial_state=True, dtype=torch.bfloat16,
                       seed=seed, device="cuda")
    _parity("linear_attention", args, torch.bfloat16, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [128, 256])
@pytest.mark.parametrize("Tk", [None, 1500])
def test_attention_bf16_gpu(D, Tk, seed):
    args = make("attention", B=2, T=1000, Tk=Tk, Hq=8, Hkv=2, D=D, dtype=torch.bfloat16, seed=seed,
                       device="cuda")
    _parity("attention", args, torch.bfloat16, seed)


@pytest.mark.gpu
def test_no_recompile_per_sequence_length(seed):
    """After the first call (which autotunes), other sequence lengths reuse the compiled kernels."""
    kernels_used = [_chunk.chunk_state_kernel, _chunk.chunk_output_kernel, _chunk.chunk_cumsum_kernel,
                    tg.chunk_kkt_solve_kernel, tg.chunk_wy_kernel, tg.recurrent_kernel, tg.inverse_norm_kernel,
                    tl_attention.attention_kernel]

    def compiled():
        return sum(len(cache[0]) for fn in kernels_used for cache in jit_function(fn).device_caches.values())

    def run(T):
        args = make("gated_delta_rule", Hk=2, Hv=4, K=128, V=128, T=T, initial_state=True,
                           dtype=torch.bfloat16, seed=seed, device="cuda")
        for mode in ("chunk", "recurrent"):
            kernellab.gated_delta_rule(**args, backend="triton", mode=mode)
        kernellab.attention(**make("attention", T=T, Hq=4, Hkv=2, D=128, dtype=torch.bfloat16, seed=seed,
                                        device="cuda"), backend="triton")
        torch.cuda.synchronize()

    run(100)
    before = compiled()
    for T in (1, 17, 64, 333, 1024):
        run(T)
    assert compiled() == before

