// Orchestration of the fused GCA forward and backward (see gca_core.h): argument checks,
// the matrix products through ATen, and the calls to the device's fused row kernels.
//
// Forward products: q = x_a Wq^T; [k | v] = x_b [Wk; Wv]^T in ONE product; o Wo^T; the gate's
// first layer as x_a W1a^T + x' W1b^T accumulated into one buffer (the concatenation
// [x_a ; x'] never exists); h W2^T. The (B, H, La, Lb) scores and probabilities are never
// stored: the backward recomputes them from q, k and the per-row logsumexp.
#include "gca_core.h"

#include <string>

namespace gca {
namespace {

std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + (t.dim() == 1 ? ",)" : ")");
}

std::string dtypes_str(const std::vector<at::ScalarType>& dts) {
  std::string s;
  for (size_t i = 0; i < dts.size(); ++i) s += (i ? "/" : "") + std::string(c10::toString(dts[i]));
  return s;
}

void check_tensor(const char* fn, const char* name, const at::Tensor& t, c10::DeviceType dev,
                  at::ScalarType dtype, std::vector<int64_t> shape) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " is undefined");
  TORCH_CHECK(t.device().type() == dev, fn, ": ", name, " must be a ", c10::DeviceTypeName(dev),
              " tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, fn, ": ", name, " has dtype ", t.scalar_type(),
              " but x_a has dtype ", dtype, "; every tensor must share one dtype");
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), fn, ": ", name, " must have shape ",
              c10::IntArrayRef(shape), ", got ", shape_str(t));
  TORCH_CHECK(t.is_contiguous(), fn, ": ", name, " of shape ", shape_str(t),
              " must be contiguous (call .contiguous() first)");
}

void check_mask(const char* fn, const char* name, const at::Tensor& m, const at::Tensor& x_a) {
  TORCH_CHECK(m.scalar_type() == at::kBool, fn, ": ", name, " must be a bool tensor, got ",
              m.scalar_type());
  TORCH_CHECK(m.device() == x_a.device(), fn, ": ", name, " is on ", m.device(),
              " but x_a is on ", x_a.device());
  TORCH_CHECK(m.is_contiguous(), fn, ": ", name, " of shape ", shape_str(m), " must be contiguous");
}

at::Tensor opt(const OptT& t) { return t.has_value() ? *t : at::Tensor(); }

}  // namespace

Dims check_gca_args(const char* fn, c10::DeviceType dev, const std::vector<at::ScalarType>& dtypes,
                    const at::Tensor& x_a, const at::Tensor& x_b, const at::Tensor& wq,
                    const at::Tensor& bq, const at::Tensor& wk, const at::Tensor& bk,
                    const at::Tensor& wv, const at::Tensor& bv, const at::Tensor& wo,
                    const at::Tensor& bo, const at::Tensor& w1, const at::Tensor& b1,
                    const at::Tensor& w2, const at::Tensor& b2, const OptT& ln_w,
                    const OptT& ln_b, const OptT& kpm, const OptT& am, int64_t n_heads,
                    int64_t act) {
  TORCH_CHECK(x_a.defined() && x_a.dim() == 3, fn, ": x_a must be (B, La, d), got ",
              x_a.defined() ? shape_str(x_a) : std::string("undefined"));
  TORCH_CHECK(x_a.device().type() == dev, fn, ": x_a must be a ", c10::DeviceTypeName(dev),
              " tensor, got one on ", x_a.device());
  const auto dt = x_a.scalar_type();
  bool ok = false;
  for (auto t : dtypes) ok = ok || t == dt;
  TORCH_CHECK(ok, fn, ": x_a has dtype ", dt, "; this backend supports ", dtypes_str(dtypes));
  TORCH_CHECK(x_b.defined() && x_b.dim() == 3, fn, ": x_b must be (B, Lb, d), got ",
              x_b.defined() ? shape_str(x_b) : std::string("undefined"));
  const int64_t B = x_a.size(0), La = x_a.size(1), d = x_a.size(2), Lb = x_b.size(1);
  TORCH_CHECK(B >= 1 && La >= 1 && Lb >= 1 && d >= 1, fn, ": x_a ", shape_str(x_a), " and x_b ",
              shape_str(x_b), " must have B, La, Lb, d >= 1");
  TORCH_CHECK(n_heads >= 1 && d % n_heads == 0, fn, ": n_heads=", n_heads, " must divide d=", d);
  TORCH_CHECK(act == kSigmoid || act == kTanh, fn, ": activation code must be 0 (sigmoid) or 1 (tanh), got ", act);
  TORCH_CHECK(w1.defined() && w1.dim() == 2, fn, ": w1 must be (gate_hidden, 2d), got ",
              w1.defined() ? shape_str(w1) : std::string("undefined"));
  const int64_t hid = w1.size(0);
  check_tensor(fn, "x_a", x_a, dev, dt, {B, La, d});
  check_tensor(fn, "x_b", x_b, dev, dt, {B, Lb, d});
  check_tensor(fn, "wq", wq, dev, dt, {d, d});
  check_tensor(fn, "bq", bq, dev, dt, {d});
  check_tensor(fn, "wk", wk, dev, dt, {d, d});
  check_tensor(fn, "bk", bk, dev, dt, {d});
  check_tensor(fn, "wv", wv, dev, dt, {d, d});
  check_tensor(fn, "bv", bv, dev, dt, {d});
  check_tensor(fn, "wo", wo, dev, dt, {d, d});
  check_tensor(fn, "bo", bo, dev, dt, {d});
  check_tensor(fn, "w1", w1, dev, dt, {hid, 2 * d});
  check_tensor(fn, "b1", b1, dev, dt, {hid});
  check_tensor(fn, "w2", w2, dev, dt, {d, hid});
  check_tensor(fn, "b2", b2, dev, dt, {d});
  TORCH_CHECK(ln_w.has_value() == ln_b.has_value(), fn,
              ": ln_w and ln_b must both be given (LayerNorm on) or both be None");
  if (ln_w.has_value()) {
    check_tensor(fn, "ln_w", *ln_w, dev, dt, {d});
    check_tensor(fn, "ln_b", *ln_b, dev, dt, {d});
  }
  if (kpm.has_value()) {
    check_mask(fn, "key_padding_mask", *kpm, x_a);
    TORCH_CHECK(kpm->sizes() == at::IntArrayRef({B, Lb}), fn,
                ": key_padding_mask must have shape (B, Lb) = (", B, ", ", Lb, "), got ", shape_str(*kpm));
  }
  if (am.has_value()) {
    check_mask(fn, "attn_mask", *am, x_a);
    TORCH_CHECK(am->dim() == 3 && (am->size(0) == 1 || am->size(0) == B) && am->size(1) == La &&
                    am->size(2) == Lb,
                fn, ": attn_mask must have shape (1, La, Lb) or (B, La, Lb) with B=", B, ", La=", La,
                ", Lb=", Lb, ", got ", shape_str(*am));
  }
  return Dims{B, La, Lb, d, n_heads, hid};
}

int64_t check_cos_args(const char* fn, c10::DeviceType dev, const std::vector<at::ScalarType>& dtypes,
                       const at::Tensor& x, const at::Tensor& y, const OptT& mask) {
  TORCH_CHECK(x.defined() && x.dim() == 2, fn, ": x must be (rows, d), got ",
              x.defined() ? shape_str(x) : std::string("undefined"));
  TORCH_CHECK(x.device().type() == dev, fn, ": x must be a ", c10::DeviceTypeName(dev),
              " tensor, got one on ", x.device());
  bool ok = false;
  for (auto t : dtypes) ok = ok || t == x.scalar_type();
  TORCH_CHECK(ok, fn, ": x has dtype ", x.scalar_type(), "; this backend supports ", dtypes_str(dtypes));
  TORCH_CHECK(x.size(1) >= 1, fn, ": x must have d >= 1, got ", shape_str(x));
  check_tensor(fn, "x", x, dev, x.scalar_type(), {x.size(0), x.size(1)});
  check_tensor(fn, "y", y, dev, x.scalar_type(), {x.size(0), x.size(1)});
  if (mask.has_value()) {
    check_mask(fn, "mask", *mask, x);
    TORCH_CHECK(mask->sizes() == at::IntArrayRef({x.size(0)}), fn, ": mask must have shape (rows,) = (",
                x.size(0), ",), got ", shape_str(*mask));
  }
  return x.size(0);
}

std::vector<at::Tensor> gca_forward(const GCAKernels& K, const char* fn, c10::DeviceType dev,
                                    const std::vector<at::ScalarType>& dtypes,
                                    const at::Tensor& x_a, const at::Tensor& x_b,
                                    const at::Tensor& wq, const at::Tensor& bq,
                                    const at::Tensor& wk, const at::Tensor& bk,
                                    const at::Tensor& wv, const at::Tensor& bv,
                                    const at::Tensor& wo, const at::Tensor& bo,
                                    const at::Tensor& w1, const at::Tensor& b1,
                                    const at::Tensor& w2, const at::Tensor& b2,
                                    const OptT& ln_w, const OptT& ln_b, const OptT& kpm,
                                    const OptT& am, int64_t n_heads, int64_t act, double ln_eps) {
  const Dims dm = check_gca_args(fn, dev, dtypes, x_a, x_b, wq, bq, wk, bk, wv, bv, wo, bo, w1,
                                 b1, w2, b2, ln_w, ln_b, kpm, am, n_heads, act);
  const int64_t N = dm.B * dm.La, M = dm.B * dm.Lb, d = dm.d;
  const auto opts = x_a.options();
  const auto acc_opts = opts.dtype(acc_dtype(x_a.scalar_type()));
  const at::Tensor xa = x_a.view({N, d}), xb = x_b.view({M, d});

  at::Tensor q = at::addmm(bq, xa, wq.t());
  // k and v come from the same input: one product against the stacked weights
  at::Tensor kv = at::addmm(at::cat({bk, bv}), xb, at::cat({wk, wv}).t());
  at::Tensor o = at::empty({N, d}, opts);
  at::Tensor lse = at::empty({N, dm.H}, acc_opts);
  K.attn_fwd(q, kv, opt(kpm), opt(am), o, lse, dm);

  at::Tensor xp = at::mm(o, wo.t());  // bias added by the row kernel, only where a key was seen
  at::Tensor cos = at::empty({N}, opts);
  K.xprime_fwd(xp, bo, lse, xa, cos, dm);

  at::Tensor h = at::addmm(b1, xa, w1.narrow(1, 0, d).t());
  h.addmm_(xp, w1.narrow(1, d, d).t());
  h.relu_();
  at::Tensor g = at::addmm(b2, h, w2.t());
  at::Tensor y = at::empty({N, d}, opts);
  const bool ln = ln_w.has_value();
  at::Tensor mean = at::empty({ln ? N : 0}, acc_opts), rstd = at::empty({ln ? N : 0}, acc_opts);
  K.gate_out_fwd(xa, xp, g, opt(ln_w), opt(ln_b), y, mean, rstd, act, ln_eps, dm);
  return {y.view({dm.B, dm.La, d}), cos.view({dm.B, dm.La}), q, kv, o, lse, xp, h, g, mean, rstd};
}

std::vector<at::Tensor> gca_backward(
    const GCAKernels& K, const char* fn, c10::DeviceType dev,
    const std::vector<at::ScalarType>& dtypes, const at::Tensor& dy, const at::Tensor& dcos,
    const at::Tensor& x_a, const at::Tensor& x_b, const at::Tensor& wq, const at::Tensor& bq,
    const at::Tensor& wk, const at::Tensor& bk, const at::Tensor& wv, const at::Tensor& bv,
    const at::Tensor& wo, const at::Tensor& bo, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, const OptT& ln_w, const OptT& ln_b,
    const OptT& kpm, const OptT& am, const at::Tensor& q, const at::Tensor& kv,
    const at::Tensor& o, const at::Tensor& lse, const at::Tensor& xp, const at::Tensor& h,
    const at::Tensor& g, const at::Tensor& mean, const at::Tensor& rstd, int64_t n_heads,
    int64_t act, double ln_eps) {
  const Dims dm = check_gca_args(fn, dev, dtypes, x_a, x_b, wq, bq, wk, bk, wv, bv, wo, bo, w1,
                                 b1, w2, b2, ln_w, ln_b, kpm, am, n_heads, act);
  const int64_t N = dm.B * dm.La, M = dm.B * dm.Lb, d = dm.d, hid = dm.hidden;
  const auto dt = x_a.scalar_type();
  const auto adt = acc_dtype(dt);
  const bool ln = ln_w.has_value();
  check_tensor(fn, "dy", dy, dev, dt, {dm.B, dm.La, d});
  check_tensor(fn, "dcos", dcos, dev, dt, {dm.B, dm.La});
  check_tensor(fn, "q", q, dev, dt, {N, d});
  check_tensor(fn, "kv", kv, dev, dt, {M, 2 * d});
  check_tensor(fn, "o", o, dev, dt, {N, d});
  check_tensor(fn, "lse", lse, dev, adt, {N, dm.H});
  check_tensor(fn, "xp", xp, dev, dt, {N, d});
  check_tensor(fn, "h", h, dev, dt, {N, hid});
  check_tensor(fn, "g", g, dev, dt, {N, d});
  check_tensor(fn, "mean", mean, dev, adt, {ln ? N : 0});
  check_tensor(fn, "rstd", rstd, dev, adt, {ln ? N : 0});

  const auto opts = x_a.options();
  const at::Tensor xa = x_a.view({N, d}), xb = x_b.view({M, d});
  const at::Tensor w1a = w1.narrow(1, 0, d), w1b = w1.narrow(1, d, d);

  at::Tensor dg_pre = at::empty({N, d}, opts), dxp = at::empty({N, d}, opts),
             dxa = at::empty({N, d}, opts);
  at::Tensor dln_w = at::empty({ln ? d : 0}, opts), dln_b = at::empty({ln ? d : 0}, opts);
  K.gate_out_bwd(dy.view({N, d}), dcos.view({N}), xa, xp, g, opt(ln_w), mean, rstd, dg_pre, dxp,
                 dxa, dln_w, dln_b, act, dm);

  // Buffers are reused once dead (the custom op keeps every saved tensor alive until it
  // returns, so unlike eager autograd nothing is freed early: reuse keeps the peak below eager's).
  at::Tensor dw2 = dg_pre.t().mm(h);
  at::Tensor db2 = dg_pre.sum(0);
  at::Tensor dh = dg_pre.mm(w2);
  at::threshold_backward_out(dh, dh, h, 0);  // relu': h was stored post-relu
  at::Tensor db1 = dh.sum(0);
  at::Tensor dw1 = at::cat({dh.t().mm(xa), dh.t().mm(xp)}, 1);
  dxa.addmm_(dh, w1a);
  dxp.addmm_(dh, w1b);
  dh.reset();
  // x' is the constant 0 on rows without a visible key: nothing flows back through them
  dxp.mul_(lse.narrow(1, 0, 1).isfinite().to(dt));

  at::Tensor dbo = dxp.sum(0);
  at::Tensor dwo = dxp.t().mm(o);
  at::Tensor dout = at::mm_out(dg_pre, dxp, wo);  // dg_pre is dead: its buffer takes d(o)
  at::Tensor dq = std::move(dxp);                  // dxp dies as d(o) is formed: dq takes it
  at::Tensor dkv = at::zeros({M, 2 * d}, opts);
  K.attn_bwd(q, kv, o, dout, lse, opt(kpm), opt(am), dq, dkv, dm);
  dout.reset();
  dg_pre.reset();

  at::Tensor dwq = dq.t().mm(xa);
  at::Tensor dbq = dq.sum(0);
  dxa.addmm_(dq, wq);
  dq.reset();
  at::Tensor dwkv = dkv.t().mm(xb);
  at::Tensor dbkv = dkv.sum(0);
  at::Tensor dxb = dkv.mm(at::cat({wk, wv}));
  // custom ops may not return aliasing outputs: split the stacked k/v gradients into copies
  return {dxa.view({dm.B, dm.La, d}), dxb.view({dm.B, dm.Lb, d}), dwq, dbq,
          dwkv.narrow(0, 0, d).clone(), dbkv.narrow(0, 0, d).clone(),
          dwkv.narrow(0, d, d).clone(), dbkv.narrow(0, d, d).clone(), dwo, dbo, dw1, db1, dw2,
          db2, dln_w, dln_b};
}

}  // namespace gca
