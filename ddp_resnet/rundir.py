"""The output directory of a run: its lock, its files, their writers (rank 0) and the one reader of each.

    <output_dir>/.lock             held (flock) by the running job's rank 0
                 config.yaml       the resolved config
                 metrics.jsonl     one record per epoch (and one per change of world size: "event")
                 steps.jsonl       one record per logging interval (train.log_every steps)
                 best_eval.json    per-class accuracy and confusion matrix of the best epoch
                 tb/               TensorBoard events
                 profile/          torch.profiler traces (train.profile_steps)
                 checkpoints/      last.pt, epoch_XXXX.pt, best.pt (written by ``checkpoint``)
                 changes.jsonl     keys changed on resume (ckpt.allow_changes): step, key, old and new value
                 replaced-<time>/  an older run's files, moved aside by ckpt.overwrite=true

Report, experiments and the SLURM job side read these through the functions here, never by hand.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import socket
from pathlib import Path

import yaml

from ddp_resnet import checkpoint as ckpt
from ddp_resnet.config import Config, ConfigError, save_yaml

METRICS, STEPS, BEST_EVAL, CONFIG = "metrics.jsonl", "steps.jsonl", "best_eval.json", "config.yaml"
CHECKPOINTS, TENSORBOARD, PROFILE, CHANGES = "checkpoints", "tb", "profile", "changes.jsonl"
RUN_FILES = (CONFIG, METRICS, STEPS, BEST_EVAL, CHANGES, CHECKPOINTS, TENSORBOARD, PROFILE)  # what a run writes
EXCLUSIVE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)  # never through a planted link


class RunDirError(RuntimeError):
    """A run directory that cannot be read, described in one line."""


class RunLock:
    """An advisory lock on ``<output_dir>/.lock`` so two running jobs cannot share a directory (a context
    manager; the lock also ends with the process)."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.handle = None

    def __enter__(self) -> RunLock:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / ".lock"
        try:  # an existing lock file is reused (a crashed job's); a symbolic link planted there is refused
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            raise ConfigError(f"output_dir {self.out}: cannot open its lock file {path}: "
                              f"{exc.strerror or exc}") from None
        handle = os.fdopen(fd, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(f"output_dir {self.out} is in use by a running job ({owner}); choose another "
                              f"output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.close()  # closing the file releases the lock
            self.handle = None


def is_locked(out: str | Path) -> bool:
    """True while a process holds ``RunLock`` on ``out`` (probed without taking it for longer than a moment)."""
    path = Path(out) / ".lock"
    if not path.is_file():
        return False
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, flush it to disk, rename it into place: a reader sees
    the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def check_writable(out: str | Path) -> None:
    """Create the output directory and prove it writable, or raise ConfigError naming the problem: a file where a
    directory should be, a parent that cannot be created, a read-only or full file system, no permission."""
    out = Path(out)
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"output_dir {out}: {blocker} is a file, not a directory; choose another output_dir")
    probe = out / f".write_test.{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / CHECKPOINTS).mkdir(exist_ok=True)
        fd = os.open(probe, EXCLUSIVE, 0o600)
        os.write(fd, b"ok")
        os.close(fd)
        probe.unlink()
    except OSError as exc:
        where = exc.filename or out
        raise ConfigError(f"output_dir {out} is not writable: {where}: {exc.strerror or exc}") from None


def holds_run(out: str | Path) -> bool:
    """True when the directory holds a run (a checkpoint or metrics)."""
    out = Path(out)
    return bool(ckpt.candidates(out / CHECKPOINTS)) or (out / METRICS).is_file()


def move_aside(out: str | Path) -> Path:
    """Move a run's files (config, metrics, checkpoints, TensorBoard, ...) into ``replaced-<UTC time>/`` beside
    them, so a run that starts over never mixes with nor deletes the one before; returns that folder."""
    import time

    out = Path(out)
    stamp = time.strftime("replaced-%Y%m%dT%H%M%SZ", time.gmtime())
    for n in range(100):
        aside = out / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            aside.mkdir()
            break
        except FileExistsError:
            continue
    for name in RUN_FILES:
        if (out / name).exists() or (out / name).is_symlink():
            os.replace(out / name, aside / name)
    return aside


def record_changes(out: str | Path, step: int, changes: list) -> None:
    """Append each key changed on resume (``ckpt.allow_changes``) to changes.jsonl: step, key, old, new."""
    with open(Path(out) / CHANGES, "a") as fh:
        for key, old, new in changes:
            fh.write(json.dumps({"step": step, "key": key, "old": old, "new": new}) + "\n")


def write_config(cfg: Config) -> None:
    """Write the resolved config to ``<output_dir>/config.yaml``."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, out / CONFIG)


def read_config(out: str | Path) -> dict:
    """The run's config.yaml as a dict ({} when missing)."""
    path = Path(out) / CONFIG
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def read_jsonl(path: str | Path, skip_bad: bool = False) -> list[dict]:
    """Every JSON record of a .jsonl file, oldest first ([] when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if not skip_bad:
                raise RunDirError(f"{path}: line {number} is not JSON") from None
    return records


def read_metrics(out: str | Path, required: bool = False, skip_bad: bool = False) -> list[dict]:
    """The per-epoch records (metrics.jsonl, without its ``event`` records: ``read_events``); with ``required``, a
    missing or empty file is a RunDirError; ``skip_bad`` skips lines that are not JSON (a running job's last)."""
    path = Path(out) / METRICS
    if required and not path.is_file():
        raise RunDirError(f"{out} holds no {METRICS} (is it a ddp_resnet run directory?)")
    records = [r for r in read_jsonl(path, skip_bad) if "event" not in r]
    if required and not records:
        raise RunDirError(f"{path} is empty: the run has not finished an epoch yet")
    return records


def read_events(out: str | Path) -> list[dict]:
    """metrics.jsonl's event records, oldest first: ``{"event": "world_size", "from", "to", "step", "accum",
    "micro_batch", "from_accum", "from_micro_batch", "time"}`` for each resume on another number of processes."""
    return [r for r in read_jsonl(Path(out) / METRICS) if "event" in r]


def read_best(out: str | Path, records: list[dict]) -> dict:
    """best_eval.json, or (older/partial runs) the best evaluated record without the confusion matrix."""
    path = Path(out) / BEST_EVAL
    if path.is_file():
        return json.loads(path.read_text())
    tested = [r for r in records if "test_acc" in r]
    if not tested:
        raise RunDirError(f"{out} has no evaluated epoch (no {BEST_EVAL}, no test_acc in {METRICS})")
    best = max(tested, key=lambda r: r["test_acc"])
    return {"epoch": best["epoch"], "test_acc": best["test_acc"], "test_top5": best.get("test_top5"),
            "test_loss": best.get("test_loss"), "count": best.get("test_count")}


def write_best(out: str | Path, best: dict) -> None:
    """Write best_eval.json."""
    (Path(out) / BEST_EVAL).write_text(json.dumps(best))


def format_duration(seconds: float) -> str:
    """``1h02m03s`` / ``2m03s`` / ``4.5 s``."""
    if seconds < 60:
        return f"{max(0.0, seconds):.1f} s"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def find_checkpoint(out: str | Path) -> Path | None:
    """checkpoints/best.pt, else checkpoints/last.pt, else None."""
    for name in ("best.pt", "last.pt"):
        path = Path(out) / CHECKPOINTS / name
        if path.is_file():
            return path
    return None


# TensorBoard tags of the per-epoch record's keys (grouped: train/, test/, test_ema/, time/, ranks/)
EPOCH_TAGS = {"train_loss": "train/epoch_loss", "train_acc": "train/epoch_acc1", "test_loss": "test/loss",
              "test_acc": "test/acc1", "test_top5": "test/acc5", "test_loss_ema": "test_ema/loss",
              "test_acc_ema": "test_ema/acc1", "epoch_time_s": "time/epoch_s", "img_per_s": "time/img_per_s",
              "eval_time_s": "time/eval_s", "rank_data_wait_s_max": "ranks/data_wait_s_max",
              "rank_forward_s_max": "ranks/forward_s_max"}
# ... and of the per-interval record's (against the global step; loss and accuracy also against images seen)
STEP_TAGS = {"loss": "train/loss", "acc": "train/acc1", "lr": "train/lr", "img_per_s": "train/img_per_s",
             "data_wait": "train/data_wait", "grad_norm": "train/grad_norm", "mem_gib": "train/mem_gib"}
BY_IMAGES = ("loss", "acc")


class MetricsWriter:
    """metrics.jsonl (per epoch, and an ``event`` record per change of world size), steps.jsonl (per logging
    interval) and TensorBoard, on rank 0 (a no-op elsewhere).

    A run resumed at step S keeps the records it had up to S and drops the rest (trained again now), so both files
    continue without duplicates or gaps; TensorBoard is told to drop its own events after S (``purge_step``).
    """

    def __init__(self, out: str | Path, is_main: bool, resume_step: int, steps_per_epoch: int):
        self.enabled = is_main
        self.path, self.steps_path = Path(out) / METRICS, Path(out) / STEPS
        self.tb = None
        self.failed: set = set()
        if not self.enabled:
            return
        epochs_done = resume_step // steps_per_epoch
        kept = [r for r in read_jsonl(self.path, skip_bad=True)
                if (r.get("step", 0) < resume_step if "event" in r else r.get("epoch", 0) < epochs_done)]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        kept = [r for r in read_jsonl(self.steps_path, skip_bad=True) if r.get("step", 0) <= resume_step]
        self.steps_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out) / TENSORBOARD), purge_step=resume_step + 1 if resume_step else None)
        except ImportError:
            self.tb = None

    def _tb(self, record: dict, tags: dict, step: int) -> None:
        for key, tag in tags.items():
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(tag, value, step)

    def _append(self, path: Path, record: dict) -> bool:
        """Append a record; a failed write (a full disk, say) is reported once and training goes on: the next
        checkpoint write decides whether the run can continue."""
        try:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
            return True
        except OSError as exc:
            if path not in self.failed:
                self.failed.add(path)
                print(f"warning: could not append to {path}: {exc.strerror or exc}; training goes on", flush=True)
            return False

    def write(self, record: dict) -> None:
        """Append one epoch's record (at the global step it ended on) and mirror its numbers to TensorBoard."""
        if self.enabled and self._append(self.path, record) and self.tb is not None:
            self._tb(record, EPOCH_TAGS, record["step"])
            self.tb.flush()

    def write_interval(self, record: dict) -> None:
        """Append one logging interval's record to steps.jsonl and TensorBoard."""
        if self.enabled and self._append(self.steps_path, record) and self.tb is not None:
            self._tb(record, STEP_TAGS, record["step"])
            self._tb(record, {key: f"train_by_images/{key}" for key in BY_IMAGES}, record["images"])

    def close(self) -> None:
        """Flush TensorBoard files."""
        if self.tb is not None:
            self.tb.close()
