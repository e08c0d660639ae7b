"""Optimizer, per-iteration learning-rate schedule, and a weight EMA.

``optim.name``: sgd and adamw are torch's (fused or foreach kernels); lars and lamb are ``large_batch``'s, for
large global batches (foreach only).
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ddp_resnet.config import Config, OptimConfig
from ddp_resnet.large_batch import LAMB, LAMB_EPS, LARS

LAYERWISE = ("lars", "lamb")  # the optimizers with a per-layer trust ratio (and an ``adapt`` flag per group)
ADAMW_EPS = 1e-8  # optim.eps=0 with adamw: torch's default


def peak_lr(cfg: Config) -> float:
    """The configured learning rate, scaled linearly by global batch / reference batch when asked."""
    lr = cfg.optim.lr
    if cfg.optim.lr_scale_ref_batch:
        lr *= cfg.data.batch_size / cfg.optim.lr_scale_ref_batch
    return lr


def param_groups(model: nn.Module, ocfg: OptimConfig, lr: float, stage_lr: dict | None = None) -> list[dict]:
    """Parameter groups: optional no-decay group for BN/bias, optional per-stage learning rates.

    With lars or lamb every group also says whether the trust ratio applies (``adapt``): not to the no-decay
    group (BatchNorm and biases with ``optim.no_wd_bn_bias``), as MLPerf and "ResNet strikes back" train."""
    stage_lr = stage_lr or {}
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        stage = next((s for s in stage_lr if name == s or name.startswith(s + ".")), None)
        group_lr = stage_lr[stage] if stage else lr
        no_decay = ocfg.no_wd_bn_bias and param.ndim <= 1
        key = (group_lr, no_decay)
        group = groups.setdefault(key, {"params": [], "lr": group_lr,
                                        "weight_decay": 0.0 if no_decay else ocfg.weight_decay})
        if ocfg.name in LAYERWISE:
            group["adapt"] = not no_decay
        group["params"].append(param)
    return list(groups.values())


def uses_fused(cfg: Config, device: torch.device) -> bool:
    """Whether the optimizer runs fused kernels (``optim.fused``, auto: on CUDA) rather than foreach ones; lars and
    lamb have foreach ones only."""
    if cfg.optim.name in LAYERWISE:
        return False
    return cfg.optim.fused == "true" or (cfg.optim.fused == "auto" and device.type == "cuda")


def build_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """SGD (optionally Nesterov), AdamW, LARS (optionally Nesterov) or LAMB over the model's trainable
    parameters."""
    ocfg = cfg.optim
    lr = peak_lr(cfg)
    groups = param_groups(model, ocfg, lr, dict(cfg.finetune.stage_lr))
    if not groups:
        raise ValueError("no trainable parameters (is everything frozen?)")
    if ocfg.name == "lars":
        return LARS(groups, lr=lr, momentum=ocfg.momentum, weight_decay=ocfg.weight_decay,
                    trust_coefficient=ocfg.trust_coefficient, nesterov=ocfg.nesterov)
    if ocfg.name == "lamb":
        return LAMB(groups, lr=lr, betas=tuple(ocfg.betas), eps=ocfg.eps or LAMB_EPS, weight_decay=ocfg.weight_decay)
    kernel = {"fused": True} if uses_fused(cfg, device) else {"foreach": True}
    if ocfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=ocfg.momentum, nesterov=ocfg.nesterov,
                               weight_decay=ocfg.weight_decay, **kernel)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(ocfg.betas), eps=ocfg.eps or ADAMW_EPS,
                             weight_decay=ocfg.weight_decay, **kernel)


def lr_factor(step: int, ocfg: OptimConfig, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based): warmup, then the schedule."""
    warmup = int(round(ocfg.warmup_epochs * steps_per_epoch))
    if ocfg.schedule == "onecycle" and warmup == 0:
        warmup = max(1, int(0.3 * total_steps))
    if step < warmup:
        return ocfg.warmup_start_factor + (1 - ocfg.warmup_start_factor) * step / warmup
    if ocfg.schedule == "constant":
        return 1.0
    if ocfg.schedule == "multistep":
        scale = steps_per_epoch if ocfg.milestones_unit == "epoch" else 1
        passed = sum(1 for m in ocfg.milestones if step >= round(m * scale))
        return ocfg.gamma ** passed
    floor = ocfg.min_lr / ocfg.lr if ocfg.lr else 0.0
    if ocfg.schedule == "cyclic":
        return floor + (1 - floor) * triangle(step - warmup, cycle_steps(ocfg, steps_per_epoch))
    # cosine, linear, poly and one-cycle anneal from the peak down to min_lr (one-cycle: after its 30% ramp)
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    if ocfg.schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    if ocfg.schedule == "poly":  # MLPerf's polynomial decay (power 2) to its end learning rate
        return floor + (1 - floor) * (1 - progress) ** ocfg.poly_power
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def cycle_steps(ocfg: OptimConfig, steps_per_epoch: int) -> float:
    """The cyclic schedule's period in optimizer steps (``optim.cycle_period`` in ``optim.cycle_unit``)."""
    return ocfg.cycle_period * (steps_per_epoch if ocfg.cycle_unit == "epoch" else 1)


def triangle(step: int, period: float) -> float:
    """Smith's triangular cycle (2017) in [0, 1]: 0 at the start of each period, 1 halfway, 0 again at its end."""
    phase = (step % period) / period
    return 1.0 - abs(2.0 * phase - 1.0)


def build_scheduler(optimizer: torch.optim.Optimizer, ocfg: OptimConfig, total_steps: int,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, ocfg, total_steps, steps_per_epoch))


class ModelEma:
    """Exponential moving average of a model's parameters (buffers are copied)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema = decay * ema + (1 - decay) * current; buffers follow the current model."""
        ema_params = list(self.module.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1 - self.decay)
        for ema_buf, buf in zip(self.module.buffers(), model.buffers()):
            ema_buf.copy_(buf)

    def state_dict(self) -> dict:
        """The averaged weights."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore averaged weights."""
        self.module.load_state_dict(state)
