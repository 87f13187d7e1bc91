"""Plain PyTorch backend: cuDNN/MKLDNN convolutions with the fused-op memory contract (the baseline on a GPU).

It computes exactly what API.md specifies; its memory saving comes from the ops layer saving only the PReLU
output, and from running every intermediate here without autograd.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from ._layout import as_param, out_format

NAME = "reference"
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def unavailable_reason():
    return None


def conv3d_prelu_unsupported(x, weight, bias, alpha, residual, stride, residual_first):
    reasons = []
    if x.dtype not in DTYPES:
        reasons.append(f"dtype {x.dtype} not in {DTYPES}")
    return reasons


def _as_x(x, *params):
    """The parameters in x's dtype (float32 parameters of a fp16/bf16 x: the ops' mixed precision)."""
    return tuple(p if p is None or p.dtype == x.dtype else p.to(x.dtype) for p in params)


@contextlib.contextmanager
def _onednn_safe(x):
    """Around a convolution: oneDNN off for bf16 convs on the CPU with a spatial extent of 1 or 2, where its bf16
    kernels (torch 2.13 CPU) fail: with stride 2 its backward writes out of bounds (non-finite weight gradients, or
    the process aborting with "double free or corruption") and its AMX forward is wrong for an output extent of 1
    (pytorch/pytorch#169688); with stride 1 a (1, 1, 1, 1, 2) channels-last input gave ~1e37. PyTorch's own CPU
    kernel is right there (slower: fine for CPU bf16 runs, tests and checks). Yields the dtype to convolve in: there
    float32, since that kernel accumulates in bf16 (gradients off by up to 7%, 10-50x PyTorch's own oneDNN error)."""
    if not (x.device.type == "cpu" and x.dtype == torch.bfloat16 and min(x.shape[2:]) <= 2):
        yield x.dtype
        return
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield torch.float32
    finally:
        torch.backends.mkldnn.enabled = enabled


def _preact(x, weight, bias, residual, stride, residual_first):
    with _onednn_safe(x) as work:
        z = F.conv3d(x.to(work), weight.to(work), None if bias is None else bias.to(work), stride=stride,
                     padding=weight.shape[-1] // 2).to(x.dtype)
    if residual is not None and residual_first:
        z += residual
    return z


def conv3d_prelu_forward(x, weight, bias, alpha, residual, stride, residual_first, save_act):
    fmt = out_format(x)
    weight, bias, alpha = _as_x(x, weight, bias, alpha)
    z = _preact(x, weight, bias, residual, stride, residual_first)
    act = z if alpha is None else F.prelu(z, alpha)
    out = act + residual if residual is not None and not residual_first else act
    out = out.contiguous(memory_format=fmt)
    return out, (act.contiguous(memory_format=fmt) if save_act else None)


def _alpha_view(alpha, z):
    return alpha.reshape(1, -1, *([1] * (z.dim() - 2)))


def conv3d_prelu_backward(grad_out, x, weight, alpha, saved, saved_kind, stride, output_mask):
    need_x, need_w, need_b, need_alpha, need_dz = output_mask
    params = weight
    weight, alpha_x = _as_x(x, weight, alpha)
    grad_alpha = None
    if saved_kind == "none":
        dz = grad_out
    else:
        # From the PReLU output y (alpha > 0): z <= 0 exactly where y <= 0, and z = y / alpha there. In the
        # activation's dtype: a fp16/bf16 product is computed in fp32 and rounded once, as a fused kernel's
        # registers would, so no fp32 copies of the activations are made (they would be 4x an activation's bytes).
        negative = saved <= 0
        dz = torch.where(negative, grad_out * _alpha_view(alpha_x, saved), grad_out)
        if need_alpha:
            work = torch.float64 if saved.dtype == torch.float64 else torch.float32
            per_channel = torch.where(negative, grad_out, 0).mul_(saved).sum(dim=[0, *range(2, saved.dim())],
                                                                            dtype=work)
            if saved_kind == "act":  # sum of g * z over z <= 0, with z = y / alpha
                per_channel = per_channel / alpha.to(work)
            grad_alpha = (per_channel if alpha.numel() > 1 else per_channel.sum().reshape(1)).to(alpha.dtype)
        del negative  # not held through the convolution's backward, where this op's memory peaks
    with _onednn_safe(x) as work:
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            dz.to(work), x.to(work), weight.to(work), [weight.shape[0]] if need_b else None,
            [stride] * 3, [weight.shape[-1] // 2] * 3, [1, 1, 1], False, [0, 0, 0], 1,
            [need_x, need_w, need_b],
        )
    if need_x:
        grad_x = grad_x.to(x.dtype).contiguous(memory_format=out_format(x))
    # the weight's gradient in its layout and dtype, as the other backends (and the op's fake kernel) give it
    return grad_x, as_param(grad_w, params), as_param(grad_b, params), grad_alpha, (dz if need_dz else None)


# ---- transposed conv (kernel 2, stride 2) + bias + PReLU + skip ----------------------------------------------------
def upconv_prelu_add_unsupported(x, weight, bias, alpha, skip):
    return [] if x.dtype in DTYPES else [f"dtype {x.dtype} not in {DTYPES}"]


def upconv_prelu_add_forward(x, weight, bias, alpha, skip):
    fmt = out_format(x)
    weight, bias, alpha = _as_x(x, weight, bias, alpha)
    # channels_last_3d when x is (API.md): conv_transpose3d's own output layout varies with dtype and shape (on the
    # CPU fp16 always NCDHW, fp32 often)
    out = F.prelu(F.conv_transpose3d(x, weight, bias, stride=2).contiguous(memory_format=fmt), alpha)
    if skip is None:
        return out
    # in place in eager (no second output-sized tensor); out of place while torch.compile traces it: with torch 2.11
    # the in-place sum in this autograd.Function's forward gave every input a zero gradient
    return out + skip if torch.compiler.is_compiling() else out.add_(skip)


def upconv_prelu_add_backward(grad_out, x, weight, bias, alpha, output_mask):
    """z recomputed (the transposed conv is cheap next to its output's bytes), then PReLU's own backward kernel:
    dz and the per-element alpha terms (z <= 0: g * z) in one pass."""
    need_x, need_w, need_b, need_alpha = output_mask
    need_b = need_b and bias is not None
    params = weight
    weight, bias, alpha_x = _as_x(x, weight, bias, alpha)
    z = F.conv_transpose3d(x, weight, bias, stride=2)
    grad_z, alpha_terms = torch.ops.aten._prelu_kernel_backward(grad_out, z, _alpha_view(alpha_x, z))
    del z
    grad_alpha = None
    if need_alpha:
        # summed in float32 (float64 for float64) and rounded once: fp16 / bf16 per-channel sums, summed again over
        # the channels for a shared alpha, lost its bits where the channels' terms cancel (bf16: 4x PyTorch's error)
        work = torch.float64 if alpha_terms.dtype == torch.float64 else torch.float32
        per_channel = alpha_terms.sum(dim=(0, 2, 3, 4), dtype=work)
        grad_alpha = as_param(per_channel if alpha.numel() > 1 else per_channel.sum().reshape(1), alpha)
    del alpha_terms
    grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
        grad_z, x, weight, [weight.shape[1]] if need_b else None, [2, 2, 2], [0, 0, 0], [1, 1, 1], True, [0, 0, 0],
        1, [need_x, need_w, need_b])
    return grad_x, as_param(grad_w, params), as_param(grad_b, params), grad_alpha


def jaccard_unsupported(logits, target, activation, ignore_index):
    return [] if logits.dtype in DTYPES else [f"logits dtype {logits.dtype} not in {DTYPES}"]


def _probabilities(logits, activation):
    """Softmax / sigmoid probabilities (N, C, S) in fp32 (fp64 for fp64 logits)."""
    n, c = logits.shape[:2]
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.reshape(n, c, -1).to(work)
    return z.softmax(1) if activation == "softmax" else z.sigmoid()


def _class_masks(target, c, ignore_index):
    """Per class k, the (N, 1, S) mask of the voxels labelled k that count. One class at a time, so no (N, C, S)
    one-hot is ever made; a label outside [0, C) matches no class (ops.jaccard_loss may report such labels only in
    backward, and a scatter on a GPU would kill the CUDA context instead)."""
    lab = target.reshape(target.shape[0], 1, -1)
    counted = None if ignore_index is None else lab != ignore_index
    for k in range(c):
        yield k, (lab == k) if counted is None else (lab == k) & counted


def _counted(target, ignore_index):
    return None if ignore_index is None else (target.reshape(target.shape[0], 1, -1) != ignore_index)


def _autocast_off(fn):
    """fn with autocast off on its first argument's device: the sums' einsums in fp32 (API.md), not in autocast's
    bf16 / fp16."""
    @functools.wraps(fn)
    def wrapper(first, *args):
        if not torch.amp.is_autocast_available(first.device.type):  # (meta tensors)
            return fn(first, *args)
        with torch.autocast(first.device.type, enabled=False):
            return fn(first, *args)
    return wrapper


@_autocast_off
def jaccard_sums(logits, target, squared, activation, ignore_index):
    """(N, C, 3) [sum p t, sum p^2 | p, sum t^2 | t] in fp32 (fp64 for fp64 logits, for gradcheck). Temporaries:
    the probabilities and (N, 1, S) masks, not the (N, C, S) one-hot and products of the plain formula."""
    p = _probabilities(logits, activation)
    n, c = p.shape[:2]
    if target.dtype.is_floating_point:
        t = target.reshape(n, c, -1).to(p.dtype)
        inter, t_sum = torch.einsum("ncs,ncs->nc", p, t), (torch.einsum("ncs,ncs->nc", t, t) if squared else t.sum(-1))
    else:
        counted = _counted(target, ignore_index)
        if counted is not None:
            p.mul_(counted)
        inter, t_sum = torch.empty((n, c), dtype=p.dtype, device=p.device), torch.empty_like(p[:, :, 0])
        for k, mask in _class_masks(target, c, ignore_index):
            inter[:, k] = torch.where(mask, p[:, k:k + 1], 0).sum((1, 2))
            t_sum[:, k] = mask.sum((1, 2))  # t is 0 or 1: sum t^2 = sum t
    p_sum = torch.einsum("ncs,ncs->nc", p, p) if squared else p.sum(-1)
    return torch.stack([inter, p_sum, t_sum], -1)


@_autocast_off
def jaccard_sums_backward(grad_sums, logits, target, squared, activation, ignore_index):
    """d loss / d logits from d loss / d sums, with the probabilities recomputed; three (N, C, S) fp32 buffers at
    most (probabilities, their gradient, the result's cast)."""
    p = _probabilities(logits, activation)
    n, c = p.shape[:2]
    g = grad_sums.to(p.dtype)
    g_pt, g_pp = g[..., 0].unsqueeze(-1), g[..., 1].unsqueeze(-1)
    dp = p * (2 * g_pp) if squared else g_pp.expand_as(p).clone()  # d/dp of the p sums
    if target.dtype.is_floating_point:
        dp.addcmul_(target.reshape(n, c, -1).to(p.dtype), g_pt)
        counted = None
    else:
        counted = _counted(target, ignore_index)
        for k, mask in _class_masks(target, c, ignore_index):
            dp[:, k:k + 1].add_(mask * g_pt[:, k:k + 1])  # d/dp of sum p t: g_pt where the voxel is labelled k
    if activation == "softmax":  # dz = p * (dp - sum_c p dp), without a (N, C, S) product
        dot = torch.zeros_like(p[:, :1])
        for k in range(c):
            dot.addcmul_(p[:, k:k + 1], dp[:, k:k + 1])
        dz = dp.sub_(dot).mul_(p)
    else:  # dz = dp * p * (1 - p)
        dz = dp.mul_(p)
        dz.addcmul_(dz, p, value=-1)
    if counted is not None:
        dz.mul_(counted)
    return dz.reshape(logits.shape).to(logits.dtype)
