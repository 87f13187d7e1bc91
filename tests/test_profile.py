"""seg3d_fast.profile: saved-for-backward byte counting, the plain loss baseline, and the profile command on a tiny CPU
case (the GPU paths run in benchmarks/gpu_check.sh)."""
import argparse
import json

import pytest
import torch
from torch import nn

import seg3d_fast as sf
from seg3d_fast import jaccard_loss, profile
from seg3d_fast.models import Seg3DNet
from helpers import assert_close

TINY_FEATURES = [2, 4, 6, 8]


class ScaleExpSin(nn.Module):
    """x * w -> exp -> sin of a slice: what autograd saves is known by hand (see the test)."""

    def __init__(self, shape):
        super().__init__()
        self.w = nn.Parameter(torch.randn(shape))

    def forward(self, x):
        z = (x * self.w).exp()
        return z[:, :2].sin()


def test_saved_tensor_bytes_by_hand():
    m = ScaleExpSin((3, 5))
    x = torch.randn(3, 5)  # float32: 60 bytes per (3, 5) tensor
    # mul saves x (for w's gradient; w itself is a parameter, left out); exp saves its result z; sin saves a view
    # of z, whose storage is z's and counts once.
    assert profile.saved_tensor_bytes(m, x) == 60 + 60
    x.requires_grad_(True)  # now mul also saves w, a parameter storage: counted only when asked for
    assert profile.saved_tensor_bytes(m, x) == 60 + 60
    assert profile.saved_tensor_bytes(m, x, include_parameters=True) == 60 + 60 + 60
    m.double()
    assert profile.saved_tensor_bytes(m, x.double()) == 120 + 120


def test_saved_tensor_bytes_fused_network_saves_less():
    # Fused blocks keep one activation each, plain ones two (conv output and PReLU output): about half.
    # Measured: 0.586 for these tiny features (0.530 for the paper's 8/16/32/64); the bound leaves room.
    x = torch.randn(2, 4, 8, 16, 24)
    fused = profile.saved_tensor_bytes(Seg3DNet(features=TINY_FEATURES, fused=True), x)
    plain = profile.saved_tensor_bytes(Seg3DNet(features=TINY_FEATURES, fused=False), x)
    assert 0 < fused < 0.65 * plain, (fused, plain)


def test_plain_jaccard_loss_is_the_fused_loss():
    logits = torch.randn(2, 5, 3, 6, 7)
    labels = torch.randint(0, 5, (2, 3, 6, 7))
    expected = jaccard_loss(logits.double(), labels, backend="reference")
    assert_close(profile.plain_jaccard_loss(logits, labels), expected, None, torch.float32, "plain jaccard")


def _args(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    profile.add_arguments(parser)
    return parser.parse_args(["--input-size", "8", "16", "12", "--features", *map(str, TINY_FEATURES), "--steps", "2",
                              "--warmup", "1", "--max-edge", "96", "--out", str(tmp_path / "p.json"), "--device", "cpu",
                              *extra])


def test_profile_main_tiny_cpu(tmp_path):
    args = _args(tmp_path, "--batch", "2", "--memory-budget", "0.25", "--trace", str(tmp_path / "trace"))
    assert profile.main(args) == 0
    payload = json.loads((tmp_path / "p.json").read_text())
    assert (tmp_path / "p.png").stat().st_size > 0
    assert {"torch", "device", "date"} <= payload["environment"].keys()
    rows = {r["variant"]: r for r in payload["results"]}
    assert set(rows) == {"plain", "reference"}
    for name, r in rows.items():
        assert r["steps_per_s"] > 0 and len(r["step_ms_all"]) == 2
        assert r["voxels_per_s"] == pytest.approx(r["steps_per_s"] * 2 * 8 * 16 * 12)
        assert r["peak_bytes"] > 0 and "estimate" in r["memory_method"]
        assert r["step_tensor_peak_bytes"] > 0
        assert 0 < r["host_ms"] <= max(r["step_ms_all"]) and r["gpu_busy_ms"] is None  # (no GPU)
        edge = r["max_cubic_edge"]
        assert edge is not None and edge % 16 == 0 and 16 <= edge <= 96
        assert (tmp_path / "trace" / f"trace_{name}.json").stat().st_size > 0
        assert "Self CPU" in (tmp_path / "trace" / f"host_{name}.txt").read_text()
    assert rows["reference"]["memory_vs_plain"] < 1  # fewer saved bytes, same parameters
    assert rows["reference"]["step_tensor_peak_bytes"] < rows["plain"]["step_tensor_peak_bytes"]
    # which backends the fused layers ran on: every conv shape and the loss, both directions, and the upsampling
    # blocks (their backward on the forward's backend), on "reference"
    chosen = rows["reference"]["backends"]
    assert set(chosen) == {"conv3d_prelu/forward", "conv3d_prelu/backward", "jaccard/forward", "jaccard/backward",
                           "upconv_prelu_add/forward"}
    assert all(set(c) == {"reference"} for c in chosen.values()) and chosen["conv3d_prelu/forward"]["reference"] > 3
    assert rows["plain"]["backends"] == {}  # the plain network calls no fused op
    assert rows["reference"]["max_cubic_edge"] >= rows["plain"]["max_cubic_edge"]


def test_profile_graph_variants_on_the_cpu_are_a_one_line_error(tmp_path, capsys):
    """(It was a ValueError traceback from inside the run, after the variants before it had run.)"""
    from seg3d_fast.cli import main

    rc = main(["profile", "--input-size", "8", "8", "8", "--features", "2", "4", "--device", "cpu", "--steps", "1",
               "--memory-budget", "0", "--out", str(tmp_path / "p.json"), "--variants", "plain", "fused_graph"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("seg3d-fast: error: variants fused_graph replay CUDA graphs") and \
        "Traceback" not in err, err
    assert not (tmp_path / "p.json").exists()
    if sf.backends.unavailable_reason("cuda") is not None:  # a variant whose backend cannot run here: the same
        rc = main(["profile", "--input-size", "8", "8", "8", "--features", "2", "4", "--device", "cpu", "--steps", "1",
                   "--memory-budget", "0", "--out", str(tmp_path / "p.json"), "--variants", "plain", "cuda"])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("seg3d-fast: error: variant cuda: backend cuda cannot run here"), err
        assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("bad, named", [
    (["--input-size", "0", "8", "8"], "argument --input-size"), (["--batch", "0"], "argument --batch"),
    (["--steps", "0"], "argument --steps"), (["--features", "0", "4"], "argument --features"),
    (["--features", "4"], "--features needs one value per level"), (["--classes", "1"], "argument --classes"),
    (["--threads", "-1"], "argument --threads"), (["--memory-budget", "nan"], "argument --memory-budget"),
    (["--time-limit", "-1"], "argument --time-limit"), (["--device", "mps"], "argument --device"),
    (["--saved-bytes", "--dtype", "bf16"], "--variants and --dtype do not apply")])
def test_profile_bad_option_values_are_one_line_errors(tmp_path, capsys, bad, named):
    """(They were tracebacks from inside the first step: a negative tensor dimension, an empty median, torch's
    set_num_threads, a NaN budget converted to int.)"""
    from seg3d_fast.cli import main

    argv = ["profile", "--input-size", "8", "8", "8", "--features", "2", "4", "--device", "cpu", "--steps", "1",
            "--memory-budget", "0", "--out", str(tmp_path / "p.json"), *bad]
    try:
        rc = main(argv)
    except SystemExit as e:  # (argparse's own errors)
        rc = e.code
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # (argparse's usage lines before it)
    assert rc == 2 and last.startswith("seg3d-fast") and named in last and "Traceback" not in err, err
    assert not (tmp_path / "p.json").exists()


def test_largest_cube_estimate_is_exact_where_it_can_be(tmp_path):
    # CPU estimate = saved bytes + 4x parameters, linear in voxels: a budget of exactly the estimate at edge 48
    # must give 48, and one byte less must give 32.
    args = _args(tmp_path)
    variant = profile.Variant("reference", args, torch.device("cpu"))
    at_48 = profile.estimate_bytes(variant, 1, (48, 48, 48))
    assert profile.largest_cube(variant, 1, at_48, 96)["max_cubic_edge"] == 48
    assert profile.largest_cube(variant, 1, at_48 - 1, 96)["max_cubic_edge"] == 32


def test_a_variant_listed_twice_runs_once(tmp_path):
    assert profile.main(_args(tmp_path, "--variants", "plain", "plain", "--memory-budget", "0")) == 0
    assert [r["variant"] for r in json.loads((tmp_path / "p.json").read_text())["results"]] == ["plain"]


def test_saved_bytes_mode_tiny(tmp_path):
    assert profile.main(_args(tmp_path, "--saved-bytes")) == 0
    payload = json.loads((tmp_path / "p.json").read_text())
    r = payload["result"]
    assert payload["config"]["input"] == [1, 4, 8, 16, 12]
    assert 0 < r["saved_bytes_fused"] < r["saved_bytes_plain"]
    assert r["saved_bytes_ratio"] == pytest.approx(r["saved_bytes_fused"] / r["saved_bytes_plain"])
    assert r["step_cpu_ms_fused"] > 0 and r["step_cpu_ms_plain"] > 0 and r["wall_ratio_median"] > 0
    assert 0 < r["peak_bytes_fused"] < r["peak_bytes_plain"]
    assert r["peak_bytes_fused"] >= r["saved_bytes_fused"]  # the saved activations are alive at the peak
    assert r["meets_targets"] == (r["saved_bytes_ratio"] <= 0.55 and r["step_time_ratio"] <= 1.15)


def test_peak_live_bytes_counts_storages_once_and_frees_them():
    from seg3d_fast.models import peak_live_bytes

    x = torch.randn(1000, requires_grad=True)

    def step():
        y = x.exp()  # 4000 bytes, saved by exp (its own result)
        v = y[10:]  # a view: no new storage
        z = (v * 2).sum()  # 3960 bytes, freed after the sum; z: 4 bytes
        del v
        z.backward()  # grad of x: 4000 bytes, plus the backward's temporaries
        return z

    peak = peak_live_bytes(step)
    assert 4000 + 3960 + 4 <= peak < 4 * 4000
    assert peak_live_bytes(lambda: torch.ones(10)) == 40


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_profile_main_tiny_gpu(tmp_path):
    args = _args(tmp_path, "--device", "cuda", "--dtype", "bf16", "--memory-budget", "0.5", "--max-edge", "32",
                 "--trace", str(tmp_path / "trace"), "--memory-history", "--steps", "3",
                 "--variants", "plain", "plain_cl", "fused", "fused_graph", "plain_cl_graph")
    assert profile.main(args) == 0
    rows = {r["variant"]: r for r in json.loads((tmp_path / "p.json").read_text())["results"]}
    assert set(rows) == {"plain", "plain_cl", "fused", "fused_graph", "plain_cl_graph"}
    assert set(rows["fused"]["backends"]["conv3d_prelu/forward"]) <= {"cuda", "triton", "reference"}
    for name, r in rows.items():
        assert r["peak_bytes"] > 0 and "max_memory_allocated" in r["memory_method"]
        assert 0 < r["host_ms"] <= max(r["step_ms_all"]) and 0 < r["gpu_busy_ms"]
        if name.endswith("_graph"):
            assert r["max_cubic_method"].startswith("skipped: a CUDA-graph variant") and "peak_allocations" not in r
            assert r["graph_replays"] >= 3 and r["graph_disabled"] is None  # every timed step a replay
        else:
            assert r["max_cubic_edge"] in (16, 32) and r["max_cubic_bytes"] <= 0.5 * 2**30
            assert r["peak_allocations"]["peak_bytes"] > 0 and r["peak_allocations"]["top"]


def test_triton_tma_variant_runs_with_its_environment(monkeypatch):
    """The triton_tma variant runs the Triton backend with SEG3D_FAST_TRITON_TMA=1 around each training step, and
    only then (the opt-in TMA kernels read it at launch)."""
    import os

    monkeypatch.delenv("SEG3D_FAST_TRITON_TMA", raising=False)
    args = argparse.Namespace(dtype="fp32", in_channels=1, classes=2, features=[2, 4, 6, 8])
    variant = profile.Variant("triton_tma", args, torch.device("cpu"))
    backends = {m.backend for m in variant.model.modules() if hasattr(m, "backend")}
    assert backends == {"triton"}
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(os.environ.get("SEG3D_FAST_TRITON_TMA"))
            return x * self.scale

        scale = nn.Parameter(torch.ones(()))

    variant.model, variant.loss = Probe(), lambda logits, labels: logits.sum()
    variant.step(torch.randn(1, 1, 2, 2, 2), None)
    assert seen == ["1"] and "SEG3D_FAST_TRITON_TMA" not in os.environ


def test_alive_at_peak_from_an_allocator_trace():
    """peak_allocations' trace walk: the peak relative to the trace's start (frees of older blocks count), the
    blocks alive then grouped by their innermost seg3d_fast frame."""
    def frames(line):
        return [{"filename": "/x/torch/nn/functional.py", "line": 9, "name": "conv3d"},
                {"filename": "/x/seg3d_fast/ops.py", "line": line, "name": "f"}]

    events = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": frames(10)},
        {"action": "alloc", "addr": 2, "size": 50, "frames": frames(10)},
        {"action": "free_requested", "addr": 99, "size": 30},  # allocated before the trace
        {"action": "free_completed", "addr": 99, "size": 30},
        {"action": "alloc", "addr": 3, "size": 70, "frames": frames(20)},  # the peak: 100 + 50 - 30 + 70 = 190
        {"action": "free_requested", "addr": 1, "size": 100},
        {"action": "alloc", "addr": 4, "size": 90, "frames": []},  # 190 - 100 + 90 = 180: not a new peak
    ]
    result = profile.alive_at_peak(events)
    assert result["peak_bytes"] == 190
    assert result["top"] == [{"where": "ops.py:10 f", "count": 2, "bytes": 150},
                             {"where": "ops.py:20 f", "count": 1, "bytes": 70}]
    assert profile.alive_at_peak(events[-1:])["top"] == [{"where": "?", "count": 1, "bytes": 90}]


def test_time_steps_resets_the_gpu_peak_after_the_warmup(monkeypatch):
    """The profile's GPU peak is "max_memory_allocated over the timed steps": the allocator's peak is reset after the
    warm-up steps (autotuning, the dispatcher's timing of each backend on a new shape), not before them; for a
    graphed variant before its capture (run 5 reported the replays' 0.20 GiB). (CUDA calls faked: the order of
    steps and resets is what is checked.)"""
    events = []

    class FakeVariant:
        device = torch.device("cuda")
        graph_step = None

        def step(self, x, labels):
            events.append("step")

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: events.append("reset"))
    times, host, back_to_back = profile.time_steps(FakeVariant(), None, None, warmup=2, steps=3)
    assert len(times) == len(host) == 3 and back_to_back >= 0
    assert events == ["step", "step", "reset"] + ["step"] * 3 + ["step"] * 3  # (the timed steps, then back to back)

    # a graphed variant: reset after the CudaGraphStep's own eager warm-up, before the call that captures (the
    # capture allocates the memory the replays use), then the profile's warm-up replays and the timed ones
    class FakeGraphStep:
        warmup = 3

        def settle(self):
            events.append("settle")
    events.clear()
    FakeVariant.graph_step = FakeGraphStep()
    profile.time_steps(FakeVariant(), None, None, warmup=2, steps=3)
    assert events == ["step"] * 3 + ["reset"] + ["step"] * (1 + 2) + ["step"] * 3 + ["step"] * 3 + ["settle"]


def test_compare_against_the_best_plain_variant_in_any_order():
    """Speed against the faster plain variant and memory against the smaller plain peak, whatever the order of
    --variants (memory was taken against the first plain variant listed: plain_cl in gpu_check.sh, whose peak is
    the larger). Figures of run 3 (H100)."""
    rows = [("plain_cl", 13.2, 914483712), ("fused", 21.4, 661130752), ("plain", 20.3, 906822656)]
    for order in (rows, rows[::-1]):
        results = [{"variant": v, "step_ms": ms, "back_to_back_ms": ms - 1, "peak_bytes": peak}
                   for v, ms, peak in order]
        profile._compare(results)
        fused = next(r for r in results if r["variant"] == "fused")
        assert fused["speedup_vs_plain"] == pytest.approx(13.2 / 21.4)
        assert fused["back_to_back_speedup_vs_plain"] == pytest.approx(12.2 / 20.4)
        assert fused["memory_vs_plain"] == pytest.approx(661130752 / 906822656)


def test_results_file_survives_a_run_stopped_while_it_is_rewritten(tmp_path, monkeypatch):
    """The JSON is rewritten after every figure; a Ctrl-C or timeout during a rewrite left it truncated (the figures
    measured before lost) instead of the previous version."""
    from pathlib import Path

    path = tmp_path / "new" / "p.json"
    profile._write(path, {"results": [{"variant": "plain"}]})
    real = Path.write_text

    def stopped_halfway(self, text, *args, **kwargs):
        real(self, text[:len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", stopped_halfway)
    with pytest.raises(KeyboardInterrupt):
        profile._write(path, {"results": [{"variant": "plain"}, {"variant": "reference"}]})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"results": [{"variant": "plain"}]}
    assert [p.name for p in path.parent.iterdir()] == ["p.json"]  # (no temporary file left)
