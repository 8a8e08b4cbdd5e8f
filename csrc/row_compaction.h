// Row compaction (CPU; the varlen idea of FlashAttention). Real batches are left-padded
// histories under a causal cross mask: about half the key rows are padding, and about half the
// query rows see no key at all. Neither contributes anything: a padded key is never attended to
// (its k, v and gradients are exactly zero), and a keyless query row has x' = 0 exactly, so its
// q, o, x' and gate (z = x_a + g * x' = x_a whatever g is) never reach y, and dg = dz * x' * act'
// = 0 sends nothing back through them. The products then run on the active rows only: the
// inputs are gathered (x_a, x_b rows) and dx_b scattered; q, o, x', h, g (and in the backward
// d(o), dq, dg, dx') exist on the active rows alone, and k, v, dk, dv on the unpadded keys; the
// row kernels reach them through the row maps of RowLayout. The row sets come from the masks,
// recomputed identically in the backward. Above 90% active rows, or under 128 rows, the dense
// path runs (the gathers would cost more than they save). Gathers and scatters are plain row
// copies and every output row is written once, so results stay bit-identical run to run. The
// CUDA path is dense (the maps stay null).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_memory.h"
#include "gca_core.h"

namespace gca {

// Rows of a (rows, cols) operand that take part in the products. idx undefined = every row
// (the dense path: gather and scatter are the identity).
struct Rows {
  at::Tensor idx;            // int64 (n), ascending
  int64_t n;                 // number of active rows
  int64_t total;             // number of rows of the full tensor
  std::vector<int32_t> pos;  // compact: full row -> its row in idx, -1 when inactive
  // dense path with every row active (query rows: each sees a key), so the row passes need
  // not zero or skip any row: what the compact path does on its stored rows holds for all
  bool all_active = false;

  bool compact() const { return idx.defined(); }
  // Every stored row sees a key (compact: only such rows are stored; dense: all_active).
  bool stored_rows_see_keys() const { return compact() || all_active; }

  // The same rows in a tensor of their own (kept past the call).
  at::Tensor gather_kept(const at::Tensor& t) const {
    if (!compact()) return t;
    return gather_into(t, recycled_empty({n, t.size(1)}, t.options()));
  }

  // Row copies in one parallel pass (t contiguous, on the CPU).
  at::Tensor gather_into(const at::Tensor& t, at::Tensor out) const {
    RECORD_FUNCTION("gca::gather_rows", std::vector<c10::IValue>());
    const int64_t row = t.size(1) * t.element_size();
    const char* src = static_cast<const char*>(t.data_ptr());
    char* dst = static_cast<char*>(out.data_ptr());
    const int64_t* ip = idx.data_ptr<int64_t>();
    at::parallel_for(0, n, 64, [&](int64_t c0, int64_t c1) {  // raw copies, no ATen call
      for (int64_t c = c0; c < c1; ++c) std::memcpy(dst + c * row, src + ip[c] * row, row);
    });
    return out;
  }

  // The full (total, cols) tensor with c's rows at idx and zeros elsewhere.
  at::Tensor scatter(const at::Tensor& c) const {
    if (!compact()) return c;
    at::Tensor out = recycled_empty({total, c.size(1)}, c.options());
    scatter_into(c, out);
    return out;
  }

  // out (total, cols) = c's rows at idx, zeros elsewhere: every row written once (zero-filling
  // first and copying after would write the active rows twice).
  void scatter_into(const at::Tensor& c, at::Tensor& out) const {
    RECORD_FUNCTION("gca::scatter_rows", std::vector<c10::IValue>());
    const int64_t row = c.size(1) * c.element_size();
    const char* src = static_cast<const char*>(c.data_ptr());
    char* dst = static_cast<char*>(out.data_ptr());
    const int64_t* ip = idx.data_ptr<int64_t>();
    // compact rows [c0, c1) land in full rows [ip[c0], ip[c1]); the gaps are the inactive rows
    at::parallel_for(0, n + 1, 64, [&](int64_t c0, int64_t c1) {  // raw copies, no ATen call
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t gap_begin = c == 0 ? 0 : ip[c - 1] + 1, gap_end = c == n ? total : ip[c];
        if (gap_end > gap_begin) std::memset(dst + gap_begin * row, 0, (gap_end - gap_begin) * row);
        if (c < n) std::memcpy(dst + ip[c] * row, src + c * row, row);
      }
    });
  }

  // out's rows at idx += c's rows (CPU; each row written by one thread; a plain row loop, where
  // index_add_ costs several times the memory traffic).
  void add_into(const at::Tensor& c, at::Tensor& out) const {
    RECORD_FUNCTION("gca::add_rows", std::vector<c10::IValue>());
    const int64_t cols = c.size(1);
    const int64_t* ip = idx.data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "gca_add_rows", [&] {
      const scalar_t* src = c.data_ptr<scalar_t>();
      scalar_t* dst = out.data_ptr<scalar_t>();
      at::parallel_for(0, n, 64, [&](int64_t c0, int64_t c1) {  // raw memory, no ATen call
        for (int64_t r = c0; r < c1; ++r) {
          scalar_t* o = dst + ip[r] * cols;
          const scalar_t* a = src + r * cols;
          for (int64_t k = 0; k < cols; ++k) o[k] += a[k];
        }
      });
    });
  }
};

// The query rows (b, i) that see at least one key (where the attention kernels leave lse
// finite), and the key rows (b, j) not padded; dense (every row) off the CPU.
Rows active_query_rows(c10::DeviceType dev, const at::Tensor& kpm, const at::Tensor& am,
                       const RowLayout& lay);
Rows active_key_rows(c10::DeviceType dev, const at::Tensor& kpm, const RowLayout& lay);

// The kernels' view of the compact rows: q, o (and dout, dq) hold qr's rows, kv (and dkv) kr's
// rows; on the CPU q comes pre-scaled (RowLayout::q_prescaled).
RowLayout stored_layout(RowLayout lay, c10::DeviceType dev, const Rows& qr, const Rows& kr);

}  // namespace gca
