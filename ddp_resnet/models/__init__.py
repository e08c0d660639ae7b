"""The ResNet family, written from scratch in plain PyTorch (no ``torchvision.models``).

Build any network by name with :func:`build_model`; :func:`list_models` gives the valid names.

* ``resnet18/34/50/101/152``, ``resnext50_32x4d``, ``wide_resnet50_2``: torchvision-compatible with the
  ImageNet stem (same parameter counts and state_dict keys, so torchvision checkpoints load with strict=True).
* ``se_resnet18/34/50`` (squeeze-excitation, reduction 16), ``preact_resnet18/34/50/101/152`` ("v2").
* ``resnet20/32/44/56/110/1202`` and ``plain20/32/44/56/110``: the CIFAR nets of He et al. 2015 (CIFAR-only).
* ``wrn28_10``: Wide ResNet-28-10 for CIFAR.

Every model has its stem convolution at ``conv1``, its stages at ``layer1..layer4`` (``layer1..layer3`` for the
CIFAR nets and ``wrn28_10``) and its classifier at ``fc`` (an ``nn.Linear``). ``summarize`` counts parameters
and multiply-adds per stage; ``python -m ddp_resnet.models NAME`` prints them. ``build_model(..., blurpool=True,
head_dropout=p)`` adds anti-aliased downsampling and dropout before ``fc`` with unchanged state_dict keys.
"""
from .blocks import (
    BasicBlock,
    Block,
    Bottleneck,
    CifarBasicBlock,
    PreActBasicBlock,
    PreActBottleneck,
    SEBasicBlock,
    SEBottleneck,
    SqueezeExcitation,
    init_weights,
)
from .cifar import CifarResNet, wide_resnet_cifar
from .options import BlurConv2d, DropoutLinear, apply_blurpool, apply_head_dropout
from .registry import build_model, default_stem, is_cifar_only, list_models, resolve_model_stem
from .resnet import ResNet
from .summary import format_summary, summarize
from .variants import PreActResNet

__all__ = [
    "BasicBlock", "Block", "BlurConv2d", "Bottleneck", "CifarBasicBlock", "CifarResNet", "DropoutLinear",
    "PreActBasicBlock", "PreActBottleneck", "PreActResNet", "ResNet", "SEBasicBlock", "SEBottleneck",
    "SqueezeExcitation", "apply_blurpool", "apply_head_dropout", "build_model", "default_stem", "format_summary",
    "init_weights", "is_cifar_only", "list_models", "resolve_model_stem", "summarize", "wide_resnet_cifar",
]
