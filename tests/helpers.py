"""Shared test utilities: fresh random inputs, the float64 references, and the one tolerance rule.

Tolerance rule (stated once, used by every kernel test): a backend's relative error
    err = ||out - ref64|| / ||ref64||
against the float64 reference must satisfy  err <= 2 * torch_err + FLOOR[dtype],
where torch_err is the error of plain PyTorch computing the same thing in the same dtype
(the standard a fused kernel is held to: at most about twice PyTorch's own error).
FLOOR covers differences in summation order when PyTorch's own error is ~0.
"""
import pytest
import torch
import torch.nn.functional as F

# The GPU tests that take 10-26 GB of device memory (tensors past 2^31 elements): one at a time across the
# pytest-xdist workers of gpu_check.sh, so that several never share one card at once (conftest.py).
BIG_GPU_MEMORY = pytest.mark.usefixtures("one_big_gpu_test_at_a_time")

FLOOR = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(actual, expected):
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite values in result"
    denom = expected.norm().item()
    return (actual - expected).norm().item() / max(denom, 1e-30)


def assert_close(actual, expected64, torch_result, dtype, what=""):
    """actual: backend result; expected64: float64 reference; torch_result: plain PyTorch in `dtype`."""
    err = rel_err(actual, expected64)
    torch_err = rel_err(torch_result, expected64) if torch_result is not None else 0.0
    bound = 2 * torch_err + FLOOR[dtype]
    assert err <= bound, f"{what}: rel err {err:.3e} > bound {bound:.3e} (torch {torch_err:.3e}, {dtype})"


def randn(*shape, dtype=torch.float32, device="cpu", channels_last=False, noncontig=False, generator=None):
    """Fresh random tensor (never zeros). noncontig: a strided view (every other element along W)."""
    if noncontig:
        shape = (*shape[:-1], shape[-1] * 2)
    t = torch.randn(*shape, dtype=torch.float64, generator=generator).to(device=device, dtype=dtype)
    if channels_last and t.dim() == 5:
        t = t.contiguous(memory_format=torch.channels_last_3d)
    if noncontig:
        t = t[..., ::2]
    return t


def conv3d_prelu_plain(x, weight, bias, alpha, residual, stride, residual_first):
    """The op contract in plain PyTorch (any dtype): the reference every backend is held to."""
    z = F.conv3d(x, weight, bias, stride=stride, padding=weight.shape[-1] // 2)
    if residual is not None and residual_first:
        z = z + residual
    y = z if alpha is None else F.prelu(z, alpha)
    if residual is not None and not residual_first:
        y = y + residual
    return y


def jaccard_sums_plain(logits, target, squared, activation, ignore_index=None):
    """(N, C, 3) sums [sum p*t, sum p^2|p, sum t^2|t] in plain PyTorch (one-hot and probabilities stored)."""
    n, c = logits.shape[:2]
    p = logits.softmax(1) if activation == "softmax" else logits.sigmoid()
    if target.dtype.is_floating_point:
        t = target.to(p.dtype)
        valid = torch.ones_like(p[:, :1])
    else:
        valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
        lab = torch.where(valid, target, torch.zeros_like(target)).long()
        t = F.one_hot(lab, c).movedim(-1, 1).to(p.dtype)
        valid = valid.unsqueeze(1).to(p.dtype)
    p = p * valid
    t = t * valid
    red = lambda v: v.reshape(n, c, -1).sum(-1)
    if squared:
        return torch.stack([red(p * t), red(p * p), red(t * t)], -1)
    return torch.stack([red(p * t), red(p), red(t)], -1)
