// CPU row kernels of the fused GCA operator (float32, float64), OpenMP over rows.
//
// What is fused: per (batch, query row, head) the masked scores, their max, the exponentials,
// the row sum and p v are computed in one pass over the visible keys with the scores kept in a
// per-thread buffer of Lb values: the (B, H, La, Lb) score/probability tensors the eager
// reference materialises (several times over, for autograd) never exist. The epilogue (output
// bias only where a key was seen, the cosine, the gate activation, residual and LayerNorm) is
// one pass per row; its backward, with the cosine's gradient, is one pass per row too.
//
// Each query row first lists the keys it sees (causal masks and left padding hide most of Lb).
// Heads up to 64 wide (attn_*_blocks): one task per batch row, whose keys and values are
// transposed once, so the scores are loops along whole 16-key blocks summed in registers (no
// horizontal sum per key); p v and dq sum the visible key rows in registers. Wider heads
// (attn_*_rows): one dot product per visible key, four keys per pass. Both backwards take
// query rows four at a time so each dk/dv row is updated once per group. float32 exp is a
// vectorisable polynomial (vexp), not the scalar libm call.
//
// Determinism: every output element is written by exactly one thread, and the parameter
// reductions (bias and LayerNorm gradients) use fixed row chunks reduced in chunk order,
// so results are bit-identical run to run, whatever the number of threads. The attention
// backward runs one batch row per task, so k/v gradients accumulate in a fixed order.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "gca_core.h"
#include "gca_cpu.h"

namespace gca {
namespace {

constexpr int64_t kRowsPerChunk = 64;  // rows per partial sum of the parameter reductions

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

// Positions of the keys a query row sees, ascending: written once per row, so the score loops
// run over visible keys only (with causal masks and left padding, often a small part of Lb).
inline int64_t visible_keys(const bool* kpm_b, const bool* am_row, int64_t Lb, int32_t* vis) {
  int64_t n = 0;
  if (kpm_b && am_row) {
    for (int64_t j = 0; j < Lb; ++j) { vis[n] = static_cast<int32_t>(j); n += !(kpm_b[j] | am_row[j]); }
  } else if (kpm_b) {
    for (int64_t j = 0; j < Lb; ++j) { vis[n] = static_cast<int32_t>(j); n += !kpm_b[j]; }
  } else if (am_row) {
    for (int64_t j = 0; j < Lb; ++j) { vis[n] = static_cast<int32_t>(j); n += !am_row[j]; }
  } else {
    for (int64_t j = 0; j < Lb; ++j) vis[j] = static_cast<int32_t>(j);
    n = Lb;
  }
  return n;
}

// Turns key positions j of batch row b into rows of kv (compact rows when dm.kpos is set).
inline void key_rows(const Dims& dm, int64_t b, int64_t nv, int32_t* vis) {
  const int64_t base = b * dm.Lb;
  if (dm.kpos) {
    for (int64_t k = 0; k < nv; ++k) vis[k] = dm.kpos[base + vis[k]];
  } else {
    for (int64_t k = 0; k < nv; ++k) vis[k] = static_cast<int32_t>(base + vis[k]);
  }
}

template <typename T, typename A>
inline A dot(const T* a, const T* b, int64_t n) {
  A acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t c = 0; c < n; ++c) acc += static_cast<A>(a[c]) * static_cast<A>(b[c]);
  return acc;
}

// The dot products of x with four rows in one pass: x is loaded once, and the four sums are
// independent dependency chains (one dot at a time is bound by the latency of its single chain).
template <typename T, typename A>
inline void dot4(const T* x, const T* r0, const T* r1, const T* r2, const T* r3, int64_t n, A* out) {
  A a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t c = 0; c < n; ++c) {
    const A xc = x[c];
    a0 += xc * static_cast<A>(r0[c]);
    a1 += xc * static_cast<A>(r1[c]);
    a2 += xc * static_cast<A>(r2[c]);
    a3 += xc * static_cast<A>(r3[c]);
  }
  out[0] = a0;
  out[1] = a1;
  out[2] = a2;
  out[3] = a3;
}

// out[k] = <x, rows + vis[k] * stride> for k < nv (rows already offset to the head's columns).
template <typename T, typename A>
inline void dots(const T* x, const T* rows, const int32_t* vis, int64_t nv, int64_t stride,
                 int64_t n, A* out) {
  int64_t k = 0;
  for (; k + 4 <= nv; k += 4)
    dot4<T, A>(x, rows + vis[k] * stride, rows + vis[k + 1] * stride, rows + vis[k + 2] * stride,
               rows + vis[k + 3] * stride, n, out + k);
  for (; k < nv; ++k) out[k] = dot<T, A>(x, rows + vis[k] * stride, n);
}

// acc += sum_k w[k] * (rows + vis[k] * stride), four rows per pass over acc.
template <typename T, typename A>
inline void axpys(const A* w, const T* rows, const int32_t* vis, int64_t nv, int64_t stride,
                  int64_t n, A* acc) {
  int64_t k = 0;
  for (; k + 4 <= nv; k += 4) {
    const T* r0 = rows + vis[k] * stride;
    const T* r1 = rows + vis[k + 1] * stride;
    const T* r2 = rows + vis[k + 2] * stride;
    const T* r3 = rows + vis[k + 3] * stride;
    const A w0 = w[k], w1 = w[k + 1], w2 = w[k + 2], w3 = w[k + 3];
#pragma omp simd
    for (int64_t c = 0; c < n; ++c)
      acc[c] += w0 * static_cast<A>(r0[c]) + w1 * static_cast<A>(r1[c]) +
                w2 * static_cast<A>(r2[c]) + w3 * static_cast<A>(r3[c]);
  }
  for (; k < nv; ++k) {
    const T* r = rows + vis[k] * stride;
    const A wk = w[k];
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) acc[c] += wk * static_cast<A>(r[c]);
  }
}

// First compact key row of batch row b in kv and how many follow. Compact rows keep the full
// row order, so b's unpadded keys are one contiguous block of kv.
inline void key_block(const Dims& dm, int64_t b, int64_t& k0, int64_t& nk) {
  if (!dm.kpos) {
    k0 = b * dm.Lb;
    nk = dm.Lb;
    return;
  }
  const int32_t* p = dm.kpos + b * dm.Lb;
  int64_t lo = -1, hi = -1;
  for (int64_t j = 0; j < dm.Lb; ++j) {
    if (p[j] < 0) continue;
    if (lo < 0) lo = p[j];
    hi = p[j];
  }
  k0 = lo < 0 ? 0 : lo;
  nk = lo < 0 ? 0 : hi - lo + 1;
}

// Key loops run over whole blocks of kW keys: with a few dozen keys per row, the remainder of
// a runtime-length vector loop (scalar, up to 15 iterations) cost as much as its vector part.
// Block columns past a row's last visible key, or before its first, carry vm = 0 (p = 0).
constexpr int64_t kW = 16;
inline int64_t round_up(int64_t n) { return (n + kW - 1) / kW * kW; }
// Query rows per group in the attention backward (its dk/dv update is written for four).
constexpr int64_t kG = 4;

// t[c * ld + j] = rows[j * rs + c] for c < n, j < nk, and 0 for nk <= j < ld: the block's keys
// (and values) transposed, so that the scores of one query row are a loop along the keys
// (vectorised, no horizontal sums; with dh = 32 a dot product per key spent most of its time
// reducing its vector).
template <typename T, typename A>
inline void transpose_block(const T* rows, int64_t nk, int64_t rs, int64_t n, int64_t ld, A* t) {
  // row by row of t: its writes are contiguous and only the reads stride (written column by
  // column, the strided stores made this copy 12% of the backward kernel)
  for (int64_t c = 0; c < n; ++c) {
    A* tc = t + c * ld;
    for (int64_t j = 0; j < nk; ++j) tc[j] = static_cast<A>(rows[j * rs + c]);
    for (int64_t j = nk; j < ld; ++j) tc[j] = A(0);
  }
}

// One kW-key block of scores in registers (GCC vector extension: one zmm, two ymm or four xmm,
// whichever clone runs).
template <typename A>
struct KBlock {
  typedef A V __attribute__((vector_size(kW * sizeof(A))));
};

// acc[c] = sum_k w[k] rows[vis[k] * stride + c] for c < n. With n a multiple of kW (and no
// conversion) the sums stay in registers, four chains over the keys; axpys passes through acc
// in memory once per four keys, every pass waiting on the previous pass's store.
template <typename T, typename A>
inline void weighted_rows(const A* w, const T* rows, const int32_t* vis, int64_t nv,
                          int64_t stride, int64_t n, A* acc) {
  if constexpr (std::is_same_v<T, A>) {
    if (n % kW == 0) {
      using V = typename KBlock<A>::V;
      for (int64_t c0 = 0; c0 < n; c0 += kW) {
        V a0 = {}, a1 = {}, a2 = {}, a3 = {};
        const T* rc = rows + c0;
        int64_t k = 0;
        for (; k + 4 <= nv; k += 4) {
          V r0, r1, r2, r3;
          std::memcpy(&r0, rc + vis[k] * stride, sizeof(V));
          std::memcpy(&r1, rc + vis[k + 1] * stride, sizeof(V));
          std::memcpy(&r2, rc + vis[k + 2] * stride, sizeof(V));
          std::memcpy(&r3, rc + vis[k + 3] * stride, sizeof(V));
          a0 += w[k] * r0;
          a1 += w[k + 1] * r1;
          a2 += w[k + 2] * r2;
          a3 += w[k + 3] * r3;
        }
        for (; k < nv; ++k) {
          V r0;
          std::memcpy(&r0, rc + vis[k] * stride, sizeof(V));
          a0 += w[k] * r0;
        }
        const V r = (a0 + a1) + (a2 + a3);
        std::memcpy(acc + c0, &r, sizeof(V));
      }
      return;
    }
  }
  for (int64_t c = 0; c < n; ++c) acc[c] = A(0);
  axpys<T, A>(w, rows, vis, nv, stride, n, acc);
}

// s[j] = sum_c (x[c] a) t[c * ld + j] for j in [lo, hi) (multiples of kW). Each block of kW
// keys is summed in registers over c in four interleaved chains (summing into s in memory, one
// pass of c after another, made every pass wait on the previous pass's store). The scores take
// the softmax scale through a: forward and backward then recompute the same scaled scores bit
// for bit (scaling afterwards lets the compiler fuse s * scale - lse into one FMA in the
// backward, and a lone visible key would no longer get exactly p = 1).
template <typename T, typename A>
inline void tdots(const T* x, A a, const A* t, int64_t ld, int64_t n, int64_t lo, int64_t hi, A* s) {
  using V = typename KBlock<A>::V;
  for (int64_t j0 = lo; j0 < hi; j0 += kW) {
    V a0 = {}, a1 = {}, a2 = {}, a3 = {};
    const A* tj = t + j0;
    int64_t c = 0;
    for (; c + 4 <= n; c += 4) {
      V t0, t1, t2, t3;
      std::memcpy(&t0, tj + c * ld, sizeof(V));
      std::memcpy(&t1, tj + (c + 1) * ld, sizeof(V));
      std::memcpy(&t2, tj + (c + 2) * ld, sizeof(V));
      std::memcpy(&t3, tj + (c + 3) * ld, sizeof(V));
      a0 += (static_cast<A>(x[c]) * a) * t0;
      a1 += (static_cast<A>(x[c + 1]) * a) * t1;
      a2 += (static_cast<A>(x[c + 2]) * a) * t2;
      a3 += (static_cast<A>(x[c + 3]) * a) * t3;
    }
    for (; c < n; ++c) {
      V t0;
      std::memcpy(&t0, tj + c * ld, sizeof(V));
      a0 += (static_cast<A>(x[c]) * a) * t0;
    }
    const V r = (a0 + a1) + (a2 + a3);
    std::memcpy(s + j0, &r, sizeof(V));
  }
}

// t[c * ld + j] += x[c] * a * w[j] for c < n, j in [lo, hi) (multiples of kW): rank-one update
// of a transposed gradient block.
template <typename T, typename A>
inline void tger(const T* x, A a, const A* w, int64_t ld, int64_t n, int64_t lo, int64_t hi, A* t) {
  for (int64_t c = 0; c < n; ++c) {
    const A xc = static_cast<A>(x[c]) * a;
    A* tc = t + c * ld;
    for (int64_t j0 = lo; j0 < hi; j0 += kW) {
#pragma omp simd
      for (int64_t j = j0; j < j0 + kW; ++j) tc[j] += xc * w[j];
    }
  }
}

// vm[j] = 1 for the visible keys (vis: rows of kv, ascending; block-relative after - k0), 0 for
// the other columns of [lo, hi), the whole kW blocks spanning them.
template <typename A>
inline void visible_range(const int32_t* vis, int64_t nv, int64_t k0, A* vm, int64_t& lo,
                          int64_t& hi) {
  lo = (vis[0] - k0) / kW * kW;
  hi = round_up(vis[nv - 1] - k0 + 1);
  for (int64_t j = lo; j < hi; ++j) vm[j] = A(0);
  for (int64_t k = 0; k < nv; ++k) vm[vis[k] - k0] = A(1);
}

template <typename T>
GCA_CPU_CLONES void attn_fwd_blocks(const at::Tensor& q_t, const at::Tensor& kv_t, const at::Tensor& kpm_t,
                   const at::Tensor& am_t, at::Tensor& o_t, at::Tensor& lse_t, const Dims& dm) {
  using A = at::opmath_type<T>;
  const int64_t La = dm.La, Lb = dm.Lb, d = dm.d, H = dm.H, dh = d / H;
  const T* q = q_t.data_ptr<T>();     // (B*La, d)
  const T* kv = kv_t.data_ptr<T>();   // (B*Lb, 2d): k then v
  const bool* kpm = kpm_t.defined() ? kpm_t.data_ptr<bool>() : nullptr;  // (B, Lb)
  const bool* am = am_t.defined() ? am_t.data_ptr<bool>() : nullptr;     // (Bm, La, Lb)
  const bool am_shared = am_t.defined() && am_t.size(0) == 1;
  T* o = o_t.data_ptr<T>();           // (B*La, d)
  A* lse = lse_t.data_ptr<A>();       // (B*La, H)
  const A scale = A(1) / std::sqrt(A(dh));
  const A ninf = -std::numeric_limits<A>::infinity();
  // One task per batch row: its keys are transposed once and serve all its query rows (all
  // heads share a row's visible-key list). Rows are independent, so the dynamic schedule does
  // not change any result. Compact path: rows without a stored q are skipped (the caller has
  // set their lse to +inf).
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<int32_t> visv(Lb);
    const int64_t Lw = round_up(Lb);
    std::vector<A> sv(Lw), vmv(Lw), wv(Lb), accv(dh), ktv(d * Lw);
    int32_t* vis = visv.data();
    A* s = sv.data();
    A* vm = vmv.data();
    A* w = wv.data();
    A* acc = accv.data();
    A* kt = ktv.data();
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < dm.B; ++b) {
      int64_t k0, nk;
      key_block(dm, b, k0, nk);
      const int64_t ld = round_up(nk);
      bool transposed = false;
      const bool* kpm_b = kpm ? kpm + b * Lb : nullptr;
      for (int64_t i = 0; i < La; ++i) {
        const int64_t r = b * La + i;
        const int64_t rc = dm.qpos ? dm.qpos[r] : r;  // row of q and o
        if (rc < 0) continue;
        const bool* am_row = am ? am + ((am_shared ? 0 : b) * La + i) * Lb : nullptr;
        const int64_t nv = visible_keys(kpm_b, am_row, Lb, vis);
        T* orow = o + rc * d;
        if (nv == 0) {  // no visible key: o = 0, lse = +inf marks the row
          for (int64_t c = 0; c < d; ++c) orow[c] = T(0);
          for (int64_t h = 0; h < H; ++h) lse[r * H + h] = std::numeric_limits<A>::infinity();
          continue;
        }
        if (!transposed) {
          transpose_block<T, A>(kv + k0 * 2 * d, nk, 2 * d, d, ld, kt);
          transposed = true;
        }
        key_rows(dm, b, nv, vis);  // now rows of kv
        int64_t lo, hi;
        visible_range<A>(vis, nv, k0, vm, lo, hi);
        for (int64_t h = 0; h < H; ++h) {
          tdots<T, A>(q + rc * d + h * dh, scale, kt + h * dh * ld, ld, dh, lo, hi, s);
          A mx = ninf;
          for (int64_t j = lo; j < hi; ++j) mx = (vm[j] != A(0) && s[j] > mx) ? s[j] : mx;
          A l = 0;
          for (int64_t j0 = lo; j0 < hi; j0 += kW) {
#pragma omp simd reduction(+ : l)
            for (int64_t j = j0; j < j0 + kW; ++j) {
              const A e = vm[j] != A(0) ? vexp<A>(s[j] - mx) : A(0);
              s[j] = e;
              l += e;
            }
          }
          for (int64_t k = 0; k < nv; ++k) w[k] = s[vis[k] - k0];
          weighted_rows<T, A>(w, kv + d + h * dh, vis, nv, 2 * d, dh, acc);
          const A inv = A(1) / l;
          for (int64_t c = 0; c < dh; ++c) orow[h * dh + c] = static_cast<T>(acc[c] * inv);
          lse[r * H + h] = mx + std::log(l);
        }
      }
    }
  }
}

// The attention backward takes a batch row's query rows kG at a time. Collects the next group
// (from query position i on, advanced past it): each row with a visible key gets its full row
// index, its visible keys as rows of kv and their count; rows with none get dq = 0 on the way.
// Returns the group's size G (0 when b has no such row left).
template <typename T, typename A>
inline int64_t next_query_group(const Dims& dm, int64_t b, int64_t& i, const A* lse,
                                const bool* kpm_b, const bool* am, bool am_shared, T* dq,
                                int32_t* visv, int64_t* rows, int64_t* nvs) {
  const int64_t La = dm.La, Lb = dm.Lb, d = dm.d;
  int64_t G = 0;
  for (; i < La && G < kG; ++i) {
    const int64_t r = b * La + i;
    const int64_t rc = dm.qpos ? dm.qpos[r] : r;  // row of q, o, dout, dq
    if (rc < 0) continue;  // not stored: no visible key
    if (std::isinf(lse[r * dm.H])) {  // no visible key (for every head): p = 0, nothing flows
      for (int64_t c = 0; c < d; ++c) dq[rc * d + c] = T(0);
      continue;
    }
    const bool* am_row = am ? am + ((am_shared ? 0 : b) * La + i) * Lb : nullptr;
    int32_t* vis = visv + G * Lb;
    nvs[G] = visible_keys(kpm_b, am_row, Lb, vis);
    key_rows(dm, b, nvs[G], vis);  // now rows of kv and dkv (this task's key block)
    rows[G++] = r;
  }
  return G;
}

// dk_j += sum_g (a[g][j] * a_scale) q_g and dv_j += sum_g p[g][j] do_g over the key positions
// u[0..nu) of a query group (dk_j at dk + j * 2d, dv_j d further): each dk/dv row is read and
// written once per group. Rows of the group past its size carry a = p = 0.
template <typename T, typename A>
inline void add_group_dkv(T* dk, int64_t d, int64_t dh, const int32_t* u, int64_t nu,
                          const A* const* a, A a_scale, const A* const* p, const T* const* qg,
                          const T* const* dog) {
  const A *e0 = a[0], *e1 = a[1], *e2 = a[2], *e3 = a[3];
  const A *s0 = p[0], *s1 = p[1], *s2 = p[2], *s3 = p[3];
  const T *q0 = qg[0], *q1 = qg[1], *q2 = qg[2], *q3 = qg[3];
  const T *o0 = dog[0], *o1 = dog[1], *o2 = dog[2], *o3 = dog[3];
  for (int64_t k = 0; k < nu; ++k) {
    const int64_t j = u[k];
    T* dkr = dk + j * 2 * d;
    T* dvr = dkr + d;
    const A a0 = e0[j] * a_scale, a1 = e1[j] * a_scale, a2 = e2[j] * a_scale, a3 = e3[j] * a_scale;
    const A p0 = s0[j], p1 = s1[j], p2 = s2[j], p3 = s3[j];
#pragma omp simd
    for (int64_t c = 0; c < dh; ++c) {
      dkr[c] = static_cast<T>(static_cast<A>(dkr[c]) +
                              (a0 * static_cast<A>(q0[c]) + a1 * static_cast<A>(q1[c]) +
                               a2 * static_cast<A>(q2[c]) + a3 * static_cast<A>(q3[c])));
      dvr[c] = static_cast<T>(static_cast<A>(dvr[c]) +
                              (p0 * static_cast<A>(o0[c]) + p1 * static_cast<A>(o1[c]) +
                               p2 * static_cast<A>(o2[c]) + p3 * static_cast<A>(o3[c])));
    }
  }
}

template <typename T>
GCA_CPU_CLONES void attn_bwd_blocks(const at::Tensor& q_t, const at::Tensor& kv_t, const at::Tensor& o_t,
                   const at::Tensor& do_t, const at::Tensor& lse_t, const at::Tensor& kpm_t,
                   const at::Tensor& am_t, at::Tensor& dq_t, at::Tensor& dkv_t, const Dims& dm) {
  using A = at::opmath_type<T>;
  const int64_t La = dm.La, Lb = dm.Lb, d = dm.d, H = dm.H, dh = d / H;
  const T* q = q_t.data_ptr<T>();      // (B*La, d)
  const T* kv = kv_t.data_ptr<T>();    // (B*Lb, 2d)
  // o is not read: D = sum_j p_j dp_j is formed from the recomputed p (see below)
  const T* dout = do_t.data_ptr<T>();  // (B*La, d)
  const A* lse = lse_t.data_ptr<A>();  // (B*La, H)
  const bool* kpm = kpm_t.defined() ? kpm_t.data_ptr<bool>() : nullptr;
  const bool* am = am_t.defined() ? am_t.data_ptr<bool>() : nullptr;
  const bool am_shared = am_t.defined() && am_t.size(0) == 1;
  T* dq = dq_t.data_ptr<T>();          // (B*La, d)
  T* dkv = dkv_t.data_ptr<T>();        // (B*Lb, 2d), every row written here
  const A scale = A(1) / std::sqrt(A(dh));
  // One task per batch row: it owns that row's dk/dv, so the sums over query
  // rows need no atomics and always run in the same order (bit-identical whatever the thread
  // count). Its keys and values are transposed once for the score loops of all its rows, and
  // its query rows go kG at a time, so that each dk/dv row is read and written once per group
  // (with a causal mask neighbouring rows see nearly the same keys), not once per query row.
#pragma omp parallel num_threads(at::get_num_threads())
  {
    const int64_t Lw = round_up(Lb);
    std::vector<int32_t> visv(kG * Lb), uv(Lw);  // u: written at every j of [lo, hi)
    std::vector<A> sv(kG * Lw), dsv(kG * Lw), vmv(kG * Lw), wv(Lb), accv(dh), kvtv(2 * d * Lw);
    A* acc = accv.data();
    A* w = wv.data();
    A* kvt = kvtv.data();  // (2d, ld): k^T then v^T
    int32_t* u = uv.data();
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < dm.B; ++b) {
      int64_t k0, nk;
      key_block(dm, b, k0, nk);
      // this task's dk/dv block starts at zero (zeroed here, where it is about to be used
      // and stays in cache, rather than in a separate pass over all of dkv)
      std::memset(dkv + k0 * 2 * d, 0, static_cast<size_t>(nk * 2 * d) * sizeof(T));
      if (nk == 0) {  // no stored key: only keyless query rows (dq = 0)
        for (int64_t i = 0; i < La; ++i) {
          const int64_t r = b * La + i;
          const int64_t rc = dm.qpos ? dm.qpos[r] : r;
          if (rc >= 0) for (int64_t c = 0; c < d; ++c) dq[rc * d + c] = T(0);
        }
        continue;
      }
      const int64_t ld = round_up(nk);
      transpose_block<T, A>(kv + k0 * 2 * d, nk, 2 * d, 2 * d, ld, kvt);
      const bool* kpm_b = kpm ? kpm + b * Lb : nullptr;
      int64_t rows[kG], nvs[kG];
      int64_t i = 0;
      while (i < La) {
        const int64_t G = next_query_group<T, A>(dm, b, i, lse, kpm_b, am, am_shared, dq,
                                                 visv.data(), rows, nvs);
        if (G == 0) continue;
        // [lo, hi): the kW blocks spanning every row's visible keys; vm per row over all of it
        int64_t lo = Lw, hi = 0;
        for (int64_t g = 0; g < G; ++g) {
          const int32_t* vis = visv.data() + g * Lb;
          lo = std::min<int64_t>(lo, (vis[0] - k0) / kW * kW);
          hi = std::max<int64_t>(hi, round_up(vis[nvs[g] - 1] - k0 + 1));
        }
        for (int64_t g = 0; g < kG; ++g) {
          A* vm = vmv.data() + g * Lw;
          for (int64_t j = lo; j < hi; ++j) vm[j] = A(0);
          if (g >= G) {  // a missing row of the group: p = ds = 0, it adds nothing to dk, dv
            A* s = sv.data() + g * Lw;
            A* ds = dsv.data() + g * Lw;
            for (int64_t j = lo; j < hi; ++j) s[j] = ds[j] = A(0);
            continue;
          }
          const int32_t* vis = visv.data() + g * Lb;
          for (int64_t k = 0; k < nvs[g]; ++k) vm[vis[k] - k0] = A(1);
        }
        int64_t nu = 0;  // keys some row of the group sees, block-relative
        for (int64_t j = lo; j < hi; ++j) {
          bool any = false;
          for (int64_t g = 0; g < G; ++g) any |= vmv[g * Lw + j] != A(0);
          u[nu] = static_cast<int32_t>(j);
          nu += any;
        }
        for (int64_t h = 0; h < H; ++h) {
          const T* qg[kG];
          const T* dog[kG];
          for (int64_t g = 0; g < kG; ++g) {
            const int64_t r = rows[g < G ? g : 0];
            const int64_t rc = dm.qpos ? dm.qpos[r] : r;
            qg[g] = q + rc * d + h * dh;
            dog[g] = dout + rc * d + h * dh;
          }
          for (int64_t g = 0; g < G; ++g) {
            const int64_t r = rows[g];
            const int64_t rc = dm.qpos ? dm.qpos[r] : r;
            A* s = sv.data() + g * Lw;
            A* ds = dsv.data() + g * Lw;
            const A* vm = vmv.data() + g * Lw;
            const int32_t* vis = visv.data() + g * Lb;
            const A lse_r = lse[r * H + h];
            tdots<T, A>(qg[g], scale, kvt + h * dh * ld, ld, dh, lo, hi, s);
            tdots<T, A>(dog[g], A(1), kvt + (d + h * dh) * ld, ld, dh, lo, hi, ds);  // dp
            // D = sum_j p_j dp_j from the recomputed p and dp themselves, not as <do, o>:
            // summed in the same order as dp, it makes ds exactly 0 where one key takes all
            // the weight
            A D = 0;
            for (int64_t j0 = lo; j0 < hi; j0 += kW) {
#pragma omp simd reduction(+ : D)
              for (int64_t j = j0; j < j0 + kW; ++j) {
                const A p = vm[j] != A(0) ? vexp<A>(s[j] - lse_r) : A(0);
                s[j] = p;
                D += p * ds[j];
              }
            }
            for (int64_t j0 = lo; j0 < hi; j0 += kW) {
#pragma omp simd
              for (int64_t j = j0; j < j0 + kW; ++j) ds[j] = s[j] * (ds[j] - D);
            }
            for (int64_t k = 0; k < nvs[g]; ++k) w[k] = ds[vis[k] - k0];
            weighted_rows<T, A>(w, kv + h * dh, vis, nvs[g], 2 * d, dh, acc);
            T* dqr = dq + rc * d + h * dh;
            for (int64_t c = 0; c < dh; ++c) dqr[c] = static_cast<T>(acc[c] * scale);
          }
          // dk_j += scale sum_g ds_gj q_g, dv_j += sum_g p_gj do_g: one pass over each key row
          const A* ag[kG] = {dsv.data(), dsv.data() + Lw, dsv.data() + 2 * Lw, dsv.data() + 3 * Lw};
          const A* pg[kG] = {sv.data(), sv.data() + Lw, sv.data() + 2 * Lw, sv.data() + 3 * Lw};
          add_group_dkv<T, A>(dkv + k0 * 2 * d + h * dh, d, dh, u, nu, ag, scale, pg, qg, dog);
        }
      }
    }
  }
}

// Row-at-a-time kernels (one dot product per visible key) for wide heads: with dh >= 128 the
// per-key horizontal sum is amortised over the head, while the transposed key blocks of the
// kernels above no longer fit in L1 (measured ~1.5x slower at dh = 128).
template <typename T>
GCA_CPU_CLONES void attn_fwd_rows(const at::Tensor& q_t, const at::Tensor& kv_t, const at::Tensor& kpm_t,
                   const at::Tensor& am_t, at::Tensor& o_t, at::Tensor& lse_t, const Dims& dm) {
  using A = at::opmath_type<T>;
  const int64_t La = dm.La, Lb = dm.Lb, d = dm.d, H = dm.H, dh = d / H;
  const T* q = q_t.data_ptr<T>();     // (B*La, d)
  const T* kv = kv_t.data_ptr<T>();   // (B*Lb, 2d): k then v
  const bool* kpm = kpm_t.defined() ? kpm_t.data_ptr<bool>() : nullptr;  // (B, Lb)
  const bool* am = am_t.defined() ? am_t.data_ptr<bool>() : nullptr;     // (Bm, La, Lb)
  const bool am_shared = am_t.defined() && am_t.size(0) == 1;
  T* o = o_t.data_ptr<T>();           // (B*La, d)
  A* lse = lse_t.data_ptr<A>();       // (B*La, H)
  const A scale = A(1) / std::sqrt(A(dh));
  // compact: only the stored rows (q and o row c is full row qrow[c]; lse stays full-size and
  // the caller has set it to +inf on the other rows)
  const int64_t N = dm.qrow ? dm.nq : dm.B * La;
  // One task per query row (all heads share its visible-key list). Rows are independent, so
  // the dynamic schedule (keyless rows are cheap) does not change any result.
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<int32_t> visv(Lb);
    std::vector<A> sv(Lb), accv(dh);
    int32_t* vis = visv.data();
    A* s = sv.data();
    A* acc = accv.data();
#pragma omp for schedule(dynamic, 16)
    for (int64_t rc = 0; rc < N; ++rc) {
      const int64_t r = dm.qrow ? dm.qrow[rc] : rc;
      const int64_t b = r / La, i = r % La;
      const bool* kpm_b = kpm ? kpm + b * Lb : nullptr;
      const bool* am_row = am ? am + ((am_shared ? 0 : b) * La + i) * Lb : nullptr;
      const int64_t nv = visible_keys(kpm_b, am_row, Lb, vis);
      T* orow = o + rc * d;
      if (nv == 0) {  // no visible key: o = 0, lse = +inf marks the row
        for (int64_t c = 0; c < d; ++c) orow[c] = T(0);
        for (int64_t h = 0; h < H; ++h) lse[r * H + h] = std::numeric_limits<A>::infinity();
        continue;
      }
      key_rows(dm, b, nv, vis);  // now rows of kv
      for (int64_t h = 0; h < H; ++h) {
        const T* qr = q + rc * d + h * dh;
        dots<T, A>(qr, kv + h * dh, vis, nv, 2 * d, dh, s);
        A mx = -std::numeric_limits<A>::infinity();
        for (int64_t k = 0; k < nv; ++k) {
          const A sk = s[k] * scale;
          s[k] = sk;
          mx = sk > mx ? sk : mx;
        }
        A l = 0;
#pragma omp simd reduction(+ : l)
        for (int64_t k = 0; k < nv; ++k) {
          const A e = vexp<A>(s[k] - mx);
          s[k] = e;
          l += e;
        }
        for (int64_t c = 0; c < dh; ++c) acc[c] = A(0);
        axpys<T, A>(s, kv + d + h * dh, vis, nv, 2 * d, dh, acc);
        const A inv = A(1) / l;
        for (int64_t c = 0; c < dh; ++c) orow[h * dh + c] = static_cast<T>(acc[c] * inv);
        lse[r * H + h] = mx + std::log(l);
      }
    }
  }
}

template <typename T>
GCA_CPU_CLONES void attn_bwd_rows(const at::Tensor& q_t, const at::Tensor& kv_t, const at::Tensor& o_t,
                   const at::Tensor& do_t, const at::Tensor& lse_t, const at::Tensor& kpm_t,
                   const at::Tensor& am_t, at::Tensor& dq_t, at::Tensor& dkv_t, const Dims& dm) {
  using A = at::opmath_type<T>;
  const int64_t La = dm.La, Lb = dm.Lb, d = dm.d, H = dm.H, dh = d / H;
  const T* q = q_t.data_ptr<T>();      // (B*La, d)
  const T* kv = kv_t.data_ptr<T>();    // (B*Lb, 2d)
  const T* o = o_t.data_ptr<T>();      // (B*La, d)
  const T* dout = do_t.data_ptr<T>();  // (B*La, d)
  const A* lse = lse_t.data_ptr<A>();  // (B*La, H)
  const bool* kpm = kpm_t.defined() ? kpm_t.data_ptr<bool>() : nullptr;
  const bool* am = am_t.defined() ? am_t.data_ptr<bool>() : nullptr;
  const bool am_shared = am_t.defined() && am_t.size(0) == 1;
  T* dq = dq_t.data_ptr<T>();          // (B*La, d)
  T* dkv = dkv_t.data_ptr<T>();        // (B*Lb, 2d), every row written here
  const A scale = A(1) / std::sqrt(A(dh));
  // One task per batch row: it owns that row's dk/dv, so the sums over query rows need no
  // atomics and always run in the same order (bit-identical whatever the thread count). Query
  // rows go kG at a time, as in attn_bwd_blocks: each dk/dv row (2 dh values) is read and
  // written once per group, not once per query row that sees it (at dh = 128 those updates
  // were most of this kernel's memory traffic).
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<int32_t> visv(kG * Lb), uv(Lb);
    std::vector<A> sv(Lb), dsv(Lb), accv(dh);
    // per group row, over the batch row's key block: p and ds, 0 where it sees no key
    std::vector<A> pgv(kG * Lb), dsgv(kG * Lb);
    std::vector<uint8_t> seenv(Lb, 0);
    A* s = sv.data();
    A* ds = dsv.data();
    A* acc = accv.data();
    int32_t* u = uv.data();
    uint8_t* seen = seenv.data();
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < dm.B; ++b) {
      int64_t k0, nk;
      key_block(dm, b, k0, nk);
      std::memset(dkv + k0 * 2 * d, 0, static_cast<size_t>(nk * 2 * d) * sizeof(T));  // as above
      const bool* kpm_b = kpm ? kpm + b * Lb : nullptr;
      int64_t rows[kG], nvs[kG];
      int64_t i = 0;
      while (i < La) {
        const int64_t G = next_query_group<T, A>(dm, b, i, lse, kpm_b, am, am_shared, dq,
                                                 visv.data(), rows, nvs);
        if (G == 0) continue;
        // u: the key positions (block-relative) some row of the group sees, ascending
        int64_t nu = 0, lo = nk, hi = 0;
        for (int64_t g = 0; g < G; ++g) {
          const int32_t* vis = visv.data() + g * Lb;
          lo = std::min<int64_t>(lo, vis[0] - k0);
          hi = std::max<int64_t>(hi, vis[nvs[g] - 1] - k0 + 1);
          for (int64_t k = 0; k < nvs[g]; ++k) seen[vis[k] - k0] = 1;
        }
        for (int64_t j = lo; j < hi; ++j) {
          u[nu] = static_cast<int32_t>(j);
          nu += seen[j];
          seen[j] = 0;
        }
        for (int64_t g = 0; g < kG; ++g)  // rows past G keep 0: they add nothing to dk, dv
          for (int64_t k = 0; k < nu; ++k) pgv[g * Lb + u[k]] = dsgv[g * Lb + u[k]] = A(0);
        for (int64_t h = 0; h < H; ++h) {
          const T* qg[kG];
          const T* dog[kG];
          for (int64_t g = 0; g < kG; ++g) {
            const int64_t r = rows[g < G ? g : 0];
            const int64_t rc = dm.qpos ? dm.qpos[r] : r;
            qg[g] = q + rc * d + h * dh;
            dog[g] = dout + rc * d + h * dh;
          }
          for (int64_t g = 0; g < G; ++g) {
            const int64_t r = rows[g];
            const int64_t rc = dm.qpos ? dm.qpos[r] : r;
            const int32_t* vis = visv.data() + g * Lb;
            const int64_t nv = nvs[g];
            const A lse_r = lse[r * H + h];
            const A D = dot<T, A>(dog[g], o + rc * d + h * dh, dh);  // sum_j p_j dp_j
            dots<T, A>(qg[g], kv + h * dh, vis, nv, 2 * d, dh, s);
            dots<T, A>(dog[g], kv + d + h * dh, vis, nv, 2 * d, dh, ds);
#pragma omp simd
            for (int64_t k = 0; k < nv; ++k) {
              const A p = vexp<A>(s[k] * scale - lse_r);
              s[k] = p;
              ds[k] = p * (ds[k] - D);
            }
            for (int64_t c = 0; c < dh; ++c) acc[c] = A(0);
            axpys<T, A>(ds, kv + h * dh, vis, nv, 2 * d, dh, acc);
            T* dqr = dq + rc * d + h * dh;
            for (int64_t c = 0; c < dh; ++c) dqr[c] = static_cast<T>(acc[c] * scale);
            A* pg = pgv.data() + g * Lb;
            A* dsg = dsgv.data() + g * Lb;
            for (int64_t k = 0; k < nv; ++k) {
              pg[vis[k] - k0] = s[k];
              dsg[vis[k] - k0] = ds[k];
            }
          }
          // dk_j += scale sum_g ds_gj q_g, dv_j += sum_g p_gj do_g: one pass over each key row
          const A* ag[kG] = {dsgv.data(), dsgv.data() + Lb, dsgv.data() + 2 * Lb, dsgv.data() + 3 * Lb};
          const A* pg[kG] = {pgv.data(), pgv.data() + Lb, pgv.data() + 2 * Lb, pgv.data() + 3 * Lb};
          add_group_dkv<T, A>(dkv + k0 * 2 * d + h * dh, d, dh, u, nu, ag, scale, pg, qg, dog);
        }
      }
    }
  }
}

// Block kernels up to kMaxBlockDh per head, row kernels above.
constexpr int64_t kMaxBlockDh = 64;

template <typename T>
void attn_fwd_impl(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& kpm,
                   const at::Tensor& am, at::Tensor& o, at::Tensor& lse, const Dims& dm) {
  if (dm.d / dm.H <= kMaxBlockDh) attn_fwd_blocks<T>(q, kv, kpm, am, o, lse, dm);
  else attn_fwd_rows<T>(q, kv, kpm, am, o, lse, dm);
}

template <typename T>
void attn_bwd_impl(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& o,
                   const at::Tensor& dout, const at::Tensor& lse, const at::Tensor& kpm,
                   const at::Tensor& am, at::Tensor& dq, at::Tensor& dkv, const Dims& dm) {
  if (dm.d / dm.H <= kMaxBlockDh) attn_bwd_blocks<T>(q, kv, o, dout, lse, kpm, am, dq, dkv, dm);
  else attn_bwd_rows<T>(q, kv, o, dout, lse, kpm, am, dq, dkv, dm);
}

template <typename A>
inline void row_cos(A dot_, A na2, A nb2, A& cos, A& den) {
  den = std::sqrt(na2) * std::sqrt(nb2);
  cos = dot_ / std::max(den, A(kCosEps));
}

template <typename T>
GCA_CPU_CLONES void xprime_fwd_impl(at::Tensor& xp_t, const at::Tensor& bo_t, const at::Tensor& lse_t,
                     const at::Tensor& xa_t, at::Tensor& cos_t, const Dims& dm) {
  using A = at::opmath_type<T>;
  const int64_t N = dm.B * dm.La, d = dm.d, H = dm.H;
  T* xp = xp_t.data_ptr<T>();           // (N, d): o Wo^T on entry, x' on exit
  const T* bo = bo_t.data_ptr<T>();     // (d)
  const A* lse = lse_t.data_ptr<A>();   // (N, H)
  const T* xa = xa_t.data_ptr<T>();     // (N, d)
  T* cos = cos_t.data_ptr<T>();         // (N)
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t r = 0; r < N; ++r) {
    const int64_t rc = dm.qpos ? dm.qpos[r] : r;  // row of xp (compact: active rows only)
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
    A dt = 0, na2 = 0, nb2 = 0;
#pragma omp simd reduction(+ : dt, na2, nb2)
    for (int64_t c = 0; c < d; ++c) {
      const T v = static_cast<T>(xr[c] + bo[c]);
      xr[c] = v;
      const A a = ar[c], bv = v;
      dt += a * bv;
      na2 += a * a;
      nb2 += bv * bv;
    }
    A cs, den;
    row_cos(dt, na2, nb2, cs, den);
    cos[r] = static_cast<T>(cs);
  }
}

template <typename T>
GCA_CPU_CLONES void gate_out_fwd_impl(const at::Tensor& xa_t, const at::Tensor& xp_t, at::Tensor& g_t,
                       const at::Tensor& b2_t, const at::Tensor& lnw_t, const at::Tensor& lnb_t, at::Tensor& y_t,
                       at::Tensor& mean_t, at::Tensor& rstd_t, int64_t act, double eps,
                       const Dims& dm) {
  using A = at::opmath_type<T>;
  const int64_t N = dm.B * dm.La, d = dm.d;
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
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<A> z(d);
    A* zp = z.data();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < N; ++r) {
      const int64_t rc = dm.qpos ? dm.qpos[r] : r;  // row of xp and g (compact: active rows)
      const T* ar = xa + r * d;
      T* yr = y + r * d;
      A sum = 0;
      if (rc < 0) {  // x' = 0: z = x_a, whatever the gate
        for (int64_t c = 0; c < d; ++c) {
          zp[c] = static_cast<A>(ar[c]);
          sum += zp[c];
        }
      } else if (act == kSigmoid) {
        T* gr = g + rc * d;
        const T* pr = xp + rc * d;
#pragma omp simd reduction(+ : sum)
        for (int64_t c = 0; c < d; ++c) {
          const A pre = static_cast<A>(static_cast<T>(static_cast<A>(gr[c]) + static_cast<A>(b2[c])));
          const T gv = static_cast<T>(A(1) / (A(1) + vexp<A>(-pre)));
          gr[c] = gv;
          const A zc = static_cast<A>(ar[c]) + static_cast<A>(gv) * static_cast<A>(pr[c]);
          zp[c] = zc;
          sum += zc;
        }
      } else {
        T* gr = g + rc * d;
        const T* pr = xp + rc * d;
        for (int64_t c = 0; c < d; ++c) {
          const A pre = static_cast<A>(static_cast<T>(static_cast<A>(gr[c]) + static_cast<A>(b2[c])));
          const T gv = static_cast<T>(std::tanh(pre));
          gr[c] = gv;
          const A zc = static_cast<A>(ar[c]) + static_cast<A>(gv) * static_cast<A>(pr[c]);
          zp[c] = zc;
          sum += zc;
        }
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
                       const at::Tensor& mean_t, const at::Tensor& rstd_t, at::Tensor& dgp_t,
                       at::Tensor& db2_t, at::Tensor& dxp_t, at::Tensor& dxa_t, at::Tensor& dlnw_t,
                       at::Tensor& dlnb_t, int64_t act, const Dims& dm) {
  using A = at::opmath_type<T>;
  const int64_t N = dm.B * dm.La, d = dm.d;
  const T* dy = dy_t.data_ptr<T>();      // (N, d)
  const T* dcos = dcos_t.data_ptr<T>();  // (N)
  const T* xa = xa_t.data_ptr<T>();      // (N, d)
  const T* xp = xp_t.data_ptr<T>();      // (N, d)
  const T* g = g_t.data_ptr<T>();        // (N, d), post-activation
  const bool ln = lnw_t.defined();
  const T* lnw = ln ? lnw_t.data_ptr<T>() : nullptr;
  const A* mean = ln ? mean_t.data_ptr<A>() : nullptr;
  const A* rstd = ln ? rstd_t.data_ptr<A>() : nullptr;
  T* dgp = dgp_t.data_ptr<T>();          // (N, d): gradient of the gate pre-activation
  T* dxp = dxp_t.data_ptr<T>();          // (N, d)
  T* dxa = dxa_t.data_ptr<T>();          // (N, d)
  const int64_t nchunks = (N + kRowsPerChunk - 1) / kRowsPerChunk;
  // per-chunk partial sums of dy * zhat and dy (LayerNorm weight and bias gradients) and of
  // dg_pre (b2's gradient: summed here, while each row is in registers, not in another pass)
  std::vector<A> part(nchunks * 3 * d);
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<A> zh(d), dz(d);
    A* zhp = zh.data();
    A* dzp = dz.data();
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < nchunks; ++ch) {
      A* pg = part.data() + ch * 3 * d;
      A* pw = ln ? pg + d : nullptr;
      A* pb = ln ? pg + 2 * d : nullptr;
      std::fill(pg, pg + 3 * d, A(0));
      const int64_t r_end = std::min(N, (ch + 1) * kRowsPerChunk);
      for (int64_t r = ch * kRowsPerChunk; r < r_end; ++r) {
        const int64_t rc = dm.qpos ? dm.qpos[r] : r;  // row of xp, g, dg_pre, dxp
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
            pw[c] += dyc * zhat;
            pb[c] += dyc;
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
        A dt = 0, na2 = 0, nb2 = 0;
#pragma omp simd reduction(+ : dt, na2, nb2)
        for (int64_t c = 0; c < d; ++c) {
          const A a = ar[c], bv = pr[c];
          dt += a * bv;
          na2 += a * a;
          nb2 += bv * bv;
        }
        A cs, den;
        row_cos(dt, na2, nb2, cs, den);
        const A dc = dcos[r];
        // d cos / d a = b / den - cos a / |a|^2 (and symmetrically), when den is not floored
        const bool floored = !(den > A(kCosEps));
        const A inv_den = floored ? A(1) / A(kCosEps) : A(1) / den;
        const A ca = floored ? A(0) : cs / na2, cb = floored ? A(0) : cs / nb2;
        T* dgr = dgp + rc * d;
        T* dxpr = dxp + rc * d;
        T* dxar = dxa + r * d;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) {
          const A a = ar[c], bv = pr[c], gv = gr[c], dzc = dzp[c];
          const A dact = act == kSigmoid ? gv * (A(1) - gv) : A(1) - gv * gv;
          const T dgc = static_cast<T>(dzc * bv * dact);
          dgr[c] = dgc;
          pg[c] += static_cast<A>(dgc);
          dxpr[c] = static_cast<T>(dzc * gv + dc * (a * inv_den - cb * bv));
          dxar[c] = static_cast<T>(dzc + dc * (bv * inv_den - ca * a));
        }
      }
    }
  }
  T* db2 = db2_t.data_ptr<T>();
  T* dlnw = ln ? dlnw_t.data_ptr<T>() : nullptr;
  T* dlnb = ln ? dlnb_t.data_ptr<T>() : nullptr;
  for (int64_t c = 0; c < d; ++c) {
    A sg = 0, sw = 0, sb = 0;
    for (int64_t ch = 0; ch < nchunks; ++ch) {  // chunk order: deterministic
      sg += part[ch * 3 * d + c];
      sw += part[ch * 3 * d + d + c];
      sb += part[ch * 3 * d + 2 * d + c];
    }
    db2[c] = static_cast<T>(sg);
    if (ln) {
      dlnw[c] = static_cast<T>(sw);
      dlnb[c] = static_cast<T>(sb);
    }
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

#define GCA_CPU_DISPATCH(t, name, ...) \
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), name, [&] { __VA_ARGS__; })

void attn_fwd_cpu(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& kpm,
                  const at::Tensor& am, at::Tensor& o, at::Tensor& lse, const Dims& dm) {
  GCA_CPU_DISPATCH(q, "gca_attn_fwd_cpu", attn_fwd_impl<scalar_t>(q, kv, kpm, am, o, lse, dm));
}
void xprime_fwd_cpu(at::Tensor& xp, const at::Tensor& bo, const at::Tensor& lse,
                    const at::Tensor& xa, at::Tensor& cos, const Dims& dm) {
  GCA_CPU_DISPATCH(xp, "gca_xprime_fwd_cpu", xprime_fwd_impl<scalar_t>(xp, bo, lse, xa, cos, dm));
}
void gate_out_fwd_cpu(const at::Tensor& xa, const at::Tensor& xp, at::Tensor& g,
                      const at::Tensor& b2, const at::Tensor& ln_w, const at::Tensor& ln_b,
                      at::Tensor& y, at::Tensor& mean, at::Tensor& rstd, int64_t act, double eps,
                      const Dims& dm) {
  GCA_CPU_DISPATCH(xa, "gca_gate_out_fwd_cpu",
                   gate_out_fwd_impl<scalar_t>(xa, xp, g, b2, ln_w, ln_b, y, mean, rstd, act, eps, dm));
}
void gate_out_bwd_cpu(const at::Tensor& dy, const at::Tensor& dcos, const at::Tensor& xa,
                      const at::Tensor& xp, const at::Tensor& g, const at::Tensor& ln_w,
                      const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& dgp,
                      at::Tensor& db2, at::Tensor& dxp, at::Tensor& dxa, at::Tensor& dlnw,
                      at::Tensor& dlnb, int64_t act, const Dims& dm) {
  GCA_CPU_DISPATCH(xa, "gca_gate_out_bwd_cpu",
                   gate_out_bwd_impl<scalar_t>(dy, dcos, xa, xp, g, ln_w, mean, rstd, dgp, db2,
                                               dxp, dxa, dlnw, dlnb, act, dm));
}
void attn_bwd_cpu(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& o,
                  const at::Tensor& dout, const at::Tensor& lse, const at::Tensor& kpm,
                  const at::Tensor& am, at::Tensor& dq, at::Tensor& dkv, const Dims& dm) {
  GCA_CPU_DISPATCH(q, "gca_attn_bwd_cpu",
                   attn_bwd_impl<scalar_t>(q, kv, o, dout, lse, kpm, am, dq, dkv, dm));
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

const GCAKernels kCpuKernels{attn_fwd_cpu,  xprime_fwd_cpu,   gate_out_fwd_cpu,
                             gate_out_bwd_cpu, bias_relu_cpu, relu_bwd_sum_cpu,
                             col_sum_cpu,   attn_bwd_cpu};
const std::vector<at::ScalarType> kCpuDtypes{at::kFloat, at::kDouble};

}  // namespace

std::vector<at::Tensor> gca_fwd_cpu(const at::Tensor& x_a, const at::Tensor& x_b,
                                    const at::Tensor& wq, const at::Tensor& bq,
                                    const at::Tensor& wk, const at::Tensor& bk,
                                    const at::Tensor& wv, const at::Tensor& bv,
                                    const at::Tensor& wo, const at::Tensor& bo,
                                    const at::Tensor& w1, const at::Tensor& b1,
                                    const at::Tensor& w2, const at::Tensor& b2, const OptT& ln_w,
                                    const OptT& ln_b, const OptT& kpm, const OptT& am,
                                    int64_t n_heads, int64_t act, double ln_eps, bool zero_tails) {
  return gca_forward(kCpuKernels, "gca_fwd (cpp)", c10::DeviceType::CPU, kCpuDtypes, x_a, x_b,
                     wq, bq, wk, bk, wv, bv, wo, bo, w1, b1, w2, b2, ln_w, ln_b, kpm, am, n_heads,
                     act, ln_eps, zero_tails);
}

std::vector<at::Tensor> gca_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& dcos, const at::Tensor& x_a, const at::Tensor& x_b,
    const at::Tensor& wq, const at::Tensor& bq, const at::Tensor& wk, const at::Tensor& bk,
    const at::Tensor& wv, const at::Tensor& bv, const at::Tensor& wo, const at::Tensor& bo,
    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
    const OptT& ln_w, const OptT& ln_b, const OptT& kpm, const OptT& am, const at::Tensor& q,
    const at::Tensor& kv, const at::Tensor& o, const at::Tensor& lse, const at::Tensor& xp,
    const at::Tensor& h, const at::Tensor& g, const at::Tensor& mean, const at::Tensor& rstd,
    int64_t n_heads, int64_t act, double ln_eps) {
  return gca_backward(kCpuKernels, "gca_bwd (cpp)", c10::DeviceType::CPU, kCpuDtypes, dy, dcos,
                      x_a, x_b, wq, bq, wk, bk, wv, bv, wo, bo, w1, b1, w2, b2, ln_w, ln_b, kpm,
                      am, q, kv, o, lse, xp, h, g, mean, rstd, n_heads, act, ln_eps);
}

}  // namespace gca
