"""AMD's zentorch (ZenDNN's PyTorch plugin, `pip install .[cpu-peers]`) as peers of the gated delta rule and the MoE
layer, on the lab's API. CPU only; float32 and bfloat16 (its kernels reject float16).

gated_delta_rule: mode "chunk" runs gdn_chunk_gated_delta_rule_fwd (vLLM's chunked algorithm, chunk 64, packed
sequences in one batch row); mode "recurrent" runs gdn_fused_sigmoid_gating_delta_rule_update, its decode kernel,
which updates a state pool in place (slot 0 there is vLLM's null block: sequence n lives in slot n + 1). Both keep
the state as [N, Hv, V, K] (V x K, vLLM's layout) where the lab's is [N, Hv, K, V]: the lab's states go in and come
back transposed (a copy in, a view out). The decode kernel fuses the gating (g = -exp(A_log) * softplus(a + dt_bias),
beta = sigmoid(b)); the lab passes g and beta themselves, so the wrapper inverts it (A_log = 0, dt_bias = 0,
a = log(expm1(-g)), b = logit(beta)) in float64 before the call. use_qk_l2norm: gdn_l2norm_fwd (chunk; eps 1e-6 as
the lab's) or the decode kernel's own (eps 1e-6).
moe: zentorch_fused_moe on the lab's [E, 2I, D] / [E, D, I] weights (gate rows first: vLLM's w13), SiLU. It has no
"no expert" slot: the lab's -1 ids go to expert 0 with weight 0 (computed, then weighed out); its grouped GEMM
refuses a call that hits a single expert, so such a call gets one extra zero row on another expert, weight 0. ZenDNN
caches its reordered weights by address: a weight written in place is passed as a fresh copy (_as_written).
"""
import weakref
from functools import cache

import torch

from kernellab.registry import BackendUnavailable
from kernellab.validate import check_state_dtype

__all__ = ["zentorch_gated_delta_rule", "zentorch_l2norm", "zentorch_moe", "unavailable_reason"]

CHUNK = 64  # vLLM's FLA_CHUNK_SIZE, the chunk zentorch's kernels are written for
L2NORM_EPS = 1e-6


def unavailable_reason() -> str | None:
    """zentorch's version is the torch release it is built for plus its own (2.13.0.1: torch 2.13): another torch
    cannot load its kernels."""
    from importlib import metadata

    try:
        version = metadata.version("zentorch")
    except metadata.PackageNotFoundError:
        return None  # not installed: the registry's `requires` says so
    if version.split(".")[:2] != torch.__version__.split("+")[0].split(".")[:2]:
        return f"zentorch {version} is built for torch {'.'.join(version.split('.')[:2])}, this is torch " \
               f"{torch.__version__} (pip install .[cpu-peers] picks the matching one)"
    return None


@cache
def _ops():
    """torch.ops.zentorch, its operators registered by importing zentorch."""
    import zentorch  # noqa: F401

    return torch.ops.zentorch


def zentorch_l2norm(x):
    """x / sqrt(sum(x^2) + 1e-6) over the last dim, zentorch's gdn_l2norm_fwd. x [..., K] float32 or bfloat16."""
    return _ops().gdn_l2norm_fwd(x.contiguous(), L2NORM_EPS)


def packed_bounds(B, T, cu_seqlens, device):
    """int32 [N + 1]: the sequence bounds in the one packed row zentorch's kernels take (B rows of T tokens are B
    sequences)."""
    if cu_seqlens is not None:
        return cu_seqlens.to(device=device, dtype=torch.int32).contiguous()
    return torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=device)


def zentorch_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens,
                              mode, state_dtype):
    """q, k [B, T, Hk, K]; v [B, T, Hv, V]; g, beta [B, T, Hv]; initial_state None or [N, Hv, K, V] float32.
    Returns o [B, T, Hv, V] in v's dtype and the final state [N, Hv, K, V] float32 (or None); no other
    state_dtype."""
    check_state_dtype(state_dtype, v, "zentorch", "gated_delta_rule")
    B, T, Hv, V = v.shape
    K = q.shape[-1]
    bounds = packed_bounds(B, T, cu_seqlens, v.device)
    N = bounds.shape[0] - 1
    packed = lambda x: x.reshape(1, B * T, *x.shape[2:]).contiguous()  # noqa: E731
    q, k, v = packed(q), packed(k), packed(v)
    if mode == "chunk":
        o, state = _chunk(q, k, v, packed(g), packed(beta), scale, initial_state, output_final_state,
                          use_qk_l2norm, bounds)
    else:
        o, state = _recurrent(q, k, v, packed(g), packed(beta), scale, initial_state, use_qk_l2norm, bounds, N, K, V)
    return o.reshape(B, T, Hv, V), state if output_final_state else None


def _chunk(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, bounds):
    from fla.ops.utils.index import prepare_chunk_indices, prepare_chunk_offsets

    if use_qk_l2norm:
        q, k = zentorch_l2norm(q), zentorch_l2norm(k)
    h0 = None if initial_state is None else initial_state.transpose(-1, -2).contiguous()
    o, state = _ops().gdn_chunk_gated_delta_rule_fwd(
        q, k, v, g.float(), beta.contiguous(), float(scale), h0, output_final_state, CHUNK, bounds,
        prepare_chunk_indices(bounds, CHUNK).to(torch.int32).contiguous(),
        prepare_chunk_offsets(bounds, CHUNK).to(torch.int32).contiguous())
    return o.to(v.dtype), state.transpose(-1, -2) if output_final_state else None


def decode_gating(g, beta):
    """(a, b) with -softplus(a) = g and sigmoid(b) = beta, computed in float64: the raw inputs of a kernel that
    fuses Qwen3.5's gating (A_log = 0, dt_bias = 0 there). g = 0 gives a = -inf (softplus(-inf) = 0), beta = 1 gives
    b = inf."""
    g64, beta64 = g.double(), beta.double()
    return torch.log(torch.expm1(-g64)), torch.log(beta64) - torch.log1p(-beta64)


def _recurrent(q, k, v, g, beta, scale, initial_state, use_qk_l2norm, bounds, N, K, V):
    Hv = v.shape[2]
    a, b = decode_gating(g, beta)
    zeros = torch.zeros(Hv, dtype=torch.float32, device=v.device)
    # the pool: V x K per head, slot 0 vLLM's null block (a sequence there is skipped), sequence n in slot n + 1; a
    # copy of the lab's state, which the kernel then updates in place
    # outside inference mode: the kernel turns it off inside and then writes its (inference) output in place
    with torch.inference_mode(False):
        pool = torch.zeros(N + 1, Hv, V, K, dtype=torch.float32, device=v.device)
        if initial_state is not None:
            pool[1:] = initial_state.transpose(-1, -2)
        o = _ops().gdn_fused_sigmoid_gating_delta_rule_update(
            zeros, a.to(q.dtype), b.to(q.dtype), zeros, q, k, v, 1.0, 20.0, float(scale), pool, bounds,
            torch.arange(1, N + 1, dtype=torch.int32, device=v.device), None, use_qk_l2norm)
    return o.to(v.dtype), pool[1:].transpose(-1, -2)


def expert_ids(ids, weights):
    """(ids int32 [N, top_k], weights float32 [N, top_k]) without the lab's -1 slots: such a slot goes to expert 0
    with weight 0, for kernels that have no "no expert" slot."""
    dropped = ids < 0
    return torch.where(dropped, 0, ids).to(torch.int32), torch.where(dropped, 0.0, weights.float())


# id(weight) -> (its version when copied, the copy): see _as_written
_REWRITTEN: dict[int, tuple[int, torch.Tensor]] = {}


def _as_written(w):
    """w, or a copy of it made after an in-place write to it: ZenDNN keeps its reordering of a weight by address
    (ZENDNNL_MATMUL_WEIGHT_CACHE, on by default, as weights are constant in serving) and would read the written
    weight stale. A new tensor at the address of a freed one is the same hazard, not detectable here: the bench's
    parity check before timing reports it. Inference tensors (no version counter) are passed as they are."""
    if w.is_inference():
        return w
    seen = _REWRITTEN.get(id(w))
    if seen is None:
        weakref.finalize(w, _REWRITTEN.pop, id(w), None)
        seen = _REWRITTEN[id(w)] = (w._version, None)
    if seen[0] != w._version:
        seen = _REWRITTEN[id(w)] = (w._version, w.clone())
    return w if seen[1] is None else seen[1]


def zentorch_moe(x, weights, ids, w_gate_up, w_down):
    """zentorch_fused_moe. x [N, D]; weights, ids [N, top_k]; w_gate_up [E, 2I, D]; w_down [E, D, I], x's dtype.
    Returns [N, D] in x's dtype."""
    if w_gate_up.dtype != x.dtype or w_down.dtype != x.dtype:
        raise ValueError(f"w_gate_up, w_down: backend 'zentorch' of moe takes weights in x's dtype {x.dtype}, got "
                         f"{w_gate_up.dtype} and {w_down.dtype}")
    ids, weights = expert_ids(ids, weights)
    N, E = x.shape[0], w_gate_up.shape[0]
    if N and ids.unique().numel() < 2:
        # its grouped GEMM refuses a call that hits one expert: one extra zero row with weight 0 on another
        if E < 2:
            raise BackendUnavailable("backend 'zentorch' of moe: zentorch_fused_moe needs at least 2 experts, "
                                     f"w_gate_up has {E}")
        other = torch.full((1, ids.shape[1]), int(ids[0, 0] == 0), dtype=ids.dtype)
        x = torch.cat([x, x.new_zeros(1, x.shape[1])])
        ids, weights = torch.cat([ids, other]), torch.cat([weights, weights.new_zeros(1, ids.shape[1])])
    out = torch.empty_like(x)
    if N:
        _ops().zentorch_fused_moe(out, x.contiguous(), _as_written(w_gate_up.contiguous()),
                                  _as_written(w_down.contiguous()), None, None, weights, ids, False, "silu")
    return out[:N]
