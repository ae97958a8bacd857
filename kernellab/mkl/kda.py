"""Kimi Delta Attention on CPU: the gated delta rule's chunked loop of MKL calls (kernellab/mkl/chunked.py) with a
decay per key channel. float64 inputs and the token-by-token mode run the torch backend's code.

Per chunk of c tokens of one sequence and value head, with a = exp(g), gcum [c, K] the chunk's cumulative log decay
of every key channel, D_ijd = exp(gcum_id - gcum_jd) = prod_{j < t <= i} a_td for j <= i and S the state at the
chunk's start:
  L_ij = beta_i sum_d k_id k_jd D_ijd (j < i),  P_ij = sum_d q_id k_jd D_ijd (j <= i)      _pair_products
  [k~; q~] = exp(gcum) * [k; q]                 the keys and queries decayed to the chunk's rows
  [k~ S; q~ S]                                  one GEMM: both reads of the state
  (I + L) u = beta (v - k~ S)                   strsm
  o = q~ S + P u                                GEMM into o's rows where they lie
  S = Diag(exp(gcum_c)) S + (exp(gcum_c - gcum) * k)^T u
Every decay is a running product of a (flushed at the floor), never exp(+gcum): every factor <= 1, as in
kernellab/torch/kda.py, and one exp per token, channel and value head (torch's, vectorised) instead of one per pair.
The pair products factor through the first row r of a block of rows (D_ijd = D_ird D_rjd for j <= r <= i), so
most of them are a GEMM. Unlike the gated delta rule's loop, k k^T and q k^T are not shared by the value heads of
a key head: the decays are per value head.
"""
import math

import numba
import numpy as np
import torch

from kernellab import serving
from kernellab.mkl.chunked import (BACKWARD_CHUNK_SIZE, CHUNK_SIZE, STATE_GROUP, _blas_scratch, _copy_states, _gemm,
                                   _heads, _mkl_local_threads, _rows, _scaled_rows, _sequences, _solve_unit_lower,
                                   _store, serving_loop)
from kernellab.torch import kda as torch_kda
from kernellab.torch.linear_attention import LOG_DECAY_FLOOR, chunk_states_multiple, l2norm_backward, start_state
from kernellab.validate import STATE_ROUNDING

_FLOOR_DECAY = np.float32(math.exp(LOG_DECAY_FLOOR))
# Rows of a chunk whose pairs with the keys before them are one GEMM (_pair_products): 4 of a chunk of 16 leave
# 28 of its 136 pairs to the per-pair products.
_PAIR_BLOCK = 4
_ZERO = np.float32(0.0)  # float32 sums and selects: the loops vectorise on float32 lanes


@numba.njit
def _flushed(x):
    """x (a product of decays) as a decay past LOG_DECAY_FLOOR: 0 below exp(LOG_DECAY_FLOOR), as _decay gives."""
    return x if x >= _FLOOR_DECAY else _ZERO


@numba.njit(fastmath=True)
def _chunk_decays(a, t0, c, h, gamma, tail):
    """gamma [c, K] = exp(gcum) and tail [c, K] = exp(gcum_c - gcum) of the chunk at rows t0 .. t0 + c and value
    head h, as running products of a = exp(g) [rows, Hv, K] (g clamped at LOG_DECAY_FLOOR - 1: no subnormals),
    each flushed at the floor."""
    K = a.shape[2]
    for d in range(K):
        gamma[0, d] = _flushed(a[t0, h, d])
        tail[c - 1, d] = 1.0
    for i in range(1, c):
        for d in range(K):
            gamma[i, d] = _flushed(gamma[i - 1, d] * a[t0 + i, h, d])
            tail[c - 1 - i, d] = _flushed(tail[c - i, d] * a[t0 + c - i, h, d])


@numba.njit(fastmath=True)
def _decayed_block(a, t0, h, r, n, left, right, keys, rows, row_decay, decayed_keys, key_decay, run):
    """A block of _PAIR_BLOCK rows from r of the pair products (_pair_products): rows [2 n, K] = [left; right]
    decayed back to r by row_decay [n, K] (prod over r < t <= i of a_t), decayed_keys [r + 1, K] = keys forward to
    r by key_decay (prod over j < t <= r), running products of a = exp(g) [rows, Hv, K] flushed at the floor."""
    K = a.shape[2]
    for d in range(K):
        run[d] = 1.0
    for m in range(n):
        for d in range(K):
            if m > 0:
                run[d] = _flushed(run[d] * a[t0 + r + m, h, d])
            row_decay[m, d] = run[d]
            rows[m, d] = left[r + m, d] * run[d]
            rows[n + m, d] = right[r + m, d] * run[d]
    for d in range(K):
        run[d] = 1.0
    for j in range(r, -1, -1):
        for d in range(K):
            key_decay[j, d] = run[d]
            decayed_keys[j, d] = keys[j, d] * run[d]
            run[d] = _flushed(run[d] * a[t0 + j, h, d])


@numba.njit(fastmath=True)
def _pair_products(blas, a, t0, c, h, left, right, keys, pairs, scratch):
    """pairs[i, j] = sum_d left_id keys_jd D_ijd for j <= i (0 above), right likewise into pairs[c + i, j], with
    D_ijd = exp(gcum_id - gcum_jd) = prod_{j < t <= i} a_td (a = exp(g) [rows, Hv, K], the chunk's rows t0 ..
    t0 + c, value head h): running products, no exp. Rows in blocks of _PAIR_BLOCK from r: D_ijd = D_ijd' D_rjd
    with D_ird' over r < t <= i (every factor <= 1), so the pairs j <= r are one GEMM [2 n, K] x [K, r + 1] of
    the decayed rows and keys; the pairs r < j <= i (a triangle of the block) run the products per pair.
    left, right, keys [c, K]; pairs [2 C, C]; blas: _blas_scratch(); scratch: _pair_scratch(C, K)."""
    chars, ints, floats = blas
    decayed_keys, key_decay, rows, row_decay, block, run = scratch
    K = a.shape[2]
    for i in range(c):
        for j in range(i + 1, c):
            pairs[i, j] = 0.0
            pairs[c + i, j] = 0.0
    for r in range(0, c, _PAIR_BLOCK):
        n = min(_PAIR_BLOCK, c - r)
        if r > 0:  # the block's rows decayed back to r, the keys j <= r forward to r
            _decayed_block(a, t0, h, r, n, left, right, keys, rows, row_decay, decayed_keys, key_decay, run)
            _gemm(chars, ints, floats, False, True, 2 * n, r + 1, K, 1.0, rows.ctypes.data, K,
                  decayed_keys.ctypes.data, K, 0.0, block.ctypes.data, block.shape[1])
            for m in range(n):
                for j in range(r + 1):
                    pairs[r + m, j] = block[m, j]
                    pairs[c + r + m, j] = block[n + m, j]
        low = r + 1 if r > 0 else 0
        for i in range(r, r + n):
            for d in range(K):
                run[d] = 1.0
            for j in range(i, low - 1, -1):
                x = _ZERO
                y = _ZERO
                for d in range(K):
                    decayed = keys[j, d] * run[d]
                    x += left[i, d] * decayed
                    y += right[i, d] * decayed
                    run[d] = _flushed(run[d] * a[t0 + j, h, d])
                pairs[i, j] = x
                pairs[c + i, j] = y


@numba.njit
def _pair_scratch(C, K):
    """_pair_products' scratch: _decayed_block's decayed keys and their decays [C, K], decayed rows
    [2 _PAIR_BLOCK, K] and their decays [_PAIR_BLOCK, K], the GEMM's block [2 _PAIR_BLOCK, C], a running product
    [K]."""
    return (np.empty((C, K), np.float32), np.empty((C, K), np.float32), np.empty((2 * _PAIR_BLOCK, K), np.float32),
            np.empty((_PAIR_BLOCK, K), np.float32), np.empty((2 * _PAIR_BLOCK, C), np.float32),
            np.empty(K, np.float32))


@numba.njit(fastmath=True)
def _sequence_key_head(q, k, v, a, beta, start, length, state, out, hk, chunk, scale, qk_l2norm, rounding):
    """One sequence (rows start .. start + length) and key head hk with its value heads, chunk after chunk.
    q, k [rows, Hk, K]; v, out [rows, Hv, V]; a = exp(g) [rows, Hv, K]; beta [rows, Hv]; state [Hv, K, V]: the
    sequence's, updated in place (and _store-d with `rounding` after every chunk)."""
    Hk, K, Hv, V, G = _heads(k, v)
    C = chunk
    threads = _mkl_local_threads(1)
    chars, ints, floats = _blas_scratch()
    R = np.empty((2 * C, K), np.float32)  # [k; q] (q scaled)
    Rd = np.empty((2 * C, K), np.float32)  # [k~; q~]: decayed to their rows
    X = np.empty((2 * C, V), np.float32)  # [k~ S; q~ S]
    U = np.empty((C, V), np.float32)  # v_new
    KQ_K = np.empty((2 * C, C), np.float32)  # [k k^T; q k^T] with D
    decayed_k = np.empty((C, K), np.float32)
    gamma = np.empty((C, K), np.float32)
    tail = np.empty((C, K), np.float32)
    scratch = _pair_scratch(C, K)
    for t0 in range(start, start + length, C):
        c = min(C, start + length - t0)
        _scaled_rows(R, k, t0, c, hk, 1.0, qk_l2norm)
        _scaled_rows(R[c:], q, t0, c, hk, scale, qk_l2norm)
        for h in range(hk * G, hk * G + G):
            S = state[h]
            _chunk_decays(a, t0, c, h, gamma, tail)
            _pair_products((chars, ints, floats), a, t0, c, h, R, R[c:], R, KQ_K, scratch)
            for i in range(c):
                b = beta[t0 + i, h]
                for d in range(K):
                    Rd[i, d] = R[i, d] * gamma[i, d]
                    Rd[c + i, d] = R[c + i, d] * gamma[i, d]
                    decayed_k[i, d] = R[i, d] * tail[i, d]
                for j in range(i):
                    KQ_K[i, j] *= b
            _gemm(chars, ints, floats, False, False, 2 * c, V, K, 1.0, Rd.ctypes.data, K, S.ctypes.data, V, 0.0,
                  X.ctypes.data, V)
            for i in range(c):
                vi, oi, b = v[t0 + i, h], out[t0 + i, h], beta[t0 + i, h]
                for e in range(V):
                    oi[e] = X[c + i, e]
                    U[i, e] = b * (vi[e] - X[i, e])
            _solve_unit_lower(chars, ints, floats, c, V, KQ_K.ctypes.data, C, U.ctypes.data, V, False)
            _gemm(chars, ints, floats, False, False, c, V, c, 1.0, KQ_K[c:].ctypes.data, C, U.ctypes.data, V, 1.0,
                  out[t0, h].ctypes.data, Hv * V)
            for d in range(K):  # the state's rows decay each by its channel's chunk decay
                last = gamma[c - 1, d]
                for e in range(V):
                    S[d, e] *= last
            _gemm(chars, ints, floats, True, False, K, V, c, 1.0, decayed_k.ctypes.data, K, U.ctypes.data, V, 1.0,
                  S.ctypes.data, V)
            _store(S, rounding)
    _mkl_local_threads(threads)


@numba.njit(parallel=True)
def _run(q, k, v, a, beta, starts, lengths, state, out, chunk, scale, qk_l2norm, rounding):
    """kernellab.mkl.chunked._run's layout with a = exp(g) [rows, Hv, K]: sequences and key heads in parallel."""
    Hk = k.shape[1]
    for job in numba.prange(starts.shape[0] * Hk):
        n = job // Hk
        _sequence_key_head(q, k, v, a, beta, starts[n], lengths[n], state[n], out, job % Hk, chunk, scale,
                           qk_l2norm, rounding)


def kda(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens, mode, state_dtype,
        chunk_size=None, state_indices=None, output_state_indices=None, output_intermediate_states=False,
        chunk_states_every=None, A_log=None, dt_bias=None, beta_logits=False):
    """As kernellab.torch.kda.kda: q, k [B, T, Hk, K]; v [B, T, Hv, V]; g [B, T, Hv, K]; beta [B, T, Hv];
    initial_state None or [N, Hv, K, V] in state_dtype (a pool [P, Hv, K, V] with state_indices). Returns o
    [B, T, Hv, V] in v's dtype and the final state [N, Hv, K, V] in state_dtype or None, and a StateTrace with a
    trace. chunk_size: default kernellab.mkl.chunked's (16). The serving keywords as the gated delta rule's (mkl)."""
    if mode != "chunk" or v.dtype == torch.float64 or output_intermediate_states:
        return torch_kda.kda(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens,
                             mode, state_dtype, chunk_size, state_indices, output_state_indices,
                             output_intermediate_states, chunk_states_every, A_log, dt_bias, beta_logits)
    g, beta = serving.gates(g, beta, A_log, dt_bias, beta_logits, torch.float32)
    B, T, Hv, V = v.shape

    def run(tokens, bounds, s0):
        q, k, v, g, beta = tokens.values()
        starts, lengths = _sequences(*v.shape[:2], bounds)
        state = start_state(s0, (starts.shape[0], Hv, k.shape[-1], V), torch.float32, "cpu")
        out = torch.empty(v.shape[0] * v.shape[1], Hv, V, dtype=torch.float32)
        _run(_rows(q), _rows(k), _rows(v), _rows(g.clamp(min=LOG_DECAY_FLOOR - 1).exp_()), _rows(beta), starts.numpy(), lengths.numpy(), state.numpy(),
             out.numpy(), chunk_size or CHUNK_SIZE, scale, use_qk_l2norm, STATE_ROUNDING[state_dtype])
        return out.view(*v.shape).to(v.dtype), state.to(state_dtype)

    loop = serving_loop(run, dict(q=q, k=k, v=v, g=g, beta=beta), B, T, cu_seqlens)
    return serving.serve(loop, "mkl", chunk_states_multiple("chunk", chunk_size or CHUNK_SIZE), B, T, initial_state,
                         output_final_state, cu_seqlens, state_dtype, state_indices, output_state_indices,
                         output_intermediate_states, chunk_states_every)


# ------------------------------------------------------------------------------------------------ backward
#
# The gated delta rule's backward loop (kernellab/mkl/chunked.py: _backward_sequence_key_head, its comment) with
# the decays per key channel. Per chunk and value head, with W = [do; Y] (Y = A^-T dv_new):
#   dv_new = Kd dS1 + P^T do            dKd = v_new dS1^T            dS0 = Diag(gamma_C) dS1 + [gamma q; -beta gamma k]^T W
#   W S0^T = [do S0^T; Y S0^T]          W v_new^T = [dP; -dL]
# and the pair products' backward (_pair_gradients) per value head: their decays are its own. The forward pass
# keeps v_new, the pair products of every chunk and the state at every STATE_GROUP chunks' start; the groups in
# reverse recompute their states from them (one GEMM a chunk).


@numba.njit(fastmath=True)
def _pair_gradients(blas, a, t0, c, h, left, right, keys, dpairs, dleft, dright, dkeys, dg, scratch):
    """The backward of _pair_products (its arguments; pairs[i, j] = sum_d left_id keys_jd D_ijd and
    pairs[c + i, j] the same with right) from dpairs [2 C, C] (read at j <= i): adds to dleft, dright, dkeys and
    dg [C, K] (g's gradient through D: sum over the pairs j < t <= i of the pair's term per channel, P_ijd =
    (dpairs_ij left_id + dpairs_(c+i)j right_id) keys_jd D_ijd). The blocks of _pair_products: with D_ij =
    D_ir D_rj, the pairs j <= r of a block are two GEMMs, Z = M Kd (M: the block's rows of dpairs, Kd the keys
    decayed to r) for dleft and dright, M^T [left; right]_decayed for dkeys; their terms of dg come from the same
    products (sum over i of P_ijd = that GEMM's row j times Kd_j; sum over j <= r = Z_i times the decayed row i).
    The triangle r < j <= i of a block runs per pair. scratch: _pair_gradient_scratch(C, K)."""
    chars, ints, floats = blas
    (decayed_keys, key_decay, rows, row_decay, M, run), (Z, Wk, spans, acc) = scratch
    K = a.shape[2]
    for r in range(0, c, _PAIR_BLOCK):
        n = min(_PAIR_BLOCK, c - r)
        _decayed_block(a, t0, h, r, n, left, right, keys, rows, row_decay, decayed_keys, key_decay, run)
        for m in range(n):
            for j in range(r + 1):
                M[m, j] = dpairs[r + m, j]
                M[n + m, j] = dpairs[c + r + m, j]
        C = M.shape[1]
        _gemm(chars, ints, floats, False, False, 2 * n, K, r + 1, 1.0, M.ctypes.data, C, decayed_keys.ctypes.data,
              K, 0.0, Z.ctypes.data, K)
        _gemm(chars, ints, floats, True, False, r + 1, K, 2 * n, 1.0, M.ctypes.data, C, rows.ctypes.data, K, 0.0,
              Wk.ctypes.data, K)
        for d in range(K):
            acc[d] = 0.0
        for m in range(n - 1, -1, -1):
            for d in range(K):
                dleft[r + m, d] += Z[m, d] * row_decay[m, d]
                dright[r + m, d] += Z[n + m, d] * row_decay[m, d]
                if m > 0:  # the pairs j <= r of rows i >= t span t in (r, i]
                    acc[d] += rows[m, d] * Z[m, d] + rows[n + m, d] * Z[n + m, d]
                    dg[r + m, d] += acc[d]
        for d in range(K):
            acc[d] = 0.0
        for j in range(r + 1):
            for d in range(K):
                dkeys[j, d] += Wk[j, d] * key_decay[j, d]
                if j < r:  # the pairs of key j span t in (j, r] (and on to each row: above)
                    acc[d] += Wk[j, d] * decayed_keys[j, d]
                    dg[j + 1, d] += acc[d]
        for i in range(r + 1, r + n):
            for d in range(K):
                run[d] = 1.0
            dl_row, dr_row = dpairs[i], dpairs[c + i]
            for j in range(i, r, -1):
                dl, dr = dl_row[j], dr_row[j]
                for d in range(K):
                    decay = run[d]
                    decayed = keys[j, d] * decay
                    term = dl * left[i, d] + dr * right[i, d]
                    dleft[i, d] += dl * decayed
                    dright[i, d] += dr * decayed
                    dkeys[j, d] += term * decay
                    spans[j - r, d] = term * decayed
                    run[d] = _flushed(decay * a[t0 + j, h, d])
            for d in range(K):
                acc[d] = 0.0
            for j in range(r + 1, i):
                for d in range(K):
                    acc[d] += spans[j - r, d]
                    dg[j + 1, d] += acc[d]


@numba.njit
def _pair_gradient_scratch(C, K):
    """_pair_gradients' scratch: _pair_scratch(C, K) (its block: the block's rows of dpairs), the GEMMs' products
    [2 _PAIR_BLOCK, K] and [C, K], the triangle's terms [_PAIR_BLOCK, K], a vector [K]."""
    return (_pair_scratch(C, K), (np.empty((2 * _PAIR_BLOCK, K), np.float32), np.empty((C, K), np.float32),
                                  np.empty((_PAIR_BLOCK, K), np.float32), np.empty(K, np.float32)))


@numba.njit(fastmath=True)
def _advance(chars, ints, floats, R, tail, last, u, S, t0, c, h, rounding, decayed_k):
    """S = Diag(last) S + (tail k)^T v_new in place (R[:c] the chunk's keys, u's rows t0 .. t0 + c of head h its
    v_new), rounded as the forward's. decayed_k [C, K]: scratch (the caller's: no allocation per chunk)."""
    K, V, ld = S.shape[0], S.shape[1], u.shape[1] * u.shape[2]
    for i in range(c):
        for d in range(K):
            decayed_k[i, d] = R[i, d] * tail[i, d]
    for d in range(K):
        for e in range(V):
            S[d, e] *= last[d]
    _gemm(chars, ints, floats, True, False, K, V, c, 1.0, decayed_k.ctypes.data, K, u[t0, h].ctypes.data, ld, 1.0,
          S.ctypes.data, V)
    _store(S, rounding)


@numba.njit(fastmath=True)
def _backward_sequence_key_head(q, k, v, a, beta, do, start, length, state, d_state, u, dq, dk, dv, dg, dbeta, hk,
                                chunk, group, scale, qk_l2norm, rounding):
    """The gradients of one sequence (rows start .. start + length) and key head hk with its value heads (the
    layout of kernellab.mkl.chunked's, a = exp(g) [rows, Hv, K], dg [rows, Hv, K]). state [Hv, K, V]: the
    sequence's initial state (overwritten); d_state: its final state's gradient, replaced by its initial
    state's; u [rows, Hv, V]: v_new's buffer. dq, dk (zeros on entry: the value heads add to them) of the scaled,
    l2-normalised q and k."""
    threads = _mkl_local_threads(1)
    Hk, K, Hv, V, G = _heads(k, v)
    C = chunk
    ld = Hv * V  # the row stride of u, v, do, dv
    num_chunks = (length + C - 1) // C
    num_groups = (num_chunks + group - 1) // group
    blas = _blas_scratch()
    chars, ints, floats = blas
    R = np.empty((2 * C, K), np.float32)  # [k; q]
    pairs = np.empty((num_chunks, G, 2 * C, C), np.float32)  # [k k^T; q k^T] with D, every chunk's
    L = np.empty((C, C), np.float32)  # the WY matrix's strict lower triangle
    X = np.empty((C, V), np.float32)  # (gamma k) S (the forward pass's)
    W = np.empty((2 * C, V), np.float32)  # [do; Y]
    R2 = np.empty((2 * C, K), np.float32)  # [gamma q; -beta gamma k]
    WS = np.empty((2 * C, K), np.float32)  # W S^T
    WU = np.empty((2 * C, C), np.float32)  # W v_new^T
    dP = np.empty((2 * C, C), np.float32)  # [dKK; dQK]
    decayed_k = np.empty((C, K), np.float32)
    d_decayed_k = np.empty((C, K), np.float32)
    dleft = np.empty((C, K), np.float32)  # the pair products' gradients: of k as rows, q as rows, k as keys
    dright = np.empty((C, K), np.float32)
    dkeys = np.empty((C, K), np.float32)
    dgp = np.empty((C, K), np.float32)  # and of g through their decays
    suffix = np.empty((C, K), np.float32)
    gamma = np.empty((C, K), np.float32)
    tail = np.empty((C, K), np.float32)
    whole = np.empty(K, np.float32)
    running = np.empty(K, np.float32)
    scratch = _pair_scratch(C, K)
    gradient_scratch = _pair_gradient_scratch(C, K)
    checkpoints = np.empty((num_groups, G, K, V), np.float32)
    states = np.empty((group, G, K, V), np.float32)
    heads = state[hk * G:hk * G + G]
    d_heads = d_state[hk * G:hk * G + G]
    # the forward pass: v_new into u, the pair products, the state at every group's start
    for n in range(num_chunks):
        t0 = start + n * C
        c = min(C, start + length - t0)
        if n % group == 0:
            _copy_states(checkpoints[n // group], heads)
        _scaled_rows(R, k, t0, c, hk, 1.0, qk_l2norm)
        _scaled_rows(R[c:], q, t0, c, hk, scale, qk_l2norm)
        for hi in range(G):
            h = hk * G + hi
            S = heads[hi]
            _chunk_decays(a, t0, c, h, gamma, tail)
            _pair_products(blas, a, t0, c, h, R, R[c:], R, pairs[n, hi], scratch)
            for i in range(c):
                b = beta[t0 + i, h]
                for d in range(K):
                    decayed_k[i, d] = R[i, d] * gamma[i, d]
                for j in range(i):
                    L[i, j] = b * pairs[n, hi, i, j]
            _gemm(chars, ints, floats, False, False, c, V, K, 1.0, decayed_k.ctypes.data, K, S.ctypes.data, V, 0.0,
                  X.ctypes.data, V)
            for i in range(c):
                vi, ui, b = v[t0 + i, h], u[t0 + i, h], beta[t0 + i, h]
                for e in range(V):
                    ui[e] = b * (vi[e] - X[i, e])
            _solve_unit_lower(chars, ints, floats, c, V, L.ctypes.data, C, u[t0, h].ctypes.data, ld, False)
            _advance(chars, ints, floats, R, tail, gamma[c - 1], u, S, t0, c, h, rounding, decayed_k)
    # the groups in reverse: their states recomputed from v_new, then the reverse pass over their chunks
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
                _chunk_decays(a, t0, c, hk * G + hi, gamma, tail)
                _advance(chars, ints, floats, R, tail, gamma[c - 1], u, states[n - first + 1, hi], t0, c,
                         hk * G + hi, rounding, decayed_k)
        for n in range(last - 1, first - 1, -1):
            t0 = start + n * C
            c = min(C, start + length - t0)
            _scaled_rows(R, k, t0, c, hk, 1.0, qk_l2norm)
            _scaled_rows(R[c:], q, t0, c, hk, scale, qk_l2norm)
            for hi in range(G):
                h = hk * G + hi
                S, dS, KQ_K = states[n - first, hi], d_heads[hi], pairs[n, hi]
                _chunk_decays(a, t0, c, h, gamma, tail)
                for i in range(c):
                    b = beta[t0 + i, h]
                    for j in range(i):
                        L[i, j] = b * KQ_K[i, j]
                    for d in range(K):
                        decayed_k[i, d] = R[i, d] * tail[i, d]
                        R2[i, d] = gamma[i, d] * R[c + i, d]
                        R2[c + i, d] = -b * gamma[i, d] * R[i, d]
                    for e in range(V):
                        W[i, e] = do[t0 + i, h, e]
                # dv_new = Kd dS1 + P^T do into W[c:], and dKd = v_new dS1^T, while dS holds dS1
                _gemm(chars, ints, floats, False, False, c, V, K, 1.0, decayed_k.ctypes.data, K, dS.ctypes.data, V,
                      0.0, W[c:].ctypes.data, V)
                _gemm(chars, ints, floats, True, False, c, V, c, 1.0, KQ_K[c:].ctypes.data, C, W.ctypes.data, V,
                      1.0, W[c:].ctypes.data, V)
                _gemm(chars, ints, floats, False, True, c, K, V, 1.0, u[t0, h].ctypes.data, ld, dS.ctypes.data, V,
                      0.0, d_decayed_k.ctypes.data, K)
                for d in range(K):
                    total = _ZERO
                    for e in range(V):
                        total += dS[d, e] * S[d, e]
                    whole[d] = total * gamma[c - 1, d]
                    for e in range(V):
                        dS[d, e] *= gamma[c - 1, d]
                _solve_unit_lower(chars, ints, floats, c, V, L.ctypes.data, C, W[c:].ctypes.data, V, True)
                for i in range(c):
                    b = beta[t0 + i, h]
                    for e in range(V):
                        dv[t0 + i, h, e] = b * W[c + i, e]
                # dS0 = Diag(gamma_C) dS1 + [gamma q; -beta gamma k]^T [do; Y], in place
                _gemm(chars, ints, floats, True, False, K, V, 2 * c, 1.0, R2.ctypes.data, K, W.ctypes.data, V,
                      1.0, dS.ctypes.data, V)
                _gemm(chars, ints, floats, False, True, 2 * c, K, V, 1.0, W.ctypes.data, V, S.ctypes.data, V,
                      0.0, WS.ctypes.data, K)
                _gemm(chars, ints, floats, False, True, 2 * c, c, V, 1.0, W.ctypes.data, V,
                      u[t0, h].ctypes.data, ld, 0.0, WU.ctypes.data, C)
                for i in range(c):
                    b = beta[t0 + i, h]
                    dqi, dki, vi = dq[t0 + i, hk], dk[t0 + i, hk], v[t0 + i, h]
                    db = _ZERO
                    for e in range(V):
                        db += W[c + i, e] * vi[e]
                    for d in range(K):
                        ys = WS[c + i, d]
                        dqi[d] += gamma[i, d] * WS[i, d]
                        dki[d] += tail[i, d] * d_decayed_k[i, d] - b * gamma[i, d] * ys
                        db -= gamma[i, d] * R[i, d] * ys
                        # gamma_i's gradient times gamma_i; tail_i's times tail_i
                        suffix[i, d] = gamma[i, d] * (R[c + i, d] * WS[i, d] - b * R[i, d] * ys)
                        dgp[i, d] = _ZERO
                        dleft[i, d] = _ZERO
                        dright[i, d] = _ZERO
                        dkeys[i, d] = _ZERO
                    for j in range(i):
                        dL = -WU[c + i, j]
                        db += dL * KQ_K[i, j]
                        dP[i, j] = b * dL
                        dP[c + i, j] = WU[i, j]
                    dP[i, i] = _ZERO  # k k^T's diagonal is not in L
                    dP[c + i, i] = WU[i, i]
                    dbeta[t0 + i, h] = db
                _pair_gradients(blas, a, t0, c, h, R, R[c:], R, dP, dleft, dright, dkeys, dgp, gradient_scratch)
                # dg_t: gamma_i's for i >= t, tail_i's for i < t, D_ij's for j < t <= i, gamma_C's for every t
                for i in range(c - 2, -1, -1):
                    for d in range(K):
                        suffix[i, d] += suffix[i + 1, d]
                for d in range(K):
                    running[d] = _ZERO
                for t in range(c):
                    dqi, dki, dgt = dq[t0 + t, hk], dk[t0 + t, hk], dg[t0 + t, h]
                    for d in range(K):
                        dqi[d] += dright[t, d]
                        dki[d] += dleft[t, d] + dkeys[t, d]
                        dgt[d] = whole[d] + suffix[t, d] + running[d] + dgp[t, d]
                        running[d] += tail[t, d] * R[t, d] * d_decayed_k[t, d]
    _mkl_local_threads(threads)


@numba.njit(parallel=True)
def _run_backward(q, k, v, a, beta, do, starts, lengths, state, d_state, u, dq, dk, dv, dg, dbeta, chunk, group,
                  scale, qk_l2norm, rounding):
    """_backward_sequence_key_head for every sequence and key head, in parallel on numba's threads."""
    Hk = k.shape[1]
    for job in numba.prange(starts.shape[0] * Hk):
        n = job // Hk
        _backward_sequence_key_head(q, k, v, a, beta, do, starts[n], lengths[n], state[n], d_state[n], u, dq, dk,
                                    dv, dg, dbeta, job % Hk, chunk, group, scale, qk_l2norm, rounding)


def kda_backward(grads, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens, mode,
                 state_dtype, chunk_size=None):
    """The gradients of kda (kernellab.autograd's contract; whatever the forward's mode: the same function):
    grads {"o": [B, T, Hv, V] or None, "final_state": [N, Hv, K, V] or None}. float32 by _run_backward (chunks of
    chunk_size, default BACKWARD_CHUNK_SIZE), float64 by the torch backend's. Returns kernellab.torch.kda.kda_backward's
    dict."""
    if v.dtype == torch.float64:
        return torch_kda.kda_backward(grads, q, k, v, g, beta, scale, initial_state, output_final_state,
                                      use_qk_l2norm, cu_seqlens, mode, state_dtype, chunk_size)
    B, T, Hv, V = v.shape
    Hk, K = k.shape[2:]
    starts, lengths = _sequences(B, T, cu_seqlens)
    shape = (starts.shape[0], Hv, K, V)
    state = start_state(initial_state, shape, torch.float32, "cpu")
    d_state = start_state(grads["final_state"], shape, torch.float32, "cpu")
    v_rows = _rows(v)
    do_rows = _rows(grads["o"]) if grads["o"] is not None else np.zeros_like(v_rows)
    dq, dk = (torch.zeros(B * T, Hk, K) for _ in range(2))
    dv, dg, dbeta = torch.empty(B * T, Hv, V), torch.empty(B * T, Hv, K), torch.empty(B * T, Hv)
    a = g.to(torch.float32).clamp(min=LOG_DECAY_FLOOR - 1).exp_()  # the forward's decays
    _run_backward(_rows(q), _rows(k), v_rows, _rows(a), _rows(beta), do_rows, starts.numpy(), lengths.numpy(),
                  state.numpy(), d_state.numpy(), np.empty_like(v_rows), dq.numpy(), dk.numpy(), dv.numpy(),
                  dg.numpy(), dbeta.numpy(), chunk_size or BACKWARD_CHUNK_SIZE, STATE_GROUP, scale, use_qk_l2norm,
                  STATE_ROUNDING[state_dtype])
    dq, dk = dq.view(B, T, Hk, K).mul_(scale), dk.view(B, T, Hk, K)
    if use_qk_l2norm:
        dq, dk = l2norm_backward(q, dq, torch.float32), l2norm_backward(k, dk, torch.float32)
    return dict(q=dq, k=dk, v=dv.view(B, T, Hv, V), g=dg.view(B, T, Hv, K), beta=dbeta.view(B, T, Hv),
                initial_state=None if initial_state is None else d_state)
