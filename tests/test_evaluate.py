"""Checkpoint evaluation agrees exactly with the trainer's own evaluation, on 1 and on 2 processes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, child_env, metrics, ok, run_train
from ddp_resnet import evaluate, export


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run trained on 2 processes, 101 test images (uneven shards), a small eval batch."""
    out = tmp_path_factory.mktemp("evaluate") / "run"
    ok(run_train(out, "train.epochs=3", "data.synthetic_test_size=101", "data.eval_batch_size=16", nproc=2))
    return out


def _logged(run_dir) -> tuple[dict, dict]:
    best = json.loads((run_dir / "best_eval.json").read_text())
    record = next(r for r in metrics(run_dir) if r["epoch"] == best["epoch"])
    return best, record


def test_single_process_evaluation_equals_the_trainers_of_the_same_checkpoint(run_dir, tmp_path, capsys):
    best, record = _logged(run_dir)
    out = tmp_path / "eval.json"
    assert evaluate.main(["--checkpoint", str(run_dir / "checkpoints/best.pt"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["count"] == record["test_count"] == 101
    assert result["top1"] == record["test_acc"] == best["test_acc"]
    assert result["top5"] == record["test_top5"]
    assert result["loss"] == pytest.approx(record["test_loss"], rel=1e-5)
    assert result["confusion"] == best["confusion"]
    assert result["per_class_acc"] == pytest.approx(best["per_class_acc"])
    printed = capsys.readouterr().out
    assert f"top-1 {record['test_acc']:.4f}%" in printed and "per-class accuracy:" in printed
    assert sum(line.strip().startswith("class_") for line in printed.splitlines()) == 10


def test_two_process_evaluation_equals_the_trainers_and_only_rank0_prints(run_dir, tmp_path):
    best, record = _logged(run_dir)
    out = tmp_path / "eval2.json"
    proc = ok(subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
         "ddp_resnet.evaluate", "--checkpoint", str(run_dir / "checkpoints/best.pt"), "--batch-size", "6",
         "--json", str(out)], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300))
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["count"] == 101
    assert result["top1"] == record["test_acc"]
    assert result["confusion"] == best["confusion"]
    assert proc.stdout.count("top-1 ") == 1 and "world 2 (torchrun" in proc.stdout


def test_exported_weights_and_flip_tta_evaluate_with_the_runs_config(run_dir, tmp_path):
    best, record = _logged(run_dir)
    weights = tmp_path / "weights.pt"
    export.export(str(run_dir / "checkpoints/best.pt"), str(weights))
    out = tmp_path / "plain.json"
    argv = ["--checkpoint", str(weights), "--config", str(run_dir / "config.yaml"), "--json", str(out)]
    assert evaluate.main(argv) == 0
    assert json.loads(out.read_text())["top1"] == record["test_acc"]
    assert evaluate.main(argv + ["--tta", "flip"]) == 0
    flipped = json.loads(out.read_text())
    assert flipped["tta"] == "flip" and flipped["count"] == 101 and 0 <= flipped["top1"] <= 100


@pytest.mark.parametrize("case", ["garbage", "missing", "wrong-model"])
def test_bad_checkpoint_is_one_line_and_exit_2(run_dir, tmp_path, capsys, case):
    path, extra = tmp_path / "bad.pt", []
    if case == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    elif case == "wrong-model":
        path, extra = run_dir / "checkpoints/best.pt", ["model.name=resnet32"]
    assert evaluate.main(["--checkpoint", str(path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
