// Which instruction set's entry points the CPU kernels run (see fused_aggregate_cpu.h).
#include <atomic>

#include "fused_aggregate_cpu.h"

namespace saep {
namespace cpu {
namespace {

bool cpu_runs(CpuCapability c) {
#if SAEP_CPU_MULTI_ISA
  __builtin_cpu_init();
  switch (c) {
    case CpuCapability::Avx512:  // x86-64-v4
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vl") && cpu_runs(CpuCapability::Avx2);
    case CpuCapability::Avx2:  // x86-64-v3
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
             __builtin_cpu_supports("f16c") && __builtin_cpu_supports("movbe");
    case CpuCapability::Default:
      return true;
  }
  return false;
#else
  return c == CpuCapability::Default;
#endif
}

CpuCapability best_supported() {
  for (int c = kNumCpuCapabilities - 1; c > 0; --c)
    if (cpu_runs(static_cast<CpuCapability>(c))) return static_cast<CpuCapability>(c);
  return CpuCapability::Default;
}

std::atomic<int>& current() {
  static std::atomic<int> value{static_cast<int>(best_supported())};
  return value;
}

}  // namespace

const char* cpu_capability_name(CpuCapability c) {
  switch (c) {
    case CpuCapability::Avx512:
      return "avx512";
    case CpuCapability::Avx2:
      return "avx2";
    case CpuCapability::Default:
      return "default";
  }
  return "unknown";
}

bool cpu_capability_supported(CpuCapability c) { return cpu_runs(c); }

CpuCapability cpu_capability() { return static_cast<CpuCapability>(current().load()); }

bool set_cpu_capability(CpuCapability c) {
  if (!cpu_runs(c)) return false;
  current().store(static_cast<int>(c));
  return true;
}

}  // namespace cpu
}  // namespace saep
