"""convert(model): swap fused ConvPReLU3d modules into an existing model, carrying the same weights.

Fuses a Conv3d followed by a PReLU in any Sequential (also when the PReLU sits alone inside a following Sequential, as in
MONAI's Convolution -> ADN blocks without norm or dropout), and a lone Conv3d (no activation). Leaves everything else and
says why in the report.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from .nn import ConvPReLU3d


def conv_unsupported_reasons(conv: nn.Conv3d, prelu: Optional[nn.PReLU] = None) -> list[str]:
    """Why this Conv3d (+ PReLU) cannot become a ConvPReLU3d ([] = it can)."""
    reasons = []
    k = conv.kernel_size
    if len(set(k)) != 1 or k[0] not in (1, 3):
        reasons.append(f"kernel {k} is not 1x1x1 or 3x3x3")
    if len(set(conv.stride)) != 1 or conv.stride[0] not in (1, 2):
        reasons.append(f"stride {conv.stride} is not 1 or 2 in every dim")
    padding = conv.padding
    if padding == "same" and conv.stride[0] == 1:
        padding = (k[0] // 2,) * 3
    if padding != (k[0] // 2,) * 3:
        reasons.append(f"padding {conv.padding} is not kernel//2 = {k[0] // 2}")
    if conv.padding_mode != "zeros":
        reasons.append(f"padding_mode {conv.padding_mode!r} is not 'zeros'")
    if conv.dilation != (1, 1, 1):
        reasons.append(f"dilation {conv.dilation} is not 1")
    if conv.groups != 1:
        reasons.append(f"groups={conv.groups} (only 1 is supported)")
    if prelu is not None and prelu.weight.numel() not in (1, conv.out_channels):
        reasons.append(f"PReLU has {prelu.weight.numel()} parameters for {conv.out_channels} channels")
    return reasons


@dataclass
class ConvertReport:
    swapped: list[tuple[str, str]] = field(default_factory=list)  # (module path, what it became)
    left: list[tuple[str, str]] = field(default_factory=list)  # (module path, why not)
    renamed: dict[str, str] = field(default_factory=dict)  # fused parameter key -> the original model's key

    def __str__(self):
        lines = [f"convert: {len(self.swapped)} swapped, {len(self.left)} left"]
        lines += [f"  swapped {path}: {what}" for path, what in self.swapped]
        lines += [f"  left    {path}: {why}" for path, why in self.left]
        return "\n".join(lines)


def _trivial(m: nn.Module) -> bool:
    """Modules that do nothing at inference or training time between a conv and its activation."""
    return isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and m.p == 0)


def _lone_prelu(m: nn.Module) -> Optional[tuple[nn.Module, str]]:
    """(the Sequential holding it or None, its name) when m is a PReLU or a Sequential whose only real member is one."""
    if isinstance(m, nn.PReLU):
        return None, ""
    if isinstance(m, nn.Sequential):
        real = [(n, c) for n, c in m.named_children() if not _trivial(c)]
        if len(real) == 1 and isinstance(real[0][1], nn.PReLU):
            return m, real[0][0]
    return None


def _path(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _convert(module: nn.Module, prefix: str, report: ConvertReport):
    # module._modules rather than named_children(): a module registered under two names is visited under both
    children = [(name, child) for name, child in module._modules.items() if child is not None]
    fused_prelus = set()
    for i, (name, child) in enumerate(children):
        path = _path(prefix, name)
        if name in fused_prelus:
            continue
        if isinstance(child, nn.Conv3d):
            prelu, holder, prelu_name, prelu_path = None, module, None, None
            if isinstance(module, nn.Sequential) and i + 1 < len(children):
                found = _lone_prelu(children[i + 1][1])
                if found is not None:
                    inner, inner_name = found
                    next_name = children[i + 1][0]
                    if inner is None:
                        prelu, holder, prelu_name = children[i + 1][1], module, next_name
                        prelu_path = _path(prefix, next_name)
                    else:
                        prelu, holder, prelu_name = getattr(inner, inner_name), inner, inner_name
                        prelu_path = _path(_path(prefix, next_name), inner_name)
            reasons = conv_unsupported_reasons(child, prelu)
            if reasons and prelu is not None and not conv_unsupported_reasons(child):
                reasons, prelu = [], None  # the PReLU does not fit, the conv alone still does
            if reasons:
                report.left.append((path, "; ".join(reasons)))
                continue
            setattr(module, name, ConvPReLU3d.from_modules(child, prelu))
            if prelu is not None:
                setattr(holder, prelu_name, nn.Identity())
                if holder is module:
                    fused_prelus.add(prelu_name)
                report.swapped.append((path, "Conv3d + PReLU -> ConvPReLU3d"))
                report.renamed[f"{path}.alpha"] = f"{prelu_path}.weight"
            else:
                report.swapped.append((path, "Conv3d -> ConvPReLU3d(prelu=None)"))
        elif isinstance(child, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose3d)):
            report.left.append((path, f"{type(child).__name__} is not a Conv3d"))
        else:
            _convert(child, path, report)


class _RenameKeys:
    """A state-dict hook renaming keys old -> new (with the module's prefix) where only the old one is there. A
    callable object, not a closure, so that the model it is registered on still pickles."""

    def __init__(self, renamed: dict[str, str]):
        self.renamed = renamed

    def __call__(self, module, state_dict, prefix, *args):
        for old, new in self.renamed.items():
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)


def convert(model: nn.Module) -> tuple[nn.Module, ConvertReport]:
    """Replace, in place, Conv3d(+PReLU) by ConvPReLU3d holding the same parameter objects; returns (model, report).

    Outputs and gradients of the converted model equal the original's (up to the backend's rounding); an optimizer
    made before the swap still trains it; its state_dict() keeps the original keys (report.renamed lists the fused
    parameters that live under another name) and load_state_dict() takes either model's checkpoints."""
    report = ConvertReport()
    if isinstance(model, nn.Conv3d):
        reasons = conv_unsupported_reasons(model)
        if reasons:
            report.left.append(("", "; ".join(reasons)))
            return model, report
        report.swapped.append(("", "Conv3d -> ConvPReLU3d(prelu=None)"))
        return ConvPReLU3d.from_modules(model), report
    _convert(model, "", report)
    if report.renamed:
        # state_dict() under the original model's keys (a fused PReLU's weight is its module's alpha), and
        # load_state_dict() taking either: checkpoints move freely between the original and the converted model
        model.register_state_dict_post_hook(_RenameKeys(dict(report.renamed)))
        model.register_load_state_dict_pre_hook(_RenameKeys({o: f for f, o in report.renamed.items()}))
    return model, report
