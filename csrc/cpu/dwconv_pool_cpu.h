// saep-kernels CPU kernels: forward and backward of the fused op (see ../dwconv_pool.h).
// Plain C++17: no torch. The caller supplies the thread pool through `ParallelFor`.
#pragma once

#include <cstdint>
#include <functional>

#include "../dwconv_pool.h"

namespace saep {
namespace cpu {

// Runs body(begin, end) over chunks covering the task range [0, n) exactly once, possibly
// concurrently. Results never depend on how the range is chunked.
using ParallelFor =
    std::function<void(int64_t n, const std::function<void(int64_t, int64_t)>& body)>;

// Runs every task on the calling thread.
ParallelFor serial_for();

// Forward: writes p.out (and p.argmax when non-null and pool is max).
void dwconv_pool_fwd(const FwdParams& p, const ParallelFor& parallel_for);

// Rows of the weight/bias partial-sum buffers the backward writes (one per image); the caller
// reduces them over dim 0 in a fixed order, so the gradients are bitwise reproducible.
int64_t bwd_num_parts(const Geometry& g);

// Backward: writes the non-null outputs of p (grad_x, grad_w_part, grad_b_part).
void dwconv_pool_bwd(const BwdParams& p, const ParallelFor& parallel_for);

}  // namespace cpu
}  // namespace saep
