"""`python -m ddp_resnet.export CKPT OUT.pt [--ema]`: plain weights from a training checkpoint.

The output is a bare state_dict (no optimizer, no wrapper prefixes) that loads with strict=True into
``ddp_resnet.models.build_model(name)`` and, for ImageNet-stem ResNets, into torchvision's model of that name.
"""
from __future__ import annotations

import argparse
import sys

from ddp_resnet import checkpoint as ckpt


def export(checkpoint_path: str, out_path: str, use_ema: bool = False) -> tuple[dict, dict]:
    """Write the checkpoint's model (or EMA) weights to out_path; returns (state_dict, the checkpoint's config)."""
    payload = ckpt.load(checkpoint_path, "cpu")
    if use_ema:
        if payload.get("ema") is None:
            raise ckpt.CheckpointError(f"checkpoint {checkpoint_path} has no EMA weights (optim.ema_decay was 0)")
        state = payload["ema"]
    else:
        state = payload["model"]
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    ckpt.save(state, out_path)
    return state, payload.get("config") or {}


def cli(argv: list[str] | None = None) -> int:
    """Console entry point."""
    parser = argparse.ArgumentParser(prog="python -m ddp_resnet.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead")
    args = parser.parse_args(argv)
    try:
        state, config = export(args.checkpoint, args.out, args.ema)
    except ckpt.CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model_cfg = config.get("model", {})
    print(f"wrote {args.out}: {len(state)} tensors, {sum(v.numel() for v in state.values()):,} values "
          f"(model {model_cfg.get('name', '?')})")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
