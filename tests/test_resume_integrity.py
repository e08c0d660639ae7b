"""A resume is the same experiment, nothing is written before a run is accepted, a run's history is never erased
by accident, Ctrl-C is a stop, and numbers and paths from users are checked: tiny real runs."""
from __future__ import annotations

import os
import signal
import subprocess
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
    weights,
)
from ddp_resnet import checkpoint as ckpt
from ddp_resnet import config, exitcodes, rundir
from ddp_resnet.config import ConfigError

SLOW_STEPS = {"DDP_RESNET_TEST_STEP_DELAY_S": "0.2"}


def _error(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def _snapshot(out: Path) -> dict:
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished two-epoch run (8 steps) that the refusals below try to resume."""
    out = tmp_path_factory.mktemp("finished") / "run"
    ok(run_train(out))
    return out


@pytest.mark.parametrize("overrides, parts", [
    (["optim.lr=0.2", "train.seed=3"], ["optim.lr=0.2 (checkpoint: 0.1)", "train.seed=3 (checkpoint: 0)",
                                        "ckpt.allow_changes"]),
    (["optim.name=adamw"], ["optim.name='adamw' (checkpoint: 'sgd')", "do not fit", "ckpt.overwrite=true"]),
    (["data.batch_size=64"], ["data.batch_size=64 (checkpoint: 32)"]),
    (["train.epochs=4"], ["train.epochs=4 (checkpoint: 2)", "ckpt.allow_changes"]),  # cosine: length-dependent
])
def test_a_changed_recipe_is_refused_naming_each_key_and_nothing_is_written(finished, overrides, parts):
    before = _snapshot(finished)
    proc = run_train(finished, *overrides)
    assert proc.returncode == exitcodes.USAGE
    assert_parts(_error(proc), f"{finished}/checkpoints/last.pt", *parts)
    assert _snapshot(finished) == before  # config.yaml, metrics and checkpoints as they were


def test_keys_that_do_not_change_the_result_resume_freely(finished, tmp_path):
    proc = ok(run_train(finished, "train.log_every=3", "data.workers=0", "ckpt.keep=1", "dist.timeout_s=90"))
    assert "done: 8 steps" in proc.stdout and "note:" not in proc.stdout


def test_allowed_changes_take_effect_and_are_recorded(tmp_path):
    common = ["optim.schedule=constant", "optim.momentum=0"]
    out = tmp_path / "run"
    ok(run_train(out, *common, "train.run_steps=4"))
    proc = ok(run_train(out, *common, "optim.lr=0.05", "optim.weight_decay=0", "ckpt.allow_changes=[optim.lr, "
                        "optim.weight_decay]", "train.epochs=3"))  # and a longer run: constant needs no switch
    assert_parts(proc.stdout, "note: optim.lr changed from 0.1 to 0.05 at step 4", "optim.weight_decay",
                 "train.epochs changed from 2 to 3 at step 4: the constant schedule does not depend on the run's "
                 "length; 12 steps now")
    groups = torch.load(out / "checkpoints/last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert {g["lr"] for g in groups} == {0.05} and {g["weight_decay"] for g in groups} == {0.0}
    changes = rundir.read_jsonl(out / rundir.CHANGES)
    assert {(c["step"], c["key"], c["old"], c["new"]) for c in changes} >= {(4, "optim.lr", 0.1, 0.05),
                                                                          (4, "train.epochs", 2, 3)}
    saved = rundir.read_config(out)
    assert saved["optim"]["lr"] == 0.05 and saved["train"]["epochs"] == 3  # config.yaml tells the truth from then on
    assert metrics(out)[-1]["step"] == 12


def test_a_longer_cosine_run_must_be_named_and_says_what_happens_to_the_schedule(finished, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    proc = ok(run_train(out, "train.epochs=3", "ckpt.allow_changes=[train.epochs]"))
    assert_parts(proc.stdout, "train.epochs changed from 2 to 3 at step 8: the cosine schedule is redefined over 12 "
                 "steps (was 8); the learning rate at this step goes from 0 to 0.025", "done: 12 steps")


def test_unknown_allowed_keys_and_structural_changes_are_refused():
    cfg = config.load(None, ["ckpt.allow_changes=[optim.lrr]"])
    with pytest.raises(ConfigError, match="ckpt.allow_changes: unknown key optim.lrr"):
        config.check_resume(config.to_dict(config.load(None)), cfg, "x.pt")
    cfg = config.load(None, ["model.name=resnet32", "ckpt.allow_changes=[model.name]"])
    with pytest.raises(ConfigError, match="model.name='resnet32' .checkpoint: 'resnet18'.*do not fit"):
        config.check_resume(config.to_dict(config.load(None)), cfg, "x.pt")


def test_a_run_whose_checkpoints_all_fail_to_load_is_not_started_over(tmp_path):
    out = tmp_path / "run"
    ok(run_train(out, "ckpt.keep=2"))
    for path in (out / "checkpoints").glob("*.pt"):
        path.write_bytes(path.read_bytes()[:100])  # truncated
    history = (out / "metrics.jsonl").read_bytes()
    proc = run_train(out)
    assert proc.returncode == exitcodes.USAGE
    assert_parts(_error(proc), "holds checkpoints but none loads", "last.pt", "epoch_0001.pt",
                 "ckpt.resume=none ckpt.overwrite=true")
    assert (out / "metrics.jsonl").read_bytes() == history


def test_starting_over_moves_the_old_run_aside_and_prunes_only_its_own_files(tmp_path):
    out = tmp_path / "run"
    ok(run_train(out, "train.epochs=3", "ckpt.keep=3"))
    (out / "checkpoints" / "myepoch_0007.pt").write_bytes(b"a user's file")  # not a name the run writes
    old_metrics = (out / "metrics.jsonl").read_bytes()
    proc = ok(run_train(out, "train.epochs=2", "ckpt.keep=1", "ckpt.resume=none", "ckpt.overwrite=true",
                        "train.seed=5"))
    moved = [p for p in out.iterdir() if p.name.startswith("replaced-")]
    assert len(moved) == 1 and f"moved to {moved[0]}" in proc.stdout
    assert (moved[0] / "metrics.jsonl").read_bytes() == old_metrics
    assert sorted(p.name for p in (moved[0] / "checkpoints").iterdir()) == [
        "best.pt", "epoch_0000.pt", "epoch_0001.pt", "epoch_0002.pt", "last.pt", "myepoch_0007.pt"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "epoch_0001.pt", "last.pt"]
    assert len(metrics(out)) == 2 and rundir.read_config(out)["train"]["seed"] == 5


def test_planted_symbolic_links_are_not_followed(tmp_path):
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    ckpt_dir = tmp_path / "ckpts"
    ckpt_dir.mkdir()
    (ckpt_dir / f".last.pt.tmp.{os.getpid()}").symlink_to(target)
    with pytest.raises(ckpt.CheckpointWriteError, match="could not write checkpoint .*last.pt: File exists"):
        ckpt.save({"model": {}}, ckpt_dir / "last.pt")
    assert target.read_bytes() == b"precious" and not (ckpt_dir / "last.pt").exists()
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(target)
    with pytest.raises(ConfigError, match="cannot open its lock file"):
        with rundir.RunLock(run):
            pass
    assert target.read_bytes() == b"precious"


@pytest.mark.parametrize("override, message", [
    ("train.epochs=.inf", "train.epochs: expected an integer"),
    ("train.epochs=.nan", "train.epochs: expected an integer"),
    ("dist.timeout_s=1e400", "dist.timeout_s: expected an integer"),
    ("dist.timeout_s=100000000000", "dist.timeout_s: must be at most"),
    ("optim.lr=.nan", "optim.lr: expected a finite number"),
    ("optim.weight_decay=-.inf", "optim.weight_decay: expected a finite number"),
    ("output_dir=", "output_dir: must not be empty"),
])
def test_non_finite_numbers_and_empty_paths_are_refused_in_one_line(tmp_path, override, message):
    proc = subprocess.run(train_cmd(1) + TINY + [override], cwd=tmp_path, env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == exitcodes.USAGE and message in _error(proc)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even into the current directory


def test_home_is_expanded_in_paths_as_the_slurm_side_expands_it():
    cfg = config.load(None, ["output_dir=~/runs/x", "data.root=~/data"])
    assert cfg.output_dir == os.path.expanduser("~/runs/x") and cfg.data.root == os.path.expanduser("~/data")


def _start(out: Path, *overrides: str, env: dict = SLOW_STEPS) -> subprocess.Popen:
    args = train_cmd(1) + TINY + [f"output_dir={out}", "train.epochs=40", "ckpt.every_steps=1", *overrides]
    return subprocess.Popen(args, cwd=REPO, env=child_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_step(path: Path, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if path.is_file() and torch.load(path, weights_only=True)["step"] >= step:
                return
        except (RuntimeError, EOFError, OSError):  # caught mid-rename
            pass
        time.sleep(0.05)
    raise AssertionError(f"{path} did not reach step {step}")


def test_ctrl_c_stops_with_a_checkpoint_and_a_second_one_leaves_at_once(tmp_path):
    """SIGINT to the whole process group (as a terminal sends it), DataLoader workers included."""
    first = _start(tmp_path / "a", "data.workers=2")
    _wait_step(tmp_path / "a/checkpoints/last.pt", 3)
    os.killpg(first.pid, signal.SIGINT)
    out, err = first.communicate(timeout=120)
    assert first.returncode == exitcodes.STOPPED, err[-3000:]
    assert "interrupt: stopping at the next step boundary" in err and "stop signal: checkpoint written" in out
    assert "Traceback" not in err and "could not write" not in err
    step = torch.load(tmp_path / "a/checkpoints/last.pt", weights_only=True)["step"]
    assert ok(run_train(tmp_path / "a", "train.epochs=40", "ckpt.every_steps=1", "train.run_steps=1"))
    assert torch.load(tmp_path / "a/checkpoints/last.pt", weights_only=True)["step"] == step + 1

    # the second Ctrl-C lands while the checkpoint the first one asked for is being written (a slow disk)
    second = _start(tmp_path / "b", "data.workers=0", env={"DDP_RESNET_TEST_SLOW_SAVE_S": "2"})
    _wait_step(tmp_path / "b/checkpoints/last.pt", 2)
    good = (tmp_path / "b/checkpoints/last.pt").read_bytes()
    os.killpg(second.pid, signal.SIGINT)
    time.sleep(1.0)
    os.killpg(second.pid, signal.SIGINT)
    _, err = second.communicate(timeout=120)
    assert second.returncode == exitcodes.INTERRUPTED, err[-3000:]
    assert "interrupted again: exiting at once" in err
    last = tmp_path / "b/checkpoints/last.pt"
    ckpt.load(last)  # the last good checkpoint is whole: the one before, or (if it was renamed in time) the next
    assert last.read_bytes() == good or torch.load(last, weights_only=True)["step"] > 2
    assert not list((tmp_path / "b/checkpoints").glob(".*.tmp.*"))


def test_exact_resume_still_holds_after_a_ctrl_c(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    ok(run_train(whole))
    proc = subprocess.Popen(train_cmd(1) + TINY + [f"output_dir={parts}", "ckpt.every_steps=1"], cwd=REPO,
                            env=child_env(SLOW_STEPS), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _wait_step(parts / "checkpoints/last.pt", 2)
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode in (exitcodes.STOPPED, exitcodes.OK)
    ok(run_train(parts))
    assert_bitwise_equal(weights(whole / "checkpoints/last.pt"), weights(parts / "checkpoints/last.pt"))


# ------------------------------------------------------------------------------------------------ bad images
@pytest.fixture(scope="module")
def broken_tree(tmp_path_factory) -> Path:
    """A 3-class ImageFolder tree whose training split holds a truncated JPEG and random bytes named .jpg."""
    from test_device_decode import write_folder

    root = tmp_path_factory.mktemp("broken")
    write_folder(root, n_train=6)  # 20 training files with the two below: every one is drawn in every epoch
    good = (root / "train/ant/0.jpg").read_bytes()
    (root / "train/bee/7.jpg").write_bytes(good[: len(good) // 3])
    (root / "train/cat/8.jpg").write_bytes(os.urandom(500))
    return root


def _folder_run(root: Path) -> list[str]:
    return [f"data.root={root}", "data.dataset=imagefolder", "data.image_size=24", "data.batch_size=4",
            "model.name=resnet20", "train.epochs=2", "data.workers=2", "train.log_every=2"]


def test_bad_images_are_named_once_counted_and_replaced_and_resume_stays_exact(broken_tree, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    proc = ok(run_train(whole, *_folder_run(broken_tree), nproc=2))
    named = [line for line in proc.stderr.splitlines() if "unreadable sample" in line]
    assert sorted(line.split("unreadable sample ")[1].split(" (")[0] for line in named) == [
        f"{broken_tree}/train/bee/7.jpg", f"{broken_tree}/train/cat/8.jpg"], proc.stderr[-3000:]  # once in the run
    assert "Truncated File Read" in "".join(named)
    assert [r["bad_images"] for r in metrics(whole)] == [2, 2]
    ok(run_train(parts, *_folder_run(broken_tree), "train.run_steps=1", nproc=2))
    ok(run_train(parts, *_folder_run(broken_tree), nproc=2))
    assert_bitwise_equal(weights(whole / "checkpoints/last.pt"), weights(parts / "checkpoints/last.pt"))


def test_more_bad_images_than_allowed_stop_the_run_with_a_checkpoint(broken_tree, tmp_path):
    out = tmp_path / "run"
    proc = run_train(out, *_folder_run(broken_tree), "data.max_bad_images=1")
    assert proc.returncode == exitcodes.BAD_DATA, proc.stderr[-3000:]
    assert_parts(_error(proc), "unreadable training samples this epoch", "data.max_bad_images=1", "last.pt of step")
    ckpt.load(out / "checkpoints/last.pt")
