// saep-kernels CUDA kernels: pick the kernel instance, launch on the caller's stream.
#include "dispatch.cuh"
#include "fused_aggregate_cuda.h"

namespace saep {
namespace cuda {
namespace {

struct Launcher {
  cudaStream_t stream;

  template <typename Params>
  int operator()(void (*kernel)(Params, Tiling), const Tiling& t, const Params& p) const {
    if (t.grid_x == 0 || t.grid_y == 0 || t.grid_z == 0) return 0;  // empty batch
    if (t.grid_y > 65535 || t.grid_z > 65535 || t.grid_x > 2147483647LL)
      return int(cudaErrorInvalidConfiguration);
    if (t.smem_bytes > 48 * 1024) {
      cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             int(t.smem_bytes));
      if (err != cudaSuccess) return int(err);
    }
    const dim3 grid(unsigned(t.grid_x), unsigned(t.grid_y), unsigned(t.grid_z));
    kernel<<<grid, dim3(unsigned(t.threads)), size_t(t.smem_bytes), stream>>>(p, t);
    return int(cudaGetLastError());
  }
};

}  // namespace

int fused_aggregate_fwd(const FwdParams& p, CUstream_st* stream) {
  return dispatch(p, fwd_vector_ok(p), Launcher{stream});
}

int fused_aggregate_bwd(const BwdParams& p, CUstream_st* stream) {
  return dispatch(p, bwd_vector_ok(p), Launcher{stream});
}

const char* error_string(int err) {
  return err < 0 ? "unsupported kernel configuration" : cudaGetErrorString(cudaError_t(err));
}

}  // namespace cuda
}  // namespace saep
