"""Deterministic augmentation primitives shared by the DataLoader and the device-resident loader.

Randomness is never drawn from a stateful global generator: every per-sample decision is a pure function of
``(seed, epoch, dataset index)`` through a counter-based hash (splitmix64). Both loader paths therefore produce
bit-identical crop/flip augmentations for the same sample, independently of worker count, worker timing, batch
composition or a mid-epoch resume.

Images travel as ``uint8`` until the very end; ``normalize`` converts a batch to float32 on its device.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SYNTHETIC_MEAN = (0.5, 0.5, 0.5)
SYNTHETIC_STD = (0.5, 0.5, 0.5)

# ------------------------------------------------------------------------------------------ counter-based hash
_U64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
# Distinct stream constants so the crop rows, crop columns and flip of one sample are independent draws.
_STREAM_DY = np.uint64(0x243F6A8885A308D3)
_STREAM_DX = np.uint64(0x13198A2E03707344)
_STREAM_FLIP = np.uint64(0xA4093822299F31D0)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer on a uint64 array (a bijection with good avalanche); wraps modulo 2**64."""
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _MUL1
        x = (x ^ (x >> np.uint64(27))) * _MUL2
        return x ^ (x >> np.uint64(31))


def sample_keys(seed: int, epoch: int, indices: np.ndarray | Sequence[int] | int) -> np.ndarray:
    """64-bit random keys, one per dataset index, that are a pure function of (seed, epoch, index).

    Distinct indices give distinct keys (the final mixing step is a bijection).
    """
    idx = np.atleast_1d(np.asarray(indices, dtype=np.int64)).astype(np.uint64)
    base = splitmix64(np.array([seed & _U64], dtype=np.uint64))
    base = splitmix64(base ^ np.uint64(epoch & _U64))
    return splitmix64(base ^ idx)


def uniform_int(keys: np.ndarray, stream: np.uint64, high: int) -> np.ndarray:
    """Integers in [0, high) from keys (the modulo bias is < high / 2**64, i.e. negligible)."""
    return (splitmix64(keys ^ stream) % np.uint64(high)).astype(np.int64)


def crop_flip_params(
    seed: int, epoch: int, indices: np.ndarray | Sequence[int] | int, max_offset: int, flip: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample crop offsets ``dy, dx`` in ``[0, max_offset]`` and flip flags (probability 1/2) as CPU tensors.

    ``max_offset`` is ``padded_side - crop_side`` (``2 * padding`` for a same-size crop). With ``flip=False``
    no sample is flipped.
    """
    keys = sample_keys(seed, epoch, indices)
    dy = uniform_int(keys, _STREAM_DY, max_offset + 1)
    dx = uniform_int(keys, _STREAM_DX, max_offset + 1)
    flips = (splitmix64(keys ^ _STREAM_FLIP) >> np.uint64(63)).astype(bool) if flip else np.zeros(len(keys), bool)
    return torch.from_numpy(dy), torch.from_numpy(dx), torch.from_numpy(flips)


def _splitmix64_int(x: int) -> int:
    """``splitmix64`` on one Python int (same arithmetic modulo 2**64, without numpy's per-call overhead)."""
    x = (x + 0x9E3779B97F4A7C15) & _U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _U64
    return x ^ (x >> 31)


def sample_key(seed: int, epoch: int, index: int) -> int:
    """``sample_keys`` for a single index, as a Python int (equal to the vectorized result)."""
    base = _splitmix64_int(_splitmix64_int(seed & _U64) ^ (epoch & _U64))
    return _splitmix64_int(base ^ (index & _U64))


def crop_flip_params_one(
    seed: int, epoch: int, index: int, max_offset: int, flip: bool = True
) -> tuple[int, int, bool]:
    """``crop_flip_params`` for a single index as Python values (fast path for DataLoader workers)."""
    key = sample_key(seed, epoch, index)
    dy = _splitmix64_int(key ^ int(_STREAM_DY)) % (max_offset + 1)
    dx = _splitmix64_int(key ^ int(_STREAM_DX)) % (max_offset + 1)
    flipped = bool(_splitmix64_int(key ^ int(_STREAM_FLIP)) >> 63) if flip else False
    return dy, dx, flipped


def augment_epoch(epoch: int, repeat: int = 0) -> int:
    """The epoch a sample's augmentation is keyed by: ``epoch`` itself, with the repeat index of repeated
    augmentation in the high 32 bits (so the k copies of an image in one epoch get distinct keys)."""
    return epoch + (repeat << 32)


def unpack_item(item: Sequence[int]) -> tuple[int, int, int]:
    """A training item ``(index, epoch)`` or ``(index, epoch, repeat)`` -> ``(index, epoch, augment_epoch)``."""
    repeat = item[2] if len(item) > 2 else 0
    return item[0], item[1], augment_epoch(item[1], repeat)


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """A Python RNG seeded from (seed, epoch, index), for per-sample transforms with data-dependent draws (RRC)."""
    return random.Random(sample_key(seed, epoch, index))


# ------------------------------------------------------------------------------------------ crop and flip
def crop_flip(
    images_nhwc: torch.Tensor,
    index: torch.Tensor | None,
    dy: torch.Tensor,
    dx: torch.Tensor,
    flip: torch.Tensor,
    size: int,
    padding: int,
) -> torch.Tensor:
    """Batched zero-padded random crop + horizontal flip by a single gather; no per-sample Python loop.

    ``images_nhwc`` is ``N x H x W x C`` uint8 (any device); ``index`` (``B``, or None for all N) selects the
    batch. The virtual padded image has ``padding`` zero pixels on each side; sample ``b`` is cropped at rows
    ``dy[b] .. dy[b]+size`` and columns ``dx[b] .. dx[b]+size`` of it and mirrored where ``flip[b]``. Returns
    ``B x C x size x size`` uint8 whose memory is channels-last (call ``.contiguous()`` for NCHW).
    """
    device = images_nhwc.device
    _, height, width, _ = images_nhwc.shape
    if index is None:
        index = torch.arange(images_nhwc.shape[0], device=device)
    dy, dx, flip = dy.to(device), dx.to(device), flip.to(device)
    ramp = torch.arange(size, device=device)
    rows = dy[:, None] + ramp - padding  # B x S, coordinates in the unpadded image
    cols = dx[:, None] + torch.where(flip[:, None], size - 1 - ramp, ramp) - padding
    row_ok = (rows >= 0) & (rows < height)
    col_ok = (cols >= 0) & (cols < width)
    out = images_nhwc[index[:, None, None], rows.clamp(0, height - 1)[:, :, None], cols.clamp(0, width - 1)[:, None, :]]
    if padding > 0:
        inside = (row_ok[:, :, None] & col_ok[:, None, :])[..., None]
        out = out * inside.to(out.dtype)
    return out.permute(0, 3, 1, 2)


def crop_flip_one(image_hwc: np.ndarray, dy: int, dx: int, flip: bool, size: int, padding: int) -> np.ndarray:
    """Single-image crop + flip with numpy slicing (``H x W x C`` -> ``size x size x C``), same result as
    ``crop_flip``; the fast path for DataLoader workers."""
    height, width = image_hwc.shape[:2]
    out = np.zeros((size, size, image_hwc.shape[2]), dtype=image_hwc.dtype)
    # output row r shows source row dy + r - padding (likewise for columns, before the flip)
    y0, y1 = max(0, padding - dy), min(size, height + padding - dy)
    x0, x1 = max(0, padding - dx), min(size, width + padding - dx)
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = image_hwc[y0 + dy - padding : y1 + dy - padding, x0 + dx - padding : x1 + dx - padding]
    return out[:, ::-1] if flip else out


def hwc_to_chw_tensor(image_hwc: np.ndarray) -> torch.Tensor:
    """``H x W x C`` uint8 array -> contiguous ``C x H x W`` uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(image_hwc.transpose(2, 0, 1)))


# ------------------------------------------------------------------------------------------ random resized crop
def rrc_params(
    width: int,
    height: int,
    rng: random.Random,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params (same algorithm) with an explicit RNG; returns (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height  # fallback: central crop with the ratio clamped into range
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize_uint8(images_nhwc: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """Resize a uint8 ``N x H x W x C`` stack to ``size x size`` (bilinear, antialiased), in chunks."""
    if images_nhwc.shape[1] == size and images_nhwc.shape[2] == size:
        return images_nhwc
    parts = []
    for start in range(0, images_nhwc.shape[0], chunk):
        x = images_nhwc[start : start + chunk].permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        parts.append(x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous())
    return torch.cat(parts) if parts else images_nhwc.new_empty((0, size, size, images_nhwc.shape[3]))


# ------------------------------------------------------------------------------------------ normalization
class Normalizer:
    """uint8 batch -> float32 ``(x / 255 - mean) / std`` on the batch's device, in the requested memory format.

    Implemented as a per-channel multiply then add (two IEEE-exact elementwise ops), so the result is bitwise
    identical whichever loader produced the batch and whatever its memory layout.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels_last: bool = False) -> None:
        mean_t = torch.tensor(mean, dtype=torch.float64)
        std_t = torch.tensor(std, dtype=torch.float64)
        self._scale = (1.0 / (255.0 * std_t)).float().view(1, -1, 1, 1)
        self._shift = (-mean_t / std_t).float().view(1, -1, 1, 1)
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.channels_last = channels_last

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        images = images.contiguous(memory_format=fmt)  # uint8 copy, if any, is 4x cheaper than a float one
        if images.device not in self._cache:
            self._cache[images.device] = (self._scale.to(images.device), self._shift.to(images.device))
        scale, shift = self._cache[images.device]
        out = images.to(torch.float32).mul_(scale).add_(shift)
        return out.contiguous(memory_format=fmt)
