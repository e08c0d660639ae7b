"""Configuration: recipes load, overrides apply, bad input fails in one line before anything runs."""
from __future__ import annotations

import pytest
import yaml

from conftest import REPO, TINY, child_env, run_train
from ddp_resnet import config
from ddp_resnet.config import ConfigError

RECIPES = sorted(p.relative_to(REPO) for p in (REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=str)
def test_every_shipped_recipe_loads_and_validates(recipe):
    cfg = config.load(REPO / recipe)
    assert cfg.data.batch_size > 0


def test_recipes_match_the_published_settings():
    r18 = config.load(REPO / "configs/cifar10_resnet18.yaml")
    assert (r18.optim.lr, r18.optim.momentum, r18.optim.weight_decay, r18.optim.schedule, r18.train.epochs,
            r18.data.batch_size, r18.data.crop_padding) == (0.1, 0.9, 5e-4, "cosine", 200, 128, 4)
    r56 = config.load(REPO / "configs/cifar10_resnet56.yaml")
    assert (r56.optim.milestones, r56.optim.milestones_unit, r56.train.max_steps, r56.optim.weight_decay) == (
        (32000.0, 48000.0), "step", 64000, 1e-4)
    r50 = config.load(REPO / "configs/imagenet_resnet50.yaml")
    assert (r50.train.epochs, r50.optim.milestones, r50.data.batch_size) == (90, (30.0, 60.0), 256)


def test_dotted_overrides_are_typed():
    cfg = config.load(None, ["optim.lr=0.2", "train.epochs=5", "train.sync_bn=true", "optim.milestones=[1, 2]",
                             "finetune.stage_lr={layer4: 1.0e-4, fc: 1.0e-3}"])
    assert cfg.optim.lr == 0.2 and cfg.train.epochs == 5 and cfg.train.sync_bn is True
    assert cfg.optim.milestones == (1.0, 2.0)
    assert cfg.finetune.stage_lr == {"layer4": 1e-4, "fc": 1e-3}


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=0.1", "unknown config key 'optim.lrr'; valid keys here: name, lr,"),
    ("train.epochs=abc", "train.epochs: expected an integer, got 'abc'"),
    ("train.sync_bn=maybe", "train.sync_bn: expected true or false"),
    ("model.name=resnet9000", "model.name: unknown model 'resnet9000'; valid choices: "),
    ("data.dataset=mnist", "data.dataset: unknown value 'mnist'; valid choices: cifar10, cifar100, imagefolder"),
    ("train.amp=fp8", "train.amp: unknown value 'fp8'; valid choices: none, bf16, fp16"),
    ("optim.lr=-1", "optim.lr: must be > 0"),
    ("bogus=1", "unknown config key 'bogus'"),
])
def test_bad_values_name_the_key_and_the_choices(override, message):
    with pytest.raises(ConfigError) as info:
        config.load(None, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_batch_not_divisible_by_world_size_is_refused():
    cfg = config.load(None, ["data.batch_size=10"])
    with pytest.raises(ConfigError, match="not divisible by world size 3"):
        config.validate_world(cfg, 3)


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = config.load(None, ["optim.milestones=[3, 6]", "optim.schedule=multistep"])
    config.save_yaml(cfg, tmp_path / "c.yaml")
    assert config.from_dict(yaml.safe_load((tmp_path / "c.yaml").read_text())) == cfg


@pytest.mark.parametrize("overrides, env, message", [
    (["optim.lrr=1"], {}, "unknown config key 'optim.lrr'"),
    (["model.name=nope"], {}, "valid choices: "),
    (["data.batch_size=30"], {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}, "not divisible by world size 4"),
    (["data.dataset=cifar10", "data.root=/nonexistent"], {}, "data.root"),
    (["data.batch_size=4096"], {}, "larger than the training set"),
])
def test_bad_config_exits_2_with_one_line_and_writes_nothing(tmp_path, overrides, env, message):
    out = tmp_path / "run"
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "ddp_resnet.train", *TINY, f"output_dir={out}", *overrides],
                          cwd=REPO, env=child_env(env), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not out.exists()


def test_resume_none_refuses_to_overwrite_an_existing_run(tmp_path):
    out = tmp_path / "run"
    assert run_train(out, "train.epochs=1").returncode == 0
    before = (out / "metrics.jsonl").read_text()
    proc = run_train(out, "train.epochs=1", "ckpt.resume=none")
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
    assert (out / "metrics.jsonl").read_text() == before
