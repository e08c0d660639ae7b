"""The process environment: the ONLY reader (and writer) of RANK / LOCAL_RANK / WORLD_SIZE / SLURM_* variables.

``read_env()`` turns torchrun's variables, srun's SLURM_* variables, or nothing (a plain ``python -m`` run)
into a ``LaunchInfo``; ``init(cfg)`` pins the device and creates the process group when there is more than
one process, returning a ``DistEnv`` that the rest of the code is given. The SLURM job side asks here for the
job's id and restart count (``slurm_job``) and has the launcher variables of its tasks set here
(``export_local_launch``, ``prepare_srun_task``).
"""
from __future__ import annotations

import datetime
import gc
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import traceback
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ddp_resnet import exitcodes
from ddp_resnet.config import ConfigError, RankError

COLLECTIVE_GRACE_S = 30


@dataclass(frozen=True)
class LaunchInfo:
    """How this process was started: rank, world size, local rank, and the rendezvous address."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launcher: str = "single"  # single | torchrun | slurm
    master_addr: str = ""
    master_port: int = 0
    node_id: int = 0
    restart_count: int = 0  # torchrun: how many times the workers were restarted
    agent_store: bool = False  # torchrun: its agent serves the TCPStore at master_addr:master_port


@dataclass(frozen=True)
class DistEnv:
    """The initialised environment that trainers, loaders and checkpoints are given."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str  # "" when no process group exists
    launcher: str
    local_world_size: int = 1  # processes on this node (they share its CPU cores)

    @property
    def is_main(self) -> bool:
        """True on the one rank that prints and writes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group exists (world size > 1)."""
        return self.world_size > 1


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand a SLURM node list such as ``gpu[01-03,07],login1`` into host names."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not match:
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            if "-" in item:
                lo, hi = item.split("-")
                hosts.extend(f"{prefix}{str(i).zfill(len(lo))}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{item}{suffix}")
    return hosts


def _first_host(nodelist: str) -> str:
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=20, check=True).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_hostlist(nodelist)[0]


PORT_BASE = 10000  # rendezvous ports of srun and local-executor jobs: PORT_BASE .. PORT_BASE + PORT_SPAN - 1
PORT_SPAN = 22000  # 10000-31999: below Linux's default ephemeral range (32768-60999), where outgoing connections
#   (another job's NCCL and gloo sockets among them) take their local ports


def slurm_port(job_id: str) -> int:
    """The rendezvous port of a job: ``PORT_BASE + job id % PORT_SPAN`` (``MASTER_PORT``, when set, wins).

    The whole id counts, so two jobs on one node share a port only if their ids differ by a multiple of
    ``PORT_SPAN`` (22000) and both run there at once; ids closer than that (jobs submitted near in time) never do.
    Array tasks need nothing more: each has its own ``SLURM_JOB_ID`` (``SLURM_ARRAY_JOB_ID`` is the array's, the
    same for all of them), the id ``read_env`` passes. An id that is not a plain number (``"36_2"``, submitit's
    name for an array task) maps through CRC-32 of its text, so no two forms merge by their digits.
    """
    text = (job_id or "").strip()
    if not text:
        return PORT_BASE
    number = int(text) if text.isascii() and text.isdigit() else zlib.crc32(text.encode())
    return PORT_BASE + number % PORT_SPAN


def read_env(environ: dict | None = None) -> LaunchInfo:
    """Read the launcher's variables (torchrun first, then srun); a plain process is rank 0 of 1."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchInfo(
            rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]), local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])), launcher="torchrun",
            master_addr=env.get("MASTER_ADDR", ""), master_port=int(env.get("MASTER_PORT", 0) or 0),
            node_id=int(env.get("GROUP_RANK", 0) or 0),
            restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", 0) or 0),
            agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
        )
    # srun sets SLURM_STEP_NUM_TASKS for the tasks it starts; a batch script's own shell has no step tasks.
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        world = int(env["SLURM_STEP_NUM_TASKS"])
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "localhost")
        tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_NTASKS_PER_NODE", str(world)))
        local_world = int(re.match(r"\d+", tasks_per_node).group()) if re.match(r"\d+", tasks_per_node) else world
        return LaunchInfo(
            rank=int(env["SLURM_PROCID"]), world_size=world, local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=local_world, launcher="slurm",
            master_addr=env.get("MASTER_ADDR") or _first_host(nodelist),
            master_port=int(env.get("MASTER_PORT") or slurm_port(env.get("SLURM_JOB_ID", ""))),
            node_id=int(env.get("SLURM_NODEID", 0)),
        )
    return LaunchInfo()


@dataclass(frozen=True)
class SlurmJob:
    """The SLURM job this process belongs to, as its variables say (empty id outside SLURM)."""

    job_id: str = ""
    restart_count: int = 0
    cpus_per_task: int = 1


def slurm_job(environ: dict | None = None) -> SlurmJob:
    """The enclosing SLURM job's id, how often it was requeued, and its CPUs per task."""
    env = os.environ if environ is None else environ
    return SlurmJob(env.get("SLURM_JOB_ID", ""), int(env.get("SLURM_RESTART_COUNT", "0") or 0),
                    int(env.get("SLURM_CPUS_PER_TASK", "1") or 1))


_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                  "TORCHELASTIC_RUN_ID")


def export_local_launch(rank: int, world_size: int, local_rank: int, job_id: str) -> None:
    """Give a task that a local (non-SLURM) executor started torchrun-style variables on localhost."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(slurm_port(job_id)))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, world_size))))


def prepare_srun_task() -> None:
    """An srun task reads SLURM_* variables: drop torchrun variables it may have inherited; threads = its CPUs."""
    for key in _TORCHRUN_VARS:
        os.environ.pop(key, None)
    os.environ.setdefault("OMP_NUM_THREADS", str(slurm_job().cpus_per_task))


def resolve_device(requested: str, local_rank: int) -> torch.device:
    """The device this rank pins: cuda:LOCAL_RANK when CUDA is requested or available, else CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but CUDA is not available; valid choices here: auto, cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RankError(f"local rank {local_rank} has no GPU: this node has {count} (one process per GPU)")
    return torch.device("cuda", local_rank)


def resolve_backend(requested: str, device: torch.device) -> str:
    """NCCL for CUDA devices, gloo for CPU, unless the config names one."""
    if requested != "auto":
        return requested
    return "nccl" if device.type == "cuda" else "gloo"


def die_with_launcher() -> None:
    """Linux: have the kernel send this worker SIGTERM when its torchrun agent dies, so a node whose agent is
    killed takes its workers with it (they stop with a checkpoint, as on any SIGTERM) instead of training on as
    orphans while the other nodes' agents wait for the dead one."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the agent died before the request: act on it now
        os.kill(os.getpid(), signal.SIGTERM)


def init(device: str = "auto", backend: str = "auto", timeout_s: int = 300,
         launch: LaunchInfo | None = None) -> DistEnv:
    """Pin this rank's device and, for more than one process, create the process group."""
    launch = launch or read_env()
    if launch.launcher == "torchrun":
        die_with_launcher()
    dev = resolve_device(device, launch.local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if launch.world_size == 1:
        return DistEnv(0, 1, 0, dev, "", launch.launcher)
    chosen = resolve_backend(backend, dev)
    if launch.launcher == "slurm":
        os.environ["MASTER_ADDR"] = launch.master_addr
        os.environ["MASTER_PORT"] = str(launch.master_port)
    kwargs = {}
    if chosen == "nccl":
        kwargs["device_id"] = dev
    # collectives give up COLLECTIVE_GRACE_S after the watchdog (monitor.Watchdog, dist.timeout_s), which says why
    timeout = datetime.timedelta(seconds=timeout_s + COLLECTIVE_GRACE_S)
    if launch.agent_store:
        # torchrun keeps one store across worker restarts; without a per-attempt namespace the restarted ranks
        # can read the dead ranks' addresses and fail to connect ("Connection refused").
        base = dist.TCPStore(launch.master_addr, launch.master_port, launch.world_size, is_master=False,
                             timeout=timeout)
        kwargs["store"] = dist.PrefixStore(f"ddp_resnet/attempt_{launch.restart_count}/", base)
    else:
        kwargs["init_method"] = "env://"
    dist.init_process_group(chosen, rank=launch.rank, world_size=launch.world_size, timeout=timeout, **kwargs)
    return DistEnv(launch.rank, launch.world_size, launch.local_rank, dev, chosen, launch.launcher,
                   launch.local_world_size)


def guarded(work: Callable[[], int], rank: int, what: str, usage_errors: tuple) -> int:
    """Run a process's work and turn failures into exit codes, the same way in every tool.

    An error of a ``usage_errors`` class (bad configuration, unusable checkpoint: every rank meets the same one)
    exits 2 and is printed by rank 0 only (a ``RankError``, one rank's own problem, by that rank); an ``OSError``
    of the environment (a full or read-only disk) exits 74, printed in one line; an exception whose class names an
    ``exit_code`` (``data.UnreadableImages``: 76) exits with it, printed in one line; any other exception prints this
    rank's traceback and exits 1. With a process group the process leaves at once (``os._exit``), so the other
    ranks' collectives fail instead of waiting for it.
    """
    try:
        return work()
    except RankError as exc:
        print(f"error: [rank {rank}] {exc}", file=sys.stderr, flush=True)
        code = exitcodes.USAGE
    except usage_errors as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        code = getattr(exc, "exit_code", exitcodes.USAGE)
    except KeyboardInterrupt:  # Ctrl-C outside training (which stops with a checkpoint instead)
        print(f"[rank {rank}] interrupted during {what} setup or teardown: nothing more was written",
              file=sys.stderr, flush=True)
        code = exitcodes.INTERRUPTED
    except OSError as exc:  # the environment (a disk, a mount) failed, not the run
        print(f"error: [rank {rank}] {exc}", file=sys.stderr, flush=True)
        code = exitcodes.IO_ERROR
    except Exception as exc:
        code = getattr(exc, "exit_code", None)
        if code is None:
            print(f"[rank {rank}] {what} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            code = exitcodes.FAILED
        else:  # an error that names its own exit code (e.g. data.UnreadableImages): its last line, re-raised by a
            #   DataLoader worker below the worker's traceback, is the message
            lines = [line for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
            print(f"error: [rank {rank}] {lines[-1].removeprefix(f'{type(exc).__name__}: ')}", file=sys.stderr,
                  flush=True)
    except BaseException:
        print(f"[rank {rank}] {what} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        code = exitcodes.FAILED
    if dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        os._exit(code)
    return code


def cleanup() -> None:
    """Destroy the process group if one exists, and make sure its worker threads end now.

    The objects of a finished run (a DDP reducer in a reference cycle, say) can keep the backend alive past
    ``destroy_process_group``, its threads then ending only at interpreter exit; a gloo worker that releases a
    finished collective's tensors there needs the GIL and aborts the process ("terminate called without an active
    exception"), one run in twenty on a loaded machine. Collecting them first lets the backend go, and its threads
    be joined, while the interpreter is fully alive.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op without a process group) and return it."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when the flag is true on at least one (a collective: call on all ranks)."""
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(tensor).item() > 0)


def barrier(env: DistEnv) -> None:
    """Wait for every rank (no-op in a single process)."""
    if env.distributed:
        if env.backend == "nccl":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def share_from_rank0(fn, env: DistEnv | None):
    """Run ``fn`` on rank 0 only and return its result on every rank; a ConfigError it raises is raised on every
    rank (so each can exit cleanly, and only rank 0 needs to print it)."""
    if env is None or not env.distributed:
        return fn()
    result = error = None
    if env.is_main:
        try:
            result = fn()
        except ConfigError as exc:
            error = str(exc)
    result, error = broadcast_object((result, error), env)
    if error is not None:
        raise ConfigError(error)
    return result


def broadcast_object(obj, env: DistEnv, src: int = 0, group=None):
    """Send a picklable object from rank `src` to every rank (over ``group``, a gloo group: no device copy)."""
    if not env.distributed:
        return obj
    box = [obj]
    device = env.device if env.backend == "nccl" and group is None else None
    dist.broadcast_object_list(box, src=src, group=group, device=device)
    return box[0]


def gather_to_rank0(obj, env: DistEnv) -> list | None:
    """Every rank's picklable object, in rank order, on rank 0 (None elsewhere); ``[obj]`` without a process
    group. A collective: call on every rank."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size if env.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def control_group(env: DistEnv):
    """A gloo group for host-side agreement (stop flags, RNG states, checkpoint outcomes): CPU tensors, so it
    never synchronizes a GPU (the world group itself under gloo; None without a process group)."""
    if not env.distributed:
        return None
    return dist.new_group(backend="gloo") if env.backend != "gloo" else dist.group.WORLD


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def _disagreement(rows: list[tuple[dict, dict]]) -> str | None:
    """The first keys (config, then versions) on which a rank differs from rank 0, in one line; None if none."""
    for index, what in ((1, "configuration"), (0, "package versions")):
        reference = _flat(rows[0][index])
        for rank, row in enumerate(rows[1:], 1):
            mine = _flat(row[index])
            keys = sorted(k for k in reference.keys() | mine.keys() if reference.get(k) != mine.get(k))
            if keys:
                shown = ", ".join(f"{k}={mine.get(k)!r} (rank 0: {reference.get(k)!r})" for k in keys[:4])
                return f"ranks disagree on their {what}: rank {rank} has {shown}; every rank must run the same"
    return None


def check_ranks(env: DistEnv, group, config: dict, versions: dict, timeout_s: float) -> list[dict]:
    """Start-up health check (a collective): every rank answers a monitored barrier within ``timeout_s``, an
    all-reduce on the training backend sums to the world size, and every rank runs the same configuration and
    package versions (else ConfigError naming the differing keys, on every rank). Returns the ranks' facts."""
    facts = {"rank": env.rank, "local_rank": env.local_rank, "host": socket.gethostname(), "device": str(env.device),
             "pid": os.getpid()}
    if not env.distributed:
        return [facts]
    try:
        dist.monitored_barrier(group=group, timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as exc:
        raise RuntimeError(f"start-up health check: {str(exc).strip().splitlines()[0][:300]}") from None
    rows: list = [None] * env.world_size
    dist.all_gather_object(rows, (versions, config, facts), group=group)
    ones = torch.ones(1, device=env.device)
    dist.all_reduce(ones)
    if int(ones.item()) != env.world_size:
        raise RuntimeError(f"start-up health check: an all-reduce over {env.backend} gave {ones.item()}, not "
                           f"{env.world_size}")
    problem = _disagreement([(v, c) for v, c, _ in rows])
    if problem:
        raise ConfigError(problem)
    return [f for _, _, f in rows]


def format_ranks(rows: list[dict]) -> str:
    """The ranks as a table (rank, local rank, host, device, pid)."""
    table = [("rank", "local", "host", "device", "pid")]
    table += [(str(r["rank"]), str(r["local_rank"]), r["host"], r["device"], str(r["pid"])) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)  # SIGINT: Ctrl-C (a second one ends at once)


class StopFlag:
    """Records SIGTERM, SIGUSR2 and SIGINT (Ctrl-C; a second one exits at once with 130); ranks agree on stopping
    with a collective at a step boundary.

    With several processes the agreement is pipelined: each step boundary starts an asynchronous all-reduce of
    the local flags (on the CPU gloo control group) and reads the one started a step earlier, so the step never
    waits for a network round trip. Every rank reads the same round, so all stop at the same step, one step
    after the signal's round was sent.
    """

    def __init__(self, announce: bool = True):
        self.signum = 0
        self.interrupted, self.announce = False, announce
        self._previous = {}
        self._pending = None
        self._votes = torch.zeros(1)
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.interrupted:  # a second Ctrl-C: leave now, the last checkpoint intact
            from ddp_resnet import checkpoint

            checkpoint.discard_partial()
            print(f"interrupted again: exiting at once ({exitcodes.INTERRUPTED}); the last good checkpoint is "
                  f"untouched", file=sys.stderr, flush=True)
            os._exit(exitcodes.INTERRUPTED)
        if signum == signal.SIGINT:
            self.interrupted = True
        if signum == signal.SIGINT and self.announce:
            print("interrupt: stopping at the next step boundary with a checkpoint (Ctrl-C again to exit at once)",
                  file=sys.stderr, flush=True)
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
