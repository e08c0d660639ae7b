"""What each data pipeline can do, in one table: read by config validation, the loaders, ``describe`` and bench.

A leaf module (it imports nothing of the package), so ``config`` can read it without an import cycle. Three
training pipelines:

* ``dataloader``: DataLoader worker processes; every dataset, every augmentation.
* ``gpu``: the device-resident loader (the whole uint8 dataset on the device, augmentation batched there) for the
  in-memory datasets; crop/flip, cutout and colour jitter.
* ``device_decode``: ImageFolder with ``data.decode=device`` (workers read the files, the JPEGs are decoded in
  batches on the device); crop, flip and random-resized crop, with repeated augmentation and progressive resizing.
"""
from __future__ import annotations

from dataclasses import dataclass

TENSOR_DATASETS = ("cifar10", "cifar100", "synthetic")  # held in memory as uint8 tensors
FILE_DATASETS = ("imagefolder",)
# The augmentations applied after crop/flip and the sampling options, each key with the value that turns it off.
EXTRA_KEYS: tuple[tuple[str, object], ...] = (
    ("auto_augment", "none"), ("random_erasing", 0.0), ("cutout", 0), ("color_jitter", 0.0),
    ("rotate_degrees", 0.0), ("scale_jitter", 0.0), ("repeated_aug", 1), ("res_start", 0))


@dataclass(frozen=True)
class Pipeline:
    """One way of producing training batches and what it can apply."""

    name: str
    key: str  # the config key that selects it
    what: str  # how messages name it
    datasets: tuple[str, ...]
    augments: tuple[str, ...]  # data.augment values (after ``auto`` is resolved)
    extras: tuple[str, ...]  # keys of EXTRA_KEYS it applies
    applies: str  # what it applies, in words
    instead: str  # what to use for what it cannot do

    def blockers(self, data_cfg, augment: str) -> list[str]:
        """What is configured that this pipeline cannot do, as ``key=value`` strings; empty when it can."""
        blocked = [] if augment in self.augments else [f"data.augment={augment}"]
        for key, off in EXTRA_KEYS:
            if key not in self.extras and getattr(data_cfg, key) != off:
                blocked.append(f"data.{key}={getattr(data_cfg, key)}")
        return blocked

    def refusal(self, data_cfg, augment: str) -> str | None:
        """The one-line reason it cannot serve this data config (dataset or augmentations), or None."""
        if data_cfg.dataset not in self.datasets:
            return (f"{self.key}: {self.what} supports {', '.join(self.datasets)}, not {data_cfg.dataset}; use "
                    f"{self.instead}")
        blocked = self.blockers(data_cfg, augment)
        if blocked:
            return (f"{self.key}: {self.what} applies {self.applies}; it cannot apply {', '.join(blocked)}; use "
                    f"{self.instead}")
        return None


PIPELINES = {
    "dataloader": Pipeline("dataloader", "data.loader", "DataLoader workers", TENSOR_DATASETS + FILE_DATASETS,
                           ("none", "flip", "crop_flip", "rrc_flip"), tuple(key for key, _ in EXTRA_KEYS),
                           "every augmentation", "another augmentation"),
    "gpu": Pipeline("gpu", "data.loader", "gpu (device-resident)", TENSOR_DATASETS, ("none", "flip", "crop_flip"),
                    ("cutout", "color_jitter"), "data.augment=none/flip/crop_flip, data.cutout and data.color_jitter, "
                    "batched on the device (mixup and cutmix work with either loader)",
                    "data.loader=dataloader or auto"),
    "device_decode": Pipeline("device_decode", "data.decode", "device decoding", FILE_DATASETS,
                              ("none", "flip", "crop_flip", "rrc_flip"), ("repeated_aug", "res_start"),
                              "crop, flip and random-resized crop (data.augment=none/flip/crop_flip/rrc_flip), "
                              "data.repeated_aug and progressive resizing", "data.decode=workers"),
}


def resolve_augment(dataset: str, augment: str) -> str:
    """``data.augment=auto``: crop_flip for in-memory data, rrc_flip (random resized crop + flip) for image files."""
    if augment != "auto":
        return augment
    return "crop_flip" if dataset in TENSOR_DATASETS else "rrc_flip"
