"""The recurrent gated delta rule as a numba.cuda kernel (a GPU, or CPU tensors under NUMBA_ENABLE_CUDASIM=1).

One block of BV threads (one warp) per (sequence, value head, V tile of BV columns). Thread j keeps column j of
the state S[:, j] in shared memory for the whole sequence: per token it reads q and k from shared memory
(broadcast) and does kS_j = k . S[:, j]; u_j = beta (v_j - e^g kS_j); S[:, j] = e^g S[:, j] + k u_j;
o_j = scale q . S[:, j]. The state is read from and written to device memory once.
"""
import math

import numpy as np
import torch
from numba import cuda, float32

from kernellab.numba_cuda import NumbaAotSpec
from kernellab.numba._edge import device_array, float32_contiguous, sequence_bounds
from kernellab.validate import check_state_dtype

BV = 32  # state columns per block (one warp)
MAX_K = 128  # the key head dim the shared state tile is sized for (Qwen3.5's; 16 KB of shared memory)
_F4 = "float32[:, :, :, ::1]"
AOT_SPECS = [NumbaAotSpec("gdr_recurrent[numba_cuda]", f"{__name__}:_recurrent_kernel",
                          f"void({_F4}, {_F4}, {_F4}, float32[:, :, ::1], float32[:, :, ::1], int64[::1], int64[::1], "
                          f"int64[::1], {_F4}, {_F4}, float32, boolean)", threads=BV)]


@cuda.jit
def _recurrent_kernel(q, k, v, g, beta, seq_batch, seq_start, seq_end, state, o, scale, use_qk_l2norm):
    """q, k [B, T, Hk, K]; v, o [B, T, Hv, V]; g, beta [B, T, Hv]; seq_* [N]; state [N, Hv, K, V] (in, out).
    Grid (N * Hv, cdiv(V, BV)), block BV."""
    Hk, K = q.shape[2], q.shape[3]
    Hv, V = v.shape[2], v.shape[3]
    n = cuda.blockIdx.x // Hv
    h = cuda.blockIdx.x % Hv
    hk = h // (Hv // Hk)
    b = seq_batch[n]
    tx = cuda.threadIdx.x
    j = cuda.blockIdx.y * BV + tx
    active = j < V
    S = cuda.shared.array((MAX_K, BV), float32)
    qs = cuda.shared.array(MAX_K, float32)
    ks = cuda.shared.array(MAX_K, float32)
    for i in range(K):
        S[i, tx] = state[n, h, i, j] if active else 0.0
    for t in range(seq_start[n], seq_end[n]):
        cuda.syncthreads()  # the previous token is done with qs, ks
        for i in range(tx, K, BV):
            qs[i] = q[b, t, hk, i]
            ks[i] = k[b, t, hk, i]
        cuda.syncthreads()
        qn = float32(1.0)
        kn = float32(1.0)
        if use_qk_l2norm:
            qss = float32(0.0)
            kss = float32(0.0)
            for i in range(K):
                qss += qs[i] * qs[i]
                kss += ks[i] * ks[i]
            qn = 1.0 / math.sqrt(qss + 1e-6)
            kn = 1.0 / math.sqrt(kss + 1e-6)
        if active:
            decay = math.exp(g[b, t, h])
            kS = float32(0.0)
            for i in range(K):
                kS += ks[i] * S[i, tx]
            u = beta[b, t, h] * (v[b, t, h, j] - decay * kn * kS)
            ku = kn * u
            acc = float32(0.0)
            for i in range(K):
                s = decay * S[i, tx] + ks[i] * ku
                S[i, tx] = s
                acc += qs[i] * s
            o[b, t, h, j] = scale * qn * acc
    if active:
        for i in range(K):
            state[n, h, i, j] = S[i, tx]


def gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens,
                     mode, state_dtype):
    """q, k [B, T, Hk, K]; v [B, T, Hv, V]; g, beta [B, T, Hv]; initial_state [N, Hv, K, V] or None.
    Returns o [B, T, Hv, V] in v's dtype and the float32 state [N, Hv, K, V] (or None). Both modes run the
    token-by-token kernel (there is no chunked numba.cuda kernel); K <= 128; state_dtype float32 only."""
    check_state_dtype(state_dtype, v, "numba_cuda", "gated_delta_rule")
    B, T, Hv, V = v.shape
    K = q.shape[3]
    if K > MAX_K:
        raise ValueError(f"the numba_cuda gated delta rule takes K <= {MAX_K}, got {K}")
    bounds = [torch.from_numpy(a).to(v.device) for a in sequence_bounds(B, T, cu_seqlens)]
    N = bounds[0].shape[0]
    if initial_state is None:
        state = torch.zeros(N, Hv, K, V, dtype=torch.float32, device=v.device)
    else:
        state = initial_state.to(torch.float32, copy=True).contiguous()
    o = torch.empty(B, T, Hv, V, dtype=torch.float32, device=v.device)
    args = [device_array(t) for t in (*map(float32_contiguous, (q, k, v, g, beta)), *bounds, state, o)]
    _recurrent_kernel[(N * Hv, (V + BV - 1) // BV), BV](*args, np.float32(scale), bool(use_qk_l2norm))
    return o.to(v.dtype), (state if output_final_state else None)
