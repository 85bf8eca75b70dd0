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

template <typename T, typename A>
SAEP_INLINE void avg_forward(const FwdParams& p, const View<T, A>& v, const A* bias, T* out,
                             Scratch<A>& s) {
  fold_avg(p.g, s.w, s.wf);
  for (int64_t oi = 0; oi < v.Ho; ++oi) {
    for (int64_t oj = 0; oj < v.Wo; ++oj) {
      const A* wv = s.wf.data() + variant_of(p.g, oi, oj) * v.k1 * v.k1 * v.C;
      T* o = out + (oi * v.Wo + oj) * v.kc;
      for_chunks<lanes<A>()>(v.C, [&](auto chunk, int64_t c, int64_t n) SAEP_LAMBDA_INLINE {
        const int64_t len = SAEP_LEN(chunk, n);
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
  }
}

template <typename T, typename A>
SAEP_INLINE void max_forward(const FwdParams& p, const View<T, A>& v, const A* bias, T* out,
                             uint8_t* argmax, const Scratch<A>& s) {
  const A* w = s.w.data();
  constexpr int L = lanes<A>() / 2;
  for (int64_t oi = 0; oi < v.Ho; ++oi) {
    for (int64_t oj = 0; oj < v.Wo; ++oj) {
      T* o = out + (oi * v.Wo + oj) * v.kc;
      uint8_t* am = argmax ? argmax + (oi * v.Wo + oj) * v.kc : nullptr;
      const WindowExtent ext = window_extent(p.g, oi, oj);
      for_chunks<L>(v.C, [&](auto chunk, int64_t c, int64_t n) SAEP_LAMBDA_INLINE {
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
