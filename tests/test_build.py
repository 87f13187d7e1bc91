"""The CUDA extension's build and the cuda backend's host side, on a machine without a GPU (CI has nvcc).

- seg3d_fast._cuda imports when it was built, and calling it without a GPU raises a clear RuntimeError.
- unavailable_reason() explains why the backend cannot run here.
- The host-side decomposition in seg3d_fast/backends/cuda.py (weight layouts, tap offsets, the 8 parity phases
  of the stride-2 input gradient, output layouts) is checked by running the backend against an emulator of the
  kernels' contract (csrc/launchers.h) written in plain PyTorch: a wrong offset, phase or permutation fails here.
"""
import importlib
import itertools
import types

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, jaccard_sums_plain, randn

NOT_BUILT = "seg3d_fast._cuda was not built (package installed without nvcc, or with SEG3D_FAST_BUILD_CUDA=0)"


def _extension():
    try:
        return importlib.import_module("seg3d_fast._cuda")
    except ModuleNotFoundError as e:
        if e.name != "seg3d_fast._cuda":
            raise
        pytest.skip(NOT_BUILT)


def test_extension_imports_and_exposes_the_kernels():
    ext = _extension()
    for name in ("conv_gemm", "conv_wgrad", "prelu_backward", "jaccard_sums", "jaccard_backward", "device_count"):
        assert callable(getattr(ext, name)), name
    args = ext.ConvArgs()
    args.toff_d = [-1, 0, 1]
    assert list(args.toff_d) == [-1, 0, 1]
    assert ext.MAX_CLASSES == 32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_extension_without_gpu_raises_clear_error():
    ext = _extension()
    with pytest.raises(RuntimeError, match="seg3d_fast._cuda: .*CUDA|cuda"):
        ext.device_count()
    with pytest.raises(RuntimeError, match="seg3d_fast._cuda"):
        ext.conv_gemm(ext.ConvArgs(), 1, False, 0, 0)  # must not touch the null pointers or crash


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_backend_unavailable_reason_without_gpu():
    from seg3d_fast.backends import cuda

    reason = cuda.unavailable_reason()
    assert isinstance(reason, str) and reason
    try:
        importlib.import_module("seg3d_fast._cuda")
        assert reason == "no CUDA GPU"
    except ModuleNotFoundError:
        assert reason == "extension not built (no nvcc at install time)"
    x = torch.randn(1, 4, 3, 3, 3)
    reasons = cuda.conv3d_prelu_unsupported(x, torch.randn(8, 4, 3, 3, 3), None, None, None, 1, False)
    assert any("CUDA tensors" in r for r in reasons), reasons
    reasons = cuda.conv3d_prelu_unsupported(x.half(), torch.randn(8, 4, 3, 3, 3).half(), None, None, None, 1, False)
    assert not any("C_in" in r for r in reasons)
    reasons = cuda.conv3d_prelu_unsupported(x[:, :3].half(), torch.randn(8, 3, 3, 3, 3).half(), None, None, None, 1,
                                            False)
    assert any("C_in=3 must be a multiple of 2" in r for r in reasons), reasons


# ---- the kernels' contract (csrc/launchers.h) in plain PyTorch, on CPU tensors --------------------------------

class _Args(types.SimpleNamespace):
    def __init__(self):
        super().__init__(bias=0, alpha=0, residual=0, act=0, alpha_mode=0, residual_first=0)


class ContractEmulator:
    """Stands in for seg3d_fast._cuda: pointers are keys of registered tensors, math in float64."""
    ConvArgs = WgradArgs = _Args
    MAX_CLASSES = 32

    def __init__(self):
        self.tensors = {}
        self.calls = []

    def ptr(self, t):
        if t is None:
            return 0
        key = len(self.tensors) + 1
        self.tensors[key] = t
        return key

    def t(self, key):
        return self.tensors[key] if key else None

    def conv_gemm(self, a, dtype, tf32, device, stream):
        self.calls.append("conv_gemm")
        inp, out = self.t(a.input), self.t(a.out)
        assert tuple(inp.shape[2:]) == (a.ID, a.IH, a.IW) and inp.shape[1] == a.C and inp.shape[0] == a.N
        assert a.C % a.vec == 0 and a.vec * inp.element_size() in (4, 8, 16)
        assert inp.is_contiguous(memory_format=torch.channels_last_3d) and out.is_contiguous(
            memory_format=torch.channels_last_3d), "the kernels read and write NDHWC memory"
        inp = inp.double()
        taps = (a.toff_d[:a.ntap_d], a.toff_h[:a.ntap_h], a.toff_w[:a.ntap_w])
        grid = (a.QD, a.QH, a.QW)
        acc = torch.zeros(a.N, a.Cout, *grid, dtype=torch.float64)
        if a.ntap_d * a.ntap_h * a.ntap_w:
            w = self.t(a.weight).double().reshape(a.Cout, -1, a.C)
            for t, offs in enumerate(itertools.product(*taps)):
                xs = inp
                for dim, (off, q, size) in enumerate(zip(offs, grid, inp.shape[2:])):
                    idx = torch.arange(q) * a.in_stride + off
                    valid = (idx >= 0) & (idx < size)
                    xs = xs.index_select(2 + dim, idx.clamp(0, size - 1))
                    xs = xs * valid.view([-1 if i == 2 + dim else 1 for i in range(5)])
                acc += torch.einsum("ncdhw,oc->nodhw", xs, w[:, t])
        view = lambda t: t[:, :, a.out_off_d::a.out_stride, a.out_off_h::a.out_stride, a.out_off_w::a.out_stride]
        assert tuple(view(out).shape[2:]) == grid
        per_channel = lambda v: v.double().view(1, -1, 1, 1, 1)
        if a.bias:
            acc += per_channel(self.t(a.bias))
        res = None if not a.residual else view(self.t(a.residual)).double()
        if res is not None and a.residual_first:
            acc += res
        if a.alpha_mode:
            acc = torch.where(acc > 0, acc, acc * per_channel(self.t(a.alpha)))
        if a.act:
            view(self.t(a.act)).copy_(acc)
        if res is not None and not a.residual_first:
            acc += res
        view(out).copy_(acc)

    def conv_wgrad(self, a, dtype, tf32, device, stream):
        self.calls.append("conv_wgrad")
        dz, x = self.t(a.dz).double(), self.t(a.input).double()
        voxels = a.N * a.OD * a.OH * a.OW
        kw = a.ksize ** 3 * a.C
        assert a.voxels_per_split % 32 == 0 and (a.splits - 1) * a.voxels_per_split < voxels
        assert a.splits * a.voxels_per_split >= voxels
        assert self.t(a.partial).numel() >= a.splits * a.Cout * kw
        gw = torch.nn.grad.conv3d_weight(x, (a.Cout, a.C, a.ksize, a.ksize, a.ksize), dz, a.stride, a.ksize // 2)
        self.t(a.grad_weight).copy_(gw.permute(0, 2, 3, 4, 1))

    def prelu_backward(self, grad_out, saved, alpha, dz, grad_bias, grad_alpha, partial, rows, C, saved_kind,
                       alpha_mode, row_blocks, dtype, device, stream):
        self.calls.append("prelu_backward")
        g = self.t(grad_out).double()
        assert g.numel() == rows * C and g.shape[1] == C
        d = g
        if saved_kind:
            al = self.t(alpha).double().view(1, -1, 1, 1, 1)
            s = self.t(saved).double()
            z = torch.where(s > 0, s, s / al) if saved_kind == 1 else s
            d = torch.where(z > 0, g, g * al)
            if dz:
                self.t(dz).copy_(d)
            if grad_alpha:
                ga = (g * z * (z <= 0)).sum((0, 2, 3, 4))
                self.t(grad_alpha).copy_(ga.sum().reshape(1) if alpha_mode == 1 else ga)
        if grad_bias:
            self.t(grad_bias).copy_(d.sum((0, 2, 3, 4)))

    def jaccard_blocks(self, S):
        return 4

    def jaccard_sums(self, logits, target, partial, sums, N, C, S, label_type, squared, sigmoid, has_ignore,
                     ignore_index, dtype, device, stream):
        lg, t = self.t(logits), self.t(target)
        assert lg.is_contiguous() and lg[0, 0].numel() == S and (label_type == 3) == t.dtype.is_floating_point
        self.t(sums).copy_(jaccard_sums_plain(lg.double(), t.double() if label_type == 3 else t, squared,
                                              "sigmoid" if sigmoid else "softmax", ignore_index if has_ignore else None))

    def jaccard_backward(self, grad_sums, logits, target, grad_logits, N, C, S, label_type, squared, sigmoid,
                         has_ignore, ignore_index, dtype, device, stream):
        lg = self.t(logits).double().requires_grad_()
        t = self.t(target)
        jaccard_sums_plain(lg, t.double() if label_type == 3 else t, squared, "sigmoid" if sigmoid else "softmax",
                           ignore_index if has_ignore else None).backward(self.t(grad_sums).double())
        self.t(grad_logits).copy_(lg.grad)


@pytest.fixture
def emulated(monkeypatch):
    from seg3d_fast.backends import cuda

    emulator = ContractEmulator()
    monkeypatch.setattr(cuda, "_cuda", emulator)
    monkeypatch.setattr(cuda, "_ptr", emulator.ptr)
    monkeypatch.setattr(cuda, "_launch_context", lambda t: (0, 0))
    return cuda, emulator


def _grads64(x, weight, bias, alpha, residual, stride, residual_first, grad_out):
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (x, weight, bias, alpha, residual)]
    xx, ww, bb, aa, rr = leaves
    z = F.conv3d(xx, ww, bb, stride=stride, padding=weight.shape[-1] // 2)
    if rr is not None and residual_first:
        z = z + rr
    z.retain_grad()
    out = z if aa is None else F.prelu(z, aa)
    if rr is not None and not residual_first:
        out = out + rr
    out.backward(grad_out.double())
    return out.detach(), z.detach(), [xx.grad, ww.grad, bb.grad, None if aa is None else aa.grad, z.grad]


@pytest.mark.parametrize("k,stride", [(3, 1), (3, 2), (1, 1), (1, 2)])
@pytest.mark.parametrize("alpha_kind,residual_mode", [("channel", "after"), ("scalar", "first"), (None, None)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontig"])
def test_host_decomposition_against_contract(emulated, k, stride, alpha_kind, residual_mode, layout):
    cuda, emulator = emulated
    n, c_in, c_out, d, h, w = 2, 4, 6, 5, 6, 7
    x = randn(n, c_in, d, h, w, channels_last=layout == "channels_last", noncontig=layout == "noncontig")
    weight = randn(c_out, c_in, k, k, k)
    bias = randn(c_out)
    alpha = None if alpha_kind is None else torch.rand(1 if alpha_kind == "scalar" else c_out) * 0.3 + 0.05
    out_size = [(s + 2 * (k // 2) - k) // stride + 1 for s in (d, h, w)]
    residual = None if residual_mode is None else randn(n, c_out, *out_size)
    residual_first = residual_mode == "first"
    save_act = alpha is not None and residual is not None and not residual_first
    out, act = cuda.conv3d_prelu_forward(x, weight, bias, alpha, residual, stride, residual_first, save_act)
    grad_out = randn(*out.shape)
    out64, z64, grads64 = _grads64(x, weight, bias, alpha, residual, stride, residual_first, grad_out)
    assert_close(out, out64, None, torch.float32, "out")
    assert out.is_contiguous(memory_format=torch.channels_last_3d if layout == "channels_last"
                             else torch.contiguous_format)
    if save_act:
        assert_close(act, F.prelu(z64, alpha.double()), None, torch.float32, "act")
    saved = None if alpha is None else (act if save_act else out)
    kind = "none" if alpha is None else "act"
    mask = (True, True, True, alpha is not None, True)
    grads = cuda.conv3d_prelu_backward(grad_out, x, weight, alpha, saved, kind, stride, mask)
    for name, got, ref in zip(("grad_x", "grad_w", "grad_b", "grad_alpha", "grad_preact"), grads, grads64):
        if ref is None:
            assert got is None, name
        else:
            assert got.shape == ref.shape and got.dtype == torch.float32, name
            assert_close(got, ref, None, torch.float32, name)
    assert grads[0].is_contiguous(memory_format=torch.channels_last_3d if layout == "channels_last"
                                  else torch.contiguous_format)
    if stride == 2:
        assert emulator.calls.count("conv_gemm") == 1 + 8  # forward + one dgrad launch per parity phase


def test_host_jaccard_wiring(emulated):
    cuda, _ = emulated
    logits = randn(2, 5, 3, 4, 5, noncontig=True)
    target = torch.randint(0, 5, (2, 3, 4, 5), dtype=torch.int16)  # converted to int64 by the backend
    sums = cuda.jaccard_sums(logits, target, True, "softmax", None)
    assert_close(sums, jaccard_sums_plain(logits.double(), target, True, "softmax"), None, torch.float32, "sums")
    g = torch.randn(2, 5, 3)
    grad = cuda.jaccard_sums_backward(g, logits, target, True, "softmax", None)
    assert grad.shape == logits.shape and grad.dtype == logits.dtype


def test_kernels_env_selects_generation(emulated, monkeypatch):
    """SEG3D_FAST_CUDA_KERNELS picks the kernel generation passed to every launch; a bad value is a clear error."""
    cuda, emulator = emulated
    seen = []
    conv_gemm, conv_wgrad = emulator.conv_gemm, emulator.conv_wgrad
    emulator.conv_gemm = lambda a, *rest: (seen.append(a.kernels), conv_gemm(a, *rest))
    emulator.conv_wgrad = lambda a, *rest: (seen.append(a.kernels), conv_wgrad(a, *rest))
    x, weight = randn(2, 8, 5, 6, 7), randn(16, 8, 3, 3, 3)
    for value, expected in (("v1", 1), ("v2", 2), ("", 2)):
        monkeypatch.setenv(cuda.KERNELS_ENV, value)
        seen.clear()
        out, _ = cuda.conv3d_prelu_forward(x, weight, None, None, None, 2, False, False)
        mask = (True, True, False, False, False)
        cuda.conv3d_prelu_backward(randn(*out.shape), x, weight, None, None, "none", 2, mask)
        assert seen and set(seen) == {expected}, (value, seen)
    monkeypatch.setenv(cuda.KERNELS_ENV, "v3")
    with pytest.raises(ValueError, match="SEG3D_FAST_CUDA_KERNELS must be 'v1' or 'v2'"):
        cuda.conv3d_prelu_forward(x, weight, None, None, None, 1, False, False)
