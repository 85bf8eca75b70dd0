// saep-kernels: the CPU kernels timed without Python, next to what bounds them on this
// machine: a copy of the same bytes, a bf16 -> fp32 conversion loop and the fp32 multiply-add
// throughput of the instruction set in use (fma_peak); the forward's line adds its two floors,
// its bytes at the copy's speed and its multiply-adds at fma_peak's. For wall-clock
// measurements (interleaved rounds, median) and for instruction and cache counts under
// valgrind (`--reps 1 --rounds 1`; scripts/cpu_kernel_profile.py runs it with the sizes of
// saep_kernels.configs and counts only the kernel entry points).
//
//   cpu_kernel_bench --height 24 --width 24 --channels 1024 --prefix 1 --layers 4 --batch 8
//                    --dtype bf16 --pool avg --threads 2 [--isa avx2] [--only forward,copy]
//                    [--in-offset 64 --in-step 0 --out-offset 64]
//
// The offsets place the inputs and the output at chosen distances past a 4096-byte boundary
// (without them, where the allocator puts them), so that their effect on the timings (loads
// and stores whose addresses match in their low 12 bits) can be measured.
//
// Prints one line per measurement: name, median ms, GB/s of the bytes the kernel must move
// (docs/op.md section 4), bytes, and output elements.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "../cpu/fused_aggregate_cpu.h"
#include "../cpu/numeric.h"

namespace {

using saep::DType;
using saep::Pool;
using Clock = std::chrono::steady_clock;

struct Args {
  int64_t batch = 8, channels = 1024, height = 24, width = 24, prefix = 1;
  int layers = 4, ksize = 3, threads = 2, rounds = 5, reps = 20;
  // where the inputs and the output start past a 4096-byte boundary (-1: where the allocator
  // put them); each layer after the first starts in_step bytes further on
  int64_t in_offset = -1, in_step = 0, out_offset = -1;
  std::string dtype = "bf16", pool = "avg", isa = "", only = "";
};

[[noreturn]] void usage(const char* msg) {
  std::fprintf(stderr, "cpu_kernel_bench: %s\n", msg);
  std::exit(2);
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    if (i + 1 >= argc) usage(("missing value after " + k).c_str());
    const char* v = argv[++i];
    if (k == "--batch") a.batch = std::atoll(v);
    else if (k == "--channels") a.channels = std::atoll(v);
    else if (k == "--height") a.height = std::atoll(v);
    else if (k == "--width") a.width = std::atoll(v);
    else if (k == "--prefix") a.prefix = std::atoll(v);
    else if (k == "--layers") a.layers = std::atoi(v);
    else if (k == "--ksize") a.ksize = std::atoi(v);
    else if (k == "--threads") a.threads = std::atoi(v);
    else if (k == "--rounds") a.rounds = std::atoi(v);
    else if (k == "--reps") a.reps = std::atoi(v);
    else if (k == "--dtype") a.dtype = v;
    else if (k == "--pool") a.pool = v;
    else if (k == "--isa") a.isa = v;
    else if (k == "--only") a.only = v;
    else if (k == "--in-offset") a.in_offset = std::atoll(v);
    else if (k == "--in-step") a.in_step = std::atoll(v);
    else if (k == "--out-offset") a.out_offset = std::atoll(v);
    else usage(("unknown argument " + k).c_str());
  }
  if (a.dtype != "bf16" && a.dtype != "fp32") usage("--dtype: bf16 or fp32");
  if (a.pool != "avg" && a.pool != "max") usage("--pool: avg or max");
  if (a.layers < 1 || a.layers > saep::kMaxLayers) usage("--layers out of range");
  const int64_t elem = a.dtype == "bf16" ? 2 : 4;
  auto check_offset = [&](int64_t off, const char* name) {
    if (off != -1 && (off < 0 || off >= 4096 || off % elem))
      usage((std::string(name) + ": -1, or 0..4095 in whole elements").c_str());
  };
  check_offset(a.in_offset, "--in-offset");
  check_offset(a.out_offset, "--out-offset");
  if (a.in_step < 0 || a.in_step % elem) usage("--in-step: whole elements, not negative");
  return a;
}

// Splits [0, n) over `threads` OpenMP threads in contiguous chunks, as torch's parallel_for
// does (its thread pool is OpenMP too: the threads stay warm between calls).
saep::cpu::ParallelFor threaded_for(int threads) {
  return [threads](int64_t n, const std::function<void(int64_t, int64_t)>& body) {
    if (n <= 0) return;
    const int64_t chunk = (n + threads - 1) / threads;
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int64_t begin = 0; begin < n; begin += chunk) body(begin, std::min(n, begin + chunk));
  };
}

// The same thread split for a loop over n elements.
void parallel_elems(int threads, int64_t n, const std::function<void(int64_t, int64_t)>& f) {
  threaded_for(threads)(n, f);
}

// Kernels under measurement: not inlined, so valgrind's --toggle-collect can name them.
__attribute__((noinline)) void copy_bytes(char* dst, const char* src, int64_t b, int64_t e) {
  std::memcpy(dst + b, src + b, size_t(e - b));
}
__attribute__((noinline)) void bf16_to_f32(float* dst, const saep::cpu::bf16* src, int64_t b,
                                           int64_t e) {
  for (int64_t i = b; i < e; ++i) dst[i] = saep::cpu::to_float(src[i]);
}

// The multiply-add ceiling of each instruction set: CHAINS independent chains of its widest
// fp32 vectors (BYTES) per thread, x = x * m + c (one FMA where the target has FMA; mul and add
// on the baseline). As many chains as the registers hold next to m and c: more spill to the
// stack, and the stores then bound the loop. NAME(n) runs n iterations and returns the sum, so
// that the loop is kept; NAME_madds is the multiply-adds of one iteration.
#define SAEP_BENCH_FMA_LOOP(NAME, TARGET, BYTES, CHAINS)                                \
  constexpr int64_t NAME##_madds = int64_t(CHAINS) * (BYTES / 4);                      \
  __attribute__((noinline)) TARGET float NAME(int64_t n) {                            \
    typedef float V __attribute__((vector_size(BYTES)));                               \
    V x[CHAINS];                                                                       \
    for (int i = 0; i < CHAINS; ++i) x[i] = V{} + (1.0f + 1e-3f * float(i));           \
    const V m = V{} + 0.999f, c = V{} + 1e-3f;                                         \
    for (int64_t it = 0; it < n; ++it) {                                               \
      _Pragma("GCC unroll 32") for (int i = 0; i < CHAINS; ++i) x[i] = x[i] * m + c;   \
    }                                                                                  \
    float sum = 0;                                                                     \
    for (int i = 0; i < CHAINS; ++i)                                                   \
      for (int q = 0; q < int(BYTES / 4); ++q) sum += x[i][q];                         \
    return sum;                                                                        \
  }
// default (16 xmm), avx2 (16 ymm), avx512 (32 zmm)
SAEP_BENCH_FMA_LOOP(fma_loop_default, , 16, 12)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
SAEP_BENCH_FMA_LOOP(fma_loop_avx2, __attribute__((target("arch=x86-64-v3"))), 32, 12)
SAEP_BENCH_FMA_LOOP(fma_loop_avx512, __attribute__((target("arch=x86-64-v4"))), 64, 24)
#endif

// The FMA loop of the instruction set in use: run(n) and the multiply-adds of one iteration.
struct FmaLoop {
  float (*run)(int64_t);
  int64_t madds;
};
FmaLoop fma_loop(saep::cpu::CpuCapability c) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (c == saep::cpu::CpuCapability::Avx512) return {fma_loop_avx512, fma_loop_avx512_madds};
  if (c == saep::cpu::CpuCapability::Avx2) return {fma_loop_avx2, fma_loop_avx2_madds};
#endif
  (void)c;
  return {fma_loop_default, fma_loop_default_madds};
}

// `bytes` of `buf` starting `offset` bytes past a 4096-byte boundary, or at buf.data() when
// offset is -1
char* placed(std::vector<char>& buf, int64_t bytes, int64_t offset) {
  if (offset < 0) {
    buf.resize(size_t(bytes));
    return buf.data();
  }
  buf.resize(size_t(bytes + 2 * 4096));
  const auto base = (reinterpret_cast<uintptr_t>(buf.data()) + 4095) & ~uintptr_t(4095);
  return reinterpret_cast<char*>(base) + offset;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const Args a = parse(argc, argv);
  if (!a.isa.empty()) {
    bool found = false;
    for (int c = 0; c < saep::cpu::kNumCpuCapabilities; ++c) {
      const auto cap = static_cast<saep::cpu::CpuCapability>(c);
      if (a.isa == saep::cpu::cpu_capability_name(cap)) {
        if (!saep::cpu::set_cpu_capability(cap)) usage("--isa: not supported on this CPU");
        found = true;
      }
    }
    if (!found) usage("--isa: default, avx2 or avx512");
  }
  const bool bf16 = a.dtype == "bf16";
  const int64_t e = bf16 ? 2 : 4;

  saep::Geometry g{};
  g.batch = a.batch;
  g.channels = a.channels;
  g.height = a.height;
  g.width = a.width;
  g.prefix = a.prefix;
  g.num_layers = a.layers;
  g.ksize = a.ksize;
  g.residual = true;
  g.pool = a.pool == "avg" ? Pool::Avg : Pool::Max;
  g.dtype = bf16 ? DType::BF16 : DType::F32;
  const int64_t C = g.channels, KC = g.kc(), taps = int64_t(g.ksize) * g.ksize;
  const int64_t n_layer = g.batch * g.tokens() * C;         // elements of one layer
  const int64_t n_in = g.num_layers * g.batch * g.height * g.width * C;  // read by the op
  const int64_t n_out = g.batch * g.windows() * KC;
  const bool max = g.pool == Pool::Max;

  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  auto fill = [&](char* buf, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
      const float v = normal(rng);
      if (bf16) {
        const saep::cpu::bf16 h = saep::cpu::float_to_bf16(v);
        std::memcpy(buf + i * e, &h, 2);
      } else {
        std::memcpy(buf + i * e, &v, 4);
      }
    }
  };
  std::vector<std::vector<char>> layers(size_t(g.num_layers)), grad_x(size_t(g.num_layers));
  std::vector<char*> x(size_t(g.num_layers));
  for (int l = 0; l < g.num_layers; ++l) {
    const int64_t off = a.in_offset < 0 ? -1 : (a.in_offset + l * a.in_step) % 4096;
    x[size_t(l)] = placed(layers[size_t(l)], n_layer * e, off);
    fill(x[size_t(l)], n_layer);
  }
  for (auto& l : grad_x) l.assign(size_t(n_layer * e), 0);
  std::vector<char> out_buf, grad_out(size_t(n_out * e));
  char* const out = placed(out_buf, n_out * e, a.out_offset);
  fill(grad_out.data(), n_out);
  std::vector<uint8_t> argmax(static_cast<size_t>(n_out));
  std::vector<float> weight(static_cast<size_t>(taps * KC)), bias(static_cast<size_t>(KC));
  for (auto& w : weight) w = normal(rng) / 3;
  for (auto& b : bias) b = normal(rng);
  std::vector<float> gw(static_cast<size_t>(g.batch * taps * KC)),
      gb(static_cast<size_t>(g.batch * KC));

  saep::FwdParams fp{};
  fp.g = g;
  for (int l = 0; l < g.num_layers; ++l) {
    fp.x.data[l] = x[size_t(l)];
    fp.x.stride_b[l] = g.tokens() * C;
    fp.x.stride_t[l] = C;
  }
  fp.weight = weight.data();
  fp.bias = bias.data();
  fp.out = out;
  fp.argmax = max ? argmax.data() : nullptr;
  saep::FwdParams fp_no_argmax = fp;
  fp_no_argmax.argmax = nullptr;
  saep::BwdParams bx{};
  bx.g = g;
  bx.x = fp.x;
  bx.grad_out = grad_out.data();
  bx.gy_stride_b = g.windows() * KC;
  bx.gy_stride_t = KC;
  bx.argmax = max ? argmax.data() : nullptr;
  bx.weight = weight.data();
  for (int l = 0; l < g.num_layers; ++l) bx.grad_x[l] = grad_x[size_t(l)].data();
  saep::BwdParams bw = bx;  // weight and bias gradients only (a frozen vision tower)
  for (int l = 0; l < g.num_layers; ++l) bw.grad_x[l] = nullptr;
  bw.grad_w_part = gw.data();
  bw.grad_b_part = gb.data();
  saep::BwdParams bxw = bx;  // everything
  bxw.grad_w_part = gw.data();
  bxw.grad_b_part = gb.data();

  const auto pf = threaded_for(a.threads);
  // the comparison loops move the forward's input bytes (read) and as many again (write)
  std::vector<char> src(static_cast<size_t>(n_in * e)), dst(static_cast<size_t>(n_in * e));
  std::memcpy(src.data(), x[0], std::min(src.size(), size_t(n_layer * e)));
  std::vector<float> conv_dst(static_cast<size_t>(n_in));

  // the compute ceiling: fp32 multiply-adds per second of the FMA loop, one call per thread
  const FmaLoop fma = fma_loop(saep::cpu::cpu_capability());
  const int64_t fma_iters = 1 << 20;
  const int64_t fma_madds = int64_t(a.threads) * fma_iters * fma.madds;
  std::vector<float> fma_sink(static_cast<size_t>(a.threads));
  // the forward's multiply-adds (and adds) per output element, in the compute type: the
  // folded (k+1)x(k+1) kernel for avg (docs/op.md section 4), the four window positions' k x k
  // taps and residual for max; windows at the grid's edge do fewer
  const int64_t fwd_madds =
      n_out * (max ? 4 * (taps + (g.residual ? 1 : 0)) : (g.ksize + 1) * (g.ksize + 1));

  struct Case {
    std::string name;
    std::function<void()> run;
    int64_t bytes;
    int64_t madds;  // multiply-adds it runs (fma_peak) or must run (forward); 0 if not counted
  };
  const int64_t am = max ? n_out : 0;
  std::vector<Case> cases = {
      {"fma_peak", [&] { parallel_elems(a.threads, a.threads, [&](int64_t b, int64_t en) {
                           for (int64_t t = b; t < en; ++t)
                             fma_sink[size_t(t)] = fma.run(fma_iters); }); },
       0, fma_madds},
      {"copy", [&] { parallel_elems(a.threads, n_in * e, [&](int64_t b, int64_t en) {
                       copy_bytes(dst.data(), src.data(), b, en); }); },
       2 * n_in * e, 0},
      {"bf16_to_fp32", [&] { parallel_elems(a.threads, n_in, [&](int64_t b, int64_t en) {
                               bf16_to_f32(conv_dst.data(),
                                           reinterpret_cast<const saep::cpu::bf16*>(src.data()),
                                           b, en); }); },
       n_in * 2 + n_in * 4, 0},
      {"forward", [&] { saep::cpu::fused_aggregate_fwd(fp, pf); }, (n_in + n_out) * e + am,
       fwd_madds},
      // the max forward without the argmax, as at inference (nothing to backpropagate)
      {"forward_no_argmax", [&] { saep::cpu::fused_aggregate_fwd(fp_no_argmax, pf); },
       (n_in + n_out) * e, fwd_madds},
      {"input_grad", [&] { saep::cpu::fused_aggregate_bwd(bx, pf); }, (n_in + n_out) * e + am, 0},
      {"weight_grad", [&] { saep::cpu::fused_aggregate_bwd(bw, pf); }, (n_in + n_out) * e + am,
       0},
      {"backward", [&] { saep::cpu::fused_aggregate_bwd(bxw, pf); }, (2 * n_in + n_out) * e + am,
       0},
  };
  if (!max) cases.erase(std::find_if(cases.begin(), cases.end(), [](const Case& c) {
    return c.name == "forward_no_argmax";
  }));
  if (!a.only.empty()) {
    std::vector<Case> kept;
    // --only: case names separated by commas
    const std::string names = "," + a.only + ",";
    for (auto& c : cases)
      if (names.find("," + c.name + ",") != std::string::npos) kept.push_back(c);
    if (kept.empty()) usage(("no case named in --only " + a.only).c_str());
    cases = kept;
  }
  // the argmax the max backward reads
  if (max) saep::cpu::fused_aggregate_fwd(fp, pf);

  std::map<std::string, std::vector<double>> ms;
  for (auto& c : cases) c.run();  // warm-up
  for (int r = 0; r < a.rounds; ++r)
    for (auto& c : cases) {
      const auto t0 = Clock::now();
      for (int i = 0; i < a.reps; ++i) c.run();
      ms[c.name].push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count() /
                           a.reps);
    }
  std::printf("# %s %s, %lldx%lld C%lld K%d B%lld, %d threads, isa %s\n", a.dtype.c_str(),
              a.pool.c_str(), (long long)g.height, (long long)g.width, (long long)C,
              g.num_layers, (long long)g.batch, a.threads,
              saep::cpu::cpu_capability_name(saep::cpu::cpu_capability()));
  // the ceilings of this run: the copy's bytes per second and fma_peak's multiply-adds
  double copy_bps = 0, peak_madds = 0;
  for (auto& c : cases) {
    const double t = median(ms[c.name]) * 1e-3;
    if (c.name == "copy") copy_bps = double(c.bytes) / t;
    if (c.name == "fma_peak") peak_madds = double(c.madds) / t;
  }
  for (auto& c : cases) {
    const double t = median(ms[c.name]);
    if (c.name == "fma_peak") {
      std::printf("%-17s %9.3f ms %7.1f G fp32 multiply-adds/s (%d threads)\n", c.name.c_str(),
                  t, double(c.madds) / (t * 1e-3) / 1e9, a.threads);
      continue;
    }
    std::printf("%-17s %9.3f ms %7.1f GB/s  bytes %lld  outputs %lld", c.name.c_str(), t,
                double(c.bytes) / (t * 1e-3) / 1e9, (long long)c.bytes, (long long)n_out);
    // the time floors of the kernel: its bytes at the copy's speed, its multiply-adds at
    // fma_peak's (with copy and fma_peak in the run)
    if (c.madds && copy_bps > 0 && peak_madds > 0)
      std::printf("  floors: bytes %.3f ms, multiply-adds %.3f ms (%lld)",
                  double(c.bytes) / copy_bps * 1e3, double(c.madds) / peak_madds * 1e3,
                  (long long)c.madds);
    std::printf("\n");
  }
  return 0;
}
