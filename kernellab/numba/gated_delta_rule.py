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

from kernellab import serving
from kernellab.numba._edge import as_array, compute_dtype, sequence_bounds
from kernellab.types import StateTrace
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
def _recurrent_kernel(q, k, v, g, beta, seq_batch, seq_start, seq_end, source, rows_in, dest, rows_out, o, trace,
                      scale, use_qk_l2norm):
    """q, k [B, T, Hk, K]; v, o [B, T, Hv, V]; g, beta [B, T, Hv]; seq_* [N]. Sequence n starts from
    source[rows_in[n]] ([P, Hv, K, V]; zeros when source has no rows) and its final state goes to
    dest[rows_out[n]] (not written for rows_out[n] < 0); rows_in[n] < 0: a padding slot, its outputs (and trace
    rows) zeros. trace [B T, Hv, K, V] or no rows: the state after token t of batch row b into row b T + t.
    Each job copies its head's state into a buffer of its own (K V elements: in cache), so that source and dest may
    be the same pool: the state crosses memory once each way. Rows read by one sequence and written by another
    must not overlap (the caller's: kernellab.numba.gated_delta_rule.overlapping)."""
    N = seq_batch.shape[0]
    T, Hk, K = q.shape[1], q.shape[2], q.shape[3]
    Hv, V = v.shape[2], v.shape[3]
    group = Hv // Hk
    tracing = trace.shape[0] > 0
    for job in numba.prange(N * Hv):
        n = job // Hv
        h = job % Hv
        b = seq_batch[n]
        if rows_in[n] < 0:
            for t in range(seq_start[n], seq_end[n]):
                o[b, t, h, :] = 0
                if tracing:
                    trace[b * T + t, h] = 0
            continue
        S = np.empty((K, V), o.dtype)
        if source.shape[0] > 0:
            S[:, :] = source[rows_in[n], h]
        else:
            S[:, :] = 0
        qt = np.empty(K, o.dtype)
        kt = np.empty(K, o.dtype)
        ks = np.empty(V, o.dtype)
        u = np.empty(V, o.dtype)
        out = np.empty(V, o.dtype)
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
            if tracing:
                trace[b * T + t, h] = S
        if rows_out[n] >= 0:
            dest[rows_out[n], h] = S


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


def overlapping(rows_in: np.ndarray, rows_out: np.ndarray) -> bool:
    """Whether a row of the pool is read by one sequence and written by another (rows_in, rows_out int [N]; -1
    neither): the in-place kernel must then read the rows first."""
    reader = {row: n for n, row in enumerate(rows_in.tolist()) if row >= 0}
    return any(reader.get(row, n) != n for n, row in enumerate(rows_out.tolist()) if row >= 0)


def gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens,
                     mode, state_dtype, chunk_size=CHUNK, state_indices=None, output_state_indices=None,
                     output_intermediate_states=False, A_log=None, dt_bias=None, beta_logits=False):
    """q, k [B, T, Hk, K]; v [B, T, Hv, V]; g, beta [B, T, Hv]; initial_state [N, Hv, K, V] or None (a pool
    [P, Hv, K, V] with state_indices). Returns o [B, T, Hv, V] in v's dtype and the float32 (float64 for float64
    inputs) state [N, Hv, K, V] or None (None with a pool, written in place), and a StateTrace with
    output_intermediate_states. mode "chunk" runs the chunked kernel (chunk size `chunk_size`, default 64),
    "recurrent" the token loop (and every call with output_intermediate_states). state_dtype: the default only.
    The serving keywords (docs/api.md): the token loop reads a sequence's state straight from its pool row and
    writes the new one straight into its output row (no gather, no scatter; when output_state_indices writes a row
    another sequence reads, the rows read are gathered first); the chunked kernel takes the pool's rows through
    kernellab.serving.serve. Fused gating by kernellab.serving.gates in float32 before the kernels (B T Hv values:
    torch's float32 rounding, so that a fused call is bitwise the unfused one)."""
    check_state_dtype(state_dtype, v, "numba", "gated_delta_rule")
    B, T, Hv, V = v.shape
    K = q.shape[3]
    dtype = compute_dtype(v)
    g, beta = serving.gates(g, beta, A_log, dt_bias, beta_logits, dtype,
                            by_token=output_intermediate_states and cu_seqlens is None)
    seq_batch, seq_start, seq_end = sequence_bounds(B, T, cu_seqlens)
    N = seq_batch.shape[0]
    tokens = (as_array(q, dtype), as_array(k, dtype), as_array(v, dtype), as_array(g, dtype), as_array(beta, dtype),
              seq_batch, seq_start, seq_end)
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    if mode == "chunk" and not output_intermediate_states:
        def loop(s0, every):
            state = (np.zeros((N, Hv, K, V), dtype=np_dtype) if s0 is None
                     else s0.to(dtype, copy=True).contiguous().numpy())  # the caller's state stays untouched
            o = np.empty((B, T, Hv, V), dtype=np_dtype)
            _chunk_kernel(*tokens, state, o, np_dtype(scale), use_qk_l2norm, int(chunk_size))
            return torch.from_numpy(o).to(v.dtype), torch.from_numpy(state), None

        return serving.serve(loop, "numba", chunk_size, B, T, initial_state, output_final_state, cu_seqlens,
                             state_dtype, state_indices, output_state_indices, False, None)
    no_rows = np.empty((0, Hv, K, V), dtype=np_dtype)
    if state_indices is None:
        source = no_rows if initial_state is None else as_array(initial_state, dtype)
        rows_in = np.arange(N, dtype=np.int64)
        dest = np.empty((N, Hv, K, V), dtype=np_dtype) if output_final_state else no_rows
        rows_out = rows_in if output_final_state else np.full(N, -1, dtype=np.int64)
    else:
        dest = initial_state.numpy()  # the pool itself, in place (in the compute dtype: check_state_dtype)
        rows_in = state_indices.to(torch.int64).numpy()
        written = state_indices if output_state_indices is None else output_state_indices
        rows_out = np.where((rows_in < 0) | output_intermediate_states, -1, written.to(torch.int64).numpy())
        source = dest
        if output_state_indices is not None and overlapping(rows_in, rows_out):
            # every row read before any is written: the rows read gathered first
            source = dest[np.maximum(rows_in, 0)]
            rows_in = np.where(rows_in < 0, -1, np.arange(N, dtype=np.int64))
    o = np.empty((B, T, Hv, V), dtype=np_dtype)
    trace = np.empty((B * T, Hv, K, V), dtype=np_dtype) if output_intermediate_states else no_rows
    _recurrent_kernel(*tokens, source, rows_in, dest, rows_out, o, trace, np_dtype(scale), use_qk_l2norm)
    out = torch.from_numpy(o).to(v.dtype)
    final = torch.from_numpy(dest) if output_final_state else None
    if not output_intermediate_states:
        return out, final
    sequence, position = serving.trace_index(serving.lengths(B, T, cu_seqlens), 1)
    return out, final, StateTrace(torch.from_numpy(trace), sequence, position)
