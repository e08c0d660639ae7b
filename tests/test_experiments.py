"""Experiments: every recipe and sweep point validates, the SLURM command is built, smoke runs draw their figures."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import REPO, child_env, ok
from ddp_resnet import config, experiments, plots
from ddp_resnet.experiments import analyses

# Even smaller than --smoke for the heavier recipes: 8 px images, 16 test images.
TINIER = ["data.synthetic_image_size=8", "data.synthetic_test_size=16", "data.eval_batch_size=16"]


def _png_size(path):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


@pytest.mark.parametrize("name", sorted(experiments.EXPERIMENTS))
def test_every_experiment_recipe_and_sweep_point_validates(name, capsys):
    recipe = REPO / "configs" / "experiments" / experiments.EXPERIMENTS[name].recipe
    cfg = config.load(recipe)
    assert cfg.data.dataset == "cifar10" and cfg.data.batch_size == 128 and cfg.optim.lr == 0.1
    for smoke in ([], ["--smoke"]):
        assert experiments.main([name, "--dry-run", "--data-root", "/data/cifar", *smoke]) == 0
    printed = capsys.readouterr().out
    for _, values in experiments.EXPERIMENTS[name].sweep:
        for value in values:
            assert value in printed


def test_recipes_follow_the_paper_and_the_seeds():
    for name in ("degradation", "depth_sweep"):
        cfg = config.load(REPO / f"configs/experiments/{name}.yaml")
        assert (cfg.optim.weight_decay, cfg.optim.milestones, cfg.optim.milestones_unit, cfg.train.max_steps,
                cfg.optim.gamma) == (1e-4, (32000.0, 48000.0), "step", 64000, 0.1)
    wd = config.load(REPO / "configs/experiments/wd_ablation.yaml")
    seeds = config.load(REPO / "configs/cifar10_resnet18.yaml")
    assert (wd.model, wd.data, wd.train) == (seeds.model, seeds.data, seeds.train)
    assert [v for _, vs in experiments.EXPERIMENTS["wd_ablation"].sweep for v in vs] == ["5e-4", "1e-4"]
    assert experiments.EXPERIMENTS["degradation"].sweep == (
        ("model.name", ("plain20", "plain56", "resnet20", "resnet56")),)


def test_slurm_flag_prints_the_equivalent_sweep_command(tmp_path, capsys):
    out = tmp_path / "deg"
    assert experiments.main(["degradation", "--slurm", "--dry-run", "--data-root", "/data/cifar", "--out", str(out),
                             "--", "--partition", "gpu", "--time", "600"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("python -m ddp_resnet.slurm --config ")
    assert "configs/experiments/degradation.yaml data.root=/data/cifar" in line
    assert f"output_dir={out} --sweep model.name=plain20,plain56,resnet20,resnet56 --gpus-per-node 1 " \
           f"--partition gpu --time 600" in line
    assert not out.exists()


def test_bad_usage_is_one_line_exit_2(capsys):
    assert experiments.main(["no_such_experiment"]) == 2
    assert experiments.main(["degradation", "--dry-run", "optim.lr=-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "valid choices: degradation" in err[0] and "optim.lr" in err[1]


def test_degradation_smoke_trains_and_draws_train_and_test_error(tmp_path):
    out = tmp_path / "deg"
    assert experiments.main(["degradation", "--smoke", "--out", str(out),
                             "--sweep", "model.name=plain20,resnet20"]) == 0
    for name in ("nameplain20", "nameresnet20"):
        records = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [2, 4]
    w, h = analyses.CURVES_FIGSIZE_PER_PANEL
    assert _png_size(out / "degradation.png") == plots.size_px(2 * w, h)  # a plain panel and a ResNet panel
    results = (out / "results.md").read_text()
    assert "| plain20 |" in results and "| resnet20 |" in results
    # Running it again trains nothing more (finished runs resume at their end) and redraws.
    before = (out / "nameresnet20/checkpoints/last.pt").stat().st_mtime_ns
    assert experiments.main(["degradation", "--smoke", "--out", str(out), "--sweep", "model.name=plain20,resnet20",
                             "--analyze-only"]) == 0
    assert (out / "nameresnet20/checkpoints/last.pt").stat().st_mtime_ns == before


def test_wd_ablation_smoke_runs_the_resnet18_recipe_with_both_weight_decays(tmp_path):
    out = tmp_path / "wd"
    assert experiments.main(["wd_ablation", "--smoke", "--out", str(out), *TINIER]) == 0
    for wd, name in ((5e-4, "weight_decay5e-4"), (1e-4, "weight_decay1e-4")):
        cfg = config.load(out / name / "config.yaml")
        assert (cfg.model.name, cfg.optim.weight_decay, cfg.optim.schedule) == ("resnet18", wd, "cosine")
    w, h = analyses.CURVES_FIGSIZE_PER_PANEL
    assert _png_size(out / "wd_ablation.png") == plots.size_px(2 * w, h)
    assert "weight_decay=5e-4" in (out / "results.md").read_text()


def test_depth_sweep_smoke_writes_the_error_vs_depth_table(tmp_path):
    out = tmp_path / "depth"
    assert experiments.main(["depth_sweep", "--smoke", "--out", str(out), "--sweep", "model.name=resnet32,resnet20",
                             *TINIER]) == 0
    with open(out / "depth_table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["depth"]) for r in rows] == [("resnet20", "20"), ("resnet32", "32")]  # sorted by depth
    assert float(rows[0]["params_M"]) == pytest.approx(0.27, abs=0.01)
    assert all(0 <= float(r["final_test_error"]) <= 100 for r in rows)
    table = (out / "depth_table.md").read_text()
    assert "| resnet20 | 20 |" in table and "| resnet32 | 32 |" in table
    assert _png_size(out / "depth_sweep.png") == plots.size_px(*analyses.DEPTH_FIGSIZE)


def test_augment_ablation_smoke_trains_every_tip_and_tabulates_them_with_the_ensemble(tmp_path, capsys):
    out = tmp_path / "abl"
    assert experiments.main(["augment_ablation", "--smoke", "--out", str(out), *TINIER]) == 0
    tips = [label for label, _ in experiments.EXPERIMENTS["augment_ablation"].points]
    assert {"baseline", "cutout", "random_erasing", "color_jitter", "rotate_scale", "mixup", "cutmix", "autoaugment",
            "trivialaugment", "head_dropout", "label_smoothing", "warmup", "cyclic_lr"} <= set(tips)
    cutout = config.load(out / "cutout" / "config.yaml")
    assert (cutout.model.name, cutout.data.cutout, cutout.optim.schedule) == ("resnet18", 16, "cosine")
    assert config.load(out / "cyclic_lr" / "config.yaml").optim.schedule == "cyclic"
    with open(out / "augment_ablation.csv") as f:
        rows = {r["tip"]: r for r in csv.DictReader(f)}
    assert set(tips) | {"ensemble of 3"} == set(rows) and float(rows["baseline"]["delta_vs_baseline"]) == 0
    for tip in tips:
        assert float(rows[tip]["delta_vs_baseline"]) == pytest.approx(
            float(rows[tip]["final_test_error"]) - float(rows["baseline"]["final_test_error"]))
    ensemble = json.loads((out / "ensemble.json").read_text())
    assert [m["checkpoint"] for m in ensemble["members"]] == [
        str(out / name / "checkpoints/last.pt") for name in ("baseline", "baseline_seed1", "baseline_seed2")]
    assert float(rows["ensemble of 3"]["final_test_error"]) == pytest.approx(100 - ensemble["top1"])
    assert "| cutout | data.cutout=16 |" in (out / "augment_ablation.md").read_text()
    assert _png_size(out / "augment_ablation.png") == plots.size_px(*analyses.ABLATION_FIGSIZE)
    capsys.readouterr()
    assert experiments.main(["augment_ablation", "--slurm", "--dry-run", "--out", str(out / "s")]) == 0
    commands = capsys.readouterr().out.splitlines()
    assert sum(c.startswith("python -m ddp_resnet.slurm --config ") for c in commands) == len(tips)  # one job each
    assert any("data.cutout=16 output_dir=" in c for c in commands)


def test_gradient_flow_command_draws_per_block_norms_on_a_log_scale(tmp_path):
    out = tmp_path / "grad"
    proc = ok(subprocess.run([sys.executable, "-m", "ddp_resnet.experiments", "gradient_flow", "--smoke", "--out",
                              str(out)], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300))
    assert "plain56" in proc.stdout and "resnet56" in proc.stdout
    result = json.loads((out / "gradient_flow.json").read_text())
    assert set(result) == {"plain56", "resnet56"}
    for entry in result.values():
        # stem, 27 blocks (3 stages x 9), classifier
        assert entry["blocks"][0] == "stem" and entry["blocks"][-1] == "fc" and len(entry["blocks"]) == 29
        assert all(math.isfinite(n) and n > 0 for n in entry["grad_norm"])
    assert _png_size(out / "gradient_flow.png") == plots.size_px(*analyses.GRADIENT_FIGSIZE)
    with open(out / "gradient_flow.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * 29


def test_block_gradient_norms_match_the_parameters_gradients():
    from ddp_resnet.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10)
    norms, loss = analyses.gradient_norms(model, torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    names = [k for k, _ in norms]
    assert names == ["stem"] + [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)] + ["fc"]
    block = dict(norms)["layer2.1"]
    expected = torch.sqrt(sum((p.grad ** 2).sum() for p in model.layer2[1].parameters()))
    assert block == pytest.approx(float(expected), rel=1e-6) and loss > 0
