"""CIFAR-10 / CIFAR-100 in the standard "python version" layout: reading, checking and (optional) download.

Files already on disk are read as they are (no checksum: local copies may be repacked). A download is written
to a temporary file, its MD5 checked against the official archive's before anything is extracted, and both the
archive and the extracted folder are moved into place with atomic renames, so concurrent callers (several ranks
on one node) cannot observe a half-written dataset.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddp_resnet.config import ConfigError


@dataclass(frozen=True)
class CifarSpec:
    """Where one CIFAR variant lives and how its pickles are keyed."""

    title: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    archive: str
    md5: str


SPECS: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key="labels",
        names_key="label_names",
        archive="cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
    ),
    "cifar100": CifarSpec(
        title="CIFAR-100",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        archive="cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
    ),
}

# Official download locations; module-level so tests (or mirrors) can point them elsewhere.
URLS: dict[str, str] = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}


def cifar_dir(root: str | os.PathLike, name: str) -> Path:
    """The folder holding the batch files of dataset ``name`` under ``root``."""
    return Path(root) / SPECS[name].folder


def _missing_files(root: str | os.PathLike, name: str) -> list[str]:
    spec = SPECS[name]
    folder = cifar_dir(root, name)
    return [f for f in (*spec.train_files, *spec.test_files, spec.meta_file) if not (folder / f).is_file()]


def ensure_cifar(root: str | os.PathLike, name: str, download: bool) -> Path:
    """Return the dataset folder, downloading it first when it is incomplete and ``download`` is set.

    Raises ``ConfigError`` (one line) when the files are missing and cannot be downloaded.
    """
    spec = SPECS[name]
    folder = cifar_dir(root, name)
    if not _missing_files(root, name):
        return folder
    if download:
        download_cifar(root, name)
        if not _missing_files(root, name):
            return folder
        raise ConfigError(
            f"data.root: the downloaded {spec.title} archive lacks {', '.join(_missing_files(root, name))}"
        )
    raise ConfigError(f"data.root: no {spec.title} found at {folder} (set data.download=true or point data.root at it)")


def _md5(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def download_cifar(root: str | os.PathLike, name: str, url: str | None = None) -> None:
    """Download (MD5-checked) and extract dataset ``name`` into ``root``.

    An archive already present under its final name in ``root`` was put there by an earlier verified download
    (or by the user) and is extracted without downloading again. A checksum mismatch deletes the download and
    raises ``ConfigError``; nothing is extracted.
    """
    spec = SPECS[name]
    url = url or URLS[name]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    archive = root / spec.archive
    if not archive.is_file():
        fd, tmp_name = tempfile.mkstemp(prefix=f".{spec.archive}.", suffix=".part", dir=root)
        tmp = Path(tmp_name)
        try:
            digest = hashlib.md5()
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                for block in iter(lambda: response.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
            if digest.hexdigest() != spec.md5:
                raise ConfigError(
                    f"data.download: checksum mismatch for {url} (md5 {digest.hexdigest()}, expected {spec.md5});"
                    " refusing to extract it"
                )
            os.replace(tmp, archive)
        except OSError as exc:
            raise ConfigError(f"data.download: could not download {url}: {exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extract.", dir=root))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(staging, filter="data")
            else:  # pragma: no cover - Python without extraction filters
                tar.extractall(staging)
        extracted = staging / spec.folder
        if not extracted.is_dir():
            raise ConfigError(f"data.download: {archive} does not contain {spec.folder}/")
        target = root / spec.folder
        if target.exists() and not _missing_files(root, name):
            return  # someone else finished first
        if target.exists():
            shutil.rmtree(target)
        try:
            os.rename(extracted, target)
        except OSError:
            if _missing_files(root, name):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as fh:
        return pickle.load(fh, encoding="latin1")


def read_class_names(root: str | os.PathLike, name: str) -> list[str]:
    """Class names from the meta file."""
    spec = SPECS[name]
    return [str(n) for n in _unpickle(cifar_dir(root, name) / spec.meta_file)[spec.names_key]]


def read_cifar_split(root: str | os.PathLike, name: str, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Read a split: ``(images uint8 N x 32 x 32 x 3 (NHWC), labels int64 N)``."""
    spec = SPECS[name]
    folder = cifar_dir(root, name)
    images, labels = [], []
    for fname in spec.train_files if train else spec.test_files:
        batch = _unpickle(folder / fname)
        data = np.asarray(batch["data"], dtype=np.uint8)
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[spec.label_key], dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)
