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
from kernellab.mkl.chunked import (CHUNK_SIZE, _blas_scratch, _gemm, _heads, _mkl_local_threads, _rows,
                                   _scaled_rows, _sequences, _solve_unit_lower, _store, serving_loop)
from kernellab.torch import kda as torch_kda
from kernellab.torch.linear_attention import LOG_DECAY_FLOOR, chunk_states_multiple, start_state
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
def _pair_products(blas, a, t0, c, h, left, right, keys, pairs, scratch):
    """pairs[i, j] = sum_d left_id keys_jd D_ijd for j <= i (0 above), right likewise into pairs[c + i, j], with
    D_ijd = exp(gcum_id - gcum_jd) = prod_{j < t <= i} a_td (a = exp(g) [rows, Hv, K], the chunk's rows t0 ..
    t0 + c, value head h): running products, no exp. Rows in blocks of _PAIR_BLOCK from r: D_ijd = D_ijd' D_rjd
    with D_ird' over r < t <= i (every factor <= 1), so the pairs j <= r are one GEMM [2 n, K] x [K, r + 1] of
    the decayed rows and keys; the pairs r < j <= i (a triangle of the block) run the products per pair.
    left, right, keys [c, K]; pairs [2 C, C]; blas: _blas_scratch(); scratch: _pair_scratch(C, K)."""
    chars, ints, floats = blas
    decayed_keys, rows, block, run = scratch
    K = a.shape[2]
    for i in range(c):
        for j in range(i + 1, c):
            pairs[i, j] = 0.0
            pairs[c + i, j] = 0.0
    for r in range(0, c, _PAIR_BLOCK):
        n = min(_PAIR_BLOCK, c - r)
        if r > 0:  # the block's rows decayed back to r, the keys j <= r forward to r
            for d in range(K):
                run[d] = 1.0
            for m in range(n):
                for d in range(K):
                    if m > 0:
                        run[d] = _flushed(run[d] * a[t0 + r + m, h, d])
                    rows[m, d] = left[r + m, d] * run[d]
                    rows[n + m, d] = right[r + m, d] * run[d]
            for d in range(K):
                run[d] = 1.0
            for j in range(r, -1, -1):
                for d in range(K):
                    decayed_keys[j, d] = keys[j, d] * run[d]
                    run[d] = _flushed(run[d] * a[t0 + j, h, d])
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
    """_pair_products' scratch: decayed keys [C, K], decayed rows [2 _PAIR_BLOCK, K], the GEMM's block
    [2 _PAIR_BLOCK, C], a running product [K]."""
    return (np.empty((C, K), np.float32), np.empty((2 * _PAIR_BLOCK, K), np.float32),
            np.empty((2 * _PAIR_BLOCK, C), np.float32), np.empty(K, np.float32))


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
# The chunked backward as explicit products (no autograd graph), group by group as
# kernellab.torch.kda.chunked_backward walks them (that function is the driver; this file gives it group_backward
# and the states of its first pass: group_state). Per group, the state-free terms of every chunk at once
# (kernellab.torch.kda.chunk_terms, its pair products by _pair_terms), then two loops of batched MKL GEMMs
# (torch.bmm) over its chunks, the only sequential work: forward, the state at each chunk's start S0 and v_new =
# u - w S0; backward, from the gradient dS1 of the state at the chunk's end,
#   dv_new = A_qk^T do + kd dS1,   dS0 = exp(gcum_C) dS1 + (gamma q)^T do - w^T dv_new      (kd = tail k).
# The rest of the gradients for all the group's chunks at once, as the Triton backward (kernellab/triton/kda.py)
# states them: dA_qk = lower(do v_new^T), dw = -dv_new S0^T, the WY form's backward through A^-1, and the decayed
# pair products' backward (_pair_gradients: per pair, with D as running products of a = exp(g), never a
# [C, C, K] tensor), g's gradient summed per token over the pairs each decay spans (no difference of cumulative
# sums: it cancels in float32).

def _reverse_cumsum(x, dim):
    return x.flip(dim).cumsum(dim).flip(dim)


def _token_decays(g):
    """a = exp(g) [NC N Hk G, C, K] from g [NC, N, Hk, G, C, K], clamped as the forward's (no subnormals)."""
    return g.clamp(min=LOG_DECAY_FLOOR - 1).exp().reshape(-1, *g.shape[-2:]).contiguous()


def _key_rows(x):
    """q or k [NC, N, Hk, C, K] as [NC N Hk, C, K], contiguous."""
    return x.reshape(-1, *x.shape[-2:]).contiguous()


@numba.njit(parallel=True, fastmath=True)
def _pair_terms_loop(q, k, a, attn, kk):
    """attn_ij = sum_d q_id k_jd D_ijd and kk_ij likewise with k_i, j <= i (0 above), D_ijd = prod_{j < t <= i}
    a_td as a running product (flushed at the floor), per chunk and value head: q, k [L, C, K] (chunks x sequences
    x key heads); a [L G, C, K]; attn, kk [L G, C, C]."""
    M, C, K = a.shape
    G = M // q.shape[0]
    for m in numba.prange(M):
        x = m // G
        run = np.empty(K, a.dtype)
        for i in range(C):
            run[:] = 1.0
            for j in range(i, -1, -1):
                s = attn[m, i, j] * 0  # the inputs' dtype
                t = s
                for d in range(K):
                    decayed = k[x, j, d] * run[d]
                    s += q[x, i, d] * decayed
                    t += k[x, i, d] * decayed
                    run[d] = _flushed(run[d] * a[m, j, d])
                attn[m, i, j] = s
                kk[m, i, j] = t
            for j in range(i + 1, C):
                attn[m, i, j] = 0.0
                kk[m, i, j] = 0.0


def _pair_terms(q, k, g):
    """chunk_terms' pairs: attn and kk [NC, N, Hk, G, C, C] for q, k [NC, N, Hk, C, K], g [NC, N, Hk, G, C, K]."""
    C = k.shape[-2]
    attn = torch.empty(*g.shape[:-1], C, dtype=k.dtype)
    kk = torch.empty_like(attn)
    _pair_terms_loop(_key_rows(q).numpy(), _key_rows(k).numpy(), _token_decays(g).numpy(),
                     attn.view(-1, C, C).numpy(), kk.view(-1, C, C).numpy())
    return attn, kk


@numba.njit(parallel=True, fastmath=True)
def _pair_gradients(q, k, a, dA, dKK, dq, dk, dg):
    """The gradients of attn and kk (_pair_terms_loop's, their shapes) from dA, dKK [L G, C, C] (0 above the
    diagonal), per value head: dq, dk, dg [L G, C, K] (overwritten). Per pair j <= i and channel d, with R_ijd =
    dA_ij q_id + dKK_ij k_id: dq_i += dA_ij k_j D_ij, dk_i += dKK_ij k_j D_ij, dk_j += R_ij D_ij, and
    dg_t += R_ij k_j D_ij for j < t <= i, as prefix sums over j per row i (no differences)."""
    M, C, K = a.shape
    G = M // q.shape[0]
    for m in numba.prange(M):
        x = m // G
        run = np.empty(K, a.dtype)
        acc = np.empty(K, a.dtype)
        spans = np.empty((C, K), a.dtype)
        dq[m] = 0.0
        dk[m] = 0.0
        dg[m] = 0.0
        for i in range(C):
            run[:] = 1.0
            for j in range(i, -1, -1):
                da, dkk = dA[m, i, j], dKK[m, i, j]
                for d in range(K):
                    decay = run[d]
                    decayed = k[x, j, d] * decay
                    row = da * q[x, i, d] + dkk * k[x, i, d]
                    dq[m, i, d] += da * decayed
                    dk[m, i, d] += dkk * decayed
                    dk[m, j, d] += row * decay
                    spans[j, d] = row * decayed
                    run[d] = _flushed(decay * a[m, j, d])
            acc[:] = 0.0
            for j in range(i):
                for d in range(K):
                    acc[d] += spans[j, d]
                    dg[m, j + 1, d] += acc[d]


def group_backward(q, k, v, g, beta, state, state_dtype, do, d_state):
    """kernellab.torch.kda.autograd_group_backward's contract, by explicit products: q (scaled), k
    [NC, N, Hk, C, K]; v, do [NC, N, Hk, G, C, V]; g [NC, N, Hk, G, C, K]; beta [NC, N, Hk, G, C]; state None or
    [N Hk G, K, V] (the group's starting state), d_state [N Hk G, K, V] (its final state's gradient). The states
    are rounded to state_dtype between chunks, as the forward's; the rounding passes the gradient straight through.
    Returns (dq, dk, dv, dg, dbeta, the starting state's gradient or None when state is None)."""
    NC, N, Hk, C, K = k.shape
    G, V = v.shape[3], v.shape[-1]
    M = N * Hk * G
    t = torch_kda.chunk_terms(q, k, v, g, beta, _pair_terms)
    A, w, keys, reads, last = t["attn"], t["w"], t["keys"], t["reads"], t["last"]
    S = torch.zeros(M, K, V, dtype=v.dtype) if state is None else state
    starts, v_new = [], []
    for j in range(NC):
        starts.append(S)
        v_new.append(t["u"][j].reshape(M, C, V) - torch.bmm(w[j].reshape(M, C, K), S))
        S = torch_kda._stored(torch.baddbmm(last[j].reshape(M, K, 1) * S, keys[j].reshape(M, C, K).mT, v_new[j]),
                              state_dtype)
    dS, ends, dv_new = d_state, [None] * NC, [None] * NC
    for j in reversed(range(NC)):
        ends[j] = dS
        dv_new[j] = torch.baddbmm(torch.bmm(A[j].reshape(M, C, C).mT, do[j].reshape(M, C, V)),
                                  keys[j].reshape(M, C, K), dS)
        dS = torch.baddbmm(last[j].reshape(M, K, 1) * dS, reads[j].reshape(M, C, K).mT, do[j].reshape(M, C, V))
        dS = torch.baddbmm(dS, w[j].reshape(M, C, K).mT, dv_new[j], alpha=-1)
    heads = (NC, N, Hk, G)
    S0, S1_grad = torch.stack(starts).view(*heads, K, V), torch.stack(ends).view(*heads, K, V)
    vn, dvn = torch.stack(v_new).view(*heads, C, V), torch.stack(dv_new).view(*heads, C, V)
    ke, gamma, tail, inverse = t["ke"], t["gamma"], t["tail"], t["inverse"]
    b = beta[..., None]
    X, Y = b * gamma * ke, b * v  # w = A^-1 X, u = A^-1 Y
    dA = (do @ vn.mT).tril()
    d_reads = do @ S0.mT
    d_keys = vn @ S1_grad.mT
    dw = -(dvn @ S0.mT)
    dY, dX = inverse.mT @ dvn, inverse.mT @ dw
    dL = -(inverse.mT @ (dvn @ Y.mT + dw @ X.mT) @ inverse.mT).tril(-1)  # L = strictly_lower(beta kk)
    dKK = dL * b
    dbeta = (dL * t["kk"]).sum(-1) + (dY * v).sum(-1) + (dX * gamma * ke).sum(-1)
    dq_pairs, dk_pairs, dg_pairs = (torch.empty(*heads, C, K, dtype=k.dtype) for _ in range(3))
    _pair_gradients(_key_rows(q).numpy(), _key_rows(k).numpy(), _token_decays(g).numpy(),
                    dA.reshape(-1, C, C).contiguous().numpy(), dKK.reshape(-1, C, C).contiguous().numpy(),
                    dq_pairs.view(-1, C, K).numpy(), dk_pairs.view(-1, C, K).numpy(), dg_pairs.view(-1, C, K).numpy())
    dq = d_reads * gamma + dq_pairs
    dk = dX * b * gamma + d_keys * tail + dk_pairs
    # g_t: gamma_i's gradient for i >= t, tail_i's for i < t, exp(gcum_C)'s for every t, D_ij's for j < t <= i
    through_tail = tail * ke * d_keys
    dg = (_reverse_cumsum(X * dX + reads * d_reads, -2) + through_tail.cumsum(-2) - through_tail
          + ((S0 * S1_grad).sum(-1) * last)[..., None, :] + dg_pairs)
    return dq.sum(3), dk.sum(3), dY * b, dg, dbeta, None if state is None else dS


def group_state(q, k, v, g, beta, state, state_dtype):
    """The state after a group of chunks (kernellab.torch.kda.chunk_group's inputs and final state, state None or
    [N Hk G, K, V]): float32 by the forward's loop (_run, each sequence's chunks as its rows; q already scaled),
    float64 by chunk_group with _pair_terms."""
    if v.dtype != torch.float32:
        return torch_kda.chunk_group(q, k, v, g, beta, state, state_dtype, pairs=_pair_terms)[1]
    NC, N, Hk, C, K = k.shape
    G, V = v.shape[3], v.shape[-1]
    # [NC, N, Hk(, G), C, ...] -> the rows [N NC C, Hk or Hv, ...] of N sequences of NC C tokens
    keys = [x.permute(1, 0, 3, 2, 4).reshape(-1, Hk, K) for x in (q, k)]
    heads = [x.permute(1, 0, 4, 2, 3, *range(5, x.dim())).reshape(N * NC * C, Hk * G, *x.shape[5:])
             for x in (v, g, beta)]
    rows = [x.contiguous().numpy() for x in keys + heads]
    a = _token_decays(torch.from_numpy(rows[3]))  # exp(g) [rows, Hv, K], clamped as the forward's
    S = (torch.zeros(N * Hk * G, K, V) if state is None else state.clone()).view(N, Hk * G, K, V)
    starts, lengths = torch.arange(0, N * NC * C, NC * C), torch.full((N,), NC * C)
    _run(rows[0], rows[1], rows[2], a.view(-1, Hk * G, K).numpy(), rows[4], starts.numpy(), lengths.numpy(),
         S.numpy(), np.empty_like(rows[2]), C, 1.0, False, STATE_ROUNDING[state_dtype])
    return S.view(-1, K, V)


def kda_backward(grads, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens, mode,
                 state_dtype, chunk_size=None):
    """The gradients of kda (kernellab.autograd's contract): kernellab.torch.kda.chunked_backward's groups, each by
    group_backward's explicit products. Returns kernellab.torch.kda.kda_backward's dict."""
    return torch_kda.chunked_backward(grads, q, k, v, g, beta, scale, initial_state, output_final_state,
                                      use_qk_l2norm, cu_seqlens, mode, state_dtype, chunk_size, group_backward,
                                      group_state)
