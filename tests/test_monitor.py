"""Seeing a run while it trains: progress lines, steps.jsonl and TensorBoard per interval, stragglers, profiler,
and the bar that none of it synchronizes the host once per step."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, metrics, ok, run_train
from ddp_resnet import bench, monitor, rundir, train
from ddp_resnet.engine import StepStats

LOGGED = ["train.log_every=2", "data.synthetic_train_size=256"]  # 8 steps per epoch, a record every 2 steps


def steps(out) -> list[dict]:
    return rundir.read_jsonl(out / rundir.STEPS)


def scalars(out) -> dict:
    """TensorBoard's own reader: {tag: [(step, value), ...]} over all event files of the run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / rundir.TENSORBOARD), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_progress_lines_steps_jsonl_and_tensorboard_per_interval(tmp_path):
    out = tmp_path / "run"
    proc = ok(run_train(out, *LOGGED, "train.epochs=2"))
    lines = [line for line in proc.stdout.splitlines() if "(run " in line]
    assert len(lines) == 8 and "\r" not in proc.stdout
    first = lines[0]
    for part in ("epoch 1/2 step 2/8 (run 2/16)", "| loss ", "| acc ", "| lr ", "img/s", "| data ", "ETA epoch",
                 ", run "):
        assert part in first, first
    records = steps(out)
    assert [r["step"] for r in records] == list(range(2, 17, 2))
    assert [r["images"] for r in records] == [32 * r["step"] for r in records]
    for key in ("loss", "acc", "lr", "img_per_s", "data_wait", "grad_norm", "epoch", "time"):
        assert all(r[key] is not None for r in records), key
    assert 0 <= records[0]["data_wait"] <= 1 and records[-1]["loss"] < records[0]["loss"]
    assert all(r["img_per_s"] > 0 and r["grad_norm"] > 0 for r in records)
    assert f"| {records[0]['img_per_s']:,.0f} img/s |" in lines[0]  # the line prints the record's numbers
    tb = scalars(out)
    for tag in ("train/loss", "train/acc1", "train/lr", "train/img_per_s", "train/data_wait", "train/grad_norm"):
        assert [s for s, _ in tb[tag]] == list(range(2, 17, 2)), tag
    assert [s for s, _ in tb["train_by_images/loss"]] == [32 * s for s in range(2, 17, 2)]
    assert tb["train/loss"][0][1] == pytest.approx(records[0]["loss"], rel=1e-6)
    for tag in ("test/acc1", "test/acc5", "test/loss", "time/epoch_s", "train/epoch_loss"):
        assert [s for s, _ in tb[tag]] == [8, 16], tag
    assert tb["test/acc1"][-1][1] == pytest.approx(metrics(out)[-1]["test_acc"], rel=1e-6)
    assert "step" not in tb and "train_loss" not in tb  # no flat tags, no step-as-a-scalar


def test_a_resumed_run_continues_steps_and_tensorboard_without_duplicates_or_gaps(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    ok(run_train(whole, *LOGGED, "train.epochs=2"))
    # a run that crashes at step 7: its last checkpoint is from step 4, its records go to step 6
    crashed = run_train(parts, *LOGGED, "train.epochs=2", "ckpt.every_steps=4", env={"DDP_RESNET_TEST_FAIL_AT": "0:7"})
    assert crashed.returncode == 1 and [r["step"] for r in steps(parts)] == [2, 4, 6]
    assert [s for s, _ in scalars(parts)["train/loss"]] == [2, 4, 6]
    ok(run_train(parts, *LOGGED, "train.epochs=2"))  # resumes from step 4
    got, want = steps(parts), steps(whole)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(2, 17, 2))
    assert [r["loss"] for r in got[:2]] == [r["loss"] for r in want[:2]]  # before the stop: the same records
    assert got[-1]["loss"] == pytest.approx(want[-1]["loss"], rel=1e-5)
    tb = scalars(parts)
    assert [s for s, _ in tb["train/loss"]] == list(range(2, 17, 2))  # the crashed run's step 6 was purged
    assert [s for s, _ in tb["test/acc1"]] == [8, 16]
    assert [r["epoch"] for r in metrics(parts)] == [0, 1]


def test_each_ranks_timings_are_gathered_and_a_slow_rank_is_named(tmp_path):
    out = tmp_path / "slow"
    proc = ok(run_train(out, "data.synthetic_train_size=256", "train.epochs=1", nproc=2,
                        env={"DDP_RESNET_TEST_SLOW_RANK": "1:0.3"}))  # rank 1's forward: +0.3 s x 8 steps
    record = metrics(out)[-1]
    assert record["slowest_rank"] == 1
    assert record["rank_forward_s_max"] >= record["rank_forward_s_median"] >= record["rank_forward_s_min"]
    assert record["rank_forward_s_max"] > 1.0 > record["rank_forward_s_min"]
    assert "rank_data_wait_s_max" in record
    assert "warning: rank 1 is a straggler" in proc.stdout
    assert "ranks data wait" in proc.stdout and "(min/median/max)" in proc.stdout


def test_no_straggler_warning_when_the_ranks_are_even(tmp_path):
    proc = ok(run_train(tmp_path / "even", "train.epochs=1", nproc=2))
    assert "is a straggler" not in proc.stdout


def test_profile_steps_writes_a_trace_and_says_where(tmp_path):
    out = tmp_path / "prof"
    proc = ok(run_train(out, "train.epochs=1", "train.profile_steps=1:3"))
    (trace,) = (out / "profile").glob("rank0.*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    assert any("aten::conv" in str(e.get("name", "")) for e in events)
    assert f"profile of steps 1-2 written to {trace}" in proc.stdout


@pytest.mark.parametrize("window", ["3", "5:2", "a:b"])
def test_a_bad_profile_window_is_refused_in_one_line(tmp_path, window):
    proc = run_train(tmp_path / "bad", f"train.profile_steps={window}")
    assert proc.returncode == 2 and "train.profile_steps: expected START:END" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def _host_reads(monkeypatch, argv: list[str]) -> int:
    """How often train.main reads a tensor's value on the host (item, tolist, cpu, numpy, float/int/bool)."""
    count = [0]
    for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            count[0] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    assert train.main(argv) == 0
    monkeypatch.undo()
    return count[0]


def test_the_training_step_never_reads_the_device_per_step(tmp_path, monkeypatch):
    """One epoch of 8 steps and one of 40: the host reads device values per interval and per epoch, never per
    step, so both runs read the same number of times (a per-step .item() would add 32)."""
    common = [*TINY, "train.epochs=1", "train.log_every=1000", "data.synthetic_test_size=32"]
    short = _host_reads(monkeypatch, [*common, "data.synthetic_train_size=256", f"output_dir={tmp_path / 'a'}"])
    long = _host_reads(monkeypatch, [*common, "data.synthetic_train_size=1280", f"output_dir={tmp_path / 'b'}"])
    assert short > 0 and long == short, (short, long)


def test_the_interval_meter_reads_once_and_restarts():
    meter = monitor.IntervalMeter(torch.device("cpu"), global_batch=8)
    meter.add(StepStats(torch.tensor([16.0, 6.0, 8.0, 3.0])), 0.0)
    meter.add(StepStats(torch.tensor([float("nan"), 2.0, 8.0, 5.0])), 0.0)
    values = meter.read()
    assert values["loss"] is None and values["acc"] == 50.0 and values["grad_norm"] == 4.0
    meter.add(StepStats(torch.tensor([8.0, 8.0, 8.0, 1.0])), 0.0)
    assert meter.read()["loss"] == 1.0


def test_the_bench_prints_the_loaders_own_ceiling_and_times_logging(capsys):
    code = bench.main(["--device", "cpu", "--model", "resnet20", "--res", "16", "--batch", "8", "--steps", "2",
                       "--warmup", "1", "--windows", "2", "--data", "synthetic", "--loader", "dataloader",
                       "--log-every", "2", "data.workers=0", "data.synthetic_train_size=64"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "loader alone:" in out and "no model | the step with it:" in out and "limits this run" in out
