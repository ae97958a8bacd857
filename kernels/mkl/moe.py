"""grouped_gemm and the MoE layer on expert weights packed once for MKL's GEMM (CPU, float32).

The torch backend's code around the GEMMs (grouping the slots, gathering rows, the gate, the weighted sum) with
each expert GEMM run by cblas_sgemm_compute on the expert's packed weight (kernels.mkl.packed). The first call
on a weight tensor packs the experts it reaches (a copy of their weights: time and memory); later calls reuse
them while the tensor lives unmodified. Inputs other than float32 take the torch backend's GEMMs.
"""
from kernels.mkl.packed import packable, packed_experts
from kernels.torch import moe as torch_moe


def grouped_gemm(x, w, offsets):
    """x [M, K] grouped by expert; w [E, Nout, K]; offsets int32 [E + 1]. y[offsets[e]:offsets[e + 1]] =
    x[same rows] @ w[e]^T, each group written in place by one packed GEMM. Returns [M, Nout] in x's dtype."""
    if not packable(x, w):
        return torch_moe.grouped_gemm(x, w, offsets)
    experts = packed_experts(w)
    y = x.new_empty(x.shape[0], w.shape[1])
    bounds = offsets.tolist()
    for e, (start, end) in enumerate(zip(bounds, bounds[1:])):
        if end > start:
            experts.linear(x[start:end], e, out=y[start:end])
    return y


def moe(x, weights, ids, w_gate_up, w_down):
    """The Qwen3.5 experts, as kernels.torch.moe.moe: x [N, D]; weights, ids [N, top_k]; w_gate_up [E, 2I, D];
    w_down [E, D, I]. Returns [N, D] in x's dtype."""
    if not (packable(x, w_gate_up) and packable(x, w_down)):
        return torch_moe.moe(x, weights, ids, w_gate_up, w_down)
    gate_up, down = packed_experts(w_gate_up), packed_experts(w_down)
    return torch_moe.run_experts(x, weights, ids, w_gate_up.shape[0], lambda rows, row_weights, e: (
        torch_moe.expert_mlp(rows, row_weights, lambda h: gate_up.linear(h, e), lambda h: down.linear(h, e))))
