"""Data: dataset description, per-rank train/eval loaders (DataLoader or device-resident), mixup/cutmix.

``augment.py`` (cutout, colour jitter, rotation/scaling, torchvision v2 policies, random erasing), ``samplers.py``
(repeated augmentation), ``schedule.py`` (progressive resizing) and ``prepare.py`` (``python -m
ddp_resnet.data.prepare``: a pre-resized copy of an ImageFolder tree) extend the loaders.

The package is given rank and world size explicitly; it never initialises process groups, never touches the
model and never reads environment variables.
"""

from ddp_resnet.data.gpu_loader import GPUTrainLoader
from ddp_resnet.data.loaders import (
    DataInfo,
    DataLoaderTrainLoader,
    build_eval_loader,
    build_train_loader,
    check,
    describe,
    eval_info,
    eval_transform,
    resolve_loader,
    shard_range,
)
from ddp_resnet.data.mix import mix_batch
from ddp_resnet.data.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SYNTHETIC_MEAN,
    SYNTHETIC_STD,
)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SYNTHETIC_MEAN",
    "SYNTHETIC_STD",
    "DataInfo",
    "DataLoaderTrainLoader",
    "GPUTrainLoader",
    "build_eval_loader",
    "build_train_loader",
    "check",
    "describe",
    "eval_info",
    "eval_transform",
    "mix_batch",
    "resolve_loader",
    "shard_range",
]
