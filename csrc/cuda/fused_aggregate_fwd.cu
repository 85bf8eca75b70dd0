// saep-kernels CUDA kernels: the forward launch (the kernel: fused_aggregate_fwd.cuh).
#include "dispatch.cuh"
#include "fused_aggregate_cuda.h"

namespace saep {
namespace cuda {

int fused_aggregate_fwd(const FwdParams& p, const PackedTiles* packed, CUstream_st* stream) {
  return dispatch(p, packed, fwd_vector_ok(p), Launcher{stream});
}

const char* error_string(int err) {
  return err < 0 ? "unsupported kernel configuration" : cudaGetErrorString(cudaError_t(err));
}

}  // namespace cuda
}  // namespace saep
