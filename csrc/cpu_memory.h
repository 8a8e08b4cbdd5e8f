// CPU memory reuse between calls: per-thread scratch slots for the temporaries of one call,
// and a per-thread pool of recycled blocks for the tensors a call hands out. On CUDA both are
// plain at::empty (the caching allocator already reuses memory).
#pragma once

#include <ATen/ATen.h>

namespace gca {

// One slot per role of a temporary in the forward and backward; a slot's size settles at the
// largest call seen.
enum Slot : size_t { kSlotA, kSlotB, kSlotC, kSlotDxa, kSlotDkv, kNumSlots };

// A view of the calling thread's slot, uninitialised, valid until the slot's next request.
// Only for tensors that die inside the call (never an output).
at::Tensor scratch(Slot slot, at::IntArrayRef shape, const at::TensorOptions& opts);

// An uninitialised contiguous tensor like at::empty whose CPU memory is recycled from earlier
// calls once nothing refers to it any more; at::empty elsewhere.
at::Tensor recycled_empty(at::IntArrayRef shape, const at::TensorOptions& opts);

// The calling thread's kept memory in bytes, and a call that frees it.
int64_t workspace_bytes();
void release_workspace();

}  // namespace gca
