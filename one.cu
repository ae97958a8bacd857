// The gated delta rule in CUDA C++: the recurrent (decode) kernel and the state pass of the chunked algorithm.
// Compiled at run time by NVRTC (kernellab/cuda/gated_delta_rule.py) and standalone by
// `nvcc -arch=sm_90 -cubin -Xptxas -v` (the explicit instantiations at the end give real code).
#include "common.cuh"

// S to rows 0..rows-1 of a thread's KPT state rows, V elements apart from at (rounded to ST). (load_rows and
// store_rows take the case of all rows apart: a mask per row costs registers.)
template <typename ST, int KPT>
__device__ __forceinline__ void store_rows(ST* at, const float (&S)[KPT], int rows, int V) {
    if (rows == KPT) {
#pragma unroll
        for (int r = 0; r < KPT; ++r) at[(long long)r * V] = lab::from_float<ST>(S[r]);
    } else {
#pragma unroll
        for (int r = 0; r < KPT; ++r)
            if (r < rows) at[(long long)r * V] = lab::from_float<ST>(S[r]);
    }
}

// S from rows 0..rows-1 (the rest zero) of a thread's KPT state rows, V elements apart from at (null: all zero).
template <typename ST, int KPT>
__device__ __forceinline__ void load_rows(float (&S)[KPT], const ST* at, int rows, int V) {
    if (at != nullptr && rows == KPT) {
#pragma unroll
        for (int r = 0; r < KPT; ++r) S[r] = lab::to_float(at[(long long)r * V]);
    } else {
#pragma unroll
        for (int r = 0; r < KPT; ++r) S[r] = (at != nullptr && r < rows) ? lab::to_float(at[(long long)r * V]) : 0.f;
    }
}

// Recurrent gated delta rule, per value head h (key head h / (Hv / Hk)):
//   S' = e^g S;  u = beta (v - S'^T k);  S = S' + k u^T;  o = scale S^T q.
// Grid (cdiv(V, BV), Hv, N); block (BV, SPLIT). Thread (x, y) holds rows y*KPT .. y*KPT+KPT-1 of state column
// blockIdx.x * BV + x in registers for the whole sequence: the state is read once and written once. The K-sums
// are per-thread partials over its KPT rows, combined across the SPLIT row groups through shared memory.
// q, k [B*T, Hk, K] (zero-padded to the template's K); v, o [B*T, Hv, V] (tokens flat); g, beta [B*T, Hv] float32;
// cu_seqlens [N + 1] or null (then sequence n is tokens n*T .. n*T + T). The arithmetic is float; after each
// token's output the state in registers is rounded to ST (lab::stored), as if stored between steps.
// States in ST (state_dtype: float, __half or __nv_bfloat16), rows [Hv, state_k, V] contiguous (state_k <= K, the
// state's own K: rows past it are zero and stay so, k being zero-padded), the serving keywords' arguments
// (kernellab.serving.StateArguments):
//   h0 (null: zero initial states): sequence n starts from row h0_index[n] (n when h0_index is null) of h0, rows
//     h0_stride elements apart; h0_index[n] = -1 is a padding slot: the block writes zero outputs and returns,
//     touching no state.
//   ht (null: no final states): the final state goes to row ht_index[n] (n when null; -1: not written), rows
//     ht_stride apart. ht may be h0 (a pool updated in place: each block reads its slice before writing it).
//   kept (null: none): the state after every `every`-th token of sequence n to row kept_offsets[n] + j, j = 0, 1..
//     ([M, Hv, state_k, V] contiguous; a verify keeps every token's).
//   A_log, dt_bias [Hv] (null: g as given): g holds the raw gate input a, g = max(-e^A_log softplus(a + dt_bias),
//     log_decay_min) in float (softplus as torch's: x above 20). beta_logits: beta = sigmoid(beta) in float.
template <typename T, typename ST, int K, int BV, int SPLIT>
__global__ void __launch_bounds__(BV * SPLIT)
gdr_recurrent(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
              const float* __restrict__ g, const float* __restrict__ beta, const float* __restrict__ A_log,
              const float* __restrict__ dt_bias, const ST* h0, const int* __restrict__ h0_index, long long h0_stride,
              ST* ht, const int* __restrict__ ht_index, long long ht_stride, ST* __restrict__ kept,
              const int* __restrict__ kept_offsets, int every, T* __restrict__ o,
              const long long* __restrict__ cu_seqlens, int seq_len, int Hk, int Hv, int V, int state_k, float scale,
              float log_decay_min, int use_qk_l2norm, int beta_logits) {
    static_assert(K % SPLIT == 0, "K must split evenly over the row groups");
    constexpr int KPT = K / SPLIT;
    constexpr int THREADS = BV * SPLIT;
    constexpr int WARPS = (THREADS + 31) / 32;
    __shared__ float qs[K], ks[K];
    __shared__ float partial[SPLIT][BV];
    __shared__ float norms[2][WARPS];

    const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * BV + tx;
    const int col = blockIdx.x * BV + tx, h = blockIdx.y, n = blockIdx.z;
    const int hk = h / (Hv / Hk);
    const bool active = col < V;
    const long long start = cu_seqlens ? cu_seqlens[n] : (long long)n * seq_len;
    const long long end = cu_seqlens ? cu_seqlens[n + 1] : start + seq_len;
    const long long h0_row = h0_index ? h0_index[n] : n;
    if (h0_row < 0) {  // a padding slot (the whole block returns: no barrier is left waiting)
        if (ty == 0 && active)
            for (long long tok = start; tok < end; ++tok) o[(tok * Hv + h) * V + col] = lab::from_float<T>(0.f);
        return;
    }
    // this thread's first state element in a row [Hv, state_k, V]; its rows r with ty*KPT + r < state_k exist
    const long long in_row = ((long long)h * state_k + ty * KPT) * V + col;
    const int rows = min(KPT, state_k - ty * KPT);

    float S[KPT];
    load_rows(S, (h0 != nullptr && active) ? h0 + h0_row * h0_stride + in_row : nullptr, rows, V);
    float decay_rate = 0.f, bias = 0.f;
    if (A_log != nullptr) {
        decay_rate = expf(A_log[h]);
        bias = dt_bias[h];
    }
    const int kept_first = kept ? kept_offsets[n] : 0;

    for (long long tok = start; tok < end; ++tok) {
        float q_sq = 0.f, k_sq = 0.f;
        for (int i = tid; i < K; i += THREADS) {
            const float qi = lab::to_float(q[(tok * Hk + hk) * K + i]);
            const float ki = lab::to_float(k[(tok * Hk + hk) * K + i]);
            qs[i] = qi;
            ks[i] = ki;
            q_sq += qi * qi;
            k_sq += ki * ki;
        }
        float q_norm = 1.f, k_norm = 1.f;
        if (use_qk_l2norm) {
            q_sq = lab::warp_sum(q_sq);
            k_sq = lab::warp_sum(k_sq);
            if (tid % 32 == 0) {
                norms[0][tid / 32] = q_sq;
                norms[1][tid / 32] = k_sq;
            }
        }
        __syncthreads();
        if (use_qk_l2norm) {
            q_sq = 0.f;
            k_sq = 0.f;
#pragma unroll
            for (int w = 0; w < WARPS; ++w) {
                q_sq += norms[0][w];
                k_sq += norms[1][w];
            }
            q_norm = rsqrtf(q_sq + 1e-6f);
            k_norm = rsqrtf(k_sq + 1e-6f);
        }
        float acc = 0.f;
#pragma unroll
        for (int r = 0; r < KPT; ++r) acc += ks[ty * KPT + r] * S[r];
        partial[ty][tx] = acc;
        __syncthreads();
        float kS = 0.f;
#pragma unroll
        for (int y = 0; y < SPLIT; ++y) kS += partial[y][tx];
        float g_t = g[tok * Hv + h], beta_t = beta[tok * Hv + h];
        if (A_log != nullptr) g_t = fmaxf(-decay_rate * lab::softplus(g_t + bias), log_decay_min);
        if (beta_logits) beta_t = 1.f / (1.f + expf(-beta_t));
        const float decay = expf(g_t);
        const float v_col = active ? lab::to_float(v[(tok * Hv + h) * V + col]) : 0.f;
        const float u = beta_t * (v_col - decay * k_norm * kS);
        const float ku = k_norm * u;
        acc = 0.f;
#pragma unroll
        for (int r = 0; r < KPT; ++r) {
            const float s = decay * S[r] + ks[ty * KPT + r] * ku;
            acc += qs[ty * KPT + r] * s;
            S[r] = lab::stored<ST>(s);
        }
        __syncthreads();  // every thread has read partial (kS)
        partial[ty][tx] = acc;
        __syncthreads();
        if (ty == 0 && active) {
            float qS = 0.f;
#pragma unroll
            for (int y = 0; y < SPLIT; ++y) qS += partial[y][tx];
            o[(tok * Hv + h) * V + col] = lab::from_float<T>(scale * q_norm * qS);
        }
        const long long step = tok - start + 1;
        if (kept != nullptr && active && step % every == 0) {
            store_rows(kept + (kept_first + step / every - 1) * (long long)Hv * state_k * V + in_row, S, rows, V);
        }
        __syncthreads();  // qs, ks, partial are rewritten by the next token
    }
    const long long ht_row = ht_index ? ht_index[n] : n;
    if (ht != nullptr && active && ht_row >= 0) store_rows(ht + ht_row * ht_stride + in_row, S, rows, V);
}

// The state pass of the chunked gated delta rule (fla's chunk_gated_delta_rule_fwd_h). Sequences are padded to
// whole chunks of C tokens (padding has k = w = u = 0, gate 0: it leaves the state alone). For each chunk c of
// sequence n and value head h, with S the state entering it:
//   h_out[c] = S;  v_new = u - w S  [C, V];  S = e^{G_last} S + sum_t e^{G_last - G_t} k_t v_new_t^T.
// k, w [N, Hv, Tp, K], u, v_new [N, Hv, Tp, V], gcum [N, Hv, Tp] (log decay summed within each chunk), all
// float32; h_out [N, Hv, Tp / C, K, V] (the stored chunk states), h0, ht [N, Hv, K, V] (h0 may be null) in ST
// (state_dtype): the state is rounded to ST after every chunk. With w and v_new null it is the state pass of plain
// (scalar-gated) linear attention: v_new = u = v.
// Grid (cdiv(V, BV), Hv, N); block (BV, ROWS). The state tile [K, BV] stays in shared memory across chunks;
// thread (x, y) owns column x, chunk rows y, y + ROWS, ... of v_new and state rows y, y + ROWS, ....
template <typename ST, int K, int BV, int ROWS, int C>
__global__ void __launch_bounds__(BV * ROWS)
gdr_chunk_state(const float* __restrict__ k, const float* __restrict__ w, const float* __restrict__ u,
                const float* __restrict__ gcum, const ST* __restrict__ h0, ST* __restrict__ h_out,
                float* __restrict__ v_new, ST* __restrict__ ht, int padded_len, int Hv, int V) {
    __shared__ float S[K][BV];
    __shared__ float vn[C][BV];
    __shared__ float decay_to_end[C];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int col = blockIdx.x * BV + tx, h = blockIdx.y, n = blockIdx.z;
    const bool active = col < V;
    const long long head = (long long)n * Hv + h;
    const long long state_at = head * K * V + col;
    for (int i = ty; i < K; i += ROWS)
        S[i][tx] = (h0 != nullptr && active) ? lab::to_float(h0[state_at + (long long)i * V]) : 0.f;
    const int chunks = padded_len / C;
    for (int c = 0; c < chunks; ++c) {
        const long long tok0 = head * padded_len + (long long)c * C;
        __syncthreads();  // S is complete
        if (active) {
            ST* h_chunk = h_out + (head * chunks + c) * K * V + col;
            for (int i = ty; i < K; i += ROWS) h_chunk[(long long)i * V] = lab::from_float<ST>(S[i][tx]);
        }
        for (int t = ty; t < C; t += ROWS) {
            float wS = 0.f;
            if (w != nullptr) {
                const float* w_row = w + (tok0 + t) * K;  // the same address across the warp: one broadcast load
#pragma unroll 8
                for (int i = 0; i < K; ++i) wS += w_row[i] * S[i][tx];
            }
            const float value = active ? u[(tok0 + t) * V + col] - wS : 0.f;
            vn[t][tx] = value;
            if (active && v_new != nullptr) v_new[(tok0 + t) * V + col] = value;
        }
        const float g_last = gcum[tok0 + C - 1];
        for (int t = tx + ty * BV; t < C; t += BV * ROWS) decay_to_end[t] = expf(g_last - gcum[tok0 + t]);
        __syncthreads();  // vn, decay_to_end ready
        const float chunk_decay = expf(g_last);
        for (int i = ty; i < K; i += ROWS) {
            float update = 0.f;
#pragma unroll 8
            for (int t = 0; t < C; ++t) update += k[(tok0 + t) * K + i] * decay_to_end[t] * vn[t][tx];
            S[i][tx] = lab::stored<ST>(chunk_decay * S[i][tx] + update);
        }
    }
    __syncthreads();
    if (ht != nullptr && active)
        for (int i = ty; i < K; i += ROWS) ht[state_at + (long long)i * V] = lab::from_float<ST>(S[i][tx]);
}

// The instantiations the launcher uses (NVRTC looks them up by these names; nvcc emits their code): every input
// dtype T with every state dtype ST.
#define LAB_GDR_RECURRENT(T, ST, K) \
    template __global__ void gdr_recurrent<T, ST, K, 32, 4>(const T*, const T*, const T*, const float*, \
        const float*, const float*, const float*, const ST*, const int*, long long, ST*, const int*, long long, ST*, \
        const int*, int, T*, const long long*, int, int, int, int, int, float, float, int, int);
#define LAB_GDR_RECURRENT_STATES(T, K) \
    LAB_GDR_RECURRENT(T, float, K) LAB_GDR_RECURRENT(T, __half, K) LAB_GDR_RECURRENT(T, __nv_bfloat16, K)
#define LAB_GDR_RECURRENT_ALL_DTYPES(K) \
    LAB_GDR_RECURRENT_STATES(float, K) LAB_GDR_RECURRENT_STATES(__half, K) LAB_GDR_RECURRENT_STATES(__nv_bfloat16, K)
LAB_GDR_RECURRENT(float, float, 64)
LAB_GDR_RECURRENT(float, float, 128)
LAB_GDR_RECURRENT(float, float, 256)
LAB_GDR_RECURRENT(__nv_bfloat16, __nv_bfloat16, 128)
