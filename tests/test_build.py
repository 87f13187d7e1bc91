"""The CUDA extension's build and the cuda backend's host side, on a machine without a GPU (CI has nvcc).

- seg3d_fast._cuda imports when it was built, and calling it without a GPU raises a clear RuntimeError.
- unavailable_reason() explains why the backend cannot run here.
- The host side in seg3d_fast/backends/cuda.py runs against a model of the kernels' contract (csrc/launchers.h,
  tests/cuda_emulator.py); test_cuda_backend.py runs every conv and Jaccard case that way too.
"""
import importlib

import pytest
import torch

import cuda_emulator
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
    for name in ("conv_gemm", "conv_wgrad", "prelu_backward", "jaccard_sums", "jaccard_backward", "jaccard_loss",
                 "jaccard_loss_backward", "device_count"):
        assert callable(getattr(ext, name)), name
    args = ext.ConvArgs()
    args.toff_d = [-1, 0, 1]
    assert list(args.toff_d) == [-1, 0, 1]
    assert ext.MAX_CLASSES == 32
    from seg3d_fast.backends import cuda

    assert ext.INTERFACE_REVISION == cuda.INTERFACE_REVISION  # (built from this checkout's csrc/)


@pytest.mark.parametrize("revision", [None, 0])
def test_an_extension_of_another_version_is_not_used(monkeypatch, revision):
    """A seg3d_fast._cuda built from another version of the package (a stale build, another checkout's module found
    first) would take this version's arguments in its own layout: the backend says it cannot run, and why."""
    import types

    from seg3d_fast.backends import cuda

    stale = types.SimpleNamespace(__file__="/elsewhere/seg3d_fast/_cuda.so")
    if revision is not None:
        stale.INTERFACE_REVISION = revision
    monkeypatch.setattr(cuda, "_cuda", stale)
    reason = cuda.unavailable_reason()
    assert reason.startswith("extension /elsewhere/seg3d_fast/_cuda.so was built from another version of seg3d_fast "
                             f"(interface revision {revision}, this package needs {cuda.INTERFACE_REVISION})")


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
    reasons = cuda.conv3d_prelu_unsupported(x[:, :3].half(), torch.randn(5, 3, 3, 3, 3).half(), None, None, None, 1,
                                            False)
    assert not any("C_in" in r or "C_out" in r for r in reasons), reasons  # odd channel counts run too


# ---- the host side against a model of the kernels' contract (tests/cuda_emulator.py), on CPU tensors -----------
# (every conv and Jaccard case of test_cuda_backend.py also runs that way: its "emulated" parameter)

@pytest.fixture
def emulated():
    extension = cuda_emulator.model_extension()
    with cuda_emulator.emulated(extension) as cuda:
        yield cuda, extension


def test_host_jaccard_wiring(emulated):
    """int16 labels are widened by the backend; non-contiguous logits are made contiguous."""
    cuda, _ = emulated
    logits = randn(2, 5, 3, 4, 5, noncontig=True)
    target = torch.randint(0, 5, (2, 3, 4, 5), dtype=torch.int16)
    sums = cuda.jaccard_sums(logits, target, True, "softmax", None)
    assert_close(sums, jaccard_sums_plain(logits.double(), target, True, "softmax"), None, torch.float32, "sums")
    grad = cuda.jaccard_sums_backward(torch.randn(2, 5, 3), logits, target, True, "softmax", None)
    assert grad.shape == logits.shape and grad.dtype == logits.dtype


def test_kernels_env_selects_generation(emulated, monkeypatch):
    """SEG3D_FAST_CUDA_KERNELS picks the kernel generation passed to every launch; a bad value is a clear error."""
    cuda, extension = emulated
    seen = []
    conv_gemm, conv_wgrad = extension.conv_gemm, extension.conv_wgrad
    extension.conv_gemm = lambda a, *rest: (seen.append(a.kernels), conv_gemm(a, *rest))
    extension.conv_wgrad = lambda a, *rest: (seen.append(a.kernels), conv_wgrad(a, *rest))
    x, weight = randn(2, 8, 5, 6, 7), randn(16, 8, 3, 3, 3)
    for value, expected in (("v1", 1), ("v2", 2), ("v3", 3), ("", 3)):
        monkeypatch.setenv(cuda.KERNELS_ENV, value)
        seen.clear()
        out, _ = cuda.conv3d_prelu_forward(x, weight, None, None, None, 2, False, False)
        mask = (True, True, False, False, False)
        cuda.conv3d_prelu_backward(randn(*out.shape), x, weight, None, None, "none", 2, mask)
        assert seen and set(seen) == {expected}, (value, seen)
    monkeypatch.setenv(cuda.KERNELS_ENV, "v4")
    with pytest.raises(ValueError, match="SEG3D_FAST_CUDA_KERNELS must be 'v1', 'v2' or 'v3'"):
        cuda.conv3d_prelu_forward(x, weight, None, None, None, 1, False, False)


# ---- the kernels' machine code for Hopper, compiled here (benchmarks/sass_check.py) ------------------------------

@pytest.mark.slow  # a compile of csrc/ for sm_90 (~40 s here); gpu_check's test stage leaves it to CI
def test_kernels_machine_code_for_sm90():
    """Every tensor-core main loop takes its operands from shared memory with ldmatrix (fp16/bf16) or 32-bit shared
    loads (tf32), never through generic loads (WMMA's loads compiled to those); the second-generation kernels do not
    spill (nor does the halo kernel); and their loop stays lean: at most 32 instructions per HMMA (the WMMA kernels took 25-74; the current
    ones 4-32, the narrowest tiles of 4-channel inputs the most; results/sass_sm90_*.jsonl). Runs wherever nvcc is (CI builds the extension with it)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import sass_check

    if sass_check._tool("nvcc") is None or sass_check._tool("cuobjdump") is None:
        pytest.skip("needs nvcc and cuobjdump (the CUDA toolkit; CI has it)")
    records = sass_check.check(90, only="_kernel<")
    loops = [r for r in records if "loop_instructions" in r]
    v2 = [r for r in records if "_v2_kernel" in r["kernel"] or "halo_kernel" in r["kernel"]]
    assert len(v2) >= 20 and len(loops) >= 30, [r["kernel"] for r in records]
    for r in loops:
        assert r["generic_loads"] == 0, r
        assert r["hmma"] > 0, r
        if "fp32" not in r["kernel"]:
            assert r["ldsm"] > 0, r
    for r in v2:
        assert r["spill_bytes"] == 0, r
        # (the halo kernel's loop also holds its once-per-channel-chunk halo copy: its static count says little)
        if "loop_instructions" in r and "halo" not in r["kernel"]:
            assert r["instructions_per_hmma"] <= 32, r
