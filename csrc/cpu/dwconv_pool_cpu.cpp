// saep-kernels CPU kernels of the fused op: forward and backward.
//
// Work is split into tasks (image b, layer l): a task reads its layer in place (channel
// stride 1, any batch/token stride) and owns a disjoint slice of every output, so tasks run
// in any order on any thread with the same result.
//
// Memory order. A task walks its image window by window (forward) or pixel by pixel
// (backward) and, for each, runs over all C channels: every token row is read whole and in
// order, the pattern the hardware prefetchers stream at full bandwidth, and every output
// row is written whole. (Walking the image once per block of a few cache lines of channels
// instead reads them every C*sizeof(T) bytes: measured here at a quarter of the bandwidth;
// the max backward's 256-channel blocks are long enough runs to stream.) The rows a window
// needs are reused from cache by its neighbours.
//
// Inner loops run over chunks of L channels with local accumulator arrays; for a full chunk
// L is a compile-time trip count, so the loops unroll into SIMD registers (the tail of C
// takes the same code with a runtime length). On x86-64 each entry point is compiled for
// AVX-512, AVX2+FMA and baseline, picked at load time (target_clones).
//
// avg pool, forward: a kxk conv, the residual and the 2x2 average fold into one stride-2
// (k+1)x(k+1) depthwise conv (docs/op.md section 4): 16 multiply-adds per output for k=3 instead
// of 36. The fold depends on the window: partial windows of odd grids (last row/column) drop
// their out-of-grid positions and divide by their own count, so up to four folded kernels.
// max pool, forward: the window's four conv outputs, one after the other (each a dot product
// held in registers; its inputs overlap the previous one's and come from L1); the argmax
// (window position 0..3) is saved for the backward.
//
// Backward. g_z is the pool's gradient at the conv output (g_y / count for avg, g_y where the
// saved argmax points for max); grad_x = residual * g_z + sum_{u,v} w[u,v] * g_z(shifted),
// grad_w[u,v] = sum g_z * x(shifted), grad_b = sum g_y.
//   avg: the transposes of the folded forward: grad_x gathers g_y through the folded kernels,
//     grad_w accumulates g_y * x over each window's (k+1)x(k+1) patch and unfolds at the end.
//   max: per block of 256 channels (runs of 0.5-2 KiB per pixel, still streamed), g_z is
//     built a row at a time into a ring of k rows that grad_x gathers from; grad_w walks the
//     windows, each tap's accumulator loaded and stored once per window.
// Weight and bias gradients land in the task's slice of a per-image partial buffer, which the
// caller reduces in a fixed order.
#include "dwconv_pool_cpu.h"

#include <algorithm>
#include <type_traits>
#include <vector>

#include "numeric.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(SAEP_NO_CLONES)
#define SAEP_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SAEP_CLONES
#endif
#if defined(__GNUC__) || defined(__clang__)
#define SAEP_INLINE __attribute__((always_inline)) inline
#define SAEP_LAMBDA_INLINE __attribute__((always_inline))
#else
#define SAEP_INLINE inline
#define SAEP_LAMBDA_INLINE
#endif

namespace saep {
namespace cpu {
namespace {

struct Task {
  int64_t b;
  int32_t l;
};

int64_t num_tasks(const Geometry& g) { return g.batch * g.num_layers; }
Task task_at(const Geometry& g, int64_t t) { return Task{t / g.num_layers, int32_t(t % g.num_layers)}; }

// ---------------------------------------------------------------------------- channel chunks

// Calls f(chunk, c, n) over [0, C) in chunks: chunk is std::integral_constant<int, L> for
// full chunks (n == L, a compile-time trip count) and <int, 0> for the tail (n < L).
template <int L, typename F>
SAEP_INLINE void for_chunks(int64_t C, F&& f) {
  int64_t c = 0;
  for (; c + L <= C; c += L) f(std::integral_constant<int, L>{}, c, int64_t(L));
  if (c < C) f(std::integral_constant<int, 0>{}, c, C - c);
}

// the trip count of a chunk: the constant L, or the tail's runtime length
#define SAEP_LEN(chunk, n) (decltype(chunk)::value ? int64_t(decltype(chunk)::value) : (n))

template <typename T, typename A>
SAEP_INLINE A ld(T v) {
  return Convert<T, A>::load(v);
}

// floor(n / 2) for any sign of n
inline int64_t floor_half(int64_t n) { return n >= 0 ? n / 2 : -((1 - n) / 2); }

// Accumulators of a chunk: 64 fp32 / 32 fp64 (8 AVX2 or 4 AVX-512 registers).
template <typename A>
constexpr int lanes() {
  return int(256 / sizeof(A));
}

// ---------------------------------------------------------------------------- task view

template <typename T, typename A>
struct View {
  const Geometry& g;
  int k, k1, pad;
  int64_t H, W, Ho, Wo, C, kc, st;
  const T* x;  // image b of layer l at pixel (0, 0)

  View(const Geometry& geo, const LayerPtrs& lp, const Task& t)
      : g(geo), k(geo.ksize), k1(geo.ksize + 1), pad(geo.pad()), H(geo.height), W(geo.width),
        Ho(geo.out_height()), Wo(geo.out_width()), C(geo.channels), kc(geo.kc()),
        st(lp.stride_t[t.l]),
        x(static_cast<const T*>(lp.data[t.l]) + t.b * lp.stride_b[t.l] + geo.prefix * lp.stride_t[t.l]) {}

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

// The task's weights, channel-contiguous: w[tap][c] for tap = u*k + v.
template <typename A>
SAEP_INLINE void task_weights(const Geometry& g, const void* weight, const Task& t,
                              std::vector<A>& w) {
  const int taps = g.ksize * g.ksize;
  w.resize(size_t(taps * g.channels));
  const A* src = static_cast<const A*>(weight) + t.l * g.channels;
  for (int tap = 0; tap < taps; ++tap)
    std::copy_n(src + tap * g.kc(), g.channels, w.begin() + tap * g.channels);
}

// Window variant: bit 1 set when the window has no second row, bit 0 when no second column.
SAEP_INLINE int variant_of(const Geometry& g, int64_t oi, int64_t oj) {
  return (2 * oi + 1 < g.height ? 0 : 2) + (2 * oj + 1 < g.width ? 0 : 1);
}

// Folded avg kernel of each window variant: wf[variant][a][e][c], a, e in [0, k], so that
//   y[oi, oj] = bias + sum_{a,e} wf[variant][a][e] * x[2*oi + a - p, 2*oj + e - p]
// (out-of-grid x are zero). It sums the kxk kernel shifted to each in-grid window position,
// plus the residual's identity tap, divided by the number of in-grid positions.
template <typename A>
SAEP_INLINE void fold_avg(const Geometry& g, const std::vector<A>& w, std::vector<A>& wf) {
  const int k = g.ksize, k1 = k + 1, pad = g.pad();
  const int64_t C = g.channels;
  wf.resize(size_t(4 * k1 * k1 * C));
  for (int variant = 0; variant < 4; ++variant) {
    const int ny = (variant & 2) ? 1 : 2, nx = (variant & 1) ? 1 : 2;
    const A inv = A(1) / A(ny * nx);
    for (int a = 0; a < k1; ++a) {
      for (int e = 0; e < k1; ++e) {
        A* dst = wf.data() + ((variant * k1 + a) * k1 + e) * C;
        const int ry = a - pad, rx = e - pad;
        const A centre = (g.residual && ry >= 0 && ry < ny && rx >= 0 && rx < nx) ? A(1) : A(0);
        for (int64_t c = 0; c < C; ++c) dst[c] = centre;
        for (int dy = 0; dy < ny; ++dy) {
          const int u = a - dy;
          if (u < 0 || u >= k) continue;
          for (int dx = 0; dx < nx; ++dx) {
            const int v = e - dx;
            if (v < 0 || v >= k) continue;
            const A* src = w.data() + (u * k + v) * C;
            for (int64_t c = 0; c < C; ++c) dst[c] += src[c];
          }
        }
        for (int64_t c = 0; c < C; ++c) dst[c] *= inv;
      }
    }
  }
}

// Per-thread scratch memory, reused by the tasks a thread runs.
template <typename A>
struct Scratch {
  std::vector<A> w, wf, gw, gwf, gb, gz;
};

// ---------------------------------------------------------------------------- forward

template <typename T, typename A>
SAEP_INLINE void fwd_task(const FwdParams& p, const Task& t, Scratch<A>& s) {
  const Geometry& g = p.g;
  const View<T, A> v(g, p.x, t);
  const A* bias = p.bias ? static_cast<const A*>(p.bias) + t.l * v.C : nullptr;
  const int64_t out_base = t.b * g.windows() * v.kc + t.l * v.C;
  T* out = static_cast<T*>(p.out) + out_base;
  uint8_t* argmax = p.argmax ? p.argmax + out_base : nullptr;
  task_weights(g, p.weight, t, s.w);

  if (g.pool == Pool::Avg) {
    fold_avg(g, s.w, s.wf);
    for (int64_t oi = 0; oi < v.Ho; ++oi) {
      for (int64_t oj = 0; oj < v.Wo; ++oj) {
        const A* wv = s.wf.data() + variant_of(g, oi, oj) * v.k1 * v.k1 * v.C;
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
    return;
  }

  // max: the window's conv outputs one position at a time, each a kxk dot product in
  // registers, kept if larger than the best so far
  const A* w = s.w.data();
  constexpr int L = lanes<A>() / 2;
  for (int64_t oi = 0; oi < v.Ho; ++oi) {
    for (int64_t oj = 0; oj < v.Wo; ++oj) {
      T* o = out + (oi * v.Wo + oj) * v.kc;
      uint8_t* am = argmax ? argmax + (oi * v.Wo + oj) * v.kc : nullptr;
      for_chunks<L>(v.C, [&](auto chunk, int64_t c, int64_t n) SAEP_LAMBDA_INLINE {
        const int64_t len = SAEP_LEN(chunk, n);
        // z = conv output at grid position (i, j) for this chunk's channels
        auto conv_at = [&](int64_t i, int64_t j, A* z) SAEP_LAMBDA_INLINE {
          for (int64_t q = 0; q < len; ++q) z[q] = bias ? bias[c + q] : A(0);
          if (g.residual) {
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
          const int64_t i = 2 * oi + (d >> 1), j = 2 * oj + (d & 1);
          if (i >= v.H || j >= v.W) continue;  // partial window of an odd grid
          A z[L];
          conv_at(i, j, z);
          // window order 00, 01, 10, 11; a NaN wins, as in torch.max_pool2d
          for (int64_t q = 0; q < len; ++q) {
            const bool take = z[q] > best[q] || z[q] != z[q];
            best[q] = take ? z[q] : best[q];
            code[q] = take ? uint8_t(d) : code[q];
          }
        }
        for (int64_t q = 0; q < len; ++q) o[c + q] = Convert<T, A>::store(best[q]);
        if (am)
          for (int64_t q = 0; q < len; ++q) am[c + q] = code[q];
      });
    }
  }
}

// ---------------------------------------------------------------------------- backward

template <typename T, typename A>
SAEP_INLINE void bwd_task(const BwdParams& p, const Task& t, Scratch<A>& s) {
  const Geometry& g = p.g;
  const View<T, A> v(g, p.x, t);
  const int k = v.k, pad = v.pad;
  const T* gy = static_cast<const T*>(p.grad_out) + t.b * p.gy_stride_b + t.l * v.C;
  const int64_t gst = p.gy_stride_t;
  const uint8_t* am = p.argmax ? p.argmax + t.b * g.windows() * v.kc + t.l * v.C : nullptr;
  const bool is_max = g.pool == Pool::Max;
  const bool need_x = p.grad_x[0] != nullptr;
  const bool need_w = p.grad_w_part != nullptr, need_b = p.grad_b_part != nullptr;
  task_weights(g, p.weight, t, s.w);
  const A* w = s.w.data();
  T* gx = need_x ? static_cast<T*>(p.grad_x[t.l]) + (t.b * (g.prefix + v.H * v.W) + g.prefix) * v.C
                 : nullptr;
  A* gw = nullptr;
  if (need_w) {
    s.gw.assign(size_t(k * k * v.C), A(0));
    gw = s.gw.data();
  }
  constexpr int L = lanes<A>() / 2;
  constexpr int64_t kMaxBwdBlock = 256;  // channels per block of the max backward

  if (!is_max) {
    // avg: the transposes of the folded forward
    fold_avg(g, s.w, s.wf);
    const int k1 = v.k1;
    if (need_x) {
      // grad_x(i, j) = sum over the windows whose (k+1)x(k+1) patch holds (i, j), i.e.
      // a = i - 2*oi + p in [0, k], of g_y(window) * wf[variant][a][e]
      for (int64_t i = 0; i < v.H; ++i) {
        const int64_t oi_lo = std::max<int64_t>(0, floor_half(i + pad - k + 1));
        const int64_t oi_hi = std::min<int64_t>(v.Ho - 1, (i + pad) / 2);
        for (int64_t j = 0; j < v.W; ++j) {
          const int64_t oj_lo = std::max<int64_t>(0, floor_half(j + pad - k + 1));
          const int64_t oj_hi = std::min<int64_t>(v.Wo - 1, (j + pad) / 2);
          T* o = gx + (i * v.W + j) * v.C;
          for_chunks<L>(v.C, [&](auto chunk, int64_t c, int64_t n) SAEP_LAMBDA_INLINE {
            const int64_t len = SAEP_LEN(chunk, n);
            A acc[L];
            for (int64_t q = 0; q < len; ++q) acc[q] = A(0);
            for (int64_t oi = oi_lo; oi <= oi_hi; ++oi) {
              const int a = int(i - 2 * oi + pad);
              for (int64_t oj = oj_lo; oj <= oj_hi; ++oj) {
                const int e = int(j - 2 * oj + pad);
                const A* wp = s.wf.data() + ((variant_of(g, oi, oj) * k1 + a) * k1 + e) * v.C + c;
                const T* gp = gy + (oi * v.Wo + oj) * gst + c;
                for (int64_t q = 0; q < len; ++q) acc[q] += ld<T, A>(gp[q]) * wp[q];
              }
            }
            for (int64_t q = 0; q < len; ++q) o[q + c] = Convert<T, A>::store(acc[q]);
          });
        }
      }
    }
    if (need_w) {
      // full windows: g_z = g_y / 4 at all four positions, so
      //   grad_w[u, v] = 1/4 sum_{dy,dx} F[u+dy, v+dx],  F[a, e] = sum_w g_y * x(patch a, e);
      // partial windows (last row/column of odd grids) add their in-grid positions directly
      s.gwf.assign(size_t(k1 * k1 * v.C), A(0));
      A* gwf = s.gwf.data();
      for (int64_t oi = 0; oi < v.Ho; ++oi) {
        for (int64_t oj = 0; oj < v.Wo; ++oj) {
          const bool full = 2 * oi + 1 < v.H && 2 * oj + 1 < v.W;
          const A scale = full ? A(1) : A(1) / A(window_count(g, oi, oj));
          const T* gp = gy + (oi * v.Wo + oj) * gst;
          for_chunks<L>(v.C, [&](auto chunk, int64_t c, int64_t n) SAEP_LAMBDA_INLINE {
            const int64_t len = SAEP_LEN(chunk, n);
            A gv[L];
            for (int64_t q = 0; q < len; ++q) gv[q] = ld<T, A>(gp[c + q]) * scale;
            if (full) {
              for_patch(v, oi, oj, [&](int a, int e, const T* x) SAEP_LAMBDA_INLINE {
                const T* xp = x + c;
                A* dst = gwf + (a * k1 + e) * v.C + c;
                for (int64_t q = 0; q < len; ++q) dst[q] += gv[q] * ld<T, A>(xp[q]);
              });
              return;
            }
            for (int dy = 0; dy < 2; ++dy)
              for (int dx = 0; dx < 2; ++dx) {
                if (2 * oi + dy >= v.H || 2 * oj + dx >= v.W) continue;
                for_taps(v, 2 * oi + dy, 2 * oj + dx,
                         [&](int u, int vv, const T* x) SAEP_LAMBDA_INLINE {
                           const T* xp = x + c;
                           A* dst = gw + (u * k + vv) * v.C + c;
                           for (int64_t q = 0; q < len; ++q) dst[q] += gv[q] * ld<T, A>(xp[q]);
                         });
              }
          });
        }
      }
      for (int u = 0; u < k; ++u)
        for (int vv = 0; vv < k; ++vv) {
          A* dst = gw + (u * k + vv) * v.C;
          for (int dy = 0; dy < 2; ++dy)
            for (int dx = 0; dx < 2; ++dx) {
              const A* src = gwf + ((u + dy) * k1 + vv + dx) * v.C;
              for (int64_t q = 0; q < v.C; ++q) dst[q] += A(0.25) * src[q];
            }
        }
    }
  } else if (need_x || need_w) {
    // max: g_z is g_y at the saved argmax, zero elsewhere. The image is walked once per
    // block of channels so that the block's input rows and g_z rows stay in L2 and its
    // weights and weight-gradient accumulators in L1.
    const int64_t cb = std::min<int64_t>(v.C, kMaxBwdBlock);
    for (int64_t c0 = 0; c0 < v.C; c0 += cb) {
      const int64_t cn = std::min<int64_t>(cb, v.C - c0);
      if (need_x) {
        // grad_x(i, j) = residual * g_z(i, j) + sum_{u,v} w[u, v] * g_z(i - u + p, j - v + p).
        // Pixel row i reads g_z rows i - p .. i + p: g_z is built a row at a time into a ring
        // of k rows, so every element is built once.
        const int64_t row_len = v.W * cb;
        s.gz.resize(size_t(k * row_len));
        auto build_row = [&](int64_t r) {
          A* dst = s.gz.data() + (r % k) * row_len;
          for (int64_t j = 0; j < v.W; ++j) {
            const int64_t widx = (r / 2) * v.Wo + j / 2;
            const T* gp = gy + widx * gst + c0;
            const uint8_t* ap = am + widx * v.kc + c0;
            const uint8_t code = uint8_t(window_code(int(r & 1), int(j & 1)));
            A* d = dst + j * cb;
            for (int64_t q = 0; q < cn; ++q) d[q] = ap[q] == code ? ld<T, A>(gp[q]) : A(0);
          }
        };
        const A* rows[kMaxKernel];  // rows[u]: g_z row i - u + p, or nullptr out of grid
        for (int64_t r = 0; r < std::min<int64_t>(pad, v.H); ++r) build_row(r);
        for (int64_t i = 0; i < v.H; ++i) {
          if (i + pad < v.H) build_row(i + pad);
          for (int u = 0; u < k; ++u) {
            const int64_t i2 = i - u + pad;
            rows[u] = i2 >= 0 && i2 < v.H ? s.gz.data() + (i2 % k) * row_len : nullptr;
          }
          const A* self = rows[pad];
          for (int64_t j = 0; j < v.W; ++j) {
            for_chunks<L>(cn, [&](auto chunk, int64_t cc, int64_t n) SAEP_LAMBDA_INLINE {
              const int64_t len = SAEP_LEN(chunk, n);
              const int64_t c = c0 + cc;
              A acc[L];
              const A* gz = self + j * cb + cc;
              for (int64_t q = 0; q < len; ++q) acc[q] = g.residual ? gz[q] : A(0);
              for (int u = 0; u < k; ++u) {
                if (!rows[u]) continue;
                for (int vv = 0; vv < k; ++vv) {
                  const int64_t j2 = j - vv + pad;
                  if (j2 < 0 || j2 >= v.W) continue;
                  const A* nb = rows[u] + j2 * cb + cc;
                  const A* wp = w + (u * k + vv) * v.C + c;
                  for (int64_t q = 0; q < len; ++q) acc[q] += wp[q] * nb[q];
                }
              }
              T* o = gx + (i * v.W + j) * v.C + c;
              for (int64_t q = 0; q < len; ++q) o[q] = Convert<T, A>::store(acc[q]);
            });
          }
        }
      }
      if (need_w) {
        // grad_w[u, v] += sum over the window's positions (dy, dx) of
        //   g_z(2oi + dy, 2oj + dx) * x(2oi + dy + u - p, 2oj + dx + v - p),
        // a window at a time so that each tap's accumulator is read and written once per window
        constexpr int LW = lanes<A>() / 4;  // four g_z sets and an accumulator in registers
        for (int64_t oi = 0; oi < v.Ho; ++oi) {
          for (int64_t oj = 0; oj < v.Wo; ++oj) {
            const int64_t widx = oi * v.Wo + oj;
            const T* gp = gy + widx * gst + c0;
            const uint8_t* ap = am + widx * v.kc + c0;
            for_chunks<LW>(cn, [&](auto chunk, int64_t cc, int64_t n) SAEP_LAMBDA_INLINE {
              const int64_t len = SAEP_LEN(chunk, n);
              const int64_t c = c0 + cc;
              A gz[4][LW];
              for (int d = 0; d < 4; ++d)
                for (int64_t q = 0; q < len; ++q)
                  gz[d][q] = ap[cc + q] == d ? ld<T, A>(gp[cc + q]) : A(0);
              for (int u = 0; u < k; ++u)
                for (int vv = 0; vv < k; ++vv) {
                  A* dst = gw + (u * k + vv) * v.C + c;
                  A acc[LW];
                  for (int64_t q = 0; q < len; ++q) acc[q] = dst[q];
                  for (int dy = 0; dy < 2; ++dy) {
                    const int64_t r = 2 * oi + dy + u - pad;
                    if (2 * oi + dy >= v.H || r < 0 || r >= v.H) continue;
                    for (int dx = 0; dx < 2; ++dx) {
                      const int64_t col = 2 * oj + dx + vv - pad;
                      if (2 * oj + dx >= v.W || col < 0 || col >= v.W) continue;
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
    }
  }
  if (need_w) {
    A* part = static_cast<A*>(p.grad_w_part) + t.b * k * k * v.kc + t.l * v.C;
    for (int tap = 0; tap < k * k; ++tap)
      std::copy_n(gw + tap * v.C, v.C, part + tap * v.kc);
  }
  if (need_b) {
    // the sum of g_z over a window's pixels is its g_y: sum g_y directly
    s.gb.assign(size_t(v.C), A(0));
    A* acc = s.gb.data();
    for (int64_t widx = 0; widx < g.windows(); ++widx) {
      const T* gp = gy + widx * gst;
      for (int64_t q = 0; q < v.C; ++q) acc[q] += ld<T, A>(gp[q]);
    }
    std::copy_n(acc, v.C, static_cast<A*>(p.grad_b_part) + t.b * v.kc + t.l * v.C);
  }
}

// ---------------------------------------------------------------------------- entry points

template <typename T, typename A>
SAEP_INLINE void fwd_chunk(const FwdParams& p, int64_t begin, int64_t end) {
  Scratch<A> s;
  for (int64_t t = begin; t < end; ++t) fwd_task<T, A>(p, task_at(p.g, t), s);
}

template <typename T, typename A>
SAEP_INLINE void bwd_chunk(const BwdParams& p, int64_t begin, int64_t end) {
  Scratch<A> s;
  for (int64_t t = begin; t < end; ++t) bwd_task<T, A>(p, task_at(p.g, t), s);
}

// One non-template function per dtype and direction, cloned per instruction set.
SAEP_CLONES void fwd_f32(const FwdParams& p, int64_t b, int64_t e) { fwd_chunk<float, float>(p, b, e); }
SAEP_CLONES void fwd_f64(const FwdParams& p, int64_t b, int64_t e) { fwd_chunk<double, double>(p, b, e); }
SAEP_CLONES void fwd_bf16(const FwdParams& p, int64_t b, int64_t e) { fwd_chunk<bf16, float>(p, b, e); }
SAEP_CLONES void fwd_f16(const FwdParams& p, int64_t b, int64_t e) { fwd_chunk<f16, float>(p, b, e); }
SAEP_CLONES void bwd_f32(const BwdParams& p, int64_t b, int64_t e) { bwd_chunk<float, float>(p, b, e); }
SAEP_CLONES void bwd_f64(const BwdParams& p, int64_t b, int64_t e) { bwd_chunk<double, double>(p, b, e); }
SAEP_CLONES void bwd_bf16(const BwdParams& p, int64_t b, int64_t e) { bwd_chunk<bf16, float>(p, b, e); }
SAEP_CLONES void bwd_f16(const BwdParams& p, int64_t b, int64_t e) { bwd_chunk<f16, float>(p, b, e); }

}  // namespace

ParallelFor serial_for() {
  return [](int64_t n, const std::function<void(int64_t, int64_t)>& body) {
    if (n > 0) body(0, n);
  };
}

int64_t bwd_num_parts(const Geometry& g) { return g.batch; }

namespace {

template <typename Params>
using ChunkFn = void (*)(const Params&, int64_t, int64_t);

// Runs the dtype's entry point over the problem's tasks.
template <typename Params>
void run_tasks(const Params& p, const ParallelFor& parallel_for, ChunkFn<Params> f32,
               ChunkFn<Params> f64, ChunkFn<Params> bf16, ChunkFn<Params> f16) {
  ChunkFn<Params> fn = p.g.dtype == DType::F64    ? f64
                       : p.g.dtype == DType::BF16 ? bf16
                       : p.g.dtype == DType::F16  ? f16
                                                  : f32;
  parallel_for(num_tasks(p.g), [&](int64_t b, int64_t e) { fn(p, b, e); });
}

}  // namespace

void dwconv_pool_fwd(const FwdParams& p, const ParallelFor& parallel_for) {
  run_tasks(p, parallel_for, fwd_f32, fwd_f64, fwd_bf16, fwd_f16);
}

void dwconv_pool_bwd(const BwdParams& p, const ParallelFor& parallel_for) {
  run_tasks(p, parallel_for, bwd_f32, bwd_f64, bwd_bf16, bwd_f16);
}

}  // namespace cpu
}  // namespace saep
