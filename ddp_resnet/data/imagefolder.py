"""ImageFolder layout: ``root/train/<class>/<image>`` and ``root/val/<class>/...`` (or ``root/test``).

Class names are the sorted sub-folder names of ``train/``; the evaluation split is labelled with the train
split's class indices (a class missing from it is simply absent). A scan gives a ``FolderIndex``; in a
distributed run one rank builds it and sends it to the others (``pack`` / ``unpack``: paths relative to the root),
so N ranks do not walk a million files on shared storage N times. Scans are cached per folder.

What a scan trusts (``walk_images``): hidden files and folders (``.x``, macOS ``._x`` resource forks) and
``__MACOSX`` folders are skipped; links are followed, but a folder or file reached a second time (a symlink loop,
a link to a folder already walked, a hard link) counts once: each split remembers the ``(st_dev, st_ino)`` of the
folders it entered and of the files it took. A training class folder without images is refused in one line (the
network would have a class it can never learn), as is an evaluation class folder that training lacks (it used to
be dropped silently) and two class names for one folder. A broken link is kept: it is reported when read.

Reading (``load_rgb``, ``to_rgb``): 16-bit greyscale images (PIL modes ``I;16*`` and ``I``) are scaled to 8 bits
(``v >> 8``, as PIL itself reduces 48-bit RGB) instead of being clipped to white. ``read_first`` reads a sample
or, when its file cannot be read or decoded, the next index that can (``i+1, i+2, ...`` modulo N), and says why
the original failed: the loaders' substitution of bad images, the same on every rank, worker count and resume.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np
from PIL import Image

from ddp_resnet.config import ConfigError
from ddp_resnet.exitcodes import BAD_DATA

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SKIPPED_FOLDERS = ("__MACOSX",)  # macOS archive metadata, never a class
MAX_SEARCH = 1000  # consecutive unreadable samples after which a substitution gives up (a dead folder or mount)
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")

T = TypeVar("T")


class UnreadableImages(RuntimeError):
    """Not one of many consecutive samples could be read: a substitute for a bad image cannot be found (the
    process exits ``exit_code``, as past ``data.max_bad_images``: ``distributed.guarded``)."""

    exit_code = BAD_DATA


def split_dirs(root: str | os.PathLike) -> tuple[Path, Path]:
    """``(train_dir, eval_dir)``; raises ``ConfigError`` when the layout is missing."""
    root = Path(root)
    train = root / "train"
    evals = [root / name for name in ("val", "test") if (root / name).is_dir()]
    if not train.is_dir() or not evals:
        raise ConfigError(f"data.root: no ImageFolder data at {root} (need {root}/train and {root}/val or {root}/test)")
    return train, evals[0]


def visible(name: str) -> bool:
    """Whether a scan reads a file or folder of this name: not hidden (``.x``, ``._x``), not ``__MACOSX``."""
    return not name.startswith(".") and name not in SKIPPED_FOLDERS


def _key(path: str) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of what ``path`` points to (None for a broken link)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def walk_images(folder: str, seen: set, extensions: tuple[str, ...] = IMG_EXTENSIONS) -> Iterator[str]:
    """Image files under ``folder`` (links followed): each folder's files by name, then its visible sub-folders
    by name, depth first (``os.walk``'s order). Folders and files whose ``(st_dev, st_ino)`` is in ``seen`` are
    skipped, and every one taken is added; ``folder`` itself is walked whatever ``seen`` holds. Raises
    ``OSError`` for a folder that cannot be listed."""
    stack = [folder]
    while stack:
        current = stack.pop()
        with os.scandir(current) as scan:
            entries = sorted((entry for entry in scan if visible(entry.name)), key=lambda entry: entry.name)
        subdirs = []
        for entry in entries:
            if entry.is_dir():
                key = _key(entry.path)
                if key not in seen:
                    seen.add(key)
                    subdirs.append(entry.path)
            elif entry.name.lower().endswith(extensions):
                key = _key(entry.path)
                if key is None or key not in seen:  # a broken link is kept: reading it reports it
                    seen.add(key)
                    yield entry.path
        stack.extend(reversed(subdirs))


def _class_names(split_dir: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir() and visible(entry.name))


def _scan(split_dir: Path, classes: list[str]) -> list[tuple[str, int]]:
    """``(path, label)`` of every image in the split's class folders, each file once (see ``walk_images``)."""
    roots: dict[tuple[int, int], str] = {}
    for cls in classes:
        key = _key(str(split_dir / cls)) if (split_dir / cls).is_dir() else None
        if key in roots:
            raise ConfigError(f"data.root: {split_dir / cls} is the same folder as {split_dir / roots[key]} (a link); "
                              "one folder cannot be two classes")
        if key is not None:
            roots[key] = cls
    seen = set(roots)  # a link from one class folder into another is not followed: that folder is its own class
    samples = []
    for label, cls in enumerate(classes):
        folder = split_dir / cls
        if not folder.is_dir():
            continue
        try:
            samples.extend((path, label) for path in walk_images(str(folder), seen))
        except OSError as exc:
            raise ConfigError(f"data.root: cannot list {exc.filename or folder}: {exc.strerror or exc}") from None
    return samples


def _check_classes(train_dir: Path, eval_dir: Path, classes: list[str], train: list[tuple[str, int]]) -> None:
    """Refuse (one line) training classes without images and evaluation classes that training lacks."""
    extra = sorted(set(_class_names(eval_dir)) - set(classes))
    if extra:
        raise ConfigError(f"data.root: {eval_dir} has class folders that {train_dir} lacks: {', '.join(extra)}; the "
                          "network could never predict them (add them to train/ or remove them)")
    counts = np.bincount([label for _, label in train], minlength=len(classes))
    empty = [str(train_dir / cls) for cls, count in zip(classes, counts) if count == 0]
    if empty:
        raise ConfigError(f"data.root: training class folder(s) without images ({', '.join(IMG_EXTENSIONS)}): "
                          f"{', '.join(empty)}; a class without training images cannot be learned (add images or "
                          "remove the folder)")


class FolderIndex(NamedTuple):
    """An ImageFolder tree's classes and ``(path, label)`` samples of both splits."""

    classes: list[str]
    train: list[tuple[str, int]]
    evals: list[tuple[str, int]]

    def pack(self, root: str) -> tuple:
        """A compact picklable form (paths relative to ``root``) to send to other ranks."""
        cut = len(os.path.join(root, ""))
        return (self.classes, [(p[cut:], y) for p, y in self.train], [(p[cut:], y) for p, y in self.evals])

    @classmethod
    def unpack(cls, root: str, packed: tuple) -> FolderIndex:
        """The index ``pack`` described, with absolute paths again."""
        classes, train, evals = packed
        return cls(classes, [(os.path.join(root, p), y) for p, y in train],
                   [(os.path.join(root, p), y) for p, y in evals])


@functools.lru_cache(maxsize=4)
def scan_imagefolder(root: str) -> FolderIndex:
    """Walk the tree once (cached per root): ``(classes, train, evals)`` with samples as ``(path, label)``."""
    train_dir, eval_dir = split_dirs(root)
    classes = _class_names(train_dir)
    if not classes:
        raise ConfigError(f"data.root: {train_dir} has no class sub-folders")
    train = _scan(train_dir, classes)
    if not train:
        raise ConfigError(f"data.root: no images ({', '.join(IMG_EXTENSIONS)}) under {train_dir}")
    _check_classes(train_dir, eval_dir, classes, train)
    evals = _scan(eval_dir, classes)
    if not evals:
        raise ConfigError(f"data.root: no images under {eval_dir} in the train split's class folders")
    return FolderIndex(classes, train, evals)


def to_rgb(img: Image.Image) -> Image.Image:
    """An opened image as 8-bit RGB; 16-bit greyscale (modes ``I;16*``, ``I``) scaled by ``v >> 8``, not clipped."""
    if img.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(img).astype(np.int64).clip(0, 65535) >> 8
        return Image.fromarray(values.astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Open an image file as RGB (``to_rgb``)."""
    with open(path, "rb") as fh:
        img = Image.open(fh)
        return to_rgb(img)


_CPP_PREFIX = re.compile(r"^\w+, \S+:\d+, ")  # torch C++ errors: "decode_jpeg, /path/decode_jpeg.cpp:171, ..."


def error_text(exc: BaseException) -> str:
    """A reader's or decoder's failure in one line: ``Type: first line of the message``."""
    lines = str(exc).strip().splitlines()
    text = _CPP_PREFIX.sub("", lines[0])[:200] if lines else ""
    if text.startswith("cannot identify image file"):  # PIL appends the file object's repr: an address
        text = "cannot identify image file"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_first(samples: Sequence[tuple[str, int]], start: int,
               read: Callable[[str], T]) -> tuple[int, T, tuple[str, str] | None]:
    """``(j, read(path_j), failure)``: the first sample from ``start`` on (``start, start+1, ...`` modulo N) whose
    file ``read`` accepts, and ``(path, reason)`` of sample ``start`` when it was not that one (else None).
    Raises ``UnreadableImages`` after ``MAX_SEARCH`` (or N) consecutive failures."""
    failure, start = None, start % len(samples)
    for step in range(min(len(samples), MAX_SEARCH)):
        j = (start + step) % len(samples)
        try:
            return j, read(samples[j][0]), failure
        except Exception as exc:  # noqa: BLE001 - whatever the decoder raises, the file is unusable
            failure = failure or (samples[j][0], error_text(exc))
    raise UnreadableImages(f"not one of {min(len(samples), MAX_SEARCH)} consecutive samples from {samples[start][0]} "
                           f"could be read (it failed with {failure[1] if failure else '?'}); is a folder or the file "
                           "system broken? python -m ddp_resnet.data.prepare --check ROOT lists every bad file")
