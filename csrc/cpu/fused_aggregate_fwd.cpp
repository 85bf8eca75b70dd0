// saep-kernels CPU kernels: the forward of the fused op (tasks, memory order and the avg fold:
// task.h).
//
// avg: one stride-2 (k+1)x(k+1) conv with the folded kernel of the window's variant, over a
// chunk of channels held in registers.
// max: the window's four conv outputs, one after the other (each a dot product held in
// registers; its inputs overlap the previous one's and come from L1); the argmax (window
// position 0..3) is saved for the backward when asked.
#include "fused_aggregate_cpu.h"
#include "task.h"

namespace saep {
namespace cpu {
namespace {

// One window over the channels [c_begin, C): any extent, out-of-grid pixels skipped.
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
      const A* wp = wv + (a * v.k1 + e) * v.C + c;
      for (int64_t q = 0; q < len; ++q) acc[q] += ld<T, A>(xp[q]) * wp[q];
    });
    for (int64_t q = 0; q < len; ++q) o[c + q] = Convert<T, A>::store(acc[q]);
  });
}

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
SAEP_INLINE void avg_forward_k(const FwdParams& p, const View<T, A>& v, const A* bias, T* out,
                               Scratch<A>& s) {
  using P = Packing<T, A>;
  // the pair kernel's weights: one row of C (+ padding) per variant and tap, in Packing's
  // channel order
  const int64_t ws = padded_stride<A>(v.C);
  s.packed_w.resize(size_t(4 * K1 * K1 * ws));
  for (int64_t row = 0; row < 4 * K1 * K1; ++row) {
    if constexpr (P::kDeinterleaved)
      P::deinterleave(s.wf.data() + row * v.C, s.packed_w.data() + row * ws, v.C);
    else
      std::copy_n(s.wf.data() + row * v.C, v.C, s.packed_w.data() + row * ws);
  }
  const A* packed_w = s.packed_w.data();
  const A* packed_b = bias;
  if constexpr (P::kDeinterleaved) {
    if (bias) {
      s.packed_b.resize(size_t(v.C));
      P::deinterleave(bias, s.packed_b.data(), v.C);
      packed_b = s.packed_b.data();
    }
  }
  for (int64_t oi = 0; oi < v.Ho; ++oi) {
    for (int64_t oj = 0; oj < v.Wo; ++oj) {
      const int64_t wofs = variant_of(p.g, oi, oj) * K1 * K1 * v.C;
      const A* wv = s.wf.data() + wofs;
      T* o = out + (oi * v.Wo + oj) * v.kc;
      const int64_t j0 = 2 * oj - v.pad;
      if (oj + 1 < v.Wo && j0 >= 0 && j0 + K1 + 2 <= v.W &&
          variant_of(p.g, oi, oj + 1) == variant_of(p.g, oi, oj)) {
        const int64_t done =
            avg_window_pair<K1>(v, packed_w + wofs / v.C * ws, ws, packed_b, oi, oj, o, o + v.kc);
        avg_window(v, wv, bias, oi, oj, o, done);
        avg_window(v, wv, bias, oi, oj + 1, o + v.kc, done);
        ++oj;
      } else {
        avg_window(v, wv, bias, oi, oj, o, 0);
      }
    }
  }
}

template <typename T, typename A>
SAEP_INLINE void avg_forward(const FwdParams& p, const View<T, A>& v, const A* bias, T* out,
                             Scratch<A>& s) {
  fold_avg(p.g, s.w, s.wf);
  switch (v.k1) {
    case 2: return avg_forward_k<2>(p, v, bias, out, s);
    case 4: return avg_forward_k<4>(p, v, bias, out, s);
    case 6: return avg_forward_k<6>(p, v, bias, out, s);
    default: return avg_forward_k<8>(p, v, bias, out, s);
  }
}

// Window (oi, oj) of max pooling when its patch columns 2oj - p .. 2oj + k - p + 1 are all in
// the grid (rows out of the grid are the conv's zero padding), over the channels
// [0, C - C % kStep): the rows of the (k+1)x(k+1) patch are loaded once each and feed the
// four conv outputs they are under; w and bias are in Packing's channel order, w's tap rows
// ws apart. Each conv output adds bias, residual and taps in max_window's order. Returns the
// first channel not done.
template <int K, typename T, typename A>
SAEP_INLINE int64_t max_window_fast(const View<T, A>& v, const A* w, int64_t ws, const A* bias,
                                    bool residual, int64_t oi, int64_t oj, int rows, T* o,
                                    uint8_t* am) {
  using P = Packing<T, A>;
  constexpr int VL = vec_lanes<A>(), NV = P::kVecs, K1 = K + 1;
  const int64_t C = v.C, st = v.st;
  const int64_t r0 = 2 * oi - K / 2, j0 = 2 * oj - K / 2;
  const int a_lo = int(std::max<int64_t>(0, -r0)), a_hi = int(std::min<int64_t>(K1, v.H - r0));
  int64_t c = 0;
  for (; c + P::kStep <= C; c += P::kStep) {
    Vec<A> z[2][2][NV];
    for (int dy = 0; dy < rows; ++dy)
      for (int dx = 0; dx < 2; ++dx) {
        for (int q = 0; q < NV; ++q)
          z[dy][dx][q] = bias ? VecIO<A, A>::load(bias + c + q * VL) : Vec<A>{};
        if (residual) {
          Vec<A> xc[NV];
          P::load(v.px(2 * oi + dy, 2 * oj + dx) + c, xc);
          for (int q = 0; q < NV; ++q) z[dy][dx][q] += xc[q];
        }
      }
    for (int a = a_lo; a < a_hi; ++a) {
      const T* row = v.px(r0 + a, j0) + c;
      Vec<A> x[K1][NV];
#pragma GCC unroll 16
      for (int e = 0; e < K1; ++e) P::load(row + e * st, x[e]);
      for (int dy = 0; dy < rows; ++dy) {
        const int u = a - dy;
        if (u < 0 || u >= K) continue;
#pragma GCC unroll 16
        for (int vv = 0; vv < K; ++vv)
          for (int q = 0; q < NV; ++q) {
            const Vec<A> wt = VecIO<A, A>::load(w + (u * K + vv) * ws + c + q * VL);
            z[dy][0][q] += x[vv][q] * wt;
            z[dy][1][q] += x[vv + 1][q] * wt;
          }
      }
    }
    // window order 00, 01, 10, 11; a NaN wins, as in torch.max_pool2d
    using Mask = decltype(Vec<A>{} < Vec<A>{});
    Vec<A> best[NV];
    Mask code[NV];
    for (int q = 0; q < NV; ++q) {
      best[q] = z[0][0][q];
      code[q] = Mask{};
      for (int d = 1; d < 2 * rows; ++d) {
        const Vec<A> zd = z[d >> 1][d & 1][q];
        const Mask take = (zd > best[q]) | (zd != zd);
        best[q] = take ? zd : best[q];
        code[q] = take ? Mask{} + window_code(d >> 1, d & 1) : code[q];
      }
    }
    P::store(o + c, best);
    if (am) {
      for (int q = 0; q < NV; ++q)
        for (int l = 0; l < VL; ++l)
          am[c + (P::kDeinterleaved ? 2 * l + q : q * VL + l)] = uint8_t(code[q][l]);
    }
  }
  return c;
}

// Window (oi, oj) of max pooling over the channels [c_begin, C): any extent and position, the
// window's four conv outputs one after the other (each a dot product held in registers).
template <typename T, typename A>
SAEP_INLINE void max_window(const FwdParams& p, const View<T, A>& v, const A* w, const A* bias,
                            int64_t oi, int64_t oj, T* o, uint8_t* am, int64_t c_begin) {
  constexpr int L = lanes<A>() / 2;
  const WindowExtent ext = window_extent(p.g, oi, oj);
  for_chunks<L>(v.C - c_begin, [&](auto chunk, int64_t cc, int64_t n) SAEP_LAMBDA_INLINE {
    const int64_t c = c_begin + cc;
    const int64_t len = SAEP_LEN(chunk, n);
    // z = conv output at grid position (i, j) for this chunk's channels
    auto conv_at = [&](int64_t i, int64_t j, A* z) SAEP_LAMBDA_INLINE {
      for (int64_t q = 0; q < len; ++q) z[q] = bias ? bias[c + q] : A(0);
      if (p.g.residual) {
        const T* xp = v.px(i, j) + c;
        for (int64_t q = 0; q < len; ++q) z[q] += ld<T, A>(xp[q]);
      }
      for_taps(v, i, j, [&](int u, int vv, const T* x) SAEP_LAMBDA_INLINE {
        const T* xp = x + c;
        const A* wp = w + (u * v.k + vv) * v.C + c;
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

template <int K, typename T, typename A>
SAEP_INLINE void max_forward_k(const FwdParams& p, const View<T, A>& v, const A* bias, T* out,
                               uint8_t* argmax, Scratch<A>& s) {
  using P = Packing<T, A>;
  const int64_t ws = padded_stride<A>(v.C);
  s.packed_w.resize(size_t(K * K * ws));
  for (int64_t tap = 0; tap < K * K; ++tap) {
    if constexpr (P::kDeinterleaved)
      P::deinterleave(s.w.data() + tap * v.C, s.packed_w.data() + tap * ws, v.C);
    else
      std::copy_n(s.w.data() + tap * v.C, v.C, s.packed_w.data() + tap * ws);
  }
  const A* packed_b = bias;
  if constexpr (P::kDeinterleaved) {
    if (bias) {
      s.packed_b.resize(size_t(v.C));
      P::deinterleave(bias, s.packed_b.data(), v.C);
      packed_b = s.packed_b.data();
    }
  }
  for (int64_t oi = 0; oi < v.Ho; ++oi) {
    for (int64_t oj = 0; oj < v.Wo; ++oj) {
      T* o = out + (oi * v.Wo + oj) * v.kc;
      uint8_t* am = argmax ? argmax + (oi * v.Wo + oj) * v.kc : nullptr;
      const WindowExtent ext = window_extent(p.g, oi, oj);
      const int64_t j0 = 2 * oj - K / 2;
      int64_t done = 0;
      if (ext.cols == 2 && j0 >= 0 && j0 + K + 1 <= v.W)
        done = max_window_fast<K>(v, s.packed_w.data(), ws, packed_b, p.g.residual, oi, oj,
                                  ext.rows, o, am);
      max_window(p, v, s.w.data(), bias, oi, oj, o, am, done);
    }
  }
}

// max: the fast path for windows whose patch columns are in the grid, max_window for the rest
// (and the channels past the last full step).
template <typename T, typename A>
SAEP_INLINE void max_forward(const FwdParams& p, const View<T, A>& v, const A* bias, T* out,
                             uint8_t* argmax, Scratch<A>& s) {
  switch (v.k) {
    case 1: return max_forward_k<1>(p, v, bias, out, argmax, s);
    case 3: return max_forward_k<3>(p, v, bias, out, argmax, s);
    case 5: return max_forward_k<5>(p, v, bias, out, argmax, s);
    default: return max_forward_k<7>(p, v, bias, out, argmax, s);
  }
}

template <typename T, typename A>
struct ForwardTask {
  static SAEP_INLINE void run(const FwdParams& p, const Task& t, Scratch<A>& s) {
    const View<T, A> v(p.g, p.x, t);
    const A* bias = p.bias ? static_cast<const A*>(p.bias) + t.l * v.C : nullptr;
    const int64_t out_base = t.b * p.g.windows() * v.kc + t.l * v.C;
    task_weights(p.g, p.weight, t, s.w);
    if (p.g.pool == Pool::Avg)
      avg_forward(p, v, bias, static_cast<T*>(p.out) + out_base, s);
    else
      max_forward(p, v, bias, static_cast<T*>(p.out) + out_base,
                  p.argmax ? p.argmax + out_base : nullptr, s);
  }
};

SAEP_DTYPE_ENTRY_POINTS(fwd, FwdParams, ForwardTask)

}  // namespace

void fused_aggregate_fwd(const FwdParams& p, const ParallelFor& parallel_for) {
  run_tasks(p, parallel_for, fwd_entry_points);
}

}  // namespace cpu
}  // namespace saep
