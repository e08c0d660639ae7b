"""What the training loop measures while it runs, without a host synchronization per step.

* ``IntervalMeter``: per ``train.log_every`` steps, the mean loss, accuracy and gradient norm (summed on the device,
  read once per interval), images/s, the share of time spent waiting for data, ETAs; the progress and epoch lines.
* ``TrainClock``: training time, with evaluation and checkpoints kept out by one context manager.
* ``NonFinitePolicy`` (over ``NonFiniteWatch``, which remembers on the device the first step whose loss or gradient
  norm was not finite): ``train.nonfinite``'s stop or skip, checked before every collective and checkpoint.
* ``BadSamples``: the samples the loaders could not read and replaced, named once, counted per epoch, limited.
* ``rank_spread``: each rank's data-wait and forward time of an epoch, gathered to rank 0 (stragglers).
* ``ProfilerWindow``: a torch.profiler trace of ``train.profile_steps=START:END``.
* ``Watchdog``: ends a process that makes no progress for ``dist.timeout_s``, saying where it waited.
"""
from __future__ import annotations

import contextlib
import faulthandler
import math
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ddp_resnet import exitcodes
from ddp_resnet.engine import StepSettings, StepStats, nonfinite
from ddp_resnet.rundir import format_duration

STRAGGLER_RATIO = 1.2  # a rank whose data wait + forward time exceeds the median by 20% ...
STRAGGLER_MIN_S = 0.5  # ... and by at least this many seconds in the epoch is named in a warning


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


class IntervalMeter:
    """Sums one logging interval's step metrics on the device; ``read()`` synchronizes once and resets."""

    def __init__(self, device: torch.device, global_batch: int):
        self.device, self.global_batch = device, global_batch
        self.sums = StepStats.zeros(device)  # the interval's steps' statistics, summed
        self.steps = self.skipped = 0
        self.data_wait = 0.0
        self.excluded = 0.0
        self.start = time.perf_counter()

    def add(self, stats: StepStats, data_wait_s: float, skipped: bool = False) -> None:
        """Account for one optimizer step (a device add, no synchronization); a skipped step (``nonfinite=skip``)
        counts for time and images/s only, its non-finite values stay out of the means."""
        if skipped:
            self.skipped += 1
        else:
            self.sums += stats
        self.steps += 1
        self.data_wait += data_wait_s

    def exclude(self, seconds: float) -> None:
        """Time spent on something other than training steps (evaluation, checkpoints): not in img/s."""
        self.excluded += seconds

    def read(self) -> dict:
        """The interval's means (one device->host copy), then start a new interval."""
        loss_sum, correct, count, norm_sum = self.sums.read().values()
        elapsed = max(time.perf_counter() - self.start - self.excluded, 1e-9)
        steps = max(self.steps, 1)
        out = {"loss": _finite(loss_sum / max(count, 1)), "acc": 100 * correct / max(count, 1),
               "img_per_s": self.steps * self.global_batch / elapsed, "data_wait": min(1.0, self.data_wait / elapsed),
               "grad_norm": _finite(norm_sum / max(self.steps - self.skipped, 1)), "seconds_per_step": elapsed / steps}
        if self.device.type == "cuda":
            out["mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.sums.zero_()
        self.steps, self.skipped, self.data_wait, self.excluded, self.start = 0, 0, 0.0, 0.0, time.perf_counter()
        return out


def progress_line(record: dict, step: int, steps_per_epoch: int, total_steps: int, total_epochs: int,
                  eta_epoch_s: float, eta_run_s: float) -> str:
    """The rank-0 progress line of the interval that ended at ``step``."""
    epoch, pos = divmod(step, steps_per_epoch)
    if pos == 0 and step:  # the interval ended with the epoch
        epoch, pos = epoch - 1, steps_per_epoch
    loss = "nan" if record["loss"] is None else f"{record['loss']:.4f}"
    mem = f" | mem {record['mem_gib']:.1f} GiB" if "mem_gib" in record else ""
    return (f"epoch {epoch + 1}/{total_epochs} step {pos}/{steps_per_epoch} "
            f"(run {step}/{total_steps}) | loss {loss} | acc {record['acc']:.2f}% | "
            f"lr {record['lr']:.4g} | {record['img_per_s']:,.0f} img/s | data {100 * record['data_wait']:.0f}%{mem} | "
            f"ETA epoch {format_duration(eta_epoch_s)}, run {format_duration(eta_run_s)}")


def epoch_line(record: dict, total_epochs: int, total_steps: int, eta_run_s: float, spread: dict | None) -> str:
    """The rank-0 line of an epoch's end: train (and test) metrics, speed, ETA, the ranks' spread."""
    test = (f" test_loss {record['test_loss']:.4f} test_acc {record['test_acc']:.2f}%" if "test_acc" in record
            else "")
    ranks = ""
    if spread is not None and spread["ranks"] > 1:
        w, f = spread["rank_data_wait_s"], spread["rank_forward_s"]
        ranks = (f" | ranks data wait {w['min']:.1f}/{w['median']:.1f}/{w['max']:.1f}s forward "
                 f"{f['min']:.1f}/{f['median']:.1f}/{f['max']:.1f}s (min/median/max)")
    return (f"epoch {record['epoch'] + 1}/{total_epochs} step {record['step']}/{total_steps} "
            f"train_loss {record['train_loss']:.4f} train_acc {record['train_acc']:.2f}%{test} "
            f"lr {record['lr']:.4g} {record['img_per_s']:.0f} img/s epoch {record['epoch_time_s']:.1f}s "
            f"ETA {format_duration(eta_run_s)}{ranks}")


def world_size_line(change: dict, global_batch: int) -> str:
    """The rank-0 line of a resume on another number of processes (``change`` is its metrics.jsonl record)."""
    return (f"note: checkpoint written by {change['from']} processes, resuming on {change['to']}: world size "
            f"{change['from']} -> {change['to']} at step {change['step']}, {change['micro_batch']} images per rank "
            f"per micro-step x {change['accum']} accumulation step(s) (was {change['from_micro_batch']} x "
            f"{change['from_accum']}); global batch {global_batch} and the LR schedule are kept; results match to "
            f"float tolerance, not bitwise (recorded in metrics.jsonl)")


def straggler_line(spread: dict | None) -> str | None:
    """A warning naming a straggling rank, or None."""
    if spread is None or not spread["straggler"]:
        return None
    return (f"warning: rank {spread['slowest_rank']} is a straggler: its data wait + forward time this epoch is "
            f"{spread['slowest_vs_median']:.2f}x the median rank's (every rank waits for it at each gradient "
            f"all-reduce)")


class TrainClock:
    """Training time: wall time less what runs inside ``outside()`` (evaluation, checkpoints, loader start-up),
    which is also kept out of the interval meter's images/s."""

    def __init__(self, meter: IntervalMeter):
        self.meter = meter
        self.last = time.perf_counter()
        self.excluded = 0.0

    @contextlib.contextmanager
    def outside(self):
        """Time spent inside is not training time."""
        tick = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - tick
            self.excluded += seconds
            self.meter.exclude(seconds)

    def lap(self) -> float:
        """Seconds of training since the last lap."""
        now = time.perf_counter()
        seconds, self.last, self.excluded = max(now - self.last - self.excluded, 0.0), now, 0.0
        return seconds


class NonFiniteWatch:
    """The first step of this rank whose loss (or gradient norm, see ``engine.nonfinite``) was not finite, kept on
    the device as ``[step, loss, gradient norm]`` (step -1: none) and read only when asked."""

    def __init__(self, settings: StepSettings):
        self.settings = settings
        self.first = torch.tensor([-1.0, 0.0, 0.0], device=settings.device)

    def add(self, stats: StepStats, step: int) -> None:
        """Note this step's finiteness (device ops only)."""
        new = nonfinite(stats, self.settings) & (self.first[0] < 0)
        seen = torch.stack([torch.full_like(stats.loss_sum, step), stats.loss_sum / stats.count, stats.grad_norm])
        self.first = torch.where(new, seen, self.first)

    def check(self, env) -> dict | None:
        """Every rank's record, agreed: the earliest bad step ``{step, rank, loss, grad_norm}``, or None (a collective
        with a process group; one host read)."""
        rows = [self.first]
        if env.distributed:
            rows = [torch.empty_like(self.first) for _ in range(env.world_size)]
            torch.distributed.all_gather(rows, self.first)
        bad = [(row[0], rank, row[1], row[2]) for rank, row in enumerate(torch.stack(rows).tolist()) if row[0] >= 0]
        if not bad:
            return None
        step, rank, loss, norm = min(bad)
        return {"step": int(step), "rank": rank, "loss": loss, "grad_norm": norm}


class NonFiniteStop(RuntimeError):
    """Training met a non-finite loss or gradient norm (``train.nonfinite``); the message is the one line to print."""


class NonFinitePolicy:
    """``train.nonfinite`` behind the two calls the loop makes: ``after_step`` (device ops; with ``skip``, a skipped
    step is counted and named) and ``check`` before any collective or checkpoint (``stop``: every rank raises
    ``NonFiniteStop`` at the same step when any rank met a bad one; a gather and one host read, once per step)."""

    def __init__(self, mode: str, max_skipped: int, settings: StepSettings, env, state, note: Callable[[str], None]):
        self.env, self.state, self.note, self.max_skipped = env, state, note, max_skipped
        self.watch = NonFiniteWatch(settings) if mode == "stop" else None
        self.checked_at = -1  # the step at which every rank's steps were last found finite

    def after_step(self, stats: StepStats, skipped: bool) -> None:
        """Account for the step just counted in ``state.step``."""
        step = self.state.step - 1
        if skipped:
            self._skipped(stats, step)
        elif self.watch is not None:
            self.watch.add(stats, step)

    def check(self) -> None:
        """Raise NonFiniteStop on every rank if any rank met a non-finite step (``stop``; a collective)."""
        state = self.state
        if self.watch is None or self.checked_at == state.step:  # checked at this step already (on every rank)
            return
        bad = self.watch.check(self.env)
        if bad is not None:
            raise NonFiniteStop(
                f"non-finite training at step {bad['step']} (epoch {bad['step'] // state.steps_per_epoch + 1}, rank "
                f"{bad['rank']}): loss {bad['loss']:.6g}, gradient norm {bad['grad_norm']:.6g}; stopped at step "
                f"{state.step} without writing a checkpoint; {state.newest_good()}")
        self.checked_at = state.step

    def _skipped(self, stats: StepStats, step: int) -> None:
        """A step whose update every rank skipped (``skip``): count it, say so, stop beyond the limit."""
        state = self.state
        state.skipped_steps += 1
        values = stats.read()  # the step already synchronized to decide
        message = (f"non-finite training at step {step} (epoch {step // state.steps_per_epoch + 1}): loss on rank "
                   f"{self.env.rank} {values['loss_sum'] / max(values['count'], 1):.6g}, gradient norm "
                   f"{values['grad_norm']:.6g}")
        if state.skipped_steps > self.max_skipped:
            raise NonFiniteStop(f"{message}; more than train.max_skipped_steps={self.max_skipped} steps skipped, "
                                f"stopped without writing a checkpoint; {state.newest_good()}")
        self.note(f"warning: {message}: update skipped on every rank ({state.skipped_steps} of at most "
                  f"{self.max_skipped})")


class BadDataStop(RuntimeError):
    """More unreadable samples than ``data.max_bad_images`` in an epoch; the message is the one line to print."""


class BadSamples:
    """Samples the loaders could not read and replaced (``take_bad()``): gathered to rank 0 at each logging interval
    and epoch end (a CPU collective, with the non-finite check), each file named once in the run, counted per epoch
    over every rank; past ``data.max_bad_images`` in an epoch ``check`` raises on every rank."""

    def __init__(self, limit: int, env, control_group):
        self.limit, self.env, self.group = limit, env, control_group
        self.named: set[str] = set()
        self.pending: list[tuple[str, str]] = []  # this rank's events since the last check (training loader)
        self.pending_eval: list[tuple[str, str]] = []
        self.epoch_total = 0  # every rank's training samples replaced this epoch, as of the last check

    def collect(self, train_loader, eval_loader) -> None:
        """Take the loaders' new events (no collective)."""
        self.pending += [tuple(b) for b in train_loader.take_bad()]
        self.pending_eval += [tuple(b) for b in eval_loader.take_bad()]

    def check(self, step: int) -> None:
        """Agree on the events (a collective): rank 0 names the new files, every rank counts; past the limit
        BadDataStop is raised on every rank."""
        mine = (self.pending, self.pending_eval)
        rows = [mine]
        if self.env.distributed:
            rows = [None] * self.env.world_size
            torch.distributed.all_gather_object(rows, mine, group=self.group)
        self.pending, self.pending_eval = [], []
        self.epoch_total += sum(len(train) for train, _ in rows)
        for path, reason in (event for row in rows for events in row for event in events):
            if path not in self.named:
                self.named.add(path)
                if self.env.is_main:
                    print(f"warning: unreadable sample {path} ({reason}): replaced by the next readable one",
                          file=sys.stderr, flush=True)
        if self.epoch_total > self.limit:
            raise BadDataStop(f"{self.epoch_total} unreadable training samples this epoch (data.max_bad_images="
                              f"{self.limit}) by step {step}; each was named above; fix or remove the files (python "
                              f"-m ddp_resnet.data.prepare --check DIR lists them), then resume")

    def end_epoch(self) -> int:
        """The epoch's count over every rank (after its last check), and a new epoch."""
        total, self.epoch_total = self.epoch_total, 0
        return total


def rank_spread(env, control_group, data_wait_s: float, forward_s: float) -> dict | None:
    """Every rank's data-wait and forward seconds of an epoch, gathered to rank 0: min / median / max of each and
    the slowest rank (a collective; rank 0 gets the dict, others None)."""
    mine = (data_wait_s, forward_s)
    rows = [mine]
    if env.distributed:
        rows = [None] * env.world_size
        torch.distributed.all_gather_object(rows, mine, group=control_group)
    if not env.is_main:
        return None
    totals = [w + f for w, f in rows]
    median = statistics.median(totals)
    slowest = max(range(len(rows)), key=totals.__getitem__)
    out = {"ranks": len(rows), "slowest_rank": slowest,
           "straggler": (totals[slowest] > STRAGGLER_RATIO * median and totals[slowest] - median > STRAGGLER_MIN_S
                         and len(rows) > 1),
           "slowest_vs_median": totals[slowest] / median if median > 0 else 1.0}
    for i, name in enumerate(("data_wait_s", "forward_s")):
        values = [row[i] for row in rows]
        out[f"rank_{name}"] = {"min": min(values), "median": statistics.median(values), "max": max(values)}
    return out


def parse_window(text: str) -> tuple[int, int] | None:
    """``"START:END"`` -> (START, END) global steps, END exclusive; ``""`` -> None (validated by the config)."""
    if not text:
        return None
    start, end = (int(v) for v in text.split(":"))
    return start, end


class ProfilerWindow:
    """A torch.profiler trace of the steps ``[start, end)``, written as a Chrome/TensorBoard trace into
    ``<output_dir>/profile/`` on the chosen ranks."""

    def __init__(self, window: tuple[int, int] | None, out: Path, env, all_ranks: bool):
        self.window = window if window and (all_ranks or env.is_main) else None
        self.dir, self.env = Path(out) / "profile", env
        self.profiler = None

    def before_step(self, step: int) -> None:
        """Start the profiler at the window's first step."""
        if self.window and step == self.window[0] and self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.env.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            handler = torch.profiler.tensorboard_trace_handler(str(self.dir), worker_name=f"rank{self.env.rank}")
            self.profiler = torch.profiler.profile(activities=activities, on_trace_ready=handler)
            self.profiler.start()

    def after_step(self, step: int) -> None:
        """Stop and write the trace once the window's last step is done (``step`` counts it)."""
        if self.profiler is not None and step >= self.window[1]:
            self.profiler.stop()
            self.profiler = None
            traces = sorted(self.dir.glob(f"rank{self.env.rank}.*.pt.trace.json"), key=lambda p: p.stat().st_mtime)
            where = traces[-1] if traces else self.dir
            print(f"[rank {self.env.rank}] profile of steps {self.window[0]}-{self.window[1] - 1} written to {where} "
                  f"(chrome://tracing, https://ui.perfetto.dev, or TensorBoard's profiler plugin on {self.dir})",
                  flush=True)




class Watchdog:
    """A thread that ends this process when it makes no progress for ``limit_s`` seconds.

    The loop calls ``beat(phase)`` at every step boundary (and per evaluation batch); a thread checks the time
    since the last beat. When it exceeds the limit (a peer rank was stopped or died, a deadlock, a dead NFS mount
    under the data loader), it prints one line (rank, step, and what this rank waits in: the collective or the
    loader), every thread's Python stack (faulthandler), and exits with ``exitcodes.HUNG``, so the job ends within the
    limit instead of hanging until a scheduler's time limit. ``pause()`` covers legitimately long quiet phases
    (the first step's compilation).
    """

    def __init__(self, limit_s: float, rank: int, where: Callable[[], str]):
        self.limit, self.rank, self.where = limit_s, rank, where
        self.phase, self.last, self.paused = "starting", time.monotonic(), False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ddp_resnet-watchdog", daemon=True)
        self._thread.start()

    def beat(self, phase: str | None = None) -> None:
        """Progress: restart the clock (and say what comes next)."""
        self.last = time.monotonic()
        if phase is not None:
            self.phase = phase

    def pause(self, paused: bool = True) -> None:
        """Stop (or resume) watching, e.g. while torch.compile compiles the first step."""
        self.paused = paused
        self.beat()

    def close(self) -> None:
        """Stop the thread and wait for it (a daemon thread still alive at interpreter exit can abort it)."""
        self._stop.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.limit / 20)):
            if self.paused or time.monotonic() - self.last <= self.limit:
                continue
            print(f"error: [rank {self.rank}] no progress for {self.limit:.0f} s at {self.where()}: waiting in "
                  f"{self.phase}; a peer rank may be stopped, dead or deadlocked (Python stacks follow)",
                  file=sys.stderr, flush=True)
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            sys.stderr.flush()
            os._exit(exitcodes.HUNG)
