"""The expert ops on float8_e4m3fn weights with block scales (kernellab/fp8.py) in PyTorch, CPU and CUDA: each
active expert's weights dequantized to float32 (one expert at a time: the float32 copy of every expert would be
four times the fp8 weights), the activations quantized in blocks of 1 x 128 and dequantized, float32 GEMMs
(float64 for float64 x). What the Triton kernels compute with fp8 tensor-core products, written out."""
import torch
import torch.nn.functional as F

from kernellab.fp8 import ACTIVATION_BLOCK, WEIGHT_BLOCK, dequantize, quantize_activations
from kernellab.torch.moe import _accumulation_dtype, group_slots


def _activations(x, dtype):
    """x [M, K] quantized in blocks of 1 x 128 and dequantized, in dtype."""
    return dequantize(*quantize_activations(x), ACTIVATION_BLOCK, dtype)


def _weight(w, w_scale, e, dtype):
    return dequantize(w[e], w_scale[e], WEIGHT_BLOCK, dtype)


def grouped_gemm_fp8(x, w, w_scale, offsets):
    """x [M, K] grouped by expert; w float8_e4m3fn [E, N, K], w_scale float32 [E, ceil(N / 128), ceil(K / 128)];
    offsets int32 [E + 1]. y[offsets[e]:offsets[e + 1]] = x_q[same rows] @ dequant(w[e])^T, x_q: x quantized in
    blocks of 1 x 128. Returns [M, N] in x's dtype."""
    acc = _accumulation_dtype(x.dtype)
    xq = _activations(x, acc)
    y = torch.empty(x.shape[0], w.shape[1], dtype=x.dtype, device=x.device)
    bounds = offsets.tolist()
    for e, (start, end) in enumerate(zip(bounds, bounds[1:])):
        if end > start:
            y[start:end] = (xq[start:end] @ _weight(w, w_scale, e, acc).T).to(x.dtype)
    return y


def moe_fp8(x, weights, ids, w_gate_up, w_gate_up_scale, w_down, w_down_scale):
    """x [N, D]; weights, ids [N, top_k]; w_gate_up float8_e4m3fn [E, 2I, D], w_down [E, D, I] and their block
    scales. Per active expert, on the rows of its tokens: h = silu(x_q W_g^T) * (x_q W_u^T) in float32, then
    y[n] += weights[n, j] * h_q W_down^T (x_q, h_q: quantized in blocks of 1 x 128, per row: a token's
    quantization does not depend on the others). Returns [N, D] in x's dtype."""
    N, top_k = ids.shape
    experts, bounds, source = group_slots(ids, w_gate_up.shape[0])
    acc = _accumulation_dtype(x.dtype)
    xq = _activations(x, acc)
    y = torch.zeros(N, x.shape[1], dtype=acc, device=x.device)
    slot_weights = weights.reshape(-1).to(acc)
    tokens = source // top_k
    for e, start, end in zip(experts, bounds, bounds[1:]):
        rows = tokens[start:end]
        gate, up = F.linear(xq.index_select(0, rows), _weight(w_gate_up, w_gate_up_scale, e, acc)).chunk(2, dim=-1)
        h = _activations(F.silu(gate).mul_(up), acc)
        out = F.linear(h, _weight(w_down, w_down_scale, e, acc))
        y.index_add_(0, rows, out.mul_(slot_weights.index_select(0, source[start:end])[:, None]))
    return y.to(x.dtype)
