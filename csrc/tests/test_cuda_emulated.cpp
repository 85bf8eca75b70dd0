// The CUDA kernels (csrc/cuda/fused_aggregate_{fwd,bwd}.cuh), compiled as C++ and run under the
// CPU emulation of the CUDA execution model, against the naive loops.
#include "cuda_emulation.h"
// (the emulation must come first: it defines the CUDA names the kernels use)
#include "../cuda/dispatch.cuh"
#include "kernel_check.h"

namespace {

int vector_launches = 0, scalar_launches = 0;

struct EmulatedLaunch {
  template <typename Params>
  int operator()(void (*kernel)(Params, saep::cuda::Tiling), const saep::cuda::Tiling& t,
                 const Params& p) const {
    (t.vec > 1 ? vector_launches : scalar_launches)++;
    if (t.threads > saep::cuda::kMaxThreads || t.smem_bytes > 48 * 1024) {
      std::printf("  FAIL launch config: %d threads, %lld bytes of shared memory\n", t.threads,
                  (long long)t.smem_bytes);
      return 1;
    }
    if (t.grid_x == 0) return 0;
    saep_emu::launch(kernel, dim3(unsigned(t.grid_x), unsigned(t.grid_y), unsigned(t.grid_z)),
                     dim3(unsigned(t.threads)), size_t(t.smem_bytes), p, t);
    return 0;
  }
};

// Dispatches `p` as the CUDA binding does: packed inputs with their tiles (host memory is the
// device memory here).
template <typename Params>
int emulated_dispatch(const Params& p, bool vector) {
  if (p.images == nullptr) return saep::cuda::dispatch(p, nullptr, vector, EmulatedLaunch{});
  std::vector<int64_t> first_tile(size_t(p.g.batch + 1));
  const saep::cuda::PackedTiles packed =
      saep::cuda::packed_tiles(p.images, p.g.batch, first_tile.data());
  return saep::cuda::dispatch(p, &packed, vector, EmulatedLaunch{});
}

}  // namespace

int main() {
  using namespace saep;
  test::Backend be{
      "emulated CUDA kernels",
      [](const FwdParams& p) {
        if (emulated_dispatch(p, cuda::fwd_vector_ok(p)) != 0) std::abort();
      },
      [](const BwdParams& p) {
        if (emulated_dispatch(p, cuda::bwd_vector_ok(p)) != 0) std::abort();
      }};
  const int rc = test::run_all(be);
  std::printf("launches: %d with 16-byte vectors, %d with one channel per thread\n",
              vector_launches, scalar_launches);
  if (vector_launches < 20 || scalar_launches < 20) {
    std::printf("FAIL: both the vector and the scalar paths must be exercised\n");
    return 1;
  }
  return rc;
}
