"""Segmentation metrics: Dice, Jaccard, sensitivity, PPV per class and per BRATS region; folder evaluation.

Conventions: Dice and Jaccard are 1 when prediction and truth are both empty; sensitivity is NaN when the truth
is empty, PPV when the prediction is empty; HD95 (mm, where the voxel size is known) is 0 when both are empty and
NaN when one is; means skip NaN.
"""
import csv
import io
import json
import math
import warnings

import numpy as np
import torch

# BRATS tumour regions as sets of labels. 2015-2021 labels: 1 necrosis/non-enhancing, 2 edema, 4 enhancing;
# BraTS 2023+ relabelled enhancing tumour to 3.
REGIONS = {
    "brats": {"whole": (1, 2, 3, 4), "core": (1, 3, 4), "enhancing": (4,)},
    "brats2023": {"whole": (1, 2, 3), "core": (1, 3), "enhancing": (3,)},
}
METRICS = ("dice", "jaccard", "sensitivity", "ppv", "hd95")  # hd95 only where the voxel size is given


def scores(tp, fp, fn):
    """{dice, jaccard, sensitivity, ppv} from counts."""
    nan = float("nan")
    return {
        "dice": 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn),
        "jaccard": 1.0 if tp + fp + fn == 0 else tp / (tp + fp + fn),
        "sensitivity": nan if tp + fn == 0 else tp / (tp + fn),
        "ppv": nan if tp + fp == 0 else tp / (tp + fp),
    }


def label_counts(pred, truth, slab_voxels=2**22):
    """(values, counts) of two label maps of one shape (numpy, or torch on any device, counted there): the label
    values found in either, sorted, and counts[i, j], the voxels predicted values[i] whose truth is values[j] (numpy
    int64). Every per-class and region score follows from it (scores_of): one pass over the voxels, slab by slab,
    instead of masks per class; a training step's Dice copies C x C numbers off the GPU, not its label maps."""
    pred, truth = _tensor(pred), _tensor(truth)
    if pred.device != truth.device:  # counted on the GPU where one of them is there
        pred, truth = (pred.to(truth.device), truth) if pred.device.type == "cpu" else (pred, truth.to(pred.device))
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(truth.shape)}")
    pred, truth = pred.reshape(-1), truth.reshape(-1)
    if pred.numel() == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.int64)
    lo, hi = (float(v) for v in torch.stack([torch.minimum(pred.min(), truth.min()).double(),
                                             torch.maximum(pred.max(), truth.max()).double()]).cpu())
    # small non-negative integers (every segmentation we know) are their own index; others are looked up
    direct = not (pred.is_floating_point() or truth.is_floating_point()) and lo >= 0 and hi < _DIRECT_LABELS
    values = (torch.arange(int(hi) + 1, device=pred.device) if direct else
              torch.unique(torch.cat([torch.unique(pred), torch.unique(truth)])))
    n = len(values)
    counts = torch.zeros(n * n, dtype=torch.int64, device=pred.device)
    for a in range(0, pred.numel(), slab_voxels):
        p, t = pred[a:a + slab_voxels], truth[a:a + slab_voxels]
        if not direct:
            p, t = torch.searchsorted(values, p), torch.searchsorted(values, t)
        counts += torch.bincount(p.long() * n + t.long(), minlength=n * n)
    values, counts = values.cpu().numpy(), counts.view(n, n).cpu().numpy()
    if direct:  # keep the values that occur
        present = (counts.sum(0) + counts.sum(1)) > 0
        values, counts = values[present], counts[np.ix_(present, present)]
    return values, counts


_DIRECT_LABELS = 1024  # label values below this are counted in a (value, value) table directly: 8 MB of int64


def _tensor(a):
    """A torch view of a label map: numpy arrays without a copy where their strides and dtype allow (torch has no
    min / max for uint16-64: those become int64, bool uint8)."""
    if isinstance(a, torch.Tensor):
        a = a.detach()
        wide_unsigned = a.dtype in (torch.uint16, torch.uint32, torch.uint64)
        return a.long() if wide_unsigned else a.to(torch.uint8) if a.dtype == torch.bool else a
    a = np.asarray(a)
    if a.dtype.kind == "b":
        a = a.view(np.uint8)
    if (a.dtype.kind == "u" and a.itemsize > 1) or any(s < 0 for s in a.strides):
        a = a.astype(np.int64 if a.dtype.kind == "u" else a.dtype)
    with warnings.catch_warnings():  # a read-only array (a memory map, nibabel's): only read here
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def scores_of(counts, labels):
    """scores() of the voxels whose label is one of `labels` (a class: one label; a region: several), from
    label_counts' (values, counts)."""
    values, counts = counts
    member = np.isin(values, list(labels))
    tp = int(counts[np.ix_(member, member)].sum())
    return scores(tp, int(counts[member].sum()) - tp, int(counts[:, member].sum()) - tp)


def dice_per_class(pred, truth, num_classes):
    """[Dice of class c for c in 0..num_classes-1] for two integer label maps (numpy or torch)."""
    counts = label_counts(pred, truth)
    return [scores_of(counts, (c,))["dice"] for c in range(num_classes)]


def mean_foreground_dice(pred, truth):
    """Mean Dice over the foreground classes (labels other than 0) found in either map, NaN where there are none.
    Training's and validation's score: a class absent from both would score 1 (scores()), making the mean depend on
    how many classes the model has, not on how well it segments (BRATS's unused label 3 added a free 0.25)."""
    values, counts = label_counts(pred, truth)
    dices = [scores_of((values, counts), (v,))["dice"] for v in values.tolist() if v != 0]
    return float(np.mean(dices)) if dices else float("nan")


def mean_foreground_dice_tensor(pred, truth, num_classes, slab_elements=2**24):
    """mean_foreground_dice of two label maps (torch, one device) as a float64 tensor (dice, found) where they are,
    with no host read: found is 1 where a foreground class occurs in either map, and dice is then their mean Dice,
    else 0. Training sums it over an epoch's steps, which a read per step would make wait for the GPU. Labels lie in
    [0, num_classes) (others count in no class). Counted by comparing each voxel with every foreground class, slab
    by slab (slab_elements voxel-class pairs at a time): bincount reads its input's maximum on the host, and a
    scatter-add would pile most voxels' atomic adds onto the background's one counter."""
    pred, truth = pred.reshape(-1), truth.reshape(-1)
    classes = torch.arange(1, num_classes, device=pred.device)
    counts = torch.zeros(3, len(classes), dtype=torch.int64, device=pred.device)  # |pred = c|, |truth = c|, both
    step = max(1, slab_elements // max(len(classes), 1))
    for a in range(0, pred.numel() if len(classes) else 0, step):
        p, t = pred[a:a + step, None] == classes, truth[a:a + step, None] == classes
        counts += torch.stack([p.sum(0), t.sum(0), (p & t).sum(0)])
    counts = counts.double()
    either = counts[0] + counts[1]  # Dice of class c: 2 |both| / (|pred = c| + |truth = c|)
    present = either > 0
    dices = torch.where(present, 2 * counts[2] / either.clamp(min=1), 0.0)
    return torch.stack([dices.sum() / present.sum().clamp(min=1), present.any().double()])


def looks_like_brats(label_values):
    """The regions to report for these label values: 'brats' when labels are within 0..4 and 4 occurs."""
    values = set(int(v) for v in label_values)
    return "brats" if values <= {0, 1, 2, 3, 4} and 4 in values else None


def evaluate_case(pred, truth, classes, regions=None, spacing=None):
    """{name: {metric: value}} for each class (name 'class_c') and region; pred/truth integer label maps. With the
    voxel size (`spacing`, mm per axis) also each target's HD95."""
    targets = {**{f"class_{c}": (c,) for c in classes}, **(REGIONS[regions] if regions else {})}
    hd = surface_hd95(pred, truth, spacing, targets) if spacing is not None else None
    return evaluate_counts(label_counts(pred, truth), classes, regions, hd)


def evaluate_counts(counts, classes, regions=None, hd95=None):
    """evaluate_case from the maps' label_counts (and {target: HD95}, where computed: a class missing from it is in
    neither map, HD95 0)."""
    out = {f"class_{c}": scores_of(counts, (c,)) for c in classes}
    for name, labels in (REGIONS[regions].items() if regions else ()):
        out[name] = scores_of(counts, labels)
    if hd95 is not None:
        for target, values in out.items():
            values["hd95"] = hd95.get(target, 0.0)
    return out


def surface_hd95(pred, truth, spacing, targets):
    """{target: HD95 in mm} for two label maps (numpy, 3D) and {target: its labels}: the larger of the two 95th
    percentiles of the distances from each mask's surface voxels to the other's surface (MONAI's
    compute_hausdorff_distance(percentile=95); the surface: the voxels the 6-neighbour erosion removes). Each
    target is measured within the bounding box of its voxels in either map (found for every label in three passes):
    a small organ costs its box, not the volume."""
    from .data.preprocess import label_boxes

    pred, truth = (np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a) for a in (pred, truth))
    boxes = [label_boxes(a) for a in (pred, truth)]
    present = {target: tuple(sorted({v for v in labels if any(v in b for b in boxes)}))
               for target, labels in targets.items()}
    by_labels = {}  # targets of the same labels present (regions of two BRATS conventions often are) measured once
    for labels in set(present.values()):
        found = [b[v] for b in boxes for v in labels if v in b]
        if not found:
            by_labels[labels] = 0.0
            continue
        box = tuple(slice(min(f[a].start for f in found), max(f[a].stop for f in found)) for a in range(3))
        by_labels[labels] = mask_hd95(np.isin(pred[box], labels), np.isin(truth[box], labels), spacing)
    return {target: by_labels[labels] for target, labels in present.items()}


def mask_hd95(pred_mask, true_mask, spacing):
    """95th-percentile Hausdorff distance (mm) between the surfaces of two boolean masks (see surface_hd95): 0 when
    both are empty, NaN when one is."""
    from scipy import ndimage

    has_pred, has_true = bool(pred_mask.any()), bool(true_mask.any())
    if not (has_pred or has_true):
        return 0.0
    if not (has_pred and has_true):
        return float("nan")
    surfaces = [m & ~ndimage.binary_erosion(m) for m in (pred_mask, true_mask)]
    spacing = [float(v) if v > 0 else 1.0 for v in spacing]  # (an undefined voxel size: a single slice's axis)
    directed = [ndimage.distance_transform_edt(~to, sampling=spacing)[fro] for fro, to in (surfaces, surfaces[::-1])]
    return float(max(np.percentile(d, 95) for d in directed))


def _candidate_regions(regions, case_values):
    """The region definitions a folder's evaluation may report, known from one case: the one asked for, or with
    'auto' both BRATS definitions where the case's labels lie within 0..4 (looks_like_brats decides on all cases)."""
    if regions == "auto":
        return ("brats", "brats2023") if set(case_values) <= {0, 1, 2, 3, 4} else ()
    return () if regions in (None, "none") else (regions,)


def summarize(per_case):
    """Mean of each (target, metric) over cases, skipping NaN: {target: {metric: mean}}."""
    targets = {t for case in per_case.values() for t in case}
    out = {}
    for t in sorted(targets, key=_target_order):
        out[t] = {}
        for m in _metrics_in(per_case):
            vals = [case[t][m] for case in per_case.values() if t in case and not math.isnan(case[t][m])]
            out[t][m] = float(np.mean(vals)) if vals else float("nan")
    return out


def _metrics_in(per_case):
    """The METRICS the cases hold (hd95 only where it was computed), in METRICS' order."""
    held = {m for case in per_case.values() for values in case.values() for m in values}
    return [m for m in METRICS if m in held]


def to_csv_text(per_case, mean):
    """One row per (case, target) plus 'mean' rows; columns case, target, dice, jaccard, sensitivity, ppv[, hd95]."""
    buf = io.StringIO()
    w = csv.writer(buf)
    metrics = _metrics_in(per_case)
    w.writerow(["case", "target", *metrics])
    for case, targets in list(per_case.items()) + [("mean", mean)]:
        for t in sorted(targets, key=_target_order):
            w.writerow([case, t, *(_fmt(targets[t][m]) for m in metrics)])
    return buf.getvalue()


def to_json_text(obj):
    """JSON with NaN written as null (strict JSON)."""
    return json.dumps(_nan_to_none(obj), indent=2) + "\n"


def _nan_to_none(obj):
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def _fmt(v):
    return "" if math.isnan(v) else f"{v:.6f}"


def _target_order(t):
    return (0, int(t.split("_")[1])) if t.startswith("class_") else (1, t)


# ---- folders of NIfTI label maps ------------------------------------------------------------------------------
def find_label_file(label_dir, name):
    """The ground truth for case `name` under `label_dir`: name.nii.gz, name_seg / name-seg (BRATS), in a
    case subfolder, or in labelsTr/. None when there is none."""
    from pathlib import Path

    from .data.nifti import find_nifti

    label_dir = Path(label_dir)
    for folder in (label_dir, label_dir / name, label_dir / "labelsTr"):
        for stem in (name, f"{name}_seg", f"{name}-seg"):
            p = find_nifti(folder, stem)
            if p is not None:
                return p
    return None


class GroundTruth:
    """Each case's ground-truth label file, from `source`: a folder of label maps (find_label_file; BRATS case
    folders and nnU-Net's labelsTr/ too), or a dataset that lists its cases' labels as train and predict read it: a
    CSV manifest, or a folder with dataset.json (its labels wherever the list puts them; its class count bounds the
    label values). A name the source does not list, or lists without a label, is an error naming both."""

    def __init__(self, source):
        from pathlib import Path

        from .data.datasets import discover
        from .data.nifti import Seg3DFastDataError, is_nifti_path

        self.source = Path(source)
        if not self.source.exists():
            raise Seg3DFastDataError(f"{self.source}: label folder or dataset not found")
        if self.source.is_file() and is_nifti_path(self.source):  # (discover read it as an image: 'has no label file')
            raise Seg3DFastDataError(f"{self.source}: one label map; expected the folder holding the label maps, a CSV "
                                     "manifest or a dataset folder with dataset.json")
        self.labels, self.num_classes = None, None  # (a folder of label maps lists no cases)
        if self.source.is_file() or (self.source / "dataset.json").is_file():
            dataset = discover(self.source)
            self.labels = {case.name: case.label for case in dataset.cases}
            self.num_classes = dataset.num_classes

    def file(self, name):
        from .data.nifti import Seg3DFastDataError

        if self.labels is None:
            path = find_label_file(self.source, name)
            if path is None:
                raise Seg3DFastDataError(f"{self.source}: no ground-truth label file for case {name} (expected "
                                         f"{name}.nii.gz, {name}_seg.nii.gz, {name}/ or labelsTr/; or pass the "
                                         "dataset's CSV manifest)")
            return path
        if name not in self.labels:
            raise Seg3DFastDataError(f"{self.source}: no case {name} in this dataset (its cases: "
                                     f"{', '.join(sorted(self.labels)[:5])}{', ...' if len(self.labels) > 5 else ''})")
        if self.labels[name] is None:
            raise Seg3DFastDataError(f"{self.source}: case {name} has no label file")
        return self.labels[name]

    def unpredicted(self, names):
        """The dataset's labelled cases not among `names` (none for a folder of label maps, which lists no cases)."""
        return sorted(n for n, label in (self.labels or {}).items() if label is not None and n not in names)


# More distinct values than a label map has (TotalSegmentator: 118; Schaefer's finest parcellation: 1001): an image
# found under the case's name (its label_counts table would have distinct^2 entries: 8 GB at 32 k values).
MAX_DISTINCT_LABELS = 2048


def _check_label_map(path, labels, case):
    """A label map with more distinct values than MAX_DISTINCT_LABELS (counted only where it could have them) is an
    error naming its file."""
    from .data.nifti import Seg3DFastDataError

    distinct = 0 if labels.max() < MAX_DISTINCT_LABELS else len(np.unique(labels))
    if distinct > MAX_DISTINCT_LABELS:
        raise Seg3DFastDataError(f"{path}: {distinct} distinct values, more than a label map has: an image rather "
                                 f"than case {case}'s labels? (pass the label folder, or the dataset's CSV manifest)")


def evaluate_folders(pred_dir, label_dir, regions="auto", hd95=True):
    """Compare every label map in pred_dir (probability maps skipped) with its ground truth in label_dir (a folder
    of label maps, or a dataset: GroundTruth).
    regions: 'auto' (BRATS regions when the labels look like BRATS), 'brats', 'brats2023' or 'none'; hd95: also
    each target's HD95 in mm (the NIfTI's voxel size).
    -> {"per_case", "mean", "classes", "regions", "mean_dice", "unpredicted": the dataset's labelled cases that
    pred_dir has no label map for}."""
    from pathlib import Path

    from .data.datasets import load_label
    from .data.nifti import Seg3DFastDataError, case_name, check_same_grid, is_nifti_path, voxel_sizes_mm

    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise Seg3DFastDataError(f"{pred_dir}: {'not a folder' if pred_dir.exists() else 'not found'}; expected the "
                                 "folder of predicted label maps")
    preds = sorted(p for p in pred_dir.iterdir() if is_nifti_path(p) and not p.name.startswith(".")
                   and not case_name(p).endswith("_probabilities"))
    if not preds:
        raise Seg3DFastDataError(f"{pred_dir}: no NIfTI label maps to evaluate")
    ground_truth = GroundTruth(label_dir)
    counts, hd = {}, {}  # per case: label_counts and HD95s, a few numbers; one case's maps in memory at a time
    for p in preds:
        truth_path = ground_truth.file(case_name(p))
        pred_img, pred = load_label(p, ground_truth.num_classes)
        truth_img, truth = load_label(truth_path, ground_truth.num_classes)
        check_same_grid(truth_path, truth_img, p, pred_img)
        _check_label_map(truth_path, truth, case_name(p))  # (before label_counts: its table has distinct^2 entries)
        _check_label_map(p, pred, case_name(p))
        counts[case_name(p)] = label_counts(pred, truth)
        if hd95:  # every label of the case, and the regions that may be reported (before all cases are seen)
            case_values = counts[case_name(p)][0].tolist()
            targets = {f"class_{v}": (v,) for v in case_values if v != 0}
            for definition in _candidate_regions(regions, case_values):
                targets.update({(definition, name): labels for name, labels in REGIONS[definition].items()})
            # (mm: the ground truth's voxel size in its header's unit; the affines were compared as numbers)
            hd[case_name(p)] = surface_hd95(pred, truth, voxel_sizes_mm(truth_img), targets)
        del pred, truth
    values = set()
    for case_values, _ in counts.values():
        values |= set(case_values.tolist())
    if regions == "auto":
        regions = looks_like_brats(values)
    elif regions == "none":
        regions = None
    classes = sorted(v for v in values if v != 0)
    # each case's HD95s of its classes and of the regions reported ((definition, region) keys: the candidates)
    chosen = {name: {(t[1] if isinstance(t, tuple) else t): v for t, v in values.items()
                     if not isinstance(t, tuple) or t[0] == regions} for name, values in hd.items()}
    per_case = {name: evaluate_counts(case_counts, classes, regions, chosen.get(name))
                for name, case_counts in counts.items()}
    mean = summarize(per_case)
    dices = [mean[f"class_{c}"]["dice"] for c in classes if not math.isnan(mean[f"class_{c}"]["dice"])]
    return {"per_case": per_case, "mean": mean, "classes": classes, "regions": regions,
            "mean_dice": float(np.mean(dices)) if dices else float("nan"),
            "unpredicted": ground_truth.unpredicted(per_case)}


def write_evaluation(result, out_dir):
    """evaluation.csv and evaluation.json in out_dir (written atomically)."""
    from .files import write_text_atomic

    write_text_atomic(f"{out_dir}/evaluation.csv", to_csv_text(result["per_case"], result["mean"]))
    write_text_atomic(f"{out_dir}/evaluation.json", to_json_text(result))
