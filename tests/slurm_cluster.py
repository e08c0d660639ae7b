"""A local SLURM cluster for the `slurm` integration tests, and small helpers to drive jobs.

``ensure_cluster()`` returns None when a usable cluster is up, starting one with ``.ci/slurm_setup.sh``
(root only) when none answers; otherwise it returns the reason, which the tests turn into a skip.
``two_nodes_reason()`` does the same for the partition ``twonode``: two slurmd daemons, each in its own network
namespace with its own host name (node1, node2), for multi-node jobs.

    python tests/slurm_cluster.py          # start (or check) the cluster, print its state
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / ".ci" / "slurm_setup.sh"
USABLE = {"idle", "mixed", "allocated", "completing"}
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)


def node_states() -> list[str]:
    """States of the cluster's nodes (empty when sinfo is missing or the controller does not answer)."""
    if not shutil.which("sinfo"):
        return []
    try:
        res = _run(["sinfo", "-h", "-o", "%T"], timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    return [s.strip().rstrip("*~#!%$@^-") for s in res.stdout.split()] if res.returncode == 0 else []


def cluster_running() -> bool:
    """True when the controller answers and at least one node can run jobs."""
    return any(s in USABLE for s in node_states()) and bool(shutil.which("sbatch"))


_REASON: list = []  # memo: the reason of the first failed start (None once started)


def ensure_cluster(timeout_s: float = 600) -> str | None:
    """None when a cluster is usable (started here if needed); else why it cannot be started."""
    if cluster_running():
        return None
    if _REASON:
        return _REASON[0]
    reason = None
    if os.geteuid() != 0:
        reason = "no SLURM cluster running, and starting one needs root (run .ci/slurm_setup.sh)"
    elif not SETUP.is_file():
        reason = f"no SLURM cluster running and {SETUP} is missing"
    else:
        try:
            res = subprocess.run(["bash", str(SETUP)], check=False, capture_output=True, text=True, timeout=timeout_s)
            if res.returncode != 0:
                lines = (res.stderr.strip() or res.stdout.strip() or "failed").splitlines()
                reason = f"cannot start SLURM: {lines[-1]}"
        except (OSError, subprocess.SubprocessError) as exc:
            reason = f"cannot start SLURM: {exc}"
        if reason is None and not cluster_running():
            reason = "SLURM was started but no node is usable"
    _REASON.append(reason)
    return reason


TWO_NODES = "twonode"


def partition_states(partition: str) -> list[str]:
    """States of one partition's nodes (empty when the partition does not exist or sinfo fails)."""
    try:
        res = _run(["sinfo", "-h", "-N", "-p", partition, "-o", "%T"], timeout=20)  # a line per node
    except (OSError, subprocess.SubprocessError):
        return []
    return [s.strip().rstrip("*~#!%$@^-") for s in res.stdout.split()] if res.returncode == 0 else []


def two_nodes_reason(timeout_s: float = 600) -> str | None:
    """None when the two-node partition can run jobs; else why not. Reruns the (idempotent) setup script once
    when the partition is missing, e.g. under a cluster started by an older one-node configuration."""
    why = ensure_cluster(timeout_s)
    if why:
        return why
    states = partition_states(TWO_NODES)
    if not states and os.geteuid() == 0 and SETUP.is_file():
        try:
            subprocess.run(["bash", str(SETUP)], check=False, capture_output=True, text=True, timeout=timeout_s)
        except (OSError, subprocess.SubprocessError):
            pass
        states = partition_states(TWO_NODES)
    if not states:
        return (f"no partition {TWO_NODES!r}: .ci/slurm_setup.sh could not make the network namespaces "
                "for node1/node2 (see its output)")
    if len(states) < 2 or not all(s in USABLE for s in states):
        return f"partition {TWO_NODES!r} is not usable: node states {states} (see /var/log/slurm/slurmd.node*.log)"
    return None


def job_fields(job_id: str) -> dict:
    """`scontrol show job -o` fields of a job ({} if unknown)."""
    try:
        res = _run(["scontrol", "show", "job", "-o", str(job_id)])
    except (OSError, subprocess.SubprocessError):
        return {}
    if res.returncode != 0 or not res.stdout.strip():
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", res.stdout.strip().splitlines()[0]))


def job_state(job_id: str) -> str:
    return job_fields(job_id).get("JobState", "UNKNOWN")


def wait_job(job_id: str, timeout_s: float = 240, poll_s: float = 1.0) -> str:
    """Wait until the job is in a terminal state; return it (or the last state seen at the timeout)."""
    deadline = time.time() + timeout_s
    state = "UNKNOWN"
    while time.time() < deadline:
        state = job_state(job_id)
        if state in TERMINAL:
            return state
        time.sleep(poll_s)
    return state


def wait_for(predicate, timeout_s: float = 120, poll_s: float = 0.2) -> bool:
    """Poll predicate() until it is true (True) or the timeout passes (False)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return bool(predicate())


def cancel(job_id: str) -> None:
    """Cancel a job (cleanup after a failed test); ignores errors."""
    try:
        _run(["scancel", str(job_id)])
    except (OSError, subprocess.SubprocessError):
        pass


def launcher(args: list[str], env: dict | None = None, timeout_s: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m ddp_resnet.slurm ARGS` from the repository root (as a user would)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    paths = [p for p in full_env.get("PYTHONPATH", "").split(os.pathsep) if p]
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests" / "faults"), *paths])
    return subprocess.run([sys.executable, "-m", "ddp_resnet.slurm", *args], cwd=ROOT, env=full_env,
                          check=False, capture_output=True, text=True, timeout=timeout_s)


def job_ids(stdout: str) -> list[str]:
    """Job ids printed by the launcher ('job id: N', or the first column of the sweep table)."""
    single = re.findall(r"^job id:\s+(\S+)", stdout, flags=re.MULTILINE)
    if single:
        return single
    return list(dict.fromkeys(re.findall(r"^(\d+(?:_\d+)?) {2,}\S", stdout, flags=re.MULTILINE)))


if __name__ == "__main__":
    why = ensure_cluster()
    print(why or f"SLURM cluster up: nodes {', '.join(node_states())}")
    sys.exit(1 if why else 0)
