// The backward's kernels compiled for AVX2 + FMA (x86-64-v3) (task.h: instruction sets).
#include "../fused_aggregate_cpu.h"
#if SAEP_CPU_MULTI_ISA
#define SAEP_CPU_ISA_AVX2
#include "../fused_aggregate_bwd.cpp"
#endif
