"""Layer-wise adaptive optimizers for large global batches: LARS (``optim.name=lars``) and LAMB (``lamb``).

Both scale each parameter tensor's update by a *trust ratio* of norms, so that every layer moves by a similar
fraction of its weights however large the batch (and so the learning rate) is. Written here rather than taken from
timm, which has both: the two classes are about a hundred lines together, and timm would be a large dependency
(models, data pipelines, its own optimizer factory) for them. They run on ``torch._foreach_*`` multi-tensor ops
with no host synchronization (the per-tensor trust-ratio scaling takes torch's per-tensor path: a small kernel per
tensor, not measured here on a GPU); there is no fused kernel, so
``optim.fused=true`` is refused for them in the configuration and ``optim.fused=auto`` means foreach.

Each parameter group carries ``adapt`` (``optim.param_groups`` sets it): True applies the trust ratio; False
(BatchNorm weights and all biases with ``optim.no_wd_bn_bias``, whose weight decay is then 0 as well) updates
like the plain optimizer underneath, as MLPerf's ResNet-50 (its LARS ``skip_list``) and timm's LAMB (no
adaptation where the weight decay is 0) do. The flag, not the decay, decides: with ``optim.weight_decay=0`` and no
excluded group every tensor is still adapted (timm's LAMB would adapt none).

**LARS** (You, Gitman, Ginsburg 2017, "Large Batch Training of Convolutional Networks"), in the form of MLPerf's
reference ``LARSOptimizer`` (mlcommons/training, image_classification): for a parameter ``w`` with gradient ``g``,
weight decay ``wd``, trust coefficient ``eta``, momentum ``m`` and the step's learning rate ``lr``::

    g' = g + wd * w
    local_lr = eta * |w| / (|g| + wd * |w|)     (1 when |w| or |g| is 0; 1 for adapt=False)
    v = m * v + lr * local_lr * g'
    w = w - v                                   (Nesterov: w = w - (m * v + lr * local_lr * g'))

The learning rate and the trust ratio are inside the momentum buffer (TensorFlow's ``apply_momentum`` with a
learning rate of 1 on the scaled gradient). The torch-style form found in several PyTorch ports keeps the buffer
unscaled (``v = m * v + local_lr * g'``, ``w -= lr * v``); the two agree while the learning rate is constant and
differ while it changes (warm-up, poly decay): there the MLPerf form lets old momentum keep the rate it was
taken at. This module implements the MLPerf form because its recipes (configs/imagenet_resnet50_mlperf*.yaml)
were tuned with it. No epsilon in the ratio's denominator: submissions log ``lars_epsilon`` 0 (the TensorFlow 2
reference then falls back to Keras' 1e-7, negligible next to ``|g|``).

**LAMB** (You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes"), as timm's
``Lamb`` runs it for "ResNet strikes back": Adam moments with bias correction at step ``t``::

    m = b1 * m + (1 - b1) * g,   v = b2 * v + (1 - b2) * g * g
    u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd * w
    r = |w| / |u|                               (1 when |w| or |u| is 0; 1 for adapt=False)
    w = w - lr * r * u

timm's ``Lamb`` also clips the global gradient norm to 1 by default (its ``max_grad_norm``); here that is the
trainer's ``optim.clip_grad_norm`` (the RSB recipe sets it to 1).
"""
from __future__ import annotations

import math

import torch

LAMB_EPS = 1e-6  # optim.eps=0 with lamb: timm's and the paper's default


class _Layerwise(torch.optim.Optimizer):
    """What LARS and LAMB share: ``step`` hands each group's parameters that have a gradient to ``_update``."""

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(group, params)
        return loss

    def _update(self, group: dict, params: list[torch.Tensor]) -> None:
        raise NotImplementedError


class LARS(_Layerwise):
    """Layer-wise Adaptive Rate Scaling, MLPerf's form (see the module docstring)."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, nesterov: bool = False):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError(f"LARS: invalid lr={lr}, momentum={momentum}, weight_decay={weight_decay} or "
                             f"trust_coefficient={trust_coefficient}")
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                    "trust_coefficient": trust_coefficient, "nesterov": nesterov, "adapt": True}
        super().__init__(params, defaults)

    def _update(self, group: dict, params: list[torch.Tensor]) -> None:
        grads = [p.grad for p in params]
        lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
        bufs = [self._buffer(p) for p in params]
        steps = torch._foreach_add(grads, params, alpha=wd) if wd else [g.clone() for g in grads]  # g'
        if group["adapt"]:
            local = lars_trust_ratio(params, grads, group["trust_coefficient"], wd)
            torch._foreach_mul_(steps, list((local * lr).unbind()))  # lr * local_lr * g'
        else:
            torch._foreach_mul_(steps, lr)
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, steps)  # v = m * v + lr * local_lr * g'
        if group["nesterov"]:
            torch._foreach_add_(steps, bufs, alpha=momentum)
            torch._foreach_sub_(params, steps)
        else:
            torch._foreach_sub_(params, bufs)

    def _buffer(self, param: torch.Tensor) -> torch.Tensor:
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state["momentum_buffer"]


class LAMB(_Layerwise):
    """Layer-wise Adaptive Moments for Batch training (see the module docstring)."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = LAMB_EPS,
                 weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"LAMB: invalid lr={lr}, betas={betas}, eps={eps} or weight_decay={weight_decay}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "adapt": True}
        super().__init__(params, defaults)

    def _update(self, group: dict, params: list[torch.Tensor]) -> None:
        grads = [p.grad for p in params]
        beta1, beta2 = group["betas"]
        states = [self._state(p) for p in params]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        for s in states:
            s["step"] += 1  # a CPU scalar, as torch's Adam keeps it: reading it is no device synchronization
        counts = [s["step"].item() for s in states]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** t) for t in counts])
        torch._foreach_add_(denom, group["eps"])
        update = torch._foreach_div(exp_avgs, [1 - beta1 ** t for t in counts])
        torch._foreach_div_(update, denom)
        if group["weight_decay"]:
            torch._foreach_add_(update, params, alpha=group["weight_decay"])
        if group["adapt"]:
            ratio = lamb_trust_ratio(params, update)
            torch._foreach_mul_(update, list((ratio * -group["lr"]).unbind()))
            torch._foreach_add_(params, update)
        else:
            torch._foreach_add_(params, update, alpha=-group["lr"])

    def _state(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state


def lars_trust_ratio(params: list[torch.Tensor], grads: list[torch.Tensor], eta: float,
                     weight_decay: float) -> torch.Tensor:
    """Per tensor ``eta * |w| / (|g| + weight_decay * |w|)``, 1 where ``|w|`` or ``|g|`` is 0 (one device vector)."""
    w = torch.stack(torch._foreach_norm(params))
    g = torch.stack(torch._foreach_norm(grads))
    ratio = eta * w / (g + weight_decay * w)
    return torch.where((w > 0) & (g > 0), ratio, torch.ones_like(ratio))


def lamb_trust_ratio(params: list[torch.Tensor], updates: list[torch.Tensor]) -> torch.Tensor:
    """Per tensor ``|w| / |u|``, 1 where either is 0 (one device vector)."""
    w = torch.stack(torch._foreach_norm(params))
    u = torch.stack(torch._foreach_norm(updates))
    return torch.where((w > 0) & (u > 0), w / u, torch.ones_like(w))
