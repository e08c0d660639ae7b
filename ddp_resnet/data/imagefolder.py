"""ImageFolder layout: ``root/train/<class>/<image>`` and ``root/val/<class>/...`` (or ``root/test``).

Class names are the sorted sub-folder names of ``train/``; the evaluation split is labelled with the train
split's class indices (a class missing from it is simply absent). A scan gives a ``FolderIndex``; in a
distributed run one rank builds it and sends it to the others (``pack`` / ``unpack``: paths relative to the root),
so N ranks do not walk a million files on shared storage N times. Scans are cached per folder.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from ddp_resnet.config import ConfigError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def split_dirs(root: str | os.PathLike) -> tuple[Path, Path]:
    """``(train_dir, eval_dir)``; raises ``ConfigError`` when the layout is missing."""
    root = Path(root)
    train = root / "train"
    evals = [root / name for name in ("val", "test") if (root / name).is_dir()]
    if not train.is_dir() or not evals:
        raise ConfigError(f"data.root: no ImageFolder data at {root} (need {root}/train and {root}/val or {root}/test)")
    return train, evals[0]


def _class_names(train_dir: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(train_dir) if entry.is_dir() and not entry.name.startswith("."))


def _scan(split_dir: Path, classes: list[str]) -> list[tuple[str, int]]:
    samples = []
    for label, cls in enumerate(classes):
        folder = split_dir / cls
        if not folder.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames.sort()
            for fname in sorted(filenames):
                if fname.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.join(dirpath, fname), label))
    return samples


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
    train, evals = _scan(train_dir, classes), _scan(eval_dir, classes)
    if not train:
        raise ConfigError(f"data.root: no images ({', '.join(IMG_EXTENSIONS)}) under {train_dir}")
    if not evals:
        raise ConfigError(f"data.root: no images under {eval_dir} in the train split's class folders")
    return FolderIndex(classes, train, evals)


def load_rgb(path: str) -> Image.Image:
    """Open an image file as RGB."""
    with open(path, "rb") as fh:
        img = Image.open(fh)
        return img.convert("RGB")
