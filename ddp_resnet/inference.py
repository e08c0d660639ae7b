"""A trained network ready for new images: its checkpoint's weights, evaluation transform and class names.

``load`` opens a training checkpoint (or a plain weights file, given a ``--config``) with
``checkpoint.open_checkpoint``, i.e. ``torch.load(weights_only=True)``: a file whose pickle would run code is
refused.
Its config is resolved as ``python -m ddp_resnet.evaluate`` resolves it (``evaluate.resolve_config``) and the
network is built by ``build.network_from_weights``. The dataset is not read: the number of classes comes from the
weights' head, the image side, resize and normalization from the config (``data.eval_info``,
``data.eval_transform``), so the data the network was trained on need not be present. ``predict`` and ``export``
share it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ddp_resnet import build
from ddp_resnet import checkpoint as ckpt
from ddp_resnet import config as config_mod
from ddp_resnet import data as data_mod
from ddp_resnet.data.loaders import EvalTransform
from ddp_resnet.data.transforms import Normalizer
from ddp_resnet.engine import autocast
from ddp_resnet.evaluate import resolve_config

DATASET_CLASSES = {"cifar10": 10, "cifar100": 100}


@dataclass
class Trained:
    """A checkpoint's network on its device in eval mode, with what feeding it needs."""

    path: str
    cfg: config_mod.Config
    info: data_mod.DataInfo
    model: nn.Module
    transform: EvalTransform
    names_saved: bool  # the class names came from the checkpoint (else they are the indices "0", "1", ...)
    saved: ckpt.Saved

    @property
    def class_names(self) -> list[str]:
        """One name per output of the head."""
        return self.info.class_names

    @property
    def size(self) -> int:
        """The side of the square images the network is fed (the evaluation crop)."""
        return self.transform.size

    def names_note(self) -> str | None:
        """The one-line note to print when the checkpoint holds no class names (None when it does)."""
        if self.names_saved:
            return None
        return (f"note: {self.path} holds no class names; classes are shown as indices 0..{self.info.num_classes - 1}"
                f" (their order is the training set's)")

    def normalizer(self, channels_last: bool = False) -> Normalizer:
        """uint8 batch -> the normalized float32 batch the network was trained on."""
        return Normalizer(self.info.mean, self.info.std, channels_last)


def head_classes(state: dict, cfg: config_mod.Config, path: str) -> int:
    """The number of classes: the rows of the weights' ``fc`` head (else the dataset's or the config's count)."""
    heads = [v for k, v in state.items() if k.endswith("fc.weight") and getattr(v, "ndim", 0) == 2]
    if heads:
        return int(heads[-1].shape[0])
    if cfg.data.dataset in DATASET_CLASSES:
        return DATASET_CLASSES[cfg.data.dataset]
    if cfg.data.dataset == "synthetic":
        return cfg.data.synthetic_classes
    raise ckpt.CheckpointError(f"checkpoint {path} has no fc.weight head: cannot tell its number of classes")


def saved_class_names(saved: ckpt.Saved, num_classes: int) -> list[str] | None:
    """The checkpoint's class names when it holds one string per class (None otherwise: older checkpoints, plain
    weights)."""
    names = saved.class_names
    if names and len(names) == num_classes and all(isinstance(n, str) for n in names):
        return list(names)
    return None


def load(path: str, device: torch.device | str = "cpu", ema: bool = False, config_path: str | None = None,
         requested_device: str | None = None) -> Trained:
    """Read ``path`` safely, resolve its config (then ``config_path``), build its network on ``device``.

    Raises ``CheckpointError`` / ``ConfigError`` in one line (an unusable file, one that does not fit its model).
    """
    saved = ckpt.open_checkpoint(path)
    cfg = resolve_config(saved, config_path, [], None, requested_device)
    state = saved.weights(ema=ema)
    num_classes = head_classes(state, cfg, path)
    names = saved_class_names(saved, num_classes)
    info = data_mod.eval_info(cfg.data, num_classes, names or [str(i) for i in range(num_classes)])
    model = build.network_from_weights(cfg, info, state, path, torch.device(device))
    return Trained(str(path), cfg, info, model, data_mod.eval_transform(cfg.data, info), names is not None, saved)


def scores_and_probs(model: nn.Module, images: torch.Tensor, tta_flip: bool = False,
                     amp: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, probabilities)`` of a normalized batch as ``engine.evaluate`` ranks them: logits, or with
    ``tta_flip`` the log of the image's and its mirror's averaged probabilities."""
    with autocast(images.device, amp):
        logits = model(images).float()
        if not tta_flip:
            return logits, logits.softmax(1)
        probs = (logits.softmax(1) + model(images.flip(3)).float().softmax(1)) / 2
    return probs.clamp_min(1e-12).log(), probs
