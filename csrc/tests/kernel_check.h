// saep-kernels C++ tests: a naive loop implementation of the op (forward and backward, in
// double, straight from docs/op.md) and a harness that runs a backend's kernels on random
// problems and compares. Used by the CPU kernel test and the emulated CUDA kernel test.
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
#include "../dwconv_pool.h"

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

  std::string name() const {
    static const char* dt[] = {"f32", "f16", "bf16", "f64"};
    char buf[256];
    std::snprintf(buf, sizeof buf, "%s B%lld C%lld %lldx%lld P%lld K%d k%d %s%s%s strided=%d",
                  dt[int(dtype)], (long long)batch, (long long)channels, (long long)height,
                  (long long)width, (long long)prefix, layers, ksize,
                  pool == Pool::Avg ? "avg" : "max", residual ? " res" : "",
                  bias ? " bias" : "", int(pad_t > 0 || pad_b > 0));
    return buf;
  }
  int64_t tokens() const { return prefix + height * width; }
  int64_t stride_t() const { return channels + pad_t; }
  int64_t stride_b() const { return tokens() * stride_t() + pad_b; }
  int64_t layer_elems() const { return batch * stride_b() + 1; }
  int64_t oh() const { return (height + 1) / 2; }
  int64_t ow() const { return (width + 1) / 2; }
  int64_t windows() const { return oh() * ow(); }
  int64_t kc() const { return int64_t(layers) * channels; }
  size_t esize() const {
    return dtype == DType::F64 ? 8 : dtype == DType::F32 ? 4 : 2;
  }
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
  Buffer(DType d, int64_t n) : dtype(d), bytes(size_t(n) * (d == DType::F64 ? 8 : d == DType::F32 ? 4 : 2)) {}
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
  int64_t size() const { return int64_t(bytes.size() / (dtype == DType::F64 ? 8 : dtype == DType::F32 ? 4 : 2)); }
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
              best = std::max(best, z);
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

// |got - want| <= atol + rtol * |want|, counted and reported.
struct Checker {
  std::string what;
  double rtol, atol;
  int64_t bad = 0, total = 0;
  double worst = 0;
  void operator()(double got, double want) {
    ++total;
    const double err = std::fabs(got - want);
    const double lim = atol + rtol * std::fabs(want);
    if (!(err <= lim)) {
      if (bad < 3) std::printf("    %s: got %.9g want %.9g\n", what.c_str(), got, want);
      ++bad;
    }
    worst = std::max(worst, err / (lim > 0 ? lim : 1));
  }
};

// Output rounding of the dtype (one ulp, relative) and the slack of accumulating in the
// compute type in another order than the naive double sums.
inline double out_rtol(DType d) {
  switch (d) {
    case DType::F64: return 1e-12;
    case DType::F32: return 1e-5;
    case DType::F16: return 1.0 / 1024;
    case DType::BF16: return 1.0 / 128;
  }
  return 0;
}
inline double acc_atol(DType d) { return d == DType::F64 ? 1e-11 : 2e-5; }

}  // namespace test
}  // namespace saep

namespace saep {
namespace test {

struct Backend {
  std::string name;
  std::function<void(const FwdParams&)> fwd;
  std::function<int64_t(const Geometry&)> num_parts;
  std::function<void(const BwdParams&)> bwd;
};

struct ComputeBuffer {
  bool dbl;
  std::vector<double> d;
  std::vector<float> f;
  ComputeBuffer(bool is_double, size_t n) : dbl(is_double), d(is_double ? n : 0), f(is_double ? 0 : n) {}
  void* data() { return dbl ? static_cast<void*>(d.data()) : static_cast<void*>(f.data()); }
  double get(size_t i) const { return dbl ? d[i] : double(f[i]); }
  void set(size_t i, double v) {
    if (dbl) d[i] = v; else f[i] = float(v);
  }
};

// Runs forward and backward of `be` on `pr` and compares with the naive loops. Returns the
// number of mismatching values (0 = pass) and prints a line per failing tensor.
inline int64_t check_problem(const Backend& be, const Problem& pr, uint32_t seed) {
  Inputs in = make_inputs(pr, seed);
  const bool dbl = pr.dtype == DType::F64;
  const int k = pr.ksize, taps = k * k;
  const int64_t KC = pr.kc(), H = pr.height, W = pr.width, C = pr.channels;
  // the kernels take weights in the compute type, tap-major: round them first
  ComputeBuffer weight(dbl, size_t(taps * KC)), bias(dbl, size_t(KC));
  for (int64_t kc = 0; kc < KC; ++kc)
    for (int t = 0; t < taps; ++t) {
      weight.set(size_t(t * KC + kc), in.weight[size_t(kc * taps + t)]);
      in.weight[size_t(kc * taps + t)] = weight.get(size_t(t * KC + kc));
    }
  for (int64_t kc = 0; kc < KC; ++kc) {
    bias.set(size_t(kc), in.bias[size_t(kc)]);
    in.bias[size_t(kc)] = bias.get(size_t(kc));
  }

  Geometry g = pr.geometry();
  FwdParams fp{};
  fp.g = g;
  for (int l = 0; l < pr.layers; ++l) {
    fp.x.data[l] = in.layers[size_t(l)].data();
    fp.x.stride_b[l] = pr.stride_b();
    fp.x.stride_t[l] = pr.stride_t();
  }
  fp.weight = weight.data();
  fp.bias = pr.bias ? bias.data() : nullptr;
  Buffer out(pr.dtype, pr.batch * pr.windows() * KC);
  std::vector<uint8_t> argmax(size_t(pr.batch * pr.windows() * KC), 255);
  fp.out = out.data();
  fp.argmax = pr.pool == Pool::Max ? argmax.data() : nullptr;
  be.fwd(fp);

  const Expected ex = naive(pr, in, pr.pool == Pool::Max ? &argmax : nullptr);
  int64_t bad = 0;
  auto report = [&](Checker& ch) {
    if (ch.bad) std::printf("  FAIL %s [%s]: %lld of %lld values off\n", pr.name().c_str(),
                            ch.what.c_str(), (long long)ch.bad, (long long)ch.total);
    bad += ch.bad;
  };
  {
    Checker ch{"forward", out_rtol(pr.dtype), acc_atol(pr.dtype)};
    for (int64_t i = 0; i < out.size(); ++i) ch(out.get(i), ex.out[size_t(i)]);
    report(ch);
  }
  if (pr.pool == Pool::Max) {
    Checker ch{"argmax in 0..3 and at an in-grid position", 0, 0};
    for (int64_t b = 0; b < pr.batch; ++b)
      for (int64_t w = 0; w < pr.windows(); ++w)
        for (int64_t kc = 0; kc < KC; ++kc) {
          const int code = argmax[size_t((b * pr.windows() + w) * KC + kc)];
          const int64_t i = 2 * (w / pr.ow()) + code / 2, j = 2 * (w % pr.ow()) + code % 2;
          ch(code <= 3 && i < H && j < W ? 0.0 : 1.0, 0.0);
        }
    report(ch);
  }

  // backward: everything, then weight/bias only (a frozen vision tower)
  const int64_t parts = be.num_parts(g);
  // a value no kernel computes, as stored in the dtype
  Buffer sentinel_buf(pr.dtype, 1);
  sentinel_buf.set(0, 1234.5);
  const double sentinel = sentinel_buf.get(0);
  for (int mode = 0; mode < 2; ++mode) {
    const bool need_x = mode == 0;
    BwdParams bp{};
    bp.g = g;
    bp.x = fp.x;
    bp.grad_out = in.grad_out.data();
    bp.gy_stride_b = pr.windows() * KC;
    bp.gy_stride_t = KC;
    bp.argmax = pr.pool == Pool::Max ? argmax.data() : nullptr;
    bp.weight = weight.data();
    std::vector<Buffer> gx;
    for (int l = 0; l < pr.layers && need_x; ++l) {
      gx.emplace_back(pr.dtype, pr.batch * pr.tokens() * C);
      for (int64_t i = 0; i < gx.back().size(); ++i) gx.back().set(i, sentinel);
    }
    for (int l = 0; l < pr.layers && need_x; ++l) bp.grad_x[l] = gx[size_t(l)].data();
    ComputeBuffer gw(dbl, size_t(parts * taps * KC)), gb(dbl, size_t(parts * KC));
    bp.grad_w_part = gw.data();
    bp.grad_b_part = gb.data();
    be.bwd(bp);

    if (need_x) {
      Checker ch{"grad_x", out_rtol(pr.dtype), acc_atol(pr.dtype)};
      Checker prefix{"grad_x prefix rows untouched", 0, 0};
      for (int l = 0; l < pr.layers; ++l)
        for (int64_t b = 0; b < pr.batch; ++b)
          for (int64_t t = 0; t < pr.tokens(); ++t)
            for (int64_t c = 0; c < C; ++c) {
              const double got = gx[size_t(l)].get((b * pr.tokens() + t) * C + c);
              if (t < pr.prefix) {
                prefix(got, sentinel);
              } else {
                ch(got, ex.grad_x[size_t(((l * pr.batch + b) * H * W + (t - pr.prefix)) * C + c)]);
              }
            }
      report(ch);
      report(prefix);
    }
    double scale_w = 1, scale_b = 1;
    for (double v : ex.grad_w) scale_w = std::max(scale_w, std::fabs(v));
    for (double v : ex.grad_b) scale_b = std::max(scale_b, std::fabs(v));
    const double rtol = dbl ? 1e-10 : 1e-4;
    Checker cw{need_x ? "grad_w" : "grad_w (weights only)", rtol, rtol * scale_w};
    Checker cb{need_x ? "grad_b" : "grad_b (weights only)", rtol, rtol * scale_b};
    for (int64_t i = 0; i < taps * KC; ++i) {
      double s = 0;
      for (int64_t q = 0; q < parts; ++q) s += gw.get(size_t(q * taps * KC + i));
      cw(s, ex.grad_w[size_t(i)]);
    }
    for (int64_t i = 0; i < KC; ++i) {
      double s = 0;
      for (int64_t q = 0; q < parts; ++q) s += gb.get(size_t(q * KC + i));
      cb(s, ex.grad_b[size_t(i)]);
    }
    report(cw);
    report(cb);
  }
  return bad;
}

// The problems every backend is checked on: each dtype x kernel size x pool x residual, over
// odd / even / non-square / degenerate grids, prefix tokens, strided layers, channel counts
// below, at and above a 64-channel block and past a 256-channel block, and the empty batch.
inline std::vector<Problem> standard_problems() {
  std::vector<Problem> out;
  const DType dtypes[] = {DType::F32, DType::F64, DType::BF16, DType::F16};
  const int64_t grids[][2] = {{4, 4}, {5, 7}, {1, 1}, {3, 2}, {7, 5}};
  const int64_t channels[] = {70, 3, 64, 16};
  const int64_t pads_t[] = {0, 5, 8};   // 0 and 8 keep 16-byte alignment, 5 breaks it
  const int64_t pads_b[] = {0, 16, 11};
  int n = 0;
  for (DType dt : dtypes)
    for (int k : {1, 3, 5, 7})
      for (Pool pool : {Pool::Avg, Pool::Max})
        for (bool residual : {true, false}) {
          const auto& grid = grids[n % 5];
          Problem pr{};
          pr.batch = 1 + n % 2;
          pr.channels = channels[n % 4];
          pr.height = grid[0];
          pr.width = grid[1];
          pr.prefix = n % 2;
          pr.layers = 1 + n % 3;
          pr.ksize = k;
          pr.residual = residual;
          pr.bias = n % 4 != 3;
          pr.pool = pool;
          pr.dtype = dt;
          pr.pad_t = pads_t[n % 3];
          pr.pad_b = pads_b[(n / 3) % 3];
          out.push_back(pr);
          ++n;
        }
  Problem empty = out.front();
  empty.batch = 0;
  out.push_back(empty);
  Problem square = out.front();
  square.height = square.width = 27;
  square.channels = 5;
  out.push_back(square);
  Problem wide = out[2];
  wide.channels = 200;
  wide.height = 9;
  wide.width = 20;
  out.push_back(wide);
  // grids with interior windows (whole patch in the grid) for every kernel size
  for (int k : {3, 5, 7})
    for (DType dt : {DType::F32, DType::BF16}) {
      Problem big = out.front();
      big.dtype = dt;
      big.ksize = k;
      big.height = 13;
      big.width = 16;
      big.channels = 40;
      big.prefix = 1;
      big.pad_t = 3;
      out.push_back(big);
    }
  // more than one 256-channel block of the CPU max backward, with a ragged last block
  for (DType dt : {DType::F32, DType::BF16}) {
    Problem blocks = out.front();
    blocks.dtype = dt;
    blocks.pool = Pool::Max;
    blocks.ksize = 3;
    blocks.channels = 300;
    blocks.layers = 2;
    blocks.height = 5;
    blocks.width = 6;
    out.push_back(blocks);
  }
  return out;
}

inline int run_all(const Backend& be) {
  int failed = 0;
  const auto problems = standard_problems();
  uint32_t seed = 1;
  for (const Problem& pr : problems) {
    if (check_problem(be, pr, seed++) != 0) ++failed;
  }
  std::printf("%s: %d of %zu problems failed\n", be.name.c_str(), failed, problems.size());
  return failed == 0 ? 0 : 1;
}

}  // namespace test
}  // namespace saep
