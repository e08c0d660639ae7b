"""Transfer learning from a local torchvision-format checkpoint: head replaced, frozen backbone, per-stage LR."""
from __future__ import annotations

import pytest
import torch
import torchvision

from conftest import REPO, TINY, ok, run_train, weights
from ddp_resnet import config, distributed, finetune
from ddp_resnet import trainer as trainer_mod
from ddp_resnet.config import ConfigError
from ddp_resnet.models import build_model

# ResNet-18 with the ImageNet stem (so torchvision weights fit) on the tiny 16 px synthetic data, 10 classes.
FT = ["model.name=resnet18", "model.stem=imagenet"]


@pytest.fixture(scope="module")
def tv_weights(tmp_path_factory):
    """A torchvision-format ImageNet ResNet-18 checkpoint file (1000 classes), random but fixed weights."""
    torch.manual_seed(1234)
    model = torchvision.models.resnet18(num_classes=1000)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so "unchanged" means something
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.num_batches_tracked.fill_(1000)
    path = tmp_path_factory.mktemp("tv") / "resnet18-tv.pth"
    torch.save(model.state_dict(), path)
    return path


def _backbone(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def test_torchvision_checkpoint_loads_into_the_backbone_and_the_head_is_replaced(tv_weights):
    source = torch.load(tv_weights, weights_only=True)
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=7, stem="imagenet")
    fresh_head = model.fc.weight.detach().clone()
    finetune.prepare(model, config.FinetuneConfig(checkpoint=str(tv_weights)), 7)
    state = model.state_dict()
    assert state.keys() == source.keys()
    for key, value in _backbone(source).items():
        assert torch.equal(state[key], value), key
    assert state["fc.weight"].shape == (7, 512) and state["fc.bias"].shape == (7,)
    assert torch.equal(state["fc.weight"], fresh_head)  # newly initialised, not the 1000-class head
    assert all(p.requires_grad for p in model.parameters())


def test_a_checkpoint_for_another_network_is_refused_in_one_line(tv_weights):
    model = build_model("resnet34", num_classes=10, stem="imagenet")
    with pytest.raises(ConfigError, match=r"^finetune.checkpoint: weights do not fit this model \(\d+ missing"):
        finetune.prepare(model, config.FinetuneConfig(checkpoint=str(tv_weights)), 10)
    cifar = build_model("resnet18", num_classes=10, stem="cifar")  # 3x3 stem conv: conv1.weight mismatched
    with pytest.raises(ConfigError, match="1 mismatched"):
        finetune.prepare(cifar, config.FinetuneConfig(checkpoint=str(tv_weights)), 10)


def test_frozen_backbone_under_ddp_keeps_weights_and_bn_buffers_while_the_head_trains(tv_weights, tmp_path):
    """2 processes, SyncBatchNorm requested too: the frozen BatchNorms must not be converted back to training BNs."""
    out = tmp_path / "frozen"
    ok(run_train(out, *FT, f"finetune.checkpoint={tv_weights}", "finetune.freeze=backbone", "train.sync_bn=true",
                 "train.epochs=2", nproc=2))
    source = torch.load(tv_weights, weights_only=True)
    first, last = weights(out / "checkpoints/epoch_0000.pt"), weights(out / "checkpoints/last.pt")
    assert last.keys() == source.keys()
    for state in (first, last):
        changed = [k for k, v in _backbone(source).items() if not torch.equal(state[k], v)]
        assert not changed, f"frozen tensors changed: {changed[:5]}"
    assert not torch.equal(first["fc.weight"], last["fc.weight"])
    assert not torch.equal(first["fc.bias"], last["fc.bias"])
    payload = torch.load(out / "checkpoints/last.pt", weights_only=True)
    assert [len(g["params"]) for g in payload["optimizer"]["param_groups"]] == [2]  # fc.weight, fc.bias only


def test_stage_learning_rates_become_optimizer_param_groups(tv_weights, tmp_path):
    overrides = [*TINY, *FT, f"output_dir={tmp_path / 'stages'}", f"finetune.checkpoint={tv_weights}",
                 "finetune.stage_lr={layer4: 1e-4, fc: 1e-3}", "optim.lr=0.01", "optim.schedule=constant"]
    cfg = config.load(None, overrides)
    plan = trainer_mod.plan_run(cfg, distributed.LaunchInfo())
    trainer = trainer_mod.Trainer(cfg, plan.info, distributed.init("cpu", "gloo", 60, plan.launch))
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in trainer.train_step.optimizer.param_groups}
    assert sorted(by_lr) == [1e-4, 1e-3, 0.01]
    model = trainer.train_step.bare
    assert by_lr[1e-3] == {id(model.fc.weight), id(model.fc.bias)}
    assert by_lr[1e-4] == {id(p) for p in model.layer4.parameters()}
    rest = {id(p) for n, p in model.named_parameters() if not n.startswith(("fc.", "layer4."))}
    assert by_lr[0.01] == rest and len(rest) > 0
    assert torch.equal(model.conv1.weight.detach(), torch.load(tv_weights, weights_only=True)["conv1.weight"])


def test_finetune_recipe_example_loads():
    cfg = config.load(REPO / "configs/experiments/finetune_resnet18.yaml")
    assert cfg.model.name == "resnet18" and cfg.model.stem == "imagenet"
    assert cfg.finetune.stage_lr == {"layer4": 0.005, "fc": 0.01} and cfg.finetune.checkpoint
