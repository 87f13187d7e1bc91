// mma.h (nvcuda::wmma) stand-in for the CPU simulation: 16x16 tiles, fp16/bf16 k16 and tf32 k8, fp32 accumulators.
//
// WMMA fragment layouts are unspecified, so any distribution of the tile over the 32 lanes is a valid model. Here
// lane l owns accumulator row l / 2, columns 8 (l % 2) .. 8 (l % 2) + 7 (8 elements, as on the hardware); its
// matrix_a fragment is A's row l / 2 (K elements) and its matrix_b fragment B's columns 8 (l % 2) .. + 7 (8 K
// elements, x[j * K + k]). Every lane computes only its own accumulator elements, so no warp collective is needed.
// Checks what the API requires: pointers 256-bit aligned, ldm a multiple of 16 bytes; tf32 operands already rounded
// by __float_to_tf32 (the low 13 bits zero).
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "simt_cpu.h"

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
namespace precision {
struct tf32 {};
}
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
template <class T> struct storage { using type = T; };
template <> struct storage<precision::tf32> { using type = float; };

inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class Use, int M, int N, int K> struct count;
template <int M, int N, int K> struct count<matrix_a, M, N, K> { static constexpr int value = K; };
template <int M, int N, int K> struct count<matrix_b, M, N, K> { static constexpr int value = 8 * K; };
template <int M, int N, int K> struct count<accumulator, M, N, K> { static constexpr int value = 8; };

inline int lane() { return ::simt::detail::g_cur->lane; }

inline void check_ptr(const void* p, unsigned ldm, size_t elem, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    ::simt::kernel_error("wmma::%s: pointer %p is not 256-bit aligned", what, p);
  if ((ldm * elem) % 16 != 0)
    ::simt::kernel_error("wmma::%s: ldm %u is not a multiple of 16 bytes", what, ldm);
}
inline float tf32_operand(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x1fffu) && (u & 0x7f800000u) != 0x7f800000u)
    ::simt::kernel_error("wmma::mma_sync (tf32): operand %a (0x%08x) was not rounded by __float_to_tf32", v, u);
  return v;
}
}  // namespace detail

template <class Use, int M, int N, int K, class T, class Layout = void>
class fragment {
  static_assert(M == 16 && N == 16 && (K == 16 || K == 8), "simulated wmma: m16n16k16 and m16n16k8 only");

 public:
  using element_type = typename detail::storage<T>::type;
  enum { num_elements = detail::count<Use, M, N, K>::value };
  element_type x[num_elements];
};

template <class Use, int M, int N, int K, class T, class L>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, typename detail::storage<T>::type v) {
  for (int e = 0; e < f.num_elements; ++e) f.x[e] = v;
}

template <int M, int N, int K, class T, class L>
inline void load_matrix_sync(fragment<matrix_a, M, N, K, T, L>& f, const typename detail::storage<T>::type* p,
                             unsigned ldm) {
  detail::check_ptr(p, ldm, sizeof(*p), "load_matrix_sync(matrix_a)");
  const int r = detail::lane() / 2;
  for (int k = 0; k < K; ++k) f.x[k] = std::is_same<L, row_major>::value ? p[r * ldm + k] : p[k * ldm + r];
}

template <int M, int N, int K, class T, class L>
inline void load_matrix_sync(fragment<matrix_b, M, N, K, T, L>& f, const typename detail::storage<T>::type* p,
                             unsigned ldm) {
  detail::check_ptr(p, ldm, sizeof(*p), "load_matrix_sync(matrix_b)");
  const int c0 = (detail::lane() % 2) * 8;
  for (int j = 0; j < 8; ++j)
    for (int k = 0; k < K; ++k)
      f.x[j * K + k] = std::is_same<L, row_major>::value ? p[k * ldm + c0 + j] : p[(c0 + j) * ldm + k];
}

template <int M, int N, int K>
inline void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm, layout_t layout) {
  detail::check_ptr(p, ldm, sizeof(float), "load_matrix_sync(accumulator)");
  const int r = detail::lane() / 2, c0 = (detail::lane() % 2) * 8;
  for (int j = 0; j < 8; ++j) f.x[j] = layout == mem_row_major ? p[r * ldm + c0 + j] : p[(c0 + j) * ldm + r];
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm,
                              layout_t layout) {
  detail::check_ptr(p, ldm, sizeof(float), "store_matrix_sync");
  const int r = detail::lane() / 2, c0 = (detail::lane() % 2) * 8;
  for (int j = 0; j < 8; ++j) (layout == mem_row_major ? p[r * ldm + c0 + j] : p[(c0 + j) * ldm + r]) = f.x[j];
}

// d = a b + c, fp32 accumulation (products of fp16/bf16/tf32 values are exact in fp32).
template <int M, int N, int K, class T, class LA, class LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  constexpr bool kTF32 = std::is_same<T, precision::tf32>::value;
  float av[K], bv[8 * K];
  for (int k = 0; k < K; ++k) {
    if constexpr (kTF32) av[k] = detail::tf32_operand(a.x[k]);
    else av[k] = detail::to_float(a.x[k]);
  }
  for (int e = 0; e < 8 * K; ++e) {
    if constexpr (kTF32) bv[e] = detail::tf32_operand(b.x[e]);
    else bv[e] = detail::to_float(b.x[e]);
  }
  for (int j = 0; j < 8; ++j) {
    float s = c.x[j];
    for (int k = 0; k < K; ++k) s += av[k] * bv[j * K + k];
    d.x[j] = s;
  }
}

inline float __float_to_tf32(float v) {
  const uint32_t u = ::simt::cvt_rna_tf32(v);
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace wmma
}  // namespace nvcuda
