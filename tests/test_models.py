"""Tests for ddp_resnet.models: registry, parameter counts, shapes, torchvision equivalence, shortcuts, summary.

Cost control (2 shared CPU cores): every forward runs in eval mode under no_grad with batch 1 unless BN
needs a batch; one model per registered name is built once (module-scoped fixture). Shapes at 224x224 are
checked for every name except the CIFAR-only nets and ``wrn28_10`` (their natural input is 32x32, and
wrn28_10 at 224 with its CIFAR stem would cost ~260 G multiply-adds) and the >7 G-MAC ImageNet nets
(``HEAVY_224``: 101/152 layers and wide_resnet50_2, whose code paths the 50-layer siblings cover); all names
are checked at 32x32, and the torchvision-equivalence test runs every torchvision name at 64x64.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from ddp_resnet.models import Block, CifarBasicBlock, build_model, default_stem, is_cifar_only, list_models, summarize
from ddp_resnet.models.blocks import ZeroPadShortcut
from ddp_resnet.models.summary import main as summary_main

REPO = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO / "ddp_resnet" / "models"

TORCHVISION_PARAMS = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "resnet101": 44_549_160,
    "resnet152": 60_192_808, "resnext50_32x4d": 25_028_904, "wide_resnet50_2": 68_883_240,
}
# Published sizes (He et al. 2015 table 6; Zagoruyko 2016; timm's seresnet*), 10 classes for CIFAR nets.
APPROX_PARAMS = {
    "resnet20": 0.27e6, "resnet32": 0.46e6, "resnet44": 0.66e6, "resnet56": 0.85e6, "resnet110": 1.7e6,
    "resnet1202": 19.4e6, "wrn28_10": 36.5e6,
    "se_resnet18": 11.78e6, "se_resnet34": 21.96e6, "se_resnet50": 28.09e6,
}
EXPECTED_NAMES = {
    *TORCHVISION_PARAMS, "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202",
    "plain20", "plain32", "plain44", "plain56", "plain110", "wrn28_10", "se_resnet18", "se_resnet34",
    "se_resnet50", "preact_resnet18", "preact_resnet34", "preact_resnet50", "preact_resnet101",
    "preact_resnet152",
}
THREE_STAGE = {n for n in EXPECTED_NAMES if is_cifar_only(n)} | {"wrn28_10"}
HEAVY_224 = {"resnet101", "resnet152", "preact_resnet101", "preact_resnet152", "wide_resnet50_2"}
# One representative per family: name -> number of residual blocks.
FAMILIES = {
    "resnet18": 8, "resnet50": 16, "resnext50_32x4d": 16, "wide_resnet50_2": 16, "se_resnet18": 8,
    "se_resnet50": 16, "preact_resnet18": 8, "preact_resnet50": 16, "resnet20": 9, "wrn28_10": 12,
}


def _num_classes(name: str) -> int:
    return 10 if default_stem(name) == "cifar" else 1000


def _blocks(model: nn.Module) -> list[Block]:
    return [m for m in model.modules() if isinstance(m, Block)]


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def _forward(model: nn.Module, size: int, batch: int = 1) -> torch.Tensor:
    return model(torch.randn(batch, 3, size, size))


@pytest.fixture(scope="module", params=sorted(EXPECTED_NAMES))
def named_model(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    """Each registered model, built once with its natural stem, in eval mode."""
    name = request.param
    return name, build_model(name, num_classes=_num_classes(name)).eval()


# --- registry -----------------------------------------------------------------------------------------------

def test_registry_names() -> None:
    assert list_models() == sorted(EXPECTED_NAMES)


def test_default_stem_and_cifar_only() -> None:
    assert default_stem("resnet50") == "imagenet" and not is_cifar_only("resnet50")
    assert default_stem("resnet20") == "cifar" and is_cifar_only("resnet20")
    assert default_stem("plain56") == "cifar" and is_cifar_only("plain56")
    assert default_stem("wrn28_10") == "cifar" and not is_cifar_only("wrn28_10")


@pytest.mark.parametrize("call", [build_model, default_stem, is_cifar_only])
def test_unknown_name_lists_choices(call) -> None:
    with pytest.raises(ValueError) as err:
        call("resnet19")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("unknown model 'resnet19'; valid choices: ")
    assert msg.split("valid choices: ")[1].split(", ") == list_models()


def test_bad_stems() -> None:
    with pytest.raises(ValueError, match="valid choices: auto, cifar, imagenet"):
        build_model("resnet18", stem="tiny")
    with pytest.raises(ValueError, match="CIFAR-only"):
        build_model("resnet20", stem="imagenet")
    with pytest.raises(ValueError, match="plain net"):
        build_model("plain20", zero_init_residual=True)


def test_models_package_is_self_contained() -> None:
    forbidden = re.compile(r"^\s*(import|from)\s+(torchvision|torch\.distributed|yaml|ddp_resnet\.config)\b|"
                           r"\.cuda\(|torch\.device\(", re.MULTILINE)
    for path in MODELS_DIR.glob("*.py"):
        match = forbidden.search(path.read_text())
        assert match is None, f"{path.name}: {match.group(0) if match else ''}"


# --- every registered model ---------------------------------------------------------------------------------

def test_param_count(named_model: tuple[str, nn.Module]) -> None:
    name, model = named_model
    n = _n_params(model)
    if name in TORCHVISION_PARAMS:
        assert n == TORCHVISION_PARAMS[name]
    elif name in APPROX_PARAMS:
        assert n == pytest.approx(APPROX_PARAMS[name], rel=0.02)
    elif name.startswith("plain"):  # option-A shortcuts have no parameters
        assert n == pytest.approx(APPROX_PARAMS["resnet" + name[5:]], rel=0.02)
    else:  # pre-activation: no downsample BN, one extra final BN
        assert n == pytest.approx(TORCHVISION_PARAMS[name.replace("preact_", "")], rel=1e-3)


def test_structure(named_model: tuple[str, nn.Module]) -> None:
    name, model = named_model
    stages = 3 if name in THREE_STAGE else 4
    assert [f"layer{i}" for i in range(1, stages + 1)] == [n for n, _ in model.named_children() if "layer" in n]
    assert isinstance(model.conv1, nn.Conv2d) and model.conv1.in_channels == 3
    assert model.conv1.kernel_size == ((7, 7) if default_stem(name) == "imagenet" else (3, 3))
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == _num_classes(name)


def test_output_shape_32(named_model: tuple[str, nn.Module]) -> None:
    name, model = named_model
    assert _forward(model, 32).shape == (1, _num_classes(name))


def test_output_shape_224(named_model: tuple[str, nn.Module]) -> None:
    name, model = named_model
    if name in THREE_STAGE:
        pytest.skip("CIFAR net: checked at 32x32 only")
    if name in HEAVY_224:
        pytest.skip("> 7 G multiply-adds at 224; same code path as its 50-layer sibling, checked at 32x32")
    assert _forward(model, 224).shape == (1, _num_classes(name))


# --- stems --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d", "se_resnet18", "preact_resnet18"])
def test_cifar_stem(name: str) -> None:
    model = build_model(name, num_classes=10, stem="cifar").eval()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert _forward(model, 32, batch=2).shape == (2, 10)


def test_auto_stem_is_default() -> None:
    for stem in (None, "auto"):
        assert build_model("resnet18", stem=stem).conv1.kernel_size == (7, 7)
        assert build_model("resnet20", stem=stem).conv1.kernel_size == (3, 3)


def test_wrn_imagenet_stem_and_dropout() -> None:
    model = build_model("wrn28_10", num_classes=10, stem="imagenet", dropout=0.3).eval()
    assert model.conv1.kernel_size == (7, 7) and isinstance(model.maxpool, nn.MaxPool2d)
    assert sum(isinstance(m, nn.Dropout) and m.p == 0.3 for m in model.modules()) == 12
    assert _forward(model, 32).shape == (1, 10)


# --- torchvision equivalence --------------------------------------------------------------------------------

def _randomize_bn(model: nn.Module) -> None:
    """Make BN non-trivial so eval-mode outputs depend on every BN tensor."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)


def _zero_keys(state: dict[str, torch.Tensor]) -> set[str]:
    return {k for k, v in state.items() if v.is_floating_point() and v.numel() > 1 and not v.any()}


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_matches_torchvision(name: str) -> None:
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, name)(weights=None, zero_init_residual=True)
    ours = build_model(name, zero_init_residual=True)
    their_state, our_state = theirs.state_dict(), ours.state_dict()
    assert {k: v.shape for k, v in our_state.items()} == {k: v.shape for k, v in their_state.items()}
    assert _zero_keys(our_state) == _zero_keys(their_state)  # same zero_init_residual
    _randomize_bn(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), atol=1e-5, rtol=1e-5)


# --- init and gradients -------------------------------------------------------------------------------------

def test_kaiming_init() -> None:
    model = build_model("resnet50")
    conv = model.layer3[0].conv2  # 256 -> 256, 3x3: fan_out 2304
    assert conv.weight.std().item() == pytest.approx((2 / 2304) ** 0.5, rel=0.02)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert bool((m.weight == 1).all() and (m.bias == 0).all())


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_zero_init_residual(name: str) -> None:
    model = build_model(name, num_classes=10, zero_init_residual=True)
    blocks = _blocks(model)
    assert len(blocks) == FAMILIES[name]
    last = {id(b.last_bn) for b in blocks}
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert bool((m.weight == (0 if id(m) in last else 1)).all())


@pytest.mark.parametrize("name", sorted(FAMILIES) + ["plain20"])
def test_gradients_reach_conv1(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10).train()
    out = model(torch.randn(2, 3, 32, 32))
    out.square().mean().backward()
    grad = model.conv1.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


# --- plain nets really have no shortcut ---------------------------------------------------------------------

def _cifar_blocks(name: str) -> list[CifarBasicBlock]:
    torch.manual_seed(0)
    blocks = [m for m in build_model(name, num_classes=10).eval().modules() if isinstance(m, CifarBasicBlock)]
    assert len(blocks) == 9
    return blocks


def _block_input(block: CifarBasicBlock) -> torch.Tensor:
    return torch.rand(2, block.conv1.in_channels, 8, 8) + 0.1  # post-ReLU activations are >= 0


@torch.no_grad()
def test_block_output_formula() -> None:
    for block in _cifar_blocks("resnet20"):
        x = _block_input(block)
        shortcut = block.skip(x)
        assert shortcut.abs().sum() > 0
        torch.testing.assert_close(block(x), torch.relu(block.branch(x) + shortcut), rtol=0, atol=0)
    for block in _cifar_blocks("plain20"):
        x = _block_input(block)
        assert not block.has_shortcut and block.downsample is None
        torch.testing.assert_close(block(x), torch.relu(block.branch(x)), rtol=0, atol=0)


@torch.no_grad()
def test_plain_block_drops_input_when_branch_is_zero() -> None:
    """With the last BN's gamma and beta at 0, F(x) == 0: residual block -> relu(shortcut(x)), plain -> 0."""
    for name in ("resnet20", "plain20"):
        for block in _cifar_blocks(name):
            block.bn2.weight.zero_()
            block.bn2.bias.zero_()
            x = _block_input(block)
            out = block(x)
            if name == "plain20":
                assert not out.any()
            else:
                expected = x if block.downsample is None else block.downsample(x)
                assert out.abs().sum() > 0
                torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_plain_net_has_no_shortcut_modules() -> None:
    assert not any(isinstance(m, ZeroPadShortcut) for m in build_model("plain110", num_classes=10).modules())
    assert sum(isinstance(m, ZeroPadShortcut) for m in build_model("resnet110", num_classes=10).modules()) == 2


# --- summary ------------------------------------------------------------------------------------------------

def test_summarize_resnet20() -> None:
    model = build_model("resnet20", num_classes=10).train()
    stats = summarize(model, 32)
    assert list(stats) == ["stem", "layer1", "layer2", "layer3", "head", "total"]
    assert stats["total"]["params"] == _n_params(model) == sum(s["params"] for k, s in stats.items() if k != "total")
    assert stats["total"]["macs"] == sum(s["macs"] for k, s in stats.items() if k != "total")
    assert stats["stem"]["macs"] == 32 * 32 * 16 * 3 * 9 and stats["head"]["macs"] == 64 * 10
    assert stats["total"]["macs"] == pytest.approx(40.55e6, rel=0.01)  # He et al.: ~41 M
    assert model.training  # mode restored


def test_summary_cli_resnet50() -> None:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "ddp_resnet.models", "resnet50", "--stem", "imagenet",
                           "--input", "224"], check=False, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for stage in ("stem", "layer1", "layer2", "layer3", "layer4", "head"):
        assert re.search(rf"^{stage}\s+[\d,]+\s+[\d,]+", proc.stdout, re.MULTILINE), stage
    params, macs = re.search(r"^total\s+([\d,]+)\s+([\d,]+)", proc.stdout, re.MULTILINE).groups()
    assert int(params.replace(",", "")) == TORCHVISION_PARAMS["resnet50"]
    assert int(macs.replace(",", "")) == pytest.approx(4.09e9, rel=0.01)


def test_summary_cli_unknown_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert summary_main(["resnet19"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown model 'resnet19'" in err and "resnet18" in err
