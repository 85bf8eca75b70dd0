// saep-kernels torch binding: the CUDA kernels of the saep_C ops (CUDA builds only). Only the
// c10/cuda headers (device guard, current stream): a toolkit with nvcc and the CUDA runtime
// builds it.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "binding.h"
#include "cuda/fused_aggregate_cuda.h"

namespace saep {
namespace binding {
namespace {

void check_cuda(int err) {
  TORCH_CHECK(err == 0, "saep CUDA kernel failed: ", cuda::error_string(err));
}

// Launches on the inputs' device and its current stream.
struct CudaKernels {
  static void fwd(const FwdParams& p, const at::Device& device) {
    const c10::cuda::CUDAGuard guard(device);
    check_cuda(cuda::fused_aggregate_fwd(p, c10::cuda::getCurrentCUDAStream().stream()));
  }
  static void bwd(const BwdParams& p, const at::Device& device) {
    const c10::cuda::CUDAGuard guard(device);
    check_cuda(cuda::fused_aggregate_bwd(p, c10::cuda::getCurrentCUDAStream().stream()));
  }
};

}  // namespace
}  // namespace binding
}  // namespace saep

TORCH_LIBRARY_IMPL(saep_C, CUDA, m) {
  using Kernels = saep::binding::CudaKernels;
  m.impl("fused_aggregate_fwd", &saep::binding::fused_aggregate_fwd<Kernels>);
  m.impl("fused_aggregate_bwd", &saep::binding::fused_aggregate_bwd<Kernels>);
}
