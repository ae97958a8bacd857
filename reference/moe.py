"""MoE routing, permutation, grouped GEMM and the expert layer, one expert (or one token) at a time."""
import torch
import torch.nn.functional as F

from kernellab.types import Permutation


def route(router_logits, top_k, renormalize=True):
    """router_logits [N, E] -> softmax in float32 -> top_k -> (renormalize) divide by their sum.
    Returns weights float32 [N, top_k] and ids int32 [N, top_k]."""
    probs = torch.softmax(router_logits.to(torch.float32), dim=-1)
    # equal probabilities: the lower expert first (torch.topk leaves the order of ties unspecified)
    weights, ids = (t[:, :top_k] for t in torch.sort(probs, dim=-1, descending=True, stable=True))
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids.to(torch.int32)


def moe_permute(x, ids, num_experts):
    """x [N, D]; ids [N, top_k] in [-1, E). Rows grouped by expert, stable in the flat slot index."""
    N, top_k = ids.shape
    flat = ids.reshape(-1).tolist()
    source = [slot for e in range(num_experts) for slot, expert in enumerate(flat) if expert == e]
    counts = [flat.count(e) for e in range(num_experts)]
    offsets = torch.tensor([0] + counts, dtype=torch.int32).cumsum(0).to(torch.int32)
    source = torch.tensor(source, dtype=torch.int64)
    rows = x[(source // top_k).to(x.device)]
    return Permutation(rows, offsets.to(x.device), source.to(x.device), N, top_k)


def moe_unpermute(y_sorted, p, weights):
    """y[n] = sum over j with ids[n, j] >= 0 of weights[n, j] * y_sorted[row of (n, j)]; [N, D'] in
    y_sorted's dtype, rows with no expert are 0."""
    y = torch.zeros(p.num_tokens, y_sorted.shape[1], dtype=torch.float64, device=y_sorted.device)
    for row, slot in enumerate(p.source.tolist()):
        n, j = divmod(slot, p.top_k)
        y[n] += weights[n, j].double() * y_sorted[row].double()
    return y.to(y_sorted.dtype)


def grouped_gemm(x, w, offsets):
    """x [M, K] grouped by expert; w [E, N, K]; offsets [E + 1]. y[rows of e] = x[rows of e] @ w[e]^T."""
    y = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float64, device=x.device)
    bounds = offsets.tolist()
    for e in range(w.shape[0]):
        rows = slice(bounds[e], bounds[e + 1])
        y[rows] = x[rows].double() @ w[e].double().T
    return y.to(x.dtype)


def moe(x, weights, ids, w_gate_up, w_down):
    """x [N, D]; weights, ids [N, top_k]; w_gate_up [E, 2I, D]; w_down [E, D, I]. For each slot (n, j) with
    e = ids[n, j] >= 0: h = silu(x W_g^T) * (x W_u^T), W_g = w_gate_up[e, :I], W_u = w_gate_up[e, I:];
    y[n] = sum_j weights[n, j] * h W_down[e]^T. Returns [N, D] in x's dtype."""
    I = w_down.shape[2]
    y = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for n, j in zip(*[t.tolist() for t in torch.nonzero(ids >= 0, as_tuple=True)]):
        e = int(ids[n, j])
        xn = x[n].double()
        gate, up = w_gate_up[e, :I].double() @ xn, w_gate_up[e, I:].double() @ xn
        y[n] += weights[n, j].double() * (w_down[e].double() @ (F.silu(gate) * up))
    return y.to(x.dtype)
