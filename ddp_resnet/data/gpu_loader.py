"""Device-resident training loader: the whole uint8 train set lives on the device; batches are built by one gather.

Per epoch there is ONE permutation, ``torch.randperm(N)`` from a CPU generator seeded with ``seed + epoch``
(exactly the permutation ``DistributedSampler`` draws), truncated to ``num_batches * global_batch``; rank ``r``
takes ``perm[r::world]``. Crop offsets and flips come from ``transforms.crop_flip_params`` (a pure function of
seed, epoch and dataset index) for the rank's whole epoch at once. Consequently this loader yields batches that
are bit-identical to the DataLoader path for the same configuration, and a mid-epoch resume is exact.
``data.color_jitter`` and ``data.cutout`` follow the crop/flip, batched on the device by the same functions and
per-sample parameters the DataLoader workers use (``augment.apply_batch``), so they are bit-identical too.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ddp_resnet.data.augment import apply_batch, batch_params
from ddp_resnet.data.transforms import Normalizer, crop_flip, crop_flip_params, sample_keys
from ddp_resnet.pipelines import PIPELINES


class GPUTrainLoader:
    """Yields ``(images float32 normalized, labels int64)`` on ``images_nhwc.device``; see the module docstring.

    ``augment`` is ``none``, ``flip`` or ``crop_flip``; ``padding`` is the crop_flip zero padding; ``color_jitter``
    (strength) and ``cutout`` (side, filled with ``fill``) follow it when > 0.
    """

    def __init__(
        self,
        images_nhwc: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        augment: str,
        padding: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        channels_last: bool = False,
        color_jitter: float = 0.0,
        cutout: int = 0,
        fill: tuple[int, ...] = (0, 0, 0),
    ) -> None:
        if augment not in PIPELINES["gpu"].augments:
            raise ValueError(f"GPUTrainLoader: unsupported augment {augment!r}")
        self.images = images_nhwc
        self.labels = labels.to(images_nhwc.device, torch.int64)
        self.batch_size = batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.augment = augment
        self.padding = padding if augment == "crop_flip" else 0
        self.size = images_nhwc.shape[1]
        self.normalize = Normalizer(mean, std, channels_last)
        self.num_batches = images_nhwc.shape[0] // (batch_size * world_size)
        self.epoch, self.start_batch = 0, 0
        self.color_jitter, self.cutout = color_jitter, cutout
        self.fill = torch.tensor(fill, dtype=torch.uint8, device=images_nhwc.device)

    def __len__(self) -> int:
        return self.num_batches

    def take_bad(self) -> list[tuple[str, str]]:
        """Always empty: in-memory data has no unreadable files (the loaders' common contract)."""
        return []

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next iteration yields epoch ``epoch`` from batch ``start_batch`` on (which is then reset to 0)."""
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch {start_batch} outside [0, {self.num_batches}]")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self.epoch, self.start_batch
        self.start_batch = 0
        generator = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.images.shape[0], generator=generator)
        local = perm[: self.num_batches * self.batch_size * self.world_size][self.rank :: self.world_size]
        device = self.images.device
        dy, dx, flip = crop_flip_params(self.seed, epoch, local.numpy(), 2 * self.padding, flip=self.augment != "none")
        ratios, boxes = batch_params(sample_keys(self.seed, epoch, local.numpy()), self.color_jitter, self.cutout,
                                     self.size, self.size)
        ratios, boxes = (None if t is None else t.to(device, non_blocking=True) for t in (ratios, boxes))
        local, dy, dx, flip = (t.to(device, non_blocking=True) for t in (local, dy, dx, flip))
        b = self.batch_size

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for i in range(start, self.num_batches):
                sl = slice(i * b, (i + 1) * b)
                index = local[sl]
                if self.augment == "none":
                    images = self.images[index].permute(0, 3, 1, 2)
                else:
                    images = crop_flip(self.images, index, dy[sl], dx[sl], flip[sl], self.size, self.padding)
                images = apply_batch(images, None if ratios is None else ratios[sl],
                                     None if boxes is None else boxes[sl], self.fill)
                yield self.normalize(images), self.labels[index]

        return batches()
