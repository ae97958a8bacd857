"""MoE routing in Triton: softmax over the experts, top-k and renormalisation fused in one kernel.

router_logits [N, E] -> probabilities in float32 -> the top_k largest per token (the lowest expert index first on
ties, as torch.topk on distinct values) -> divided by their sum when renormalize. One program per BLOCK_N
tokens holds their [BLOCK_N, E] row tile and picks the top_k by repeated maxima.
"""
import torch
import triton
import triton.language as tl

from kernellab.triton import aot_spec


def _tokens_per_program(block_e):
    """Tokens per program: the [tokens, experts] tile stays <= 4096 entries."""
    return max(1, min(16, 4096 // block_e))


@triton.jit
def _route_kernel(logits_ptr, weights_ptr, ids_ptr, N, E, stride_ln, stride_le,
                  TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """logits [N, E] -> weights float32 [N, TOP_K], ids int32 [N, TOP_K]; one program per BLOCK_N tokens."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < N
    col_ok = cols < E
    logits = tl.load(logits_ptr + rows[:, None] * stride_ln + cols[None, :] * stride_le,
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    logits = tl.where(col_ok[None, :], logits, float("-inf"))
    probs = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = probs / tl.sum(probs, axis=1)[:, None]
    # Columns past E never win (-1 < any probability); a chosen column is set to -2 for the next rounds.
    probs = tl.where(col_ok[None, :], probs, -1.0)
    ks = tl.arange(0, BLOCK_K)
    top_w = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    top_i = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(probs, axis=1)
        best_col = tl.min(tl.where(probs == best[:, None], cols[None, :], BLOCK_E), axis=1)  # lowest index on ties
        top_w = tl.where(ks[None, :] == j, best[:, None], top_w)
        top_i = tl.where(ks[None, :] == j, best_col[:, None], top_i)
        probs = tl.where(cols[None, :] == best_col[:, None], -2.0, probs)
    if RENORMALIZE:
        top_w = top_w / tl.sum(top_w, axis=1)[:, None]
    out = rows[:, None] * TOP_K + ks[None, :]
    mask = row_ok[:, None] & (ks < TOP_K)[None, :]
    tl.store(weights_ptr + out, top_w, mask=mask)
    tl.store(ids_ptr + out, top_i, mask=mask)


def route(router_logits, top_k, renormalize=True):
    """router_logits [N, E] -> softmax (float32) -> top_k -> renormalise, fused in one kernel.
    Returns weights float32 [N, top_k] and ids int32 [N, top_k]."""
    N, E = router_logits.shape
    weights = torch.empty(N, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(N, top_k, dtype=torch.int32, device=router_logits.device)
    if N == 0:
        return weights, ids
    block_e = triton.next_power_of_2(E)
    block_n = _tokens_per_program(block_e)
    _route_kernel[(triton.cdiv(N, block_n),)](
        router_logits, weights, ids, N, E, router_logits.stride(0), router_logits.stride(1),
        TOP_K=top_k, RENORMALIZE=renormalize, BLOCK_N=block_n, BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(top_k), num_warps=4 if block_e <= 256 else 8)
    return weights, ids


def _aot_specs(E=256, top_k=8, dt="bf16"):
    """Routing at the Qwen3.5-35B-A3B layer shape (256 experts, top-8) on bf16 logits."""
    block_e = triton.next_power_of_2(E)
    return [aot_spec(f"route[E={E},top_k={top_k},{dt}]", _route_kernel,
                     dict(stride_le=1, TOP_K=top_k, RENORMALIZE=True, BLOCK_N=_tokens_per_program(block_e),
                          BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k)),
                     pointers=dict(logits_ptr=dt, weights_ptr="fp32", ids_ptr="i32"))]


AOT_SPECS = _aot_specs()
