"""Prediction: whole volumes or a Gaussian-blended sliding window, one fold model or an ensemble of folds
(probabilities averaged), outputs mapped back onto each input's exact grid (affine and header kept).

Output per case in --out: <case>.nii.gz (label map) and, with --save-probabilities,
<case>_probabilities.nii.gz (float32, classes along the 4th axis).
"""
import itertools
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data.datasets import Case, discover, load_case
from .data.nifti import Seg3DFastDataError, float_image_like, label_image_like, read_json, save_nifti
from .data.preprocess import (PreprocessConfig, canonical_probabilities, crop_probability_slabs, input_grid,
                              label_dtype, labels_from_probabilities, logits_to_crop_probabilities, preprocess,
                              restore_labels)

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---- the network on one preprocessed volume ------------------------------------------------------------------
def gaussian_importance(roi, sigma_scale=0.125):
    """Weights for blending windows: a Gaussian centred on the window (sigma = roi / 8), at least 1e-3 of its peak."""
    axes = [torch.exp(-0.5 * ((torch.arange(n, dtype=torch.float32) - (n - 1) / 2) / (n * sigma_scale)) ** 2)
            for n in roi]
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return (w / w.max()).clamp_min(1e-3)


def window_starts(size, roi, overlap):
    """Window start offsets along one axis: the first at 0, the last at size - roi, evenly spaced between."""
    if size <= roi:
        return [0]
    step = max(1, int(roi * (1 - overlap)))
    n = math.ceil((size - roi) / step) + 1
    return sorted({int(round(i * (size - roi) / (n - 1))) for i in range(n)})


def mirrored(model, x, mirror_axes=()):
    """model(x) for x (1, C, d, h, w); with `mirror_axes` (spatial axes 0-2) the mean of its outputs over every
    combination of flips of those axes, each flipped back (test-time augmentation: 2^len(axes) passes), float32."""
    if not mirror_axes:
        return model(x)
    dims = [a + 2 for a in mirror_axes]
    total = None
    for flips in itertools.chain.from_iterable(itertools.combinations(dims, k) for k in range(len(dims) + 1)):
        y = model(x.flip(flips) if flips else x)
        y = (y.flip(flips) if flips else y).float()
        total = y if total is None else total.add_(y)
    return total.div_(2 ** len(dims))


def predict_logits(model, x, device, roi=None, overlap=0.5, amp_dtype=None, out_device="cpu", mirror_axes=()):
    """x (C, d, h, w) float32 -> logits (num_classes, d, h, w) float32 on `out_device` (the host by default; the
    network's device keeps them there for what follows: interpolation, argmax, counting).
    roi None: the whole volume in one pass; else windows of size roi blended with Gaussian weights, summed in place
    on `out_device`. mirror_axes: each pass averaged over those axes' flips (mirrored)."""
    model.eval()
    out_device = torch.device(out_device)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else torch.autocast(device.type, enabled=False)
    with torch.no_grad(), autocast:
        if roi is None:  # (moved before the cast: a bf16 output crosses to the host in half the bytes)
            return mirrored(model, x[None].to(device), mirror_axes)[0].to(out_device).float()
        roi = tuple(int(r) for r in roi)
        shape = tuple(x.shape[1:])
        pad = [max(0, r - s) for r, s in zip(roi, shape)]
        if any(pad):  # volumes smaller than the window: pad with background, crop back at the end
            x = F.pad(x, [p for q in reversed(pad) for p in (0, q)])
        if out_device == torch.device(device):
            x = x.to(device)  # once, not a copy per window
        padded = tuple(x.shape[1:])
        weight = gaussian_importance(roi).to(out_device)
        out = norm = None
        for a in window_starts(padded[0], roi[0], overlap):
            for b in window_starts(padded[1], roi[1], overlap):
                for c in window_starts(padded[2], roi[2], overlap):
                    sl = (slice(a, a + roi[0]), slice(b, b + roi[1]), slice(c, c + roi[2]))
                    logits = mirrored(model, x[(slice(None), *sl)][None].to(device), mirror_axes)[0].to(out_device)
                    if out is None:
                        out = torch.zeros((logits.shape[0], *padded), device=out_device)
                        norm = torch.zeros(padded, device=out_device)
                    out[(slice(None), *sl)].addcmul_(logits, weight)  # (no weighted copy of the window's logits)
                    norm[sl] += weight
        out /= norm
        return out[(slice(None), *[slice(0, s) for s in shape])].contiguous()


def on_device_or_host(work, device):
    """work(where): the network's output kept, interpolated and reduced on `where`. First on the network's device;
    where that is a GPU without the memory for them, again with them on the host (the network stays on the GPU)."""
    if device.type != "cuda":
        return work(device)
    try:
        return work(device)
    except torch.cuda.OutOfMemoryError:
        pass  # (retried outside the handler: its traceback holds the failed attempt's tensors)
    torch.cuda.empty_cache()
    print(f"seg3d_fast: {device} ran out of memory; trying again with the predicted classes summed on the host",
          file=sys.stderr, flush=True)
    return work(torch.device("cpu"))


# ---- runs ----------------------------------------------------------------------------------------------------
def resolve_run(path):
    """(run folder, fold folder or None) for a run folder or one of its fold_k folders."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path, None
    if (path / "checkpoint.pt").is_file() and (path.parent / "config.json").is_file():
        return path.parent, path
    raise Seg3DFastDataError(f"{path}: not a training run (no config.json; train one with `seg3d-fast train`)")


def read_checkpoint(path, keys):
    """A training checkpoint (torch.load, weights only) as a dict holding `keys`; a file that cannot be read or is
    not such a checkpoint: one error naming it (train --resume and predict)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or not a checkpoint at all
        text = str(e).strip()  # (an empty file: EOFError with no text)
        raise Seg3DFastDataError(f"{path}: cannot read the checkpoint ({type(e).__name__}"
                                 f"{': ' + text.splitlines()[0][:160] if text else ''})") from None
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise Seg3DFastDataError(f"{path}: not a training checkpoint (no {', '.join(missing)}); the fold is damaged: "
                                 "train it again (--overwrite)")
    return state


def load_models(run_path, device, ensemble=False, fold=None, backend=None):
    """-> (run config dict, [models]) from a run: one fold (default fold 0, or the lowest present), or every
    fold with a checkpoint when ensemble=True. Each model carries `trained_flips`, the canonical axes its own
    training flipped at random (trained_flips: folds of one run may differ), what predict --tta averages over."""
    run_dir, fold_dir = resolve_run(run_path)
    if fold_dir is not None and (ensemble or fold is not None):
        raise Seg3DFastDataError(f"{run_path}: one fold's folder, with --{'ensemble' if ensemble else 'fold'}: pass "
                                 "the run folder to choose folds, or the fold's folder alone")
    config = read_json(run_dir / "config.json")
    missing = [k for k in ("model", "preprocess") if not isinstance(config.get(k), dict)]
    if missing:
        raise Seg3DFastDataError(f"{run_dir / 'config.json'}: not a run configuration (no {', '.join(missing)}); "
                                 "the run folder is damaged")
    if fold_dir is not None:
        fold_dirs = [fold_dir]
    else:
        present = sorted((p for p in run_dir.glob("fold_*") if (p / "checkpoint.pt").is_file()),
                         key=lambda p: int(p.name.split("_")[1]))
        if not present:
            raise Seg3DFastDataError(f"{run_dir}: no fold_k/checkpoint.pt in this run")
        if ensemble:
            fold_dirs = present
            folds = config.get("folds")
            if isinstance(folds, int) and len(present) < folds:  # (a note: an ensemble of the folds trained so far)
                missing = sorted(set(range(folds)) - {int(p.name.split("_")[1]) for p in present})
                print(f"seg3d_fast: --ensemble of {len(present)} of the run's {folds} folds (no checkpoint for fold "
                      f"{', '.join(map(str, missing))})", file=sys.stderr, flush=True)
        elif fold is not None:
            fold_dirs = [run_dir / f"fold_{fold}"]
            if not (fold_dirs[0] / "checkpoint.pt").is_file():
                raise Seg3DFastDataError(f"{fold_dirs[0]}: no checkpoint for fold {fold}")
        else:
            fold_dirs = present[:1]
    models = []
    for d in fold_dirs:
        state = read_checkpoint(d / "checkpoint.pt", ("model",))
        # a checkpoint left beside a config.json rewritten for another model (an --overwrite run stopped before
        # its first epoch) would otherwise fail in load_state_dict with a size-mismatch traceback
        trained = state.get("config") or {}
        for key in ("model", "preprocess", "num_classes"):  # (an --overwrite with other settings that stopped before
            if key in trained and trained[key] != config[key]:  # its first epoch rewrote config.json only)
                raise Seg3DFastDataError(f"{d / 'checkpoint.pt'}: trained with another {key} than "
                                         f"{run_dir / 'config.json'} describes ({trained[key]} vs {config[key]}); "
                                         "train it again, or resume it with its own settings")
        settings = state.get("train_config")
        if isinstance(settings, dict) and isinstance(settings.get("epochs"), int) and \
                isinstance(state.get("epoch"), int) and state["epoch"] < settings["epochs"]:
            print(f"seg3d_fast: {d / 'checkpoint.pt'} stopped at epoch {state['epoch']} of {settings['epochs']} "
                  "(--resume to finish it)", file=sys.stderr, flush=True)
        model = _model_from_config(config["model"], run_dir / "config.json", backend)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:  # missing / unexpected keys or other tensor shapes: another network's weights
            raise Seg3DFastDataError(f"{d / 'checkpoint.pt'}: its weights do not fit the model "
                                     f"{run_dir / 'config.json'} describes ({str(e).splitlines()[0]})") from None
        model.trained_flips = trained_flips(state.get("train_config"))
        models.append(model.to(device).eval())
    return config, models


def _model_from_config(settings, path, backend):
    """Seg3DNet from a run's model settings; settings a damaged or hand-edited config.json lacks, or that no
    Seg3DNet takes, are named (not a KeyError or TypeError traceback)."""
    from .models import Seg3DNet

    missing = [k for k in ("in_channels", "num_classes", "features") if k not in settings]
    if missing:
        raise Seg3DFastDataError(f"{path}: the model settings lack {', '.join(missing)}; the run folder is damaged")
    try:
        return Seg3DNet(**settings, backend=backend)
    except (TypeError, ValueError) as e:
        raise Seg3DFastDataError(f"{path}: the model settings do not describe a Seg3DNet ({e})") from None


def trained_flips(train_config):
    """The canonical axes a checkpoint's training flipped at random, from its train_config: its mirror_axes, none
    with --no-augment; every axis for checkpoints from before mirror_axes (which flipped all three)."""
    if not isinstance(train_config, dict):
        return (0, 1, 2)
    return tuple(train_config.get("mirror_axes", (0, 1, 2))) if train_config.get("augment", True) else ()


def crop_predictions(models, config, case, device, roi=None, overlap=0.5, amp_dtype=None, probabilities=False,
                     mirror_axes=None):
    """-> (reference image, Geometry, labels on the crop grid, probabilities or None): the labels are the argmax of
    the mean of the models' probabilities (an ensemble), not yet restored onto the input's grid (restore_labels);
    the probabilities, numpy float32 (num_classes, canonical grid) (canonical_probabilities; input_grid restores
    them), only where asked for. mirror_axes: test-time flips (mirrored), one tuple of axes per model.

    Memory: one model's logits on the network grid, on the network's device where they fit (on_device_or_host),
    plus on the host the canonical grid's probabilities where they are asked for or an ensemble sums them; one
    model's label map alone is taken slab by slab (crop_probability_slabs), only the labels crossing to the host."""
    mirror_axes = [()] * len(models) if mirror_axes is None else mirror_axes
    ref, image, _ = load_case(Case(case.name, case.images, None), expect_channels=config["model"]["in_channels"])
    x, _, geometry = preprocess(ref, image, None, PreprocessConfig.from_dict(config["preprocess"]),
                                name=str(case.images[0]))

    def crop_outputs(where):
        if len(models) == 1 and not probabilities:
            logits = predict_logits(models[0], x, device, roi, overlap, amp_dtype, out_device=where,
                                    mirror_axes=mirror_axes[0])
            labels = torch.empty(tuple(b - a for a, b in geometry.bbox), dtype=label_dtype(logits.shape[0]))
            for a, b, probs in crop_probability_slabs(logits, geometry):
                labels[a:b] = probs.argmax(0).to(labels.dtype)
            return labels, None
        full = probs = None
        for model, axes in zip(models, mirror_axes):  # an ensemble's mean, summed in place (in the canonical box)
            logits = predict_logits(model, x, device, roi, overlap, amp_dtype, out_device=where, mirror_axes=axes)
            if full is None and probabilities:
                full, probs = canonical_probabilities(logits.shape[0], geometry)
            probs = logits_to_crop_probabilities(logits, geometry, out=probs)
            del logits
        probs /= len(models)
        return labels_from_probabilities(probs), full

    labels, full = on_device_or_host(crop_outputs, device)
    return ref, geometry, labels, full


def predict_case(models, config, case, device, roi=None, overlap=0.5, amp_dtype=None, mirror_axes=None):
    """-> (reference image, probabilities float32 (num_classes, X, Y, Z) on the input's grid)."""
    ref, geometry, _, probs = crop_predictions(models, config, case, device, roi, overlap, amp_dtype,
                                               probabilities=True, mirror_axes=mirror_axes)
    return ref, input_grid(probs, geometry)


def predict(run_path, inputs, out_dir, device="auto", ensemble=False, fold=None, roi=None, overlap=0.5,
            save_probabilities=False, amp="none", backend=None, progress=True, tta=False):
    """Predict every case under `inputs` (a NIfTI file, a folder of them, a dataset folder or a CSV manifest).
    tta: average each model's prediction over the flips it was trained with (trained_flips).
    Returns the written label-map paths."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Seg3DFastDataError(f"device {device}: CUDA is not available here")
    if ensemble and fold is not None:
        raise Seg3DFastDataError("--ensemble averages every fold's model and --fold picks one: pass one")
    cases = discover(inputs).cases
    outputs = _output_paths(cases, Path(out_dir), save_probabilities)  # checked before any work
    config, models = load_models(run_path, device, ensemble, fold, backend)
    mirror_axes = [_tta_flips(model, run_path) for model in models] if tta else None
    written = []
    for i, (case, (path, probs_path)) in enumerate(zip(cases, outputs)):
        ref, geometry, labels, probs = crop_predictions(models, config, case, device, roi, overlap, AMP_DTYPES[amp],
                                                        probabilities=save_probabilities, mirror_axes=mirror_axes)
        # the argmax on the crop grid equals that of the restored probabilities (background outside the crop)
        # without their full-size (C, X, Y, Z) float32 arrays: 13 GB each for 41 classes at 512 x 512 x 300
        save_nifti(label_image_like(restore_labels(labels, geometry), ref), path)
        if save_probabilities:
            save_nifti(float_image_like(np.moveaxis(input_grid(probs, geometry), 0, -1), ref), probs_path)
        del labels, probs
        written.append(path)
        if progress:
            print(f"[{i + 1}/{len(cases)}] {case.name} -> {path}", flush=True)
    return written


def _tta_flips(model, run_path):
    if not model.trained_flips:
        raise Seg3DFastDataError(f"{run_path}: --tta averages over the flips a model was trained with, and a model of "
                                 "this run was trained without flips (--no-augment, or --mirror-axes with no axis)")
    return model.trained_flips


def _output_paths(cases, out_dir, save_probabilities):
    """[(label map path, probabilities path)] per case; an output that is one of the input files (--out the input
    folder) or that two cases share is an error: nothing the user had is overwritten."""
    inputs = {Path(f).resolve() for case in cases for f in [*case.images, case.label] if f is not None}
    outputs, seen = [], {}
    for case in cases:
        pair = (out_dir / f"{case.name}.nii.gz", out_dir / f"{case.name}_probabilities.nii.gz")
        for path in pair[:2 if save_probabilities else 1]:
            resolved = path.resolve()
            if resolved in inputs:
                raise Seg3DFastDataError(f"{path}: the prediction would overwrite this input file; choose another "
                                         "--out folder")
            if resolved in seen:
                raise Seg3DFastDataError(f"{path}: cases {seen[resolved]} and {case.name} would both be written "
                                         "here; choose another --out folder per case")
            seen[resolved] = case.name
        outputs.append(pair)
    return outputs


def add_arguments(p):
    from .cli import at_least, device_name

    p.add_argument("run", help="training run folder (or one fold_k folder)")
    p.add_argument("inputs", help="a NIfTI image, a folder of images / cases, a dataset folder or a CSV manifest")
    p.add_argument("--out", required=True, help="output folder for label maps")
    p.add_argument("--ensemble", action="store_true", help="average the probabilities of every fold model")
    p.add_argument("--fold", type=at_least(0), default=None, help="use this fold's model (default: the first fold)")
    p.add_argument("--sliding-window", type=at_least(1), nargs=3, metavar=("D", "H", "W"), default=None,
                   help="predict in Gaussian-blended windows of this size (default: the whole volume at once)")
    p.add_argument("--overlap", type=at_least(0.0, float, below=1.0), default=0.5,
                   help="windows' overlap, a fraction of their size in [0, 1)")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write <case>_probabilities.nii.gz (float32 class probabilities along the 4th axis)")
    p.add_argument("--amp", choices=tuple(AMP_DTYPES), default="none",
                   help="autocast the network to this dtype (fp16: GPU only)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average over the flips the run was trained with (its --mirror-axes; "
                        "2^axes network passes per volume or window)")
    p.add_argument("--device", type=device_name, default="auto")
    p.add_argument("--backend", choices=("reference", "triton", "cuda"), default=None)


def main(args):
    predict(args.run, args.inputs, args.out, args.device, args.ensemble, args.fold, args.sliding_window,
            args.overlap, args.save_probabilities, args.amp, args.backend, tta=args.tta)
    return 0
