"""conv3d (3x3x3 / 1x1x1, stride 1/2) + bias + PReLU + residual: forward, dgrad and wgrad as Triton kernels.

All three are implicit GEMMs over channels-last (NDHWC) tensors:
  forward: rows = output voxels, columns = C_out, reduction = taps x C_in (padding = masked loads);
  dgrad  : the same kernel run on dz with the flipped, transposed weights; for stride 2 each input-parity class
           (8 of them, one launch: the class is the grid's third axis) gets only the taps that reach it (no work on
           zero taps);
  wgrad  : dW^T (taps*C_in, C_out) = sum over voxels of x_shifted^T @ dz, split over voxels into fp32
           partial buffers, then one fixed-order sum (_finish_kernel; no atomics: deterministic always); the bias
           and alpha gradients (and dz itself, when asked) come out of the same pass.
dz = grad_out * (z > 0 ? 1 : alpha) is written once, by the pass that also reduces the bias and alpha gradients;
both GEMMs then read it.
TMA (opt-in, SEG3D_FAST_TRITON_TMA=1, sm_90+): stride-1 convs and the stride-2 dgrad's classes whose channel rows
are 16-byte multiples run _conv_tma_kernel instead, which loads each K step's source box and weight rows with bulk
tensor copies (the volume's padding is the copies' zero fill) rather than gathering them element by element.
Host side: a handful of torch ops and four launches per backward (the last sums the split partials); the tap and
phase tables are made once per shape (small layers run at the host's pace on a GPU: benchmarks/host_overhead.py).
"""
import contextlib
import functools
import itertools
import math

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors (Triton 3.4+)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

from .. import device_table, env_flag
from .._layout import out_format
from ._common import (autotune_configs, block_row_coords, by_channel, carry_rows, cdiv, dot, dot_precision,
                      fast_divisor, interpreting, next_pow2, parallel_slots, row_split, strided_offset, tensor_reasons)

_DZ_NONE, _DZ_ACT, _DZ_PREACT = 0, 1, 2
_DZ_KINDS = {"none": _DZ_NONE, "act": _DZ_ACT, "preact": _DZ_PREACT}


# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _runs(first, BLOCK: tl.constexpr, VEC: tl.constexpr):
    """Columns first + arange(BLOCK) (first a multiple of VEC) as (run, place): column = run * VEC + place, in runs
    of VEC columns. Offsets written as (row's first run + run) * VEC + place are contiguous and VEC-aligned where
    the compiler can see it: vector-wide, asynchronous (pipelined) loads also when a row's length is not a multiple
    of 16 (8-channel layers: one synchronous 2-byte load per element otherwise)."""
    lane = tl.arange(0, BLOCK)
    return first // VEC + lane // VEC, lane % VEC


@triton.jit
def _load_gathered(src_ptr, taps_ptr, row_base, ra, rb, rc, row_ok, k0, K_TOTAL, C_SRC, Ds, Hs, Ws,
                   FLAT_K: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr):
    """(rows, BLOCK_K) tile of the implicit im2col matrix: column k = (tap, c) reads source voxel
    (ra, rb, rc) + taps[tap] channel c; out-of-volume taps read 0 (the padding), as do columns k >= K_TOTAL.
    FLAT_K (C_SRC itself, as a constant: the loop divides by it): every column finds its own tap (small C_SRC: no
    tensor-core work lost to channel padding), runs of VEC columns (VEC divides C_SRC) sharing one tap and reading
    contiguous memory; FLAT_K = 0: the whole block shares one tap (C_SRC is a multiple of BLOCK_K) and only rows
    need masks."""
    if FLAT_K:
        run, place = _runs(k0, BLOCK_K, VEC)
        k_run = run * VEC  # the first column of each column's run: the tap and the masks are the run's
        k_ok = k_run < K_TOTAL
        tap = k_run // FLAT_K
        dd = tl.max_constancy(tl.load(taps_ptr + tap * 3, mask=k_ok, other=0), VEC)
        dh = tl.max_constancy(tl.load(taps_ptr + tap * 3 + 1, mask=k_ok, other=0), VEC)
        dw = tl.max_constancy(tl.load(taps_ptr + tap * 3 + 2, mask=k_ok, other=0), VEC)
        pd = ra[:, None] + dd[None, :]
        ph = rb[:, None] + dh[None, :]
        pw = rc[:, None] + dw[None, :]
        ok = (row_ok[:, None] & k_ok[None, :] & (pd >= 0) & (pd < Ds) & (ph >= 0) & (ph < Hs)
              & (pw >= 0) & (pw < Ws))
        runs_per_tap = FLAT_K // VEC
        delta = ((dd * Hs + dh) * Ws + dw).to(tl.int64) * runs_per_tap + (run - tap * runs_per_tap)
        off = ((row_base // VEC)[:, None] + delta[None, :]) * VEC + place[None, :]
    else:
        tap = k0 // C_SRC
        ch = (k0 - tap * C_SRC) + tl.arange(0, BLOCK_K)
        dd = tl.load(taps_ptr + tap * 3)
        dh = tl.load(taps_ptr + tap * 3 + 1)
        dw = tl.load(taps_ptr + tap * 3 + 2)
        pd = ra + dd
        ph = rb + dh
        pw = rc + dw
        ok_row = row_ok & (pd >= 0) & (pd < Ds) & (ph >= 0) & (ph < Hs) & (pw >= 0) & (pw < Ws)
        delta = ((dd * Hs + dh) * Ws + dw).to(tl.int64) * C_SRC
        # alignment hints (C_SRC and k0 are multiples of 16): lets the compiler vectorise and pipeline the loads
        row = tl.multiple_of(row_base + delta, 16)
        ch = tl.max_contiguous(tl.multiple_of(ch, BLOCK_K), BLOCK_K)
        off = row[:, None] + ch[None, :]
        ok = ok_row[:, None] & (ch < C_SRC)[None, :]
    return tl.load(src_ptr + off, mask=ok, other=0.0)


@triton.jit
def _epilogue(acc, n, i1, i2, i3, row_ok, co, co_ok, bias_ptr, alpha_ptr, res_ptr, out_base, act_ptr,
              o_sn, o_sc, o_s1, o_s2, o_s3, r_sn, r_sc, r_s1, r_s2, r_s3,
              HAS_BIAS: tl.constexpr, ACT_KIND: tl.constexpr, RES_MODE: tl.constexpr, SAVE_ACT: tl.constexpr):
    """bias, residual, PReLU and the down-cast on the fp32 accumulator of output rows (n, i1, i2, i3) x columns
    co, then one store: the pre-activation never reaches memory."""
    mask = row_ok[:, None] & co_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
    if RES_MODE != 0:
        r_off = strided_offset(n, i1, i2, i3, r_sn, r_s1, r_s2, r_s3)[:, None] + co[None, :].to(tl.int64) * r_sc
        res = tl.load(res_ptr + r_off, mask=mask, other=0.0).to(tl.float32)
        if RES_MODE == 1:
            acc += res
    if ACT_KIND == 1:
        acc = tl.where(acc > 0, acc, acc * tl.load(alpha_ptr).to(tl.float32))
    if ACT_KIND == 2:
        al = tl.load(alpha_ptr + co, mask=co_ok, other=1.0).to(tl.float32)
        acc = tl.where(acc > 0, acc, acc * al[None, :])
    o_off = strided_offset(n, i1, i2, i3, o_sn, o_s1, o_s2, o_s3)[:, None] + co[None, :].to(tl.int64) * o_sc
    if SAVE_ACT:
        tl.store(act_ptr + o_off, acc.to(act_ptr.dtype.element_ty), mask=mask)
    if RES_MODE == 2:
        acc += res
    tl.store(out_base + o_off, acc.to(out_base.dtype.element_ty), mask=mask)


# Tile configs for sm_90 (checked by compiling every kernel variant ahead of time with Triton 3.6 and 3.9). The
# autotuners keep their choices on disk (cache_results, in Triton's cache: TRITON_CACHE_DIR), so a shape is timed
# once per machine and Triton version, not once per process.
# num_stages is not a choice: the gathered loads get at most a double buffer (3 and 4 compile to the same kernel).
# Tiles that give a thread too many elements use all 255 registers and spill: the prune functions drop them for
# each launch; the defaults (64 rows, 8 warps) pass for every launch (column blocks are at most 64).
_TILES = ((64, 4), (64, 8), (128, 4), (128, 8), (256, 8))
_MAX_BLOCK_N = 64  # C_out columns per program (wgrad tiles; flat-K and exact-fp32 convs: more spills)
_MAX_BLOCK_N_TAP = 128  # per-tap conv, fp16/bf16, no residual: 64 x 128 tiles on 8 warps do not spill (with one,
                        # 255 registers, a spill with Triton 3.8); each gathered A tile feeds 128 output channels


def _conv_configs():
    gpu = [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=3) for bm, w in _TILES]
    return autotune_configs(gpu, triton.Config({"BLOCK_M": 64}, num_warps=8, num_stages=3),
                            triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=1))


def _prune_conv(configs, named_args, **kwargs):
    """Configs that do not spill registers on sm_90 with Triton 3.6 and 3.9 (benchmarks/aot_check.py --all-configs).
    Flat K and exact fp32 (whose FMA dot holds its operands in registers): the A tile passes through registers, so
    at most 48 elements of it and the accumulator per thread (32 with the residual summed after the activation),
    and at most 16 rows per warp for the stride-2 dgrad (per-class K and taps loaded at run time) and for exact fp32,
    8 for both. Per-tap K on the tensor cores: A is copied straight to shared memory, so only the fp32 accumulator
    counts: at most 32 elements per thread (admitting 128 x 64 and 64 x 128 tiles, which issue 30-45% fewer
    instructions per tensor-core operation than 64 x 64), 16 with fp32 inputs, with the residual summed after
    the activation, or for the stride-2 dgrad (its class's taps and extents held too: 32 reached 254-255 registers
    with Triton 3.7 to 3.9, and spilled with 3.7). When nothing fits: the config with the fewest rows per warp."""
    src = named_args.get("src_ptr")
    wide = src is not None and src.element_size() == 4
    exact, flat, phases = kwargs.get("DOT_PREC") == "ieee", kwargs.get("FLAT_K"), kwargs.get("PHASES")
    after = kwargs.get("RES_MODE") == 2

    def fits(c):
        rows, threads = c.kwargs["BLOCK_M"], 32 * c.num_warps
        if flat or exact:
            rows_per_warp = 8 if (exact and phases) else 16 if (exact or phases) else rows
            return (rows * (kwargs["BLOCK_N"] + kwargs["BLOCK_K"]) <= (32 if after else 48) * threads
                    and rows <= rows_per_warp * c.num_warps)
        return rows * kwargs["BLOCK_N"] <= (16 if wide or after or phases else 32) * threads
    return [c for c in configs if fits(c)] or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] / c.num_warps)]


@triton.autotune(configs=_conv_configs(), key=["M", "C_SRC", "C_OUT", "K_TOTAL", "STEP"],
                 prune_configs_by={"early_config_prune": _prune_conv}, cache_results=True)
@triton.jit
def _conv_kernel(src_ptr, taps_ptr, w_ptr, bias_ptr, alpha_ptr, res_ptr, out_ptr, act_ptr, phase_ptr,
                 M, E1, E2, E3, Ds, Hs, Ws, C_SRC, K_TOTAL, C_OUT,
                 o_sn, o_sc, o_s1, o_s2, o_s3, r_sn, r_sc, r_s1, r_s2, r_s3,
                 STEP: tl.constexpr, FLAT_K: tl.constexpr, VEC: tl.constexpr, VEC_OUT: tl.constexpr,
                 EVEN_N: tl.constexpr, PHASES: tl.constexpr,
                 HAS_BIAS: tl.constexpr, ACT_KIND: tl.constexpr, RES_MODE: tl.constexpr, SAVE_ACT: tl.constexpr,
                 DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[row, co] = epilogue(sum_k A[row, k] * W[k, co]); rows are an (N, E1, E2, E3) grid whose voxel
    (n, a, b, c) reads source voxel (a, b, c) * STEP + taps[t]; W is (K_TOTAL, C_OUT) row-major.
    ACT_KIND 0 none / 1 shared / 2 per-channel alpha; RES_MODE 0 none / 1 before the activation / 2 after it
    (SAVE_ACT: also store the PReLU output).
    PHASES (stride-2 dgrad): program_id(2) is an input-parity class; row p of the int64 table at phase_ptr holds
    its (rows, E1, E2, E3, first weight row, K, first tap, output offset), overriding the scalar arguments (which
    then describe the largest class, for the grid and the autotuning key)."""
    if PHASES:
        phase = phase_ptr + tl.program_id(2) * 8
        m_rows = tl.load(phase)
        e1 = tl.load(phase + 1).to(tl.int32)
        e2 = tl.load(phase + 2).to(tl.int32)
        e3 = tl.load(phase + 3).to(tl.int32)
        w_base = w_ptr + tl.load(phase + 4) * C_OUT
        k_total = tl.load(phase + 5).to(tl.int32)
        taps = taps_ptr + tl.load(phase + 6) * 3
        out_base = out_ptr + tl.load(phase + 7)
    else:
        m_rows = M
        e1 = E1
        e2 = E2
        e3 = E3
        w_base = w_ptr
        k_total = K_TOTAL
        taps = taps_ptr
        out_base = out_ptr
    start = tl.program_id(0).to(tl.int64) * BLOCK_M
    pid_n = tl.program_id(1)
    row_ok = start + tl.arange(0, BLOCK_M) < m_rows
    n, i1, i2, i3 = block_row_coords(start, e1, e2, e3, BLOCK_M)
    ra = i1 * STEP
    rb = i2 * STEP
    rc = i3 * STEP
    row_base = (((n * Ds + ra) * Hs + rb) * Ws + rc) * C_SRC
    co_run, co_place = _runs(pid_n * BLOCK_N, BLOCK_N, VEC_OUT)  # weight rows in runs of VEC_OUT columns
    co = co_run * VEC_OUT + co_place
    co_ok = co_run * VEC_OUT < C_OUT
    rk = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_total, BLOCK_K):
        a = _load_gathered(src_ptr, taps, row_base, ra, rb, rc, row_ok, k0, k_total, C_SRC, Ds, Hs, Ws,
                           FLAT_K, BLOCK_K, VEC)
        kk = k0 + rk
        b_ptr = w_base + ((kk * (C_OUT // VEC_OUT))[:, None] + co_run[None, :]) * VEC_OUT + co_place[None, :]
        if FLAT_K or not EVEN_N:
            b = tl.load(b_ptr, mask=(kk < k_total)[:, None] & co_ok[None, :], other=0.0)
        else:  # K is a multiple of BLOCK_K (per-tap blocks) and C_OUT of BLOCK_N: no masks (~6% of the loop body)
            b = tl.load(b_ptr)
        acc = dot(a, b, acc, DOT_PREC)

    _epilogue(acc, n, i1, i2, i3, row_ok, co, co_ok, bias_ptr, alpha_ptr, res_ptr, out_base, act_ptr,
              o_sn, o_sc, o_s1, o_s2, o_s3, r_sn, r_sc, r_s1, r_s2, r_s3, HAS_BIAS, ACT_KIND, RES_MODE, SAVE_ACT)


def _tma_configs():
    gpu = [triton.Config({}, num_warps=w, num_stages=st) for w in (4, 8) for st in (3, 4)]
    return autotune_configs(gpu, triton.Config({}, num_warps=8, num_stages=3),
                            triton.Config({}, num_warps=4, num_stages=1))


def _prune_tma(configs, named_args, **kwargs):
    """The A tile passes through registers on its way to the tensor cores (the 5-D box is reshaped to rows), so it
    counts with the fp32 accumulator: at most 96 elements of the two per thread (aot_check.py: no spills)."""
    rows = kwargs["BD"] * kwargs["BH"] * kwargs["BW"]
    per_block = rows * (kwargs["BLOCK_N"] + kwargs["BLOCK_K"] // 2)
    return [c for c in configs if per_block <= 96 * 32 * c.num_warps] or configs[-1:]


@triton.autotune(configs=_tma_configs(), key=["E1", "E2", "E3", "C_SRC", "C_OUT", "K_TOTAL"],
                 prune_configs_by={"early_config_prune": _prune_tma}, cache_results=True)
@triton.jit
def _conv_tma_kernel(src_desc, w_desc, bias_ptr, alpha_ptr, res_ptr, out_ptr, act_ptr, phase_ptr,
                     E1, E2, E3, C_SRC, K_TOTAL, C_OUT, GRID_N,
                     o_sn, o_sc, o_s1, o_s2, o_s3, r_sn, r_sc, r_s1, r_s2, r_s3,
                     KSIZE: tl.constexpr, TAP_SIGN: tl.constexpr, PHASES: tl.constexpr, HAS_BIAS: tl.constexpr,
                     ACT_KIND: tl.constexpr, RES_MODE: tl.constexpr, SAVE_ACT: tl.constexpr, DOT_PREC: tl.constexpr,
                     BD: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """_conv_kernel's stride-1 reads with tensor-memory-accelerator (TMA) loads (sm_90+): a program owns a
    BD x BH x BW box of output voxels of sample program_id(1); per K step one bulk copy brings the box of source
    voxels shifted by the step's tap (src_desc: (N, Ds, Hs, Ws, C_SRC), zero outside the volume: the padding
    costs nothing) and one the weight rows (w_desc: (K_TOTAL, C_OUT)). No per-element address arithmetic or
    masks in the loop: the gathered loads of _conv_kernel cost ~3x more instructions per tensor-core operation.
    Taps in (kd, kh, kw) row-major order, offsets TAP_SIGN * (k - KSIZE // 2) (-1: the flipped kernel of dgrad).
    PHASES (stride-2 dgrad, k = 3): program_id(2) is an input-parity class q (row-major over (qd, qh, qw)), whose
    extents, first weight row, K and output offset come from row q of the phase table (as in _conv_kernel); the
    scalar arguments describe the largest class.
    program_id(0) = box * GRID_N + column block: the column blocks of a box run together and share its loads."""
    if PHASES:
        phase = phase_ptr + tl.program_id(2) * 8
        e1 = tl.load(phase + 1).to(tl.int32)
        e2 = tl.load(phase + 2).to(tl.int32)
        e3 = tl.load(phase + 3).to(tl.int32)
        w_row = tl.load(phase + 4).to(tl.int32)
        k_total = tl.load(phase + 5).to(tl.int32)
        out_base = out_ptr + tl.load(phase + 7)
        qd = tl.program_id(2) // 4
        qh = (tl.program_id(2) // 2) % 2
        qw = tl.program_id(2) % 2
    else:
        e1 = E1
        e2 = E2
        e3 = E3
        w_row = 0
        k_total = K_TOTAL
        out_base = out_ptr
    BLOCK_M: tl.constexpr = BD * BH * BW
    boxes3 = tl.cdiv(e3, BW)
    boxes2 = tl.cdiv(e2, BH)
    pid = tl.program_id(0)
    box = pid // GRID_N
    live = box < tl.cdiv(e1, BD) * boxes2 * boxes3  # PHASES: the smaller classes need fewer boxes
    if PHASES:
        live = live & (tl.load(phase) > 0)  # an empty class (extents stored as 1) has no rows at all
    if live:
        co0 = (pid - box * GRID_N) * BLOCK_N
        n = tl.program_id(1)
        t = box // boxes3
        d0 = (t // boxes2) * BD
        h0 = (t - (t // boxes2) * boxes2) * BH
        w0 = (box - t * boxes3) * BW
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k_total, BLOCK_K):
            tap = k0 // C_SRC
            c0 = k0 - tap * C_SRC
            if PHASES:  # the class's taps (_dgrad_plan, k = 3): per dim 1 tap (offset 0) for parity 0, else 2
                # (offsets 1, 0); computed, not read from the table: loads in the loop would stop its pipelining
                iw = tap % (1 + qw)
                ih = (tap // (1 + qw)) % (1 + qh)
                dd = qd * (1 - tap // ((1 + qw) * (1 + qh)))
                dh = qh * (1 - ih)
                dw = qw * (1 - iw)
            else:
                dd = (tap // (KSIZE * KSIZE) - KSIZE // 2) * TAP_SIGN
                dh = ((tap // KSIZE) % KSIZE - KSIZE // 2) * TAP_SIGN
                dw = (tap % KSIZE - KSIZE // 2) * TAP_SIGN
            a = src_desc.load([n, d0 + dd, h0 + dh, w0 + dw, c0]).reshape(BLOCK_M, BLOCK_K)
            b = w_desc.load([w_row + k0, co0])
            acc = dot(a, b, acc, DOT_PREC)
        r = tl.arange(0, BLOCK_M)
        i1 = d0 + r // (BH * BW)
        i2 = h0 + (r // BW) % BH
        i3 = w0 + r % BW
        row_ok = (i1 < e1) & (i2 < e2) & (i3 < e3)
        co = co0 + tl.arange(0, BLOCK_N)
        _epilogue(acc, n, i1, i2, i3, row_ok, co, co < C_OUT, bias_ptr, alpha_ptr, res_ptr, out_base, act_ptr,
                  o_sn, o_sc, o_s1, o_s2, o_s3, r_sn, r_sc, r_s1, r_s2, r_s3, HAS_BIAS, ACT_KIND, RES_MODE, SAVE_ACT)


def _wgrad_configs():
    gpu = [triton.Config({"BLOCK_V": bv}, num_warps=w, num_stages=3) for bv, w in _TILES]
    return autotune_configs(gpu, triton.Config({"BLOCK_V": 64}, num_warps=8, num_stages=3),
                            triton.Config({"BLOCK_V": 64}, num_warps=4, num_stages=1))


def _prune_wgrad(configs, named_args, **kwargs):
    """Under 64 elements per thread of the x tile and the three (voxel x C_out) tiles (dz, bias and alpha sums);
    the exact-fp32 weight GEMM at most 64 voxels per step on 8 warps (its FMA dot spills beyond, and on 4 warps
    since its pipelined flat-K loads: aot_check.py)."""
    per_voxel = kwargs["BLOCK_KT"] + 2 * kwargs["BLOCK_CO"]
    kept = [c for c in configs if c.kwargs["BLOCK_V"] * per_voxel < 64 * 32 * c.num_warps
            and not (kwargs.get("COMPUTE_W") and (c.kwargs["BLOCK_V"] > 64 or c.num_warps < 8))]
    return kept or configs[:1]


_VOX_GRAIN = 256  # voxels per split are a multiple of this (so of every BLOCK_V)
_WGRAD_BLOCK_KT = 128  # (tap, C_in) rows of a wgrad GEMM tile: several taps per program for C_in < 128
# voxels per wgrad GEMM program at least (partials to sum stay small); the interpreter's tiny test volumes
# still get several splits
_WGRAD_MIN_VOX = _VOX_GRAIN if interpreting() else 4096
_WGRAD_PROGRAMS_PER_SLOT = 4  # wgrad GEMM programs per parallel slot: equal programs, so a short last wave


@triton.autotune(configs=_wgrad_configs(), key=["M", "C_IN", "C_OUT", "K_TOTAL", "STEP", "COMPUTE_W"],
                 prune_configs_by={"early_config_prune": _prune_wgrad}, cache_results=True)
@triton.jit
def _wgrad_kernel(x_ptr, taps_ptr, g_ptr, saved_ptr, alpha_ptr, dw_part_ptr, db_part_ptr, da_part_ptr, dz_ptr,
                  M, E1, E2, E3, Ds, Hs, Ws, C_IN, K_TOTAL, C_OUT, VOX_PER_SPLIT, KT_PAD, CO_PAD,
                  M1, S1, M2, S2, M3, S3,
                  STEP: tl.constexpr, FLAT_K: tl.constexpr, VEC: tl.constexpr, VEC_OUT: tl.constexpr,
                  DZ_KIND: tl.constexpr, ALPHA_PER_CH: tl.constexpr,
                  COMPUTE_W: tl.constexpr, REDUCE_BIAS: tl.constexpr, REDUCE_ALPHA: tl.constexpr,
                  WRITE_DZ: tl.constexpr, DOT_PREC: tl.constexpr,
                  BLOCK_V: tl.constexpr, BLOCK_KT: tl.constexpr, BLOCK_CO: tl.constexpr):
    """Program (split, kt-tile, co-tile) sums x_shifted^T @ dz over its voxel range into a fp32 partial.
    grad_out / saved / dz are channels-last: voxel m, channel co at m * C_OUT + co (read in runs of VEC_OUT
    channels, _runs). The kt-tile-0 programs also reduce dz (bias) and g * z * (z <= 0) (alpha) and write dz when
    asked."""
    split = tl.program_id(0).to(tl.int64)
    pid_kt = tl.program_id(1)
    pid_co = tl.program_id(2)
    co_run, co_place = _runs(pid_co * BLOCK_CO, BLOCK_CO, VEC_OUT)
    co = co_run * VEC_OUT + co_place
    co_ok = co_run * VEC_OUT < C_OUT
    first = (tl.zeros((BLOCK_CO,), dtype=tl.int32) + pid_kt) == 0  # a block, not a scalar: used in masks
    if DZ_KIND != 0:
        if ALPHA_PER_CH:
            al = tl.load(alpha_ptr + co, mask=co_ok, other=1.0).to(tl.float32)[None, :]
        else:
            al = tl.load(alpha_ptr).to(tl.float32)
    kt0 = pid_kt * BLOCK_KT
    acc = tl.zeros((BLOCK_KT, BLOCK_CO), dtype=tl.float32)
    # per-lane accumulators, reduced once at the end: cheaper and more accurate than a sum per step
    acc_b = tl.zeros((BLOCK_V, BLOCK_CO), dtype=tl.float32)
    acc_a = tl.zeros((BLOCK_V, BLOCK_CO), dtype=tl.float32)
    v_start = split * VOX_PER_SPLIT
    if COMPUTE_W:  # the voxel blocks' coordinates, carried as in _wgrad_gemm_kernel
        n0, a0, b0, c0 = row_split(v_start, E1, E2, E3)
    for i in range(0, VOX_PER_SPLIT, BLOCK_V):
        m = v_start + i + tl.arange(0, BLOCK_V)
        row_ok = m < M
        mask = row_ok[:, None] & co_ok[None, :]
        g_off = ((m * (C_OUT // VEC_OUT))[:, None] + co_run[None, :]) * VEC_OUT + co_place[None, :]
        g = tl.load(g_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
        if DZ_KIND != 0:
            s = tl.load(saved_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
            neg = s <= 0
            dz = tl.where(neg, g * al, g)
            if REDUCE_ALPHA:
                if DZ_KIND == 1:
                    z = tl.where(neg, tl.math.div_rn(s, al), s)  # '/' is approximate on the GPU
                else:
                    z = s
                acc_a += tl.where(neg, g * z, 0.0)
        else:
            dz = g
        if REDUCE_BIAS:
            acc_b += dz
        if WRITE_DZ:
            tl.store(dz_ptr + g_off, dz.to(dz_ptr.dtype.element_ty), mask=mask & first[None, :])
        if COMPUTE_W:
            n, i1, i2, i3 = carry_rows(tl.arange(0, BLOCK_V) + c0, b0, a0, n0, E1, E2, E3, M1, S1, M2, S2, M3, S3)
            n0, a0, b0, c0 = carry_rows(c0 + BLOCK_V, b0, a0, n0, E1, E2, E3, M1, S1, M2, S2, M3, S3)
            ra = i1 * STEP
            rb = i2 * STEP
            rc = i3 * STEP
            row_base = (((n * Ds + ra) * Hs + rb) * Ws + rc) * C_IN
            xt = _load_gathered(x_ptr, taps_ptr, row_base, ra, rb, rc, row_ok, kt0, K_TOTAL, C_IN, Ds, Hs, Ws,
                                FLAT_K, BLOCK_KT, VEC)
            acc = dot(tl.trans(xt), dz.to(x_ptr.dtype.element_ty), acc, DOT_PREC)
    if COMPUTE_W:
        kt = kt0 + tl.arange(0, BLOCK_KT)
        tl.store(dw_part_ptr + split * KT_PAD * CO_PAD + kt[:, None] * CO_PAD + co[None, :], acc)
    if REDUCE_BIAS:
        tl.store(db_part_ptr + split * CO_PAD + co, tl.sum(acc_b, axis=0), mask=first)
    if REDUCE_ALPHA:
        tl.store(da_part_ptr + split * CO_PAD + co, tl.sum(acc_a, axis=0), mask=first)


@triton.jit
def _tap_bits(ra, rb, rc, row_ok, Ds, Hs, Ws, KSIZE: tl.constexpr):
    """Per row, a bit mask of the taps whose source voxel lies inside the volume (bit t = tap t of the
    (kd, kh, kw) row-major table of _forward_taps): ~10 operations per row instead of ~15 per tile element."""
    if KSIZE == 1:
        bits = tl.where(row_ok, 1, 0)
    else:
        bits = tl.where(row_ok, 0x7FFFFFF, 0)
        bits = tl.where(ra >= 1, bits, bits & 0x7FFFE00)  # kd = 0 (offset -1) needs ra - 1 >= 0
        bits = tl.where(ra + 1 < Ds, bits, bits & 0x003FFFF)  # kd = 2
        bits = tl.where(rb >= 1, bits, bits & 0x7E3F1F8)  # kh = 0
        bits = tl.where(rb + 1 < Hs, bits, bits & 0x0FC7E3F)  # kh = 2
        bits = tl.where(rc >= 1, bits, bits & 0x6DB6DB6)  # kw = 0
        bits = tl.where(rc + 1 < Ws, bits, bits & 0x36DB6DB)  # kw = 2
    return bits


def _wgrad_gemm_configs():
    gpu = [triton.Config({"BLOCK_V": bv}, num_warps=w, num_stages=3) for bv, w in ((32, 4), (64, 4), (64, 8), (128, 8))]
    return autotune_configs(gpu, triton.Config({"BLOCK_V": 64}, num_warps=8, num_stages=3),
                            triton.Config({"BLOCK_V": 32}, num_warps=4, num_stages=1))


def _prune_wgrad_gemm(configs, named_args, **kwargs):
    """At most 64 fp32 registers' worth per thread of the x tile, the dz tile and the accumulator; fp32 x tiles
    of 128 x 128 exceed the shared memory of sm_90 with the 3-stage pipeline."""
    kt, co = kwargs["BLOCK_KT"], kwargs["BLOCK_CO"]
    x = named_args.get("x_ptr")
    wide = x is not None and x.element_size() == 4
    kept = [c for c in configs if c.kwargs["BLOCK_V"] * (kt // 2 + co) + kt * co <= 64 * 32 * c.num_warps
            and not (wide and c.kwargs["BLOCK_V"] * kt > 8192)]
    return kept or configs[:1]


@triton.autotune(configs=_wgrad_gemm_configs(), key=["M", "C_IN", "C_OUT", "K_TOTAL", "STEP"],
                 prune_configs_by={"early_config_prune": _prune_wgrad_gemm}, cache_results=True)
@triton.jit
def _wgrad_gemm_kernel(x_ptr, dz_ptr, dw_part_ptr,
                       M, E1, E2, E3, Ds, Hs, Ws, C_IN, K_TOTAL, C_OUT, VOX_PER_SPLIT, KT_PAD, CO_PAD,
                       M1, S1, M2, S2, M3, S3,
                       STEP: tl.constexpr, KSIZE: tl.constexpr, VEC: tl.constexpr, VEC_OUT: tl.constexpr,
                       DOT_PREC: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_KT: tl.constexpr,
                       BLOCK_CO: tl.constexpr):
    """Split-K GEMM dW^T[(tap, ci), co] = sum over voxels of x_shifted[v, (tap, ci)] * dz[v, co], from a dz that
    is already stored (channels-last, input dtype). Program (split, kt-tile, co-tile) owns a BLOCK_KT x BLOCK_CO
    tile (several taps: big tensor-core tiles, dz read K_TOTAL / BLOCK_KT times instead of once per tap) and
    writes its fp32 partial sum over the split's voxels; _finish_kernel sums the partials in a fixed order.
    Column k = tap * C_IN + ci; its offset and tap are fixed for the program, so per element only
    (row base + column offset) and one bit test of the row's tap mask remain. VEC (VEC_OUT) divides C_IN (C_OUT):
    runs of that many columns are one voxel's contiguous channels, written as such (offsets in runs, times the
    run length, plus the place in the run) so that the loads are vector-wide and asynchronous even where the
    channel counts are not multiples of 16 (8-channel layers: one synchronous 2-byte load per element otherwise)."""
    split = tl.program_id(0).to(tl.int64)
    run, place = _runs(tl.program_id(1) * BLOCK_KT, BLOCK_KT, VEC)
    kt_run = run * VEC
    co_run, co_place = _runs(tl.program_id(2) * BLOCK_CO, BLOCK_CO, VEC_OUT)
    co_ok = co_run * VEC_OUT < C_OUT
    tap = kt_run // C_IN
    ci_run = run - tap * (C_IN // VEC)
    if KSIZE == 1:
        delta = ci_run.to(tl.int64)
    else:
        dd = tap // 9 - 1
        dh = (tap // 3) % 3 - 1
        dw = tap % 3 - 1
        delta = ((dd * Hs + dh) * Ws + dw).to(tl.int64) * (C_IN // VEC) + ci_run
    tap = tl.where(kt_run < K_TOTAL, tap, 31)  # bit 31 is never set: padding columns read 0
    acc = tl.zeros((BLOCK_KT, BLOCK_CO), dtype=tl.float32)
    v_start = split * VOX_PER_SPLIT
    # the voxel blocks' coordinates carried from block to block with fast_div ((M, S) of each extent): divisions in
    # the loop (64-bit for the start, 32-bit per row) took more instructions than everything else in it
    n0, a0, b0, c0 = row_split(v_start, E1, E2, E3)
    for i in range(0, VOX_PER_SPLIT, BLOCK_V):
        m = v_start + i + tl.arange(0, BLOCK_V)
        row_ok = m < M
        n, i1, i2, i3 = carry_rows(tl.arange(0, BLOCK_V) + c0, b0, a0, n0, E1, E2, E3, M1, S1, M2, S2, M3, S3)
        n0, a0, b0, c0 = carry_rows(c0 + BLOCK_V, b0, a0, n0, E1, E2, E3, M1, S1, M2, S2, M3, S3)
        ra = i1 * STEP
        rb = i2 * STEP
        rc = i3 * STEP
        row_runs = ((n * Ds + ra) * Hs + rb) * Ws + rc  # source voxel; times C_IN // VEC: its first run
        bits = _tap_bits(ra, rb, rc, row_ok, Ds, Hs, Ws, KSIZE)
        ok = ((bits[:, None] >> tap[None, :]) & 1) != 0
        x_off = ((row_runs * (C_IN // VEC))[:, None] + delta[None, :]) * VEC + place[None, :]
        xt = tl.load(x_ptr + x_off, mask=ok, other=0.0)
        dz_off = ((m * (C_OUT // VEC_OUT))[:, None] + co_run[None, :]) * VEC_OUT + co_place[None, :]
        dz = tl.load(dz_ptr + dz_off, mask=row_ok[:, None] & co_ok[None, :], other=0.0)
        acc = dot(tl.trans(xt), dz, acc, DOT_PREC)
    kt = kt_run + place
    co = co_run * VEC_OUT + co_place
    tl.store(dw_part_ptr + split * KT_PAD * CO_PAD + kt[:, None] * CO_PAD + co[None, :], acc)


def _prune_tma_wgrad(configs, named_args, **kwargs):
    """The x box passes through registers (transposed for the tensor cores) beside the fp32 accumulator: at most
    96 elements of the two per thread (aot_check.py: no spills)."""
    rows = kwargs["BD"] * kwargs["BH"] * kwargs["BW"]
    per_block = kwargs["BLOCK_K"] * (kwargs["BLOCK_N"] + rows // 2)
    return [c for c in configs if per_block <= 96 * 32 * c.num_warps] or configs[-1:]


@triton.autotune(configs=_tma_configs(), key=["E1", "E2", "E3", "C_IN", "C_OUT", "BOXES_PER_SPLIT"],
                 prune_configs_by={"early_config_prune": _prune_tma_wgrad}, cache_results=True)
@triton.jit
def _wgrad_tma_kernel(x_desc, dz_desc, dw_part_ptr, E1, E2, E3, C_IN, C_OUT, TOTAL_BOXES, BOXES_PER_SPLIT, KT_PAD,
                      CO_PAD, CO_TILES, KSIZE: tl.constexpr, DOT_PREC: tl.constexpr, BD: tl.constexpr,
                      BH: tl.constexpr, BW: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Stride-1 weight gradient with TMA loads (sm_90+): program (kt tile * CO_TILES + co tile, split) sums
    x_shifted^T @ dz over the split's BD x BH x BW output boxes for one tap and BLOCK_K input channels (x_desc:
    (N, D, H, W, C_IN), the shifted box zero-filled outside the volume; dz_desc: (N, D, H, W, C_OUT), zero past its
    edges, which also zeroes the overhanging rows' x) and writes its fp32 partial; _finish_kernel sums the partials
    in a fixed order (deterministic). The programs of one split run side by side and share its boxes in L2."""
    BLOCK_M: tl.constexpr = BD * BH * BW
    pid = tl.program_id(0)
    kt_tile = pid // CO_TILES
    co0 = (pid - kt_tile * CO_TILES) * BLOCK_N
    split = tl.program_id(1)
    k0 = kt_tile * BLOCK_K
    tap = k0 // C_IN
    c0 = k0 - tap * C_IN
    dd = tap // (KSIZE * KSIZE) - KSIZE // 2
    dh = (tap // KSIZE) % KSIZE - KSIZE // 2
    dw = tap % KSIZE - KSIZE // 2
    boxes3 = tl.cdiv(E3, BW)
    boxes2 = tl.cdiv(E2, BH)
    boxes1 = tl.cdiv(E1, BD)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    first = split * BOXES_PER_SPLIT
    for b in range(first, tl.minimum(first + BOXES_PER_SPLIT, TOTAL_BOXES)):
        t = b // boxes3
        w0 = (b - t * boxes3) * BW
        t2 = t // boxes2
        h0 = (t - t2 * boxes2) * BH
        n = t2 // boxes1
        d0 = (t2 - n * boxes1) * BD
        a = x_desc.load([n, d0 + dd, h0 + dh, w0 + dw, c0]).reshape(BLOCK_M, BLOCK_K)
        g = dz_desc.load([n, d0, h0, w0, co0]).reshape(BLOCK_M, BLOCK_N)
        acc = dot(tl.trans(a), g, acc, DOT_PREC)
    kt = k0 + tl.arange(0, BLOCK_K)
    co = co0 + tl.arange(0, BLOCK_N)
    tl.store(dw_part_ptr + split.to(tl.int64) * KT_PAD * CO_PAD + kt[:, None] * CO_PAD + co[None, :], acc)


@triton.jit
def _split_sum(part_ptr, split_stride, splits, cols, cols_ok, SPLIT_BLOCK: tl.constexpr):
    """sum over s < splits of part[s * split_stride + cols] in fp32, SPLIT_BLOCK splits per step (loads in flight
    together, not one latency per split), in a fixed order: deterministic."""
    acc = tl.zeros(cols.shape, dtype=tl.float32)
    rows = tl.arange(0, SPLIT_BLOCK)
    for s0 in range(0, splits, SPLIT_BLOCK):
        sp = s0 + rows
        tile = tl.load(part_ptr + sp.to(tl.int64)[:, None] * split_stride + cols[None, :],
                       mask=(sp < splits)[:, None] & cols_ok[None, :], other=0.0)
        acc += tl.sum(tile, axis=0)
    return acc


@triton.jit
def _finish_kernel(dw_part_ptr, db_part_ptr, da_part_ptr, gw_ptr, gb_ptr, ga_ptr,
                   W_SPLITS, KT_PAD, CO_PAD, BA_SPLITS, BA_PAD, C_IN, C_OUT, TAPS, W_PROGRAMS,
                   HAS_B: tl.constexpr, HAS_A: tl.constexpr, SHARED_ALPHA: tl.constexpr, W_CHANNELS_LAST: tl.constexpr,
                   BLOCK: tl.constexpr, SPLIT_BLOCK: tl.constexpr):
    """The second stage of the backward's split reductions in one launch (deterministic: _split_sum). Programs
    below W_PROGRAMS: the weight partials (W_SPLITS, (tap, C_in) padded to KT_PAD, C_out padded to CO_PAD), read in
    their own layout (coalesced) and written once into grad_weight's (C_out, C_in, k, k, k) layout and dtype
    (W_CHANNELS_LAST: the weight's channels_last_3d strides, (C_out, taps, C_in) in memory, so that autograd keeps
    the gradient as it is rather than copying it into the parameter's layout). The
    program after them: the bias and alpha partials (BA_SPLITS, BA_PAD) where asked for (HAS_B, HAS_A);
    SHARED_ALPHA: the alpha gradient summed over the channels too."""
    pid = tl.program_id(0)
    if pid < W_PROGRAMS:
        j = pid * BLOCK + tl.arange(0, BLOCK)
        kt = j // CO_PAD
        co = j - kt * CO_PAD
        ok = (kt < TAPS * C_IN) & (co < C_OUT)
        acc = _split_sum(dw_part_ptr, KT_PAD * CO_PAD, W_SPLITS, j, ok, SPLIT_BLOCK)
        if W_CHANNELS_LAST:
            offset = co.to(tl.int64) * (TAPS * C_IN) + kt
        else:
            tap = kt // C_IN
            ci = kt - tap * C_IN
            offset = (co * C_IN + ci).to(tl.int64) * TAPS + tap
        tl.store(gw_ptr + offset, acc.to(gw_ptr.dtype.element_ty), mask=ok)
    else:
        alpha_total = tl.zeros((BLOCK,), dtype=tl.float32)
        for c0 in range(0, C_OUT, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            ok = c < C_OUT
            if HAS_B:
                acc_b = _split_sum(db_part_ptr, BA_PAD, BA_SPLITS, c, ok, SPLIT_BLOCK)
                tl.store(gb_ptr + c, acc_b.to(gb_ptr.dtype.element_ty), mask=ok)
            if HAS_A:
                acc_a = _split_sum(da_part_ptr, BA_PAD, BA_SPLITS, c, ok, SPLIT_BLOCK)
                if SHARED_ALPHA:
                    alpha_total += acc_a
                else:
                    tl.store(ga_ptr + c, acc_a.to(ga_ptr.dtype.element_ty), mask=ok)
        if HAS_A and SHARED_ALPHA:
            tl.store(ga_ptr, tl.sum(alpha_total, axis=0).to(ga_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------
_TUNED_KERNELS = (_conv_kernel, _conv_tma_kernel, _wgrad_kernel, _wgrad_gemm_kernel, _wgrad_tma_kernel)


@contextlib.contextmanager
def default_tiles():
    """Inside it every launch takes its kernel's default tile config (autotune_configs puts it first) instead of
    timing the configs on each new shape: for runs whose speed does not matter and whose shapes are all new (the
    profile's largest-volume probes, where tuning every shape took the whole time budget)."""
    saved = [kernel.configs for kernel in _TUNED_KERNELS]
    try:
        for kernel in _TUNED_KERNELS:
            kernel.configs = kernel.configs[:1]  # Triton's autotuner neither prunes nor times a single config
        yield
    finally:
        for kernel, configs in zip(_TUNED_KERNELS, saved):
            kernel.configs = configs


def _channels_last(t):
    return t.contiguous(memory_format=torch.channels_last_3d)


def _weight_matrix(weight_view, dtype):
    """A permuted view of the weight as a contiguous (rows, last dim) matrix in `dtype`, in one copy (the cast of
    float32 parameters for fp16 / bf16 activations included)."""
    mat = torch.empty(weight_view.shape, dtype=dtype, device=weight_view.device)
    return mat.copy_(weight_view).view(-1, weight_view.shape[-1])


def _k_blocking(c_src, k_total):
    """(FLAT_K, BLOCK_K): one tap per K block when C_src is a multiple of 16, else taps and channels
    flattened jointly (C_in = 4 or 8 would otherwise pad every tap's K to 16 and waste tensor-core work)."""
    if c_src % 16 == 0:
        return False, 64 if c_src % 64 == 0 else (32 if c_src % 32 == 0 else 16)
    return True, 16 if k_total <= 16 else 32


def _run_length(channels, element_size):
    """VEC of a row of `channels` (see _runs): the longest run of its channels that one 16-byte copy holds (a power
    of two dividing the count)."""
    vec = 1
    while channels % (2 * vec) == 0 and 2 * vec * element_size <= 16:
        vec *= 2
    return vec


@functools.lru_cache(maxsize=None)
def _tap_table(deltas, device):
    """Device tensor (T, 3) of tap offsets, made once per (taps, device)."""
    return device_table(deltas, torch.int32, device).reshape(-1, 3)


def _launch_conv(src, weight_mat, taps, out, rows, c_src, step, *, bias=None, alpha=None, residual=None,
                 residual_first=False, act=None, phases=None, kernel_taps=None):
    """src: channels-last contiguous (N, C_src, Ds, Hs, Ws); weight_mat: (K, C_out) contiguous;
    out: (N, C_out, E1, E2, E3) view with any strides; rows: (N, E1, E2, E3); phases: for the stride-2 dgrad,
    _phase_table's (table, classes, largest K) (out and rows then describe the largest class, at offset 0);
    kernel_taps: (k, sign) when the taps are the k^3 kernel's in row-major order, times sign (the TMA kernel
    computes them instead of reading the table, as it does the stride-2 dgrad's per class)."""
    n, e1, e2, e3 = rows
    m_rows = n * e1 * e2 * e3
    if m_rows == 0:
        return
    k_total, c_out = weight_mat.shape
    phase_table, phase_count = out, 1
    if phases is not None:
        phase_table, phase_count, k_total = phases  # the scalar K: the largest class's
    flat_k, block_k = _k_blocking(c_src, k_total)
    epilogue = dict(HAS_BIAS=bias is not None, ACT_KIND=0 if alpha is None else (2 if alpha.numel() > 1 else 1),
                    RES_MODE=0 if residual is None else (1 if residual_first else 2), SAVE_ACT=act is not None,
                    DOT_PREC=dot_precision(src.dtype))
    res = residual if residual is not None else out
    pointers = (bias if bias is not None else out, alpha if alpha is not None else out, res, out,
                act if act is not None else out)
    strides = out.stride() + res.stride()
    if ((kernel_taps is not None or phases is not None) and step == 1 and not flat_k
            and _launch_conv_tma(src, weight_mat, rows, c_src, k_total, kernel_taps or (3, 0), phases, pointers,
                                 strides, epilogue)):
        return
    columns_128 = not flat_k and src.element_size() == 2 and residual is None
    block_n = next_pow2(c_out, 16, _MAX_BLOCK_N_TAP if columns_128 else _MAX_BLOCK_N)
    grid_n = cdiv(c_out, block_n)
    grid = lambda meta: (cdiv(m_rows, meta["BLOCK_M"]), grid_n, phase_count)  # noqa: E731
    _conv_kernel[grid](
        src, taps, weight_mat, *pointers, phase_table,
        m_rows, e1, e2, e3, src.shape[2], src.shape[3], src.shape[4], c_src, k_total, c_out, *strides,
        STEP=step, FLAT_K=c_src if flat_k else 0, VEC=_run_length(c_src, src.element_size()),
        VEC_OUT=_run_length(c_out, src.element_size()), EVEN_N=c_out % block_n == 0, PHASES=phases is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, **epilogue,
    )


def tma_unsupported(src, other, n):
    """Why the TMA kernels cannot run this conv (empty: they can): src (N, C, D, H, W) channels-last, other the
    second operand (the weight matrix (K, C_out), or dz for the weight gradient: its channels are dim 1 too), n the
    batch. Bulk tensor copies need sm_90+, 16-byte aligned bases and 16-byte multiples as row strides. fp16/bf16
    only: fp32 tiles reach the tensor cores from shared memory unrounded (TF32 by truncation, measured on an H100
    at 2.7x PyTorch's TF32 error), and exact fp32 multiplies on the FMA units (no TMA benefit)."""
    reasons = []
    if not env_flag("SEG3D_FAST_TRITON_TMA"):
        reasons.append("the TMA kernels are opt-in (SEG3D_FAST_TRITON_TMA=1): measured on an H100 they are not yet "
                       "faster on every layer shape (the 1x1x1 layer is slower with them)")
    if TensorDescriptor is None:
        reasons.append(f"Triton {triton.__version__} has no host-side tensor descriptors")
    if src.device.type == "cuda" and torch.cuda.get_device_capability(src.device) < (9, 0):
        reasons.append("tensor memory accelerator needs compute capability 9.0 or newer")
    if src.element_size() != 2:
        reasons.append(f"{src.dtype}: the TMA kernels take fp16/bf16 (fp32 would reach the tensor cores truncated "
                       "to TF32)")
    size = src.element_size()
    if (src.shape[1] * size) % 16 or (other.shape[1] * size) % 16:
        reasons.append("channel rows must be multiples of 16 bytes")
    if src.data_ptr() % 16 or other.data_ptr() % 16:
        reasons.append("tensors must start 16-byte aligned")
    if n > 65535:
        reasons.append("batch above 65535 (the grid's second axis)")
    return reasons


@functools.lru_cache(maxsize=1024)
def _tma_box(e1, e2, e3, block_m):
    """(BD, BH, BW) output box of block_m voxels that wastes the fewest rows at the volume's edges (ties: the
    widest rows, the longest contiguous copies)."""
    best = None
    for bw in (8, 16, 32, 64):
        for bh in (1, 2, 4, 8, 16):
            bd = block_m // (bw * bh)
            if bd < 1 or bd * bh * bw != block_m or bd > 16:
                continue
            covered = cdiv(e1, bd) * bd * cdiv(e2, bh) * bh * cdiv(e3, bw) * bw
            key = (covered, -bw, -bh)
            if best is None or key < best[0]:
                best = (key, (bd, bh, bw))
    return best[1]


def _tma_blocks(c_src, c_out, size):
    """(BLOCK_K, BLOCK_N) of the TMA kernels: K blocks of one tap's channels in rows of at most 128 bytes (one
    swizzle span), up to 128 output channels per program."""
    return min(_k_blocking(c_src, c_src)[1], 128 // size), next_pow2(c_out, 16, 128)


def _box_descriptor(t, box, channels):
    """TMA descriptor of a channels-last (N, C, D, H, W) tensor seen as (N, D, H, W, C), blocks (1, *box, channels)."""
    return TensorDescriptor.from_tensor(t.permute(0, 2, 3, 4, 1), [1, *box, channels])


@functools.lru_cache(maxsize=1024)
def _tma_plan(n, e1, e2, e3, c_src, c_out, size, classes, slots):
    """-> (BLOCK_K, BLOCK_N, GRID_N, box (BD, BH, BW), grid) of _conv_tma_kernel, made once per shape."""
    block_k, block_n = _tma_blocks(c_src, c_out, size)
    grid_n = cdiv(c_out, block_n)
    block_m = 128 if cdiv(n * e1 * e2 * e3, 128) * grid_n * classes >= slots else 64  # 64: more programs
    bd, bh, bw = _tma_box(e1, e2, e3, block_m)
    return block_k, block_n, grid_n, (bd, bh, bw), (cdiv(e1, bd) * cdiv(e2, bh) * cdiv(e3, bw) * grid_n, n, classes)


def _launch_conv_tma(src, weight_mat, rows, c_src, k_total, kernel_taps, phases, pointers, strides, epilogue):
    """_conv_tma_kernel where it can run (tma_unsupported); False where it cannot. The host picks the box shape
    (it fixes the descriptors' block shapes), the autotuner warps and pipeline stages."""
    n, e1, e2, e3 = rows
    if tma_unsupported(src, weight_mat, n):
        return False
    c_out = weight_mat.shape[1]
    phase_table, classes = (phases[0], phases[1]) if phases is not None else (pointers[3], 1)
    block_k, block_n, grid_n, box, grid = _tma_plan(n, e1, e2, e3, c_src, c_out, src.element_size(), classes,
                                                    parallel_slots(src.device))
    src_desc = _box_descriptor(src, box, block_k)
    w_desc = TensorDescriptor.from_tensor(weight_mat, [block_k, block_n])
    ksize, sign = kernel_taps
    _conv_tma_kernel[grid](src_desc, w_desc, *pointers, phase_table, e1, e2, e3, c_src, k_total, c_out, grid_n,
                           *strides, KSIZE=ksize, TAP_SIGN=sign, PHASES=phases is not None, BD=box[0], BH=box[1],
                           BW=box[2], BLOCK_N=block_n, BLOCK_K=block_k, **epilogue)
    return True


@functools.lru_cache(maxsize=None)
def _forward_taps(k, device):
    p = k // 2
    return _tap_table(tuple((kd - p, kh - p, kw - p) for kd in range(k) for kh in range(k) for kw in range(k)), device)


def conv3d_prelu_unsupported(x, weight, bias, alpha, residual, stride, residual_first):
    reasons = tensor_reasons({"x": x, "weight": weight, "bias": bias, "alpha": alpha, "residual": residual})
    if x.dim() != 5 or weight.dim() != 5:
        reasons.append(f"x and weight must be 5-D (got x.dim()={x.dim()}, weight.dim()={weight.dim()})")
        return reasons
    k = weight.shape[-1]
    if tuple(weight.shape[2:]) not in ((1, 1, 1), (3, 3, 3)):
        reasons.append(f"weight kernel size {tuple(weight.shape[2:])}: only 1x1x1 and 3x3x3 are supported")
    if weight.shape[1] != x.shape[1]:
        reasons.append(f"weight has {weight.shape[1]} input channels but x has {x.shape[1]} "
                       "(groups / dilation are not supported)")
    if stride not in (1, 2):
        reasons.append(f"stride {stride}: only 1 and 2 are supported")
    if x.numel() == 0:
        reasons.append("x has no elements (an empty batch runs on the reference backend)")
    if alpha is not None and alpha.numel() not in (1, weight.shape[0]):
        reasons.append(f"alpha has {alpha.numel()} elements: expected 1 or C_out={weight.shape[0]}")
    if residual is not None and stride in (1, 2) and k in (1, 3):
        expected = (x.shape[0], weight.shape[0]) + tuple((s - 1) // stride + 1 for s in x.shape[2:])
        if tuple(residual.shape) != expected:
            reasons.append(f"residual has shape {tuple(residual.shape)}: expected {expected}")
    return reasons


def conv3d_prelu_forward(x, weight, bias, alpha, residual, stride, residual_first, save_act):
    n, c_in, d, h, w = x.shape
    c_out, k = weight.shape[0], weight.shape[-1]
    do, ho, wo = [(s - 1) // stride + 1 for s in (d, h, w)]  # padding k // 2: same for k = 1 and 3
    fmt = out_format(x)
    out = torch.empty((n, c_out, do, ho, wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    act = torch.empty_like(out) if save_act else None
    weight_mat = _weight_matrix(weight.permute(2, 3, 4, 1, 0), x.dtype)  # rows (tap, C_in)
    _launch_conv(_channels_last(x), weight_mat, _forward_taps(k, x.device), out, (n, do, ho, wo), c_in, stride,
                 bias=by_channel(bias), alpha=by_channel(alpha), residual=residual, residual_first=residual_first,
                 act=act, kernel_taps=(k, 1))
    return out, act


@functools.lru_cache(maxsize=None)
def _dgrad_plan(k, stride, device):
    """The taps of grad_x = conv_transpose(dz, weight) as gather convs over dz. Input voxel i = stride * o - p + kk,
    i.e. o = (i + p - kk) / stride. Stride 1: one class, every tap. Stride 2: the voxels i = 2 j + q of parity
    class q get only the taps kk with (q + p - kk) even, at o = j + (q + p - kk) / 2 (no work on zero taps).
    -> (classes [(q, tap count)], weight tap order (kd * k + kh) * k + kw per tap, (T, 3) grad_out offsets), the
    taps listed class after class."""
    p = k // 2
    classes, order, deltas = [], [], []
    for q in itertools.product(range(stride), repeat=3):
        per_dim = [[(kk, (qq + p - kk) // stride) for kk in range(k) if (qq + p - kk) % stride == 0] for qq in q]
        if any(not taps for taps in per_dim):
            continue  # no tap reaches this class (k = 1, stride 2): its gradient is 0
        taps = list(itertools.product(*per_dim))
        classes.append((q, len(taps)))
        order += [(a[0] * k + b[0]) * k + c[0] for a, b, c in taps]
        deltas += [(a[1], b[1], c[1]) for a, b, c in taps]
    return tuple(classes), device_table(order, torch.int64, device), _tap_table(tuple(deltas), device)


@functools.lru_cache(maxsize=256)
def _phase_table(k, c_out, x_shape, grad_x_strides, device):
    """Rows (voxels, E1, E2, E3, first weight row, K, first tap, output offset) of the stride-2 dgrad's classes
    (the PHASES mode of _conv_kernel), made once per shape -> (table, classes, largest K)."""
    n, _, d, h, w = x_shape
    rows, k_begin, tap_begin = [], 0, 0
    for q, n_taps in _dgrad_plan(k, 2, device)[0]:
        e1, e2, e3 = ((size - qq + 1) // 2 for size, qq in zip((d, h, w), q))
        offset = q[0] * grad_x_strides[2] + q[1] * grad_x_strides[3] + q[2] * grad_x_strides[4]
        # an empty class (extent 1, odd parity) keeps extents of 1 for the kernel's row split; 0 rows mask it all
        rows.append((n * e1 * e2 * e3, max(e1, 1), max(e2, 1), max(e3, 1), k_begin, n_taps * c_out, tap_begin,
                     offset))
        k_begin += n_taps * c_out
        tap_begin += n_taps
    return device_table(rows, torch.int64, device), len(rows), max(r[5] for r in rows)


def _dgrad(dz, weight, x, stride):
    """grad_x = conv_transpose(dz, weight): one launch (stride 2: the parity classes on the grid's third axis)."""
    n, c_in = x.shape[:2]
    c_out, k = weight.shape[0], weight.shape[-1]
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=out_format(x))
    classes, order, taps = _dgrad_plan(k, stride, x.device)
    # rows (tap, C_out) in the plan's tap order, columns C_in: the flipped, transposed kernel in one gather
    weight_mat = _weight_matrix(weight.permute(2, 3, 4, 0, 1), x.dtype).view(k ** 3, c_out, c_in)
    weight_mat = weight_mat.index_select(0, order).view(-1, c_in)
    out = grad_x[:, :, ::stride, ::stride, ::stride]  # class (0, 0, 0), the largest
    phases = None
    if len(classes) > 1:
        phases = _phase_table(k, c_out, tuple(x.shape), grad_x.stride(), x.device)
    elif stride == 2:
        grad_x.zero_()  # k = 1: the odd positions get no tap at all
    _launch_conv(dz, weight_mat, taps, out, (n,) + tuple(out.shape[2:]), c_out, 1, phases=phases,
                 kernel_taps=(k, -1) if stride == 1 else None)
    return grad_x


def _wgrad_and_reductions(g, saved, dz_kind, alpha, x, weight, stride, want_w, want_b, want_a, want_dz):
    n, c_in, d, h, w = x.shape
    c_out, k = weight.shape[0], weight.shape[-1]
    do, ho, wo = g.shape[2:]
    m_rows = n * do * ho * wo
    k_total = k * k * k * c_in
    flat_k, block_kt = _k_blocking(c_in, k_total)
    # the elementwise pass alone (no weight GEMM, whose tensor-core tiles want 16 columns) covers only the channels
    block_co = next_pow2(c_out, 16 if want_w else 2, _MAX_BLOCK_N)
    kt_tiles = cdiv(k_total, block_kt) if want_w else 1
    co_tiles = cdiv(c_out, block_co)
    kt_pad, co_pad = kt_tiles * block_kt, co_tiles * block_co
    splits = max(1, min(cdiv(m_rows, _VOX_GRAIN), cdiv(parallel_slots(x.device), kt_tiles * co_tiles)))
    vox_per_split = cdiv(cdiv(m_rows, splits), _VOX_GRAIN) * _VOX_GRAIN
    splits = max(1, cdiv(m_rows, vox_per_split))
    f32 = dict(dtype=torch.float32, device=x.device)
    dw_part = torch.empty((splits, kt_pad, co_pad), **f32) if want_w else None
    db_part = torch.empty((splits, co_pad), **f32) if want_b else None
    da_part = torch.empty((splits, co_pad), **f32) if want_a else None
    dz = torch.empty(g.shape, dtype=g.dtype, device=g.device, memory_format=torch.channels_last_3d) if want_dz else None
    xs = _channels_last(x) if want_w else g
    dummy = g
    _wgrad_kernel[(splits, kt_tiles, co_tiles)](
        xs, _forward_taps(k, x.device), g, saved if saved is not None else g, alpha if alpha is not None else dummy,
        dw_part if want_w else dummy, db_part if want_b else dummy, da_part if want_a else dummy,
        dz if want_dz else dummy,
        m_rows, do, ho, wo, d, h, w, c_in, k_total, c_out, vox_per_split, kt_pad, co_pad,
        *fast_divisor(do), *fast_divisor(ho), *fast_divisor(wo), STEP=stride, FLAT_K=c_in if flat_k else 0,
        VEC=_run_length(c_in, x.element_size()), VEC_OUT=_run_length(c_out, g.element_size()), DZ_KIND=dz_kind,
        ALPHA_PER_CH=alpha is not None and alpha.numel() > 1,
        COMPUTE_W=want_w, REDUCE_BIAS=want_b, REDUCE_ALPHA=want_a, WRITE_DZ=want_dz,
        DOT_PREC=dot_precision(x.dtype), BLOCK_KT=block_kt, BLOCK_CO=block_co,
    )
    return dw_part, db_part, da_part, dz  # the partials: summed by _finish


def _voxel_splits(units, voxels, tiles, device):
    """(splits, units per split) of a split-K weight gradient over `units` (voxel grains or boxes) that hold
    `voxels`: many equal programs (a short tail wave) but at least _WGRAD_MIN_VOX voxels each (few partials to
    sum). `tiles`: the programs of one split."""
    splits = max(1, min(cdiv(_WGRAD_PROGRAMS_PER_SLOT * parallel_slots(device), tiles), cdiv(voxels, _WGRAD_MIN_VOX)))
    per_split = cdiv(units, splits)
    return cdiv(units, per_split), per_split


def _wgrad_gemm(dz, x, weight, stride):
    """The weight gradient's fp32 partials per voxel split from a stored dz (channels-last), by
    _wgrad_gemm_kernel (summed by _finish)."""
    n, c_in, d, h, w = x.shape
    c_out, k = weight.shape[0], weight.shape[-1]
    do, ho, wo = dz.shape[2:]
    m_rows = n * do * ho * wo
    k_total = k * k * k * c_in
    block_kt = next_pow2(k_total, 16, _WGRAD_BLOCK_KT)
    block_co = next_pow2(c_out, 16, _MAX_BLOCK_N)
    kt_tiles, co_tiles = cdiv(k_total, block_kt), cdiv(c_out, block_co)
    splits, grains = _voxel_splits(cdiv(m_rows, _VOX_GRAIN), m_rows, kt_tiles * co_tiles, x.device)
    vox_per_split = grains * _VOX_GRAIN
    kt_pad, co_pad = kt_tiles * block_kt, co_tiles * block_co
    dw_part = torch.empty((splits, kt_pad, co_pad), dtype=torch.float32, device=x.device)
    _wgrad_gemm_kernel[(splits, kt_tiles, co_tiles)](
        _channels_last(x), dz, dw_part,
        m_rows, do, ho, wo, d, h, w, c_in, k_total, c_out, vox_per_split, kt_pad, co_pad,
        *fast_divisor(do), *fast_divisor(ho), *fast_divisor(wo), STEP=stride, KSIZE=k,
        VEC=_run_length(c_in, x.element_size()), VEC_OUT=_run_length(c_out, x.element_size()),
        DOT_PREC=dot_precision(x.dtype), BLOCK_KT=block_kt, BLOCK_CO=block_co,
    )
    return dw_part


def _wgrad_tma(dz, x, weight):
    """The weight gradient's partials of a stride-1 conv by _wgrad_tma_kernel, or None where it cannot run
    (tma_unsupported)."""
    n, c_in = x.shape[:2]
    c_out, k = weight.shape[0], weight.shape[-1]
    xs = _channels_last(x)
    if c_in % 16 or tma_unsupported(xs, dz, n):
        return None
    e1, e2, e3 = dz.shape[2:]
    block_k, block_n = _tma_blocks(c_in, c_out, x.element_size())
    kt_tiles, co_tiles = k ** 3 * c_in // block_k, cdiv(c_out, block_n)
    box = _tma_box(e1, e2, e3, 128 if n * e1 * e2 * e3 >= 128 * 64 else 64)
    total_boxes = n * cdiv(e1, box[0]) * cdiv(e2, box[1]) * cdiv(e3, box[2])
    splits, per_split = _voxel_splits(total_boxes, total_boxes * math.prod(box), kt_tiles * co_tiles, x.device)
    kt_pad, co_pad = kt_tiles * block_k, co_tiles * block_n
    dw_part = torch.empty((splits, kt_pad, co_pad), dtype=torch.float32, device=x.device)
    x_desc, dz_desc = _box_descriptor(xs, box, block_k), _box_descriptor(dz, box, block_n)
    _wgrad_tma_kernel[(kt_tiles * co_tiles, splits)](
        x_desc, dz_desc, dw_part, e1, e2, e3, c_in, c_out, total_boxes, per_split, kt_pad, co_pad, co_tiles,
        KSIZE=k, DOT_PREC=dot_precision(x.dtype), BD=box[0], BH=box[1], BW=box[2], BLOCK_K=block_k,
        BLOCK_N=block_n)
    return dw_part


_FINISH_BLOCK = 256  # weight elements (bias / alpha channels) per program
_FINISH_SPLITS = 16  # splits summed per step: a 16 x 256 fp32 tile, 32 values per thread


def _finish(dw_part, db_part, da_part, weight, alpha, dtype):
    """(grad_weight, grad_bias, grad_alpha) from the split partials (None where not asked for), in one launch of
    _finish_kernel: weight in its own layout and dtype, bias in `dtype`, alpha in alpha's shape and dtype."""
    c_out, c_in, k = weight.shape[0], weight.shape[1], weight.shape[-1]
    dev = weight.device
    w_format = out_format(weight)  # a channels-last model's weight: its gradient written the same way
    grad_w = torch.empty_like(weight, memory_format=w_format) if dw_part is not None else None
    grad_b = torch.empty(c_out, dtype=dtype, device=dev) if db_part is not None else None
    grad_a = torch.empty(alpha.shape, dtype=alpha.dtype, device=dev) if da_part is not None else None
    w_programs = cdiv(dw_part[0].numel(), _FINISH_BLOCK) if dw_part is not None else 0
    reductions = db_part if db_part is not None else da_part
    programs = w_programs + (reductions is not None)
    if programs == 0:
        return grad_w, grad_b, grad_a
    w_like = dw_part if dw_part is not None else reductions
    _finish_kernel[(programs,)](
        w_like, db_part if db_part is not None else w_like, da_part if da_part is not None else w_like,
        grad_w if grad_w is not None else w_like, grad_b if grad_b is not None else w_like,
        grad_a if grad_a is not None else w_like,
        *(dw_part.shape if dw_part is not None else (0, 0, 0)),
        *(reductions.shape if reductions is not None else (0, 0)), c_in, c_out, k ** 3, w_programs,
        HAS_B=db_part is not None, HAS_A=da_part is not None, SHARED_ALPHA=alpha is not None and alpha.numel() == 1,
        W_CHANNELS_LAST=w_format is torch.channels_last_3d, BLOCK=_FINISH_BLOCK, SPLIT_BLOCK=_FINISH_SPLITS)
    return grad_w, grad_b, grad_a


def _backward(g, s, dz_kind, a, x, weight, stride, want_x, want_w, want_b, want_a, want_dz):
    """dz written once (with the bias / alpha partial sums) by the elementwise pass of _wgrad_kernel; then dgrad is
    a plain implicit GEMM on dz and wgrad the split-K GEMM of _wgrad_gemm_kernel; _finish sums the partials.
    (Forming dz in the loads of both GEMMs instead costs 27 loads of two tensors plus the PReLU backward per
    element: measured slower.) -> grad_x, the weight / bias / alpha partials (None where not asked for), dz."""
    need_dz = dz_kind != _DZ_NONE and (want_x or want_w or want_dz)
    db_part = da_part = None
    dz = g
    if need_dz or want_b or want_a:
        _, db_part, da_part, dz_written = _wgrad_and_reductions(g, s, dz_kind, a, x, weight, stride,
                                                                False, want_b, want_a, need_dz)
        if need_dz:
            dz = dz_written
    grad_x = _dgrad(dz, weight, x, stride) if want_x else None
    dw_part = None
    if want_w and dot_precision(x.dtype) == "ieee":
        # exact fp32 has no tensor cores: Triton's FMA dot holds whole operand tiles in registers and the big
        # tiles of _wgrad_gemm_kernel spill (ptxas, sm_90); the one-tap kernel runs on the stored dz instead
        dw_part = _wgrad_and_reductions(dz, None, _DZ_NONE, None, x, weight, stride, True, False, False, False)[0]
    elif want_w:
        dw_part = _wgrad_tma(dz, x, weight) if stride == 1 else None
        if dw_part is None:
            dw_part = _wgrad_gemm(dz, x, weight, stride)
    return grad_x, dw_part, db_part, da_part, dz


def conv3d_prelu_backward(grad_out, x, weight, alpha, saved, saved_kind, stride, output_mask):
    want_x, want_w, want_b, want_a, want_dz = (bool(v) for v in output_mask)
    if saved_kind not in _DZ_KINDS:
        raise ValueError(f"saved_kind must be one of {sorted(_DZ_KINDS)}, got {saved_kind!r}")
    dz_kind = _DZ_KINDS[saved_kind]
    if dz_kind == _DZ_NONE:
        want_a = False  # no activation: no alpha gradient
    g = _channels_last(grad_out)
    s = _channels_last(saved) if dz_kind != _DZ_NONE else None
    a = by_channel(alpha) if dz_kind != _DZ_NONE else None
    grad_x, dw_part, db_part, da_part, dz = _backward(g, s, dz_kind, a, x, weight, stride,
                                                      want_x, want_w, want_b, want_a, want_dz)
    grad_w, grad_b, grad_a = _finish(dw_part, db_part, da_part, weight, alpha, weight.dtype)
    if not want_dz:
        dz = None
    elif dz_kind == _DZ_NONE:
        dz = grad_out  # with no activation dz is grad_out itself
    return grad_x, grad_w, grad_b, grad_a, dz
