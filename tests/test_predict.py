"""Prediction on image files agrees with the project's evaluation, image by image, on 1 and 2 processes."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, child_env, ok
from ddp_resnet import build, plots, predict
from ddp_resnet import checkpoint as ckpt
from ddp_resnet import config as config_mod
from ddp_resnet import data as data_mod
from ddp_resnet.models import build_model

CLASSES = ("ant", "bee", "cat")


# ------------------------------------------------------------------------------------------------ helpers
def write_tree(root: Path, classes=CLASSES, n_train: int = 1, n_val: int = 5, seed: int = 0) -> Path:
    """An ImageFolder tree: ``train/<class>/`` and ``val/<class>/`` with PNGs and JPEGs of assorted sizes, each
    class tinted by one colour channel."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        for c, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = int(rng.integers(24, 56)), int(rng.integers(24, 56))
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                pixels[..., c % 3] = 255 - pixels[..., c % 3] // 4
                image = Image.fromarray(pixels)
                if i % 2:
                    image.save(root / split / cls / f"{i}.jpg", quality=90)
                else:
                    image.save(root / split / cls / f"{i}.png")
    return root


def random_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters (as training would), so that a
    comparison covers them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                m.weight.copy_(1 + 0.2 * torch.randn(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
    return model


def save_checkpoint(path: Path, overrides: list[str], num_classes: int, class_names=None, ema: bool = False,
                    seed: int = 0) -> Path:
    """A checkpoint in the format training writes (model, ema, config, step, epoch), of a freshly built model."""
    cfg = config_mod.resolve(None, ["train.device=cpu", *overrides])
    info = data_mod.eval_info(cfg.data, num_classes, [str(i) for i in range(num_classes)])
    torch.manual_seed(seed)
    model = random_bn(build_model(cfg.model.name, num_classes=num_classes, stem=build.resolve_stem(cfg, info),
                                  blurpool=cfg.model.blurpool), seed)
    payload = {"model": model.state_dict(), "ema": None, "config": config_mod.to_dict(cfg), "step": 4, "epoch": 1,
               "steps_per_epoch": 4}
    if ema:
        payload["ema"] = random_bn(build_model(cfg.model.name, num_classes=num_classes,
                                               stem=build.resolve_stem(cfg, info)), seed + 1).state_dict()
    if class_names is not None:
        payload["class_names"] = list(class_names)
    ckpt.save(payload, path)
    return path


def folder_overrides(root: Path) -> list[str]:
    """A ResNet-20 trained on the tree at 32 px (resize 36, center crop 32)."""
    return ["model.name=resnet20", "data.dataset=imagefolder", f"data.root={root}", "data.image_size=32"]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def evil_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint whose pickle would create ``marker`` when loaded without weights_only."""

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": {}, "config": {}, "payload": Evil()}, path)
    return path


def reference(ckpt_path: Path, tta: bool = False) -> dict[str, tuple[int, torch.Tensor]]:
    """Per-image ``(top-1, probabilities)`` of the evaluation path: ``build.network_from_weights`` over the
    project's eval loader of the checkpoint's ImageFolder, keyed by real path."""
    payload = ckpt.load(ckpt_path)
    cfg = config_mod.resolve(None, ["data.workers=0", "data.eval_batch_size=4"], base=payload["config"])
    info = data_mod.describe(cfg.data)
    model = build.network_from_weights(cfg, info, payload["model"], ckpt_path, torch.device("cpu"))
    loader = data_mod.build_eval_loader(cfg.data, info, 0, 1, "cpu")
    probs = []
    with torch.no_grad():
        for images, _ in loader:
            p = model(images).softmax(1)
            if tta:
                p = (p + model(images.flip(3)).softmax(1)) / 2
            probs.append(p)
    probs = torch.cat(probs)
    paths = [os.path.realpath(p) for p, _ in info.index.evals]
    return {path: (int(p.argmax()), p) for path, p in zip(paths, probs)}


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_tree(tmp_path_factory.mktemp("predict") / "tree")


@pytest.fixture(scope="module")
def checkpoint(tree) -> Path:
    """No class names (like today's training checkpoints)."""
    return save_checkpoint(tree.parent / "plain.pt", folder_overrides(tree), len(CLASSES), ema=True)


@pytest.fixture(scope="module")
def named(tree) -> Path:
    return save_checkpoint(tree.parent / "named.pt", folder_overrides(tree), len(CLASSES), class_names=CLASSES)


# ------------------------------------------------------------------------------------------------ agreement
@pytest.mark.parametrize("workers,tta", [(0, "none"), (2, "none"), (0, "flip")])
def test_top1_of_every_file_equals_the_evaluation_paths(tree, checkpoint, tmp_path, capsys, workers, tta):
    out = tmp_path / "preds.csv"
    argv = ["--checkpoint", str(checkpoint), str(tree / "val"), "--workers", str(workers), "--batch", "4",
            "--topk", "3", "--out", str(out), "--tta", tta]
    assert predict.main(argv) == 0
    rows = read_csv(out)
    expected = reference(checkpoint, tta == "flip")
    assert len(rows) == len(expected) == 15
    for row in rows:
        top1, probs = expected[os.path.realpath(row["path"])]
        assert row["class_1"] == str(top1)  # indices: the checkpoint holds no class names
        assert float(row["prob_1"]) == pytest.approx(float(probs[top1]), abs=2e-6)
        assert float(row["prob_1"]) >= float(row["prob_2"]) >= float(row["prob_3"])
    captured = capsys.readouterr()
    assert "holds no class names; classes are shown as indices 0..2" in captured.err
    assert "predicted 15 images" in captured.out and "skipped" not in captured.out


@pytest.mark.slow
def test_two_ranks_under_torchrun_give_the_same_rows_in_the_same_order(tree, named, tmp_path):
    single, double = tmp_path / "one.csv", tmp_path / "two.jsonl"
    extra = [str(tree / "val" / "cat"), str(tree / "val"), "--workers", "0", "--batch", "2", "--topk", "2"]
    assert predict.main(["--checkpoint", str(named), *extra, "--out", str(single)]) == 0
    proc = ok(subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
         "ddp_resnet.predict", "--checkpoint", str(named), *extra, "--out", str(double)],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300))
    one = read_csv(single)
    two = [json.loads(line) for line in double.read_text().splitlines()]
    assert [r["path"] for r in one] == [r["path"] for r in two]
    assert [r["path"] for r in one][:5] == [str(tree / "val" / "cat" / f"{i}.{'jpg' if i % 2 else 'png'}")
                                            for i in range(5)]  # in input order; cat's files once
    assert len(one) == 15
    for a, b in zip(one, two):
        assert [a["class_1"], a["class_2"]] == [t["class"] for t in b["topk"]]
        assert float(a["prob_1"]) == pytest.approx(b["topk"][0]["prob"], abs=1e-5)
        assert (a["label"] or None) == b["label"]
    assert proc.stdout.count("predicted 15 images") == 1 and "2 processes" in proc.stdout


def test_class_names_labels_and_the_grid(tree, named, tmp_path, capsys):
    grid, out = tmp_path / "grid.png", tmp_path / "preds.jsonl"
    argv = ["--checkpoint", str(named), str(tree / "val"), "--workers", "0", "--out", str(out), "--grid", str(grid)]
    assert predict.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = reference(named)
    assert {r["label"] for r in rows} == set(CLASSES)
    for row in rows:
        assert row["label"] == Path(row["path"]).parent.name
        assert [t["class"] for t in row["topk"]][0] == CLASSES[expected[os.path.realpath(row["path"])][0]]
        assert len(row["topk"]) == 3 and sum(t["prob"] for t in row["topk"]) == pytest.approx(1, abs=1e-5)
    hits = sum(r["topk"][0]["class"] == r["label"] for r in rows)
    captured = capsys.readouterr()
    assert "holds no class names" not in captured.err
    assert f"top-1 is the folder's class for {hits}/15" in captured.out
    assert f"wrote {grid} (15 images)" in captured.out
    with Image.open(grid) as image:
        assert image.format == "PNG" and image.width > 300


def test_stdout_lines_ema_and_a_plain_weights_file_with_its_config(tree, checkpoint, tmp_path, capsys):
    image = tree / "val" / "bee" / "0.png"
    assert predict.main(["--checkpoint", str(checkpoint), str(image), "--ema", "--topk", "1"]) == 0
    ema_line = capsys.readouterr().out.splitlines()[0]
    payload = ckpt.load(checkpoint)
    ckpt.save(payload["ema"], tmp_path / "ema_weights.pt")  # what `export --ema` writes
    config_mod.save_yaml(config_mod.from_dict(payload["config"]), tmp_path / "config.yaml")
    argv = ["--checkpoint", str(tmp_path / "ema_weights.pt"), str(image), "--config", str(tmp_path / "config.yaml"),
            "--topk", "1"]
    assert predict.main(argv) == 0
    assert capsys.readouterr().out.splitlines()[0] == ema_line
    assert ema_line.startswith(f"{image}: ") and ema_line.endswith("%)")


# ------------------------------------------------------------------------------------------------ inputs
def test_folders_are_walked_once_skipping_hidden_files_and_ending_symlink_loops(tmp_path):
    root = tmp_path / "in"
    (root / "b" / "deep").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for name in ("b/2.png", "b/1.jpg", "b/deep/x.JPEG", "a.png", ".hidden/h.png", "._a.png", ".dot.png"):
        (root / name).write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    (root / "b" / "loop").symlink_to("..")  # a loop back to the root
    (root / "b" / "again.png").symlink_to(root / "a.png")  # the same file under another name
    files = predict.collect_images([str(root), str(root / "a.png"), str(root / "b" / "1.jpg")])
    assert files == [str(root / p) for p in ("a.png", "b/1.jpg", "b/2.png", "b/deep/x.JPEG")]
    assert predict.collect_images([str(root / ".dot.png")]) == [str(root / ".dot.png")]  # named: taken


def test_corrupt_images_are_named_skipped_and_counted(tree, named, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = tree / "val" / "ant" / "1.jpg"
    (folder / "good.jpg").write_bytes(good.read_bytes())
    (folder / "truncated.jpg").write_bytes(good.read_bytes()[:200])
    (folder / "random.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    out = tmp_path / "p.csv"
    assert predict.main(["--checkpoint", str(named), str(folder), "--workers", "0", "--out", str(out)]) == 0
    assert [r["path"] for r in read_csv(out)] == [str(folder / "good.jpg")]
    captured = capsys.readouterr()
    skipped = [line for line in captured.err.splitlines() if line.startswith("warning: skipped")]
    assert len(skipped) == 2
    assert skipped[0].startswith(f"warning: skipped {folder / 'random.jpg'}: UnidentifiedImageError")
    assert skipped[1].startswith(f"warning: skipped {folder / 'truncated.jpg'}: OSError")
    assert "predicted 1 images" in captured.out and "skipped 2 of 3 files that could not be decoded" in captured.out
    bad_only = ["--checkpoint", str(named), str(folder / "random.jpg"), str(folder / "truncated.jpg"),
                "--workers", "0", "--out", str(tmp_path / "none.csv")]
    assert predict.main(bad_only) == predict.NOTHING_DECODED == 66
    assert not (tmp_path / "none.csv").exists()
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: none of the 2 files could be decoded; " \
                                                               "nothing written"


def test_a_checkpoint_whose_pickle_would_run_code_is_refused(tree, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = evil_checkpoint(tmp_path / "evil.pt", marker)
    assert predict.main(["--checkpoint", str(evil), str(tree / "val"), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "refused" in err
    assert not marker.exists()


@pytest.mark.parametrize("case", ["topk", "out", "missing", "no-checkpoint", "empty", "grid-no-matplotlib"])
def test_bad_arguments_exit_2_with_one_line(tree, named, tmp_path, capsys, monkeypatch, case):
    argv = ["--checkpoint", str(named), str(tree / "val")]
    if case == "topk":
        argv += ["--topk", "0"]
    elif case == "out":
        argv += ["--out", str(tmp_path / "p.txt")]
    elif case == "missing":
        argv = ["--checkpoint", str(named), str(tmp_path / "nothing-here")]
    elif case == "no-checkpoint":
        argv = [str(tree / "val")]
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        argv = ["--checkpoint", str(named), str(tmp_path / "empty")]
    else:
        def missing():
            raise plots.MissingMatplotlib(plots.PLOTS_HINT)

        monkeypatch.setattr(plots, "require_matplotlib", missing)
        argv += ["--grid", str(tmp_path / "g.png")]
    assert predict.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    if case == "grid-no-matplotlib":
        assert 'pip install "ddp_resnet[plots]"' in err


def test_a_long_input_prints_progress_lines(capsys):
    progress = predict.Progress(100, every_s=0.0)
    progress(40)
    progress(100)  # the end is the summary's, not a progress line
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("predict: 40/100 images (")
