// saep-kernels CUDA kernels: the forward kernel of the fused op (tiling: plan.h; staging and
// numerics: device.cuh). No torch headers.
//
// Each thread computes one window for one channel vector: the (k+1)^2 staged pixels of the
// window feed its four conv outputs (four accumulators); out-of-grid positions of partial
// windows (odd grids) are left out of the average / max; the argmax (window position 0..3)
// is saved for the backward when asked.
#pragma once

#include "device.cuh"

namespace saep {
namespace cuda {

template <typename T, int VEC, int KSIZE>
__global__ void fused_aggregate_fwd_kernel(FwdParams p, Tiling t) {
  using A = typename AccOf<T>::type;
  const Geometry& g = p.g;
  const Block<T, VEC> blk = block_of<T, VEC>(g, t, /*backward=*/false);
  stage_x<T, VEC>(p.x, g, t, blk.pos, blk.xs);
  stage_weights<A>(p.weight, g, t, blk.pos, blk.ws);
  __syncthreads();

  const ThreadWindow tw = thread_window(g, t, blk.pos, VEC);
  if (!tw.active) return;
  const BlockPos& bp = blk.pos;
  const int cv = tw.cv, wy = tw.wy, wx = tw.wx;
  const int64_t oi = tw.oi, oj = tw.oj, ch = tw.ch;
  const WindowExtent ext = window_extent(g, oi, oj);
  const bool has_down = ext.rows == 2, has_right = ext.cols == 2;

  A acc[4][VEC];
#pragma unroll
  for (int q = 0; q < 4; ++q)
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[q][i] = A(0);

#pragma unroll
  for (int a = 0; a <= KSIZE; ++a) {
#pragma unroll
    for (int e = 0; e <= KSIZE; ++e) {
      const Vec<T, VEC> xv = blk.xs[((2 * wy + a) * blk.cols + 2 * wx + e) * t.cv + cv];
      A xf[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) xf[i] = to_acc(xv.v[i]);
#pragma unroll
      for (int dy = 0; dy < 2; ++dy) {
#pragma unroll
        for (int dx = 0; dx < 2; ++dx) {
          const int u = a - dy, v = e - dx;  // compile-time after unrolling
          if (u >= 0 && u < KSIZE && v >= 0 && v < KSIZE) {
            const A* w = blk.ws + (u * KSIZE + v) * blk.ch_block + cv * VEC;
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[dy * 2 + dx][i] += w[i] * xf[i];
          }
          if (g.residual && u == KSIZE / 2 && v == KSIZE / 2) {
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[dy * 2 + dx][i] += xf[i];
          }
        }
      }
    }
  }

  const int64_t o = (bp.b * g.windows() + oi * g.out_width() + oj) * g.kc() +
                    int64_t(bp.layer) * g.channels + ch;
  const A* bias = static_cast<const A*>(p.bias);
  Vec<T, VEC> y;
  uint8_t code[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const A b = bias ? bias[bp.layer * g.channels + ch + i] : A(0);
    A r;
    if (g.pool == Pool::Max) {
      // window order 00, 01, 10, 11; NaN wins, as in torch.max_pool2d
      A best = acc[0][i];
      uint8_t c = 0;
      if (has_right && (acc[1][i] > best || acc[1][i] != acc[1][i])) { best = acc[1][i]; c = 1; }
      if (has_down && (acc[2][i] > best || acc[2][i] != acc[2][i])) { best = acc[2][i]; c = 2; }
      if (has_down && has_right && (acc[3][i] > best || acc[3][i] != acc[3][i])) {
        best = acc[3][i];
        c = 3;
      }
      r = best;
      code[i] = c;
    } else {
      A s = acc[0][i];
      if (has_right) s += acc[1][i];
      if (has_down) s += acc[2][i];
      if (has_down && has_right) s += acc[3][i];
      r = s / A(ext.count());
      code[i] = 0;
    }
    y.v[i] = store_acc<T>(r + b);
  }
  *reinterpret_cast<Vec<T, VEC>*>(static_cast<T*>(p.out) + o) = y;
  if (p.argmax != nullptr) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) p.argmax[o + i] = code[i];
  }
}

}  // namespace cuda
}  // namespace saep
