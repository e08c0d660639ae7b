"""A trial's JSON file: what its training process needs to find its study (``train.trial`` names it).

The search writes ``DIR/trials/NNNN/trial.json`` before each launch of trial NNNN: the journal, the study, the
trial's number, the metric and direction, the pruner, the parameters. Nothing here imports Optuna or torch.
"""
from __future__ import annotations

import json
from pathlib import Path

from ddp_resnet import rundir
from ddp_resnet.config import ConfigError

TRIAL_FILE = "trial.json"
FIELDS = ("journal", "study", "number", "metric", "direction", "pruner")


def trial_dir(out: str | Path, number: int) -> Path:
    """Trial ``number``'s directory: ``DIR/trials/NNNN`` (Optuna's trial number, from 0)."""
    return Path(out) / "trials" / f"{number:04d}"


def write_json(path: str | Path, data) -> None:
    """Write JSON atomically (a temporary file in the same directory, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rundir.write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def read_trial_file(path: str | Path) -> dict:
    """The trial file's fields, or ConfigError in one line (a run with ``train.trial`` set refuses to start)."""
    path = Path(path)
    try:
        info = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"train.trial: cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"train.trial: {path} is not JSON: {exc}") from None
    missing = [k for k in FIELDS if not isinstance(info, dict) or k not in info]
    if missing:
        raise ConfigError(f"train.trial: {path} lacks {', '.join(missing)} (was it written by the search?)")
    return info
