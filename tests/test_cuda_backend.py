"""The CUDA C++ backend (seg3d_fast/backends/cuda.py + csrc/) against the float64 references in helpers.py.

Each test runs seven ways: on a CUDA GPU with each kernel generation ("v3", the default: the halo kernel for stride-1
3x3x3 convs; "v2"; and the "v1" fallback; skipped here with "needs a CUDA GPU"); "simulated-v3" / "-v2" / "-v1": the
same kernels (and "simulated-v3-early": with every asynchronous copy landing at issue) (csrc/ compiled by the host
compiler against tests/cuda_sim/, every CUDA thread a CPU fiber, cp.async / ldmatrix / mma.sync modelled from the PTX
ISA) on CPU tensors; and "emulated": the backend's Python layer on CPU tensors against a model of the extension's
contract (cuda_emulator.py), which checks the layouts, argument structs, dgrad phases and scratch sizes on any
machine. Calls the backend contract (API.md) directly, so the ops layer is not involved.
"""
import itertools
import math
import os

import pytest
import torch

import cuda_emulator
from helpers import BIG_GPU_MEMORY, assert_close, jaccard_sums_plain, randn, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class _Backend:
    """The backend module, the device its tests put tensors on, and how it runs: "gpu", "simulated" (the kernels on
    the CPU) or "emulated" (a model of the kernels)."""

    def __init__(self, module, device, kind):
        self.module, self.device, self.kind = module, device, kind

    def __getattr__(self, name):
        return getattr(self.module, name)


@pytest.fixture(scope="module", params=[pytest.param("v3", marks=needs_gpu), pytest.param("v2", marks=needs_gpu),
                                        pytest.param("v1", marks=needs_gpu), "simulated-v3", "simulated-v3-early",
                                        "simulated-v2", "simulated-v1", "emulated"])
def cuda_backend(request):
    """The backend with each kernel generation (SEG3D_FAST_CUDA_KERNELS) on the GPU or simulated on the CPU, or
    emulated on the CPU."""
    from seg3d_fast.backends import cuda

    if request.param == "emulated":
        with cuda_emulator.emulated() as module:
            yield _Backend(module, "cpu", "emulated")
        return
    simulated = request.param.startswith("simulated-")
    version, _, copies = request.param.removeprefix("simulated-").partition("-")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(cuda.KERNELS_ENV, version)
        # "early": every cp.async lands at issue, which shows a pipeline buffer refilled while still being read (the
        # default lands it at its wait, which shows a read before the wait)
        mp.setenv("SEG3D_SIMT_CP_ASYNC", copies or "late")
        assert cuda.kernels_version() == int(version[1])
        if simulated:
            with cuda_emulator.emulated(extension=request.getfixturevalue("simulated_cuda_extension")) as module:
                yield _Backend(module, "cpu", "simulated")
            return
        assert cuda.unavailable_reason() is None, cuda.unavailable_reason()  # on a GPU machine it must be built
        yield _Backend(cuda, "cuda", "gpu")


def gpu_only(be, why):
    """Skips what only the kernels themselves show: they run on the GPU and in the simulation, not in the model."""
    if be.kind == "emulated":
        pytest.skip(f"{why}: a property of the kernels, tested on the GPU and simulated (needs a CUDA GPU)")


def real_gpu_only(be, why):
    """Skips what needs the GPU itself (e.g. its memory)."""
    if be.kind != "gpu":
        pytest.skip(f"{why} (needs a CUDA GPU)")


def one_simulation(be, why):
    """Runs a costly kernel test in one of the simulations only (simulated-v3, late copies; and on the GPU): for
    kernels that neither the generation nor the cp.async timing changes (the Jaccard kernels)."""
    gpu_only(be, why)
    if be.kind == "simulated" and (os.environ.get("SEG3D_FAST_CUDA_KERNELS") != "v3"
                                   or os.environ.get("SEG3D_SIMT_CP_ASYNC") == "early"):
        pytest.skip(f"{why}: simulated once (simulated-v3)")


@pytest.fixture(autouse=True)
def _exact(exact_fp32):
    """Exact fp32 unless a test turns TF32 on (the backend follows cudnn.allow_tf32, like cuDNN)."""


def _alpha(kind, c_out, dtype, device, negative=False):
    if kind is None:
        return None
    n = 1 if kind == "scalar" else c_out
    a = torch.rand(n, dtype=torch.float64) * 0.3 + 0.05
    if negative:
        a[0] = -0.2
    return a.to(device, dtype)


def _conv_case(device, dtype, c_in, c_out, k, stride, alpha_kind, residual_mode, shape=(2, 5, 6, 7),
               layout="contiguous", negative_alpha=False):
    n, d, h, w = shape
    x = randn(n, c_in, d, h, w, dtype=dtype, device=device, channels_last=layout == "channels_last",
              noncontig=layout == "noncontig")
    weight = (randn(c_out, c_in, k, k, k, dtype=torch.float64) / (c_in * k ** 3) ** 0.5).to(device, dtype)
    bias = randn(c_out, dtype=dtype, device=device)
    alpha = _alpha(alpha_kind, c_out, dtype, device, negative_alpha)
    out_size = [(s + 2 * (k // 2) - k) // stride + 1 for s in (d, h, w)]
    residual = None if residual_mode is None else randn(n, c_out, *out_size, dtype=dtype, device=device)
    return x, weight, bias, alpha, residual, residual_mode == "first"


def _tf32(t):
    """t (fp32) rounded to TF32 as cvt.rna.tf32.f32 does: 10 mantissa bits, to nearest, ties away from zero."""
    bits = t.contiguous().view(torch.int32)
    rounded = (bits + 0x1000) & ~0x1FFF  # half an ulp added to the magnitude (sign-magnitude bits), truncated
    return torch.where((bits & 0x7F800000) == 0x7F800000, bits, rounded).view(torch.float32)


class _TF32Conv3d(torch.autograd.Function):
    """conv3d and its gradients as TF32 tensor cores compute them (operands rounded to TF32, fp32 sums): the
    plain-PyTorch TF32 error estimate where PyTorch has no TF32 (the CPU)."""

    @staticmethod
    def forward(ctx, x, w, b, stride, padding):
        ctx.save_for_backward(x, w)
        ctx.conf = stride, padding, b is not None
        return torch.nn.functional.conv3d(_tf32(x), _tf32(w), b, stride=stride, padding=padding)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        stride, padding, has_bias = ctx.conf
        gx = torch.nn.grad.conv3d_input(x.shape, _tf32(w), _tf32(g), stride=stride, padding=padding)
        gw = torch.nn.grad.conv3d_weight(_tf32(x), w.shape, _tf32(g), stride=stride, padding=padding)
        return gx, gw, g.sum((0, 2, 3, 4)) if has_bias else None, None, None


def _reference(x, weight, bias, alpha, residual, stride, residual_first, grad_out, tf32=False):
    """float64 and same-dtype plain PyTorch: output, preact z, and gradients (x, w, b, alpha, dz). tf32: the fp32
    convolutions with TF32-rounded operands."""
    results = []
    for dt in (torch.float64, x.dtype):
        leaves = [t.detach().to(dt).requires_grad_() if t is not None else None
                  for t in (x, weight, bias, alpha, residual)]
        xx, ww, bb, aa, rr = leaves
        if tf32 and dt == torch.float32:
            z = _TF32Conv3d.apply(xx, ww, bb, stride, weight.shape[-1] // 2)
        else:
            z = torch.nn.functional.conv3d(xx, ww, bb, stride=stride, padding=weight.shape[-1] // 2)
        if rr is not None and residual_first:
            z = z + rr
        z.retain_grad()
        out = z if aa is None else torch.nn.functional.prelu(z, aa)
        if rr is not None and not residual_first:
            out = out + rr
        # (helpers.conv3d_prelu_plain spelled out, to get the pre-activation and its gradient)
        out.backward(grad_out.to(dt))
        results.append((out.detach(), z.detach(), xx.grad, ww.grad, bb.grad, None if aa is None else aa.grad,
                        z.grad))
    return results


def _grad_alpha_from_output(grad_out, y, alpha):
    """PyTorch in the tensors' dtype computing grad_alpha the way the op's contract has the backends do it: from the
    saved PReLU output y, with the pre-activation recovered as y / alpha where y <= 0. Where the sum cancels, this
    recovery (a second rounding of z) can cost more than twice PyTorch's error from z itself, so the bound for
    grad_alpha takes the larger of the two PyTorch errors."""
    a = alpha.view(1, -1, 1, 1, 1) if alpha.numel() > 1 else alpha
    terms = grad_out * torch.where(y <= 0, y / a, torch.zeros_like(y))
    return terms.sum(dim=(0, 2, 3, 4)) if alpha.numel() > 1 else terms.sum().reshape(1)


def _worse(a, b, reference64):
    return a if rel_err(a, reference64) >= rel_err(b, reference64) else b


def _check_conv(be, dtype, c_in, c_out, k, stride, alpha_kind, residual_mode, layout="contiguous",
                negative_alpha=False, shape=(2, 5, 6, 7), tf32_reference=False, zero_planes=False):
    """zero_planes: x zero in its first two depth planes and a zero bias, so that the pre-activation is exactly 0 in
    the first output plane (PReLU's slope there is alpha, as in PyTorch)."""
    x, weight, bias, alpha, residual, residual_first = _conv_case(
        be.device, dtype, c_in, c_out, k, stride, alpha_kind, residual_mode, shape, layout, negative_alpha)
    if zero_planes:
        x[:, :, :2] = 0
        bias.zero_()
    assert be.conv3d_prelu_unsupported(x, weight, bias, alpha, residual, stride, residual_first) == []
    save_act = alpha is not None and residual is not None and not residual_first
    out, act = be.conv3d_prelu_forward(x, weight, bias, alpha, residual, stride, residual_first, save_act)
    grad_out = randn(*out.shape, dtype=dtype, device=be.device)
    ref64, ref = _reference(x, weight, bias, alpha, residual, stride, residual_first, grad_out, tf32_reference)
    what = f"{dtype} cin{c_in} cout{c_out} k{k} s{stride} alpha={alpha_kind} res={residual_mode} {layout}"
    assert out.dtype == dtype and out.shape == ref64[0].shape
    cl = layout == "channels_last"
    assert out.is_contiguous(memory_format=torch.channels_last_3d if cl else torch.contiguous_format), what
    assert_close(out, ref64[0], ref[0], dtype, what + " out")
    if save_act:
        act64 = torch.nn.functional.prelu(ref64[1], alpha.double())
        assert_close(act, act64, torch.nn.functional.prelu(ref[1], alpha), dtype, what + " act")
    else:
        assert act is None

    if alpha is None:
        saved, kind = None, "none"
    elif negative_alpha:
        saved, kind = ref[1].to(dtype), "preact"  # the ops layer recomputes z when some alpha <= 0
    else:
        saved, kind = (act if save_act else out), "act"
    mask = (True, True, True, alpha is not None, True)
    grads = be.conv3d_prelu_backward(grad_out, x, weight, alpha, saved, kind, stride, mask)
    for name, got, g64, gdt in zip(("grad_x", "grad_w", "grad_b", "grad_alpha", "grad_preact"), grads,
                                   ref64[2:], ref[2:]):
        if g64 is None:
            assert got is None, name
            continue
        assert got.dtype == dtype and got.shape == g64.shape, (name, got.shape, g64.shape)
        if name == "grad_alpha" and kind == "act":
            gdt = _worse(gdt, _grad_alpha_from_output(grad_out, saved, alpha), g64)
        assert_close(got, g64, gdt, dtype, f"{what} {name}")
    assert grads[0].is_contiguous(memory_format=torch.channels_last_3d if cl else torch.contiguous_format)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,stride", [(3, 1), (3, 2), (1, 1), (1, 2)])
@pytest.mark.parametrize("alpha_kind", ["channel", "scalar", None])
@pytest.mark.parametrize("residual_mode", [None, "after", "first"])
def test_conv3d_prelu_forward_backward(cuda_backend, dtype, k, stride, alpha_kind, residual_mode):
    _check_conv(cuda_backend, dtype, 4, 8, k, stride, alpha_kind, residual_mode)


# Channel counts that hit every tile shape (C_out <= 16, <= 32, > 32; wgrad C_out <= 16 or not) and every copy
# width (2, 4, 8 and 16 bytes: odd fp16/bf16 counts such as a single-channel image or 5 classes load element by
# element), with odd extents.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c_in,c_out", [(2, 6), (8, 24), (16, 40), (12, 70), (1, 5), (5, 3)])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv3d_prelu_channels(cuda_backend, dtype, c_in, c_out, stride):
    _check_conv(cuda_backend, dtype, c_in, c_out, 3, stride, "channel", "after", shape=(3, 7, 5, 9))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "noncontig"])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv3d_prelu_layouts(cuda_backend, dtype, layout, stride):
    _check_conv(cuda_backend, dtype, 4, 16, 3, stride, "channel", "first", layout=layout)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("alpha_kind", ["channel", "scalar"])
def test_conv3d_prelu_negative_alpha_preact(cuda_backend, stride, alpha_kind):
    _check_conv(cuda_backend, torch.float32, 8, 16, 3, stride, alpha_kind, "after", negative_alpha=True)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv3d_prelu_tf32(cuda_backend, stride):
    torch.backends.cudnn.allow_tf32 = True  # both the backend and the plain-PyTorch error estimate use TF32
    # (PyTorch on the CPU has no TF32: there its convolutions get TF32-rounded operands, see _TF32Conv3d)
    _check_conv(cuda_backend, torch.float32, 16, 32, 3, stride, "channel", "after", shape=(2, 9, 8, 7),
                tf32_reference=cuda_backend.device == "cpu")
    if cuda_backend.kind != "emulated":  # the flag reaches the kernels: TF32 tensor cores, not exact FFMA
        x, weight, bias, alpha, _, _ = _conv_case(cuda_backend.device, torch.float32, 16, 32, 3, stride, "channel",
                                                  None, shape=(2, 9, 8, 7))
        tf32_out = cuda_backend.conv3d_prelu_forward(x, weight, bias, alpha, None, stride, False, False)[0]
        torch.backends.cudnn.allow_tf32 = False
        exact_out = cuda_backend.conv3d_prelu_forward(x, weight, bias, alpha, None, stride, False, False)[0]
        assert not torch.equal(tf32_out, exact_out)


def test_conv3d_prelu_larger_tiles(cuda_backend):
    """Many M tiles, several K tiles and wgrad splits; exercises the pipeline beyond one stage."""
    _check_conv(cuda_backend, torch.float16, 32, 64, 3, 1, "channel", "after", shape=(2, 16, 17, 18))
    _check_conv(cuda_backend, torch.bfloat16, 32, 64, 3, 2, "scalar", "first", shape=(2, 16, 17, 18))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c_out", [64, 96, 128])
def test_conv3d_prelu_every_tile(cuda_backend, monkeypatch, dtype, c_out):
    """Wide layers take the largest tile (128x128, 128x64, 64x64) that still gives the card 1.5 waves of blocks: in
    the simulation the card's multiprocessor count is set so that each is chosen on a small volume (96 channels: a
    partial column tile); on the GPU the volume is large enough for the largest."""
    tf32 = dtype == torch.float32  # the fp32 tiles run on tensor cores only with TF32
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    if cuda_backend.kind == "gpu":
        # the TF32 estimate made explicit: cuDNN's fp32 algorithm (TF32 or not) varies with the shape
        _check_conv(cuda_backend, dtype, 16, c_out, 3, 1, "channel", "after", shape=(2, 24, 32, 34),
                    tf32_reference=tf32)
        return
    gpu_only(cuda_backend, "tile choice")
    # 1980 voxels: 16 row blocks of 128; 1 SM: 128x128 (16-bit, > 64 channels) else 128x64; 6 SMs (18 blocks
    # wanted): 128x64 for > 64 channels, else 64x64; 10000 SMs: 64x64
    for sms in (1, 6, 10_000):
        monkeypatch.setenv("SEG3D_SIMT_SMS", str(sms))
        _check_conv(cuda_backend, dtype, 16, c_out, 3, 1, "channel", "after", shape=(2, 9, 10, 11),
                    tf32_reference=tf32)


@pytest.mark.parametrize("tf32", [False, True], ids=["fp32", "tf32"])
def test_conv3d_prelu_tiles_fit_99kib_shared_memory(cuda_backend, monkeypatch, tf32):
    """sm_86 / sm_89 / sm_120 cards (RTX 30xx / 40xx, A10, L4, L40) let a block opt in to 99 KiB of shared memory, not
    sm_90's 227 KiB: fp32's 128x64 conv tile (108 KiB, > 32 output channels on a volume that fills the card) failed
    there with cudaErrorInvalidValue from cudaFuncSetAttribute. The tile choice now reads the card's limit and takes
    64x64 (72 KiB); simulated with the 99 KiB limit on 1 SM (420 voxels: 4 row blocks of 128, where 128x64 is
    otherwise chosen)."""
    gpu_only(cuda_backend, "shared memory per block")
    if cuda_backend.kind == "gpu":
        pytest.skip("the card's shared memory limit is what it is (simulated; needs a CUDA GPU of sm_86/89 to run)")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    monkeypatch.setenv("SEG3D_SIMT_SMEM_OPTIN", "101376")  # 99 KiB: sm_86 / sm_89 / sm_120
    monkeypatch.setenv("SEG3D_SIMT_SMS", "1")
    _check_conv(cuda_backend, torch.float32, 8, 64, 3, 1, "channel", "after", shape=(2, 5, 6, 7),
                tf32_reference=tf32)


def test_conv3d_prelu_shared_memory_error_names_the_limit(cuda_backend, monkeypatch):
    """A tile the card cannot hold raises with the bytes asked and the card's limit (not a bare 'invalid argument')."""
    gpu_only(cuda_backend, "shared memory per block")
    if cuda_backend.kind == "gpu":
        pytest.skip("the card's shared memory limit is what it is (simulated)")
    monkeypatch.setenv("SEG3D_SIMT_SMEM_OPTIN", "40000")  # less than any conv tile of fp32
    x, weight, bias, alpha, residual, _ = _conv_case("cpu", torch.float32, 8, 16, 3, 1, "channel", None)
    with pytest.raises(RuntimeError, match=r"cudaFuncSetAttribute\(conv_gemm.*this GPU allows 40000 per block"):
        cuda_backend.conv3d_prelu_forward(x, weight, bias, alpha, None, 1, False, False)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype,negative_alpha", [(torch.bfloat16, False), (torch.float32, True)], ids=str)
def test_conv3d_prelu_zero_preactivation(cuda_backend, dtype, negative_alpha, stride):
    """Outputs whose pre-activation is exactly 0 (zero input around them, zero bias: ReLU-like sparse inputs) take
    PReLU's slope alpha in the backward, as in PyTorch (z <= 0), whether z is recovered from the saved output (y = 0)
    or saved itself (some alpha <= 0)."""
    _check_conv(cuda_backend, dtype, 8, 16, 3, stride, "channel", "after", negative_alpha=negative_alpha,
                zero_planes=True)


def test_conv3d_prelu_wide_layer(cuda_backend):
    """More output channels than the bias / alpha gradient reduction has threads (256), and a weight gradient of more
    than 4096 x 256 elements (its final reduction's grid-stride loop): 152 -> 264 channels, 1.08e6 weights."""
    _check_conv(cuda_backend, torch.bfloat16, 152, 264, 3, 1, "channel", "after", shape=(1, 3, 4, 5))


# The halo kernel (v3: stride-1 3x3x3, fp16/bf16): one channel chunk with 8-48 byte halo rows (C_in 8, 16, 24, 32;
# a K step spanning taps) and several chunks with the double-buffered halo (64, 96); extents that no 4x4x8 box tiles;
# the input gradient (dgrad of a stride-1 conv) goes through it too, with C_out as its input channels.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c_in,c_out", [(8, 16), (16, 24), (24, 32), (32, 40), (64, 64), (96, 8)])
def test_conv3d_prelu_halo_channels(cuda_backend, dtype, c_in, c_out):
    _check_conv(cuda_backend, dtype, c_in, c_out, 3, 1, "channel", "first", shape=(2, 5, 7, 11))


def test_conv3d_prelu_wgrad_splits_across_samples(cuda_backend):
    """Weight-gradient splits of several K tiles (64 voxels: 17595 voxels over 275 splits) whose voxel walk crosses
    from one sample into the next inside a split (sample boundaries at voxels 5865 and 11730, mid-split); the other
    tests' splits are mostly one K tile, or start on a sample boundary."""
    _check_conv(cuda_backend, torch.float16, 8, 16, 3, 1, "channel", None, shape=(3, 15, 17, 23))


# Extents that 4x4x8 boxes tile exactly (as most real crops do: 128x160x144), where box counts that do not round up
# would show; one channel chunk and several.
@pytest.mark.parametrize("c_in,c_out", [(16, 24), (64, 8)])
def test_conv3d_prelu_halo_whole_boxes(cuda_backend, c_in, c_out):
    _check_conv(cuda_backend, torch.float16, c_in, c_out, 3, 1, "channel", "after", shape=(2, 8, 4, 16))


def test_conv3d_prelu_deterministic(cuda_backend, monkeypatch):
    gpu_only(cuda_backend, "bitwise-reproducible reductions")
    x, weight, bias, alpha, residual, _ = _conv_case(cuda_backend.device, torch.float16, 16, 32, 3, 1, "channel",
                                                     "after", shape=(2, 12, 13, 14))
    runs = []
    for schedule in ("forward", "reverse"):  # the simulation resumes a block's threads in this order (GPU: unused)
        monkeypatch.setenv("SEG3D_SIMT_SCHEDULE", schedule)
        out, act = cuda_backend.conv3d_prelu_forward(x, weight, bias, alpha, residual, 1, False, True)
        g = torch.ones_like(out) * 0.5 + out * 0.25  # the same fresh values both runs
        grads = cuda_backend.conv3d_prelu_backward(g, x, weight, alpha, act, "act", 1, (True,) * 5)
        runs.append((out, act, *grads))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_conv3d_prelu_unsupported_reasons(cuda_backend):
    dev = cuda_backend.device
    x = torch.randn(1, 3, 4, 4, 4, device=dev, dtype=torch.float16)
    w = torch.randn(5, 3, 3, 3, 3, device=dev, dtype=torch.float16)
    assert cuda_backend.conv3d_prelu_unsupported(x, w, None, None, None, 1, False) == []  # any channel count
    reasons = cuda_backend.conv3d_prelu_unsupported(x.double(), w.double(), None, None, None, 1, False)
    assert any("dtype torch.float64" in r for r in reasons), reasons
    x32 = torch.randn(1, 4, 4, 4, 4, device=dev)
    reasons = cuda_backend.conv3d_prelu_unsupported(x32, torch.randn(8, 4, 5, 5, 5, device=dev), None, None,
                                                    None, 1, False)
    assert any("kernel" in r for r in reasons), reasons


def test_conv3d_prelu_threads_with_one_shape(cuda_backend, monkeypatch):
    """Two threads running convs of one shape at once (nn.DataParallel's replicas, a threaded server) each launch on
    their own tensors. The per-shape ConvArgs plan was one object for every thread, its pointers set on each call: a
    thread that set them between another thread's setting them and its launch sent that launch to the other thread's
    tensors (its own output left unwritten; the other's copies of x and the weight already freed). Made certain here:
    the other thread's whole call runs just before this thread's first launch, which must still hold its own
    pointers (checked before it runs, so that the old code fails here rather than reading freed memory)."""
    import threading
    import types

    dev, module = cuda_backend.device, cuda_backend.module
    x, weight, bias, alpha, _, _ = _conv_case(dev, torch.float16, 8, 16, 3, 1, "channel", None)
    x_other = randn(*x.shape, dtype=torch.float16, device=dev)
    alone = [module.conv3d_prelu_forward(t, weight, bias, alpha, None, 1, False, False)[0] for t in (x, x_other)]
    real, other, main = module._cuda, {}, threading.get_ident()

    def run_other():
        other["out"] = module.conv3d_prelu_forward(x_other, weight, bias, alpha, None, 1, False, False)[0]

    def conv_gemm(args, *rest):
        if threading.get_ident() != main:
            other.setdefault("launches", []).append((args.input, args.weight, args.out))
        elif "started" not in other:  # this thread's first launch: the other thread's call runs first, to its end
            other["started"] = True
            thread = threading.Thread(target=run_other)
            thread.start()
            thread.join()
            assert (args.input, args.weight, args.out) not in other["launches"], \
                "this call's launch would read and write the other thread's tensors"
        return real.conv_gemm(args, *rest)

    api = {name: getattr(real, name) for name in dir(real) if not name.startswith("__")}
    monkeypatch.setattr(module, "_cuda", types.SimpleNamespace(**{**api, "conv_gemm": conv_gemm}))
    out = module.conv3d_prelu_forward(x, weight, bias, alpha, None, 1, False, False)[0]
    assert torch.equal(other["out"], alone[1])
    assert torch.equal(out, alone[0])


@pytest.mark.parametrize("stride,c_in", [(1, 8), (2, 3)])
def test_conv3d_prelu_channels_last_weight(cuda_backend, stride, c_in):
    """A channels_last_3d weight (a model moved with .to(memory_format=...)): the weight gradient comes back in that
    layout (autograd then keeps it as the parameter's .grad without a copy), every output as for a contiguous weight."""
    x, weight, bias, alpha, _, _ = _conv_case(cuda_backend.device, torch.bfloat16, c_in, 16, 3, stride, "channel",
                                              None, layout="channels_last")
    out, _ = cuda_backend.conv3d_prelu_forward(x, weight, bias, alpha, None, stride, False, False)
    grad_out = randn(*out.shape, dtype=torch.bfloat16, device=cuda_backend.device, channels_last=True)
    results = []
    for w in (weight, weight.contiguous(memory_format=torch.channels_last_3d)):
        fwd, _ = cuda_backend.conv3d_prelu_forward(x, w, bias, alpha, None, stride, False, False)
        grads = cuda_backend.conv3d_prelu_backward(grad_out, x, w, alpha, out, "act", stride, (True,) * 4 + (False,))
        results.append((fwd, grads))
    (fwd_c, grads_c), (fwd_cl, grads_cl) = results
    assert grads_cl[1].is_contiguous(memory_format=torch.channels_last_3d) and not grads_cl[1].is_contiguous()
    assert grads_c[1].is_contiguous()
    assert torch.equal(fwd_c, fwd_cl)
    for a, b in zip(grads_c, grads_cl):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("stride,c_in,alpha_kind", [(1, 8, "channel"), (2, 3, "scalar")])
def test_conv3d_prelu_float32_parameters(cuda_backend, stride, c_in, alpha_kind):
    """float32 weight, bias and alpha with a bf16 x (the ops' mixed precision, under autocast): the same results as
    with the parameters cast to bf16 first, the parameters' gradients in float32 and in the weight's layout."""
    x, weight, bias, alpha, _, _ = _conv_case(cuda_backend.device, torch.bfloat16, c_in, 16, 3, stride, alpha_kind,
                                              None, layout="channels_last")
    grad_out = None
    results = []
    for params in ((weight, bias, alpha), tuple(t.float() for t in (weight, bias, alpha))):
        out, _ = cuda_backend.conv3d_prelu_forward(x, *params, None, stride, False, False)
        grad_out = randn(*out.shape, dtype=torch.bfloat16, device=cuda_backend.device) if grad_out is None \
            else grad_out
        grads = cuda_backend.conv3d_prelu_backward(grad_out, x, params[0], params[2], out, "act", stride,
                                                   (True,) * 4 + (False,))
        results.append((out, grads))
    (out_bf16, grads_bf16), (out_mixed, grads_mixed) = results
    assert torch.equal(out_bf16, out_mixed)
    assert grads_mixed[0].dtype == torch.bfloat16 and torch.equal(grads_mixed[0], grads_bf16[0])
    for name, mixed, half in zip(("weight", "bias", "alpha"), grads_mixed[1:4], grads_bf16[1:4]):
        assert mixed.dtype == torch.float32 and torch.equal(mixed.bfloat16(), half), name
    assert grads_mixed[1].stride() == weight.float().stride()


@pytest.mark.parametrize("shape", [(5, 3, 3, 3, 3), (16, 8, 3, 3, 3), (7, 2, 1, 1, 1)], ids=str)
def test_stride2_phase_weights_partition_the_taps_aligned(shape):
    """The one gather of the stride-2 dgrad's phase weights: every weight element exactly once (the phases
    partition the taps), each phase's block at a 16-byte aligned start (8 elements), laid out (C_in, taps, C_out)."""
    from seg3d_fast.backends import cuda as cuda_mod

    index, starts = cuda_mod._phase_weight_index(shape, 2, torch.device("cpu"))
    weight = torch.arange(math.prod(shape)).view(shape)
    used = []
    for phase, start in zip(itertools.product(range(2), repeat=3), starts):
        assert start % 8 == 0
        slices = tuple(cuda_mod._dgrad_taps(shape[-1], 2, p)[0] for p in phase)
        block = weight[(slice(None), slice(None)) + slices].permute(1, 2, 3, 4, 0).reshape(-1)
        assert torch.equal(index[start:start + block.numel()].long(), block)
        used.append(block)
    assert torch.equal(torch.cat(used).sort().values, weight.reshape(-1))


@BIG_GPU_MEMORY
def test_conv3d_prelu_beyond_2_31_elements(cuda_backend):
    """x and out have more than 2^31 elements: the last planes (highest offsets) must be right."""
    real_gpu_only(cuda_backend, "64-bit offsets: tensors of more than 2^31 elements (24 GiB), too large to simulate")
    c, size = 8, 648  # 8 * 648^3 = 2.18e9 elements
    free = torch.cuda.mem_get_info()[0]
    if free < 24 * 2**30:
        pytest.skip(f"needs 24 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    x = torch.empty(1, size, size, size, c, dtype=torch.float16, device="cuda").normal_().permute(0, 4, 1, 2, 3)
    assert x.numel() > 2**31 and x.is_contiguous(memory_format=torch.channels_last_3d)
    weight = torch.randn(c, c, 1, 1, 1, device="cuda", dtype=torch.float16) / c ** 0.5
    alpha = torch.full((c,), 0.2, device="cuda", dtype=torch.float16)
    out, _ = cuda_backend.conv3d_prelu_forward(x, weight, None, alpha, None, 1, False, False)
    tail = slice(size - 2, size)
    x_tail = x[:, :, tail].double()
    ref64 = torch.nn.functional.prelu(torch.nn.functional.conv3d(x_tail, weight.double()), alpha.double())
    ref = torch.nn.functional.prelu(torch.nn.functional.conv3d(x[:, :, tail], weight), alpha)
    assert_close(out[:, :, tail], ref64, ref, torch.float16, "out beyond 2^31")
    g = out  # any fresh values; dgrad of a 1x1x1 conv maps each plane to itself
    grads = cuda_backend.conv3d_prelu_backward(g, x, weight, alpha, out, "act", 1, (True, False, False, False, False))
    del out
    g_tail = g[:, :, tail].double()
    dz64 = torch.where(g_tail > 0, g_tail, g_tail * 0.2)  # here saved == grad_out, so z > 0 iff g > 0
    gx64 = torch.nn.functional.conv_transpose3d(dz64, weight.double())
    gx_plain = torch.nn.functional.conv_transpose3d(torch.where(g[:, :, tail] > 0, g[:, :, tail],
                                                                g[:, :, tail] * alpha.view(1, -1, 1, 1, 1)), weight)
    assert_close(grads[0][:, :, tail], gx64, gx_plain, torch.float16, "grad_x beyond 2^31")


# ---- Jaccard sums ---------------------------------------------------------------------------------------------

def _jaccard_case(device, dtype, n, c, spatial, target_kind, ignore_index):
    logits = randn(n, c, *spatial, dtype=dtype, device=device) * 2
    if target_kind == "probabilities":
        target = torch.rand(n, c, *spatial, device=device, dtype=torch.float64).softmax(1).to(dtype)
    else:
        labels = torch.randint(0, c, (n, *spatial), device=device)
        if ignore_index is not None:
            labels[torch.rand(labels.shape, device=device) < 0.2] = ignore_index
        target = labels.to({"int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8}[target_kind])
    return logits, target


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("target_kind,ignore_index,c", [("int64", None, 5), ("int32", 255, 5), ("uint8", 255, 3),
                                                        ("int64", -1, 20), ("probabilities", None, 4)])
def test_jaccard_sums_forward_backward(cuda_backend, dtype, activation, squared, target_kind, ignore_index, c):
    logits, target = _jaccard_case(cuda_backend.device, dtype, 2, c, (5, 6, 7), target_kind, ignore_index)
    ignore = None if target_kind == "probabilities" else ignore_index
    assert cuda_backend.jaccard_unsupported(logits, target, activation, ignore) == []
    sums = cuda_backend.jaccard_sums(logits, target, squared, activation, ignore)
    assert sums.dtype == torch.float32 and sums.shape == (2, c, 3)
    what = f"{dtype} {activation} squared={squared} {target_kind} ignore={ignore}"
    t64 = target.double() if target.dtype.is_floating_point else target
    ref64 = jaccard_sums_plain(logits.double(), t64, squared, activation, ignore)
    assert_close(sums, ref64, jaccard_sums_plain(logits, target, squared, activation, ignore), dtype, what)

    grad_sums = torch.randn(2, c, 3, device=cuda_backend.device)
    grad = cuda_backend.jaccard_sums_backward(grad_sums, logits, target, squared, activation, ignore)
    assert grad.dtype == dtype and grad.shape == logits.shape
    refs = []
    for dt in (torch.float64, dtype):
        lg = logits.detach().to(dt).requires_grad_()
        tt = target.to(dt) if target.dtype.is_floating_point else target
        jaccard_sums_plain(lg, tt, squared, activation, ignore).backward(grad_sums.to(dt))
        refs.append(lg.grad)
    assert_close(grad, refs[0], refs[1], dtype, what + " grad")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_jaccard_float32_probabilities_of_half_logits_are_read_unrounded(cuda_backend, dtype):
    """float32 class probabilities with fp16 / bf16 logits (label smoothing's 0.9 / 0.05, which bf16 cannot hold) are
    read as float32, as the other backends read them: they were rounded to the logits' dtype first (bf16: the
    target's sums off by ~1e-3, the loss by ~1e-4)."""
    dev = cuda_backend.device
    logits = randn(2, 3, 5, 6, 7, dtype=dtype, device=dev)
    labels = torch.randint(0, 3, (2, 5, 6, 7), device=dev)
    target = torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).float() * 0.85 + 0.05  # label smoothing
    ref64 = jaccard_sums_plain(logits.double(), target.double(), True, "softmax")
    sums = cuda_backend.jaccard_sums(logits, target, True, "softmax", None)
    assert rel_err(sums[..., 2], ref64[..., 2]) < 1e-6  # sum t^2: the target alone, float32 accumulation
    assert_close(sums, ref64, None, dtype, f"{dtype} sums")
    w = torch.ones(3, device=dev)
    loss, reduced_sums, label_range = cuda_backend.jaccard_loss_reduced(logits, target, True, "softmax", None, 1e-5, w,
                                                                        False, True)
    assert label_range is None
    torch.testing.assert_close(reduced_sums[0], sums.sum(0))  # the pooled row
    lg64 = logits.double().requires_grad_()
    s64 = jaccard_sums_plain(lg64, target.double(), True, "softmax").sum(0)
    loss64 = (1 - (s64[:, 0] + 1e-5) / (s64[:, 1] + s64[:, 2] - s64[:, 0] + 1e-5)).mean()
    assert abs(loss.item() - loss64.item()) < 1e-5
    grad = cuda_backend.jaccard_loss_reduced_backward(torch.tensor(1.0, device=dev), reduced_sums, w, logits, target,
                                                      True, "softmax", None, 1e-5, False, True)
    assert_close(grad, torch.autograd.grad(loss64, lg64)[0], None, dtype, f"{dtype} grad_logits")


def test_jaccard_noncontiguous_and_deterministic(cuda_backend):
    dev = cuda_backend.device
    logits = randn(3, 5, 6, 7, 9, dtype=torch.float16, device=dev, noncontig=True)
    target = torch.randint(0, 5, (3, 6, 7, 9), device=dev)
    a = cuda_backend.jaccard_sums(logits, target, True, "softmax", None)
    b = cuda_backend.jaccard_sums(logits, target, True, "softmax", None)
    assert torch.equal(a, b)
    ref64 = jaccard_sums_plain(logits.double(), target, True, "softmax")
    assert_close(a, ref64, jaccard_sums_plain(logits, target, True, "softmax"), torch.float16, "noncontig")
    g = torch.randn(3, 5, 3, device=dev)
    assert torch.equal(cuda_backend.jaccard_sums_backward(g, logits, target, True, "softmax", None),
                       cuda_backend.jaccard_sums_backward(g, logits, target, True, "softmax", None))


@BIG_GPU_MEMORY
def test_jaccard_beyond_2_31_elements(cuda_backend):
    real_gpu_only(cuda_backend, "64-bit offsets: tensors of more than 2^31 elements (24 GiB), too large to simulate")
    n, c, s = 1, 4, 560 * 2**20  # 2.35e9 logits
    free = torch.cuda.mem_get_info()[0]
    if free < 24 * 2**30:
        pytest.skip(f"needs 24 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    logits = torch.randn(n, c, s, device="cuda", dtype=torch.float16)
    target = torch.randint(0, c, (n, s), device="cuda", dtype=torch.uint8)
    assert logits.numel() > 2**31
    sums = cuda_backend.jaccard_sums(logits, target, True, "softmax", None)
    ref = torch.zeros(n, c, 3, dtype=torch.float64, device="cuda")
    for part in range(0, s, 2**26):  # plain PyTorch in chunks, accumulated in float64
        sl = slice(part, part + 2**26)
        ref += jaccard_sums_plain(logits[:, :, sl].double(), target[:, sl], True, "softmax")
    assert torch.allclose(sums.double(), ref, rtol=1e-3), (sums, ref)
    grad = cuda_backend.jaccard_sums_backward(torch.ones(n, c, 3, device="cuda"), logits, target, True, "softmax",
                                              None)
    tail = slice(s - 4096, s)
    lg = logits[:, :, tail].double().requires_grad_()
    # only the per-voxel formula matters at the tail: with grad_sums of ones it does not depend on other voxels
    jaccard_sums_plain(lg, target[:, tail], True, "softmax").backward(torch.ones(n, c, 3, dtype=torch.float64,
                                                                                 device="cuda"))
    assert_close(grad[:, :, tail], lg.grad, None, torch.float16, "jaccard grad beyond 2^31")


# ---- the reduced loss (API.md's optional jaccard_loss_reduced: two launches forward, one backward) ------------

def _reduced_loss_refs(logits, target, weights, smooth, per_sample, mean, ignore, dtype, grad_loss):
    """The loss's rows of sums (per sample, or pooled: jaccard_loss_reduced's), the loss (from the plain sums and
    ops.jaccard_from_sums) and its logit gradient, in float64 and in `dtype`."""
    from seg3d_fast.ops import jaccard_from_sums

    refs = []
    for dt in (torch.float64, dtype):
        lg = logits.detach().to(dt).requires_grad_()
        tt = target.to(dt) if target.dtype.is_floating_point else target
        plain = jaccard_sums_plain(lg, tt, True, "softmax", ignore).double()
        ref = jaccard_from_sums(plain, smooth=smooth, class_weights=weights.to(plain), include_background=False,
                                per_sample=per_sample, reduction="mean" if mean else "sum")
        (ref * grad_loss).backward()
        rows = plain.detach() if per_sample else plain.detach().sum(0, keepdim=True)
        refs.append((rows, ref.detach(), lg.grad))
    return refs


@pytest.mark.parametrize("per_sample,mean,weighted,target_kind,ignore_index,c,dtype", [
    (False, True, False, "int64", None, 4, torch.bfloat16), (True, True, True, "uint8", 7, 5, torch.float16),
    (False, False, True, "probabilities", None, 3, torch.float32),
    (True, False, False, "int32", None, 2, torch.bfloat16),
    (False, True, True, "int64", 3, 20, torch.float32), (True, True, False, "int64", -1, 32, torch.bfloat16)])
def test_jaccard_loss_reduced(cuda_backend, per_sample, mean, weighted, target_kind, ignore_index, c, dtype):
    """The fused loss and its one-launch backward against the float64 formula of the plain sums; the label range its
    kernels find (counted labels only)."""
    dev = cuda_backend.device
    gen = torch.Generator().manual_seed(c)
    n, spatial, smooth = 3, (4, 5, 7), 0.5
    logits, target = _jaccard_case(dev, dtype, n, c, spatial, target_kind, ignore_index)
    weights = torch.ones(c, dtype=torch.float64)
    if weighted:
        weights += torch.rand(c, dtype=torch.float64, generator=gen) - 0.5
    weights[0] = 0  # the background left out
    w32 = weights.float().to(dev)
    assert hasattr(cuda_backend.module, "jaccard_loss_reduced")
    loss, sums, label_range = cuda_backend.jaccard_loss_reduced(logits, target, True, "softmax", ignore_index, smooth,
                                                                w32, per_sample, mean)
    grad = cuda_backend.jaccard_loss_reduced_backward(torch.tensor(0.75, device=dev), sums, w32, logits, target, True,
                                                      "softmax", ignore_index, smooth, per_sample, mean)
    ref64, ref_dt = _reduced_loss_refs(logits, target, weights.to(dev), smooth, per_sample, mean, ignore_index, dtype,
                                       0.75)
    assert loss.dtype == torch.float32 and loss.shape == () and grad.dtype == dtype and grad.shape == logits.shape
    what = f"{dtype} per_sample={per_sample} mean={mean} {target_kind} C={c}"
    assert_close(sums, ref64[0], ref_dt[0], dtype, what + " sums")
    assert_close(loss, ref64[1], ref_dt[1], dtype, what + " loss")
    assert_close(grad, ref64[2], ref_dt[2], dtype, what + " grad_logits")
    # the backward reads only the loss's rows: the same gradient from the float64 sums rounded
    grad = cuda_backend.jaccard_loss_reduced_backward(torch.tensor(0.75, device=dev), ref64[0].float(), w32, logits,
                                                      target, True, "softmax", ignore_index, smooth, per_sample, mean)
    assert_close(grad, ref64[2], ref_dt[2], dtype, what + " grad_logits from the reference sums")
    if target_kind == "probabilities":
        assert label_range is None
    else:
        counted = target[target != ignore_index] if ignore_index is not None else target
        assert label_range.dtype == torch.int64 and label_range.tolist() == [counted.min().item(),
                                                                             counted.max().item()]
    if ignore_index is not None:
        assert (grad.movedim(1, -1)[target == ignore_index] == 0).all()
    # deterministic: the same bits again
    again = cuda_backend.jaccard_loss_reduced(logits, target, True, "softmax", ignore_index, smooth, w32, per_sample,
                                              mean)
    assert torch.equal(again[0], loss) and torch.equal(again[1], sums)


@pytest.mark.parametrize("activation,squared", [("sigmoid", False), ("softmax", False), ("sigmoid", True)])
def test_jaccard_loss_reduced_matches_the_sums_path(cuda_backend, activation, squared):
    """Every activation / squared combination: the fused loss's sums are the plain sums kernel's, bit for bit (the same
    final reduction), and loss and gradient are those of jaccard_from_sums over them."""
    from seg3d_fast.ops import jaccard_from_sums

    dev = cuda_backend.device
    logits, target = _jaccard_case(dev, torch.float32, 2, 6, (3, 9, 11), "int64", 255)
    w = torch.tensor([0.0, 1.0, 2.0, 0.5, 1.0, 1.5], device=dev)
    loss, sums, _ = cuda_backend.jaccard_loss_reduced(logits, target, squared, activation, 255, 1e-5, w, True, True)
    plain = cuda_backend.jaccard_sums(logits, target, squared, activation, 255)
    if cuda_backend.kind != "emulated":
        assert torch.equal(sums, plain)
    s64 = plain.double().requires_grad_()
    ref = jaccard_from_sums(s64, smooth=1e-5, class_weights=w.double(), include_background=False, per_sample=True)
    ref.backward(torch.tensor(2.0, dtype=torch.float64))
    assert_close(loss, ref.detach(), None, torch.float32, "loss")
    grad = cuda_backend.jaccard_loss_reduced_backward(torch.tensor(2.0, device=dev), sums, w, logits, target, squared,
                                                      activation, 255, 1e-5, True, True)
    expected = cuda_backend.jaccard_sums_backward(s64.grad.float(), logits, target, squared, activation, 255)
    assert_close(grad, expected.double(), None, torch.float32, "grad_logits")


def test_jaccard_loss_reduced_gradient_with_smooth_zero(cuda_backend):
    """smooth=0 and an absent class predicted with a tiny mass (den = 4.8e-25): the gradient is finite, as the exact
    one is (1 / den^2 underflowed in float32: inf * 0 = NaN in every logit)."""
    dev = cuda_backend.device
    logits = torch.tensor([14.0, -14.0], device=dev).reshape(1, 2, 1, 1, 1).repeat(1, 1, 2, 3, 4)
    target = torch.zeros(1, 2, 3, 4, dtype=torch.long, device=dev)
    w = torch.ones(2, device=dev)
    loss, sums, _ = cuda_backend.jaccard_loss_reduced(logits, target, True, "softmax", None, 0.0, w, False, True)
    grad = cuda_backend.jaccard_loss_reduced_backward(torch.tensor(1.0, device=dev), sums, w, logits, target, True,
                                                      "softmax", None, 0.0, False, True)
    lg64 = logits.double().cpu().requires_grad_()
    p = lg64.softmax(1)
    t = torch.nn.functional.one_hot(target.cpu(), 2).movedim(-1, 1).double()
    i, pp, tt = [(a * b).sum((0, 2, 3, 4)) for a, b in ((p, t), (p, p), (t, t))]
    want = torch.autograd.grad((1 - i / (pp + tt - i)).mean(), lg64)[0]
    assert loss.isfinite() and grad.isfinite().all(), grad
    torch.testing.assert_close(grad.double().cpu(), want, atol=1e-6, rtol=1e-4)


def test_jaccard_loss_reduced_label_range_sees_bad_and_no_labels(cuda_backend):
    """Out-of-range labels show in the range (they match no class); a volume whose labels are all ignored has an
    empty range, which no check rejects. A larger volume: several blocks per sample write range partials."""
    dev = cuda_backend.device
    logits = torch.randn(2, 3, 4, 5, 6, device=dev)
    labels = torch.randint(0, 3, (2, 4, 5, 6), device=dev)
    labels[1, 2, 3, 4], labels[0, 0, 0, 0] = 9, -2
    w = torch.ones(3, device=dev)
    assert cuda_backend.jaccard_loss_reduced(logits, labels, True, "softmax", None, 1e-5, w, False,
                                             True)[2].tolist() == [-2, 9]
    ignored = torch.full_like(labels, 255)
    lo, hi = cuda_backend.jaccard_loss_reduced(logits, ignored, True, "softmax", 255, 1e-5, w, False, True)[2].tolist()
    assert lo > 2 and hi < 0
    big = torch.randint(0, 3, (2, 9, 10, 11), device=dev, dtype=torch.int32)  # 990 voxels: 4 blocks of 256
    big[1, 8, 9, 10], big[0, 4, 0, 0] = 40, -7
    big[0, 5, 0, 0] = 255  # ignored: not in the range
    out = cuda_backend.jaccard_loss_reduced(torch.randn(2, 3, 9, 10, 11, device=dev), big, False, "sigmoid", 255, 1e-5,
                                            w, True, False)
    assert out[2].tolist() == [-7, 40] and out[0].isfinite()


def test_jaccard_label_range_and_sums_over_many_blocks(cuda_backend):
    """240 blocks of partials (2 samples x 120 blocks: more than the final reduction's 32 lanes, and all 8 warps of its
    label-range reduction hold some): the sums; and the label range with the least and the greatest label placed in
    each warp of a block and read by each warp of the final reduction in turn."""
    dev = cuda_backend.device
    n, c, spatial = 2, 3, (8, 60, 64)  # 30720 voxels per sample: 120 blocks of 256
    logits = randn(n, c, *spatial, device=dev)
    labels = torch.randint(0, c, (n, *spatial), device=dev)
    w = torch.tensor([0.0, 1.0, 1.0], device=dev)
    _, sums, label_range = cuda_backend.jaccard_loss_reduced(logits, labels, True, "softmax", None, 1e-5, w, True, True)
    ref64 = jaccard_sums_plain(logits.double(), labels, True, "softmax")  # (per_sample: the samples' sums returned)
    assert_close(sums, ref64, jaccard_sums_plain(logits, labels, True, "softmax"), torch.float32, "sums")
    assert label_range.tolist() == [0, c - 1]
    for warp in range(4):
        bad = labels.clone()
        for value, wp in ((-5 - warp, warp), (c + 7 + warp, 7 - warp)):  # the least in warp w, the greatest in 7 - w
            sample, block = divmod(32 * wp + 5 + warp, 120)  # a range partial that warp wp of the final kernel reads
            bad.view(n, -1)[sample, block * 256 + 32 * wp + 3 * warp] = value  # in warp wp of that block
        label_range = cuda_backend.jaccard_loss_reduced(logits, bad, True, "softmax", None, 1e-5, w, False, True)[2]
        assert label_range.tolist() == [-5 - warp, c + 7 + warp], warp


@pytest.mark.parametrize("c,activation", [(1, "sigmoid"), (2, "softmax")])
def test_jaccard_one_sample_few_classes(cuda_backend, c, activation):
    """Batch size 1 with one or two classes (binary segmentation): fewer sums (N * C * 3 < 8) than the final
    reduction's warps per block."""
    logits, target = _jaccard_case(cuda_backend.device, torch.float32, 1, c, (5, 6, 7), "int64", None)
    sums = cuda_backend.jaccard_sums(logits, target, True, activation, None)
    ref64 = jaccard_sums_plain(logits.double(), target, True, activation)
    assert_close(sums, ref64, jaccard_sums_plain(logits, target, True, activation), torch.float32, "sums")
    grad_sums = torch.randn(1, c, 3, device=cuda_backend.device)
    grad = cuda_backend.jaccard_sums_backward(grad_sums, logits, target, True, activation, None)
    refs = []
    for dt in (torch.float64, torch.float32):
        lg = logits.detach().to(dt).requires_grad_()
        jaccard_sums_plain(lg, target, True, activation).backward(grad_sums.to(dt))
        refs.append(lg.grad)
    assert_close(grad, refs[0], refs[1], torch.float32, "grad")


def test_jaccard_volumes_past_the_grid_caps(cuda_backend):
    """The sums kernel's grid stops at 1024 blocks per sample (262144 voxels) and the backward's at 8192 (2^21
    voxels): past them each thread takes several voxels (grid-stride loops)."""
    one_simulation(cuda_backend, "2^21 voxels")
    dev = cuda_backend.device
    logits = randn(1, 3, 64, 64, 65, device=dev)  # 266240 voxels
    target = torch.randint(0, 3, (1, 64, 64, 65), device=dev)
    sums = cuda_backend.jaccard_sums(logits, target, False, "softmax", None)
    ref64 = jaccard_sums_plain(logits.double(), target, False, "softmax")
    assert_close(sums, ref64, jaccard_sums_plain(logits, target, False, "softmax"), torch.float32, "sums")
    spatial = (2, 1024, 1040)  # 2129920 voxels
    logits = randn(1, 2, *spatial, dtype=torch.float16, device=dev)
    target = torch.randint(0, 2, (1, *spatial), device=dev, dtype=torch.uint8)
    grad_sums = torch.randn(1, 2, 3, device=dev)
    grad = cuda_backend.jaccard_sums_backward(grad_sums, logits, target, True, "sigmoid", None)
    refs = []
    for dt in (torch.float64, torch.float16):
        lg = logits.detach().to(dt).requires_grad_()
        jaccard_sums_plain(lg, target, True, "sigmoid").backward(grad_sums.to(dt))
        refs.append(lg.grad)
    assert_close(grad, refs[0], refs[1], torch.float16, "grad past 8192 blocks")


def test_jaccard_batch_past_the_grid_axis_limit(cuda_backend):
    """70000 samples of 2 voxels: more blocks than a grid's second axis takes (65535), where the sample index was
    (such batches were refused): the sums and their backward (the kernels the fused loss launches too), on the first
    and last samples. About 25 s in the simulation."""
    one_simulation(cuda_backend, "70000 samples")
    dev = cuda_backend.device
    n, c = 70000, 3
    logits, target = _jaccard_case(dev, torch.float32, n, c, (2,), "int64", None)
    assert cuda_backend.jaccard_unsupported(logits, target, "softmax", None) == []
    sums = cuda_backend.jaccard_sums(logits, target, True, "softmax", None)
    assert_close(sums, jaccard_sums_plain(logits.double(), target, True, "softmax"), None, torch.float32, "sums")
    grad_sums = randn(n, c, 3, device=dev)
    grad = cuda_backend.jaccard_sums_backward(grad_sums, logits, target, True, "softmax", None)
    for idx in (slice(0, 2), slice(n - 2, n)):
        lg = logits[idx].double().requires_grad_()
        (jaccard_sums_plain(lg, target[idx], True, "softmax") * grad_sums[idx].double()).sum().backward()
        assert_close(grad[idx], lg.grad, None, torch.float32, "grad_logits")
