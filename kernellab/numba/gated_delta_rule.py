"""The gated delta rule as numba CPU kernels: one parallel job per (sequence, value head).

Both kernels keep the state S [K, V] of their job in place in the (float32) state array and walk its rows with
unit-stride inner loops over V, which LLVM vectorises without reassociating any sum (fastmath stays off).

- recurrent: token by token. Per token: kS = S^T k; u = beta (v - e^g kS); S = e^g S + k u^T; o = scale S^T q.
- chunk: chunks of C tokens. With G the cumulative log decay inside the chunk and S0 the state entering it,
  the chunk's u solve the unit lower-triangular system
      u_i + sum_{j<i} beta_i e^{G_i - G_j} (k_i . k_j) u_j = beta_i (v_i - e^{G_i} S0^T k_i),
  then o_i = scale (e^{G_i} S0^T q_i + sum_{j<=i} e^{G_i - G_j} (q_i . k_j) u_j) and
  S = e^{G_C} S0 + sum_j e^{G_C - G_j} k_j u_j^T. Every exponent is <= 0, so nothing overflows. Without BLAS
  inside numba the chunk's products are plain vectorised loops with the same state traffic per token as the
  recurrent kernel plus the triangular solve, so on the CPU it does not pay: about 1.45x the recurrent
  kernel's time at T = 1024, d = 128 (two shared cores, noisy). mode still selects it, so both are measured.
"""
import numba
import numpy as np
import torch

from kernellab.numba._edge import as_array, compute_dtype, sequence_bounds
from kernellab.validate import check_state_dtype

CHUNK = 64


@numba.njit(inline="always")
def _load_qk(q, k, b, t, hk, qt, kt, use_qk_l2norm):
    """qt, kt [K] <- q[b, t, hk], k[b, t, hk], divided by sqrt(sum(x^2) + 1e-6) when use_qk_l2norm."""
    K = qt.shape[0]
    qss = 0.0
    kss = 0.0
    for i in range(K):
        qt[i] = q[b, t, hk, i]
        kt[i] = k[b, t, hk, i]
        qss += qt[i] * qt[i]
        kss += kt[i] * kt[i]
    if use_qk_l2norm:
        qn = 1.0 / np.sqrt(qss + 1e-6)
        kn = 1.0 / np.sqrt(kss + 1e-6)
        for i in range(K):
            qt[i] = qt[i] * qn
            kt[i] = kt[i] * kn


@numba.njit(parallel=True, fastmath=False, cache=True)
def _recurrent_kernel(q, k, v, g, beta, seq_batch, seq_start, seq_end, state, o, scale, use_qk_l2norm):
    """q, k [B, T, Hk, K]; v, o [B, T, Hv, V]; g, beta [B, T, Hv]; seq_* [N]; state [N, Hv, K, V] (in, out)."""
    N = seq_batch.shape[0]
    Hk, K = q.shape[2], q.shape[3]
    Hv, V = v.shape[2], v.shape[3]
    group = Hv // Hk
    for job in numba.prange(N * Hv):
        n = job // Hv
        h = job % Hv
        b = seq_batch[n]
        S = state[n, h]
        qt = np.empty(K, state.dtype)
        kt = np.empty(K, state.dtype)
        ks = np.empty(V, state.dtype)
        u = np.empty(V, state.dtype)
        out = np.empty(V, state.dtype)
        for t in range(seq_start[n], seq_end[n]):
            _load_qk(q, k, b, t, h // group, qt, kt, use_qk_l2norm)
            decay = np.exp(g[b, t, h])
            ks[:] = 0
            for i in range(K):
                ki = kt[i]
                for j in range(V):
                    ks[j] += ki * S[i, j]
            for j in range(V):
                u[j] = beta[b, t, h] * (v[b, t, h, j] - decay * ks[j])
            out[:] = 0
            for i in range(K):
                ki = kt[i]
                qi = qt[i]
                for j in range(V):
                    s = decay * S[i, j] + ki * u[j]
                    S[i, j] = s
                    out[j] += qi * s
            for j in range(V):
                o[b, t, h, j] = scale * out[j]


@numba.njit(parallel=True, fastmath=False, cache=True)
def _chunk_kernel(q, k, v, g, beta, seq_batch, seq_start, seq_end, state, o, scale, use_qk_l2norm, C):
    """As _recurrent_kernel, C tokens at a time (module docstring)."""
    N = seq_batch.shape[0]
    Hk, K = q.shape[2], q.shape[3]
    Hv, V = v.shape[2], v.shape[3]
    group = Hv // Hk
    for job in numba.prange(N * Hv):
        n = job // Hv
        h = job % Hv
        b = seq_batch[n]
        S = state[n, h]
        qc = np.empty((C, K), state.dtype)
        kc = np.empty((C, K), state.dtype)
        kT = np.empty((K, C), state.dtype)
        kk = np.empty((C, C), state.dtype)  # k_i . k_j
        qk = np.empty((C, C), state.dtype)  # q_i . k_j
        U = np.empty((C, V), state.dtype)
        O = np.empty((C, V), state.dtype)
        G = np.empty(C, state.dtype)
        ks = np.empty(V, state.dtype)
        qs = np.empty(V, state.dtype)
        for c0 in range(seq_start[n], seq_end[n], C):
            L = min(C, seq_end[n] - c0)
            cumulative = 0.0
            for i in range(L):
                _load_qk(q, k, b, c0 + i, h // group, qc[i], kc[i], use_qk_l2norm)
                cumulative += g[b, c0 + i, h]
                G[i] = cumulative
            # right-hand side beta (v - e^G S0^T k) and the inter-chunk output e^G S0^T q
            for i in range(L):
                ks[:] = 0
                qs[:] = 0
                for a in range(K):
                    ka = kc[i, a]
                    qa = qc[i, a]
                    for j in range(V):
                        ks[j] += ka * S[a, j]
                        qs[j] += qa * S[a, j]
                eg = np.exp(G[i])
                bi = beta[b, c0 + i, h]
                for j in range(V):
                    U[i, j] = bi * (v[b, c0 + i, h, j] - eg * ks[j])
                    O[i, j] = eg * qs[j]
            # Gram matrices, summed over a with unit-stride (vectorised) rows of k^T
            for i in range(L):
                for a in range(K):
                    kT[a, i] = kc[i, a]
            for i in range(L):
                kk[i, :i] = 0
                qk[i, :i + 1] = 0
                for a in range(K):
                    ka = kc[i, a]
                    qa = qc[i, a]
                    for jj in range(i + 1):
                        kk[i, jj] += ka * kT[a, jj]
                        qk[i, jj] += qa * kT[a, jj]
            # forward substitution of the unit lower-triangular system
            for i in range(1, L):
                bi = beta[b, c0 + i, h]
                for jj in range(i):
                    coef = bi * np.exp(G[i] - G[jj]) * kk[i, jj]
                    for j in range(V):
                        U[i, j] -= coef * U[jj, j]
            # intra-chunk output
            for i in range(L):
                for jj in range(i + 1):
                    coef = np.exp(G[i] - G[jj]) * qk[i, jj]
                    for j in range(V):
                        O[i, j] += coef * U[jj, j]
                for j in range(V):
                    o[b, c0 + i, h, j] = scale * O[i, j]
            # state carried to the next chunk
            last = np.exp(G[L - 1])
            for a in range(K):
                for j in range(V):
                    S[a, j] *= last
            for jj in range(L):
                w = np.exp(G[L - 1] - G[jj])
                for a in range(K):
                    c = w * kc[jj, a]
                    for j in range(V):
                        S[a, j] += c * U[jj, j]


def gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens,
                     mode, state_dtype, chunk_size=CHUNK):
    """q, k [B, T, Hk, K]; v [B, T, Hv, V]; g, beta [B, T, Hv]; initial_state [N, Hv, K, V] or None.
    Returns o [B, T, Hv, V] in v's dtype and the float32 (float64 for float64 inputs) state [N, Hv, K, V] or None.
    mode "chunk" runs the chunked kernel (chunk size `chunk_size`, default 64), "recurrent" the token loop.
    state_dtype: the default only (the kernels keep the state in place in the state array)."""
    check_state_dtype(state_dtype, v, "numba", "gated_delta_rule")
    B, T, Hv, V = v.shape
    K = q.shape[3]
    dtype = compute_dtype(v)
    seq_batch, seq_start, seq_end = sequence_bounds(B, T, cu_seqlens)
    N = seq_batch.shape[0]
    if initial_state is None:
        state = np.zeros((N, Hv, K, V), dtype=np.float64 if dtype == torch.float64 else np.float32)
    else:
        state = initial_state.to(dtype, copy=True).contiguous().numpy()  # the caller's state stays untouched
    o = np.empty((B, T, Hv, V), dtype=state.dtype)
    args = (as_array(q, dtype), as_array(k, dtype), as_array(v, dtype), as_array(g, dtype), as_array(beta, dtype),
            seq_batch, seq_start, seq_end, state, o, state.dtype.type(scale), use_qk_l2norm)
    if mode == "chunk":
        _chunk_kernel(*args, int(chunk_size))
    else:
        _recurrent_kernel(*args)
    out = torch.from_numpy(o)
    return out.to(v.dtype), (torch.from_numpy(state) if output_final_state else None)
