"""A CPU model of the compiled extension seg3d_fast._cuda, written from its contract in csrc/launchers.h, so that the
CUDA backend's Python layer (layouts, argument structs, dgrad phases, tap offsets, scratch sizes, output formats) is
tested on any machine. The kernels themselves are tested on the GPU machine (test_cuda_backend.py, device "cuda").

Each function reads and writes CPU memory through the raw addresses it is given (as the kernels do device memory),
checks the preconditions the kernels rely on (alignment of the vector copies, channel divisibility), and computes in
float64 before rounding to the tensor's dtype. `emulated()` swaps the model in for the extension.
"""
import contextlib
import ctypes
import math
import types

import torch

from seg3d_fast.backends import cuda as cuda_backend

DTYPES = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}
LABEL_DTYPES = {0: torch.int64, 1: torch.int32, 2: torch.uint8}


def _view(address, shape, dtype, what):
    """The memory at `address` as a tensor of `shape` (None for address 0)."""
    if address == 0:
        return None
    count = math.prod(shape)
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    assert address % dtype.itemsize == 0, f"{what}: address {address:#x} not aligned to its element size"
    buffer = (ctypes.c_byte * (count * dtype.itemsize)).from_address(address)
    return torch.frombuffer(buffer, dtype=dtype, count=count).view(shape)


def _check_vec(address, vec, channels, dtype, what):
    """The kernels copy `vec` elements at a time (cp.async: 4-16 bytes; 2 bytes by plain loads): vec divides the
    channel count and the rows are vec-aligned."""
    assert vec * dtype.itemsize in (16, 8, 4, 2) and vec >= 1, f"{what}: vec {vec}"
    assert channels % vec == 0, f"{what}: vec {vec} does not divide {channels} channels"
    assert address % (vec * dtype.itemsize) == 0, f"{what}: address not aligned to {vec * dtype.itemsize} bytes"


def _shifted(x, offsets, step, extents):
    """x (N, D, H, W, C) float64 read at q * step + offset for q < extents, per dim; 0 outside the volume."""
    pad = 2 * step + 2
    xp = torch.nn.functional.pad(x, (0, 0) + (pad, pad) * 3)
    index = [slice(None)]
    for o, e in zip(offsets, extents):
        start = pad + o
        index.append(slice(start, start + step * (e - 1) + 1, step))
    return xp[tuple(index)]


def conv_gemm(a, dtype_code, tf32, device, stream):
    dtype = DTYPES[dtype_code]
    taps = a.ntap_d * a.ntap_h * a.ntap_w
    x = _view(a.input, (a.N, a.ID, a.IH, a.IW, a.C), dtype, "input").double()
    w = _view(a.weight, (a.Cout, taps, a.C), dtype, "weight")
    out = _view(a.out, (a.N, a.OD, a.OH, a.OW, a.Cout), dtype, "out")
    _check_vec(a.input, a.vec, a.C, dtype, "input")
    grid = (a.QD, a.QH, a.QW)
    z = torch.zeros(a.N, *grid, a.Cout, dtype=torch.float64)
    offsets = (a.toff_d[:a.ntap_d], a.toff_h[:a.ntap_h], a.toff_w[:a.ntap_w])
    t = 0
    for od in offsets[0]:
        for oh in offsets[1]:
            for ow in offsets[2]:
                z += _shifted(x, (od, oh, ow), a.in_stride, grid) @ w[:, t].double().T
                t += 1
    target = out[:, a.out_off_d::a.out_stride, a.out_off_h::a.out_stride, a.out_off_w::a.out_stride][:, :a.QD, :a.QH,
                                                                                                     :a.QW]
    assert target.shape == z.shape, ("output grid outside the output tensor", target.shape, z.shape)
    if a.bias:  # bias and alpha: float32 for every dtype, read 16 bytes at a time
        assert a.bias % 16 == 0, "bias not 16-byte aligned"
        z += _view(a.bias, (a.Cout,), torch.float32, "bias").double()
    residual = None
    if a.residual:
        residual = _view(a.residual, out.shape, dtype, "residual")[
            :, a.out_off_d::a.out_stride, a.out_off_h::a.out_stride, a.out_off_w::a.out_stride][
            :, :a.QD, :a.QH, :a.QW].double()
        if a.residual_first:
            z += residual
    if a.alpha_mode:
        assert a.alpha % 16 == 0, "alpha not 16-byte aligned"
        alpha = _view(a.alpha, (1 if a.alpha_mode == 1 else a.Cout,), torch.float32, "alpha").double()
        z = torch.where(z > 0, z, z * alpha)
    if a.act:
        act = _view(a.act, out.shape, dtype, "act")
        act[:, a.out_off_d::a.out_stride, a.out_off_h::a.out_stride, a.out_off_w::a.out_stride][
            :, :a.QD, :a.QH, :a.QW] = z.to(dtype)
    if residual is not None and not a.residual_first:
        z += residual
    target.copy_(z.to(dtype))


def conv_wgrad(a, dtype_code, tf32, device, stream):
    dtype = DTYPES[dtype_code]
    k, pad = a.ksize, a.ksize // 2
    x = _view(a.input, (a.N, a.ID, a.IH, a.IW, a.C), dtype, "input").double()
    dz = _view(a.dz, (a.N, a.OD, a.OH, a.OW, a.Cout), dtype, "dz").double()
    gw = _view(a.grad_weight, (a.Cout, k ** 3, a.C), dtype, "grad_weight")
    _check_vec(a.input, a.vec_in, a.C, dtype, "input")
    _check_vec(a.dz, a.vec_dz, a.Cout, dtype, "dz")
    assert a.voxels_per_split % 32 == 0 and a.splits * a.voxels_per_split >= a.N * a.OD * a.OH * a.OW
    _view(a.partial, (a.splits, a.Cout, k ** 3 * a.C), torch.float32, "partial").fill_(float("nan"))  # scratch
    dz2 = dz.reshape(-1, a.Cout)
    t = 0
    for od in range(k):
        for oh in range(k):
            for ow in range(k):
                xs = _shifted(x, (od - pad, oh - pad, ow - pad), a.stride, (a.OD, a.OH, a.OW))
                gw[:, t] = (dz2.T @ xs.reshape(-1, a.C)).to(dtype)
                t += 1


def prelu_backward(grad_out, saved, alpha, dz, grad_bias, grad_alpha, partial, rows, channels, saved_kind, alpha_mode,
                   row_blocks, dtype_code, device, stream):
    dtype = DTYPES[dtype_code]
    g = _view(grad_out, (rows, channels), dtype, "grad_out").double()
    _view(partial, (2, row_blocks, channels), torch.float32, "partial").fill_(float("nan"))
    d = g
    if saved_kind != 0:
        a = _view(alpha, (1 if alpha_mode == 1 else channels,), torch.float32, "alpha").double()
        s = _view(saved, (rows, channels), dtype, "saved").double()
        z = torch.where(s > 0, s, s / a) if saved_kind == 1 else s
        d = torch.where(z > 0, g, g * a)
        if grad_alpha:
            per_channel = torch.where(z <= 0, g * z, 0).sum(0)
            out = _view(grad_alpha, a.shape, torch.float32, "grad_alpha")
            out.copy_((per_channel.sum().reshape(1) if alpha_mode == 1 else per_channel).float())
    if dz:
        _view(dz, (rows, channels), dtype, "dz").copy_(d.to(dtype))
    if grad_bias:
        _view(grad_bias, (channels,), torch.float32, "grad_bias").copy_(d.sum(0).float())


def jaccard_blocks(spatial):
    return max(1, min(64, math.ceil(spatial / 1024)))


def _jaccard_tensors(logits, target, n, c, s, label_type, dtype_code):
    from seg3d_fast.backends import reference

    dtype = DTYPES[dtype_code]
    lg = _view(logits, (n, c, s), dtype, "logits").double()
    if label_type in (3, 4):  # probabilities in the logits' dtype, in float32
        target_dtype = dtype if label_type == 3 else torch.float32
        return lg, _view(target, (n, c, s), target_dtype, "target").double(), reference
    return lg, _view(target, (n, s), LABEL_DTYPES[label_type], "target"), reference


def jaccard_sums(logits, target, partial, sums, n, c, s, label_type, squared, sigmoid, has_ignore, ignore_index,
                 dtype_code, device, stream):
    lg, t, reference = _jaccard_tensors(logits, target, n, c, s, label_type, dtype_code)
    _view(partial, (n, jaccard_blocks(s), c, 3), torch.float32, "partial").fill_(float("nan"))
    result = reference.jaccard_sums(lg, t, squared, "sigmoid" if sigmoid else "softmax",
                                    ignore_index if has_ignore else None)
    _view(sums, (n, c, 3), torch.float32, "sums").copy_(result)


def jaccard_backward(grad_sums, logits, target, grad_logits, n, c, s, label_type, squared, sigmoid, has_ignore,
                     ignore_index, dtype_code, device, stream):
    lg, t, reference = _jaccard_tensors(logits, target, n, c, s, label_type, dtype_code)
    g = _view(grad_sums, (n, c, 3), torch.float32, "grad_sums").double()
    result = reference.jaccard_sums_backward(g, lg, t, squared, "sigmoid" if sigmoid else "softmax",
                                             ignore_index if has_ignore else None)
    _view(grad_logits, (n, c, s), DTYPES[dtype_code], "grad_logits").copy_(result)


def _loss_terms(sums, weights, smooth, per_sample):
    """(rows, C) w_c (1 - (I + s) / (P + T - I + s)) of the float64 sums (N, C, 3), pooled unless per_sample."""
    rows = sums if per_sample else sums.sum(0, keepdim=True)
    inter, p_sum, t_sum = rows.unbind(-1)
    return torch.where(weights != 0, weights * (1 - (inter + smooth) / (p_sum + t_sum - inter + smooth)), 0)


def jaccard_loss(logits, target, weights, partial, range_partial, sums, loss, label_range, n, c, s, label_type,
                 squared, sigmoid, has_ignore, ignore_index, smooth, per_sample, mean, dtype_code, device, stream):
    assert n >= 1 and weights and loss and (label_type in (3, 4) or (range_partial and label_range))
    lg, t, reference = _jaccard_tensors(logits, target, n, c, s, label_type, dtype_code)
    blocks = jaccard_blocks(s)
    _view(partial, (n, blocks, c, 3), torch.float32, "partial").fill_(float("nan"))
    result = reference.jaccard_sums(lg, t, squared, "sigmoid" if sigmoid else "softmax",
                                    ignore_index if has_ignore else None)
    out = _view(sums, (n if per_sample else n + 1, c, 3), torch.float32, "sums")
    out[:n] = result
    if not per_sample:  # row n: the pooled sums its backward reads
        out[n] = result.sum(0)
    w = _view(weights, (c,), torch.float32, "weights").double()
    total = _loss_terms(result, w, smooth, per_sample).sum()
    if mean:
        total = total / (w.sum() * (n if per_sample else 1))
    _view(loss, (), torch.float32, "loss").copy_(total)
    if label_type not in (3, 4):
        _view(range_partial, (n, blocks, 2), torch.int64, "range_partial").fill_(-1)
        counted = t[t != ignore_index] if has_ignore else t.reshape(-1)
        lo_hi = [counted.min().item(), counted.max().item()] if counted.numel() else [2 ** 62, -2 ** 62]
        _view(label_range, (2,), torch.int64, "label_range").copy_(torch.tensor(lo_hi))


def jaccard_loss_backward(grad_loss, sums, weights, logits, target, grad_logits, n, c, s, label_type, squared, sigmoid,
                          has_ignore, ignore_index, smooth, per_sample, mean, dtype_code, device, stream):
    lg, t, reference = _jaccard_tensors(logits, target, n, c, s, label_type, dtype_code)
    with torch.enable_grad():  # (called from inside autograd's backward, where grad mode is off)
        sm = _view(sums, (n if per_sample else 1, c, 3), torch.float32, "sums").double().requires_grad_()
        w = _view(weights, (c,), torch.float32, "weights").double()
        total = _loss_terms(sm, w, smooth, per_sample).sum()
        if mean:
            total = total / (w.sum() * (n if per_sample else 1))
        g, = torch.autograd.grad(total * _view(grad_loss, (), torch.float32, "grad_loss").double(), sm)
    g = g.expand(n, c, 3)  # (pooled: every sample's sums take the pooled row's gradient)
    result = reference.jaccard_sums_backward(g, lg, t, squared, "sigmoid" if sigmoid else "softmax",
                                             ignore_index if has_ignore else None)
    _view(grad_logits, (n, c, s), DTYPES[dtype_code], "grad_logits").copy_(result)


class _Args:
    """ConvArgs / WgradArgs without the extension: plain attributes, C++ defaults."""

    def __init__(self, **defaults):
        self.__dict__.update(defaults)


def _struct(real, **defaults):
    return real if real is not None else (lambda: _Args(**defaults))


def model_extension():
    """The model as a stand-in for the extension module (its argument structs when the extension is built)."""
    real = cuda_backend._cuda
    return types.SimpleNamespace(
        ConvArgs=_struct(real and real.ConvArgs, toff_d=[0, 0, 0], toff_h=[0, 0, 0], toff_w=[0, 0, 0], bias=0,
                         alpha=0, residual=0, act=0, alpha_mode=0, residual_first=0, in_stride=1, out_stride=1),
        WgradArgs=_struct(real and real.WgradArgs),
        conv_gemm=conv_gemm, conv_wgrad=conv_wgrad, prelu_backward=prelu_backward, jaccard_blocks=jaccard_blocks,
        jaccard_sums=jaccard_sums, jaccard_backward=jaccard_backward, jaccard_loss=jaccard_loss,
        jaccard_loss_backward=jaccard_loss_backward, MAX_CLASSES=cuda_backend.MAX_CLASSES,
        INTERFACE_REVISION=cuda_backend.INTERFACE_REVISION)


@contextlib.contextmanager
def emulated(extension=None):
    """The cuda backend module running on CPU tensors against `extension` (default: the model above)."""
    patches = {"_cuda": extension or model_extension(), "_device_reasons": lambda t, name: [],
               "_launch_context": lambda t: (0, 0), "unavailable_reason": lambda: None}
    saved = {name: getattr(cuda_backend, name) for name in patches}
    for name, value in patches.items():
        setattr(cuda_backend, name, value)
    try:
        yield cuda_backend
    finally:
        for name, value in saved.items():
            setattr(cuda_backend, name, value)
