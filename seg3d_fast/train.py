"""Training: Seg3DNet + Jaccard loss + Adam on full volumes or random crops, k-fold splits, exact resume, DDP.

A run folder holds config.json (model, preprocessing, classes: what prediction needs), splits.json (k-fold case
names) and one folder per fold: checkpoint.pt (written atomically every epoch), metrics.csv / metrics.json
(one row per epoch) and curves.png.

Reproducibility: the model is initialised from the seed; the sample order of epoch e comes from a
DistributedSampler seeded with (seed, e), and every crop/augmentation from numpy's generator seeded with
(seed, e, sample index). So training 2 epochs equals training 1 and resuming for 1, and every rank of a
multi-process run draws its own samples without any shared random state.

Multi-GPU: `torchrun --nproc_per_node=N -m seg3d_fast train ...` (NCCL on GPUs, gloo on CPU); only rank 0 writes.
"""
import argparse
import datetime
import functools
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import backends, graphs
from .data.datasets import discover, load_case
from .data.nifti import Seg3DFastDataError, read_json
from .data.preprocess import PreprocessConfig, label_dtype, preprocess
from .files import remove_stale_temporaries, stop_if_terminated, write_atomic, write_text_atomic
from .metrics import mean_foreground_dice, mean_foreground_dice_tensor
from .predict import on_device_or_host, predict_logits, read_checkpoint

CONFIG_FILE, SPLITS_FILE, CHECKPOINT_FILE = "config.json", "splits.json", "checkpoint.pt"
CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "history", "rng", "config")  # what --resume reads
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# In-plane voxel sizes this close count as equal for 90-degree rotations (the rounding of downsampled sizes alone
# makes them differ by a few percent on small crops).
SAME_SPACING_RTOL = 0.05
PROGRESS_SECONDS = 1.0  # the progress bar's loss and Dice are read from the GPU at most this often (each read waits)


@dataclass
class TrainConfig:
    data: str
    out: str
    fold: int = 0
    folds: int = 1                      # 1: train on every case, no validation
    epochs: int = 50
    samples_per_epoch: int | None = None  # default: the number of training cases
    batch_size: int = 1
    crop: tuple | None = None           # (D, H, W) random crops; None: whole (preprocessed) volumes
    fg_prob: float = 0.33               # share of crops centred on a foreground voxel (class drawn first)
    lr: float = 1e-3
    lr_schedule: str = "poly"           # "poly": lr * (1 - epoch / epochs) ** 0.9, or "constant"
    weight_decay: float = 0.0
    amp: str = "none"                   # "none" | "bf16" | "fp16" (fp16 only on CUDA, with a grad scaler)
    downsample: float = 1.0
    clip: tuple | None = None
    features: tuple = (8, 16, 32, 64)
    skip: str = "sum"
    norm: str | None = None
    num_classes: int | None = None      # default: dataset.json, else the largest label + 1
    augment: bool = True                # random flips, in-plane 90-degree rotations, contrast/brightness
    mirror_axes: tuple = (0, 1, 2)      # the canonical (RAS) axes flipped at random (2 alone where classes have a
                                        # side: see augment); predict --tta averages over the same flips
    val_every: int = 1
    seed: int = 0
    device: str = "auto"
    backend: str | None = None
    cuda_graph: bool | None = None      # forward + backward replayed as one CUDA graph; None: where it can run
                                        # (one CUDA device, one process, a --crop: every batch of one shape)
    workers: int | None = None          # data loader processes; None: data_workers()'s choice
    cache_dir: str | None = None        # preprocessed cases as .npy files read through memory maps (big datasets)
    resume: bool = False
    overwrite: bool = False             # train this fold again from scratch, replacing its checkpoint
    progress: bool = True
    extra: dict = field(default_factory=dict)  # free-form notes saved with the run (e.g. the demo's split)


# ---- data ---------------------------------------------------------------------------------------------------
class PreparedCase:
    """One preprocessed case: x (C, d, h, w) float32, y (d, h, w) labels (uint8, or int16 / int32 for larger
    values), a sample of foreground voxels, voxel size per axis (mm). The arrays are in memory, or memory maps of a
    cache folder's files (prepare with cache_dir): the crops read only their own voxels from them."""

    def __init__(self, name, x, y, spacing=(1.0, 1.0, 1.0), foreground=None):
        self.name, self.x, self.y, self.spacing = name, x, y, tuple(spacing)
        self.foreground = foreground_sample(y) if foreground is None else foreground

    def __getstate__(self):
        # a memory map goes to a data-loader worker as its file, not its data (workers started by spawn or
        # forkserver get the dataset pickled: each would otherwise hold a copy of every cached case)
        state = dict(self.__dict__)
        for key in ("x", "y"):
            if isinstance(state[key], np.memmap) and state[key].filename:
                state[key] = _MappedFile(state[key].filename)
        return state

    def __setstate__(self, state):
        for key in ("x", "y"):
            if isinstance(state[key], _MappedFile):
                state[key] = np.load(state[key].path, mmap_mode="r")
        self.__dict__.update(state)


@dataclass(frozen=True)
class _MappedFile:
    path: str


FOREGROUND_PER_CLASS = 2000  # voxels kept per foreground class: a fixed sample is enough to centre crops on


def foreground_sample(y):
    """(K, 4) int64 rows (class, i, j, k), sorted by class: up to FOREGROUND_PER_CLASS random voxels of each
    foreground class of the label map y, so that foreground crops centre on every class equally often (random_crop):
    a small class (an enhancing tumour core, a thin vessel) as often as a large one."""
    rng = np.random.default_rng(0)
    labels = y.reshape(-1)
    counts = np.bincount(labels, minlength=1)
    # every voxel index ordered by class, each class's in increasing order: one radix sort of the (8- or 16-bit)
    # labels instead of a pass over the volume per class (104 classes at 512 x 512 x 300: 1.7 s instead of 6)
    order = np.argsort(labels, kind="stable")
    ends = np.cumsum(counts)
    rows = []
    for c in np.flatnonzero(counts[1:]) + 1:
        flat = order[ends[c] - counts[c]:ends[c]]
        if len(flat) > FOREGROUND_PER_CLASS:
            flat = np.sort(rng.choice(flat, FOREGROUND_PER_CLASS, replace=False))
        rows.append(np.column_stack([np.full(len(flat), c), *np.unravel_index(flat, y.shape)]))
    return np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 4), np.int64)


def _writable(a, source=None):
    """A contiguous array torch can own: a view of a cached case's read-only memory map is copied (only the crop),
    and so is one that still shares memory with `source` (a crop that is a contiguous part of the case): a batch
    of one is not copied again on its way to the model. Copies are made by _new_array."""
    if any(s < 0 for s in a.strides) or not a.flags.c_contiguous or not a.flags.writeable or type(a) is not np.ndarray \
            or (source is not None and np.may_share_memory(a, source)):
        out = _new_array(a.shape, a.dtype)
        np.copyto(out, a)
        return out
    return a


def _new_array(shape, dtype):
    """An empty C-ordered array for a training item: in a data loader worker, in shared memory, from which the
    batch reaches the main process as it is (PyTorch copies a tensor in ordinary memory there on the way: 47 MB, more
    time than the crop itself, for a 4 x 128 x 160 x 144 float32 crop)."""
    if torch.utils.data.get_worker_info() is None:
        return np.empty(shape, dtype)
    return _shared_tensor(shape, torch.from_numpy(np.empty(0, dtype)).dtype).numpy()


def _as_tensor(a):
    """torch.from_numpy(a); for an array of _new_array's in shared memory, the tensor it views, which PyTorch then
    sends from a worker as it is (from_numpy's tensor would not say it is shared)."""
    base = a.base
    if isinstance(base, torch.Tensor) and base.data_ptr() == a.ctypes.data and tuple(base.shape) == a.shape:
        return base
    return torch.from_numpy(a)


def _shared_tensor(shape, dtype):
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


class CropDataset(torch.utils.data.Dataset):
    """Item i of epoch e: case i % n, cropped and augmented with numpy's generator seeded by (seed, e, i). Items are
    indexed by i (epoch: the `epoch` attribute) or by (e, i), as EpochSampler gives them to data loader workers that
    persist across epochs (and so never see the attribute change)."""

    def __init__(self, cases, length, crop, fg_prob, augment, seed, mirror_axes=(0, 1, 2)):
        self.cases, self.length, self.crop = cases, length, crop
        self.fg_prob, self.augment, self.seed, self.epoch = fg_prob, augment, seed, 0
        self.mirror_axes = tuple(mirror_axes)

    def __len__(self):
        return self.length

    def __getitem__(self, item):
        epoch, i = item if isinstance(item, tuple) else (self.epoch, item)
        rng = np.random.default_rng([self.seed, epoch, i])
        case = self.cases[i % len(self.cases)]
        x, y = case.x, case.y
        if self.crop is not None:
            x, y = random_crop(x, y, self.crop, rng, case.foreground if rng.random() < self.fg_prob else None)
        if self.augment:
            x, y = augment(x, y, rng, case.spacing, self.mirror_axes)
            x = augment_intensity(x, rng)
        return _as_tensor(_writable(x, case.x)), _as_tensor(_writable(y, case.y))


class EpochSampler(torch.utils.data.Sampler):
    """A sampler's indices i as (epoch, i) for CropDataset: the epoch travels with each index to the workers."""

    def __init__(self, sampler):
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, i) for i in self.sampler)

    def __len__(self):
        return len(self.sampler)


def random_crop(x, y, size, rng, foreground=None):
    """A crop of `size` (padded with background where the volume is smaller), centred, when `foreground`
    (foreground_sample's (class, i, j, k) rows) is given and not empty, on a random voxel of a class drawn
    uniformly from the classes in it."""
    shape = y.shape
    pad = [max(0, s - n) for s, n in zip(size, shape)]
    if any(pad):
        x = np.pad(x, [(0, 0)] + [(p // 2, p - p // 2) for p in pad])
        y = np.pad(y, [(p // 2, p - p // 2) for p in pad])
        shape = y.shape
    if foreground is not None and len(foreground):
        classes, first = np.unique(foreground[:, 0], return_index=True)
        pick = int(rng.integers(len(classes)))
        stop = first[pick + 1] if pick + 1 < len(classes) else len(foreground)
        centre = foreground[int(rng.integers(first[pick], stop)), 1:] + np.array([p // 2 for p in pad])
        start = [int(np.clip(c - s // 2, 0, n - s)) for c, s, n in zip(centre, size, shape)]
    else:
        start = [int(rng.integers(0, n - s + 1)) for s, n in zip(size, shape)]
    sl = tuple(slice(a, a + s) for a, s in zip(start, size))
    return x[(slice(None), *sl)], y[sl]


def augment(x, y, rng, spacing, mirror_axes=(0, 1, 2)):
    """Flip each of `mirror_axes` with probability 1/2; rotate by a multiple of 90 degrees in the axial (x, y)
    plane: by 0 or 180 degrees only when that plane is not square (crop shapes stay fixed) or its two voxel sizes
    (`spacing`, mm per axis) differ by more than SAME_SPACING_RTOL: a 90-degree turn would stretch the anatomy by
    their ratio.
    Turns keep left and right apart, flips do not: a flip of axis 0 makes a left kidney look like a right one, and
    so does one of axis 1 followed by the 180-degree turn (itself a flip of axes 0 and 1): where classes have a
    side, flip axis 2 alone."""
    for axis in range(3):
        if rng.random() < 0.5 and axis in mirror_axes:  # (drawn for every axis: the same crops whichever are left out)
            x, y = np.flip(x, axis + 1), np.flip(y, axis)
    turn_90 = y.shape[0] == y.shape[1] and math.isclose(spacing[0], spacing[1], rel_tol=SAME_SPACING_RTOL)
    k = int(rng.integers(4)) if turn_90 else 2 * int(rng.integers(2))
    if k:
        x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k, axes=(0, 1))
    return x, y


def augment_intensity(x, rng, scale=0.1, shift=0.1):
    """Per-channel random contrast and brightness on the z-scored image (x * U(1 +- scale) + U(+- shift)):
    robustness to the per-image normalisation of differently composed volumes."""
    c = x.shape[0]
    a = rng.uniform(1 - scale, 1 + scale, c).astype(np.float32)
    b = rng.uniform(-shift, shift, c).astype(np.float32)
    # one contiguous output, written channel by channel: the multiply is the crop's (flipped, turned) copy, the add
    # runs on a channel still in cache. A crop's x * a + b made two volume-sized temporaries (about twice the time).
    out = _new_array(x.shape, np.float32)
    if x.strides[-1] < 0 and torch.get_num_threads() == 1:
        _affine_innermost_reversed(x, a, b, out)
        return out
    for i in range(c):
        np.multiply(x[i], a[i], out=out[i])
        out[i] += b[i]
    return out


def _affine_innermost_reversed(x, a, b, out, slab=16):
    """out[i] = x[i] * a[i] + b[i] (the same roundings) where x's innermost axis is reversed (a crop flipped along
    its last axis): numpy copies such an axis element by element, torch's flip 16 bytes at a time (a 4 x 128 x 160 x
    144 float32 crop: 23-25 ms in numpy, 6-11 ms here, against numpy's 4-12 ms for the crop unflipped). Slabs of the
    first axis keep torch's flipped temporary in cache. torch.from_numpy takes no negative strides: each reversed
    axis is turned back in the view and flipped by torch. Used on one torch thread, as in a data loader worker: on
    several, each of these small ops is a parallel region, and on cores busy with other work their waits made the
    whole 5-20x slower than numpy."""
    dims = tuple(d for d, stride in enumerate(x.strides) if stride < 0)
    forward = torch.from_numpy(x[tuple(slice(None, None, -1) if d in dims else slice(None) for d in range(x.ndim))])
    target = torch.from_numpy(out)
    flip = tuple(d - 1 for d in dims if d > 0)  # dims of one channel
    n = x.shape[1]
    for i in range(x.shape[0]):
        channel = forward[x.shape[0] - 1 - i if 0 in dims else i]
        for start in range(0, n, slab):
            stop = min(start + slab, n)
            part = channel[n - stop:n - start] if 0 in flip else channel[start:stop]
            torch.mul(part.flip(flip), float(a[i]), out=target[i, start:stop])
            target[i, start:stop] += float(b[i])


def pad_collate(batch):
    """Stack samples, padding smaller volumes with zeros / background to the largest extent in the batch. Samples
    already of that extent are not copied before the stack, and a batch of one is not copied at all (a training
    crop of 4 x 128 x 160 x 144 is 47 MB: each copy costs the data loader milliseconds per step)."""
    shape = [max(s) for s in zip(*(y.shape for _, y in batch))]
    xs, ys = [], []
    for x, y in batch:
        pad = [p for s, n in zip(reversed(shape), reversed(y.shape)) for p in (0, s - n)]
        xs.append(torch.nn.functional.pad(x, pad) if any(pad) else x)
        ys.append(torch.nn.functional.pad(y, pad) if any(pad) else y)
    if len(batch) == 1:
        return xs[0].unsqueeze(0), ys[0].unsqueeze(0)
    if torch.utils.data.get_worker_info() is None:
        return torch.stack(xs), torch.stack(ys)
    # in a worker, stacked into shared memory (_new_array), as PyTorch's default_collate does
    return tuple(torch.stack(ts, out=_shared_tensor((len(ts), *ts[0].shape), ts[0].dtype)) for ts in (xs, ys))


def data_workers(device, world=1) -> int:
    """Data loader processes when --workers is not given: none on the CPU (the model's own work needs the cores), and
    on a GPU min(8, this process's share of the cores - 1). A full-size crop (4 x 128 x 160 x 144, flipped, turned,
    intensity-augmented) takes the loader about 20 ms on one core of the development machine, where a graphed GPU
    training step takes 9.2 ms (H200, run 5)."""
    if device.type == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(8, cores // world - 1))


def _worker_exits_on_sigterm(worker_id):
    """A data loader worker leaves with exit status 0 on SIGTERM. A SIGTERM sent to the process group (`timeout`, a
    scheduler) reaches the workers too, and PyTorch's workers die by one that is not their main process's: its
    SIGCHLD handler then raised "DataLoader worker (pid N) is killed by signal: Terminated" in the main process, at
    whatever it was running (inside an import guarded by `except Exception`, it was swallowed, and the run went on
    to wait 5 s for the dead workers and end with status 1)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


def make_splits(names, folds, seed):
    """k folds of case names: shuffled with the seed, dealt round-robin. [{'train': [...], 'val': [...]}]."""
    if folds == 1:
        return [{"train": sorted(names), "val": []}]
    if folds > len(names):
        raise Seg3DFastDataError(f"cannot make {folds} folds from {len(names)} case(s)")
    order = sorted(names)
    random.Random(seed).shuffle(order)
    return [{"train": sorted(n for i, n in enumerate(order) if i % folds != k),
             "val": sorted(n for i, n in enumerate(order) if i % folds == k)} for k in range(folds)]


def prepare(cfg, dataset, names, num_classes, channels=None, rank=0, world=1):
    """Load and preprocess cases -> (list of PreparedCase, largest label seen before any downsampling).
    Every case must have `channels` channels (default: as many as the first case).
    With cfg.cache_dir each case is preprocessed once into that folder (reused while its source files, the
    preprocessing and the class count are unchanged) and read back as memory maps, so that the dataset need not fit
    in memory. Rank r of a multi-process run starts at the r-th of `world` equal parts of the list, so that the
    ranks mostly find the others' cases cached, with no barrier: a rank that meets a bad file raises its error, as
    every rank does when it comes to that case, rather than leaving the others waiting."""
    pre = PreprocessConfig(cfg.downsample, cfg.clip)
    by_name = {c.name: c for c in dataset.cases}
    start = rank * len(names) // world if cfg.cache_dir is not None else 0
    prepared_by_name = {}
    for name in names[start:] + names[:start]:
        case = by_name[name]
        if cfg.cache_dir is not None:
            prepared_by_name[name] = _cached_case(Path(cfg.cache_dir), case, pre, num_classes)
        else:
            prepared_by_name[name] = _prepared_case(case, pre, num_classes)
    out, top = [], 0
    for name in names:
        prepared, case_top = prepared_by_name[name]
        if channels is None:
            channels = prepared.x.shape[0]
        elif prepared.x.shape[0] != channels:  # (else a shape error deep inside batching or the model)
            raise Seg3DFastDataError(f"{by_name[name].images[0]}: case {name} has {prepared.x.shape[0]} channel(s), "
                                     f"the dataset's other cases have {channels}")
        top = max(top, case_top)
        out.append(prepared)
    return out, top


def _prepared_case(case, pre, num_classes):
    """-> (PreparedCase in memory, largest label before downsampling)."""
    ref, image, label = load_case(case, num_classes)
    x, y, geometry = preprocess(ref, image, label, pre, name=str(case.images[0]))
    # labels in the smallest type that holds them: uint8 is 1/8 of int64 (the loss and the metrics take any integer)
    y = y.to(label_dtype(int(y.max()) + 1)).numpy()
    return PreparedCase(case.name, x.numpy(), y, geometry.spacing), int(label.max())


CACHE_VERSION = 1  # bump when preprocessing changes what it makes of the same files and settings


def _cached_case(cache_dir, case, pre, num_classes):
    """-> (PreparedCase of memory maps, largest label): from cache_dir/<name>.<key>.json and its .npy files, <key> a
    digest of the fingerprint (source files' path, size and time, preprocessing, class count), when the JSON's
    fingerprint matches and they read back consistent, else preprocessed and written (arrays first, the JSON last,
    each atomically: a stopped run leaves no half case that looks whole). One set of files per fingerprint: runs
    that share the folder with other preprocessing or other files of the same name never read each other's."""
    sources = [Path(p) for p in [*case.images, case.label] if p is not None]
    if not all(p.is_file() for p in sources):
        return _prepared_case(case, pre, num_classes)  # (which names the missing file)
    fingerprint = {"version": CACHE_VERSION, "preprocess": pre.to_dict(), "num_classes": num_classes,
                   "sources": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in sources]}
    text = json.dumps(fingerprint, sort_keys=True)
    fingerprint = json.loads(text)  # (as read back: lists for tuples)
    stem = f"{case.name}.{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    meta_path = cache_dir / f"{stem}.json"
    paths = {key: cache_dir / f"{stem}.{key}.npy" for key in ("x", "y", "foreground")}
    try:
        if read_json(meta_path).get("fingerprint") == fingerprint:
            return _read_cached(case.name, meta_path, paths)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # missing or damaged: made again below
    prepared, top = _prepared_case(case, pre, num_classes)
    try:
        for key, path in paths.items():  # (the temporary file's name ends in .npy: np.save keeps it)
            write_atomic(path, lambda tmp, array=getattr(prepared, key): np.save(tmp, array))
        write_text_atomic(meta_path, json.dumps({"fingerprint": fingerprint, "spacing": list(prepared.spacing),
                                                 "top_label": top}, indent=1) + "\n")
    except OSError as e:  # (a full disk, no permission, a file where the folder should be)
        raise Seg3DFastDataError(f"{cache_dir}: cannot write the preprocessed case {case.name} there "
                                 f"({e.strerror or e})") from None
    return _read_cached(case.name, meta_path, paths)


def _read_cached(name, meta_path, paths):
    """-> (PreparedCase of the cached arrays as read-only memory maps, largest label); ValueError where they do not
    fit together (x's grid is y's, the foreground sample's voxels lie in it)."""
    meta = read_json(meta_path)
    x, y = (np.load(paths[key], mmap_mode="r") for key in ("x", "y"))
    foreground = np.load(paths["foreground"])
    if x.ndim != 4 or x.shape[1:] != y.shape or foreground.ndim != 2 or foreground.shape[1] != 4 or (
            len(foreground) and not (foreground[:, 1:] < np.array(y.shape)).all()):
        raise ValueError(f"cached case {name}: arrays that do not fit together")
    return PreparedCase(name, x, y, meta["spacing"], foreground), int(meta["top_label"])


# ---- distributed ---------------------------------------------------------------------------------------------
# NCCL takes CUDA tensors only: CPU tensors (the epoch's loss and Dice sums) go through gloo
GPU_PROCESS_GROUP = "cpu:gloo,cuda:nccl"
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=2)


def dist_setup(device_arg):
    """(rank, world_size, device). Initialises the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_arg)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise Seg3DFastDataError(f"--device {device_arg}: CUDA is not available here")
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        # the other ranks wait at a barrier while rank 0 validates and writes the checkpoint: NCCL's default 10
        # minutes would end a run whose validation set takes longer
        dist.init_process_group(GPU_PROCESS_GROUP if device.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return rank, world, device


def _barrier(world):
    if world > 1:
        dist.barrier()


# ---- checkpoints and logs ------------------------------------------------------------------------------------
def run_config(cfg, model, dataset, num_classes):
    """What prediction needs to rebuild the model and the preprocessing."""
    model_cfg = {k: v for k, v in model.config.items()}
    model_cfg["features"] = list(model_cfg["features"])
    return {
        "format": 1,
        "model": model_cfg,
        "preprocess": PreprocessConfig(cfg.downsample, cfg.clip).to_dict(),
        "num_classes": num_classes,
        "channel_names": list(dataset.channel_names),
        "layout": dataset.layout,
        "data": str(cfg.data),
        "folds": cfg.folds,
        "crop": list(cfg.crop) if cfg.crop else None,
        "amp": cfg.amp,
        "extra": cfg.extra,
    }


def save_checkpoint(path, state):
    try:
        write_atomic(path, lambda tmp: torch.save(state, tmp))
    except RuntimeError as e:  # (torch's zip writer reports a full disk or a failed write as a RuntimeError)
        free = shutil.disk_usage(Path(path).parent).free
        raise Seg3DFastDataError(f"{path}: cannot write the checkpoint ({str(e).strip()[:120]}; {free} bytes free "
                                 "on that disk); the previous checkpoint, if any, is kept") from None


def rng_state():
    """Global RNG states in types torch.load(weights_only=True) accepts (numpy's key array as a tensor)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                        has_gauss, cached), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_logs(fold_dir, history):
    columns = list(dict.fromkeys(k for row in history for k in row))
    lines = [",".join(columns)]
    for row in history:
        lines.append(",".join("" if row.get(k) is None else f"{row[k]:.6g}" if isinstance(row[k], float)
                              else str(row[k]) for k in columns))
    write_text_atomic(fold_dir / "metrics.csv", "\n".join(lines) + "\n")
    write_text_atomic(fold_dir / "metrics.json", json.dumps(history, indent=1) + "\n")
    plot_curves(fold_dir / "curves.png", history)


def plot_curves(path, history):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(epochs, [r["train_loss"] for r in history], label="train")
    b.plot(epochs, [math.nan if r["train_dice"] is None else r["train_dice"] for r in history], label="train")
    val = [r for r in history if r.get("val_dice") is not None]
    if val:
        b.plot([r["epoch"] for r in val], [r["val_dice"] for r in val], "o-", label="validation")
    a.set(xlabel="epoch", ylabel="Jaccard loss", title="loss")
    b.set(xlabel="epoch", ylabel="mean foreground Dice", title="Dice", ylim=(0, 1))
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)


def use_cuda_graph(cfg, device, world):
    """--cuda-graph as asked (an error where it cannot run: one CUDA device, one process); by default on where it
    can run and pays: with crops (every batch one shape; whole volumes of different shapes would each run eagerly)."""
    possible = device.type == "cuda" and world == 1
    if cfg.cuda_graph and not possible:
        raise Seg3DFastDataError(f"--cuda-graph needs one CUDA device and one process; got device {device}, "
                                 f"{world} process{'es' if world > 1 else ''}")
    return cfg.cuda_graph if cfg.cuda_graph is not None else possible and cfg.crop is not None


def _check_crop_fits(crop, batch_size):
    """A batch of crops too big for this machine's memory (a typo: --crop 1280 160 144) is named before anything
    is written, not met as a MemoryError in a loader. Counted: a 1-channel float32 image and int64 labels per voxel,
    the least a batch holds."""
    if crop is None:
        return
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # (not reported on this system; no os.sysconf on Windows)
        return
    need = batch_size * math.prod(crop) * (4 + 8)
    if need > memory:
        raise Seg3DFastDataError(f"--crop {' '.join(map(str, crop))}: a batch of {batch_size} such crops needs "
                                 f"{need / 2**30:.0f} GiB for its images and labels alone, more than this "
                                 f"machine's {memory / 2**30:.0f} GiB of memory; pass a smaller --crop")


def check_forced_backend(backend):
    """--backend, or env SEG3D_FAST_BACKEND (an explicit choice too), that cannot run here at all: one error naming
    it, before anything is written (not a run folder with config.json and splits.json, then the first step's
    BackendUnsupported; a misspelt variable was a ValueError traceback)."""
    try:
        forced = backend or backends.env_backend()
    except ValueError as e:
        raise Seg3DFastDataError(str(e)) from None
    unusable = forced is not None and backends.unavailable_reason(forced)
    if unusable:
        raise Seg3DFastDataError(f"{'--backend ' if backend else backends.ENV_BACKEND + '='}{forced}: {unusable}")


# ---- the loop ------------------------------------------------------------------------------------------------
def train(cfg):
    """Train fold `cfg.fold` into `cfg.out`; returns the trained model (unwrapped)."""
    from . import models, nn as sfnn

    rank, world, device = dist_setup(cfg.device)
    if not 0 <= cfg.fold < cfg.folds:
        raise Seg3DFastDataError(f"--fold {cfg.fold} outside 0..{cfg.folds - 1}")
    if cfg.amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {tuple(AMP_DTYPES)}, got {cfg.amp!r}")
    check_forced_backend(cfg.backend)  # (before anything is written)
    if not set(cfg.mirror_axes) <= {0, 1, 2}:
        raise ValueError(f"mirror_axes must be canonical axes among 0, 1, 2, got {tuple(cfg.mirror_axes)}")
    # (data errors: the command line reports them in one line, as it does its own option checks)
    _check_crop_fits(cfg.crop, cfg.batch_size)
    if cfg.amp == "fp16" and device.type != "cuda":
        raise Seg3DFastDataError("--amp fp16 needs a CUDA device; use bf16 on the CPU")
    graphed = use_cuda_graph(cfg, device, world)
    out = Path(cfg.out)
    fold_dir = out / f"fold_{cfg.fold}"
    ckpt_path = fold_dir / CHECKPOINT_FILE
    checkpoint = None
    if cfg.resume and cfg.overwrite:
        raise Seg3DFastDataError("--resume continues a fold's checkpoint and --overwrite replaces it: pass one")
    if cfg.resume:
        if not ckpt_path.is_file():
            raise Seg3DFastDataError(f"{ckpt_path}: no checkpoint to resume from")
        checkpoint = read_checkpoint(ckpt_path, CHECKPOINT_KEYS)
    elif ckpt_path.is_file() and not cfg.overwrite:
        raise Seg3DFastDataError(f"{ckpt_path}: this fold has a checkpoint already; pass --resume to continue it "
                                 "or --overwrite to train the fold again from scratch (replacing it)")
    # checkpoints that this run must stay consistent with (the split and the model they were trained with)
    kept = [p for p in sorted(out.glob(f"fold_*/{CHECKPOINT_FILE}")) if cfg.resume or p != ckpt_path]

    dataset = discover(cfg.data, require_labels=True)
    if cfg.num_classes and dataset.num_classes and cfg.num_classes != dataset.num_classes:
        raise Seg3DFastDataError(f"--num-classes {cfg.num_classes} differs from the {dataset.num_classes} classes the "
                                 "dataset's dataset.json lists ('labels'); leave it out, or correct dataset.json")
    num_classes = cfg.num_classes or dataset.num_classes  # else: the largest label + 1, found while loading
    names = [c.name for c in dataset.cases]
    splits_path = out / SPLITS_FILE
    splits, split_seed = None, cfg.seed
    if splits_path.is_file():  # later folds (and resumed runs) reuse the saved split
        saved = read_json(splits_path)
        if saved.get("folds") == cfg.folds and sorted(saved.get("cases", [])) == sorted(names):
            splits, split_seed = saved.get("splits"), saved.get("seed", cfg.seed)  # (the seed that made them)
            if not (isinstance(splits, list) and len(splits) == cfg.folds and all(
                    isinstance(s, dict) and all(isinstance(s.get(k), list) and set(s[k]) <= set(names)
                                                for k in ("train", "val")) for s in splits)):
                raise Seg3DFastDataError(f"{splits_path}: no list of {cfg.folds} fold(s) of the dataset's case names "
                                         "under 'splits' ({'train': [...], 'val': [...]}); the file is damaged")
        elif kept:  # a new split would put cases that those folds validated on into training, and back
            raise Seg3DFastDataError(
                f"{splits_path}: the run's split ({saved.get('folds')} fold(s) over {len(saved.get('cases', []))} "
                f"cases) does not match this training ({cfg.folds} fold(s) over {len(names)} cases), and "
                f"{kept[0]} was trained on it; use a new --out folder")
    if splits is None:
        splits = make_splits(names, cfg.folds, cfg.seed)
    split = splits[cfg.fold]
    train_cases, top_train = prepare(cfg, dataset, split["train"], num_classes, rank=rank, world=world)
    val_cases, top_val = prepare(cfg, dataset, split["val"], num_classes, channels=train_cases[0].x.shape[0],
                                 rank=rank, world=world)
    if num_classes is None:  # from the labels: a stray value (one voxel of 5000) would make a 5001-class model
        num_classes = max(2, top_train + 1, top_val + 1)
        present = {0, *(int(c) for case in train_cases + val_cases for c in np.unique(case.foreground[:, 0]))}
        if rank == 0 and num_classes > max(16, 2 * len(present)):
            print(f"seg3d_fast: warning: the labels reach {num_classes - 1} but only {len(present)} values occur "
                  f"(e.g. {sorted(present)[:8]}): the model gets {num_classes} classes; remap the labels to 0.."
                  f"{len(present) - 1} for a model of {len(present)} (--num-classes cannot be less than the largest "
                  f"label + 1)", file=sys.stderr, flush=True)
    in_channels = train_cases[0].x.shape[0]

    torch.manual_seed(cfg.seed)
    model = models.Seg3DNet(in_channels, num_classes, tuple(cfg.features), skip=cfg.skip, norm=cfg.norm,
                            backend=cfg.backend).to(device)
    config = run_config(cfg, model, dataset, num_classes)
    if rank == 0:
        for folder in (out, fold_dir):  # (what a killed run's writes left behind: its checkpoint's copy, 1-100s MB)
            if folder.is_dir():
                remove_stale_temporaries(folder)
        _check_or_write_config(out / CONFIG_FILE, config, kept, {ckpt_path: checkpoint} if checkpoint else {})
        write_text_atomic(splits_path, json.dumps({"folds": cfg.folds, "seed": split_seed, "cases": sorted(names),
                                                   "splits": splits}, indent=1) + "\n")
    loss_fn = sfnn.JaccardLoss(squared=True, backend=cfg.backend)
    # fused on a GPU: one launch per step for all parameters instead of a few per tensor list (host time per step)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 fused=device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
    history, start_epoch = [], 0
    if checkpoint is not None:
        if checkpoint["config"]["model"] != config["model"] or checkpoint["config"]["preprocess"] != config["preprocess"]:
            raise Seg3DFastDataError(f"{ckpt_path}: checkpoint was trained with a different model or preprocessing")
        model.load_state_dict(checkpoint["model"])
        # the optimizer's state (moments, steps) from the checkpoint, its settings from this run: load_state_dict also
        # restores each group's weight_decay and fused, so a resume with another weight_decay went on with the old
        # one (while saying it went on with the new), and a checkpoint written on the CPU resumed unfused on a GPU
        settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        optimizer.load_state_dict(checkpoint["optimizer"])
        for group, setting in zip(optimizer.param_groups, settings):
            group.update(setting)
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        history, start_epoch = checkpoint["history"], checkpoint["epoch"]
        set_rng_state(checkpoint["rng"])
        changed = _changed_training_settings(checkpoint.get("train_config"), cfg, world)
        if changed and rank == 0:
            print(f"{ckpt_path}: resuming with training settings other than the checkpoint's ({changed}); training "
                  "goes on with the new ones, not as the interrupted run would have", file=sys.stderr, flush=True)
        saved_epochs = (checkpoint.get("train_config") or {}).get("epochs")
        if (rank == 0 and cfg.lr_schedule == "poly" and isinstance(saved_epochs, int) and saved_epochs != cfg.epochs
                and 1 < start_epoch < cfg.epochs):  # (epoch 1's rate is lr whatever the length)
            print(f"{ckpt_path}: resuming with --epochs {saved_epochs} -> {cfg.epochs} under --lr-schedule poly: "
                  f"epochs 2..{start_epoch} decayed the learning rate for {saved_epochs} epochs, the rest decay it for "
                  f"{cfg.epochs}; not what a {cfg.epochs}-epoch run would have trained", file=sys.stderr, flush=True)
        if start_epoch >= cfg.epochs and rank == 0:
            print(f"{ckpt_path}: already trained for {start_epoch} epoch(s) (--epochs {cfg.epochs}): nothing to do",
                  file=sys.stderr, flush=True)
            # the logs follow the checkpoint: a run stopped between the two left them behind (with epochs left to
            # train, the next epoch's logs catch up)
            if history:
                write_logs(fold_dir, history)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    length = cfg.samples_per_epoch or len(train_cases)
    data = CropDataset(train_cases, length, tuple(cfg.crop) if cfg.crop else None, cfg.fg_prob, cfg.augment, cfg.seed,
                       cfg.mirror_axes)
    sampler = EpochSampler(torch.utils.data.DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True,
                                                               seed=cfg.seed))
    workers = data_workers(device, world) if cfg.workers is None else cfg.workers
    # workers kept from epoch to epoch: starting them per epoch cost seconds over a short run's epochs
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
                                         collate_fn=pad_collate, pin_memory=device.type == "cuda",
                                         persistent_workers=workers > 0, worker_init_fn=_worker_exits_on_sigterm)
    amp_dtype = AMP_DTYPES[cfg.amp]
    if graphed:  # (inputs of another shape than the first batches' run eagerly)
        step = graphs.CudaGraphStep(model, loss_fn, optimizer, autocast_dtype=amp_dtype, scaler=scaler)
    else:
        step = functools.partial(graphs.train_step, net, loss_fn, optimizer, autocast_dtype=amp_dtype, scaler=scaler)

    for epoch in range(start_epoch, cfg.epochs):
        lr = cfg.lr * ((1 - epoch / cfg.epochs) ** 0.9 if cfg.lr_schedule == "poly" else 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sampler.set_epoch(epoch)
        net.train()
        # loss sum, Dice sum, batches with a Dice (no foreground in a batch or its prediction: none), summed where
        # the steps run: read once per epoch and for the progress bar, not per step, so that the host queues the
        # next step while the GPU runs this one
        scores = torch.zeros(3, dtype=torch.float64, device=device)
        batches = voxels = 0
        t0 = shown = time.perf_counter()
        bar = _progress(_received(loader), cfg.progress and rank == 0, f"epoch {epoch + 1}/{cfg.epochs}",
                        total=len(loader))
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss, logits = step(x, y)
            with torch.no_grad():
                dice, found = mean_foreground_dice_tensor(logits.argmax(1), y, num_classes)
                scores += torch.stack([loss.detach().double(), dice, found])
            batches, voxels = batches + 1, voxels + y.numel()
            stop_if_terminated()
            if hasattr(bar, "set_postfix") and time.perf_counter() - shown >= PROGRESS_SECONDS:
                shown = time.perf_counter()
                loss_sum, dice_sum, found_sum = scores.tolist()
                bar.set_postfix(loss=f"{loss_sum / batches:.4f}", dice=f"{dice_sum / max(found_sum, 1):.3f}",
                                vox_s=f"{voxels * world / (shown - t0):.3g}")
        if graphed:
            step.settle()  # the last replay's checks, before the epoch's weights are kept
        loss_sum, dice_sum, found_sum = scores.tolist()
        sums = torch.tensor([loss_sum, dice_sum, batches, voxels, found_sum], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(sums)
        elapsed = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": float(sums[0] / sums[2]),
               "train_dice": float(sums[1] / sums[4]) if sums[4] else None, "voxels_per_s": float(sums[3] / elapsed),
               "seconds": elapsed, "val_dice": None}
        # a diverged epoch (weights no longer finite) must not replace the last good checkpoint (one sync per epoch)
        if not torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all():
            left = f"{ckpt_path} keeps epoch {epoch}" if epoch > 0 else "no checkpoint was written"
            raise Seg3DFastDataError(f"training diverged in epoch {epoch + 1} (weights no longer finite; mean loss "
                                     f"{row['train_loss']:.4g}): {left}; lower --lr (now {cfg.lr:g})")
        if val_cases and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs) and rank == 0:
            row["val_dice"] = validate(model, val_cases, device, amp_dtype, cfg.crop)
        history.append(row)
        if rank == 0:
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                        "scaler": scaler.state_dict() if scaler else None, "epoch": epoch + 1,
                                        "history": history, "rng": rng_state(), "config": config,
                                        "train_config": {**_jsonable(asdict(cfg)), "processes": world}})
            write_logs(fold_dir, history)
            if cfg.progress:
                val = f", validation Dice {row['val_dice']:.4f}" if row["val_dice"] is not None else ""
                dice = "–" if row["train_dice"] is None else f"{row['train_dice']:.4f}"
                print(f"epoch {epoch + 1}: loss {row['train_loss']:.4f}, Dice {dice}{val}, "
                      f"{row['voxels_per_s']:.3g} voxels/s", flush=True)
        stop_if_terminated()  # (before the next epoch waits for its first batch)
        _barrier(world)
    return model


def validate(model, cases, device, amp_dtype, crop):
    """Mean over validation cases of their mean_foreground_dice, predicted whole (sliding window of the crop size if
    any); cases with no foreground in truth or prediction are left out (None: no case had any)."""
    model.eval()
    dices = []
    with torch.no_grad():
        for case in cases:
            x = torch.from_numpy(_writable(case.x))
            dices.append(on_device_or_host(lambda where: mean_foreground_dice(  # (argmax and counts there)
                predict_logits(model, x, device, roi=crop, amp_dtype=amp_dtype, out_device=where).argmax(0),
                case.y), device))
    model.train()
    scored = [d for d in dices if not math.isnan(d)]
    return float(np.mean(scored)) if scored else None


def _check_or_write_config(path, config, checkpoints, loaded):
    """Writes the run's config; one that differs in model, preprocessing or classes is an error while checkpoints
    trained with another remain. Each checkpoint is compared with the config it stores (config.json may be newer: an
    --overwrite with other settings that stopped before its first checkpoint), else with config.json. loaded: {path:
    state} of the checkpoints already read (a resumed fold's), not read again."""
    saved = read_json(path) if path.is_file() and checkpoints else None
    for checkpoint in checkpoints:
        trained = _stored_config(loaded[checkpoint] if checkpoint in loaded else _read_state(checkpoint)) or saved
        for key in ("model", "preprocess", "num_classes"):
            if trained is not None and trained.get(key) != config[key]:
                raise Seg3DFastDataError(f"{checkpoint}: trained with a different {key} (checkpoint -> this run: "
                                         f"{_differences(trained.get(key), config[key])}); train with its settings, "
                                         f"or use a new --out folder")
    write_text_atomic(path, json.dumps(config, indent=1) + "\n")


def _differences(before, after) -> str:
    """'num_classes 6 -> 4, ...': the fields of two config dicts that differ (it printed both dicts whole)."""
    if not (isinstance(before, dict) and isinstance(after, dict)):
        return f"{before} -> {after}"
    return ", ".join(f"{k} {before.get(k)} -> {after.get(k)}" for k in dict.fromkeys([*before, *after])
                     if before.get(k) != after.get(k))


def _read_state(checkpoint_path):
    """A checkpoint's contents, None where it cannot be read (reported where the checkpoint is used)."""
    try:
        return torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - config.json stands in
        return None


def _stored_config(state):
    """The run config a checkpoint's contents hold (None where there is none)."""
    return state.get("config") if isinstance(state, dict) and isinstance(state.get("config"), dict) else None


# Settings that shape the remaining epochs (the crops drawn, the optimizer's steps): a resume that changes one does
# not continue the run exactly. (--epochs may change: training longer is what a resume is for.)
RESUME_SETTINGS = ("samples_per_epoch", "batch_size", "crop", "fg_prob", "lr", "lr_schedule", "weight_decay", "amp",
                   "augment", "mirror_axes", "seed")


def _changed_training_settings(saved, cfg, world=1) -> str:
    """'lr 0.001 -> 0.003, ...' for the RESUME_SETTINGS that differ from a checkpoint's train_config ('' if none, or
    for a checkpoint without one), and another number of processes (each draws its own batch: the global batch
    changes with it)."""
    if not isinstance(saved, dict):
        return ""
    now = _jsonable(asdict(cfg))
    changed = [f"--{k.replace('_', '-')} {saved[k]} -> {now[k]}" for k in RESUME_SETTINGS
               if k in saved and saved[k] != now[k]]
    if isinstance(saved.get("processes"), int) and saved["processes"] != world:
        before, after = saved["processes"], world
        changed.append(f"processes {before} -> {after} (a step's batch {before * cfg.batch_size} -> "
                       f"{after * cfg.batch_size})")
    return ", ".join(changed)


def _jsonable(d):
    return json.loads(json.dumps(d, default=str))


def _progress(iterable, enabled, desc, total=None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def _received(loader):
    """The loader's batches. A data loader worker that dies (the out-of-memory killer) while the main process
    receives its batch's shared memory ends the connection that hands the memory over, and PyTorch, which had not yet
    seen the worker gone, passed on the ConnectionResetError: the command line reported it as bad input, 'seg3d-fast:
    error: [Errno 104] Connection reset by peer' (exit status 2), one time in eight. Raised here as the error PyTorch
    gives for a dead worker the other times."""
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except ConnectionError as e:
            if not loader.num_workers:
                raise
            raise RuntimeError(f"DataLoader worker exited unexpectedly: its connection ended while its batch was "
                               f"received ({e})") from e
        yield batch


# ---- command line --------------------------------------------------------------------------------------------
def add_arguments(p):
    from .cli import at_least, device_name, finite

    p.add_argument("data", help="dataset: BRATS folder, MSD/nnU-Net folder with dataset.json, or CSV manifest")
    p.add_argument("--out", required=True, help="run folder (config, splits, fold_k/checkpoint.pt, logs)")
    p.add_argument("--fold", type=at_least(0), default=0)
    p.add_argument("--folds", type=at_least(1), default=1, help="k of k-fold cross-validation (1: train on all cases)")
    p.add_argument("--epochs", type=at_least(1), default=50)
    p.add_argument("--samples-per-epoch", type=at_least(1), default=None, help="default: number of training cases")
    p.add_argument("--batch-size", type=at_least(1), default=1)
    p.add_argument("--crop", type=at_least(1), nargs=3, metavar=("D", "H", "W"), default=None,
                   help="random crop size (default: whole volumes)")
    p.add_argument("--lr", type=at_least(1e-12, float), default=1e-3)
    p.add_argument("--lr-schedule", choices=("poly", "constant"), default="poly")
    p.add_argument("--downsample", type=at_least(1.0, float), default=1.0,
                   help="shrink inputs by this factor ('compressed' input)")
    p.add_argument("--clip", type=finite, nargs=2, metavar=("LOW", "HIGH"), default=None,
                   help="intensity window before z-scoring, e.g. -1000 1000 for CT")
    p.add_argument("--features", type=at_least(1), nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--skip", choices=("sum", "concat"), default="sum")
    p.add_argument("--num-classes", type=at_least(2), default=None)
    p.add_argument("--amp", choices=tuple(AMP_DTYPES), default="none")
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--mirror-axes", type=int, nargs="*", choices=(0, 1, 2), default=None, metavar="AXIS",
                   help="the canonical (RAS) axes to flip at random in training, and to average over in predict "
                        "--tta (default 0 1 2; none: no flips). Where classes have a side (left and right organs) "
                        "use '--mirror-axes 2': a flip of axis 0 (left-right), or of 1 with the in-plane turns, "
                        "makes a left organ look like a right one")
    p.add_argument("--val-every", type=at_least(1), default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--backend", choices=("reference", "triton", "cuda"), default=None,
                   help="force a kernel backend (default: the dispatcher's choice)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay each step's forward and backward as one CUDA graph, which removes the per-layer "
                        "host work that bounds small and deep layers (default: on for one CUDA device with --crop, "
                        "off otherwise)")
    p.add_argument("--workers", type=at_least(0), default=None,
                   help="data loader worker processes (default: 0 on the CPU; on a GPU min(8, cores per process - 1))")
    p.add_argument("--cache-dir", default=None,
                   help="preprocess each case once into this folder and read it back through memory maps, for "
                        "datasets larger than memory (reused by later folds and resumed runs while the source files "
                        "and preprocessing are unchanged); default: every case in memory")
    p.add_argument("--resume", action="store_true", help="continue from fold_k/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="train the fold again from scratch, replacing its checkpoint (without --resume or this, an "
                        "existing checkpoint is an error)")
    p.add_argument("--quiet", dest="progress", action="store_false", help="no progress bar or epoch lines")


def config_from_args(args):
    from .cli import UsageError

    if args.clip is not None and not args.clip[0] < args.clip[1]:
        raise UsageError(f"--clip LOW HIGH needs LOW < HIGH, got {args.clip[0]:g} {args.clip[1]:g}")
    if args.mirror_axes is not None and not args.augment:
        raise UsageError("--mirror-axes chooses the flips of the augmentation that --no-augment turns off: pass one")
    mirror_axes = (0, 1, 2) if args.mirror_axes is None else args.mirror_axes
    if len(args.features) < 2:
        raise UsageError(f"--features needs one value per level, at least 2 (e.g. 8 16 32 64), got "
                         f"{' '.join(map(str, args.features))}")
    return TrainConfig(data=args.data, out=args.out, fold=args.fold, folds=args.folds, epochs=args.epochs,
                       samples_per_epoch=args.samples_per_epoch, batch_size=args.batch_size,
                       crop=tuple(args.crop) if args.crop else None, lr=args.lr, lr_schedule=args.lr_schedule,
                       downsample=args.downsample, clip=tuple(args.clip) if args.clip else None,
                       features=tuple(args.features), skip=args.skip, num_classes=args.num_classes, amp=args.amp,
                       augment=args.augment, mirror_axes=tuple(sorted(set(mirror_axes))), val_every=args.val_every, seed=args.seed, device=args.device,
                       backend=args.backend, cuda_graph=args.cuda_graph, workers=args.workers,
                       cache_dir=args.cache_dir, resume=args.resume,
                       overwrite=args.overwrite, progress=args.progress)


def main(args):
    train(config_from_args(args))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
