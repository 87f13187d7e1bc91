"""Seg3DNet: the 3D U-Net variant of Kayalibay et al. (arXiv 1701.03056, model `fcn_rffc4`), built from fused modules.

Per level l (features f_l): encoder [conv 3x3x3 (stride 2 from level 1 on) -> conv 3x3x3] with a short residual sum of
the two outputs; decoder: 1x1x1 reduction (no PReLU) -> transposed conv x2 + PReLU -> long skip merged by sum (default)
or concatenation -> conv 3x3x3; deep supervision: 1x1x1 segmentation maps at 1/4, 1/2 and full resolution, each
upsampled x2 (trilinear) and summed into the next. Softmax is left to the loss. PReLU after every conv except the 1x1x1
ones. The encoder's residual is summed before the second conv's PReLU (residual_first=True), so each fused block saves
only its output for backward; residual_first=False sums after it.

fused=False builds the same network from plain nn.Conv3d / nn.PReLU / nn.ConvTranspose3d and Python sums: the
baseline for memory and speed comparisons. (`convert()` swaps its convs for fused modules, but its PReLUs, applied
by PlainConvBlock's own forward rather than by a Sequential, stay separate ops: its report lists them.)
"""
from __future__ import annotations

import math
import weakref
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .nn import ConvPReLU3d, DeepSupervisionMerge, UpConvPReLU3d

NORMS = (None, "instance", "batch")
SKIPS = ("sum", "concat")


def _norm(kind: Optional[str], channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    return nn.Identity()


class PlainConvBlock(nn.Module):
    """conv -> [norm] -> [+ residual] -> [PReLU] -> [+ residual] as separate PyTorch ops (the baseline)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, act: bool = True,
                 residual_first: bool = False, norm: Optional[str] = None):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel_size, stride, padding=kernel_size // 2)
        self.norm = _norm(norm, cout)
        self.act = nn.PReLU(cout) if act else None
        self.residual_first = residual_first

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        z = self.norm(self.conv(x))
        if residual is not None and self.residual_first:
            z = z + residual
        y = z if self.act is None else self.act(z)
        if residual is not None and not self.residual_first:
            y = y + residual
        return y


class PlainUpBlock(nn.Module):
    """ConvTranspose3d (kernel 2, stride 2) -> PReLU -> [+ skip] as separate PyTorch ops."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.deconv = nn.ConvTranspose3d(cin, cout, 2, stride=2)
        self.act = nn.PReLU(cout)

    def forward(self, x: Tensor, skip: Optional[Tensor] = None) -> Tensor:
        y = self.act(self.deconv(x))
        return y if skip is None else y + skip


class Seg3DNet(nn.Module):
    def __init__(self, in_channels: int = 4, num_classes: int = 5, features: Sequence[int] = (8, 16, 32, 64),
                 skip: str = "sum", norm: Optional[str] = None, deep_supervision: int = 3,
                 residual_first: bool = True, fused: bool = True, backend: Optional[str] = None):
        super().__init__()
        features = tuple(int(f) for f in features)
        if len(features) < 2:
            raise ValueError(f"features needs at least 2 levels; got {features}")
        if skip not in SKIPS:
            raise ValueError(f"skip must be one of {SKIPS}; got {skip!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}; got {norm!r}")
        if in_channels < 1 or num_classes < 1:
            raise ValueError(f"in_channels and num_classes must be >= 1; got {in_channels}, {num_classes}")
        if deep_supervision < 0:
            raise ValueError(f"deep_supervision (segmentation maps) must be >= 0; got {deep_supervision}")
        self.config = dict(in_channels=in_channels, num_classes=num_classes, features=features, skip=skip, norm=norm,
                           deep_supervision=deep_supervision, residual_first=residual_first, fused=fused)
        self.in_channels, self.num_classes, self.features, self.skip = in_channels, num_classes, features, skip
        fuse = fused and norm is None  # a norm between conv and PReLU breaks the fusion

        def conv(cin, cout, k=3, stride=1, act=True, res_first=False):
            if fuse:
                return ConvPReLU3d(cin, cout, k, stride, prelu="channel" if act else None,
                                   residual_first=res_first, backend=backend)
            return PlainConvBlock(cin, cout, k, stride, act, res_first, norm if act else None)

        def up(cin, cout):
            if not fused:
                return PlainUpBlock(cin, cout)
            # (the cuda backend has no upsampling kernel: a network forced onto it upsamples on the best other)
            return UpConvPReLU3d(cin, cout, backend=backend if backend in ops.UPCONV_BACKENDS else None)
        levels = len(features)
        self.enc_first = nn.ModuleList(
            [conv(in_channels if l == 0 else features[l - 1], features[l], stride=1 if l == 0 else 2)
             for l in range(levels)])
        self.enc_second = nn.ModuleList(
            [conv(f, f, res_first=residual_first) for f in features])
        self.reduce = nn.ModuleList([conv(features[l + 1], features[l], k=1, act=False) for l in range(levels - 1)])
        self.up = nn.ModuleList([up(features[l], features[l]) for l in range(levels - 1)])
        merged = [2 * f if skip == "concat" else f for f in features[:-1]]
        self.dec = nn.ModuleList([conv(merged[l], features[l]) for l in range(levels - 1)])
        # coarse to fine, e.g. [2, 1, 0]; 0 (or False) is no deep supervision: the full-resolution map alone
        maps = max(1, min(deep_supervision, levels - 1))
        self.ds_levels = list(range(maps - 1, -1, -1))
        self.seg = nn.ModuleDict({str(l): conv(features[l], num_classes, k=1, act=False) for l in self.ds_levels})
        self.merge = DeepSupervisionMerge()

    @property
    def multiple(self) -> int:
        """Spatial extents are padded to a multiple of this (one halving per level below the first)."""
        return 2 ** (len(self.features) - 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (N, {self.in_channels}, D, H, W); got {tuple(x.shape)}")
        extent = x.shape[2:]
        # (rounded up by floor division, not (-s) % multiple: under torch.compile with dynamic extents a Mod in the
        # sizes reached the trilinear upsampling's scale and PyTorch's tensorify pass failed on it)
        pad = [-(-s // self.multiple) * self.multiple - s for s in extent]
        self._check_norm_statistics(x.shape[0], [(s + p) // self.multiple for s, p in zip(extent, pad)])
        if any(pad):  # odd extents: pad at the far end, crop the logits back
            x = F.pad(x, [p for s in reversed(pad) for p in (0, s)])
        skips = []
        for first, second in zip(self.enc_first, self.enc_second):
            y = first(x)
            x = second(y, y)
            skips.append(x)
        maps = {}
        for l in range(len(self.features) - 2, -1, -1):
            r = self.reduce[l](x)
            if self.skip == "sum":
                u = self.up[l](r, skips[l])
            else:
                u = torch.cat([self.up[l](r), skips[l]], 1)
            x = self.dec[l](u)
            if str(l) in self.seg:
                maps[l] = self.seg[str(l)](x)
        logits = self.merge([maps[l] for l in self.ds_levels])
        if any(pad):
            logits = logits[(..., *[slice(0, s) for s in extent])]
        return logits

    def _check_norm_statistics(self, batch: int, deepest: list[int]):
        """The deepest level's norm needs more than one value per channel to normalise by (instance: per sample;
        batch, in training: over the batch); the norm layers' own errors name neither the input nor the level."""
        norm = self.config["norm"]
        if norm == "instance":
            values = math.prod(deepest)
        elif norm == "batch" and self.training:
            values = batch * math.prod(deepest)
        else:  # no norm, or batch norm's running statistics
            return
        if values < 2:
            raise ValueError(f"norm={norm!r} needs more than one value per channel at the deepest level, which is "
                             f"{'x'.join(map(str, deepest))} for a batch of {batch} after "
                             f"{len(self.features) - 1} halvings: give x more than {self.multiple} voxels along some "
                             f"axis{'' if norm == 'instance' else ' or more samples'}, or use another norm")

    def summary(self, input_size: Optional[Sequence[int]] = None, dtype: torch.dtype = torch.float32) -> str:
        """Layers with output shapes and parameters, the activation bytes each writes, and the bytes saved for
        backward in training, for an input of `input_size` (default: one BRATS crop, 1 x in_channels x 128 x 160 x
        144; computed on the meta device: no memory used)."""
        import copy

        if input_size is None:  # (a fixed 4-channel default was refused by every network of other in_channels)
            input_size = (1, self.in_channels, 128, 160, 144)

        model = copy.deepcopy(self).to(device="meta", dtype=dtype).train()
        rows = []

        def record(name):
            def hook(module, args, out):
                params = sum(p.numel() for p in module.parameters(recurse=False))
                rows.append((name, type(module).__name__, tuple(out.shape), params, out.numel() * out.element_size()))
            return hook

        leaves = [(n, m) for n, m in model.named_modules()
                  if isinstance(m, (ConvPReLU3d, UpConvPReLU3d, nn.Conv3d, nn.ConvTranspose3d, nn.PReLU))]
        handles = [m.register_forward_hook(record(n)) for n, m in leaves]

        x = torch.randn(*input_size, device="meta", dtype=dtype, requires_grad=True)
        saved_bytes = saved_tensor_bytes(model, x)
        for h in handles:
            h.remove()
        lines = [f"Seg3DNet {self.config}", f"input {tuple(input_size)} {dtype}",
                 f"{'layer':<24}{'type':<16}{'output shape':<30}{'params':>10}{'output MiB':>12}"]
        for name, kind, shape, params, nbytes in rows:
            lines.append(f"{name:<24}{kind:<16}{str(shape):<30}{params:>10}{nbytes / 2**20:>12.1f}")
        total = sum(p.numel() for p in self.parameters())
        lines.append(f"parameters: {total:,}; activations written: {sum(r[4] for r in rows) / 2**20:,.1f} MiB; "
                     f"saved for backward (parameters excluded): {saved_bytes / 2**20:,.1f} MiB")
        return "\n".join(lines)


def transfer_weights(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Copy parameters and buffers (batch norm's running statistics) between a fused and a plain Seg3DNet of one
    config (same order and shapes)."""
    src_tensors = list(src.parameters()) + list(src.buffers())
    dst_tensors = list(dst.parameters()) + list(dst.buffers())
    if len(src_tensors) != len(dst_tensors) or any(a.shape != b.shape for a, b in zip(src_tensors, dst_tensors)):
        raise ValueError("src and dst must be Seg3DNets of the same configuration (fused or plain)")
    with torch.no_grad():
        for a, b in zip(src_tensors, dst_tensors):
            b.copy_(a)
    return dst


def saved_tensor_bytes(model: nn.Module, x: Tensor, include_parameters: bool = False) -> int:
    """Bytes autograd saves for backward during one forward of `model` on `x`.

    Counted with torch.autograd.graph.saved_tensors_hooks, each storage once (keyed by its data_ptr: views of one
    buffer and tensors saved by several ops count once, at the storage's full size, which is what stays allocated).
    On the meta device, which has no addresses, each tensor object counts once. Parameters are left out unless
    include_parameters (they are held anyway); autocast's low-precision weight copies are activations and count.
    """
    params = list(model.parameters())
    skip = set() if include_parameters else {p.untyped_storage().data_ptr() for p in params}
    sizes, kept = {}, []

    def pack(t):
        if t.device.type == "meta":
            if include_parameters or not any(t is p for p in params):
                kept.append(t)  # alive until counted, so its id stays unique
                sizes[id(t)] = t.numel() * t.element_size()
            return t
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            sizes[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)  # alive until counted: saved storages cannot be freed and their addresses reused
    total = sum(sizes.values())
    del out
    kept.clear()
    return total


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of the storages that the ops run under it create and that are still alive: the current sum and its
    peak. A storage counts once (views and in-place results add nothing) and leaves the sum when it is freed."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._alive = set()

    def _freed(self, key, nbytes):
        self._alive.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._alive:
                    self._alive.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, key, storage.nbytes())
        return out


def peak_live_bytes(fn) -> int:
    """Peak bytes of the tensors that fn() allocates, held at once (what a caching allocator's peak adds above the
    memory in use before the call, less its rounding and workspaces). Works on the CPU: memory comparisons of
    training steps without a GPU."""
    tracker = _LiveBytes()
    with tracker:
        result = fn()
    del result
    return tracker.peak
