"""seg3d-fast profile: full-volume training throughput and memory of Seg3DNet, fused backends beside plain PyTorch.

For each variant ("plain": the same network from nn.Conv3d / nn.PReLU / sums, the baseline; "plain_cl": that in
channels_last_3d; "fused": the fused network, each layer on the best backend that can run it; "reference" /
"triton" / "cuda": the fused network forced onto that backend; "triton_tma": triton with its opt-in TMA kernels;
"fused_graph", "cuda_graph", "plain_cl_graph": those with forward and backward replayed as one CUDA graph) it
measures:
  steps/s and voxels/s of full training steps (forward, Jaccard loss, backward, Adam) at --input-size and --batch,
    in --dtype (fp16/bf16: autocast, fp32 master weights);
  peak memory: on a GPU torch.cuda.max_memory_allocated over the timed steps (model, optimizer state, activations,
    workspaces: what the card must hold); on the CPU an estimate = bytes saved for backward in one forward
    (saved_tensor_bytes, parameters excluded) + 4x the parameter bytes (weights, gradients, Adam's two moments);
    beside it, on either, the peak of the tensors one forward + backward allocates (step_tensor_peak_bytes:
    activations, gradients and temporaries, without workspaces or allocator rounding);
  the largest cubic volume (edge a multiple of 16) that trains in --memory-budget GiB: on a GPU a binary search
    running one real step per probe under torch.cuda.set_per_process_memory_fraction; on the CPU the estimate
    above, measured at edges 16 and 32 and extended linearly in voxels (activations scale with the volume).
--trace DIR writes a torch.profiler Chrome trace and an op table per variant. Results: JSON and a PNG chart.

--saved-bytes is the CPU memory/time check: Seg3DNet at --input-size in fp32 on the CPU, fused (reference backend)
against plain eager: saved-for-backward bytes ratio (target <= 0.55) and training-step time ratio (target <= 1.15).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import graphs, ops
from .files import write_atomic
from .models import peak_live_bytes, saved_tensor_bytes

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
# "fused": every layer on the best backend that can run it; "reference"/"triton"/"cuda": every layer forced onto one
# backend (an error when a layer cannot run there, e.g. the cuda kernels need even channel counts in fp16/bf16);
# "triton_tma": "triton" with its opt-in TMA kernels on (VARIANT_ENV); "..._graph": that variant's forward and
# backward replayed as one CUDA graph (graphs.CudaGraphStep; GPU only).
VARIANTS = ("plain", "plain_cl", "fused", "reference", "triton", "cuda", "triton_tma", "plain_cl_graph",
            "fused_graph", "cuda_graph")
VARIANT_ENV = {"triton_tma": {"SEG3D_FAST_TRITON_TMA": "1"}}
GRAPH_SUFFIX = "_graph"


def variant_backend(name: str):
    """The backend a variant's fused ops run on: None (each op on its best backend) for "fused", else the name less
    its VARIANT_ENV and graph suffixes ("triton_tma" -> "triton", "cuda_graph" -> "cuda")."""
    name = name.removesuffix(GRAPH_SUFFIX)
    return None if name == "fused" else name.split("_")[0]
SAVED_BYTES_TARGET = 0.55
STEP_TIME_TARGET = 1.15


# ---------------------------------------------------------------------------------------------------------------------
# measurements usable on their own
def plain_jaccard_loss(logits, labels, smooth: float = 1e-5):
    """The Jaccard (Tanimoto) loss in plain PyTorch, as the baseline network trains with it: softmax, one-hot target
    and their products all stored by autograd. Same value as seg3d_fast.jaccard_loss(logits, labels) (defaults:
    squared, softmax, sums pooled over the batch, mean over classes)."""
    p = logits.float().softmax(1)
    t = F.one_hot(labels.long(), logits.shape[1]).movedim(-1, 1).to(p.dtype)
    dims = (0, *range(2, p.dim()))
    inter = (p * t).sum(dims)
    union = (p * p).sum(dims) + (t * t).sum(dims) - inter
    return (1 - (inter + smooth) / (union + smooth)).mean()


@contextlib.contextmanager
def env_vars(changes: dict):
    """Environment variables set for the duration of a block, the previous values restored after it."""
    saved = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def environment() -> dict:
    """Card, driver, library versions and date: stored with every results file."""
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
           "platform": platform.platform(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "cpu_threads": torch.get_num_threads(), "device": "cpu", "driver": None, "triton": None,
           "gpu_memory_bytes": None, "allow_tf32": {"cudnn": torch.backends.cudnn.allow_tf32,
                                                    "matmul": torch.backends.cuda.matmul.allow_tf32}}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - no triton is a fact to record, not an error
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, gpu_memory_bytes=props.total_memory, sm_count=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}", l2_bytes=getattr(props, "L2_cache_size", None))
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    try:  # the checkout measured, where there is one
        env["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           timeout=10, cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    try:
        from . import backends

        env["backends"] = backends.available()
    except Exception as e:  # noqa: BLE001
        env["backends"] = f"unavailable: {e}"
    return env


# ---------------------------------------------------------------------------------------------------------------------
# the training step of one variant
class Variant:
    """Seg3DNet, its loss and Adam for one variant, on one device, at one input size."""

    def __init__(self, name, args, device):
        from .models import Seg3DNet

        self.name, self.device = name, device
        self.amp = DTYPES[args.dtype]
        self.channels_last = name != "plain"
        torch.manual_seed(0)
        fused = not name.startswith("plain")
        backend = variant_backend(name)
        self.env = VARIANT_ENV.get(name, {})
        self.model = Seg3DNet(in_channels=args.in_channels, num_classes=args.classes, features=args.features,
                              fused=fused, backend=backend if fused else None).to(device).train()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        if fused:
            from .ops import jaccard_loss

            self.loss = lambda logits, labels: jaccard_loss(logits, labels, backend=backend)
        else:
            self.loss = plain_jaccard_loss
        self.opt = torch.optim.Adam(self.model.parameters(), lr=5e-5, fused=device.type == "cuda")  # as train.py
        self.in_channels, self.classes = args.in_channels, args.classes
        self.graphed = name.endswith(GRAPH_SUFFIX)
        if self.graphed and device.type != "cuda":
            raise ValueError(f"variant {name} replays CUDA graphs: it needs a CUDA device, got {device}")
        self.graph_step = graphs.CudaGraphStep(self.model, self.loss, self.opt, autocast_dtype=self.amp) \
            if self.graphed else None

    def inputs(self, batch, spatial):
        x = torch.randn(batch, self.in_channels, *spatial, device=self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        labels = torch.randint(0, self.classes, (batch, *spatial), device=self.device)
        return x, labels

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)

    def step(self, x, labels):
        with env_vars(self.env):
            if self.graph_step is not None:
                return self.graph_step(x, labels)[0]
            return graphs.train_step(self.model, self.loss, self.opt, x, labels, self.amp)[0]

    def peak_bytes(self, x, labels):
        """Peak bytes an (eager) forward + backward allocates (CPU allocations tracked op by op; gradients
        included)."""
        def forward_backward():
            with env_vars(self.env):
                graphs.forward_backward(self.model, self.loss, self.opt, x, labels, self.amp)
        return peak_live_bytes(forward_backward)

    def saved_bytes(self, x):
        with self.autocast():
            return saved_tensor_bytes(self.model, x)

    def param_bytes(self):
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def release(self):
        self.opt.zero_grad(set_to_none=True)
        self.opt.state.clear()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_steps(variant, x, labels, warmup, steps):
    """(per-step wall times, per-step host times, back-to-back ms per step) in ms, after `warmup` untimed steps (JIT,
    autotuning, cuDNN choice). Wall: synchronized before and after. Host: until step() returns, the GPU's work still
    queued; near the wall time it says that the step runs at the host's pace (launch and Python overhead), not the
    GPU's. Back-to-back: `steps` more steps with no wait between them, the time per step (a training loop's pace:
    the host's work for a step overlaps the GPU's for the one before). On a GPU the
    allocator's peak is reset after the warm-up: max_memory_allocated afterwards is the timed steps' peak (the
    optimizer state made in warm-up included, its one-time work such as Triton's autotuning buffers or the
    dispatcher's timing of every backend on a new shape not). A graphed variant's peak is reset before the step
    that captures its graph instead: replays allocate nothing, the memory they use is the capture's."""
    # a graphed variant: the step's own eager warm-up, then the peak reset, then the capture (the next call) and
    # the warm-up replays
    before_reset = warmup if variant.graph_step is None else variant.graph_step.warmup
    for _ in range(before_reset):
        variant.step(x, labels)
    if variant.device.type == "cuda":
        _sync(variant.device)
        torch.cuda.reset_peak_memory_stats(variant.device)
    for _ in range(0 if variant.graph_step is None else warmup + 1):
        variant.step(x, labels)
    times, host = [], []
    for _ in range(steps):
        _sync(variant.device)
        t0 = time.perf_counter()
        variant.step(x, labels)
        host.append((time.perf_counter() - t0) * 1e3)
        _sync(variant.device)
        times.append((time.perf_counter() - t0) * 1e3)
    # as a training loop runs them: the host queues a step while the GPU runs the one before
    _sync(variant.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        variant.step(x, labels)
    if variant.graph_step is not None:
        variant.graph_step.settle()
    _sync(variant.device)
    return times, host, (time.perf_counter() - t0) * 1e3 / max(steps, 1)


def estimate_bytes(variant, batch, spatial):
    """CPU memory estimate of a training step: saved-for-backward bytes + 4x the parameter bytes."""
    x, _ = variant.inputs(batch, spatial)
    return variant.saved_bytes(x) + 4 * variant.param_bytes()


def fits_on_gpu(variant, batch, edge, budget_bytes):
    """Does one training step at edge^3 run within budget_bytes? (-> (fits, peak bytes or None))"""
    device = variant.device
    variant.release()
    _free(device)
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total), device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        x, labels = variant.inputs(batch, (edge,) * 3)
        variant.step(x, labels)
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return peak <= budget_bytes, peak
    except torch.cuda.OutOfMemoryError:
        return False, None
    finally:
        x = labels = None
        variant.release()
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        _free(device)


def _untuned():
    """The Triton kernels on their default tiles (no autotuning of new shapes), where Triton is there."""
    from . import backends

    if backends.unavailable_reason("triton") is not None:
        return contextlib.nullcontext()
    from .backends.triton.conv3d_prelu import default_tiles

    return default_tiles()


def largest_cube(variant, batch, budget_bytes, max_edge):
    """Largest edge (a multiple of 16, <= max_edge) whose cubic volume trains in budget_bytes. -> dict."""
    device = variant.device
    if device.type == "cuda":
        lo, hi, best_peak = 0, max_edge // 16, None  # in units of 16; lo fits (0 = nothing), hi + 1 does not
        with _untuned():  # every probe is a new shape: memory does not depend on the tiles, tuning them would
            while lo < hi:  # take most of the time
                mid = (lo + hi + 1) // 2
                ok, peak = fits_on_gpu(variant, batch, 16 * mid, budget_bytes)
                if ok:
                    lo, best_peak = mid, peak
                else:
                    hi = mid - 1
        return {"max_cubic_edge": 16 * lo or None, "max_cubic_bytes": best_peak,
                "max_cubic_method": "binary search, one training step per probe (Triton tiles untuned), "
                                    "torch.cuda.max_memory_allocated"}
    small, large = (estimate_bytes(variant, batch, (e,) * 3) for e in (16, 32))
    slope = (large - small) / (32**3 - 16**3)  # bytes per voxel of the volume (batch included)
    fixed = small - slope * 16**3
    estimate = lambda e: fixed + slope * e**3  # noqa: E731
    fitting = [e for e in range(16, max_edge + 1, 16) if estimate(e) <= budget_bytes * (1 + 1e-9)]  # 1e-9: rounding
    edge = max(fitting, default=0)
    return {"max_cubic_edge": edge or None, "max_cubic_bytes": estimate(edge) if edge else None,
            "max_cubic_method": "estimate: saved-for-backward bytes + 4x parameters at edges 16 and 32, "
                                "extended linearly in voxels (CPU; no allocator peak)"}


def peak_allocations(variant, x, labels, top=12):
    """GPU: what is allocated at the peak of one training step, from the caching allocator's history
    (torch.cuda.memory._record_memory_history): {"peak_bytes": the step's peak above what was allocated before it,
    "top": [{"where", "count", "bytes"}] the live allocations grouped by the line that made them, largest first}.
    Beside step_tensor_peak_bytes it says what the rest of max_memory_allocated is (workspaces, block rounding)."""
    device = variant.device
    torch.cuda.memory._record_memory_history(max_entries=500_000, stacks="python")
    try:
        variant.step(x, labels)
        _sync(device)
        snapshot = torch.cuda.memory._snapshot(device)
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    return alive_at_peak(snapshot["device_traces"][device.index or 0], top)


def alive_at_peak(events, top=12):
    """peak_allocations' figures from an allocator trace (a list of {"action", "addr", "size", "frames"}): an
    "alloc" adds its block, a "free_requested" removes it (when torch's allocated-bytes count drops); the peak is
    relative to the trace's start, and only blocks allocated within the trace are listed."""
    live, current, peak, at_peak = {}, 0, 0, []
    for event in events:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            current += event["size"]
            if current > peak:
                peak, at_peak = current, list(live.values())
        elif event["action"] == "free_requested":  # also blocks allocated before the trace (old gradients)
            live.pop(event["addr"], None)
            current -= event["size"]
    groups = {}
    for event in at_peak:
        where = _allocation_site(event.get("frames") or [])
        count, nbytes = groups.get(where, (0, 0))
        groups[where] = (count + 1, nbytes + event["size"])
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]
    return {"peak_bytes": peak, "top": [{"where": w, "count": c, "bytes": b} for w, (c, b) in ranked]}


def _allocation_site(frames):
    """The innermost frame in seg3d_fast (else the innermost Python frame) as "file.py:line function"."""
    python = [f for f in frames if f.get("filename", "").endswith(".py")]
    ours = [f for f in python if "seg3d_fast" in f["filename"]]
    frame = (ours or python or [None])[0]
    return "?" if frame is None else f"{Path(frame['filename']).name}:{frame['line']} {frame['name']}"


def trace(variant, x, labels, out_dir, steps=3):
    """torch.profiler over `steps` training steps: Chrome trace + op table under out_dir. Returns the GPU's busy
    time per step in ms (its kernels' and copies' time, summed; None on the CPU): beside the step time, the part
    of the step the GPU works."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if variant.device.type == "cuda" else [])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            variant.step(x, labels)
        _sync(variant.device)
    prof.export_chrome_trace(str(out_dir / f"trace_{variant.name}.json"))
    sort = "cuda_time_total" if variant.device.type == "cuda" else "cpu_time_total"
    averages = prof.key_averages()
    (out_dir / f"ops_{variant.name}.txt").write_text(averages.table(sort_by=sort, row_limit=30))
    # where the host's time goes (Python-level ops, aten calls, CUDA runtime calls such as cudaLaunchKernel or an
    # event wait): a host-bound step is read from this table, not from the GPU one
    (out_dir / f"host_{variant.name}.txt").write_text(averages.table(sort_by="self_cpu_time_total", row_limit=25))
    if variant.device.type != "cuda":
        return None
    # the device-side events (kernels, copies, memsets) only, as the table's "Self CUDA time total": the CPU ops'
    # rows repeat their kernels' time; self_device_time_total (torch >= 2.4), in microseconds
    from torch.autograd import DeviceType

    busy_us = sum(e.self_device_time_total for e in averages
                  if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False))
    return busy_us / 1e3 / steps


# ---------------------------------------------------------------------------------------------------------------------
# the command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import at_least, device_name

    # (bounded types: a bad value is argparse's one-line error naming the option, not a traceback from a step)
    parser.add_argument("--input-size", type=at_least(1), nargs=3, default=[128, 160, 144], metavar=("D", "H", "W"),
                        help="volume per sample (default: the paper's BRATS crop 128 160 144)")
    parser.add_argument("--batch", type=at_least(1), default=1)
    parser.add_argument("--in-channels", type=at_least(1), default=4)
    parser.add_argument("--classes", type=at_least(2), default=5)
    parser.add_argument("--features", type=at_least(1), nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="fp16/bf16: autocast (AMP)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                        help="default: plain, plain_cl, fused, fused_graph and plain_cl_graph (on the CPU: plain "
                             "and reference)")
    parser.add_argument("--device", type=device_name, default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--steps", type=at_least(1), default=10, help="timed training steps per variant")
    parser.add_argument("--warmup", type=at_least(0), default=3)
    parser.add_argument("--memory-budget", type=at_least(0.0, float), default=16.0, metavar="GIB",
                        help="budget for the largest-cubic-volume search (GiB; 0 skips the search)")
    parser.add_argument("--max-edge", type=at_least(16), default=512, help="largest edge the search tries")
    parser.add_argument("--time-limit", type=at_least(0.0, float), default=0, metavar="S",
                        help="skip the remaining volume searches once this many seconds have passed (0: no limit)")
    parser.add_argument("--trace", default=None, metavar="DIR", help="write torch.profiler traces here")
    parser.add_argument("--memory-history", action="store_true",
                        help="GPU: record the allocator's history over one step and list what is allocated at its "
                             "peak, by the line that allocated it (row 'peak_allocations')")
    parser.add_argument("--out", default=None, help="results JSON (default benchmarks/results/profile_<date>.json; "
                                                    "--saved-bytes: benchmarks/results/cpu_memory_<date>.json)")
    parser.add_argument("--chart", default=None, help="PNG chart (default: the JSON path with .png)")
    parser.add_argument("--threads", type=at_least(0), default=0, help="CPU threads for torch (0: torch's default)")
    parser.add_argument("--saved-bytes", action="store_true",
                        help="CPU check instead: saved-for-backward bytes and step time, fused / plain, fp32")


def _default_variants(device):
    # on a GPU also the steps `train` takes there by default (CUDA graphs), beside the plain network graphed too
    if device.type == "cuda":
        return ["plain", "plain_cl", "fused", "fused_graph", "plain_cl_graph"]
    return ["plain", "reference"]


def _out_path(args, stem):
    if args.out:
        return Path(args.out)
    return Path("benchmarks/results") / f"{stem}_{datetime.date.today().isoformat()}.json"


def run_profile(args):
    """Throughput of every variant first, then the largest-volume searches (slower; cut by --time-limit), writing the
    JSON after each figure so that a run stopped from outside keeps what it measured."""
    t_start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:  # the memory-cap API wants an indexed device
        device = torch.device("cuda", torch.cuda.current_device())
    names = list(dict.fromkeys(args.variants or _default_variants(device)))  # (a variant listed twice runs once)
    graphed = [n for n in names if n.endswith(GRAPH_SUFFIX)]
    if graphed and device.type != "cuda":  # (checked before any variant runs: a one-line error, nothing written)
        from .cli import UsageError

        raise UsageError(f"variants {' '.join(graphed)} replay CUDA graphs: they need a CUDA device, got {device}")
    from . import backends

    for name in names:  # a backend that cannot run here, before any variant runs
        backend = None if name.startswith("plain") else variant_backend(name)
        why = None if backend is None else backends.unavailable_reason(backend)
        if why is not None:
            from .cli import UsageError

            raise UsageError(f"variant {name}: backend {backend} cannot run here ({why})")
    if args.memory_history and device.type != "cuda":
        print("profile: --memory-history records the CUDA allocator's history: ignored on the CPU", file=sys.stderr)
    spatial = tuple(args.input_size)
    voxels = args.batch * math.prod(spatial)
    budget = int(args.memory_budget * 2**30)
    config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))}
    config.update(device=str(device), memory_budget_bytes=budget)
    payload = {"kind": "profile", "environment": environment(), "config": config, "results": []}
    path = _out_path(args, "profile")
    variants = {}
    for name in names:
        variant = variants[name] = Variant(name, args, device)
        x, labels = variant.inputs(args.batch, spatial)
        ops.forget_backend_choices()  # so that chosen_backends() reports this variant's choices only
        times, host, back_to_back = time_steps(variant, x, labels, args.warmup, args.steps)
        step_ms = statistics.median(times)
        row = {"variant": name, "step_ms": step_ms, "steps_per_s": 1e3 / step_ms,
               "voxels_per_s": voxels * 1e3 / step_ms, "step_ms_all": times, "host_ms": statistics.median(host),
               "back_to_back_ms": back_to_back, "backends": ops.chosen_backends()}
        if variant.graph_step is not None:  # the timed steps were replays unless these say otherwise
            g = variant.graph_step
            row.update(graph_replays=g.replays, graph_eager_steps=g.eager_steps, graph_disabled=g.disabled)
        if device.type == "cuda":
            row.update(peak_bytes=torch.cuda.max_memory_allocated(device),
                       memory_method="torch.cuda.max_memory_allocated over the timed steps" + (
                           " (and the graph's capture)" if variant.graphed else ""))
        else:
            row.update(peak_bytes=variant.saved_bytes(x) + 4 * variant.param_bytes(),
                       memory_method="estimate: saved-for-backward bytes + 4x parameters")
        # the tensors one forward + backward allocates, held at once (no workspaces, no allocator rounding): beside
        # the GPU's max_memory_allocated it shows how much of the peak is activations and how much is workspace
        row["step_tensor_peak_bytes"] = variant.peak_bytes(x, labels)
        if args.trace:
            row["gpu_busy_ms"] = trace(variant, x, labels, args.trace)
        if args.memory_history and device.type == "cuda" and not variant.graphed:  # (a replay allocates nothing)
            row["peak_allocations"] = peak_allocations(variant, x, labels)
        del x, labels
        variant.release()
        _free(device)
        payload["results"].append(row)
        _compare(payload["results"])
        _write(path, payload)
        _print_row(row)
    for row in (payload["results"] if budget > 0 else []):
        if args.time_limit and time.perf_counter() - t_start > args.time_limit:
            row["max_cubic_method"] = f"skipped: --time-limit {args.time_limit:g} s spent"
            continue
        if variants[row["variant"]].graphed:  # its graph holds the timed size's memory; new sizes would run eagerly
            row["max_cubic_method"] = "skipped: a CUDA-graph variant (the same tensors as the eager variant)"
            continue
        row.update(largest_cube(variants[row["variant"]], args.batch, budget, args.max_edge))
        _write(path, payload)
        print(f"{row['variant']:<10} largest cube in {args.memory_budget:g} GiB: edge {row['max_cubic_edge']}",
              flush=True)
    _write(path, payload)
    chart = Path(args.chart) if args.chart else path.with_suffix(".png")
    _chart(payload, chart)
    print(f"wrote {path} and {chart}")
    return payload


def _compare(results):
    """speed-up and memory of each variant against the plain network: its faster variant for speed, its smaller
    peak for memory (whichever order the variants were listed in)."""
    plain = [r for r in results if r["variant"].startswith("plain")]
    if not plain:
        return
    best_ms = min(r["step_ms"] for r in plain)
    best_back_to_back = min(r["back_to_back_ms"] for r in plain)
    least_bytes = min((r["peak_bytes"] for r in plain if r["peak_bytes"]), default=None)
    for r in results:
        r["speedup_vs_plain"] = best_ms / r["step_ms"]
        r["back_to_back_speedup_vs_plain"] = best_back_to_back / r["back_to_back_ms"]
        r["memory_vs_plain"] = r["peak_bytes"] / least_bytes if least_bytes and r["peak_bytes"] else None


def _print_row(r):
    peak = r["peak_bytes"] / 2**30 if r["peak_bytes"] else float("nan")
    edge = r.get("max_cubic_edge")
    busy = r.get("gpu_busy_ms")
    print(f"{r['variant']:<10} {r['step_ms']:9.1f} ms/step {r['steps_per_s']:8.2f} steps/s "
          f"{r['voxels_per_s'] / 1e6:9.2f} Mvox/s  back-to-back {r['back_to_back_ms']:.1f} ms/step  "
          f"peak {peak:6.2f} GiB  host {r['host_ms']:.1f} ms"
          + (f"  GPU busy {busy:.1f} ms" if busy else "") + (f"  largest cube {edge}^3" if edge else ""), flush=True)
    if r.get("backends"):
        print(f"{'':<10} backends (distinct layer shapes): {describe_backends(r['backends'])}", flush=True)
    if r.get("peak_allocations"):
        p = r["peak_allocations"]
        print(f"{'':<10} allocated at the step's peak ({p['peak_bytes'] / 2**20:.0f} MiB above the step's start): "
              + "; ".join(f"{t['bytes'] / 2**20:.0f} MiB x{t['count']} {t['where']}" for t in p["top"]), flush=True)


def describe_backends(backends: dict) -> str:
    """A row's "backends" (ops.chosen_backends()) in words: "conv3d_prelu/forward cuda 10, reference 6; ..."."""
    return "; ".join(f"{op} " + ", ".join(f"{b} {n}" for b, n in sorted(chosen.items()))
                     for op, chosen in backends.items())


def run_saved_bytes(args):
    """Fused (reference backend) vs plain Seg3DNet on the CPU in fp32: saved bytes, the peak bytes of a forward +
    backward (also under bf16 autocast, as the GPU profile runs; allocations tracked op by op: what the step adds
    to the memory in use before it, so inputs, parameters and optimizer state are left out) and training-step time.

    Steps alternate between the two networks (drifts of the machine hit both alike). The time ratio is that of the
    median process CPU times: on a shared machine other load inflates wall-clock times (threads wait for each
    other at every parallel region) far more than CPU times. Wall-clock ratios (fastest and median steps) are
    stored beside it."""
    device = torch.device("cpu")
    args.dtype = "fp32"
    spatial = tuple(args.input_size)
    variants = {name: Variant(name, args, device) for name in ("plain", "reference")}
    x, labels = variants["plain"].inputs(args.batch, spatial)
    saved = {name: v.saved_bytes(x) for name, v in variants.items()}
    gc.collect()
    for v in variants.values():
        v.step(x, labels)  # the optimizer's state exists before the peak is measured
    peak = {name: v.peak_bytes(x, labels) for name, v in variants.items()}
    peak_bf16 = {}
    for name in variants:
        v = Variant(name, argparse.Namespace(**dict(vars(args), dtype="bf16")), device)
        v.step(x, labels)
        peak_bf16[name] = v.peak_bytes(x, labels)
        del v
    gc.collect()
    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    for name, v in variants.items():
        for _ in range(args.warmup):
            v.step(x, labels)
    for _ in range(args.steps):
        for name, v in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            v.step(x, labels)
            wall[name].append((time.perf_counter() - t0) * 1e3)
            cpu[name].append((time.process_time() - c0) * 1e3)
    cpu_ms = {name: statistics.median(t) for name, t in cpu.items()}
    result = {
        "saved_bytes_plain": saved["plain"], "saved_bytes_fused": saved["reference"],
        "saved_bytes_ratio": saved["reference"] / saved["plain"], "saved_bytes_target": SAVED_BYTES_TARGET,
        "peak_bytes_plain": peak["plain"], "peak_bytes_fused": peak["reference"],
        "peak_bytes_ratio": peak["reference"] / peak["plain"],
        "peak_bytes_plain_bf16": peak_bf16["plain"], "peak_bytes_fused_bf16": peak_bf16["reference"],
        "peak_bytes_ratio_bf16": peak_bf16["reference"] / peak_bf16["plain"],
        "step_cpu_ms_plain": cpu_ms["plain"], "step_cpu_ms_fused": cpu_ms["reference"],
        "step_time_ratio": cpu_ms["reference"] / cpu_ms["plain"], "step_time_target": STEP_TIME_TARGET,
        "wall_ratio_fastest": min(wall["reference"]) / min(wall["plain"]),
        "wall_ratio_median": statistics.median(wall["reference"]) / statistics.median(wall["plain"]),
        "step_wall_ms_all": wall, "step_cpu_ms_all": cpu,
    }
    result["meets_targets"] = (result["saved_bytes_ratio"] <= SAVED_BYTES_TARGET
                               and result["step_time_ratio"] <= STEP_TIME_TARGET)
    config = {"input": [args.batch, args.in_channels, *spatial], "features": args.features, "dtype": "fp32",
              "device": "cpu", "threads": torch.get_num_threads(), "fused_backend": "reference",
              "steps": args.steps, "warmup": args.warmup, "load_average": _load_average()}
    payload = {"kind": "cpu_memory", "environment": environment(), "config": config, "result": result}
    path = _out_path(args, "cpu_memory")
    _write(path, payload)
    print(f"saved for backward: fused {saved['reference'] / 2**20:,.1f} MiB / plain {saved['plain'] / 2**20:,.1f} MiB"
          f" = {result['saved_bytes_ratio']:.3f} (target <= {SAVED_BYTES_TARGET})")
    print(f"peak of a forward + backward (allocations tracked op by op): fused {peak['reference'] / 2**20:,.1f} MiB / "
          f"plain {peak['plain'] / 2**20:,.1f} MiB = {result['peak_bytes_ratio']:.3f}; under bf16 autocast: fused "
          f"{peak_bf16['reference'] / 2**20:,.1f} MiB / plain {peak_bf16['plain'] / 2**20:,.1f} MiB = "
          f"{result['peak_bytes_ratio_bf16']:.3f}")
    print(f"training step (CPU, fp32, median CPU time of {args.steps}): fused {cpu_ms['reference']:,.0f} ms / plain "
          f"{cpu_ms['plain']:,.0f} ms = {result['step_time_ratio']:.3f} (target <= {STEP_TIME_TARGET}); wall-clock "
          f"ratio {result['wall_ratio_median']:.3f} (medians), {result['wall_ratio_fastest']:.3f} (fastest steps)")
    print(f"wrote {path}")
    return payload


def _load_average():
    try:
        return list(os.getloadavg())  # other load on the machine, for reading the times
    except OSError:
        return None


def _write(path, payload):
    # atomically: the file is rewritten after every figure, and a run stopped mid-write (Ctrl-C, a timeout) must keep
    # the figures measured before it, not a truncated JSON
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2) + "\n"))


def _chart(payload, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["results"]
    names = [r["variant"] for r in rows]
    panels = [("voxels/s (millions)", [r["voxels_per_s"] / 1e6 for r in rows]),
              ("peak memory (GiB)", [(r["peak_bytes"] or 0) / 2**30 for r in rows])]
    if any(r.get("max_cubic_edge") for r in rows):
        panels.append((f"largest cube in {payload['config']['memory_budget']:g} GiB (edge)",
                       [r.get("max_cubic_edge") or 0 for r in rows]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (title, values) in zip(axes, panels):
        ax.bar(names, values, color=["#888888" if n.startswith("plain") else "#3070b0" for n in names])
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    c = payload["config"]
    fig.suptitle(f"Seg3DNet training, {payload['environment']['device']}, input {c['batch']}x{c['in_channels']}x"
                 f"{'x'.join(map(str, c['input_size']))}, {c['dtype']}", fontsize=10)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def main(args) -> int:
    from .cli import UsageError

    if len(args.features) < 2:
        raise UsageError(f"--features needs one value per level, at least 2 (e.g. 8 16 32 64), got "
                         f"{' '.join(map(str, args.features))}")
    if args.device == "auto":
        args.device = None
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available here")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.saved_bytes:
        if args.variants or args.dtype != "fp32":  # (said, not ignored)
            raise UsageError("--saved-bytes compares plain and reference in fp32: --variants and --dtype do not apply")
        run_saved_bytes(args)
    else:
        run_profile(args)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m seg3d_fast.profile", description=__doc__.splitlines()[0])
    add_arguments(p)
    raise SystemExit(main(p.parse_args()))
