"""NIfTI reading and writing: every problem with a file becomes one Seg3DFastDataError naming the file.

Writes are atomic (a temporary file in the same folder, then os.replace), so a failed or interrupted run
never leaves a half-written output behind.
"""
import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from ..files import write_atomic

NIFTI_SUFFIXES = (".nii.gz", ".nii")  # matched in any case: scanners and Windows tools write .NII.GZ / .NII
# Two images share a grid when shapes are equal and affines agree to this (mm, and relative).
AFFINE_ATOL = 1e-3
AFFINE_RTOL = 1e-4


class Seg3DFastDataError(ValueError):
    """Bad input data (missing, unreadable or inconsistent files). The message names the file and the problem."""


def case_name(path):
    """File name without the NIfTI suffix: 'a/b/case_0000.nii.gz' -> 'case_0000'."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def is_nifti_path(path):
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def find_nifti(folder, stem):
    """folder/stem.nii.gz or .nii, in lower or upper case; None when there is none."""
    for suffix in (*NIFTI_SUFFIXES, *(s.upper() for s in NIFTI_SUFFIXES)):
        path = Path(folder) / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def load_nifti(path):
    """-> (nibabel image, numpy data). Reads the whole data block, so truncation is detected here."""
    path = Path(path)
    if not path.exists():
        raise Seg3DFastDataError(f"{path}: file not found")
    if not path.is_file():
        raise Seg3DFastDataError(f"{path}: not a file")
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises several types for foreign or damaged headers
        if not path.name.lower().endswith(".gz") and _starts_with(path, b"\x1f\x8b"):  # (nibabel goes by the name)
            raise Seg3DFastDataError(f"{path}: a gzip-compressed file under an uncompressed name; rename it to "
                                     f"{path.name}.gz") from None
        raise Seg3DFastDataError(f"{path}: not a readable NIfTI file ({_short(e)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise Seg3DFastDataError(f"{path}: not a NIfTI file (nibabel reads it as {type(img).__name__})")
    if not np.isfinite(img.affine).all():  # (NaN voxel sizes or srow entries: io_orientation's SVD failed, a traceback)
        raise Seg3DFastDataError(f"{path}: the header's voxel-to-world affine (sform, qform or pixdim) holds NaN or "
                                 "infinite values; the voxels have no position to reorient or compare")
    try:
        data = np.asanyarray(img.dataobj)
        _check_gzip_stream(path)
    except Exception as e:
        raise Seg3DFastDataError(f"{path}: cannot read the image data, file truncated or corrupt ({_short(e)})") from None
    if data.ndim == 5 and data.shape[3] == 1:  # ITK's vector images: (X, Y, Z, 1 time point, components)
        data = data[:, :, :, 0]
    if data.ndim == 2:  # a 2D image (header dim[0] == 2): a volume of one slice, see grid_shape
        data = data[:, :, None]
    if data.ndim not in (3, 4):
        raise Seg3DFastDataError(f"{path}: expected a 2D or 3D image or a 4D multi-channel volume, got shape "
                                 f"{data.shape}")
    if data.size == 0:
        raise Seg3DFastDataError(f"{path}: empty image, shape {data.shape}")
    if data.dtype.kind not in "biuf":  # RGB (float32 refused its structured type) or complex (cast to its real part)
        raise Seg3DFastDataError(f"{path}: {img.header.get_value_label('datatype')} voxels, expected one real number "
                                 "per voxel (store colour components or real and imaginary parts as channels of a 4D "
                                 "image)")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise Seg3DFastDataError(f"{path}: the data holds NaN or infinite values")
    return img, data


def _starts_with(path, magic):
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def _check_gzip_stream(path):
    """Inflate a gzip file to its end: nibabel reads just the data block and never reaches the trailer, so a stream
    damaged in the middle (still inflatable, other bytes) passes unless its CRC-32 is checked here. Bytes after the
    last whole member that start no member are left alone, as nibabel and gzip -d leave them (the file starts with
    a member's magic number, so gzip's "Not a gzipped file" can only come after a member whose CRC was checked)."""
    if not _starts_with(path, b"\x1f\x8b"):
        return
    with gzip.open(path, "rb") as f:
        try:
            while f.read(1 << 24):
                pass
        except gzip.BadGzipFile as e:
            if not str(e).startswith("Not a gzipped file"):
                raise


def grid_shape(img):
    """(X, Y, Z) of an image's voxel grid; a 2D image (X, Y) is one slice, (X, Y, 1), as load_nifti reads it."""
    return tuple(img.shape[:3]) if len(img.shape) >= 3 else (*img.shape, 1)


# NIfTI's xyzt_units (spatial part) as nibabel names them -> mm per unit; 'unknown' is read as mm
_MM_PER_UNIT = {"meter": 1000.0, "mm": 1.0, "micron": 1e-3, "unknown": 1.0}


def voxel_sizes_mm(img):
    """Voxel size per axis in mm: the affine's column lengths in the header's spatial unit (xyzt_units), converted
    (a microscopy or preclinical volume in microns, a file in meters)."""
    sizes = nib.affines.voxel_sizes(img.affine)
    try:
        unit = img.header.get_xyzt_units()[0]
    except Exception:  # (an unknown code: nibabel raises; read as mm, like 'unknown')
        unit = "unknown"
    return sizes * _MM_PER_UNIT.get(unit, 1.0)


def same_grid(img_a, img_b, shape_a=None, shape_b=None):
    shape_a = tuple(shape_a if shape_a is not None else grid_shape(img_a))
    shape_b = tuple(shape_b if shape_b is not None else grid_shape(img_b))
    return shape_a == shape_b and np.allclose(img_a.affine, img_b.affine, rtol=AFFINE_RTOL, atol=AFFINE_ATOL)


def check_same_grid(ref_path, ref_img, path, img):
    """Raise a data error naming `path` when `img` is not on the grid of `ref_img` (shape and affine)."""
    if grid_shape(img) != grid_shape(ref_img):
        raise Seg3DFastDataError(
            f"{path}: grid mismatch, shape {grid_shape(img)} differs from {grid_shape(ref_img)} of {ref_path}")
    if not same_grid(ref_img, img):
        raise Seg3DFastDataError(f"{path}: grid mismatch, affine differs from the affine of {ref_path}")


def label_image_like(labels, like_img):
    """A label-map image on the grid of `like_img` with its affine and header (data type set to fit the labels);
    labels (X, Y, 1) for a 2D image are written 2D, (X, Y), like it."""
    labels = np.asarray(labels)
    if len(like_img.shape) == 2:
        labels = labels.reshape(like_img.shape)
    lo, hi = labels.min(initial=0), labels.max(initial=0)
    # int32 past int16's range: a 40001-class model's label 40000 was written as int16, -25536
    dtype = np.uint8 if 0 <= lo and hi < 2**8 else np.int16 if -2**15 <= lo and hi < 2**15 else np.int32
    out = type(like_img)(labels.astype(dtype), like_img.affine, _output_header(like_img, dtype))
    out.header.set_slope_inter(1, 0)  # integer labels: no intensity scaling from the input header
    return out


def float_image_like(data, like_img):
    """A float32 image (3D or 4D with channels last) on the grid of `like_img`, keeping its affine and header
    (a 2D image's probabilities are 4D, (X, Y, 1, C): classes stay on the 4th axis)."""
    out = type(like_img)(np.asarray(data, dtype=np.float32), like_img.affine, _output_header(like_img, np.float32))
    out.header.set_slope_inter(1, 0)
    return out


def _output_header(like_img, dtype):
    """The input's header for new data: what describes the input's intensities (display window, intent such as
    ITK's 'vector') is dropped, else viewers show a label map with the image's window (e.g. 0..3000: all black)."""
    header = like_img.header.copy()
    header.set_data_dtype(dtype)
    header.set_intent("none")
    header["cal_min"] = header["cal_max"] = 0
    return header


def save_nifti(img, path):
    """Write atomically (write_atomic; nibabel compresses by the temp file's .nii.gz suffix)."""
    suffix = ".nii.gz" if str(path).lower().endswith(".gz") else ".nii"
    write_atomic(path, lambda tmp: nib.save(img, tmp), suffix=suffix)


def read_json(path):
    """The JSON object in `path` (dataset.json, a run's config.json / splits.json); an unreadable file, invalid
    JSON or anything but an object is a data error naming the file, not a JSONDecodeError traceback."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        raise Seg3DFastDataError(f"{path}: not valid JSON ({_short(e)})") from None
    if not isinstance(value, dict):
        raise Seg3DFastDataError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _short(e):
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]
