"""Small real volumes for the data/train/predict/CLI tests: fixture paths and tiny datasets built from them."""
from pathlib import Path

import nibabel as nib
import numpy as np

from seg3d_fast.data import sample_paths

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TCGA_T1 = FIXTURES / "tcga_brain1_t1_crop.nii.gz"          # LAS orientation, int16
TCGA_TUMOUR = FIXTURES / "tcga_brain1_tumour_crop.nii.gz"
CT = FIXTURES / "ct_abdomen_crop.nii.gz"                     # RAS, HU
CT_LABELS = FIXTURES / "ct_abdomen_crop_labels.nii.gz"
# A small block of the bundled 2 mm brain sample (background, CSF, GM, WM all present).
BRAIN_BLOCK = (slice(22, 46), slice(30, 54), slice(28, 44))


def load(path):
    img = nib.load(str(path))
    return img, np.asanyarray(img.dataobj)


def save(data, affine, path, header=None):
    img = nib.Nifti1Image(np.asarray(data), affine, header)
    if header is None:
        img.header.set_qform(affine, code=1)
        img.header.set_sform(affine, code=1)
    nib.save(img, str(path))
    return Path(path)


def brain_block(folder, name="brain", block=BRAIN_BLOCK):
    """Write a crop of the bundled sample: -> (image path, label path)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for src, kind in zip(sample_paths(), ("image", "label")):
        img = nib.load(str(src)).slicer[block]
        out.append(save(np.asanyarray(img.dataobj), img.affine, folder / f"{name}_{kind}.nii.gz", img.header))
    return tuple(out)


def brain_csv(folder, n_cases=2):
    """A CSV manifest of n small brain blocks (shifted crops of the sample): -> manifest path."""
    folder = Path(folder)
    rows = ["name,image,label"]
    for i in range(n_cases):
        block = tuple(slice(s.start + 4 * i, s.stop + 4 * i) for s in BRAIN_BLOCK)
        image, label = brain_block(folder, f"case{i}", block)
        rows.append(f"case{i},{image.name},{label.name}")
    (folder / "train.csv").write_text("\n".join(rows) + "\n")
    return folder / "train.csv"


def permuted(img_path, out_path, order=(2, 0, 1)):
    """The same real volume stored with permuted axes (a different, non-canonical orientation)."""
    img, data = load(img_path)
    affine = img.affine.copy()
    affine[:3, :3] = affine[:3, list(order)]
    return save(np.ascontiguousarray(np.transpose(data, order)), affine, out_path)


def brats_case(root, name, naming="old"):
    """A BRATS case folder made from the TCGA crop: 4 modalities (intensity variants) + a 0/1/2/4 label map."""
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    img, t1 = load(TCGA_T1)
    _, tumour = load(TCGA_TUMOUR)
    t1 = t1.astype(np.float32)
    modalities = {"old": ("t1", "t1ce", "t2", "flair"), "new": ("t1n", "t1c", "t2w", "t2f")}[naming]
    sep = "_" if naming == "old" else "-"
    for i, m in enumerate(modalities):
        save((t1 * (1 + 0.3 * i) + 20 * i).astype(np.float32), img.affine, folder / f"{name}{sep}{m}.nii.gz")
    seg = np.zeros(tumour.shape, np.uint8)
    seg[tumour > 0] = 2
    half = tumour.shape[0] // 2
    seg[:half][tumour[:half] > 0] = 4
    seg[:half, :, :5][tumour[:half, :, :5] > 0] = 1
    save(seg, img.affine, folder / f"{name}{sep}seg.nii.gz")
    return folder
