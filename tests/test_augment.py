"""Augmentations, repeated augmentation and progressive resizing: keyed by (seed, epoch, index), equal on both loader
paths where both implement them, exact on resume (loader level here, whole training runs at the end)."""
from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from conftest import REPO, assert_bitwise_equal, assert_same_batches, epoch_batches, metrics, ok, run_train, weights
from ddp_resnet import build, config
from ddp_resnet.config import ConfigError, DataConfig
from ddp_resnet.data import (
    DataLoaderTrainLoader,
    GPUTrainLoader,
    augment,
    build_eval_loader,
    build_train_loader,
    describe,
    loaders,
    resolve_loader,
)
from ddp_resnet.data.samplers import RepeatedAugSampler
from ddp_resnet.data.schedule import ResolutionSchedule, resolution_schedule
from ddp_resnet.data.transforms import sample_keys

CPU = torch.device("cpu")
SYN = DataConfig(dataset="synthetic", synthetic_train_size=96, synthetic_test_size=20, synthetic_classes=4,
                 synthetic_image_size=8, batch_size=16, workers=0, crop_padding=2, augment="crop_flip")
# Each DataLoader-path transform alone (probabilities at 1 where there is one, so every sample is touched).
TRANSFORMS = {
    "trivialaugment": {"auto_augment": "trivialaugment"},
    "randaugment": {"auto_augment": "randaugment", "randaugment_ops": 2, "randaugment_magnitude": 15},
    "autoaugment": {"auto_augment": "autoaugment", "autoaugment_policy": "cifar10"},
    "random_erasing": {"random_erasing": 1.0},
    "cutout": {"cutout": 4},
    "color_jitter": {"color_jitter": 0.5},
    "rotate_scale": {"rotate_degrees": 30.0, "scale_jitter": 0.2},
}


def _differs(a, b) -> bool:
    return any(not torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a, b))


# ------------------------------------------------------------------------------------------ per-sample transforms
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_each_transform_is_keyed_by_seed_epoch_index_and_resumes_exactly(name):
    cfg = dataclasses.replace(SYN, **TRANSFORMS[name])
    info = describe(cfg)
    loader = build_train_loader(cfg, info, 1, 2, CPU, seed=7)
    plain = build_train_loader(SYN, info, 1, 2, CPU, seed=7)
    torch.manual_seed(11)
    plain_batches = epoch_batches(plain, 2)
    after_plain = torch.get_rng_state()
    torch.manual_seed(11)
    full = epoch_batches(loader, 2)
    assert torch.equal(torch.get_rng_state(), after_plain)  # the v2 transforms' draws leave torch's generator alone
    assert len(full) == 6 and full[0][0].shape == (8, 3, 8, 8)
    assert _differs(plain_batches, full)  # the transform does something (same order, crops and flips)
    assert_same_batches(epoch_batches(loader, 2), full)  # a pure function of (seed, epoch, index)
    fresh = build_train_loader(cfg, info, 1, 2, CPU, seed=7)  # a resumed run's first iteration
    assert_same_batches(epoch_batches(fresh, 2, 1), full[1:])
    workers = build_train_loader(dataclasses.replace(cfg, workers=2), info, 1, 2, CPU, seed=7)
    assert_same_batches(epoch_batches(workers, 2), full)  # independent of the worker processes


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_repeats_of_an_image_are_augmented_differently(name):
    cfg = dataclasses.replace(SYN, augment="none", **TRANSFORMS[name])
    dataset = loaders._train_dataset(cfg, describe(cfg), CPU, 3, None)[0]
    first = [dataset[(i, 1, 0)][0] for i in range(12)]
    assert all(torch.equal(a, dataset[(i, 1)][0]) for i, a in enumerate(first))  # repeat 0 is the plain key
    second = [dataset[(i, 1, 1)][0] for i in range(12)]
    assert sum(not torch.equal(a, b) for a, b in zip(first, second)) >= 6


def test_color_jitter_is_torchvisions_uint8_arithmetic():
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        h, w = (int(v) for v in torch.randint(3, 40, (2,), generator=gen))
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen)
        keys = sample_keys(5, trial, [trial])
        b, c, s = augment.jitter_factors(keys, 0.8)[0]
        expected = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(image, b), c), s)
        ratios, _ = augment.batch_params(keys, 0.8, 0, h, w)
        assert torch.equal(augment.color_jitter(image[None], ratios)[0], expected)
    factors = augment.jitter_factors(sample_keys(0, 0, np.arange(4000)), 0.4)
    assert factors.min() >= 0.6 and factors.max() <= 1.4 and abs(factors.mean() - 1) < 0.01


def test_cutout_fills_a_clipped_square_with_the_mean_colour():
    keys = sample_keys(1, 0, np.arange(500))
    boxes = augment.cutout_boxes(keys, 10, 12, 4)
    heights, widths = boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2]
    assert heights.max() == widths.max() == 4 and heights.min() >= 2 and widths.min() >= 2  # clipped at the border
    assert (boxes[:, 0] == 0).any() and (boxes[:, 1] == 10).any()
    images = torch.zeros(500, 3, 10, 12, dtype=torch.uint8)
    fill = torch.tensor(augment.mean_fill((0.5, 0.25, 1.0)), dtype=torch.uint8)
    out = augment.cutout(images, torch.from_numpy(boxes), fill)
    assert fill.tolist() == [128, 64, 255]
    assert torch.equal((out[:, 0] > 0).sum((1, 2)), torch.from_numpy(heights * widths))
    assert torch.equal(out[:, :, 0, 0].unique(dim=0), torch.tensor([[0, 0, 0], [128, 64, 255]], dtype=torch.uint8))


# ------------------------------------------------------------------------------------------ device-resident loader
@pytest.mark.parametrize("extra", [{"cutout": 4}, {"color_jitter": 0.5}, {"cutout": 3, "color_jitter": 0.3}],
                         ids=["cutout", "color_jitter", "both"])
def test_device_loader_cutout_and_jitter_are_the_workers_bytes(extra):
    cfg = dataclasses.replace(SYN, batch_size=8, **extra)
    info = describe(cfg)
    device = build_train_loader(dataclasses.replace(cfg, loader="gpu"), info, 1, 2, CPU, seed=5)
    workers = build_train_loader(dataclasses.replace(cfg, loader="dataloader", workers=2), info, 1, 2, CPU, seed=5)
    assert isinstance(device, GPUTrainLoader) and isinstance(workers, DataLoaderTrainLoader)
    full = epoch_batches(device, 1)
    assert_same_batches(full, epoch_batches(workers, 1))  # bitwise: the same functions and per-sample parameters
    assert_same_batches(epoch_batches(device, 1), full)
    fresh = build_train_loader(dataclasses.replace(cfg, loader="gpu"), info, 1, 2, CPU, seed=5)
    assert_same_batches(epoch_batches(fresh, 1, 4), full[4:])
    plain = build_train_loader(dataclasses.replace(SYN, batch_size=8, loader="gpu"), info, 1, 2, CPU, seed=5)
    assert _differs(epoch_batches(plain, 1), full)


@pytest.mark.parametrize("extra", [{"auto_augment": "trivialaugment"}, {"random_erasing": 0.1},
                                   {"rotate_degrees": 5.0}, {"repeated_aug": 2}, {"augment": "rrc_flip"}])
def test_device_loader_refuses_what_it_cannot_do_and_auto_says_so(extra, capsys):
    cfg = dataclasses.replace(SYN, **extra)
    with pytest.raises(ConfigError) as err:
        describe(dataclasses.replace(cfg, loader="gpu"))
    message = str(err.value)
    assert "\n" not in message
    assert "use data.loader=dataloader or auto" in message or "valid choices: none, flip, crop_flip" in message
    info = describe(cfg)
    assert resolve_loader(cfg, info, "cuda") == "dataloader"
    loaders._note_loader_choice(cfg, info, torch.device("cuda"), rank=0)
    note = capsys.readouterr().out.strip()
    assert note.startswith("note: data.loader=auto uses DataLoader workers") and len(note.splitlines()) == 1
    loaders._note_loader_choice(cfg, info, torch.device("cuda"), rank=1)
    assert capsys.readouterr().out == ""  # rank 0 only
    supported = dataclasses.replace(SYN, cutout=4, color_jitter=0.2)
    assert resolve_loader(supported, describe(supported), "cuda") == "gpu"


# ------------------------------------------------------------------------------------------ repeated augmentation
def test_repeated_augmentation_shows_each_image_k_times_across_ranks_and_covers_all_in_k_epochs():
    n, world, k = 48, 2, 2
    samplers = [RepeatedAugSampler(n, world, rank, k, seed=3) for rank in range(world)]
    cycle: Counter = Counter()
    for epoch in range(2 * k):
        per_rank = []
        for sampler in samplers:
            sampler.set_epoch(epoch)
            per_rank.append(list(sampler))
        assert [len(p) for p in per_rank] == [n // world] * world  # the epoch keeps its length on every rank
        counts = Counter(i for p in per_rank for i, _ in p)
        assert set(counts.values()) == {k} and len(counts) == n // k
        for image in counts:  # the k copies: on different ranks, repeat indices 0..k-1
            holders = [(r, rep) for r, p in enumerate(per_rank) for i, rep in p if i == image]
            assert sorted(r for r, _ in holders) == list(range(k)) and sorted(rep for _, rep in holders) == [0, 1]
        if epoch < k:
            cycle.update(counts)
    assert cycle == Counter({i: k for i in range(n)})  # every image k times over a cycle of k epochs
    assert samplers[0].epoch_images(k) != samplers[0].epoch_images(0)  # the next cycle draws a new permutation


def test_repeated_augmentation_loader_keeps_the_epoch_and_resumes_exactly():
    cfg = dataclasses.replace(SYN, repeated_aug=3, batch_size=8, color_jitter=0.3)
    info = describe(cfg)
    for rank in range(2):
        loader = build_train_loader(cfg, info, rank, 2, CPU, seed=2)
        assert isinstance(loader.sampler, RepeatedAugSampler) and len(loader) == 96 // 8
        full = epoch_batches(loader, 4)
        assert_same_batches(epoch_batches(build_train_loader(cfg, info, rank, 2, CPU, seed=2), 4, 7), full[7:])
        items = [item for batch in iter(loader.batch_sampler) for item in batch]
        assert {len(item) for item in items} == {3} and {item[2] for item in items} == {0, 1, 2}


# ------------------------------------------------------------------------------------------ progressive resizing
FFCV_RAMPS = {16: (11, 13), 24: (17, 20), 32: (23, 27), 40: (29, 34), 88: (65, 76)}  # rn50_configs start/end_ramp


def _ffcv_resolution(epoch: int, start_ramp: int, end_ramp: int, min_res: int = 160, max_res: int = 192) -> int:
    """FFCV's train_imagenet.py get_resolution."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    return int(np.round(np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])[0] / 32)) * 32


@pytest.mark.parametrize("epochs", sorted(FFCV_RAMPS))
def test_fast_recipe_resolution_schedule_is_ffcvs_at_every_length(epochs):
    cfg = config.load(REPO / "configs/imagenet_resnet50_fast.yaml", [f"train.epochs={epochs}"])
    info = loaders.DataInfo(1000, [], 192, (0.5,) * 3, (0.5,) * 3, 1_281_167, 50_000, "rrc_flip")
    schedule = loaders.train_schedule(cfg.data, build.run_length(cfg, info, 8)[1])
    assert schedule.epochs == epochs
    assert [schedule.size(e) for e in range(epochs)] == [_ffcv_resolution(e, *FFCV_RAMPS[epochs])
                                                         for e in range(epochs)]
    assert schedule.sizes() == [160, 192]


def test_schedule_interpolates_in_multiples_of_the_step_and_follows_max_steps():
    schedule = ResolutionSchedule(64, 256, 0.2, 0.8, 32, 10)
    assert [schedule.size(e) for e in range(10)] == [64, 64, 96, 128, 160, 192, 224, 256, 256, 256]
    assert schedule.sizes() == [64, 96, 128, 160, 192, 224, 256]
    cfg = config.load(None, ["data.augment=rrc_flip", "data.res_start=8", "data.res_end=16", "data.res_step=8",
                             "train.max_steps=30", "data.batch_size=16", "data.synthetic_train_size=64"])
    info = describe(cfg.data)
    assert build.run_length(cfg, info, 2) == (30, 8)  # 30 steps of 4 per epoch: 8 epochs
    assert loaders.train_schedule(cfg.data, 8).epochs == 8
    with pytest.raises(ValueError, match="run length"):
        resolution_schedule(dataclasses.replace(cfg.data), 0)


def _progressive(extra: list[str]) -> tuple[DataConfig, loaders.DataInfo]:
    cfg = config.load(None, ["data.dataset=synthetic", "data.synthetic_train_size=96", "data.synthetic_test_size=20",
                             "data.synthetic_image_size=16", "data.batch_size=16", "data.workers=0",
                             "data.augment=rrc_flip", "data.res_start=8", "data.res_end=16", "data.res_step=4",
                             "data.res_ramp_start=0.25", "data.res_ramp_end=0.75", "train.epochs=4", *extra])
    return cfg.data, describe(cfg.data)


def test_loader_trains_at_the_scheduled_side_resumes_at_it_and_evaluates_at_its_own():
    data, info = _progressive(["data.eval_size=12"])
    schedule = loaders.train_schedule(data, 4)
    assert [schedule.size(e) for e in range(4)] == [8, 12, 16, 16]
    loader = build_train_loader(data, info, 1, 2, CPU, seed=4, total_epochs=4)
    for epoch in range(4):
        full = epoch_batches(loader, epoch)
        assert {tuple(x.shape[-2:]) for x, _ in full} == {(schedule.size(epoch),) * 2}
        resumed = build_train_loader(data, info, 1, 2, CPU, seed=4, total_epochs=4)  # a resumed process
        assert_same_batches(epoch_batches(resumed, epoch, 4), full[4:])
    evals = list(build_eval_loader(data, info, 0, 2, CPU))
    assert {tuple(x.shape[-2:]) for x, _ in evals} == {(12, 12)} and sum(len(y) for _, y in evals) == 10
    with pytest.raises(ConfigError, match="data.loader: gpu"):
        describe(dataclasses.replace(data, loader="gpu", augment="crop_flip"))
    with pytest.raises(ConfigError, match="needs data.augment=rrc_flip"):
        _progressive(["data.augment=crop_flip"])
    with pytest.raises(ConfigError, match="multiple of data.res_step"):
        _progressive(["data.res_end=18"])


def _write_images(root: Path) -> None:
    """A small ImageFolder tree: JPEGs and PNGs of assorted sizes."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                h, w = (int(v) for v in rng.integers(20, 48, 2))
                image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                image.save(root / split / cls / (f"{i}.jpg" if i % 2 else f"{i}.png"))


@pytest.mark.parametrize("decode", ["workers", "device"])
def test_imagefolder_progressive_resizing_on_both_decoders(tmp_path, decode):
    _write_images(tmp_path)
    cfg = config.load(None, ["data.dataset=imagefolder", f"data.root={tmp_path}", "data.image_size=16",
                             "data.res_start=8", "data.res_end=16", "data.res_step=8", "data.res_ramp_start=0.5",
                             "data.res_ramp_end=0.5", "data.batch_size=4", "data.workers=0", f"data.decode={decode}",
                             "data.eval_size=12", "train.epochs=2"]).data
    info = describe(cfg)
    loader = build_train_loader(cfg, info, 0, 2, CPU, seed=1, total_epochs=2)
    first, second = epoch_batches(loader, 0), epoch_batches(loader, 1)
    assert first[0][0].shape[-1] == 8 and second[0][0].shape[-1] == 16
    resumed = build_train_loader(cfg, info, 0, 2, CPU, seed=1, total_epochs=2)
    assert_same_batches(epoch_batches(resumed, 1, 1), second[1:])
    with pytest.raises(ValueError, match="needs the run length"):
        build_train_loader(cfg, info, 0, 2, CPU, seed=1)
    assert next(iter(build_eval_loader(cfg, info, 0, 1, CPU)))[0].shape[-2:] == (12, 12)


# ------------------------------------------------------------------------------------------ torch.compile
class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean((2, 3)))


def _count_graphs(opts: dict, sizes: list[int]) -> int:
    import torch._dynamo

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(len(example_inputs))
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(_Net(), backend=backend, **opts)
    for size in sizes + sizes[::-1]:  # every side twice, in both orders
        compiled(torch.randn(2, 3, size, size))
    torch._dynamo.reset()
    return len(graphs)


def test_compile_specializes_once_per_scheduled_side(monkeypatch):
    import torch._dynamo

    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    monkeypatch.setattr(torch._dynamo.config, limit, 8)
    cfg = config.load(None, ["data.augment=rrc_flip", "data.res_start=8", "data.res_end=88", "data.res_step=8",
                             "data.res_ramp_start=0", "data.res_ramp_end=1", "train.epochs=20", "train.compile=true"])
    sizes = loaders.train_schedule(cfg.data, 20).sizes()
    assert sizes == list(range(16, 96, 8))  # 10 sides: more than dynamo's default limit
    assert build.compile_options(config.load(None, []), 20) == {}  # default: unchanged
    assert _count_graphs({}, sizes[:3]) < 3  # torch's default: a dynamic-shape graph after the first change
    opts = build.compile_options(cfg, 20)
    assert opts == {"dynamic": False} and getattr(torch._dynamo.config, limit) >= len(sizes)
    assert _count_graphs(opts, sizes) == len(sizes)  # one static graph per side, none recompiled
    monkeypatch.setattr(torch._dynamo.config, limit, 8)
    assert _count_graphs(opts, sizes) == 8  # why the limit is raised: past it dynamo runs the rest eagerly


# ------------------------------------------------------------------------------------------ whole runs
TIPS = ["data.augment=crop_flip", "data.auto_augment=trivialaugment", "data.random_erasing=0.5", "data.cutout=6",
        "data.color_jitter=0.4", "data.rotate_degrees=10", "data.scale_jitter=0.1", "data.repeated_aug=2",
        "model.head_dropout=0.2", "optim.schedule=cyclic", "optim.cycle_period=1"]


def _resumed_equals_whole(tmp_path: Path, common: list[str], stop: int, nproc: int) -> Path:
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    ok(run_train(whole, *common, nproc=nproc))
    assert f"reached at step {stop}" in ok(run_train(parts, *common, f"train.run_steps={stop}", nproc=nproc)).stdout
    assert f"resumed from {parts / 'checkpoints' / 'last.pt'}: step {stop}" in ok(
        run_train(parts, *common, nproc=nproc)).stdout
    assert_bitwise_equal(weights(whole / "checkpoints/last.pt"), weights(parts / "checkpoints/last.pt"))
    return whole


def test_every_dataloader_tip_resumes_bitwise_on_two_processes(tmp_path):
    _resumed_equals_whole(tmp_path, [*TIPS, "data.loader=dataloader", "data.workers=1"], stop=3, nproc=2)


def test_device_loader_with_cutout_and_jitter_resumes_bitwise(tmp_path):
    _resumed_equals_whole(tmp_path, ["data.loader=gpu", "data.cutout=6", "data.color_jitter=0.4",
                                     "data.mixup_alpha=0.2"], stop=5, nproc=1)


def test_progressive_resizing_with_blurpool_resumes_bitwise_and_evaluates_its_checkpoint(tmp_path):
    from ddp_resnet import evaluate

    common = ["data.augment=rrc_flip", "data.res_start=8", "data.res_end=16", "data.res_step=8",
              "data.res_ramp_start=0.5", "data.res_ramp_end=0.5", "train.epochs=4", "model.blurpool=true",
              "model.name=resnet20"]
    whole = _resumed_equals_whole(tmp_path, common, stop=9, nproc=2)  # resumes in epoch 2, the first at 16 px
    record = metrics(whole)[-1]
    out = tmp_path / "eval.json"
    assert evaluate.main(["--checkpoint", str(whole / "checkpoints/last.pt"), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["top1"] == record["test_acc"]
