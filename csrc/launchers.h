// Host entry points of the kernels (plain C++ types only; bindings.cpp exposes them to Python).
// Pointers are device addresses (torch's tensor.data_ptr()), streams are cudaStream_t values
// (torch.cuda.current_stream().cuda_stream). Every tensor is channels-last (N, D, H, W, C) contiguous.
#pragma once

#include <cstdint>

namespace seg3d {

// Implicit GEMM "gather conv": for every point q of an output grid (N, QD, QH, QW) and output channel co,
//   out[n, q*out_stride + out_off, co] = sum_{taps t, ci} in[n, q*in_stride + toff_t, ci] * w[co, t, ci]
// (out-of-range input coordinates read 0), followed by the fused epilogue. The forward pass is this with
// the conv's taps; dgrad is this with the flipped, transposed weight (stride 2: once per parity phase).
struct ConvArgs {
  uint64_t in = 0, weight = 0, out = 0;           // in (N,ID,IH,IW,C), weight (Cout, ntaps, C), out (N,OD,OH,OW,Cout)
  uint64_t bias = 0, alpha = 0, residual = 0, act = 0;  // optional (0 = absent); residual/act shaped like out;
                                                        // bias and alpha float32 (any T), 16-byte aligned
  int N = 0, ID = 0, IH = 0, IW = 0, C = 0;
  int QD = 0, QH = 0, QW = 0;                     // computed grid
  int OD = 0, OH = 0, OW = 0, Cout = 0;           // full output tensor
  int in_stride = 1, out_stride = 1, out_off_d = 0, out_off_h = 0, out_off_w = 0;
  int ntap_d = 0, ntap_h = 0, ntap_w = 0;         // taps per dim (0..3); K = ntap_d*ntap_h*ntap_w*C
  int toff_d[3] = {0, 0, 0}, toff_h[3] = {0, 0, 0}, toff_w[3] = {0, 0, 0};
  int alpha_mode = 0;                             // 0 no activation, 1 one alpha, 2 one per channel
  int residual_first = 0;                         // residual summed before the activation
  int vec = 0;                                    // elements per cp.async copy (2, 4, 8 or 16 bytes; divides C)
  int kernels = 3;                                // 3: the halo kernel for stride-1 3x3x3 convs where it applies,
                                                  // else as 2; 2: v2 kernels where the channels allow; 1: v1
};
void conv_gemm(const ConvArgs& a, int dtype, bool tf32, int device, uint64_t stream);

// Weight gradient: gw[co, t, ci] = sum_voxels dz[v, co] * in[v*stride + tap_t - pad, ci], split over voxel ranges
// into fp32 partials (splits, Cout, taps*C) and summed in a fixed order (deterministic), written in gw's dtype.
struct WgradArgs {
  uint64_t dz = 0, in = 0, partial = 0, grad_weight = 0;
  int N = 0, ID = 0, IH = 0, IW = 0, C = 0;       // conv input
  int OD = 0, OH = 0, OW = 0, Cout = 0;           // conv output (= dz)
  int stride = 1, ksize = 3;
  int splits = 1, voxels_per_split = 0;           // voxels_per_split is a multiple of 32
  int vec_dz = 0, vec_in = 0;                     // elements per cp.async copy of dz (divides Cout) and in (C)
  int kernels = 2;                                // as ConvArgs::kernels
};
void conv_wgrad(const WgradArgs& a, int dtype, bool tf32, int device, uint64_t stream);

// PReLU backward over grad_out (rows, C): dz = grad_out * (z > 0 ? 1 : alpha) (written when dz != 0), and
// grad_bias = sum dz, grad_alpha = sum grad_out * z * (z <= 0), reduced in a fixed order. alpha, grad_bias and
// grad_alpha are float32 for every dtype (the parameters of mixed-precision training are: no casts either way).
// saved_kind 0: none (z unused, dz = grad_out), 1: saved = PReLU output y (z = y / alpha where y <= 0), 2: saved = z.
void prelu_backward(uint64_t grad_out, uint64_t saved, uint64_t alpha, uint64_t dz, uint64_t grad_bias,
                    uint64_t grad_alpha, uint64_t partial, int64_t rows, int C, int saved_kind, int alpha_mode,
                    int row_blocks, int dtype, int device, uint64_t stream);

// Jaccard sums (N, C, 3) fp32 and their backward; logits (N, C, S) contiguous, target (N, S) labels of
// `label_type` or (N, C, S) probabilities in the logits dtype (kProb) or float32 (kProbF32). partial: fp32
// (N, blocks, C, 3) scratch.
int jaccard_blocks(int64_t S);
void jaccard_sums(uint64_t logits, uint64_t target, uint64_t partial, uint64_t sums, int N, int C, int64_t S,
                  int label_type, bool squared, bool sigmoid, bool has_ignore, int64_t ignore_index, int dtype,
                  int device, uint64_t stream);
void jaccard_backward(uint64_t grad_sums, uint64_t logits, uint64_t target, uint64_t grad_logits, int N, int C,
                      int64_t S, int label_type, bool squared, bool sigmoid, bool has_ignore, int64_t ignore_index,
                      int dtype, int device, uint64_t stream);
// The reduced loss (API.md's jaccard_loss_reduced): jaccard_sums' launches that also write the loss (0-d fp32)
//   sum_rows sum_c w_c (1 - (I + smooth) / (P + T - I + smooth)), rows = the samples (per_sample) or their pooled
//   sums, divided by rows * sum_c w_c for mean; weights fp32 (C,). Label maps (not kProb / kProbF32): also
//   label_range int64 (2,) = least, greatest counted label (2^62, -2^62 when none counts), range_partial int64
//   (N, blocks, 2) scratch (both ignored for probabilities). N >= 1. sums: (N, C, 3) fp32, and for the pooled loss
//   (!per_sample) (N + 1, C, 3): row N gets the pooled sums.
void jaccard_loss(uint64_t logits, uint64_t target, uint64_t weights, uint64_t partial, uint64_t range_partial,
                  uint64_t sums, uint64_t loss, uint64_t label_range, int N, int C, int64_t S, int label_type,
                  bool squared, bool sigmoid, bool has_ignore, int64_t ignore_index, float smooth, bool per_sample,
                  bool mean, int dtype, int device, uint64_t stream);
// Its backward in one launch: grad_logits for dL/dloss grad_loss (fp32 0-d), from the loss's rows of jaccard_loss's
// sums (per_sample: its (N, C, 3); pooled: its row N, (1, C, 3)) and the weights.
void jaccard_loss_backward(uint64_t grad_loss, uint64_t sums, uint64_t weights, uint64_t logits, uint64_t target,
                           uint64_t grad_logits, int N, int C, int64_t S, int label_type, bool squared, bool sigmoid,
                           bool has_ignore, int64_t ignore_index, float smooth, bool per_sample, bool mean, int dtype,
                           int device, uint64_t stream);
constexpr int kMaxClasses = 32;

int device_count();  // raises with the CUDA error text when no usable GPU/driver

}  // namespace seg3d
