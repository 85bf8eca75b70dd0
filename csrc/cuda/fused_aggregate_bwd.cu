// saep-kernels CUDA kernels: the backward launch (the kernel: fused_aggregate_bwd.cuh).
#include "dispatch.cuh"
#include "fused_aggregate_cuda.h"

namespace saep {
namespace cuda {

int fused_aggregate_bwd(const BwdParams& p, CUstream_st* stream) {
  return dispatch(p, bwd_vector_ok(p), Launcher{stream});
}

}  // namespace cuda
}  // namespace saep
