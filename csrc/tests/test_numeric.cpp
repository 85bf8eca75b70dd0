// bf16 / fp16 conversions of csrc/cpu/numeric.h: every 16-bit pattern round-trips, and
// float -> half rounds to nearest even, as torch does. Built twice: with the compiler's
// _Float16 where it has one, and with the portable bit-manipulation code (SAEP_PORTABLE_F16).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>

#include "../cpu/numeric.h"

using namespace saep::cpu;

namespace {

// exact reference: the nearest representable value, ties to the even mantissa
template <typename Decode>
uint16_t nearest(float f, Decode decode, uint16_t lo_bits, uint16_t hi_bits) {
  // search over the finite patterns of one sign: they are ordered by magnitude
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  const float a = std::fabs(f);
  uint16_t lo = lo_bits, hi = hi_bits;  // magnitude range to search
  while (hi - lo > 1) {
    const uint16_t mid = uint16_t((lo + hi) / 2);
    if (decode(mid) <= a) lo = mid; else hi = mid;
  }
  const float dl = a - decode(lo), dh = decode(hi) - a;
  uint16_t best = (dl < dh || (dl == dh && (lo & 1) == 0)) ? lo : hi;
  return uint16_t(best | sign);
}

int check_f16() {
  int bad = 0;
  for (uint32_t b = 0; b < 0x10000; ++b) {
    const float f = to_float(f16{uint16_t(b)});
    const uint16_t back = float_to_f16(f).bits;
    const bool is_nan = (b & 0x7c00) == 0x7c00 && (b & 0x3ff);
    if (is_nan ? !((back & 0x7c00) == 0x7c00 && (back & 0x3ff)) : back != b) {
      if (bad++ < 5) std::printf("f16 round trip 0x%04x -> %g -> 0x%04x\n", b, f, back);
    }
  }
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> mag(-30.f, 16.f);
  auto dec = [](uint16_t m) { return to_float(f16{m}); };
  for (int i = 0; i < 200000; ++i) {
    const float f = std::ldexp(1.0f + (rng() % 1000000) / 1e6f, int(mag(rng))) * (i % 2 ? 1 : -1);
    if (std::fabs(f) > 65504.f) continue;
    const uint16_t want = nearest(f, dec, 0x0000, 0x7bff);
    const uint16_t got = float_to_f16(f).bits;
    if (got != want && bad++ < 10) std::printf("f16(%.9g) = 0x%04x, want 0x%04x\n", f, got, want);
  }
  return bad;
}

int check_bf16() {
  int bad = 0;
  for (uint32_t b = 0; b < 0x10000; ++b) {
    const float f = to_float(bf16{uint16_t(b)});
    const uint16_t back = float_to_bf16(f).bits;
    const bool is_nan = (b & 0x7f80) == 0x7f80 && (b & 0x7f);
    if (is_nan ? !((back & 0x7f80) == 0x7f80 && (back & 0x7f)) : back != b) {
      if (bad++ < 5) std::printf("bf16 round trip 0x%04x -> %g -> 0x%04x\n", b, f, back);
    }
  }
  std::mt19937 rng(9);
  auto dec = [](uint16_t m) { return to_float(bf16{m}); };
  for (int i = 0; i < 200000; ++i) {
    uint32_t u = rng() & 0x7f7fffffu;  // finite
    float f;
    std::memcpy(&f, &u, 4);
    if (f >= 3.38e38f) continue;  // rounds past the largest bf16
    const uint16_t want = nearest(f, dec, 0x0000, 0x7f7f);
    const uint16_t got = float_to_bf16(f).bits;
    if (got != want && bad++ < 10) std::printf("bf16(%.9g) = 0x%04x, want 0x%04x\n", f, got, want);
  }
  return bad;
}

}  // namespace

int main() {
  const int bad = check_f16() + check_bf16();
#if defined(__FLT16_MAX__) && !defined(SAEP_PORTABLE_F16)
  const char* impl = "_Float16";
#else
  const char* impl = "portable";
#endif
  std::printf("numeric conversions (%s fp16): %s\n", impl, bad ? "FAILED" : "ok");
  return bad ? 1 : 0;
}
