"""CUDA-graph training steps: the forward, loss and backward captured once and replayed, so that a step costs the host
one replay instead of a Python call and a few launches per layer (eager, the fused network runs at the host's pace:
README, performance).

The fused ops check two things on the host in eager mode, from an asynchronous copy: that every PReLU alpha > 0 (the
conv backward then recovers the pre-activation from the saved output; otherwise it recomputes it) and that the labels
lie in [0, C). A graph cannot read the host mid-replay, so while checks are recorded (recording_checks) the ops
instead record the device values these checks read, and the conv backward takes alpha > 0. CudaGraphStep reads the
recorded values after each replay (one small copy): with an optimizer that takes found_inf (fused Adam, AdamW, SGD)
and no grad scaler, the replay also tests them on the device, the optimizer skips a step that failed, and the host
reads them at the next call or settle(); with others, before the optimizer runs. A step whose alpha assumption
failed is rerun eagerly (exact for any alpha) and graphs stay off from then on; labels out of range raise ValueError
as in eager mode, with nothing applied.

    step = CudaGraphStep(model, loss_fn, optimizer, autocast_dtype=torch.bfloat16)
    for x, y in loader:
        loss, logits = step(x.cuda(), y.cuda())  # the graph's own output tensors: read them before the next call
    step.settle()  # the last replay's checks (its rerun, or the labels' error), before the model is used or saved
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor


class AlphaAssumptionError(RuntimeError):
    """A replayed backward recovered the pre-activation from the output (alpha above ops._RECOVERABLE_ALPHA, 2^-7 in
    fp16) where some alpha did not allow it: its gradients are not exact."""


class CapturedChecks:
    """Device values recorded while a graph was captured, each with the host check that reads it after a replay and
    the same test on the device (`fails`), which lets an optimizer skip a step whose check failed before the host
    has read it (CudaGraphStep)."""

    def __init__(self):
        self._values: list[Tensor] = []
        self._checks: list[Callable[[Tensor], None]] = []
        self._fails: list[Callable[[Tensor], Tensor]] = []
        self.packed: Optional[Tensor] = None
        self.failed: Optional[Tensor] = None

    def add(self, values: Tensor, check: Callable[[Tensor], None], fails: Callable[[Tensor], Tensor]) -> None:
        """check(values on the CPU, float64, original shape) raises when they break the op's assumption;
        fails(values as recorded, on the device) is a bool tensor, True where check would raise."""
        self._values.append(values.detach())
        self._checks.append(check)
        self._fails.append(fails)

    def __len__(self):
        return len(self._values)

    def pack(self) -> Optional[Tensor]:
        """All values in one float64 device tensor, and `failed`: 1.0 where a check failed, else 0.0 (a float32
        scalar, as an optimizer's found_inf). Call it inside the capture: each replay refills both."""
        if self._values:
            self.packed = torch.cat([v.reshape(-1).to(torch.float64) for v in self._values])
            self.failed = torch.stack([f(v).any() for f, v in zip(self._fails, self._values)]).any().float()
        return self.packed

    def verify(self, host: Optional[Tensor] = None) -> None:
        """Runs every check on pack()'s values: `host`, a copy of them on the CPU, else a copy made now (waiting
        for the work before it)."""
        if self.packed is None:
            return
        host = self.packed.cpu() if host is None else host
        start = 0
        for values, check in zip(self._values, self._checks):
            check(host[start:start + values.numel()].reshape(values.shape))
            start += values.numel()


_active: Optional[CapturedChecks] = None


def active_checks() -> Optional[CapturedChecks]:
    """The CapturedChecks the fused ops record into, inside recording_checks(); else None."""
    return _active


@contextlib.contextmanager
def recording_checks():
    """The fused ops record their host checks' values instead of reading them (see the module docstring)."""
    global _active
    if _active is not None:
        raise RuntimeError("recording_checks() is already active: graphs are captured one at a time")
    _active = CapturedChecks()
    try:
        yield _active
    finally:
        _active = None


def alpha_unrecoverable(least_alpha: Tensor, threshold: float = 0.0) -> Tensor:
    """check_alpha_recoverable's test, on any device: True where it raises (NaN included)."""
    return ~(least_alpha > threshold)


def check_alpha_recoverable(least_alpha: Tensor, threshold: float = 0.0) -> None:
    if alpha_unrecoverable(least_alpha, threshold):
        value = float(least_alpha)
        raise AlphaAssumptionError(f"a PReLU alpha is {value:g} (<= {threshold:g}): the replayed backward took alpha > "
                                   f"{threshold:g}, which recovers the pre-activation from the layer's output; rerun "
                                   "the step eagerly")


def train_step(model, loss_fn, optimizer, x: Tensor, y: Tensor, autocast_dtype=None, scaler=None):
    """One eager training step: forward (under autocast when autocast_dtype is set), loss, backward, optimizer.
    Returns (loss, logits)."""
    logits, loss = forward_backward(model, loss_fn, optimizer, x, y, autocast_dtype, scaler)
    _optimizer_step(optimizer, scaler)
    return loss.detach(), logits.detach()


def forward_backward(model, loss_fn, optimizer, x, y, autocast_dtype=None, scaler=None, cache_casts=True):
    """train_step without the optimizer step: gradients set (the optimizer's zeroed first). -> (logits, loss)"""
    optimizer.zero_grad(set_to_none=True)
    # a graph must not reuse autocast's cached weight casts (they are made once, outside it): cache_casts=False there
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None,
                        cache_enabled=cache_casts):
        logits = model(x)
        loss = loss_fn(logits, y)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return logits, loss


def _optimizer_step(optimizer, scaler):
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def _check_devices(x, y):
    if x.device.type != "cuda" or y.device != x.device:
        raise ValueError(f"CudaGraphStep needs x and y on one CUDA device; got x on {x.device}, y on {y.device}")


class CudaGraphStep:
    """A training step (forward, loss, backward; then the optimizer, eagerly) whose forward and backward are one
    CUDA graph, replayed on every call with inputs of the captured shapes.

    Calls run eagerly until `warmup` calls in a row had inputs of one shape, dtype and layout (they tune kernels,
    choose backends and fill the ops' caches for them, which a capture must not do); the next such call captures
    and replays. Calls with inputs of other shapes or dtypes than the captured ones run eagerly (counted in
    eager_steps); so does every call once a replay's alpha check failed or a capture failed (disabled says why).
    Gradients are the graph's own tensors, put back into each parameter's .grad before the optimizer runs.
    autocast_dtype: the autocast dtype (None: no autocast); scaler: a torch.amp.GradScaler for fp16. Single-process
    only: a DistributedDataParallel model is refused (its gradient all-reduce is not captured here).

    With an optimizer that takes a found_inf flag (fused Adam, AdamW and SGD: `_step_supports_amp_scaling`) and no
    scaler, the host waits for no replay: the replay's checks also run on the device and the optimizer skips a step
    whose check failed; the host reads them at the next call (or settle()), by when the replay is long done, and then
    reruns that step eagerly (alpha) or raises (labels). Otherwise each call waits for its replay's checks before the
    optimizer runs. Call settle() before reading or saving the model after the last step.
    """

    def __init__(self, model: torch.nn.Module, loss_fn, optimizer: torch.optim.Optimizer, *,
                 autocast_dtype: Optional[torch.dtype] = None, scaler=None, warmup: int = 3):
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise ValueError("CudaGraphStep: model is DistributedDataParallel; CUDA-graph steps run on one GPU "
                             "(train without --cuda-graph under torchrun)")
        if warmup < 1:
            raise ValueError(f"CudaGraphStep: warmup must be >= 1 (kernels tune and caches fill on eager steps), "
                             f"got {warmup}")
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.autocast_dtype, self.scaler, self.warmup = autocast_dtype, scaler, warmup
        self.eager_steps = self.replays = 0
        self.disabled: Optional[str] = None
        self._graph = None
        self._unread = None  # the last replay's checks, copied to the host, not yet read (see settle)
        self._warm = (None, 0)  # (input signature, eager steps in a row with it)

    def __call__(self, x: Tensor, y: Tensor):
        """One training step on (x, y). Returns (loss, logits): after a replay, the graph's output tensors, which
        the next call overwrites."""
        _check_devices(x, y)
        self.settle()
        signature = (x.shape, x.dtype, x.stride(), y.shape, y.dtype, y.stride())
        if self.disabled is None and self._graph is None and self._warm[0] == signature and \
                self._warm[1] >= self.warmup:
            try:
                self._capture(x, y)
            except RuntimeError as e:  # a capture refused (an op or the driver): train on eagerly, as it warms up
                self._off(f"the capture failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        if self._graph is None or not self._fits(x, y):
            if self._graph is None:
                warm_signature, count = self._warm
                self._warm = (signature, count + 1 if signature == warm_signature else 1)
            return self._eager(x, y)
        self._static_x.copy_(x)
        self._static_y.copy_(y)
        self._graph.replay()
        self.replays += 1
        for p, g in self._grads:  # .grad may have been reset (zero_grad) since the capture: the graph writes these
            p.grad = g
        if self._skips_failed_steps():
            from seg3d_fast import ops

            self._unread = ops._read_later(self._checks.packed)  # (copied before the optimizer's work is queued)
            self.optimizer.found_inf, self.optimizer.grad_scale = self._checks.failed, None
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf, self.optimizer.grad_scale
        else:
            try:
                self._checks.verify()  # waits for the replay: the optimizer must not take unverified gradients
            except AlphaAssumptionError as e:
                return self._rerun_eagerly(e)
            _optimizer_step(self.optimizer, self.scaler)
        return self._loss, self._logits

    def settle(self) -> None:
        """Reads the last replay's checks if they are not read yet (waiting for that replay only): a failed alpha
        check reruns that step eagerly (its optimizer step was skipped) and turns graphs off; labels out of range
        raise ValueError (nothing was applied)."""
        read, self._unread = self._unread, None
        if read is not None:
            try:
                self._checks.verify(read())
            except AlphaAssumptionError as e:
                self._rerun_eagerly(e)

    def _skips_failed_steps(self):
        return (self.scaler is None and self._checks.failed is not None
                and getattr(self.optimizer, "_step_supports_amp_scaling", False))

    def _rerun_eagerly(self, error):
        """The last replay's step again, eagerly (exact for any alpha), its optimizer step not yet applied."""
        x, y = self._static_x, self._static_y
        self.replays -= 1
        self._off(f"replay {self.replays + 1}: {error}")
        return self._eager(x, y)

    def _eager(self, x, y):
        self.eager_steps += 1
        return train_step(self.model, self.loss_fn, self.optimizer, x, y, self.autocast_dtype, self.scaler)

    def _fits(self, x, y):
        sx, sy = self._static_x, self._static_y
        return (x.shape == sx.shape and x.dtype == sx.dtype and x.device == sx.device
                and y.shape == sy.shape and y.dtype == sy.dtype)

    def _capture(self, x, y):
        # the inputs keep the caller's layout (channels-last stays channels-last: the kernels chosen in warmup)
        self._static_x, self._static_y = x.clone(), y.clone()
        graph = torch.cuda.CUDAGraph()
        with recording_checks() as checks, torch.cuda.graph(graph):
            logits, loss = forward_backward(self.model, self.loss_fn, self.optimizer, self._static_x,
                                            self._static_y, self.autocast_dtype, self.scaler, cache_casts=False)
            checks.pack()
        self._graph, self._checks = graph, checks
        self._logits, self._loss = logits.detach(), loss.detach()
        self._grads = [(p, p.grad) for group in self.optimizer.param_groups for p in group["params"]
                       if p.grad is not None]

    def _off(self, why):
        self.disabled = why
        warnings.warn(f"CudaGraphStep: {why}; this and later steps run eagerly", RuntimeWarning, stacklevel=3)
        self._release()

    def _release(self):
        self._graph = self._checks = self._logits = self._loss = None
        self._static_x = self._static_y = None
        self._grads = []
