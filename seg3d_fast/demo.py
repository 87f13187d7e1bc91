"""`seg3d-fast demo`: train Seg3DNet on the bundled brain MRI, predict a held-out slab, report Dice.

The sample (seg3d_fast/data/sample, see its README) is a 2 mm skull-stripped T1 with a 4-class tissue map
(background, CSF, grey matter, white matter). An axial slab in the middle of the brain is held out; the slices
below and above it are the two training cases. The trained run lands in --out, so `seg3d-fast predict OUT ...`
reuses it.
"""
import time
from pathlib import Path

import numpy as np

from .data import sample_paths
from .data.nifti import Seg3DFastDataError, load_nifti, read_json, save_nifti
from .files import write_atomic, write_text_atomic
from .metrics import evaluate_case, to_json_text

CLASS_NAMES = ("background", "CSF", "GM", "WM")
HELDOUT = (0.40, 0.65)  # the held-out slab: this fraction range of the axial (z) extent
# Tuned on 2 CPU cores: 800 random 48x48x24 crops (the slabs are 28 and 25 slices thick), Adam 3e-3 with poly decay.
DEFAULTS = dict(epochs=100, samples_per_epoch=8, lr=3e-3, crop=(48, 48, 24), features=(8, 16, 32, 64))
QUICK = dict(epochs=1, samples_per_epoch=2, lr=3e-3, crop=(48, 48, 24), features=(4, 8))


def split_sample(data_dir):
    """Write the two training slabs, the held-out slab (image and label) and train.csv; -> paths."""
    image_path, label_path = sample_paths()
    image_img, image = load_nifti(image_path)
    label_img, label = load_nifti(label_path)
    z = image.shape[2]
    lo, hi = int(round(HELDOUT[0] * z)), int(round(HELDOUT[1] * z))
    parts = {"train_inferior": (0, lo), "train_superior": (hi, z), "heldout": (lo, hi)}
    paths = {}
    for name, (a, b) in parts.items():
        for kind, img, data in (("image", image_img, image), ("label", label_img, label)):
            sub = img.slicer[:, :, a:b]  # keeps the header; the affine moves to the slab's origin
            out = type(img)(np.asarray(data[:, :, a:b]), sub.affine, sub.header)
            paths[f"{name}_{kind}"] = data_dir / f"{name}_{kind}.nii.gz"
            save_nifti(out, paths[f"{name}_{kind}"])
    rows = ["name,image,label"] + [f"{n},{n}_image.nii.gz,{n}_label.nii.gz" for n in ("train_inferior", "train_superior")]
    paths["manifest"] = data_dir / "train.csv"
    write_text_atomic(paths["manifest"], "\n".join(rows) + "\n")
    return paths, (lo, hi)


def _forget_previous_demo(out):
    """A demo run already in `out` (possibly with other settings) is replaced, never resumed or mixed; another
    training run there is refused before the demo writes anything (its data/ would go in beside that run)."""
    config = out / "config.json"
    if config.is_file():
        if not read_json(config).get("extra", {}).get("demo"):
            raise Seg3DFastDataError(f"{out}: holds a training run that is not the demo's ({config}); pass another "
                                     "--out")
        for name in ("config.json", "splits.json", "fold_0/checkpoint.pt"):
            (out / name).unlink(missing_ok=True)


def overlay_png(path, image, truth, pred, title):
    """Three axial slices of the held-out slab: T1, ground truth over T1, prediction over T1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap([(0, 0, 0, 0), (0.2, 0.5, 1.0, 0.6), (1.0, 0.6, 0.1, 0.6), (0.9, 0.9, 0.2, 0.6)])
    zs = np.linspace(0, image.shape[2] - 1, 5).round().astype(int)[1:4]
    fig, axes = plt.subplots(3, 3, figsize=(8, 9))
    for col, z in enumerate(zs):
        for row, (labels, name) in enumerate(((None, "T1"), (truth, "ground truth"), (pred, "prediction"))):
            ax = axes[row, col]
            ax.imshow(image[:, :, z].T, cmap="gray", origin="lower")
            if labels is not None:
                ax.imshow(labels[:, :, z].T, cmap=cmap, vmin=0, vmax=3, origin="lower", interpolation="nearest")
            ax.set_title(f"{name}, slice {z}", fontsize=9)
            ax.axis("off")
    fig.suptitle(title + "\nblue CSF, orange GM, yellow WM", fontsize=10)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)


def run_demo(out="seg3d_demo", epochs=None, quick=False, device="auto", seed=0, progress=True):
    """-> the metrics dict written to OUT/metrics.json."""
    from .predict import predict
    from .train import TrainConfig, check_forced_backend, train

    import torch

    if str(device).startswith("cuda") and not torch.cuda.is_available():  # (before the data is written)
        raise Seg3DFastDataError(f"--device {device}: CUDA is not available here")
    check_forced_backend(None)  # (env SEG3D_FAST_BACKEND naming a backend that cannot run here)
    start = time.perf_counter()
    out = Path(out)
    settings = dict(QUICK if quick else DEFAULTS)
    if epochs is not None:
        settings["epochs"] = epochs
    _forget_previous_demo(out)
    paths, (lo, hi) = split_sample(out / "data")
    if progress:
        print(f"demo: bundled 2 mm T1 brain MRI, axial slices {lo}..{hi - 1} held out, training on the rest "
              f"({settings['epochs']} epochs x {settings['samples_per_epoch']} samples)", flush=True)
    cfg = TrainConfig(data=str(paths["manifest"]), out=str(out), epochs=settings["epochs"],
                      samples_per_epoch=settings["samples_per_epoch"], lr=settings["lr"], crop=settings["crop"],
                      features=settings["features"], num_classes=len(CLASS_NAMES), seed=seed, device=device,
                      progress=progress, extra={"demo": True, "class_names": list(CLASS_NAMES),
                                                "heldout_axial_slices": [lo, hi]})
    train(cfg)
    train_seconds = time.perf_counter() - start
    pred_path = predict(out, paths["heldout_image"], out / "prediction", device=device, progress=False)[0]
    _, image = load_nifti(paths["heldout_image"])
    _, truth = load_nifti(paths["heldout_label"])
    pred_img, pred = load_nifti(pred_path)
    per_class = evaluate_case(pred, truth, classes=range(1, len(CLASS_NAMES)))
    dice = {CLASS_NAMES[c]: per_class[f"class_{c}"]["dice"] for c in range(1, len(CLASS_NAMES))}
    seconds = time.perf_counter() - start
    metrics = {"dice": dice, "mean_dice": float(np.mean(list(dice.values()))),
               "per_class": {CLASS_NAMES[c]: per_class[f"class_{c}"] for c in range(1, len(CLASS_NAMES))},
               "heldout_axial_slices": [lo, hi], "epochs": settings["epochs"],
               "samples_per_epoch": settings["samples_per_epoch"], "train_seconds": round(train_seconds, 1),
               "total_seconds": round(seconds, 1), "prediction": str(pred_path.relative_to(out))}
    write_text_atomic(out / "metrics.json", to_json_text(metrics))
    overlay_png(out / "overlay.png", image, truth, np.asarray(pred),
                f"held-out slab, mean Dice {metrics['mean_dice']:.3f} (CSF/GM/WM)")
    if progress:
        print("held-out Dice: " + ", ".join(f"{k} {v:.3f}" for k, v in dice.items())
              + f"; mean {metrics['mean_dice']:.3f}")
        print(f"done in {seconds:.0f} s; wrote {out}/metrics.json, {out}/overlay.png, {pred_path}, "
              f"run in {out} (config.json, fold_0/checkpoint.pt): `seg3d-fast predict {out} IMAGE --out DIR`")
    return metrics
