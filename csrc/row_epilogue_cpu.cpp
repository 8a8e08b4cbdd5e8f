// CPU row epilogue kernels of the fused GCA operator (float32, float64), OpenMP over rows:
// - forward: x' = o Wo^T + bo where a key was seen (0 elsewhere) with cos(x_a, x'); the gate
//   activation, residual and LayerNorm y = LN(x_a + act(g + b2) * x'), one pass per row;
// - backward: that pass's gradient with the cosine's, one pass per row, and the column sums of
//   the bias and LayerNorm-parameter gradients (fixed row chunks reduced in chunk order:
//   bit-identical whatever the number of threads); bias + ReLU and its backward.
//
// The OpenMP regions read and write raw pointers only and call nothing in ATen, so the workers'
// thread-local state (grad mode, dispatch keys), which is not the caller's, never matters.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_kernels.h"
#include "cpu_math.h"

namespace gca {
namespace {

constexpr int64_t kRowsPerChunk = 64;  // rows per partial sum of the parameter reductions

template <typename T>
GCA_CPU_CLONES void xprime_fwd_impl(at::Tensor& xp_t, const at::Tensor& bo_t, const at::Tensor& lse_t,
                     const at::Tensor& xa_t, at::Tensor& cos_t, const RowLayout& lay) {
  using A = at::opmath_type<T>;
  const int64_t N = lay.B * lay.La, d = lay.d, H = lay.H;
  T* xp = xp_t.data_ptr<T>();           // (N, d): o Wo^T on entry, x' on exit
  const T* bo = bo_t.data_ptr<T>();     // (d)
  const A* lse = lse_t.data_ptr<A>();   // (N, H)
  const T* xa = xa_t.data_ptr<T>();     // (N, d)
  T* cos = cos_t.data_ptr<T>();         // (N)
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t r = 0; r < N; ++r) {
    const int64_t rc = lay.qpos ? lay.qpos[r] : r;  // row of xp (compact: active rows only)
    const T* ar = xa + r * d;
    if (rc < 0) {  // not stored: no visible key, x' = 0 and cos = 0
      cos[r] = T(0);
      continue;
    }
    T* xr = xp + rc * d;
    if (std::isinf(lse[r * H])) {  // no visible key: x' = 0 exactly, bias not added
      for (int64_t c = 0; c < d; ++c) xr[c] = T(0);
      cos[r] = T(0);
      continue;
    }
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) xr[c] = static_cast<T>(xr[c] + bo[c]);
    A dt, na2, nb2, cs, den;
    row_dot_norms(ar, xr, d, dt, na2, nb2);
    row_cos(dt, na2, nb2, cs, den);
    cos[r] = static_cast<T>(cs);
  }
}

// One row of the gate pass: g = act(g + b2) in place (rounded to T before the activation, as
// the eager reference's bias add is), z = x_a + g x' into zp, and the sums of z (LayerNorm
// mean) and of <x_a, x'>, |x_a|^2, |x'|^2 (cosine).
template <int64_t Act, typename T, typename A>
GCA_ALWAYS_INLINE void gate_row(T* gr, const T* b2, const T* ar, const T* pr, A* zp, int64_t d,
                                A& sum, A& dt, A& na2, A& nb2) {
#pragma omp simd reduction(+ : sum, dt, na2, nb2)
  for (int64_t c = 0; c < d; ++c) {
    const A pre = static_cast<A>(static_cast<T>(static_cast<A>(gr[c]) + static_cast<A>(b2[c])));
    const T gv = static_cast<T>(activation<Act, A>(pre));
    gr[c] = gv;
    const A a = ar[c], pv = pr[c];
    const A zc = a + static_cast<A>(gv) * pv;
    zp[c] = zc;
    sum += zc;
    dt += a * pv;
    na2 += a * a;
    nb2 += pv * pv;
  }
}

template <typename T>
GCA_CPU_CLONES void gate_out_fwd_impl(const at::Tensor& xa_t, const at::Tensor& xp_t, at::Tensor& g_t,
                       const at::Tensor& b2_t, const at::Tensor& lnw_t, const at::Tensor& lnb_t, at::Tensor& y_t,
                       at::Tensor& mean_t, at::Tensor& rstd_t, at::Tensor& cos_t, int64_t act,
                       double eps, const RowLayout& lay) {
  using A = at::opmath_type<T>;
  const int64_t N = lay.B * lay.La, d = lay.d;
  const T* xa = xa_t.data_ptr<T>();   // (N, d)
  const T* xp = xp_t.data_ptr<T>();   // (N, d)
  T* g = g_t.data_ptr<T>();           // (N, d): h W2^T in, gate out
  const T* b2 = b2_t.data_ptr<T>();   // (d): added here, not by the product (one pass less)
  const bool ln = lnw_t.defined();
  const T* lnw = ln ? lnw_t.data_ptr<T>() : nullptr;  // (d)
  const T* lnb = ln ? lnb_t.data_ptr<T>() : nullptr;  // (d)
  T* y = y_t.data_ptr<T>();           // (N, d)
  A* mean = ln ? mean_t.data_ptr<A>() : nullptr;  // (N)
  A* rstd = ln ? rstd_t.data_ptr<A>() : nullptr;  // (N)
  // (N) cos(x_a, x') when defined (then x' holds its bias already and xprime_fwd did not run):
  // formed here from the rows this pass loads anyway
  T* cos = cos_t.defined() ? cos_t.data_ptr<T>() : nullptr;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<A> z(d);
    A* zp = z.data();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < N; ++r) {
      const int64_t rc = lay.qpos ? lay.qpos[r] : r;  // row of xp and g (compact: active rows)
      const T* ar = xa + r * d;
      T* yr = y + r * d;
      A sum = 0, dt = 0, na2 = 0, nb2 = 0;  // (the last three for cos)
      if (rc < 0) {  // x' = 0: z = x_a, whatever the gate
        for (int64_t c = 0; c < d; ++c) {
          zp[c] = static_cast<A>(ar[c]);
          sum += zp[c];
        }
        if (cos) cos[r] = T(0);
      } else if (act == kSigmoid) {
        gate_row<kSigmoid>(g + rc * d, b2, ar, xp + rc * d, zp, d, sum, dt, na2, nb2);
      } else {
        gate_row<kTanh>(g + rc * d, b2, ar, xp + rc * d, zp, d, sum, dt, na2, nb2);
      }
      if (cos && rc >= 0) {
        A cs, den;
        row_cos(dt, na2, nb2, cs, den);
        cos[r] = static_cast<T>(cs);
      }
      if (!ln) {
        for (int64_t c = 0; c < d; ++c) yr[c] = static_cast<T>(zp[c]);
        continue;
      }
      const A mu = sum / A(d);
      A var = 0;
#pragma omp simd reduction(+ : var)
      for (int64_t c = 0; c < d; ++c) var += (zp[c] - mu) * (zp[c] - mu);
      const A rs = A(1) / std::sqrt(var / A(d) + A(eps));
      mean[r] = mu;
      rstd[r] = rs;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c)
        yr[c] = static_cast<T>((zp[c] - mu) * rs * static_cast<A>(lnw[c]) + static_cast<A>(lnb[c]));
    }
  }
}

template <typename T>
GCA_CPU_CLONES void gate_out_bwd_impl(const at::Tensor& dy_t, const at::Tensor& dcos_t, const at::Tensor& xa_t,
                       const at::Tensor& xp_t, const at::Tensor& g_t, const at::Tensor& lnw_t,
                       const at::Tensor& mean_t, const at::Tensor& rstd_t, at::Tensor& dg_pre_t,
                       at::Tensor& db2_t, at::Tensor& dxp_t, at::Tensor& dxa_t, at::Tensor& dlnw_t,
                       at::Tensor& dlnb_t, at::Tensor& dxp_colsum_t, int64_t act, const RowLayout& lay) {
  using A = at::opmath_type<T>;
  const int64_t N = lay.B * lay.La, d = lay.d;
  const T* dy = dy_t.data_ptr<T>();      // (N, d)
  const T* dcos = dcos_t.data_ptr<T>();  // (N)
  const T* xa = xa_t.data_ptr<T>();      // (N, d)
  const T* xp = xp_t.data_ptr<T>();      // (N, d)
  const T* g = g_t.data_ptr<T>();        // (N, d), post-activation
  const bool ln = lnw_t.defined();
  const T* lnw = ln ? lnw_t.data_ptr<T>() : nullptr;
  const A* mean = ln ? mean_t.data_ptr<A>() : nullptr;
  const A* rstd = ln ? rstd_t.data_ptr<A>() : nullptr;
  T* dg_pre = dg_pre_t.data_ptr<T>();          // (N, d): gradient of the gate pre-activation
  T* dxp = dxp_t.data_ptr<T>();          // (N, d)
  T* dxa = dxa_t.data_ptr<T>();          // (N, d)
  const int64_t nchunks = (N + kRowsPerChunk - 1) / kRowsPerChunk;
  // per-chunk partial sums of dy * zhat and dy (LayerNorm weight and bias gradients), of
  // dg_pre (b2's gradient) and, when asked for, of dxp (part of bo's gradient): summed here,
  // while each row is in registers, not in passes of their own
  const bool sum_dxp = dxp_colsum_t.defined();
  constexpr int64_t np = 4;
  std::vector<A> part(nchunks * np * d);
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<A> zh(d), dz(d);
    A* zhp = zh.data();
    A* dzp = dz.data();
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < nchunks; ++ch) {
      A* part_db2 = part.data() + ch * np * d;
      A* part_dlnw = ln ? part_db2 + d : nullptr;
      A* part_dlnb = ln ? part_db2 + 2 * d : nullptr;
      A* part_dxp = part_db2 + 3 * d;
      std::fill(part_db2, part_db2 + np * d, A(0));
      const int64_t r_end = std::min(N, (ch + 1) * kRowsPerChunk);
      for (int64_t r = ch * kRowsPerChunk; r < r_end; ++r) {
        const int64_t rc = lay.qpos ? lay.qpos[r] : r;  // row of xp, g, dg_pre, dxp
        const T* dyr = dy + r * d;
        const T* ar = xa + r * d;
        const T* pr = rc < 0 ? nullptr : xp + rc * d;
        const T* gr = rc < 0 ? nullptr : g + rc * d;
        if (ln) {
          const A mu = mean[r], rs = rstd[r];
          if (pr) {  // z, kept in zh until zhat replaces it
#pragma omp simd
            for (int64_t c = 0; c < d; ++c)
              zhp[c] = static_cast<A>(ar[c]) + static_cast<A>(gr[c]) * static_cast<A>(pr[c]);
          } else {
            for (int64_t c = 0; c < d; ++c) zhp[c] = static_cast<A>(ar[c]);
          }
          A s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
          for (int64_t c = 0; c < d; ++c) {
            const A zhat = (zhp[c] - mu) * rs;
            const A dyc = dyr[c];
            const A dzh = dyc * static_cast<A>(lnw[c]);
            zhp[c] = zhat;
            dzp[c] = dzh;
            s1 += dzh;
            s2 += dzh * zhat;
            part_dlnw[c] += dyc * zhat;
            part_dlnb[c] += dyc;
          }
          const A m1 = s1 / A(d), m2 = s2 / A(d);
#pragma omp simd
          for (int64_t c = 0; c < d; ++c) dzp[c] = rs * (dzp[c] - m1 - zhp[c] * m2);
        } else {
          for (int64_t c = 0; c < d; ++c) dzp[c] = dyr[c];
        }
        if (!pr) {  // x' = 0 (not stored): the cosine is 0 whatever x_a, nothing reaches x'
          T* dxar = dxa + r * d;
          for (int64_t c = 0; c < d; ++c) dxar[c] = static_cast<T>(dzp[c]);
          continue;
        }
        // cosine: c = <a, b> / max(|a||b|, eps)
        A dt, na2, nb2, cs, den, inv_den, ca, cb;
        row_dot_norms(ar, pr, d, dt, na2, nb2);
        row_cos(dt, na2, nb2, cs, den);
        row_cos_grad_factors(cs, den, na2, nb2, inv_den, ca, cb);
        const A dc = dcos[r];
        T* dgr = dg_pre + rc * d;
        T* dxpr = dxp + rc * d;
        T* dxar = dxa + r * d;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) {
          const A a = ar[c], bv = pr[c], gv = gr[c], dzc = dzp[c];
          const A dact = activation_grad(gv, act);
          const T dgc = static_cast<T>(dzc * bv * dact);
          dgr[c] = dgc;
          part_db2[c] += static_cast<A>(dgc);
          const T dxc = static_cast<T>(dzc * gv + dc * (a * inv_den - cb * bv));
          dxpr[c] = dxc;
          part_dxp[c] += static_cast<A>(dxc);  // (summed whether asked for or not: no branch here)
          dxar[c] = static_cast<T>(dzc + dc * (bv * inv_den - ca * a));
        }
      }
    }
  }
  T* db2 = db2_t.data_ptr<T>();
  T* dlnw = ln ? dlnw_t.data_ptr<T>() : nullptr;
  T* dlnb = ln ? dlnb_t.data_ptr<T>() : nullptr;
  T* dxp_colsum = sum_dxp ? dxp_colsum_t.data_ptr<T>() : nullptr;
  for (int64_t c = 0; c < d; ++c) {
    A sg = 0, sw = 0, sb = 0, sx = 0;
    for (int64_t ch = 0; ch < nchunks; ++ch) {  // chunk order: deterministic
      const A* p = part.data() + ch * np * d;
      sg += p[c];
      sw += p[d + c];
      sb += p[2 * d + c];
      if (sum_dxp) sx += p[3 * d + c];
    }
    db2[c] = static_cast<T>(sg);
    if (ln) {
      dlnw[c] = static_cast<T>(sw);
      dlnb[c] = static_cast<T>(sb);
    }
    if (sum_dxp) dxp_colsum[c] = static_cast<T>(sx);
  }
}

// Column sums over fixed chunks of kRowsPerChunk rows, the chunks' partial sums added in chunk
// order: deterministic whatever the thread count. relu_bwd first applies the ReLU backward in
// place (x = 0 where the post-ReLU h is 0) in the same pass. ATen's sum(0) runs at about a third
// of the memory speed here (per-column reductions of a row-major matrix), and a separate
// threshold_backward would be one more pass over dh.
template <typename T>
GCA_CPU_CLONES void col_sum_impl(T* x, const T* h, int64_t n, int64_t d, T* out) {
  using A = at::opmath_type<T>;
  const int64_t nchunks = (n + kRowsPerChunk - 1) / kRowsPerChunk;
  std::vector<A> part(nchunks * d);
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t ch = 0; ch < nchunks; ++ch) {
    A* p = part.data() + ch * d;
    for (int64_t c = 0; c < d; ++c) p[c] = A(0);
    const int64_t r_end = std::min(n, (ch + 1) * kRowsPerChunk);
    for (int64_t r = ch * kRowsPerChunk; r < r_end; ++r) {
      T* xr = x + r * d;
      if (h) {
        const T* hr = h + r * d;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) {
          const T v = hr[c] > T(0) ? xr[c] : T(0);
          xr[c] = v;
          p[c] += static_cast<A>(v);
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) p[c] += static_cast<A>(xr[c]);
      }
    }
  }
  for (int64_t c = 0; c < d; ++c) {
    A acc = 0;
    for (int64_t ch = 0; ch < nchunks; ++ch) acc += part[ch * d + c];
    out[c] = static_cast<T>(acc);
  }
}

template <typename T>
GCA_CPU_CLONES void bias_relu_impl(T* h, const T* b, int64_t n, int64_t d) {
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t r = 0; r < n; ++r) {
    T* hr = h + r * d;
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) {
      const T v = hr[c] + b[c];
      hr[c] = v > T(0) ? v : T(0);
    }
  }
}
}  // namespace

#define GCA_CPU_DISPATCH(t, name, ...) \
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), name, [&] { __VA_ARGS__; })

void xprime_fwd_cpu(at::Tensor& xp, const at::Tensor& bo, const at::Tensor& lse,
                    const at::Tensor& xa, at::Tensor& cos, const RowLayout& lay) {
  GCA_CPU_DISPATCH(xp, "gca_xprime_fwd_cpu", xprime_fwd_impl<scalar_t>(xp, bo, lse, xa, cos, lay));
}

void gate_out_fwd_cpu(const at::Tensor& xa, const at::Tensor& xp, at::Tensor& g,
                      const at::Tensor& b2, const at::Tensor& ln_w, const at::Tensor& ln_b,
                      at::Tensor& y, at::Tensor& mean, at::Tensor& rstd, at::Tensor& cos, int64_t act,
                      double eps, const RowLayout& lay) {
  GCA_CPU_DISPATCH(xa, "gca_gate_out_fwd_cpu",
                   gate_out_fwd_impl<scalar_t>(xa, xp, g, b2, ln_w, ln_b, y, mean, rstd, cos, act, eps, lay));
}

void gate_out_bwd_cpu(const at::Tensor& dy, const at::Tensor& dcos, const at::Tensor& xa,
                      const at::Tensor& xp, const at::Tensor& g, const at::Tensor& ln_w,
                      const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& dg_pre,
                      at::Tensor& db2, at::Tensor& dxp, at::Tensor& dxa, at::Tensor& dlnw,
                      at::Tensor& dlnb, at::Tensor& dxp_colsum, int64_t act, const RowLayout& lay) {
  GCA_CPU_DISPATCH(xa, "gca_gate_out_bwd_cpu",
                   gate_out_bwd_impl<scalar_t>(dy, dcos, xa, xp, g, ln_w, mean, rstd, dg_pre, db2,
                                               dxp, dxa, dlnw, dlnb, dxp_colsum, act, lay));
}

void bias_relu_cpu(at::Tensor& h, const at::Tensor& b1) {
  GCA_CPU_DISPATCH(h, "gca_bias_relu_cpu",
                   bias_relu_impl<scalar_t>(h.data_ptr<scalar_t>(), b1.data_ptr<scalar_t>(),
                                            h.size(0), h.size(1)));
}

void relu_bwd_sum_cpu(at::Tensor& dh, const at::Tensor& h, at::Tensor& db1) {
  GCA_CPU_DISPATCH(dh, "gca_relu_bwd_sum_cpu",
                   col_sum_impl<scalar_t>(dh.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(),
                                          dh.size(0), dh.size(1), db1.data_ptr<scalar_t>()));
}

void col_sum_cpu(const at::Tensor& x, at::Tensor& out) {
  GCA_CPU_DISPATCH(x, "gca_col_sum_cpu",
                   col_sum_impl<scalar_t>(const_cast<scalar_t*>(x.data_ptr<scalar_t>()), nullptr,
                                          x.size(0), x.size(1), out.data_ptr<scalar_t>()));
}

}  // namespace gca
