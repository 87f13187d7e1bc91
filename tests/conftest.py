import os
import zlib

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The flag must be set before triton is
# imported (kernels are fixed as interpreted or compiled when defined), hence here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    # Fresh random inputs per test, reproducible per test name.
    torch.manual_seed(zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").encode()))
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (runs on the GPU machine via benchmarks/gpu_check.sh)")
    config.addinivalue_line("markers", "slow: takes more than ~20 s on 2 CPU cores")


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
