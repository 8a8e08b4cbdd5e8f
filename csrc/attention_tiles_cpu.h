// Building blocks of the CPU attention kernels (attention_cpu.cpp): visible-key lists, row
// blocks of a batch row, the in-register transpose of a key block, and the four-query-row
// register tiles of the score, p v, dq and dk/dv products.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu_math.h"
#include "gca_core.h"

namespace gca {
namespace cpu_attention {


// Positions of the keys a query row sees, ascending: written once per row, so the score loops
// run over visible keys only (with causal masks and left padding, often a small part of Lb).
// Eight mask bytes at a time (bool bytes are 0 or 1): under such masks a word is nearly always
// all blocked or all visible, so whole words are skipped.
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

// Turns key positions j of batch row b into rows of kv (compact rows when lay.kpos is set).
inline void key_rows(const RowLayout& lay, int64_t b, int64_t nv, int32_t* vis) {
  const int64_t base = b * lay.Lb;
  if (lay.kpos) {
    for (int64_t k = 0; k < nv; ++k) vis[k] = lay.kpos[base + vis[k]];
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
inline void key_block(const RowLayout& lay, int64_t b, int64_t& k0, int64_t& nk) {
  stored_block(lay.kpos, b, lay.Lb, k0, nk);
}
inline void query_block(const RowLayout& lay, int64_t b, int64_t& r0, int64_t& nr) {
  stored_block(lay.qpos, b, lay.La, r0, nr);
}

// Asks for a contiguous span of memory ahead of its use (every 64-byte line). A batch row's keys
// are first read by the transpose, 16 rows 2d apart at a time, and its query rows by the tiles:
// fetched on demand, each line would be a separate miss.
template <typename T>
inline void prefetch_span(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o);
}

// Key loops run over whole blocks of kKeyBlock keys: with a few dozen keys per row, the remainder of
// a runtime-length vector loop (scalar, up to 15 iterations) cost as much as its vector part.
// Block columns past a row's last visible key, or before its first, carry vm = 0 (p = 0).
constexpr int64_t kKeyBlock = 16;
inline int64_t round_up(int64_t n) { return (n + kKeyBlock - 1) / kKeyBlock * kKeyBlock; }
// Query rows per group in the attention kernels (the register tiles are written for four).
constexpr int64_t kQueryGroup = 4;


// 16 x 16 float block transposed in registers: four rounds of zips (row 2i, 2i+1 <- the
// interleaved halves of rows i and i + 8) take row r to column r. GCC lowers each zip to one
// two-source permute (vpermt2ps) in the AVX-512 clone.
typedef float V16f __attribute__((vector_size(64)));
typedef int32_t V16i __attribute__((vector_size(64)));

GCA_ALWAYS_INLINE void transpose16(V16f* r) {
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
// kKeyBlock): the block's keys (and values) transposed, so that scores are loops along the keys
// (vectorised, no horizontal sums; with dh = 32 a dot product per key spent most of its time
// reducing its vector). float: 16 x 16 tiles through registers, so neither reads nor writes
// stride element by element; the columns past the last whole tile, and double, go element by
// element.
template <typename T, typename A>
GCA_ALWAYS_INLINE void transpose_block(const T* rows, int64_t nk, int64_t rs, int64_t n, int64_t ld,
                                     A* t) {
  int64_t c0 = 0;
  if constexpr (std::is_same_v<T, float> && std::is_same_v<A, float>) {
    const int64_t nc = n / 16 * 16;
    // 16 rows at a time, each read along its length (16 sequential streams for the prefetcher)
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
  // row by row of t: its writes are contiguous and only the reads stride
  for (int64_t c = c0; c < n; ++c) {
    A* tc = t + c * ld;
    for (int64_t j = 0; j < nk; ++j) tc[j] = static_cast<A>(rows[j * rs + c]);
    for (int64_t j = nk; j < ld; ++j) tc[j] = A(0);
  }
}

// One kKeyBlock-key block of scores in registers (GCC vector extension: one zmm, two ymm or four xmm,
// whichever clone runs).
template <typename A>
struct KBlock {
  typedef A V __attribute__((vector_size(kKeyBlock * sizeof(A))));
};

// The attention kernels take a batch row's query rows kQueryGroup at a time. Collects the next group
// (from query position i on, advanced past it): each stored row with a visible key gets its
// full row index r, its compact row rc (of q, o, dout, dq), its visible keys as rows of kv and
// their count; rows with none go to keyless(r, rc) on the way. Slots past the group's size G
// repeat its first row (the four-row tiles compute them; their results are not used). Returns G
// (0 when b has no such row left).
template <typename F>
inline int64_t next_query_group(const RowLayout& lay, int64_t b, int64_t& i, const bool* kpm_b,
                                const bool* am, bool am_shared, int32_t* visv, int64_t* rows,
                                int64_t* rcs, int64_t* nvs, F&& keyless) {
  const int64_t La = lay.La, Lb = lay.Lb;
  int64_t G = 0;
  for (; i < La && G < kQueryGroup; ++i) {
    const int64_t r = b * La + i;
    const int64_t rc = lay.qpos ? lay.qpos[r] : r;
    if (rc < 0) continue;  // not stored: no visible key
    const bool* am_row = am ? am + ((am_shared ? 0 : b) * La + i) * Lb : nullptr;
    int32_t* vis = visv + G * Lb;
    const int64_t nv = visible_keys(kpm_b, am_row, Lb, vis);
    if (nv == 0) {
      keyless(r, rc);
      continue;
    }
    key_rows(lay, b, nv, vis);  // now rows of kv (and dkv): this task's key block
    rows[G] = r;
    rcs[G] = rc;
    nvs[G++] = nv;
  }
  for (int64_t g = G; G > 0 && g < kQueryGroup; ++g) {
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
// small products over all of the batch row's query rows with the sums held in registers (a
// kernel per query row would load two values per FMA and stream the key block once per row).
// always_inline (GCA_ALWAYS_INLINE): the callers are target_clones, which GCC does not inline
// plain functions into.

// s_g[j] = sum_c (x_g[c] a) t[c * ld + j] for the four rows g, j in [lo, hi) (multiples of kKeyBlock):
// a 4-row x 2-block tile of sums in registers, one chain per (row, key) in c order, so a row's
// scores do not depend on which group it falls in (forward and backward recompute them bit for
// bit, as lse requires).
template <typename T, typename A>
GCA_ALWAYS_INLINE void tdots4(const T* const* x, A a, const A* t, int64_t ld, int64_t n, int64_t lo,
                            int64_t hi, A* const* s) {
  using V = typename KBlock<A>::V;
  const T *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
  int64_t j0 = lo;
  for (; j0 + 2 * kKeyBlock <= hi; j0 += 2 * kKeyBlock) {
    V a00 = {}, a01 = {}, a10 = {}, a11 = {}, a20 = {}, a21 = {}, a30 = {}, a31 = {};
    const A* tj = t + j0;
    for (int64_t c = 0; c < n; ++c) {
      V t0, t1;
      std::memcpy(&t0, tj + c * ld, sizeof(V));
      std::memcpy(&t1, tj + c * ld + kKeyBlock, sizeof(V));
      const A y0 = static_cast<A>(x0[c]) * a, y1 = static_cast<A>(x1[c]) * a;
      const A y2 = static_cast<A>(x2[c]) * a, y3 = static_cast<A>(x3[c]) * a;
      a00 += y0 * t0; a01 += y0 * t1;
      a10 += y1 * t0; a11 += y1 * t1;
      a20 += y2 * t0; a21 += y2 * t1;
      a30 += y3 * t0; a31 += y3 * t1;
    }
    std::memcpy(s[0] + j0, &a00, sizeof(V)); std::memcpy(s[0] + j0 + kKeyBlock, &a01, sizeof(V));
    std::memcpy(s[1] + j0, &a10, sizeof(V)); std::memcpy(s[1] + j0 + kKeyBlock, &a11, sizeof(V));
    std::memcpy(s[2] + j0, &a20, sizeof(V)); std::memcpy(s[2] + j0 + kKeyBlock, &a21, sizeof(V));
    std::memcpy(s[3] + j0, &a30, sizeof(V)); std::memcpy(s[3] + j0 + kKeyBlock, &a31, sizeof(V));
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
// weight of exactly 0 where a row does not). Two kKeyBlock-column chunks of four rows (8 sums) stay in
// registers over the keys: each chunk of a key row is loaded once for the four rows.
template <typename T, typename A>
GCA_ALWAYS_INLINE void weighted_rows4(const A* const* w, const int32_t* u, int64_t nu, const T* rows,
                                    int64_t stride, int64_t n, const A* f, T* const* out, int64_t G) {
  using V = typename KBlock<A>::V;
  const A *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
  int64_t c0 = 0;
  if constexpr (std::is_same_v<T, A>) {
    for (; c0 + 2 * kKeyBlock <= n; c0 += 2 * kKeyBlock) {
      V a00 = {}, a01 = {}, a10 = {}, a11 = {}, a20 = {}, a21 = {}, a30 = {}, a31 = {};
      for (int64_t k = 0; k < nu; ++k) {
        const int64_t j = u[k];
        const T* r = rows + j * stride + c0;
        V r0, r1;
        std::memcpy(&r0, r, sizeof(V));
        std::memcpy(&r1, r + kKeyBlock, sizeof(V));
        a00 += w0[j] * r0; a01 += w0[j] * r1;
        a10 += w1[j] * r0; a11 += w1[j] * r1;
        a20 += w2[j] * r0; a21 += w2[j] * r1;
        a30 += w3[j] * r0; a31 += w3[j] * r1;
      }
      const V acc[8] = {a00, a01, a10, a11, a20, a21, a30, a31};
      for (int64_t g = 0; g < G; ++g) {
        const V o0 = acc[2 * g] * f[g], o1 = acc[2 * g + 1] * f[g];
        std::memcpy(out[g] + c0, &o0, sizeof(V));
        std::memcpy(out[g] + c0 + kKeyBlock, &o1, sizeof(V));
      }
    }
    for (; c0 + kKeyBlock <= n; c0 += kKeyBlock) {
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
  for (int64_t c = c0; c < n; ++c) {  // head widths that are not a multiple of kKeyBlock
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
// its nr query rows. A tile of four keys x two kKeyBlock-column chunks is summed in registers over the
// rows whose key range [rlo, rhi) (first to last visible key) meets it (with a causal mask,
// about half of them); W is 0 outside each row's visible keys, so the sums are exact over the
// visible pairs, and skipping a row adds nothing it would have added. Every key row
// of the block is written (0 where no row sees the key).
template <typename T, typename A>
GCA_ALWAYS_INLINE void key_grads(const A* W, int64_t ld, const T* const* x, const int32_t* rlo,
                               const int32_t* rhi, int64_t nr, int64_t nk, int64_t n, A f, T* out,
                               int64_t os) {
  using V = typename KBlock<A>::V;
  for (int64_t j0 = 0; j0 < nk; j0 += 4) {
    const int64_t nj = std::min<int64_t>(4, nk - j0);  // W is 0 past nk (up to ld)
    int64_t c0 = 0;
    if constexpr (std::is_same_v<T, A>) {
      for (; c0 + 2 * kKeyBlock <= n; c0 += 2 * kKeyBlock) {
        V a00 = {}, a01 = {}, a10 = {}, a11 = {}, a20 = {}, a21 = {}, a30 = {}, a31 = {};
        for (int64_t r = 0; r < nr; ++r) {
          if (rhi[r] <= j0 || rlo[r] >= j0 + 4) continue;
          const A* wr = W + r * ld + j0;
          V x0, x1;
          std::memcpy(&x0, x[r] + c0, sizeof(V));
          std::memcpy(&x1, x[r] + c0 + kKeyBlock, sizeof(V));
          a00 += wr[0] * x0; a01 += wr[0] * x1;
          a10 += wr[1] * x0; a11 += wr[1] * x1;
          a20 += wr[2] * x0; a21 += wr[2] * x1;
          a30 += wr[3] * x0; a31 += wr[3] * x1;
        }
        const V acc[8] = {a00, a01, a10, a11, a20, a21, a30, a31};
        for (int64_t jj = 0; jj < nj; ++jj) {
          const V o0 = acc[2 * jj] * f, o1 = acc[2 * jj + 1] * f;
          std::memcpy(out + (j0 + jj) * os + c0, &o0, sizeof(V));
          std::memcpy(out + (j0 + jj) * os + c0 + kKeyBlock, &o1, sizeof(V));
        }
      }
      for (; c0 + kKeyBlock <= n; c0 += kKeyBlock) {
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
// [lo, hi) the kKeyBlock blocks spanning them all, vm_g over it for g < G (1 where row g sees the key,
// 0 for the other columns), u the keys some row of the group sees, ascending; returns their
// number.
template <typename A>
GCA_ALWAYS_INLINE int64_t group_keys(const int32_t* visv, int64_t Lb, const int64_t* nvs, int64_t G,
                                   int64_t k0, A* vmv, int64_t Lw, int32_t* u, int64_t& lo,
                                   int64_t& hi) {
  lo = Lw;
  hi = 0;
  for (int64_t g = 0; g < G; ++g) {
    const int32_t* vis = visv + g * Lb;
    lo = std::min<int64_t>(lo, (vis[0] - k0) / kKeyBlock * kKeyBlock);
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


}  // namespace cpu_attention
}  // namespace gca
