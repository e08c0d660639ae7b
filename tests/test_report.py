"""Run reports: figures of the expected size from a tiny run, per-class numbers, summary.md, no-matplotlib exit."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import REPO, child_env, metrics, ok, run_train
from ddp_resnet import plots, report


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    ok(run_train(out, "train.epochs=3"))
    return out


def _size(path):
    with Image.open(path) as image:
        image.verify()  # a complete, valid PNG
    with Image.open(path) as image:
        return image.format, image.size


def test_report_command_writes_valid_figures_tables_and_summary(run_dir):
    proc = ok(subprocess.run([sys.executable, "-m", "ddp_resnet.report", str(run_dir), "--images", "12"], cwd=REPO,
                             env=child_env(), capture_output=True, text=True, timeout=300))
    out = run_dir / "report"
    assert str(out) in proc.stdout
    best = json.loads((run_dir / "best_eval.json").read_text())
    classes = len(best["class_names"])
    expected = {
        "training.png": plots.size_px(*report.TRAINING_FIGSIZE),
        "confusion.png": plots.size_px(*report.CONFUSION_FIGSIZE),
        "per_class.png": plots.size_px(*report.table_figsize(classes + 3)),  # classes, 2 averages, accuracy
        "predictions.png": plots.size_px(*report.grid_figsize(12)),
    }
    assert expected["training.png"] == (1200, 800) and expected["predictions.png"] == (1200, 350)
    for name, size in expected.items():
        assert _size(out / name) == ("PNG", size), name

    table = (out / "per_class.txt").read_text().splitlines()
    assert table[0].split() == ["class", "precision", "recall", "F1", "support"]
    assert sum(line.startswith("class_") for line in table) == classes
    assert sum(int(line.split()[-1]) for line in table if line.startswith("class_")) == best["count"] == 64

    records = metrics(run_dir)
    last = records[-1]
    summary = (out / "summary.md").read_text()
    assert "resnet20 on synthetic: 3 epochs, 12 optimizer steps" in summary
    assert f"| best test accuracy | {best['test_acc']:.2f}% (epoch {best['epoch'] + 1} of 3) |" in summary
    assert f"| final train-test gap | {last['train_acc'] - last['test_acc']:+.2f} points" in summary
    total = sum(r["epoch_time_s"] for r in records)
    assert f"| total training time | {report.format_duration(total)} " in summary
    for name in expected:
        assert f"]({name})" in summary


def test_training_figure_takes_train_curves_from_steps_jsonl(run_dir, tmp_path):
    records = metrics(run_dir)  # 3 epochs of 4 steps
    steps = [{"step": s, "epoch": (s - 1) // 4, "images": 32 * s, "loss": 2.3 - s / 10, "acc": 10.0 + 3 * s,
              "lr": 0.1, "img_per_s": 500.0, "data_wait": 0.2, "grad_norm": None, "time": 1.7e9 + s}
             for s in range(1, 13)]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    intervals = plots.interval_points(tmp_path, records)
    assert [p["epoch"] for p in intervals] == [k / 4 for k in range(1, 13)]  # step within its epoch
    assert [p["error"] for p in intervals] == [90.0 - 3 * s for s in range(1, 13)]
    assert plots.train_points(tmp_path, records) == intervals
    assert plots.interval_points(run_dir / "no such dir", records) == []
    assert plots.train_points(run_dir / "no such dir", records) == plots.epoch_points(records)
    (tmp_path / "steps.jsonl").write_text(json.dumps(steps[-1]) + "\n")  # train.log_every longer than an epoch
    assert plots.train_points(tmp_path, records) == plots.epoch_points(records)
    path = report.plot_training(records, 2, tmp_path / "training.png", intervals)
    assert _size(path) == ("PNG", plots.size_px(*report.TRAINING_FIGSIZE))


def test_missing_matplotlib_prints_one_line_and_exits_2(run_dir, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert report.main([str(run_dir), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install "ddp_resnet[plots]"' in err
    assert not (tmp_path / "r").exists()


def test_unusable_run_directory_is_one_line_exit_2(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "metrics.jsonl" in err


def test_per_class_metrics_from_a_known_confusion_matrix():
    # rows: true class, cols: predicted. Class 2 is never predicted.
    m = report.per_class_metrics([[3, 1, 0], [0, 2, 0], [1, 1, 0]])
    precision = [c["precision"] for c in m["classes"]]
    recall = [c["recall"] for c in m["classes"]]
    assert precision == pytest.approx([75.0, 50.0, 0.0])
    assert recall == pytest.approx([75.0, 100.0, 0.0])
    assert m["classes"][1]["f1"] == pytest.approx(2 * 50 * 100 / 150)
    assert [c["support"] for c in m["classes"]] == [4, 2, 2]
    assert m["accuracy"] == pytest.approx(62.5)
    assert m["macro"]["recall"] == pytest.approx(175 / 3)
    assert m["weighted"]["recall"] == pytest.approx(62.5)  # weighted recall is the accuracy


def test_unnormalize_inverts_the_loaders_normalization():
    from ddp_resnet.data import CIFAR10_MEAN, CIFAR10_STD
    from ddp_resnet.data.transforms import Normalizer

    raw = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    shown = report.unnormalize(Normalizer(CIFAR10_MEAN, CIFAR10_STD)(raw), CIFAR10_MEAN, CIFAR10_STD)
    assert shown.shape == (2, 5, 5, 3)
    torch.testing.assert_close(shown, raw.permute(0, 2, 3, 1).float() / 255, atol=1e-5, rtol=0)


def test_prediction_grid_takes_the_classes_in_turn():
    from ddp_resnet.report import _spread_over_classes

    items = [(None, label, label) for label in [0] * 5 + [1] * 5 + [2] * 2]
    assert [y for _, y, _ in _spread_over_classes(items, 7)] == [0, 1, 2, 0, 1, 2, 0]
    assert len(_spread_over_classes(items, 50)) == 12
