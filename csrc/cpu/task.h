// saep-kernels CPU kernels: what the forward and the backward share.
//
// Work is split into tasks (image b, layer l): a task reads its layer in place (channel
// stride 1, any batch/token stride) and owns a disjoint slice of every output, so tasks run
// in any order on any thread with the same result.
//
// Memory order. Every input row is read whole and in order, the pattern the hardware
// prefetchers stream at full bandwidth. The staged kernels (StagedRows, and the max backward's
// g_z ring) copy the rows a window row or pixel row needs into a ring in scratch memory,
// converted and in Packing's channel order, and walk the ring one vector block of channels at
// a time, the weights or the weight-gradient accumulators in registers; the others walk the
// image window by window or pixel by pixel, each over all C channels. (Walking the input in
// place once per block of a few cache lines of channels instead reads it every C*sizeof(T)
// bytes: measured here at a quarter of the bandwidth.)
//
// Inner loops run over chunks of L channels with local accumulator arrays; for a full chunk
// L is a compile-time trip count, so the loops unroll into SIMD registers (the tail of C
// takes the same code with a runtime length).
//
// Instruction sets. On x86-64 each direction's kernels are compiled three times, by three
// translation units: fused_aggregate_{fwd,bwd}.cpp for the baseline and csrc/cpu/isa/*.cpp,
// which define SAEP_CPU_ISA_AVX2 or SAEP_CPU_ISA_AVX512 and include it, for AVX2+FMA
// (x86-64-v3) and AVX-512 (x86-64-v4). From the end of this header's includes on, such a unit
// is compiled for its instruction set (#pragma GCC target) and its code lives in the namespace
// saep::cpu::avx2 or ::avx512 (::baseline), so no function is shared between the units. The
// whole kernel, templates included, must be compiled for the target: GCC lowers the vector
// compares and selects of a template defined for the baseline lane by lane (cmov, vpextrd)
// even when it is inlined into an AVX-512 function. The baseline unit also holds the dispatch
// (SAEP_CPU_DISPATCH): the best instruction set this CPU runs, unless another is chosen
// (cpu_capability.cpp).
//
// avg pool: a kxk conv, the residual and the 2x2 average fold into one stride-2 (k+1)x(k+1)
// depthwise conv (docs/op.md section 4, `fold_avg`): 16 multiply-adds per output for k=3
// instead of 36. The fold depends on the window's extent: partial windows of odd grids (last
// row/column) drop their out-of-grid positions and divide by their own count, so up to four
// folded kernels ("variants").
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vectors stay inside inlined code
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "../fused_aggregate.h"
#include "fused_aggregate_cpu.h"
#include "numeric.h"

#if defined(__GNUC__) || defined(__clang__)
#define SAEP_INLINE __attribute__((always_inline)) inline
#define SAEP_LAMBDA_INLINE __attribute__((always_inline))
#define SAEP_NOINLINE __attribute__((noinline))
#else
#define SAEP_INLINE inline
#define SAEP_LAMBDA_INLINE
#define SAEP_NOINLINE
#endif

// the trip count of a chunk (see for_chunks): the constant L, or the tail's runtime length
#define SAEP_LEN(chunk, n) (decltype(chunk)::value ? int64_t(decltype(chunk)::value) : (n))

namespace saep {
namespace cpu {

// ---- dispatch (compiled for the baseline, shared by the units)

inline int64_t num_tasks(const Geometry& g) { return g.batch * g.num_layers; }

template <typename Params>
using ChunkFn = void (*)(const Params&, int64_t, int64_t);

// One instruction set's entry points of a direction, one per dtype.
template <typename Params>
struct DtypeEntryPoints {
  ChunkFn<Params> f32, f64, bf16, f16;
};

// Runs the entry point of the dtype and the capability in use over the problem's tasks.
template <typename Params>
inline void run_tasks(const Params& p, const ParallelFor& parallel_for,
                      const DtypeEntryPoints<Params>* const (&entry_points)[kNumCpuCapabilities]) {
  const DtypeEntryPoints<Params>& isa = *entry_points[static_cast<int>(cpu_capability())];
  ChunkFn<Params> fn = p.g.dtype == DType::F64    ? isa.f64
                       : p.g.dtype == DType::BF16 ? isa.bf16
                       : p.g.dtype == DType::F16  ? isa.f16
                                                  : isa.f32;
  parallel_for(num_tasks(p.g), [&](int64_t b, int64_t e) { fn(p, b, e); });
}

}  // namespace cpu
}  // namespace saep

// ---- this unit's instruction set: the rest of the unit is compiled for it
#if SAEP_CPU_MULTI_ISA && defined(SAEP_CPU_ISA_AVX512)
#define SAEP_CPU_ISA avx512
#define SAEP_CPU_ISA_IS_BASELINE 0
#define SAEP_CPU_VEC_REGISTERS 32  // Vecs (64 bytes) the registers hold: 32 zmm
#if defined(__clang__)
#define SAEP_CPU_ISA_TARGET __attribute__((target("arch=x86-64-v4")))
#else
#define SAEP_CPU_ISA_TARGET
#pragma GCC target("arch=x86-64-v4")
#endif
#elif SAEP_CPU_MULTI_ISA && defined(SAEP_CPU_ISA_AVX2)
#define SAEP_CPU_ISA avx2
#define SAEP_CPU_ISA_IS_BASELINE 0
#define SAEP_CPU_VEC_REGISTERS 8  // 16 ymm, two per Vec
#if defined(__clang__)
#define SAEP_CPU_ISA_TARGET __attribute__((target("arch=x86-64-v3")))
#else
#define SAEP_CPU_ISA_TARGET
#pragma GCC target("arch=x86-64-v3")
#endif
#elif !defined(SAEP_CPU_ISA_AVX2) && !defined(SAEP_CPU_ISA_AVX512)
#define SAEP_CPU_ISA baseline
#define SAEP_CPU_ISA_IS_BASELINE 1
#define SAEP_CPU_VEC_REGISTERS 4  // x86-64: 16 xmm, four per Vec
#define SAEP_CPU_ISA_TARGET
#else
#error "csrc/cpu/isa/*.cpp compile only where SAEP_CPU_MULTI_ISA is 1"
#endif

namespace saep {
namespace cpu {
namespace SAEP_CPU_ISA {

// Image b, layer l. Its geometry is the call's, with the image's own grid when the inputs are
// packed (Params::images); the kernels read it from here, never from the call.
struct Task {
  int64_t b;
  int32_t l;
  Geometry g;      // the image's: height, width (and prefix 0 when packed)
  bool packed;
  int64_t token;   // packed: the token of the image's pixel (0, 0)
  int64_t window;  // the output token of its window (0, 0)
};

template <typename Params>
inline Task task_at(const Params& p, int64_t t) {
  // layer by layer: a chunk's consecutive tasks share their layer's weights (the forward
  // prepares them once per layer, ForwardTask)
  Task task{t % p.g.batch, int32_t(t / p.g.batch), p.g, p.images != nullptr, 0, 0};
  if (task.packed) {
    const int64_t* row = p.images + task.b * kImageFields;
    task.g.height = row[kImageHeight];
    task.g.width = row[kImageWidth];
    task.g.prefix = 0;
    task.token = row[kImageFirstToken];
    task.window = row[kImageFirstWindow];
  } else {
    task.token = task.b * p.g.tokens() + p.g.prefix;
    task.window = task.b * p.g.windows();
  }
  return task;
}

// Calls f(chunk, c, n) over [0, C) in chunks: chunk is std::integral_constant<int, L> for
// full chunks (n == L, a compile-time trip count) and <int, 0> for the tail (n < L).
template <int L, typename F>
SAEP_INLINE void for_chunks(int64_t C, F&& f) {
  int64_t c = 0;
  for (; c + L <= C; c += L) f(std::integral_constant<int, L>{}, c, int64_t(L));
  if (c < C) f(std::integral_constant<int, 0>{}, c, C - c);
}

template <typename T, typename A>
SAEP_INLINE A ld(T v) {
  return Convert<T, A>::load(v);
}

// Accumulators of a chunk: 64 fp32 / 32 fp64 (8 AVX2 or 4 AVX-512 registers).
template <typename A>
constexpr int lanes() {
  return int(256 / sizeof(A));
}

// ---- explicit vectors (GCC/Clang vector extensions): 64 bytes of the compute type, lowered
// to one AVX-512, two AVX2 or four SSE registers by the target each entry point is built for.
// Lane-wise arithmetic, so a loop over Vecs computes exactly what the scalar loop over its
// lanes computes (the same contraction into FMAs).
template <typename A>
struct VecOf {
  static constexpr int kLanes = int(64 / sizeof(A));
  typedef A type __attribute__((vector_size(64)));
  typedef decltype(type{} > type{}) Mask;  // lane masks: integers of A's width
};
template <typename A>
using Vec = typename VecOf<A>::type;
template <typename A>
constexpr int vec_lanes() {
  return VecOf<A>::kLanes;
}

template <typename A>
SAEP_INLINE Vec<A> vec_set1(A v) {
  return Vec<A>{} + v;
}

// Stores the vector v to p, which is aligned to its size (64 bytes), past the caches
// (non-temporal): the outputs and the max input gradient are written once and not read back by
// the kernel, so a plain store's read of the line before writing it (read for ownership) is
// bytes moved for nothing. Measured (cpu_kernel_bench, 2 threads, interleaved, ms): the fp32 avg
// forward, llava15-7b B=8 5.5-6.1 vs 6.1-7.1, B=1 0.52-0.55 vs 0.55-0.67, siglip-so400m B=8
// 8.9-9.6 vs 9.2-11; the max forward and max input gradient (llava15-7b B=8, fp32 and bf16)
// within the noise. Ordered before the threads' join by store_fence.
template <typename V>
SAEP_INLINE void stream_store(void* p, V v) {
  static_assert(sizeof(V) % 16 == 0, "whole 16-byte pieces");
#if defined(__clang__)
  __builtin_nontemporal_store(v, reinterpret_cast<V*>(p));
#elif defined(__x86_64__) && defined(SAEP_CPU_ISA_AVX512)
  static_assert(sizeof(V) == 64, "one AVX-512 store");
  __m512i x;
  std::memcpy(&x, &v, 64);
  _mm512_stream_si512(reinterpret_cast<__m512i*>(p), x);
#elif defined(__x86_64__) && defined(SAEP_CPU_ISA_AVX2)
  for (size_t i = 0; i < sizeof(V); i += 32) {
    __m256i x;
    std::memcpy(&x, reinterpret_cast<const char*>(&v) + i, 32);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(static_cast<char*>(p) + i), x);
  }
#elif defined(__x86_64__)
  for (size_t i = 0; i < sizeof(V); i += 16) {
    __m128i x;
    std::memcpy(&x, reinterpret_cast<const char*>(&v) + i, 16);
    _mm_stream_si128(reinterpret_cast<__m128i*>(static_cast<char*>(p) + i), x);
  }
#else
  std::memcpy(p, &v, sizeof v);
#endif
}

// Orders this thread's stream_store stores before the stores that follow (the join).
SAEP_INLINE void store_fence() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_sfence();
#endif
}

// N integers of type I as a vector (the argmax codes' loads and stores)
template <typename I, int N>
struct IntVec {
  typedef I type __attribute__((vector_size(N * sizeof(I))));
};

// take ? a : b lane-wise, for a lane mask take (all bits set or clear): a vector ?: where the
// registers hold 64 bytes (a compare into a mask register and one masked move, where the
// bitwise form took two masked xors; the max forward 1-3% faster, within the noise), bitwise
// logic elsewhere (there a vector ?: on 64-byte vectors is split lane by lane)
template <typename V, typename M>
SAEP_INLINE V select(M take, V a, V b) {
#if SAEP_CPU_VEC_REGISTERS >= 32
  return take ? a : b;
#else
  return (V)(((M)a & take) | ((M)b & ~take));
#endif
}

// Whether a lane of a, b or c is a NaN: two compares into mask registers and one test with
// AVX-512, lane by lane elsewhere.
template <typename A>
SAEP_INLINE bool any_nan(Vec<A> a, Vec<A> b, Vec<A> c) {
#if defined(__x86_64__) && defined(SAEP_CPU_ISA_AVX512)
  if constexpr (std::is_same<A, float>::value) {
    __m512 x, y, z;
    std::memcpy(&x, &a, 64);
    std::memcpy(&y, &b, 64);
    std::memcpy(&z, &c, 64);
    return !_kortestz_mask16_u8(_mm512_cmp_ps_mask(x, y, _CMP_UNORD_Q),
                                _mm512_cmp_ps_mask(z, z, _CMP_UNORD_Q));
  }
#endif
  const auto nan = (a != a) | (b != b) | (c != c);
  for (int q = 0; q < vec_lanes<A>(); ++q)
    if (nan[q]) return true;
  return false;
}

// kLanes values of T at p (any alignment), in the compute type
template <typename T, typename A>
struct VecIO {
  static SAEP_INLINE Vec<A> load(const T* p) {
    A lanes[vec_lanes<A>()];
    for (int q = 0; q < vec_lanes<A>(); ++q) lanes[q] = ld<T, A>(p[q]);
    Vec<A> v;
    std::memcpy(&v, lanes, sizeof v);
    return v;
  }
  static SAEP_INLINE void store(T* p, Vec<A> v) {
    A lanes[vec_lanes<A>()];
    std::memcpy(lanes, &v, sizeof v);
    for (int q = 0; q < vec_lanes<A>(); ++q) p[q] = Convert<T, A>::store(lanes[q]);
  }
};
template <typename A>
struct VecIO<A, A> {
  static SAEP_INLINE Vec<A> load(const A* p) {
    Vec<A> v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static SAEP_INLINE void store(A* p, Vec<A> v) { std::memcpy(p, &v, sizeof v); }
};

// A pixel's channels [c, c + kStep) as kVecs Vecs of the compute type, and back. For bf16
// the 32 channels of one 64-byte load split into even and odd channels (a shift and a mask,
// no shuffle); the weights they meet are laid out the same way (Packing::deinterleave) and
// the store interleaves them back. Each channel's arithmetic is unchanged. AVX512_BF16's
// vdpbf16ps, which reads bf16 without a conversion, was slower on this project's Xeon
// (scratch loop, 12 chains, one thread, ns per 1000 useful multiply-adds): the shift/mask and
// an FMA per pixel line 24.7-26.5, vdpbf16ps with a (w, 0) weight pair 52.1-53.1, two tap
// pairs unpacked (vpunpck{l,h}wd) into one vdpbf16ps 36.7-40.3; FMAs alone 12.1-13.4.
template <typename T, typename A>
struct Packing {
  static constexpr int kVecs = 1;
  static constexpr int kStep = vec_lanes<A>();
  static constexpr bool kDeinterleaved = false;
  // vector Q of the group at p (what load puts into v[Q])
  template <int Q>
  static SAEP_INLINE Vec<A> load_vec(const T* p) {
    static_assert(Q == 0, "one vector a group");
    return VecIO<T, A>::load(p);
  }
  static SAEP_INLINE void load(const T* p, Vec<A>* v) { v[0] = load_vec<0>(p); }
  static SAEP_INLINE void store(T* p, const Vec<A>* v) { VecIO<T, A>::store(p, v[0]); }
  // store, with stream_store where a group is a whole vector of T (p aligned to it)
  static SAEP_INLINE void stream(T* p, const Vec<A>* v) {
    if constexpr (std::is_same<T, A>::value)
      stream_store(p, v[0]);
    else
      store(p, v);
  }
};
template <>
struct Packing<bf16, float> {
  typedef uint32_t Bits __attribute__((vector_size(64)));
  static constexpr int kVecs = 2;
  static constexpr int kStep = 32;
  static constexpr bool kDeinterleaved = true;
  // vector 0: channels c, c + 2, ..., c + 30; vector 1: channels c + 1, c + 3, ..., c + 31
  template <int Q>
  static SAEP_INLINE Vec<float> load_vec(const bf16* p) {
    static_assert(Q == 0 || Q == 1, "two vectors a group");
    Bits u;
    std::memcpy(&u, p, sizeof u);
    if constexpr (Q == 0)
      return (Vec<float>)(u << 16);
    else
      return (Vec<float>)(u & 0xffff0000u);
  }
  static SAEP_INLINE void load(const bf16* p, Vec<float>* v) {
    v[0] = load_vec<0>(p);
    v[1] = load_vec<1>(p);
  }
  static SAEP_INLINE Bits round(Vec<float> v) {  // float_to_bf16, lane-wise
    const Bits u = (Bits)v;
    const Bits rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const Bits nan = (Bits)(v != v);
    return select(nan, Bits{} + 0x7fc0u, rounded);
  }
  static SAEP_INLINE void store(bf16* p, const Vec<float>* v) {
    const Bits u = round(v[0]) | (round(v[1]) << 16);
    std::memcpy(p, &u, sizeof u);
  }
  static SAEP_INLINE void stream(bf16* p, const Vec<float>* v) {
    stream_store(p, round(v[0]) | (round(v[1]) << 16));
  }
  // dst[c0 + q] for q < 16 is src[c0 + 2q], dst[c0 + 16 + q] is src[c0 + 2q + 1], per full
  // group of 32 channels; the tail is copied as it is.
  static void deinterleave(const float* src, float* dst, int64_t C) {
    int64_t c0 = 0;
    for (; c0 + 32 <= C; c0 += 32)
      for (int q = 0; q < 16; ++q) {
        dst[c0 + q] = src[c0 + 2 * q];
        dst[c0 + 16 + q] = src[c0 + 2 * q + 1];
      }
    for (; c0 < C; ++c0) dst[c0] = src[c0];
  }
  // the inverse: back to channel order
  static void interleave(const float* src, float* dst, int64_t C) {
    int64_t c0 = 0;
    for (; c0 + 32 <= C; c0 += 32)
      for (int q = 0; q < 16; ++q) {
        dst[c0 + 2 * q] = src[c0 + q];
        dst[c0 + 2 * q + 1] = src[c0 + 16 + q];
      }
    for (; c0 < C; ++c0) dst[c0] = src[c0];
  }
};

// Rows of C values of A in scratch memory (weights, folded weights, weight-gradient
// accumulators, the max backward's g_z ring) are this far apart: C plus two cache lines, so
// that the k*k rows a loop reads together do not all fall into the same L1 set (with C a power
// of two they would: 4 KB apart in fp32, and an 8-way L1 holds 8 of them). Measured
// (cpu_kernel_bench, llava15-7b B=8, 2 threads, interleaved; callgrind's 32 KB 8-way L1):
// the avg backward 30% (bf16) and 20% (fp32) faster, the max forward 7-10%, the max backward
// 5-10%, the simulated L1 misses of the max forward 2.5x fewer in bf16. One cache line of
// padding instead made the fp32 avg forward 11% slower at C = 1024; two lines, four or eight
// did not.
template <typename A>
SAEP_INLINE int64_t padded_stride(int64_t C) {
  return C + int64_t(128 / sizeof(A));
}

// A task's image of its layer, and the sizes its loops use.
template <typename T, typename A>
struct View {
  const Geometry& g;
  int k, k1, pad;
  int64_t H, W, Ho, Wo, C, kc, st;
  int64_t ws;  // the stride of the task's weight rows in scratch memory (padded_stride)
  const T* x;  // image b of layer l at pixel (0, 0)

  View(const LayerPtrs& lp, const Task& t)
      : g(t.g), k(g.ksize), k1(g.ksize + 1), pad(g.pad()), H(g.height), W(g.width),
        Ho(g.out_height()), Wo(g.out_width()), C(g.channels), kc(g.kc()),
        st(lp.stride_t[t.l]), ws(padded_stride<A>(g.channels)),
        x(static_cast<const T*>(lp.data[t.l]) +
          (t.packed ? t.token * st : t.b * lp.stride_b[t.l] + g.prefix * st)) {}

  const T* px(int64_t r, int64_t c) const { return x + (r * W + c) * st; }
};

// Calls f(a, e, x) for each in-grid pixel x of window (oi, oj)'s (k+1)x(k+1) patch: input
// row 2*oi + a - p, column 2*oj + e - p (out-of-grid pixels are the conv's zero padding).
template <typename T, typename A, typename F>
SAEP_INLINE void for_patch(const View<T, A>& v, int64_t oi, int64_t oj, F&& f) {
  for (int a = 0; a < v.k1; ++a) {
    const int64_t r = 2 * oi + a - v.pad;
    if (r < 0 || r >= v.H) continue;
    for (int e = 0; e < v.k1; ++e) {
      const int64_t col = 2 * oj + e - v.pad;
      if (col < 0 || col >= v.W) continue;
      f(a, e, v.px(r, col));
    }
  }
}

// Calls f(u, vv, x) for each in-grid pixel x under tap (u, vv) of the kxk conv centred on
// pixel (i, j): input row i + u - p, column j + vv - p (out-of-grid pixels are zero padding).
template <typename T, typename A, typename F>
SAEP_INLINE void for_taps(const View<T, A>& v, int64_t i, int64_t j, F&& f) {
  for (int u = 0; u < v.k; ++u) {
    const int64_t r = i + u - v.pad;
    if (r < 0 || r >= v.H) continue;
    for (int vv = 0; vv < v.k; ++vv) {
      const int64_t col = j + vv - v.pad;
      if (col < 0 || col >= v.W) continue;
      f(u, vv, v.px(r, col));
    }
  }
}

// The task's weights, channel-contiguous: w[tap][c] for tap = u*k + v, rows
// padded_stride(C) apart.
template <typename A>
SAEP_INLINE void task_weights(const Geometry& g, const void* weight, const Task& t,
                              std::vector<A>& w) {
  const int taps = g.ksize * g.ksize;
  const int64_t ws = padded_stride<A>(g.channels);
  w.resize(size_t(taps * ws));
  const A* src = static_cast<const A*>(weight) + t.l * g.channels;
  for (int tap = 0; tap < taps; ++tap)
    std::copy_n(src + tap * g.kc(), g.channels, w.begin() + tap * ws);
}

// The four window extents, numbered for the folded avg kernels: bit 1 set when the window
// has a single row, bit 0 when it has a single column.
SAEP_INLINE int variant_of(const WindowExtent& e) { return 2 * (2 - e.rows) + (2 - e.cols); }
SAEP_INLINE WindowExtent extent_of_variant(int variant) {
  return WindowExtent{(variant & 2) ? 1 : 2, (variant & 1) ? 1 : 2};
}
SAEP_INLINE int variant_of(const Geometry& g, int64_t oi, int64_t oj) {
  return variant_of(window_extent(g, oi, oj));
}

// Folded avg kernel of each window variant: wf[variant][a][e][c], a, e in [0, k] (rows
// padded_stride(C) apart, like w's), so that
//   y[oi, oj] = bias + sum_{a,e} wf[variant][a][e] * x[2*oi + a - p, 2*oj + e - p]
// (out-of-grid x are zero). It sums the kxk kernel shifted to each in-grid window position,
// plus the residual's identity tap, divided by the number of in-grid positions.
template <typename A>
SAEP_INLINE void fold_avg(const Geometry& g, const std::vector<A>& w, std::vector<A>& wf) {
  const int k = g.ksize, k1 = k + 1, pad = g.pad();
  const int64_t C = g.channels, ws = padded_stride<A>(C);
  wf.resize(size_t(4 * k1 * k1 * ws));
  for (int variant = 0; variant < 4; ++variant) {
    const WindowExtent ext = extent_of_variant(variant);
    // partial windows only on odd grids
    if ((ext.rows == 1 && g.height % 2 == 0) || (ext.cols == 1 && g.width % 2 == 0)) continue;
    const A inv = A(1) / A(ext.count());
    for (int a = 0; a < k1; ++a) {
      for (int e = 0; e < k1; ++e) {
        A* dst = wf.data() + ((variant * k1 + a) * k1 + e) * ws;
        const int ry = a - pad, rx = e - pad;
        const A centre =
            (g.residual && ry >= 0 && ry < ext.rows && rx >= 0 && rx < ext.cols) ? A(1) : A(0);
        for (int64_t c = 0; c < C; ++c) dst[c] = centre;
        for (int dy = 0; dy < ext.rows; ++dy) {
          const int u = a - dy;
          if (u < 0 || u >= k) continue;
          for (int dx = 0; dx < ext.cols; ++dx) {
            const int v = e - dx;
            if (v < 0 || v >= k) continue;
            const A* src = w.data() + (u * k + v) * ws;
            for (int64_t c = 0; c < C; ++c) dst[c] += src[c];
          }
        }
        for (int64_t c = 0; c < C; ++c) dst[c] *= inv;
      }
    }
  }
}

// The input bytes the next window row will read (stage, or read in place), fetched into L2 in
// slices while this row's blocks compute, so that reading memory overlaps the arithmetic
// (staging alone reads a burst and computes nothing, which the hardware prefetchers do not
// hide; read in place, one group of channels at a time, the rows are lines a pixel apart).
struct Prefetch {
  const char* begin[2];
  int64_t lines[2];
  // input rows r and r + 1 (those in the grid), columns [j_lo, j_lo + cols), when the rows'
  // pixels are contiguous (token stride C); nothing otherwise
  template <typename View_>
  static Prefetch rows(const View_& v, int64_t r, int64_t j_lo, int64_t cols) {
    Prefetch p{{nullptr, nullptr}, {0, 0}};
    for (int i = 0; i < 2; ++i)
      if (v.st == v.C && r + i < v.H) {
        p.begin[i] = reinterpret_cast<const char*>(v.px(r + i, j_lo));
        p.lines[i] = (cols * v.C * int64_t(sizeof(*v.x)) + 63) / 64;
      }
    return p;
  }
  // The lines of one slice, to be fetched a line at a time (next) or all that are left (rest).
  struct Cursor {
    const char* at[2];
    const char* end[2];
    SAEP_INLINE void next() {
      const int i = at[0] < end[0] ? 0 : 1;
      if (at[i] >= end[i]) return;
      __builtin_prefetch(at[i], 0, 2);
      at[i] += 64;
    }
    SAEP_INLINE void rest() {
      for (int i = 0; i < 2; ++i)
        for (; at[i] < end[i]; at[i] += 64) __builtin_prefetch(at[i], 0, 2);
    }
  };
  // slice b of blocks
  SAEP_INLINE Cursor slice(int64_t b, int64_t blocks) const {
    Cursor c{};
    for (int i = 0; i < 2; ++i) {
      const int64_t per = (lines[i] + blocks - 1) / blocks;
      const int64_t l0 = std::min(lines[i], b * per), l1 = std::min(lines[i], l0 + per);
      c.at[i] = begin[i] + l0 * 64;
      c.end[i] = begin[i] + l1 * 64;
    }
    return c;
  }
  // slice b of blocks, all at once
  SAEP_INLINE void block(int64_t b, int64_t blocks) const { slice(b, blocks).rest(); }
};

// The input rows one window row reads (its K1 = k + 1 patch rows), converted to the compute
// type once, in Packing's channel order (block b, a vector of lanes, holds packed channels
// [b * VL, (b + 1) * VL)), pixels padded_stride(C) apart: a window's patch pixels, C * e bytes
// apart in the input (which puts them all into one or two L1 sets), fall into different sets
// here. The rows are a ring: input row r is slot r % K1, and the next window row stages only
// its two new rows. The columns are those of a strip of windows.
//
// Reading order: staging reads each new row's pixels of the strip whole and in order (a
// strip's width of tokens, which the prefetchers stream) and writes them in order; the
// windows then read the slots from L1/L2, one vector block at a time.
template <typename T, typename A>
struct StagedRows {
  using P = Packing<T, A>;
  int64_t groups;      // full Packing groups of channels staged (the rest is the tail)
  int64_t blocks;      // groups * kVecs vector blocks
  int64_t j_lo, cols;  // the strip's input columns [j_lo, j_lo + cols)
  int64_t px_stride;   // padded_stride(C)
  int64_t slot_stride;
  A* data;

  StagedRows(int64_t C, int64_t max_cols, int k1, std::vector<A>& buf)
      : groups(C / P::kStep), blocks(groups * P::kVecs), j_lo(0), cols(0),
        px_stride(padded_stride<A>(C)), slot_stride(max_cols * px_stride) {
    if (buf.size() < size_t(k1 * slot_stride)) buf.resize(size_t(k1 * slot_stride));
    data = buf.data();
  }
  // the staged pixel of input row r, strip column 0
  const A* slot(int64_t r, int k1) const { return data + (r % k1) * slot_stride; }
  // input rows r and r + 1 (those in the grid), columns [j_lo, j_lo + cols), when the row's
  // pixels are contiguous (token stride C); nothing otherwise
  template <typename View_>
  Prefetch next_rows(const View_& v, int64_t r) const {
    return Prefetch::rows(v, r, j_lo, cols);
  }
  // input row r, columns [j_lo, j_lo + cols), into its slot
  template <typename View_>
  SAEP_INLINE void stage(const View_& v, int64_t r, int k1) {
    A* dst = data + (r % k1) * slot_stride;
    for (int64_t j = 0; j < cols; ++j) {
      const T* px = v.px(r, j_lo + j);
      A* d = dst + j * px_stride;
      for (int64_t g = 0; g < groups; ++g) {
        Vec<A> x[P::kVecs];
        P::load(px + g * P::kStep, x);
        for (int q = 0; q < P::kVecs; ++q)
          VecIO<A, A>::store(d + (g * P::kVecs + q) * vec_lanes<A>(), x[q]);
      }
    }
  }
};

// Weight rows (rows of them, ws apart, C channels used) and the bias (may be null) in
// Packing's channel order, block b's at b * VL: the arguments themselves where Packing keeps
// the input's order, else deinterleaved copies in Scratch::packed_w and packed_b.
template <typename A>
struct PackedWeights {
  const A* w;
  const A* bias;
};

// Per-thread scratch memory, reused by the tasks a thread runs.
template <typename A>
struct Scratch {
  std::vector<A> w, wf, gw, gwf, gb, gz;
  std::vector<A> packed_w, packed_b;  // weights and bias in Packing's channel order
  PackedWeights<A> packed{nullptr, nullptr};  // the forward's: packed_w, packed_b or w, wf
  // in a chunk's scratch (fresh each call): the weights_key of the weights the forward's
  // tasks prepared last (in the thread's scratch, forward_scratch), -1 for none
  int64_t weights_key = -1;
  std::vector<A> ring;                 // the forward's staged input rows (StagedRows)
  std::vector<A> held;                 // results of a group's first vectors (store_block)
  std::vector<uint8_t> held_code;      // and the max forward's argmax codes of them
};

// The windows of one staged strip are walked in strips of columns so that the ring stays in
// L2: at most this many bytes of staged rows (the forward's strips).
constexpr int64_t kStagedBytes = int64_t(640) << 10;

// Walks the windows in column strips (one strip when the staged rows of the whole width fit in
// staged_bytes), and in each strip row by row: stages the rows window row oi reads that are not
// staged yet, then calls window_row(oi, oj_begin, oj_end, staged).
template <int K1, typename T, typename A, typename F>
SAEP_INLINE void for_staged_strips(const View<T, A>& v, Scratch<A>& s, int64_t staged_bytes,
                                   F&& window_row) {
  const int64_t col_bytes = std::max<int64_t>(1, v.C) * int64_t(sizeof(A)) * K1;
  const int64_t fit_cols = std::max<int64_t>(K1, staged_bytes / col_bytes);
  // a strip of n windows reads at most 2n + K1 - 2 columns
  const int64_t strip_windows =
      fit_cols >= v.W ? v.Wo : std::max<int64_t>(1, (fit_cols - K1 + 2) / 2);
  StagedRows<T, A> st(v.C, std::min<int64_t>(v.W, 2 * strip_windows + K1 - 2), K1, s.ring);
  for (int64_t oj0 = 0; oj0 < v.Wo; oj0 += strip_windows) {
    const int64_t oj1 = std::min(v.Wo, oj0 + strip_windows);
    st.j_lo = std::max<int64_t>(0, 2 * oj0 - v.pad);
    st.cols = std::min<int64_t>(v.W, 2 * (oj1 - 1) - v.pad + K1) - st.j_lo;
    int64_t next_row = 0;  // the first input row not staged yet
    for (int64_t oi = 0; oi < v.Ho; ++oi) {
      const int64_t r0 = 2 * oi - v.pad;
      const int64_t r_end = std::min<int64_t>(v.H, r0 + K1);
      for (int64_t r = std::max(next_row, r0); r < r_end; ++r) st.stage(v, r, K1);
      next_row = std::max(next_row, r_end);
      window_row(oi, oj0, oj1, st);
    }
  }
}

// Calls f(std::integral_constant<int, K1>{}) for the patch size K1 = k + 1 (2, 4, 6 or 8), so
// that a kernel's loops over taps have compile-time trip counts.
template <typename F>
SAEP_INLINE void with_patch_size(int k1, F&& f) {
  switch (k1) {
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 6: return f(std::integral_constant<int, 6>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

// Vector block b of K x K per-tap rows (weights or weight-gradient accumulators; tap (u, e)'s
// row at (u * K + e) * ws) into registers, and back.
template <int K, typename A>
SAEP_INLINE void load_taps(const A* rows, int64_t ws, int64_t b, Vec<A> (&v)[K][K]) {
#pragma GCC unroll 64
  for (int u = 0; u < K; ++u)
#pragma GCC unroll 16
    for (int e = 0; e < K; ++e)
      v[u][e] = VecIO<A, A>::load(rows + (u * K + e) * ws + b * vec_lanes<A>());
}
template <int K, typename A>
SAEP_INLINE void store_taps(A* rows, int64_t ws, int64_t b, const Vec<A> (&v)[K][K]) {
#pragma GCC unroll 64
  for (int u = 0; u < K; ++u)
#pragma GCC unroll 16
    for (int e = 0; e < K; ++e)
      VecIO<A, A>::store(rows + (u * K + e) * ws + b * vec_lanes<A>(), v[u][e]);
}

// A group's vectors are computed one block (vector) at a time, for each of a row's n outputs
// (windows or pixels); the first kVecs - 1 wait in s.held until the group's last is done and
// all are stored together (Packing::stream where o is aligned): vector q of output i goes to o.
template <typename T, typename A>
SAEP_INLINE void store_block(Scratch<A>& s, int64_t n, int q, int64_t i, Vec<A> r, T* o) {
  using P = Packing<T, A>;
  constexpr int VL = vec_lanes<A>();
  if (q + 1 < P::kVecs) {
    VecIO<A, A>::store(s.held.data() + (q * n + i) * VL, r);
    return;
  }
  Vec<A> all[P::kVecs];
  for (int h = 0; h + 1 < P::kVecs; ++h)
    all[h] = VecIO<A, A>::load(s.held.data() + (h * n + i) * VL);
  all[P::kVecs - 1] = r;
  if (reinterpret_cast<uintptr_t>(o) % (P::kStep * sizeof(T)) == 0)
    P::stream(o, all);
  else
    P::store(o, all);
}

template <typename T, typename A>
SAEP_INLINE PackedWeights<A> pack_weights(Scratch<A>& s, const A* w, int64_t rows, int64_t ws,
                                          int64_t C, const A* bias) {
  using P = Packing<T, A>;
  if constexpr (!P::kDeinterleaved) {
    return {w, bias};
  } else {
    s.packed_w.resize(size_t(rows * ws));
    for (int64_t row = 0; row < rows; ++row)
      P::deinterleave(w + row * ws, s.packed_w.data() + row * ws, C);
    if (!bias) return {s.packed_w.data(), nullptr};
    s.packed_b.resize(size_t(C));
    P::deinterleave(bias, s.packed_b.data(), C);
    return {s.packed_w.data(), s.packed_b.data()};
  }
}

// Runs TaskFn<T, A>::run(params, task, scratch) over the tasks [begin, end), one scratch for
// them all. (A per-thread scratch kept between calls saves a small problem the page faults of
// its fresh buffers, but made the fp32 avg forward at llava15-7b B=8 50% slower, measured
// interleaved and not understood; not kept.)
template <template <typename, typename> class TaskFn, typename T, typename A, typename Params>
SAEP_INLINE void run_chunk(const Params& p, int64_t begin, int64_t end) {
  Scratch<A> s;
  for (int64_t t = begin; t < end; ++t) TaskFn<T, A>::run(p, task_at(p, t), s);
  store_fence();
}

// A direction's entry points in this unit's instruction set, NAME_entry_points: TASK over a
// range of tasks, one non-template function per dtype (the kernels inlined into it).
#define SAEP_DTYPE_ENTRY_POINTS(NAME, PARAMS, TASK)                                           \
  SAEP_CPU_ISA_TARGET void NAME##_f32(const PARAMS& p, int64_t b, int64_t e) {                \
    run_chunk<TASK, float, float>(p, b, e);                                                   \
  }                                                                                           \
  SAEP_CPU_ISA_TARGET void NAME##_f64(const PARAMS& p, int64_t b, int64_t e) {                \
    run_chunk<TASK, double, double>(p, b, e);                                                 \
  }                                                                                           \
  SAEP_CPU_ISA_TARGET void NAME##_bf16(const PARAMS& p, int64_t b, int64_t e) {               \
    run_chunk<TASK, bf16, float>(p, b, e);                                                    \
  }                                                                                           \
  SAEP_CPU_ISA_TARGET void NAME##_f16(const PARAMS& p, int64_t b, int64_t e) {                \
    run_chunk<TASK, f16, float>(p, b, e);                                                     \
  }                                                                                           \
  extern const DtypeEntryPoints<PARAMS> NAME##_entry_points = {NAME##_f32, NAME##_f64,       \
                                                               NAME##_bf16, NAME##_f16};

}  // namespace SAEP_CPU_ISA
}  // namespace cpu
}  // namespace saep

// In the baseline unit: every instruction set's NAME_entry_points, by capability (the
// baseline's for those not compiled), as NAME_by_capability.
#if SAEP_CPU_MULTI_ISA
#define SAEP_CPU_DISPATCH(NAME, PARAMS)                                                       \
  namespace avx2 {                                                                            \
  extern const DtypeEntryPoints<PARAMS> NAME##_entry_points;                                  \
  }                                                                                           \
  namespace avx512 {                                                                          \
  extern const DtypeEntryPoints<PARAMS> NAME##_entry_points;                                  \
  }                                                                                           \
  const DtypeEntryPoints<PARAMS>* const NAME##_by_capability[kNumCpuCapabilities] = {         \
      &baseline::NAME##_entry_points, &avx2::NAME##_entry_points,                             \
      &avx512::NAME##_entry_points};
#else
#define SAEP_CPU_DISPATCH(NAME, PARAMS)                                                       \
  const DtypeEntryPoints<PARAMS>* const NAME##_by_capability[kNumCpuCapabilities] = {         \
      &baseline::NAME##_entry_points, &baseline::NAME##_entry_points,                         \
      &baseline::NAME##_entry_points};
#endif
