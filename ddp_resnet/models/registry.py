"""The one registry of model names: ``build_model``, ``list_models``, ``default_stem``, ``is_cifar_only``."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from . import cifar, resnet, variants
from .blocks import resolve_stem


@dataclass(frozen=True)
class ModelSpec:
    """How to build one registered model and which stems it supports."""

    builder: Callable[..., nn.Module]
    default_stem: str
    cifar_only: bool = False


def _specs() -> dict[str, ModelSpec]:
    specs: dict[str, ModelSpec] = {}
    for module, names in (
        (resnet, ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")),
        (variants, ("resnext50_32x4d", "wide_resnet50_2", "se_resnet18", "se_resnet34", "se_resnet50",
                    "preact_resnet18", "preact_resnet34", "preact_resnet50", "preact_resnet101",
                    "preact_resnet152")),
    ):
        specs.update({name: ModelSpec(getattr(module, name), "imagenet") for name in names})
    for name in ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202",
                 "plain20", "plain32", "plain44", "plain56", "plain110"):
        specs[name] = ModelSpec(getattr(cifar, name), "cifar", cifar_only=True)
    specs["wrn28_10"] = ModelSpec(cifar.wrn28_10, "cifar")
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
                **kwargs: Any) -> nn.Module:
    """Build a freshly initialised model by name.

    Args:
        name: one of :func:`list_models`.
        num_classes: outputs of the ``model.fc`` head.
        stem: ``"imagenet"``, ``"cifar"``, or ``None``/``"auto"`` for the model's natural default
            (:func:`default_stem`).
        zero_init_residual: start the last BN gamma of every residual block at 0.
        **kwargs: passed to the builder (e.g. ``dropout`` for ``wrn28_10``, ``reduction`` for SE nets).

    Raises:
        ValueError: unknown name or stem, or the ImageNet stem for a CIFAR-only net (one-line messages).
    """
    spec = _spec(name)
    stem = resolve_model_stem(name, stem)
    return spec.builder(num_classes=num_classes, stem=stem, zero_init_residual=zero_init_residual, **kwargs)
