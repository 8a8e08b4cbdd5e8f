// The cuda backend, the fallback on GPUs where Triton is missing: the CUDA kernels
// (attention_cuda.cu, row_epilogue_cuda.cu) in the device-independent orchestration
// (gca_orchestration.cpp, products on cuBLAS through ATen), and the extension's GCA entry
// points (bound in bindings_cuda.cpp).
#include "cuda_common.cuh"
#include "cuda_kernels.h"
#include "gca_cuda.h"

namespace gca {
namespace {

const DeviceBackend kCudaBackend{
    "cuda", c10::DeviceType::CUDA, {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf},
    GCAKernels{attn_fwd_cuda, xprime_fwd_cuda, gate_out_fwd_cuda, gate_out_bwd_cuda,
               bias_relu_cuda, relu_bwd_sum_cuda, col_sum_cuda, attn_bwd_cuda}};

}  // namespace

std::vector<at::Tensor> gca_fwd_cuda(const at::Tensor& x_a, const at::Tensor& x_b,
                                     const TensorList& weights, const OptT& ln_w, const OptT& ln_b, const OptT& kpm, const OptT& am,
                                     int64_t n_heads, int64_t activation, double ln_eps) {
  TORCH_CHECK(x_a.is_cuda(), "gca_fwd (cuda): x_a must be a CUDA tensor, got one on ", x_a.device());
  const c10::cuda::CUDAGuard guard(x_a.device());
  return gca_forward_entry(kCudaBackend, x_a, x_b, weights, ln_w, ln_b, kpm, am, n_heads, activation, ln_eps);
}

std::vector<at::Tensor> gca_bwd_cuda(const at::Tensor& dy, const at::Tensor& dcos,
                                     const at::Tensor& x_a, const at::Tensor& x_b,
                                     const TensorList& weights, const OptT& ln_w, const OptT& ln_b, const OptT& kpm, const OptT& am,
                                     const std::vector<at::Tensor>& saved, int64_t n_heads,
                                     int64_t activation, double ln_eps) {
  TORCH_CHECK(x_a.is_cuda(), "gca_bwd (cuda): x_a must be a CUDA tensor, got one on ", x_a.device());
  const c10::cuda::CUDAGuard guard(x_a.device());
  return gca_backward_entry(kCudaBackend, dy, dcos, x_a, x_b, weights, ln_w, ln_b, kpm, am, saved, n_heads,
                            activation, ln_eps);
}

}  // namespace gca
