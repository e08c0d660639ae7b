"""The run's mutable state, owned by one object, and the checkpoint schema it writes.

``TrainState`` holds the counters of a run (the step, the epoch's accumulators, skipped steps, the best metric
and its history, the newest good checkpoint); the training loop changes nothing else between steps. Its
``state_dict()`` / ``load_state_dict()`` are the counters' part of a checkpoint; ``training_payload`` adds the
modules, the config, the random streams, the manifest and PowerSGD's per-rank state (an optional key, so the format
stays), stamped ``"format": checkpoint.FORMAT``. Tools that
open a checkpoint read it through ``checkpoint.Saved`` (weights with or without EMA, the saved config, the
manifest, the class names), never by indexing the dict.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ddp_resnet import checkpoint as ckpt
from ddp_resnet import comm_hooks
from ddp_resnet.config import ConfigError
from ddp_resnet.engine import StepStats, TrainStep


@dataclass
class BestMetric:
    """The best value of ``metric`` so far (higher is better), the epoch it came at, and every evaluated value."""

    metric: str = "test_acc"
    value: float | None = None
    epoch: int | None = None
    history: list = field(default_factory=list)  # [epoch, value] per evaluation

    def record(self, epoch: int, value: float) -> bool:
        """Note an evaluation; True when it is a new best."""
        self.history.append([epoch, value])
        if self.value is not None and value <= self.value:
            return False
        self.value, self.epoch = value, epoch
        return True

    def state_dict(self) -> dict:
        """Plain values for the checkpoint."""
        return {"metric": self.metric, "value": self.value, "epoch": self.epoch, "history": list(self.history)}

    @classmethod
    def from_state(cls, state: dict) -> BestMetric:
        """The inverse of ``state_dict``."""
        return cls(state.get("metric", "test_acc"), state.get("value"), state.get("epoch"),
                   [list(h) for h in state.get("history", [])])


@dataclass
class TrainState:
    """The counters of one run on this rank. The epoch sums (loss, correct, count of the steps not skipped) stay
    on the device; on resume rank 0 carries the saved (all-rank) sums and the other ranks start from zero."""

    steps_per_epoch: int
    device: torch.device
    step: int = 0
    epoch_train_time: float = 0.0  # seconds of training steps in this epoch (checkpoints, evaluation excluded)
    epoch_data_wait: float = 0.0  # seconds this rank waited for its loader this epoch (not saved)
    epoch_forward: float = 0.0  # seconds of forward passes read so far this epoch (not saved)
    skipped_steps: int = 0  # updates skipped by train.nonfinite=skip in the whole run
    best: BestMetric = field(default_factory=BestMetric)
    last_good: tuple[Path, int] | None = None  # the newest checkpoint written or resumed from, and its step
    epoch_sums: StepStats = field(init=False)

    def __post_init__(self):
        self.epoch_sums = StepStats.zeros(self.device)

    @property
    def epoch(self) -> int:
        """The epoch the next step belongs to (0-based)."""
        return self.step // self.steps_per_epoch

    @property
    def position(self) -> int:
        """Steps of the current epoch already done."""
        return self.step % self.steps_per_epoch

    def begin_epoch(self) -> None:
        """Zero the epoch's accumulators at its first step (a resumed epoch keeps them)."""
        if self.position == 0:
            self.epoch_sums.zero_()
            self.epoch_train_time = self.epoch_data_wait = self.epoch_forward = 0.0

    def account(self, stats: StepStats, data_wait_s: float, skipped: bool) -> None:
        """Count one optimizer step (device adds only); a skipped step's values stay out of the epoch's sums."""
        if not skipped:
            self.epoch_sums += stats
        self.epoch_data_wait += data_wait_s
        self.step += 1

    def where(self) -> str:
        """This rank's position, for messages."""
        return f"step {self.step} (epoch {self.epoch + 1})"

    def newest_good(self) -> str:
        """The newest good checkpoint, as a message fragment."""
        if self.last_good is None:
            return "no checkpoint was written yet"
        return f"the newest good checkpoint is {self.last_good[0]} (step {self.last_good[1]})"

    def state_dict(self, epoch_sums_all_ranks: torch.Tensor) -> dict:
        """The counters' part of a checkpoint; the caller passes the epoch's sums reduced over ranks."""
        return {"step": self.step, "epoch": self.epoch, "epoch_position": self.position,
                "steps_per_epoch": self.steps_per_epoch, "epoch_acc": epoch_sums_all_ranks[:3].cpu(),
                "epoch_train_time": self.epoch_train_time, "skipped_steps": self.skipped_steps,
                "best": self.best.state_dict()}

    def load_state_dict(self, saved: dict, path: Path, is_main: bool) -> None:
        """Take a checkpoint's counters; a different number of steps per epoch is refused in one line."""
        saved_spe = int(saved["steps_per_epoch"])
        if saved_spe != self.steps_per_epoch:
            raise ConfigError(f"checkpoint {path} was written with {saved_spe} steps per epoch, this run has "
                              f"{self.steps_per_epoch}: data.batch_size or the dataset changed")
        self.step = int(saved["step"])
        self.epoch_sums.zero_()
        if is_main:
            self.epoch_sums.values[:3] += saved["epoch_acc"].to(self.device)
        self.epoch_train_time = float(saved.get("epoch_train_time", 0.0))
        self.skipped_steps = int(saved.get("skipped_steps", 0))
        self.best = BestMetric.from_state(saved["best"])
        self.last_good = (path, self.step)


def training_payload(step: TrainStep, counters: dict, config: dict, rng: list, world_size: int,
                     class_names: list[str] | None, accum_steps: int, seed: int, comm_hook: dict | None = None) -> dict:
    """The whole checkpoint: modules, counters, config, every rank's random streams, data position, manifest, and
    with a stateful ``dist.comm_hook`` (PowerSGD) every rank's hook state (``comm_hooks.gather_state``; optional: a
    checkpoint without it resumes with a fresh hook state)."""
    return {
        "format": ckpt.FORMAT,
        "model": step.bare.state_dict(),
        "optimizer": step.optimizer.state_dict(),
        "scheduler": step.scheduler.state_dict(),
        "scaler": step.scaler.state_dict(),
        "ema": step.ema.state_dict() if step.ema is not None else None,
        **counters,
        "config": config,
        "class_names": list(class_names) if class_names is not None else None,
        "rng": rng,
        "data_state": {"seed": seed, "epoch": counters["epoch"],
                       "start_batch": counters["epoch_position"] * accum_steps},
        "manifest": ckpt.manifest(world_size),
        **({comm_hooks.PAYLOAD_KEY: comm_hook} if comm_hook is not None else {}),
    }


def hyperparameters(step: TrainStep) -> tuple[list[dict], list[float]]:
    """The optimizer's per-group values (all but the parameters) and the schedule's base learning rates, as this
    run's config built them."""
    groups = [{k: v for k, v in group.items() if k != "params"} for group in step.optimizer.param_groups]
    return groups, list(step.scheduler.base_lrs)


def apply_hyperparameters(step: TrainStep, values: tuple[list[dict], list[float]]) -> None:
    """Put this run's optimizer and schedule values (``hyperparameters``) over a restored checkpoint's: the
    momentum buffers and the step count stay, the learning rate follows the new peak and schedule at this step."""
    groups, base_lrs = values
    scheduler = step.scheduler
    for group, fresh in zip(step.optimizer.param_groups, groups):
        group.update({k: v for k, v in fresh.items() if k != "lr"})
    scheduler.base_lrs = base_lrs
    for group, base, factor in zip(step.optimizer.param_groups, base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in step.optimizer.param_groups]


def restore_modules(step: TrainStep, payload: dict) -> None:
    """Load a checkpoint's weights, optimizer, schedule, scaler and EMA into the step's modules."""
    step.bare.load_state_dict(payload["model"])
    step.optimizer.load_state_dict(payload["optimizer"])
    step.scheduler.load_state_dict(payload["scheduler"])
    step.scaler.load_state_dict(payload["scaler"])
    if step.ema is not None and payload.get("ema") is not None:
        step.ema.load_state_dict(payload["ema"])
