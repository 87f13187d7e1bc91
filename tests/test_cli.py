"""The seg3d-fast command: bad input gives one line naming the file, exit status 2, no traceback, nothing written;
the demo (quick mode), predict, evaluate and info work end to end."""
import json
import math
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

import seg3d_fast as sf
from seg3d_fast.cli import main
from data_helpers import TCGA_T1, brain_block, load, save

QUICK_TRAIN = ["--epochs", "1", "--features", "4", "8", "--crop", "16", "16", "16", "--quiet"]


def _manifest(folder, image, label):
    (folder / "m.csv").write_text(f"image,label\n{image},{label}\n")
    return str(folder / "m.csv")


def _bad_case(tmp_path, problem):
    """-> (manifest, the file the error must name, words the message must contain, extra CLI args)."""
    image, label = brain_block(tmp_path / "d")
    img, lab = load(label)
    extra = []
    if problem == "missing":
        bad, words = tmp_path / "d" / "gone.nii.gz", "file not found"
        return _manifest(tmp_path, image, bad), bad, words, extra
    if problem == "truncated":
        bad, words = tmp_path / "d" / "cut.nii.gz", "truncated"
        raw = label.read_bytes()
        bad.write_bytes(raw[: len(raw) // 2])
        return _manifest(tmp_path, image, bad), bad, words, extra
    if problem == "not_nifti":
        bad, words = tmp_path / "d" / "text.nii", "not a readable NIfTI"
        bad.write_text("hello\n" * 100)
        return _manifest(tmp_path, bad, label), bad, words, extra
    if problem == "grid":
        bad, words = tmp_path / "d" / "small.nii.gz", "grid mismatch"
        save(lab[:, :, :-2], img.affine, bad)
        return _manifest(tmp_path, image, bad), bad, words, extra
    if problem == "label_range":
        return _manifest(tmp_path, image, label), label, "label 3 outside the class range 0..2", ["--num-classes", "3"]
    if problem == "empty":
        bad, words = tmp_path / "d" / "zeros.nii.gz", "empty foreground"
        save(np.zeros(lab.shape, np.float32), img.affine, bad)
        return _manifest(tmp_path, bad, label), bad, words, extra
    if problem == "channels":  # a second case whose image holds 2 channels in one 4D file
        image2, label2 = brain_block(tmp_path / "d", "other")
        bad, words = tmp_path / "d" / "two_channels.nii.gz", "has 2 channel(s), the dataset's other cases have 1"
        _, data = load(image2)
        save(np.stack([data, data], -1), img.affine, bad)
        (tmp_path / "m.csv").write_text(f"image,label\n{image},{label}\n{bad},{label2}\n")
        return str(tmp_path / "m.csv"), bad, words, extra
    raise AssertionError(problem)


def _assert_one_line_error(capsys, rc, path, words):
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("seg3d-fast: error: ") and str(path) in lines[0] and words in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("problem", ["missing", "truncated", "not_nifti", "grid", "label_range", "empty", "channels"])
def test_train_bad_input(tmp_path, capsys, problem, cache):
    manifest, path, words, extra = _bad_case(tmp_path, problem)
    if cache:  # (the same errors when the cases go through a --cache-dir)
        extra = [*extra, "--cache-dir", str(tmp_path / "cache")]
    rc = main(["train", manifest, "--out", str(tmp_path / "run"), *QUICK_TRAIN, *extra])
    _assert_one_line_error(capsys, rc, path, words)
    assert not (tmp_path / "run").exists()  # nothing written


def test_train_cache_dir_not_writable(tmp_path, capsys):
    """A --cache-dir that cannot be written (here a file where the folder should be) is a one-line error."""
    image, label = brain_block(tmp_path / "d")
    manifest = _manifest(tmp_path, image, label)
    (tmp_path / "cache").write_text("not a folder")
    rc = main(["train", manifest, "--out", str(tmp_path / "run"), *QUICK_TRAIN, "--cache-dir", str(tmp_path / "cache")])
    _assert_one_line_error(capsys, rc, tmp_path / "cache", "cannot write the preprocessed case")


def test_train_out_is_a_file(tmp_path, capsys):
    """--out naming a file (or a path through one): a one-line error saying a folder could not be made there."""
    image, label = brain_block(tmp_path / "d")
    manifest = _manifest(tmp_path, image, label)
    (tmp_path / "run").write_text("not a folder")
    for out in (tmp_path / "run", tmp_path / "run" / "sub"):
        rc = main(["train", manifest, "--out", str(out), *QUICK_TRAIN])
        _assert_one_line_error(capsys, rc, out, "cannot make this folder, a file is in its place or its parent's")
    assert (tmp_path / "run").read_text() == "not a folder"


def test_predict_and_evaluate_bad_input(tmp_path, capsys):
    raw = TCGA_T1.read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    run = tmp_path / "run"
    run.mkdir()
    rc = main(["predict", str(run), str(tmp_path / "cut.nii.gz"), "--out", str(tmp_path / "o")])
    _assert_one_line_error(capsys, rc, run, "not a training run")
    (tmp_path / "pred").mkdir()
    img, t1 = load(TCGA_T1)
    save((t1 > 500).astype(np.uint8), img.affine, tmp_path / "pred" / "a.nii.gz")
    rc = main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "labels")])
    _assert_one_line_error(capsys, rc, tmp_path / "labels", "label folder or dataset not found")
    (tmp_path / "labels").mkdir()
    rc = main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "labels")])
    _assert_one_line_error(capsys, rc, tmp_path / "labels", "no ground-truth label file for case a")
    assert not (tmp_path / "o").exists() and not list((tmp_path / "pred").glob("evaluation*"))


@pytest.mark.parametrize("args,option", [
    (["--crop", "0", "16", "16"], "--crop"), (["--batch-size", "0"], "--batch-size"), (["--val-every", "0"], "--val-every"),
    (["--lr", "-1"], "--lr"), (["--device", "foo"], "--device"), (["--features", "0", "8"], "--features"),
    (["--downsample", "0.5"], "--downsample"), (["--epochs", "0"], "--epochs"), (["--folds", "0"], "--folds"),
    (["--num-classes", "1"], "--num-classes"), (["--mirror-axes", "3"], "--mirror-axes"), (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"), (["--downsample", "nan"], "--downsample"), (["--downsample", "inf"], "--downsample"),
    (["--clip", "nan", "5"], "--clip")])
def test_bad_option_values(tmp_path, capsys, args, option):
    """A bad option value ends in argparse's one-line error naming the option (exit status 2), before anything is
    written."""
    manifest = _manifest(tmp_path, "a.nii.gz", "b.nii.gz")
    with pytest.raises(SystemExit) as exit_:
        main(["train", manifest, "--out", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument {option}" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_bad_option_combinations(tmp_path, capsys):
    image, label = brain_block(tmp_path / "d")
    manifest = _manifest(tmp_path, image, label)
    rc = main(["train", manifest, "--out", str(tmp_path / "run"), *QUICK_TRAIN, "--clip", "100", "-100"])
    _assert_one_line_error(capsys, rc, "--clip", "LOW < HIGH")
    assert not (tmp_path / "run").exists()
    for args in (["--overlap", "1.0"], ["--overlap", "nan"], ["--sliding-window", "0", "8", "8"]):
        with pytest.raises(SystemExit) as exit_:
            main(["predict", str(tmp_path), str(image), "--out", str(tmp_path / "o"), *args])
        assert exit_.value.code == 2 and f"argument {args[0]}" in capsys.readouterr().err
    rc = main(["predict", str(tmp_path), str(image), "--out", str(tmp_path / "o"), "--ensemble", "--fold", "0"])
    _assert_one_line_error(capsys, rc, "--ensemble", "pass one")
    # a one-level network, and CUDA graphs or fp16 on the CPU: one line too (they were ValueError tracebacks)
    for args, words in ((["--features", "8"], "at least 2"), (["--cuda-graph", "--device", "cpu"], "one CUDA device"),
                        (["--amp", "fp16", "--device", "cpu"], "CUDA"),
                        (["--no-augment", "--mirror-axes", "0"], "--no-augment"),
                        *([(["--backend", "cuda"], "--backend cuda")] if sf.backends.unavailable_reason("cuda") else [])):
        rc = main(["train", manifest, "--out", str(tmp_path / "run"), *QUICK_TRAIN, *args])
        _assert_one_line_error(capsys, rc, args[0], words)
        assert not (tmp_path / "run").exists()


def test_fp16_on_the_cpu_is_refused_where_a_gpu_is_present(tmp_path, capsys, monkeypatch):
    """--device cpu --amp fp16 is refused on a GPU machine too (it ran fp16 autocast on the CPU in predict)."""
    import seg3d_fast.cli

    monkeypatch.setattr(seg3d_fast.cli, "_cuda", lambda: True)
    image, label = brain_block(tmp_path / "d")
    for command in (["train", _manifest(tmp_path, image, label), "--out", str(tmp_path / "run"), *QUICK_TRAIN],
                    ["predict", str(tmp_path), str(image), "--out", str(tmp_path / "o")]):
        rc = main([*command, "--amp", "fp16", "--device", "cpu"])
        _assert_one_line_error(capsys, rc, "--amp fp16", "CUDA")
    assert not (tmp_path / "run").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["bogus", "cuda"])
def test_env_backend_that_cannot_run_is_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch, value):
    """SEG3D_FAST_BACKEND counts as an explicit choice, like --backend: a value naming no backend, or a backend that
    cannot run here, is a one-line error before train or the demo writes anything (it was a ValueError traceback,
    or a run folder with config.json and splits.json and then the first step's error)."""
    if value == "cuda" and not sf.backends.unavailable_reason("cuda"):
        pytest.skip("the cuda backend can run here")
    monkeypatch.setenv("SEG3D_FAST_BACKEND", value)
    image, label = brain_block(tmp_path / "d")
    manifest = _manifest(tmp_path, image, label)
    rc = main(["train", manifest, "--out", str(tmp_path / "run"), *QUICK_TRAIN])
    _assert_one_line_error(capsys, rc, "SEG3D_FAST_BACKEND", value)
    assert not (tmp_path / "run").exists()
    rc = main(["demo", "--out", str(tmp_path / "demo"), "--quick"])
    _assert_one_line_error(capsys, rc, "SEG3D_FAST_BACKEND", value)
    assert not (tmp_path / "demo").exists()
    if value == "bogus":
        rc = main(["predict", str(tmp_path / "run"), str(image), "--out", str(tmp_path / "o")])
        _assert_one_line_error(capsys, rc, "SEG3D_FAST_BACKEND", value)


def test_predict_never_overwrites_its_inputs(tmp_path, capsys):
    """--out the input folder: the prediction would replace the image; refused before any work (the run is not
    even read)."""
    folder = tmp_path / "images"
    folder.mkdir()
    image = folder / "caseA.nii.gz"
    image.write_bytes(TCGA_T1.read_bytes())
    before = image.read_bytes()
    rc = main(["predict", str(tmp_path / "no_run"), str(folder), "--out", str(folder)])
    _assert_one_line_error(capsys, rc, image, "would overwrite this input file")
    assert image.read_bytes() == before


def test_error_exit_status_in_a_real_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-m", "seg3d_fast", "predict", str(tmp_path), str(tmp_path / "x.nii.gz"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr and str(tmp_path) in p.stderr


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch " in out and "reference" in out and "available" in out and "cuDNN" in out


def test_evaluate_cli(tmp_path, capsys):
    img, t1 = load(TCGA_T1)
    truth = (t1 > 600).astype(np.uint8) + (t1 > 900)
    pred = truth.copy()
    pred[:4] = 0
    (tmp_path / "p").mkdir()
    (tmp_path / "t").mkdir()
    save(pred, img.affine, tmp_path / "p" / "c.nii.gz")
    save(truth, img.affine, tmp_path / "t" / "c.nii.gz")
    assert main(["evaluate", str(tmp_path / "p"), str(tmp_path / "t"), "--out", str(tmp_path / "e")]) == 0
    result = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    assert result["classes"] == [1, 2] and result["regions"] is None
    for c in (1, 2):
        t, q = truth == c, pred == c
        assert result["mean"][f"class_{c}"]["dice"] == pytest.approx(2 * (t & q).sum() / (t.sum() + q.sum()))
        assert math.isfinite(result["mean"][f"class_{c}"]["hd95"])  # (its values: tests/test_metrics.py)
    assert "mean Dice" in capsys.readouterr().out
    assert main(["evaluate", str(tmp_path / "p"), str(tmp_path / "t"), "--out", str(tmp_path / "f"), "--no-hd95"]) == 0
    assert "hd95" not in (tmp_path / "f" / "evaluation.csv").read_text().splitlines()[0]
    assert "hd95" in capsys.readouterr().out.splitlines()[0] + (tmp_path / "e" / "evaluation.csv").read_text()
    # against the dataset's manifest: its labelled cases without a prediction are named
    (tmp_path / "t" / "m.csv").write_text("name,image,label\nc,c.nii.gz,c.nii.gz\nd,c.nii.gz,c.nii.gz\n")
    assert main(["evaluate", str(tmp_path / "p"), str(tmp_path / "t" / "m.csv"), "--out", str(tmp_path / "g"),
                 "--no-hd95"]) == 0
    assert f"note: 1 labelled case(s) of {tmp_path / 't' / 'm.csv'} have no prediction" in capsys.readouterr().out
    assert json.loads((tmp_path / "g" / "evaluation.json").read_text())["unpredicted"] == ["d"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no CUDA GPU is (runs on CPU machines)")
def test_demo_on_a_missing_gpu_writes_nothing(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path / "d"), "--quick", "--device", "cuda"])
    _assert_one_line_error(capsys, rc, "--device cuda", "CUDA is not available")
    assert not (tmp_path / "d").exists()


def test_demo_refuses_a_folder_holding_another_training_run(tmp_path, capsys):
    """The demo replaces its own earlier run, but never writes its data/ and run into another training run's folder."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"in_channels": 1}, "extra": {}}))
    rc = main(["demo", "--out", str(run), "--quick"])
    _assert_one_line_error(capsys, rc, run, "holds a training run that is not the demo's")
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]


def test_demo_quick_then_predict_with_its_run(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    printed = capsys.readouterr().out
    assert "held-out Dice" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["dice"]) == {"CSF", "GM", "WM"}
    assert metrics["mean_dice"] == pytest.approx(np.mean(list(metrics["dice"].values())))
    for name in ("overlay.png", "config.json", "splits.json", "fold_0/checkpoint.pt", "fold_0/metrics.csv",
                 "fold_0/curves.png", "prediction/heldout_image.nii.gz"):
        assert (out / name).is_file(), name
    assert (out / "overlay.png").read_bytes()[:4] == b"\x89PNG"
    heldout = nib.load(str(out / "data" / "heldout_image.nii.gz"))
    pred = nib.load(str(out / "prediction" / "heldout_image.nii.gz"))
    assert pred.shape == heldout.shape and np.allclose(pred.affine, heldout.affine)
    # the demo's run is reusable by `predict`
    assert main(["predict", str(out), str(out / "data" / "heldout_image.nii.gz"), "--out", str(tmp_path / "p"),
                 "--sliding-window", "16", "16", "16", "--tta"]) == 0
    assert (tmp_path / "p" / "heldout_image.nii.gz").is_file()


def test_brats_pipeline_train_predict_evaluate(tmp_path, capsys):
    """4-channel BRATS layout end to end through the CLI: train (downsampled input), predict the case folders
    back on their grids, evaluate with the BRATS regions."""
    from data_helpers import brats_case

    for i in range(2):
        brats_case(tmp_path / "brats", f"BraTS_{i:03d}")
    run, pred = tmp_path / "run", tmp_path / "pred"
    assert main(["train", str(tmp_path / "brats"), "--out", str(run), "--downsample", "2", "--epochs", "1",
                 "--features", "4", "8", "--quiet"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["in_channels"] == 4 and config["num_classes"] == 5 and config["layout"] == "brats"
    assert config["preprocess"]["downsample"] == 2
    assert main(["predict", str(run), str(tmp_path / "brats"), "--out", str(pred)]) == 0
    seg = nib.load(str(tmp_path / "brats" / "BraTS_000" / "BraTS_000_seg.nii.gz"))
    out = nib.load(str(pred / "BraTS_000.nii.gz"))
    assert out.shape == seg.shape and np.array_equal(out.affine, seg.affine)
    assert main(["evaluate", str(pred), str(tmp_path / "brats"), "--regions", "brats"]) == 0
    result = json.loads((pred / "evaluation.json").read_text())
    assert set(result["per_case"]) == {"BraTS_000", "BraTS_001"}
    assert {"whole", "core", "enhancing"} <= set(result["mean"])


def test_sigterm_stops_a_command_and_leaves_no_temporary_file(tmp_path, monkeypatch, capsys):
    """SIGTERM (timeout, a scheduler's preemption, torchrun stopping the other ranks) is handled like Ctrl-C: a
    checkpoint being written atomically leaves no hidden temporary file behind, and the exit status is 143 (its
    default action ended the process mid-write, leaving a full-size temporary file each time)."""
    import signal

    from seg3d_fast import train as train_mod
    from seg3d_fast.files import write_atomic
    target = tmp_path / "checkpoint.pt"

    def killed_while_writing(args):
        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGTERM)
        write_atomic(target, write)
    monkeypatch.setattr(train_mod, "main", killed_while_writing)
    missed = []  # where main installs no handler of its own, this one gets the signal (and pytest lives on)
    ours = lambda *a: missed.append(1)  # noqa: E731
    before = signal.signal(signal.SIGTERM, ours)
    try:
        rc = main(["train", str(tmp_path / "m.csv"), "--out", str(tmp_path / "run")])
        restored = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert not missed and rc == 143 and capsys.readouterr().err.strip() == "seg3d-fast: terminated"
    assert list(tmp_path.iterdir()) == [] and restored is ours  # main put the handler it found back


@pytest.mark.parametrize("signal_name, status, said", [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")])
def test_a_signal_whose_exception_was_swallowed_still_ends_the_run(tmp_path, monkeypatch, capsys, signal_name, status,
                                                                   said):
    """SIGTERM's handler and Ctrl-C's raise wherever the process is, and code there can swallow the exception: Python
    3.11 wraps one raised in a class's __set_name__ into a RuntimeError, which matplotlib's import of its 3D axes
    caught (`except Exception`) while training wrote its plot. Training went on with the signal ignored (SIGTERM:
    ended 5 s later, status 1, on its dead data loader workers; Ctrl-C: to its last epoch, status 0); landing in the
    unguarded import of matplotlib's axes, Ctrl-C ended the run with that RuntimeError's traceback and status 1. Now
    the next step raises again (files.stop_if_terminated), and any exception after the signal ends the command as
    terminated (143) or interrupted (130)."""
    import signal
    import time

    from seg3d_fast import files, train as train_mod

    signum = getattr(signal, signal_name)
    steps = []

    def swallowed_then_next_step(args):
        try:
            os.kill(os.getpid(), signum)
            time.sleep(5)  # (the handler runs here)
        except KeyboardInterrupt as e:  # as the guarded import swallowed it, wrapped
            try:
                raise RuntimeError("Error calling __set_name__") from e
            except RuntimeError:
                pass
        steps.append("next step")
        files.stop_if_terminated()
        steps.append("went on")
    monkeypatch.setattr(train_mod, "main", swallowed_then_next_step)
    assert main(["train", str(tmp_path / "m.csv"), "--out", str(tmp_path / "run")]) == status
    assert steps == ["next step"] and capsys.readouterr().err.strip() == f"seg3d-fast: {said}"
    # (main forgets it, and puts the handlers back: the next run in this process starts afresh)
    assert not files.terminating() and not files.interrupted()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    def error_after_the_signal(args):  # the unguarded import's wrapped error, or the dead workers' 'exited
        # unexpectedly' before a step could check: what reaches main
        try:
            os.kill(os.getpid(), signum)
            time.sleep(5)
        except KeyboardInterrupt as e:
            raise RuntimeError("Error calling __set_name__ on '_axis_method_wrapper' instance") from e
    monkeypatch.setattr(train_mod, "main", error_after_the_signal)
    assert main(["train", str(tmp_path / "m.csv"), "--out", str(tmp_path / "run")]) == status
    assert capsys.readouterr().err.strip() == f"seg3d-fast: {said}"


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups (POSIX)")
def test_sigterm_to_the_process_group_stops_training_with_data_loader_workers_cleanly(tmp_path):
    """`timeout`, a scheduler or a kill of the process group sends SIGTERM to the data loader's workers too (on a GPU
    train starts them by default and keeps them between epochs). PyTorch's workers die by it (a SIGTERM not from
    their main process), and PyTorch's SIGCHLD handler raised 'DataLoader worker (pid N) is killed by signal:
    Terminated' over the main process's Terminated: exit status 1, or a traceback under 143, in most tries. Now:
    143, 'terminated' alone, no process left, the last epoch's checkpoint whole."""
    import signal
    import time

    from data_helpers import brain_csv

    manifest = brain_csv(tmp_path / "data", n_cases=2)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    for attempt, delay in enumerate((0.0, 0.3, 0.6)):  # (between epochs, the persistent workers idle; or in one)
        out = tmp_path / f"run{attempt}"
        p = subprocess.Popen([sys.executable, "-m", "seg3d_fast", "train", str(manifest), "--out", str(out),
                              "--device", "cpu", "--workers", "2", "--features", "4", "8", "--crop", "12", "12", "12",
                              "--samples-per-epoch", "8", "--epochs", "1000", "--quiet"],
                             env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            while not (out / "fold_0" / "metrics.csv").exists() and p.poll() is None:
                time.sleep(0.02)
            time.sleep(delay)
            os.killpg(p.pid, signal.SIGTERM)
            err = p.communicate(timeout=120)[1]
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        assert p.returncode == 143 and "seg3d-fast: terminated" in err, err[-3000:]
        assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
        for _ in range(50):  # no process left in its group (the workers: the main process joined them)
            try:
                os.killpg(p.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("a data loader worker outlived the training process")
        assert torch.load(out / "fold_0" / "checkpoint.pt", weights_only=False)["epoch"] >= 1


def test_a_repeated_sigterm_does_not_interrupt_the_clean_up(tmp_path, monkeypatch, capsys):
    """torchrun stops its workers with two SIGTERMs a millisecond apart: the second, arriving while the first's
    Terminated removes a checkpoint's temporary file, left that file behind (or a traceback from main's finally)."""
    import signal

    from seg3d_fast import files, train as train_mod
    target = tmp_path / "checkpoint.pt"
    real_exists = os.path.exists
    repeats = []

    def exists_with_a_second_sigterm(path):  # (write_atomic's clean-up asks first: the repeat lands right there)
        if not repeats:
            repeats.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_exists(path)

    def killed_while_writing(args):
        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGTERM)
        monkeypatch.setattr(files.os.path, "exists", exists_with_a_second_sigterm)
        files.write_atomic(target, write)
    monkeypatch.setattr(train_mod, "main", killed_while_writing)
    before = signal.signal(signal.SIGTERM, lambda *a: None)
    try:
        rc = main(["train", str(tmp_path / "m.csv"), "--out", str(tmp_path / "run")])
    finally:
        monkeypatch.undo()
        signal.signal(signal.SIGTERM, before)
    assert repeats and rc == 143 and capsys.readouterr().err.strip() == "seg3d-fast: terminated"
    assert list(tmp_path.iterdir()) == []
