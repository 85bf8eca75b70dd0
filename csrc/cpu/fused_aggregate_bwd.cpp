// saep-kernels CPU kernels: the backward of the fused op (tasks, memory order and the avg fold:
// task.h). One function per gradient and pool mode:
//
//   avg_input_grad    grad_x gathers g_y through the folded kernels (the transposed forward)
//   avg_weight_grad   g_y * x over each window's (k+1)x(k+1) patch, unfolded at the end
//   max_input_grad    grad_x from a ring of k rows of g_z, per block of 256 channels
//   max_weight_grad   g_z * x a window at a time, per block of 256 channels
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

constexpr int64_t kMaxBlock = 256;  // channels per block of the max backward

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
template <typename T, typename A>
SAEP_INLINE void avg_input_grad(const GradTask<T, A>& t) {
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
      for_chunks<L>(v.C, [&](auto chunk, int64_t c, int64_t n) SAEP_LAMBDA_INLINE {
        const int64_t len = SAEP_LEN(chunk, n);
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

// Full windows: g_z = g_y / 4 at all four positions, so
//   grad_w[u, v] = 1/4 sum_{dy,dx} F[u+dy, v+dx],  F[a, e] = sum_w g_y * x(patch a, e);
// partial windows (last row/column of odd grids) add their in-grid positions directly.
template <typename T, typename A>
SAEP_INLINE void avg_weight_grad(GradTask<T, A>& t) {
  const View<T, A>& v = t.v;
  const int k = v.k, k1 = v.k1;
  constexpr int L = lanes<A>() / 2;
  t.s.gwf.assign(size_t(k1 * k1 * v.ws), A(0));
  A* gwf = t.s.gwf.data();
  A* gw = t.gw;
  for (int64_t oi = 0; oi < v.Ho; ++oi) {
    for (int64_t oj = 0; oj < v.Wo; ++oj) {
      const WindowExtent ext = window_extent(t.g, oi, oj);
      const bool full = ext.count() == 4;
      const A scale = full ? A(1) : A(1) / A(ext.count());
      const T* gp = t.gy + (oi * v.Wo + oj) * t.gst;
      for_chunks<L>(v.C, [&](auto chunk, int64_t c, int64_t n) SAEP_LAMBDA_INLINE {
        const int64_t len = SAEP_LEN(chunk, n);
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
  for (int u = 0; u < k; ++u)
    for (int vv = 0; vv < k; ++vv) {
      A* dst = gw + (u * k + vv) * v.ws;
      for (int dy = 0; dy < 2; ++dy)
        for (int dx = 0; dx < 2; ++dx) {
          const A* src = gwf + ((u + dy) * k1 + vv + dx) * v.ws;
          for (int64_t q = 0; q < v.C; ++q) dst[q] += A(0.25) * src[q];
        }
    }
}

// grad_x(i, j) = residual * g_z(i, j) + sum_{u,v} w[u, v] * g_z(i - u + p, j - v + p) for the
// channels [c0, c0 + cn) of a block of cb. Pixel row i reads g_z rows i - p .. i + p: g_z is
// built a row at a time into a ring of k rows, so every element is built once.
template <typename T, typename A>
SAEP_INLINE void max_input_grad(GradTask<T, A>& t, int64_t c0, int64_t cn, int64_t cb) {
  const View<T, A>& v = t.v;
  const int k = v.k, pad = v.pad;
  constexpr int L = lanes<A>() / 2;
  // g_z pixels padded_stride(cb) apart in the ring (cb apart, a power of two, the k*k pixels
  // a grad_x chunk reads and its weight rows would share L1 sets)
  const int64_t px_stride = padded_stride<A>(cb), row_len = v.W * px_stride;
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
      if (t.gx) avg_input_grad(t);
      if (t.gw) avg_weight_grad(t);
    } else if (t.gx || t.gw) {
      // The image is walked once per block of channels so that the block's input rows and g_z
      // rows stay in L2 and its weights and weight-gradient accumulators in L1.
      const int64_t cb = std::min<int64_t>(C, kMaxBlock);
      for (int64_t c0 = 0; c0 < C; c0 += cb) {
        const int64_t cn = std::min<int64_t>(cb, C - c0);
        if (t.gx) max_input_grad(t, c0, cn, cb);
        if (t.gw) max_weight_grad(t, c0, cn);
      }
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
