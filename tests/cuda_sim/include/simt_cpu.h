// SIMT-on-CPU: the CUDA C++ sources of csrc/ compiled by the host compiler, every CUDA thread a CPU fiber.
//
// csrc/common.cuh includes this header first when compiled with -DSEG3D_SIMT_CPU (tests/cuda_sim/build.py); the
// cuda_runtime.h / cuda_fp16.h / cuda_bf16.h / mma.h beside it stand in for the toolkit's.
//
// Execution model (simt_runtime.cpp): a launch runs its blocks one after another in the calling OS thread; the
// threads of a block are fibers (x86-64: a hand-written context switch; elsewhere ucontext) that run until they block,
// then hand over to the next ready thread: at __syncthreads (all live threads of the block; threads that returned
// count as arrived) or at a warp collective. ldmatrix and mma (.sync.aligned) need every lane of the warp; shuffles
// and __syncwarp need the lanes of their mask that have not exited (reading an exited or missing lane is an error).
// The last lane to reach a collective computes it for the whole warp from the operands the others left on their
// stacks. Fragment layouts follow the PTX ISA ("Matrix fragments for mma.m16n8k16 / m16n8k8", ldmatrix).
// cp.async copies are queued per thread and performed only by cp.async.wait_group (in issue order, all of the thread's
// committed groups but the N most recent), so a stage read before its wait sees what was there before; valid = false
// zero-fills without reading the source. Dynamic shared memory is filled with 0xFF bytes (NaN in fp32, fp16 and bf16)
// at the start of every block and followed by a canary that is checked after it.
//
// Errors in the kernel end the launch: cudaGetLastError then returns cudaErrorLaunchFailure and cudaGetErrorString
// says what and where (block, thread, warp, lane): misaligned or out-of-range cp.async / ldmatrix addresses, a copy
// from shared memory, unrounded tf32 mma operands, a warp collective reached by part of a warp or lanes of one warp at
// different collectives, __syncthreads reached from different lines, a block that can make no progress (deadlock,
// with every thread's state), a write past the dynamic shared memory. A launch whose error nobody read makes the next
// launch throw. Launches CUDA refuses (grid or block sizes, more than 48 KiB of dynamic shared memory without
// cudaFuncAttributeMaxDynamicSharedMemorySize, more than sm_90's 227 KiB) set cudaErrorInvalidConfiguration /
// cudaErrorInvalidValue as CUDA does. Nothing hangs, except a thread that spins waiting for another thread of its
// block without a barrier (fibers are never preempted).
//
// Not modelled: static __shared__ arrays are function-local statics (they keep the previous block's values and are
// not poisoned); global memory is not bounds-checked; memory races between barriers are not detected, but
// SEG3D_SIMT_SCHEDULE=forward|reverse|random[:seed] changes the order in which a block's threads run, so a result
// that depends on a race changes with it (test_conv3d_prelu_deterministic runs both orders). A cp.async lands at its
// wait (late, the default) or, with SEG3D_SIMT_CP_ASYNC=early, at issue: the two ends of what the hardware may do.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- CUDA keywords ------------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Blocks run one at a time and all threads of a block are fibers of one OS thread: a function-local static is the
// block's shared array (it keeps the previous block's values, as shared memory may).
#define __shared__ static
#define __syncthreads() ::simt::syncthreads(__FILE__, __LINE__)
#define warpSize 32

// ---- vector types (vector_types.h) --------------------------------------------------------------------------------
struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
struct __align__(8) float2 { float x, y; };
struct __align__(16) float4 { float x, y, z, w; };
struct __align__(8) int2 { int x, y; };
struct __align__(16) int4 { int x, y, z, w; };
struct __align__(8) uint2 { unsigned x, y; };
struct __align__(16) uint4 { unsigned x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

typedef struct CUstream_st* cudaStream_t;

// ---- simulator API ------------------------------------------------------------------------------------------------
#define SIMT_HIDDEN __attribute__((visibility("hidden")))

namespace simt {

// The fiber that runs now (threadIdx and lane of the current CUDA thread).
struct ThreadCtx {
  uint3 thread_idx;
  int linear;  // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
  int lane, warp;
};

namespace detail {
extern ThreadCtx* g_cur SIMT_HIDDEN;
extern uint3 g_block_idx SIMT_HIDDEN;
extern dim3 g_block_dim SIMT_HIDDEN;
extern dim3 g_grid_dim SIMT_HIDDEN;
}  // namespace detail

// An error in the kernel: the launch is abandoned and cudaGetLastError reports cudaErrorLaunchFailure with this text.
[[noreturn]] SIMT_HIDDEN void kernel_error(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
// Block-wide barrier (__syncthreads).
SIMT_HIDDEN void syncthreads(const char* file, int line);
// The block's dynamic shared memory (at least the launch's bytes, 128-byte aligned).
SIMT_HIDDEN unsigned char* dynamic_smem();
// cp.async.{ca,cg}.shared.global [dst], [src], bytes, valid ? bytes : 0 / commit_group / wait_group n.
SIMT_HIDDEN void cp_async(void* smem_dst, const void* gmem_src, int bytes, bool valid);
SIMT_HIDDEN void cp_async_commit();
SIMT_HIDDEN void cp_async_wait(int n);
// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16 (warp-collective).
SIMT_HIDDEN void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row, bool trans);
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 d, a, b, d (warp-collective).
SIMT_HIDDEN void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bf16);
// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 d, a, b, d (warp-collective).
SIMT_HIDDEN void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
// __shfl_*_sync on a 32- or 64-bit value (warp-collective over the lanes of mask). mode: 0 idx, 1 up, 2 down, 3 xor.
SIMT_HIDDEN uint64_t shfl(unsigned mask, uint64_t bits, int mode, int arg, int width);
SIMT_HIDDEN void syncwarp(unsigned mask);

// cvt.rna.tf32.f32: round to nearest, ties away from zero, to 10 mantissa bits (low 13 bits of the result zero).
inline uint32_t cvt_rna_tf32(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) return (u & 0x7fffffu) ? 0x7fffffffu : u;  // NaN (canonical), +-inf
  return (u + 0x1000u) & 0xffffe000u;  // add half an ulp to the magnitude, truncate (a carry may reach inf)
}

// ---- launches -----------------------------------------------------------------------------------------------------
// Runs every block of the grid; body(ctx) is the kernel call of one thread. An error in the kernel abandons the launch
// and is reported by cudaGetLastError (cudaErrorLaunchFailure, the text by cudaGetErrorString); a launch that CUDA
// would refuse (bad configuration, too much shared memory) sets that error without running.
SIMT_HIDDEN void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, void (*body)(void*),
                          void* ctx);

template <class... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  template <class... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launch: wrong number of arguments");
    using Params = std::tuple<std::decay_t<P>...>;
    Params params(static_cast<std::decay_t<P>>(std::forward<A>(args))...);  // converted as a launch does
    struct Ctx {
      void (*kernel)(P...);
      Params* params;
    } ctx{kernel, &params};
    // every thread gets its own copies of the by-value parameters
    run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem,
             [](void* c) {
               auto* x = static_cast<Ctx*>(c);
               std::apply(x->kernel, *x->params);
             },
             &ctx);
  }
};

template <class... P, class G, class B>
Launch<P...> launch(void (*kernel)(P...), G grid, B block, size_t smem_bytes, cudaStream_t) {
  return Launch<P...>{kernel, dim3(grid), dim3(block), smem_bytes};
}

}  // namespace simt

// ---- built-in variables -------------------------------------------------------------------------------------------
#define threadIdx (static_cast<const ::uint3&>(::simt::detail::g_cur->thread_idx))
#define blockIdx (static_cast<const ::uint3&>(::simt::detail::g_block_idx))
#define blockDim (static_cast<const ::dim3&>(::simt::detail::g_block_dim))
#define gridDim (static_cast<const ::dim3&>(::simt::detail::g_grid_dim))

// ---- device functions ---------------------------------------------------------------------------------------------
// min/max of integers as in device code (CUDA overloads them for every integer pair).
template <class A, class B, class = std::enable_if_t<std::is_integral_v<A> && std::is_integral_v<B>>>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <class A, class B, class = std::enable_if_t<std::is_integral_v<A> && std::is_integral_v<B>>>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float f) { int v; std::memcpy(&v, &f, 4); return v; }
inline float __uint_as_float(unsigned v) { float f; std::memcpy(&f, &v, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned v; std::memcpy(&v, &f, 4); return v; }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }

template <class T>
inline uint64_t simt_shfl_bits(T v) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "__shfl_*_sync: 32- or 64-bit values");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
inline T simt_shfl_value(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}
template <class T> inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return simt_shfl_value<T>(::simt::shfl(mask, simt_shfl_bits(v), 0, src, width));
}
template <class T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return simt_shfl_value<T>(::simt::shfl(mask, simt_shfl_bits(v), 1, int(delta), width));
}
template <class T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return simt_shfl_value<T>(::simt::shfl(mask, simt_shfl_bits(v), 2, int(delta), width));
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return simt_shfl_value<T>(::simt::shfl(mask, simt_shfl_bits(v), 3, lane_mask, width));
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::simt::syncwarp(mask); }
