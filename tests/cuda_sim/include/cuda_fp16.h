// cuda_fp16.h stand-in for the CPU simulation: __half on uint16 storage, bit-exact IEEE conversions.
#pragma once

#include <cstdint>
#include <cstring>

#include "simt_cpu.h"

struct __half {
  uint16_t __x;  // IEEE binary16 bits
};
struct __half2 {
  __half x, y;
};

// float -> half, round to nearest even; overflow to inf; NaN -> 0x7fff (as CUDA's conversion).
inline __half __float2half_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  uint32_t h;
  if (a > 0x7f800000u) {
    return __half{0x7fffu};
  } else if (a >= 0x477ff000u) {  // >= 65520 (halfway from 65504 to 2^16): inf
    h = 0x7c00u;
  } else if (a >= 0x38800000u) {  // >= 2^-14: normal
    const uint32_t m = a & 0x7fffffu, rem = m & 0x1fffu;
    h = ((((a >> 23) - 127 + 15) << 10) | (m >> 13));
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry moves into the exponent correctly
  } else if (a > 0x33000000u) {  // (2^-25, 2^-14): subnormal, units of 2^-24
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;
    const int shift = 126 - static_cast<int>(a >> 23);  // 14..24
    h = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) ++h;
  } else {
    h = 0;  // <= 2^-25 rounds to zero (2^-25 itself is a tie, to even)
  }
  return __half{static_cast<uint16_t>(sign | h)};
}

inline float __half2float(__half v) {
  const uint32_t h = v.__x, sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  uint32_t u;
  if (e == 0) {
    if (m == 0) {
      u = sign;
    } else {
      float f = static_cast<float>(m) * 5.9604644775390625e-08f;  // m * 2^-24, exact
      std::memcpy(&u, &f, 4);
      u |= sign;
    }
  } else if (e == 31) {
    u = sign | 0x7f800000u | (m << 13);
  } else {
    u = sign | ((e + 112) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline __half __float2half(float f) { return __float2half_rn(f); }
inline uint16_t __half_as_ushort(__half v) { return v.__x; }
inline __half __ushort_as_half(uint16_t b) { return __half{b}; }
