// saep-kernels CPU kernels: forward and backward of the fused op (see ../fused_aggregate.h).
// Plain C++ (no torch). The caller supplies the thread pool through `ParallelFor`.
//
//   fused_aggregate_fwd.cpp   the forward (avg folded into one stride-2 conv; max)
//   fused_aggregate_bwd.cpp   the backward, one function per gradient and pool mode
//   task.h                    what both share: tasks, the per-task view, walkers, the avg fold,
//                             and which instruction set a translation unit is compiled for
//   isa/*.cpp                 the forward and the backward again, for AVX2 and AVX-512
//   cpu_capability.cpp        which instruction set's entry points run
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

// The instruction sets the entry points are compiled for. On x86-64 (GCC, Clang) all three,
// else the baseline alone (SAEP_CPU_MULTI_ISA). The best one compiled and supported by this
// CPU runs unless set_cpu_capability chose another; results differ between them only by
// floating-point contraction (FMA or not).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(SAEP_NO_MULTI_ISA)
#define SAEP_CPU_MULTI_ISA 1
#else
#define SAEP_CPU_MULTI_ISA 0
#endif
enum class CpuCapability : int { Default = 0, Avx2 = 1, Avx512 = 2 };
constexpr int kNumCpuCapabilities = 3;

// "default", "avx2", "avx512" (the names of PyTorch's ATEN_CPU_CAPABILITY).
const char* cpu_capability_name(CpuCapability c);
// Compiled here and runnable on this CPU.
bool cpu_capability_supported(CpuCapability c);
// The capability whose entry points run now.
CpuCapability cpu_capability();
// Use c from now on; false (and no change) when c is not supported.
bool set_cpu_capability(CpuCapability c);

// Forward: writes p.out (and p.argmax when non-null and pool is max).
void fused_aggregate_fwd(const FwdParams& p, const ParallelFor& parallel_for);

// Backward: writes the non-null outputs of p (grad_x, grad_w_part, grad_b_part).
void fused_aggregate_bwd(const BwdParams& p, const ParallelFor& parallel_for);

}  // namespace cpu
}  // namespace saep
