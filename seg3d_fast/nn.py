"""Drop-in modules over the fused ops (thin: parameters and init here, all computation in ops.py)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops

PRELU_MODES = ("channel", "shared", None)


def _check_channels(in_channels, out_channels):
    # (the fused ops take at least one channel each way; an empty weight would also break the init's fan-in)
    if in_channels < 1 or out_channels < 1:
        raise ValueError(f"in_channels and out_channels must be >= 1; got {in_channels} and {out_channels}")


def _triple(value, name: str, allowed: tuple[int, ...]) -> tuple[int, int, int]:
    """nn.Conv3d's int-or-3-tuple argument as a 3-tuple; the fused kernels take the same value in every dim."""
    dims = tuple(value) if isinstance(value, (tuple, list)) else (value,) * 3
    if len(dims) != 3 or len(set(dims)) != 1 or dims[0] not in allowed or isinstance(dims[0], bool):
        raise ValueError(f"{name} must be one of {allowed}, as an int or the same in all 3 dims; got {value!r}")
    return tuple(int(d) for d in dims)


def _unbatched(forward, x: Tensor, other: Optional[Tensor]) -> Tensor:
    """forward on an unbatched (C, D, H, W) x (and residual / skip) as a batch of one, as nn.Conv3d takes it."""
    if x.dim() != 4:  # (the op would name 5-D only)
        raise ValueError(f"x must have shape (N, C, D, H, W) or, unbatched, (C, D, H, W); got {tuple(x.shape)}")
    if other is not None and other.dim() != 4:
        raise ValueError(f"x is unbatched (C, D, H, W), so the residual / skip must be too; got shape "
                         f"{tuple(other.shape)}")
    return forward(x.unsqueeze(0), None if other is None else other.unsqueeze(0)).squeeze(0)


def _refuse_script(module):
    """torch.jit.script calls __prepare_scriptable__ on a module and each submodule before compiling it: TorchScript
    cannot compile the fused ops (Python custom ops and autograd.Functions) and its own errors spoke of list sizes,
    keyword-argument expansion or generators. Say what works instead."""
    raise TypeError(f"{type(module).__name__} (seg3d_fast) cannot be compiled by torch.jit.script: its fused ops run "
                    "Python code TorchScript cannot compile. Use torch.compile or torch.export, or torch.jit.trace (its "
                    "trace records the ops as seg3d_fast:: custom ops: `import seg3d_fast` before torch.jit.load)")


class ConvPReLU3d(nn.Module):
    """Conv3d (kernel 1 or 3, stride 1 or 2, padding k//2) + bias + PReLU + optional residual sum, fused.

    forward(x, residual=None) = prelu(conv(x), alpha) + residual  (residual summed before the PReLU when
    residual_first). prelu: "channel" (one alpha per output channel), "shared" (one alpha), None (no activation).
    Parameters: weight (C_out, C_in, k, k, k), bias (C_out,), alpha; initialised like nn.Conv3d and nn.PReLU.
    Takes (N, C, D, H, W) or unbatched (C, D, H, W) input, as nn.Conv3d does.
    """

    __prepare_scriptable__ = _refuse_script

    # nn.Conv3d's attributes that are fixed here, for code that reads them off any conv (receptive field, FLOPs)
    dilation, groups, padding_mode = (1, 1, 1), 1, "zeros"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int] = 3,
                 stride: int | Sequence[int] = 1, bias: bool = True, prelu: Optional[str] = "channel",
                 residual_first: bool = False, alpha_init: float = 0.25, backend: Optional[str] = None,
                 device=None, dtype=None):
        super().__init__()
        # tuples, as nn.Conv3d keeps them, for code that reads them off any conv (m.stride[0], m.kernel_size == ...)
        self.kernel_size = _triple(kernel_size, "kernel_size", ops.KERNEL_SIZES)
        self.stride = _triple(stride, "stride", ops.STRIDES)
        if prelu not in PRELU_MODES:
            raise ValueError(f"prelu must be one of {PRELU_MODES}; got {prelu!r}")
        _check_channels(in_channels, out_channels)
        factory = {"device": device, "dtype": dtype}
        self.in_channels, self.out_channels = in_channels, out_channels
        self.residual_first, self.backend, self.alpha_init = residual_first, backend, alpha_init
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        n_alpha = {"channel": out_channels, "shared": 1, None: 0}[prelu]
        self.alpha = nn.Parameter(torch.full((n_alpha,), alpha_init, **factory)) if n_alpha else None
        self.reset_parameters()

    def reset_parameters(self, alpha_init: Optional[float] = None):
        """Re-initialises every parameter; alpha to alpha_init, by default the one the module was made with (as
        nn.PReLU's own reset does)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv3d's init
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)
        if self.alpha is not None:
            nn.init.constant_(self.alpha, self.alpha_init if alpha_init is None else alpha_init)

    @classmethod
    def from_modules(cls, conv: nn.Conv3d, prelu: Optional[nn.PReLU] = None, residual_first: bool = False):
        """A fused module holding the very parameters of `conv` (and `prelu`), not copies: an optimizer made
        before the swap still trains it, and parameters tied across modules stay tied. convert.conv_unsupported_reasons
        says what can be fused."""
        from .convert import conv_unsupported_reasons  # one list of rules for what can be fused

        reasons = conv_unsupported_reasons(conv, prelu)
        if reasons:
            raise ValueError("cannot fuse: " + "; ".join(reasons))
        mode = None if prelu is None else ("shared" if prelu.weight.numel() == 1 else "channel")
        fused = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.bias is not None,
                    mode, residual_first, alpha_init=0.25 if prelu is None else prelu.init,
                    device="meta")  # parameters allocated nowhere: replaced just below
        fused.weight, fused.bias = conv.weight, conv.bias
        if prelu is not None:
            fused.alpha = prelu.weight  # (1,) or (C_out,): alpha's own shape
        fused.train(conv.training)
        return fused

    @property
    def padding(self) -> tuple[int, int, int]:
        return tuple(k // 2 for k in self.kernel_size)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if isinstance(x, Tensor) and x.dim() != 5:
            return _unbatched(self.forward, x, residual)
        return ops.conv3d_prelu(x, self.weight, self.bias, self.alpha, residual, stride=self.stride[0],
                                residual_first=self.residual_first, backend=self.backend)

    def extra_repr(self):
        prelu = None if self.alpha is None else ("shared" if self.alpha.numel() == 1 else "channel")
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"bias={self.bias is not None}, prelu={prelu!r}, residual_first={self.residual_first}")


class UpConvPReLU3d(nn.Module):
    """Transposed conv (kernel 2, stride 2) + PReLU + optional skip sum; saves only its coarse input. backend:
    "reference" | "triton" | None (the faster that can run it). Batched or unbatched input, as nn.ConvTranspose3d."""

    __prepare_scriptable__ = _refuse_script

    def __init__(self, in_channels: int, out_channels: int, alpha_init: float = 0.25, device=None, dtype=None,
                 backend: Optional[str] = None):
        super().__init__()
        _check_channels(in_channels, out_channels)
        factory = {"device": device, "dtype": dtype}
        self.in_channels, self.out_channels, self.backend = in_channels, out_channels, backend
        self.weight = nn.Parameter(torch.empty(in_channels, out_channels, 2, 2, 2, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        self.alpha = nn.Parameter(torch.full((out_channels,), alpha_init, **factory))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.weight[0].numel())  # nn.ConvTranspose3d's fan-in: weight.size(1) * 8
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor, skip: Optional[Tensor] = None) -> Tensor:
        if isinstance(x, Tensor) and x.dim() != 5:
            return _unbatched(self.forward, x, skip)
        return ops.upconv_prelu_add(x, self.weight, self.bias, self.alpha, skip, backend=self.backend)

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, kernel_size=2, stride=2"


class JaccardLoss(nn.Module):
    """Fused Jaccard (Tanimoto) loss; forward(logits, target). See ops.jaccard_loss for the arguments."""

    __prepare_scriptable__ = _refuse_script

    def __init__(self, squared: bool = True, activation: str = "softmax", smooth: float = 1e-5,
                 class_weights: Optional[Sequence[float]] = None, include_background: bool = True,
                 per_sample: bool = False, ignore_index: Optional[int] = None, reduction: str = "mean",
                 backend: Optional[str] = None):
        super().__init__()
        self.kwargs = dict(squared=squared, activation=activation, smooth=smooth,
                           include_background=include_background, per_sample=per_sample,
                           ignore_index=ignore_index, reduction=reduction, backend=backend)
        try:
            weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as e:  # (torch's own error named no argument: "too many
            # dimensions 'str'", "could not determine the shape of object type 'dict'")
            raise TypeError(f"class_weights must be a tensor or a sequence of numbers, one per class; got "
                            f"{class_weights!r}") from e
        self.register_buffer("class_weights", weights)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return ops.jaccard_loss(logits, target, class_weights=self.class_weights, **self.kwargs)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class DeepSupervisionMerge(nn.Module):
    """Sum of segmentation maps from coarse to fine: each map is upsampled x2 (trilinear) and added to the next."""

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        merged = maps[0]
        for fine in maps[1:]:
            merged = F.interpolate(merged, size=fine.shape[2:], mode="trilinear", align_corners=False) + fine
        return merged
