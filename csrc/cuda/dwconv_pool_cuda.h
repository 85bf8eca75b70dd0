// saep-kernels CUDA launchers: the API the torch binding calls. No CUDA or torch headers.
#pragma once

#include <cstdint>

#include "../dwconv_pool.h"

struct CUstream_st;  // cudaStream_t is CUstream_st*

namespace saep {
namespace cuda {

// Each returns 0 on success, else a cudaError_t value (see error_string).
int dwconv_pool_fwd(const FwdParams& p, CUstream_st* stream);
int dwconv_pool_bwd(const BwdParams& p, CUstream_st* stream);

// Rows of the backward's partial-sum buffers (grad_w_part, grad_b_part).
int64_t bwd_parts(const Geometry& g);

const char* error_string(int err);

}  // namespace cuda
}  // namespace saep
