"""The fused MoE expert layer in Triton (Qwen3.5's experts), from the stages of the other MoE modules.

Pipeline of `moe`, all on device, no host synchronisation:

    row_map, block_expert, num_blocks = the block-aligned layout of the slots  (kernels.triton.moe_align)
    h = silu(x[slot // top_k] W_g^T) * (x[slot // top_k] W_u^T)      gate/up GEMM: gather fused into the A
                                                                       loads, SwiGLU in the epilogue
    y_slots[slot] = weights[slot] * h W_down^T                        down GEMM: weight in the epilogue
                                                                       (both kernels.triton.grouped_gemm)
    y[n] = sum_j y_slots[n * top_k + j]  (float32, fixed order)       deterministic combine, no atomics
                                                                       (kernels.triton.moe_permute)

Decode (N <= DECODE_MAX_TOKENS tokens) pads each expert's rows to BLOCK_M = 16 and builds the layout in one
program; prefill takes BLOCK_M = 64 or 128 from the mean rows per expert.
"""
import torch

from kernels.triton.grouped_gemm import GEMM_CONFIGS, gemm_block_m, gemm_spec, launch_gemm
from kernels.triton.moe_align import DECODE_BLOCK_M, align_slots
from kernels.triton.moe_permute import combine, combine_spec

DECODE_MAX_TOKENS = 64


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
    if path == "auto":
        path = "decode" if N <= DECODE_MAX_TOKENS else "prefill"
    num_slots = N * top_k
    block_m = DECODE_BLOCK_M if path == "decode" else max(64, gemm_block_m(num_slots / E))
    row_map, block_expert, num_blocks, _ = align_slots(ids, E, block_m, one_program=path == "decode")
    h = torch.empty(row_map.numel(), I, dtype=x.dtype, device=x.device)
    launch_gemm(x, w_gate_up, h, row_map, block_expert, num_blocks, N=I, K=D, block_m=block_m, a_mapped=True,
                a_row_div=top_k, out_mapped=False, gated=True, up_offset=I)
    y_slots = torch.empty(num_slots, D, dtype=x.dtype, device=x.device)
    launch_gemm(h, w_down, y_slots, row_map, block_expert, num_blocks, N=D, K=I, block_m=block_m,
                a_mapped=False, out_mapped=True, row_scale=weights.to(torch.float32).reshape(-1).contiguous())
    return combine(y_slots, ids.reshape(-1), None, N, top_k, rows_are_slots=True)




def _aot_specs(D=2048, I=512, dt="bf16"):
    """The layer's GEMM variants, at every config the autotuner may pick for the decode and prefill tiles, and its
    combine, at the Qwen3.5-35B-A3B layer shape in bf16 (hidden 2048, expert size 512)."""
    gate_up = dict(A_MAPPED=True, OUT_MAPPED=False, GATED=True, SCALED=False)
    down = dict(A_MAPPED=False, OUT_MAPPED=True, GATED=False, SCALED=True)
    return [
        *(gemm_spec("moe.gemm", f"{label},{shape}", flags, block_m, config, dt)
          for label, shape, flags in (("gate_up", f"N={I},K={D}", gate_up), ("down", f"N={D},K={I}", down))
          for block_m in (DECODE_BLOCK_M, 128) for config in GEMM_CONFIGS[block_m]),
        combine_spec(f"moe.combine[layer,D={D},{dt}]", dt, rows_are_slots=True),
    ]


AOT_SPECS = _aot_specs()
