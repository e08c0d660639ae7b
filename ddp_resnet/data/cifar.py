"""CIFAR-10 / CIFAR-100 in the standard "python version" layout: reading, checking and (optional) download.

Files already on disk are read as they are (no checksum: local copies may be repacked). A download is written
to a temporary file, its MD5 checked against the official archive's before anything is extracted, and both the
archive and the extracted folder are moved into place with atomic renames, so concurrent callers (several ranks
on one node) cannot observe a half-written dataset.

Batch files are data, never code: they are read by a restricted unpickler (``_CifarUnpickler``) that builds only
what CIFAR batches hold (dicts, lists, strings, bytes, numbers, numpy arrays and scalars); a pickle that asks for
any other global (``os.system``, ``builtins.exec``, ...) is refused in one line naming the file and the global, and
nothing of it runs. Each batch is checked once on load: ``data`` a uint8 array of N x 3072, as many labels as
images, every label in ``[0, number of classes in the meta file)``; a truncated or corrupt file is one line naming
it. Files written by Python 2 (the official ones) or 3, numpy 1 or 2, pickle protocols 2 to 5 all read.
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


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes under protocol 2 (``encode(str, 'latin1')``); nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not bytes data")
    return text.encode("latin1")


def _empty_bytes() -> bytes:
    """``bytes()``: how Python 3 pickles an empty bytes object under protocol 2."""
    return b""


def _allowed_globals() -> dict[tuple[str, str], object]:
    """The callables a CIFAR batch's pickle may name, whichever numpy wrote it (1.x ``numpy.core``, 2.x
    ``numpy._core``): array and dtype reconstruction, numpy scalars, protocol 5 buffers, protocol-2 bytes."""
    reconstruct = np.zeros(1).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    scalar = np.int64(0).__reduce__()[0]
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_encode,
        ("__builtin__", "bytes"): _empty_bytes, ("builtins", "bytes"): _empty_bytes}
    for core in ("numpy.core", "numpy._core"):
        allowed.update({(f"{core}.multiarray", "_reconstruct"): reconstruct, (f"{core}.multiarray", "scalar"): scalar,
                        (f"{core}.numeric", "_frombuffer"): frombuffer})
    return allowed


class _Refused(Exception):
    """A pickle asked for a global outside ``_allowed_globals``."""


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only dicts, lists, strings, bytes, numbers and numpy arrays: data never runs code."""

    allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        """The allowed callable, or ``_Refused`` naming what was asked for."""
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None


def _unpickle(path: Path) -> dict:
    """A CIFAR pickle (a dict; bytes keys read as str) through ``_CifarUnpickler``; one-line ``ConfigError``s."""
    try:
        with open(path, "rb") as fh:
            payload = _CifarUnpickler(fh, encoding="latin1").load()
    except _Refused as exc:
        raise ConfigError(f"data.root: {path} asks the unpickler to call {exc}; refused: a CIFAR batch holds only "
                          "dicts, lists, strings, numbers and numpy arrays (is it the real file?)") from None
    except OSError as exc:
        raise ConfigError(f"data.root: cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt: whatever the unpickler raises
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(f"data.root: {path} is truncated or corrupt ({type(exc).__name__}"
                          f"{': ' + reason if reason else ''}); replace it") from None
    if not isinstance(payload, dict):
        raise ConfigError(f"data.root: {path} holds a {type(payload).__name__}, not the dict of a CIFAR batch file")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in payload.items()}


def _field(path: Path, batch: dict, key: str):
    if key not in batch:
        raise ConfigError(f"data.root: {path} has no {key!r} entry (keys: {', '.join(map(str, batch))})")
    return batch[key]


def read_class_names(root: str | os.PathLike, name: str) -> list[str]:
    """Class names from the meta file (a non-empty list of strings, checked)."""
    spec = SPECS[name]
    path = cifar_dir(root, name) / spec.meta_file
    names = _field(path, _unpickle(path), spec.names_key)
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, (str, bytes)) for n in names):
        raise ConfigError(f"data.root: {path}: {spec.names_key!r} must be a non-empty list of class names")
    return [n.decode("latin1") if isinstance(n, bytes) else n for n in names]


def _checked_batch(path: Path, batch: dict, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(data uint8 N x 3072, labels int64 N)`` of one batch, or a one-line ``ConfigError`` saying what is wrong."""
    data, labels = _field(path, batch, "data"), _field(path, batch, label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ConfigError(f"data.root: {path}: 'data' must be a uint8 array of shape N x 3072, got a {got}")
    try:
        values = np.asarray(labels)
    except (ValueError, TypeError):
        values = np.asarray([None])
    if values.ndim != 1 or (values.size and values.dtype.kind not in "iu"):
        raise ConfigError(f"data.root: {path}: {label_key!r} must be a list of integer labels")
    if len(values) != len(data):
        raise ConfigError(f"data.root: {path}: {len(values)} labels for {len(data)} images")
    bad = np.flatnonzero((values < 0) | (values >= num_classes))
    if bad.size:
        raise ConfigError(f"data.root: {path}: label {values[bad[0]]} (image {bad[0]}) is outside [0, {num_classes}):"
                          f" the meta file names {num_classes} classes ({bad.size} bad label(s) in this file)")
    return data, values.astype(np.int64)


def read_cifar_split(root: str | os.PathLike, name: str, train: bool,
                     num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a split, checked (shapes, counts, labels in ``[0, num_classes)``, by default the meta file's count):
    ``(images uint8 N x 32 x 32 x 3 (NHWC), labels int64 N)``."""
    spec = SPECS[name]
    folder = cifar_dir(root, name)
    num_classes = len(read_class_names(root, name)) if num_classes is None else num_classes
    images, labels = [], []
    for fname in spec.train_files if train else spec.test_files:
        data, batch_labels = _checked_batch(folder / fname, _unpickle(folder / fname), spec.label_key, num_classes)
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(batch_labels)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)
