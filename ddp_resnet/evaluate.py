"""`python -m ddp_resnet.evaluate --checkpoint CKPT [--config X.yaml] [key=value ...]`: evaluate any checkpoint.

    python -m ddp_resnet.evaluate --checkpoint runs/x/checkpoints/best.pt [data.root=DIR] [--tta flip]
        [--batch-size N] [--ema] [--device cpu|cuda|auto] [--json OUT.json]
    torchrun --nproc_per_node 8 -m ddp_resnet.evaluate --checkpoint ...      # the same numbers, sharded

The evaluation is the trainer's own: ``distributed.read_env``/``init``, ``data.build_eval_loader`` (every test
image on exactly one rank, no padding) and ``engine.evaluate`` (sums all-reduced), so top-1 of a checkpoint
equals the ``test_acc`` the trainer logged for that epoch, on any number of processes.

The configuration is the checkpoint's own (``config`` entry), then ``--config`` (a YAML recipe merged on top),
then the ``key=value`` overrides, e.g. ``data.root=`` when the data moved. A plain weights file (a
``python -m ddp_resnet.export`` output) has no config: give ``--config`` or ``model.name=`` / ``data.*``.
``--batch-size`` sets the global evaluation batch (``data.eval_batch_size``).

Rank 0 prints top-1 / top-5 / loss and the per-class accuracy, and writes them with the confusion matrix to
``--json``. Exit codes: 0 done; 2 unusable checkpoint or configuration (one line on stderr); 1 a failure.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import traceback
from pathlib import Path

import torch
import yaml

from ddp_resnet import checkpoint as ckpt
from ddp_resnet import config as config_mod
from ddp_resnet import data as data_mod
from ddp_resnet import distributed
from ddp_resnet.config import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ddp_resnet.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint (best.pt, last.pt, epoch_N.pt) "
                                                            "or an exported weights file")
    parser.add_argument("--config", help="YAML recipe merged over the checkpoint's config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=/data/cifar")
    parser.add_argument("--tta", choices=("none", "flip"), default="none",
                        help="test-time augmentation: flip averages the probabilities of the image and its mirror")
    parser.add_argument("--batch-size", type=int, default=None, help="global evaluation batch size")
    parser.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                        help="default: the checkpoint's train.device")
    parser.add_argument("--json", dest="json_out", help="write the results (with the confusion matrix) here")
    return parser


def _deep_merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def read_weights(path: str | Path) -> dict:
    """A training checkpoint's payload, or ``{"model": state_dict}`` for a plain weights file."""
    try:
        return ckpt.load(path, "cpu")
    except ckpt.CheckpointError as exc:
        if "no 'model' entry" not in str(exc):
            raise
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as exc:  # loaded once already: unlikely
        raise ckpt.CheckpointError(f"checkpoint {path} failed to load ({type(exc).__name__})") from None
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
        return {"model": state}
    raise ckpt.CheckpointError(f"checkpoint {path} is neither a ddp_resnet checkpoint nor a state_dict of tensors")


def resolve_config(payload: dict, config_path: str | None, overrides: list[str], batch_size: int | None,
                   device: str | None) -> config_mod.Config:
    """The checkpoint's config, then the YAML recipe, then the overrides; validated."""
    tree = payload.get("config") if isinstance(payload.get("config"), dict) else {}
    tree = json.loads(json.dumps(tree))  # a private copy
    if config_path:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        extra = yaml.safe_load(path.read_text()) or {}
        if not isinstance(extra, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        _deep_merge(tree, extra)
    extra_overrides = list(overrides)
    if batch_size is not None:
        if batch_size < 1:
            raise ConfigError(f"--batch-size: must be > 0, got {batch_size}")
        extra_overrides.append(f"data.eval_batch_size={batch_size}")
    if device is not None:
        extra_overrides.append(f"train.device={device}")
    for text in extra_overrides:
        key, value = config_mod.parse_override(text)
        config_mod._set_dotted(tree, key, value)
    # Evaluation needs neither the fine-tuning source nor resume settings of the training run.
    tree.setdefault("finetune", {})["checkpoint"] = ""
    tree["finetune"]["freeze"] = "none"
    tree.setdefault("ckpt", {})["resume"] = "none"
    return config_mod.from_dict(tree)


def build_eval_model(cfg: config_mod.Config, info, state: dict, path: str | Path, device: torch.device):
    """The network of the config with the checkpoint's weights, on the device, in eval mode."""
    from ddp_resnet.models import build_model
    from ddp_resnet.train import resolve_stem

    ckpt.check_compatible({"model": state, "config": {}}, cfg.model.name, info.num_classes, path)
    try:
        model = build_model(cfg.model.name, num_classes=info.num_classes, stem=resolve_stem(cfg, info),
                            zero_init_residual=cfg.model.zero_init_residual)
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ckpt.CheckpointError(f"checkpoint {path} does not fit model {cfg.model.name} "
                                   f"({' '.join(line.strip() for line in first[:2])[:200]})") from None
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    return model.to(device, memory_format=memory_format).eval()


def format_results(result: dict, class_names: list[str], header: str) -> str:
    """The printed summary: header, top-1 / top-5 / loss, then one line per class."""
    lines = [header,
             f"top-1 {result['top1']:.4f}%  top-5 {result['top5']:.4f}%  loss {result['loss']:.6f}  "
             f"({result['count']} images)",
             "per-class accuracy:"]
    width = max([len(n) for n in class_names] + [5])
    confusion = result["confusion"]
    for i, (name, acc) in enumerate(zip(class_names, result["per_class_acc"])):
        lines.append(f"  {name:<{width}}  {acc:7.2f}%  (n={sum(confusion[i])})")
    return "\n".join(lines)


def run(args: argparse.Namespace, launch: distributed.LaunchInfo) -> int:
    """Load, validate, initialise, evaluate; rank 0 prints and writes."""
    payload = read_weights(args.checkpoint)
    cfg = resolve_config(payload, args.config, args.overrides, args.batch_size, args.device)
    config_mod.validate_world(cfg, launch.world_size)
    state = payload["model"]
    if args.ema:
        if payload.get("ema") is None:
            raise ckpt.CheckpointError(f"checkpoint {args.checkpoint} has no EMA weights (optim.ema_decay was 0)")
        state = payload["ema"]
    info = data_mod.describe(cfg.data)
    device = distributed.resolve_device(cfg.train.device, launch.local_rank)
    # Build (and check) the model before the process group: a bad checkpoint fails on every rank at once.
    model = build_eval_model(cfg, info, state, args.checkpoint, device)
    env = distributed.init(cfg.train.device, cfg.dist.backend, cfg.dist.timeout_s, launch)
    try:
        loader = data_mod.build_eval_loader(cfg.data, info, env.rank, env.world_size, env.device,
                                            channels_last=cfg.train.channels_last)
        from ddp_resnet.engine import evaluate

        result = evaluate(model, loader, info.num_classes, env.device, cfg.train.amp, tta_flip=args.tta == "flip")
        if env.is_main:
            where = "weights file"
            if "step" in payload and payload.get("steps_per_epoch"):
                where = f"step {payload['step']}, epoch {payload['step'] / payload['steps_per_epoch']:.2f}"
            header = (f"{args.checkpoint}: {cfg.model.name} ({where}{', EMA' if args.ema else ''}) on "
                      f"{cfg.data.dataset} test split | world {env.world_size} ({env.launcher}, {env.device})"
                      f"{' | tta flip' if args.tta == 'flip' else ''}")
            print(format_results(result, info.class_names, header), flush=True)
            if args.json_out:
                out = {"checkpoint": str(args.checkpoint), "model": cfg.model.name, "dataset": cfg.data.dataset,
                       "epoch": payload.get("epoch"), "step": payload.get("step"), "ema": args.ema,
                       "tta": args.tta, "world_size": env.world_size, "top1": result["top1"],
                       "top5": result["top5"], "loss": result["loss"], "count": result["count"],
                       "class_names": list(info.class_names), "per_class_acc": result["per_class_acc"],
                       "confusion": result["confusion"]}
                Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json_out).write_text(json.dumps(out, indent=1))
        distributed.barrier(env)
    finally:
        if env.distributed:
            distributed.cleanup()
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Parse and evaluate; returns the process exit code."""
    args = build_parser().parse_args(argv)
    launch = distributed.read_env()
    try:
        return run(args, launch)
    except (ConfigError, ckpt.CheckpointError) as exc:
        if launch.rank == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        if launch.world_size > 1 and torch.distributed.is_initialized():
            sys.stdout.flush()
            os._exit(EXIT_USAGE)
        return EXIT_USAGE
    except Exception:
        print(f"[rank {launch.rank}] evaluation failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        if launch.world_size > 1:
            sys.stdout.flush()
            os._exit(EXIT_FAILED)
        return EXIT_FAILED


def cli() -> None:
    """Console entry point."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
