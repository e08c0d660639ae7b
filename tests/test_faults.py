"""Faults a real cluster throws: non-finite losses, unwritable or full disks, hung ranks, several nodes."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import (
    REPO,
    TINY,
    assert_bitwise_equal,
    assert_parts,
    child_env,
    metrics,
    ok,
    run_train,
    train_cmd,
    untimed,
    weights,
)
from ddp_resnet import rundir

NAN_ON_RANK1_AT_STEP5 = {"DDP_RESNET_TEST_NAN_AT": "1:5"}


# ----------------------------------------------------------------------------------------------- non-finite
def test_a_nan_on_one_rank_stops_every_rank_at_once_without_touching_the_last_good_checkpoint(tmp_path):
    """ckpt.every_steps=1: a checkpoint after every step, so the one before the NaN step is step 5's state."""
    bad, before = tmp_path / "bad", tmp_path / "before"
    proc = run_train(bad, "ckpt.every_steps=1", nproc=2, env=NAN_ON_RANK1_AT_STEP5)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr  # printed once (rank 0), for both ranks
    assert_parts(errors[0], "non-finite", "at step 5", "rank 1", "loss nan", "stopped at step 6",
                 "without writing a checkpoint", f"{bad}/checkpoints/last.pt (step 5)")
    assert "exitcode  : 65" in proc.stderr and "training failed" not in proc.stderr  # the non-finite code, no crash
    ok(run_train(before, "ckpt.every_steps=1", "train.run_steps=5", nproc=2))
    assert_bitwise_equal(weights(bad / "checkpoints/last.pt"), weights(before / "checkpoints/last.pt"))
    assert not (bad / "checkpoints/epoch_0001.pt").exists()  # the NaN epoch never ended
    assert all(r["loss"] is not None for r in rundir.read_jsonl(bad / rundir.STEPS))


def test_a_single_process_run_exits_65_and_names_the_step(tmp_path):
    proc = run_train(tmp_path / "one", "optim.clip_grad_norm=1.0", env={"DDP_RESNET_TEST_NAN_AT": "0:2"})
    assert proc.returncode == 65, proc.stderr
    assert "error: non-finite training at step 2 (epoch 1, rank 0)" in proc.stderr
    assert "no checkpoint was written yet" in proc.stderr
    assert not list((tmp_path / "one" / "checkpoints").iterdir())
    assert not (tmp_path / "one" / "metrics.jsonl").read_text()


SKIP = ["train.nonfinite=skip", "optim.ema_decay=0.9", "train.epochs=3"]


def test_skip_gives_the_weights_of_a_run_whose_bad_update_never_happened(tmp_path):
    skipped, undone = tmp_path / "skipped", tmp_path / "undone"
    proc = ok(run_train(skipped, *SKIP, nproc=2, env=NAN_ON_RANK1_AT_STEP5))
    assert ("warning: non-finite training at step 5 (epoch 2): loss on rank 0" in proc.stdout
            and "update skipped on every rank (1 of at most 10)" in proc.stdout)
    ok(run_train(undone, *SKIP, nproc=2, env={"DDP_RESNET_TEST_UNDO_AT": "5"}))
    a, b = (weights(d / "checkpoints/last.pt") for d in (skipped, undone))
    assert_bitwise_equal(a, b)  # weights and BatchNorm buffers
    assert_bitwise_equal(*(rundir_ema(d) for d in (skipped, undone)))
    assert metrics(skipped)[-1]["skipped_steps"] == 1


def rundir_ema(out):
    import torch

    return torch.load(out / "checkpoints/last.pt", map_location="cpu", weights_only=True)["ema"]


def test_resume_after_a_skipped_step_is_exact(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    ok(run_train(whole, *SKIP, env={"DDP_RESNET_TEST_NAN_AT": "0:5"}))
    ok(run_train(parts, *SKIP, "train.run_steps=7", env={"DDP_RESNET_TEST_NAN_AT": "0:5"}))
    ok(run_train(parts, *SKIP))
    assert_bitwise_equal(weights(whole / "checkpoints/last.pt"), weights(parts / "checkpoints/last.pt"))
    assert metrics(parts)[-1]["skipped_steps"] == 1


def test_more_skipped_steps_than_allowed_stops_the_run(tmp_path):
    proc = run_train(tmp_path / "many", "train.nonfinite=skip", "train.max_skipped_steps=0",
                     env={"DDP_RESNET_TEST_NAN_AT": "0:2"})
    assert proc.returncode == 65
    assert "more than train.max_skipped_steps=0 steps skipped" in proc.stderr


@pytest.mark.parametrize("override, message", [
    ("train.nonfinite=ignore", "train.nonfinite: unknown value 'ignore'; valid choices: stop, skip"),
    ("train.max_skipped_steps=-1", "train.max_skipped_steps: must be >= 0"),
])
def test_bad_nonfinite_settings_are_refused(tmp_path, override, message):
    proc = run_train(tmp_path / "bad", override)
    assert proc.returncode == 2 and message in proc.stderr


# ----------------------------------------------------------------------------------------------- the environment
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small or read-only tmpfs needs root")


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs mounted at path for the test (unmounted after)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@needs_root
@pytest.mark.parametrize("where, message", [
    ("readonly/run", "is not writable: {root}/readonly/run: Read-only file system"),
    ("readonly/missing/run", "is not writable: {root}/readonly/missing: Read-only file system"),
    ("afile/run", "{root}/afile is a file, not a directory"),
])
def test_an_output_dir_that_cannot_be_written_fails_in_one_line_before_anything_starts(tmp_path, where, message):
    (tmp_path / "afile").write_text("not a directory")
    with tmpfs(tmp_path / "readonly", "ro,size=1m"):
        start = time.time()
        proc = run_train(tmp_path / where, nproc=2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: output_dir "), proc.stderr  # once, not per rank
    assert message.format(root=tmp_path) in errors[0], errors[0]
    assert "exitcode  : 2" in proc.stderr
    assert "training failed" not in proc.stderr
    assert "ranks (torchrun" not in proc.stdout  # no process group was formed
    assert time.time() - start < 60


@needs_root
@pytest.mark.parametrize("nproc", [1, 2])
def test_a_full_disk_during_a_checkpoint_ends_every_rank_in_one_line_and_keeps_the_previous_one(tmp_path, nproc):
    probe = tmp_path / "probe"
    ok(run_train(probe, "train.run_steps=1", "ckpt.keep=0"))
    size = (probe / "checkpoints/last.pt").stat().st_size
    with tmpfs(tmp_path / "small", f"size={int(size * 1.6) // 1024}k") as disk:
        out = disk / "run"
        start = time.time()
        proc = run_train(out, "ckpt.every_steps=1", "ckpt.keep=0", nproc=nproc)
        elapsed = time.time() - start
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        leftovers = sorted(p.name for p in (out / "checkpoints").iterdir())
        step = torch.load(out / "checkpoints/last.pt", weights_only=True)["step"]
    assert len(errors) == 1, proc.stderr
    assert_parts(errors[0], f"{out}/checkpoints/last.pt", "No space left on device",
                 f"previous checkpoint {out}/checkpoints/last.pt (step 1) is intact")
    if nproc == 1:
        assert proc.returncode == 74 and one_error_line(proc) == errors[0]
    else:
        assert proc.returncode != 0 and "exitcode  : 74" in proc.stderr  # torchrun's summary of each rank
    assert "training failed" not in proc.stderr  # no rank crashed
    assert leftovers == ["last.pt"] and step == 1  # the temporary file is gone, the good checkpoint loads
    assert elapsed < 60


def test_errors_that_every_rank_meets_are_printed_once_and_a_ranks_own_by_it(capsys):
    from ddp_resnet import distributed
    from ddp_resnet.config import ConfigError, RankError
    from ddp_resnet.data.imagefolder import UnreadableImages

    def fail(exc):
        def work():
            raise exc
        return work

    assert distributed.guarded(fail(ConfigError("bad key")), 1, "training", (ConfigError,)) == 2
    assert distributed.guarded(fail(RankError("local rank 3 has no GPU")), 3, "training", (ConfigError,)) == 2
    assert distributed.guarded(fail(OSError(28, "No space left on device", "/x")), 0, "training", ()) == 74
    assert distributed.guarded(fail(ConfigError("bad key")), 0, "training", (ConfigError,)) == 2
    worker = UnreadableImages("Caught UnreadableImages in DataLoader worker process 0.\nOriginal Traceback (most "
                              "recent call last):\n  File \"x.py\", line 1\nUnreadableImages: not one of 1000 "
                              "consecutive samples from a.jpg could be read\n")
    assert distributed.guarded(fail(worker), 1, "training", (ConfigError,)) == 76
    assert distributed.guarded(fail(RuntimeError("a bug")), 0, "training", (ConfigError,)) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[:4] == ["error: [rank 3] local rank 3 has no GPU",
                       "error: [rank 0] [Errno 28] No space left on device: '/x'", "error: bad key",
                       "error: [rank 1] not one of 1000 consecutive samples from a.jpg could be read"]
    assert err[4] == "[rank 0] training failed:" and "RuntimeError: a bug" in err[5:]


def test_a_config_error_under_torchrun_is_printed_once(tmp_path):
    proc = run_train(tmp_path / "bad", "optim.lrr=1", nproc=2)
    assert proc.stderr.count("error: unknown config key 'optim.lrr'") == 1


# ----------------------------------------------------------------------------------------------- start-up
def _srun_like(tmp_path, overrides_per_rank: list[list[str]], out: Path) -> list:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank, overrides in enumerate(overrides_per_rank):
        env = child_env({"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_STEP_NUM_TASKS": "2",
                         "SLURM_NODEID": "0", "SLURM_STEP_NODELIST": "localhost", "SLURM_JOB_ID": "4243",
                         "SLURM_STEP_TASKS_PER_NODE": "2", "MASTER_PORT": str(port)})
        procs.append(subprocess.Popen([sys.executable, "-m", "ddp_resnet.train", *TINY, f"output_dir={out}",
                                       "train.epochs=1", *overrides], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return [(p, *p.communicate(timeout=180)) for p in procs]


def test_ranks_with_different_configs_refuse_to_start_naming_the_key(tmp_path):
    results = _srun_like(tmp_path, [["optim.lr=0.1"], ["optim.lr=0.2"]], tmp_path / "run")
    assert [p.returncode for p, _, _ in results] == [2, 2]
    assert_parts(results[0][2].strip(), "ranks disagree", "rank 1", "optim.lr=0.2", "(rank 0: 0.1)")
    assert len(results[0][2].strip().splitlines()) == 1
    assert results[1][2].strip() == ""
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_two_rank_run_prints_its_ranks_once(tmp_path):
    proc = ok(run_train(tmp_path / "run", "train.epochs=1", nproc=2))
    assert "2 ranks (torchrun, gloo), start-up health check passed in" in proc.stdout
    assert proc.stdout.count("start-up health check passed") == 1  # rank 0 only
    assert sum(line.split() == ["rank", "local", "host", "device", "pid"] for line in proc.stdout.splitlines()) == 1
    table = proc.stdout.split("health check passed in", 1)[1].splitlines()[1:4]
    assert table[0].split() == ["rank", "local", "host", "device", "pid"]
    assert [row.split()[0] for row in table[1:]] == ["0", "1"] and all("cpu" in row for row in table[1:])


# ----------------------------------------------------------------------------------------------- hung ranks
def test_a_stopped_rank_ends_the_job_within_the_timeout_and_the_others_say_where_they_waited(tmp_path):
    timeout_s = 10
    cmd = train_cmd(2) + [*TINY, f"output_dir={tmp_path / 'hang'}", "train.epochs=100", "train.log_every=1",
                          f"dist.timeout_s={timeout_s}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env({"DDP_RESNET_TEST_STEP_DELAY_S": "0.1"}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids, seen = {}, []
    try:
        for line in proc.stdout:  # the rank table, then a few steps
            seen.append(line)
            fields = line.split()
            if len(fields) == 5 and fields[0] in ("0", "1") and fields[4].isdigit():
                pids[int(fields[0])] = int(fields[4])
            if "(run 3/" in line:
                break
        assert set(pids) == {0, 1}, "".join(seen)
        os.kill(pids[1], signal.SIGSTOP)
        stalled = time.time()
        _, stderr = proc.communicate(timeout=timeout_s + 90)
        ended = time.time() - stalled
    finally:
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
    assert proc.returncode != 0
    message = [line for line in stderr.splitlines() if "no progress for" in line]
    assert len(message) == 1, stderr
    assert message[0].startswith(f"error: [rank 0] no progress for {timeout_s} s at step "), message
    assert "waiting in the " in message[0] and "a peer rank may be stopped, dead or deadlocked" in message[0]
    assert "most recent call first" in stderr and 'File "' in stderr  # faulthandler's stacks of every thread
    assert "exitcode  : 70" in stderr
    assert ended < timeout_s + 45, ended  # the survivor after timeout_s; torchrun then kills the stopped rank


# ----------------------------------------------------------------------------------------------- several nodes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nodes(out: Path, *overrides: str, env: dict | None = None) -> list[subprocess.Popen]:
    """Two torchrun agents on this machine as two nodes of 2 processes each (c10d rendezvous on localhost); the
    first one starts a second ahead, so it hosts the rendezvous store."""
    port, agents = _free_port(), []
    for _ in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2",
               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=test{port}",
               "-m", "ddp_resnet.train", *TINY, f"output_dir={out}", *overrides]
        agents.append(subprocess.Popen(cmd, cwd=REPO, env=child_env(env), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True))
        time.sleep(1.0)
    return agents


@pytest.fixture(scope="module")
def four_processes(tmp_path_factory) -> Path:
    """An uninterrupted run of 4 processes on one node (4 steps per epoch, 8 in all)."""
    out = tmp_path_factory.mktemp("four") / "single"
    ok(run_train(out, nproc=4))
    return out


def test_two_torchrun_nodes_train_the_weights_of_one_four_process_node(tmp_path, four_processes):
    nodes = tmp_path / "nodes"
    results = [(a, *a.communicate(timeout=300)) for a in _nodes(nodes)]
    assert [a.returncode for a, _, _ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    assert "4 ranks (torchrun, gloo)" in results[0][1] + results[1][1]
    assert_bitwise_equal(weights(nodes / "checkpoints/last.pt"), weights(four_processes / "checkpoints/last.pt"))
    assert metrics(nodes)[-1]["test_acc"] == metrics(four_processes)[-1]["test_acc"]


def test_four_ranks_resumed_mid_epoch_end_bitwise_where_the_uninterrupted_run_does(tmp_path, four_processes):
    """With three or more ranks a gradient's all-reduced sum depends on DDP's bucket layout, which DDP changes
    after its first backward: the resumed processes must reduce their first step as the uninterrupted run did."""
    out = tmp_path / "resumed"
    crashed = run_train(out, "ckpt.every_steps=5", nproc=4, env={"DDP_RESNET_TEST_FAIL_AT": "0:6"})
    assert crashed.returncode != 0 and torch.load(out / "checkpoints/last.pt", weights_only=True)["step"] == 5
    resumed = ok(run_train(out, "ckpt.every_steps=5", nproc=4))
    assert "step 5/8 (epoch 1, step 1 of it)" in resumed.stdout, resumed.stdout
    assert_bitwise_equal(weights(out / "checkpoints/last.pt"), weights(four_processes / "checkpoints/last.pt"))
    assert [untimed(r) for r in metrics(out)] == [untimed(r) for r in metrics(four_processes)]


def test_killing_one_nodes_agent_ends_the_other_within_the_timeout(tmp_path):
    """The killed agent's workers get SIGTERM from the kernel (they die with their launcher): every rank stops
    with a checkpoint and the surviving node's agent exits, instead of waiting for the dead node."""
    timeout_s, out = 20, tmp_path / "nodes"
    agents = _nodes(out, "train.epochs=200", f"dist.timeout_s={timeout_s}", env={"DDP_RESNET_TEST_STEP_DELAY_S": "0.1"})
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").is_file() or not metrics(out):  # an epoch done: training is under way
            assert time.time() < deadline and agents[0].poll() is None, "the two nodes did not start training"
            time.sleep(0.5)
        agents[1].kill()
        killed = time.time()
        stdout, stderr = agents[0].communicate(timeout=timeout_s + 60)
        ended = time.time() - killed
    finally:
        for agent in agents:
            agent.kill()
    assert agents[0].returncode != 0 and ended < timeout_s + 10, (ended, stderr[-2000:])
    assert "stop signal: checkpoint written" in stdout
    assert torch.load(out / "checkpoints/last.pt", weights_only=True)["step"] > 0
    orphans = subprocess.run(["pgrep", "-f", f"output_dir={out}"], capture_output=True, text=True).stdout.split()
    assert not orphans, f"workers outlived their agents: {orphans}"
