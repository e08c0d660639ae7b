"""ONNX and torch.export files of trained networks give the PyTorch model's outputs, and are checked when written."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_predict import CLASSES, evil_checkpoint, folder_overrides, save_checkpoint, write_tree

from ddp_resnet import deploy, export, inference, predict
from ddp_resnet.data.imagefolder import load_rgb

onnxruntime = pytest.importorskip("onnxruntime", reason='needs the [export] extra: pip install "ddp_resnet[export]"')

# Small inputs keep the exports fast: the CIFAR stem at 32 px, the ImageNet stem at 64 px.
MODELS = {
    "resnet20": ["model.name=resnet20", "data.dataset=cifar10"],
    "resnet50_imagenet_stem": ["model.name=resnet50", "model.stem=imagenet", "data.dataset=imagefolder",
                               "data.image_size=64"],
    "resnet20_blurpool": ["model.name=resnet20", "model.blurpool=true", "data.dataset=cifar10"],
    "se_resnet18": ["model.name=se_resnet18", "data.dataset=imagefolder", "data.image_size=32"],
}


def pytorch_logits(ckpt_path: Path, images: torch.Tensor) -> torch.Tensor:
    """The PyTorch model of the checkpoint on the loaders' normalization of uint8 images."""
    trained = inference.load(str(ckpt_path), "cpu")
    with torch.no_grad():
        return trained.model(trained.normalizer()(images))


def run_onnx(path: Path, inputs: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0])


def run_pt2(path: Path, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.export.load(str(path)).module()(inputs)


@pytest.mark.parametrize("case", list(MODELS))
def test_onnx_and_torch_export_match_pytorch(case, tmp_path, capsys):
    ckpt_path = save_checkpoint(tmp_path / "best.pt", MODELS[case], num_classes=7)
    trained = inference.load(str(ckpt_path), "cpu")
    side = trained.size
    assert side == (64 if "resnet50" in case else 32)
    images = torch.randint(0, 256, (5, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    expected = pytorch_logits(ckpt_path, images)
    inputs = trained.normalizer()(images)
    for suffix, runner in ((".onnx", run_onnx), (".pt2", run_pt2)):
        out = tmp_path / f"model{suffix}"
        assert export.cli([str(ckpt_path), str(out)]) == 0
        printed = capsys.readouterr().out
        assert f"input 'images' [batch, 3, {side}, {side}] float32" in printed
        assert "output 'logits' [batch, 7] float32" in printed and "max |diff|" in printed and ": ok" in printed
        if suffix == ".onnx":
            assert "opset " in printed
        got = runner(out, inputs)  # a batch of 5: neither the exported (2) nor the checked (3) size
        assert got.shape == (5, 7)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.fixture(scope="module")
def folder_model(tmp_path_factory) -> tuple[Path, Path]:
    tree = write_tree(tmp_path_factory.mktemp("export") / "tree", n_val=2)
    return tree, save_checkpoint(tree.parent / "named.pt", folder_overrides(tree), len(CLASSES), class_names=CLASSES)


@pytest.mark.parametrize("suffix", [".onnx", ".pt2"])
def test_with_preprocessing_the_file_takes_uint8_and_agrees_with_predict(folder_model, tmp_path, capsys, suffix):
    tree, ckpt_path = folder_model
    out = tmp_path / f"model{suffix}"
    assert export.cli([str(ckpt_path), str(out), "--with-preprocessing"]) == 0
    printed = capsys.readouterr().out
    assert "input 'images' [batch, 3, 32, 32] uint8" in printed and "the /255 and mean/std are in the graph" in printed
    preds = tmp_path / "preds.jsonl"
    assert predict.main(["--checkpoint", str(ckpt_path), str(tree / "val"), "--workers", "0", "--out", str(preds),
                         "--topk", "3"]) == 0
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    transform = inference.load(str(ckpt_path), "cpu").transform
    pixels = torch.stack([transform(load_rgb(r["path"])) for r in rows])  # what a deployer feeds: uint8 RGB
    probs = (run_onnx(out, pixels) if suffix == ".onnx" else run_pt2(out, pixels)).softmax(1)
    for row, p in zip(rows, probs):
        by_class = {t["class"]: t["prob"] for t in row["topk"]}
        assert CLASSES[int(p.argmax())] == row["topk"][0]["class"]
        assert np.allclose([by_class[c] for c in CLASSES], p.tolist(), atol=1e-5)


def test_a_failed_check_removes_the_file_and_fails_in_one_line(folder_model, tmp_path, capsys, monkeypatch):
    _, ckpt_path = folder_model
    real = deploy.run_program
    monkeypatch.setattr(deploy, "run_program", lambda program, inputs: real(program, inputs) + 0.5)
    out = tmp_path / "model.pt2"
    assert export.cli([str(ckpt_path), str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {out}: the torch.export file's logits differ")
    assert "the file was removed" in err and not out.exists()


def test_without_onnxruntime_onnx_export_says_how_to_install_it(folder_model, tmp_path, capsys, monkeypatch):
    _, ckpt_path = folder_model
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    assert export.cli([str(ckpt_path), str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {deploy.EXPORT_HINT}" and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("suffix", [".onnx", ".pt2", ".pt"])
def test_a_checkpoint_whose_pickle_would_run_code_is_refused(tmp_path, capsys, suffix):
    marker = tmp_path / "pwned"
    evil = evil_checkpoint(tmp_path / "evil.pt", marker)
    assert export.cli([str(evil), str(tmp_path / f"out{suffix}")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "refused" in err
    assert not marker.exists() and not (tmp_path / f"out{suffix}").exists()


def test_program_options_on_a_weights_output_are_refused(folder_model, tmp_path, capsys):
    _, ckpt_path = folder_model
    assert export.cli([str(ckpt_path), str(tmp_path / "w.pt"), "--with-preprocessing"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --with-preprocessing, --opset and --config apply to")
    assert export.cli([str(ckpt_path), str(tmp_path / "w.pt")]) == 0  # today's plain weights
    state = torch.load(tmp_path / "w.pt", weights_only=True)
    assert state.keys() == torch.load(ckpt_path, weights_only=True)["model"].keys()
