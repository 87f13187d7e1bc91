"""pytest-benchmark suite: fused backends against the cuDNN (eager PyTorch) baseline.

    pytest benchmarks --benchmark-only            # GPU: full sizes; CPU: tiny sizes (CI plumbing check)

Environment variables (comma lists):
  SEG3D_BENCH_SIZE        tiny | full          (default: full on a GPU, tiny on the CPU)
  SEG3D_BENCH_LAYERS      all | representative (default: all on a GPU, representative on the CPU)
  SEG3D_BENCH_DTYPES      dtypes for every layer          (default GPU: bf16; CPU: fp32)
  SEG3D_BENCH_REP_DTYPES  dtypes for representative layers and the loss (default GPU: fp32,fp16,bf16; CPU: fp32)
  SEG3D_BENCH_BACKENDS    eager,eager_cl,compile,reference,triton,triton_tma,cuda (default GPU: all but reference;
                          CPU: eager,eager_cl,reference,triton)
  SEG3D_BENCH_COMPILE     representative | all (layers torch.compile runs on; default representative, bf16 only)
  SEG3D_BENCH_DIRECTIONS  forward,backward,both
  SEG3D_BENCH_REP_MS      device time per GPU measurement (default 30)
  SEG3D_BENCH_DEADLINE    Unix time after which the remaining rows are skipped (gpu_check.sh's time limit)
  SEG3D_BENCH_OUT         results JSON (default benchmarks/results/bench_cuda_<time>.json; CPU: bench_cpu_latest.json)
  SEG3D_CEILINGS_JSON     ceilings measured earlier by ceilings.py (default: measured at session start)
"""
import datetime
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # shapes, harness, ceilings, report
sys.path.insert(1, str(HERE.parent))  # seg3d_fast from this checkout when it is not installed
if not torch.cuda.is_available():
    # Triton's interpreter must be chosen before its kernels are defined (they are imported lazily, later)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import harness  # noqa: E402


class Results:
    """Every record of the session, rewritten to one JSON file after each row (a killed run keeps its rows)."""

    def __init__(self, path, ceilings):
        from seg3d_fast.profile import environment

        self.path = Path(path)
        self.payload = {"kind": "benchmarks", "environment": environment(), "ceilings": ceilings,
                        "fp32_uses_tf32": torch.cuda.is_available() and torch.backends.cudnn.allow_tf32,
                        "records": []}
        self.written = 0.0

    def add(self, record):
        self.payload["records"].append(record)
        harness.fill_speedups(self.payload["records"])  # this row's speed-up, when its baseline ran before it
        if time.monotonic() - self.written > 2:  # often enough to survive a kill, rarely enough to cost nothing
            self.write()

    def write(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.payload, indent=1) + "\n")
        tmp.replace(self.path)
        self.written = time.monotonic()


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def ceilings(device):
    path = os.environ.get("SEG3D_CEILINGS_JSON")
    if path and Path(path).exists():
        return json.loads(Path(path).read_text())
    from ceilings import measure

    return measure(device)


@pytest.fixture(scope="session")
def results(device, ceilings):
    path = os.environ.get("SEG3D_BENCH_OUT")
    if not path:
        # GPU runs are kept (one file per run); the CPU plumbing run overwrites one file
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S") if device.type == "cuda" else "latest"
        path = HERE / "results" / f"bench_{device.type}_{stamp}.json"
    results = Results(path, ceilings)
    yield results
    results.write()
