// CUDA attention kernels of the fused GCA operator (float32, float64, bfloat16, float16),
// accumulating in float32 (float64 for float64 inputs). The projections around them are cuBLAS
// products (gca_orchestration.cpp).
//
// Tiled: a block of 4 warps takes one (batch row, head) and a tile of query rows (forward, dq)
// or key rows (dk/dv); the other side streams through shared memory in tiles of 32 rows, each
// loaded once and used by every row of the block (K/V reuse; one warp per (row, head) would
// read every key once per query row from global memory).
// - forward: online softmax over the key tiles; lane j scores key j of the tile against the
//   query row (held in shared memory), the tile's p broadcast by shuffles for p v. Writes o and
//   the logsumexp (+inf where a row sees no key, o = 0 there).
// - dq: p recomputed from the logsumexp, ds = p (dp - D) with D = <dout, o> per (row, head).
// - dk, dv: per key tile, the query rows stream through shared memory: lane i takes query row i
//   of the tile; dv = sum_i p_i dout_i, dk = sum_i ds_i q_i / sqrt(dh).
// Every output element is written by one thread, summed in a fixed order: no atomics,
// deterministic run to run. Limit: head size dh = d / n_heads <= 256 (8 values per lane).
// Shared memory is dynamic, sized by dh: at dh = 256 at most 96.5 KiB (float32; half that for
// float16/bfloat16) and 161 KiB (float64) per block, checked against the device's opt-in limit
// at launch (sm_80: 163 KiB, sm_90: 227 KiB).
#include <cmath>
#include <limits>

#include "cuda_common.cuh"
#include "cuda_kernels.h"

namespace gca {
namespace {

using namespace cuda_detail;

constexpr int kMaxPerLane = 8;  // dh <= 32 * 8: a lane holds columns lane + 32 k
constexpr int kTile = kWarp;    // rows per streamed tile: one per lane

// Rows per warp of the block's own tile: 4 (float accumulators), 2 for float64 (registers).
template <typename A>
constexpr int rows_per_warp() {
  return sizeof(A) == 8 ? 2 : 4;
}

__device__ __forceinline__ bool key_visible(const bool* kpm_b, const bool* am_row, int64_t j) {
  return !(kpm_b && kpm_b[j]) && !(am_row && am_row[j]);
}

// dst[r * ld + c] = src row (row0 + r), columns [col0, col0 + dh), for r < rows; zeros for rows
// at or past n_rows. Cooperative over the block, coalesced along c.
template <typename T>
__device__ __forceinline__ void load_tile(T* dst, int64_t ld, const T* src, int64_t stride,
                                          int64_t row0, int64_t n_rows, int64_t rows,
                                          int64_t dh) {
  for (int64_t idx = threadIdx.x; idx < rows * dh; idx += blockDim.x) {
    const int64_t r = idx / dh, c = idx % dh;
    dst[r * ld + c] = row0 + r < n_rows ? src[(row0 + r) * stride + c] : T(0);
  }
}

template <typename T, typename A>
__device__ __forceinline__ A dot_row(const T* a, const T* b, int64_t n) {
  A s = 0;
  for (int64_t c = 0; c < n; ++c) s += static_cast<A>(a[c]) * static_cast<A>(b[c]);
  return s;
}

// grid (query tiles of R * 4 rows, B * H); dynamic shared memory: attn_fwd_smem.
template <typename T, typename A, int R>
__global__ void attn_fwd_tiled_kernel(const T* __restrict__ q,      // (B*La, d)
                                      const T* __restrict__ kv,     // (B*Lb, 2d): [k | v]
                                      const bool* __restrict__ kpm,  // (B, Lb) or null
                                      const bool* __restrict__ am,   // (Bm, La, Lb) or null
                                      bool am_shared, T* __restrict__ o,  // (B*La, d)
                                      A* __restrict__ lse,                // (B*La, H)
                                      int64_t La, int64_t Lb, int64_t d, int64_t H) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t dh = d / H, ld = dh + 1;  // odd row stride: lanes reading rows hit distinct banks
  T* k_s = reinterpret_cast<T*>(smem);    // (kTile, ld)
  T* v_s = k_s + kTile * ld;              // (kTile, ld)
  T* q_s = v_s + kTile * ld;              // (R * kWarpsPerBlock, dh)
  const int64_t b = blockIdx.y / H, h = blockIdx.y % H;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * R * kWarpsPerBlock;
  load_tile(q_s, dh, q + b * La * d + h * dh, d, i0, La, R * kWarpsPerBlock, dh);
  const bool* kpm_b = kpm ? kpm + b * Lb : nullptr;
  const A scale = A(1) / sqrt(A(dh)), ninf = -std::numeric_limits<A>::infinity();
  A m[R], l[R], acc[R][kMaxPerLane];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = ninf;
    l[r] = 0;
#pragma unroll
    for (int k = 0; k < kMaxPerLane; ++k) acc[r][k] = 0;
  }
  const T* kv_b = kv + b * Lb * 2 * d + h * dh;
  for (int64_t k0 = 0; k0 < Lb; k0 += kTile) {
    __syncthreads();  // the previous tile is consumed (and q_s written, the first time)
    load_tile(k_s, ld, kv_b, 2 * d, k0, Lb, kTile, dh);
    load_tile(v_s, ld, kv_b + d, 2 * d, k0, Lb, kTile, dh);
    __syncthreads();
    const int64_t j = k0 + lane;  // this lane's key
    const bool key_ok = j < Lb && !(kpm_b && kpm_b[j]);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t i = i0 + warp * R + r;
      if (i >= La) continue;  // uniform over the warp
      const bool* am_row = am ? am + ((am_shared ? 0 : b) * La + i) * Lb : nullptr;
      const bool vis = key_ok && !(am_row && am_row[j]);
      const A s = vis ? dot_row<T, A>(q_s + (warp * R + r) * dh, k_s + lane * ld, dh) * scale : ninf;
      const A tile_max = warp_max(s);
      if (tile_max == ninf) continue;  // no visible key in this tile (uniform)
      const A m_new = tile_max > m[r] ? tile_max : m[r];
      const A corr = exp(m[r] - m_new);  // 0 while m was -inf
      const A p = vis ? exp(s - m_new) : A(0);
      l[r] = l[r] * corr + warp_sum(p);
#pragma unroll
      for (int k = 0; k < kMaxPerLane; ++k) acc[r][k] *= corr;
      for (int jj = 0; jj < kTile; ++jj) {
        const A pj = __shfl_sync(0xffffffffu, p, jj);
        if (pj == A(0)) continue;  // masked key (uniform)
        const T* vr = v_s + jj * ld;
#pragma unroll
        for (int k = 0; k < kMaxPerLane; ++k) {
          const int64_t c = lane + k * kWarp;
          if (c < dh) acc[r][k] += pj * static_cast<A>(vr[c]);
        }
      }
      m[r] = m_new;
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t i = i0 + warp * R + r;
    if (i >= La) continue;
    const int64_t row = b * La + i;
    const bool seen = l[r] > A(0);
    T* orow = o + row * d + h * dh;
#pragma unroll
    for (int k = 0; k < kMaxPerLane; ++k) {
      const int64_t c = lane + k * kWarp;
      if (c < dh) orow[c] = static_cast<T>(seen ? acc[r][k] / l[r] : A(0));
    }
    if (lane == 0) lse[row * H + h] = seen ? m[r] + log(l[r]) : std::numeric_limits<A>::infinity();
  }
}

// grid (query tiles of R * 4 rows, B * H); dq = sum_j ds_j k_j / sqrt(dh), and D = <dout, o>
// per (row, head) into Dbuf for the dk/dv kernel.
template <typename T, typename A, int R>
__global__ void attn_bwd_dq_tiled_kernel(const T* __restrict__ q, const T* __restrict__ kv,
                                         const T* __restrict__ o, const T* __restrict__ dout,
                                         const A* __restrict__ lse, const bool* __restrict__ kpm,
                                         const bool* __restrict__ am, bool am_shared,
                                         T* __restrict__ dq,     // (B*La, d)
                                         A* __restrict__ Dbuf,   // (B*La, H)
                                         int64_t La, int64_t Lb, int64_t d, int64_t H) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t dh = d / H, ld = dh + 1;
  T* k_s = reinterpret_cast<T*>(smem);      // (kTile, ld)
  T* v_s = k_s + kTile * ld;                // (kTile, ld)
  T* q_s = v_s + kTile * ld;                // (R * kWarpsPerBlock, dh)
  T* do_s = q_s + R * kWarpsPerBlock * dh;  // (R * kWarpsPerBlock, dh)
  const int64_t b = blockIdx.y / H, h = blockIdx.y % H;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * R * kWarpsPerBlock;
  load_tile(q_s, dh, q + b * La * d + h * dh, d, i0, La, R * kWarpsPerBlock, dh);
  load_tile(do_s, dh, dout + b * La * d + h * dh, d, i0, La, R * kWarpsPerBlock, dh);
  const bool* kpm_b = kpm ? kpm + b * Lb : nullptr;
  const A scale = A(1) / sqrt(A(dh));
  A L[R], D[R], acc[R][kMaxPerLane];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t i = i0 + warp * R + r;
    const int64_t row = b * La + (i < La ? i : 0);
    L[r] = i < La ? lse[row * H + h] : std::numeric_limits<A>::infinity();
    A part = 0;  // D = <dout, o> over the head's columns
    for (int64_t c = lane; c < dh && i < La; c += kWarp)
      part += static_cast<A>(dout[row * d + h * dh + c]) * static_cast<A>(o[row * d + h * dh + c]);
    D[r] = warp_sum(part);
    if (i < La && lane == 0) Dbuf[row * H + h] = D[r];
#pragma unroll
    for (int k = 0; k < kMaxPerLane; ++k) acc[r][k] = 0;
  }
  const T* kv_b = kv + b * Lb * 2 * d + h * dh;
  for (int64_t k0 = 0; k0 < Lb; k0 += kTile) {
    __syncthreads();
    load_tile(k_s, ld, kv_b, 2 * d, k0, Lb, kTile, dh);
    load_tile(v_s, ld, kv_b + d, 2 * d, k0, Lb, kTile, dh);
    __syncthreads();
    const int64_t j = k0 + lane;
    const bool key_ok = j < Lb && !(kpm_b && kpm_b[j]);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t i = i0 + warp * R + r;
      if (i >= La || isinf(L[r])) continue;  // uniform; keyless rows get dq = 0
      const bool* am_row = am ? am + ((am_shared ? 0 : b) * La + i) * Lb : nullptr;
      const bool vis = key_ok && !(am_row && am_row[j]);
      A ds = 0;
      if (vis) {
        const int rr = warp * R + r;
        const A p = exp(dot_row<T, A>(q_s + rr * dh, k_s + lane * ld, dh) * scale - L[r]);
        ds = p * (dot_row<T, A>(do_s + rr * dh, v_s + lane * ld, dh) - D[r]);
      }
      for (int jj = 0; jj < kTile; ++jj) {
        const A dsj = __shfl_sync(0xffffffffu, ds, jj);
        if (dsj == A(0)) continue;
        const T* kr = k_s + jj * ld;
#pragma unroll
        for (int k = 0; k < kMaxPerLane; ++k) {
          const int64_t c = lane + k * kWarp;
          if (c < dh) acc[r][k] += dsj * static_cast<A>(kr[c]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t i = i0 + warp * R + r;
    if (i >= La) continue;
    T* dqr = dq + (b * La + i) * d + h * dh;
#pragma unroll
    for (int k = 0; k < kMaxPerLane; ++k) {
      const int64_t c = lane + k * kWarp;
      if (c < dh) dqr[c] = static_cast<T>(acc[r][k] * scale);
    }
  }
}

// grid (key tiles of R * 4 keys, B * H): dk, dv of the block's keys, the query rows streaming
// through shared memory 32 at a time (lane i: query row i of the tile). Padded keys get 0.
template <typename T, typename A, int R>
__global__ void attn_bwd_dkdv_tiled_kernel(const T* __restrict__ q, const T* __restrict__ kv,
                                           const T* __restrict__ dout, const A* __restrict__ lse,
                                           const A* __restrict__ Dbuf,
                                           const bool* __restrict__ kpm,
                                           const bool* __restrict__ am, bool am_shared,
                                           T* __restrict__ dkv,  // (B*Lb, 2d)
                                           int64_t La, int64_t Lb, int64_t d, int64_t H) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t dh = d / H, ld = dh + 1;
  A* L_s = reinterpret_cast<A*>(smem);       // (kTile)
  A* D_s = L_s + kTile;                      // (kTile)
  T* q_s = reinterpret_cast<T*>(D_s + kTile);  // (kTile, ld)
  T* do_s = q_s + kTile * ld;                // (kTile, ld)
  T* k_s = do_s + kTile * ld;                // (R * kWarpsPerBlock, dh)
  T* v_s = k_s + R * kWarpsPerBlock * dh;    // (R * kWarpsPerBlock, dh)
  const int64_t b = blockIdx.y / H, h = blockIdx.y % H;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * R * kWarpsPerBlock;
  const T* kv_b = kv + b * Lb * 2 * d + h * dh;
  load_tile(k_s, dh, kv_b, 2 * d, j0, Lb, R * kWarpsPerBlock, dh);
  load_tile(v_s, dh, kv_b + d, 2 * d, j0, Lb, R * kWarpsPerBlock, dh);
  const A scale = A(1) / sqrt(A(dh));
  A dk[R][kMaxPerLane], dv[R][kMaxPerLane];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int k = 0; k < kMaxPerLane; ++k) dk[r][k] = dv[r][k] = 0;
  for (int64_t q0 = 0; q0 < La; q0 += kTile) {
    __syncthreads();
    load_tile(q_s, ld, q + b * La * d + h * dh, d, q0, La, kTile, dh);
    load_tile(do_s, ld, dout + b * La * d + h * dh, d, q0, La, kTile, dh);
    if (threadIdx.x < kTile) {
      const int64_t i = q0 + threadIdx.x;
      L_s[threadIdx.x] = i < La ? lse[(b * La + i) * H + h] : std::numeric_limits<A>::infinity();
      D_s[threadIdx.x] = i < La ? Dbuf[(b * La + i) * H + h] : A(0);
    }
    __syncthreads();
    const int64_t i = q0 + lane;  // this lane's query row
    const bool row_ok = i < La && !isinf(L_s[lane]);
    const bool* am_row = am && i < La ? am + ((am_shared ? 0 : b) * La + i) * Lb : nullptr;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t j = j0 + warp * R + r;
      if (j >= Lb || (kpm && kpm[b * Lb + j])) continue;  // uniform: padded keys stay 0
      const bool vis = row_ok && !(am_row && am_row[j]);
      A p = 0, ds = 0;
      if (vis) {
        const int rr = warp * R + r;
        p = exp(dot_row<T, A>(q_s + lane * ld, k_s + rr * dh, dh) * scale - L_s[lane]);
        ds = p * (dot_row<T, A>(do_s + lane * ld, v_s + rr * dh, dh) - D_s[lane]);
      }
      for (int ii = 0; ii < kTile; ++ii) {
        const A pi = __shfl_sync(0xffffffffu, p, ii), dsi = __shfl_sync(0xffffffffu, ds, ii);
        if (pi == A(0) && dsi == A(0)) continue;
        const T* qr = q_s + ii * ld;
        const T* dor = do_s + ii * ld;
#pragma unroll
        for (int k = 0; k < kMaxPerLane; ++k) {
          const int64_t c = lane + k * kWarp;
          if (c < dh) {
            dk[r][k] += dsi * static_cast<A>(qr[c]);
            dv[r][k] += pi * static_cast<A>(dor[c]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t j = j0 + warp * R + r;
    if (j >= Lb) continue;
    T* dkr = dkv + (b * Lb + j) * 2 * d + h * dh;
#pragma unroll
    for (int k = 0; k < kMaxPerLane; ++k) {
      const int64_t c = lane + k * kWarp;
      if (c < dh) {
        dkr[c] = static_cast<T>(dk[r][k] * scale);
        dkr[d + c] = static_cast<T>(dv[r][k]);
      }
    }
  }
}

// Dynamic shared memory of each kernel (bytes), for R rows per warp.
template <typename T, typename A>
size_t attn_fwd_smem(int64_t dh, int R) {
  return sizeof(T) * (2 * kTile * (dh + 1) + R * kWarpsPerBlock * dh);
}
template <typename T, typename A>
size_t attn_dq_smem(int64_t dh, int R) {
  return sizeof(T) * (2 * kTile * (dh + 1) + 2 * R * kWarpsPerBlock * dh);
}
template <typename T, typename A>
size_t attn_dkdv_smem(int64_t dh, int R) {
  return sizeof(A) * 2 * kTile + sizeof(T) * (2 * kTile * (dh + 1) + 2 * R * kWarpsPerBlock * dh);
}

// Allows kernel more than the default 48 KB of dynamic shared memory when it needs it, after
// checking the device's opt-in limit.
template <typename K>
void allow_smem(K kernel, size_t bytes, const char* name, int64_t dh) {
  int limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        c10::cuda::current_device()));
  TORCH_CHECK(bytes <= static_cast<size_t>(limit), "gca (cuda): ", name, " needs ", bytes,
              " bytes of shared memory at head size ", dh, ", over this GPU's ", limit,
              "; use more heads or another backend");
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
}

void check_head_size(const RowLayout& lay) {
  TORCH_CHECK(lay.d / lay.H <= kWarp * kMaxPerLane, "gca (cuda): head size d / n_heads = ",
              lay.d / lay.H, " exceeds the CUDA backend's limit of ", kWarp * kMaxPerLane,
              "; use more heads or another backend");
}

dim3 tiles_grid(int64_t rows, int R, const RowLayout& lay) {
  return dim3(static_cast<unsigned int>((rows + R * kWarpsPerBlock - 1) / (R * kWarpsPerBlock)),
              static_cast<unsigned int>(lay.B * lay.H));
}

}  // namespace

void attn_fwd_cuda(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& kpm,
                   const at::Tensor& am, at::Tensor& o, at::Tensor& lse, const RowLayout& lay) {
  check_head_size(lay);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t dh = lay.d / lay.H;
  GCA_CUDA_DISPATCH(q, "gca_attn_fwd_cuda", {
    constexpr int R = rows_per_warp<A>();
    const auto kernel = attn_fwd_tiled_kernel<scalar_t, A, R>;
    const size_t smem = attn_fwd_smem<scalar_t, A>(dh, R);
    allow_smem(kernel, smem, "attention forward", dh);
    kernel<<<tiles_grid(lay.La, R, lay), kThreads, smem, stream>>>(
        q.data_ptr<scalar_t>(), kv.data_ptr<scalar_t>(), ptr_or_null<bool>(kpm),
        ptr_or_null<bool>(am), am.defined() && am.size(0) == 1, o.data_ptr<scalar_t>(),
        lse.data_ptr<A>(), lay.La, lay.Lb, lay.d, lay.H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void attn_bwd_cuda(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& o,
                   const at::Tensor& dout, const at::Tensor& lse, const at::Tensor& kpm,
                   const at::Tensor& am, at::Tensor& dq, at::Tensor& dkv, const RowLayout& lay) {
  check_head_size(lay);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t dh = lay.d / lay.H;
  at::Tensor Dbuf = at::empty({lay.B * lay.La, lay.H}, lse.options());
  const bool shared = am.defined() && am.size(0) == 1;
  GCA_CUDA_DISPATCH(q, "gca_attn_bwd_cuda", {
    constexpr int R = rows_per_warp<A>();
    const auto dq_kernel = attn_bwd_dq_tiled_kernel<scalar_t, A, R>;
    const size_t dq_smem = attn_dq_smem<scalar_t, A>(dh, R);
    allow_smem(dq_kernel, dq_smem, "attention backward (dq)", dh);
    dq_kernel<<<tiles_grid(lay.La, R, lay), kThreads, dq_smem, stream>>>(
        q.data_ptr<scalar_t>(), kv.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(),
        dout.data_ptr<scalar_t>(), lse.data_ptr<A>(), ptr_or_null<bool>(kpm),
        ptr_or_null<bool>(am), shared, dq.data_ptr<scalar_t>(), Dbuf.data_ptr<A>(), lay.La,
        lay.Lb, lay.d, lay.H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const auto dkdv_kernel = attn_bwd_dkdv_tiled_kernel<scalar_t, A, R>;
    const size_t dkdv_smem = attn_dkdv_smem<scalar_t, A>(dh, R);
    allow_smem(dkdv_kernel, dkdv_smem, "attention backward (dk, dv)", dh);
    dkdv_kernel<<<tiles_grid(lay.Lb, R, lay), kThreads, dkdv_smem, stream>>>(
        q.data_ptr<scalar_t>(), kv.data_ptr<scalar_t>(), dout.data_ptr<scalar_t>(),
        lse.data_ptr<A>(), Dbuf.data_ptr<A>(), ptr_or_null<bool>(kpm), ptr_or_null<bool>(am),
        shared, dkv.data_ptr<scalar_t>(), lay.La, lay.Lb, lay.d, lay.H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace gca
