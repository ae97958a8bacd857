// MoE token permutation, unpermutation and the grouped expert GEMM in CUDA C++.
// Compiled at run time by NVRTC (kernellab/cuda/moe.py) and standalone by `nvcc -arch=sm_90 -cubin -Xptxas -v`.
#include <mma.h>
#include "common.cuh"

// ---- permutation: a stable counting sort of the N * top_k slots in tiles of PERMUTE_TILE slots ----
#define PERMUTE_TILE 256

// counts[tile, e] += 1 for every slot of the tile routed to expert e (ids < 0: no expert). counts zeroed.
template <typename Id>
__global__ void moe_tile_counts(const Id* __restrict__ ids, long long slots, int num_experts, int* __restrict__ counts) {
    const long long slot = (long long)blockIdx.x * PERMUTE_TILE + threadIdx.x;
    if (slot < slots && ids[slot] >= 0) atomicAdd(&counts[(long long)blockIdx.x * num_experts + ids[slot]], 1);
}

// tile_base[tile, e] = slots of expert e in earlier tiles; offsets [E + 1] = exclusive scan of expert totals.
// One block; each thread scans whole experts over the tiles, then thread 0 scans the totals.
__global__ void moe_scan_counts(const int* __restrict__ counts, int tiles, int num_experts,
                                int* __restrict__ tile_base, int* __restrict__ offsets) {
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
        int running = 0;
        for (int tile = 0; tile < tiles; ++tile) {
            tile_base[(long long)tile * num_experts + e] = running;
            running += counts[(long long)tile * num_experts + e];
        }
        offsets[e + 1] = running;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int running = 0;
        offsets[0] = 0;
        for (int e = 0; e < num_experts; ++e) {
            running += offsets[e + 1];
            offsets[e + 1] = running;
        }
    }
}

// source[row] = slot with row = offsets[e] + tile_base[tile, e] + (earlier slots of the tile with expert e).
// Within a warp the rank comes from __match_any_sync; earlier warps of the tile are counted from shared memory.
template <typename Id>
__global__ void __launch_bounds__(PERMUTE_TILE)
moe_place(const Id* __restrict__ ids, long long slots, int num_experts, const int* __restrict__ tile_base,
          const int* __restrict__ offsets, long long* __restrict__ source) {
    __shared__ int experts[PERMUTE_TILE];
    const int tx = threadIdx.x;
    const long long slot = (long long)blockIdx.x * PERMUTE_TILE + tx;
    const int e = slot < slots ? (int)ids[slot] : -1;
    experts[tx] = e;
    __syncthreads();
    const unsigned same = __match_any_sync(0xffffffffu, e);
    int rank = __popc(same & ((1u << (tx % 32)) - 1u));
    for (int other = 0; other < tx - tx % 32; ++other) rank += experts[other] == e;
    if (e >= 0) source[offsets[e] + tile_base[(long long)blockIdx.x * num_experts + e] + rank] = slot;
}

// out[r] = x[source[r] / top_k]: rows moved as raw vectors (Vec = 16, 8, 4 or 2 bytes), one block per row.
template <typename Vec>
__global__ void moe_gather_rows(const Vec* __restrict__ x, const long long* __restrict__ source, int top_k,
                                int row_vecs, Vec* __restrict__ out) {
    const long long r = blockIdx.x;
    const Vec* src = x + (source[r] / top_k) * row_vecs;
    for (int i = threadIdx.x; i < row_vecs; i += blockDim.x) out[r * row_vecs + i] = src[i];
}

// row_of_slot[source[r]] = r (row_of_slot pre-filled with -1).
__global__ void moe_invert_source(const long long* __restrict__ source, long long rows, long long* __restrict__ row_of_slot) {
    const long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r < rows) row_of_slot[source[r]] = r;
}

// out[n, d] = sum_j weights[n, j] y_sorted[row_of_slot[n * top_k + j], d], j ascending, float32 sums; 0 when
// token n has no row. One block per token, threads over D.
template <typename T>
__global__ void moe_unpermute(const T* __restrict__ y_sorted, const long long* __restrict__ row_of_slot,
                              const float* __restrict__ weights, int top_k, int D, T* __restrict__ out) {
    const long long n = blockIdx.x;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < top_k; ++j) {
            const long long r = row_of_slot[n * top_k + j];
            if (r >= 0) acc += weights[n * top_k + j] * lab::to_float(y_sorted[r * D + d]);
        }
        out[n * D + d] = lab::from_float<T>(acc);
    }
}

// ---- grouped GEMM: y[rows of e] = x[rows of e] @ w[e]^T for every expert, one launch ----
#define GEMM_BM 64
#define GEMM_BN 64
#define GEMM_BK 32
#define GEMM_WARPS 4

// The tile schedule: tile_expert[t], tile_row[t] for every GEMM_BM-row tile of every non-empty group, in expert
// order; num_tiles[0] = their count. One thread (E is at most a few hundred).
__global__ void moe_tile_schedule(const int* __restrict__ offsets, int num_experts, int* __restrict__ tile_expert,
                                  int* __restrict__ tile_row, int* __restrict__ num_tiles) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    int tiles = 0;
    for (int e = 0; e < num_experts; ++e)
        for (int row = offsets[e]; row < offsets[e + 1]; row += GEMM_BM) {
            tile_expert[tiles] = e;
            tile_row[tiles] = row;
            ++tiles;
        }
    num_tiles[0] = tiles;
}

// Tensor-core fragments: 16x16x16 for fp16/bf16, 16x16x8 tf32 for float32 (fp32 accumulation in all).
template <typename T> struct MmaTraits {
    using Input = T;
    static constexpr int KSTEP = 16;
    static constexpr bool TF32 = false;
};
template <> struct MmaTraits<float> {
    using Input = nvcuda::wmma::precision::tf32;
    static constexpr int KSTEP = 8;
    static constexpr bool TF32 = true;
};

// Block = GEMM_WARPS warps computing a GEMM_BM x GEMM_BN tile of y for schedule entry blockIdx.x (blocks past
// num_tiles exit: the grid is sized from an upper bound, so nothing is read back on the host). Each warp owns a
// 32 x 32 quarter (2 x 2 fragments). x and w tiles are staged in shared memory (rows padded by 8 elements
// against bank conflicts), then the fp32 accumulators go through shared memory to guarded, converted stores.
// x [M, K], w [E, N, K], y [M, N], all T. vector_loads: K is a multiple of 16 bytes and x, w are 16-byte aligned.
template <typename T>
__global__ void __launch_bounds__(GEMM_WARPS * 32)
moe_grouped_gemm(const T* __restrict__ x, const T* __restrict__ w, const int* __restrict__ offsets,
                 const int* __restrict__ tile_expert, const int* __restrict__ tile_row,
                 const int* __restrict__ num_tiles, int K, int N, int vector_loads, T* __restrict__ y) {
    using namespace nvcuda;
    using Traits = MmaTraits<T>;
    constexpr int LDS = GEMM_BK + 8;
    constexpr int LDC = GEMM_BN + 4;
    __shared__ __align__(32) T xs[GEMM_BM * LDS];
    __shared__ __align__(32) T ws[GEMM_BN * LDS];
    __shared__ __align__(32) float cs[GEMM_BM * LDC];
    if (blockIdx.x >= num_tiles[0]) return;
    const int e = tile_expert[blockIdx.x];
    const int row0 = tile_row[blockIdx.x];
    const int rows = min(GEMM_BM, offsets[e + 1] - row0);
    const int col0 = blockIdx.y * GEMM_BN;
    const int warp = threadIdx.x / 32;
    const int warp_row = (warp / 2) * 32, warp_col = (warp % 2) * 32;
    const T* w_e = w + (long long)e * N * K;

    wmma::fragment<wmma::accumulator, 16, 16, Traits::KSTEP, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

    constexpr int VEC = 16 / sizeof(T);  // elements per 16-byte load
    for (int k0 = 0; k0 < K; k0 += GEMM_BK) {
        // consecutive threads read consecutive k: coalesced; out-of-range elements are zero
        if (vector_loads) {  // K % VEC == 0 and 16-byte aligned rows: one 16-byte load per VEC elements
#pragma unroll 1
            for (int idx = threadIdx.x; idx < GEMM_BM * GEMM_BK / VEC; idx += GEMM_WARPS * 32) {
                const int r = idx / (GEMM_BK / VEC), kk = (idx % (GEMM_BK / VEC)) * VEC;
                const bool in_k = k0 + kk < K;
                uint4 x_vec = make_uint4(0u, 0u, 0u, 0u), w_vec = make_uint4(0u, 0u, 0u, 0u);
                if (r < rows && in_k) x_vec = *reinterpret_cast<const uint4*>(x + (long long)(row0 + r) * K + k0 + kk);
                if (col0 + r < N && in_k)
                    w_vec = *reinterpret_cast<const uint4*>(w_e + (long long)(col0 + r) * K + k0 + kk);
                *reinterpret_cast<uint4*>(xs + r * LDS + kk) = x_vec;
                *reinterpret_cast<uint4*>(ws + r * LDS + kk) = w_vec;
            }
        } else {
#pragma unroll 4
            for (int idx = threadIdx.x; idx < GEMM_BM * GEMM_BK; idx += GEMM_WARPS * 32) {
                const int r = idx / GEMM_BK, kk = idx % GEMM_BK;
                const bool in_k = k0 + kk < K;
                xs[r * LDS + kk] = (r < rows && in_k) ? x[(long long)(row0 + r) * K + k0 + kk] : lab::from_float<T>(0.f);
                ws[r * LDS + kk] = (col0 + r < N && in_k) ? w_e[(long long)(col0 + r) * K + k0 + kk]
                                                          : lab::from_float<T>(0.f);
            }
        }
        __syncthreads();
#pragma unroll
        for (int ks = 0; ks < GEMM_BK; ks += Traits::KSTEP) {
            wmma::fragment<wmma::matrix_a, 16, 16, Traits::KSTEP, typename Traits::Input, wmma::row_major> a[2];
            wmma::fragment<wmma::matrix_b, 16, 16, Traits::KSTEP, typename Traits::Input, wmma::col_major> b[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                wmma::load_matrix_sync(a[i], xs + (warp_row + 16 * i) * LDS + ks, LDS);
                wmma::load_matrix_sync(b[i], ws + (warp_col + 16 * i) * LDS + ks, LDS);  // w^T, column-major
                if constexpr (Traits::TF32) {
                    for (int t = 0; t < a[i].num_elements; ++t) a[i].x[t] = wmma::__float_to_tf32(a[i].x[t]);
                    for (int t = 0; t < b[i].num_elements; ++t) b[i].x[t] = wmma::__float_to_tf32(b[i].x[t]);
                }
            }
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(cs + (warp_row + 16 * i) * LDC + warp_col + 16 * j, acc[i][j], LDC,
                                    wmma::mem_row_major);
    __syncthreads();
    for (int idx = threadIdx.x; idx < GEMM_BM * GEMM_BN; idx += GEMM_WARPS * 32) {
        const int r = idx / GEMM_BN, c = idx % GEMM_BN;
        if (r < rows && col0 + c < N) y[(long long)(row0 + r) * N + col0 + c] = lab::from_float<T>(cs[r * LDC + c]);
    }
}

// The instantiations the launcher uses (NVRTC looks them up by these names; nvcc emits their code).
template __global__ void moe_tile_counts<int>(const int*, long long, int, int*);
template __global__ void moe_tile_counts<long long>(const long long*, long long, int, int*);
template __global__ void moe_place<int>(const int*, long long, int, const int*, const int*, long long*);
template __global__ void moe_place<long long>(const long long*, long long, int, const int*, const int*, long long*);
template __global__ void moe_gather_rows<uint4>(const uint4*, const long long*, int, int, uint4*);
template __global__ void moe_gather_rows<uint2>(const uint2*, const long long*, int, int, uint2*);
template __global__ void moe_gather_rows<unsigned int>(const unsigned int*, const long long*, int, int, unsigned int*);
template __global__ void moe_gather_rows<unsigned short>(const unsigned short*, const long long*, int, int, unsigned short*);
#define LAB_MOE_DTYPE(T) \
    template __global__ void moe_unpermute<T>(const T*, const long long*, const float*, int, int, T*); \
    template __global__ void moe_grouped_gemm<T>(const T*, const T*, const int*, const int*, const int*, \
                                                 const int*, int, int, int, T*);
LAB_MOE_DTYPE(float)
LAB_MOE_DTYPE(__half)
LAB_MOE_DTYPE(__nv_bfloat16)
