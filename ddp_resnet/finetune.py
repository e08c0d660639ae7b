"""Transfer learning: start from a local checkpoint, replace the head, optionally freeze the backbone.

The checkpoint may be a plain state_dict (a torchvision ``resnet50-*.pth`` file saved beforehand, or an
export of ours) or a ddp_resnet training checkpoint (its ``model`` entry). Nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ddp_resnet.config import ConfigError, FinetuneConfig

HEAD = "fc"


class _FrozenBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm that always normalises with its running statistics and never updates them."""

    def train(self, mode: bool = True):
        return super().train(False)


def read_weights(path: str | Path) -> dict:
    """A state_dict from a plain weights file or a ddp_resnet checkpoint (weights_only loading)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"finetune.checkpoint: file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"finetune.checkpoint: cannot load {path} ({type(exc).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ConfigError(f"finetune.checkpoint: {path} holds no state_dict")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}


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
    """Only the head trains: backbone parameters stop requiring grad, backbone BatchNorms stay in eval mode."""
    for name, module in model.named_modules():
        if name == HEAD or name.startswith(HEAD + "."):
            continue
        for param in module.parameters(recurse=False):
            param.requires_grad_(False)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.__class__ = type(f"Frozen{type(module).__name__}", (_FrozenBatchNorm, type(module)), {})


def prepare(model: nn.Module, fcfg: FinetuneConfig, num_classes: int) -> nn.Module:
    """Apply finetune.checkpoint and finetune.freeze to a freshly built model (its head already has num_classes)."""
    if not isinstance(getattr(model, HEAD, None), nn.Linear):
        raise ConfigError(f"finetune: the model has no '{HEAD}' linear head to replace")
    if fcfg.checkpoint:
        load_backbone(model, read_weights(fcfg.checkpoint))
    if fcfg.freeze == "backbone":
        freeze_backbone(model)
    return model
