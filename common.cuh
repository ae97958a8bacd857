// Helpers shared by the lab's CUDA C++ kernels. NVRTC-compatible: CUDA headers only, no host headers.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace lab {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// x as stored in a T between steps, back in float (round to nearest even; a no-op for float): a recurrent state
// kept in float registers or shared memory but stored as T (state_dtype).
template <typename T> __device__ __forceinline__ float stored(float x) { return to_float(from_float<T>(x)); }

// torch's softplus (beta 1, threshold 20) in float: log1p(e^x), x itself above 20.
__device__ __forceinline__ float softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int lane_mask = 16; lane_mask > 0; lane_mask >>= 1) x += __shfl_xor_sync(0xffffffffu, x, lane_mask);
    return x;
}

}  // namespace lab
