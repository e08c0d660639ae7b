"""`python -m ddp_resnet.train --config configs/X.yaml [key=value ...]`: the distributed training job.

Works the same under torchrun, under srun (SLURM tasks), and as a plain single process (world size 1, no
process group). parse -> config -> validate -> resume plan -> init -> run -> cleanup.

Exit codes: 0 finished (or `train.run_steps` reached, after a checkpoint); 1 a rank failed; 2 bad configuration
(nothing written); 75 (EXIT_STOPPED) a SIGTERM/SIGUSR2 arrived, the ranks agreed at the next step boundary,
a checkpoint was written, and a later run resumes exactly from it.
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import os
import random
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_resnet import checkpoint as ckpt
from ddp_resnet import config as config_mod
from ddp_resnet import data as data_mod
from ddp_resnet import distributed
from ddp_resnet.config import Config, ConfigError
from ddp_resnet.engine import Stepper, StepSettings, evaluate
from ddp_resnet.models import build_model, is_cifar_only
from ddp_resnet.optim import ModelEma, build_optimizer, build_scheduler
from ddp_resnet.syncbn import convert_sync_batchnorm

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_STOPPED = 0, 1, 2, 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
# Test hook: "RANK:STEP" makes that rank raise at that global step (proves a failing rank ends the job).
_FAIL_ENV = "DDP_RESNET_TEST_FAIL_AT"
# Test hook: seconds to sleep after every step, so tests can signal or kill a run reliably mid-training.
_STEP_DELAY_ENV = "DDP_RESNET_TEST_STEP_DELAY_S"


# --------------------------------------------------------------------------------------------- the CLI
def build_parser() -> argparse.ArgumentParser:
    """The argument parser shared by train, the SLURM launcher and the benchmark."""
    parser = argparse.ArgumentParser(prog="python -m ddp_resnet.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML recipe (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.2 train.epochs=5")
    return parser


def log(env, message: str) -> None:
    """Print on rank 0 only."""
    if env is None or env.is_main:
        print(message, flush=True)


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


# ---------------------------------------------------------------------------------------- resume planning
@dataclass
class Plan:
    """Everything decided before the process group starts."""

    cfg: Config
    info: object
    launch: distributed.LaunchInfo
    resume_path: Path | None = None
    payload: dict | None = None
    warnings: list = field(default_factory=list)


_LOCKS: list = []  # open lock files, held until main() returns (or the process ends)


def release_output_dirs() -> None:
    """Close the lock files this process holds (releasing their locks)."""
    while _LOCKS:
        _LOCKS.pop().close()


def lock_output_dir(out: Path) -> None:
    """Refuse to share an output directory with another running job (an advisory lock, released on exit)."""
    import fcntl
    import socket

    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(f"output_dir {out} is in use by a running job ({owner}); choose another output_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    _LOCKS.append(handle)


def _run_exists(out: Path) -> bool:
    return bool(ckpt.candidates(out / "checkpoints")) or (out / "metrics.jsonl").is_file()


def plan_run(cfg: Config, launch: distributed.LaunchInfo) -> Plan:
    """Validate everything that can fail before any process group or GPU work; read the checkpoint."""
    config_mod.validate_world(cfg, launch.world_size)
    info = data_mod.describe(cfg.data)
    if info.train_size < cfg.data.batch_size:
        raise ConfigError(f"data.batch_size: global batch {cfg.data.batch_size} is larger than the training set "
                          f"({info.train_size} images)")
    plan = Plan(cfg, info, launch)
    out = Path(cfg.output_dir)
    device = distributed.resolve_device(cfg.train.device, launch.local_rank)
    resume = cfg.ckpt.resume
    if resume == "none":
        if _run_exists(out) and not cfg.ckpt.overwrite:
            raise ConfigError(f"output_dir {out} already holds a run; use ckpt.resume=auto to continue it or "
                              f"ckpt.overwrite=true to start over")
        return plan
    if resume == "auto":
        found = ckpt.load_latest_valid(out / "checkpoints", device, warn=plan.warnings.append)
        if found is None:
            return plan
        plan.resume_path, plan.payload = found
    else:
        try:
            plan.payload = ckpt.load(resume, device)
        except ckpt.CheckpointError as exc:
            raise ConfigError(f"ckpt.resume: {exc}") from None
        plan.resume_path = Path(resume)
    ckpt.check_compatible(plan.payload, cfg.model.name, info.num_classes, plan.resume_path)
    return plan


def claim_output_dir(plan: Plan) -> None:
    """Rank 0 locks the output directory once the configuration is known to be good."""
    if plan.launch.rank == 0:
        lock_output_dir(Path(plan.cfg.output_dir))


# -------------------------------------------------------------------------------------------- the run
def seed_everything(seed: int, rank: int) -> None:
    """Same weights on every rank (torch seed), distinct python/numpy streams per rank."""
    torch.manual_seed(seed)
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)


def resolve_stem(cfg: Config, info) -> str | None:
    """model.stem=auto: the CIFAR stem for small images, the ImageNet stem otherwise."""
    if cfg.model.stem != "auto":
        return cfg.model.stem
    if is_cifar_only(cfg.model.name):
        return None
    return "cifar" if info.image_size <= 64 else "imagenet"


def build_network(cfg: Config, info, env) -> torch.nn.Module:
    """The bare model on its device: built, optionally fine-tune-prepared, SyncBN-converted, channels_last."""
    model = build_model(cfg.model.name, num_classes=info.num_classes, stem=resolve_stem(cfg, info),
                        zero_init_residual=cfg.model.zero_init_residual)
    if cfg.finetune.checkpoint or cfg.finetune.freeze != "none":
        from ddp_resnet.finetune import prepare

        prepare(model, cfg.finetune, info.num_classes)
    if cfg.train.sync_bn and env.distributed:
        model = convert_sync_batchnorm(model, env.device)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    return model.to(env.device, memory_format=memory_format)


@dataclass
class StepParts:
    """A training step as the trainer wires it, plus how torch.compile went (off | on | fallback)."""

    bare: nn.Module
    model: nn.Module
    ddp: DDP | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    ema: ModelEma | None
    stepper: Stepper
    compiled: str = "off"
    notes: list = field(default_factory=list)


def _wrap(bare: nn.Module, cfg: Config, env) -> tuple[nn.Module, DDP | None]:
    """DDP around the bare model when there is a process group (exactly as the Trainer does)."""
    if not env.distributed:
        return bare, None
    d = cfg.dist
    # torch >= 2.13 renamed broadcast_buffers (now deprecated, with a warning) to forward_sync_buffers
    renamed = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    options = {"forward_sync_buffers" if renamed else "broadcast_buffers": d.forward_sync_buffers}
    if d.bucket_cap_mb > 0:  # passing any size, even DDP's default 25, also drops DDP's small first bucket
        options["bucket_cap_mb"] = d.bucket_cap_mb
    ddp = DDP(bare, device_ids=[env.device.index] if env.device.type == "cuda" else None,
              static_graph=d.static_graph, gradient_as_bucket_view=d.gradient_as_bucket_view, **options)
    return ddp, ddp


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def build_step(cfg: Config, info, env, bare: nn.Module, total_steps: int, steps_per_epoch: int,
               note: Callable[[str], None] = print) -> StepParts:
    """Optimizer, scheduler, scaler, EMA, DDP, torch.compile and Stepper around ``bare``, as in ``Trainer``."""
    optimizer = build_optimizer(bare, cfg, env.device)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps, steps_per_epoch)
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.train.amp == "fp16")
    ema = ModelEma(bare, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    model, ddp = _wrap(bare, cfg, env)
    compiled = "off"
    if cfg.train.compile:
        try:
            model = torch.compile(model)
            compiled = "on"
        except Exception as exc:  # noqa: BLE001 - any compile failure means: run eagerly
            note(f"note: torch.compile failed ({_first_line(exc)}); falling back to eager")
            compiled = "fallback"
    settings = StepSettings(device=env.device, amp=cfg.train.amp, label_smoothing=cfg.train.label_smoothing,
                            clip_grad_norm=cfg.optim.clip_grad_norm, num_classes=info.num_classes,
                            mixup_alpha=cfg.data.mixup_alpha, cutmix_alpha=cfg.data.cutmix_alpha,
                            seed=cfg.train.seed, rank=env.rank)
    stepper = Stepper(model, optimizer, scheduler, scaler, settings, ema=ema, bare_model=bare, ddp=ddp)
    return StepParts(bare, model, ddp, optimizer, scheduler, scaler, ema, stepper, compiled)


def fall_back_to_eager(parts: StepParts, cfg: Config, env, exc: BaseException,
                       note: Callable[[str], None] = print) -> None:
    """After a compiled first step failed: drop the compiled graphs (and a DDP wrapper that saw a half step)."""
    note(f"note: torch.compile failed in the first step ({_first_line(exc)}); falling back to eager")
    import torch._dynamo

    parts.stepper.model = parts.stepper.ddp = parts.model = parts.ddp = None
    torch._dynamo.reset()
    gc.collect()  # a discarded DDP's reducer removes its gradient hooks when it is freed
    parts.model, parts.ddp = _wrap(parts.bare, cfg, env)
    parts.stepper.model, parts.stepper.ddp = parts.model, parts.ddp
    parts.compiled = "fallback"


class MetricsWriter:
    """metrics.jsonl and TensorBoard on rank 0."""

    def __init__(self, out: Path, env, keep_epochs_below: int):
        self.enabled = env.is_main
        self.path = out / "metrics.jsonl"
        self.tb = None
        if not self.enabled:
            return
        kept = []
        if self.path.is_file():  # a resumed run drops lines of epochs it will train again
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("epoch", 0) < keep_epochs_below]
        self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))
        except ImportError:
            self.tb = None

    def write(self, record: dict) -> None:
        """Append one epoch's record and mirror the numbers to TensorBoard."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["epoch"])
            self.tb.flush()

    def close(self) -> None:
        """Flush TensorBoard files."""
        if self.tb is not None:
            self.tb.close()


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


class Trainer:
    """Holds the run's modules and counters; `fit()` trains to the end or to a stop."""

    def __init__(self, plan: Plan, env: distributed.DistEnv):
        self.cfg, self.info, self.env = plan.cfg, plan.info, env
        cfg = self.cfg
        self.out = Path(cfg.output_dir)
        seed_everything(cfg.train.seed, env.rank)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark and not cfg.train.deterministic
        self.accum = cfg.optim.accum_steps
        micro = cfg.data.batch_size // (env.world_size * self.accum)
        self.train_loader = data_mod.build_train_loader(cfg.data, self.info, env.rank, env.world_size, env.device,
                                                        cfg.train.seed, micro_batch=micro,
                                                        channels_last=cfg.train.channels_last)
        self.eval_loader = data_mod.build_eval_loader(cfg.data, self.info, env.rank, env.world_size, env.device,
                                                      channels_last=cfg.train.channels_last)
        self.steps_per_epoch = len(self.train_loader) // self.accum
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        self.total_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.bare = build_network(cfg, self.info, env)
        self.parts = build_step(cfg, self.info, env, self.bare, self.total_steps, self.steps_per_epoch,
                                note=lambda message: log(env, message))
        self._adopt(self.parts)
        # gloo control group for stop flags and RNG gathering (CPU tensors, no GPU sync per step)
        self.control = None
        if env.distributed:
            self.control = dist.new_group(backend="gloo") if env.backend != "gloo" else dist.group.WORLD
        self.ckpt_policy = ckpt.CheckpointPolicy(self.out / "checkpoints", cfg.ckpt.keep)
        self.step = 0
        self.epoch_acc = torch.zeros(3, device=env.device)
        self.epoch_train_time = 0.0
        self.best = {"metric": "test_acc", "value": None, "epoch": None, "history": []}
        self.fail_at = self._fail_hook()
        self.step_delay = float(os.environ.get(_STEP_DELAY_ENV, "0") or 0)

    def _adopt(self, parts: StepParts) -> None:
        """Take the step's modules (again after a compile fallback)."""
        self.optimizer, self.scheduler, self.scaler = parts.optimizer, parts.scheduler, parts.scaler
        self.ema = parts.ema
        self.model, self.ddp, self.stepper = parts.model, parts.ddp, parts.stepper

    def _first_step(self, micro: list) -> torch.Tensor:
        """The process's first step; a torch.compile failure there falls back to eager and retries."""
        try:
            return self.stepper.step(micro, self.step)
        except Exception as exc:
            if self.parts.compiled != "on":
                raise
            fall_back_to_eager(self.parts, self.cfg, self.env, exc, note=lambda message: log(self.env, message))
            self._adopt(self.parts)
            return self.stepper.step(micro, self.step)

    def _fail_hook(self):
        spec = os.environ.get(_FAIL_ENV, "")
        if not spec:
            return None
        rank, step = (int(v) for v in spec.split(":"))
        return step if rank == self.env.rank else None

    # ------------------------------------------------------------------------------------- checkpoints
    def restore(self, payload: dict, path: Path) -> None:
        """Load a checkpoint's state into this rank's modules and counters."""
        self.bare.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
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
        self.best = payload["best"]
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
        return {
            "model": self.bare.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "epoch_position": self.step % self.steps_per_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "epoch_acc": epoch_acc.cpu(),
            "epoch_train_time": self.epoch_train_time,
            "best": self.best,
            "config": config_mod.to_dict(self.cfg),
            "rng": rng,
            "data_state": {"seed": self.cfg.train.seed, "epoch": self.step // self.steps_per_epoch,
                           "start_batch": (self.step % self.steps_per_epoch) * self.accum},
            "manifest": ckpt.manifest(self.env.world_size),
        }

    def save(self, epoch_done: int | None = None, is_best: bool = False) -> None:
        """Rank 0 writes last.pt (and epoch/best files); every rank waits until the files are complete."""
        payload = self.payload()
        if self.env.is_main:
            self.ckpt_policy.save_last(payload)
            if epoch_done is not None:
                self.ckpt_policy.save_epoch(payload, epoch_done)
            if is_best:
                self.ckpt_policy.save_best(payload)
        distributed.barrier(self.env)

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

    def _end_epoch(self, epoch: int, writer: MetricsWriter, run_start: float) -> bool:
        """Reduce train metrics, evaluate, log; returns True when this epoch is the best so far."""
        acc = distributed.all_reduce_sum(self.epoch_acc.clone())
        loss_sum, correct, count = acc.tolist()
        record = {"epoch": epoch, "step": self.step, "train_loss": loss_sum / max(count, 1),
                  "train_acc": 100 * correct / max(count, 1), "lr": self.scheduler.get_last_lr()[0],
                  "epoch_time_s": self.epoch_train_time, "img_per_s": count / max(self.epoch_train_time, 1e-9)}
        last_epoch = self.step >= self.total_steps
        is_best = False
        if (epoch + 1) % self.cfg.train.eval_every == 0 or last_epoch:
            self._sync_buffers()
            result = evaluate(self.bare, self.eval_loader, self.info.num_classes, self.env.device, self.cfg.train.amp)
            record.update(test_loss=result["loss"], test_acc=result["top1"], test_top5=result["top5"],
                          test_count=result["count"])
            if self.ema is not None:
                ema_result = evaluate(self.ema.module, self.eval_loader, self.info.num_classes, self.env.device,
                                      self.cfg.train.amp)
                record.update(test_acc_ema=ema_result["top1"], test_loss_ema=ema_result["loss"])
            self.best["history"].append([epoch, result["top1"]])
            if self.best["value"] is None or result["top1"] > self.best["value"]:
                self.best.update(value=result["top1"], epoch=epoch)
                is_best = True
                if self.env.is_main:
                    (self.out / "best_eval.json").write_text(json.dumps({
                        "epoch": epoch, "test_acc": result["top1"], "test_top5": result["top5"],
                        "test_loss": result["loss"], "count": result["count"], "class_names": self.info.class_names,
                        "per_class_acc": result["per_class_acc"], "confusion": result["confusion"]}))
        writer.write(record)
        elapsed = time.time() - run_start
        done_frac = self.step / self.total_steps
        eta = elapsed / max(done_frac, 1e-9) * (1 - done_frac) if self.step else 0
        test = (f" test_loss {record['test_loss']:.4f} test_acc {record['test_acc']:.2f}%"
                if "test_acc" in record else "")
        log(self.env, f"epoch {epoch + 1}/{self.total_epochs} step {self.step}/{self.total_steps} "
                      f"train_loss {record['train_loss']:.4f} train_acc {record['train_acc']:.2f}%{test} "
                      f"lr {record['lr']:.4g} {record['img_per_s']:.0f} img/s epoch {record['epoch_time_s']:.1f}s "
                      f"ETA {_fmt_time(eta)}")
        return is_best

    def fit(self) -> int:
        """Train until the schedule ends, `run_steps` is reached, or a stop signal arrives."""
        stop = StopFlag()
        writer = MetricsWriter(self.out, self.env, keep_epochs_below=self.step // self.steps_per_epoch)
        try:
            code = self._fit(stop, writer)
            stop.drain()
            return code
        finally:
            stop.restore()
            writer.close()

    def _fit(self, stop: StopFlag, writer: MetricsWriter) -> int:
        """The training loop; returns the exit code."""
        env, cfg = self.env, self.cfg
        run_start = time.time()
        start_step = self.step
        budget_end = self.step + cfg.train.run_steps if cfg.train.run_steps else self.total_steps
        first_step = True
        while self.step < self.total_steps:
            epoch, pos = divmod(self.step, self.steps_per_epoch)
            epoch_end = min((epoch + 1) * self.steps_per_epoch, self.total_steps)
            if pos == 0:
                self.epoch_acc.zero_()
                self.epoch_train_time = 0.0
            self.train_loader.set_epoch(epoch, start_batch=pos * self.accum)
            batches = iter(self.train_loader)
            self.bare.train()
            tick = time.time()
            stopping = False
            while self.step < epoch_end:
                micro = [next(batches) for _ in range(self.accum)]
                if self.fail_at is not None and self.step == self.fail_at:
                    raise RuntimeError(f"injected failure on rank {env.rank} at step {self.step}")
                first = first_step
                first_step = False
                self.epoch_acc += self._first_step(micro) if first else self.stepper.step(micro, self.step)
                self.step += 1
                if self.step_delay:
                    time.sleep(self.step_delay)
                if self.step % cfg.train.log_every == 0:
                    log(env, f"  step {self.step}/{self.total_steps} lr {self.scheduler.get_last_lr()[0]:.4g}")
                stopping = stop.agreed(env, self.control)
                if self.step == epoch_end:
                    break
                if stopping or self.step >= budget_end or (
                        cfg.ckpt.every_steps and self.step % cfg.ckpt.every_steps == 0):
                    self.epoch_train_time += time.time() - tick
                    tick = time.time()
                    self.save()
                    if stopping:
                        log(env, f"stop signal: checkpoint written at step {self.step}; exiting with "
                                 f"{EXIT_STOPPED} so the job can be resumed")
                        return EXIT_STOPPED
                    if self.step >= budget_end:
                        log(env, f"train.run_steps={cfg.train.run_steps} reached at step {self.step}; "
                                 f"checkpoint written")
                        return EXIT_OK
            del batches
            self.epoch_train_time += time.time() - tick
            is_best = self._end_epoch(epoch, writer, run_start)
            self.save(epoch_done=epoch if self.step % self.steps_per_epoch == 0 else None, is_best=is_best)
            if stopping:
                log(env, f"stop signal: checkpoint written at step {self.step}; exiting with {EXIT_STOPPED}")
                return EXIT_STOPPED
            if self.step >= budget_end and self.step < self.total_steps:
                log(env, f"train.run_steps={cfg.train.run_steps} reached at step {self.step}; checkpoint written")
                return EXIT_OK
        trained = self.step - start_step
        log(env, f"done: {self.total_steps} steps, best test_acc {self.best['value']:.2f}% at epoch "
                 f"{(self.best['epoch'] or 0) + 1} ({trained} steps in {_fmt_time(time.time() - run_start)})"
            if self.best["value"] is not None else f"done: {self.total_steps} steps")
        return EXIT_OK


def run(plan: Plan, env: distributed.DistEnv) -> int:
    """Build the trainer for this rank, restore a checkpoint if planned, and train."""
    cfg = plan.cfg
    out = Path(cfg.output_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        config_mod.save_yaml(cfg, out / "config.yaml")
    for warning in plan.warnings:
        log(env, warning)
    trainer = Trainer(plan, env)
    data = cfg.data.dataset
    if data == "imagefolder":
        from ddp_resnet.data.device_decode import default_backend

        data += f" (JPEG decoding on {env.device}, {default_backend()})" if cfg.data.decode == "device" else ""
    log(env, f"ddp_resnet: {cfg.model.name} on {data} | world {env.world_size} ({env.launcher}, "
             f"{env.backend or 'no process group'}, {env.device}) | global batch {cfg.data.batch_size} | "
             f"{trainer.steps_per_epoch} steps/epoch, {trainer.total_steps} steps | output {out}")
    if plan.payload is not None:
        trainer.restore(plan.payload, plan.resume_path)
        plan.payload = None
    return trainer.fit()


def main(argv: list[str] | None = None) -> int:
    """Parse, validate, initialise, train; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        cfg = config_mod.load(args.config, args.overrides)
        plan = plan_run(cfg, distributed.read_env())
        claim_output_dir(plan)
    except (ConfigError, ckpt.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    try:
        return _run_claimed(plan, env=distributed.init(cfg.train.device, cfg.dist.backend, cfg.dist.timeout_s,
                                                       plan.launch))
    finally:
        release_output_dirs()


def _run_claimed(plan: Plan, env) -> int:
    try:
        code = run(plan, env)
    except (ConfigError, ckpt.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        code = EXIT_CONFIG
    except BaseException:
        print(f"[rank {env.rank}] training failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        if env.distributed:
            # Leave at once: the closed sockets make the other ranks' collectives fail instead of waiting.
            sys.stdout.flush()
            os._exit(EXIT_FAILED)
        return EXIT_FAILED
    if env.distributed:
        distributed.cleanup()
    return code


def cli() -> None:
    """Console entry point."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
