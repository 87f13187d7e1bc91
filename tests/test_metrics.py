"""Dice / Jaccard / sensitivity / PPV / HD95, BRATS regions and folder evaluation, against counts and distances done
by hand."""
import csv
import importlib.util
import json
import math

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")  # (data_helpers reads NIfTI; the GPU machine may lack it: skip, not a collection error)
# HD95's distance transform: a dependency, but the GPU machine's install (--no-deps) may lack it
needs_scipy = pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="scipy (HD95) is not installed")

from seg3d_fast.data import Seg3DFastDataError
from seg3d_fast.metrics import (dice_per_class, evaluate_case, evaluate_counts, evaluate_folders, label_counts,
                                mean_foreground_dice, mean_foreground_dice_tensor,
                                looks_like_brats, scores, summarize, write_evaluation)
from data_helpers import TCGA_TUMOUR, brats_case, load, save


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("case", ["random", "no_foreground", "one_class", "label_dtypes", "slabs", "one_class_model"])
def test_training_dice_on_the_device_is_mean_foreground_dice(case, device):
    """mean_foreground_dice_tensor (training's per-step score, no host read: on a GPU under sync-debug "error")
    gives mean_foreground_dice's value, 0 and found = 0 where that is NaN, for label maps of any integer dtype, over
    slab boundaries, for a model of one class (no foreground)."""
    gen = torch.Generator().manual_seed(3)
    k = 6
    pred = torch.randint(0, k, (2, 5, 7, 3), generator=gen)
    truth = torch.randint(0, k, (2, 5, 7, 3), generator=gen)
    truth[truth == 3] = 0  # a class only in the prediction, and (below) one in neither map
    pred[pred == 5] = 1
    slab = 2**24
    if case == "no_foreground":
        pred, truth = torch.zeros_like(pred), torch.zeros_like(truth)
    elif case == "one_class":
        pred, truth = (pred == 2).long() * 2, (truth == 2).long() * 2
    elif case == "label_dtypes":
        pred, truth = pred.to(torch.uint8), truth.to(torch.int16)
    elif case == "slabs":
        slab = 17  # voxel-class pairs a slab: 3 voxels
    elif case == "one_class_model":
        k, pred, truth = 1, torch.zeros_like(pred), torch.zeros_like(truth)
    on_device = pred.to(device), truth.to(device)
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        result = mean_foreground_dice_tensor(*on_device, k, slab_elements=slab)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    dice, found = result.tolist()
    expected = mean_foreground_dice(pred, truth)
    if math.isnan(expected):
        assert (dice, found) == (0.0, 0.0)
    else:
        assert found == 1.0 and dice == pytest.approx(expected, rel=1e-12)


def test_training_dice_leaves_out_classes_absent_from_both_maps(tmp_path):
    """Training's and validation's score is the mean Dice over the foreground classes found in either map: a class
    in neither (BRATS's unused label 3, or a model with more classes than the labels) would score 1 and lift the
    mean with the class count; a case with no foreground anywhere is left out of validation's mean (None if all)."""
    from seg3d_fast.train import PreparedCase, validate

    truth = np.zeros((6, 5, 4), np.int64)
    truth[:3] = 1
    truth[0, 0, :2] = 4
    pred = truth.copy()
    pred[0, 0, :] = 2  # class 4 missed, class 2 predicted where none is
    expected = np.mean([_dice(pred == c, truth == c) for c in (1, 2, 4)])
    assert mean_foreground_dice(pred, truth) == pytest.approx(expected)
    assert mean_foreground_dice(pred, truth) < np.mean(dice_per_class(pred, truth, 5)[1:])  # (class 3 scored 1 there)
    assert math.isnan(mean_foreground_dice(np.zeros_like(truth), np.zeros_like(truth)))

    class Fixed(torch.nn.Module):  # logits of a fixed label map per case
        def __init__(self, maps):
            super().__init__()
            self.maps = iter(maps)

        def forward(self, x):
            return torch.nn.functional.one_hot(torch.from_numpy(next(self.maps)), 5).permute(3, 0, 1, 2)[None].float()

    empty = np.zeros_like(truth)
    cases = [PreparedCase(n, np.zeros((1, 6, 5, 4), np.float32), t.astype(np.uint8)) for n, t in (("a", truth),
                                                                                                  ("b", empty))]
    assert validate(Fixed([pred, empty]), cases, torch.device("cpu"), None, None) == pytest.approx(expected)
    assert validate(Fixed([empty, empty]), cases[1:] * 2, torch.device("cpu"), None, None) is None


def test_scores_from_counts():
    s = scores(tp=6, fp=2, fn=4)
    assert s["dice"] == pytest.approx(12 / 18)
    assert s["jaccard"] == pytest.approx(6 / 12)
    assert s["sensitivity"] == pytest.approx(6 / 10)
    assert s["ppv"] == pytest.approx(6 / 8)
    empty = scores(0, 0, 0)
    assert empty["dice"] == 1.0 and empty["jaccard"] == 1.0
    assert math.isnan(empty["sensitivity"]) and math.isnan(empty["ppv"])
    assert scores(0, 3, 0)["dice"] == 0.0 and math.isnan(scores(0, 3, 0)["sensitivity"])


def test_per_class_on_real_mask():
    _, tumour = load(TCGA_TUMOUR)
    truth = tumour.astype(np.int64)
    pred = np.roll(truth, 2, axis=0)  # the real mask shifted by 2 voxels
    tp = np.sum((pred == 1) & (truth == 1))
    expected = 2 * tp / (np.sum(pred == 1) + np.sum(truth == 1))
    d = dice_per_class(pred, truth, 2)
    assert d[1] == pytest.approx(expected) and 0 < d[1] < 1
    out = evaluate_case(pred, truth, classes=[1])
    assert out["class_1"]["jaccard"] == pytest.approx(expected / (2 - expected))


def test_brats_regions():
    truth = np.array([0, 1, 2, 4, 4, 2, 0, 1])
    pred = np.array([0, 1, 2, 2, 4, 0, 1, 4])
    out = evaluate_case(pred, truth, classes=[1, 2, 4], regions="brats")
    # whole {1,2,4}: truth 1,2,3,4,5,7; pred 1,2,3,4,6,7 -> tp 5
    assert out["whole"]["dice"] == pytest.approx(10 / 12)
    # core {1,3,4}: truth 1,3,4,7; pred 1,4,6,7 -> tp 3
    assert out["core"]["dice"] == pytest.approx(6 / 8)
    # enhancing {4}: truth 3,4; pred 4,7 -> tp 1
    assert out["enhancing"]["sensitivity"] == pytest.approx(0.5) and out["enhancing"]["ppv"] == pytest.approx(0.5)
    assert looks_like_brats({0, 1, 2, 4}) == "brats" and looks_like_brats({0, 1, 2}) is None
    assert looks_like_brats({0, 4, 7}) is None


def _dice(pred_mask, true_mask):
    """Dice of two boolean masks, written out (1 when both are empty)."""
    total = pred_mask.sum() + true_mask.sum()
    return 1.0 if total == 0 else 2 * (pred_mask & true_mask).sum() / total


@pytest.mark.parametrize("regions,labels", [("brats", (0, 1, 2, 3, 4)), ("brats2023", (0, 1, 2, 3))])
def test_region_dice_on_random_label_maps(regions, labels):
    """Every BRATS region of both label conventions (2015-2021: 3 is non-enhancing core, 4 enhancing; 2023+: 3 is
    enhancing) against Dice computed by hand on random label maps holding every label; the per-class Dice too."""
    rng = np.random.default_rng(7)
    truth = rng.choice(labels, size=(9, 7, 5))
    pred = np.where(rng.random(truth.shape) < 0.3, rng.choice(labels, size=truth.shape), truth)
    enhancing = 4 if regions == "brats" else 3
    spec = {"whole": [v for v in labels if v != 0], "core": [1, 3, 4] if regions == "brats" else [1, 3],
            "enhancing": [enhancing]}
    out = evaluate_case(pred, truth, classes=list(labels), regions=regions)
    for name, members in spec.items():
        assert out[name]["dice"] == pytest.approx(_dice(np.isin(pred, members), np.isin(truth, members))), name
    assert dice_per_class(pred, truth, len(labels)) == pytest.approx([_dice(pred == c, truth == c) for c in labels])


@pytest.mark.parametrize("kind", ["int64", "uint8", "uint16", "bool", "float", "large", "torch", "torch_uint16",
                                  "strided", "read_only"])
def test_label_counts(kind):
    """label_counts against counts done by hand: label maps of integer (uint16 as NIfTI label maps are often
    stored: torch has no min / max for it), boolean, float (a NIfTI read with get_fdata) and torch types, label
    values past the direct counting range (FreeSurfer-style 2035, 12175), non-contiguous and read-only maps, more
    voxels than one slab; every class and region score taken from them equals the one computed from masks."""
    rng = np.random.default_rng(5)
    labels = np.array([0, 1] if kind == "bool" else [0, 1, 2, 4, 7])
    if kind == "large":
        labels = np.array([0, 2035, 12175, 2**20 + 3])
    truth = rng.choice(labels, size=(11, 9, 7))
    pred = np.where(rng.random(truth.shape) < 0.3, rng.choice(labels[:-1], size=truth.shape), truth)
    pred_in, truth_in = pred, truth
    if kind in ("uint8", "uint16", "bool", "float"):
        dtype = {"uint8": np.uint8, "uint16": np.uint16, "bool": bool, "float": np.float64}[kind]
        pred_in, truth_in = pred.astype(dtype), truth.astype(dtype)
    elif kind.startswith("torch"):
        dtype = torch.uint16 if kind == "torch_uint16" else torch.int64
        pred_in, truth_in = torch.from_numpy(pred).to(dtype), torch.from_numpy(truth).to(dtype)
    elif kind == "read_only":
        pred_in, truth_in = pred.copy(), truth.copy()
        pred_in.flags.writeable = truth_in.flags.writeable = False
    elif kind == "strided":
        pred, truth = pred.transpose(2, 0, 1)[::-1], truth.transpose(2, 0, 1)[::-1]
        pred_in, truth_in = pred, truth
    values, counts = label_counts(pred_in, truth_in, slab_voxels=100)
    np.testing.assert_array_equal(values, labels)
    for i, p in enumerate(labels):
        for j, t in enumerate(labels):
            assert counts[i, j] == np.sum((pred == p) & (truth == t))
    out = evaluate_counts((values, counts), classes=labels, regions="brats")
    for c in labels:
        assert out[f"class_{c}"]["dice"] == pytest.approx(_dice(pred == c, truth == c))
    whole = np.isin(pred, [1, 2, 3, 4]), np.isin(truth, [1, 2, 3, 4])
    assert out["whole"]["dice"] == pytest.approx(_dice(*whole))
    assert label_counts(np.zeros(0, np.int64), np.zeros(0, np.int64))[1].shape == (0, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: label_counts counting on the device")
@pytest.mark.parametrize("large", [False, True])
def test_label_counts_on_the_gpu(large):
    """Label maps on the GPU (training's per-step Dice) are counted there, also with the other map on the host: the
    same table as on the CPU."""
    gen = torch.Generator().manual_seed(2)
    labels = torch.tensor([0, 3, 5000] if large else [0, 1, 2, 3])
    truth = labels[torch.randint(len(labels), (2, 37, 29, 19), generator=gen)]
    pred = torch.where(torch.rand(truth.shape, generator=gen) < 0.2, labels[torch.randint(len(labels), truth.shape,
                                                                                          generator=gen)], truth)
    expected = label_counts(pred, truth, slab_voxels=1000)
    got = label_counts(pred.cuda(), truth.cuda(), slab_voxels=1000)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert dice_per_class(pred.cuda(), truth.cuda(), 4) == dice_per_class(pred, truth, 4)
    for mixed in ((pred.cuda(), truth.numpy()), (pred, truth.cuda())):  # (validation: a prediction on the GPU, the
        np.testing.assert_array_equal(label_counts(*mixed)[1], expected[1])  # label map on the host)


def _surface(mask):
    """The voxels of a mask with a 6-neighbour outside it (the volume's outside counts as outside), by hand."""
    padded = np.pad(mask, 1)
    inner = np.ones_like(mask)
    for axis in range(3):
        for shift in (-1, 1):
            inner &= np.roll(padded, shift, axis)[1:-1, 1:-1, 1:-1]
    return mask & ~inner


def _hd95_by_hand(pred_mask, true_mask, spacing):
    """HD95 written out: all pairwise distances between the two surfaces, each direction's 95th percentile."""
    a, b = (np.argwhere(_surface(m)) * np.asarray(spacing, float) for m in (pred_mask, true_mask))
    d = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


@needs_scipy
def test_hd95_against_pairwise_surface_distances():
    """HD95 (scipy's distance transform within each target's bounding box) against all pairwise distances between
    the two surfaces: random blobs of several labels in odd volumes, anisotropic voxels, masks touching the volume's
    faces, regions of several labels; 0 when both masks are empty, NaN when one is."""
    rng = np.random.default_rng(11)
    for trial in range(12):
        shape = tuple(int(n) for n in rng.integers(6, 15, 3))
        grid = np.ogrid[tuple(slice(0, n) for n in shape)]
        truth = np.zeros(shape, np.int64)
        for label in (1, 2, 4):
            centre, radius = rng.uniform(0, 1, 3) * shape, rng.uniform(1.5, 5, 3)
            truth[sum(((g - m) / r) ** 2 for g, m, r in zip(grid, centre, radius)) <= 1] = label
        pred = np.where(rng.random(shape) < 0.1, rng.choice([0, 1, 2, 4], size=shape), np.roll(truth, 1, trial % 3))
        spacing = tuple(rng.choice([0.5, 1.0, 2.5], 3))
        out = evaluate_case(pred, truth, classes=[1, 2, 4], regions="brats", spacing=spacing)
        for target, labels in (("class_1", [1]), ("class_2", [2]), ("class_4", [4]), ("whole", [1, 2, 3, 4]),
                               ("core", [1, 3, 4])):
            pm, tm = np.isin(pred, labels), np.isin(truth, labels)
            if pm.any() and tm.any():
                assert out[target]["hd95"] == pytest.approx(_hd95_by_hand(pm, tm, spacing)), (trial, target)
    empty = np.zeros((5, 6, 7), np.int64)
    one = empty.copy()
    one[2, 3, 4] = 1
    assert evaluate_case(empty, empty, classes=[1], spacing=(1, 1, 1))["class_1"]["hd95"] == 0.0
    assert math.isnan(evaluate_case(one, empty, classes=[1], spacing=(1, 1, 1))["class_1"]["hd95"])
    assert "hd95" not in evaluate_case(one, one, classes=[1])["class_1"]  # (no voxel size given)


@needs_scipy
def test_hd95_is_in_mm_whatever_the_header_s_spatial_unit(tmp_path):
    """HD95 is reported in mm: a volume whose header gives its voxel size in microns (microscopy, preclinical) or
    meters (xyzt_units) is converted; it was reported in the file's own unit (a 1000x error for microns). The same
    masks written in mm, microns and meters score the same HD95, and by hand."""
    img, tumour = load(TCGA_TUMOUR)
    pred = np.roll(tumour, 2, axis=0)
    spacing_mm = nib.affines.voxel_sizes(img.affine)
    expected = _hd95_by_hand(pred > 0, tumour > 0, spacing_mm)
    assert expected > 0
    for unit, per_mm in (("mm", 1.0), ("micron", 1000.0), ("meter", 1e-3), ("unknown", 1.0)):
        folder = tmp_path / unit
        (folder / "pred").mkdir(parents=True)
        (folder / "labels").mkdir()
        affine = img.affine.copy()
        affine[:3] *= per_mm
        for data, path in ((pred, folder / "pred" / "c.nii.gz"), (tumour, folder / "labels" / "c.nii.gz")):
            out = nib.Nifti1Image(data.astype(np.uint8), affine)
            out.header.set_xyzt_units(unit, "sec")
            nib.save(out, str(path))
        hd95 = evaluate_folders(folder / "pred", folder / "labels")["per_case"]["c"]["class_1"]["hd95"]
        assert hd95 == pytest.approx(expected, rel=1e-5), unit


@needs_scipy
def test_evaluate_folders_holds_one_case_at_a_time(tmp_path, monkeypatch):
    """A folder of many large volumes must not be loaded whole: each case's label maps are freed before the next
    case's are read."""
    import weakref

    from seg3d_fast.data import datasets

    img, tumour = load(TCGA_TUMOUR)
    (tmp_path / "pred").mkdir()
    (tmp_path / "labels").mkdir()
    for i in range(3):
        save(np.roll(tumour, i, axis=0), img.affine, tmp_path / "pred" / f"c{i}.nii.gz")
        save(tumour, img.affine, tmp_path / "labels" / f"c{i}.nii.gz")
    loaded = []
    load_label = datasets.load_label

    def tracked(path, *args, **kwargs):
        assert sum(ref() is not None for ref in loaded) <= 1, "an earlier case's label maps are still alive"
        image, labels = load_label(path, *args, **kwargs)
        loaded.append(weakref.ref(labels))
        return image, labels

    monkeypatch.setattr(datasets, "load_label", tracked)
    result = evaluate_folders(tmp_path / "pred", tmp_path / "labels")
    assert len(loaded) == 6 and result["per_case"]["c0"]["class_1"]["dice"] == 1.0
    assert 0 < result["per_case"]["c2"]["class_1"]["dice"] < 1


def test_evaluate_against_a_dataset_as_train_reads_it(tmp_path):
    """The ground truth can be the dataset itself: a CSV manifest (labels named as the user likes, images beside
    them) or a dataset.json folder, matched by case name as predict names its outputs; a case it does not list, or
    lists without a label, is an error naming it, a labelled case without a prediction is listed, and labels beyond
    dataset.json's classes are an error. A map with more distinct values than a label map has (an image found under
    the case's name in a plain folder) is refused before its counts' table is made."""
    img, tumour = load(TCGA_TUMOUR)
    data, pred = tmp_path / "data", tmp_path / "pred"
    data.mkdir()
    pred.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        save(rng.normal(size=tumour.shape).astype(np.float32), img.affine, data / f"c{i}_image.nii.gz")
        save(np.roll(tumour, i, axis=1), img.affine, data / f"c{i}_label.nii.gz")
        save(np.roll(tumour, 2 * i, axis=1), img.affine, pred / f"c{i}.nii.gz")
    (data / "train.csv").write_text("name,image,label\nc0,c0_image.nii.gz,c0_label.nii.gz\n"
                                    "c1,c1_image.nii.gz,c1_label.nii.gz\n")
    result = evaluate_folders(pred, data / "train.csv", hd95=False)
    assert result["per_case"]["c0"]["class_1"]["dice"] == 1.0 and result["unpredicted"] == []
    expected = evaluate_case(np.roll(tumour, 2, axis=1), np.roll(tumour, 1, axis=1), classes=[1])
    assert result["per_case"]["c1"]["class_1"]["dice"] == pytest.approx(expected["class_1"]["dice"])
    assert expected["class_1"]["dice"] < 1
    (data / "imagesTr").mkdir()  # MSD: the 'training' list says where each label is
    (data / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "tumour"}, "training": [
        {"image": f"./c{i}_image.nii.gz", "label": f"./c{i}_label.nii.gz"} for i in range(2)]}))
    with pytest.raises(Seg3DFastDataError, match="no case c0 in this dataset .its cases: c0_image, c1_image"):
        evaluate_folders(pred, data, hd95=False)  # (MSD names cases by their image files)
    for i in range(2):
        (pred / f"c{i}.nii.gz").rename(pred / f"c{i}_image.nii.gz")
    assert evaluate_folders(pred, data, hd95=False)["per_case"]["c0_image"]["class_1"]["dice"] == 1.0
    (pred / "c1_image.nii.gz").rename(tmp_path / "c1_image.nii.gz")  # a case without a prediction: listed
    result = evaluate_folders(pred, data, hd95=False)
    assert list(result["per_case"]) == ["c0_image"] and result["unpredicted"] == ["c1_image"]
    beyond = np.roll(tumour, 0, axis=1)
    beyond[0, 0, 0] = 7  # dataset.json's 2 classes bound the label values
    save(beyond, img.affine, tmp_path / "pred" / "c1_image.nii.gz")
    with pytest.raises(Seg3DFastDataError, match="c1_image.nii.gz: label 7 outside the class range 0..1"):
        evaluate_folders(pred, data, hd95=False)
    (pred / "c1_image.nii.gz").unlink()
    (data / "train.csv").write_text("name,image,label\nc0_image,c0_image.nii.gz,\nc1_image,c1_image.nii.gz,\n")
    with pytest.raises(Seg3DFastDataError, match="train.csv: case c0_image has no label file"):
        evaluate_folders(pred, data / "train.csv", hd95=False)
    (data / "dataset.json").unlink()  # a plain folder: c0_image.nii.gz is found, and it is the image
    save((rng.random(tumour.shape) * 5000).astype(np.int16), img.affine, data / "c0_image.nii.gz")
    with pytest.raises(Seg3DFastDataError, match=r"c0_image.nii.gz: \d+ distinct values, more than a label map has"):
        evaluate_folders(pred, data, hd95=False)


def test_evaluate_case_refuses_maps_of_other_shapes():
    """Maps whose shapes numpy would broadcast (a single slice against a volume) are an error, not a comparison."""
    truth = np.random.default_rng(1).integers(0, 3, size=(6, 5, 4))
    for pred in (truth[..., :1], truth[None]):
        with pytest.raises(ValueError, match="prediction shape .* differs from label shape"):
            evaluate_case(pred, truth, classes=[1, 2])


def test_summarize_skips_nan_per_metric():
    """Means over cases: a NaN (PPV of a class predicted nowhere) is left out of its own mean only."""
    rng = np.random.default_rng(3)
    cases = {}
    for name in ("a", "b", "c"):
        truth = rng.integers(0, 3, size=(6, 5, 4))
        pred = np.where(rng.random(truth.shape) < 0.4, rng.integers(0, 3, size=truth.shape), truth)
        if name == "b":
            pred[pred == 2] = 1  # class 2 predicted nowhere: PPV NaN, Dice 0
        cases[name] = evaluate_case(pred, truth, classes=[1, 2])
    mean = summarize(cases)
    assert math.isnan(cases["b"]["class_2"]["ppv"]) and cases["b"]["class_2"]["dice"] == 0.0
    for metric in ("dice", "jaccard", "sensitivity"):
        assert mean["class_2"][metric] == pytest.approx(np.mean([c["class_2"][metric] for c in cases.values()]))
    assert mean["class_2"]["ppv"] == pytest.approx((cases["a"]["class_2"]["ppv"] + cases["c"]["class_2"]["ppv"]) / 2)


@needs_scipy
def test_evaluate_folders_brats(tmp_path):
    brats_case(tmp_path / "labels", "case_a")
    img, seg = load(tmp_path / "labels" / "case_a" / "case_a_seg.nii.gz")
    pred = seg.copy()
    pred[pred == 1] = 4  # necrosis predicted as enhancing: whole stays perfect, core too, enhancing does not
    (tmp_path / "pred").mkdir()
    save(pred, img.affine, tmp_path / "pred" / "case_a.nii.gz")
    save(np.zeros(seg.shape + (3,), np.float32), img.affine, tmp_path / "pred" / "case_a_probabilities.nii.gz")
    result = evaluate_folders(tmp_path / "pred", tmp_path / "labels")
    assert result["regions"] == "brats" and result["classes"] == [1, 2, 4]
    m = result["mean"]
    assert m["whole"]["dice"] == 1.0 and m["core"]["dice"] == 1.0 and m["class_2"]["dice"] == 1.0
    n1, n4 = np.sum(seg == 1), np.sum(seg == 4)
    assert m["enhancing"]["ppv"] == pytest.approx(n4 / (n1 + n4))
    assert m["class_1"]["dice"] == 0.0 and math.isnan(m["class_1"]["ppv"])
    # HD95 (mm): whole, core and class 2 are perfect; class 1 is predicted nowhere (undefined)
    assert m["whole"]["hd95"] == m["core"]["hd95"] == m["class_2"]["hd95"] == 0.0 and math.isnan(m["class_1"]["hd95"])
    assert math.isfinite(m["enhancing"]["hd95"])
    assert result["mean_dice"] == pytest.approx(np.mean([m[f"class_{c}"]["dice"] for c in (1, 2, 4)]))
    write_evaluation(result, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert data["mean"]["class_1"]["ppv"] is None  # NaN written as null
    rows = list(csv.DictReader(open(tmp_path / "out" / "evaluation.csv")))
    assert "hd95" in rows[0]
    assert {(r["case"], r["target"]) for r in rows} >= {("case_a", "whole"), ("mean", "enhancing")}


def test_evaluate_folders_errors(tmp_path):
    (tmp_path / "pred").mkdir()
    with pytest.raises(Seg3DFastDataError, match="no NIfTI label maps"):
        evaluate_folders(tmp_path / "pred", tmp_path)
    img, tumour = load(TCGA_TUMOUR)
    save(tumour, img.affine, tmp_path / "pred" / "x.nii.gz")
    with pytest.raises(Seg3DFastDataError, match="labels: label folder or dataset not found"):
        evaluate_folders(tmp_path / "pred", tmp_path / "labels")
    # a label map or a prediction passed for a folder is named as such (it was 'case x has no label file' for the
    # label map, read as a dataset's image, and 'prediction folder not found' for the prediction)
    with pytest.raises(Seg3DFastDataError, match="x.nii.gz: one label map; expected the folder holding the label maps"):
        evaluate_folders(tmp_path / "pred", tmp_path / "pred" / "x.nii.gz")
    with pytest.raises(Seg3DFastDataError, match="x.nii.gz: not a folder; expected the folder of predicted label maps"):
        evaluate_folders(tmp_path / "pred" / "x.nii.gz", tmp_path / "pred")
    (tmp_path / "labels").mkdir()
    with pytest.raises(Seg3DFastDataError, match="labels: no ground-truth label file for case x"):
        evaluate_folders(tmp_path / "pred", tmp_path / "labels")
    save(tumour[:, :, :-1], img.affine, tmp_path / "labels" / "x.nii.gz")
    with pytest.raises(Seg3DFastDataError, match="x.nii.gz: grid mismatch"):
        evaluate_folders(tmp_path / "pred", tmp_path / "labels")
