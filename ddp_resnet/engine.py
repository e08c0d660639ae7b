"""Training and evaluation steps: AMP, gradient accumulation with no_sync, clipping, EMA, exact evaluation.

No argparse, no paths, no process-group setup here: the caller hands in modules, loaders and a DistEnv-like
device. Metrics stay on the device until they are read once per logging interval: a training step issues no host
sync and no host->device copy (with fp16, GradScaler's inf check syncs unless the optimizer is fused;
``train.nonfinite=skip`` reads one flag per step), so the host can queue work ahead.
"""
from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_resnet import distributed
from ddp_resnet.data import mix_batch
from ddp_resnet.data.mix import soft_targets

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
    skip_nonfinite: bool = False  # train.nonfinite=skip: agree across ranks before the update, skip it if bad
    loss: str = "ce"  # train.loss: ce (softmax cross-entropy) or bce (per-class sigmoid; see ``training_loss``)
    bce_target_thresh: float = 0.0  # train.bce_target_thresh: bce targets above it become 1, the rest 0; 0 = off


class StepStats:
    """A step's statistics, named, kept on the device as one tensor (no host read until ``read()``).

    ``loss_sum`` and ``correct`` are sums over the step's images, ``count`` the images, ``grad_norm`` the global
    gradient norm (after DDP's all-reduce, unscaled, before clipping). Sums of several steps (``+=``) keep the
    layout; their ``grad_norm`` is then a sum of norms.
    """

    FIELDS = ("loss_sum", "correct", "count", "grad_norm")
    __slots__ = ("values",)

    def __init__(self, values: torch.Tensor):
        self.values = values

    @classmethod
    def zeros(cls, device: torch.device) -> StepStats:
        """All-zero statistics (an accumulator) on the device."""
        return cls(torch.zeros(len(cls.FIELDS), device=device))

    loss_sum = property(lambda self: self.values[0], doc="sum of the per-image losses")
    correct = property(lambda self: self.values[1], doc="top-1 hits")
    count = property(lambda self: self.values[2], doc="images")
    grad_norm = property(lambda self: self.values[3], doc="global gradient norm (summed over steps)")

    def __iadd__(self, other: StepStats) -> StepStats:
        self.values += other.values
        return self

    def zero_(self) -> None:
        """Reset in place (an accumulator)."""
        self.values.zero_()

    def read(self) -> dict[str, float]:
        """The values on the host (one device->host copy)."""
        return dict(zip(self.FIELDS, self.values.tolist()))


class ForwardTimer:
    """Seconds spent in forward passes: CUDA events on a GPU (read later, so no synchronization per step),
    ``perf_counter`` on the CPU. A rank's forward has no collective (without SyncBN), so it compares ranks' speed."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.events: list = []
        self.seconds = 0.0
        self._tick = 0.0

    def start(self) -> None:
        """Mark the start of a forward pass."""
        if self.cuda:
            self.events.append(torch.cuda.Event(enable_timing=True))
            self.events[-1].record()
        else:
            self._tick = time.perf_counter()

    def stop(self) -> None:
        """Mark its end."""
        if self.cuda:
            self.events.append(torch.cuda.Event(enable_timing=True))
            self.events[-1].record()
        else:
            self.seconds += time.perf_counter() - self._tick

    def take(self) -> float:
        """The seconds measured since the last call (waits for the last recorded event on a GPU)."""
        if self.events:
            self.events[-1].synchronize()
            self.seconds += sum(a.elapsed_time(b) for a, b in zip(self.events[::2], self.events[1::2])) / 1e3
            self.events = []
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def gradient_norm(parameters, clip: float) -> torch.Tensor:
    """The global L2 norm of the gradients (clipping them to ``clip`` when > 0), as a device tensor."""
    params = [p for p in parameters if p.grad is not None]
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


class TrainStep:
    """The training step and everything it updates: the modules, optimizer, schedule, scaler and EMA, the
    forward timer, the skip decision and the fallback from torch.compile to eager.

    ``model`` is what is called (the bare module, or it DDP-wrapped and/or compiled), ``ddp`` the DDP wrapper (for
    ``no_sync``), ``bare`` the module whose weights are trained and saved. ``compiled`` is off | on | fallback: when
    the very first call of a compiled model fails (compile errors surface there), the compiled graphs are dropped,
    ``rewrap()`` (the builder's DDP wrapper, passed in so this module does not import the builder) wraps the bare
    module again, the step is retried eagerly and ``note`` says so in one line.
    """

    def __init__(self, bare: nn.Module, optimizer, scheduler, scaler, settings: StepSettings, ema=None,
                 model: nn.Module | None = None, ddp: DDP | None = None, compiled: str = "off",
                 rewrap: Callable[[], DDP | None] | None = None, note: Callable[[str], None] = print):
        self.bare = bare
        self.model = model if model is not None else (ddp or bare)
        self.ddp = ddp
        self.optimizer, self.scheduler, self.scaler, self.ema = optimizer, scheduler, scaler, ema
        self.settings = settings
        self.compiled, self.rewrap, self.note = compiled, rewrap, note
        self.mixing = settings.mixup_alpha > 0 or settings.cutmix_alpha > 0
        self.timer = ForwardTimer(settings.device)
        self.skipped = False  # whether the last step's update was skipped (train.nonfinite=skip)
        self.calls = 0

    def __call__(self, micro_batches: list, step: int) -> StepStats:
        """Forward/backward every micro-batch, then one optimizer step (see ``run``), with the compile fallback."""
        self.calls += 1
        if self.calls > 1 or self.compiled != "on":
            return self.run(micro_batches, step)
        try:
            return self.run(micro_batches, step)
        except Exception as exc:  # noqa: BLE001 - any compile failure means: run eagerly
            self.fall_back_to_eager(exc)
            return self.run(micro_batches, step)

    def fall_back_to_eager(self, exc: BaseException) -> None:
        """Drop the compiled graphs (and a DDP wrapper that saw a half step) and continue eagerly."""
        self.note(f"note: torch.compile failed in the first step ({first_line(exc)}); falling back to eager")
        import torch._dynamo

        self.model = self.ddp = None
        torch._dynamo.reset()
        gc.collect()  # a discarded DDP's reducer removes its gradient hooks when it is freed
        ddp = self.rewrap() if self.rewrap is not None else None
        self.model, self.ddp = ddp or self.bare, ddp
        self.compiled = "fallback"

    def _targets(self, images, labels, step: int, micro: int):
        s = self.settings
        if not self.mixing:
            return images, labels
        gen = torch.Generator().manual_seed((s.seed * 1_000_003 + step * 131 + micro * 7919 + s.rank) % 2**63)
        mixed, soft = mix_batch(images, labels, s.num_classes, s.mixup_alpha, s.cutmix_alpha, gen,
                                label_smoothing=s.label_smoothing)
        return mixed, (labels if soft is None else soft)

    def _forward_backward(self, micro_batches: list, step: int, stats: torch.Tensor) -> None:
        """Every micro-batch's forward and backward (gradients all-reduced with the last), summed into ``stats``."""
        s = self.settings
        n = len(micro_batches)
        total = 0
        for i, (images, labels) in enumerate(micro_batches):
            last = i == n - 1
            sync = contextlib.nullcontext() if (last or self.ddp is None) else self.ddp.no_sync()
            with sync:
                inputs, targets = self._targets(images, labels, step, i)
                self.timer.start()
                with autocast(s.device, s.amp):
                    logits = self.model(inputs)
                    loss = training_loss(logits, targets, s)
                self.timer.stop()
                self.scaler.scale(loss / n).backward()
            with torch.no_grad():
                count = labels.shape[0]
                total += count
                stats[:2] += torch.stack([loss.detach().float() * count, (logits.argmax(1) == labels).sum().float()])
        # The count is known on the host: a scalar kernel argument, never a host->device copy (on CUDA a copy
        # from pageable memory would synchronize the stream once per micro-batch).
        stats[2] += total

    def run(self, micro_batches: list, step: int) -> StepStats:
        """One optimizer step over the micro-batches; returns its ``StepStats``.

        No host synchronization, except with ``skip_nonfinite``: then the ranks agree on the step's finiteness
        before the update (one read per step), and a bad step leaves weights, optimizer, BatchNorm buffers and
        EMA as they were (the scheduler still advances: the step is counted).
        """
        s = self.settings
        stats = StepStats.zeros(s.device)
        self.optimizer.zero_grad(set_to_none=True)
        buffers = [b.detach().clone() for b in self.bare.buffers()] if s.skip_nonfinite else None
        self._forward_backward(micro_batches, step, stats.values)
        self.scaler.unscale_(self.optimizer)  # no-op without fp16; the norm is of the true gradients
        stats.values[3] += gradient_norm(self.bare.parameters(), s.clip_grad_norm).float()
        self.skipped = buffers is not None and self._agree_bad(stats)
        if self.skipped:
            for buf, saved in zip(self.bare.buffers(), buffers):
                buf.copy_(saved)
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None and not self.skipped:
            self.ema.update(self.bare)
        return stats

    def _agree_bad(self, stats: StepStats) -> bool:
        """True on every rank when any rank's loss (or, with clipping and without fp16, the gradient norm) is not
        finite: an all-reduce of the flags and one host read."""
        bad = nonfinite(stats, self.settings)
        return bool(distributed.all_reduce_sum(bad.float().reshape(1)).item() > 0)


def training_loss(logits: torch.Tensor, targets: torch.Tensor, settings: StepSettings) -> torch.Tensor:
    """The training loss of a batch: ``targets`` are class indices, or soft rows from mixup/cutmix (label smoothing
    already in them). ce: softmax cross-entropy (label smoothing applied here to index targets). bce: ``bce_loss``.
    The step's reported train loss is this value; evaluation scores every model with cross-entropy."""
    if settings.loss == "bce":
        return bce_loss(logits, targets, settings.label_smoothing, settings.bce_target_thresh)
    smoothing = 0.0 if targets.dtype.is_floating_point else settings.label_smoothing
    return F.cross_entropy(logits, targets, label_smoothing=smoothing)


def bce_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0,
             target_thresh: float = 0.0) -> torch.Tensor:
    """A sigmoid binary cross-entropy per class, as "ResNet strikes back" trains (timm's BinaryCrossEntropy).

    Index targets become one-hot rows, smoothed to ``1 - s + s/C`` on the label and ``s/C`` elsewhere (soft rows
    from mixup/cutmix are used as they are: their smoothing was applied when they were mixed); with
    ``target_thresh`` > 0 each target becomes 1 where it exceeds the threshold, else 0 (RSB: 0.2, so both images of
    a mix count as present). The loss is the mean over all N x C elements, as timm's default ``reduction='mean'``:
    about 1/C of a per-image sum, which the recipes' learning rates were tuned with.
    """
    if not targets.dtype.is_floating_point:
        targets = soft_targets(targets, logits.shape[-1], label_smoothing)
    if target_thresh > 0:
        targets = (targets > target_thresh).to(targets.dtype)
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())  # in float32, as autocast would


def first_line(exc: BaseException) -> str:
    """An exception as ``Type: its first line`` (at most 200 characters of it)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def nonfinite(stats: StepStats, settings: StepSettings) -> torch.Tensor:
    """A device bool: the step's loss is not finite, or (with clipping, except under fp16, where the GradScaler
    handles overflows) its gradient norm is not."""
    bad = ~torch.isfinite(stats.loss_sum)
    if settings.clip_grad_norm > 0 and settings.amp != "fp16":
        bad = bad | ~torch.isfinite(stats.grad_norm)
    return bad


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_classes: int, device: torch.device, amp: str = "none",
             tta_flip: bool = False, on_batch=None) -> dict:
    """Exact evaluation: every sample of the (rank-sharded, unpadded) loader counted once, sums all-reduced.

    Returns loss, top1, top5 (percent), count, and the confusion matrix (rows: true class, cols: predicted)
    identical on every rank. Call on every rank (it is a collective when a process group exists). ``on_batch()``,
    when given, is called after each batch (no synchronization).
    """
    was_training = model.training
    model.eval()
    k = min(5, num_classes)
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss_sum, top1, topk, count
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.int64)
    for images, labels in loader:
        scores, _ = _member_scores(model, images, device, amp, tta_flip)
        batch_sums, pred = _batch_sums(scores, labels, k, log_probs=tta_flip)
        sums[:3] += batch_sums
        sums[3] += labels.shape[0]  # a host number: no host-to-device copy per batch
        confusion += torch.bincount(labels * num_classes + pred, minlength=num_classes * num_classes)
        if on_batch is not None:
            on_batch()
    distributed.all_reduce_sum(sums)
    distributed.all_reduce_sum(confusion)
    model.train(was_training)
    return _results(sums, confusion, num_classes)


def _batch_sums(logits: torch.Tensor, labels: torch.Tensor, k: int,
                log_probs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum, top-1 hits, top-k hits) of one batch and its predictions, as ``evaluate`` counts them."""
    loss = F.nll_loss(logits, labels, reduction="sum") if log_probs else F.cross_entropy(logits, labels,
                                                                                          reduction="sum")
    topk = logits.topk(k, dim=1).indices
    return torch.stack([loss.double(), (topk[:, 0] == labels).sum().double(),
                        (topk == labels[:, None]).any(1).sum().double()]), topk[:, 0]


def _member_scores(model: nn.Module, images: torch.Tensor, device: torch.device, amp: str,
                   tta_flip: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One model's ``(scores, probabilities)`` for a batch: scores are what ``evaluate`` ranks and scores (logits,
    or with ``tta_flip`` the log of the image's and its mirror's averaged probabilities); the probabilities are
    computed only with ``tta_flip`` (None otherwise: ``logits.softmax(1)`` where needed)."""
    with autocast(device, amp):
        logits = model(images).float()
        if tta_flip:
            probs = (logits.softmax(1) + model(images.flip(3)).float().softmax(1)) / 2
            return probs.clamp_min(1e-12).log(), probs
    return logits, None


def _results(sums: torch.Tensor, confusion: torch.Tensor, num_classes: int) -> dict:
    """``evaluate``'s result dictionary from all-reduced sums and a confusion matrix."""
    loss_sum, top1, topk_hits, count = sums.tolist()
    count = max(count, 1.0)
    matrix = confusion.view(num_classes, num_classes).cpu()
    per_class = (matrix.diag().double() / matrix.sum(1).clamp(min=1).double() * 100).tolist()
    return {"loss": loss_sum / count, "top1": 100 * top1 / count, "top5": 100 * topk_hits / count,
            "count": int(sums[3].item()), "confusion": matrix.tolist(), "per_class_acc": per_class}


@torch.no_grad()
def evaluate_ensemble(models: list[nn.Module], loader, num_classes: int, device: torch.device, amp: str = "none",
                      tta_flip: bool = False) -> tuple[list[dict], dict]:
    """Exact evaluation of several models and of their ensemble (softmax probabilities averaged) in one pass.

    Returns ``(member results, ensemble result)``, each as ``evaluate`` returns it: every member's numbers are
    ``evaluate``'s for that model (same arithmetic); the ensemble's loss is the negative log of its averaged
    probability of the true class. Same sharding and all-reduced sums as ``evaluate``: call on every rank.
    """
    states = [m.training for m in models]
    for m in models:
        m.eval()
    k, n = min(5, num_classes), len(models)
    sums = torch.zeros(n + 1, 4, device=device, dtype=torch.float64)  # per member, then the ensemble
    confusion = torch.zeros(n + 1, num_classes * num_classes, device=device, dtype=torch.int64)
    for images, labels in loader:
        outputs = [_member_scores(m, images, device, amp, tta_flip) for m in models]
        mean = torch.stack([s.softmax(1) if probs is None else probs for s, probs in outputs]).mean(0)
        scores = [s for s, _ in outputs] + [mean.clamp_min(1e-12).log()]
        for i, score in enumerate(scores):
            batch_sums, pred = _batch_sums(score, labels, k, log_probs=tta_flip or i == n)
            sums[i, :3] += batch_sums
            confusion[i] += torch.bincount(labels * num_classes + pred, minlength=num_classes ** 2)
        sums[:, 3] += labels.shape[0]
    distributed.all_reduce_sum(sums)
    distributed.all_reduce_sum(confusion)
    for m, state in zip(models, states):
        m.train(state)
    results = [_results(sums[i], confusion[i], num_classes) for i in range(n + 1)]
    return results[:n], results[n]
