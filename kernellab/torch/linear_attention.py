"""Scalar-gated linear attention in vectorised PyTorch (CPU and GPU), and the chunk machinery it shares with
the gated delta rule (kernellab/torch/gated_delta_rule.py).

Chunk-major layout: a tensor [B, T, H, *D] is re-laid as [NC, N, H, C, *D]: chunk index first (the sequential
pass walks it), then sequence, head, position in the chunk. Packed sequences (cu_seqlens) each start a new chunk
and run in lockstep: step j of the pass advances chunk j of every sequence. Positions past a sequence's end are
zeros (k = v = 0, g = 0, beta = 0), which leave the state unchanged; their outputs are dropped. The same layout
with C = 1 is the time-major layout of the token-by-token (recurrent) mode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernellab import serving


CHUNK_SIZE = 64
CHUNK_GROUP = 32  # chunks computed together (1024 tokens at chunk 32, 2048 at chunk 64)
# Decay factors exp(x) with x below this log decay are flushed to exactly 0. Next to float32's 2^-24 rounding
# they are invisible, but left in they make subnormal numbers (below 1.2e-38) in the products that follow,
# which x86 CPUs compute up to a hundred times slower: heads that decay fast (g of -5 to -10 per token, as in
# real checkpoints) reach them within a chunk. Subnormal states slowed a whole model's prefill by a quarter.
LOG_DECAY_FLOOR = -40.0


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise (fp16 and bf16 are widened)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@dataclass
class ChunkLayout:
    """Where every token of [B, T] sits in the chunk-major layout [num_chunks, num_seqs, ..., size, ...].

    chunk, seq, pos: int64 [B * T] (None when the layout is a plain reshape: no cu_seqlens and T % size == 0)."""

    batch: int
    time: int
    size: int
    num_chunks: int
    num_seqs: int
    chunk: torch.Tensor | None = None
    seq: torch.Tensor | None = None
    pos: torch.Tensor | None = None

    @classmethod
    def of(cls, B: int, T: int, cu_seqlens: torch.Tensor | None, size: int, device) -> ChunkLayout:
        if cu_seqlens is None:
            if T % size == 0:
                return cls(B, T, size, T // size, B)
            lengths = [T] * B
            seq = torch.arange(B, device=device).repeat_interleave(T)
            offset = torch.arange(T, device=device).repeat(B)
        else:
            bounds = cu_seqlens.tolist()
            lengths = [end - start for start, end in zip(bounds, bounds[1:])]
            seq = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                          torch.tensor(lengths, device=device), output_size=T)
            offset = torch.arange(T, device=device) - cu_seqlens.to(device=device, dtype=torch.int64)[seq]
        num_chunks = max(1, -(-max(lengths) // size))
        return cls(B, T, size, num_chunks, len(lengths), offset // size, seq, offset % size)

    def to_chunks(self, x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, H, *D] (times scale [B, T, H, 1], in the same pass) -> [NC, N, H, C, *D] in dtype, contiguous,
        zero past each sequence's end."""
        B, T, H, *D = x.shape
        NC, N, C = self.num_chunks, self.num_seqs, self.size
        if self.chunk is None:  # always a copy: callers update the result in place
            out = torch.empty(NC, N, H, C, *D, dtype=dtype, device=x.device)
            chunk_major = x.view(B, NC, C, H, *D).transpose(2, 3).transpose(0, 1)
            if scale is None:
                return out.copy_(chunk_major)
            return torch.mul(chunk_major, scale.view(B, NC, C, H, 1).transpose(2, 3).transpose(0, 1), out=out)
        out = torch.zeros(NC, N, H, C, *D, dtype=dtype, device=x.device)
        rows = x.reshape(B * T, H, *D)
        if scale is not None:
            rows = rows * scale.reshape(B * T, H, 1)
        out.transpose(2, 3)[self.chunk, self.seq, self.pos] = rows.to(dtype)
        return out

    def from_chunks(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """y [NC, N, H, C, *D] -> [B, T, H, *D] in dtype."""
        NC, N, H, C, *D = y.shape
        B, T = self.batch, self.time
        if self.chunk is None:
            out = torch.empty(B, T, H, *D, dtype=dtype, device=y.device)
            out.view(B, NC, C, H, *D).copy_(y.transpose(0, 1).transpose(2, 3))
            return out
        return y.transpose(2, 3)[self.chunk, self.seq, self.pos].to(dtype).view(B, T, H, *D)


def decay_exp_(log_decay: torch.Tensor) -> torch.Tensor:
    """exp(x) in place for log decays x <= 0, exactly 0 below LOG_DECAY_FLOOR. Arguments are clamped into
    [LOG_DECAY_FLOOR - 1, 0] first: exp's slow paths (overflow, underflow, infinities) are never taken."""
    decay = log_decay.clamp_(LOG_DECAY_FLOOR - 1, 0.0).exp_()
    return torch.nn.functional.threshold_(decay, math.exp(LOG_DECAY_FLOOR), 0.0)


def flush_tiny_(x: torch.Tensor) -> torch.Tensor:
    """Sets the entries of x of magnitude at most 2^-60 to 0, in place, so that x's products with numbers of the
    same floor stay normal. For matmul operands built from many small decays (the triangular solve's inverse):
    a matmul with subnormal products crawls. One pass (hardshrink): ten times faster than a mask and a fill."""
    return torch.hardshrink(x, 2.0 ** -60, out=x)


def decay_matrix(gcum: torch.Tensor) -> torch.Tensor:
    """gcum [..., C] (within-chunk cumulative log decay) -> [..., C, C]: exp(gcum_i - gcum_j) for j <= i, else 0
    (decay_exp_: the upper triangle is clamped to exp(0) before tril_ clears it)."""
    return decay_exp_(gcum[..., :, None] - gcum[..., None, :]).tril_()


def store_(state: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """state (the compute dtype) rounded in place to the values it takes when stored in dtype between steps (the
    state_dtype keyword): the arithmetic stays in state's dtype, only what is carried to the next step is rounded.
    Nothing to do when dtype is state's own."""
    if dtype != state.dtype:
        state.copy_(state.to(dtype))
    return state


def start_state(initial_state: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A fresh state of `shape` in dtype for a pass to update in place: a copy of initial_state (the caller's,
    never written) or zeros. Always contiguous (row-major), whatever initial_state's strides: the compiled passes
    (kernellab.mkl.chunked) read it through pointers."""
    if initial_state is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    return initial_state.reshape(shape).to(dtype, memory_format=torch.contiguous_format, copy=True)


def state_pass(keys: torch.Tensor, values: torch.Tensor, chunk_decay: torch.Tensor, reads: torch.Tensor,
               out: torch.Tensor, initial_state: torch.Tensor | None, state_dtype: torch.dtype,
               w: torch.Tensor | None = None, keep: serving.Keep | None = None) -> torch.Tensor:
    """The sequential pass over chunks: the only state-dependent work, three matmuls per chunk at most.

    keys [NC, M, C, K], values [NC, M, C, V] (M = sequences x value heads); with S_j the state at the start of
    chunk j (S_0 = initial_state [M, K, V], or 0):
      w [NC, M, C, K] (the delta rule): values_j -= w_j S_j                  (values updated in place)
      out_j = reads_j S_j                                                  (reads [NC, M, C, K], out [NC, M, C, V])
      S_{j+1} = chunk_decay_j S_j + keys_j^T values_j                      (chunk_decay [NC, M])
    S_{j+1} is stored rounded to state_dtype (store_); keep (chunk_states_every) keeps it where due. Returns the final state [M, K, V] in values' dtype. Two state buffers in turn: the
    state stays in cache, and the outputs' reads of it (out) happen here rather than from a stored state per
    chunk."""
    NC, M, C, K = keys.shape
    state = start_state(initial_state, (M, K, values.shape[-1]), values.dtype, values.device)
    spare = torch.empty_like(state)
    # unbound once: cheaper than indexing every tensor anew in each step
    deltas = w.unbind(0) if w is not None else [None] * NC
    for keys_t, value, read, out_j, decay, delta in zip(keys.transpose(-1, -2).unbind(0), values.unbind(0),
                                                         reads.unbind(0), out.unbind(0),
                                                         chunk_decay[..., None, None].unbind(0), deltas):
        if delta is not None:
            value.baddbmm_(delta, state, alpha=-1)
        torch.bmm(read, state, out=out_j)
        store_(torch.mul(state, decay, out=spare).baddbmm_(keys_t, value), state_dtype)
        state, spare = spare, state
        if keep is not None and keep.due():
            keep.add(state)
    return state


def recurrent_pass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor | None,
                   initial_state: torch.Tensor | None, state_dtype: torch.dtype,
                   keep: serving.Keep | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token, time-major. q (already scaled), k [T, N, Hk, K]; v [T, N, Hk, G, V]; g, beta [T, N, Hk, G]
    (or g [T, N, Hk, G, K], a decay per key channel: Kimi Delta Attention); initial_state None or [N, Hk * G, K, V] (never written). beta None: linear attention, S = exp(g) S + k v^T;
    else the delta rule, u = beta (v - S'^T k), S = S' + k u^T with S' = exp(g) S. After each token's output the
    state is stored rounded to state_dtype (store_). The state is kept as [N, Hk, K, G, V] (the G value heads of a key head side by side), so that q and k are
    never repeated; keep (output_intermediate_states, chunk_states_every) keeps the stored state where due.
    Returns o [T, N, Hk, G, V] and the final state [N, Hk, G, K, V] (a strided view)."""
    T, N, Hk, K = k.shape
    G, V = v.shape[-2:]
    state = torch.empty(N, Hk, K, G, V, dtype=v.dtype, device=v.device)
    if initial_state is None:
        state.zero_()
    else:
        state.copy_(initial_state.view(N, Hk, G, K, V).transpose(2, 3))
    # Both reads of the decayed state in one matmul: o = S'^T q + (q . k) u, since S = S' + k u^T.
    reads = torch.stack([k, q], dim=-2) if beta is not None else q.unsqueeze(-2)
    qk = (q * k).sum(-1)[..., None, None]
    gamma = decay_exp_(g.clone())
    # one decay per value head, g [T, N, Hk, G], or (Kimi Delta Attention) one per key channel, g [T, N, Hk, G, K]
    gamma = gamma[:, :, :, None, :, None] if gamma.ndim == 4 else gamma.transpose(-1, -2)[..., None]
    flat = state.view(N * Hk, K, G * V)
    o = torch.empty_like(v)
    for t in range(T):
        state.mul_(gamma[t])
        read = torch.matmul(reads[t], state.view(N, Hk, K, G * V)).view(N, Hk, -1, G, V)
        u = v[t] if beta is None else (v[t] - read[:, :, 0]).mul_(beta[t][..., None])
        torch.addcmul(read[:, :, -1], qk[t], u, out=o[t])
        store_(flat.baddbmm_(k[t].reshape(N * Hk, K, 1), u.reshape(N * Hk, 1, G * V)), state_dtype)
        if keep is not None and keep.due():
            keep.add(state.transpose(2, 3))
    return o, state.transpose(2, 3)


def l2norm_scale(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """The factor scale / sqrt(sum(x^2) + 1e-6) over x's last dim, [..., 1] in dtype: x times it is x
    l2-normalised and scaled."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=dtype)
    return norm.square_().add_(1e-6).rsqrt_().mul_(scale)


def chunked(q, k, v, g, initial_state, state_dtype, keep=None):
    """Chunked linear attention on chunk-major inputs: q (already scaled), k [NC, N, H, C, K]; v [NC, N, H, C, V];
    g [NC, N, H, C]; initial_state None or [N, H, K, V]; the state between chunks stored in state_dtype (and kept
    at chunk boundaries by keep, a serving.Keep, where due).
    Returns o [NC, N, H, C, V] and the final state [N * H, K, V] in v's dtype."""
    NC, N, H, C, K = k.shape
    V = v.shape[-1]
    M = N * H
    gcum = g.cumsum(-1)
    gamma = decay_exp_(gcum.clone())
    attn = torch.matmul(q, k.transpose(-1, -2)).mul_(decay_matrix(gcum))
    keys = k * decay_exp_(gcum[..., -1:] - gcum)[..., None]
    o = torch.empty(NC, M, C, V, dtype=v.dtype, device=v.device)
    state = state_pass(keys.view(NC, M, C, K), v.view(NC, M, C, V), gamma[..., -1].reshape(NC, M),
                       (q * gamma[..., None]).view(NC, M, C, K), o, initial_state, state_dtype, keep=keep)
    o.view(NC * M, C, V).baddbmm_(attn.view(NC * M, C, C), v.view(NC * M, C, V))
    return o.view(NC, N, H, C, V), state


def chunk_states_multiple(mode: str, chunk_size: int) -> int:
    """What chunk_states_every must be a multiple of on the torch and mkl backends: serving.CHUNK_MULTIPLE, and the
    chunk size in mode "chunk" (where the states are kept at chunk boundaries)."""
    return math.lcm(serving.CHUNK_MULTIPLE, chunk_size) if mode == "chunk" else serving.CHUNK_MULTIPLE


@torch.no_grad()
def linear_attention(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, mode, state_dtype,
                     chunk_size=None, state_indices=None, output_state_indices=None, output_intermediate_states=False,
                     chunk_states_every=None, A_log=None, dt_bias=None):
    """q, k [B, T, H, K]; v [B, T, H, V]; g None or [B, T, H]; initial_state None or [N, H, K, V] in state_dtype
    (a pool [P, H, K, V] with state_indices). S_t = exp(g_t) S_{t-1} + k_t v_t^T;  o_t = scale S_t^T q_t. mode:
    "chunk" or "recurrent"; chunk_size: default CHUNK_SIZE. Computes in float32 (float64 for float64 inputs); the
    state carried between chunks (or tokens) is rounded to state_dtype. The serving keywords (docs/api.md):
    fused gating in float32 first; states kept by the token loop (output_intermediate_states runs it in either
    mode: the chunked form has no state per token) or at chunk boundaries. Returns o [B, T, H, V] in v's dtype
    and the final state [N, H, K, V] in state_dtype or None, and a StateTrace with a trace."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = compute_dtype(v)
    g, _ = serving.gates(g, None, A_log, dt_bias, False, dtype,
                         by_token=output_intermediate_states and cu_seqlens is None)
    if g is None:
        g = torch.zeros(B, T, H, dtype=dtype, device=q.device)
    chunk_size = chunk_size or CHUNK_SIZE
    mode = "recurrent" if output_intermediate_states else mode

    def loop(s0, every):
        C = chunk_size if mode == "chunk" else 1
        layout = ChunkLayout.of(B, T, cu_seqlens, C, q.device)
        qc = layout.to_chunks(q, dtype).mul_(scale)
        kc, vc, gc = (layout.to_chunks(x, dtype) for x in (k, v, g))
        N = layout.num_seqs
        keep = None if every is None else serving.Keep(every // C)
        if mode == "chunk":
            o, state = chunked(qc, kc, vc, gc, s0, state_dtype, keep)
        else:
            o, state = recurrent_pass(qc[:, :, :, 0], kc[:, :, :, 0], vc[:, :, :, None, 0], gc[:, :, :, None, 0],
                                      None, s0, state_dtype, keep)
            o = o.view(-1, N, H, 1, V)
        final = state.reshape(N, H, K, V)
        kept = None if keep is None else keep.rows(serving.lengths(B, T, cu_seqlens), C, final)
        return layout.from_chunks(o, v.dtype), final, kept

    return serving.serve(loop, "torch", chunk_states_multiple(mode, chunk_size), B, T, initial_state,
                         output_final_state, cu_seqlens, state_dtype, state_indices, output_state_indices,
                         output_intermediate_states, chunk_states_every)


# ------------------------------------------------------------------------------------------------ backward
#
# The chunked backward of both linear attentions: the gated delta rule's WY form, and linear attention as its
# case without the delta term. Per chunk, with S0 and S1 the states at its start and end, gcum the within-chunk
# cumulative log decay, gamma = exp(gcum), Gamma_ij = exp(gcum_i - gcum_j) (j <= i) and Kd = k exp(gcum_C - gcum):
#   forward:  o = (gamma q) S0 + P v_new with P = (q k^T) * Gamma;   S1 = gamma_C S0 + Kd^T v_new;
#             delta rule: v_new = u - w S0, u = T (beta v), w = T (beta gamma k), T = (I + L)^-1,
#             L = strictly_lower(beta_i (k_i . k_j) Gamma_ij);  linear attention: v_new = v.
#   backward: a pass over chunks in reverse carries the state's gradient from S1 back to S0:
#             dv_new = P^T do + Kd dS1,   dS0 = gamma_C dS1 + (gamma q)^T do - w^T dv_new;
#             then the rest, all chunks at once: dq = gamma (do S0^T) + (dP * Gamma) k with dP = do v_new^T,
#             dk = (dP * Gamma)^T q + (v_new dS1^T) exp(gcum_C - gcum) + ...; the triangular solve's backward,
#             with du = dv_new and dw = -dv_new S0^T: d(beta v) = T^T du, d(beta gamma k) = T^T dw,
#             dL = -strictly_lower(d(beta v) u^T + d(beta gamma k) w^T) (dA = -T^T dT T^T, and T d = u, w);
#             and dg_t gathers the gradients of every decay that holds g_t: gamma_i for i >= t, gamma_C,
#             exp(gcum_C - gcum_i) for i < t, and exp(gcum_i - gcum_j) for the pairs j < t <= i. The pairs are
#             summed as such (a reverse cumulative sum over i, then over j < t), not as row sums minus column
#             sums of a gradient with respect to gcum: those cancel in float32 (the per-head A_log and dt_bias
#             gradients of a model, sums of dg over every token, came out 1e-4 off instead of 1e-6).
# Gradients run in float32 (float64 for float64 inputs), decays and the inverse flushed as in the forward.

def _intra_chunk(q, k, v, g, beta):
    """The state-independent terms of chunk-major inputs: q (scaled), k [NC, N, Hk, C, K]; v [NC, N, Hk, G, C, V];
    g and beta (None: linear attention) [NC, N, Hk, G, C]. Returns a dict of gcum, gamma, tail (exp(gcum_C -
    gcum)) [.., G, C]; decay (Gamma), attn (P) [.., G, C, C]; keys (Kd), q_decayed [.., G, C, K]; u [.., G, C, V]
    (v itself for linear attention); and for the delta rule kk [NC, N, Hk, C, C], lower (L) and inverse (T)
    [.., G, C, C], w [.., G, C, K]."""
    gcum = g.cumsum(-1)
    gamma = decay_exp_(gcum.clone())
    decay = decay_matrix(gcum)
    tail = decay_exp_(gcum[..., -1:] - gcum)
    kt = k.transpose(-1, -2)
    terms = dict(gcum=gcum, gamma=gamma, decay=decay, tail=tail, attn=torch.matmul(q, kt).unsqueeze(3) * decay,
                 keys=k.unsqueeze(3) * tail[..., None], q_decayed=q.unsqueeze(3) * gamma[..., None], u=v)
    if beta is not None:
        kk = torch.matmul(k, kt)
        lower = (kk.unsqueeze(3) * decay).mul_(beta[..., None]).tril_(-1)
        eye = torch.eye(lower.shape[-1], dtype=lower.dtype, device=lower.device).expand_as(lower)
        inverse = flush_tiny_(torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True))
        terms |= dict(kk=kk, lower=lower, inverse=inverse, u=torch.matmul(inverse, v * beta[..., None]),
                      w=torch.matmul(inverse, k.unsqueeze(3) * (beta * gamma)[..., None]))
    return terms


def _state_sweep(terms, initial_state):
    """The pass over chunks, keeping what the backward reads. initial_state None or [M, K, V] (M = N Hk G).
    Returns the states [NC + 1, M, K, V] (states[j] at chunk j's start, states[NC] after the last) and v_new
    [NC, M, C, V] (u - w S0; v itself for linear attention)."""
    keys, u, w = terms["keys"], terms["u"], terms.get("w")
    NC, C, K, V = keys.shape[0], keys.shape[-2], keys.shape[-1], u.shape[-1]
    M = keys[0, ..., 0, 0].numel()
    keys_t = keys.reshape(NC, M, C, K).transpose(-1, -2)
    v_new = u.reshape(NC, M, C, V) if w is None else u.reshape(NC, M, C, V).clone()
    w = None if w is None else w.reshape(NC, M, C, K)
    decay = terms["gamma"][..., -1].reshape(NC, M, 1, 1)
    states = torch.empty(NC + 1, M, K, V, dtype=u.dtype, device=u.device)
    states[0] = 0 if initial_state is None else initial_state
    for j in range(NC):
        if w is not None:
            v_new[j].baddbmm_(w[j], states[j], alpha=-1)
        torch.mul(states[j], decay[j], out=states[j + 1]).baddbmm_(keys_t[j], v_new[j])
    return states, v_new


def _reverse_sweep(terms, v_new, do, d_final):
    """The pass over chunks in reverse. do [NC, N, Hk, G, C, V]; d_final None or [M, K, V], the gradient of the
    state after the last chunk. Returns dv_new [NC, M, C, V] and d_states [NC + 1, M, K, V]: d_states[j + 1] the
    gradient of chunk j's end state, d_states[0] that of the initial state."""
    keys, q_decayed, w = terms["keys"], terms["q_decayed"], terms.get("w")
    NC, C, K, V = keys.shape[0], keys.shape[-2], keys.shape[-1], do.shape[-1]
    M = keys[0, ..., 0, 0].numel()
    d_new = torch.matmul(terms["attn"].transpose(-1, -2), do).view(NC, M, C, V)
    keys, q_decayed_t = keys.reshape(NC, M, C, K), q_decayed.reshape(NC, M, C, K).transpose(-1, -2)
    w_t = None if w is None else w.reshape(NC, M, C, K).transpose(-1, -2)
    do = do.reshape(NC, M, C, V)
    decay = terms["gamma"][..., -1].reshape(NC, M, 1, 1)
    d_states = torch.empty(NC + 1, M, K, V, dtype=do.dtype, device=do.device)
    d_states[NC] = 0 if d_final is None else d_final
    for j in reversed(range(NC)):
        d_new[j].baddbmm_(keys[j], d_states[j + 1])
        step = torch.mul(d_states[j + 1], decay[j], out=d_states[j]).baddbmm_(q_decayed_t[j], do[j])
        if w_t is not None:
            step.baddbmm_(w_t[j], d_new[j], alpha=-1)
    return d_new, d_states


def _chunk_grads(q, k, v, beta, terms, states, v_new, d_new, d_states, do):
    """Every gradient but the states', all chunks at once (shapes as _intra_chunk's inputs; states, d_states from
    the sweeps). Returns dq, dk [NC, N, Hk, C, K] (summed over the G value heads of a key head), dv
    [NC, N, Hk, G, C, V], dg and dbeta (None for linear attention) [NC, N, Hk, G, C]."""
    NC, N, Hk, C, K = k.shape
    G, V = v.shape[3], v.shape[-1]
    shape = (NC, N, Hk, G)
    S0, dS1 = states[:NC].view(*shape, K, V), d_states[1:].view(*shape, K, V)
    v_new, d_new = v_new.view(*shape, C, V), d_new.view(*shape, C, V)
    gamma, decay = terms["gamma"], terms["decay"]
    # o's read of the state: (gamma q) S0
    d_q_decayed = torch.matmul(do, S0.transpose(-1, -2))
    suffix = (d_q_decayed * terms["q_decayed"]).sum(-1)  # gamma_i's: g_t for t <= i
    dq = (d_q_decayed * gamma[..., None]).sum(3)
    # o's intra-chunk term: P v_new, P = (q k^T) * Gamma (dP's upper triangle meets Gamma's zeros)
    dP = torch.matmul(do, v_new.transpose(-1, -2))
    pairs = dP * terms["attn"]  # Gamma_ij's: g_t for j < t <= i
    dqk = (dP.mul_(decay)).sum(3)
    dq += torch.matmul(dqk, k)
    dk = torch.matmul(dqk.transpose(-1, -2), q)
    # the state update S1 = gamma_C S0 + Kd^T v_new
    d_keys = torch.matmul(v_new, dS1.transpose(-1, -2))
    prefix = (d_keys * terms["keys"]).sum(-1)  # exp(gcum_C - gcum_i)'s: g_t for i < t
    whole = gamma[..., -1] * (dS1 * S0).sum((-1, -2))  # gamma_C's: every g_t
    dk += (d_keys * terms["tail"][..., None]).sum(3)
    if beta is None:
        return dq, dk, d_new, _decay_gradient(suffix, prefix, pairs, whole), None
    # the delta rule: v_new = u - w S0, u = T (beta v), w = T (beta gamma k), T = (I + L)^-1
    inverse_t = terms["inverse"].transpose(-1, -2)
    d_bv = torch.matmul(inverse_t, d_new)
    d_bk = torch.matmul(inverse_t, torch.matmul(d_new, S0.transpose(-1, -2)).neg_())
    dL = (torch.matmul(d_bv, terms["u"].transpose(-1, -2)) + torch.matmul(d_bk, terms["w"].transpose(-1, -2)))
    dL.neg_().tril_(-1).mul_(decay)  # dL * Gamma: L = beta_i kk_ij Gamma_ij
    R = dL * terms["kk"].unsqueeze(3)  # dL * kk * Gamma
    dbeta = R.sum(-1)
    pairs += R.mul_(beta[..., None])  # dL * L: L's Gamma_ij
    dkk = dL.mul_(beta[..., None]).sum(3)
    dk += torch.matmul(dkk + dkk.transpose(-1, -2), k)
    bk_dot = (d_bk * k.unsqueeze(3)).sum(-1)  # d(beta gamma k) . k per position
    dbeta += (d_bv * v).sum(-1) + gamma * bk_dot
    suffix += beta * gamma * bk_dot
    dk += (d_bk * (beta * gamma)[..., None]).sum(3)
    return dq, dk, d_bv.mul_(beta[..., None]), _decay_gradient(suffix, prefix, pairs, whole), dbeta


def _decay_gradient(suffix, prefix, pairs, whole):
    """dg [..., C] from the gradients of the decays, each x dx of a decay exp(...) holding g_t: suffix [..., C]
    (of exp(gcum_i): g_t for t <= i), prefix [..., C] (of exp(gcum_C - gcum_i): g_t for t > i), pairs
    [..., C, C] (of exp(gcum_i - gcum_j), i > j: g_t for j < t <= i; the diagonal holds none), whole [...] (of
    exp(gcum_C): every g_t)."""
    dg = suffix.flip(-1).cumsum(-1).flip(-1)
    dg[..., 1:] += prefix[..., :-1].cumsum(-1)
    below = pairs.flip(-2).cumsum(-2).flip(-2)  # [t, j] = sum over i >= t of pairs[i, j]
    return dg.add_(below.tril_(-1).sum(-1)).add_(whole[..., None])


def chunked_backward(q, k, v, g, beta, initial_state, do, d_final):
    """Gradients of the chunked gated delta rule (linear attention for beta None) on chunk-major inputs: q (already
    scaled), k [NC, N, Hk, C, K]; v, do [NC, N, Hk, G, C, V]; g, beta [NC, N, Hk, G, C]; initial_state and d_final
    (the final state's gradient) None or [M, K, V] with M = N Hk G.
    Groups of CHUNK_GROUP chunks, as the forward's: a forward pass over the groups keeps the state at each
    group's start, then the groups in reverse recompute their intermediates and states (the last group's are
    kept from the forward pass), so that memory holds one group's. Returns dq, dk [NC, N, Hk, C, K], dv
    [NC, N, Hk, G, C, V], dg and dbeta (None for linear attention) [NC, N, Hk, G, C] and the initial state's
    gradient [M, K, V]."""
    NC = k.shape[0]
    groups = [slice(start, start + CHUNK_GROUP) for start in range(0, NC, CHUNK_GROUP)]

    def recompute(group, start_state):
        terms = _intra_chunk(q[group], k[group], v[group], g[group], None if beta is None else beta[group])
        return (terms, *_state_sweep(terms, start_state))

    starts, last = [initial_state], None
    for i, group in enumerate(groups):
        last = recompute(group, starts[-1])
        if i + 1 < len(groups):
            starts.append(last[1][-1])
    dq, dk, dv, dg = (torch.empty_like(x) for x in (q, k, v, g))
    dbeta = None if beta is None else torch.empty_like(beta)
    d_state = d_final
    for i in reversed(range(len(groups))):
        group = groups[i]
        terms, states, v_new = last if i + 1 == len(groups) else recompute(group, starts[i])
        d_new, d_states = _reverse_sweep(terms, v_new, do[group], d_state)
        grads = _chunk_grads(q[group], k[group], v[group], None if beta is None else beta[group], terms, states,
                             v_new, d_new, d_states, do[group])
        for out, grad in zip((dq, dk, dv, dg, dbeta), grads):
            if out is not None:
                out[group] = grad
        d_state = d_states[0]
    return dq, dk, dv, dg, dbeta, d_state


def l2norm_backward(x: torch.Tensor, d_normed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gradient of x [..., D] through x / sqrt(sum(x^2) + 1e-6), given the normalised x's gradient d_normed:
    r (d - x_hat (x_hat . d)) with r = 1 / sqrt(sum(x^2) + 1e-6), in dtype."""
    r = l2norm_scale(x, dtype)
    x_hat = x.to(dtype) * r
    return (d_normed - x_hat * (x_hat * d_normed).sum(-1, keepdim=True)).mul_(r)


@torch.no_grad()
def linear_attention_backward(grads, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, mode,
                              state_dtype, chunk_size=None):
    """The gradients of linear_attention (kernellab.autograd's contract): grads {"o": [B, T, H, V] or None,
    "final_state": [N, H, K, V] or None}; the inputs as the forward's. Chunked whatever the forward's mode (the
    same function), chunks of chunk_size (default CHUNK_SIZE); the state float32 whatever state_dtype (as
    gated_delta_rule_backward). Returns {q, k, v: their shapes, g: [B, T, H]
    (None when g is None), initial_state: [N, H, K, V] (None when it is None)} in float32 (float64 for float64
    inputs)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = compute_dtype(v)
    layout = ChunkLayout.of(B, T, cu_seqlens, chunk_size or CHUNK_SIZE, q.device)
    NC, N, C = layout.num_chunks, layout.num_seqs, layout.size
    qc = layout.to_chunks(q, dtype).mul_(scale)
    kc = layout.to_chunks(k, dtype)
    vc = layout.to_chunks(v, dtype).view(NC, N, H, 1, C, V)
    gc = (layout.to_chunks(g, dtype) if g is not None else torch.zeros(NC, N, H, C, dtype=dtype, device=q.device))
    do = grads["o"]
    doc = (layout.to_chunks(do, dtype) if do is not None else torch.zeros_like(vc)).view(NC, N, H, 1, C, V)
    d_final = grads["final_state"]
    s0 = None if initial_state is None else initial_state.reshape(N * H, K, V).to(dtype)
    dq, dk, dv, dg, _, d_s0 = chunked_backward(qc, kc, vc, gc.view(NC, N, H, 1, C), None, s0, doc,
                                               None if d_final is None else d_final.reshape(N * H, K, V).to(dtype))
    return dict(q=layout.from_chunks(dq.mul_(scale), dtype), k=layout.from_chunks(dk, dtype),
                v=layout.from_chunks(dv.view(NC, N, H, C, V), dtype),
                g=None if g is None else layout.from_chunks(dg.view(NC, N, H, C), dtype),
                initial_state=None if initial_state is None else d_s0.view(N, H, K, V))
