// saep-kernels C++ tests: runs a backend's kernels on the standard problems and compares
// every output with the naive loops (naive.h). Used by the CPU kernel test and the emulated
// CUDA kernel test.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "naive.h"

namespace saep {
namespace test {

// Non-finite values (docs/op.md, "Non-finite values"): Exact, the same NaN/+Inf/-Inf as the
// naive loops; Mask, non-finite where they are (folded arithmetic may turn a NaN into an Inf).
enum class NonFinite { Exact, Mask };

// |got - want| <= atol + rtol * |want| for finite values, counted and reported.
struct Checker {
  std::string what;
  double rtol, atol;
  NonFinite nonfinite = NonFinite::Exact;
  int64_t bad = 0, total = 0;
  double worst = 0;
  void operator()(double got, double want) {
    ++total;
    if (!std::isfinite(got) || !std::isfinite(want)) {
      const bool same = nonfinite == NonFinite::Exact
                            ? (std::isnan(got) && std::isnan(want)) || got == want
                            : !std::isfinite(got) && !std::isfinite(want);
      if (!same) {
        if (bad < 3) std::printf("    %s: got %.9g want %.9g\n", what.c_str(), got, want);
        ++bad;
      }
      return;
    }
    const double err = std::fabs(got - want);
    const double lim = atol + rtol * std::fabs(want);
    if (!(err <= lim)) {
      if (bad < 3) std::printf("    %s: got %.9g want %.9g\n", what.c_str(), got, want);
      ++bad;
    }
    worst = std::max(worst, err / (lim > 0 ? lim : 1));
  }
};

// The tolerances of saep_kernels/testing.py, the reasons stated there (tests/
// test_tolerances.py keeps the two tables equal). Outputs and input gradients: one rounding of
// the dtype, and the summation-order slack of the compute type.
struct Tolerance {
  double rtol, atol;
};
inline Tolerance forward_tolerance(DType d) {
  switch (d) {
    case DType::F64: return {1e-12, 1e-12};
    case DType::F32: return {1e-5, 1e-5};
    case DType::F16: return {1.0 / 1024, 1e-5};
    case DType::BF16: return {1.0 / 128, 1e-5};
  }
  return {0, 0};
}
// Weight and bias gradients (sums over the batch and the grid; the kernels' partial sums are
// in the compute type): relative, with an atol of rtol times the largest magnitude.
inline double reduction_rtol(DType d) { return d == DType::F64 ? 1e-10 : 1e-4; }

struct Backend {
  std::string name;
  std::function<void(const FwdParams&)> fwd;
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
    const Tolerance tol = forward_tolerance(pr.dtype);
    Checker ch{"forward", tol.rtol, tol.atol,
               pr.pool == Pool::Max ? NonFinite::Exact : NonFinite::Mask};
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
  const int64_t parts = pr.batch;  // partial sums: one row per image
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
      const Tolerance tol = forward_tolerance(pr.dtype);
      Checker ch{"grad_x", tol.rtol, tol.atol, NonFinite::Mask};
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
    for (double v : ex.grad_w)
      if (std::isfinite(v)) scale_w = std::max(scale_w, std::fabs(v));
    for (double v : ex.grad_b)
      if (std::isfinite(v)) scale_b = std::max(scale_b, std::fabs(v));
    const double rtol = reduction_rtol(pr.dtype);
    Checker cw{need_x ? "grad_w" : "grad_w (weights only)", rtol, rtol * scale_w, NonFinite::Mask};
    Checker cb{need_x ? "grad_b" : "grad_b (weights only)", rtol, rtol * scale_b, NonFinite::Mask};
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

// How a problem is sized and laid out apart from its main axes (dtype, k, pool, residual):
// the standard problems take these in turn, so each meets every dtype and kernel size.
struct Variant {
  int64_t batch, channels, height, width, prefix;
  int layers;
  bool bias;
  int64_t pad_t, pad_b;  // layer strides: pad_t 0 and 8 keep 16-byte alignment, 5 breaks it
};
constexpr Variant kVariants[] = {
    // B   C    H  W  P  K  bias   pad_t pad_b
    {1, 70, 4, 4, 0, 1, true, 0, 0},     // even grid, channels past a 64-channel block
    {2, 3, 5, 7, 1, 2, true, 5, 16},     // odd non-square grid, CLS, misaligned tokens
    {1, 64, 1, 1, 0, 3, true, 8, 11},    // one pixel: every tap out of the grid
    {2, 16, 3, 2, 1, 1, false, 0, 16},   // odd height, no bias
    {1, 70, 7, 5, 1, 2, true, 5, 11},    // odd both ways, misaligned tokens and images
};

// The problems every backend is checked on: each dtype x kernel size x pool x residual with
// the next variant, then the empty batch, a 27x27 grid, a wide grid of 200 channels, grids
// with interior windows (whole patch in the grid) for every kernel size and pool, and more than one
// 256-channel block of the CPU max backward with a ragged last block.
inline std::vector<Problem> standard_problems() {
  std::vector<Problem> out;
  size_t n = 0;
  for (DType dt : {DType::F32, DType::F64, DType::BF16, DType::F16})
    for (int k : {1, 3, 5, 7})
      for (Pool pool : {Pool::Avg, Pool::Max})
        for (bool residual : {true, false}) {
          const Variant& v = kVariants[n++ % (sizeof(kVariants) / sizeof(kVariants[0]))];
          Problem pr{};
          pr.batch = v.batch;
          pr.channels = v.channels;
          pr.height = v.height;
          pr.width = v.width;
          pr.prefix = v.prefix;
          pr.layers = v.layers;
          pr.ksize = k;
          pr.residual = residual;
          pr.bias = v.bias;
          pr.pool = pool;
          pr.dtype = dt;
          pr.pad_t = v.pad_t;
          pr.pad_b = v.pad_b;
          out.push_back(pr);
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
  for (int k : {3, 5, 7})
    for (DType dt : {DType::F32, DType::BF16})
      for (Pool pool : {Pool::Avg, Pool::Max}) {
        Problem big = out.front();
        big.pool = pool;
        big.dtype = dt;
        big.ksize = k;
        big.height = 13;
        big.width = 16;
        big.channels = 40;
        big.prefix = 1;
        big.pad_t = 3;
        out.push_back(big);
      }
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
  // +Inf, -Inf and NaN inputs: max pooling gives the naive loops' very NaN/Inf values
  for (Pool pool : {Pool::Max, Pool::Avg})
    for (bool residual : {true, false})
      for (DType dt : {DType::F32, DType::BF16}) {
        Problem special = out.front();
        special.pool = pool;
        special.residual = residual;
        special.dtype = dt;
        special.ksize = 3;
        special.batch = 2;
        special.height = 6;
        special.width = 5;
        special.channels = 16;
        special.nonfinite = true;
        out.push_back(special);
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
