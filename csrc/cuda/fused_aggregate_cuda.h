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
#include "plan.h"

struct CUstream_st;  // cudaStream_t is CUstream_st*

namespace saep {
namespace cuda {

// Each returns 0 on success, else a cudaError_t value (see error_string). Packed inputs
// (p.images, a device copy of the image table) come with their tiles (`packed`: plan.h's
// packed_tiles of the host table, first_tile pointing at a device copy); else packed is
// nullptr. One launch per kernel for all images; nothing waits for the device.
int fused_aggregate_fwd(const FwdParams& p, const PackedTiles* packed, CUstream_st* stream);
int fused_aggregate_bwd(const BwdParams& p, const PackedTiles* packed, CUstream_st* stream);

const char* error_string(int err);

}  // namespace cuda
}  // namespace saep
