"""float8_e4m3fn with block scales, as DeepSeek-V3 and DeepGEMM store expert weights and activations: the
quantization helpers of the fp8 expert ops (kernellab.grouped_gemm_fp8, kernellab.moe_fp8).

A tensor [..., R, C] is cut into blocks of (block_rows x block_cols) over its last two dims (ragged at the edges);
each block b is stored as q = round_fp8(x / s_b) with the float32 scale s_b = amax(|x| over b) / 448 (448: the
largest float8_e4m3fn value), so x ~ q s_b. Activations take blocks of 1 x 128 (one scale per row and 128
columns), weights blocks of 128 x 128 (per expert). Torch only: light to import.
"""
from __future__ import annotations

import math

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128
ACTIVATION_BLOCK = (1, BLOCK)
WEIGHT_BLOCK = (BLOCK, BLOCK)
# The amax of an all-zero block is raised to this, so that its scale is positive (its values quantize to 0).
MIN_AMAX = 1e-12


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The shape of the scales of a tensor of `shape` cut into blocks: [..., ceil(R / br), ceil(C / bc)]."""
    *lead, rows, cols = shape
    return (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))


def _expand(scale: torch.Tensor, shape: tuple[int, ...], block: tuple[int, int]) -> torch.Tensor:
    """Scales [..., ceil(R / br), ceil(C / bc)] repeated over their blocks: [..., R, C]."""
    rows, cols = shape[-2:]
    return scale.repeat_interleave(block[0], dim=-2)[..., :rows, :].repeat_interleave(block[1], dim=-1)[..., :cols]


def quantize(x: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., R, C] (a float dtype) -> (q float8_e4m3fn [..., R, C], scale float32 [..., ceil(R / br),
    ceil(C / bc)]) with x ~ q * scale blockwise. The scale is computed in float32, the quotient rounded to
    nearest (even) in float8_e4m3fn; |x / scale| <= 448 by construction."""
    rows, cols = x.shape[-2:]
    br, bc = block
    pad_rows, pad_cols = -rows % br, -cols % bc
    wide = x.to(torch.float32)
    padded = torch.nn.functional.pad(wide, (0, pad_cols, 0, pad_rows)) if pad_rows or pad_cols else wide
    *lead, R, C = padded.shape
    blocks = padded.reshape(*lead, R // br, br, C // bc, bc)
    scale = blocks.abs().amax(dim=(-3, -1)).clamp_(min=MIN_AMAX).div_(FP8_MAX)
    q = (wide / _expand(scale, x.shape, block)).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype=torch.float32) -> torch.Tensor:
    """q [..., R, C] float8_e4m3fn and its block scales -> q * scale [..., R, C] in dtype (computed in float32,
    float64 when dtype is float64)."""
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    return (q.to(wide) * _expand(scale.to(wide), q.shape, block)).to(dtype)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K], scale [M, ceil(K / 128)]): one scale per row and 128 columns."""
    return quantize(x, ACTIVATION_BLOCK)


def quantize_weights(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [E, N, K] (or [N, K]) -> (q, scale [E, ceil(N / 128), ceil(K / 128)]): one scale per 128 x 128 block."""
    return quantize(w, WEIGHT_BLOCK)


def quantized_bytes(shape: tuple[int, ...], block: tuple[int, int] = WEIGHT_BLOCK) -> int:
    """Bytes of a tensor of `shape` stored as float8_e4m3fn with float32 block scales."""
    return math.prod(shape) + 4 * math.prod(scale_shape(shape, block))
