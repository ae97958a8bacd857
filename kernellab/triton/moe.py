"""The fused MoE expert layer in Triton (Qwen3.5's experts), from the stages of the other MoE modules.

Pipeline of `moe`, all on device, no host synchronisation:

    row_map, block_expert, num_blocks = the block-aligned layout of the slots  (kernellab.triton.moe_align)
    h = silu(x[slot // top_k] W_g^T) * (x[slot // top_k] W_u^T)      gate/up GEMM: gather fused into the A
                                                                       loads, SwiGLU in the epilogue
    y_slots[slot] = weights[slot] * h W_down^T                        down GEMM: weight in the epilogue
                                                                       (both kernellab.triton.grouped_gemm)
    y[n] = sum_j y_slots[n * top_k + j]  (float32, fixed order)       deterministic combine, no atomics
                                                                       (kernellab.triton.moe_permute)

Decode (N <= DECODE_MAX_TOKENS tokens) pads each expert's rows to BLOCK_M = 16 and builds the layout in one
program; prefill takes BLOCK_M = 64 or 128 from the mean rows per expert.
"""
import torch
import triton
import triton.language as tl

from kernellab.triton import aot_spec
from kernellab.triton._autotune import INTERPRET
from kernellab.triton.grouped_gemm import (GEMM_CONFIGS, gemm_block_m, gemm_spec, launch_gemm, launch_weight_grad,
                                         weight_grad_spec)
from kernellab.triton.moe_align import DECODE_BLOCK_M, align_slots
from kernellab.triton.moe_permute import combine, combine_spec

DECODE_MAX_TOKENS = 64


def _slot_layout(ids, E, path):
    """The block-aligned layout of the slots of ids [N, top_k] for path "decode", "prefill" or "auto" (decode up to
    DECODE_MAX_TOKENS tokens): (block_m, row_map, block_expert, num_blocks, offsets) (moe_align.align_slots)."""
    N, top_k = ids.shape
    if path == "auto":
        path = "decode" if N <= DECODE_MAX_TOKENS else "prefill"
    block_m = DECODE_BLOCK_M if path == "decode" else max(64, gemm_block_m(N * top_k / E))
    return (block_m, *align_slots(ids, E, block_m, one_program=path == "decode"))


def moe(x, weights, ids, w_gate_up, w_down, path="auto"):
    """Qwen3.5 experts. x [N, D]; weights, ids [N, top_k] (-1 = no expert); w_gate_up [E, 2I, D];
    w_down [E, D, I]. Returns y [N, D] in x's dtype, with y[n] = sum_j weights[n, j] * silu(x W_g^T) * (x W_u^T)
    W_down^T. path: "decode" (BLOCK_M = 16), "prefill" (BLOCK_M = 64 / 128 from the mean rows per expert)
    or "auto" (decode up to 64 tokens). No host synchronisation."""
    if path not in ("auto", "decode", "prefill"):
        raise ValueError(f"path must be 'auto', 'decode' or 'prefill', got {path!r}")
    N, D = x.shape
    E, two_I, _ = w_gate_up.shape
    I = two_I // 2
    top_k = ids.shape[1]
    if N == 0 or I == 0 or D == 0:
        return torch.zeros_like(x)
    num_slots = N * top_k
    block_m, row_map, block_expert, num_blocks, _ = _slot_layout(ids, E, path)
    h = torch.empty(row_map.numel(), I, dtype=x.dtype, device=x.device)
    launch_gemm(x, w_gate_up, h, row_map, block_expert, num_blocks, N=I, K=D, block_m=block_m, a_mapped=True,
                a_row_div=top_k, out_mapped=False, gated=True, up_offset=I)
    y_slots = torch.empty(num_slots, D, dtype=x.dtype, device=x.device)
    launch_gemm(h, w_down, y_slots, row_map, block_expert, num_blocks, N=D, K=I, block_m=block_m,
                a_mapped=False, out_mapped=True, row_scale=weights.to(torch.float32).reshape(-1).contiguous())
    return combine(y_slots, ids.reshape(-1), None, N, top_k, rows_are_slots=True)


# ------------------------------------------------------------------------------------------------ backward
#
# On the forward's block-aligned layout of the slots (positions p, slot row_map[p], token slot // top_k), with s the
# slot's routing weight and the gate / up projections recomputed:
#   proj = x W_gu^T                     [gate | up], float32          (grouped GEMM, rows gathered)
#   dh = dy W_down                      float32                        (grouped GEMM on W_down's transposed strides)
#   d_weights = dh . h;  h_s = s h;  d_proj = s dh [up silu'(gate) | silu(gate)]   (_swiglu_backward_kernel)
#   dW_down[e] = dy[rows]^T h_s[rows];  dW_gu[e] = d_proj[rows]^T x[rows]           (_weight_grad_kernel)
#   dx[n] = sum over n's slots of d_proj W_gu (grouped GEMM on W_gu's transposed strides, then the combine)

@triton.jit
def _swiglu_backward_kernel(proj_ptr, dh_ptr, row_map_ptr, num_blocks_ptr, weights_ptr, d_proj_ptr, h_ptr,
                            d_weights_ptr, I, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    """SwiGLU's backward with the routing weight, per position p of the block-aligned layout whose slot
    s = row_map[p] >= 0 (positions past num_blocks * BLOCK_M are unused): with gate, up = proj[p, :I], proj[p, I:]
    and dh = dh[p] (the gradient of h = silu(gate) up before the weight w = weights[s]),
        d_weights[s] = dh . h,   h_out[p] = w h,   d_proj[p] = w dh [up silu'(gate) | silu(gate)],
    silu'(a) = sigmoid(a) (1 + a (1 - sigmoid(a))). proj float32 [*, 2I]; dh float32 [*, I]; d_proj [*, 2I] and
    h_out [*, I] in the GEMMs' dtype; d_weights float32 [slots]. Grid (cdiv(positions, BLOCK_R),)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    used = rows < tl.load(num_blocks_ptr).to(tl.int64) * BLOCK_M
    slot = tl.load(row_map_ptr + rows, mask=used, other=-1).to(tl.int64)
    present = slot >= 0
    weight = tl.load(weights_ptr + slot, mask=present, other=0.0)[:, None]
    d_weight = tl.zeros([BLOCK_R], dtype=tl.float32)
    for first in range(0, I, BLOCK_I):
        cols = first + tl.arange(0, BLOCK_I)
        mask = present[:, None] & (cols < I)[None, :]
        gate = tl.load(proj_ptr + rows[:, None] * (2 * I) + cols[None, :], mask=mask, other=0.0)
        up = tl.load(proj_ptr + rows[:, None] * (2 * I) + I + cols[None, :], mask=mask, other=0.0)
        dh = tl.load(dh_ptr + rows[:, None] * I + cols[None, :], mask=mask, other=0.0)
        sig = 1.0 / (1.0 + tl.exp(-gate))
        activated = gate * sig
        h = activated * up
        d_weight += tl.sum(dh * h, axis=1)
        dh *= weight
        dtype = d_proj_ptr.dtype.element_ty
        tl.store(d_proj_ptr + rows[:, None] * (2 * I) + cols[None, :],
                 (dh * up * sig * (1.0 + gate * (1.0 - sig))).to(dtype), mask=mask)
        tl.store(d_proj_ptr + rows[:, None] * (2 * I) + I + cols[None, :], (dh * activated).to(dtype), mask=mask)
        tl.store(h_ptr + rows[:, None] * I + cols[None, :], (h * weight).to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(d_weights_ptr + slot, d_weight, mask=present)


SWIGLU_BLOCK_R, SWIGLU_BLOCK_I = (16, 64) if INTERPRET else (4, 512)


def moe_backward(grads, x, weights, ids, w_gate_up, w_down, path="auto"):
    """The gradients of moe (kernellab.autograd's contract): grads {"y": [N, D] or None}; the inputs and path as the
    forward's. Returns {"x": [N, D], "w_gate_up": [E, 2I, D], "w_down": [E, D, I] in x's dtype (x's in float32),
    "weights": float32 [N, top_k], 0 for slots without an expert}. Deterministic: no atomics (each dW tile is one
    program's, each token's dx the combine's sum over its slots in slot order)."""
    if path not in ("auto", "decode", "prefill"):
        raise ValueError(f"path must be 'auto', 'decode' or 'prefill', got {path!r}")
    dy = grads["y"]
    N, D = x.shape
    E, two_I, _ = w_gate_up.shape
    I = two_I // 2
    top_k = ids.shape[1]
    d_weights = torch.zeros(N * top_k, dtype=torch.float32, device=x.device)
    if dy is None or N == 0 or I == 0 or D == 0:
        return dict(x=torch.zeros_like(x), weights=d_weights.view(N, top_k), w_gate_up=torch.zeros_like(w_gate_up),
                    w_down=torch.zeros_like(w_down))
    block_m, row_map, block_expert, num_blocks, offsets = _slot_layout(ids, E, path)
    layout = dict(row_map=row_map, block_expert=block_expert, num_blocks=num_blocks, block_m=block_m)
    positions = row_map.numel()
    proj = torch.empty(positions, two_I, dtype=torch.float32, device=x.device)
    launch_gemm(x, w_gate_up, proj, **layout, N=two_I, K=D, a_mapped=True, a_row_div=top_k, out_mapped=False)
    dy = dy.to(x.dtype)
    dh = torch.empty(positions, I, dtype=torch.float32, device=x.device)
    launch_gemm(dy, w_down.transpose(1, 2), dh, **layout, N=I, K=D, a_mapped=True, a_row_div=top_k,
                out_mapped=False)
    d_proj = torch.empty(positions, two_I, dtype=x.dtype, device=x.device)
    h = torch.empty(positions, I, dtype=x.dtype, device=x.device)
    _swiglu_backward_kernel[(triton.cdiv(positions, SWIGLU_BLOCK_R),)](
        proj, dh, row_map, num_blocks, weights.to(torch.float32).reshape(-1).contiguous(), d_proj, h, d_weights, I,
        BLOCK_M=block_m, BLOCK_R=SWIGLU_BLOCK_R, BLOCK_I=SWIGLU_BLOCK_I)
    # each expert's rows: the first counts[e] positions from its padded start
    counts = offsets.diff()
    padded = (counts + block_m - 1) // block_m * block_m
    starts = (padded.cumsum(0) - padded).to(torch.int32)
    ends = (starts + counts).to(torch.int32)
    d_down, d_gate_up = torch.empty_like(w_down), torch.empty_like(w_gate_up)
    launch_weight_grad(dy, h, d_down, starts, ends, row_map, a_row_div=top_k, a_mapped=True)
    launch_weight_grad(d_proj, x, d_gate_up, starts, ends, row_map, b_row_div=top_k, b_mapped=True)
    dx_slots = torch.empty(N * top_k, D, dtype=torch.float32, device=x.device)
    launch_gemm(d_proj, w_gate_up.transpose(1, 2), dx_slots, **layout, N=D, K=two_I, a_mapped=False, out_mapped=True)
    dx = combine(dx_slots, ids.reshape(-1), None, N, top_k, rows_are_slots=True)
    return dict(x=dx, weights=d_weights.view(N, top_k), w_gate_up=d_gate_up, w_down=d_down)


def _aot_specs(D=2048, I=512, dt="bf16"):
    """The layer's GEMM variants, at every config the autotuner may pick for the decode and prefill tiles, and its
    combine, at the Qwen3.5-35B-A3B layer shape in bf16 (hidden 2048, expert size 512); the backward's kernels at
    the prefill tile (its GEMMs at the first config of GEMM_CONFIGS[128])."""
    gate_up = dict(A_MAPPED=True, OUT_MAPPED=False, GATED=True, SCALED=False)
    down = dict(A_MAPPED=False, OUT_MAPPED=True, GATED=False, SCALED=True)
    gathered = dict(A_MAPPED=True, OUT_MAPPED=False, GATED=False, SCALED=False)
    scattered = dict(A_MAPPED=False, OUT_MAPPED=True, GATED=False, SCALED=False)
    prefill = GEMM_CONFIGS[128][0]
    return [
        *(gemm_spec("moe.gemm", f"{label},{shape}", flags, block_m, config, dt)
          for label, shape, flags in (("gate_up", f"N={I},K={D}", gate_up), ("down", f"N={D},K={I}", down))
          for block_m in (DECODE_BLOCK_M, 128) for config in GEMM_CONFIGS[block_m]),
        combine_spec(f"moe.combine[layer,D={D},{dt}]", dt, rows_are_slots=True),
        gemm_spec("moe.backward.gemm", f"proj,N={2 * I},K={D}", gathered, 128, prefill, dt, out_dt="fp32"),
        gemm_spec("moe.backward.gemm", f"dh,N={I},K={D}", gathered, 128, prefill, dt, out_dt="fp32",
                  transposed_w=True),
        gemm_spec("moe.backward.gemm", f"dx,N={D},K={2 * I}", scattered, 128, prefill, dt, out_dt="fp32",
                  transposed_w=True),
        aot_spec(f"moe.backward.swiglu[I={I},{dt},BLOCK_M=128]", _swiglu_backward_kernel,
                 dict(BLOCK_M=128, BLOCK_R=SWIGLU_BLOCK_R, BLOCK_I=SWIGLU_BLOCK_I),
                 pointers=dict(proj_ptr="fp32", dh_ptr="fp32", row_map_ptr="i32", num_blocks_ptr="i32",
                               weights_ptr="fp32", d_proj_ptr=dt, h_ptr=dt, d_weights_ptr="fp32"),
                 divisible_by_16=("I",)),
        weight_grad_spec("moe.backward.weight_grad", f"down,N={D},K={I}", a_mapped=True, b_mapped=False, dt=dt),
        weight_grad_spec("moe.backward.weight_grad", f"gate_up,N={2 * I},K={D}", a_mapped=False, b_mapped=True,
                         dt=dt),
        combine_spec(f"moe.backward.combine[dx,D={D},fp32]", "fp32", rows_are_slots=True),
    ]


AOT_SPECS = _aot_specs()
