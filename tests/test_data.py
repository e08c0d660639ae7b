"""Tests for ddp_resnet.data: datasets, sharding, exact resume, augmentation, mixup/cutmix (CPU only, small data)."""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_same_batches, epoch_batches
from ddp_resnet.config import ConfigError, DataConfig
from ddp_resnet.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    DataInfo,
    DataLoaderTrainLoader,
    GPUTrainLoader,
    build_eval_loader,
    build_train_loader,
    cifar,
    describe,
    loaders,
    mix_batch,
    resolve_loader,
    shard_range,
    synthetic,
)
from ddp_resnet.data.transforms import (
    crop_flip,
    crop_flip_one,
    crop_flip_params,
    crop_flip_params_one,
    sample_key,
    sample_keys,
)

SYN = DataConfig(
    dataset="synthetic",
    synthetic_train_size=96,
    synthetic_test_size=101,
    synthetic_classes=4,
    synthetic_image_size=8,
    batch_size=16,
    workers=0,
    crop_padding=2,
    augment="none",
)
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------- helpers
def _decode(images: torch.Tensor, info: DataInfo) -> torch.Tensor:
    """Undo normalization: float batch -> uint8 NCHW."""
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return ((images * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)


def _index_of(cfg: DataConfig, info: DataInfo) -> dict[bytes, int]:
    images, _ = loaders._tensor_split(cfg, info, train=True)
    table = {images[i].permute(2, 0, 1).contiguous().numpy().tobytes(): i for i in range(images.shape[0])}
    assert len(table) == images.shape[0], "synthetic images should be unique"
    return table


def _ids(batch: torch.Tensor, info: DataInfo, table: dict[bytes, int]) -> list[int]:
    raw = _decode(batch, info)
    return [table[raw[i].contiguous().numpy().tobytes()] for i in range(raw.shape[0])]


def _write_cifar(root: Path, name: str = "cifar10", per_batch: int = 6, n_test: int = 7, seed: int = 0) -> dict:
    """Fake CIFAR batch files in the standard python layout; returns the raw arrays written."""
    spec = cifar.SPECS[name]
    folder = root / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = 10 if name == "cifar10" else 100
    raw = {}
    files = [(f, per_batch) for f in spec.train_files] + [(f, n_test) for f in spec.test_files]
    for fname, count in files:
        data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, classes, count)]
        with open(folder / fname, "wb") as fh:
            pickle.dump({"data": data, spec.label_key: labels, "batch_label": fname}, fh)
        raw[fname] = (data, labels)
    names = [f"name{i}" for i in range(classes)]
    with open(folder / spec.meta_file, "wb") as fh:
        pickle.dump({spec.names_key: names}, fh)
    raw["names"] = names
    return raw


def _write_imagefolder(root: Path, classes=("cat", "ant", "bee"), n_train=3, n_val=2) -> None:
    rng = np.random.default_rng(1)
    for split, count in (("train", n_train), ("val", n_val)):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                h, w = int(rng.integers(20, 40)), int(rng.integers(20, 40))
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")


# ----------------------------------------------------------------------------------------------- describe
def test_describe_synthetic_defaults():
    info = describe(SYN)
    assert (info.num_classes, info.train_size, info.test_size, info.image_size) == (4, 96, 101, 8)
    assert info.mean == (0.5, 0.5, 0.5) and info.std == (0.5, 0.5, 0.5)
    assert describe(DataConfig()).augment == "crop_flip"
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.num_classes = 3


def test_synthetic_is_fast_deterministic_and_learnable():
    start = time.perf_counter()
    tx, ty, vx, vy = synthetic.make_synthetic(2048, 512, 10, 32)
    assert time.perf_counter() - start < 1.0
    assert tx.shape == (2048, 32, 32, 3) and tx.dtype == np.uint8 and np.bincount(ty).min() == 204
    again = synthetic.make_synthetic(2048, 512, 10, 32)
    assert np.array_equal(tx, again[0]) and np.array_equal(vy, again[3])
    assert not np.array_equal(tx[:512], vx)  # different noise for the test split
    # a nearest-class-mean classifier fitted on train generalises to test
    centroids = np.stack([tx[ty == k].reshape(-1, 32 * 32 * 3).mean(0) for k in range(10)])
    dist = ((vx.reshape(len(vx), -1)[:, None, :].astype(np.float32) - centroids[None]) ** 2).sum(-1)
    assert (dist.argmin(1) == vy).mean() > 0.9


def test_cifar10_reader_labels_and_normalization(tmp_path):
    raw = _write_cifar(tmp_path)
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path), batch_size=4, workers=0)
    info = describe(cfg)
    assert (info.num_classes, info.train_size, info.test_size, info.image_size) == (10, 30, 7, 32)
    assert info.class_names == raw["names"] and info.augment == "crop_flip"
    assert (info.mean, info.std) == (CIFAR10_MEAN, CIFAR10_STD)
    images, labels = cifar.read_cifar_split(tmp_path, "cifar10", train=True)
    data, batch_labels = raw["data_batch_2"]
    assert images.shape == (30, 32, 32, 3) and labels.dtype == np.int64
    assert labels[6:12].tolist() == batch_labels
    chw = data.reshape(-1, 3, 32, 32)
    assert np.array_equal(images[6 + 1, 5, 7], chw[1, :, 5, 7])  # pixel (y=5, x=7), all channels
    # eval batches: the test split, normalized with the CIFAR-10 statistics
    test_data, test_labels = raw["test_batch"]
    x, y = next(iter(build_eval_loader(cfg, info, 0, 1, CPU)))
    mean, std = torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(CIFAR10_STD).view(3, 1, 1)
    expected = (torch.from_numpy(test_data[:2].reshape(-1, 3, 32, 32)).float() / 255 - mean) / std
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    torch.testing.assert_close(x[:2], expected, rtol=1e-5, atol=1e-5)
    assert y.tolist() == test_labels[: len(y)]


def test_cifar100_reader(tmp_path):
    raw = _write_cifar(tmp_path, "cifar100", per_batch=9, n_test=5)
    info = describe(DataConfig(dataset="cifar100", root=str(tmp_path)))
    assert (info.num_classes, info.train_size, info.test_size) == (100, 9, 5)
    assert (info.mean, info.std) == (CIFAR100_MEAN, CIFAR100_STD)
    assert cifar.read_cifar_split(tmp_path, "cifar100", train=True)[1].tolist() == raw["train"][1]


def test_missing_data_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError) as err:
        describe(DataConfig(dataset="cifar10", root=str(tmp_path)))
    assert str(err.value) == (
        f"data.root: no CIFAR-10 found at {tmp_path}/cifar-10-batches-py"
        " (set data.download=true or point data.root at it)"
    )
    _write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(ConfigError, match="no CIFAR-10 found"):
        describe(DataConfig(dataset="cifar10", root=str(tmp_path)))
    for dataset in ("cifar100", "imagefolder"):
        with pytest.raises(ConfigError) as err:
            describe(DataConfig(dataset=dataset, root=str(tmp_path / "nothing")))
        assert "\n" not in str(err.value) and str(err.value).startswith("data.root: ")


def test_download_refuses_checksum_mismatch_then_extracts(tmp_path, monkeypatch):
    _write_cifar(tmp_path / "src")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setitem(cifar.URLS, "cifar10", archive.as_uri())
    root = tmp_path / "dl"
    cfg = DataConfig(dataset="cifar10", root=str(root), download=True)
    with pytest.raises(ConfigError, match="checksum mismatch") as err:
        describe(cfg)
    assert "\n" not in str(err.value)
    assert not (root / "cifar-10-batches-py").exists() and list(root.iterdir()) == []  # nothing kept
    real_md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(cifar.SPECS, "cifar10", dataclasses.replace(cifar.SPECS["cifar10"], md5=real_md5))
    info = describe(cfg)
    assert (info.train_size, info.test_size) == (30, 7)
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_loader_choice_and_validation():
    info = describe(SYN)
    assert resolve_loader(SYN, info, "cuda") == "gpu"
    assert resolve_loader(SYN, info, "cpu") == "dataloader"
    rrc = dataclasses.replace(SYN, augment="rrc_flip")
    assert resolve_loader(rrc, describe(rrc), "cuda") == "dataloader"
    with pytest.raises(ConfigError, match="data.augment"):
        describe(dataclasses.replace(rrc, loader="gpu"))
    with pytest.raises(ConfigError, match="data.loader"):
        describe(DataConfig(dataset="imagefolder", loader="gpu"))
    with pytest.raises(ConfigError, match="data.batch_size"):
        build_train_loader(SYN, info, 0, 2, CPU, 0, micro_batch=64)


# ----------------------------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("mode", ["dataloader", "gpu"])
@pytest.mark.parametrize("world", [2, 3])
def test_rank_shards_partition_each_epoch_and_match_single_process(mode, world):
    cfg = dataclasses.replace(SYN, loader=mode)
    info = describe(cfg)
    table = _index_of(cfg, info)
    micro = 8
    ranks = [build_train_loader(cfg, info, r, world, CPU, seed=3, micro_batch=micro) for r in range(world)]
    single = build_train_loader(cfg, info, 0, 1, CPU, seed=3, micro_batch=micro * world)
    assert len({len(loader) for loader in ranks}) == 1 and len(ranks[0]) == len(single) == 96 // (micro * world)
    orders = []
    for epoch in (0, 1):
        per_rank = [[(_ids(x, info, table), y) for x, y in epoch_batches(loader, epoch)] for loader in ranks]
        order = [i for batches in per_rank for ids, _ in batches for i in ids]
        assert sorted(order) == list(range(96))  # 96 is a multiple of every global batch: full cover, no overlap
        _, all_labels = loaders._tensor_split(cfg, info, train=True)
        for batches in per_rank:
            for ids, labels in batches:
                assert labels.tolist() == all_labels[ids].tolist()
        for i, (x, _) in enumerate(epoch_batches(single, epoch)):
            union = {j for r in range(world) for j in per_rank[r][i][0]}
            assert union == set(_ids(x, info, table))
        orders.append([ids for ids, _ in per_rank[0]])
    assert orders[0] != orders[1]


@pytest.mark.parametrize("mode", ["dataloader", "gpu"])
def test_eval_is_exact_on_two_ranks(mode):
    cfg = dataclasses.replace(SYN, loader=mode, eval_batch_size=20)
    info = describe(cfg)
    seen, labels = [], []
    for rank in range(2):
        loader = build_eval_loader(cfg, info, rank, 2, CPU)
        count = 0
        for x, y in loader:
            assert x.shape[0] <= 10 and x.shape[1:] == (3, 8, 8)
            seen.append(_decode(x, info))
            labels.append(y)
            count += x.shape[0]
        assert count == loader.num_samples == (51, 50)[rank]
    images = torch.cat(seen)
    _, _, test_images, test_labels = synthetic.make_synthetic(96, 101, 4, 8)
    assert torch.equal(images, torch.from_numpy(test_images).permute(0, 3, 1, 2))  # each once, in order
    assert torch.cat(labels).tolist() == test_labels.tolist()
    assert [shard_range(101, r, 3) for r in range(3)] == [(0, 34), (34, 68), (68, 101)]


# ----------------------------------------------------------------------------------------------- exact resume
def test_resume_mid_epoch_is_exact_and_independent_of_workers():
    cfg = dataclasses.replace(SYN, augment="crop_flip", batch_size=8)
    info = describe(cfg)
    runs = {}
    for name, mode, workers in (("gpu", "gpu", 0), ("dl0", "dataloader", 0), ("dl2", "dataloader", 2)):
        c = dataclasses.replace(cfg, loader=mode, workers=workers)
        loader = build_train_loader(c, info, 1, 2, CPU, seed=7)
        assert isinstance(loader, GPUTrainLoader if mode == "gpu" else DataLoaderTrainLoader)
        full = epoch_batches(loader, 2)
        assert len(full) == len(loader) == 12
        for k in (0, 5, 11, 12):
            assert_same_batches(epoch_batches(loader, 2, k), full[k:])
        assert_same_batches(list(loader), epoch_batches(loader, 2))  # start_batch applies to one iteration only
        runs[name] = full
        runs[name + "_e3"] = epoch_batches(loader, 3)
        fresh = build_train_loader(c, info, 1, 2, CPU, seed=7)  # a resumed run's very first iteration
        assert_same_batches(epoch_batches(fresh, 2, 5), full[5:])
    assert_same_batches(runs["dl0"], runs["dl2"])
    assert_same_batches(runs["gpu"], runs["dl0"])  # both paths yield bit-identical batches
    assert_same_batches(runs["gpu_e3"], runs["dl2_e3"])
    assert not torch.equal(runs["gpu"][0][0], runs["gpu_e3"][0][0])


def test_channels_last_and_micro_batch():
    cfg = dataclasses.replace(SYN, augment="crop_flip")
    info = describe(cfg)
    for mode in ("dataloader", "gpu"):
        c = dataclasses.replace(cfg, loader=mode)
        plain = next(iter(build_train_loader(c, info, 0, 2, CPU, 0, micro_batch=4)))[0]
        cl = next(iter(build_train_loader(c, info, 0, 2, CPU, 0, micro_batch=4, channels_last=True)))[0]
        assert plain.shape == (4, 3, 8, 8) and plain.is_contiguous()
        assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(plain, cl)
        ev = next(iter(build_eval_loader(c, info, 0, 2, CPU, channels_last=True)))[0]
        assert ev.is_contiguous(memory_format=torch.channels_last)
    # a training size other than the native one: the in-memory data is resized once, both paths agree
    big = dataclasses.replace(cfg, image_size=12)
    info = describe(big)
    outs = [
        epoch_batches(build_train_loader(dataclasses.replace(big, loader=m), info, 0, 1, CPU, 0), 0)
        for m in ("gpu", "dataloader")
    ]
    assert outs[0][0][0].shape == (16, 3, 12, 12)
    assert_same_batches(outs[0], outs[1])
    assert next(iter(build_eval_loader(big, info, 0, 1, CPU)))[0].shape[1:] == (3, 12, 12)


# ----------------------------------------------------------------------------------------------- augmentation
def _position_image(side: int) -> torch.Tensor:
    """One 1 x side x side x 3 uint8 image whose every pixel encodes its position (value 1 + y*side + x)."""
    pos = (1 + torch.arange(side * side)).view(side, side).to(torch.uint8)
    return pos[None, :, :, None].expand(1, side, side, 3).contiguous()


def _read_augmentation(batch: torch.Tensor, side: int, pad: int):
    """Recover (dy, dx, flip) per sample from crops of ``_position_image`` (the centre is always inside)."""
    v = batch[:, 0].long()
    c = pad  # row/col `pad` of the output always maps inside the image
    a, b = v[:, c, c] - 1, v[:, c, c + 1] - 1
    flip = b < a
    y, x = a // side, a % side
    dy = y + pad - c
    dx = torch.where(flip, x + pad - (side - 1 - c), x + pad - c)
    return dy, dx, flip


def _check_distribution(dy, dx, flip, pad):
    n = dy.numel()
    assert dy.min() >= 0 and dx.min() >= 0 and dy.max() <= 2 * pad and dx.max() <= 2 * pad
    counts = torch.bincount(dy * (2 * pad + 1) + dx, minlength=(2 * pad + 1) ** 2).float()
    expected = n / (2 * pad + 1) ** 2
    assert ((counts - expected) ** 2 / expected).sum() < 60  # chi^2, 24 dof: p ~ 1e-4
    assert abs(flip.float().mean().item() - 0.5) < 0.04
    for f in (False, True):  # flips independent of offsets
        assert abs(dx[flip == f].float().mean().item() - pad) < 0.15


def test_crop_flip_distribution_both_paths():
    side, pad, n = 8, 2, 3000
    base = _position_image(side).expand(n, side, side, 3)
    labels = torch.zeros(n, dtype=torch.int64)
    gpu = GPUTrainLoader(
        base, labels, n, 0, 1, seed=11, augment="crop_flip", padding=pad, mean=(0, 0, 0), std=(1 / 255,) * 3
    )
    x = next(iter(gpu)).__getitem__(0).round().to(torch.uint8)
    dy, dx, flip = _read_augmentation(x, side, pad)
    _check_distribution(dy, dx, flip, pad)
    # exact content: zero padding where the crop leaves the image, the mirrored crop otherwise
    padded = torch.nn.functional.pad(base[:1, :, :, 0], (pad, pad, pad, pad))[0]
    for i in range(0, n, 97):
        ref = padded[dy[i] : dy[i] + side, dx[i] : dx[i] + side]
        assert torch.equal(x[i, 1], ref.flip(-1) if flip[i] else ref)
    # the DataLoader path draws the same per-sample augmentation (hence the same distribution)
    dataset = loaders._TensorTrainDataset(base, labels, "crop_flip", pad, seed=11)
    cfg = DataConfig(workers=0)
    info = DataInfo(1, ["x"], side, (0.0,) * 3, (1 / 255,) * 3, n, 0, "crop_flip")
    dl = DataLoaderTrainLoader(dataset, cfg, info, 0, 1, CPU, 11, batch_size=n)
    y = next(iter(dl))[0].round().to(torch.uint8)
    assert torch.equal(x, y)
    # and a different seed gives a different (but equally distributed) draw
    dy2, dx2, flip2 = crop_flip_params(12, 0, np.arange(n), 2 * pad)
    _check_distribution(dy2, dx2, flip2, pad)
    assert not torch.equal(dy2, crop_flip_params(11, 0, np.arange(n), 2 * pad)[0])


@pytest.mark.parametrize("height,size,pad", [(6, 6, 2), (6, 4, 1), (5, 7, 3), (4, 4, 0)])
def test_crop_flip_matches_naive_reference(height, size, pad):
    gen = torch.Generator().manual_seed(height * size + pad)
    images = torch.randint(1, 256, (5, height, height, 3), dtype=torch.uint8, generator=gen)
    index = [4, 0, 2, 2, 1, 3, 0, 1]
    max_offset = height + 2 * pad - size
    dy, dx, flip = crop_flip_params(0, 0, np.arange(len(index)), max_offset)
    out = crop_flip(images, torch.tensor(index), dy, dx, flip, size, pad)
    for b, i in enumerate(index):
        padded = torch.nn.functional.pad(images[i].permute(2, 0, 1), (pad, pad, pad, pad))
        ref = padded[:, dy[b] : dy[b] + size, dx[b] : dx[b] + size]
        ref = ref.flip(-1) if flip[b] else ref
        assert torch.equal(out[b], ref)
        one = crop_flip_one(images[i].numpy(), int(dy[b]), int(dx[b]), bool(flip[b]), size, pad)
        assert torch.equal(torch.from_numpy(one.transpose(2, 0, 1).copy()), ref)
    for b in range(len(index)):  # every offset combination is exercised over the whole test
        assert crop_flip_params_one(0, 0, b, max_offset) == (int(dy[b]), int(dx[b]), bool(flip[b]))


def test_scalar_and_vectorized_sample_keys_agree():
    indices = np.array([0, 1, 2, 49999, 2**40 + 3])
    for seed, epoch in ((0, 0), (123, 7), (-5, 2**33), (2**63 + 11, 1)):
        keys = sample_keys(seed, epoch, indices)
        assert [sample_key(seed, epoch, int(i)) for i in indices] == [int(k) for k in keys]
        assert len(set(keys.tolist())) == len(indices)
        dy, dx, flip = crop_flip_params(seed, epoch, indices, 8)
        assert [crop_flip_params_one(seed, epoch, int(i), 8) for i in indices] == list(
            zip(dy.tolist(), dx.tolist(), flip.tolist())
        )


def test_start_batch_skips_without_loading(monkeypatch):
    cfg = dataclasses.replace(SYN, augment="crop_flip", loader="dataloader", batch_size=8)
    info = describe(cfg)
    loads = []
    original = loaders._TensorTrainDataset.__getitem__

    def counting(self, item):
        loads.append(item)
        return original(self, item)

    monkeypatch.setattr(loaders._TensorTrainDataset, "__getitem__", counting)
    loader = build_train_loader(cfg, info, 0, 2, CPU, seed=0)
    assert len(epoch_batches(loader, 4, 9)) == 3 and len(loads) == 3 * 4
    assert {epoch for _, epoch in loads} == {4}


# ----------------------------------------------------------------------------------------------- imagefolder
@pytest.mark.parametrize("augment", ["auto", "crop_flip"])
def test_imagefolder_describe_train_eval(tmp_path, augment):
    _write_imagefolder(tmp_path)
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16, batch_size=4, workers=0, augment=augment)
    info = describe(cfg)
    assert info.class_names == ["ant", "bee", "cat"] and info.num_classes == 3
    resolved = "rrc_flip" if augment == "auto" else augment
    assert (info.train_size, info.test_size, info.augment, info.mean) == (9, 6, resolved, IMAGENET_MEAN)
    assert describe(DataConfig(dataset="imagefolder", root=str(tmp_path))).image_size == 224
    loader = build_train_loader(cfg, info, 0, 2, CPU, seed=0)
    assert len(loader) == 2
    full = epoch_batches(loader, 1)
    assert full[0][0].shape == (2, 3, 16, 16) and full[0][1].dtype == torch.int64
    assert_same_batches(epoch_batches(loader, 1, 1), full[1:])
    assert_same_batches(epoch_batches(loader, 1), full)
    counts = []
    for rank in range(2):
        ev = build_eval_loader(cfg, info, rank, 2, CPU)
        batches = list(ev)
        assert all(x.shape[1:] == (3, 16, 16) for x, _ in batches)
        counts.append(sum(x.shape[0] for x, _ in batches))
        assert counts[-1] == ev.num_samples
    assert counts == [3, 3]


# ----------------------------------------------------------------------------------------------- mixup / cutmix
def test_mix_batch_targets_and_determinism():
    images = torch.randn(6, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    assert mix_batch(images, labels, 5, 0.0, 0.0, torch.Generator()) == (images, None)
    outs = [mix_batch(images, labels, 5, 0.4, 1.0, torch.Generator().manual_seed(5), 0.1) for _ in range(2)]
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    torch.testing.assert_close(outs[0][1].sum(1), torch.ones(6))
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        mixed, targets = mix_batch(images, labels, 5, 0.4, 1.0, gen, label_smoothing=0.1)
        torch.testing.assert_close(targets.sum(1), torch.ones(6))
        assert targets.min() >= 0.1 / 5 - 1e-6
    mixed, targets = mix_batch(images, labels, 5, 1.0, 0.0, torch.Generator().manual_seed(2))
    lam = targets[1, 1].item()
    torch.testing.assert_close(mixed, images * lam + images.flip(0) * (1 - lam))


def test_cutmix_lam_matches_box_area():
    n, side = 4, 16
    images = (torch.arange(n, dtype=torch.float32) + 1).view(n, 1, 1, 1).expand(n, 3, side, side).contiguous()
    labels = torch.arange(n)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        mixed, targets = mix_batch(images, labels, n, 0.0, 1.0, gen)
        kept = (mixed == images).float().mean(dim=(1, 2, 3))
        torch.testing.assert_close(targets[torch.arange(n), labels], kept)
        torch.testing.assert_close(targets[torch.arange(n), labels.flip(0)], 1 - kept)
        assert torch.equal(images[:, 0, 0, 0], torch.arange(n, dtype=torch.float32) + 1)  # input untouched
