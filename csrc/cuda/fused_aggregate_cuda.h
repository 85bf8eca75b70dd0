// saep-kernels CUDA kernels: the API the torch binding calls. No CUDA or torch headers.
//
//   fused_aggregate_fwd.cuh / _bwd.cuh   the kernels, one file per direction
//   fused_aggregate_fwd.cu / _bwd.cu     their launches
//   device.cuh                           what they share on the device (numerics, staging)
//   plan.h                               host-side tiling
//   dispatch.cuh                         the kernel instance for a problem, the launcher
#pragma once

#include <cstdint>

#include "../fused_aggregate.h"

struct CUstream_st;  // cudaStream_t is CUstream_st*

namespace saep {
namespace cuda {

// Each returns 0 on success, else a cudaError_t value (see error_string).
int fused_aggregate_fwd(const FwdParams& p, CUstream_st* stream);
int fused_aggregate_bwd(const BwdParams& p, CUstream_st* stream);

const char* error_string(int err);

}  // namespace cuda
}  // namespace saep
