"""Triton backend: fused conv3d + bias + PReLU + residual (forward / backward), the Jaccard loss sums and the
upsampling block. Implements the contract in seg3d_fast/backends/API.md; kernels live in conv3d_prelu.py, jaccard.py
and upconv.py."""
import os

NAME = "triton"

try:
    import triton as _triton  # noqa: F401  (the top-level package, not this one)
    _IMPORT_ERROR = None
except Exception as e:  # ImportError, or a broken install
    _IMPORT_ERROR = f"triton cannot be imported ({type(e).__name__}: {e})"


def unavailable_reason():
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    import torch

    from ._common import interpreting

    if torch.cuda.is_available() or interpreting():
        return None
    return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU, slowly)"


if _IMPORT_ERROR is None:
    from .conv3d_prelu import (conv3d_prelu_backward, conv3d_prelu_forward,  # noqa: F401
                               conv3d_prelu_unsupported)
    from .jaccard import (jaccard_loss_reduced, jaccard_loss_reduced_backward, jaccard_sums,  # noqa: F401
                          jaccard_sums_backward, jaccard_unsupported)
    from .upconv import (upconv_prelu_add_backward, upconv_prelu_add_forward,  # noqa: F401
                         upconv_prelu_add_unsupported)
else:
    def conv3d_prelu_unsupported(x, weight, bias, alpha, residual, stride, residual_first):
        return [_IMPORT_ERROR]

    def jaccard_unsupported(logits, target, activation, ignore_index):
        return [_IMPORT_ERROR]

    def upconv_prelu_add_unsupported(x, weight, bias, alpha, skip):
        return [_IMPORT_ERROR]

    def _unavailable(*args, **kwargs):
        raise RuntimeError(f"the triton backend is unavailable: {_IMPORT_ERROR}")

    conv3d_prelu_forward = conv3d_prelu_backward = jaccard_sums = jaccard_sums_backward = _unavailable
    upconv_prelu_add_forward = upconv_prelu_add_backward = _unavailable
