"""How one benchmark row is run: the variants side by side, the inputs, the timing, the record.

Variants ("backend" in the results):
  eager      plain PyTorch, separate ops (F.conv3d -> F.prelu -> +, autograd saves what eager saves), NCDHW:
             cuDNN on a GPU. The baseline.
  eager_cl   the same in channels_last_3d (torch 2.9 routes fp16/bf16 NCDHW 3D convs around cuDNN; channels-last
             stays on it). speedup_vs_cudnn is measured against the faster of eager and eager_cl.
  compile    torch.compile of the eager function (Inductor: cuDNN conv + a generated pointwise epilogue).
  reference  seg3d_fast's reference backend (cuDNN conv, the fused op's memory contract); opt-in.
  triton     seg3d_fast's Triton kernels, channels_last_3d inputs (the layout the implicit GEMM reads).
  triton_tma the same with the opt-in TMA conv kernel switched on (SEG3D_FAST_TRITON_TMA=1 around every timed
             call; it runs stride-1 convs and stride-2 dgrads), side by side with the gathered-load kernel.
  cuda       seg3d_fast's CUDA C++ kernels, channels_last_3d inputs.
Directions: forward (training forward: inputs require grad, the graph is built), backward (autograd.grad of a
retained graph), both (forward + backward).
GPU time: CUDA events around each call, median over reps; inputs rotated among several copies when one set fits
in L2, so that each call reads from device memory. Also per row: the median of synchronized calls (ms_host) and the
device time with the launch queue kept full (ms_queued: the kernels' own pace where the host is slower than them), and
the device time of the calls replayed from one CUDA graph (ms_graph: no host work and no synchronization inside a
call, for the baselines as for the fused ops, whose checks seg3d_fast.graphs records and verifies after the replays;
a fused forward + backward otherwise waits in its backward for the alpha check its forward copied).
CPU time: pytest-benchmark's median wall time.
"""
import contextlib
import math
import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from seg3d_fast.profile import VARIANT_ENV, env_vars, variant_backend

BASELINES = ("eager", "eager_cl")
FUSED = ("reference", "triton", "cuda")
LAYOUT = {"eager": "ncdhw", "eager_cl": "ndhwc", "compile": "ncdhw", "reference": "ncdhw", "triton": "ndhwc",
          "triton_tma": "ndhwc", "cuda": "ndhwc"}


def variant_env(variant):
    """The variant's environment (VARIANT_ENV, set around every call of it) for the duration of a call."""
    return env_vars(VARIANT_ENV.get(variant, {}))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Unsupported(Exception):
    """This variant cannot run this input here (the message says why): the row is skipped."""


# ---------------------------------------------------------------------------------------------------------------------
# the functions being timed
def conv_eager(x, weight, bias, alpha, residual, stride, residual_first):
    """The op in plain PyTorch, separate ops: what the plain network runs."""
    z = F.conv3d(x, weight, bias, stride=stride, padding=weight.shape[-1] // 2)
    if residual is not None and residual_first:
        z = z + residual
    y = z if alpha is None else F.prelu(z, alpha)
    return y + residual if residual is not None and not residual_first else y


_compiled_for = {"key": None, "fn": None}


def _compiled(fn, key):
    """torch.compile(fn), compiled afresh for each new shape (the directions and rounds of one shape share it):
    dynamo's per-function recompile limit would otherwise make later shapes fall back to eager silently."""
    if _compiled_for["key"] != key:
        torch._dynamo.reset()
        _compiled_for.update(key=key, fn=torch.compile(fn, dynamic=False))
    return _compiled_for["fn"]


def conv_function(variant, case):
    """callable(x, weight, bias, alpha, residual) for `variant`; raises Unsupported where it cannot run."""
    s, rf = case.stride, case.residual_first
    if variant in BASELINES:
        return lambda *t: conv_eager(*t, s, rf)
    if variant == "compile":
        fn = _compiled(conv_eager, case)
        return lambda *t: fn(*t, s, rf)
    if variant in FUSED or variant in VARIANT_ENV:
        import seg3d_fast as sf
        from seg3d_fast.backends import BackendUnsupported

        backend = variant_backend(variant)

        def fused(*t):
            try:
                return sf.conv3d_prelu(*t, stride=s, residual_first=rf, backend=backend)
            except BackendUnsupported as e:
                raise Unsupported(str(e)) from e
        return fused
    raise ValueError(f"unknown variant {variant!r}")


def jaccard_function(variant, case):
    """callable(logits, labels) -> scalar loss."""
    from seg3d_fast.profile import plain_jaccard_loss

    if variant in BASELINES:
        return plain_jaccard_loss
    if variant == "compile":
        return _compiled(plain_jaccard_loss, case)
    if variant in VARIANT_ENV:
        raise Unsupported(f"{variant} is a conv variant")
    if variant in FUSED:
        import seg3d_fast as sf
        from seg3d_fast.backends import BackendUnsupported

        def fused(logits, labels):
            try:
                return sf.jaccard_loss(logits, labels, backend=variant)
            except BackendUnsupported as e:
                raise Unsupported(str(e)) from e
        return fused
    raise ValueError(f"unknown variant {variant!r}")


def upconv_eager(x, weight, bias, alpha, skip):
    """The upsampling block in plain PyTorch: cuDNN's transposed conv, PReLU and the skip sum as separate ops."""
    return F.prelu(F.conv_transpose3d(x, weight, bias, stride=2), alpha) + skip


def upconv_function(variant, case):
    if variant in BASELINES:
        return upconv_eager
    if variant in FUSED:
        import seg3d_fast as sf
        from seg3d_fast.backends import BackendUnsupported

        def fused(*t):
            try:
                return sf.upconv_prelu_add(*t, backend=variant)
            except BackendUnsupported as e:
                raise Unsupported(str(e)) from e
        return fused
    raise Unsupported(f"{variant} has no upsampling variant")


# ---------------------------------------------------------------------------------------------------------------------
# inputs
_generators = {}


def _gen(device):
    """The inputs' own random generator (one per device, seeded once). Not the default one: a CUDA graph capture
    that fails at its end leaves the default CUDA generator mid-capture, after which every draw from it raised
    ("Offset increment outside graph capture"; H200 run 5 lost 481 of 485 rows so)."""
    device = torch.device(device)
    if device not in _generators:
        _generators[device] = torch.Generator(device).manual_seed(0)
    return _generators[device]


def _rand(shape, dtype, device, channels_last, grad=True):
    t = torch.randn(shape, device=device, dtype=torch.float32, generator=_gen(device)).to(dtype)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last_3d)
    return t.requires_grad_(grad)


def _uniform(shape, device):
    return torch.rand(shape, device=device, generator=_gen(device))


def conv_inputs(case, dtype, device, channels_last):
    """(x, weight, bias, alpha, residual): fresh random, every one requiring grad; weights scaled like the
    network's init so that activations stay O(1) in half precision."""
    x = _rand((case.n, case.c_in, *case.spatial), dtype, device, channels_last)
    bound = 1 / math.sqrt(case.c_in * case.k**3)
    weight = (_uniform((case.c_out, case.c_in) + (case.k,) * 3, device) * 2 - 1).mul_(bound)
    weight = weight.to(dtype)
    if channels_last:
        weight = weight.contiguous(memory_format=torch.channels_last_3d)
    bias = (_uniform(case.c_out, device) * 2 - 1).mul_(bound).to(dtype)
    alpha = (0.1 + 0.3 * _uniform(case.c_out, device)).to(dtype) if case.prelu else None
    residual = _rand((case.n, case.c_out, *case.out_spatial), dtype, device, channels_last) if case.residual else None
    for t in (weight, bias, alpha):
        if t is not None:
            t.requires_grad_(True)
    return x, weight, bias, alpha, residual


def upconv_inputs(case, dtype, device, channels_last):
    x = _rand((case.n, case.c_in, *case.spatial), dtype, device, channels_last)
    bound = 1 / math.sqrt(case.c_out * 8)
    weight = ((_uniform((case.c_in, case.c_out, 2, 2, 2), device) * 2 - 1) * bound).to(dtype)
    bias = ((_uniform(case.c_out, device) * 2 - 1) * bound).to(dtype)
    alpha = (0.1 + 0.3 * _uniform(case.c_out, device)).to(dtype)
    skip = _rand((case.n, case.c_out, *(2 * s for s in case.spatial)), dtype, device, channels_last)
    for t in (weight, bias, alpha):
        t.requires_grad_(True)
    return x, weight, bias, alpha, skip


def jaccard_inputs(case, dtype, device, channels_last):
    logits = _rand((case.n, case.classes, *case.spatial), dtype, device, channels_last)
    labels = torch.randint(0, case.classes, (case.n, *case.spatial), device=device, generator=_gen(device))
    return logits, labels


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def direction_callables(fn, make_inputs, direction, copies):
    """One callable per input copy doing `direction`'s work. backward: the graph is built once per copy and
    kept (retain_graph), each call runs autograd.grad on it."""
    calls = []
    for _ in range(copies):
        inputs = make_inputs()
        leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        if direction == "forward":
            calls.append(lambda inputs=inputs: fn(*inputs))
            continue
        out = fn(*inputs)
        grad = torch.randn(out.shape, dtype=out.dtype, device=out.device, generator=_gen(out.device))
        if direction == "backward":
            calls.append(lambda out=out, grad=grad, leaves=leaves:
                         torch.autograd.grad(out, leaves, grad, retain_graph=True))
        else:
            del out
            calls.append(lambda inputs=inputs, grad=grad, leaves=leaves:
                         torch.autograd.grad(fn(*inputs), leaves, grad))
    return calls


def _with_env(variant, call):
    with variant_env(variant):
        return call()


def copies_for(make_inputs, device):
    """How many input sets to rotate among so that the rotation outgrows the L2 cache (3x; at most 64)."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    probe = make_inputs()
    # inputs + output + gradients: about 3x the input bytes in flight per call
    one = 3 * _nbytes(probe)
    del probe
    return 1 if one >= 3 * l2 else min(64, math.ceil(3 * l2 / max(one, 1)))


# ---------------------------------------------------------------------------------------------------------------------
# timing and memory
def gpu_median_ms(calls, budget_ms, min_reps=10, max_reps=500):
    """Median of CUDA-event times over reps (each rep one call, inputs rotated)."""
    for c in calls:  # warm-up: JIT, autotuning, cuDNN algorithm choice
        c()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(3):
        calls[i % len(calls)]()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) / 3 * 1e3
    return _timed_median_ms(calls, int(min(max_reps, max(min_reps, budget_ms / max(est, 1e-3)))))


def _timed_median_ms(calls, reps, hold_ms=0.0):
    """Median of CUDA-event times of `reps` calls (inputs rotated); hold_ms: a sleep kernel first holds the stream
    that long, so the calls are all enqueued before the first one runs."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    if hold_ms:
        torch.cuda.synchronize()
        torch.cuda._sleep(int(_sleep_cycles_per_ms() * hold_ms))
    for i, (start, end) in enumerate(events):
        start.record()
        calls[i % len(calls)]()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


_SLEEP_CYCLES_PER_MS = []


def _sleep_cycles_per_ms():
    """Clock cycles of torch.cuda._sleep per millisecond on this card (measured once)."""
    if not _SLEEP_CYCLES_PER_MS:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1000)  # warm-up
        start.record()
        torch.cuda._sleep(10_000_000)
        end.record()
        torch.cuda.synchronize()
        _SLEEP_CYCLES_PER_MS.append(10_000_000 / max(start.elapsed_time(end), 1e-3))
    return _SLEEP_CYCLES_PER_MS[0]


def queued_median_ms(calls, ms_host, budget_ms=50.0, max_reps=20):
    """Median device time of a call with the launch queue kept full: a sleep kernel holds the stream while the host
    enqueues the calls, so each call's kernels start when the previous call's end rather than when the host gets to
    them; CUDA events around each. Where it is well under gpu_median_ms, the row runs at the host's pace (a call's
    host work takes longer than its kernels); the two agree where the kernels set the pace. A call that waits on the
    GPU inside (e.g. reading a value the forward copied) drains the queue, and then measures as before."""
    reps = int(max(3, min(max_reps, budget_ms / max(ms_host, 1e-3))))
    return _timed_median_ms(calls, reps, hold_ms=2 * reps * ms_host + 5)  # outlasts the host's enqueueing


def peak_bytes(call, device):
    """GPU memory one call needs above what was allocated before it (its outputs, saved tensors and workspaces
    included); None on the CPU. Measured on a warm call, as every side is timed: the first call of a shape does
    one-time work whose memory a training step never sees again (Triton's autotuner times each tile config with
    a 256 MiB cache-flush buffer; cuDNN's algorithm search its trial workspaces)."""
    if device.type != "cuda":
        return None
    result = call()  # warm-up (its outputs freed before the measured call)
    del result
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak


def graph_median_ms(calls, reps=10):
    """Device ms of one call, the calls (already warm) captured once as one CUDA graph and replayed: median over
    `reps` replays / the number of calls. -> (ms, None) or (None, why it could not be captured)."""
    from seg3d_fast import graphs

    graph = torch.cuda.CUDAGraph()
    try:
        with graphs.recording_checks() as checks:
            # captured on the row's stream (run_row): a backward row's ops run on its forward's stream
            with torch.cuda.graph(graph, stream=torch.cuda.current_stream()):
                for call in calls:
                    call()
                checks.pack()
    except RuntimeError as e:
        torch.cuda.synchronize()
        return None, f"{type(e).__name__}: {str(e).splitlines()[0]}"
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    checks.verify()  # the inputs are the benchmark's own: a failure here is a bug, not a skipped row
    return statistics.median(s.elapsed_time(e) for s, e in events) / len(calls), None


def measure(benchmark, calls, device, rounds, budget_ms):
    """-> (ms, ms_host, ms_queued, (ms_graph, why none)): device median of back-to-back calls (GPU),
    pytest-benchmark's median of synchronized calls (host), device median with the launch queue full (GPU;
    queued_median_ms), device time replayed from a CUDA graph (GPU; graph_median_ms)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    state = {"i": 0}

    def synchronized_call():
        calls[state["i"] % len(calls)]()
        state["i"] += 1
        sync()

    ms = gpu_median_ms(calls, budget_ms) if device.type == "cuda" else None
    benchmark.pedantic(synchronized_call, rounds=rounds, iterations=1, warmup_rounds=1 if rounds > 1 else 0)
    stats = getattr(benchmark, "stats", None)
    ms_host = stats.stats.median * 1e3 if stats is not None else None
    ms_queued = queued_median_ms(calls, ms_host or ms) if device.type == "cuda" else None
    graphed = graph_median_ms(calls) if device.type == "cuda" else (None, "no GPU")
    return (ms if ms is not None else ms_host), ms_host, ms_queued, graphed


# ---------------------------------------------------------------------------------------------------------------------
# records
def record(op, case, dtype_name, variant, direction, ms, ms_host, peak, ceilings, itemsize, layer_names, layout,
           ms_queued=None, graphed=(None, None)):
    from ceilings import floor_ms

    flops = case.flops(direction)
    nbytes = case.min_bytes(direction, itemsize)
    rec = {"op": op, "name": case.name, "shape": case.shape(), "layers": list(layer_names), "dtype": dtype_name,
           "backend": variant, "layout": layout, "direction": direction, "ms": ms,
           "ms_host": ms_host, "ms_queued": ms_queued, "ms_graph": graphed[0], "ms_graph_none": graphed[1],
           "peak_bytes": peak, "flops": flops, "bytes": nbytes,
           "tflops": None, "gbps": None, "floor_ms": None, "fraction_of_floor": None, "speedup_vs_cudnn": None,
           "speedup_graph_vs_cudnn": None}
    if ms:
        rec["tflops"] = flops / (ms * 1e-3) / 1e12
        rec["gbps"] = nbytes / (ms * 1e-3) / 1e9
    if ms and ceilings:
        rec["floor_ms"] = floor_ms(flops, nbytes, ceilings, DTYPES[dtype_name])
        rec["fraction_of_floor"] = rec["floor_ms"] / ms
    return rec


def row_key(rec):
    return rec["op"], rec["name"], rec["dtype"], rec["direction"]


def fill_speedups(records):
    """speedup_vs_cudnn = (faster of the eager baselines) / ms, for every record whose row has a baseline;
    speedup_graph_vs_cudnn the same of ms_graph (both sides replayed from CUDA graphs)."""
    for field, speedup in (("ms", "speedup_vs_cudnn"), ("ms_graph", "speedup_graph_vs_cudnn")):
        best = {}
        for r in records:
            if r["backend"] in BASELINES and r.get(field):
                k = row_key(r)
                best[k] = min(best.get(k, math.inf), r[field])
        for r in records:
            base = best.get(row_key(r))
            r[speedup] = base / r[field] if base and r.get(field) else None
    return records


# ---------------------------------------------------------------------------------------------------------------------
# one row, start to end
_row_streams = {}


def _row_stream(device):
    """Where a GPU row runs, from building its inputs to its CUDA graph's capture: one side stream. Autograd runs
    each backward op on the stream its forward op ran on, so a backward row's retained forward must be built on the
    stream that the graph captures; built on the default stream, every backward row's capture failed (H200 run 5)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    if device not in _row_streams:
        _row_streams[device] = torch.cuda.Stream(device)
    return torch.cuda.stream(_row_streams[device])


def run_row(benchmark, op, case, dtype_name, direction, variant, device, ceilings, results):
    """Measure one (op, shape, dtype, direction, backend) row, attach its figures to the pytest-benchmark row and
    append the record to the results file. Skips (with the reason) where the variant cannot run the input."""
    if time.time() > float(os.environ.get("SEG3D_BENCH_DEADLINE", "inf")):
        pytest.skip("time budget spent (SEG3D_BENCH_DEADLINE)")
    dtype = DTYPES[dtype_name]
    channels_last = op != "jaccard_loss" and LAYOUT[variant] == "ndhwc"  # the loss: NCDHW logits for all
    if op == "conv3d_prelu":
        fn = conv_function(variant, case)
        make = lambda: conv_inputs(case, dtype, device, channels_last)  # noqa: E731
    elif op == "upconv_prelu_add":
        fn = upconv_function(variant, case)
        make = lambda: upconv_inputs(case, dtype, device, channels_last)  # noqa: E731
    else:
        fn = jaccard_function(variant, case)
        make = lambda: jaccard_inputs(case, dtype, device, channels_last)  # noqa: E731
    benchmark.group = f"{op} {case.name} {dtype_name} {direction}"
    # fp32 rows: TF32 tensor cores in every backend, as cuDNN's convs use by default (the Triton backend follows
    # the matmul flag, the CUDA one the cuDNN flag: backends/API.md); restored after the row.
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    try:
        with _row_stream(device), variant_env(variant):  # the graph of a backward row is built here
            calls = direction_callables(fn, make, direction, copies_for(make, device))
        if variant in VARIANT_ENV:
            calls = [lambda call=call: _with_env(variant, call) for call in calls]
        with _row_stream(device):
            peak = peak_bytes(calls[0], device)
            rounds = 5 if device.type == "cuda" else (1 if variant.startswith("triton") else 3)  # CPU: interpreter
            budget_ms = float(os.environ.get("SEG3D_BENCH_REP_MS", "30"))
            ms, ms_host, ms_queued, graphed = measure(benchmark, calls, device, rounds, budget_ms)
    except Unsupported as e:
        pytest.skip(f"{variant}: {e}")
    except torch.cuda.OutOfMemoryError as e:
        pytest.skip(f"{variant}: out of GPU memory ({e})")
    finally:
        calls = None
        torch.backends.cuda.matmul.allow_tf32 = tf32
        if device.type == "cuda":
            torch.cuda.empty_cache()
    itemsize = torch.empty((), dtype=dtype).element_size()
    rec = record(op, case, dtype_name, variant, direction, ms, ms_host, peak, ceilings, itemsize,
                 getattr(case, "layers", ()), "ndhwc" if channels_last else "ncdhw", ms_queued, graphed)
    results.add(rec)
    benchmark.extra_info.update({k: rec[k] for k in ("ms", "ms_graph", "tflops", "gbps", "floor_ms",
                                                     "fraction_of_floor", "peak_bytes", "speedup_vs_cudnn",
                                                     "speedup_graph_vs_cudnn", "layout")})
    return rec
