// Jaccard (Tanimoto) loss sums and their backward. Softmax (over classes) or sigmoid computed per voxel in
// registers from the logits; the probabilities and a one-hot target are never stored.
//   sums: every block reduces its voxels to per-(class, sum) values (warp butterflies + fixed warp order) into
//         fp32 partials (N, blocks, C, 3); a second kernel sums the blocks in order (deterministic, no atomics).
//   backward: recomputes p and writes dlogits per API.md.
//   reduced loss (jaccard_loss / jaccard_loss_backward, API.md's jaccard_loss_reduced): the sums kernel also writes
//         each block's least/greatest counted label, the final kernel runs as one block that also finds the label
//         range and the loss, and the backward kernel derives dL/d(sums) from the sums, the class weights and
//         dL/dloss itself (a small per-block table in shared memory): 2 launches forward, 1 backward.
#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "launchers.h"

namespace seg3d {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxBlocks = 1024;  // per sample; fixed (not device-dependent) so results repeat bitwise anywhere
constexpr long long kNoLabelMin = 1LL << 62;  // the label range of no counted label: empty (API.md)
constexpr long long kNoLabelMax = -(1LL << 62);

// [lo, hi] widened to cover [olo, ohi].
__device__ __forceinline__ void widen_range(long long& lo, long long& hi, long long olo, long long ohi) {
  lo = olo < lo ? olo : lo;
  hi = ohi > hi ? ohi : hi;
}

// The warp's label range, in every lane (a butterfly).
__device__ __forceinline__ void warp_range(long long& lo, long long& hi) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2)
    widen_range(lo, hi, __shfl_xor_sync(0xffffffffu, lo, off), __shfl_xor_sync(0xffffffffu, hi, off));
}

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

// Loads the voxel's logits and target (lab: its label, for label maps); returns false for an ignored voxel.
template <class T, int MAXC>
__device__ __forceinline__ bool load_voxel(const T* __restrict__ logits, const void* target, int n, int C, long long S,
                                           long long v, int label_type, bool has_ignore, long long ignore_index,
                                           float (&x)[MAXC], float (&t)[MAXC], long long& lab) {
  const long long base = static_cast<long long>(n) * C * S + v;
  if (label_type == kProb) {
    const T* tp = static_cast<const T*>(target);
#pragma unroll
    for (int c = 0; c < MAXC; ++c) t[c] = c < C ? to_float(tp[base + c * S]) : 0.0f;
  } else if (label_type == kProbF32) {
    const float* tp = static_cast<const float*>(target);
#pragma unroll
    for (int c = 0; c < MAXC; ++c) t[c] = c < C ? tp[base + c * S] : 0.0f;
  } else {
    lab = load_label(target, label_type, static_cast<long long>(n) * S + v);
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
jaccard_sums_kernel(const T* __restrict__ logits, const void* target, float* __restrict__ partial,
                    long long* __restrict__ range_partial, int C, long long S, int label_type, bool squared,
                    bool sigmoid, bool has_ignore, long long ignore_index, int blocks) {
  // range_partial (optional, label maps): (N, blocks, 2) least and greatest counted label of the block's voxels
  const int n = blockIdx.x / blocks, block = blockIdx.x - n * blocks, tid = threadIdx.x;  // (sample_block_grid)
  float acc[MAXC][3];
#pragma unroll
  for (int c = 0; c < MAXC; ++c) acc[c][0] = acc[c][1] = acc[c][2] = 0.0f;
  long long lo = kNoLabelMin, hi = kNoLabelMax;

  for (long long v = block * static_cast<long long>(kThreads) + tid; v < S;
       v += static_cast<long long>(blocks) * kThreads) {
    float x[MAXC], t[MAXC];
    long long lab = 0;
    if (!load_voxel<T, MAXC>(logits, target, n, C, S, v, label_type, has_ignore, ignore_index, x, t, lab)) continue;
    widen_range(lo, hi, lab, lab);  // label maps only read (lab stays 0 for probabilities)
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
  __shared__ long long red_range[kWarps][2];
  const int warp = tid / 32, lane = tid % 32;
  if (range_partial != nullptr) {
    warp_range(lo, hi);
    if (lane == 0) red_range[warp][0] = lo, red_range[warp][1] = hi;
  }
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
    partial[(static_cast<long long>(n) * blocks + block) * C * 3 + i] = s;
  }
  if (range_partial != nullptr && tid == 0) {
    for (int w = 1; w < kWarps; ++w) widen_range(lo, hi, red_range[w][0], red_range[w][1]);
    long long* out = range_partial + (static_cast<long long>(n) * blocks + block) * 2;
    out[0] = lo;
    out[1] = hi;
  }
}

// Per class c of sample n (per_sample) or of the samples' pooled sums: [dL/dI, dL/dP] of the loss
//   sum_rows sum_c w_c (1 - (I + s) / (P + T - I + s)) [/ (rows * sum_c w_c) for mean]
// times grad_loss: with num = I + s, den = P + T - I + s, q = grad_loss * coef_c / den^2: dL/dP = q num and
// dL/dI = -(q den + q num) (dL/dT = dL/dP, unused). sums: the loss's rows, (N, C, 3) per sample or the (1, C, 3)
// pooled row that jaccard_final_kernel writes (one row read, not N summed by every block).
__device__ __forceinline__ void loss_sums_grad(const float* sums, const float* __restrict__ weights, float grad_loss,
                                               int n, int N, int C, int c, float smooth, bool per_sample, bool mean,
                                               float& d_i, float& d_p) {
  const float* row = sums + (static_cast<long long>(per_sample ? n : 0) * C + c) * 3;
  const float I = row[0], P = row[1], T = row[2];
  const float w = weights[c];
  float coef = w * grad_loss;
  if (mean) {
    float wsum = 0.0f;
    for (int k = 0; k < C; ++k) wsum += weights[k];
    coef = coef / (wsum * (per_sample ? static_cast<float>(N) : 1.0f));
  }
  const float num = I + smooth, den = P + T - I + smooth;
  // no den * den: it underflows with smooth = 0 (den < ~1e-19), and inf * num = NaN for an absent class (num = 0)
  const float q = w != 0.0f ? coef / den : 0.0f;
  d_p = w != 0.0f ? q * (num / den) : 0.0f;
  d_i = -(q + d_p);
}

// sums (N, C, 3) = the partials (N, blocks, C, 3) summed over the blocks: one warp per output, lanes over the blocks
// in a fixed pattern and a butterfly (deterministic, the same result for any grid). With loss != nullptr (one block):
// also the loss (above, without grad) from the sums, and with label_range != nullptr the least and greatest of the
// range partials (N * blocks, 2). Pooled (!per_sample) loss: also the pooled sums, as row N of sums (N + 1 rows).
__global__ void __launch_bounds__(kThreads)
jaccard_final_kernel(const float* __restrict__ partial, float* sums, int N, int C, int blocks,
                     const long long* __restrict__ range_partial, const float* __restrict__ weights,
                     float* __restrict__ loss, long long* __restrict__ label_range, float smooth, bool per_sample,
                     bool mean) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const long long outputs = static_cast<long long>(N) * C * 3;
  for (long long i = static_cast<long long>(blockIdx.x) * warps + warp; i < outputs;
       i += static_cast<long long>(gridDim.x) * warps) {
    const long long n = i / (C * 3), r = i % (C * 3);
    float s = 0.0f;
    for (int b = lane; b < blocks; b += 32) s += partial[(n * blocks + b) * C * 3 + r];
#pragma unroll
    for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) sums[i] = s;
  }
  if (loss == nullptr) return;  // uniform over the launch: the reduced loss runs as one block

  __shared__ long long red_range[kWarps][2];
  if (label_range != nullptr) {
    long long lo = kNoLabelMin, hi = kNoLabelMax;
    for (long long i = threadIdx.x; i < static_cast<long long>(N) * blocks; i += blockDim.x)
      widen_range(lo, hi, range_partial[i * 2], range_partial[i * 2 + 1]);
    warp_range(lo, hi);
    if (lane == 0) red_range[warp][0] = lo, red_range[warp][1] = hi;
  }
  __syncthreads();  // the block's sums (global memory) and range partials are visible to every thread
  if (warp != 0) return;
  // warp 0: lane c < C (C <= 32) takes class c over the rows in order; a butterfly sums the classes
  float total = 0.0f, w = 0.0f;
  if (lane < C) {
    w = weights[lane];
    float I = 0.0f, P = 0.0f, T = 0.0f;
    for (int n = 0; n < N; ++n) {
      const float* row = sums + (static_cast<long long>(n) * C + lane) * 3;
      if (per_sample) {
        if (w != 0.0f) total += w * (1.0f - (row[0] + smooth) / (row[1] + row[2] - row[0] + smooth));
      } else {
        I += row[0];
        P += row[1];
        T += row[2];
      }
    }
    if (!per_sample) {
      if (w != 0.0f) total = w * (1.0f - (I + smooth) / (P + T - I + smooth));
      float* pooled = sums + (static_cast<long long>(N) * C + lane) * 3;
      pooled[0] = I;
      pooled[1] = P;
      pooled[2] = T;
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    total += __shfl_xor_sync(0xffffffffu, total, off);
    w += __shfl_xor_sync(0xffffffffu, w, off);
  }
  if (lane == 0) {
    *loss = mean ? total / (w * (per_sample ? static_cast<float>(N) : 1.0f)) : total;
    if (label_range != nullptr) {
      long long lo = red_range[0][0], hi = red_range[0][1];
      for (int k = 1; k < warps; ++k) widen_range(lo, hi, red_range[k][0], red_range[k][1]);
      label_range[0] = lo;
      label_range[1] = hi;
    }
  }
}

template <class T, int MAXC>
__global__ void __launch_bounds__(kThreads)
jaccard_backward_kernel(const float* __restrict__ grad_sums, const T* __restrict__ logits, const void* target,
                        T* __restrict__ grad, int C, long long S, int label_type, bool squared, bool sigmoid,
                        bool has_ignore, long long ignore_index, const float* __restrict__ grad_loss,
                        const float* __restrict__ weights, int N, float smooth, bool per_sample, bool mean,
                        int blocks) {
  // grad_loss == nullptr: dL/d(sums) read from grad_sums (N, C, 3); else grad_sums holds the reduced loss's sums and
  // each block derives its sample's dL/d(sums) from them, the class weights and dL/dloss (the loss's backward fused).
  const int n = blockIdx.x / blocks, block = blockIdx.x - n * blocks;  // (sample_block_grid)
  __shared__ float g[MAXC * 3];
  if (grad_loss == nullptr) {
    for (int i = threadIdx.x; i < C * 3; i += kThreads) g[i] = grad_sums[static_cast<long long>(n) * C * 3 + i];
  } else {
    for (int c = threadIdx.x; c < C; c += kThreads) {
      float d_i, d_p;
      loss_sums_grad(grad_sums, weights, *grad_loss, n, N, C, c, smooth, per_sample, mean, d_i, d_p);
      g[c * 3] = d_i;
      g[c * 3 + 1] = d_p;
      g[c * 3 + 2] = d_p;
    }
  }
  __syncthreads();

  for (long long v = block * static_cast<long long>(kThreads) + threadIdx.x; v < S;
       v += static_cast<long long>(blocks) * kThreads) {
    const long long base = static_cast<long long>(n) * C * S + v;
    float x[MAXC], t[MAXC];
    long long lab;
    if (!load_voxel<T, MAXC>(logits, target, n, C, S, v, label_type, has_ignore, ignore_index, x, t, lab)) {
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

// The reduced loss's extras (all 0: the plain sums / backward). Forward: range_partial (N * blocks, 2) int64 scratch
// and label_range (2,) int64 (label maps only), weights (C,) fp32, loss (0-d fp32); backward: grad_loss (0-d fp32)
// and weights, with grad_sums holding the forward's sums.
struct LossArgs {
  uint64_t range_partial = 0, label_range = 0, weights = 0, loss = 0, grad_loss = 0;
  float smooth = 0.0f;
  bool per_sample = false, mean = false;
};

// The sums and backward grids: `blocks` per sample, sample-major on the first axis (n = blockIdx.x / blocks): the
// second axis takes at most 65535 blocks, and batches of small volumes or 1-D inputs have more samples than that.
dim3 sample_block_grid(int blocks, int N) {
  if (static_cast<long long>(blocks) * N > std::numeric_limits<int>::max())
    throw std::invalid_argument("seg3d_fast._cuda: Jaccard grid of " + std::to_string(blocks) + " blocks x " +
                                std::to_string(N) + " samples exceeds 2^31 - 1 blocks");
  return dim3(static_cast<unsigned>(blocks) * static_cast<unsigned>(N));
}

// The loss formula's terms (both directions).
LossArgs loss_formula(uint64_t weights, float smooth, bool per_sample, bool mean) {
  LossArgs l;
  l.weights = weights;
  l.smooth = smooth;
  l.per_sample = per_sample;
  l.mean = mean;
  return l;
}

template <class T, int MAXC>
void launch_sums(uint64_t logits, uint64_t target, uint64_t partial, uint64_t sums, int N, int C, long long S,
                 int label_type, bool squared, bool sigmoid, bool has_ignore, long long ignore_index,
                 const LossArgs& l, cudaStream_t s) {
  const int blocks = jaccard_blocks(S);
  auto sums_kernel = jaccard_sums_kernel<T, MAXC>;
  SEG3D_LAUNCH(sums_kernel, sample_block_grid(blocks, N), kThreads, 0, s)(
      reinterpret_cast<const T*>(logits), reinterpret_cast<const void*>(target), reinterpret_cast<float*>(partial),
      reinterpret_cast<long long*>(l.range_partial), C, S, label_type, squared, sigmoid, has_ignore, ignore_index,
      blocks);
  SEG3D_CHECK_LAUNCH("jaccard_sums_kernel");
  const long long outputs = static_cast<long long>(N) * C * 3;
  // one warp per output; the loss needs every sum in one block
  const int final_blocks = l.loss ? 1 : static_cast<int>((outputs + kWarps - 1) / kWarps);
  SEG3D_LAUNCH(jaccard_final_kernel, final_blocks, kThreads, 0, s)(
      reinterpret_cast<const float*>(partial), reinterpret_cast<float*>(sums), N, C, blocks,
      reinterpret_cast<const long long*>(l.range_partial), reinterpret_cast<const float*>(l.weights),
      reinterpret_cast<float*>(l.loss), reinterpret_cast<long long*>(l.label_range), l.smooth, l.per_sample, l.mean);
  SEG3D_CHECK_LAUNCH("jaccard_final_kernel");
}

template <class T, int MAXC>
void launch_backward(uint64_t grad_sums, uint64_t logits, uint64_t target, uint64_t grad, int N, int C, long long S,
                     int label_type, bool squared, bool sigmoid, bool has_ignore, long long ignore_index,
                     const LossArgs& l, cudaStream_t s) {
  const int blocks = static_cast<int>(std::min<long long>((S + kThreads - 1) / kThreads, 8192));
  auto backward_kernel = jaccard_backward_kernel<T, MAXC>;
  SEG3D_LAUNCH(backward_kernel, sample_block_grid(blocks, N), kThreads, 0, s)(
      reinterpret_cast<const float*>(grad_sums), reinterpret_cast<const T*>(logits),
      reinterpret_cast<const void*>(target), reinterpret_cast<T*>(grad), C, S, label_type, squared, sigmoid,
      has_ignore, ignore_index, reinterpret_cast<const float*>(l.grad_loss), reinterpret_cast<const float*>(l.weights),
      N, l.smooth, l.per_sample, l.mean, blocks);
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
                         has_ignore, ignore_index, LossArgs{}, s);
}

void jaccard_backward(uint64_t grad_sums, uint64_t logits, uint64_t target, uint64_t grad_logits, int N, int C,
                      int64_t S, int label_type, bool squared, bool sigmoid, bool has_ignore, int64_t ignore_index,
                      int dtype, int device, uint64_t stream) {
  use_device(device);
  if (N == 0 || S == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  SEG3D_JACCARD_DISPATCH(launch_backward, grad_sums, logits, target, grad_logits, N, C, S, label_type, squared,
                         sigmoid, has_ignore, ignore_index, LossArgs{}, s);
}

void jaccard_loss(uint64_t logits, uint64_t target, uint64_t weights, uint64_t partial, uint64_t range_partial,
                  uint64_t sums, uint64_t loss, uint64_t label_range, int N, int C, int64_t S, int label_type,
                  bool squared, bool sigmoid, bool has_ignore, int64_t ignore_index, float smooth, bool per_sample,
                  bool mean, int dtype, int device, uint64_t stream) {
  use_device(device);
  if (N == 0) throw std::invalid_argument("seg3d_fast._cuda: jaccard_loss needs a non-empty batch");
  if (loss == 0 || weights == 0 || (!is_probability(label_type) && (range_partial == 0 || label_range == 0)))
    throw std::invalid_argument("seg3d_fast._cuda: jaccard_loss needs weights, loss and (label maps) label range");
  LossArgs l = loss_formula(weights, smooth, per_sample, mean);
  l.range_partial = is_probability(label_type) ? 0 : range_partial;
  l.label_range = is_probability(label_type) ? 0 : label_range;
  l.loss = loss;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  SEG3D_JACCARD_DISPATCH(launch_sums, logits, target, partial, sums, N, C, S, label_type, squared, sigmoid,
                         has_ignore, ignore_index, l, s);
}

void jaccard_loss_backward(uint64_t grad_loss, uint64_t sums, uint64_t weights, uint64_t logits, uint64_t target,
                           uint64_t grad_logits, int N, int C, int64_t S, int label_type, bool squared, bool sigmoid,
                           bool has_ignore, int64_t ignore_index, float smooth, bool per_sample, bool mean, int dtype,
                           int device, uint64_t stream) {
  use_device(device);
  if (N == 0 || S == 0) return;
  if (grad_loss == 0 || weights == 0)
    throw std::invalid_argument("seg3d_fast._cuda: jaccard_loss_backward needs grad_loss and weights");
  LossArgs l = loss_formula(weights, smooth, per_sample, mean);
  l.grad_loss = grad_loss;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  SEG3D_JACCARD_DISPATCH(launch_backward, sums, logits, target, grad_logits, N, C, S, label_type, squared, sigmoid,
                         has_ignore, ignore_index, l, s);
}

}  // namespace seg3d
