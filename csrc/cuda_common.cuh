// Helpers shared by the CUDA kernels: warp reductions, launch geometry and dtype dispatch.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

namespace gca {
namespace cuda_detail {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;  // one task (row, or row x head) per warp
constexpr int kThreads = kWarp * kWarpsPerBlock;

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;  // every lane holds the total
}

template <typename A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) {
    const A o = __shfl_xor_sync(0xffffffffu, v, off);
    v = o > v ? o : v;
  }
  return v;  // every lane holds the maximum
}

// 64-bit index of this warp's task, and the lane.
__device__ __forceinline__ int64_t warp_task() {
  return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
}
__device__ __forceinline__ int lane_id() { return threadIdx.x % kWarp; }

inline unsigned int blocks_for(int64_t tasks) {
  return static_cast<unsigned int>((tasks + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

#define GCA_CUDA_DISPATCH(t, name, ...)                                                   \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), name, [&] { \
    using A = at::opmath_type<scalar_t>;                                              \
    __VA_ARGS__;                                                                      \
  })

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace cuda_detail
}  // namespace gca
