// CPU attention kernels of the fused GCA operator (float32, float64), OpenMP over batch rows.
//
// Per (batch, query row, head) the masked scores, their max, the exponentials, the row sum and
// p v are computed with the scores kept in per-thread buffers of Lb values: the (B, H, La, Lb)
// score/probability tensors the eager reference materialises never exist.
//
// One task per batch row, whose keys (and values) are transposed once; its query rows go four
// at a time (each loaded key vector feeds four FMAs), each row over the keys it sees (causal
// masks and left padding hide most of Lb), in whole 16-key blocks summed in registers. The
// backward keeps the batch row's p and ds and forms dk, dv as register-tiled products over its
// query rows. Every output element is written by one thread and k/v gradients accumulate in a
// fixed order: results are bit-identical run to run, whatever the number of threads.
//
// The OpenMP regions read and write raw pointers only and call nothing in ATen, so the workers'
// thread-local state (grad mode, dispatch keys), which is not the caller's, never matters.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <cmath>
#include <limits>
#include <vector>

#include "attention_tiles_cpu.h"
#include "cpu_kernels.h"

namespace gca {
namespace {

using namespace cpu_attention;

template <typename T>
GCA_CPU_CLONES void attn_fwd_tiles(const at::Tensor& q_t, const at::Tensor& kv_t, const at::Tensor& kpm_t,
                   const at::Tensor& am_t, at::Tensor& o_t, at::Tensor& lse_t, const RowLayout& lay) {
  using A = at::opmath_type<T>;
  const int64_t La = lay.La, Lb = lay.Lb, d = lay.d, H = lay.H, dh = d / H;
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
    std::vector<int32_t> visv(kQueryGroup * Lb), uv(Lw);
    std::vector<A> sv(kQueryGroup * Lw, A(0)), vmv(kQueryGroup * Lw), ktv(d * Lw);
    A* kt = ktv.data();
    int32_t* u = uv.data();
    A* const sg[kQueryGroup] = {sv.data(), sv.data() + Lw, sv.data() + 2 * Lw, sv.data() + 3 * Lw};
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < lay.B; ++b) {
      int64_t k0, nk, r0, nq;
      key_block(lay, b, k0, nk);
      query_block(lay, b, r0, nq);
      prefetch_span(kv + k0 * 2 * d, nk * 2 * d);
      prefetch_span(q + r0 * d, nq * d);
      const int64_t ld = round_up(nk);
      bool transposed = false;
      const bool* kpm_b = kpm ? kpm + b * Lb : nullptr;
      int64_t rows[kQueryGroup], rcs[kQueryGroup], nvs[kQueryGroup];
      const auto keyless = [&](int64_t r, int64_t rc) {  // o = 0, lse = +inf marks the row
        for (int64_t c = 0; c < d; ++c) o[rc * d + c] = T(0);
        for (int64_t h = 0; h < H; ++h) lse[r * H + h] = std::numeric_limits<A>::infinity();
      };
      int64_t i = 0;
      while (i < La) {
        const int64_t G = next_query_group(lay, b, i, kpm_b, am, am_shared, visv.data(), rows,
                                           rcs, nvs, keyless);
        if (G == 0) continue;
        if (!transposed) {
          transpose_block<T, A>(kv + k0 * 2 * d, nk, 2 * d, d, ld, kt);
          transposed = true;
        }
        int64_t lo, hi;
        const int64_t nu = group_keys<A>(visv.data(), Lb, nvs, G, k0, vmv.data(), Lw, u, lo, hi);
        for (int64_t h = 0; h < H; ++h) {
          const T* xg[kQueryGroup];
          T* og[kQueryGroup];
          for (int64_t g = 0; g < kQueryGroup; ++g) {
            xg[g] = q + rcs[g] * d + h * dh;
            og[g] = o + rcs[g] * d + h * dh;
          }
          if (lay.q_prescaled)  // a literal 1: the compiler drops the multiply
            tdots4<T, A>(xg, A(1), kt + h * dh * ld, ld, dh, lo, hi, sg);
          else
            tdots4<T, A>(xg, scale, kt + h * dh * ld, ld, dh, lo, hi, sg);
          A f[kQueryGroup] = {A(0), A(0), A(0), A(0)};
          for (int64_t g = 0; g < G; ++g) {
            A* s = sg[g];
            const A* vm = vmv.data() + g * Lw;
            A mx = ninf;
            for (int64_t j = lo; j < hi; ++j) mx = (vm[j] != A(0) && s[j] > mx) ? s[j] : mx;
            A l = 0;
            for (int64_t j0 = lo; j0 < hi; j0 += kKeyBlock) {
#pragma omp simd reduction(+ : l)
              for (int64_t j = j0; j < j0 + kKeyBlock; ++j) {
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
                   const at::Tensor& am_t, at::Tensor& dq_t, at::Tensor& dkv_t, const RowLayout& lay) {
  using A = at::opmath_type<T>;
  const int64_t La = lay.La, Lb = lay.Lb, d = lay.d, H = lay.H, dh = d / H;
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
    std::vector<int32_t> visv(kQueryGroup * Lb), uv(Lw), rlov(La), rhiv(La);
    std::vector<int64_t> rcv(La);
    std::vector<A> sv(kQueryGroup * Lw, A(0)), dsv(kQueryGroup * Lw, A(0)), vmv(kQueryGroup * Lw), kvtv(2 * d * Lw);
    std::vector<A> pall(H * La * Lw), dsall(H * La * Lw);  // per head: (rows, ld)
    std::vector<const T*> xr(La);
    A* kvt = kvtv.data();  // (2d, ld): k^T then v^T
    int32_t* u = uv.data();
    A* const sg[kQueryGroup] = {sv.data(), sv.data() + Lw, sv.data() + 2 * Lw, sv.data() + 3 * Lw};
    A* const dsg[kQueryGroup] = {dsv.data(), dsv.data() + Lw, dsv.data() + 2 * Lw, dsv.data() + 3 * Lw};
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < lay.B; ++b) {
      int64_t k0, nk;
      key_block(lay, b, k0, nk);
      if (nk == 0) {  // no stored key: only keyless query rows (dq = 0)
        for (int64_t i = 0; i < La; ++i) {
          const int64_t r = b * La + i;
          const int64_t rc = lay.qpos ? lay.qpos[r] : r;
          if (rc >= 0) for (int64_t c = 0; c < d; ++c) dq[rc * d + c] = T(0);
        }
        continue;
      }
      int64_t r0, nq;
      query_block(lay, b, r0, nq);
      prefetch_span(kv + k0 * 2 * d, nk * 2 * d);
      prefetch_span(q + r0 * d, nq * d);
      prefetch_span(dout + r0 * d, nq * d);
      const int64_t ld = round_up(nk);
      transpose_block<T, A>(kv + k0 * 2 * d, nk, 2 * d, 2 * d, ld, kvt);
      const bool* kpm_b = kpm ? kpm + b * Lb : nullptr;
      int64_t rows[kQueryGroup], rcs[kQueryGroup], nvs[kQueryGroup];
      // no visible key (the forward's lse is +inf there): p = 0, nothing flows
      const auto keyless = [&](int64_t, int64_t rc) {
        for (int64_t c = 0; c < d; ++c) dq[rc * d + c] = T(0);
      };
      int64_t nr = 0;  // query rows of b with a visible key so far
      int64_t i = 0;
      while (i < La) {
        const int64_t G = next_query_group(lay, b, i, kpm_b, am, am_shared, visv.data(), rows,
                                           rcs, nvs, keyless);
        if (G == 0) continue;
        int64_t lo, hi;
        const int64_t nu = group_keys<A>(visv.data(), Lb, nvs, G, k0, vmv.data(), Lw, u, lo, hi);
        for (int64_t h = 0; h < H; ++h) {
          const T* qg[kQueryGroup];
          const T* dog[kQueryGroup];
          T* dqg[kQueryGroup];
          for (int64_t g = 0; g < kQueryGroup; ++g) {  // rows past G repeat the first (results unused)
            qg[g] = q + rcs[g] * d + h * dh;
            dog[g] = dout + rcs[g] * d + h * dh;
            dqg[g] = dq + rcs[g] * d + h * dh;
          }
          if (lay.q_prescaled)  // bit for bit the forward's scores
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
            for (int64_t j0 = lo; j0 < hi; j0 += kKeyBlock) {
#pragma omp simd reduction(+ : D)
              for (int64_t j = j0; j < j0 + kKeyBlock; ++j) {
                const A p = vm[j] != A(0) ? vexp<A>(s[j] - lse_r) : A(0);
                s[j] = p;
                D += p * ds[j];
              }
            }
            A* pr = pall.data() + (h * La + nr + g) * ld;
            A* dsr = dsall.data() + (h * La + nr + g) * ld;
            for (int64_t j = 0; j < lo; ++j) pr[j] = dsr[j] = A(0);
            for (int64_t j0 = lo; j0 < hi; j0 += kKeyBlock) {
#pragma omp simd
              for (int64_t j = j0; j < j0 + kKeyBlock; ++j) {
                ds[j] = s[j] * (ds[j] - D);
                pr[j] = s[j];
                dsr[j] = ds[j];
              }
            }
            for (int64_t j = hi; j < ld; ++j) pr[j] = dsr[j] = A(0);
          }
          const A f[kQueryGroup] = {scale, scale, scale, scale};
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
                        nk, dh, lay.q_prescaled ? A(1) : scale, dk, 2 * d);
        for (int64_t r = 0; r < nr; ++r) xr[r] = dout + rcv[r] * d + h * dh;
        key_grads<T, A>(pall.data() + h * La * ld, ld, xr.data(), rlov.data(), rhiv.data(), nr,
                        nk, dh, A(1), dk + d, 2 * d);
      }
    }
  }
}

}  // namespace

#define GCA_CPU_DISPATCH(t, name, ...) \
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), name, [&] { __VA_ARGS__; })

void attn_fwd_cpu(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& kpm,
                  const at::Tensor& am, at::Tensor& o, at::Tensor& lse, const RowLayout& lay) {
  GCA_CPU_DISPATCH(q, "gca_attn_fwd_cpu", attn_fwd_tiles<scalar_t>(q, kv, kpm, am, o, lse, lay));
}

void attn_bwd_cpu(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& o,
                  const at::Tensor& dout, const at::Tensor& lse, const at::Tensor& kpm,
                  const at::Tensor& am, at::Tensor& dq, at::Tensor& dkv, const RowLayout& lay) {
  GCA_CPU_DISPATCH(q, "gca_attn_bwd_cpu",
                   attn_bwd_tiles<scalar_t>(q, kv, o, dout, lse, kpm, am, dq, dkv, lay));
}

}  // namespace gca
