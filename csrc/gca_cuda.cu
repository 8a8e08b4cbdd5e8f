// CUDA row kernels of the fused GCA operator (float32, float64, bfloat16, float16), the
// fallback where Triton is missing. The products run on cuBLAS through ATen (gca_core.cpp);
// these kernels fuse everything between them, one warp per task, accumulating in float32
// (float64 for float64 inputs):
// - attention forward: per (query row, head) an online softmax over the visible keys, o and
//   the logsumexp; no (B, H, La, Lb) tensor is ever stored.
// - x' epilogue (bias only where a key was seen, cosine); gate/residual/LayerNorm epilogue.
// - backward: the epilogue's gradient per row; LayerNorm parameter gradients one thread per
//   column over all rows; attention dq per (row, head) and dk/dv per (key, head), each
//   recomputing p from the logsumexp. No atomics anywhere: deterministic run to run.
// Limits: head size dh = d / n_heads <= 256.
#include <cmath>
#include <limits>

#include "cuda_common.cuh"
#include "gca_cuda.h"

namespace gca {
namespace {

using namespace cuda_detail;
constexpr int kMaxPerLane = 8;  // dh <= 32 * 8

__device__ __forceinline__ bool visible(const bool* kpm_b, const bool* am_row, int64_t j) {
  return !(kpm_b && kpm_b[j]) && !(am_row && am_row[j]);
}

template <typename T, typename A>
__device__ __forceinline__ A warp_dot(const T* a, const T* b, int64_t n, int lane) {
  A s = 0;
  for (int64_t c = lane; c < n; c += kWarp) s += static_cast<A>(a[c]) * static_cast<A>(b[c]);
  return warp_sum(s);
}

template <typename T, typename A>
__global__ void attn_fwd_kernel(const T* __restrict__ q,     // (B*La, d)
                                const T* __restrict__ kv,    // (B*Lb, 2d)
                                const bool* __restrict__ kpm,  // (B, Lb) or null
                                const bool* __restrict__ am,   // (Bm, La, Lb) or null
                                bool am_shared, T* __restrict__ o,  // (B*La, d)
                                A* __restrict__ lse,                // (B*La, H)
                                int64_t B, int64_t La, int64_t Lb, int64_t d, int64_t H) {
  const int64_t t = warp_task();
  if (t >= B * La * H) return;
  const int lane = lane_id();
  const int64_t dh = d / H, h = t % H, r = t / H, b = r / La, i = r % La;
  const A scale = A(1) / sqrt(A(dh));
  const T* qr = q + r * d + h * dh;
  const bool* kpm_b = kpm ? kpm + b * Lb : nullptr;
  const bool* am_row = am ? am + ((am_shared ? 0 : b) * La + i) * Lb : nullptr;
  A m = -std::numeric_limits<A>::infinity(), l = 0, acc[kMaxPerLane];
#pragma unroll
  for (int k = 0; k < kMaxPerLane; ++k) acc[k] = 0;
  for (int64_t j = 0; j < Lb; ++j) {
    if (!visible(kpm_b, am_row, j)) continue;
    const T* kr = kv + (b * Lb + j) * 2 * d + h * dh;
    const A s = warp_dot<T, A>(qr, kr, dh, lane) * scale;
    const A m_new = s > m ? s : m;
    const A corr = exp(m - m_new), p = exp(s - m_new);
    l = l * corr + p;
    const T* vr = kr + d;
#pragma unroll
    for (int k = 0; k < kMaxPerLane; ++k) {
      const int64_t c = lane + k * kWarp;
      if (c < dh) acc[k] = acc[k] * corr + p * static_cast<A>(vr[c]);
    }
    m = m_new;
  }
  T* orow = o + r * d + h * dh;
  const bool seen = l > A(0);
#pragma unroll
  for (int k = 0; k < kMaxPerLane; ++k) {
    const int64_t c = lane + k * kWarp;
    if (c < dh) orow[c] = static_cast<T>(seen ? acc[k] / l : A(0));
  }
  if (lane == 0) lse[r * H + h] = seen ? m + log(l) : std::numeric_limits<A>::infinity();
}

template <typename T, typename A>
__global__ void xprime_fwd_kernel(T* __restrict__ xp,          // (N, d): o Wo^T in, x' out
                                  const T* __restrict__ bo,    // (d)
                                  const A* __restrict__ lse,   // (N, H)
                                  const T* __restrict__ xa,    // (N, d)
                                  T* __restrict__ cos,         // (N)
                                  int64_t N, int64_t d, int64_t H) {
  const int64_t r = warp_task();
  if (r >= N) return;
  const int lane = lane_id();
  T* xr = xp + r * d;
  const T* ar = xa + r * d;
  const bool seen = !isinf(lse[r * H]);
  A dt = 0, na2 = 0, nb2 = 0;
  for (int64_t c = lane; c < d; c += kWarp) {
    const T v = seen ? static_cast<T>(static_cast<A>(xr[c]) + static_cast<A>(bo[c])) : T(0);
    xr[c] = v;
    const A a = ar[c], bv = v;
    dt += a * bv;
    na2 += a * a;
    nb2 += bv * bv;
  }
  dt = warp_sum(dt);
  na2 = warp_sum(na2);
  nb2 = warp_sum(nb2);
  const A den = sqrt(na2) * sqrt(nb2);
  if (lane == 0) cos[r] = static_cast<T>(dt / (den > A(kCosEps) ? den : A(kCosEps)));
}

template <typename A>
__device__ __forceinline__ A activate(A x, int64_t act) {
  return act == kSigmoid ? A(1) / (A(1) + exp(-x)) : tanh(x);
}

template <typename T, typename A>
__global__ void gate_out_fwd_kernel(const T* __restrict__ xa, const T* __restrict__ xp,  // (N, d)
                                    T* __restrict__ g,                 // (N, d): h W2^T in, gate out
                                    const T* __restrict__ b2,          // (d)
                                    const T* __restrict__ lnw, const T* __restrict__ lnb,  // (d)
                                    T* __restrict__ y,                 // (N, d)
                                    A* __restrict__ mean, A* __restrict__ rstd,  // (N)
                                    int64_t N, int64_t d, int64_t act, double eps) {
  const int64_t r = warp_task();
  if (r >= N) return;
  const int lane = lane_id();
  const T* ar = xa + r * d;
  const T* pr = xp + r * d;
  T* gr = g + r * d;
  T* yr = y + r * d;
  A sum = 0;
  for (int64_t c = lane; c < d; c += kWarp) {
    const A pre = static_cast<A>(static_cast<T>(static_cast<A>(gr[c]) + static_cast<A>(b2[c])));
    const T gv = static_cast<T>(activate(pre, act));
    gr[c] = gv;
    const A z = static_cast<A>(ar[c]) + static_cast<A>(gv) * static_cast<A>(pr[c]);
    if (lnw) sum += z; else yr[c] = static_cast<T>(z);
  }
  if (!lnw) return;
  __syncwarp();
  const A mu = warp_sum(sum) / A(d);
  A var = 0;
  for (int64_t c = lane; c < d; c += kWarp) {
    const A z = static_cast<A>(ar[c]) + static_cast<A>(gr[c]) * static_cast<A>(pr[c]);
    var += (z - mu) * (z - mu);
  }
  const A rs = A(1) / sqrt(warp_sum(var) / A(d) + A(eps));
  for (int64_t c = lane; c < d; c += kWarp) {
    const A z = static_cast<A>(ar[c]) + static_cast<A>(gr[c]) * static_cast<A>(pr[c]);
    yr[c] = static_cast<T>((z - mu) * rs * static_cast<A>(lnw[c]) + static_cast<A>(lnb[c]));
  }
  if (lane == 0) {
    mean[r] = mu;
    rstd[r] = rs;
  }
}

template <typename T, typename A>
__global__ void gate_out_bwd_kernel(const T* __restrict__ dy,    // (N, d)
                                    const T* __restrict__ dcos,  // (N)
                                    const T* __restrict__ xa, const T* __restrict__ xp,
                                    const T* __restrict__ g,     // (N, d) post-activation
                                    const T* __restrict__ lnw,   // (d) or null
                                    const A* __restrict__ mean, const A* __restrict__ rstd,
                                    T* __restrict__ dg_pre, T* __restrict__ dxp,
                                    T* __restrict__ dxa,         // (N, d)
                                    int64_t N, int64_t d, int64_t act) {
  const int64_t r = warp_task();
  if (r >= N) return;
  const int lane = lane_id();
  const T* dyr = dy + r * d;
  const T* ar = xa + r * d;
  const T* pr = xp + r * d;
  const T* gr = g + r * d;
  const A mu = lnw ? mean[r] : A(0), rs = lnw ? rstd[r] : A(1);
  A s1 = 0, s2 = 0, dt = 0, na2 = 0, nb2 = 0;
  for (int64_t c = lane; c < d; c += kWarp) {
    const A a = ar[c], bv = pr[c];
    if (lnw) {
      const A zhat = (a + static_cast<A>(gr[c]) * bv - mu) * rs;
      const A dzh = static_cast<A>(dyr[c]) * static_cast<A>(lnw[c]);
      s1 += dzh;
      s2 += dzh * zhat;
    }
    dt += a * bv;
    na2 += a * a;
    nb2 += bv * bv;
  }
  const A m1 = warp_sum(s1) / A(d), m2 = warp_sum(s2) / A(d);
  dt = warp_sum(dt);
  na2 = warp_sum(na2);
  nb2 = warp_sum(nb2);
  const A den = sqrt(na2) * sqrt(nb2);
  const bool floored = !(den > A(kCosEps));
  const A inv_den = floored ? A(1) / A(kCosEps) : A(1) / den;
  const A cs = dt * inv_den;
  const A ca = floored ? A(0) : cs / na2, cb = floored ? A(0) : cs / nb2;
  const A dc = dcos[r];
  for (int64_t c = lane; c < d; c += kWarp) {
    const A a = ar[c], bv = pr[c], gv = gr[c];
    A dz;
    if (lnw) {
      const A zhat = (a + gv * bv - mu) * rs;
      dz = rs * (static_cast<A>(dyr[c]) * static_cast<A>(lnw[c]) - m1 - zhat * m2);
    } else {
      dz = dyr[c];
    }
    const A dact = act == kSigmoid ? gv * (A(1) - gv) : A(1) - gv * gv;
    dg_pre[r * d + c] = static_cast<T>(dz * bv * dact);
    dxp[r * d + c] = static_cast<T>(dz * gv + dc * (a * inv_den - cb * bv));
    dxa[r * d + c] = static_cast<T>(dz + dc * (bv * inv_den - ca * a));
  }
}

// LayerNorm weight/bias gradients: one thread per feature column, rows summed in order.
template <typename T, typename A>
__global__ void ln_param_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ xa,
                                    const T* __restrict__ xp, const T* __restrict__ g,
                                    const A* __restrict__ mean, const A* __restrict__ rstd,
                                    T* __restrict__ dlnw, T* __restrict__ dlnb, int64_t N,
                                    int64_t d) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= d) return;
  A sw = 0, sb = 0;
  for (int64_t r = 0; r < N; ++r) {
    const int64_t k = r * d + c;
    const A z = static_cast<A>(xa[k]) + static_cast<A>(g[k]) * static_cast<A>(xp[k]);
    const A dyc = dy[k];
    sw += dyc * (z - mean[r]) * rstd[r];
    sb += dyc;
  }
  dlnw[c] = static_cast<T>(sw);
  dlnb[c] = static_cast<T>(sb);
}

template <typename T, typename A>
__global__ void attn_bwd_dq_kernel(const T* __restrict__ q, const T* __restrict__ kv,
                                   const T* __restrict__ o, const T* __restrict__ dout,
                                   const A* __restrict__ lse, const bool* __restrict__ kpm,
                                   const bool* __restrict__ am, bool am_shared,
                                   T* __restrict__ dq,  // (B*La, d)
                                   A* __restrict__ Dbuf,  // (B*La, H): sum_j p_j dp_j
                                   int64_t B, int64_t La, int64_t Lb, int64_t d, int64_t H) {
  const int64_t t = warp_task();
  if (t >= B * La * H) return;
  const int lane = lane_id();
  const int64_t dh = d / H, h = t % H, r = t / H, b = r / La, i = r % La;
  const A scale = A(1) / sqrt(A(dh));
  T* dqr = dq + r * d + h * dh;
  const A L = lse[r * H + h];
  const T* dor = dout + r * d + h * dh;
  const A D = warp_dot<T, A>(dor, o + r * d + h * dh, dh, lane);
  if (lane == 0) Dbuf[r * H + h] = D;
  A acc[kMaxPerLane];
#pragma unroll
  for (int k = 0; k < kMaxPerLane; ++k) acc[k] = 0;
  if (!isinf(L)) {
    const T* qr = q + r * d + h * dh;
    const bool* kpm_b = kpm ? kpm + b * Lb : nullptr;
    const bool* am_row = am ? am + ((am_shared ? 0 : b) * La + i) * Lb : nullptr;
    for (int64_t j = 0; j < Lb; ++j) {
      if (!visible(kpm_b, am_row, j)) continue;
      const T* kr = kv + (b * Lb + j) * 2 * d + h * dh;
      const A p = exp(warp_dot<T, A>(qr, kr, dh, lane) * scale - L);
      const A ds = p * (warp_dot<T, A>(dor, kr + d, dh, lane) - D);
#pragma unroll
      for (int k = 0; k < kMaxPerLane; ++k) {
        const int64_t c = lane + k * kWarp;
        if (c < dh) acc[k] += ds * static_cast<A>(kr[c]);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kMaxPerLane; ++k) {
    const int64_t c = lane + k * kWarp;
    if (c < dh) dqr[c] = static_cast<T>(acc[k] * scale);
  }
}

template <typename T, typename A>
__global__ void attn_bwd_dkv_kernel(const T* __restrict__ q, const T* __restrict__ kv,
                                    const T* __restrict__ dout, const A* __restrict__ lse,
                                    const A* __restrict__ Dbuf, const bool* __restrict__ kpm,
                                    const bool* __restrict__ am, bool am_shared,
                                    T* __restrict__ dkv,  // (B*Lb, 2d)
                                    int64_t B, int64_t La, int64_t Lb, int64_t d, int64_t H) {
  const int64_t t = warp_task();
  if (t >= B * Lb * H) return;
  const int lane = lane_id();
  const int64_t dh = d / H, h = t % H, key = t / H, b = key / Lb, j = key % Lb;
  const A scale = A(1) / sqrt(A(dh));
  const T* kr = kv + key * 2 * d + h * dh;
  const T* vr = kr + d;
  A dk[kMaxPerLane], dv[kMaxPerLane];
#pragma unroll
  for (int k = 0; k < kMaxPerLane; ++k) dk[k] = dv[k] = 0;
  if (!(kpm && kpm[b * Lb + j])) {
    for (int64_t i = 0; i < La; ++i) {
      if (am && am[((am_shared ? 0 : b) * La + i) * Lb + j]) continue;
      const int64_t r = b * La + i;
      const A L = lse[r * H + h];
      if (isinf(L)) continue;
      const T* qr = q + r * d + h * dh;
      const T* dor = dout + r * d + h * dh;
      const A p = exp(warp_dot<T, A>(qr, kr, dh, lane) * scale - L);
      const A ds = p * (warp_dot<T, A>(dor, vr, dh, lane) - Dbuf[r * H + h]);
#pragma unroll
      for (int k = 0; k < kMaxPerLane; ++k) {
        const int64_t c = lane + k * kWarp;
        if (c < dh) {
          dk[k] += ds * scale * static_cast<A>(qr[c]);
          dv[k] += p * static_cast<A>(dor[c]);
        }
      }
    }
  }
  T* dkr = dkv + key * 2 * d + h * dh;
#pragma unroll
  for (int k = 0; k < kMaxPerLane; ++k) {
    const int64_t c = lane + k * kWarp;
    if (c < dh) {
      dkr[c] = static_cast<T>(dk[k]);
      dkr[d + c] = static_cast<T>(dv[k]);
    }
  }
}

#define GCA_CUDA_DISPATCH(t, name, ...)                                                       \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), name, [&] { \
    using A = at::opmath_type<scalar_t>;                                                  \
    __VA_ARGS__;                                                                          \
  })

template <typename T>
const T* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; }

void check_head_size(const RowLayout& lay) {
  TORCH_CHECK(lay.d / lay.H <= kWarp * kMaxPerLane, "gca (cuda): head size d / n_heads = ", lay.d / lay.H,
              " exceeds the CUDA backend's limit of ", kWarp * kMaxPerLane,
              "; use more heads or another backend");
}

void attn_fwd_cuda(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& kpm,
                   const at::Tensor& am, at::Tensor& o, at::Tensor& lse, const RowLayout& lay) {
  check_head_size(lay);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t tasks = lay.B * lay.La * lay.H;
  GCA_CUDA_DISPATCH(q, "gca_attn_fwd_cuda",
      attn_fwd_kernel<scalar_t, A><<<blocks_for(tasks), kThreads, 0, stream>>>(
          q.data_ptr<scalar_t>(), kv.data_ptr<scalar_t>(), ptr_or_null<bool>(kpm),
          ptr_or_null<bool>(am), am.defined() && am.size(0) == 1, o.data_ptr<scalar_t>(),
          lse.data_ptr<A>(), lay.B, lay.La, lay.Lb, lay.d, lay.H));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void xprime_fwd_cuda(at::Tensor& xp, const at::Tensor& bo, const at::Tensor& lse,
                     const at::Tensor& xa, at::Tensor& cos, const RowLayout& lay) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = lay.B * lay.La;
  GCA_CUDA_DISPATCH(xp, "gca_xprime_fwd_cuda",
      xprime_fwd_kernel<scalar_t, A><<<blocks_for(N), kThreads, 0, stream>>>(
          xp.data_ptr<scalar_t>(), bo.data_ptr<scalar_t>(), lse.data_ptr<A>(),
          xa.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(), N, lay.d, lay.H));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gate_out_fwd_cuda(const at::Tensor& xa, const at::Tensor& xp, at::Tensor& g,
                       const at::Tensor& b2, const at::Tensor& ln_w, const at::Tensor& ln_b, at::Tensor& y,
                       at::Tensor& mean, at::Tensor& rstd, at::Tensor& cos, int64_t act, double eps,
                       const RowLayout& lay) {
  // cos comes from xprime_fwd here (the core passes it to this kernel only on the CPU)
  TORCH_CHECK(!cos.defined(), "gca_gate_out_fwd_cuda: cos is formed by xprime_fwd on the GPU");
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = lay.B * lay.La;
  GCA_CUDA_DISPATCH(xa, "gca_gate_out_fwd_cuda",
      gate_out_fwd_kernel<scalar_t, A><<<blocks_for(N), kThreads, 0, stream>>>(
          xa.data_ptr<scalar_t>(), xp.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
          b2.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(ln_w), ptr_or_null<scalar_t>(ln_b), y.data_ptr<scalar_t>(),
          ln_w.defined() ? mean.data_ptr<A>() : nullptr,
          ln_w.defined() ? rstd.data_ptr<A>() : nullptr, N, lay.d, act, eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gate_out_bwd_cuda(const at::Tensor& dy, const at::Tensor& dcos, const at::Tensor& xa,
                       const at::Tensor& xp, const at::Tensor& g, const at::Tensor& ln_w,
                       const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& dg_pre,
                       at::Tensor& db2, at::Tensor& dxp, at::Tensor& dxa, at::Tensor& dlnw,
                       at::Tensor& dlnb, at::Tensor& dxp_colsum, int64_t act, const RowLayout& lay) {
  // only the CPU's compact path asks for dxp's column sums: never leave one unwritten silently
  TORCH_CHECK(!dxp_colsum.defined(), "gca_gate_out_bwd_cuda: dxp_colsum is not computed on CUDA");
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = lay.B * lay.La;
  const bool ln = ln_w.defined();
  GCA_CUDA_DISPATCH(xa, "gca_gate_out_bwd_cuda", {
    const A* mp = ln ? mean.data_ptr<A>() : nullptr;
    const A* rp = ln ? rstd.data_ptr<A>() : nullptr;
    gate_out_bwd_kernel<scalar_t, A><<<blocks_for(N), kThreads, 0, stream>>>(
        dy.data_ptr<scalar_t>(), dcos.data_ptr<scalar_t>(), xa.data_ptr<scalar_t>(),
        xp.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(ln_w), mp, rp,
        dg_pre.data_ptr<scalar_t>(), dxp.data_ptr<scalar_t>(), dxa.data_ptr<scalar_t>(), N, lay.d, act);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::sum_out(db2, dg_pre, 0);
    if (ln) {
      const unsigned int blocks = static_cast<unsigned int>((lay.d + 127) / 128);
      ln_param_bwd_kernel<scalar_t, A><<<blocks, 128, 0, stream>>>(
          dy.data_ptr<scalar_t>(), xa.data_ptr<scalar_t>(), xp.data_ptr<scalar_t>(),
          g.data_ptr<scalar_t>(), mp, rp, dlnw.data_ptr<scalar_t>(), dlnb.data_ptr<scalar_t>(), N, lay.d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void attn_bwd_cuda(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& o,
                   const at::Tensor& dout, const at::Tensor& lse, const at::Tensor& kpm,
                   const at::Tensor& am, at::Tensor& dq, at::Tensor& dkv, const RowLayout& lay) {
  check_head_size(lay);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = lay.B * lay.La;
  at::Tensor Dbuf = at::empty({N, lay.H}, lse.options());
  const bool shared = am.defined() && am.size(0) == 1;
  GCA_CUDA_DISPATCH(q, "gca_attn_bwd_cuda", {
    attn_bwd_dq_kernel<scalar_t, A><<<blocks_for(N * lay.H), kThreads, 0, stream>>>(
        q.data_ptr<scalar_t>(), kv.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(),
        dout.data_ptr<scalar_t>(), lse.data_ptr<A>(), ptr_or_null<bool>(kpm),
        ptr_or_null<bool>(am), shared, dq.data_ptr<scalar_t>(), Dbuf.data_ptr<A>(), lay.B, lay.La,
        lay.Lb, lay.d, lay.H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    attn_bwd_dkv_kernel<scalar_t, A><<<blocks_for(lay.B * lay.Lb * lay.H), kThreads, 0, stream>>>(
        q.data_ptr<scalar_t>(), kv.data_ptr<scalar_t>(), dout.data_ptr<scalar_t>(),
        lse.data_ptr<A>(), Dbuf.data_ptr<A>(), ptr_or_null<bool>(kpm), ptr_or_null<bool>(am),
        shared, dkv.data_ptr<scalar_t>(), lay.B, lay.La, lay.Lb, lay.d, lay.H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The small passes around the products: ATen's kernels are already single passes on the GPU.
void bias_relu_cuda(at::Tensor& h, const at::Tensor& b1) { h.add_(b1).relu_(); }
void relu_bwd_sum_cuda(at::Tensor& dh, const at::Tensor& h, at::Tensor& db1) {
  at::threshold_backward_out(dh, dh, h, 0);
  at::sum_out(db1, dh, 0);
}
void col_sum_cuda(const at::Tensor& x, at::Tensor& out) { at::sum_out(out, x, 0); }

const DeviceBackend kCudaBackend{
    "cuda", c10::DeviceType::CUDA, {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf},
    GCAKernels{attn_fwd_cuda, xprime_fwd_cuda, gate_out_fwd_cuda, gate_out_bwd_cuda,
               bias_relu_cuda, relu_bwd_sum_cuda, col_sum_cuda, attn_bwd_cuda}};

}  // namespace

std::vector<at::Tensor> gca_fwd_cuda(const at::Tensor& x_a, const at::Tensor& x_b,
                                     const TensorList& weights, const OptT& ln_w, const OptT& ln_b, const OptT& kpm, const OptT& am,
                                     int64_t n_heads, int64_t activation, double ln_eps) {
  TORCH_CHECK(x_a.is_cuda(), "gca_fwd (cuda): x_a must be a CUDA tensor, got one on ", x_a.device());
  const c10::cuda::CUDAGuard guard(x_a.device());
  return gca_forward_entry(kCudaBackend, x_a, x_b, weights, ln_w, ln_b, kpm, am, n_heads, activation, ln_eps);
}

std::vector<at::Tensor> gca_bwd_cuda(const at::Tensor& dy, const at::Tensor& dcos,
                                     const at::Tensor& x_a, const at::Tensor& x_b,
                                     const TensorList& weights, const OptT& ln_w, const OptT& ln_b, const OptT& kpm, const OptT& am,
                                     const std::vector<at::Tensor>& saved, int64_t n_heads,
                                     int64_t activation, double ln_eps) {
  TORCH_CHECK(x_a.is_cuda(), "gca_bwd (cuda): x_a must be a CUDA tensor, got one on ", x_a.device());
  const c10::cuda::CUDAGuard guard(x_a.device());
  return gca_backward_entry(kCudaBackend, dy, dcos, x_a, x_b, weights, ln_w, ln_b, kpm, am, saved, n_heads,
                            activation, ln_eps);
}

}  // namespace gca
