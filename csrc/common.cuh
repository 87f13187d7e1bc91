// Shared helpers for the seg3d_fast CUDA kernels: error checks, dtype codes and conversions, cp.async.
#pragma once

// SEG3D_SIMT_CPU: the test suite compiles these sources with the host compiler against tests/cuda_sim/, which
// runs each CUDA thread as a CPU fiber (its cuda_*.h headers stand in for the toolkit's); see tests/cuda_sim/.
#if defined(SEG3D_SIMT_CPU)
#include "simt_cpu.h"
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace seg3d {

// Every CUDA runtime call and every launch goes through this: a failure becomes a C++ exception that
// pybind11 turns into a Python RuntimeError carrying the CUDA error text.
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so the next call starts clean
    throw std::runtime_error(std::string("seg3d_fast._cuda: ") + what + " failed: " + cudaGetErrorName(err) +
                             ": " + cudaGetErrorString(err));
  }
}
#define SEG3D_CHECK(call) ::seg3d::check_cuda((call), #call)
#define SEG3D_CHECK_LAUNCH(name) ::seg3d::check_cuda(cudaGetLastError(), "launch of " name)

// Select the tensor's device (our static cudart keeps its own current-device state, separate from torch's).
void use_device(int device);
// The device's multiprocessor count (queried once per device).
int multiprocessors(int device);
// The most shared memory one block may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin, queried once per device):
// 227 KiB on sm_90, 163 KiB on sm_80, but 99 KiB on sm_86 / sm_89 / sm_120 cards (RTX 30xx/40xx, A10, L4, L40).
int max_shared_memory(int device);

// Dtype codes shared with seg3d_fast/backends/cuda.py.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
// kProb: class probabilities in the logits' dtype; kProbF32: in float32 (with fp16 / bf16 logits: not rounded)
enum LabelType : int { kInt64 = 0, kInt32 = 1, kUInt8 = 2, kProb = 3, kProbF32 = 4 };
__host__ __device__ __forceinline__ bool is_probability(int label_type) {
  return label_type == kProb || label_type == kProbF32;
}

// Kernel launch and the dynamic shared-memory array, spelled so that the CPU simulation can supply both.
#if defined(SEG3D_SIMT_CPU)
#define SEG3D_LAUNCH(kernel, grid, block, smem, stream) ::simt::launch(kernel, grid, block, smem, stream)
#define SEG3D_DYNAMIC_SMEM(name) unsigned char* name = ::simt::dynamic_smem()
#else
#define SEG3D_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#define SEG3D_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

// Device helpers (bindings.cpp, compiled by the host compiler, sees only the above).
#if defined(__CUDACC__) || defined(SEG3D_SIMT_CPU)
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Asynchronous global->shared copy of `bytes` (4, 8 or 16; both addresses aligned to it). valid == false
// zero-fills the destination without reading the source (padding and tile edges). 2 bytes (an odd channel count
// of fp16/bf16, first-generation kernels only): cp.async has no 2-byte form, so a plain load and store, which the
// pipeline's barriers order like a landed copy.
__device__ __forceinline__ void cp_async(void* smem_dst, const void* gmem_src, int bytes, bool valid) {
  if (bytes == 2) {
#if defined(SEG3D_SIMT_CPU)
    *static_cast<uint16_t*>(smem_dst) = valid ? *static_cast<const uint16_t*>(gmem_src) : uint16_t{0};
#else
    unsigned short v = 0;  // explicit state spaces: the pointers are generic, a plain C++ copy would be generic too
    if (valid) asm("ld.global.nc.u16 %0, [%1];\n" : "=h"(v) : "l"(gmem_src));
    asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(static_cast<unsigned>(__cvta_generic_to_shared(smem_dst))), "h"(v));
#endif
    return;
  }
#if defined(SEG3D_SIMT_CPU)
  ::simt::cp_async(smem_dst, gmem_src, bytes, valid);
#else
  unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  int src_bytes = valid ? bytes : 0;
  if (bytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes));
  } else if (bytes == 8) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes));
  }
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(SEG3D_SIMT_CPU)
  ::simt::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
#if defined(SEG3D_SIMT_CPU)
  ::simt::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Warp-wide tensor-core operations (mma.sync, sm_80+), fragments as in the PTX ISA ("Matrix fragments for mma.m16n8k16
// / m16n8k8"); lane = 4 g + t.
// ldmatrix .x4: lane l gives the address of row l % 8 of 8x8 b16 matrix l / 8 (16 bytes, 16-byte aligned, shared
// memory); r[i] receives matrix i's elements (row g, columns 2t, 2t + 1), transposed with TRANS.
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
#if defined(SEG3D_SIMT_CPU)
  ::simt::ldmatrix_x4(r, smem_row, TRANS);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  if constexpr (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
#endif
}

// d += a b with a 16x16 (row-major fragment, 4 registers of 2 x T), b 16x8 (column fragment, 2 registers), d 16x8 fp32.
template <class T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "fp16 or bf16");
#if defined(SEG3D_SIMT_CPU)
  ::simt::mma_m16n8k16(d, a, b, std::is_same<T, __nv_bfloat16>::value);
#else
  if constexpr (std::is_same<T, __half>::value)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// d += a b with a 16x8 tf32 (a[0] (g, t), a[1] (g + 8, t), a[2] (g, t + 4), a[3] (g + 8, t + 4)), b 8x8 tf32
// (b[0] (t, g), b[1] (t + 4, g)), d 16x8 fp32.
__device__ __forceinline__ void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(SEG3D_SIMT_CPU)
  ::simt::mma_m16n8k8_tf32(d, a, b);
#else
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// fp32 -> tf32 (round to nearest, ties away from zero), as a 32-bit pattern for mma_1688_tf32.
__device__ __forceinline__ uint32_t to_tf32(float x) {
#if defined(SEG3D_SIMT_CPU)
  return ::simt::cvt_rna_tf32(x);
#else
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
#endif
}
#endif  // __CUDACC__ || SEG3D_SIMT_CPU

}  // namespace seg3d
