// saep-kernels CUDA kernels: the backward kernels of the fused op (tiling: plan.h; staging and
// numerics: device.cuh). No torch headers.
//
// g_z is the pool's gradient routed back to the conv output: g_y / count for avg, g_y at the
// saved argmax for max. Two kernels, each launched only when its gradients are needed (a
// frozen vision tower runs the second alone):
//   input gradients: a block stages g_z over its tile's region and the weights; each thread
//     writes the four pixels of its window, one after another, each the transposed kxk conv
//     of g_z (+ g_z for the residual);
//   weight and bias gradients: a block owns an image, a chunk of channels and a layer, and
//     walks the image's tiles in order, staging x and g_z for each; a thread accumulates its
//     (tap, channel vector) items over all of them and writes the image's row of the
//     partial sums ([B, k*k, K*C], [B, K*C]), which the caller reduces in a fixed order
//     (bitwise reproducible; the buffer grows with the batch, not with the tiles).
#pragma once

#include "device.cuh"

namespace saep {
namespace cuda {

// Stage g_z over the block's region (zero outside the grid and past the last channel): pixel
// (gi, gj) of window (gi / 2, gj / 2).
template <typename T, int VEC, int KSIZE>
__device__ __forceinline__ void stage_grad_z(const BwdParams& p, const Tiling& t,
                                             const Block<T, VEC>& blk) {
  using A = typename AccOf<T>::type;
  const BlockPos& bp = blk.pos;
  const Geometry& g = bp.img.g;
  const int64_t kc = g.kc(), wo = g.out_width();
  const T* gy = static_cast<const T*>(p.grad_out) + bp.img.batch * p.gy_stride_b +
                bp.img.window * p.gy_stride_t + int64_t(bp.layer) * g.channels;
  const uint8_t* am = p.argmax ? p.argmax + bp.img.out_token(0) * kc +
                                     int64_t(bp.layer) * g.channels
                               : nullptr;
  const int n = t.rows(KSIZE) * blk.cols * t.cv;
  for (int idx = threadIdx.x; idx < n; idx += blockDim.x) {
    const RegionElem e = region_elem(t, bp, blk.cols, KSIZE / 2, VEC, idx);
    A* dst = blk.gz + int64_t(e.pix) * blk.ch_block + e.cv * VEC;
    if (e.inside) {
      const int64_t oi = e.gi / 2, oj = e.gj / 2, w = oi * wo + oj;
      const Vec<T, VEC> gv = *reinterpret_cast<const Vec<T, VEC>*>(gy + w * p.gy_stride_t + e.ch);
      if (g.pool == Pool::Max) {
        const uint8_t code = uint8_t(window_code(int(e.gi & 1), int(e.gj & 1)));
#pragma unroll
        for (int i = 0; i < VEC; ++i)
          dst[i] = am[w * kc + e.ch + i] == code ? A(to_acc(gv.v[i])) : A(0);
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

// PACKED: packed inputs (p.images), else the fixed grid of p.g.
template <typename T, int VEC, int KSIZE, bool PACKED>
__global__ void __launch_bounds__(kMaxThreads)
    fused_aggregate_bwd_input_kernel(BwdParams p, Tiling t) {
  using A = typename AccOf<T>::type;
  constexpr int PAD = KSIZE / 2;
  const Block<T, VEC> blk = block_of<T, VEC>(p.g, t, Stage::InputGrad,
                                             tile_pos<PACKED>(p.g, p.images, t, blockIdx.x));
  const Geometry& g = blk.pos.img.g;  // the image's grid
  stage_weights<A>(p.weight, g, t, blk.pos, blk.ws);
  stage_grad_z<T, VEC, KSIZE>(p, t, blk);
  __syncthreads();

  const ThreadWindow tw = thread_window(t, blk.pos, VEC);
  if (!tw.active) return;
  const int S = blk.cols, ch_block = blk.ch_block, cv = tw.cv;
  T* gx = static_cast<T*>(p.grad_x[blk.pos.layer]) + blk.pos.img.grid_token(0) * g.channels +
          tw.ch;
#pragma unroll 1
  for (int d = 0; d < 4; ++d) {
    const int dy = d >> 1, dx = d & 1;
    const int64_t i = 2 * tw.oi + dy, j = 2 * tw.oj + dx;
    if (i >= g.height || j >= g.width) continue;
    // region coordinates of the pixel: (2*wy + dy + PAD, 2*wx + dx + PAD)
    const int ry = 2 * tw.wy + dy + PAD, rx = 2 * tw.wx + dx + PAD;
    A acc[VEC];
    const A* own = blk.gz + (ry * S + rx) * ch_block + cv * VEC;
#pragma unroll
    for (int q = 0; q < VEC; ++q) acc[q] = g.residual ? own[q] : A(0);
#pragma unroll 1
    for (int tap = 0; tap < KSIZE * KSIZE; ++tap) {
      const int u = tap / KSIZE, v = tap % KSIZE;
      const A* gz = blk.gz + ((ry - u + PAD) * S + rx - v + PAD) * ch_block + cv * VEC;
      const A* w = blk.ws + tap * ch_block + cv * VEC;
#pragma unroll
      for (int q = 0; q < VEC; ++q) acc[q] += w[q] * gz[q];
    }
    Vec<T, VEC> out;
#pragma unroll
    for (int q = 0; q < VEC; ++q) out.v[q] = store_acc<T>(acc[q]);
    store_vec(gx + (i * g.width + j) * g.channels, out);
  }
}

template <typename T, int VEC, int KSIZE, bool PACKED>
__global__ void __launch_bounds__(kMaxThreads)
    fused_aggregate_bwd_weight_kernel(BwdParams p, Tiling t) {
  using A = typename AccOf<T>::type;
  constexpr int PAD = KSIZE / 2;
  const int64_t b = blockIdx.x;
  const Image im = image_at<PACKED>(p.g, p.images, b);
  const Geometry& g = im.g;  // the image's grid
  const int64_t tiles = image_tiles<PACKED>(im, t), tiles_w = image_tiles_w<PACKED>(im, t),
                kc = g.kc();
  const bool need_w = p.grad_w_part != nullptr, need_b = p.grad_b_part != nullptr;
  // items: (tap, channel vector) for each of the k*k taps, then (bias, channel vector)
  const int taps = need_w ? KSIZE * KSIZE : 0;
  const int items = (taps + (need_b ? 1 : 0)) * t.cv;
  A acc[kMaxItems][VEC];
#pragma unroll
  for (int s = 0; s < kMaxItems; ++s)
#pragma unroll
    for (int q = 0; q < VEC; ++q) acc[s][q] = A(0);

  for (int64_t tile = 0; tile < tiles; ++tile) {
    const Block<T, VEC> blk =
        block_of<T, VEC>(p.g, t, Stage::WeightGrad, tile_of_image(im, t, tile, tiles_w));
    if (need_w) stage_x<T, VEC>(p.x, t, blk.pos, blk.xs);
    stage_grad_z<T, VEC, KSIZE>(p, t, blk);
    __syncthreads();
    // the tile's in-grid pixels, summed in a fixed order
    const int64_t py_end = (2 * t.th < g.height - 2 * blk.pos.oi0) ? 2 * t.th
                                                                    : g.height - 2 * blk.pos.oi0;
    const int64_t px_end = (2 * t.tw < g.width - 2 * blk.pos.oj0) ? 2 * t.tw
                                                                   : g.width - 2 * blk.pos.oj0;
#pragma unroll
    for (int s = 0; s < kMaxItems; ++s) {
      const int item = int(threadIdx.x) + s * int(blockDim.x);
      if (item >= items) break;
      const int tap = item / t.cv, cv = item % t.cv;
      const int u = tap / KSIZE, v = tap % KSIZE;
#pragma unroll 1
      for (int64_t py = 0; py < py_end; ++py) {
#pragma unroll 1
        for (int64_t px = 0; px < px_end; ++px) {
          const A* gz = blk.gz + ((py + PAD) * blk.cols + px + PAD) * blk.ch_block + cv * VEC;
          if (tap < taps) {
            const Vec<T, VEC> xv = blk.xs[((py + u) * blk.cols + px + v) * t.cv + cv];
#pragma unroll
            for (int q = 0; q < VEC; ++q) acc[s][q] += gz[q] * A(to_acc(xv.v[q]));
          } else {
#pragma unroll
            for (int q = 0; q < VEC; ++q) acc[s][q] += gz[q];
          }
        }
      }
    }
    __syncthreads();
  }

  const int64_t c0 = int64_t(blockIdx.y) * t.cv * VEC;
#pragma unroll
  for (int s = 0; s < kMaxItems; ++s) {
    const int item = int(threadIdx.x) + s * int(blockDim.x);
    if (item >= items) break;
    const int tap = item / t.cv, cv = item % t.cv;
    const int64_t ch = c0 + int64_t(cv) * VEC;
    if (ch >= g.channels) continue;
    const int64_t col = int64_t(blockIdx.z) * g.channels + ch;
    A* dst = tap < taps ? static_cast<A*>(p.grad_w_part) + (b * KSIZE * KSIZE + tap) * kc + col
                        : static_cast<A*>(p.grad_b_part) + b * kc + col;
    store_bytes<sizeof(A) * VEC>(dst, acc[s]);
  }
}

}  // namespace cuda
}  // namespace saep
