"""Dataset description and the train/eval loaders the trainer uses.

Two training loaders share one contract (``len``, ``set_epoch(epoch, start_batch)``, iteration yielding
normalized float32 images and int64 labels on the device):

* ``DataLoaderTrainLoader``: ``torch.utils.data.DataLoader`` over a ``DistributedSampler`` (shuffle, drop_last,
  ``seed``) whose indices are batched per rank in the main process; ``start_batch`` skips whole batches of
  indices, so nothing skipped is ever loaded. Each item is requested as ``(index, epoch)`` and its augmentation is
  a pure function of ``(seed, epoch, index)``: results do not depend on the number of workers, their timing, or
  on resuming mid-epoch. Workers return uint8; conversion/normalization happens on the device. With
  ``data.decode=device`` (ImageFolder) workers return the encoded JPEG bytes and the sample's geometry instead,
  and ``device_decode.DeviceDecoder`` decodes and transforms the batch on the device.
* ``GPUTrainLoader`` (``gpu_loader.py``): device-resident uint8 data, batched gather-based augmentation. For
  cifar/synthetic with augment none/flip/crop_flip, and ``data.cutout`` / ``data.color_jitter``, it yields
  bit-identical batches to the DataLoader path. What it cannot do (``capabilities.PIPELINES["gpu"]``: random-resized
  crops, auto-augment policies, random erasing, rotation/scaling, repeated augmentation, progressive resizing)
  is refused with ``data.loader=gpu`` and sends ``data.loader=auto`` to the DataLoader path, with a one-line note.

Per-epoch behaviour belongs to the loaders: ``set_epoch(epoch, start_batch)`` selects the epoch's sample order
(``DistributedSampler``, or ``samplers.RepeatedAugSampler`` with ``data.repeated_aug > 1``, whose items carry
the repeat index), and with progressive resizing (``schedule.py``) the epoch's training side.

In both, the union over ranks of their batch ``i`` is the single-process batch ``i`` of the same global size.

Bad files (ImageFolder): a sample whose file cannot be read or decoded, in a worker or (``data.decode=device``) by
the device decoder, is replaced by the next index that reads (``i+1, i+2, ...`` modulo N) transformed with the
draws of the original index ``i``, so the batch stays a pure function of ``(seed, epoch, i)``: the same on every
rank, for every worker count and after a mid-epoch resume. Workers flag the substitutes (``_Flagged``: a third
batch element that ``__iter__`` strips; batches stay ``(images, labels)``), and every loader has ``take_bad()``:
the ``(path, reason)`` of each substituted sample yielded since the last call (always empty for in-memory data).
What to do about them (name each once, count per epoch, stop past ``data.max_bad_images``) is the trainer's.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from ddp_resnet.config import ConfigError, DataConfig
from ddp_resnet.data import cifar, imagefolder, synthetic
from ddp_resnet.data.augment import SampleAugment, mean_fill
from ddp_resnet.data.device_decode import DeviceDecoder, EncodedFolderEval, EncodedFolderTrain, collate_encoded
from ddp_resnet.data.gpu_loader import GPUTrainLoader
from ddp_resnet.data.samplers import RepeatedAugSampler
from ddp_resnet.data.schedule import ResolutionSchedule, resolution_schedule
from ddp_resnet.data.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SYNTHETIC_MEAN,
    SYNTHETIC_STD,
    Normalizer,
    crop_flip_one,
    crop_flip_params_one,
    hwc_to_chw_tensor,
    resize_uint8,
    rrc_params,
    sample_rng,
    unpack_item,
)
from ddp_resnet.pipelines import PIPELINES, TENSOR_DATASETS, resolve_augment

_STATS = {
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "imagefolder": (IMAGENET_MEAN, IMAGENET_STD),
    "synthetic": (SYNTHETIC_MEAN, SYNTHETIC_STD),
}


@dataclass(frozen=True)
class DataInfo:
    """What the trainer needs to know about a dataset, before any loader exists.

    In-memory datasets (cifar, synthetic) whose native side differs from ``image_size`` are resized once
    (bilinear, antialiased) when a loader is built; train images then have side ``image_size`` and eval images
    ``data.eval_size`` (default: the same). Progressive resizing changes the side of the training batches only.
    """

    num_classes: int
    class_names: list[str] = field(repr=False)
    image_size: int  # training crop side (evaluation images have the same side)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train_size: int
    test_size: int
    augment: str  # resolved: none | flip | crop_flip | rrc_flip
    index: imagefolder.FolderIndex | None = field(default=None, repr=False, compare=False)  # imagefolder samples


# ------------------------------------------------------------------------------------------ raw data (cached)
@dataclass(frozen=True)
class _TensorData:
    """A whole in-memory dataset: uint8 NHWC images and int64 labels (CPU tensors)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: list[str]


def _cifar_key(root: str, name: str) -> tuple:
    spec = cifar.SPECS[name]
    folder = cifar.cifar_dir(root, name)
    stamps = tuple(os.stat(folder / f).st_mtime_ns for f in (*spec.train_files, *spec.test_files, spec.meta_file))
    return (name, str(Path(root).resolve()), stamps)


@functools.lru_cache(maxsize=2)
def _load_tensor_data(key: tuple) -> _TensorData:
    """Read (cifar) or generate (synthetic) a dataset; ``key`` comes from ``_tensor_key``."""
    if key[0] == "synthetic":
        _, n_train, n_test, n_classes, size = key
        tx, ty, vx, vy = synthetic.make_synthetic(n_train, n_test, n_classes, size)
        names = [f"class_{i}" for i in range(n_classes)]
    else:
        name, root, _ = key
        names = cifar.read_class_names(root, name)
        tx, ty = cifar.read_cifar_split(root, name, train=True, num_classes=len(names))
        vx, vy = cifar.read_cifar_split(root, name, train=False, num_classes=len(names))
    return _TensorData(*(torch.from_numpy(a) for a in (tx, ty, vx, vy)), names)


@functools.lru_cache(maxsize=4)
def _resized(key: tuple, size: int, train: bool) -> torch.Tensor:
    data = _load_tensor_data(key)
    return resize_uint8(data.train_images if train else data.test_images, size)


def _tensor_key(cfg: DataConfig) -> tuple:
    if cfg.dataset == "synthetic":
        return (
            "synthetic",
            cfg.synthetic_train_size,
            cfg.synthetic_test_size,
            cfg.synthetic_classes,
            cfg.synthetic_image_size,
        )
    return _cifar_key(cfg.root, cfg.dataset)


def _tensor_split(cfg: DataConfig, info: DataInfo, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 NHWC, labels)`` of one split, on the CPU: training images at ``info.image_size``, test
    images at ``data.eval_size`` (default: the same)."""
    key = _tensor_key(cfg)
    data = _load_tensor_data(key)
    size = info.image_size if train else (cfg.eval_size or info.image_size)
    return _resized(key, size, train), data.train_labels if train else data.test_labels


# ------------------------------------------------------------------------------------------ describe
def _resolve_augment(cfg: DataConfig) -> str:
    return resolve_augment(cfg.dataset, cfg.augment)


def default_image_size(data_cfg: DataConfig) -> int:
    """``data.image_size``, or the dataset's default when 0: 224 for imagefolder, 32 for cifar, the synthetic side."""
    if data_cfg.image_size:
        return data_cfg.image_size
    if data_cfg.dataset == "imagefolder":
        return 224
    return 32 if data_cfg.dataset in cifar.SPECS else data_cfg.synthetic_image_size


def check(data_cfg: DataConfig) -> None:
    """The cheap checks every rank can make before the process group starts: the data is where the config says
    (an ImageFolder's split directories exist; CIFAR files are present, or downloaded). Raises ``ConfigError``."""
    if data_cfg.dataset == "imagefolder":
        imagefolder.split_dirs(data_cfg.root)
    elif data_cfg.dataset in cifar.SPECS:
        cifar.ensure_cifar(data_cfg.root, data_cfg.dataset, data_cfg.download)


def describe(data_cfg: DataConfig, share: Callable | None = None) -> DataInfo:
    """Validate that the data exists (downloading CIFAR if asked) and describe it; raises ``ConfigError``.

    ``share(fn)``, when given, runs ``fn`` on one rank and returns its result (or raises its ConfigError) on
    every rank: an ImageFolder tree is then walked once, not once per rank.
    """
    cfg = data_cfg
    augment = _resolve_augment(cfg)
    refusal = PIPELINES["gpu"].refusal(cfg, augment) if cfg.loader == "gpu" else None
    if refusal:
        raise ConfigError(refusal)
    mean, std = _STATS[cfg.dataset]
    if cfg.dataset == "imagefolder":
        root = str(Path(cfg.root).resolve())
        if share is None:
            index = imagefolder.scan_imagefolder(root)
        else:
            index = imagefolder.FolderIndex.unpack(root, share(lambda: imagefolder.scan_imagefolder(root).pack(root)))
        return DataInfo(len(index.classes), list(index.classes), default_image_size(cfg), mean, std,
                        len(index.train), len(index.evals), augment, index)
    check(cfg)
    data = _load_tensor_data(_tensor_key(cfg))
    return DataInfo(
        num_classes=len(data.class_names),
        class_names=list(data.class_names),
        image_size=default_image_size(cfg),
        mean=mean,
        std=std,
        train_size=int(data.train_images.shape[0]),
        test_size=int(data.test_images.shape[0]),
        augment=augment,
    )


def eval_info(data_cfg: DataConfig, num_classes: int, class_names: Sequence[str]) -> DataInfo:
    """A ``DataInfo`` for running a trained network on new images, without reading the dataset: its classes as
    given, the training side and normalization of ``data_cfg``, no samples (``train_size = test_size = 0``)."""
    mean, std = _STATS[data_cfg.dataset]
    return DataInfo(num_classes, list(class_names), default_image_size(data_cfg), mean, std, 0, 0,
                    _resolve_augment(data_cfg))


def resolve_loader(data_cfg: DataConfig, info: DataInfo, device: torch.device | str) -> str:
    """``gpu`` or ``dataloader``: what ``data.loader`` (``auto`` included) means for this dataset and device."""
    if data_cfg.loader != "auto":
        return data_cfg.loader
    gpu_ok = PIPELINES["gpu"].refusal(data_cfg, info.augment) is None
    return "gpu" if gpu_ok and torch.device(device).type == "cuda" else "dataloader"


# ------------------------------------------------------------------------------------------ datasets (workers)
class _TrainItems(Dataset):
    """What the training datasets share: the side of an epoch (``schedule``, else ``size``) and the augmentations
    after crop/flip (``extra``). Items are ``(index, epoch)`` or ``(index, epoch, repeat)``."""

    size: int
    schedule: ResolutionSchedule | None = None
    extra: SampleAugment | None = None

    def size_at(self, epoch: int) -> int:
        """The training side of ``epoch``."""
        return self.size if self.schedule is None else self.schedule.size(epoch)

    def finish(self, image: torch.Tensor, key: int, index: int) -> torch.Tensor:
        """The augmentations after crop/flip (none without ``extra``)."""
        return image if self.extra is None else self.extra(image, key, index)


class _TensorTrainDataset(_TrainItems):
    """Items -> ``(uint8 C x S x S, label)`` with augmentation keyed by (seed, epoch, index)."""

    def __init__(self, images_nhwc: torch.Tensor, labels: torch.Tensor, augment: str, padding: int, seed: int,
                 extra: SampleAugment | None = None, schedule: ResolutionSchedule | None = None):
        self.images, self.labels = images_nhwc, labels
        self.augment, self.seed, self.extra, self.schedule = augment, seed, extra, schedule
        self.padding = padding if augment == "crop_flip" else 0
        self.size = images_nhwc.shape[1]
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict:  # spawn/forkserver workers: ship the tensors (shared memory), not numpy views
        return {**self.__dict__, "_arrays": None}

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, item: tuple[int, ...]) -> tuple[torch.Tensor, int]:
        index, epoch, key = unpack_item(item)
        if self._arrays is None:  # numpy views: per-sample slicing without torch's per-op overhead
            self._arrays = (self.images.numpy(), self.labels.numpy())
        images, labels = self._arrays
        label = int(labels[index])
        if self.augment == "rrc_flip":
            rng = sample_rng(self.seed, key, index)
            top, left, h, w = rrc_params(self.size, self.size, rng)
            size = self.size_at(epoch)
            image = self.images[index].permute(2, 0, 1)
            image = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
            image = (image.flip(-1) if rng.random() < 0.5 else image).contiguous()
        elif self.augment == "none":
            image = hwc_to_chw_tensor(images[index])
        else:
            dy, dx, flip = crop_flip_params_one(self.seed, key, index, 2 * self.padding)
            image = hwc_to_chw_tensor(crop_flip_one(images[index], dy, dx, flip, self.size, self.padding))
        return self.finish(image, key, index), label


BadSample = tuple[str, str]  # (path, reason) of a sample whose file could not be read, replaced by another


class _FolderTrainDataset(_TrainItems):
    """ImageFolder training items -> ``(uint8 C x S x S, label)``.

    ``rrc_flip``: RandomResizedCrop(scale 0.08-1) + flip; otherwise resize the shorter side to S, center-crop S,
    then (``flip``/``crop_flip``) the same crop/flip as for in-memory datasets. S follows ``schedule`` if given.
    A file that cannot be read or decoded is replaced by the next sample that can (``imagefolder.read_first``),
    transformed with the original index's draws; ``flagged`` says so.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], size: int, augment: str, padding: int, seed: int,
                 extra: SampleAugment | None = None, schedule: ResolutionSchedule | None = None):
        self.samples, self.size, self.augment, self.seed = samples, size, augment, seed
        self.extra, self.schedule = extra, schedule
        self.padding = padding if augment == "crop_flip" else 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, ...]) -> tuple[torch.Tensor, int]:
        image, label, _ = self.flagged(item)
        return image, label

    def flagged(self, item: tuple[int, ...]) -> tuple[torch.Tensor, int, BadSample | None]:
        """``(image, label, bad)``: ``bad`` is ``(path, reason)`` when the sample's file was replaced, else None."""
        index, epoch, key = unpack_item(item)
        source, img, bad = imagefolder.read_first(self.samples, index, imagefolder.load_rgb)
        label = self.samples[source][1]
        size = self.size_at(epoch)
        if self.augment == "rrc_flip":
            rng = sample_rng(self.seed, key, index)
            top, left, h, w = rrc_params(img.width, img.height, rng)
            img = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
            if rng.random() < 0.5:
                img = TF.hflip(img)
            return self.finish(TF.pil_to_tensor(img), key, index), label, bad
        image = np.asarray(TF.center_crop(TF.resize(img, size, antialias=True), size))
        if self.augment != "none":
            dy, dx, flip = crop_flip_params_one(self.seed, key, index, 2 * self.padding)
            image = crop_flip_one(image, dy, dx, flip, size, self.padding)
        return self.finish(hwc_to_chw_tensor(image), key, index), label, bad


def eval_geometry(data_cfg: DataConfig, info: DataInfo) -> tuple[int, int]:
    """``(size, resize)`` of evaluation images: the side (``data.eval_size``, default the training side) and, for
    imagefolder, the shorter side they are resized to before the center crop (``data.eval_resize``, default
    ``size * 8 / 7``)."""
    size = data_cfg.eval_size or info.image_size
    return size, data_cfg.eval_resize or int(size * 8 / 7)


class EvalTransform:
    """One decoded RGB image -> the evaluation loaders' ``uint8 C x S x S`` pixels (picklable, for workers).

    ``folder=True`` (imagefolder): resize the shorter side to ``resize`` (antialiased), center-crop ``size``.
    Otherwise (cifar, synthetic: whole images): resize to ``size x size`` as the in-memory test split is resized
    (``resize_uint8``; a no-op for an image already at that side).
    """

    def __init__(self, size: int, resize: int, folder: bool) -> None:
        self.size, self.resize, self.folder = size, resize, folder

    def __call__(self, img) -> torch.Tensor:
        if self.folder:
            img = TF.resize(img, self.resize, antialias=True)
            return TF.pil_to_tensor(TF.center_crop(img, self.size))
        pixels = torch.from_numpy(np.array(img, dtype=np.uint8))[None]
        return resize_uint8(pixels, self.size)[0].permute(2, 0, 1).contiguous()


def eval_transform(data_cfg: DataConfig, info: DataInfo) -> EvalTransform:
    """The evaluation transform of this dataset configuration, for one image file at a time."""
    size, resize = eval_geometry(data_cfg, info)
    return EvalTransform(size, resize, folder=data_cfg.dataset == "imagefolder")


class _FolderEvalDataset(Dataset):
    """ImageFolder evaluation items: resize the shorter side to ``resize``, center-crop ``size`` (an unreadable
    file replaced by the next readable sample, as in training; ``flagged`` says so)."""

    def __init__(self, samples: Sequence[tuple[str, int]], size: int, resize: int):
        self.samples, self.transform = samples, EvalTransform(size, resize, folder=True)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label, _ = self.flagged(index)
        return image, label

    def flagged(self, index: int) -> tuple[torch.Tensor, int, BadSample | None]:
        """``(image, label, bad)`` as ``_FolderTrainDataset.flagged``."""
        source, img, bad = imagefolder.read_first(self.samples, index, imagefolder.load_rgb)
        return self.transform(img), self.samples[source][1], bad


class _Flagged(Dataset):
    """A folder dataset seen through its ``flagged`` items, ``(image, label, bad)``: what the loaders batch, so
    that each batch says which of its samples were substituted (``collate_flagged``)."""

    def __init__(self, dataset: _FolderTrainDataset | _FolderEvalDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        return self.dataset.flagged(item)


def collate_flagged(items: list) -> tuple[torch.Tensor, torch.Tensor, list[BadSample]]:
    """``(images, labels, bad)``: the default collation of the images and labels, and the ``(path, reason)`` of
    the batch's substituted samples in batch order."""
    images, labels = default_collate([(image, label) for image, label, _ in items])
    return images, labels, [bad for _, _, bad in items if bad]


def _flagged(dataset: Dataset) -> Dataset:
    """The dataset the loaders batch: a folder dataset's flagged view, any other dataset as it is."""
    return _Flagged(dataset) if isinstance(dataset, (_FolderTrainDataset, _FolderEvalDataset)) else dataset


# ------------------------------------------------------------------------------------------ DataLoader path
class EpochBatchSampler(Sampler):
    """Batches a ``DistributedSampler``'s indices per rank (drop_last) as lists of ``(index, epoch)`` (a
    ``RepeatedAugSampler``'s ``(index, repeat)`` pairs as ``(index, epoch, repeat)``).

    ``set_epoch(epoch, start_batch)`` selects the epoch and skips the first ``start_batch`` batches of
    indices (nothing is loaded for them). The owner resets the skip after creating its iterator: a
    DataLoader with workers calls ``iter()`` on this sampler more than once per iterator.
    """

    def __init__(self, sampler: DistributedSampler | RepeatedAugSampler, batch_size: int) -> None:
        self.sampler, self.batch_size = sampler, batch_size
        self.num_batches = len(sampler) // batch_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, start, b = self.epoch, self.start_batch, self.batch_size
        self.sampler.set_epoch(epoch)
        items = [(i, epoch) if isinstance(i, int) else (i[0], epoch, i[1]) for i in self.sampler]
        return iter([items[k * b : (k + 1) * b] for k in range(start, self.num_batches)])


MAX_AUTO_WORKERS = 16  # data.workers=auto never starts more worker processes per rank than this


def auto_workers(local_world_size: int = 1) -> int:
    """``data.workers=auto``: the CPU cores this process may run on, shared by the node's ranks, less one for the
    rank itself, at most ``MAX_AUTO_WORKERS`` (0, loading in the main process, when a rank has one core or less)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(MAX_AUTO_WORKERS, cores // max(local_world_size, 1) - 1))


def with_workers(cfg: DataConfig, local_world_size: int = 1) -> DataConfig:
    """The data config with ``workers`` as a number (``auto`` resolved for this node's share of cores)."""
    if cfg.workers != "auto":
        return cfg
    return dataclasses.replace(cfg, workers=auto_workers(local_world_size))


def ignore_interrupts(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT: a Ctrl-C reaches the whole process group, and the trainer turns it into a
    coordinated stop with a checkpoint, for which its workers must stay alive."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _loader_kwargs(cfg: DataConfig, device: torch.device, decoder: DeviceDecoder | None = None,
                   dataset: Dataset | None = None) -> dict:
    """DataLoader arguments; encoded batches (device decoding) are not pinned: the decoder reads them on the host.
    Encoded and flagged (``_Flagged``) items have their own collation."""
    pin = cfg.pin_memory and device.type == "cuda" and decoder is None
    # A private generator: iterating a DataLoader would otherwise draw its workers' base seed from torch's global
    # generator, shifting the training step's own draws (dropout) by where a run was resumed.
    kwargs: dict = {"num_workers": cfg.workers, "pin_memory": pin, "generator": torch.Generator().manual_seed(0)}
    if decoder is not None:
        kwargs["collate_fn"] = collate_encoded
    elif isinstance(dataset, _Flagged):
        kwargs["collate_fn"] = collate_flagged
    if cfg.workers > 0:
        kwargs.update(persistent_workers=cfg.persistent_workers, prefetch_factor=cfg.prefetch_factor,
                      worker_init_fn=ignore_interrupts)
    return kwargs


class _Transfer:
    """A decoded ``(images, labels[, bad])`` batch to the device (asynchronously from pinned memory)."""

    def __init__(self, device: torch.device, non_blocking: bool) -> None:
        self.device, self.non_blocking = device, non_blocking

    def decode(self, batch: tuple, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[BadSample]]:
        """``(images, labels, bad)`` with the tensors on the device (``size`` is the decoder's; batches here
        already have their side); ``bad`` is the flagged batches' list, else empty."""
        images, labels, *rest = batch
        return (images.to(self.device, non_blocking=self.non_blocking),
                labels.to(self.device, non_blocking=self.non_blocking), list(rest[0]) if rest else [])

    def __call__(self, batch: tuple, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's images and labels on the device."""
        images, labels, _ = self.decode(batch, size)
        return images, labels


class DataLoaderTrainLoader:
    """The DataLoader-based ``TrainLoader``; see the module docstring."""

    def __init__(
        self,
        dataset: Dataset,
        cfg: DataConfig,
        info: DataInfo,
        rank: int,
        world_size: int,
        device: torch.device,
        seed: int,
        batch_size: int,
        channels_last: bool = False,
        decoder: DeviceDecoder | None = None,
        schedule: ResolutionSchedule | None = None,
    ) -> None:
        if cfg.repeated_aug > 1:
            self.sampler = RepeatedAugSampler(len(dataset), world_size, rank, cfg.repeated_aug, seed)
        else:
            self.sampler = DistributedSampler(
                dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
            )
        self.batch_sampler = EpochBatchSampler(self.sampler, batch_size)
        dataset = _flagged(dataset)
        kwargs = _loader_kwargs(cfg, device, decoder, dataset)
        self.loader = DataLoader(dataset, batch_sampler=self.batch_sampler, **kwargs)
        self.to_device = decoder or _Transfer(device, kwargs["pin_memory"])
        self.normalize = Normalizer(info.mean, info.std, channels_last)
        self.schedule = schedule
        self.bad: list[BadSample] = []

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next iteration yields epoch ``epoch`` from batch ``start_batch`` on (which is then reset to 0)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} outside [0, {len(self)}]")
        self.batch_sampler.set_epoch(epoch, start_batch)

    def size(self, epoch: int) -> int | None:
        """The training side of ``epoch`` under progressive resizing (None without it)."""
        return None if self.schedule is None else self.schedule.size(epoch)

    def take_bad(self) -> list[BadSample]:
        """``(path, reason)`` of every substituted sample in the batches yielded since the last call (this rank's,
        in batch order); empty for in-memory data."""
        bad, self.bad = self.bad, []
        return bad

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = iter(self.loader)  # captures epoch and start_batch now
        self.batch_sampler.start_batch = 0  # the skip applies to this iteration only
        size = self.size(self.batch_sampler.epoch)

        def generate() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for batch in batches:
                images, labels, bad = self.to_device.decode(batch, size)
                self.bad.extend(bad)
                yield self.normalize(images), labels

        return generate()


# ------------------------------------------------------------------------------------------ eval loaders
def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous shard ``[start, end)`` of rank ``rank``: sizes differ by at most one, every index used once."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class TensorEvalLoader:
    """Evaluation batches sliced from in-memory uint8 data (on the device in gpu mode, else on the CPU)."""

    def __init__(
        self,
        images_nhwc: torch.Tensor,
        labels: torch.Tensor,
        start: int,
        end: int,
        batch_size: int,
        device: torch.device,
        normalize: Normalizer,
    ) -> None:
        self.images, self.labels = images_nhwc[start:end], labels[start:end]
        self.batch_size, self.device, self.normalize = batch_size, device, normalize
        self.num_samples = end - start

    def __len__(self) -> int:
        return (self.num_samples + self.batch_size - 1) // self.batch_size

    def take_bad(self) -> list[BadSample]:
        """Always empty: in-memory data has no unreadable files."""
        return []

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for lo in range(0, self.num_samples, self.batch_size):
            images = self.images[lo : lo + self.batch_size].to(self.device).permute(0, 3, 1, 2)
            yield self.normalize(images), self.labels[lo : lo + self.batch_size].to(self.device)


class DataLoaderEvalLoader:
    """Evaluation through a ``DataLoader`` over this rank's contiguous shard (imagefolder)."""

    def __init__(
        self,
        dataset: Dataset,
        start: int,
        end: int,
        batch_size: int,
        cfg: DataConfig,
        device: torch.device,
        normalize: Normalizer,
        decoder: DeviceDecoder | None = None,
    ) -> None:
        dataset = _flagged(dataset)
        kwargs = _loader_kwargs(cfg, device, decoder, dataset)
        subset = torch.utils.data.Subset(dataset, range(start, end))
        self.loader = DataLoader(subset, batch_size=batch_size, shuffle=False, drop_last=False, **kwargs)
        self.to_device = decoder or _Transfer(device, kwargs["pin_memory"])
        self.normalize = normalize
        self.num_samples = end - start
        self.bad: list[BadSample] = []

    def __len__(self) -> int:
        return len(self.loader)

    def take_bad(self) -> list[BadSample]:
        """``(path, reason)`` of every substituted sample in the batches yielded since the last call (this rank's
        shard, in batch order)."""
        bad, self.bad = self.bad, []
        return bad

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.loader:
            images, labels, bad = self.to_device.decode(batch)
            self.bad.extend(bad)
            yield self.normalize(images), labels


# ------------------------------------------------------------------------------------------ public builders
def train_schedule(data_cfg: DataConfig, total_epochs: int | None) -> ResolutionSchedule | None:
    """The progressive-resizing schedule of a run of ``total_epochs`` epochs (None without one)."""
    return resolution_schedule(data_cfg, total_epochs or 0) if data_cfg.res_start else None


def _note_loader_choice(cfg: DataConfig, info: DataInfo, device: torch.device, rank: int) -> None:
    """data.loader=auto: say (rank 0, one line) when the device-resident loader was passed over for an augmentation."""
    blocked = PIPELINES["gpu"].blockers(cfg, info.augment)
    if rank == 0 and cfg.loader == "auto" and device.type == "cuda" and cfg.dataset in TENSOR_DATASETS and blocked:
        print(f"note: data.loader=auto uses DataLoader workers: the device-resident loader cannot apply "
              f"{', '.join(blocked)}", flush=True)


def _gpu_train_loader(cfg: DataConfig, info: DataInfo, rank: int, world_size: int, device: torch.device, seed: int,
                      batch: int, channels_last: bool) -> GPUTrainLoader:
    images, labels = _tensor_split(cfg, info, train=True)
    return GPUTrainLoader(images.to(device), labels.to(device), batch, rank, world_size, seed, info.augment,
                          cfg.crop_padding, info.mean, info.std, channels_last, color_jitter=cfg.color_jitter,
                          cutout=cfg.cutout, fill=mean_fill(info.mean))


def _train_dataset(cfg: DataConfig, info: DataInfo, device: torch.device, seed: int,
                   schedule: ResolutionSchedule | None) -> tuple[Dataset, DeviceDecoder | None]:
    """The workers' training dataset, and the device decoder when JPEGs are decoded on the device."""
    extra = SampleAugment(cfg, info.mean, seed) if SampleAugment.wanted(cfg) else None
    if cfg.dataset != "imagefolder":
        images, labels = _tensor_split(cfg, info, train=True)
        return _TensorTrainDataset(images, labels, info.augment, cfg.crop_padding, seed, extra, schedule), None
    samples = info.index.train
    if cfg.decode == "device":
        encoded = EncodedFolderTrain(samples, info.image_size, info.augment, cfg.crop_padding, seed)
        return encoded, DeviceDecoder(device, encoded)
    return _FolderTrainDataset(samples, info.image_size, info.augment, cfg.crop_padding, seed, extra, schedule), None


def build_train_loader(
    data_cfg: DataConfig,
    info: DataInfo,
    rank: int,
    world_size: int,
    device: torch.device | str,
    seed: int,
    micro_batch: int | None = None,
    channels_last: bool = False,
    total_epochs: int | None = None,
    local_world_size: int = 1,
) -> GPUTrainLoader | DataLoaderTrainLoader:
    """This rank's training loader (per-rank batch ``micro_batch``, default ``batch_size // world_size``);
    ``total_epochs`` is the run's length, which progressive resizing (``data.res_start``) needs;
    ``local_world_size`` the processes sharing this node's cores (``data.workers=auto``)."""
    cfg, device = with_workers(data_cfg, local_world_size), torch.device(device)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    batch = micro_batch if micro_batch is not None else cfg.batch_size // world_size
    if batch < 1:
        raise ConfigError(f"data.batch_size: {cfg.batch_size} gives less than one sample per rank ({world_size} ranks)")
    if info.train_size // (batch * world_size) < 1:
        raise ConfigError(
            f"data.batch_size: the per-step batch {batch * world_size} exceeds the {info.train_size} training samples"
        )
    if resolve_loader(cfg, info, device) == "gpu":
        return _gpu_train_loader(cfg, info, rank, world_size, device, seed, batch, channels_last)
    _note_loader_choice(cfg, info, device, rank)
    schedule = train_schedule(cfg, total_epochs)
    dataset, decoder = _train_dataset(cfg, info, device, seed, schedule)
    return DataLoaderTrainLoader(dataset, cfg, info, rank, world_size, device, seed, batch, channels_last, decoder,
                                 schedule)


def build_eval_loader(
    data_cfg: DataConfig,
    info: DataInfo,
    rank: int,
    world_size: int,
    device: torch.device | str,
    channels_last: bool = False,
    local_world_size: int = 1,
) -> TensorEvalLoader | DataLoaderEvalLoader:
    """This rank's exact evaluation shard (every test sample on exactly one rank; ``.num_samples`` its count), at
    ``data.eval_size`` (default ``info.image_size``), whatever the training side."""
    cfg, device = with_workers(data_cfg, local_world_size), torch.device(device)
    batch = max(1, (cfg.eval_batch_size or 2 * cfg.batch_size) // world_size)
    start, end = shard_range(info.test_size, rank, world_size)
    normalize = Normalizer(info.mean, info.std, channels_last)
    if cfg.dataset == "imagefolder":
        samples, (size, resize) = info.index.evals, eval_geometry(cfg, info)
        if cfg.decode == "device":
            encoded = EncodedFolderEval(samples, size, resize)
            return DataLoaderEvalLoader(encoded, start, end, batch, cfg, device, normalize,
                                        DeviceDecoder(device, encoded))
        return DataLoaderEvalLoader(_FolderEvalDataset(samples, size, resize), start, end, batch, cfg, device,
                                    normalize)
    images, labels = _tensor_split(cfg, info, train=False)
    if resolve_loader(cfg, info, device) == "gpu":
        images, labels = images[start:end].to(device), labels[start:end].to(device)
        start, end = 0, end - start
    return TensorEvalLoader(images, labels, start, end, batch, device, normalize)
