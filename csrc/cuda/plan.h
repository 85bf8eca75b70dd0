// saep-kernels CUDA kernels: host-side planning, shared with the kernels (no CUDA headers).
//
// A block owns a TH x TW tile of pooling windows of one image and CV channel vectors of VEC
// channels (16 bytes: 8 x bf16/fp16, 4 x fp32, 2 x fp64; or one channel when the tensors do
// not allow 16-byte vectors) of one layer. Its input region is the (2*TH + k - 1) x
// (2*TW + k - 1) pixel patch of the tile (the tile's pixels plus the conv halo), staged in
// shared memory with what the kernel reads there (Stage): the forward x and the block's k*k
// weights, the input-gradient kernel g_z and the weights, the weight-gradient kernel x and g_z.
// The weight-gradient kernel's block walks all the tiles of its image (plan_weight_grad).
//
// Packed inputs (FwdParams::images): every image is tiled on its own grid with one tile shape,
// its tiles after the previous image's, all in one launch (PackedTiles).
#pragma once

#include <cstdint>

#include "../fused_aggregate.h"

namespace saep {
namespace cuda {

// Threads of a block, at most (the kernels' __launch_bounds__).
constexpr int kMaxThreads = 256;
// (tap, channel vector) work items a thread of the weight-gradient kernel accumulates.
constexpr int kMaxItems = 2;

enum class Stage : int32_t { Forward, InputGrad, WeightGrad };

struct Tiling {
  int th, tw;          // windows per block (rows, columns)
  int cv;              // channel vectors per block
  int vec;             // channels per vector
  int64_t tiles_h, tiles_w;        // tiles of an image (fixed grid; packed: of the largest grid)
  int64_t grid_x, grid_y, grid_z;  // the tiles of all images (B * tiles), channel chunks, layers
  int threads;
  int64_t smem_bytes;
  const int64_t* first_tile;  // packed: PackedTiles::first_tile; fixed grid: nullptr

  // pixel region staged per block (tile pixels + conv halo)
  SAEP_HD int rows(int ksize) const { return 2 * th + ksize - 1; }
  SAEP_HD int cols(int ksize) const { return 2 * tw + ksize - 1; }
};

// Shared memory of a block: the staged x region, the g_z region, the weights, as its kernel
// needs them (each part 16-byte aligned, absent parts empty).
struct SmemLayout {
  int64_t x, gz, w, total;  // byte offsets and size
};

SAEP_HD int64_t align16(int64_t n) { return (n + 15) / 16 * 16; }

SAEP_HD SmemLayout smem_layout(const Geometry& g, int th, int tw, int cv, int vec, Stage stage) {
  const int64_t esize = dtype_size(g.dtype), asize = compute_size(g.dtype);
  const int64_t pixels = int64_t(2 * th + g.ksize - 1) * (2 * tw + g.ksize - 1);
  const int64_t ch = int64_t(cv) * vec;
  const bool x = stage != Stage::InputGrad, gz = stage != Stage::Forward,
             w = stage != Stage::WeightGrad;
  SmemLayout L;
  L.x = 0;
  L.gz = x ? align16(pixels * ch * esize) : 0;
  L.w = L.gz + (gz ? align16(pixels * ch * asize) : 0);
  L.total = L.w + (w ? align16(int64_t(g.ksize) * g.ksize * ch * asize) : 0);
  return L;
}

// The tile shape (th x tw windows) for a grid of ho x wo windows: up to 4 x 8.
inline void tile_shape(int64_t ho, int64_t wo, int& th, int& tw) {
  tw = int(wo < 8 ? wo : 8);
  th = int(ho < 4 ? ho : 4);
  if (tw < 1) tw = 1;
  if (th < 1) th = 1;
}

// Packed inputs: the tile shape is the one of the largest grid (the largest height, the largest
// width), so that images of one grid are tiled as the fixed-grid op tiles them (the same blocks,
// the same sums in the same order: bitwise the same results); image b's tiles are
// [first_tile[b], first_tile[b + 1]) of the `tiles` tiles of all images.
struct PackedTiles {
  int64_t max_height, max_width;
  int64_t tiles;
  const int64_t* first_tile;  // [n + 1], where the kernels read it (device memory on a GPU)
};

// The PackedTiles of the image table `images` ([n][kImageFields], on the host, checked as the
// binding checks it: every grid positive), writing first_tile[0..n] into the host array
// `first_tile` (the returned first_tile points there; a GPU caller points it at a device copy).
inline PackedTiles packed_tiles(const int64_t* images, int64_t n, int64_t* first_tile) {
  PackedTiles pt{1, 1, 0, first_tile};
  for (int64_t b = 0; b < n; ++b) {
    const int64_t* row = images + b * kImageFields;
    if (row[kImageHeight] > pt.max_height) pt.max_height = row[kImageHeight];
    if (row[kImageWidth] > pt.max_width) pt.max_width = row[kImageWidth];
  }
  int th, tw;
  tile_shape((pt.max_height + 1) / 2, (pt.max_width + 1) / 2, th, tw);
  first_tile[0] = 0;
  for (int64_t b = 0; b < n; ++b) {
    const int64_t* row = images + b * kImageFields;
    const int64_t ho = (row[kImageHeight] + 1) / 2, wo = (row[kImageWidth] + 1) / 2;
    first_tile[b + 1] = first_tile[b] + ((ho + th - 1) / th) * ((wo + tw - 1) / tw);
  }
  pt.tiles = first_tile[n];
  return pt;
}

// Tile shapes: up to 4 x 8 windows and ~128 threads per block, fewer channel vectors when
// shared memory would pass 48 KiB (large k in the backward). `packed`: the packed inputs'
// tiles (g.height and g.width unused), else nullptr.
inline Tiling plan(const Geometry& g, int vec, Stage stage, const PackedTiles* packed = nullptr) {
  Tiling t{};
  const int64_t ho = packed ? (packed->max_height + 1) / 2 : g.out_height();
  const int64_t wo = packed ? (packed->max_width + 1) / 2 : g.out_width();
  tile_shape(ho, wo, t.th, t.tw);
  t.vec = vec;
  const int64_t vectors = (g.channels + vec - 1) / vec;
  const int windows = t.th * t.tw;
  int cv = 128 / windows;
  const int cv_max = vec > 1 ? 8 : 32;
  if (cv > cv_max) cv = cv_max;
  if (cv < 1) cv = 1;
  if (cv > vectors) cv = int(vectors);
  while (cv > 1 && smem_layout(g, t.th, t.tw, cv, vec, stage).total > 48 * 1024) cv /= 2;
  t.cv = cv;
  t.tiles_h = (ho + t.th - 1) / t.th;
  t.tiles_w = (wo + t.tw - 1) / t.tw;
  t.grid_x = packed ? packed->tiles : g.batch * t.tiles_h * t.tiles_w;
  t.first_tile = packed ? packed->first_tile : nullptr;
  t.grid_y = (vectors + cv - 1) / cv;
  t.grid_z = g.num_layers;
  t.threads = windows * cv;
  t.smem_bytes = smem_layout(g, t.th, t.tw, cv, vec, stage).total;
  return t;
}

// The weight-gradient kernel: one block per (image, channel chunk, layer) walks the image's
// tiles; a thread accumulates at most kMaxItems (tap, channel vector) items (the k*k taps and
// the bias), so a block has at least items / kMaxItems threads (fewer channel vectors when
// that would pass kMaxThreads).
inline Tiling plan_weight_grad(const Geometry& g, int vec, const PackedTiles* packed = nullptr) {
  Tiling t = plan(g, vec, Stage::WeightGrad, packed);
  const int items_per_vector = g.ksize * g.ksize + 1;
  while (t.cv > 1 && (items_per_vector * t.cv + kMaxItems - 1) / kMaxItems > kMaxThreads) t.cv /= 2;
  const int64_t vectors = (g.channels + vec - 1) / vec;
  const int needed = (items_per_vector * t.cv + kMaxItems - 1) / kMaxItems;
  t.grid_x = g.batch;
  t.grid_y = (vectors + t.cv - 1) / t.cv;
  t.threads = t.th * t.tw * t.cv;
  if (t.threads < needed) t.threads = (needed + 31) / 32 * 32;
  t.smem_bytes = smem_layout(g, t.th, t.tw, t.cv, vec, Stage::WeightGrad).total;
  return t;
}

}  // namespace cuda
}  // namespace saep
