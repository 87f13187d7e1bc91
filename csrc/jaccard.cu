// Jaccard (Tanimoto) loss sums and their backward. Softmax (over classes) or sigmoid computed per voxel in
// registers from the logits; the probabilities and a one-hot target are never stored.
//   sums: every block reduces its voxels to per-(class, sum) values (warp butterflies + fixed warp order) into
//         fp32 partials (N, blocks, C, 3); a second kernel sums the blocks in order (deterministic, no atomics).
//   backward: recomputes p and writes dlogits per API.md.
#include <algorithm>
#include <cmath>

#include "common.cuh"
#include "launchers.h"

namespace seg3d {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxBlocks = 1024;  // per sample; fixed (not device-dependent) so results repeat bitwise anywhere

__device__ __forceinline__ long long load_label(const void* target, int label_type, long long i) {
  switch (label_type) {
    case kInt64: return static_cast<const long long*>(target)[i];
    case kInt32: return static_cast<const int*>(target)[i];
    default: return static_cast<const unsigned char*>(target)[i];
  }
}

// x[c] (c < C) -> probabilities in place.
template <int MAXC>
__device__ __forceinline__ void probabilities(float (&x)[MAXC], int C, bool sigmoid) {
  if (sigmoid) {
#pragma unroll
    for (int c = 0; c < MAXC; ++c)
      if (c < C) x[c] = 1.0f / (1.0f + expf(-x[c]));
    return;
  }
  float mx = -INFINITY;
#pragma unroll
  for (int c = 0; c < MAXC; ++c)
    if (c < C) mx = fmaxf(mx, x[c]);
  float sum = 0.0f;
#pragma unroll
  for (int c = 0; c < MAXC; ++c)
    if (c < C) {
      x[c] = expf(x[c] - mx);
      sum += x[c];
    }
  const float inv = 1.0f / sum;
#pragma unroll
  for (int c = 0; c < MAXC; ++c)
    if (c < C) x[c] *= inv;
}

// Loads the voxel's logits and target; returns false for an ignored voxel.
template <class T, int MAXC>
__device__ __forceinline__ bool load_voxel(const T* __restrict__ logits, const void* target, int n, int C, long long S,
                                           long long v, int label_type, bool has_ignore, long long ignore_index,
                                           float (&x)[MAXC], float (&t)[MAXC]) {
  const long long base = static_cast<long long>(n) * C * S + v;
  if (label_type == kProb) {
    const T* tp = static_cast<const T*>(target);
#pragma unroll
    for (int c = 0; c < MAXC; ++c) t[c] = c < C ? to_float(tp[base + c * S]) : 0.0f;
  } else {
    const long long lab = load_label(target, label_type, static_cast<long long>(n) * S + v);
    if (has_ignore && lab == ignore_index) return false;
#pragma unroll
    for (int c = 0; c < MAXC; ++c) t[c] = lab == c ? 1.0f : 0.0f;
  }
#pragma unroll
  for (int c = 0; c < MAXC; ++c) x[c] = c < C ? to_float(logits[base + c * S]) : 0.0f;
  return true;
}

template <class T, int MAXC>
__global__ void __launch_bounds__(kThreads)
jaccard_sums_kernel(const T* __restrict__ logits, const void* target, float* __restrict__ partial, int C,
                    long long S, int label_type, bool squared, bool sigmoid, bool has_ignore, long long ignore_index) {
  const int n = blockIdx.y, tid = threadIdx.x;
  float acc[MAXC][3];
#pragma unroll
  for (int c = 0; c < MAXC; ++c) acc[c][0] = acc[c][1] = acc[c][2] = 0.0f;

  for (long long v = blockIdx.x * static_cast<long long>(kThreads) + tid; v < S;
       v += static_cast<long long>(gridDim.x) * kThreads) {
    float x[MAXC], t[MAXC];
    if (!load_voxel<T, MAXC>(logits, target, n, C, S, v, label_type, has_ignore, ignore_index, x, t)) continue;
    probabilities<MAXC>(x, C, sigmoid);
#pragma unroll
    for (int c = 0; c < MAXC; ++c)
      if (c < C) {
        acc[c][0] += x[c] * t[c];
        acc[c][1] += squared ? x[c] * x[c] : x[c];
        acc[c][2] += squared ? t[c] * t[c] : t[c];
      }
  }

  __shared__ float red[kWarps][MAXC * 3];
  const int warp = tid / 32, lane = tid % 32;
#pragma unroll
  for (int c = 0; c < MAXC; ++c)
    if (c < C) {
#pragma unroll
      for (int j = 0; j < 3; ++j) {
        float s = acc[c][j];
#pragma unroll
        for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
        if (lane == 0) red[warp][c * 3 + j] = s;
      }
    }
  __syncthreads();
  for (int i = tid; i < C * 3; i += kThreads) {
    float s = 0.0f;
    for (int w = 0; w < kWarps; ++w) s += red[w][i];
    partial[(static_cast<long long>(n) * gridDim.x + blockIdx.x) * C * 3 + i] = s;
  }
}

__global__ void jaccard_final_kernel(const float* __restrict__ partial, float* __restrict__ sums, int N, int C, int blocks) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= N * C * 3) return;
  const int n = i / (C * 3), r = i % (C * 3);
  float s = 0.0f;
  for (int b = 0; b < blocks; ++b) s += partial[(static_cast<long long>(n) * blocks + b) * C * 3 + r];
  sums[i] = s;
}

template <class T, int MAXC>
__global__ void __launch_bounds__(kThreads)
jaccard_backward_kernel(const float* __restrict__ grad_sums, const T* __restrict__ logits, const void* target,
                        T* __restrict__ grad, int C, long long S, int label_type, bool squared, bool sigmoid,
                        bool has_ignore, long long ignore_index) {
  const int n = blockIdx.y;
  __shared__ float g[MAXC * 3];
  for (int i = threadIdx.x; i < C * 3; i += kThreads) g[i] = grad_sums[static_cast<long long>(n) * C * 3 + i];
  __syncthreads();

  for (long long v = blockIdx.x * static_cast<long long>(kThreads) + threadIdx.x; v < S;
       v += static_cast<long long>(gridDim.x) * kThreads) {
    const long long base = static_cast<long long>(n) * C * S + v;
    float x[MAXC], t[MAXC];
    if (!load_voxel<T, MAXC>(logits, target, n, C, S, v, label_type, has_ignore, ignore_index, x, t)) {
      for (int c = 0; c < C; ++c) grad[base + c * S] = from_float<T>(0.0f);
      continue;
    }
    probabilities<MAXC>(x, C, sigmoid);
    float dp[MAXC];
    float dot = 0.0f;
#pragma unroll
    for (int c = 0; c < MAXC; ++c)
      if (c < C) {
        dp[c] = g[c * 3] * t[c] + g[c * 3 + 1] * (squared ? 2.0f * x[c] : 1.0f);
        dot += x[c] * dp[c];
      }
#pragma unroll
    for (int c = 0; c < MAXC; ++c)
      if (c < C) {
        const float d = sigmoid ? dp[c] * x[c] * (1.0f - x[c]) : x[c] * (dp[c] - dot);
        grad[base + c * S] = from_float<T>(d);
      }
  }
}

template <class T, int MAXC>
void launch_sums(uint64_t logits, uint64_t target, uint64_t partial, uint64_t sums, int N, int C, long long S,
                 int label_type, bool squared, bool sigmoid, bool has_ignore, long long ignore_index, cudaStream_t s) {
  const int blocks = jaccard_blocks(S);
  auto sums_kernel = jaccard_sums_kernel<T, MAXC>;
  SEG3D_LAUNCH(sums_kernel, dim3(blocks, N), kThreads, 0, s)(
      reinterpret_cast<const T*>(logits), reinterpret_cast<const void*>(target), reinterpret_cast<float*>(partial),
      C, S, label_type, squared, sigmoid, has_ignore, ignore_index);
  SEG3D_CHECK_LAUNCH("jaccard_sums_kernel");
  const int outputs = N * C * 3;
  SEG3D_LAUNCH(jaccard_final_kernel, (outputs + 255) / 256, 256, 0, s)(reinterpret_cast<const float*>(partial),
                                                              reinterpret_cast<float*>(sums), N, C, blocks);
  SEG3D_CHECK_LAUNCH("jaccard_final_kernel");
}

template <class T, int MAXC>
void launch_backward(uint64_t grad_sums, uint64_t logits, uint64_t target, uint64_t grad, int N, int C, long long S,
                     int label_type, bool squared, bool sigmoid, bool has_ignore, long long ignore_index,
                     cudaStream_t s) {
  const int blocks = static_cast<int>(std::min<long long>((S + kThreads - 1) / kThreads, 8192));
  auto backward_kernel = jaccard_backward_kernel<T, MAXC>;
  SEG3D_LAUNCH(backward_kernel, dim3(blocks, N), kThreads, 0, s)(
      reinterpret_cast<const float*>(grad_sums), reinterpret_cast<const T*>(logits),
      reinterpret_cast<const void*>(target), reinterpret_cast<T*>(grad), C, S, label_type, squared, sigmoid,
      has_ignore, ignore_index);
  SEG3D_CHECK_LAUNCH("jaccard_backward_kernel");
}

}  // namespace

int jaccard_blocks(int64_t S) {
  return static_cast<int>(std::max<long long>(1, std::min<long long>((S + kThreads - 1) / kThreads, kMaxBlocks)));
}

// Dispatch over dtype and class-count bound (8 keeps registers low for the common case).
#define SEG3D_JACCARD_DISPATCH(FN, ...)                                                               \
  do {                                                                                                \
    if (C < 1 || C > kMaxClasses) throw std::invalid_argument("seg3d_fast._cuda: class count out of range"); \
    switch (dtype) {                                                                                  \
      case kFloat32: C <= 8 ? FN<float, 8>(__VA_ARGS__) : FN<float, kMaxClasses>(__VA_ARGS__); break; \
      case kFloat16: C <= 8 ? FN<__half, 8>(__VA_ARGS__) : FN<__half, kMaxClasses>(__VA_ARGS__); break; \
      case kBFloat16:                                                                                 \
        C <= 8 ? FN<__nv_bfloat16, 8>(__VA_ARGS__) : FN<__nv_bfloat16, kMaxClasses>(__VA_ARGS__);     \
        break;                                                                                        \
      default: throw std::invalid_argument("seg3d_fast._cuda: unknown dtype code " + std::to_string(dtype)); \
    }                                                                                                 \
  } while (0)

void jaccard_sums(uint64_t logits, uint64_t target, uint64_t partial, uint64_t sums, int N, int C, int64_t S,
                  int label_type, bool squared, bool sigmoid, bool has_ignore, int64_t ignore_index, int dtype,
                  int device, uint64_t stream) {
  use_device(device);
  if (N == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  SEG3D_JACCARD_DISPATCH(launch_sums, logits, target, partial, sums, N, C, S, label_type, squared, sigmoid,
                         has_ignore, ignore_index, s);
}

void jaccard_backward(uint64_t grad_sums, uint64_t logits, uint64_t target, uint64_t grad_logits, int N, int C,
                      int64_t S, int label_type, bool squared, bool sigmoid, bool has_ignore, int64_t ignore_index,
                      int dtype, int device, uint64_t stream) {
  use_device(device);
  if (N == 0 || S == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  SEG3D_JACCARD_DISPATCH(launch_backward, grad_sums, logits, target, grad_logits, N, C, S, label_type, squared,
                         sigmoid, has_ignore, ignore_index, s);
}

}  // namespace seg3d
