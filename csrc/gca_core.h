// The types every part of the fused GCA operator shares: the parameter bundle (GCAWeights),
// the scalar arguments (GCAConfig), the forward's saved intermediates (GCASaved), the problem's
// layout (RowLayout), the row kernels a device backend provides (GCAKernels, DeviceBackend),
// and the device-independent forward and backward (gca_orchestration.cpp) that run the
// products through ATen and these kernels between them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <optional>
#include <vector>

// x86-64 builds must run on any x86-64 CPU (no -march=native), yet the row loops want AVX2/
// AVX-512: GCC emits one clone per ISA and picks the best at load time (ifunc, glibc). The
// clones name the x86-64 micro-architecture levels, which GCC dispatches on CPU features: named
// CPUs ("arch=haswell", "arch=skylake-avx512") dispatch on the CPU model, so an AMD CPU with
// AVX-512 ran the baseline SSE2 clone.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && \
    defined(__linux__)
#define GCA_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GCA_CPU_CLONES
#endif

namespace gca {

// Denominator floor of the per-row cosine (gca_kernels.reference.COS_EPS).
constexpr double kCosEps = 1e-8;

enum Activation : int64_t { kSigmoid = 0, kTanh = 1 };

// The problem's sizes and where its rows are stored: B batch rows of La queries and Lb keys,
// width d = H heads x dh, gate width hidden; then the row maps of the CPU's compact path.
struct RowLayout {
  int64_t B, La, Lb, d, H, hidden;
  // Compact rows for the attention kernels (CPU only: null = every row, the only case the CUDA
  // kernels ever see). With qrow, q, o, dout and dq hold only the query rows qrow[0..nq)
  // (ascending full row indices b * La + i); qpos maps a full row to its compact row (-1: not
  // stored, no visible key). With kpos, kv and dkv hold only the key rows it keeps (full key
  // row b * Lb + j -> compact row; -1 only for padded keys, which are never visible).
  const int64_t* qrow = nullptr;
  int64_t nq = 0;
  const int32_t* qpos = nullptr;
  const int32_t* kpos = nullptr;
  // CPU: q holds q / sqrt(dh) (its product is scaled: alpha = 1 / sqrt(dh), the bias too), so
  // the score loops broadcast q straight into their FMAs instead of multiplying each element
  // by the scale first; dk = ds^T q then needs no scale either. false: q as the contract has it.
  bool q_prescaled = false;
};

// Row kernels a device backend provides. Masks are undefined tensors when absent; lse, mean
// and rstd are in the accumulation dtype (float32, or float64 for float64 inputs). Shapes are
// those of the dense path; with the CPU row maps of RowLayout set, q, o, dout, dq, xp, g, dg_pre and
// dxp hold only the active query rows and kv, dkv only the unpadded keys (see RowLayout).
struct GCAKernels {
  // o (N, d), lse (N, H): masked softmax(q k^T / sqrt(dh)) v per (row, head); lse = +inf marks
  // a row with no visible key (o = 0 there).
  void (*attn_fwd)(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& kpm,
                   const at::Tensor& am, at::Tensor& o, at::Tensor& lse, const RowLayout& lay);
  // In place xp = has_key ? xp + bo : 0, and cos(x_a, x'). Not called on the CPU's compact
  // path (the product adds bo there, and gate_out_fwd forms cos).
  void (*xprime_fwd)(at::Tensor& xp, const at::Tensor& bo, const at::Tensor& lse,
                     const at::Tensor& xa, at::Tensor& cos, const RowLayout& lay);
  // In place g = act(g + b2) (g holds h W2^T on entry); y = LN(x_a + g * x') (or the sum);
  // mean/rstd when LN is on; cos(x_a, x') when cos is defined (CPU compact path, where x'
  // already holds its bias and xprime_fwd is not run; undefined elsewhere).
  void (*gate_out_fwd)(const at::Tensor& xa, const at::Tensor& xp, at::Tensor& g,
                       const at::Tensor& b2, const at::Tensor& ln_w, const at::Tensor& ln_b, at::Tensor& y,
                       at::Tensor& mean, at::Tensor& rstd, at::Tensor& cos, int64_t act,
                       double ln_eps, const RowLayout& lay);
  // Backward of gate_out_fwd and of the cosine: dg_pre, dxp, dxa (N, d); db2 = the column sums
  // of dg_pre, dln_w/dln_b (d); dxp_colsum (d) = the column sums of the dxp written here, when
  // defined (CPU compact path only; undefined elsewhere).
  void (*gate_out_bwd)(const at::Tensor& dy, const at::Tensor& dcos, const at::Tensor& xa,
                       const at::Tensor& xp, const at::Tensor& g, const at::Tensor& ln_w,
                       const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& dg_pre,
                       at::Tensor& db2, at::Tensor& dxp, at::Tensor& dxa, at::Tensor& dln_w, at::Tensor& dln_b,
                       at::Tensor& dxp_colsum, int64_t act, const RowLayout& lay);
  // Bias and ReLU of the gate's hidden layer in place: h = max(h + b1, 0).
  void (*bias_relu)(at::Tensor& h, const at::Tensor& b1);
  // ReLU backward in place (dh = 0 where h, stored post-ReLU, is 0) and db1 = dh's column sums.
  void (*relu_bwd_sum)(at::Tensor& dh, const at::Tensor& h, at::Tensor& db1);
  // out (cols) = the column sums of x (rows, cols): the bias gradients.
  void (*col_sum)(const at::Tensor& x, at::Tensor& out);
  // dq (N, d) and dkv (M, 2d) from do (N, d), recomputing p from lse; every row of dq and dkv
  // is written (zeros where no key, or no query, is visible).
  void (*attn_bwd)(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& o,
                   const at::Tensor& dout, const at::Tensor& lse, const at::Tensor& kpm,
                   const at::Tensor& am, at::Tensor& dq, at::Tensor& dkv, const RowLayout& lay);
};

using OptT = std::optional<at::Tensor>;

// Every entry point of the extensions runs under this guard. The ATen calls inside are steps of
// one operator whose gradients the extension computes itself, so autograd must not see them (it
// rejects out= products of tensors that require grad while grad mode is on, which is the state
// of a custom op's body and of any thread the caller did not set up), and autocast must not
// re-cast their operands (the operator's dtype was chosen before the call).
struct KernelScope {
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
};

// at::parallel_for whose workers run with the calling thread's thread-local state (grad mode,
// excluded dispatch keys, autocast, ...). OpenMP workers start from the defaults (grad mode on,
// no key excluded), so an ATen call on a worker would not see the caller's KernelScope. Every
// parallel region that calls ATen goes through this; the others touch raw pointers only.
template <class F>
void parallel_for_as_caller(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const at::ThreadLocalState state;
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    at::ThreadLocalStateGuard guard(state);
    f(b, e);
  });
}

// The operator's parameters, named once: the C++ image of gca_kernels.GCAParams, in its order
// (wq, bq, wk, bk, wv, bv, wo, bo, w1, b1, w2, b2, then ln_w, ln_b: undefined = no LayerNorm).
struct GCAWeights {
  static constexpr size_t kCount = 12;  // the list before ln_w, ln_b
  at::Tensor wq, bq, wk, bk, wv, bv, wo, bo, w1, b1, w2, b2, ln_w, ln_b;
  bool layer_norm() const { return ln_w.defined(); }
  static GCAWeights from_list(const char* fn, const std::vector<at::Tensor>& list,
                              const std::optional<at::Tensor>& ln_w,
                              const std::optional<at::Tensor>& ln_b);
};

// The operator's scalar arguments.
struct GCAConfig {
  int64_t n_heads;
  int64_t activation;  // Activation
  double ln_eps;
};

// What the forward keeps for the backward, in this order as a list. N = B La query rows, M = B Lb
// key rows; nq and nk are the rows the products ran on (the active rows on the CPU's compact
// path, else N and M): q, o, xp, g (nq, d), h (nq, hidden), kv (nk, 2d) = [k | v], lse (N, H)
// (+inf: no visible key), mean, rstd (N, or 0 without LayerNorm; accumulation dtype), and the
// gathered rows of x_a (nq, d) and x_b (nk, d) on the compact path ((0, d) elsewhere).
struct GCASaved {
  static constexpr size_t kCount = 11;
  at::Tensor q, kv, o, lse, xp, h, g, mean, rstd, xa_rows, xb_rows;
  std::vector<at::Tensor> list() const {
    return {q, kv, o, lse, xp, h, g, mean, rstd, xa_rows, xb_rows};
  }
  static GCASaved from_list(const char* fn, const std::vector<at::Tensor>& list);
};

// One device's implementation: its name in messages, device type, dtypes and row kernels.
struct DeviceBackend {
  const char* name;  // "cpp", "cuda"
  c10::DeviceType device;
  std::vector<at::ScalarType> dtypes;
  GCAKernels kernels;
};

// Returns y (B, La, d), cos (B, La), then GCASaved::list().
std::vector<at::Tensor> gca_forward(const DeviceBackend& be, const at::Tensor& x_a,
                                    const at::Tensor& x_b, const GCAWeights& w, const OptT& kpm,
                                    const OptT& am, const GCAConfig& cfg);

// Returns dx_a, dx_b, dwq, dbq, dwk, dbk, dwv, dbv, dwo, dbo, dw1, db1, dw2, db2, dln_w, dln_b
// (the last two empty when LayerNorm is off).
std::vector<at::Tensor> gca_backward(const DeviceBackend& be, const at::Tensor& dy,
                                     const at::Tensor& dcos, const at::Tensor& x_a,
                                     const at::Tensor& x_b, const GCAWeights& w, const OptT& kpm,
                                     const OptT& am, const GCASaved& saved, const GCAConfig& cfg);

// The bound entry points' shared body: the list arguments turned into the structs above.
using TensorList = std::vector<at::Tensor>;
std::vector<at::Tensor> gca_forward_entry(const DeviceBackend& be, const at::Tensor& x_a,
                                          const at::Tensor& x_b, const TensorList& weights, const OptT& ln_w, const OptT& ln_b,
                                          const OptT& kpm, const OptT& am, int64_t n_heads,
                                          int64_t activation, double ln_eps);
std::vector<at::Tensor> gca_backward_entry(const DeviceBackend& be, const at::Tensor& dy,
                                           const at::Tensor& dcos, const at::Tensor& x_a,
                                           const at::Tensor& x_b, const TensorList& weights, const OptT& ln_w, const OptT& ln_b,
                                           const OptT& kpm, const OptT& am,
                                           const std::vector<at::Tensor>& saved, int64_t n_heads,
                                           int64_t activation, double ln_eps);

// Accumulation dtype of the saved row statistics.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace gca
