// saep-kernels C++ tests: runs a backend's kernels on the standard problems and compares
// every output with the naive loops (naive.h). Used by the CPU kernel test and the emulated
// CUDA kernel test.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
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
  const void* data() const {
    return dbl ? static_cast<const void*>(d.data()) : static_cast<const void*>(f.data());
  }
  double get(size_t i) const { return dbl ? d[i] : double(f[i]); }
  void set(size_t i, double v) {
    if (dbl) d[i] = v; else f[i] = float(v);
  }
};

// The kernels take the weights in the compute type, tap-major, and the bias in the compute
// type: `weight` and `bias` as the kernels take them, `in`'s rounded to what they hold.
inline void kernel_weights(const Problem& pr, Inputs& in, ComputeBuffer& weight,
                           ComputeBuffer& bias) {
  const int taps = pr.ksize * pr.ksize;
  const int64_t KC = pr.kc();
  for (int64_t kc = 0; kc < KC; ++kc)
    for (int t = 0; t < taps; ++t) {
      weight.set(size_t(t * KC + kc), in.weight[size_t(kc * taps + t)]);
      in.weight[size_t(kc * taps + t)] = weight.get(size_t(t * KC + kc));
    }
  for (int64_t kc = 0; kc < KC; ++kc) {
    bias.set(size_t(kc), in.bias[size_t(kc)]);
    in.bias[size_t(kc)] = bias.get(size_t(kc));
  }
}

// Runs forward and backward of `be` on `pr` and compares with the naive loops. Returns the
// number of mismatching values (0 = pass) and prints a line per failing tensor.
inline int64_t check_problem(const Backend& be, const Problem& pr, uint32_t seed) {
  Inputs in = make_inputs(pr, seed);
  const bool dbl = pr.dtype == DType::F64;
  const int k = pr.ksize, taps = k * k;
  const int64_t KC = pr.kc(), H = pr.height, W = pr.width, C = pr.channels;
  ComputeBuffer weight(dbl, size_t(taps * KC)), bias(dbl, size_t(KC));
  kernel_weights(pr, in, weight, bias);

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
    // without the argmax (inference: nothing to backpropagate), bitwise the same outputs
    Buffer out_only(pr.dtype, out.size());
    FwdParams fo = fp;
    fo.out = out_only.data();
    fo.argmax = nullptr;
    be.fwd(fo);
    Checker same{"forward without the argmax bitwise equal", 0, 0};
    same(out.bytes == out_only.bytes ? 0 : 1, 0);
    report(same);
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
// with interior windows (whole patch in the grid) for every kernel size and pool, and 300
// channels for max pooling (many vector groups of the staged CPU kernels, and a tail of channels
// past the last full group).
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
  // +Inf, -Inf and NaN inputs: max pooling gives the naive loops' very NaN/Inf values; 16
  // channels (a tail past the last full bf16 group) and 32 (every channel in full groups)
  for (Pool pool : {Pool::Max, Pool::Avg})
    for (bool residual : {true, false})
      for (DType dt : {DType::F32, DType::BF16})
        for (int64_t channels : {16, 32}) {
        Problem special = out.front();
        special.pool = pool;
        special.residual = residual;
        special.dtype = dt;
        special.ksize = 3;
        special.batch = 2;
        special.height = 6;
        special.width = 5;
        special.channels = channels;
        special.nonfinite = true;
        out.push_back(special);
      }
  return out;
}

// ---- packed inputs (FwdParams::images, docs/op.md section 6): images of different grids, each
// after its own prefix tokens, one after the other in each layer's tokens ([1, N, C], token
// stride C + pad_t), their outputs one after the other ([1, sum of windows, K*C]). Checked
// image by image against the naive loops on that image alone, so a tap that reads a
// neighbouring image, an output or gradient written to another image's place, or a partial
// sum in another image's row shows.

struct PackedImage {
  int64_t height, width, prefix;
};

struct PackedProblem {
  std::vector<PackedImage> images;
  Problem base;  // channels, layers, ksize, residual, bias, pool, dtype, pad_t (the rest unused)

  std::string name() const {
    static const char* dt[] = {"f32", "f16", "bf16", "f64"};
    char buf[128];
    std::snprintf(buf, sizeof buf, "packed %s C%lld K%d k%d %s%s%s strided=%d images",
                  dt[int(base.dtype)], (long long)base.channels, base.layers, base.ksize,
                  base.pool == Pool::Avg ? "avg" : "max", base.residual ? " res" : "",
                  base.bias ? " bias" : "", int(base.pad_t > 0));
    std::string s = buf;
    for (const PackedImage& im : images)
      s += " " + std::to_string(im.height) + "x" + std::to_string(im.width) +
           (im.prefix ? "+" + std::to_string(im.prefix) : "");
    return s;
  }
  // all images one grid with the same prefix: the fixed-grid op takes the same tensors
  bool one_grid() const {
    for (const PackedImage& im : images)
      if (im.height != images[0].height || im.width != images[0].width ||
          im.prefix != images[0].prefix)
        return false;
    return !images.empty();
  }
};

// The gradients a backward call wrote.
struct Grads {
  std::vector<Buffer> gx;  // per layer, or none
  ComputeBuffer gw, gb;    // the partial sums, one row per image
};

inline bool same_bytes(const void* a, const void* b, size_t n) {
  return n == 0 || std::memcmp(a, b, n) == 0;
}

// Runs forward and backward of `be` on the packed problem and compares with the naive loops
// image by image. Prefix tokens and the padding between tokens hold NaN, so that a kernel
// reading them shows. When all images have one grid, the fixed-grid op on the same tensors must
// give bitwise the same outputs, argmax and gradients (the same arithmetic in the same order).
inline int64_t check_packed(const Backend& be, const PackedProblem& pp, uint32_t seed) {
  const Problem& base = pp.base;
  const int64_t n = int64_t(pp.images.size());
  const bool dbl = base.dtype == DType::F64;
  const int k = base.ksize, taps = k * k;
  const int64_t C = base.channels, KC = base.kc(), st = base.stride_t();
  // the image table, and each image as a naive-loop problem (its pixel (0, 0) at token
  // `prefix` of batch row 0)
  std::vector<int64_t> table(size_t(n * kImageFields));
  std::vector<Problem> single(size_t(n), base);
  int64_t N = 0, windows = 0;
  for (int64_t i = 0; i < n; ++i) {
    const PackedImage& im = pp.images[size_t(i)];
    int64_t* row = table.data() + i * kImageFields;
    row[kImageHeight] = im.height;
    row[kImageWidth] = im.width;
    row[kImageFirstToken] = N + im.prefix;
    row[kImageFirstWindow] = windows;
    Problem& pr = single[size_t(i)];
    pr.batch = 1;
    pr.height = im.height;
    pr.width = im.width;
    pr.prefix = N + im.prefix;
    pr.pad_b = 0;
    N += im.prefix + im.height * im.width;
    windows += pr.windows();
  }
  auto image_of_token = [&](int64_t tok, int64_t& pixel) {  // -1 for a prefix token
    for (int64_t i = 0; i < n; ++i) {
      const int64_t* row = table.data() + i * kImageFields;
      pixel = tok - row[kImageFirstToken];
      if (pixel >= 0 && pixel < row[kImageHeight] * row[kImageWidth]) return i;
    }
    return int64_t(-1);
  };

  std::mt19937 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  Inputs in{{}, {}, {}, Buffer(base.dtype, windows * KC)};
  for (int l = 0; l < base.layers; ++l) {
    Buffer buf(base.dtype, N * st);
    for (int64_t tok = 0; tok < N; ++tok) {
      int64_t pixel;
      const bool grid = image_of_token(tok, pixel) >= 0;
      for (int64_t c = 0; c < st; ++c) buf.set(tok * st + c, grid && c < C ? normal(rng) : NAN);
    }
    in.layers.push_back(std::move(buf));
  }
  in.weight.resize(size_t(KC * taps));
  for (auto& w : in.weight) w = normal(rng) / k;
  in.bias.assign(size_t(KC), 0.0);
  if (base.bias)
    for (auto& b : in.bias) b = normal(rng);
  for (int64_t i = 0; i < in.grad_out.size(); ++i) in.grad_out.set(i, normal(rng));
  ComputeBuffer weight(dbl, size_t(taps * KC)), bias(dbl, size_t(KC));
  kernel_weights(base, in, weight, bias);

  FwdParams fp{};
  fp.g = base.geometry();
  fp.g.batch = n;
  fp.g.height = fp.g.width = fp.g.prefix = 0;
  for (int l = 0; l < base.layers; ++l) {
    fp.x.data[l] = in.layers[size_t(l)].data();
    fp.x.stride_b[l] = N * st;
    fp.x.stride_t[l] = st;
  }
  fp.weight = weight.data();
  fp.bias = base.bias ? bias.data() : nullptr;
  fp.images = table.data();
  Buffer out(base.dtype, windows * KC);
  std::vector<uint8_t> argmax(size_t(windows * KC), 255);
  fp.out = out.data();
  fp.argmax = base.pool == Pool::Max ? argmax.data() : nullptr;
  be.fwd(fp);

  // the naive loops, image by image (given the kernel's argmax of the image's windows)
  std::vector<Expected> ex;
  for (int64_t i = 0; i < n; ++i) {
    const Problem& pr = single[size_t(i)];
    const int64_t w0 = table[size_t(i * kImageFields + kImageFirstWindow)];
    Inputs one{in.layers, in.weight, in.bias, Buffer(base.dtype, pr.windows() * KC)};
    std::memcpy(one.grad_out.data(), in.grad_out.bytes.data() + w0 * KC * dtype_size(base.dtype),
                one.grad_out.bytes.size());
    const std::vector<uint8_t> am(argmax.begin() + w0 * KC,
                                  argmax.begin() + (w0 + pr.windows()) * KC);
    ex.push_back(naive(pr, one, base.pool == Pool::Max ? &am : nullptr));
  }

  int64_t bad = 0;
  const std::string name = pp.name();
  auto report = [&](Checker& ch) {
    if (ch.bad) std::printf("  FAIL %s [%s]: %lld of %lld values off\n", name.c_str(),
                            ch.what.c_str(), (long long)ch.bad, (long long)ch.total);
    bad += ch.bad;
  };
  {
    const Tolerance tol = forward_tolerance(base.dtype);
    Checker ch{"forward", tol.rtol, tol.atol, NonFinite::Mask};
    Checker codes{"argmax in 0..3 and at an in-grid position of the image", 0, 0};
    for (int64_t i = 0; i < n; ++i) {
      const Problem& pr = single[size_t(i)];
      const int64_t w0 = table[size_t(i * kImageFields + kImageFirstWindow)];
      for (int64_t w = 0; w < pr.windows(); ++w)
        for (int64_t kc = 0; kc < KC; ++kc) {
          ch(out.get((w0 + w) * KC + kc), ex[size_t(i)].out[size_t(w * KC + kc)]);
          if (base.pool != Pool::Max) continue;
          const int code = argmax[size_t((w0 + w) * KC + kc)];
          const int64_t r = 2 * (w / pr.ow()) + code / 2, c = 2 * (w % pr.ow()) + code % 2;
          codes(code <= 3 && r < pr.height && c < pr.width ? 0.0 : 1.0, 0.0);
        }
    }
    report(ch);
    if (base.pool == Pool::Max) report(codes);
  }

  Buffer sentinel_buf(base.dtype, 1);
  sentinel_buf.set(0, 1234.5);
  const double sentinel = sentinel_buf.get(0);
  // the backward on params `bp` (grad_x when need_x), into fresh buffers
  auto backward = [&](BwdParams bp, int64_t layer_elems, bool need_x) {
    Grads gr{{}, ComputeBuffer(dbl, size_t(n * taps * KC)), ComputeBuffer(dbl, size_t(n * KC))};
    for (int l = 0; l < base.layers && need_x; ++l) {
      gr.gx.emplace_back(base.dtype, layer_elems);
      for (int64_t e = 0; e < layer_elems; ++e) gr.gx.back().set(e, sentinel);
    }
    for (int l = 0; l < base.layers && need_x; ++l) bp.grad_x[l] = gr.gx[size_t(l)].data();
    bp.grad_w_part = gr.gw.data();
    bp.grad_b_part = gr.gb.data();
    be.bwd(bp);
    return gr;
  };
  BwdParams bp{};
  bp.g = fp.g;
  bp.x = fp.x;
  bp.grad_out = in.grad_out.data();
  bp.gy_stride_b = windows * KC;
  bp.gy_stride_t = KC;
  bp.argmax = fp.argmax;
  bp.weight = weight.data();
  bp.images = table.data();
  std::vector<Grads> packed;  // all gradients, then weight and bias only
  for (int mode = 0; mode < 2; ++mode) {
    const bool need_x = mode == 0;
    packed.push_back(backward(bp, N * C, need_x));
    const Grads& gr = packed.back();
    if (need_x) {
      const Tolerance tol = forward_tolerance(base.dtype);
      Checker ch{"grad_x", tol.rtol, tol.atol, NonFinite::Mask};
      Checker prefix{"grad_x prefix rows untouched", 0, 0};
      for (int l = 0; l < base.layers; ++l)
        for (int64_t tok = 0; tok < N; ++tok) {
          int64_t pixel;
          const int64_t i = image_of_token(tok, pixel);
          for (int64_t c = 0; c < C; ++c) {
            const double got = gr.gx[size_t(l)].get(tok * C + c);
            if (i < 0) {
              prefix(got, sentinel);
            } else {
              const Problem& pr = single[size_t(i)];
              ch(got, ex[size_t(i)].grad_x[size_t((l * pr.height * pr.width + pixel) * C + c)]);
            }
          }
        }
      report(ch);
      report(prefix);
    }
    // each image's row of the partial sums against its own gradients
    const double rtol = reduction_rtol(base.dtype);
    Checker cw{need_x ? "grad_w row of each image" : "grad_w row of each image (weights only)",
               rtol, 0, NonFinite::Mask};
    Checker cb{need_x ? "grad_b row of each image" : "grad_b row of each image (weights only)",
               rtol, 0, NonFinite::Mask};
    for (int64_t i = 0; i < n; ++i) {
      double scale_w = 1, scale_b = 1;
      for (double v : ex[size_t(i)].grad_w)
        if (std::isfinite(v)) scale_w = std::max(scale_w, std::fabs(v));
      for (double v : ex[size_t(i)].grad_b)
        if (std::isfinite(v)) scale_b = std::max(scale_b, std::fabs(v));
      cw.atol = rtol * scale_w;
      cb.atol = rtol * scale_b;
      for (int64_t e = 0; e < taps * KC; ++e)
        cw(gr.gw.get(size_t(i * taps * KC + e)), ex[size_t(i)].grad_w[size_t(e)]);
      for (int64_t e = 0; e < KC; ++e)
        cb(gr.gb.get(size_t(i * KC + e)), ex[size_t(i)].grad_b[size_t(e)]);
    }
    report(cw);
    report(cb);
  }

  if (pp.one_grid()) {
    // the fixed-grid op on the same tensors: batch n of the images' grid after `prefix` tokens
    const PackedImage& im = pp.images[0];
    const int64_t T = im.prefix + im.height * im.width;
    FwdParams ff = fp;
    ff.g.height = im.height;
    ff.g.width = im.width;
    ff.g.prefix = im.prefix;
    ff.images = nullptr;
    for (int l = 0; l < base.layers; ++l) ff.x.stride_b[l] = T * st;
    Buffer out2(base.dtype, windows * KC);
    std::vector<uint8_t> argmax2(size_t(windows * KC), 255);
    ff.out = out2.data();
    ff.argmax = base.pool == Pool::Max ? argmax2.data() : nullptr;
    be.fwd(ff);
    BwdParams bf = bp;
    bf.g = ff.g;
    bf.x = ff.x;
    bf.gy_stride_b = ff.g.windows() * KC;
    bf.images = nullptr;
    const Grads fixed = backward(bf, N * C, true);
    const Grads& pk = packed[0];
    Checker same{"bitwise equal to the fixed-grid op (out, argmax, grad_x, grad_w, grad_b)", 0, 0};
    same(same_bytes(out.data(), out2.data(), out.bytes.size()) ? 0 : 1, 0);
    same(argmax == argmax2 ? 0 : 1, 0);
    for (int l = 0; l < base.layers; ++l)
      same(pk.gx[size_t(l)].bytes == fixed.gx[size_t(l)].bytes ? 0 : 1, 0);
    same(same_bytes(pk.gw.data(), fixed.gw.data(), size_t(n * taps * KC * compute_size(base.dtype)))
             ? 0 : 1, 0);
    same(same_bytes(pk.gb.data(), fixed.gb.data(), size_t(n * KC * compute_size(base.dtype)))
             ? 0 : 1, 0);
    report(same);
  }
  return bad;
}

// The packed problems: each dtype x kernel size x pool with the next mix of images and the next
// layout (16-byte vectors or one channel a thread in the CUDA kernels), then mixes of one
// grid checked bitwise against the fixed-grid op, and no images at all.
inline std::vector<PackedProblem> packed_problems() {
  const std::vector<std::vector<PackedImage>> mixes = {
      // odd, non-square, 1xN and Nx1 grids, a single pixel, different prefixes
      {{3, 5, 0}, {4, 4, 1}, {1, 6, 0}, {7, 2, 2}, {1, 1, 0}},
      {{5, 7, 1}},  // a single image
      // a grid of several tiles both ways, then grids smaller than a tile
      {{13, 17, 0}, {2, 3, 1}, {6, 1, 0}},
      {{2, 2, 0}, {9, 4, 2}, {1, 3, 0}, {3, 3, 1}},
  };
  struct Layout {
    int64_t channels, pad_t;
    int layers;
    bool bias;
  };
  const Layout layouts[] = {
      {16, 0, 2, true},   // 16-byte vectors for every dtype
      {3, 0, 1, true},    // one channel a thread
      {10, 3, 2, false},  // misaligned tokens, no bias
  };
  std::vector<PackedProblem> out;
  size_t n = 0;
  for (DType dt : {DType::F32, DType::F64, DType::BF16, DType::F16})
    for (int k : {1, 3, 5, 7})
      for (Pool pool : {Pool::Avg, Pool::Max}) {
        const Layout& lay = layouts[n % 3];
        PackedProblem pp;
        pp.images = mixes[n % mixes.size()];
        Problem& pr = pp.base;
        pr = Problem{};
        pr.channels = lay.channels;
        pr.pad_t = lay.pad_t;
        pr.layers = lay.layers;
        pr.bias = lay.bias;
        pr.ksize = k;
        pr.pool = pool;
        pr.dtype = dt;
        pr.residual = (n / 2 + n / 8) % 2 == 0;
        out.push_back(pp);
        ++n;
      }
  struct Twin {
    PackedImage image;
    int64_t count, channels, pad_t;
    int ksize;
    DType dtype;
    Pool pool;
  };
  const Twin twins[] = {
      {{5, 7, 1}, 3, 16, 0, 3, DType::F32, Pool::Avg},
      {{5, 7, 1}, 3, 16, 0, 3, DType::BF16, Pool::Max},
      {{13, 17, 0}, 2, 16, 0, 5, DType::F32, Pool::Max},   // several tiles an image
      {{13, 17, 0}, 2, 24, 0, 5, DType::BF16, Pool::Avg},
      {{4, 6, 2}, 2, 3, 5, 7, DType::F64, Pool::Avg},      // one channel a thread
  };
  for (const Twin& tw : twins) {
    PackedProblem pp;
    pp.images.assign(size_t(tw.count), tw.image);
    pp.base = out.front().base;
    pp.base.channels = tw.channels;
    pp.base.pad_t = tw.pad_t;
    pp.base.ksize = tw.ksize;
    pp.base.dtype = tw.dtype;
    pp.base.pool = tw.pool;
    pp.base.residual = true;
    out.push_back(pp);
  }
  PackedProblem none = out.front();
  none.images.clear();
  out.push_back(none);
  return out;
}

inline int run_all(const Backend& be) {
  int failed = 0;
  const auto problems = standard_problems();
  uint32_t seed = 1;
  for (const Problem& pr : problems) {
    if (check_problem(be, pr, seed++) != 0) ++failed;
  }
  const auto packed = packed_problems();
  int failed_packed = 0;
  for (const PackedProblem& pp : packed) {
    if (check_packed(be, pp, seed++) != 0) ++failed_packed;
  }
  std::printf("%s: %d of %zu problems failed, %d of %zu packed problems failed\n",
              be.name.c_str(), failed, problems.size(), failed_packed, packed.size());
  return failed == 0 && failed_packed == 0 ? 0 : 1;
}

}  // namespace test
}  // namespace saep
