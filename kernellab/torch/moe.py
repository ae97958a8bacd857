"""MoE routing, token permutation, grouped GEMM and the expert layer in vectorised PyTorch (CPU and CUDA).

Shapes: N tokens, D hidden, E experts, top_k slots per token, I expert size, M = number of slots with an
expert (ids >= 0). A slot is the flat index n * top_k + j.

Precision: GEMMs run in the inputs' dtype with float32 accumulation (BLAS on CPU and cuBLAS both accumulate
half-precision products in float32: the result is the float32 product rounded once); the gate activation and
the weighted sum over a token's slots run in float32 (float64 for float64 inputs).

Backward (`<op>_backward`, kernellab.autograd's contract): dX = dY W and the per-expert dW = dY^T X as GEMMs over
each expert's rows (a grouped GEMM over tokens), the SiLU gate's backward, a permutation's gradient gathered or
scattered back by slot, the routing weights' gradient a row dot product per slot. The forward's products are
recomputed from the inputs, in the same dtypes (GEMMs in x's dtype, the gate and the sums in float32).

Determinism: nothing accumulates with atomics. `moe_unpermute` writes expert outputs once into a per-slot
buffer [N * top_k, D], then each token sums its top_k rows in slot order; `moe` adds each expert's weighted
outputs into its tokens' rows, expert after expert (no N * top_k * D buffer: 268 MB at N = 4096, D = 2048).
"""
import torch
import torch.nn.functional as F

from kernellab.types import Permutation

# Up to this many slots (N * top_k), `moe` groups the slots by expert on the host (decode: no sort, no
# permutation tensors); above it, a stable sort on the device groups them.
HOST_GROUPING_MAX_SLOTS = 256


def _accumulation_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def route(router_logits, top_k, renormalize):
    """router_logits [N, E] -> softmax in float32 -> top_k (descending) -> (renormalize) divide by their sum.
    Returns weights float32 [N, top_k] and ids int32 [N, top_k]."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    # equal probabilities: the lower expert first, as the reference (torch.topk leaves the order of ties unspecified)
    weights, ids = (t[:, :top_k] for t in torch.sort(probs, dim=-1, descending=True, stable=True))
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids.to(torch.int32)


def _sorted_slots(ids, num_experts):
    """ids [N, top_k] in [-1, E) -> (offsets int32 [E + 1], source int64 [M]): the slots with an expert,
    sorted by expert, stable in the slot index. One host synchronisation (M)."""
    flat = ids.reshape(-1)
    # counts[0] = slots with no expert (-1), counts[1 + e] = slots of expert e
    counts = torch.bincount((flat + 1).to(torch.int64), minlength=num_experts + 1)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=ids.device)
    offsets[1:] = counts[1:].cumsum(0)
    dropped = flat.numel() - int(offsets[-1])
    # -1 sorts first; a stable sort keeps ascending slot order within an expert
    source = torch.sort(flat, stable=True).indices[dropped:]
    return offsets, source


def moe_permute(x, ids, num_experts):
    """x [N, D]; ids [N, top_k] int32/int64 in [-1, E). Returns Permutation(x [M, D], offsets int32 [E + 1],
    source int64 [M], N, top_k): the rows x[n] of every slot with an expert, grouped by expert in ascending
    order, stable in the slot index."""
    N, top_k = ids.shape
    offsets, source = _sorted_slots(ids, num_experts)
    return Permutation(x.index_select(0, source // top_k), offsets, source, num_tokens=N, top_k=top_k)


def _weighted_sum(per_slot, source, weights, num_tokens, top_k, dtype):
    """per_slot [N * top_k, D] (the output of every slot, 0 where it has none); source int64 [M] (the slots with
    an expert); weights [N, top_k] -> y [N, D] in `dtype`, y[n] = sum_j weights[n, j] * per_slot[n * top_k + j]
    summed in slot order. Weights of slots without an expert are zeroed, so a NaN there cannot leak into y."""
    slot_weights = torch.zeros(num_tokens * top_k, dtype=per_slot.dtype, device=per_slot.device)
    slot_weights.index_copy_(0, source, weights.reshape(-1).index_select(0, source).to(per_slot.dtype))
    D = per_slot.shape[1]
    y = torch.bmm(slot_weights.view(num_tokens, 1, top_k), per_slot.view(num_tokens, top_k, D))
    return y.view(num_tokens, D).to(dtype)


def moe_unpermute(y_sorted, p, weights):
    """y_sorted [M, D'] (rows in the order of p); weights [N, top_k]. y[n] = sum over slots (n, j) with an
    expert of weights[n, j] * y_sorted[row of (n, j)]. Returns [N, D'] in y_sorted's dtype, rows of tokens
    with no expert 0."""
    per_slot = torch.zeros(p.num_tokens * p.top_k, y_sorted.shape[1], dtype=_accumulation_dtype(y_sorted.dtype),
                           device=y_sorted.device)
    per_slot.index_copy_(0, p.source, y_sorted.to(per_slot.dtype))
    return _weighted_sum(per_slot, p.source, weights, p.num_tokens, p.top_k, y_sorted.dtype)


@torch.no_grad()
def moe_permute_backward(grads, x, ids, num_experts):
    """grads {"x": [M, D], the gradient of p.x}. dx[n] = the sum of the rows of token n's slots, in slot order
    (a per-slot buffer, then a sum over top_k: deterministic). Returns {"x": [N, D]} in x's dtype."""
    N, top_k = ids.shape
    d_rows = grads["x"]
    if d_rows is None:
        return dict(x=torch.zeros_like(x))
    _, source = _sorted_slots(ids, num_experts)
    per_slot = torch.zeros(N * top_k, x.shape[1], dtype=_accumulation_dtype(x.dtype), device=x.device)
    per_slot.index_copy_(0, source, d_rows.to(per_slot.dtype))
    return dict(x=per_slot.view(N, top_k, -1).sum(1).to(x.dtype))


@torch.no_grad()
def moe_unpermute_backward(grads, y_sorted, p, weights):
    """grads {"y": [N, D']}. For the row r of slot (n, j): dy_sorted[r] = weights[n, j] dy[n] and dweights[n, j] =
    dy[n] . y_sorted[r]; slots without an expert get 0. Returns {"y_sorted": [M, D'] in y_sorted's dtype,
    "weights": [N, top_k] float32 (float64 for float64 inputs)}."""
    dy = grads["y"]
    acc = _accumulation_dtype(y_sorted.dtype)
    if dy is None:
        return dict(y_sorted=torch.zeros_like(y_sorted), weights=torch.zeros_like(weights, dtype=acc))
    d_rows = dy.to(acc).index_select(0, p.source // p.top_k)
    slot_weights = weights.reshape(-1).index_select(0, p.source).to(acc)
    d_weights = torch.zeros(p.num_tokens * p.top_k, dtype=acc, device=dy.device)
    d_weights.index_copy_(0, p.source, (d_rows * y_sorted.to(acc)).sum(-1))
    return dict(y_sorted=d_rows.mul_(slot_weights[:, None]).to(y_sorted.dtype),
                weights=d_weights.view(p.num_tokens, p.top_k))


# Rows of one expert for which its GEMMs run transposed, (W x^T)^T, when the weight is larger than a core's L2:
# measured on CPU (MKL, float32, 2048 x 1024 weights), x W^T packs the weight for every call from 4 rows on,
# while W x^T streams it: 1.2 ms instead of 1.6 at 8 rows, 1.6 instead of 2.1 at 32; from about 100 rows the
# packed form wins, and so it does for weights that stay in cache. Up to 4 rows both read the weight once.
TRANSPOSED_ROWS = range(5, 65)
STREAMED_WEIGHT_BYTES = 2 * 2**20


def _streams_weight(x, w):
    return (x.device.type == "cpu" and x.shape[0] in TRANSPOSED_ROWS
            and w.numel() * w.element_size() >= STREAMED_WEIGHT_BYTES)


def _linear(x, w):
    """x [n, K] @ w [Nout, K]^T -> [n, Nout] (F.linear), as a transposed view of w x^T where _streams_weight: a
    second _linear on that view (or on elementwise results that keep its strides) reads it without a copy."""
    return torch.mm(w, x.T).T if _streams_weight(x, w) else F.linear(x, w)


def grouped_gemm(x, w, offsets):
    """x [M, K] grouped by expert; w [E, Nout, K]; offsets int32 [E + 1]. y[offsets[e]:offsets[e + 1]] =
    x[same rows] @ w[e]^T, one matmul per non-empty group on views of x and w (transposed for _streams_weight
    groups). Returns [M, Nout] in x's dtype."""
    y = torch.empty(x.shape[0], w.shape[1], dtype=x.dtype, device=x.device)
    bounds = offsets.tolist()
    for e, (start, end) in enumerate(zip(bounds, bounds[1:])):
        if _streams_weight(x[start:end], w[e]):
            y[start:end] = _linear(x[start:end], w[e])
        elif end > start:
            torch.mm(x[start:end], w[e].T, out=y[start:end])
    return y


@torch.no_grad()
def grouped_gemm_backward(grads, x, w, offsets):
    """grads {"y": [M, Nout]}. Per group e: dx[rows] = dy[rows] @ w[e] and dw[e] = dy[rows]^T @ x[rows] (the
    grouped GEMM over tokens; an empty group's dw[e] is 0). Returns {"x": [M, K], "w": [E, Nout, K]} in x's
    dtype."""
    dy = grads["y"]
    dx, dw = torch.zeros_like(x), torch.zeros_like(w)
    if dy is None:
        return dict(x=dx, w=dw)
    bounds = offsets.tolist()
    for e, (start, end) in enumerate(zip(bounds, bounds[1:])):
        if end > start:
            torch.mm(dy[start:end], w[e], out=dx[start:end])
            torch.mm(dy[start:end].T, x[start:end], out=dw[e])
    return dict(x=dx, w=dw)


def _host_groups(ids):
    """ids [N, top_k] -> (experts, bounds, source): the active experts in ascending order, the bounds of their
    slots in source, and source int64 [M] the slots grouped by expert (reads ids on the host: small N)."""
    groups = {}
    for slot, expert in enumerate(ids.reshape(-1).tolist()):
        if expert >= 0:
            groups.setdefault(expert, []).append(slot)
    experts = sorted(groups)
    bounds = [0]
    for expert in experts:
        bounds.append(bounds[-1] + len(groups[expert]))
    source = torch.tensor([slot for expert in experts for slot in groups[expert]], dtype=torch.int64)
    return experts, bounds, source.to(ids.device)


def group_slots(ids, num_experts):
    """ids [N, top_k] in [-1, E) -> (experts, bounds, source): the active experts in ascending order, the bounds
    of their slots in source, source int64 [M] the slots with an expert grouped by expert (ascending within one).
    Small N (decode) groups on the host; large N sorts on the device."""
    if ids.numel() <= HOST_GROUPING_MAX_SLOTS:
        return _host_groups(ids)
    offsets, source = _sorted_slots(ids, num_experts)
    every = offsets.tolist()
    experts = [e for e in range(num_experts) if every[e + 1] > every[e]]
    return experts, [0] + [every[e + 1] for e in experts], source


def moe(x, weights, ids, w_gate_up, w_down):
    """The Qwen3.5 experts. x [N, D]; weights [N, top_k]; ids [N, top_k] in [-1, E); w_gate_up [E, 2I, D];
    w_down [E, D, I]. For each slot (n, j) with e = ids[n, j] >= 0:
    y[n] += weights[n, j] * (silu(x[n] W_g^T) * (x[n] W_u^T)) W_down[e]^T, W_g = w_gate_up[e, :I],
    W_u = w_gate_up[e, I:]. Returns [N, D] in x's dtype; the GEMMs run in x's dtype, the gate and the sum in
    float32 (float64 for float64 x).

    Each active expert runs once on the rows of the tokens routed to it, through views of its weights (no weight
    copies), and adds its weighted outputs into their rows of y (no N * top_k * D buffer: 268 MB at N = 4096,
    D = 2048). The slot weights scale the [n, I] activation rather than the [n, D] output: the same product, a
    quarter of the multiplies at Qwen3.5's D = 4 I."""
    N, top_k = ids.shape
    experts, bounds, source = group_slots(ids, w_gate_up.shape[0])
    acc = _accumulation_dtype(x.dtype)
    y = torch.zeros(N, x.shape[1], dtype=acc, device=x.device)
    slot_weights = weights.reshape(-1).to(acc)
    tokens = source // top_k
    for e, start, end in zip(experts, bounds, bounds[1:]):
        rows = tokens[start:end]
        gate, up = _linear(x.index_select(0, rows), w_gate_up[e]).to(acc).chunk(2, dim=-1)
        row_weights = slot_weights.index_select(0, source[start:end])
        h = F.silu(gate, inplace=True).mul_(up).mul_(row_weights[:, None])  # in the GEMM's output: no new buffer
        y.index_add_(0, rows, _linear(h.to(x.dtype), w_down[e]).to(acc))
    return y.to(x.dtype)


@torch.no_grad()
def moe_backward(grads, x, weights, ids, w_gate_up, w_down):
    """grads {"y": [N, D]}. Per active expert, on its rows (recomputed: gate, up = x W_gu^T; h = silu(gate) up;
    s the slot weights): dW_down = dy^T (s h); dh = s (dy W_down), ds = (dy W_down) . h; d gate = dh up silu'(gate),
    d up = dh silu(gate) with silu'(a) = sigmoid(a) (1 + a (1 - sigmoid(a))); dW_gu = [d gate | d up]^T x and
    dx += [d gate | d up] W_gu (rows added expert after expert, as the forward). Returns {"x": [N, D],
    "w_gate_up": [E, 2I, D], "w_down": [E, D, I] in x's dtype, "weights": [N, top_k] float32 (float64 for float64
    x), 0 for slots without an expert}."""
    dy = grads["y"]
    N, top_k = ids.shape
    acc = _accumulation_dtype(x.dtype)
    dx = torch.zeros(N, x.shape[1], dtype=acc, device=x.device)
    d_gate_up, d_down = torch.zeros_like(w_gate_up), torch.zeros_like(w_down)
    d_weights = torch.zeros(N * top_k, dtype=acc, device=x.device)
    if dy is not None:
        experts, bounds, source = group_slots(ids, w_gate_up.shape[0])
        slot_weights = weights.reshape(-1).to(acc)
        tokens = source // top_k
        dy = dy.to(x.dtype)
        I = w_down.shape[2]
        for e, start, end in zip(experts, bounds, bounds[1:]):
            rows, slots = tokens[start:end], source[start:end]
            x_rows, dy_rows = x.index_select(0, rows), dy.index_select(0, rows)
            projected = F.linear(x_rows, w_gate_up[e]).to(acc)
            gate, up = projected[:, :I], projected[:, I:]
            sig = torch.sigmoid(gate)
            activated = gate * sig
            h = activated * up
            row_weights = slot_weights.index_select(0, slots)[:, None]
            torch.mm(dy_rows.T, (h * row_weights).to(x.dtype), out=d_down[e])
            dh = torch.mm(dy_rows, w_down[e]).to(acc)
            d_weights.index_copy_(0, slots, (dh * h).sum(-1))
            dh.mul_(row_weights)
            # [d gate | d up], written over the projection (spent)
            projected[:, :I] = dh * up * sig * (1 + gate * (1 - sig))
            projected[:, I:] = dh * activated
            d_projected = projected.to(x.dtype)
            torch.mm(d_projected.T, x_rows, out=d_gate_up[e])
            dx.index_add_(0, rows, torch.mm(d_projected, w_gate_up[e]).to(acc))
    return dict(x=dx.to(x.dtype), weights=d_weights.view(N, top_k), w_gate_up=d_gate_up, w_down=d_down)
