"""The public ops on the reference backend against plain PyTorch in float64: forward, every gradient, gradcheck,
opcheck, layouts, and the errors for bad input."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import seg3d_fast as sf
from seg3d_fast import ops
from helpers import assert_close, conv3d_prelu_plain, jaccard_sums_plain, randn

SHAPE = (2, 3, 5, 6, 7)  # N > 1, odd extents
BACKWARD_OP_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")


def make_conv_args(dtype, k, stride, alpha_kind, residual_kind, layout, c_out=5, negative_alpha=False, shape=SHAPE,
                   device="cpu"):
    x = randn(*shape, dtype=dtype, channels_last=layout == "channels_last", noncontig=layout == "noncontig",
              device=device)
    w = randn(c_out, shape[1], k, k, k, dtype=dtype, device=device) * (1.0 / (shape[1] * k**3) ** 0.5)
    b = randn(c_out, dtype=dtype, device=device)
    n_alpha = {"none": 0, "shared": 1, "channel": c_out}[alpha_kind]
    alpha = None
    if n_alpha:
        alpha = torch.rand(n_alpha, dtype=torch.float64) * 0.5 + 0.05
        if negative_alpha:
            alpha = alpha - 0.3
        alpha = alpha.to(device=device, dtype=dtype)
    out_shape = ops.conv_output_shape(x.shape, w.shape, stride)
    r = None if residual_kind == "none" else randn(*out_shape, dtype=dtype, device=device,
                                                   channels_last=layout == "channels_last")
    return x, w, b, alpha, r, stride, residual_kind == "before"


def run_with_grads(fn, args, grad_out):
    leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out, [a.grad if isinstance(a, torch.Tensor) else None for a in leaves]


def check_conv(dtype, k, stride, alpha_kind, residual_kind, layout, backend="reference", negative_alpha=False,
               device="cpu", shape=SHAPE, c_out=5, float32_params=False):
    """float32_params: weight, bias and alpha in float32 with a fp16/bf16 x (mixed precision): their gradients must
    come back in float32, within twice the error of PyTorch's autocast (which casts them to x's dtype)."""
    x, w, b, alpha, r, stride, rf = make_conv_args(dtype, k, stride, alpha_kind, residual_kind, layout,
                                                   negative_alpha=negative_alpha, device=device, shape=shape,
                                                   c_out=c_out)
    if float32_params:
        w, b, alpha = (None if t is None else t.float() for t in (w, b, alpha))
    fused = lambda x, w, b, a, r: sf.conv3d_prelu(x, w, b, a, r, stride=stride, residual_first=rf, backend=backend)

    def plain(x, w, b, a, r):
        w, b, a = (None if t is None else t.to(x.dtype) for t in (w, b, a))  # as autocast casts them
        return conv3d_prelu_plain(x, w, b, a, r, stride, rf)
    args = [x, w, b, alpha, r]
    args64 = [None if a is None else a.double().cpu() for a in args]
    out64 = plain(*args64)
    # Mean-one upstream gradient: the shared-alpha gradient sums ~1e3 terms, and with a zero-mean g that sum
    # cancels to noise, making every dtype's relative error ill-conditioned.
    g = torch.randn_like(out64) + 1
    ref_out, ref_grads = run_with_grads(plain, args64, g)
    torch_out, torch_grads = run_with_grads(plain, args, g.to(x.device))
    out, grads = run_with_grads(fused, args, g.to(x.device))
    assert out.dtype == dtype and out.shape == ref_out.shape
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert_close(out, ref_out, torch_out, dtype, "out")
    for name, got, want, tg in zip(("x", "weight", "bias", "alpha", "residual"), grads, ref_grads, torch_grads):
        if want is None:
            continue
        want_dtype = torch.float32 if float32_params and name in ("weight", "bias", "alpha") else dtype
        assert got is not None and got.dtype == want_dtype, f"grad {name} missing or wrong dtype"
        assert_close(got, want, tg, dtype, f"grad {name}")


CASES = list(itertools.product((1, 3), (1, 2), ("none", "shared", "channel"), ("none", "after", "before")))


@pytest.mark.parametrize("k,stride,alpha_kind,residual_kind", CASES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontig"])
def test_conv3d_prelu_fp32(k, stride, alpha_kind, residual_kind, layout):
    check_conv(torch.float32, k, stride, alpha_kind, residual_kind, layout)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k,stride,alpha_kind,residual_kind", [(3, 2, "channel", "after"), (3, 1, "shared", "before"),
                                                               (1, 2, "none", "after"), (3, 1, "channel", "none")])
def test_conv3d_prelu_half(dtype, k, stride, alpha_kind, residual_kind):
    check_conv(dtype, k, stride, alpha_kind, residual_kind, "channels_last")


@pytest.mark.parametrize("residual_kind", ["none", "after", "before"])
def test_conv3d_prelu_nonpositive_alpha_recomputes(residual_kind):
    # alpha <= 0 makes the pre-activation unrecoverable from the output: backward must recompute it.
    check_conv(torch.float32, 3, 2, "channel", residual_kind, "contiguous", negative_alpha=True)


COMPILED_BACKENDS = ["triton", "cuda"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def skip_unless_usable(backend):
    reason = sf.backends.available()[backend]
    if reason is not None:
        pytest.skip(f"backend {backend} cannot run here ({reason}); it runs on the GPU machine")


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("dtype,k,stride,alpha_kind,residual_kind,layout,negative", [
    (torch.float32, 3, 2, "channel", "after", "channels_last", False),
    (torch.float32, 1, 1, "shared", "before", "noncontig", False),
    (torch.bfloat16, 3, 1, "channel", "before", "contiguous", True),
    (torch.float16, 3, 2, "none", "none", "channels_last", False),
])
def test_compiled_backends_through_ops(backend, dtype, k, stride, alpha_kind, residual_kind, layout, negative,
                                      exact_fp32):
    """The Triton (interpreter on CPU) and CUDA backends through the public op: dispatch, autograd, layouts.
    Exact fp32 on both sides (TF32 is a separate, looser contract: tests/test_cuda_backend.py)."""
    skip_unless_usable(backend)
    check_conv(dtype, k, stride, alpha_kind, residual_kind, layout, backend=backend, negative_alpha=negative,
               device=DEVICE, shape=SHAPE, c_out=5)


@pytest.mark.parametrize("backend", ["reference"] + COMPILED_BACKENDS)
@pytest.mark.parametrize("dtype,alphas", [(torch.float16, (1e-3, 2.0 ** -7)), (torch.bfloat16, (1e-40,)),
                                          (torch.float32, (1e-40,))], ids=str)
def test_small_alphas_keep_pytorchs_gradient_accuracy(backend, dtype, alphas):
    """alpha times a small pre-activation falls among the subnormals, and z read back from the output loses bits (in
    fp16 the alpha gradient had 10x PyTorch's error at alpha 1e-3; in bf16 at alpha 1e-40, 9% error): below 2^7 times
    the dtype's least normal number the backward recomputes z, and every gradient stays within twice PyTorch's own
    error in that dtype (float64 reference; small activations)."""
    skip_unless_usable(backend)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 5, 6, 7, generator=gen, dtype=torch.float64) * 0.01
    w = torch.randn(8, 8, 3, 3, 3, generator=gen, dtype=torch.float64) * 0.05
    b = torch.zeros(8, dtype=torch.float64)
    g = torch.randn(2, 8, 5, 6, 7, generator=gen, dtype=torch.float64)

    def grads(fn, dtype, alpha):
        leaves = [t.to(DEVICE, dtype, copy=True).requires_grad_() for t in (x, w, b, torch.full((8,), alpha))]
        fn(*leaves).backward(g.to(DEVICE, dtype))
        return [t.grad.double().cpu() for t in leaves]

    plain = lambda x, w, b, a: F.prelu(F.conv3d(x, w, b, padding=1), a)  # noqa: E731
    fused = lambda *t: sf.conv3d_prelu(*t, backend=backend)  # noqa: E731
    for alpha in alphas:
        truth = grads(plain, torch.float64, alpha)
        torch_err = [(t - e).abs().max() for t, e in zip(grads(plain, dtype, alpha), truth)]
        fused_err = [(t - e).abs().max() for t, e in zip(grads(fused, dtype, alpha), truth)]
        for name, f, p, e in zip(("x", "weight", "bias", "alpha"), fused_err, torch_err, truth):
            assert f <= 2 * p + 1e-3 * e.abs().max(), (alpha, name, f.item(), p.item())


@pytest.mark.parametrize("backend", ["reference"] + COMPILED_BACKENDS)
@pytest.mark.parametrize("dtype,k,stride,alpha_kind,residual_kind,negative", [
    (torch.bfloat16, 3, 1, "channel", "after", False),
    (torch.float16, 3, 2, "shared", "before", False),
    (torch.bfloat16, 1, 2, "none", "none", False),
    (torch.bfloat16, 3, 2, "channel", "before", True),
])
def test_float32_parameters_with_half_activations(backend, dtype, k, stride, alpha_kind, residual_kind, negative):
    """Mixed precision (what the ops take under autocast): float32 weight, bias and alpha with a fp16 / bf16 x, on
    every backend; gradients in float32."""
    skip_unless_usable(backend)
    check_conv(dtype, k, stride, alpha_kind, residual_kind, "channels_last", backend=backend, negative_alpha=negative,
               device=DEVICE, float32_params=True)


def test_autocast_passes_float32_parameters_without_casts():
    """Under autocast the fused ops cast the activation only: the float32 parameters reach the backend as they are
    (no autograd node per parameter and direction for a cast), and their gradients are float32."""
    m = sf.nn.ConvPReLU3d(3, 4, prelu="channel").to(memory_format=torch.channels_last_3d)
    up = sf.nn.UpConvPReLU3d(4, 3)
    x = randn(1, 3, 5, 6, 7, channels_last=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = up(m(x))
    assert y.dtype == torch.bfloat16
    nodes, todo = [], [y.grad_fn]
    while todo:
        node = todo.pop()
        nodes.append(type(node).__name__)
        todo += [n for n, _ in node.next_functions if n is not None]
    assert "ToCopyBackward0" not in nodes, nodes
    y.float().sum().backward()
    params = list(m.parameters()) + list(up.parameters())
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("kwargs,target_kind", [
    (dict(), "labels"), (dict(ignore_index=255, per_sample=True), "labels"),
    (dict(activation="sigmoid", squared=False), "probs"),
    (dict(per_sample=True, reduction="none"), "labels"),  # the sums path (the reduced loss is fused on triton)
    (dict(include_background=False, per_sample=True), "labels"),  # the fused loss's unit weights without class 0
    (dict(include_background=False, class_weights=torch.tensor([0.5, 1.0, 2.0, 1.0]), reduction="sum", smooth=1.0),
     "labels")])
def test_compiled_backends_jaccard_through_ops(backend, kwargs, target_kind):
    skip_unless_usable(backend)
    check_jaccard(kwargs, target_kind, torch.float32, backend=backend, device=DEVICE)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_dispatch_times_the_loss_as_jaccard_loss_runs_it(backend):
    """What the dispatcher times for the loss on a backend (ops._loss_forward: the fused loss on the Triton backend,
    the sums and the formula elsewhere) computes the default loss itself."""
    skip_unless_usable(backend)
    from seg3d_fast import backends

    logits = randn(2, 4, 3, 5, 6).to(DEVICE)
    labels = torch.randint(0, 4, (2, 3, 5, 6), device=DEVICE)
    module = backends.load(backend)
    assert hasattr(module, "jaccard_loss_reduced") == (backend == "triton")
    timed = ops._loss_forward(module, logits, labels, "softmax", None)
    torch.testing.assert_close(timed, sf.jaccard_loss(logits, labels, backend="reference"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stride,residual_first,alpha_kind", [(1, False, "channel"), (2, True, "shared"),
                                                              (2, False, "none"), (1, True, "negative")])
def test_conv3d_prelu_gradcheck(stride, residual_first, alpha_kind):
    x, w, b, alpha, r, _, _ = make_conv_args(torch.float64, 3, stride, "none" if alpha_kind == "none" else "channel",
                                             "before", "contiguous", c_out=3,
                                             negative_alpha=alpha_kind == "negative", shape=(2, 2, 3, 4, 5))
    if alpha_kind == "shared":
        alpha = alpha[:1]
    inputs = [t.requires_grad_() for t in (x, w, b, r)] + ([alpha.requires_grad_()] if alpha is not None else [])
    fn = lambda x, w, b, r, *a: sf.conv3d_prelu(x, w, b, a[0] if a else None, r, stride=stride,
                                                residual_first=residual_first)
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_conv3d_prelu_saves_output_not_preactivation():
    """Backward keeps x and the output only (plus parameters): no pre-activation tensor."""
    x, w, b, alpha, _, _, _ = make_conv_args(torch.float32, 3, 1, "channel", "none", "contiguous")
    w.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = sf.conv3d_prelu(x, w, b, alpha)
    params = {p.untyped_storage().data_ptr() for p in (w, b, alpha)}
    big = {t.untyped_storage().data_ptr() for t in saved} - params
    assert big == {x.untyped_storage().data_ptr(), out.untyped_storage().data_ptr()}


def test_backward_makes_no_zero_gradient_for_the_saved_activation():
    """The activation saved beside the output (residual summed after the PReLU) gets no gradient: autograd must not
    fill a zero tensor of its size in every backward (on the GPU, an activation-sized write and allocation)."""
    x, w, b, alpha, res, stride, _ = make_conv_args(torch.float32, 3, 1, "channel", "after", "channels_last",
                                                    c_out=6)
    x.requires_grad_()
    out = sf.conv3d_prelu(x, w, b, alpha, res, stride=stride, backend="reference")
    grad = torch.randn_like(out)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out.backward(grad)
    # the reference backward itself makes no zero tensor: any aten::zeros here is autograd's
    assert not [e.name for e in prof.events() if e.name in ("aten::zeros", "aten::zeros_like")]
    assert x.grad is not None and x.grad.isfinite().all()


def test_opcheck_conv3d_prelu():
    for residual_first, alpha_n in ((False, 5), (True, 1)):
        x, w, b, alpha, r, _, _ = make_conv_args(torch.float32, 3, 2, "channel", "after", "contiguous")
        alpha = alpha[:alpha_n]
        args = [t.requires_grad_() for t in (x, w, b, alpha, r)]
        torch.library.opcheck(ops._conv3d_prelu, (*args, 2, residual_first, not residual_first, "reference"))
    g = torch.randn(2, 5, 3, 3, 4)
    # The backward op has no autograd of its own (no double backward), so not the aot_dispatch utils.
    torch.library.opcheck(ops._conv3d_prelu_backward,
                          (g, x, w, b, alpha, None, g.clone(), 2, False, [True, True, True, True, False],
                           "reference"), test_utils=BACKWARD_OP_CHECKS)
    # a channels-last model (input and weight): the fake kernels' layouts match the real ones'
    cl = lambda t: t.detach().contiguous(memory_format=torch.channels_last_3d)  # noqa: E731
    torch.library.opcheck(ops._conv3d_prelu_backward,
                          (cl(g), cl(x), cl(w), b, alpha, None, cl(g), 2, False, [True, True, True, True, False],
                           "reference"), test_utils=BACKWARD_OP_CHECKS)


# --------------------------------------------------------------------------------------------------------------------
# Jaccard loss
def jaccard_plain(logits, target, squared=True, activation="softmax", smooth=1e-5, class_weights=None,
                  include_background=True, per_sample=False, ignore_index=None, reduction="mean"):
    """The loss from the plain sums (one-hot and probabilities materialised), independently of ops.jaccard_from_sums."""
    sums = jaccard_sums_plain(logits, target, squared, activation, ignore_index)
    if not per_sample:
        sums = sums.sum(0, keepdim=True)
    i, p, t = sums.unbind(-1)
    loss = 1 - (i + smooth) / (p + t - i + smooth)
    w = torch.ones(loss.shape[1], dtype=loss.dtype, device=loss.device) if class_weights is None \
        else class_weights.to(loss.dtype)
    if not include_background:
        loss, w = loss[:, 1:], w[1:]
    if reduction == "none":
        return loss if per_sample else loss[0]
    if reduction == "sum":
        return (loss * w).sum()
    return ((loss * w).sum(1) / w.sum()).mean()


def make_target(kind, shape, c, ignore_index=None):
    n, _, *spatial = shape
    if kind == "labels":
        t = torch.randint(0, c, (n, *spatial))
        if ignore_index is not None:
            t[torch.rand(t.shape) < 0.2] = ignore_index
        return t
    return torch.rand(shape, dtype=torch.float64).softmax(1)


JACCARD_CASES = [
    dict(),
    dict(squared=False),
    dict(activation="sigmoid"),
    dict(per_sample=True, reduction="none"),
    dict(include_background=False, class_weights=torch.tensor([0.5, 1.0, 2.0, 1.0])),
    dict(include_background=False),
    dict(ignore_index=255),
    dict(ignore_index=1, per_sample=True, smooth=1.0),  # an ignore_index that is a class: no voxel counts for it
    dict(reduction="sum", smooth=1.0),
]


@pytest.mark.parametrize("kwargs,target_kind",
                         [(k, t) for k in JACCARD_CASES for t in ("labels", "probs")
                          if not (t == "probs" and "ignore_index" in k)],  # label maps only (see test_jaccard_errors)
                         ids=lambda v: v if isinstance(v, str) else ",".join(v) or "default")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_jaccard_loss(kwargs, target_kind, dtype):
    check_jaccard(kwargs, target_kind, dtype)


def check_jaccard(kwargs, target_kind, dtype, backend="reference", device="cpu"):
    shape = (2, 4, 5, 6, 7)
    logits = randn(*shape, dtype=dtype, channels_last=True) * 2
    target = make_target(target_kind, shape, 4, kwargs.get("ignore_index"))
    tgt = target if target_kind == "labels" else target.to(dtype)
    l64 = logits.double().requires_grad_()
    ref = jaccard_plain(l64, target, **kwargs)
    g = torch.rand_like(ref)
    ref_g, = torch.autograd.grad(ref, l64, g)
    lt = logits.clone().requires_grad_()
    torch_loss = jaccard_plain(lt, tgt, **kwargs)
    torch_g, = torch.autograd.grad(torch_loss, lt, g.to(torch_loss.dtype))
    lf = logits.to(device).requires_grad_()
    loss = sf.jaccard_loss(lf, tgt.to(device), backend=backend, **kwargs)
    got_g, = torch.autograd.grad(loss, lf, g.to(device=device, dtype=loss.dtype))
    assert got_g.dtype == dtype
    assert_close(loss, ref, torch_loss, dtype, "loss")
    assert_close(got_g, ref_g, torch_g, dtype, "grad logits")


@pytest.mark.parametrize("kwargs", [dict(), dict(per_sample=True, reduction="none"),
                                    dict(include_background=False, class_weights=torch.tensor([0.5, 1.0, 2.0]))])
def test_jaccard_from_sums_gradcheck(kwargs):
    """The loss's gradient with respect to every sum (its backward is written out, not autograd's)."""
    sums = (torch.rand(2, 3, 3, dtype=torch.float64) * 10).requires_grad_()
    weights = kwargs.get("class_weights")
    kwargs = dict(kwargs, class_weights=None if weights is None else weights.double())
    assert torch.autograd.gradcheck(lambda s: ops.jaccard_from_sums(s, **kwargs), (sums,))


def test_jaccard_gradcheck_and_2d():
    logits = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)  # 2-D images work too
    labels = torch.randint(0, 3, (2, 4, 5))
    assert torch.autograd.gradcheck(lambda l: sf.jaccard_loss(l, labels, per_sample=True, reduction="none"),
                                    (logits,), fast_mode=True)
    probs = torch.rand(2, 3, 4, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda l: sf.jaccard_loss(l, probs, activation="sigmoid", squared=False),
                                    (logits,), fast_mode=True)


def test_jaccard_perfect_prediction_is_zero_and_wrong_is_one():
    labels = torch.randint(0, 3, (1, 6, 6, 6))
    onehot = F.one_hot(labels, 3).movedim(-1, 1).float()
    assert sf.jaccard_loss(onehot * 40 - 20, labels).item() < 1e-4
    assert sf.jaccard_loss(onehot * -40, labels).item() > 0.99


def test_opcheck_jaccard():
    logits = torch.randn(2, 4, 3, 4, 5, requires_grad=True)
    labels = torch.randint(0, 4, (2, 3, 4, 5))
    torch.library.opcheck(ops._jaccard_sums, (logits, labels, True, "softmax", None, "reference"))
    torch.library.opcheck(ops._jaccard_sums, (logits, torch.rand(2, 4, 3, 4, 5), False, "sigmoid", None, "reference"))
    torch.library.opcheck(ops._jaccard_sums_backward,
                          (torch.randn(2, 4, 3), logits.detach(), labels, True, "softmax", 2, "reference"),
                          test_utils=BACKWARD_OP_CHECKS)


# --------------------------------------------------------------------------------------------------------------------
# transposed conv + PReLU + skip
def test_upconv_prelu_add_matches_plain_and_gradcheck():
    x = torch.randn(2, 3, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    a = torch.rand(4, dtype=torch.float64).requires_grad_()
    skip = torch.randn(2, 4, 6, 8, 10, dtype=torch.float64, requires_grad=True)
    got = sf.upconv_prelu_add(x, w, b, a, skip)
    want = F.prelu(F.conv_transpose3d(x, w, b, stride=2), a) + skip
    torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(sf.upconv_prelu_add, (x, w, b, a, skip), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x, w, b, a: sf.upconv_prelu_add(x, w, b, a[:1]), (x, w, b, a),
                                    fast_mode=True)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype,param_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("alpha_size,bias", [(4, True), (1, False)])
def test_upconv_prelu_add_per_dtype(backend, dtype, param_dtype, alpha_size, bias, exact_fp32):
    """Forward and every gradient against float64 through the op's autograd, alphas of both signs, channels-last
    input, N > 1, odd extents; float32 parameters with a bf16 x (mixed precision) too."""
    skip_unless_usable(backend)
    dev = "cpu" if backend == "reference" else DEVICE
    x = randn(2, 3, 3, 4, 5, dtype=dtype, channels_last=True, device=dev)
    w = (randn(3, 4, 2, 2, 2, dtype=dtype, device=dev) * 0.5).to(param_dtype)
    b = randn(4, dtype=dtype, device=dev).to(param_dtype) if bias else None
    a = torch.tensor([0.25, -0.3, 0.1, 0.5][:alpha_size], dtype=dtype, device=dev).to(param_dtype)
    skip = randn(2, 4, 6, 8, 10, dtype=dtype, device=dev)

    def plain(x, w, b, a, s):
        w, b, a = (None if t is None else t.to(x.dtype) for t in (w, b, a))  # as autocast casts them
        return F.prelu(F.conv_transpose3d(x, w, b, stride=2), a) + s
    args = [x, w, b, a, skip]
    g = torch.randn(2, 4, 6, 8, 10, dtype=torch.float64, device=dev) + 1
    ref_out, ref_grads = run_with_grads(plain, [None if t is None else t.double() for t in args], g)
    torch_out, torch_grads = run_with_grads(plain, args, g)
    out, grads = run_with_grads(lambda *t: sf.upconv_prelu_add(*t, backend=backend), args, g)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert_close(out, ref_out, torch_out, dtype, "out")
    for name, got, want, theirs in zip("x w b alpha skip".split(), grads, ref_grads, torch_grads):
        if want is not None:
            assert got.dtype == (param_dtype if name in ("w", "b", "alpha") else dtype), name
            assert_close(got, want, theirs, dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_upconv_reference_output_keeps_channels_last(dtype):
    """The reference's output is channels_last_3d when x is (API.md), whatever layout conv_transpose3d picks: on the
    CPU it was NCDHW for every fp16 input and for fp32 with 8 -> 4 channels."""
    x = randn(2, 8, 3, 4, 1, dtype=dtype, channels_last=True)
    w = randn(8, 4, 2, 2, 2, dtype=dtype) * 0.3
    a = torch.tensor([0.25], dtype=dtype)
    for skip in (None, randn(2, 4, 6, 8, 2, dtype=dtype)):
        out = sf.upconv_prelu_add(x, w, None, a, skip, backend="reference")
        assert out.is_contiguous(memory_format=torch.channels_last_3d), out.stride()
        want = F.prelu(F.conv_transpose3d(x.double(), w.double(), stride=2), a.double())
        torch.testing.assert_close(out.double(), want if skip is None else want + skip.double(), rtol=2e-2,
                                   atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_upconv_reference_shared_alpha_gradient_rounds_once(dtype):
    """A shared alpha's gradient where the channels' terms cancel (every pre-activation negative, the upstream gradient
    +1 on half the channels and -1 on the others): within twice PyTorch's error. The reference rounded each channel's
    sum to fp16 / bf16 before summing the channels (bf16: ~10x PyTorch's error)."""
    x = randn(2, 8, 3, 4, 5, dtype=dtype) * 0.3
    w = randn(8, 8, 2, 2, 2, dtype=dtype) * 0.3
    b = torch.full((8,), -3.0, dtype=dtype)  # z < 0 everywhere: every voxel adds to the alpha gradient
    a = torch.tensor([0.25], dtype=dtype)
    g = torch.ones(2, 8, 6, 8, 10, dtype=torch.float64)
    g[:, 4:] = -1
    plain = lambda x, w, b, a: F.prelu(F.conv_transpose3d(x, w, b, stride=2), a)
    _, ref_grads = run_with_grads(plain, [t.double() for t in (x, w, b, a)], g)
    _, torch_grads = run_with_grads(plain, [x, w, b, a], g)
    _, grads = run_with_grads(lambda *t: sf.upconv_prelu_add(*t, backend="reference"), [x, w, b, a], g)
    assert grads[3].dtype == dtype
    assert_close(grads[3], ref_grads[3], torch_grads[3], dtype, "grad alpha")


def test_upconv_backend_choice(monkeypatch):
    """The cuda backend has no upsampling kernel: asked for by name it says so; forced for every op through the
    environment (or for a whole Seg3DNet) the upsampling runs on the best other backend."""
    x, w, a = torch.randn(1, 2, 2, 2, 2), torch.randn(2, 3, 2, 2, 2), torch.full((3,), 0.25)
    with pytest.raises(sf.backends.BackendUnsupported, match="backend 'cuda' cannot run upconv_prelu_add"):
        sf.upconv_prelu_add(x, w, None, a, backend="cuda")
    monkeypatch.setenv("SEG3D_FAST_BACKEND", "cuda")
    torch.testing.assert_close(sf.upconv_prelu_add(x, w, None, a), F.prelu(F.conv_transpose3d(x, w, stride=2), a))
    from seg3d_fast.models import Seg3DNet

    assert {m.backend for m in Seg3DNet(2, 3, (4, 8), backend="cuda").up} == {None}
    assert {m.backend for m in Seg3DNet(2, 3, (4, 8), backend="triton").up} == {"triton"}


# --------------------------------------------------------------------------------------------------------------------
# bad input: clear errors naming the argument
def test_conv_errors():
    x, w, b, alpha, r, _, _ = make_conv_args(torch.float32, 3, 1, "channel", "after", "contiguous")
    with pytest.raises(ValueError, match="x must be a 5-D"):
        sf.conv3d_prelu(x[0], w)
    with pytest.raises(ValueError, match="channel mismatch"):
        sf.conv3d_prelu(x, w[:, :2])
    with pytest.raises(ValueError, match="kernel"):
        sf.conv3d_prelu(x, torch.randn(5, 3, 5, 5, 5))
    with pytest.raises(ValueError, match="stride"):
        sf.conv3d_prelu(x, w, stride=3)
    with pytest.raises(TypeError, match="bias has dtype"):
        sf.conv3d_prelu(x, w, b.double())
    with pytest.raises(TypeError, match="weight has dtype torch.float64 but x has torch.float32"):
        sf.conv3d_prelu(x, w.double())
    with pytest.raises(TypeError, match="alpha has dtype torch.bfloat16 but weight has torch.float32"):
        sf.conv3d_prelu(x.bfloat16(), w, b, alpha.bfloat16())
    with pytest.raises(TypeError, match="residual has dtype torch.float32 but x has torch.bfloat16"):
        sf.conv3d_prelu(x.bfloat16(), w, b, alpha, r)
    with pytest.raises(ValueError, match="bias must have shape"):
        sf.conv3d_prelu(x, w, b[:2])
    with pytest.raises(ValueError, match="alpha must have shape"):
        sf.conv3d_prelu(x, w, b, alpha[:2])
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        sf.conv3d_prelu(x, w, b, alpha, r[:, :, :2])
    with pytest.raises(ValueError, match="residual is on meta"):
        sf.conv3d_prelu(x, w, b, alpha, r.to("meta"))
    with pytest.raises(TypeError, match="x must be float16"):
        sf.conv3d_prelu(x.long(), w)
    with pytest.raises(ValueError, match="backend must be one of"):
        sf.conv3d_prelu(x, w, backend="cudnn")


def test_double_backward_is_an_error_or_exact():
    """A second derivative is either exact or an error, never silently wrong. The conv's backward recovers z from the
    saved output (its create_graph gradients were wrong, with no error), the loss's saves its terms without their
    graph (it failed with a misleading 'modified by an inplace operation'): both raise 'differentiate twice'. The
    upsampling block recomputes z from x, so on the reference its second derivative equals PyTorch's."""
    d = torch.float64
    x = torch.randn(1, 2, 3, 3, 3, dtype=d, requires_grad=True)
    w, a = torch.randn(3, 2, 3, 3, 3, dtype=d, requires_grad=True), torch.full((3,), 0.25, dtype=d, requires_grad=True)
    g, = torch.autograd.grad(sf.conv3d_prelu(x, w, None, a).pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.square().sum().backward()
    for wrt in (x, w, a):  # (a gradient penalty's way: it had found them unused, or with allow_unused given None)
        with pytest.raises(RuntimeError, match="differentiate twice"):
            torch.autograd.grad(g.square().sum(), wrt, retain_graph=True, allow_unused=True)
    logits = torch.randn(2, 3, 4, 4, dtype=d, requires_grad=True)
    for kwargs in ({}, {"reduction": "none"}):
        g, = torch.autograd.grad(sf.jaccard_loss(logits, torch.randint(0, 3, (2, 4, 4)), **kwargs).sum(), logits,
                                 create_graph=True)
        with pytest.raises(RuntimeError, match="differentiate twice"):
            torch.autograd.grad(g.square().sum(), logits, retain_graph=True, allow_unused=True)
        with pytest.raises(RuntimeError, match="differentiate twice"):
            g.square().sum().backward()
    sums = torch.rand(2, 3, 3, dtype=d, requires_grad=True)
    g, = torch.autograd.grad(ops.jaccard_from_sums(sums), sums, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.square().sum().backward()

    xu = torch.randn(1, 2, 2, 2, 2, dtype=d, requires_grad=True)
    params = [torch.randn(2, 3, 2, 2, 2, dtype=d), torch.randn(3, dtype=d), torch.full((3,), 0.25, dtype=d),
              torch.randn(1, 3, 4, 4, 4, dtype=d)]
    params = [p.requires_grad_() for p in params]
    results = []
    for fn in (lambda x, w, b, a, s: F.prelu(F.conv_transpose3d(x, w, b, stride=2), a) + s,
               lambda x, w, b, a, s: sf.upconv_prelu_add(x, w, b, a, s, backend="reference")):
        first = torch.autograd.grad(fn(xu, *params).pow(3).sum(), [xu, *params], create_graph=True)
        results.append(torch.autograd.grad(sum(t.square().sum() for t in first), [xu, *params]))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)
    if sf.backends.available()["triton"] is None:
        up = sf.upconv_prelu_add(xu.to(DEVICE, torch.float32), *[p.to(DEVICE, torch.float32) for p in params],
                                 backend="triton")
        g, = torch.autograd.grad(up.pow(3).sum(), xu, create_graph=True)
        with pytest.raises(RuntimeError, match="differentiate twice"):
            g.square().sum().backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_leaves_float64_and_integer_tensors_alone(dtype):
    """As PyTorch's autocast: float64 tensors keep float64 (the fused ops cast them to the autocast dtype, silently
    losing precision where F.conv3d keeps float64), and an integer residual / skip is refused as it is outside
    autocast (it was cast and accepted). A non-tensor alpha or bias of the upsampling block is a TypeError naming it
    (it was an AttributeError from inside the checks)."""
    d = torch.float64
    x, w, b, a = torch.randn(1, 2, 3, 3, 3, dtype=d), torch.randn(3, 2, 3, 3, 3, dtype=d), torch.randn(3, dtype=d), \
        torch.full((3,), 0.25, dtype=d)
    r = torch.randn(1, 3, 3, 3, 3, dtype=d)
    xu, wu, s = torch.randn(1, 2, 2, 2, 2, dtype=d), torch.randn(2, 3, 2, 2, 2, dtype=d), torch.randn(1, 3, 4, 4, 4, dtype=d)
    with torch.autocast("cpu", dtype=dtype):
        y = sf.conv3d_prelu(x, w, b, a, r)
        up = sf.upconv_prelu_add(xu, wu, b, a, s)
        with pytest.raises(TypeError, match="residual has dtype torch.int64 but x has"):
            sf.conv3d_prelu(x.float(), w.float(), None, None, r.long())
        with pytest.raises(TypeError, match="skip has dtype torch.int64 but x has"):
            sf.upconv_prelu_add(xu.float(), wu.float(), None, a.float(), s.long())
        with pytest.raises(TypeError, match="alpha must be a torch.Tensor or None, got float"):
            sf.upconv_prelu_add(xu.float(), wu.float(), None, 0.25)
    assert y.dtype == up.dtype == d
    torch.testing.assert_close(y, F.prelu(F.conv3d(x, w, b, padding=1), a) + r)
    torch.testing.assert_close(up, F.prelu(F.conv_transpose3d(xu, wu, b, stride=2), a) + s)
    with pytest.raises(TypeError, match="bias must be a torch.Tensor or None, got list"):
        sf.upconv_prelu_add(xu, wu, [0.0] * 3, a)


def test_torch_func_transforms_are_refused_clearly():
    """torch.func.grad / vmap of a fused op raise an error that says what to use instead (PyTorch's own asked for a
    setup_context staticmethod, something only seg3d_fast could add)."""
    x, w, a = torch.randn(1, 2, 3, 3, 3), torch.randn(3, 2, 3, 3, 3), torch.full((3,), 0.25)
    labels, w_up = torch.randint(0, 3, (1, 4)), torch.randn(2, 3, 2, 2, 2)
    calls = [lambda t: sf.conv3d_prelu(t, w, None, a).sum(),
             lambda t: sf.upconv_prelu_add(t, w_up, None, a).sum(),
             lambda t: sf.jaccard_loss(t.reshape(1, 3, -1)[..., :4], labels),
             lambda t: sf.jaccard_from_sums(t.reshape(-1)[:18].reshape(2, 3, 3))]
    for call in calls:
        with pytest.raises(RuntimeError, match="do not support torch.func transforms .* use torch.autograd.grad"):
            torch.func.grad(call)(x)
        with pytest.raises(RuntimeError, match="do not support torch.func transforms"):
            torch.func.vmap(call)(x[None])
    assert sf.conv3d_prelu(x, w, None, a).shape == (1, 3, 3, 3, 3)  # (outside a transform: unaffected)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_batched_gradients_are_refused_clearly_or_exact(backend):
    """torch.autograd.grad(..., is_grads_batched=True) and jacobian(vectorize=True) vmap the backward: the loss (any
    backend) and the kernel backends' conv and upsampling backwards raise an error that says what to do instead
    (PyTorch's own spoke of BatchedTensorImpl storage, is_contiguous inside vmap, or vmap and addcmul_); the
    reference's conv and upsampling backwards, plain torch ops, give each gradient of the batch exactly."""
    skip_unless_usable(backend)
    x = torch.randn(2, 2, 3, 3, 3, device=DEVICE, requires_grad=True)
    w, a = torch.randn(3, 2, 3, 3, 3, device=DEVICE), torch.tensor([0.25, -0.2, 0.1], device=DEVICE)
    w_up, a_up = torch.randn(2, 3, 2, 2, 2, device=DEVICE), torch.full((3,), 0.25, device=DEVICE)
    labels = torch.randint(0, 3, (2, 3, 3, 3), device=DEVICE)
    calls = {"conv3d_prelu": lambda: sf.conv3d_prelu(x, w, None, a, backend=backend),
             "upconv_prelu_add": lambda: sf.upconv_prelu_add(x, w_up, None, a_up, backend=backend),
             "jaccard_loss": lambda: sf.jaccard_loss(sf.conv3d_prelu(x, w, None, a), labels, backend=backend,
                                                     per_sample=True, reduction="none"),
             "jaccard_loss reduced": lambda: sf.jaccard_loss(sf.conv3d_prelu(x, w, None, a), labels,
                                                             backend=backend).reshape(1)}
    for what, call in calls.items():
        out = call()
        grads = torch.randn(3, *out.shape, device=DEVICE)
        if backend == "reference" and not what.startswith("jaccard"):
            got, = torch.autograd.grad(out, x, grads, is_grads_batched=True, retain_graph=True)
            for i in range(3):
                torch.testing.assert_close(got[i], torch.autograd.grad(out, x, grads[i], retain_graph=True)[0])
            continue
        with pytest.raises(RuntimeError, match=f"{what.split()[0]}'s backward.*cannot take a batch of gradients.*"
                                               "once per gradient"):
            torch.autograd.grad(out, x, grads, is_grads_batched=True)
    with pytest.raises(RuntimeError, match="cannot take a batch of gradients"):
        torch.autograd.functional.jacobian(lambda t: sf.jaccard_loss(t, labels, backend=backend),
                                           torch.randn(2, 3, 3, 3, 3, device=DEVICE), vectorize=True)


def test_reference_bf16_convs_with_an_extent_of_1_or_2_on_the_cpu():
    """torch 2.13's oneDNN bf16 conv3d on the CPU fails for tiny extents: stride 2 with an extent-1 axis, non-finite or
    huge weight gradients (every one of 30 seeds for the first shape) or the process aborting ("double free or
    corruption"); its AMX forward is wrong for an output extent of 1 (pytorch/pytorch#169688); stride 1 on a
    (1, 1, 1, 1, 2) channels-last input, ~1e37 (every seed). The reference backend runs those convolutions without
    oneDNN. (No activation: with 800 output voxels one PReLU branch flip at z ~ 0 would move the gradients by more
    than bf16's rounding.)"""
    gen = torch.Generator().manual_seed(0)
    cases = [(layout, shape, c, 2) for layout in (torch.contiguous_format, torch.channels_last_3d)
             for shape, c in (((2, 16, 9, 1, 9), 16), ((2, 16, 9, 5, 2), 16))]
    cases.append(("one channel, channels-last strides", (1, 1, 1, 1, 2), 1, 1))
    for layout, shape, c_in, stride in cases:
        x = torch.randn(*shape, generator=gen).bfloat16()
        if isinstance(layout, str):  # the layout a channels_last_3d conv gives one channel
            x = x.as_strided(shape, (2, 1, 2, 2, 1))
        else:
            x = x.contiguous(memory_format=layout)
        x.requires_grad_()
        w = (torch.randn(6 if c_in == 1 else 16, c_in, 3, 3, 3, generator=gen) / c_in).requires_grad_()
        b = torch.randn(w.shape[0], generator=gen, requires_grad=True)
        y = sf.conv3d_prelu(x, w, b, stride=stride, backend="reference")
        g = torch.randn(y.shape, generator=gen).bfloat16()
        got = torch.autograd.grad(y, [x, w, b], g)
        x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
        y64 = sf.conv3d_prelu(x64, w64, b64, stride=stride, backend="reference")
        want = torch.autograd.grad(y64, [x64, w64, b64], g.double())
        assert (y.double() - y64).norm() <= 1e-2 * y64.norm(), (layout, shape)
        for name, have, exact in zip(("grad_x", "grad_weight", "grad_bias"), got, want):
            assert have.isfinite().all(), (name, layout, shape)
            assert (have.double() - exact).norm() <= 1e-2 * exact.norm(), (name, layout, shape)


def test_reference_bf16_convs_with_an_extent_of_2_keep_bf16_precision():
    """Those convolutions run without oneDNN, in float32: PyTorch's own CPU kernel accumulates bf16 in bf16 (under
    autocast a layer's bias and alpha gradients came out 3-7% off, 10-50x PyTorch's error; here grad_x 2.4x a bf16
    rounding). Now grad_x is off by one bf16 rounding and the float32 parameters get float32-exact gradients."""
    gen = torch.Generator().manual_seed(0)
    for shape, stride in (((2, 8, 2, 12, 12), 1), ((1, 4, 2, 5, 6), 1), ((2, 8, 9, 1, 9), 2)):
        x = torch.randn(*shape, generator=gen).bfloat16().requires_grad_()
        w = (torch.randn(8, shape[1], 3, 3, 3, generator=gen) / 8).requires_grad_()
        b = torch.randn(8, generator=gen, requires_grad=True)
        y = sf.conv3d_prelu(x, w, b, stride=stride, backend="reference")
        g = torch.randn(y.shape, generator=gen).bfloat16()
        got = torch.autograd.grad(y, [x, w, b], g)
        x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
        want = torch.autograd.grad(sf.conv3d_prelu(x64, w64, b64, stride=stride), [x64, w64, b64], g.double())
        for name, have, exact, bound in zip(("grad_x", "grad_weight", "grad_bias"), got, want, (3e-3, 1e-6, 1e-6)):
            assert (have.double() - exact).norm() <= bound * exact.norm(), (name, shape)


def test_conv_stride_must_be_an_int():
    """A bool, float or tensor stride is refused by name (True and 2.0 compare equal to 1 and 2: they reached
    F.conv3d and failed there with its argument-combination error, and a tensor stride ran in eager mode only); a
    numpy integer works as the int it is."""
    import numpy as np

    x, w = torch.randn(1, 2, 4, 4, 4), torch.randn(3, 2, 3, 3, 3)
    for stride in (True, 2.0, torch.tensor(2), "2"):
        with pytest.raises(TypeError, match="stride must be an int, 1 or 2"):
            sf.conv3d_prelu(x, w, stride=stride)
    torch.testing.assert_close(sf.conv3d_prelu(x, w, stride=np.int64(2)), F.conv3d(x, w, stride=2, padding=1))
    with pytest.raises(ValueError, match="weight must be a 5-D tensor .* got str"):
        sf.conv3d_prelu(x, "w")


def test_explicit_backend_that_cannot_run_lists_reasons():
    x, w, *_ = make_conv_args(torch.float32, 3, 1, "none", "none", "contiguous")
    reason = sf.backends.available()["cuda"]
    if reason is None:
        pytest.skip("a CUDA backend is usable here; this checks the CPU-only error")
    with pytest.raises(sf.backends.BackendUnsupported, match="backend 'cuda' cannot run conv3d_prelu"):
        sf.conv3d_prelu(x, w, backend="cuda")


@pytest.mark.parametrize("backend", ["reference", "triton"])  # the sums path; the fused loss (its kernel's range)
def test_jaccard_label_check_deferred_to_backward(monkeypatch, backend):
    """The training path on a GPU (forced here on the CPU): the forward does not wait for the label range check;
    backward raises before producing any gradient. ignore_index voxels are left out of the range."""
    skip_unless_usable(backend)
    # the GPU rule without its device test (grad mode is off inside an autograd.Function: it must be asked outside)
    monkeypatch.setattr(ops, "_defer_label_check", lambda logits: logits.requires_grad and torch.is_grad_enabled())
    logits = torch.randn(2, 3, 4, 5, 6, requires_grad=True, device=DEVICE)
    loss = sf.jaccard_loss(logits, torch.full((2, 4, 5, 6), 3, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\] for 3 classes; found values in \[3, 3\]"):
        loss.backward()
    assert logits.grad is None
    labels = torch.randint(0, 3, (2, 4, 5, 6), device=DEVICE)
    labels[0, 0] = 255
    sf.jaccard_loss(logits, labels, ignore_index=255, backend=backend).backward()
    assert logits.grad is not None and logits.grad.isfinite().all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_training_step_never_synchronizes(backend):
    """A fused conv + Jaccard loss forward and backward issues no host-device synchronization (after the first call,
    which tunes and caches): the host keeps queueing work while the GPU runs. Bad labels still raise, in backward."""
    skip_unless_usable(backend)
    x, w, b, alpha, res, _, _ = make_conv_args(torch.bfloat16, 3, 2, "channel", "after", "channels_last", c_out=8,
                                            shape=(2, 4, 5, 6, 7), device="cuda")
    x.requires_grad_(True)
    labels = torch.randint(0, 8, (x.shape[0], *[(s + 1) // 2 for s in x.shape[2:]]), device="cuda")

    def step(target):
        out = sf.conv3d_prelu(x, w, b, alpha, res, stride=2, backend=backend)
        sf.jaccard_loss(out, target, backend=backend).backward()

    step(labels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(ValueError, match="target labels must lie"):
        step(labels + 8)


@pytest.mark.parametrize("target_kind", ["labels", "probabilities"])
def test_reference_jaccard_sums_stay_float32_under_autocast(target_kind):
    """Autocast would run the reference backend's einsums in bf16 (losses off by up to 5e-3, gradients by 1%, and a
    bf16 loss for probability targets): the sums, the loss and the gradient are those without autocast."""
    gen = torch.Generator().manual_seed(4)
    logits = (torch.randn(2, 4, 9, 8, 7, generator=gen) * 3).requires_grad_()
    target = (torch.randint(0, 4, (2, 9, 8, 7), generator=gen) if target_kind == "labels"
              else torch.rand(2, 4, 9, 8, 7, generator=gen).softmax(1))
    expected = sf.jaccard_loss(logits, target, backend="reference")
    expected_grad, = torch.autograd.grad(expected, logits)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sf.jaccard_loss(logits, target, backend="reference")
    grad, = torch.autograd.grad(loss, logits)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-8)


def test_meta_tensors_run_forward_and_backward():
    """Meta tensors (shapes only, e.g. to size a model) run forward and backward as nn.Conv3d + nn.PReLU do: the
    alpha and label checks, which read values, are skipped there."""
    conv = sf.nn.ConvPReLU3d(3, 4, stride=2).to("meta")
    out = conv(torch.empty(2, 3, 5, 6, 7, device="meta", requires_grad=True))
    out.sum().backward()
    assert out.shape == (2, 4, 3, 3, 4) and conv.weight.grad.device.type == "meta"
    logits = torch.empty(2, 3, 4, 4, 4, device="meta", requires_grad=True)
    sf.jaccard_loss(logits, torch.empty(2, 4, 4, 4, dtype=torch.long, device="meta")).backward()
    assert logits.grad.shape == logits.shape


def test_in_place_change_of_the_output_is_a_clear_error():
    """The backward of a conv with an activation reads the pre-activation back from the output it returned: an
    in-place change of that output (`out += x`) is an error saying what to write instead, not autograd's version
    message; an out-of-place sum trains, and so does an in-place one after a conv without activation."""
    x = torch.randn(2, 4, 5, 5, 5, requires_grad=True)
    for prelu, in_place_ok in (("channel", False), ("shared", False), (None, True)):
        block = sf.nn.ConvPReLU3d(4, 4, prelu=prelu, backend="reference")
        out = block(x)
        out += x
        if in_place_ok:
            out.sum().backward()
        else:
            with pytest.raises(RuntimeError, match="modified in place .* Write it out of place"):
                out.sum().backward()
        (block(x) + x).sum().backward()


def test_jaccard_errors():
    logits = torch.randn(2, 3, 4, 5, 6)
    with pytest.raises(ValueError, match=r"target labels must lie in \[0, 2\]"):
        sf.jaccard_loss(logits, torch.full((2, 4, 5, 6), 3))
    with pytest.raises(ValueError, match=r"target labels must lie"):
        sf.jaccard_loss(logits, torch.full((2, 4, 5, 6), -1))
    assert sf.jaccard_loss(logits, torch.full((2, 4, 5, 6), -1), ignore_index=-1).isfinite()
    with pytest.raises(ValueError, match=r"\[255, 255\] \(ignore_index=-1 cannot occur in a torch.uint8 label map"):
        sf.jaccard_loss(logits, torch.full((2, 4, 5, 6), 255, dtype=torch.uint8), ignore_index=-1)
    with pytest.raises(ValueError, match="target label map must have shape"):
        sf.jaccard_loss(logits, torch.zeros(2, 4, 5, 7, dtype=torch.long))
    for bad in (torch.rand(2, 2, 4, 5, 6), torch.rand(2, 4, 5, 6, 3)):  # (the second: classes last, as many values)
        with pytest.raises(ValueError, match="probabilities must have the logits' shape"):
            sf.jaccard_loss(logits, bad)
    with pytest.raises(ValueError, match="ignore_index applies to integer label maps"):
        sf.jaccard_loss(logits, torch.rand(2, 3, 4, 5, 6), ignore_index=0)
    with pytest.raises(TypeError, match="logits must be a floating-point"):
        sf.jaccard_loss(logits.long(), torch.zeros(2, 4, 5, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="softmax over one class"):
        sf.jaccard_loss(logits[:, :1], torch.zeros(2, 4, 5, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="class_weights must have one weight per class"):
        sf.jaccard_loss(logits, torch.zeros(2, 4, 5, 6, dtype=torch.long), class_weights=[1.0, 2.0])
    for bad in ([0.0, 0.0, 0.0], [1.0, -1.0, 1.0], [1.0, float("nan"), 1.0], torch.tensor([1.0, float("inf"), 1.0])):
        with pytest.raises(ValueError, match="class_weights must be finite, >= 0 and not all 0"):
            sf.jaccard_loss(logits, torch.zeros(2, 4, 5, 6, dtype=torch.long), class_weights=bad)
    with pytest.raises(ValueError, match="target is on meta"):
        sf.jaccard_loss(logits, torch.zeros(2, 4, 5, 6, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="activation must be one of"):
        sf.jaccard_loss(logits, torch.zeros(2, 4, 5, 6, dtype=torch.long), activation="relu")
    with pytest.raises(ValueError, match="logits has no elements"):
        sf.jaccard_loss(logits[:0], torch.zeros(0, 4, 5, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="logits has no elements"):
        sf.jaccard_loss(logits[:, :, :0], torch.zeros(2, 0, 5, 6, dtype=torch.long))
    for bad in (1.5, True):  # (a bool is no label value: True would ignore label 1)
        with pytest.raises(TypeError, match="ignore_index must be an int"):
            sf.jaccard_loss(logits, torch.zeros(2, 4, 5, 6, dtype=torch.long), ignore_index=bad)
    with pytest.raises(ValueError, match="smooth must be a number >= 0"):
        sf.jaccard_loss(logits, torch.zeros(2, 4, 5, 6, dtype=torch.long), smooth=-1.0)
    with pytest.raises(TypeError, match="integer label map or float probabilities; got dtype torch.bool"):
        sf.jaccard_loss(logits, torch.zeros(2, 4, 5, 6, dtype=torch.bool))
    for bad in (logits[..., None], logits[:, :, 0, 0, 0]):  # 4 spatial dims; none
        with pytest.raises(ValueError, match="with 1 to 3 spatial dims"):
            sf.jaccard_loss(bad, torch.zeros(bad.shape[:1] + bad.shape[2:], dtype=torch.long))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_jaccard_label_dtypes_and_unrepresentable_ignore_index(backend):
    """Every integer label dtype gives the int64 map's loss (uint16/32/64 raised NotImplementedError from the
    reference's range check). An ignore_index the labels' dtype cannot hold ignores nothing: torch's scalar
    comparison wrapped it (-1 matched a uint8 255, 255 an int8 -1), so the reference silently ignored those voxels
    while the kernels reported them out of range."""
    skip_unless_usable(backend)
    logits = torch.randn(2, 3, 4, 5, device=DEVICE)
    labels = torch.randint(0, 3, (2, 4, 5), device=DEVICE)
    want = sf.jaccard_loss(logits, labels, reduction="none", backend=backend)
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.uint16, torch.uint32, torch.uint64):
        torch.testing.assert_close(sf.jaccard_loss(logits, labels.to(dtype), reduction="none", backend=backend), want)
    wrapped = labels.to(torch.uint8)
    wrapped[0, 0, 0] = 255
    with pytest.raises(ValueError, match=r"found values in \[0, 255\]"):
        sf.jaccard_loss(logits, wrapped, ignore_index=-1, backend=backend)
    with pytest.raises(ValueError, match=r"found values in \[-1, 2\]"):
        sf.jaccard_loss(logits, torch.where(wrapped == 255, -1, wrapped.long()).to(torch.int8), ignore_index=255,
                        backend=backend)
    torch.testing.assert_close(sf.jaccard_loss(logits, labels, ignore_index=2 ** 70, backend=backend),
                               sf.jaccard_loss(logits, labels, backend=backend))
    ignored = torch.where(wrapped == 255, -1, wrapped.long())
    torch.testing.assert_close(sf.jaccard_loss(logits, wrapped, ignore_index=255, backend=backend),
                               sf.jaccard_loss(logits, ignored, ignore_index=-1, backend=backend))


def test_jaccard_options_are_checked():
    """Invalid loss options name the argument instead of being taken as truth values (squared='no' was squared,
    include_background='no' kept the background) or giving NaN (include_background=False with one class; smooth=inf);
    a numpy float smooth is a number (it was refused as 'not a number'); class_weights that are not numbers or are
    on the meta device name class_weights (torch's own errors did not)."""
    logits, labels = torch.randn(2, 3, 4, 5), torch.randint(0, 3, (2, 4, 5))
    for name in ("squared", "include_background", "per_sample"):
        for value in ("no", None, 1):
            with pytest.raises(TypeError, match=f"{name} must be a bool; got {value!r}"):
                sf.jaccard_loss(logits, labels, **{name: value})
    for smooth in (float("inf"), float("nan"), True, torch.tensor(1.0)):
        with pytest.raises(ValueError, match=r"smooth must be a number >= 0 \(finite\)"):
            sf.jaccard_loss(logits, labels, smooth=smooth)
    import numpy as np
    torch.testing.assert_close(sf.jaccard_loss(logits, labels, smooth=np.float32(0.5)),
                               sf.jaccard_loss(logits, labels, smooth=0.5))
    for kwargs in ({}, {"reduction": "none"}):
        with pytest.raises(ValueError, match="include_background=False leaves no class"):
            sf.jaccard_loss(logits[:, :1], labels.clamp(max=0), activation="sigmoid", include_background=False,
                            **kwargs)
    with pytest.raises(TypeError, match="class_weights must be a tensor or a sequence of 3 numbers"):
        sf.jaccard_loss(logits, labels, class_weights="abc")
    with pytest.raises(TypeError, match="class_weights must hold real numbers"):
        sf.jaccard_loss(logits, labels, class_weights=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="class_weights is on meta"):
        sf.jaccard_loss(logits, labels, class_weights=torch.ones(3, device="meta"))


def test_jaccard_from_sums_is_public_and_checks_its_arguments():
    """sf.jaccard_from_sums (README's API) exists and checks what it is given: sums of the wrong shape gave a wrong
    loss silently ((C, 3) was read as C samples of 3 classes' [I, P, T] pooled) or an unpacking error; reduction='avg' was taken as 'mean',
    smooth=-1 accepted, a list of class weights or the wrong count failed inside torch."""
    sums = torch.rand(2, 3, 3, dtype=torch.float64) + torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    inter, p, t = sums.sum(0).unbind(-1)
    want = 1 - (inter + 1e-5) / (p + t - inter + 1e-5)
    torch.testing.assert_close(sf.jaccard_from_sums(sums, reduction="none"), want)
    torch.testing.assert_close(sf.jaccard_from_sums(sums, class_weights=[1.0, 2.0, 1.0]),
                               (want * torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)).sum() / 4)
    for bad in (sums[0], sums[..., :2], sums[:0], [[[1.0, 2.0, 3.0]]]):
        with pytest.raises(ValueError, match=r"sums must be a tensor \(N, C, 3\)"):
            sf.jaccard_from_sums(bad)
    with pytest.raises(TypeError, match="sums must be a floating-point tensor"):
        sf.jaccard_from_sums(sums.long())
    with pytest.raises(ValueError, match="reduction must be one of"):
        sf.jaccard_from_sums(sums, reduction="avg")
    with pytest.raises(ValueError, match=r"smooth must be a number >= 0 \(finite\)"):
        sf.jaccard_from_sums(sums, smooth=-1)
    with pytest.raises(ValueError, match=r"class_weights must have one weight per class, shape \(3,\)"):
        sf.jaccard_from_sums(sums, class_weights=torch.ones(5))
    with pytest.raises(TypeError, match="per_sample must be a bool"):
        sf.jaccard_from_sums(sums, per_sample="yes")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_jaccard_class_weights_get_their_gradient(backend):
    """class_weights that require grad get the same gradient on every backend (the triton / cuda fused loss returned
    none for them, silently, while the reference gave it)."""
    skip_unless_usable(backend)
    logits = torch.randn(2, 3, 4, 5, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, 3, (2, 4, 5), device=DEVICE)
    weights = torch.tensor([0.5, 1.0, 2.0], device=DEVICE, requires_grad=True)
    for kwargs in ({}, {"per_sample": True, "include_background": False}, {"reduction": "sum"}):
        got = torch.autograd.grad(sf.jaccard_loss(logits, labels, class_weights=weights, backend=backend, **kwargs),
                                  [logits, weights])
        loss64 = sf.jaccard_loss(logits.double(), labels, class_weights=weights.double(), backend="reference",
                                 **kwargs)
        for g, want in zip(got, torch.autograd.grad(loss64, [logits, weights])):
            torch.testing.assert_close(g, want.float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_jaccard_gradient_with_smooth_zero_and_a_tiny_absent_class(backend):
    """smooth=0, a class absent from the labels and predicted with a tiny mass (P + T - I = 4.8e-25): the loss is
    finite and so is its exact gradient, but the backward's 1 / den^2 underflowed in float32 and gave inf * 0 = NaN
    in every logit (plain float32 autograd: finite)."""
    skip_unless_usable(backend)
    logits = torch.tensor([14.0, -14.0, 3.0, 1.0], device=DEVICE).reshape(2, 2, 1, 1, 1).repeat(1, 1, 2, 3, 1)
    logits[1] = torch.randn(2, 2, 3, 1)  # a second sample where class 1 occurs (pooled: class 1 counts)
    labels = torch.zeros(2, 2, 3, 1, dtype=torch.long, device=DEVICE)
    labels[1, 0, 0] = 1
    for per_sample in (False, True):
        lg = logits.clone().requires_grad_()
        got = torch.autograd.grad(sf.jaccard_loss(lg, labels, smooth=0.0, per_sample=per_sample, backend=backend),
                                  lg)[0]
        lg64 = logits.double().requires_grad_()
        want = torch.autograd.grad(sf.jaccard_loss(lg64, labels, smooth=0.0, per_sample=per_sample,
                                                   backend="reference"), lg64)[0]
        assert got.isfinite().all(), (per_sample, got)
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-4)


def test_jaccard_class_weights_only_on_the_left_out_background_are_refused():
    """class_weights whose only non-zero weight is the background's, with include_background=False: the weighted mean
    is 0 / 0. It returned NaN silently, where all-zero weights raise."""
    logits, labels = torch.randn(2, 3, 4, 5), torch.randint(0, 3, (2, 4, 5))
    for per_sample in (False, True):
        with pytest.raises(ValueError, match="class_weights of the scored classes are all 0"):
            sf.jaccard_loss(logits, labels, class_weights=[1.0, 0.0, 0.0], include_background=False,
                            per_sample=per_sample)
    with pytest.raises(ValueError, match="class_weights of the scored classes are all 0"):
        sf.jaccard_from_sums(torch.rand(2, 3, 3) + 1, class_weights=[1.0, 0.0, 0.0], include_background=False)
    # a sum, or a mean with the background scored, is defined
    assert sf.jaccard_loss(logits, labels, class_weights=[1.0, 0.0, 0.0], include_background=False,
                           reduction="sum").item() == 0
    assert sf.jaccard_loss(logits, labels, class_weights=[1.0, 0.0, 0.0]).isfinite()


def test_upconv_errors_and_empty_batches():
    """Bad upsampling inputs name the argument; an empty batch gives an empty output and zero parameter gradients
    (on the reference backend, as F.conv3d would), for both fused ops."""
    x, w, a = torch.randn(1, 2, 2, 2, 2), torch.randn(2, 3, 2, 2, 2), torch.full((3,), 0.25)
    with pytest.raises(ValueError, match="x must be a 5-D tensor .* got x NoneType"):
        sf.upconv_prelu_add(None, w, None, a)
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32 or float64; got torch.int32"):
        sf.upconv_prelu_add(x.int(), w, None, a)
    with pytest.raises(TypeError, match="skip has dtype torch.float64 but x has torch.float32"):
        sf.upconv_prelu_add(x, w, None, a, torch.randn(1, 3, 4, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"skip must have the output's shape \(1, 3, 4, 4, 4\); got \(1, 1, 4, 4, 4\)"):
        sf.upconv_prelu_add(x, w, None, a, torch.randn(1, 1, 4, 4, 4))  # (broadcastable: a silent wrong sum)
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\); got \(2,\)"):
        sf.upconv_prelu_add(x, w, torch.randn(2), a)
    for bad in (torch.full((2,), 0.25), torch.full((1, 3), 0.25)):
        with pytest.raises(ValueError, match=r"alpha must have shape \(1,\) or \(3,\)"):
            sf.upconv_prelu_add(x, w, None, bad)
    with pytest.raises(ValueError, match="channel mismatch: x has 2 channels but weight expects 3"):
        sf.upconv_prelu_add(x, torch.randn(3, 3, 2, 2, 2), None, a)
    with pytest.raises(ValueError, match="at least one input and one output channel"):
        sf.conv3d_prelu(torch.randn(1, 0, 3, 3, 3), torch.randn(4, 0, 3, 3, 3))
    x0 = torch.randn(0, 2, 3, 4, 5, requires_grad=True)
    w3 = torch.randn(4, 2, 3, 3, 3, requires_grad=True)
    y = sf.conv3d_prelu(x0, w3, None, torch.full((4,), 0.25), stride=2)
    assert y.shape == (0, 4, 2, 2, 3)
    up = sf.upconv_prelu_add(y, torch.randn(4, 3, 2, 2, 2), None, a)
    assert up.shape == (0, 3, 4, 4, 6)
    up.sum().backward()
    assert x0.grad.shape == x0.shape and not w3.grad.any()


# --------------------------------------------------------------------------------------------------------------------
# dispatch
def test_env_backend_forces_choice(monkeypatch):
    skip_unless_usable("triton")
    x, w, b, alpha, *_ = make_conv_args(torch.float32, 3, 1, "channel", "none", "contiguous", device=DEVICE)
    calls = []
    triton_module = sf.backends.load("triton")
    real = triton_module.conv3d_prelu_forward
    monkeypatch.setattr(triton_module, "conv3d_prelu_forward", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("SEG3D_FAST_BACKEND", "triton")
    sf.conv3d_prelu(x, w, b, alpha)
    assert calls == [1]


def test_dispatch_skips_backends_that_cannot_run(monkeypatch):
    """The dispatcher's automatic choice (the GPU's order forced here: cuda, triton, reference; the cuda backend made
    one whose import failed) takes the first backend that says it can run the input, falls back to the reference
    when the order leaves it out, and raises with every backend's reasons when none can; asked for by name, a
    backend that cannot run is an error with its reason."""
    skip_unless_usable("triton")
    from seg3d_fast import backends

    monkeypatch.setitem(backends._import_errors, "cuda", "import failed: ImportError: no _C")
    monkeypatch.delitem(backends._modules, "cuda", raising=False)
    order = ["cuda", "triton", "reference"]
    monkeypatch.setattr(backends, "_preference", lambda *args: tuple(order))
    labels = torch.randint(0, 3, (2, 4, 5, 1), device=DEVICE)

    def choice(logits, backend=None):
        return backends.select("jaccard", backend, logits.device, "key", (logits, labels, "softmax", None))
    logits = torch.randn(2, 3, 4, 5, 1, device=DEVICE)
    assert choice(logits) == "triton"
    assert choice(logits.double()) == "reference"  # triton takes no float64
    with pytest.raises(backends.BackendUnsupported, match="backend 'cuda' cannot run jaccard .*no _C"):
        choice(logits, "cuda")
    order[:] = ["triton"]  # an order without the reference: it is still the last resort
    assert choice(logits.double()) == "reference"
    with pytest.raises(backends.BackendUnsupported, match=r"no backend can run jaccard on this input: .*triton.*int64"):
        choice(logits.long())
    monkeypatch.setattr(ops, "_backend_cache", {})  # the op itself: float64 logits on the reference backend
    torch.testing.assert_close(sf.jaccard_loss(logits.double(), labels), jaccard_plain(logits.double(), labels))


def test_env_backend_that_names_no_backend(monkeypatch):
    """SEG3D_FAST_BACKEND set to no backend's name is an error naming the variable in every op (the conv and the loss
    said "backend must be one of ... got 'foo'" of an argument never passed; the upsampling ignored it)."""
    monkeypatch.setattr(ops, "_backend_cache", {})
    monkeypatch.setenv("SEG3D_FAST_BACKEND", "Triton")
    x, w = torch.randn(1, 2, 3, 3, 3), torch.randn(3, 2, 3, 3, 3)
    for call in (lambda: sf.conv3d_prelu(x, w),
                 lambda: sf.jaccard_loss(torch.randn(1, 3, 4), torch.zeros(1, 4, dtype=torch.long)),
                 lambda: sf.upconv_prelu_add(x, torch.randn(2, 3, 2, 2, 2), None, torch.ones(1))):
        with pytest.raises(ValueError, match="environment variable SEG3D_FAST_BACKEND='Triton' names no backend"):
            call()
    monkeypatch.setenv("SEG3D_FAST_BACKEND", "")  # empty: unset
    torch.testing.assert_close(sf.conv3d_prelu(x, w), F.conv3d(x, w, padding=1))


def test_available_reports_reasons():
    available = sf.backends.available()
    assert set(available) == {"reference", "triton", "cuda"} and available["reference"] is None
    assert all(v is None or (isinstance(v, str) and v) for v in available.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_measured_dispatch_is_cached_on_disk(tmp_path, monkeypatch):
    from seg3d_fast import backends

    monkeypatch.setattr(backends, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(backends, "_measured_cache", {})
    monkeypatch.setattr(backends, "_table_cache", {})
    monkeypatch.setattr(ops, "_backend_cache", {})
    x, w, b, alpha, *_ = make_conv_args(torch.bfloat16, 3, 1, "channel", "none", "channels_last", device="cuda")
    sf.conv3d_prelu(x, w, b, alpha)
    files = list(tmp_path.glob("dispatch-*.json"))
    assert len(files) == 1
    import json
    entry = json.loads(files[0].read_text())
    order = entry["conv3d_prelu/bfloat16-k3-s1-ci3-co5"]
    assert "reference" in order and set(order) <= {"reference", "triton", "cuda"}


def test_jaccard_loss_under_torch_compile_fullgraph():
    """The loss traces without graph breaks (custom op for the sums, autograd.Function for the loss terms) and
    matches eager mode in value and gradient."""
    logits = torch.randn(2, 3, 5, 6, 7, requires_grad=True)
    labels = torch.randint(0, 3, (2, 5, 6, 7))
    compiled = torch.compile(lambda l, t: sf.jaccard_loss(l, t, per_sample=True), fullgraph=True)
    loss = compiled(logits, labels)
    grad, = torch.autograd.grad(loss, logits)
    eager = sf.jaccard_loss(logits, labels, per_sample=True)
    eager_grad, = torch.autograd.grad(eager, logits)
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(grad, eager_grad)


def test_numpy_scalar_arguments_under_torch_compile():
    """numpy scalars for stride, ignore_index and smooth work under torch.compile as in eager mode: dynamo hands
    them over as 0-d arrays, which the argument checks refused ('stride must be an int ... got array(2)')."""
    import numpy as np

    torch._dynamo.reset()
    x, w = torch.randn(2, 3, 5, 6, 7, requires_grad=True), torch.randn(4, 3, 3, 3, 3)
    labels = torch.randint(0, 3, (2, 5, 6, 7))
    labels[0, 0, 0, 0] = 255
    calls = {
        "stride": lambda: sf.conv3d_prelu(x, w, stride=np.int64(2)).square().sum(),
        "ignore_index and smooth": lambda: sf.jaccard_loss(x[:, :3], labels, ignore_index=np.int32(255),
                                                           smooth=np.float64(0.5)),
        "jaccard_from_sums smooth": lambda: sf.jaccard_from_sums(x[:, :3, :3, 0, 0].exp(), smooth=np.float32(0.5)),
    }
    for what, call in calls.items():
        eager = call()
        compiled = torch.compile(call)()
        torch.testing.assert_close(compiled, eager, msg=what)
        torch.testing.assert_close(torch.autograd.grad(compiled, x)[0], torch.autograd.grad(eager, x)[0], msg=what)


@pytest.mark.parametrize("with_skip", [True, False])
def test_upconv_prelu_add_under_torch_compile_fullgraph(with_skip):
    """The upsampling block (an autograd.Function) traces without graph breaks and matches eager mode in value and
    every gradient. (torch 2.11 gave every input a zero gradient while the forward summed the skip in place.)"""
    torch.manual_seed(0)
    inputs = [torch.randn(2, 4, 3, 4, 5), torch.randn(4, 3, 2, 2, 2), torch.randn(3), torch.full((3,), 0.25),
              torch.randn(2, 3, 6, 8, 10) if with_skip else None]
    inputs = [t.requires_grad_() if t is not None else None for t in inputs]
    present = [t for t in inputs if t is not None]
    compiled = torch.compile(lambda *args: sf.upconv_prelu_add(*args).square().sum(), fullgraph=True)
    results = {}
    for name, fn in (("compiled", compiled), ("eager", lambda *args: sf.upconv_prelu_add(*args).square().sum())):
        value = fn(*inputs)
        results[name] = (value.detach(), torch.autograd.grad(value, present))
    torch.testing.assert_close(results["compiled"][0], results["eager"][0])
    for got, want in zip(results["compiled"][1], results["eager"][1]):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want)


def test_conv_backward_op_outputs_match_its_fake_kernel():
    """The backward op's real outputs have the fake kernel's metadata: the pre-activation's gradient (the residual's,
    residual_first=True) in grad_out's layout whatever the saved output's (reference) or the backend's (triton:
    always channels-last) layout, and an empty tensor where output_mask says no (aten's CPU convolution_backward
    computed the weight's gradient with the bias's for a strided input). Inductor asserts those strides."""
    cl = lambda t: t.contiguous(memory_format=torch.channels_last_3d)  # noqa: E731
    x, w, b, a = cl(torch.randn(1, 2, 3, 4, 5)), torch.randn(3, 2, 3, 3, 3), torch.randn(3), torch.rand(3) + 0.1
    g, saved = torch.randn(1, 3, 3, 4, 5), cl(torch.randn(1, 3, 3, 4, 5))
    torch.library.opcheck(ops._conv3d_prelu_backward, (g, x, w, b, a, None, saved, 1, True, [True] * 5, "reference"),
                          test_utils=BACKWARD_OP_CHECKS)
    x2, s2 = torch.randn(2, 2, 4, 1, 10)[..., ::2], torch.randn(2, 4, 4, 1, 10)[..., ::2]
    w2, b2, a2 = torch.randn(4, 2, 1, 1, 1), torch.randn(4), torch.rand(4) + 0.1
    torch.library.opcheck(ops._conv3d_prelu_backward, (torch.randn(2, 4, 4, 1, 5), x2, w2, b2, a2, None, s2, 1, False,
                                                       [True, False, True, True, False], "reference"),
                          test_utils=BACKWARD_OP_CHECKS)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_jaccard_backward_op_output_matches_its_fake_kernel(backend):
    """The loss's backward op gives the logits' gradient in the fake kernel's layout (empty_like(logits)) for
    channels_last_3d and other dense permuted logits: the reference backend gave it contiguous, and inductor's stride
    assertion failed on a compiled loss over channels-last logits (a channels_last_3d model's output)."""
    skip_unless_usable(backend)
    labels = torch.randint(0, 3, (2, 4, 5, 6), device=DEVICE)
    channels_last = torch.randn(2, 3, 4, 5, 6, device=DEVICE).contiguous(memory_format=torch.channels_last_3d)
    permuted = torch.randn(2, 4, 3, 5, 6, device=DEVICE).transpose(1, 2)  # dense, classes not outermost
    for logits in (channels_last, permuted):
        torch.library.opcheck(ops._jaccard_sums_backward,
                              (torch.randn(2, 3, 3, device=DEVICE), logits, labels, True, "softmax", None, backend),
                              test_utils=BACKWARD_OP_CHECKS)
    torch._dynamo.reset()
    l1, l2 = channels_last.clone().requires_grad_(), channels_last.clone().requires_grad_()
    got = torch.compile(lambda l, t: sf.jaccard_loss(l, t, backend=backend), fullgraph=True)(l1, labels)
    want = sf.jaccard_loss(l2, labels, backend=backend)
    got.backward(), want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(l1.grad, l2.grad)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_seg3dnet_under_inductor_residual_gradient_layouts(backend, channels_last):
    """torch.compile (inductor) of Seg3DNet, residual_first=True, trains as in eager mode with either input layout on
    either backend (inductor's stride assertions on the backward op's outputs failed for channels_last_3d models, and
    for NCDHW ones on the triton backend)."""
    skip_unless_usable(backend)
    from seg3d_fast.models import Seg3DNet

    torch._dynamo.reset()
    torch.manual_seed(0)
    net = Seg3DNet(2, 3, (2, 4), backend=backend)
    x, labels = torch.randn(1, 2, 4, 4, 6), torch.randint(0, 3, (1, 4, 4, 6))
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last_3d), x.contiguous(memory_format=torch.channels_last_3d)
    twin = __import__("copy").deepcopy(net)
    sf.jaccard_loss(torch.compile(net, fullgraph=True)(x), labels).backward()
    sf.jaccard_loss(twin(x), labels).backward()
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dynamic", [False, True])
def test_jaccard_loss_options_under_torch_compile_fullgraph(dynamic):
    """CPU class weights (their value check is data-dependent: skipped while tracing, as the label check is) and a
    default smooth under dynamic=True (a SymFloat, which math.isfinite refused) trace without graph breaks."""
    logits, labels = torch.randn(2, 3, 4, 5, 6), torch.randint(0, 3, (2, 4, 5, 6))
    for crit in (sf.nn.JaccardLoss(class_weights=[0.2, 1.0, 2.0]), sf.nn.JaccardLoss()):
        torch._dynamo.reset()
        l1, l2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        got = torch.compile(lambda l, t: crit(l, t), backend="aot_eager", fullgraph=True, dynamic=dynamic)(l1, labels)
        want = crit(l2, labels)
        got.backward(), want.backward()
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(l1.grad, l2.grad)


def test_mixed_second_derivative_through_learned_class_weights_is_an_error():
    """d/d(class_weights) of the logits' gradient passes through the fused backward (the incoming gradient carries
    the weights): it raises the 'differentiate twice' error instead of returning None with allow_unused=True."""
    logits = torch.randn(2, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    cw = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    g, = torch.autograd.grad(sf.jaccard_loss(logits, torch.randint(0, 3, (2, 3, 2)), class_weights=cw), logits,
                             create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        torch.autograd.grad(g.square().sum(), cw, allow_unused=True)
