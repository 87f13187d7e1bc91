"""Rebuild the bundled demo sample from the nii2mesh volumes (run once; needs only nibabel and numpy).

    python seg3d_fast/data/sample/make_sample.py SRC_DIR

SRC_DIR holds mri_t1_brain_1mm.nii.gz and its FSL FAST partial-volume maps mri_t1_brain_1mm_{gm,wm}_pve.nii.gz
(nii2mesh data/bet.nii.gz, pve_1.nii.gz, pve_2.nii.gz; BSD-2-Clause). Writes brain_t1_2mm.nii.gz and
brain_tissue_2mm.nii.gz next to this script.
"""
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

FACTOR = 2   # 1 mm -> 2 mm
MARGIN = 2   # voxels of background kept around the brain


def block_mean(a, f):
    s = [n // f * f for n in a.shape]
    a = a[: s[0], : s[1], : s[2]]
    return a.reshape(s[0] // f, f, s[1] // f, f, s[2] // f, f).mean(axis=(1, 3, 5))


def main(src):
    src = Path(src)
    t1_img = nib.load(src / "mri_t1_brain_1mm.nii.gz")
    t1 = np.asanyarray(t1_img.dataobj).astype(np.float64)
    gm = nib.load(src / "mri_t1_brain_1mm_gm_pve.nii.gz").get_fdata()
    wm = nib.load(src / "mri_t1_brain_1mm_wm_pve.nii.gz").get_fdata()
    brain = (t1 > 0).astype(np.float64)
    # Tissue fractions per 1 mm voxel: background / CSF (brain minus GM minus WM) / GM / WM.
    fractions = [1 - brain, np.clip(brain - gm - wm, 0, 1), gm * brain, wm * brain]
    # 2 mm: mean intensity and mean tissue fractions over 2x2x2 blocks; the label is the dominant tissue.
    t1_2mm = block_mean(t1, FACTOR)
    labels = np.argmax(np.stack([block_mean(p, FACTOR) for p in fractions]), axis=0).astype(np.uint8)
    lo = np.maximum(np.argwhere(labels > 0).min(0) - MARGIN, 0)
    hi = np.minimum(np.argwhere(labels > 0).max(0) + 1 + MARGIN, labels.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    # Voxel i of the 2 mm grid is the centre of 1 mm voxels 2i, 2i+1; then shift to the crop origin.
    scale = np.diag([FACTOR, FACTOR, FACTOR, 1.0])
    scale[:3, 3] = (FACTOR - 1) / 2 + FACTOR * lo
    affine = t1_img.affine @ scale
    out = Path(__file__).resolve().parent
    for data, name, dtype in ((np.rint(t1_2mm[crop]), "brain_t1_2mm.nii.gz", np.uint8),
                              (labels[crop], "brain_tissue_2mm.nii.gz", np.uint8)):
        img = nib.Nifti1Image(data.astype(dtype), affine)
        img.header.set_xyzt_units("mm")
        img.header.set_qform(affine, code=1)
        img.header.set_sform(affine, code=1)
        nib.save(img, out / name)
        print(name, img.shape, np.bincount(data.astype(np.int64).ravel())[:4] if "tissue" in name else "")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data")
