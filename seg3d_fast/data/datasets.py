"""Dataset layouts: BRATS case folders, Medical Segmentation Decathlon / nnU-Net raw, a CSV manifest, plain files.

discover(path) -> Dataset (a list of Case: name, one image file per channel or one 4D file, optional label file).
load_case(case) -> (reference image, float32 array (C, X, Y, Z), int64 label array or None), with every file
checked: readable NIfTI, all channels and the label on one grid, labels integral and inside the class range.
"""
import csv
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .nifti import (Seg3DFastDataError, case_name, check_same_grid, find_nifti, is_nifti_path, load_nifti,
                    read_json)

# BRATS modality suffixes in channel order; old (2012-2021) and new (2023+) naming.
BRATS_MODALITIES = {
    "old": ("t1", "t1ce", "t2", "flair"),
    "new": ("t1n", "t1c", "t2w", "t2f"),
}
BRATS_LABEL = "seg"
_BRATS_TOKENS = {BRATS_LABEL, *(m for naming in BRATS_MODALITIES.values() for m in naming)}
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")  # nnU-Net: case_0000.nii.gz
MAX_LABEL = 2**31 - 1  # prepared label maps are int32 at most (preprocess.label_dtype): a larger value would wrap


@dataclass
class Case:
    name: str
    images: list            # Path per channel, or a single 4D file holding all channels
    label: Path | None = None


@dataclass
class Dataset:
    cases: list
    layout: str                            # "brats" | "msd" | "nnunet" | "csv" | "files"
    channel_names: list = field(default_factory=list)
    num_classes: int | None = None         # from dataset.json; None when only the label maps tell
    root: Path | None = None


def discover(path, require_labels=False):
    """Find the cases under `path` (a dataset folder, a CSV manifest, a case folder or a single NIfTI file)."""
    path = Path(path)
    if not path.exists():
        raise Seg3DFastDataError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() == ".csv":
            ds = _from_csv(path)
        elif is_nifti_path(path):
            # an nnU-Net channel file (case_0000) alone is that case, as in its folder: predict writes case.nii.gz,
            # the name evaluate finds in labelsTr
            m = _CHANNEL_RE.match(case_name(path))
            name = m["case"] if m and m["channel"] == "0000" else case_name(path)
            ds = Dataset([Case(name, [path])], "files", root=path.parent)
        elif _is_other_format(path):
            raise Seg3DFastDataError(f"{path}: an image in another format than NIfTI (.nii/.nii.gz); convert it to "
                                     ".nii.gz (nibabel, SimpleITK, dcm2niix)")
        else:
            raise Seg3DFastDataError(f"{path}: expected a NIfTI file (.nii/.nii.gz), a CSV manifest or a folder")
    elif (path / "dataset.json").is_file():
        ds = _from_dataset_json(path)
    else:
        ds = _from_folder(path)
    # images in other formats (Analyze / NIfTI pairs .hdr/.img, MGH, NRRD, MetaImage, DICOM) are not read: say so,
    # else a folder of them was 'no cases found' and a mixed folder lost its other cases without a word
    others = [p.name for p in _files(path) if _is_other_format(p)] if ds.layout == "files" and path.is_dir() else []
    listed = f"{len(others)} file(s) in other formats than NIfTI, not read ({', '.join(others[:3])}" \
             f"{', ...' if len(others) > 3 else ''}): convert them to .nii.gz" if others else ""
    if not ds.cases:
        raise Seg3DFastDataError(f"{path}: no cases found (expected BRATS case folders, dataset.json with "
                                 f"imagesTr/labelsTr, a CSV manifest or NIfTI files){'; ' + listed if listed else ''}")
    if require_labels:
        missing = [c.name for c in ds.cases if c.label is None]
        if missing:  # (a manifest's 'mask' or 'seg' column is read as an image channel: say which name is a label's)
            hint = (f"; its label column must be named 'label' (columns read as images: {', '.join(ds.channel_names)})"
                    if ds.layout == "csv" and len(missing) == len(ds.cases) else "")
            raise Seg3DFastDataError(f"{path}: no label file for case(s) {', '.join(missing[:5])}{hint}")
    names = [c.name for c in ds.cases]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise Seg3DFastDataError(f"{path}: duplicate case names {', '.join(dup[:5])}")
    if others:
        print(f"seg3d_fast: note: {path}: {listed}", file=sys.stderr, flush=True)
    return ds


def load_case(case, num_classes=None, expect_channels=None):
    """-> (reference nibabel image, image float32 (C, X, Y, Z), label int64 (X, Y, Z) or None)."""
    ref_path, ref_img, channels = None, None, []
    for path in case.images:
        img, data = load_nifti(path)
        wide_float = data.dtype.kind == "f" and data.dtype.itemsize > 4  # (integers and float32 always fit)
        peak = max(-float(data.min()), float(data.max())) if wide_float else 0.0
        if peak > float(np.finfo(np.float32).max):
            raise Seg3DFastDataError(f"{path}: intensities beyond float32's range (up to {peak:.3g}); rescale "
                                     "the image")
        if ref_img is None:
            ref_path, ref_img = path, img
        else:
            check_same_grid(ref_path, ref_img, path, img)
        if data.ndim == 4:
            channels.extend(np.moveaxis(data, -1, 0))
        else:
            channels.append(data)
    image = np.stack([np.asarray(c, dtype=np.float32) for c in channels])
    if expect_channels is not None and image.shape[0] != expect_channels:
        raise Seg3DFastDataError(
            f"{case.images[0]}: case {case.name} has {image.shape[0]} channel(s), the model expects {expect_channels}")
    label = None
    if case.label is not None:
        lab_img, label = load_label(case.label, num_classes)
        check_same_grid(ref_path, ref_img, case.label, lab_img)
    return ref_img, image, label


def load_label(path, num_classes=None):
    """-> (image, int64 label map (X, Y, Z)); values must be integral, >= 0 and < num_classes when given."""
    img, data = load_nifti(path)
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise Seg3DFastDataError(f"{path}: a label map must be 3D, got shape {data.shape}")
    if data.dtype.kind == "f":
        rounded = np.rint(data)
        # (float storage with a scale factor gives values such as 1.0000001: within 1e-3 of an integer they are it)
        if not np.all(np.abs(data - rounded) <= 1e-3):
            raise Seg3DFastDataError(f"{path}: label map has non-integer values (expected class indices)")
        data = rounded
    # before the cast (1e20, or a uint64 past 2^63, wraps to negatives); floats past 2^53 are named as floats (1e+20)
    lo, hi = (int(v) if data.dtype.kind in "iu" or abs(v) < 2**53 else float(v) for v in (data.min(), data.max()))
    if lo < 0:
        raise Seg3DFastDataError(f"{path}: label {lo} outside the class range (labels must be >= 0)")
    if num_classes is not None and hi >= num_classes:
        raise Seg3DFastDataError(f"{path}: label {hi} outside the class range 0..{num_classes - 1}")
    if hi > MAX_LABEL:
        raise Seg3DFastDataError(f"{path}: label {hi} is too large for a class index (at most {MAX_LABEL}); remap "
                                 "the labels to 0..n-1")
    return img, data.astype(np.int64)


# ---- layouts ------------------------------------------------------------------------------------------------
def _from_dataset_json(root):
    """MSD (dataset.json 'training' list, 4D images) or nnU-Net raw (imagesTr/<case>_0000.nii.gz, labelsTr/)."""
    meta_path = root / "dataset.json"
    meta = read_json(meta_path)
    num_classes = _num_classes_from_labels(meta.get("labels"), meta_path)
    channels = meta.get("channel_names") or meta.get("modality") or {}
    if isinstance(channels, dict) and not all(str(k).isdigit() for k in channels):
        raise Seg3DFastDataError(f"{meta_path}: 'channel_names' must map channel indices (\"0\", \"1\", ...) to "
                                 f"names, got keys {sorted(map(str, channels))[:4]}")
    channel_names = [channels[k] for k in sorted(channels, key=int)] if isinstance(channels, dict) else []
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        raise Seg3DFastDataError(f"{root}: dataset.json found but no imagesTr folder")
    grouped = _group_channel_files(images_dir)
    if grouped:  # nnU-Net raw: channels as separate _0000, _0001, ... files
        cases = []
        for name, files in grouped.items():
            if channel_names and len(files) != len(channel_names):
                raise Seg3DFastDataError(f"{images_dir}: case {name} has {len(files)} channel file(s), "
                                         f"dataset.json lists {len(channel_names)}")
            cases.append(Case(name, files, find_nifti(labels_dir, name)))
        return Dataset(cases, "nnunet", channel_names, num_classes, root)
    cases = []  # MSD: 'training' entries point at (possibly 4D) images
    training = meta.get("training") or []
    if not isinstance(training, list):
        raise Seg3DFastDataError(f"{meta_path}: 'training' must be a list of {{\"image\": ..., \"label\": ...}}")
    for i, entry in enumerate(training):
        if not (isinstance(entry, dict) and isinstance(entry.get("image"), str)
                and isinstance(entry.get("label") or "", str)):
            raise Seg3DFastDataError(f"{meta_path}: 'training' entry {i} is not {{\"image\": path, \"label\": path}}: "
                                     f"{json.dumps(entry)[:80]}")
        image = root / entry["image"]
        label = root / entry["label"] if entry.get("label") else None
        cases.append(Case(case_name(image), [image], label))
    if not cases:  # no list: every NIfTI in imagesTr is one case
        cases = [Case(case_name(p), [p], find_nifti(labels_dir, case_name(p))) for p in _nifti_files(images_dir)]
    return Dataset(cases, "msd", channel_names, num_classes, root)


def _num_classes_from_labels(labels, where):
    """dataset.json 'labels': MSD {"0": "background", ...} or nnU-Net v2 {"background": 0, ...}."""
    if not labels:
        return None
    if not isinstance(labels, dict):
        raise Seg3DFastDataError(f"{where}: 'labels' must be an object ({{\"0\": \"background\", ...}} or "
                                 f"{{\"background\": 0, ...}}), got {type(labels).__name__}")
    values = []
    for k, v in labels.items():
        for candidate in (k, v):
            if isinstance(candidate, int) or (isinstance(candidate, str) and candidate.isdigit()):
                values.append(int(candidate))
                break
    if not values:
        raise Seg3DFastDataError(f"{where}: cannot read class indices from 'labels'")
    return max(values) + 1


def _from_csv(path):
    """Header row; columns 'name' (optional), one or more image columns, 'label' (optional, may be empty)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # (Excel's "CSV UTF-8" starts with a BOM)
            # Excel separates fields with ';' where the decimal mark is a comma (and some tools with tabs): read as one
            # column, such a manifest named a wrong case in a wrong error. The header's most frequent one is used.
            delimiter = max(",;\t", key=f.readline().count)
            f.seek(0)
            reader = csv.DictReader(f, delimiter=delimiter)
            rows, columns = list(reader), reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise Seg3DFastDataError(f"{path}: cannot read the CSV manifest ({e})") from None
    if not rows:
        raise Seg3DFastDataError(f"{path}: CSV manifest has no rows")
    image_cols = [c for c in columns if c and c.strip().lower() not in ("name", "case", "label")]
    label_col = next((c for c in columns if c and c.strip().lower() == "label"), None)
    name_col = next((c for c in columns if c and c.strip().lower() in ("name", "case")), None)
    if not image_cols:
        raise Seg3DFastDataError(f"{path}: CSV manifest needs at least one image column besides name/label")
    cases = []
    for i, row in enumerate(rows, start=2):
        if None in row:  # (csv.DictReader keeps a row's fields beyond the header under None)
            raise Seg3DFastDataError(f"{path}: line {i}: {len(columns) + len(row[None])} fields, the header has "
                                     f"{len(columns)}")
        images = []
        for c in image_cols:
            value = (row.get(c) or "").strip()
            if not value:
                raise Seg3DFastDataError(f"{path}: line {i}: empty image path in column '{c}'")
            images.append(_resolve(path.parent, value))
        label = (row.get(label_col) or "").strip() if label_col else ""
        name = (row.get(name_col) or "").strip() if name_col else ""
        if name in (".", "..") or "/" in name or "\\" in name:  # (it names the output files)
            raise Seg3DFastDataError(f"{path}: line {i}: case name {name!r} is not a plain name (it names the case's "
                                     "output files: no '/', '\\', '.' or '..')")
        cases.append(Case(name or case_name(images[0]), images, _resolve(path.parent, label) if label else None))
    return Dataset(cases, "csv", image_cols, None, path.parent)


def _from_folder(root):
    """A folder of BRATS case folders, one BRATS case folder, or plain NIfTI files (grouped by _0000 suffix)."""
    brats = [_brats_case(d) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    brats = [c for c in brats if c is not None]
    if brats:
        return Dataset(brats, "brats", list(_brats_naming(brats[0])), None, root)
    single = _brats_case(root, lone=False)
    if single is not None:
        return Dataset([single], "brats", list(_brats_naming(single)), None, root.parent)
    grouped = _group_channel_files(root, strict=False)
    channel_files = {p for files in grouped.values() for p in files}
    singles = [Case(case_name(p), [p]) for p in _nifti_files(root) if p not in channel_files]
    return Dataset([Case(n, f) for n, f in grouped.items()] + singles, "files", [], None, root)


def _brats_case(folder, lone=True):
    """A Case when `folder` holds BRATS-named modality files of one case (one name before the modality), else None.
    Missing modalities are an error. (A folder of sub01_T1, sub02_T1, ... is several subjects' images, not a case.)
    lone=False: one modality file alone (no other, no label) is an image, not a case missing three (a folder holding
    one subject's sub01_T1)."""
    by_suffix, prefixes = {}, set()
    for p in _nifti_files(folder):
        *prefix, token = re.split(r"([_-])", case_name(p))
        token = token.lower()
        by_suffix[token] = p
        if token in _BRATS_TOKENS:
            prefixes.add("".join(prefix[:-1]).lower())
    if len(prefixes) > 1:
        return None
    for naming in BRATS_MODALITIES.values():
        present = [m for m in naming if m in by_suffix]
        if not present:
            continue
        missing = [m for m in naming if m not in by_suffix]
        if not lone and len(present) == 1 and BRATS_LABEL not in by_suffix:
            return None
        if missing:  # (a BIDS subject's sub-01_FLAIR.nii.gz beside sub-01_T1w.nii.gz comes here too: say what was seen)
            found = ", ".join(by_suffix[m].name for m in present)
            raise Seg3DFastDataError(f"{folder}: BRATS case is missing modality file(s) {', '.join(missing)} (found "
                                     f"{found}); cases of other layouts can be listed in a CSV (README: Dataset "
                                     "layouts)")
        return Case(folder.name, [by_suffix[m] for m in naming], by_suffix.get(BRATS_LABEL))
    return None


def _brats_naming(case):
    token = re.split(r"[_-]", case_name(case.images[0]))[-1].lower()
    return next(n for n in BRATS_MODALITIES.values() if token in n)


def _group_channel_files(folder, strict=True):
    """{case: [channel files in order]} for nnU-Net-style names (case_0000.nii.gz ...); {} when none match.
    strict=False (a plain folder of images): names such as subject_0001.nii.gz whose case has no _0000 file are
    numbered cases, not channels, and are left out of the groups."""
    groups = {}
    for p in _nifti_files(folder):
        m = _CHANNEL_RE.match(case_name(p))
        if m:
            groups.setdefault(m["case"], {})[int(m["channel"])] = p
    if not strict:
        groups = {name: by_index for name, by_index in groups.items() if 0 in by_index}
    out = {}
    for name, by_index in sorted(groups.items()):
        expected = list(range(len(by_index)))
        if sorted(by_index) != expected:
            raise Seg3DFastDataError(f"{folder}: case {name} has channel files {sorted(by_index)}, expected {expected}")
        out[name] = [by_index[i] for i in expected]
    return out


def _nifti_files(folder):
    return [p for p in _files(folder) if is_nifti_path(p)]


def _files(folder):
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))


# medical image formats that are not NIfTI files (.hdr/.img: Analyze 7.5 and NIfTI-1 pairs)
OTHER_IMAGE_SUFFIXES = (".hdr", ".img", ".img.gz", ".hdr.gz", ".mgz", ".mgh", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


def _is_other_format(path):
    return str(path).lower().endswith(OTHER_IMAGE_SUFFIXES)


def _resolve(base, value):
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p
