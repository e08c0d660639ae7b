"""`python -m ddp_resnet.data.prepare`: a resized, verified, resumable copy of an ImageFolder tree."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, child_env, ok
from ddp_resnet.config import DataConfig
from ddp_resnet.data import describe
from ddp_resnet.data.prepare import TMP_SUFFIX, main


def _tree(root: Path) -> None:
    """Large and small JPEGs, a PNG, a greyscale JPEG and a file that does not decode, in train/ and val/."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(folder / "big.jpg", quality=95)
            Image.fromarray(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)).save(folder / "small.jpg")
            Image.fromarray(rng.integers(0, 256, (70, 50, 3), dtype=np.uint8)).save(folder / "pic.png")
            Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(folder / "grey.JPEG")
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")


@pytest.fixture
def src(tmp_path) -> Path:
    root = tmp_path / "src"
    _tree(root)
    return root


def _sides(dst: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for path in sorted(dst.rglob("*")):
        if path.is_file():
            with Image.open(path) as img:
                img.load()
                out[str(path.relative_to(dst))] = img.size
    return out


def test_copy_is_resized_verified_and_reports_undecodable_sources(src, tmp_path, capsys):
    dst = tmp_path / "dst"
    assert main([str(src), str(dst), "--max-side", "48", "--quality", "85", "--workers", "2"]) == 0
    err = capsys.readouterr().err
    assert "prepare: 17 images" in err and "written 16, already done 0, failed 1" in err
    assert err.count("failed: ") == 1 and "broken.jpg" in err and "1 source image(s) could not be decoded" in err
    sides = _sides(dst)
    assert len(sides) == 16 and all(max(size) <= 48 for size in sides.values())
    assert sides["train/cat/big.jpg"] == (48, 36) and sides["val/dog/pic.png.jpg"] == (34, 48)
    assert (dst / "train/dog/small.jpg").read_bytes() == (src / "train/dog/small.jpg").read_bytes()  # copied as is
    assert not (dst / "train/cat/broken.jpg").exists()
    info = describe(DataConfig(dataset="imagefolder", root=str(dst)))  # an ImageFolder tree the trainer reads
    assert (info.train_size, info.test_size, info.class_names) == (8, 8, ["cat", "dog"])
    assert main([str(src), str(dst), "--max-side", "48", "--strict", "--workers", "1"]) == 1  # asked: non-zero


def test_a_rerun_skips_what_is_done_and_redoes_what_is_missing_or_damaged(src, tmp_path, capsys):
    dst = tmp_path / "dst"
    assert main([str(src), str(dst), "--max-side", "40", "--workers", "2"]) == 0
    stamps = {p: p.stat().st_mtime_ns for p in dst.rglob("*.jpg")}
    (dst / "val/cat/big.jpg").unlink()
    (dst / "train/dog/pic.png.jpg").write_bytes(b"truncated")
    stale = dst / "train/cat" / f".big.jpg.123{TMP_SUFFIX}"
    stale.write_bytes(b"half a file")
    capsys.readouterr()
    assert main([str(src), str(dst), "--max-side", "40", "--workers", "2"]) == 0
    err = capsys.readouterr().err
    assert "1 stale temporaries removed" in err and "written 2, already done 14, failed 1" in err
    assert not stale.exists()
    redone = {p for p in stamps if p.stat().st_mtime_ns != stamps[p]}
    assert redone == {dst / "train/dog/pic.png.jpg", dst / "val/cat/big.jpg"}  # the other 14 were left alone
    assert all(max(size) <= 40 for size in _sides(dst).values())
    assert not [p for p in dst.rglob("*") if p.name.endswith(TMP_SUFFIX)]


@pytest.mark.parametrize("argv, message", [
    (["{missing}", "{dst}", "--max-side", "64"], "no such directory"),
    (["{empty}", "{dst}", "--max-side", "64"], "need"),
    (["{src}", "{src}/copy", "--max-side", "64"], "overlap"),
    (["{src}", "{src}", "--max-side", "64"], "overlap"),
    (["{src}", "{dst}", "--max-side", "0"], "--max-side: must be > 0"),
    (["{src}", "{dst}", "--max-side", "64", "--quality", "101"], "--quality: must be in 1..100"),
    (["{src}", "{dst}", "--max-side", "64", "--workers", "0"], "--workers: must be > 0"),
    (["{src}", "{dst}"], "--max-side"),
    (["{src}", "{dst}", "--max-side", "big"], "invalid int value"),
])
def test_bad_arguments_are_one_line_and_exit_2_before_writing(src, tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    names = {"src": src, "dst": tmp_path / "dst", "missing": tmp_path / "missing", "empty": tmp_path / "empty"}
    assert main([a.format(**names) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err
    assert not (tmp_path / "dst").exists() and not (src / "copy").exists()


def test_the_module_runs_as_a_command_with_a_progress_line(src, tmp_path):
    dst = tmp_path / "dst"
    proc = ok(subprocess.run([sys.executable, "-m", "ddp_resnet.data.prepare", str(src), str(dst), "--max-side",
                              "64"], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120))
    last = proc.stderr.strip().splitlines()[-2]
    assert last.startswith("prepare: 17/17 images (100.0%)") and "failed 1" in last
    assert len([p for p in dst.rglob("*") if p.is_file()]) == 16
