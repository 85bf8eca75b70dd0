// saep-kernels: a hash of every output of the CPU kernels over a fixed set of problems, one
// line per problem and instruction set, for checking that a change to the kernels left their
// results bitwise unchanged where it was not meant to change the arithmetic (its order
// included). Build it at both commits, run each, and compare:
//
//   build/cmake/cpu_bitwise_hash > before.txt   (at the old commit)
//   build/cmake/cpu_bitwise_hash > after.txt    (at the new one)
//   diff before.txt after.txt                   (empty: bitwise unchanged)
//
// A line holds the forward's hash (the output and, for max pooling, the argmax codes) and the
// backward's (grad_x; grad_w and grad_b). The problems: even and odd grids, 1x1, prefix
// tokens, k = 1, 3, 5, 7, K = 1-3, C up to 1056 (full Packing groups and a tail), fp32, bf16,
// fp16 and fp64, avg and max, with and without the residual, each with plain normal inputs
// and with NaN, inf and -0 mixed in (then without a bias). NaNs are hashed as one canonical
// NaN: the payload and sign a NaN result carries follow the order of its operands, not
// values. Not a test: it prints hashes, and only the diff of two builds means anything.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "../cpu/fused_aggregate_cpu.h"
#include "../cpu/numeric.h"

namespace {

using saep::DType;
using saep::Geometry;
using saep::Pool;

struct Grid {
  int height, width, channels, layers, ksize, prefix, batch;
};

const Grid kGrids[] = {
    {24, 24, 96, 2, 3, 1, 2}, {27, 27, 80, 2, 3, 0, 1}, {7, 5, 40, 3, 3, 0, 2},
    {9, 13, 64, 1, 5, 1, 1},  {6, 10, 48, 2, 1, 0, 2},  {11, 11, 33, 2, 7, 0, 1},
    {1, 1, 32, 1, 3, 0, 1},   {2, 9, 64, 2, 3, 2, 1},   {16, 16, 1056, 1, 3, 0, 1},
    {13, 26, 160, 1, 3, 0, 1},
};

const DType kDtypes[] = {DType::F32, DType::BF16, DType::F16, DType::F64};

const char* dtype_name(DType dt) {
  return dt == DType::F64    ? "fp64"
         : dt == DType::F32  ? "fp32"
         : dt == DType::BF16 ? "bf16"
                             : "fp16";
}

int element_size(DType dt) {
  return dt == DType::F64 ? 8 : dt == DType::F32 ? 4 : 2;
}

// The weights and bias are fp32 for 16-bit inputs (the compute type), else the input's.
int parameter_size(DType dt) { return dt == DType::F64 ? 8 : 4; }

// v as an element of size `size` (of dtype dt where 2 bytes) at p
void put(char* p, float v, int size, DType dt) {
  if (size == 4) {
    std::memcpy(p, &v, 4);
  } else if (size == 8) {
    const double d = v;
    std::memcpy(p, &d, 8);
  } else if (dt == DType::BF16) {
    const auto h = saep::cpu::float_to_bf16(v);
    std::memcpy(p, &h, 2);
  } else {
    const auto h = saep::cpu::float_to_f16(v);
    std::memcpy(p, &h, 2);
  }
}

// Every NaN in buf (elements of size `size`, of dtype dt where 2 bytes) as the canonical one.
void canonical_nans(std::vector<char>& buf, int size, DType dt) {
  for (size_t i = 0; i + size <= buf.size(); i += size) {
    char* p = buf.data() + i;
    if (size == 4) {
      uint32_t u;
      std::memcpy(&u, p, 4);
      if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x7fffffu)) u = 0x7fc00000u;
      std::memcpy(p, &u, 4);
    } else if (size == 8) {
      uint64_t u;
      std::memcpy(&u, p, 8);
      if ((u & 0x7ff0000000000000ull) == 0x7ff0000000000000ull && (u & 0xfffffffffffffull))
        u = 0x7ff8000000000000ull;
      std::memcpy(p, &u, 8);
    } else {
      uint16_t u;
      std::memcpy(&u, p, 2);
      const uint16_t exponent = dt == DType::BF16 ? 0x7f80 : 0x7c00;
      if ((u & exponent) == exponent && (u & uint16_t(~exponent & 0x7fff)))
        u = dt == DType::BF16 ? 0x7fc0 : 0x7e00;
      std::memcpy(p, &u, 2);
    }
  }
}

// FNV-1a, continued from h
uint64_t hash(const void* data, size_t n, uint64_t h = 1469598103934665603ull) {
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

}  // namespace

int main() {
  std::mt19937 rng(123);
  std::normal_distribution<float> normal;
  int problems = 0;
  for (int isa = 0; isa < saep::cpu::kNumCpuCapabilities; ++isa) {
    const auto capability = static_cast<saep::cpu::CpuCapability>(isa);
    if (!saep::cpu::set_cpu_capability(capability)) continue;
    for (const Grid& grid : kGrids)
      for (const DType dt : kDtypes)
        for (const Pool pool : {Pool::Avg, Pool::Max})
          for (const bool residual : {false, true})
            for (const bool special : {false, true}) {
              const Geometry g{grid.batch, grid.channels, grid.height, grid.width, grid.prefix,
                               grid.layers, grid.ksize, residual, pool, dt};
              const int es = element_size(dt), ps = parameter_size(dt);
              // a normal value, or one of NaN, +-inf, +-0 one time in 13 where special
              const auto value = [&](float v) {
                if (!special) return v;
                switch (rng() % 64) {
                  case 0: return NAN;
                  case 1: return INFINITY;
                  case 2: return -0.0f;
                  case 3: return -INFINITY;
                  case 4: return 0.0f;
                  default: return v;
                }
              };
              const int64_t layer_elements = g.batch * g.tokens() * g.channels;
              std::vector<std::vector<char>> layers(g.num_layers);
              saep::FwdParams fp{};
              fp.g = g;
              for (int l = 0; l < g.num_layers; ++l) {
                layers[l].resize(layer_elements * es);
                for (int64_t i = 0; i < layer_elements; ++i)
                  put(layers[l].data() + i * es, value(normal(rng)), es, dt);
                fp.x.data[l] = layers[l].data();
                fp.x.stride_b[l] = g.tokens() * g.channels;
                fp.x.stride_t[l] = g.channels;
              }
              const int64_t taps = g.ksize * g.ksize, kc = g.kc();
              std::vector<char> weight(taps * kc * ps), bias(kc * ps);
              for (int64_t i = 0; i < taps * kc; ++i)
                put(weight.data() + i * ps, value(normal(rng) / 3), ps, dt);
              for (int64_t i = 0; i < kc; ++i) put(bias.data() + i * ps, normal(rng), ps, dt);
              const int64_t outputs = g.batch * g.windows() * kc;
              std::vector<char> out(outputs * es, 0x55);
              std::vector<uint8_t> argmax(outputs, 0x77);
              fp.weight = weight.data();
              fp.bias = special && residual ? nullptr : bias.data();
              fp.out = out.data();
              fp.argmax = pool == Pool::Max ? argmax.data() : nullptr;
              saep::cpu::fused_aggregate_fwd(fp, saep::cpu::serial_for());
              canonical_nans(out, es, dt);
              uint64_t forward = hash(out.data(), out.size());
              if (pool == Pool::Max) forward = hash(argmax.data(), argmax.size(), forward);

              std::vector<char> grad_out(outputs * es);
              for (int64_t i = 0; i < outputs; ++i)
                put(grad_out.data() + i * es, value(normal(rng)), es, dt);
              std::vector<std::vector<char>> grad_x(g.num_layers,
                                                    std::vector<char>(layer_elements * es, 0x33));
              std::vector<char> grad_w(g.batch * taps * kc * ps, 0x11);
              std::vector<char> grad_b(g.batch * kc * ps, 0x22);
              saep::BwdParams bp{};
              bp.g = g;
              bp.x = fp.x;
              bp.grad_out = grad_out.data();
              bp.gy_stride_b = g.windows() * kc;
              bp.gy_stride_t = kc;
              bp.argmax = fp.argmax;
              bp.weight = weight.data();
              for (int l = 0; l < g.num_layers; ++l) bp.grad_x[l] = grad_x[l].data();
              bp.grad_w_part = grad_w.data();
              bp.grad_b_part = grad_b.data();
              saep::cpu::fused_aggregate_bwd(bp, saep::cpu::serial_for());
              uint64_t input_grad = 1469598103934665603ull;
              for (auto& gx : grad_x) {
                canonical_nans(gx, es, dt);
                input_grad = hash(gx.data(), gx.size(), input_grad);
              }
              canonical_nans(grad_w, ps, dt);
              canonical_nans(grad_b, ps, dt);
              const uint64_t param_grad =
                  hash(grad_b.data(), grad_b.size(), hash(grad_w.data(), grad_w.size()));

              std::printf("%s %dx%d C%d K%d k%d prefix%d B%d %s %s residual%d special%d  "
                          "fwd %016llx  grad_x %016llx  grad_wb %016llx\n",
                          saep::cpu::cpu_capability_name(capability), grid.height, grid.width,
                          grid.channels, grid.layers, grid.ksize, grid.prefix, grid.batch,
                          dtype_name(dt),
                          pool == Pool::Max ? "max" : "avg", int(residual), int(special),
                          (unsigned long long)forward, (unsigned long long)input_grad,
                          (unsigned long long)param_grad);
              ++problems;
            }
  }
  std::printf("%d problems\n", problems);
  return 0;
}
