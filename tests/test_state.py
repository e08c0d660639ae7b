"""The run's state and its checkpoint schema, the typed checkpoint readers, the exit codes, the pipeline table,
key discovery and ``data.workers=auto``: one owner each, checked in one process."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_bitwise_equal, ok, run_train, weights
from ddp_resnet import checkpoint as ckpt
from ddp_resnet import config, exitcodes, pipelines
from ddp_resnet.config import ConfigError
from ddp_resnet.data.loaders import MAX_AUTO_WORKERS, auto_workers, with_workers
from ddp_resnet.engine import StepStats
from ddp_resnet.state import BestMetric, TrainState

REPO = Path(__file__).resolve().parents[1]


def _state(step: int = 7) -> TrainState:
    state = TrainState(steps_per_epoch=5, device=torch.device("cpu"))
    for _ in range(step):
        state.account(StepStats(torch.tensor([2.0, 3.0, 4.0, 1.0])), data_wait_s=0.5, skipped=False)
    state.best.record(0, 40.0)
    state.best.record(1, 30.0)
    return state


def test_train_state_round_trips_through_its_state_dict():
    state = _state()
    assert (state.step, state.epoch, state.position) == (7, 1, 2)
    saved = state.state_dict(state.epoch_sums.values)
    assert saved["epoch_acc"].tolist() == [14.0, 21.0, 28.0] and saved["best"]["value"] == 40.0
    other = TrainState(steps_per_epoch=5, device=torch.device("cpu"))
    other.load_state_dict(saved, Path("last.pt"), is_main=True)
    again = other.state_dict(other.epoch_sums.values)
    assert torch.equal(again.pop("epoch_acc"), saved.pop("epoch_acc")) and again == saved
    assert other.last_good == (Path("last.pt"), 7) and other.best.history == [[0, 40.0], [1, 30.0]]
    assert other.epoch_sums.values[:3].tolist() == [14.0, 21.0, 28.0]
    not_main = TrainState(steps_per_epoch=5, device=torch.device("cpu"))
    not_main.load_state_dict(saved, Path("last.pt"), is_main=False)  # rank 0 alone carries the saved sums
    assert not_main.epoch_sums.values.tolist() == [0.0] * 4 and not_main.step == 7


def test_a_skipped_step_counts_but_stays_out_of_the_epoch_sums_and_epochs_start_clean():
    state = _state(step=5)
    state.account(StepStats(torch.tensor([float("nan")] * 4)), 0.0, skipped=True)
    assert state.step == 6 and torch.isfinite(state.epoch_sums.values).all()
    state = _state(step=5)
    state.begin_epoch()  # position 0: a new epoch
    assert state.epoch_sums.values.tolist() == [0.0] * 4 and state.epoch_data_wait == 0.0


def test_another_number_of_steps_per_epoch_is_refused_naming_both():
    saved = _state().state_dict(torch.zeros(4))
    with pytest.raises(ConfigError, match="written with 5 steps per epoch, this run has 6"):
        TrainState(steps_per_epoch=6, device=torch.device("cpu")).load_state_dict(saved, Path("x.pt"), True)


def test_best_metric_keeps_the_first_best_and_every_value():
    best = BestMetric()
    assert [best.record(e, v) for e, v in enumerate([1.0, 3.0, 3.0, 2.0])] == [True, True, False, False]
    assert (best.value, best.epoch, len(best.history)) == (3.0, 1, 4)
    assert BestMetric.from_state(best.state_dict()) == best


def _payload(**extra) -> dict:
    return {"model": {"fc.weight": torch.zeros(3, 2)}, "ema": None, "step": 12, "epoch": 2, "steps_per_epoch": 5,
            "config": config.to_dict(config.load(None, ["finetune.freeze=backbone", "ckpt.resume=auto"])), **extra}


def test_checkpoint_formats_older_load_newer_are_refused_in_one_line(tmp_path):
    old = tmp_path / "old.pt"
    ckpt.save(_payload(), old)  # format 1: written before the field existed
    saved = ckpt.open_checkpoint(old)
    assert saved.format == 1 and saved.step == 12 and saved.class_names is None
    assert ckpt.load(old)["step"] == 12
    newer = tmp_path / "newer.pt"
    ckpt.save(_payload(format=ckpt.FORMAT + 1), newer)
    for read in (ckpt.load, ckpt.open_checkpoint):
        with pytest.raises(ckpt.CheckpointError) as info:
            read(newer)
        message = str(info.value)
        assert f"format {ckpt.FORMAT + 1}" in message and f"formats 1 to {ckpt.FORMAT}" in message
        assert str(newer) in message and "\n" not in message


def test_typed_readers_give_weights_config_and_place_in_the_run(tmp_path):
    path = tmp_path / "c.pt"
    ckpt.save(_payload(format=ckpt.FORMAT, class_names=["a", "b", "c"], manifest={"world_size": 2}), path)
    saved = ckpt.open_checkpoint(path)
    assert saved.format == ckpt.FORMAT and saved.class_names == ["a", "b", "c"] and saved.manifest["world_size"] == 2
    assert set(saved.weights()) == {"fc.weight"} and saved.where() == "step 12, epoch 2.40"
    with pytest.raises(ckpt.CheckpointError, match="has no EMA weights"):
        saved.weights(ema=True)
    use = saved.config_for_use()
    assert use["finetune"]["freeze"] == "none" and use["ckpt"]["resume"] == "none"
    assert saved.config["finetune"]["freeze"] == "backbone"  # the saved config itself is untouched
    plain = tmp_path / "w.pt"
    ckpt.save({"module.fc.weight": torch.zeros(3, 2)}, plain)
    weights = ckpt.open_checkpoint(plain)
    assert weights.format == 0 and weights.config is None and weights.where() == "weights file"
    assert set(weights.weights()) == {"fc.weight"}


def test_step_stats_are_named_views_of_one_device_tensor():
    stats = StepStats.zeros(torch.device("cpu"))
    stats += StepStats(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert stats.read() == {"loss_sum": 1.0, "correct": 2.0, "count": 3.0, "grad_norm": 4.0}
    assert stats.count.item() == 3.0 and stats.values.shape == (4,)


def test_every_exit_code_is_defined_once_and_documented_in_the_readme():
    codes = {name: value for name, value in vars(exitcodes).items() if name.isupper() and isinstance(value, int)}
    assert len(set(codes.values())) == len(codes), "two names share a code"
    assert set(exitcodes.DESCRIPTIONS) == set(codes.values())
    readme = (REPO / "README.md").read_text()
    table = set(int(code) for code in re.findall(r"^\| (\d+) \|", readme, re.M))
    assert {exitcodes.NONFINITE, exitcodes.HUNG, exitcodes.IO_ERROR, exitcodes.STOPPED, exitcodes.USAGE,
            exitcodes.OK, exitcodes.FAILED} <= table
    package = REPO / "ddp_resnet"
    stray = [f"{p.relative_to(REPO)}:{n}" for p in package.rglob("*.py") if p.name != "exitcodes.py"
             for n, line in enumerate(p.read_text().splitlines(), 1)
             if re.search(r"\bEXIT_\w+\s*=\s*\d", line) or re.search(r"_exit\((?:65|70|74|75)\)", line)]
    assert not stray, f"exit codes defined outside exitcodes.py: {stray}"


def test_the_pipeline_table_names_real_keys_with_their_defaults_and_refuses_what_a_pipeline_cannot_do():
    defaults = config.DataConfig()
    for key, off in pipelines.EXTRA_KEYS:
        assert getattr(defaults, key) == off, key
    for pipeline in pipelines.PIPELINES.values():
        assert set(pipeline.extras) <= {key for key, _ in pipelines.EXTRA_KEYS}
        assert set(pipeline.augments) <= set(config.choices("data.augment")) - {"auto"}
    assert pipelines.PIPELINES["gpu"].refusal(defaults, "crop_flip") is None
    config.load(None, ["data.dataset=imagefolder", "data.decode=device", "data.res_start=128", "data.res_end=160"])
    with pytest.raises(ConfigError, match=r"data.decode: .* cannot apply data.cutout=8; use data.decode=workers"):
        config.load(None, ["data.dataset=imagefolder", "data.decode=device", "data.cutout=8"])


def test_workers_auto_follows_the_cores_each_rank_gets():
    cfg = config.load(None).data
    assert cfg.workers == "auto" and config.load(None, ["data.workers=3"]).data.workers == 3
    assert 0 <= auto_workers(1) <= MAX_AUTO_WORKERS and auto_workers(10_000) == 0
    assert auto_workers(1) >= auto_workers(2)
    assert with_workers(cfg, 1).workers == auto_workers(1)
    assert with_workers(dataclasses.replace(cfg, workers=2), 1).workers == 2
    with pytest.raises(ConfigError, match="data.workers: expected an integer or one of auto"):
        config.load(None, ["data.workers=many"])


def test_config_command_prints_the_resolved_yaml_and_every_key():
    def run(*args):
        return subprocess.run([sys.executable, "-m", "ddp_resnet.config", *args], capture_output=True, text=True,
                              cwd=REPO, timeout=120)

    resolved = run("--config", "configs/cpu_smoke.yaml", "optim.lr=0.3")
    assert resolved.returncode == 0, resolved.stderr
    assert config.from_dict(config.yaml_load(resolved.stdout)) == config.load(REPO / "configs/cpu_smoke.yaml",
                                                                              ["optim.lr=0.3"])
    listing = run("--keys")
    assert listing.returncode == 0
    rows = config.keys()
    leaves = sum(len(dataclasses.fields(f.type if not isinstance(f.type, str) else getattr(config, f.type)))
                 for f in dataclasses.fields(config.Config) if f.name != "output_dir") + 1
    assert len(rows) == leaves and len({r["key"] for r in rows}) == len(rows)
    for row in rows:
        assert re.search(rf"^{re.escape(row['key'])}  \(", listing.stdout, re.M), row["key"]
    amp = next(r for r in rows if r["key"] == "train.amp")
    assert amp["choices"] == ["none", "bf16", "fp16"] and "GradScaler" in amp["doc"]
    assert "the node's cores" in next(r for r in rows if r["key"] == "data.workers")["doc"]  # a continued comment
    bad = run("optim.lr=x")
    assert bad.returncode == exitcodes.USAGE and bad.stderr.strip() == "error: optim.lr: expected a number, got 'x'"


def test_functions_and_classes_stay_readable():
    """The size guide: no function over 60 lines, no class over 300, anywhere in the package."""
    import ast

    over = []
    for path in sorted((REPO / "ddp_resnet").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > (300 if isinstance(node, ast.ClassDef) else 60):
                    over.append(f"{path.relative_to(REPO)}:{node.name} ({lines} lines)")
    assert not over, over


def test_a_checkpoint_written_before_the_format_field_resumes_exactly(tmp_path):
    """A format-1 last.pt (the same keys, without "format" and "class_names") resumes to the uninterrupted run."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    ok(run_train(whole))
    ok(run_train(parts, "train.run_steps=3"))
    last = parts / "checkpoints" / "last.pt"
    payload = torch.load(last, weights_only=True)
    assert payload["format"] == ckpt.FORMAT and payload["class_names"] == [f"class_{i}" for i in range(10)]
    for key in ("format", "class_names"):
        del payload[key]
    ckpt.save(payload, last)
    assert ckpt.open_checkpoint(last).format == 1
    resumed = run_train(parts)
    ok(resumed)
    assert "resumed from" in resumed.stdout
    assert_bitwise_equal(weights(whole / "checkpoints/last.pt"), weights(last))
