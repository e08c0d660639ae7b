"""The ONLY torch.save / torch.load of training state: atomic writes, safe loads, newest-valid lookup.

Files hold only tensors and plain Python values, so they load with ``torch.load(weights_only=True)``; a file
whose pickle would run code is refused. A write goes to a temporary file in the same directory, is fsynced and
renamed over the target, so a kill at any moment leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
import pickle
import platform
import random
import re
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

import ddp_resnet
from ddp_resnet import exitcodes

EPOCH_FILE = re.compile(r"^epoch_(\d{4,})\.pt$")  # only the names CheckpointPolicy writes (pruning trusts it)
# A temporary file is created, never opened through what is already there (a planted symbolic link included).
EXCLUSIVE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
# The checkpoint schema's version (``state.training_payload`` writes it). 1: files written before the field
# existed (the same keys, without "format" and "class_names"); they load as they are.
FORMAT = 2


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, described in one line."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written (no space, I/O error, quota), described in one line."""

    exit_code = exitcodes.IO_ERROR  # the environment failed, not the run


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind an exception (torch.save wraps a failed write in a RuntimeError)."""
    while exc is not None and not isinstance(exc, OSError):
        exc = exc.__cause__ or exc.__context__
    return exc


# ------------------------------------------------------------------------------------------------ RNG state
def rng_state() -> dict:
    """This process's RNG states (python, numpy, torch CPU, CUDA) as plain values and tensors."""
    np_state = np.random.get_state()
    state = {
        "python": _plain(random.getstate()),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore RNG states written by rng_state()."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------------- manifest
def _git_commit() -> str:
    try:
        here = Path(ddp_resnet.__file__).resolve().parent
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


_COMMIT: list = []


def versions() -> dict:
    """The versions a run depends on (ranks must agree on them; checkpoints record them)."""
    import torchvision

    if not _COMMIT:
        _COMMIT.append(_git_commit())
    return {"ddp_resnet": ddp_resnet.__version__, "git_commit": _COMMIT[0], "torch": str(torch.__version__),
            "torchvision": torchvision.__version__, "numpy": np.__version__, "python": platform.python_version()}


def manifest(world_size: int) -> dict:
    """Where and with what a checkpoint was written."""
    v = versions()
    return {"package_version": v["ddp_resnet"], "torch_version": v["torch"], "world_size": world_size,
            "git_commit": v["git_commit"], "versions": v, "hostname": socket.gethostname(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "unix_time": time.time()}


# ----------------------------------------------------------------------------------------------- save/load
_PARTIAL: list[Path] = []  # the temporary file being written, if any


def discard_partial() -> None:
    """Remove the temporary file of a write in progress (before an immediate exit); the target is untouched."""
    for tmp in list(_PARTIAL):
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def save(payload: dict, path: str | Path) -> None:
    """Atomically write payload to path: temporary file, fsync, rename, fsync of the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    _PARTIAL.append(tmp)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(os.open(tmp, EXCLUSIVE, 0o644), "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except Exception as exc:  # noqa: BLE001 - any failed write: one line, the errno's text when there is one
        cause = _os_error(exc)
        detail = (cause.strerror or str(cause)) if cause is not None else str(exc).strip().splitlines()[0][:200]
        raise CheckpointWriteError(f"could not write checkpoint {path}: {detail}") from None
    finally:
        _PARTIAL.remove(tmp)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the file system refuses even that: the temporary name never replaces a checkpoint
            pass


def _read(path: str | Path, map_location) -> object:
    """``torch.load(weights_only=True)``; every failure becomes a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} refused: it holds more than tensors and plain values "
                              f"({first[:160]})") from None
    except Exception as exc:  # truncated or corrupt files raise many different types
        text = str(exc).strip()
        raise CheckpointError(f"checkpoint {path} failed to load ({type(exc).__name__}: "
                              f"{text.splitlines()[0][:160] if text else ''})") from None


def check_format(payload: dict, path: str | Path) -> None:
    """Refuse a checkpoint of a newer schema than this version reads, in one line naming both."""
    written = payload.get("format", 1)
    if not isinstance(written, int) or not 1 <= written <= FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {written!r}; this ddp_resnet "
                              f"({ddp_resnet.__version__}) reads formats 1 to {FORMAT}: use a newer ddp_resnet")


def load(path: str | Path, map_location: torch.device | str = "cpu") -> dict:
    """Load a training checkpoint with weights_only=True; raise CheckpointError (one line) if it cannot be used."""
    payload = _read(path, map_location)
    if not isinstance(payload, dict) or "model" not in payload:
        raise CheckpointError(f"checkpoint {path} is not a ddp_resnet checkpoint (no 'model' entry)")
    check_format(payload, path)
    return payload


def candidates(ckpt_dir: str | Path) -> list[Path]:
    """Resumable files in a checkpoint directory, newest first (last.pt, then epoch files by number)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    epoch_files = sorted((p for p in ckpt_dir.iterdir() if EPOCH_FILE.search(p.name)),
                         key=lambda p: int(EPOCH_FILE.search(p.name).group(1)), reverse=True)
    last = [ckpt_dir / "last.pt"] if (ckpt_dir / "last.pt").is_file() else []
    return last + epoch_files


def load_latest_valid(ckpt_dir: str | Path, map_location="cpu", warn=print) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads: ``last.pt`` (always written first, atomically, so it is the newest),
    else the epoch files, newest first. Only the file used is kept in memory; unusable files are reported in one
    line each."""
    for path in candidates(ckpt_dir):
        try:
            return path, load(path, map_location)
        except CheckpointError as exc:
            warn(f"warning: {exc}; trying an older checkpoint")
    return None


def read_weights(path: str | Path) -> dict:
    """A training checkpoint's payload, or ``{"model": state_dict}`` for a plain weights file (an export, a
    torchvision ``.pth``). ``module.`` / ``_orig_mod.`` prefixes of wrapped models are removed. Tools read it
    through ``open_checkpoint`` (typed); this is the dict underneath."""
    payload = _read(path, "cpu")
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        check_format(payload, path)
        return payload
    if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return {"model": {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in payload.items()}}
    raise CheckpointError(f"checkpoint {path} is neither a ddp_resnet checkpoint nor a state_dict of tensors")


class Saved:
    """A checkpoint opened for use (evaluate, export, report, fine-tuning): typed readers over its payload.

    A plain weights file (an export, a torchvision ``.pth``) opens too: it has weights and nothing else.
    """

    def __init__(self, path: str | Path, payload: dict):
        self.path, self.payload = Path(path), payload

    @property
    def format(self) -> int:
        """The schema version it was written with (1 for files older than the field; 0 for plain weights)."""
        return int(self.payload.get("format", 1 if "step" in self.payload else 0))

    def weights(self, ema: bool = False) -> dict:
        """The model's state_dict, or the EMA's (refused in one line when the run kept none)."""
        if not ema:
            return self.payload["model"]
        if self.payload.get("ema") is None:
            raise CheckpointError(f"checkpoint {self.path} has no EMA weights (optim.ema_decay was 0)")
        return self.payload["ema"]

    @property
    def config(self) -> dict | None:
        """The resolved config of the run that wrote it (None for plain weights)."""
        config = self.payload.get("config")
        return config if isinstance(config, dict) else None

    def config_for_use(self) -> dict | None:
        """The saved config as a base for using the trained weights: without its fine-tuning source (the
        checkpoint holds the trained weights) and without the training run's resume setting."""
        if self.config is None:
            return None
        tree = {section: dict(values) if isinstance(values, dict) else values for section, values in
                self.config.items()}
        tree.setdefault("finetune", {}).update(checkpoint="", freeze="none")
        tree.setdefault("ckpt", {}).update(resume="none")
        return tree

    @property
    def manifest(self) -> dict:
        """Where and with what it was written ({} for plain weights)."""
        return self.payload.get("manifest") or {}

    @property
    def class_names(self) -> list[str] | None:
        """The class names the run trained on (None for older checkpoints and plain weights)."""
        names = self.payload.get("class_names")
        return list(names) if names else None

    @property
    def step(self) -> int | None:
        """Optimizer steps done when it was written (None for plain weights)."""
        return self.payload.get("step")

    @property
    def epoch(self) -> int | None:
        """The epoch of its step, 0-based (None for plain weights)."""
        return self.payload.get("epoch")

    def where(self) -> str:
        """Where in its training run it was written ("weights file" for plain weights)."""
        if self.step is not None and self.payload.get("steps_per_epoch"):
            return f"step {self.step}, epoch {self.step / self.payload['steps_per_epoch']:.2f}"
        return "weights file"


def open_checkpoint(path: str | Path) -> Saved:
    """Open a training checkpoint or a plain weights file (``read_weights``), typed."""
    return Saved(path, read_weights(path))


def check_compatible(payload: dict, model_name: str, num_classes: int, path: str | Path) -> None:
    """Refuse a checkpoint written for a different network."""
    saved = (payload.get("config") or {}).get("model", {})
    if saved.get("name") and saved["name"] != model_name:
        raise CheckpointError(f"checkpoint {path} is for model '{saved['name']}', but this run trains "
                              f"'{model_name}'; use another output_dir or ckpt.resume=none")
    head = [v for k, v in payload["model"].items() if k.endswith("fc.weight")]
    if head and head[-1].shape[0] != num_classes:
        raise CheckpointError(f"checkpoint {path} has {head[-1].shape[0]} classes, this run has {num_classes}")


class CheckpointPolicy:
    """Which files to write: last.pt always, epoch_XXXX.pt keeping the newest `keep`, best.pt on improvement."""

    def __init__(self, ckpt_dir: str | Path, keep: int):
        self.dir = Path(ckpt_dir)
        self.keep = keep

    def save_last(self, payload: dict) -> Path:
        """Write last.pt."""
        path = self.dir / "last.pt"
        save(payload, path)
        return path

    def save_epoch(self, payload: dict, epoch: int) -> None:
        """Write epoch_XXXX.pt and prune the oldest beyond `keep`."""
        if self.keep <= 0:
            return
        save(payload, self.dir / f"epoch_{epoch:04d}.pt")
        epoch_files = [p for p in candidates(self.dir) if EPOCH_FILE.search(p.name)]
        for old in epoch_files[self.keep:]:
            old.unlink(missing_ok=True)

    def save_best(self, payload: dict) -> None:
        """Write best.pt."""
        save(payload, self.dir / "best.pt")
