// saep-kernels torch binding: the compiled kernel ops, declared once, with their CPU kernels.
// The CUDA kernels register for the same ops in binding_cuda.cpp (CUDA builds only).
//
//   torch.ops.saep_C.dwconv_pool_fwd(hidden_states, weight, bias, height, width,
//       num_prefix_tokens, residual, pool, save_argmax) -> (out, argmax)
//   torch.ops.saep_C.dwconv_pool_bwd(grad_out, hidden_states, weight, argmax, height, width,
//       num_prefix_tokens, residual, pool, need_input_grad, need_weight_grad,
//       need_bias_grad) -> (grad_hidden_states, grad_weight, grad_bias)
//
// pool: 0 = avg, 1 = max. Gradients nobody asked for come back empty. These are the kernels
// behind backend="cpu" / "cuda" of saep::fused_aggregate, which adds autograd, the fake
// implementation and the argument checks users see.
#include <ATen/Parallel.h>
#include <Python.h>

#include "binding_common.h"
#include "cpu/dwconv_pool_cpu.h"

namespace saep {
namespace binding {
namespace {

cpu::ParallelFor aten_parallel_for() {
  return [](int64_t n, const std::function<void(int64_t, int64_t)>& body) {
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) { body(begin, end); });
  };
}

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const std::vector<at::Tensor>& xs,
                                           const at::Tensor& weight,
                                           const c10::optional<at::Tensor>& bias, int64_t height,
                                           int64_t width, int64_t prefix, bool residual,
                                           int64_t pool, bool save_argmax) {
  FwdCall call = prepare_fwd(xs, weight, bias, height, width, prefix, residual, pool, save_argmax);
  cpu::dwconv_pool_fwd(call.p, aten_parallel_for());
  return {call.out, call.argmax};
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& grad_out, const std::vector<at::Tensor>& xs, const at::Tensor& weight,
    const at::Tensor& argmax, int64_t height, int64_t width, int64_t prefix, bool residual,
    int64_t pool, bool need_x, bool need_w, bool need_b) {
  BwdCall call = prepare_bwd(grad_out, xs, weight, argmax, height, width, prefix, residual,
                             pool, need_x, need_w, need_b, cpu::bwd_num_parts);
  cpu::dwconv_pool_bwd(call.p, aten_parallel_for());
  return finish_bwd(call);
}

}  // namespace
}  // namespace binding
}  // namespace saep

TORCH_LIBRARY(saep_C, m) {
  m.def(
      "dwconv_pool_fwd(Tensor[] hidden_states, Tensor weight, Tensor? bias, int height, "
      "int width, int num_prefix_tokens, bool residual, int pool, bool save_argmax) "
      "-> (Tensor, Tensor)");
  m.def(
      "dwconv_pool_bwd(Tensor grad_out, Tensor[] hidden_states, Tensor weight, Tensor argmax, "
      "int height, int width, int num_prefix_tokens, bool residual, int pool, "
      "bool need_input_grad, bool need_weight_grad, bool need_bias_grad) "
      "-> (Tensor[], Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(saep_C, CPU, m) {
  m.impl("dwconv_pool_fwd", &saep::binding::fwd_cpu);
  m.impl("dwconv_pool_bwd", &saep::binding::bwd_cpu);
}

// `import saep_kernels._C` loads this library (running the registrations above) and tells
// which kernels it was built with.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "saep-kernels compiled kernels (registered as torch.ops.saep_C)",
                               -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  PyModule_AddIntConstant(m, "HAS_CPU", 1);
#if defined(SAEP_WITH_CUDA)
  PyModule_AddIntConstant(m, "HAS_CUDA", 1);
#else
  PyModule_AddIntConstant(m, "HAS_CUDA", 0);
#endif
  return m;
}
