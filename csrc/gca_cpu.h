// Entry points of the CPU extension (gca_kernels._C), bound in bindings.cpp.
#pragma once

#include "gca_core.h"

namespace gca {

// GCA forward: [y, cos, *GCASaved::list()]; weights, ln_w, ln_b as GCAWeights::from_list takes them.
std::vector<at::Tensor> gca_fwd_cpu(const at::Tensor& x_a, const at::Tensor& x_b,
                                    const TensorList& weights, const OptT& ln_w, const OptT& ln_b, const OptT& kpm, const OptT& am,
                                    int64_t n_heads, int64_t activation, double ln_eps);
std::vector<at::Tensor> gca_bwd_cpu(const at::Tensor& dy, const at::Tensor& dcos,
                                    const at::Tensor& x_a, const at::Tensor& x_b,
                                    const TensorList& weights, const OptT& ln_w, const OptT& ln_b, const OptT& kpm, const OptT& am,
                                    const std::vector<at::Tensor>& saved, int64_t n_heads,
                                    int64_t activation, double ln_eps);
// (the backward returns the 16 gradients of gca_backward)

// Mean over valid rows of |cos(x_i, y_i)| (or cos): x, y (..., d), mask (...) or None.
at::Tensor cos_fwd_cpu(const at::Tensor& x, const at::Tensor& y, const OptT& mask, bool absolute);
// Gradients (dx, dy) of cos_fwd_cpu for the upstream 0-dim gradient gout.
std::vector<at::Tensor> cos_bwd_cpu(const at::Tensor& gout, const at::Tensor& x,
                                    const at::Tensor& y, const OptT& mask, bool absolute);

}  // namespace gca
