// saep-kernels CUDA kernels: the kernel instance for a problem (dtype, vector width, kernel
// size), launched through a caller-given `launch` (`Launcher` on a GPU, the CPU emulation in
// csrc/tests). No torch headers.
#pragma once

#include "fused_aggregate_bwd.cuh"
#include "fused_aggregate_fwd.cuh"

namespace saep {
namespace cuda {

// Channels in a 16-byte vector of the problem's dtype.
inline int vector_width(const Geometry& g) { return int(16 / dtype_size(g.dtype)); }

// True when the layers and every other tensor the kernels touch (`extra` pointers, `extra`
// strides in elements) allow 16-byte vectors of channels.
inline bool vector_ok(const Geometry& g, const LayerPtrs& x, const void* const* extra,
                      int n_extra, const int64_t* extra_strides, int n_strides) {
  const int vec = vector_width(g);
  if (g.channels % vec != 0) return false;
  const uintptr_t bytes = 16;
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

// Calls launch(kernel, tiling, params) with the kernel instance for the problem's dtype,
// vector width and kernel size. `launch`'s return value is passed back.
template <typename T, int VEC, int KSIZE, typename Launch>
int launch_instance(const FwdParams& p, const PackedTiles* packed, Launch&& launch) {
  const Tiling t = plan(p.g, VEC, Stage::Forward, packed);
  return packed ? launch(fused_aggregate_fwd_kernel<T, VEC, KSIZE, true>, t, p)
                : launch(fused_aggregate_fwd_kernel<T, VEC, KSIZE, false>, t, p);
}
// The backward's two kernels, each when its gradients are asked for.
template <typename T, int VEC, int KSIZE, typename Launch>
int launch_instance(const BwdParams& p, const PackedTiles* packed, Launch&& launch) {
  int err = 0;
  if (p.grad_x[0] != nullptr) {
    const Tiling t = plan(p.g, VEC, Stage::InputGrad, packed);
    err = packed ? launch(fused_aggregate_bwd_input_kernel<T, VEC, KSIZE, true>, t, p)
                 : launch(fused_aggregate_bwd_input_kernel<T, VEC, KSIZE, false>, t, p);
  }
  if (err == 0 && (p.grad_w_part != nullptr || p.grad_b_part != nullptr)) {
    const Tiling t = plan_weight_grad(p.g, VEC, packed);
    err = packed ? launch(fused_aggregate_bwd_weight_kernel<T, VEC, KSIZE, true>, t, p)
                 : launch(fused_aggregate_bwd_weight_kernel<T, VEC, KSIZE, false>, t, p);
  }
  return err;
}

template <typename T, int VEC, typename Params, typename Launch>
int dispatch_ksize(const Params& p, const PackedTiles* packed, Launch&& launch) {
  switch (p.g.ksize) {
    case 1: return launch_instance<T, VEC, 1>(p, packed, launch);
    case 3: return launch_instance<T, VEC, 3>(p, packed, launch);
    case 5: return launch_instance<T, VEC, 5>(p, packed, launch);
    case 7: return launch_instance<T, VEC, 7>(p, packed, launch);
  }
  return -1;
}

template <typename T, typename Params, typename Launch>
int dispatch_vec(const Params& p, const PackedTiles* packed, bool vector, Launch&& launch) {
  constexpr int kVec = int(16 / sizeof(T));
  return vector ? dispatch_ksize<T, kVec>(p, packed, launch)
                : dispatch_ksize<T, 1>(p, packed, launch);
}

// `vector`: use 16-byte vectors (see fwd_vector_ok / bwd_vector_ok), else one channel each.
// `packed`: the tiles of packed inputs (plan.h, packed_tiles), given exactly when p.images is.
template <typename Params, typename Launch>
int dispatch(const Params& p, const PackedTiles* packed, bool vector, Launch&& launch) {
  if ((p.images != nullptr) != (packed != nullptr)) return -1;
  switch (p.g.dtype) {
    case DType::F32: return dispatch_vec<float>(p, packed, vector, launch);
    case DType::F64: return dispatch_vec<double>(p, packed, vector, launch);
    case DType::F16: return dispatch_vec<__half>(p, packed, vector, launch);
    case DType::BF16: return dispatch_vec<__nv_bfloat16>(p, packed, vector, launch);
  }
  return -1;
}

inline bool fwd_vector_ok(const FwdParams& p) {
  const void* extra[] = {p.out, p.argmax};
  return vector_ok(p.g, p.x, extra, 2, nullptr, 0);
}

inline bool bwd_vector_ok(const BwdParams& p) {
  const void* extra[kMaxLayers + 3];
  int n = 0;
  extra[n++] = p.grad_out;
  extra[n++] = p.grad_w_part;
  extra[n++] = p.grad_b_part;
  for (int l = 0; l < p.g.num_layers; ++l) extra[n++] = p.grad_x[l];
  const int64_t strides[] = {p.gy_stride_b, p.gy_stride_t};
  return vector_ok(p.g, p.x, extra, n, strides, 2);
}

#if defined(__CUDACC__)
// Launches a kernel instance on `stream` (0 on success, else a cudaError_t value).
struct Launcher {
  cudaStream_t stream;

  template <typename Params>
  int operator()(void (*kernel)(Params, Tiling), const Tiling& t, const Params& p) const {
    if (t.grid_x == 0 || t.grid_y == 0 || t.grid_z == 0) return 0;  // empty batch
    if (t.grid_y > 65535 || t.grid_z > 65535 || t.grid_x > 2147483647LL)
      return int(cudaErrorInvalidConfiguration);
    if (t.smem_bytes > 48 * 1024) {
      cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             int(t.smem_bytes));
      if (err != cudaSuccess) return int(err);
    }
    const dim3 grid(unsigned(t.grid_x), unsigned(t.grid_y), unsigned(t.grid_z));
    kernel<<<grid, dim3(unsigned(t.threads)), size_t(t.smem_bytes), stream>>>(p, t);
    return int(cudaGetLastError());
  }
};
#endif  // __CUDACC__

}  // namespace cuda
}  // namespace saep
