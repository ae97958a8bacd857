"""The expert ops on float8_e4m3fn weights with block scales, one expert (or one slot) at a time: the weights
dequantized, the activations quantized in blocks of 1 x 128 as the ops define it (kernellab/fp8.py), every product
in float64."""
import torch
import torch.nn.functional as F

from kernellab.fp8 import ACTIVATION_BLOCK, WEIGHT_BLOCK, dequantize, quantize_activations


def _quantized(x):
    """x [M, K] as the fp8 ops see it: quantized in blocks of 1 x 128, dequantized in float64."""
    return dequantize(*quantize_activations(x), ACTIVATION_BLOCK, torch.float64)


def grouped_gemm_fp8(x, w, w_scale, offsets):
    """x [M, K] grouped by expert; w float8_e4m3fn [E, N, K], w_scale [E, ceil(N / 128), ceil(K / 128)];
    offsets [E + 1]. y[rows of e] = dequant(quantized x)[rows of e] @ dequant(w[e])^T. Returns [M, N] in x's
    dtype."""
    xq = _quantized(x)
    y = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float64, device=x.device)
    bounds = offsets.tolist()
    for e in range(w.shape[0]):
        rows = slice(bounds[e], bounds[e + 1])
        y[rows] = xq[rows] @ dequantize(w[e], w_scale[e], WEIGHT_BLOCK, torch.float64).T
    return y.to(x.dtype)


def moe_fp8(x, weights, ids, w_gate_up, w_gate_up_scale, w_down, w_down_scale):
    """x [N, D]; weights, ids [N, top_k]; w_gate_up float8_e4m3fn [E, 2I, D] and w_down [E, D, I] with their
    block scales. For each slot (n, j) with e = ids[n, j] >= 0: h = silu(x_q W_g^T) * (x_q W_u^T) with x_q the
    row x[n] quantized in blocks of 1 x 128 and W the dequantized weights; y[n] += weights[n, j] * h_q W_down^T,
    h_q the row h quantized likewise. Expert after expert (its weights dequantized once), slot after slot.
    Returns [N, D] in x's dtype."""
    I = w_down.shape[2]
    xq = _quantized(x)
    y = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for e in sorted(set(ids[ids >= 0].tolist())):
        gate_up = dequantize(w_gate_up[e], w_gate_up_scale[e], WEIGHT_BLOCK, torch.float64)
        down = dequantize(w_down[e], w_down_scale[e], WEIGHT_BLOCK, torch.float64)
        for n, j in zip(*[t.tolist() for t in torch.nonzero(ids == e, as_tuple=True)]):
            projected = gate_up @ xq[n]
            h = F.silu(projected[:I]) * projected[I:]
            y[n] += weights[n, j].double() * (down @ _quantized(h[None])[0])
    return y.to(x.dtype)
