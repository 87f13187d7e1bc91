"""Jaccard (Tanimoto) loss sums and their backward as Triton kernels.

Forward: one pass over the logits; per voxel the class probabilities (softmax over classes, or per-class sigmoid)
live in registers, and each program writes its per-(sample, class) partial sums of p*t, p^2|p, t^2|t; a
fixed-order sum over the programs finishes the reduction (deterministic). Backward: one pass that recomputes p
and writes only grad_logits. No probability or one-hot tensor is ever stored.
"""
import torch
import triton
import triton.language as tl

from ._common import cdiv, interpreting, next_pow2

MAX_CLASSES = 64  # all classes of a voxel are held in registers at once (BLOCK_C x BLOCK_S tile)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TILE = 4096  # BLOCK_C * BLOCK_S elements per program
NUM_WARPS = 8  # 16 tile elements per thread: with 4 warps the softmax backward spills on sm_90 (Triton 3.6)


@triton.jit
def _probs_and_targets(logit_ptr, tgt_ptr, n, s, S, C, l_sn, l_sc, l_ss, t_sn, t_sc, t_ss, ignore_index,
                       TARGET_IS_LABEL: tl.constexpr, SOFTMAX: tl.constexpr, HAS_IGNORE: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """(BLOCK_C, BLOCK_S) tiles p, t (fp32, zero outside valid voxels / classes) and the validity mask."""
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    s_ok = s < S
    if TARGET_IS_LABEL:
        lab = tl.load(tgt_ptr + n * t_sn + s * t_ss, mask=s_ok, other=0).to(tl.int64)
        valid_s = s_ok
        if HAS_IGNORE:
            valid_s = valid_s & (lab != ignore_index)
        valid = c_ok[:, None] & valid_s[None, :]
        t = tl.where(valid & (lab[None, :] == c[:, None]), 1.0, 0.0)
    else:
        valid = c_ok[:, None] & s_ok[None, :]
        t_off = n * t_sn + c[:, None].to(tl.int64) * t_sc + s[None, :] * t_ss
        t = tl.load(tgt_ptr + t_off, mask=valid, other=0.0).to(tl.float32)
    l_off = n * l_sn + c[:, None].to(tl.int64) * l_sc + s[None, :] * l_ss
    x = tl.load(logit_ptr + l_off, mask=c_ok[:, None] & s_ok[None, :], other=0.0).to(tl.float32)
    if SOFTMAX:
        x = tl.where(c_ok[:, None], x, float("-inf"))
        e = tl.exp(x - tl.max(x, axis=0)[None, :])
        p = e / tl.sum(e, axis=0)[None, :]
    else:
        p = 1.0 / (1.0 + tl.exp(-x))
    p = tl.where(valid, p, 0.0)
    return p, t, valid, l_off


@triton.jit
def _jaccard_sums_kernel(logit_ptr, tgt_ptr, part_ptr, S, C, NUM_BLOCKS,
                         l_sn, l_sc, l_ss, t_sn, t_sc, t_ss, ignore_index,
                         TARGET_IS_LABEL: tl.constexpr, SOFTMAX: tl.constexpr, SQUARED: tl.constexpr,
                         HAS_IGNORE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64)
    s = blk * BLOCK_S + tl.arange(0, BLOCK_S)
    p, t, valid, l_off = _probs_and_targets(logit_ptr, tgt_ptr, n, s, S, C, l_sn, l_sc, l_ss, t_sn, t_sc, t_ss,
                                            ignore_index, TARGET_IS_LABEL, SOFTMAX, HAS_IGNORE, BLOCK_C)
    pt = tl.sum(p * t, axis=1)
    if SQUARED:
        pp = tl.sum(p * p, axis=1)
        tt = tl.sum(t * t, axis=1)
    else:
        pp = tl.sum(p, axis=1)
        tt = tl.sum(t, axis=1)
    c = tl.arange(0, BLOCK_C)
    out = part_ptr + ((n * NUM_BLOCKS + blk) * C + c) * 3
    tl.store(out, pt, mask=c < C)
    tl.store(out + 1, pp, mask=c < C)
    tl.store(out + 2, tt, mask=c < C)


@triton.jit
def _jaccard_backward_kernel(logit_ptr, tgt_ptr, gsum_ptr, grad_ptr, S, C,
                             l_sn, l_sc, l_ss, t_sn, t_sc, t_ss, ignore_index,
                             TARGET_IS_LABEL: tl.constexpr, SOFTMAX: tl.constexpr, SQUARED: tl.constexpr,
                             HAS_IGNORE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64)
    s = blk * BLOCK_S + tl.arange(0, BLOCK_S)
    p, t, valid, l_off = _probs_and_targets(logit_ptr, tgt_ptr, n, s, S, C, l_sn, l_sc, l_ss, t_sn, t_sc, t_ss,
                                            ignore_index, TARGET_IS_LABEL, SOFTMAX, HAS_IGNORE, BLOCK_C)
    c = tl.arange(0, BLOCK_C)
    g_pt = tl.load(gsum_ptr + (n * C + c) * 3, mask=c < C, other=0.0)[:, None]
    g_pp = tl.load(gsum_ptr + (n * C + c) * 3 + 1, mask=c < C, other=0.0)[:, None]
    if SQUARED:
        dp = g_pt * t + g_pp * 2.0 * p
    else:
        dp = g_pt * t + g_pp
    if SOFTMAX:
        dx = p * (dp - tl.sum(p * dp, axis=0)[None, :])
    else:
        dx = dp * p * (1.0 - p)
    dx = tl.where(valid, dx, 0.0)
    s_ok = s < S
    tl.store(grad_ptr + l_off, dx.to(grad_ptr.dtype.element_ty), mask=(c < C)[:, None] & s_ok[None, :])


def _flat_spatial(t):
    """t (or a contiguous copy) in a layout whose spatial dims collapse to one stride: NCDHW-contiguous or
    channels_last_3d pass without a copy. Returns (tensor, spatial stride)."""
    if not (t.is_contiguous() or (t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d))):
        t = t.contiguous()
    return t, t.stride(-1)


def _prepare(logits, target, ignore_index):
    """Views, strides and block sizes shared by both kernels' launches."""
    n, c = logits.shape[:2]
    logits, l_ss = _flat_spatial(logits)
    is_label = not target.dtype.is_floating_point
    target, t_ss = _flat_spatial(target)
    block_c = next_pow2(c, 2, MAX_CLASSES)
    block_s = max(16, _TILE // block_c)
    spatial = logits[0, 0].numel() if n > 0 else 0
    strides = (logits.stride(0), logits.stride(1), l_ss, target.stride(0), 0 if is_label else target.stride(1), t_ss,
               0 if ignore_index is None else int(ignore_index))
    meta = dict(TARGET_IS_LABEL=is_label, HAS_IGNORE=is_label and ignore_index is not None,
                BLOCK_C=block_c, BLOCK_S=block_s, num_warps=NUM_WARPS)
    return logits, target, spatial, max(1, cdiv(spatial, block_s)), strides, meta


def jaccard_unsupported(logits, target, activation, ignore_index):
    reasons = []
    for name, t in (("logits", logits), ("target", target)):
        if t.device.type != "cuda" and not interpreting():
            reasons.append(f"{name} is on {t.device.type}: the triton backend needs CUDA tensors "
                           "(or TRITON_INTERPRET=1 for CPU tensors)")
    if logits.dtype not in SUPPORTED_DTYPES:
        reasons.append(f"logits has dtype {logits.dtype}: expected float32, float16 or bfloat16")
    if target.dtype.is_floating_point and target.dtype not in SUPPORTED_DTYPES:
        reasons.append(f"target has dtype {target.dtype}: expected float32, float16, bfloat16 or an integer label map")
    if logits.dim() < 2:
        reasons.append(f"logits must be (N, C, ...) (got {logits.dim()} dims)")
    elif logits.shape[1] > MAX_CLASSES:
        reasons.append(f"logits has {logits.shape[1]} classes: at most {MAX_CLASSES} are supported (the classes "
                       "of a voxel are held in registers; more would spill)")
    if activation not in ("softmax", "sigmoid"):
        reasons.append(f"activation {activation!r}: expected 'softmax' or 'sigmoid'")
    return reasons


def jaccard_sums(logits, target, squared, activation, ignore_index):
    n, c = logits.shape[:2]
    logits, target, spatial, blocks, strides, meta = _prepare(logits, target, ignore_index)
    if n * c == 0 or spatial == 0:
        return torch.zeros((n, c, 3), dtype=torch.float32, device=logits.device)
    partials = torch.empty((n, blocks, c, 3), dtype=torch.float32, device=logits.device)  # every entry written
    _jaccard_sums_kernel[(blocks, n)](logits, target, partials, spatial, c, blocks, *strides,
                                      SOFTMAX=activation == "softmax", SQUARED=bool(squared), **meta)
    return partials.sum(1)  # fixed-order second stage: deterministic


def jaccard_sums_backward(grad_sums, logits, target, squared, activation, ignore_index):
    n, c = logits.shape[:2]
    logits, target, spatial, blocks, strides, meta = _prepare(logits, target, ignore_index)
    grad_sums = grad_sums.to(device=logits.device, dtype=torch.float32).contiguous()
    grad = torch.empty_like(logits)  # same strides as the logits the kernel reads
    if grad.numel():
        _jaccard_backward_kernel[(blocks, n)](logits, target, grad_sums, grad, spatial, c, *strides,
                                              SOFTMAX=activation == "softmax", SQUARED=bool(squared), **meta)
    return grad
