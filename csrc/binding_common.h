// saep-kernels torch binding: argument checks and the translation of tensors into the
// kernels' parameter structs, shared by the CPU and CUDA registrations.
//
// The ops are public (torch.ops.saep_C.*), so everything a kernel relies on is checked here
// again, with an error instead of a crash: shapes, dtypes, devices, the layer count.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "dwconv_pool.h"

namespace saep {
namespace binding {

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kDouble: return DType::F64;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK(false, "saep: hidden_states must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
  }
  return DType::F32;
}

inline at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The layers as the kernels read them: in place when the channel stride is 1, else a
// contiguous copy (kept alive in `storage`).
struct Layers {
  std::vector<at::Tensor> storage;
  LayerPtrs ptrs{};
};

inline Geometry check_geometry(const std::vector<at::Tensor>& xs, const at::Tensor& weight,
                               int64_t height, int64_t width, int64_t prefix, bool residual,
                               int64_t pool) {
  TORCH_CHECK(!xs.empty(), "saep: hidden_states must hold at least one tensor");
  TORCH_CHECK(int64_t(xs.size()) <= kMaxLayers, "saep: the compiled kernels take at most ",
              kMaxLayers, " layers, got ", xs.size());
  const at::Tensor& x0 = xs[0];
  TORCH_CHECK(x0.dim() == 3, "saep: hidden_states[0] must be [B, T, C], got ", x0.sizes());
  for (size_t i = 0; i < xs.size(); ++i) {
    TORCH_CHECK(xs[i].sizes() == x0.sizes(), "saep: hidden_states[", i, "] has shape ",
                xs[i].sizes(), ", hidden_states[0] has ", x0.sizes());
    TORCH_CHECK(xs[i].scalar_type() == x0.scalar_type(), "saep: hidden_states[", i, "] is ",
                xs[i].scalar_type(), ", hidden_states[0] is ", x0.scalar_type());
    TORCH_CHECK(xs[i].device() == x0.device(), "saep: hidden_states[", i, "] is on ",
                xs[i].device(), ", hidden_states[0] on ", x0.device());
  }
  TORCH_CHECK(height > 0 && width > 0, "saep: grid must be positive, got ", height, "x", width);
  TORCH_CHECK(prefix >= 0 && prefix + height * width == x0.size(1), "saep: T = ", x0.size(1),
              " tokens do not hold num_prefix_tokens + H*W = ", prefix, " + ", height, "*",
              width);
  const int64_t kc = int64_t(xs.size()) * x0.size(2);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == kc && weight.size(1) == 1 &&
                  weight.size(2) == weight.size(3),
              "saep: weight must be [K*C, 1, k, k] with K*C = ", kc, ", got ", weight.sizes());
  const int64_t k = weight.size(2);
  TORCH_CHECK(k == 1 || k == 3 || k == 5 || k == 7, "saep: kernel size must be 1, 3, 5 or 7, got ", k);
  TORCH_CHECK(weight.device() == x0.device(), "saep: weight is on ", weight.device(),
              ", hidden_states on ", x0.device());
  TORCH_CHECK(pool == 0 || pool == 1, "saep: pool must be 0 (avg) or 1 (max), got ", pool);
  Geometry g;
  g.batch = x0.size(0);
  g.channels = x0.size(2);
  g.height = height;
  g.width = width;
  g.prefix = prefix;
  g.num_layers = int32_t(xs.size());
  g.ksize = int32_t(k);
  g.residual = residual;
  g.pool = pool == 1 ? Pool::Max : Pool::Avg;
  g.dtype = dtype_of(x0);
  return g;
}

inline Layers layers_of(const std::vector<at::Tensor>& xs) {
  Layers out;
  for (size_t i = 0; i < xs.size(); ++i) {
    at::Tensor x = (xs[i].stride(2) == 1 || xs[i].size(2) == 1) ? xs[i] : xs[i].contiguous();
    out.ptrs.data[i] = x.data_ptr();
    out.ptrs.stride_b[i] = x.stride(0);
    out.ptrs.stride_t[i] = x.stride(1);
    out.storage.push_back(std::move(x));
  }
  return out;
}

// Weights in the compute type, tap-major and channel-contiguous: [k*k, K*C].
inline at::Tensor kernel_weight(const at::Tensor& weight, const at::Tensor& x0) {
  const int64_t kc = weight.size(0), taps = weight.size(2) * weight.size(3);
  return weight.to(acc_type(x0)).reshape({kc, taps}).t().contiguous();
}

inline at::Tensor kernel_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& x0,
                              int64_t kc) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == kc, "saep: bias must be [K*C] = [", kc,
              "], got ", bias->sizes());
  TORCH_CHECK(bias->device() == x0.device(), "saep: bias is on ", bias->device(),
              ", hidden_states on ", x0.device());
  return bias->to(acc_type(x0)).contiguous();
}

// Forward: the checked parameters and the tensors they point into (kept alive here).
struct FwdCall {
  FwdParams p{};
  at::Tensor out, argmax;
  Layers layers;
  at::Tensor weight, bias;
};

inline FwdCall prepare_fwd(const std::vector<at::Tensor>& xs, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, int64_t height, int64_t width,
                           int64_t prefix, bool residual, int64_t pool, bool save_argmax) {
  FwdCall call;
  FwdParams& p = call.p;
  p.g = check_geometry(xs, weight, height, width, prefix, residual, pool);
  const at::Tensor& x0 = xs[0];
  call.layers = layers_of(xs);
  p.x = call.layers.ptrs;
  call.weight = kernel_weight(weight, x0);
  call.bias = kernel_bias(bias, x0, p.g.kc());
  p.weight = call.weight.data_ptr();
  p.bias = call.bias.defined() ? call.bias.data_ptr() : nullptr;
  call.out = at::empty({p.g.batch, p.g.windows(), p.g.kc()}, x0.options());
  const bool store_argmax = save_argmax && p.g.pool == Pool::Max;
  call.argmax = store_argmax ? at::empty({p.g.batch, p.g.windows(), p.g.kc()}, x0.options().dtype(at::kByte))
                             : at::empty({0}, x0.options().dtype(at::kByte));
  p.out = call.out.data_ptr();
  p.argmax = store_argmax ? call.argmax.data_ptr<uint8_t>() : nullptr;
  return call;
}

struct BwdCall {
  BwdParams p{};
  std::vector<at::Tensor> grad_x;
  at::Tensor grad_w_part, grad_b_part;
  Layers layers;
  at::Tensor weight, grad_out;
  int64_t ksize = 0;
};

inline BwdCall prepare_bwd(const at::Tensor& grad_out, const std::vector<at::Tensor>& xs,
                           const at::Tensor& weight, const at::Tensor& argmax, int64_t height,
                           int64_t width, int64_t prefix, bool residual, int64_t pool,
                           bool need_x, bool need_w, bool need_b,
                           int64_t (*num_parts_of)(const Geometry&)) {
  BwdCall call;
  BwdParams& p = call.p;
  p.g = check_geometry(xs, weight, height, width, prefix, residual, pool);
  const at::Tensor& x0 = xs[0];
  const Geometry& g = p.g;
  const int64_t num_parts = num_parts_of(g);  // rows of the weight/bias partial sums
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == g.batch &&
                  grad_out.size(1) == g.windows() && grad_out.size(2) == g.kc(),
              "saep: grad_out must be [", g.batch, ", ", g.windows(), ", ", g.kc(), "], got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x0.scalar_type() && grad_out.device() == x0.device(),
              "saep: grad_out must match hidden_states in dtype and device");
  if (g.pool == Pool::Max) {
    TORCH_CHECK(argmax.scalar_type() == at::kByte && argmax.device() == x0.device() &&
                    argmax.dim() == 3 && argmax.size(0) == g.batch &&
                    argmax.size(1) == g.windows() && argmax.size(2) == g.kc(),
                "saep: max-pool backward needs the uint8 argmax [", g.batch, ", ", g.windows(),
                ", ", g.kc(), "] saved by the forward, got ", argmax.sizes());
  }
  call.ksize = weight.size(2);
  call.layers = layers_of(xs);
  p.x = call.layers.ptrs;
  call.weight = kernel_weight(weight, x0);
  p.weight = call.weight.data_ptr();
  call.grad_out = grad_out.stride(2) == 1 ? grad_out : grad_out.contiguous();
  p.grad_out = call.grad_out.data_ptr();
  p.gy_stride_b = call.grad_out.stride(0);
  p.gy_stride_t = call.grad_out.stride(1);
  if (g.pool == Pool::Max) {
    TORCH_CHECK(argmax.is_contiguous(), "saep: argmax must be contiguous");
    p.argmax = argmax.data_ptr<uint8_t>();
  }
  if (need_x) {
    for (size_t i = 0; i < xs.size(); ++i) {
      at::Tensor gx = at::empty({g.batch, x0.size(1), g.channels}, x0.options());
      if (g.prefix > 0) gx.narrow(1, 0, g.prefix).zero_();
      p.grad_x[i] = gx.data_ptr();
      call.grad_x.push_back(std::move(gx));
    }
  }
  const at::TensorOptions acc = x0.options().dtype(acc_type(x0));
  if (need_w) {
    call.grad_w_part = at::empty({num_parts, call.ksize * call.ksize, g.kc()}, acc);
    p.grad_w_part = call.grad_w_part.data_ptr();
  }
  if (need_b) {
    call.grad_b_part = at::empty({num_parts, g.kc()}, acc);
    p.grad_b_part = call.grad_b_part.data_ptr();
  }
  return call;
}

// (grad_xs, grad_w [K*C, 1, k, k] or empty, grad_b [K*C] or empty), summing the partials in a
// fixed order.
inline std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> finish_bwd(BwdCall& call) {
  const at::Tensor& w = call.weight;
  at::Tensor gw = call.grad_w_part.defined()
                      ? call.grad_w_part.sum(0).t().reshape({call.p.g.kc(), 1, call.ksize, call.ksize}).contiguous()
                      : at::empty({0}, w.options());
  at::Tensor gb = call.grad_b_part.defined() ? call.grad_b_part.sum(0) : at::empty({0}, w.options());
  return {call.grad_x, gw, gb};
}

}  // namespace binding
}  // namespace saep
