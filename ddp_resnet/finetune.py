"""Transfer learning: start from a local checkpoint, replace the head, optionally freeze the backbone.

The checkpoint may be a plain state_dict (a torchvision ``resnet50-*.pth`` file saved beforehand, or an
export of ours) or a ddp_resnet training checkpoint (its ``model`` entry). Nothing is downloaded.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddp_resnet.checkpoint import CheckpointError, open_checkpoint
from ddp_resnet.config import ConfigError, FinetuneConfig

HEAD = "fc"


class FrozenBatchNorm(nn.Module):
    """A BatchNorm with fixed statistics and fixed affine terms: it always normalises with its running statistics.

    Everything is a buffer (state_dict keys as in ``nn.BatchNorm*d``, so checkpoints load into the plain model),
    and it is deliberately not a ``_BatchNorm`` subclass: ``train.sync_bn`` (torch's or the CPU SyncBatchNorm
    conversion) leaves it alone instead of replacing it with a BatchNorm that updates its statistics again.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.num_features, self.eps = bn.num_features, bn.eps
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            value = getattr(bn, name, None)
            if value is not None:
                self.register_buffer(name, value.detach().clone())
            else:
                setattr(self, name, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.running_mean is None:  # a BatchNorm built without running statistics: batch statistics
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def load_backbone(model: nn.Module, state: dict) -> list[str]:
    """Copy every non-head weight (all must match); returns the head keys that were left as initialised."""
    own = model.state_dict()
    backbone = {k: v for k, v in state.items() if not k.startswith(HEAD + ".")}
    missing = [k for k in own if not k.startswith(HEAD + ".") and k not in backbone]
    unexpected = [k for k in backbone if k not in own]
    mismatched = [k for k in backbone if k in own and own[k].shape != backbone[k].shape]
    if missing or unexpected or mismatched:
        detail = (missing or unexpected or mismatched)[:3]
        raise ConfigError(f"finetune.checkpoint: weights do not fit this model ({len(missing)} missing, "
                          f"{len(unexpected)} unexpected, {len(mismatched)} mismatched keys, e.g. {detail})")
    head = {k: v for k, v in state.items() if k.startswith(HEAD + ".")}
    if head and all(k in own and own[k].shape == v.shape for k, v in head.items()):
        backbone.update(head)  # same number of classes: keep the trained head too
    model.load_state_dict(backbone, strict=False)
    return [k for k in own if k.startswith(HEAD + ".") and k not in backbone]


def freeze_backbone(model: nn.Module) -> None:
    """Only the head trains: backbone parameters stop requiring grad, backbone BatchNorms become FrozenBatchNorm."""
    frozen_bns = []
    for name, module in model.named_modules():
        if name == HEAD or name.startswith(HEAD + "."):
            continue
        for param in module.parameters(recurse=False):
            param.requires_grad_(False)
        if name and isinstance(module, nn.modules.batchnorm._BatchNorm):
            frozen_bns.append(name)
    for name in frozen_bns:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FrozenBatchNorm(getattr(parent, child)))


def prepare(model: nn.Module, fcfg: FinetuneConfig, num_classes: int) -> nn.Module:
    """Apply finetune.checkpoint and finetune.freeze to a freshly built model (its head already has num_classes)."""
    if not isinstance(getattr(model, HEAD, None), nn.Linear):
        raise ConfigError(f"finetune: the model has no '{HEAD}' linear head to replace")
    if fcfg.checkpoint:
        try:
            state = open_checkpoint(fcfg.checkpoint).weights()
        except CheckpointError as exc:
            raise ConfigError(f"finetune.checkpoint: {exc}") from None
        load_backbone(model, state)
    if fcfg.freeze == "backbone":
        freeze_backbone(model)
    return model
