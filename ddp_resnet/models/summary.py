"""Per-stage parameter and multiply-add counts, and the ``python -m ddp_resnet.models`` command line.

Stages are the model's top-level children: everything registered before ``layer1`` is the ``stem``,
``layer1..layerN`` are stages, everything after the last stage (final BN, pooling, ``fc``) is the ``head``.
Multiply-adds (MACs) are counted with forward hooks on ``nn.Conv2d`` (output elements x in_ch/groups x kh x kw)
and ``nn.Linear`` (output elements x in_features), for one sample; BN, ReLU, pooling and additions are ignored.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .registry import build_model, list_models, resolve_model_stem

Stats = dict[str, dict[str, int]]


def _stage_names(model: nn.Module) -> dict[str, str]:
    """Map each top-level child name to its stage: ``stem``, ``layerK`` or ``head``."""
    stages: dict[str, str] = {}
    seen_layer = False
    for name, _ in model.named_children():
        if name.startswith("layer") and name[5:].isdigit():
            stages[name], seen_layer = name, True
        else:
            stages[name] = "head" if seen_layer else "stem"
    return stages


def _macs_hook(stats: dict[str, int], stage: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        per_sample = output.numel() // output.shape[0]
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            stats[stage] += per_sample * (module.in_channels // module.groups) * kh * kw
        else:
            stats[stage] += per_sample * module.in_features
    return hook


def _hook_macs(model: nn.Module, stages: dict[str, str], macs: dict[str, int]) -> list[RemovableHandle]:
    """Register MAC-counting hooks on every Conv2d/Linear, accumulating into ``macs[stage]``."""
    return [m.register_forward_hook(_macs_hook(macs, stages[name]))
            for name, child in model.named_children() for m in child.modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))]


def summarize(model: nn.Module, input_size: int | Sequence[int], in_channels: int = 3) -> Stats:
    """Count parameters and forward multiply-adds (one sample, eval mode) per stage.

    Args:
        model: a model whose top-level children are a stem, ``layer1..layerN`` and a head.
        input_size: side of a square input, or ``(height, width)``.
        in_channels: input channels.

    Returns:
        ``{stage: {"params": int, "macs": int}}`` in order ``stem, layer1.., head, total``.
    """
    h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    stages = _stage_names(model)
    order = ["stem"] + [s for s in stages.values() if s.startswith("layer")] + ["head"]
    params, macs = dict.fromkeys(order, 0), dict.fromkeys(order, 0)
    for name, child in model.named_children():
        params[stages[name]] += sum(p.numel() for p in child.parameters())
    handles = _hook_macs(model, stages, macs)
    ref = next(model.parameters())
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, in_channels, h, w, device=ref.device, dtype=ref.dtype))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    result = {s: {"params": params[s], "macs": macs[s]} for s in order}
    result["total"] = {"params": sum(params.values()), "macs": sum(macs.values())}
    return result


def human(n: float) -> str:
    """Format a count with a K/M/G suffix, e.g. ``4.09 G``."""
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= factor:
            return f"{n / factor:.2f} {suffix}"
    return f"{n:.0f}"


def format_summary(stats: Stats) -> str:
    """Render :func:`summarize`'s result as an aligned text table."""
    lines = [f"{'stage':<8} {'params':>12} {'MACs':>16} {'':>9}"]
    for stage, row in stats.items():
        if stage == "total":
            lines.append("-" * len(lines[0]))
        lines.append(f"{stage:<8} {row['params']:>12,} {row['macs']:>16,} {human(row['macs']):>9}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ddp_resnet.models",
                                     description="Per-stage parameters and multiply-adds of a registered model.")
    parser.add_argument("name", nargs="?", help="model name (see --list)")
    parser.add_argument("--list", action="store_true", help="print the registered model names and exit")
    parser.add_argument("--stem", default="auto", help="imagenet | cifar | auto (the model's default)")
    parser.add_argument("--input", type=int, default=None, help="input side in pixels (default 224, 32 for cifar)")
    parser.add_argument("--num-classes", type=int, default=None, help="classes (default 1000, 10 for cifar)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for a bad model name or stem)."""
    args = _parser().parse_args(argv)
    if args.list:
        print("\n".join(list_models()))
        return 0
    if args.name is None:
        print("error: a model name is required (see --list)", file=sys.stderr)
        return 2
    try:
        stem = resolve_model_stem(args.name, args.stem)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cifar = stem == "cifar"
    size = args.input or (32 if cifar else 224)
    num_classes = args.num_classes or (10 if cifar else 1000)
    model = build_model(args.name, num_classes=num_classes, stem=stem)
    print(f"{args.name}  stem={stem}  input=3x{size}x{size}  num_classes={num_classes}")
    print(format_summary(summarize(model, size)))
    return 0
