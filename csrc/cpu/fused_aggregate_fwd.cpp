// saep-kernels CPU kernels: the forward of the fused op (tasks, memory order and the avg fold:
// task.h).
//
// avg: one stride-2 (k+1)x(k+1) conv with the folded kernel of the window's variant. fp32/fp64:
// a window row's input rows are staged once (pixels apart by a padded stride: StagedRows);
// then, one vector of channels at a time, the folded weights stay in registers while the row's
// windows slide along, four at a time. bf16 with AVX-512: from the input in place, window row
// by window row and group by group in passes of two patch rows, the pass's weights in
// registers (avg_forward_row_passes). Other 16-bit inputs: window by window (bf16 in pairs),
// each over all channels (avg_forward_k says why).
// max: one vector of channels at a time, the weights in registers, from the same staged rows
// (bf16 and fp32 with AVX-512: from the input in place, max_forward_in_place); a window's
// four conv outputs (two windows' eight, kMaxWindows) are interleaved chains, then the running
// maximum; the argmax (window position 0..3) is saved for the backward when asked. bf16 in
// place with k <= 3: both vector blocks of a group (even and odd channels) a window a step,
// their eight chains from one load of each pixel (max_window_row_group, kMaxGroupWalk).
// max_window (each position a dot product over all channels, from the input in place) does the
// channels past the last full vector group.
#include "fused_aggregate_cpu.h"
#include "task.h"

namespace saep {
namespace cpu {
namespace SAEP_CPU_ISA {
namespace {

// One window over the channels [c_begin, C): any extent, out-of-grid pixels skipped (the
// channels past the last full vector group; the staged path does the others).
template <typename T, typename A>
SAEP_INLINE void avg_window(const View<T, A>& v, const A* wv, const A* bias, int64_t oi,
                            int64_t oj, T* o, int64_t c_begin) {
  for_chunks<lanes<A>()>(v.C - c_begin, [&](auto chunk, int64_t cc, int64_t n) SAEP_LAMBDA_INLINE {
    const int64_t len = SAEP_LEN(chunk, n);
    const int64_t c = c_begin + cc;
    A acc[lanes<A>()];
    for (int64_t q = 0; q < len; ++q) acc[q] = bias ? bias[c + q] : A(0);
    for_patch(v, oi, oj, [&](int a, int e, const T* x) SAEP_LAMBDA_INLINE {
      const T* xp = x + c;
      const A* wp = wv + (a * v.k1 + e) * v.ws + c;
      for (int64_t q = 0; q < len; ++q) acc[q] += ld<T, A>(xp[q]) * wp[q];
    });
    for (int64_t q = 0; q < len; ++q) o[c + q] = Convert<T, A>::store(acc[q]);
  });
}

// One window of max pooling over the channels [c_begin, C), as avg_window.
template <typename T, typename A>
SAEP_INLINE void max_window(const View<T, A>& v, const A* w, const A* bias, int64_t oi,
                            int64_t oj, T* o, uint8_t* am, int64_t c_begin) {
  constexpr int L = lanes<A>() / 2;
  const WindowExtent ext = window_extent(v.g, oi, oj);
  for_chunks<L>(v.C - c_begin, [&](auto chunk, int64_t cc, int64_t n) SAEP_LAMBDA_INLINE {
    const int64_t len = SAEP_LEN(chunk, n);
    const int64_t c = c_begin + cc;
    // z = conv output at grid position (i, j) for this chunk's channels
    auto conv_at = [&](int64_t i, int64_t j, A* z) SAEP_LAMBDA_INLINE {
      for (int64_t q = 0; q < len; ++q) z[q] = bias ? bias[c + q] : A(0);
      if (v.g.residual) {
        const T* xp = v.px(i, j) + c;
        for (int64_t q = 0; q < len; ++q) z[q] += ld<T, A>(xp[q]);
      }
      for_taps(v, i, j, [&](int u, int vv, const T* x) SAEP_LAMBDA_INLINE {
        const T* xp = x + c;
        const A* wp = w + (u * v.k + vv) * v.ws + c;
        for (int64_t q = 0; q < len; ++q) z[q] += ld<T, A>(xp[q]) * wp[q];
      });
    };
    // the window's first position (2oi, 2oj) is always on the grid
    A best[L];
    uint8_t code[L];
    conv_at(2 * oi, 2 * oj, best);
    for (int64_t q = 0; q < len; ++q) code[q] = 0;
    for (int d = 1; d < 4; ++d) {
      const int dy = d >> 1, dx = d & 1;
      if (dy >= ext.rows || dx >= ext.cols) continue;  // partial window of an odd grid
      A z[L];
      conv_at(2 * oi + dy, 2 * oj + dx, z);
      // window order 00, 01, 10, 11; a NaN wins, as in torch.max_pool2d
      for (int64_t q = 0; q < len; ++q) {
        const bool take = z[q] > best[q] || z[q] != z[q];
        best[q] = take ? z[q] : best[q];
        code[q] = take ? uint8_t(window_code(dy, dx)) : code[q];
      }
    }
    for (int64_t q = 0; q < len; ++q) o[c + q] = Convert<T, A>::store(best[q]);
    if (am)
      for (int64_t q = 0; q < len; ++q) am[c + q] = code[q];
  });
}

// NW neighbouring windows' folded conv for one vector block from the staged rows, their
// patches all in the grid (window i's starts 2 i columns right of window 0's, at col): each the
// bias, then the K1 x K1 taps in order, the order avg_window adds them. The windows' sums are
// independent chains, interleaved tap by tap so that the FMA latency of one overlaps the
// others; the weights w stay in registers across windows.
template <int K1, int NW, typename A>
SAEP_INLINE void avg_staged(const A* const* rows, int64_t col, int64_t ps,
                            const Vec<A> (&w)[K1][K1], Vec<A> b0, Vec<A> (&acc)[NW]) {
  for (int i = 0; i < NW; ++i) acc[i] = b0;
#pragma GCC unroll 16
  for (int a = 0; a < K1; ++a)
#pragma GCC unroll 16
    for (int e = 0; e < K1; ++e)
#pragma GCC unroll 8
      for (int i = 0; i < NW; ++i)
        acc[i] += VecIO<A, A>::load(rows[a] + col + (e + 2 * i) * ps) * w[a][e];
}

// One window at the grid's edge, as avg_staged: only the in-grid patch rows [a_lo, a_hi) and
// columns [e_lo, e_hi), the weights read from wv (tap (a, e) at (a * K1 + e) * ws).
template <int K1, typename A>
SAEP_INLINE Vec<A> avg_staged_edge(const A* const* rows, int64_t col, int64_t ps, const A* wv,
                                   int64_t ws, Vec<A> acc, int a_lo, int a_hi, int e_lo,
                                   int e_hi) {
  for (int a = a_lo; a < a_hi; ++a)
    for (int e = e_lo; e < e_hi; ++e)
      acc += VecIO<A, A>::load(rows[a] + col + e * ps) * VecIO<A, A>::load(wv + (a * K1 + e) * ws);
  return acc;
}

template <int K1, typename T, typename A>
SAEP_INLINE void avg_forward_staged(const View<T, A>& v, const A* bias, T* out, Scratch<A>& s) {
  using P = Packing<T, A>;
  constexpr int VL = vec_lanes<A>();
  // windows computed together (independent FMA chains)
  constexpr int kWindows = 4;
  const int64_t ws = v.ws;
  // the folded weights and the bias in Packing's channel order: block b's are at b * VL
  const PackedWeights<A> packed = s.packed;
  const A* const packed_w = packed.w;
  const A* const packed_b = packed.bias;
  s.held.resize(size_t(P::kVecs * v.Wo * VL));
  for_staged_strips<K1>(v, s, kStagedBytes, [&](int64_t oi, int64_t oj0, int64_t oj1,
                                  const StagedRows<T, A>& st) SAEP_LAMBDA_INLINE {
    const int64_t r0 = 2 * oi - v.pad;
    const int a_lo = int(std::max<int64_t>(0, -r0)), a_hi = int(std::min<int64_t>(K1, v.H - r0));
    const A* rows[K1];
    for (int a = a_lo; a < a_hi; ++a) rows[a] = st.slot(r0 + a, K1);
    T* o_row = out + oi * v.Wo * v.kc;
    const Prefetch next = st.next_rows(v, r0 + K1);
    for (int64_t b = 0; b < st.blocks; ++b) {
      next.block(b, st.blocks);
      const int64_t g = b / P::kVecs;
      const int q = int(b % P::kVecs);
      // this block's folded weights of the row's first variant, one vector per tap
      Vec<A> w[K1][K1];
      const A* wv = packed_w + variant_of(v.g, oi, 0) * K1 * K1 * ws + b * VL;
#pragma GCC unroll 64
      for (int a = 0; a < K1; ++a)
#pragma GCC unroll 16
        for (int e = 0; e < K1; ++e) w[a][e] = VecIO<A, A>::load(wv + (a * K1 + e) * ws);
      const Vec<A> b0 = packed_b ? VecIO<A, A>::load(packed_b + b * VL) : Vec<A>{};
      const bool full_rows = a_lo == 0 && a_hi == K1;
      for (int64_t oj = oj0; oj < oj1;) {
        const int64_t j0 = 2 * oj - v.pad;
        const int64_t col = (j0 - st.j_lo) * st.px_stride + b * VL;
        T* o = o_row + oj * v.kc + g * P::kStep;
        // kWindows windows, then one, whose patches are all in the grid (then they are the
        // row's first variant: only a partial last window differs)
        if (full_rows && j0 >= 0 && j0 + 2 * (kWindows - 1) + K1 <= v.W && oj + kWindows <= oj1) {
          Vec<A> acc[kWindows];
          avg_staged<K1, kWindows>(rows, col, st.px_stride, w, b0, acc);
          for (int i = 0; i < kWindows; ++i)
            store_block<T, A>(s, v.Wo, q, oj + i, acc[i], o + i * v.kc);
          oj += kWindows;
        } else if (full_rows && j0 >= 0 && j0 + K1 <= v.W) {
          Vec<A> acc[1];
          avg_staged<K1, 1>(rows, col, st.px_stride, w, b0, acc);
          store_block<T, A>(s, v.Wo, q, oj, acc[0], o);
          ++oj;
        } else {
          const int e_lo = int(std::max<int64_t>(0, -j0));
          const int e_hi = int(std::min<int64_t>(K1, v.W - j0));
          const A* wv = packed_w + variant_of(v.g, oi, oj) * K1 * K1 * ws + b * VL;
          const Vec<A> acc = avg_staged_edge<K1>(rows, col, st.px_stride, wv, ws, b0, a_lo, a_hi,
                                                 e_lo, e_hi);
          store_block<T, A>(s, v.Wo, q, oj, acc, o);
          ++oj;
        }
      }
    }
    // the channels past the last full group
    const int64_t c_tail = st.groups * P::kStep;
    if (c_tail < v.C)
      for (int64_t oj = oj0; oj < oj1; ++oj)
        avg_window(v, s.wf.data() + variant_of(v.g, oi, oj) * K1 * K1 * ws, bias, oi, oj,
                   o_row + oj * v.kc, c_tail);
  });
}

// Window by window (16-bit inputs), from the input in place, each window over all channels.
// Windows (oi, oj) and (oi, oj + 1) of one variant, whose patch columns 2oj - p .. 2oj + k + 2
// - p are all in the grid, over the channels [0, C - C % kStep): each weight vector is loaded
// once for both windows and each pixel once for the taps that use it. wv and bias are in
// Packing's channel order. Returns the first channel not done. The taps add in the order
// avg_window adds them.
template <int K1, typename T, typename A>
SAEP_INLINE int64_t avg_window_pair(const View<T, A>& v, const A* wv, int64_t ws,
                                    const A* bias, int64_t oi, int64_t oj, T* o0, T* o1) {
  using P = Packing<T, A>;
  constexpr int VL = vec_lanes<A>(), NV = P::kVecs;
  const int64_t C = v.C, st = v.st;
  const int64_t r0 = 2 * oi - v.pad, j0 = 2 * oj - v.pad;
  const int a_lo = int(std::max<int64_t>(0, -r0)), a_hi = int(std::min<int64_t>(K1, v.H - r0));
  int64_t c = 0;
  for (; c + P::kStep <= C; c += P::kStep) {
    Vec<A> acc0[NV], acc1[NV];
    for (int q = 0; q < NV; ++q)
      acc0[q] = acc1[q] = bias ? VecIO<A, A>::load(bias + c + q * VL) : Vec<A>{};
    for (int a = a_lo; a < a_hi; ++a) {
      const T* row = v.px(r0 + a, j0) + c;
      const A* wr = wv + a * K1 * ws + c;
      Vec<A> x[K1 + 2][NV];
#pragma GCC unroll 16
      for (int e = 0; e < K1 + 2; ++e) P::load(row + e * st, x[e]);
#pragma GCC unroll 16
      for (int e = 0; e < K1; ++e)
        for (int q = 0; q < NV; ++q) {
          const Vec<A> w = VecIO<A, A>::load(wr + e * ws + q * VL);
          acc0[q] += x[e][q] * w;
          acc1[q] += x[e + 2][q] * w;
        }
    }
    P::store(o0 + c, acc0);
    P::store(o1 + c, acc1);
  }
  return c;
}

template <int K1, typename T, typename A>
SAEP_INLINE void avg_forward_windows(const View<T, A>& v, const A* bias, T* out,
                                     Scratch<A>& s) {
  // Window pairs for bf16 only: measured (cpu_kernel_bench, llava15-7b B=8, 2 threads,
  // interleaved) 15% faster than avg_window in bf16 but 60% slower in fp32, where a pair's 24
  // pixel rows 4 KB apart share one L1 set.
  constexpr bool kPairs = std::is_same<T, bf16>::value;
  // the pair kernel's weights: one row of C (+ padding) per variant and tap, in Packing's
  // channel order
  const int64_t ws = v.ws;
  const PackedWeights<A> packed = s.packed;
  const A* const packed_w = packed.w;
  const A* const packed_b = packed.bias;
  for (int64_t oi = 0; oi < v.Ho; ++oi) {
    for (int64_t oj = 0; oj < v.Wo; ++oj) {
      const int64_t wofs = variant_of(v.g, oi, oj) * K1 * K1 * ws;
      const A* wv = s.wf.data() + wofs;
      T* o = out + (oi * v.Wo + oj) * v.kc;
      const int64_t j0 = 2 * oj - v.pad;
      if (kPairs && oj + 1 < v.Wo && j0 >= 0 && j0 + K1 + 2 <= v.W &&
          variant_of(v.g, oi, oj + 1) == variant_of(v.g, oi, oj)) {
        const int64_t done =
            avg_window_pair<K1>(v, packed_w + wofs, ws, packed_b, oi, oj, o, o + v.kc);
        avg_window(v, wv, bias, oi, oj, o, done);
        avg_window(v, wv, bias, oi, oj + 1, o + v.kc, done);
        ++oj;
      } else {
        avg_window(v, wv, bias, oi, oj, o, 0);
      }
    }
  }
}

// The row passes prefetch the group kPrefetchGroups ahead of each pixel they load where the
// pixels are more than kPrefetchStride bytes apart (the longest stride the L1 stride prefetcher
// of recent Intel cores follows: 2 KB). A pass's loads are a pixel apart, each a new line; the
// hardware did not have the later groups' lines of such pixels at hand in time (inferred from
// the timings: this machine has no PMU counters). Measured (cpu_kernel_bench, bf16, k=3, B=8,
// K=4, 2 threads, interleaved, ms), with vs without: 27 x 27, C=1152 (siglip-so400m, 2304-byte
// pixels) 2.75-3.05 vs 3.55-3.84; 24 x 24, C=1024 (llava15-7b, 2048-byte pixels) 2.05-2.12 vs
// 1.92-2.00, no gain, so not there. A sweep with the prefetch into L2 (as fast as into L1 at
// siglip-so400m): C=1088 2.69-2.71 vs 3.35-3.79 (27 x 27), 1.85 vs 2.06-2.13 (24 x 24); C=1280
// 3.28-3.60 vs 3.35-3.89, 2.33-2.55 vs 2.42-2.43; C=1024 and C=768 within the noise or slower.
// Prefetching 1, 3, 4 or 6 groups ahead, or the next window row's new input rows
// (Prefetch::rows), was no better than 2 groups.
constexpr int kPrefetchGroups = 2;
constexpr int64_t kPrefetchStride = 2048;

// 16-bit inputs from the input in place, window row by window row and one Packing group of
// channels at a time, in passes of two patch rows: a pass keeps the two rows' folded weights
// of both vectors of the group in registers while the row's windows slide along, two at a
// time where their patches' columns are all in the grid (each pixel loaded once for both),
// else one with its in-grid columns only; a window's sums wait in s.held between passes. Each
// sum adds the bias, then the taps row by row, as avg_window. Windows of another variant than
// the row's first (the last of an odd width) and the channels past the last full group:
// avg_window. kPrefetch: each pixel a pass loads also prefetches the same pixel's group
// kPrefetchGroups ahead (kPrefetchStride says when).
template <int K1, bool kPrefetch, typename T, typename A>
SAEP_INLINE void avg_forward_row_passes(const View<T, A>& v, const A* bias, T* out,
                                        Scratch<A>& s) {
  using P = Packing<T, A>;
  constexpr int NV = P::kVecs, VL = vec_lanes<A>(), NW = 2;
  const int64_t ws = v.ws, st = v.st, groups = v.C / P::kStep;
  const PackedWeights<A> packed = s.packed;
  s.held.resize(size_t(v.Wo * NV * VL));
  A* const held = s.held.data();
  for (int64_t oi = 0; oi < v.Ho; ++oi) {
    const int64_t r0 = 2 * oi - v.pad;
    const int a_lo = int(std::max<int64_t>(0, -r0)), a_hi = int(std::min<int64_t>(K1, v.H - r0));
    const int variant = variant_of(v.g, oi, 0);
    // the windows of the row's variant: all, or all but the last of an odd width
    const int64_t oj_end = variant_of(v.g, oi, v.Wo - 1) == variant ? v.Wo : v.Wo - 1;
    T* o_row = out + oi * v.Wo * v.kc;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c = g * P::kStep;
#pragma GCC unroll 4
      for (int a0 = 0; a0 < K1; a0 += 2) {
        const bool first = a0 == 0, last = a0 + 2 >= K1;
        const bool row_in[2] = {a0 >= a_lo && a0 < a_hi, a0 + 1 >= a_lo && a0 + 1 < a_hi};
        if (!first && !last && !row_in[0] && !row_in[1]) continue;
        Vec<A> w[2][K1][NV];
#pragma GCC unroll 2
        for (int d = 0; d < 2; ++d)
#pragma GCC unroll 8
          for (int e = 0; e < K1; ++e)
#pragma GCC unroll 2
            for (int h = 0; h < NV; ++h)
              w[d][e][h] = VecIO<A, A>::load(packed.w + ((variant * K1 + a0 + d) * K1 + e) * ws +
                                             (g * NV + h) * VL);
        const T* xrow[2];
        for (int d = 0; d < 2; ++d) xrow[d] = row_in[d] ? v.px(r0 + a0 + d, 0) + c : nullptr;
        // windows [oj, oj + n): their sums so far, then the pass's taps, then on
        const auto start = [&](int64_t oj, Vec<A>(&acc)[NV]) SAEP_LAMBDA_INLINE {
#pragma GCC unroll 2
          for (int h = 0; h < NV; ++h)
            acc[h] = first ? (packed.bias ? VecIO<A, A>::load(packed.bias + (g * NV + h) * VL)
                                          : Vec<A>{})
                           : VecIO<A, A>::load(held + (oj * NV + h) * VL);
        };
        const auto finish = [&](int64_t oj, Vec<A>(&acc)[NV]) SAEP_LAMBDA_INLINE {
          if (last) {
            P::store(o_row + oj * v.kc + c, acc);
          } else {
#pragma GCC unroll 2
            for (int h = 0; h < NV; ++h) VecIO<A, A>::store(held + (oj * NV + h) * VL, acc[h]);
          }
        };
        for (int64_t oj = 0; oj < oj_end;) {
          const int64_t j0 = 2 * oj - v.pad;
          if (oj + NW <= oj_end && j0 >= 0 && j0 + 2 * (NW - 1) + K1 <= v.W) {
            Vec<A> acc[NW][NV];
#pragma GCC unroll 2
            for (int i = 0; i < NW; ++i) start(oj + i, acc[i]);
#pragma GCC unroll 2
            for (int d = 0; d < 2; ++d) {
              if (!row_in[d]) continue;
#pragma GCC unroll 16
              for (int col = 0; col < K1 + 2 * (NW - 1); ++col) {
                Vec<A> x[NV];
                P::load(xrow[d] + (j0 + col) * st, x);
                // each column once: the next pair's first columns are this pair's last
                if (kPrefetch && col < 2 * NW)
                  __builtin_prefetch(xrow[d] + (j0 + col) * st + kPrefetchGroups * P::kStep, 0,
                                     3);
#pragma GCC unroll 2
                for (int i = 0; i < NW; ++i) {
                  const int e = col - 2 * i;
                  if (e < 0 || e >= K1) continue;
#pragma GCC unroll 2
                  for (int h = 0; h < NV; ++h) acc[i][h] += x[h] * w[d][e][h];
                }
              }
            }
#pragma GCC unroll 2
            for (int i = 0; i < NW; ++i) finish(oj + i, acc[i]);
            oj += NW;
            continue;
          }
          // one window, its in-grid columns [e_lo, e_hi)
          const int e_lo = int(std::max<int64_t>(0, -j0));
          const int e_hi = int(std::min<int64_t>(K1, v.W - j0));
          Vec<A> acc[NV];
          start(oj, acc);
#pragma GCC unroll 2
          for (int d = 0; d < 2; ++d) {
            if (!row_in[d]) continue;
#pragma GCC unroll 8
            for (int e = 0; e < K1; ++e) {
              if (e < e_lo || e >= e_hi) continue;
              Vec<A> x[NV];
              P::load(xrow[d] + (j0 + e) * st, x);
#pragma GCC unroll 2
              for (int h = 0; h < NV; ++h) acc[h] += x[h] * w[d][e][h];
            }
          }
          finish(oj, acc);
          ++oj;
        }
      }
    }
    const int64_t c_tail = groups * P::kStep;
    for (int64_t oj = 0; oj < v.Wo; ++oj) {
      const int64_t c_begin = oj < oj_end ? c_tail : 0;
      if (c_begin < v.C)
        avg_window(v, s.wf.data() + variant_of(v.g, oi, oj) * K1 * K1 * ws, bias, oi, oj,
                   o_row + oj * v.kc, c_begin);
    }
  }
}

// The staged path where staging keeps the input's width (fp32, fp64): measured (cpu_kernel_bench,
// B=8, 2 threads, interleaved) 12% faster for llava15-7b and 18% for siglip-so400m in fp32.
// bf16 inputs are not staged: staged in fp32 they were 10-15% slower than window pairs at B=8
// (though 1.6x faster for a single image whose input is in cache), the staged rows doubling
// the bytes written and read back through L2. Row passes from the input in place, the weights
// in registers, were faster than window pairs (AVX-512, ms): llava15-7b 2.15-2.34 vs 3.1-3.2,
// siglip-so400m 3.9-4.2 vs 4.7-5.0; with AVX-512 only: their 16 weight vectors and four sums
// need 32 registers, and with AVX2 (16 registers, two per 64-byte Vec) they spill: 5.8-6.7
// vs 5.1-5.3 ms for window pairs at llava15-7b (cpu_kernel_bench, B=8, 2 threads,
// interleaved). Four windows at a time instead of two were slower (3.25 vs 2.16 ms).
constexpr bool kAvgRowPasses = SAEP_CPU_VEC_REGISTERS >= 32;

template <int K1, typename T, typename A>
SAEP_INLINE void avg_forward_k(const View<T, A>& v, const A* bias, T* out, Scratch<A>& s) {
  if constexpr (sizeof(T) == sizeof(A))
    avg_forward_staged<K1>(v, bias, out, s);
  else if constexpr (kAvgRowPasses && std::is_same<T, bf16>::value) {
    if (v.st * int64_t(sizeof(T)) > kPrefetchStride)
      avg_forward_row_passes<K1, true>(v, bias, out, s);
    else
      avg_forward_row_passes<K1, false>(v, bias, out, s);
  }
  else
    avg_forward_windows<K1>(v, bias, out, s);
}

template <typename T, typename A>
SAEP_INLINE void avg_forward(const View<T, A>& v, const A* bias, T* out, Scratch<A>& s) {
  with_patch_size(v.k1, [&](auto k1) SAEP_LAMBDA_INLINE {
    avg_forward_k<decltype(k1)::value>(v, bias, out, s);
  });
}

// ---- max: from the staged rows, or from the input in place

// The running maximum: takes position d's value z where it is larger than best or NaN (a NaN
// wins, as in torch.max_pool2d; the rule of max_window), with its window_code.
template <typename A, typename M>
SAEP_INLINE void max_take(Vec<A> z, int d, Vec<A>& best, M& code) {
  const M take = (z > best) | (z != z);
  best = select(take, z, best);
  code = select(take, M{} + window_code(d >> 1, d & 1), code);
}

// A window's max over its positions' sums z[d] (those with in(d); position 0 always is), by
// max_take's rule, and with kCodes the position's window_code in code (M{} without). Without
// codes, a running z > best ? z : best (one vmaxps with AVX-512: it keeps best on ties, as
// max_take does, but it drops a NaN z), then max_take's own sequence where a NaN is among the
// sums. Measured with select's masked move (cpu_kernel_bench forward_no_argmax, AVX-512 in place,
// B=8, 2 threads, 10 interleaved rounds, median ms [range]) against max_take's sequence for
// every window: bf16 llava15-7b 3.64 [3.46-3.83] vs 3.89 [3.75-4.05], siglip-so400m 4.57
// [4.41-4.80] vs 4.86 [4.67-5.39], faster in each round; fp32 the same (8 rounds: 4.38 vs 4.43,
// 7.72 vs 7.64).
template <bool kCodes, typename A, typename M, typename In>
SAEP_INLINE void window_max(const Vec<A> (&z)[4], const In& in, Vec<A>& best, M& code) {
  best = z[0];
  code = M{};
  if constexpr (!kCodes) {
#pragma GCC unroll 4
    for (int d = 1; d < 4; ++d)
      if (in(d)) best = select(z[d] > best, z[d], best);
    if (!any_nan<A>(z[1], z[2], z[3])) return;
    best = z[0];
  }
#pragma GCC unroll 4
  for (int d = 1; d < 4; ++d)
    if (in(d)) max_take<A, M>(z[d], d, best, code);
}

// every position of a window in the grid
struct AllPositions {
  SAEP_INLINE bool operator()(int) const { return true; }
};

// One window's max for NB vector blocks of the same pixels (bf16: a group's even and odd
// channels): each in-grid position (dy, dx) of the window is the bias, the residual and the
// in-grid k x k taps in the order max_window adds them, block h's weights w[h] and bias b0[h] in
// registers; px(a, j, x) puts the blocks of patch row a at input column j into x[0 .. NB) (the
// window's patch starts at column j0). The four positions' sums are interleaved pixel by pixel:
// each in-grid patch pixel is loaded once and added to the positions whose taps it meets, which
// keeps each position's taps in max_window's order (row-major); a pixel outside the grid is
// skipped (not added as a zero, which would turn -0 into +0 and 0 * inf into NaN), and so is a
// position outside it (its sum is not taken into the max). kAllIn: the window's patch is all in
// the grid (rows_in .. e_hi are then not read). Measured (one block, at the grid's edge) against
// the tap-by-tap loop it replaced (a branch and a load per tap; cpu_kernel_bench, AVX-512 in
// place, B=8, 2 threads, interleaved, median ms): forward_no_argmax bf16 llava15-7b 3.25 vs
// 3.87, siglip-so400m 4.33 vs 4.83 (6 rounds, faster in each), fp32 4.55 vs 4.82, 7.07 vs 8.00;
// the bf16 forward with the argmax 3.81 vs 4.24, 5.24 vs 6.06. Skipping the edge windows (wrong;
// a bound; about a quarter of the windows here) gave bf16 2.41 / 3.23 ms, fp32 3.25 / 5.77: with
// this loop they cost less per window than the inside ones (their out-of-grid taps skipped).
template <int K1, int NB, bool kAllIn, bool kResidual, bool kCodes, typename A, typename M,
          typename Px>
SAEP_INLINE void max_blocks_window(const Px& px, int64_t j0, const Vec<A> (*w)[K1 - 1][K1 - 1],
                                   const Vec<A>* b0, int rows_in, int cols_in, int a_lo,
                                   int a_hi, int e_lo, int e_hi, Vec<A>* best, M* code) {
  constexpr int K = K1 - 1, pad = K / 2;
  // the patch rows and columns in the grid, as bits
  const unsigned row_in = kAllIn ? (1u << K1) - 1 : (1u << a_hi) - (1u << a_lo);
  const unsigned col_in = kAllIn ? (1u << K1) - 1 : (1u << e_hi) - (1u << e_lo);
  const auto position_in = [&](int d) SAEP_LAMBDA_INLINE {
    return kAllIn || ((d >> 1) < rows_in && (d & 1) < cols_in);
  };
  Vec<A> z[NB][4];
#pragma GCC unroll 4
  for (int d = 0; d < 4; ++d) {
    Vec<A> x[NB];
    if (kResidual && position_in(d)) px((d >> 1) + pad, j0 + (d & 1) + pad, x);
#pragma GCC unroll 2
    for (int h = 0; h < NB; ++h) {
      z[h][d] = b0[h];
      if (kResidual && position_in(d)) z[h][d] += x[h];
    }
  }
#pragma GCC unroll 16
  for (int a = 0; a < K1; ++a)
#pragma GCC unroll 16
    for (int c = 0; c < K1; ++c) {
      if (!((row_in >> a) & (col_in >> c) & 1u)) continue;
      Vec<A> x[NB];
      px(a, j0 + c, x);
#pragma GCC unroll 2
      for (int h = 0; h < NB; ++h)
#pragma GCC unroll 4
        for (int d = 0; d < 4; ++d) {
          const int u = a - (d >> 1), e = c - (d & 1);
          if (u >= 0 && u < K && e >= 0 && e < K) z[h][d] += x[h] * w[h][u][e];
        }
    }
#pragma GCC unroll 2
  for (int h = 0; h < NB; ++h) window_max<kCodes, A>(z[h], position_in, best[h], code[h]);
}

// The same for one vector block at the grid's edge: px(a, j) is its vector.
template <int K1, bool kResidual, bool kCodes, typename A, typename M, typename Px>
SAEP_INLINE void max_block_edge(const Px& px, int64_t j0, const Vec<A> (&w)[K1 - 1][K1 - 1],
                                Vec<A> b0, int rows_in, int cols_in, int a_lo, int a_hi,
                                int e_lo, int e_hi, Vec<A>& best, M& code) {
  const auto px1 = [&px](int a, int64_t j, Vec<A>(&x)[1]) SAEP_LAMBDA_INLINE { x[0] = px(a, j); };
  max_blocks_window<K1, 1, false, kResidual, kCodes, A>(px1, j0, &w, &b0, rows_in, cols_in,
                                                        a_lo, a_hi, e_lo, e_hi, &best, &code);
}

// The same for NW neighbouring windows whose K1 x K1 patches are all in the grid (window i's
// starts at column j0 + 2 i), the weights w in registers: their 4 NW positions' sums (each in
// the order above) are independent chains, interleaved tap by tap so that the FMA latency of
// one overlaps the others.
template <int K1, int NW, bool kResidual, bool kCodes, typename A, typename M, typename Px>
SAEP_INLINE void max_block_inside(const Px& px, int64_t j0, const Vec<A> (&w)[K1 - 1][K1 - 1],
                                  Vec<A> b0, Vec<A> (&best)[NW], M (&code)[NW]) {
  constexpr int K = K1 - 1, pad = K / 2;
  Vec<A> z[NW][4];
#pragma GCC unroll 8
  for (int i = 0; i < NW; ++i)
#pragma GCC unroll 4
    for (int d = 0; d < 4; ++d) {
      z[i][d] = b0;
      if (kResidual) z[i][d] += px((d >> 1) + pad, j0 + 2 * i + (d & 1) + pad);
    }
#pragma GCC unroll 16
  for (int u = 0; u < K; ++u)
#pragma GCC unroll 16
    for (int e = 0; e < K; ++e)
#pragma GCC unroll 8
      for (int i = 0; i < NW; ++i)
#pragma GCC unroll 4
        for (int d = 0; d < 4; ++d)
          z[i][d] += px((d >> 1) + u, j0 + 2 * i + (d & 1) + e) * w[u][e];
#pragma GCC unroll 8
  for (int i = 0; i < NW; ++i) window_max<kCodes, A>(z[i], AllPositions{}, best[i], code[i]);
}

// The block walk's windows per inside-kernel call (max_window_row_block: fp32 in place, bf16
// in place with k >= 5, and the staged rows): two where the k * k weights, the eight chains
// and the loads fit into the registers (AVX-512, k <= 3), else one. A window alone is four
// chains of k * k + 1 dependent steps; two windows also share their middle patch columns'
// loads. Measured (cpu_kernel_bench, AVX-512, B=8, 2 threads, interleaved, ms; the bf16 figure
// is of the block walk bf16 used before the group walk): siglip-so400m bf16 6.6-7.1 vs
// 7.2-7.6, fp32 8.4-8.6 vs 9.0-9.2; llava15-7b 3-5% faster.
template <int K>
constexpr int kMaxWindows = (SAEP_CPU_VEC_REGISTERS >= 32 && K <= 3) ? 2 : 1;

// Window oj's max and argmax codes of all kVecs vector blocks of group g (Packing's order):
// the max goes out with Packing::stream where the output is aligned to the group, the codes in
// channel order. o_row and am_row (may be null) are the window row's.
template <typename T, typename A, typename M>
SAEP_INLINE void put_max_group(const View<T, A>& v, int64_t g, int64_t oj,
                               const Vec<A> (&best)[Packing<T, A>::kVecs],
                               const M (&code)[Packing<T, A>::kVecs], T* o_row,
                               uint8_t* am_row) {
  using P = Packing<T, A>;
  constexpr int VL = vec_lanes<A>();
  T* o = o_row + oj * v.kc + g * P::kStep;
  if (reinterpret_cast<uintptr_t>(o) % (P::kStep * sizeof(T)) == 0)
    P::stream(o, best);
  else
    P::store(o, best);
  if (!am_row) return;
  using Bytes = typename IntVec<uint8_t, VL>::type;
  uint8_t* am = am_row + oj * v.kc + g * P::kStep;
  if constexpr (P::kVecs == 1) {
    const Bytes bytes = __builtin_convertvector(code[0], Bytes);
    std::memcpy(am, &bytes, VL);
  } else {
    static_assert(P::kVecs == 2 && P::kDeinterleaved, "even/odd channel halves");
    using Pairs = typename IntVec<uint16_t, VL>::type;
    const Pairs both = __builtin_convertvector(code[0], Pairs) |
                       (__builtin_convertvector(code[1], Pairs) << 8);
    std::memcpy(am, &both, 2 * VL);
  }
}

// The same for vector q of the group alone: the group's first kVecs - 1 vectors' maxima and
// codes wait in s.held and s.held_code until its last vector's.
template <typename T, typename A, typename M>
SAEP_INLINE void put_max_block(Scratch<A>& s, const View<T, A>& v, int64_t g, int q, int64_t oj,
                               Vec<A> best, M code, T* o_row, uint8_t* am_row) {
  using P = Packing<T, A>;
  constexpr int VL = vec_lanes<A>();
  if constexpr (P::kVecs == 1) {
    put_max_group<T, A, M>(v, g, oj, {best}, {code}, o_row, am_row);
  } else {
    static_assert(P::kVecs == 2, "two vectors a group");
    using Bytes = typename IntVec<uint8_t, VL>::type;
    A* held = s.held.data() + oj * VL;
    uint8_t* held_code = s.held_code.data() + oj * VL;
    if (q == 0) {
      VecIO<A, A>::store(held, best);
      if (am_row) {
        const Bytes bytes = __builtin_convertvector(code, Bytes);
        std::memcpy(held_code, &bytes, VL);
      }
      return;
    }
    M first_code{};
    if (am_row) {
      Bytes bytes;
      std::memcpy(&bytes, held_code, VL);
      first_code = __builtin_convertvector(bytes, M);
    }
    put_max_group<T, A, M>(v, g, oj, {VecIO<A, A>::load(held), best}, {first_code, code}, o_row,
                           am_row);
  }
}

struct NoStep {
  SAEP_INLINE void operator()() const {}
};

// Window row oi's patch rows in the grid (a_lo .. a_hi of its K1), whether its windows' second
// position row is (rows_in 2, else 1), and for window oj the same of its columns.
template <int K1>
struct MaxWindowRow {
  int a_lo, a_hi, rows_in;
  bool full_rows;  // all the patch rows are in the grid
  int64_t pad, W;
  template <typename T, typename A>
  SAEP_INLINE MaxWindowRow(const View<T, A>& v, int64_t oi) : pad(v.pad), W(v.W) {
    const int64_t r0 = 2 * oi - v.pad;
    a_lo = int(std::max<int64_t>(0, -r0));
    a_hi = int(std::min<int64_t>(K1, v.H - r0));
    rows_in = 1 + int(2 * oi + 1 < v.H);
    full_rows = rows_in == 2 && a_lo == 0 && a_hi == K1;
  }
  // window oj's patch is all in the grid (then so are its four positions)
  SAEP_INLINE bool inside(int64_t oj) const {
    return full_rows && 2 * oj - pad >= 0 && 2 * oj - pad + K1 <= W;
  }
  SAEP_INLINE int e_lo(int64_t oj) const { return int(std::max<int64_t>(0, pad - 2 * oj)); }
  SAEP_INLINE int e_hi(int64_t oj) const { return int(std::min<int64_t>(K1, W - 2 * oj + pad)); }
  SAEP_INLINE int cols_in(int64_t oj) const { return 1 + int(2 * oj + 1 < W); }
};

// Windows [oj0, oj1) of window row oi for one vector block (vector q of group g), px(a, j) its
// vector of patch row a (input row 2 oi - p + a) at input column j, the block's weights w and
// bias b0 in registers: kMaxWindows at a time where their patches are all in the grid, else
// one (max_block_edge at the grid's edge). on_step() is called before each step (a window or
// kMaxWindows of them). kCodes: the argmax codes are computed (put_max_block writes them where
// am_row is not null), else window_max's faster max (am_row must be null).
template <int K1, bool kResidual, bool kCodes, typename T, typename A, typename Px,
          typename OnStep = NoStep>
SAEP_INLINE void max_window_row_block(const View<T, A>& v, Scratch<A>& s, int64_t oi,
                                      int64_t oj0, int64_t oj1, int64_t g, int q, const Px& px,
                                      const Vec<A> (&w)[K1 - 1][K1 - 1], Vec<A> b0, T* o_row,
                                      uint8_t* am_row, const OnStep& on_step = OnStep{}) {
  using M = typename VecOf<A>::Mask;
  constexpr int kWindows = kMaxWindows<K1 - 1>;
  const MaxWindowRow<K1> row(v, oi);
  for (int64_t oj = oj0; oj < oj1;) {
    on_step();
    const int64_t j0 = 2 * oj - v.pad;
    if (kWindows > 1 && oj + kWindows <= oj1 && row.inside(oj) && row.inside(oj + kWindows - 1)) {
      Vec<A> best[kWindows];
      M code[kWindows];
      max_block_inside<K1, kWindows, kResidual, kCodes, A>(px, j0, w, b0, best, code);
      for (int i = 0; i < kWindows; ++i)
        put_max_block(s, v, g, q, oj + i, best[i], code[i], o_row, am_row);
      oj += kWindows;
    } else if (row.inside(oj)) {
      Vec<A> best[1];
      M code[1];
      max_block_inside<K1, 1, kResidual, kCodes, A>(px, j0, w, b0, best, code);
      put_max_block(s, v, g, q, oj, best[0], code[0], o_row, am_row);
      ++oj;
    } else {
      Vec<A> best{};
      M code{};
      max_block_edge<K1, kResidual, kCodes, A>(px, j0, w, b0, row.rows_in, row.cols_in(oj),
                                               row.a_lo, row.a_hi, row.e_lo(oj), row.e_hi(oj),
                                               best, code);
      put_max_block(s, v, g, q, oj, best, code, o_row, am_row);
      ++oj;
    }
  }
}

// Windows [0, Wo) of window row oi for all kVecs vector blocks of group g at once (bf16: its
// even and odd channels), a window a step: px(a, j, x) puts the group's blocks of patch row a at
// input column j into x from one load, the blocks' weights w[h] and biases b0[h] in registers.
// on_step() is called before each window; kCodes as in max_window_row_block.
template <int K1, bool kResidual, bool kCodes, typename T, typename A, typename Px,
          typename OnStep>
SAEP_INLINE void max_window_row_group(const View<T, A>& v, int64_t oi, int64_t g, const Px& px,
                                      const Vec<A> (&w)[Packing<T, A>::kVecs][K1 - 1][K1 - 1],
                                      const Vec<A> (&b0)[Packing<T, A>::kVecs], T* o_row,
                                      uint8_t* am_row, const OnStep& on_step) {
  using M = typename VecOf<A>::Mask;
  constexpr int NB = Packing<T, A>::kVecs;
  const MaxWindowRow<K1> row(v, oi);
  for (int64_t oj = 0; oj < v.Wo; ++oj) {
    on_step();
    const int64_t j0 = 2 * oj - v.pad;
    Vec<A> best[NB];
    M code[NB];
    if (row.inside(oj))
      max_blocks_window<K1, NB, true, kResidual, kCodes, A>(px, j0, w, b0, 2, 2, 0, K1, 0, K1,
                                                            best, code);
    else
      max_blocks_window<K1, NB, false, kResidual, kCodes, A>(
          px, j0, w, b0, row.rows_in, row.cols_in(oj), row.a_lo, row.a_hi, row.e_lo(oj),
          row.e_hi(oj), best, code);
    put_max_group<T, A, M>(v, g, oj, best, code, o_row, am_row);
  }
}

// kResidual is a template parameter of the whole walk: with both inside kernels in one loop,
// GCC computed their common products once, before the branch, and so fused none of them into
// FMAs (the sums then differ from max_window's and the kernel was slower).
template <int K1, bool kResidual, typename T, typename A>
SAEP_INLINE void max_forward_staged(const View<T, A>& v, const A* bias, T* out, uint8_t* argmax,
                                    Scratch<A>& s) {
  using P = Packing<T, A>;
  constexpr int K = K1 - 1, VL = vec_lanes<A>();
  const int64_t ws = v.ws;
  // the weights and the bias in Packing's channel order: block b's are at b * VL
  const PackedWeights<A> packed = s.packed;
  s.held.resize(size_t(P::kVecs * v.Wo * VL));
  s.held_code.resize(size_t(v.Wo * VL));
  for_staged_strips<K1>(v, s, kStagedBytes, [&](int64_t oi, int64_t oj0, int64_t oj1,
                                  const StagedRows<T, A>& st) SAEP_LAMBDA_INLINE {
    const int64_t r0 = 2 * oi - v.pad;
    const int a_lo = int(std::max<int64_t>(0, -r0)), a_hi = int(std::min<int64_t>(K1, v.H - r0));
    const A* rows[K1];
    for (int a = a_lo; a < a_hi; ++a) rows[a] = st.slot(r0 + a, K1);
    T* o_row = out + oi * v.Wo * v.kc;
    uint8_t* am_row = argmax ? argmax + oi * v.Wo * v.kc : nullptr;
    const Prefetch next = st.next_rows(v, r0 + K1);
    const int64_t ps = st.px_stride;
    for (int64_t b = 0; b < st.blocks; ++b) {
      next.block(b, st.blocks);
      Vec<A> w[K][K];
      load_taps<K>(packed.w, ws, b, w);
      const Vec<A> b0 = packed.bias ? VecIO<A, A>::load(packed.bias + b * VL) : Vec<A>{};
      // patch row a's block at input column 0 (where it would be: the strip starts at j_lo)
      const A* base[K1] = {};
      for (int a = a_lo; a < a_hi; ++a) base[a] = rows[a] - st.j_lo * ps + b * VL;
      const auto px = [base, ps](int a, int64_t j) SAEP_LAMBDA_INLINE {
        return VecIO<A, A>::load(base[a] + j * ps);
      };
      max_window_row_block<K1, kResidual, true>(v, s, oi, oj0, oj1, b / P::kVecs,
                                                int(b % P::kVecs), px, w, b0, o_row, am_row);
    }
    // the channels past the last full group
    const int64_t c_tail = st.groups * P::kStep;
    if (c_tail < v.C)
      for (int64_t oj = oj0; oj < oj1; ++oj)
        max_window(v, s.w.data(), bias, oi, oj, o_row + oj * v.kc,
                   am_row ? am_row + oj * v.kc : nullptr, c_tail);
  });
}

// The in-place max forward walks a group's vector blocks together (max_window_row_group) where
// there are two and their 2 k * k weights and eight chains fit the 32 registers with the loads.
template <typename T, typename A, int K>
constexpr bool kMaxGroupWalk = Packing<T, A>::kVecs > 1 && K <= 3;

// From the input in place, window row by window row, one Packing group of channels at a time.
// bf16 (two vector blocks a group: the even and the odd channels) with k <= 3: a window a step,
// both blocks from one load of each pixel (max_window_row_group; their 2 k * k weights and eight
// chains fit the registers). Otherwise one vector block a walk (max_window_row_block), the
// block's weights in registers, as max_forward_staged walks its staged rows. The next window
// row's new input rows are prefetched in slices, one a group, a line before each step of the
// group's walks and the slice's rest after them. Measured against the whole slice at the
// group's start (cpu_kernel_bench, B=8, 2 threads, 6 interleaved rounds, median ms [range]):
// bf16 siglip-so400m 5.02 [4.93-5.31] vs 5.20 [4.95-5.44], llava15-7b 3.95 [3.88-4.03] vs
// 4.09 [3.92-4.22]; fp32 siglip-so400m 7.13 [6.83-7.21] vs 7.99 [7.31-8.37], llava15-7b 4.53
// [4.32-4.87] vs 4.78 [4.59-5.27]. Two lines a step measured the same; the slice spread evenly
// over the steps (all lines before its walks end) was slower in fp32. A profile (perf, cpu-clock)
// of the slice at once put 12% of the bf16 siglip-so400m samples on its prefetch loop.
// The bf16 group walk replaced a walk of each block in turn (two windows a step, each load split
// into the block's channels): with C = 1024 a group's pixels (2048 bytes apart) fall into two L1
// sets, and in a cache model of that walk (scripts/cpu_cache_model.py) 36% of llava15-7b's input
// loads hit L1 against 68% without conflicts (C = 1056, or siglip-so400m's 1152): the odd
// block's walk found none of the even block's lines. C = 1056 took 4.75 ms per 1024 channels on
// llava15-7b's grid against 5.63 at C = 1024, and a profile (perf, cpu-clock) put 37% of the
// inside steps' samples on their first 30 of ~165 instructions (the loads and their first uses)
// for llava15-7b, 20% for siglip-so400m (18% if spread evenly). The group walk makes 38% fewer
// loads (20 a window for both blocks against 32 for two windows of one block, the residual's
// included; 16 against 24 without them), and by the model half as many of llava15-7b's miss
// L1 (siglip-so400m's as many as before); each load is converted twice. Measured
// (cpu_kernel_bench, B=8, 2 threads, 8 interleaved process pairs, a slow spell: fma_peak
// 154-169 G against 236 G quiet; median ratio new/old [range], faster in):
// forward_no_argmax llava15-7b 0.82 [0.58-0.84] 8/8 and 0.86 [0.55-1.03] 7/8, siglip-so400m
// 0.90 [0.57-1.31] 7/8 and 0.87 [0.70-1.53] 7/8; the forward with the argmax 0.75 [0.52-0.95]
// 8/8, 0.73 [0.60-1.04] 7/8. Bitwise the same (cpu_bitwise_hash).
// Tried before it and dropped: walking both blocks a step at a time with two windows a step
// (1.09x-1.18x as long: the weights of both blocks did not fit with two windows' chains); a
// masked vmovdqu16 load from two bytes before the group for the even block, instead of the load
// and shift (1.7x as long on llava15-7b: its loads split lines, and the line before the group
// is rarely in L1). The group walk's inside step (objdump, GCC) has 72 FMAs, 32 conversions, 8
// adds and 50-64 register-to-register moves: the 18 weights, eight chains, biases, mask and both
// halves of each pixel overfill the 32 registers (9 weights stay FMA memory operands). The FMA as
// inline asm (vfmadd231ps, the chain's register tied) left 57-62 moves and made the step
// longer: not kept, not timed.
// kCodes: the argmax codes are kept (argmax is not null), else window_max's faster max.
template <int K1, bool kResidual, bool kCodes, typename T, typename A>
SAEP_INLINE void max_forward_in_place(const View<T, A>& v, const A* bias, T* out,
                                      uint8_t* argmax, Scratch<A>& s) {
  using P = Packing<T, A>;
  constexpr int K = K1 - 1, VL = vec_lanes<A>();
  const int64_t ws = v.ws, st = v.st, groups = v.C / P::kStep;
  const PackedWeights<A> packed = s.packed;
  s.held.resize(size_t(P::kVecs * v.Wo * VL));
  s.held_code.resize(size_t(v.Wo * VL));
  for (int64_t oi = 0; oi < v.Ho; ++oi) {
    const int64_t r0 = 2 * oi - v.pad;
    const int a_lo = int(std::max<int64_t>(0, -r0)), a_hi = int(std::min<int64_t>(K1, v.H - r0));
    T* o_row = out + oi * v.Wo * v.kc;
    uint8_t* am_row = argmax ? argmax + oi * v.Wo * v.kc : nullptr;
    const Prefetch next = Prefetch::rows(v, r0 + K1, 0, v.W);
    for (int64_t g = 0; g < groups; ++g) {
      Prefetch::Cursor slice = next.slice(g, groups);
      const auto on_step = [&slice]() SAEP_LAMBDA_INLINE { slice.next(); };
      // patch row a's group g at input column 0
      const T* base[K1] = {};
      for (int a = a_lo; a < a_hi; ++a) base[a] = v.px(r0 + a, 0) + g * P::kStep;
      if constexpr (kMaxGroupWalk<T, A, K>) {
        Vec<A> w[P::kVecs][K][K], b0[P::kVecs];
        for (int q = 0; q < P::kVecs; ++q) {
          const int64_t b = g * P::kVecs + q;
          load_taps<K>(packed.w, ws, b, w[q]);
          b0[q] = packed.bias ? VecIO<A, A>::load(packed.bias + b * VL) : Vec<A>{};
        }
        const auto px = [&base, st](int a, int64_t j, Vec<A>(&x)[P::kVecs]) SAEP_LAMBDA_INLINE {
          P::load(base[a] + j * st, x);
        };
        max_window_row_group<K1, kResidual, kCodes>(v, oi, g, px, w, b0, o_row, am_row, on_step);
        slice.rest();
        continue;
      }
      const auto block = [&](auto vec) SAEP_LAMBDA_INLINE {
        constexpr int q = decltype(vec)::value;
        const int64_t b = g * P::kVecs + q;
        Vec<A> w[K][K];
        load_taps<K>(packed.w, ws, b, w);
        const Vec<A> b0 = packed.bias ? VecIO<A, A>::load(packed.bias + b * VL) : Vec<A>{};
        const auto px = [&base, st](int a, int64_t j) SAEP_LAMBDA_INLINE {
          return P::template load_vec<q>(base[a] + j * st);
        };
        max_window_row_block<K1, kResidual, kCodes>(v, s, oi, 0, v.Wo, g, q, px, w, b0, o_row,
                                                    am_row, on_step);
      };
      block(std::integral_constant<int, 0>{});
      if constexpr (P::kVecs == 2) block(std::integral_constant<int, 1>{});
      slice.rest();
    }
    // the channels past the last full group
    const int64_t c_tail = groups * P::kStep;
    if (c_tail < v.C)
      for (int64_t oj = 0; oj < v.Wo; ++oj)
        max_window(v, s.w.data(), bias, oi, oj, o_row + oj * v.kc,
                   am_row ? am_row + oj * v.kc : nullptr, c_tail);
  }
}

// bf16 and fp32 from the input in place with AVX-512 (the registers hold the k * k weights and
// two windows' eight chains of one block, or for bf16 with k <= 3 both blocks' weights and one
// window's eight chains; the staged kernels' loop otherwise): measured (cpu_kernel_bench,
// B=8, 2 threads, interleaved, ms) against the staged rows, whose staging writes and reads back
// the input's bytes (twice them in bf16, staged as fp32): bf16 llava15-7b 4.1-4.4 vs 5.0-5.1,
// siglip-so400m 5.6-5.9 vs 6.7-7.6 (without the prefetch of the next rows 11.6-12.2: a 27 x 27
// x 1152 image's rows, walked one group a time, were read at the latency of memory); fp32
// llava15-7b 4.6-4.8 vs 4.9-5.3, siglip-so400m 6.7-7.1 vs 7.7-7.9. Other dtypes and instruction
// sets from the staged rows: measured against the window-by-window kernel (max_window over all
// channels, from the input in place), fp32 1.5x faster for llava15-7b and 1.35x for
// siglip-so400m, bf16 2-7% faster.
constexpr bool kMaxInPlace = SAEP_CPU_VEC_REGISTERS >= 32;

template <int K1, bool kResidual, typename T, typename A>
SAEP_INLINE void max_forward_k(const View<T, A>& v, const A* bias, T* out, uint8_t* argmax,
                               Scratch<A>& s) {
  if constexpr (kMaxInPlace && (std::is_same<T, bf16>::value || std::is_same<T, float>::value))
    argmax ? max_forward_in_place<K1, kResidual, true>(v, bias, out, argmax, s)
           : max_forward_in_place<K1, kResidual, false>(v, bias, out, argmax, s);
  else
    max_forward_staged<K1, kResidual>(v, bias, out, argmax, s);
}

template <typename T, typename A>
SAEP_INLINE void max_forward(const View<T, A>& v, const A* bias, T* out, uint8_t* argmax,
                             Scratch<A>& s) {
  with_patch_size(v.k1, [&](auto k1) SAEP_LAMBDA_INLINE {
    if (v.g.residual)
      max_forward_k<decltype(k1)::value, true>(v, bias, out, argmax, s);
    else
      max_forward_k<decltype(k1)::value, false>(v, bias, out, argmax, s);
  });
}

// The calling thread's forward scratch, which lives as long as the thread: fresh buffers of its
// size (the staged rows, the folded weights) cost each call their page faults and zero-fill,
// measured at a third of a single-image forward. Out of line, so that a task looks its address
// up once: in a shared library (-fPIC, as the Python extension is built) each use of a
// thread_local inlined into the kernels was a __tls_get_addr call, 356 of them in the AVX-512
// forward unit, and the bf16 max forward took 1.4-1.6x as long.
template <typename A>
SAEP_NOINLINE Scratch<A>& forward_scratch() {
  thread_local Scratch<A> s;
  return s;
}

// What the forward's weights depend on within a call: the layer, and the grid's parity (which
// of the folded avg variants exist; packed images have grids of their own).
SAEP_INLINE int64_t weights_key(const Task& t) {
  return 4 * int64_t(t.l) + 2 * (t.g.height % 2) + t.g.width % 2;
}

// The task's weights into s: w (task_weights), for avg the folded wf (fold_avg), and s.packed,
// the kernels' weights and bias in Packing's channel order (pack_weights).
template <typename T, typename A>
SAEP_INLINE void prepare_forward_weights(const FwdParams& p, const Task& t, const A* bias,
                                         Scratch<A>& s) {
  const Geometry& g = t.g;
  const int64_t ws = padded_stride<A>(g.channels);
  task_weights(g, p.weight, t, s.w);
  if (g.pool == Pool::Avg) {
    fold_avg(g, s.w, s.wf);
    const int k1 = g.ksize + 1;
    s.packed = pack_weights<T>(s, s.wf.data(), 4 * k1 * k1, ws, g.channels, bias);
  } else {
    s.packed = pack_weights<T>(s, s.w.data(), g.ksize * g.ksize, ws, g.channels, bias);
  }
}

template <typename T, typename A>
struct ForwardTask {
  static SAEP_INLINE void run(const FwdParams& p, const Task& t, Scratch<A>& chunk) {
    Scratch<A>& s = forward_scratch<A>();
    const View<T, A> v(p.x, t);
    const A* bias = p.bias ? static_cast<const A*>(p.bias) + t.l * v.C : nullptr;
    const int64_t out_base = t.window * v.kc + t.l * v.C;
    // once per layer and grid parity, not per task: the chunk's tasks run layer by layer
    // (task_at). Measured (cpu_kernel_bench forward, B=8, 2 threads, interleaved, ms): bf16
    // avg siglip-so400m 3.9-4.4 vs 5.1-5.6, llava15-7b 1.99-2.05 vs 2.24-2.43 (the per-task
    // fold and deinterleave of the 4 x 16 folded rows); the fp32 forwards within noise
    if (chunk.weights_key != weights_key(t)) {
      prepare_forward_weights<T>(p, t, bias, s);
      chunk.weights_key = weights_key(t);
    }
    if (t.g.pool == Pool::Avg)
      avg_forward(v, bias, static_cast<T*>(p.out) + out_base, s);
    else
      max_forward(v, bias, static_cast<T*>(p.out) + out_base,
                  p.argmax ? p.argmax + out_base : nullptr, s);
  }
};

}  // namespace

SAEP_DTYPE_ENTRY_POINTS(fwd, FwdParams, ForwardTask)

}  // namespace SAEP_CPU_ISA

#if SAEP_CPU_ISA_IS_BASELINE
SAEP_CPU_DISPATCH(fwd, FwdParams)

void fused_aggregate_fwd(const FwdParams& p, const ParallelFor& parallel_for) {
  run_tasks(p, parallel_for, fwd_by_capability);
}
#endif

}  // namespace cpu
}  // namespace saep
