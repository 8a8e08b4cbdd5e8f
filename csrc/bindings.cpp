// Python bindings of the CPU extension gca_kernels._C. gca_kernels/ops/extension_ops.py wraps
// these in torch.library custom ops; call them through gca_kernels, not directly.
#include <torch/extension.h>

#include "cpu_memory.h"
#include "gca_cpu.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gca_kernels C++ (CPU) backend: fused GCA and cosine-alignment, ATen + OpenMP";
  m.def("gca_fwd", &gca::gca_fwd_cpu,
        "GCA forward (x_a, x_b, weights, ln_w, ln_b, key_padding_mask, attn_mask, n_heads, activation, ln_eps): "
        "[y, cos, *saved]");
  m.def("gca_bwd", &gca::gca_bwd_cpu,
        "GCA backward (dy, dcos, x_a, x_b, weights, ln_w, ln_b, key_padding_mask, attn_mask, saved, n_heads, "
        "activation, ln_eps): the gradients of x_a, x_b, the 12 weights/biases and ln_w/ln_b");
  m.def("cos_fwd", &gca::cos_fwd_cpu, "cosine alignment forward (0-dim)");
  m.def("cos_bwd", &gca::cos_bwd_cpu, "cosine alignment backward: (dx, dy)");
  m.def("workspace_bytes", &gca::workspace_bytes,
        "bytes of scratch memory the calling thread keeps between calls");
  m.def("release_workspace", &gca::release_workspace, "free the calling thread's scratch memory");
}
