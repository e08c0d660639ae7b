"""Engine pieces in one process: accumulation, clipping, LR schedules, EMA, exact evaluation sums."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ddp_resnet import config
from ddp_resnet.engine import StepSettings, TrainStep, evaluate, evaluate_ensemble
from ddp_resnet.optim import ModelEma, build_optimizer, build_scheduler, lr_factor, param_groups


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))


def _stepper(model, cfg, **settings):
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg.optim, 100, 10)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return TrainStep(model, opt, sched, scaler, StepSettings(device=torch.device("cpu"), num_classes=5, **settings))


def test_two_micro_batches_give_the_weights_of_one_full_batch():
    cfg = config.load(None, ["optim.weight_decay=0", "optim.momentum=0"])
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    full, accum = _net(), _net()
    _stepper(full, cfg)([(x, y)], 0)
    _stepper(accum, cfg)([(x[:4], y[:4]), (x[4:], y[4:])], 0)
    for a, b in zip(full.parameters(), accum.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_gradient_clipping_bounds_the_update():
    cfg = config.load(None, ["optim.weight_decay=0", "optim.momentum=0", "optim.lr=1.0",
                             "optim.clip_grad_norm=0.01", "optim.schedule=constant"])
    model = _net()
    before = [p.detach().clone() for p in model.parameters()]
    _stepper(model, cfg, clip_grad_norm=0.01)([(torch.randn(8, 3, 8, 8) * 100, torch.zeros(8).long())], 0)
    update = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert update <= 0.01 + 1e-6


def test_step_returns_loss_sum_correct_and_count():
    cfg = config.load(None)
    stats = _stepper(_net(), cfg)([(torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,)))], 0)
    assert stats.count.item() == 6 and 0 <= stats.correct.item() <= 6 and stats.loss_sum.item() > 0


def test_schedules():
    ocfg = config.load(None, ["optim.warmup_epochs=1", "optim.warmup_start_factor=0.1"]).optim
    assert lr_factor(0, ocfg, 100, 10) == pytest.approx(0.1)
    assert lr_factor(10, ocfg, 100, 10) == pytest.approx(1.0)
    assert lr_factor(100, ocfg, 100, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(55, ocfg, 100, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    ms = config.load(None, ["optim.schedule=multistep", "optim.milestones=[32000, 48000]",
                            "optim.milestones_unit=step"]).optim
    assert [lr_factor(s, ms, 64000, 391) for s in (31999, 32000, 47999, 48000)] == pytest.approx(
        [1, 0.1, 0.1, 0.01])
    ep = config.load(None, ["optim.schedule=multistep", "optim.milestones=[30, 60]"]).optim
    assert lr_factor(30 * 5005 - 1, ep, 90 * 5005, 5005) == 1 and lr_factor(30 * 5005, ep, 90 * 5005, 5005) == 0.1
    oc = config.load(None, ["optim.schedule=onecycle"]).optim
    assert lr_factor(30, oc, 100, 10) == pytest.approx(1.0) and lr_factor(0, oc, 100, 10) < 0.2


def test_no_weight_decay_on_bn_and_bias():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4))
    groups = param_groups(model, config.load(None, ["optim.no_wd_bn_bias=true"]).optim, 0.1)
    decays = {g["weight_decay"]: sum(p.numel() for p in g["params"]) for g in groups}
    assert decays == {5e-4: 4 * 3 * 9, 0.0: 4 + 4 + 4}


def test_linear_scaling_rule_is_off_unless_asked():
    from ddp_resnet.optim import peak_lr

    assert peak_lr(config.load(None, ["data.batch_size=1024"])) == 0.1
    assert peak_lr(config.load(None, ["data.batch_size=1024", "optim.lr_scale_ref_batch=256"])) == pytest.approx(0.4)


def test_ema_moves_towards_the_weights():
    model = _net()
    ema = ModelEma(model, 0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for e, p in zip(ema.module.parameters(), model.parameters()):
        torch.testing.assert_close(e, p - 0.9)


def test_evaluate_counts_every_sample_and_builds_the_confusion_matrix():
    model = _net().eval()
    batches = [(torch.randn(7, 3, 8, 8), torch.randint(0, 5, (7,))), (torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2]))]
    result = evaluate(model, batches, 5, torch.device("cpu"))
    assert result["count"] == 10 and sum(map(sum, result["confusion"])) == 10
    preds = torch.cat([model(x).argmax(1) for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert result["top1"] == pytest.approx(100 * (preds == labels).float().mean().item())
    assert result["top5"] == 100.0  # 5 classes: top-5 always hits


def test_linear_schedule_is_ffcvs_ramp_up_and_down():
    ocfg = config.load(None, ["optim.schedule=linear", "optim.warmup_epochs=2", "optim.warmup_start_factor=1e-4"]).optim
    epochs, per_epoch = 8, 10
    for step in range(epochs * per_epoch + 1):  # FFCV: np.interp(epoch, [0, lr_peak_epoch, epochs], [1e-4, 1, 0])
        expected = np.interp(step / per_epoch, [0, 2, epochs], [1e-4, 1, 0])
        assert lr_factor(step, ocfg, epochs * per_epoch, per_epoch) == pytest.approx(expected, abs=1e-12)


def test_cyclic_schedule_is_triangular_in_steps_or_epochs():
    steps = config.load(None, ["optim.schedule=cyclic", "optim.cycle_period=4", "optim.cycle_unit=step",
                               "optim.lr=0.1", "optim.min_lr=0.01"]).optim
    assert [lr_factor(s, steps, 100, 10) for s in range(9)] == pytest.approx(
        [0.1, 0.55, 1.0, 0.55, 0.1, 0.55, 1.0, 0.55, 0.1])
    epochs = config.load(None, ["optim.schedule=cyclic", "optim.cycle_period=2", "optim.warmup_epochs=1",
                                "optim.warmup_start_factor=0.5"]).optim
    values = [lr_factor(s, epochs, 100, 10) for s in range(60)]
    assert values[:10] == pytest.approx([0.5 + 0.05 * s for s in range(10)])  # warm-up, then triangles of 20 steps
    assert values[10] == 0.0 and values[20] == 1.0 and values[30] == 0.0 and values[15] == pytest.approx(0.5)
    assert values[10:30] == pytest.approx(values[30:50])
    with pytest.raises(config.ConfigError, match="optim.cycle_period: must be > 0"):
        config.load(None, ["optim.cycle_period=0"])


def _models(count: int) -> list[nn.Module]:
    nets = []
    for seed in range(count):
        torch.manual_seed(seed)
        nets.append(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(4, 7)).eval())
    return nets


@pytest.mark.parametrize("tta", [False, True])
def test_ensemble_evaluation_is_each_members_and_the_averaged_probabilities(tta):
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 7, (n,), generator=gen)) for n in (9, 5, 8)]
    models = _models(3)
    cpu = torch.device("cpu")
    members, ensemble = evaluate_ensemble(models, batches, 7, cpu, tta_flip=tta)
    for model, result in zip(models, members):
        assert result == evaluate(model, batches, 7, cpu, tta_flip=tta)  # exactly the single-model numbers
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    with torch.no_grad():
        def probs(m):
            p = m(images).softmax(1)
            return (p + m(images.flip(3)).softmax(1)) / 2 if tta else p
        mean = torch.stack([probs(m) for m in models]).mean(0)
    hits = int((mean.argmax(1) == labels).sum())
    top5 = int((mean.topk(5, 1).indices == labels[:, None]).any(1).sum())
    assert ensemble["count"] == 22 and ensemble["top1"] == 100 * hits / 22 and ensemble["top5"] == 100 * top5 / 22
    assert ensemble["loss"] == pytest.approx(-mean[torch.arange(22), labels].log().mean().item(), rel=1e-6)
    assert sum(map(sum, ensemble["confusion"])) == 22
    assert len({r["top1"] for r in members}) > 1  # the members differ, so the average is a real ensemble
    only, alone = evaluate_ensemble(models[:1], batches, 7, cpu, tta_flip=tta)
    single = evaluate(models[0], batches, 7, cpu, tta_flip=tta)
    assert alone["top1"] == only[0]["top1"] == single["top1"] and alone["confusion"] == single["confusion"]
    assert alone["loss"] == pytest.approx(single["loss"], rel=1e-6)
