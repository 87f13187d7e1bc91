// conv3d + bias + PReLU + residual: forward, input gradient (dgrad), weight gradient (wgrad), PReLU backward.
//
// All three convolution passes are implicit GEMMs over channels-last (N, D, H, W, C) tensors, computed by
// 128-thread blocks on tensor cores (mma.sync with ldmatrix: fp16/bf16 m16n8k16, tf32 m16n8k8) or, for exact
// fp32, with FFMA on the same shared-memory tiles. Operand tiles stream through a 4-stage cp.async pipeline;
// padding, stride and tile edges are index arithmetic with zero-filled copies. Accumulation is fp32.
//   forward / dgrad ("gather conv"): M = output voxels, N = output channels, K = taps x input channels.
//   wgrad: M = C_out, N = taps x C_in, K = voxels, split over voxel ranges into fp32 partials that a second
//          kernel sums in a fixed order (deterministic, no atomics).
#include <algorithm>
#include <cstdlib>
#include <type_traits>

#include "common.cuh"
#include "launchers.h"

namespace seg3d {
namespace {

constexpr int kThreads = 128;  // 4 warps per block
constexpr int kBK = 32;        // GEMM K per pipeline stage
constexpr int kStages = 4;        // cp.async pipeline depth (a power of two: cheap stage indices)

// Shared-memory geometry of one block. A is stored [m][k] (A_KM false) or [k][m]; B is [n][k] (B_KN false) or
// [k][n]. Rows are padded by 16 bytes (fewer bank conflicts; keeps every row 16-byte aligned for cp.async and
// every ldmatrix row address 16-byte aligned). The fp32 epilogue tile C reuses the same memory.
template <class T, int BM, int BN, bool A_KM, bool B_KN>
struct SmemLayout {
  static constexpr int kPad = 16 / sizeof(T);
  static constexpr int LDA = A_KM ? BM + kPad : kBK + kPad;
  static constexpr int LDB = B_KN ? BN + kPad : kBK + kPad;
  static constexpr int A_ELEMS = (A_KM ? kBK : BM) * LDA;  // one stage
  static constexpr int B_ELEMS = (B_KN ? kBK : BN) * LDB;
  static constexpr int LDC = BN + 8;  // a half-warp's float2 stores (4 rows x 4 lanes) hit 32 banks
  static constexpr size_t PIPE_BYTES = size_t(kStages) * (A_ELEMS + B_ELEMS) * sizeof(T);
  static constexpr size_t C_BYTES = size_t(BM) * LDC * sizeof(float);
  static constexpr size_t BYTES = PIPE_BYTES > C_BYTES ? PIPE_BYTES : C_BYTES;
  static_assert((A_ELEMS * sizeof(T)) % 128 == 0 && (B_ELEMS * sizeof(T)) % 128 == 0, "stage alignment");
  __device__ static T* a_stage(T* smem, int s) { return smem + s * A_ELEMS; }
  __device__ static T* b_stage(T* smem, int s) { return smem + kStages * A_ELEMS + s * B_ELEMS; }
};

// Tensor-core block tile on mma.sync: 4 warps as WARPS_M x (4 / WARPS_M), each warp a WM x WN tile of 16x8 MMA
// tiles. fp16/bf16: operands from shared memory by ldmatrix (.trans for the k-major layouts), m16n8k16. fp32 with
// TF32 allowed: 32-bit shared loads rounded to tf32, m16n8k8. (The WMMA API this replaces compiled to generic
// 32-bit loads, 396 instructions per 32-deep K step of a 64x64 tile against 16 HMMA.)
template <class T, int BM, int BN, int WARPS_M, bool A_KM, bool B_KN>
struct MmaTile {
  using L = SmemLayout<T, BM, BN, A_KM, B_KN>;
  static constexpr int WARPS_N = 4 / WARPS_M;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int FM = WM / 16, FN = WN / 8;
  static constexpr bool kTF32 = std::is_same<T, float>::value;
  static constexpr int KS = kTF32 ? 8 : 16;
  static_assert(WARPS_M * WARPS_N == 4 && WM % 16 == 0 && WN % 16 == 0, "warp tiling");

  float acc[FM][FN][4];

  __device__ void init() {
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
  }

  __device__ void step(const T* sA, const T* sB) {
    if constexpr (!kTF32) {
      const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, q = lane / 8, r = lane % 8;
      const int wm0 = (warp % WARPS_M) * WM;
      step_a([&](int i, int ks) {
        const int m = wm0 + i * 16;
        return A_KM ? sA + (ks + r + (q / 2) * 8) * L::LDA + m + (q % 2) * 8
                    : sA + (m + r + (q % 2) * 8) * L::LDA + ks + (q / 2) * 8;
      }, sB);
    } else {
      step_tf32(sA, sB);
    }
  }

  // fp16/bf16 K step with A's ldmatrix addresses from a_row(i, ks): this lane's row of ldmatrix x4 matrix lane / 8
  // for the warp's 16-row tile i at K offset ks. A's matrices are a0..a3 = (m 0-7, k 0-7), (m 8-15, k 0-7),
  // (m 0-7, k 8-15), (m 8-15, k 8-15); B's cover two 8-column tiles: (n 0-7, k 0-7), (n 0-7, k 8-15),
  // (n 8-15, k 0-7), (n 8-15, k 8-15). (The halo kernel gathers A's rows from its input box this way.)
  template <class ARow>
  __device__ void step_a(ARow a_row, const T* sB) {
    static_assert(!kTF32, "16-bit operands");
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, q = lane / 8, r = lane % 8;
    const int wn0 = (warp / WARPS_M) * WN;
#pragma unroll
    for (int ks = 0; ks < kBK; ks += KS) {
      uint32_t a[FM][4], b[FN][2];
#pragma unroll
      for (int i = 0; i < FM; ++i) ldmatrix_x4<A_KM>(a[i], a_row(i, ks));
#pragma unroll
      for (int j = 0; j < FN; j += 2) {
        const int n = wn0 + j * 8;
        uint32_t v[4];
        ldmatrix_x4<B_KN>(v, B_KN ? sB + (ks + r + (q % 2) * 8) * L::LDB + n + (q / 2) * 8
                                  : sB + (n + r + (q / 2) * 8) * L::LDB + ks + (q % 2) * 8);
        b[j][0] = v[0], b[j][1] = v[1], b[j + 1][0] = v[2], b[j + 1][1] = v[3];
      }
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) mma_16816<T>(acc[i][j], a[i], b[j]);
    }
  }

  // fp32 with TF32: 32-bit shared loads rounded to tf32, m16n8k8.
  __device__ void step_tf32(const T* sA, const T* sB) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int wm0 = (warp % WARPS_M) * WM, wn0 = (warp / WARPS_M) * WN;
    auto at = [&](int m, int k) { return to_tf32(A_KM ? sA[k * L::LDA + m] : sA[m * L::LDA + k]); };
    auto bt = [&](int k, int n) { return to_tf32(B_KN ? sB[k * L::LDB + n] : sB[n * L::LDB + k]); };
#pragma unroll
    for (int ks = 0; ks < kBK; ks += KS) {
      uint32_t a[FM][4], b[FN][2];
#pragma unroll
      for (int i = 0; i < FM; ++i) {
        const int m = wm0 + i * 16 + g;
        a[i][0] = at(m, ks + t), a[i][1] = at(m + 8, ks + t), a[i][2] = at(m, ks + t + 4);
        a[i][3] = at(m + 8, ks + t + 4);
      }
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        const int n = wn0 + j * 8 + g;
        b[j][0] = bt(ks + t, n), b[j][1] = bt(ks + t + 4, n);
      }
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) mma_1688_tf32(acc[i][j], a[i], b[j]);
    }
  }

  // Accumulator element e of tile (i, j) is row g + 8 (e / 2), column 2t + e % 2.
  __device__ void store(float* sC) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int wm0 = (warp % WARPS_M) * WM, wn0 = (warp / WARPS_M) * WN;
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        float* c = sC + (wm0 + i * 16 + g) * L::LDC + wn0 + j * 8 + 2 * t;
        *reinterpret_cast<float2*>(c) = make_float2(acc[i][j][0], acc[i][j][1]);
        *reinterpret_cast<float2*>(c + 8 * L::LDC) = make_float2(acc[i][j][2], acc[i][j][3]);
      }
  }
};

// Exact fp32 block tile (FFMA): threads as 16 x 8, each owning rows ty + 16 i and columns tx + 8 j.
template <int BM, int BN, bool A_KM, bool B_KN>
struct FmaTile {
  using L = SmemLayout<float, BM, BN, A_KM, B_KN>;
  static constexpr int TM = BM / 16, TN = BN / 8;
  float acc[TM][TN];

  __device__ void init() {
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;
  }

  __device__ void step(const float* sA, const float* sB) {
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
#pragma unroll 4
    for (int k = 0; k < kBK; ++k) {
      float a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = A_KM ? sA[k * L::LDA + ty + 16 * i] : sA[(ty + 16 * i) * L::LDA + k];
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = B_KN ? sB[k * L::LDB + tx + 8 * j] : sB[(tx + 8 * j) * L::LDB + k];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }

  __device__ void store(float* sC) {
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) sC[(ty + 16 * i) * L::LDC + tx + 8 * j] = acc[i][j];
  }
};

template <class T, bool TF32, int BM, int BN, int WARPS_M, bool A_KM, bool B_KN>
using BlockTile = typename std::conditional<std::is_same<T, float>::value && !TF32, FmaTile<BM, BN, A_KM, B_KN>,
                                            MmaTile<T, BM, BN, WARPS_M, A_KM, B_KN>>::type;

// The multi-stage main loop shared by the kernels: load_stage(stage, kt) issues the cp.async copies of K tile kt
// (called for kt = 0, 1, 2, ... in order), compute_stage(stage, kt) runs the tile's MMAs on it.
template <class LoadStage, class ComputeStage>
__device__ __forceinline__ void pipeline(int k_tiles, LoadStage load_stage, ComputeStage compute_stage) {
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();  // always commit (possibly empty) so the group count stays in step with kt
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();  // tile kt has landed (this thread's copies) ...
    __syncthreads();               // ... everyone's, and everyone is done with the stage about to be refilled
    const int next = kt + kStages - 1;
    if (next < k_tiles) load_stage(next % kStages, next);
    cp_async_commit();
    compute_stage(kt % kStages, kt);
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline memory is reused for the C tile next
}

// The main loop over a kernel's standard A and B stages (SmemLayout).
template <class Tile, class Layout, class T, class LoadStage>
__device__ __forceinline__ void gemm_mainloop(Tile& tile, T* smem, int k_tiles, LoadStage load_stage) {
  pipeline(k_tiles, load_stage,
           [&](int s, int) { tile.step(Layout::a_stage(smem, s), Layout::b_stage(smem, s)); });
}

// ---------------------------------------------------------------------------------------------------------
// (n, qd, qh, qw) of row m of the gather conv's output grid (N, QD, QH, QW).
struct GridPoint { int n, qd, qh, qw; };
__device__ __forceinline__ GridPoint grid_point(const ConvArgs& a, int m) {
  const int qw = m % a.QW;
  m /= a.QW;
  const int qh = m % a.QH;
  m /= a.QH;
  return {m / a.QD, m % a.QD, qh, qw};
}

// Forward and dgrad: gather conv with the fused epilogue.
template <class T, bool TF32, int BM, int BN, int WARPS_M>
__global__ void __launch_bounds__(kThreads) conv_gemm_kernel(const ConvArgs a) {
  using L = SmemLayout<T, BM, BN, false, false>;
  SEG3D_DYNAMIC_SMEM(smem_raw);
  T* smem = reinterpret_cast<T*>(smem_raw);
  __shared__ int row_n[BM], row_d[BM], row_h[BM], row_w[BM];
  __shared__ long long row_out[BM];
  __shared__ int toff[3][3];

  const int tid = threadIdx.x;
  const T* __restrict__ in = reinterpret_cast<const T*>(a.in);
  const T* __restrict__ w = reinterpret_cast<const T*>(a.weight);
  const int M = a.N * a.QD * a.QH * a.QW;  // < 2^31 (checked by the caller)
  const int K = a.ntap_d * a.ntap_h * a.ntap_w * a.C;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;

  if (tid == 0) {
#pragma unroll
    for (int i = 0; i < 3; ++i) {
      toff[0][i] = a.toff_d[i];
      toff[1][i] = a.toff_h[i];
      toff[2][i] = a.toff_w[i];
    }
  }
  // Per output row: input origin and output element offset (64-bit: tensors may pass 2^31 elements).
  for (int r = tid; r < BM; r += kThreads) {
    const int m = m0 + r;
    if (m < M) {
      const auto [n, qd, qh, qw] = grid_point(a, m);
      row_n[r] = n;
      row_d[r] = qd * a.in_stride;
      row_h[r] = qh * a.in_stride;
      row_w[r] = qw * a.in_stride;
      const int od = qd * a.out_stride + a.out_off_d, oh = qh * a.out_stride + a.out_off_h,
                ow = qw * a.out_stride + a.out_off_w;
      row_out[r] = (((static_cast<long long>(n) * a.OD + od) * a.OH + oh) * a.OW + ow) * a.Cout;
    } else {
      row_n[r] = -1;
      row_out[r] = -1;
    }
  }
  __syncthreads();

  const int vec = a.vec, vbytes = a.vec * int(sizeof(T)), chunks_per_row = kBK / a.vec;
  auto load_stage = [&](int stage, int kt) {
    const int k0 = kt * kBK;
    T* sA = L::a_stage(smem, stage);
    for (int i = tid; i < BM * chunks_per_row; i += kThreads) {
      const int r = i / chunks_per_row, kk = (i - r * chunks_per_row) * vec, k = k0 + kk;
      const int n = row_n[r];
      const T* src = in;
      bool valid = false;
      if (n >= 0 && k < K) {
        const int tap = k / a.C, c = k - tap * a.C;  // a copy never straddles taps: C % vec == 0
        const int tw = tap % a.ntap_w, tdh = tap / a.ntap_w, th = tdh % a.ntap_h, td = tdh / a.ntap_h;
        const int id = row_d[r] + toff[0][td], ih = row_h[r] + toff[1][th], iw = row_w[r] + toff[2][tw];
        if (unsigned(id) < unsigned(a.ID) && unsigned(ih) < unsigned(a.IH) && unsigned(iw) < unsigned(a.IW)) {
          valid = true;
          src = in + (((static_cast<long long>(n) * a.ID + id) * a.IH + ih) * a.IW + iw) * a.C + c;
        }
      }
      cp_async(sA + r * L::LDA + kk, src, vbytes, valid);
    }
    T* sB = L::b_stage(smem, stage);
    for (int i = tid; i < BN * chunks_per_row; i += kThreads) {
      const int r = i / chunks_per_row, kk = (i - r * chunks_per_row) * vec, k = k0 + kk, co = n0 + r;
      const bool valid = co < a.Cout && k < K;
      cp_async(sB + r * L::LDB + kk, valid ? w + static_cast<long long>(co) * K + k : w, vbytes, valid);
    }
  };

  BlockTile<T, TF32, BM, BN, WARPS_M, false, false> tile;
  tile.init();
  gemm_mainloop<decltype(tile), L>(tile, smem, (K + kBK - 1) / kBK, load_stage);
  float* sC = reinterpret_cast<float*>(smem_raw);
  tile.store(sC);
  __syncthreads();

  // Epilogue on the fp32 accumulator: bias, residual (before), PReLU, act, residual (after), one store.
  const float* bias = reinterpret_cast<const float*>(a.bias);
  const float* alpha = reinterpret_cast<const float*>(a.alpha);
  const T* residual = reinterpret_cast<const T*>(a.residual);
  T* out = reinterpret_cast<T*>(a.out);
  T* act = reinterpret_cast<T*>(a.act);
  for (int i = tid; i < BM * BN; i += kThreads) {
    const int r = i / BN, c = i % BN, co = n0 + c;
    const long long ro = row_out[r];
    if (ro < 0 || co >= a.Cout) continue;
    const long long o = ro + co;
    float v = sC[r * L::LDC + c];
    if (bias) v += bias[co];
    if (residual && a.residual_first) v += to_float(residual[o]);
    if (a.alpha_mode) {
      const float al = alpha[a.alpha_mode == 2 ? co : 0];
      v = v > 0.0f ? v : v * al;
    }
    if (act) act[o] = from_float<T>(v);
    if (residual && !a.residual_first) v += to_float(residual[o]);
    out[o] = from_float<T>(v);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Weight gradient, one voxel range (blockIdx.z) per block into fp32 partials.
template <class T, bool TF32, int BM, int BN, int WARPS_M>
__global__ void __launch_bounds__(kThreads) wgrad_kernel(const WgradArgs a) {
  using L = SmemLayout<T, BM, BN, true, true>;
  SEG3D_DYNAMIC_SMEM(smem_raw);
  T* smem = reinterpret_cast<T*>(smem_raw);

  const int tid = threadIdx.x;
  const T* __restrict__ dz = reinterpret_cast<const T*>(a.dz);
  const T* __restrict__ in = reinterpret_cast<const T*>(a.in);
  const int ks = a.ksize, pad = a.ksize / 2;
  const int Kw = ks * ks * ks * a.C;
  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM, split = blockIdx.z;
  const int voxels = a.N * a.OD * a.OH * a.OW;  // < 2^31 (checked by the caller)
  const int v_begin = split * a.voxels_per_split;
  const int v_end = min(voxels, v_begin + a.voxels_per_split);
  const int k_tiles = v_end > v_begin ? (v_end - v_begin + kBK - 1) / kBK : 0;

  auto load_stage = [&](int stage, int kt) {
    const int v0 = v_begin + kt * kBK;
    T* sA = L::a_stage(smem, stage);  // [voxel][c_out]
    const int cpr_a = BM / a.vec_dz;
    for (int i = tid; i < kBK * cpr_a; i += kThreads) {
      const int kv = i / cpr_a, mm = (i - kv * cpr_a) * a.vec_dz, v = v0 + kv, co = m0 + mm;
      const bool valid = v < v_end && co < a.Cout;
      cp_async(sA + kv * L::LDA + mm, valid ? dz + static_cast<long long>(v) * a.Cout + co : dz,
               a.vec_dz * int(sizeof(T)), valid);
    }
    T* sB = L::b_stage(smem, stage);  // [voxel][tap, c_in]
    const int cpr_b = BN / a.vec_in;
    for (int i = tid; i < kBK * cpr_b; i += kThreads) {
      const int kv = i / cpr_b, nn = (i - kv * cpr_b) * a.vec_in, v = v0 + kv, nk = n0 + nn;
      const T* src = in;
      bool valid = false;
      if (v < v_end && nk < Kw) {
        const int tap = nk / a.C, c = nk - tap * a.C;
        const int tw = tap % ks, tdh = tap / ks, th = tdh % ks, td = tdh / ks;
        int t = v;
        const int ow = t % a.OW; t /= a.OW;
        const int oh = t % a.OH; t /= a.OH;
        const int od = t % a.OD;
        const int n = t / a.OD;
        const int id = od * a.stride + td - pad, ih = oh * a.stride + th - pad, iw = ow * a.stride + tw - pad;
        if (unsigned(id) < unsigned(a.ID) && unsigned(ih) < unsigned(a.IH) && unsigned(iw) < unsigned(a.IW)) {
          valid = true;
          src = in + (((static_cast<long long>(n) * a.ID + id) * a.IH + ih) * a.IW + iw) * a.C + c;
        }
      }
      cp_async(sB + kv * L::LDB + nn, src, a.vec_in * int(sizeof(T)), valid);
    }
  };

  BlockTile<T, TF32, BM, BN, WARPS_M, true, true> tile;
  tile.init();
  gemm_mainloop<decltype(tile), L>(tile, smem, k_tiles, load_stage);
  float* sC = reinterpret_cast<float*>(smem_raw);
  tile.store(sC);
  __syncthreads();

  float* partial = reinterpret_cast<float*>(a.partial);
  for (int i = tid; i < BM * BN; i += kThreads) {
    const int r = i / BN, c = i % BN, co = m0 + r, nk = n0 + c;
    if (co < a.Cout && nk < Kw) partial[(static_cast<long long>(split) * a.Cout + co) * Kw + nk] = sC[r * L::LDC + c];
  }
}

// Sums the per-split partials in split order and casts: gw (Cout, taps, C_in) in the weight dtype.
template <class T>
__global__ void wgrad_reduce_kernel(const float* __restrict__ partial, T* __restrict__ gw, long long count, int splits) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    float s = 0.0f;
#pragma unroll 8
    for (int sp = 0; sp < splits; ++sp) s += partial[sp * count + i];  // in split order; loads run ahead
    gw[i] = from_float<T>(s);
  }
}

// ---------------------------------------------------------------------------------------------------------
// PReLU backward + per-channel sums. Block: 256 threads = (256 / tile_c) rows x tile_c channels;
// grid: (row blocks, channel tiles). Partials (row_blocks, C) fp32, reduced by channel_sums_kernel.
constexpr int kPreluThreads = 256;

template <class T>
__global__ void __launch_bounds__(kPreluThreads)
prelu_backward_kernel(const T* __restrict__ g, const T* __restrict__ saved, const float* __restrict__ alpha,
                      T* __restrict__ dz, float* __restrict__ part_bias, float* __restrict__ part_alpha,
                      long long rows, int C, int tile_c, int saved_kind, int alpha_mode, long long rows_per_block) {
  __shared__ float sb[kPreluThreads], sa[kPreluThreads];
  const int tid = threadIdx.x;
  const int c = blockIdx.y * tile_c + tid % tile_c, row_step = kPreluThreads / tile_c;
  const long long r_begin = blockIdx.x * rows_per_block;
  const long long r_end = min(rows, r_begin + rows_per_block);
  float sum_dz = 0.0f, sum_alpha = 0.0f;
  if (c < C) {
    const float al = alpha_mode == 2 ? alpha[c] : alpha_mode == 1 ? alpha[0] : 1.0f;
    for (long long r = r_begin + tid / tile_c; r < r_end; r += row_step) {
      const long long idx = r * C + c;
      const float gv = to_float(g[idx]);
      float d = gv;
      if (saved_kind != 0) {
        const float s = to_float(saved[idx]);
        const float z = (saved_kind == 1 && s <= 0.0f) ? s / al : s;
        if (z <= 0.0f) {
          d = gv * al;
          sum_alpha += gv * z;
        }
        if (dz) dz[idx] = from_float<T>(d);
      }
      sum_dz += d;
    }
  }
  sb[tid] = sum_dz;
  sa[tid] = sum_alpha;
  __syncthreads();
  if (tid < tile_c && c < C) {
    float b = 0.0f, s = 0.0f;
    for (int j = 0; j < row_step; ++j) {
      b += sb[tid + j * tile_c];
      s += sa[tid + j * tile_c];
    }
    part_bias[blockIdx.x * static_cast<long long>(C) + c] = b;
    part_alpha[blockIdx.x * static_cast<long long>(C) + c] = s;
  }
}

// One block: out[c] = sum over rows of part[row, c] (fixed order); sum_channels: out[0] = sum over c as well.
__global__ void channel_sums_kernel(float* __restrict__ part, int rows, int C, float* __restrict__ out,
                                    int sum_channels) {
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float s = 0.0f;
    for (int r = 0; r < rows; ++r) s += part[static_cast<long long>(r) * C + c];
    if (sum_channels) part[c] = s;  // row 0, column c: read only by this thread above
    else out[c] = s;
  }
  if (sum_channels) {
    __syncthreads();
    if (threadIdx.x == 0) {
      float s = 0.0f;
      for (int c = 0; c < C; ++c) s += part[c];
      out[0] = s;
    }
  }
}

// =========================================================================================================
// v2 kernels (the default; SEG3D_FAST_CUDA_KERNELS=v1 selects the kernels above). Same GEMMs, tiles and
// pipeline, for channel counts that split into 16-byte pieces (C_in and C_out multiples of 16 / sizeof(T)).
// The v1 loaders spent ~10 runtime integer divisions per 16-byte copy (voxel and tap decode), an order of
// magnitude more issue slots than the MMAs they feed. Here every thread copies a fixed 16-byte column of every
// K tile: the conv loader looks the tap up in a shared table and walks (tap, channel) incrementally; the wgrad
// loader fixes each thread's (tap, channel) column and walks its voxels incrementally. Epilogues read the fp32
// tile and write 16 bytes per thread.
template <class T> constexpr int kVec16 = 16 / int(sizeof(T));  // elements per 16-byte copy

__device__ __forceinline__ int pick3(const int (&v)[3], int i) { return i == 0 ? v[0] : i == 1 ? v[1] : v[2]; }

// 16-byte vector of T <-> floats.
template <class T> __device__ __forceinline__ void load16(const T* p, float* v) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int i = 0; i < kVec16<T>; ++i) v[i] = to_float(e[i]);
}
// N floats (a multiple of 4, 16-byte aligned).
template <int N> __device__ __forceinline__ void load_floats(const float* p, float* v) {
#pragma unroll
  for (int i = 0; i < N; i += 4) {
    const float4 f = *reinterpret_cast<const float4*>(p + i);
    v[i] = f.x, v[i + 1] = f.y, v[i + 2] = f.z, v[i + 3] = f.w;
  }
}
template <class T> __device__ __forceinline__ void store16(T* p, const float* v) {
  uint4 u;
  T* e = reinterpret_cast<T*>(&u);
#pragma unroll
  for (int i = 0; i < kVec16<T>; ++i) e[i] = from_float<T>(v[i]);
  *reinterpret_cast<uint4*>(p) = u;
}

// Epilogue of the second-generation conv kernels on the block's fp32 tile sC (BM x BN, row stride LDC), 16 bytes
// (EV channels) per thread: bias, residual (before), PReLU, act, residual (after), one store. row_out[r]: element
// offset of tile row r's output voxel, -1 for none.
template <class T, int BM, int BN, int LDC>
__device__ __forceinline__ void store_epilogue(const ConvArgs& a, const float* sC, const long long* row_out, int n0) {
  constexpr int EV = kVec16<T>;
  constexpr int PIECES = BN / EV;
  const float* bias = reinterpret_cast<const float*>(a.bias);
  const float* alpha = reinterpret_cast<const float*>(a.alpha);
  const T* residual = reinterpret_cast<const T*>(a.residual);
  T* out = reinterpret_cast<T*>(a.out);
  T* act = reinterpret_cast<T*>(a.act);
  const float alpha0 = a.alpha_mode == 1 ? alpha[0] : 0.0f;
  for (int i = threadIdx.x; i < BM * PIECES; i += kThreads) {
    const int r = i / PIECES, cc = (i % PIECES) * EV, co = n0 + cc;
    const long long ro = row_out[r];
    if (ro < 0 || co >= a.Cout) continue;  // Cout % EV == 0: a piece is wholly in or out
    const long long o = ro + co;
    float v[EV], t[EV];
#pragma unroll
    for (int e = 0; e < EV; e += 4) {
      const float4 f = *reinterpret_cast<const float4*>(sC + r * LDC + cc + e);
      v[e] = f.x, v[e + 1] = f.y, v[e + 2] = f.z, v[e + 3] = f.w;
    }
    if (bias) {
      load_floats<EV>(bias + co, t);
#pragma unroll
      for (int e = 0; e < EV; ++e) v[e] += t[e];
    }
    if (residual && a.residual_first) {
      load16(residual + o, t);
#pragma unroll
      for (int e = 0; e < EV; ++e) v[e] += t[e];
    }
    if (a.alpha_mode) {
      if (a.alpha_mode == 2) load_floats<EV>(alpha + co, t);
#pragma unroll
      for (int e = 0; e < EV; ++e) {
        const float al = a.alpha_mode == 2 ? t[e] : alpha0;
        v[e] = v[e] > 0.0f ? v[e] : v[e] * al;
      }
    }
    if (act) store16(act + o, v);
    if (residual && !a.residual_first) {
      load16(residual + o, t);
#pragma unroll
      for (int e = 0; e < EV; ++e) v[e] += t[e];
    }
    store16(out + o, v);
  }
}

template <class T, bool TF32, int BM, int BN, int WARPS_M, int VEC>
__global__ void __launch_bounds__(kThreads) conv_gemm_v2_kernel(const ConvArgs a) {
  using L = SmemLayout<T, BM, BN, false, false>;
  constexpr int EV = kVec16<T>;              // output channels per epilogue piece (16 bytes)
  constexpr int CPR = kBK / VEC;             // operand copies (VEC elements: 16 or 8 bytes) per tile row
  constexpr int ROW_STEP = kThreads / CPR;   // rows between one thread's copies
  constexpr int JA = BM / ROW_STEP;          // A rows per thread
  constexpr int JB = (BN + ROW_STEP - 1) / ROW_STEP;  // B rows per thread (the last maybe for some threads only)
  static_assert(BM % ROW_STEP == 0 && BN % EV == 0 && kBK % VEC == 0, "v2 tile");
  SEG3D_DYNAMIC_SMEM(smem_raw);
  T* smem = reinterpret_cast<T*>(smem_raw);
  __shared__ long long row_out[BM];   // element offset of each output row (-1 past the end)
  __shared__ long long row_in[BM];    // element offset of its input origin
  __shared__ uint32_t row_taps[BM];   // bit t: tap t of the row lands inside the input volume (none past the end)
  __shared__ long long tap_off[27];   // element offset of each tap from a row's input origin

  const int tid = threadIdx.x;
  const T* __restrict__ in = reinterpret_cast<const T*>(a.in);
  const T* __restrict__ w = reinterpret_cast<const T*>(a.weight);
  const int M = a.N * a.QD * a.QH * a.QW;  // < 2^31 (checked by the caller)
  const int ntaps = a.ntap_d * a.ntap_h * a.ntap_w, K = ntaps * a.C;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;

  for (int t = tid; t < ntaps; t += kThreads) {
    const int tw = t % a.ntap_w, tdh = t / a.ntap_w, th = tdh % a.ntap_h, td = tdh / a.ntap_h;
    tap_off[t] = ((static_cast<long long>(pick3(a.toff_d, td)) * a.IH + pick3(a.toff_h, th)) * a.IW +
                  pick3(a.toff_w, tw)) * a.C;
  }
  // Per output row (one per thread): the output offset, the input origin and its in-volume taps, so that the copy
  // loop tests one bit instead of three coordinates.
  for (int r = tid; r < BM; r += kThreads) {
    const int m = m0 + r;
    long long ro = -1, ri = 0;
    uint32_t taps = 0;
    if (m < M) {
      const auto [n, qd, qh, qw] = grid_point(a, m);
      const int od = qd * a.out_stride + a.out_off_d, oh = qh * a.out_stride + a.out_off_h,
                ow = qw * a.out_stride + a.out_off_w;
      ro = (((static_cast<long long>(n) * a.OD + od) * a.OH + oh) * a.OW + ow) * a.Cout;
      const int d = qd * a.in_stride, h = qh * a.in_stride, wv = qw * a.in_stride;
      ri = (((static_cast<long long>(n) * a.ID + d) * a.IH + h) * a.IW + wv) * a.C;
      uint32_t in_d = 0, in_h = 0, in_w = 0;  // bit i: tap offset i of that dim stays inside
#pragma unroll
      for (int i = 0; i < 3; ++i) {
        in_d |= uint32_t(i < a.ntap_d && unsigned(d + a.toff_d[i]) < unsigned(a.ID)) << i;
        in_h |= uint32_t(i < a.ntap_h && unsigned(h + a.toff_h[i]) < unsigned(a.IH)) << i;
        in_w |= uint32_t(i < a.ntap_w && unsigned(wv + a.toff_w[i]) < unsigned(a.IW)) << i;
      }
      uint32_t hw = 0;
#pragma unroll
      for (int i = 0; i < 3; ++i)
        if ((in_h >> i) & 1u) hw |= in_w << (i * a.ntap_w);
#pragma unroll
      for (int i = 0; i < 3; ++i)
        if ((in_d >> i) & 1u) taps |= hw << (i * a.ntap_h * a.ntap_w);
    }
    row_out[r] = ro;
    row_in[r] = ri;
    row_taps[r] = taps;
  }
  __syncthreads();

  // This thread copies column kk of every K tile: A rows r0 + j * ROW_STEP (their origin and taps kept in
  // registers), B rows (output channels) likewise.
  const int kk = (tid % CPR) * VEC, r0 = tid / CPR;
  long long a_base[JA];
  uint32_t a_taps[JA];
#pragma unroll
  for (int j = 0; j < JA; ++j) {
    a_base[j] = row_in[r0 + j * ROW_STEP];
    a_taps[j] = row_taps[r0 + j * ROW_STEP];
  }
  const T* b_row[JB];
  bool b_valid[JB];
#pragma unroll
  for (int j = 0; j < JB; ++j) {
    const int co = n0 + r0 + j * ROW_STEP;
    b_valid[j] = r0 + j * ROW_STEP < BN && co < a.Cout;
    b_row[j] = w + (b_valid[j] ? static_cast<long long>(co) * K : 0);
  }

  // (tap, c) = divmod(kt * kBK + kk, C), advanced one K tile per call: load_stage is called for kt = 0, 1, 2, ...
  int tap = kk / a.C, c = kk - tap * a.C;
  auto load_stage = [&](int stage, int kt) {
    const int k = kt * kBK + kk;
    const bool k_valid = k < K;  // C % VEC == 0: a copy never straddles taps or the end of K
    const long long koff = k_valid ? tap_off[tap] + c : 0;
    T* sA = L::a_stage(smem, stage) + r0 * L::LDA + kk;
#pragma unroll
    for (int j = 0; j < JA; ++j) {
      const bool valid = k_valid && ((a_taps[j] >> tap) & 1u);
      cp_async(sA + j * ROW_STEP * L::LDA, valid ? in + a_base[j] + koff : in, VEC * int(sizeof(T)), valid);
    }
    T* sB = L::b_stage(smem, stage) + r0 * L::LDB + kk;
#pragma unroll
    for (int j = 0; j < JB; ++j) {
      if (JB * ROW_STEP > BN && r0 + j * ROW_STEP >= BN) break;  // rows past the tile
      const bool valid = k_valid && b_valid[j];
      cp_async(sB + j * ROW_STEP * L::LDB, valid ? b_row[j] + k : w, VEC * int(sizeof(T)), valid);
    }
    c += kBK;
    while (c >= a.C) {
      c -= a.C;
      ++tap;
    }
  };

  BlockTile<T, TF32, BM, BN, WARPS_M, false, false> tile;
  tile.init();
  gemm_mainloop<decltype(tile), L>(tile, smem, (K + kBK - 1) / kBK, load_stage);
  float* sC = reinterpret_cast<float*>(smem_raw);
  tile.store(sC);
  __syncthreads();

  store_epilogue<T, BM, BN, L::LDC>(a, sC, row_out, n0);
}

// Stride-1 3x3x3 conv (the forward, and the input gradient of a stride-1 conv) over a 4x4x8 box of output voxels:
// the box's input halo (the box and one voxel around it, 6x6x10 rows of KC channels) is copied into shared memory
// once per channel chunk and every tap's A rows are gathered from it through ldmatrix's per-lane row addresses, so
// the input crosses L2 about 2.8 times per column block instead of 27 times. K runs in the weight's order (tap, then
// channel) in 32-deep steps: with C <= 32 the halo holds every channel and a step may span taps (each half of a
// 16-deep MMA is one tap's 8 channels); with C a multiple of 32, step (chunk, tap) is 32 channels of one tap and the
// halo is double-buffered per chunk. fp16/bf16, C % 8 == 0.
template <class T, int BN>
struct HaloLayout {
  static constexpr int BD = 4, BH = 4, BW = 8, BM = BD * BH * BW;
  static constexpr int HH = BH + 2, HW = BW + 2, HR = (BD + 2) * HH * HW;  // 360 halo rows
  using L = SmemLayout<T, BM, BN, false, false>;  // B stages' and the C tile's geometry
  // Channels per halo row, and its stride: 48 or 80 bytes (an odd multiple of 16), so that ldmatrix's 8 rows of
  // consecutive voxels fall on distinct banks.
  __host__ __device__ static int kc(int C) { return C <= 32 ? C : 32; }
  __host__ __device__ static int ldh(int C) { return kc(C) <= 16 ? 24 : 40; }
  __host__ __device__ static int buffers(int C) { return C <= 32 ? 1 : 2; }
  __host__ __device__ static int halo_elems(int C) { return (buffers(C) * HR * ldh(C) + 63) / 64 * 64; }
  __host__ __device__ static size_t bytes(int C) {
    const size_t pipe = (size_t(halo_elems(C)) + size_t(kStages) * L::B_ELEMS) * sizeof(T);
    return pipe > L::C_BYTES ? pipe : L::C_BYTES;
  }
};

template <class T, int BN, int WARPS_M, bool CHUNKED>  // CHUNKED: C a multiple of 32 above 32, else C <= 32
__global__ void __launch_bounds__(kThreads) conv_halo_kernel(const ConvArgs a) {
  using H = HaloLayout<T, BN>;
  using L = typename H::L;
  constexpr int BM = H::BM, EV = kVec16<T>;
  constexpr int JB = (BN * (kBK / EV) + kThreads - 1) / kThreads;  // B copies per thread per step
  SEG3D_DYNAMIC_SMEM(smem_raw);
  T* halo = reinterpret_cast<T*>(smem_raw);
  T* sB0 = halo + H::halo_elems(a.C);
  __shared__ long long row_out[BM];
  __shared__ int tap_off[27];    // halo-row offset of each tap
  __shared__ int group_off[108];  // C <= 32: halo element offset of each 8-channel group of K (tap, channels)

  const int tid = threadIdx.x, C = a.C, LDH = H::ldh(C), KC = H::kc(C), BUFS = H::buffers(C);
  const int halo_buf = H::HR * LDH;
  constexpr int ntaps = 27;  // 3x3x3 (use_halo)
  const int K = ntaps * C;
  const int groups = C / EV;  // 8-channel groups per tap
  const int k_tiles = CHUNKED ? (C / 32) * ntaps : (K + kBK - 1) / kBK;
  const T* __restrict__ in = reinterpret_cast<const T*>(a.in);
  const T* __restrict__ w = reinterpret_cast<const T*>(a.weight);
  const int boxes_w = (a.QW + H::BW - 1) / H::BW, boxes_h = (a.QH + H::BH - 1) / H::BH,
            boxes_d = (a.QD + H::BD - 1) / H::BD;
  int box = blockIdx.x;
  const int w0 = (box % boxes_w) * H::BW;
  box /= boxes_w;
  const int h0 = (box % boxes_h) * H::BH;
  box /= boxes_h;
  const int d0 = (box % boxes_d) * H::BD, n = box / boxes_d;
  const int n0 = blockIdx.y * BN;

  for (int t = tid; t < ntaps; t += kThreads) {
    const int tw = t % a.ntap_w, tdh = t / a.ntap_w, th = tdh % a.ntap_h, td = tdh / a.ntap_h;
    tap_off[t] = ((pick3(a.toff_d, td) + 1) * H::HH + pick3(a.toff_h, th) + 1) * H::HW + pick3(a.toff_w, tw) + 1;
  }
  for (int r = tid; r < BM; r += kThreads) {
    const int od = d0 + r / (H::BH * H::BW), oh = h0 + (r / H::BW) % H::BH, ow = w0 + r % H::BW;
    row_out[r] = od < a.QD && oh < a.QH && ow < a.QW
                     ? (((static_cast<long long>(n) * a.OD + od) * a.OH + oh) * a.OW + ow) * a.Cout : -1;
  }
  __syncthreads();
  if constexpr (!CHUNKED) {
    for (int f = tid; f < k_tiles * 4; f += kThreads) {
      const int tap = f / groups;
      group_off[f] = tap < ntaps ? tap_off[tap] * LDH + (f - tap * groups) * EV : 0;  // past K: B is zero there
    }
  }

  // Producer: step kt's B tile (32 weights of each output channel) and, at a chunk's first step, its halo.
  auto load_halo = [&](int chunk) {
    T* dst = halo + (chunk % BUFS) * halo_buf;
    const int cpr = KC / EV;  // 16-byte copies per halo row
    for (int i = tid; i < H::HR * cpr; i += kThreads) {
      const int hr = i / cpr, part = i - hr * cpr;
      const int id = d0 + hr / (H::HH * H::HW) - 1, ih = h0 + (hr / H::HW) % H::HH - 1, iw = w0 + hr % H::HW - 1;
      const bool valid = unsigned(id) < unsigned(a.ID) && unsigned(ih) < unsigned(a.IH) && unsigned(iw) < unsigned(a.IW);
      const T* src = in + (((static_cast<long long>(n) * a.ID + id) * a.IH + ih) * a.IW + iw) * C + chunk * 32 + part * EV;
      cp_async(dst + hr * LDH + part * EV, valid ? src : in, 16, valid);
    }
  };
  auto load_stage = [&](int stage, int kt) {
    const int chunk = CHUNKED ? kt / ntaps : 0, tap = CHUNKED ? kt - chunk * ntaps : 0;
    if (CHUNKED ? tap == 0 : kt == 0) load_halo(chunk);
    const int k0 = CHUNKED ? tap * C + chunk * 32 : kt * kBK;  // the step's first K index in the weight rows
    T* sB = sB0 + stage * L::B_ELEMS;
#pragma unroll
    for (int j = 0; j < JB; ++j) {
      const int i = tid + j * kThreads;
      if (JB * kThreads > BN * (kBK / EV) && i >= BN * (kBK / EV)) break;
      const int row = i / (kBK / EV), kk = (i % (kBK / EV)) * EV, co = n0 + row;
      const bool valid = co < a.Cout && (CHUNKED || k0 + kk < K);
      cp_async(sB + row * L::LDB + kk, valid ? w + static_cast<long long>(co) * K + k0 + kk : w, 16, valid);
    }
  };

  // Consumer: this lane's ldmatrix rows (tile i: output row wm0 + 16 i + lane % 8 + 8 ((lane / 8) % 2)) as halo rows,
  // and per step the offsets of its two 8-channel groups (k 0-7 or 8-15 of each 16-deep half: (lane / 8) / 2).
  using Tile = MmaTile<T, BM, BN, WARPS_M, false, false>;
  Tile tile;
  const int lane = tid % 32, q = lane / 8, wm0 = ((tid / 32) % WARPS_M) * Tile::WM;
  int hrow[Tile::FM];
#pragma unroll
  for (int i = 0; i < Tile::FM; ++i) {
    const int r = wm0 + i * 16 + lane % 8 + (q % 2) * 8;
    hrow[i] = ((r / (H::BH * H::BW)) * H::HH + (r / H::BW) % H::BH) * H::HW + r % H::BW;
  }
  tile.init();
  pipeline(k_tiles, load_stage, [&](int stage, int kt) {
    int off_lo, off_hi;  // the lane's groups of K offsets 0-15 and 16-31
    if constexpr (!CHUNKED) {
      off_lo = group_off[4 * kt + q / 2];
      off_hi = group_off[4 * kt + 2 + q / 2];
    } else {
      const int chunk = kt / ntaps, tap = kt - chunk * ntaps;
      off_lo = (chunk % BUFS) * halo_buf + tap_off[tap] * LDH + (q / 2) * EV;
      off_hi = off_lo + 2 * EV;
    }
    tile.step_a([&](int i, int ks) { return halo + hrow[i] * LDH + (ks ? off_hi : off_lo); },
                sB0 + stage * L::B_ELEMS);
  });
  float* sC = reinterpret_cast<float*>(smem_raw);
  tile.store(sC);
  __syncthreads();
  store_epilogue<T, BM, BN, L::LDC>(a, sC, row_out, n0);
}

// Weight gradient v2: each thread owns one voxel row of every K tile (v_begin + kt * kBK + kv) and a fixed set of
// B columns (tap, channel); it walks its voxel kBK voxels per K tile as (n, od, oh, ow), so the loop has no division.
template <class T, bool TF32, int BM, int BN, int WARPS_M, int VEC>
__global__ void __launch_bounds__(kThreads) wgrad_v2_kernel(const WgradArgs a) {
  using L = SmemLayout<T, BM, BN, true, true>;
  constexpr int EV = kVec16<T>;                   // dz copies: 16 bytes
  constexpr int TPR = kThreads / kBK;             // threads per voxel row
  constexpr int CPR_A = BM / EV;                  // 16-byte copies per voxel row of the dz tile
  constexpr int CPT_A = (CPR_A + TPR - 1) / TPR;  // dz copies per thread per K tile (the last maybe for some only)
  constexpr int CPT_B = BN / VEC / TPR;           // input copies (VEC elements: 16 or 8 bytes) per thread per K tile
  static_assert(kThreads % kBK == 0 && BM % EV == 0 && CPT_B * VEC * TPR == BN, "v2 wgrad tile");
  SEG3D_DYNAMIC_SMEM(smem_raw);
  T* smem = reinterpret_cast<T*>(smem_raw);

  const int tid = threadIdx.x;
  const T* __restrict__ dz = reinterpret_cast<const T*>(a.dz);
  const T* __restrict__ in = reinterpret_cast<const T*>(a.in);
  const int ks = a.ksize, pad = a.ksize / 2;
  const int Kw = ks * ks * ks * a.C;
  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM, split = blockIdx.z;
  const int voxels = a.N * a.OD * a.OH * a.OW;  // < 2^31 (checked by the caller)
  const int v_begin = split * a.voxels_per_split;
  const int v_end = min(voxels, v_begin + a.voxels_per_split);
  const int k_tiles = v_end > v_begin ? (v_end - v_begin + kBK - 1) / kBK : 0;

  // Columns: this thread's copies cover elements (tid % TPR + TPR * i) * VEC of the tile's row, i < CPT_B.
  const int kv = tid / TPR, part = tid % TPR;
  int col_d[CPT_B], col_h[CPT_B], col_w[CPT_B];  // the column's tap offset; col_d = 1 << 28 past Kw (never valid)
  long long col_off[CPT_B];                      // its element offset from a voxel's input origin
#pragma unroll
  for (int i = 0; i < CPT_B; ++i) {
    const int nk = n0 + (part + TPR * i) * VEC;  // C % VEC == 0: a copy never straddles taps
    col_d[i] = 1 << 28, col_h[i] = col_w[i] = 0, col_off[i] = 0;
    if (nk < Kw) {
      const int tap = nk / a.C, cin = nk - tap * a.C;
      col_w[i] = tap % ks - pad;
      col_h[i] = (tap / ks) % ks - pad;
      col_d[i] = tap / (ks * ks) - pad;
      col_off[i] = ((static_cast<long long>(col_d[i]) * a.IH + col_h[i]) * a.IW + col_w[i]) * a.C + cin;
    }
  }
  int vn, vd, vh, vw;  // this thread's voxel of the next K tile
  {
    int t = v_begin + kv;
    vw = t % a.OW; t /= a.OW;
    vh = t % a.OH; t /= a.OH;
    vd = t % a.OD;
    vn = t / a.OD;
  }

  auto load_stage = [&](int stage, int kt) {  // called for kt = 0, 1, 2, ... (the voxel walk relies on it)
    const int v = v_begin + kt * kBK + kv;
    const bool v_valid = v < v_end;
    T* sA = L::a_stage(smem, stage) + kv * L::LDA;  // [voxel][c_out]
#pragma unroll
    for (int i = 0; i < CPT_A; ++i) {
      if (CPT_A * TPR > CPR_A && part + TPR * i >= CPR_A) break;  // past the tile's row
      const int mm = (part + TPR * i) * EV, co = m0 + mm;
      const bool valid = v_valid && co < a.Cout;
      cp_async(sA + mm, valid ? dz + static_cast<long long>(v) * a.Cout + co : dz, 16, valid);
    }
    const int id = vd * a.stride, ih = vh * a.stride, iw = vw * a.stride;
    const T* origin = in + (((static_cast<long long>(vn) * a.ID + id) * a.IH + ih) * a.IW + iw) * a.C;
    T* sB = L::b_stage(smem, stage) + kv * L::LDB;  // [voxel][tap, c_in]
#pragma unroll
    for (int i = 0; i < CPT_B; ++i) {
      const bool valid = v_valid && unsigned(id + col_d[i]) < unsigned(a.ID) &&
                         unsigned(ih + col_h[i]) < unsigned(a.IH) && unsigned(iw + col_w[i]) < unsigned(a.IW);
      const T* src = origin + col_off[i];
      cp_async(sB + (part + TPR * i) * VEC, valid ? src : in, VEC * int(sizeof(T)), valid);
    }
    vw += kBK;
    while (vw >= a.OW) {
      vw -= a.OW;
      if (++vh == a.OH) {
        vh = 0;
        if (++vd == a.OD) {
          vd = 0;
          ++vn;
        }
      }
    }
  };

  BlockTile<T, TF32, BM, BN, WARPS_M, true, true> tile;
  tile.init();
  gemm_mainloop<decltype(tile), L>(tile, smem, k_tiles, load_stage);
  float* sC = reinterpret_cast<float*>(smem_raw);
  tile.store(sC);
  __syncthreads();

  // 4 fp32 per store (Kw % 4 == 0 and BN % 4 == 0: a piece is wholly in or out).
  float* partial = reinterpret_cast<float*>(a.partial);
  for (int i = tid; i < BM * (BN / 4); i += kThreads) {
    const int r = i / (BN / 4), c4 = (i % (BN / 4)) * 4, co = m0 + r, col = n0 + c4;
    if (co < a.Cout && col < Kw)
      *reinterpret_cast<float4*>(partial + (static_cast<long long>(split) * a.Cout + co) * Kw + col) =
          *reinterpret_cast<const float4*>(sC + r * L::LDC + c4);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side.
// Every kernel's dynamic shared memory is set before its launch (most need more than the default 48 KiB). A tile that
// does not fit the card (its opt-in limit: 99 KiB on sm_86 / sm_89 / sm_120) raises with both sizes in the message.
template <class Kernel>
void set_smem(Kernel kernel, size_t bytes, const char* name) {
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err == cudaSuccess) return;
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) == cudaSuccess) optin = max_shared_memory(device);
  check_cuda(err, (std::string("cudaFuncSetAttribute(") + name + ", MaxDynamicSharedMemorySize = " +
                   std::to_string(bytes) + " bytes; this GPU allows " + std::to_string(optin) + " per block)")
                      .c_str());
}

// Upper bound of a conv kernel's static __shared__ arrays (row tables: 3.1 KiB at most), which count against the
// same per-block limit as the dynamic shared memory.
constexpr size_t kStaticSmemBound = 4096;
// The least opt-in shared memory per block of the cards the backend runs on (sm_80 and later): 99 KiB (sm_86 / sm_89 /
// sm_120). Every tile but the optional 128x128 and 128x64 conv tiles (launch_conv_tiles) fits it.
constexpr size_t kLeastSmemOptin = 101376;

// VEC: 0 for the first kernel generation, else the second, copying operands VEC elements (16 or 8 bytes) at a time.
template <class T, bool TF32, int BM, int BN, int WARPS_M, int VEC>
void launch_conv_tile(const ConvArgs& a, cudaStream_t stream) {
  const long long M = static_cast<long long>(a.N) * a.QD * a.QH * a.QW;
  if (M == 0 || a.Cout == 0) return;
  auto kernel = [] {  // only the generation in use is instantiated
    if constexpr (VEC > 0) return conv_gemm_v2_kernel<T, TF32, BM, BN, WARPS_M, VEC>;
    else return conv_gemm_kernel<T, TF32, BM, BN, WARPS_M>;
  }();
  const size_t smem = SmemLayout<T, BM, BN, false, false>::BYTES;
  static_assert((BM == 128 && BN >= 64) || SmemLayout<T, BM, BN, false, false>::BYTES + kStaticSmemBound <= kLeastSmemOptin,
                "a conv tile without a smaller alternative must fit every card");
  set_smem(kernel, smem, VEC ? "conv_gemm_v2_kernel" : "conv_gemm_kernel");
  dim3 grid(static_cast<unsigned>((M + BM - 1) / BM), static_cast<unsigned>((a.Cout + BN - 1) / BN));
  SEG3D_LAUNCH(kernel, grid, kThreads, smem, stream)(a);
  check_cuda(cudaGetLastError(), VEC ? "launch of conv_gemm_v2_kernel" : "launch of conv_gemm_kernel");
}

// Narrow output channel counts (the network has 8 and 16) get narrow, tall tiles instead of wasted columns. Wider
// layers take the largest tile that still gives the card about 1.5 waves of blocks (two resident per SM), so that
// small volumes do not leave SMs idle: 128x128 (each gathered input tile serves 128 channels), 128x64, 64x64; and
// that fits the card's shared memory per block (smem_optin): fp32's 128x64 tile takes 108 KiB, more than the 99 KiB
// of sm_86 / sm_89 / sm_120 cards, which take 64x64 (72 KiB) instead. Every other conv tile fits 99 KiB.
template <class T, bool TF32, int VEC>
void launch_conv_tiles(const ConvArgs& a, int sms, int smem_optin, cudaStream_t stream) {
  const long long M = static_cast<long long>(a.N) * a.QD * a.QH * a.QW;
  auto enough_blocks = [&](int bm, int bn) {
    return ((M + bm - 1) / bm) * ((a.Cout + bn - 1) / bn) >= 3LL * sms;
  };
  auto fits = [&](size_t bytes) { return bytes + kStaticSmemBound <= static_cast<size_t>(smem_optin); };
  if (a.Cout <= 16) launch_conv_tile<T, TF32, 128, 16, 4, VEC>(a, stream);
  else if (a.Cout <= 32) launch_conv_tile<T, TF32, 128, 32, 4, VEC>(a, stream);
  else if (!std::is_same<T, float>::value && a.Cout > 64 && enough_blocks(128, 128) &&
           fits(SmemLayout<T, 128, 128, false, false>::BYTES)) {
    if constexpr (!std::is_same<T, float>::value) launch_conv_tile<T, TF32, 128, 128, 2, VEC>(a, stream);
  } else if (enough_blocks(128, 64) && fits(SmemLayout<T, 128, 64, false, false>::BYTES))
    launch_conv_tile<T, TF32, 128, 64, 2, VEC>(a, stream);
  else launch_conv_tile<T, TF32, 64, 64, 2, VEC>(a, stream);
}

template <class T, int BN, int WARPS_M, bool CHUNKED>
void launch_halo_chunks(const ConvArgs& a, cudaStream_t stream) {
  using H = HaloLayout<T, BN>;
  const long long boxes = static_cast<long long>(a.N) * ((a.QD + H::BD - 1) / H::BD) *
                          ((a.QH + H::BH - 1) / H::BH) * ((a.QW + H::BW - 1) / H::BW);
  if (boxes == 0 || a.Cout == 0) return;
  auto kernel = conv_halo_kernel<T, BN, WARPS_M, CHUNKED>;
  const size_t smem = H::bytes(a.C);
  set_smem(kernel, smem, "conv_halo_kernel");
  dim3 grid(static_cast<unsigned>(boxes), static_cast<unsigned>((a.Cout + BN - 1) / BN));
  SEG3D_LAUNCH(kernel, grid, kThreads, smem, stream)(a);
  SEG3D_CHECK_LAUNCH("conv_halo_kernel");
}

template <class T, int BN, int WARPS_M>
void launch_halo_tile(const ConvArgs& a, cudaStream_t stream) {
  if (a.C > 32) launch_halo_chunks<T, BN, WARPS_M, true>(a, stream);
  else launch_halo_chunks<T, BN, WARPS_M, false>(a, stream);
}

// The halo kernel (third generation) takes stride-1 3x3x3 convs over the whole output grid with 16-byte channel
// pieces and C <= 32 or a multiple of 32.
template <class T>
bool use_halo(const ConvArgs& a) {
  if (sizeof(T) != 2 || a.kernels < 3 || a.vec != kVec16<T> || a.Cout % kVec16<T> != 0) return false;
  if (a.in_stride != 1 || a.out_stride != 1 || a.out_off_d || a.out_off_h || a.out_off_w) return false;
  if (a.ntap_d != 3 || a.ntap_h != 3 || a.ntap_w != 3 || !(a.C <= 32 || a.C % 32 == 0)) return false;
  for (int i = 0; i < 3; ++i)
    if (std::abs(a.toff_d[i]) > 1 || std::abs(a.toff_h[i]) > 1 || std::abs(a.toff_w[i]) > 1) return false;
  return true;
}

// The second generation needs output channels in 16-byte pieces (its epilogue) and input channels in 16-byte
// pieces, or in 8-byte ones (4-channel fp16/bf16 images) for the narrow tiles; at most 27 taps (k <= 3).
template <class T, bool TF32>
void launch_conv(const ConvArgs& a, int sms, int smem_optin, cudaStream_t stream) {
  if constexpr (sizeof(T) == 2) {
    if (use_halo<T>(a)) {
      if (a.Cout <= 16) launch_halo_tile<T, 16, 4>(a, stream);
      else if (a.Cout <= 32) launch_halo_tile<T, 32, 4>(a, stream);
      else launch_halo_tile<T, 64, 2>(a, stream);
      return;
    }
  }
  const bool v2 = a.kernels >= 2 && a.Cout % kVec16<T> == 0 && a.ntap_d * a.ntap_h * a.ntap_w <= 27;
  if (v2 && a.vec == kVec16<T>) return launch_conv_tiles<T, TF32, kVec16<T>>(a, sms, smem_optin, stream);
  if constexpr (sizeof(T) == 2) {
    if (v2 && a.vec == kVec16<T> / 2 && a.Cout <= 32) {
      if (a.Cout <= 16) launch_conv_tile<T, TF32, 128, 16, 4, kVec16<T> / 2>(a, stream);
      else launch_conv_tile<T, TF32, 128, 32, 4, kVec16<T> / 2>(a, stream);
      return;
    }
  }
  launch_conv_tiles<T, TF32, 0>(a, sms, smem_optin, stream);
}

template <class T>
void launch_wgrad_reduce(const WgradArgs& a, int Kw, cudaStream_t stream) {
  const long long count = static_cast<long long>(a.Cout) * Kw;
  const int blocks = static_cast<int>(std::min<long long>((count + 255) / 256, 4096));
  SEG3D_LAUNCH(wgrad_reduce_kernel<T>, blocks, 256, 0, stream)(reinterpret_cast<const float*>(a.partial),
                                                     reinterpret_cast<T*>(a.grad_weight), count, a.splits);
  SEG3D_CHECK_LAUNCH("wgrad_reduce_kernel");
}

template <class T, bool TF32, int BM, int BN, int WARPS_M, int VEC>  // VEC as in launch_conv_tile, for the input
void launch_wgrad_tile(const WgradArgs& a, cudaStream_t stream) {
  const int Kw = a.ksize * a.ksize * a.ksize * a.C;
  auto kernel = [] {
    if constexpr (VEC > 0) return wgrad_v2_kernel<T, TF32, BM, BN, WARPS_M, VEC>;
    else return wgrad_kernel<T, TF32, BM, BN, WARPS_M>;
  }();
  const size_t smem = SmemLayout<T, BM, BN, true, true>::BYTES;
  static_assert(SmemLayout<T, BM, BN, true, true>::BYTES <= kLeastSmemOptin, "wgrad tiles must fit every card");
  set_smem(kernel, smem, VEC ? "wgrad_v2_kernel" : "wgrad_kernel");
  dim3 grid((Kw + BN - 1) / BN, (a.Cout + BM - 1) / BM, a.splits);
  SEG3D_LAUNCH(kernel, grid, kThreads, smem, stream)(a);
  check_cuda(cudaGetLastError(), VEC ? "launch of wgrad_v2_kernel" : "launch of wgrad_kernel");
  launch_wgrad_reduce<T>(a, Kw, stream);
}

// Tiles: M = C_out (one M tile up to 64), N = taps x C_in (128 wide, but 64 for fp32 and the first generation's
// wider M tiles). Mirrored by _grad_weight in backends/cuda.py. The second
// generation needs dz in 16-byte pieces and the input in 16-byte ones, or 8-byte ones (fp16/bf16, C_out <= 32).
template <class T, bool TF32>
void launch_wgrad(const WgradArgs& a, cudaStream_t stream) {
  constexpr int V = kVec16<T>;
  if (a.kernels >= 2 && a.vec_dz == V && a.vec_in == V) {
    if (a.Cout <= 16) launch_wgrad_tile<T, TF32, 16, 128, 1, V>(a, stream);
    else if (a.Cout <= 32) launch_wgrad_tile<T, TF32, 32, 128, 1, V>(a, stream);
    else if constexpr (sizeof(T) == 2) launch_wgrad_tile<T, TF32, 64, 128, 2, V>(a, stream);
    else launch_wgrad_tile<T, TF32, 64, 64, 2, V>(a, stream);
    return;
  }
  if constexpr (sizeof(T) == 2) {
    if (a.kernels >= 2 && a.vec_dz == V && a.vec_in == V / 2 && a.Cout <= 32) {
      if (a.Cout <= 16) launch_wgrad_tile<T, TF32, 16, 128, 1, V / 2>(a, stream);
      else launch_wgrad_tile<T, TF32, 32, 128, 1, V / 2>(a, stream);
      return;
    }
  }
  if (a.Cout <= 16) launch_wgrad_tile<T, TF32, 16, 128, 1, 0>(a, stream);
  else launch_wgrad_tile<T, TF32, 64, 64, 2, 0>(a, stream);
}

template <class T>
void launch_prelu_backward(uint64_t g, uint64_t saved, uint64_t alpha, uint64_t dz, uint64_t grad_bias,
                           uint64_t grad_alpha, uint64_t partial, long long rows, int C, int saved_kind,
                           int alpha_mode, int row_blocks, cudaStream_t stream) {
  const int tile_c = C >= 32 ? 32 : C > 8 ? 16 : 8;
  const long long rows_per_block = (rows + row_blocks - 1) / row_blocks;
  float* part_bias = reinterpret_cast<float*>(partial);
  float* part_alpha = part_bias + static_cast<long long>(row_blocks) * C;
  dim3 grid(row_blocks, (C + tile_c - 1) / tile_c);
  SEG3D_LAUNCH(prelu_backward_kernel<T>, grid, kPreluThreads, 0, stream)(
      reinterpret_cast<const T*>(g), reinterpret_cast<const T*>(saved), reinterpret_cast<const float*>(alpha),
      reinterpret_cast<T*>(dz), part_bias, part_alpha, rows, C, tile_c, saved_kind, alpha_mode, rows_per_block);
  SEG3D_CHECK_LAUNCH("prelu_backward_kernel");
  if (grad_bias) {
    SEG3D_LAUNCH(channel_sums_kernel, 1, 256, 0, stream)(part_bias, row_blocks, C, reinterpret_cast<float*>(grad_bias),
                                                        0);
    SEG3D_CHECK_LAUNCH("channel_sums_kernel");
  }
  if (grad_alpha) {
    SEG3D_LAUNCH(channel_sums_kernel, 1, 256, 0, stream)(part_alpha, row_blocks, C,
                                                        reinterpret_cast<float*>(grad_alpha), alpha_mode == 1);
    SEG3D_CHECK_LAUNCH("channel_sums_kernel");
  }
}

}  // namespace

void conv_gemm(const ConvArgs& a, int dtype, bool tf32, int device, uint64_t stream) {
  use_device(device);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const int sms = multiprocessors(device), optin = max_shared_memory(device);
  switch (dtype) {
    case kFloat32:
      tf32 ? launch_conv<float, true>(a, sms, optin, s) : launch_conv<float, false>(a, sms, optin, s);
      break;
    case kFloat16: launch_conv<__half, false>(a, sms, optin, s); break;
    case kBFloat16: launch_conv<__nv_bfloat16, false>(a, sms, optin, s); break;
    default: throw std::invalid_argument("seg3d_fast._cuda.conv_gemm: unknown dtype code " + std::to_string(dtype));
  }
}

void conv_wgrad(const WgradArgs& a, int dtype, bool tf32, int device, uint64_t stream) {
  use_device(device);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: tf32 ? launch_wgrad<float, true>(a, s) : launch_wgrad<float, false>(a, s); break;
    case kFloat16: launch_wgrad<__half, false>(a, s); break;
    case kBFloat16: launch_wgrad<__nv_bfloat16, false>(a, s); break;
    default: throw std::invalid_argument("seg3d_fast._cuda.conv_wgrad: unknown dtype code " + std::to_string(dtype));
  }
}

void prelu_backward(uint64_t grad_out, uint64_t saved, uint64_t alpha, uint64_t dz, uint64_t grad_bias,
                    uint64_t grad_alpha, uint64_t partial, int64_t rows, int C, int saved_kind, int alpha_mode,
                    int row_blocks, int dtype, int device, uint64_t stream) {
  use_device(device);
  if (rows == 0 || C == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: launch_prelu_backward<float>(grad_out, saved, alpha, dz, grad_bias, grad_alpha, partial, rows, C, saved_kind, alpha_mode, row_blocks, s); break;
    case kFloat16: launch_prelu_backward<__half>(grad_out, saved, alpha, dz, grad_bias, grad_alpha, partial, rows, C, saved_kind, alpha_mode, row_blocks, s); break;
    case kBFloat16: launch_prelu_backward<__nv_bfloat16>(grad_out, saved, alpha, dz, grad_bias, grad_alpha, partial, rows, C, saved_kind, alpha_mode, row_blocks, s); break;
    default: throw std::invalid_argument("seg3d_fast._cuda.prelu_backward: unknown dtype code " + std::to_string(dtype));
  }
}

}  // namespace seg3d
