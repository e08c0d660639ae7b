"""Faults a real cluster throws: non-finite losses, unwritable or full disks, hung ranks, several nodes."""
from __future__ import annotations

import pytest

from conftest import assert_bitwise_equal, metrics, ok, run_train, weights
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
    assert ("error: non-finite training at step 5 (epoch 2, rank 1): loss nan, gradient norm nan; stopped at step 6 "
            f"without writing a checkpoint; the newest good checkpoint is {bad}/checkpoints/last.pt (step 5)"
            ) == errors[0]
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
    assert not (tmp_path / "one" / "checkpoints").exists() and not (tmp_path / "one" / "metrics.jsonl").read_text()


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
