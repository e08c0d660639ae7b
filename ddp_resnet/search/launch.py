"""Where trials run: local processes (``python -m ddp_resnet.train``, or torchrun for several per trial), or SLURM
jobs submitted through ``ddp_resnet.slurm.submit`` (a batch of trials is one job array).

A runner starts ``Launch`` es, reports the ones that ended, stops them on request, and classifies each end:
``finished`` (exit 0 / COMPLETED), ``pruned`` (exit 79), ``stopped`` (asked to stop by the search: the trial stays
RUNNING in the study and resumes from its checkpoint when the search is started again), ``again`` (it stopped
by itself or its job went away: start it again into the same directory, which resumes it), ``refused`` (a local
trainer exited 2 before training: a bad data path or environment), or ``failed``.
Arguments always travel as argv lists (never through a shell).
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddp_resnet import exitcodes, rundir

TRIAL_LOG = "train.log"  # a local trial's output, appended at every launch
UNKNOWN_POLLS = 20  # a SLURM job the controller no longer knows, this many polls (3 s) in a row, is gone


@dataclass
class Launch:
    """One start of one trial (a trial resumed later gets a new Launch into the same directory)."""

    number: int
    trial: Any  # the optuna Trial (to set user attributes)
    dir: Path
    overrides: list  # for ddp_resnet.train, output_dir and train.trial included
    started: float = 0.0
    proc: subprocess.Popen | None = None
    log: Any = None
    slot: int = 0
    job_id: str = ""  # SLURM: the job (array task) running it
    unknown: int = 0  # SLURM: polls in a row without a job state


def last_error(log: Path) -> str:
    """The last ``error:`` line of a trial's log (else its last line)."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    errors = [line for line in lines if "error:" in line]
    return (errors or lines or ["empty log"])[-1]


def gpu_slots(parallel: int, nproc: int, device: str, note) -> list[str | None]:
    """``CUDA_VISIBLE_DEVICES`` for each of the ``parallel`` local slots: disjoint GPUs when there are enough."""
    if device == "cpu":
        return [None] * parallel
    import torch

    count = torch.cuda.device_count()
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()] or [
        str(i) for i in range(count)]
    if count and count >= parallel * nproc:
        return [",".join(visible[s * nproc:(s + 1) * nproc]) for s in range(parallel)]
    if count and parallel > 1:
        note(f"note: {parallel} trials x {nproc} processes share {count} GPU(s)")
    return [None] * parallel


class LocalRunner:
    """Trials as child processes, at most ``parallel`` at once, each in its own session (a Ctrl-C reaches the
    search only, which stops the trials itself) and ended with SIGTERM by the kernel if the search dies."""

    def __init__(self, spec, note):
        self.spec, self.note = spec, note
        self.free = list(range(spec.parallel))
        self.gpus = gpu_slots(spec.parallel, spec.nproc, spec.device, note)
        self.threads = max(1, (os.cpu_count() or 1) // (spec.parallel * spec.nproc))

    def command(self, launch: Launch) -> list[str]:
        """``python -m ddp_resnet.train`` (or torchrun with ``--nproc-per-trial`` processes) with its argv."""
        argv = (["--config", self.spec.config] if self.spec.config else []) + list(launch.overrides)
        if self.spec.nproc == 1:
            return [sys.executable, "-m", "ddp_resnet.train", *argv]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.spec.nproc}",
                "-m", "ddp_resnet.train", *argv]

    def _env(self, slot: int) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.setdefault("OMP_NUM_THREADS", str(self.threads))
        if self.gpus[slot] is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot]
        return env

    def start(self, launches: list[Launch]) -> None:
        from ddp_resnet.distributed import die_with_launcher

        for launch in launches:
            waited = time.time()
            while rundir.is_locked(launch.dir):  # an earlier search's process is still writing its checkpoint
                if time.time() - waited > 30:
                    self.note(f"note: waiting for trial {launch.number}'s previous process to release {launch.dir}")
                    waited = time.time()
                time.sleep(0.5)
            launch.slot = self.free.pop(0)
            cmd = self.command(launch)
            launch.dir.mkdir(parents=True, exist_ok=True)
            launch.log = open(launch.dir / TRIAL_LOG, "a")
            launch.log.write(f"=== search: trial {launch.number} started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                             f"{shlex.join(cmd)}\n")
            launch.log.flush()
            launch.started = time.time()
            launch.proc = subprocess.Popen(cmd, stdout=launch.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env=self._env(launch.slot), start_new_session=True,
                                           preexec_fn=die_with_launcher)

    def poll(self, launches: list[Launch]) -> list[tuple[Launch, int]]:
        """The launches whose process ended, with its exit code (negative: killed by that signal)."""
        ended = []
        for launch in launches:
            code = launch.proc.poll()
            if code is not None:
                launch.log.close()
                self.free.append(launch.slot)
                ended.append((launch, code))
        return ended

    def stop(self, launches: list[Launch], now: bool = False) -> None:
        """SIGTERM (each trial checkpoints at its next step and exits 75), or SIGKILL with ``now``."""
        for launch in launches:
            if launch.proc.poll() is None:
                launch.proc.send_signal(signal.SIGKILL if now else signal.SIGTERM)

    @staticmethod
    def classify(launch: Launch, code: int, stopping: bool) -> tuple[str, str]:
        if code == exitcodes.OK:
            return "finished", ""
        if code == exitcodes.PRUNED:
            return "pruned", ""
        if stopping:
            return "stopped", ""
        if code == exitcodes.STOPPED:  # stopped by someone else's signal, with a checkpoint: go on
            return "again", "stopped by a signal"
        if code == exitcodes.USAGE:  # the trainer refused to start: bad data or environment, usually every trial's
            return "refused", f"{last_error(launch.dir / TRIAL_LOG)} (see {launch.dir / TRIAL_LOG})"
        what = f"killed by signal {-code}" if code < 0 else f"exit {code}: {exitcodes.DESCRIPTIONS.get(code, '?')}"
        return "failed", f"{what} (see {launch.dir / TRIAL_LOG})"


class SlurmRunner:
    """Trials as SLURM jobs through ``ddp_resnet.slurm.submit``: the trials started together form one job array;
    inside a job, requeue and exact resume work as for any submitted run. A job still queued or running when the
    search is started again is re-attached, not submitted twice."""

    def __init__(self, spec, note):
        self.spec, self.note = spec, note
        self.cancelled: set[str] = set()

    def argv(self, launch: Launch) -> list[str]:
        """The ``python -m ddp_resnet.slurm`` arguments of one trial."""
        return slurm_argv(self.spec, launch.overrides)

    def start(self, launches: list[Launch]) -> None:
        from ddp_resnet.slurm import submit

        batch = []
        for launch in launches:
            state = submit.job_state(self._sub(launch), "slurm").split()[0] if launch.job_id else ""
            if state and state != "UNKNOWN" and (state not in submit.TERMINAL_STATES or state == "COMPLETED"):
                launch.started = time.time()
                self.note(f"trial {launch.number}: re-attached to its SLURM job {launch.job_id} ({state})")
                continue  # still queued or running (or done: the next poll reads it)
            batch.append(launch)
        if not batch:
            return
        plans = [submit.make_plan(submit.parse_args(self.argv(launch))) for launch in batch]
        points = tuple(dataclasses.replace(p.points[0], index=i) for i, p in enumerate(plans))
        plan = dataclasses.replace(plans[0], points=points, output_dir=str(self.spec.out))
        for launch, sub in zip(batch, submit.submit(plan)):
            launch.job_id, launch.started, launch.unknown = sub.job_id, time.time(), 0
            launch.trial.set_user_attr("slurm_job", sub.job_id)
        ids = ", ".join(f"{launch.number}: {launch.job_id}" for launch in batch)
        self.note(f"submitted {len(batch)} trial(s) as {'one job array' if len(batch) > 1 else 'a job'} (trial: "
                  f"job {ids}); logs in {plan.log_dir}")

    @staticmethod
    def _sub(launch: Launch):
        from ddp_resnet.slurm.submit import Submitted

        return Submitted(None, launch.job_id, "", "")

    def poll(self, launches: list[Launch]) -> list[tuple[Launch, str]]:
        from ddp_resnet.slurm import submit

        ended = []
        for launch in launches:
            state = (submit.job_state(self._sub(launch), "slurm").split() or ["UNKNOWN"])[0]
            launch.unknown = launch.unknown + 1 if state == "UNKNOWN" else 0
            if state in submit.TERMINAL_STATES or launch.unknown >= UNKNOWN_POLLS:
                ended.append((launch, state))
        return ended

    def stop(self, launches: list[Launch], now: bool = False) -> None:
        """``scancel`` the trials' jobs: SLURM sends SIGTERM (the trainer checkpoints), then SIGKILL."""
        for launch in launches:
            if launch.job_id and launch.job_id not in self.cancelled:
                launch.trial.set_user_attr("cancelled_job", launch.job_id)
                self.cancelled.add(launch.job_id)
                subprocess.run(["scancel", launch.job_id], check=False, capture_output=True, timeout=60)

    def classify(self, launch: Launch, state: str, stopping: bool) -> tuple[str, str]:
        if state == "COMPLETED":
            return "finished", ""
        if launch.job_id in self.cancelled or (stopping and state == "CANCELLED"):
            return "stopped", ""
        if state in ("TIMEOUT", "PREEMPTED", "NODE_FAIL", "UNKNOWN"):  # the job went away: submit it again
            return "again", f"job {launch.job_id} {state}"
        return "failed", f"job {launch.job_id} {state} (see {self.spec.out / 'slurm'}/{launch.job_id}_0_log.err)"


def slurm_argv(spec, overrides: list) -> list[str]:
    """``python -m ddp_resnet.slurm`` arguments for a trial: the search's SLURM options (log folder DIR/slurm and
    job name ``search-<DIR>`` unless given), the recipe and the trial's overrides."""
    from ddp_resnet.slurm.sweep import slug

    extra = list(spec.slurm_args)
    names = {a.split("=")[0] for a in extra}
    if "--log-dir" not in names:
        extra += ["--log-dir", str(spec.out / "slurm")]
    if "--job-name" not in names:
        extra += ["--job-name", slug(f"search-{spec.out.name}")]
    return [*extra, *(["--config", spec.config] if spec.config else []), *overrides]
