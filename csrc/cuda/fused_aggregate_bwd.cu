// saep-kernels CUDA kernels: the backward launch (the kernel: fused_aggregate_bwd.cuh).
#include "dispatch.cuh"
#include "fused_aggregate_cuda.h"

namespace saep {
namespace cuda {

int fused_aggregate_bwd(const BwdParams& p, const PackedTiles* packed, CUstream_st* stream) {
  return dispatch(p, packed, bwd_vector_ok(p), Launcher{stream});
}

}  // namespace cuda
}  // namespace saep
