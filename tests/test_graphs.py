"""CUDA-graph training steps (seg3d_fast.graphs): the checks the fused ops record instead of reading while a graph is
captured (on the CPU: the same ops with recording_checks on), and CudaGraphStep against eager steps (GPU)."""
import contextlib
import copy

import pytest
import torch

import seg3d_fast as sf
from seg3d_fast import graphs
from seg3d_fast.models import Seg3DNet
from helpers import rel_err
from test_ops import make_conv_args, run_with_grads, skip_unless_usable


def _conv_grads(negative_alpha, backend="reference", device="cpu"):
    x, w, b, alpha, r, stride, rf = make_conv_args(torch.float32, 3, 2, "channel", "before", "channels_last",
                                                   negative_alpha=negative_alpha, device=device)
    fused = lambda *a: sf.conv3d_prelu(*a, stride=stride, residual_first=rf, backend=backend)  # noqa: E731
    g = torch.randn(sf.ops.conv_output_shape(x.shape, w.shape, stride), device=device) + 1
    return run_with_grads(fused, [x, w, b, alpha, r], g)


def test_recorded_alpha_check_takes_fp16s_recoverable_alpha():
    """In fp16 the replayed backward's assumption is alpha > 2^-7 (ops._RECOVERABLE_ALPHA): a smaller positive alpha
    fails the check after the replay, as the eager backward would have recomputed z."""
    x = torch.randn(2, 3, 4, 5, 6, dtype=torch.float16, requires_grad=True)
    w = (torch.randn(4, 3, 3, 3, 3) * 0.1).half().requires_grad_()
    for alpha, fails in ((1e-3, True), (0.25, False)):
        with graphs.recording_checks() as checks:
            sf.conv3d_prelu(x, w, None, torch.full((4,), alpha, dtype=torch.float16, requires_grad=True),
                            backend="reference").sum().backward()
            checks.pack()
        with pytest.raises(graphs.AlphaAssumptionError, match=r"<= 0.0078125\)") if fails else contextlib.nullcontext():
            checks.verify()
        assert float(checks.failed) == float(fails)  # the same test on the device


@pytest.mark.parametrize("negative_alpha", [False, True])
def test_recorded_alpha_check(negative_alpha):
    """While checks are recorded the conv backward takes alpha > 0 (no host read) and records the least alpha: with
    alpha > 0 its gradients are the eager ones and the check passes; with some alpha <= 0 the check raises."""
    torch.manual_seed(1)
    eager_out, eager_grads = _conv_grads(negative_alpha)
    torch.manual_seed(1)
    with graphs.recording_checks() as checks:
        out, grads = _conv_grads(negative_alpha)
        checks.pack()
    assert len(checks) == 1
    torch.testing.assert_close(out, eager_out, rtol=0, atol=0)
    if negative_alpha:
        with pytest.raises(graphs.AlphaAssumptionError, match=r"PReLU alpha is -?\d.*<= [\d.e+-]+\): the replayed backward"):
            checks.verify()
        # the assumption is what made the gradients differ: the eager backward recomputed the pre-activation
        assert any(not torch.equal(g, e) for g, e in zip(grads, eager_grads) if g is not None)
    else:
        checks.verify()
        for g, e in zip(grads, eager_grads):
            if e is not None:
                torch.testing.assert_close(g, e, rtol=0, atol=0)
    assert float(checks.failed) == float(negative_alpha)  # the same test on the device


def test_recorded_label_check():
    """Labels out of range do not raise while checks are recorded (the graph cannot); the recorded check does, with
    the eager message."""
    logits = torch.randn(2, 5, 3, 4, 5, requires_grad=True)
    labels = torch.randint(0, 5, (2, 3, 4, 5))
    labels[1, 2, 3, 4] = 7
    with graphs.recording_checks() as checks:
        sf.jaccard_loss(logits, labels, backend="reference").backward()
        checks.pack()
    assert len(checks) == 1 and logits.grad is not None
    with pytest.raises(ValueError, match=r"target labels must lie in \[0, 4\] for 5 classes; found values in \[0, 7\]"):
        checks.verify()
    assert float(checks.failed) == 1.0  # the same test on the device
    for labels in (labels.clamp(max=4), labels.clamp(max=4).sub_(1)):  # in range; -1 below it
        with graphs.recording_checks() as checks:
            sf.jaccard_loss(logits, labels, backend="reference").backward()
            checks.pack()
        below = bool(labels.min() < 0)
        with pytest.raises(ValueError, match=r"found values in \[-1, 3\]") if below else contextlib.nullcontext():
            checks.verify()
        assert float(checks.failed) == float(below)


def test_no_host_read_while_recording(monkeypatch):
    """A whole training step (Seg3DNet, Jaccard loss, backward) asks for no host read of device values while checks
    are recorded (on a GPU each would fail the capture); without recording it asks for one per PReLU layer plus the
    label range (so the stand-in below does see the calls)."""
    reads = []
    read_later = sf.ops._read_later
    monkeypatch.setattr(sf.ops, "_read_later", lambda values: reads.append(values.shape) or read_later(values))
    monkeypatch.setattr(sf.ops, "_defer_label_check", lambda logits: logits.requires_grad and torch.is_grad_enabled())
    model = Seg3DNet(2, 3, (4, 8), backend="reference")
    opt = torch.optim.Adam(model.parameters())
    x, y = torch.randn(2, 2, 6, 4, 6), torch.randint(0, 3, (2, 6, 4, 6))
    graphs.forward_backward(model, sf.nn.JaccardLoss(backend="reference"), opt, x, y)
    assert len(reads) == 5 + 1
    reads.clear()
    with graphs.recording_checks() as checks:
        graphs.forward_backward(model, sf.nn.JaccardLoss(backend="reference"), opt, x, y)
    assert reads == [] and len(checks) == 5 + 1


def test_recording_checks_is_not_reentrant():
    with graphs.recording_checks():
        with pytest.raises(RuntimeError, match="already active"):
            with graphs.recording_checks():
                pass
    assert graphs.active_checks() is None


def test_train_step_is_the_eager_step():
    """train_step (eager; CudaGraphStep's warmup and fallback) against the same step written out."""
    torch.manual_seed(0)
    model = Seg3DNet(2, 3, (4, 8), backend="reference")
    twin = copy.deepcopy(model)
    x, y = torch.randn(2, 2, 6, 4, 6), torch.randint(0, 3, (2, 6, 4, 6))
    opt, twin_opt = torch.optim.Adam(model.parameters(), lr=1e-3), torch.optim.Adam(twin.parameters(), lr=1e-3)
    loss_fn = sf.nn.JaccardLoss(backend="reference")
    for _ in range(2):
        loss, logits = graphs.train_step(model, loss_fn, opt, x, y)
        twin_opt.zero_grad()
        twin_logits = twin(x)
        twin_loss = loss_fn(twin_logits, y)
        twin_loss.backward()
        twin_opt.step()
        torch.testing.assert_close(loss, twin_loss.detach(), rtol=0, atol=0)
        torch.testing.assert_close(logits, twin_logits.detach(), rtol=0, atol=0)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_cuda_graph_step_errors():
    model = Seg3DNet(2, 3, (4, 8), backend="reference")
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        graphs.CudaGraphStep(model, sf.nn.JaccardLoss(), opt, warmup=0)
    step = graphs.CudaGraphStep(model, sf.nn.JaccardLoss(), opt)
    with pytest.raises(ValueError, match="needs x and y on one CUDA device; got x on cpu"):
        step(torch.randn(1, 2, 4, 4, 4), torch.zeros(1, 4, 4, 4, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------------------
# on the GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")


def assert_same_training(model, twin, tol=1e-3):
    """Graphed and eager training gave the same weights: relative norm error over all parameters. (Not bitwise:
    the deep-supervision upsampling's backward sums with atomics on a GPU. A graph replaying stale or missing
    gradients is off by ~1e-1 after a few Adam steps.)"""
    ours = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    theirs = torch.cat([p.detach().double().flatten() for p in twin.parameters()])
    assert rel_err(ours, theirs) <= tol


def _twins(backend, dtype, fused=False):
    """fused: PyTorch's fused Adam, which takes found_inf: CudaGraphStep then reads each replay's checks at its next
    call (the optimizer skips a failed step); else each call waits for them."""
    torch.manual_seed(0)  # (4 input channels, 4 classes: the cuda kernels take even channel counts in bf16)
    model = Seg3DNet(4, 4, (8, 16, 32), backend=backend).cuda().to(memory_format=torch.channels_last_3d)
    twin = copy.deepcopy(model)
    return [(m, torch.optim.Adam(m.parameters(), lr=1e-3, fused=fused)) for m in (model, twin)]


def _batches(steps, shape=(2, 4, 12, 16, 8), classes=4):
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(shape, generator=gen).cuda().contiguous(memory_format=torch.channels_last_3d),
             torch.randint(0, classes, (shape[0], *shape[2:]), generator=gen).cuda()) for _ in range(steps)]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True], ids=["adam", "fused_adam"])
def test_cuda_graph_step_matches_eager(backend, dtype, fused, monkeypatch, exact_fp32):
    """Replayed steps give the eager steps' losses and weights (deterministic kernels on both sides), and replay
    after the warmup steps; an input of another shape runs eagerly, and the replays go on after it. Exact fp32: with
    TF32, cuDNN's transposed convs (the cuda backend has no fused upsampling) differed by ~2e-4 between the graphed
    and the eager step (H200, 2026-11-27), as cuDNN may pick another algorithm while capturing."""
    skip_unless_usable(backend)
    monkeypatch.setenv("SEG3D_FAST_DETERMINISTIC", "1")
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    (model, opt), (twin, twin_opt) = _twins(backend, dtype, fused)
    autocast = None if dtype == torch.float32 else dtype
    loss_fn = sf.nn.JaccardLoss(backend=backend)
    step = graphs.CudaGraphStep(model, loss_fn, opt, autocast_dtype=autocast, warmup=2)
    batches = _batches(6)
    odd = _batches(1, shape=(2, 4, 8, 8, 8))[0]
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # (bf16: a flipped rounding of an activation)
    for i, (x, y) in enumerate(batches[:4] + [odd] + batches[4:]):
        loss, logits = step(x, y)
        twin_loss, twin_logits = graphs.train_step(twin, loss_fn, twin_opt, x, y, autocast)
        assert rel_err(loss, twin_loss) <= tol and rel_err(logits, twin_logits) <= tol, f"step {i}"
    step.settle()
    assert (step.replays, step.eager_steps, step.disabled) == (4, 3, None)
    assert_same_training(model, twin)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True], ids=["adam", "fused_adam"])
def test_cuda_graph_step_falls_back_when_alpha_turns_negative(fused):
    """A replay whose backward took alpha > 0 where alpha < 0 is rerun eagerly (warning), and steps stay eager.
    With fused Adam the rerun comes at the next call or settle() (the optimizer skipped the replayed step)."""
    backend = "triton" if sf.backends.available()["triton"] is None else "cuda"
    skip_unless_usable(backend)
    (model, opt), (twin, twin_opt) = _twins(backend, torch.float32, fused)
    loss_fn = sf.nn.JaccardLoss(backend=backend)
    step = graphs.CudaGraphStep(model, loss_fn, opt, warmup=1)
    batches = _batches(4)
    for x, y in batches[:2]:
        step(x, y)
        graphs.train_step(twin, loss_fn, twin_opt, x, y)
    assert step.replays == 1
    for m in (model, twin):
        with torch.no_grad():
            m.enc_second[0].alpha.fill_(-0.2)
    with pytest.warns(RuntimeWarning, match="PReLU alpha is -0.2.*run eagerly"):
        step(*batches[2])
        step.settle()
    graphs.train_step(twin, loss_fn, twin_opt, *batches[2])
    step(*batches[3])
    graphs.train_step(twin, loss_fn, twin_opt, *batches[3])
    assert step.replays == 1 and step.eager_steps == 3 and "replay 2" in step.disabled
    assert_same_training(model, twin)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True], ids=["adam", "fused_adam"])
def test_cuda_graph_step_rejects_bad_labels_before_the_optimizer(fused):
    """Labels out of range raise, and the optimizer takes nothing from that step (with fused Adam the error comes
    at the next call or settle(): the optimizer skipped the step on the device)."""
    backend = "triton" if sf.backends.available()["triton"] is None else "cuda"
    skip_unless_usable(backend)
    (model, opt), _ = _twins(backend, torch.float32, fused)
    step = graphs.CudaGraphStep(model, sf.nn.JaccardLoss(backend=backend), opt, warmup=1)
    batches = _batches(3)
    for x, y in batches[:2]:
        step(x, y)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batches[2]
    with pytest.raises(ValueError, match=r"target labels must lie in \[0, 3\]"):
        step(x, y + 4)
        step.settle()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q), "the optimizer ran on a step whose labels failed the check"


@gpu
@pytest.mark.gpu
def test_capture_outside_recording_checks_says_how():
    backend = "triton" if sf.backends.available()["triton"] is None else "cuda"
    skip_unless_usable(backend)
    x, w, b, alpha, r, stride, rf = make_conv_args(torch.float32, 3, 1, "channel", "none", "channels_last",
                                                   c_out=8, shape=(1, 4, 6, 6, 6), device="cuda")
    x.requires_grad_(True)
    sf.conv3d_prelu(x, w, b, alpha, stride=stride, backend=backend).sum().backward()  # warm: tuned, cached
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="outside seg3d_fast.graphs.recording_checks"):
        with torch.cuda.graph(graph):
            sf.conv3d_prelu(x, w, b, alpha, stride=stride, backend=backend)


@gpu
@pytest.mark.gpu
def test_training_with_cuda_graphs_matches_eager(tmp_path, monkeypatch):
    """`seg3d-fast train --cuda-graph` trains the same weights as without it (deterministic kernels)."""
    pytest.importorskip("nibabel")
    from data_helpers import brain_csv
    from seg3d_fast.train import TrainConfig, train, use_cuda_graph

    monkeypatch.setenv("SEG3D_FAST_DETERMINISTIC", "1")
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    manifest = brain_csv(tmp_path / "data", n_cases=2)
    config = dict(data=str(manifest), epochs=2, features=(4, 8), crop=(16, 16, 16), samples_per_epoch=6, lr=3e-3,
                  progress=False, device="cuda", amp="bf16")
    eager = train(TrainConfig(out=str(tmp_path / "eager"), cuda_graph=False, **config))
    assert use_cuda_graph(TrainConfig(**config), torch.device("cuda"), 1)  # the default, with a --crop on a GPU
    graphed = train(TrainConfig(out=str(tmp_path / "graphed"), cuda_graph=True, **config))
    assert_same_training(graphed, eager)


class _RunOnceGraph:
    """A stand-in for torch.cuda.CUDAGraph on the CPU: the capture runs the step for real (a GPU capture records it
    without running it), and replay() does nothing, so the call that captures sees the step's true results, as it
    does on the GPU, and later calls see that step's results again."""

    def replay(self):
        pass


def _stand_in_graphs(monkeypatch):
    monkeypatch.setattr(graphs, "_check_devices", lambda x, y: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _RunOnceGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph: contextlib.nullcontext())


def test_cuda_graph_step_captures_only_warm_inputs(monkeypatch):
    """The capture waits for `warmup` eager calls in a row with the inputs' shape and layout (a capture must not
    tune kernels or fill caches for a shape it has not seen)."""
    _stand_in_graphs(monkeypatch)
    model = Seg3DNet(2, 3, (4, 8), backend="reference")
    step = graphs.CudaGraphStep(model, sf.nn.JaccardLoss(backend="reference"), torch.optim.Adam(model.parameters()),
                                warmup=2)
    a = torch.randn(1, 2, 4, 4, 4), torch.randint(0, 3, (1, 4, 4, 4))
    b = torch.randn(1, 2, 4, 4, 6), torch.randint(0, 3, (1, 4, 4, 6))
    a_cl = a[0].contiguous(memory_format=torch.channels_last_3d), a[1]
    for inputs in (a, b, a, a_cl, a, a):  # only the last two are two in a row
        step(*inputs)
    assert (step.eager_steps, step.replays, step._graph) == (6, 0, None)
    step(*a)
    assert (step.eager_steps, step.replays) == (6, 1) and step._static_x.shape == a[0].shape
    step(*a_cl)  # the captured shape in another layout: replayed (the static input takes any layout)
    assert step.replays == 2


def _graph_step_and_twin(fused=False):
    """A CudaGraphStep (warmup 1) of a tiny reference Seg3DNet, and an identical model and optimizer to step eagerly
    beside it: -> (step, model, twin, twin's optimizer, loss). fused: PyTorch's fused Adam (on the CPU too)."""
    torch.manual_seed(0)
    model = Seg3DNet(2, 3, (4, 8), backend="reference")
    twin = copy.deepcopy(model)
    opt, twin_opt = (torch.optim.Adam(m.parameters(), lr=1e-2, fused=fused) for m in (model, twin))
    loss_fn = sf.nn.JaccardLoss(backend="reference")
    return graphs.CudaGraphStep(model, loss_fn, opt, warmup=1), model, twin, twin_opt, loss_fn


def test_cuda_graph_step_plumbing_on_cpu(monkeypatch):
    """CudaGraphStep's bookkeeping with a stand-in graph (the GPU tests capture for real): eager warmup, the
    capturing call equal to an eager step (static inputs, checks verified, gradients put back, optimizer), inputs
    of another shape run eagerly, and a failed alpha check reruns the step eagerly and turns graphs off."""
    _stand_in_graphs(monkeypatch)
    step, model, twin, twin_opt, loss_fn = _graph_step_and_twin()
    x, y = torch.randn(2, 2, 6, 4, 6), torch.randint(0, 3, (2, 6, 4, 6))

    def both(x, y, same=True):
        loss, logits = step(x, y)
        twin_loss, twin_logits = graphs.train_step(twin, loss_fn, twin_opt, x, y)
        torch.testing.assert_close(loss, twin_loss, rtol=0, atol=0)
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
        return loss

    both(x, y)  # warmup: eager
    assert (step.eager_steps, step.replays, step._graph is None) == (1, 0, True)
    both(x, y)  # captures (runs the step: the stand-in) and "replays"
    assert (step.eager_steps, step.replays) == (1, 1) and step._graph is not None
    assert len(step._checks) == 5 + 1  # the least alpha of each fused PReLU conv of the (4, 8) net; the labels
    assert all(p.grad is g for p, g in step._grads)
    both(torch.randn(1, 2, 4, 4, 4), torch.randint(0, 3, (1, 4, 4, 4)))  # another shape: eager
    assert (step.eager_steps, step.replays) == (2, 1) and step._graph is not None
    with torch.no_grad():
        model.enc_second[0].alpha.fill_(-0.5)
        twin.enc_second[0].alpha.fill_(-0.5)
    step._checks.packed[0] = -0.5  # what a replay would compute now (the first value: enc_first[0]'s least alpha)
    with pytest.warns(RuntimeWarning, match=r"replay 2: a PReLU alpha is -0.5 \(<= [\d.e+-]+\).*run eagerly"):
        both(x, y)
    assert step._graph is None and (step.eager_steps, step.replays) == (3, 1)
    both(x, y)
    assert step.eager_steps == 4


def _as_if_replayed(step, index, value):
    """What a replay would leave in the recorded checks with check `index`'s value (the stand-in graph replays
    nothing): the packed values and the device-side verdict computed from them."""
    step._checks.packed[index] = value
    checks = step._checks
    values, start = [], 0
    for v in checks._values:
        values.append(checks.packed[start:start + v.numel()].reshape(v.shape))
        start += v.numel()
    checks.failed = torch.stack([f(v).any() for f, v in zip(checks._fails, values)]).any().float()


def _same_weights(model, twin):
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_cuda_graph_step_with_fused_adam_reads_its_checks_a_call_later(monkeypatch):
    """With an optimizer that takes found_inf (fused Adam) a replayed step does not wait for its checks: the
    optimizer skips the step on the device where one failed, and the next call (or settle()) reads them. A failed
    alpha check then reruns that step eagerly (the same weights as eager steps throughout); labels out of range raise
    there, with nothing applied. Each call also leaves the optimizer without the found_inf it was given."""
    _stand_in_graphs(monkeypatch)
    step, model, twin, twin_opt, loss_fn = _graph_step_and_twin(fused=True)
    x, y = torch.randn(2, 2, 6, 4, 6), torch.randint(0, 3, (2, 6, 4, 6))

    def both():
        step(x, y)
        graphs.train_step(twin, loss_fn, twin_opt, x, y)

    both()  # warmup
    both()  # capture and "replay"; checks on the device pass
    assert step.replays == 1 and step._unread is not None and float(step._checks.failed) == 0.0
    assert not hasattr(step.optimizer, "found_inf")
    step.settle()
    assert step._unread is None
    _same_weights(model, twin)

    # labels out of range: the optimizer skips the step; the next call raises before it steps
    label_index = len(step._checks.packed) - 1  # the label range (least, greatest): the last values recorded
    _as_if_replayed(step, label_index, 7)
    step(x, y)
    _same_weights(model, twin)  # found_inf = 1: no update
    with pytest.raises(ValueError, match=r"target labels must lie in \[0, 2\] for 3 classes; found values in \[0, 7\]"):
        step.settle()
    _as_if_replayed(step, label_index, 2)

    # an alpha that turned negative: the replayed step is skipped, then rerun eagerly at the next call
    with torch.no_grad():
        model.enc_second[0].alpha.fill_(-0.5)
        twin.enc_second[0].alpha.fill_(-0.5)
    _as_if_replayed(step, 0, -0.5)
    step(x, y)
    _same_weights(model, twin)  # found_inf = 1: no update
    graphs.train_step(twin, loss_fn, twin_opt, x, y)
    with pytest.warns(RuntimeWarning, match=r"replay 3: a PReLU alpha is -0.5 .*run eagerly"):
        step(x, y)  # reruns the skipped step eagerly, then runs this one eagerly
    graphs.train_step(twin, loss_fn, twin_opt, x, y)
    assert step._graph is None and (step.eager_steps, step.replays) == (3, 2)  # (replay 2: the labels' step)
    _same_weights(model, twin)


def test_cuda_graph_step_trains_on_eagerly_when_the_capture_fails(monkeypatch):
    """A capture that an op or the driver refuses warns, turns graphs off and runs that step eagerly: the same
    weights as eager steps (training on a GPU uses CUDA graphs by default, so a failed capture must not end it)."""
    _stand_in_graphs(monkeypatch)

    @contextlib.contextmanager
    def refused(graph):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        yield

    monkeypatch.setattr(torch.cuda, "graph", refused)
    step, model, twin, twin_opt, loss_fn = _graph_step_and_twin()
    x, y = torch.randn(2, 2, 6, 4, 6), torch.randint(0, 3, (2, 6, 4, 6))
    step(x, y)
    graphs.train_step(twin, loss_fn, twin_opt, x, y)
    with pytest.warns(RuntimeWarning, match="the capture failed \\(RuntimeError: operation not permitted when "
                                            "stream is capturing\\); this and later steps run eagerly"):
        loss, _ = step(x, y)
    twin_loss, _ = graphs.train_step(twin, loss_fn, twin_opt, x, y)
    step(x, y)
    graphs.train_step(twin, loss_fn, twin_opt, x, y)
    torch.testing.assert_close(loss, twin_loss, rtol=0, atol=0)
    assert step._graph is None and (step.eager_steps, step.replays) == (3, 0) and "capture failed" in step.disabled
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_training_uses_cuda_graphs_by_default_where_they_can_run():
    from seg3d_fast.train import TrainConfig, use_cuda_graph

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    cropped, whole = TrainConfig(data="d", out="o", crop=(16, 16, 16)), TrainConfig(data="d", out="o")
    assert use_cuda_graph(cropped, gpu, 1)
    assert not use_cuda_graph(cropped, gpu, 2)  # DDP: the gradient all-reduce is not captured
    assert not use_cuda_graph(cropped, cpu, 1) and not use_cuda_graph(whole, gpu, 1)
    assert not use_cuda_graph(TrainConfig(data="d", out="o", crop=(16, 16, 16), cuda_graph=False), gpu, 1)
    assert use_cuda_graph(TrainConfig(data="d", out="o", cuda_graph=True), gpu, 1)
