"""The training loop: plan a run before any process group exists, then train it on every rank.

``plan_run(cfg, launch)`` checks everything that can fail before the process group or the GPU is touched and
reads the checkpoint to resume from; ``run(plan, env, callbacks)`` builds a ``Trainer`` and ``fit()``s it.

The pieces, each the one owner of its part: ``state.TrainState`` the run's counters (its state_dict is the
checkpoint's), ``engine.TrainStep`` the step and its modules, ``monitor.NonFinitePolicy`` the non-finite
policy, ``Checkpointer`` the files and their write outcome on every rank, ``Validator`` evaluation and the best
metric, ``monitor.TrainClock`` training time. ``Trainer._fit`` is a flat loop: a step, its accounting, then the
periodic actions (log, checkpoint, end of epoch), each with its own cadence, timed out of the training time.
``Callback`` objects see the loop's events (the fault tests install theirs through them: ``tests/faults/``).

Exit codes (``ddp_resnet.exitcodes``): 0 finished (or ``train.run_steps`` reached, after a checkpoint); 1 a rank
failed; 2 bad configuration (nothing written); 65 the loss or gradient norm became non-finite
(``train.nonfinite``): every rank stopped at the same step and no checkpoint was written after it; 70 the watchdog
saw no progress; 74 a checkpoint write failed; 75 a stop signal arrived, the ranks agreed at the next step
boundary, a checkpoint was written, and a later run resumes exactly from it; 79 a callback asked the run to stop
after an epoch (``Trainer.stop_after_epoch``: a search trial its study pruned), with that epoch's checkpoint written.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ddp_resnet import build, comm_hooks, distributed, exitcodes, monitor, rundir
from ddp_resnet import checkpoint as ckpt
from ddp_resnet import config as config_mod
from ddp_resnet import data as data_mod
from ddp_resnet.config import Config, ConfigError
from ddp_resnet.engine import TrainStep, evaluate
from ddp_resnet.monitor import NonFiniteStop
from ddp_resnet.optim import lr_factor
from ddp_resnet.rundir import format_duration
from ddp_resnet.state import TrainState, apply_hyperparameters, hyperparameters, restore_modules, training_payload

HEALTH_CHECK_S = 60  # every rank must answer the start-up health check within this (or dist.timeout_s if shorter)


def log(env, message: str) -> None:
    """Print on rank 0 only."""
    if env is None or env.is_main:
        print(message, flush=True)


class Callback:
    """Hooks into ``Trainer.fit``; override the events you need (every rank calls them)."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first step of this process (``trainer.train_step.bare`` is the model, on its device)."""

    def on_step_end(self, trainer: Trainer) -> None:
        """After an optimizer step (``trainer.state.step`` already counts it)."""

    def on_epoch_end(self, trainer: Trainer, record: dict) -> None:
        """After an epoch's evaluation and metrics record."""


# ---------------------------------------------------------------------------------------- planning
@dataclass
class Plan:
    """Everything decided before the process group starts."""

    cfg: Config
    launch: distributed.LaunchInfo
    info: data_mod.DataInfo | None = None  # None for ImageFolder data: indexed once, after the group exists
    resume_path: Path | None = None
    payload: dict | None = None
    changes: list = field(default_factory=list)  # (key, checkpoint's value, new value) allowed on resume
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
        failures: list[str] = []
        found = ckpt.load_latest_valid(out / rundir.CHECKPOINTS, "cpu", warn=failures.append)
        plan.warnings += failures
        if found is None and failures:  # the run's history is there but unusable: never start over silently
            raise ConfigError(f"output_dir {out} holds checkpoints but none loads: "
                              f"{'; '.join(f.removeprefix('warning: ') for f in failures)}; to start over, use "
                              f"ckpt.resume=none ckpt.overwrite=true (the old run's files are moved aside)")
        if found is None:
            return
        plan.resume_path, plan.payload = found
    else:
        try:
            plan.payload = ckpt.load(resume, "cpu")
        except ckpt.CheckpointError as exc:
            raise ConfigError(f"ckpt.resume: {exc}") from None
        plan.resume_path = Path(resume)
    if plan.info is not None:  # another network first: its own message names the two models
        ckpt.check_compatible(plan.payload, cfg.model.name, plan.info.num_classes, plan.resume_path)
    if isinstance(plan.payload.get("config"), dict):
        plan.changes = config_mod.check_resume(plan.payload["config"], cfg, plan.resume_path)
    if plan.info is not None:
        check_resumable(plan, plan.info)


def check_resumable(plan: Plan, info: data_mod.DataInfo) -> None:
    """The planned checkpoint fits this run's network and data: the model, its classes, the steps per epoch."""
    cfg, payload, path = plan.cfg, plan.payload, plan.resume_path
    ckpt.check_compatible(payload, cfg.model.name, info.num_classes, path)
    spe = build.steps_per_epoch(cfg, info, plan.launch.world_size)
    saved = int(payload.get("steps_per_epoch", spe))
    if saved != spe:
        raise ConfigError(f"checkpoint {path} was written with {saved} steps per epoch, this run has {spe}: "
                          f"data.batch_size or the dataset changed")


# -------------------------------------------------------------------------------------------- the run
class Checkpointer:
    """Rank 0 writes last.pt (and epoch and best files); every rank learns the outcome at once (a failed write is
    one line naming the file and the intact checkpoint, raised on every rank)."""

    def __init__(self, out: Path, keep: int, env, control):
        self.dir, self.env, self.control = out / rundir.CHECKPOINTS, env, control
        self.policy = ckpt.CheckpointPolicy(self.dir, keep)

    def save(self, payload: dict, state: TrainState, epoch_done: int | None, is_best: bool) -> None:
        """Write the payload (rank 0's; {} elsewhere) and record it as the newest good checkpoint."""
        error, wrote_last = None, False
        if self.env.is_main:
            try:
                self.policy.save_last(payload)
                wrote_last = True
                if epoch_done is not None:
                    self.policy.save_epoch(payload, epoch_done)
                if is_best:
                    self.policy.save_best(payload)
            except ckpt.CheckpointWriteError as exc:
                if wrote_last:
                    intact = f"last.pt of step {state.step} was written before it"
                elif state.last_good is not None:
                    intact = f"the previous checkpoint {state.last_good[0]} (step {state.last_good[1]}) is intact"
                else:
                    intact = "no earlier checkpoint exists"
                error = f"{exc}; {intact}"
        error = distributed.broadcast_object(error, self.env, group=self.control)  # every rank learns it at once
        if error is not None:
            raise ckpt.CheckpointWriteError(error)
        state.last_good = (self.dir / "last.pt", state.step)


class Validator:
    """Evaluation at epoch ends (``train.eval_every``, and after the last epoch): model and EMA, exact and
    distributed; the best metric in ``state.best`` and ``best_eval.json``."""

    def __init__(self, cfg: Config, info, env, loader, step: TrainStep, steps_per_epoch: int, total_steps: int):
        self.cfg, self.info, self.env, self.loader, self.train_step = cfg, info, env, loader, step
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.seconds: list[float] = []

    def should_validate(self, epoch: int) -> bool:
        """Whether the end of ``epoch`` (0-based) is evaluated."""
        return ((epoch + 1) % self.cfg.train.eval_every == 0
                or (epoch + 1) * self.steps_per_epoch >= self.total_steps)

    def _sync_buffers(self) -> None:
        """Give every rank rank 0's BatchNorm buffers (model and EMA) before evaluating: what the checkpoint holds.

        Each rank updates its running statistics from its own batches, and the EMA copies them, so without this
        ranks would evaluate slightly different models.
        """
        if self.env.distributed and not self.cfg.train.sync_bn:
            ema = self.train_step.ema
            for module in [self.train_step.bare] + ([ema.module] if ema is not None else []):
                for buf in module.buffers():
                    dist.broadcast(buf, 0)

    def run(self, epoch: int, record: dict, state: TrainState, beat, out: Path) -> bool:
        """Evaluate (model and EMA) into ``record``; returns True when this epoch is the best so far."""
        tick = time.perf_counter()
        beat("evaluation (its sums are all-reduced with every rank)")
        self._sync_buffers()
        amp, classes, device = self.cfg.train.amp, self.info.num_classes, self.env.device
        result = evaluate(self.train_step.bare, self.loader, classes, device, amp, on_batch=beat)
        record.update(test_loss=result["loss"], test_acc=result["top1"], test_top5=result["top5"],
                      test_count=result["count"])
        if self.train_step.ema is not None:
            ema_result = evaluate(self.train_step.ema.module, self.loader, classes, device, amp, on_batch=beat)
            record.update(test_acc_ema=ema_result["top1"], test_loss_ema=ema_result["loss"])
        self.seconds.append(time.perf_counter() - tick)
        record["eval_time_s"] = self.seconds[-1]
        if not state.best.record(epoch, result["top1"]):
            return False
        if self.env.is_main:
            rundir.write_best(out, {
                "epoch": epoch, "test_acc": result["top1"], "test_top5": result["top5"], "test_loss": result["loss"],
                "count": result["count"], "class_names": self.info.class_names,
                "per_class_acc": result["per_class_acc"], "confusion": result["confusion"]})
        return True


class Trainer:
    """One rank's run: loaders, the step, the state and the periodic actions; ``fit()`` trains to the end or a stop."""

    def __init__(self, cfg: Config, info: data_mod.DataInfo, env: distributed.DistEnv, callbacks=(), control=None):
        self.cfg, self.info, self.env = cfg, info, env
        self.callbacks = list(callbacks)
        self.out = Path(cfg.output_dir)
        build.seed_everything(cfg.train.seed, env.rank)
        build.apply_torch_flags(cfg)
        self.accum = build.accumulation(cfg, env.world_size)  # optim.accum_steps, or more under data.max_rank_batch
        self.steps_per_epoch = build.steps_per_epoch(cfg, info, env.world_size)
        self.total_steps, self.total_epochs = build.run_length(cfg, info, env.world_size)
        self.train_loader = data_mod.build_train_loader(
            cfg.data, info, env.rank, env.world_size, env.device, cfg.train.seed,
            micro_batch=build.micro_batch(cfg, env.world_size), channels_last=cfg.train.channels_last,
            total_epochs=self.total_epochs, local_world_size=env.local_world_size)
        if len(self.train_loader) // self.accum != self.steps_per_epoch:  # the loaders' contract, checked once
            raise RuntimeError(f"the training loader yields {len(self.train_loader)} batches per epoch, not "
                               f"{self.steps_per_epoch} x {self.accum}")
        eval_loader = data_mod.build_eval_loader(cfg.data, info, env.rank, env.world_size, env.device,
                                                 channels_last=cfg.train.channels_last,
                                                 local_world_size=env.local_world_size)
        self.train_step = build.build_step(cfg, info, env, build.build_network(cfg, info, env), self.total_steps,
                                           self.steps_per_epoch, self.total_epochs, note=lambda m: log(env, m))
        self.control = control if control is not None else distributed.control_group(env)
        self.state = TrainState(self.steps_per_epoch, env.device)
        self.nonfinite = monitor.NonFinitePolicy(cfg.train.nonfinite, cfg.train.max_skipped_steps,
                                                 self.train_step.settings, env, self.state, lambda m: log(env, m))
        self.checkpointer = Checkpointer(self.out, cfg.ckpt.keep, env, self.control)
        self.bad = monitor.BadSamples(cfg.data.max_bad_images, env, self.control)
        self.validator = Validator(cfg, info, env, eval_loader, self.train_step, self.steps_per_epoch,
                                   self.total_steps)
        self.compiled_sides: set[int] = set()  # training sides torch.compile has compiled
        self.watchdog: monitor.Watchdog | None = None  # while fit() runs
        self.world_change: dict | None = None  # restored on another world size: metrics.jsonl's record of it
        self.stop_code = 0  # asked for by stop_after_epoch

    def beat(self, phase: str | None = None) -> None:
        """Tell the watchdog the run progresses (and what it does next)."""
        if self.watchdog is not None:
            self.watchdog.beat(phase)

    def _emit(self, event: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(self, *args)

    # ------------------------------------------------------------------------------------- checkpoints
    def restore(self, payload: dict, path: Path, changes: list = ()) -> None:
        """Load a checkpoint's state into this rank's modules and counters; with ``changes`` (allowed by
        ``ckpt.allow_changes``) this config's optimizer and schedule values replace the checkpoint's."""
        fresh = hyperparameters(self.train_step)
        restore_modules(self.train_step, payload)
        if changes:
            apply_hyperparameters(self.train_step, fresh)
            for key, old, new in changes:
                log(self.env, f"note: {key} changed from {old!r} to {new!r} at step {payload['step']}"
                              f"{self._length_note(payload) if key in config_mod.LENGTH_KEYS else ''} (recorded in "
                              f"{rundir.CHANGES})")
        self.state.load_state_dict(payload, path, self.env.is_main)
        saved_world = payload["manifest"]["world_size"]
        rngs = payload["rng"]
        if saved_world == self.env.world_size:
            ckpt.set_rng_state(rngs[self.env.rank])
        else:
            self.world_change = world_change(self.cfg, payload, self.env.world_size, self.state.step)
            log(self.env, monitor.world_size_line(self.world_change, self.cfg.data.batch_size))
            ckpt.set_rng_state(rngs[0])
        comm_hooks.restore_state(self.train_step.ddp, payload, self.env, lambda m: log(self.env, m))  # PowerSGD's
        log(self.env, f"resumed from {path}: step {self.state.step}/{self.total_steps} (epoch {self.state.epoch}, "
                      f"step {self.state.position} of it)")

    def _length_note(self, payload: dict) -> str:
        """What a new run length does to the schedule, from the resumed step on."""
        o, step = self.cfg.optim, int(payload["step"])
        if o.schedule in config_mod.LENGTH_FREE_SCHEDULES:
            return f": the {o.schedule} schedule does not depend on the run's length; {self.total_steps} steps now"
        saved = payload["config"]["train"]
        old_total = saved.get("max_steps") or saved["epochs"] * self.steps_per_epoch
        peak = self.train_step.scheduler.base_lrs[0]
        before = peak * lr_factor(step, o, old_total, self.steps_per_epoch)
        after = peak * lr_factor(step, o, self.total_steps, self.steps_per_epoch)
        return (f": the {o.schedule} schedule is redefined over {self.total_steps} steps (was {old_total}); the "
                f"learning rate at this step goes from {before:.4g} to {after:.4g}")

    def payload(self) -> dict:
        """The full training state (every rank must call this: it gathers RNG states and the epoch's sums)."""
        rng = [ckpt.rng_state()]
        if self.env.distributed:
            rng = [None] * self.env.world_size
            dist.all_gather_object(rng, ckpt.rng_state(), group=self.control)
        epoch_sums = distributed.all_reduce_sum(self.state.epoch_sums.values.clone())
        hook_state = comm_hooks.gather_state(self.train_step.ddp, self.env, self.control)  # PowerSGD's, every rank's
        if not self.env.is_main:
            return {}
        return training_payload(self.train_step, self.state.state_dict(epoch_sums), config_mod.to_dict(self.cfg),
                                rng, self.env.world_size, self.info.class_names, self.accum, self.cfg.train.seed,
                                comm_hook=hook_state)

    def save(self, epoch_done: int | None = None, is_best: bool = False) -> None:
        """Every rank: checkpoint the current state (the non-finite check has run at this step)."""
        self.beat("a checkpoint: rank 0 writes it, every rank waits for the outcome")
        self.checkpointer.save(self.payload(), self.state, epoch_done, is_best)

    # ------------------------------------------------------------------------------------------ loop
    def _eta(self, seconds_per_step: float) -> tuple[float, float]:
        """Seconds left in this epoch and in the run (with the evaluations still to come, once one was timed)."""
        step, spe = self.state.step, self.steps_per_epoch
        epoch_end = min((step // spe + (step % spe > 0)) * spe, self.total_steps)
        run = (self.total_steps - step) * seconds_per_step
        timed = self.validator.seconds
        if timed:
            current = max(0, math.ceil(step / spe) - 1)
            evals = sum(self.validator.should_validate(e) for e in range(current, self.total_epochs))
            run += evals * sum(timed) / len(timed)
        return (epoch_end - step) * seconds_per_step, run

    def _log_interval(self, meter: monitor.IntervalMeter, writer: rundir.MetricsWriter) -> None:
        """Read the interval's metrics (one host read), write its steps.jsonl / TensorBoard record, print a line."""
        state = self.state
        values = meter.read()
        state.epoch_forward += self.train_step.timer.take()  # the read synchronized: no wait, few events kept
        record = {"step": state.step, "epoch": (state.step - 1) // self.steps_per_epoch,
                  "images": state.step * self.cfg.data.batch_size,
                  "lr": self.train_step.scheduler.get_last_lr()[0], **values, "time": time.time()}
        writer.write_interval(record)
        eta_epoch, eta_run = self._eta(values["seconds_per_step"])
        log(self.env, monitor.progress_line(record, state.step, self.steps_per_epoch, self.total_steps,
                                            self.total_epochs, eta_epoch, eta_run))

    def _end_epoch(self, epoch: int, writer: rundir.MetricsWriter) -> bool:
        """Reduce train metrics, gather the ranks' timings, evaluate, log; True when this epoch is the best."""
        state = self.state
        self.beat("the end of the epoch (metrics and timings are gathered from every rank)")
        loss_sum, correct, count = distributed.all_reduce_sum(state.epoch_sums.values.clone()).tolist()[:3]
        sums = {"loss_sum": loss_sum, "correct": correct, "count": count}
        record = {"epoch": epoch, "step": state.step, "train_loss": sums["loss_sum"] / max(sums["count"], 1),
                  "train_acc": 100 * sums["correct"] / max(sums["count"], 1),
                  "lr": self.train_step.scheduler.get_last_lr()[0], "epoch_time_s": state.epoch_train_time,
                  "img_per_s": sums["count"] / max(state.epoch_train_time, 1e-9)}
        if self.cfg.train.nonfinite == "skip":
            record["skipped_steps"] = state.skipped_steps
        record["bad_images"] = self.bad.end_epoch()
        state.epoch_forward += self.train_step.timer.take()
        spread = monitor.rank_spread(self.env, self.control, state.epoch_data_wait, state.epoch_forward)
        if spread is not None:
            for name in ("data_wait_s", "forward_s"):
                record.update({f"rank_{name}_{k}": v for k, v in spread[f"rank_{name}"].items()})
            record["slowest_rank"] = spread["slowest_rank"]
        is_best = (self.validator.run(epoch, record, state, self.beat, self.out)
                   if self.validator.should_validate(epoch) else False)
        writer.write(record)
        eta = self._eta(state.epoch_train_time / max(state.step - epoch * self.steps_per_epoch, 1))[1]
        log(self.env, monitor.epoch_line(record, self.total_epochs, self.total_steps, eta, spread))
        warning = monitor.straggler_line(spread)
        if warning:
            log(self.env, warning)
        self._emit("on_epoch_end", record)
        return is_best

    def _train_step(self, batches, meter: monitor.IntervalMeter, profiler: monitor.ProfilerWindow) -> None:
        """Fetch one step's micro-batches, run the step, account for it (no host synchronization)."""
        profiler.before_step(self.state.step)
        self.beat("the data loader (the next batch)")
        tick = time.perf_counter()
        micro = [next(batches) for _ in range(self.accum)]
        waited = time.perf_counter() - tick
        self.beat("the training step (its DDP gradient all-reduce waits for every rank)")
        side = micro[0][0].shape[-1]
        compiling = self.train_step.compiled == "on" and side not in self.compiled_sides
        if compiling:  # torch.compile's first step at each side may take minutes without a collective to wait in
            self.watchdog.pause()
        stats = self.train_step(micro, self.state.step)
        if compiling:
            self.watchdog.pause(False)
            self.compiled_sides.add(side)
        skipped = self.train_step.skipped
        self.state.account(stats, waited, skipped)
        meter.add(stats, waited, skipped)
        self.nonfinite.after_step(stats, skipped)
        profiler.after_step(self.state.step)
        self._emit("on_step_end")

    def fit(self) -> int:
        """Train until the schedule ends, ``run_steps`` is reached, a stop signal arrives, or training diverges."""
        stop = distributed.StopFlag(announce=self.env.is_main)
        writer = rundir.MetricsWriter(self.out, self.env.is_main, self.state.step, self.steps_per_epoch)
        if self.world_change is not None:
            writer.write(self.world_change)
        self.watchdog = monitor.Watchdog(self.cfg.dist.timeout_s, self.env.rank, self.state.where)
        try:
            try:
                code = self._fit(stop, writer)
            except (NonFiniteStop, monitor.BadDataStop) as exc:  # every rank raised it at the same step
                if self.env.is_main:
                    print(f"error: {exc}", file=sys.stderr, flush=True)
                code = exitcodes.NONFINITE if isinstance(exc, NonFiniteStop) else exitcodes.BAD_DATA
            stop.drain()  # the last agreement round, started on every rank, completes before the group is reused
            return code
        finally:
            self.watchdog.close()
            stop.restore()
            writer.close()

    def _fit(self, stop: distributed.StopFlag, writer: rundir.MetricsWriter) -> int:
        """The training loop: a step, its accounting, the periodic actions; returns the exit code."""
        cfg, state = self.cfg, self.state
        run_start, start_step = time.time(), state.step
        budget_end = state.step + cfg.train.run_steps if cfg.train.run_steps else self.total_steps
        meter = monitor.IntervalMeter(self.env.device, cfg.data.batch_size)
        clock = monitor.TrainClock(meter)
        profiler = monitor.ProfilerWindow(monitor.parse_window(cfg.train.profile_steps), self.out, self.env,
                                          cfg.train.profile_ranks == "all")
        self._emit("on_fit_start")
        batches, code = None, None
        while code is None and state.step < self.total_steps:
            if batches is None:
                with clock.outside():
                    batches = self._start_epoch()
            self._train_step(batches, meter, profiler)
            epoch_done = state.position == 0 or state.step == self.total_steps
            if state.step % cfg.train.log_every == 0 or epoch_done:
                self.beat("the non-finite and unreadable-sample checks (they gather every rank's)")
                self.nonfinite.check()
                self._check_data()
            if state.step % cfg.train.log_every == 0:
                self._log_interval(meter, writer)
            self.beat("the stop-signal agreement (a gloo all-reduce with every rank)")
            stopping = stop.agreed(self.env, self.control)
            out_of_budget = state.step >= budget_end and state.step < self.total_steps
            periodic = bool(cfg.ckpt.every_steps) and state.step % cfg.ckpt.every_steps == 0
            state.epoch_train_time += clock.lap()
            if epoch_done:
                batches = None  # the epoch's loader iterator (and its workers' batches) ends here
                with clock.outside():
                    self._finish_epoch(writer)
                if self.callbacks:  # only a callback asks (every rank has the same ones): else no collective
                    code = agreed_stop(self.stop_code, self.env, self.control, state.step, self.steps_per_epoch)
            elif stopping or out_of_budget or periodic:
                with clock.outside():
                    self.nonfinite.check()
                    self.save()
            if (stopping or out_of_budget) and code is None:
                code = self._stopped_here(stopping)
        return code if code is not None else self._done(run_start, start_step)

    def _check_data(self) -> None:
        """Unreadable samples so far this epoch, agreed; past the limit a checkpoint of this (good) step is written
        and BadDataStop raised on every rank."""
        self.bad.collect(self.train_loader, self.validator.loader)
        try:
            self.bad.check(self.state.step)
        except monitor.BadDataStop as exc:
            self.save()
            raise monitor.BadDataStop(f"{exc}; last.pt of step {self.state.step} was written") from None

    def _start_epoch(self):
        """The epoch's loader iterator, positioned at the resumed step; the epoch's accumulators zeroed."""
        self.state.begin_epoch()
        self.train_loader.set_epoch(self.state.epoch, start_batch=self.state.position * self.accum)
        self.train_step.bare.train()
        return iter(self.train_loader)

    def _finish_epoch(self, writer: rundir.MetricsWriter) -> None:
        """End-of-epoch metrics and evaluation, then the checkpoint (an epoch file for a whole epoch)."""
        epoch = (self.state.step - 1) // self.steps_per_epoch
        is_best = self._end_epoch(epoch, writer)
        self.save(epoch_done=epoch if self.state.position == 0 else None, is_best=is_best)

    def stop_after_epoch(self, code: int) -> None:
        """Stop once this epoch's checkpoint is written and exit with ``code`` (from ``Callback.on_epoch_end``, on any
        rank: the ranks agree on the largest code asked for)."""
        self.stop_code = max(self.stop_code, code)

    def _stopped_here(self, stopping: bool) -> int:
        if stopping:
            log(self.env, f"stop signal: checkpoint written at step {self.state.step}; exiting with "
                          f"{exitcodes.STOPPED} so the job can be resumed")
            return exitcodes.STOPPED
        log(self.env, f"train.run_steps={self.cfg.train.run_steps} reached at step {self.state.step}; checkpoint "
                      f"written")
        return exitcodes.OK

    def _done(self, run_start: float, start_step: int) -> int:
        best = self.state.best
        trained = self.state.step - start_step
        log(self.env, f"done: {self.total_steps} steps, best test_acc {best.value:.2f}% at epoch "
                      f"{(best.epoch or 0) + 1} ({trained} steps in {format_duration(time.time() - run_start)})"
            if best.value is not None else f"done: {self.total_steps} steps")
        return exitcodes.OK


def agreed_stop(code: int, env: distributed.DistEnv, control, step: int, steps_per_epoch: int) -> int | None:
    """After an epoch's checkpoint: the largest ``stop_after_epoch`` code of any rank (one all-reduce over the
    control group), or None to go on."""
    agreed = torch.tensor([code])
    if env.distributed:
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=control)
    if not agreed.item():
        return None
    log(env, f"stopping after epoch {math.ceil(step / steps_per_epoch)} as a callback asked: its checkpoint is "
             f"written; exiting with {agreed.item()}")
    return int(agreed.item())


def world_change(cfg: Config, payload: dict, world_size: int, step: int) -> dict:
    """The metrics.jsonl record of a resume at ``step`` on another number of processes than the checkpoint's: both
    world sizes and, for each, the images per rank per micro-step and the accumulation steps (data.max_rank_batch
    may make them differ; the global batch does not)."""
    saved = int(payload["manifest"]["world_size"])
    saved_cfg = payload.get("config") if isinstance(payload.get("config"), dict) else {}
    bound = (saved_cfg.get("data") or {}).get("max_rank_batch", cfg.data.max_rank_batch)
    before = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_rank_batch=int(bound or 0)))
    try:
        old = build.accumulation(before, saved)
    except ConfigError:  # a checkpoint of an older version, or edited: its own optim.accum_steps
        old = cfg.optim.accum_steps
    return {"event": "world_size", "from": saved, "to": world_size, "step": step,
            "accum": build.accumulation(cfg, world_size), "micro_batch": build.micro_batch(cfg, world_size),
            "from_accum": old, "from_micro_batch": cfg.data.batch_size // (saved * old), "time": time.time()}


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
            check_resumable(plan, info)
    if env.is_main:  # every check has passed: now the run directory is written
        if cfg.ckpt.resume == "none" and cfg.ckpt.overwrite and rundir.holds_run(cfg.output_dir):
            moved = rundir.move_aside(cfg.output_dir)
            log(env, f"ckpt.overwrite=true: the previous run's files were moved to {moved}")
        rundir.write_config(cfg)
        if plan.changes:
            rundir.record_changes(cfg.output_dir, int(plan.payload["step"]), plan.changes)
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
        trainer.restore(plan.payload, plan.resume_path, plan.changes)
        plan.payload = None
    return trainer.fit()
