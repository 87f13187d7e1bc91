// cuda_runtime.h stand-in for the CPU simulation: the runtime API calls the kernels' host code makes.
// One device (index 0). Launches run synchronously (simt_cpu.h); streams are ignored.
#pragma once

#include "simt_cpu.h"

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorLaunchFailure = 719,
};
typedef cudaError_t cudaError;

enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};

// The simulated device is an H100 SXM (sm_90, 132 SMs; SEG3D_SIMT_SMS overrides the count).
enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrL2CacheSize = 38,
  cudaDevAttrMaxThreadsPerMultiProcessor = 39,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

namespace simt {
SIMT_HIDDEN cudaError_t device_attribute(int* value, int attr, int device);
SIMT_HIDDEN cudaError_t set_func_attribute(const void* kernel, int attr, int value);
SIMT_HIDDEN cudaError_t peek_last_error();
SIMT_HIDDEN cudaError_t take_last_error();
SIMT_HIDDEN const char* error_name(cudaError_t err);
SIMT_HIDDEN const char* error_string(cudaError_t err);
SIMT_HIDDEN cudaError_t set_device(int device);
}  // namespace simt

inline cudaError_t cudaGetLastError() { return ::simt::take_last_error(); }
inline cudaError_t cudaPeekAtLastError() { return ::simt::peek_last_error(); }
inline const char* cudaGetErrorName(cudaError_t err) { return ::simt::error_name(err); }
inline const char* cudaGetErrorString(cudaError_t err) { return ::simt::error_string(err); }
inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) { return ::simt::set_device(device); }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  return ::simt::device_attribute(value, attr, device);
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
template <class F>
inline cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  return ::simt::set_func_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}
