"""Fused upsampling block: transposed conv (kernel 2, stride 2) + bias + PReLU + skip sum, forward and backward.

A kernel-2 stride-2 transposed conv gives each output voxel (2i + a, 2j + b, 2k + c) from the one input voxel
(i, j, k) through the weight tap (a, b, c): per tap a GEMM of the input rows (M = N*D*H*W, K = C_in) with that tap's
(C_in, C_out) matrix. The forward computes it with the epilogue on the accumulator (one store of the output); the
backward recomputes z per tap in registers from x (1/8 of the output's voxels) and never stores z or dz:
  _upconv_dgrad_kernel: per block of input rows, the 8 taps: dz = g * (z > 0 ? 1 : alpha), grad_x += dz @ W_tap^T,
      and the bias and alpha partial sums of its rows;
  _upconv_wgrad_kernel: per (split of the rows, tap): grad_W_tap partial = x^T @ dz, summed over splits on the host.
No atomics: deterministic.
"""
import torch
import triton
import triton.language as tl

from .._layout import out_format
from ._common import (autotune_configs, block_row_coords, by_channel, cdiv, dot, dot_precision, next_pow2,
                      parallel_slots, strided_offset, tensor_reasons)

MAX_CHANNELS = 32  # the backward holds a tap's whole (C_in, C_out) weight and the rows' channels in registers: from 64
                   # channels every tile spills on sm_90 (benchmarks/aot_check.py), so wider blocks take the reference


@triton.jit
def _tap_weight(w_ptr, tap, ci, co, ci_ok, co_ok, w_si, w_so, w_sa, w_sb, w_sc, dtype):
    """The (C_in block, C_out block) matrix of tap (a, b, c) = (tap // 4, tap // 2 % 2, tap % 2), in `dtype` (the
    activations': float32 weights of fp16 / bf16 activations are cast here)."""
    offset = (tap // 4) * w_sa + ((tap // 2) % 2) * w_sb + (tap % 2) * w_sc
    return tl.load(w_ptr + offset + ci[:, None] * w_si + co[None, :] * w_so, mask=ci_ok[:, None] & co_ok[None, :],
                   other=0.0).to(dtype)


@triton.jit
def _out_offset(n, i, j, k, tap, o_sn, o_sd, o_sh, o_sw):
    """Element offset of output voxel (n, 2i + a, 2j + b, 2k + c) for tap (a, b, c)."""
    return strided_offset(n, 2 * i + tap // 4, 2 * j + (tap // 2) % 2, 2 * k + tap % 2, o_sn, o_sd, o_sh, o_sw)


@triton.jit
def _bias_and_alpha(b_ptr, a_ptr, co, co_ok, HAS_BIAS: tl.constexpr, ALPHA_PER_CH: tl.constexpr):
    """(bias of the columns co as fp32, zeros without one; alpha as a row to broadcast, or the shared scalar)."""
    bias = tl.zeros(co.shape, dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + co, mask=co_ok, other=0.0).to(tl.float32)
    if ALPHA_PER_CH:
        alpha = tl.load(a_ptr + co, mask=co_ok, other=1.0).to(tl.float32)[None, :]
    else:
        alpha = tl.load(a_ptr).to(tl.float32)
    return bias, alpha


@triton.jit
def _prelu_terms(z, g, alpha):
    """(dz, the alpha gradient's terms) of PReLU at pre-activation z for upstream gradient g (fp32 blocks)."""
    positive = z > 0
    return tl.where(positive, g, g * alpha), tl.where(positive, 0.0, g * z)


# Tile configs and their prune rules: every kept config compiles without spills for sm_90 at 8, 16, 32 and 64 channels
# (benchmarks/aot_check.py --all-configs --only upconv, Triton 3.6 and 3.9).
def _fwd_configs():
    gpu = [triton.Config({"BLOCK_M": bm}, num_warps=w) for bm, w in ((32, 4), (64, 4), (64, 8), (128, 4), (128, 8))]
    return autotune_configs(gpu, triton.Config({"BLOCK_M": 64}, num_warps=4),
                            triton.Config({"BLOCK_M": 16}, num_warps=4))


def _prune_fwd(configs, named_args, **kwargs):
    """The fp32 accumulator at most 16 values per thread."""
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * kwargs["BLOCK_N"] <= 16 * 32 * c.num_warps]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] / c.num_warps)]


@triton.autotune(configs=_fwd_configs(), key=["M", "C_IN", "C_OUT"], cache_results=True,
                 prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit
def _upconv_fwd_kernel(x_ptr, w_ptr, b_ptr, a_ptr, skip_ptr, out_ptr,
                       M, D, H, W, C_IN, C_OUT,
                       x_sn, x_sc, x_sd, x_sh, x_sw, w_si, w_so, w_sa, w_sb, w_sc,
                       o_sn, o_sc, o_sd, o_sh, o_sw, s_sn, s_sc, s_sd, s_sh, s_sw,
                       HAS_BIAS: tl.constexpr, ALPHA_PER_CH: tl.constexpr, HAS_SKIP: tl.constexpr,
                       DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    """out[n, :, 2i+a, 2j+b, 2k+c] = prelu(x[n, :, i, j, k] @ W[:, :, a, b, c] + bias) + skip; grid (row blocks,
    8 taps, C_out blocks)."""
    tap = tl.program_id(1)
    start = tl.program_id(0).to(tl.int64) * BLOCK_M
    n, i, j, k = block_row_coords(start, D, H, W, BLOCK_M)
    row_ok = start + tl.arange(0, BLOCK_M) < M
    co = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < C_OUT
    x_row = strided_offset(n, i, j, k, x_sn, x_sd, x_sh, x_sw)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C_IN, BLOCK_K):
        ci = k0 + tl.arange(0, BLOCK_K)
        ci_ok = ci < C_IN
        a = tl.load(x_ptr + x_row[:, None] + ci[None, :].to(tl.int64) * x_sc, mask=row_ok[:, None] & ci_ok[None, :],
                    other=0.0)
        w = _tap_weight(w_ptr, tap, ci, co, ci_ok, co_ok, w_si, w_so, w_sa, w_sb, w_sc, x_ptr.dtype.element_ty)
        acc = dot(a, w, acc, DOT_PREC)
    bias, alpha = _bias_and_alpha(b_ptr, a_ptr, co, co_ok, HAS_BIAS, ALPHA_PER_CH)
    acc += bias[None, :]
    acc = tl.where(acc > 0, acc, acc * alpha)
    mask = row_ok[:, None] & co_ok[None, :]
    if HAS_SKIP:
        s_off = _out_offset(n, i, j, k, tap, s_sn, s_sd, s_sh, s_sw)[:, None] + co[None, :].to(tl.int64) * s_sc
        acc += tl.load(skip_ptr + s_off, mask=mask, other=0.0).to(tl.float32)
    o_off = _out_offset(n, i, j, k, tap, o_sn, o_sd, o_sh, o_sw)[:, None] + co[None, :].to(tl.int64) * o_sc
    tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _bwd_configs():
    gpu = [triton.Config({"BLOCK_M": bm}, num_warps=w) for bm, w in ((32, 4), (64, 4), (32, 8), (64, 8), (128, 8))]
    return autotune_configs(gpu, triton.Config({"BLOCK_M": 64}, num_warps=8),
                            triton.Config({"BLOCK_M": 16}, num_warps=4))


def _prune_bwd(configs, named_args, **kwargs):
    """Rows x (C_in + 2 C_out) (the x rows and grad_x, a tap's z and g / dz, held at once) at most 24 values per
    thread, and above 16 channels 8 warps on 64-row tiles (wgmma; 4-warp or 32-row mma.sync tiles spill there)."""
    per_row = kwargs["BLOCK_CI"] + 2 * kwargs["BLOCK_CO"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * per_row <= 24 * 32 * c.num_warps
            and (per_row <= 48 or (c.num_warps == 8 and c.kwargs["BLOCK_M"] >= 64))]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] / c.num_warps)]


@triton.autotune(configs=_bwd_configs(), key=["M", "C_IN", "C_OUT"], cache_results=True,
                 prune_configs_by={"early_config_prune": _prune_bwd})
@triton.jit
def _upconv_dgrad_kernel(x_ptr, w_ptr, b_ptr, a_ptr, g_ptr, gx_ptr, db_ptr, da_ptr,
                         M, D, H, W, C_IN, C_OUT,
                         x_sn, x_sc, x_sd, x_sh, x_sw, w_si, w_so, w_sa, w_sb, w_sc,
                         g_sn, g_sc, g_sd, g_sh, g_sw, gx_sn, gx_sc, gx_sd, gx_sh, gx_sw,
                         HAS_BIAS: tl.constexpr, ALPHA_PER_CH: tl.constexpr, WANT_X: tl.constexpr,
                         WANT_B: tl.constexpr, WANT_A: tl.constexpr, DOT_PREC: tl.constexpr,
                         BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_M: tl.constexpr):
    """grad_x of a block of input rows (z and dz of its 8 taps recomputed in registers), and the block's partial
    sums of the bias and alpha gradients (row pid of db_ptr / da_ptr, BLOCK_CO wide)."""
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * BLOCK_M
    n, i, j, k = block_row_coords(start, D, H, W, BLOCK_M)
    row_ok = start + tl.arange(0, BLOCK_M) < M
    ci = tl.arange(0, BLOCK_CI)
    ci_ok = ci < C_IN
    co = tl.arange(0, BLOCK_CO)
    co_ok = co < C_OUT
    x_row = strided_offset(n, i, j, k, x_sn, x_sd, x_sh, x_sw)
    xt = tl.load(x_ptr + x_row[:, None] + ci[None, :].to(tl.int64) * x_sc, mask=row_ok[:, None] & ci_ok[None, :],
                 other=0.0)
    bias, alpha = _bias_and_alpha(b_ptr, a_ptr, co, co_ok, HAS_BIAS, ALPHA_PER_CH)
    mask = row_ok[:, None] & co_ok[None, :]
    gx = tl.zeros((BLOCK_M, BLOCK_CI), dtype=tl.float32)
    db = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    da = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    for tap in tl.static_range(8):
        w = _tap_weight(w_ptr, tap, ci, co, ci_ok, co_ok, w_si, w_so, w_sa, w_sb, w_sc, x_ptr.dtype.element_ty)
        z = dot(xt, w, tl.zeros((BLOCK_M, BLOCK_CO), dtype=tl.float32), DOT_PREC) + bias[None, :]
        g_off = _out_offset(n, i, j, k, tap, g_sn, g_sd, g_sh, g_sw)[:, None] + co[None, :].to(tl.int64) * g_sc
        g = tl.load(g_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
        dz, alpha_terms = _prelu_terms(z, g, alpha)
        if WANT_B:
            db += tl.sum(dz, axis=0)
        if WANT_A:
            da += tl.sum(alpha_terms, axis=0)
        if WANT_X:
            gx = dot(dz.to(w.dtype), tl.trans(w), gx, DOT_PREC)
    if WANT_X:
        gx_off = strided_offset(n, i, j, k, gx_sn, gx_sd, gx_sh, gx_sw)[:, None] + ci[None, :].to(tl.int64) * gx_sc
        tl.store(gx_ptr + gx_off, gx.to(gx_ptr.dtype.element_ty), mask=row_ok[:, None] & ci_ok[None, :])
    row = pid.to(tl.int64) * BLOCK_CO  # partial row pid (pid * BLOCK_CO passes 2^31 from 2^32 input rows)
    if WANT_B:
        tl.store(db_ptr + row + co, db)
    if WANT_A:
        tl.store(da_ptr + row + co, da)


def _wgrad_configs():
    gpu = [triton.Config({"BLOCK_M": bm}, num_warps=w) for bm, w in ((32, 4), (64, 4), (64, 8), (128, 8))]
    return autotune_configs(gpu, triton.Config({"BLOCK_M": 64}, num_warps=8),
                            triton.Config({"BLOCK_M": 16}, num_warps=4))


def _prune_wgrad(configs, named_args, **kwargs):
    """The (C_in, C_out) accumulator plus a block's rows x (C_in + 2 C_out) at most 64 fp32 values per thread."""
    ci, co = kwargs["BLOCK_CI"], kwargs["BLOCK_CO"]
    kept = [c for c in configs if ci * co + c.kwargs["BLOCK_M"] * (ci + 2 * co) <= 64 * 32 * c.num_warps]
    return kept or [max(configs, key=lambda c: c.num_warps / c.kwargs["BLOCK_M"])]


@triton.autotune(configs=_wgrad_configs(), key=["M", "C_IN", "C_OUT"], cache_results=True,
                 prune_configs_by={"early_config_prune": _prune_wgrad})
@triton.jit
def _upconv_wgrad_kernel(x_ptr, w_ptr, b_ptr, a_ptr, g_ptr, dw_ptr,
                         M, D, H, W, C_IN, C_OUT, ROWS_PER_SPLIT,
                         x_sn, x_sc, x_sd, x_sh, x_sw, w_si, w_so, w_sa, w_sb, w_sc,
                         g_sn, g_sc, g_sd, g_sh, g_sw,
                         HAS_BIAS: tl.constexpr, ALPHA_PER_CH: tl.constexpr, DOT_PREC: tl.constexpr,
                         BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_M: tl.constexpr):
    """grad_W of one tap over one split of the input rows: x^T @ dz (dz recomputed), stored as fp32 partial
    (split, tap, BLOCK_CI, BLOCK_CO); grid (splits, 8)."""
    split = tl.program_id(0)
    tap = tl.program_id(1)
    ci = tl.arange(0, BLOCK_CI)
    ci_ok = ci < C_IN
    co = tl.arange(0, BLOCK_CO)
    co_ok = co < C_OUT
    w = _tap_weight(w_ptr, tap, ci, co, ci_ok, co_ok, w_si, w_so, w_sa, w_sb, w_sc, x_ptr.dtype.element_ty)
    bias, alpha = _bias_and_alpha(b_ptr, a_ptr, co, co_ok, HAS_BIAS, ALPHA_PER_CH)
    acc = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float32)
    first = split.to(tl.int64) * ROWS_PER_SPLIT
    last = tl.minimum(first + ROWS_PER_SPLIT, M)
    for block in range(0, tl.cdiv(last - first, BLOCK_M)):
        start = first + block * BLOCK_M  # (a tensor: the interpreter's loop variable is a Python int)
        n, i, j, k = block_row_coords(start, D, H, W, BLOCK_M)
        row_ok = start + tl.arange(0, BLOCK_M) < last
        x_row = strided_offset(n, i, j, k, x_sn, x_sd, x_sh, x_sw)
        xt = tl.load(x_ptr + x_row[:, None] + ci[None, :].to(tl.int64) * x_sc,
                     mask=row_ok[:, None] & ci_ok[None, :], other=0.0)
        z = dot(xt, w, tl.zeros((BLOCK_M, BLOCK_CO), dtype=tl.float32), DOT_PREC) + bias[None, :]
        g_off = _out_offset(n, i, j, k, tap, g_sn, g_sd, g_sh, g_sw)[:, None] + co[None, :].to(tl.int64) * g_sc
        g = tl.load(g_ptr + g_off, mask=row_ok[:, None] & co_ok[None, :], other=0.0).to(tl.float32)
        dz, _ = _prelu_terms(z, g, alpha)
        acc = dot(tl.trans(xt), dz.to(xt.dtype), acc, DOT_PREC)
    base = (split * 8 + tap).to(tl.int64) * BLOCK_CI * BLOCK_CO
    tl.store(dw_ptr + base + ci[:, None] * BLOCK_CO + co[None, :], acc)


# ---------------------------------------------------------------------------------------------------------------------
# host side
def upconv_prelu_add_unsupported(x, weight, bias, alpha, skip):
    reasons = tensor_reasons({"x": x, "weight": weight, "bias": bias, "alpha": alpha, "skip": skip})
    if x.numel() == 0:
        reasons.append("x has no elements (an empty batch runs on the reference backend)")
    if max(weight.shape[0], weight.shape[1]) > MAX_CHANNELS:
        reasons.append(f"{weight.shape[0]} -> {weight.shape[1]} channels: the fused upsampling takes at most "
                       f"{MAX_CHANNELS}")
    return reasons


def _strides5(t):
    return tuple(t.stride())


def _alpha_args(alpha):
    return by_channel(alpha), alpha.numel() > 1


def upconv_prelu_add_forward(x, weight, bias, alpha, skip):
    n, c_in, d, h, w = x.shape
    c_out = weight.shape[1]
    out = torch.empty((n, c_out, 2 * d, 2 * h, 2 * w), dtype=x.dtype, device=x.device,
                      memory_format=out_format(x))
    rows = n * d * h * w
    block_n = next_pow2(c_out, 16, 128)
    block_k = next_pow2(c_in, 16, 64)
    a, per_channel = _alpha_args(alpha)
    bias = by_channel(bias)
    s = skip if skip is not None else out
    grid = lambda meta: (cdiv(rows, meta["BLOCK_M"]), 8, cdiv(c_out, block_n))  # noqa: E731
    _upconv_fwd_kernel[grid](
        x, weight, bias if bias is not None else a, a, s, out, rows, d, h, w, c_in, c_out,
        *_strides5(x), *_strides5(weight), *_strides5(out), *_strides5(s),
        HAS_BIAS=bias is not None, ALPHA_PER_CH=per_channel, HAS_SKIP=skip is not None,
        DOT_PREC=dot_precision(x.dtype), BLOCK_N=block_n, BLOCK_K=block_k)
    return out


_WGRAD_MIN_ROWS = 4096  # rows per split of the weight gradient at least (fewer partials to sum)


def upconv_prelu_add_backward(grad_out, x, weight, bias, alpha, output_mask):
    """-> (grad_x, grad_weight, grad_bias, grad_alpha), None where output_mask (4 flags) is False; the skip's
    gradient is grad_out itself (the ops layer returns it)."""
    want_x, want_w, want_b, want_a = output_mask
    want_b = want_b and bias is not None
    n, c_in, d, h, w = x.shape
    c_out = weight.shape[1]
    rows = n * d * h * w
    block_ci, block_co = next_pow2(c_in, 16, MAX_CHANNELS), next_pow2(c_out, 16, MAX_CHANNELS)
    a, per_channel = _alpha_args(alpha)
    common = dict(HAS_BIAS=bias is not None, ALPHA_PER_CH=per_channel, DOT_PREC=dot_precision(x.dtype),
                  BLOCK_CI=block_ci, BLOCK_CO=block_co)
    b = by_channel(bias) if bias is not None else a
    f32 = dict(dtype=torch.float32, device=x.device)
    grad_x = grad_w = grad_b = grad_a = None
    if want_x or want_b or want_a:
        grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=out_format(x)) \
            if want_x else None
        # one partial row per program: at most cdiv(rows, 16) (the smallest row block)
        parts = cdiv(rows, 16)
        db_part = torch.zeros((parts, block_co), **f32) if want_b else None
        da_part = torch.zeros((parts, block_co), **f32) if want_a else None
        gx = grad_x if grad_x is not None else x
        _upconv_dgrad_kernel[lambda meta: (cdiv(rows, meta["BLOCK_M"]),)](
            x, weight, b, a, grad_out, gx, db_part if want_b else a, da_part if want_a else a,
            rows, d, h, w, c_in, c_out, *_strides5(x), *_strides5(weight), *_strides5(grad_out), *_strides5(gx),
            WANT_X=want_x, WANT_B=want_b, WANT_A=want_a, **common)
        if want_b:
            grad_b = db_part.sum(0)[:c_out].to(bias.dtype)
        if want_a:
            per_ch = da_part.sum(0)[:c_out]
            grad_a = (per_ch if per_channel else per_ch.sum().reshape(1)).to(alpha.dtype)
    if want_w:
        splits = max(1, min(cdiv(parallel_slots(x.device), 8), cdiv(rows, _WGRAD_MIN_ROWS)))
        rows_per_split = cdiv(rows, splits)
        dw_part = torch.empty((splits, 8, block_ci, block_co), **f32)
        _upconv_wgrad_kernel[(splits, 8)](
            x, weight, b, a, grad_out, dw_part, rows, d, h, w, c_in, c_out, rows_per_split,
            *_strides5(x), *_strides5(weight), *_strides5(grad_out), **common)
        # (tap = a*4 + b*2 + c, C_in, C_out) -> (C_in, C_out, a, b, c), in the weight's own layout
        taps = dw_part.sum(0)[:, :c_in, :c_out].reshape(2, 2, 2, c_in, c_out).permute(3, 4, 0, 1, 2)
        grad_w = taps.to(weight.dtype).contiguous(memory_format=out_format(weight))
    return grad_x, grad_w, grad_b, grad_a
