"""Preprocessing and its exact inverse.

Forward (training and prediction): reorient to canonical RAS (nibabel.as_closest_canonical), crop to the
bounding box of the non-zero voxels of any channel, optional CT intensity clipping, per-channel z-score
inside that foreground (background set to 0), optional downsampling by a factor ("compressed" input). Zero is
the background only in images without negative values (MRI); in one with negative values (CT) every voxel is
foreground.
Inverse (prediction): logits interpolated back to the cropped grid, softmax, padded with background
outside the crop, reoriented to the input's orientation: the result lies on the input's exact grid. The label map
is the argmax of those probabilities, taken on the crop grid and then restored (restore_labels), so no full-size
(C, X, Y, Z) float array is needed unless the probabilities themselves are saved; for one model, slab by slab
(crop_probability_slabs), so no (C, crop grid) array either.
"""
import math
from dataclasses import asdict, dataclass

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from .nifti import Seg3DFastDataError, grid_shape

_RAS = np.array([[0, 1], [1, 1], [2, 1]])


@dataclass
class PreprocessConfig:
    downsample: float = 1.0           # >1: input shrunk by this factor per axis, logits interpolated back
    clip: tuple | None = None         # (low, high) intensity window applied before z-scoring, e.g. CT HU

    def to_dict(self):
        # clip as a list, as JSON gives it back: config.json and checkpoints are compared with this dict
        d = asdict(self)
        d["clip"] = list(d["clip"]) if d["clip"] is not None else None
        return d

    @classmethod
    def from_dict(cls, d):
        clip = d.get("clip")
        return cls(downsample=float(d.get("downsample", 1.0)), clip=tuple(clip) if clip is not None else None)


@dataclass
class Geometry:
    """Where the network's grid sits in the input: what the inverse needs."""
    shape: tuple                  # input (X, Y, Z)
    orientation: np.ndarray       # nibabel orientation of the input axes (io_orientation of its affine)
    canonical_shape: tuple        # shape after reorientation to RAS
    bbox: tuple                   # ((start, stop) per canonical axis): the foreground crop
    processed_shape: tuple        # after downsampling: the network's input extent
    spacing: tuple = (1.0, 1.0, 1.0)  # voxel size (mm) of the network's grid per canonical axis, after downsampling


def preprocess(ref_img, image, label=None, config=PreprocessConfig(), name="image"):
    """image: float32 (C, X, Y, Z) on ref_img's grid; label: int64 (X, Y, Z) or None.
    -> (x float32 (C, d, h, w), y int64 (d, h, w) or None, Geometry)."""
    orientation = _orientation(ref_img.affine)
    image = _to_canonical(np.moveaxis(image, 0, -1), orientation)  # (X', Y', Z', C)
    image = np.moveaxis(image, -1, 0)
    if label is not None:
        label = _to_canonical(label, orientation)
    # Zero is the background of images without negative values (skull-stripped MRI, zero-padded volumes). With
    # negative values (CT in HU, normalised data) zero is an intensity, 0 HU water: every voxel is foreground.
    foreground = np.any(image != 0, axis=0) if image.min(initial=0) >= 0 else np.ones(image.shape[1:], bool)
    if not foreground.any():
        raise Seg3DFastDataError(f"{name}: empty foreground (every voxel is zero in every channel)")
    bbox = []  # per axis (not np.argwhere: 24 bytes per foreground voxel, 1.9 GB for a 512x512x300 CT)
    for axis in range(3):
        present = np.flatnonzero(foreground.any(axis=tuple(a for a in range(3) if a != axis)))
        bbox.append((int(present[0]), int(present[-1]) + 1))
    bbox = tuple(bbox)
    crop = tuple(slice(a, b) for a, b in bbox)
    image = image[(slice(None), *crop)].astype(np.float32, copy=True)
    foreground = foreground[crop]
    if label is not None:
        label = c_array(label[crop])
    if config.clip is not None:
        np.clip(image, config.clip[0], config.clip[1], out=image)
    for c in range(image.shape[0]):
        values = image[c][foreground]  # statistics in float64: float32 squares overflow past ~1e19
        mean, std = float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64))
        image[c] = (image[c] - mean) / (std if std > 0 else 1.0)
        image[c][~foreground] = 0.0
    x = torch.from_numpy(image)
    y = torch.from_numpy(label) if label is not None else None
    if config.downsample != 1.0:
        target = downsampled_shape(x.shape[1:], config.downsample)
        x = F.interpolate(x[None], size=target, mode="area")[0]
        if y is not None:
            y = downsample_labels(y, target)
    # voxels are not resampled to isotropic: augmentation needs the spacing (downsampling scales it per axis)
    voxel_sizes = _canon_shape(nib.affines.voxel_sizes(ref_img.affine), orientation)  # (permutes any per-axis values)
    spacing = tuple(float(v) * (b - a) / n for v, (a, b), n in zip(voxel_sizes, bbox, x.shape[1:]))
    geometry = Geometry(grid_shape(ref_img), orientation, _canon_shape(grid_shape(ref_img), orientation),
                        bbox, tuple(x.shape[1:]), spacing)
    return x.contiguous(), (y.long().contiguous() if y is not None else None), geometry


def downsampled_shape(shape, factor):
    if factor < 1:
        raise ValueError(f"downsample factor must be >= 1, got {factor}")
    return tuple(max(1, int(round(s / factor))) for s in shape)


def downsample_labels(label, shape):
    """Majority label per output voxel, as area-averaging each class's indicator (F.interpolate "area": adaptive
    average pooling) and keeping the largest gives, the smallest label on a tie: int64 (shape). Counted exactly
    (voxels of the class in each output voxel's window); a class whose bounding box is under a quarter of the volume
    (an organ of a CT with a hundred classes) only over that box, the others over the whole volume by F.interpolate.
    """
    y = label.numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    windows = [_pool_windows(n, m) for n, m in zip(y.shape, shape)]
    lengths = [e - s for s, e in windows]
    window_voxels = np.multiply.outer(np.multiply.outer(lengths[0], lengths[1]), lengths[2])
    boxes = label_boxes(y)
    best_count = np.zeros(shape, dtype=np.int32)
    best = np.zeros(shape, dtype=np.int64)
    for c, box in sorted(boxes.items()):
        if 4 * math.prod(b.stop - b.start for b in box) >= y.size:
            frac = F.interpolate(torch.from_numpy(y == c).float()[None, None], size=shape, mode="area")[0, 0]
            count, region = np.rint(frac.numpy() * window_voxels).astype(np.int32), ()
        else:
            count, region = (y[box] == c).view(np.uint8), []
            for axis, (b, (starts, ends)) in enumerate(zip(box, windows)):
                # the output voxels whose windows meet the box, and their windows' sums along this axis
                o_lo = int(np.searchsorted(ends, b.start, side="right"))
                o_hi = int(np.searchsorted(starts, b.stop, side="left"))
                count = _window_sums(count, axis, np.clip(starts[o_lo:o_hi] - b.start, 0, b.stop - b.start),
                                     np.clip(ends[o_lo:o_hi] - b.start, 0, b.stop - b.start))
                region.append(slice(o_lo, o_hi))
        region = tuple(region)
        better = count > best_count[region]
        best_count[region][better] = count[better]
        best[region][better] = c
    return torch.from_numpy(best)


def label_boxes(y):
    """{label: bounding box (3 slices)} of the labels of a 3D label map, from one bincount per slice along each axis
    (three passes over the volume, whatever the number of labels) for non-negative labels below 2^16; others: the
    whole volume for every label."""
    y = np.asarray(y)
    if not (y.size and y.min() >= 0 and y.max() < 2**16):
        return {int(c): tuple(slice(0, n) for n in y.shape) for c in np.unique(y)}
    y = y.astype(np.uint16, copy=False)
    labels, bounds = y.max() + 1, []
    for axis in range(3):
        moved = np.moveaxis(y, axis, 0)
        present = np.stack([np.bincount(plane.reshape(-1), minlength=labels) for plane in moved]) > 0
        bounds.append((present.argmax(0), moved.shape[0] - present[::-1].argmax(0)))
    return {int(c): tuple(slice(int(lo[c]), int(hi[c])) for lo, hi in bounds) for c in np.flatnonzero(present.any(0))}


def _window_sums(a, axis, starts, ends):
    """Sums of a[starts[i]:ends[i]] along `axis` (windows that may overlap, each non-empty) -> int32: one
    np.add.reduceat over the interleaved bounds, whose odd results (between one window's end and the next's start)
    are dropped; a zero slice appended, so that an end at the axis's end is a valid bound."""
    pad = list(a.shape)
    pad[axis] = 1
    a = np.concatenate([a, np.zeros(pad, dtype=a.dtype)], axis)
    bounds = np.empty(2 * len(starts), dtype=np.int64)
    bounds[0::2], bounds[1::2] = starts, ends
    sums = np.add.reduceat(a, bounds, axis=axis, dtype=np.int32)
    return sums[(slice(None),) * axis + (slice(0, None, 2),)]


def _pool_windows(in_size, out_size):
    """Adaptive average pooling's windows along one axis: output o averages inputs [starts[o], ends[o])."""
    o = np.arange(out_size, dtype=np.int64)
    return o * in_size // out_size, -(-(o + 1) * in_size // out_size)


def crop_probability_slabs(logits, geometry, slab_bytes=2**25):
    """logits (C, d, h, w) on the network grid -> softmax probabilities on the cropped canonical grid, slab by slab
    along its first axis: yields (start, stop, float32 (C, stop - start, H, W)), about `slab_bytes` each.

    The values are those of softmax(F.interpolate(logits, crop shape, "trilinear", align_corners=False)) to float32
    rounding: the interpolation is split into bilinear within planes and linear across them, with PyTorch's source
    indices and weights. No (C, crop grid) array is made: one is 13 GB for 41 classes at 512 x 512 x 300."""
    logits = logits.float()
    crop = tuple(b - a for a, b in geometry.bbox)
    depth = logits.shape[1]
    first, second, w_first, w_second = _linear_weights(depth, crop[0])
    w_first, w_second = w_first.to(logits.device), w_second.to(logits.device)  # (the indices may stay on the host)
    step = max(1, slab_bytes // (4 * logits.shape[0] * crop[1] * crop[2]))
    for a in range(0, crop[0], step):
        b = min(a + step, crop[0])
        lo = int(first[a])
        planes = logits[:, lo:int(second[b - 1]) + 1]
        if tuple(planes.shape[2:]) != crop[1:]:  # (C, planes, h, w) as a batch of C images of `planes` channels
            planes = F.interpolate(planes, size=crop[1:], mode="bilinear", align_corners=False)
        if depth == crop[0]:
            slab = planes
        else:
            slab = (planes[:, first[a:b] - lo] * w_first[a:b, None, None]
                    + planes[:, second[a:b] - lo] * w_second[a:b, None, None])
        yield a, b, torch.softmax(slab, 0)


def _linear_weights(in_size, out_size):
    """PyTorch's linear interpolation along one axis (align_corners=False, sizes given): output i reads inputs
    first[i] and second[i] with weights w_first[i] and w_second[i] (float32, computed as ATen does)."""
    i = torch.arange(out_size, dtype=torch.float32)
    if in_size == out_size:
        return i.long(), i.long(), torch.ones(out_size), torch.zeros(out_size)
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size
    src = (scale * (i + 0.5) - 0.5).clamp_min(0)
    first = src.floor().long().clamp_max(in_size - 1)
    w_second = (src - first).clamp(0, 1)
    second = (first + 1).clamp_max(in_size - 1)
    return first, second, 1 - w_second, w_second


def logits_to_crop_probabilities(logits, geometry, out=None):
    """logits (C, d, h, w) on the network grid (any device) -> softmax probabilities (C, crop grid) float32 on the
    host (crop_probability_slabs, on the logits' device), added to `out` when it is given (an ensemble's sum), else
    in a new array."""
    if out is None:
        out = torch.zeros((logits.shape[0], *(b - a for a, b in geometry.bbox)))
    for a, b, probs in crop_probability_slabs(logits, geometry):
        out[:, a:b] += probs.to(out.device)
    return out


def label_dtype(num_classes):
    """The smallest label-map dtype for this many classes: uint8, int16 beyond 256, int32 beyond 2^15."""
    return torch.uint8 if num_classes <= 2**8 else torch.int16 if num_classes <= 2**15 else torch.int32


def labels_from_probabilities(probs, slab_voxels=2**22):
    """argmax over classes of probs (C, ...) -> labels of label_dtype(C), the first of equal values winning as in
    numpy; taken slab by slab along the first spatial axis, so no int64 volume is made."""
    labels = torch.empty(probs.shape[1:], dtype=label_dtype(probs.shape[0]))
    step = max(1, slab_voxels // math.prod(probs.shape[2:]))
    for a in range(0, probs.shape[1], step):
        labels[a:a + step] = probs[:, a:a + step].argmax(0)
    return labels


def restore_labels(crop_labels, geometry):
    """Labels (crop grid) -> numpy labels (X, Y, Z) on the input grid, of the same dtype: background (0) outside
    the crop, where restore_probabilities gives probability 1 to class 0."""
    full = np.zeros(geometry.canonical_shape, dtype=crop_labels.numpy().dtype)
    full[_crop_box(geometry)] = crop_labels.numpy()
    return input_grid(full, geometry)


def restore_probabilities(crop_probs, geometry):
    """Probabilities (C, crop grid) -> numpy float32 (C, X, Y, Z) on the input grid: background outside the crop."""
    full, crop = canonical_probabilities(crop_probs.shape[0], geometry)
    crop.copy_(crop_probs)
    return input_grid(full, geometry)


def canonical_probabilities(num_classes, geometry):
    """-> (full, crop): numpy float32 (C, canonical grid) holding the background outside the crop (probability 1
    of class 0) and zeros inside it, and a torch view of its crop box, to add the crop grid's probabilities into
    (logits_to_crop_probabilities(..., out=crop)) without a (C, crop grid) array of their own."""
    full = np.zeros((num_classes, *geometry.canonical_shape), dtype=np.float32)
    full[0] = 1.0
    full[(0, *_crop_box(geometry))] = 0.0
    return full, torch.from_numpy(full)[(slice(None), *_crop_box(geometry))]


def input_grid(full, geometry):
    """([C,] canonical grid) -> reoriented back onto the input's grid: a numpy view of `full` ([C,] X, Y, Z) with
    its axes flipped and permuted, not a copy (nibabel writes it as it is)."""
    back = nib.orientations.ornt_transform(_RAS, geometry.orientation)
    channels = full.ndim == 4  # (apply_orientation turns the first three axes)
    full = nib.orientations.apply_orientation(np.moveaxis(full, 0, -1) if channels else full, back)
    full = np.moveaxis(full, -1, 0) if channels else full
    assert full.shape[-3:] == tuple(geometry.shape), (full.shape, geometry.shape)
    return full


def _crop_box(geometry):
    return tuple(slice(a, b) for a, b in geometry.bbox)


def _orientation(affine):
    """nibabel's io_orientation, with an axis that the affine leaves undefined (a zero column: zero voxel size,
    e.g. a single slice; io_orientation gives NaN and nibabel cannot reorient) kept on a free output axis."""
    orientation = nib.orientations.io_orientation(affine)
    undefined = np.isnan(orientation[:, 0])
    if undefined.any():
        free = [a for a in range(3) if a not in orientation[~undefined, 0]]
        orientation[undefined] = [[a, 1] for a in free]
    return orientation


def _to_canonical(array, orientation):
    """Reorder/flip the first three axes to RAS, as nibabel.as_closest_canonical does with the image."""
    return c_array(nib.orientations.apply_orientation(array, orientation))


def c_array(array):
    """np.ascontiguousarray, and a copy where a stride is still negative: numpy calls an array with a flipped
    length-1 axis C-contiguous (its strides are ignored) and returns it as it is, but torch.from_numpy refuses it."""
    array = np.ascontiguousarray(array)
    return array.copy() if any(s < 0 for s in array.strides) else array


def _canon_shape(shape, orientation):
    out = [0, 0, 0]
    for axis, (target, _) in enumerate(orientation):
        out[int(target)] = shape[axis]
    return tuple(out)
