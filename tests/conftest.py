import os
import zlib

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The flag must be set before triton is
# imported (kernels are fixed as interpreted or compiled when defined), hence here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def round_bf16_as_the_gpu_does():
    """Triton's interpreter (3.6-3.9) casts float32 to bfloat16 by truncating the mantissa; the GPU (cvt.rn.bf16.f32)
    rounds to nearest even, as torch does. Every fp32 -> bf16 cast in the kernels (stores, the float32 weights of bf16
    layers, dz before the second GEMM) would otherwise carry up to twice the GPU's rounding error and a bias."""
    from triton.runtime import interpreter
    import numpy as np
    import triton.language as tl

    cast = interpreter.InterpreterBuilder.cast_impl
    if getattr(cast, "rounds_bf16", False):
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return cast(self, src, dst_type)
        values = np.asarray(src.data, dtype=np.float32)
        bits = values.view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = np.where(np.isnan(values), (bits >> 16) | 0x40, rounded).astype(np.uint16)  # NaN stays a quiet NaN
        return interpreter.TensorHandle(rounded, tl.bfloat16)

    cast_impl.rounds_bf16 = True
    interpreter.InterpreterBuilder.cast_impl = cast_impl


if os.environ.get("TRITON_INTERPRET") == "1":
    round_bf16_as_the_gpu_does()


@pytest.fixture(autouse=True)
def _seed():
    # Fresh random inputs per test, reproducible per test name.
    torch.manual_seed(zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").encode()))
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (runs on the GPU machine via benchmarks/gpu_check.sh)")
    config.addinivalue_line("markers", "slow: takes more than ~20 s on 2 CPU cores")


@pytest.fixture
def one_big_gpu_test_at_a_time():
    """For the tests of 10-26 GB of GPU memory (helpers.BIG_GPU_MEMORY): the pytest-xdist workers of gpu_check.sh
    share one card, so these hold a file lock while they run (one at a time, whichever worker has them) and give
    their cached blocks back to the card when done (a worker's caching allocator keeps them otherwise)."""
    import fcntl
    import gc
    import tempfile

    with open(os.path.join(tempfile.gettempdir(), "seg3d_fast_big_gpu_memory.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if torch.cuda.is_available():
                gc.collect()
                torch.cuda.empty_cache()
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture
def exact_fp32():
    """TF32 off for cuDNN and matmul during a test (restored after): exact fp32 on both sides of a comparison."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(scope="session")
def simulated_cuda_extension(request):
    """csrc/ built for the CPU simulation (tests/cuda_sim/), once per session; a build failure is an error here."""
    from cuda_sim.build import build

    cache = getattr(request.config, "cache", None)  # None with -p no:cacheprovider
    return build(cache_dir=cache.mkdir("seg3d_simt") if cache is not None else None)
