"""The SLURM launcher against a real (local, one-node) SLURM cluster.

The cluster is started with .ci/slurm_setup.sh when none is running (tests/slurm_cluster.py); the tests skip
only when that is impossible. Jobs are tiny: ResNet-20 on 256 synthetic 32 px images, gloo on CPU.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

try:
    import slurm_cluster as sc
except ImportError:  # tests/ imported as a package
    from tests import slurm_cluster as sc

pytestmark = pytest.mark.slurm

TINY = [
    "model.name=resnet20", "data.dataset=synthetic", "data.synthetic_train_size=256", "data.synthetic_test_size=64",
    "data.synthetic_image_size=32", "data.batch_size=32", "data.workers=0", "train.log_every=1000",
    "optim.warmup_epochs=0", "dist.timeout_s=300",
]
CPU_JOB = ["--gpus-per-node", "0", "--tasks-per-node", "2", "--time", "60"]
METRIC_KEYS = {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_time_s", "img_per_s"}
EPOCHS = 4  # 8 steps per epoch at world size 2


@pytest.fixture(scope="module", autouse=True)
def cluster():
    why = sc.ensure_cluster()
    if why:
        pytest.skip(why)


def launch(*args, env=None, timeout_s=600):
    res = sc.launcher(["--config", "configs/cpu_smoke.yaml", *TINY, *args], env=env, timeout_s=timeout_s)
    assert "Traceback" not in res.stderr, res.stderr
    return res


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def weights(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


def logs(out: Path, job_id: str, task: int = 0) -> str:
    folder = out / "slurm"
    return "".join((folder / f"{job_id}_{task}_log.{ext}").read_text() for ext in ("out", "err")
                   if (folder / f"{job_id}_{task}_log.{ext}").is_file())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-task gloo job, submitted with the command and waited for (--wait)."""
    out = tmp_path_factory.mktemp("slurm") / "reference"
    start = time.time()
    res = launch(f"output_dir={out}", f"train.epochs={EPOCHS}", *CPU_JOB, "--wait")
    ids = sc.job_ids(res.stdout)
    return {"out": out, "res": res, "job_id": ids[0] if ids else None, "seconds": time.time() - start}


def test_cpu_job_completes_with_metrics(reference):
    res, out, job_id = reference["res"], reference["out"], reference["job_id"]
    assert res.returncode == 0, res.stdout + res.stderr
    assert job_id and f"job id:     {job_id}" in res.stdout
    assert f"output dir: {out}" in res.stdout
    assert f"stdout:     {out}/slurm/{job_id}_0_log.out" in res.stdout
    assert re.search(rf"^{job_id}\s+COMPLETED$", res.stdout, flags=re.MULTILINE), res.stdout
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == list(range(EPOCHS))
    assert all(METRIC_KEYS <= set(r) for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["train"]["device"] == "cpu" and cfg["dist"]["backend"] == "gloo"
    ckpt = weights(out)
    assert ckpt["step"] == EPOCHS * 8 and ckpt["model"]
    # two SLURM tasks formed one process group (rank/world from srun's variables)
    assert "world 2 (slurm, gloo, cpu)" in logs(out, job_id)
    assert (out / "slurm" / f"{job_id}_1_log.out").is_file()
    assert sc.job_fields(job_id).get("Restarts") == "0"


def assert_same_weights(out: Path, reference_out: Path) -> None:
    got, want = weights(out), weights(reference_out)
    assert got["step"] == want["step"]
    assert got["model"].keys() == want["model"].keys()
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name


def interrupt_once(res: subprocess.CompletedProcess, out: Path, how: str) -> tuple[str, str]:
    """After the submitted job's first epoch: send the time-limit warning (usr2) or requeue it (scontrol_requeue);
    wait for it to complete once more. Returns its id and task 0's log."""
    (job_id,) = sc.job_ids(res.stdout)
    try:
        assert sc.wait_for(lambda: metrics(out), timeout_s=240), "the job never finished its first epoch"
        cmd = ["scancel", "--signal=USR2", job_id] if how == "usr2" else ["scontrol", "requeue", job_id]
        subprocess.run(cmd, check=True, timeout=30)
        state = sc.wait_job(job_id, timeout_s=300)
    finally:
        sc.cancel(job_id)
    text = logs(out, job_id)
    assert state == "COMPLETED", text
    assert sc.job_fields(job_id).get("Restarts") == "1"
    return job_id, text


@pytest.mark.parametrize("how", ["usr2", "scontrol_requeue"])
def test_preempted_job_requeues_and_resumes_exactly(reference, tmp_path, how):
    """usr2: the warning signal (--signal) -> rank 0 requeues. scontrol_requeue: the scheduler requeues (SIGTERM);
    srun, told that its step is aborted, may SIGKILL the tasks before they act on it ("forcing job termination",
    seen on a loaded machine): the requeued job then resumes from the newest checkpoint. Either way it ends with the
    weights of the uninterrupted job."""
    out = tmp_path / how
    # slowed steps: the job cannot finish before the signal arrives, however idle the machine is
    res = launch(f"output_dir={out}", f"train.epochs={EPOCHS}", *CPU_JOB, env={"DDP_RESNET_TEST_STEP_DELAY_S": "0.3"})
    assert res.returncode == 0, res.stderr
    job_id, text = interrupt_once(res, out, how)
    assert "resumed from" in text, text
    if how == "usr2" or "forcing job termination" not in text:
        assert "stop signal: checkpoint written" in text, text
        (record,) = sc_records(out, job_id)
        assert record["reason"] == "preemption" and record["requeue"] is True and record["limit_s"] == 3600
    assert [r["epoch"] for r in metrics(out)] == list(range(EPOCHS))
    assert_same_weights(out, reference["out"])


def sc_records(out: Path, job_id: str) -> list[dict]:
    path = out / "slurm" / f"{job_id}_requeues.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_time_limit_warning_counts_as_timeout(tmp_path):
    """A 2-minute job gets USR2 about 60 s before its limit: a time-out; with --max-timeouts 0 it is not requeued."""
    out = tmp_path / "timeout"
    res = launch(f"output_dir={out}", "train.epochs=300", "--gpus-per-node", "0", "--tasks-per-node", "2",
                 "--time", "2", "--signal-delay-s", "60", "--max-timeouts", "0", "--wait")
    assert res.returncode == 1, res.stdout + res.stderr
    (job_id,) = sc.job_ids(res.stdout)
    fields = sc.job_fields(job_id)
    text = logs(out, job_id)
    assert fields["JobState"] == "FAILED" and fields.get("Restarts") == "0", text
    assert "stop signal: checkpoint written" in text and "stopped at the time limit 1 time(s)" in text, text
    (record,) = sc_records(out, job_id)
    assert record["reason"] == "timeout" and record["requeue"] is False and record["limit_s"] == 120
    assert weights(out)["step"] > 0  # the checkpoint to resubmit from


def test_sweep_is_one_array_with_own_directories(tmp_path):
    out = tmp_path / "sweep"
    # one task per job, so both array tasks run at once on two cores
    res = launch(f"output_dir={out}", "train.epochs=1", "--gpus-per-node", "0", "--tasks-per-node", "1",
                 "--time", "30", "--sweep", "optim.lr=0.05,0.2", "--wait")
    assert res.returncode == 0, res.stdout + res.stderr
    ids = sc.job_ids(res.stdout)
    assert len(ids) == 2 and len({i.split("_")[0] for i in ids}) == 1 and [i.split("_")[1] for i in ids] == ["0", "1"]
    for job_id, lr in zip(ids, ("0.05", "0.2")):
        run = out / f"lr{lr}"
        assert re.search(rf"^{job_id}\s+optim.lr={lr}\s+{run}$", res.stdout, flags=re.MULTILINE), res.stdout
        assert len(metrics(run)) == 1 and (run / "checkpoints" / "last.pt").is_file()
        assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == float(lr)
        assert sc.job_state(job_id) == "COMPLETED"
    index = json.loads((out / "sweep.json").read_text())
    assert [j["job_id"] for j in index["jobs"]] == ids


def test_failing_rank_fails_the_job_fast(tmp_path):
    out = tmp_path / "fail"
    # rank 1 raises at step 3; without --kill-on-bad-exit rank 0 could wait dist.timeout_s=300 s
    res = launch(f"output_dir={out}", f"train.epochs={EPOCHS}", *CPU_JOB, "--wait",
                 env={"DDP_RESNET_TEST_FAIL_AT": "1:3"})
    assert res.returncode == 1, res.stdout + res.stderr
    (job_id,) = sc.job_ids(res.stdout)
    fields = sc.job_fields(job_id)
    assert fields["JobState"] == "FAILED" and fields.get("Restarts") == "0"
    started = time.mktime(time.strptime(fields["StartTime"], "%Y-%m-%dT%H:%M:%S"))
    ended = time.mktime(time.strptime(fields["EndTime"], "%Y-%m-%dT%H:%M:%S"))
    assert ended - started < 120, fields
    assert "injected failure on rank 1" in logs(out, job_id, task=1)
    assert not (out / "slurm" / f"{job_id}_requeues.jsonl").exists()
    assert not metrics(out)  # it never finished an epoch


@pytest.mark.slow
def test_local_executor_runs_the_same_job(tmp_path):
    out = tmp_path / "local"
    res = launch(f"output_dir={out}", "train.epochs=1", "--gpus-per-node", "0", "--tasks-per-node", "2",
                 "--time", "10", "--local", "--wait")
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(metrics(out)) == 1
    assert weights(out)["step"] == 8
