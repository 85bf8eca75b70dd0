// saep-kernels torch binding: the saep_C ops' kernels for any device, written once.
//
// The ops (schemas in binding.cpp) take what the Python side of the fused backends hands every
// backend's kernels (saep_kernels/backends/fused.py): layers with channel stride 1, the
// weight as [k*k, K*C] and the bias in the compute type, outputs it allocated. They are public
// (torch.ops.saep_C.*), so everything a kernel relies on is checked here again, with an error
// instead of a crash: shapes, dtypes, devices, strides, the layer count. `Kernels` is the
// device's launcher (CpuKernels in binding.cpp, CudaKernels in binding_cuda.cpp).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "fused_aggregate.h"

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

inline at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The kernels read the channels of a token as one contiguous run.
inline bool channel_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 || t.size(-1) == 1; }

// `t` has the given sizes, dtype and device (and, when asked, is contiguous).
inline void check_tensor(const at::Tensor& t, const char* name, at::IntArrayRef sizes,
                         at::ScalarType dtype, const at::Device& device, bool contiguous) {
  TORCH_CHECK(t.sizes() == sizes, "saep: ", name, " must be ", sizes, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "saep: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == device, "saep: ", name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK(!contiguous || t.is_contiguous(), "saep: ", name, " must be contiguous");
}

// The layers (K tensors of one shape, dtype and device, channel stride 1, of `dims`
// dimensions), checked.
inline void check_layers(const std::vector<at::Tensor>& xs, int64_t dims) {
  TORCH_CHECK(!xs.empty(), "saep: hidden_states must hold at least one tensor");
  TORCH_CHECK(int64_t(xs.size()) <= kMaxLayers, "saep: the compiled kernels take at most ",
              kMaxLayers, " layers, got ", xs.size());
  const at::Tensor& x0 = xs[0];
  TORCH_CHECK(x0.dim() == dims, "saep: hidden_states[0] must be [B, T, C], got ", x0.sizes());
  for (size_t i = 0; i < xs.size(); ++i) {
    TORCH_CHECK(xs[i].sizes() == x0.sizes(), "saep: hidden_states[", i, "] has shape ",
                xs[i].sizes(), ", hidden_states[0] has ", x0.sizes());
    TORCH_CHECK(xs[i].scalar_type() == x0.scalar_type(), "saep: hidden_states[", i, "] is ",
                xs[i].scalar_type(), ", hidden_states[0] is ", x0.scalar_type());
    TORCH_CHECK(xs[i].device() == x0.device(), "saep: hidden_states[", i, "] is on ",
                xs[i].device(), ", hidden_states[0] on ", x0.device());
    TORCH_CHECK(channel_contiguous(xs[i]), "saep: hidden_states[", i,
                "] must have channel stride 1, got strides ", xs[i].strides());
  }
}

// The geometry of the layers [B, T, C] and the op's arguments, checked; the tap weights
// checked too. Packed inputs (`images` given) pass height = width = 0 and prefix = 0.
inline Geometry geometry(const std::vector<at::Tensor>& xs, const at::Tensor& weight,
                         int64_t height, int64_t width, int64_t prefix, bool residual,
                         c10::string_view pool, bool packed = false) {
  check_layers(xs, 3);
  const at::Tensor& x0 = xs[0];
  if (!packed) {
    TORCH_CHECK(height > 0 && width > 0, "saep: grid must be positive, got ", height, "x",
                width);
    TORCH_CHECK(prefix >= 0 && prefix + height * width == x0.size(1), "saep: T = ", x0.size(1),
                " tokens do not hold num_prefix_tokens + H*W = ", prefix, " + ", height, "*",
                width);
  }
  TORCH_CHECK(pool == "avg" || pool == "max", "saep: pool must be 'avg' or 'max', got '", pool,
              "'");
  const int64_t kc = int64_t(xs.size()) * x0.size(2);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == kc, "saep: weight must be [k*k, K*C] with ",
              "K*C = ", kc, ", got ", weight.sizes());
  int64_t k = 1;
  while (k * k < weight.size(0)) k += 2;
  TORCH_CHECK(k * k == weight.size(0) && k <= kMaxKernel, "saep: weight must have k*k rows for ",
              "k in 1, 3, 5, 7, got ", weight.size(0));
  check_tensor(weight, "weight", weight.sizes(), compute_type(x0), x0.device(), true);
  Geometry g;
  g.batch = x0.size(0);
  g.channels = x0.size(2);
  g.height = height;
  g.width = width;
  g.prefix = prefix;
  g.num_layers = int32_t(xs.size());
  g.ksize = int32_t(k);
  g.residual = residual;
  g.pool = pool == "max" ? Pool::Max : Pool::Avg;
  g.dtype = dtype_of(x0);
  return g;
}

// Packed inputs: the layers [1, N, C] and the image table [n, kImageFields] (int64, on the
// CPU, contiguous), checked so that no kernel reads or writes out of bounds: every grid
// positive, the images' tokens in order without overlap inside [0, N), their outputs one after
// the other from 0. Returns the geometry (batch = n images) and sets `windows` to the output
// tokens of all images.
inline Geometry packed_geometry(const std::vector<at::Tensor>& xs, const at::Tensor& weight,
                                const at::Tensor& images, bool residual, c10::string_view pool,
                                int64_t& windows) {
  Geometry g = geometry(xs, weight, 0, 0, 0, residual, pool, /*packed=*/true);
  TORCH_CHECK(g.batch == 1, "saep: packed hidden_states must be [1, N, C], got ",
              xs[0].sizes());
  TORCH_CHECK(images.dim() == 2 && images.size(1) == kImageFields &&
                  images.scalar_type() == at::kLong && images.device().is_cpu() &&
                  images.is_contiguous(),
              "saep: images must be a contiguous int64 CPU tensor [n, ", kImageFields,
              "] (height, width, first token, first window), got ", images.sizes(), " ",
              images.scalar_type(), " on ", images.device());
  const int64_t n = images.size(0), tokens = xs[0].size(1);
  const int64_t* row = images.data_ptr<int64_t>();
  int64_t next_token = 0;
  windows = 0;
  for (int64_t i = 0; i < n; ++i, row += kImageFields) {
    const int64_t h = row[kImageHeight], w = row[kImageWidth], first = row[kImageFirstToken];
    TORCH_CHECK(h > 0 && w > 0, "saep: images[", i, "] has an empty grid ", h, "x", w);
    TORCH_CHECK(h <= tokens && w <= tokens && first >= 0, "saep: images[", i, "]: grid ", h,
                "x", w, " at token ", first, " does not fit the N = ", tokens, " tokens");
    TORCH_CHECK(first >= next_token && h * w <= tokens - first, "saep: images[", i,
                "]: tokens [", first, ", ", first, " + ", h, "*", w,
                ") overlap the previous image or pass the N = ", tokens, " tokens");
    TORCH_CHECK(row[kImageFirstWindow] == windows, "saep: images[", i, "] must start at output ",
                "token ", windows, ", got ", row[kImageFirstWindow]);
    next_token = first + h * w;
    windows += ((h + 1) / 2) * ((w + 1) / 2);
  }
  g.batch = n;
  return g;
}

inline LayerPtrs layer_ptrs(const std::vector<at::Tensor>& xs) {
  LayerPtrs out{};
  for (size_t i = 0; i < xs.size(); ++i) {
    out.data[i] = xs[i].data_ptr();
    out.stride_b[i] = xs[i].stride(0);
    out.stride_t[i] = xs[i].stride(1);
  }
  return out;
}

// The forward's outputs and bias checked into p (its geometry set), then the kernels run.
template <typename Kernels>
void launch_fwd(FwdParams& p, const std::vector<at::Tensor>& xs, const at::Tensor& weight,
                const c10::optional<at::Tensor>& bias, const at::Tensor& out,
                const c10::optional<at::Tensor>& argmax, at::IntArrayRef out_sizes) {
  const at::Tensor& x0 = xs[0];
  check_tensor(out, "out", out_sizes, x0.scalar_type(), x0.device(), true);
  if (bias.has_value() && bias->defined()) {
    check_tensor(*bias, "bias", {p.g.kc()}, compute_type(x0), x0.device(), true);
    p.bias = bias->data_ptr();
  }
  if (argmax.has_value() && argmax->defined() && p.g.pool == Pool::Max) {
    check_tensor(*argmax, "argmax", out_sizes, at::kByte, x0.device(), true);
    p.argmax = argmax->data_ptr<uint8_t>();
  }
  p.x = layer_ptrs(xs);
  p.weight = weight.data_ptr();
  p.out = out.data_ptr();
  Kernels::fwd(p, x0.device());
}

// saep_C::fused_aggregate_fwd: writes `out` (and `argmax`, for max pooling, when given).
template <typename Kernels>
void fused_aggregate_fwd(const std::vector<at::Tensor>& xs, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const at::Tensor& out,
                         const c10::optional<at::Tensor>& argmax, int64_t height, int64_t width,
                         int64_t prefix, bool residual, c10::string_view pool) {
  FwdParams p{};
  p.g = geometry(xs, weight, height, width, prefix, residual, pool);
  launch_fwd<Kernels>(p, xs, weight, bias, out, argmax, {p.g.batch, p.g.windows(), p.g.kc()});
}

// saep_C::fused_aggregate_varlen_fwd: the forward of packed images (layers [1, N, C], out
// [1, sum of windows, K*C]).
template <typename Kernels>
void fused_aggregate_varlen_fwd(const std::vector<at::Tensor>& xs, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias,
                                const at::Tensor& images, const at::Tensor& out,
                                const c10::optional<at::Tensor>& argmax, bool residual,
                                c10::string_view pool) {
  FwdParams p{};
  int64_t windows = 0;
  p.g = packed_geometry(xs, weight, images, residual, pool, windows);
  p.images = images.data_ptr<int64_t>();
  launch_fwd<Kernels>(p, xs, weight, bias, out, argmax, {1, windows, p.g.kc()});
}

// The backward's inputs and outputs checked into p (its geometry set), then the kernels run.
template <typename Kernels>
void launch_bwd(BwdParams& p, const at::Tensor& grad_out, const std::vector<at::Tensor>& xs,
                const at::Tensor& weight, const c10::optional<at::Tensor>& argmax,
                at::TensorList grad_xs, const c10::optional<at::Tensor>& grad_w_parts,
                const c10::optional<at::Tensor>& grad_b_parts, at::IntArrayRef out_sizes) {
  const Geometry& g = p.g;
  const at::Tensor& x0 = xs[0];
  TORCH_CHECK(grad_out.sizes() == out_sizes && grad_out.scalar_type() == x0.scalar_type() &&
                  grad_out.device() == x0.device() && channel_contiguous(grad_out),
              "saep: grad_out must be ", out_sizes, " ", x0.scalar_type(), " on ", x0.device(),
              " with channel stride 1, got ", grad_out.sizes(), " ", grad_out.scalar_type(),
              " on ", grad_out.device(), " strides ", grad_out.strides());
  if (g.pool == Pool::Max) {
    TORCH_CHECK(argmax.has_value() && argmax->defined(),
                "saep: max-pool backward needs the argmax saved by the forward");
    check_tensor(*argmax, "argmax", out_sizes, at::kByte, x0.device(), true);
    p.argmax = argmax->data_ptr<uint8_t>();
  }
  TORCH_CHECK(grad_xs.empty() || int64_t(grad_xs.size()) == g.num_layers,
              "saep: grad_hidden_states must hold no tensor or one per layer, got ",
              grad_xs.size());
  for (size_t i = 0; i < grad_xs.size(); ++i) {
    check_tensor(grad_xs[i], "grad_hidden_states[i]", x0.sizes(), x0.scalar_type(), x0.device(),
                 true);
    p.grad_x[i] = grad_xs[i].data_ptr();
  }
  if (grad_w_parts.has_value() && grad_w_parts->defined()) {
    check_tensor(*grad_w_parts, "weight_grad_parts", {g.batch, g.ksize * g.ksize, g.kc()},
                 compute_type(x0), x0.device(), true);
    p.grad_w_part = grad_w_parts->data_ptr();
  }
  if (grad_b_parts.has_value() && grad_b_parts->defined()) {
    check_tensor(*grad_b_parts, "bias_grad_parts", {g.batch, g.kc()}, compute_type(x0),
                 x0.device(), true);
    p.grad_b_part = grad_b_parts->data_ptr();
  }
  p.x = layer_ptrs(xs);
  p.weight = weight.data_ptr();
  p.grad_out = grad_out.data_ptr();
  p.gy_stride_b = grad_out.stride(0);
  p.gy_stride_t = grad_out.stride(1);
  Kernels::bwd(p, x0.device());
}

// saep_C::fused_aggregate_bwd: writes the gradients given: `grad_xs` (empty: not needed) and
// the weight and bias partial sums [B, k*k, K*C] and [B, K*C], one row per image.
template <typename Kernels>
void fused_aggregate_bwd(const at::Tensor& grad_out, const std::vector<at::Tensor>& xs,
                         const at::Tensor& weight, const c10::optional<at::Tensor>& argmax,
                         at::TensorList grad_xs, const c10::optional<at::Tensor>& grad_w_parts,
                         const c10::optional<at::Tensor>& grad_b_parts, int64_t height,
                         int64_t width, int64_t prefix, bool residual, c10::string_view pool) {
  BwdParams p{};
  p.g = geometry(xs, weight, height, width, prefix, residual, pool);
  launch_bwd<Kernels>(p, grad_out, xs, weight, argmax, grad_xs, grad_w_parts, grad_b_parts,
                      {p.g.batch, p.g.windows(), p.g.kc()});
}

// saep_C::fused_aggregate_varlen_bwd: the backward of packed images; the partial sums have
// one row per image.
template <typename Kernels>
void fused_aggregate_varlen_bwd(const at::Tensor& grad_out, const std::vector<at::Tensor>& xs,
                                const at::Tensor& weight,
                                const c10::optional<at::Tensor>& argmax,
                                const at::Tensor& images, at::TensorList grad_xs,
                                const c10::optional<at::Tensor>& grad_w_parts,
                                const c10::optional<at::Tensor>& grad_b_parts, bool residual,
                                c10::string_view pool) {
  BwdParams p{};
  int64_t windows = 0;
  p.g = packed_geometry(xs, weight, images, residual, pool, windows);
  p.images = images.data_ptr<int64_t>();
  launch_bwd<Kernels>(p, grad_out, xs, weight, argmax, grad_xs, grad_w_parts, grad_b_parts,
                      {1, windows, p.g.kc()});
}

}  // namespace binding
}  // namespace saep
