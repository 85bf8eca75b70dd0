// saep-kernels CPU kernels: forward and backward of the fused op (see ../fused_aggregate.h).
// Plain C++ (no torch). The caller supplies the thread pool through `ParallelFor`.
//
//   fused_aggregate_fwd.cpp   the forward (avg folded into one stride-2 conv; max)
//   fused_aggregate_bwd.cpp   the backward, one function per gradient and pool mode
//   task.h                    what both share: tasks, the per-task view, walkers, the avg fold
#pragma once

#include <cstdint>
#include <functional>

#include "../fused_aggregate.h"

namespace saep {
namespace cpu {

// Runs body(begin, end) over chunks covering the task range [0, n) exactly once, possibly
// concurrently. Results never depend on how the range is chunked.
using ParallelFor =
    std::function<void(int64_t n, const std::function<void(int64_t, int64_t)>& body)>;

// Runs every task on the calling thread.
inline ParallelFor serial_for() {
  return [](int64_t n, const std::function<void(int64_t, int64_t)>& body) {
    if (n > 0) body(0, n);
  };
}

// Forward: writes p.out (and p.argmax when non-null and pool is max).
void fused_aggregate_fwd(const FwdParams& p, const ParallelFor& parallel_for);

// Backward: writes the non-null outputs of p (grad_x, grad_w_part, grad_b_part).
void fused_aggregate_bwd(const BwdParams& p, const ParallelFor& parallel_for);

}  // namespace cpu
}  // namespace saep
