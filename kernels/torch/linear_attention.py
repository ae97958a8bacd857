"""Scalar-gated linear attention in vectorised PyTorch (CPU and GPU), and the chunk machinery it shares with
the gated delta rule (kernels/torch/gated_delta_rule.py).

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


CHUNK_SIZE = 64
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
    never written) or zeros."""
    if initial_state is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    return initial_state.reshape(shape).to(dtype, copy=True)


def state_pass(keys: torch.Tensor, values: torch.Tensor, chunk_decay: torch.Tensor, reads: torch.Tensor,
               out: torch.Tensor, initial_state: torch.Tensor | None, state_dtype: torch.dtype,
               w: torch.Tensor | None = None) -> torch.Tensor:
    """The sequential pass over chunks: the only state-dependent work, three matmuls per chunk at most.

    keys [NC, M, C, K], values [NC, M, C, V] (M = sequences x value heads); with S_j the state at the start of
    chunk j (S_0 = initial_state [M, K, V], or 0):
      w [NC, M, C, K] (the delta rule): values_j -= w_j S_j                  (values updated in place)
      out_j = reads_j S_j                                                  (reads [NC, M, C, K], out [NC, M, C, V])
      S_{j+1} = chunk_decay_j S_j + keys_j^T values_j                      (chunk_decay [NC, M])
    S_{j+1} is stored rounded to state_dtype (store_). Returns the final state [M, K, V] in values' dtype. Two state buffers in turn: the state stays in cache, and the outputs' reads
    of it (out) happen here rather than from a stored state per chunk."""
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
    return state


def recurrent_pass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor | None,
                   initial_state: torch.Tensor | None, state_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token, time-major. q (already scaled), k [T, N, Hk, K]; v [T, N, Hk, G, V]; g, beta [T, N, Hk, G];
    initial_state None or [N, Hk * G, K, V] (never written). beta None: linear attention, S = exp(g) S + k v^T;
    else the delta rule, u = beta (v - S'^T k), S = S' + k u^T with S' = exp(g) S. After each token's output the
    state is stored rounded to state_dtype (store_). The state is kept as [N, Hk, K, G, V] (the G value heads of a key head side by side), so that q and k are
    never repeated. Returns o [T, N, Hk, G, V] and the final state [N, Hk, G, K, V] (a strided view)."""
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
    gamma = decay_exp_(g.clone())[:, :, :, None, :, None]
    flat = state.view(N * Hk, K, G * V)
    o = torch.empty_like(v)
    for t in range(T):
        state.mul_(gamma[t])
        read = torch.matmul(reads[t], state.view(N, Hk, K, G * V)).view(N, Hk, -1, G, V)
        u = v[t] if beta is None else (v[t] - read[:, :, 0]).mul_(beta[t][..., None])
        torch.addcmul(read[:, :, -1], qk[t], u, out=o[t])
        store_(flat.baddbmm_(k[t].reshape(N * Hk, K, 1), u.reshape(N * Hk, 1, G * V)), state_dtype)
    return o, state.transpose(2, 3)


def l2norm_scale(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """The factor scale / sqrt(sum(x^2) + 1e-6) over x's last dim, [..., 1] in dtype: x times it is x
    l2-normalised and scaled."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=dtype)
    return norm.square_().add_(1e-6).rsqrt_().mul_(scale)


def chunked(q, k, v, g, initial_state, state_dtype):
    """Chunked linear attention on chunk-major inputs: q (already scaled), k [NC, N, H, C, K]; v [NC, N, H, C, V];
    g [NC, N, H, C]; initial_state None or [N, H, K, V]; the state between chunks stored in state_dtype.
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
                       (q * gamma[..., None]).view(NC, M, C, K), o, initial_state, state_dtype)
    o.view(NC * M, C, V).baddbmm_(attn.view(NC * M, C, C), v.view(NC * M, C, V))
    return o.view(NC, N, H, C, V), state


@torch.no_grad()
def linear_attention(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, mode, state_dtype,
                     chunk_size=None):
    """q, k [B, T, H, K]; v [B, T, H, V]; g None or [B, T, H]; initial_state None or [N, H, K, V] in state_dtype.
    S_t = exp(g_t) S_{t-1} + k_t v_t^T;  o_t = scale S_t^T q_t. mode: "chunk" or "recurrent"; chunk_size: default
    CHUNK_SIZE. Computes in float32 (float64 for float64 inputs); the state carried between chunks (or tokens) is
    rounded to state_dtype. Returns o [B, T, H, V] in v's dtype and the final state [N, H, K, V] in state_dtype
    or None."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = compute_dtype(v)
    if g is None:
        g = torch.zeros(B, T, H, dtype=dtype, device=q.device)
    C = (chunk_size or CHUNK_SIZE) if mode == "chunk" else 1
    layout = ChunkLayout.of(B, T, cu_seqlens, C, q.device)
    qc = layout.to_chunks(q, dtype).mul_(scale)
    kc, vc, gc = (layout.to_chunks(x, dtype) for x in (k, v, g))
    N = layout.num_seqs
    if mode == "chunk":
        o, state = chunked(qc, kc, vc, gc, initial_state, state_dtype)
    else:
        o, state = recurrent_pass(qc[:, :, :, 0], kc[:, :, :, 0], vc[:, :, :, None, 0], gc[:, :, :, None, 0],
                                  None, initial_state, state_dtype)
        o = o.view(-1, N, H, 1, V)
    final = state.reshape(N, H, K, V).to(state_dtype, copy=True) if output_final_state else None
    return layout.from_chunks(o, v.dtype), final
