"""Memory and time of the data pipeline on big volumes, on the CPU: prediction (the label map alone, and with
--save-probabilities), evaluation of a folder (with and without HD95), the label map's downsampling, and the
preprocessed training cases in memory or in a --cache-dir.

Each step runs in a process of its own, on synthetic volumes made beforehand (random-intensity images; blocky labels
with 10% of the voxels relabelled, or organ-like ellipsoids), and reports that process's peak resident memory
(VmHWM, the imports included) and its memory in use once the imports were done, its own wall time, and for the
training cases the memory they hold after preparation. Prediction runs a real run folder: an untrained Seg3DNet of
many classes (the prediction's memory is in the classes x volume arrays, not in the network).

    python benchmarks/pipeline_memory.py [--scale 1.0] [--json out.json] [--keep DIR] [--steps ...]

--scale multiplies every extent (0.1: a plumbing run in seconds).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# step: what it measures
STEPS = {
    "predict_labels": "predict: label map of one model, 41 classes, 320x320x200 volume, --downsample 2",
    "predict_window": "predict: the same label map in a sliding window of 64x64x64 (50% overlap)",
    "predict_probabilities": "predict --save-probabilities: 21 classes, 256x256x160 LPS volume, --downsample 2",
    "evaluate": "evaluate: 4 cases of 256x256x160, 41 classes",
    "evaluate_hd95": "evaluate with HD95: 1 case of 104 organ-like classes, 256x256x150 (prediction shifted 1 voxel)",
    "downsample_labels": "label map downsampled by 2 (--downsample 2): 104 organ-like classes, 256x256x150",
    "prepare_memory": "training cases in memory: 12 one-channel cases of 192x192x160, 4 classes",
    "prepare_cache": "training cases in a --cache-dir (second use: read back as memory maps)",
    "training_batches": "training batches: 24 crops of 4x128x160x144 (flips, turns, intensity) from a 4x155x240x240 "
                        "case (extents x --scale), each a batch of one, on one thread (as in a data-loader worker), "
                        "and through one worker",
}


def _extent(shape, scale):
    return tuple(max(8, int(round(s * scale))) for s in shape)


def _labels(rng, shape, classes, noise=0.1):
    """Blocks of 4^3 voxels of random classes, `noise` of the voxels relabelled at random: -> uint8."""
    import numpy as np

    coarse = rng.integers(0, classes, [-(-s // 4) for s in shape])
    y = coarse.repeat(4, 0).repeat(4, 1).repeat(4, 2)[tuple(slice(0, s) for s in shape)]
    return np.where(rng.random(shape) < noise, rng.integers(0, classes, shape), y).astype(np.uint8)


def make_data(root: Path, scale: float):
    """The synthetic volumes and run folders every step reads (made once, before any step's process)."""
    import nibabel as nib
    import numpy as np
    import torch

    from seg3d_fast.models import Seg3DNet

    rng = np.random.default_rng(0)
    for name, shape, classes, flip in (("labels41", (320, 320, 200), 41, 1), ("probs21", (256, 256, 160), 21, -1)):
        shape = _extent(shape, scale)
        d = root / name
        d.mkdir(parents=True)
        image = rng.normal(100, 20, shape).clip(1).astype(np.int16)  # MRI-like: every voxel foreground
        nib.save(nib.Nifti1Image(image, np.diag([0.8 * flip, 0.8 * flip, 1.5, 1])), str(d / "case.nii"))
        torch.manual_seed(0)
        model = Seg3DNet(1, classes, (4, 8))
        config = {"format": 1, "model": {**model.config, "features": list(model.config["features"])},
                  "preprocess": {"downsample": 2.0, "clip": None}, "num_classes": classes}
        (d / "run" / "fold_0").mkdir(parents=True)
        (d / "run" / "config.json").write_text(json.dumps(config))
        torch.save({"model": model.state_dict(), "config": config}, d / "run" / "fold_0" / "checkpoint.pt")
    shape = _extent((256, 256, 150), scale)
    organs, grid = np.zeros(shape, np.int64), np.ogrid[tuple(slice(0, n) for n in shape)]
    for c in range(1, 105):  # ellipsoids of random centres and radii (4-25 voxels at scale 1)
        centre = rng.uniform(0.08, 0.92, 3) * shape
        radius = np.maximum(1.0, rng.uniform(4, 25, 3) * scale)
        organs[sum(((g - m) / r) ** 2 for g, m, r in zip(grid, centre, radius)) <= 1] = c
    np.save(root / "organs.npy", organs)
    for sub, label in (("truth", organs), ("pred", np.roll(organs, 1, 0))):
        (root / "organs" / sub).mkdir(parents=True)
        image = nib.Nifti1Image(label.astype(np.uint8), np.diag([0.8, 0.8, 1.5, 1]))
        nib.save(image, str(root / "organs" / sub / "c.nii"))
    for sub in ("pred", "truth"):
        (root / "evaluate" / sub).mkdir(parents=True)
    shape = _extent((256, 256, 160), scale)
    for i in range(4):
        truth = _labels(rng, shape, 41)
        pred = np.where(rng.random(shape) < 0.1, rng.integers(0, 41, shape), truth).astype(np.uint8)
        nib.save(nib.Nifti1Image(truth, np.eye(4)), str(root / "evaluate" / "truth" / f"case{i}.nii"))
        nib.save(nib.Nifti1Image(pred, np.eye(4)), str(root / "evaluate" / "pred" / f"case{i}.nii"))
    d = root / "train"
    d.mkdir()
    rows = ["name,image,label"]
    shape = _extent((192, 192, 160), scale)
    for i in range(12):
        nib.save(nib.Nifti1Image(rng.normal(100, 20, shape).clip(1).astype(np.int16), np.eye(4)), str(d / f"c{i}.nii"))
        nib.save(nib.Nifti1Image(_labels(rng, shape, 4), np.eye(4)), str(d / f"c{i}_label.nii"))
        rows.append(f"c{i},c{i}.nii,c{i}_label.nii")
    (d / "train.csv").write_text("\n".join(rows) + "\n")


def _resident_mib():
    """Memory in use now (not the peak), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib():
    """This process's peak resident memory, MiB: VmHWM, which starts afresh at exec. (ru_maxrss does not: a step's
    process would report the driver's own peak, that of making the data, wherever it was larger.)"""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # (kB)


def run_step(step: str, root: Path, scale: float = 1.0) -> dict:
    """One step, in this process: -> {peak_mib (the process's), baseline_mib (in use after the imports), seconds,
    ...}."""
    import numpy as np
    import torch

    from seg3d_fast.data import discover
    from seg3d_fast.metrics import evaluate_folders
    from seg3d_fast.predict import predict
    from seg3d_fast.train import TrainConfig, prepare

    torch.set_num_threads(2)
    out = {}
    baseline = _resident_mib()
    start = time.perf_counter()
    if step.startswith("predict"):
        d = root / ("probs21" if step == "predict_probabilities" else "labels41")
        predict(d / "run", d / "case.nii", root / "out" / step, device="cpu",
                roi=(64, 64, 64) if step == "predict_window" else None,
                save_probabilities=step == "predict_probabilities", progress=False)
    elif step == "evaluate":  # (Dice and the other counts: the HD95 of 41 classes spread over the whole volume,
        # the worst case of its bounding boxes, is the next step's subject, on organ-like maps)
        no_hd95 = {"hd95": False} if "hd95" in inspect.signature(evaluate_folders).parameters else {}
        out["mean_dice"] = evaluate_folders(root / "evaluate" / "pred", root / "evaluate" / "truth",
                                            **no_hd95)["mean_dice"]
    elif step == "evaluate_hd95":
        result = evaluate_folders(root / "organs" / "pred", root / "organs" / "truth")
        out["mean_hd95_mm"] = round(float(np.nanmean([v["hd95"] for v in result["mean"].values()])), 3)
    elif step == "downsample_labels":
        from seg3d_fast.data.preprocess import downsample_labels

        label = torch.from_numpy(np.load(root / "organs.npy"))
        start = time.perf_counter()
        out["classes"] = len(torch.unique(downsample_labels(label, tuple((n + 1) // 2 for n in label.shape))))
    elif step.startswith("prepare"):
        cache = {"cache_dir": str(root / "cache")} if step == "prepare_cache" else {}
        cfg = TrainConfig(data=str(root / "train" / "train.csv"), out=str(root / "unused"), **cache)
        dataset = discover(cfg.data)
        names = [c.name for c in dataset.cases]
        if cache:
            prepare(cfg, dataset, names, None)  # fills the cache; the measured use reads it back
            start = time.perf_counter()
        before = _resident_mib()
        cases, _ = prepare(cfg, dataset, names, None)
        out["held_mib"] = round(_resident_mib() - before, 1)
        out["label_dtype"] = str(cases[0].y.dtype)
    elif step == "training_batches":
        from seg3d_fast.train import CropDataset, PreparedCase, pad_collate

        torch.set_num_threads(1)
        rng = np.random.default_rng(0)
        shape, crop = _extent((155, 240, 240), scale), _extent((128, 160, 144), scale)
        case = PreparedCase("case", rng.normal(size=(4, *shape)).astype(np.float32),
                            (rng.random(shape) < 0.1).astype(np.uint8))
        data = CropDataset([case], 24, crop, 0.33, True, seed=0)
        start = time.perf_counter()
        for i in range(len(data)):
            pad_collate([data[i]])
        out["ms_per_batch"] = round((time.perf_counter() - start) * 1e3 / len(data), 1)
        # the same through one data loader worker, as training loads them: the batch's way to the main process
        # included (the first batch, the worker's start, not counted)
        batches = iter(torch.utils.data.DataLoader(data, batch_size=1, num_workers=1, collate_fn=pad_collate))
        next(batches)
        start = time.perf_counter()
        count = sum(1 for _ in batches)
        out["ms_per_batch_worker"] = round((time.perf_counter() - start) * 1e3 / count, 1)
    else:
        raise ValueError(f"step must be one of {sorted(STEPS)}, got {step!r}")
    out["seconds"] = round(time.perf_counter() - start, 2)
    out["peak_mib"], out["baseline_mib"] = round(_peak_mib(), 1), round(baseline, 1)
    return out


def run(scale=1.0, steps=tuple(STEPS), keep=None):
    import torch

    import seg3d_fast

    # the steps' processes import the seg3d_fast this one did (PYTHONPATH at another checkout measures that one)
    path = os.pathsep.join(filter(None, [str(Path(seg3d_fast.__file__).parents[1]), os.environ.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="seg3d_pipeline_", dir=keep) as tmp:
        root = Path(tmp)
        make_data(root, scale)
        rows = []
        for step in steps:
            p = subprocess.run([sys.executable, __file__, "--step", step, "--root", str(root), "--scale", str(scale)],
                               capture_output=True, text=True, check=False, env=dict(os.environ, PYTHONPATH=path))
            if p.returncode != 0:
                raise RuntimeError(f"step {step} failed:\n{p.stderr[-3000:]}")
            rows.append({"step": step, "what": STEPS[step], **json.loads(p.stdout.strip().splitlines()[-1])})
    return {"kind": "pipeline_memory", "scale": scale, "python": sys.version.split()[0], "torch": torch.__version__,
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "rows": rows}


def table(result) -> str:
    lines = [f"| step (extents x {result['scale']:g}) | peak MiB (after imports) | held MiB | seconds |",
             "|---|---|---|---|"]
    for r in result["rows"]:
        per_batch = f" ({r['ms_per_batch']:.1f} ms per batch" if "ms_per_batch" in r else ""
        per_batch += f", {r['ms_per_batch_worker']:.1f} through a worker)" if "ms_per_batch_worker" in r else \
            (")" if per_batch else "")
        lines.append(f"| {r['what']} | {r['peak_mib']:.0f} ({r['baseline_mib']:.0f}) | {r.get('held_mib', '–')} "
                     f"| {r['seconds']:.1f}{per_batch} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--json", default=None, help="write the result here")
    parser.add_argument("--keep", default=None, help="make the data under this folder (default: the system's temp)")
    parser.add_argument("--steps", nargs="+", choices=tuple(STEPS), default=tuple(STEPS),
                        help="these steps only (e.g. to measure an earlier commit, PYTHONPATH at its checkout, which "
                             "has no --cache-dir)")
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)  # (one step, in a process of its own)
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:
        print(json.dumps(run_step(args.step, Path(args.root), args.scale)))
        return 0
    result = run(args.scale, tuple(args.steps), keep=args.keep)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
