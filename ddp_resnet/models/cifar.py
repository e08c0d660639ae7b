"""CIFAR networks: the paper's 6n+2-layer ResNets, their "plain" counterparts, and Wide ResNet-28-10.

``resnet20/32/44/56/110/1202`` follow He et al. 2015, section 4.2: a 3x3 convolution with 16 channels,
three stages of n basic blocks with 16/32/64 channels (stride 1/2/2), global average pooling and ``fc``.
Shortcuts are identities; where the shape changes they subsample and zero-pad the new channels ("option A"),
so the shortcuts have no parameters. ``plain*`` nets are the same networks with the shortcuts removed.
These nets are CIFAR-only: asking for the ImageNet stem raises ValueError.

``wrn28_10`` is Zagoruyko & Komodakis 2016: a pre-activation net with wide basic blocks (widths 160/320/640),
a CIFAR stem by default and dropout 0 unless ``dropout=`` is given.
"""
from __future__ import annotations

import torch
from torch import nn

from .blocks import CifarBasicBlock, PreActBasicBlock, conv3x3, init_weights, resolve_stem
from .variants import PreActResNet

CIFAR_WIDTHS = (16, 32, 64)


class CifarResNet(nn.Module):
    """The 6n+2-layer CIFAR ResNet (``shortcut=True``) or plain net (``shortcut=False``) of He et al. 2015."""

    def __init__(self, depth: int, num_classes: int = 10, stem: str | None = "cifar",
                 zero_init_residual: bool = False, shortcut: bool = True) -> None:
        super().__init__()
        _check_cifar_args(depth, stem, zero_init_residual, shortcut)
        n = (depth - 2) // 6
        self.stem = "cifar"
        self.conv1 = conv3x3(3, CIFAR_WIDTHS[0])
        self.bn1 = nn.BatchNorm2d(CIFAR_WIDTHS[0])
        self.relu = nn.ReLU(inplace=True)
        in_ch = CIFAR_WIDTHS[0]
        for i, width in enumerate(CIFAR_WIDTHS):
            stride = 1 if i == 0 else 2
            blocks = [CifarBasicBlock(in_ch if j == 0 else width, width, stride if j == 0 else 1, shortcut)
                      for j in range(n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            in_ch = width
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self, zero_init_residual)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and the three stages; returns the last feature map."""
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.forward_features(x))
        return self.fc(torch.flatten(x, 1))


def _check_cifar_args(depth: int, stem: str | None, zero_init_residual: bool, shortcut: bool) -> None:
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
    if resolve_stem(stem, "cifar") != "cifar":
        raise ValueError(f"the {depth}-layer CIFAR net is CIFAR-only; stem must be 'cifar' or 'auto', got {stem!r}")
    if zero_init_residual and not shortcut:
        raise ValueError("zero_init_residual is meaningless for a plain net (no shortcut): every block would output 0")


def wide_resnet_cifar(depth: int, widen_factor: int, num_classes: int = 10, stem: str | None = "cifar",
                      zero_init_residual: bool = False, dropout: float = 0.0) -> PreActResNet:
    """WRN-depth-k (Zagoruyko & Komodakis 2016): (depth-4)/6 wide pre-act blocks per stage, widths 16k/32k/64k."""
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"Wide ResNet depth must be 6n+4 with n >= 1, got {depth}")
    n = (depth - 4) // 6
    widths = tuple(w * widen_factor for w in CIFAR_WIDTHS)
    return PreActResNet(PreActBasicBlock, (n, n, n), widths, num_classes=num_classes,
                        stem=resolve_stem(stem, "cifar"), zero_init_residual=zero_init_residual,
                        stem_width=CIFAR_WIDTHS[0], dropout=dropout)
