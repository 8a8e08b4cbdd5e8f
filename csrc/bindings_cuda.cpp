// Python bindings of the CUDA extension gca_kernels._C_cuda. gca_kernels/ops/extension_ops.py wraps
// these in torch.library custom ops; call them through gca_kernels, not directly.
#include <torch/extension.h>

#include "gca_cuda.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gca_kernels CUDA backend: fused GCA and cosine-alignment, cuBLAS + CUDA row kernels";
  m.def("gca_fwd", &gca::gca_fwd_cuda,
        "GCA forward (x_a, x_b, weights, ln_w, ln_b, key_padding_mask, attn_mask, n_heads, activation, ln_eps): "
        "[y, cos, *saved]");
  m.def("gca_bwd", &gca::gca_bwd_cuda,
        "GCA backward (dy, dcos, x_a, x_b, weights, ln_w, ln_b, key_padding_mask, attn_mask, saved, n_heads, "
        "activation, ln_eps): the gradients of x_a, x_b, the 12 weights/biases and ln_w/ln_b");
  m.def("cos_fwd", &gca::cos_fwd_cuda, "cosine alignment forward (0-dim)");
  m.def("cos_bwd", &gca::cos_bwd_cuda, "cosine alignment backward: (dx, dy)");
}
