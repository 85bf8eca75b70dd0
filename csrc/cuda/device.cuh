// saep-kernels CUDA kernels: what the forward and backward kernels share on the device:
// numerics, 16-byte vectors, the block's coordinates and the staging of its region into
// shared memory (tiling: plan.h). No torch headers.
//
// The same source compiles as plain C++ under the CPU emulation of the CUDA execution model
// in csrc/tests (cuda_emulation.h), so the kernels' logic is tested without a GPU.
#pragma once

#include <cstdint>
#include <cstring>

#include "../fused_aggregate.h"
#include "plan.h"

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

// The compute type of inputs of type T: float, double for double.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// A compute-type value rounded (to nearest even) to the input type T.
template <typename T>
__device__ __forceinline__ T store_acc(typename AccOf<T>::type v);
template <>
__device__ __forceinline__ float store_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double store_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half store_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 store_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// VEC elements of T moved as one aligned access (16 bytes when VEC = 16 / sizeof(T)).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// 16 and 8 bytes to global memory in one access. The compiler splits a plain 16-byte store
// of values it can see through (8 bf16 packed into a uint4 still became four 4-byte stores),
// so on the GPU these are the PTX stores themselves.
__device__ __forceinline__ void store16(void* dst, uint4 w) {
#if defined(__CUDA_ARCH__)
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "r"(w.x), "r"(w.y),
               "r"(w.z), "r"(w.w)
               : "memory");
#else
  *static_cast<uint4*>(dst) = w;
#endif
}

__device__ __forceinline__ void store8(void* dst, uint2 w) {
#if defined(__CUDA_ARCH__)
  asm volatile("st.global.v2.u32 [%0], {%1, %2};" ::"l"(dst), "r"(w.x), "r"(w.y) : "memory");
#else
  *static_cast<uint2*>(dst) = w;
#endif
}

// N bytes of registers to global memory in the widest accesses N allows (the destination is
// aligned to them: 16 bytes for a channel vector), so a vector of 8 bf16 is one 128-bit store
// and a vector's 8 argmax bytes one 64-bit store.
template <int N>
__device__ __forceinline__ void store_bytes(void* dst, const void* src) {
  const unsigned char* s = static_cast<const unsigned char*>(src);
  unsigned char* d = static_cast<unsigned char*>(dst);
  if constexpr (N % 16 == 0) {
#pragma unroll
    for (int i = 0; i < N / 16; ++i) {
      uint4 w;
      memcpy(&w, s + 16 * i, 16);
      store16(d + 16 * i, w);
    }
  } else if constexpr (N % 8 == 0) {
#pragma unroll
    for (int i = 0; i < N / 8; ++i) {
      uint2 w;
      memcpy(&w, s + 8 * i, 8);
      store8(d + 8 * i, w);
    }
  } else {
    memcpy(dst, src, N);
  }
}

// A channel vector to global memory in one access (16 bytes, or one element).
template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* dst, const Vec<T, VEC>& v) {
  static_assert(sizeof(T) * VEC == 16 || VEC == 1, "channel vectors are 16 bytes or one element");
  store_bytes<sizeof(T) * VEC>(dst, &v);
}

// ------------------------------------------------------------------------------- the block

// The image a block works on: its grid, and where its tokens and outputs are. A fixed-grid
// call's image b is batch row b of every tensor; a packed call's (FwdParams::images) is in
// batch row 0, at the tokens and output tokens of its row of the image table.
struct Image {
  Geometry g;      // the call's, with the image's grid (height, width; prefix 0 when packed)
  int64_t b;       // the image: its row of the weight and bias partial sums
  int64_t batch;   // its batch row of the layers, outputs and gradients
  int64_t token;   // the token of its pixel (0, 0) in that row
  int64_t window;  // the output token of its window (0, 0) in that row
  // Flat token indices into the contiguous buffers: output token w of the image in out and
  // argmax ([B, windows, K*C]), the token of its pixel `pixel` in grad_x ([B, T, C]).
  SAEP_HD int64_t out_token(int64_t w) const { return batch * g.windows() + window + w; }
  SAEP_HD int64_t grid_token(int64_t pixel) const { return batch * g.tokens() + token + pixel; }
};

// Image b of the call. PACKED (a template parameter of the kernels, so that the fixed-grid
// kernels keep the call's grid in kernel parameters, not in registers): from `images`.
template <bool PACKED>
__device__ __forceinline__ Image image_at(const Geometry& g, const int64_t* images, int64_t b) {
  Image im{g, b, b, g.prefix, 0};
  if constexpr (PACKED) {
    const int64_t* row = images + b * kImageFields;
    im.g.height = row[kImageHeight];
    im.g.width = row[kImageWidth];
    im.g.prefix = 0;
    im.batch = 0;
    im.token = row[kImageFirstToken];
    im.window = row[kImageFirstWindow];
  }
  return im;
}

// The coordinates of a tile of windows: its image, first window, layer and first channel.
struct BlockPos {
  Image img;
  int64_t oi0, oj0;
  int layer;
  int64_t c0;  // first channel of the block within the layer
};

// Tile `tile` of image `im` (its tiles row-major, tiles_w a row); the layer and channel chunk
// from blockIdx.z and blockIdx.y.
__device__ __forceinline__ BlockPos tile_of_image(const Image& im, const Tiling& t, int64_t tile,
                                                  int64_t tiles_w) {
  BlockPos bp;
  bp.img = im;
  bp.oi0 = (tile / tiles_w) * t.th;
  bp.oj0 = (tile % tiles_w) * t.tw;
  bp.layer = int(blockIdx.z);
  bp.c0 = int64_t(blockIdx.y) * t.cv * t.vec;
  return bp;
}

// The tiles of image `im` in a row and in all (fixed grid: the plan's; packed: of its grid).
template <bool PACKED>
__device__ __forceinline__ int64_t image_tiles_w(const Image& im, const Tiling& t) {
  return PACKED ? (im.g.out_width() + t.tw - 1) / t.tw : t.tiles_w;
}
template <bool PACKED>
__device__ __forceinline__ int64_t image_tiles(const Image& im, const Tiling& t) {
  return PACKED ? ((im.g.out_height() + t.th - 1) / t.th) * image_tiles_w<PACKED>(im, t)
                : t.tiles_h * t.tiles_w;
}

// Tile `index` of all images' tiles one after the other (blockIdx.x for the kernels with a
// block per tile). Fixed grid: image index / tiles. Packed: the image whose tiles
// [first_tile[b], first_tile[b + 1]) hold it, by binary search over the n + 1 values (every
// image has a tile; the same loads for all threads of the block, from cache after the first
// blocks). The layer and channel chunk from blockIdx.z and blockIdx.y.
template <bool PACKED>
__device__ __forceinline__ BlockPos tile_pos(const Geometry& g, const int64_t* images,
                                             const Tiling& t, int64_t index) {
  if constexpr (!PACKED) {
    const int64_t tiles = t.tiles_h * t.tiles_w;
    return tile_of_image(image_at<false>(g, images, index / tiles), t, index % tiles, t.tiles_w);
  }
  int64_t lo = 0, hi = g.batch - 1;  // first_tile[lo] <= index < first_tile[hi + 1]
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (t.first_tile[mid] <= index)
      lo = mid;
    else
      hi = mid - 1;
  }
  const Image im = image_at<true>(g, images, lo);
  return tile_of_image(im, t, index - t.first_tile[lo], image_tiles_w<true>(im, t));
}

// The window a thread computes, for one channel vector: thread = window * t.cv + vector.
struct ThreadWindow {
  int cv, wy, wx;     // channel vector; window row / column within the tile
  int64_t oi, oj, ch;  // the window in the pooled grid; its first channel
  bool active;         // a window of the grid, channels below the last
};

__device__ __forceinline__ ThreadWindow thread_window(const Tiling& t, const BlockPos& bp,
                                                      int vec) {
  const Geometry& g = bp.img.g;
  ThreadWindow w;
  w.cv = int(threadIdx.x) % t.cv;
  const int win = int(threadIdx.x) / t.cv;
  w.wy = win / t.tw;
  w.wx = win % t.tw;
  w.oi = bp.oi0 + w.wy;
  w.oj = bp.oj0 + w.wx;
  w.ch = bp.c0 + int64_t(w.cv) * vec;
  w.active = win < t.th * t.tw && w.oi < g.out_height() && w.oj < g.out_width() &&
             w.ch < g.channels;
  return w;
}

// A block: its tile's coordinates, the width of its staged region, its channels and its
// shared memory (plan.h's SmemLayout): the staged x region, g_z over it, the weights
// ws[tap][c], those its kernel stages.
template <typename T, int VEC>
struct Block {
  using A = typename AccOf<T>::type;
  BlockPos pos;
  int cols;      // pixels a row of the staged region: 2 * tw + k - 1
  int ch_block;  // channels of the block: cv * VEC
  Vec<T, VEC>* xs;
  A* gz;
  A* ws;
};

template <typename T, int VEC>
__device__ __forceinline__ Block<T, VEC> block_of(const Geometry& g, const Tiling& t,
                                                  Stage stage, const BlockPos& pos) {
  using A = typename AccOf<T>::type;
  SAEP_DYNAMIC_SMEM(smem);
  const SmemLayout L = smem_layout(g, t.th, t.tw, t.cv, VEC, stage);
  return Block<T, VEC>{pos, t.cols(g.ksize), t.cv * VEC,
                       reinterpret_cast<Vec<T, VEC>*>(smem + L.x),
                       reinterpret_cast<A*>(smem + L.gz), reinterpret_cast<A*>(smem + L.w)};
}

// Element idx of a block's staged region: S pixels a row from input row 2*oi0 - pad and
// column 2*oj0 - pad, t.cv channel vectors of `vec` channels a pixel, pixel-major; inside the
// grid of the block's image (zero padding at its own edges: no tap reads another image).
struct RegionElem {
  int cv, pix;
  int64_t gi, gj, ch;
  bool inside;  // in the grid and below the last channel
};

__device__ __forceinline__ RegionElem region_elem(const Tiling& t, const BlockPos& bp, int S,
                                                  int pad, int vec, int idx) {
  const Geometry& g = bp.img.g;
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
__device__ __forceinline__ void stage_x(const LayerPtrs& x, const Tiling& t, const BlockPos& bp,
                                        Vec<T, VEC>* xs) {
  const Geometry& g = bp.img.g;
  const int ksize = g.ksize, pad = g.pad();
  const int R = t.rows(ksize), S = t.cols(ksize);
  const T* base = static_cast<const T*>(x.data[bp.layer]) +
                  bp.img.batch * x.stride_b[bp.layer] + bp.img.token * x.stride_t[bp.layer];
  const int64_t st = x.stride_t[bp.layer];
  const int n = R * S * t.cv;
  for (int idx = threadIdx.x; idx < n; idx += blockDim.x) {
    const RegionElem e = region_elem(t, bp, S, pad, VEC, idx);
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

}  // namespace cuda
}  // namespace saep
