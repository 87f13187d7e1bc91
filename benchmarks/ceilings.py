"""Measured ceilings of the card: dense matrix-product rate and device-to-device copy bandwidth.

A kernel's floor is max(FLOPs / rate, bytes / bandwidth) (DESIGN.md, "Ceilings"); every benchmark row is
reported as floor / measured time. The rates are measured on the card in the same run (random data, never
zeros: zeros run faster), because datasheet figures are only leads.

    python benchmarks/ceilings.py [--out ceilings.json]
"""
import argparse
import json
import statistics
import time

import torch


def _median_ms(fn, reps, device):
    """Median wall time of fn() in ms: CUDA events on a GPU, perf_counter on the CPU."""
    fn()  # warm-up: handles, kernel selection
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def matmul_tflops(dtype, n, device, reps):
    """Rate of an n x n x n matrix product on random data, in TFLOP/s."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = _median_ms(lambda: torch.mm(a, b), reps, device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def copy_gbps(nbytes, device, reps):
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), reps, device)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def measure(device=None):
    """-> dict of ceilings for `device` (default: the GPU if there is one, else the CPU).

    GPU: bf16 8192^3 product (used for fp16 and bf16 kernels), fp32 8192^3 product under the current TF32
    setting of cuDNN (used for fp32 kernels: cuDNN convs use TF32 when torch.backends.cudnn.allow_tf32),
    2 GiB copy. CPU: small sizes, only so that the plumbing runs (CPU fractions mean little)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        n, nbytes, reps = 8192, 2 << 30, 10
        name = torch.cuda.get_device_name(device)
        low = torch.bfloat16
    else:
        n, nbytes, reps = 512, 64 << 20, 3
        name = "cpu"
        low = torch.bfloat16
    tf32 = device.type == "cuda" and torch.backends.cudnn.allow_tf32
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        fp32 = matmul_tflops(torch.float32, n, device, reps)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    result = {
        "device": name,
        "matmul_n": n,
        "bf16_tflops": matmul_tflops(low, n, device, reps),
        "fp32_tflops": fp32,
        "fp32_uses_tf32": tf32,
        "copy_gbps": copy_gbps(nbytes, device, reps),
        "copy_bytes": nbytes,
    }
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def rate_tflops(ceilings, dtype):
    """The matrix-product rate that bounds a kernel of this dtype."""
    return ceilings["fp32_tflops"] if dtype == torch.float32 else ceilings["bf16_tflops"]


def floor_ms(flops, nbytes, ceilings, dtype):
    """max(FLOPs / rate, bytes / bandwidth) in ms: no kernel runs much faster than this."""
    return max(flops / (rate_tflops(ceilings, dtype) * 1e12), nbytes / (ceilings["copy_gbps"] * 1e9)) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=None, help="write the ceilings as JSON here")
    args = parser.parse_args()
    result = measure(args.device)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
