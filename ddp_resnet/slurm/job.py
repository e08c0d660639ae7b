"""The job side: what runs on the compute nodes, and the one requeue policy.

``TrainTask`` is the function every submitit task runs: ``ddp_resnet.train.main(argv)``, then, when the trainer
stopped with a checkpoint (exit 75), rank 0 asks ``decide_requeue`` and requeues the job. The plain sbatch
template (``slurm/train.sbatch``) follows the same policy through this module's command line:

    python -m ddp_resnet.slurm.job --state-dir DIR [--signal-delay-s 120] [--max-timeouts 3]
        exit 0: requeue the job; exit 3: do not (the reason is printed); the decision is recorded either way

The policy: a stop within ``signal_delay_s`` + ``TIMEOUT_GRACE_S`` of the time limit is a time-out, any other
stop a preemption; preemptions always requeue, time-outs at most ``max_timeouts`` times. Every decision is
appended to ``<state dir>/<job id>_requeues.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ddp_resnet import distributed
from ddp_resnet.exitcodes import NO_REQUEUE as EXIT_NO_REQUEUE  # the command line's "do not requeue"
from ddp_resnet.exitcodes import PRUNED as EXIT_PRUNED  # a search trial its study pruned: it ended, not failed
from ddp_resnet.exitcodes import STOPPED as EXIT_STOPPED  # stopped with last.pt written: requeue me
from ddp_resnet.rundir import read_jsonl

LOCAL_REQUEUE_EXIT = 144  # submitit's local controller restarts all tasks when one exits with this code
TIMEOUT_GRACE_S = 90  # SLURM may send the warning signal up to ~60 s early; add slack for the stop itself


def classify_stop(run_s: float, limit_s: float | None, signal_delay_s: int) -> str:
    """'timeout' when the stop came within the warning window before the time limit, else 'preemption'."""
    if not limit_s:
        return "preemption"
    return "timeout" if run_s >= limit_s - signal_delay_s - TIMEOUT_GRACE_S else "preemption"


def parse_duration(text: str) -> float | None:
    """SLURM duration ([D-]HH:MM:SS, MM:SS) -> seconds; None for UNLIMITED and the like."""
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text.strip())
    if not m:
        return None
    d, h, mi, s = (int(x or 0) for x in m.groups())
    return d * 86400 + h * 3600 + mi * 60 + s


def slurm_job_fields(job_id: str) -> dict:
    """`scontrol show job -o ID` as a dict of its Key=Value fields (first record; {} when unavailable)."""
    try:
        res = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], check=False, capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {}
    if res.returncode != 0 or not res.stdout.strip():
        return {}
    line = res.stdout.strip().splitlines()[0]
    return dict(re.findall(r"(\w+)=(\S*)", line))


def decide_requeue(job_id: str, state_dir: str | Path, run_s: float, limit_s: float | None, signal_delay_s: int,
                   max_timeouts: int, ask_slurm: bool = True) -> dict:
    """Classify this stop, count the job's time-outs so far, decide, and record the decision (returned as recorded:
    reason, timeouts, requeue, and the job's SLURM ``state``, RUNNING unless the scheduler already acts).

    With ``ask_slurm`` the job's run time, limit and state come from ``scontrol show job`` where it answers
    (the job started a little before any of its tasks).
    """
    state = "RUNNING"
    if ask_slurm:
        fields = slurm_job_fields(job_id)
        run_s = max(run_s, parse_duration(fields.get("RunTime", "")) or 0.0)
        if "TimeLimit" in fields:
            limit_s = parse_duration(fields["TimeLimit"]) or 0.0  # UNLIMITED: never a time-out
        state = fields.get("JobState", "RUNNING")
    reason = classify_stop(run_s, limit_s, signal_delay_s)
    path = Path(state_dir) / f"{job_id}_requeues.jsonl"
    timeouts = sum(1 for r in read_jsonl(path, skip_bad=True) if r.get("reason") == "timeout") + (reason == "timeout")
    decision = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "job_id": job_id, "host": socket.gethostname(),
                "restart_count": distributed.slurm_job().restart_count, "reason": reason, "run_s": round(run_s, 1),
                "limit_s": limit_s, "timeouts": timeouts, "max_timeouts": max_timeouts,
                "requeue": reason == "preemption" or timeouts <= max_timeouts, "state": state}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(decision) + "\n")
    except OSError as exc:
        _log(f"could not record the requeue decision in {path}: {exc}")
    return decision


def _log(message: str) -> None:
    print(f"[ddp_resnet.slurm] {message}", file=sys.stderr, flush=True)


def _explain(d: dict) -> str:
    if d["requeue"]:
        return (f"stopped ({d['reason']}, ran {d['run_s']:.0f}s of {d['limit_s'] or 0:.0f}s, time-outs "
                f"{d['timeouts']}/{d['max_timeouts']}); requeueing job {d['job_id']}")
    return (f"stopped at the time limit {d['timeouts']} time(s) (--max-timeouts {d['max_timeouts']}); not requeued. "
            f"The last checkpoint is in place: submit the same command again to continue.")


class TrainTask:
    """The function every task runs: ddp_resnet.train.main(argv), then requeue on EXIT_STOPPED (rank 0).

    Defines ``checkpoint`` so that submitit's own signal handler, active only until the trainer installs its
    handlers, requeues the job as well (nothing to save yet: the restart resumes from the last checkpoint).
    """

    def __init__(self, argv: Sequence[str], cluster: str, time_limit_s: int, signal_delay_s: int,
                 max_timeouts: int, state_dir: str) -> None:
        self.argv = list(argv)
        self.cluster = cluster
        self.time_limit_s = time_limit_s
        self.signal_delay_s = signal_delay_s
        self.max_timeouts = max_timeouts
        self.state_dir = state_dir

    def checkpoint(self, *args: Any, **kwargs: Any):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)

    def __call__(self) -> dict:
        started = time.time()
        import submitit

        job_env = submitit.JobEnvironment()
        if self.cluster == "local":  # submitit's local executor: give the tasks torchrun-style variables
            distributed.export_local_launch(job_env.global_rank, job_env.num_tasks, job_env.local_rank,
                                            str(job_env.job_id))
        else:
            distributed.prepare_srun_task()
        rank = job_env.global_rank
        from ddp_resnet import train

        try:
            rc = train.main(list(self.argv))
        except SystemExit as exc:  # a trainer that exits instead of returning
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        rc = 0 if rc is None else int(rc)
        if rc in (0, EXIT_PRUNED):
            return {"rank": rank, "exit_code": rc, "job_id": job_env.job_id, "argv": self.argv}
        if rc != EXIT_STOPPED:
            # Raising makes submitit record the error; the non-zero exit makes srun kill the other ranks.
            raise RuntimeError(f"ddp_resnet.train exited with code {rc} on rank {rank} (job {job_env.job_id})")
        # EXIT_STOPPED: the checkpoint is on disk. Ignore further stop signals while deciding (a requeue
        # terminates this job step anyway).
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
        if rank != 0:
            raise SystemExit(0)  # exit 0: a non-zero exit here would make srun kill rank 0 before it requeues
        self.requeue_or_fail(str(job_env.job_id), started)
        raise AssertionError("unreachable")

    def requeue_or_fail(self, job_id: str, started: float) -> None:
        """Decide with ``decide_requeue`` and act: requeue (exit 0), leave it to the scheduler (exit 75) or fail."""
        slurm = self.cluster == "slurm"
        decision = decide_requeue(distributed.slurm_job().job_id or job_id if slurm else job_id, self.state_dir,
                                  time.time() - started, float(self.time_limit_s), self.signal_delay_s,
                                  self.max_timeouts, ask_slurm=slurm)
        if not decision["requeue"]:
            raise RuntimeError(_explain(decision))
        _log(_explain(decision))
        if not slurm:
            raise SystemExit(LOCAL_REQUEUE_EXIT)
        if decision["state"] != "RUNNING":  # the scheduler is already requeueing (or ending) the job (preemption)
            _log(f"job {job_id} is already {decision['state']}; leaving it to the scheduler (exit {EXIT_STOPPED})")
            raise SystemExit(EXIT_STOPPED)
        try:
            res = subprocess.run(["scontrol", "requeue", job_id], check=False, capture_output=True, text=True,
                                 timeout=60)
            ok, detail = res.returncode == 0, (res.stderr or res.stdout).strip()
        except (OSError, subprocess.SubprocessError) as exc:
            ok, detail = False, str(exc)
        if not ok:  # e.g. the scheduler is already requeueing a preempted job
            _log(f"scontrol requeue {job_id} failed: {detail}; exiting with {EXIT_STOPPED}")
            raise SystemExit(EXIT_STOPPED)
        raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    """The sbatch template's requeue question: exit 0 to requeue, 3 not to (decision recorded)."""
    parser = argparse.ArgumentParser(prog="python -m ddp_resnet.slurm.job", description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", required=True, help="directory of <job id>_requeues.jsonl")
    parser.add_argument("--signal-delay-s", type=int, default=120, help="the warning signal's lead (sbatch --signal)")
    parser.add_argument("--max-timeouts", type=int, default=3, help="requeue after at most N time-outs")
    args = parser.parse_args(argv)
    job = distributed.slurm_job()
    if not job.job_id:
        _log("not inside a SLURM job (no SLURM_JOB_ID): nothing to requeue")
        return EXIT_NO_REQUEUE
    decision = decide_requeue(job.job_id, args.state_dir, 0.0, None, args.signal_delay_s, args.max_timeouts)
    _log(_explain(decision))
    return 0 if decision["requeue"] else EXIT_NO_REQUEUE


if __name__ == "__main__":
    sys.exit(main())
