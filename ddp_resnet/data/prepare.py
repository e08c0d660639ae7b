"""`python -m ddp_resnet.data.prepare SRC DST --max-side 512`: a pre-resized JPEG copy of an ImageFolder tree.

    python -m ddp_resnet.data.prepare SRC DST --max-side 512 [--quality 90] [--workers N] [--strict]
    python -m ddp_resnet.data.prepare --check SRC [--workers N]

SRC holds ``train/<class>/...`` and ``val/`` and/or ``test/``; DST gets the same tree with every image at most
``--max-side`` pixels on its longer side (FFCV trains its fast ResNet-50 from images stored at most 500 px on a
side): larger images are resized (Lanczos) and written as JPEG of ``--quality``; a JPEG already small enough is
copied byte for byte. Other formats become ``NAME.EXT.jpg``; two sources that would still share a target (``x.png``
and a JPEG named ``x.png.jpg``) are refused, naming both, before anything is written. The tree is walked as the
trainer walks it (``imagefolder.walk_images``: hidden and ``._*`` files skipped, each file once however many links
lead to it); 16-bit images are scaled to 8 bits (``imagefolder.to_rgb``), not clipped.

* Parallel over ``--workers`` processes (default: every core), with a progress line on stderr.
* Resumable: a target that exists and decodes (within the size limit) is skipped. Every write goes to a hidden
  temporary name in the target's folder and is renamed into place only after the written file was re-opened and
  fully decoded, so an interrupted run leaves no partial image under a real name (stale temporaries are removed).
* A source that cannot be decoded is reported (one line each, stderr) and skipped; the summary counts them. The
  exit code is 0 unless ``--strict`` is given, then 1 when any source failed.
* Bad arguments (missing SRC, no train/ and val/ or test/ split, DST inside SRC or SRC inside DST, a side or
  quality out of range, two sources for one target) are one line on stderr and exit code 2, before anything is
  written.

``--check SRC`` writes nothing: it decodes every image file under SRC (any tree; in parallel over ``--workers``
processes) with the decoder the training workers use, prints ``PATH: reason`` for each file that does not decode
(stdout, in path order) and a summary line, and exits 0 when all decode, 1 otherwise.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ddp_resnet.config import ConfigError
from ddp_resnet.data.imagefolder import IMG_EXTENSIONS, error_text, load_rgb, split_dirs, to_rgb, walk_images
from ddp_resnet.exitcodes import FAILED as EXIT_FAILED
from ddp_resnet.exitcodes import OK as EXIT_OK
from ddp_resnet.exitcodes import USAGE as EXIT_USAGE

SPLITS = ("train", "val", "test")
JPEG_SUFFIXES = (".jpg", ".jpeg")
TMP_SUFFIX = ".prepare-tmp"


class UsageError(ValueError):
    """A bad command line, in one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """SRC, DST and the options."""
    parser = _Parser(prog="python -m ddp_resnet.data.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("src", help="ImageFolder root: train/ and val/ or test/ (with --check: any folder)")
    parser.add_argument("dst", nargs="?", help="where the resized copy goes (created; resumed when it exists)")
    parser.add_argument("--max-side", type=int, help="longest side in pixels, e.g. 512 (required without --check)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of resized images (1-100)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: every core)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any source image cannot be decoded")
    parser.add_argument("--check", action="store_true",
                        help="only list the files under SRC that do not decode (exit 1 if any); writes nothing")
    return parser


@dataclass(frozen=True)
class Job:
    """One image to bring into the copy."""

    src: str
    dst: str
    max_side: int
    quality: int


def check_args(args: argparse.Namespace) -> tuple[Path, Path]:
    """Resolved ``(src, dst)``; raises UsageError for anything wrong."""
    if args.dst is None:
        raise UsageError("DST: missing (where the copy goes; or --check SRC to only check the files)")
    if args.max_side is None:
        raise UsageError("--max-side: required (e.g. --max-side 512) unless --check")
    src, dst = Path(args.src).resolve(), Path(args.dst).resolve()
    if not src.is_dir():
        raise UsageError(f"SRC {args.src}: no such directory")
    try:
        split_dirs(src)
    except ConfigError as exc:
        raise UsageError(str(exc).replace("data.root: ", "SRC: ")) from None
    if dst == src or src in dst.parents or dst in src.parents:
        raise UsageError(f"DST {args.dst} and SRC {args.src} overlap; write the copy outside the source tree")
    if args.max_side < 1:
        raise UsageError(f"--max-side: must be > 0, got {args.max_side}")
    if not 1 <= args.quality <= 100:
        raise UsageError(f"--quality: must be in 1..100, got {args.quality}")
    if args.workers < 1:
        raise UsageError(f"--workers: must be > 0, got {args.workers}")
    return src, dst


def target_name(name: str) -> str:
    """The copy's file name: JPEGs keep theirs, anything else gets ``.jpg`` appended."""
    return name if name.lower().endswith(JPEG_SUFFIXES) else name + ".jpg"


def _walk(folder: Path) -> list[str]:
    """The image files under ``folder`` as the trainer's scan finds them; an unlistable folder is a UsageError."""
    try:
        return list(walk_images(str(folder), set()))
    except OSError as exc:
        raise UsageError(f"SRC: cannot list {exc.filename or folder}: {exc.strerror or exc}") from None


def list_jobs(src: Path, dst: Path, max_side: int, quality: int) -> list[Job]:
    """Every image of every split under SRC with its target under DST (sorted, for a stable order); raises
    UsageError, naming both, when two sources would be written to one target."""
    jobs, sources = [], {}
    for split in SPLITS:
        if not (src / split).is_dir():
            continue
        for path in _walk(src / split):
            folder, name = os.path.split(path)
            target = str(dst / Path(folder).relative_to(src) / target_name(name))
            if target in sources:
                raise UsageError(f"{sources[target]} and {path} would both be written to {target}; rename one")
            sources[target] = path
            jobs.append(Job(path, target, max_side, quality))
    return jobs


def remove_stale(dst: Path) -> int:
    """Delete temporaries an interrupted run left under DST; returns how many."""
    count = 0
    for dirpath, _, filenames in os.walk(dst):
        for name in filenames:
            if name.startswith(".") and name.endswith(TMP_SUFFIX):
                os.remove(os.path.join(dirpath, name))
                count += 1
    return count


def decodes(path: str, max_side: int) -> bool:
    """Whether the file decodes completely and its longer side is within ``max_side``."""
    try:
        with Image.open(path) as img:
            img.load()
            return max(img.size) <= max_side
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def _write(job: Job, tmp: str) -> None:
    """The copy of ``job.src`` at ``tmp``: its bytes when it is a small enough JPEG, else a resized JPEG."""
    with Image.open(job.src) as img:
        img.load()
        width, height = img.size
        if img.format == "JPEG" and max(width, height) <= job.max_side:
            shutil.copyfile(job.src, tmp)
            return
        scale = min(1.0, job.max_side / max(width, height))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        rgb = to_rgb(img)
        if size != rgb.size:
            rgb = rgb.resize(size, Image.Resampling.LANCZOS)
        rgb.save(tmp, "JPEG", quality=job.quality)


def convert(job: Job) -> tuple[str, str]:
    """Bring one image into the copy: ``(status, message)``, status skipped | written | failed."""
    if os.path.exists(job.dst) and decodes(job.dst, job.max_side):
        return "skipped", ""
    folder, name = os.path.split(job.dst)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        _write(job, tmp)
        if not decodes(tmp, job.max_side):
            raise OSError("the written copy does not decode")
        os.replace(tmp, job.dst)
        return "written", ""
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        return "failed", f"{job.src}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"


PREPARE_COUNTS = {"written": "written", "skipped": "already done", "failed": "failed"}
CHECK_COUNTS = {"ok": "decode", "failed": "do not decode"}


class Progress:
    """The progress line on stderr: rewritten in place on a terminal, else a line every ``every_s`` seconds.
    ``counts`` names the statuses counted, as the line words them; ``failures`` prints each failure's message
    (to stderr with a ``failed:`` prefix, or, given a stream, to it as it is)."""

    def __init__(self, total: int, every_s: float = 10.0, what: str = "prepare",
                 counts: dict[str, str] = PREPARE_COUNTS, failures=None) -> None:
        self.total, self.what, self.words = total, what, counts
        self.counts = {status: 0 for status in counts}
        self.failures = failures
        self.start = self.last = time.time()
        self.tty = sys.stderr.isatty()
        self.every_s = 0.5 if self.tty else every_s

    def line(self) -> str:
        """The current progress line."""
        done = sum(self.counts.values())
        rate = done / max(time.time() - self.start, 1e-9)
        tally = ", ".join(f"{word} {self.counts[status]}" for status, word in self.words.items())
        return (f"{self.what}: {done}/{self.total} images ({100 * done / max(self.total, 1):.1f}%), {rate:.0f}/s | "
                f"{tally}")

    def add(self, status: str, message: str) -> None:
        """Count one result (a failure is printed on its own line)."""
        self.counts[status] += 1
        if message and self.failures is not None:
            print(f"{chr(13) if self.tty and self.failures is sys.stderr else ''}{message}", file=self.failures,
                  flush=True)
        elif message:
            print(f"{chr(13) if self.tty else ''}failed: {message}", file=sys.stderr, flush=True)
        if time.time() - self.last >= self.every_s:
            self.last = time.time()
            print(f"\r{self.line()}" if self.tty else self.line(), end="" if self.tty else "\n", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        """The final line."""
        print(f"\r{self.line()}" if self.tty else self.line(), file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Check, list, convert in parallel, summarize; returns the exit code."""
    src, dst = check_args(args)
    jobs = list_jobs(src, dst, args.max_side, args.quality)
    dst.mkdir(parents=True, exist_ok=True)
    stale = remove_stale(dst)
    print(f"prepare: {len(jobs)} images from {src} -> {dst} (max side {args.max_side}, quality {args.quality}, "
          f"{args.workers} workers{f', {stale} stale temporaries removed' if stale else ''})", file=sys.stderr)
    progress = Progress(len(jobs))
    if args.workers == 1:
        for job in jobs:
            progress.add(*convert(job))
    else:
        with multiprocessing.Pool(args.workers) as pool:
            for result in pool.imap_unordered(convert, jobs, chunksize=16):
                progress.add(*result)
    progress.close()
    failed = progress.counts["failed"]
    if failed:
        print(f"prepare: {failed} source image(s) could not be decoded and were skipped", file=sys.stderr)
    return EXIT_FAILED if failed and args.strict else EXIT_OK


def check_file(path: str) -> tuple[str, str]:
    """``(status, message)`` of one file under ``--check``: ok, or failed with ``PATH: reason``."""
    try:
        load_rgb(path)
        return "ok", ""
    except Exception as exc:  # noqa: BLE001 - whatever the decoder raises, the trainer could not use the file
        return "failed", f"{path}: {error_text(exc)}"


def run_check(args: argparse.Namespace) -> int:
    """``--check SRC``: decode every image under SRC in parallel, list those that fail; returns the exit code."""
    src = Path(args.src).resolve()
    if args.dst is not None:
        raise UsageError(f"--check takes only SRC, not also {args.dst}")
    if not src.is_dir():
        raise UsageError(f"SRC {args.src}: no such directory")
    if args.workers < 1:
        raise UsageError(f"--workers: must be > 0, got {args.workers}")
    files = _walk(src)
    if not files:
        raise UsageError(f"SRC: no image files ({', '.join(IMG_EXTENSIONS)}) under {src}")
    print(f"check: {len(files)} images under {src} ({args.workers} workers)", file=sys.stderr)
    progress = Progress(len(files), what="check", counts=CHECK_COUNTS, failures=sys.stdout)
    if args.workers == 1:
        for path in files:
            progress.add(*check_file(path))
    else:
        with multiprocessing.Pool(args.workers) as pool:
            for result in pool.imap(check_file, files, chunksize=16):  # in path order
                progress.add(*result)
    progress.close()
    failed = progress.counts["failed"]
    print(f"check: {len(files)} images under {src}: {len(files) - failed} decode, {failed} do not", flush=True)
    return EXIT_FAILED if failed else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Parse and run; returns the exit code (2: bad arguments, one line)."""
    try:
        args = build_parser().parse_args(argv)
        return run_check(args) if args.check else run(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def cli() -> None:
    """Console entry point."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
