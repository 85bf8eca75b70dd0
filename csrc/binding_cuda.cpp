// saep-kernels torch binding: the CUDA kernels of the saep_C ops (CUDA builds only). Only the
// c10/cuda headers (device guard, current stream): a toolkit with nvcc and the CUDA runtime
// builds it.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>

#include "binding.h"
#include "cuda/fused_aggregate_cuda.h"

namespace saep {
namespace binding {
namespace {

void check_cuda(int err) {
  TORCH_CHECK(err == 0, "saep CUDA kernel failed: ", cuda::error_string(err));
}

// Packed inputs on the device: the image table (checked on the host by packed_geometry) and
// each image's first tile (plan.h, packed_tiles), filled into pinned host memory and copied in
// one asynchronous copy on the current stream, so nothing waits for the device. The caching
// allocators keep both buffers until the stream is done with them.
struct DeviceImages {
  at::Tensor buffer;  // on the device: the table [n][kImageFields], then first_tile [n + 1]
  const int64_t* table;
  cuda::PackedTiles tiles;
};

DeviceImages device_images(const int64_t* images, int64_t n, const at::Device& device) {
  at::Tensor host = at::empty({n * kImageFields + n + 1},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  if (n > 0) std::memcpy(h, images, size_t(n * kImageFields) * sizeof(int64_t));
  cuda::PackedTiles tiles = cuda::packed_tiles(images, n, h + n * kImageFields);
  at::Tensor dev = host.to(at::TensorOptions().device(device), /*non_blocking=*/true);
  const int64_t* table = dev.data_ptr<int64_t>();
  tiles.first_tile = table + n * kImageFields;
  return DeviceImages{dev, table, tiles};
}

// Runs kernel(params, packed tiles or nullptr, stream) on the inputs' device and its current
// stream, packed inputs with the image table copied to the device.
template <typename Params, typename Kernel>
void run_on_device(const Params& p, const at::Device& device, Kernel kernel) {
  const c10::cuda::CUDAGuard guard(device);
  CUstream_st* stream = c10::cuda::getCurrentCUDAStream().stream();
  if (p.images == nullptr) {
    check_cuda(kernel(p, nullptr, stream));
    return;
  }
  const DeviceImages images = device_images(p.images, p.g.batch, device);
  Params q = p;
  q.images = images.table;
  check_cuda(kernel(q, &images.tiles, stream));
}

// Launches on the inputs' device and its current stream.
struct CudaKernels {
  static void fwd(const FwdParams& p, const at::Device& device) {
    run_on_device(p, device, cuda::fused_aggregate_fwd);
  }
  static void bwd(const BwdParams& p, const at::Device& device) {
    run_on_device(p, device, cuda::fused_aggregate_bwd);
  }
};

}  // namespace
}  // namespace binding
}  // namespace saep

TORCH_LIBRARY_IMPL(saep_C, CUDA, m) {
  using Kernels = saep::binding::CudaKernels;
  m.impl("fused_aggregate_fwd", &saep::binding::fused_aggregate_fwd<Kernels>);
  m.impl("fused_aggregate_bwd", &saep::binding::fused_aggregate_bwd<Kernels>);
  m.impl("fused_aggregate_varlen_fwd", &saep::binding::fused_aggregate_varlen_fwd<Kernels>);
  m.impl("fused_aggregate_varlen_bwd", &saep::binding::fused_aggregate_varlen_bwd<Kernels>);
}
