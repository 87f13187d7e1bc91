"""Training on small blocks of the real brain sample: outputs, exact resume, k-fold splits, AMP, augmentation."""
import csv
import itertools
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch

from seg3d_fast.data import Seg3DFastDataError
from seg3d_fast.data import discover
from seg3d_fast.predict import load_models
from seg3d_fast.train import (FOREGROUND_PER_CLASS, TrainConfig, augment, augment_intensity, foreground_sample,
                              make_splits, prepare, random_crop, train)
from data_helpers import TCGA_T1, TCGA_TUMOUR, brain_block, brain_csv, load, save

TINY = dict(features=(4, 8), crop=(16, 16, 16), samples_per_epoch=2, lr=3e-3, progress=False)


def test_outputs_and_kfold(tmp_path):
    manifest = brain_csv(tmp_path / "data", n_cases=3)
    run = tmp_path / "run"
    train(TrainConfig(data=str(manifest), out=str(run), epochs=2, folds=3, fold=1, **TINY))
    config = json.loads((run / "config.json").read_text())
    assert config["num_classes"] == 4 and config["model"]["in_channels"] == 1
    assert config["model"]["features"] == [4, 8]
    splits = json.loads((run / "splits.json").read_text())
    vals = [s["val"] for s in splits["splits"]]
    assert sorted(sum(vals, [])) == ["case0", "case1", "case2"] and all(len(v) == 1 for v in vals)
    for s in splits["splits"]:
        assert not set(s["train"]) & set(s["val"])
    fold = run / "fold_1"
    rows = list(csv.DictReader(open(fold / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(0 <= float(r["val_dice"]) <= 1 and np.isfinite(float(r["train_loss"])) for r in rows)
    assert json.loads((fold / "metrics.json").read_text())[1]["epoch"] == 2
    assert (fold / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(fold / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and set(ckpt) >= {"model", "optimizer", "rng", "history", "config"}
    assert not [p for p in fold.iterdir() if p.name.startswith(".")]  # no temporary files left
    # a second fold reuses the saved split
    train(TrainConfig(data=str(manifest), out=str(run), epochs=1, folds=3, fold=0, **TINY))
    assert json.loads((run / "splits.json").read_text())["splits"] == splits["splits"]


def test_resume_is_exact(tmp_path):
    manifest = brain_csv(tmp_path / "data", n_cases=2)
    straight = train(TrainConfig(data=str(manifest), out=str(tmp_path / "a"), epochs=2, **TINY))
    train(TrainConfig(data=str(manifest), out=str(tmp_path / "b"), epochs=1, **TINY))
    # what the write of a run killed by kill -9 leaves: removed by the resumed run
    from seg3d_fast.files import _owner
    stale = tmp_path / "b" / "fold_0" / f".checkpoint.pt.{_owner(2 ** 22 + 1)}.x1y2z3w4.pt"  # (above pid_max)
    stale.write_bytes(b"part of a checkpoint")
    resumed = train(TrainConfig(data=str(manifest), out=str(tmp_path / "b"), epochs=2, resume=True, **TINY))
    assert not stale.exists()
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    ha = torch.load(tmp_path / "a" / "fold_0" / "checkpoint.pt", weights_only=True)["history"]
    hb = torch.load(tmp_path / "b" / "fold_0" / "checkpoint.pt", weights_only=True)["history"]
    assert [r["train_loss"] for r in ha] == pytest.approx([r["train_loss"] for r in hb], abs=1e-6)
    # and training changed the weights at all
    fresh = train(TrainConfig(data=str(manifest), out=str(tmp_path / "c"), epochs=0, **TINY))
    assert any((fresh.state_dict()[k] - a[k]).abs().max() > 1e-4 for k in a)


def test_resume_with_other_training_settings_says_so(tmp_path, capsys):
    """A resume that changes what the remaining epochs draw or step (lr, crop, batch size, ...) is allowed but no
    longer continues the run exactly: it says which settings changed. A longer --epochs alone is silent."""
    manifest = brain_csv(tmp_path / "data", n_cases=1)
    cfg = dict(data=str(manifest), out=str(tmp_path / "r"), **dict(TINY, samples_per_epoch=1))
    train(TrainConfig(epochs=1, **cfg))
    train(TrainConfig(epochs=2, resume=True, **cfg))
    assert "training settings" not in capsys.readouterr().err
    train(TrainConfig(epochs=3, resume=True, **dict(cfg, lr=1e-3, crop=(8, 8, 8))))
    err = capsys.readouterr().err
    assert "resuming with training settings other than the checkpoint's" in err
    assert "--crop [16, 16, 16] -> [8, 8, 8]" in err and "--lr 0.003 -> 0.001" in err
    # another number of processes (torchrun): each draws its own batch, so a step's batch changes with it
    from seg3d_fast.train import _changed_training_settings

    saved = torch.load(tmp_path / "r" / "fold_0" / "checkpoint.pt", weights_only=True)["train_config"]
    assert saved["processes"] == 1
    resumed = TrainConfig(epochs=3, resume=True, **dict(cfg, lr=1e-3, crop=(8, 8, 8)))
    assert _changed_training_settings(saved, resumed, 1) == ""
    assert _changed_training_settings(saved, resumed, 2) == "processes 1 -> 2 (a step's batch 1 -> 2)"


def test_resume_takes_the_optimizer_state_not_its_settings_from_the_checkpoint(tmp_path, capsys):
    """Adam's load_state_dict also restores each parameter group's settings: a resume with another weight_decay said
    it went on with the new one (and recorded it in train_config) but trained with the checkpoint's, and a
    checkpoint's `fused` (True where it was written on a GPU) outlived a move to another device. The moments and
    step counts come from the checkpoint, the settings from this run."""
    manifest = brain_csv(tmp_path / "data", n_cases=1)
    cfg = dict(data=str(manifest), out=str(tmp_path / "r"), device="cpu", **TINY)
    train(TrainConfig(epochs=1, **cfg))
    path = tmp_path / "r" / "fold_0" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    for group in state["optimizer"]["param_groups"]:
        group["fused"] = True  # (as a GPU run writes it)
    torch.save(state, path)
    train(TrainConfig(epochs=2, resume=True, weight_decay=0.1, **cfg))
    assert "--weight-decay 0.0 -> 0.1" in capsys.readouterr().err
    resumed = torch.load(path, weights_only=True)
    assert [(g["weight_decay"], g["fused"]) for g in resumed["optimizer"]["param_groups"]] == [(0.1, False)]
    assert all(s["step"] == 2 * TINY["samples_per_epoch"] for s in resumed["optimizer"]["state"].values())


def test_diverged_training_keeps_the_last_good_checkpoint(tmp_path):
    """An epoch that leaves the weights NaN or infinite (a far too large learning rate) stops the run with a
    one-line error and does not replace the checkpoint of the epoch before."""
    manifest = brain_csv(tmp_path / "data", n_cases=1)
    cfg = dict(data=str(manifest), out=str(tmp_path / "r"), **TINY)
    with pytest.raises(Seg3DFastDataError, match="diverged in epoch 1 .*no checkpoint was written"):
        train(TrainConfig(epochs=1, **dict(cfg, lr=1e30)))
    assert not (tmp_path / "r" / "fold_0" / "checkpoint.pt").exists()
    train(TrainConfig(epochs=1, overwrite=True, **cfg))
    before = (tmp_path / "r" / "fold_0" / "checkpoint.pt").read_bytes()
    with pytest.raises(Seg3DFastDataError, match="diverged in epoch 2 .*checkpoint.pt keeps epoch 1; lower --lr"):
        train(TrainConfig(epochs=2, resume=True, **dict(cfg, lr=1e30)))
    assert (tmp_path / "r" / "fold_0" / "checkpoint.pt").read_bytes() == before


def test_num_classes_against_dataset_json_and_the_split_seed(tmp_path):
    """--num-classes that differs from dataset.json's labels is an error before anything is written (a larger one
    had trained a model whose predictions evaluate then refused); a resume with another --seed keeps the split and
    the seed that made it in splits.json."""
    root = tmp_path / "nnunet"
    for i in range(2):
        image, label = brain_block(root / "raw", f"case{i}", (slice(22 + 6 * i, 42 + 6 * i), slice(30, 50),
                                                               slice(28, 44)))
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        (root / "labelsTr").mkdir(exist_ok=True)
        image.rename(root / "imagesTr" / f"case{i}_0000.nii.gz")
        label.rename(root / "labelsTr" / f"case{i}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "CSF": 1, "GM": 2, "WM": 3},
                                                   "channel_names": {"0": "T1"}}))
    cfg = dict(data=str(root), out=str(tmp_path / "r"), folds=2, **TINY)
    with pytest.raises(Seg3DFastDataError, match="--num-classes 6 differs from the 4 classes"):
        train(TrainConfig(epochs=1, num_classes=6, **cfg))
    assert not (tmp_path / "r").exists()
    train(TrainConfig(epochs=1, num_classes=4, **cfg))
    split = json.loads((tmp_path / "r" / "splits.json").read_text())
    train(TrainConfig(epochs=2, resume=True, **dict(cfg, seed=5)))
    assert json.loads((tmp_path / "r" / "splits.json").read_text()) == split and split["seed"] == 0


def test_a_stray_label_value_is_warned_about(tmp_path, capsys):
    """Without dataset.json or --num-classes the class count is the largest label + 1: one stray voxel of 100 makes a
    101-class model, which training says (the labels' values that occur, and what to do)."""
    image, label = brain_block(tmp_path / "d")
    img, lab = load(label)
    lab = lab.astype(np.int16)
    lab[0, 0, 0] = 100
    save(lab, img.affine, label)
    (tmp_path / "d" / "m.csv").write_text(f"image,label\n{image},{label}\n")
    train(TrainConfig(data=str(tmp_path / "d" / "m.csv"), out=str(tmp_path / "r"), epochs=1, **TINY))
    err = capsys.readouterr().err
    assert "the labels reach 100 but only 5 values occur (e.g. [0, 1, 2, 3, 100])" in err and "remap the labels to 0..4 for a model of 5" in err
    train(TrainConfig(data=str(tmp_path / "d" / "m.csv"), out=str(tmp_path / "r2"), epochs=1, num_classes=101, **TINY))
    assert "labels reach" not in capsys.readouterr().err


def test_clip_run_trains_more_folds_and_resumes(tmp_path):
    """--clip (CT) is saved in config.json as a JSON list: a second fold and --resume must not see it as a different
    preprocessing (a tuple compared with the list read back)."""
    manifest = brain_csv(tmp_path / "data", n_cases=2)
    cfg = dict(data=str(manifest), out=str(tmp_path / "run"), folds=2, clip=(0.0, 500.0),
               **dict(TINY, samples_per_epoch=1))
    train(TrainConfig(epochs=1, fold=0, **cfg))
    train(TrainConfig(epochs=1, fold=1, **cfg))
    train(TrainConfig(epochs=2, fold=0, resume=True, **cfg))
    assert torch.load(tmp_path / "run" / "fold_0" / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert json.loads((tmp_path / "run" / "config.json").read_text())["preprocess"]["clip"] == [0.0, 500.0]


def test_resume_without_checkpoint(tmp_path):
    manifest = brain_csv(tmp_path / "data", n_cases=1)
    with pytest.raises(Seg3DFastDataError, match="no checkpoint to resume from"):
        train(TrainConfig(data=str(manifest), out=str(tmp_path / "r"), epochs=1, resume=True, **TINY))


def test_a_run_is_never_overwritten_silently(tmp_path):
    """Training into a fold that has a checkpoint needs --resume (continue) or --overwrite (start again); a
    corrupt checkpoint is a clear error; a split or model that differs from the run's is an error while checkpoints
    trained with the old one remain, and is replaced when none do; files get the usual mode (umask)."""
    import os

    manifest = brain_csv(tmp_path / "data", n_cases=3)
    run = tmp_path / "run"
    cfg = dict(data=str(manifest), out=str(run), folds=3, **TINY)
    train(TrainConfig(epochs=1, **cfg))
    ckpt = run / "fold_0" / "checkpoint.pt"
    with pytest.raises(Seg3DFastDataError, match="pass --resume to continue it or --overwrite"):
        train(TrainConfig(epochs=2, **cfg))
    with pytest.raises(Seg3DFastDataError, match="pass one"):
        train(TrainConfig(epochs=2, resume=True, overwrite=True, **cfg))
    train(TrainConfig(epochs=2, overwrite=True, **cfg))
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    mask = os.umask(0o022)
    os.umask(mask)
    for path in (ckpt, run / "config.json", run / "splits.json", run / "fold_0" / "metrics.csv"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path

    # one more case: a new split would move fold 0's validation case into training
    more = brain_csv(tmp_path / "more", n_cases=4)
    with pytest.raises(Seg3DFastDataError, match="splits.json: the run's split .* does not match"):
        train(TrainConfig(epochs=1, **dict(cfg, data=str(more), fold=1)))
    # (the fields that differ named, not both models' settings whole)
    with pytest.raises(Seg3DFastDataError, match=r"fold_0/checkpoint.pt: trained with a different model \(checkpoint "
                                                 r"-> this run: features \[\d+, \d+\] -> \[2, 4\]\);"):
        train(TrainConfig(epochs=1, **dict(cfg, fold=1, features=(2, 4))))
    # an --overwrite with other settings that stops before its first checkpoint has rewritten config.json only:
    # the fold's old checkpoint still resumes with its own settings, and predict refuses the mismatch meanwhile
    before = ckpt.read_bytes()
    with pytest.raises(Seg3DFastDataError, match="diverged"):
        train(TrainConfig(epochs=1, overwrite=True, **dict(cfg, downsample=2.0, lr=1e30)))
    assert ckpt.read_bytes() == before and json.loads((run / "config.json").read_text())["preprocess"]["downsample"] == 2
    with pytest.raises(Seg3DFastDataError, match="checkpoint.pt: trained with another preprocess than"):
        load_models(run, torch.device("cpu"))
    train(TrainConfig(epochs=3, resume=True, **cfg))
    assert json.loads((run / "config.json").read_text())["preprocess"]["downsample"] == 1
    assert len(load_models(run, torch.device("cpu"), ensemble=True)[1]) == 1

    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(Seg3DFastDataError, match="checkpoint.pt: cannot read the checkpoint"):
        train(TrainConfig(epochs=3, resume=True, **cfg))
    ckpt.unlink()  # no checkpoint left: the run's split and model may change
    train(TrainConfig(epochs=1, **dict(cfg, data=str(more), features=(2, 4))))
    assert len(json.loads((run / "splits.json").read_text())["cases"]) == 4


def test_corrupt_run_files_are_named(tmp_path):
    """A damaged config.json or splits.json in the run folder: one error naming the file, not a JSON traceback."""
    manifest = brain_csv(tmp_path / "data", n_cases=1)
    run = tmp_path / "run"
    cfg = dict(data=str(manifest), out=str(run), **dict(TINY, samples_per_epoch=1))
    train(TrainConfig(epochs=1, **cfg))
    for name, damage in (("splits.json", '{"folds": 1, "cases": ["case0"'), ("splits.json", "[1, 2]"),
                         ("splits.json", '{"folds": 1, "cases": ["case0"], "splits": 7}'),
                         ("splits.json", '{"folds": 1, "cases": ["case0"], "splits": [{"train": ["zz"], "val": []}]}'),
                         ("splits.json", '{"folds": 1, "cases": ["case0"], "splits": [["case0"]]}'),
                         ("config.json", "\x00\x00\x00")):
        good = (run / name).read_text()
        (run / name).write_text(damage)
        with pytest.raises(Seg3DFastDataError, match=f"{name}: (not valid JSON|expected a JSON object|no list)"):
            train(TrainConfig(epochs=2, resume=True, **cfg))
        (run / name).write_text(good)
    train(TrainConfig(epochs=2, resume=True, **cfg))


def test_bf16_autocast_on_cpu(tmp_path):
    manifest = brain_csv(tmp_path / "data", n_cases=1)
    train(TrainConfig(data=str(manifest), out=str(tmp_path / "r"), epochs=1, amp="bf16", **TINY))
    row = json.loads((tmp_path / "r" / "fold_0" / "metrics.json").read_text())[0]
    assert np.isfinite(row["train_loss"]) and 0 < row["train_loss"] <= 1


def test_splits():
    names = [f"c{i}" for i in range(7)]
    splits = make_splits(names, 5, seed=3)
    assert sorted(sum((s["val"] for s in splits), [])) == sorted(names)
    assert make_splits(names, 5, seed=3) == splits
    assert make_splits(names, 1, seed=0) == [{"train": sorted(names), "val": []}]
    with pytest.raises(Seg3DFastDataError, match="cannot make 5 folds from 3"):
        make_splits(names[:3], 5, 0)


def test_augment_and_crop_keep_image_and_label_aligned():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, (12, 12, 9))
    x = np.stack([y.astype(np.float32), -y.astype(np.float32)])
    seen = set()
    for seed in range(12):
        r = np.random.default_rng(seed)
        xa, ya = augment(*random_crop(x, y, (10, 10, 9), r), r, (1.0, 1.0, 2.0))
        assert ya.shape == (10, 10, 9)
        np.testing.assert_array_equal(xa[0], ya)
        np.testing.assert_array_equal(xa[1], -ya)
        seen.add(ya.tobytes())
    assert len(seen) > 6  # crops and augmentations actually vary
    xp, yp = random_crop(x[:, :5], y[:5], (8, 8, 8), np.random.default_rng(0))  # smaller than the crop: padded
    assert xp.shape == (2, 8, 8, 8) and yp.shape == (8, 8, 8)


def test_mirror_axes_limit_the_flips_and_are_recorded(tmp_path):
    """Training flips only the mirror_axes, with the same crops and turns drawn whichever axes are left out; the
    in-plane turn by 180 degrees is itself a flip of axes 0 and 1 (so only --mirror-axes 2 keeps a left organ from
    looking like a right one). Each checkpoint records its axes for predict --tta (none with --no-augment)."""
    y = np.arange(5 * 5 * 4).reshape(5, 5, 4)  # tells every flip and turn apart (a square plane: turns by 90 degrees)
    x = y[None].astype(np.float32)
    flips = [tuple(a for a in range(3) if m >> a & 1) for m in range(8)]
    seen = {}
    for axes, orientations in (((0, 1, 2), 16), ((2,), 8), ((), 4)):
        seen[axes] = [augment(x, y, np.random.default_rng(s), (1.0, 1.0, 1.0), axes)[1] for s in range(80)]
        for ya in seen[axes]:  # undoing the turn leaves a flip of the mirror axes
            assert any(np.array_equal(np.rot90(ya, k, (0, 1)), np.flip(y, f) if f else y)
                       for k in range(4) for f in flips if set(f) <= set(axes))
        assert len({ya.tobytes() for ya in seen[axes]}) == orientations
    for a, b in zip(seen[(0, 1, 2)], seen[(2,)]):  # the same draws: they differ by flips of axes 0 and 1 at most
        assert any(np.array_equal(np.flip(b, f) if f else b, a) for f in ((), (0,), (1,), (0, 1)))

    manifest = brain_csv(tmp_path / "data", n_cases=1)
    train(TrainConfig(data=str(manifest), out=str(tmp_path / "a"), epochs=1, mirror_axes=(1, 2), **TINY))
    assert load_models(tmp_path / "a", torch.device("cpu"))[1][0].trained_flips == (1, 2)
    train(TrainConfig(data=str(manifest), out=str(tmp_path / "b"), epochs=1, augment=False, **TINY))
    assert load_models(tmp_path / "b", torch.device("cpu"))[1][0].trained_flips == ()
    with pytest.raises(ValueError, match="mirror_axes"):
        train(TrainConfig(data=str(manifest), out=str(tmp_path / "c"), epochs=1, mirror_axes=(3,), **TINY))


def test_foreground_crops_centre_on_every_class_equally_often():
    """A large class and two of a few voxels each: foreground crops centre on each class about a third of the
    time (drawn by class, then voxel), not in proportion to the classes' volumes (then the small ones would be
    in under 1% of the crops); the sample holds each class's voxels (at most FOREGROUND_PER_CLASS), sorted by class;
    a volume smaller than the crop is padded."""
    y = np.zeros((40, 50, 60), np.uint8)
    y[5:35, 5:45, 5:55] = 1
    y[20, 20, 20] = 2
    y[30:32, 40:42, 10:12] = 3
    fg = foreground_sample(y)
    assert fg.dtype == np.int64 and fg.shape == (FOREGROUND_PER_CLASS + 1 + 8, 4)
    assert (np.diff(fg[:, 0]) >= 0).all() and (y[tuple(fg[:, 1:].T)] == fg[:, 0]).all()
    assert len(np.unique(fg[fg[:, 0] == 1, 1:], axis=0)) == FOREGROUND_PER_CLASS
    x = y[None].astype(np.float32)
    hits = {c: 0 for c in (2, 3)}
    for seed in range(300):
        xc, yc = random_crop(x, y, (4, 4, 4), np.random.default_rng(seed), fg)
        np.testing.assert_array_equal(xc[0], yc)
        for c in hits:
            hits[c] += bool((yc == c).any())
    assert all(70 <= n <= 130 for n in hits.values()), hits
    small = y[18:23, 17:22, 18:23]  # class 2 at (2, 3, 2), the volume smaller than the crop on every axis
    _, yc = random_crop(small[None].astype(np.float32), small, (8, 9, 7), np.random.default_rng(0),
                        foreground_sample(small))
    assert yc.shape == (8, 9, 7) and (yc == 2).sum() == 1
    assert foreground_sample(np.zeros((3, 4, 5), np.uint8)).shape == (0, 4)


def test_rotation_only_where_the_plane_has_equal_voxel_sizes(tmp_path):
    """Volumes are not resampled to isotropic: a 90-degree turn of an axial plane with 6.5 x 0.78 mm voxels (a
    sagittal acquisition in RAS) would stretch the anatomy 8-fold. It turns by 0 or 180 degrees there, by any
    multiple of 90 where the two voxel sizes agree; the spacing comes from preprocessing (scaled by downsampling)."""
    y = np.arange(8 * 8 * 3).reshape(8, 8, 3)
    flips = {np.flip(y, [a for a in range(3) if m >> a & 1]).tobytes() for m in range(8)}

    def turned_90(spacing):
        return sum(augment(y[None].astype(np.float32), y, np.random.default_rng(s), spacing)[1].tobytes() not in flips
                   for s in range(16))

    assert turned_90((6.5, 0.78125, 0.78125)) == 0 and turned_90((0.78125, 6.5, 0.78125)) == 0
    assert turned_90((0.78125, 0.8, 6.5)) > 0 and turned_90((2.0, 2.0, 2.0)) > 0
    # the TCGA crop (0.78 x 0.78 x 6.5 mm) stored as a sagittal acquisition: stored axes A, S, R
    img, t1 = load(TCGA_T1)
    _, tumour = load(TCGA_TUMOUR)
    affine = np.array([[0, 0, 6.5, 0], [0.78125, 0, 0, 0], [0, 0.78125, 0, 0], [0, 0, 0, 1]])
    save(t1, affine, tmp_path / "sag_image.nii.gz")
    save(tumour, affine, tmp_path / "sag_label.nii.gz")
    (tmp_path / "data.csv").write_text("name,image,label\nsag,sag_image.nii.gz,sag_label.nii.gz\n")
    cfg = TrainConfig(data=str(tmp_path / "data.csv"), out=str(tmp_path / "run"), downsample=2.0)
    [case], _ = prepare(cfg, discover(cfg.data), ["sag"], None)
    extent = np.array([10, 48, 64])  # canonical (R, A, S) extent of the foreground: every voxel is non-zero
    assert (t1 != 0).all() and case.y.shape == tuple(np.round(extent / 2).astype(int))
    np.testing.assert_allclose(case.spacing, np.array([6.5, 0.78125, 0.78125]) * extent / case.y.shape)
    assert math.isclose(case.spacing[0] / case.spacing[1], 8.32, rel_tol=1e-6)


def test_intensity_augmentation_is_per_channel_affine():
    x = np.random.default_rng(1).normal(size=(2, 5, 6, 7)).astype(np.float32)
    out = augment_intensity(x, np.random.default_rng(2))
    for c in range(2):
        a, b = np.polyfit(x[c].ravel(), out[c].ravel(), 1)
        assert 0.9 <= a <= 1.1 and -0.1 <= b <= 0.1
        np.testing.assert_allclose(out[c], a * x[c] + b, atol=1e-5)
    assert not np.allclose(out, x)


@pytest.mark.parametrize("threads", [1, 2])
def test_intensity_augmentation_of_flipped_and_turned_crops(threads):
    """Every flip and turn of a crop gives x * a + b with numpy's roundings, C-contiguous: on one torch thread (a
    data loader worker) a crop reversed along its innermost axis is written through torch's flip in slabs."""
    base = np.random.default_rng(5).normal(size=(3, 37, 21, 19)).astype(np.float32)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for flips in itertools.product((False, True), repeat=4):
            for k in range(4):
                x = base[:, 2:35, 1:20, 3:18]  # a crop: strided in every axis but the last
                for axis in np.flatnonzero(flips):
                    x = np.flip(x, axis)
                x = np.rot90(x, k, axes=(1, 2))
                draws = np.random.default_rng(7)
                a = draws.uniform(0.9, 1.1, 3).astype(np.float32)[:, None, None, None]
                b = draws.uniform(-0.1, 0.1, 3).astype(np.float32)[:, None, None, None]
                out = augment_intensity(x, np.random.default_rng(7))
                assert out.flags.c_contiguous and np.array_equal(out, x * a + b), (flips, k)
    finally:
        torch.set_num_threads(previous)


def test_loader_items_copy_nothing_twice_and_never_alias_the_case():
    """A crop is copied once (the intensity augmentation writes it contiguous), a batch of one not again (it was
    padded and stacked: two more copies of 47 MB for a 4 x 128 x 160 x 144 crop), a batch of several once; and no
    item shares memory with its case, whose arrays later items crop again."""
    from seg3d_fast.train import CropDataset, PreparedCase, pad_collate

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 9, 8, 7)).astype(np.float32)
    y = rng.integers(0, 3, (9, 8, 7)).astype(np.uint8)
    case = PreparedCase("a", x, y)
    for crop, augment_on in (((9, 8, 7), False), (None, False), ((4, 8, 7), False), ((5, 6, 7), True)):
        data = CropDataset([case], 3, crop, 0.5, augment_on, seed=1)
        item_x, item_y = data[0]
        assert item_x.is_contiguous() and item_y.is_contiguous()
        assert not np.shares_memory(item_x.numpy(), x) and not np.shares_memory(item_y.numpy(), y), crop
        bx, by = pad_collate([(item_x, item_y)])
        assert bx.data_ptr() == item_x.data_ptr() and by.data_ptr() == item_y.data_ptr()
        assert bx.shape == (1, *item_x.shape)
    small = (torch.ones(2, 3, 4, 5), torch.ones(3, 4, 5, dtype=torch.uint8))
    big = (torch.ones(2, 3, 4, 6), torch.ones(3, 4, 6, dtype=torch.uint8))
    bx, by = pad_collate([small, big])
    assert bx.shape == (2, 2, 3, 4, 6) and by.shape == (2, 3, 4, 6)
    assert bx[0, :, :, :, 5].eq(0).all() and by[0, :, :, 5].eq(0).all() and bx[1].eq(1).all()


def _collate_noting_shared_memory(batch):
    from seg3d_fast.train import pad_collate

    x, y = pad_collate(batch)
    return x, y, torch.tensor([x.is_shared(), y.is_shared()])


@pytest.mark.parametrize("batch_size", [1, 2])
def test_loader_workers_make_their_batches_in_shared_memory(batch_size):
    """In a data loader worker, items and batches are made in shared memory, from which they reach the main process
    as they are (PyTorch copies a tensor of ordinary memory there: 47 MB for a full-size crop, more time than the
    crop); the batches are those of the main process's loading."""
    from seg3d_fast.train import CropDataset, PreparedCase

    rng = np.random.default_rng(0)
    case = PreparedCase("a", rng.normal(size=(2, 9, 8, 7)).astype(np.float32), rng.integers(0, 3, (9, 8, 7)).astype(np.uint8))
    for crop, augment_on in (((5, 6, 7), True), ((9, 8, 7), False), (None, False)):
        data = CropDataset([case], 4, crop, 0.5, augment_on, seed=1)
        here = list(torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=_collate_noting_shared_memory))
        there = list(torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=1,
                                                 collate_fn=_collate_noting_shared_memory))
        for (x, y, _), (wx, wy, shared) in zip(here, there):
            assert shared.all(), (crop, augment_on)
            assert torch.equal(x, wx) and torch.equal(y, wy)


def test_crop_items_carry_their_epoch_to_persistent_workers(tmp_path):
    """Items indexed (epoch, i) are those of index i with the dataset's epoch set: the data loader's workers, kept
    from epoch to epoch, get the epoch with each index. Trained with 2 workers over 2 epochs: the weights of the
    main process's loading (workers that missed the epoch would crop epoch 2 as epoch 1)."""
    from seg3d_fast.train import CropDataset, EpochSampler, PreparedCase, data_workers

    rng = np.random.default_rng(0)
    case = PreparedCase("a", rng.normal(size=(1, 12, 10, 9)).astype(np.float32),
                        rng.integers(0, 2, (12, 10, 9)).astype(np.uint8))
    data = CropDataset([case], 4, (5, 5, 5), 0.5, True, seed=3)
    data.epoch = 2
    by_attribute = data[1]
    data.epoch = 0
    for a, b in zip(data[(2, 1)], by_attribute):
        assert torch.equal(a, b)
    assert not torch.equal(data[(1, 1)][0], by_attribute[0])
    sampler = EpochSampler(torch.utils.data.DistributedSampler(data, num_replicas=1, rank=0, seed=0))
    sampler.set_epoch(5)
    assert sorted(sampler) == [(5, i) for i in range(4)] and len(sampler) == 4

    assert data_workers(torch.device("cpu")) == 0
    manifest = brain_csv(tmp_path / "data", n_cases=2)
    cfg = dict(data=str(manifest), epochs=2, device="cpu", **{**TINY, "samples_per_epoch": 4})
    main = train(TrainConfig(out=str(tmp_path / "main"), workers=0, **cfg)).state_dict()
    workers = train(TrainConfig(out=str(tmp_path / "workers"), workers=2, **cfg)).state_dict()
    for k in main:
        torch.testing.assert_close(workers[k], main[k], rtol=0, atol=0, msg=k)


def test_a_worker_dying_while_its_batch_is_received_is_a_dead_worker(tmp_path, monkeypatch):
    """A data loader worker killed (the out-of-memory killer) while the main process received its batch's shared
    memory: PyTorch, not yet seeing the worker gone, passed on the ConnectionResetError of the connection that hands
    the memory over, which the command line reported as bad input ('seg3d-fast: error: [Errno 104] Connection reset
    by peer', exit status 2; one kill -9 of a worker in eight). Now it is the error of a dead worker; the previous
    epoch's checkpoint is kept."""
    from torch.utils.data import dataloader

    from seg3d_fast.train import EpochSampler

    real_next, real_set_epoch = dataloader._MultiProcessingDataLoaderIter._next_data, EpochSampler.set_epoch

    def next_data(self):
        if epochs[-1] == 1:  # (the first batch of epoch 2)
            raise ConnectionResetError(104, "Connection reset by peer")
        return real_next(self)
    epochs = []
    monkeypatch.setattr(EpochSampler, "set_epoch",
                        lambda self, epoch: (epochs.append(epoch), real_set_epoch(self, epoch)))
    monkeypatch.setattr(dataloader._MultiProcessingDataLoaderIter, "_next_data", next_data)
    manifest = brain_csv(tmp_path / "data", n_cases=2)
    with pytest.raises(RuntimeError, match=r"DataLoader worker exited unexpectedly: its connection ended while its "
                                           r"batch was received \(\[Errno 104\] Connection reset by peer\)"):
        train(TrainConfig(data=str(manifest), out=str(tmp_path / "r"), epochs=2, device="cpu", workers=1, **TINY))
    assert torch.load(tmp_path / "r" / "fold_0" / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_crop_beyond_the_machines_memory_is_named(tmp_path):
    manifest = brain_csv(tmp_path / "data", n_cases=1)
    with pytest.raises(ValueError, match="--crop 100000 1600 1440: a batch of 2 such crops needs .* GiB for its "
                                         "images and labels alone, more than this machine's"):
        train(TrainConfig(data=str(manifest), out=str(tmp_path / "r"), epochs=1, device="cpu",
                          **{**TINY, "crop": (100000, 1600, 1440), "batch_size": 2}))
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_cuda_graph_needs_one_gpu(tmp_path):
    manifest = brain_csv(tmp_path / "data", n_cases=1)
    with pytest.raises(ValueError, match="--cuda-graph needs one CUDA device and one process; got device cpu"):
        train(TrainConfig(data=str(manifest), out=str(tmp_path / "r"), epochs=1, device="cpu", cuda_graph=True,
                          **TINY))


def test_cache_dir_trains_the_same_from_memory_maps(tmp_path, monkeypatch):
    """--cache-dir: each case preprocessed once into the folder and read back as memory maps; training from it
    gives bit for bit the weights of training from memory. The cache is reused while the source files and the
    preprocessing are unchanged, made again for a case whose file changed, whose files were damaged, or for other
    preprocessing settings."""
    from dataclasses import replace

    import seg3d_fast.train as train_module

    manifest = brain_csv(tmp_path / "data", n_cases=3)
    cfg = TrainConfig(data=str(manifest), out=str(tmp_path / "memory"), epochs=1, folds=3, **TINY)
    cached = replace(cfg, out=str(tmp_path / "cached"), cache_dir=str(tmp_path / "cache"))
    expected = train(cfg).state_dict()
    got = train(cached).state_dict()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0, msg=k)
    cache = tmp_path / "cache"
    files = sorted(p.name for p in cache.iterdir())  # <case>.<fingerprint's digest>.<part>
    assert len(files) == 12 and all(any(f == f"case{i}.{f.split('.')[1]}.{ext}" for i in range(3)
                                        for ext in ("json", "x.npy", "y.npy", "foreground.npy")) for f in files)

    made = []
    preprocess = train_module.preprocess
    monkeypatch.setattr(train_module, "preprocess", lambda ref, image, *a, **k: made.append(1) or
                        preprocess(ref, image, *a, **k))
    dataset = discover(cached.data)
    names = ["case0", "case1", "case2"]
    in_memory, top = prepare(cfg, dataset, names, None)
    cases, cached_top = prepare(cached, dataset, names, None)
    assert made == [1, 1, 1] and cached_top == top == 3  # (the in-memory run only: the cache was reused)
    for a, b in zip(cases, in_memory):
        assert isinstance(b.x, np.ndarray) and isinstance(a.x, np.memmap) and isinstance(a.y, np.memmap)
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.y, b.y)
        assert a.y.dtype == np.uint8 and a.spacing == b.spacing
        np.testing.assert_array_equal(a.foreground, b.foreground)
    made.clear()
    image = tmp_path / "data" / "case1_image.nii.gz"
    assert image.is_file()
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # the file changed
    x2, = cache.glob("case2.*.x.npy")
    x2.write_bytes(x2.read_bytes()[:100])  # damaged
    y0, = cache.glob("case0.*.y.npy")
    np.save(y0, np.zeros((3, 3, 3), np.uint8))  # reads back, but is not x's grid
    cases, _ = prepare(cached, dataset, names, None)
    assert made == [1, 1, 1]
    for a, b in zip(cases, in_memory):
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.y, b.y)
    made.clear()
    cases, _ = prepare(replace(cached, downsample=2.0), dataset, names, None)
    assert made == [1, 1, 1] and cases[0].x.shape != in_memory[0].x.shape
    made.clear()  # each preprocessing has its own files: runs sharing the folder never read each other's
    assert prepare(cached, dataset, names, None)[0][0].x.shape == in_memory[0].x.shape and made == []
    # a cached case goes to a spawned data-loader worker as its files, not as copies of its arrays
    blob = pickle.dumps(cases[0])
    assert len(blob) < len(pickle.dumps(cases[0].foreground)) + 2000  # (the foreground sample and a few names)
    back = pickle.loads(blob)
    assert isinstance(back.x, np.memmap) and isinstance(back.y, np.memmap)
    np.testing.assert_array_equal(back.x, cases[0].x)
    np.testing.assert_array_equal(back.foreground, cases[0].foreground)
    # and workers train the same weights as the main process
    workers = train(replace(cached, out=str(tmp_path / "workers"), workers=2)).state_dict()
    for k in expected:
        torch.testing.assert_close(workers[k], expected[k], rtol=0, atol=0, msg=k)


def test_damaged_checkpoints_are_named(tmp_path, monkeypatch):
    """--resume and predict on an empty checkpoint.pt (EOFError with no text: the message itself failed with an
    IndexError) or on one that loads but is no training checkpoint: one error naming the file. A checkpoint that
    cannot be written (torch's zip writer reports a full disk as a RuntimeError) is named too, and the previous one
    is kept."""
    manifest = brain_csv(tmp_path / "data", n_cases=1)
    run = tmp_path / "run"
    cfg = dict(data=str(manifest), out=str(run), **dict(TINY, samples_per_epoch=1))
    train(TrainConfig(epochs=1, **cfg))
    ckpt = run / "fold_0" / "checkpoint.pt"
    good = ckpt.read_bytes()
    for content, words in ((b"", r"cannot read the checkpoint \(EOFError\)"), (None, "not a training checkpoint")):
        if content is None:
            torch.save({"epoch": 1}, ckpt)
        else:
            ckpt.write_bytes(content)
        with pytest.raises(Seg3DFastDataError, match=f"checkpoint.pt: {words}"):
            train(TrainConfig(epochs=2, resume=True, **cfg))
        with pytest.raises(Seg3DFastDataError, match="checkpoint.pt: (cannot read|not a training)"):
            load_models(run, torch.device("cpu"))
    ckpt.write_bytes(good)

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 20672 vs 20576")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(Seg3DFastDataError, match="checkpoint.pt: cannot write the checkpoint .*bytes free"):
        train(TrainConfig(epochs=2, resume=True, **cfg))
    assert ckpt.read_bytes() == good and not [p for p in ckpt.parent.iterdir() if p.name.startswith(".")]


def test_resume_rewrites_logs_that_a_stop_left_behind(tmp_path):
    """The logs are written after the checkpoint: a run stopped between the two left metrics without the last
    epoch, and a resume with nothing left to train never wrote them again."""
    manifest = brain_csv(tmp_path / "data", n_cases=1)
    cfg = dict(data=str(manifest), out=str(tmp_path / "r"), **dict(TINY, samples_per_epoch=1))
    train(TrainConfig(epochs=2, **cfg))
    metrics = tmp_path / "r" / "fold_0" / "metrics.json"
    metrics.write_text(json.dumps(json.loads(metrics.read_text())[:1]))
    train(TrainConfig(epochs=2, resume=True, **cfg))
    assert [r["epoch"] for r in json.loads(metrics.read_text())] == [1, 2]


def test_resume_with_another_length_under_poly_says_so(tmp_path, capsys):
    """The poly schedule decays over the run's --epochs: 2 epochs, then a resume to 3, is not a 3-epoch run once
    epoch 2 used the shorter run's rate (a resume after epoch 1 is: epoch 1's rate is lr whatever the length)."""
    manifest = brain_csv(tmp_path / "data", n_cases=1)
    cfg = dict(data=str(manifest), out=str(tmp_path / "r"), **dict(TINY, samples_per_epoch=1))
    train(TrainConfig(epochs=2, **cfg))
    train(TrainConfig(epochs=3, resume=True, **cfg))
    assert "resuming with --epochs 2 -> 3 under --lr-schedule poly" in capsys.readouterr().err


def test_a_flipped_axis_of_extent_one_trains(tmp_path):
    """A sample one voxel thick (a 2D image, a single slice) flipped along that axis kept a negative stride that
    numpy calls contiguous, and torch.from_numpy refused it (about 1 sample in 32 of a 2D image)."""
    from seg3d_fast.train import _writable
    flipped = np.arange(20, dtype=np.float32).reshape(1, 4, 5)[::-1]
    assert torch.equal(torch.from_numpy(_writable(flipped)), torch.arange(20.0).reshape(1, 4, 5))
    rng = np.random.default_rng(0)
    img = rng.uniform(1, 100, (20, 20)).astype(np.float32)  # 2D: (X, Y), one slice
    for name, data in (("img", img), ("lab", (img > 50).astype(np.uint8))):
        save(data, np.eye(4), tmp_path / f"{name}.nii.gz")
    (tmp_path / "m.csv").write_text(f"image,label\n{tmp_path}/img.nii.gz,{tmp_path}/lab.nii.gz\n")
    train(TrainConfig(data=str(tmp_path / "m.csv"), out=str(tmp_path / "r"), epochs=1, samples_per_epoch=48,
                      features=(4, 8), progress=False))
