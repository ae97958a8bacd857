"""The chunked linear attentions on CPU (float32): one numba-compiled loop over sequences, key heads and chunks,
its products MKL sgemm / strsm calls on the inputs where they lie, no chunk-major copies.

Per chunk of c tokens of one sequence and key head, with R = [k; q] (q scaled, both l2-normalised on request:
a [2c, K] scratch that stays in cache), and per value head gcum the chunk's cumulative log decay,
gamma = exp(gcum), D_ij = exp(gcum_i - gcum_j) for j <= i (else 0) and S the state at the chunk's start:
  [k k^T; q k^T] = R k^T                    one GEMM, shared by the G value heads of the key head
  [k S; q S] = R S                          one GEMM: both reads of the state
  u = v                                     linear attention, or for the gated delta rule the WY correction
  (I + L) u = beta (v - gamma k S)          L = strictly_lower(beta_i (k k^T)_ij D_ij), by strsm
  o = gamma q S + ((q k^T) * D) u           written into o's rows where they lie
  S = exp(gcum_c) S + (k exp(gcum_c - gcum))^T u                       the decay on the GEMM's beta
For the gated delta rule this is kernellab.torch.gated_delta_rule's WY form with A^-1 applied by a triangular solve
to the c x V right-hand side (no w = A^-1 beta gamma k: one product fewer). Linear attention skips the k rows.
A state_dtype other than float32 rounds S to it after every chunk (_store: round to nearest even on the float32
bits, as torch's conversions do); S stays a float32 array holding those values.
"""
import math

import numba
import numpy as np
import torch

from kernellab import serving
from kernellab.mkl.packed import _library
from kernellab.torch.linear_attention import LOG_DECAY_FLOOR, l2norm_backward, start_state
from kernellab.validate import STATE_ROUNDING

_sgemm = _library().sgemm_ if _library() is not None else None
_strsm = _library().strsm_ if _library() is not None else None
# Each job (a sequence and key head) calls MKL on one thread: the jobs are the parallelism. numba's worker threads
# otherwise take MKL's default thread count (torch.set_num_threads sets the calling thread's), and every small
# GEMM of a job forks a team of MKL threads over cores the other jobs hold.
_mkl_local_threads = _library().MKL_Set_Num_Threads_Local if _library() is not None else None
_NO_TRANSPOSE, _TRANSPOSE = ord("N"), ord("T")
# Small chunks: with no copies into a chunk layout, the intra-chunk work (C^2 per token: decay matrices, the
# solve) costs more than the state's products lose on fewer rows. At T = 8192, K = V = 128, 1 thread, chunks of
# 8 to 20 measured the same, 32 10% slower, 64 35% slower (gated delta rule).
CHUNK_SIZE = 16
_FP16_MIN_NORMAL = 2.0 ** -14
_FP16_OVERFLOW = 65520.0  # the midpoint between float16's largest value 65504 and 2^16: from here on, infinity


@numba.njit
def _decay(log_decay):
    """exp(x) for a log decay x <= 0, exactly 0 below LOG_DECAY_FLOOR, as kernellab.torch.linear_attention.decay_exp_
    (no subnormal numbers downstream)."""
    return 0.0 if log_decay < LOG_DECAY_FLOOR else math.exp(min(log_decay, 0.0))


@numba.njit
def _gemm(chars, ints, floats, transpose_a, transpose_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """Row-major C [m, n] = alpha op(A) op(B) + beta C, op(X) = X^T when transpose_x (A [k, m], B [n, k] then),
    float32 pointers with row strides. The column-major sgemm sees each row-major matrix transposed: it is asked
    for C^T = op(B)^T op(A)^T. chars, ints, floats: scratch for the arguments sgemm takes by pointer."""
    chars[0] = _TRANSPOSE if transpose_b else _NO_TRANSPOSE
    chars[1] = _TRANSPOSE if transpose_a else _NO_TRANSPOSE
    ints[0], ints[1], ints[2], ints[3], ints[4], ints[5] = n, m, k, ldb, lda, ldc
    floats[0], floats[1] = alpha, beta
    _sgemm(chars[0:].ctypes.data, chars[1:].ctypes.data, ints[0:].ctypes.data, ints[1:].ctypes.data,
           ints[2:].ctypes.data, floats[0:].ctypes.data, b, ints[3:].ctypes.data, a, ints[4:].ctypes.data,
           floats[1:].ctypes.data, c, ints[5:].ctypes.data)


@numba.njit
def _heads(k, v):
    """(Hk, K, Hv, V, G = Hv // Hk) of rows k [rows, Hk, K], v [rows, Hv, V]."""
    return k.shape[1], k.shape[2], v.shape[1], v.shape[2], v.shape[1] // k.shape[1]


@numba.njit
def _blas_scratch():
    """The scratch arrays _gemm and _solve_unit_lower pass their by-pointer arguments in: chars, ints, floats."""
    return np.empty(4, np.uint8), np.empty(6, np.int32), np.empty(2, np.float32)


@numba.njit
def _solve_unit_lower(chars, ints, floats, m, n, a, lda, b, ldb, transpose):
    """B [m, n] = A^-1 B (A^-T B when transpose) in place for A [m, m] unit lower triangular (only its strict
    lower triangle is read), row-major float32 pointers with row strides. The column-major strsm sees B^T and A^T
    (upper): X A^T = B^T (X A = B^T when transpose)."""
    chars[0], chars[1], chars[3] = ord("R"), ord("U"), ord("U")
    chars[2] = _TRANSPOSE if transpose else _NO_TRANSPOSE
    ints[0], ints[1], ints[2], ints[3] = n, m, lda, ldb
    floats[0] = 1.0
    _strsm(chars[0:].ctypes.data, chars[1:].ctypes.data, chars[2:].ctypes.data, chars[3:].ctypes.data,
           ints[0:].ctypes.data, ints[1:].ctypes.data, floats[0:].ctypes.data, a, ints[2:].ctypes.data, b,
           ints[3:].ctypes.data)


@numba.njit
def _store(S, rounding):
    """S [K, V] float32 rounded in place to the nearest bfloat16 (rounding 1) or float16 (2) values, ties to even;
    0: nothing. bfloat16 keeps the top 16 bits; float16 10 of the 23 mantissa bits, its subnormals steps of 2^-24,
    infinity from 65520 on."""
    if rounding == 0:
        return
    bits = S.view(np.uint32)
    for i in range(S.shape[0]):
        for j in range(S.shape[1]):
            b = bits[i, j]
            if rounding == 1:
                bits[i, j] = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
                continue
            x = S[i, j]
            if abs(x) >= _FP16_OVERFLOW:
                S[i, j] = math.copysign(math.inf, x)
            elif abs(x) < _FP16_MIN_NORMAL:
                S[i, j] = np.rint(x * np.float32(2.0 ** 24)) * np.float32(2.0 ** -24)
            else:
                bits[i, j] = (b + np.uint32(0xFFF) + ((b >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)


@numba.njit
def _scaled_rows(dst, src, t0, c, head, factor, l2norm):
    """dst[i] = src[t0 + i, head] * factor (over its l2 norm when l2norm) for i < c."""
    for i in range(c):
        x = src[t0 + i, head]
        f = factor
        if l2norm:
            total = 0.0
            for d in range(x.shape[0]):
                total += x[d] * x[d]
            f = factor / math.sqrt(total + 1e-6)
        for d in range(x.shape[0]):
            dst[i, d] = x[d] * f


@numba.njit(fastmath=True)
def _sequence_key_head(q, k, v, g, beta, start, length, state, out, hk, chunk, scale, qk_l2norm, delta_rule,
                       rounding):
    """One sequence (rows start .. start + length) and key head hk with its value heads, chunk after chunk.
    state [Hv, K, V]: the sequence's, updated in place (and _store-d with `rounding` after every chunk)."""
    Hk, K, Hv, V, G = _heads(k, v)
    C = chunk
    threads = _mkl_local_threads(1)
    chars, ints, floats = _blas_scratch()
    R = np.empty((2 * C, K), np.float32)  # [k; q]
    KQ_K = np.empty((2 * C, C), np.float32)  # [k k^T; q k^T]
    X = np.empty((2 * C, V), np.float32)  # [k S; q S]
    U = np.empty((C, V), np.float32)  # v, or the delta rule's v_new
    P = np.empty((C, C), np.float32)  # (q k^T) * D
    L = np.empty((C, C), np.float32)  # the WY matrix's strict lower triangle
    decayed_k = np.empty((C, K), np.float32)
    gcum = np.empty(C, np.float32)
    gamma = np.empty(C, np.float32)
    for t0 in range(start, start + length, C):
        c = min(C, start + length - t0)
        first = 0 if delta_rule else c  # R's first row read: linear attention needs no k k^T, k S
        _scaled_rows(R, k, t0, c, hk, 1.0, qk_l2norm)
        _scaled_rows(R[c:], q, t0, c, hk, scale, qk_l2norm)
        _gemm(chars, ints, floats, False, True, 2 * c - first, c, K, 1.0, R[first:].ctypes.data, K, R.ctypes.data,
              K, 0.0, KQ_K[first:].ctypes.data, C)
        for h in range(hk * G, hk * G + G):
            S = state[h]
            total = 0.0
            for i in range(c):
                total += g[t0 + i, h]
                gcum[i] = total
                gamma[i] = _decay(total)
            _gemm(chars, ints, floats, False, False, 2 * c - first, V, K, 1.0, R[first:].ctypes.data, K,
                  S.ctypes.data, V, 0.0, X[first:].ctypes.data, V)
            for i in range(c):
                vi, oi, b = v[t0 + i, h], out[t0 + i, h], beta[t0 + i, h]
                for e in range(V):
                    oi[e] = gamma[i] * X[c + i, e]
                    U[i, e] = b * (vi[e] - gamma[i] * X[i, e]) if delta_rule else vi[e]
                for j in range(i + 1):
                    decay = _decay(gcum[i] - gcum[j])
                    P[i, j] = KQ_K[c + i, j] * decay
                    if delta_rule:
                        L[i, j] = b * KQ_K[i, j] * decay
                for j in range(i + 1, c):
                    P[i, j] = 0.0
            if delta_rule:
                _solve_unit_lower(chars, ints, floats, c, V, L.ctypes.data, C, U.ctypes.data, V, False)
            _gemm(chars, ints, floats, False, False, c, V, c, 1.0, P.ctypes.data, C, U.ctypes.data, V, 1.0,
                  out[t0, h].ctypes.data, Hv * V)
            for i in range(c):
                factor = _decay(gcum[c - 1] - gcum[i])
                for d in range(K):
                    decayed_k[i, d] = R[i, d] * factor
            _gemm(chars, ints, floats, True, False, K, V, c, 1.0, decayed_k.ctypes.data, K, U.ctypes.data, V,
                  gamma[c - 1], S.ctypes.data, V)
            _store(S, rounding)
    _mkl_local_threads(threads)


@numba.njit(parallel=True)
def _run(q, k, v, g, beta, starts, lengths, state, out, chunk, scale, qk_l2norm, delta_rule, rounding):
    """q, k [rows, Hk, K]; v, out [rows, Hv, V]; g, beta [rows, Hv] (rows = B T; sequence n at rows
    starts[n] .. starts[n] + lengths[n]); state [N, Hv, K, V], updated in place. All float32, contiguous.
    Sequences and key heads run in parallel on numba's threads."""
    Hk = k.shape[1]
    for job in numba.prange(starts.shape[0] * Hk):
        n = job // Hk
        _sequence_key_head(q, k, v, g, beta, starts[n], lengths[n], state[n], out, job % Hk, chunk, scale,
                           qk_l2norm, delta_rule, rounding)


def _rows(x):
    """[B, T, ...] -> [B T, ...] float32 contiguous numpy (a view when it already is)."""
    return x.reshape(-1, *x.shape[2:]).to(torch.float32).contiguous().numpy()


def _sequences(B, T, cu_seqlens):
    """int64 starts and lengths [N] of the sequences among the B T rows."""
    if cu_seqlens is None:
        return torch.arange(0, B * T, T, dtype=torch.int64), torch.full((B,), T, dtype=torch.int64)
    bounds = cu_seqlens.to(torch.int64)
    return bounds[:-1], bounds.diff()


def by_segments(run, tokens: dict, B: int, T: int, cu_seqlens, every: int, initial_state):
    """The states after every, 2 every, ... tokens of each sequence (chunk_states_every) from a chunked loop that
    keeps none: run(tokens, cu_seqlens, initial_state) -> (o [1, T', H, V], final state [N, H, K, V]) called on
    segments of `every` tokens of each sequence (packed: a sequence's piece of a segment may be empty), the state
    passed from one to the next. every is a multiple of the chunk: the chunk boundaries, and so the outputs and
    the final states, are those of one call (bitwise). tokens: {name: [B, T, ...]}; initial_state [N, H, K, V] or
    None. Returns o [B, T, H, V], the final state and the kept states [M, H, K, V] (serving.kept_rows' order)."""
    sizes = serving.lengths(B, T, cu_seqlens)
    starts = torch.arange(B) * T if cu_seqlens is None else cu_seqlens[:-1].cpu().long()
    flat = {name: x.reshape(1, B * T, *x.shape[2:]) for name, x in tokens.items()}
    o, kept, state = None, [], initial_state
    for j in range(-(-int(sizes.max()) // every)):
        pieces = (sizes - j * every).clamp(0, every)
        rows = torch.cat([torch.arange(start + j * every, start + j * every + piece)
                          for start, piece in zip(starts.tolist(), pieces.tolist())])
        bounds = torch.cat([torch.zeros(1, dtype=torch.int64), pieces.cumsum(0)])
        part, state = run({name: x[:, rows] for name, x in flat.items()}, bounds, state)
        o = part.new_empty(1, B * T, *part.shape[2:]) if o is None else o
        o[:, rows] = part
        kept.append(state)
    return o.view(B, T, *o.shape[2:]), state, serving.kept_rows(torch.stack(kept), sizes, every)


def serving_loop(run, tokens: dict, B: int, T: int, cu_seqlens):
    """kernellab.serving.serve's loop(s0, every) for a compiled chunked loop run(tokens, cu_seqlens, s0) -> (o,
    final) (by_segments'): one call, or by_segments for the states every `every` tokens."""
    def loop(s0, every):
        if every is None:
            return *run(tokens, cu_seqlens, s0), None
        return by_segments(run, tokens, B, T, cu_seqlens, every, s0)
    return loop


def chunked(q, k, v, g, beta, scale, initial_state, cu_seqlens, state_dtype, use_qk_l2norm=False, chunk_size=None):
    """q, k [B, T, Hk, K]; v [B, T, Hv, V]; g [B, T, Hv] (log decays); beta [B, T, Hv] for the gated delta rule,
    None for linear attention; initial_state None or [N, Hv, K, V] in state_dtype (float32, bfloat16 or float16:
    the state is rounded to it after every chunk). CPU tensors; computed in float32.
    Returns o [B, T, Hv, V] in v's dtype and the final state [N, Hv, K, V] in state_dtype."""
    B, T, Hv, V = v.shape
    starts, lengths = _sequences(B, T, cu_seqlens)
    state = start_state(initial_state, (starts.shape[0], Hv, k.shape[-1], V), torch.float32, "cpu")
    out = torch.empty(B * T, Hv, V, dtype=torch.float32)
    delta_rule = beta is not None  # linear attention passes g in beta's place, its values unused
    _run(_rows(q), _rows(k), _rows(v), _rows(g), _rows(beta if delta_rule else g), starts.numpy(), lengths.numpy(),
         state.numpy(), out.numpy(), chunk_size or CHUNK_SIZE, scale, use_qk_l2norm, delta_rule, STATE_ROUNDING[state_dtype])
    return out.view(B, T, Hv, V).to(v.dtype), state.to(state_dtype)


# ------------------------------------------------------------------------------------------------ backward
#
# The chunked backward of the same WY form (kernellab/torch/linear_attention.py states it: the reverse pass
# dv_new = P^T do + Kd dS1, dS0 = gamma_C dS1 + (gamma q)^T do - w^T dv_new, the triangular solve's backward,
# dg summed from the gradients of the decays as such), per sequence and key head as the forward, chunk by chunk.
# With W = [do; Y] (Y = A^-T dv_new, A = I + L, the solve's backward by strsm transposed) the state-sized
# products of a chunk and value head are five GEMMs:
#   dv_new = Kd dS1 (+ P^T do)          dKd = v_new dS1^T            dS0 = gamma_C dS1 + [gamma q; -beta gamma k]^T W
#   W S0^T = [do S0^T; Y S0^T]          W v_new^T = [dP; -dL]        (P's and L's gradients, C x C)
# and per key head, summed over its value heads: dq += dQK k, dk += dQK^T q + (dKK + dKK^T) k.
# The states are not kept: a forward pass keeps the state at the start of every STATE_GROUP chunks and v_new
# (a [B T, Hv, V] buffer, the gated delta rule's; v itself for linear attention), then the groups in reverse
# recompute their chunks' states from it (one GEMM a chunk) and run the reverse pass over them.
STATE_GROUP = 8
# The backward's default chunk, larger than the forward's: it has twice the state-sized GEMMs per chunk, which MKL
# runs at a low rate on 16 rows, against C^2 work per token (T = 8192, K = V = 128, 1 thread, by process CPU
# time on a shared machine: 32 the fastest of 16, 32, 48, 64 and 128).
BACKWARD_CHUNK_SIZE = 32


@numba.njit
def _copy_states(dst, src):
    """dst[...] = src for [G, K, V] states, as loops: numba's array assignment compiles its shape check's error
    message, a fifth of this module's compile time."""
    for h in range(src.shape[0]):
        for d in range(src.shape[1]):
            for e in range(src.shape[2]):
                dst[h, d, e] = src[h, d, e]


@numba.njit
def _chunk_decays(g, t0, c, h, gcum, gamma, tail):
    """gcum (cumulative log decay), gamma = exp(gcum) and tail = exp(gcum_c - gcum) of chunk rows t0 .. t0 + c
    and value head h."""
    total = 0.0
    for i in range(c):
        total += g[t0 + i, h]
        gcum[i] = total
        gamma[i] = _decay(total)
    for i in range(c):
        tail[i] = _decay(gcum[c - 1] - gcum[i])


@numba.njit
def _advance(chars, ints, floats, R, KK, X, L, decayed_k, gcum, gamma, tail, v, g, beta, u, S, t0, c, h, chunk,
             solve):
    """S = gamma_C S + Kd^T v_new in place for chunk rows t0 .. t0 + c and value head h (R[:c] its keys, KK their
    k k^T). solve: first compute v_new into u's rows (the gated delta rule: (I + L) v_new = beta (v - gamma k S));
    else u's rows hold it already."""
    K, V, ld = R.shape[1], S.shape[1], u.shape[1] * u.shape[2]
    _chunk_decays(g, t0, c, h, gcum, gamma, tail)
    if solve:
        _gemm(chars, ints, floats, False, False, c, V, K, 1.0, R.ctypes.data, K, S.ctypes.data, V, 0.0,
              X.ctypes.data, V)
        for i in range(c):
            vi, ui, b = v[t0 + i, h], u[t0 + i, h], beta[t0 + i, h]
            for e in range(V):
                ui[e] = b * (vi[e] - gamma[i] * X[i, e])
            for j in range(i):
                L[i, j] = b * KK[i, j] * _decay(gcum[i] - gcum[j])
        _solve_unit_lower(chars, ints, floats, c, V, L.ctypes.data, chunk, u[t0, h].ctypes.data, ld, False)
    for i in range(c):
        for d in range(K):
            decayed_k[i, d] = R[i, d] * tail[i]
    _gemm(chars, ints, floats, True, False, K, V, c, 1.0, decayed_k.ctypes.data, K, u[t0, h].ctypes.data, ld,
          gamma[c - 1], S.ctypes.data, V)


@numba.njit
def _backward_sequence_key_head(q, k, v, g, beta, do, start, length, state, d_state, u, dq, dk, dv, dg, dbeta, hk,
                                chunk, group, scale, qk_l2norm, delta_rule):
    """The gradients of one sequence (rows start .. start + length) and key head hk with its value heads.
    state [Hv, K, V]: the sequence's initial state (overwritten); d_state [Hv, K, V]: its final state's gradient,
    replaced by its initial state's; u [rows, Hv, V]: v_new's buffer (v for linear attention). dq, dk (zeros on
    entry: the value heads add to them), dv, dg, dbeta: the gradients' rows, written for this sequence and head
    (dq, dk of the scaled, l2-normalised q and k)."""
    threads = _mkl_local_threads(1)
    Hk, K, Hv, V, G = _heads(k, v)
    C = chunk
    ld = Hv * V  # the row stride of u, v, do, dv
    num_chunks = (length + C - 1) // C
    num_groups = (num_chunks + group - 1) // group
    chars, ints, floats = _blas_scratch()
    R = np.empty((2 * C, K), np.float32)  # [k; q]
    KQ_K = np.empty((2 * C, C), np.float32)  # [k k^T; q k^T]
    X = np.empty((C, V), np.float32)  # k S (the forward pass's)
    W = np.empty((2 * C, V), np.float32)  # [do; Y]
    R2 = np.empty((2 * C, K), np.float32)  # [gamma q; -beta gamma k]
    WS = np.empty((2 * C, K), np.float32)  # W S^T
    WU = np.empty((2 * C, C), np.float32)  # W v_new^T
    d_decayed_k = np.empty((C, K), np.float32)
    decayed_k = np.empty((C, K), np.float32)
    P = np.empty((C, C), np.float32)  # (q k^T) * D
    L = np.empty((C, C), np.float32)  # the WY matrix's strict lower triangle
    D = np.empty((C, C), np.float32)  # exp(gcum_i - gcum_j), j <= i
    dQK = np.empty((C, C), np.float32)  # summed over the value heads
    dKK = np.empty((C, C), np.float32)  # summed over the value heads, then symmetrised
    gcum = np.empty(C, np.float32)
    gamma = np.empty(C, np.float32)
    tail = np.empty(C, np.float32)
    suffix = np.empty(C, np.float64)
    prefix = np.empty(C, np.float64)
    below = np.empty(C, np.float64)
    checkpoints = np.empty((num_groups, G, K, V), np.float32)
    states = np.empty((group, G, K, V), np.float32)
    heads = state[hk * G:hk * G + G]
    d_heads = d_state[hk * G:hk * G + G]
    # the forward pass: v_new into u, the state at every group's start
    for n in range(num_chunks):
        t0 = start + n * C
        c = min(C, start + length - t0)
        if n % group == 0:
            _copy_states(checkpoints[n // group], heads)
        _scaled_rows(R, k, t0, c, hk, 1.0, qk_l2norm)
        if delta_rule:
            _gemm(chars, ints, floats, False, True, c, c, K, 1.0, R.ctypes.data, K, R.ctypes.data, K, 0.0,
                  KQ_K.ctypes.data, C)
        for hi in range(G):
            _advance(chars, ints, floats, R, KQ_K, X, L, decayed_k, gcum, gamma, tail, v, g, beta, u, heads[hi],
                     t0, c, hk * G + hi, C, delta_rule)
    # the groups in reverse: their states recomputed from v_new, then the reverse pass over their chunks
    rows2 = 2 if delta_rule else 1  # W's blocks: linear attention has no Y
    for grp in range(num_groups - 1, -1, -1):
        first = grp * group
        last = min(num_chunks, first + group)
        _copy_states(states[0], checkpoints[grp])
        for n in range(first, last - 1):
            t0 = start + n * C
            c = min(C, start + length - t0)
            _scaled_rows(R, k, t0, c, hk, 1.0, qk_l2norm)
            _copy_states(states[n - first + 1], states[n - first])
            for hi in range(G):
                _advance(chars, ints, floats, R, KQ_K, X, L, decayed_k, gcum, gamma, tail, v, g, beta, u,
                         states[n - first + 1, hi], t0, c, hk * G + hi, C, False)
        for n in range(last - 1, first - 1, -1):
            t0 = start + n * C
            c = min(C, start + length - t0)
            _scaled_rows(R, k, t0, c, hk, 1.0, qk_l2norm)
            _scaled_rows(R[c:], q, t0, c, hk, scale, qk_l2norm)
            _gemm(chars, ints, floats, False, True, 2 * c, c, K, 1.0, R.ctypes.data, K, R.ctypes.data, K, 0.0,
                  KQ_K.ctypes.data, C)
            for i in range(c):
                for j in range(c):
                    dQK[i, j] = 0.0
                    dKK[i, j] = 0.0
            for hi in range(G):
                h = hk * G + hi
                S, dS = states[n - first, hi], d_heads[hi]
                _chunk_decays(g, t0, c, h, gcum, gamma, tail)
                gC = gamma[c - 1]
                for i in range(c):
                    b = beta[t0 + i, h] if delta_rule else 0.0
                    for j in range(i + 1):
                        D[i, j] = _decay(gcum[i] - gcum[j])
                        P[i, j] = KQ_K[c + i, j] * D[i, j]
                        L[i, j] = b * KQ_K[i, j] * D[i, j]
                    for j in range(i + 1, c):
                        P[i, j] = 0.0
                    for d in range(K):
                        decayed_k[i, d] = R[i, d] * tail[i]
                        R2[i, d] = gamma[i] * R[c + i, d]
                        R2[c + i, d] = -b * gamma[i] * R[i, d]
                    for e in range(V):
                        W[i, e] = do[t0 + i, h, e]
                # dv_new = Kd dS1 + P^T do into W[c:], and dKd = v_new dS1^T, while dS holds dS1
                _gemm(chars, ints, floats, False, False, c, V, K, 1.0, decayed_k.ctypes.data, K, dS.ctypes.data, V,
                      0.0, W[c:].ctypes.data, V)
                _gemm(chars, ints, floats, True, False, c, V, c, 1.0, P.ctypes.data, C, W.ctypes.data, V, 1.0,
                      W[c:].ctypes.data, V)
                _gemm(chars, ints, floats, False, True, c, K, V, 1.0, u[t0, h].ctypes.data, ld, dS.ctypes.data, V,
                      0.0, d_decayed_k.ctypes.data, K)
                whole = 0.0
                for d in range(K):
                    for e in range(V):
                        whole += dS[d, e] * S[d, e]
                whole *= gC
                if delta_rule:  # Y = A^-T dv_new: the gradient of beta (v - gamma k S0)
                    _solve_unit_lower(chars, ints, floats, c, V, L.ctypes.data, C, W[c:].ctypes.data, V, True)
                for i in range(c):
                    b = beta[t0 + i, h] if delta_rule else 1.0
                    for e in range(V):
                        dv[t0 + i, h, e] = b * W[c + i, e]
                # dS0 = gamma_C dS1 + [gamma q; -beta gamma k]^T [do; Y], in place
                _gemm(chars, ints, floats, True, False, K, V, rows2 * c, 1.0, R2.ctypes.data, K, W.ctypes.data, V,
                      gC, dS.ctypes.data, V)
                _gemm(chars, ints, floats, False, True, rows2 * c, K, V, 1.0, W.ctypes.data, V, S.ctypes.data, V,
                      0.0, WS.ctypes.data, K)
                _gemm(chars, ints, floats, False, True, rows2 * c, c, V, 1.0, W.ctypes.data, V,
                      u[t0, h].ctypes.data, ld, 0.0, WU.ctypes.data, C)
                for i in range(c):
                    b = beta[t0 + i, h] if delta_rule else 0.0
                    s_q, s_k, ys_k, y_v = 0.0, 0.0, 0.0, 0.0
                    dqi, dki = dq[t0 + i, hk], dk[t0 + i, hk]
                    for d in range(K):
                        dqi[d] += gamma[i] * WS[i, d]
                        s_q += WS[i, d] * R[c + i, d]
                        dki[d] += tail[i] * d_decayed_k[i, d]
                        s_k += d_decayed_k[i, d] * R[i, d]
                    if delta_rule:
                        for d in range(K):
                            dki[d] -= b * gamma[i] * WS[c + i, d]
                            ys_k += WS[c + i, d] * R[i, d]
                        vi = v[t0 + i, h]
                        for e in range(V):
                            y_v += W[c + i, e] * vi[e]
                    suffix[i] = gamma[i] * (s_q - b * ys_k)  # gamma_i's gradient times gamma_i
                    prefix[i] = tail[i] * s_k
                    db = y_v - gamma[i] * ys_k
                    for j in range(i + 1):
                        dP = WU[i, j]
                        dQK[i, j] += dP * D[i, j]
                        pair = dP * P[i, j]
                        if delta_rule and j < i:
                            dL = -WU[c + i, j]
                            db += dL * D[i, j] * KQ_K[i, j]
                            dKK[i, j] += b * dL * D[i, j]
                            pair += dL * L[i, j]
                        P[i, j] = pair  # P is spent: it holds the pairs' gradients now
                    if delta_rule:
                        dbeta[t0 + i, h] = db
                # dg_t: gamma_i's for i >= t, tail_i's for i < t, D_ij's for j < t <= i, gamma_C's
                for j in range(c):
                    below[j] = 0.0
                total_suffix, total_prefix = 0.0, 0.0
                for i in range(c):
                    total_prefix += prefix[i]
                for t in range(c - 1, -1, -1):
                    total_suffix += suffix[t]
                    total_prefix -= prefix[t]
                    pairs = 0.0
                    for j in range(t):
                        below[j] += P[t, j]
                        pairs += below[j]
                    dg[t0 + t, h] = whole + total_suffix + total_prefix + pairs
            # the key head's products, summed over its value heads: dq += dQK k, dk += dQK^T q + (dKK + dKK^T) k
            _gemm(chars, ints, floats, False, False, c, K, c, 1.0, dQK.ctypes.data, C, R.ctypes.data, K, 1.0,
                  dq[t0, hk].ctypes.data, Hk * K)
            _gemm(chars, ints, floats, True, False, c, K, c, 1.0, dQK.ctypes.data, C, R[c:].ctypes.data, K, 1.0,
                  dk[t0, hk].ctypes.data, Hk * K)
            if delta_rule:
                for i in range(c):
                    for j in range(i):
                        dKK[j, i] = dKK[i, j]
                _gemm(chars, ints, floats, False, False, c, K, c, 1.0, dKK.ctypes.data, C, R.ctypes.data, K, 1.0,
                      dk[t0, hk].ctypes.data, Hk * K)
    _mkl_local_threads(threads)


@numba.njit(parallel=True)
def _run_backward(q, k, v, g, beta, do, starts, lengths, state, d_state, u, dq, dk, dv, dg, dbeta, chunk, group,
                  scale, qk_l2norm, delta_rule):
    """_backward_sequence_key_head for every sequence and key head, in parallel on numba's threads. q, k, dq, dk
    [rows, Hk, K]; v, do, u, dv [rows, Hv, V]; g, beta, dg, dbeta [rows, Hv]; state, d_state [N, Hv, K, V]
    (overwritten: d_state ends as the initial state's gradient). All float32, contiguous."""
    Hk = k.shape[1]
    for job in numba.prange(starts.shape[0] * Hk):
        n = job // Hk
        _backward_sequence_key_head(q, k, v, g, beta, do, starts[n], lengths[n], state[n], d_state[n], u, dq, dk,
                                    dv, dg, dbeta, job % Hk, chunk, group, scale, qk_l2norm, delta_rule)


def chunked_backward(q, k, v, g, beta, scale, initial_state, cu_seqlens, do, d_final, use_qk_l2norm=False,
                     chunk_size=None):
    """The gradients of chunked: q, k [B, T, Hk, K]; v [B, T, Hv, V]; g [B, T, Hv]; beta [B, T, Hv] or None (linear
    attention); initial_state None or [N, Hv, K, V]; do (o's gradient) None or [B, T, Hv, V]; d_final (the final
    state's) None or [N, Hv, K, V]. CPU tensors; computed in float32, chunks of chunk_size (default
    BACKWARD_CHUNK_SIZE). Returns float32 dq, dk [B, T, Hk, K] (taken
    back through the scale and the l2 normalisation), dv [B, T, Hv, V], dg [B, T, Hv], dbeta [B, T, Hv] (None for
    linear attention) and the initial state's gradient [N, Hv, K, V]."""
    B, T, Hv, V = v.shape
    Hk, K = k.shape[2:]
    starts, lengths = _sequences(B, T, cu_seqlens)
    shape = (starts.shape[0], Hv, K, V)
    state = start_state(initial_state, shape, torch.float32, "cpu")
    d_state = start_state(d_final, shape, torch.float32, "cpu")
    delta_rule = beta is not None
    v_rows = _rows(v)
    u = np.empty_like(v_rows) if delta_rule else v_rows  # v_new's buffer; linear attention's is v
    do_rows = _rows(do) if do is not None else np.zeros_like(v_rows)
    dq, dk = (torch.zeros(B * T, Hk, K) for _ in range(2))
    dv, dg = torch.empty(B * T, Hv, V), torch.empty(B * T, Hv)
    dbeta = torch.empty(B * T, Hv) if delta_rule else dg  # linear attention writes no dbeta
    _run_backward(_rows(q), _rows(k), v_rows, _rows(g), _rows(beta if delta_rule else g), do_rows, starts.numpy(),
                  lengths.numpy(), state.numpy(), d_state.numpy(), u, dq.numpy(), dk.numpy(), dv.numpy(), dg.numpy(),
                  dbeta.numpy(), chunk_size or BACKWARD_CHUNK_SIZE, STATE_GROUP, scale, use_qk_l2norm, delta_rule)
    dq, dk = dq.view(B, T, Hk, K).mul_(scale), dk.view(B, T, Hk, K)
    if use_qk_l2norm:
        dq, dk = l2norm_backward(q, dq, torch.float32), l2norm_backward(k, dk, torch.float32)
    return (dq, dk, dv.view(B, T, Hv, V), dg.view(B, T, Hv), dbeta.view(B, T, Hv) if delta_rule else None,
            d_state)
