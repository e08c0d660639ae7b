"""Shared helpers: run the trainer as a real process (single, or under torchrun), read its outputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FAULTS = Path(__file__).resolve().parent / "faults"  # sitecustomize.py: DDP_RESNET_TEST_* fault injection

# A run small enough for a few seconds on 2 CPU cores: ResNet-20 on 16 px synthetic images.
TINY = [
    "model.name=resnet20", "data.dataset=synthetic", "data.synthetic_train_size=128",
    "data.synthetic_test_size=64", "data.synthetic_image_size=16", "data.batch_size=32", "data.workers=0",
    "train.epochs=2", "train.device=cpu", "dist.backend=gloo", "train.log_every=1000", "dist.timeout_s=60",
]


def child_env(extra: dict | None = None) -> dict:
    """Environment for a child run: one thread per process, no inherited launcher variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(FAULTS), env.get("PYTHONPATH", "")])
    env.update(extra or {})
    return env


def train_cmd(nproc: int = 1, max_restarts: int = 0) -> list[str]:
    """The command line that starts the trainer on nproc CPU processes."""
    if nproc == 1:
        return [sys.executable, "-m", "ddp_resnet.train"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={max_restarts}", "-m", "ddp_resnet.train"]


def run_train(out: Path, *overrides: str, nproc: int = 1, config: str | None = None, env: dict | None = None,
              timeout: float = 300, max_restarts: int = 0, tiny: bool = True) -> subprocess.CompletedProcess:
    """Run a training job to completion and return the finished process (stdout/stderr captured)."""
    args = train_cmd(nproc, max_restarts)
    if config:
        args += ["--config", str(REPO / config)]
    args += (TINY if tiny else []) + [f"output_dir={out}", *overrides]
    return subprocess.run(args, cwd=REPO, env=child_env(env), capture_output=True, text=True, timeout=timeout)


def metrics(out: Path) -> list[dict]:
    """The run's metrics.jsonl epoch records (its "event" records, a change of world size, left out)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if "event" not in r]


def untimed(record: dict) -> dict:
    """A metrics record without the keys that measure time (they differ between identical runs)."""
    return {k: v for k, v in record.items()
            if not (k.endswith("_s") or "_s_" in k or k in ("img_per_s", "slowest_rank"))}


def weights(path: Path) -> dict:
    """The model state_dict of a checkpoint."""
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def epoch_batches(loader, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every batch of one epoch of a training loader, from batch ``start``."""
    loader.set_epoch(epoch, start)
    return list(loader)


def assert_same_batches(a, b) -> None:
    """Two lists of (images, labels) batches identical, bit for bit."""
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def assert_bitwise_equal(a: dict, b: dict) -> None:
    """Every tensor of two state_dicts identical, bit for bit."""
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def ok(proc: subprocess.CompletedProcess, code: int = 0) -> subprocess.CompletedProcess:
    """Assert the exit code, showing the process output when it differs."""
    assert proc.returncode == code, (f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                                     f"STDERR:\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(autouse=True)
def one_thread():
    """In-process torch work on one intra-op thread, like the child runs: the CI machine has 2 shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny() -> list[str]:
    """The tiny run's overrides."""
    return list(TINY)


def assert_parts(line: str, *parts: str) -> None:
    """A message holds each stable part (a key, a file, a number), whatever the sentence around them."""
    missing = [part for part in parts if part not in line]
    assert not missing, f"{missing} not in: {line}"
