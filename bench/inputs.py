"""Inputs of every op, declared once and shared by the tests and the benchmarks.

Each maker returns a dict of keyword arguments for the op's public function (kernellab.<op>(**inputs)),
drawn fresh from `seed` on the CPU generator (so a seed means the same numbers on every device) and then
moved to `device`. Value ranges follow the models: log-sigmoid gates, sigmoid beta, unit-scale weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

GATES = ("mild", "strong", "zero")  # mild: logsigmoid(randn) / 16 (FlashQLA's benchmark); strong: <= -1
BETAS = ("sigmoid", "low", "high")  # low: near 0, high: near 1
ROUTINGS = ("uniform", "skewed", "one_expert")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _to(inputs, dtype, device, keep_dtype=()):
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and key not in keep_dtype:
                value = value.to(dtype)
            value = value.to(device)
        out[key] = value
    return out


def cu_seqlens_of(seqlens, device="cpu"):
    """int32 [N + 1] offsets of packed sequences of the given lengths."""
    return torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _gate(gen, kind, *shape):
    if kind == "mild":
        return F.logsigmoid(_randn(gen, *shape)) / 16
    if kind == "strong":
        return F.logsigmoid(_randn(gen, *shape)) * 4 - 1
    if kind == "zero":
        return torch.zeros(*shape, dtype=torch.float64)
    raise ValueError(f"gate must be one of {GATES}, got {kind!r}")


def _beta(gen, kind, *shape):
    u = torch.rand(*shape, generator=gen, dtype=torch.float64)
    if kind == "sigmoid":
        return torch.sigmoid(_randn(gen, *shape))
    if kind == "low":
        return 1e-3 * u + 1e-6
    if kind == "high":
        return 1 - 1e-3 * u
    raise ValueError(f"beta must be one of {BETAS}, got {kind!r}")


def _time_layout(B, T, seqlens):
    """(B, T, cu_seqlens or None, N): packed sequences put all of them in one row of batch 1."""
    if seqlens is None:
        return B, T, None, B
    return 1, int(sum(seqlens)), cu_seqlens_of(seqlens), len(seqlens)


def linear_attention(B=1, T=64, H=2, K=32, V=32, *, dtype=torch.float32, device="cpu", seed=0, gate="mild",
                     initial_state=False, seqlens=None, output_final_state=True):
    """q, k [B, T, H, K] (k unit-norm rows, so the state stays bounded), v [B, T, H, V], g [B, T, H]."""
    gen = _gen(seed)
    B, T, cu, N = _time_layout(B, T, seqlens)
    inputs = dict(q=_randn(gen, B, T, H, K), k=F.normalize(_randn(gen, B, T, H, K), dim=-1),
                  v=_randn(gen, B, T, H, V), g=None if gate is None else _gate(gen, gate, B, T, H),
                  initial_state=_randn(gen, N, H, K, V) if initial_state else None,
                  output_final_state=output_final_state, cu_seqlens=cu)
    return _to(inputs, dtype, device, keep_dtype=("g", "initial_state")) | _state_dtype(inputs, dtype, device)


def gated_delta_rule(B=1, T=64, Hk=2, Hv=4, K=32, V=32, *, dtype=torch.float32, device="cpu", seed=0,
                     gate="mild", beta="sigmoid", initial_state=False, seqlens=None, use_qk_l2norm=True,
                     output_final_state=True):
    """q, k [B, T, Hk, K], v [B, T, Hv, V], g, beta [B, T, Hv]. With use_qk_l2norm=False, k is drawn unit-norm
    (the delta rule is only stable for ||k|| <= 1 with beta in (0, 1))."""
    gen = _gen(seed)
    B, T, cu, N = _time_layout(B, T, seqlens)
    k = _randn(gen, B, T, Hk, K)
    inputs = dict(q=_randn(gen, B, T, Hk, K), k=k if use_qk_l2norm else F.normalize(k, dim=-1),
                  v=_randn(gen, B, T, Hv, V), g=_gate(gen, gate, B, T, Hv), beta=_beta(gen, beta, B, T, Hv),
                  initial_state=_randn(gen, N, Hv, K, V) if initial_state else None,
                  output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm, cu_seqlens=cu)
    return _to(inputs, dtype, device, keep_dtype=("g", "beta", "initial_state")) | _state_dtype(inputs, dtype, device)


def _state_dtype(inputs, dtype, device):
    """Gates and states stay float32 (float64 for float64 runs), whatever the dtype of q, k, v."""
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    return {key: inputs[key].to(wide).to(device) for key in ("g", "beta", "initial_state")
            if inputs.get(key) is not None}


def attention(B=1, T=64, Hq=4, Hkv=2, D=32, *, dtype=torch.float32, device="cpu", seed=0, causal=True, Tk=None,
              seqlens=None, kv_lens=None):
    """q [B, T, Hq, D]; k, v [B, Tk, Hkv, D] (Tk = T unless a KV cache is longer). seqlens: packed sequences of
    these lengths (B = 1, cu_seqlens); kv_lens: per batch row, the valid keys of the [B, Tk] buffers."""
    gen = _gen(seed)
    B, T, cu, _ = _time_layout(B, T, seqlens)
    Tk = T if Tk is None else Tk
    inputs = dict(q=_randn(gen, B, T, Hq, D), k=_randn(gen, B, Tk, Hkv, D), v=_randn(gen, B, Tk, Hkv, D),
                  causal=causal)
    if cu is not None:
        inputs["cu_seqlens"] = cu
    if kv_lens is not None:
        inputs["kv_lens"] = torch.tensor(kv_lens, dtype=torch.int32)
    return _to(inputs, dtype, device)


def router_logits(N=64, E=8, *, dtype=torch.float32, device="cpu", seed=0, routing="uniform"):
    """[N, E] logits. skewed: a Zipf-like bias so a few experts take most tokens; one_expert: expert 0 wins."""
    gen = _gen(seed)
    logits = _randn(gen, N, E)
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
    gen = _gen(seed)
    logits = router_logits(N, E, dtype=torch.float64, seed=seed, routing=routing)
    if routing == "one_expert":
        logits[:, :top_k] += 100.0 * torch.arange(top_k, 0, -1, dtype=torch.float64)
    probs = torch.softmax(logits, dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    if drop:
        ids[torch.rand(N, top_k, generator=gen) < drop] = -1
    return weights.to(torch.float32).to(device), ids.to(id_dtype).to(device)


def moe_permute(N=64, D=32, E=8, top_k=2, *, dtype=torch.float32, device="cpu", seed=0, routing="uniform",
                drop=0.0, id_dtype=torch.int32):
    gen = _gen(seed + 1)
    _, ids = routing_ids(N, E, top_k, seed=seed, routing=routing, drop=drop, id_dtype=id_dtype, device=device)
    return dict(x=_randn(gen, N, D).to(dtype).to(device), ids=ids, num_experts=E)


def group_offsets(ids, num_experts):
    """int32 [E + 1] offsets of the rows of each expert for ids [N, top_k] (-1 slots dropped)."""
    counts = torch.bincount(ids[ids >= 0].long().cpu(), minlength=num_experts)
    return torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32).to(ids.device)


def grouped_gemm(N=64, E=8, top_k=2, K=32, Nout=48, *, dtype=torch.float32, device="cpu", seed=0,
                 routing="uniform", drop=0.0):
    """x [M, K] with groups sized as the routing of N tokens to top_k of E experts; w [E, Nout, K]."""
    gen = _gen(seed + 1)
    _, ids = routing_ids(N, E, top_k, seed=seed, routing=routing, drop=drop)
    offsets = group_offsets(ids, E)
    M = int(offsets[-1])
    inputs = dict(x=_randn(gen, M, K), w=_randn(gen, E, Nout, K) * K ** -0.5, offsets=offsets)
    return _to(inputs, dtype, device)


def moe(N=64, D=32, E=8, I=16, top_k=2, *, dtype=torch.float32, device="cpu", seed=0, routing="uniform",
        drop=0.0, id_dtype=torch.int32):
    """x [N, D], weights/ids [N, top_k], w_gate_up [E, 2I, D], w_down [E, D, I] scaled like nn.Linear's init."""
    gen = _gen(seed + 1)
    weights, ids = routing_ids(N, E, top_k, seed=seed, routing=routing, drop=drop, id_dtype=id_dtype)
    inputs = dict(x=_randn(gen, N, D), weights=weights, ids=ids,
                  w_gate_up=_randn(gen, E, 2 * I, D) * D ** -0.5, w_down=_randn(gen, E, D, I) * I ** -0.5)
    return _to(inputs, dtype, device, keep_dtype=("weights",))


def route(N=64, E=8, top_k=2, *, dtype=torch.float32, device="cpu", seed=0, routing="uniform", renormalize=True):
    return dict(router_logits=router_logits(N, E, dtype=dtype, device=device, seed=seed, routing=routing),
                top_k=top_k, renormalize=renormalize)


def moe_unpermute(N=64, D=32, E=8, top_k=2, *, dtype=torch.float32, device="cpu", seed=0, routing="uniform",
                  drop=0.0, id_dtype=torch.int32):
    """A Permutation from the reference plus random expert outputs y_sorted [M, D] and the routing weights."""
    from reference.moe import moe_permute as reference_permute

    gen = _gen(seed + 2)
    weights, ids = routing_ids(N, E, top_k, seed=seed, routing=routing, drop=drop, id_dtype=id_dtype)
    p = reference_permute(_randn(gen, N, D).to(dtype), ids, E)
    p.x, p.offsets, p.source = (t.to(device) for t in (p.x, p.offsets, p.source))
    return dict(y_sorted=_randn(gen, p.source.shape[0], D).to(dtype).to(device), p=p, weights=weights.to(device))


def grouped_gemm_fp8(N=64, E=8, top_k=2, K=32, Nout=48, *, dtype=torch.float32, device="cpu", seed=0,
                     routing="uniform", drop=0.0):
    """grouped_gemm's inputs with w quantized to float8_e4m3fn in 128 x 128 blocks (w, w_scale); x in dtype."""
    from kernellab.fp8 import quantize_weights

    made = grouped_gemm(N, E, top_k, K, Nout, dtype=torch.float32, seed=seed, routing=routing, drop=drop)
    w, w_scale = quantize_weights(made["w"])
    return dict(x=made["x"].to(dtype).to(device), w=w.to(device), w_scale=w_scale.to(device),
                offsets=made["offsets"].to(device))


def moe_fp8(N=64, D=32, E=8, I=16, top_k=2, *, dtype=torch.float32, device="cpu", seed=0, routing="uniform",
            drop=0.0, id_dtype=torch.int32):
    """moe's inputs with the expert weights quantized to float8_e4m3fn in 128 x 128 blocks; x in dtype."""
    from kernellab.fp8 import quantize_weights

    made = moe(N, D, E, I, top_k, dtype=torch.float32, seed=seed, routing=routing, drop=drop, id_dtype=id_dtype)
    (w_gate_up, w_gate_up_scale), (w_down, w_down_scale) = map(quantize_weights, (made["w_gate_up"], made["w_down"]))
    return dict(x=made["x"].to(dtype).to(device), weights=made["weights"].to(device), ids=made["ids"].to(device),
                w_gate_up=w_gate_up.to(device), w_gate_up_scale=w_gate_up_scale.to(device), w_down=w_down.to(device),
                w_down_scale=w_down_scale.to(device))


MAKERS = {"linear_attention": linear_attention, "gated_delta_rule": gated_delta_rule, "attention": attention,
          "route": route, "moe_permute": moe_permute, "moe_unpermute": moe_unpermute,
          "grouped_gemm": grouped_gemm, "moe": moe, "grouped_gemm_fp8": grouped_gemm_fp8, "moe_fp8": moe_fp8,
          "kda": lambda **shape: __import__("bench.kda").kda.make_inputs(**shape)}  # its maker: bench/kda.py


def make(op, **shape):
    """Inputs of op: kernellab.<op>(**make(op, ...))."""
    return MAKERS[op](**shape)
