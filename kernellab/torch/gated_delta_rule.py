"""The gated delta rule in vectorised PyTorch (CPU and GPU): chunked (WY / UT form) and token by token.

Chunk form, per value head and chunk, with gcum the within-chunk cumulative log decay, gamma = exp(gcum) and the
state S0 at the chunk's start (see fla's chunk_gated_delta_rule and the DeltaNet papers):
  A = I + strictly_lower(beta_i (k_i . k_j) exp(gcum_i - gcum_j))            unit lower triangular
  u = A^-1 (beta v),  w = A^-1 (beta gamma k)                                 the WY representation
  v_new = u - w S0                                                             the delta-rule correction
  o = (gamma q) S0 + (q k^T * exp(gcum_i - gcum_j), j <= i) v_new
  S1 = exp(gcum_C) S0 + (k exp(gcum_C - gcum))^T v_new
Everything but v_new, o's first term and S1 is computed for all chunks at once; k k^T and q k^T once per key
head (value head h reads key head h // (Hv // Hk)), never on repeated keys. The sequential pass over chunks does
three matmuls per chunk, v_new, the output's read of the state (o's first term) and the state write, with the
state in two buffers in turn (in cache).
All of this runs on groups of CHUNK_GROUP chunks in turn, so that a group's intermediates stay in cache.
"""
import torch

from kernellab import serving
from kernellab.torch.linear_attention import (CHUNK_GROUP, CHUNK_SIZE, ChunkLayout, chunk_states_multiple,
                                            chunked_backward, compute_dtype, decay_exp_, decay_matrix, flush_tiny_,
                                            l2norm_backward, l2norm_scale, recurrent_pass, start_state, state_pass)

# On CPU the intra-chunk work (C^2 per token and head: decay matrices, triangular solve, k k^T) costs more than a
# twice longer sequential pass: chunks of 32 measured 20% faster than 64 at T = 8192, K = V = 128 (linear
# attention, without the solve, is faster at 64).
CPU_CHUNK_SIZE = 32


def wy_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
               initial_state: torch.Tensor | None, state_dtype: torch.dtype,
               keep: serving.Keep | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk-major inputs: q (already scaled), k [NC, N, Hk, C, K]; v [NC, N, Hk, G, C, V] (overwritten: it holds
    the output); g, beta [NC, N, Hk, G, C]; initial_state None or [N, Hk * G, K, V]; the state between chunks stored
    in state_dtype (and kept at chunk boundaries by keep where due). Returns o [NC, N, Hk, G, C, V] and the final
    state [N * Hk * G, K, V] in v's dtype."""
    NC, N, Hk, C, K = k.shape
    G, V = v.shape[3], v.shape[-1]
    M = N * Hk * G
    gcum = g.cumsum(-1)
    gamma = decay_exp_(gcum.clone())
    decay = decay_matrix(gcum)  # [NC, N, Hk, G, C, C]
    kt = k.transpose(-1, -2)
    attn = torch.matmul(q, kt).unsqueeze(3).mul(decay)
    # Only the strict lower triangle of A - I is read (unitriangular): no mask needed on the diagonal.
    lower = decay.mul_(torch.matmul(k, kt).unsqueeze(3)).mul_(beta[..., None])
    # A^-1 once, then u and w by matmuls: a batched triangular solve with C right-hand sides is much faster on
    # CPU than one with V + K. beta (and gamma) scale A^-1's columns rather than v and k (C^2 < C V elements),
    # and w = (A^-1 diag(beta gamma)) k takes the G value heads of a key head as one [G C, C] @ [C, K] matmul.
    eye = torch.eye(C, dtype=k.dtype, device=k.device).expand_as(lower)
    inverse = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
    # (the solve returns column-major matrices: write the scaled copy row-major, so G rows of blocks stack;
    # buffers whose contents are spent are reused: fresh ones cost page faults on CPU)
    scaled = flush_tiny_(torch.mul(inverse, (beta * gamma)[..., None, :], out=lower))
    w = torch.matmul(scaled.view(NC, N, Hk, G * C, C), k).view(NC, M, C, K)
    u = torch.matmul(flush_tiny_(inverse.mul_(beta[..., None, :])), v).view(NC, M, C, V)
    keys = (k.unsqueeze(3) * decay_exp_(gcum[..., -1:] - gcum)[..., None]).view(NC, M, C, K)
    q_decayed = (q.unsqueeze(3) * gamma[..., None]).view(NC, M, C, K)
    o = v.view(NC, M, C, V)  # v is spent (u holds it): the output takes its place
    state = state_pass(keys, u, gamma[..., -1].reshape(NC, M), q_decayed, o, initial_state, state_dtype,
                       w=w, keep=keep)  # u: v_new
    o.view(NC * M, C, V).baddbmm_(attn.view(NC * M, C, C), u.view(NC * M, C, V))
    return o.view(NC, N, Hk, G, C, V), state


def decode_step(q, k, v, g, beta, scale, initial_state, use_qk_l2norm, dtype, own=False):
    """The recurrence's step for one token per sequence (decode: T = 1, no packing) on [B Hv, K, V] states, in a
    dozen batched ops: the token loop's layout changes cost more than the step itself. q, k [B, 1, Hk, K];
    v [B, 1, Hv, V]; g, beta [B, 1, Hv]; initial_state None or [B, Hv, K, V] (never written, unless own: the
    call's own rows, read from a pool, updated in place when contiguous and in dtype: one copy of the states less).
    With S' = exp(g) S: u = beta (v - S'^T k), S = S' + k u^T, o = S^T q = S'^T q + (q . k) u.
    Returns o [B, 1, Hv, V] in v's dtype and the state [B, Hv, K, V] in dtype (unrounded: the caller stores it)."""
    B, _, Hk, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    kq = torch.stack([k[:, 0], q[:, 0]], dim=2).to(dtype)  # [B, Hk, 2, K]
    if use_qk_l2norm:
        kq.mul_(l2norm_scale(kq, dtype))
    kq[:, :, 1].mul_(scale)
    kq = kq.repeat_interleave(Hv // Hk, dim=1).view(B * Hv, 2, K)  # value head h reads key head h // (Hv // Hk)
    if own and initial_state is not None and initial_state.dtype == dtype and initial_state.is_contiguous():
        state = initial_state.view(B * Hv, K, V)
    else:
        state = start_state(initial_state, (B * Hv, K, V), dtype, v.device)
    state.mul_(decay_exp_(g.reshape(B * Hv, 1, 1).to(dtype, copy=True)))
    read = torch.bmm(kq, state)  # [B Hv, 2, V]: S'^T k and S'^T q
    u = torch.sub(v.reshape(B * Hv, V), read[:, 0]).mul_(beta.reshape(B * Hv, 1))
    state.baddbmm_(kq[:, :1].transpose(1, 2), u[:, None])
    o = read[:, 1].addcmul_(kq.prod(dim=1).sum(-1, keepdim=True), u)
    return o.view(B, 1, Hv, V).to(v.dtype), state.view(B, Hv, K, V)


def _chunk_inputs(q, k, v, g, beta, scale, use_qk_l2norm, cu_seqlens, chunk_size, dtype):
    """The inputs in the chunk-major layout of chunk_size, in dtype: returns the ChunkLayout, q (scaled) and k
    [NC, N, Hk, C, K] (l2-normalised in the same pass as the copy, when use_qk_l2norm), v [NC, N, Hk, G, C, V],
    g and beta [NC, N, Hk, G, C] (g [B, T, Hv, K]: [NC, N, Hk, G, C, K])."""
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    layout = ChunkLayout.of(B, T, cu_seqlens, chunk_size, q.device)
    NC, N, C = layout.num_chunks, layout.num_seqs, layout.size
    if use_qk_l2norm:
        qc = layout.to_chunks(q, dtype, l2norm_scale(q, dtype, scale))
        kc = layout.to_chunks(k, dtype, l2norm_scale(k, dtype))
    else:
        qc, kc = layout.to_chunks(q, dtype).mul_(scale), layout.to_chunks(k, dtype)
    vc = layout.to_chunks(v, dtype).view(NC, N, Hk, Hv // Hk, C, V)
    # (g [B, T, Hv, K] of Kimi Delta Attention keeps its key channels last: [NC, N, Hk, G, C, K])
    gc, bc = (layout.to_chunks(x, dtype).view(NC, N, Hk, Hv // Hk, C, *x.shape[3:]) for x in (g, beta))
    return layout, qc, kc, vc, gc, bc


@torch.no_grad()
def gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens, mode,
                     state_dtype, chunk_size=None, state_indices=None, output_state_indices=None,
                     output_intermediate_states=False, chunk_states_every=None, A_log=None, dt_bias=None,
                     beta_logits=False):
    """q, k [B, T, Hk, K]; v [B, T, Hv, V]; g, beta [B, T, Hv]; initial_state None or [N, Hv, K, V] in
    state_dtype (a pool [P, Hv, K, V] with state_indices). Value head h reads key head h // (Hv // Hk). mode
    "chunk" (chunks of chunk_size: default 32 on CPU, 64 on GPUs) or "recurrent".
    Returns o [B, T, Hv, V] in v's dtype and the final state [N, Hv, K, V] in state_dtype or None, and a StateTrace
    with a trace. Computes in float32 (float64 for float64 inputs); the state carried between chunks (or tokens)
    is rounded to state_dtype. The serving keywords (docs/api.md): fused gating in float32 first; the pool's rows
    read and written in place (kernellab.serving.Pool); states kept by the token loop or at chunk boundaries.
    output_intermediate_states runs the token loop in either mode (the chunked form has no state per token), and
    on a batch without cu_seqlens as decode steps one token after another, so that a verify of T draft tokens is
    bitwise T decode calls (outputs and states)."""
    T, K = q.shape[1], q.shape[3]
    B, Hv, V = v.shape[0], v.shape[2], v.shape[3]
    dtype = compute_dtype(v)
    # (a verify on a batch gates token by token, as its decode steps do)
    g, beta = serving.gates(g, beta, A_log, dt_bias, beta_logits, dtype,
                            by_token=output_intermediate_states and cu_seqlens is None)
    chunk_size = chunk_size or (CPU_CHUNK_SIZE if q.device.type == "cpu" else CHUNK_SIZE)
    mode = "recurrent" if output_intermediate_states else mode
    sizes = serving.lengths(B, T, cu_seqlens)

    def loop(s0, every):
        keep = None if every is None else serving.Keep(every if mode == "recurrent" else every // chunk_size)
        if mode == "recurrent" and cu_seqlens is None and (T == 1 or output_intermediate_states):
            # decode steps; between two, the state is stored in state_dtype as a decode call's pool row
            # (a pool's rows, read for this call (kernellab.serving.Pool.read), are updated in place)
            outputs, state = [], s0
            for t in range(T):
                o, state = decode_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g[:, t:t + 1], beta[:, t:t + 1],
                                       scale, state, use_qk_l2norm, dtype, own=state_indices is not None)
                outputs.append(o)
                if T > 1:
                    state = state.to(state_dtype)
                if keep is not None and keep.due():
                    keep.add(state)
            o = outputs[0] if T == 1 else torch.cat(outputs, dim=1)
            return o, state, None if keep is None else keep.rows(sizes, 1, state)
        layout, qc, kc, vc, gc, bc = _chunk_inputs(q, k, v, g, beta, scale, use_qk_l2norm, cu_seqlens,
                                                   chunk_size if mode == "chunk" else 1, dtype)
        NC, N, C = layout.num_chunks, layout.num_seqs, layout.size
        if mode == "chunk":
            # Groups of chunks one after the other, each from the last one's final state: the intermediates of a
            # group (a few MB) stay in cache instead of streaming through memory. The output overwrites vc.
            state = s0
            for start in range(0, NC, CHUNK_GROUP):
                group = slice(start, start + CHUNK_GROUP)
                o, state = wy_chunked(qc[group], kc[group], vc[group], gc[group], bc[group], state, state_dtype, keep)
            o = vc
        else:
            o, state = recurrent_pass(qc[..., 0, :], kc[..., 0, :], vc[..., 0, :], gc[..., 0], bc[..., 0], s0,
                                      state_dtype, keep)
        state = state.reshape(N, Hv, K, V)  # (the pass's own buffer)
        kept = None if keep is None else keep.rows(sizes, C, state)
        return layout.from_chunks(o.reshape(NC, N, Hv, C, V), v.dtype), state, kept

    return serving.serve(loop, "torch", chunk_states_multiple(mode, chunk_size), B, T, initial_state,
                         output_final_state, cu_seqlens, state_dtype, state_indices, output_state_indices,
                         output_intermediate_states, chunk_states_every)


@torch.no_grad()
def gated_delta_rule_backward(grads, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm,
                              cu_seqlens, mode, state_dtype, chunk_size=None):
    """The gradients of gated_delta_rule (kernellab.autograd's contract): grads {"o": [B, T, Hv, V] or None,
    "final_state": [N, Hv, K, V] or None}; the inputs as the forward's. The chunked backward of the WY form
    (kernellab.torch.linear_attention.chunked_backward) whatever the forward's mode (the same function), chunks of
    chunk_size (default as the forward's). The state is float32 in the backward whatever state_dtype: the
    rounding of a stored state passes its gradient straight through (as autograd through the reference's
    `.to(state_dtype)` does). q's and k's gradients are summed over the value heads that read them,
    and taken back through the l2 normalisation when use_qk_l2norm. Returns {q, k [B, T, Hk, K], v [B, T, Hv, V],
    g, beta [B, T, Hv], initial_state [N, Hv, K, V] (None when it is None)} in float32 (float64 for float64
    inputs)."""
    Hk, K = q.shape[2:]
    Hv, V = v.shape[2], v.shape[3]
    G = Hv // Hk
    dtype = compute_dtype(v)
    chunk_size = chunk_size or (CPU_CHUNK_SIZE if q.device.type == "cpu" else CHUNK_SIZE)
    layout, qc, kc, vc, gc, bc = _chunk_inputs(q, k, v, g, beta, scale, use_qk_l2norm, cu_seqlens, chunk_size, dtype)
    NC, N, C = layout.num_chunks, layout.num_seqs, layout.size
    do, d_final = grads["o"], grads["final_state"]
    doc = layout.to_chunks(do, dtype).view(NC, N, Hk, G, C, V) if do is not None else torch.zeros_like(vc)
    M = N * Hv
    s0 = None if initial_state is None else initial_state.reshape(M, K, V).to(dtype)
    dq, dk, dv, dg, dbeta, d_s0 = chunked_backward(
        qc, kc, vc, gc, bc, s0, doc, None if d_final is None else d_final.reshape(M, K, V).to(dtype))
    dq, dk = layout.from_chunks(dq.mul_(scale), dtype), layout.from_chunks(dk, dtype)
    if use_qk_l2norm:
        dq, dk = l2norm_backward(q, dq, dtype), l2norm_backward(k, dk, dtype)
    return dict(q=dq, k=dk, v=layout.from_chunks(dv.view(NC, N, Hv, C, V), dtype),
                g=layout.from_chunks(dg.view(NC, N, Hv, C), dtype),
                beta=layout.from_chunks(dbeta.view(NC, N, Hv, C), dtype),
                initial_state=None if initial_state is None else d_s0.view(N, Hv, K, V))
