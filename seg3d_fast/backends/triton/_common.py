"""Shared pieces of the Triton backend: environment switches, tile-config lists and 64-bit row indexing."""
import functools
import os

import torch
import triton
import triton.language as tl

from .. import env_flag


def interpreting():
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1): tiny shapes, one small config. Read as Triton
    reads it (its knobs take true/yes/on too: TRITON_INTERPRET=true ran the interpreter while the backend said there
    was no CUDA device and chose the GPU's tile configs)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _patch_interpreter_index():
    """Triton <= 3.6's interpreter turns runtime scalars (1-element arrays) into loop bounds with int(array), which
    NumPy >= 2.4 rejects ("only 0-dimensional arrays can be converted"); later Triton squeezes first. Apply that fix
    to the old interpreter (a no-op on fixed versions and off the interpreter)."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "_seg3d_fixed", False):
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched._seg3d_fixed = True
    interpreter._patch_lang_tensor = patched


if interpreting():
    _patch_interpreter_index()


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def tensor_reasons(tensors: dict) -> list[str]:
    """Why the named tensors ({name: tensor or None}) cannot go to a Triton kernel: device and dtype."""
    reasons = []
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device.type != "cuda" and not interpreting():
            reasons.append(f"{name} is on {t.device.type}: the triton backend needs CUDA tensors "
                           "(or TRITON_INTERPRET=1 for CPU tensors)")
        if t.dtype not in SUPPORTED_DTYPES:
            reasons.append(f"{name} has dtype {t.dtype}: expected float32, float16 or bfloat16")
    return reasons


def by_channel(t):
    """A per-channel vector (bias, PReLU alpha, class weights) as the kernels read it, one value per index at unit
    stride: a strided view (bias[::2] of a larger buffer, an alpha expanded from one value) is copied; None stays."""
    return None if t is None else t.reshape(-1).contiguous()


def autotune_configs(gpu_configs, default, interpreter):
    """Configs for triton.autotune: the full list on a GPU (the default first), one default when
    SEG3D_FAST_AUTOTUNE=0, one small config under the interpreter. Read once, when the kernel module is imported."""
    if interpreting():
        return [interpreter]
    if not env_flag("SEG3D_FAST_AUTOTUNE"):
        return [default]
    key = lambda c: (sorted(c.kwargs.items()), c.num_warps, c.num_stages)  # noqa: E731
    return [default] + [c for c in gpu_configs if key(c) != key(default)]


def dot_precision(dtype):
    """DOT_PREC for `dot`: TF32 for fp32 only where torch allows it for matmuls, else exact fp32.
    "upcast": the interpreter (Triton 3.9) multiplies bf16 tiles wrongly, so it gets them as fp32."""
    if dtype == torch.bfloat16 and interpreting():
        return "upcast"
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


@triton.jit
def dot(a, b, acc, DOT_PREC: tl.constexpr):
    """acc + a @ b on the tensor cores (fp32 accumulation)."""
    if DOT_PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PREC)


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def parallel_slots(device):
    """Programs worth launching to fill the device (4 per SM; 4 under the interpreter, so that tests
    exercise split reductions)."""
    if device.type != "cuda":
        return 4
    return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


# Host-side integer helpers in plain Python: triton.cdiv / triton.next_power_of_2 are constexpr functions whose
# wrappers cost microseconds per call, and the launch path calls them a dozen times.
def cdiv(a, b):
    return -(-a // b)


def next_pow2(n, lo, hi):
    return max(lo, min(hi, 1 << (max(int(n), 1) - 1).bit_length()))


def fast_divisor(d: int) -> tuple[int, int]:
    """(multiplier, shift) for fast_div by d >= 1 (Granlund and Montgomery, "Division by invariant integers using
    multiplication", round-up method, 32 bits): made on the host once per launch."""
    shift = (d - 1).bit_length()  # ceil(log2 d)
    return ((1 << 32) * ((1 << shift) - d)) // d + 1, shift


@triton.jit
def fast_div(n, multiplier, shift):
    """n // d for 0 <= n < 2^31 with (multiplier, shift) = fast_divisor(d): a multiply-high, an add and a shift
    instead of a 32-bit division (about 20 instructions on the GPU)."""
    n_u = tl.cast(n, tl.uint32)
    q = tl.umulhi(n_u, tl.cast(multiplier, tl.uint32)) + n_u  # < 2^32: n < 2^31 and the high half < n
    return tl.cast(q >> tl.cast(shift, tl.uint32), tl.int32)


@triton.jit
def carry_rows(c, b0, a0, n0, E1, E2, E3, M1, S1, M2, S2, M3, S3):
    """(n, i1, i2, i3) of the row(s) c rows past row (n0, a0, b0, 0) of an (N, E1, E2, E3) grid, flattened
    row-major; c (a scalar or a block, 0 <= c < 2^31 - E3) counted from the start of that (n0, a0, b0) line.
    (M, S): fast_divisor of each extent. For a loop over consecutive blocks of rows: the rows of a block, and the
    next block's start, without a division (block_row_coords splits a 64-bit start, once)."""
    q = fast_div(c, M3, S3)
    i3 = c - q * E3
    j = q + b0
    q = fast_div(j, M2, S2)
    i2 = j - q * E2
    j = q + a0
    q = fast_div(j, M1, S1)
    i1 = j - q * E1
    return n0 + q.to(tl.int64), i1, i2, i3


@triton.jit
def row_split(start, E1, E2, E3):
    """(n, i1, i2, i3) of the single row `start` of an (N, E1, E2, E3) grid (a scalar that may pass 2^31: 64-bit
    divisions; n int64, the others int32)."""
    start = start.to(tl.int64)
    t = start // E3
    c0 = (start - t * E3).to(tl.int32)
    t2 = t // E2
    b0 = (t - t2 * E2).to(tl.int32)
    n0 = t2 // E1
    a0 = (t2 - n0 * E1).to(tl.int32)
    return n0, a0, b0, c0


@triton.jit
def block_row_coords(start, E1, E2, E3, BLOCK: tl.constexpr):
    """(n, i1, i2, i3) of the rows start .. start + BLOCK - 1 of an (N, E1, E2, E3) grid, flattened row-major;
    n is int64, the others int32. Rows of big volumes pass 2^31, but only the scalar start is split in 64 bits:
    per row the split is 32-bit, carried from the start's coordinates (64-bit division per element costs
    hundreds of instructions and registers on the GPU)."""
    n0, a0, b0, c0 = row_split(start, E1, E2, E3)
    j = tl.arange(0, BLOCK) + c0  # each carry below is < BLOCK + extent: no int32 overflow
    q = j // E3
    i3 = j - q * E3
    j = q + b0
    q = j // E2
    i2 = j - q * E2
    j = q + a0
    q = j // E1
    i1 = j - q * E1
    n = n0 + q.to(tl.int64)
    return n, i1, i2, i3


@triton.jit
def strided_offset(n, i1, i2, i3, s_n, s_1, s_2, s_3):
    """Element offset (int64) of voxel (n, i1, i2, i3) in a tensor with the given strides."""
    return n.to(tl.int64) * s_n + i1.to(tl.int64) * s_1 + i2.to(tl.int64) * s_2 + i3.to(tl.int64) * s_3
