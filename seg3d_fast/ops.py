"""The public fused ops: argument checks, backend choice, torch.library custom ops (fake kernels + autograd).

conv3d_prelu(x, weight, bias, alpha, residual) = prelu(conv3d(x, weight, bias, stride, padding=k//2), alpha) + residual
  (residual_first=True: the residual is summed before the activation).
  Saved for backward: x and the op's own output (or the PReLU output, when a residual is added after it); the
  pre-activation is recovered from it (z = y / alpha where y <= 0, valid for alpha > 0; for any alpha <= 0 the backward
  recomputes z instead). The next layer keeps that output anyway, so a conv block costs one activation, not two.
jaccard_loss(logits, target): softmax/sigmoid and the per-(sample, class) sums in one pass; backward recomputes the
  probabilities from the logits: neither probabilities nor a one-hot target are ever stored.
upconv_prelu_add(x, weight, bias, alpha, skip): transposed conv (kernel 2, stride 2) + PReLU + skip sum that saves only
  its (coarse) input and recomputes the cheap transposed conv in backward.
"""
from __future__ import annotations

import functools
import math
import numbers
import os
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from . import backends, graphs
from .backends import reference as _reference
from .backends._layout import out_format

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_SIZES = (1, 3)
STRIDES = (1, 2)
ACTIVATIONS = ("softmax", "sigmoid")
REDUCTIONS = ("mean", "sum", "none")


# ---------------------------------------------------------------------------------------------------------------------
# helpers
def conv_output_shape(x_shape, weight_shape, stride: int) -> tuple[int, ...]:
    k = weight_shape[-1]
    n, _, *spatial = x_shape
    return (n, weight_shape[0], *[(s + 2 * (k // 2) - k) // stride + 1 for s in spatial])


def _describe(t) -> str:
    if not isinstance(t, Tensor):
        return type(t).__name__
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _autocast_dtype(device: torch.device):
    """The autocast dtype in force for this device type, or None (custom ops are not autocast-aware by themselves)."""
    kind = device.type
    if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


# What autocast casts: float tensors other than float64 (PyTorch's own layers keep float64 and leave integer
# tensors alone, which then fail the dtype checks as they do outside autocast).
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def _cast(dtype, *tensors):
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.dtype != dtype and t.dtype in _AUTOCAST_ELIGIBLE else t
                 for t in tensors)


def _cast_params(dtype, *params):
    """Under autocast: the parameters as the fused ops take them. float32 ones stay float32 (the kernels read them
    as they are and return their gradients in float32: no cast kernels, no autograd nodes for the casts); float16 /
    bfloat16 ones are cast to the autocast dtype, others (float64) left as they are, as autocast leaves them."""
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.dtype in (torch.float16, torch.bfloat16)
                 and t.dtype != dtype else t for t in params)


def _differentiable_once(backward):
    """Marks an autograd.Function's backward as first-order only, like torch's once_differentiable, but also where no
    incoming gradient requires grad (a scalar loss's): under create_graph=True every gradient carries an error node,
    so a second derivative raises instead of finding no graph, or a partial one (wrong numbers)."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            out = backward(ctx, *grads)
        if not torch.is_grad_enabled():  # (grad mode is on in a backward only under create_graph=True)
            return out
        single = not isinstance(out, tuple)
        out = (out,) if single else out
        # The error node also takes the op's saved inputs that require grad, so that differentiating a gradient
        # with respect to them (torch.autograd.grad(g.sum(), x)) reaches it and raises: without them it would
        # find x unused, and with allow_unused=True return None, a wrong second derivative.
        # So do the incoming gradients that require grad: they carry what the loss put downstream of the op (learned
        # class weights scaling the loss's terms, a factor multiplying the output), which a gradient of this backward's
        # results depends on too; without them that second derivative came back None (allow_unused=True).
        inputs = [t for t in (*ctx.saved_tensors, *grads) if isinstance(t, Tensor) and t.requires_grad]
        error = torch._C._functions.DelayedError(
            b"trying to differentiate twice a seg3d_fast fused op: its backward is not differentiable (no second "
            b"derivatives, e.g. no gradient penalties through it)", len(out) + len(inputs))
        out = error(*[t.detach().requires_grad_() if isinstance(t, Tensor) and t.is_floating_point() else t
                      for t in out], *inputs)
        out = out if isinstance(out, tuple) else (out,)
        return out[0] if single else out[:len(out) - len(inputs)]
    return wrapper


def _refuse_func_transforms():
    """torch.func transforms (grad, vjp, vmap, jacrev, ...) cannot run the fused ops' autograd.Functions: PyTorch's
    own error speaks of a setup_context staticmethod the caller cannot add. Say what the caller can do instead."""
    if not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None:
        raise RuntimeError("seg3d_fast's fused ops do not support torch.func transforms (grad, vjp, jvp, vmap, jacrev, "
                           "...): their gradients come from custom backward kernels; use torch.autograd.grad or "
                           ".backward() (and a Python loop instead of vmap)")


def _refuse_batched_gradient(grad, what: str, backend: Optional[str] = None):
    """A backward given a batch of incoming gradients (torch.autograd.grad(..., is_grads_batched=True), or
    torch.autograd.functional.jacobian / hessian with vectorize=True: autograd vmaps the backward) where it cannot run
    one: the kernel backends read raw pointers and the loss's backward accumulates in place, so PyTorch's own error
    spoke of BatchedTensorImpl storage or of vmap and addcmul_. Say what the caller can do instead. The reference
    backend's conv and upsampling backwards (torch ops) take a batch."""
    functorch = torch._C._functorch
    if backend != "reference" and isinstance(grad, Tensor) and (functorch.is_legacy_batchedtensor(grad) or functorch.is_batchedtensor(grad)):
        raise RuntimeError(f"seg3d_fast: {what} cannot take a batch of gradients (torch.autograd.grad(..., "
                           "is_grads_batched=True), torch.autograd.functional.jacobian / hessian with "
                           "vectorize=True): call torch.autograd.grad once per gradient (a Python loop), or "
                           "vectorize=False")


def _check_same(name: str, t: Optional[Tensor], x: Tensor, ref_name: str = "x", ref: Optional[Tensor] = None):
    """t is None or a tensor on x's device with the dtype of `ref` (default: x)."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all tensors must share one device")
    ref = x if ref is None else ref
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}: they must share one dtype")


def _check_params(x: Tensor, weight: Tensor, bias: Optional[Tensor], alpha: Optional[Tensor]):
    """weight, bias and alpha share one dtype: x's, or float32 with a float16 / bfloat16 x (mixed precision, as
    under autocast: the kernels read float32 parameters directly and give their gradients in float32)."""
    mixed = weight.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)
    if weight.dtype != x.dtype and not mixed:
        raise TypeError(f"weight has dtype {weight.dtype} but x has {x.dtype}: the parameters must have x's dtype, "
                        "or float32 with a float16 / bfloat16 x")
    _check_same("weight", weight, x, "weight", weight)  # (its device)
    _check_same("bias", bias, x, "weight", weight)
    _check_same("alpha", alpha, x, "weight", weight)


def _check_conv_args(x, weight, bias, alpha, residual, stride, residual_first):
    if not isinstance(x, Tensor) or x.dim() != 5:
        raise ValueError(f"x must be a 5-D tensor (N, C_in, D, H, W); got {_describe(x)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64; got {x.dtype}")
    if not isinstance(weight, Tensor) or weight.dim() != 5:
        raise ValueError(f"weight must be a 5-D tensor (C_out, C_in, k, k, k); got {_describe(weight)}")
    k = weight.shape[-1]
    if tuple(weight.shape[2:]) != (k, k, k) or k not in KERNEL_SIZES:
        raise ValueError(f"weight must have a cubic kernel of size 1 or 3; got kernel {tuple(weight.shape[2:])}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"channel mismatch: x has {x.shape[1]} channels but weight expects C_in={weight.shape[1]} "
                         f"(weight shape {tuple(weight.shape)})")
    if x.shape[1] == 0 or weight.shape[0] == 0:
        raise ValueError(f"x and weight need at least one input and one output channel; got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if isinstance(stride, bool) or not isinstance(stride, numbers.Integral):
        raise TypeError(f"stride must be an int, 1 or 2; got {stride!r} ({type(stride).__name__})")
    if stride not in STRIDES:
        raise ValueError(f"stride must be 1 or 2; got {stride!r}")
    if not isinstance(residual_first, bool):
        raise TypeError(f"residual_first must be a bool; got {residual_first!r}")
    _check_params(x, weight, bias, alpha)
    _check_same("residual", residual, x)
    c_out = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"bias must have shape ({c_out},) for C_out={c_out}; got {tuple(bias.shape)}")
    if alpha is not None and (alpha.dim() != 1 or alpha.numel() not in (1, c_out)):
        raise ValueError(f"alpha must have shape (1,) or ({c_out},) (C_out={c_out}); got {tuple(alpha.shape)}")
    out_shape = conv_output_shape(x.shape, weight.shape, stride)
    if residual is not None and tuple(residual.shape) != out_shape:
        raise ValueError(f"residual must have the output's shape {out_shape}; got {tuple(residual.shape)}")
    if any(s <= 0 for s in out_shape[2:]):  # (an empty batch is fine: an empty output, as F.conv3d gives)
        raise ValueError(f"x spatial extent {tuple(x.shape[2:])} gives an empty output")


def _python_scalar(value):
    """A numpy scalar as the Python number it is (the custom ops' schemas take int / float). Under torch.compile
    dynamo hands a numpy scalar over as a 0-d array, which the argument checks would refuse; turning it into a
    number there breaks the graph at this call, as a numpy scalar does elsewhere in a compiled function."""
    if isinstance(value, (np.generic, np.ndarray)) and value.ndim == 0 and value.dtype.kind in "iuf":
        return value.item()
    return value


def _tracing() -> bool:
    """torch.compile / torch.export (dynamo or make_fx) or torch.jit.trace is recording the ops: they take the
    custom ops, whose backend is chosen when the recorded graph runs."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _check_backend(backend):
    if backend is not None and backend not in backends.NAMES:
        raise ValueError(f"backend must be one of {backends.NAMES} or None; got {backend!r}")


# Backend choice per call signature: the dispatcher's answer depends only on the backend asked for, the environment
# override, the direction and the tensors' device, dtype and shapes, so it is computed once per such signature.
_backend_cache: dict = {}


def chosen_backends() -> dict:
    """{"op/direction": {backend: distinct call signatures}} chosen since forget_backend_choices(): which backends a
    model's layers ran on (its speed and memory depend on the mix)."""
    counts: dict = {}
    for signature, name in _backend_cache.items():
        per_backend = counts.setdefault(f"{signature[0]}/{signature[1]}", {})
        per_backend[name] = per_backend.get(name, 0) + 1
    return counts


def forget_backend_choices() -> None:
    """Clears the per-signature backend cache: the next calls choose again (from the table or the measurements)."""
    _backend_cache.clear()


def _shape(t):
    return None if t is None else tuple(t.shape)


def _conv_backend(x, weight, bias, alpha, residual, stride, residual_first, backend: str,
                  direction: str = "forward") -> str:
    """The backend for this conv: `backend` when given ("" = choose), else per direction/dtype/kernel/stride/channels."""
    signature = ("conv3d_prelu", direction, backend, os.environ.get(backends.ENV_BACKEND), x.device, x.dtype,
                 _shape(x), _shape(weight), _shape(bias), _shape(alpha), _shape(residual), stride, residual_first)
    name = _backend_cache.get(signature)
    if name is None:
        args = (x, weight, bias, alpha, residual, stride, residual_first)
        key = f"{str(x.dtype).removeprefix('torch.')}-k{weight.shape[-1]}-s{stride}-ci{weight.shape[1]}-co{weight.shape[0]}"
        bench = backends.Bench("conv3d_prelu", args, lambda m: m.conv3d_prelu_forward(*args, False))
        name = _backend_cache[signature] = backends.select("conv3d_prelu", backend or None, x.device, key, args,
                                                           bench, direction)
    return name


# ---------------------------------------------------------------------------------------------------------------------
# conv3d + bias + PReLU + residual
def _conv_forward_impl(x, weight, bias, alpha, residual, stride, residual_first, save_act, backend):
    name = _conv_backend(x, weight, bias, alpha, residual, stride, residual_first, backend)
    out, act = backends.load(name).conv3d_prelu_forward(x, weight, bias, alpha, residual, stride, residual_first,
                                                        save_act)
    return out, (act if save_act else out.new_empty(0))


@torch.library.custom_op("seg3d_fast::conv3d_prelu", mutates_args=())
def _conv3d_prelu(x: Tensor, weight: Tensor, bias: Optional[Tensor], alpha: Optional[Tensor],
                  residual: Optional[Tensor], stride: int, residual_first: bool, save_act: bool,
                  backend: str) -> tuple[Tensor, Tensor]:
    return _conv_forward_impl(x, weight, bias, alpha, residual, stride, residual_first, save_act, backend)


@_conv3d_prelu.register_fake
def _(x, weight, bias, alpha, residual, stride, residual_first, save_act, backend):
    shape = conv_output_shape(x.shape, weight.shape, stride)
    fmt = out_format(x)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    act = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt) if save_act else x.new_empty(0)
    return out, act


def _read_later(values: Tensor):
    """A function returning `values` on the CPU, to be called later. On a GPU they are copied to pinned host memory
    asynchronously now, so that the reader (a backward) does not drain the launch queue the way `bool(tensor)` or
    `.item()` there would (the copy is long done by then)."""
    if values.device.type != "cuda":
        return lambda: values
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("seg3d_fast's fused ops were captured into a CUDA graph outside "
                           "seg3d_fast.graphs.recording_checks(): their alpha and label checks must be read after each "
                           "replay (seg3d_fast.graphs.CudaGraphStep does both)")
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    copied = [torch.cuda.Event()]
    copied[0].record()

    def read():
        if copied:  # waited for once (a retained graph's later backwards, e.g. one captured in a graph, do not wait)
            copied.pop().synchronize()
        return host
    return read


# The least alpha from which the pre-activation z = y / alpha, read back from a stored output y, keeps the output
# dtype's precision: 2^7 times the dtype's least normal number. A smaller alpha puts alpha * z among the subnormals
# for small z, and z loses bits: in fp16 (below 2^-7) 10x PyTorch's alpha-gradient error at alpha 1e-3; bf16 and fp32
# only below 2^-119 (alpha 1e-40: a bf16 alpha gradient off by 9%).
_RECOVERABLE_ALPHA = {dtype: torch.finfo(dtype).tiny * 2.0 ** 7
                      for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def _alpha_recoverable_later(alpha, dtype):
    """Whether every alpha is above _RECOVERABLE_ALPHA for activations of `dtype` (NaN: no), as a
    function for the backward to call (see _read_later). The least alpha is what crosses: one reduction. While a
    graph is captured (graphs.recording_checks) the answer is yes and the least alpha is recorded, to be checked after
    each replay."""
    if alpha.device.type == "meta":  # (no values: shapes only)
        return lambda: True
    threshold = _RECOVERABLE_ALPHA[dtype]
    least = alpha.amin()
    checks = graphs.active_checks()
    if checks is not None:
        checks.add(least, functools.partial(graphs.check_alpha_recoverable, threshold=threshold),
                   functools.partial(graphs.alpha_unrecoverable, threshold=threshold))
        return lambda: True
    read = _read_later(least)
    return lambda: read().item() > threshold


def _conv_backward_impl(grad_out, x, weight, bias, alpha, residual, saved, stride, residual_first, output_mask,
                        backend, alpha_recoverable=None):
    name = _conv_backend(x, weight, bias, alpha, residual, stride, residual_first, backend, "backward")
    _refuse_batched_gradient(grad_out, f"conv3d_prelu's backward on the {name} backend", name)
    module = backends.load(name)
    mask = tuple(output_mask)
    if alpha is None:
        grads = module.conv3d_prelu_backward(grad_out, x, weight, alpha, None, "none", stride, mask)
    else:
        recoverable = alpha_recoverable or _alpha_recoverable_later(alpha, x.dtype)
        # The common case (every alpha > 0: z recovered from the saved output) is launched before the check is read,
        # so that the GPU has this backward queued while the host waits for the forward's copy of the least alpha.
        grads = module.conv3d_prelu_backward(grad_out, x, weight, alpha, saved, "act", stride, mask)
        if not recoverable():  # z is not recoverable from the PReLU output: those gradients are dropped, and z is
            # recomputed (exact, one extra forward conv)
            z, _ = module.conv3d_prelu_forward(x, weight, bias, None, residual if residual_first else None, stride,
                                               residual_first, False)
            grads = module.conv3d_prelu_backward(grad_out, x, weight, alpha, z, "preact", stride, mask)
    # (a backend may compute a gradient it was not asked for, e.g. aten's convolution_backward the weight's with the
    # bias's: the op's fake kernel promises an empty tensor there)
    return [g if g is not None and need else x.new_empty(0) for g, need in zip(grads, mask)]


@torch.library.custom_op("seg3d_fast::conv3d_prelu_backward", mutates_args=())
def _conv3d_prelu_backward(grad_out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                           alpha: Optional[Tensor], residual: Optional[Tensor], saved: Optional[Tensor],
                           stride: int, residual_first: bool, output_mask: list[bool],
                           backend: str) -> list[Tensor]:
    grads = _conv_backward_impl(grad_out, x, weight, bias, alpha, residual, saved, stride, residual_first,
                                output_mask, backend)
    # The pre-activation's gradient (the residual's, residual_first=True) in grad_out's layout, as the fake kernel
    # says: the backends give it in the saved output's (reference: torch.where's choice) or always channels-last
    # (triton), and torch.compile's inductor asserts the fake's strides (a channels_last_3d model failed there).
    # (Only on the traced path: eager autograd takes any layout.)
    if output_mask[4] and grads[4].dim() == 5:
        grads[4] = grads[4].contiguous(memory_format=out_format(grad_out))
    return grads


@_conv3d_prelu_backward.register_fake
def _(grad_out, x, weight, bias, alpha, residual, saved, stride, residual_first, output_mask, backend):
    like = (x, weight, bias, alpha, grad_out)
    out = []
    for need, t in zip(output_mask, like):
        if need and t is not None:
            out.append(torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=out_format(t))
                       if t.dim() == 5 else torch.empty_like(t))
        else:
            out.append(x.new_empty(0))
    return out


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, alpha, residual, stride, residual_first, save_act, backend = inputs
    out, act = output
    saved = None if alpha is None else (act if save_act else out)
    # The residual is needed only to recompute z when some alpha <= 0 and it was summed before the activation.
    kept_residual = residual if (residual_first and alpha is not None) else None
    ctx.save_for_backward(x, weight, bias, alpha, kept_residual, saved)
    ctx.stride, ctx.residual_first, ctx.backend = stride, residual_first, backend


def _conv_grads(ctx, grad_out, backward_fn):
    """Gradients of the 9 op inputs; backward_fn is the backward custom op (traced by torch.compile) or its
    implementation (eager)."""
    try:
        x, weight, bias, alpha, residual, saved = ctx.saved_tensors
    except RuntimeError as e:
        if "modified by an inplace operation" not in str(e):
            raise
        raise RuntimeError("seg3d_fast: the output (or an input) of a fused conv3d_prelu was modified in place before "
                           "its backward (e.g. `out += x`, `out.mul_(s)` on a ConvPReLU3d's output): with an "
                           "activation its backward reads the pre-activation back from that output. Write it out of "
                           "place (`out = out + x`), or pass the sum as the fused op's residual") from e
    need_x, need_w, need_b, need_alpha, need_res = ctx.needs_input_grad[:5]
    need_b = need_b and bias is not None
    need_alpha = need_alpha and alpha is not None
    need_dz = need_res and ctx.residual_first and alpha is not None
    mask = [need_x, need_w, need_b, need_alpha, need_dz]
    grads = backward_fn(grad_out, x, weight, bias, alpha, residual, saved, ctx.stride, ctx.residual_first, mask,
                        ctx.backend)
    grad_x, grad_w, grad_b, grad_alpha, grad_z = [g if m else None for g, m in zip(grads, mask)]
    grad_res = (grad_z if need_dz else grad_out) if need_res else None
    return grad_x, grad_w, grad_b, grad_alpha, grad_res, None, None, None, None


_conv3d_prelu.register_autograd(lambda ctx, grad_out, _grad_act: _conv_grads(ctx, grad_out, _conv3d_prelu_backward),
                                setup_context=_conv_setup_context)


class _Conv3dPReLUEager(torch.autograd.Function):
    """The eager path: the custom op's implementation and autograd without torch.library's per-call wrapping
    (tens of microseconds a call, which small layers feel). torch.compile traces the custom op instead."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _conv_forward_impl(*inputs)
        _conv_setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1])
        # the saved activation gets no gradient: without this, autograd would fill a zero tensor of its size for
        # every backward (a full activation written and held; the aten::zeros at the head of each backward)
        ctx.set_materialize_grads(False)
        alpha = inputs[3]  # (inference needs no backward, so no check)
        ctx.alpha_recoverable = (_alpha_recoverable_later(alpha, inputs[0].dtype)
                                 if alpha is not None and any(ctx.needs_input_grad) else None)
        return output

    @staticmethod
    @_differentiable_once  # a second derivative would be wrong (z is recovered from the saved output): an error
    def backward(ctx, grad_out, _grad_act):
        if grad_out is None:  # the output did not reach the loss
            return (None,) * 9
        return _conv_grads(ctx, grad_out,
                           lambda *args: _conv_backward_impl(*args, alpha_recoverable=ctx.alpha_recoverable))


def conv3d_prelu(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, alpha: Optional[Tensor] = None,
                 residual: Optional[Tensor] = None, *, stride: int = 1, residual_first: bool = False,
                 backend: Optional[str] = None) -> Tensor:
    """prelu(conv3d(x, weight, bias, stride, padding=k//2), alpha) + residual, fused.

    x (N, C_in, D, H, W); weight (C_out, C_in, k, k, k), k in {1, 3}; bias (C_out,) or None; alpha (1,) or (C_out,)
    or None (no activation); residual the output's shape or None, summed after the activation, or before it when
    residual_first. stride 1 or 2. fp16/bf16/fp32 (fp64 on the reference backend); weight, bias and alpha in x's
    dtype or, with a fp16/bf16 x, in float32 (their gradients then float32 too). The output keeps x's
    channels_last_3d layout. backend: "reference" | "triton" | "cuda" | None (best that can run; env
    SEG3D_FAST_BACKEND overrides None).
    """
    # Autocast first (custom ops are not autocast-aware): the activations in its dtype; float32 parameters are
    # taken as they are (_cast_params).
    dtype = _autocast_dtype(x.device) if isinstance(x, Tensor) else None
    if dtype is not None:
        x, residual = _cast(dtype, x, residual)
        weight, bias, alpha = _cast_params(dtype, weight, bias, alpha)
    stride = _python_scalar(stride)
    _check_conv_args(x, weight, bias, alpha, residual, stride, residual_first)
    _check_backend(backend)
    _refuse_func_transforms()
    save_act = alpha is not None and residual is not None and not residual_first
    # The backend is chosen inside the op, at run time: torch.compile traces only the op, not the dispatcher.
    # torch.jit.trace records the op too (the eager autograd.Function would be a Python call that torch.jit.save
    # cannot write).
    op = _conv3d_prelu if _tracing() else _Conv3dPReLUEager.apply
    out, _ = op(x, weight, bias, alpha, residual, stride, residual_first, save_act, backend or "")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Jaccard (Tanimoto) loss
def _jaccard_backend(logits, target, activation, ignore_index, backend, direction="forward"):
    signature = ("jaccard", direction, backend, os.environ.get(backends.ENV_BACKEND), logits.device, logits.dtype,
                 _shape(logits), target.dtype, _shape(target), activation, ignore_index)
    name = _backend_cache.get(signature)
    if name is None:
        key = f"{str(logits.dtype).removeprefix('torch.')}-C{logits.shape[1]}"
        args = (logits, target, activation, ignore_index)
        bench = backends.Bench("jaccard", args, lambda m: _loss_forward(m, logits, target, activation, ignore_index))
        name = _backend_cache[signature] = backends.select("jaccard", backend or None, logits.device, key, args,
                                                           bench, direction)
    return backends.load(name)


def _loss_forward(module, logits, target, activation, ignore_index):
    """The default loss's forward on backend `module` as jaccard_loss runs it there (the fused loss where the
    backend has one, else its sums and the formula): what the dispatcher times, host work included."""
    if hasattr(module, "jaccard_loss_reduced"):
        weights = _unit_weights(logits.shape[1], True, logits.device)
        return module.jaccard_loss_reduced(logits, target, True, activation, ignore_index, 1e-5, weights, False,
                                           True)[0]
    return _loss_from_sums(module.jaccard_sums(logits, target, True, activation, ignore_index))


def _jaccard_sums_impl(logits, target, squared, activation, ignore_index, backend):
    return _jaccard_backend(logits, target, activation, ignore_index, backend).jaccard_sums(
        logits, target, squared, activation, ignore_index)


def _jaccard_sums_backward_impl(grad_sums, logits, target, squared, activation, ignore_index, backend):
    return _jaccard_backend(logits, target, activation, ignore_index, backend, "backward").jaccard_sums_backward(
        grad_sums.contiguous(), logits, target, squared, activation, ignore_index)


@torch.library.custom_op("seg3d_fast::jaccard_sums", mutates_args=())
def _jaccard_sums(logits: Tensor, target: Tensor, squared: bool, activation: str, ignore_index: Optional[int],
                  backend: str) -> Tensor:
    return _jaccard_sums_impl(logits, target, squared, activation, ignore_index, backend)


@_jaccard_sums.register_fake
def _(logits, target, squared, activation, ignore_index, backend):
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return logits.new_empty((logits.shape[0], logits.shape[1], 3), dtype=dtype)


@torch.library.custom_op("seg3d_fast::jaccard_sums_backward", mutates_args=())
def _jaccard_sums_backward(grad_sums: Tensor, logits: Tensor, target: Tensor, squared: bool, activation: str,
                           ignore_index: Optional[int], backend: str) -> Tensor:
    grad = _jaccard_sums_backward_impl(grad_sums, logits, target, squared, activation, ignore_index, backend)
    # In the fake kernel's layout (empty_like(logits)): the backends give it contiguous (reference, cuda) or in a
    # channels-last logits' layout (triton), and torch.compile's inductor asserts the fake's strides (channels_last_3d
    # logits failed there on the reference backend). (Only on the traced path: eager autograd takes any layout.)
    strides = torch.empty_like(logits, device="meta").stride()
    if grad.stride() != strides:
        grad = torch.empty_strided(grad.shape, strides, dtype=grad.dtype, device=grad.device).copy_(grad)
    return grad


@_jaccard_sums_backward.register_fake
def _(grad_sums, logits, target, squared, activation, ignore_index, backend):
    return torch.empty_like(logits)


def _jaccard_setup_context(ctx, inputs, output):
    logits, target, squared, activation, ignore_index, backend = inputs
    ctx.save_for_backward(logits, target)
    ctx.args = (squared, activation, ignore_index, backend)


def _jaccard_grads(ctx, grad_sums, backward_fn):
    _refuse_batched_gradient(grad_sums, "jaccard_loss's backward")
    logits, target = ctx.saved_tensors
    grad = backward_fn(grad_sums, logits, target, *ctx.args) if ctx.needs_input_grad[0] else None
    return grad, None, None, None, None, None


_jaccard_sums.register_autograd(lambda ctx, grad_sums: _jaccard_grads(ctx, grad_sums, _jaccard_sums_backward),
                                setup_context=_jaccard_setup_context)


class _JaccardSumsEager(torch.autograd.Function):
    """The eager path of jaccard_sums (see _Conv3dPReLUEager)."""

    @staticmethod
    def forward(ctx, *inputs_and_label_check):
        *inputs, ctx.label_check = inputs_and_label_check
        sums = _jaccard_sums_impl(*inputs)
        _jaccard_setup_context(ctx, inputs, sums)
        return sums

    @staticmethod
    @_differentiable_once  # the backends' backward kernels have no derivative of their own
    def backward(ctx, grad_sums):
        grads = _jaccard_grads(ctx, grad_sums, _jaccard_sums_backward_impl)
        if ctx.label_check is not None:  # after the launch (see _JaccardLossReduced.backward)
            ctx.label_check()
        return *grads, None


def _check_jaccard_args(logits, target, activation, class_weights, ignore_index, reduction, smooth, squared,
                        include_background, per_sample):
    if not isinstance(logits, Tensor) or logits.dim() < 3 or logits.dim() > 5:
        raise ValueError("logits must be a tensor (N, C, *spatial) with 1 to 3 spatial dims; got "
                         + _describe(logits))
    if logits.numel() == 0:
        raise ValueError(f"logits has no elements (shape {tuple(logits.shape)}): the loss needs at least one sample, "
                         "class and voxel")
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral)):
        raise TypeError(f"ignore_index must be an int label value or None; got {ignore_index!r}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be a floating-point tensor; got dtype {logits.dtype}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a tensor; got {type(target).__name__}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits is on {logits.device}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}; got {activation!r}")
    n, c = logits.shape[:2]
    class_weights = _check_loss_options(c, logits.device, smooth, class_weights, reduction,
                                        squared=squared, include_background=include_background, per_sample=per_sample)
    if activation == "softmax" and c < 2:
        raise ValueError("logits has 1 channel: softmax over one class is constant; use activation='sigmoid'")
    if target.dtype.is_floating_point:
        if target.shape != logits.shape:
            raise ValueError(f"target of class probabilities must have the logits' shape {tuple(logits.shape)}; "
                             f"got {tuple(target.shape)}")
        if ignore_index is not None:
            raise ValueError("ignore_index applies to integer label maps only; target holds probabilities")
    elif target.dtype in (torch.bool, torch.complex64, torch.complex128):
        raise TypeError(f"target must be an integer label map or float probabilities; got dtype {target.dtype}")
    else:
        expected = (n, *logits.shape[2:])
        if tuple(target.shape) != expected:
            raise ValueError(f"target label map must have shape (N, *spatial) = {expected} to match logits "
                             f"{tuple(logits.shape)}; got {tuple(target.shape)}")
    return class_weights


def _check_loss_options(c, device, smooth, class_weights, reduction, **flags):
    """The loss's options (jaccard_loss and jaccard_from_sums) for C classes -> class_weights as a tensor or None."""
    for name, value in flags.items():
        if not isinstance(value, bool):  # ('no' or None would pass as a truth value)
            raise TypeError(f"{name} must be a bool; got {value!r}")
    # (under torch.compile(dynamic=True) dynamo may hand smooth over as a SymFloat / SymInt, which math.isfinite cannot
    # take: the comparisons below work on it and on a number alike, and guard on its value)
    if isinstance(smooth, bool) or not isinstance(smooth, (numbers.Real, torch.SymFloat, torch.SymInt)) \
            or not (0 <= smooth < math.inf):  # (NaN fails every comparison)
        raise ValueError(f"smooth must be a number >= 0 (finite); got {smooth!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if not flags["include_background"] and c < 2:
        raise ValueError("include_background=False leaves no class to score: there is only one class (the loss "
                         "would be the mean of nothing, NaN)")
    if class_weights is not None:
        if not isinstance(class_weights, Tensor):
            try:
                class_weights = torch.as_tensor(class_weights, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(f"class_weights must be a tensor or a sequence of {c} numbers; got "
                                f"{class_weights!r}") from e
        if class_weights.dtype.is_complex or class_weights.dtype == torch.bool:
            raise TypeError(f"class_weights must hold real numbers; got dtype {class_weights.dtype}")
        if class_weights.device.type == "meta" and device.type != "meta":
            raise ValueError(f"class_weights is on meta (no data) but the loss is computed on {device}")
        if class_weights.shape != (c,):
            raise ValueError(f"class_weights must have one weight per class, shape ({c},); "
                             f"got {tuple(class_weights.shape)}")
        # (values on a GPU are not read: that would wait for it every call; nor under torch.compile, where a check of
        # values is data-dependent control flow, a graph break, as jaccard_loss's label check is skipped there)
        if class_weights.device.type == "cpu" and not torch.compiler.is_compiling():
            w = class_weights.detach().double()
            if not (w.isfinite().all() and (w >= 0).all() and w.sum() > 0):
                raise ValueError(f"class_weights must be finite, >= 0 and not all 0; got {w.tolist()}")
            if reduction == "mean" and not flags["include_background"] and not w[1:].sum() > 0:  # mean: 0 / 0
                raise ValueError(f"class_weights of the scored classes are all 0 (include_background=False leaves "
                                 f"out class 0's weight): the weighted mean would be NaN; got {w.tolist()}")
    return class_weights


_WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)


def _label_map(target, ignore_index):
    """(label map, ignore_index) as the backends take them, and what a label-range error adds about ignore_index.
    uint16/32/64 labels (few torch ops take them: the reference's range check had no kernel) become int64. An
    ignore_index that the labels' dtype cannot hold matches no voxel: None (torch compares a uint8 map with -1 as with
    255, an int8 one with 255 as with -1, so the reference ignored those labels where the kernels, comparing values,
    reported them out of range)."""
    if target.dtype.is_floating_point:
        return target, ignore_index, ""
    note = ""
    if target.dtype in _WIDE_UNSIGNED:
        target = target.long()
    if ignore_index is not None:
        info = torch.iinfo(target.dtype)
        if not info.min <= ignore_index <= info.max:
            note = f" (ignore_index={ignore_index} cannot occur in a {target.dtype} label map: no voxel was ignored)"
            ignore_index = None
    return target, ignore_index, note


def _label_range_check(logits, target, ignore_index, label_range=None, defer=None, note=""):
    """Checks that the labels lie in [0, C) (ignore_index voxels aside). In training on a GPU the (min, max) is
    copied asynchronously and the returned function checks it in backward, after the gradient kernel is launched and
    before autograd receives the gradient: a check here would stall the CPU until the whole forward pass has run. Elsewhere it checks now and returns None.
    label_range: the (least, greatest) counted label where a kernel found it already (else computed here);
    defer: _defer_label_check's answer, where it was asked outside an autograd.Function (grad mode is off inside);
    note: _label_map's word on an ignore_index the labels cannot hold, for the error.
    (Out-of-range labels are memory-safe in every backend: they match no class.)"""
    # (none while torch.compile or torch.jit.trace records the op: a value read on the host is not recorded; under
    # trace it gave an aten::bitwise_or(Tensor, bool) that failed an internal assert of TorchScript's alias analysis)
    if target.dtype.is_floating_point or target.numel() == 0 or _tracing() or \
            target.device.type == "meta":  # (meta tensors: no values)
        return None
    c = logits.shape[1]
    if label_range is None:
        counted = target if ignore_index is None else torch.where(target == ignore_index, 0, target)
        label_range = torch.stack(torch.aminmax(counted))

    def out_of_range(lo_hi):  # (least, greatest): Python ints here, a device tensor in a captured graph
        return (lo_hi[0] < 0) | (lo_hi[1] >= c)

    def check(lo_hi):
        lo, hi = (int(v) for v in lo_hi.tolist())  # (float64 when read after a graph's replay)
        if out_of_range((lo, hi)):
            raise ValueError(f"target labels must lie in [0, {c - 1}] for {c} classes"
                             + (f" (or equal ignore_index={ignore_index})" if ignore_index is not None else "")
                             + f"; found values in [{lo}, {hi}]{note}")

    checks = graphs.active_checks()
    if checks is not None:  # read after each replay of the graph being captured
        checks.add(label_range, check, out_of_range)
        return None
    if _defer_label_check(logits) if defer is None else defer:
        read = _read_later(label_range)
        return lambda: check(read())
    check(label_range)
    return None


def _defer_label_check(logits) -> bool:
    return logits.device.type == "cuda" and logits.requires_grad and torch.is_grad_enabled()


def jaccard_from_sums(sums: Tensor, *, smooth: float = 1e-5, class_weights: Optional[Tensor] = None,
                      include_background: bool = True, per_sample: bool = False, reduction: str = "mean") -> Tensor:
    """Loss from the (N, C, 3) sums [sum p*t, sum p^2|p, sum t^2|t]: L = 1 - (I + s) / (P + T - I + s).

    per_sample=False pools the sums over the batch (one ratio per class); True takes one ratio per (sample, class).
    reduction "none" returns those ratios' losses, (C,) or (N, C); "mean" weights classes by class_weights.
    """
    if not isinstance(sums, Tensor) or sums.dim() != 3 or sums.shape[2] != 3 or 0 in sums.shape:
        raise ValueError(f"sums must be a tensor (N, C, 3) of [sum p*t, sum p^2 | p, sum t^2 | t] per sample and "
                         f"class (N, C >= 1); got {_describe(sums)}")
    if sums.dtype not in FLOAT_DTYPES:
        raise TypeError(f"sums must be a floating-point tensor; got dtype {sums.dtype}")
    smooth = _python_scalar(smooth)
    class_weights = _check_loss_options(sums.shape[1], sums.device, smooth, class_weights, reduction,
                                        include_background=include_background, per_sample=per_sample)
    _refuse_func_transforms()
    return _loss_from_sums(sums, smooth=float(smooth), class_weights=class_weights,
                           include_background=include_background, per_sample=per_sample, reduction=reduction)


def _loss_from_sums(sums, *, smooth=1e-5, class_weights=None, include_background=True, per_sample=False,
                    reduction="mean"):
    """jaccard_from_sums on checked arguments."""
    if not per_sample:
        sums = sums.sum(0, keepdim=True)
    if torch.jit.is_tracing():  # the formula as torch ops (the autograd.Function would be a Python call in the
        # trace, which torch.jit.save cannot write)
        inter, p_sum, t_sum = sums.unbind(-1)
        loss = 1 - (inter + smooth) / (p_sum + t_sum - inter + smooth)
    else:
        loss = _JaccardTerms.apply(sums, smooth)
    if not include_background:
        loss = loss[:, 1:]
    if not per_sample:
        loss = loss[0]
    if reduction == "none":
        return loss
    if class_weights is None:  # equal weights: the weighted mean is the plain mean
        return loss.sum() if reduction == "sum" else loss.mean()
    weights = class_weights.to(device=loss.device, dtype=loss.dtype)[0 if include_background else 1:]
    weighted = loss * weights
    if reduction == "sum":
        return weighted.sum()
    return weighted.sum(-1).div(weights.sum()).mean()


class _JaccardTerms(torch.autograd.Function):
    """1 - (I + s) / (P + T - I + s) per (row, class) from (rows, C, 3) sums [I, P, T], its gradient written out:
    a handful of ops each way instead of an autograd node per elementwise op (on a GPU the loss runs at the host's
    pace: its kernels stream the volume in microseconds)."""

    @staticmethod
    def forward(ctx, sums, smooth):
        inter, p_sum, t_sum = sums.unbind(-1)
        num = inter + smooth
        den = torch.add(p_sum, t_sum).sub_(inter).add_(smooth)
        ctx.save_for_backward(num, den)
        return torch.rsub(num / den, 1)

    @staticmethod
    @_differentiable_once  # num and den are saved without their graph: a second derivative would miss their terms
    def backward(ctx, grad):
        num, den = ctx.saved_tensors
        # no den * den: with smooth=0 it underflows for den < ~1e-19 (float32) and grad / 0 * num gave inf * 0 = NaN
        # where the exact gradient is finite (an absent class, num = 0, predicted with a tiny P)
        a = grad / den
        d_pt = a * (num / den)  # dL/dP = dL/dT = (I + s) / den^2
        d_i = (a + d_pt).neg_()  # dL/dI = -(den + I + s) / den^2
        return torch.stack([d_i, d_pt, d_pt], -1), None


def jaccard_loss(logits: Tensor, target: Tensor, *, squared: bool = True, activation: str = "softmax",
                 smooth: float = 1e-5, class_weights: Optional[Tensor] = None, include_background: bool = True,
                 per_sample: bool = False, ignore_index: Optional[int] = None, reduction: str = "mean",
                 backend: Optional[str] = None) -> Tensor:
    """Jaccard loss of softmax/sigmoid(logits) against an integer label map (N, *spatial) or class probabilities.

    squared=True is the Tanimoto form of the paper's code, 1 - sum p t / (sum p^2 + sum t^2 - sum p t), per class;
    squared=False the plain soft Jaccard (sum p, sum t). The target gets no gradient.
    Labels outside [0, C) (other than ignore_index) raise ValueError; when training on a GPU that error comes from
    backward, so that the forward never waits for the GPU.
    """
    smooth, ignore_index = _python_scalar(smooth), _python_scalar(ignore_index)
    class_weights = _check_jaccard_args(logits, target, activation, class_weights, ignore_index, reduction, smooth,
                                        squared, include_background, per_sample)
    _check_backend(backend)
    _refuse_func_transforms()
    smooth = float(smooth)  # (an int)
    target, ignore_index, ignore_note = _label_map(target, ignore_index)
    while logits.dim() < 5:  # 1-D/2-D inputs: trailing singleton spatial dims (views, no copy)
        logits, target = logits.unsqueeze(-1), target.unsqueeze(-1)
    if _tracing():
        sums = _jaccard_sums(logits, target, squared, activation, ignore_index, backend or "")
    else:
        module = _jaccard_backend(logits, target, activation, ignore_index, backend or "")
        # (the fused loss gives class_weights no gradient: weights being learned take the sums path)
        learned_weights = class_weights is not None and class_weights.requires_grad and torch.is_grad_enabled()
        if reduction != "none" and hasattr(module, "jaccard_loss_reduced") and not learned_weights:
            weights = _loss_weights(class_weights, include_background, logits.shape[1], logits.device)
            return _JaccardLossReduced.apply(logits, target, weights, module, squared, activation, ignore_index,
                                             smooth, per_sample, reduction == "mean", _defer_label_check(logits),
                                             ignore_note)
        label_check = _label_range_check(logits, target, ignore_index, note=ignore_note)
        sums = _JaccardSumsEager.apply(logits, target, squared, activation, ignore_index, backend or "", label_check)
    return _loss_from_sums(sums, smooth=smooth, class_weights=class_weights, include_background=include_background,
                           per_sample=per_sample, reduction=reduction)


@functools.lru_cache(maxsize=64)
def _unit_weights(classes, include_background, device):
    """The (C,) float32 class weights of the unweighted loss (0 for a left-out background), made once per device."""
    return backends.device_table([0.0 if k == 0 and not include_background else 1.0 for k in range(classes)],
                                 torch.float32, device)


def _loss_weights(class_weights, include_background, classes, device):
    """The per-class weights of backends' jaccard_loss_reduced (backends/API.md)."""
    if class_weights is None:
        return _unit_weights(classes, include_background, device)
    weights = class_weights.to(device=device, dtype=torch.float32)
    return weights if include_background else torch.cat([weights.new_zeros(1), weights[1:]])


class _JaccardLossReduced(torch.autograd.Function):
    """The loss on a backend that fuses it (jaccard_loss_reduced: two launches forward, one backward, the label
    range found by its kernel): the sums path's dozen small ops each way cost more host time than its kernels take
    on a GPU. Same loss and gradient as jaccard_from_sums of the sums; forward and backward both on the backend
    chosen for the forward (the backward needs its own saved sums)."""

    @staticmethod
    def forward(ctx, logits, target, weights, module, squared, activation, ignore_index, smooth, per_sample, mean,
                defer_label_check, ignore_note):
        options = (squared, activation, ignore_index, smooth, per_sample, mean)
        loss, sums, label_range = module.jaccard_loss_reduced(logits, target, squared, activation, ignore_index,
                                                               smooth, weights, per_sample, mean)
        ctx.label_check = _label_range_check(logits, target, ignore_index, label_range, defer_label_check,
                                             ignore_note)
        ctx.save_for_backward(logits, target, sums, weights)
        ctx.module, ctx.options = module, options
        return loss

    @staticmethod
    @_differentiable_once
    def backward(ctx, grad):
        _refuse_batched_gradient(grad, "jaccard_loss's backward")
        logits, target, sums, weights = ctx.saved_tensors
        squared, activation, ignore_index, smooth, per_sample, mean = ctx.options
        grad_logits = None
        if ctx.needs_input_grad[0]:
            grad_logits = ctx.module.jaccard_loss_reduced_backward(grad, sums, weights, logits, target, squared,
                                                                   activation, ignore_index, smooth, per_sample, mean)
        # Read after the launch (the kernels are memory-safe for any label): the GPU has the gradient kernel queued
        # while the host waits for the forward's copy of the label range. It raises before autograd gets a gradient.
        if ctx.label_check is not None:
            ctx.label_check()
        return (grad_logits,) + (None,) * 11


# ---------------------------------------------------------------------------------------------------------------------
# transposed conv (kernel 2, stride 2) + PReLU + skip sum, recomputed in backward
UPCONV_BACKENDS = ("reference", "triton")


def _upconv_backend(x, weight, bias, alpha, skip, backend: str) -> str:
    """The backend for this upsampling block ("" = choose: triton or reference, measured once per shape on a GPU;
    the cuda backend has no kernel for it). The backward runs on the forward's backend."""
    signature = ("upconv_prelu_add", "forward", backend, os.environ.get(backends.ENV_BACKEND), x.device, x.dtype,
                 _shape(x), _shape(weight), _shape(bias), _shape(alpha), _shape(skip))
    name = _backend_cache.get(signature)
    if name is None:
        args = (x, weight, bias, alpha, skip)
        key = f"{str(x.dtype).removeprefix('torch.')}-ci{weight.shape[0]}-co{weight.shape[1]}"
        bench = backends.Bench("upconv_prelu_add", args, lambda m: m.upconv_prelu_add_forward(*args))
        env = backends.env_backend()
        # SEG3D_FAST_BACKEND=cuda forces the conv blocks; the upsampling then runs on the best other backend
        requested = backend or (env if env in UPCONV_BACKENDS else None)
        name = _backend_cache[signature] = backends.select("upconv_prelu_add", requested, x.device, key, args, bench,
                                                           use_env=False)
    return name


class _UpConvPReLUAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, alpha, skip, backend):
        # torch.compile traces the reference's torch ops (a graph of its own kernels, no launcher to trace)
        name = "reference" if torch.compiler.is_compiling() else _upconv_backend(x, weight, bias, alpha, skip, backend)
        out = _backend_module(name).upconv_prelu_add_forward(x, weight, bias, alpha, skip)
        ctx.save_for_backward(x, weight, bias, alpha)
        ctx.has_skip, ctx.backend = skip is not None, name
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # The reference's backward is made of differentiable torch ops (z is recomputed from x): twice differentiable.
        # A kernel backend's is not: a second derivative is an error there, not a silently partial one.
        return (_upconv_grads if ctx.backend == "reference" else _upconv_grads_once)(ctx, grad_out)


def _upconv_grads(ctx, grad_out):
    _refuse_batched_gradient(grad_out, f"upconv_prelu_add's backward on the {ctx.backend} backend", ctx.backend)
    x, weight, bias, alpha = ctx.saved_tensors
    need_x, need_w, need_b, need_alpha, need_skip = ctx.needs_input_grad[:5]
    grad_x, grad_w, grad_b, grad_alpha = _backend_module(ctx.backend).upconv_prelu_add_backward(
        grad_out, x, weight, bias, alpha, (need_x, need_w, need_b, need_alpha))
    return grad_x, grad_w, grad_b, grad_alpha, (grad_out if need_skip and ctx.has_skip else None), None


_upconv_grads_once = _differentiable_once(_upconv_grads)


def _backend_module(name):
    return _reference if name == "reference" else backends.load(name)


def upconv_prelu_add(x: Tensor, weight: Tensor, bias: Optional[Tensor], alpha: Tensor,
                     skip: Optional[Tensor] = None, *, backend: Optional[str] = None) -> Tensor:
    """prelu(conv_transpose3d(x, weight, bias, stride=2), alpha) + skip; weight (C_in, C_out, 2, 2, 2), alpha (1,)
    or (C_out,). backend: "reference" | "triton" | None (the faster that can run it).

    Saves only x (1/8 of the output's voxels) and recomputes the transposed conv in backward (the triton backend
    in registers: neither z nor its gradient is ever stored).
    """
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor) or x.dim() != 5 or weight.dim() != 5 \
            or tuple(weight.shape[2:]) != (2, 2, 2):
        raise ValueError(f"x must be a 5-D tensor (N, C_in, D, H, W) and weight (C_in, C_out, 2, 2, 2); got x "
                         f"{_describe(x)}, weight {_describe(weight)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64; got {x.dtype}")
    if weight.shape[0] != x.shape[1]:
        raise ValueError(f"channel mismatch: x has {x.shape[1]} channels but weight expects {weight.shape[0]}")
    for name, t in (("bias", bias), ("alpha", alpha), ("skip", skip)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    _check_backend(backend)
    dtype = _autocast_dtype(x.device)
    if dtype is not None:
        x, skip = _cast(dtype, x, skip)
        weight, bias, alpha = _cast_params(dtype, weight, bias, alpha)
    c_out = weight.shape[1]
    if alpha is None or alpha.dim() != 1 or alpha.numel() not in (1, c_out):
        raise ValueError(f"alpha must have shape (1,) or ({c_out},) (C_out={c_out}); got "
                         f"{None if alpha is None else tuple(alpha.shape)}")
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"bias must have shape ({c_out},); got {tuple(bias.shape)}")
    _check_params(x, weight, bias, alpha)
    _check_same("skip", skip, x)
    out_shape = (x.shape[0], c_out, *[2 * s for s in x.shape[2:]])
    if skip is not None and tuple(skip.shape) != out_shape:
        raise ValueError(f"skip must have the output's shape {out_shape}; got {tuple(skip.shape)}")
    _refuse_func_transforms()
    if torch.jit.is_tracing():  # the reference's torch ops, recorded with their own autograd (the autograd.Function
        # would be a Python call in the trace, which torch.jit.save cannot write)
        return _reference.upconv_prelu_add_forward(x, weight, bias, alpha, skip)
    return _UpConvPReLUAdd.apply(x, weight, bias, alpha, skip, backend or "")
