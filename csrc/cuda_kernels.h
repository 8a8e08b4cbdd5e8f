// The CUDA row kernels (GCAKernels' members for the cuda backend): attention in
// attention_cuda.cu, the row epilogues in row_epilogue_cuda.cu. Contracts in gca_core.h.
#pragma once

#include "gca_core.h"

namespace gca {

void attn_fwd_cuda(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& kpm,
                   const at::Tensor& am, at::Tensor& o, at::Tensor& lse, const RowLayout& lay);
void attn_bwd_cuda(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& o,
                   const at::Tensor& dout, const at::Tensor& lse, const at::Tensor& kpm,
                   const at::Tensor& am, at::Tensor& dq, at::Tensor& dkv, const RowLayout& lay);
void xprime_fwd_cuda(at::Tensor& xp, const at::Tensor& bo, const at::Tensor& lse,
                     const at::Tensor& xa, at::Tensor& cos, const RowLayout& lay);
void gate_out_fwd_cuda(const at::Tensor& xa, const at::Tensor& xp, at::Tensor& g,
                       const at::Tensor& b2, const at::Tensor& ln_w, const at::Tensor& ln_b,
                       at::Tensor& y, at::Tensor& mean, at::Tensor& rstd, at::Tensor& cos,
                       int64_t act, double eps, const RowLayout& lay);
void gate_out_bwd_cuda(const at::Tensor& dy, const at::Tensor& dcos, const at::Tensor& xa,
                       const at::Tensor& xp, const at::Tensor& g, const at::Tensor& ln_w,
                       const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& dg_pre,
                       at::Tensor& db2, at::Tensor& dxp, at::Tensor& dxa, at::Tensor& dln_w,
                       at::Tensor& dln_b, at::Tensor& dxp_colsum, int64_t act,
                       const RowLayout& lay);
void bias_relu_cuda(at::Tensor& h, const at::Tensor& b1);
void relu_bwd_sum_cuda(at::Tensor& dh, const at::Tensor& h, at::Tensor& db1);
void col_sum_cuda(const at::Tensor& x, at::Tensor& out);

}  // namespace gca
