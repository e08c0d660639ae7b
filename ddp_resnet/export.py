"""`python -m ddp_resnet.export CKPT OUT.pt|OUT.onnx|OUT.pt2 [--ema]`: a training checkpoint for use elsewhere.

    python -m ddp_resnet.export runs/x/checkpoints/best.pt model.pt            # plain weights (state_dict)
    python -m ddp_resnet.export runs/x/checkpoints/best.pt model.onnx [--with-preprocessing] [--opset N]
    python -m ddp_resnet.export runs/x/checkpoints/best.pt model.pt2 [--with-preprocessing]   # torch.export

``OUT.pt`` (any name but ``.onnx`` / ``.pt2``) is a bare state_dict (no optimizer, no wrapper prefixes) that loads
with strict=True into ``ddp_resnet.models.build_model(name)`` and, for ImageNet-stem ResNets, into torchvision's
model of that name.

``OUT.onnx`` and ``OUT.pt2`` hold the network (``deploy.py``): input ``images`` ``[batch, 3, S, S]`` at the
evaluation crop side, dynamic batch; normalized float32 RGB, or with ``--with-preprocessing`` uint8 RGB (the
normalization is in the graph). Each file is loaded back right after writing (onnxruntime; ``torch.export.load``)
and its logits compared with the PyTorch model's on a batch: the maximum difference is printed, and beyond
``--atol + --rtol x max |logit|`` the file is removed and the command fails. ``.onnx`` needs the ``[export]``
extra. Exit codes: 0 written and checked; 2 an unusable checkpoint, bad arguments or a missing extra (one line on
stderr); 1 the export failed or its check did not hold (one line; nothing left behind).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ddp_resnet import checkpoint as ckpt
from ddp_resnet import deploy, exitcodes
from ddp_resnet.config import ConfigError

PROGRAM_SUFFIXES = (".onnx", ".pt2")


def export(checkpoint_path: str, out_path: str, use_ema: bool = False) -> tuple[dict, dict]:
    """Write the checkpoint's model (or EMA) weights to out_path; returns (state_dict, the checkpoint's config)."""
    saved = ckpt.Saved(checkpoint_path, ckpt.load(checkpoint_path, "cpu"))
    state = {k: v.detach().clone().contiguous() for k, v in saved.weights(ema=use_ema).items()}
    ckpt.save(state, out_path)
    return state, saved.config or {}


class _UsageError(ValueError):
    """A bad command line, in one line (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise _UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = _Parser(prog="python -m ddp_resnet.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out", help="OUT.pt: plain weights; OUT.onnx: ONNX; OUT.pt2: a torch.export program")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead")
    parser.add_argument("--with-preprocessing", action="store_true",
                        help=".onnx/.pt2: take uint8 RGB images; the /255 and mean/std are in the graph")
    parser.add_argument("--opset", type=int, default=None, help=".onnx: the ONNX opset (default: torch's choice)")
    parser.add_argument("--config", help=".onnx/.pt2: YAML recipe merged over the checkpoint's config (plain "
                                         "weights files need one)")
    parser.add_argument("--atol", type=float, default=deploy.ATOL, help="check: absolute tolerance on the logits")
    parser.add_argument("--rtol", type=float, default=deploy.RTOL,
                        help="check: tolerance relative to the largest |logit|")
    return parser


def export_program(args: argparse.Namespace) -> int:
    """Write, check and describe an ``.onnx`` or ``.pt2`` file; returns the exit code."""
    from ddp_resnet import inference  # the network and its config: needed only here

    try:
        if Path(args.out).suffix.lower() == ".onnx":
            deploy.require_onnx()
        trained = inference.load(args.checkpoint, "cpu", args.ema, args.config, "cpu")
        written = deploy.write(trained, args.out, args.with_preprocessing, args.opset, args.atol, args.rtol)
    except (ckpt.CheckpointError, ConfigError, deploy.MissingExporter) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    except deploy.ExportCheckError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exitcodes.FAILED
    except Exception as exc:  # noqa: BLE001 - an exporter failure: one line, nothing left behind
        text = str(exc).strip().splitlines()
        print(f"error: exporting {args.out} failed ({type(exc).__name__}: {text[0][:200] if text else ''})",
              file=sys.stderr)
        return exitcodes.FAILED
    print(f"wrote {args.out}: {trained.cfg.model.name} ({trained.info.num_classes} classes), {written.details}")
    print(f"feed: {deploy.feeding(trained, args.with_preprocessing)}")
    runtime = "onnxruntime" if written.kind == "onnx" else "torch.export.load"
    print(f"check: {runtime} vs PyTorch on a batch of {deploy.CHECK_BATCH}: max |diff| {written.max_diff:.3g} "
          f"<= tolerance {written.tolerance:.3g} (max |logit| {written.ref_max:.3g}): ok")
    return exitcodes.OK


def cli(argv: list[str] | None = None) -> int:
    """Console entry point."""
    try:
        args = build_parser().parse_args(argv)
        program = Path(args.out).suffix.lower() in PROGRAM_SUFFIXES
        if not program and (args.with_preprocessing or args.opset is not None or args.config):
            raise _UsageError(f"--with-preprocessing, --opset and --config apply to {' and '.join(PROGRAM_SUFFIXES)} "
                              f"outputs, not {args.out}")
    except _UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    if program:
        return export_program(args)
    try:
        state, config = export(args.checkpoint, args.out, args.ema)
    except ckpt.CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    model_cfg = config.get("model", {})
    print(f"wrote {args.out}: {len(state)} tensors, {sum(v.numel() for v in state.values()):,} values "
          f"(model {model_cfg.get('name', '?')})")
    return exitcodes.OK


if __name__ == "__main__":
    sys.exit(cli())
