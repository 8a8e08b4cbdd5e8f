// CUDA cosine-alignment reduction (float32/float64/bf16/fp16): one warp per row computes the
// row's (|)cos(|) in float32 (float64 for float64 inputs) in one pass; the mean over valid
// rows is a fixed-order ATen sum of those per-row values (no atomics: deterministic). The
// backward is one pass per row, reading the upstream gradient and the valid-row count from
// device memory (no host synchronisation).
#include <cmath>

#include "cuda_common.cuh"
#include "arg_checks.h"
#include "gca_cuda.h"

namespace gca {
namespace {

using namespace cuda_detail;

template <typename T, typename A>
__device__ __forceinline__ void row_stats(const T* a, const T* b, int64_t d, int lane, A& dt,
                                          A& na2, A& nb2) {
  A s = 0, p = 0, q = 0;
  for (int64_t c = lane; c < d; c += kWarp) {
    const A x = a[c], y = b[c];
    s += x * y;
    p += x * x;
    q += y * y;
  }
  dt = warp_sum(s);
  na2 = warp_sum(p);
  nb2 = warp_sum(q);
}

template <typename T, typename A>
__global__ void cos_rows_kernel(const T* __restrict__ x, const T* __restrict__ y,  // (R, d)
                                const bool* __restrict__ mask,                    // (R) or null
                                A* __restrict__ out,                              // (R)
                                int64_t R, int64_t d, bool absolute) {
  const int64_t r = warp_task();
  if (r >= R) return;
  const int lane = lane_id();
  A dt, na2, nb2;
  row_stats(x + r * d, y + r * d, d, lane, dt, na2, nb2);
  const A den = sqrt(na2) * sqrt(nb2);
  const A c = dt / (den > A(kCosEps) ? den : A(kCosEps));
  if (lane == 0) out[r] = (mask && !mask[r]) ? A(0) : (absolute ? fabs(c) : c);
}

template <typename T, typename A>
__global__ void cos_bwd_kernel(const T* __restrict__ gout,     // () upstream gradient
                               const int64_t* __restrict__ count,  // () number of valid rows
                               const T* __restrict__ x, const T* __restrict__ y,  // (R, d)
                               const bool* __restrict__ mask, T* __restrict__ dx,
                               T* __restrict__ dy, int64_t R, int64_t d, bool absolute) {
  const int64_t r = warp_task();
  if (r >= R) return;
  const int lane = lane_id();
  const T* a = x + r * d;
  const T* b = y + r * d;
  const int64_t n = *count;
  if ((mask && !mask[r]) || n == 0) {
    for (int64_t c = lane; c < d; c += kWarp) dx[r * d + c] = dy[r * d + c] = T(0);
    return;
  }
  A dt, na2, nb2;
  row_stats(a, b, d, lane, dt, na2, nb2);
  const A den = sqrt(na2) * sqrt(nb2);
  const bool floored = !(den > A(kCosEps));
  const A inv_den = floored ? A(1) / A(kCosEps) : A(1) / den;
  const A cs = dt * inv_den;
  const A sg = absolute ? A((cs > 0) - (cs < 0)) : A(1);
  const A gw = static_cast<A>(*gout) / A(n) * sg;
  const A ca = floored ? A(0) : cs / na2, cb = floored ? A(0) : cs / nb2;
  for (int64_t c = lane; c < d; c += kWarp) {
    const A av = a[c], bv = b[c];
    dx[r * d + c] = static_cast<T>(gw * (bv * inv_den - ca * av));
    dy[r * d + c] = static_cast<T>(gw * (av * inv_den - cb * bv));
  }
}

const std::vector<at::ScalarType> kCudaDtypes{at::kFloat, at::kDouble, at::kBFloat16, at::kHalf};

at::Tensor valid_count(const OptT& mask, const at::Tensor& x, int64_t rows) {
  return mask.has_value() ? mask->sum(at::kLong)
                          : at::full({}, rows, x.options().dtype(at::kLong));
}

}  // namespace

at::Tensor cos_fwd_cuda(const at::Tensor& x, const at::Tensor& y, const OptT& mask, bool absolute) {
  TORCH_CHECK(x.is_cuda(), "cos_fwd (cuda): x must be a CUDA tensor, got one on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const KernelScope scope;
  const int64_t R = check_cos_args("cos_fwd (cuda)", c10::DeviceType::CUDA, kCudaDtypes, x, y, mask);
  at::Tensor rows = at::empty({R}, x.options().dtype(acc_dtype(x.scalar_type())));
  if (R > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gca_cos_fwd_cuda", [&] {
      using A = at::opmath_type<scalar_t>;
      cos_rows_kernel<scalar_t, A><<<blocks_for(R), kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
          mask.has_value() ? mask->data_ptr<bool>() : nullptr, rows.data_ptr<A>(), R, x.size(-1), absolute);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const at::Tensor n = valid_count(mask, x, R).to(rows.scalar_type()).clamp_min(1);
  return (rows.sum() / n).to(x.scalar_type());
}

std::vector<at::Tensor> cos_bwd_cuda(const at::Tensor& gout, const at::Tensor& x,
                                     const at::Tensor& y, const OptT& mask, bool absolute) {
  TORCH_CHECK(x.is_cuda(), "cos_bwd (cuda): x must be a CUDA tensor, got one on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const KernelScope scope;
  const int64_t R = check_cos_args("cos_bwd (cuda)", c10::DeviceType::CUDA, kCudaDtypes, x, y, mask);
  TORCH_CHECK(gout.numel() == 1 && gout.device() == x.device() && gout.scalar_type() == x.scalar_type(),
              "cos_bwd (cuda): gout must be a one-element tensor of x's dtype on x's device");
  at::Tensor dx = at::empty_like(x), dy = at::empty_like(y);
  const at::Tensor n = valid_count(mask, x, R);
  const at::Tensor go = gout.contiguous();
  if (R > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gca_cos_bwd_cuda", [&] {
      using A = at::opmath_type<scalar_t>;
      cos_bwd_kernel<scalar_t, A><<<blocks_for(R), kThreads, 0, stream>>>(
          go.data_ptr<scalar_t>(), n.data_ptr<int64_t>(), x.data_ptr<scalar_t>(),
          y.data_ptr<scalar_t>(), mask.has_value() ? mask->data_ptr<bool>() : nullptr,
          dx.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), R, x.size(-1), absolute);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {dx, dy};
}

}  // namespace gca
