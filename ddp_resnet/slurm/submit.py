"""Submit training to SLURM (or run it locally) through submitit: one task per GPU, preemption-safe, sweeps.

    python -m ddp_resnet.slurm --config configs/X.yaml [key=value ...] --nodes 2 --gpus-per-node 8 \\
        --partition P --time 240 [--account A] [--qos Q] [--constraint C] [--cpus-per-task K] [--mem M] \\
        [--job-name N] [--tasks-per-node N] [--signal USR2] [--signal-delay-s 120] [--max-timeouts 3] \\
        [--log-dir DIR] [--sweep key=v1,v2 ...] [--dry-run | --local] [--wait]

How a job runs: sbatch starts ``srun --kill-on-bad-exit=1`` with one task per GPU (``--gpus-per-node 0
--tasks-per-node N`` gives a CPU job and adds ``train.device=cpu dist.backend=gloo``). Every task calls
``ddp_resnet.train.main`` with the validated arguments; ``ddp_resnet.distributed.read_env`` takes rank,
world size, local rank and the rendezvous address from srun's variables (port derived from the job id).

Preemption and time limits: SLURM sends ``--signal`` (USR2) ``--signal-delay-s`` seconds before the time
limit, and a scheduler preempting the job sends SIGTERM. The trainer catches both, the ranks agree at the
next step boundary, rank 0 writes ``checkpoints/last.pt`` and every rank returns ``EXIT_STOPPED`` (75).
Rank 0 then requeues the job (``scontrol requeue``) as ``ddp_resnet.slurm.job``'s policy decides: a stop within
``--signal-delay-s`` + 90 s of the time limit counts as a time-out, and after ``--max-timeouts`` of them the job
fails instead of requeueing (resubmit the same command to go on); preemptions requeue without limit. Each
decision is appended to ``<log dir>/<job id>_requeues.jsonl``. The restart resumes exactly (``ckpt.resume=auto``).

Any other non-zero exit code on any rank fails the whole job at once (srun kills the other ranks).

Nothing is submitted unless every check passes: the config with all overrides (and every sweep point),
the world size (nodes x tasks per node) against the batch size, the partition (``sinfo``), the numbers.
Each failure prints one line on stderr and exits with 2.

The job script holds what the user typed, nothing more: a value that reaches it (or the tasks' command line)
with a control character (``\x00``-``\x1f``, ``\x7f``: a newline would end its ``#SBATCH`` line and run the rest
as a command) is refused, as is a backslash in an ``#SBATCH`` value (sbatch reads it as an escape). ``--dry-run``
prints the very script a submission hands to sbatch (``job_script``). Paths (``output_dir``, ``--log-dir``,
``--config``) are resolved by ``resolve_path``, as the trainer resolves them.

This module imports submitit only inside functions, so ``--help`` and argument checks work without it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddp_resnet import config as config_lib
from ddp_resnet.config import ConfigError
from ddp_resnet.exitcodes import OK as EXIT_OK
from ddp_resnet.exitcodes import USAGE as EXIT_USAGE
from ddp_resnet.slurm.job import TrainTask, slurm_job_fields
from ddp_resnet.slurm.sweep import SweepError, parse_sweeps, point_names, slug

SIGNALS = ("USR2", "TERM")  # the signals the trainer turns into a checkpoint-and-stop
KILL_ON_BAD_EXIT = "--kill-on-bad-exit=1"
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")  # none of these may reach the job script
BACKSLASH = "\\"  # sbatch reads it as an escape in #SBATCH lines, even inside quotes (the shell does not)
TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
    "PREEMPTED",
}


class UsageError(ValueError):
    """A problem with the command line, described in one line (exit code 2, nothing submitted)."""


# ---------------------------------------------------------------------------------------------------- parsing
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m ddp_resnet.slurm",
        description="Submit ddp_resnet training to SLURM through submitit (one task per GPU, requeue on "
                    "preemption/time limit, sweeps as one job array).",
        epilog="Example: python -m ddp_resnet.slurm --config configs/X.yaml output_dir=runs/x --nodes 2 "
               "--gpus-per-node 8 --partition gpu --time 240 --sweep optim.lr=0.05,0.1",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=90")
    p.add_argument("--config", help="YAML recipe (as for python -m ddp_resnet.train)")
    g = p.add_argument_group("resources")
    g.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    g.add_argument("--gpus-per-node", type=int, required=True,
                   help="GPUs per node; one task per GPU. 0 = CPU job (needs --tasks-per-node; gloo)")
    g.add_argument("--tasks-per-node", type=int, default=None,
                   help="tasks per node (default: --gpus-per-node, or 1 for a CPU job)")
    g.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per task (data workers + 1 is typical)")
    g.add_argument("--mem", default=None, help="memory per node, SLURM syntax: 64G, 500000M, 0 = all")
    g.add_argument("--partition", default=None, help="partition (default: the cluster's default)")
    g.add_argument("--time", default="60", help="time limit: minutes or [D-]HH:MM[:SS] (default 60)")
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--constraint", default=None, help="node features, e.g. a100")
    g.add_argument("--job-name", default=None, help="job name (default: the output directory's name)")
    g.add_argument("--sbatch-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="extra #SBATCH option, e.g. mail-type=END (repeatable)")
    g.add_argument("--array-parallelism", type=int, default=None, help="sweeps: at most N array tasks at once")
    r = p.add_argument_group("preemption")
    r.add_argument("--signal", default="USR2", type=str.upper, help="warning signal before the limit: USR2|TERM")
    r.add_argument("--signal-delay-s", type=int, default=120, help="send it this many seconds before the limit")
    r.add_argument("--max-timeouts", type=int, default=3,
                   help="requeue after at most N time-outs (preemptions requeue without limit; default 3)")
    m = p.add_argument_group("mode")
    m.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="sweep a config key (repeatable: the product of all sweeps runs as one job array)")
    m.add_argument("--log-dir", default=None, help="submitit folder for scripts, pickles, logs "
                                                  "(default <output_dir>/slurm; must be on shared storage)")
    m.add_argument("--dry-run", action="store_true", help="print the sbatch script and the plan; submit nothing")
    m.add_argument("--local", action="store_true", help="run the same job here with submitit's local executor")
    m.add_argument("--wait", action="store_true", help="wait for the job(s) to end; exit 0 only if all completed")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line (options and key=value overrides may be interleaved)."""
    return build_parser().parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))


def parse_time(text: str) -> int:
    """SLURM time (minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]) -> whole minutes (rounded up)."""
    text = str(text).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise UsageError(f"--time: cannot read '{text}'; use minutes or [D-]HH:MM[:SS]")
    days, a, b, c = m.groups()
    a, b, c = int(a), int(b or 0), int(c or 0)
    if days is not None:
        seconds = int(days) * 86400 + a * 3600 + b * 60 + c
    elif m.group(4) is not None:
        seconds = a * 3600 + b * 60 + c
    elif m.group(3) is not None:
        seconds = a * 60 + b
    else:
        seconds = a * 60
    return math.ceil(seconds / 60)


# ---------------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Point:
    """One job of the submission (the only one without --sweep)."""

    index: int
    overrides: tuple  # the sweep overrides of this point ('' for a plain job)
    output_dir: str  # absolute
    argv: tuple  # what every task passes to ddp_resnet.train.main


@dataclass(frozen=True)
class Plan:
    """A validated submission."""

    cluster: str  # slurm | local
    output_dir: str  # absolute; the sweep root for sweeps
    log_dir: str  # absolute submitit folder
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    time_min: int
    job_name: str
    points: tuple
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    signal: str = "USR2"
    signal_delay_s: int = 120
    max_timeouts: int = 3
    sbatch_opts: tuple = ()
    array_parallelism: int | None = None
    sweep_keys: tuple = ()

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


def slurm_available() -> bool:
    """True when the SLURM client commands are on PATH."""
    return bool(shutil.which("sbatch") and shutil.which("sinfo") and shutil.which("srun"))


def slurm_partitions() -> list[str]:
    """Partition names known to the controller (sinfo); raises UsageError when sinfo fails."""
    try:
        res = subprocess.run(["sinfo", "-h", "-o", "%R"], check=False, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise UsageError(f"cannot list SLURM partitions: {exc}") from None
    if res.returncode != 0:
        first = (res.stderr.strip().splitlines() or ["sinfo failed"])[0]
        raise UsageError(f"cannot list SLURM partitions: {first}")
    return sorted({line.strip() for line in res.stdout.splitlines() if line.strip()})


def check_script_value(name: str, value: str, sbatch_line: bool = False) -> None:
    """Refuse a value bound for the job script that holds a control character (or, for an #SBATCH line, a backslash)."""
    found = CONTROL_CHARACTER.search(value)
    if found:
        raise UsageError(f"{name}: control character {found.group()!r} not allowed in a value that reaches the job "
                         f"script")
    if sbatch_line and BACKSLASH in value:
        raise UsageError(f"{name}: {BACKSLASH!r} not allowed in a value that reaches an #SBATCH line (sbatch reads it "
                         f"as an escape)")


def _label(key: str) -> str:
    """A key as an error names it (quoted when it is empty or holds a control character itself)."""
    return key if key and not CONTROL_CHARACTER.search(key) else repr(key)


def _check_typed_values(args: argparse.Namespace) -> None:
    """Every value of the command line that reaches the job script or the tasks' argv, before anything else."""
    flags = [("--config", args.config, False), ("--log-dir", args.log_dir, True)]
    flags += [(f"--{name.replace('_', '-')}", getattr(args, name), True)
              for name in ("job_name", "partition", "account", "qos", "constraint", "mem", "time", "signal")]
    for flag, value, sbatch_line in flags:
        if value is not None:
            check_script_value(flag, str(value), sbatch_line)
    for item in args.sbatch_opt:
        check_script_value(f"--sbatch-opt {_label(item.partition('=')[0].strip().lstrip('-'))}", item, True)
    for text in args.overrides:
        check_script_value(_label(str(text).partition("=")[0].strip()), str(text))
    for item in args.sweep:
        check_script_value(f"--sweep {_label(item.partition('=')[0].strip())}", item)


def resolve_path(text: str) -> str:
    """A path as the trainer resolves it: ``os.path.expanduser``, then absolute against the working directory.

    The one rule for ``output_dir``, ``--log-dir`` and ``--config``: ``~`` and ``~user`` are expanded exactly as
    the trainer's config expands them (``os.path.expanduser``, which leaves an unknown user's ``~name`` as it is,
    where pathlib would raise), then ``Path.absolute`` (no symlink or ``..`` resolution), the path the trainer
    started in this directory would open.
    """
    return str(Path(os.path.expanduser(text)).absolute())


def _check_positive(name: str, value: int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise UsageError(f"{name}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _parse_sbatch_opts(items: Sequence[str]) -> tuple:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not key or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", key):
            raise UsageError(f"--sbatch-opt '{item}': expected KEY=VALUE (or KEY for a flag)")
        out.append((key.replace("_", "-"), value if sep else True))
    return tuple(out)


def _check_resources(args: argparse.Namespace) -> tuple[int, int]:
    """The resource flags, checked; returns ``(tasks per node, time limit in minutes)``."""
    for flag, value, zero in (("--nodes", args.nodes, False), ("--gpus-per-node", args.gpus_per_node, True),
                              ("--tasks-per-node", args.tasks_per_node, False),
                              ("--cpus-per-task", args.cpus_per_task, False),
                              ("--signal-delay-s", args.signal_delay_s, False),
                              ("--max-timeouts", args.max_timeouts, True),
                              ("--array-parallelism", args.array_parallelism, False)):
        _check_positive(flag, value, allow_zero=zero)
    gpus = args.gpus_per_node
    tasks = args.tasks_per_node if args.tasks_per_node is not None else (gpus or 1)
    if gpus > 0 and tasks != gpus:
        raise UsageError(f"--tasks-per-node {tasks} must equal --gpus-per-node {gpus} (one task per GPU)")
    if args.local and args.nodes != 1:
        raise UsageError(f"--local runs on this machine only: --nodes must be 1, got {args.nodes}")
    time_min = parse_time(args.time)
    _check_positive("--time", time_min)
    if args.signal_delay_s >= time_min * 60:
        raise UsageError(f"--signal-delay-s {args.signal_delay_s} must be shorter than --time ({time_min * 60} s)")
    if args.signal not in SIGNALS:
        raise UsageError(f"--signal: unknown signal '{args.signal}'; valid choices: {', '.join(SIGNALS)}")
    if args.mem is not None and not re.fullmatch(r"\d+[KMGTkmgt]?[Bb]?", str(args.mem)):
        raise UsageError(f"--mem: cannot read '{args.mem}'; use SLURM syntax such as 64G or 500000M")
    for name in ("partition", "account", "qos", "constraint", "job_name"):
        value = getattr(args, name)
        if value is not None and (not value.strip() or any(c.isspace() for c in value)):
            raise UsageError(f"--{name.replace('_', '-')}: invalid value {value!r}")
    return tasks, time_min


def _plan_points(args: argparse.Namespace, world: int) -> tuple[str, list[Point], list]:
    """The config (base overrides, then every sweep point, each validated for ``world`` ranks); returns the
    absolute output_dir, the points and the sweeps."""
    gpus = args.gpus_per_node
    overrides = [str(o) for o in args.overrides]
    for text in overrides:
        config_lib.parse_override(text)  # shape check: key=value
    if gpus == 0:  # CPU job: gloo on CPU (the user's own overrides still win, then are checked below)
        overrides = ["train.device=cpu", "dist.backend=gloo"] + overrides
    config_path = resolve_path(args.config) if args.config else None
    if config_path:
        check_script_value("--config", config_path)  # the working directory is part of it now
    base = config_lib.load(config_path, overrides)
    if gpus == 0 and base.train.device == "cuda":
        raise ConfigError("train.device: cuda needs --gpus-per-node > 0")
    if gpus > 0 and base.train.device == "cpu":
        raise ConfigError(f"train.device: cpu with --gpus-per-node {gpus}; use --gpus-per-node 0 for a CPU job")
    config_lib.validate_world(base, world)
    output_dir = resolve_path(base.output_dir)
    check_script_value("output_dir", output_dir, sbatch_line=args.log_dir is None)  # the recipe's, too
    sweeps = parse_sweeps(args.sweep)
    points = []
    for index, (point_overrides, name) in enumerate(point_names(sweeps)):
        out = str(Path(output_dir) / name) if name else output_dir
        # the resolved, absolute output_dir replaces any output_dir override (jobs may start elsewhere)
        full = [o for o in overrides if config_lib.parse_override(o)[0] != "output_dir"]
        full = full + point_overrides + [f"output_dir={out}"]
        try:
            cfg = config_lib.load(config_path, full)
            config_lib.validate_world(cfg, world)
        except ConfigError as exc:
            if point_overrides:
                raise ConfigError(f"{exc} (sweep point {' '.join(point_overrides)})") from None
            raise
        argv = (["--config", config_path] if config_path else []) + full
        points.append(Point(index, tuple(point_overrides), out, tuple(argv)))
    return output_dir, points, sweeps


def make_plan(args: argparse.Namespace) -> Plan:
    """Check everything that can be checked before submitting; raise UsageError/ConfigError (one line)."""
    cluster = "local" if args.local else "slurm"
    _check_typed_values(args)
    tasks, time_min = _check_resources(args)
    sbatch_opts = _parse_sbatch_opts(args.sbatch_opt)
    output_dir, points, sweeps = _plan_points(args, args.nodes * tasks)
    if cluster == "slurm" and not args.dry_run and not slurm_available():
        raise UsageError("SLURM commands (sbatch, srun, sinfo) not found; use --local or --dry-run")
    if cluster == "slurm" and args.partition and slurm_available():
        known = slurm_partitions()
        if args.partition not in known:
            raise UsageError(f"--partition: '{args.partition}' does not exist; available: {', '.join(known) or 'none'}")

    log_dir = resolve_path(args.log_dir) if args.log_dir else str(Path(output_dir) / "slurm")
    check_script_value("--log-dir" if args.log_dir else "output_dir", log_dir, sbatch_line=True)
    return Plan(
        cluster=cluster, output_dir=output_dir, log_dir=log_dir, nodes=args.nodes, tasks_per_node=tasks,
        gpus_per_node=args.gpus_per_node, time_min=time_min, job_name=args.job_name or slug(Path(output_dir).name),
        points=tuple(points), partition=args.partition, account=args.account, qos=args.qos,
        constraint=args.constraint, cpus_per_task=args.cpus_per_task, mem=args.mem, signal=args.signal,
        signal_delay_s=args.signal_delay_s, max_timeouts=args.max_timeouts, sbatch_opts=sbatch_opts,
        array_parallelism=args.array_parallelism, sweep_keys=tuple(k for k, _ in sweeps),
    )


# ---------------------------------------------------------------------------------------------------- executor
def executor_parameters(plan: Plan) -> dict:
    """The parameters of submitit's executor for the plan: SlurmExecutor's (sbatch names) or LocalExecutor's."""
    if plan.cluster == "local":
        return {"timeout_min": plan.time_min, "tasks_per_node": plan.tasks_per_node,
                "signal_delay_s": plan.signal_delay_s}
    additional: dict[str, Any] = {"requeue": True}
    additional.update(dict(plan.sbatch_opts))
    additional["signal"] = f"{plan.signal}@{plan.signal_delay_s}"  # submitit would write USR2; ours is asked for
    params: dict[str, Any] = {
        "job_name": plan.job_name, "time": plan.time_min, "nodes": plan.nodes, "ntasks_per_node": plan.tasks_per_node,
        "signal_delay_s": plan.signal_delay_s, "srun_args": [KILL_ON_BAD_EXIT], "additional_parameters": additional,
    }
    if plan.gpus_per_node > 0:
        params["gpus_per_node"] = plan.gpus_per_node
    if plan.cpus_per_task is not None:
        params["cpus_per_task"] = plan.cpus_per_task
    if plan.signal != "USR2":  # submitit's own (pre-trainer) handler listens for the same signal
        params["setup"] = [f"export SUBMITIT_PREEMPT_SIGNAL={plan.signal}"]
    for key in ("partition", "account", "qos", "constraint", "mem", "array_parallelism"):
        if getattr(plan, key) is not None:
            params[key] = getattr(plan, key)
    return params


def _new_executor(kind: type, plan: Plan):
    """An executor of submitit class ``kind`` for the plan: its folder, time-out count and parameters."""
    executor = kind(folder=plan.log_dir, max_num_timeout=plan.max_timeouts)
    executor.update_parameters(**executor_parameters(plan))
    return executor


def make_executor(plan: Plan):
    """A configured submitit SlurmExecutor or LocalExecutor writing into plan.log_dir."""
    import submitit

    Path(plan.log_dir).mkdir(parents=True, exist_ok=True)
    return _new_executor(submitit.LocalExecutor if plan.cluster == "local" else submitit.SlurmExecutor, plan)


def job_script(plan: Plan) -> str:
    """The sbatch script that submitting the plan hands to sbatch, byte for byte (what ``--dry-run`` prints).

    It is rendered by the method submitit's ``submit`` renders it with (``_make_submission_file_text``), on an
    executor set up by ``_new_executor`` as for the submission and, for a sweep, given the array size that
    submitit's batch submission adds; a test holds the two equal. Nothing is written and nothing need be installed
    but submitit (this executor skips the check for ``srun``).
    """
    import submitit

    class Renderer(submitit.SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:
            return 2  # any positive value: SlurmExecutor refuses to start where srun is not on PATH

    executor = _new_executor(Renderer, plan)
    if len(plan.points) > 1:
        executor.parameters["map_count"] = len(plan.points)  # as SlurmExecutor submits a batch: one job array
    return executor._make_submission_file_text(executor._submitit_command_str, "")


@dataclass
class Submitted:
    point: Point
    job_id: str
    stdout: str
    stderr: str
    job: Any = dataclasses.field(default=None, repr=False)


def submit(plan: Plan) -> list[Submitted]:
    """Submit the plan (one job, or one array over the sweep points) and return what was submitted."""
    executor = make_executor(plan)
    tasks = [TrainTask(p.argv, plan.cluster, plan.time_min * 60, plan.signal_delay_s, plan.max_timeouts, plan.log_dir)
             for p in plan.points]
    if len(tasks) == 1:
        jobs = [executor.submit(tasks[0])]
    else:
        with executor.batch():
            jobs = [executor.submit(task) for task in tasks]
    return [Submitted(p, str(j.job_id), str(j.paths.stdout), str(j.paths.stderr), j)
            for p, j in zip(plan.points, jobs)]


def job_state(sub: Submitted, cluster: str) -> str:
    """Current state: SLURM's JobState (scontrol, then sacct) or, locally, from submitit's result files."""
    if cluster == "slurm":
        state = slurm_job_fields(sub.job_id).get("JobState", "")
        if state:
            return state
        try:
            res = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", sub.job_id], check=False,
                                 capture_output=True, text=True, timeout=30)
            if res.returncode == 0 and res.stdout.strip():
                return res.stdout.split()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    if sub.job is not None and sub.job.done():
        try:
            sub.job.results()
            return "COMPLETED"
        except Exception:  # noqa: BLE001 - any failure of the job
            return "FAILED"
    return "RUNNING" if cluster == "local" else "UNKNOWN"


def wait(subs: list[Submitted], cluster: str, poll_s: float = 2.0, timeout_s: float | None = None) -> dict:
    """Block until every job reaches a terminal state; return {job_id: state}."""
    deadline = None if timeout_s is None else time.time() + timeout_s
    states: dict[str, str] = {}
    pending = list(subs)
    while pending:
        for sub in list(pending):
            state = job_state(sub, cluster)
            states[sub.job_id] = state
            if state.split()[0] in TERMINAL_STATES:
                pending.remove(sub)
        if pending:
            if deadline is not None and time.time() > deadline:
                break
            time.sleep(poll_s)
    return states


# ---------------------------------------------------------------------------------------------------- output
def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def describe(plan: Plan) -> str:
    where = "this machine (submitit local executor)" if plan.cluster == "local" else (
        f"partition {plan.partition}" if plan.partition else "the default partition")
    kind = f"{plan.gpus_per_node} GPU(s)/node" if plan.gpus_per_node else "CPU, gloo"
    return (f"{len(plan.points)} job(s) on {where}: {plan.nodes} node(s) x {plan.tasks_per_node} task(s) "
            f"({kind}), world size {plan.world_size}, time {plan.time_min} min, {plan.signal} "
            f"{plan.signal_delay_s}s before the limit, max {plan.max_timeouts} time-out requeue(s)")


def print_submitted(plan: Plan, subs: list[Submitted]) -> None:
    print(describe(plan))
    if len(subs) == 1 and not plan.sweep_keys:
        s = subs[0]
        print(f"job id:     {s.job_id}")
        print(f"output dir: {s.point.output_dir}")
        print(f"stdout:     {s.stdout}")
        print(f"stderr:     {s.stderr}")
    else:
        rows = [["job_id", "overrides", "output_dir"]]
        rows += [[s.job_id, " ".join(s.point.overrides), s.point.output_dir] for s in subs]
        print(format_table(rows))
        print(f"logs:       {plan.log_dir}/<job_id>_<task>_log.out|err")
    sys.stdout.flush()


def write_sweep_index(plan: Plan, subs: list[Submitted]) -> None:
    """<output_dir>/sweep.json: job id, overrides and directory of every sweep point."""
    if not plan.sweep_keys:
        return
    rows = [{"index": s.point.index, "job_id": s.job_id, "overrides": list(s.point.overrides),
             "output_dir": s.point.output_dir} for s in subs]
    path = Path(plan.output_dir) / "sweep.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"keys": list(plan.sweep_keys), "jobs": rows}, indent=1) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Validate, then submit (or print with --dry-run, or run locally with --local). Returns an exit code."""
    try:
        args = parse_args(argv)
    except UsageError as exc:
        print(f"ddp_resnet.slurm: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return execute(args)


def execute(args: argparse.Namespace) -> int:
    """Plan and submit parsed arguments (what ``main`` does after parsing; experiments calls it too)."""
    try:
        plan = make_plan(args)
    except (UsageError, SweepError, ConfigError) as exc:
        print(f"ddp_resnet.slurm: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.dry_run:
        if plan.cluster == "slurm":
            print(job_script(plan))  # then only comment lines: the output is still the script
        print("# " + describe(plan))
        rows = [["#", "overrides", "output_dir"]] + [
            [str(p.index), " ".join(p.overrides) or "-", p.output_dir] for p in plan.points]
        print("\n".join("# " + line for line in format_table(rows).splitlines()))
        print("# task command: python -m ddp_resnet.train " + shlex.join(plan.points[0].argv))
        print("# dry run: nothing submitted")
        return EXIT_OK
    try:
        subs = submit(plan)
    except Exception as exc:  # noqa: BLE001 - sbatch errors come back as exceptions from submitit
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        print(f"ddp_resnet.slurm: error: submission failed: {first}", file=sys.stderr)
        return 1
    write_sweep_index(plan, subs)
    print_submitted(plan, subs)
    if not args.wait:
        return EXIT_OK
    states = wait(subs, plan.cluster)
    rows = [["job_id", "state"]] + [[k, v] for k, v in states.items()]
    print(format_table(rows), flush=True)
    return EXIT_OK if all(v.split()[0] == "COMPLETED" for v in states.values()) else 1


def cli() -> None:
    """Console entry point (ddp-resnet-slurm)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
