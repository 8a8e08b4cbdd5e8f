// Entry points of the CPU extension (gca_kernels._C), bound in bindings.cpp.
#pragma once

#include "gca_core.h"

namespace gca {

std::vector<at::Tensor> gca_fwd_cpu(const at::Tensor& x_a, const at::Tensor& x_b,
                                    const at::Tensor& wq, const at::Tensor& bq,
                                    const at::Tensor& wk, const at::Tensor& bk,
                                    const at::Tensor& wv, const at::Tensor& bv,
                                    const at::Tensor& wo, const at::Tensor& bo,
                                    const at::Tensor& w1, const at::Tensor& b1,
                                    const at::Tensor& w2, const at::Tensor& b2, const OptT& ln_w,
                                    const OptT& ln_b, const OptT& kpm, const OptT& am,
                                    int64_t n_heads, int64_t act, double ln_eps, bool custom_op);

std::vector<at::Tensor> gca_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& dcos, const at::Tensor& x_a, const at::Tensor& x_b,
    const at::Tensor& wq, const at::Tensor& bq, const at::Tensor& wk, const at::Tensor& bk,
    const at::Tensor& wv, const at::Tensor& bv, const at::Tensor& wo, const at::Tensor& bo,
    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
    const OptT& ln_w, const OptT& ln_b, const OptT& kpm, const OptT& am, const at::Tensor& q,
    const at::Tensor& kv, const at::Tensor& o, const at::Tensor& lse, const at::Tensor& xp,
    const at::Tensor& h, const at::Tensor& g, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& xa_g, const at::Tensor& xb_g, int64_t n_heads, int64_t act, double ln_eps);

// Mean over valid rows of |cos(x_i, y_i)| (or cos): x, y (..., d), mask (...) or None.
at::Tensor cos_fwd_cpu(const at::Tensor& x, const at::Tensor& y, const OptT& mask, bool absolute);
// Gradients (dx, dy) of cos_fwd_cpu for the upstream 0-dim gradient gout.
std::vector<at::Tensor> cos_bwd_cpu(const at::Tensor& gout, const at::Tensor& x,
                                    const at::Tensor& y, const OptT& mask, bool absolute);

}  // namespace gca
