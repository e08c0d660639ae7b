"""ResNet variants: ResNeXt, Wide ResNet-50-2, SE-ResNet and pre-activation ResNet ("v2").

``resnext50_32x4d`` and ``wide_resnet50_2`` are state-dict compatible with torchvision (ImageNet stem).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .blocks import (
    PreActBlock,
    init_weights,
    resolve_stem,
    stem_conv,
    stem_pool,
)


class PreActResNet(nn.Module):
    """Pre-activation ResNet (He et al. 2016, "Identity Mappings"), any number of stages.

    Stem: ``conv1`` then, for the ImageNet stem only, ``bn1``-``relu``-``maxpool`` (identities for the CIFAR
    stem). Stages ``layer1..layerN`` of pre-activation blocks, then ``final_bn``-``final_relu``, global
    average pooling and ``fc``. Also the backbone of Zagoruyko's Wide ResNets (``widths`` x k, ``dropout``).

    Args:
        block: ``PreActBasicBlock`` or ``PreActBottleneck``.
        layers: blocks per stage; the first stage has stride 1, the others stride 2.
        widths: ``planes`` of each stage (outputs are ``planes * block.expansion``).
        stem_width: output channels of ``conv1``.
        dropout: dropout probability inside every block (between its convolutions).
    """

    def __init__(self, block: type[PreActBlock], layers: Sequence[int], widths: Sequence[int] = (64, 128, 256, 512),
                 num_classes: int = 1000, stem: str | None = "imagenet", zero_init_residual: bool = False,
                 stem_width: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        if len(layers) != len(widths):
            raise ValueError(f"layers {tuple(layers)} and widths {tuple(widths)} must have the same length")
        stem = resolve_stem(stem, "imagenet")
        self.stem = stem
        imagenet = stem == "imagenet"
        self.conv1 = stem_conv(stem, stem_width)
        self.bn1 = nn.BatchNorm2d(stem_width) if imagenet else nn.Identity()
        self.relu = nn.ReLU(inplace=True) if imagenet else nn.Identity()
        self.maxpool = stem_pool(stem)
        in_ch = stem_width
        for i, (n, planes) in enumerate(zip(layers, widths)):
            stage = self._make_layer(block, in_ch, planes, n, stride=1 if i == 0 else 2, dropout=dropout)
            self.add_module(f"layer{i + 1}", stage)
            in_ch = planes * block.expansion
        self.num_stages = len(layers)
        self.final_bn = nn.BatchNorm2d(in_ch)
        self.final_relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self, zero_init_residual)

    @staticmethod
    def _make_layer(block: type[PreActBlock], in_ch: int, planes: int, n: int, stride: int,
                    dropout: float) -> nn.Sequential:
        blocks = [block(in_ch, planes, stride, dropout=dropout)]
        blocks += [block(planes * block.expansion, planes, dropout=dropout) for _ in range(1, n)]
        return nn.Sequential(*blocks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, stages and the final BN-ReLU; returns the last feature map."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.final_relu(self.final_bn(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.forward_features(x))
        return self.fc(torch.flatten(x, 1))
