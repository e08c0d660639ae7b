"""data.decode=device: JPEGs decoded in batches on the training device give the PIL path's images.

Run on the CPU (torchvision's decoder there is the same libjpeg as PIL's, so decoding is exact); the geometry
(crop boxes, resize sizes, center-crop offsets, flips) must match the PIL path exactly, and pixels may differ only
by torch's antialiased bilinear resize against PIL's (at most one level).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_bitwise_equal, metrics, ok, run_train, weights
from ddp_resnet import distributed
from ddp_resnet.config import DataConfig
from ddp_resnet.data import device_decode
from ddp_resnet.data.device_decode import DeviceDecoder, EncodedFolderEval, EncodedFolderTrain, collate_encoded
from ddp_resnet.data.imagefolder import scan_imagefolder
from ddp_resnet.data.loaders import (
    _FolderEvalDataset,
    _FolderTrainDataset,
    build_eval_loader,
    build_train_loader,
    describe,
)

CPU = torch.device("cpu")
BACKENDS = [pytest.param("torchvision"),
            pytest.param("torchcodec", marks=pytest.mark.skipif(device_decode.default_backend() != "torchcodec",
                                                                reason="torchcodec is not installed"))]


def _picture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Gradients (so a wrong flip or offset shows) plus noise."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 200 // w, yy * 200 // h, (xx + 2 * yy) * 60 // (w + h)], -1)
    return (base + rng.integers(0, 50, (h, w, 3))).astype(np.uint8)


def write_folder(root: Path, n_train: int = 4, n_val: int = 3) -> None:
    """JPEG (colour, greyscale, and one with an EXIF rotation tag) and PNG files of assorted sizes, including one
    whose shorter side is 24."""
    rng = np.random.default_rng(3)
    for split, count in (("train", n_train), ("val", n_val)):
        for c, cls in enumerate(("ant", "bee", "cat")):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                h, w = (24, 40) if i == 0 else (int(rng.integers(18, 60)), int(rng.integers(18, 60)))
                img = Image.fromarray(_picture(rng, h, w))
                exif = img.getexif()
                if (i + c) % 4 == 3 and c < 2:
                    exif[device_decode.EXIF_ORIENTATION] = 6  # "rotate 90": a phone photo taken upright
                if (i + c) % 4 == 1:
                    img.save(root / split / cls / f"{i}.png")
                else:
                    (img.convert("L") if (i + c) % 4 == 2 else img).save(root / split / cls / f"{i}.jpg", quality=80,
                                                                          exif=exif.tobytes())


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jpegs")
    write_folder(root)
    return root


def _device_batch(dataset, items, backend: str | None = None) -> torch.Tensor:
    images, _ = DeviceDecoder(CPU, dataset, backend)(collate_encoded([dataset[i] for i in items]))
    return images


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("augment", ["rrc_flip", "crop_flip", "flip", "none"])
def test_device_decoding_gives_the_pil_paths_images(folder, augment, backend):
    _, train, _ = scan_imagefolder(str(folder.resolve()))
    pil = _FolderTrainDataset(train, 24, augment, 4, seed=7)
    enc = EncodedFolderTrain(train, 24, augment, 4, seed=7)
    for epoch in (0, 3):
        items = [(i, epoch) for i in range(len(train))]
        ours = _device_batch(enc, items, backend)
        assert ours.shape == (len(train), 3, 24, 24) and ours.dtype == torch.uint8
        for i, item in enumerate(items):
            reference, label = pil[item]
            diff = (ours[i].int() - reference.int()).abs()
            assert diff.max() <= 1, (augment, item, int(diff.max()))
            assert enc[item][3] == label
        if augment == "rrc_flip":  # resize in every sample: differences are rare rounding ties
            assert (ours.int() - torch.stack([pil[item][0] for item in items]).int()).abs().float().mean() < 0.2
    flips = [row[6] for row in (enc[(i, 0)][2] for i in range(len(train)))]
    assert (0 < sum(flips) < len(flips)) if augment != "none" else sum(flips) == 0


def test_a_file_needing_no_resize_is_decoded_and_cropped_exactly(folder):
    _, train, _ = scan_imagefolder(str(folder.resolve()))
    index = next(i for i, (path, _) in enumerate(train) if path.endswith("0.jpg"))
    for augment in ("none", "crop_flip", "flip"):
        pil = _FolderTrainDataset(train, 24, augment, 4, seed=1)
        enc = EncodedFolderTrain(train, 24, augment, 4, seed=1)
        for epoch in range(4):
            assert torch.equal(_device_batch(enc, [(index, epoch)])[0], pil[(index, epoch)][0])


def test_evaluation_images_match_and_smaller_resizes_pad_like_torchvision(folder):
    _, _, evals = scan_imagefolder(str(folder.resolve()))
    for resize in (27, 20):  # 20 < 24: the center crop pads with zeros, as torchvision's does
        pil, enc = _FolderEvalDataset(evals, 24, resize), EncodedFolderEval(evals, 24, resize)
        ours = _device_batch(enc, list(range(len(evals))))
        for i in range(len(evals)):
            assert (ours[i].int() - pil[i][0].int()).abs().max() <= 1


def test_loaders_with_device_decoding_give_the_same_batches_and_an_exact_evaluation(folder):
    common = dict(dataset="imagefolder", root=str(folder), image_size=24, batch_size=4, workers=0)
    plain, device = DataConfig(**common), DataConfig(**common, decode="device")
    info = describe(plain)
    tolerance = 1.0 / 255 / min(info.std) + 1e-6  # one uint8 level after normalization
    for rank in range(2):
        a = build_train_loader(plain, info, rank, 2, CPU, seed=5)
        b = build_train_loader(device, info, rank, 2, CPU, seed=5)
        assert isinstance(b.to_device, DeviceDecoder) and not isinstance(a.to_device, DeviceDecoder)
        for loader in (a, b):
            loader.set_epoch(2)
        batches = list(zip(a, b, strict=True))
        assert len(batches) == 3
        for (xa, ya), (xb, yb) in batches:
            assert torch.equal(ya, yb) and xa.shape == xb.shape == (2, 3, 24, 24)
            assert (xa - xb).abs().max() <= tolerance
        eval_loader = build_eval_loader(device, info, rank, 2, CPU)
        assert isinstance(eval_loader.to_device, DeviceDecoder)
        evaluated = list(eval_loader)
        assert sum(x.shape[0] for x, _ in evaluated) == [5, 4][rank]  # 9 val images over 2 ranks, none twice


def test_a_batch_the_device_decoder_refuses_is_decoded_on_the_host(folder, monkeypatch):
    _, train, _ = scan_imagefolder(str(folder.resolve()))
    enc = EncodedFolderTrain(train, 24, "rrc_flip", 0, seed=2)
    items = [(i, 0) for i in range(len(train))]
    expected = _device_batch(enc, items, "torchvision")
    real, calls = device_decode.JPEG_BACKENDS["torchvision"], []

    def refuse_batches(data, **kwargs):
        calls.append(type(data).__name__)
        if isinstance(data, list):
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, **kwargs)

    monkeypatch.setitem(device_decode.JPEG_BACKENDS, "torchvision", refuse_batches)
    assert torch.equal(_device_batch(enc, items, "torchvision"), expected)
    assert calls[0] == "list" and calls.count("Tensor") == len(calls) - 1 > 0


def test_torchvisions_deprecation_warning_is_not_repeated_to_users(folder, recwarn):
    _, train, _ = scan_imagefolder(str(folder.resolve()))
    enc = EncodedFolderTrain(train, 24, "none", 0, seed=2)
    _device_batch(enc, [(0, 0), (1, 0)], "torchvision")
    assert not [w for w in recwarn if "TorchVision are deprecated" in str(w.message)]


def test_training_with_device_decoding_resumes_bitwise_and_bad_use_is_refused(folder, tmp_path):
    data = [f"data.root={folder}", "data.dataset=imagefolder", "data.image_size=24", "data.batch_size=4",
            "data.decode=device", "model.name=resnet20", "train.epochs=2", "data.workers=1"]
    whole, parts, scans = tmp_path / "whole", tmp_path / "parts", tmp_path / "scans.log"
    proc = ok(run_train(whole, *data, nproc=2, env={"DDP_RESNET_TEST_SCAN_LOG": str(scans)}))
    assert "on imagefolder (JPEG decoding on cpu, " in proc.stdout
    assert scans.read_text().split() == ["0"]  # one rank walked the tree, the other received its index
    ok(run_train(parts, *data, "train.run_steps=2", nproc=2))  # stops mid-epoch 0 (3 steps per epoch)
    ok(run_train(parts, *data, nproc=2))
    assert_bitwise_equal(weights(whole / "checkpoints/last.pt"), weights(parts / "checkpoints/last.pt"))
    assert metrics(whole)[-1]["test_count"] == 9
    bad = run_train(tmp_path / "bad", "data.decode=device")
    assert bad.returncode == 2
    line = next(line for line in bad.stderr.splitlines() if line.startswith("error: "))
    assert all(part in line for part in ("data.decode", "imagefolder", "not synthetic", "data.decode=workers"))
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("decode", ["workers", "device"])
def test_the_bench_times_imagefolder_training_with_either_decoder(folder, decode, capsys):
    from ddp_resnet import bench

    code = bench.main(["--device", "cpu", "--model", "resnet20", "--data", "imagefolder", "--root", str(folder),
                       "--decode", decode, "--res", "24", "--batch", "4", "--steps", "1", "--warmup", "1",
                       "--windows", "2", "data.workers=0"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"data=imagefolder loader=dataloader (decode {decode})" in out
    args = bench.build_parser().parse_args(["--device", "cpu", "--model", "resnet20", "--data", "imagefolder",
                                            "--root", str(folder), "--decode", decode, "--res", "24", "--batch", "4",
                                            "data.workers=0"])
    cfg, mode = bench.bench_config(args, 1)
    runner = bench.Runner("ours", cfg, describe(cfg.data), distributed.init("cpu"), mode, 10, note=lambda m: None)
    assert isinstance(runner.batches.loader.to_device, DeviceDecoder) == (decode == "device")
    assert re.search(r"^ours\s*: [\d.]+ images/s median", out, re.MULTILINE)
