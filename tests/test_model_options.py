"""model.blurpool and model.head_dropout: same state_dict keys and initial weights, the intended computation, and
checkpoints that load both ways (training runs with BlurPool: tests/test_augment.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ddp_resnet.models import BlurConv2d, DropoutLinear, build_model
from ddp_resnet.models.options import binomial_filter


def _pair(name: str, **options) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    plain = build_model(name, num_classes=10)
    torch.manual_seed(0)
    return plain, build_model(name, num_classes=10, **options)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet20", "preact_resnet18", "wrn28_10"])
def test_options_keep_keys_and_initial_weights(name):
    plain, optioned = _pair(name, blurpool=True, head_dropout=0.5)
    a, b = plain.state_dict(), optioned.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert isinstance(optioned.fc, DropoutLinear) and isinstance(optioned.fc, nn.Linear)
    assert all(not k.endswith("blur") for k in b)  # the filter is not saved
    assert any(isinstance(m, BlurConv2d) for m in optioned.modules())  # every family gets anti-aliased downsampling


def test_blurpool_wraps_ffcvs_convolutions_and_loads_torchvision_weights():
    model = build_model("resnet50", blurpool=True)
    blurred = [n for n, m in model.named_modules() if isinstance(m, BlurConv2d)]
    assert blurred == ["layer2.0.conv2", "layer2.0.downsample.0", "layer3.0.conv2", "layer3.0.downsample.0",
                       "layer4.0.conv2", "layer4.0.downsample.0"]  # strided, >= 16 inputs: not the 3-channel stem
    reference = torchvision.models.resnet50()
    model.load_state_dict(reference.state_dict(), strict=True)
    reference.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    reference.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(model(x), reference(x))  # same weights, anti-aliased downsampling


def test_blur_conv_is_the_convolution_of_the_binomially_blurred_input():
    torch.manual_seed(1)
    conv = nn.Conv2d(16, 8, 3, stride=2, padding=1)
    blur = BlurConv2d.from_conv(conv)
    assert blur.weight is conv.weight and blur.bias is conv.bias
    x = torch.randn(2, 16, 9, 9)
    kernel = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16
    expected = conv(F.conv2d(x, kernel.expand(16, 1, 3, 3), padding=1, groups=16))
    assert torch.allclose(blur(x), expected, atol=1e-6)
    assert torch.equal(binomial_filter(3).sum((1, 2, 3)), torch.ones(3))
    constant = torch.full((1, 16, 8, 8), 2.0)
    blurred = F.conv2d(constant, blur.blur, padding=1, groups=16)
    assert torch.equal(blurred[..., 1:-1, 1:-1], constant[..., 1:-1, 1:-1])  # a low-pass filter keeps flat areas


def test_head_dropout_drops_in_training_only():
    plain, dropped = _pair("resnet20", head_dropout=0.5)
    x = torch.randn(4, 3, 16, 16)
    plain.eval()
    dropped.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), dropped(x))
        dropped.train()
        features = torch.flatten(dropped.avgpool(dropped.forward_features(x)), 1)
        torch.manual_seed(3)
        out = dropped.fc(features)
        torch.manual_seed(3)
        expected = F.linear(F.dropout(features, 0.5, True), dropped.fc.weight, dropped.fc.bias)
    assert torch.equal(out, expected) and not torch.allclose(out, F.linear(features, dropped.fc.weight,
                                                                           dropped.fc.bias))
    assert "dropout=0.5" in repr(dropped.fc)
