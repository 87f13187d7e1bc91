"""CUDA C++ backend: the compiled extension `seg3d_fast._cuda` (kernels in csrc/, contract in API.md).

The extension never sees a torch tensor: this module makes the layouts the kernels need (channels-last,
16-byte aligned), allocates outputs and scratch with torch (so the caching allocator and torch's stream are
used), and passes device pointers, sizes, dtype codes and the current stream. Every result is deterministic
(split reductions summed in a fixed order; no atomics), so `backends.deterministic()` needs nothing extra.
"""
from __future__ import annotations

import importlib
import itertools
import math
import os
import threading
from functools import lru_cache

import torch

from ._layout import as_param, out_format

try:
    _cuda = importlib.import_module("seg3d_fast._cuda")
    _IMPORT_ERROR: Exception | None = None
except ImportError as e:  # built without nvcc, or a broken build
    _cuda = None
    _IMPORT_ERROR = e

NAME = "cuda"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
LABEL_CODES = {torch.int64: 0, torch.int32: 1, torch.uint8: 2}
PROBABILITY_TARGET, PROBABILITY_TARGET_F32 = 3, 4  # probabilities in the logits' dtype, in float32
MAX_CLASSES = 32         # kMaxClasses in csrc/launchers.h
INTERFACE_REVISION = 1   # the extension's INTERFACE_REVISION (csrc/bindings.cpp): bump both at any contract change
SAVED_KINDS = {"none": 0, "act": 1, "preact": 2}
MAX_VOXELS = 2**31 - 2**16  # voxel (row) indices are 32-bit (with room for a tile past the end); offsets 64-bit
WGRAD_BLOCKS = {1: 256, 2: 1024, 3: 1024}  # wgrad splits aim at about this many blocks per kernel version (fixed, so
                                  # results do not depend on the card; v2 blocks are cheaper, more of them hide latency)
KERNELS_ENV = "SEG3D_FAST_CUDA_KERNELS"  # "v1": the first kernels (fallback); "v2": without the halo kernel; unset/"v3"
PRELU_ROW_BLOCKS = 512   # row blocks of the PReLU-backward reduction (fixed, for the same reason)


def unavailable_reason() -> str | None:
    if _cuda is None:
        if isinstance(_IMPORT_ERROR, ModuleNotFoundError) and _IMPORT_ERROR.name == "seg3d_fast._cuda":
            return "extension not built (no nvcc at install time)"
        return f"extension seg3d_fast._cuda failed to import: {type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR}"
    built = getattr(_cuda, "INTERFACE_REVISION", None)
    if built != INTERFACE_REVISION:
        return (f"extension {getattr(_cuda, '__file__', 'seg3d_fast._cuda')} was built from another version of "
                f"seg3d_fast (interface revision {built}, this package needs {INTERFACE_REVISION}): reinstall the "
                "package (pip install .) to rebuild it")
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


@lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _device_reasons(t: torch.Tensor, name: str) -> list[str]:
    if t.device.type != "cuda":
        return [f"{name} is on {t.device}, the cuda backend needs CUDA tensors"]
    if _capability(t.device.index) < (8, 0):
        return [f"{name} is on a GPU of compute capability {_capability(t.device.index)}, needs >= 8.0 (sm_80)"]
    return []


def _copy_bytes(channels: int, dtype: torch.dtype) -> int:
    """Largest copy (16, 8, 4 or 2 bytes) that a channel row of this length splits into. 2 bytes (odd fp16/bf16
    channel counts: single-channel images, odd class counts) has no cp.async form: the first-generation kernels
    load those rows element by element."""
    row = channels * dtype.itemsize
    return next(b for b in (16, 8, 4, 2) if row % b == 0)


def _channels_in_16_bytes(channels: int, dtype: torch.dtype) -> int:
    """The channel count rounded up to whole 16-byte rows (zero channels added where a kernel wants them)."""
    return channels + -channels % (16 // dtype.itemsize)


def _kernel_input(x: torch.Tensor) -> torch.Tensor:
    """x as the conv kernels read it: channels-last and 16-byte aligned (_ndhwc); rows whose length is not a
    multiple of 8 bytes (a single-channel CT or MRI volume, 3 channels, 2-channel bf16) get zero channels up to 16
    bytes, so that they run on the 16-byte kernels (the halo kernel where it applies) rather than the first
    generation's element-wise or 4-byte copies; the caller pads the weights to match. Zeros, though those channels'
    weights are zero too: memory left as it was may hold NaN, and NaN x 0 is NaN."""
    xc = _ndhwc(x)
    c = x.shape[1]
    if c * x.dtype.itemsize % 8 == 0:
        return xc
    padded = torch.empty((x.shape[0], _channels_in_16_bytes(c, x.dtype), *x.shape[2:]), dtype=x.dtype,
                         device=x.device, memory_format=torch.channels_last_3d)
    padded[:, c:] = 0
    padded[:, :c] = xc
    return padded


def _ndhwc(t: torch.Tensor) -> torch.Tensor:
    """Channels-last (N, D, H, W, C memory) and 16-byte aligned, copying only when needed."""
    t = t.contiguous(memory_format=torch.channels_last_3d)
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _dense(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Contiguous, 16-byte aligned and in `dtype` (default: its own): one copy at most (float32 parameters of fp16 /
    bf16 activations are cast in the same copy)."""
    if dtype is not None and t.dtype != dtype:
        # (only with a new dtype: with its own, to() returns some permuted views as they are)
        t = t.to(dtype, memory_format=torch.contiguous_format)
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def kernels_version() -> int:
    """Kernel generation from env SEG3D_FAST_CUDA_KERNELS (read at every call): 3 by default, "v2" or "v1" for
    the earlier ones. v3: stride-1 3x3x3 convs (fp16/bf16, 16-byte channel pieces, C_in <= 32 or a multiple of 32)
    on the halo kernel, the rest as v2; v2 runs where the channel counts split into 16-byte pieces (or 8-byte input
    pieces for narrow fp16/bf16 layers); other shapes use the v1 kernels either way."""
    value = os.environ.get(KERNELS_ENV, "") or "v3"
    if value not in ("v1", "v2", "v3"):
        raise ValueError(f"{KERNELS_ENV} must be 'v1', 'v2' or 'v3' (or unset), got {value!r}")
    return int(value[1])


# the current stream's handle without a torch.cuda.Stream object per launch (what Triton's launcher reads too)
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _launch_context(t: torch.Tensor) -> tuple[int, int]:
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if _raw_stream is not None:
        return index, _raw_stream(index)
    return index, torch.cuda.current_stream(index).cuda_stream


def _conv_out_size(size: int, k: int, stride: int) -> int:
    return (size + 2 * (k // 2) - k) // stride + 1


# ---- conv3d + bias + PReLU + residual ------------------------------------------------------------------------

def conv3d_prelu_unsupported(x, weight, bias, alpha, residual, stride, residual_first) -> list[str]:
    reasons = _device_reasons(x, "x")
    if x.dtype not in DTYPE_CODES:
        reasons.append(f"dtype {x.dtype} not in {tuple(DTYPE_CODES)}")
        return reasons
    k = weight.shape[-1]
    if weight.dim() != 5 or k not in (1, 3) or tuple(weight.shape[2:]) != (k, k, k):
        reasons.append(f"weight shape {tuple(weight.shape)}: kernel must be 1x1x1 or 3x3x3")
    if stride not in (1, 2):
        reasons.append(f"stride {stride} not in (1, 2)")
    if x.numel() == 0:
        reasons.append("x has no elements")
    n, _, d, h, w = x.shape
    if n * d * h * w > MAX_VOXELS:
        reasons.append(f"{n * d * h * w} voxels > {MAX_VOXELS} (32-bit voxel indices)")
    return reasons


def _conv_args(inp, weight, out, channels, grid, out_size, in_stride, out_stride, out_offset, taps):
    """ConvArgs for the gather conv (csrc/launchers.h). taps: per dim a list of input offsets (weight tap order).
    The sizes come from a plan made once per shape and thread (_conv_plan); the per-call fields (pointers, epilogue)
    are all set on every call, since calls of one shape (a forward and a 1x1x1 dgrad can match) share the plan. One
    plan per thread: threads running one shape at once (nn.DataParallel's replicas, a threaded server) would
    otherwise set each other's pointers between a call's setting them and its launch."""
    a = _conv_plan(_cuda.ConvArgs, inp.shape[0], channels, tuple(inp.shape[2:]), tuple(grid), tuple(out_size),
                   out.shape[1], in_stride, out_stride, tuple(out_offset), tuple(tuple(t) for t in taps),
                   _copy_bytes(channels, inp.dtype) // inp.dtype.itemsize, kernels_version(), threading.get_ident())
    a.input, a.weight, a.out = _ptr(inp), _ptr(weight), _ptr(out)
    a.bias = a.alpha = a.residual = a.act = a.alpha_mode = a.residual_first = 0
    return a


@lru_cache(maxsize=4096)
def _conv_plan(args_type, n, channels, in_size, grid, out_size, c_out, in_stride, out_stride, out_offset, taps, vec,
               kernels, thread):
    """The sizes of a ConvArgs (a pybind object: ~25 attribute writes, measurable per launch). Its type is part of
    the key: the CPU tests swap the extension for a simulation or a model, each with its own ConvArgs. thread: the
    calling thread's id (unused here: it keys the cache, one plan per thread)."""
    a = args_type()
    a.N, a.C = n, channels
    a.ID, a.IH, a.IW = in_size
    a.QD, a.QH, a.QW = grid
    a.OD, a.OH, a.OW = out_size
    a.Cout = c_out
    a.in_stride, a.out_stride = in_stride, out_stride
    a.out_off_d, a.out_off_h, a.out_off_w = out_offset
    a.ntap_d, a.ntap_h, a.ntap_w = (len(t) for t in taps)
    a.toff_d, a.toff_h, a.toff_w = ((list(t) + [0, 0, 0])[:3] for t in taps)
    a.vec = vec
    a.kernels = kernels
    return a


def _tf32(dtype) -> bool:
    return dtype == torch.float32 and torch.backends.cudnn.allow_tf32


def _run_conv(args, like: torch.Tensor):
    device, stream = _launch_context(like)
    _cuda.conv_gemm(args, DTYPE_CODES[like.dtype], _tf32(like.dtype), device, stream)


def conv3d_prelu_forward(x, weight, bias, alpha, residual, stride, residual_first, save_act):
    fmt = out_format(x)
    n, _, d, h, w = x.shape
    c_out, k = weight.shape[0], weight.shape[-1]
    out_size = tuple(_conv_out_size(s, k, stride) for s in (d, h, w))
    xc = _kernel_input(x)
    c_rows = xc.shape[1]
    wk = _dense(weight.permute(0, 2, 3, 4, 1), x.dtype)  # (C_out, kd, kh, kw, C_in): GEMM B, K = tap * C_in + ci
    if c_rows != x.shape[1]:
        wk = torch.nn.functional.pad(wk, (0, c_rows - x.shape[1]))  # zero weights for the zero channels
    empty = lambda: torch.empty((n, c_out, *out_size), dtype=x.dtype, device=x.device,
                                memory_format=torch.channels_last_3d)
    out = empty()
    act = empty() if save_act else None
    offsets = [d_ - k // 2 for d_ in range(k)]
    # named locals: a copy made here must outlive the launch (a freed temporary's memory could be handed to the
    # next copy before the kernel reads it, and the kernel would see the wrong tensor)
    bias_c = None if bias is None else _dense(bias, torch.float32)  # the kernels read float32 bias and alpha
    alpha_c = None if alpha is None else _dense(alpha, torch.float32)
    residual_c = None if residual is None else _ndhwc(residual)
    a = _conv_args(xc, wk, out, c_rows, out_size, out_size, stride, 1, (0, 0, 0), (offsets,) * 3)
    a.bias, a.alpha, a.residual = _ptr(bias_c), _ptr(alpha_c), _ptr(residual_c)
    a.alpha_mode = 0 if alpha is None else (1 if alpha.numel() == 1 else 2)
    a.residual_first = int(bool(residual_first))
    a.act = _ptr(act)
    _run_conv(a, x)
    if fmt is torch.contiguous_format:
        out = out.contiguous()
        act = None if act is None else act.contiguous()
    return out, act


def _dgrad_taps(k: int, stride: int, parity: int) -> tuple[slice, list[int]]:
    """dgrad, one dim: the weight indices that reach inputs of this parity (a slice, so that selecting them is a view
    rather than an index tensor copied to the device) and their grad_out offsets. Input i = stride * o + d - k // 2;
    for i = stride * j + parity the taps d with (parity + k // 2 - d) divisible by the stride, at
    o = j + (parity + k // 2 - d) / stride. Stride 1: every tap, offsets k // 2 - d (the flipped kernel)."""
    first = (parity + k // 2) % stride
    return slice(first, k, stride), [(parity + k // 2 - d) // stride for d in range(first, k, stride)]


def _grad_input(dz, weight, x_shape, stride, like):
    """grad_x = conv_transpose(dz, weight) as gather convs over dz: stride 1 one conv with every tap; stride 2 one
    conv per parity phase of the input with only the taps that reach it (no work on the zero taps). grad_x rows
    not a multiple of 16 bytes (4 input channels of a bf16 MRI volume) are computed with zero channels up to 16
    bytes (zero weights) and sliced: the 16-byte kernels instead of the first generation's element-wise stores
    (measured on an H100 at 4.5 ms for the backward of a 4->32 layer at 128x160x144, 2.3x Triton's)."""
    n, c_in, d, h, w = x_shape
    k, c_out = weight.shape[-1], weight.shape[0]
    pad = _channels_in_16_bytes(c_in, like.dtype) - c_in
    if pad:
        weight = torch.nn.functional.pad(weight, (0, 0, 0, 0, 0, 0, 0, pad))  # (C_out, C_in + pad, k, k, k)
    gx = torch.empty((n, c_in + pad, d, h, w), dtype=like.dtype, device=like.device,
                     memory_format=torch.channels_last_3d)
    if stride == 1:  # (C_in, k, k, k, C_out), the flipped taps
        packed, starts = _dense(weight.permute(1, 2, 3, 4, 0), like.dtype), (0,)
    else:  # every phase's (C_in, nd, nh, nw, C_out) weights by one gather (not a copy per phase)
        index, starts = _phase_weight_index(tuple(weight.shape), stride, weight.device)
        packed = _dense(torch.index_select(weight.reshape(-1), 0, index), like.dtype)
    base, size = packed.data_ptr(), packed.element_size()
    for phase, start in zip(itertools.product(range(stride), repeat=3), starts):
        grid = tuple((s - p + stride - 1) // stride for s, p in zip((d, h, w), phase))
        if 0 in grid:
            continue
        offsets = [_dgrad_taps(k, stride, p)[1] for p in phase]
        a = _conv_args(dz, packed, gx, c_out, grid, (d, h, w), 1, stride, phase, offsets)
        a.weight = base + start * size
        _run_conv(a, like)  # no taps (k = 1, odd phase): K = 0, the phase is written with zeros
    return gx[:, :c_in] if pad else gx


@lru_cache(maxsize=256)
def _phase_weight_index(weight_shape, stride, device):
    """(int32 indices into the flattened weight (C_out, C_in, k, k, k), each phase's start): the stride phases'
    weights one after the other, each laid out (C_in, nd, nh, nw, C_out) over the taps that reach it (_dgrad_taps),
    each starting 16-byte aligned (lengths rounded up to 8 elements; the gap's entries are never read). Made once
    per shape and device (the phases partition the 27 taps: the index is the weight's size)."""
    k = weight_shape[-1]
    flat = torch.arange(math.prod(weight_shape), dtype=torch.int32).view(weight_shape)
    parts, starts, length = [], [], 0
    for phase in itertools.product(range(stride), repeat=3):
        slices = tuple(_dgrad_taps(k, stride, p)[0] for p in phase)
        part = flat[(slice(None), slice(None)) + slices].permute(1, 2, 3, 4, 0).reshape(-1)
        pad = -part.numel() % 8
        starts.append(length)
        parts += [part, part.new_zeros(pad)]
        length += part.numel() + pad
    return torch.cat(parts).to(device), tuple(starts)


def _grad_weight(dz, xc, weight, stride, like):
    """grad_weight from dz and the input as the forward read it (xc = _kernel_input(x): the gradient of its padding
    channels, if any, is computed and dropped)."""
    c_out, c_in, k = weight.shape[0], xc.shape[1], weight.shape[-1]
    n, _, od, oh, ow = dz.shape
    voxels = n * od * oh * ow
    kw = k ** 3 * c_in
    version = kernels_version()
    in_bytes = _copy_bytes(c_in, like.dtype)
    v2 = version >= 2 and _copy_bytes(c_out, like.dtype) == 16 and (
        in_bytes == 16 or (in_bytes == 8 and like.dtype.itemsize == 2 and c_out <= 32))
    # the kernel's tile (csrc/conv3d_prelu.cu, launch_wgrad)
    if c_out <= 16:
        bm, bn = 16, 128
    elif v2 and c_out <= 32:
        bm, bn = 32, 128
    else:
        bm, bn = 64, (128 if v2 and like.dtype.itemsize == 2 else 64)
    tiles = math.ceil(kw / bn) * math.ceil(c_out / bm)
    splits = max(1, min(math.ceil(WGRAD_BLOCKS[version] / tiles), math.ceil(voxels / 32), 65535))
    per_split = math.ceil(math.ceil(voxels / splits) / 32) * 32
    splits = math.ceil(voxels / per_split)
    partial = torch.empty(splits * c_out * kw, dtype=torch.float32, device=like.device)
    gw = torch.empty((c_out, k, k, k, c_in), dtype=like.dtype, device=like.device)
    a = _cuda.WgradArgs()
    a.dz, a.input, a.partial, a.grad_weight = _ptr(dz), _ptr(xc), _ptr(partial), _ptr(gw)
    a.N, a.C = n, c_in
    a.ID, a.IH, a.IW = xc.shape[2:]
    a.OD, a.OH, a.OW, a.Cout = od, oh, ow, c_out
    a.stride, a.ksize = stride, k
    a.splits, a.voxels_per_split = splits, per_split
    a.vec_dz = _copy_bytes(c_out, like.dtype) // like.dtype.itemsize
    a.vec_in = _copy_bytes(c_in, like.dtype) // like.dtype.itemsize
    a.kernels = version
    device, stream = _launch_context(like)
    _cuda.conv_wgrad(a, DTYPE_CODES[like.dtype], _tf32(like.dtype), device, stream)
    # (C_out, C_in, k, k, k) over (C_out, taps, C_in) memory: channels_last_3d strides. Returned in the weight's own
    # layout: for a channels-last model no copy here, and none in autograd to match the parameter's layout.
    return as_param(gw[..., :weight.shape[1]].permute(0, 4, 1, 2, 3), weight)  # cast and layout in one copy


def conv3d_prelu_backward(grad_out, x, weight, alpha, saved, saved_kind, stride, output_mask):
    need_x, need_w, need_b, need_alpha, need_dz = output_mask
    kind = SAVED_KINDS[saved_kind]
    g = _ndhwc(grad_out)
    n, c_out, od, oh, ow = g.shape
    rows = n * od * oh * ow
    dz, grad_b, grad_alpha = g, None, None
    if kind != 0 or need_b:
        # one pass over grad_out (and the saved tensor): dz, grad_bias and grad_alpha, reduced in a fixed order
        write_dz = kind != 0 and (need_x or need_w or need_dz)
        dz_buf = torch.empty_like(g) if write_dz else None
        # alpha and the bias and alpha gradients are float32 in the kernels (cast below for other parameters)
        grad_b = torch.empty(c_out, dtype=torch.float32, device=g.device) if need_b else None
        if need_alpha and kind != 0:
            grad_alpha = torch.empty(alpha.shape, dtype=torch.float32, device=g.device)
        row_blocks = max(1, min(math.ceil(rows / 256), PRELU_ROW_BLOCKS))
        partial = torch.empty(2 * row_blocks * c_out, dtype=torch.float32, device=g.device)
        s = None if kind == 0 else _ndhwc(saved)
        al = None if alpha is None else _dense(alpha, torch.float32)
        alpha_mode = 0 if alpha is None else (1 if alpha.numel() == 1 else 2)
        device, stream = _launch_context(g)
        _cuda.prelu_backward(_ptr(g), _ptr(s), _ptr(al), _ptr(dz_buf), _ptr(grad_b), _ptr(grad_alpha),
                             _ptr(partial), rows, c_out, kind, alpha_mode, row_blocks, DTYPE_CODES[g.dtype],
                             device, stream)
        if dz_buf is not None:
            dz = dz_buf
        grad_b, grad_alpha = as_param(grad_b, weight), as_param(grad_alpha, weight)  # (parameters in fp16 / bf16)
    grad_x = grad_w = None
    if need_x:
        grad_x = _grad_input(dz, weight, tuple(x.shape), stride, x).contiguous(memory_format=out_format(x))
    if need_w:
        grad_w = _grad_weight(dz, _kernel_input(x), weight, stride, x)
    grad_dz = None
    if need_dz:
        grad_dz = dz if out_format(grad_out) is torch.channels_last_3d else dz.contiguous()
    return grad_x, grad_w, grad_b, grad_alpha, grad_dz


def upconv_prelu_add_unsupported(x, weight, bias, alpha, skip) -> list[str]:
    return ["the cuda backend has no transposed-conv kernel (the upsampling blocks run on triton or reference)"]


# ---- Jaccard (Tanimoto) loss sums ----------------------------------------------------------------------------

def jaccard_unsupported(logits, target, activation, ignore_index) -> list[str]:
    reasons = _device_reasons(logits, "logits")
    if logits.dtype not in DTYPE_CODES:
        reasons.append(f"logits dtype {logits.dtype} not in {tuple(DTYPE_CODES)}")
    if activation not in ("softmax", "sigmoid"):
        reasons.append(f"activation {activation!r} not in ('softmax', 'sigmoid')")
    if logits.dim() < 2 or not 1 <= logits.shape[1] <= MAX_CLASSES:
        reasons.append(f"class count {logits.shape[1] if logits.dim() > 1 else None} not in [1, {MAX_CLASSES}]")
    if target.device != logits.device:
        reasons.append(f"target is on {target.device}, logits on {logits.device}")
    if target.dtype.is_complex or target.dtype == torch.bool:
        reasons.append(f"target dtype {target.dtype} is neither an integer label map nor float probabilities")
    return reasons


def _f32(t: torch.Tensor, device) -> torch.Tensor:
    """t as a contiguous float32 tensor on `device`, with no torch call where it is one already (the loss's small
    operands: a no-op .to() still costs a dispatch, several per call)."""
    if t.dtype == torch.float32 and t.device == device and t.is_contiguous():
        return t
    return t.to(device=device, dtype=torch.float32).contiguous()


def _jaccard_inputs(logits, target):
    lg = logits.contiguous()
    n, c = lg.shape[:2]
    s = math.prod(lg.shape[2:])  # (no lg[0, 0] view: two more dispatches per call)
    if target.dtype == lg.dtype:
        t, label_type = target.contiguous(), PROBABILITY_TARGET
    elif target.dtype.is_floating_point:  # float32 (or wider) targets of fp16 / bf16 logits are read unrounded
        t, label_type = target.to(torch.float32).contiguous(), PROBABILITY_TARGET_F32
    else:
        t = target if target.dtype in LABEL_CODES else target.long()
        t, label_type = t.contiguous(), LABEL_CODES[t.dtype]
    return lg, t, n, c, s, label_type


def jaccard_sums(logits, target, squared, activation, ignore_index):
    lg, t, n, c, s, label_type = _jaccard_inputs(logits, target)
    blocks = _cuda.jaccard_blocks(s)
    partial = torch.empty(max(1, n * blocks * c * 3), dtype=torch.float32, device=lg.device)
    sums = torch.empty((n, c, 3), dtype=torch.float32, device=lg.device)
    device, stream = _launch_context(lg)
    _cuda.jaccard_sums(_ptr(lg), _ptr(t), _ptr(partial), _ptr(sums), n, c, s, label_type, bool(squared),
                       activation == "sigmoid", ignore_index is not None, int(ignore_index or 0),
                       DTYPE_CODES[lg.dtype], device, stream)
    return sums


def jaccard_sums_backward(grad_sums, logits, target, squared, activation, ignore_index):
    lg, t, n, c, s, label_type = _jaccard_inputs(logits, target)
    g = _f32(grad_sums, lg.device)
    grad = torch.empty_like(lg, memory_format=torch.contiguous_format)
    device, stream = _launch_context(lg)
    _cuda.jaccard_backward(_ptr(g), _ptr(lg), _ptr(t), _ptr(grad), n, c, s, label_type, bool(squared),
                           activation == "sigmoid", ignore_index is not None, int(ignore_index or 0),
                           DTYPE_CODES[lg.dtype], device, stream)
    return grad


def jaccard_loss_reduced(logits, target, squared, activation, ignore_index, smooth, weights, per_sample, mean):
    """The whole loss in two launches (optional backend function, API.md): the sums kernel also writes each block's
    label range, a one-block kernel sums the blocks into the sums, the label range and the loss. -> (loss, float32
    0-d; the loss's rows of sums: (N, C, 3) per sample, else the (1, C, 3) pooled sums; the (2,) int64 least and
    greatest counted label, None for class probabilities)."""
    lg, t, n, c, s, label_type = _jaccard_inputs(logits, target)
    blocks = _cuda.jaccard_blocks(s)
    device = lg.device
    is_label = label_type not in (PROBABILITY_TARGET, PROBABILITY_TARGET_F32)
    w = _f32(weights, device)  # named: must outlive the launch
    partial = torch.empty(n * blocks * c * 3, dtype=torch.float32, device=device)
    sums = torch.empty((n if per_sample else n + 1, c, 3), dtype=torch.float32, device=device)  # pooled: row n too
    loss = torch.empty((), dtype=torch.float32, device=device)
    # label maps: one int64 buffer, the label range then the blocks' range partials (N * blocks, 2)
    ranges = torch.empty(2 + 2 * n * blocks, dtype=torch.int64, device=device) if is_label else None
    label_range = ranges[:2] if is_label else None
    rng = _ptr(ranges)
    index, stream = _launch_context(lg)
    _cuda.jaccard_loss(_ptr(lg), _ptr(t), _ptr(w), _ptr(partial), rng + 16 if rng else 0, _ptr(sums), _ptr(loss), rng,
                       n, c, s, label_type, bool(squared), activation == "sigmoid", ignore_index is not None,
                       int(ignore_index or 0), float(smooth), bool(per_sample), bool(mean), DTYPE_CODES[lg.dtype],
                       index, stream)
    return loss, (sums if per_sample else sums[n:]), label_range


def jaccard_loss_reduced_backward(grad_loss, sums, weights, logits, target, squared, activation, ignore_index, smooth,
                                  per_sample, mean):
    """grad_logits of jaccard_loss_reduced's loss in one launch: each block derives its dL/d(sums) from the sums, the
    weights and dL/dloss (the loss's own backward fused into the kernel)."""
    lg, t, n, c, s, label_type = _jaccard_inputs(logits, target)
    gl, sm, w = _f32(grad_loss, lg.device), _f32(sums, lg.device), _f32(weights, lg.device)
    grad = torch.empty_like(lg, memory_format=torch.contiguous_format)
    index, stream = _launch_context(lg)
    _cuda.jaccard_loss_backward(_ptr(gl), _ptr(sm), _ptr(w), _ptr(lg), _ptr(t), _ptr(grad), n, c, s, label_type,
                                bool(squared), activation == "sigmoid", ignore_index is not None,
                                int(ignore_index or 0), float(smooth), bool(per_sample), bool(mean),
                                DTYPE_CODES[lg.dtype], index, stream)
    return grad
