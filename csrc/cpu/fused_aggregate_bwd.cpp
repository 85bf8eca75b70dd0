// saep-kernels CPU kernels: the backward of the fused op (tasks, memory order and the avg fold:
// task.h). One function per gradient and pool mode:
//
//   avg_input_grad_staged
//                     grad_x gathers g_y through the folded kernels (the transposed forward),
//                     a pixel row's folded weights in registers along the row, two pixels at
//                     a time
//   avg_input_grad    the same a pixel at a time (the channels past the last full group)
//   avg_weight_grad_staged
//                     g_y * x over each window's (k+1)x(k+1) patch from the staged input rows
//                     (StagedRows), the folded accumulators in registers along a window row;
//                     unfolded at the end (avg_weight_grad)
//   avg_weight_grad_tail
//                     the same a window at a time from the input in place (the channels past
//                     the last full vector group)
//   max_input_grad_staged
//                     grad_x from a ring of k rows of g_z (Packing's channel order), the k x k
//                     weights in registers along a pixel row, four pixels at a time
//   max_input_grad    the same from a ring of the channels past the last full vector group
//   max_weight_grad_staged
//                     g_z * x from the staged input rows (StagedRows, as the max forward),
//                     the k x k accumulators in registers along a window row
//   max_weight_grad   the same a window at a time from the input in place (the channels past
//                     the last full vector group)
//   bias_grad         the sum of g_y over the windows
//
// g_z is the pool's gradient at the conv output (g_y / count for avg, g_y where the saved
// argmax points for max); grad_x = residual * g_z + sum_{u,v} w[u,v] * g_z(shifted),
// grad_w[u,v] = sum g_z * x(shifted), grad_b = sum g_y. Weight and bias gradients land in the
// task's slice of a per-image partial buffer, which the caller reduces in a fixed order.
#include "fused_aggregate_cpu.h"
#include "task.h"

namespace saep {
namespace cpu {
namespace SAEP_CPU_ISA {
namespace {

// floor(n / 2) for any sign of n
inline int64_t floor_half(int64_t n) { return n >= 0 ? n / 2 : -((1 - n) / 2); }

// What one backward task reads and writes.
template <typename T, typename A>
struct GradTask {
  const Geometry& g;
  View<T, A> v;
  const T* gy;         // grad_out of image b, layer l's channels
  int64_t gst;         // grad_out's token stride
  const uint8_t* am;   // argmax of image b, layer l's channels (max pool)
  const A* w;          // the layer's weights, w[tap][c], rows v.ws apart
  T* gx;               // grad_x of image b at pixel (0, 0), or nullptr
  A* gw;               // the task's weight-gradient accumulators gw[tap][c] (rows v.ws
                       // apart), or nullptr
  Scratch<A>& s;

  GradTask(const BwdParams& p, const Task& t, Scratch<A>& scratch)
      : g(t.g), v(p.x, t),
        gy(static_cast<const T*>(p.grad_out) +
           (t.packed ? t.window * p.gy_stride_t : t.b * p.gy_stride_b) + t.l * g.channels),
        gst(p.gy_stride_t),
        am(p.argmax ? p.argmax + t.window * g.kc() + t.l * g.channels : nullptr),
        w(nullptr),
        gx(p.grad_x[0] ? static_cast<T*>(p.grad_x[t.l]) + t.token * g.channels : nullptr),
        gw(nullptr), s(scratch) {
    task_weights(g, p.weight, t, s.w);
    w = s.w.data();
    if (p.grad_w_part) {
      s.gw.assign(size_t(g.ksize * g.ksize * v.ws), A(0));
      gw = s.gw.data();
    }
  }
};

// grad_x(i, j) = sum over the windows whose (k+1)x(k+1) patch holds (i, j), i.e.
// a = i - 2*oi + p in [0, k], of g_y(window) * wf[variant][a][e]. Needs s.wf (fold_avg).
// The channels [c_begin, C) (avg_input_grad_staged does the full Packing groups).
template <typename T, typename A>
SAEP_INLINE void avg_input_grad(const GradTask<T, A>& t, int64_t c_begin) {
  const View<T, A>& v = t.v;
  const int k = v.k, k1 = v.k1, pad = v.pad;
  const A* wf = t.s.wf.data();
  constexpr int L = lanes<A>() / 2;
  for (int64_t i = 0; i < v.H; ++i) {
    const int64_t oi_lo = std::max<int64_t>(0, floor_half(i + pad - k + 1));
    const int64_t oi_hi = std::min<int64_t>(v.Ho - 1, (i + pad) / 2);
    for (int64_t j = 0; j < v.W; ++j) {
      const int64_t oj_lo = std::max<int64_t>(0, floor_half(j + pad - k + 1));
      const int64_t oj_hi = std::min<int64_t>(v.Wo - 1, (j + pad) / 2);
      T* o = t.gx + (i * v.W + j) * v.C;
      for_chunks<L>(v.C - c_begin, [&](auto chunk, int64_t cc, int64_t n) SAEP_LAMBDA_INLINE {
        const int64_t len = SAEP_LEN(chunk, n);
        const int64_t c = c_begin + cc;
        A acc[L];
        for (int64_t q = 0; q < len; ++q) acc[q] = A(0);
        for (int64_t oi = oi_lo; oi <= oi_hi; ++oi) {
          const int a = int(i - 2 * oi + pad);
          for (int64_t oj = oj_lo; oj <= oj_hi; ++oj) {
            const int e = int(j - 2 * oj + pad);
            const A* wp = wf + ((variant_of(t.g, oi, oj) * k1 + a) * k1 + e) * v.ws + c;
            const T* gp = t.gy + (oi * v.Wo + oj) * t.gst + c;
            for (int64_t q = 0; q < len; ++q) acc[q] += ld<T, A>(gp[q]) * wp[q];
          }
        }
        for (int64_t q = 0; q < len; ++q) o[q + c] = Convert<T, A>::store(acc[q]);
      });
    }
  }
}

// grad_x for the channels of full Packing groups, as avg_input_grad (each pixel's sum in its
// order: the covering windows row by row, each row left to right): pixel row by pixel row, and
// in each one vector block at a time. A pixel i = 2m - p + r (r = 0, 1) of a row is covered by
// the in-grid window rows m - d, d in [0, K1 / 2), at patch row a = 2d + r. The row's
// K1 / 2 x K1 folded weights (of each window row's variant where its columns are full) stay in
// registers while its pixels slide along two at a time: pixels 2n - p and 2n - p + 1 share
// the windows n - c, c in [0, K1 / 2), whose g_y (K1 / 2 per window row) move over by one
// window per step, where those window columns are all full ones. The other pixels (the first
// and last columns, those under a partial window column of an odd grid) add their windows one
// at a time, the weights read from memory.
template <int K1, typename T, typename A>
SAEP_INLINE void avg_input_grad_staged(const GradTask<T, A>& t) {
  using P = Packing<T, A>;
  constexpr int VL = vec_lanes<A>(), H2 = K1 / 2;
  const View<T, A>& v = t.v;
  const int pad = v.pad;
  const int64_t ws = v.ws, groups = v.C / P::kStep;
  const A* const wf = pack_weights<T, A>(t.s, t.s.wf.data(), 4 * K1 * K1, ws, v.C, nullptr).w;
  t.s.held.resize(size_t(P::kVecs * v.W * VL));
  // window (oi, oj)'s g_y for vector q of the group at channel c_group, as the compute type
  const auto gy_at = [&](int64_t oi, int64_t oj, int64_t c_group, auto qc) SAEP_LAMBDA_INLINE {
    Vec<A> g[P::kVecs];
    P::load(t.gy + (oi * v.Wo + oj) * t.gst + c_group, g);
    return g[decltype(qc)::value];
  };
  // window row (column) o is a full one and in the grid
  const auto full_row = [&](int64_t o) { return o >= 0 && o < v.Ho && 2 * o + 1 < v.H; };
  const auto full_col = [&](int64_t o) { return o >= 0 && o < v.Wo && 2 * o + 1 < v.W; };
  for (int64_t i = 0; i < v.H; ++i) {
    const int64_t m = (i + pad) / 2;
    const int r = int((i + pad) & 1);
    const int64_t oi_lo = std::max<int64_t>(0, m - H2 + 1), oi_hi = std::min<int64_t>(v.Ho - 1, m);
    // the window rows in the grid: m - d for d in [d_lo, d_hi]
    const int d_lo = int(m - oi_hi), d_hi = int(m - oi_lo);
    // each window row's variant where the window's columns are full (its rows: full or not)
    int row_variant[H2];
    for (int d = 0; d < H2; ++d) row_variant[d] = full_row(m - d) ? 0 : 2;
    T* o_row = t.gx + i * v.W * v.C;
    // one vector block: the group at c_group, its vector q (a compile-time constant)
    const auto block = [&](int64_t g, auto qc) SAEP_LAMBDA_INLINE {
      constexpr int q = decltype(qc)::value;
      const int64_t c_group = g * P::kStep, b = g * P::kVecs + q;
      // this row's folded weights of the windows with full columns: w[d][e] is window row
      // m - d's, patch row 2d + r, column e (window rows out of the grid: variant 2's rows of
      // the scratch, which fold_avg leaves unset on even grids; loaded, never used)
      Vec<A> w[H2][K1];
#pragma GCC unroll 16
      for (int d = 0; d < H2; ++d)
#pragma GCC unroll 16
        for (int e = 0; e < K1; ++e)
          w[d][e] = VecIO<A, A>::load(
              wf + ((row_variant[d] * K1 + 2 * d + r) * K1 + e) * ws + b * VL);
      for (int64_t j = 0; j < v.W;) {
        const int64_t n = (j + pad) / 2;
        if (((j + pad) & 1) == 0 && full_col(n - H2 + 1) && full_col(n) && j + 1 < v.W) {
          // gz[d][c]: window (m - d, n - c) (rows d in [d_lo, d_hi])
          Vec<A> gz[H2][H2];
#pragma GCC unroll 16
          for (int d = 0; d < H2; ++d)
#pragma GCC unroll 16
            for (int c = 0; c < H2; ++c)
              gz[d][c] = d >= d_lo && d <= d_hi ? gy_at(m - d, n - c, c_group, qc) : Vec<A>{};
          for (int64_t nn = n;;) {
            Vec<A> acc[2] = {};
#pragma GCC unroll 16
            for (int d = H2 - 1; d >= 0; --d) {
              if (d < d_lo || d > d_hi) continue;
#pragma GCC unroll 16
              for (int c = H2 - 1; c >= 0; --c)
#pragma GCC unroll 2
                for (int s = 0; s < 2; ++s) acc[s] += gz[d][c] * w[d][2 * c + s];
            }
            const int64_t jj = 2 * nn - pad;
#pragma GCC unroll 2
            for (int s = 0; s < 2; ++s)
              store_block<T, A>(t.s, v.W, q, jj + s, acc[s], o_row + (jj + s) * v.C + c_group);
            ++nn;
            j = 2 * nn - pad;
            if (!(full_col(nn) && j + 1 < v.W)) break;
            // the next pair's windows: one window further right in each row
#pragma GCC unroll 16
            for (int d = 0; d < H2; ++d) {
#pragma GCC unroll 16
              for (int c = H2 - 1; c > 0; --c) gz[d][c] = gz[d][c - 1];
              if (d >= d_lo && d <= d_hi) gz[d][0] = gy_at(m - d, nn, c_group, qc);
            }
          }
          continue;
        }
        // one pixel, its windows one at a time
        const int64_t oj_lo = std::max<int64_t>(0, floor_half(j + pad - K1 + 2));
        const int64_t oj_hi = std::min<int64_t>(v.Wo - 1, (j + pad) / 2);
        Vec<A> acc{};
        for (int64_t oi = oi_lo; oi <= oi_hi; ++oi) {
          const int a = int(i - 2 * oi + pad);
          for (int64_t oj = oj_lo; oj <= oj_hi; ++oj) {
            const int e = int(j - 2 * oj + pad);
            const A* wp = wf + ((variant_of(t.g, oi, oj) * K1 + a) * K1 + e) * ws + b * VL;
            acc += gy_at(oi, oj, c_group, qc) * VecIO<A, A>::load(wp);
          }
        }
        store_block<T, A>(t.s, v.W, q, j, acc, o_row + j * v.C + c_group);
        ++j;
      }
    };
    for (int64_t g = 0; g < groups; ++g) {
      block(g, std::integral_constant<int, 0>{});
      if constexpr (P::kVecs == 2) block(g, std::integral_constant<int, 1>{});
    }
  }
}

// The task's weight-gradient rows (taps of them, v.ws apart) from Packing's channel order,
// which the register kernels accumulate in, back to channel order (through t.s.gwf, whose
// contents are spent by then).
template <typename T, typename A>
SAEP_INLINE void unpack_weight_grad(GradTask<T, A>& t, int taps) {
  using P = Packing<T, A>;
  if constexpr (P::kDeinterleaved) {
    std::vector<A>& row = t.s.gwf;
    row.resize(size_t(t.v.C));
    for (int tap = 0; tap < taps; ++tap) {
      P::interleave(t.gw + tap * t.v.ws, row.data(), t.v.C);
      std::copy_n(row.data(), t.v.C, t.gw + tap * t.v.ws);
    }
  }
}

// The weight gradients' walk over the staged input rows (StagedRows): one strip of the whole
// width, so that windows come in raster order; for each window row oi, f(oi, rows, a_lo, a_hi,
// st, next) with rows[a] the staged input row 2 oi - p + a for the in-grid patch rows
// a in [a_lo, a_hi), and next the prefetch of the rows the next window row stages.
template <int K1, typename T, typename A, typename F>
SAEP_INLINE void for_staged_window_rows(const View<T, A>& v, Scratch<A>& s, F&& f) {
  constexpr int64_t kWholeWidth = std::numeric_limits<int64_t>::max();
  for_staged_strips<K1>(v, s, kWholeWidth, [&](int64_t oi, int64_t, int64_t,
                                               const StagedRows<T, A>& st) SAEP_LAMBDA_INLINE {
    const int64_t r0 = 2 * oi - v.pad;
    const int a_lo = int(std::max<int64_t>(0, -r0)), a_hi = int(std::min<int64_t>(K1, v.H - r0));
    const A* rows[K1];
    for (int a = a_lo; a < a_hi; ++a) rows[a] = st.slot(r0 + a, K1);
    f(oi, static_cast<const A* const*>(rows), a_lo, a_hi, st, st.next_rows(v, r0 + K1));
  });
}

// Full windows: g_z = g_y / 4 at all four positions, so
//   grad_w[u, v] = 1/4 sum_{dy,dx} F[u+dy, v+dx],  F[a, e] = sum_w g_y * x(patch a, e);
// partial windows (last row/column of odd grids) add their in-grid positions directly. F
// (t.s.gwf) and grad_w (t.gw) are in Packing's channel order while the window loops run.
//
// The channels of full Packing groups, from the staged rows (StagedRows): window row by window
// row, and in each one vector block at a time, F's (k+1)x(k+1) accumulators stay in registers
// while the row's windows slide along; windows in raster order (one strip of the whole width),
// so each sum adds in the order of avg_weight_grad_tail.
template <int K1, typename T, typename A>
SAEP_INLINE void avg_weight_grad_staged(GradTask<T, A>& t, A* gwf) {
  using P = Packing<T, A>;
  constexpr int K = K1 - 1, VL = vec_lanes<A>();
  const View<T, A>& v = t.v;
  const int64_t ws = v.ws;
  A* const gw = t.gw;
  for_staged_window_rows<K1>(v, t.s, [&](int64_t oi, const A* const* rows, int a_lo, int a_hi,
                                         const StagedRows<T, A>& st,
                                         const Prefetch& next) SAEP_LAMBDA_INLINE {
    const int64_t ps = st.px_stride;
    const auto block = [&](int64_t g, auto qc) SAEP_LAMBDA_INLINE {
      constexpr int q = decltype(qc)::value;
      const int64_t b = g * P::kVecs + q;
      next.block(b, st.blocks);
      Vec<A> acc[K1][K1];
      load_taps<K1>(gwf, ws, b, acc);
      for (int64_t oj = 0; oj < v.Wo; ++oj) {
        Vec<A> gys[P::kVecs];
        P::load(t.gy + (oi * v.Wo + oj) * t.gst + g * P::kStep, gys);
        const WindowExtent ext = window_extent(t.g, oi, oj);
        const int64_t j0 = 2 * oj - v.pad;
        const int e_lo = int(std::max<int64_t>(0, -j0));
        const int e_hi = int(std::min<int64_t>(K1, v.W - j0));
        const int64_t col = (j0 - st.j_lo) * ps + b * VL;
        if (ext.count() == 4) {
          const Vec<A> gv = gys[q];
          if (a_lo == 0 && a_hi == K1 && e_lo == 0 && e_hi == K1) {
#pragma GCC unroll 16
            for (int a = 0; a < K1; ++a)
#pragma GCC unroll 16
              for (int e = 0; e < K1; ++e)
                acc[a][e] += gv * VecIO<A, A>::load(rows[a] + col + e * ps);
          } else {
#pragma GCC unroll 16
            for (int a = 0; a < K1; ++a)
#pragma GCC unroll 16
              for (int e = 0; e < K1; ++e)
                if (a >= a_lo && a < a_hi && e >= e_lo && e < e_hi)
                  acc[a][e] += gv * VecIO<A, A>::load(rows[a] + col + e * ps);
          }
          continue;
        }
        // a partial window: its in-grid positions' taps straight into grad_w
        const Vec<A> gv = gys[q] * (A(1) / A(ext.count()));
        for (int dy = 0; dy < ext.rows; ++dy)
          for (int dx = 0; dx < ext.cols; ++dx)
            for (int u = 0; u < K; ++u) {
              const int a = dy + u;
              if (a < a_lo || a >= a_hi) continue;
              for (int vv = 0; vv < K; ++vv) {
                const int e = dx + vv;
                if (e < e_lo || e >= e_hi) continue;
                A* dst = gw + (u * K + vv) * ws + b * VL;
                VecIO<A, A>::store(dst, VecIO<A, A>::load(dst) +
                                            gv * VecIO<A, A>::load(rows[a] + col + e * ps));
              }
            }
      }
      store_taps<K1>(gwf, ws, b, acc);
    };
    for (int64_t g = 0; g < st.groups; ++g) {
      block(g, std::integral_constant<int, 0>{});
      if constexpr (P::kVecs == 2) block(g, std::integral_constant<int, 1>{});
    }
  });
}

// The same for the channels [c_begin, C), a window at a time from the input in place.
template <typename T, typename A>
SAEP_INLINE void avg_weight_grad_tail(GradTask<T, A>& t, A* gwf, int64_t c_begin) {
  const View<T, A>& v = t.v;
  const int k = v.k, k1 = v.k1;
  constexpr int L = lanes<A>() / 2;
  A* gw = t.gw;
  for (int64_t oi = 0; oi < v.Ho; ++oi) {
    for (int64_t oj = 0; oj < v.Wo; ++oj) {
      const WindowExtent ext = window_extent(t.g, oi, oj);
      const bool full = ext.count() == 4;
      const A scale = full ? A(1) : A(1) / A(ext.count());
      const T* gp = t.gy + (oi * v.Wo + oj) * t.gst;
      for_chunks<L>(v.C - c_begin, [&](auto chunk, int64_t cc, int64_t n) SAEP_LAMBDA_INLINE {
        const int64_t len = SAEP_LEN(chunk, n);
        const int64_t c = c_begin + cc;
        A gv[L];
        for (int64_t q = 0; q < len; ++q) gv[q] = ld<T, A>(gp[c + q]) * scale;
        if (full) {
          for_patch(v, oi, oj, [&](int a, int e, const T* x) SAEP_LAMBDA_INLINE {
            const T* xp = x + c;
            A* dst = gwf + (a * k1 + e) * v.ws + c;
            for (int64_t q = 0; q < len; ++q) dst[q] += gv[q] * ld<T, A>(xp[q]);
          });
          return;
        }
        for (int dy = 0; dy < ext.rows; ++dy)
          for (int dx = 0; dx < ext.cols; ++dx)
            for_taps(v, 2 * oi + dy, 2 * oj + dx,
                     [&](int u, int vv, const T* x) SAEP_LAMBDA_INLINE {
                       const T* xp = x + c;
                       A* dst = gw + (u * k + vv) * v.ws + c;
                       for (int64_t q = 0; q < len; ++q) dst[q] += gv[q] * ld<T, A>(xp[q]);
                     });
      });
    }
  }
}

// The avg backward from registers (avg_input_grad_staged, avg_weight_grad_staged) where their
// weights or accumulators and chains fit into the vector registers: AVX-512. With 16 registers
// a 64-byte Vec takes two, and GCC spills them: measured (cpu_kernel_bench, llava15-7b B=8,
// 2 threads, interleaved, ms) with AVX2 the input gradient 19-22 vs 7.7 (bf16) and 11.2 vs 7.9
// (fp32), the weight gradient 8.6-8.7 vs 4.7-4.8 and 9.6-9.7 vs 5.9 against the per-pixel and
// per-window loops, which stay there. The baseline build (SSE, the fallback for CPUs without
// AVX2) keeps them too: its weight gradient was slower from registers (7.4-7.5 vs 5.9-6.0 in
// bf16, 9.0-9.2 vs 6.4-6.5 in fp32), its input gradient faster (6.4 vs 9.3-9.5 in fp32).
constexpr bool kAvgBackwardStaged = SAEP_CPU_VEC_REGISTERS >= 32;

template <typename T, typename A>
SAEP_INLINE void avg_weight_grad(GradTask<T, A>& t) {
  using P = Packing<T, A>;
  const View<T, A>& v = t.v;
  const int k = v.k, k1 = v.k1;
  t.s.gwf.assign(size_t(k1 * k1 * v.ws), A(0));
  A* gwf = t.s.gwf.data();
  A* gw = t.gw;
  if constexpr (kAvgBackwardStaged)
    with_patch_size(k1, [&](auto kc1) SAEP_LAMBDA_INLINE {
      avg_weight_grad_staged<decltype(kc1)::value>(t, gwf);
    });
  const int64_t c_tail = kAvgBackwardStaged ? v.C / P::kStep * P::kStep : 0;
  if (c_tail < v.C) avg_weight_grad_tail(t, gwf, c_tail);
  for (int u = 0; u < k; ++u)
    for (int vv = 0; vv < k; ++vv) {
      A* dst = gw + (u * k + vv) * v.ws;
      for (int dy = 0; dy < 2; ++dy)
        for (int dx = 0; dx < 2; ++dx) {
          const A* src = gwf + ((u + dy) * k1 + vv + dx) * v.ws;
          for (int64_t q = 0; q < v.C; ++q) dst[q] += A(0.25) * src[q];
        }
    }
  if constexpr (kAvgBackwardStaged) unpack_weight_grad(t, k * k);
}

// grad_x(i, j) = residual * g_z(i, j) + sum_{u,v} w[u, v] * g_z(i - u + p, j - v + p) for the
// channels [c0, c0 + cn). Pixel row i reads g_z rows i - p .. i + p: g_z is built a row at a
// time into a ring of k rows, so every element is built once.
template <typename T, typename A>
SAEP_INLINE void max_input_grad(GradTask<T, A>& t, int64_t c0, int64_t cn) {
  const View<T, A>& v = t.v;
  const int k = v.k, pad = v.pad;
  constexpr int L = lanes<A>() / 2;
  // g_z pixels padded_stride(cn) apart in the ring (so that the k*k pixels a grad_x chunk
  // reads and its weight rows do not share L1 sets)
  const int64_t px_stride = padded_stride<A>(cn), row_len = v.W * px_stride;
  t.s.gz.resize(size_t(k * row_len));
  A* ring = t.s.gz.data();
  auto build_row = [&](int64_t r) {
    A* dst = ring + (r % k) * row_len;
    for (int64_t j = 0; j < v.W; ++j) {
      const int64_t widx = (r / 2) * v.Wo + j / 2;
      const T* gp = t.gy + widx * t.gst + c0;
      const uint8_t* ap = t.am + widx * v.kc + c0;
      const uint8_t code = uint8_t(window_code(int(r & 1), int(j & 1)));
      A* d = dst + j * px_stride;
      for (int64_t q = 0; q < cn; ++q) d[q] = ap[q] == code ? ld<T, A>(gp[q]) : A(0);
    }
  };
  const A* rows[kMaxKernel];  // rows[u]: g_z row i - u + p, or nullptr out of grid
  for (int64_t r = 0; r < std::min<int64_t>(pad, v.H); ++r) build_row(r);
  for (int64_t i = 0; i < v.H; ++i) {
    if (i + pad < v.H) build_row(i + pad);
    for (int u = 0; u < k; ++u) {
      const int64_t i2 = i - u + pad;
      rows[u] = i2 >= 0 && i2 < v.H ? ring + (i2 % k) * row_len : nullptr;
    }
    const A* self = rows[pad];
    for (int64_t j = 0; j < v.W; ++j) {
      for_chunks<L>(cn, [&](auto chunk, int64_t cc, int64_t n) SAEP_LAMBDA_INLINE {
        const int64_t len = SAEP_LEN(chunk, n);
        const int64_t c = c0 + cc;
        A acc[L];
        const A* gz = self + j * px_stride + cc;
        for (int64_t q = 0; q < len; ++q) acc[q] = t.g.residual ? gz[q] : A(0);
        for (int u = 0; u < k; ++u) {
          if (!rows[u]) continue;
          for (int vv = 0; vv < k; ++vv) {
            const int64_t j2 = j - vv + pad;
            if (j2 < 0 || j2 >= v.W) continue;
            const A* nb = rows[u] + j2 * px_stride + cc;
            const A* wp = t.w + (u * k + vv) * v.ws + c;
            for (int64_t q = 0; q < len; ++q) acc[q] += wp[q] * nb[q];
          }
        }
        T* o = t.gx + (i * v.W + j) * v.C + c;
        for (int64_t q = 0; q < len; ++q) o[q] = Convert<T, A>::store(acc[q]);
      });
    }
  }
}

// grad_w[u, v] += sum over the window's positions (dy, dx) of
//   g_z(2oi + dy, 2oj + dx) * x(2oi + dy + u - p, 2oj + dx + v - p)
// for the channels [c0, c0 + cn), a window at a time so that each tap's accumulator is read
// and written once per window.
template <typename T, typename A>
SAEP_INLINE void max_weight_grad(GradTask<T, A>& t, int64_t c0, int64_t cn) {
  const View<T, A>& v = t.v;
  const int k = v.k, pad = v.pad;
  constexpr int LW = lanes<A>() / 4;  // four g_z sets and an accumulator in registers
  for (int64_t oi = 0; oi < v.Ho; ++oi) {
    for (int64_t oj = 0; oj < v.Wo; ++oj) {
      const int64_t widx = oi * v.Wo + oj;
      const T* gp = t.gy + widx * t.gst + c0;
      const uint8_t* ap = t.am + widx * v.kc + c0;
      const WindowExtent ext = window_extent(t.g, oi, oj);
      for_chunks<LW>(cn, [&](auto chunk, int64_t cc, int64_t n) SAEP_LAMBDA_INLINE {
        const int64_t len = SAEP_LEN(chunk, n);
        const int64_t c = c0 + cc;
        A gz[4][LW];
        for (int d = 0; d < 4; ++d)
          for (int64_t q = 0; q < len; ++q)
            gz[d][q] = ap[cc + q] == d ? ld<T, A>(gp[cc + q]) : A(0);
        for (int u = 0; u < k; ++u)
          for (int vv = 0; vv < k; ++vv) {
            A* dst = t.gw + (u * k + vv) * v.ws + c;
            A acc[LW];
            for (int64_t q = 0; q < len; ++q) acc[q] = dst[q];
            for (int dy = 0; dy < ext.rows; ++dy) {
              const int64_t r = 2 * oi + dy + u - pad;
              if (r < 0 || r >= v.H) continue;
              for (int dx = 0; dx < ext.cols; ++dx) {
                const int64_t col = 2 * oj + dx + vv - pad;
                if (col < 0 || col >= v.W) continue;
                const T* xp = v.px(r, col) + c;
                const A* z = gz[window_code(dy, dx)];
                for (int64_t q = 0; q < len; ++q) acc[q] += z[q] * ld<T, A>(xp[q]);
              }
            }
            for (int64_t q = 0; q < len; ++q) dst[q] = acc[q];
          }
      });
    }
  }
}

// The saved argmax codes of one Packing group's channels, as lane masks' integers in Packing's
// channel order (code[q] for the group's vector q).
template <typename T, typename A>
SAEP_INLINE void load_codes(const uint8_t* am,
                            typename VecOf<A>::Mask (&code)[Packing<T, A>::kVecs]) {
  using P = Packing<T, A>;
  using M = typename VecOf<A>::Mask;
  constexpr int VL = vec_lanes<A>();
  using Halves = typename IntVec<uint16_t, VL>::type;
  if constexpr (P::kVecs == 1) {
    // widened through 16-bit lanes: GCC 12 lowers a direct conversion of bytes to 32- or
    // 64-bit lanes lane by lane (68 instructions instead of 12 for 16 lanes)
    typename IntVec<uint8_t, VL>::type bytes;
    std::memcpy(&bytes, am, VL);
    code[0] = __builtin_convertvector(__builtin_convertvector(bytes, Halves), M);
  } else {
    static_assert(P::kVecs == 2 && P::kDeinterleaved, "even/odd channel halves");
    Halves pairs;  // channel 2i's code in the low byte
    std::memcpy(&pairs, am, 2 * VL);
    code[0] = __builtin_convertvector(pairs & 0xff, M);
    code[1] = __builtin_convertvector(pairs >> 8, M);
  }
}

// g_y and the saved argmax of one window for vector block b of Packing's channel order (group
// at gy and am, its vector q = b % kVecs), as g_z at the window's four positions: gz[d] is g_y
// where the argmax is d = window_code(dy, dx), else 0.
template <typename T, typename A>
SAEP_INLINE void window_gz(const T* gy, const uint8_t* am, int q, Vec<A> (&gz)[4]) {
  using P = Packing<T, A>;
  using M = typename VecOf<A>::Mask;
  Vec<A> g[P::kVecs];
  P::load(gy, g);
  M code[P::kVecs];
  load_codes<T, A>(am, code);
#pragma GCC unroll 4
  for (int d = 0; d < 4; ++d) gz[d] = select(code[q] == (M{} + d), g[q], Vec<A>{});
}

// grad_x for the channels of full Packing groups, as max_input_grad but with g_z in Packing's
// channel order in a ring of k rows of the whole width and channels: pixel row by pixel row,
// and in each one vector block at a time, the k x k weights stay in registers while the row's
// pixels slide along. Each sum adds in max_input_grad's order.
template <int K1, typename T, typename A>
SAEP_INLINE void max_input_grad_staged(GradTask<T, A>& t) {
  using P = Packing<T, A>;
  using M = typename VecOf<A>::Mask;
  constexpr int K = K1 - 1, pad = K / 2, VL = vec_lanes<A>();
  constexpr int kPixels = 4;  // pixels computed together
  const View<T, A>& v = t.v;
  const int64_t ws = v.ws, groups = v.C / P::kStep, blocks = groups * P::kVecs;
  const int64_t ps = padded_stride<A>(v.C), row_len = v.W * ps;
  const A* const packed_w = pack_weights<T, A>(t.s, t.w, K * K, ws, v.C, nullptr).w;
  t.s.gz.resize(size_t(K * row_len));
  A* ring = t.s.gz.data();
  t.s.held.resize(size_t(P::kVecs * v.W * VL));
  // g_z row r into its slot: pixel (r, j) holds its window's g_y where the argmax is its
  // position, else 0
  auto build_row = [&](int64_t r) SAEP_LAMBDA_INLINE {
    A* dst = ring + (r % K) * row_len;
    for (int64_t j = 0; j < v.W; ++j) {
      const int64_t widx = (r / 2) * v.Wo + j / 2;
      const T* gp = t.gy + widx * t.gst;
      const uint8_t* ap = t.am + widx * v.kc;
      const M here = M{} + window_code(int(r & 1), int(j & 1));
      A* d = dst + j * ps;
      for (int64_t g = 0; g < groups; ++g) {
        Vec<A> gy[P::kVecs];
        P::load(gp + g * P::kStep, gy);
        M code[P::kVecs];
        load_codes<T, A>(ap + g * P::kStep, code);
        for (int q = 0; q < P::kVecs; ++q)
          VecIO<A, A>::store(d + (g * P::kVecs + q) * VL, select(code[q] == here, gy[q], Vec<A>{}));
      }
    }
  };
  for (int64_t r = 0; r < std::min<int64_t>(pad, v.H); ++r) build_row(r);
  for (int64_t i = 0; i < v.H; ++i) {
    if (i + pad < v.H) build_row(i + pad);
    const A* rows[K];  // rows[u]: g_z row i - u + p, or nullptr out of grid
    for (int u = 0; u < K; ++u) {
      const int64_t i2 = i - u + pad;
      rows[u] = i2 >= 0 && i2 < v.H ? ring + (i2 % K) * row_len : nullptr;
    }
    T* o_row = t.gx + i * v.W * v.C;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t c_group = (b / P::kVecs) * P::kStep;
      const int q = int(b % P::kVecs);
      Vec<A> w[K][K];
      load_taps<K>(packed_w, ws, b, w);
      const int64_t col = b * VL;
      for (int64_t j = 0; j < v.W;) {
        if (j >= pad && j + kPixels - 1 + pad < v.W) {
          // kPixels pixels whose taps are all in the grid: independent chains, interleaved tap
          // by tap so that the FMA latency of one overlaps the others
          Vec<A> acc[kPixels];
#pragma GCC unroll 8
          for (int i = 0; i < kPixels; ++i)
            acc[i] = t.g.residual ? VecIO<A, A>::load(rows[pad] + (j + i) * ps + col) : Vec<A>{};
#pragma GCC unroll 16
          for (int u = 0; u < K; ++u) {
            if (!rows[u]) continue;
#pragma GCC unroll 16
            for (int e = 0; e < K; ++e)
#pragma GCC unroll 8
              for (int i = 0; i < kPixels; ++i)
                acc[i] += w[u][e] * VecIO<A, A>::load(rows[u] + (j + i - e + pad) * ps + col);
          }
#pragma GCC unroll 8
          for (int i = 0; i < kPixels; ++i)
            store_block<T, A>(t.s, v.W, q, j + i, acc[i], o_row + (j + i) * v.C + c_group);
          j += kPixels;
          continue;
        }
        Vec<A> acc = t.g.residual ? VecIO<A, A>::load(rows[pad] + j * ps + col) : Vec<A>{};
#pragma GCC unroll 16
        for (int u = 0; u < K; ++u) {
          if (!rows[u]) continue;
#pragma GCC unroll 16
          for (int e = 0; e < K; ++e) {
            const int64_t j2 = j - e + pad;
            if (j2 < 0 || j2 >= v.W) continue;
            acc += w[u][e] * VecIO<A, A>::load(rows[u] + j2 * ps + col);
          }
        }
        store_block<T, A>(t.s, v.W, q, j, acc, o_row + j * v.C + c_group);
        ++j;
      }
    }
  }
}

// One window's share of grad_w for one vector block from the staged rows: for each tap (u, e)
// acc[u][e] += gz[d] * x(patch row dy + u, column dx + e) over the positions d = (dy, dx) in
// order, as max_weight_grad adds them. kInside: the window's K1 x K1 patch and its four
// positions are all in the grid; else the in-grid patch rows [a_lo, a_hi), columns
// [e_lo, e_hi) and positions (dy < rows_in, dx < cols_in) only. The patch is read a row at a
// time, each pixel once for the taps and positions that use it.
template <int K1, bool kInside, typename A>
SAEP_INLINE void max_weight_grad_window(const A* const* rows, int64_t col, int64_t ps,
                                        const Vec<A> (&gz)[4], Vec<A> (&acc)[K1 - 1][K1 - 1],
                                        int rows_in, int cols_in, int a_lo, int a_hi, int e_lo,
                                        int e_hi) {
  constexpr int K = K1 - 1;
#pragma GCC unroll 16
  for (int a = 0; a < K1; ++a) {
    if (!kInside && (a < a_lo || a >= a_hi)) continue;
    Vec<A> x[K1] = {};  // (the edge kernel reads only the in-grid ones)
#pragma GCC unroll 16
    for (int c = 0; c < K1; ++c)
      if (kInside || (c >= e_lo && c < e_hi)) x[c] = VecIO<A, A>::load(rows[a] + col + c * ps);
#pragma GCC unroll 2
    for (int dy = 0; dy < 2; ++dy) {
      const int u = a - dy;
      if (u < 0 || u >= K || (!kInside && dy >= rows_in)) continue;
#pragma GCC unroll 2
      for (int dx = 0; dx < 2; ++dx) {
        if (!kInside && dx >= cols_in) continue;
#pragma GCC unroll 16
        for (int e = 0; e < K; ++e)
          if (kInside || (dx + e >= e_lo && dx + e < e_hi))
            acc[u][e] += gz[2 * dy + dx] * x[dx + e];
      }
    }
  }
}

// grad_w for the channels of full Packing groups, from the staged rows: window row by window
// row, and in each one vector block at a time, the k x k accumulators stay in registers while
// the row's windows slide along. Windows are walked in raster order (one strip of the whole
// width), so each sum adds in max_weight_grad's order. t.gw is in Packing's channel order while
// this runs and back in channel order after.
template <int K1, typename T, typename A>
SAEP_INLINE void max_weight_grad_staged(GradTask<T, A>& t) {
  using P = Packing<T, A>;
  constexpr int K = K1 - 1, VL = vec_lanes<A>();
  const View<T, A>& v = t.v;
  const int64_t ws = v.ws;
  for_staged_window_rows<K1>(v, t.s, [&](int64_t oi, const A* const* rows, int a_lo, int a_hi,
                                         const StagedRows<T, A>& st,
                                         const Prefetch& next) SAEP_LAMBDA_INLINE {
    const int64_t ps = st.px_stride;
    const int rows_in = 1 + int(2 * oi + 1 < v.H);
    for (int64_t b = 0; b < st.blocks; ++b) {
      next.block(b, st.blocks);
      const int64_t c_group = (b / P::kVecs) * P::kStep;
      const int q = int(b % P::kVecs);
      Vec<A> acc[K][K];
      load_taps<K>(t.gw, ws, b, acc);
      for (int64_t oj = 0; oj < v.Wo; ++oj) {
        const int64_t widx = oi * v.Wo + oj;
        Vec<A> gz[4];
        window_gz<T, A>(t.gy + widx * t.gst + c_group, t.am + widx * v.kc + c_group, q, gz);
        const int64_t j0 = 2 * oj - v.pad;
        const int e_lo = int(std::max<int64_t>(0, -j0));
        const int e_hi = int(std::min<int64_t>(K1, v.W - j0));
        const int cols_in = 1 + int(2 * oj + 1 < v.W);
        const int64_t col = (j0 - st.j_lo) * ps + b * VL;
        if (rows_in == 2 && cols_in == 2 && a_lo == 0 && a_hi == K1 && e_lo == 0 && e_hi == K1)
          max_weight_grad_window<K1, true>(rows, col, ps, gz, acc, 2, 2, 0, K1, 0, K1);
        else
          max_weight_grad_window<K1, false>(rows, col, ps, gz, acc, rows_in, cols_in, a_lo, a_hi,
                                            e_lo, e_hi);
      }
      store_taps<K>(t.gw, ws, b, acc);
    }
  });
  unpack_weight_grad(t, K * K);
}

// The sum of g_z over a window's pixels is its g_y: grad_b sums g_y directly.
template <typename T, typename A>
SAEP_INLINE void bias_grad(GradTask<T, A>& t, A* part) {
  t.s.gb.assign(size_t(t.v.C), A(0));
  A* acc = t.s.gb.data();
  for (int64_t widx = 0; widx < t.g.windows(); ++widx) {
    const T* gp = t.gy + widx * t.gst;
    for (int64_t q = 0; q < t.v.C; ++q) acc[q] += ld<T, A>(gp[q]);
  }
  std::copy_n(acc, t.v.C, part);
}

template <typename T, typename A>
struct BackwardTask {
  static SAEP_INLINE void run(const BwdParams& p, const Task& task, Scratch<A>& s) {
    GradTask<T, A> t(p, task, s);
    const int64_t C = t.g.channels, kc = t.g.kc();
    if (t.g.pool == Pool::Avg) {
      fold_avg(t.g, s.w, s.wf);
      if (t.gx) {
        if constexpr (kAvgBackwardStaged)
          with_patch_size(t.v.k1, [&](auto k1) SAEP_LAMBDA_INLINE {
            avg_input_grad_staged<decltype(k1)::value>(t);
          });
        const int64_t c_tail =
            kAvgBackwardStaged ? C / Packing<T, A>::kStep * Packing<T, A>::kStep : 0;
        if (c_tail < C) avg_input_grad(t, c_tail);
      }
      if (t.gw) avg_weight_grad(t);
    } else {
      // the channels past the last full Packing group: max_input_grad and max_weight_grad
      const int64_t c_tail = C / Packing<T, A>::kStep * Packing<T, A>::kStep;
      with_patch_size(t.v.k1, [&](auto k1) SAEP_LAMBDA_INLINE {
        if (t.gx) max_input_grad_staged<decltype(k1)::value>(t);
        if (t.gw) max_weight_grad_staged<decltype(k1)::value>(t);
      });
      if (c_tail < C && t.gx) max_input_grad(t, c_tail, C - c_tail);
      if (c_tail < C && t.gw) max_weight_grad(t, c_tail, C - c_tail);
    }
    if (t.gw) {
      const int taps = t.g.ksize * t.g.ksize;
      A* part = static_cast<A*>(p.grad_w_part) + task.b * taps * kc + task.l * C;
      for (int tap = 0; tap < taps; ++tap) std::copy_n(t.gw + tap * t.v.ws, C, part + tap * kc);
    }
    if (p.grad_b_part) bias_grad(t, static_cast<A*>(p.grad_b_part) + task.b * kc + task.l * C);
  }
};

}  // namespace

SAEP_DTYPE_ENTRY_POINTS(bwd, BwdParams, BackwardTask)

}  // namespace SAEP_CPU_ISA

#if SAEP_CPU_ISA_IS_BASELINE
SAEP_CPU_DISPATCH(bwd, BwdParams)

void fused_aggregate_bwd(const BwdParams& p, const ParallelFor& parallel_for) {
  run_tasks(p, parallel_for, bwd_by_capability);
}
#endif

}  // namespace cpu
}  // namespace saep
