// saep-kernels CUDA kernels: the forward kernel of the fused op (tiling: plan.h; staging and
// numerics: device.cuh). No torch headers.
//
// Each thread computes one window for one channel vector, from the block's staged region:
//   avg: the conv, the residual and the 2x2 average are one stride-2 (k+1)x(k+1) conv
//     (docs/op.md section 4): each staged pixel of the window's patch meets the folded tap, the
//     sum of the kernel's taps over the window's in-grid positions (plus the residual's
//     identity), and the sum is divided by their count;
//   max: the window's in-grid positions one after another, each a kxk conv (the residual its
//     centre tap), kept when larger than the best so far; the argmax (window position 0..3) is
//     saved for the backward when asked.
// The tap loops are not unrolled (#pragma unroll 1): unrolled, a thread holds every tap's
// operands at once (120-150 registers for bf16); looped, it stays within 64 registers.
#pragma once

#include "device.cuh"

namespace saep {
namespace cuda {

// Weight (u, v) of channel vector cv from the staged weights, zero when (u, v) is not a tap;
// with the residual, plus 1 at the centre (the residual is the identity tap).
template <typename A, int VEC, int KSIZE>
__device__ __forceinline__ void staged_tap(const A* ws, int ch_block, int cv, int u, int v,
                                           bool residual, A (&w)[VEC]) {
  const bool tap = u >= 0 && u < KSIZE && v >= 0 && v < KSIZE;
  const A* src = ws + (u * KSIZE + v) * ch_block + cv * VEC;
  const A centre = residual && u == KSIZE / 2 && v == KSIZE / 2 ? A(1) : A(0);
#pragma unroll
  for (int i = 0; i < VEC; ++i) w[i] = (tap ? src[i] : A(0)) + centre;
}

// PACKED: packed inputs (p.images), else the fixed grid of p.g.
template <typename T, int VEC, int KSIZE, bool PACKED>
__global__ void __launch_bounds__(kMaxThreads) fused_aggregate_fwd_kernel(FwdParams p, Tiling t) {
  using A = typename AccOf<T>::type;
  const Block<T, VEC> blk =
      block_of<T, VEC>(p.g, t, Stage::Forward, tile_pos<PACKED>(p.g, p.images, t, blockIdx.x));
  const Geometry& g = blk.pos.img.g;  // the image's grid
  stage_x<T, VEC>(p.x, t, blk.pos, blk.xs);
  stage_weights<A>(p.weight, g, t, blk.pos, blk.ws);
  __syncthreads();

  const ThreadWindow tw = thread_window(t, blk.pos, VEC);
  if (!tw.active) return;
  const int cv = tw.cv;
  const WindowExtent ext = window_extent(g, tw.oi, tw.oj);
  // staged pixel (r, c) of this thread's window patch: region row 2*wy + r, column 2*wx + c
  auto pixel = [&](int r, int c, A (&xf)[VEC]) {
    const Vec<T, VEC> xv = blk.xs[((2 * tw.wy + r) * blk.cols + 2 * tw.wx + c) * t.cv + cv];
#pragma unroll
    for (int i = 0; i < VEC; ++i) xf[i] = to_acc(xv.v[i]);
  };

  A y[VEC];
  uint8_t code[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    y[i] = A(0);
    code[i] = 0;
  }
  if (g.pool == Pool::Max) {
    // window order 00, 01, 10, 11; NaN wins, as in torch.max_pool2d
#pragma unroll 1
    for (int d = 0; d < 4; ++d) {
      const int dy = d >> 1, dx = d & 1;
      if (dy >= ext.rows || dx >= ext.cols) continue;  // partial window of an odd grid
      A z[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) z[i] = A(0);
#pragma unroll 1
      for (int tap = 0; tap < KSIZE * KSIZE; ++tap) {
        const int u = tap / KSIZE, v = tap % KSIZE;
        A xf[VEC], w[VEC];
        pixel(dy + u, dx + v, xf);
        staged_tap<A, VEC, KSIZE>(blk.ws, blk.ch_block, cv, u, v, false, w);
#pragma unroll
        for (int i = 0; i < VEC; ++i) z[i] += w[i] * xf[i];
      }
      if (g.residual) {  // added, not folded into the centre tap: Inf - Inf is NaN, as in z
        A xf[VEC];
        pixel(dy + KSIZE / 2, dx + KSIZE / 2, xf);
#pragma unroll
        for (int i = 0; i < VEC; ++i) z[i] += xf[i];
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        if (d == 0 || z[i] > y[i] || z[i] != z[i]) {
          y[i] = z[i];
          code[i] = uint8_t(d);
        }
      }
    }
  } else {
    const A hd = ext.rows == 2 ? A(1) : A(0), hr = ext.cols == 2 ? A(1) : A(0);
#pragma unroll 1
    for (int pe = 0; pe < (KSIZE + 1) * (KSIZE + 1); ++pe) {
      const int a = pe / (KSIZE + 1), e = pe % (KSIZE + 1);
      A xf[VEC], w00[VEC], w01[VEC], w10[VEC], w11[VEC];
      pixel(a, e, xf);
      staged_tap<A, VEC, KSIZE>(blk.ws, blk.ch_block, cv, a, e, g.residual, w00);
      staged_tap<A, VEC, KSIZE>(blk.ws, blk.ch_block, cv, a, e - 1, g.residual, w01);
      staged_tap<A, VEC, KSIZE>(blk.ws, blk.ch_block, cv, a - 1, e, g.residual, w10);
      staged_tap<A, VEC, KSIZE>(blk.ws, blk.ch_block, cv, a - 1, e - 1, g.residual, w11);
#pragma unroll
      for (int i = 0; i < VEC; ++i)
        y[i] += xf[i] * (w00[i] + hr * (w01[i] + hd * w11[i]) + hd * w10[i]);
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) y[i] /= A(ext.count());
  }

  const int64_t o = blk.pos.img.out_token(tw.oi * g.out_width() + tw.oj) * g.kc() +
                    int64_t(blk.pos.layer) * g.channels + tw.ch;
  const A* bias = p.bias ? static_cast<const A*>(p.bias) + blk.pos.layer * g.channels + tw.ch
                         : nullptr;
  Vec<T, VEC> out;
#pragma unroll
  for (int i = 0; i < VEC; ++i) out.v[i] = store_acc<T>(y[i] + (bias ? bias[i] : A(0)));
  store_vec(static_cast<T*>(p.out) + o, out);
  if (p.argmax != nullptr) store_bytes<VEC>(p.argmax + o, code);
}

}  // namespace cuda
}  // namespace saep
