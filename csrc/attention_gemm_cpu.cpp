// Masked multi-head attention of dense batches on the CPU, as batched matrix products.
//
// When every query row sees (nearly) every key - full-length sequences, no cross mask - the
// tiles of gca_cpu.cpp have no hidden keys to skip, and the work is five (B, La, Lb, dh)
// products per head: S = Q K^T and O = P V forward; S again, dP = dO V^T, dQ = dS K,
// dK = dS^T Q and dV = P^T dO backward. Here they run as ATen batched products (MKL's batched
// GEMM), which reach the machine's GEMM rate, and everything between them is one row pass:
//
//   forward   P = softmax(S) over the unpadded keys, lse = max + log(sum); rows with no
//             visible key get P = 0 (so O = 0) and lse = +inf, as in the tiles;
//   backward  P = exp(S - lse), D = sum_j P_j dP_j, dS = P (dP - D).
//
// Memory: two (B, La, Lb) buffers per call (S/P and dP/dS), reused across heads; the eager
// reference keeps several such tensors per head for autograd. q comes scaled by 1 / sqrt(dh)
// on the CPU (Dims::q_scaled), so S needs no scale and dK = dS^T q; dq is the gradient of the
// unscaled projection (scale dS K), as the tiles write it.
//
// The row passes read and write raw pointers only (no ATen call on the OpenMP workers); the
// products run on the calling thread, under its KernelScope.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu_math.h"
#include "gca_core.h"
#include "gca_cpu.h"

namespace gca {
namespace {

// Softmax of one row of scores in place over its unpadded keys; returns the row's lse
// (+inf and p = 0 when no key is visible).
template <typename T>
GCA_CPU_CLONES void softmax_rows(T* s, int64_t rows, int64_t Lb, const bool* kpm, int64_t La,
                                 int64_t r0, T scale, T* lse, int64_t lse_stride) {
  using A = at::opmath_type<T>;
  const A inf = std::numeric_limits<A>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    T* sr = s + r * Lb;
    const bool* m = kpm ? kpm + ((r0 + r) / La) * Lb : nullptr;
    A mx = -inf;
    for (int64_t j = 0; j < Lb; ++j) {
      const A v = A(sr[j]) * scale;
      mx = (!(m && m[j]) && v > mx) ? v : mx;
    }
    if (mx == -inf) {  // no visible key
      for (int64_t j = 0; j < Lb; ++j) sr[j] = T(0);
      lse[(r0 + r) * lse_stride] = inf;
      continue;
    }
    A l = 0;
#pragma omp simd reduction(+ : l)
    for (int64_t j = 0; j < Lb; ++j) {
      const A e = (m && m[j]) ? A(0) : vexp<A>(A(sr[j]) * scale - mx);
      sr[j] = T(e);
      l += e;
    }
    const A f = A(1) / l;
#pragma omp simd
    for (int64_t j = 0; j < Lb; ++j) sr[j] = T(A(sr[j]) * f);
    lse[(r0 + r) * lse_stride] = mx + std::log(l);
  }
}

// p = exp(s - lse) in place (s), ds = p (dp - D) in place (dp), D = sum_j p_j dp_j.
template <typename T>
GCA_CPU_CLONES void softmax_grad_rows(T* s, T* dp, int64_t rows, int64_t Lb, const bool* kpm,
                                      int64_t La, int64_t r0, T scale, const T* lse,
                                      int64_t lse_stride) {
  using A = at::opmath_type<T>;
  for (int64_t r = 0; r < rows; ++r) {
    T* sr = s + r * Lb;
    T* dr = dp + r * Lb;
    const bool* m = kpm ? kpm + ((r0 + r) / La) * Lb : nullptr;
    const A lr = lse[(r0 + r) * lse_stride];
    if (std::isinf(lr)) {  // no visible key: p = 0, nothing flows
      for (int64_t j = 0; j < Lb; ++j) sr[j] = dr[j] = T(0);
      continue;
    }
    A D = 0;
#pragma omp simd reduction(+ : D)
    for (int64_t j = 0; j < Lb; ++j) {
      const A p = (m && m[j]) ? A(0) : vexp<A>(A(sr[j]) * scale - lr);
      sr[j] = T(p);
      D += p * A(dr[j]);
    }
#pragma omp simd
    for (int64_t j = 0; j < Lb; ++j) dr[j] = T(A(sr[j]) * (A(dr[j]) - D));
  }
}

// Rows are split in fixed chunks (independent of the thread count).
constexpr int64_t kRowChunk = 64;

// (B, L, ncols) view of a (B*L, ncols) matrix, columns [c0, c0 + w): the head's slice.
at::Tensor head_view(const at::Tensor& t, int64_t B, int64_t L, int64_t c0, int64_t w) {
  return t.view({B, L, t.size(1)}).narrow(2, c0, w);
}

}  // namespace

bool attn_gemm_applies(const at::Tensor& am, const Dims& dm) {
  // a cross mask hides keys the tiles skip (causal: half of them); compacted rows are
  // gathered for the tiles' row maps
  return !am.defined() && dm.qrow == nullptr && dm.kpos == nullptr;
}

void attn_fwd_gemm(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& kpm,
                   at::Tensor& o, at::Tensor& lse, const Dims& dm) {
  const int64_t B = dm.B, La = dm.La, Lb = dm.Lb, d = dm.d, H = dm.H, dh = d / H;
  const int64_t N = B * La;
  const double scale = dm.q_scaled ? 1.0 : 1.0 / std::sqrt(static_cast<double>(dh));
  at::Tensor s = recycled_empty({B, La, Lb}, q.options());
  const bool* m = kpm.defined() ? kpm.data_ptr<bool>() : nullptr;
  for (int64_t h = 0; h < H; ++h) {
    at::bmm_out(s, head_view(q, B, La, h * dh, dh), head_view(kv, B, Lb, h * dh, dh).transpose(1, 2));
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "gca_attn_fwd_gemm", [&] {
      scalar_t* sp = s.data_ptr<scalar_t>();
      scalar_t* lp = lse.data_ptr<scalar_t>() + h;
      at::parallel_for(0, (N + kRowChunk - 1) / kRowChunk, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {  // raw memory, no ATen call
          const int64_t r0 = c * kRowChunk, n = std::min(kRowChunk, N - r0);
          softmax_rows<scalar_t>(sp + r0 * Lb, n, Lb, m, La, r0, static_cast<scalar_t>(scale), lp, H);
        }
      });
    });
    at::Tensor oh = head_view(o, B, La, h * dh, dh);
    at::bmm_out(oh, s, head_view(kv, B, Lb, d + h * dh, dh));
  }
}

void attn_bwd_gemm(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& dout,
                   const at::Tensor& lse, const at::Tensor& kpm, at::Tensor& dq, at::Tensor& dkv,
                   const Dims& dm) {
  const int64_t B = dm.B, La = dm.La, Lb = dm.Lb, d = dm.d, H = dm.H, dh = d / H;
  const int64_t N = B * La;
  const double full = 1.0 / std::sqrt(static_cast<double>(dh));
  const double scale = dm.q_scaled ? 1.0 : full;
  at::Tensor s = recycled_empty({B, La, Lb}, q.options());
  at::Tensor ds = recycled_empty({B, La, Lb}, q.options());
  const bool* m = kpm.defined() ? kpm.data_ptr<bool>() : nullptr;
  for (int64_t h = 0; h < H; ++h) {
    const at::Tensor qh = head_view(q, B, La, h * dh, dh), doh = head_view(dout, B, La, h * dh, dh);
    const at::Tensor kh = head_view(kv, B, Lb, h * dh, dh), vh = head_view(kv, B, Lb, d + h * dh, dh);
    at::bmm_out(s, qh, kh.transpose(1, 2));
    at::bmm_out(ds, doh, vh.transpose(1, 2));  // dp
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "gca_attn_bwd_gemm", [&] {
      scalar_t* sp = s.data_ptr<scalar_t>();
      scalar_t* dp = ds.data_ptr<scalar_t>();
      const scalar_t* lp = lse.data_ptr<scalar_t>() + h;
      at::parallel_for(0, (N + kRowChunk - 1) / kRowChunk, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {  // raw memory, no ATen call
          const int64_t r0 = c * kRowChunk, n = std::min(kRowChunk, N - r0);
          softmax_grad_rows<scalar_t>(sp + r0 * Lb, dp + r0 * Lb, n, Lb, m, La, r0,
                                      static_cast<scalar_t>(scale), lp, H);
        }
      });
    });
    // dq of the unscaled projection: dS K times the scores' factor 1 / sqrt(dh)
    at::Tensor dqh = head_view(dq, B, La, h * dh, dh);
    at::baddbmm_out(dqh, dqh, ds, kh, /*beta=*/0.0, /*alpha=*/full);
    at::Tensor dkh = head_view(dkv, B, Lb, h * dh, dh), dvh = head_view(dkv, B, Lb, d + h * dh, dh);
    // dK = dS^T q: q holds the scaled projection on the CPU; otherwise the scale goes here
    at::baddbmm_out(dkh, dkh, ds.transpose(1, 2), qh, /*beta=*/0.0, /*alpha=*/dm.q_scaled ? 1.0 : full);
    at::bmm_out(dvh, s.transpose(1, 2), doh);
  }
}

}  // namespace gca
