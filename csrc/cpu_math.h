// Scalar maths shared by the CPU row kernels: a vectorisable exp, the gate activations and
// their derivatives, and the per-row dot product / squared norms behind every cosine.
// GCA_ALWAYS_INLINE: the callers are target_clones (one body per ISA), and GCC does not inline
// a plain function into them on its own.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "gca_core.h"

#define GCA_ALWAYS_INLINE __attribute__((always_inline)) inline

namespace gca {

// exp for the softmax and the sigmoid gate. std::exp is a scalar libm call (GCC vectorises it
// only under -ffast-math), which made exp the bottleneck of the row loops in float32: float32
// gets the Cephes expf polynomial (relative error < 2e-7), written so that GCC vectorises it;
// float64 keeps std::exp. Arguments are clamped to [-87, 88] (exp(-87) ~ 1.6e-38 stands in for
// anything smaller, which is negligible next to the softmax's largest term, 1).
// always_inline: the callers are target_clones (one body per ISA), and GCC does not inline a
// plain function into them on its own (out of line, every exp would be a scalar call).
template <typename A>
GCA_ALWAYS_INLINE A vexp(A x) {
  return std::exp(x);
}
template <>
GCA_ALWAYS_INLINE float vexp<float>(float x) {
  // selects and the 1.5 * 2^23 rounding trick instead of std::min/max and std::floor: GCC
  // vectorises neither of those here (control flow, libm call)
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // nearest integer
  const float r = x - n * 0.693359375f - n * -2.12194440e-4f;  // ln 2 split in two: exact n ln2
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float s;
  std::memcpy(&s, &e, sizeof s);
  return p * s;
}

// The gate activation act(x) and its derivative expressed through its output g = act(x):
// sigmoid' = g (1 - g), tanh' = 1 - g^2.
template <int64_t Act, typename A>
GCA_ALWAYS_INLINE A activation(A x) {
  if constexpr (Act == kSigmoid) {
    return A(1) / (A(1) + vexp<A>(-x));
  } else {
    return std::tanh(x);
  }
}
template <typename A>
GCA_ALWAYS_INLINE A activation_grad(A g, int64_t act) {
  return act == kSigmoid ? g * (A(1) - g) : A(1) - g * g;
}

// <a, b>, |a|^2 and |b|^2 of one row of d values, accumulated in A.
template <typename T, typename A>
GCA_ALWAYS_INLINE void row_dot_norms(const T* a, const T* b, int64_t d, A& dot, A& na2, A& nb2) {
  A s = 0, p = 0, q = 0;
#pragma omp simd reduction(+ : s, p, q)
  for (int64_t c = 0; c < d; ++c) {
    const A x = a[c], y = b[c];
    s += x * y;
    p += x * x;
    q += y * y;
  }
  dot = s;
  na2 = p;
  nb2 = q;
}

// cos = <a, b> / max(|a| |b|, eps) from the row's sums; den = |a| |b| (unfloored).
template <typename A>
GCA_ALWAYS_INLINE void row_cos(A dot, A na2, A nb2, A& cos, A& den) {
  den = std::sqrt(na2) * std::sqrt(nb2);
  cos = dot / std::max(den, A(kCosEps));
}

// The gradient factors of cos(a, b) for one row: d cos / d a = b inv_den - ca a and
// d cos / d b = a inv_den - cb b, with ca = cb = 0 where the denominator is floored at eps.
template <typename A>
GCA_ALWAYS_INLINE void row_cos_grad_factors(A cos, A den, A na2, A nb2, A& inv_den, A& ca, A& cb) {
  const bool floored = !(den > A(kCosEps));
  inv_den = floored ? A(1) / A(kCosEps) : A(1) / den;
  ca = floored ? A(0) : cos / na2;
  cb = floored ? A(0) : cos / nb2;
}

}  // namespace gca
