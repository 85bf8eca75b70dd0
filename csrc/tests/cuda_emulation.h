// saep-kernels tests: just enough of the CUDA execution model, on CPU threads, to run the
// CUDA kernels of csrc/cuda as plain C++ and check their results without a GPU.
//
// A launch runs the grid's blocks one after another on blockDim real threads that meet at
// __syncthreads() on a barrier and share a heap buffer as dynamic shared memory (refilled
// with garbage for every block, and exactly as large as asked, so AddressSanitizer sees any
// access past it). Index mistakes, missed zero-fills and shared-memory overruns show up;
// data races and the memory model do not (that needs compute-sanitizer on a GPU).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "../cpu/numeric.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) { return saep::cpu::to_float(saep::cpu::f16{h.bits}); }
inline __half __float2half_rn(float f) { return __half{saep::cpu::float_to_f16(f).bits}; }
inline float __bfloat162float(__nv_bfloat16 h) {
  return saep::cpu::to_float(saep::cpu::bf16{h.bits});
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  return __nv_bfloat16{saep::cpu::float_to_bf16(f).bits};
}

namespace saep_emu {

class Barrier {
 public:
  explicit Barrier(unsigned n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(m_);
    const unsigned gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return gen != gen_; });
    }
  }
  void reset(unsigned n) {
    std::unique_lock<std::mutex> lock(m_);
    n_ = n;
    count_ = 0;
  }
  // a thread that returned early no longer takes part
  void leave() {
    std::unique_lock<std::mutex> lock(m_);
    --n_;
    if (n_ > 0 && count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  unsigned n_, count_ = 0, gen_ = 0;
};

struct Context {
  dim3 thread, block, block_dim, grid_dim;
  Barrier* barrier = nullptr;
  unsigned char* smem = nullptr;
};

inline Context& ctx() {
  static thread_local Context c;
  return c;
}

inline unsigned char* dynamic_smem() { return ctx().smem; }

template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem_bytes, const Args&... args) {
  const unsigned threads = block.x * block.y * block.z;
  std::vector<unsigned char> smem(smem_bytes > 0 ? smem_bytes : 1);
  Barrier inner(threads), start(threads), end(threads);
  auto worker = [&](unsigned t) {
    Context& c = ctx();
    c.thread = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
    c.block_dim = block;
    c.grid_dim = grid;
    c.barrier = &inner;
    c.smem = smem.data();
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          if (t == 0) {  // everyone finished the previous block: fresh barrier, garbage smem
            inner.reset(threads);
            std::fill(smem.begin(), smem.end(), static_cast<unsigned char>(0xCD));
          }
          start.wait();
          c.block = dim3(bx, by, bz);
          kernel(args...);
          inner.leave();
          end.wait();
        }
  };
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) pool.emplace_back(worker, t);
  for (auto& th : pool) th.join();
}

}  // namespace saep_emu

#define threadIdx (::saep_emu::ctx().thread)
#define blockIdx (::saep_emu::ctx().block)
#define blockDim (::saep_emu::ctx().block_dim)
#define gridDim (::saep_emu::ctx().grid_dim)
inline void __syncthreads() { ::saep_emu::ctx().barrier->wait(); }
