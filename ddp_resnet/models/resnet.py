"""ResNet-18/34/50/101/152 (He et al. 2015), written from scratch but state-dict compatible with torchvision.

With ``stem="imagenet"`` parameter counts, state_dict keys/shapes and outputs equal torchvision's;
``stem="cifar"`` replaces the 7x7/2 convolution + max-pool by a 3x3/1 convolution and no pool.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .blocks import PostActBlock, conv1x1, init_weights, resolve_stem, stem_conv, stem_pool


class ResNet(nn.Module):
    """Four-stage ResNet built from post-activation blocks (``BasicBlock``, ``Bottleneck`` or subclasses).

    Args:
        block: block class; its ``expansion`` sets the stage output widths.
        layers: number of blocks in each of the four stages.
        num_classes: outputs of the ``fc`` head.
        stem: ``"imagenet"`` (7x7/2 conv + 3x3/2 max-pool), ``"cifar"`` (3x3/1 conv), or ``None``/``"auto"``
            (imagenet).
        zero_init_residual: start the last BN gamma of every block at 0.
        groups, width_per_group: ResNeXt cardinality and per-group width (Wide ResNet: width 128).
        block_kwargs: extra keyword arguments for every block (e.g. the SE ``reduction``).
    """

    def __init__(self, block: type[PostActBlock], layers: Sequence[int], num_classes: int = 1000,
                 stem: str | None = "imagenet", zero_init_residual: bool = False, groups: int = 1,
                 width_per_group: int = 64, block_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        stem = resolve_stem(stem, "imagenet")
        self.stem = stem
        self.inplanes = 64
        self.groups = groups
        self.base_width = width_per_group
        self.block_kwargs = dict(block_kwargs or {})
        self.conv1 = stem_conv(stem, self.inplanes)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = stem_pool(stem)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        init_weights(self, zero_init_residual)

    def _make_layer(self, block: type[PostActBlock], planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        out_ch = planes * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != out_ch:
            downsample = nn.Sequential(conv1x1(self.inplanes, out_ch, stride), nn.BatchNorm2d(out_ch))
        kwargs = dict(groups=self.groups, base_width=self.base_width, **self.block_kwargs)
        layers = [block(self.inplanes, planes, stride, downsample, **kwargs)]
        self.inplanes = out_ch
        layers += [block(self.inplanes, planes, **kwargs) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and the four stages; returns the last feature map."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.forward_features(x))
        return self.fc(torch.flatten(x, 1))
