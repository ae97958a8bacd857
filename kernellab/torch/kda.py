"""Kimi Delta Attention in vectorised PyTorch (CPU and GPU): chunked and token by token.

Chunk form, per value head and chunk, with gcum [C, K] the within-chunk cumulative log decay of every key channel
and S0 the state at the chunk's start (fla's chunk_kda; the gated delta rule's WY form with Diag(exp(gcum))):
  D_ij = exp(gcum_i - gcum_j) per channel for j <= i, else 0                          [C, C, K]
  A = I + strictly_lower(beta_i sum_d k_id k_jd D_ijd)                                unit lower triangular
  u = A^-1 (beta v),  w = A^-1 (beta exp(gcum) * k)
  v_new = u - w S0
  o = (exp(gcum) * q) S0 + (sum_d q_id k_jd D_ijd, j <= i) v_new
  S1 = Diag(exp(gcum_C)) S0 + (exp(gcum_C - gcum) * k)^T v_new
The decays stay inside the pair products (D, every factor <= 1) rather than folded into q and k as exp(+-gcum),
which overflows at strong decays (exp(-gcum) past float32's range after a few strong steps). D costs C K per
token and value head, so chunks run in groups (of CHUNK_GROUP, as the gated delta rule's) whose D stays under
GROUP_ELEMENTS (within the last-level cache).

Everything is written out of place: the backward is torch's autograd through this same chunk function,
recomputed group by group (from the states the forward pass leaves at group boundaries), so that its memory is
one group's graph, not the sequence's.
"""
import math

import torch

from kernellab import serving
from kernellab.torch.gated_delta_rule import CPU_CHUNK_SIZE, _chunk_inputs
from kernellab.torch.linear_attention import (CHUNK_GROUP, CHUNK_SIZE, LOG_DECAY_FLOOR, chunk_states_multiple,
                                            compute_dtype, l2norm_backward, recurrent_pass)

# Elements of D ([chunks, sequences x value heads, C, C, K]) computed at once: 2^21 float32 = 8 MB, so that D and
# the temporaries of its elementwise passes and einsums stay in a 32 MB L3. At 2^24 (a group of 16 chunks from T = 512
# at Hv = 4, K = 128) every pass streamed from memory: 186 ms at T = 512 against 52 at 256 (1 thread, CPU time);
# at 2^21, 63 and 37.
GROUP_ELEMENTS = 2 ** 21


def _decay(log_decay: torch.Tensor) -> torch.Tensor:
    """exp(x) for log decays x <= 0 (the caller masks any other), exactly 0 below LOG_DECAY_FLOOR, out of place
    (autograd records it). Clamped from below only, to keep exp out of its subnormal range: a clamp at 0 (as
    linear_attention.decay_exp_'s, which has no gradient) would put every decay of g = 0 on the clamp's boundary,
    where its gradient is a subgradient torch does not specify (torch 2.13 passes it, 2.14.1 gave dg = 0 at
    g = 0). The lower bound's gradient does not matter: the threshold zeroes the decay there."""
    decay = log_decay.clamp(min=LOG_DECAY_FLOOR - 1).exp()
    return torch.nn.functional.threshold(decay, math.exp(LOG_DECAY_FLOOR), 0.0)


def _flush_tiny(x: torch.Tensor) -> torch.Tensor:
    """Entries of magnitude at most 2^-60 set to 0 (out of place: linear_attention.flush_tiny_'s function), so
    that the matmuls on A^-1, built from many small decays, meet no subnormal products (which crawl on CPU)."""
    return torch.nn.functional.hardshrink(x, 2.0 ** -60)


def _stored(state: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """state rounded to the values it takes stored in dtype (state_dtype); autograd passes its gradient through."""
    return state if dtype == state.dtype else state.to(dtype).to(state.dtype)


def chunk_terms(q, k, v, g, beta):
    """The chunks' terms that do not depend on the state, chunk-major: q (already scaled), k [NC, N, Hk, C, K];
    v [NC, N, Hk, G, C, V]; g [NC, N, Hk, G, C, K]; beta [NC, N, Hk, G, C]. Differentiable (out of place).
    Returns a dict: decay D [NC, N, Hk, G, C, C, K] (0 above the diagonal), gamma =
    exp(gcum), tail = exp(gcum_C - gcum) [.., C, K], attn (q k^T with D, j <= i) and kk (k k^T with D, j <= i)
    [.., C, C], the WY inverse A^-1 [.., C, C], u = A^-1 (beta v), w = A^-1 (beta gamma k), keys = tail k, reads =
    gamma q [.., C, K or V], last = exp(gcum_C) [NC, N, Hk, G, K]; ke, qe: k and q with the value heads' axis."""
    C = k.shape[-2]
    gcum = g.cumsum(-2)
    ke, qe = k.unsqueeze(3), q.unsqueeze(3)  # the G value heads of a key head read the same q and k
    # D: the upper triangle's differences (> 0) replaced before the exponential: 0 and no gradient there
    lower = torch.ones(C, C, dtype=torch.bool, device=k.device).tril()[..., None]
    decay = _decay(torch.where(lower, gcum[..., :, None, :] - gcum[..., None, :, :], -math.inf))
    attn = torch.einsum("...id,...jd,...ijd->...ij", qe, ke, decay)  # j <= i
    kk = torch.einsum("...id,...jd,...ijd->...ij", ke, ke, decay)
    eye = torch.eye(C, dtype=k.dtype, device=k.device)
    # A's diagonal is the identity (unitriangular: the solve reads the strict lower triangle only)
    inverse = _flush_tiny(torch.linalg.solve_triangular((kk * beta[..., None]).tril(-1) + eye, eye.expand_as(kk),
                                                        upper=False, unitriangular=True))
    gamma, tail = _decay(gcum), _decay(gcum[..., -1:, :] - gcum)
    return dict(decay=decay, gamma=gamma, tail=tail, attn=attn, kk=kk, inverse=inverse, ke=ke, qe=qe,
                u=inverse @ (beta[..., None] * v), w=inverse @ ((beta[..., None] * gamma) * ke), keys=tail * ke,
                reads=gamma * qe, last=_decay(gcum[..., -1, :]))


def chunk_group(q, k, v, g, beta, state, state_dtype, keep=None):
    """One group of chunks, chunk-major (chunk_terms' shapes); state [N Hk G, K, V] at the first chunk's start (or
    None: zeros). The state after each chunk is rounded to state_dtype (and kept by keep, a serving.Keep, where
    due). Differentiable (out of place).
    Returns o [NC, N, Hk, G, C, V] and the state after the last chunk [N Hk G, K, V]."""
    NC, N, Hk, C, K = k.shape
    G, V = v.shape[3], v.shape[-1]
    M = N * Hk * G
    t = chunk_terms(q, k, v, g, beta)
    if state is None:
        state = torch.zeros(M, K, V, dtype=v.dtype, device=v.device)
    outputs = []
    for j in range(NC):
        v_new = t["u"][j].reshape(M, C, V) - torch.bmm(t["w"][j].reshape(M, C, K), state)
        o = torch.bmm(t["reads"][j].reshape(M, C, K), state) + torch.bmm(t["attn"][j].reshape(M, C, C), v_new)
        outputs.append(o)
        state = _stored(t["last"][j].reshape(M, K, 1) * state
                        + torch.bmm(t["keys"][j].reshape(M, C, K).transpose(1, 2), v_new), state_dtype)
        if keep is not None and keep.due():
            keep.add(state)
    return torch.stack(outputs).view(NC, N, Hk, G, C, V), state


def autograd_group_backward(q, k, v, g, beta, state, state_dtype, do, d_state):
    """The gradients of chunk_group (its inputs as there, state None or [N Hk G, K, V]) by torch's autograd through
    it, from do [NC, N, Hk, G, C, V] and the final state's gradient d_state [N Hk G, K, V]. Returns (dq, dk, dv,
    dg, dbeta, the starting state's gradient or None when state is None), each as its input."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v, g, beta)]
    s0 = state if state is None else state.detach().requires_grad_()
    with torch.enable_grad():
        o, final = chunk_group(*leaves, s0, state_dtype)
        wrt = leaves + ([] if s0 is None else [s0])
        parts = torch.autograd.grad((o, final), wrt, (do, d_state), allow_unused=True)
    found = [torch.zeros_like(x) if part is None else part for x, part in zip(leaves, parts)]
    return (*found, None if s0 is None else parts[5])


def _groups(num_chunks, layout, Hv, K):
    """The chunk slices computed together: CHUNK_GROUP chunks (the gated delta rule's groups), fewer where D would
    pass GROUP_ELEMENTS (one at least)."""
    per_chunk = layout.num_seqs * Hv * layout.size * layout.size * K
    size = max(1, min(CHUNK_GROUP, GROUP_ELEMENTS // per_chunk))
    return [slice(start, start + size) for start in range(0, num_chunks, size)]


def _chunk_size(q, chunk_size):
    return chunk_size or (CPU_CHUNK_SIZE if q.device.type == "cpu" else CHUNK_SIZE)


@torch.no_grad()
def kda(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens, mode, state_dtype,
        chunk_size=None, state_indices=None, output_state_indices=None, output_intermediate_states=False,
        chunk_states_every=None, A_log=None, dt_bias=None, beta_logits=False):
    """q, k [B, T, Hk, K]; v [B, T, Hv, V]; g [B, T, Hv, K]; beta [B, T, Hv]; initial_state None or
    [N, Hv, K, V] in state_dtype (a pool [P, Hv, K, V] with state_indices). Value head h reads key head
    h // (Hv // Hk). mode "chunk" (chunks of chunk_size: default 32 on CPU, 64 on GPUs, as the gated delta rule's)
    or "recurrent" (the gated delta rule's token loop with a decay per key channel).
    Returns o [B, T, Hv, V] in v's dtype and the final state [N, Hv, K, V] in state_dtype or None, and a StateTrace
    with a trace. Computes in float32 (float64 for float64 inputs); the state carried between chunks (or tokens)
    is rounded to state_dtype. The serving keywords as the gated delta rule's (dt_bias [Hv, K]);
    output_intermediate_states runs the token loop in either mode."""
    T, K = q.shape[1], q.shape[3]
    B, Hv, V = v.shape[0], v.shape[2], v.shape[3]
    dtype = compute_dtype(v)
    g, beta = serving.gates(g, beta, A_log, dt_bias, beta_logits, dtype,
                            by_token=output_intermediate_states and cu_seqlens is None)
    mode = "recurrent" if output_intermediate_states else mode
    size = _chunk_size(q, chunk_size) if mode == "chunk" else 1

    def loop(s0, every):
        keep = None if every is None else serving.Keep(every // size)
        layout, qc, kc, vc, gc, bc = _chunk_inputs(q, k, v, g, beta, scale, use_qk_l2norm, cu_seqlens, size, dtype)
        NC, N, C = layout.num_chunks, layout.num_seqs, layout.size
        if mode == "chunk":
            state = None if s0 is None else s0.reshape(N * Hv, K, V).to(dtype)
            outputs = []
            for group in _groups(NC, layout, Hv, K):
                o, state = chunk_group(qc[group], kc[group], vc[group], gc[group], bc[group], state, state_dtype, keep)
                outputs.append(o)
            o = torch.cat(outputs)
        else:
            o, state = recurrent_pass(qc[..., 0, :], kc[..., 0, :], vc[..., 0, :], gc[..., 0, :], bc[..., 0], s0,
                                      state_dtype, keep)
        state = state.reshape(N, Hv, K, V)
        kept = None if keep is None else keep.rows(serving.lengths(B, T, cu_seqlens), C, state)
        return layout.from_chunks(o.reshape(NC, N, Hv, C, V), v.dtype), state, kept

    return serving.serve(loop, "torch", chunk_states_multiple(mode, _chunk_size(q, chunk_size)), B, T, initial_state,
                         output_final_state, cu_seqlens, state_dtype, state_indices, output_state_indices,
                         output_intermediate_states, chunk_states_every)


@torch.no_grad()
def kda_backward(grads, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens, mode,
                 state_dtype, chunk_size=None):
    """The gradients of kda (kernellab.autograd's contract): grads {"o": [B, T, Hv, V] or None, "final_state":
    [N, Hv, K, V] or None}; the inputs as the forward's. Whatever the forward's mode (the same function): a pass
    over the groups of chunks keeps each group's starting state; then, last group first, the group is recomputed
    under autograd from its state and differentiated with the gradient of its outputs and of its final state
    (autograd_group_backward), which gives the gradient of its starting state for the group before. The rounding of
    a stored state passes its gradient straight through (as autograd through the reference's `.to(state_dtype)`
    does). Returns {q, k [B, T, Hk, K], v [B, T, Hv, V], g [B, T, Hv, K], beta [B, T, Hv], initial_state
    [N, Hv, K, V] (None when it is None)} in float32 (float64 for float64 inputs)."""
    Hk, K = q.shape[2:]
    Hv, V = v.shape[2], v.shape[3]
    dtype = compute_dtype(v)
    layout, qc, kc, vc, gc, bc = _chunk_inputs(q, k, v, g, beta, scale, use_qk_l2norm, cu_seqlens,
                                               _chunk_size(q, chunk_size), dtype)
    NC, N, C = layout.num_chunks, layout.num_seqs, layout.size
    M = N * Hv
    groups = _groups(NC, layout, Hv, K)
    starts = [None if initial_state is None else initial_state.reshape(M, K, V).to(dtype)]
    for group in groups[:-1]:
        starts.append(chunk_group(qc[group], kc[group], vc[group], gc[group], bc[group], starts[-1], state_dtype)[1])
    do, d_final = grads["o"], grads["final_state"]
    doc = (layout.to_chunks(do, dtype).view_as(vc) if do is not None else torch.zeros_like(vc))
    d_state = torch.zeros(M, K, V, dtype=dtype, device=v.device) if d_final is None else \
        d_final.reshape(M, K, V).to(dtype)
    found = {name: torch.empty_like(x) for name, x in dict(q=qc, k=kc, v=vc, g=gc, beta=bc).items()}
    for group, start in zip(reversed(groups), reversed(starts)):
        *parts, d_state = autograd_group_backward(qc[group], kc[group], vc[group], gc[group], bc[group], start,
                                                  state_dtype, doc[group], d_state)
        for name, part in zip(found, parts):
            found[name][group] = part
    dq, dk = layout.from_chunks(found["q"].mul_(scale), dtype), layout.from_chunks(found["k"], dtype)
    if use_qk_l2norm:
        dq, dk = l2norm_backward(q, dq, dtype), l2norm_backward(k, dk, dtype)
    return dict(q=dq, k=dk, v=layout.from_chunks(found["v"].view(NC, N, Hv, C, V), dtype),
                g=layout.from_chunks(found["g"].view(NC, N, Hv, C, K), dtype),
                beta=layout.from_chunks(found["beta"].view(NC, N, Hv, C), dtype),
                initial_state=None if initial_state is None else d_state.view(N, Hv, K, V))
