// saep-kernels CUDA kernels: the backward kernel of the fused op (tiling: plan.h; staging and
// numerics: device.cuh). No torch headers.
//
// The block stages g_z (the pool's gradient routed back to the conv output: g_y / count for
// avg, g_y at the saved argmax for max) and x over its region; grad_x of each pixel is the
// transposed conv of g_z (+ g_z for the residual); weight and bias gradients are summed over
// the tile's pixels into the block's row of a partial-sum buffer, which the caller reduces in
// a fixed order (bitwise reproducible).
#pragma once

#include "device.cuh"

namespace saep {
namespace cuda {

template <typename T, int VEC, int KSIZE>
__global__ void fused_aggregate_bwd_kernel(BwdParams p, Tiling t) {
  using A = typename AccOf<T>::type;
  constexpr int PAD = KSIZE / 2;
  const Geometry& g = p.g;
  const Block<T, VEC> blk = block_of<T, VEC>(g, t, /*backward=*/true);
  const BlockPos& bp = blk.pos;
  const int R = t.rows(KSIZE), S = blk.cols, ch_block = blk.ch_block;
  const int64_t kc = g.kc(), wo = g.out_width();
  Vec<T, VEC>* xs = blk.xs;
  A* gzs = blk.gz;  // [R*S][ch_block]
  A* ws = blk.ws;
  const bool need_x = p.grad_x[0] != nullptr;
  const bool need_w = p.grad_w_part != nullptr, need_b = p.grad_b_part != nullptr;

  if (need_w) stage_x<T, VEC>(p.x, g, t, bp, xs);
  stage_weights<A>(p.weight, g, t, bp, ws);
  // g_z over the region: pixel (gi, gj) of window (gi / 2, gj / 2)
  {
    const T* gy = static_cast<const T*>(p.grad_out) + bp.b * p.gy_stride_b +
                  int64_t(bp.layer) * g.channels;
    const uint8_t* am = p.argmax ? p.argmax + bp.b * g.windows() * kc +
                                       int64_t(bp.layer) * g.channels
                                 : nullptr;
    const int n = R * S * t.cv;
    for (int idx = threadIdx.x; idx < n; idx += blockDim.x) {
      const RegionElem e = region_elem(g, t, bp, S, PAD, VEC, idx);
      const int64_t gi = e.gi, gj = e.gj, ch = e.ch;
      A* dst = gzs + int64_t(e.pix) * ch_block + e.cv * VEC;
      if (e.inside) {
        const int64_t oi = gi / 2, oj = gj / 2, w = oi * wo + oj;
        const Vec<T, VEC> gv = *reinterpret_cast<const Vec<T, VEC>*>(gy + w * p.gy_stride_t + ch);
        if (g.pool == Pool::Max) {
          const uint8_t code = uint8_t(window_code(int(gi & 1), int(gj & 1)));
#pragma unroll
          for (int i = 0; i < VEC; ++i)
            dst[i] = am[w * kc + ch + i] == code ? A(to_acc(gv.v[i])) : A(0);
        } else {
          const A inv = A(1) / A(window_extent(g, oi, oj).count());
#pragma unroll
          for (int i = 0; i < VEC; ++i) dst[i] = A(to_acc(gv.v[i])) * inv;
        }
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) dst[i] = A(0);
      }
    }
  }
  __syncthreads();

  const ThreadWindow tw = thread_window(g, t, bp, VEC);
  if (need_x && tw.active) {
    const int cv = tw.cv, wy = tw.wy, wx = tw.wx;
    const int64_t oi = tw.oi, oj = tw.oj, ch = tw.ch;
    T* gx = static_cast<T*>(p.grad_x[bp.layer]) +
            (bp.b * g.tokens() + g.prefix) * g.channels + ch;
#pragma unroll
    for (int dy = 0; dy < 2; ++dy) {
#pragma unroll
      for (int dx = 0; dx < 2; ++dx) {
        const int64_t i = 2 * oi + dy, j = 2 * oj + dx;
        if (i >= g.height || j >= g.width) continue;
        // region coordinates of the pixel: (2*wy + dy + PAD, 2*wx + dx + PAD)
        const int ry = 2 * wy + dy + PAD, rx = 2 * wx + dx + PAD;
        A acc[VEC];
        const A* own = gzs + (ry * S + rx) * ch_block + cv * VEC;
#pragma unroll
        for (int q = 0; q < VEC; ++q) acc[q] = g.residual ? own[q] : A(0);
#pragma unroll
        for (int u = 0; u < KSIZE; ++u) {
#pragma unroll
          for (int v = 0; v < KSIZE; ++v) {
            const A* gz = gzs + ((ry - u + PAD) * S + rx - v + PAD) * ch_block + cv * VEC;
            const A* w = ws + (u * KSIZE + v) * ch_block + cv * VEC;
#pragma unroll
            for (int q = 0; q < VEC; ++q) acc[q] += w[q] * gz[q];
          }
        }
        Vec<T, VEC> out;
#pragma unroll
        for (int q = 0; q < VEC; ++q) out.v[q] = store_acc<T>(acc[q]);
        *reinterpret_cast<Vec<T, VEC>*>(gx + (i * g.width + j) * g.channels) = out;
      }
    }
  }

  if (need_w || need_b) {
    // one work item per (tap, channel vector), plus one per channel vector for the bias;
    // each sums over the tile's in-grid pixels in a fixed order
    const int taps = need_w ? KSIZE * KSIZE : 0;
    const int items = (taps + (need_b ? 1 : 0)) * t.cv;
    const int64_t py_end = (2 * t.th < g.height - 2 * bp.oi0) ? 2 * t.th : g.height - 2 * bp.oi0;
    const int64_t px_end = (2 * t.tw < g.width - 2 * bp.oj0) ? 2 * t.tw : g.width - 2 * bp.oj0;
    for (int item = threadIdx.x; item < items; item += blockDim.x) {
      const int tap = item / t.cv, cv = item % t.cv;
      const int64_t ch = bp.c0 + int64_t(cv) * VEC;
      if (ch >= g.channels) continue;
      A acc[VEC];
#pragma unroll
      for (int q = 0; q < VEC; ++q) acc[q] = A(0);
      const int u = tap / KSIZE, v = tap % KSIZE;
      for (int64_t py = 0; py < py_end; ++py) {
        for (int64_t px = 0; px < px_end; ++px) {
          const A* gz = gzs + ((py + PAD) * S + px + PAD) * ch_block + cv * VEC;
          if (tap < taps) {
            const Vec<T, VEC> xv = xs[((py + u) * S + px + v) * t.cv + cv];
#pragma unroll
            for (int q = 0; q < VEC; ++q) acc[q] += gz[q] * A(to_acc(xv.v[q]));
          } else {
#pragma unroll
            for (int q = 0; q < VEC; ++q) acc[q] += gz[q];
          }
        }
      }
      const int64_t col = int64_t(bp.layer) * g.channels + ch;
      A* dst = tap < taps
                   ? static_cast<A*>(p.grad_w_part) + (bp.part * KSIZE * KSIZE + tap) * kc + col
                   : static_cast<A*>(p.grad_b_part) + bp.part * kc + col;
#pragma unroll
      for (int q = 0; q < VEC; ++q) dst[q] = acc[q];
    }
  }
}

}  // namespace cuda
}  // namespace saep
