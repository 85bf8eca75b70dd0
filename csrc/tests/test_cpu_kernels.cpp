// The CPU kernels against the naive loops, run serially and with a thread pool, under every
// instruction set compiled here that this CPU runs.
#include <cstdio>
#include <thread>
#include <vector>

#include "../cpu/fused_aggregate_cpu.h"
#include "kernel_check.h"

namespace {

// A small thread pool stand-in: splits the task range over std::threads.
saep::cpu::ParallelFor threaded_for(int threads) {
  return [threads](int64_t n, const std::function<void(int64_t, int64_t)>& body) {
    std::vector<std::thread> pool;
    const int64_t chunk = (n + threads - 1) / threads;
    for (int64_t begin = 0; begin < n; begin += chunk)
      pool.emplace_back(body, begin, std::min(n, begin + chunk));
    for (auto& t : pool) t.join();
  };
}

}  // namespace

int main() {
  using saep::cpu::CpuCapability;
  int rc = 0;
  int ran = 0;
  for (int c = 0; c < saep::cpu::kNumCpuCapabilities; ++c) {
    const auto capability = static_cast<CpuCapability>(c);
    if (!saep::cpu::set_cpu_capability(capability)) continue;
    ++ran;
    for (int threads : {1, 3}) {
      auto pf = threads == 1 ? saep::cpu::serial_for() : threaded_for(threads);
      saep::test::Backend be{
          std::string("cpu kernels, ") + saep::cpu::cpu_capability_name(capability) + " (" +
              std::to_string(threads) + " thread" + (threads > 1 ? "s)" : ")"),
          [pf](const saep::FwdParams& p) { saep::cpu::fused_aggregate_fwd(p, pf); },
          [pf](const saep::BwdParams& p) { saep::cpu::fused_aggregate_bwd(p, pf); }};
      rc |= saep::test::run_all(be);
    }
  }
  std::printf("cpu kernels checked under %d instruction set(s)\n", ran);
  return ran > 0 ? rc : 1;
}
