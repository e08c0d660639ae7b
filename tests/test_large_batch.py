"""Large-batch training: LARS and LAMB against their formulas, the poly schedule, the BCE loss, the recipes, and
short runs that learn and resume bit for bit."""
from __future__ import annotations

import copy
import io
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import REPO, TINY, assert_bitwise_equal, weights
from ddp_resnet import config
from ddp_resnet.config import LENGTH_FREE_SCHEDULES, ConfigError, OptimConfig
from ddp_resnet.engine import StepSettings, TrainStep, bce_loss, training_loss
from ddp_resnet.large_batch import LAMB, LAMB_EPS, LARS
from ddp_resnet.optim import build_optimizer, build_scheduler, lr_factor, param_groups, uses_fused
from ddp_resnet.state import apply_hyperparameters, hyperparameters

CPU = torch.device("cpu")


def _net() -> nn.Module:
    """A Linear (weight adapted, bias excluded with no_wd_bn_bias) and a BatchNorm1d (both excluded)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    with torch.no_grad():  # BatchNorm starts at (1, 0): give it values whose norms mean something
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    return net


def _grads(net: nn.Module, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen) * 0.1 for p in net.parameters()]


def _set_grads(net: nn.Module, grads: list[torch.Tensor]) -> None:
    for p, g in zip(net.parameters(), grads):
        p.grad = g.clone()


def _lars_by_hand(w, g, v, lr, wd, eta, momentum, adapt):
    """MLPerf's LARS for one tensor, in float64: returns (new w, new momentum buffer)."""
    w, g = w.double(), g.double()
    wn, gn = w.norm().item(), g.norm().item()
    local = eta * wn / (gn + wd * wn) if adapt and wn > 0 and gn > 0 else 1.0
    v = momentum * v + lr * local * (g + wd * w)
    return w - v, v


def _lamb_by_hand(w, g, m, v, t, lr, wd, adapt, b1=0.9, b2=0.999, eps=LAMB_EPS):
    """LAMB for one tensor at step t, in float64: returns (new w, m, v)."""
    w, g = w.double(), g.double()
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    u = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps) + wd * w
    wn, un = w.norm().item(), u.norm().item()
    r = wn / un if adapt and wn > 0 and un > 0 else 1.0
    return w - lr * r * u, m, v


def _groups(net, name, wd, no_wd, lr):
    return param_groups(net, OptimConfig(name=name, weight_decay=wd, no_wd_bn_bias=no_wd), lr)


def _rules(net: nn.Module, groups: list[dict]) -> list[tuple[bool, float]]:
    """Per parameter, in the model's order: (its group applies the trust ratio, its group's weight decay)."""
    rule = {id(p): (g["adapt"], g["weight_decay"]) for g in groups for p in g["params"]}
    return [rule[id(p)] for p in net.parameters()]


# ------------------------------------------------------------------------------------------ the update rules
@pytest.mark.parametrize("wd, no_wd", [(0.0, True), (5e-3, True), (5e-3, False)],
                         ids=["no-decay", "decay-bn-bias-excluded", "decay-all-adapted"])
def test_lars_two_steps_follow_mlperfs_rule(wd, no_wd):
    net = _net()
    groups = _groups(net, "lars", wd, no_wd, lr=2.0)
    rules = _rules(net, groups)
    excluded = (False, 0.0)
    assert rules == ([(True, wd), excluded, excluded, excluded] if no_wd else [(True, wd)] * 4)
    opt = LARS(groups, lr=2.0, momentum=0.9, weight_decay=wd, trust_coefficient=0.01)
    expected = [(p.detach().double().clone(), torch.zeros(p.shape, dtype=torch.float64)) for p in net.parameters()]
    for step, lr in enumerate((2.0, 0.5)):  # a new lr at step 2: old momentum keeps the rate it was taken at
        for group in opt.param_groups:
            group["lr"] = lr
        grads = _grads(net, step)
        _set_grads(net, grads)
        opt.step()
        expected = [_lars_by_hand(w, g, v, lr, decay, 0.01, 0.9, adapt)
                    for (w, v), g, (adapt, decay) in zip(expected, grads, rules)]
        for p, (w, _) in zip(net.parameters(), expected):
            torch.testing.assert_close(p.detach().double(), w, rtol=1e-5, atol=1e-7)
    for p, (_, v) in zip(net.parameters(), expected):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"].double(), v, rtol=1e-5, atol=1e-7)


def test_lars_nesterov_looks_ahead_by_one_momentum_step():
    """TensorFlow's Nesterov form, as MLPerf's reference has it: w -= m * v + lr * local_lr * g'."""
    net = _net()
    groups = _groups(net, "lars", 1e-3, True, lr=1.0)
    rules = _rules(net, groups)
    opt = LARS(groups, lr=1.0, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02, nesterov=True)
    expected = [(p.detach().double().clone(), torch.zeros(p.shape, dtype=torch.float64)) for p in net.parameters()]
    for step in range(2):
        grads = _grads(net, 20 + step)
        _set_grads(net, grads)
        opt.step()
        updated = []
        for (w, v), g, (adapt, decay) in zip(expected, grads, rules):
            _, v_new = _lars_by_hand(w, g, v, 1.0, decay, 0.02, 0.9, adapt)
            scaled = v_new - 0.9 * v  # lr * local_lr * g'
            updated.append((w - (0.9 * v_new + scaled), v_new))
        expected = updated
    for p, (w, _) in zip(net.parameters(), expected):
        torch.testing.assert_close(p.detach().double(), w, rtol=1e-5, atol=1e-7)


def test_lars_is_not_the_torch_style_form_once_the_lr_changes():
    """The torch-style form (w -= lr * v, v unscaled) gives other weights after an lr change: the test above
    tells the two apart."""
    net = _net()
    opt = LARS(_groups(net, "lars", 0.0, False, 1.0), lr=1.0, momentum=0.9, trust_coefficient=0.01)
    w0 = [p.detach().double().clone() for p in net.parameters()]
    buf, torch_style = [torch.zeros_like(w) for w in w0], [w.clone() for w in w0]
    for step, lr in enumerate((1.0, 0.1)):
        for group in opt.param_groups:
            group["lr"] = lr
        grads = _grads(net, step)
        _set_grads(net, grads)
        opt.step()
        for i, g in enumerate(grads):
            local = 0.01 * torch_style[i].norm() / g.double().norm()
            buf[i] = 0.9 * buf[i] + local * g.double()
            torch_style[i] = torch_style[i] - lr * buf[i]
    assert not torch.allclose(net[0].weight.detach().double(), torch_style[0], rtol=1e-3)


@pytest.mark.parametrize("wd, no_wd", [(0.0, True), (0.02, True), (0.02, False)],
                         ids=["no-decay", "decay-bn-bias-excluded", "decay-all-adapted"])
def test_lamb_two_steps_follow_the_papers_rule(wd, no_wd):
    net = _net()
    groups = _groups(net, "lamb", wd, no_wd, lr=0.01)
    rules = _rules(net, groups)
    assert [adapt for adapt, _ in rules] == ([True, False, False, False] if no_wd else [True] * 4)
    opt = LAMB(groups, lr=0.01, weight_decay=wd)
    assert all(g["eps"] == LAMB_EPS for g in opt.param_groups)
    expected = [(p.detach().double().clone(), 0.0, 0.0) for p in net.parameters()]
    for step, lr in enumerate((0.01, 0.004)):
        for group in opt.param_groups:
            group["lr"] = lr
        grads = _grads(net, 10 + step)
        _set_grads(net, grads)
        opt.step()
        expected = [_lamb_by_hand(w, g, m, v, step + 1, lr, decay, adapt)
                    for (w, m, v), g, (adapt, decay) in zip(expected, grads, rules)]
        for p, (w, _, _) in zip(net.parameters(), expected):
            torch.testing.assert_close(p.detach().double(), w, rtol=1e-5, atol=1e-7)
    for p, (_, m, v) in zip(net.parameters(), expected):
        state = opt.state[p]
        assert state["step"].item() == 2
        torch.testing.assert_close(state["exp_avg"].double(), m, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(state["exp_avg_sq"].double(), v, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("cls, lr", [(LARS, 2.0), (LAMB, 0.01)], ids=["lars", "lamb"])
def test_state_dict_round_trip_continues_bit_for_bit(cls, lr):
    net = _net()
    opt = cls(_groups(net, cls.__name__.lower(), 1e-3, True, lr), lr=lr, weight_decay=1e-3)
    for step in range(2):
        _set_grads(net, _grads(net, step))
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # as a checkpoint holds it, loaded as checkpoints are (weights only)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    twin = copy.deepcopy(net)
    opt2 = cls(_groups(twin, cls.__name__.lower(), 1e-3, True, lr), lr=lr, weight_decay=1e-3)
    opt2.load_state_dict(saved)
    assert [g["adapt"] for g in opt2.param_groups] == [g["adapt"] for g in opt.param_groups]
    for model, optimizer in ((net, opt), (twin, opt2)):
        _set_grads(model, _grads(model, 7))
        optimizer.step()
    assert_bitwise_equal(net.state_dict(), twin.state_dict())
    for p, q in zip(net.parameters(), twin.parameters()):
        assert_bitwise_equal(opt.state[p], opt2.state[q])


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_grad_scaler_step_unscales_and_skips_infinite_steps(name):
    """The fp16 path: scaler.unscale_ then scaler.step runs the optimizer on the true gradients (a power-of-two
    scale: bit for bit), and skips the update when a gradient is not finite."""
    cfg = config.load(None, [f"optim.name={name}", "optim.no_wd_bn_bias=true", "optim.clip_grad_norm=0.5"])
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    plain, scaled = _net(), _net()
    opt_plain, opt_scaled = build_optimizer(plain, cfg, CPU), build_optimizer(scaled, cfg, CPU)
    F.cross_entropy(plain(x), y).backward()
    torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.5)
    opt_plain.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    scaler.scale(F.cross_entropy(scaled(x), y)).backward()
    scaler.unscale_(opt_scaled)
    torch.nn.utils.clip_grad_norm_(scaled.parameters(), 0.5)
    scaler.step(opt_scaled)
    scaler.update()
    assert_bitwise_equal(plain.state_dict(), scaled.state_dict())
    before = {k: p.detach().clone() for k, p in scaled.named_parameters()}
    opt_scaled.zero_grad()
    scaler.scale(F.cross_entropy(scaled(x), y)).backward()
    scaled[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt_scaled)
    scaler.update()
    assert_bitwise_equal(before, {k: p.detach() for k, p in scaled.named_parameters()})
    assert scaler.get_scale() == 2.0 ** 11


def test_train_step_runs_lars_with_accumulation_clipping_and_bce():
    cfg = config.load(None, ["optim.name=lars", "optim.no_wd_bn_bias=true", "optim.clip_grad_norm=1.0",
                             "optim.lr=3.0"])
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.BatchNorm1d(5))
    opt = build_optimizer(net, cfg, CPU)
    step = TrainStep(net, opt, build_scheduler(opt, cfg.optim, 10, 5), torch.amp.GradScaler("cpu", enabled=False),
                     StepSettings(device=CPU, num_classes=5, clip_grad_norm=1.0, loss="bce", label_smoothing=0.1))
    x, y = torch.randn(8, 3, 2, 2), torch.randint(0, 5, (8,))
    first = step([(x[:4], y[:4]), (x[4:], y[4:])], 0).read()
    for i in range(1, 6):
        last = step([(x[:4], y[:4]), (x[4:], y[4:])], i).read()
    assert last["loss_sum"] < first["loss_sum"] and last["count"] == 8


# ------------------------------------------------------------------------------------------ configuration
def test_sgd_and_adamw_groups_are_unchanged_and_eps_defaults():
    net = _net()
    assert all("adapt" not in g for g in param_groups(net, OptimConfig(no_wd_bn_bias=True), 0.1))
    adamw = build_optimizer(net, config.load(None, ["optim.name=adamw"]), CPU)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["eps"] == 1e-8
    lamb = build_optimizer(net, config.load(None, ["optim.name=lamb", "optim.eps=1e-5"]), CPU)
    assert isinstance(lamb, LAMB) and lamb.param_groups[0]["eps"] == 1e-5
    lars = build_optimizer(net, config.load(None, ["optim.name=lars", "optim.trust_coefficient=0.02"]), CPU)
    assert isinstance(lars, LARS) and lars.param_groups[0]["trust_coefficient"] == 0.02


def test_fused_is_refused_for_lars_and_lamb_and_auto_means_foreach():
    for name in ("lars", "lamb"):
        with pytest.raises(ConfigError) as err:
            config.load(None, [f"optim.name={name}", "optim.fused=true"])
        assert str(err.value).startswith("optim.fused:") and "\n" not in str(err.value)
        assert not uses_fused(config.load(None, [f"optim.name={name}"]), torch.device("cuda"))
    assert uses_fused(config.load(None, []), torch.device("cuda"))


def test_changed_trust_coefficient_and_eps_carry_over_on_resume():
    """ckpt.allow_changes: this run's optimizer values go over a restored checkpoint's (state.py's rule)."""
    for name, key, old, new in (("lars", "trust_coefficient", 0.001, 0.002), ("lamb", "eps", 1e-6, 1e-7)):
        steps = []
        for value in (old, new):
            cfg = config.load(None, [f"optim.name={name}", f"optim.{key}={value}", "optim.no_wd_bn_bias=true"])
            opt = build_optimizer(_net(), cfg, CPU)
            steps.append(SimpleNamespace(optimizer=opt, scheduler=build_scheduler(opt, cfg.optim, 100, 10)))
        apply_hyperparameters(steps[0], hyperparameters(steps[1]))
        assert [g[key] for g in steps[0].optimizer.param_groups] == [new, new]
        assert [g["adapt"] for g in steps[0].optimizer.param_groups] == [True, False]


# ------------------------------------------------------------------------------------------ the poly schedule
def test_poly_schedule_values_with_warmup():
    o = OptimConfig(schedule="poly", lr=2.0, min_lr=0.002, poly_power=2.0, warmup_epochs=2, warmup_start_factor=0.0)
    floor, total, spe = 0.001, 100, 10
    for step in (0, 5, 19):
        assert lr_factor(step, o, total, spe) == pytest.approx(step / 20)
    for step in (20, 21, 60, 99, 100, 120):
        progress = min(1.0, (step - 20) / 80)
        assert lr_factor(step, o, total, spe) == pytest.approx(floor + (1 - floor) * (1 - progress) ** 2)
    assert lr_factor(100, o, total, spe) * o.lr == pytest.approx(o.min_lr)
    linear = OptimConfig(schedule="linear", lr=2.0, min_lr=0.002, warmup_epochs=2)
    power1 = OptimConfig(schedule="poly", lr=2.0, min_lr=0.002, warmup_epochs=2, poly_power=1.0)
    assert [lr_factor(s, power1, total, spe) for s in range(0, 101, 7)] == pytest.approx(
        [lr_factor(s, linear, total, spe) for s in range(0, 101, 7)])
    assert "poly" not in LENGTH_FREE_SCHEDULES  # a longer run redefines the decay: refused without allow_changes
    opt = LARS([nn.Parameter(torch.ones(2))], lr=2.0)
    sched = build_scheduler(opt, o, total, spe)
    for _ in range(60):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * (floor + (1 - floor) * 0.5 ** 2))


# ------------------------------------------------------------------------------------------ the BCE loss
def _bce_by_hand(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits.double())
    return -(targets * p.log() + (1 - targets) * (1 - p).log()).mean()


def test_bce_loss_matches_a_hand_computation():
    torch.manual_seed(3)
    logits, labels = torch.randn(6, 5), torch.tensor([0, 4, 2, 2, 1, 3])
    hard = F.one_hot(labels, 5).double()
    torch.testing.assert_close(bce_loss(logits, labels).double(), _bce_by_hand(logits, hard))
    smooth = hard * (1 - 0.1) + 0.1 / 5  # on: 1 - s + s/C, off: s/C
    torch.testing.assert_close(bce_loss(logits, labels, label_smoothing=0.1).double(), _bce_by_hand(logits, smooth))
    mixed = 0.7 * hard + 0.3 * hard.flip(0)  # mixup/cutmix rows are used as they are (smoothed when mixed)
    torch.testing.assert_close(bce_loss(logits, mixed.float(), label_smoothing=0.1).double(),
                               _bce_by_hand(logits, mixed), rtol=1e-6, atol=1e-7)
    binary = (0.85 * hard + 0.15 * hard.flip(0) > 0.2).double()  # the 15% partner falls under the threshold
    assert binary.sum() == 6
    torch.testing.assert_close(bce_loss(logits, (0.85 * hard + 0.15 * hard.flip(0)).float(), 0.0, 0.2).double(),
                               _bce_by_hand(logits, binary))
    torch.testing.assert_close(bce_loss(logits, mixed.float(), 0.0, 0.2).double(),
                               _bce_by_hand(logits, (mixed > 0).double()))
    assert bce_loss(logits.bfloat16(), labels).dtype == torch.float32


def test_training_loss_picks_ce_or_bce():
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    ce = StepSettings(device=CPU, num_classes=3, label_smoothing=0.2)
    assert torch.equal(training_loss(logits, labels, ce), F.cross_entropy(logits, labels, label_smoothing=0.2))
    bce = StepSettings(device=CPU, num_classes=3, label_smoothing=0.2, loss="bce")
    assert torch.equal(training_loss(logits, labels, bce), bce_loss(logits, labels, 0.2))


# ------------------------------------------------------------------------------------------ the recipes
RECIPES = {
    "imagenet_resnet50_mlperf.yaml": (["MLPerf Training v4.0", "3,200", "75.9%"],
                                      dict(name="lars", lr=11.0, momentum=0.9, weight_decay=5e-5, schedule="poly",
                                           poly_power=2.0, min_lr=1e-4, warmup_epochs=2, trust_coefficient=0.001,
                                           no_wd_bn_bias=True)),
    "imagenet_resnet50_mlperf_32k.yaml": (["v2.0", "32,768", "75.9%"],
                                          dict(name="lars", lr=27.5, momentum=0.9321, weight_decay=1e-4,
                                               schedule="poly", warmup_epochs=16, no_wd_bn_bias=True)),
    "imagenet_resnet50_rsb_a3.yaml": (["ResNet strikes back", "78.1%"],
                                      dict(name="lamb", lr=8e-3, weight_decay=0.02, schedule="cosine",
                                           warmup_epochs=5, no_wd_bn_bias=True)),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipes_validate_and_carry_their_anchors(recipe):
    anchors, optim = RECIPES[recipe]
    cfg = config.load(REPO / "configs" / recipe)
    assert {k: getattr(cfg.optim, k) for k in optim} == optim
    header = " ".join(line for line in (REPO / "configs" / recipe).read_text().splitlines()[:3])
    assert all(a in header for a in anchors) and "not measured here" in header
    if "mlperf" in recipe:
        assert (cfg.train.label_smoothing, cfg.optim.warmup_start_factor, cfg.data.image_size) == (0.1, 0.0, 224)
    else:
        d, t = cfg.data, cfg.train
        assert (t.epochs, d.batch_size, t.loss, t.bce_target_thresh, t.label_smoothing) == (100, 2048, "bce", 0.2, 0)
        assert (d.mixup_alpha, d.cutmix_alpha, d.auto_augment, d.image_size, d.eval_size) == (
            0.1, 1.0, "randaugment", 160, 224)
    assert config.load(REPO / "configs/imagenet_resnet50_mlperf.yaml").data.batch_size == 3200


# ------------------------------------------------------------------------------------------ short runs
SMOKE = {  # 512 synthetic images, 8 steps per epoch, 4 epochs: a few seconds each on one CPU thread
    "lars": ["optim.name=lars", "optim.lr=5.0", "optim.weight_decay=5e-5", "optim.schedule=poly",
             "optim.accum_steps=2", "optim.clip_grad_norm=1.0"],
    "lamb": ["optim.name=lamb", "optim.lr=0.02", "optim.weight_decay=0.02", "train.loss=bce",
             "optim.ema_decay=0.9"],
}
COMMON = ["data.synthetic_train_size=512", "data.batch_size=64", "train.epochs=4", "optim.no_wd_bn_bias=true",
          "optim.warmup_epochs=1", "optim.warmup_start_factor=0"]


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_short_run_learns_and_resumes_bit_for_bit(tmp_path, capsys, name):
    from ddp_resnet import train

    args = [*TINY, *COMMON, *SMOKE[name]]
    full, chunked = tmp_path / "full", tmp_path / "chunked"
    assert train.main([*args, f"output_dir={full}"]) == 0
    records = _records(full)
    assert records[-1]["train_loss"] < 0.8 * records[0]["train_loss"], records
    assert records[-1]["train_acc"] > 40.0 and records[-1]["test_acc"] > 20.0, records  # chance is 10%
    assert train.main([*args, f"output_dir={chunked}", "train.run_steps=11"]) == 0  # stops mid-epoch 2
    capsys.readouterr()
    assert train.main([*args, f"output_dir={chunked}"]) == 0
    assert f"resumed from {chunked / 'checkpoints' / 'last.pt'}: step 11/32" in capsys.readouterr().out
    assert_bitwise_equal(weights(full / "checkpoints/last.pt"), weights(chunked / "checkpoints/last.pt"))
    saved = [torch.load(out / "checkpoints/last.pt", weights_only=True) for out in (full, chunked)]
    for key in saved[0]["optimizer"]["state"]:
        assert_bitwise_equal(saved[0]["optimizer"]["state"][key], saved[1]["optimizer"]["state"][key])
    if name == "lamb":
        assert_bitwise_equal(saved[0]["ema"], saved[1]["ema"])
