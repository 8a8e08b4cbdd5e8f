// CPU cosine-alignment reduction: mean over valid rows of |cos(x_i, y_i)|, forward and
// backward, each ONE pass over x and y (the eager reference makes about ten: product, sums,
// two norms, product, clamp, division, abs, masking, sum; and as many again backward).
//
// Rows are split into fixed chunks whose partial sums are added in chunk order, so the result
// is bit-identical whatever the number of threads. Accumulates in float32 (float64 inputs: in
// float64).
//
// The OpenMP regions read and write raw pointers only and call nothing in ATen, so the workers'
// thread-local state (grad mode, dispatch keys), which is not the caller's, never matters.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "arg_checks.h"
#include "cpu_math.h"
#include "cpu_memory.h"
#include "gca_cpu.h"

namespace gca {
namespace {

constexpr int64_t kRowsPerChunk = 256;
const std::vector<at::ScalarType> kCpuDtypes{at::kFloat, at::kDouble};

// The forward's result from its per-chunk partial sums and valid-row counts: the chunks added
// in chunk order (the same result whatever the number of threads), 0 when no row is valid.
template <typename A>
A chunk_mean(const std::vector<A>& part, const std::vector<int64_t>& cnt) {
  A total = 0;
  int64_t count = 0;
  for (size_t ch = 0; ch < part.size(); ++ch) {
    total += part[ch];
    count += cnt[ch];
  }
  return count > 0 ? total / A(count) : A(0);
}

// ---- float32: sixteen rows at a time, one vector lane per row ------------------------------
//
// Row by row, each row's three sums end in horizontal reductions of a vector and its cosine in
// scalar square roots and a division, one dependent chain per row: at small d that chain, not
// the reads, sets the speed. Here each of sixteen rows keeps its sums in a vector over its columns, and a fixed tree of shuffles turns
// the sixteen vectors into one vector of sixteen row sums, on which the cosine is computed
// lane-wise (vsqrtps and a vector division in the AVX-512 clone). The tree's order is fixed, so
// results stay bit-identical run to run.
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
constexpr int kLanes = 16;  // rows per group: lanes of v16f
// always_inline: the callers are target_clones, and GCC does not inline plain functions into
// them; out of line these would be compiled for the baseline ISA and called per row.

GCA_ALWAYS_INLINE v16f load16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// the first n (< 16) floats of p, zeros after
GCA_ALWAYS_INLINE v16f load_part(const float* p, int64_t n) {
  v16f v = {};
  std::memcpy(&v, p, n * sizeof(float));
  return v;
}

// Per-lane partial sums of x.y, x.x and y.y over one row's d columns (the lanes are then summed
// by lane_sums).
GCA_ALWAYS_INLINE void row_partials(const float* a, const float* b, int64_t d, v16f& s, v16f& p, v16f& q) {
  v16f s0 = {}, p0 = {}, q0 = {};
  int64_t c = 0;
  for (; c + kLanes <= d; c += kLanes) {
    const v16f x = load16(a + c), y = load16(b + c);
    s0 += x * y;
    p0 += x * x;
    q0 += y * y;
  }
  if (c < d) {
    const v16f x = load_part(a + c, d - c), y = load_part(b + c, d - c);
    s0 += x * y;
    p0 += x * x;
    q0 += y * y;
  }
  s = s0;
  p = p0;
  q = q0;
}

// out[i] = sum of the lanes of v[i], i < 16: four rounds of pairwise folds, each adding the two
// halves of every row's remaining lanes (8, 4, 2, 1), two rows' halves packed into one vector.
GCA_ALWAYS_INLINE v16f lane_sums(const v16f* v) {
  v16f t1[8], t2[4], t3[2];
  for (int k = 0; k < 8; ++k)
    t1[k] = __builtin_shuffle(v[2 * k], v[2 * k + 1],
                              v16i{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}) +
            __builtin_shuffle(v[2 * k], v[2 * k + 1],
                              v16i{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
  for (int k = 0; k < 4; ++k)
    t2[k] = __builtin_shuffle(t1[2 * k], t1[2 * k + 1],
                              v16i{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27}) +
            __builtin_shuffle(t1[2 * k], t1[2 * k + 1],
                              v16i{4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31});
  for (int k = 0; k < 2; ++k)
    t3[k] = __builtin_shuffle(t2[2 * k], t2[2 * k + 1],
                              v16i{0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29}) +
            __builtin_shuffle(t2[2 * k], t2[2 * k + 1],
                              v16i{2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31});
  return __builtin_shuffle(t3[0], t3[1],
                           v16i{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}) +
         __builtin_shuffle(t3[0], t3[1],
                           v16i{1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31});
}

// The three sums of rows r0 .. r0 + n - 1 (n <= 16), lane i for row r0 + i; rows that are
// masked out (or past n) read nothing and get 0 (valid: -1 in their lane where the row counts).
GCA_ALWAYS_INLINE void group_stats(const float* x, const float* y, const bool* mask, int64_t r0, int64_t n,
                        int64_t d, v16f& s, v16f& p, v16f& q, v16i& valid) {
  v16f S[kLanes], P[kLanes], Q[kLanes];
  for (int i = 0; i < kLanes; ++i) {
    const int64_t r = r0 + i;
    const bool ok = i < n && (!mask || mask[r]);
    valid[i] = ok ? -1 : 0;
    if (ok) {
      row_partials(x + r * d, y + r * d, d, S[i], P[i], Q[i]);
    } else {
      S[i] = P[i] = Q[i] = v16f{};
    }
  }
  s = lane_sums(S);
  p = lane_sums(P);
  q = lane_sums(Q);
}

// lane-wise sqrt (GCC emits vsqrtps: the extension is built with -fno-math-errno)
GCA_ALWAYS_INLINE v16f vsqrt(v16f v) {
  v16f r;
  for (int i = 0; i < kLanes; ++i) r[i] = __builtin_sqrtf(v[i]);
  return r;
}

// std::max's semantics lane-wise (a NaN first argument is kept)
GCA_ALWAYS_INLINE v16f vmax(v16f a, v16f b) { return a < b ? b : a; }

GCA_ALWAYS_INLINE bool any_valid(const bool* mask, int64_t r0, int64_t n) {
  if (!mask) return n > 0;
  for (int64_t i = 0; i < n; ++i)
    if (mask[r0 + i]) return true;
  return false;
}

GCA_CPU_CLONES float cos_fwd_f32(const float* x, const float* y, const bool* mask, int64_t R,
                                 int64_t d, bool absolute) {
  const int64_t nchunks = (R + kRowsPerChunk - 1) / kRowsPerChunk;
  std::vector<float> part(nchunks);
  std::vector<int64_t> cnt(nchunks);
  const v16f eps = v16f{} + static_cast<float>(kCosEps);
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t ch = 0; ch < nchunks; ++ch) {
    v16f acc = {};
    int64_t n_ok = 0;
    const int64_t r_end = std::min(R, (ch + 1) * kRowsPerChunk);
    for (int64_t r0 = ch * kRowsPerChunk; r0 < r_end; r0 += kLanes) {
      const int64_t n = std::min<int64_t>(kLanes, r_end - r0);
      if (!any_valid(mask, r0, n)) continue;
      v16f s, p, q;
      v16i valid;
      group_stats(x, y, mask, r0, n, d, s, p, q, valid);
      v16f c = s / vmax(vsqrt(p) * vsqrt(q), eps);
      if (absolute) c = c < 0 ? -c : c;
      acc += valid ? c : v16f{};
      for (int i = 0; i < kLanes; ++i) n_ok += valid[i] != 0;
    }
    float t = 0;
    for (int i = 0; i < kLanes; ++i) t += acc[i];
    part[ch] = t;
    cnt[ch] = n_ok;
  }
  return chunk_mean(part, cnt);
}

// The backward reads a group's rows twice (its sums, then the gradients): that pays while the
// sixteen rows of x and y stay in L1 (8 KiB at d = 64). Wider rows come back from L2 on the
// second read, and there the row-by-row loop (each row read once, then written) is used.
constexpr int64_t kBwdGroupMaxD = 64;

GCA_CPU_CLONES void cos_bwd_f32(float w, const float* x, const float* y, const bool* mask,
                                int64_t R, int64_t d, bool absolute, float* dx, float* dy) {
  const int64_t ngroups = (R + kLanes - 1) / kLanes;
  const v16f eps = v16f{} + static_cast<float>(kCosEps);
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t gi = 0; gi < ngroups; ++gi) {
    const int64_t r0 = gi * kLanes, n = std::min<int64_t>(kLanes, R - r0);
    v16f s = {}, p = {}, q = {};
    v16i valid = {};
    if (any_valid(mask, r0, n)) group_stats(x, y, mask, r0, n, d, s, p, q, valid);
    const v16f den = vsqrt(p) * vsqrt(q);
    const v16i above = den > eps;  // false where the floor applies (NaN included)
    const v16f one = v16f{} + 1.f;
    const v16f inv_den = one / (above ? den : eps);
    const v16f cs = s * inv_den;
    // |c|' = sign(c), with sign(0) = 0 as autograd's abs
    const v16f sg = absolute ? (cs > 0 ? one : (cs < 0 ? -one : v16f{})) : one;
    const v16f gw = w * sg;
    // floored rows: ca = cb = 0 (there p or q may be 0: cs / 0 is never formed)
    const v16f ca = above ? cs / (above ? p : one) : v16f{};
    const v16f cb = above ? cs / (above ? q : one) : v16f{};
    for (int i = 0; i < n; ++i) {
      const int64_t r = r0 + i;
      const float* a = x + r * d;
      const float* b = y + r * d;
      float* da = dx + r * d;
      float* db = dy + r * d;
      if (!valid[i]) {
        std::memset(da, 0, d * sizeof(float));
        std::memset(db, 0, d * sizeof(float));
        continue;
      }
      const float g = gw[i], id = inv_den[i], fa = ca[i], fb = cb[i];
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) {
        const float av = a[c], bv = b[c];
        da[c] = g * (bv * id - fa * av);
        db[c] = g * (av * id - fb * bv);
      }
    }
  }
}

template <typename T>
GCA_CPU_CLONES at::Tensor cos_fwd_impl(const at::Tensor& x_t, const at::Tensor& y_t, const bool* mask,
                        bool absolute) {
  using A = at::opmath_type<T>;
  const int64_t d = x_t.size(-1), R = x_t.numel() / d;
  const T* x = x_t.data_ptr<T>();  // (R, d)
  const T* y = y_t.data_ptr<T>();  // (R, d)
  if constexpr (std::is_same_v<T, float>)
    return at::scalar_tensor(cos_fwd_f32(x, y, mask, R, d, absolute), x_t.options());
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
      A dt, na2, nb2, c, den;
      row_dot_norms(x + r * d, y + r * d, d, dt, na2, nb2);
      row_cos(dt, na2, nb2, c, den);
      s += absolute ? std::abs(c) : c;
      ++n;
    }
    part[ch] = s;
    cnt[ch] = n;
  }
  return at::scalar_tensor(chunk_mean(part, cnt), x_t.options());
}

template <typename T>
GCA_CPU_CLONES void cos_bwd_impl(double gout, const at::Tensor& x_t, const at::Tensor& y_t, const bool* mask,
                  bool absolute, at::Tensor& dx_t, at::Tensor& dy_t) {
  using A = at::opmath_type<T>;
  const int64_t d = x_t.size(-1), R = x_t.numel() / d;
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
  if constexpr (std::is_same_v<T, float>) {
    if (d <= kBwdGroupMaxD) {
      cos_bwd_f32(w, x, y, mask, R, d, absolute, dx, dy);
      return;
    }
  }
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
    A dt, na2, nb2, c, den, inv_den, ca, cb;
    row_dot_norms(a, b, d, dt, na2, nb2);
    row_cos(dt, na2, nb2, c, den);
    row_cos_grad_factors(c, den, na2, nb2, inv_den, ca, cb);
    // |c|' = sign(c), with sign(0) = 0 as autograd's abs
    const A gw = w * (absolute ? A((c > 0) - (c < 0)) : A(1));
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
  const KernelScope scope;
  check_cos_args("cos_fwd (cpp)", c10::DeviceType::CPU, kCpuDtypes, x, y, mask);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gca_cos_fwd_cpu",
                             [&] { out = cos_fwd_impl<scalar_t>(x, y, mask_ptr(mask), absolute); });
  return out;
}

std::vector<at::Tensor> cos_bwd_cpu(const at::Tensor& gout, const at::Tensor& x,
                                    const at::Tensor& y, const OptT& mask, bool absolute) {
  const KernelScope scope;
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
