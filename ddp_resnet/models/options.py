"""Model options applied to a built network without changing its state_dict keys.

* BlurPool (Zhang 2019, "Making Convolutional Networks Shift-Invariant Again"), as FFCV's ResNet-50 recipe applies
  it: every strided convolution with at least 16 input channels first low-passes its input with a fixed 3x3
  binomial filter ([1, 2, 1] x [1, 2, 1] / 16, per channel, stride 1, zero padding 1). The filter is a
  non-persistent buffer and the convolution keeps its parameters, so checkpoints, exports and torchvision weights
  load in both directions (``model.blurpool``).
* Dropout before the classifier: ``fc`` becomes a ``DropoutLinear`` (an ``nn.Linear`` that drops its input while
  training), keeping ``fc.weight`` / ``fc.bias`` (``model.head_dropout``).

Both reuse the original modules' parameter tensors and draw no random numbers, so a model built with an option has
the same initial weights as one without.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BLUR_MIN_CHANNELS = 16  # FFCV blurs strided convolutions with at least this many input channels (not the stem)


def binomial_filter(channels: int) -> torch.Tensor:
    """The depthwise 3x3 binomial low-pass filter, ``channels x 1 x 3 x 3``, summing to 1 per channel."""
    row = torch.tensor([1.0, 2.0, 1.0])
    return (torch.outer(row, row) / 16.0).expand(channels, 1, 3, 3).clone()


class BlurConv2d(nn.Conv2d):
    """A convolution whose input is blurred by ``binomial_filter`` first (anti-aliasing before its stride)."""

    blur: torch.Tensor

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> BlurConv2d:
        """The blurred version of ``conv``, sharing its parameters."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        new.weight, new.bias = conv.weight, conv.bias
        new.register_buffer("blur", binomial_filter(conv.in_channels).to(conv.weight.device), persistent=False)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blurred = F.conv2d(x, self.blur.to(x.dtype), padding=1, groups=self.in_channels)
        return super().forward(blurred)


def apply_blurpool(model: nn.Module, min_channels: int = BLUR_MIN_CHANNELS) -> int:
    """Replace every strided ``nn.Conv2d`` with >= ``min_channels`` inputs by a ``BlurConv2d``; returns how many."""
    count = 0
    for name, child in list(model.named_children()):
        if type(child) is nn.Conv2d and max(child.stride) > 1 and child.in_channels >= min_channels:
            setattr(model, name, BlurConv2d.from_conv(child))
            count += 1
        else:
            count += apply_blurpool(child, min_channels)
    return count


class DropoutLinear(nn.Linear):
    """``nn.Linear`` applied to its dropped-out input (dropout before the classifier), same parameters."""

    p: float = 0.0

    @classmethod
    def from_linear(cls, linear: nn.Linear, p: float) -> DropoutLinear:
        """The head ``linear`` with dropout probability ``p`` on its input, sharing its parameters."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        new.weight, new.bias, new.p = linear.weight, linear.bias, p
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.dropout(x, self.p, self.training))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout={self.p}"


def apply_head_dropout(model: nn.Module, p: float, head: str = "fc") -> None:
    """Put dropout with probability ``p`` before the model's linear classifier ``head``."""
    linear = getattr(model, head, None)
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"head_dropout: the model has no linear '{head}' head")
    setattr(model, head, DropoutLinear.from_linear(linear, p))
