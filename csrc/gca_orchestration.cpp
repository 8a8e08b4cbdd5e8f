// Orchestration of the fused GCA forward and backward, shared by the CPU and CUDA extensions:
// the matrix products through ATen (MKL/oneDNN on the CPU, cuBLAS on CUDA) and the calls to the
// device's fused row kernels (GCAKernels), so the two backends run one sequence of products.
//
// Forward products: q = x_a Wq^T; [k | v] = x_b [Wk; Wv]^T in ONE product; o Wo^T; the gate's
// first layer as x_a W1a^T + x' W1b^T accumulated into one buffer (the concatenation
// [x_a ; x'] never exists); h W2^T. The (B, H, La, Lb) scores and probabilities are never
// stored: the backward recomputes them from q, k and the per-row logsumexp. On the CPU the
// products run on the active rows only (row_compaction.h).
#include <ATen/record_function.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "arg_checks.h"
#include "cpu_memory.h"
#include "gca_core.h"
#include "row_compaction.h"

namespace gca {
namespace {

at::Tensor opt(const OptT& t) { return t.has_value() ? *t : at::Tensor(); }

// out = a b (out overwritten). On the CPU as out = 0, then out += a b: MKL's sgemm with
// beta != 1 (at::mm_out passes beta = 0) scales the whole output first in a slower pass of its
// own.
void product_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (out.device().is_cpu()) {
    out.zero_();
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

// a b in a recycled tensor (at::mm would allocate a fresh one)
at::Tensor product(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = recycled_empty({a.size(0), b.size(1)}, a.options());
  product_into(out, a, b);
  return out;
}

// out = g^T a (g (n, m), a (n, k)): the weight gradients, sums over all n rows into a small
// (m, k). MKL runs these on about one core's worth of throughput at small m, k (a 64 x 64
// output gives two threads little to split). Here the rows are split in two halves whose products run side by side, one thread
// each (MKL runs single-threaded inside a parallel region), and are then added. The split
// depends on n alone, never on the thread count, so results stay bit-identical run to run.
constexpr int64_t kSplitSumMinRows = 1024;

void weight_grad_into(at::Tensor& out, const at::Tensor& g, const at::Tensor& a) {
  const int64_t n = g.size(0);
  if (n < kSplitSumMinRows || !out.device().is_cpu()) {
    at::mm_out(out, g.t(), a);
    return;
  }
  at::Tensor second = recycled_empty(out.sizes(), out.options());
  const int64_t h = n / 2;
  // ATen products on worker threads: they must run with the caller's state (KernelScope)
  parallel_for_as_caller(0, 2, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      at::Tensor dst = p == 0 ? out : second;
      at::mm_out(dst, g.narrow(0, p * h, p ? n - h : h).t(), a.narrow(0, p * h, p ? n - h : h));
    }
  });
  out.add_(second);
}

at::Tensor weight_grad(const at::Tensor& g, const at::Tensor& a) {
  at::Tensor out = recycled_empty({g.size(1), a.size(1)}, g.options());
  weight_grad_into(out, g, a);
  return out;
}


}  // namespace

GCAWeights GCAWeights::from_list(const char* fn, const std::vector<at::Tensor>& list,
                                 const std::optional<at::Tensor>& ln_w,
                                 const std::optional<at::Tensor>& ln_b) {
  TORCH_CHECK(list.size() == kCount, fn, ": weights must hold ", kCount,
              " tensors (wq, bq, wk, bk, wv, bv, wo, bo, w1, b1, w2, b2), got ", list.size());
  const auto opt_t = [](const std::optional<at::Tensor>& t) { return t ? *t : at::Tensor(); };
  return GCAWeights{list[0], list[1], list[2], list[3], list[4],  list[5],    list[6],
                    list[7], list[8], list[9], list[10], list[11], opt_t(ln_w), opt_t(ln_b)};
}

GCASaved GCASaved::from_list(const char* fn, const std::vector<at::Tensor>& list) {
  TORCH_CHECK(list.size() == kCount, fn, ": saved must hold the forward's ", kCount,
              " intermediates, got ", list.size());
  return GCASaved{list[0], list[1], list[2], list[3], list[4], list[5],
                  list[6], list[7], list[8], list[9], list[10]};
}

std::vector<at::Tensor> gca_forward(const DeviceBackend& be, const at::Tensor& x_a,
                                    const at::Tensor& x_b, const GCAWeights& w, const OptT& kpm,
                                    const OptT& am, const GCAConfig& cfg) {
  const KernelScope scope;  // autograd and autocast see none of the calls below
  const std::string fn_s = std::string("gca_fwd (") + be.name + ")";
  const char* fn = fn_s.c_str();
  const c10::DeviceType dev = be.device;
  const GCAKernels& K = be.kernels;
  const RowLayout lay = check_gca_args(fn, be, x_a, x_b, w, kpm, am, cfg);
  const int64_t N = lay.B * lay.La, M = lay.B * lay.Lb, d = lay.d;
  const auto opts = x_a.options();
  const auto acc_opts = opts.dtype(acc_dtype(x_a.scalar_type()));
  const at::Tensor xa = x_a.view({N, d}), xb = x_b.view({M, d});
  const Rows qr = active_query_rows(dev, opt(kpm), opt(am), lay);
  const Rows kr = active_key_rows(dev, opt(kpm), lay);

  // q, o, x', h and g hold the nq = qr.n active query rows, kv the nk = kr.n unpadded keys
  // (all rows on the dense path); the kernels reach them through the row maps of stored.
  const RowLayout stored = stored_layout(lay, dev, qr, kr);
  // the gathered input rows are saved: the backward's weight gradients need them again
  const at::Tensor xa_c = qr.gather_kept(xa);
  const at::Tensor xb_c = kr.gather_kept(xb);
  at::Tensor q = recycled_empty({qr.n, d}, opts);
  // on the CPU q is stored scaled by 1 / sqrt(dh) (RowLayout::q_prescaled): q = qs (x_a Wq^T + bq)
  const double qs = stored.q_prescaled ? 1.0 / std::sqrt(static_cast<double>(d / lay.H)) : 1.0;
  // beta = 1 with the bias pre-scaled: MKL's sgemm scales its output in a pass of its own for
  // any other beta (see product_into)
  at::addmm_out(q, qs == 1.0 ? w.bq : w.bq * qs, xa_c, w.wq.t(), 1.0, qs);
  // k and v come from the same input: one product against the stacked weights
  at::Tensor kv = recycled_empty({kr.n, 2 * d}, opts);
  at::addmm_out(kv, at::cat({w.bk, w.bv}), xb_c, at::cat({w.wk, w.wv}).t());
  at::Tensor o = recycled_empty({qr.n, d}, opts);
  // the kernel writes the rows it computes: +inf marks the others (no visible key)
  at::Tensor lse = recycled_empty({N, lay.H}, acc_opts);
  if (qr.compact()) lse.fill_(std::numeric_limits<double>::infinity());
  {
    RECORD_FUNCTION("gca::attn_fwd", std::vector<c10::IValue>());  // named in profiles
    K.attn_fwd(q, kv, opt(kpm), opt(am), o, lse, stored);
  }

  // x' = o Wo^T + bo where a key was seen, 0 elsewhere. When every stored row sees a key
  // (compact path, or no mask) the bias goes into the product and cos is formed by the gate's
  // row pass, which loads x_a and x' anyway. Dense path with keyless rows: the row kernel adds
  // the bias on the rows with a key and zeroes the rest.
  at::Tensor xp = recycled_empty({qr.n, d}, opts);
  at::Tensor cos = recycled_empty({N}, opts);
  const bool cos_in_gate = qr.stored_rows_see_keys();
  if (cos_in_gate) {
    at::addmm_out(xp, w.bo, o, w.wo.t());
  } else {
    product_into(xp, o, w.wo.t());
    RECORD_FUNCTION("gca::xprime_fwd", std::vector<c10::IValue>());  // named in profiles
    K.xprime_fwd(xp, w.bo, lse, xa, cos, stored);
  }

  // The gate only matters where x' != 0 (z = x_a + g * x'): h and g exist on the stored rows.
  at::Tensor h = recycled_empty({qr.n, lay.hidden}, opts);
  product_into(h, xa_c, w.w1.narrow(1, 0, d).t());
  h.addmm_(xp, w.w1.narrow(1, d, d).t());
  {
    RECORD_FUNCTION("gca::bias_relu", std::vector<c10::IValue>());  // named in profiles
    K.bias_relu(h, w.b1);
  }
  at::Tensor g = recycled_empty({qr.n, d}, opts);
  product_into(g, h, w.w2.t());  // + b2 in the row kernel below
  at::Tensor y = recycled_empty({N, d}, opts);
  const bool ln = w.layer_norm();
  at::Tensor mean = recycled_empty({ln ? N : 0}, acc_opts),
             rstd = recycled_empty({ln ? N : 0}, acc_opts);
  {
    RECORD_FUNCTION("gca::gate_out_fwd", std::vector<c10::IValue>());  // named in profiles
    at::Tensor cos_here = cos_in_gate ? cos : at::Tensor();
    K.gate_out_fwd(xa, xp, g, w.b2, w.ln_w, w.ln_b, y, mean, rstd, cos_here, cfg.activation,
                   cfg.ln_eps, stored);
  }
  // outputs may not alias inputs: on the dense path the "gathered" rows are x_a itself
  const auto kept = [&](const Rows& r, const at::Tensor& rows) {
    return r.compact() ? rows : at::empty({0, d}, opts);
  };
  const GCASaved saved{q, kv, o, lse, xp, h, g, mean, rstd, kept(qr, xa_c), kept(kr, xb_c)};
  std::vector<at::Tensor> out{y.view({lay.B, lay.La, d}), cos.view({lay.B, lay.La})};
  for (auto& t : saved.list()) out.push_back(t);
  return out;
}

std::vector<at::Tensor> gca_backward(const DeviceBackend& be, const at::Tensor& dy,
                                     const at::Tensor& dcos, const at::Tensor& x_a,
                                     const at::Tensor& x_b, const GCAWeights& w, const OptT& kpm,
                                     const OptT& am, const GCASaved& s, const GCAConfig& cfg) {
  const KernelScope scope;  // autograd and autocast see none of the calls below
  const std::string fn_s = std::string("gca_bwd (") + be.name + ")";
  const char* fn = fn_s.c_str();
  const c10::DeviceType dev = be.device;
  const GCAKernels& K = be.kernels;
  const RowLayout lay = check_gca_args(fn, be, x_a, x_b, w, kpm, am, cfg);
  const int64_t N = lay.B * lay.La, M = lay.B * lay.Lb, d = lay.d, hid = lay.hidden;
  const auto dt = x_a.scalar_type();
  const auto adt = acc_dtype(dt);
  const bool ln = w.layer_norm();
  const at::Tensor xa = x_a.view({N, d}), xb = x_b.view({M, d});
  const at::Tensor w1a = w.w1.narrow(1, 0, d), w1b = w.w1.narrow(1, d, d);
  // the same row sets as the forward (same masks, same function)
  const Rows qr = active_query_rows(dev, opt(kpm), opt(am), lay);
  const Rows kr = active_key_rows(dev, opt(kpm), lay);
  const RowLayout stored = stored_layout(lay, dev, qr, kr);
  check_tensor(fn, "dy", dy, dev, dt, {lay.B, lay.La, d});
  check_tensor(fn, "dcos", dcos, dev, dt, {lay.B, lay.La});
  check_tensor(fn, "q", s.q, dev, dt, {qr.n, d});
  check_tensor(fn, "kv", s.kv, dev, dt, {kr.n, 2 * d});
  check_tensor(fn, "o", s.o, dev, dt, {qr.n, d});
  check_tensor(fn, "lse", s.lse, dev, adt, {N, lay.H});
  check_tensor(fn, "xp", s.xp, dev, dt, {qr.n, d});
  check_tensor(fn, "h", s.h, dev, dt, {qr.n, hid});
  check_tensor(fn, "g", s.g, dev, dt, {qr.n, d});
  check_tensor(fn, "mean", s.mean, dev, adt, {ln ? N : 0});
  check_tensor(fn, "rstd", s.rstd, dev, adt, {ln ? N : 0});
  check_tensor(fn, "xa_rows", s.xa_rows, dev, dt, {qr.compact() ? qr.n : 0, d});
  check_tensor(fn, "xb_rows", s.xb_rows, dev, dt, {kr.compact() ? kr.n : 0, d});
  const at::Tensor& xa_c = qr.compact() ? s.xa_rows : xa;
  const at::Tensor& xb_c = kr.compact() ? s.xb_rows : xb;

  // dg_pre and dxp exist on the rows x' is stored on
  at::Tensor dg_pre = scratch(kSlotA, {qr.n, d}, x_a.options()), dxp = scratch(kSlotB, {qr.n, d}, x_a.options()),
             dxa = recycled_empty({N, d}, x_a.options());
  const auto opts = x_a.options();
  at::Tensor dln_w = at::empty({ln ? d : 0}, opts), dln_b = at::empty({ln ? d : 0}, opts),
             db2 = at::empty({d}, opts);
  // bo's gradient is the column sum of dxp = (the gate pass's part) + dh W1b. When every stored
  // row sees a key the first part is summed by the gate pass while it writes the rows and the
  // second is db1 W1b (column sums commute with the product): no pass over dxp. Otherwise the
  // dense path zeroes keyless rows of dxp after the product, so it sums dxp itself.
  at::Tensor dbo = at::empty({d}, opts);
  const bool every_row_has_key = qr.stored_rows_see_keys();
  at::Tensor dxp_colsum = every_row_has_key ? dbo : at::Tensor();
  {
    RECORD_FUNCTION("gca::gate_out_bwd", std::vector<c10::IValue>());  // named in profiles
    K.gate_out_bwd(dy.view({N, d}), dcos.view({N}), xa, s.xp, s.g, w.ln_w, s.mean, s.rstd,
                   dg_pre, db2, dxp, dxa, dln_w, dln_b, dxp_colsum, cfg.activation, stored);
  }

  // Temporaries live in the scratch slots, reused once dead (the custom op keeps every saved
  // tensor alive until it returns, so nothing is freed early: reuse keeps the peak low).
  // dg_pre is dz * x' * act': zero on the rows without a visible key, which are not stored.
  at::Tensor dw2 = weight_grad(dg_pre, s.h);
  at::Tensor dh = scratch(kSlotC, {qr.n, hid}, opts);
  product_into(dh, dg_pre, w.w2);
  at::Tensor db1 = at::empty({hid}, opts);
  {
    RECORD_FUNCTION("gca::relu_bwd_sum", std::vector<c10::IValue>());  // named in profiles
    K.relu_bwd_sum(dh, s.h, db1);  // relu': h was stored post-relu
  }
  // dW1's two column halves written in place (strided outputs), not concatenated afterwards
  at::Tensor dw1 = recycled_empty({hid, 2 * d}, opts);
  {
    at::Tensor dw1a = dw1.narrow(1, 0, d), dw1b = dw1.narrow(1, d, d);
    weight_grad_into(dw1a, dh, xa_c);
    weight_grad_into(dw1b, dh, s.xp);
  }
  at::Tensor dxa_c;  // compact path: the part of dx_a on the active rows not yet in dxa
  if (qr.compact()) {
    dxa_c = scratch(kSlotDxa, {qr.n, d}, opts);
    product_into(dxa_c, dh, w1a);
  } else {
    dxa.addmm_(dh, w1a);
  }
  dxp.addmm_(dh, w1b);
  dh.reset();
  // x' is the constant 0 on rows without a visible key: nothing flows back through them
  if (!every_row_has_key) dxp.mul_(s.lse.narrow(1, 0, 1).isfinite().to(dt));

  if (every_row_has_key) {
    dbo.addmv_(w1b.t(), db1);
  } else {
    RECORD_FUNCTION("gca::col_sum", std::vector<c10::IValue>());  // named in profiles
    K.col_sum(dxp, dbo);
  }
  at::Tensor dwo = weight_grad(dxp, s.o);
  product_into(dg_pre, dxp, w.wo);
  at::Tensor dout = dg_pre;        // dg_pre is dead: its buffer takes d(o)
  at::Tensor dq = std::move(dxp);  // dxp dies as d(o) is formed: dq takes it
  // compact: unpadded keys only; the kernels write every row (zeros for keys nobody sees)
  at::Tensor dkv = scratch(kSlotDkv, {kr.n, 2 * d}, opts);
  {
    RECORD_FUNCTION("gca::attn_bwd", std::vector<c10::IValue>());  // named in profiles
    K.attn_bwd(s.q, s.kv, s.o, dout, s.lse, opt(kpm), opt(am), dq, dkv, stored);
  }
  dout.reset();
  dg_pre.reset();

  at::Tensor dwq = weight_grad(dq, xa_c);
  at::Tensor dbq = at::empty({d}, opts);
  {
    RECORD_FUNCTION("gca::col_sum", std::vector<c10::IValue>());  // named in profiles
    K.col_sum(dq, dbq);
  }
  if (qr.compact()) {
    dxa_c.addmm_(dq, w.wq);
    qr.add_into(dxa_c, dxa);
    dxa_c.reset();
  } else {
    dxa.addmm_(dq, w.wq);
  }
  dq.reset();
  at::Tensor dwkv = weight_grad(dkv, xb_c);
  // The k and v bias gradients without a pass over dkv. Each row of p (per head) sums to 1 where
  // the query sees a key, and d(o) is 0 on the rows that see none, so the column sums of
  // dv = p^T d(o) are those of d(o) = dxp Wo: dbv = dbo Wo. Softmax ignores a constant added
  // to a row's scores, so the rows of ds sum to 0 and dbk = sum_j ds_j^T q = 0 exactly (summed
  // from dk it would be rounding noise).
  at::Tensor dbk = at::zeros({d}, opts), dbv = at::mv(w.wo.t(), dbo);
  const at::Tensor wkv = at::cat({w.wk, w.wv});
  // dense path: the product is dx_b itself (an output, so never in scratch)
  at::Tensor dxb;
  if (kr.compact()) {
    at::Tensor dxb_c = scratch(kSlotC, {kr.n, d}, opts);
    product_into(dxb_c, dkv, wkv);
    dxb = kr.scatter(dxb_c);
  } else {
    dxb = product(dkv, wkv);
  }
  // custom ops may not return aliasing outputs: the stacked k/v weight gradient is split into
  // copies
  const auto half = [&](const at::Tensor& t, int64_t i) {
    const at::Tensor part = t.narrow(0, i * d, d);
    return recycled_empty(part.sizes(), opts).copy_(part);
  };
  return {dxa.view({lay.B, lay.La, d}), dxb.view({lay.B, lay.Lb, d}), dwq, dbq,
          half(dwkv, 0), dbk, half(dwkv, 1), dbv, dwo, dbo, dw1, db1, dw2,
          db2, dln_w, dln_b};
}

std::vector<at::Tensor> gca_forward_entry(const DeviceBackend& be, const at::Tensor& x_a,
                                          const at::Tensor& x_b, const TensorList& weights, const OptT& ln_w, const OptT& ln_b,
                                          const OptT& kpm, const OptT& am, int64_t n_heads,
                                          int64_t activation, double ln_eps) {
  return gca_forward(be, x_a, x_b, GCAWeights::from_list("gca_fwd", weights, ln_w, ln_b), kpm, am,
                     GCAConfig{n_heads, activation, ln_eps});
}

std::vector<at::Tensor> gca_backward_entry(const DeviceBackend& be, const at::Tensor& dy,
                                           const at::Tensor& dcos, const at::Tensor& x_a,
                                           const at::Tensor& x_b, const TensorList& weights, const OptT& ln_w, const OptT& ln_b,
                                           const OptT& kpm, const OptT& am,
                                           const std::vector<at::Tensor>& saved, int64_t n_heads,
                                           int64_t activation, double ln_eps) {
  return gca_backward(be, dy, dcos, x_a, x_b, GCAWeights::from_list("gca_bwd", weights, ln_w, ln_b), kpm, am,
                      GCASaved::from_list("gca_bwd", saved), GCAConfig{n_heads, activation, ln_eps});
}

}  // namespace gca
