// saep-kernels CUDA kernels of the fused op (see ../dwconv_pool.h): no torch headers.
//
// Tiling. A block owns a TH x TW tile of pooling windows of one image, CV channel vectors of
// VEC channels (16 bytes: 8 x bf16/fp16, 4 x fp32, 2 x fp64) of one layer. Its input region
// is the (2*TH + k - 1) x (2*TW + k - 1) pixel patch of the tile (the tile's pixels plus the
// conv halo): the block stages it in shared memory with 16-byte loads (threads along the
// channel vectors, so a warp reads contiguous channels of neighbouring pixels), together with
// the block's k*k weights, then each thread computes one window for one channel vector.
//
// Forward: the (k+1)^2 staged pixels of a window feed its four conv outputs (four
// accumulators); out-of-grid positions of partial windows (odd grids) are left out of the
// average / max; the argmax (window position 0..3) is saved for the backward when asked.
//
// Backward: the block stages g_z (the pool's gradient routed back to the conv output: g_y /
// count for avg, g_y at the saved argmax for max) and x over the same region; grad_x of each
// pixel is the transposed conv of g_z (+ g_z for the residual); weight and bias gradients are
// summed over the tile's pixels into the block's row of a partial-sum buffer, which the
// caller reduces in a fixed order (bitwise reproducible).
//
// The same source compiles as plain C++ under the CPU emulation of the CUDA execution model
// in csrc/tests (cuda_emulation.h), so the kernels' logic is tested without a GPU.
#pragma once

#include <cstdint>

#include "../dwconv_pool.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define SAEP_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#else
// cuda_emulation.h, included before this file, provides the CUDA names used below.
#define SAEP_DYNAMIC_SMEM(name) unsigned char* name = ::saep_emu::dynamic_smem()
#endif

namespace saep {
namespace cuda {

// ------------------------------------------------------------------------------- numerics

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(float v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
__device__ __forceinline__ double from_acc_double(double v) { return v; }

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <typename T>
__device__ __forceinline__ T store_acc(typename AccOf<T>::type v) {
  return from_acc<T>(v);
}
template <>
__device__ __forceinline__ double store_acc<double>(double v) { return v; }

// VEC elements of T moved as one aligned access (16 bytes when VEC = 16 / sizeof(T)).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// ------------------------------------------------------------------------------- tiling

struct Tiling {
  int th, tw;          // windows per block (rows, columns)
  int cv;              // channel vectors per block
  int vec;             // channels per vector
  int64_t tiles_h, tiles_w;
  int64_t grid_x, grid_y, grid_z;  // B * tiles, channel chunks, layers
  int threads;
  int64_t smem_bytes;

  // pixel region staged per block (tile pixels + conv halo)
  __host__ __device__ int rows(int ksize) const { return 2 * th + ksize - 1; }
  __host__ __device__ int cols(int ksize) const { return 2 * tw + ksize - 1; }
};

// Shared memory of a block: the staged x region, the g_z region (backward), the weights;
// each part starts 16-byte aligned.
struct SmemLayout {
  int64_t x, gz, w, total;  // byte offsets and size
};

__host__ __device__ inline int64_t align16(int64_t n) { return (n + 15) / 16 * 16; }

__host__ __device__ inline SmemLayout smem_layout(const Geometry& g, int th, int tw, int cv,
                                                  int vec, bool backward) {
  const int64_t esize = g.dtype == DType::F64 ? 8 : g.dtype == DType::F32 ? 4 : 2;
  const int64_t asize = g.dtype == DType::F64 ? 8 : 4;
  const int64_t pixels = int64_t(2 * th + g.ksize - 1) * (2 * tw + g.ksize - 1);
  const int64_t ch = int64_t(cv) * vec;
  SmemLayout L;
  L.x = 0;
  L.gz = align16(pixels * ch * esize);
  L.w = L.gz + (backward ? align16(pixels * ch * asize) : 0);
  L.total = L.w + align16(int64_t(g.ksize) * g.ksize * ch * asize);
  return L;
}

// Tile shapes: up to 4 x 8 windows and ~128 threads per block, fewer channel vectors when
// shared memory would pass 48 KiB (large k in the backward).
inline Tiling plan(const Geometry& g, int vec, bool backward) {
  Tiling t{};
  const int64_t ho = g.out_height(), wo = g.out_width();
  t.tw = int(wo < 8 ? wo : 8);
  t.th = int(ho < 4 ? ho : 4);
  if (t.tw < 1) t.tw = 1;
  if (t.th < 1) t.th = 1;
  t.vec = vec;
  const int64_t vectors = (g.channels + vec - 1) / vec;
  const int windows = t.th * t.tw;
  int cv = 128 / windows;
  const int cv_max = vec > 1 ? 8 : 32;
  if (cv > cv_max) cv = cv_max;
  if (cv < 1) cv = 1;
  if (cv > vectors) cv = int(vectors);
  while (cv > 1 && smem_layout(g, t.th, t.tw, cv, vec, backward).total > 48 * 1024) cv /= 2;
  t.cv = cv;
  t.tiles_h = (ho + t.th - 1) / t.th;
  t.tiles_w = (wo + t.tw - 1) / t.tw;
  t.grid_x = g.batch * t.tiles_h * t.tiles_w;
  t.grid_y = (vectors + cv - 1) / cv;
  t.grid_z = g.num_layers;
  t.threads = windows * cv;
  t.smem_bytes = smem_layout(g, t.th, t.tw, cv, vec, backward).total;
  return t;
}

// Rows of the backward's partial-sum buffers: one per (image, tile). The tiling does not
// depend on the vector width's alignment outcome for this count (tiles only depend on the
// grid), so the caller can size the buffers before dispatch.
inline int64_t bwd_num_parts(const Geometry& g) {
  const Tiling t = plan(g, 1, true);
  return t.grid_x;
}

// Block coordinates shared by both directions.
struct BlockPos {
  int64_t b, oi0, oj0, part;
  int layer;
  int64_t c0;  // first channel of the block within the layer
};

__device__ __forceinline__ BlockPos block_pos(const Tiling& t) {
  BlockPos bp;
  const int64_t tiles = t.tiles_h * t.tiles_w;
  bp.part = blockIdx.x;
  bp.b = int64_t(blockIdx.x) / tiles;
  const int64_t tile = int64_t(blockIdx.x) % tiles;
  bp.oi0 = (tile / t.tiles_w) * t.th;
  bp.oj0 = (tile % t.tiles_w) * t.tw;
  bp.layer = int(blockIdx.z);
  bp.c0 = int64_t(blockIdx.y) * t.cv * t.vec;
  return bp;
}

// Element idx of a block's staged region: S pixels a row from input row 2*oi0 - pad and
// column 2*oj0 - pad, t.cv channel vectors of `vec` channels a pixel, pixel-major.
struct RegionElem {
  int cv, pix;
  int64_t gi, gj, ch;
  bool inside;  // in the grid and below the last channel
};

__device__ __forceinline__ RegionElem region_elem(const Geometry& g, const Tiling& t,
                                                  const BlockPos& bp, int S, int pad, int vec,
                                                  int idx) {
  RegionElem e;
  e.cv = idx % t.cv;
  e.pix = idx / t.cv;
  e.gi = 2 * bp.oi0 - pad + e.pix / S;
  e.gj = 2 * bp.oj0 - pad + e.pix % S;
  e.ch = bp.c0 + int64_t(e.cv) * vec;
  e.inside = e.gi >= 0 && e.gi < g.height && e.gj >= 0 && e.gj < g.width && e.ch < g.channels;
  return e;
}

// Stage the block's pixel region of x (zero outside the grid and past the last channel).
template <typename T, int VEC>
__device__ __forceinline__ void stage_x(const LayerPtrs& x, const Geometry& g, const Tiling& t,
                                        const BlockPos& bp, Vec<T, VEC>* xs) {
  const int ksize = g.ksize, pad = g.pad();
  const int R = t.rows(ksize), S = t.cols(ksize);
  const T* base = static_cast<const T*>(x.data[bp.layer]) + bp.b * x.stride_b[bp.layer] +
                  g.prefix * x.stride_t[bp.layer];
  const int64_t st = x.stride_t[bp.layer];
  const int n = R * S * t.cv;
  for (int idx = threadIdx.x; idx < n; idx += blockDim.x) {
    const RegionElem e = region_elem(g, t, bp, S, pad, VEC, idx);
    Vec<T, VEC> v;
    if (e.inside) {
      v = *reinterpret_cast<const Vec<T, VEC>*>(base + (e.gi * g.width + e.gj) * st + e.ch);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) v.v[i] = store_acc<T>(typename AccOf<T>::type(0));
    }
    xs[idx] = v;
  }
}

// Stage the block's weights: ws[tap][c] for its cv * VEC channels (zero past the last one).
template <typename A>
__device__ __forceinline__ void stage_weights(const void* weight, const Geometry& g,
                                              const Tiling& t, const BlockPos& bp, A* ws) {
  const int ch_block = t.cv * t.vec;
  const int n = g.ksize * g.ksize * ch_block;
  const A* w = static_cast<const A*>(weight);
  for (int idx = threadIdx.x; idx < n; idx += blockDim.x) {
    const int tap = idx / ch_block;
    const int64_t ch = bp.c0 + idx % ch_block;
    ws[idx] = ch < g.channels ? w[tap * g.kc() + bp.layer * g.channels + ch] : A(0);
  }
}

// ------------------------------------------------------------------------------- forward

template <typename T, int VEC, int KSIZE>
__global__ void dwconv_pool_fwd_kernel(FwdParams p, Tiling t) {
  using A = typename AccOf<T>::type;
  constexpr int PAD = KSIZE / 2;
  const Geometry& g = p.g;
  const BlockPos bp = block_pos(t);
  const int S = t.cols(KSIZE);
  const int ch_block = t.cv * VEC;
  SAEP_DYNAMIC_SMEM(smem);
  const SmemLayout L = smem_layout(g, t.th, t.tw, t.cv, VEC, false);
  Vec<T, VEC>* xs = reinterpret_cast<Vec<T, VEC>*>(smem + L.x);
  A* ws = reinterpret_cast<A*>(smem + L.w);
  stage_x<T, VEC>(p.x, g, t, bp, xs);
  stage_weights<A>(p.weight, g, t, bp, ws);
  __syncthreads();

  const int cv = threadIdx.x % t.cv;
  const int win = threadIdx.x / t.cv;
  const int wy = win / t.tw, wx = win % t.tw;
  const int64_t oi = bp.oi0 + wy, oj = bp.oj0 + wx;
  const int64_t ch = bp.c0 + int64_t(cv) * VEC;
  if (win >= t.th * t.tw || oi >= g.out_height() || oj >= g.out_width() || ch >= g.channels)
    return;
  const bool has_down = 2 * oi + 1 < g.height;
  const bool has_right = 2 * oj + 1 < g.width;

  A acc[4][VEC];
#pragma unroll
  for (int q = 0; q < 4; ++q)
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[q][i] = A(0);

#pragma unroll
  for (int a = 0; a <= KSIZE; ++a) {
#pragma unroll
    for (int e = 0; e <= KSIZE; ++e) {
      const Vec<T, VEC> xv = xs[((2 * wy + a) * S + 2 * wx + e) * t.cv + cv];
      A xf[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) xf[i] = to_acc(xv.v[i]);
#pragma unroll
      for (int dy = 0; dy < 2; ++dy) {
#pragma unroll
        for (int dx = 0; dx < 2; ++dx) {
          const int u = a - dy, v = e - dx;  // compile-time after unrolling
          if (u >= 0 && u < KSIZE && v >= 0 && v < KSIZE) {
            const A* w = ws + (u * KSIZE + v) * ch_block + cv * VEC;
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[dy * 2 + dx][i] += w[i] * xf[i];
          }
          if (g.residual && u == PAD && v == PAD) {
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
      r = s / A((has_down ? 2 : 1) * (has_right ? 2 : 1));
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

// ------------------------------------------------------------------------------- backward

template <typename T, int VEC, int KSIZE>
__global__ void dwconv_pool_bwd_kernel(BwdParams p, Tiling t) {
  using A = typename AccOf<T>::type;
  constexpr int PAD = KSIZE / 2;
  const Geometry& g = p.g;
  const BlockPos bp = block_pos(t);
  const int R = t.rows(KSIZE), S = t.cols(KSIZE);
  const int ch_block = t.cv * VEC;
  const int64_t kc = g.kc();
  const int64_t wo = g.out_width();
  SAEP_DYNAMIC_SMEM(smem);
  const SmemLayout L = smem_layout(g, t.th, t.tw, t.cv, VEC, true);
  Vec<T, VEC>* xs = reinterpret_cast<Vec<T, VEC>*>(smem + L.x);
  A* gzs = reinterpret_cast<A*>(smem + L.gz);  // [R*S][ch_block]
  A* ws = reinterpret_cast<A*>(smem + L.w);
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
          const A inv = A(1) / A(window_count(g, oi, oj));
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

  if (need_x) {
    const int cv = threadIdx.x % t.cv;
    const int win = threadIdx.x / t.cv;
    const int wy = win / t.tw, wx = win % t.tw;
    const int64_t oi = bp.oi0 + wy, oj = bp.oj0 + wx;
    const int64_t ch = bp.c0 + int64_t(cv) * VEC;
    if (win < t.th * t.tw && oi < g.out_height() && oj < wo && ch < g.channels) {
      T* gx = static_cast<T*>(p.grad_x[bp.layer]) +
              (bp.b * (g.prefix + g.height * g.width) + g.prefix) * g.channels + ch;
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

// ------------------------------------------------------------------------------- dispatch

// True when every tensor the kernels touch allows 16-byte vectors of `vec` channels.
inline bool vector_ok(const Geometry& g, const LayerPtrs& x, int vec, size_t esize,
                      const void* const* extra, int n_extra, const int64_t* extra_strides,
                      int n_strides) {
  if (vec == 1) return true;
  if (g.channels % vec != 0) return false;
  const uintptr_t bytes = uintptr_t(vec) * esize;
  for (int l = 0; l < g.num_layers; ++l) {
    if (reinterpret_cast<uintptr_t>(x.data[l]) % bytes != 0) return false;
    if (x.stride_b[l] % vec != 0 || x.stride_t[l] % vec != 0) return false;
    if ((g.prefix * x.stride_t[l]) % vec != 0) return false;
  }
  for (int i = 0; i < n_extra; ++i)
    if (extra[i] != nullptr && reinterpret_cast<uintptr_t>(extra[i]) % bytes != 0) return false;
  for (int i = 0; i < n_strides; ++i)
    if (extra_strides[i] % vec != 0) return false;
  return true;
}

inline size_t dtype_size(DType d) {
  return d == DType::F64 ? 8 : d == DType::F32 ? 4 : 2;
}

// Calls launch(kernel, tiling, params) with the kernel instance for the problem's dtype,
// vector width and kernel size. `launch` runs it (a real launch in dwconv_pool_cuda.cu, the
// emulator in the tests); its return value is passed back.
template <typename T, int VEC, int KSIZE, typename Launch>
int launch_instance(const FwdParams& p, Launch&& launch) {
  return launch(dwconv_pool_fwd_kernel<T, VEC, KSIZE>, plan(p.g, VEC, false), p);
}
template <typename T, int VEC, int KSIZE, typename Launch>
int launch_instance(const BwdParams& p, Launch&& launch) {
  return launch(dwconv_pool_bwd_kernel<T, VEC, KSIZE>, plan(p.g, VEC, true), p);
}

template <typename T, int VEC, typename Params, typename Launch>
int dispatch_ksize(const Params& p, Launch&& launch) {
  switch (p.g.ksize) {
    case 1: return launch_instance<T, VEC, 1>(p, launch);
    case 3: return launch_instance<T, VEC, 3>(p, launch);
    case 5: return launch_instance<T, VEC, 5>(p, launch);
    case 7: return launch_instance<T, VEC, 7>(p, launch);
  }
  return -1;
}

template <typename T, typename Params, typename Launch>
int dispatch_vec(const Params& p, bool vector, Launch&& launch) {
  constexpr int kVec = int(16 / sizeof(T));
  return vector ? dispatch_ksize<T, kVec>(p, launch) : dispatch_ksize<T, 1>(p, launch);
}

// `vector`: use 16-byte vectors (see fwd_vector_ok / bwd_vector_ok), else one channel each.
template <typename Params, typename Launch>
int dispatch(const Params& p, bool vector, Launch&& launch) {
  switch (p.g.dtype) {
    case DType::F32: return dispatch_vec<float>(p, vector, launch);
    case DType::F64: return dispatch_vec<double>(p, vector, launch);
    case DType::F16: return dispatch_vec<__half>(p, vector, launch);
    case DType::BF16: return dispatch_vec<__nv_bfloat16>(p, vector, launch);
  }
  return -1;
}

inline bool fwd_vector_ok(const FwdParams& p) {
  const int vec = int(16 / dtype_size(p.g.dtype));
  const void* extra[] = {p.out};
  return vector_ok(p.g, p.x, vec, dtype_size(p.g.dtype), extra, 1, nullptr, 0);
}

inline bool bwd_vector_ok(const BwdParams& p) {
  const int vec = int(16 / dtype_size(p.g.dtype));
  const void* extra[kMaxLayers + 1];
  int n = 0;
  extra[n++] = p.grad_out;
  for (int l = 0; l < p.g.num_layers; ++l) extra[n++] = p.grad_x[l];
  const int64_t strides[] = {p.gy_stride_b, p.gy_stride_t};
  return vector_ok(p.g, p.x, vec, dtype_size(p.g.dtype), extra, n, strides, 2);
}

}  // namespace cuda
}  // namespace saep
