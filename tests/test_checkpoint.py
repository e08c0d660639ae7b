"""Checkpoints: atomic writes, safe loads, newest-valid lookup, bitwise-exact resume, and surviving faults."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, assert_bitwise_equal, child_env, metrics, ok, run_train, train_cmd, untimed, weights
from ddp_resnet import checkpoint as ckpt
from ddp_resnet.models import build_model

STATE_KEYS = {"model", "optimizer", "scheduler", "scaler", "ema", "step", "epoch", "epoch_position",
              "best", "config", "rng", "data_state", "manifest"}


def _comparable(records: list[dict]) -> list[dict]:
    return [untimed(r) for r in records]


# ------------------------------------------------------------------------------------------ exact resume
@pytest.mark.parametrize("nproc, loader, stops, extra", [
    (2, "dataloader", [4], []),  # stop exactly at an epoch end
    (2, "dataloader", [3, 6], ["data.workers=2"]),  # two mid-epoch stops, worker processes
    (1, "gpu", [5], ["data.mixup_alpha=0.2", "optim.ema_decay=0.9", "optim.nesterov=true"]),  # device loader on CPU
], ids=["end-of-epoch-2proc", "mid-epoch-2proc-workers", "mid-epoch-gpu-loader-cpu"])
def test_interrupted_and_resumed_run_is_bitwise_identical(tmp_path, nproc, loader, stops, extra):
    common = [f"data.loader={loader}", "train.epochs=3", *extra]
    full, chunked = tmp_path / "full", tmp_path / "chunked"
    ok(run_train(full, *common, nproc=nproc))
    done = 0
    for stop in stops:
        proc = ok(run_train(chunked, *common, f"train.run_steps={stop - done}", nproc=nproc))
        assert f"reached at step {stop}" in proc.stdout
        done = stop
    proc = ok(run_train(chunked, *common, nproc=nproc))
    assert f"resumed from {chunked / 'checkpoints' / 'last.pt'}: step {stops[-1]}" in proc.stdout
    assert_bitwise_equal(weights(full / "checkpoints/last.pt"), weights(chunked / "checkpoints/last.pt"))
    final = torch.load(chunked / "checkpoints/last.pt", weights_only=True)
    assert_bitwise_equal(torch.load(full / "checkpoints/last.pt", weights_only=True)["optimizer"]["state"][0],
                         final["optimizer"]["state"][0])
    # per-epoch metrics agree too (train loss to float rounding: partial sums are added in another order)
    for a, b in zip(_comparable(metrics(full)), _comparable(metrics(chunked)), strict=True):
        assert a == pytest.approx(b, rel=1e-6)


def test_checkpoint_contents_and_policy(tmp_path):
    out = tmp_path / "run"
    ok(run_train(out, "train.epochs=4", "ckpt.keep=2"))
    files = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert files == ["best.pt", "epoch_0002.pt", "epoch_0003.pt", "last.pt"]
    payload = torch.load(out / "checkpoints/last.pt", map_location="cpu", weights_only=True)
    assert STATE_KEYS <= payload.keys()
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in payload["model"])
    assert payload["step"] == 16 and payload["manifest"]["world_size"] == 1
    assert {"package_version", "torch_version", "hostname", "time", "git_commit"} <= payload["manifest"].keys()
    assert {"python", "numpy", "torch"} <= payload["rng"][0].keys()
    assert len(payload["best"]["history"]) == 4
    build_model("resnet20", num_classes=10, stem=None).load_state_dict(payload["model"], strict=True)


def test_best_metric_history_survives_resume(tmp_path):
    out = tmp_path / "run"
    ok(run_train(out, "train.epochs=3", "train.run_steps=8"))
    ok(run_train(out, "train.epochs=3"))
    payload = torch.load(out / "checkpoints/last.pt", weights_only=True)
    assert [h[0] for h in payload["best"]["history"]] == [0, 1, 2]
    assert [r["epoch"] for r in metrics(out)] == [0, 1, 2]


def test_every_steps_writes_mid_epoch_checkpoints(tmp_path, monkeypatch):
    from ddp_resnet import train

    written = []
    real_save = ckpt.save

    def recording_save(payload, path):
        written.append((Path(path).name, payload["step"]))
        real_save(payload, path)

    monkeypatch.setattr(ckpt, "save", recording_save)
    assert train.main([*TINY, f"output_dir={tmp_path / 'run'}", "train.epochs=2", "ckpt.every_steps=3"]) == 0
    last = [step for name, step in written if name == "last.pt"]
    assert last == [3, 4, 6, 8]  # every 3 steps, plus every epoch end (4 steps per epoch)


# ----------------------------------------------------------------------------------------- safe loading
class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_checkpoint_whose_pickle_would_run_code_is_refused(tmp_path, monkeypatch):
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _Evil()}, evil)
    monkeypatch.chdir(tmp_path)  # where a "touch pwned" would land; undone after the test
    with pytest.raises(ckpt.CheckpointError, match="refused"):
        ckpt.load(evil)
    assert not (tmp_path / "pwned").exists()
    proc = run_train(tmp_path / "run", f"ckpt.resume={evil}")
    assert proc.returncode == 2 and "refused" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "pwned").exists() and not (REPO / "pwned").exists()


def test_truncated_last_checkpoint_falls_back_to_the_previous_valid_one(tmp_path):
    out = tmp_path / "run"
    ok(run_train(out, "train.epochs=3", "train.run_steps=8"))
    last = out / "checkpoints/last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    proc = ok(run_train(out, "train.epochs=3"))
    assert "warning: checkpoint" in proc.stdout and "failed to load" in proc.stdout
    assert "epoch_0001.pt: step 8" in proc.stdout


def test_auto_resume_reads_only_last_pt_when_it_loads(tmp_path, monkeypatch):
    out = tmp_path / "run"
    ok(run_train(out, "train.epochs=3", "train.run_steps=8"))
    assert (out / "checkpoints/epoch_0001.pt").is_file()
    read = []
    real_load = ckpt.load
    monkeypatch.setattr(ckpt, "load", lambda path, *a, **k: read.append(Path(path).name) or real_load(path, *a, **k))
    path, payload = ckpt.load_latest_valid(out / "checkpoints", warn=pytest.fail)
    assert (path.name, payload["step"], read) == ("last.pt", 8, ["last.pt"])


def test_checkpoint_of_another_model_is_refused_with_the_reason(tmp_path):
    out = tmp_path / "run"
    ok(run_train(out, "train.epochs=1"))
    proc = run_train(out, "train.epochs=2", "model.name=resnet32")
    assert proc.returncode == 2
    assert "is for model 'resnet20', but this run trains 'resnet32'" in proc.stderr


def test_resume_on_a_different_world_size_keeps_batch_and_schedule(tmp_path):
    common = ["train.sync_bn=true", "train.epochs=2", "optim.lr=0.02"]
    full, moved = tmp_path / "full", tmp_path / "moved"
    ok(run_train(full, *common, nproc=1))
    ok(run_train(moved, *common, "train.run_steps=3", nproc=1))
    proc = ok(run_train(moved, *common, nproc=2))
    assert "written by 1 processes, resuming on 2" in proc.stdout
    a, b = weights(full / "checkpoints/last.pt"), weights(moved / "checkpoints/last.pt")
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=5e-5)


def test_export_writes_plain_weights_for_ours_and_torchvision(tmp_path):
    import torchvision

    from ddp_resnet.export import cli as export_cli

    model = build_model("resnet18", num_classes=1000, stem="imagenet")
    ckpt.save({"model": model.state_dict(), "config": {"model": {"name": "resnet18"}}, "ema": None},
              tmp_path / "best.pt")
    assert export_cli([str(tmp_path / "best.pt"), str(tmp_path / "plain.pt")]) == 0
    state = torch.load(tmp_path / "plain.pt", weights_only=True)
    build_model("resnet18", num_classes=1000, stem="imagenet").load_state_dict(state, strict=True)
    torchvision.models.resnet18().load_state_dict(state, strict=True)
    assert export_cli([str(tmp_path / "best.pt"), str(tmp_path / "x.pt"), "--ema"]) == 2


# --------------------------------------------------------------------------------------------- faults
SLOW_STEPS = {"DDP_RESNET_TEST_STEP_DELAY_S": "0.2"}  # the run cannot finish before the test signals it


def _start(out: Path, *overrides: str, nproc: int, env: dict | None = None, max_restarts: int = 0):
    args = train_cmd(nproc, max_restarts) + TINY + [f"output_dir={out}", "train.log_every=1", *overrides]
    return subprocess.Popen(args, cwd=REPO, env=child_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _workers(launcher_pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split()
    return sorted(int(p) for p in out)


def _step_of(path: Path) -> int:
    return torch.load(path, weights_only=True)["step"] if path.is_file() else -1


def _rank_pid(launcher_pid: int, rank: int) -> int:
    for pid in _workers(launcher_pid):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker with RANK={rank}")


def test_sigusr2_single_process_checkpoints_and_exits_75(tmp_path):
    out = tmp_path / "run"
    proc = _start(out, "train.epochs=40", nproc=1, env=SLOW_STEPS)
    _wait_for(lambda: _step_of(out / "checkpoints/last.pt") >= 4, 120, "first epoch checkpoint")
    proc.send_signal(signal.SIGUSR2)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 75, stderr[-3000:]
    assert "stop signal: checkpoint written" in stdout


def test_sigterm_to_one_rank_stops_all_ranks_with_a_checkpoint_and_resume_is_exact(tmp_path):
    common = ["train.epochs=10"]
    stopped, full = tmp_path / "stopped", tmp_path / "full"
    proc = _start(stopped, *common, nproc=2, env=SLOW_STEPS)
    _wait_for(lambda: _step_of(stopped / "checkpoints/last.pt") >= 4, 120, "first checkpoint")
    os.kill(_rank_pid(proc.pid, 1), signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert "stop signal: checkpoint written at step" in stdout, stderr[-3000:]
    assert stderr.count("exitcode  : 75") >= 1 or proc.returncode == 75, stderr[-3000:]
    stopped_at = _step_of(stopped / "checkpoints/last.pt")
    assert 4 <= stopped_at < 40
    ok(run_train(stopped, *common, nproc=2))
    ok(run_train(full, *common, nproc=2))
    assert_bitwise_equal(weights(full / "checkpoints/last.pt"), weights(stopped / "checkpoints/last.pt"))


def test_kill_9_under_torchrun_restart_resumes_to_identical_weights(tmp_path):
    common = ["train.epochs=10", "ckpt.every_steps=2"]
    killed, full = tmp_path / "killed", tmp_path / "full"
    proc = _start(killed, *common, nproc=2, max_restarts=1, env=SLOW_STEPS)
    _wait_for(lambda: _step_of(killed / "checkpoints/last.pt") >= 7, 120, "a mid-run checkpoint")
    os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "resumed from" in stdout
    ok(run_train(full, *common, nproc=2))
    assert_bitwise_equal(weights(full / "checkpoints/last.pt"), weights(killed / "checkpoints/last.pt"))


def test_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    out = tmp_path / "run"
    ok(run_train(out, "train.epochs=3", "train.run_steps=4"))
    before = (out / "checkpoints/last.pt").read_bytes()
    proc = _start(out, "train.epochs=3", "train.run_steps=2", nproc=1, env={"DDP_RESNET_TEST_SLOW_SAVE_S": "30"})
    _wait_for(lambda: any(p.name.startswith(".last.pt.tmp") for p in (out / "checkpoints").iterdir()), 120,
              "the temporary checkpoint file")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert (out / "checkpoints/last.pt").read_bytes() == before
    assert ckpt.load(out / "checkpoints/last.pt")["step"] == 4
    proc = ok(run_train(out, "train.epochs=3"))
    assert "resumed from" in proc.stdout and "step 4" in proc.stdout


def test_atomic_save_and_load_roundtrip(tmp_path):
    payload = {"model": {"w": torch.arange(4.0)}, "step": 3, "rng": ckpt.rng_state()}
    ckpt.save(payload, tmp_path / "a.pt")
    loaded = ckpt.load(tmp_path / "a.pt")
    assert loaded["step"] == 3 and torch.equal(loaded["model"]["w"], torch.arange(4.0))
    ckpt.set_rng_state(loaded["rng"])
    first = torch.rand(3)
    ckpt.set_rng_state(loaded["rng"])
    assert torch.equal(first, torch.rand(3))
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]
