"""Residual building blocks, stems and weight initialisation shared by every network in this package.

Every block subclasses :class:`Block`, which exposes ``last_bn`` (the BatchNorm whose gamma
``zero_init_residual`` sets to zero) and ``has_shortcut`` (False only for the "plain" nets).
Module names follow torchvision (``conv1``, ``bn1``, ``downsample``, ...) so that torchvision
checkpoints load with ``strict=True``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STEMS = ("cifar", "imagenet")


def resolve_stem(stem: str | None, default: str) -> str:
    """Return the concrete stem: ``None``/``"auto"`` become ``default``; anything unknown raises ValueError."""
    if stem is None or stem == "auto":
        return default
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; valid choices: auto, {', '.join(STEMS)}")
    return stem


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias."""
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias."""
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


def stem_conv(stem: str, out_ch: int, in_ch: int = 3) -> nn.Conv2d:
    """The first convolution: 7x7 stride 2 for ``"imagenet"``, 3x3 stride 1 for ``"cifar"``."""
    if stem == "imagenet":
        return nn.Conv2d(in_ch, out_ch, 7, stride=2, padding=3, bias=False)
    return conv3x3(in_ch, out_ch)


def stem_pool(stem: str) -> nn.Module:
    """The stem's max-pool: 3x3 stride 2 for ``"imagenet"``, none (identity) for ``"cifar"``."""
    return nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()


class Block(nn.Module):
    """Base class of all residual (and plain) blocks."""

    expansion: int = 1
    has_shortcut: bool = True

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        """The last BatchNorm of the residual branch (zeroed by ``zero_init_residual``)."""
        raise NotImplementedError


class PostActBlock(Block):
    """A block computing ``relu(branch(x) + skip(x))`` (original ResNet, "v1")."""

    downsample: nn.Module | None

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The residual function F(x), before the addition and the final ReLU."""
        raise NotImplementedError

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        """The shortcut: identity, or ``downsample(x)`` where shapes change."""
        return x if self.downsample is None else self.downsample(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch(x)
        if self.has_shortcut:
            out = out + self.skip(x)
        return self.relu(out)


class BasicBlock(PostActBlock):
    """Two 3x3 convolutions (ResNet-18/34), torchvision-compatible."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


class Bottleneck(PostActBlock):
    """1x1 reduce, 3x3 (stride here, "ResNet v1.5"), 1x1 expand; torchvision-compatible.

    ``groups``/``base_width`` give ResNeXt and Wide ResNet: inner width = planes * base_width / 64 * groups.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): channel gates from a global-pooled bottleneck MLP."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(hidden, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.relu(self.reduce(self.pool(x)))))


class _SqueezeExcited:
    """Mixin: the block's residual branch is rescaled by squeeze-excitation before the addition."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, reduction: int = 16) -> None:
        super().__init__(inplanes, planes, stride, downsample, groups, base_width)
        self.se = SqueezeExcitation(planes * self.expansion, reduction)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(super().branch(x))


class SEBasicBlock(_SqueezeExcited, BasicBlock):
    """BasicBlock whose residual branch is rescaled by squeeze-excitation before the addition."""


class SEBottleneck(_SqueezeExcited, Bottleneck):
    """Bottleneck whose residual branch is rescaled by squeeze-excitation before the addition."""


class ZeroPadShortcut(nn.Module):
    """Parameter-free shortcut, "option A" of He et al. 2015: subsample spatially, zero-pad new channels."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad_front = (out_ch - in_ch) // 2
        self.pad_back = out_ch - in_ch - self.pad_front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))


class CifarBasicBlock(PostActBlock):
    """Basic block of the paper's CIFAR nets: option-A shortcut, or none at all when ``shortcut=False``."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, shortcut: bool = True) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.has_shortcut = shortcut
        needs_pad = stride != 1 or in_ch != out_ch
        self.downsample = ZeroPadShortcut(in_ch, out_ch, stride) if shortcut and needs_pad else None

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


class PreActBlock(Block):
    """Pre-activation block ("v2", He et al. 2016): ``x + F(x)`` with BN-ReLU before each convolution.

    Where shapes change the shortcut is a 1x1 convolution applied to the pre-activated input.
    """

    downsample: nn.Module | None

    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU(inplace=True)

    def residual(self, pre: torch.Tensor) -> torch.Tensor:
        """F applied to the pre-activated input ``relu(bn1(x))``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(pre)
        return self.residual(pre) + shortcut


def _preact_downsample(in_ch: int, out_ch: int, stride: int) -> nn.Conv2d | None:
    return conv1x1(in_ch, out_ch, stride) if stride != 1 or in_ch != out_ch else None


class PreActBasicBlock(PreActBlock):
    """Pre-activation basic block; with ``dropout > 0`` it is Zagoruyko's wide-dropout block."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv3x3(planes, planes)
        self.downsample = _preact_downsample(inplanes, planes, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def residual(self, pre: torch.Tensor) -> torch.Tensor:
        out = self.conv1(pre)
        return self.conv2(self.dropout(self.relu(self.bn2(out))))


class PreActBottleneck(PreActBlock):
    """Pre-activation bottleneck (1x1, 3x3 with the stride, 1x1 expand by 4)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = conv1x1(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.downsample = _preact_downsample(inplanes, planes * self.expansion, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def residual(self, pre: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.relu(self.bn2(self.conv1(pre))))
        return self.conv3(self.dropout(self.relu(self.bn3(out))))


def init_weights(model: nn.Module, zero_init_residual: bool = False) -> None:
    """torchvision's initialisation: Kaiming-normal (fan_out, relu) convs, BN weight 1 / bias 0.

    Conv biases (only in squeeze-excitation) start at 0; ``nn.Linear`` keeps PyTorch's default init.
    With ``zero_init_residual`` the last BN gamma of every block is 0, so each block starts as identity.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, Block):
                nn.init.zeros_(m.last_bn.weight)
