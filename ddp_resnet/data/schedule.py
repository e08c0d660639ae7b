"""Progressive resizing: the training side of every epoch, as FFCV schedules it, relative to the run's length.

The side is ``data.res_start`` until the fraction ``data.res_ramp_start`` of the run's epochs is done (counting the
epoch itself), ``data.res_end`` once ``data.res_ramp_end`` is done, and on the ramp in between linearly interpolated
and rounded, half to even, to a multiple of ``data.res_step``. With FFCV's ramp (0.75, 0.875) this is exactly
FFCV's ``get_resolution`` for its ResNet-50 configurations of 16 to 88 epochs (``start_ramp = 0.75 E - 1``,
``end_ramp = 0.875 E - 1``); the arithmetic is exact (fractions), so every rank and every resume agrees.

The schedule is a pure function of the epoch: a loader asked for epoch ``e`` (``set_epoch(e, start_batch)``, also
when resuming mid-epoch) produces ``size(e)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from ddp_resnet.config import DataConfig


@dataclass(frozen=True)
class ResolutionSchedule:
    """Training side per epoch (0-based) over a run of ``epochs`` epochs; see the module docstring."""

    start: int
    end: int
    ramp_start: float
    ramp_end: float
    step: int
    epochs: int

    def size(self, epoch: int) -> int:
        """The training side of epoch ``epoch``."""
        done = Fraction(epoch + 1, max(self.epochs, 1))
        low, high = Fraction(self.ramp_start), Fraction(self.ramp_end)
        if done <= low:
            return self.start
        if done >= high:
            return self.end
        value = self.start + (self.end - self.start) * (done - low) / (high - low)
        return round(value / self.step) * self.step

    def sizes(self) -> list[int]:
        """The distinct sides of the run, in the order they are first used."""
        return list(dict.fromkeys(self.size(e) for e in range(max(self.epochs, 1))))


def resolution_schedule(data_cfg: DataConfig, total_epochs: int) -> ResolutionSchedule | None:
    """The configured schedule over ``total_epochs`` epochs, or None without progressive resizing."""
    d = data_cfg
    if not d.res_start:
        return None
    if total_epochs < 1:
        raise ValueError("progressive resizing needs the run length in epochs (total_epochs)")
    return ResolutionSchedule(d.res_start, d.res_end, d.res_ramp_start, d.res_ramp_end, d.res_step, total_epochs)
