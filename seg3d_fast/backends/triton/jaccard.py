"""Jaccard (Tanimoto) loss sums and their backward as Triton kernels.

Forward: one pass over the logits; per voxel the class probabilities (softmax over classes, or per-class sigmoid)
live in registers, and each program writes its per-(sample, class) partial sums of p*t, p^2|p, t^2|t; a
fixed-order sum over the programs finishes the reduction (deterministic). Backward: one pass that recomputes p
and writes only grad_logits. No probability or one-hot tensor is ever stored.
The reduced loss (jaccard_loss_reduced, optional in backends/API.md): the sums kernel also writes each block's
label range, a single-program kernel sums the partials into the sums, the label range and the loss, and the
backward kernel derives dL/d(sums) from the sums itself: 2 launches forward, 1 backward, no small torch ops.
"""
import math

import torch
import triton
import triton.language as tl

from ._common import SUPPORTED_DTYPES, by_channel, cdiv, interpreting, next_pow2

MAX_CLASSES = 64  # all classes of a voxel are held in registers at once (BLOCK_C x BLOCK_S tile)
NUM_WARPS = 8
# Tiles of BLOCK_C x BLOCK_S: where the logits' voxels are contiguous (NCDHW) and there are at most 8 classes, each
# thread holds every class of VEC = 2 neighbouring voxels, so that the softmax's max and sum over the classes stay in
# its registers: BLOCK_S = VEC x the program's threads, and the voxel offsets are marked contiguous in runs of VEC
# only (tl.max_contiguous). Left to itself, Triton loaded 8 voxels of one class per thread and spread the classes
# over warps and lanes: per 8 x 512 tile the sums took 30 barriers and 129 shuffles on sm_90 (Triton 3.6), the
# backward 14 and 51; now the sums loop has none. Otherwise (more classes, channels-last logits) tiles of _TILE
# elements, whose class reductions cross threads.
_VEC = 2
_TILE = 2048
_MAX_CLASSES_IN_THREAD = 8
# Sums programs per sample at most: each sums every MAX_PROGRAMS-th tile, so that the single program that adds the
# partial sums up reads at most this many rows per sample (one per tile was 5760 rows for a 128x160x144 volume: a
# 180-step loop of dependent loads, longer than the pass over the logits), while still several waves of programs
# fill the card (no long tail of a last, partly filled wave). Fixed, not per device: the same order of summation,
# and so the same bits, on every card.
MAX_PROGRAMS = 2048
_NO_LABEL_MIN = tl.constexpr(2 ** 62)  # the label range of a block without counted labels: empty
_NO_LABEL_MAX = tl.constexpr(-(2 ** 62))
_LOSS_ROWS = 2048  # partial-sum elements (rows x BLOCK_C) per step of _jaccard_loss_kernel's single program
_LOSS_WARPS = 8


@triton.jit
def _program_tile(NUM_BLOCKS):
    """(block, sample) of this program, both int64, on a 1-D grid of NUM_BLOCKS programs per sample, sample-major
    (the order of the 2-D (blocks, N) grid it replaces): a grid axis past the first takes at most 65535 programs,
    and batches of small volumes or 1-D inputs have more samples than that."""
    pid = tl.program_id(0)
    n = pid // NUM_BLOCKS
    return (pid - n * NUM_BLOCKS).to(tl.int64), n.to(tl.int64)


@triton.jit
def _sums_offset(n, C, c):
    """Offset of (sample n, class c, 0) in an (N, C, 3) array of sums: n is promoted to 64 bits first (a loop
    counter over the samples is int32, and N * C * 3 passes 2^31 from 11.2 million samples of 64 classes)."""
    return (tl.cast(n, tl.int64) * C + c) * 3


@triton.jit
def _spatial_offsets(s, stride, UNIT: tl.constexpr):
    """s * stride, where UNIT says that the stride is 1 (s keeps the contiguity its maker marked)."""
    if UNIT:
        return s
    return s * stride


@triton.jit
def _voxels(tile, BLOCK_S: tl.constexpr, VEC: tl.constexpr):
    """The voxel indices (int64) of a tile, contiguous in runs of VEC (see _VEC)."""
    return tile * BLOCK_S + tl.max_contiguous(tl.arange(0, BLOCK_S), VEC)


@triton.jit
def _probs_and_targets(logit_ptr, tgt_ptr, n, s, S, C, l_sn, l_sc, l_ss, t_sn, t_sc, t_ss, ignore_index,
                       TARGET_IS_LABEL: tl.constexpr, SOFTMAX: tl.constexpr, HAS_IGNORE: tl.constexpr,
                       L_UNIT: tl.constexpr, T_UNIT: tl.constexpr, VEC: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_S: tl.constexpr):
    """(BLOCK_C, BLOCK_S) tiles p, t (fp32, zero outside valid voxels / classes) and the validity mask; the labels
    and which of them count (BLOCK_S,) (label maps; else zeros and the in-volume mask). L_UNIT / T_UNIT: the logits'
    / target's spatial stride is 1."""
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    s_ok = s < S
    if TARGET_IS_LABEL:
        lab_off = n * t_sn + _spatial_offsets(s, t_ss, T_UNIT)
        if VEC > 1:  # (a thread holds every class of its voxels, see _VEC)
            # loaded as a (BLOCK_C, BLOCK_S) tile (class stride 0: each class row reads the same labels) so that the
            # one-hot target takes the logits' layout; a (BLOCK_S,) load broadcast over the classes took Triton's
            # default layout and a conversion through shared memory per tile
            lab2 = tl.load(tgt_ptr + (c[:, None] * 0).to(tl.int64) + lab_off[None, :], mask=s_ok[None, :], other=0)
            valid = c_ok[:, None] & s_ok[None, :]
            if HAS_IGNORE:
                valid = valid & (lab2 != ignore_index)
            # (the rows are equal: reductions within the thread; the backward, which needs neither, drops them)
            lab = tl.max(lab2, axis=0).to(tl.int64)
            valid_s = tl.max(valid.to(tl.int32), axis=0) != 0
        else:
            lab = tl.load(tgt_ptr + lab_off, mask=s_ok, other=0).to(tl.int64)
            lab2 = lab[None, :]
            valid_s = s_ok
            if HAS_IGNORE:
                valid_s = valid_s & (lab != ignore_index)
            valid = c_ok[:, None] & valid_s[None, :]
        t = tl.where(valid & (lab2 == c[:, None]), 1.0, 0.0)
    else:
        lab = tl.zeros((BLOCK_S,), dtype=tl.int64)
        valid_s = s_ok
        valid = c_ok[:, None] & s_ok[None, :]
        t_off = n * t_sn + c[:, None].to(tl.int64) * t_sc + _spatial_offsets(s, t_ss, T_UNIT)[None, :]
        t = tl.load(tgt_ptr + t_off, mask=valid, other=0.0).to(tl.float32)
    l_off = n * l_sn + c[:, None].to(tl.int64) * l_sc + _spatial_offsets(s, l_ss, L_UNIT)[None, :]
    x = tl.load(logit_ptr + l_off, mask=c_ok[:, None] & s_ok[None, :], other=0.0).to(tl.float32)
    if SOFTMAX:
        x = tl.where(c_ok[:, None], x, float("-inf"))
        e = tl.exp(x - tl.max(x, axis=0)[None, :])
        p = e / tl.sum(e, axis=0)[None, :]
    else:
        p = 1.0 / (1.0 + tl.exp(-x))
    p = tl.where(valid, p, 0.0)
    return p, t, valid, l_off, lab, valid_s


@triton.jit
def _tile_terms(logit_ptr, tgt_ptr, n, tile, S, C, l_sn, l_sc, l_ss, t_sn, t_sc, t_ss, ignore_index,
                TARGET_IS_LABEL: tl.constexpr, SOFTMAX: tl.constexpr, SQUARED: tl.constexpr, HAS_IGNORE: tl.constexpr,
                L_UNIT: tl.constexpr, T_UNIT: tl.constexpr, VEC: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCK_S: tl.constexpr):
    """Element-wise terms of one tile's sums: p t, p^2 | p, t^2 | t (BLOCK_C, BLOCK_S), and its counted labels as
    (BLOCK_S,) candidates for the least and the greatest."""
    s = _voxels(tile, BLOCK_S, VEC)
    p, t, valid, l_off, lab, counted = _probs_and_targets(logit_ptr, tgt_ptr, n, s, S, C, l_sn, l_sc, l_ss, t_sn,
                                                          t_sc, t_ss, ignore_index, TARGET_IS_LABEL, SOFTMAX,
                                                          HAS_IGNORE, L_UNIT, T_UNIT, VEC, BLOCK_C, BLOCK_S)
    lo = tl.where(counted, lab, _NO_LABEL_MIN)
    hi = tl.where(counted, lab, _NO_LABEL_MAX)
    if SQUARED:
        return p * t, p * p, t * t, lo, hi
    return p * t, p, t, lo, hi


@triton.jit
def _jaccard_sums_kernel(logit_ptr, tgt_ptr, part_ptr, range_ptr, S, C, NUM_BLOCKS, TILES_PER_BLOCK,
                         l_sn, l_sc, l_ss, t_sn, t_sc, t_ss, ignore_index,
                         TARGET_IS_LABEL: tl.constexpr, SOFTMAX: tl.constexpr, SQUARED: tl.constexpr,
                         HAS_IGNORE: tl.constexpr, LABEL_RANGE: tl.constexpr, L_UNIT: tl.constexpr,
                         T_UNIT: tl.constexpr, VEC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program (block, n) (_program_tile) sums tiles block, block + NUM_BLOCKS, ... (TILES_PER_BLOCK of them, the
    last ones past the volume masked) element-wise in registers, then writes its partial sums (C, 3) and, with
    LABEL_RANGE, the least and greatest of its counted labels (the range check's, for free: the labels are loaded
    anyway). The first
    tile starts the sums: accumulators made by tl.zeros would take Triton's default layout, not the loads', and be
    converted through shared memory in every step."""
    blk, n = _program_tile(NUM_BLOCKS)
    acc_pt, acc_pp, acc_tt, lo, hi = _tile_terms(logit_ptr, tgt_ptr, n, blk, S, C, l_sn, l_sc, l_ss, t_sn, t_sc,
                                                 t_ss, ignore_index, TARGET_IS_LABEL, SOFTMAX, SQUARED, HAS_IGNORE,
                                                 L_UNIT, T_UNIT, VEC, BLOCK_C, BLOCK_S)
    for i in range(1, TILES_PER_BLOCK):
        pt, pp, tt, tile_lo, tile_hi = _tile_terms(logit_ptr, tgt_ptr, n, blk + i * NUM_BLOCKS, S, C, l_sn, l_sc,
                                                   l_ss, t_sn, t_sc, t_ss, ignore_index, TARGET_IS_LABEL, SOFTMAX,
                                                   SQUARED, HAS_IGNORE, L_UNIT, T_UNIT, VEC, BLOCK_C, BLOCK_S)
        acc_pt += pt
        acc_pp += pp
        acc_tt += tt
        if LABEL_RANGE:
            lo = tl.minimum(lo, tile_lo)
            hi = tl.maximum(hi, tile_hi)
    if LABEL_RANGE:
        rng = range_ptr + (n * NUM_BLOCKS + blk) * 2
        tl.store(rng, tl.min(lo, axis=0))
        tl.store(rng + 1, tl.max(hi, axis=0))
    c = tl.arange(0, BLOCK_C)
    out = part_ptr + ((n * NUM_BLOCKS + blk) * C + c) * 3
    tl.store(out, tl.sum(acc_pt, axis=1), mask=c < C)
    tl.store(out + 1, tl.sum(acc_pp, axis=1), mask=c < C)
    tl.store(out + 2, tl.sum(acc_tt, axis=1), mask=c < C)


@triton.jit
def _jaccard_backward_kernel(logit_ptr, tgt_ptr, gsum_ptr, grad_ptr, w_ptr, gloss_ptr, S, C, N, NUM_BLOCKS, smooth,
                             l_sn, l_sc, l_ss, t_sn, t_sc, t_ss, ignore_index,
                             TARGET_IS_LABEL: tl.constexpr, SOFTMAX: tl.constexpr, SQUARED: tl.constexpr,
                             HAS_IGNORE: tl.constexpr, FROM_LOSS: tl.constexpr, PER_SAMPLE: tl.constexpr,
                             MEAN: tl.constexpr, L_UNIT: tl.constexpr, T_UNIT: tl.constexpr, VEC: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """grad_logits of one (BLOCK_C, BLOCK_S) tile from dL/d(sums): read from gsum_ptr (N, C, 3), or, with
    FROM_LOSS, derived here from the sums (gsum_ptr), the class weights and dL/d(loss) of _jaccard_loss_kernel's
    loss (the loss's own backward fused in: no small ops between the two kernels)."""
    blk, n = _program_tile(NUM_BLOCKS)  # (tile, sample)
    s = _voxels(blk, BLOCK_S, VEC)
    p, t, valid, l_off, lab, counted = _probs_and_targets(logit_ptr, tgt_ptr, n, s, S, C, l_sn, l_sc, l_ss, t_sn,
                                                          t_sc, t_ss, ignore_index, TARGET_IS_LABEL, SOFTMAX,
                                                          HAS_IGNORE, L_UNIT, T_UNIT, VEC, BLOCK_C, BLOCK_S)
    c = tl.arange(0, BLOCK_C)
    if FROM_LOSS:
        g_pt, g_pp = _loss_sums_grad(gsum_ptr, w_ptr, gloss_ptr, n, N, C, smooth, PER_SAMPLE, MEAN, BLOCK_C)
        g_pt = g_pt[:, None]
        g_pp = g_pp[:, None]
    else:
        g_pt = tl.load(gsum_ptr + _sums_offset(n, C, c), mask=c < C, other=0.0)[:, None]
        g_pp = tl.load(gsum_ptr + _sums_offset(n, C, c) + 1, mask=c < C, other=0.0)[:, None]
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


@triton.jit
def _loss_terms(i, p, t, w, smooth):
    """Per class: 1 - (I + s) / (P + T - I + s) times its weight (0 for padding classes, whose w is 0)."""
    return tl.where(w != 0, w * (1.0 - (i + smooth) / (p + t - i + smooth)), 0.0)


@triton.jit
def _jaccard_loss_kernel(part_ptr, range_part_ptr, w_ptr, sums_ptr, loss_ptr, range_ptr, N, NUM_BLOCKS, C, smooth,
                         PER_SAMPLE: tl.constexpr, MEAN: tl.constexpr, LABEL_RANGE: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program: the partial sums (N, NUM_BLOCKS, C, 3) summed over the blocks in a fixed order into sums
    (N, C, 3), the loss sum_rows sum_c w_c (1 - (I + s) / (P + T - I + s)) over one pooled row or one row per
    sample (PER_SAMPLE), divided by R * sum_c w_c for MEAN (R rows), and with LABEL_RANGE the least and greatest
    counted label of all blocks (range_ptr (2,)). Pooled: also the pooled row, as row N of sums (N + 1 rows), so
    that the backward reads one row instead of summing N."""
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    w = tl.load(w_ptr + c, mask=c_ok, other=0.0)
    pooled_i = tl.zeros((BLOCK_C,), dtype=tl.float32)
    pooled_p = tl.zeros((BLOCK_C,), dtype=tl.float32)
    pooled_t = tl.zeros((BLOCK_C,), dtype=tl.float32)
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    lo = tl.full((BLOCK_B,), _NO_LABEL_MIN, dtype=tl.int64)
    hi = tl.full((BLOCK_B,), _NO_LABEL_MAX, dtype=tl.int64)
    for n in range(N):
        acc_i = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
        acc_p = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
        acc_t = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
        for b0 in range(0, NUM_BLOCKS, BLOCK_B):
            b = b0 + tl.arange(0, BLOCK_B).to(tl.int64)  # 64-bit: rows * C * 3 can pass 2^31
            b_ok = b < NUM_BLOCKS
            row = tl.cast(n, tl.int64) * NUM_BLOCKS + b  # (n: the loop's int32)
            off = (row[:, None] * C + c[None, :]) * 3
            m = b_ok[:, None] & c_ok[None, :]
            acc_i += tl.load(part_ptr + off, mask=m, other=0.0)
            acc_p += tl.load(part_ptr + off + 1, mask=m, other=0.0)
            acc_t += tl.load(part_ptr + off + 2, mask=m, other=0.0)
            if LABEL_RANGE:
                lo = tl.minimum(lo, tl.load(range_part_ptr + row * 2, mask=b_ok, other=_NO_LABEL_MIN))
                hi = tl.maximum(hi, tl.load(range_part_ptr + row * 2 + 1, mask=b_ok, other=_NO_LABEL_MAX))
        s_i = tl.sum(acc_i, axis=0)
        s_p = tl.sum(acc_p, axis=0)
        s_t = tl.sum(acc_t, axis=0)
        out = sums_ptr + _sums_offset(n, C, c)
        tl.store(out, s_i, mask=c_ok)
        tl.store(out + 1, s_p, mask=c_ok)
        tl.store(out + 2, s_t, mask=c_ok)
        if PER_SAMPLE:
            total += _loss_terms(s_i, s_p, s_t, w, smooth)
        else:
            pooled_i += s_i
            pooled_p += s_p
            pooled_t += s_t
    if not PER_SAMPLE:
        total = _loss_terms(pooled_i, pooled_p, pooled_t, w, smooth)
        out = sums_ptr + _sums_offset(N, C, c)
        tl.store(out, pooled_i, mask=c_ok)
        tl.store(out + 1, pooled_p, mask=c_ok)
        tl.store(out + 2, pooled_t, mask=c_ok)
    loss = tl.sum(total, axis=0)
    if MEAN:
        loss = loss / (tl.sum(w, axis=0) * (N if PER_SAMPLE else 1))
    tl.store(loss_ptr, loss)
    if LABEL_RANGE:
        tl.store(range_ptr, tl.min(lo, axis=0))
        tl.store(range_ptr + 1, tl.max(hi, axis=0))


@triton.jit
def _loss_sums_grad(sums_ptr, w_ptr, gloss_ptr, n, N, C, smooth, PER_SAMPLE: tl.constexpr, MEAN: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    """dL/d(sum p t) and dL/d(sum p^2 | p) per class of sample n for _jaccard_loss_kernel's loss: with
    num = I + s, den = P + T - I + s and q = dL/dloss * coef_c / den^2: dL/dP = q num, dL/dI = -(q den + q num).
    sums_ptr: the loss's rows, (N, C, 3) per sample or the (1, C, 3) pooled row."""
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    if PER_SAMPLE:
        row = sums_ptr + _sums_offset(n, C, c)
    else:
        row = sums_ptr + c * 3
    i = tl.load(row, mask=c_ok, other=0.0)
    p = tl.load(row + 1, mask=c_ok, other=0.0)
    t = tl.load(row + 2, mask=c_ok, other=0.0)
    w = tl.load(w_ptr + c, mask=c_ok, other=0.0)
    coef = w * tl.load(gloss_ptr).to(tl.float32)
    if MEAN:
        coef = coef / (tl.sum(w, axis=0) * (N if PER_SAMPLE else 1))
    num = i + smooth
    den = p + t - i + smooth
    # no den * den (it underflows in float32 with smooth=0: inf * num = NaN for an absent class, num = 0)
    q = tl.where(w != 0, coef / den, 0.0)
    d_p = tl.where(w != 0, q * (num / den), 0.0)
    return -(q + d_p), d_p


def _flat_spatial(t):
    """t (or a contiguous copy) in a layout whose spatial dims collapse to one stride: NCDHW-contiguous or
    channels_last_3d pass without a copy. Returns (tensor, spatial stride): 1, or the channel count for
    channels-last. (Not t.stride(-1): the layout checks ignore the strides of size-1 dims, such as the one the ops
    layer appends to 1-D and 2-D inputs, and such a stride can be anything.)"""
    if t.is_contiguous():
        return t, 1
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return t, t.shape[1]
    return t.contiguous(), 1


def _prepare(logits, target, ignore_index):
    """Views, strides and block sizes shared by both kernels' launches."""
    n, c = logits.shape[:2]
    logits, l_ss = _flat_spatial(logits)
    is_label = not target.dtype.is_floating_point
    target, t_ss = _flat_spatial(target)
    block_c = next_pow2(c, 2, MAX_CLASSES)
    block_s, vec = tile_shape(block_c, l_ss == 1)
    spatial = math.prod(logits.shape[2:])  # (no logits[0, 0] view: two more dispatches per call)
    strides = (logits.stride(0), logits.stride(1), l_ss, target.stride(0), 0 if is_label else target.stride(1), t_ss,
               0 if ignore_index is None else int(ignore_index))
    meta = dict(TARGET_IS_LABEL=is_label, HAS_IGNORE=is_label and ignore_index is not None, L_UNIT=l_ss == 1,
                T_UNIT=t_ss == 1, VEC=vec, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=NUM_WARPS)
    return logits, target, spatial, max(1, cdiv(spatial, block_s)), strides, meta


def tile_shape(block_c, contiguous_voxels):
    """(BLOCK_S, VEC) for BLOCK_C classes (see _VEC)."""
    if contiguous_voxels and block_c <= _MAX_CLASSES_IN_THREAD:
        return _VEC * 32 * NUM_WARPS, _VEC
    return max(16, _TILE // block_c), 1


def _sums_grid(tiles):
    """(programs per sample, tiles each) of the sums kernel: at most MAX_PROGRAMS programs, and no program with
    nothing to do."""
    per_block = cdiv(tiles, min(tiles, MAX_PROGRAMS))
    return cdiv(tiles, per_block), per_block


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


def _launch_sums(logits, target, spatial, tiles, strides, meta, squared, activation, label_range):
    """(N, blocks, C, 3) partial sums, and with label_range the (N * blocks, 2) label range partials."""
    n, c = logits.shape[:2]
    blocks, per_block = _sums_grid(tiles)
    partials = torch.empty((n, blocks, c, 3), dtype=torch.float32, device=logits.device)  # every entry written
    ranges = torch.empty((n * blocks, 2), dtype=torch.int64, device=logits.device) if label_range else partials
    _jaccard_sums_kernel[(blocks * n,)](logits, target, partials, ranges, spatial, c, blocks, per_block, *strides,
                                      SOFTMAX=activation == "softmax", SQUARED=bool(squared), LABEL_RANGE=label_range,
                                      **meta)
    return partials, ranges


def jaccard_sums(logits, target, squared, activation, ignore_index):
    n, c = logits.shape[:2]
    logits, target, spatial, tiles, strides, meta = _prepare(logits, target, ignore_index)
    if n * c == 0 or spatial == 0:
        return torch.zeros((n, c, 3), dtype=torch.float32, device=logits.device)
    partials, _ = _launch_sums(logits, target, spatial, tiles, strides, meta, squared, activation, False)
    return partials.sum(1)  # fixed-order second stage: deterministic


def loss_block_rows(block_c, blocks):
    """Partial-sum rows per step of _jaccard_loss_kernel: _LOSS_ROWS elements, no more rows than there are."""
    return max(1, min(_LOSS_ROWS // block_c, next_pow2(blocks, 1, _LOSS_ROWS)))


def _launch_backward(grad_sums, logits, target, squared, activation, ignore_index, loss_args=None):
    logits, target, spatial, blocks, strides, meta = _prepare(logits, target, ignore_index)
    grad = torch.empty_like(logits)  # same strides as the logits the kernel reads
    if grad.numel():
        weights, grad_loss, smooth, per_sample, mean = loss_args or (grad_sums, grad_sums, 0.0, False, False)
        _jaccard_backward_kernel[(blocks * logits.shape[0],)](
            logits, target, grad_sums, grad, weights, grad_loss, spatial, logits.shape[1], logits.shape[0], blocks,
            smooth,
            *strides, SOFTMAX=activation == "softmax", SQUARED=bool(squared), FROM_LOSS=loss_args is not None,
            PER_SAMPLE=per_sample, MEAN=mean, **meta)
    return grad


def jaccard_sums_backward(grad_sums, logits, target, squared, activation, ignore_index):
    grad_sums = grad_sums.to(device=logits.device, dtype=torch.float32).contiguous()
    return _launch_backward(grad_sums, logits, target, squared, activation, ignore_index)


def jaccard_loss_reduced(logits, target, squared, activation, ignore_index, smooth, weights, per_sample, mean):
    """The whole loss in two launches (optional backend function, API.md): -> (loss, a float32 0-d tensor; the
    loss's rows of sums for the backward: (N, C, 3) per sample, else the (1, C, 3) pooled sums; the (2,) int64 least
    and greatest counted label, or None for class probabilities). weights: float32 (C,) on the logits' device, 0 for
    a class left out. Non-empty inputs."""
    n, c = logits.shape[:2]
    weights = by_channel(weights)
    logits, target, spatial, tiles, strides, meta = _prepare(logits, target, ignore_index)
    label_range = meta["TARGET_IS_LABEL"]
    partials, ranges = _launch_sums(logits, target, spatial, tiles, strides, meta, squared, activation, label_range)
    sums = torch.empty((n if per_sample else n + 1, c, 3), dtype=torch.float32, device=logits.device)
    loss = torch.empty((), dtype=torch.float32, device=logits.device)
    labels = torch.empty(2, dtype=torch.int64, device=logits.device) if label_range else loss
    blocks = partials.shape[1]
    _jaccard_loss_kernel[(1,)](partials, ranges, weights, sums, loss, labels, n, blocks, c, float(smooth),
                               PER_SAMPLE=per_sample, MEAN=mean, LABEL_RANGE=label_range,
                               BLOCK_B=loss_block_rows(meta["BLOCK_C"], blocks), BLOCK_C=meta["BLOCK_C"],
                               num_warps=_LOSS_WARPS)
    return loss, (sums if per_sample else sums[n:]), (labels if label_range else None)


def jaccard_loss_reduced_backward(grad_loss, sums, weights, logits, target, squared, activation, ignore_index, smooth,
                                  per_sample, mean):
    """grad_logits of jaccard_loss_reduced's loss: one launch (the loss's backward is fused into it)."""
    if grad_loss.dtype != torch.float32 or grad_loss.device != logits.device:  # (autograd's is: no dispatch then)
        grad_loss = grad_loss.to(device=logits.device, dtype=torch.float32)
    grad_loss = grad_loss.reshape(1)  # (a 1-element pointer argument, as measured on the GPU)
    return _launch_backward(sums, logits, target, squared, activation, ignore_index,
                            (by_channel(weights), grad_loss, float(smooth), per_sample, mean))
