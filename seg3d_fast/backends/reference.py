"""Plain PyTorch backend: cuDNN/MKLDNN convolutions with the fused-op memory contract (the baseline on a GPU).

It computes exactly what API.md specifies; its memory saving comes from the ops layer saving only the PReLU
output, and from running every intermediate here without autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "reference"
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def unavailable_reason():
    return None


def _out_format(x):
    cl = x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    return torch.channels_last_3d if cl else torch.contiguous_format


def conv3d_prelu_unsupported(x, weight, bias, alpha, residual, stride, residual_first):
    reasons = []
    if x.dtype not in DTYPES:
        reasons.append(f"dtype {x.dtype} not in {DTYPES}")
    return reasons


def _preact(x, weight, bias, residual, stride, residual_first):
    z = F.conv3d(x, weight, bias, stride=stride, padding=weight.shape[-1] // 2)
    if residual is not None and residual_first:
        z += residual
    return z


def conv3d_prelu_forward(x, weight, bias, alpha, residual, stride, residual_first, save_act):
    fmt = _out_format(x)
    z = _preact(x, weight, bias, residual, stride, residual_first)
    act = z if alpha is None else F.prelu(z, alpha)
    out = act + residual if residual is not None and not residual_first else act
    out = out.contiguous(memory_format=fmt)
    return out, (act.contiguous(memory_format=fmt) if save_act else None)


def _alpha_view(alpha, z):
    return alpha.reshape(1, -1, *([1] * (z.dim() - 2)))


def conv3d_prelu_backward(grad_out, x, weight, alpha, saved, saved_kind, stride, output_mask):
    need_x, need_w, need_b, need_alpha, need_dz = output_mask
    grad_alpha = None
    if saved_kind == "none":
        dz = grad_out
    else:
        # PReLU backward in fp32 (fp64 for fp64): one rounding, at the cast of dz, like a fused kernel's registers.
        # From the PReLU output y (alpha > 0): z <= 0 exactly where y <= 0, and z = y / alpha there.
        work = torch.float64 if saved.dtype == torch.float64 else torch.float32
        a = _alpha_view(alpha, saved).to(work)
        y = saved.to(work)
        g = grad_out.to(work)
        negative = y <= 0
        dz = torch.where(negative, g * a, g).to(grad_out.dtype)
        if need_alpha:
            per_channel = (g * y).masked_fill_(~negative, 0).sum(dim=[0, *range(2, y.dim())])
            if saved_kind == "act":  # sum of g * z over z <= 0, with z = y / alpha
                per_channel = per_channel / alpha.to(work)
            grad_alpha = (per_channel if alpha.numel() > 1 else per_channel.sum().reshape(1)).to(alpha.dtype)
    grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
        dz, x, weight, [weight.shape[0]] if need_b else None,
        [stride] * 3, [weight.shape[-1] // 2] * 3, [1, 1, 1], False, [0, 0, 0], 1,
        [need_x, need_w, need_b],
    )
    if need_x:
        grad_x = grad_x.contiguous(memory_format=_out_format(x))
    return grad_x, grad_w, grad_b, grad_alpha, (dz if need_dz else None)


def jaccard_unsupported(logits, target, activation, ignore_index):
    return [] if logits.dtype in DTYPES else [f"logits dtype {logits.dtype} not in {DTYPES}"]


def _probs_and_targets(logits, target, activation, ignore_index):
    """p (fp32 or fp64), t and a validity mask, all (N, C, S)."""
    n, c = logits.shape[:2]
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.reshape(n, c, -1).to(work)
    p = z.softmax(1) if activation == "softmax" else z.sigmoid()
    if target.dtype.is_floating_point:
        return p, target.reshape(n, c, -1).to(work), None
    lab = target.reshape(n, 1, -1)
    valid = None if ignore_index is None else lab != ignore_index
    # one-hot by comparison, not scatter: a label outside [0, C) matches no class instead of indexing out of bounds
    # (ops.jaccard_loss may report such labels only in backward; a scatter on a GPU would kill the CUDA context)
    t = (lab == torch.arange(c, device=lab.device).view(1, c, 1)).to(work)
    if valid is not None:
        t *= valid
    return p, t, valid


def jaccard_sums(logits, target, squared, activation, ignore_index):
    p, t, valid = _probs_and_targets(logits, target, activation, ignore_index)
    if valid is not None:
        p = p * valid
    pt = (p * t).sum(-1)
    ps = (p * p).sum(-1) if squared else p.sum(-1)
    ts = (t * t).sum(-1) if squared else t.sum(-1)
    return torch.stack([pt, ps, ts], -1)  # float32 (float64 for float64 logits, for gradcheck)


def jaccard_sums_backward(grad_sums, logits, target, squared, activation, ignore_index):
    p, t, valid = _probs_and_targets(logits, target, activation, ignore_index)
    g = grad_sums.to(p.dtype)
    dp = g[..., 0:1] * t + g[..., 1:2] * (2 * p if squared else 1)
    if activation == "softmax":
        dz = p * (dp - (p * dp).sum(1, keepdim=True))
    else:
        dz = dp * p * (1 - p)
    if valid is not None:
        dz *= valid
    return dz.reshape(logits.shape).to(logits.dtype)
