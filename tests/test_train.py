"""The trainer end to end: single process, torchrun with 2 gloo processes, equivalence, exact evaluation."""
from __future__ import annotations

import subprocess
import time

import pytest
import torch
import yaml

from conftest import REPO, TINY, child_env, metrics, ok, run_train, train_cmd, weights


def test_single_process_cpu_smoke_runs_end_to_end(tmp_path):
    out = tmp_path / "smoke"
    proc = ok(run_train(out, "train.epochs=2", "data.synthetic_train_size=512", config="configs/cpu_smoke.yaml",
                        tiny=False))
    records = metrics(out)
    assert [r["epoch"] for r in records] == [0, 1]
    for key in ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_time_s", "img_per_s"):
        assert key in records[-1]
    assert records[-1]["test_count"] == 512
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "checkpoints" / "best.pt").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["output_dir"] == str(out)
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert "ETA" in proc.stdout and "img/s" in proc.stdout


def test_torchrun_two_processes_runs_cpu_smoke_and_only_rank0_prints(tmp_path):
    out = tmp_path / "smoke2"
    proc = ok(run_train(out, "train.epochs=1", "data.synthetic_train_size=512", config="configs/cpu_smoke.yaml",
                        tiny=False, nproc=2))
    assert "world 2 (torchrun, gloo" in proc.stdout
    assert proc.stdout.count("epoch 1/1") == 1
    assert metrics(out)[-1]["test_count"] == 512


def test_cpu_smoke_learns(tmp_path):
    out = tmp_path / "learn"
    ok(run_train(out, "train.epochs=3", config="configs/cpu_smoke.yaml", tiny=False))
    records = metrics(out)
    assert records[-1]["test_acc"] > 50.0, records  # chance is 10%


def test_two_processes_match_one_process_and_count_every_test_sample_once(tmp_path):
    """Same global batch and samples: 2 ranks (synchronized BN) end with 1 rank's weights; 101 test samples."""
    common = ["train.sync_bn=true", "data.synthetic_test_size=101", "data.eval_batch_size=16",
              "data.augment=crop_flip", "train.epochs=2", "optim.lr=0.02"]  # small lr: rounding is not amplified
    one, two = tmp_path / "one", tmp_path / "two"
    ok(run_train(one, *common, nproc=1))
    ok(run_train(two, *common, nproc=2))
    w1, w2 = weights(one / "checkpoints/last.pt"), weights(two / "checkpoints/last.pt")
    for key in w1:
        if w1[key].is_floating_point():
            torch.testing.assert_close(w1[key], w2[key], rtol=1e-3, atol=5e-5, msg=key)
    m1, m2 = metrics(one)[-1], metrics(two)[-1]
    assert m1["test_count"] == m2["test_count"] == 101
    assert m1["test_acc"] == pytest.approx(m2["test_acc"])
    assert m1["test_loss"] == pytest.approx(m2["test_loss"], rel=1e-4)
    assert m1["train_loss"] == pytest.approx(m2["train_loss"], rel=1e-4)


def test_gradient_accumulation_under_ddp_keeps_the_step_count(tmp_path):
    out = tmp_path / "accum"
    ok(run_train(out, "train.epochs=1", "optim.accum_steps=2", nproc=2))
    assert metrics(out)[-1]["step"] == 4  # 128 images / global batch 32, each step = 2 micro-batches of 8 per rank


def test_failing_rank_ends_the_job_quickly_with_nonzero_exit(tmp_path):
    start = time.time()
    proc = run_train(tmp_path / "fail", "train.epochs=3", "dist.timeout_s=30", nproc=2,
                     env={"DDP_RESNET_TEST_FAIL_AT": "1:2"}, timeout=120)
    elapsed = time.time() - start
    assert proc.returncode != 0
    assert "injected failure on rank 1 at step 2" in proc.stderr
    assert elapsed < 30 + 25, elapsed


def test_two_jobs_at_once_on_one_host_do_not_collide(tmp_path):
    procs = []
    for name in ("a", "b"):
        args = train_cmd(2) + ["--config", str(REPO / "configs/cpu_smoke.yaml"), f"output_dir={tmp_path / name}",
                               "train.epochs=1", "data.synthetic_train_size=256", "data.synthetic_test_size=64"]
        procs.append(subprocess.Popen(args, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
    assert metrics(tmp_path / "a")[-1]["test_count"] == metrics(tmp_path / "b")[-1]["test_count"] == 64


def test_tasks_started_like_srun_without_torchrun_form_one_job(tmp_path):
    """Two plain processes carrying only srun's variables (as `srun --ntasks=2` starts them) train together."""
    import socket
    import sys

    from conftest import TINY

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "srun"
    procs = []
    for rank in range(2):
        env = child_env({"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_STEP_NUM_TASKS": "2",
                         "SLURM_NODEID": "0", "SLURM_STEP_NODELIST": "localhost", "SLURM_JOB_ID": "4242",
                         "SLURM_STEP_TASKS_PER_NODE": "2", "MASTER_PORT": str(port)})
        procs.append(subprocess.Popen([sys.executable, "-m", "ddp_resnet.train", *TINY, f"output_dir={out}",
                                       "train.epochs=1", "data.synthetic_test_size=101"], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert "world 2 (slurm, gloo" in outputs[0][0] and outputs[1][0] == ""
    assert metrics(out)[-1]["test_count"] == 101


def test_amp_bf16_channels_last_adamw_and_label_smoothing_run_on_cpu(tmp_path):
    out = tmp_path / "amp"
    ok(run_train(out, "train.epochs=1", "train.amp=bf16", "train.channels_last=true", "optim.name=adamw",
                 "optim.lr=0.001", "optim.weight_decay=0.05", "train.label_smoothing=0.1", "data.cutmix_alpha=1.0",
                 "optim.no_wd_bn_bias=true", "optim.clip_grad_norm=1.0"))
    record = metrics(out)[-1]
    assert record["test_count"] == 64 and record["train_loss"] == record["train_loss"]  # finite, not NaN


def test_a_second_job_on_the_same_output_dir_is_refused_while_the_first_runs(tmp_path):
    import sys

    from conftest import TINY

    out = tmp_path / "shared"
    first = subprocess.Popen([sys.executable, "-m", "ddp_resnet.train", *TINY, f"output_dir={out}", "train.epochs=30"],
                             cwd=REPO, env=child_env({"DDP_RESNET_TEST_STEP_DELAY_S": "0.5"}),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "config.yaml").is_file() and time.time() < deadline:
        time.sleep(0.1)
    second = run_train(out, "train.epochs=30")
    first.kill()
    first.communicate()
    assert second.returncode == 2
    assert "is in use by a running job (pid" in second.stderr and len(second.stderr.strip().splitlines()) == 1


def test_a_compile_failure_in_the_first_step_falls_back_to_eager(tmp_path, monkeypatch, capsys):
    from conftest import TINY
    from ddp_resnet import train

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("backend compiler failed")

    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: Broken())
    torch.set_num_threads(1)
    assert train.main([*TINY, f"output_dir={tmp_path / 'run'}", "train.compile=true", "train.epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "torch.compile failed in the first step (RuntimeError: backend compiler failed); falling back" in out
    assert metrics(tmp_path / "run")[-1]["step"] == 4


def test_in_process_main_releases_the_output_dir_lock_when_it_returns(tmp_path):
    import fcntl

    from ddp_resnet import train

    out = tmp_path / "run"
    assert train.main([*TINY, "train.epochs=1", f"output_dir={out}"]) == 0
    with open(out / ".lock", "a+") as handle:  # raises BlockingIOError if the finished run still held it
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
