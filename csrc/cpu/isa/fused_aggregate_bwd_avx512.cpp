// The backward's kernels compiled for AVX-512 (x86-64-v4) (task.h: instruction sets).
#include "../fused_aggregate_cpu.h"
#if SAEP_CPU_MULTI_ISA
#define SAEP_CPU_ISA_AVX512
#include "../fused_aggregate_bwd.cpp"
#endif
