// Small numeric helpers shared by the CPU row kernels.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace gca {

// exp for the softmax and the sigmoid gate. std::exp is a scalar libm call (GCC vectorises it
// only under -ffast-math), which made exp the bottleneck of the row loops in float32: float32
// gets the Cephes expf polynomial (relative error < 2e-7), written so that GCC vectorises it;
// float64 keeps std::exp. Arguments are clamped to [-87, 88] (exp(-87) ~ 1.6e-38 stands in for
// anything smaller, which is negligible next to the softmax's largest term, 1).
// always_inline: the callers are target_clones (one body per ISA), and GCC does not inline a
// plain function into them on its own; out of line, every exp was a scalar call (perf: 5% of a
// forward+backward at d = 64 spent in the call, and the gate loop not vectorised).
template <typename A>
__attribute__((always_inline)) inline A vexp(A x) {
  return std::exp(x);
}
template <>
__attribute__((always_inline)) inline float vexp<float>(float x) {
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

}  // namespace gca
