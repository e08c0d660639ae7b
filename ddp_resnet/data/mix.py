"""Mixup / CutMix on a device batch (timm-style: the batch is mixed with its own reverse)."""

from __future__ import annotations

import math

import numpy as np
import torch


def _beta(alpha: float, generator: torch.Generator) -> float:
    """A Beta(alpha, alpha) draw that is a deterministic function of (and advances) ``generator``."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def soft_targets(labels: torch.Tensor, num_classes: int, label_smoothing: float = 0.0) -> torch.Tensor:
    """One-hot float targets with label smoothing (``1 - s + s/C`` on the label, ``s/C`` elsewhere)."""
    off = label_smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    return targets.scatter_(1, labels.long().view(-1, 1), 1.0 - label_smoothing + off)


def cutmix_box(height: int, width: int, lam: float, generator: torch.Generator) -> tuple[int, int, int, int]:
    """A box of area about ``(1 - lam) * H * W`` centred uniformly in the image, clipped: (y0, y1, x0, x1)."""
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy = int(torch.randint(0, height, (1,), generator=generator).item())
    cx = int(torch.randint(0, width, (1,), generator=generator).item())
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return y0, y1, x0, x1


def mix_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    mixup_alpha: float,
    cutmix_alpha: float,
    generator: torch.Generator,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply mixup or cutmix to a batch and return ``(images, soft_targets)``.

    Sample ``i`` is mixed with sample ``N-1-i``. With both alphas > 0, cutmix or mixup is chosen with
    probability 1/2 each. ``lam`` is drawn from ``Beta(alpha, alpha)``; for cutmix it is then corrected to the
    exact fraction of pixels kept after clipping the box. Targets are float32 ``N x C`` rows summing to 1
    (label smoothing included). All randomness comes from ``generator`` (a CPU ``torch.Generator``), so the
    result is a deterministic function of its state. With both alphas 0 returns ``(images, None)``. The input
    tensor is not modified; the output keeps its memory format.
    """
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, None
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or torch.rand((), generator=generator).item() < 0.5)
    lam = _beta(cutmix_alpha if use_cutmix else mixup_alpha, generator)
    partner = images.flip(0)
    if use_cutmix:
        height, width = images.shape[-2:]
        y0, y1, x0, x1 = cutmix_box(height, width, lam, generator)
        mixed = images.clone()
        mixed[:, :, y0:y1, x0:x1] = partner[:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
    else:
        mixed = images * lam + partner * (1.0 - lam)
    if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        mixed = mixed.contiguous(memory_format=torch.channels_last)
    else:
        mixed = mixed.contiguous()
    targets = soft_targets(labels, num_classes, label_smoothing)
    targets = targets * lam + targets.flip(0) * (1.0 - lam)
    return mixed, targets
