"""Elastic jobs: torchrun agents with ``--nnodes=1:2`` that lose a node and go on smaller, or gain one and grow.

Two agents on this machine stand for two nodes of 2 processes each (c10d rendezvous on localhost, the first agent
hosting it); steps are slowed by the fault hook (``tests/faults/``) so that a kill or a join lands mid-run.
``data.max_rank_batch=8`` bounds the per-rank batch: the global batch of 32 is 8 per rank x 1 micro-step on 4
processes and 8 x 2 accumulation steps on 2.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, assert_bitwise_equal, child_env, metrics, ok, train_cmd, untimed, weights
from ddp_resnet import build, rundir, trainer
from ddp_resnet import config as config_mod
from ddp_resnet import data as data_mod
from ddp_resnet.config import ConfigError
from ddp_resnet.distributed import LaunchInfo

STEPS_PER_EPOCH = 4  # TINY: 128 images, a global batch of 32
BOUND = "data.max_rank_batch=8"
# fast membership changes: a 2 s last call for late nodes, dead nodes dropped after 3 missed 1 s heartbeats
RDZV_CONF = "join_timeout=90,last_call_timeout=2,close_timeout=10,keep_alive_interval=1,keep_alive_max_attempt=3"
# torch 2.14's agents share the rendezvous store with their workers by default, and a node that joins a running
# job then waits for a store address that is only published in the first round: every elastic agent sets this
ELASTIC_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


# ----------------------------------------------------------------------------------------------- max_rank_batch
def _cfg(*overrides: str) -> config_mod.Config:
    return config_mod.load(None, list(overrides))


def test_a_bound_per_rank_batch_raises_the_accumulation_as_the_world_shrinks():
    cfg = _cfg("data.batch_size=128", "data.max_rank_batch=32")
    assert [(w, build.accumulation(cfg, w), build.micro_batch(cfg, w)) for w in (1, 2, 4, 8)] == [
        (1, 4, 32), (2, 2, 32), (4, 1, 32), (8, 1, 16)]
    assert build.accumulation(_cfg("data.batch_size=96", "data.max_rank_batch=16"), 4) == 2  # 24 > 16: 12 x 2
    assert build.accumulation(_cfg("data.batch_size=96", "data.max_rank_batch=16", "optim.accum_steps=3"), 4) == 3
    assert build.accumulation(_cfg("data.batch_size=128", "optim.accum_steps=2"), 2) == 2  # no bound: as configured


def test_the_steps_per_epoch_and_every_loader_agree_at_each_world_size():
    cfg = _cfg(*TINY, "data.synthetic_train_size=200", "data.batch_size=32", BOUND)
    info = data_mod.describe(cfg.data)
    for world in (1, 2, 4):
        accum = build.accumulation(cfg, world)
        micro = build.micro_batch(cfg, world)
        loader = data_mod.build_train_loader(cfg.data, info, 0, world, "cpu", 0, micro_batch=micro)
        assert build.steps_per_epoch(cfg, info, world) == len(loader) // accum == 200 // 32, world


@pytest.mark.parametrize("overrides, world, message", [
    (("data.batch_size=128", "data.max_rank_batch=32"), 3,
     "data.max_rank_batch: global batch 128 on world size 3 cannot be split into micro-batches of at most 32 images "
     "per rank"),
    (("data.batch_size=128",), 3, "data.batch_size: global batch 128 is not divisible by world size 3"),
    (("data.batch_size=128", "data.max_rank_batch=32", "dist.static_graph=true"), 2,
     "dist.static_graph: DDP's static graph breaks under no_sync, and world size 2 accumulates 2 micro-steps"),
])
def test_a_world_size_the_batch_cannot_be_split_over_is_refused_in_planning(tmp_path, overrides, world, message):
    cfg = _cfg(f"output_dir={tmp_path / 'run'}", "train.device=cpu", *overrides)
    with pytest.raises(ConfigError) as refused:
        trainer.plan_run(cfg, LaunchInfo(world_size=world, launcher="torchrun"))
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)
    assert not (tmp_path / "run").exists()


def test_world_size_records_are_kept_apart_from_the_epochs_and_dropped_when_their_steps_are_trained_again(tmp_path):
    epochs = [{"epoch": e, "step": 4 * (e + 1), "train_loss": 1.0} for e in range(3)]
    events = [{"event": "world_size", "from": 4, "to": 2, "step": 4}, {"event": "world_size", "from": 2, "to": 4,
                                                                        "step": 8}]
    rows = [epochs[0], events[0], epochs[1], events[1], epochs[2]]
    (tmp_path / rundir.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert rundir.read_metrics(tmp_path) == epochs and rundir.read_events(tmp_path) == events
    rundir.MetricsWriter(tmp_path, True, 8, 4).close()  # resumed at step 8: epochs 0 and 1 kept, the change at 4
    assert rundir.read_metrics(tmp_path) == epochs[:2] and rundir.read_events(tmp_path) == events[:1]


# ----------------------------------------------------------------------------------------------- the launcher
def _launch(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**child_env(), "NPROC": "2", "TORCHRUN": "echo", **env}
    return subprocess.run(["bash", str(REPO / "launch/elastic.sh"), *args], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=30)


def test_the_elastic_launcher_passes_the_node_range_and_endpoint_to_torchrun():
    proc = ok(_launch("--endpoint=node01:29500", "--nnodes=2:4", "output_dir=runs/a b", "ckpt.every_steps=100"))
    assert proc.stdout.split("-m ddp_resnet.train")[0].split() == [
        "--nnodes=2:4", "--nproc-per-node=2", "--max-restarts=10", "--rdzv-backend=c10d",
        "--rdzv-endpoint=node01:29500", "--rdzv-id=ddp_resnet"]
    assert proc.stdout.rstrip().endswith("output_dir=runs/a b ckpt.every_steps=100") and not proc.stderr
    from_env = ok(_launch("train.epochs=1", RDZV_ENDPOINT="[::1]:29400", NNODES="1:2", RDZV_CONF="last_call_timeout=5"))
    assert "--rdzv-endpoint=[::1]:29400" in from_env.stdout and "--rdzv-conf=last_call_timeout=5" in from_env.stdout
    assert "no ckpt.every_steps given" in from_env.stderr


@pytest.mark.parametrize("args, env, message", [
    ((), {}, "set the rendezvous endpoint"),
    (("--endpoint=node01",), {}, "endpoint 'node01' is not HOST:PORT"),
    (("--endpoint=node01:70000", "--nnodes=1:2"), {}, "endpoint port 70000 is outside 1-65535"),
    (("--endpoint=node01:29500",), {}, "set the node range"),
    (("--endpoint=node01:29500", "--nnodes=4:2"), {}, "nnodes 4:2: need 1 <= MIN <= MAX"),
    (("--endpoint=node01:29500", "--nnodes=2"), {}, "nnodes '2' is not MIN:MAX"),
    (("--endpoint=node01:29500", "--nnodes=1:2"), {"RDZV_CONF": "a=1;b"}, "RDZV_CONF 'a=1;b' is not key=value"),
    (("--endpoint=node01:29500", "--nnodes=1:2"), {"MAX_RESTARTS": "-1"}, "MAX_RESTARTS '-1' is not a whole"),
])
def test_the_elastic_launcher_refuses_bad_input_in_one_line(args, env, message):
    proc = _launch(*args, **env)
    assert proc.returncode == 2 and not proc.stdout
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"elastic.sh: {message}"), proc.stderr


# ----------------------------------------------------------------------------------------------- two agents
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def elastic_ok():
    """Skip where torchrun's c10d rendezvous cannot run: no gloo, no localhost sockets, no /proc to find workers."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    if not Path("/proc/self/stat").is_file():
        pytest.skip("needs /proc to find an agent's workers")
    try:
        _free_port()
    except OSError as exc:
        pytest.skip(f"cannot bind a localhost port for the rendezvous: {exc}")


def _agent(port: int, out: Path, log: Path, *overrides: str, delay_s: float, host: bool) -> subprocess.Popen:
    """One elastic torchrun agent (a node of 2 CPU processes), in its own session, its output in ``log``; ``host``:
    it serves the rendezvous store (the node that must stay)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc-per-node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=elastic{port}", "--max-restarts=3",
           "--monitor-interval=0.5", f"--rdzv-conf={RDZV_CONF},is_host={int(host)}", "-m", "ddp_resnet.train",
           *TINY, BOUND, "train.log_every=1", "ckpt.keep=100", "dist.timeout_s=30", f"output_dir={out}", *overrides]
    env = child_env({**ELASTIC_ENV, "DDP_RESNET_TEST_STEP_DELAY_S": str(delay_s)})
    with open(log, "w") as sink:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)


def _wait_for(condition, agents: list[subprocess.Popen], what: str, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        assert all(a.poll() is None for a in agents), f"an agent exited while waiting for {what}"
        time.sleep(0.1)


def _step(out: Path) -> int:
    """The newest step in steps.jsonl (0 before the first)."""
    records = rundir.read_jsonl(out / rundir.STEPS, skip_bad=True)
    return records[-1]["step"] if records else 0


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _lose_node(agent: subprocess.Popen) -> None:
    """What a node loss does: the agent and every worker die at once (SIGKILL), none of them can checkpoint."""
    workers = _children(agent.pid)
    assert len(workers) == 2, workers
    for pid in [*workers, agent.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # each worker leads its own session (torchrun starts them so)


def _kill(agents: list[subprocess.Popen]) -> None:
    """Leave nothing running: every agent still alive and its workers (those of an agent that ended were sent
    SIGTERM by the kernel when it did: the trainer asks for that)."""
    for agent in agents:
        if agent.poll() is None:
            for pid in [*_children(agent.pid), agent.pid]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            agent.wait()


def _finish(agents: list[subprocess.Popen], timeout_s: float = 180) -> list[int]:
    """The agents' exit codes, once all have ended."""
    try:
        return [a.wait(timeout=timeout_s) for a in agents]
    finally:
        _kill(agents)


def _logs(*paths: Path) -> str:
    return "\n".join(f"--- {p.name}:\n{p.read_text()[-3000:]}" for p in paths if p.is_file())


def _without_time(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "time"}


@pytest.mark.slow
def test_losing_a_node_the_job_goes_on_at_two_processes_to_the_end_as_a_plain_resume_would(tmp_path, elastic_ok):
    out, port, total = tmp_path / "elastic", _free_port(), 6 * STEPS_PER_EPOCH
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    agents = []
    try:  # both at once, so that both join the first round (the host's within its 2 s last call)
        agents += [_agent(port, out, log, "train.epochs=6", delay_s=0.2, host=i == 0) for i, log in enumerate(logs)]
        _wait_for(lambda: _step(out) >= 6, agents, "4 processes training into the second epoch")
        _lose_node(agents[1])
        lost = time.time()
        codes = _finish(agents)
    except BaseException:
        _kill(agents)
        raise
    ended = time.time() - lost
    assert codes[0] == 0 and codes[1] == -signal.SIGKILL, (codes, _logs(*logs))
    changes = rundir.read_events(out)  # (a loaded machine may start the second agent late: 2 -> 4 at first)
    assert changes and all(c["to"] == 4 for c in changes[:-1]), (changes, _logs(*logs))
    change = changes[-1]
    resumed = change["step"]  # the newest checkpoint when the node was lost: the end of the first epoch
    assert _without_time(change) == {"event": "world_size", "from": 4, "to": 2, "step": resumed, "accum": 2,
                                     "micro_batch": 8, "from_accum": 1, "from_micro_batch": 8}, change
    assert resumed > 0 and resumed % STEPS_PER_EPOCH == 0, change
    text = logs[0].read_text()
    assert (f"world size 4 -> 2 at step {resumed}, 8 images per rank per micro-step x 2 accumulation step(s) "
            f"(was 8 x 1); global batch 32") in text
    assert torch.load(out / "checkpoints/last.pt", weights_only=True)["step"] == total
    assert [r["epoch"] for r in metrics(out)] == list(range(6))  # every epoch once: none lost, none repeated
    # the same checkpoint resumed by a plain 2-process torchrun into a fresh directory: the same run, bit for bit
    start = tmp_path / "start.pt"
    shutil.copy(out / f"checkpoints/epoch_{resumed // STEPS_PER_EPOCH - 1:04d}.pt", start)
    assert torch.load(start, weights_only=True)["step"] == resumed
    plain = tmp_path / "plain"
    ok(subprocess.run(train_cmd(2) + [*TINY, BOUND, "train.log_every=1", "ckpt.keep=100", "dist.timeout_s=30",
                                      "train.epochs=6", f"output_dir={plain}", f"ckpt.resume={start}"],
                      cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=180))
    assert_bitwise_equal(weights(out / "checkpoints/last.pt"), weights(plain / "checkpoints/last.pt"))
    after = [untimed(r) for r in metrics(out) if r["step"] > resumed]
    assert after == [untimed(r) for r in metrics(plain)]
    assert [_without_time(r) for r in rundir.read_events(plain)] == [_without_time(change)]
    print(f"node lost at step ~6, resumed at step {resumed} on 2 processes, done {ended:.0f} s later")


@pytest.mark.slow
def test_a_node_joining_a_job_that_runs_alone_grows_it_to_four_processes_at_the_next_restart(tmp_path, elastic_ok):
    out, port, total = tmp_path / "elastic", _free_port(), 12 * STEPS_PER_EPOCH
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    agents = [_agent(port, out, logs[0], "train.epochs=12", delay_s=0.25, host=True)]
    try:
        _wait_for(lambda: _step(out) >= 1, agents, "the first node training alone")
        joined, step_at_join = time.time(), _step(out)
        agents.append(_agent(port, out, logs[1], "train.epochs=12", delay_s=0.25, host=False))
        codes = _finish(agents)
    except BaseException:
        _kill(agents)
        raise
    ended = time.time() - joined
    assert codes == [0, 0], (codes, _logs(*logs))
    changes = rundir.read_events(out)
    assert len(changes) == 1, (changes, _logs(*logs))
    change = changes[0]
    grown = change["step"]  # where the running node stopped with a checkpoint when it saw the new one waiting
    assert _without_time(change) == {"event": "world_size", "from": 2, "to": 4, "step": grown, "accum": 1,
                                     "micro_batch": 8, "from_accum": 2, "from_micro_batch": 8}, change
    assert step_at_join <= grown < total, (step_at_join, change)
    text = logs[0].read_text()
    assert f"stop signal: checkpoint written at step {grown}; exiting with 75" in text
    assert f"world size 2 -> 4 at step {grown}" in text and "4 ranks (torchrun, gloo)" in text
    assert torch.load(out / "checkpoints/last.pt", weights_only=True)["step"] == total
    assert [r["epoch"] for r in metrics(out)] == list(range(12))
    steps = [r["step"] for r in rundir.read_jsonl(out / rundir.STEPS)]
    assert steps == list(range(1, total + 1))  # every step logged once, the run's full count
    print(f"node joined at step {step_at_join}, grown at step {grown}, done {ended:.0f} s later")
