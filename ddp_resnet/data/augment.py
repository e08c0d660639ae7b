"""Augmentations after crop and flip: the seeds' tips (cutout, colour jitter, rotation and scaling) and torchvision's
recipe (TrivialAugment / RandAugment / AutoAugment, random erasing), all keyed by ``(seed, epoch, index)``.

Order, for one sample: rotation/scale -> colour jitter -> auto-augment policy -> cutout -> random erasing, on the
uint8 ``C x H x W`` image the crop/flip produced (normalization follows, on the device).

Randomness: every parameter is a pure function of the sample's key (``transforms.sample_keys``), drawn on its own
stream, so results do not depend on workers, batches or resumes. The torchvision v2 transforms draw from torch's
global generator: they run under ``torch.random.fork_rng`` with the CPU generator seeded from the key (the caller's
generator state is restored afterwards). With repeated augmentation the repeat index enters the key
(``transforms.augment_epoch``), so the k copies of an image are augmented differently.

Colour jitter and cutout are batched tensor functions (``apply_batch``) that the DataLoader workers call on one
image and the device-resident loader on a whole batch, with the same parameters: both paths give identical bytes.
Colour jitter uses torchvision's uint8 formulas (``adjust_brightness``, ``adjust_contrast``, ``adjust_saturation``:
blend, clamp, truncate), in that fixed order; the contrast mean is an exact integer sum, so it does not depend on
the batch. Cutout and random erasing fill with the dataset's mean colour (what a zero fill after normalization is).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from ddp_resnet.config import DataConfig
from ddp_resnet.data.transforms import sample_keys, splitmix64, uniform_int

# One stream constant per independent draw (more hexadecimal digits of pi, after transforms.py's).
_BRIGHTNESS, _CONTRAST, _SATURATION = (np.uint64(0x082EFA98EC4E6C89), np.uint64(0x452821E638D01377),
                                       np.uint64(0xBE5466CF34E90C6C))
_CUTOUT_Y, _CUTOUT_X = np.uint64(0xC0AC29B7C97C50DD), np.uint64(0x3F84D5B5B5470917)
_ANGLE, _SCALE = np.uint64(0x9216D5D98979FB1B), np.uint64(0xD1310BA698DFB5AC)
_POLICY, _ERASING = np.uint64(0x2FFD72DBD01ADFB7), np.uint64(0xB8E1AFED6A267E96)
GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


# ------------------------------------------------------------------------------------------ parameters
def _unit(keys: np.ndarray, stream: np.uint64) -> np.ndarray:
    """Uniform floats in [0, 1) (53 bits), one per key, on one stream."""
    return (splitmix64(keys ^ stream) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def jitter_factors(keys: np.ndarray, strength: float) -> np.ndarray:
    """``n x 3`` float64 brightness, contrast and saturation factors, uniform in [1 - s, 1 + s]."""
    units = np.stack([_unit(keys, s) for s in (_BRIGHTNESS, _CONTRAST, _SATURATION)], 1)
    return 1.0 - strength + 2.0 * strength * units


def cutout_boxes(keys: np.ndarray, height: int, width: int, side: int) -> np.ndarray:
    """``n x 4`` int64 ``(y0, y1, x0, x1)``: a ``side`` square centred uniformly in the image, clipped to it."""
    y0 = uniform_int(keys, _CUTOUT_Y, height) - side // 2
    x0 = uniform_int(keys, _CUTOUT_X, width) - side // 2
    return np.stack([y0.clip(0, height), (y0 + side).clip(0, height), x0.clip(0, width), (x0 + side).clip(0, width)], 1)


def affine_params(keys: np.ndarray, degrees: float, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotation angles uniform in [-degrees, degrees] and zoom factors uniform in [1 - scale, 1 + scale]."""
    return degrees * (2.0 * _unit(keys, _ANGLE) - 1.0), 1.0 + scale * (2.0 * _unit(keys, _SCALE) - 1.0)


def batch_params(keys: np.ndarray, jitter: float, cutout: int, height: int,
                 width: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """CPU tensors for ``apply_batch``: ``n x 6`` float32 jitter ratios then ``1 - ratio`` (each rounded from
    float64, as torchvision's Python floats are), and ``n x 4`` cutout boxes; None for what is off."""
    ratios = None
    if jitter > 0:
        factors = jitter_factors(keys, jitter)
        ratios = torch.from_numpy(np.concatenate([factors, 1.0 - factors], 1).astype(np.float32))
    boxes = torch.from_numpy(cutout_boxes(keys, height, width, cutout)) if cutout > 0 else None
    return ratios, boxes


# ------------------------------------------------------------------------------------------ batched ops
def grayscale(images: torch.Tensor) -> torch.Tensor:
    """torchvision's ``rgb_to_grayscale`` of uint8 ``... x 3 x H x W`` images: ``... x 1 x H x W`` uint8."""
    r, g, b = images.unbind(dim=-3)
    return (GRAY[0] * r + GRAY[1] * g + GRAY[2] * b).to(images.dtype).unsqueeze(-3)


def _blend(images: torch.Tensor, other: torch.Tensor | None, ratio: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend`` per sample: ``ratio * images + (1 - ratio) * other``, clamped, truncated to uint8."""
    mixed = ratio * images if other is None else ratio * images + rest * other
    return mixed.clamp(0, 255).to(torch.uint8)


def color_jitter(images: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation of uint8 ``B x 3 x H x W`` images with per-sample factors (``B x 6`` from
    ``batch_params``, on the images' device); torchvision's uint8 arithmetic, identical for any batch."""
    view = ratios.view(-1, 6, 1, 1, 1)
    height, width = images.shape[-2:]
    out = _blend(images, None, view[:, 0], view[:, 3])
    total = grayscale(out).sum(dim=(-3, -2, -1), dtype=torch.int64, keepdim=True)
    mean = total.to(torch.float32) / (height * width)  # exact integer sum: no dependence on the batch
    out = _blend(out, mean, view[:, 1], view[:, 4])
    return _blend(out, grayscale(out), view[:, 2], view[:, 5])


def cutout(images: torch.Tensor, boxes: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Each image's box ``(y0, y1, x0, x1)`` (``B x 4``) set to ``fill`` (``C`` uint8); one masked select."""
    height, width = images.shape[-2:]
    rows = torch.arange(height, device=images.device)
    cols = torch.arange(width, device=images.device)
    y0, y1, x0, x1 = (boxes[:, i, None] for i in range(4))
    inside = ((rows >= y0) & (rows < y1))[:, :, None] & ((cols >= x0) & (cols < x1))[:, None, :]
    return torch.where(inside[:, None], fill.view(1, -1, 1, 1), images)


def apply_batch(images: torch.Tensor, ratios: torch.Tensor | None, boxes: torch.Tensor | None,
                fill: torch.Tensor) -> torch.Tensor:
    """Colour jitter then cutout (each when its parameters are given) of a uint8 ``B x C x H x W`` batch."""
    if ratios is not None:
        images = color_jitter(images, ratios)
    if boxes is not None:
        images = cutout(images, boxes, fill)
    return images


# ------------------------------------------------------------------------------------------ per sample
def mean_fill(mean: Sequence[float]) -> tuple[int, ...]:
    """The dataset's mean colour as uint8 values (zero after normalization, up to rounding)."""
    return tuple(int(round(m * 255)) for m in mean)


def _policy(cfg: DataConfig):
    """The torchvision.transforms.v2 policy ``data.auto_augment`` names (bilinear, as torchvision's recipes)."""
    from torchvision.transforms import v2

    bilinear = InterpolationMode.BILINEAR
    if cfg.auto_augment == "trivialaugment":
        return v2.TrivialAugmentWide(interpolation=bilinear)
    if cfg.auto_augment == "randaugment":
        return v2.RandAugment(cfg.randaugment_ops, cfg.randaugment_magnitude, interpolation=bilinear)
    return v2.AutoAugment(v2.AutoAugmentPolicy(cfg.autoaugment_policy), interpolation=bilinear)


def _seeded(op, image: torch.Tensor, key: int) -> torch.Tensor:
    """``op(image)`` with torch's CPU generator seeded from ``key``; the caller's generator state is restored."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(key)
        return op(image)


class SampleAugment:
    """The augmentations after crop/flip for one sample in a DataLoader worker (see the module docstring)."""

    def __init__(self, cfg: DataConfig, mean: Sequence[float], seed: int) -> None:
        self.cfg, self.seed = cfg, seed
        self.fill = torch.tensor(mean_fill(mean), dtype=torch.uint8)
        self._ops: tuple | None = None  # the torchvision v2 transforms, built in the worker on first use

    @staticmethod
    def wanted(cfg: DataConfig) -> bool:
        """Whether any augmentation of this module is configured."""
        return bool(cfg.rotate_degrees or cfg.scale_jitter or cfg.color_jitter or cfg.cutout or cfg.random_erasing
                    or cfg.auto_augment != "none")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_ops": None}

    def _torch_ops(self) -> tuple:
        if self._ops is None:
            from torchvision.transforms import v2

            policy = _policy(self.cfg) if self.cfg.auto_augment != "none" else None
            erasing = v2.RandomErasing(self.cfg.random_erasing, value=self.fill.tolist())
            self._ops = (policy, erasing if self.cfg.random_erasing > 0 else None)
        return self._ops

    def _affine(self, image: torch.Tensor, keys: np.ndarray) -> torch.Tensor:
        angle, scale = affine_params(keys, self.cfg.rotate_degrees, self.cfg.scale_jitter)
        return TF.affine(image, angle=float(angle[0]), translate=[0, 0], scale=float(scale[0]), shear=[0.0, 0.0],
                         interpolation=InterpolationMode.BILINEAR)

    def __call__(self, image: torch.Tensor, epoch: int, index: int) -> torch.Tensor:
        """The augmented uint8 ``C x H x W`` image; ``epoch`` is the augmentation epoch (``augment_epoch``)."""
        cfg, keys = self.cfg, sample_keys(self.seed, epoch, [index])
        if cfg.rotate_degrees or cfg.scale_jitter:
            image = self._affine(image, keys)
        policy, erasing = self._torch_ops()
        ratios, boxes = batch_params(keys, cfg.color_jitter, cfg.cutout, image.shape[-2], image.shape[-1])
        image = apply_batch(image[None], ratios, None, self.fill)[0]
        if policy is not None:
            image = _seeded(policy, image, int(splitmix64(keys ^ _POLICY)[0]))
        image = apply_batch(image[None], None, boxes, self.fill)[0]
        if erasing is not None:
            image = _seeded(erasing, image, int(splitmix64(keys ^ _ERASING)[0]))
        return image.contiguous()

