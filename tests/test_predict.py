"""Prediction: sliding-window blending, fold ensembles, outputs on the input's exact grid (non-canonical real volume)."""
import json
import shutil

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")  # (the GPU check runs a test of this file where nibabel may be missing)
import torch.nn.functional as F

import seg3d_fast.predict
from seg3d_fast.data import Seg3DFastDataError
from seg3d_fast.predict import (crop_predictions, gaussian_importance, load_models, mirrored, on_device_or_host,
                                predict, predict_case, predict_logits, window_starts)
from seg3d_fast.train import PreparedCase, TrainConfig, train, validate
from seg3d_fast.data import PreprocessConfig, load_case, preprocess
from seg3d_fast.data.datasets import Case
from seg3d_fast.data.preprocess import restore_probabilities
from data_helpers import TCGA_T1, brain_block, load, permuted, save

TINY = dict(features=(4, 8), crop=(16, 16, 16), samples_per_epoch=2, lr=3e-3, progress=False)


def test_window_starts_cover_the_axis():
    for size, roi in ((40, 16), (17, 16), (16, 16), (9, 16), (100, 33)):
        starts = window_starts(size, roi, 0.5)
        assert starts[0] == 0 and starts[-1] == max(0, size - roi)
        covered = np.zeros(max(size, roi), bool)
        for s in starts:
            covered[s:s + roi] = True
        assert covered[:size].all()
        assert all(b - a <= roi // 2 for a, b in zip(starts, starts[1:]))  # 50% overlap at least


def test_gaussian_importance():
    w = gaussian_importance((8, 9, 10))
    assert w.shape == (8, 9, 10) and w.max() == pytest.approx(1.0) and w.min() >= 1e-3
    assert w[4, 4, 5] > w[0, 0, 0]
    torch.testing.assert_close(w, w.flip(0).flip(1).flip(2))


def test_sliding_window_equals_whole_volume_for_a_pointwise_model():
    """Blending is a weighted mean of overlapping windows: for a voxel-wise network it must reproduce the
    whole-volume pass exactly, whatever the window size (including windows larger than the volume)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(2, 8, 1), torch.nn.PReLU(), torch.nn.Conv3d(8, 3, 1))
    x = torch.randn(2, 19, 23, 11)
    whole = predict_logits(model, x, torch.device("cpu"))
    for roi in ((8, 8, 8), (16, 12, 5), (32, 32, 16)):
        windowed = predict_logits(model, x, torch.device("cpu"), roi=roi)
        torch.testing.assert_close(windowed, whole, rtol=1e-5, atol=1e-5)


def test_test_time_flips_average_the_flipped_predictions():
    """mirror_axes: the network runs on every combination of flips of those axes and its outputs, flipped back,
    are averaged (2^axes passes), for the whole volume and for each sliding window; for a voxel-wise network the
    windows still reproduce the whole volume."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(2, 3, 3, padding=1)  # not symmetric: its flipped passes differ
    passes = []
    conv.register_forward_hook(lambda module, args, out: passes.append(args[0].shape))
    x = torch.randn(2, 9, 8, 7)
    cpu = torch.device("cpu")
    with torch.no_grad():
        for axes in ((0, 1, 2), (1, 2), (0,)):
            subsets = [[a + 1 for a in range(3) if m >> a & 1 and a in axes] for m in range(8)]
            flips = {tuple(s) for s in subsets}
            expected = sum(conv(x.flip(f)[None] if f else x[None])[0].flip(f) if f else conv(x[None])[0]
                           for f in flips) / len(flips)
            passes.clear()
            got = predict_logits(conv, x, cpu, mirror_axes=axes)
            assert len(passes) == 2 ** len(axes)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(got, conv(x[None])[0], atol=1e-3)  # the flips changed something
        passes.clear()
        windowed = predict_logits(conv, x, cpu, roi=(5, 8, 7), mirror_axes=(2,))
        assert len(passes) == 2 * len(window_starts(9, 5, 0.5)) and windowed.shape == (3, 9, 8, 7)
    pointwise = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 1), torch.nn.PReLU(), torch.nn.Conv3d(4, 3, 1))
    whole = predict_logits(pointwise, x, cpu)
    torch.testing.assert_close(predict_logits(pointwise, x, cpu, roi=(4, 5, 6), mirror_axes=(0, 1, 2)), whole,
                               rtol=1e-5, atol=1e-5)
    bf16 = torch.randn(1, 2, 3, 4, 5)
    assert mirrored(lambda t: t.bfloat16(), bf16, (0,)).dtype == torch.float32  # (summed in float32)


def test_tta_uses_the_flips_each_model_was_trained_with(two_fold_run, tmp_path, monkeypatch, capsys):
    """predict --tta averages each model over the flips its own training drew (its checkpoint's mirror_axes: the
    folds of one run may differ; none with --no-augment; all three for checkpoints from before mirror_axes); a
    model trained without flips has none to average over: a one-line error. A fold's folder with --fold or
    --ensemble is an error too (the folder picks the fold)."""
    run = tmp_path / "run"
    shutil.copytree(two_fold_run / "run", run)
    image = two_fold_run / "data" / "case0_image.nii.gz"
    used = []
    real = seg3d_fast.predict.mirrored
    monkeypatch.setattr(seg3d_fast.predict, "mirrored",
                        lambda model, x, axes=(): used.append(tuple(axes)) or real(model, x, axes))

    def set_train_config(fold, **settings):
        path = run / f"fold_{fold}" / "checkpoint.pt"
        state = torch.load(path, weights_only=True)
        for key, value in settings.items():
            if value is None:
                state["train_config"].pop(key, None)
            else:
                state["train_config"][key] = value
        torch.save(state, path)

    assert [m.trained_flips for m in load_models(run, torch.device("cpu"), ensemble=True)[1]] == [(0, 1, 2)] * 2
    assert "seg3d_fast" not in capsys.readouterr().err  # every fold there and finished: no note
    set_train_config(0, mirror_axes=[2])
    set_train_config(1, mirror_axes=None)  # a checkpoint from before mirror_axes: every axis
    for args, expected in (({"tta": True, "ensemble": True}, [(2,), (0, 1, 2)]), ({"tta": True, "fold": 1}, [(0, 1, 2)]),
                           ({"tta": True}, [(2,)]), ({}, [()])):
        used.clear()
        predict(run, image, tmp_path / "out", progress=False, **args)
        assert used == expected, args
    used.clear()
    predict(run / "fold_0", image, tmp_path / "out", progress=False, tta=True)
    assert used == [(2,)]
    set_train_config(1, augment=False)
    predict(run, image, tmp_path / "out", progress=False, tta=True)  # fold 0 alone: fine
    with pytest.raises(Seg3DFastDataError, match="trained without flips"):
        predict(run, image, tmp_path / "out2", tta=True, ensemble=True, progress=False)
    for option in ({"fold": 0}, {"ensemble": True}):
        with pytest.raises(Seg3DFastDataError, match="one fold's folder, with --(fold|ensemble)"):
            predict(run / "fold_1", image, tmp_path / "out3", progress=False, **option)


def test_ensemble_notes_missing_and_unfinished_folds(two_fold_run, tmp_path, capsys):
    """--ensemble averages the folds that have a checkpoint; it says which of the run's folds have none, and which
    checkpoints stopped before their last epoch."""
    run = tmp_path / "run"
    shutil.copytree(two_fold_run / "run", run)
    state = torch.load(run / "fold_0" / "checkpoint.pt", weights_only=True)
    state["train_config"]["epochs"] = 5
    torch.save(state, run / "fold_0" / "checkpoint.pt")
    shutil.rmtree(run / "fold_1")
    assert len(load_models(run, torch.device("cpu"), ensemble=True)[1]) == 1
    err = capsys.readouterr().err
    assert "--ensemble of 1 of the run's 2 folds (no checkpoint for fold 1)" in err
    assert "fold_0/checkpoint.pt stopped at epoch 1 of 5" in err


def test_prediction_falls_back_to_the_host_when_the_gpu_runs_out_of_memory(capsys):
    """The network's output is kept on its GPU; where that GPU runs out of memory for it, the work is done again
    with it on the host (a message says so), from scratch; on the host itself nothing is retried."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    calls = []

    def work(where):
        calls.append(where)
        if where.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return where

    assert on_device_or_host(work, cuda) == cpu and calls == [cuda, cpu]
    assert "ran out of memory" in capsys.readouterr().err
    calls.clear()
    assert on_device_or_host(work, cpu) == cpu and calls == [cpu]

    def out_of_host_memory(where):
        raise torch.OutOfMemoryError("no memory on the host either")
    with pytest.raises(torch.OutOfMemoryError, match="host either"):
        on_device_or_host(out_of_host_memory, cuda)


@pytest.fixture(scope="module")
def two_fold_run(tmp_path_factory):
    """A 2-fold run on two blocks of the brain sample (tiny model, 1 epoch each)."""
    root = tmp_path_factory.mktemp("run2")
    rows = ["name,image,label"]
    for i in range(2):
        block = (slice(22 + 6 * i, 42 + 6 * i), slice(30, 50), slice(28, 44))
        image, label = brain_block(root / "data", f"case{i}", block)
        rows.append(f"case{i},{image.name},{label.name}")
    (root / "data" / "train.csv").write_text("\n".join(rows) + "\n")
    for fold in range(2):
        train(TrainConfig(data=str(root / "data" / "train.csv"), out=str(root / "run"), epochs=1, folds=2,
                          fold=fold, device="cpu", **TINY))
    return root


def test_ensemble_averages_fold_probabilities(two_fold_run):
    run = two_fold_run / "run"
    case = Case("case0", [two_fold_run / "data" / "case0_image.nii.gz"])
    device = torch.device("cpu")
    config, both = load_models(run, device, ensemble=True)
    assert len(both) == 2
    _, p_both = predict_case(both, config, case, device)
    _, p0 = predict_case(load_models(run, device, fold=0)[1], config, case, device)
    _, p1 = predict_case(load_models(run / "fold_1", device)[1], config, case, device)
    np.testing.assert_allclose(p_both, (p0 + p1) / 2, atol=1e-6)
    assert not np.allclose(p0, p1, atol=1e-3)  # the folds really differ
    np.testing.assert_allclose(p_both.sum(0), 1, atol=1e-5)


def test_predict_writes_on_input_grid(two_fold_run, tmp_path):
    """A real LAS volume stored with permuted axes: label map and probabilities come back on its exact grid."""
    (tmp_path / "in").mkdir()  # the run expects one channel: the TCGA T1 crop, axes permuted
    src = permuted(TCGA_T1, tmp_path / "in" / "tcga.nii.gz")
    img = nib.load(str(src))
    assert nib.aff2axcodes(img.affine) not in (("R", "A", "S"), ("L", "A", "S"))
    written = predict(two_fold_run / "run", tmp_path / "in", tmp_path / "out", ensemble=True,
                      roi=(16, 16, 16), save_probabilities=True, progress=False)
    assert written == [tmp_path / "out" / "tcga.nii.gz"]
    out = nib.load(str(written[0]))
    assert out.shape == img.shape and out.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(out.affine, img.affine)
    np.testing.assert_array_equal(out.header.get_zooms(), img.header.get_zooms())
    assert out.header["sform_code"] == img.header["sform_code"]
    probs = nib.load(str(tmp_path / "out" / "tcga_probabilities.nii.gz"))
    assert probs.shape == (*img.shape, 4)
    p = probs.get_fdata()
    np.testing.assert_allclose(p.sum(-1), 1, atol=1e-4)
    np.testing.assert_array_equal(p.argmax(-1), np.asanyarray(out.dataobj))


@pytest.mark.parametrize("ensemble", [True, False])
def test_label_map_is_the_argmax_of_the_probabilities(two_fold_run, tmp_path, ensemble, monkeypatch):
    """Without --save-probabilities the label map is taken on the crop grid (no full-size (C, X, Y, Z) float
    arrays; for one model no (C, crop) array either: slab by slab). Against the probabilities computed the plain
    way (the logits interpolated whole, softmax, fold mean, padding, reorientation) on a non-RAS volume of odd shape
    with a zero border (a crop), downsampled by 1.7 (interpolated logits), one fold or the ensemble: the saved
    probabilities agree to float32 rounding and the label map is their argmax wherever the top two classes are not
    within that rounding of each other. The label map written with the probabilities is theirs exactly."""
    run = tmp_path / "run"
    shutil.copytree(two_fold_run / "run", run)
    config = json.loads((run / "config.json").read_text())
    config["preprocess"]["downsample"] = 1.7
    (run / "config.json").write_text(json.dumps(config))
    for checkpoint in run.glob("fold_*/checkpoint.pt"):  # (as if trained so: the checkpoints state it too)
        state = torch.load(checkpoint, weights_only=True)
        state["config"]["preprocess"]["downsample"] = 1.7
        torch.save(state, checkpoint)
    img, t1 = load(TCGA_T1)
    t1 = t1[:47, 1:64, :9].copy()
    t1[:3], t1[:, -2:] = 0, 0
    src = permuted(save(t1, img.affine, tmp_path / "ras.nii.gz"), tmp_path / "odd.nii.gz")
    assert nib.aff2axcodes(nib.load(str(src)).affine) != ("R", "A", "S")

    cpu = torch.device("cpu")
    config, models = load_models(run, cpu, ensemble=ensemble)
    ref, image, _ = load_case(Case("odd", [src]))
    x, _, geometry = preprocess(ref, image, None, PreprocessConfig.from_dict(config["preprocess"]))
    assert geometry.bbox != tuple((0, n) for n in geometry.canonical_shape)
    assert all(n != s for n, s in zip(x.shape[1:], (b - a for a, b in geometry.bbox)))
    crop_shape = tuple(b - a for a, b in geometry.bbox)
    expected = sum(F.interpolate(predict_logits(m, x, cpu)[None], size=crop_shape, mode="trilinear",
                                 align_corners=False)[0].softmax(0) for m in models) / len(models)
    expected = restore_probabilities(expected, geometry)
    top2 = np.sort(expected, axis=0)[-2:]
    clear = top2[1] - top2[0] > 1e-5
    assert clear.mean() > 0.99

    with monkeypatch.context() as patch:  # the label map alone never builds the full-size probabilities
        patch.setattr(seg3d_fast.predict, "canonical_probabilities", None)
        if not ensemble:  # nor, for one model, those of the crop grid
            patch.setattr(seg3d_fast.predict, "logits_to_crop_probabilities", None)
            patch.setattr(seg3d_fast.predict, "labels_from_probabilities", None)
        written = predict(run, src, tmp_path / "labels", ensemble=ensemble, progress=False)
    labels = np.asanyarray(nib.load(str(written[0])).dataobj)
    assert labels.dtype == np.uint8 and len(np.unique(labels)) > 1
    np.testing.assert_array_equal(labels[clear], expected.argmax(0)[clear])
    predict(run, src, tmp_path / "probs", ensemble=ensemble, save_probabilities=True, progress=False)
    probs = nib.load(str(tmp_path / "probs" / "odd_probabilities.nii.gz")).get_fdata()
    np.testing.assert_allclose(probs, np.moveaxis(expected, 0, -1), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(probs.argmax(-1), labels)
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(tmp_path / "probs" / "odd.nii.gz")).dataobj), labels)


def test_predict_2d_image(two_fold_run, tmp_path):
    """A 2D NIfTI (dim[0] == 2): predicted as one slice; the label map is 2D on its grid, the probabilities
    (X, Y, 1, classes)."""
    img, t1 = load(TCGA_T1)
    src = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(t1[:, :, 4], img.affine, img.header), str(src))
    assert nib.load(str(src)).header["dim"][0] == 2
    written = predict(two_fold_run / "run", src, tmp_path / "out", save_probabilities=True, progress=False)
    out = nib.load(str(written[0]))
    assert out.shape == t1.shape[:2] and out.header["dim"][0] == 2
    np.testing.assert_array_equal(out.affine, nib.load(str(src)).affine)
    probs = nib.load(str(tmp_path / "out" / "slice_probabilities.nii.gz")).get_fdata()
    assert probs.shape == (*t1.shape[:2], 1, 4)
    np.testing.assert_array_equal(probs[:, :, 0].argmax(-1), np.asanyarray(out.dataobj))


def test_predict_errors(two_fold_run, tmp_path):
    with pytest.raises(Seg3DFastDataError, match="not a training run"):
        predict(tmp_path, TCGA_T1, tmp_path / "o", progress=False)
    with pytest.raises(Seg3DFastDataError, match="no checkpoint for fold 7"):
        load_models(two_fold_run / "run", torch.device("cpu"), fold=7)
    img, t1 = load(TCGA_T1)
    two = nib.Nifti1Image(np.stack([t1, t1], -1), img.affine)
    nib.save(two, str(tmp_path / "two.nii.gz"))
    with pytest.raises(Seg3DFastDataError, match="two.nii.gz: case two has 2 channel\\(s\\), the model expects 1"):
        predict(two_fold_run / "run", tmp_path / "two.nii.gz", tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
    # a checkpoint beside a config.json of another model (an --overwrite run stopped before its first epoch)
    stale = tmp_path / "stale"
    shutil.copytree(two_fold_run / "run", stale)
    config = json.loads((stale / "config.json").read_text())
    config["model"]["features"] = [6, 12]
    (stale / "config.json").write_text(json.dumps(config))
    with pytest.raises(Seg3DFastDataError, match="fold_0/checkpoint.pt: trained with another model than"):
        load_models(stale, torch.device("cpu"))
    # model settings that lack a key, that no Seg3DNet takes, or that do not fit the checkpoint's weights
    for edit, message in ((lambda m: m.pop("features"), "the model settings lack features"),
                          (lambda m: m.update(widths=[4, 8]), "do not describe a Seg3DNet .*widths"),
                          (lambda m: m.update(skip="product"), "do not describe a Seg3DNet .*skip must be one of"),
                          (lambda m: m.update(features=[4, 8, 16]), "fold_0/checkpoint.pt: its weights do not fit"),
                          (lambda m: m.update(num_classes=3), "fold_0/checkpoint.pt: its weights do not fit")):
        config = json.loads((two_fold_run / "run" / "config.json").read_text())
        edit(config["model"])
        (stale / "config.json").write_text(json.dumps(config))
        for path in (stale / "fold_0" / "checkpoint.pt", stale / "fold_1" / "checkpoint.pt"):
            state = torch.load(path, weights_only=False)
            state.pop("config", None)  # checkpoints without their config (older runs): config.json stands alone
            torch.save(state, path)
        with pytest.raises(Seg3DFastDataError, match=message):
            load_models(stale, torch.device("cpu"))
    for damage in ("{\"model\": {\"in_channels\": 1", "{}"):  # damaged run configuration: named, no traceback
        (tmp_path / "run").mkdir(exist_ok=True)
        (tmp_path / "run" / "config.json").write_text(damage)
        with pytest.raises(Seg3DFastDataError, match="run/config.json: (not valid JSON|not a run configuration)"):
            predict(tmp_path / "run", TCGA_T1, tmp_path / "o", progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: prediction summed and interpolated on it")
def test_prediction_on_the_gpu_matches_the_host(two_fold_run, monkeypatch, exact_fp32):
    """With the network on the GPU the sliding window's sum, the interpolation to the crop grid, the argmax and the
    validation Dice's counts run there (only labels cross to the host): the same results as on the host, to float32
    rounding (near-ties aside); where the GPU runs out of memory for them, the host's results exactly."""
    run = two_fold_run / "run"
    case = Case("case0", [two_fold_run / "data" / "case0_image.nii.gz"])
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for ensemble in (False, True):
        config, on_cpu = load_models(run, cpu, ensemble=ensemble)
        _, on_gpu = load_models(run, cuda, ensemble=ensemble, backend="reference")  # (no kernels timed or built)
        _, _, expected, _ = crop_predictions(on_cpu, config, case, cpu, roi=(16, 16, 16))
        _, _, got, _ = crop_predictions(on_gpu, config, case, cuda, roi=(16, 16, 16))
        assert got.device == cpu and got.dtype == expected.dtype
        assert (got == expected).float().mean() > 0.999

        where = []  # the GPU made to run out of memory for the output: the host's path, the network on the GPU
        real = seg3d_fast.predict.predict_logits

        def short_of_memory(*args, out_device="cpu", **kwargs):
            where.append(torch.device(out_device).type)
            if torch.device(out_device).type == "cuda":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return real(*args, out_device=out_device, **kwargs)
        with monkeypatch.context() as patch:
            patch.setattr(seg3d_fast.predict, "predict_logits", short_of_memory)
            _, _, fallback, _ = crop_predictions(on_gpu, config, case, cuda, roi=(16, 16, 16))
        assert where == ["cuda"] + ["cpu"] * len(on_gpu)
        assert (fallback == got).float().mean() > 0.999

    ref, image, label = load_case(Case("case0", case.images, two_fold_run / "data" / "case0_label.nii.gz"))
    x, y, _ = preprocess(ref, image, label, PreprocessConfig.from_dict(config["preprocess"]))
    prepared = [PreparedCase("case0", x.numpy(), y.numpy().astype(np.uint8))]
    logits_cpu = predict_logits(on_cpu[0], x, cpu, roi=(16, 16, 16))
    logits_gpu = predict_logits(on_gpu[0], x, cuda, roi=(16, 16, 16), out_device=cuda)
    assert logits_gpu.device.type == "cuda"
    torch.testing.assert_close(logits_gpu.cpu(), logits_cpu, rtol=1e-4, atol=1e-4)
    assert validate(on_gpu[0], prepared, cuda, None, (16, 16, 16)) == pytest.approx(
        validate(on_cpu[0], prepared, cpu, None, (16, 16, 16)), abs=1e-3)
