"""`python -m ddp_resnet.evaluate --checkpoint CKPT [CKPT ...] [--config X.yaml] [key=value ...]`: evaluate any
checkpoint, or an ensemble of several.

    python -m ddp_resnet.evaluate --checkpoint runs/x/checkpoints/best.pt [data.root=DIR] [--tta flip]
        [--batch-size N] [--ema] [--device cpu|cuda|auto] [--json OUT.json]
    torchrun --nproc_per_node 8 -m ddp_resnet.evaluate --checkpoint ...      # the same numbers, sharded
    python -m ddp_resnet.evaluate --checkpoint a.pt b.pt c.pt [--json OUT.json]   # an ensemble

The evaluation is the trainer's own: ``distributed.read_env``/``init``, ``data.build_eval_loader`` (every test
image on exactly one rank, no padding) and ``engine.evaluate`` (sums all-reduced), so top-1 of a checkpoint
equals the ``test_acc`` the trainer logged for that epoch, on any number of processes.

The configuration is the checkpoint's own (``config`` entry), then ``--config`` (a YAML recipe merged on top),
then the ``key=value`` overrides, e.g. ``data.root=`` when the data moved. A plain weights file (a
``python -m ddp_resnet.export`` output) has no config: give ``--config`` or ``model.name=`` / ``data.*``.
``--batch-size`` sets the global evaluation batch (``data.eval_batch_size``).

Rank 0 prints top-1 / top-5 / loss and the per-class accuracy, and writes them with the confusion matrix to
``--json``. Exit codes: 0 done; 2 unusable checkpoint or configuration (one line on stderr); 1 a failure.

Several checkpoints are evaluated as an ensemble (``engine.evaluate_ensemble``: softmax probabilities averaged,
in one pass over the data, with the same sharding and all-reduced sums): each member's top-1 / top-5 / loss is
printed beside the ensemble's (its full results), and ``--json`` holds the ensemble's results with a ``members``
list. Each member is built from its own checkpoint's config (with ``--config`` and the overrides); the data and
evaluation settings are the first checkpoint's, and every member must have been trained on the same dataset.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ddp_resnet import build, distributed
from ddp_resnet import checkpoint as ckpt
from ddp_resnet import config as config_mod
from ddp_resnet import data as data_mod
from ddp_resnet.config import ConfigError
from ddp_resnet.engine import evaluate, evaluate_ensemble
from ddp_resnet.exitcodes import OK as EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ddp_resnet.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, nargs="+",
                        help="a training checkpoint (best.pt, last.pt, epoch_N.pt) or an exported weights file; "
                             "several: evaluate their ensemble (averaged softmax probabilities)")
    parser.add_argument("--config", help="YAML recipe merged over the checkpoint's config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=/data/cifar")
    parser.add_argument("--tta", choices=("none", "flip"), default="none",
                        help="test-time augmentation: flip averages the probabilities of the image and its mirror")
    parser.add_argument("--batch-size", type=int, default=None, help="global evaluation batch size")
    parser.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    parser.add_argument("--device", choices=config_mod.choices("train.device"), default=None,
                        help="default: the checkpoint's train.device")
    parser.add_argument("--json", dest="json_out", help="write the results (with the confusion matrix) here")
    return parser


def resolve_config(saved: ckpt.Saved, config_path: str | None, overrides: list[str], batch_size: int | None,
                   device: str | None) -> config_mod.Config:
    """The checkpoint's config, then the YAML recipe, then the overrides (``config.resolve``); evaluation needs
    neither the fine-tuning source nor the resume settings of the training run."""
    extra = list(overrides)
    if batch_size is not None:
        if batch_size < 1:
            raise ConfigError(f"--batch-size: must be > 0, got {batch_size}")
        extra.append(f"data.eval_batch_size={batch_size}")
    if device is not None:
        extra.append(f"train.device={device}")
    return config_mod.resolve(config_path, extra, base=saved.config_for_use())


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


@dataclass
class Member:
    """One checkpoint to evaluate: its file, the opened checkpoint, resolved config and the weights to load."""

    path: str
    saved: ckpt.Saved
    cfg: config_mod.Config
    state: dict


def load_member(path: str, args: argparse.Namespace) -> Member:
    """Read a checkpoint, resolve its config, pick its weights (``--ema``: the averaged ones)."""
    saved = ckpt.open_checkpoint(path)
    cfg = resolve_config(saved, args.config, args.overrides, args.batch_size, args.device)
    return Member(str(path), saved, cfg, saved.weights(ema=args.ema))


def _networks(members: list[Member], info, device) -> list:
    """Each member's network on the device, in eval mode (a checkpoint that does not fit fails here)."""
    return [build.network_from_weights(m.cfg, info, m.state, m.path, device) for m in members]


def check_members(members: list[Member]) -> None:
    """An ensemble's members must come from one dataset (the first checkpoint's data settings are used)."""
    first = members[0]
    for m in members[1:]:
        if m.cfg.data.dataset != first.cfg.data.dataset:
            raise ConfigError(f"checkpoint {m.path} was trained on {m.cfg.data.dataset}, {first.path} on "
                              f"{first.cfg.data.dataset}: an ensemble needs one dataset")


def run(args: argparse.Namespace, launch: distributed.LaunchInfo) -> int:
    """Load, validate, initialise, evaluate; rank 0 prints and writes."""
    members = [load_member(path, args) for path in args.checkpoint]
    check_members(members)
    cfg = members[0].cfg
    config_mod.validate_world(cfg, launch.world_size)
    data_mod.check(cfg.data)
    device = distributed.resolve_device(cfg.train.device, launch.local_rank)
    info = models = None
    if cfg.data.dataset != "imagefolder":  # a checkpoint that does not fit fails on every rank before the group
        info = data_mod.describe(cfg.data)
        models = _networks(members, info, device)
    env = distributed.init(cfg.train.device, cfg.dist.backend, cfg.dist.timeout_s, launch)
    try:
        if info is None:  # an ImageFolder tree is walked by one rank
            info = data_mod.describe(cfg.data, share=lambda fn: distributed.share_from_rank0(fn, env))
            models = _networks(members, info, env.device)
        loader = data_mod.build_eval_loader(cfg.data, info, env.rank, env.world_size, env.device,
                                            channels_last=cfg.train.channels_last,
                                            local_world_size=env.local_world_size)
        tta = args.tta == "flip"
        if len(members) == 1:
            result = evaluate(models[0], loader, info.num_classes, env.device, cfg.train.amp, tta_flip=tta)
            if env.is_main:
                report(args, members[0].saved, cfg, info, env, result)
        else:
            results, result = evaluate_ensemble(models, loader, info.num_classes, env.device, cfg.train.amp, tta)
            if env.is_main:
                report_ensemble(args, members, results, info, env, result)
        distributed.barrier(env)
    finally:
        if env.distributed:
            distributed.cleanup()
    return EXIT_OK


def _context(args: argparse.Namespace, cfg: config_mod.Config, env) -> str:
    return (f"on {cfg.data.dataset} test split | world {env.world_size} ({env.launcher}, {env.device})"
            f"{' | tta flip' if args.tta == 'flip' else ''}")


def _summary(result: dict) -> dict:
    return {k: result[k] for k in ("top1", "top5", "loss", "count")}


def _write_json(path: str, out: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1))


def report(args: argparse.Namespace, saved: ckpt.Saved, cfg: config_mod.Config, info, env, result: dict) -> None:
    """Print the results and write them to ``--json``."""
    path = args.checkpoint[0]
    header = f"{path}: {cfg.model.name} ({saved.where()}{', EMA' if args.ema else ''}) {_context(args, cfg, env)}"
    print(format_results(result, info.class_names, header), flush=True)
    if args.json_out:
        _write_json(args.json_out, {
            "checkpoint": str(path), "model": cfg.model.name, "dataset": cfg.data.dataset,
            "epoch": saved.epoch, "step": saved.step, "ema": args.ema, "tta": args.tta,
            "world_size": env.world_size, **_summary(result), "class_names": list(info.class_names),
            "per_class_acc": result["per_class_acc"], "confusion": result["confusion"]})


def report_ensemble(args: argparse.Namespace, members: list[Member], results: list[dict], info, env,
                    result: dict) -> None:
    """Print each member's accuracy beside the ensemble's results; write them to ``--json``."""
    cfg = members[0].cfg
    for i, (m, r) in enumerate(zip(members, results), 1):
        print(f"member {i}: {m.path}: {m.cfg.model.name} ({m.saved.where()}{', EMA' if args.ema else ''})  "
              f"top-1 {r['top1']:.4f}%  top-5 {r['top5']:.4f}%  loss {r['loss']:.6f}", flush=True)
    header = f"ensemble of {len(members)} (averaged softmax probabilities) {_context(args, cfg, env)}"
    print(format_results(result, info.class_names, header), flush=True)
    if args.json_out:
        _write_json(args.json_out, {
            "checkpoint": [m.path for m in members], "ensemble": True, "dataset": cfg.data.dataset,
            "ema": args.ema, "tta": args.tta, "world_size": env.world_size, **_summary(result),
            "members": [{"checkpoint": m.path, "model": m.cfg.model.name, "epoch": m.saved.epoch,
                         "step": m.saved.step, **_summary(r)} for m, r in zip(members, results)],
            "class_names": list(info.class_names), "per_class_acc": result["per_class_acc"],
            "confusion": result["confusion"]})


def main(argv: list[str] | None = None) -> int:
    """Parse and evaluate; returns the process exit code."""
    args = build_parser().parse_args(argv)
    launch = distributed.read_env()
    return distributed.guarded(lambda: run(args, launch), launch.rank, "evaluation",
                               (ConfigError, ckpt.CheckpointError))


def cli() -> None:
    """Console entry point."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
