// saep-kernels CPU: the storage types of the op and their conversions to and from the
// compute type. Small branch-free inline functions, so channel loops around them vectorise.
#pragma once

#include <cstdint>
#include <cstring>

namespace saep {
namespace cpu {

// bfloat16 and float16 as raw bits (the layout of torch.bfloat16 / torch.float16).
struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// ---- bfloat16: the top half of a float; rounding to nearest even, NaN kept quiet
inline float to_float(bf16 v) { return bits_to_float(uint32_t(v.bits) << 16); }
inline bf16 float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return bf16{uint16_t(f != f ? 0x7fc0u : rounded)};
}

// ---- float16
#if defined(__FLT16_MAX__) && !defined(SAEP_PORTABLE_F16)
// The compiler has an arithmetic _Float16 (GCC >= 12, Clang >= 15 on x86-64 and AArch64):
// conversions become vcvtph2ps/vcvtps2ph where the target has them.
inline float to_float(f16 v) {
  _Float16 h;
  std::memcpy(&h, &v.bits, sizeof h);
  return static_cast<float>(h);
}
inline f16 float_to_f16(float f) {
  _Float16 h = static_cast<_Float16>(f);
  f16 out;
  std::memcpy(&out.bits, &h, sizeof h);
  return out;
}
#else
// IEEE binary16 by bit manipulation (exact, round to nearest even); SAEP_PORTABLE_F16
// selects it everywhere, so the tests check it against _Float16.
inline float to_float(f16 v) {
  const uint32_t sign = uint32_t(v.bits & 0x8000u) << 16;
  const uint32_t em = v.bits & 0x7fffu;
  uint32_t out;
  if (em >= 0x7c00u) {
    out = 0x7f800000u | ((em & 0x3ffu) << 13);  // inf / nan
  } else if (em >= 0x0400u) {
    out = (em << 13) + (uint32_t(127 - 15) << 23);  // normal
  } else {
    // subnormal (or zero): value = em * 2^-24
    return bits_to_float(sign | float_to_bits(float(em) * 5.9604644775390625e-08f));
  }
  return bits_to_float(sign | out);
}
inline f16 float_to_f16(float f) {
  uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  uint16_t h;
  if (u > 0x7f800000u) {
    h = 0x7e00u;  // nan
  } else if (u >= 0x477ff000u) {
    h = 0x7c00u;  // rounds to inf (>= 65520)
  } else if (u < 0x38800000u) {
    // result is subnormal or zero: round(|f| * 2^24) with ties to even via float arithmetic
    float scaled = bits_to_float(u) * 16777216.0f;
    float r = scaled + 12582912.0f;  // 1.5 * 2^23: rounds to an integer, ties to even
    h = uint16_t(float_to_bits(r) - float_to_bits(12582912.0f));
  } else {
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += (uint32_t(15 - 127) << 23) + 0xfffu + mant_odd;
    h = uint16_t(u >> 13);
  }
  return f16{uint16_t(sign | h)};
}
#endif

// ---- uniform load/store in the compute type
template <typename T, typename acc_t>
struct Convert;

template <typename acc_t>
struct Convert<float, acc_t> {
  static acc_t load(float v) { return acc_t(v); }
  static float store(acc_t v) { return float(v); }
};
template <typename acc_t>
struct Convert<double, acc_t> {
  static acc_t load(double v) { return acc_t(v); }
  static double store(acc_t v) { return double(v); }
};
template <typename acc_t>
struct Convert<bf16, acc_t> {
  static acc_t load(bf16 v) { return acc_t(to_float(v)); }
  static bf16 store(acc_t v) { return float_to_bf16(float(v)); }
};
template <typename acc_t>
struct Convert<f16, acc_t> {
  static acc_t load(f16 v) { return acc_t(to_float(v)); }
  static f16 store(acc_t v) { return float_to_f16(float(v)); }
};

}  // namespace cpu
}  // namespace saep
