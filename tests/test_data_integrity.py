"""Trust nothing a user hands over: CIFAR pickles never run code and are checked, a bad image does not end a run
(it is replaced deterministically and reported), ImageFolder walks are robust, 16-bit images are scaled, and
``python -m ddp_resnet.data.prepare`` neither overwrites one source with another nor hides undecodable files."""
from __future__ import annotations

import dataclasses
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_bitwise_equal, assert_same_batches, epoch_batches, metrics, ok, run_train, weights
from ddp_resnet.config import ConfigError, DataConfig
from ddp_resnet.data import build_eval_loader, build_train_loader, cifar, describe, imagefolder
from ddp_resnet.data.device_decode import read_encoded
from ddp_resnet.data.imagefolder import FolderIndex, load_rgb, scan_imagefolder
from ddp_resnet.data.loaders import _FolderTrainDataset
from ddp_resnet.data.prepare import main as prepare_main

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------- CIFAR pickles
class _Py2Pickler(pickle._Pickler):
    """Writes as Python 2's cPickle wrote the official CIFAR batches: protocol 2, str and bytes as BINSTRING."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_string(self, obj) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_string
    dispatch[bytes] = save_py2_string


def _py2_dumps(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")  # numpy 1's name


def _dump(obj, style: str) -> bytes:
    """A pickle as CIFAR files come: official (Python 2), Python 3 protocol 2 with bytes keys, protocol 4 or 5."""
    if style == "py2":
        return _py2_dumps(obj)
    if style == "py3-bytes-keys":
        return pickle.dumps({k.encode(): v for k, v in obj.items()}, protocol=2)
    return pickle.dumps(obj, protocol=int(style[-1]))


def write_cifar(root: Path, style: str = "protocol4", per_batch: int = 4, n_test: int = 3) -> dict:
    """Fake CIFAR-10 in the standard layout; returns the arrays written."""
    spec = cifar.SPECS["cifar10"]
    folder = root / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    raw = {}
    for fname, count in [(f, per_batch) for f in spec.train_files] + [(f, n_test) for f in spec.test_files]:
        data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, count)]
        (folder / fname).write_bytes(_dump({"batch_label": fname, "labels": labels, "data": data}, style))
        raw[fname] = (data, labels)
    names = [f"name{i}" for i in range(10)]
    (folder / spec.meta_file).write_bytes(_dump({"label_names": names, "num_vis": 3072}, style))
    raw["names"] = names
    return raw


def _cifar_cfg(root: Path) -> DataConfig:
    return DataConfig(dataset="cifar10", root=str(root), batch_size=4, workers=0)


def _one_line_error(cfg: DataConfig, *parts: str) -> str:
    with pytest.raises(ConfigError) as err:
        describe(cfg)
    message = str(err.value)
    assert "\n" not in message and message.startswith("data.root: "), message
    assert all(part in message for part in parts), (parts, message)
    return message


@pytest.mark.parametrize("style", ["py2", "py3-bytes-keys", "protocol2", "protocol4", "protocol5"])
def test_cifar_files_as_they_are_written_read_through_the_restricted_unpickler(tmp_path, style):
    raw = write_cifar(tmp_path, style)
    if style == "py2":
        head = (tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes()[:200]
        assert b"cnumpy.core.multiarray\n_reconstruct" in head and pickle.SHORT_BINSTRING + b"\x04data" in head
    info = describe(_cifar_cfg(tmp_path))
    assert (info.train_size, info.test_size, info.class_names) == (20, 3, raw["names"])
    images, labels = cifar.read_cifar_split(tmp_path, "cifar10", train=True)
    data, batch_labels = raw["data_batch_3"]
    assert np.array_equal(images[8:12], data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert labels[8:12].tolist() == batch_labels and labels.dtype == np.int64


class _Hostile:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("fname, protocol", [("data_batch_2", 2), ("batches.meta", 4), ("test_batch", 5)])
def test_a_cifar_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, fname, protocol):
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    path = tmp_path / "cifar-10-batches-py" / fname
    key = "label_names" if fname == "batches.meta" else "batch_label"
    payload = pickle.loads(path.read_bytes())
    payload[key] = _Hostile(marker)
    path.write_bytes(pickle.dumps(payload, protocol=protocol))
    _one_line_error(_cifar_cfg(tmp_path), str(path), "exec", "refused")
    assert not marker.exists()


def test_the_trainer_refuses_a_hostile_cifar_file_in_one_line_with_exit_2(tmp_path):
    write_cifar(tmp_path / "data", per_batch=8, n_test=8)
    marker = tmp_path / "pwned"
    path = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_4"
    path.write_bytes(pickle.dumps({"data": _Hostile(marker)}, protocol=2))
    proc = run_train(tmp_path / "run", "data.dataset=cifar10", f"data.root={tmp_path / 'data'}", "data.batch_size=4")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert str(path) in errors[0] and "exec" in errors[0] and "Traceback" not in proc.stderr
    assert not marker.exists() and not (tmp_path / "run").exists()


def _rewrite(path: Path, change) -> None:
    payload = pickle.loads(path.read_bytes())
    change(payload)
    path.write_bytes(pickle.dumps(payload, protocol=4))


@pytest.mark.parametrize("damage, parts", [
    ("truncated", ["truncated or corrupt"]),
    ("garbage", ["truncated or corrupt"]),
    ("short_rows", ["uint8 array of shape N x 3072", "(4, 3000)"]),
    ("int64", ["uint8 array of shape N x 3072", "int64"]),
    ("no_data", ["no 'data' entry"]),
    ("few_labels", ["3 labels for 4 images"]),
    ("label_10", ["label 10 (image 2) is outside [0, 10)"]),
    ("label_minus_1", ["label -1 (image 0) is outside [0, 10)"]),
    ("string_labels", ["'labels' must be a list of integer labels"]),
    ("a_list", ["holds a list, not the dict"]),
])
def test_damaged_cifar_batches_are_one_line_naming_the_file(tmp_path, damage, parts):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    good = path.read_bytes()
    changes = {
        "short_rows": lambda p: p.update(data=p["data"][:, :3000]),
        "int64": lambda p: p.update(data=p["data"].astype(np.int64)),
        "no_data": lambda p: p.pop("data"),
        "few_labels": lambda p: p.update(labels=p["labels"][:3]),
        "label_10": lambda p: p["labels"].__setitem__(2, 10),
        "label_minus_1": lambda p: p["labels"].__setitem__(0, -1),
        "string_labels": lambda p: p.update(labels=["cat"] * 4),
    }
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(4000))
    elif damage == "a_list":
        path.write_bytes(pickle.dumps([1, 2, 3]))
    else:
        _rewrite(path, changes[damage])
    _one_line_error(_cifar_cfg(tmp_path), str(path), *parts)


def test_a_meta_file_with_fewer_classes_than_the_labels_is_refused(tmp_path):
    write_cifar(tmp_path)
    meta = tmp_path / "cifar-10-batches-py" / "batches.meta"
    _rewrite(meta, lambda p: p.update(label_names=p["label_names"][:5]))
    _one_line_error(_cifar_cfg(tmp_path), "is outside [0, 5)", "names 5 classes")


# ----------------------------------------------------------------------------------------------- bad images
def _picture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 200 // w, yy * 200 // h, (xx + 2 * yy) * 60 // (w + h)], -1)
    return (base + rng.integers(0, 50, (h, w, 3))).astype(np.uint8)


def _jpeg_bytes(rng: np.random.Generator, h: int = 30, w: int = 36) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_picture(rng, h, w)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def corrupt_middle(good: bytes) -> bytes:
    """A JPEG whose header parses and whose bytes end with the end-of-image marker, but whose scan data is broken
    (a second start-of-image marker in it): the workers' quick checks pass it, no decoder decodes it."""
    bad = good[: len(good) // 2] + b"\xff\xd8" + good[len(good) // 2 + 2 :]
    with Image.open(io.BytesIO(bad)) as img:
        assert img.size and bad.endswith(b"\xff\xd9")
        with pytest.raises(OSError):
            img.load()
    return bad


BAD = {"train/ant/1.jpg": "truncated", "train/ant/2.jpg": "random", "train/cat/3.jpg": "corrupt",
       "val/bee/1.jpg": "random"}


def write_tree(root: Path, n_train: int = 4, n_val: int = 2) -> None:
    """3 classes of JPEGs (and a PNG per class), with the files of ``BAD`` damaged: a truncated JPEG and a
    random-bytes .jpg next to each other (one substitute skips the other), and, as the last training sample (its
    substitute wraps around to index 0), a JPEG that only fails when its scan data is decoded."""
    rng = np.random.default_rng(5)
    for split, count in (("train", n_train), ("val", n_val)):
        for cls in ("ant", "bee", "cat"):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                h, w = int(rng.integers(20, 40)), int(rng.integers(20, 40))
                good = _jpeg_bytes(rng, h, w)
                kind = BAD.get(f"{split}/{cls}/{i}.jpg")
                data = {None: good, "truncated": good[: len(good) * 2 // 3], "random": rng.bytes(700),
                        "corrupt": corrupt_middle(good) if kind == "corrupt" else b""}[kind]
                if i == 0 and kind is None:
                    Image.fromarray(_picture(rng, h, w)).save(root / split / cls / "0.png")
                else:
                    (root / split / cls / f"{i}.jpg").write_bytes(data)


@pytest.fixture(scope="module")
def bad_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_images")
    write_tree(root)
    return root


def _cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(dataset="imagefolder", root=str(root), image_size=16, batch_size=4, workers=0, **kw)


def _substituted(info, root: Path):
    """The index with each bad sample's entry pointing at the file (and label) that replaces it: the next index
    (wrapping around) that reads. Loading this index reads exactly the substitutes, under the same indices."""
    bad = {str(root / rel) for rel in BAD}

    def fix(samples):
        out = []
        for i in range(len(samples)):
            j = i
            while samples[j][0] in bad:
                j = (j + 1) % len(samples)
            out.append(samples[j])
        return out

    return dataclasses.replace(info, index=FolderIndex(info.index.classes, fix(info.index.train),
                                                       fix(info.index.evals)))


def _per_batch(loader, epoch: int) -> tuple[list, list]:
    loader.set_epoch(epoch)
    batches, flagged = [], []
    for batch in loader:
        batches.append(batch)
        flagged.append(loader.take_bad())
    return batches, flagged


@pytest.mark.parametrize("decode", ["workers", "device"])
def test_bad_images_are_replaced_by_the_next_readable_index_and_reported(bad_tree, decode):
    cfg = _cfg(bad_tree, decode=decode)
    info = describe(cfg)
    assert info.train_size == 12  # bad files are samples: found when read, not when scanned
    reference = build_train_loader(cfg, _substituted(info, bad_tree), 0, 1, CPU, seed=3)
    bad_train = sorted(str(bad_tree / rel) for rel in BAD if rel.startswith("train"))
    for workers in (0, 2):
        loader = build_train_loader(dataclasses.replace(cfg, workers=workers), info, 0, 1, CPU, seed=3)
        assert loader.take_bad() == []
        for epoch in (0, 1):
            batches, flagged = _per_batch(loader, epoch)
            assert len(batches) == len(loader) == 3 and all(x.shape == (4, 3, 16, 16) for x, _ in batches)
            assert_same_batches(batches, epoch_batches(reference, epoch))  # substitutes under the original keys
            named = [path for batch in flagged for path, _ in batch]
            assert sorted(named) == bad_train  # each bad file once per epoch
            reasons = dict(item for batch in flagged for item in batch)
            assert all("\n" not in r and r.split(":")[0].endswith(("Error", "Exception")) for r in reasons.values())
            assert reasons[str(bad_tree / "train/ant/1.jpg")].startswith("OSError: image file is truncated")
            assert reasons[str(bad_tree / "train/ant/2.jpg")] == "UnidentifiedImageError: cannot identify image file"
            assert_same_batches(epoch_batches(loader, epoch, 1), batches[1:])  # a resume mid-epoch
            assert [path for batch in flagged[1:] for path, _ in batch] == [p for p, _ in loader.take_bad()]
    assert reference.take_bad() == []


@pytest.mark.parametrize("decode", ["workers", "device"])
def test_evaluation_substitutes_and_reports_bad_images_too(bad_tree, decode):
    cfg = _cfg(bad_tree, decode=decode)
    info = describe(cfg)
    for workers in (0, 2):
        c = dataclasses.replace(cfg, workers=workers)
        got = [list(build_eval_loader(c, info, rank, 2, CPU)) for rank in range(2)]
        want = [list(build_eval_loader(c, _substituted(info, bad_tree), rank, 2, CPU)) for rank in range(2)]
        for a, b in zip(got, want):
            assert_same_batches(a, b)
        loader = build_eval_loader(c, info, 1, 2, CPU)  # val/bee/1.jpg is sample 3 of 6: rank 1's shard
        assert sum(x.shape[0] for x, _ in loader) == loader.num_samples == 3
        assert [path for path, _ in loader.take_bad()] == [str(bad_tree / "val/bee/1.jpg")]
        assert loader.take_bad() == []


def test_the_substitute_is_the_next_good_image_under_the_original_index_augmentation(bad_tree):
    _, train, _ = scan_imagefolder(str(bad_tree.resolve()))
    index = next(i for i, (path, _) in enumerate(train) if path.endswith("ant/1.jpg"))
    assert train[index + 1][0].endswith("ant/2.jpg") and train[index + 2][0].endswith("ant/3.jpg")
    dataset = _FolderTrainDataset(train, 16, "rrc_flip", 0, seed=9)
    for epoch in range(3):
        image, label, bad = dataset.flagged((index, epoch))
        expected = dataset[(index + 2, epoch)][0]  # ant/3's own draws: a different crop
        replaced = list(train)
        replaced[index] = train[index + 2]
        assert torch.equal(image, _FolderTrainDataset(replaced, 16, "rrc_flip", 0, seed=9)[(index, epoch)][0])
        assert not torch.equal(image, expected) and label == train[index + 2][1]
        assert bad[0] == train[index][0] and bad[1].startswith("OSError")
    last = len(train) - 1  # cat/3.jpg (corrupt scan data): wraps around to sample 0
    assert dataset.flagged((last, 0))[1] == train[0][1] == 0


def test_a_tree_without_one_readable_image_stops_with_the_reason(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        (tmp_path / "train" / cls / "x.jpg").write_bytes(b"not an image")
    dataset = _FolderTrainDataset(imagefolder._scan(tmp_path / "train", ["a", "b"]), 8, "none", 0, seed=0)
    with pytest.raises(imagefolder.UnreadableImages, match="not one of 2 consecutive samples"):
        dataset[(0, 0)]


@pytest.mark.slow
def test_training_over_bad_images_finishes_and_resumes_bitwise(bad_tree, tmp_path):
    data = [f"data.root={bad_tree}", "data.dataset=imagefolder", "data.image_size=16", "data.batch_size=4",
            "model.name=resnet20", "train.epochs=2", "data.workers=1"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    ok(run_train(whole, *data, nproc=2))
    ok(run_train(parts, *data, "train.run_steps=2", nproc=2))  # stops mid-epoch 0 (3 steps per epoch)
    ok(run_train(parts, *data, nproc=2))
    assert_bitwise_equal(weights(whole / "checkpoints/last.pt"), weights(parts / "checkpoints/last.pt"))
    assert metrics(whole)[-1]["test_count"] == 6


# ----------------------------------------------------------------------------------------------- tree walking
def _image(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def _basic_tree(root: Path) -> None:
    for split in ("train", "val"):
        for cls in ("ant", "bee"):
            _image(root / split / cls / "0.png")


def test_hidden_files_links_loops_and_hard_links_count_once(tmp_path):
    _basic_tree(tmp_path)
    ant, bee = tmp_path / "train/ant", tmp_path / "train/bee"
    _image(ant / "sub" / "1.png")
    (ant / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")  # macOS metadata
    _image(ant / ".hidden.png")
    _image(ant / ".cache" / "2.png")
    _image(tmp_path / "train/__MACOSX/ant/._0.png")
    (ant / "loop").symlink_to(ant, target_is_directory=True)  # a symlink loop
    (ant / "sub_again").symlink_to(ant / "sub", target_is_directory=True)  # a link to a folder already walked
    (bee / "into_ant").symlink_to(ant, target_is_directory=True)  # a link into another class: that class's files
    os.link(bee / "0.png", bee / "hard.png")  # a hard link: the same file twice
    (bee / "file_link.png").symlink_to(bee / "0.png")
    (bee / "gone.png").symlink_to(tmp_path / "nowhere.png")  # a broken link stays a sample: reading reports it
    index = scan_imagefolder(str(tmp_path))
    assert index.classes == ["ant", "bee"]
    assert [(os.path.relpath(p, tmp_path), y) for p, y in index.train] == [
        ("train/ant/0.png", 0), ("train/ant/sub/1.png", 0), ("train/bee/0.png", 1), ("train/bee/gone.png", 1)]


def test_an_empty_training_class_is_refused_in_one_line_naming_it(tmp_path):
    _basic_tree(tmp_path)
    (tmp_path / "train/cow").mkdir()
    _image(tmp_path / "train/cow/.hidden.png")  # hidden files do not count
    with pytest.raises(ConfigError) as err:
        scan_imagefolder(str(tmp_path))
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "train/cow") in message and "cannot be learned" in message


def test_a_validation_class_that_training_lacks_is_refused_naming_it(tmp_path):
    _basic_tree(tmp_path)
    _image(tmp_path / "val/emu/0.png")
    _image(tmp_path / "val/fox/0.png")
    with pytest.raises(ConfigError) as err:
        describe(DataConfig(dataset="imagefolder", root=str(tmp_path)))
    message = str(err.value)
    assert "\n" not in message and "emu, fox" in message and str(tmp_path / "val") in message


def test_one_folder_under_two_class_names_is_refused(tmp_path):
    _basic_tree(tmp_path)
    (tmp_path / "train/cat").symlink_to(tmp_path / "train/ant", target_is_directory=True)
    with pytest.raises(ConfigError, match="same folder as .*train/ant"):
        scan_imagefolder(str(tmp_path))


# ----------------------------------------------------------------------------------------------- 16-bit images
def _ramp16() -> np.ndarray:
    """Every 16-bit level from 0 to 65535 in steps of 37, and the top, as a 2-D image."""
    values = np.append(np.arange(0, 65536, 37), 65535)
    values = np.append(values, np.full((-len(values)) % 64, 65535, dtype=values.dtype))
    return values.reshape(-1, 64).astype(np.uint16)


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    ramp = _ramp16()
    png, pgm = tmp_path / "ramp.png", tmp_path / "ramp.pgm"
    Image.fromarray(ramp).save(png)
    Image.fromarray(ramp).save(pgm)
    with Image.open(png) as img, Image.open(pgm) as other:
        assert img.mode == "I;16" and other.mode in ("I", "I;16", "I;16B")
    expected = (ramp >> 8).astype(np.uint8)
    for path in (png, pgm):
        pixels = np.asarray(load_rgb(str(path)))
        assert pixels.shape == ramp.shape + (3,) and pixels.dtype == np.uint8
        assert all(np.array_equal(pixels[..., c], expected) for c in range(3))
    payload, is_jpeg, width, height = read_encoded(str(png))  # the device path's host decoding
    assert not is_jpeg and (width, height) == (64, ramp.shape[0])
    assert torch.equal(payload, torch.from_numpy(expected)[None].expand(3, -1, -1))
    src, dst = tmp_path / "src", tmp_path / "dst"
    for split in ("train", "val"):
        (src / split / "a").mkdir(parents=True)
        Image.fromarray(ramp).save(src / split / "a" / "ramp.png")
    assert prepare_main([str(src), str(dst), "--max-side", "512", "--quality", "95", "--workers", "1"]) == 0
    copied = np.asarray(Image.open(dst / "train/a/ramp.png.jpg").convert("L")).astype(int)
    assert np.abs(copied - expected).max() <= 3  # JPEG's rounding, not a white image


# ----------------------------------------------------------------------------------------------- prepare
def test_prepare_refuses_two_sources_for_one_target_naming_both(tmp_path, capsys):
    tmp_path = tmp_path.resolve()
    src = tmp_path / "src"
    _basic_tree(src)
    _image(src / "train/ant/x.png", 10)
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(src / "train/ant/x.png.jpg")
    assert prepare_main([str(src), str(tmp_path / "dst"), "--max-side", "64", "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert all(part in err for part in (str(src / "train/ant/x.png"), str(src / "train/ant/x.png.jpg"),
                                        str(tmp_path / "dst/train/ant/x.png.jpg")))
    assert not (tmp_path / "dst").exists()


def test_prepare_check_lists_every_file_that_does_not_decode(bad_tree, tmp_path, capsys):
    (bad_tree / "val/ant/._0.png").write_bytes(b"macOS metadata")  # skipped, as the trainer skips it
    try:
        assert prepare_main(["--check", str(bad_tree), "--workers", "2"]) == 1
    finally:
        (bad_tree / "val/ant/._0.png").unlink()
    out = capsys.readouterr().out.strip().splitlines()
    listed = [line.split(": ", 1)[0] for line in out[:-1]]
    assert listed == sorted(str(bad_tree.resolve() / rel) for rel in BAD)  # every one, in path order
    assert all(len(line.split(": ")) >= 3 for line in out[:-1])  # path: Type: reason
    assert out[-1] == f"check: 18 images under {bad_tree.resolve()}: 14 decode, 4 do not"
    good = tmp_path / "good"
    _basic_tree(good)
    assert prepare_main(["--check", str(good), "--workers", "1"]) == 0
    assert capsys.readouterr().out.strip().endswith("4 decode, 0 do not")
    assert prepare_main(["--check", str(good), str(tmp_path / "dst"), "--max-side", "9"]) == 2
    assert prepare_main(["--check", str(tmp_path / "missing")]) == 2
