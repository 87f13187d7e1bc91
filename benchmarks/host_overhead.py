"""Host-side cost of the fused ops: the Python and torch work around the kernels, with every kernel launch replaced
by a call that only counts it. Runs on the CPU (no GPU needed).

Why: on a GPU a layer whose kernels take less time than the host needs to issue them runs at the host's pace (the
benchmarks' small layers, the network's deep levels). This measures that floor and the number of launches per call,
for the triton and cuda backends' Python layers, so that changes to it can be judged without a GPU. Not counted: the
launch cost inside Triton's launcher or the CUDA driver (tens of microseconds per launch on the GPU machine), which
the launch count stands for.

    python benchmarks/host_overhead.py [--reps 200] [--json out.json]
    python benchmarks/host_overhead.py --network-memory [--json out.json]   # see network_step_tensors
    python benchmarks/host_overhead.py --network-host [--json out.json]     # see network_step_host
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import seg3d_fast as sf
from seg3d_fast import backends
from seg3d_fast.profile import VARIANT_ENV, env_vars, variant_backend

# (name, C_in, C_out, k, stride, spatial, alpha, residual, residual_first): small volumes, so that the CPU work of
# the torch ops around the kernels stays small next to the Python; the host cost does not depend on the volume.
CASES = (
    ("c32-32_k3s1_res", 32, 32, 3, 1, (6, 7, 5), True, True, False),
    ("c32-32_k3s1_res1st", 32, 32, 3, 1, (6, 7, 5), True, True, True),
    ("c32-64_k3s2", 32, 64, 3, 2, (7, 6, 5), True, False, False),
    ("c64-32_k1s1_noact", 64, 32, 1, 1, (6, 7, 5), False, False, False),
)


class LaunchCounter:
    """Stand-in for kernels: `kernel[grid](...)` (Triton) and `ext.fn(...)` (CUDA extension) only count."""

    def __init__(self):
        self.launches = 0

    def triton_kernel(self):
        counter = self

        class _Kernel:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    counter.launches += 1
                return launch
        return _Kernel()

    def function(self):
        def launch(*args, **kwargs):
            self.launches += 1
        return launch


@contextlib.contextmanager
def stubbed_triton(counter: LaunchCounter):
    """The triton backend's Python layer on CPU tensors (TRITON_INTERPRET=1 while it runs) with every launch a
    counter. The label range a stubbed loss kernel leaves unwritten is read as a valid one (the check still runs)."""
    from seg3d_fast.backends.triton import conv3d_prelu as conv_mod, jaccard as jac_mod, upconv as up_mod

    saved = {}
    for mod in (conv_mod, jac_mod, up_mod):
        for name in dir(mod):
            obj = getattr(mod, name)
            if name.startswith("_") and name.endswith("_kernel") and hasattr(obj, "__getitem__"):
                saved[(mod, name)] = obj
                setattr(mod, name, counter.triton_kernel())
    try:
        with env_vars({"TRITON_INTERPRET": "1"}), unwritten_label_range_valid():  # the backend takes CPU tensors
            yield
    finally:
        for (mod, name), obj in saved.items():
            setattr(mod, name, obj)


@contextlib.contextmanager
def unwritten_label_range_valid():
    """The label range that a stubbed loss kernel leaves unwritten is read as a valid one (the check still runs)."""
    from seg3d_fast import ops

    check = ops._label_range_check
    ops._label_range_check = lambda logits, target, ignore_index, label_range=None, defer=None, note="": check(
        logits, target, ignore_index, None if label_range is None else label_range.zero_(), defer, note)
    try:
        yield
    finally:
        ops._label_range_check = check


@contextlib.contextmanager
def stubbed_cuda(counter: LaunchCounter):
    """The cuda backend's Python layer on CPU tensors (tests/cuda_emulator.py) with every extension call a counter
    (one count per call: jaccard_sums / jaccard_loss each make two launches on the GPU). As in stubbed_triton, the
    label range a stubbed jaccard_loss leaves unwritten is read as a valid one."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import cuda_emulator

    extension = cuda_emulator.model_extension()
    for name in ("conv_gemm", "conv_wgrad", "prelu_backward", "jaccard_sums", "jaccard_backward", "jaccard_loss",
                 "jaccard_loss_backward"):
        setattr(extension, name, counter.function())
    with cuda_emulator.emulated(extension), unwritten_label_range_valid():
        yield


def conv_inputs(case, dtype, gen):
    """x and residual in `dtype`, the parameters in float32 (how a network trains under autocast)."""
    _, c_in, c_out, k, stride, spatial, has_alpha, has_res, _ = case
    x = torch.randn((2, c_in, *spatial), generator=gen).to(dtype).contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn((c_out, c_in, k, k, k), generator=gen) * 0.1
    b = torch.randn(c_out, generator=gen)
    a = torch.full((c_out,), 0.25) if has_alpha else None
    out_spatial = tuple((s - 1) // stride + 1 for s in spatial)
    r = torch.randn((2, c_out, *out_spatial), generator=gen).to(dtype).contiguous(
        memory_format=torch.channels_last_3d) if has_res else None
    leaves = [t.requires_grad_(True) for t in (x, w, b, a, r) if t is not None]
    return (x, w, b, a, r), leaves


def _median_us(fn, reps):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def measure_conv(backend, case, dtype, reps, counter):
    gen = torch.Generator().manual_seed(0)
    (x, w, b, a, r), leaves = conv_inputs(case, dtype, gen)
    stride, rf = case[4], case[8]
    fwd = lambda: sf.conv3d_prelu(x, w, b, a, r, stride=stride, residual_first=rf, backend=backend)  # noqa: E731
    out = fwd()
    grad = torch.randn_like(out)
    bwd = lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True)  # noqa: E731
    return _row("conv3d_prelu", case[0], backend, dtype, fwd, bwd, reps, counter)


def measure_jaccard(backend, dtype, reps, counter):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn((2, 5, 6, 7, 5), generator=gen).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 5, (2, 6, 7, 5), generator=gen)
    fwd = lambda: sf.jaccard_loss(logits, labels, backend=backend)  # noqa: E731
    loss = fwd()
    bwd = lambda: torch.autograd.grad(loss, [logits], retain_graph=True)  # noqa: E731
    return _row("jaccard_loss", "c5", backend, dtype, fwd, bwd, reps, counter)


def _row(op, case, backend, dtype, fwd, bwd, reps, counter):
    """Launches and median host µs of the forward and of the backward."""
    row = {"op": op, "case": case, "backend": backend, "dtype": str(dtype).removeprefix("torch.")}
    for direction, fn in (("forward", fwd), ("backward", bwd)):
        counter.launches = 0
        fn()
        row[f"{direction}_launches"] = counter.launches
        row[f"{direction}_us"] = _median_us(fn, reps)
    return row


@contextlib.contextmanager
def stubbed_triton_tma(counter: LaunchCounter):
    """stubbed_triton with the opt-in TMA kernels on (their descriptors are made on the host as on the GPU)."""
    with env_vars(VARIANT_ENV["triton_tma"]), stubbed_triton(counter):
        yield


def run(reps=200, dtype=torch.bfloat16):
    counter = LaunchCounter()
    rows = []
    for name, stub in (("triton", stubbed_triton), ("triton_tma", stubbed_triton_tma), ("cuda", stubbed_cuda)):
        backend = variant_backend(name)
        with stub(counter):
            for case in CASES:
                rows.append(dict(measure_conv(backend, case, dtype, reps, counter), backend=name))
            if name != "triton_tma":  # the loss has no TMA kernel
                rows.append(measure_jaccard(backend, dtype, reps, counter))
    backends_ok = {name: backends.unavailable_reason(name) for name in ("triton", "cuda")}
    return {"kind": "host_overhead", "python": sys.version.split()[0], "torch": torch.__version__,
            "backends": backends_ok, "reps": reps, "rows": rows}


def table(result) -> str:
    lines = ["| op | case | backend | forward µs (launches) | backward µs (launches) |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['op']} | {r['case']} | {r['backend']} | {r['forward_us']:.0f} ({r['forward_launches']}) "
                     f"| {r['backward_us']:.0f} ({r['backward_launches']}) |")
    return "\n".join(lines)


def network_step_tensors(spatial=(128, 160, 144), features=(8, 16, 32, 64)):
    """Peak bytes of the tensors one bf16 training step of Seg3DNet (1x4 input, 5 classes) allocates with every
    fused layer on one backend's Python layer, its kernels stubbed (what the GPU backends allocate around their
    kernels, measured on the CPU), beside the plain channels-last network's. No workspaces or allocator rounding:
    torch.cuda.max_memory_allocated on the GPU adds those."""
    from seg3d_fast import profile

    args = argparse.Namespace(in_channels=4, classes=5, features=list(features), dtype="bf16")
    rows = {}
    for name, stub in (("plain_cl", None), ("triton", stubbed_triton), ("cuda", stubbed_cuda)):
        with stub(LaunchCounter()) if stub is not None else contextlib.nullcontext():
            variant = profile.Variant(name, args, torch.device("cpu"))  # "triton" / "cuda": every layer forced there
            x, labels = variant.inputs(1, spatial)
            variant.step(x, labels)  # Adam's state exists, as in the timed steps
            sf.ops.forget_backend_choices()
            rows[name] = {"step_tensor_peak_bytes": variant.peak_bytes(x, labels),
                          "backends": sf.ops.chosen_backends()}
    for row in rows.values():
        row["vs_plain_cl"] = row["step_tensor_peak_bytes"] / rows["plain_cl"]["step_tensor_peak_bytes"]
    return {"kind": "network_step_tensors", "input": [1, 4, *spatial], "features": list(features), "dtype": "bf16",
            "torch": torch.__version__, "rows": rows}


# torch ops that launch no GPU work: views, allocations, autograd bookkeeping
_NO_LAUNCH = {"view", "permute", "reshape", "as_strided", "_unsafe_view", "slice", "select", "expand", "t", "transpose",
              "unsqueeze", "squeeze", "alias", "detach", "_reshape_alias", "split", "unbind", "empty", "empty_like",
              "new_empty", "empty_strided", "_record_function_enter_new", "_record_function_exit",
              "_local_scalar_dense"}


class _TorchOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the torch ops run under it that would launch GPU work (each is also a dispatch on the host)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in _NO_LAUNCH:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _autograd_nodes(root) -> int:
    seen, todo = set(), [root]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo += [n for n, _ in node.next_functions]
    return len(seen)


def network_step_host(spatial=(16, 16, 16), features=(8, 16, 32, 64), reps=20):
    """The host's work in one forward + backward of Seg3DNet (1x4 input, 5 classes, bf16 autocast, channels-last,
    as the profile's variants train): launches (torch ops that launch GPU work plus the stubbed kernels), autograd
    nodes, and for the fused variants the median host time with every kernel stubbed (the plain variant's time
    here would be the CPU's convolutions, so it has counts only). Small volume: the counts do not depend on it."""
    from seg3d_fast import graphs, profile

    args = argparse.Namespace(in_channels=4, classes=5, features=list(features), dtype="bf16")
    rows = {}
    for name, stub in (("plain_cl", None), ("triton", stubbed_triton), ("cuda", stubbed_cuda)):
        counter = LaunchCounter()
        with stub(counter) if stub is not None else contextlib.nullcontext():
            variant = profile.Variant(name, args, torch.device("cpu"))
            x, labels = variant.inputs(1, spatial)

            def step():
                return graphs.forward_backward(variant.model, variant.loss, variant.opt, x, labels, variant.amp)
            step()  # backend choices, plans, gradients allocated
            torch_ops = _TorchOps()
            counter.launches = 0
            with torch_ops:
                with torch.autocast("cpu", dtype=variant.amp):
                    loss = variant.loss(variant.model(x), labels)
                nodes = _autograd_nodes(loss.grad_fn)
                loss.backward()
            row = {"launches": torch_ops.count + counter.launches, "kernel_launches": counter.launches,
                   "autograd_nodes": nodes}
            if stub is not None:
                row["host_ms"] = _median_us(step, reps) / 1e3
            rows[name] = row
    return {"kind": "network_step_host", "input": [1, 4, *spatial], "features": list(features), "dtype": "bf16",
            "torch": torch.__version__, "rows": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--network-memory", action="store_true",
                        help="instead: peak tensor bytes of a Seg3DNet training step per backend (network_step_tensors)")
    parser.add_argument("--network-host", action="store_true",
                        help="instead: launches, autograd nodes and stubbed host time of a Seg3DNet training step "
                             "(network_step_host)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the tiny tensors' CPU work stays on one core, as the host's launch work does
    if args.network_host:
        result = network_step_host()
        for name, row in result["rows"].items():
            host = f"{row['host_ms']:6.2f} ms host (kernels stubbed)" if "host_ms" in row else ""
            print(f"{name:<9} {row['launches']:4d} launches ({row['kernel_launches']} fused kernels), "
                  f"{row['autograd_nodes']:4d} autograd nodes  {host}")
    elif args.network_memory:
        result = network_step_tensors()
        for name, row in result["rows"].items():
            print(f"{name:<9} {row['step_tensor_peak_bytes'] / 2**20:8.1f} MiB  {row['vs_plain_cl']:.3f} x plain_cl  "
                  f"{row['backends']}")
    else:
        result = run(args.reps)
        print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)

if __name__ == "__main__":
    main()
