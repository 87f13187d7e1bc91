// cuda_bf16.h stand-in for the CPU simulation: __nv_bfloat16 on uint16 storage, bit-exact conversions.
#pragma once

#include <cstdint>
#include <cstring>

#include "simt_cpu.h"

struct __nv_bfloat16 {
  uint16_t __x;  // the high half of an IEEE binary32
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

// float -> bf16, round to nearest even; overflow to inf; NaN -> 0x7fff (as CUDA's conversion).
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fffu};
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}

inline float __bfloat162float(__nv_bfloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.__x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline uint16_t __bfloat16_as_ushort(__nv_bfloat16 v) { return v.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(uint16_t b) { return __nv_bfloat16{b}; }
