// CPU cosine-alignment reduction: mean over valid rows of |cos(x_i, y_i)|, forward and
// backward, each ONE pass over x and y (the eager reference makes about ten: product, sums,
// two norms, product, clamp, division, abs, masking, sum; and as many again backward).
//
// Rows are split into fixed chunks whose partial sums are added in chunk order, so the result
// is bit-identical whatever the number of threads. Accumulates in float32 (float64 inputs: in
// float64).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "gca_cpu.h"

namespace gca {
namespace {

constexpr int64_t kRowsPerChunk = 256;
const std::vector<at::ScalarType> kCpuDtypes{at::kFloat, at::kDouble};

template <typename T, typename A>
inline void row_stats(const T* a, const T* b, int64_t d, A& dt, A& na2, A& nb2) {
  A s = 0, p = 0, q = 0;
#pragma omp simd reduction(+ : s, p, q)
  for (int64_t c = 0; c < d; ++c) {
    const A x = a[c], y = b[c];
    s += x * y;
    p += x * x;
    q += y * y;
  }
  dt = s;
  na2 = p;
  nb2 = q;
}

template <typename T>
GCA_CPU_CLONES at::Tensor cos_fwd_impl(const at::Tensor& x_t, const at::Tensor& y_t, const bool* mask,
                        bool absolute) {
  using A = at::opmath_type<T>;
  const int64_t R = x_t.size(0), d = x_t.size(1);
  const T* x = x_t.data_ptr<T>();  // (R, d)
  const T* y = y_t.data_ptr<T>();  // (R, d)
  const int64_t nchunks = (R + kRowsPerChunk - 1) / kRowsPerChunk;
  std::vector<A> part(nchunks);
  std::vector<int64_t> cnt(nchunks);
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t ch = 0; ch < nchunks; ++ch) {
    A s = 0;
    int64_t n = 0;
    const int64_t r_end = std::min(R, (ch + 1) * kRowsPerChunk);
    for (int64_t r = ch * kRowsPerChunk; r < r_end; ++r) {
      if (mask && !mask[r]) continue;
      A dt, na2, nb2;
      row_stats(x + r * d, y + r * d, d, dt, na2, nb2);
      const A c = dt / std::max(std::sqrt(na2) * std::sqrt(nb2), A(kCosEps));
      s += absolute ? std::abs(c) : c;
      ++n;
    }
    part[ch] = s;
    cnt[ch] = n;
  }
  A total = 0;
  int64_t count = 0;
  for (int64_t ch = 0; ch < nchunks; ++ch) {
    total += part[ch];
    count += cnt[ch];
  }
  const A out = count > 0 ? total / A(count) : A(0);
  return at::scalar_tensor(out, x_t.options());
}

template <typename T>
GCA_CPU_CLONES void cos_bwd_impl(double gout, const at::Tensor& x_t, const at::Tensor& y_t, const bool* mask,
                  bool absolute, at::Tensor& dx_t, at::Tensor& dy_t) {
  using A = at::opmath_type<T>;
  const int64_t R = x_t.size(0), d = x_t.size(1);
  const T* x = x_t.data_ptr<T>();  // (R, d)
  const T* y = y_t.data_ptr<T>();  // (R, d)
  T* dx = dx_t.data_ptr<T>();      // (R, d)
  T* dy = dy_t.data_ptr<T>();      // (R, d)
  int64_t count = R;
  if (mask) {
    count = 0;
    for (int64_t r = 0; r < R; ++r) count += mask[r];
  }
  const A w = count > 0 ? A(gout) / A(count) : A(0);  // d mean / d row
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t r = 0; r < R; ++r) {
    const T* a = x + r * d;
    const T* b = y + r * d;
    T* da = dx + r * d;
    T* db = dy + r * d;
    if (mask && !mask[r]) {
      for (int64_t c = 0; c < d; ++c) da[c] = db[c] = T(0);
      continue;
    }
    A dt, na2, nb2;
    row_stats(a, b, d, dt, na2, nb2);
    const A den = std::sqrt(na2) * std::sqrt(nb2);
    const bool floored = !(den > A(kCosEps));
    const A inv_den = floored ? A(1) / A(kCosEps) : A(1) / den;
    const A cs = dt * inv_den;
    // |c|' = sign(c), with sign(0) = 0 as autograd's abs
    const A sg = absolute ? A((cs > 0) - (cs < 0)) : A(1);
    const A gw = w * sg;
    const A ca = floored ? A(0) : cs / na2, cb = floored ? A(0) : cs / nb2;
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) {
      const A av = a[c], bv = b[c];
      da[c] = static_cast<T>(gw * (bv * inv_den - ca * av));
      db[c] = static_cast<T>(gw * (av * inv_den - cb * bv));
    }
  }
}

const bool* mask_ptr(const OptT& m) { return m.has_value() ? m->data_ptr<bool>() : nullptr; }

}  // namespace

at::Tensor cos_fwd_cpu(const at::Tensor& x, const at::Tensor& y, const OptT& mask, bool absolute) {
  check_cos_args("cos_fwd (cpp)", c10::DeviceType::CPU, kCpuDtypes, x, y, mask);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gca_cos_fwd_cpu",
                             [&] { out = cos_fwd_impl<scalar_t>(x, y, mask_ptr(mask), absolute); });
  return out;
}

std::vector<at::Tensor> cos_bwd_cpu(const at::Tensor& gout, const at::Tensor& x,
                                    const at::Tensor& y, const OptT& mask, bool absolute) {
  check_cos_args("cos_bwd (cpp)", c10::DeviceType::CPU, kCpuDtypes, x, y, mask);
  TORCH_CHECK(gout.numel() == 1 && gout.device().is_cpu(),
              "cos_bwd (cpp): gout must be a one-element CPU tensor, got ", gout.sizes());
  const double go = gout.item<double>();
  at::Tensor dx = recycled_empty(x.sizes(), x.options()), dy = recycled_empty(y.sizes(), y.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gca_cos_bwd_cpu", [&] {
    cos_bwd_impl<scalar_t>(go, x, y, mask_ptr(mask), absolute, dx, dy);
  });
  return {dx, dy};
}

}  // namespace gca
