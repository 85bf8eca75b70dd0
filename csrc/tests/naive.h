// saep-kernels C++ tests: a problem (sizes, layout, dtype), its random inputs, and a naive
// loop implementation of the op over them (forward and backward, in double, straight from
// docs/op.md). The oracle of kernel_check.h.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "../cpu/numeric.h"
#include "../fused_aggregate.h"

namespace saep {
namespace test {

using cpu::bf16;
using cpu::f16;

struct Problem {
  int64_t batch, channels, height, width, prefix;
  int layers, ksize;
  bool residual, bias;
  Pool pool;
  DType dtype;
  int64_t pad_t = 0;  // extra elements between tokens (token stride = C + pad_t)
  int64_t pad_b = 0;  // extra elements between images
  bool nonfinite = false;  // +Inf, -Inf and NaN among each layer's values

  std::string name() const {
    static const char* dt[] = {"f32", "f16", "bf16", "f64"};
    char buf[256];
    std::snprintf(buf, sizeof buf, "%s B%lld C%lld %lldx%lld P%lld K%d k%d %s%s%s strided=%d%s",
                  dt[int(dtype)], (long long)batch, (long long)channels, (long long)height,
                  (long long)width, (long long)prefix, layers, ksize,
                  pool == Pool::Avg ? "avg" : "max", residual ? " res" : "",
                  bias ? " bias" : "", int(pad_t > 0 || pad_b > 0),
                  nonfinite ? " nonfinite" : "");
    return buf;
  }
  int64_t tokens() const { return geometry().tokens(); }
  int64_t stride_t() const { return channels + pad_t; }
  int64_t stride_b() const { return tokens() * stride_t() + pad_b; }
  int64_t layer_elems() const { return batch * stride_b() + 1; }
  int64_t oh() const { return geometry().out_height(); }
  int64_t ow() const { return geometry().out_width(); }
  int64_t windows() const { return geometry().windows(); }
  int64_t kc() const { return geometry().kc(); }
  Geometry geometry() const {
    Geometry g;
    g.batch = batch;
    g.channels = channels;
    g.height = height;
    g.width = width;
    g.prefix = prefix;
    g.num_layers = layers;
    g.ksize = ksize;
    g.residual = residual;
    g.pool = pool;
    g.dtype = dtype;
    return g;
  }
};

// Values are stored in the problem's dtype; `vals` holds what the stored values are exactly.
struct Buffer {
  DType dtype;
  std::vector<unsigned char> bytes;
  Buffer(DType d, int64_t n) : dtype(d), bytes(size_t(n * dtype_size(d))) {}
  void* data() { return bytes.data(); }
  double get(int64_t i) const {
    switch (dtype) {
      case DType::F32: { float v; std::memcpy(&v, &bytes[i * 4], 4); return v; }
      case DType::F64: { double v; std::memcpy(&v, &bytes[i * 8], 8); return v; }
      case DType::BF16: { bf16 v; std::memcpy(&v, &bytes[i * 2], 2); return cpu::to_float(v); }
      case DType::F16: { f16 v; std::memcpy(&v, &bytes[i * 2], 2); return cpu::to_float(v); }
    }
    return 0;
  }
  void set(int64_t i, double x) {
    switch (dtype) {
      case DType::F32: { float v = float(x); std::memcpy(&bytes[i * 4], &v, 4); break; }
      case DType::F64: { std::memcpy(&bytes[i * 8], &x, 8); break; }
      case DType::BF16: { bf16 v = cpu::float_to_bf16(float(x)); std::memcpy(&bytes[i * 2], &v, 2); break; }
      case DType::F16: { f16 v = cpu::float_to_f16(float(x)); std::memcpy(&bytes[i * 2], &v, 2); break; }
    }
  }
  int64_t size() const { return int64_t(bytes.size()) / dtype_size(dtype); }
};

struct Inputs {
  std::vector<Buffer> layers;
  std::vector<double> weight;  // [KC][k][k]
  std::vector<double> bias;    // [KC]
  Buffer grad_out;             // [B, windows, KC] contiguous

  double x(const Problem& pr, int l, int64_t b, int64_t i, int64_t j, int64_t c) const {
    if (i < 0 || i >= pr.height || j < 0 || j >= pr.width) return 0.0;
    return layers[l].get(b * pr.stride_b() + (pr.prefix + i * pr.width + j) * pr.stride_t() + c);
  }
};

inline Inputs make_inputs(const Problem& pr, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  Inputs in{{}, {}, {}, Buffer(pr.dtype, pr.batch * pr.windows() * pr.kc())};
  for (int l = 0; l < pr.layers; ++l) {
    Buffer buf(pr.dtype, pr.layer_elems());
    for (int64_t i = 0; i < buf.size(); ++i) buf.set(i, normal(rng));
    if (pr.nonfinite && pr.batch > 0) {
      const double special[] = {INFINITY, -INFINITY, NAN, INFINITY};
      for (double v : special) {
        const int64_t b = int64_t(rng() % uint64_t(pr.batch));
        const int64_t t = pr.prefix + int64_t(rng() % uint64_t(pr.height * pr.width));
        const int64_t c = int64_t(rng() % uint64_t(pr.channels));
        buf.set(b * pr.stride_b() + t * pr.stride_t() + c, v);
      }
    }
    in.layers.push_back(std::move(buf));
  }
  const int taps = pr.ksize * pr.ksize;
  in.weight.resize(size_t(pr.kc() * taps));
  for (auto& w : in.weight) w = normal(rng) / pr.ksize;
  in.bias.assign(size_t(pr.kc()), 0.0);
  if (pr.bias)
    for (auto& b : in.bias) b = normal(rng);
  for (int64_t i = 0; i < in.grad_out.size(); ++i) in.grad_out.set(i, normal(rng));
  return in;
}

// z = conv + bias (+ x) at grid position (i, j) of channel kc, image b.
inline double naive_z(const Problem& pr, const Inputs& in, int64_t b, int64_t kc, int64_t i,
                      int64_t j) {
  const int l = int(kc / pr.channels);
  const int64_t c = kc % pr.channels;
  const int k = pr.ksize, p = k / 2;
  double z = in.bias[kc];
  for (int u = 0; u < k; ++u)
    for (int v = 0; v < k; ++v)
      z += in.weight[(kc * k + u) * k + v] * in.x(pr, l, b, i + u - p, j + v - p, c);
  if (pr.residual) z += in.x(pr, l, b, i, j, c);
  return z;
}

struct Expected {
  std::vector<double> out;       // [B, windows, KC]
  std::vector<double> grad_x;    // [K, B, H*W, C]
  std::vector<double> grad_w;    // [k*k, KC]
  std::vector<double> grad_b;    // [KC]
};

// The forward, and the backward given the argmax of each max window (the kernel's, so that
// near-ties in low precision do not make the comparison ambiguous).
inline Expected naive(const Problem& pr, const Inputs& in, const std::vector<uint8_t>* argmax) {
  const int k = pr.ksize, p = k / 2;
  const int64_t H = pr.height, W = pr.width, Wo = pr.ow(), KC = pr.kc(), C = pr.channels;
  Expected ex;
  ex.out.assign(size_t(pr.batch * pr.windows() * KC), 0.0);
  ex.grad_x.assign(size_t(pr.layers * pr.batch * H * W * C), 0.0);
  ex.grad_w.assign(size_t(k * k * KC), 0.0);
  ex.grad_b.assign(size_t(KC), 0.0);
  std::vector<double> gz(size_t(H * W));
  for (int64_t b = 0; b < pr.batch; ++b) {
    for (int64_t kc = 0; kc < KC; ++kc) {
      std::fill(gz.begin(), gz.end(), 0.0);
      for (int64_t oi = 0; oi < pr.oh(); ++oi) {
        for (int64_t oj = 0; oj < Wo; ++oj) {
          const int64_t o = (b * pr.windows() + oi * Wo + oj) * KC + kc;
          double acc = 0, best = -INFINITY;
          int n = 0;
          for (int dy = 0; dy < 2; ++dy)
            for (int dx = 0; dx < 2; ++dx) {
              const int64_t i = 2 * oi + dy, j = 2 * oj + dx;
              if (i >= H || j >= W) continue;
              const double z = naive_z(pr, in, b, kc, i, j);
              acc += z;
              if (z > best || z != z) best = z;  // NaN wins, as in torch.max_pool2d
              ++n;
            }
          ex.out[size_t(o)] = pr.pool == Pool::Avg ? acc / n : best;
          const double gy = in.grad_out.get(o);
          ex.grad_b[size_t(kc)] += gy;
          for (int dy = 0; dy < 2; ++dy)
            for (int dx = 0; dx < 2; ++dx) {
              const int64_t i = 2 * oi + dy, j = 2 * oj + dx;
              if (i >= H || j >= W) continue;
              if (pr.pool == Pool::Avg) {
                gz[size_t(i * W + j)] = gy / n;
              } else if (argmax && (*argmax)[size_t(o)] == dy * 2 + dx) {
                gz[size_t(i * W + j)] = gy;
              }
            }
        }
      }
      const int l = int(kc / C);
      const int64_t c = kc % C;
      for (int64_t i = 0; i < H; ++i)
        for (int64_t j = 0; j < W; ++j) {
          double gx = pr.residual ? gz[size_t(i * W + j)] : 0.0;
          for (int u = 0; u < k; ++u)
            for (int v = 0; v < k; ++v) {
              const int64_t i2 = i - u + p, j2 = j - v + p;
              if (i2 >= 0 && i2 < H && j2 >= 0 && j2 < W)
                gx += in.weight[(kc * k + u) * k + v] * gz[size_t(i2 * W + j2)];
              ex.grad_w[size_t((u * k + v) * KC + kc)] +=
                  gz[size_t(i * W + j)] * in.x(pr, l, b, i + u - p, j + v - p, c);
            }
          ex.grad_x[size_t(((l * pr.batch + b) * H * W + i * W + j) * C + c)] = gx;
        }
    }
  }
  return ex;
}

}  // namespace test
}  // namespace saep
