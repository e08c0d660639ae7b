"""The benchmark (`python -m ddp_resnet.bench`) on the CPU: figures printed, torchvision comparison, errors, and
the fast paths giving the same results as the plain path. No timed assertions.

The GPU-resident loader's batches equal the DataLoader path's bit for bit, with crop offsets in range and about
half of the images flipped: tests/test_data.py (test_crop_flip_distribution_both_paths,
test_resume_mid_epoch_is_exact_and_independent_of_workers) covers that; here only the bench's use of it.
"""
from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import REPO, child_env, ok
from ddp_resnet import bench, config, distributed, train
from ddp_resnet.build import build_network
from ddp_resnet.data import GPUTrainLoader, describe
from ddp_resnet.optim import peak_lr

SMALL = ["--device", "cpu", "--res", "32", "--steps", "1", "--warmup", "1", "--windows", "2"]
LINE = re.compile(r"^(ours|torchvision)\s*: ([\d.]+) images/s median \(min ([\d.]+), max ([\d.]+)\) \| "
                  r"([\d.]+) TFLOP/s per device \| (.+?) \| (.+?) ([\d.]+) MiB \| compile (\w+) \| loss ([\d.]+)$",
                  re.MULTILINE)


def _figures(text: str) -> dict:
    found = {m[1]: m for m in LINE.finditer(text)}
    assert found, text
    return {name: {"median": float(m[2]), "min": float(m[3]), "max": float(m[4]), "tflops": float(m[5]),
                   "peak": m[6], "memory": float(m[8]), "compile": m[9], "loss": float(m[10])}
            for name, m in found.items()}


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = bench.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _write_fake_cifar10(root, per_file: int = 24, n_test: int = 16) -> None:
    """Random images in the standard CIFAR-10 python layout (5 train files, 1 test file, meta)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, count in [(f"data_batch_{i}", per_file) for i in range(1, 6)] + [("test_batch", n_test)]:
        batch = {"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in rng.integers(0, 10, count)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))


# ----------------------------------------------------------------------------------------------- the CLI
def test_cli_prints_figures_and_settings_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = ok(subprocess.run([sys.executable, "-m", "ddp_resnet.bench", "--model", "resnet20", "--batch", "16",
                              "--steps", "3", "--warmup", "1", "--windows", "2", "--device", "cpu", "--res", "32",
                              "--json", str(out)], cwd=REPO, env=child_env(), capture_output=True, text=True,
                             timeout=120, check=False))
    figures = _figures(proc.stdout)["ours"]
    assert 0 < figures["min"] <= figures["median"] <= figures["max"]
    assert figures["tflops"] >= 0 and figures["peak"] == "peak unknown (cpu)" and figures["memory"] > 0
    assert figures["compile"] == "off" and np.isfinite(figures["loss"])
    assert "resnet20 stem=cifar res=32" in proc.stdout and "= 16 images/step" in proc.stdout
    assert "amp=none channels_last=False compile=False" in proc.stdout and "loader=fixed" in proc.stdout
    report = json.loads(out.read_text())
    ours = report["results"]["ours"]
    assert len(ours["window_seconds"]) == 2 and report["settings"]["global_batch"] == 16
    assert ours["images_per_s"]["median"] == pytest.approx(figures["median"], rel=1e-3, abs=0.05)
    # TFLOP/s = forward MACs x 2 FLOP x 3 (fwd + bwd) x images/s; resnet20 is ~41 M MACs at 32 px
    assert 40e6 < ours["macs_per_image"] < 42e6
    assert ours["tflops_per_device"] == pytest.approx(ours["macs_per_image"] * 6 * ours["images_per_s"]["median"]
                                                      / 1e12)


def test_compare_torchvision_resnet18_cifar_stem_prints_ratio(capsys, tmp_path):
    out = tmp_path / "cmp.json"
    code, text, _ = _run(capsys, *SMALL, "--model", "resnet18", "--stem", "cifar", "--batch", "8",
                         "--compare-torchvision", "--json", str(out))
    assert code == 0
    figures = _figures(text)
    assert set(figures) == {"ours", "torchvision"}
    ratio = float(re.search(r"ratio ours/torchvision: ([\d.]+)", text)[1])
    assert ratio == pytest.approx(figures["ours"]["median"] / figures["torchvision"]["median"], rel=0.01)
    report = json.loads(out.read_text())
    assert report["results"]["ours"]["macs_per_image"] == report["results"]["torchvision"]["macs_per_image"]


def test_torchvision_twin_has_our_architecture():
    cfg, _ = bench.bench_config(bench.build_parser().parse_args(["--model", "resnet18", "--stem", "cifar", "--res",
                                                                 "32", "--batch", "2", "--device", "cpu"]), 1)
    info = bench.fixed_info(cfg)
    env = distributed.init("cpu")
    ours, theirs = build_network(cfg, info, env), bench.torchvision_network(cfg, info, env)
    assert theirs.conv1.kernel_size == (3, 3) and theirs.conv1.stride == (1, 1)
    assert isinstance(theirs.maxpool, torch.nn.Identity)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_device_cuda_without_cuda_is_one_line_and_exit_2(capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out, err = _run(capsys, "--device", "cuda", "--model", "resnet20")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: --device cuda") and "CUDA" in err
    monkeypatch.setattr(sys, "argv", ["ddp-resnet-bench", "--device", "cuda"])
    with pytest.raises(SystemExit) as exit_info:  # the console entry point passes the code on
        bench.cli()
    assert exit_info.value.code == 2


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet20", "--compare-torchvision"], "torchvision has no model 'resnet20'"),
    (["--model", "nope"], "unknown model 'nope'"),
    (["--model", "resnet20", "--stem", "imagenet"], "CIFAR-only"),
    (["--model", "resnet20", "--steps", "0"], "--steps"),
    (["--model", "resnet20", "--amp", "fp16", "--device", "cpu"], "fp16"),
])
def test_bad_arguments_are_one_line_errors(capsys, argv, message):
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err


def test_peak_table_and_unknown_gpu():
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == ("H100 SXM", "bf16", 989.4)
    assert bench.peak_tflops("NVIDIA H100 PCIe", "tf32") == ("H100 PCIe", "tf32", 378.0)
    assert bench.peak_tflops("NVIDIA H100 NVL", "bf16")[0] == "H100 NVL"
    assert bench.peak_tflops("NVIDIA H200", "fp16") == ("H200 SXM", "fp16", 989.4)
    assert bench.peak_tflops("NVIDIA GH200 480GB", "bf16")[0] == "GH200"
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB", "tf32") == ("A100", "tf32", 156.0)
    assert bench.peak_tflops("NVIDIA L40S", "bf16")[0] == "L40S" and bench.peak_tflops("NVIDIA L4", "bf16")[0] == "L4"
    assert bench.peak_tflops("Tesla V100-SXM2-16GB", "tf32") == ("V100 SXM2", "fp32", 15.7)  # no TF32 on Volta
    assert bench.peak_tflops("Tesla V100-SXM2-16GB", "bf16") is None
    assert bench.peak_tflops("NVIDIA A10G", "bf16") is None and bench.peak_tflops("Some Future GPU", "bf16") is None
    result = {"images_per_s": {"median": 1.0, "min": 1.0, "max": 1.0}, "tflops_per_device": 0.5, "peak": None,
              "memory_kind": "peak allocated", "peak_memory_mib": 10.0, "compile": "off", "mean_loss": 1.0}
    line = bench.format_result("ours", result, SimpleNamespace(device=torch.device("cuda", 0)))
    assert "| peak unknown |" in line and _figures(line)["ours"]["peak"] == "peak unknown"
    result["peak"] = {"gpu": "H100 SXM", "precision": "bf16", "tflops": 989.4, "share": 0.5 / 989.4}
    line = bench.format_result("ours", result, SimpleNamespace(device=torch.device("cuda", 0)))
    assert "0.1% of H100 SXM dense bf16 peak (989.4 TFLOP/s)" in line


# ----------------------------------------------------------------------------------------------- fast paths
def _runner(*argv: str, loader_mode: str | None = None) -> bench.Runner:
    args = bench.build_parser().parse_args(["--device", "cpu", *argv])
    cfg, mode = bench.bench_config(args, 1)
    info = bench.fixed_info(cfg, args.classes) if mode == "fixed" else describe(cfg.data)
    return bench.Runner("ours", cfg, info, distributed.init("cpu"), loader_mode or mode, 10, note=lambda m: None)


def test_channels_last_step_gives_the_weights_of_the_contiguous_step():
    common = ["--model", "resnet20", "--res", "16", "--batch", "8", "--classes", "10"]
    plain, fast = _runner(*common, "--no-channels-last"), _runner(*common, "--channels-last")
    assert fast.batches.next()[0][0].is_contiguous(memory_format=torch.channels_last)
    assert fast.parts.bare.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(plain.batches.next()[0][0], fast.batches.next()[0][0])  # same data, other layout
    for runner in (plain, fast):
        runner.warm_up(2)
    for (name, a), b in zip(plain.parts.bare.state_dict().items(), fast.parts.bare.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(plain.parts.bare.conv1.weight, _runner(*common).parts.bare.conv1.weight)  # it trained


def test_gpu_resident_loader_feeds_the_bench_the_dataloader_batches(tmp_path):
    _write_fake_cifar10(tmp_path)
    common = ["--model", "resnet20", "--data", "cifar10", "--root", str(tmp_path), "--batch", "8",
              "--channels-last", "--accum", "2"]
    gpu, dl = _runner(*common), _runner(*common, "--loader", "dataloader", "data.workers=0")
    assert isinstance(gpu.batches.loader, GPUTrainLoader) and gpu.batches.steps_per_epoch == 120 // 8
    for _ in range(gpu.batches.steps_per_epoch + 2):  # across an epoch boundary
        for (xa, ya), (xb, yb) in zip(gpu.batches.next(), dl.batches.next()):
            assert xa.shape == (4, 3, 32, 32) and torch.equal(xa, xb) and torch.equal(ya, yb)
    assert gpu.batches.epoch == 2


def test_fast_recipe_validates_and_the_bench_runs_it_with_the_gpu_loader_on_cpu(capsys, tmp_path):
    cfg = config.load(REPO / "configs/cifar10_resnet18_fast.yaml")
    t, d, o = cfg.train, cfg.data, cfg.optim
    assert (t.amp, t.channels_last, t.compile, t.label_smoothing) == ("bf16", True, True, 0.1)
    assert (d.loader, d.batch_size, cfg.model.name, cfg.model.stem) == ("gpu", 512, "resnet18", "cifar")
    assert o.nesterov and o.no_wd_bn_bias and d.eval_batch_size >= 2 * d.batch_size
    assert peak_lr(cfg) == pytest.approx(0.4)
    _write_fake_cifar10(tmp_path)
    code, text, _ = _run(capsys, "--config", str(REPO / "configs/cifar10_resnet18_fast.yaml"), "--device", "cpu",
                         "--amp", "none", "--no-compile", "--batch", "8", "--root", str(tmp_path), "--steps", "1",
                         "--warmup", "1", "--windows", "1")
    assert code == 0 and "resnet18 stem=cifar res=32" in text and "loader=gpu" in text, text
    assert "channels_last=True" in text and _figures(text)["ours"]["median"] > 0


def test_fast_recipe_trains_a_few_steps_on_cpu(tmp_path, capsys):
    _write_fake_cifar10(tmp_path / "data")
    out = tmp_path / "run"
    code = train.main(["--config", str(REPO / "configs/cifar10_resnet18_fast.yaml"), f"data.root={tmp_path / 'data'}",
                       f"output_dir={out}", "train.device=cpu", "train.amp=none", "train.compile=false",
                       "data.batch_size=16", "data.eval_batch_size=16", "train.max_steps=2", "dist.backend=gloo"])
    text = capsys.readouterr().out
    assert code == 0, text
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 2 and record["test_count"] == 16 and np.isfinite(record["train_loss"])


# ----------------------------------------------------------------------------------------------- compile fallback
def test_compile_failing_at_wrap_time_falls_back_to_eager(capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated compiler failure")

    monkeypatch.setattr(torch, "compile", broken)
    code, text, _ = _run(capsys, *SMALL, "--model", "resnet20", "--batch", "8", "--compile")
    assert code == 0
    assert "note: torch.compile failed (RuntimeError: simulated compiler failure); falling back to eager" in text
    assert _figures(text)["ours"]["compile"] == "fallback"


def test_compile_failing_in_the_first_step_falls_back_and_trains_like_eager(monkeypatch):
    calls = []

    def lazy_broken(model, *args, **kwargs):  # like torch.compile: wrapping works, the first call fails
        def run(*inputs):
            calls.append(1)
            raise RuntimeError("simulated lowering failure\nsecond line")
        return run

    monkeypatch.setattr(torch, "compile", lazy_broken)
    common = ["--model", "resnet20", "--res", "16", "--batch", "8", "--classes", "10"]
    notes = []
    args = bench.build_parser().parse_args(["--device", "cpu", *common, "--compile"])
    cfg, mode = bench.bench_config(args, 1)
    runner = bench.Runner("ours", cfg, bench.fixed_info(cfg, 10), distributed.init("cpu"), mode, 10, notes.append)
    assert runner.parts.compiled == "on"
    runner.warm_up(2)
    assert calls == [1] and runner.parts.compiled == "fallback"
    assert notes == [("note: torch.compile failed in the first step (RuntimeError: simulated lowering failure); "
                      "falling back to eager")]
    eager = _runner(*common, "--no-compile")
    eager.warm_up(2)
    for a, b in zip(runner.parts.bare.state_dict().values(), eager.parts.bare.state_dict().values()):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------- DDP, CUDA
@pytest.mark.slow
def test_bench_under_torchrun_wraps_ddp_and_prints_once(tmp_path):
    out = tmp_path / "ddp.json"
    proc = ok(subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
         "ddp_resnet.bench", "--model", "resnet20", "--res", "16", "--batch", "4", "--device", "cpu", "--steps", "1",
         "--warmup", "1", "--windows", "1", "--sync-bn", "--json", str(out)],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=180, check=False))
    assert proc.stdout.count("ours        :") == 1
    assert "batch 4 per process x 2 process(es) = 8 images/step" in proc.stdout
    settings = json.loads(out.read_text())["settings"]
    assert settings["world_size"] == 2 and settings["sync_bn"] is True and settings["launcher"] == "torchrun"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_step_issues_no_host_sync_on_cuda():
    args = bench.build_parser().parse_args(["--device", "cuda", "--model", "resnet18", "--stem", "cifar", "--res",
                                            "32", "--batch", "32", "--amp", "bf16", "--channels-last"])
    cfg, mode = bench.bench_config(args, 1)
    runner = bench.Runner("ours", cfg, bench.fixed_info(cfg), distributed.init("cuda"), mode, 10)
    runner.warm_up(2)
    torch.cuda.set_sync_debug_mode("error")
    try:
        runner.window(3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
