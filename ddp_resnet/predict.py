"""`python -m ddp_resnet.predict --checkpoint CKPT PATH...`: a trained network's top-k classes for image files.

    python -m ddp_resnet.predict --checkpoint runs/x/checkpoints/best.pt photos/ cat.jpg [--topk 5] [--ema]
        [--tta flip] [--batch N] [--workers N] [--device auto|cpu|cuda] [--out preds.csv|preds.jsonl]
        [--grid grid.png] [--config X.yaml]
    torchrun --nproc_per_node 8 -m ddp_resnet.predict --checkpoint ... DIR --out preds.csv   # sharded over ranks

PATHs are image files or folders; folders are walked recursively (files with an image extension, hidden files and
folders and macOS ``._*`` files skipped), and every file is predicted once, even when symbolic links (or a loop of
them) reach it twice. Each image gets the evaluation transform the checkpoint's config trained with
(``data.eval_transform``: ImageFolder's resize and center crop, CIFAR's whole image at its side) and its
normalization; class names come from the checkpoint (else indices, with a one-line note).

Decoding runs in DataLoader workers, inference under ``torch.inference_mode`` (bf16 autocast and channels_last on
CUDA). Under ``torchrun`` each rank predicts a contiguous shard of the files and rank 0 writes all rows, in input
order. A file that cannot be decoded is named in one line with the decoder's reason and skipped.

Output: one row per image (path, the folder's class when the parent folder is named after one, then the top-k
classes and probabilities) to ``--out`` (CSV or JSON lines, by extension), else one line per image on stdout; a
summary line at the end. ``--grid`` draws a sample of the images with their predicted labels (the folder's labels
too, wrong predictions in red; needs the ``[plots]`` extra).

Exit codes: 0 done (some files may have been skipped); 2 bad arguments, an unusable checkpoint or no image files
(one line on stderr); 66 no file could be decoded (nothing written); 1 a failure.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from ddp_resnet import checkpoint as ckpt
from ddp_resnet import data as data_mod
from ddp_resnet import distributed, inference, plots
from ddp_resnet.config import ConfigError
from ddp_resnet.data.imagefolder import IMG_EXTENSIONS, load_rgb
from ddp_resnet.data.loaders import EvalTransform
from ddp_resnet.exitcodes import NO_INPUT as NOTHING_DECODED
from ddp_resnet.exitcodes import OK as EXIT_OK
from ddp_resnet.exitcodes import USAGE as EXIT_USAGE

OUTPUT_SUFFIXES = (".csv", ".jsonl")
PROGRESS_EVERY_S = 10.0  # a progress line at most this often (so a short input prints none)
GRID_IMAGES = 16


# ------------------------------------------------------------------------------------------------ inputs
def _identity(path: str) -> tuple | str:
    """What makes two paths one file: ``(st_dev, st_ino)`` of its target (the absolute path when it has none)."""
    try:
        st = os.stat(path)
    except OSError:
        return os.path.abspath(path)
    return (st.st_dev, st.st_ino)


def _walk(root: str, warn: Callable[[str], None]) -> list[str]:
    """Image files under ``root``, depth first, sorted by name (a folder's files before its sub-folders); hidden
    entries skipped; each folder entered once (by identity), so symbolic-link loops end."""
    found: list[str] = []
    stack, entered = [root], set()
    while stack:
        folder = stack.pop()
        key = _identity(folder)
        if key in entered:
            continue
        entered.add(key)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            warn(f"warning: skipped folder {folder}: {exc.strerror or exc}")
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):  # hidden, and macOS's ._* resource forks
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                subfolders.append(entry.path)
            elif entry.name.lower().endswith(IMG_EXTENSIONS):
                found.append(entry.path)
        stack.extend(reversed(subfolders))
    return found


def collect_images(paths: Sequence[str], warn: Callable[[str], None] = print) -> list[str]:
    """The image files named by ``paths`` (files, and folders walked recursively), each file once, in order.

    Raises ``ConfigError`` for a path that does not exist and when no image file is found.
    """
    files, seen = [], set()
    for arg in paths:
        if not os.path.exists(arg):
            raise ConfigError(f"{arg}: no such file or folder")
        for path in (_walk(arg, warn) if os.path.isdir(arg) else [arg]):
            key = _identity(path)
            if key not in seen:
                seen.add(key)
                files.append(path)
    if not files:
        raise ConfigError(f"no image files ({', '.join(IMG_EXTENSIONS)}) under {', '.join(paths)}")
    return files


def folder_label(path: str, class_names: Sequence[str]) -> str | None:
    """The class a file's layout gives it: its parent folder's name when that is a class name (else None)."""
    parent = Path(path).parent.name
    return parent if parent in class_names else None


# ------------------------------------------------------------------------------------------------ decoding
def decode_error(exc: BaseException) -> str:
    """A decoder's failure in one line."""
    if isinstance(exc, UnidentifiedImageError):
        return "UnidentifiedImageError: cannot identify image file"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


class ImageFiles(Dataset):
    """Files -> ``(uint8 C x S x S or None, index, error)``: the evaluation transform, or why decoding failed."""

    def __init__(self, files: Sequence[str], transform: EvalTransform) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, str]:
        try:
            return self.transform(load_rgb(self.files[index])), index, ""
        except Exception as exc:  # noqa: BLE001 - any file the decoder refuses is skipped, with its reason
            return None, index, decode_error(exc)


def collate(items: list) -> tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]:
    """``(stacked images or None, their indices, [(index, reason)] of the files that failed)``."""
    good = [(image, index) for image, index, _ in items if image is not None]
    failed = [(index, error) for image, index, error in items if image is None]
    images = torch.stack([image for image, _ in good]) if good else None
    return images, [index for _, index in good], failed


# ------------------------------------------------------------------------------------------------ prediction
@dataclass
class Prediction:
    """One file's result: its top-k class indices and probabilities, or the reason it was skipped."""

    path: str
    classes: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class Options:
    """How to run the network: top-k, test-time flip, batch per forward, workers, autocast, memory format."""

    topk: int = 5
    tta_flip: bool = False
    batch: int = 64
    workers: int = 0
    amp: str = "none"
    channels_last: bool = False


def device_options(device: torch.device, channels_last: bool, **kwargs) -> Options:
    """Options for a device: bf16 autocast and channels_last on CUDA; on the CPU float32 and the config's format."""
    cuda = device.type == "cuda"
    return Options(amp="bf16" if cuda else "none", channels_last=cuda or channels_last, **kwargs)


class Progress:
    """A progress line (stderr) at most every ``every_s`` seconds: never for inputs done sooner."""

    def __init__(self, total: int, every_s: float = PROGRESS_EVERY_S, what: str = "images") -> None:
        self.total, self.every_s, self.what = total, every_s, what
        self.start = self.last = time.perf_counter()

    def __call__(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every_s or done >= self.total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / max(rate, 1e-9)
        print(f"predict: {done}/{self.total} {self.what} ({rate:.0f} img/s, ETA {eta:.0f} s)", file=sys.stderr,
              flush=True)


def predict_files(trained: inference.Trained, files: Sequence[str], device: torch.device, opts: Options,
                  warn: Callable[[str], None] = print, progress: Callable[[int], None] | None = None
                  ) -> list[Prediction]:
    """Every file's top-k (or its decoding error, named through ``warn`` as it is met), in input order."""
    workers = min(opts.workers, math.ceil(len(files) / opts.batch))  # no idle workers for a short input
    loader = DataLoader(ImageFiles(files, trained.transform), batch_size=opts.batch, shuffle=False,
                        num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda")
    normalize = trained.normalizer(opts.channels_last)
    model = trained.model.to(memory_format=torch.channels_last) if opts.channels_last else trained.model
    k = min(opts.topk, trained.info.num_classes)
    results: list[Prediction | None] = [None] * len(files)
    done = 0
    with torch.inference_mode():
        for images, indices, failed in loader:
            for index, error in failed:
                warn(f"warning: skipped {files[index]}: {error}")
                results[index] = Prediction(files[index], error=error)
            if images is not None:
                batch = normalize(images.to(device, non_blocking=True))
                scores, probs = inference.scores_and_probs(model, batch, opts.tta_flip, opts.amp)
                top = scores.topk(k, dim=1).indices
                top_probs = probs.gather(1, top)
                for index, classes, p in zip(indices, top.tolist(), top_probs.tolist()):
                    results[index] = Prediction(files[index], classes, p)
            done += len(indices) + len(failed)
            if progress is not None:
                progress(done)
    return results


# ------------------------------------------------------------------------------------------------ outputs
def _row(pred: Prediction, names: Sequence[str]) -> dict:
    return {"path": pred.path, "label": folder_label(pred.path, names),
            "topk": [{"class": names[c], "index": c, "prob": p} for c, p in zip(pred.classes, pred.probs)]}


def write_csv(path: str, preds: Sequence[Prediction], names: Sequence[str], k: int) -> None:
    """Columns path, label (the folder's class, or empty), then class_i, prob_i for i = 1..k."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"] + [f"{c}_{i}" for i in range(1, k + 1) for c in ("class", "prob")])
        for pred in preds:
            cells = [pred.path, folder_label(pred.path, names) or ""]
            for c, p in zip(pred.classes, pred.probs):
                cells += [names[c], f"{p:.6f}"]
            writer.writerow(cells)


def write_jsonl(path: str, preds: Sequence[Prediction], names: Sequence[str]) -> None:
    """One JSON object per image: path, label (or null), topk [{class, index, prob}, ...]."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for pred in preds:
            fh.write(json.dumps(_row(pred, names)) + "\n")


def format_line(pred: Prediction, names: Sequence[str]) -> str:
    """One image on stdout: ``path: class (p%), class (p%), ...``."""
    return f"{pred.path}: " + ", ".join(f"{names[c]} ({100 * p:.2f}%)" for c, p in zip(pred.classes, pred.probs))


def agreement(preds: Sequence[Prediction], names: Sequence[str]) -> tuple[int, int]:
    """``(top-1 equal to the folder's class, images whose folder names a class)``."""
    labelled = [(p, folder_label(p.path, names)) for p in preds]
    labelled = [(p, label) for p, label in labelled if label is not None]
    return sum(names[p.classes[0]] == label for p, label in labelled), len(labelled)


def write_grid(path: str, preds: Sequence[Prediction], trained: inference.Trained, n: int = GRID_IMAGES) -> int:
    """A PNG of up to ``n`` images spread over the input (what the network saw), titled with the predicted class
    and, when the folder gives one, the true class (wrong predictions in red). Returns the number drawn."""
    names = trained.class_names
    m = min(n, len(preds))
    sample = [preds[round(i * (len(preds) - 1) / max(m - 1, 1))] for i in range(m)]  # distinct: steps >= 1
    cols = math.ceil(math.sqrt(len(sample)))
    rows = math.ceil(len(sample) / cols)
    fig = plots.new_figure(2.2 * cols, 2.7 * rows)
    for i, pred in enumerate(sample):
        ax = fig.add_subplot(rows, cols, i + 1)
        try:
            ax.imshow(trained.transform(load_rgb(pred.path)).permute(1, 2, 0).numpy())
        except Exception:  # noqa: BLE001 - the file changed since: leave its cell blank
            pass
        label, guess = folder_label(pred.path, names), names[pred.classes[0]]
        title, color = f"{guess} ({100 * pred.probs[0]:.0f}%)", "black"
        if label is not None:
            wrong = label != guess
            title, color = f"{title}\ntrue: {label}{'  WRONG' if wrong else ''}", "red" if wrong else "green"
        ax.set_title(title, fontsize=8, color=color)
        ax.set_xlabel(Path(pred.path).name[-28:], fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(3 if color == "red" else 1)
    fig.tight_layout()
    plots.save(fig, path)
    return len(sample)


# ------------------------------------------------------------------------------------------------ CLI
class UsageError(ConfigError):
    """A bad command line, in one line (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = _Parser(prog="python -m ddp_resnet.predict", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a training checkpoint (best.pt, last.pt, epoch_N.pt) or, "
                                                       "with --config, an exported weights file")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (walked recursively)")
    p.add_argument("--topk", type=int, default=5, help="classes per image (at most the number of classes)")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    p.add_argument("--tta", choices=("none", "flip"), default="none",
                   help="flip: average the probabilities of each image and its mirror")
    p.add_argument("--batch", type=int, default=64, help="images per forward pass (per rank)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader decoding workers per rank (default: 4, at most the CPU count); 0: in-process")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", help="write the rows here: .csv or .jsonl (default: one line per image on stdout)")
    p.add_argument("--grid", help="write a PNG of a sample of the images with their predicted labels")
    p.add_argument("--config", help="YAML recipe merged over the checkpoint's config (needed for plain weights)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Refuse impossible values before anything is loaded (``UsageError``, one line)."""
    for name, low in (("topk", 1), ("batch", 1), ("workers", 0)):
        if getattr(args, name) < low:
            raise UsageError(f"--{name}: must be >= {low}, got {getattr(args, name)}")
    if args.out and Path(args.out).suffix.lower() not in OUTPUT_SUFFIXES:
        raise UsageError(f"--out: {args.out} must end in {' or '.join(OUTPUT_SUFFIXES)}")
    if args.grid:
        if Path(args.grid).suffix.lower() != ".png":
            raise UsageError(f"--grid: {args.grid} must end in .png")
        try:
            plots.require_matplotlib()
        except plots.MissingMatplotlib as exc:
            raise UsageError(f"--grid: {exc}") from None


def _err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def report(args: argparse.Namespace, trained: inference.Trained, results: list[Prediction], seconds: float,
           env: distributed.DistEnv) -> int:
    """Rank 0: write the rows (``--out``, else stdout), the grid, and the summary; returns the exit code."""
    names = trained.class_names
    preds = [r for r in results if not r.error]
    skipped = len(results) - len(preds)
    if not preds:
        _err(f"error: none of the {len(results)} files could be decoded; nothing written")
        return NOTHING_DECODED
    k = min(args.topk, trained.info.num_classes)
    if args.out and Path(args.out).suffix.lower() == ".csv":
        write_csv(args.out, preds, names, k)
    elif args.out:
        write_jsonl(args.out, preds, names)
    else:
        for pred in preds:
            print(format_line(pred, names))
    summary = (f"predicted {len(preds)} images in {seconds:.1f} s ({len(preds) / max(seconds, 1e-9):.0f} img/s, "
               f"{env.world_size} process{'es' if env.world_size > 1 else ''} on {env.device})")
    if skipped:
        summary += f"; skipped {skipped} of {len(results)} files that could not be decoded"
    hits, labelled = agreement(preds, names)
    if labelled:
        summary += f"; top-1 is the folder's class for {hits}/{labelled} ({100 * hits / labelled:.2f}%)"
    print(summary + (f"; wrote {args.out}" if args.out else ""), flush=True)
    if args.grid:
        print(f"wrote {args.grid} ({write_grid(args.grid, preds, trained)} images)", flush=True)
    return EXIT_OK


def run(args: argparse.Namespace, launch: distributed.LaunchInfo) -> int:
    """Load (every rank, before the process group), shard, predict, gather; rank 0 writes."""
    device = distributed.resolve_device(args.device, launch.local_rank)
    trained = inference.load(args.checkpoint, device, args.ema, args.config, args.device)
    env = distributed.init(args.device, "auto", trained.cfg.dist.timeout_s, launch)
    try:
        if env.is_main and trained.names_note():
            _err(trained.names_note())
        files = distributed.share_from_rank0(lambda: collect_images(args.paths, warn=_err), env)
        start, end = data_mod.shard_range(len(files), env.rank, env.world_size)
        opts = device_options(env.device, trained.cfg.train.channels_last, topk=args.topk,
                              tta_flip=args.tta == "flip", batch=args.batch, workers=args.workers)
        what = "images" if env.world_size == 1 else f"images (rank 0's shard of {len(files)})"
        progress = Progress(end - start, what=what) if env.is_main else None
        began = time.perf_counter()
        mine = predict_files(trained, files[start:end], env.device, opts, warn=_err, progress=progress)
        shards = distributed.gather_to_rank0(mine, env)
        code = None
        if env.is_main:
            code = report(args, trained, [r for shard in shards for r in shard], time.perf_counter() - began, env)
        code = distributed.broadcast_object(code, env)
        distributed.barrier(env)
    finally:
        if env.distributed:
            distributed.cleanup()
    return code


def main(argv: list[str] | None = None) -> int:
    """Parse and predict; returns the process exit code."""
    launch = distributed.read_env()
    try:
        args = build_parser().parse_args(argv)
        check_args(args)
    except UsageError as exc:
        if launch.rank == 0:
            _err(f"error: {exc}")
        return EXIT_USAGE
    return distributed.guarded(lambda: run(args, launch), launch.rank, "prediction",
                               (ConfigError, ckpt.CheckpointError))


def cli() -> None:
    """Console entry point."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
