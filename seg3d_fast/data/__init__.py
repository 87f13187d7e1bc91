"""NIfTI data: reading/writing (nifti), dataset layouts (datasets), preprocessing and its inverse (preprocess)."""
from pathlib import Path

from .datasets import Case, Dataset, discover, load_case, load_label
from .nifti import Seg3DFastDataError, load_nifti, save_nifti
from .preprocess import Geometry, PreprocessConfig, preprocess

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"


def sample_paths():
    """The bundled demo sample: (T1 image, 4-class tissue label map), 2 mm brain MRI (see sample/README.md)."""
    return SAMPLE_DIR / "brain_t1_2mm.nii.gz", SAMPLE_DIR / "brain_tissue_2mm.nii.gz"


__all__ = ["Case", "Dataset", "Geometry", "PreprocessConfig", "Seg3DFastDataError", "discover", "load_case",
           "load_label", "load_nifti", "preprocess", "sample_paths", "save_nifti", "SAMPLE_DIR"]
