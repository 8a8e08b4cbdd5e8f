// CPU row kernels of the fused GCA operator (float32, float64), OpenMP over rows.
//
// What is fused: per (batch, query row, head) the masked scores, their max, the exponentials,
// the row sum and p v are computed with the scores kept in per-thread buffers of Lb values: the
// (B, H, La, Lb) score/probability tensors the eager reference materialises (several times
// over, for autograd) never exist. The epilogue (output bias only where a key was seen, the
// cosine, the gate activation, residual and LayerNorm) is one pass per row; its backward, with
// the cosine's gradient, is one pass per row too.
//
// Attention: one task per batch row, whose keys (and values) are transposed once; its query
// rows go four at a time (each loaded key vector feeds four FMAs), each row over the keys it
// sees (causal masks and left padding hide most of Lb), in whole 16-key blocks summed in
// registers. The backward keeps the batch row's p and ds and forms dk, dv as register-tiled
// products over its query rows. float32 exp is a vectorisable polynomial (vexp), not the
// scalar libm call.
//
// Determinism: every output element is written by exactly one thread, and the parameter
// reductions (bias and LayerNorm gradients) use fixed row chunks reduced in chunk order,
// so results are bit-identical run to run, whatever the number of threads. The attention
// backward runs one batch row per task, so k/v gradients accumulate in a fixed order.
//
// The OpenMP regions read and write raw pointers only and call nothing in ATen, so the workers'
// thread-local state (grad mode, dispatch keys), which is not the caller's, never matters.
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
// Eight mask bytes at a time (bool bytes are 0 or 1): under such masks a word is nearly always
// all blocked or all visible, and the byte-by-byte loop was ~4% of the attention backward.
inline int64_t visible_keys(const bool* kpm_b, const bool* am_row, int64_t Lb, int32_t* vis) {
  if (!kpm_b && !am_row) {
    for (int64_t j = 0; j < Lb; ++j) vis[j] = static_cast<int32_t>(j);
    return Lb;
  }
  constexpr uint64_t kAllBlocked = 0x0101010101010101ull;
  int64_t n = 0, j = 0;
  for (; j + 8 <= Lb; j += 8) {
    uint64_t w = 0, wa = 0;
    if (kpm_b) std::memcpy(&w, kpm_b + j, 8);
    if (am_row) std::memcpy(&wa, am_row + j, 8);
    w |= wa;
    if (w == kAllBlocked) continue;
    for (int64_t k = 0; k < 8; ++k) {
      vis[n] = static_cast<int32_t>(j + k);
      n += !((w >> (8 * k)) & 1);
    }
  }
  for (; j < Lb; ++j) {
    vis[n] = static_cast<int32_t>(j);
    n += !((kpm_b && kpm_b[j]) || (am_row && am_row[j]));
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

// First stored row of batch row b under a row map (pos: full row -> compact row, -1 where the
// row is not stored; null on the dense path, where all L rows of b are stored) and how many
// follow. Compact rows keep the full row order, so b's stored rows are one contiguous block.
inline void stored_block(const int32_t* pos, int64_t b, int64_t L, int64_t& r0, int64_t& n) {
  if (!pos) {
    r0 = b * L;
    n = L;
    return;
  }
  const int32_t* p = pos + b * L;
  int64_t lo = -1, hi = -1;
  for (int64_t j = 0; j < L; ++j) {
    if (p[j] < 0) continue;
    if (lo < 0) lo = p[j];
    hi = p[j];
  }
  r0 = lo < 0 ? 0 : lo;
  n = lo < 0 ? 0 : hi - lo + 1;
}
// b's keys (and values) in kv, and b's query rows in q, o, dout and dq
inline void key_block(const Dims& dm, int64_t b, int64_t& k0, int64_t& nk) {
  stored_block(dm.kpos, b, dm.Lb, k0, nk);
}
inline void query_block(const Dims& dm, int64_t b, int64_t& r0, int64_t& nr) {
  stored_block(dm.qpos, b, dm.La, r0, nr);
}

// Asks for a contiguous span of memory ahead of its use (every 64-byte line). A batch row's keys
// are first read by the transpose, 16 rows 2d apart at a time, and its query rows by the tiles:
// on demand each line was a separate miss (perf put ~10% of the forward on the transpose's loads).
template <typename T>
inline void prefetch_span(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o);
}

// Key loops run over whole blocks of kW keys: with a few dozen keys per row, the remainder of
// a runtime-length vector loop (scalar, up to 15 iterations) cost as much as its vector part.
// Block columns past a row's last visible key, or before its first, carry vm = 0 (p = 0).
constexpr int64_t kW = 16;
inline int64_t round_up(int64_t n) { return (n + kW - 1) / kW * kW; }
// Query rows per group in the attention kernels (the register tiles are written for four).
constexpr int64_t kG = 4;

#define GCA_TILE_INLINE __attribute__((always_inline)) inline

// 16 x 16 float block transposed in registers: four rounds of zips (row 2i, 2i+1 <- the
// interleaved halves of rows i and i + 8) take row r to column r. GCC lowers each zip to one
// two-source permute (vpermt2ps) in the AVX-512 clone.
typedef float V16f __attribute__((vector_size(64)));
typedef int32_t V16i __attribute__((vector_size(64)));

GCA_TILE_INLINE void transpose16(V16f* r) {
  const V16i lo = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
  const V16i hi = {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  for (int round = 0; round < 4; ++round) {
    V16f t[16];
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = __builtin_shuffle(r[i], r[i + 8], lo);
      t[2 * i + 1] = __builtin_shuffle(r[i], r[i + 8], hi);
    }
    for (int i = 0; i < 16; ++i) r[i] = t[i];
  }
}

// t[c * ld + j] = rows[j * rs + c] for c < n, j < nk, and 0 for nk <= j < ld (ld a multiple of
// kW): the block's keys (and values) transposed, so that scores are loops along the keys
// (vectorised, no horizontal sums; with dh = 32 a dot product per key spent most of its time
// reducing its vector). float: 16 x 16 tiles through registers (element by element, the
// strided reads made this copy ~0.9 ms of the forward and ~1.4 ms of the backward at
// (256, 50, 256)); the columns past the last whole tile, and double, go element by element.
template <typename T, typename A>
GCA_TILE_INLINE void transpose_block(const T* rows, int64_t nk, int64_t rs, int64_t n, int64_t ld,
                                     A* t) {
  int64_t c0 = 0;
  if constexpr (std::is_same_v<T, float> && std::is_same_v<A, float>) {
    const int64_t nc = n / 16 * 16;
    // 16 rows at a time, each read along its length (16 sequential streams for the prefetcher;
    // column tiles first had every load hop 2d floats to the next row)
    for (int64_t j0 = 0; j0 < ld; j0 += 16) {
      for (c0 = 0; c0 < nc; c0 += 16) {
        V16f r[16];
        for (int64_t i = 0; i < 16; ++i) {
          if (j0 + i < nk)
            std::memcpy(&r[i], rows + (j0 + i) * rs + c0, sizeof(V16f));
          else
            r[i] = V16f{};
        }
        transpose16(r);
        for (int64_t i = 0; i < 16; ++i) std::memcpy(t + (c0 + i) * ld + j0, &r[i], sizeof(V16f));
      }
    }
    c0 = nc;
  }
  // row by row of t: its writes are contiguous and only the reads stride (written column by
  // column, the strided stores made this copy 12% of the backward kernel)
  for (int64_t c = c0; c < n; ++c) {
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

// The attention kernels take a batch row's query rows kG at a time. Collects the next group
// (from query position i on, advanced past it): each stored row with a visible key gets its
// full row index r, its compact row rc (of q, o, dout, dq), its visible keys as rows of kv and
// their count; rows with none go to keyless(r, rc) on the way. Slots past the group's size G
// repeat its first row (the four-row tiles compute them; their results are not used). Returns G
// (0 when b has no such row left).
template <typename F>
inline int64_t next_query_group(const Dims& dm, int64_t b, int64_t& i, const bool* kpm_b,
                                const bool* am, bool am_shared, int32_t* visv, int64_t* rows,
                                int64_t* rcs, int64_t* nvs, F&& keyless) {
  const int64_t La = dm.La, Lb = dm.Lb;
  int64_t G = 0;
  for (; i < La && G < kG; ++i) {
    const int64_t r = b * La + i;
    const int64_t rc = dm.qpos ? dm.qpos[r] : r;
    if (rc < 0) continue;  // not stored: no visible key
    const bool* am_row = am ? am + ((am_shared ? 0 : b) * La + i) * Lb : nullptr;
    int32_t* vis = visv + G * Lb;
    const int64_t nv = visible_keys(kpm_b, am_row, Lb, vis);
    if (nv == 0) {
      keyless(r, rc);
      continue;
    }
    key_rows(dm, b, nv, vis);  // now rows of kv (and dkv): this task's key block
    rows[G] = r;
    rcs[G] = rc;
    nvs[G++] = nv;
  }
  for (int64_t g = G; G > 0 && g < kG; ++g) {
    rows[g] = rows[0];
    rcs[g] = rcs[0];
  }
  return G;
}

// ---- Attention kernels ----------------------------------------------------------------------
//
// A batch row's query rows go four at a time through every step, so each key (or value)
// vector loaded from cache feeds four FMAs: the scores of four rows against the transposed key
// block, p v and dq of four rows over the union of their visible keys, and (backward) dk, dv as
// small products over all of the batch row's query rows with the sums held in registers.
// (Replaced per-row kernels, which loaded two values per FMA and, at dh = 128, streamed the key
// block from L2 once per query row: attention at (128, 200, 128) 8.3 + 16.0 -> 6.1 + 11.1 ms.)
// always_inline (GCA_TILE_INLINE): the callers are target_clones, which GCC does not inline
// plain functions into.

// s_g[j] = sum_c (x_g[c] a) t[c * ld + j] for the four rows g, j in [lo, hi) (multiples of kW):
// a 4-row x 2-block tile of sums in registers, one chain per (row, key) in c order, so a row's
// scores do not depend on which group it falls in (forward and backward recompute them bit for
// bit, as lse requires).
template <typename T, typename A>
GCA_TILE_INLINE void tdots4(const T* const* x, A a, const A* t, int64_t ld, int64_t n, int64_t lo,
                            int64_t hi, A* const* s) {
  using V = typename KBlock<A>::V;
  const T *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
  int64_t j0 = lo;
  for (; j0 + 2 * kW <= hi; j0 += 2 * kW) {
    V a00 = {}, a01 = {}, a10 = {}, a11 = {}, a20 = {}, a21 = {}, a30 = {}, a31 = {};
    const A* tj = t + j0;
    for (int64_t c = 0; c < n; ++c) {
      V t0, t1;
      std::memcpy(&t0, tj + c * ld, sizeof(V));
      std::memcpy(&t1, tj + c * ld + kW, sizeof(V));
      const A y0 = static_cast<A>(x0[c]) * a, y1 = static_cast<A>(x1[c]) * a;
      const A y2 = static_cast<A>(x2[c]) * a, y3 = static_cast<A>(x3[c]) * a;
      a00 += y0 * t0; a01 += y0 * t1;
      a10 += y1 * t0; a11 += y1 * t1;
      a20 += y2 * t0; a21 += y2 * t1;
      a30 += y3 * t0; a31 += y3 * t1;
    }
    std::memcpy(s[0] + j0, &a00, sizeof(V)); std::memcpy(s[0] + j0 + kW, &a01, sizeof(V));
    std::memcpy(s[1] + j0, &a10, sizeof(V)); std::memcpy(s[1] + j0 + kW, &a11, sizeof(V));
    std::memcpy(s[2] + j0, &a20, sizeof(V)); std::memcpy(s[2] + j0 + kW, &a21, sizeof(V));
    std::memcpy(s[3] + j0, &a30, sizeof(V)); std::memcpy(s[3] + j0 + kW, &a31, sizeof(V));
  }
  if (j0 < hi) {  // one block left
    V a0 = {}, a1 = {}, a2 = {}, a3 = {};
    const A* tj = t + j0;
    for (int64_t c = 0; c < n; ++c) {
      V t0;
      std::memcpy(&t0, tj + c * ld, sizeof(V));
      a0 += (static_cast<A>(x0[c]) * a) * t0;
      a1 += (static_cast<A>(x1[c]) * a) * t0;
      a2 += (static_cast<A>(x2[c]) * a) * t0;
      a3 += (static_cast<A>(x3[c]) * a) * t0;
    }
    std::memcpy(s[0] + j0, &a0, sizeof(V));
    std::memcpy(s[1] + j0, &a1, sizeof(V));
    std::memcpy(s[2] + j0, &a2, sizeof(V));
    std::memcpy(s[3] + j0, &a3, sizeof(V));
  }
}

// out_g[c] = f_g sum_k w_g[u[k]] rows[u[k] * stride + c] for c < n and the first G of the four
// rows g (w_g indexed by block-relative key position; u: the keys any of the four rows sees, a
// weight of exactly 0 where a row does not). Two kW-column chunks of four rows (8 sums) stay in
// registers over the keys: each chunk of a key row is loaded once for the four rows.
template <typename T, typename A>
GCA_TILE_INLINE void weighted_rows4(const A* const* w, const int32_t* u, int64_t nu, const T* rows,
                                    int64_t stride, int64_t n, const A* f, T* const* out, int64_t G) {
  using V = typename KBlock<A>::V;
  const A *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
  int64_t c0 = 0;
  if constexpr (std::is_same_v<T, A>) {
    for (; c0 + 2 * kW <= n; c0 += 2 * kW) {
      V a00 = {}, a01 = {}, a10 = {}, a11 = {}, a20 = {}, a21 = {}, a30 = {}, a31 = {};
      for (int64_t k = 0; k < nu; ++k) {
        const int64_t j = u[k];
        const T* r = rows + j * stride + c0;
        V r0, r1;
        std::memcpy(&r0, r, sizeof(V));
        std::memcpy(&r1, r + kW, sizeof(V));
        a00 += w0[j] * r0; a01 += w0[j] * r1;
        a10 += w1[j] * r0; a11 += w1[j] * r1;
        a20 += w2[j] * r0; a21 += w2[j] * r1;
        a30 += w3[j] * r0; a31 += w3[j] * r1;
      }
      const V acc[8] = {a00, a01, a10, a11, a20, a21, a30, a31};
      for (int64_t g = 0; g < G; ++g) {
        const V o0 = acc[2 * g] * f[g], o1 = acc[2 * g + 1] * f[g];
        std::memcpy(out[g] + c0, &o0, sizeof(V));
        std::memcpy(out[g] + c0 + kW, &o1, sizeof(V));
      }
    }
    for (; c0 + kW <= n; c0 += kW) {
      V a0 = {}, a1 = {}, a2 = {}, a3 = {};
      for (int64_t k = 0; k < nu; ++k) {
        const int64_t j = u[k];
        V r0;
        std::memcpy(&r0, rows + j * stride + c0, sizeof(V));
        a0 += w0[j] * r0;
        a1 += w1[j] * r0;
        a2 += w2[j] * r0;
        a3 += w3[j] * r0;
      }
      const V acc[4] = {a0, a1, a2, a3};
      for (int64_t g = 0; g < G; ++g) {
        const V o0 = acc[g] * f[g];
        std::memcpy(out[g] + c0, &o0, sizeof(V));
      }
    }
  }
  for (int64_t c = c0; c < n; ++c) {  // head widths that are not a multiple of kW
    A a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    for (int64_t k = 0; k < nu; ++k) {
      const int64_t j = u[k];
      const A rv = static_cast<A>(rows[j * stride + c]);
      a0 += w0[j] * rv;
      a1 += w1[j] * rv;
      a2 += w2[j] * rv;
      a3 += w3[j] * rv;
    }
    const A acc[4] = {a0, a1, a2, a3};
    for (int64_t g = 0; g < G; ++g) out[g][c] = static_cast<T>(acc[g] * f[g]);
  }
}

// out_j[c] = f sum_r W[r * ld + j] x_r[c] for every key position j < nk and c < n (out_j at
// out + j * os): the dk (W = ds, x = q) and dv (W = p, x = dout) products of a batch row, over
// its nr query rows. A tile of four keys x two kW-column chunks is summed in registers over the
// rows whose key range [rlo, rhi) (first to last visible key) meets it (with a causal mask,
// about half of them); W is 0 outside each row's visible keys, so the sums are exact over the
// visible pairs, and skipping a row adds nothing it would have added. Every key row
// of the block is written (0 where no row sees the key).
template <typename T, typename A>
GCA_TILE_INLINE void key_grads(const A* W, int64_t ld, const T* const* x, const int32_t* rlo,
                               const int32_t* rhi, int64_t nr, int64_t nk, int64_t n, A f, T* out,
                               int64_t os) {
  using V = typename KBlock<A>::V;
  for (int64_t j0 = 0; j0 < nk; j0 += 4) {
    const int64_t nj = std::min<int64_t>(4, nk - j0);  // W is 0 past nk (up to ld)
    int64_t c0 = 0;
    if constexpr (std::is_same_v<T, A>) {
      for (; c0 + 2 * kW <= n; c0 += 2 * kW) {
        V a00 = {}, a01 = {}, a10 = {}, a11 = {}, a20 = {}, a21 = {}, a30 = {}, a31 = {};
        for (int64_t r = 0; r < nr; ++r) {
          if (rhi[r] <= j0 || rlo[r] >= j0 + 4) continue;
          const A* wr = W + r * ld + j0;
          V x0, x1;
          std::memcpy(&x0, x[r] + c0, sizeof(V));
          std::memcpy(&x1, x[r] + c0 + kW, sizeof(V));
          a00 += wr[0] * x0; a01 += wr[0] * x1;
          a10 += wr[1] * x0; a11 += wr[1] * x1;
          a20 += wr[2] * x0; a21 += wr[2] * x1;
          a30 += wr[3] * x0; a31 += wr[3] * x1;
        }
        const V acc[8] = {a00, a01, a10, a11, a20, a21, a30, a31};
        for (int64_t jj = 0; jj < nj; ++jj) {
          const V o0 = acc[2 * jj] * f, o1 = acc[2 * jj + 1] * f;
          std::memcpy(out + (j0 + jj) * os + c0, &o0, sizeof(V));
          std::memcpy(out + (j0 + jj) * os + c0 + kW, &o1, sizeof(V));
        }
      }
      for (; c0 + kW <= n; c0 += kW) {
        V a0 = {}, a1 = {}, a2 = {}, a3 = {};
        for (int64_t r = 0; r < nr; ++r) {
          if (rhi[r] <= j0 || rlo[r] >= j0 + 4) continue;
          const A* wr = W + r * ld + j0;
          V x0;
          std::memcpy(&x0, x[r] + c0, sizeof(V));
          a0 += wr[0] * x0;
          a1 += wr[1] * x0;
          a2 += wr[2] * x0;
          a3 += wr[3] * x0;
        }
        const V acc[4] = {a0, a1, a2, a3};
        for (int64_t jj = 0; jj < nj; ++jj) {
          const V o0 = acc[jj] * f;
          std::memcpy(out + (j0 + jj) * os + c0, &o0, sizeof(V));
        }
      }
    }
    for (int64_t c = c0; c < n; ++c) {
      A acc[4] = {0, 0, 0, 0};
      for (int64_t r = 0; r < nr; ++r) {
        if (rhi[r] <= j0 || rlo[r] >= j0 + 4) continue;
        const A xv = static_cast<A>(x[r][c]);
        for (int64_t jj = 0; jj < 4; ++jj) acc[jj] += W[r * ld + j0 + jj] * xv;
      }
      for (int64_t jj = 0; jj < nj; ++jj) out[(j0 + jj) * os + c] = static_cast<T>(acc[jj] * f);
    }
  }
}

// The keys of a group of G query rows (visible keys as rows of kv, block-relative after - k0):
// [lo, hi) the kW blocks spanning them all, vm_g over it for g < G (1 where row g sees the key,
// 0 for the other columns), u the keys some row of the group sees, ascending; returns their
// number.
template <typename A>
GCA_TILE_INLINE int64_t group_keys(const int32_t* visv, int64_t Lb, const int64_t* nvs, int64_t G,
                                   int64_t k0, A* vmv, int64_t Lw, int32_t* u, int64_t& lo,
                                   int64_t& hi) {
  lo = Lw;
  hi = 0;
  for (int64_t g = 0; g < G; ++g) {
    const int32_t* vis = visv + g * Lb;
    lo = std::min<int64_t>(lo, (vis[0] - k0) / kW * kW);
    hi = std::max<int64_t>(hi, round_up(vis[nvs[g] - 1] - k0 + 1));
  }
  for (int64_t g = 0; g < G; ++g) {
    A* vm = vmv + g * Lw;
    for (int64_t j = lo; j < hi; ++j) vm[j] = A(0);
    const int32_t* vis = visv + g * Lb;
    for (int64_t k = 0; k < nvs[g]; ++k) vm[vis[k] - k0] = A(1);
  }
  int64_t nu = 0;
  for (int64_t j = lo; j < hi; ++j) {
    bool any = false;
    for (int64_t g = 0; g < G; ++g) any |= vmv[g * Lw + j] != A(0);
    u[nu] = static_cast<int32_t>(j);
    nu += any;
  }
  return nu;
}

template <typename T>
GCA_CPU_CLONES void attn_fwd_tiles(const at::Tensor& q_t, const at::Tensor& kv_t, const at::Tensor& kpm_t,
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
  // One task per batch row: its keys are transposed once and serve all its query rows, four at
  // a time (all heads share a row's visible-key list). Rows are independent, so the dynamic
  // schedule does not change any result. Compact path: rows without a stored q are skipped (the
  // caller has set their lse to +inf).
#pragma omp parallel num_threads(at::get_num_threads())
  {
    const int64_t Lw = round_up(Lb);
    std::vector<int32_t> visv(kG * Lb), uv(Lw);
    std::vector<A> sv(kG * Lw, A(0)), vmv(kG * Lw), ktv(d * Lw);
    A* kt = ktv.data();
    int32_t* u = uv.data();
    A* const sg[kG] = {sv.data(), sv.data() + Lw, sv.data() + 2 * Lw, sv.data() + 3 * Lw};
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < dm.B; ++b) {
      int64_t k0, nk, r0, nq;
      key_block(dm, b, k0, nk);
      query_block(dm, b, r0, nq);
      prefetch_span(kv + k0 * 2 * d, nk * 2 * d);
      prefetch_span(q + r0 * d, nq * d);
      const int64_t ld = round_up(nk);
      bool transposed = false;
      const bool* kpm_b = kpm ? kpm + b * Lb : nullptr;
      int64_t rows[kG], rcs[kG], nvs[kG];
      const auto keyless = [&](int64_t r, int64_t rc) {  // o = 0, lse = +inf marks the row
        for (int64_t c = 0; c < d; ++c) o[rc * d + c] = T(0);
        for (int64_t h = 0; h < H; ++h) lse[r * H + h] = std::numeric_limits<A>::infinity();
      };
      int64_t i = 0;
      while (i < La) {
        const int64_t G = next_query_group(dm, b, i, kpm_b, am, am_shared, visv.data(), rows,
                                           rcs, nvs, keyless);
        if (G == 0) continue;
        if (!transposed) {
          transpose_block<T, A>(kv + k0 * 2 * d, nk, 2 * d, d, ld, kt);
          transposed = true;
        }
        int64_t lo, hi;
        const int64_t nu = group_keys<A>(visv.data(), Lb, nvs, G, k0, vmv.data(), Lw, u, lo, hi);
        for (int64_t h = 0; h < H; ++h) {
          const T* xg[kG];
          T* og[kG];
          for (int64_t g = 0; g < kG; ++g) {
            xg[g] = q + rcs[g] * d + h * dh;
            og[g] = o + rcs[g] * d + h * dh;
          }
          if (dm.q_scaled)  // a literal 1: the compiler drops the multiply
            tdots4<T, A>(xg, A(1), kt + h * dh * ld, ld, dh, lo, hi, sg);
          else
            tdots4<T, A>(xg, scale, kt + h * dh * ld, ld, dh, lo, hi, sg);
          A f[kG] = {A(0), A(0), A(0), A(0)};
          for (int64_t g = 0; g < G; ++g) {
            A* s = sg[g];
            const A* vm = vmv.data() + g * Lw;
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
            f[g] = A(1) / l;
            lse[rows[g] * H + h] = mx + std::log(l);
          }
          weighted_rows4<T, A>(sg, u, nu, kv + k0 * 2 * d + d + h * dh, 2 * d, dh, f, og, G);
        }
      }
    }
  }
}

template <typename T>
GCA_CPU_CLONES void attn_bwd_tiles(const at::Tensor& q_t, const at::Tensor& kv_t, const at::Tensor& o_t,
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
  // One task per batch row: it owns that row's dk/dv, so the sums over query rows need no
  // atomics and always run in the same order (bit-identical whatever the thread count). First
  // its query rows, four at a time: p and ds (kept, per head, for the whole batch row) and dq.
  // Then dk = scale ds^T q and dv = p^T dout as register-tiled products over those rows.
#pragma omp parallel num_threads(at::get_num_threads())
  {
    const int64_t Lw = round_up(Lb);
    std::vector<int32_t> visv(kG * Lb), uv(Lw), rlov(La), rhiv(La);
    std::vector<int64_t> rcv(La);
    std::vector<A> sv(kG * Lw, A(0)), dsv(kG * Lw, A(0)), vmv(kG * Lw), kvtv(2 * d * Lw);
    std::vector<A> pall(H * La * Lw), dsall(H * La * Lw);  // per head: (rows, ld)
    std::vector<const T*> xr(La);
    A* kvt = kvtv.data();  // (2d, ld): k^T then v^T
    int32_t* u = uv.data();
    A* const sg[kG] = {sv.data(), sv.data() + Lw, sv.data() + 2 * Lw, sv.data() + 3 * Lw};
    A* const dsg[kG] = {dsv.data(), dsv.data() + Lw, dsv.data() + 2 * Lw, dsv.data() + 3 * Lw};
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < dm.B; ++b) {
      int64_t k0, nk;
      key_block(dm, b, k0, nk);
      if (nk == 0) {  // no stored key: only keyless query rows (dq = 0)
        for (int64_t i = 0; i < La; ++i) {
          const int64_t r = b * La + i;
          const int64_t rc = dm.qpos ? dm.qpos[r] : r;
          if (rc >= 0) for (int64_t c = 0; c < d; ++c) dq[rc * d + c] = T(0);
        }
        continue;
      }
      int64_t r0, nq;
      query_block(dm, b, r0, nq);
      prefetch_span(kv + k0 * 2 * d, nk * 2 * d);
      prefetch_span(q + r0 * d, nq * d);
      prefetch_span(dout + r0 * d, nq * d);
      const int64_t ld = round_up(nk);
      transpose_block<T, A>(kv + k0 * 2 * d, nk, 2 * d, 2 * d, ld, kvt);
      const bool* kpm_b = kpm ? kpm + b * Lb : nullptr;
      int64_t rows[kG], rcs[kG], nvs[kG];
      // no visible key (the forward's lse is +inf there): p = 0, nothing flows
      const auto keyless = [&](int64_t, int64_t rc) {
        for (int64_t c = 0; c < d; ++c) dq[rc * d + c] = T(0);
      };
      int64_t nr = 0;  // query rows of b with a visible key so far
      int64_t i = 0;
      while (i < La) {
        const int64_t G = next_query_group(dm, b, i, kpm_b, am, am_shared, visv.data(), rows,
                                           rcs, nvs, keyless);
        if (G == 0) continue;
        int64_t lo, hi;
        const int64_t nu = group_keys<A>(visv.data(), Lb, nvs, G, k0, vmv.data(), Lw, u, lo, hi);
        for (int64_t h = 0; h < H; ++h) {
          const T* qg[kG];
          const T* dog[kG];
          T* dqg[kG];
          for (int64_t g = 0; g < kG; ++g) {  // rows past G repeat the first (results unused)
            qg[g] = q + rcs[g] * d + h * dh;
            dog[g] = dout + rcs[g] * d + h * dh;
            dqg[g] = dq + rcs[g] * d + h * dh;
          }
          if (dm.q_scaled)  // bit for bit the forward's scores
            tdots4<T, A>(qg, A(1), kvt + h * dh * ld, ld, dh, lo, hi, sg);
          else
            tdots4<T, A>(qg, scale, kvt + h * dh * ld, ld, dh, lo, hi, sg);
          tdots4<T, A>(dog, A(1), kvt + (d + h * dh) * ld, ld, dh, lo, hi, dsg);  // dp
          for (int64_t g = 0; g < G; ++g) {
            A* s = sg[g];
            A* ds = dsg[g];
            const A* vm = vmv.data() + g * Lw;
            const A lse_r = lse[rows[g] * H + h];
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
            A* pr = pall.data() + (h * La + nr + g) * ld;
            A* dsr = dsall.data() + (h * La + nr + g) * ld;
            for (int64_t j = 0; j < lo; ++j) pr[j] = dsr[j] = A(0);
            for (int64_t j0 = lo; j0 < hi; j0 += kW) {
#pragma omp simd
              for (int64_t j = j0; j < j0 + kW; ++j) {
                ds[j] = s[j] * (ds[j] - D);
                pr[j] = s[j];
                dsr[j] = ds[j];
              }
            }
            for (int64_t j = hi; j < ld; ++j) pr[j] = dsr[j] = A(0);
          }
          const A f[kG] = {scale, scale, scale, scale};
          weighted_rows4<T, A>(dsg, u, nu, kv + k0 * 2 * d + h * dh, 2 * d, dh, f, dqg, G);
        }
        for (int64_t g = 0; g < G; ++g) {
          // the row's own first and last visible key, not the group's whole blocks: dk and dv
          // then skip the rows that see none of a 4-key tile (a causal row sees ~half of its
          // block range)
          const int32_t* vis = visv.data() + g * Lb;
          rlov[nr + g] = static_cast<int32_t>(vis[0] - k0);
          rhiv[nr + g] = static_cast<int32_t>(vis[nvs[g] - 1] - k0 + 1);
          rcv[nr + g] = rcs[g];
        }
        nr += G;
      }
      for (int64_t h = 0; h < H; ++h) {
        T* dk = dkv + k0 * 2 * d + h * dh;
        for (int64_t r = 0; r < nr; ++r) xr[r] = q + rcv[r] * d + h * dh;
        key_grads<T, A>(dsall.data() + h * La * ld, ld, xr.data(), rlov.data(), rhiv.data(), nr,
                        nk, dh, dm.q_scaled ? A(1) : scale, dk, 2 * d);
        for (int64_t r = 0; r < nr; ++r) xr[r] = dout + rcv[r] * d + h * dh;
        key_grads<T, A>(pall.data() + h * La * ld, ld, xr.data(), rlov.data(), rhiv.data(), nr,
                        nk, dh, A(1), dk + d, 2 * d);
      }
    }
  }
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
                       at::Tensor& mean_t, at::Tensor& rstd_t, at::Tensor& cos_t, int64_t act,
                       double eps, const Dims& dm) {
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
  // (N) cos(x_a, x') when defined (then x' holds its bias already and xprime_fwd did not run):
  // formed here from the rows this pass loads anyway
  T* cos = cos_t.defined() ? cos_t.data_ptr<T>() : nullptr;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<A> z(d);
    A* zp = z.data();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < N; ++r) {
      const int64_t rc = dm.qpos ? dm.qpos[r] : r;  // row of xp and g (compact: active rows)
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
        T* gr = g + rc * d;
        const T* pr = xp + rc * d;
#pragma omp simd reduction(+ : sum, dt, na2, nb2)
        for (int64_t c = 0; c < d; ++c) {
          const A pre = static_cast<A>(static_cast<T>(static_cast<A>(gr[c]) + static_cast<A>(b2[c])));
          const T gv = static_cast<T>(A(1) / (A(1) + vexp<A>(-pre)));
          gr[c] = gv;
          const A a = ar[c], pv = pr[c];
          const A zc = a + static_cast<A>(gv) * pv;
          zp[c] = zc;
          sum += zc;
          dt += a * pv;
          na2 += a * a;
          nb2 += pv * pv;
        }
      } else {
        T* gr = g + rc * d;
        const T* pr = xp + rc * d;
        for (int64_t c = 0; c < d; ++c) {
          const A pre = static_cast<A>(static_cast<T>(static_cast<A>(gr[c]) + static_cast<A>(b2[c])));
          const T gv = static_cast<T>(std::tanh(pre));
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
                       const at::Tensor& mean_t, const at::Tensor& rstd_t, at::Tensor& dgp_t,
                       at::Tensor& db2_t, at::Tensor& dxp_t, at::Tensor& dxa_t, at::Tensor& dlnw_t,
                       at::Tensor& dlnb_t, at::Tensor& dxps_t, int64_t act, const Dims& dm) {
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
  // per-chunk partial sums of dy * zhat and dy (LayerNorm weight and bias gradients), of
  // dg_pre (b2's gradient) and, when asked for, of dxp (part of bo's gradient): summed here,
  // while each row is in registers, not in passes of their own
  const bool sum_dxp = dxps_t.defined();
  constexpr int64_t np = 4;
  std::vector<A> part(nchunks * np * d);
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<A> zh(d), dz(d);
    A* zhp = zh.data();
    A* dzp = dz.data();
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < nchunks; ++ch) {
      A* pg = part.data() + ch * np * d;
      A* pw = ln ? pg + d : nullptr;
      A* pb = ln ? pg + 2 * d : nullptr;
      A* px = pg + 3 * d;
      std::fill(pg, pg + np * d, A(0));
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
          const T dxc = static_cast<T>(dzc * gv + dc * (a * inv_den - cb * bv));
          dxpr[c] = dxc;
          px[c] += static_cast<A>(dxc);  // (summed whether asked for or not: no branch here)
          dxar[c] = static_cast<T>(dzc + dc * (bv * inv_den - ca * a));
        }
      }
    }
  }
  T* db2 = db2_t.data_ptr<T>();
  T* dlnw = ln ? dlnw_t.data_ptr<T>() : nullptr;
  T* dlnb = ln ? dlnb_t.data_ptr<T>() : nullptr;
  T* dxps = sum_dxp ? dxps_t.data_ptr<T>() : nullptr;
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
    if (sum_dxp) dxps[c] = static_cast<T>(sx);
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
  GCA_CPU_DISPATCH(q, "gca_attn_fwd_cpu", attn_fwd_tiles<scalar_t>(q, kv, kpm, am, o, lse, dm));
}
void xprime_fwd_cpu(at::Tensor& xp, const at::Tensor& bo, const at::Tensor& lse,
                    const at::Tensor& xa, at::Tensor& cos, const Dims& dm) {
  GCA_CPU_DISPATCH(xp, "gca_xprime_fwd_cpu", xprime_fwd_impl<scalar_t>(xp, bo, lse, xa, cos, dm));
}
void gate_out_fwd_cpu(const at::Tensor& xa, const at::Tensor& xp, at::Tensor& g,
                      const at::Tensor& b2, const at::Tensor& ln_w, const at::Tensor& ln_b,
                      at::Tensor& y, at::Tensor& mean, at::Tensor& rstd, at::Tensor& cos, int64_t act,
                      double eps, const Dims& dm) {
  GCA_CPU_DISPATCH(xa, "gca_gate_out_fwd_cpu",
                   gate_out_fwd_impl<scalar_t>(xa, xp, g, b2, ln_w, ln_b, y, mean, rstd, cos, act, eps, dm));
}
void gate_out_bwd_cpu(const at::Tensor& dy, const at::Tensor& dcos, const at::Tensor& xa,
                      const at::Tensor& xp, const at::Tensor& g, const at::Tensor& ln_w,
                      const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& dgp,
                      at::Tensor& db2, at::Tensor& dxp, at::Tensor& dxa, at::Tensor& dlnw,
                      at::Tensor& dlnb, at::Tensor& dxp_sum, int64_t act, const Dims& dm) {
  GCA_CPU_DISPATCH(xa, "gca_gate_out_bwd_cpu",
                   gate_out_bwd_impl<scalar_t>(dy, dcos, xa, xp, g, ln_w, mean, rstd, dgp, db2,
                                               dxp, dxa, dlnw, dlnb, dxp_sum, act, dm));
}
void attn_bwd_cpu(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& o,
                  const at::Tensor& dout, const at::Tensor& lse, const at::Tensor& kpm,
                  const at::Tensor& am, at::Tensor& dq, at::Tensor& dkv, const Dims& dm) {
  GCA_CPU_DISPATCH(q, "gca_attn_bwd_cpu",
                   attn_bwd_tiles<scalar_t>(q, kv, o, dout, lse, kpm, am, dq, dkv, dm));
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

const DeviceBackend kCpuBackend{
    "cpp", c10::DeviceType::CPU, {at::kFloat, at::kDouble},
    GCAKernels{attn_fwd_cpu, xprime_fwd_cpu, gate_out_fwd_cpu, gate_out_bwd_cpu, bias_relu_cpu,
               relu_bwd_sum_cpu, col_sum_cpu, attn_bwd_cpu}};

}  // namespace

std::vector<at::Tensor> gca_fwd_cpu(const at::Tensor& x_a, const at::Tensor& x_b,
                                    const TensorList& weights, const OptT& ln_w, const OptT& ln_b, const OptT& kpm, const OptT& am,
                                    int64_t n_heads, int64_t activation, double ln_eps) {
  return gca_forward_entry(kCpuBackend, x_a, x_b, weights, ln_w, ln_b, kpm, am, n_heads, activation, ln_eps);
}

std::vector<at::Tensor> gca_bwd_cpu(const at::Tensor& dy, const at::Tensor& dcos,
                                    const at::Tensor& x_a, const at::Tensor& x_b,
                                    const TensorList& weights, const OptT& ln_w, const OptT& ln_b, const OptT& kpm, const OptT& am,
                                    const std::vector<at::Tensor>& saved, int64_t n_heads,
                                    int64_t activation, double ln_eps) {
  return gca_backward_entry(kCpuBackend, dy, dcos, x_a, x_b, weights, ln_w, ln_b, kpm, am, saved, n_heads,
                            activation, ln_eps);
}

}  // namespace gca
