// Shared helpers for the seg3d_fast CUDA kernels: error checks, dtype codes and conversions, cp.async.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

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

// Dtype codes shared with seg3d_fast/backends/cuda.py.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum LabelType : int { kInt64 = 0, kInt32 = 1, kUInt8 = 2, kProb = 3 };

#if defined(__CUDACC__)  // device helpers (bindings.cpp, compiled by the host compiler, sees only the above)
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Asynchronous global->shared copy of `bytes` (4, 8 or 16; both addresses aligned to it). valid == false
// zero-fills the destination without reading the source (padding and tile edges).
__device__ __forceinline__ void cp_async(void* smem_dst, const void* gmem_src, int bytes, bool valid) {
  unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  int src_bytes = valid ? bytes : 0;
  if (bytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes));
  } else if (bytes == 8) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes));
  }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
#endif  // __CUDACC__

}  // namespace seg3d
