"""The training loop: plan a run before any process group exists, then train it on every rank.

``plan_run(cfg, launch)`` checks everything that can fail before the process group or the GPU is touched and
reads the checkpoint to resume from; ``run(plan, env, callbacks)`` builds a ``Trainer`` (loaders, network, the
``build.Step``) and ``fit()``s it: epochs of steps, periodic checkpoints, the coordinated stop on
SIGTERM/SIGUSR2, evaluation and metrics at epoch ends. ``Callback`` objects see the loop's events; the tests
install their fault injection through them, the production code has none.

Exit codes: ``EXIT_OK`` 0 finished (or ``train.run_steps`` reached, after a checkpoint); ``EXIT_FAILED`` 1 a rank
failed; ``EXIT_CONFIG`` 2 bad configuration (nothing written); ``EXIT_NONFINITE`` 65 the loss (or gradient norm)
became non-finite (``train.nonfinite``): every rank stopped at the same step and no checkpoint was written after it;
``EXIT_STOPPED`` 75 a stop signal arrived, the ranks agreed at the next step boundary, a checkpoint was written,
and a later run resumes exactly from it.
"""
from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ddp_resnet import build, distributed, monitor, rundir
from ddp_resnet import checkpoint as ckpt
from ddp_resnet import config as config_mod
from ddp_resnet import data as data_mod
from ddp_resnet.config import Config, ConfigError
from ddp_resnet.engine import evaluate
from ddp_resnet.rundir import format_duration

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_NONFINITE, EXIT_STOPPED = 0, 1, 2, 65, 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
HEALTH_CHECK_S = 60  # every rank must answer the start-up health check within this (or dist.timeout_s if shorter)


def log(env, message: str) -> None:
    """Print on rank 0 only."""
    if env is None or env.is_main:
        print(message, flush=True)


class Callback:
    """Hooks into ``Trainer.fit``; override the events you need (every rank calls them)."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first step of this process."""

    def on_step_end(self, trainer: Trainer) -> None:
        """After an optimizer step (``trainer.step`` already counts it)."""

    def on_epoch_end(self, trainer: Trainer, record: dict) -> None:
        """After an epoch's evaluation and metrics record."""


class StopFlag:
    """Records SIGTERM/SIGUSR2; ranks agree on stopping with a collective at a step boundary.

    With several processes the agreement is pipelined: each step boundary starts an asynchronous all-reduce of
    the local flags (on the CPU gloo control group) and reads the one started a step earlier, so the step never
    waits for a network round trip. Every rank reads the same round, so all stop at the same step, one step
    after the signal's round was sent.
    """

    def __init__(self):
        self.signum = 0
        self._previous = {}
        self._pending = None
        self._votes = torch.zeros(1)
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def restore(self) -> None:
        """Put back the handlers that were installed before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, env, group) -> bool:
        """True on every rank, at the same step, once any rank got a stop signal (a collective)."""
        if not env.distributed:
            return self.signum != 0
        decided = False
        if self._pending is not None:
            self._pending.wait()
            decided = bool(self._votes.item() > 0)
        self._votes = torch.tensor([float(self.signum != 0)])
        self._pending = dist.all_reduce(self._votes, group=group, async_op=True)
        return decided

    def drain(self) -> None:
        """Complete the round in flight (every rank started it) before the group is used for other work."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.wait()


# ---------------------------------------------------------------------------------------- planning
@dataclass
class Plan:
    """Everything decided before the process group starts."""

    cfg: Config
    launch: distributed.LaunchInfo
    info: data_mod.DataInfo | None = None  # None for ImageFolder data: indexed once, after the group exists
    resume_path: Path | None = None
    payload: dict | None = None
    warnings: list = field(default_factory=list)


def check_data(cfg: Config, info: data_mod.DataInfo) -> None:
    """The checks that need the dataset's size and classes."""
    if info.train_size < cfg.data.batch_size:
        raise ConfigError(f"data.batch_size: global batch {cfg.data.batch_size} is larger than the training set "
                          f"({info.train_size} images)")


def plan_run(cfg: Config, launch: distributed.LaunchInfo) -> Plan:
    """Validate everything that can fail before any process group or GPU work; read the checkpoint."""
    config_mod.validate_world(cfg, launch.world_size)
    distributed.resolve_device(cfg.train.device, launch.local_rank)
    plan = Plan(cfg, launch)
    if cfg.data.dataset == "imagefolder":
        data_mod.check(cfg.data)  # the tree itself is walked once, by one rank, in run()
    else:
        plan.info = data_mod.describe(cfg.data)
        check_data(cfg, plan.info)
    out = Path(cfg.output_dir)
    resume = cfg.ckpt.resume
    if resume == "none":
        if rundir.holds_run(out) and not cfg.ckpt.overwrite:
            raise ConfigError(f"output_dir {out} already holds a run; use ckpt.resume=auto to continue it or "
                              f"ckpt.overwrite=true to start over")
    else:
        _plan_resume(plan)
    if launch.rank == 0:  # the writer: a directory it cannot write fails now, in one line
        rundir.check_writable(out)
    return plan


def _plan_resume(plan: Plan) -> None:
    cfg, out, resume = plan.cfg, Path(plan.cfg.output_dir), plan.cfg.ckpt.resume
    if resume == "auto":
        found = ckpt.load_latest_valid(out / rundir.CHECKPOINTS, "cpu", warn=plan.warnings.append)
        if found is None:
            return
        plan.resume_path, plan.payload = found
    else:
        try:
            plan.payload = ckpt.load(resume, "cpu")
        except ckpt.CheckpointError as exc:
            raise ConfigError(f"ckpt.resume: {exc}") from None
        plan.resume_path = Path(resume)
    if plan.info is not None:
        ckpt.check_compatible(plan.payload, cfg.model.name, plan.info.num_classes, plan.resume_path)


# -------------------------------------------------------------------------------------------- the run
class NonFiniteStop(RuntimeError):
    """Training met a non-finite loss or gradient norm (``train.nonfinite``); the message is the one line to print."""


class Trainer:
    """Holds the run's modules and counters; ``fit()`` trains to the end or to a stop."""

    def __init__(self, cfg: Config, info: data_mod.DataInfo, env: distributed.DistEnv, callbacks=(), control=None):
        self.cfg, self.info, self.env = cfg, info, env
        self.callbacks = list(callbacks)
        self.out = Path(cfg.output_dir)
        build.seed_everything(cfg.train.seed, env.rank)
        build.apply_torch_flags(cfg)
        self.accum = cfg.optim.accum_steps
        self.steps_per_epoch = build.steps_per_epoch(cfg, info, env.world_size)
        self.total_steps, self.total_epochs = build.run_length(cfg, info, env.world_size)
        self.train_loader = data_mod.build_train_loader(
            cfg.data, info, env.rank, env.world_size, env.device, cfg.train.seed,
            micro_batch=build.micro_batch(cfg, env.world_size), channels_last=cfg.train.channels_last,
            total_epochs=self.total_epochs)
        if len(self.train_loader) // self.accum != self.steps_per_epoch:  # the loaders' contract, checked once
            raise RuntimeError(f"the training loader yields {len(self.train_loader)} batches per epoch, not "
                               f"{self.steps_per_epoch} x {self.accum}")
        self.eval_loader = data_mod.build_eval_loader(cfg.data, info, env.rank, env.world_size, env.device,
                                                      channels_last=cfg.train.channels_last)
        self.bare = build.build_network(cfg, info, env)
        self.parts = build.build_step(cfg, info, env, self.bare, self.total_steps, self.steps_per_epoch,
                                      self.total_epochs, note=lambda message: log(env, message))
        self.control = control if control is not None else distributed.control_group(env)
        self.ckpt_policy = ckpt.CheckpointPolicy(self.out / rundir.CHECKPOINTS, cfg.ckpt.keep)
        self.step = 0
        self.epoch_acc = torch.zeros(3, device=env.device)
        self.epoch_train_time = 0.0
        self.epoch_data_wait = 0.0
        self.epoch_forward = 0.0  # seconds of forward passes read so far this epoch (with each interval)
        self.skipped_steps = 0
        self.finite_at = -1  # the step at which every rank's steps were last found finite
        self.compiled_sides: set[int] = set()  # training sides torch.compile has compiled
        self.best = {"metric": "test_acc", "value": None, "epoch": None, "history": []}
        self.last_good: tuple[Path, int] | None = None  # the newest checkpoint written or resumed from, and its step
        self.eval_seconds: list[float] = []
        self.watch = monitor.NonFiniteWatch(self.parts.stepper.settings) if cfg.train.nonfinite == "stop" else None
        self.watchdog: monitor.Watchdog | None = None  # while fit() runs

    def beat(self, phase: str | None = None) -> None:
        """Tell the watchdog the run progresses (and what it does next)."""
        if self.watchdog is not None:
            self.watchdog.beat(phase)

    def where(self) -> str:
        """This rank's position, for messages."""
        return f"step {self.step} (epoch {self.step // self.steps_per_epoch + 1})"

    @property
    def ema(self):
        """The weight EMA, if ``optim.ema_decay`` > 0."""
        return self.parts.ema

    def _emit(self, event: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(self, *args)

    # ------------------------------------------------------------------------------------- checkpoints
    def restore(self, payload: dict, path: Path) -> None:
        """Load a checkpoint's state into this rank's modules and counters."""
        parts = self.parts
        self.bare.load_state_dict(payload["model"])
        parts.optimizer.load_state_dict(payload["optimizer"])
        parts.scheduler.load_state_dict(payload["scheduler"])
        parts.scaler.load_state_dict(payload["scaler"])
        if self.ema is not None and payload.get("ema") is not None:
            self.ema.load_state_dict(payload["ema"])
        self.step = int(payload["step"])
        saved_world = payload["manifest"]["world_size"]
        saved_spe = int(payload["steps_per_epoch"])
        if saved_spe != self.steps_per_epoch:
            raise ConfigError(f"checkpoint {path} was written with {saved_spe} steps per epoch, this run has "
                              f"{self.steps_per_epoch}: data.batch_size or the dataset changed")
        self.epoch_acc = payload["epoch_acc"].to(self.env.device) * (1.0 if self.env.is_main else 0.0)
        self.epoch_train_time = float(payload.get("epoch_train_time", 0.0))
        self.skipped_steps = int(payload.get("skipped_steps", 0))
        self.best = payload["best"]
        self.last_good = (path, self.step)
        rngs = payload["rng"]
        if saved_world == self.env.world_size:
            ckpt.set_rng_state(rngs[self.env.rank])
        else:
            log(self.env, f"note: checkpoint written by {saved_world} processes, resuming on {self.env.world_size}: "
                          f"global batch {self.cfg.data.batch_size} and the LR schedule are kept; results match to "
                          f"float tolerance, not bitwise")
            ckpt.set_rng_state(rngs[0])
        epoch, pos = divmod(self.step, self.steps_per_epoch)
        log(self.env, f"resumed from {path}: step {self.step}/{self.total_steps} (epoch {epoch}, step {pos} of it)")

    def _gather_rng(self) -> list:
        state = ckpt.rng_state()
        if not self.env.distributed:
            return [state]
        gathered = [None] * self.env.world_size
        dist.all_gather_object(gathered, state, group=self.control)
        return gathered

    def payload(self) -> dict:
        """The full training state (every rank must call this: it gathers RNG states)."""
        rng = self._gather_rng()
        # the epoch's running train metrics summed over ranks; on resume rank 0 carries them
        epoch_acc = distributed.all_reduce_sum(self.epoch_acc.clone())
        if not self.env.is_main:
            return {}
        parts = self.parts
        return {
            "model": self.bare.state_dict(),
            "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(),
            "scaler": parts.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "epoch_position": self.step % self.steps_per_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "epoch_acc": epoch_acc.cpu(),
            "epoch_train_time": self.epoch_train_time,
            "skipped_steps": self.skipped_steps,
            "best": self.best,
            "config": config_mod.to_dict(self.cfg),
            "rng": rng,
            "data_state": {"seed": self.cfg.train.seed, "epoch": self.step // self.steps_per_epoch,
                           "start_batch": (self.step % self.steps_per_epoch) * self.accum},
            "manifest": ckpt.manifest(self.env.world_size),
        }

    def save(self, epoch_done: int | None = None, is_best: bool = False) -> None:
        """Rank 0 writes last.pt (and epoch/best files); every rank waits until the files are complete.

        Never after a non-finite step: the state is checked first (``train.nonfinite=stop``)."""
        self.check_finite()
        self.beat("a checkpoint: rank 0 writes it, every rank waits for the outcome")
        payload = self.payload()
        error, wrote_last = None, False
        if self.env.is_main:
            try:
                self.ckpt_policy.save_last(payload)
                wrote_last = True
                if epoch_done is not None:
                    self.ckpt_policy.save_epoch(payload, epoch_done)
                if is_best:
                    self.ckpt_policy.save_best(payload)
            except ckpt.CheckpointWriteError as exc:
                if wrote_last:
                    intact = f"last.pt of step {self.step} was written before it"
                elif self.last_good is not None:
                    intact = f"the previous checkpoint {self.last_good[0]} (step {self.last_good[1]}) is intact"
                else:
                    intact = "no earlier checkpoint exists"
                error = f"{exc}; {intact}"
        error = distributed.broadcast_object(error, self.env, group=self.control)  # every rank learns it at once
        if error is not None:
            raise ckpt.CheckpointWriteError(error)
        self.last_good = (self.out / rundir.CHECKPOINTS / "last.pt", self.step)

    # ------------------------------------------------------------------------------------------ non-finite
    def _newest_good(self) -> str:
        if self.last_good is None:
            return "no checkpoint was written yet"
        return f"the newest good checkpoint is {self.last_good[0]} (step {self.last_good[1]})"

    def check_finite(self) -> None:
        """Raise NonFiniteStop on every rank if any rank met a non-finite step (``nonfinite=stop``; a collective)."""
        if self.watch is None or self.finite_at == self.step:  # checked at this step already (same on every rank)
            return
        bad = self.watch.check(self.env)
        if bad is not None:
            raise NonFiniteStop(
                f"non-finite training at step {bad['step']} (epoch {bad['step'] // self.steps_per_epoch + 1}, rank "
                f"{bad['rank']}): loss {bad['loss']:.6g}, gradient norm {bad['grad_norm']:.6g}; stopped at step "
                f"{self.step} without writing a checkpoint; {self._newest_good()}")
        self.finite_at = self.step

    def _skipped(self, stats: torch.Tensor) -> None:
        """A step whose update every rank skipped (``nonfinite=skip``): count it, say so, stop beyond the limit."""
        self.skipped_steps += 1
        loss_sum, _, count, norm = stats.tolist()  # the step already synchronized to decide
        step = self.step - 1
        message = (f"non-finite training at step {step} (epoch {step // self.steps_per_epoch + 1}): loss on rank "
                   f"{self.env.rank} {loss_sum / max(count, 1):.6g}, gradient norm {norm:.6g}")
        limit = self.cfg.train.max_skipped_steps
        if self.skipped_steps > limit:
            raise NonFiniteStop(f"{message}; more than train.max_skipped_steps={limit} steps skipped, stopped "
                                f"without writing a checkpoint; {self._newest_good()}")
        log(self.env, f"warning: {message}: update skipped on every rank ({self.skipped_steps} of at most {limit})")

    # ------------------------------------------------------------------------------------------ loop
    def _sync_buffers(self) -> None:
        """Give every rank rank 0's BatchNorm buffers (model and EMA) before evaluating: what the checkpoint holds.

        Each rank updates its running statistics from its own batches, and the EMA copies them, so without this
        ranks would evaluate slightly different models.
        """
        if self.env.distributed and not self.cfg.train.sync_bn:
            modules = [self.bare] + ([self.ema.module] if self.ema is not None else [])
            for module in modules:
                for buf in module.buffers():
                    dist.broadcast(buf, 0)

    def _evaluate(self, epoch: int, record: dict) -> bool:
        """Evaluate (model and EMA) into ``record``; returns True when this epoch is the best so far."""
        tick = time.perf_counter()
        self.beat("evaluation (its sums are all-reduced with every rank)")
        self._sync_buffers()
        result = evaluate(self.bare, self.eval_loader, self.info.num_classes, self.env.device, self.cfg.train.amp,
                          on_batch=self.beat)
        record.update(test_loss=result["loss"], test_acc=result["top1"], test_top5=result["top5"],
                      test_count=result["count"])
        if self.ema is not None:
            ema_result = evaluate(self.ema.module, self.eval_loader, self.info.num_classes, self.env.device,
                                  self.cfg.train.amp, on_batch=self.beat)
            record.update(test_acc_ema=ema_result["top1"], test_loss_ema=ema_result["loss"])
        self.eval_seconds.append(time.perf_counter() - tick)
        record["eval_time_s"] = self.eval_seconds[-1]
        self.best["history"].append([epoch, result["top1"]])
        if self.best["value"] is not None and result["top1"] <= self.best["value"]:
            return False
        self.best.update(value=result["top1"], epoch=epoch)
        if self.env.is_main:
            rundir.write_best(self.out, {
                "epoch": epoch, "test_acc": result["top1"], "test_top5": result["top5"], "test_loss": result["loss"],
                "count": result["count"], "class_names": self.info.class_names,
                "per_class_acc": result["per_class_acc"], "confusion": result["confusion"]})
        return True

    def _evaluates_after(self, epoch: int) -> bool:
        return (epoch + 1) % self.cfg.train.eval_every == 0 or (epoch + 1) * self.steps_per_epoch >= self.total_steps

    def _eta(self, seconds_per_step: float) -> tuple[float, float]:
        """Seconds left in this epoch and in the run (with the evaluations still to come, once one was timed)."""
        epoch_end = min((self.step // self.steps_per_epoch + (self.step % self.steps_per_epoch > 0))
                        * self.steps_per_epoch, self.total_steps)
        run = (self.total_steps - self.step) * seconds_per_step
        if self.eval_seconds:
            current = max(0, math.ceil(self.step / self.steps_per_epoch) - 1)
            evals = sum(self._evaluates_after(e) for e in range(current, self.total_epochs))
            run += evals * sum(self.eval_seconds) / len(self.eval_seconds)
        return (epoch_end - self.step) * seconds_per_step, run

    def _log_interval(self, meter: monitor.IntervalMeter, writer: rundir.MetricsWriter) -> None:
        """Read the interval's metrics (one host read), write its steps.jsonl / TensorBoard record, print a line."""
        self.beat("the interval's metrics (the non-finite check gathers every rank's)")
        self.check_finite()
        values = meter.read()
        self.epoch_forward += self.parts.stepper.timer.take()  # the read synchronized: no wait, few events kept
        record = {"step": self.step, "epoch": (self.step - 1) // self.steps_per_epoch,
                  "images": self.step * self.cfg.data.batch_size, "lr": self.parts.scheduler.get_last_lr()[0],
                  **values, "time": time.time()}
        writer.write_interval(record)
        eta_epoch, eta_run = self._eta(values["seconds_per_step"])
        log(self.env, monitor.progress_line(self, record, eta_epoch, eta_run))

    def _end_epoch(self, epoch: int, writer: rundir.MetricsWriter) -> bool:
        """Reduce train metrics, gather the ranks' timings, evaluate, log; True when this epoch is the best."""
        self.beat("the end of the epoch (metrics and timings are gathered from every rank)")
        self.check_finite()
        acc = distributed.all_reduce_sum(self.epoch_acc.clone())
        loss_sum, correct, count = acc.tolist()
        record = {"epoch": epoch, "step": self.step, "train_loss": loss_sum / max(count, 1),
                  "train_acc": 100 * correct / max(count, 1), "lr": self.parts.scheduler.get_last_lr()[0],
                  "epoch_time_s": self.epoch_train_time, "img_per_s": count / max(self.epoch_train_time, 1e-9)}
        if self.cfg.train.nonfinite == "skip":
            record["skipped_steps"] = self.skipped_steps
        self.epoch_forward += self.parts.stepper.timer.take()
        spread = monitor.rank_spread(self.env, self.control, self.epoch_data_wait, self.epoch_forward)
        if spread is not None:
            for name in ("data_wait_s", "forward_s"):
                record.update({f"rank_{name}_{k}": v for k, v in spread[f"rank_{name}"].items()})
            record["slowest_rank"] = spread["slowest_rank"]
        is_best = self._evaluate(epoch, record) if self._evaluates_after(epoch) else False
        writer.write(record)
        eta = self._eta(self.epoch_train_time / max(self.step - epoch * self.steps_per_epoch, 1))[1]
        test = (f" test_loss {record['test_loss']:.4f} test_acc {record['test_acc']:.2f}%"
                if "test_acc" in record else "")
        ranks = ""
        if spread is not None and self.env.distributed:
            w, f = spread["rank_data_wait_s"], spread["rank_forward_s"]
            ranks = (f" | ranks data wait {w['min']:.1f}/{w['median']:.1f}/{w['max']:.1f}s forward "
                     f"{f['min']:.1f}/{f['median']:.1f}/{f['max']:.1f}s (min/median/max)")
        log(self.env, f"epoch {epoch + 1}/{self.total_epochs} step {self.step}/{self.total_steps} "
                      f"train_loss {record['train_loss']:.4f} train_acc {record['train_acc']:.2f}%{test} "
                      f"lr {record['lr']:.4g} {record['img_per_s']:.0f} img/s epoch {record['epoch_time_s']:.1f}s "
                      f"ETA {format_duration(eta)}{ranks}")
        if spread is not None and spread["straggler"]:
            log(self.env, f"warning: rank {spread['slowest_rank']} is a straggler: its data wait + forward time this "
                          f"epoch is {spread['slowest_vs_median']:.2f}x the median rank's (every rank waits for it "
                          f"at each gradient all-reduce)")
        self._emit("on_epoch_end", record)
        return is_best

    def fit(self) -> int:
        """Train until the schedule ends, ``run_steps`` is reached, a stop signal arrives, or training diverges."""
        stop = StopFlag()
        writer = rundir.MetricsWriter(self.out, self.env.is_main, self.step, self.steps_per_epoch)
        self.watchdog = monitor.Watchdog(self.cfg.dist.timeout_s, self.env.rank, self.where)
        try:
            code = self._fit(stop, writer)
            stop.drain()
            return code
        except NonFiniteStop as exc:  # every rank raised it at the same step
            stop.drain()
            if self.env.is_main:
                print(f"error: {exc}", file=sys.stderr, flush=True)
            return EXIT_NONFINITE
        finally:
            self.watchdog.close()
            stop.restore()
            writer.close()

    def _stopped_here(self, stopping: bool) -> int:
        if stopping:
            log(self.env, f"stop signal: checkpoint written at step {self.step}; exiting with {EXIT_STOPPED} so the "
                          f"job can be resumed")
            return EXIT_STOPPED
        log(self.env, f"train.run_steps={self.cfg.train.run_steps} reached at step {self.step}; checkpoint written")
        return EXIT_OK

    def _train_step(self, batches, meter: monitor.IntervalMeter, profiler: monitor.ProfilerWindow) -> None:
        """Fetch one step's micro-batches, run the step, account for it (no host synchronization)."""
        profiler.before_step(self.step)
        self.beat("the data loader (the next batch)")
        tick = time.perf_counter()
        micro = [next(batches) for _ in range(self.accum)]
        waited = time.perf_counter() - tick
        self.beat("the training step (its DDP gradient all-reduce waits for every rank)")
        side = micro[0][0].shape[-1]
        compiling = self.parts.compiled == "on" and side not in self.compiled_sides
        if compiling:  # torch.compile's first step at each side may take minutes without a collective to wait in
            self.watchdog.pause()
        stats = self.parts(micro, self.step)
        if compiling:
            self.watchdog.pause(False)
            self.compiled_sides.add(side)
        self.epoch_data_wait += waited
        skipped = self.parts.stepper.skipped
        if not skipped:  # a skipped step's non-finite loss stays out of the epoch's and the interval's means
            self.epoch_acc += stats[:3]
            if self.watch is not None:
                self.watch.add(stats, self.step)
        meter.add(stats, waited, skipped)
        self.step += 1
        if skipped:
            self._skipped(stats)
        profiler.after_step(self.step)
        self._emit("on_step_end")

    def _fit(self, stop: StopFlag, writer: rundir.MetricsWriter) -> int:
        """The training loop; returns the exit code."""
        env, cfg = self.env, self.cfg
        run_start = time.time()
        start_step = self.step
        budget_end = self.step + cfg.train.run_steps if cfg.train.run_steps else self.total_steps
        meter = monitor.IntervalMeter(env.device, cfg.data.batch_size)
        profiler = monitor.ProfilerWindow(monitor.parse_window(cfg.train.profile_steps), self.out, env,
                                          cfg.train.profile_ranks == "all")
        self._emit("on_fit_start")
        while self.step < self.total_steps:
            epoch, pos = divmod(self.step, self.steps_per_epoch)
            epoch_end = min((epoch + 1) * self.steps_per_epoch, self.total_steps)
            if pos == 0:
                self.epoch_acc.zero_()
                self.epoch_train_time = self.epoch_data_wait = self.epoch_forward = 0.0
            self.train_loader.set_epoch(epoch, start_batch=pos * self.accum)
            batches = iter(self.train_loader)
            self.bare.train()
            tick = time.time()
            stopping = False
            while self.step < epoch_end:
                self._train_step(batches, meter, profiler)
                if self.step % cfg.train.log_every == 0:
                    self._log_interval(meter, writer)
                self.beat("the stop-signal agreement (a gloo all-reduce with every rank)")
                stopping = stop.agreed(env, self.control)
                if self.step == epoch_end:
                    break
                if stopping or self.step >= budget_end or (
                        cfg.ckpt.every_steps and self.step % cfg.ckpt.every_steps == 0):
                    self.epoch_train_time += time.time() - tick
                    saving = time.time()
                    self.save()
                    meter.exclude(time.time() - saving)
                    tick = time.time()
                    if stopping or self.step >= budget_end:
                        return self._stopped_here(stopping)
            del batches
            self.epoch_train_time += time.time() - tick
            ending = time.time()
            is_best = self._end_epoch(epoch, writer)
            self.save(epoch_done=epoch if self.step % self.steps_per_epoch == 0 else None, is_best=is_best)
            meter.exclude(time.time() - ending)
            if stopping or (self.step >= budget_end and self.step < self.total_steps):
                return self._stopped_here(stopping)
        trained = self.step - start_step
        log(env, f"done: {self.total_steps} steps, best test_acc {self.best['value']:.2f}% at epoch "
                 f"{(self.best['epoch'] or 0) + 1} ({trained} steps in {format_duration(time.time() - run_start)})"
            if self.best["value"] is not None else f"done: {self.total_steps} steps")
        return EXIT_OK


def run(plan: Plan, env: distributed.DistEnv, callbacks=()) -> int:
    """Index the data (once, for ImageFolder), build this rank's trainer, restore a planned checkpoint, train."""
    cfg = plan.cfg
    control = distributed.control_group(env)
    tick = time.perf_counter()
    ranks = distributed.check_ranks(env, control, config_mod.to_dict(cfg), ckpt.versions(),
                                    min(HEALTH_CHECK_S, cfg.dist.timeout_s))
    if env.distributed:
        log(env, f"{env.world_size} ranks ({env.launcher}, {env.backend}), start-up health check passed in "
                 f"{time.perf_counter() - tick:.2f} s:\n{distributed.format_ranks(ranks)}")
    info = plan.info
    if info is None:
        info = data_mod.describe(cfg.data, share=lambda fn: distributed.share_from_rank0(fn, env))
        check_data(cfg, info)
        if plan.payload is not None:
            ckpt.check_compatible(plan.payload, cfg.model.name, info.num_classes, plan.resume_path)
    if env.is_main:
        rundir.write_config(cfg)
    for warning in plan.warnings:
        log(env, warning)
    trainer = Trainer(cfg, info, env, callbacks, control)
    data = cfg.data.dataset
    if data == "imagefolder":
        from ddp_resnet.data.device_decode import default_backend

        data += f" (JPEG decoding on {env.device}, {default_backend()})" if cfg.data.decode == "device" else ""
    log(env, f"ddp_resnet: {cfg.model.name} on {data} | world {env.world_size} ({env.launcher}, "
             f"{env.backend or 'no process group'}, {env.device}) | global batch {cfg.data.batch_size} | "
             f"{trainer.steps_per_epoch} steps/epoch, {trainer.total_steps} steps | output {cfg.output_dir}")
    if plan.payload is not None:
        trainer.restore(plan.payload, plan.resume_path)
        plan.payload = None
    return trainer.fit()
