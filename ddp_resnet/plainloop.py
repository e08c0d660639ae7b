"""`python -m ddp_resnet.plainloop`: the seeds' plain CIFAR-10 training loop, a baseline for speed and accuracy.

    python -m ddp_resnet.plainloop --root DIR --model resnet20 --epochs 15 --batch 128 --lr 0.1 [--config X.yaml]

What the seeds' repositories run, on purpose without any of the trainer's machinery: torchvision's ``CIFAR10``
dataset, per-sample PIL transforms in ``DataLoader`` worker processes (``RandomCrop(32, padding=4)``,
``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``), fp32, SGD, a learning rate set every optimizer step, one
evaluation of the test split per epoch. The model comes from ``ddp_resnet.models`` so that a comparison with the
trainer measures the pipeline, not two architectures.

torchvision's ``CIFAR10`` checks the MD5 sums of the batch files; a local copy that was repacked (JPEG-derived,
say) fails them, and then the same arrays are read with ``ddp_resnet.data.cifar`` and served as PIL images by an
equivalent dataset, so the per-sample PIL work in the workers stays the same (the output says which was used).

``--config`` takes the model, optimizer (lr with the linear scaling rule, momentum, weight decay, Nesterov, no
decay on BN/bias), label smoothing, schedule, warm-up, global batch, epochs and seed of a recipe; flags given
explicitly win. Supported schedules: cosine (to ``min_lr``) and constant, each after an optional linear warm-up,
the formulas of ``ddp_resnet.optim``. Batches are full (``drop_last``), as the trainer's are, so both take the
same number of steps per epoch. Each epoch prints one line and appends a JSON record to ``--out``.

Exit codes: 0 trained; 2 bad arguments (one line on stderr).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ddp_resnet.data import CIFAR10_MEAN, CIFAR10_STD, cifar
from ddp_resnet.exitcodes import OK as EXIT_OK
from ddp_resnet.exitcodes import USAGE as EXIT_USAGE
from ddp_resnet.models import build_model, is_cifar_only

SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class PlainSettings:
    """One plain-loop run: data, model, optimizer, schedule, loader."""

    root: str
    model: str = "resnet20"
    epochs: int = 15
    batch: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    no_wd_bn_bias: bool = False
    label_smoothing: float = 0.0
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 0.1
    min_lr: float = 0.0
    workers: int = 4
    device: str = "auto"
    seed: int = 0
    max_steps: int = 0  # > 0: stop each epoch after this many steps (tiny runs)
    out: str = ""  # JSONL file for the per-epoch records ("" = none)


class ArrayCIFAR(Dataset):
    """CIFAR arrays served as torchvision's ``CIFAR10`` serves them: ``(transform(PIL image), int label)``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def seeds_transforms():
    """The seeds' training and test transforms (PIL, per sample)."""
    from torchvision import transforms as T

    normalize = T.Normalize(CIFAR10_MEAN, CIFAR10_STD)
    train = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    return train, T.Compose([T.ToTensor(), normalize])


def cifar_datasets(root: str | Path) -> tuple[Dataset, Dataset, str]:
    """``(train, test, source)``: torchvision's CIFAR10, or the project's reader when torchvision refuses the copy."""
    from torchvision.datasets import CIFAR10

    train_tf, test_tf = seeds_transforms()
    try:
        train = CIFAR10(str(root), train=True, transform=train_tf, download=False)
        test = CIFAR10(str(root), train=False, transform=test_tf, download=False)
        return train, test, "torchvision.datasets.CIFAR10"
    except RuntimeError as exc:  # "Dataset not found or corrupted": the MD5 check failed
        cifar.ensure_cifar(root, "cifar10", download=False)  # a one-line ConfigError when the files are missing
        tx, ty = cifar.read_cifar_split(root, "cifar10", train=True)
        vx, vy = cifar.read_cifar_split(root, "cifar10", train=False)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return (ArrayCIFAR(tx, ty, train_tf), ArrayCIFAR(vx, vy, test_tf),
                f"ddp_resnet.data.cifar arrays as PIL images (torchvision refused the copy: {reason})")


def lr_factor(step: int, s: PlainSettings, total_steps: int, steps_per_epoch: int) -> float:
    """The multiplier of the peak LR at optimizer step ``step``: linear warm-up, then cosine or constant."""
    warmup = int(round(s.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return s.warmup_start_factor + (1 - s.warmup_start_factor) * step / warmup
    if s.schedule == "constant":
        return 1.0
    floor = s.min_lr / s.lr if s.lr else 0.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class Plain:
    """A built plain loop: model, loaders, optimizer, per-step schedule, device."""

    settings: PlainSettings
    model: nn.Module
    train_loader: DataLoader
    test_loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    device: torch.device
    steps_per_epoch: int
    source: str


def build(s: PlainSettings) -> Plain:
    """Datasets, DataLoaders (``s.workers`` processes), model, SGD and the schedule of a run."""
    device = torch.device("cuda" if s.device == "auto" and torch.cuda.is_available() else
                          "cpu" if s.device == "auto" else s.device)
    train, test, source = cifar_datasets(s.root)
    torch.manual_seed(s.seed)
    model = build_model(s.model, num_classes=10, stem=None if is_cifar_only(s.model) else "cifar").to(device)
    decay = [p for p in model.parameters() if not (s.no_wd_bn_bias and p.ndim <= 1)]
    rest = [p for p in model.parameters() if s.no_wd_bn_bias and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": s.weight_decay}] + ([{"params": rest, "weight_decay": 0.0}]
                                                                   if rest else [])
    optimizer = torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum, nesterov=s.nesterov)
    pin = device.type == "cuda"
    train_loader = DataLoader(train, batch_size=s.batch, shuffle=True, drop_last=True, num_workers=s.workers,
                              pin_memory=pin, generator=torch.Generator().manual_seed(s.seed))
    test_loader = DataLoader(test, batch_size=2 * s.batch, shuffle=False, num_workers=s.workers, pin_memory=pin)
    per_epoch = len(train_loader) if not s.max_steps else min(s.max_steps, len(train_loader))
    total = per_epoch * s.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, s, total, per_epoch))
    return Plain(s, model, train_loader, test_loader, optimizer, scheduler, device, per_epoch, source)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_epoch(p: Plain) -> dict:
    """One epoch of the plain loop (worker start-up included, as each epoch of the seeds' loop pays it); the loss
    and accuracy are summed on the device and read once, at the end."""
    p.model.train()
    sums, count = torch.zeros(2, device=p.device), 0  # the count is known on the host: no copy to the device
    _sync(p.device)
    tick = time.perf_counter()
    for step, (images, labels) in enumerate(p.train_loader):
        if step == p.steps_per_epoch:
            break
        images, labels = images.to(p.device, non_blocking=True), labels.to(p.device, non_blocking=True)
        logits = p.model(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=p.settings.label_smoothing)
        p.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        p.optimizer.step()
        p.scheduler.step()
        with torch.no_grad():
            sums += torch.stack([loss.detach() * labels.shape[0], (logits.argmax(1) == labels).sum().float()])
        count += labels.shape[0]
    _sync(p.device)
    seconds = time.perf_counter() - tick
    loss_sum, correct = sums.tolist()
    return {"train_loss": loss_sum / max(count, 1), "train_acc": 100 * correct / max(count, 1),
            "epoch_time_s": seconds, "images": int(count), "img_per_s": count / max(seconds, 1e-9),
            "lr": p.scheduler.get_last_lr()[0]}


@torch.no_grad()
def evaluate(p: Plain) -> dict:
    """Test loss and top-1 accuracy over the whole test split."""
    p.model.eval()
    sums, count = torch.zeros(2, device=p.device), 0
    for images, labels in p.test_loader:
        images, labels = images.to(p.device), labels.to(p.device)
        logits = p.model(images)
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum"),
                             (logits.argmax(1) == labels).sum().float()])
        count += labels.shape[0]
    loss_sum, correct = sums.tolist()
    return {"test_loss": loss_sum / max(count, 1), "test_acc": 100 * correct / max(count, 1)}


def run(s: PlainSettings, log=print) -> list[dict]:
    """Train ``s.epochs`` epochs, evaluating after each; returns (and appends to ``s.out``) one record per epoch."""
    p = build(s)
    log(f"plainloop: {s.model} on CIFAR-10 from {s.root} ({p.source}) | batch {s.batch}, {p.steps_per_epoch} "
        f"steps/epoch x {s.epochs} epochs | SGD lr {s.lr:g} momentum {s.momentum:g} wd {s.weight_decay:g} "
        f"nesterov {s.nesterov} | {s.schedule} schedule | {s.workers} workers | {p.device}")
    records = []
    out = Path(s.out) if s.out else None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("")
    start = time.perf_counter()
    for epoch in range(s.epochs):
        record = {"epoch": epoch, "step": (epoch + 1) * p.steps_per_epoch, **train_epoch(p)}
        tick = time.perf_counter()
        record.update(evaluate(p), eval_time_s=time.perf_counter() - tick, wall_s=time.perf_counter() - start)
        records.append(record)
        log(f"epoch {epoch + 1}/{s.epochs} train_loss {record['train_loss']:.4f} train_acc {record['train_acc']:.2f}% "
            f"test_loss {record['test_loss']:.4f} test_acc {record['test_acc']:.2f}% lr {record['lr']:.4g} "
            f"{record['img_per_s']:.0f} img/s epoch {record['epoch_time_s']:.1f}s")
        if out is not None:
            with open(out, "a") as fh:
                fh.write(json.dumps(record) + "\n")
    return records


# --------------------------------------------------------------------------------------------- the CLI
class UsageError(ValueError):
    """A bad command line, in one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The plain loop's arguments; flags left out take the recipe's value (``--config``) or the defaults."""
    p = _Parser(prog="python -m ddp_resnet.plainloop", description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="directory holding cifar-10-batches-py/")
    p.add_argument("--config", help="recipe to take model, optimizer, schedule, batch and epochs from")
    p.add_argument("--model", help="registered model name (default resnet20)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch", type=int, help="batch size (default 128)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 0.1)")
    p.add_argument("--momentum", type=float)
    p.add_argument("--wd", type=float, dest="weight_decay", help="weight decay (default 1e-4)")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--schedule", choices=SCHEDULES)
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--workers", type=int, help="DataLoader worker processes (default 4)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int)
    p.add_argument("--max-steps", type=int, help="at most this many steps per epoch (default: all)")
    p.add_argument("--out", help="append one JSON record per epoch to this file")
    return p


def from_config(path: str) -> dict:
    """The plain-loop settings a recipe implies (its optimizer, schedule, batch, epochs, model, seed)."""
    from ddp_resnet import config as config_mod
    from ddp_resnet.optim import peak_lr

    cfg = config_mod.load(path)
    o = cfg.optim
    if o.name != "sgd":
        raise UsageError(f"--config {path}: the plain loop runs SGD, not {o.name}")
    return {"model": cfg.model.name, "epochs": cfg.train.epochs, "batch": cfg.data.batch_size, "lr": peak_lr(cfg),
            "momentum": o.momentum, "weight_decay": o.weight_decay, "nesterov": o.nesterov,
            "no_wd_bn_bias": o.no_wd_bn_bias, "label_smoothing": cfg.train.label_smoothing,
            "schedule": o.schedule, "warmup_epochs": o.warmup_epochs, "warmup_start_factor": o.warmup_start_factor,
            "min_lr": o.min_lr, "seed": cfg.train.seed}


def settings_from_args(args: argparse.Namespace) -> PlainSettings:
    """The run's settings: defaults, then the recipe's, then the flags given; validated."""
    values = from_config(args.config) if args.config else {}
    fields = {f.name for f in dataclasses.fields(PlainSettings)}
    values.update({k: v for k, v in vars(args).items() if k in fields and v is not None})
    s = PlainSettings(**values)
    for name in ("epochs", "batch"):
        if getattr(s, name) < 1:
            raise UsageError(f"--{name}: must be >= 1, got {getattr(s, name)}")
    if s.schedule not in SCHEDULES:
        raise UsageError(f"schedule {s.schedule}: the plain loop runs {' or '.join(SCHEDULES)} (set --schedule)")
    if s.workers < 0 or s.max_steps < 0:
        raise UsageError("--workers and --max-steps must be >= 0")
    if s.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available on this machine")
    return s


def main(argv: list[str] | None = None) -> int:
    """Parse, train, print; returns the exit code."""
    from ddp_resnet.config import ConfigError

    try:
        settings = settings_from_args(build_parser().parse_args(argv))
        run(settings, log=lambda line: print(line, flush=True))
    except (UsageError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    return EXIT_OK


def cli() -> None:
    """Console entry point."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
