// Row compaction (see row_compaction.h): the active row sets and the row copies.
#include "row_compaction.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <cstring>
#include <limits>

#include "cpu_memory.h"

namespace gca {
namespace {

// Above this active fraction the gathers and scatters cost more than the rows they save; below
// this many rows the extra op dispatches do.
constexpr double kCompactMaxFraction = 0.9;
constexpr int64_t kCompactMinRows = 128;

Rows make_rows(const std::vector<uint8_t>& active, int64_t total) {
  int64_t n = 0;
  for (int64_t r = 0; r < total; ++r) n += active[r];
  if (total < kCompactMinRows ||
      static_cast<double>(n) > kCompactMaxFraction * static_cast<double>(total))
    return Rows{at::Tensor(), total, total, {}, n == total};
  TORCH_CHECK(total < std::numeric_limits<int32_t>::max(), "gca: ", total,
              " rows exceed the int32 row maps of the compact path");
  at::Tensor idx = at::empty({n}, at::TensorOptions().dtype(at::kLong));
  int64_t* ip = idx.data_ptr<int64_t>();
  std::vector<int32_t> pos(total, -1);
  for (int64_t r = 0, c = 0; r < total; ++r)
    if (active[r]) {
      pos[r] = static_cast<int32_t>(c);
      ip[c++] = r;
    }
  return Rows{idx, n, total, std::move(pos)};
}

}  // namespace

// Key rows (b, j) not padded. Padded keys are never read by the attention kernels and get
// exactly zero gradient, so their k/v products are skipped.
Rows active_key_rows(c10::DeviceType dev, const at::Tensor& kpm, const RowLayout& lay) {
  const int64_t M = lay.B * lay.Lb;
  if (dev != c10::DeviceType::CPU || !kpm.defined()) return Rows{at::Tensor(), M, M};
  const bool* p = kpm.data_ptr<bool>();
  std::vector<uint8_t> active(M);
  for (int64_t r = 0; r < M; ++r) active[r] = !p[r];
  return make_rows(active, M);
}

// Query rows (b, i) that see at least one key (the rows where the attention kernels leave
// lse finite). Every other row has x' = 0 exactly: its q, o, x' and gate products, and their
// gradients, contribute nothing, so they are skipped.
Rows active_query_rows(c10::DeviceType dev, const at::Tensor& kpm, const at::Tensor& am,
                       const RowLayout& lay) {
  const int64_t N = lay.B * lay.La, La = lay.La, Lb = lay.Lb;
  if (dev != c10::DeviceType::CPU) return Rows{at::Tensor(), N, N};
  if (!kpm.defined() && !am.defined()) return Rows{at::Tensor(), N, N, {}, true};  // Lb >= 1 keys each
  RECORD_FUNCTION("gca::active_query_rows", std::vector<c10::IValue>());
  const bool* kp = kpm.defined() ? kpm.data_ptr<bool>() : nullptr;
  const bool* ap = am.defined() ? am.data_ptr<bool>() : nullptr;
  const bool am_shared = am.defined() && am.size(0) == 1;
  std::vector<uint8_t> active(N);
  at::parallel_for(0, lay.B, 1, [&](int64_t b0, int64_t b1) {  // raw memory, no ATen call
    std::vector<int64_t> keys(Lb);  // unpadded key positions of batch row b
    for (int64_t b = b0; b < b1; ++b) {
      int64_t nk = 0;
      for (int64_t j = 0; j < Lb; ++j)
        if (!(kp && kp[b * Lb + j])) keys[nk++] = j;
      for (int64_t i = 0; i < La; ++i) {
        bool any = false;
        if (!ap) {
          any = nk > 0;
        } else {
          const bool* row = ap + ((am_shared ? 0 : b) * La + i) * Lb;
          for (int64_t k = 0; k < nk && !any; ++k) any = !row[keys[k]];
        }
        active[b * La + i] = any;
      }
    }
  });
  return make_rows(active, N);
}

// The attention kernels' view of the compact rows: q, o (and dout, dq) hold qr's rows, kv (and
// dkv) kr's rows; on the CPU q comes scaled (RowLayout::q_prescaled).
RowLayout stored_layout(RowLayout lay, c10::DeviceType dev, const Rows& qr, const Rows& kr) {
  lay.q_prescaled = dev == c10::DeviceType::CPU;
  if (qr.compact()) {
    lay.qrow = qr.idx.data_ptr<int64_t>();
    lay.nq = qr.n;
    lay.qpos = qr.pos.data();
  }
  if (kr.compact()) lay.kpos = kr.pos.data();
  return lay;
}

}  // namespace gca
