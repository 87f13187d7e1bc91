"""seg3d_fast: fused GPU kernels (Triton, CUDA C++) for memory-efficient 3D medical-image segmentation."""
from . import backends, graphs, nn, ops
from .convert import convert
from .ops import conv3d_prelu, jaccard_from_sums, jaccard_loss, upconv_prelu_add

__version__ = "0.1.0"


def __getattr__(name):
    # The network and the jobs import lazily so `import seg3d_fast` stays light.
    import importlib

    if name in ("models", "data", "metrics", "train", "predict", "profile"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["backends", "graphs", "nn", "ops", "convert", "conv3d_prelu", "jaccard_from_sums", "jaccard_loss",
           "upconv_prelu_add", "__version__"]
