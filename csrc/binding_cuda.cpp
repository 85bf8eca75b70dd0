// saep-kernels torch binding: the CUDA kernels of the saep_C ops (CUDA builds only).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "binding_common.h"
#include "cuda/dwconv_pool_cuda.h"

namespace saep {
namespace binding {
namespace {

void check_cuda(int err) {
  TORCH_CHECK(err == 0, "saep CUDA kernel failed: ", cuda::error_string(err));
}

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const std::vector<at::Tensor>& xs,
                                            const at::Tensor& weight,
                                            const c10::optional<at::Tensor>& bias,
                                            int64_t height, int64_t width, int64_t prefix,
                                            bool residual, int64_t pool, bool save_argmax) {
  TORCH_CHECK(!xs.empty() && xs[0].is_cuda(), "saep: CUDA kernels need CUDA tensors");
  const c10::cuda::CUDAGuard guard(xs[0].device());
  FwdCall call = prepare_fwd(xs, weight, bias, height, width, prefix, residual, pool, save_argmax);
  check_cuda(cuda::dwconv_pool_fwd(call.p, at::cuda::getCurrentCUDAStream().stream()));
  return {call.out, call.argmax};
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& grad_out, const std::vector<at::Tensor>& xs, const at::Tensor& weight,
    const at::Tensor& argmax, int64_t height, int64_t width, int64_t prefix, bool residual,
    int64_t pool, bool need_x, bool need_w, bool need_b) {
  TORCH_CHECK(!xs.empty() && xs[0].is_cuda(), "saep: CUDA kernels need CUDA tensors");
  const c10::cuda::CUDAGuard guard(xs[0].device());
  BwdCall call = prepare_bwd(grad_out, xs, weight, argmax, height, width, prefix, residual,
                             pool, need_x, need_w, need_b, cuda::bwd_parts);
  check_cuda(cuda::dwconv_pool_bwd(call.p, at::cuda::getCurrentCUDAStream().stream()));
  return finish_bwd(call);
}

}  // namespace
}  // namespace binding
}  // namespace saep

TORCH_LIBRARY_IMPL(saep_C, CUDA, m) {
  m.impl("dwconv_pool_fwd", &saep::binding::fwd_cuda);
  m.impl("dwconv_pool_bwd", &saep::binding::bwd_cuda);
}
