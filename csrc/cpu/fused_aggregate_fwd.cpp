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
      const A* wp = wv + (a * v.k1 + e) * v.ws + c;
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
SAEP_INLINE void avg_forward_k(const View<T, A>& v, const A* bias, T* out,
                               Scratch<A>& s) {
  using P = Packing<T, A>;
  // Window pairs for bf16 only: measured (cpu_kernel_bench, llava15-7b B=8, 2 threads,
  // interleaved) 15% faster than avg_window in bf16 but 60% slower in fp32, where a pair's 24
  // pixel rows 4 KB apart share one L1 set.
  constexpr bool kPairs = std::is_same<T, bf16>::value;
  // the pair kernel's weights: one row of C (+ padding) per variant and tap, in Packing's
  // channel order
  const int64_t ws = v.ws;
  const A* packed_w = s.wf.data();
  if constexpr (P::kDeinterleaved) {
    s.packed_w.resize(size_t(4 * K1 * K1 * ws));
    for (int64_t row = 0; row < 4 * K1 * K1; ++row)
      P::deinterleave(s.wf.data() + row * ws, s.packed_w.data() + row * ws, v.C);
    packed_w = s.packed_w.data();
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

template <typename T, typename A>
SAEP_INLINE void avg_forward(const View<T, A>& v, const A* bias, T* out,
                             Scratch<A>& s) {
  fold_avg(v.g, s.w, s.wf);
  switch (v.k1) {
    case 2: return avg_forward_k<2>(v, bias, out, s);
    case 4: return avg_forward_k<4>(v, bias, out, s);
    case 6: return avg_forward_k<6>(v, bias, out, s);
    default: return avg_forward_k<8>(v, bias, out, s);
  }
}

template <typename T, typename A>
SAEP_INLINE void max_forward(const View<T, A>& v, const A* bias, T* out,
                             uint8_t* argmax, const Scratch<A>& s) {
  const A* w = s.w.data();
  constexpr int L = lanes<A>() / 2;
  for (int64_t oi = 0; oi < v.Ho; ++oi) {
    for (int64_t oj = 0; oj < v.Wo; ++oj) {
      T* o = out + (oi * v.Wo + oj) * v.kc;
      uint8_t* am = argmax ? argmax + (oi * v.Wo + oj) * v.kc : nullptr;
      const WindowExtent ext = window_extent(v.g, oi, oj);
      for_chunks<L>(v.C, [&](auto chunk, int64_t c, int64_t n) SAEP_LAMBDA_INLINE {
        const int64_t len = SAEP_LEN(chunk, n);
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
  }
}

template <typename T, typename A>
struct ForwardTask {
  static SAEP_INLINE void run(const FwdParams& p, const Task& t, Scratch<A>& s) {
    const View<T, A> v(p.x, t);
    const A* bias = p.bias ? static_cast<const A*>(p.bias) + t.l * v.C : nullptr;
    const int64_t out_base = t.window * v.kc + t.l * v.C;
    task_weights(t.g, p.weight, t, s.w);
    if (t.g.pool == Pool::Avg)
      avg_forward(v, bias, static_cast<T*>(p.out) + out_base, s);
    else
      max_forward(v, bias, static_cast<T*>(p.out) + out_base,
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
