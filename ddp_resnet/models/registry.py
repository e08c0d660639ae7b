"""The one registry of model names: ``build_model``, ``list_models``, ``default_stem``, ``is_cifar_only``."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import nn

from .blocks import BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck, SEBasicBlock, SEBottleneck, resolve_stem
from .cifar import CifarResNet, wide_resnet_cifar
from .options import apply_blurpool, apply_head_dropout
from .resnet import ResNet
from .variants import PreActResNet


@dataclass(frozen=True)
class ModelSpec:
    """How to build one registered model and which stems it supports."""

    builder: Callable[..., nn.Module]  # called with num_classes=, stem=, zero_init_residual= and extra options
    default_stem: str
    cifar_only: bool = False


STAGES = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3)),
          101: (Bottleneck, (3, 4, 23, 3)), 152: (Bottleneck, (3, 8, 36, 3))}
PREACT_BLOCKS = {BasicBlock: PreActBasicBlock, Bottleneck: PreActBottleneck}
SE_BLOCKS = {BasicBlock: SEBasicBlock, Bottleneck: SEBottleneck}


def _se_resnet(depth: int) -> Callable[..., nn.Module]:
    block, layers = STAGES[depth]

    def build(reduction: int = 16, **kwargs: Any) -> nn.Module:
        return ResNet(SE_BLOCKS[block], layers, block_kwargs={"reduction": reduction}, **kwargs)

    return build


def _specs() -> dict[str, ModelSpec]:
    """Every name: torchvision's ResNets (parameters with the ImageNet stem and 1000 classes: 18: 11,689,512;
    34: 21,797,672; 50: 25,557,032; 101: 44,549,160; 152: 60,192,808), ResNeXt-50 32x4d, Wide ResNet-50-2,
    SE-ResNets (reduction 16), pre-activation ResNets, He et al.'s CIFAR nets (6n+2 layers, with and without
    shortcuts) and WRN-28-10."""
    specs = {f"resnet{d}": ModelSpec(partial(ResNet, *STAGES[d]), "imagenet") for d in STAGES}
    specs["resnext50_32x4d"] = ModelSpec(partial(ResNet, *STAGES[50], groups=32, width_per_group=4), "imagenet")
    specs["wide_resnet50_2"] = ModelSpec(partial(ResNet, *STAGES[50], width_per_group=128), "imagenet")
    specs.update({f"se_resnet{d}": ModelSpec(_se_resnet(d), "imagenet") for d in (18, 34, 50)})
    specs.update({f"preact_resnet{d}": ModelSpec(partial(PreActResNet, PREACT_BLOCKS[STAGES[d][0]], STAGES[d][1]),
                                                 "imagenet") for d in STAGES})
    for depth in (20, 32, 44, 56, 110, 1202):
        specs[f"resnet{depth}"] = ModelSpec(partial(CifarResNet, depth, shortcut=True), "cifar", cifar_only=True)
    for depth in (20, 32, 44, 56, 110):
        specs[f"plain{depth}"] = ModelSpec(partial(CifarResNet, depth, shortcut=False), "cifar", cifar_only=True)
    specs["wrn28_10"] = ModelSpec(partial(wide_resnet_cifar, 28, 10), "cifar")
    return specs


MODELS: dict[str, ModelSpec] = _specs()


def list_models() -> list[str]:
    """All registered model names, sorted."""
    return sorted(MODELS)


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(list_models())}") from None


def default_stem(name: str) -> str:
    """The stem a model gets for ``stem=None``/``"auto"``: ``"imagenet"`` or ``"cifar"``."""
    return _spec(name).default_stem


def is_cifar_only(name: str) -> bool:
    """True for nets that only exist with the CIFAR stem (the paper's 6n+2 ResNets and plain nets)."""
    return _spec(name).cifar_only


def resolve_model_stem(name: str, stem: str | None) -> str:
    """The concrete stem ``build_model(name, stem=stem)`` would use; ValueError if invalid for this model."""
    spec = _spec(name)
    resolved = resolve_stem(stem, spec.default_stem)
    if spec.cifar_only and resolved != "cifar":
        raise ValueError(f"model {name!r} is CIFAR-only; stem must be 'cifar' or 'auto', got {stem!r}")
    return resolved


def build_model(name: str, num_classes: int = 1000, stem: str | None = None, zero_init_residual: bool = False,
                blurpool: bool = False, head_dropout: float = 0.0, **kwargs: Any) -> nn.Module:
    """Build a freshly initialised model by name.

    Args:
        name: one of :func:`list_models`.
        num_classes: outputs of the ``model.fc`` head.
        stem: ``"imagenet"``, ``"cifar"``, or ``None``/``"auto"`` for the model's natural default
            (:func:`default_stem`).
        zero_init_residual: start the last BN gamma of every residual block at 0.
        blurpool: blur before every strided convolution with >= 16 input channels (``options.apply_blurpool``).
        head_dropout: dropout probability before ``fc`` (``options.apply_head_dropout``).
        **kwargs: passed to the builder (e.g. ``dropout`` for ``wrn28_10``, ``reduction`` for SE nets).

    Raises:
        ValueError: unknown name or stem, or the ImageNet stem for a CIFAR-only net (one-line messages).
    """
    spec = _spec(name)
    stem = resolve_model_stem(name, stem)
    model = spec.builder(num_classes=num_classes, stem=stem, zero_init_residual=zero_init_residual, **kwargs)
    if blurpool:
        apply_blurpool(model)
    if head_dropout > 0:
        apply_head_dropout(model, head_dropout)
    return model
