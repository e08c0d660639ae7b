"""The benchmark suite (`python -m ddp_resnet.bench suite`) at --tiny sizes on the CPU: every item's figures in
suite.json and suite.md, skips when the budget runs out, --only, bad item names; and its parts (the profile's gap
analysis, the CIFAR converter, the seeds' plain loop). No timed assertions: CPU figures only have to exist.
"""
from __future__ import annotations

import io
import json
import math
import pickle
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, child_env, ok
from ddp_resnet import optim, plainloop, suite, suite_items
from ddp_resnet.config import OptimConfig
from ddp_resnet.data import cifar
from ddp_resnet.data import cifar_from_images as converter

SUITE = [sys.executable, "-m", "ddp_resnet.bench", "suite", "--device", "cpu", "--tiny"]
MACHINE_KEYS = {"cores", "torch", "torchvision", "cuda", "cudnn", "device", "python"}


def _suite(out, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*SUITE, "--out", str(out), *args], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=timeout, check=False)


def _doc(out) -> dict:
    return json.loads((out / "suite.json").read_text())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One full tiny run on the CPU, shared by the assertions below (about two minutes on 2 cores)."""
    out = tmp_path_factory.mktemp("suite")
    return out, ok(_suite(out))


# ----------------------------------------------------------------------------------------------- the full tiny run
@pytest.mark.slow
def test_tiny_suite_records_every_item_with_numbers(tiny_run):
    out, proc = tiny_run
    doc = _doc(out)
    assert [r["name"] for r in doc["items"]] == list(suite.NAMES)
    assert MACHINE_KEYS <= doc["suite"]["machine"].keys() and doc["suite"]["tiny"] is True
    for r in doc["items"]:
        assert r["status"] == "ok", r
        assert r["target"] == "n/a on CPU" and r["holds"] is None
        assert MACHINE_KEYS <= r["machine"].keys() and r["sizes"] == suite_items.TINY[r["name"]]
        assert math.isfinite(r["ours"]) and r["ours"] >= 0 and r["seconds"] > 0
        assert r.get("command") or r.get("commands")
        if r["name"] != "fast_recipe":
            assert r["peer"] > 0 and r["peer_name"] and r["ratio"] > 0
        assert f"suite: {r['name']} ok in" in proc.stdout
    items = {r["name"]: r for r in doc["items"]}
    one = items["resnet50_224"]
    for variant in ("eager", "compile"):
        v = one["variants"][variant]
        assert v["ratio"] == pytest.approx(v["ours"]["images_per_s"]["median"]
                                           / v["torchvision"]["images_per_s"]["median"])
        assert v["ours"]["tflops_per_device"] > 0 and v["ours"]["peak_memory_mib"] > 0
    assert one["variants"]["compile"]["ours"]["compile"] == "on" and one["ratio"] == one["variants"]["compile"]["ratio"]
    assert "--compile" in one["commands"][1] and "--compare-torchvision" in one["commands"][0]
    assert one["profile"]["table"] == "profile_resnet50.txt" and (out / one["profile"]["trace"]).is_file()
    assert "operators by self CPU time" in (out / "profile_resnet50.txt").read_text()
    assert items["resnet18_cifar_loader"]["loader_alone"]["images_per_s"]["median"] > 0
    assert "synthetic uint8" in items["resnet18_cifar_loader"]["data"]
    fast = items["fast_recipe"]
    assert fast["epochs"] == 2 and fast["train_s"] >= fast["train_s_without_first_epoch"] > 0
    assert (out / fast["metrics"]).is_file() and not (out / "fast_recipe" / "checkpoints").exists()
    seeds = items["seeds_pipeline_epoch"]
    assert len(seeds["ours_epoch_seconds"]) == len(seeds["plain_epoch_seconds"]) == 2
    assert seeds["ratio"] == pytest.approx(seeds["peer"] / seeds["ours"])
    decode = items["imagefolder_decode"]
    assert decode["faster"] in ("workers", "device") and "cores per GPU" in decode["advice"]
    assert set(decode["variants"]) == {"workers", "device"} and decode["tree"]["files"] == 56
    assert all(0 <= v["data_wait_share"] <= 1 for v in decode["variants"].values())


@pytest.mark.slow
def test_tiny_suite_markdown_has_a_row_and_a_section_per_item(tiny_run):
    out, _ = tiny_run
    text = (out / "suite.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "`" in line.split("|")[2]]
    assert [row.split("`")[1] for row in rows] == list(suite.NAMES)
    assert all("| n/a on CPU | n/a |" in row for row in rows)
    for n, name in enumerate(suite.NAMES, 1):
        assert f"## {n}. {name}: " in text
    assert "CPU only" in text and "5 ok" in text and "python -m ddp_resnet.bench --device cpu" in text
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries


# ----------------------------------------------------------------------------------------------- budget, --only, errors
def test_a_budget_too_small_for_the_last_item_skips_it_and_still_writes_both_files(tmp_path):
    first, last = "resnet18_cifar_loader", "seeds_pipeline_epoch"
    first_s, last_s = (suite.ESTIMATES_S[name]["tiny"] for name in (first, last))
    assert last_s > first_s + 4  # the budget below fits the first item, never the last
    budget = (first_s + last_s) / 2
    proc = ok(_suite(tmp_path, "--only", f"{first},{last}", "--budget-s", str(budget)))
    skip = [line for line in proc.stdout.splitlines() if line.startswith(f"suite: skipped {last}")]
    assert len(skip) == 1, proc.stdout
    assert re.fullmatch(rf"suite: skipped {last}: needs ~{last_s:.0f} s, \d+ s of the budget left", skip[0])
    doc = _doc(tmp_path)
    assert [(r["name"], r["status"]) for r in doc["items"]] == [(first, "ok"), (last, "skipped")]
    assert doc["items"][1]["reason"] == skip[0].split(": ", 2)[2] and "ours" not in doc["items"][1]
    text = (tmp_path / "suite.md").read_text()
    assert f"| `{last}` | skipped: needs ~{last_s:.0f} s" in text and "Skipped: needs ~" in text


def test_only_selects_items_in_priority_order(tmp_path):
    proc = ok(_suite(tmp_path, "--only", "seeds_pipeline_epoch,resnet50_224", "--budget-s", "0", timeout=120))
    doc = _doc(tmp_path)
    assert [r["name"] for r in doc["items"]] == ["resnet50_224", "seeds_pipeline_epoch"]
    assert doc["suite"]["selected"] == ["resnet50_224", "seeds_pipeline_epoch"]
    assert all(r["status"] == "skipped" for r in doc["items"]) and proc.stdout.count("suite: skipped ") == 2


@pytest.mark.parametrize("argv, message", [
    (["--only", "resnet50_224,resnet_nope"], "--only: unknown item 'resnet_nope'; valid choices: "
                                             + ", ".join(suite.NAMES)),
    (["--only", ","], "--only: no item named; valid choices: " + ", ".join(suite.NAMES)),
    (["--budget-s", "-1", "--tiny"], "--budget-s: must be >= 0, got -1"),
    (["--device", "cpu"], "the full sizes need a GPU; on the CPU add --tiny (toy sizes, the same code paths)"),
])
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    assert suite.main(["--out", str(out), "--device", "cpu", *argv]) == suite.EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.err == f"error: {message}\n" and captured.out == "" and not out.exists()


def test_the_bench_cli_refuses_a_bad_item_in_one_line(tmp_path):
    proc = ok(_suite(tmp_path / "x", "--only", "nope", timeout=120), code=2)
    assert proc.stderr.strip().splitlines() == [f"error: --only: unknown item 'nope'; valid choices: "
                                                f"{', '.join(suite.NAMES)}"]


# ----------------------------------------------------------------------------------------------- the parts
def test_kernel_gaps_measures_device_idle_time_between_kernels():
    events = [{"ph": "X", "cat": "kernel", "name": "a", "ts": 0, "dur": 10},
              {"ph": "X", "cat": "kernel", "name": "b", "ts": 5, "dur": 10},   # overlaps a: busy 0..15
              {"ph": "X", "cat": "gpu_memcpy", "name": "c", "ts": 40, "dur": 10},  # 25 us idle after b
              {"ph": "X", "cat": "cpu_op", "name": "host", "ts": 0, "dur": 100},  # not a device event
              {"ph": "X", "cat": "kernel", "name": "d", "ts": 52, "dur": 8}]  # 2 us after c
    gaps = suite_items.kernel_gaps(events)
    assert gaps["kernels"] == 4 and gaps["span_ms"] == pytest.approx(0.060)
    assert gaps["busy_ms"] == pytest.approx(0.033) and gaps["idle_share"] == pytest.approx(27 / 60)
    assert gaps["gaps_over_10us"] == 1 and gaps["largest_gaps"][0] == {"gap_us": 25, "after": "b"}
    assert gaps["top_kernels"][0]["name"] in ("a", "b", "c")
    assert suite_items.kernel_gaps([events[3]])["kernels"] == 0


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_cifar_from_images_writes_the_standard_batches_from_an_archive(tmp_path):
    rng = np.random.default_rng(0)
    expected = {}
    archive = tmp_path / "cifar-png.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for split, count in (("train", 12), ("test", 4)):
            for i in range(count):
                cls = converter.CIFAR10_CLASSES[i % 3]
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                expected[(split, f"{cls}_{i:04d}.png")] = (pixels, converter.CIFAR10_CLASSES.index(cls))
                data = _png(pixels)
                info = tarfile.TarInfo(f"cifar10/{split}/{cls}/{i:04d}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert converter.main([str(archive), str(tmp_path / "out")]) == 0
    folder = tmp_path / "out" / "cifar-10-batches-py"
    meta = pickle.loads((folder / "batches.meta").read_bytes())
    assert meta["label_names"] == list(converter.CIFAR10_CLASSES[:3])  # not the full set: sorted names
    for split, files in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        images, labels = cifar.read_cifar_split(tmp_path / "out", "cifar10", train=split == "train")
        names = [n for f in files for n in pickle.loads((folder / f).read_bytes())["filenames"]]
        assert len(names) == len(labels) == (12 if split == "train" else 4)
        for pixels, label, name in zip(images, labels, names):
            want_pixels, want_label = expected[(split, name)]
            assert np.array_equal(pixels, want_pixels) and label == meta["label_names"].index(
                converter.CIFAR10_CLASSES[want_label])
    assert converter.main([str(archive), str(tmp_path / "out")]) == 0  # complete already: kept


def test_cifar_from_images_refuses_a_tree_without_a_test_split(tmp_path, capsys):
    (tmp_path / "src" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "src" / "train" / "cat" / "0.png").write_bytes(_png(np.zeros((32, 32, 3), np.uint8)))
    assert converter.main([str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: SRC {tmp_path / 'src'}: no images under test/<class>/\n"
    assert not (tmp_path / "out" / "cifar-10-batches-py").exists()


def test_plain_loop_schedule_is_the_trainers():
    s = plainloop.PlainSettings(root="", lr=0.1, schedule="cosine", warmup_epochs=1.0, min_lr=0.001)
    ocfg = OptimConfig(lr=0.1, schedule="cosine", warmup_epochs=1.0, min_lr=0.001)
    for step in (0, 3, 10, 11, 50, 109, 110):
        assert plainloop.lr_factor(step, s, 110, 10) == pytest.approx(optim.lr_factor(step, ocfg, 110, 10))


def test_plain_loop_trains_on_a_copy_torchvision_refuses_and_logs_each_epoch(tmp_path, capsys):
    suite_items.write_tiny_cifar(tmp_path, per_batch=8, n_test=10)
    out = tmp_path / "plain.jsonl"
    assert plainloop.main(["--root", str(tmp_path), "--epochs", "2", "--batch", "8", "--workers", "0", "--device",
                           "cpu", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ddp_resnet.data.cifar arrays as PIL images (torchvision refused the copy" in text
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and all(r["images"] == 40 for r in records)
    assert all(0 <= r["test_acc"] <= 100 and r["epoch_time_s"] > 0 for r in records)
    assert records[-1]["lr"] == pytest.approx(0.0) and text.count("test_acc") == 2
