"""Launchers of kernellab/cuda/gated_delta_rule.cu.

mode "recurrent": gdr_recurrent, the whole recurrence in one kernel (the state read and written once).
mode "chunk": torch computes the intra-chunk parts of the WY form in float32 (the unit lower-triangular solve
giving w and u, and the outputs), and gdr_chunk_state carries the state across chunks:
    A = strict_tril(beta_i e^{G_i - G_j} k_i . k_j);  w = (I + A)^-1 (beta e^G k);  u = (I + A)^-1 (beta v)
    [kernel] h_c = S;  v_new = u - w S;  S = e^{G_last} S + (e^{G_last - G} k)^T v_new
    o = scale (e^G q h_c + tril(q k^T e^{G_i - G_j}) v_new).
Packed sequences are padded to whole chunks (padding has k = v = beta = g = 0, which leaves the state alone).
Both kernels keep the state in float and round it to state_dtype where it is stored: after every token
(recurrent), after every chunk (the chunk states h_c, stored in state_dtype).
"""
import numpy as np
import torch
import torch.nn.functional as F

from kernellab import serving
from kernellab.cuda._runtime import cdiv, ctype, module, on_torch_stream, ptr
from kernellab.validate import LOG_DECAY_MIN

SOURCE = "gated_delta_rule.cu"
HEAD_DIMS = (16, 32, 64, 128, 256)  # K of the recurrent instantiations (other K are zero-padded up)
CHUNK_HEAD_DIMS = (16, 32, 64, 128)
BV, SPLIT = 32, 4  # recurrent block: BV state columns x SPLIT row groups
CHUNK, CHUNK_BV, CHUNK_ROWS = 64, 32, 8
C_TYPES = ("float", "__half", "__nv_bfloat16")
NAMES = (tuple(f"gdr_recurrent<{t}, {st}, {K}, {BV}, {SPLIT}>" for t in C_TYPES for st in C_TYPES for K in HEAD_DIMS)
         + tuple(f"gdr_chunk_state<{st}, {K}, {CHUNK_BV}, {CHUNK_ROWS}, {CHUNK}>" for st in C_TYPES
                 for K in CHUNK_HEAD_DIMS))


def _padded_dim(K, dims):
    for size in dims:
        if K <= size:
            return size
    raise ValueError(f"the cuda gated delta rule takes K <= {dims[-1]}, got {K}")


def _pad_last(x, size):
    return x if x is None or x.shape[-1] == size else F.pad(x, (0, size - x.shape[-1]))


def _recurrent(q, k, v, g, beta, scale, use_qk_l2norm, cu_seqlens, state_dtype, states, gating):
    """The launch of gdr_recurrent: q, k [B, T, Hk, K]; v [B, T, Hv, V]; g, beta [B, T, Hv] (raw a and beta logits
    as `gating` says); states: serving.StateArguments.kernel (the initial, final and kept states, each row
    [Hv, K, V] in state_dtype where it lies: a pool is read and written in place); gating: A_log, dt_bias [Hv]
    (None: g as given) and beta_logits. Returns o [B, T, Hv, V] in v's dtype."""
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    Kp = _padded_dim(K, HEAD_DIMS)
    q, k = (_pad_last(t, Kp).contiguous() for t in (q, k))  # the state's rows past K stay zero
    o = torch.empty(B, T, Hv, V, dtype=v.dtype, device=v.device)
    v = v.contiguous()
    g, beta = (t.to(torch.float32).contiguous() for t in (g, beta))
    A_log, dt_bias = (None if t is None else t.to(torch.float32).contiguous()
                      for t in (gating["A_log"], gating["dt_bias"]))
    cu = None if cu_seqlens is None else cu_seqlens.to(torch.int64).contiguous()
    kernel = module(SOURCE, NAMES).get_function(
        f"gdr_recurrent<{ctype(v.dtype)}, {ctype(state_dtype)}, {Kp}, {BV}, {SPLIT}>")
    with on_torch_stream(v.device):
        kernel((cdiv(V, BV), Hv, N), (BV, SPLIT), (
            ptr(q), ptr(k), ptr(v), ptr(g), ptr(beta), ptr(A_log), ptr(dt_bias), ptr(states["h0"]),
            ptr(states["h0_index"]), np.int64(states["h0_stride"]), ptr(states["ht"]), ptr(states["ht_index"]),
            np.int64(states["ht_stride"]), ptr(states["kept"]), ptr(states["kept_offsets"]),
            np.int32(states["every"]), ptr(o), ptr(cu), np.int32(T), np.int32(Hk), np.int32(Hv), np.int32(V),
            np.int32(K), np.float32(scale), np.float32(LOG_DECAY_MIN), np.int32(use_qk_l2norm),
            np.int32(gating["beta_logits"])))
    return o


def chunk_state_pass(k, w, u, gcum, h0, state_dtype):
    """The kernel: k, w [N, Hv, Tp, K]; u [N, Hv, Tp, V]; gcum [N, Hv, Tp] (float32, Tp a multiple of CHUNK);
    h0 [N, Hv, K, V] or None (converted to state_dtype). Returns h [N, Hv, Tp / CHUNK, K, V] (the state entering
    each chunk), v_new [N, Hv, Tp, V] and the final state [N, Hv, K, V], h and the final state in state_dtype (the
    state is rounded to it after every chunk). w None: linear attention's pass (v_new is u)."""
    N, Hv, Tp, K = k.shape
    V = u.shape[-1]
    Kp = _padded_dim(K, CHUNK_HEAD_DIMS)
    k, w = (None if t is None else _pad_last(t, Kp).contiguous() for t in (k, w))
    h0 = None if h0 is None else F.pad(h0.to(state_dtype), (0, 0, 0, Kp - K)).contiguous()
    h = torch.empty(N, Hv, Tp // CHUNK, Kp, V, dtype=state_dtype, device=k.device)
    v_new = None if w is None else torch.empty(N, Hv, Tp, V, dtype=torch.float32, device=k.device)
    ht = torch.empty(N, Hv, Kp, V, dtype=state_dtype, device=k.device)
    u, gcum = u.contiguous(), gcum.contiguous()
    kernel = module(SOURCE, NAMES).get_function(
        f"gdr_chunk_state<{ctype(state_dtype)}, {Kp}, {CHUNK_BV}, {CHUNK_ROWS}, {CHUNK}>")
    with on_torch_stream(k.device):
        kernel((cdiv(V, CHUNK_BV), Hv, N), (CHUNK_BV, CHUNK_ROWS), (
            ptr(k), ptr(w), ptr(u), ptr(gcum), ptr(h0), ptr(h), ptr(v_new), ptr(ht), np.int32(Tp), np.int32(Hv),
            np.int32(V)))
    return h[:, :, :, :K], (u if v_new is None else v_new), ht[:, :, :K]


def _token_index(B, T, cu_seqlens, device):
    """(index [N, Tp] of each padded position's flat token in B * T, valid [N, Tp]), Tp a multiple of CHUNK."""
    if cu_seqlens is None:
        starts = torch.arange(B, device=device) * T
        lengths = torch.full((B,), T, device=device)
    else:
        bounds = cu_seqlens.to(torch.int64)
        starts, lengths = bounds[:-1], bounds[1:] - bounds[:-1]
    Tp = cdiv(max(int(lengths.max()), 1), CHUNK) * CHUNK
    position = torch.arange(Tp, device=device)
    valid = position[None, :] < lengths[:, None]
    return torch.where(valid, starts[:, None] + position[None, :], 0), valid


def chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm,
                           cu_seqlens, state_dtype, state_pass=chunk_state_pass):
    """The chunked algorithm (module docstring) with `state_pass` carrying the state across chunks. Returns
    o [B, T, Hv, V] in v's dtype and the final state [N, Hv, K, V] in state_dtype (or None)."""
    B, T, Hk, K = q.shape
    Hv, V, out_dtype = v.shape[2], v.shape[3], v.dtype
    q, k, v, g, beta = (t.to(torch.float32) for t in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = (t * torch.rsqrt((t * t).sum(-1, keepdim=True) + 1e-6) for t in (q, k))
    q, k = (t.repeat_interleave(Hv // Hk, dim=2) for t in (q, k))
    index, valid = _token_index(B, T, cu_seqlens, q.device)
    N, Tp = index.shape
    C = CHUNK

    def padded(x):  # [B, T, Hv, ...] -> [N, Hv, Tp, ...], zero past each sequence's end
        x = x.reshape(B * T, *x.shape[2:])[index] * valid.view(N, Tp, *[1] * (x.ndim - 2))
        return x.movedim(1, 2) if x.ndim == 3 else x.movedim(1, 2).contiguous()

    qp, kp, vp = padded(q), padded(k), padded(v)
    gp, bp = padded(g[..., None])[..., 0], padded(beta[..., None])[..., 0]
    nC = Tp // C
    gcum = gp.reshape(N, Hv, nC, C).cumsum(-1)
    qc, kc = qp.reshape(N, Hv, nC, C, K), kp.reshape(N, Hv, nC, C, K)
    vc, bc = vp.reshape(N, Hv, nC, C, V), bp.reshape(N, Hv, nC, C)
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    gate = (gcum[..., :, None] - gcum[..., None, :]).masked_fill(~lower, float("-inf")).exp()  # e^{G_i - G_j}, i >= j
    A = (kc @ kc.transpose(-1, -2)) * gate * bc[..., :, None]
    unit_lower = A.tril(-1) + torch.eye(C, device=q.device)
    w = torch.linalg.solve_triangular(unit_lower, kc * (bc * gcum.exp())[..., None], upper=False, unitriangular=True)
    u = torch.linalg.solve_triangular(unit_lower, vc * bc[..., None], upper=False, unitriangular=True)
    h, v_new, final = state_pass(kp, w.reshape(N, Hv, Tp, K), u.reshape(N, Hv, Tp, V), gcum.reshape(N, Hv, Tp),
                                 initial_state, state_dtype)
    v_new = v_new.reshape(N, Hv, nC, C, V)
    o = (qc * gcum.exp()[..., None]) @ h.float() + ((qc @ kc.transpose(-1, -2)) * gate) @ v_new
    o = (scale * o).reshape(N, Hv, Tp, V).movedim(1, 2)  # [N, Tp, Hv, V]
    out = torch.empty(B * T, Hv, V, dtype=out_dtype, device=v.device)
    out[index[valid]] = o[valid].to(out_dtype)
    return out.reshape(B, T, Hv, V), (final if output_final_state else None)


def _chunk_states(h, final, every, sizes):
    """The states after every `every` tokens (a multiple of CHUNK) from the chunked pass: h [N, Hv, nC, K, V] the
    states entering each chunk, final [N, Hv, K, V]; sizes [N] the sequences' lengths. Returns [M, Hv, K, V] in
    serving.kept_rows' order."""
    after = torch.cat([h[:, :, 1:], final[:, :, None]], dim=2)  # after[:, :, c]: the state after chunk c
    kept = after[:, :, every // CHUNK - 1::every // CHUNK].movedim(2, 0)  # [J, N, Hv, K, V]
    return serving.kept_rows(kept, sizes, every)


def gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens,
                     mode, state_dtype, state_indices=None, output_state_indices=None,
                     output_intermediate_states=False, chunk_states_every=None, A_log=None, dt_bias=None,
                     beta_logits=False, state_pass=chunk_state_pass):
    """q, k [B, T, Hk, K]; v [B, T, Hv, V]; g, beta [B, T, Hv]; initial_state [N, Hv, K, V] in state_dtype or None
    (a pool [P, Hv, K, V] with state_indices) (K <= 256, chunk mode K <= 128). Returns o [B, T, Hv, V] in v's dtype
    and the final state in state_dtype (or None), and a StateTrace with a trace.
    The serving keywords (docs/api.md): the recurrent kernel reads the pool's rows where they lie (int32
    state_indices, -1 a padding slot) and writes the final states back in place (through a buffer and
    serving.Pool.write with output_state_indices), stores the states it keeps (every token for
    output_intermediate_states, which runs it in either mode; every chunk_states_every tokens) and gates in
    float32. The chunked mode goes through serving.serve: the pool gathered and scattered, the gates computed by
    torch in float32, the chunk states taken from the state pass (`state_pass`, the kernel's launcher: tests give
    a torch model of it to check this host side without a GPU)."""
    serving.check_every(chunk_states_every, CHUNK, "cuda")
    if mode == "recurrent" or output_intermediate_states:
        B, T, _, K = q.shape
        Hv, V = v.shape[2], v.shape[3]
        N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        states = serving.state_arguments(initial_state, output_final_state, state_dtype, N, Hv, K, V, B, T,
                                         cu_seqlens, v, state_indices=state_indices,
                                         output_state_indices=output_state_indices,
                                         output_intermediate_states=output_intermediate_states,
                                         chunk_states_every=chunk_states_every, backend="cuda")
        gating = dict(A_log=A_log, dt_bias=dt_bias, beta_logits=beta_logits)
        o = _recurrent(q, k, v, g, beta, scale, use_qk_l2norm, cu_seqlens, state_dtype, states.kernel, gating)
        return states.finish(o, output_intermediate_states, output_final_state, state_dtype, cu_seqlens)
    g, beta = serving.gates(g, beta, A_log, dt_bias, beta_logits, torch.float32)
    B, T = v.shape[:2]
    sizes = serving.lengths(B, T, cu_seqlens)

    def loop(s0, every):
        kept = []

        def keeping(*args):  # the state pass, keeping its chunk states on the way
            h, v_new, final = state_pass(*args)
            if every is not None:
                kept.append(_chunk_states(h, final, every, sizes))
            return h, v_new, final

        o, final = chunk_gated_delta_rule(q, k, v, g, beta, scale, s0, True, use_qk_l2norm, cu_seqlens,
                                          state_dtype, state_pass=keeping)
        return o, final, (kept[0] if kept else None)

    return serving.serve(loop, "cuda", CHUNK, B, T, initial_state, output_final_state, cu_seqlens, state_dtype,
                         state_indices, output_state_indices, output_intermediate_states, chunk_states_every)
