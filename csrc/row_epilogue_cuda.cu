// CUDA row epilogue kernels of the fused GCA operator (float32, float64, bfloat16, float16), one
// warp per row, accumulating in float32 (float64 for float64 inputs):
// - forward: x' = o Wo^T + bo where a key was seen (0 elsewhere) with cos(x_a, x'); the gate
//   activation, Hadamard residual and LayerNorm, y = LN(x_a + act(g + b2) * x');
// - backward: that pass's gradient with the cosine's, per row; the LayerNorm-parameter
//   gradients as a two-stage reduction (per-block partial sums over row chunks, then a column
//   reduce); the bias sums and ReLU backward through ATen (single passes on the GPU already).
// No atomics anywhere: deterministic run to run.
#include <cmath>
#include <limits>

#include "cuda_common.cuh"
#include "cuda_kernels.h"

namespace gca {
namespace {

using namespace cuda_detail;

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

// LayerNorm weight and bias gradients, two stages. Stage 1, grid (column tiles of 32, row
// chunks of kLnRowsPerChunk): a (32 columns x 8 row lanes) block sums its chunk's
// dy * zhat and dy per column (reads coalesced along the columns), the 8 row lanes reduced in
// shared memory in a fixed order, into part_w/part_b (chunks, d). Stage 2: one thread per column
// adds the chunks in chunk order. No atomics: deterministic run to run.
constexpr int kLnRowLanes = 8;
constexpr int64_t kLnRowsPerChunk = 128;

template <typename T, typename A>
__global__ void ln_param_partial_kernel(const T* __restrict__ dy, const T* __restrict__ xa,
                                        const T* __restrict__ xp, const T* __restrict__ g,  // (N, d)
                                        const A* __restrict__ mean, const A* __restrict__ rstd,
                                        A* __restrict__ part_w, A* __restrict__ part_b,  // (chunks, d)
                                        int64_t N, int64_t d) {
  __shared__ A sw[kLnRowLanes][kWarp + 1], sb[kLnRowLanes][kWarp + 1];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarp + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kLnRowsPerChunk;
  const int64_t r1 = r0 + kLnRowsPerChunk < N ? r0 + kLnRowsPerChunk : N;
  A w = 0, bsum = 0;
  if (c < d) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kLnRowLanes) {
      const int64_t k = r * d + c;
      const A z = static_cast<A>(xa[k]) + static_cast<A>(g[k]) * static_cast<A>(xp[k]);
      const A dyc = dy[k];
      w += dyc * (z - mean[r]) * rstd[r];
      bsum += dyc;
    }
  }
  sw[threadIdx.y][threadIdx.x] = w;
  sb[threadIdx.y][threadIdx.x] = bsum;
  __syncthreads();
  if (threadIdx.y == 0 && c < d) {
    A tw = 0, tb = 0;
    for (int y = 0; y < kLnRowLanes; ++y) {
      tw += sw[y][threadIdx.x];
      tb += sb[y][threadIdx.x];
    }
    part_w[blockIdx.y * d + c] = tw;
    part_b[blockIdx.y * d + c] = tb;
  }
}

template <typename T, typename A>
__global__ void ln_param_reduce_kernel(const A* __restrict__ part_w, const A* __restrict__ part_b,
                                       int64_t chunks, int64_t d, T* __restrict__ dlnw,
                                       T* __restrict__ dlnb) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= d) return;
  A tw = 0, tb = 0;
  for (int64_t ch = 0; ch < chunks; ++ch) {  // chunk order
    tw += part_w[ch * d + c];
    tb += part_b[ch * d + c];
  }
  dlnw[c] = static_cast<T>(tw);
  dlnb[c] = static_cast<T>(tb);
}

}  // namespace

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
      const int64_t chunks = (N + kLnRowsPerChunk - 1) / kLnRowsPerChunk;
      at::Tensor part = at::empty({2, chunks, lay.d}, mean.options());
      A* part_w = part.data_ptr<A>();
      A* part_b = part_w + chunks * lay.d;
      const dim3 grid(static_cast<unsigned int>((lay.d + kWarp - 1) / kWarp),
                      static_cast<unsigned int>(chunks));
      ln_param_partial_kernel<scalar_t, A><<<grid, dim3(kWarp, kLnRowLanes), 0, stream>>>(
          dy.data_ptr<scalar_t>(), xa.data_ptr<scalar_t>(), xp.data_ptr<scalar_t>(),
          g.data_ptr<scalar_t>(), mp, rp, part_w, part_b, N, lay.d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      ln_param_reduce_kernel<scalar_t, A><<<static_cast<unsigned int>((lay.d + 127) / 128), 128, 0,
                                            stream>>>(part_w, part_b, chunks, lay.d,
                                                      dlnw.data_ptr<scalar_t>(),
                                                      dlnb.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

// The small passes around the products: ATen's kernels are already single passes on the GPU.
void bias_relu_cuda(at::Tensor& h, const at::Tensor& b1) { h.add_(b1).relu_(); }
void relu_bwd_sum_cuda(at::Tensor& dh, const at::Tensor& h, at::Tensor& db1) {
  at::threshold_backward_out(dh, dh, h, 0);
  at::sum_out(db1, dh, 0);
}
void col_sum_cuda(const at::Tensor& x, at::Tensor& out) { at::sum_out(out, x, 0); }

}  // namespace gca
