// The cpp backend: the CPU row kernels in the device-independent orchestration, and the
// extension's GCA entry points (bound in bindings.cpp).
#include "cpu_kernels.h"
#include "gca_cpu.h"

namespace gca {
namespace {

const DeviceBackend kCpuBackend{
    "cpp", c10::DeviceType::CPU, {at::kFloat, at::kDouble},
    GCAKernels{attn_fwd_cpu, xprime_fwd_cpu, gate_out_fwd_cpu, gate_out_bwd_cpu, bias_relu_cpu,
               relu_bwd_sum_cpu, col_sum_cpu, attn_bwd_cpu}};

}  // namespace

std::vector<at::Tensor> gca_fwd_cpu(const at::Tensor& x_a, const at::Tensor& x_b,
                                    const TensorList& weights, const OptT& ln_w, const OptT& ln_b, const OptT& kpm, const OptT& am,
                                    int64_t n_heads, int64_t activation, double ln_eps) {
  return gca_forward_entry(kCpuBackend, x_a, x_b, weights, ln_w, ln_b, kpm, am, n_heads, activation, ln_eps);
}

std::vector<at::Tensor> gca_bwd_cpu(const at::Tensor& dy, const at::Tensor& dcos,
                                    const at::Tensor& x_a, const at::Tensor& x_b,
                                    const TensorList& weights, const OptT& ln_w, const OptT& ln_b, const OptT& kpm, const OptT& am,
                                    const std::vector<at::Tensor>& saved, int64_t n_heads,
                                    int64_t activation, double ln_eps) {
  return gca_backward_entry(kCpuBackend, dy, dcos, x_a, x_b, weights, ln_w, ln_b, kpm, am, saved, n_heads,
                            activation, ln_eps);
}

}  // namespace gca
