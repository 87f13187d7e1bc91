"""The suite's own arithmetic and bookkeeping (plain tests: `pytest benchmarks` runs them; --benchmark-only skips
them): minimal FLOPs and bytes, floors, speed-ups, layer enumeration, the report."""
import json
import os

import pytest
import torch

import harness
import report
import shapes
from ceilings import floor_ms


def test_conv_case_cost_by_hand():
    # 2 x 3 -> 4 channels, 3x3x3, stride 2 over 5x6x7: output 3x3x4 = 36 voxels per sample, M = 72, K = 81
    c = shapes.ConvCase(n=2, c_in=3, c_out=4, spatial=(5, 6, 7), k=3, stride=2, residual=True, residual_first=False,
                        prelu=True)
    assert c.out_spatial == (3, 3, 4)
    assert c.flops("forward") == 2 * 72 * 4 * 81
    assert c.flops("both") == 3 * c.flops("forward")
    x, y, w = 2 * 3 * 210, 2 * 4 * 36, 4 * 81
    assert c.min_bytes("forward", 2) == 2 * (x + w + y + y)
    assert c.min_bytes("backward", 4) == 4 * (y + x + y + x + 2 * w)
    assert c.name == "c3-4_k3s2_5x6x7_res"


def test_floor_takes_the_larger_bound():
    ceilings = {"bf16_tflops": 800.0, "fp32_tflops": 400.0, "copy_gbps": 3000.0}
    assert floor_ms(8e12, 1, ceilings, torch.bfloat16) == pytest.approx(10.0)  # compute bound: 8 TFLOP / 800 T
    assert floor_ms(8e12, 1, ceilings, torch.float32) == pytest.approx(20.0)
    assert floor_ms(1, 3e9, ceilings, torch.float16) == pytest.approx(1.0)  # memory bound: 3 GB / 3 TB/s


def test_speedup_against_the_faster_layout():
    def rec(backend, ms, dtype="bf16", ms_graph=None):
        return {"op": "conv3d_prelu", "name": "a", "dtype": dtype, "direction": "both", "backend": backend, "ms": ms,
                "ms_graph": ms_graph}

    records = [rec("eager", 4.0, ms_graph=3.0), rec("eager_cl", 2.0, ms_graph=1.5), rec("triton", 1.0, ms_graph=0.5),
               rec("cuda", 0.5, "fp16"), rec("reference", 3.0)]
    harness.fill_speedups(records)
    assert [r["speedup_vs_cudnn"] for r in records] == [0.5, 1.0, 2.0, None, 2 / 3]  # fp16 has no baseline row
    # the graph replays' speed-up against the faster baseline's replay; none where a side was not replayed
    assert [r["speedup_graph_vs_cudnn"] for r in records] == [0.5, 1.0, 3.0, None, None]


def test_network_shapes_deduplicated_with_every_layer_name():
    cases = shapes.network_conv_cases(tiny=True)
    assert len(cases) == len(set(cases))
    names = [n for c in cases for n in c.layers]
    assert len(names) == len(set(names))
    # the base network's two full-resolution 3x3 convs at (2 -> 2) channels differ only by the residual
    full = [c for c in cases if c.spatial == (16, 24, 24) and c.k == 3 and c.stride == 1 and c.c_in == c.c_out]
    assert {c.residual for c in full} == {True, False}
    reps = shapes.representative(cases)
    assert reps and all(r in cases for r in reps) and len(set(reps)) == len(reps)


def test_inputs_layout_and_grad():
    c = shapes.INTERPRETER_CASE
    x, w, b, alpha, res = harness.conv_inputs(c, torch.float32, torch.device("cpu"), channels_last=True)
    assert x.is_contiguous(memory_format=torch.channels_last_3d) and res.shape == (1, 3, 5, 6, 7)
    assert all(t.requires_grad for t in (x, w, b, alpha, res))
    out = harness.conv_eager(x, w, b, alpha, res, c.stride, c.residual_first)
    calls = harness.direction_callables(lambda *t: harness.conv_eager(*t, 1, False),
                                        lambda: harness.conv_inputs(c, torch.float32, torch.device("cpu"), False),
                                        "backward", copies=2)
    grads = calls[1]()
    assert len(calls) == 2 and len(grads) == 5 and out.shape == res.shape


def test_inputs_leave_the_default_generator_alone():
    """Every row's random inputs and output gradients come from the harness's own generator: on a GPU, a CUDA graph
    capture that failed at its end left the default generator unusable for every later row (H200 run 5)."""
    cpu = torch.device("cpu")
    makers = ((shapes.INTERPRETER_CASE, harness.conv_inputs), (shapes.jaccard_case(True), harness.jaccard_inputs),
              (shapes.network_upconv_cases(True)[0], harness.upconv_inputs))  # (the cases build a network: draws)
    before = torch.get_rng_state()
    for case, make in makers:
        first, second = make(case, torch.float32, cpu, False), make(case, torch.float32, cpu, False)
        assert not torch.equal(first[0], second[0])  # fresh inputs per copy all the same
    calls = harness.direction_callables(lambda *t: harness.conv_eager(*t, 1, False),
                                        lambda: harness.conv_inputs(shapes.INTERPRETER_CASE, torch.float32, cpu, False),
                                        "backward", copies=1)
    calls[0]()
    assert torch.equal(torch.get_rng_state(), before)


def test_report_from_a_results_file(tmp_path):
    case = shapes.INTERPRETER_CASE
    ceilings = {"bf16_tflops": 1.0, "fp32_tflops": 1.0, "copy_gbps": 10.0, "fp32_uses_tf32": False}
    records = [harness.record("conv3d_prelu", case, "fp32", b, "both", ms, ms, 1 << 20, ceilings, 4, case.layers,
                              harness.LAYOUT[b], queued, graphed)
               for b, ms, queued, graphed in (("eager", 2.0, 1.9, (1.8, None)), ("eager_cl", 3.0, None, (None, "why")),
                                              ("triton", 1.0, 0.5, (0.25, None)))]
    payload = {"kind": "benchmarks", "environment": {"device": "test card", "torch": "x"}, "ceilings": ceilings,
               "records": harness.fill_speedups(records)}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(payload))
    md_path, png = tmp_path / "r.md", tmp_path / "r.png"
    assert report.main([str(path), "--markdown", str(md_path), "--png", str(png), "--dtype", "fp32"]) == 0
    md = md_path.read_text()
    assert "| c2-3_k3s1_5x6x7_res | fp32 | both |" in md and "2.00×" in md
    assert "1 (q 0.5) (g 0.25) · 2.00×" in md and "(q 1.9)" not in md  # the queue-full time where the host set the pace
    assert "every side replayed from CUDA graphs" in md and "7.20× (n=1)" in md  # 1.8 / 0.25
    assert png.stat().st_size > 0
    text = report.summary(payload, "fp32", "both")
    assert "2.00×" in text and "replayed from CUDA graphs" in text and "7.20× (n=1)" in text


def test_dispatch_table_records_the_kernels_revision(tmp_path, monkeypatch):
    """report.py writes the measured order with the kernels' revision; the dispatcher reads a table of its own
    revision and ignores one measured on other kernels (and report.py drops such entries when merging)."""
    from seg3d_fast import backends

    case = shapes.INTERPRETER_CASE
    ceilings = {"bf16_tflops": 1.0, "fp32_tflops": 1.0, "copy_gbps": 10.0, "fp32_uses_tf32": False}
    records = [harness.record("conv3d_prelu", case, "bf16", b, "forward", ms, ms, 1 << 20, ceilings, 4, case.layers,
                              harness.LAYOUT[b], None)
               for b, ms in (("eager", 2.0), ("triton", 1.0), ("cuda", 3.0))]
    payload = {"environment": {"device": "test card"}, "records": records}
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"kernels_revision": backends.KERNELS_REVISION - 1, "cards": {"old card": {}}}))
    report.write_dispatch_table(payload, path)
    written = json.loads(path.read_text())
    assert written["kernels_revision"] == backends.KERNELS_REVISION and list(written["cards"]) == ["test card"]
    (key, order), = written["cards"]["test card"]["conv3d_prelu"].items()
    assert key.startswith("bfloat16-k3-s1-") and order == ["triton", "reference", "cuda"]

    monkeypatch.setattr(backends, "DISPATCH_TABLE", path)
    monkeypatch.setattr(backends, "_table_cache", None)
    assert backends._dispatch_table() == written["cards"]
    path.write_text(json.dumps(dict(written, kernels_revision=backends.KERNELS_REVISION - 1)))
    monkeypatch.setattr(backends, "_table_cache", None)
    assert backends._dispatch_table() == {}


def test_host_overhead_launch_counts():
    """The host-side structure of the fused ops (kernels stubbed, CPU tensors): one launch per conv forward; per
    backward three on CUDA (dz pass, dgrad, wgrad) and four on Triton (and the split sums, which on CUDA the
    launches make themselves), the Triton stride-2 dgrad's eight parity classes in one launch included; the loss
    in two launches forward (one on the CUDA backend) and one backward."""
    import host_overhead

    rows = {(r["backend"], r["op"], r["case"]): r for r in host_overhead.run(reps=2)["rows"]}
    assert {b for b, _, _ in rows} == {"triton", "triton_tma", "cuda"}
    for (backend, op, case), r in rows.items():
        fused_loss = op == "jaccard_loss" and backend == "triton"  # the sums, then the loss and its label range
        assert r["forward_launches"] == (2 if fused_loss else 1), (backend, case)
        assert r["forward_us"] > 0 and r["backward_us"] > 0
        expected = 1 if op == "jaccard_loss" else (10 if "s2" in case else 3) if backend == "cuda" else 4
        assert r["backward_launches"] == expected, (backend, case, r["backward_launches"])


def test_network_step_tensors_every_layer_on_the_stubbed_backend():
    """The network-memory measure runs every fused layer on the stubbed backend (the CUDA kernels take every
    channel count now, as the Triton ones do; the upsampling blocks of the cuda network run on the reference), and
    the fused step holds fewer tensor bytes than the plain one."""
    import host_overhead

    rows = host_overhead.network_step_tensors(spatial=(16, 16, 16), features=(2, 4))["rows"]
    assert rows["plain_cl"]["backends"] == {}
    for name in ("triton", "cuda"):
        for op, chosen in rows[name]["backends"].items():
            assert set(chosen) == {"reference" if name == "cuda" and op.startswith("upconv") else name}, rows[name]
        assert 0 < rows[name]["vs_plain_cl"] < 1, rows


def test_network_step_host_counts():
    """Host work of a whole Seg3DNet training step under bf16 autocast, counted (kernels stubbed): each fused layer
    is one autograd node (float32 parameters taken as they are: no cast nodes), and the fused steps launch fewer
    kernels and torch ops than the plain channels-last network (as of 2026-11-27: plain 303 launches and 180
    nodes; triton 246 and 79; cuda 282 and 79)."""
    import host_overhead

    rows = host_overhead.network_step_host(reps=1)["rows"]
    plain = rows["plain_cl"]
    for name in ("triton", "cuda"):
        assert rows[name]["autograd_nodes"] <= 80, rows
        assert rows[name]["launches"] < 0.95 * plain["launches"], rows
        assert rows[name]["host_ms"] > 0


def test_triton_tma_variant_switches_the_tma_kernel_on(monkeypatch):
    """triton_tma runs the Triton backend with SEG3D_FAST_TRITON_TMA=1 around each call (bf16, as the suite runs
    its rows), and the environment is restored after it; triton itself takes the gathered loads."""
    from seg3d_fast.backends.triton import conv3d_prelu as conv_mod

    tma_runs = []
    launch = conv_mod._launch_conv_tma

    def recorded(*args, **kwargs):
        tma_runs.append(launch(*args, **kwargs))
        return tma_runs[-1]
    monkeypatch.setattr(conv_mod, "_launch_conv_tma", recorded)
    monkeypatch.delenv("SEG3D_FAST_TRITON_TMA", raising=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    case = shapes.INTERPRETER_TMA_CASE
    for variant, expected in (("triton", [False]), ("triton_tma", [True])):
        tma_runs.clear()
        fn = harness.conv_function(variant, case)
        with harness.variant_env(variant):
            fn(*harness.conv_inputs(case, torch.bfloat16, device, True))
        assert tma_runs == expected, variant
    assert "SEG3D_FAST_TRITON_TMA" not in os.environ


def _torch_calls(fn):
    """The top-level torch calls fn() makes (on the GPU each is a dispatch of several µs, many a launch)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name.startswith("aten::")
            and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]


# (case index in host_overhead.CASES or "loss", most torch calls forward, backward) on the CUDA backend's Python layer
# as of 2026-11-26: the stride-2 backward made 52 before its phase weights became one gather, the loss 11 and 7.
# Since 2026-11-27 the cases' parameters are float32 (as under autocast): each direction casts the weight in the
# copy it made anyway, the backward writes the float32 weight gradient (before, autograd's cast nodes did both,
# outside these counts, with a launch and a node per parameter each way).
CALL_BUDGET = [(0, 6, 16), (2, 6, 17), (3, 5, 13), ("loss", 9, 2)]  # (one call of slack over the counts of torch 2.13)


@pytest.mark.parametrize("case,forward_max,backward_max", CALL_BUDGET, ids=str)
def test_fused_calls_stay_within_their_torch_call_budget(case, forward_max, backward_max):
    """Host work per fused call, counted (not timed): the torch calls of one forward and one backward on the CUDA
    backend's Python layer with its kernels stubbed (benchmarks/host_overhead.py). A change that adds calls to these
    paths shows here before it shows as host time on a GPU."""
    import host_overhead as ho
    import seg3d_fast as sf

    with ho.stubbed_cuda(ho.LaunchCounter()):
        gen = torch.Generator().manual_seed(0)
        if case == "loss":
            logits = torch.randn((2, 5, 6, 7, 5), generator=gen).to(torch.bfloat16).requires_grad_(True)
            labels = torch.randint(0, 5, (2, 6, 7, 5), generator=gen)
            forward = lambda: sf.jaccard_loss(logits, labels, backend="cuda")  # noqa: E731
            leaves = [logits]
        else:
            spec = ho.CASES[case]
            (x, w, b, a, r), leaves = ho.conv_inputs(spec, torch.bfloat16, gen)
            forward = lambda: sf.conv3d_prelu(x, w, b, a, r, stride=spec[4], residual_first=spec[8],  # noqa: E731
                                              backend="cuda")
        out = forward()  # first call: backend choice and plans, cached
        torch.autograd.grad(out, leaves, torch.ones_like(out), retain_graph=True)
        fwd = _torch_calls(forward)
        out = forward()
        grad = torch.ones_like(out)
        bwd = _torch_calls(lambda: torch.autograd.grad(out, leaves, grad))
    assert len(fwd) <= forward_max, fwd
    assert len(bwd) <= backward_max, bwd


def test_profile_report_lists_the_allocations_at_the_peak():
    row = {"variant": "fused", "step_ms": 2.0, "host_ms": 1.0, "steps_per_s": 500.0, "voxels_per_s": 1e6,
           "peak_bytes": 2**30, "speedup_vs_plain": 1.0, "memory_vs_plain": 1.0,
           "peak_allocations": {"peak_bytes": 3 * 2**20,
                                "top": [{"where": "ops.py:10 f", "count": 2, "bytes": 2**21},
                                        {"where": "cuda.py:5 g", "count": 1, "bytes": 2**20}]}}
    payload = {"kind": "profile", "environment": {"device": "test card"}, "results": [row],
               "config": {"batch": 1, "in_channels": 4, "input_size": [8, 8, 8], "features": [2, 4],
                          "dtype": "bf16", "memory_budget": 1}}
    md = report.profile_markdown(payload)
    assert "Allocated at fused's step peak (3 MiB above the step's start" in md
    assert "2.0 MiB ×2 `ops.py:10 f`; 1.0 MiB ×1 `cuda.py:5 g`." in md


def test_upconv_cases_and_their_dispatch_key():
    """The upsampling blocks of the tiny network (one per level above the coarsest), their cost, and the dispatch
    key report.py writes for them (the one ops.py looks up)."""
    cases = shapes.network_upconv_cases(tiny=True)
    # (the 16x20x18 input is padded to a multiple of 8: 16x24x24, so the coarsest level is 2x3x3)
    assert [(c.c_in, c.c_out, c.spatial, c.layers) for c in cases] == [
        (6, 6, (2, 3, 3), ("base.up.2",)), (4, 4, (4, 6, 6), ("base.up.1",)), (2, 2, (8, 12, 12), ("base.up.0",))]
    c = shapes.UpconvCase(n=1, c_in=8, c_out=8, spatial=(2, 3, 4))
    assert c.flops("forward") == 2 * 24 * 8 * 8 * 8 and c.flops("both") == 3 * c.flops("forward")
    assert c.min_bytes("forward", 2) == 2 * (8 * 24 + 8 * 64 + 2 * 8 * 8 * 24)
    ceilings = {"bf16_tflops": 1.0, "fp32_tflops": 1.0, "copy_gbps": 10.0, "fp32_uses_tf32": False}
    records = [harness.record("upconv_prelu_add", c, "bf16", b, "forward", ms, ms, 0, ceilings, 2, c.layers,
                              harness.LAYOUT[b]) for b, ms in (("eager", 2.0), ("triton", 1.0))]
    table = report.dispatch_table({"environment": {"device": "card"}, "records": records})
    assert table == {"card": {"upconv_prelu_add": {"bfloat16-ci8-co8": ["triton", "reference"]}}}


def test_peak_bytes_measures_a_warm_call(monkeypatch):
    """The peak of a row is that of a warm call: the first call's one-time allocations (Triton's autotuner times
    its configs with a 256 MiB cache-flush buffer) are not the op's memory. (The GPU's allocator counters faked.)"""
    mem = {"allocated": 100, "peak": 100}
    calls = []

    def call():
        first = not calls
        calls.append(1)
        mem["peak"] = max(mem["peak"], mem["allocated"] + (256 << 20 if first else 0) + 10)
        return object()

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: mem.update(peak=mem["allocated"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: mem["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: mem["peak"])
    assert harness.peak_bytes(call, torch.device("cuda")) == 10


def test_conv_case_backward_bytes_residual_first_by_hand():
    """Residual summed before the PReLU: its gradient is dz = grad_out * prelu'(z), a tensor of the output's size
    that the backward must write (after the PReLU, or with no activation, the residual's gradient is grad_out)."""
    kw = dict(n=1, c_in=2, c_out=3, spatial=(4, 4, 4), k=3, stride=1, residual=True, prelu=True)
    x, y, w = 2 * 64, 3 * 64, 3 * 2 * 27
    first = shapes.ConvCase(residual_first=True, **kw)
    after = shapes.ConvCase(residual_first=False, **kw)
    # grad_out + x + saved activation + grad_x + weight + grad_weight (+ dz, the residual's gradient)
    assert after.min_bytes("backward", 2) == 2 * (y + x + y + x + 2 * w)
    assert first.min_bytes("backward", 2) == 2 * (y + x + y + x + 2 * w + y)
    assert first.min_bytes("forward", 2) == after.min_bytes("forward", 2) == 2 * (x + w + y + y)
    assert first.min_bytes("both", 2) == first.min_bytes("forward", 2) + first.min_bytes("backward", 2)
    noact = shapes.ConvCase(residual_first=True, **dict(kw, prelu=False))
    assert noact.min_bytes("backward", 2) == 2 * (y + x + x + 2 * w)


def test_dispatch_table_ranks_backends_on_the_rows_they_share():
    """Two shapes sharing a dispatch key (same channels, kernel, stride): a backend missing from one of them (it
    could not run it, ran out of memory, or the time limit came) is not ranked first for the time it did not spend.
    triton (0.9 of cuDNN on the small shape, not run on the large) against cuda (0.8 of cuDNN on both)."""
    ceilings = {"bf16_tflops": 1.0, "fp32_tflops": 1.0, "copy_gbps": 10.0, "fp32_uses_tf32": False}
    small = shapes.ConvCase(n=1, c_in=8, c_out=8, spatial=(4, 4, 4), k=3, stride=1, residual=False,
                            residual_first=False, prelu=True)
    large = shapes.ConvCase(**{**small.__dict__, "spatial": (8, 8, 8), "residual": True})
    measured = [(small, "eager_cl", 1.0), (small, "triton", 0.9), (small, "cuda", 0.8),
                (large, "eager_cl", 10.0), (large, "cuda", 8.0)]
    records = [harness.record("conv3d_prelu", c, "bf16", b, "forward", ms, ms, 0, ceilings, 2, (), harness.LAYOUT[b])
               for c, b, ms in measured]
    table = report.dispatch_table({"environment": {"device": "card"}, "records": records})
    assert table == {"card": {"conv3d_prelu": {"bfloat16-k3-s1-ci8-co8": ["cuda", "triton", "reference"]}}}


def test_geometric_means_compare_backends_on_the_same_shapes():
    """A backend measured on some shapes only (triton_tma: representative layers; a row cut by the time limit) has a
    geometric mean over other shapes than the rest: the report also gives every backend's mean on exactly those
    shapes. Here cuda is faster than triton_tma on the shapes both ran, though its all-shape mean is lower."""
    def rec(name, backend, speedup):
        return {"op": "conv3d_prelu", "name": name, "dtype": "bf16", "direction": "both", "backend": backend,
                "speedup_vs_cudnn": speedup}

    records = [rec("a", "triton", 1.0), rec("b", "triton", 1.0), rec("c", "triton", 0.25),
               rec("a", "cuda", 2.0), rec("b", "cuda", 2.0), rec("c", "cuda", 0.125),
               rec("a", "triton_tma", 1.5), rec("b", "triton_tma", 1.5)]
    lines = report._gmean_table(records)
    assert "| conv3d_prelu | bf16 | both | 0.63× (n=3) | 1.50× (n=2) | 0.79× (n=3) |" in lines
    assert "- conv3d_prelu bf16 both, on the 2 shapes triton_tma measured: triton 1.00×, triton_tma 1.50×, " \
           "cuda 2.00×" in lines
    payload = {"kind": "benchmarks", "environment": {"device": "card"}, "records": [
        dict(r, ms=1.0, fraction_of_floor=None) for r in records]}
    assert "on the 2 shapes triton_tma measured: triton 1.00×, triton_tma 1.50×, cuda 2.00×" in report.summary(payload)


def test_pipeline_memory_every_step_runs():
    """benchmarks/pipeline_memory.py at a tiny scale: every step runs in its own process on its synthetic data and
    reports its figures (the training cases' labels kept as uint8)."""
    pytest.importorskip("nibabel")
    import pipeline_memory

    result = pipeline_memory.run(scale=0.05)
    rows = {r["step"]: r for r in result["rows"]}
    assert set(rows) == set(pipeline_memory.STEPS)
    assert all(r["peak_mib"] >= r["baseline_mib"] > 0 and r["seconds"] >= 0 for r in rows.values())
    assert 0 < rows["evaluate"]["mean_dice"] < 1  # (10% of the predicted voxels relabelled)
    assert rows["prepare_memory"]["label_dtype"] == rows["prepare_cache"]["label_dtype"] == "uint8"
    assert pipeline_memory.table(result).count("\n") == len(rows) + 1
