"""NIfTI io, dataset layouts and preprocessing on real volumes (tests/fixtures, the bundled sample)."""
import gzip
import json
import os
import re
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from seg3d_fast.data import Case, PreprocessConfig, Seg3DFastDataError, discover, load_case, load_nifti, preprocess
from seg3d_fast.data.nifti import float_image_like, label_image_like, save_nifti
from seg3d_fast.files import write_atomic
from seg3d_fast.data.preprocess import (Geometry, crop_probability_slabs, downsample_labels,
                                        logits_to_crop_probabilities, restore_probabilities)
from data_helpers import CT, CT_LABELS, TCGA_T1, TCGA_TUMOUR, brain_block, brats_case, load, permuted, save


# ---- io ------------------------------------------------------------------------------------------------------
def test_load_nifti_reads_real_volume():
    img, data = load_nifti(TCGA_T1)
    assert data.shape == (48, 64, 10) and data.dtype == np.int16
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")


@pytest.mark.parametrize("problem", ["missing", "truncated_gz", "truncated_nii", "not_nifti", "folder", "nan", "rgb",
                                     "complex", "nan_pixdim", "nan_sform", "gzip_named_nii"])
def test_load_nifti_errors_name_file_and_problem(tmp_path, problem):
    raw = TCGA_T1.read_bytes()
    if problem == "missing":
        path, expect = tmp_path / "nope.nii.gz", "file not found"
    elif problem == "truncated_gz":
        path, expect = tmp_path / "cut.nii.gz", "truncated"
        path.write_bytes(raw[: len(raw) // 2])
    elif problem == "truncated_nii":
        path, expect = tmp_path / "cut.nii", "truncated"
        img = nib.load(str(TCGA_T1))
        nib.save(img, str(tmp_path / "full.nii"))
        full = (tmp_path / "full.nii").read_bytes()
        path.write_bytes(full[: len(full) // 2])
    elif problem == "not_nifti":
        path, expect = tmp_path / "notes.nii.gz", "not a readable NIfTI"
        path.write_text("this is a text file, not an image\n")
    elif problem == "nan":  # (a label map stored as float too: the message speaks of the data, not an image)
        path, expect = tmp_path / "labels.nii.gz", "the data holds NaN or infinite values"
        data = np.zeros((3, 4, 5), np.float32)
        data[1, 2, 3] = np.nan
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    elif problem == "rgb":  # (was a TypeError traceback; complex data was read as its real part, silently)
        path, expect = tmp_path / "colour.nii.gz", "RGB voxels"
        data = np.zeros((3, 4, 5), [("R", "u1"), ("G", "u1"), ("B", "u1")])
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    elif problem == "complex":
        path, expect = tmp_path / "k_space.nii.gz", "complex64 voxels"
        nib.save(nib.Nifti1Image(np.full((3, 4, 5), 1 + 2j, np.complex64), np.eye(4)), str(path))
    elif problem == "gzip_named_nii":  # (nibabel goes by the name: 'Cannot work out file type of ...')
        path, expect = tmp_path / "scan.nii", "a gzip-compressed file under an uncompressed name; rename it to scan.nii.gz"
        path.write_bytes(raw)
    elif problem in ("nan_pixdim", "nan_sform"):  # (numpy's LinAlgError "SVD did not converge" in preprocessing)
        path, expect = tmp_path / f"{problem}.nii.gz", "affine (sform, qform or pixdim) holds NaN or infinite values"
        header = nib.Nifti1Header()
        header.set_data_shape((3, 4, 5))
        if problem == "nan_pixdim":  # no qform or sform: nibabel's affine is made from the voxel sizes
            header["pixdim"][1:4] = [np.nan, 1, 1]
        else:
            header.set_sform(np.diag([np.nan, 1, 1, 1]), code=2)
        nib.save(nib.Nifti1Image(np.ones((3, 4, 5), np.float32), None, header), str(path))
    else:
        path, expect = tmp_path, "not a file"
    with pytest.raises(Seg3DFastDataError) as e:
        load_nifti(path)
    assert str(path) in str(e.value) and expect in str(e.value)


def test_label_image_keeps_grid_and_header(tmp_path):
    img, _ = load(TCGA_T1)
    labels = np.random.default_rng(0).integers(0, 3, img.shape)
    save_nifti(label_image_like(labels, img), tmp_path / "lab.nii.gz")
    back = nib.load(str(tmp_path / "lab.nii.gz"))
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), labels)
    np.testing.assert_array_equal(back.affine, img.affine)
    np.testing.assert_array_equal(back.header.get_zooms(), img.header.get_zooms())
    assert back.header["sform_code"] == img.header["sform_code"]
    assert back.header["qform_code"] == img.header["qform_code"]
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


@pytest.mark.parametrize("top", [255, 256, 2**15, 40000, 2**31 - 1])
def test_label_image_holds_large_labels(tmp_path, top):
    """Labels past int16 (a model with a stray label of 40000 has 40001 classes) are written as they are, not
    wrapped."""
    img, _ = load(TCGA_T1)
    labels = np.zeros(img.shape, np.int64)
    labels[1, 2, 3], labels[2, 2, 2] = top, 1
    save_nifti(label_image_like(labels, img), tmp_path / "lab.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(tmp_path / "lab.nii.gz")).dataobj), labels)


def test_outputs_drop_the_inputs_display_window_and_intent(tmp_path):
    """A label map or probability map written 'like' an image with a display window (cal_max 3000) and ITK's
    vector intent must not carry them: viewers would show the labels 0..3 in a 0..3000 window (black)."""
    img, t1 = load(TCGA_T1)
    img = nib.Nifti1Image(t1, img.affine, img.header.copy())
    img.header["cal_min"], img.header["cal_max"] = 0, 3000
    img.header.set_intent("vector")
    save_nifti(label_image_like(np.ones(img.shape, np.int64), img), tmp_path / "lab.nii.gz")
    save_nifti(float_image_like(np.ones((*img.shape, 2)), img), tmp_path / "prob.nii.gz")
    for name in ("lab.nii.gz", "prob.nii.gz"):
        header = nib.load(str(tmp_path / name)).header
        assert header["cal_min"] == header["cal_max"] == 0 and header.get_intent()[0] == "none", name


# ---- layouts -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("naming", ["old", "new"])
def test_brats_layout(tmp_path, naming):
    for i in range(2):
        brats_case(tmp_path, f"BraTS_{i:03d}", naming)
    ds = discover(tmp_path, require_labels=True)
    assert ds.layout == "brats" and [c.name for c in ds.cases] == ["BraTS_000", "BraTS_001"]
    expected = ["t1", "t1ce", "t2", "flair"] if naming == "old" else ["t1n", "t1c", "t2w", "t2f"]
    assert ds.channel_names == expected
    assert [p.name.split("_" if naming == "old" else "-")[-1] for p in ds.cases[0].images] == \
        [f"{m}.nii.gz" for m in expected]
    ref, image, label = load_case(ds.cases[0])
    assert image.shape == (4, 48, 64, 10) and set(np.unique(label)) == {0, 1, 2, 4}
    _, t1 = load(TCGA_T1)
    np.testing.assert_allclose(image[2], t1 * 1.6 + 40, rtol=1e-6)  # channel order follows the modality order


def test_brats_missing_modality(tmp_path):
    folder = brats_case(tmp_path, "BraTS_000")
    (folder / "BraTS_000_flair.nii.gz").unlink()
    with pytest.raises(Seg3DFastDataError, match="missing modality file.*flair"):
        discover(tmp_path)


def test_a_bids_subject_is_not_called_a_brats_case_without_saying_what_was_seen(tmp_path):
    """A BIDS subject folder (sub-01_T1w, sub-01_FLAIR: 'flair' is a BRATS modality) is read as a BRATS case with
    three modalities missing: the error names the file that made it look like one and where other layouts go."""
    folder = tmp_path / "sub-01"
    folder.mkdir()
    image, _ = brain_block(tmp_path, "x")
    for name in ("sub-01_T1w.nii.gz", "sub-01_FLAIR.nii.gz"):
        shutil.copy(image, folder / name)
    with pytest.raises(Seg3DFastDataError, match=r"sub-01: BRATS case is missing modality file\(s\) t1, t1ce, t2 "
                                                 r"\(found sub-01_FLAIR.nii.gz\); cases of other layouts can be "
                                                 r"listed in a CSV"):
        discover(tmp_path)


def test_nnunet_layout_multichannel(tmp_path):
    img, t1 = load(TCGA_T1)
    _, tumour = load(TCGA_TUMOUR)
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for case in ("brain_001", "brain_002"):
        save(t1, img.affine, tmp_path / "imagesTr" / f"{case}_0000.nii.gz")
        save(t1 * 2, img.affine, tmp_path / "imagesTr" / f"{case}_0001.nii.gz")
        save(tumour, img.affine, tmp_path / "labelsTr" / f"{case}.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "T1", "1": "T1x2"}, "labels": {"background": 0, "tumour": 1},
         "numTraining": 2, "file_ending": ".nii.gz"}))
    ds = discover(tmp_path, require_labels=True)
    assert ds.layout == "nnunet" and ds.num_classes == 2 and ds.channel_names == ["T1", "T1x2"]
    _, image, label = load_case(ds.cases[1], ds.num_classes)
    np.testing.assert_array_equal(image[1], 2 * image[0])
    np.testing.assert_array_equal(label, tumour)


def test_folder_of_numbered_images_is_one_case_per_file(tmp_path):
    """subject_0001.nii.gz, subject_0002.nii.gz (no _0000) are numbered cases, not channels 1 and 2 of a case
    'subject'; beside nnU-Net channel files (scan_0000, scan_0001), a plain file is a case, not ignored."""
    img, t1 = load(TCGA_T1)
    numbered, mixed = tmp_path / "numbered", tmp_path / "mixed"
    numbered.mkdir()
    mixed.mkdir()
    for i in (1, 2, 3):
        save(t1, img.affine, numbered / f"subject_{i:04d}.nii.gz")
    ds = discover(numbered)
    assert [c.name for c in ds.cases] == ["subject_0001", "subject_0002", "subject_0003"]
    assert all(len(c.images) == 1 for c in ds.cases)
    for name in ("scan_0000", "scan_0001", "other"):
        save(t1, img.affine, mixed / f"{name}.nii.gz")
    assert {c.name: len(c.images) for c in discover(mixed).cases} == {"scan": 2, "other": 1}
    # one file: channel 0 of an nnU-Net case is that case, as in its folder; other numbers are the file's own name
    assert [c.name for c in discover(mixed / "scan_0000.nii.gz").cases] == ["scan"]
    assert [c.name for c in discover(numbered / "subject_0001.nii.gz").cases] == ["subject_0001"]


def test_images_in_other_formats_are_named_not_passed_over(tmp_path, capsys):
    """A folder of Analyze / NIfTI-pair images (.hdr/.img, as FSL's NIFTI_PAIR and SPM write) was 'no cases found'
    with no word of them, and beside NIfTI files they were left out silently (predict wrote fewer cases than the
    folder held): the error, or a note, names them; one passed alone is named as another format."""
    img, t1 = load(TCGA_T1)
    pairs, mixed = tmp_path / "pairs", tmp_path / "mixed"
    pairs.mkdir()
    mixed.mkdir()
    nib.save(nib.Nifti1Pair(t1, img.affine), str(pairs / "a.img"))
    nib.save(nib.AnalyzeImage(t1, img.affine), str(mixed / "b.img"))
    save(t1, img.affine, mixed / "a.nii.gz")
    (mixed / "notes.txt").write_text("not an image\n")
    with pytest.raises(Seg3DFastDataError, match=r"pairs: no cases found .*; 2 file\(s\) in other formats than "
                                                 r"NIfTI, not read \(a.hdr, a.img\): convert them to .nii.gz"):
        discover(pairs)
    with pytest.raises(Seg3DFastDataError, match="a.hdr: an image in another format than NIfTI"):
        discover(pairs / "a.hdr")
    capsys.readouterr()
    assert [c.name for c in discover(mixed).cases] == ["a"]
    err = capsys.readouterr().err
    assert "mixed: 2 file(s) in other formats than NIfTI, not read (b.hdr, b.img)" in err and "notes" not in err


def test_upper_case_file_extensions(tmp_path):
    """.NII.GZ / .NII (scanner exports, Windows tools) are NIfTI files: single files, a folder of channel files with
    their labels in labelsTr, and ground truth found by `evaluate`."""
    from seg3d_fast.metrics import find_label_file

    img, t1 = load(TCGA_T1)
    _, tumour = load(TCGA_TUMOUR)
    single = save(t1, img.affine, tmp_path / "SCAN.NII")
    assert [(c.name, c.images) for c in discover(single).cases] == [("SCAN", [single])]
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for channel in (0, 1):
        save(t1, img.affine, tmp_path / "imagesTr" / f"brain_001_000{channel}.NII.GZ")
    label = save(tumour, img.affine, tmp_path / "labelsTr" / "brain_001.NII.GZ")
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "tumour": 1}}))
    ds = discover(tmp_path, require_labels=True)
    assert ds.layout == "nnunet" and [(c.name, len(c.images), c.label) for c in ds.cases] == [("brain_001", 2, label)]
    assert load_case(ds.cases[0], ds.num_classes)[1].shape == (2, *t1.shape)
    assert find_label_file(tmp_path, "brain_001") == label
    assert [c.name for c in discover(tmp_path / "imagesTr").cases] == ["brain_001"]


def test_msd_layout_4d_images(tmp_path):
    img, t1 = load(TCGA_T1)
    _, tumour = load(TCGA_TUMOUR)
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    save(np.stack([t1, t1 + 5], -1).astype(np.int16), img.affine, tmp_path / "imagesTr" / "BRATS_001.nii.gz")
    save(tumour, img.affine, tmp_path / "labelsTr" / "BRATS_001.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"modality": {"0": "FLAIR", "1": "T1w"}, "labels": {"0": "background", "1": "tumour"},
         "training": [{"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}]}))
    ds = discover(tmp_path)
    assert ds.layout == "msd" and ds.num_classes == 2 and ds.channel_names == ["FLAIR", "T1w"]
    _, image, label = load_case(ds.cases[0], ds.num_classes)
    assert image.shape == (2, 48, 64, 10)
    np.testing.assert_array_equal(image[1] - image[0], 5)


def test_csv_manifest_relative_paths(tmp_path):
    image, label = brain_block(tmp_path / "vols")
    (tmp_path / "m.csv").write_text(f"name,image,label\na,vols/{image.name},vols/{label.name}\nb,{image},\n")
    ds = discover(tmp_path / "m.csv")
    assert ds.layout == "csv" and [c.name for c in ds.cases] == ["a", "b"]
    assert ds.cases[0].label == tmp_path / "vols" / label.name and ds.cases[1].label is None
    assert ds.cases[0].images == ds.cases[1].images == [image]
    with pytest.raises(Seg3DFastDataError, match="m.csv: no label file for case.* b$"):
        discover(tmp_path / "m.csv", require_labels=True)
    (tmp_path / "mask.csv").write_text(f"image,mask\nvols/{image.name},vols/{label.name}\n")  # (mask: read as an image)
    with pytest.raises(Seg3DFastDataError, match="no label file for case.*; its label column must be named 'label' "
                                                 r"\(columns read as images: image, mask\)"):
        discover(tmp_path / "mask.csv", require_labels=True)
    (tmp_path / "m.csv").write_text(f"image,label\nvols/{image.name},\n{image},\n")
    with pytest.raises(Seg3DFastDataError, match="m.csv: duplicate case names brain_image"):
        discover(tmp_path / "m.csv")
    # a row longer than the header; names that would put a case's outputs outside --out (or in a subfolder)
    for rows, line in ((f"a,{image},{label}\nb,{image},{label},extra\n", 3), (f"a,{image},{label},extra\n", 2)):
        (tmp_path / "m.csv").write_text("name,image,label\n" + rows)
        with pytest.raises(Seg3DFastDataError, match=f"m.csv: line {line}: 4 fields, the header has 3"):
            discover(tmp_path / "m.csv")
    for name in ("../evil", "sub/a", "sub\\a", "..", "."):
        (tmp_path / "m.csv").write_text(f"name,image,label\n{name},{image},{label}\n")
        with pytest.raises(Seg3DFastDataError, match="m.csv: line 2: case name .* is not a plain name"):
            discover(tmp_path / "m.csv")


def test_a_folder_of_subjects_images_is_not_a_brats_case(tmp_path):
    """Files named <subject>_T1 (common outside BRATS) are one image per subject, not one case's modalities: their
    names before the modality differ. (It was "BRATS case is missing modality file(s) t1ce, t2, flair".)"""
    for name in ("sub01_T1", "sub02_T1", "sub03-t2"):
        shutil.copy(TCGA_T1, tmp_path / f"{name}.nii.gz")
    ds = discover(tmp_path)
    assert ds.layout == "files" and [c.name for c in ds.cases] == ["sub01_T1", "sub02_T1", "sub03-t2"]
    # one subject's image alone too (it was that error again), while a case folder among others stays strict
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(TCGA_T1, alone / "patient7_T1.nii.gz")
    ds = discover(alone)
    assert ds.layout == "files" and [c.name for c in ds.cases] == ["patient7_T1"]
    brats_case(tmp_path / "brats", "BraTS_000")
    (tmp_path / "brats" / "BraTS_001").mkdir()
    shutil.copy(TCGA_T1, tmp_path / "brats" / "BraTS_001" / "BraTS_001_t1.nii.gz")
    with pytest.raises(Seg3DFastDataError, match="BraTS_001: BRATS case is missing modality file.*t1ce, t2, flair"):
        discover(tmp_path / "brats")


def test_csv_manifest_with_byte_order_mark(tmp_path):
    """Excel saves "CSV UTF-8" with a BOM: the first column must still be 'name', not an image column."""
    image, label = brain_block(tmp_path)
    (tmp_path / "m.csv").write_text(f"name,image,label\ncase0,{image.name},{label.name}\n", encoding="utf-8-sig")
    (case,) = discover(tmp_path / "m.csv").cases
    assert case.name == "case0" and case.images == [image] and case.label == label


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_csv_manifest_with_semicolons_or_tabs(tmp_path, delimiter):
    """Excel's CSV where the decimal mark is a comma uses ';' (with a BOM in "CSV UTF-8"): it read as one image
    column, the case named after the row's last file ('no label file for case(s) case 0_label')."""
    image, label = brain_block(tmp_path, "case 0")
    rows = [["name", "T1, 2 mm", "label"], ["case0", image.name, label.name]]
    (tmp_path / "m.csv").write_text("".join(delimiter.join(r) + "\n" for r in rows), encoding="utf-8-sig")
    ds = discover(tmp_path / "m.csv", require_labels=True)
    assert ds.channel_names == ["T1, 2 mm"] and len(ds.cases) == 1
    assert (ds.cases[0].name, ds.cases[0].images, ds.cases[0].label) == ("case0", [image], label)


def test_grid_mismatch_between_modalities_and_label(tmp_path):
    img, t1 = load(TCGA_T1)
    _, tumour = load(TCGA_TUMOUR)
    shifted = img.affine.copy()
    shifted[0, 3] += 2.0  # 2 mm off
    save(t1, img.affine, tmp_path / "a_0000.nii.gz")
    save(t1[:, :, :-1], img.affine, tmp_path / "a_0001.nii.gz")
    with pytest.raises(Seg3DFastDataError, match=r"a_0001.nii.gz: grid mismatch, shape \(48, 64, 9\)"):
        load_case(discover(tmp_path).cases[0])
    save(t1, img.affine, tmp_path / "a_0001.nii.gz")
    save(tumour, shifted, tmp_path / "lab.nii.gz")
    case = discover(tmp_path).cases[0]
    case.label = tmp_path / "lab.nii.gz"
    with pytest.raises(Seg3DFastDataError, match="lab.nii.gz: grid mismatch, affine"):
        load_case(case)


def test_label_range_checks(tmp_path):
    img, _ = load(CT_LABELS)
    case = discover(CT).cases[0]
    case.label = CT_LABELS
    with pytest.raises(Seg3DFastDataError, match=r"ct_abdomen_crop_labels.nii.gz: label 89 outside the class range 0..4"):
        load_case(case, num_classes=5)
    _, lab = load(CT_LABELS)
    save(lab.astype(np.float32) + 0.5, img.affine, tmp_path / "frac.nii.gz")
    case.label = tmp_path / "frac.nii.gz"
    with pytest.raises(Seg3DFastDataError, match="non-integer"):
        load_case(case)
    save(lab.astype(np.int16) - 1, img.affine, tmp_path / "neg.nii.gz")
    case.label = tmp_path / "neg.nii.gz"
    with pytest.raises(Seg3DFastDataError, match="label -1 outside the class range"):
        load_case(case)
    # values beyond int64 / int32 are named as they are (the int64 cast made 1e20 and 2^63 + 7 negative labels, and
    # 1e12 trained into int32 label maps that wrapped)
    for value, dtype, text in ((1e20, np.float64, "1e+20"), (2**63 + 7, np.uint64, str(2**63 + 7)),
                               (10**12, np.float64, "1000000000000"), (2**31, np.int64, "2147483648")):
        big = lab.astype(dtype)
        big[big == 2] = dtype(value)
        nib.save(nib.Nifti1Image(big, img.affine, dtype=dtype), str(tmp_path / "big.nii.gz"))
        case.label = tmp_path / "big.nii.gz"
        with pytest.raises(Seg3DFastDataError, match=re.escape(f"big.nii.gz: label {text} is too large")):
            load_case(case)
    with pytest.raises(Seg3DFastDataError, match=f"big.nii.gz: label {2**31} outside the class range 0..4"):
        load_case(case, num_classes=5)
    # float storage a hair off the integers (a scale factor's rounding) reads as the integers
    save(lab.astype(np.float32) * np.float32(1.0000001), img.affine, tmp_path / "scaled.nii.gz")
    case.label = tmp_path / "scaled.nii.gz"
    np.testing.assert_array_equal(load_case(case)[2], lab.astype(np.int64))


def test_itk_vector_image_layout(tmp_path):
    """A 5-D NIfTI (X, Y, Z, 1, C), as ITK writes vector images, reads as the (X, Y, Z, C) channels."""
    img, t1 = load(TCGA_T1)
    stacked = np.stack([t1, 2 * t1], axis=-1)[:, :, :, None, :]
    path = save(stacked.astype(np.float32), img.affine, tmp_path / "vec.nii.gz")
    _, data = load_nifti(path)
    assert data.shape == (*t1.shape, 2)
    np.testing.assert_allclose(data[..., 1], 2 * t1, rtol=1e-6)


# ---- preprocessing -------------------------------------------------------------------------------------------
def _skull_stripped(tmp_path):
    """The LAS TCGA crop with a zero border (like a skull-stripped scan), so the foreground crop is non-trivial."""
    img, t1 = load(TCGA_T1)
    t1 = t1.copy()
    t1[:5], t1[-3:], t1[:, :7], t1[:, :, 0] = 0, 0, 0, 0  # whole slabs: the foreground box is what remains
    return save(t1, img.affine, tmp_path / "t1.nii.gz", img.header)


def test_preprocess_canonical_crop_zscore(tmp_path):
    path = _skull_stripped(tmp_path)
    ref, image, label = load_case(discover(path).cases[0])
    x, _, geom = preprocess(ref, image, None)
    canonical = np.asanyarray(nib.as_closest_canonical(nib.load(str(path))).dataobj).astype(np.float32)
    nz = np.argwhere(canonical != 0)
    box = tuple(slice(a, b + 1) for a, b in zip(nz.min(0), nz.max(0)))
    expected = canonical[box]
    fg = expected != 0
    expected = np.where(fg, (expected - expected[fg].mean()) / expected[fg].std(), 0)
    np.testing.assert_allclose(x[0].numpy(), expected, atol=1e-5)
    assert geom.bbox == tuple((s.start, s.stop) for s in box) and geom.shape == (48, 64, 10)


def test_intensities_far_from_one_normalise_and_beyond_float32_are_named(tmp_path):
    """float64 images: intensities of ~1e25 (their squares overflow float32) still normalise to zero mean, unit
    standard deviation; intensities beyond float32's range are named, not read as infinities that wreck training."""
    rng = np.random.default_rng(0)
    data = rng.uniform(1.0, 2.0, (9, 7, 5)) * 1e25
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "big.nii.gz"))
    ref, image, _ = load_case(Case("big", [tmp_path / "big.nii.gz"]))
    x, _, _ = preprocess(ref, image, None)
    assert torch.isfinite(x).all()
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std(correction=0)) - 1) < 1e-4
    nib.save(nib.Nifti1Image(data * 1e15, np.eye(4)), str(tmp_path / "huge.nii.gz"))
    with pytest.raises(Seg3DFastDataError, match="huge.nii.gz: intensities beyond float32's range"):
        load_case(Case("huge", [tmp_path / "huge.nii.gz"]))


def test_preprocess_ct_clip_and_downsample():
    ref, image, label = load_case(discover(CT).cases[0])
    _, lab = load(CT_LABELS)
    x, y, geom = preprocess(ref, image, lab.astype(np.int64), PreprocessConfig(downsample=2, clip=(-200, 300)))
    assert tuple(x.shape) == (1, 24, 20, 6) and tuple(y.shape) == (24, 20, 6)
    clipped = np.clip(image[0], -200, 300)
    z = (clipped - clipped.mean()) / clipped.std()
    assert x.max().item() <= z.max() + 1e-5 and x.min().item() >= z.min() - 1e-5
    assert set(torch.unique(y).tolist()) <= set(np.unique(lab).tolist())
    # majority label of each 2x2x2 block
    block = lab[:2, :2, :2].ravel()
    assert y[0, 0, 0].item() == np.bincount(block).argmax()


def test_preprocess_ct_zero_hu_is_tissue_not_background():
    """In an image with negative values (CT in HU) zero is an intensity (water): those voxels are z-scored like the
    rest, not set to the mean as background, and the crop is the whole volume. (They were background: 0 HU tissue
    became the volume's mean, e.g. -400 HU with air in the window.)"""
    ref, image, _ = load_case(discover(CT).cases[0])
    assert (image[0] == 0).sum() > 100 and image.min() < 0
    x, _, geom = preprocess(ref, image, None, PreprocessConfig(clip=(-1000, 1000)))
    clipped = np.clip(image[0], -1000, 1000)
    np.testing.assert_allclose(x[0].numpy(), (clipped - clipped.mean()) / clipped.std(), rtol=1e-5, atol=1e-5)
    assert geom.bbox == tuple((0, s) for s in image.shape[1:])


def test_preprocess_memory_is_a_few_copies_of_the_image():
    """The foreground box of a CT (non-zero almost everywhere) must not cost np.argwhere's 24 bytes per voxel
    (6x a float32 image; 1.9 GB for 512x512x300): numpy's peak stays within 5 copies of the image."""
    import tracemalloc

    ref, image, _ = load_case(discover(CT).cases[0])
    image = np.tile(image, (1, 2, 2, 4))  # a larger block of the CT, so that fixed costs do not count
    ref = nib.Nifti1Image(np.zeros(image.shape[1:], np.int16), ref.affine)
    tracemalloc.start()
    try:
        x, _, geom = preprocess(ref, image, None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert geom.bbox == tuple((0, s) for s in image.shape[1:])  # (a CT: every voxel is foreground)
    assert peak < 5 * image.nbytes, peak / image.nbytes


def test_downsample_labels_majority():
    lab = torch.zeros(4, 4, 4, dtype=torch.int64)
    lab[:2, :2, :2] = 3
    lab[0, 0, 0] = 1
    lab[2:, 2:, 2:] = 2
    out = downsample_labels(lab, (2, 2, 2))
    assert out[0, 0, 0] == 3 and out[1, 1, 1] == 2 and out[1, 0, 0] == 0


@pytest.mark.parametrize("net, crop, slab_planes", [
    ((5, 7, 6), (9, 13, 11), 2),     # upsampled on every axis, two planes a slab
    ((9, 13, 11), (5, 7, 6), 100),   # downsampled, one slab
    ((7, 6, 5), (7, 12, 10), 3),     # in-plane only
    ((7, 6, 5), (13, 6, 5), 1),      # across planes only, one plane a slab
    ((1, 4, 4), (3, 9, 9), 1),       # one network plane
    ((6, 5, 4), (1, 1, 1), 1),       # to one voxel
    ((20, 17, 15), (47, 33, 29), 5),
    ((4, 4, 4), (4, 4, 4), 3),       # no interpolation
])
def test_crop_probability_slabs(net, crop, slab_planes):
    """Slab by slab, the probabilities of interpolating the logits whole (trilinear, align_corners=False) and
    taking their softmax: against that in float64, at most twice the error of PyTorch doing it in float32; every
    plane once, in order, each slab within its byte budget."""
    gen = torch.Generator().manual_seed(sum(net) + sum(crop))
    logits = 3 * torch.randn((4, *net), generator=gen)
    geometry = Geometry(shape=crop, orientation=None, canonical_shape=crop, bbox=tuple((0, n) for n in crop),
                        processed_shape=net)
    interpolate = torch.nn.functional.interpolate
    expected = interpolate(logits.double()[None], size=crop, mode="trilinear", align_corners=False)[0].softmax(0)
    torch_error = (interpolate(logits[None], size=crop, mode="trilinear", align_corners=False)[0].softmax(0)
                   - expected).abs().max().item()
    bound = 2 * torch_error + 1e-7
    slab_bytes = 4 * 4 * crop[1] * crop[2] * slab_planes
    stops = [0]
    for a, b, probs in crop_probability_slabs(logits.clone(), geometry, slab_bytes=slab_bytes):
        assert a == stops[-1] and probs.shape == (4, b - a, *crop[1:]) and probs.dtype == torch.float32
        assert b - a <= slab_planes
        assert (probs - expected[:, a:b]).abs().max().item() <= bound
        stops.append(b)
    assert stops[-1] == crop[0]
    assert (logits_to_crop_probabilities(logits, geometry) - expected).abs().max().item() <= bound


def _majority_by_area(label, shape):
    """Majority label per output voxel, written out: area-average each label's indicator, keep the largest (the
    smallest label on a tie)."""
    best_value, best = torch.full(shape, -1.0), torch.zeros(shape, dtype=torch.int64)
    for c in torch.unique(label).tolist():
        frac = torch.nn.functional.interpolate((label == c).float()[None, None], size=shape, mode="area")[0, 0]
        better = frac > best_value
        best[better] = c
        best_value = torch.where(better, frac, best_value)
    return best


def test_downsample_labels_equals_the_area_majority():
    """downsample_labels (exact counts; small labels over their bounding boxes only) against the majority of the
    area-averaged indicators: random odd shapes and factors (overlapping windows), ties, labels without 0, labels
    past 2^16; organ-like labels (ellipsoids: most boxes under a quarter of the volume) at 1.7 and 2."""
    rng = np.random.default_rng(4)
    for _ in range(150):
        shape = tuple(int(n) for n in rng.integers(1, 12, 3))
        out = tuple(max(1, int(round(n / rng.uniform(1, 3)))) for n in shape)
        values = rng.choice([0, 1, 2, 3, 7, 70000], size=int(rng.integers(1, 5)), replace=False)
        label = torch.from_numpy(rng.choice(values, size=shape))
        assert torch.equal(downsample_labels(label, out), _majority_by_area(label, out)), (shape, out, values)
    organs = np.zeros((41, 37, 23), np.int64)
    grid = np.ogrid[:41, :37, :23]
    for c in range(1, 30):
        centre, radius = rng.uniform([3, 3, 2], [38, 34, 21]), rng.uniform(1, 6, 3)
        organs[sum(((g - m) / r) ** 2 for g, m, r in zip(grid, centre, radius)) <= 1] = c
    for out in ((24, 22, 14), (20, 18, 11), (41, 37, 23)):
        label = torch.from_numpy(organs)
        assert torch.equal(downsample_labels(label, out), _majority_by_area(label, out)), out


def test_empty_foreground(tmp_path):
    img, t1 = load(TCGA_T1)
    path = save(np.zeros_like(t1), img.affine, tmp_path / "blank.nii.gz")
    ref, image, _ = load_case(discover(path).cases[0])
    with pytest.raises(Seg3DFastDataError, match="blank.nii.gz: empty foreground"):
        preprocess(ref, image, None, name=str(path))


@pytest.mark.parametrize("downsample", [1, 2])
@pytest.mark.parametrize("permute", [False, True])
def test_inverse_restores_input_grid(tmp_path, downsample, permute):
    """A perfect 'network' (one-hot of the preprocessed label) mapped back lands on the original label map:
    exactly without downsampling, nearly (same place, Dice > 0.85) with it; on the LAS real volume and on the
    same volume stored with permuted axes. The label is the real tumour mask plus an ellipsoid large enough
    to survive 2x downsampling of the 6.5 mm slices."""
    t1_path = _skull_stripped(tmp_path)
    img, t1 = load(t1_path)
    _, tumour = load(TCGA_TUMOUR)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in t1.shape], indexing="ij"), -1)
    ellipsoid = (((grid - (14, 40, 5)) / (8, 12, 3.5)) ** 2).sum(-1) <= 1
    lab = np.where(ellipsoid, 2, tumour).astype(np.uint8)
    expected = np.where(t1 != 0, lab, 0)  # labels outside the foreground box are background in the output
    lab_path = save(lab, img.affine, tmp_path / "lab.nii.gz")
    exp_path = save(expected, img.affine, tmp_path / "expected.nii.gz")
    if permute:
        t1_path, lab_path = permuted(t1_path, tmp_path / "p_t1.nii.gz"), permuted(lab_path, tmp_path / "p_lab.nii.gz")
        exp_path = permuted(exp_path, tmp_path / "p_exp.nii.gz")
    img = nib.load(str(t1_path))
    assert nib.aff2axcodes(img.affine) != ("R", "A", "S")
    ref, image, _ = load_case(discover(t1_path).cases[0])
    _, label = load(lab_path)
    _, expected = load(exp_path)
    x, y, geom = preprocess(ref, image, label.astype(np.int64), PreprocessConfig(downsample=downsample))
    logits = 10.0 * torch.nn.functional.one_hot(y, 3).permute(3, 0, 1, 2).float()
    probs = restore_probabilities(logits_to_crop_probabilities(logits, geom), geom)
    assert probs.shape == (3, *img.shape)
    np.testing.assert_allclose(probs.sum(0), 1, atol=1e-5)
    pred = probs.argmax(0)
    if downsample == 1:
        np.testing.assert_array_equal(pred, expected)
    else:
        p, t = pred == 2, expected == 2
        assert 2 * np.sum(p & t) / (p.sum() + t.sum()) > 0.85  # 9 slices -> 4 and back: lossy in z
        np.testing.assert_allclose(np.argwhere(p).mean(0), np.argwhere(t).mean(0), atol=0.5)
    out = tmp_path / "pred.nii.gz"
    save_nifti(label_image_like(pred, img), out)
    back = nib.load(str(out))
    assert back.shape == img.shape
    np.testing.assert_array_equal(back.affine, img.affine)
    np.testing.assert_array_equal(back.header.get_zooms(), img.header.get_zooms())


def test_2d_image_is_a_volume_of_one_slice(tmp_path):
    """A 2D NIfTI (dim[0] == 2, e.g. one slice exported by a viewer) with a 2D label: read as (X, Y, 1); the label
    map written for it is 2D again, on its grid."""
    img, t1 = load(TCGA_T1)
    _, tumour = load(TCGA_TUMOUR)
    z = int(np.argmax(tumour.sum((0, 1))))
    path = save(t1[:, :, z], img.affine, tmp_path / "slice.nii.gz")
    lab_path = save(tumour[:, :, z], img.affine, tmp_path / "slice_label.nii.gz")
    assert nib.load(str(path)).header["dim"][0] == 2
    ref, image, label = load_case(Case("slice", [path], lab_path))
    assert image.shape == (1, *t1.shape[:2], 1) and label.shape == (*t1.shape[:2], 1)
    x, y, geom = preprocess(ref, image, label)
    logits = 10.0 * torch.nn.functional.one_hot(y, 2).permute(3, 0, 1, 2).float()
    probs = restore_probabilities(logits_to_crop_probabilities(logits, geom), geom)
    pred = probs.argmax(0)
    np.testing.assert_array_equal(pred[..., 0], np.where(t1[:, :, z] != 0, tumour[:, :, z], 0))
    save_nifti(label_image_like(pred, ref), tmp_path / "pred.nii.gz")
    back = nib.load(str(tmp_path / "pred.nii.gz"))
    assert back.shape == t1.shape[:2] and back.header["dim"][0] == 2
    np.testing.assert_array_equal(back.affine, ref.affine)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), pred[..., 0])


def test_single_slice_with_zero_slice_thickness(tmp_path):
    """A one-slice volume whose affine has a zero column (slice thickness 0, as some 2D converters write): nibabel
    gives no orientation for that axis; preprocessing keeps it in place and the inverse restores the grid."""
    img, t1 = load(TCGA_T1)
    affine = img.affine.copy()
    affine[:3, 2] = 0
    header = nib.Nifti1Header()
    header.set_data_shape((*t1.shape[:2], 1))
    header.set_data_dtype(np.int16)
    header.set_sform(affine, code=2)
    header.set_qform(None, code=0)
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(t1[:, :, 5:6], None, header), str(path))
    ref, image, _ = load_case(discover(path).cases[0])
    label = (image[0] > 600).astype(np.int64)
    assert 0 < label.sum() < label.size
    x, y, geom = preprocess(ref, image, label)
    logits = 10.0 * torch.nn.functional.one_hot(y, 2).permute(3, 0, 1, 2).float()
    probs = restore_probabilities(logits_to_crop_probabilities(logits, geom), geom)
    assert probs.shape == (2, *t1.shape[:2], 1)
    np.testing.assert_array_equal(probs.argmax(0), label)


def test_flipped_single_slice_axis_of_a_ct_preprocesses(tmp_path):
    """One coronal CT slice stored with axes S, P, R (the length-1 P axis flipped by the reorientation to RAS; every
    voxel foreground, so no crop copies it): np.ascontiguousarray kept the flipped length-1 axis's negative stride
    (numpy calls such an array contiguous) and torch.from_numpy refused the label map, so training failed. Image and
    labels come out in RAS order, and the inverse restores the grid."""
    affine = np.array([[0, 0, 1.0, 0], [0, -1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    assert nib.aff2axcodes(affine) == ("S", "P", "R")
    image = (-1000 + 5 * np.arange(16 * 17, dtype=np.float32)).reshape(16, 1, 17)
    labels = np.zeros((16, 1, 17), np.uint8)
    labels[4:10, 0, 4:11] = 1
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "a.nii.gz"))
    nib.save(nib.Nifti1Image(labels, affine), str(tmp_path / "a_lab.nii.gz"))
    (tmp_path / "train.csv").write_text("name,image,label\na,a.nii.gz,a_lab.nii.gz\n")
    ref, img, label = load_case(discover(tmp_path / "train.csv").cases[0])
    x, y, geom = preprocess(ref, img, label)
    assert tuple(y.shape) == (17, 1, 16) and torch.equal(y, torch.from_numpy(labels.transpose(2, 1, 0).copy()))
    logits = 10.0 * torch.nn.functional.one_hot(y.long(), 2).permute(3, 0, 1, 2).float()
    restored = restore_probabilities(logits_to_crop_probabilities(logits, geom), geom).argmax(0)
    np.testing.assert_array_equal(restored, labels)


def test_gzip_stream_damaged_in_the_middle_is_refused(tmp_path):
    """nibabel inflates only the data block and never reaches the gzip trailer: a stream damaged in the middle (a
    bad sector, a broken download) still inflates, to other voxels, unless its CRC-32 is checked (it was not:
    4725 of 9216 voxels of this block came back different, silently)."""
    image, _ = brain_block(tmp_path, "c0")
    raw = bytearray(image.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 50] = bytes(50)
    bad = tmp_path / "damaged.nii.gz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(Seg3DFastDataError, match="damaged.nii.gz: cannot read the image data, file truncated or corrupt"):
        load_nifti(bad)
    load_nifti(image)  # the intact file still reads
    # bytes after the last whole member that start no member: ignored, as nibabel and gzip -d ignore them (the check
    # refused this file that every other reader takes); a second member whose CRC is wrong is still refused
    trailing = tmp_path / "trailing.nii.gz"
    trailing.write_bytes(image.read_bytes() + b"written by some scanner software\n")
    np.testing.assert_array_equal(load_nifti(trailing)[1], load_nifti(image)[1])
    member = bytearray(gzip.compress(b"more data" * 100))
    member[-8] ^= 0xFF  # its CRC-32
    second = tmp_path / "second.nii.gz"
    second.write_bytes(image.read_bytes() + bytes(member))
    with pytest.raises(Seg3DFastDataError, match="second.nii.gz: cannot read the image data, file truncated or corrupt"):
        load_nifti(second)


@pytest.mark.parametrize("meta,words", [
    ({"training": [{"label": "labelsTr/a.nii.gz"}]}, "'training' entry 0 is not"),
    ({"training": ["imagesTr/a.nii.gz"]}, "'training' entry 0 is not"),
    ({"training": {"image": "a"}}, "'training' must be a list"),
    ({"labels": ["background", "tumour"], "training": []}, "'labels' must be an object"),
    ({"channel_names": {"T1": 0}, "training": []}, "'channel_names' must map channel indices"),
])
def test_dataset_json_of_the_wrong_structure_is_named(tmp_path, meta, words):
    """Valid JSON of the wrong shape in dataset.json: one error naming the file and the key, not a KeyError,
    TypeError or AttributeError traceback."""
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(Seg3DFastDataError, match="dataset.json: " + re.escape(words)):
        discover(tmp_path)


def test_a_full_disk_names_the_file_being_written(tmp_path):
    """ENOSPC raised by a write names no file: write_atomic puts the target's name on it (the command line's
    one-line error then says which file), and removes its temporary file."""
    import errno

    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError, match="No space left on device: '.*out.nii.gz'") as info:
        write_atomic(tmp_path / "out.nii.gz", full)
    assert info.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == []


def test_a_folder_that_cannot_be_written_names_the_file_being_written(tmp_path, monkeypatch):
    """A read-only folder refuses write_atomic's hidden temporary file (and a write may name it): the error names
    the file being written, with its errno and kind, not '.out.nii.gz.x1y2z3.gz'."""
    import errno
    import tempfile

    def read_only(prefix, suffix, dir):
        raise PermissionError(errno.EACCES, "Permission denied", f"{dir}/{prefix}x1y2z3{suffix}")
    with monkeypatch.context() as patch:
        patch.setattr(tempfile, "mkstemp", read_only)
        with pytest.raises(PermissionError, match=r"Permission denied: '[^']*/out.nii.gz'$"):
            write_atomic(tmp_path / "out.nii.gz", lambda tmp: None)

    def refused(tmp):
        raise PermissionError(errno.EACCES, "Permission denied", tmp)
    with pytest.raises(PermissionError, match=r"Permission denied: '[^']*/out.nii.gz'$"):
        write_atomic(tmp_path / "out.nii.gz", refused)
    assert list(tmp_path.iterdir()) == []


def test_temporaries_of_killed_writers_are_removed(tmp_path):
    """A writer killed before write_atomic's clean-up (kill -9) leaves its hidden temporary file; training removes
    those of this host's processes that no longer run, and keeps a running writer's and another host's."""
    import subprocess
    import sys

    from seg3d_fast import files

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    left = tmp_path / f".checkpoint.pt.{files._owner(dead)}.k2j4h5g6.pt"
    running = tmp_path / f".metrics.csv.{files._owner()}.a1b2c3d4.csv"
    other_host = tmp_path / f".curves.png.another-host-{dead}.q1w2e3r4.png"
    kept = [running, other_host, tmp_path / ".hidden", tmp_path / "checkpoint.pt"]
    for path in (left, *kept):
        path.write_bytes(b"x")
    assert files.remove_stale_temporaries(tmp_path) == [left]
    assert sorted(tmp_path.iterdir()) == sorted(kept)


def test_write_atomic_temporaries_name_their_writer(tmp_path):
    """write_atomic's temporary file carries this host and process (what remove_stale_temporaries reads)."""
    from seg3d_fast import files

    seen = []
    write_atomic(tmp_path / "out.json", lambda tmp: (seen.append(os.path.basename(tmp)), open(tmp, "w").close()))
    assert seen[0].startswith(f".out.json.{files._owner()}.") and files.remove_stale_temporaries(tmp_path) == []
