// Orchestration of the fused GCA forward and backward (see gca_core.h): argument checks,
// the matrix products through ATen, and the calls to the device's fused row kernels.
//
// Forward products: q = x_a Wq^T; [k | v] = x_b [Wk; Wv]^T in ONE product; o Wo^T; the gate's
// first layer as x_a W1a^T + x' W1b^T accumulated into one buffer (the concatenation
// [x_a ; x'] never exists); h W2^T. The (B, H, La, Lb) scores and probabilities are never
// stored: the backward recomputes them from q, k and the per-row logsumexp.
//
// Row compaction (CPU; the varlen idea of FlashAttention). Real batches are left-padded
// histories under a causal cross mask: about half the key rows are padding, and about half the
// query rows see no key at all. Neither contributes anything: a padded key is never attended
// to (its k, v and gradients are exactly zero), and a keyless query row has x' = 0 exactly, so
// its q, o, x' and gate (z = x_a + g * x' = x_a whatever g is) never reach y, and dg = dz * x'
// * act' = 0 sends nothing back through them. The eager reference must still compute every row
// of every product; here the products run on the active rows only, which halves the matrix
// work on such batches. Only the inputs are gathered (x_a, x_b rows) and dx_b scattered: q, o,
// x', h, g (and in the backward d(o), dq, dg, dx') exist on the active rows alone, packed at
// the top of the saved (N, .) tensors (zeros below), and k, v, dk, dv on the unpadded keys; the
// row kernels reach them through the row maps in Dims (qrow/qpos/kpos). The row sets come from
// the masks (active_query_rows / active_key_rows), recomputed identically in the backward.
// Above 90% active rows, or under 128 rows, the dense path runs (gathers would cost more than
// they save). Gathers and scatters are plain row copies and every output row is written once,
// so results stay bit-identical run to run. The CUDA path is dense (the maps stay null).
#include "gca_core.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <c10/core/CPUAllocator.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

namespace gca {
namespace {

std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + (t.dim() == 1 ? ",)" : ")");
}

std::string dtypes_str(const std::vector<at::ScalarType>& dts) {
  std::string s;
  for (size_t i = 0; i < dts.size(); ++i) s += (i ? "/" : "") + std::string(c10::toString(dts[i]));
  return s;
}

void check_tensor(const char* fn, const char* name, const at::Tensor& t, c10::DeviceType dev,
                  at::ScalarType dtype, std::vector<int64_t> shape) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " is undefined");
  TORCH_CHECK(t.device().type() == dev, fn, ": ", name, " must be a ", c10::DeviceTypeName(dev),
              " tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, fn, ": ", name, " has dtype ", t.scalar_type(),
              " but x_a has dtype ", dtype, "; every tensor must share one dtype");
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), fn, ": ", name, " must have shape ",
              c10::IntArrayRef(shape), ", got ", shape_str(t));
  TORCH_CHECK(t.is_contiguous(), fn, ": ", name, " of shape ", shape_str(t),
              " must be contiguous (call .contiguous() first)");
}

void check_mask(const char* fn, const char* name, const at::Tensor& m, const at::Tensor& x_a) {
  TORCH_CHECK(m.scalar_type() == at::kBool, fn, ": ", name, " must be a bool tensor, got ",
              m.scalar_type());
  TORCH_CHECK(m.device() == x_a.device(), fn, ": ", name, " is on ", m.device(),
              " but x_a is on ", x_a.device());
  TORCH_CHECK(m.is_contiguous(), fn, ": ", name, " of shape ", shape_str(m), " must be contiguous");
}

at::Tensor opt(const OptT& t) { return t.has_value() ? *t : at::Tensor(); }

}  // namespace

Dims check_gca_args(const char* fn, const DeviceBackend& be, const at::Tensor& x_a,
                    const at::Tensor& x_b, const GCAWeights& w, const OptT& kpm, const OptT& am,
                    const GCAConfig& cfg) {
  const c10::DeviceType dev = be.device;
  const std::vector<at::ScalarType>& dtypes = be.dtypes;
  const int64_t n_heads = cfg.n_heads, act = cfg.activation;
  const at::Tensor &wq = w.wq, &bq = w.bq, &wk = w.wk, &bk = w.bk, &wv = w.wv, &bv = w.bv,
                   &wo = w.wo, &bo = w.bo, &w1 = w.w1, &b1 = w.b1, &w2 = w.w2, &b2 = w.b2;
  TORCH_CHECK(x_a.defined() && x_a.dim() == 3, fn, ": x_a must be (B, La, d), got ",
              x_a.defined() ? shape_str(x_a) : std::string("undefined"));
  TORCH_CHECK(x_a.device().type() == dev, fn, ": x_a must be a ", c10::DeviceTypeName(dev),
              " tensor, got one on ", x_a.device());
  const auto dt = x_a.scalar_type();
  bool ok = false;
  for (auto t : dtypes) ok = ok || t == dt;
  TORCH_CHECK(ok, fn, ": x_a has dtype ", dt, "; this backend supports ", dtypes_str(dtypes));
  TORCH_CHECK(x_b.defined() && x_b.dim() == 3, fn, ": x_b must be (B, Lb, d), got ",
              x_b.defined() ? shape_str(x_b) : std::string("undefined"));
  const int64_t B = x_a.size(0), La = x_a.size(1), d = x_a.size(2), Lb = x_b.size(1);
  TORCH_CHECK(B >= 1 && La >= 1 && Lb >= 1 && d >= 1, fn, ": x_a ", shape_str(x_a), " and x_b ",
              shape_str(x_b), " must have B, La, Lb, d >= 1");
  TORCH_CHECK(n_heads >= 1 && d % n_heads == 0, fn, ": n_heads=", n_heads, " must divide d=", d);
  TORCH_CHECK(act == kSigmoid || act == kTanh, fn, ": activation code must be 0 (sigmoid) or 1 (tanh), got ", act);
  TORCH_CHECK(w1.defined() && w1.dim() == 2, fn, ": w1 must be (gate_hidden, 2d), got ",
              w1.defined() ? shape_str(w1) : std::string("undefined"));
  const int64_t hid = w1.size(0);
  check_tensor(fn, "x_a", x_a, dev, dt, {B, La, d});
  check_tensor(fn, "x_b", x_b, dev, dt, {B, Lb, d});
  check_tensor(fn, "wq", wq, dev, dt, {d, d});
  check_tensor(fn, "bq", bq, dev, dt, {d});
  check_tensor(fn, "wk", wk, dev, dt, {d, d});
  check_tensor(fn, "bk", bk, dev, dt, {d});
  check_tensor(fn, "wv", wv, dev, dt, {d, d});
  check_tensor(fn, "bv", bv, dev, dt, {d});
  check_tensor(fn, "wo", wo, dev, dt, {d, d});
  check_tensor(fn, "bo", bo, dev, dt, {d});
  check_tensor(fn, "w1", w1, dev, dt, {hid, 2 * d});
  check_tensor(fn, "b1", b1, dev, dt, {hid});
  check_tensor(fn, "w2", w2, dev, dt, {d, hid});
  check_tensor(fn, "b2", b2, dev, dt, {d});
  TORCH_CHECK(w.ln_w.defined() == w.ln_b.defined(), fn,
              ": ln_w and ln_b must both be given (LayerNorm on) or both be None");
  if (w.layer_norm()) {
    check_tensor(fn, "ln_w", w.ln_w, dev, dt, {d});
    check_tensor(fn, "ln_b", w.ln_b, dev, dt, {d});
  }
  if (kpm.has_value()) {
    check_mask(fn, "key_padding_mask", *kpm, x_a);
    TORCH_CHECK(kpm->sizes() == at::IntArrayRef({B, Lb}), fn,
                ": key_padding_mask must have shape (B, Lb) = (", B, ", ", Lb, "), got ", shape_str(*kpm));
  }
  if (am.has_value()) {
    check_mask(fn, "attn_mask", *am, x_a);
    TORCH_CHECK(am->dim() == 3 && (am->size(0) == 1 || am->size(0) == B) && am->size(1) == La &&
                    am->size(2) == Lb,
                fn, ": attn_mask must have shape (1, La, Lb) or (B, La, Lb) with B=", B, ", La=", La,
                ", Lb=", Lb, ", got ", shape_str(*am));
  }
  return Dims{B, La, Lb, d, n_heads, hid};
}

int64_t check_cos_args(const char* fn, c10::DeviceType dev, const std::vector<at::ScalarType>& dtypes,
                       const at::Tensor& x, const at::Tensor& y, const OptT& mask) {
  // rows of d features with any leading shape (flattened here, not by a reshape per call in
  // Python)
  TORCH_CHECK(x.defined() && x.dim() >= 1, fn, ": x must be (..., d), got ",
              x.defined() ? shape_str(x) : std::string("undefined"));
  TORCH_CHECK(x.device().type() == dev, fn, ": x must be a ", c10::DeviceTypeName(dev),
              " tensor, got one on ", x.device());
  bool ok = false;
  for (auto t : dtypes) ok = ok || t == x.scalar_type();
  TORCH_CHECK(ok, fn, ": x has dtype ", x.scalar_type(), "; this backend supports ", dtypes_str(dtypes));
  TORCH_CHECK(x.size(-1) >= 1, fn, ": x must have d >= 1, got ", shape_str(x));
  check_tensor(fn, "x", x, dev, x.scalar_type(), x.sizes().vec());
  check_tensor(fn, "y", y, dev, x.scalar_type(), x.sizes().vec());
  if (mask.has_value()) {
    check_mask(fn, "mask", *mask, x);
    TORCH_CHECK(mask->sizes() == x.sizes().slice(0, x.dim() - 1), fn,
                ": mask must have x's shape without its last dimension, ",
                c10::IntArrayRef(x.sizes().slice(0, x.dim() - 1)), ", got ", shape_str(*mask));
  }
  return x.numel() / x.size(-1);
}

namespace {

// Scratch memory for the temporaries of one CPU call (gathered input rows, the backward's
// intermediate gradients), kept per thread between calls. Fresh multi-megabyte allocations are
// returned to the kernel by glibc on free and page-faulted back in on first touch: at (256, 50,
// 256) that was ~9,600 faults (37 MiB) per forward+backward, about a tenth of its time on this
// machine. Only tensors that die inside the call live here (never an output: views of a slot
// would alias the next call's data). Each slot serves one role in forward and backward, so its
// size settles at the largest call seen; release_workspace() gives the memory back. On CUDA
// the caching allocator already does this: every request is a plain at::empty there.
thread_local std::vector<at::Tensor> tl_slots;

enum Slot : size_t { kSlotA, kSlotB, kSlotC, kSlotDxa, kSlotDkv, kNumSlots };

at::Tensor scratch(Slot slot, at::IntArrayRef shape, const at::TensorOptions& opts) {
  if (opts.device().type() != c10::DeviceType::CPU) return at::empty(shape, opts);
  int64_t numel = 1;
  for (auto s : shape) numel *= s;
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(opts.dtype().toScalarType()));
  if (tl_slots.size() < kNumSlots) tl_slots.resize(kNumSlots);
  at::Tensor& buf = tl_slots[slot];
  if (!buf.defined() || buf.numel() < bytes)
    buf = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));  // the old one dies with its views
  // a view keeps the slot's storage alive even if a later request replaces the slot
  return buf.narrow(0, 0, bytes).view(opts.dtype().toScalarType()).view(shape);
}

}  // namespace

// Recycled memory for the tensors a CPU call hands out: outputs, gradients and the saved
// intermediates, which cannot live in the slots above because their lifetime is the caller's.
// They were fresh allocations, page-faulted in on first touch whenever glibc had unmapped or
// trimmed the previous call's blocks: at (256, 50, 256) a forward+backward took 1,300-8,900
// minor faults, ~1.4 us each (the slow end ran ~10 ms, 8%, behind the same code without them).
// Here each block of memory stays in a per-thread pool. A tensor handed out owns its own
// storage, whose deleter (run when the last reference to that storage goes, from any thread)
// drops the tensor's share of the block: the block is free again once the pool's share is the
// only one, and goes to the next request of exactly its size (shapes repeat from one training
// step to the next). The storage is resizable like at::empty's (a resize moves it to the CPU
// allocator and gives the block back). A free block no request has taken for kPoolMaxIdle
// requests is dropped (checked whenever the pool grows and every kPoolTrimEvery requests),
// and so are the least recently used once the free ones exceed kPoolMaxFreeBytes, so varying
// shapes do not pile up memory; release_workspace() drops all.
// Blocks come from the CPU allocator, so memory profiles count them.
namespace {

struct PoolBlock {
  c10::DataPtr mem;
  int64_t bytes;
  uint64_t last;  // request clock when last handed out
};

thread_local std::vector<std::shared_ptr<PoolBlock>> tl_pool;
thread_local uint64_t tl_pool_clock = 0;

// below this, glibc serves the request from its heap without faults: not worth the bookkeeping
constexpr int64_t kPoolMinBytes = 64 << 10;
constexpr uint64_t kPoolMaxIdle = 4096;
constexpr uint64_t kPoolTrimEvery = 256;
constexpr int64_t kPoolMaxFreeBytes = int64_t(1) << 30;

bool block_free(const std::shared_ptr<PoolBlock>& b) { return b.use_count() == 1; }

void pool_trim(uint64_t now) {
  int64_t free_bytes = 0;
  for (size_t i = 0; i < tl_pool.size();) {
    const auto& b = tl_pool[i];
    if (block_free(b) && now - b->last > kPoolMaxIdle) {
      tl_pool.erase(tl_pool.begin() + static_cast<std::ptrdiff_t>(i));
      continue;
    }
    if (block_free(b)) free_bytes += b->bytes;
    ++i;
  }
  while (free_bytes > kPoolMaxFreeBytes) {  // least recently used free block first
    size_t victim = tl_pool.size();
    for (size_t i = 0; i < tl_pool.size(); ++i)
      if (block_free(tl_pool[i]) &&
          (victim == tl_pool.size() || tl_pool[i]->last < tl_pool[victim]->last))
        victim = i;
    if (victim == tl_pool.size()) break;
    free_bytes -= tl_pool[victim]->bytes;
    tl_pool.erase(tl_pool.begin() + static_cast<std::ptrdiff_t>(victim));
  }
}

}  // namespace

at::Tensor recycled_empty(at::IntArrayRef shape, const at::TensorOptions& opts) {
  int64_t numel = 1;
  for (auto s : shape) numel *= s;
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(opts.dtype().toScalarType()));
  if (opts.device().type() != c10::DeviceType::CPU || bytes < kPoolMinBytes)
    return at::empty(shape, opts);
  const uint64_t now = ++tl_pool_clock;
  std::shared_ptr<PoolBlock> block;
  for (const auto& b : tl_pool)
    if (b->bytes == bytes && block_free(b)) {
      block = b;
      break;
    }
  const bool grows = !block;
  if (grows) {
    block = std::make_shared<PoolBlock>(
        PoolBlock{c10::GetCPUAllocator()->allocate(static_cast<size_t>(bytes)), bytes, now});
    tl_pool.push_back(block);
  }
  block->last = now;
  // when the pool grows, and now and then in a steady state (so that blocks of shapes no
  // longer used go even when nothing new is asked for); the block being handed out is held
  // here, so it is not free
  if (grows || now % kPoolTrimEvery == 0) pool_trim(now);
  void* data = block->mem.get();
  // contiguous (no strides given); the deleter holds the tensor's share of the block, and
  // destroying it gives the block back
  return at::for_blob(data, shape)
      .deleter([share = std::move(block)](void*) {})
      .options(opts)
      .allocator(c10::GetCPUAllocator())
      .resizeable_storage()
      .make_tensor();
}

void release_workspace() {
  tl_slots.clear();
  tl_pool.clear();  // blocks still in use live on with their tensors
}

int64_t workspace_bytes() {
  int64_t n = 0;
  for (const auto& t : tl_slots) n += t.defined() ? t.numel() : 0;
  for (const auto& b : tl_pool) n += b->bytes;
  return n;
}

namespace {

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

  // out's rows at idx += c's rows (CPU; each row written by one thread). ATen's index_add_
  // took 0.31 ms for this at (256, 50, 64), several times the memory traffic's worth.
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

// out = a b (out overwritten). On the CPU as out = 0, then out += a b: MKL's sgemm with
// beta != 1 (at::mm_out passes beta = 0) first scales the whole output in a separate pass of
// its own (mkl_blas_def_sgemm_mscale in perf) that runs at about half the speed of ATen's
// zero_: (6454, 256) x (256, 256) into a cold output took 5.07 ms as mm_out, 4.84 ms as zero_
// + addmm_ and 4.66 ms as addmm_ alone.
void product_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (out.device().is_cpu()) {
    out.zero_();
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

// a b in a recycled tensor (at::mm would allocate a fresh one)
at::Tensor product(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = recycled_empty({a.size(0), b.size(1)}, a.options());
  product_into(out, a, b);
  return out;
}

// out = g^T a (g (n, m), a (n, k)): the weight gradients, sums over all n rows into a small
// (m, k). MKL ran these on about one core's worth of throughput at small m, k (d 64: 94-130
// GFLOP/s in place of the ~180 of the other products; a 64 x 64 output gives two threads little
// to split). Here the rows are split in two halves whose products run side by side, one thread
// each (MKL runs single-threaded inside a parallel region), and are then added. The split
// depends on n alone, never on the thread count, so results stay bit-identical run to run.
constexpr int64_t kSplitSumMinRows = 1024;

void weight_grad_into(at::Tensor& out, const at::Tensor& g, const at::Tensor& a) {
  const int64_t n = g.size(0);
  if (n < kSplitSumMinRows || !out.device().is_cpu()) {
    at::mm_out(out, g.t(), a);
    return;
  }
  at::Tensor second = recycled_empty(out.sizes(), out.options());
  const int64_t h = n / 2;
  // ATen products on worker threads: they must run with the caller's state (KernelScope)
  parallel_for_as_caller(0, 2, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      at::Tensor dst = p == 0 ? out : second;
      at::mm_out(dst, g.narrow(0, p * h, p ? n - h : h).t(), a.narrow(0, p * h, p ? n - h : h));
    }
  });
  out.add_(second);
}

at::Tensor weight_grad(const at::Tensor& g, const at::Tensor& a) {
  at::Tensor out = recycled_empty({g.size(1), a.size(1)}, g.options());
  weight_grad_into(out, g, a);
  return out;
}

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

// Key rows (b, j) not padded. Padded keys are never read by the attention kernels and get
// exactly zero gradient, so their k/v products are skipped.
Rows active_key_rows(c10::DeviceType dev, const at::Tensor& kpm, const Dims& dm) {
  const int64_t M = dm.B * dm.Lb;
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
                       const Dims& dm) {
  const int64_t N = dm.B * dm.La, La = dm.La, Lb = dm.Lb;
  if (dev != c10::DeviceType::CPU) return Rows{at::Tensor(), N, N};
  if (!kpm.defined() && !am.defined()) return Rows{at::Tensor(), N, N, {}, true};  // Lb >= 1 keys each
  RECORD_FUNCTION("gca::active_query_rows", std::vector<c10::IValue>());
  const bool* kp = kpm.defined() ? kpm.data_ptr<bool>() : nullptr;
  const bool* ap = am.defined() ? am.data_ptr<bool>() : nullptr;
  const bool am_shared = am.defined() && am.size(0) == 1;
  std::vector<uint8_t> active(N);
  at::parallel_for(0, dm.B, 1, [&](int64_t b0, int64_t b1) {  // raw memory, no ATen call
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
// dkv) kr's rows; on the CPU q comes scaled (Dims::q_scaled).
Dims compact_dims(Dims dm, c10::DeviceType dev, const Rows& qr, const Rows& kr) {
  dm.q_scaled = dev == c10::DeviceType::CPU;
  if (qr.compact()) {
    dm.qrow = qr.idx.data_ptr<int64_t>();
    dm.nq = qr.n;
    dm.qpos = qr.pos.data();
  }
  if (kr.compact()) dm.kpos = kr.pos.data();
  return dm;
}

}  // namespace

GCAWeights GCAWeights::from_list(const char* fn, const std::vector<at::Tensor>& list,
                                 const std::optional<at::Tensor>& ln_w,
                                 const std::optional<at::Tensor>& ln_b) {
  TORCH_CHECK(list.size() == kCount, fn, ": weights must hold ", kCount,
              " tensors (wq, bq, wk, bk, wv, bv, wo, bo, w1, b1, w2, b2), got ", list.size());
  const auto opt_t = [](const std::optional<at::Tensor>& t) { return t ? *t : at::Tensor(); };
  return GCAWeights{list[0], list[1], list[2], list[3], list[4],  list[5],    list[6],
                    list[7], list[8], list[9], list[10], list[11], opt_t(ln_w), opt_t(ln_b)};
}

GCASaved GCASaved::from_list(const char* fn, const std::vector<at::Tensor>& list) {
  TORCH_CHECK(list.size() == kCount, fn, ": saved must hold the forward's ", kCount,
              " intermediates, got ", list.size());
  return GCASaved{list[0], list[1], list[2], list[3], list[4], list[5],
                  list[6], list[7], list[8], list[9], list[10]};
}

std::vector<at::Tensor> gca_forward(const DeviceBackend& be, const at::Tensor& x_a,
                                    const at::Tensor& x_b, const GCAWeights& w, const OptT& kpm,
                                    const OptT& am, const GCAConfig& cfg) {
  const KernelScope scope;  // autograd and autocast see none of the calls below
  const std::string fn_s = std::string("gca_fwd (") + be.name + ")";
  const char* fn = fn_s.c_str();
  const c10::DeviceType dev = be.device;
  const GCAKernels& K = be.kernels;
  const Dims dm = check_gca_args(fn, be, x_a, x_b, w, kpm, am, cfg);
  const int64_t N = dm.B * dm.La, M = dm.B * dm.Lb, d = dm.d;
  const auto opts = x_a.options();
  const auto acc_opts = opts.dtype(acc_dtype(x_a.scalar_type()));
  const at::Tensor xa = x_a.view({N, d}), xb = x_b.view({M, d});
  const Rows qr = active_query_rows(dev, opt(kpm), opt(am), dm);
  const Rows kr = active_key_rows(dev, opt(kpm), dm);

  // q, o, x', h and g hold the nq = qr.n active query rows, kv the nk = kr.n unpadded keys
  // (all rows on the dense path); the kernels reach them through the row maps of dmc.
  const Dims dmc = compact_dims(dm, dev, qr, kr);
  // the gathered input rows are saved: the backward's weight gradients need them again
  const at::Tensor xa_c = qr.gather_kept(xa);
  const at::Tensor xb_c = kr.gather_kept(xb);
  at::Tensor q = recycled_empty({qr.n, d}, opts);
  // on the CPU q is stored scaled by 1 / sqrt(dh) (Dims::q_scaled): q = qs (x_a Wq^T + bq)
  const double qs = dmc.q_scaled ? 1.0 / std::sqrt(static_cast<double>(d / dm.H)) : 1.0;
  // beta = 1 with the bias pre-scaled: MKL's sgemm scales its output in a pass of its own for
  // any other beta (see product_into)
  at::addmm_out(q, qs == 1.0 ? w.bq : w.bq * qs, xa_c, w.wq.t(), 1.0, qs);
  // k and v come from the same input: one product against the stacked weights
  at::Tensor kv = recycled_empty({kr.n, 2 * d}, opts);
  at::addmm_out(kv, at::cat({w.bk, w.bv}), xb_c, at::cat({w.wk, w.wv}).t());
  at::Tensor o = recycled_empty({qr.n, d}, opts);
  // the kernel writes the rows it computes: +inf marks the others (no visible key)
  at::Tensor lse = recycled_empty({N, dm.H}, acc_opts);
  if (qr.compact()) lse.fill_(std::numeric_limits<double>::infinity());
  {
    RECORD_FUNCTION("gca::attn_fwd", std::vector<c10::IValue>());  // named in profiles
    K.attn_fwd(q, kv, opt(kpm), opt(am), o, lse, dmc);
  }

  // x' = o Wo^T + bo where a key was seen, 0 elsewhere. When every stored row sees a key
  // (compact path, or no mask) the bias goes into the product and cos is formed by the gate's
  // row pass, which loads x_a and x' anyway. Dense path with keyless rows: the row kernel adds
  // the bias on the rows with a key and zeroes the rest.
  at::Tensor xp = recycled_empty({qr.n, d}, opts);
  at::Tensor cos = recycled_empty({N}, opts);
  const bool cos_in_gate = qr.stored_rows_see_keys();
  if (cos_in_gate) {
    at::addmm_out(xp, w.bo, o, w.wo.t());
  } else {
    product_into(xp, o, w.wo.t());
    RECORD_FUNCTION("gca::xprime_fwd", std::vector<c10::IValue>());  // named in profiles
    K.xprime_fwd(xp, w.bo, lse, xa, cos, dmc);
  }

  // The gate only matters where x' != 0 (z = x_a + g * x'): h and g exist on the stored rows.
  at::Tensor h = recycled_empty({qr.n, dm.hidden}, opts);
  product_into(h, xa_c, w.w1.narrow(1, 0, d).t());
  h.addmm_(xp, w.w1.narrow(1, d, d).t());
  {
    RECORD_FUNCTION("gca::bias_relu", std::vector<c10::IValue>());  // named in profiles
    K.bias_relu(h, w.b1);
  }
  at::Tensor g = recycled_empty({qr.n, d}, opts);
  product_into(g, h, w.w2.t());  // + b2 in the row kernel below
  at::Tensor y = recycled_empty({N, d}, opts);
  const bool ln = w.layer_norm();
  at::Tensor mean = recycled_empty({ln ? N : 0}, acc_opts),
             rstd = recycled_empty({ln ? N : 0}, acc_opts);
  {
    RECORD_FUNCTION("gca::gate_out_fwd", std::vector<c10::IValue>());  // named in profiles
    at::Tensor cos_here = cos_in_gate ? cos : at::Tensor();
    K.gate_out_fwd(xa, xp, g, w.b2, w.ln_w, w.ln_b, y, mean, rstd, cos_here, cfg.activation,
                   cfg.ln_eps, dmc);
  }
  // outputs may not alias inputs: on the dense path the "gathered" rows are x_a itself
  const auto kept = [&](const Rows& r, const at::Tensor& rows) {
    return r.compact() ? rows : at::empty({0, d}, opts);
  };
  const GCASaved saved{q, kv, o, lse, xp, h, g, mean, rstd, kept(qr, xa_c), kept(kr, xb_c)};
  std::vector<at::Tensor> out{y.view({dm.B, dm.La, d}), cos.view({dm.B, dm.La})};
  for (auto& t : saved.list()) out.push_back(t);
  return out;
}

std::vector<at::Tensor> gca_backward(const DeviceBackend& be, const at::Tensor& dy,
                                     const at::Tensor& dcos, const at::Tensor& x_a,
                                     const at::Tensor& x_b, const GCAWeights& w, const OptT& kpm,
                                     const OptT& am, const GCASaved& s, const GCAConfig& cfg) {
  const KernelScope scope;  // autograd and autocast see none of the calls below
  const std::string fn_s = std::string("gca_bwd (") + be.name + ")";
  const char* fn = fn_s.c_str();
  const c10::DeviceType dev = be.device;
  const GCAKernels& K = be.kernels;
  const Dims dm = check_gca_args(fn, be, x_a, x_b, w, kpm, am, cfg);
  const int64_t N = dm.B * dm.La, M = dm.B * dm.Lb, d = dm.d, hid = dm.hidden;
  const auto dt = x_a.scalar_type();
  const auto adt = acc_dtype(dt);
  const bool ln = w.layer_norm();
  const at::Tensor xa = x_a.view({N, d}), xb = x_b.view({M, d});
  const at::Tensor w1a = w.w1.narrow(1, 0, d), w1b = w.w1.narrow(1, d, d);
  // the same row sets as the forward (same masks, same function)
  const Rows qr = active_query_rows(dev, opt(kpm), opt(am), dm);
  const Rows kr = active_key_rows(dev, opt(kpm), dm);
  const Dims dmc = compact_dims(dm, dev, qr, kr);
  check_tensor(fn, "dy", dy, dev, dt, {dm.B, dm.La, d});
  check_tensor(fn, "dcos", dcos, dev, dt, {dm.B, dm.La});
  check_tensor(fn, "q", s.q, dev, dt, {qr.n, d});
  check_tensor(fn, "kv", s.kv, dev, dt, {kr.n, 2 * d});
  check_tensor(fn, "o", s.o, dev, dt, {qr.n, d});
  check_tensor(fn, "lse", s.lse, dev, adt, {N, dm.H});
  check_tensor(fn, "xp", s.xp, dev, dt, {qr.n, d});
  check_tensor(fn, "h", s.h, dev, dt, {qr.n, hid});
  check_tensor(fn, "g", s.g, dev, dt, {qr.n, d});
  check_tensor(fn, "mean", s.mean, dev, adt, {ln ? N : 0});
  check_tensor(fn, "rstd", s.rstd, dev, adt, {ln ? N : 0});
  check_tensor(fn, "xa_rows", s.xa_rows, dev, dt, {qr.compact() ? qr.n : 0, d});
  check_tensor(fn, "xb_rows", s.xb_rows, dev, dt, {kr.compact() ? kr.n : 0, d});
  const at::Tensor& xa_c = qr.compact() ? s.xa_rows : xa;
  const at::Tensor& xb_c = kr.compact() ? s.xb_rows : xb;

  // dg_pre and dxp exist on the rows x' is stored on
  at::Tensor dg_pre = scratch(kSlotA, {qr.n, d}, x_a.options()), dxp = scratch(kSlotB, {qr.n, d}, x_a.options()),
             dxa = recycled_empty({N, d}, x_a.options());
  const auto opts = x_a.options();
  at::Tensor dln_w = at::empty({ln ? d : 0}, opts), dln_b = at::empty({ln ? d : 0}, opts),
             db2 = at::empty({d}, opts);
  // bo's gradient is the column sum of dxp = (the gate pass's part) + dh W1b. When every stored
  // row sees a key the first part is summed by the gate pass while it writes the rows and the
  // second is db1 W1b (column sums commute with the product): no pass over dxp. Otherwise the
  // dense path zeroes keyless rows of dxp after the product, so it sums dxp itself.
  at::Tensor dbo = at::empty({d}, opts);
  const bool every_row_has_key = qr.stored_rows_see_keys();
  at::Tensor dxp_sum = every_row_has_key ? dbo : at::Tensor();
  {
    RECORD_FUNCTION("gca::gate_out_bwd", std::vector<c10::IValue>());  // named in profiles
    K.gate_out_bwd(dy.view({N, d}), dcos.view({N}), xa, s.xp, s.g, w.ln_w, s.mean, s.rstd,
                   dg_pre, db2, dxp, dxa, dln_w, dln_b, dxp_sum, cfg.activation, dmc);
  }

  // Temporaries live in the scratch slots, reused once dead (the custom op keeps every saved
  // tensor alive until it returns, so nothing is freed early: reuse keeps the peak low).
  // dg_pre is dz * x' * act': zero on the rows without a visible key, which are not stored.
  at::Tensor dw2 = weight_grad(dg_pre, s.h);
  at::Tensor dh = scratch(kSlotC, {qr.n, hid}, opts);
  product_into(dh, dg_pre, w.w2);
  at::Tensor db1 = at::empty({hid}, opts);
  {
    RECORD_FUNCTION("gca::relu_bwd_sum", std::vector<c10::IValue>());  // named in profiles
    K.relu_bwd_sum(dh, s.h, db1);  // relu': h was stored post-relu
  }
  // dW1's two column halves written in place (strided outputs), not concatenated afterwards
  at::Tensor dw1 = recycled_empty({hid, 2 * d}, opts);
  {
    at::Tensor dw1a = dw1.narrow(1, 0, d), dw1b = dw1.narrow(1, d, d);
    weight_grad_into(dw1a, dh, xa_c);
    weight_grad_into(dw1b, dh, s.xp);
  }
  at::Tensor dxa_c;  // compact path: the part of dx_a on the active rows not yet in dxa
  if (qr.compact()) {
    dxa_c = scratch(kSlotDxa, {qr.n, d}, opts);
    product_into(dxa_c, dh, w1a);
  } else {
    dxa.addmm_(dh, w1a);
  }
  dxp.addmm_(dh, w1b);
  dh.reset();
  // x' is the constant 0 on rows without a visible key: nothing flows back through them
  if (!every_row_has_key) dxp.mul_(s.lse.narrow(1, 0, 1).isfinite().to(dt));

  if (every_row_has_key) {
    dbo.addmv_(w1b.t(), db1);
  } else {
    RECORD_FUNCTION("gca::col_sum", std::vector<c10::IValue>());  // named in profiles
    K.col_sum(dxp, dbo);
  }
  at::Tensor dwo = weight_grad(dxp, s.o);
  product_into(dg_pre, dxp, w.wo);
  at::Tensor dout = dg_pre;        // dg_pre is dead: its buffer takes d(o)
  at::Tensor dq = std::move(dxp);  // dxp dies as d(o) is formed: dq takes it
  at::Tensor dkv = scratch(kSlotDkv, {kr.n, 2 * d}, opts);  // compact: unpadded keys only
  if (dev != c10::DeviceType::CPU) dkv.zero_();  // the CPU kernel zeroes it block by block
  {
    RECORD_FUNCTION("gca::attn_bwd", std::vector<c10::IValue>());  // named in profiles
    K.attn_bwd(s.q, s.kv, s.o, dout, s.lse, opt(kpm), opt(am), dq, dkv, dmc);
  }
  dout.reset();
  dg_pre.reset();

  at::Tensor dwq = weight_grad(dq, xa_c);
  at::Tensor dbq = at::empty({d}, opts);
  {
    RECORD_FUNCTION("gca::col_sum", std::vector<c10::IValue>());  // named in profiles
    K.col_sum(dq, dbq);
  }
  if (qr.compact()) {
    dxa_c.addmm_(dq, w.wq);
    qr.add_into(dxa_c, dxa);
    dxa_c.reset();
  } else {
    dxa.addmm_(dq, w.wq);
  }
  dq.reset();
  at::Tensor dwkv = weight_grad(dkv, xb_c);
  // The k and v bias gradients without a pass over dkv. Each row of p (per head) sums to 1 where
  // the query sees a key, and d(o) is 0 on the rows that see none, so the column sums of
  // dv = p^T d(o) are those of d(o) = dxp Wo: dbv = dbo Wo. Softmax ignores a constant added
  // to a row's scores, so the rows of ds sum to 0 and dbk = sum_j ds_j^T q = 0 exactly (summed
  // from dk it would be rounding noise).
  at::Tensor dbk = at::zeros({d}, opts), dbv = at::mv(w.wo.t(), dbo);
  const at::Tensor wkv = at::cat({w.wk, w.wv});
  // dense path: the product is dx_b itself (an output, so never in scratch)
  at::Tensor dxb;
  if (kr.compact()) {
    at::Tensor dxb_c = scratch(kSlotC, {kr.n, d}, opts);
    product_into(dxb_c, dkv, wkv);
    dxb = kr.scatter(dxb_c);
  } else {
    dxb = product(dkv, wkv);
  }
  // custom ops may not return aliasing outputs: the stacked k/v weight gradient is split into
  // copies
  const auto half = [&](const at::Tensor& t, int64_t i) {
    const at::Tensor part = t.narrow(0, i * d, d);
    return recycled_empty(part.sizes(), opts).copy_(part);
  };
  return {dxa.view({dm.B, dm.La, d}), dxb.view({dm.B, dm.Lb, d}), dwq, dbq,
          half(dwkv, 0), dbk, half(dwkv, 1), dbv, dwo, dbo, dw1, db1, dw2,
          db2, dln_w, dln_b};
}

std::vector<at::Tensor> gca_forward_entry(const DeviceBackend& be, const at::Tensor& x_a,
                                          const at::Tensor& x_b, const TensorList& weights, const OptT& ln_w, const OptT& ln_b,
                                          const OptT& kpm, const OptT& am, int64_t n_heads,
                                          int64_t activation, double ln_eps) {
  return gca_forward(be, x_a, x_b, GCAWeights::from_list("gca_fwd", weights, ln_w, ln_b), kpm, am,
                     GCAConfig{n_heads, activation, ln_eps});
}

std::vector<at::Tensor> gca_backward_entry(const DeviceBackend& be, const at::Tensor& dy,
                                           const at::Tensor& dcos, const at::Tensor& x_a,
                                           const at::Tensor& x_b, const TensorList& weights, const OptT& ln_w, const OptT& ln_b,
                                           const OptT& kpm, const OptT& am,
                                           const std::vector<at::Tensor>& saved, int64_t n_heads,
                                           int64_t activation, double ln_eps) {
  return gca_backward(be, dy, dcos, x_a, x_b, GCAWeights::from_list("gca_bwd", weights, ln_w, ln_b), kpm, am,
                      GCASaved::from_list("gca_bwd", saved), GCAConfig{n_heads, activation, ln_eps});
}

}  // namespace gca
