// saep-kernels: the parameters of the fused op, shared by the CPU and CUDA kernels and the
// torch binding. Plain C++ (no torch, no CUDA headers) so every piece can include it.
//
// The op (docs/op.md): K layers x_l [B, T, C] (channel stride 1, any batch/token strides),
// tokens after `prefix` form an H x W grid, channel l*C + c of the virtual concat is channel
// c of layer l, and
//     z = dwconv_k(x) + bias (+ x if residual),   y = pool_2x2_ceil(z)  -> [B, Ho*Wo, K*C].
//
// Weights reach the kernels in the compute type (float; double for F64) laid out tap-major,
// channel-contiguous: weight[(u*k + v) * K*C + kc] = conv.weight[kc, 0, u, v].
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SAEP_HD __host__ __device__ __forceinline__
#else
#define SAEP_HD inline
#endif

namespace saep {

constexpr int kMaxLayers = 16;  // the layer table below; exported to Python as _C.MAX_LAYERS
constexpr int kMaxKernel = 7;   // ksize is 1, 3, 5 or 7

enum class DType : int32_t { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };
enum class Pool : int32_t { Avg = 0, Max = 1 };

// Bytes of an element of the inputs, and of the compute type (float; double for F64).
SAEP_HD int64_t dtype_size(DType d) { return d == DType::F64 ? 8 : d == DType::F32 ? 4 : 2; }
SAEP_HD int64_t compute_size(DType d) { return d == DType::F64 ? 8 : 4; }

struct Geometry {
  int64_t batch;
  int64_t channels;  // C per layer
  int64_t height;    // H
  int64_t width;     // W
  int64_t prefix;    // tokens skipped at the front of each layer
  int32_t num_layers;
  int32_t ksize;     // 1, 3, 5 or 7
  bool residual;
  Pool pool;
  DType dtype;

  // 2x2 windows, stride 2, ceil mode
  SAEP_HD int64_t out_height() const { return (height + 1) / 2; }
  SAEP_HD int64_t out_width() const { return (width + 1) / 2; }
  SAEP_HD int64_t windows() const { return out_height() * out_width(); }
  SAEP_HD int64_t tokens() const { return prefix + height * width; }
  SAEP_HD int64_t kc() const { return num_layers * channels; }
  SAEP_HD int32_t pad() const { return ksize / 2; }
};

// Packed inputs (fused_aggregate_varlen): images of different grids, their tokens one after
// the other in each layer's token dimension (layers [1, N, C]), their outputs one after the
// other ([1, sum of windows, K*C]). Row i of the table, kImageFields values:
enum ImageField : int { kImageHeight = 0, kImageWidth, kImageFirstToken, kImageFirstWindow };
constexpr int kImageFields = 4;
// kImageFirstToken: the token of the image's pixel (0, 0) (past its prefix tokens);
// kImageFirstWindow: the output token of its window (0, 0).

struct LayerPtrs {
  const void* data[kMaxLayers];
  int64_t stride_b[kMaxLayers];  // elements
  int64_t stride_t[kMaxLayers];  // elements; the channel stride is 1
};

struct FwdParams {
  Geometry g;
  LayerPtrs x;
  const void* weight;  // [k*k, K*C] compute type
  const void* bias;    // [K*C] compute type, or nullptr
  void* out;           // [B, Ho*Wo, K*C] contiguous, input dtype
  uint8_t* argmax;     // [B, Ho*Wo, K*C] window position 0..3 of each max, or nullptr
  const int64_t* images;  // nullptr: g.batch images of the grid g.height x g.width; else
                          // packed inputs, [g.batch][kImageFields] where the kernels run
                          // (host memory for the CPU kernels, device memory for the CUDA
                          // kernels; g.height, g.width and g.prefix unused)
};

struct BwdParams {
  Geometry g;
  LayerPtrs x;
  const void* grad_out;     // [B, Ho*Wo, K*C], input dtype, channel stride 1
  int64_t gy_stride_b;      // elements
  int64_t gy_stride_t;      // elements
  const uint8_t* argmax;    // saved by the forward (max pool), else nullptr
  const void* weight;       // [k*k, K*C] compute type
  void* grad_x[kMaxLayers];  // contiguous [B, T, C] input dtype, or all nullptr; the
                             // caller zeroes the prefix rows, the kernels write the grid
  void* grad_w_part;        // [B, k*k, K*C] compute type (one row per image), or nullptr;
  void* grad_b_part;        // [B, K*C] compute type, or nullptr: the caller sums the rows
  const int64_t* images;    // as in FwdParams; packed: grad_out, argmax and grad_x as the
                            // forward's out, argmax and x
};

// Position (dy, dx) of a 2x2 window as stored in `argmax`.
SAEP_HD int32_t window_code(int32_t dy, int32_t dx) { return dy * 2 + dx; }

// The in-grid part of window (oi, oj): 2 x 2 positions, or a single row / column for the last
// row / column of windows of an odd grid (ceil mode).
struct WindowExtent {
  int32_t rows, cols;  // 1 or 2 each
  SAEP_HD int32_t count() const { return rows * cols; }
};

SAEP_HD WindowExtent window_extent(const Geometry& g, int64_t oi, int64_t oj) {
  return WindowExtent{1 + int32_t(2 * oi + 1 < g.height), 1 + int32_t(2 * oj + 1 < g.width)};
}

}  // namespace saep
