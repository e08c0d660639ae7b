"""DDP's tuning options change speed, never results; every rank evaluates rank 0's buffers (model and EMA)."""
from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from conftest import assert_bitwise_equal, metrics, ok, run_train, untimed, weights
from ddp_resnet import config, evaluate
from ddp_resnet.build import wrap_ddp
from ddp_resnet.models import build_model

COMMON = ("train.epochs=2", "optim.ema_decay=0.9", "data.augment=crop_flip")
TUNED = ("dist.static_graph=true", "dist.bucket_cap_mb=0.05", "dist.gradient_as_bucket_view=false",
         "dist.forward_sync_buffers=false")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 2-process job with DDP's defaults (buffers re-broadcast every forward) and with every option
    changed (static graph, a 0.05 MiB bucket cap, no bucket views, no buffer broadcasts)."""
    base = tmp_path_factory.mktemp("ddp_options")
    plain, tuned = base / "plain", base / "tuned"
    ok(run_train(plain, *COMMON, "dist.forward_sync_buffers=true", nproc=2))
    ok(run_train(tuned, *COMMON, *TUNED, nproc=2))
    return plain, tuned


def test_static_graph_bucket_size_and_buffer_broadcasts_leave_the_result_bitwise_unchanged(runs):
    plain, tuned = runs
    for name in ("last.pt", "best.pt"):
        assert_bitwise_equal(weights(plain / "checkpoints" / name), weights(tuned / "checkpoints" / name))
    strip = [[untimed(r) for r in metrics(run)] for run in runs]
    assert strip[0] == strip[1]
    assert "test_acc_ema" in strip[0][-1]


@pytest.mark.parametrize("ema", [False, True])
def test_logged_evaluation_of_a_two_rank_run_equals_evaluating_its_checkpoint(runs, tmp_path, ema):
    """Without buffer broadcasts rank 1's BN statistics (and its EMA's) drift from rank 0's; the trainer must
    still evaluate exactly the weights and buffers the checkpoint holds, on both ranks."""
    _, tuned = runs
    record = metrics(tuned)[-1]
    out = tmp_path / "eval.json"
    args = ["--checkpoint", str(tuned / "checkpoints/last.pt"), "--json", str(out)] + (["--ema"] if ema else [])
    assert evaluate.main(args) == 0
    result = json.loads(out.read_text())
    suffix = "_ema" if ema else ""
    assert result["top1"] == record[f"test_acc{suffix}"]
    assert result["loss"] == pytest.approx(record[f"test_loss{suffix}"], rel=1e-6)


def test_small_buckets_without_buffer_broadcasts_keep_accumulation_exact(tmp_path):
    plain, tuned = tmp_path / "plain", tmp_path / "tuned"
    ok(run_train(plain, "train.epochs=1", "optim.accum_steps=2", "dist.forward_sync_buffers=true", nproc=2))
    ok(run_train(tuned, "train.epochs=1", "optim.accum_steps=2", "dist.bucket_cap_mb=0.05",
                 "dist.forward_sync_buffers=false", nproc=2))
    assert_bitwise_equal(weights(plain / "checkpoints/last.pt"), weights(tuned / "checkpoints/last.pt"))


@pytest.mark.parametrize("overrides, message", [
    (("dist.bucket_cap_mb=-1",), "dist.bucket_cap_mb: must be >= 0, got -1.0"),
    (("dist.static_graph=true", "optim.accum_steps=2"),
     "dist.static_graph: DDP's static graph breaks under no_sync, so it cannot be combined with optim.accum_steps=2"),
])
def test_bad_ddp_options_are_refused_before_anything_starts(tmp_path, overrides, message):
    proc = run_train(tmp_path / "bad", *overrides)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "bad").exists()


def _buckets_after_two_steps(store, *overrides: str):
    """The DDP wrapper the trainer builds for ``overrides`` (1-rank gloo group) and its gradient bucket sizes
    once DDP has rebuilt its buckets from the first step's gradient order."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # no deprecated DDP argument
            ddp = wrap_ddp(build_model("resnet20", num_classes=10), config.load(None, list(overrides)),
                           SimpleNamespace(distributed=True, device=torch.device("cpu")))
        for _ in range(2):
            ddp(torch.randn(2, 3, 16, 16)).sum().backward()
        return ddp, [b.buffer().numel() * 4 for b in ddp.reducer._get_zeros_like_grad_buckets()]
    finally:
        dist.destroy_process_group()


def test_the_trainers_ddp_wrapper_takes_the_configured_options(tmp_path):
    ddp, sizes = _buckets_after_two_steps(tmp_path / "store_a")
    assert (ddp.static_graph, ddp.gradient_as_bucket_view, ddp.broadcast_buffers) == (False, True, False)
    assert len(sizes) == 2 and sizes[0] >= 2**20  # DDP's 1 MiB first bucket, then the rest (ResNet-20: ~1.03 MiB)
    ddp, sizes = _buckets_after_two_steps(tmp_path / "store_b", "dist.bucket_cap_mb=0.05",
                                          "dist.forward_sync_buffers=true", "dist.gradient_as_bucket_view=false")
    assert (ddp.gradient_as_bucket_view, ddp.broadcast_buffers) == (False, True)
    assert len(sizes) >= 10 and sum(sizes) == 4 * sum(p.numel() for p in ddp.module.parameters())
    ddp, _ = _buckets_after_two_steps(tmp_path / "store_c", "dist.static_graph=true")
    assert ddp.static_graph
