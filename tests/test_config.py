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


def test_todays_imagenet_recipes_carry_their_published_settings():
    tv = config.load(REPO / "configs/imagenet_resnet50_torchvision_v2.yaml")
    d, o, t = tv.data, tv.optim, tv.train
    assert (t.epochs, d.batch_size, o.lr, o.warmup_epochs, o.warmup_start_factor, o.schedule, o.weight_decay,
            o.no_wd_bn_bias) == (600, 1024, 0.5, 5, 0.01, "cosine", 2e-5, True)
    assert (t.label_smoothing, d.mixup_alpha, d.cutmix_alpha, d.auto_augment, d.random_erasing, d.repeated_aug) == (
        0.1, 0.2, 1.0, "trivialaugment", 0.1, 4)
    assert (d.image_size, d.eval_resize, d.eval_size, o.ema_decay > 0) == (176, 232, 224, True)
    fast = config.load(REPO / "configs/imagenet_resnet50_fast.yaml", ["train.epochs=88"])
    d, o = fast.data, fast.optim
    assert (fast.model.blurpool, d.res_start, d.res_end, d.res_ramp_start, d.res_ramp_end, d.eval_size) == (
        True, 160, 192, 0.75, 0.875, 224)
    assert (o.schedule, o.warmup_epochs, o.no_wd_bn_bias, fast.train.label_smoothing) == ("linear", 2, True, 0.1)
    from ddp_resnet.data.loaders import train_schedule

    for epochs in (16, 88):  # the resolution schedule follows the run's length
        schedule = train_schedule(d, epochs)
        assert (schedule.size(0), schedule.size(epochs - 1)) == (160, 192)
    fast_anchors = ["73.8% (14.9 min)", "75.6% (21.7 min)", "78.4% (77.2 min)"]
    for path, anchors in (("imagenet_resnet50_torchvision_v2.yaml", ["80.86%"]),
                          ("imagenet_resnet50_fast.yaml", fast_anchors)):
        header = [line for line in (REPO / "configs" / path).read_text().splitlines() if line.startswith("#")]
        assert all(a in " ".join(header[:3]) for a in anchors) and "not measured here" in " ".join(header[:3])


@pytest.mark.parametrize("override, message", [
    ("data.auto_augment=autoaugmentx", "data.auto_augment: unknown value 'autoaugmentx'; valid choices: none, "
                                       "trivialaugment, randaugment, autoaugment"),
    ("data.random_erasing=1.5", "data.random_erasing: must be in [0, 1]"),
    ("data.color_jitter=-0.1", "data.color_jitter: must be in [0, 1]"),
    ("data.repeated_aug=0", "data.repeated_aug: must be > 0"),
    ("data.res_start=160", "data.res_start, data.res_end: set both"),
    ("data.res_ramp_start=0.9", "data.res_ramp_end: must be in [0.9, 1]"),
    ("model.head_dropout=1", "model.head_dropout: must be in [0, 1)"),
    ("optim.schedule=triangle", "optim.schedule: unknown value 'triangle'; valid choices: cosine, multistep, "
                                "onecycle, constant, linear, cyclic"),
    ("optim.cycle_unit=hour", "optim.cycle_unit: unknown value 'hour'; valid choices: epoch, step"),
])
def test_new_keys_fail_in_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        config.load(None, [override])
    assert message in str(info.value) and "\n" not in str(info.value)
    device = config.load(None, ["data.dataset=imagefolder", "data.decode=workers", "data.cutout=8"])
    assert device.data.cutout == 8
    with pytest.raises(ConfigError, match="data.decode: device decoding applies crop, flip and random-resized crop"):
        config.load(None, ["data.dataset=imagefolder", "data.decode=device", "data.cutout=8"])


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


@pytest.mark.parametrize("text, want", [("false", "false"), ("true", "true"), ("auto", "auto")])
def test_a_literal_choice_spelled_like_a_yaml_bool_is_accepted(text, want):
    """optim.fused=false reaches the loader as YAML's False: the choice 'false' is meant, not an error."""
    assert config.load(None, [f"optim.fused={text}"]).optim.fused == want
