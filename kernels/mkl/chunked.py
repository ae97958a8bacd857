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
For the gated delta rule this is kernels.torch.gated_delta_rule's WY form with A^-1 applied by a triangular solve
to the c x V right-hand side (no w = A^-1 beta gamma k: one product fewer). Linear attention skips the k rows.
A state_dtype other than float32 rounds S to it after every chunk (_store: round to nearest even on the float32
bits, as torch's conversions do); S stays a float32 array holding those values.
"""
import math

import numba
import numpy as np
import torch

from kernels.mkl.packed import _library
from kernels.torch.linear_attention import LOG_DECAY_FLOOR, start_state
from kernels.validate import STATE_ROUNDING

_sgemm = _library().sgemm_ if _library() is not None else None
_strsm = _library().strsm_ if _library() is not None else None
_NO_TRANSPOSE, _TRANSPOSE = ord("N"), ord("T")
# Small chunks: with no copies into a chunk layout, the intra-chunk work (C^2 per token: decay matrices, the
# solve) costs more than the state's products lose on fewer rows. At T = 8192, K = V = 128, 1 thread, chunks of
# 8 to 20 measured the same, 32 10% slower, 64 35% slower (gated delta rule).
CHUNK_SIZE = 16
_FP16_MIN_NORMAL = 2.0 ** -14
_FP16_OVERFLOW = 65520.0  # the midpoint between float16's largest value 65504 and 2^16: from here on, infinity


@numba.njit(inline="always")
def _decay(log_decay):
    """exp(x) for a log decay x <= 0, exactly 0 below LOG_DECAY_FLOOR, as kernels.torch.linear_attention.decay_exp_
    (no subnormal numbers downstream)."""
    return 0.0 if log_decay < LOG_DECAY_FLOOR else math.exp(min(log_decay, 0.0))


@numba.njit(inline="always")
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


@numba.njit(inline="always")
def _solve_unit_lower(chars, ints, floats, m, n, a, lda, b, ldb):
    """B [m, n] = A^-1 B in place for A [m, m] unit lower triangular (only its strict lower triangle is read),
    row-major float32 pointers with row strides. The column-major strsm sees B^T and A^T (upper): X A^T = B^T."""
    chars[0], chars[1], chars[2], chars[3] = ord("R"), ord("U"), _NO_TRANSPOSE, ord("U")
    ints[0], ints[1], ints[2], ints[3] = n, m, lda, ldb
    floats[0] = 1.0
    _strsm(chars[0:].ctypes.data, chars[1:].ctypes.data, chars[2:].ctypes.data, chars[3:].ctypes.data,
           ints[0:].ctypes.data, ints[1:].ctypes.data, floats[0:].ctypes.data, a, ints[2:].ctypes.data, b,
           ints[3:].ctypes.data)


@numba.njit(inline="always")
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


@numba.njit(inline="always")
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
    Hk, K = k.shape[1], k.shape[2]
    Hv, V = v.shape[1], v.shape[2]
    G = Hv // Hk
    C = chunk
    chars = np.empty(4, np.uint8)
    ints = np.empty(6, np.int32)
    floats = np.empty(2, np.float32)
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
                _solve_unit_lower(chars, ints, floats, c, V, L.ctypes.data, C, U.ctypes.data, V)
            _gemm(chars, ints, floats, False, False, c, V, c, 1.0, P.ctypes.data, C, U.ctypes.data, V, 1.0,
                  out[t0, h].ctypes.data, Hv * V)
            for i in range(c):
                factor = _decay(gcum[c - 1] - gcum[i])
                for d in range(K):
                    decayed_k[i, d] = R[i, d] * factor
            _gemm(chars, ints, floats, True, False, K, V, c, 1.0, decayed_k.ctypes.data, K, U.ctypes.data, V,
                  gamma[c - 1], S.ctypes.data, V)
            _store(S, rounding)


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


def chunked(q, k, v, g, beta, scale, initial_state, cu_seqlens, state_dtype, use_qk_l2norm=False, chunk_size=None):
    """q, k [B, T, Hk, K]; v [B, T, Hv, V]; g [B, T, Hv] (log decays); beta [B, T, Hv] for the gated delta rule,
    None for linear attention; initial_state None or [N, Hv, K, V] in state_dtype (float32, bfloat16 or float16:
    the state is rounded to it after every chunk). CPU tensors; computed in float32.
    Returns o [B, T, Hv, V] in v's dtype and the final state [N, Hv, K, V] in state_dtype."""
    B, T, Hv, V = v.shape
    if cu_seqlens is None:
        starts = torch.arange(0, B * T, T, dtype=torch.int64)
        lengths = torch.full((B,), T, dtype=torch.int64)
    else:
        bounds = cu_seqlens.to(torch.int64)
        starts, lengths = bounds[:-1], bounds.diff()
    state = start_state(initial_state, (starts.shape[0], Hv, k.shape[-1], V), torch.float32, "cpu")
    out = torch.empty(B * T, Hv, V, dtype=torch.float32)
    delta_rule = beta is not None  # linear attention passes g in beta's place, its values unused
    _run(_rows(q), _rows(k), _rows(v), _rows(g), _rows(beta if delta_rule else g), starts.numpy(), lengths.numpy(),
         state.numpy(), out.numpy(), chunk_size or CHUNK_SIZE, scale, use_qk_l2norm, delta_rule, STATE_ROUNDING[state_dtype])
    return out.view(B, T, Hv, V).to(v.dtype), state.to(state_dtype)
