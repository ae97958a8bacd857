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
    rows, scales = y_sorted.double().unbind(0), weights.double().reshape(-1).unbind(0)
    terms = [[] for _ in range(p.num_tokens)]
    for row, slot in enumerate(p.source.tolist()):
        terms[slot // p.top_k].append(scales[slot] * rows[row])
    return _sums(terms, y_sorted.shape[1], y_sorted.device).to(y_sorted.dtype)


def grouped_gemm(x, w, offsets):
    """x [M, K] grouped by expert; w [E, N, K]; offsets [E + 1]. y[rows of e] = x[rows of e] @ w[e]^T."""
    bounds = offsets.tolist()
    before, *groups, after = x.double().split([bounds[0], *(b - a for a, b in zip(bounds, bounds[1:])),
                                                x.shape[0] - bounds[-1]])
    blocks = [rows @ we.T for rows, we in zip(groups, w.double().unbind(0))]
    outside = [torch.zeros(len(rows), w.shape[1], dtype=torch.float64, device=x.device) for rows in (before, after)]
    return torch.cat([outside[0], *blocks, outside[1]]).to(x.dtype)  # (split, unbind: see _sums)


def moe(x, weights, ids, w_gate_up, w_down):
    """x [N, D]; weights, ids [N, top_k]; w_gate_up [E, 2I, D]; w_down [E, D, I]. For each slot (n, j) with
    e = ids[n, j] >= 0: h = silu(x W_g^T) * (x W_u^T), W_g = w_gate_up[e, :I], W_u = w_gate_up[e, I:];
    y[n] = sum_j weights[n, j] * h W_down[e]^T. Returns [N, D] in x's dtype."""
    I = w_down.shape[2]
    tokens, scales, downs = x.double().unbind(0), weights.double().unbind(0), w_down.double().unbind(0)
    gates_ups = [(w[:I], w[I:]) for w in w_gate_up.double().unbind(0)]
    terms = [[] for _ in range(x.shape[0])]
    for n, j in zip(*[t.tolist() for t in torch.nonzero(ids >= 0, as_tuple=True)]):
        e = int(ids[n, j])
        gate, up = (w @ tokens[n] for w in gates_ups[e])
        terms[n].append(scales[n][j] * (downs[e] @ (F.silu(gate) * up)))
    return _sums(terms, x.shape[1], x.device).to(x.dtype)


def _sums(terms, width, device):
    """float64 [len(terms), width]: row n the sum of the vectors terms[n] (0 where none). The loops above read rows
    of unbind()'s and add stacked sums, never x[n] or y[n] += ...: autograd's backward of each such select or
    write into a slice copies the whole tensor (moe_unpermute's reference backward took 12 minutes at N = 1024,
    top 8)."""
    zero = torch.zeros(width, dtype=torch.float64, device=device)
    return torch.stack([sum(row, zero) for row in terms])
