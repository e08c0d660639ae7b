"""Repeated augmentation for DDP (Hoffer et al. 2019; DeiT's, timm's and torchvision's ``RASampler``).

Each image drawn in an epoch is shown ``k`` times, the copies dealt to consecutive ranks (different ranks when
``k <= world size``), each copy with its own augmentation: the sampler yields ``(index, repeat)`` and the repeat
index enters the augmentation key. The epoch keeps its length: each rank gets ``N // world`` samples, as with
``DistributedSampler(drop_last=True)``, so the trainer's steps per epoch and schedules do not change.

Like torchvision's sampler an epoch therefore shows about ``N / k`` distinct images, ``k`` times each. Unlike it,
the images are not a fresh random subset every epoch: one permutation (seeded by ``seed`` and the cycle) is split
into ``k`` consecutive parts, one per epoch of a cycle of ``k`` epochs, so over each cycle every image is shown
``k`` times (exactly, when ``N`` is a multiple of ``k`` x the global batch). Everything is a pure function of
``(seed, epoch, rank)``: a resumed run skips whole batches of the same sequence.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class RepeatedAugSampler(Sampler):
    """``(index, repeat)`` pairs of one rank for the epoch given to ``set_epoch``; see the module docstring."""

    def __init__(self, size: int, num_replicas: int, rank: int, repeats: int, seed: int = 0) -> None:
        if not 0 <= rank < num_replicas or repeats < 1:
            raise ValueError(f"rank {rank} of {num_replicas}, repeats {repeats}")
        self.size, self.world, self.rank, self.repeats, self.seed = size, num_replicas, rank, repeats, seed
        self.num_samples = size // num_replicas
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def epoch_images(self, epoch: int) -> list[int]:
        """The distinct images of an epoch, in order: part ``epoch % k`` of the cycle's permutation."""
        cycle, part = divmod(epoch, self.repeats)
        perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + cycle)).tolist()
        per_epoch = math.ceil(self.size / self.repeats)
        return [perm[(part * per_epoch + j) % self.size] for j in range(per_epoch)]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        images, k = self.epoch_images(self.epoch), self.repeats
        total = self.num_samples * self.world  # <= size <= k * len(images)
        return iter([(images[q // k], q % k) for q in range(self.rank, total, self.world)])
