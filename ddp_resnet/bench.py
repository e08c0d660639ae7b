"""`python -m ddp_resnet.bench`: time the trainer's own training step (images/s, TFLOP/s, share of peak, memory).

The step timed is the one ``python -m ddp_resnet.train`` runs, built from the same public pieces: the config
(``--config`` recipe + flags + ``key=value`` overrides, validated by ``ddp_resnet.config``), ``build_network``
(model, SyncBatchNorm, channels_last), ``build_optimizer`` (fused/foreach kernels), ``build_scheduler``, a
``GradScaler``, the DDP wrapper when launched under torchrun/srun, ``torch.compile``: the ``engine.TrainStep``.
Batches come from a fixed on-device batch (``--data synthetic``, the default: pure model-step throughput) or
from the trainer's own loaders (``--data cifar10`` uses the device-resident loader, so on-device augmentation
and normalization are inside the timed region).

Timing: ``--warmup`` untimed steps (compilation, cudnn autotuning, allocator growth), then ``--windows`` windows
of ``--steps`` steps each; on CUDA each window is measured with CUDA events (one synchronization at the end), on
the CPU with ``time.perf_counter``. Reported: images/s over all processes (median, min, max of the windows),
achieved TFLOP/s per device (forward multiply-adds x 2 FLOP x 3 for forward+backward), its share of the GPU's
dense peak for the precision in use ("peak unknown" for a GPU not in ``PEAK_TFLOPS``), and peak memory (CUDA:
``max_memory_allocated`` during the network's build and warm-up, above what was allocated before it; CPU: the
process's maximum resident set size).

``--compare-torchvision`` runs torchvision's model of the same name (CIFAR stem: 3x3/1 ``conv1``, no max-pool)
through the same step in the same process and prints the ratio ours/torchvision. Each network is warmed up on
its own, then their timed windows alternate, so both see the same clock, thermal and neighbour conditions.

``--comm-bytes`` prints, for each ``dist.comm_hook`` (none, fp16, bf16, and powersgd during and after its warm-up),
the bytes each rank hands to the gradient all-reduce per step: every ``torch.distributed.all_reduce`` the hook
issues, counted in real DDP steps of a fresh copy of the network with the config's DDP options and buckets (under a
launcher on the run's process group, alone on a temporary 1-process gloo group: the bytes per rank do not depend on
the world size). ``--comm-hook`` sets the hook of the timed step (it takes effect with more than one process).

If ``torch.compile`` fails (at wrap time or while compiling during the first step, e.g. a graph that the backend
cannot lower with SyncBatchNorm), a one-line note is printed and the model runs eagerly; every rank of a
multi-process run compiles the same graph, so they all fall back together.

Examples::

    python -m ddp_resnet.bench --model resnet50 --res 224 --batch 256 --amp bf16 --channels-last --compile
    python -m ddp_resnet.bench --config configs/cifar10_resnet18_fast.yaml --data cifar10 --root data
    torchrun --nproc_per_node=8 -m ddp_resnet.bench --model resnet50 --batch 256 --amp bf16 --channels-last
    python -m ddp_resnet.bench --device cpu --model resnet18 --stem cifar --res 32 --batch 16 --steps 3 \\
        --warmup 1 --windows 2 --compare-torchvision
    python -m ddp_resnet.bench --device cpu --model resnet50 --res 224 --batch 2 --steps 1 --warmup 1 --windows 1 \\
        --comm-bytes

Exit codes: 0 measured; 2 bad arguments or configuration (one line on stderr).
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ddp_resnet import build, comm_hooks, distributed, monitor
from ddp_resnet import config as config_mod
from ddp_resnet import data as data_mod
from ddp_resnet.build import resolve_stem
from ddp_resnet.config import Config, ConfigError
from ddp_resnet.exitcodes import OK as EXIT_OK
from ddp_resnet.exitcodes import USAGE as EXIT_CONFIG
from ddp_resnet.models import resolve_model_stem, summarize
from ddp_resnet.optim import uses_fused
from ddp_resnet.pipelines import PIPELINES, TENSOR_DATASETS

# Registered names whose ImageNet-stem architecture is torchvision's (same parameters, same MACs).
TORCHVISION_TWINS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                     "wide_resnet50_2")
# Without --config: the classic ImageNet ResNet-50 training-throughput setting.
BENCH_DEFAULTS = {"model": "resnet50", "res": 224, "batch": 256}

# Dense (no structured sparsity) peak TFLOP/s per GPU from the vendors' datasheets, matched in order against
# torch.cuda.get_device_name() (lower-cased). tf32 is what fp32 convolutions run at when cuDNN allows TF32
# (PyTorch's default for convolutions); fp32 is the plain CUDA-core rate.
_H100_SXM = {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}
_NVL = {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}
PEAK_TFLOPS: tuple[tuple[str, str, dict[str, float]], ...] = (
    (r"gh200", "GH200", _H100_SXM),
    (r"h200.*nvl", "H200 NVL", _NVL),
    (r"h200", "H200 SXM", _H100_SXM),
    (r"h100.*nvl", "H100 NVL", _NVL),
    (r"h100.*pcie", "H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"h100", "H100 SXM", _H100_SXM),
    (r"a100", "A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"\bl40s\b", "L40S", {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    (r"\bl4\b", "L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"\ba10\b", "A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"v100.*pcie", "V100 PCIe", {"fp16": 112.0, "fp32": 14.0}),
    (r"v100", "V100 SXM2", {"fp16": 125.0, "fp32": 15.7}),
)


# --------------------------------------------------------------------------------------------- the CLI
def build_parser() -> argparse.ArgumentParser:
    """The benchmark's arguments; flags left out keep the recipe's value (or the bench default)."""
    p = argparse.ArgumentParser(prog="python -m ddp_resnet.bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML recipe to take settings from (default: none, bench defaults)")
    p.add_argument("--model", help=f"registered model name (default {BENCH_DEFAULTS['model']})")
    p.add_argument("--stem", choices=config_mod.choices("model.stem"), help="model stem (auto: cifar up to 64 px)")
    p.add_argument("--res", type=int, help=f"image side in pixels (default {BENCH_DEFAULTS['res']}; cifar: 32)")
    p.add_argument("--batch", type=int, help=f"batch PER PROCESS per optimizer step (default "
                                             f"{BENCH_DEFAULTS['batch']}); the global batch is batch x world size")
    p.add_argument("--accum", type=int, help="gradient accumulation micro-steps per optimizer step")
    p.add_argument("--amp", choices=config_mod.choices("train.amp"), help="autocast precision")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC model and inputs")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")
    p.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="SyncBatchNorm (only active with more than one process)")
    p.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=None,
                   help="cudnn autotuner (default on)")
    p.add_argument("--fused", choices=config_mod.choices("optim.fused"), help="fused optimizer kernels (auto: on CUDA)")
    p.add_argument("--data", choices=config_mod.choices("data.dataset"),
                   help="synthetic (default), a CIFAR dataset or an ImageFolder tree read from --root")
    p.add_argument("--root", help="directory holding cifar-10-batches-py/ (or cifar-100-python/, or train/ and val/)")
    p.add_argument("--decode", choices=config_mod.choices("data.decode"),
                   help="imagefolder: decode JPEGs in DataLoader workers (PIL) or in batches on the device")
    p.add_argument("--loader", choices=("fixed", "gpu", "dataloader"),
                   help="fixed: one on-device batch (synthetic default); gpu: device-resident loader with "
                        "on-device augmentation (cifar default); dataloader: worker processes")
    p.add_argument("--classes", type=int, help="synthetic: number of classes (default 10 for the cifar stem, "
                                               "else 1000)")
    p.add_argument("--device", choices=config_mod.choices("train.device"), help="auto: CUDA when available")
    p.add_argument("--steps", type=int, default=20, help="timed steps per window (default 20)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (>= 1, default 10)")
    p.add_argument("--windows", type=int, default=5, help="timed windows (default 5)")
    p.add_argument("--log-every", type=int, default=0,
                   help="also time the trainer's per-step metric bookkeeping, read every N steps as "
                        "train.log_every does (default 0: the step alone)")
    p.add_argument("--compare-torchvision", action="store_true",
                   help="also time torchvision's model of the same name and print the ratio")
    p.add_argument("--comm-hook", choices=config_mod.choices("dist.comm_hook"),
                   help="DDP communication hook of the timed step (dist.comm_hook; only with more than one process)")
    p.add_argument("--comm-bytes", action="store_true",
                   help="also print the bytes each rank hands to the gradient all-reduce per step with each hook "
                        "(none, fp16, bf16, powersgd before and after its warm-up), counted in real DDP steps")
    p.add_argument("--json", help="write the settings and figures to this JSON file")
    p.add_argument("overrides", nargs="*", help="dotted config overrides applied last, e.g. optim.name=adamw")
    return p


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """Config overrides for the flags that were given (batch handled later: it needs the world size)."""
    out = []
    for flag, key in (("model", "model.name"), ("stem", "model.stem"), ("accum", "optim.accum_steps"),
                      ("amp", "train.amp"), ("channels_last", "train.channels_last"), ("compile", "train.compile"),
                      ("sync_bn", "train.sync_bn"), ("cudnn_benchmark", "train.cudnn_benchmark"),
                      ("fused", "optim.fused"), ("data", "data.dataset"), ("root", "data.root"),
                      ("decode", "data.decode"), ("device", "train.device"), ("comm_hook", "dist.comm_hook")):
        value = getattr(args, flag)
        if value is not None:
            out.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return out


def bench_config(args: argparse.Namespace, world_size: int) -> tuple[Config, str]:
    """The validated Config the bench runs and the loader mode (fixed | gpu | dataloader)."""
    overrides = _flag_overrides(args)
    if args.config is None:
        overrides.insert(0, f"model.name={BENCH_DEFAULTS['model']}")
    cfg = config_mod.load(args.config, [*overrides, *args.overrides])
    dataset = cfg.data.dataset
    loader = args.loader or ("fixed" if dataset == "synthetic" else
                             "gpu" if dataset in TENSOR_DATASETS else "dataloader")
    if loader == "fixed" and dataset != "synthetic":
        raise ConfigError(f"--loader fixed: only with --data synthetic (data is {dataset})")
    if loader == "gpu" and dataset not in PIPELINES["gpu"].datasets:
        raise ConfigError(f"--loader gpu: supports {', '.join(PIPELINES['gpu'].datasets)}, not {dataset}")
    data: dict = {}
    if loader != "fixed":
        data["loader"] = loader
    res = args.res or (BENCH_DEFAULTS["res"] if args.config is None and dataset == "synthetic" else None)
    if dataset == "synthetic" and res:
        data.update(synthetic_image_size=res, image_size=0)
    elif res:
        data["image_size"] = res
    if dataset == "synthetic" and args.classes:
        data["synthetic_classes"] = args.classes
    accum = cfg.optim.accum_steps
    batch = args.batch or (BENCH_DEFAULTS["batch"] if args.config is None else None)
    if batch is not None:
        if batch % accum:
            raise ConfigError(f"--batch: {batch} per process is not divisible by optim.accum_steps {accum}")
        data["batch_size"] = batch * world_size
    if loader == "gpu" and dataset == "synthetic":  # enough generated images for a few steps per epoch
        global_batch = data.get("batch_size", cfg.data.batch_size)
        data["synthetic_train_size"] = max(cfg.data.synthetic_train_size if args.config else 0, 4 * global_batch)
    if data:
        cfg = config_mod.replace(cfg, data=data)
    config_mod.validate_world(cfg, world_size)
    return cfg, loader


# --------------------------------------------------------------------------------------------- networks
def torchvision_network(cfg: Config, info, env) -> nn.Module:
    """torchvision's model of the configured name, prepared like ``build.build_network`` (stem, SyncBN, layout)."""
    import torchvision

    name = cfg.model.name
    if name not in TORCHVISION_TWINS:
        raise ConfigError(f"--compare-torchvision: torchvision has no model '{name}'; models it shares with "
                          f"ddp_resnet: {', '.join(TORCHVISION_TWINS)}")
    model = getattr(torchvision.models, name)(weights=None, num_classes=info.num_classes,
                                              zero_init_residual=cfg.model.zero_init_residual)
    if resolve_stem(cfg, info) == "cifar":  # the seeds' CIFAR ResNet: 3x3/1 conv, no max-pool
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    return build.place(model, cfg, env.device, env.distributed)


# --------------------------------------------------------------------------------------------- batches
class FixedBatches:
    """The same on-device micro-batches every step (normalized-like floats, random labels)."""

    def __init__(self, cfg: Config, info, env, micro: int, accum: int):
        gen = torch.Generator().manual_seed(cfg.train.seed + 7919 * env.rank)
        size = info.image_size
        images = torch.randn(micro, 3, size, size, generator=gen)
        labels = torch.randint(0, info.num_classes, (micro,), generator=gen)
        fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        batch = (images.to(env.device).contiguous(memory_format=fmt), labels.to(env.device))
        self.micro_batches = [batch] * accum
        self.steps_per_epoch = 0  # no epochs

    def next(self) -> list:
        return self.micro_batches


class LoaderBatches:
    """Micro-batches from the trainer's loader, epoch after epoch, grouped as the trainer groups them."""

    def __init__(self, loader, accum: int):
        self.loader, self.accum = loader, accum
        self.steps_per_epoch = len(loader) // accum
        self.epoch, self.position, self.iterator = 0, 0, None

    def next(self) -> list:
        if self.iterator is None or self.position == self.steps_per_epoch:
            self.loader.set_epoch(self.epoch)
            self.iterator = iter(self.loader)
            self.epoch, self.position = self.epoch + 1, 0
        self.position += 1
        return [next(self.iterator) for _ in range(self.accum)]


def make_batches(cfg: Config, info, env, loader_mode: str):
    """The batch source for ``loader_mode``: fixed, or the trainer's own ``build_train_loader``."""
    accum, micro = build.accumulation(cfg, env.world_size), build.micro_batch(cfg, env.world_size)
    if loader_mode == "fixed":
        return FixedBatches(cfg, info, env, micro, accum)
    loader = data_mod.build_train_loader(cfg.data, info, env.rank, env.world_size, env.device, cfg.train.seed,
                                         micro_batch=micro, channels_last=cfg.train.channels_last,
                                         total_epochs=build.run_length(cfg, info, env.world_size)[1],
                                         local_world_size=env.local_world_size)
    return LoaderBatches(loader, accum)


def fixed_info(cfg: Config, classes: int | None = None) -> data_mod.DataInfo:
    """DataInfo for the fixed synthetic batch (no dataset is generated); classes default 10 (cifar stem) or 1000."""
    size = cfg.data.image_size or cfg.data.synthetic_image_size
    if classes is None:
        probe = data_mod.DataInfo(2, [], size, (0.0,) * 3, (1.0,) * 3, 0, 0, "none")
        classes = 10 if resolve_stem(cfg, probe) in (None, "cifar") else 1000
    return data_mod.DataInfo(classes, [f"class_{i}" for i in range(classes)], size, (0.0,) * 3, (1.0,) * 3,
                             cfg.data.batch_size, 0, "none")


# --------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One network's training step, its batches and its timed windows (CUDA events or perf_counter)."""

    def __init__(self, which: str, cfg: Config, info, env, loader_mode: str, total_steps: int,
                 note: Callable[[str], None] = print, log_every: int = 0):
        self.which, self.cfg, self.env, self.note = which, cfg, env, note
        cuda = env.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(env.device)
            torch.cuda.reset_peak_memory_stats(env.device)
        self.baseline = torch.cuda.memory_allocated(env.device) if cuda else 0
        build.seed_everything(cfg.train.seed, env.rank)
        bare = build.build_network(cfg, info, env) if which == "ours" else torchvision_network(cfg, info, env)
        self.macs = summarize(bare, info.image_size)["total"]["macs"]
        self.batches = make_batches(cfg, info, env, loader_mode)
        self.parts = build.build_step(cfg, info, env, bare, total_steps, self.batches.steps_per_epoch or total_steps,
                                      build.run_length(cfg, info, env.world_size)[1], note)
        bare.train()
        self.acc = torch.zeros(4, device=env.device)
        self.step = 0
        # --log-every: the trainer's per-step bookkeeping and its read once per interval, inside the timing
        self.log_every = log_every
        self.meter = monitor.IntervalMeter(env.device, cfg.data.batch_size)
        self.watch = monitor.NonFiniteWatch(self.parts.settings)
        self.windows: list = []  # (start, end) CUDA events or seconds
        self.peak_mib = float("nan")

    def warm_up(self, steps: int) -> None:
        """Untimed steps; a torch.compile failure in the first one falls back to eager."""
        for _ in range(steps):
            self.parts(self.batches.next(), self.step)
            self.step += 1
        _sync(self.env.device)
        if self.env.device.type == "cuda":  # what this network's step needs beyond what existed before it
            self.peak_mib = (torch.cuda.max_memory_allocated(self.env.device) - self.baseline) / 2**20

    def window(self, steps: int) -> None:
        """Queue ``steps`` steps between two CUDA events (no sync), or time them on the host (CPU)."""
        cuda = self.env.device.type == "cuda"
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            _sync(self.env.device)
            tick = time.perf_counter()
        for _ in range(steps):
            micro = self.batches.next()
            stats = self.parts(micro, self.step)
            self.acc += stats.values
            if self.log_every:
                self.meter.add(stats, 0.0)
                self.watch.add(stats, self.step)
            self.step += 1
            if self.log_every and self.step % self.log_every == 0:
                self.meter.read()
                self.watch.check(self.env)
        if cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.windows.append((start, end))
        else:
            self.windows.append(time.perf_counter() - tick)

    def seconds(self) -> list[float]:
        """Each window's duration (call after a device synchronization)."""
        return [w if isinstance(w, float) else w[0].elapsed_time(w[1]) / 1e3 for w in self.windows]

    def result(self, images_per_step: int, steps: int) -> dict:
        """Images/s (median, min, max), TFLOP/s per device, share of the peak, memory, compile state, loss."""
        env = self.env
        seconds = self.seconds()
        rates = [images_per_step * steps / max(t, 1e-12) for t in seconds]
        median = statistics.median(rates)
        tflops = self.macs * 2 * 3 * median / env.world_size / 1e12
        loss_sum, _, count, _ = distributed.all_reduce_sum(self.acc.clone()).tolist()
        if env.device.type == "cuda":
            memory, memory_kind = self.peak_mib, "peak allocated"
        else:
            memory, memory_kind = rss_max_mib(), "process RSS max"
        result = {"model": self.which, "images_per_s": {"median": median, "min": min(rates), "max": max(rates)},
                  "window_seconds": seconds, "tflops_per_device": tflops, "macs_per_image": self.macs,
                  "peak_memory_mib": memory, "memory_kind": memory_kind, "compile": self.parts.compiled,
                  "mean_loss": loss_sum / max(count, 1.0), "peak": None}
        if env.device.type == "cuda":
            peak = peak_tflops(device_name(env.device), precision(self.cfg, env.device))
            if peak is not None:
                result["peak"] = {"gpu": peak[0], "precision": peak[1], "tflops": peak[2],
                                  "share": tflops / peak[2]}
        return result


def measure(cfg: Config, info, env, loader_mode: str, args: argparse.Namespace,
            note: Callable[[str], None] = print) -> dict:
    """Time ours (and torchvision's twin): each warmed up on its own, then their windows interleaved.

    Interleaving (ours first in even windows, torchvision first in odd ones) exposes both to the same clock,
    thermal and neighbour drift, so the ratio is fairer than two back-to-back runs.
    """
    names = ["ours", "torchvision"] if args.compare_torchvision else ["ours"]
    total_steps = args.warmup + args.steps * args.windows
    runners = []
    for name in names:
        runner = Runner(name, cfg, info, env, loader_mode, total_steps, note, args.log_every)
        runner.warm_up(args.warmup)
        runners.append(runner)
    if len(runners) > 1 and any(r.parts.compiled == "fallback" for r in runners):
        for runner in runners:  # a fallback resets dynamo's caches: recompile the others before timing
            runner.warm_up(1)
    for w in range(args.windows):
        for runner in runners if w % 2 == 0 else runners[::-1]:
            runner.window(args.steps)
    _sync(env.device)
    results = {r.which: r.result(cfg.data.batch_size, args.steps) for r in runners}
    if loader_mode != "fixed":
        results["loader"] = loader_ceiling(make_batches(cfg, info, env, loader_mode), cfg.data.batch_size, env, args)
    return results


def loader_ceiling(batches, global_batch: int, env, args: argparse.Namespace) -> dict:
    """The loader alone (no model): images/s over the same windows, so a user sees which of the two limits a run."""
    for _ in range(args.warmup):
        batches.next()
    rates = []
    for _ in range(args.windows):
        _sync(env.device)
        tick = time.perf_counter()
        for _ in range(args.steps):
            batches.next()
        _sync(env.device)
        rates.append(global_batch * args.steps / max(time.perf_counter() - tick, 1e-12))
    return {"images_per_s": {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}}


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's description."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def precision(cfg: Config, device: torch.device) -> str:
    """The tensor-core precision the convolutions run at: bf16 | fp16 | tf32 | fp32."""
    if cfg.train.amp != "none":
        return cfg.train.amp
    conv = getattr(torch.backends.cudnn, "conv", None)
    setting = getattr(conv, "fp32_precision", None) if conv is not None else None
    if setting is None:
        return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"
    return "tf32" if setting == "tf32" else "fp32"


def peak_tflops(name: str, prec: str) -> tuple[str, str, float] | None:
    """``(gpu label, precision, dense peak TFLOP/s)`` for a device name, or None when unknown."""
    lowered = name.lower()
    for pattern, label, peaks in PEAK_TFLOPS:
        if re.search(pattern, lowered):
            if prec == "tf32" and "tf32" not in peaks:
                prec = "fp32"  # no TF32 on this GPU: fp32 convolutions run on CUDA cores
            return (label, prec, peaks[prec]) if prec in peaks else None
    return None


def rss_max_mib() -> float:
    """The process's maximum resident set size so far, in MiB (NaN where ``resource`` is unavailable)."""
    try:
        import resource
    except ImportError:  # not on this platform
        return float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)  # bytes on macOS, KiB on Linux


def comm_bytes(cfg: Config, info, env) -> dict:
    """``comm_hooks.measure_bytes`` for a fresh network of the config: the bytes each rank hands to the gradient
    all-reduce per step with each hook, from the tensors of real DDP steps (the run's process group under a
    launcher, else a temporary 1-process gloo group: the bytes per rank do not depend on the world size)."""
    import tempfile

    build.seed_everything(cfg.train.seed, env.rank)
    bare = build.build_network(cfg, info, env)
    with tempfile.TemporaryDirectory() as store:
        return comm_hooks.measure_bytes(bare, cfg, env, info.image_size, store)


# --------------------------------------------------------------------------------------------- output
def format_comm_bytes(figures: dict, cfg: Config, env) -> str:
    """The per-step all-reduce bytes of each hook, and each one's share of plain fp32 (none)."""
    none = figures["none"]["bytes"][0]
    lines = [f"comm bytes per rank per step (what the gradient hook hands to all-reduce, counted in real DDP steps; "
             f"{figures['none']['buckets']} buckets; a ring all-reduce sends about 2 x (world-1)/world of it):"]
    for name in comm_hooks.HOOKS:
        counted, calls = figures[name]["bytes"], figures[name]["collectives"]
        line = (f"  {name:<9}: {counted[-1] / 2**20:9.3f} MiB ({counted[-1]} bytes, {calls[-1]} all-reduces) | "
                f"{counted[-1] / none:.3f} x none")
        if name == "powersgd":
            line += (f" after its warm-up (dist.powersgd_rank={cfg.dist.powersgd_rank}); during the first "
                     f"dist.powersgd_warmup_steps={cfg.dist.powersgd_warmup_steps} steps {counted[0]} bytes "
                     f"({counted[0] / none:.3f} x none)")
        lines.append(line)
    if not env.distributed and cfg.dist.comm_hook != "none":
        lines.append(f"  (timed above without a hook: dist.comm_hook={cfg.dist.comm_hook} needs more than one process)")
    return "\n".join(lines)


def format_result(label: str, r: dict, env) -> str:
    """One line: images/s median (min, max) | TFLOP/s | share of peak | memory | compile | loss."""
    ips = r["images_per_s"]
    if r["peak"] is not None:
        p = r["peak"]
        share = f"{100 * p['share']:.1f}% of {p['gpu']} dense {p['precision']} peak ({p['tflops']:g} TFLOP/s)"
    else:
        share = "peak unknown" + (" (cpu)" if env.device.type == "cpu" else "")
    return (f"{label:<12}: {ips['median']:.1f} images/s median (min {ips['min']:.1f}, max {ips['max']:.1f}) | "
            f"{r['tflops_per_device']:.3f} TFLOP/s per device | {share} | {r['memory_kind']} "
            f"{r['peak_memory_mib']:.0f} MiB | compile {r['compile']} | "
            f"loss {r['mean_loss']:.4f}")


def format_loader(loader: dict, ours: dict) -> str:
    """The loader's own ceiling next to the step's rate, and which of the two limits the run."""
    alone, step = loader["images_per_s"], ours["images_per_s"]["median"]
    limit = "the loader limits this run" if alone["median"] < 1.25 * step else "the model step limits this run"
    return (f"loader alone: {alone['median']:.1f} images/s median (min {alone['min']:.1f}, max {alone['max']:.1f}), "
            f"no model | the step with it: {step:.1f} images/s | {limit}")


def settings_of(cfg: Config, info, env, loader_mode: str, args: argparse.Namespace) -> dict:
    """The settings that shape the measurement (printed and written to --json)."""
    accum = build.accumulation(cfg, env.world_size)
    fused = uses_fused(cfg, env.device)
    return {
        "model": cfg.model.name, "stem": resolve_stem(cfg, info) or "cifar", "res": info.image_size,
        "num_classes": info.num_classes, "batch_per_process": cfg.data.batch_size // env.world_size,
        "accum_steps": accum, "world_size": env.world_size, "global_batch": cfg.data.batch_size,
        "amp": cfg.train.amp, "channels_last": cfg.train.channels_last, "compile": cfg.train.compile,
        "sync_bn": cfg.train.sync_bn and env.distributed, "data": cfg.data.dataset,
        "loader": loader_mode + (f" (decode {cfg.data.decode})" if cfg.data.dataset == "imagefolder" else ""),
        "optimizer": f"{cfg.optim.name}({'fused' if fused else 'foreach'})", "comm_hook": cfg.dist.comm_hook,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark) if env.device.type == "cuda" else "n/a",
        "device": str(env.device), "device_name": device_name(env.device), "torch": torch.__version__,
        "warmup": args.warmup, "steps_per_window": args.steps, "windows": args.windows,
        "launcher": env.launcher,
    }


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_CONFIG


def format_settings(s: dict) -> str:
    """The two header lines: what is measured, and with which settings."""
    return (f"bench: {s['model']} stem={s['stem']} res={s['res']} classes={s['num_classes']} | batch "
            f"{s['batch_per_process']} per process x {s['world_size']} process(es) = {s['global_batch']} "
            f"images/step (accum {s['accum_steps']}) | {s['device']} ({s['device_name']}), torch {s['torch']}\n"
            f"settings: amp={s['amp']} channels_last={s['channels_last']} compile={s['compile']} "
            f"sync_bn={s['sync_bn']} data={s['data']} loader={s['loader']} optimizer={s['optimizer']} "
            f"comm_hook={s['comm_hook']} "
            f"cudnn.benchmark={s['cudnn_benchmark']} | warmup {s['warmup']} steps, then {s['windows']} "
            f"windows x {s['steps_per_window']} steps")


def main(argv: list[str] | None = None) -> int:
    """Parse, validate, initialise, measure, print; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        return _error("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
    for name in ("steps", "warmup", "windows"):
        if getattr(args, name) < 1:
            return _error(f"--{name}: must be >= 1, got {getattr(args, name)}")
    if args.log_every < 0:
        return _error(f"--log-every: must be >= 0, got {args.log_every}")
    launch = distributed.read_env()
    try:
        cfg, loader_mode = bench_config(args, launch.world_size)
        info = fixed_info(cfg, args.classes) if loader_mode == "fixed" else data_mod.describe(cfg.data)
        if args.compare_torchvision and cfg.model.name not in TORCHVISION_TWINS:
            raise ConfigError(f"--compare-torchvision: torchvision has no model '{cfg.model.name}'; models it "
                              f"shares with ddp_resnet: {', '.join(TORCHVISION_TWINS)}")
        device = distributed.resolve_device(cfg.train.device, launch.local_rank)
        if cfg.train.amp == "fp16" and device.type != "cuda":
            raise ConfigError("--amp fp16 needs CUDA; valid choices on CPU: none, bf16")
        resolve_model_stem(cfg.model.name, resolve_stem(cfg, info))  # e.g. resnet20 with the imagenet stem
    except (ConfigError, ValueError) as exc:
        return _error(str(exc))
    env = distributed.init(cfg.train.device, cfg.dist.backend, cfg.dist.timeout_s, launch)
    note = print if env.is_main else (lambda message: None)
    try:
        build.apply_torch_flags(cfg)
        settings = settings_of(cfg, info, env, loader_mode, args)
        if env.is_main:
            print(format_settings(settings), flush=True)
        results = measure(cfg, info, env, loader_mode, args, note)
        if args.comm_bytes:
            results["comm_bytes"] = comm_bytes(cfg, info, env)
        ratio = None
        if "torchvision" in results:
            ratio = results["ours"]["images_per_s"]["median"] / results["torchvision"]["images_per_s"]["median"]
        if env.is_main:
            r = results["ours"]
            print(f"work: {r['macs_per_image'] / 1e9:.3f} GMACs/image forward -> "
                  f"{r['macs_per_image'] * 6 / 1e9:.3f} GFLOP/image per training step (x2 FLOP/MAC, x3 fwd+bwd)",
                  flush=True)
            for name in ("ours", "torchvision"):
                if name in results:
                    print(format_result(name, results[name], env), flush=True)
            if ratio is not None:
                print(f"ratio ours/torchvision: {ratio:.3f} (median images/s)", flush=True)
            if "loader" in results:
                print(format_loader(results["loader"], results["ours"]), flush=True)
            if "comm_bytes" in results:
                print(format_comm_bytes(results["comm_bytes"], cfg, env), flush=True)
        if env.is_main and args.json:
            Path(args.json).write_text(json.dumps({"settings": settings, "results": results, "ratio": ratio},
                                                  indent=2, default=str))
    finally:
        if env.distributed:
            distributed.cleanup()
    return EXIT_OK


def cli() -> None:
    """Console entry point; ``suite ...`` runs the timed benchmark suite (``ddp_resnet.suite``)."""
    if sys.argv[1:2] == ["suite"]:
        from ddp_resnet import suite

        sys.exit(suite.main(sys.argv[2:]))
    sys.exit(main())


if __name__ == "__main__":
    cli()
