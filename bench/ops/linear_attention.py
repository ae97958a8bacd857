"""Scalar-gated linear attention (kernellab.linear_attention), and what the gated delta rule's file shares with it:
the gates, the states' bytes and the recurrent ops' grid, sizes and reference budget."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.ops import (SEQ_LENS, OpSpec, Target, Versus, generator, nbytes, randn, seqlens, time_layout, to_device,
                       vary)

GATES = ("mild", "strong", "zero")  # mild: logsigmoid(randn) / 16 (FlashQLA's benchmark); strong: <= -1


# ------------------------------------------------------------------------------------------------------ inputs

def draw_gate(gen, kind, *shape):
    if kind == "mild":
        return F.logsigmoid(randn(gen, *shape)) / 16
    if kind == "strong":
        return F.logsigmoid(randn(gen, *shape)) * 4 - 1
    if kind == "zero":
        return torch.zeros(*shape, dtype=torch.float64)
    raise ValueError(f"gate must be one of {GATES}, got {kind!r}")


def linear_attention_inputs(B=1, T=64, H=2, K=32, V=32, *, dtype=torch.float32, device="cpu", seed=0,
                            gate="mild", initial_state=False, seqlens=None, output_final_state=True):
    """q, k [B, T, H, K] (k unit-norm rows, so the state stays bounded), v [B, T, H, V], g [B, T, H]."""
    gen = generator(seed)
    B, T, cu, N = time_layout(B, T, seqlens)
    inputs = dict(q=randn(gen, B, T, H, K), k=F.normalize(randn(gen, B, T, H, K), dim=-1),
                  v=randn(gen, B, T, H, V), g=None if gate is None else draw_gate(gen, gate, B, T, H),
                  initial_state=randn(gen, N, H, K, V) if initial_state else None,
                  output_final_state=output_final_state, cu_seqlens=cu)
    return to_device(inputs, dtype, device, keep_dtype=("g", "initial_state")) | wide_states(inputs, dtype, device)


def wide_states(inputs, dtype, device):
    """Gates and states stay float32 (float64 for float64 runs), whatever the dtype of q, k, v."""
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    return {key: inputs[key].to(wide).to(device) for key in ("g", "beta", "initial_state")
            if inputs.get(key) is not None}


# -------------------------------------------------------------------------------------------------------- cost
#
# FLOPs count a multiply-add as 2. Bytes are the fewest the call must move through memory: every input read once
# and every output written once. Element sizes are those of the tensors given, so a bf16 call moves half the bytes
# of a float32 one. A backward's bytes: the inputs it reads (the forward's inputs, recomputed from, and the
# outputs' gradients) once, the inputs' gradients written once. Forward + backward is the sum of the two models.

# Chunk length the chunked FLOP models assume (fla, FlashQLA and the lab's chunked kernels use 64).
CHUNK = 64


def state_bytes(inputs, num_seqs, heads, K, V) -> int:
    """Initial state read (when given) and final state written (when asked for), float32 [N, H, K, V]."""
    state = num_seqs * heads * K * V * 4
    return state * (inputs.get("initial_state") is not None) + state * bool(inputs.get("output_final_state"))


def num_seqs(inputs) -> int:
    cu = inputs.get("cu_seqlens")
    return inputs["q"].shape[0] if cu is None else cu.shape[0] - 1


def linear_attention_flops(tokens: int, heads: int, K: int, V: int, chunk: int = CHUNK) -> int:
    """Chunked scalar-gated linear attention, per token per head:
        4 K V            (inter-chunk output Q S and state update K^T V, one K x V product each)
      + chunk (K + V)    (intra-chunk Q K^T and P V, causal halves: 2 chunk K / 2 + 2 chunk V / 2)."""
    return tokens * heads * (4 * K * V + chunk * (K + V))


def linear_attention_cost(inputs) -> tuple[int, int]:
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    B, T, H, K = q.shape
    V = v.shape[-1]
    flops = linear_attention_flops(B * T, H, K, V)
    moved = nbytes(q, k, v, inputs.get("g"), inputs.get("cu_seqlens")) + nbytes(v)  # o has v's shape
    return flops, moved + state_bytes(inputs, num_seqs(inputs), H, K, V)


def linear_attention_backward_flops(tokens: int, heads: int, K: int, V: int, chunk: int = CHUNK) -> int:
    """Chunked linear attention backward (the lab's torch algorithm), per token per head:
        10 K V            state recomputed (K^T V), the reverse pass over chunks (Kd dS and (gamma q)^T do),
                          then do S0^T (dq) and v dS1^T (dk), one K x V product each
      + chunk (3 K + 2 V) intra-chunk, causal halves: Q K^T recomputed, dP = do v^T, P^T do, dP k, dP^T q."""
    return tokens * heads * (10 * K * V + chunk * (3 * K + 2 * V))


def recurrent_backward_bytes(inputs, differentiable) -> int:
    """Inputs read and their gradients written (the same sizes), plus the gradients of o and of the final state
    read."""
    given = [inputs.get(name) for name in differentiable]
    v = inputs["v"]
    final = num_seqs(inputs) * v.shape[2] * inputs["q"].shape[-1] * v.shape[-1] * 4 * bool(inputs.get(
        "output_final_state"))
    return 2 * nbytes(*given) + nbytes(v) + final


def linear_attention_backward_cost(inputs) -> tuple[int, int]:
    q, v = inputs["q"], inputs["v"]
    B, T, H, K = q.shape
    flops = linear_attention_backward_flops(B * T, H, K, v.shape[-1])
    return flops, recurrent_backward_bytes(inputs, ("q", "k", "v", "g", "initial_state"))


# ------------------------------------------------------------------------------------- sweep and yardstick policy

def recurrent_grid(gdr: bool):
    """Linear attention and the gated delta rule: T, batch, packed sequences, heads, head dim, and decode (one token
    per sequence, from a state, for a growing batch)."""
    def grid(scale):
        if scale == "cuda":
            heads, base_T = ((16, 32), (16, 64), (8, 16)), 4096
        else:
            heads, base_T = ((1, 2), (2, 4), (4, 8)), 1024 if scale == "quick" else 2048
        hk, hv = heads[0] if scale == "cuda" else heads[1]
        base = dict(B=1, T=base_T, seqs=1, K=128, V=128) | (dict(Hk=hk, Hv=hv, mode="chunk") if gdr else dict(H=hv))
        head_values = [dict(Hk=a, Hv=b) if gdr else dict(H=b) for a, b in heads]
        dims = [dict(K=64, V=64), dict(K=128, V=128)] + ([dict(K=256, V=256)] if scale == "cuda" else [])
        shapes = (vary(base, "T", SEQ_LENS[scale]) + vary(base, "B", (1, 2, 4) if scale != "cuda" else (1, 2, 4, 8))
                  + vary(base, "seqs", (1, 4, 16)) + vary(base, "heads", head_values) + vary(base, "dim", dims))
        decode = dict(base, T=1) | (dict(mode="recurrent") if gdr else {})
        return shapes + vary(decode, "B", (1, 8, 32) if scale != "cuda" else (1, 8, 32, 128, 512))
    return grid


def recurrent_gigabytes(heads_k, heads_v):
    def gigabytes(s, itemsize):
        hk, hv = s[heads_k], s[heads_v]
        elems = s["B"] * s["T"] * (2 * hk * s["K"] + 2 * hv * s["V"]) + 2 * s["B"] * s["seqs"] * hv * s["K"] * s["V"]
        return elems * itemsize / 2**30
    return gigabytes


def token_loop_affordable(heads, full=2**29):
    """The reference's token loop: about B T H K V multiply-adds in float64, some 2^29 a few seconds here. Its
    autograd keeps every token's state (B H K V float64 each: 13 GB at 2^29) and runs a graph of T steps: 2^26."""
    return lambda s, quick: s["B"] * s["T"] * s[heads] * s["K"] * s["V"] <= (min(full, 2**26) if quick else full)


def recurrent_invariance(cudasim: bool = False) -> dict:
    """The recurrent ops' batches (tests/ops/test_invariance.py), initial states given: a batch of 3 sequences
    ("batch") and 3 of unequal lengths packed into one row ("packed"); lengths cross the chunks of the chunked
    backends (16 to 64 tokens). cudasim: tiny ones for the numba.cuda simulator (every thread in Python)."""
    state = dict(initial_state=True)
    found = {"cpu": dict(batch=dict(B=3, T=80, **state), packed=dict(seqlens=[37, 1, 70], **state)),
             "interpret": dict(batch=dict(B=3, T=70, K=16, V=16, **state),
                               packed=dict(seqlens=[37, 1, 70], K=16, V=16, **state))}
    if cudasim:
        found["cudasim"] = dict(batch=dict(B=3, T=5, K=8, V=8, **state),
                                packed=dict(seqlens=[4, 1, 6], K=8, V=8, **state))
    return found


# The gradients' edge cases (tests/ops/test_backward.py), as the gated delta rule's without its own keywords.
GRADIENT_CASES = {
    "T1": dict(T=1),
    "T1_batch2_initial_state": dict(B=2, T=1, initial_state=True),
    "T_not_multiple_of_chunk": dict(T=70, initial_state=True, mode="chunk"),
    "recurrent_initial_state": dict(T=20, initial_state=True, mode="recurrent"),
    "chunk_no_initial_state": dict(T=40, mode="chunk"),
    "packed_with_length_1": dict(seqlens=[21, 1, 40], initial_state=True, mode="chunk"),
    "packed_no_initial_state": dict(seqlens=[1, 33, 5], mode="recurrent"),
    "g_zero": dict(T=40, gate="zero", initial_state=True, mode="chunk"),
    "strong_decay": dict(T=40, gate="strong", initial_state=True, mode="chunk"),
    "no_final_state": dict(T=40, initial_state=True, output_final_state=False, mode="chunk"),
}
RECURRENT_PLOTS = {"T": ("T",), "B": ("B",), "seqs": ("seqs",), "dim": ("K", "V")}

LINEAR_ATTENTION = OpSpec(
    "linear_attention", ("B", "T", "seqs", "H", "K", "V"), maker=linear_attention_inputs,
    make=lambda s: dict(B=s["B"], T=s["T"], H=s["H"], K=s["K"], V=s["V"], seqlens=seqlens(s["T"], s["seqs"]),
                        initial_state=True, output_final_state=True),
    grid=recurrent_grid(gdr=False), cost=linear_attention_cost,
    backward_cost=linear_attention_backward_cost,
    affordable=token_loop_affordable("H"), backward_affordable=token_loop_affordable("H", 2**26),
    gigabytes=recurrent_gigabytes("H", "H"), plot_axes=RECURRENT_PLOTS | {"heads": ("H",)},
    versus=Versus("attention", same=dict(B="B", H="Hq", K="D", V="D"), fixed=dict(seqs=1)),
    targets=(Target("Linear attention at least as fast as the best lab softmax attention from T = 1024 on "
                    "(CPU, float32)", "crossover", 1024),),
    flop_model="chunked linear attention: 4 K V + 64 (K + V) FLOPs per token per head.",
    backward_flop_model="10 K V + 64 (3 K + 2 V) FLOPs per token per head (recompute, reverse state pass, "
                        "gradients).",
    tiny=dict(B=1, T=40, seqs=2, H=2, K=16, V=16),
    gradient_cases=GRADIENT_CASES, gradient_spot_checks=("T_not_multiple_of_chunk", "packed_with_length_1"),
    invariance=recurrent_invariance())


SPECS = (LINEAR_ATTENTION,)
