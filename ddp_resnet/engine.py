"""Training and evaluation steps: AMP, gradient accumulation with no_sync, clipping, EMA, exact evaluation.

No argparse, no paths, no process-group setup here: the caller hands in modules, loaders and a DistEnv-like
device. Metrics stay on the device until an epoch ends: a training step issues no host sync and no host->device
copy (with fp16, GradScaler's inf check syncs unless the optimizer is fused), so the host can queue work ahead.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_resnet import distributed
from ddp_resnet.data import mix_batch

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str):
    """One autocast context for every AMP mode ('none' disables it)."""
    dtype = AMP_DTYPES.get(amp, torch.bfloat16)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=amp != "none")


@dataclass
class StepSettings:
    """What a training step needs to know besides the modules."""

    device: torch.device
    amp: str = "none"
    label_smoothing: float = 0.0
    clip_grad_norm: float = 0.0
    num_classes: int = 10
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    seed: int = 0
    rank: int = 0


class Stepper:
    """Runs one optimizer step over a list of micro-batches and accumulates metrics on the device."""

    def __init__(self, model: nn.Module, optimizer, scheduler, scaler, settings: StepSettings, ema=None,
                 bare_model: nn.Module | None = None, ddp: DDP | None = None):
        self.model = model  # what is called: possibly compiled and/or DDP-wrapped
        self.ddp = ddp  # the DDP wrapper (for no_sync), if any
        self.bare = bare_model if bare_model is not None else model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.settings = settings
        self.ema = ema
        self.mixing = settings.mixup_alpha > 0 or settings.cutmix_alpha > 0

    def _targets(self, images, labels, step: int, micro: int):
        s = self.settings
        if not self.mixing:
            return images, labels
        gen = torch.Generator().manual_seed((s.seed * 1_000_003 + step * 131 + micro * 7919 + s.rank) % 2**63)
        mixed, soft = mix_batch(images, labels, s.num_classes, s.mixup_alpha, s.cutmix_alpha, gen,
                                label_smoothing=s.label_smoothing)
        return mixed, (labels if soft is None else soft)

    def step(self, micro_batches: list, step: int) -> torch.Tensor:
        """Forward/backward every micro-batch, then one optimizer step. Returns [loss_sum, correct, count]."""
        s = self.settings
        stats = torch.zeros(3, device=s.device)
        self.optimizer.zero_grad(set_to_none=True)
        n = len(micro_batches)
        total = 0
        for i, (images, labels) in enumerate(micro_batches):
            last = i == n - 1
            sync = contextlib.nullcontext() if (last or self.ddp is None) else self.ddp.no_sync()
            with sync:
                inputs, targets = self._targets(images, labels, step, i)
                with autocast(s.device, s.amp):
                    logits = self.model(inputs)
                    loss = F.cross_entropy(logits, targets, label_smoothing=0.0 if targets.dtype.is_floating_point
                                           else s.label_smoothing)
                self.scaler.scale(loss / n).backward()
            with torch.no_grad():
                count = labels.shape[0]
                total += count
                stats[:2] += torch.stack([loss.detach().float() * count, (logits.argmax(1) == labels).sum().float()])
        # The count is known on the host: a scalar kernel argument, never a host->device copy (on CUDA a copy
        # from pageable memory would synchronize the stream once per micro-batch).
        stats[2] += total
        if s.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.bare.parameters(), s.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.bare)
        return stats


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_classes: int, device: torch.device, amp: str = "none",
             tta_flip: bool = False) -> dict:
    """Exact evaluation: every sample of the (rank-sharded, unpadded) loader counted once, sums all-reduced.

    Returns loss, top1, top5 (percent), count, and the confusion matrix (rows: true class, cols: predicted)
    identical on every rank. Call on every rank (it is a collective when a process group exists).
    """
    was_training = model.training
    model.eval()
    k = min(5, num_classes)
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss_sum, top1, topk, count
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.int64)
    for images, labels in loader:
        with autocast(device, amp):
            logits = model(images).float()
            if tta_flip:  # average the probabilities of the image and its mirror
                probs = (logits.softmax(1) + model(images.flip(3)).float().softmax(1)) / 2
                logits = probs.clamp_min(1e-12).log()
        loss = F.nll_loss(logits, labels, reduction="sum") if tta_flip else F.cross_entropy(
            logits, labels, reduction="sum")
        topk = logits.topk(k, dim=1).indices
        pred = topk[:, 0]
        sums[:3] += torch.stack([loss.double(), (pred == labels).sum().double(),
                                 (topk == labels[:, None]).any(1).sum().double()])
        sums[3] += labels.shape[0]  # a host number: no host-to-device copy per batch
        confusion += torch.bincount(labels * num_classes + pred, minlength=num_classes * num_classes)
    distributed.all_reduce_sum(sums)
    distributed.all_reduce_sum(confusion)
    model.train(was_training)
    loss_sum, top1, topk_hits, count = sums.tolist()
    count = max(count, 1.0)
    matrix = confusion.view(num_classes, num_classes).cpu()
    per_class = (matrix.diag().double() / matrix.sum(1).clamp(min=1).double() * 100).tolist()
    return {"loss": loss_sum / count, "top1": 100 * top1 / count, "top5": 100 * topk_hits / count,
            "count": int(sums[3].item()), "confusion": matrix.tolist(), "per_class_acc": per_class}
