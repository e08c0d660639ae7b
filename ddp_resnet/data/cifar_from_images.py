"""`python -m ddp_resnet.data.cifar_from_images SRC OUT_ROOT`: CIFAR-10's standard python batches from image files.

    python -m ddp_resnet.data.cifar_from_images cifar10-jpeg.tar.gz data     # -> data/cifar-10-batches-py/

SRC is a directory or a ``.tar`` / ``.tar.gz`` archive holding ``train/<class>/<image>`` and
``test/<class>/<image>`` (possibly under one top-level folder), e.g. CIFAR-10 stored as JPEG files. Every image is
decoded (RGB; one that is not 32 x 32 is resized, bilinear, and counted) and written as the official archive
unpacks: ``data_batch_1`` .. ``data_batch_5`` (the training images in a fixed shuffled order, as the official batches
are shuffled), ``test_batch`` and ``batches.meta``, pickled dicts with ``data`` (uint8, N x 3072, channel-major
rows), ``labels``, ``filenames`` and ``batch_label``. Classes named as CIFAR-10's take its label order; other names
are sorted. The folder is written under a temporary name and renamed into place, so an interrupted run leaves no
half-written dataset; a complete one already there is kept (nothing is read). MD5 sums differ from the official
files (``ddp_resnet.data.cifar`` reads them; torchvision's ``CIFAR10`` refuses them).

Exit codes: 0 written (or already there); 2 bad input (one line on stderr).
"""
from __future__ import annotations

import argparse
import io
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from ddp_resnet.config import ConfigError
from ddp_resnet.data import cifar
from ddp_resnet.data.imagefolder import IMG_EXTENSIONS
from ddp_resnet.exitcodes import OK as EXIT_OK
from ddp_resnet.exitcodes import USAGE as EXIT_USAGE

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPLITS = ("train", "test")
TRAIN_FILES = 5


class ConvertError(ValueError):
    """Unusable input, described in one line."""


def _split_of(path: str) -> tuple[str, str, str] | None:
    """``(split, class, file name)`` of a path ending in ``train|test/<class>/<file>``, else None."""
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    if len(parts) < 3 or parts[-3] not in SPLITS or not parts[-1].lower().endswith(IMG_EXTENSIONS):
        return None
    return parts[-3], parts[-2], parts[-1]


def iter_images(src: Path) -> Iterator[tuple[str, str, str, bytes]]:
    """``(split, class, file name, encoded bytes)`` of every image under SRC (a directory or a tar archive)."""
    if src.is_dir():
        for split in SPLITS:
            for path in sorted(src.rglob(f"{split}/*/*")):
                found = _split_of(str(path.relative_to(src)))
                if found is not None and path.is_file():
                    yield (*found, path.read_bytes())
        return
    try:
        with tarfile.open(src) as tar:
            for member in tar:
                found = _split_of(member.name) if member.isfile() else None
                if found is not None:
                    yield (*found, tar.extractfile(member).read())
    except tarfile.TarError as exc:
        raise ConvertError(f"SRC {src}: not a readable tar archive ({exc})") from None


def decode(data: bytes) -> tuple[np.ndarray, bool]:
    """``(32 x 32 x 3 uint8 pixels, whether the image had to be resized)``."""
    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB")
    resized = rgb.size != (32, 32)
    if resized:
        rgb = rgb.resize((32, 32), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8), resized


def class_order(names: set[str]) -> list[str]:
    """CIFAR-10's label order when the folders carry its class names, else the sorted names."""
    return list(CIFAR10_CLASSES) if names == set(CIFAR10_CLASSES) else sorted(names)


def _dump(path: Path, batch_label: str, images: np.ndarray, labels: np.ndarray, names: list[str]) -> None:
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # NHWC -> channel-major rows
    payload = {"batch_label": batch_label, "labels": [int(v) for v in labels], "data": np.ascontiguousarray(rows),
               "filenames": names}
    with open(path, "wb") as fh:
        pickle.dump(payload, fh, protocol=4)


def write_cifar_batches(out_root: str | os.PathLike, train: tuple[np.ndarray, np.ndarray],
                        test: tuple[np.ndarray, np.ndarray], class_names: list[str],
                        train_names: list[str] | None = None, test_names: list[str] | None = None) -> Path:
    """Write ``(images NHWC uint8, labels)`` splits as ``OUT_ROOT/cifar-10-batches-py/`` (atomically); its path."""
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    target = cifar.cifar_dir(out_root, "cifar10")
    staging = Path(tempfile.mkdtemp(prefix=".cifar-10-batches-py.", dir=out_root))
    try:
        images, labels = train
        names = train_names or [f"train_{i:05d}.png" for i in range(len(labels))]
        for b, chunk in enumerate(np.array_split(np.arange(len(labels)), TRAIN_FILES)):
            _dump(staging / f"data_batch_{b + 1}", f"training batch {b + 1} of {TRAIN_FILES}", images[chunk],
                  labels[chunk], [names[i] for i in chunk])
        _dump(staging / "test_batch", "testing batch 1 of 1", test[0], test[1],
              test_names or [f"test_{i:05d}.png" for i in range(len(test[1]))])
        meta = {"num_cases_per_batch": -(-len(labels) // TRAIN_FILES), "label_names": list(class_names),
                "num_vis": 3072}
        (staging / "batches.meta").write_bytes(pickle.dumps(meta, protocol=4))
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def convert(src: str | os.PathLike, out_root: str | os.PathLike, log=print) -> Path:
    """Decode SRC's train/ and test/ images and write the CIFAR batches under OUT_ROOT; the batches' folder."""
    src, out_root = Path(src), Path(out_root)
    if not src.exists():
        raise ConvertError(f"SRC {src}: no such file or directory")
    try:
        folder = cifar.ensure_cifar(out_root, "cifar10", download=False)
        log(f"cifar_from_images: {folder} is complete already; kept it")
        return folder
    except ConfigError:
        pass
    found: dict[str, list] = {split: [] for split in SPLITS}
    resized = 0
    for split, cls, name, data in iter_images(src):
        try:
            pixels, was_resized = decode(data)
        except (OSError, ValueError) as exc:
            raise ConvertError(f"{split}/{cls}/{name}: cannot be decoded ({exc})") from None
        resized += was_resized
        found[split].append((cls, f"{cls}_{name}", pixels))
    empty = [split for split in SPLITS if not found[split]]
    if empty:
        raise ConvertError(f"SRC {src}: no images under {' or '.join(f'{s}/<class>/' for s in empty)}")
    classes = class_order({cls for items in found.values() for cls, _, _ in items})
    splits = {}
    for split, items in found.items():
        items.sort(key=lambda item: item[1])
        labels = np.array([classes.index(cls) for cls, _, _ in items], dtype=np.int64)
        splits[split] = (np.stack([p for _, _, p in items]), labels, [n for _, n, _ in items])
    order = np.random.default_rng(0).permutation(len(splits["train"][1]))
    tx, ty, tn = splits["train"]
    target = write_cifar_batches(out_root, (tx[order], ty[order]), splits["test"][:2], classes,
                                 [tn[i] for i in order], splits["test"][2])
    log(f"cifar_from_images: wrote {target} ({len(ty)} train, {len(splits['test'][1])} test images, "
        f"{len(classes)} classes{f', {resized} resized to 32 x 32' if resized else ''})")
    return target


def main(argv: list[str] | None = None) -> int:
    """Parse and convert; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m ddp_resnet.data.cifar_from_images",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("src", help="directory or .tar(.gz) holding train/<class>/* and test/<class>/*")
    parser.add_argument("out_root", help="where cifar-10-batches-py/ is written")
    args = parser.parse_args(argv)
    try:
        convert(args.src, args.out_root, log=lambda line: print(line, flush=True))
    except ConvertError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    return EXIT_OK


def cli() -> None:
    """Console entry point."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
