// CPU memory reuse between calls (see cpu_memory.h).
#include "cpu_memory.h"

#include <c10/core/CPUAllocator.h>

#include <memory>
#include <vector>

namespace gca {
namespace {

// Scratch memory for the temporaries of one CPU call (gathered input rows, the backward's
// intermediate gradients), kept per thread between calls. Fresh multi-megabyte allocations are
// returned to the kernel by glibc on free and page-faulted back in on first touch, on every
// call. Only tensors that die inside the call live here (never an output: views of a slot
// would alias the next call's data). Each slot serves one role in forward and backward, so its
// size settles at the largest call seen; release_workspace() gives the memory back. On CUDA
// the caching allocator already does this: every request is a plain at::empty there.
thread_local std::vector<at::Tensor> tl_slots;

}  // namespace

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

// Recycled memory for the tensors a CPU call hands out: outputs, gradients and the saved
// intermediates, which cannot live in the slots above because their lifetime is the caller's.
// Fresh allocations would be page-faulted in on first touch whenever glibc had unmapped or
// trimmed the previous call's blocks. Here each block of memory stays in a per-thread pool. A tensor handed out owns its own
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

}  // namespace gca
