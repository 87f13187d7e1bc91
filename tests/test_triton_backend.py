"""The Triton backend called directly (not through ops.py), against the float64 references of tests/helpers.py.

Without a GPU the kernels run in Triton's interpreter on CPU tensors: TRITON_INTERPRET must be set before triton
is imported (it decides at kernel-definition time), hence the lines at the very top of this module.
"""
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from seg3d_fast.backends import triton as tb  # noqa: E402
from seg3d_fast.backends.reference import _onednn_safe  # noqa: E402
from seg3d_fast.backends.triton import conv3d_prelu as conv_mod  # noqa: E402
from seg3d_fast.backends.triton import jaccard as tj  # noqa: E402
from seg3d_fast.backends.triton._common import block_row_coords, carry_rows, row_split, strided_offset  # noqa: E402
from tests.helpers import BIG_GPU_MEMORY, assert_close, conv3d_prelu_plain, jaccard_sums_plain, randn  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


# ---------------------------------------------------------------------------------------------------------
# conv3d + bias + PReLU + residual
# ---------------------------------------------------------------------------------------------------------
def make_conv_case(dtype, k, stride, alpha_kind="channel", residual=None, layout="contiguous", c_in=3, c_out=5,
                   size=(2, 5, 6, 7), seed=0, negative_alpha=False, device=DEVICE):
    """Random inputs in float64 (leaves for autograd). alpha_kind: 'channel' | 'shared' | None;
    residual: None | 'first' | 'after'; layout of x / residual / grad_out: 'contiguous' | 'channels_last' |
    'noncontig'."""
    gen = torch.Generator().manual_seed(seed)
    n, d, h, w = size
    out_size = [(s - 1) // stride + 1 for s in (d, h, w)]
    kw = dict(dtype=torch.float64, generator=gen)
    case = dict(dtype=dtype, k=k, stride=stride, layout=layout, device=device)
    case["x"] = randn(n, c_in, d, h, w, **kw)
    case["weight"] = randn(c_out, c_in, k, k, k, **kw) / (c_in * k ** 3) ** 0.5
    case["bias"] = randn(c_out, **kw)
    if alpha_kind is None:
        case["alpha"] = None
    else:
        alpha = torch.rand(c_out if alpha_kind == "channel" else 1, generator=gen, dtype=torch.float64) * 0.5 + 0.05
        if negative_alpha:
            alpha[0] = -0.3
        case["alpha"] = alpha
    case["residual"] = randn(n, c_out, *out_size, **kw) if residual else None
    case["residual_first"] = residual == "first"
    # Mean-one upstream gradient: the shared-alpha gradient sums ~1e3 terms, and with a zero-mean grad_out that sum
    # cancels to noise, making every dtype's relative error ill-conditioned (as in tests/test_ops.py).
    case["grad_out"] = randn(n, c_out, *out_size, **kw) + 1
    return case


def in_layout(t, layout, dtype, device=DEVICE):
    """t (float64) cast to dtype and put in the requested memory layout."""
    if t is None:
        return None
    t = t.to(device=device, dtype=dtype)
    if layout == "channels_last" and t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    if layout == "noncontig" and t.dim() == 5:
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=dtype, device=device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


def reference_conv(case, dtype):
    """Forward and every gradient of the plain formula (autograd), in dtype. Returns a dict."""
    dev = case["device"]
    leaf = lambda t: None if t is None else t.detach().to(device=dev, dtype=dtype).clone().requires_grad_()
    x, w, b, alpha, res = (leaf(case[name]) for name in ("x", "weight", "bias", "alpha", "residual"))
    with _onednn_safe(x):  # (torch's oneDNN bf16 kernels fail on the CPU for some tiny strided shapes)
        z = F.conv3d(x, w, b, stride=case["stride"], padding=case["k"] // 2)
        if res is not None and case["residual_first"]:
            z = z + res
        z.retain_grad()
        y = z if alpha is None else F.prelu(z, alpha)
        out = y + res if (res is not None and not case["residual_first"]) else y
        out.backward(case["grad_out"].to(device=dev, dtype=dtype))
    return dict(out=out.detach(), act=y.detach(), z=z.detach(), grad_x=x.grad, grad_weight=w.grad, grad_bias=b.grad,
                grad_alpha=None if alpha is None else alpha.grad, grad_preact=z.grad)


def check_forward(case, save_act):
    dtype, layout = case["dtype"], case["layout"]
    x = in_layout(case["x"], layout, dtype)
    args = [case[name].to(device=case["device"], dtype=dtype) if case[name] is not None else None
            for name in ("weight", "bias", "alpha")]
    out, act = tb.conv3d_prelu_forward(x, *args, in_layout(case["residual"], layout, dtype), case["stride"],
                                       case["residual_first"], save_act)
    ref64, ref = reference_conv(case, torch.float64), reference_conv(case, dtype)
    assert out.dtype == dtype and out.shape == ref64["out"].shape
    want_cl = layout == "channels_last"
    assert out.is_contiguous(memory_format=torch.channels_last_3d if want_cl else torch.contiguous_format)
    assert_close(out, ref64["out"], ref["out"], dtype, "out")
    if save_act:
        assert_close(act, ref64["act"], ref["act"], dtype, "act")
    else:
        assert act is None


# (dtype, kernel, stride, alpha_kind, residual, layout, c_in, c_out): each dtype with each (kernel, stride);
# each alpha kind, residual mode and layout; channel counts for both K blockings (flat taps x channels for
# C_in not a multiple of 16, one tap per K block otherwise) and C_out above one column block.
FORWARD_CASES = [
    (F32, 3, 1, "channel", "after", "contiguous", 3, 5),
    (F32, 3, 2, "shared", "first", "channels_last", 3, 5),
    (F32, 1, 1, None, None, "noncontig", 3, 5),
    (F32, 1, 2, "channel", "first", "contiguous", 3, 5),
    (F16, 3, 1, "shared", None, "noncontig", 3, 5),
    (F16, 3, 2, "channel", "after", "contiguous", 3, 5),
    (F16, 1, 1, "channel", "first", "channels_last", 3, 5),
    (F16, 1, 2, None, "after", "noncontig", 3, 5),
    (BF16, 3, 1, None, "first", "channels_last", 3, 5),
    (BF16, 3, 2, "channel", None, "noncontig", 3, 5),
    (BF16, 1, 1, "shared", "after", "contiguous", 3, 5),
    (BF16, 1, 2, "channel", "after", "channels_last", 3, 5),
    (F32, 3, 2, "channel", "after", "channels_last", 16, 20),
    (BF16, 3, 1, "channel", "first", "contiguous", 32, 5),
    (F16, 3, 2, "shared", None, "contiguous", 20, 17),
    # flat K with runs of one tap's channels loaded together (VEC 8, 2, and 4 for fp32: 16-byte copies at most)
    (BF16, 3, 1, "channel", "after", "channels_last", 8, 12),
    (F16, 3, 2, "shared", "first", "contiguous", 6, 8),
    (F32, 3, 1, None, None, "noncontig", 8, 8),
    # 128-column tiles (fp16/bf16, one tap per K block, no residual): C_out 144 = a full tile and a masked one;
    # 128 = one unmasked tile
    (BF16, 3, 1, "channel", None, "channels_last", 16, 144),
    (F16, 3, 2, "shared", None, "contiguous", 32, 128),
]


@pytest.mark.parametrize("dtype,k,stride,alpha_kind,residual,layout,c_in,c_out", FORWARD_CASES)
def test_conv_forward(dtype, k, stride, alpha_kind, residual, layout, c_in, c_out):
    case = make_conv_case(dtype, k, stride, alpha_kind, residual, layout, c_in, c_out)
    check_forward(case, save_act=residual == "after" and alpha_kind is not None)


def run_backward(case, saved_kind, output_mask=(True,) * 5):
    dtype, layout, dev = case["dtype"], case["layout"], case["device"]
    ref = reference_conv(case, torch.float64)
    saved = {"act": ref["act"], "preact": ref["z"], "none": None}[saved_kind]
    cast = lambda t: None if t is None else t.to(device=dev, dtype=dtype)
    return tb.conv3d_prelu_backward(in_layout(case["grad_out"], layout, dtype), in_layout(case["x"], layout, dtype),
                                    cast(case["weight"]), cast(case["alpha"]), in_layout(saved, layout, dtype),
                                    saved_kind, case["stride"], output_mask)


def check_backward(case, saved_kind, output_mask=(True,) * 5):
    dtype = case["dtype"]
    grads = run_backward(case, saved_kind, output_mask)
    ref64, ref = reference_conv(case, torch.float64), reference_conv(case, dtype)
    names = ("grad_x", "grad_weight", "grad_bias", "grad_alpha", "grad_preact")
    inputs = (case["x"], case["weight"], case["bias"], case["alpha"], case["grad_out"])
    for name, got, wanted, inp in zip(names, grads, output_mask, inputs):
        if not wanted or (name == "grad_alpha" and case["alpha"] is None):
            assert got is None, f"{name} returned without being asked for"
            continue
        assert got.dtype == dtype and got.shape == inp.shape, (name, got.dtype, got.shape)
        assert_close(got, ref64[name], ref[name], dtype, name)
    return grads


@pytest.mark.parametrize("stride,c_in", [(1, 3), (2, 8)])
def test_conv_backward_channels_last_weight(stride, c_in):
    """A channels_last_3d weight (a model moved with .to(memory_format=...)): its gradient comes back in that layout
    (autograd then keeps it as the parameter's .grad without a copy), equal to the contiguous weight's."""
    case = make_conv_case(BF16, 3, stride, "channel", None, "channels_last", c_in, 6)
    plain = run_backward(case, "act")
    case["weight"] = case["weight"].contiguous(memory_format=torch.channels_last_3d)
    cl = run_backward(case, "act")
    assert cl[1].is_contiguous(memory_format=torch.channels_last_3d) and not cl[1].is_contiguous()
    assert plain[1].is_contiguous()
    for a, b in zip(plain, cl):
        assert (a is None and b is None) or torch.equal(a, b)


# (saved_kind, dtype, kernel, stride, alpha_kind, layout, c_in, c_out): every saved kind in every dtype, every
# (kernel, stride), each alpha kind and layout, both K blockings in dgrad (source channels = C_out) and wgrad.
BACKWARD_CASES = [
    ("act", F32, 3, 1, "channel", "contiguous", 3, 5),
    ("act", F16, 3, 2, "shared", "channels_last", 3, 5),
    ("act", BF16, 1, 2, "channel", "noncontig", 3, 5),
    ("preact", F32, 3, 2, "channel", "noncontig", 3, 5),
    ("preact", F16, 1, 1, "channel", "contiguous", 3, 5),
    ("preact", BF16, 3, 1, "shared", "channels_last", 3, 5),
    ("none", F32, 1, 2, None, "channels_last", 3, 5),
    ("none", F16, 3, 1, None, "noncontig", 3, 5),
    ("none", BF16, 3, 2, None, "contiguous", 3, 5),
    ("act", F32, 1, 1, "shared", "contiguous", 3, 5),
    ("act", BF16, 3, 2, "channel", "channels_last", 16, 16),
    ("preact", F32, 3, 1, "channel", "contiguous", 20, 17),
    ("act", BF16, 3, 2, "channel", "contiguous", 144, 16),  # dgrad on 128-column tiles (C_in = 144)
    ("act", BF16, 3, 1, "channel", "channels_last", 8, 24),  # flat-K dgrad in runs of 8 channels
    ("act", F16, 3, 2, "channel", "contiguous", 12, 8),  # the same, stride-2 classes
]


@pytest.mark.parametrize("saved_kind,dtype,k,stride,alpha_kind,layout,c_in,c_out", BACKWARD_CASES)
def test_conv_backward(saved_kind, dtype, k, stride, alpha_kind, layout, c_in, c_out):
    case = make_conv_case(dtype, k, stride, alpha_kind, None, layout, c_in, c_out,
                          negative_alpha=saved_kind == "preact")
    check_backward(case, saved_kind)


@pytest.mark.parametrize("output_mask", [(True, False, False, False, False), (False, False, True, True, False),
                                         (False, False, False, False, True), (False, True, False, True, True)])
def test_conv_backward_output_subsets(output_mask):
    """Only the asked-for gradients come back (the bias/alpha/dz-only pass skips the weight GEMM)."""
    check_backward(make_conv_case(F32, 3, 2, "channel", None, "contiguous", seed=3), "act", output_mask)


def test_conv_backward_no_activation_grad_preact_is_grad_out():
    case = make_conv_case(F32, 1, 1, None)
    grads = check_backward(case, "none")
    assert torch.equal(grads[4].double().cpu(), case["grad_out"].float().double())


def test_conv_wgrad_gemm_many_splits_and_tiles(monkeypatch):
    """The v2 weight GEMM with several voxel splits, (tap, C_in) tiles of several taps that end inside a tap
    (C_in = 48: 1296 rows, 11 tiles of 128) and two C_out tiles, stride 2 over odd extents (420 output voxels:
    2 splits of 256, given 8 parallel slots: the interpreter's 4 make one split for 22 tiles)."""
    monkeypatch.setattr(conv_mod, "parallel_slots", lambda device: 8)
    monkeypatch.setattr(conv_mod, "_WGRAD_MIN_VOX", conv_mod._VOX_GRAIN)  # (a GPU's minimum: one split here)
    assert conv_mod._voxel_splits(2, 420, 11 * 2, torch.device(DEVICE)) == (2, 1)
    case = make_conv_case(BF16, 3, 2, "channel", None, "channels_last", 48, 70, size=(2, 11, 9, 13), seed=11)
    check_backward(case, "act", (False, True, False, False, False))


def test_conv_wgrad_gemm_uneven_voxel_splits(monkeypatch):
    """The weight GEMM's voxel grains split unevenly: 5 grains of 256 voxels over at most 4 programs (one parallel
    slot) make splits of 2, 2 and 1 grains, the last partly past the volume; every split's partial is summed."""
    monkeypatch.setattr(conv_mod, "parallel_slots", lambda device: 1)
    monkeypatch.setattr(conv_mod, "_WGRAD_MIN_VOX", conv_mod._VOX_GRAIN)
    m = 7 * 11 * 14  # 1078 output voxels: 5 grains
    assert conv_mod._voxel_splits(-(-m // conv_mod._VOX_GRAIN), m, 1, torch.device(DEVICE)) == (3, 2)
    case = make_conv_case(BF16, 3, 1, "channel", None, "channels_last", 3, 5, size=(1, 7, 11, 14), seed=31)
    check_backward(case, "act", (False, True, False, False, False))


def test_conv_forward_batch_and_single_voxel_extents():
    """N = 3 and extents of 1 and 2 (every tap of a 3x3x3 kernel but one falls into the padding)."""
    check_forward(make_conv_case(F32, 3, 2, "channel", "after", size=(3, 1, 2, 3), seed=5), save_act=True)
    check_backward(make_conv_case(F32, 3, 2, "channel", None, size=(3, 1, 2, 3), seed=6), "act")


def test_conv_wgrad_deterministic():
    """Split reduction over voxels with a fixed-order second stage: bitwise repeatable."""
    case = make_conv_case(F32, 3, 1, "channel", None, "contiguous", size=(2, 5, 6, 9), seed=7)
    first = run_backward(case, "act")
    second = run_backward(case, "act")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("saved_kind,dtype,stride", [("act", F32, 1), ("preact", BF16, 2)])
def test_conv_backward_prelu_at_zero_preactivation(saved_kind, dtype, stride):
    """Output voxels whose pre-activation is exactly 0 (a zero region of x, as an MRI's background, and a zero bias):
    PReLU's derivative there is alpha, as PyTorch's (z > 0 ? 1 : alpha). Random inputs never hit 0, so nothing else
    checks that the saved value 0 takes the alpha branch (dz = grad_out there changes grad_x and grad_bias)."""
    case = make_conv_case(dtype, 3, stride, "channel", None, "contiguous", size=(1, 4, 5, 7), seed=17,
                          negative_alpha=saved_kind == "preact")
    case["x"][..., :4] = 0  # W = 7: the output columns whose 3-wide window lies in columns 0..3 (and the padding)
    case["bias"].zero_()
    z = reference_conv(case, torch.float64)["z"]
    assert (z == 0).float().mean() > 0.3  # about 40% of the output voxels sit exactly at the kink
    check_backward(case, saved_kind)


def test_conv_backward_more_splits_than_one_summing_step(monkeypatch):
    """More voxel splits than _finish_kernel sums per step (16; a GPU's 4 programs per SM make hundreds of splits,
    the interpreter's 4 parallel slots at most 4): with 2 per step, 3 splits take a full step and a masked one, and
    the weight, bias and shared-alpha partials of every split are summed."""
    monkeypatch.setattr(conv_mod, "_FINISH_SPLITS", 2)
    monkeypatch.setattr(conv_mod, "_WGRAD_MIN_VOX", conv_mod._VOX_GRAIN)
    case = make_conv_case(BF16, 3, 1, "shared", None, "channels_last", 3, 5, size=(1, 5, 11, 13), seed=19)
    m = 5 * 11 * 13  # 3 grains of 256 voxels: 3 splits of the bias / alpha pass and of the weight GEMM
    assert conv_mod._voxel_splits(-(-m // conv_mod._VOX_GRAIN), m, 1, torch.device(DEVICE))[0] == 3
    check_backward(case, "act", (False, True, True, True, False))


@pytest.mark.parametrize("alpha_kind", ["shared", "channel"])
def test_conv_backward_bias_and_alpha_past_one_channel_block(alpha_kind):
    """C_out above the channels one _finish_kernel step sums (_FINISH_BLOCK = 256): the bias and alpha gradients of
    every channel block (the shared alpha's summed over all of them)."""
    assert conv_mod._FINISH_BLOCK < 264
    case = make_conv_case(F32, 1, 1, alpha_kind, None, "contiguous", 3, 264, size=(2, 3, 4, 5), seed=23)
    check_backward(case, "act", (False, False, True, True, False))


def test_conv_backward_float32_parameters_with_half_activations():
    """Mixed precision at the backend (autocast hands the op float32 parameters with a bf16 x): the weight, bias and
    alpha gradients come back in float32, not rounded to x's dtype (the ops layer casts a bf16 gradient back to
    float32, so only this sees that rounding), and within the bf16 tolerance of the float64 reference."""
    case = make_conv_case(BF16, 3, 2, "channel", None, "channels_last", size=(1, 5, 6, 7), seed=29)
    ref64, ref = reference_conv(case, torch.float64), reference_conv(case, BF16)
    lay = lambda t: in_layout(t, "channels_last", BF16)  # noqa: E731
    fp32 = lambda t: t.to(DEVICE, torch.float32)  # noqa: E731
    grads = tb.conv3d_prelu_backward(lay(case["grad_out"]), lay(case["x"]), fp32(case["weight"]),
                                     fp32(case["alpha"]), lay(ref64["act"]), "act", 2, (True,) * 5)
    names = ("grad_x", "grad_weight", "grad_bias", "grad_alpha", "grad_preact")
    for name, got, dtype in zip(names, grads, (BF16, F32, F32, F32, BF16)):
        assert got.dtype == dtype, (name, got.dtype)
        assert_close(got, ref64[name], ref[name], BF16, name)


def strided_views(bias, alpha):
    """(bias, alpha) pairs where one is a strided view with the same values: every other element of a larger buffer,
    or (alpha) one value expanded to every channel (stride 0)."""
    bank = torch.zeros(2 * bias.numel(), dtype=bias.dtype, device=bias.device)
    bank[::2] = bias
    alpha_bank = torch.zeros(2 * alpha.numel(), dtype=alpha.dtype, device=alpha.device)
    alpha_bank[::2] = alpha
    return [(bank[::2], alpha), (bias, alpha_bank[::2]), (bias, alpha[:1].expand(alpha.numel()))]


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_strided_bias_and_alpha(stride):
    """A strided bias or alpha (bias[::2] of a larger buffer, an alpha expanded from one value) gives the results of
    its contiguous copy: the kernels index them by channel alone, and read other values (bias[1] for channel 1, or
    past the one value of an expanded alpha)."""
    case = make_conv_case(F32, 3, stride, "channel", "after", c_in=3, c_out=5, size=(1, 3, 4, 5))
    x, r, g = (in_layout(case[name], "contiguous", F32) for name in ("x", "residual", "grad_out"))
    w, bias, alpha = (case[name].to(device=DEVICE, dtype=F32) for name in ("weight", "bias", "alpha"))
    for b, a in strided_views(bias, alpha):
        assert not (b.is_contiguous() and a.is_contiguous())
        out, act = tb.conv3d_prelu_forward(x, w, b, a, r, stride, False, True)
        want, want_act = tb.conv3d_prelu_forward(x, w, b.contiguous(), a.contiguous(), r, stride, False, True)
        assert torch.equal(out, want) and torch.equal(act, want_act)
        for kind in ("act", "preact"):
            grads = tb.conv3d_prelu_backward(g, x, w, a, act, kind, stride, (True,) * 5)
            wanted = tb.conv3d_prelu_backward(g, x, w, a.contiguous(), act, kind, stride, (True,) * 5)
            for got, exp in zip(grads, wanted):
                assert torch.equal(got, exp)


def test_conv_unsupported_reasons(monkeypatch):
    x, w = torch.randn(1, 4, 3, 3, 3), torch.randn(8, 4, 3, 3, 3)
    assert tb.conv3d_prelu_unsupported(x.to(DEVICE), w.to(DEVICE), None, None, None, 1, False) == []
    reasons = lambda *a: " | ".join(tb.conv3d_prelu_unsupported(*a))
    assert "kernel size" in reasons(x, torch.randn(8, 4, 5, 5, 5), None, None, None, 1, False)
    assert "groups" in reasons(x, torch.randn(8, 2, 3, 3, 3), None, None, None, 1, False)
    assert "dtype" in reasons(x.double(), w.double(), None, None, None, 1, False)
    assert "stride" in reasons(x, w, None, None, None, 3, False)
    assert "residual" in reasons(x, w, None, None, torch.randn(1, 8, 2, 2, 2), 1, False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "needs CUDA tensors" in reasons(x.cpu(), w.cpu(), None, None, None, 1, False)


def test_default_tiles_first_and_untuned_runs(monkeypatch):
    """On a GPU the autotuners' config lists start with the default tile (the one SEG3D_FAST_AUTOTUNE=0 uses), and
    default_tiles() runs every kernel on it (no timing of new shapes), restoring the lists after."""
    import triton

    from seg3d_fast.backends.triton import _common

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("SEG3D_FAST_AUTOTUNE", raising=False)
    gpu = [triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=3) for m, w in ((64, 4), (64, 8), (128, 8))]
    default = triton.Config({"BLOCK_M": 64}, num_warps=8, num_stages=3)
    configs = _common.autotune_configs(gpu, default, None)
    assert configs[0] is default and len(configs) == 3 and gpu[0] in configs and gpu[2] in configs
    monkeypatch.setenv("SEG3D_FAST_AUTOTUNE", "0")
    assert _common.autotune_configs(gpu, default, None) == [default]
    kernels = conv_mod._TUNED_KERNELS
    monkeypatch.setattr(kernels[0], "configs", list(configs))
    before = [k.configs for k in kernels]
    with conv_mod.default_tiles():
        assert all(len(k.configs) == 1 for k in kernels) and kernels[0].configs == [default]
    assert [k.configs for k in kernels] == before


def test_voxel_splits_are_whole_blocks_for_every_gpu_config(monkeypatch):
    """A weight-gradient split's voxel count (a multiple of _VOX_GRAIN) is a whole number of voxel blocks for every
    GPU tile config of both weight-gradient kernels: their loops step BLOCK_V from the split's start, so a grain
    that some BLOCK_V does not divide would add the next split's first voxels twice (the interpreter runs one small
    config only, so no numerical test sees it)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("SEG3D_FAST_AUTOTUNE", raising=False)
    configs = conv_mod._wgrad_configs() + conv_mod._wgrad_gemm_configs()
    assert len(configs) > 2 and max(c.kwargs["BLOCK_V"] for c in configs) > 64  # the GPU lists, not the interpreter's
    for c in configs:
        assert conv_mod._VOX_GRAIN % c.kwargs["BLOCK_V"] == 0, c


def test_dot_precision_follows_the_tf32_switch():
    """float32 dots are exact ("ieee") unless torch allows TF32 for matmuls; fp16 / bf16 take the tensor cores. (The
    interpreter ignores input_precision: only this checks it.)"""
    from seg3d_fast.backends.triton._common import dot_precision

    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert dot_precision(F32) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert dot_precision(F32) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert dot_precision(F16) == "tf32"
    assert dot_precision(BF16) == ("upcast" if os.environ.get("TRITON_INTERPRET") == "1" else "tf32")


def test_unavailable_reason(monkeypatch):
    assert tb.NAME == "triton"
    assert tb.unavailable_reason() is None  # this module runs only where triton imports and can run
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert "no CUDA device" in tb.unavailable_reason()


# ---------------------------------------------------------------------------------------------------------
# the opt-in TMA kernels (stride-1 convs and weight gradients, stride-2 dgrads; 16-byte channel rows): on sm_90+
# GPUs and under the interpreter
# ---------------------------------------------------------------------------------------------------------
class _CountedKernel:
    """Stands for a Triton kernel: counts its launches, then launches it."""

    def __init__(self, kernel, counts, name):
        self.kernel, self.counts, self.name = kernel, counts, name

    def __getitem__(self, grid):
        self.counts[self.name] += 1
        return self.kernel[grid]


@pytest.fixture
def tma_launches(monkeypatch):
    """The opt-in TMA kernels switched on; counts their launches ("conv": forward / dgrad, "wgrad")."""
    counts = {"conv": 0, "wgrad": 0}
    monkeypatch.setattr(conv_mod, "_conv_tma_kernel", _CountedKernel(conv_mod._conv_tma_kernel, counts, "conv"))
    monkeypatch.setattr(conv_mod, "_wgrad_tma_kernel", _CountedKernel(conv_mod._wgrad_tma_kernel, counts, "wgrad"))
    monkeypatch.setenv("SEG3D_FAST_TRITON_TMA", "1")
    yield counts


# (dtype, k, alpha_kind, residual, layout, c_in, c_out, size): odd extents that no box shape tiles (partial boxes on
# every face), N > 1, both kernel sizes, every epilogue, K blocks of 16, 32 and 64 channels (c_in 48: three per
# tap), C_out of one partial and of several column blocks
TMA_CASES = [
    (BF16, 3, "channel", "after", "channels_last", 16, 24, (2, 5, 7, 9)),
    (BF16, 3, "shared", "first", "contiguous", 48, 8, (2, 3, 9, 17)),
    (F16, 3, None, None, "noncontig", 32, 40, (1, 6, 5, 11)),
    (F16, 1, "channel", "first", "channels_last", 64, 16, (2, 4, 3, 10)),
    (F16, 3, "channel", None, "contiguous", 16, 24, (2, 7, 3, 5)),
    (BF16, 3, "channel", None, "channels_last", 16, 136, (1, 3, 4, 9)),
    # C_out a multiple of 16 with k = 3: the stride-1 dgrad on the TMA kernel with its flipped taps (TAP_SIGN -1;
    # the k = 1 case above has only the centre tap)
    (F16, 3, "shared", "after", "contiguous", 16, 16, (1, 3, 3, 5)),
]


@pytest.mark.parametrize("dtype,k,alpha_kind,residual,layout,c_in,c_out,size", TMA_CASES)
def test_conv_tma_forward_and_gradients(tma_launches, dtype, k, alpha_kind, residual, layout, c_in, c_out, size):
    """Forward, dgrad (where C_out is a multiple of 16 too) and wgrad through the TMA kernels, every output and
    gradient against the float64 reference."""
    case = make_conv_case(dtype, k, 1, alpha_kind, residual, layout, c_in, c_out, size=size, seed=c_in + c_out)
    check_forward(case, save_act=residual == "after" and alpha_kind is not None)
    assert tma_launches == {"conv": 1, "wgrad": 0}
    check_backward(case, "act" if alpha_kind is not None else "none")
    assert tma_launches == {"conv": 1 + (c_out % 16 == 0), "wgrad": 1}  # the dgrad's source channels are C_out


@pytest.mark.parametrize("dtype,size,c_in,c_out", [(BF16, (2, 5, 7, 9), 8, 32), (BF16, (1, 1, 2, 3), 24, 16),
                                                    (F16, (2, 6, 3, 4), 16, 48)])
def test_conv_tma_stride2_dgrad(tma_launches, dtype, size, c_in, c_out):
    """The stride-2 dgrad's parity classes on the TMA kernel (each class's taps computed in the kernel), odd and
    unit extents (classes without rows); every gradient against the float64 reference."""
    case = make_conv_case(dtype, 3, 2, "channel", None, "channels_last", c_in, c_out, size=size, seed=c_out)
    check_backward(case, "act")
    assert tma_launches == {"conv": 1, "wgrad": 0}  # the dgrad; the stride-2 weight gradient gathers


def test_conv_tma_wgrad_many_splits(tma_launches, monkeypatch):
    """The TMA weight gradient split over several voxel ranges (more parallel slots than the interpreter's
    default), the fp32 partials summed in a fixed order: against the reference, and bitwise repeatable."""
    monkeypatch.setattr(conv_mod, "parallel_slots", lambda device: 64)
    case = make_conv_case(BF16, 3, 1, "channel", None, "channels_last", 16, 16, size=(2, 5, 7, 9), seed=13)
    first = check_backward(case, "act", (False, True, False, False, False))[1]
    second = run_backward(case, "act", (False, True, False, False, False))[1]
    assert tma_launches["wgrad"] == 2 and torch.equal(first, second)


def test_conv_tma_matches_gather_kernel(tma_launches, monkeypatch):
    """The TMA kernel and the gathered-load kernel give the same forward (to bf16 rounding)."""
    case = make_conv_case(BF16, 3, 1, "channel", "first", "channels_last", 32, 16, size=(2, 5, 6, 7), seed=9)
    x = in_layout(case["x"], "channels_last", BF16)
    args = [case[name].to(device=DEVICE, dtype=BF16) for name in ("weight", "bias", "alpha")]
    res = in_layout(case["residual"], "channels_last", BF16)
    tma, _ = tb.conv3d_prelu_forward(x, *args, res, 1, True, False)
    monkeypatch.delenv("SEG3D_FAST_TRITON_TMA")
    gather, _ = tb.conv3d_prelu_forward(x, *args, res, 1, True, False)
    assert tma_launches["conv"] == 1
    torch.testing.assert_close(tma.float(), gather.float(), rtol=1e-2, atol=1e-2)


def test_conv_tma_unsupported_reasons(monkeypatch):
    """Each reason the TMA kernel gives way to the gathered-load kernel."""
    monkeypatch.delenv("SEG3D_FAST_TRITON_TMA", raising=False)
    x = torch.randn(1, 16, 3, 4, 5, device=DEVICE, dtype=BF16).contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(27 * 16, 32, device=DEVICE, dtype=BF16)
    opt_in = " | ".join(conv_mod.tma_unsupported(x, w, 1))
    assert "opt-in" in opt_in and "until it has been measured" not in opt_in  # (measured: runs 3 and 4, README)
    monkeypatch.setenv("SEG3D_FAST_TRITON_TMA", "1")
    assert conv_mod.tma_unsupported(x, w, 1) == [] or torch.cuda.get_device_capability()[0] < 9
    reasons = lambda *a: " | ".join(conv_mod.tma_unsupported(*a))
    assert "16 bytes" in reasons(x, w[:, :12], 1)
    assert "16 bytes" in reasons(x[:, :12], w, 1)
    shifted = torch.empty(w.numel() + 4, device=DEVICE, dtype=BF16)[4:].view(w.shape)  # 8 bytes past alignment
    assert "aligned" in reasons(x, shifted, 1)
    assert "batch" in reasons(x, w, 70000)
    assert "fp16/bf16" in reasons(x.float(), w.float(), 1)


@pytest.mark.parametrize("extents,block_m", [((5, 7, 9), 128), ((16, 20, 18), 128), ((128, 160, 144), 128),
                                             ((3, 3, 3), 64), ((1, 1, 200), 64)])
def test_tma_box_covers_with_least_waste(extents, block_m):
    """The chosen box has block_m voxels, rows of at least 8 voxels, and no other such box covers the volume with
    fewer voxels."""
    bd, bh, bw = conv_mod._tma_box(*extents, block_m)
    assert bd * bh * bw == block_m and bw >= 8
    cover = lambda b: math.prod(-(-e // s) * s for e, s in zip(extents, b))
    every = [(block_m // (h * w), h, w) for w in (8, 16, 32, 64) for h in (1, 2, 4, 8, 16)
             if block_m % (h * w) == 0 and block_m // (h * w) <= 16]
    assert cover((bd, bh, bw)) == min(cover(b) for b in every)


# ---------------------------------------------------------------------------------------------------------
# upsampling block: transposed conv (kernel 2, stride 2) + bias + PReLU + skip
# ---------------------------------------------------------------------------------------------------------
def upconv_plain(x, weight, bias, alpha, skip):
    out = F.prelu(F.conv_transpose3d(x, weight, bias, stride=2), alpha)
    return out + skip if skip is not None else out


UPCONV_CASES = [  # dtype, C_in, C_out, (N, D, H, W), layout, alpha, bias, skip
    (F32, 3, 5, (2, 3, 2, 5), "contiguous", "channel", True, True),
    (F32, 8, 8, (1, 3, 3, 3), "channels_last", "shared", False, True),
    (BF16, 5, 6, (2, 3, 4, 5), "channels_last", "channel", True, True),
    (BF16, 20, 17, (1, 2, 3, 3), "noncontig", "channel", True, False),
    (F16, 4, 3, (2, 2, 3, 3), "contiguous", "shared", True, True),
]


@pytest.mark.parametrize("dtype,c_in,c_out,size,layout,alpha_kind,bias,skip", UPCONV_CASES + [
    pytest.param(BF16, 8, 8, (1, 64, 80, 72), "channels_last", "channel", True, True, marks=requires_gpu),
    pytest.param(BF16, 32, 32, (2, 16, 20, 18), "contiguous", "channel", True, True, marks=requires_gpu)])
def test_upconv_forward_and_gradients(dtype, c_in, c_out, size, layout, alpha_kind, bias, skip, exact_fp32):
    """Forward and every gradient of the fused upsampling block against float64, alphas of both signs, N > 1, odd
    extents, channel counts under and over one 16-wide tile, NCDHW / channels-last / strided inputs."""
    gen = torch.Generator().manual_seed(3)
    n, d, h, w = size
    kw = dict(dtype=torch.float64, generator=gen)
    x64 = randn(n, c_in, d, h, w, **kw)
    w64 = randn(c_in, c_out, 2, 2, 2, **kw) / (c_in * 8) ** 0.5
    b64 = randn(c_out, **kw) if bias else None
    a64 = torch.linspace(-0.3, 0.4, c_out if alpha_kind == "channel" else 1, dtype=torch.float64)
    if alpha_kind == "shared":
        a64 = torch.tensor([-0.2], dtype=torch.float64)
    s64 = randn(n, c_out, 2 * d, 2 * h, 2 * w, **kw) if skip else None
    g64 = randn(n, c_out, 2 * d, 2 * h, 2 * w, **kw) + 1
    leaves64 = [t.clone().requires_grad_() if t is not None else None for t in (x64, w64, b64, a64)]
    ref = upconv_plain(*leaves64, s64)
    ref.backward(g64)

    def lay(t):
        t = t.to(device=DEVICE, dtype=dtype)
        if layout == "channels_last" and t.dim() == 5:
            return t.contiguous(memory_format=torch.channels_last_3d)
        if layout == "noncontig" and t.dim() == 5:  # the same values, every other element of a wider buffer
            return torch.stack([t, torch.zeros_like(t)], -1)[..., 0]
        return t

    x, wt, a, g = lay(x64), w64.to(DEVICE, dtype), a64.to(DEVICE, dtype), lay(g64)
    b = b64.to(DEVICE, dtype) if bias else None
    s_ = lay(s64) if skip else None
    out = tb.upconv_prelu_add_forward(x, wt, b, a, s_)
    grads = tb.upconv_prelu_add_backward(g, x, wt, b, a, (True, True, True, True))
    # plain PyTorch in the same dtype: the error the fused kernels are held to (on the CPU: in fp32 for fp16, which
    # its CPU convolution lacks)
    torch_dtype = F32 if (dtype == F16 and DEVICE == "cpu") else dtype
    leaves = [t.to(torch_dtype).clone().requires_grad_() if t is not None else None for t in (x64, w64, b64, a64)]
    theirs = upconv_plain(*leaves, s64.to(torch_dtype) if skip else None)
    theirs.backward(g64.to(torch_dtype))
    assert out.shape == ref.shape and out.dtype == dtype
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert_close(out, ref, theirs, dtype, "out")
    for name, got, leaf, their in zip(("x", "weight", "bias", "alpha"), grads, leaves64, leaves):
        if leaf is None:
            assert got is None
            continue
        assert got.shape == leaf.shape and got.dtype == dtype, name
        assert_close(got, leaf.grad, their.grad, dtype, f"grad {name}")


def test_upconv_wgrad_many_splits(monkeypatch):
    """The weight gradient summed over several voxel splits (a split's rows not a multiple of the row block, the last
    split shorter). 7 splits of 18 rows (120 in all; 16-row blocks under the interpreter): the number of splits is
    also bounded by the device's programs / 8, which the interpreter puts at 4 (one split), hence its patch."""
    from seg3d_fast.backends.triton import upconv

    monkeypatch.setattr(upconv, "_WGRAD_MIN_ROWS", 7)
    monkeypatch.setattr(upconv, "parallel_slots", lambda device: 56)
    gen = torch.Generator().manual_seed(5)
    x = randn(2, 6, 3, 4, 5, dtype=torch.float64, generator=gen)
    wt = randn(6, 4, 2, 2, 2, dtype=torch.float64, generator=gen) * 0.3
    a = torch.tensor([0.2, -0.1, 0.3, 0.25], dtype=torch.float64)
    g = randn(2, 4, 6, 8, 10, dtype=torch.float64, generator=gen)
    leaves = [t.clone().requires_grad_() for t in (x, wt)]
    upconv_plain(leaves[0], leaves[1], None, a, None).backward(g)
    _, grad_w, _, _ = tb.upconv_prelu_add_backward(g.float().to(DEVICE), x.float().to(DEVICE), wt.float().to(DEVICE),
                                                   None, a.float().to(DEVICE), (False, True, False, False))
    assert_close(grad_w, leaves[1].grad, None, F32, "grad weight")


@pytest.mark.parametrize("output_mask", [(False, False, False, True), (False, False, True, False),
                                         (True, False, False, False), (False, True, True, False)])
def test_upconv_backward_output_subsets(output_mask, exact_fp32):
    """Only the asked-for gradients of the upsampling block come back, each equal to float64's: a layer whose
    alpha alone (or bias alone) is trained still gets that gradient."""
    gen = torch.Generator().manual_seed(9)
    x = randn(2, 3, 3, 2, 5, dtype=torch.float64, generator=gen)
    wt = randn(3, 5, 2, 2, 2, dtype=torch.float64, generator=gen) * 0.4
    b = randn(5, dtype=torch.float64, generator=gen)
    a = torch.linspace(-0.3, 0.4, 5, dtype=torch.float64)
    g = randn(2, 5, 6, 4, 10, dtype=torch.float64, generator=gen) + 1
    leaves = [t.clone().requires_grad_() for t in (x, wt, b, a)]
    upconv_plain(*leaves, None).backward(g)
    grads = tb.upconv_prelu_add_backward(g.float().to(DEVICE), *(t.float().to(DEVICE) for t in (x, wt, b, a)),
                                         output_mask)
    for name, got, wanted, leaf in zip(("x", "weight", "bias", "alpha"), grads, output_mask, leaves):
        if not wanted:
            assert got is None, f"grad {name} returned without being asked for"
            continue
        assert got is not None and got.shape == leaf.shape, f"grad {name} missing"
        assert_close(got, leaf.grad, None, F32, f"grad {name}")


def test_upconv_strided_bias_and_alpha(exact_fp32):
    """A strided bias or alpha (as test_conv_strided_bias_and_alpha) gives the results of its contiguous copy."""
    gen = torch.Generator().manual_seed(13)
    x = randn(2, 3, 2, 3, 2, dtype=torch.float64, generator=gen).float().to(DEVICE)
    wt = (randn(3, 4, 2, 2, 2, dtype=torch.float64, generator=gen) * 0.4).float().to(DEVICE)
    bias = randn(4, dtype=torch.float64, generator=gen).float().to(DEVICE)
    alpha = torch.tensor([0.2, -0.1, 0.3, 0.25], device=DEVICE)
    g = randn(2, 4, 4, 6, 4, dtype=torch.float64, generator=gen).float().to(DEVICE)
    for b, a in strided_views(bias, alpha):
        out = tb.upconv_prelu_add_forward(x, wt, b, a, None)
        assert torch.equal(out, tb.upconv_prelu_add_forward(x, wt, b.contiguous(), a.contiguous(), None))
        grads = tb.upconv_prelu_add_backward(g, x, wt, b, a, (True,) * 4)
        wanted = tb.upconv_prelu_add_backward(g, x, wt, b.contiguous(), a.contiguous(), (True,) * 4)
        for got, exp in zip(grads, wanted):
            assert torch.equal(got, exp)


def test_upconv_unsupported_reasons():
    x = torch.zeros(1, 200, 2, 2, 2, device=DEVICE)
    reasons = tb.upconv_prelu_add_unsupported(x, torch.zeros(200, 4, 2, 2, 2, device=DEVICE), None,
                                              torch.ones(1, device=DEVICE), None)
    assert any("200 -> 4 channels" in r for r in reasons)
    for c_in, c_out in ((4, 33), (33, 4)):  # either side past MAX_CHANNELS; MAX_CHANNELS itself runs
        x = torch.zeros(1, c_in, 2, 2, 2, device=DEVICE)
        alpha = torch.ones(1, device=DEVICE)
        assert any(f"{c_in} -> {c_out} channels" in r for r in tb.upconv_prelu_add_unsupported(
            x, torch.zeros(c_in, c_out, 2, 2, 2, device=DEVICE), None, alpha, None))
    x, w32, alpha = (torch.zeros(1, 32, 2, 2, 2, device=DEVICE), torch.zeros(32, 32, 2, 2, 2, device=DEVICE),
                     torch.ones(1, device=DEVICE))
    assert tb.upconv_prelu_add_unsupported(x, w32, None, alpha, None) == []
    assert any("no elements" in r for r in tb.upconv_prelu_add_unsupported(x[:0], w32, None, alpha, None))
    x64 = torch.zeros(1, 4, 2, 2, 2, dtype=torch.float64, device=DEVICE)
    assert any("float64" in r for r in tb.upconv_prelu_add_unsupported(x64, x64.new_zeros(4, 4, 2, 2, 2), None,
                                                                       x64.new_ones(1), None))


# ---------------------------------------------------------------------------------------------------------
# 64-bit index arithmetic
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _to_bf16_kernel(src_ptr, out_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, tl.load(src_ptr + offsets).to(tl.bfloat16))


def test_fp32_to_bf16_rounds_to_nearest_even():
    """The kernels' fp32 -> bf16 casts round as torch does, on the GPU and (through tests/conftest.py's fix of the
    interpreter's truncation) on the CPU: halfway cases to even, NaN and infinities kept."""
    halfway = torch.tensor([0x3F808000, 0x3F818000, 0x3F80C000, 0x3F807FFF], dtype=torch.int32).view(torch.float32)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.4e38, -0.0, 1e-40])
    src = torch.cat([torch.randn(246, dtype=torch.float64).float(), halfway, special]).to(DEVICE)
    out = torch.empty(src.shape, dtype=torch.bfloat16, device=DEVICE)
    _to_bf16_kernel[(1,)](src, out, BLOCK=256)
    expected = src.to(torch.bfloat16)
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out[~expected.isnan()].view(torch.int16), expected[~expected.isnan()].view(torch.int16))


@triton.jit
def _index_probe_kernel(start_ptr, out_ptr, E1, E2, E3, s_n, s_1, s_2, s_3, BLOCK: tl.constexpr):
    """Program p writes (n, i1, i2, i3, offset) of the BLOCK rows from start_ptr[p] on, as the kernels split them."""
    p = tl.program_id(0)
    n, a, b, c = block_row_coords(tl.load(start_ptr + p), E1, E2, E3, BLOCK)
    off = strided_offset(n, a, b, c, s_n, s_1, s_2, s_3)
    base = out_ptr + (p * BLOCK + tl.arange(0, BLOCK)) * 5
    tl.store(base, n)
    tl.store(base + 1, a.to(tl.int64))
    tl.store(base + 2, b.to(tl.int64))
    tl.store(base + 3, c.to(tl.int64))
    tl.store(base + 4, off)


@pytest.mark.parametrize("shape", [(40, 64, 256, 512, 520), (9, 8, 3, 2, 3)])
def test_block_row_coords_exact_past_2_31(shape):
    """The row -> (n, d, h, w) split and the strided offsets the kernels use. (40, 64, 256, 512, 520) is a virtual
    channels-last tensor of 2.7e9 rows and 1.7e11 elements, far beyond int32; (9, 8, 3, 2, 3) has extents below
    the block, so one block carries across many rows, planes and samples."""
    n, c, d, h, w = shape
    strides = (d * h * w * c, h * w * c, w * c, c)  # channels-last: n, d, h, w
    rows = n * d * h * w
    block = 32
    picks = [0, 1, w - 1, w, h * w + 3, 2 ** 31 - 1, 2 ** 31 - 5, 2 ** 31 + 12345, 2 ** 32 + 7, rows - block,
             rows // 3, (rows * 5) // 7, 123456789, 3 * 2 ** 30 + 17, rows - w - 3]
    picks = [p for p in picks if 0 <= p <= rows - block]
    starts = torch.tensor(picks, dtype=torch.int64, device=DEVICE)
    out = torch.empty(len(picks) * block * 5, dtype=torch.int64, device=DEVICE)
    _index_probe_kernel[(len(picks),)](starts, out, d, h, w, *strides, BLOCK=block)
    got = out.view(len(picks), block, 5).cpu().tolist()
    for start, block_got in zip(picks, got):
        for row, (gn, ga, gb, gc, goff) in zip(range(start, start + block), block_got):
            en, rest = divmod(row, d * h * w)
            ea, rest = divmod(rest, h * w)
            eb, ec = divmod(rest, w)
            assert (gn, ga, gb, gc) == (en, ea, eb, ec), row
            assert goff == en * strides[0] + ea * strides[1] + eb * strides[2] + ec * strides[3], row


@triton.jit
def _walk_probe_kernel(out_ptr, start, E1, E2, E3, M1, S1, M2, S2, M3, S3, STEPS: tl.constexpr,
                       BLOCK: tl.constexpr):
    """(n, i1, i2, i3) of STEPS consecutive blocks of rows from `start`, walked as the weight-gradient GEMM walks
    them (row_split once, then carry_rows per block and for the next block's start)."""
    n0, a0, b0, c0 = row_split(start, E1, E2, E3)
    for s in range(STEPS):
        n, a, b, c = carry_rows(tl.arange(0, BLOCK) + c0, b0, a0, n0, E1, E2, E3, M1, S1, M2, S2, M3, S3)
        base = out_ptr + (s * BLOCK + tl.arange(0, BLOCK)) * 4
        tl.store(base, n)
        tl.store(base + 1, a.to(tl.int64))
        tl.store(base + 2, b.to(tl.int64))
        tl.store(base + 3, c.to(tl.int64))
        n0, a0, b0, c0 = carry_rows(c0 + BLOCK, b0, a0, n0, E1, E2, E3, M1, S1, M2, S2, M3, S3)


@pytest.mark.parametrize("extents,start", [((3, 5, 7), 11), ((1, 2, 1), 0), ((64, 80, 72), 2 ** 31 + 999),
                                           ((9, 8, 37), 3000)])
def test_carry_rows_walks_blocks_without_division(extents, start):
    """The multiply-high division (fast_div, exact for 0 <= n < 2^31 by any divisor) and the block-to-block walk of
    the weight gradient's voxel loop give the plain row-major split, across lines, planes and samples (blocks
    longer than a line, extents of 1 and 2, a start past 2^31)."""
    from seg3d_fast.backends.triton._common import fast_divisor

    e1, e2, e3 = extents
    steps, block = 5, 32
    out = torch.empty(steps * block * 4, dtype=torch.int64, device=DEVICE)
    _walk_probe_kernel[(1,)](out, start, e1, e2, e3, *fast_divisor(e1), *fast_divisor(e2), *fast_divisor(e3),
                             STEPS=steps, BLOCK=block)
    for row, got in zip(range(start, start + steps * block), out.view(-1, 4).cpu().tolist()):
        n, rest = divmod(row, e1 * e2 * e3)
        a, rest = divmod(rest, e2 * e3)
        assert got == [n, a, *divmod(rest, e3)], row
    for d in (1, 2, 3, 7, 144, 2 ** 20 + 7, 2 ** 31 - 1):  # the divisor's (multiplier, shift) fit 32 bits
        multiplier, shift = fast_divisor(d)
        assert 0 < multiplier < 2 ** 32 and 0 <= shift <= 31
        for n in (0, 1, d - 1, d, 5 * d + 3, 2 ** 31 - 1):  # the round-up method, in exact integers
            assert (((n * multiplier) >> 32) + n) >> shift == n // d, (d, n)


# ---------------------------------------------------------------------------------------------------------
# Jaccard sums
# ---------------------------------------------------------------------------------------------------------
def make_target(kind, n, c, size, gen, ignore_index):
    if kind == "probs":
        return torch.randn(n, c, *size, dtype=torch.float64, generator=gen).softmax(1)
    labels = torch.randint(0, c, (n, *size), generator=gen)
    if ignore_index is not None:
        labels[torch.rand(labels.shape, generator=gen) < 0.2] = ignore_index
    return labels.to({"int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8}[kind])


# (dtype, activation, squared, target kind, ignore_index, layout, classes)
JACCARD_CASES = [
    (F32, "softmax", True, "int64", 255, "contiguous", 5),
    (F32, "sigmoid", False, "int32", None, "channels_last", 5),
    (F16, "softmax", False, "uint8", 7, "noncontig", 5),
    (F16, "sigmoid", True, "probs", None, "contiguous", 5),
    (BF16, "softmax", True, "probs", None, "channels_last", 5),
    (BF16, "sigmoid", True, "int64", -100, "contiguous", 5),
    (F32, "softmax", True, "int64", None, "noncontig", 37),
    (F32, "softmax", False, "int64", 0, "contiguous", 64),
    (F32, "softmax", True, "int64", None, "contiguous", 1),
]


@pytest.mark.parametrize("dtype,activation,squared,target_kind,ignore_index,layout,classes", JACCARD_CASES)
def test_jaccard_sums_and_backward(dtype, activation, squared, target_kind, ignore_index, layout, classes):
    gen = torch.Generator().manual_seed(11)
    n, size = 2, (3, 5, 7)
    logits64 = randn(n, classes, *size, dtype=torch.float64, generator=gen) * 3
    target = make_target(target_kind, n, classes, size, gen, ignore_index).to(DEVICE)
    target_in = in_layout(target, layout, dtype) if target.dtype.is_floating_point else target
    grad_sums = torch.randn(n, classes, 3, dtype=torch.float64, generator=gen)
    logits = in_layout(logits64, layout, dtype)

    sums = tb.jaccard_sums(logits, target_in, squared, activation, ignore_index)
    assert sums.dtype == torch.float32 and sums.shape == (n, classes, 3)
    grad = tb.jaccard_sums_backward(grad_sums.float().to(DEVICE), logits, target_in, squared, activation,
                                    ignore_index)
    assert grad.dtype == dtype and grad.shape == logits.shape

    results = {}
    for dt in (torch.float64, dtype):
        lg = logits64.to(device=DEVICE, dtype=dt).clone().requires_grad_()
        tg = target.to(dt) if target.dtype.is_floating_point else target
        s = jaccard_sums_plain(lg, tg, squared, activation, ignore_index)
        (s * grad_sums.to(device=DEVICE, dtype=dt)).sum().backward()
        results[dt] = (s.detach(), lg.grad)
    assert_close(sums, results[torch.float64][0], results[dtype][0], dtype, "sums")
    assert_close(grad, results[torch.float64][1], results[dtype][1], dtype, "grad_logits")
    if ignore_index is not None:
        assert (grad.movedim(1, -1)[target == ignore_index] == 0).all()


@pytest.mark.parametrize("layout,classes", [("contiguous", 5), ("channels_last", 3)])
def test_jaccard_large_logits(layout, classes):
    """Logits of magnitude up to a few hundred (an overconfident network; exp overflows float32 past 88): the
    softmax must subtract the voxel's largest logit before exp, in the sums and in the backward's recomputed
    probabilities, for both tile shapes (classes within a thread, classes across threads)."""
    gen = torch.Generator().manual_seed(17)
    n, size = 2, (3, 5, 7)
    logits64 = randn(n, classes, *size, dtype=torch.float64, generator=gen) * 60
    target = make_target("int64", n, classes, size, gen, None).to(DEVICE)
    grad_sums = torch.randn(n, classes, 3, dtype=torch.float64, generator=gen)
    logits = in_layout(logits64, layout, F32)
    sums = tb.jaccard_sums(logits, target, True, "softmax", None)
    grad = tb.jaccard_sums_backward(grad_sums.float().to(DEVICE), logits, target, True, "softmax", None)
    lg = logits64.to(DEVICE).clone().requires_grad_()
    s = jaccard_sums_plain(lg, target, True, "softmax")
    (s * grad_sums.to(DEVICE)).sum().backward()
    assert_close(sums, s.detach(), None, F32, "sums")
    assert_close(grad, lg.grad, None, F32, "grad_logits")


@pytest.mark.parametrize("per_sample,mean,weighted,target_kind,ignore_index,classes,smooth", [
    (False, True, False, "int64", None, 4, 0.5), (True, True, True, "uint8", 7, 5, 0.0),
    (False, False, True, "probs", None, 3, 0.5), (True, False, False, "int32", None, 2, 0.5),
    (False, True, True, "int64", 3, 33, 0.0)])
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")  # (the interpreter's 0 / 0)
def test_jaccard_loss_reduced(per_sample, mean, weighted, target_kind, ignore_index, classes, smooth):
    """The fused loss (two launches) and its one-launch backward against the float64 formula of the plain sums; the
    label range its kernel finds (counted labels only). smooth=0 with a class count that is no power of two: the
    padding classes' 0 / 0 terms must stay out of the loss and of the gradient."""
    from seg3d_fast.ops import jaccard_from_sums

    gen = torch.Generator().manual_seed(classes)
    n, size = 3, (4, 5, 7)
    logits64 = randn(n, classes, *size, dtype=torch.float64, generator=gen) * 3
    target = make_target(target_kind, n, classes, size, gen, ignore_index).to(DEVICE)
    weights = torch.rand(classes, dtype=torch.float64, generator=gen) + 0.5 if weighted else torch.ones(classes)
    weights[0] = 0  # the background left out
    logits = logits64.to(device=DEVICE, dtype=BF16)
    loss, sums, label_range = tb.jaccard_loss_reduced(logits, target, True, "softmax", ignore_index, smooth,
                                                      weights.float().to(DEVICE), per_sample, mean)
    grad = tb.jaccard_loss_reduced_backward(torch.tensor(0.75, device=DEVICE), sums, weights.float().to(DEVICE),
                                            logits, target, True, "softmax", ignore_index, smooth, per_sample, mean)
    results = {}
    for dt in (torch.float64, BF16):
        lg = logits64.to(device=DEVICE, dtype=dt).clone().requires_grad_()
        plain = jaccard_sums_plain(lg, target.to(dt) if target.dtype.is_floating_point else target, True, "softmax",
                                   ignore_index).double()
        ref = jaccard_from_sums(plain, smooth=smooth, class_weights=weights.to(plain), include_background=False,
                                per_sample=per_sample, reduction="mean" if mean else "sum")
        (ref * 0.75).backward()
        rows = plain.detach() if per_sample else plain.detach().sum(0, keepdim=True)  # the loss's rows
        results[dt] = (rows, ref.detach(), lg.grad)
    assert loss.dtype == torch.float32 and loss.shape == () and grad.dtype == BF16
    assert_close(sums, results[torch.float64][0], results[BF16][0], BF16, "sums")
    assert_close(loss, results[torch.float64][1], results[BF16][1], BF16, "loss")
    assert_close(grad, results[torch.float64][2], results[BF16][2], BF16, "grad_logits")
    # the backward reads only the loss's rows (pooled: one, not the N samples' summed by every program)
    grad = tb.jaccard_loss_reduced_backward(torch.tensor(0.75, device=DEVICE), results[torch.float64][0].float(),
                                            weights.float().to(DEVICE), logits, target, True, "softmax", ignore_index,
                                            smooth, per_sample, mean)
    assert_close(grad, results[torch.float64][2], results[BF16][2], BF16, "grad_logits from the reference sums")
    if target_kind == "probs":
        assert label_range is None
    else:
        counted = target[target != ignore_index] if ignore_index is not None else target
        assert label_range.tolist() == [counted.min().item(), counted.max().item()]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("programs,loss_rows,size", [(2, 8, (4, 5, 7)), (3, 16, (5, 7, 9))])
def test_jaccard_programs_loop_over_tiles(monkeypatch, layout, programs, loss_rows, size):
    """With more tiles than MAX_PROGRAMS, each sums program adds up several tiles (the last one past the volume),
    and the loss kernel several steps of partial rows (the last step's rows partly past the blocks: 3 blocks in steps
    of 2): sums, loss, label range and gradient still match float64, for both tile shapes (classes within a thread
    for NCDHW logits, else _TILE elements). The least and the greatest label occur only in the volume's last tile,
    which is no program's first."""
    from seg3d_fast.ops import jaccard_from_sums

    assert [tj._sums_grid(t) for t in (1, 2048, 2049, 11520)] == [(1, 1), (2048, 1), (1025, 2), (1920, 6)]
    assert tj.tile_shape(8, True) == (512, 2) and tj.tile_shape(16, True) == (128, 1)
    monkeypatch.setattr(tj, "NUM_WARPS", 1)  # NCDHW: 64 voxels a tile, 3 tiles for 4 x 5 x 7, 5 for 5 x 7 x 9
    monkeypatch.setattr(tj, "_TILE", 128)  # channels-last: 16 voxels a tile for 5 classes, 9 tiles (or 20)
    monkeypatch.setattr(tj, "MAX_PROGRAMS", programs)  # 2 programs of 2 (or 5) tiles each; 3 of 2 (or 7)
    monkeypatch.setattr(tj, "_LOSS_ROWS", loss_rows)  # 1 partial row a step; 2
    gen = torch.Generator().manual_seed(3)
    n, classes = 2, 5
    logits64 = randn(n, classes, *size, dtype=torch.float64, generator=gen) * 3
    target = make_target("int64", n, classes, size, gen, 255)
    target[(target == 0) | (target == classes - 1)] = 1
    target[1, -1, -1, -1], target[0, -1, -1, -1] = 0, classes - 1
    target = target.to(DEVICE)
    weights = torch.ones(classes)
    logits = in_layout(logits64, layout, F32)
    loss, sums, label_range = tb.jaccard_loss_reduced(logits, target, True, "softmax", 255, 1.0,
                                                      weights.to(DEVICE), True, True)
    grad = tb.jaccard_loss_reduced_backward(torch.tensor(1.0, device=DEVICE), sums, weights.to(DEVICE), logits,
                                            target, True, "softmax", 255, 1.0, True, True)
    lg = logits64.to(DEVICE).clone().requires_grad_()
    plain = jaccard_sums_plain(lg, target, True, "softmax", 255)
    ref = jaccard_from_sums(plain, smooth=1.0, class_weights=weights.to(plain), per_sample=True, reduction="mean")
    ref.backward()
    assert_close(sums, plain.detach(), None, F32, "sums")
    assert_close(tb.jaccard_sums(logits, target, True, "softmax", 255), plain.detach(), None, F32, "sums (sums path)")
    assert_close(loss, ref.detach(), None, F32, "loss")
    assert_close(grad, lg.grad, None, F32, "grad_logits")
    assert label_range.tolist() == [0, classes - 1]


def _size1_dim_layouts(gen):
    """(name, logits, labels) whose dims of size 1 carry strides that the layout checks ignore: 2-D channels-last
    logits and 1-D logits transposed from (N, L, C) (the ops layer appends size-1 dims to both), and a 5-D tensor
    whose size-1 dims have arbitrary strides."""
    lab2 = torch.randint(0, 3, (2, 4, 5), generator=gen)
    lab1 = torch.randint(0, 3, (2, 7), generator=gen)
    odd = randn(1, 2, 1, 3, 1, dtype=torch.float64, generator=gen).permute(4, 3, 2, 1, 0).contiguous()
    return [("2d_channels_last", randn(2, 3, 4, 5, dtype=torch.float64, generator=gen).contiguous(
                memory_format=torch.channels_last), lab2),
            ("1d_transposed", randn(2, 7, 3, dtype=torch.float64, generator=gen).transpose(1, 2), lab1),
            ("5d_size1_strides", odd.permute(4, 3, 2, 1, 0), torch.randint(0, 2, (1, 1, 3, 1), generator=gen))]


def test_jaccard_loss_layouts_with_size1_dims():
    """The loss and its gradient through the public op on the triton backend, for logits whose size-1 dims have
    strides of no meaning (the spatial stride comes from the layout, not from the last dim's stride), against
    float64 on the reference backend."""
    import seg3d_fast as sf

    for name, logits64, labels in _size1_dim_layouts(torch.Generator().manual_seed(5)):
        for reduction in ("mean", "none"):
            results = {}
            for backend, dtype in (("reference", torch.float64), ("triton", F32)):
                lg = logits64.to(device=DEVICE, dtype=dtype).detach().requires_grad_()
                loss = sf.jaccard_loss(lg, labels.to(DEVICE), backend=backend, reduction=reduction)
                loss.sum().backward()
                results[backend] = (loss.detach(), lg.grad)
            (loss64, grad64), (loss32, grad32) = results["reference"], results["triton"]
            assert_close(loss32, loss64, None, F32, f"{name} {reduction} loss")
            assert_close(grad32, grad64, None, F32, f"{name} {reduction} grad")


def test_jaccard_loss_reduced_strided_class_weights():
    """Class weights that are a strided view (class_weights[::2] of a larger tensor, which ops.jaccard_loss passes on
    as they are) give the loss and gradient of their contiguous copy: the kernels read weight c at index c."""
    import seg3d_fast as sf

    gen = torch.Generator().manual_seed(21)
    logits = randn(2, 4, 3, 4, 5, dtype=torch.float64, generator=gen).float().to(DEVICE)
    labels = torch.randint(0, 4, (2, 3, 4, 5), generator=gen).to(DEVICE)
    bank = torch.tensor([1.0, 9.0, 2.0, 9.0, 0.5, 9.0, 3.0, 9.0], device=DEVICE)
    results = []
    for weights in (bank[::2], bank[::2].contiguous()):
        loss, sums, _ = tb.jaccard_loss_reduced(logits, labels, True, "softmax", None, 1e-5, weights, False, True)
        grad = tb.jaccard_loss_reduced_backward(torch.tensor(1.0, device=DEVICE), sums, weights, logits, labels, True,
                                                "softmax", None, 1e-5, False, True)
        results.append((loss, grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    want = sf.jaccard_loss(logits.cpu(), labels.cpu(), class_weights=bank[::2].cpu(), backend="reference")
    torch.testing.assert_close(results[0][0].cpu(), want)


def test_jaccard_loss_reduced_label_range_sees_bad_and_no_labels():
    """Out-of-range labels show in the range (they match no class); a volume whose labels are all ignored has an
    empty range, which no check rejects."""
    logits = torch.randn(2, 3, 4, 5, 6, device=DEVICE)
    labels = torch.randint(0, 3, (2, 4, 5, 6), device=DEVICE)
    labels[1, 2, 3, 4], labels[0, 0, 0, 0] = 9, -2
    w = torch.ones(3, device=DEVICE)
    assert tb.jaccard_loss_reduced(logits, labels, True, "softmax", None, 1e-5, w, False, True)[2].tolist() == [-2, 9]
    ignored = torch.full_like(labels, 255)
    lo, hi = tb.jaccard_loss_reduced(logits, ignored, True, "softmax", 255, 1e-5, w, False, True)[2].tolist()
    assert lo > 2 and hi < 0


def test_jaccard_unsupported_reasons(monkeypatch):
    logits = torch.randn(1, 65, 2, 2, 2, device=DEVICE)
    labels = torch.zeros(1, 2, 2, 2, dtype=torch.int64, device=DEVICE)
    reasons = lambda *a: " | ".join(tb.jaccard_unsupported(*a))
    assert "65 classes" in reasons(logits, labels, "softmax", None)
    assert tb.jaccard_unsupported(logits[:, :64], labels, "softmax", None) == []  # MAX_CLASSES itself runs
    assert "dtype" in reasons(logits[:, :5].double(), labels, "softmax", None)
    assert "activation" in reasons(logits[:, :5], labels, "relu", None)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "needs CUDA tensors" in reasons(logits[:, :5].cpu(), labels.cpu(), "softmax", None)


@triton.jit
def _sums_offset_probe_kernel(out_ptr, N, C, BLOCK_C: tl.constexpr):
    """The loss kernels' (N, C, 3) sums offsets of the last sample, its index the int32 counter of a loop over
    the samples (as in _jaccard_loss_kernel and _loss_sums_grad)."""
    c = tl.arange(0, BLOCK_C)
    for n in range(N - 1, N):
        tl.store(out_ptr + c, tj._sums_offset(n, C, c))


@pytest.mark.parametrize("n,c", [(11_200_000, 64), (400_000_000, 2), (3, 5)])
def test_jaccard_sums_offset_past_2_31(n, c):
    """(n * C + c) * 3 with an int32 sample counter wrapped past 2^31 (11.2 million samples of 64 classes: 7.2e8
    logits, a 1-D batch (N, C, 1)): the loss kernel stored the sums, and the fused backward read them, at negative
    offsets."""
    out = torch.zeros(64, dtype=torch.int64, device=DEVICE)
    _sums_offset_probe_kernel[(1,)](out, n, c, BLOCK_C=64)
    assert out.cpu().tolist() == [((n - 1) * c + k) * 3 for k in range(64)]


class _GridRecorder:
    """Stands in for a Triton kernel: records each launch's grid and runs nothing."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return lambda *args, **kwargs: None


def test_jaccard_grids_within_launch_limits(monkeypatch):
    """A batch of 70000 samples (1-D inputs, (N, C, 1), or small patches): the sums and backward kernels had the
    batch on the grid's second axis, which takes at most 65535 programs (the launch failed on the GPU). Every grid
    now stays within Triton's limits (2^31 - 1 programs on the first axis, 65535 on the others) and launches a
    program per (tile block, sample)."""
    recorders = {name: _GridRecorder() for name in ("_jaccard_sums_kernel", "_jaccard_backward_kernel",
                                                    "_jaccard_loss_kernel")}
    for name, recorder in recorders.items():
        monkeypatch.setattr(tj, name, recorder)
    n, c = 70000, 3
    logits = torch.zeros(n, c, 1, 1, 1, device=DEVICE)
    labels = torch.zeros(n, 1, 1, 1, dtype=torch.int64, device=DEVICE)
    w = torch.ones(c, device=DEVICE)
    tb.jaccard_sums(logits, labels, True, "softmax", None)
    _, sums, _ = tb.jaccard_loss_reduced(logits, labels, True, "softmax", None, 1e-5, w, False, True)
    tb.jaccard_sums_backward(torch.zeros(n, c, 3, device=DEVICE), logits, labels, True, "softmax", None)
    tb.jaccard_loss_reduced_backward(torch.tensor(1.0, device=DEVICE), sums, w, logits, labels, True, "softmax",
                                     None, 1e-5, False, True)
    grids = [g for r in recorders.values() for g in r.grids]
    assert len(grids) == 5  # sums twice, the loss once, the backward twice
    for grid in grids:
        assert grid[0] <= 2 ** 31 - 1 and all(axis <= 65535 for axis in grid[1:]), grid
    assert recorders["_jaccard_sums_kernel"].grids == [(n,), (n,)]  # one tile per sample, one block of tiles
    assert recorders["_jaccard_backward_kernel"].grids == [(n,), (n,)]


# ---------------------------------------------------------------------------------------------------------
# GPU: real sizes and > 2^31 elements
# ---------------------------------------------------------------------------------------------------------
@requires_gpu
@pytest.mark.parametrize("stride,c_in,c_out,saved_kind,layout", [(2, 32, 64, "act", "channels_last"),
                                                                 (1, 32, 32, "preact", "contiguous"),
                                                                 (1, 4, 8, "act", "channels_last")])
def test_gpu_conv_real_size(stride, c_in, c_out, saved_kind, layout):
    residual = "after" if saved_kind == "act" else "first"
    case = make_conv_case(BF16, 3, stride, "channel", residual, layout, c_in, c_out, size=(1, 64, 80, 72),
                          negative_alpha=saved_kind == "preact", device="cuda")
    check_forward(case, save_act=residual == "after")
    check_backward(case, saved_kind)


@requires_gpu
@pytest.mark.parametrize("stride,c_in,c_out,saved_kind", [(1, 64, 64, "act"), (2, 32, 64, "act"),
                                                          (1, 16, 32, "preact")])
def test_gpu_conv_tma_real_size(tma_launches, stride, c_in, c_out, saved_kind):
    """The opt-in TMA kernels at a real size on an sm_90+ GPU: forward and wgrad (stride 1) and dgrad (stride 1 and
    the stride-2 parity classes), every output and gradient against the float64 reference."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA kernel needs compute capability 9.0+")
    residual = "after" if saved_kind == "act" else "first"
    case = make_conv_case(BF16, 3, stride, "channel", residual, "channels_last", c_in, c_out, size=(1, 64, 80, 72),
                          negative_alpha=saved_kind == "preact", device="cuda")
    check_forward(case, save_act=residual == "after")
    check_backward(case, saved_kind)
    assert tma_launches == ({"conv": 2, "wgrad": 1} if stride == 1 else {"conv": 1, "wgrad": 0})


@BIG_GPU_MEMORY
@requires_gpu
@pytest.mark.parametrize("c,w,tma,layout", [(8, 520, False, "channels_last"), (16, 264, True, "channels_last"),
                                             (8, 520, False, "contiguous")])
def test_gpu_conv_past_2_31_elements(monkeypatch, c, w, tma, layout):
    """x and out of 2.2e9 elements each (bf16): forward and grad_x, checked on the first and last planes; with 16
    channels on the TMA kernel where it runs (coordinates per dimension, 64-bit offsets in the epilogue); NCDHW too
    (the epilogue's channel offset c * D * H * W passes 2^31 there)."""
    if tma:
        monkeypatch.setenv("SEG3D_FAST_TRITON_TMA", "1")
    torch.cuda.empty_cache()
    n, d, h = 1, 1024, 512
    assert n * c * d * h * w > 2 ** 31
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, d, h, w, c, device="cuda", dtype=BF16, generator=gen).permute(0, 4, 1, 2, 3)
    if layout == "contiguous":
        x = x.contiguous()
    weight = torch.randn(c, c, 3, 3, 3, device="cuda", dtype=BF16, generator=gen) / 15
    bias = torch.randn(c, device="cuda", dtype=BF16, generator=gen)
    alpha = torch.rand(c, device="cuda", dtype=BF16, generator=gen) * 0.5 + 0.05
    out, _ = tb.conv3d_prelu_forward(x, weight, bias, alpha, None, 1, False, False)
    p64 = lambda t: t.double()
    for sl, keep in ((slice(0, 4), slice(0, 2)), (slice(d - 4, d), slice(2, 4))):
        ref = conv3d_prelu_plain(p64(x[:, :, sl]), p64(weight), p64(bias), p64(alpha), None, 1, False)[:, :, keep]
        got = out[:, :, sl][:, :, keep]
        assert_close(got, ref, conv3d_prelu_plain(x[:, :, sl], weight, bias, alpha, None, 1, False)[:, :, keep],
                     BF16, "out")
    grad_out = torch.randn(out.shape, device="cuda", dtype=BF16, generator=gen)
    grad_x = tb.conv3d_prelu_backward(grad_out, x, weight, alpha, out, "act", 1,
                                      (True, False, False, False, False))[0]
    # the last two input planes get their gradient from the last three output planes only; the PReLU mask is read
    # from the saved output the kernel was given (a bf16 recomputation would flip the sign of values near zero)
    y, g = out[:, :, -3:].clone(), grad_out[:, :, -3:]
    del out
    dz = torch.where(y > 0, g, g * alpha.view(1, -1, 1, 1, 1))
    ref = F.conv_transpose3d(p64(dz), p64(weight), padding=1)[:, :, 1:]
    ref_bf16 = F.conv_transpose3d(dz, weight, padding=1)[:, :, 1:]
    assert_close(grad_x[:, :, -2:], ref, ref_bf16, BF16, "grad_x")


@BIG_GPU_MEMORY
@requires_gpu
def test_gpu_upconv_past_2_31_elements():
    """The upsampling block with an output and grad_out of 2.2e9 elements each (bf16, channels-last, 8 -> 8
    channels, 3.4e7 input rows): forward on the first and last planes, grad_x of the last planes, and the weight,
    bias and alpha gradients of the whole volume against float64 computed in slabs of input planes."""
    torch.cuda.empty_cache()
    n, c, d, h, w = 1, 8, 256, 256, 520
    assert n * c * 8 * d * h * w > 2 ** 31
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, d, h, w, c, device="cuda", dtype=BF16, generator=gen).permute(0, 4, 1, 2, 3)
    weight = torch.randn(c, c, 2, 2, 2, device="cuda", dtype=BF16, generator=gen) / 8
    bias = torch.randn(c, device="cuda", dtype=BF16, generator=gen) * 0.1
    alpha = torch.linspace(-0.3, 0.4, c, device="cuda").to(BF16)
    out = tb.upconv_prelu_add_forward(x, weight, bias, alpha, None)
    p64 = lambda t: t.double()  # noqa: E731
    for sl, osl in ((slice(0, 2), slice(0, 4)), (slice(d - 2, d), slice(2 * d - 4, 2 * d))):
        ref = upconv_plain(p64(x[:, :, sl]), p64(weight), p64(bias), p64(alpha), None)
        assert_close(out[:, :, osl], ref, upconv_plain(x[:, :, sl], weight, bias, alpha, None), BF16, "out")
    del out
    grad_out = torch.randn(n, 2 * d, 2 * h, 2 * w, c, device="cuda", dtype=BF16, generator=gen).permute(0, 4, 1, 2, 3)
    grad_x, grad_w, grad_b, grad_a = tb.upconv_prelu_add_backward(grad_out, x, weight, bias, alpha,
                                                                  (True, True, True, True))
    leaves = [p64(t).requires_grad_() for t in (weight, bias, alpha)]
    slab = 32
    for p0 in range(0, d, slab):
        xs = p64(x[:, :, p0:p0 + slab]).requires_grad_()
        upconv_plain(xs, *leaves, None).backward(p64(grad_out[:, :, 2 * p0:2 * (p0 + slab)]))
    assert_close(grad_x[:, :, -2:], xs.grad[:, :, -2:], None, BF16, "grad x")
    for name, got, leaf in zip(("weight", "bias", "alpha"), (grad_w, grad_b, grad_a), leaves):
        assert_close(got, leaf.grad, None, BF16, f"grad {name}")


@BIG_GPU_MEMORY
@requires_gpu
@pytest.mark.parametrize("n,w", [(1, 1025), (2, 513)])
def test_gpu_jaccard_past_2_31_elements(n, w):
    """Logits of 2.2e9 elements in one sample, or in two (the sample offset n * C * S passes 2^31 in the second)."""
    torch.cuda.empty_cache()
    c, d, h = 2, 1024, 1024
    assert n * c * d * h * w > 2 ** 31
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(n, c, d, h, w, device="cuda", dtype=BF16, generator=gen)
    labels = torch.randint(0, c, (n, d, h, w), device="cuda", dtype=torch.uint8, generator=gen)
    sums = tb.jaccard_sums(logits, labels, True, "softmax", None)
    ref = sum(jaccard_sums_plain(logits[:, :, i:i + 128].double(), labels[:, i:i + 128], True, "softmax")
              for i in range(0, d, 128))
    assert_close(sums, ref, None, BF16, "sums")
    grad = tb.jaccard_sums_backward(torch.ones(n, c, 3, device="cuda"), logits, labels, True, "softmax", None)
    lg = logits[:, :, -2:].double().requires_grad_()
    (jaccard_sums_plain(lg, labels[:, -2:], True, "softmax")).sum().backward()
    assert_close(grad[:, :, -2:], lg.grad, None, BF16, "grad_logits")


@BIG_GPU_MEMORY
@requires_gpu
def test_gpu_jaccard_batch_past_grid_axis_limit():
    """70000 samples of 4^3 voxels (the sums and backward grids' sample axis was the second, limited to 65535):
    sums, fused loss and both backwards against float64 on the first and last samples."""
    from seg3d_fast.ops import jaccard_from_sums

    n, c = 70000, 3
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(n, c, 4, 4, 4, device="cuda", generator=gen)
    labels = torch.randint(0, c, (n, 4, 4, 4), device="cuda", generator=gen)
    w = torch.ones(c, device="cuda")
    sums = tb.jaccard_sums(logits, labels, True, "softmax", None)
    plain = jaccard_sums_plain(logits.double(), labels, True, "softmax")
    assert_close(sums, plain, None, F32, "sums")
    loss, fused_sums, _ = tb.jaccard_loss_reduced(logits, labels, True, "softmax", None, 1.0, w, True, True)
    ref = jaccard_from_sums(plain, smooth=1.0, per_sample=True, reduction="mean")
    assert_close(loss, ref, None, F32, "loss")
    grad_sums = torch.randn(n, c, 3, device="cuda", generator=gen)
    grad = tb.jaccard_sums_backward(grad_sums, logits, labels, True, "softmax", None)
    fused = tb.jaccard_loss_reduced_backward(torch.tensor(1.0, device="cuda"), fused_sums, w, logits, labels, True,
                                             "softmax", None, 1.0, True, True)
    for idx in (slice(0, 2), slice(n - 2, n)):
        lg = logits[idx].double().requires_grad_()
        (jaccard_sums_plain(lg, labels[idx], True, "softmax") * grad_sums[idx].double()).sum().backward()
        assert_close(grad[idx], lg.grad, None, F32, "grad_logits")
        lg = logits[idx].double().requires_grad_()
        s = jaccard_sums_plain(lg, labels[idx], True, "softmax")
        # per-sample mean: sample i's terms divided by N C (the loss kernel's MEAN over N rows)
        (jaccard_from_sums(s, smooth=1.0, per_sample=True, reduction="sum") / (n * c)).backward()
        assert_close(fused[idx], lg.grad, None, F32, "fused grad_logits")

# ---------------------------------------------------------------------------------------------------------
# every kernel variant compiles for the GPU (sm_90) with the installed Triton, without a GPU
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_kernels_compile_for_sm90_without_spills():
    """benchmarks/aot_check.py: each kernel variant in each dtype, with every tile config the prune functions keep,
    compiles for sm_90 through ptxas, fits the shared memory and spills no registers (in a fresh process: the
    kernels here are defined for the interpreter). About 100 s on 2 cores with an empty Triton cache."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "aot_check.py"), "--all-configs"],
                         capture_output=True, text=True, env=env, timeout=900)
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert lines and lines[-1].get("summary"), run.stdout[-2000:] + run.stderr[-2000:]
    summary = lines[-1]
    assert run.returncode == 0 and not summary["failed"], summary
    assert not summary["spilling"], summary
    rows = {r["kernel"]: r for r in lines[:-1]}
    # the tensor cores are used wherever the dtype allows (exact fp32 has none)
    assert all(r["wgmma"] > 0 for name, r in rows.items() if name.startswith(("conv/", "conv_tma/", "wgrad_gemm/"))
               and not name.endswith("fp32ieee")), rows
    # the TMA kernel's loads are bulk tensor copies, pipelined: the prologue issues two stages' copies ahead of the
    # loop's own two (an unpipelined loop, e.g. with loads of its tap offsets inside it, has 4 in all); the weight
    # gradient's small-channel tiles (under 64 rows) take mma.sync rather than wgmma
    assert all(r["tma"] >= 6 for name, r in rows.items() if name.startswith(("conv_tma/", "wgrad_tma/"))), rows
    assert all(r["wgmma"] + r["mma"] > 0 for name, r in rows.items() if name.startswith("wgrad_tma/")), rows
    # the tensor-core loops load their operands asynchronously (cp.async, pipelined), also for 8-channel layers
    # (compiled as the launcher specializes them: channel counts not multiples of 16), whose per-element 2-byte
    # loads each waited for memory before (507 PTX instructions per step against 151 now); the stride-2 dgrad's
    # flat-K classes read their tap offsets from the class table (2-4 small loads per step)
    assert all(r["loop_sync_loads"] == 0 for name, r in rows.items()
               if name.startswith(("conv/", "wgrad_gemm/")) and "phases_flat" not in name
               and not name.endswith("fp32ieee")), rows
