"""convert(model): swap fused ConvPReLU3d modules into an existing model, carrying the same weights.

Fuses a Conv3d followed by a PReLU in any Sequential (also when the PReLU sits alone inside a following Sequential, as in
MONAI's Convolution -> ADN blocks without norm or dropout), and a lone Conv3d (no activation). Leaves everything else and
says why in the report: other convs, Conv3d subclasses with a forward of their own, convs with hooks or parametrized
weights, and the PReLUs it could not fuse. Not seen: a forward that calls a Sequential's members itself (it gets the
fused module and the Identity in their slots), and to_empty() / load_state_dict(assign=True) after the swap, which give
each fused module its own new parameters (untying what convert keeps shared): convert models with real parameters.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from .nn import ConvPReLU3d


def conv_unsupported_reasons(conv: nn.Conv3d, prelu: Optional[nn.PReLU] = None) -> list[str]:
    """Why this Conv3d (+ PReLU) cannot become a ConvPReLU3d ([] = it can)."""
    if not isinstance(conv, nn.Conv3d):
        return [f"conv is a {type(conv).__name__}, not an nn.Conv3d"]
    if prelu is not None and not isinstance(prelu, nn.PReLU):
        return [f"prelu is a {type(prelu).__name__}, not an nn.PReLU (or None)"]
    reasons = []
    if conv.in_channels == 0 or conv.out_channels == 0:
        reasons.append(f"it has {conv.in_channels} input and {conv.out_channels} output channels (the fused op "
                       "needs >= 1)")
    k = conv.kernel_size
    if len(set(k)) != 1 or k[0] not in (1, 3):
        reasons.append(f"kernel {k} is not 1x1x1 or 3x3x3")
    if len(set(conv.stride)) != 1 or conv.stride[0] not in (1, 2):
        reasons.append(f"stride {conv.stride} is not 1 or 2 in every dim")
    padding = conv.padding
    if padding == "same" and conv.stride[0] == 1:
        padding = (k[0] // 2,) * 3
    if padding == "valid":
        padding = (0, 0, 0)
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
    elif prelu is not None and prelu.weight.dim() != 1:  # (F.prelu takes a 0-d weight; the fused op's alpha is 1-D)
        reasons.append(f"PReLU weight has shape {tuple(prelu.weight.shape)}, not (1,) or ({conv.out_channels},)")
    return reasons


_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks", "_state_dict_pre_hooks",
          "_state_dict_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _module_reasons(m: nn.Module, kind: type) -> list[str]:
    """Why module m, an instance of `kind` (Conv3d or PReLU), cannot be replaced by the fused module: the fused one
    would not run its own forward, hooks or parametrizations."""
    patched = _instance_overrides(m)
    if patched:
        return [f"its {', '.join(patched)} is overridden on the instance (module.forward = ...), which the fused "
                "module would not run"]
    if type(m) is not kind:  # (a subclass that keeps the forward and its helpers runs as the class does)
        if parametrize.is_parametrized(m):
            return [f"its parameters are parametrized ({', '.join(m.parametrizations)}: weight_norm, spectral_norm, "
                    "...), which the fused module would not apply"]
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            return [f"{type(m).__name__} is not initialized yet (run one forward pass before convert)"]
        own = [name for name in _FORWARD_METHODS if getattr(type(m), name, None) is not getattr(kind, name, None)]
        if own:
            return [f"{type(m).__name__} is a subclass of {kind.__name__} with its own {', '.join(own)}: its forward "
                    "may differ from the fused op"]
    return _hook_reasons(m)


# What computes a Conv3d's or PReLU's output: a subclass that overrides none of them computes what its class does.
_FORWARD_METHODS = ("forward", "_conv_forward", "__call__", "_call_impl")


def _instance_overrides(m: nn.Module) -> list[str]:
    """The forward methods set on the instance itself (monkeypatching, accelerate-style wrappers), not its class."""
    return [name for name in _FORWARD_METHODS if name in vars(m)]


def _hook_reasons(m: nn.Module) -> list[str]:
    hooks = [name.strip("_") for name in _HOOKS if getattr(m, name, None)]
    return [f"it has hooks ({', '.join(hooks)}) that the fused module would not run"] if hooks else []


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
    return ((type(m) is nn.Identity or (type(m) is nn.Dropout and m.p == 0))
            and not _hook_reasons(m) and not _instance_overrides(m))  # (a hook or patched forward does something)


def _runs_in_order(m: nn.Module) -> bool:
    """An nn.Sequential that runs its children one after the other (not a subclass with its own forward)."""
    return (isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward
            and not _instance_overrides(m))


def _next_prelu(m: nn.Module) -> Optional[tuple[nn.PReLU, str, nn.Module]]:
    """(the PReLU, its key relative to m, what replaces m) when m is a PReLU, or a Sequential whose only real member
    is one, that can be fused into the conv before it. The replacement is new (an Identity, or a copy of the
    Sequential with an Identity in the PReLU's place): m itself is left as it is, since other places may use it."""
    if isinstance(m, nn.PReLU):
        return (m, "weight", _identity_for(m)) if not _module_reasons(m, nn.PReLU) else None
    # a Sequential subclass that keeps Sequential's forward (MONAI's ADN) runs its children in order all the same
    # (the copy below is a plain Sequential of m's children: m may hold nothing else, or it would be lost)
    if _runs_in_order(m) and not _hook_reasons(m) and not m._parameters and not m._buffers \
            and type(m).get_extra_state is nn.Module.get_extra_state:
        real = [(n, c) for n, c in m._modules.items() if c is not None and not _trivial(c)]
        if len(real) == 1 and isinstance(real[0][1], nn.PReLU) and not _module_reasons(real[0][1], nn.PReLU):
            name, prelu = real[0]
            copy = nn.Sequential()
            copy.training = m.training  # (not .train(): its other members may also be used elsewhere)
            for n, c in m._modules.items():
                copy.add_module(n, _identity_for(prelu) if n == name else c)
            return prelu, f"{name}.weight", copy
    return None


def _identity_for(m: nn.Module) -> nn.Identity:
    """An Identity in m's train/eval mode: a model in eval() stays all in eval() after the swap."""
    identity = nn.Identity()
    identity.training = m.training
    return identity


_SCRIPTED = ("a TorchScript module (torch.jit.script / trace) cannot be changed: convert the eager model instead "
             "(the fused modules run eagerly or under torch.compile)")


def _path(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _convert(module: nn.Module, prefix: str, report: ConvertReport):
    # module._modules rather than named_children(): a module registered under two names is visited under both
    children = [(name, child) for name, child in module._modules.items() if child is not None]
    fused_slots, renamed = set(), {}
    for i, (name, child) in enumerate(children):
        path = _path(prefix, name)
        if name in fused_slots:
            continue
        if isinstance(child, nn.Conv3d):
            reasons = _module_reasons(child, nn.Conv3d) or conv_unsupported_reasons(child)
            if reasons:
                report.left.append((path, "; ".join(reasons)))
                continue
            found = _next_prelu(children[i + 1][1]) if _runs_in_order(module) and i + 1 < len(children) else None
            if found is not None and conv_unsupported_reasons(child, found[0]):
                found = None  # the PReLU does not fit, the conv alone still does
            if found is None:
                setattr(module, name, ConvPReLU3d.from_modules(child))
                report.swapped.append((path, "Conv3d -> ConvPReLU3d(prelu=None)"))
                continue
            prelu, key, replacement = found
            next_name = children[i + 1][0]
            setattr(module, name, ConvPReLU3d.from_modules(child, prelu))
            setattr(module, next_name, replacement)
            fused_slots.add(next_name)
            report.swapped.append((path, "Conv3d + PReLU -> ConvPReLU3d"))
            renamed[f"{name}.alpha"] = f"{next_name}.{key}"
            report.renamed[f"{path}.alpha"] = _path(prefix, f"{next_name}.{key}")
        elif isinstance(child, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose3d)):
            report.left.append((path, f"{type(child).__name__} is not a Conv3d"))
        elif isinstance(child, torch.jit.ScriptModule):  # its compiled forward would not see swapped children
            report.left.append((path, _SCRIPTED))
        else:
            _convert(child, path, report)
    if renamed:
        # state_dict() under the original keys (a fused PReLU's weight is its module's alpha), load_state_dict() taking
        # either and naming missing ones by the original key, for this module and every module holding it:
        # checkpoints move freely both ways
        module.register_state_dict_post_hook(_RenameKeys(renamed))
        loading = _LoadOriginalKeys(renamed)
        module.register_load_state_dict_pre_hook(loading.before)
        module.register_load_state_dict_post_hook(loading.after)


def _rename_in_place(keys: dict[str, str], table, prefix: str):
    """Renames table's keys (a state dict, kept in its order) prefix + old -> prefix + new where new is not taken."""
    renamed = {prefix + old: prefix + new for old, new in keys.items()
               if prefix + old in table and prefix + new not in table}
    if renamed:
        items = list(table.items())
        table.clear()
        table.update((renamed.get(key, key), value) for key, value in items)


class _RenameKeys:
    """A state_dict() hook renaming fused keys to the original model's (with the module's prefix). A callable object,
    not a closure, so that the model it is registered on still pickles."""

    def __init__(self, renamed: dict[str, str]):
        self.renamed = renamed

    def __call__(self, module, state_dict, prefix, local_metadata):
        _rename_in_place(self.renamed, state_dict, prefix)


class _LoadOriginalKeys:
    """load_state_dict() hooks: before, the original keys are renamed to the fused ones; after, missing fused keys
    are reported under the original name (the one the user's checkpoint lacks). The prefixes of the loads under way
    are a stack: a module held at two paths is loaded twice, each load's post hook right after its own subtree."""

    def __init__(self, renamed: dict[str, str]):
        self.renamed = renamed  # fused key -> original key
        self.prefixes: list[str] = []

    def before(self, module, state_dict, prefix, *args):
        _rename_in_place({old: new for new, old in self.renamed.items()}, state_dict, prefix)
        self.prefixes.append(prefix)

    def after(self, module, incompatible_keys):
        prefix = self.prefixes.pop()
        missing = incompatible_keys.missing_keys
        for i, key in enumerate(missing):
            if key.startswith(prefix) and key[len(prefix):] in self.renamed:
                missing[i] = prefix + self.renamed[key[len(prefix):]]


def convert(model: nn.Module) -> tuple[nn.Module, ConvertReport]:
    """Replace, in place, Conv3d(+PReLU) by ConvPReLU3d holding the same parameter objects; returns (model, report).

    Outputs and gradients of the converted model equal the original's (up to the backend's rounding); an optimizer
    made before the swap still trains it; its state_dict() (and every submodule's) keeps the original keys
    (report.renamed lists the fused parameters that live under another name) and load_state_dict() takes either
    model's checkpoints. report.left lists what stays as it was and why, the PReLUs that run unfused included."""
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(f"convert() takes an eager nn.Module; got a TorchScript module: {_SCRIPTED}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() takes an nn.Module; got {type(model).__name__}")
    report = ConvertReport()
    if isinstance(model, nn.Conv3d):
        reasons = _module_reasons(model, nn.Conv3d) or conv_unsupported_reasons(model)
        if reasons:
            report.left.append(("", "; ".join(reasons)))
            return model, report
        report.swapped.append(("", "Conv3d -> ConvPReLU3d(prelu=None)"))
        return ConvPReLU3d.from_modules(model), report
    _convert(model, "", report)
    for path, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, nn.PReLU):
            why = _module_reasons(m, nn.PReLU) or (
                [f"its weight has shape {tuple(m.weight.shape)}, not 1-D"] if m.weight.dim() != 1
                else ["not directly after a fusable Conv3d in an nn.Sequential"])
            report.left.append((path, "PReLU runs unfused: " + "; ".join(why)))
    return model, report
