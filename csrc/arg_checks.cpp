// Argument checks of the compiled entry points (see arg_checks.h).
#include "arg_checks.h"

namespace gca {

std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + (t.dim() == 1 ? ",)" : ")");
}

namespace {

std::string dtypes_str(const std::vector<at::ScalarType>& dts) {
  std::string s;
  for (size_t i = 0; i < dts.size(); ++i) s += (i ? "/" : "") + std::string(c10::toString(dts[i]));
  return s;
}

}  // namespace

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

namespace {

void check_mask(const char* fn, const char* name, const at::Tensor& m, const at::Tensor& x_a) {
  TORCH_CHECK(m.scalar_type() == at::kBool, fn, ": ", name, " must be a bool tensor, got ",
              m.scalar_type());
  TORCH_CHECK(m.device() == x_a.device(), fn, ": ", name, " is on ", m.device(),
              " but x_a is on ", x_a.device());
  TORCH_CHECK(m.is_contiguous(), fn, ": ", name, " of shape ", shape_str(m), " must be contiguous");
}

}  // namespace

RowLayout check_gca_args(const char* fn, const DeviceBackend& be, const at::Tensor& x_a,
                    const at::Tensor& x_b, const GCAWeights& w, const OptT& kpm, const OptT& am,
                    const GCAConfig& cfg) {
  const c10::DeviceType dev = be.device;
  const std::vector<at::ScalarType>& dtypes = be.dtypes;
  const int64_t n_heads = cfg.n_heads, act = cfg.activation;
  const at::Tensor &wq = w.wq, &bq = w.bq, &wk = w.wk, &bk = w.bk, &wv = w.wv, &bv = w.bv,
                   &wo = w.wo, &bo = w.bo, &w1 = w.w1, &b1 = w.b1, &w2 = w.w2, &b2 = w.b2;
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
  TORCH_CHECK(w.ln_w.defined() == w.ln_b.defined(), fn,
              ": ln_w and ln_b must both be given (LayerNorm on) or both be None");
  if (w.layer_norm()) {
    check_tensor(fn, "ln_w", w.ln_w, dev, dt, {d});
    check_tensor(fn, "ln_b", w.ln_b, dev, dt, {d});
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
  return RowLayout{B, La, Lb, d, n_heads, hid};
}

int64_t check_cos_args(const char* fn, c10::DeviceType dev, const std::vector<at::ScalarType>& dtypes,
                       const at::Tensor& x, const at::Tensor& y, const OptT& mask) {
  // rows of d features with any leading shape (flattened here, not by a reshape per call in
  // Python)
  TORCH_CHECK(x.defined() && x.dim() >= 1, fn, ": x must be (..., d), got ",
              x.defined() ? shape_str(x) : std::string("undefined"));
  TORCH_CHECK(x.device().type() == dev, fn, ": x must be a ", c10::DeviceTypeName(dev),
              " tensor, got one on ", x.device());
  bool ok = false;
  for (auto t : dtypes) ok = ok || t == x.scalar_type();
  TORCH_CHECK(ok, fn, ": x has dtype ", x.scalar_type(), "; this backend supports ", dtypes_str(dtypes));
  TORCH_CHECK(x.size(-1) >= 1, fn, ": x must have d >= 1, got ", shape_str(x));
  check_tensor(fn, "x", x, dev, x.scalar_type(), x.sizes().vec());
  check_tensor(fn, "y", y, dev, x.scalar_type(), x.sizes().vec());
  if (mask.has_value()) {
    check_mask(fn, "mask", *mask, x);
    TORCH_CHECK(mask->sizes() == x.sizes().slice(0, x.dim() - 1), fn,
                ": mask must have x's shape without its last dimension, ",
                c10::IntArrayRef(x.sizes().slice(0, x.dim() - 1)), ", got ", shape_str(*mask));
  }
  return x.numel() / x.size(-1);
}

}  // namespace gca
