"""The measurements of the benchmark suite (``ddp_resnet.suite``): one function per item, each returning its record.

Every timed comparison reuses the bench's machinery (``ddp_resnet.bench``): the item is written as a bench command
line, parsed and validated by ``bench.build_parser`` / ``bench.bench_config`` (so the record can name the
command-equivalent), and each network is a ``bench.Runner`` (the trainer's own step: ``build_step``, DDP when
launched so, torch.compile with its eager fallback). Ours and the peer are built and warmed up one after the other
and then time alternating windows in the same process, as ``--compare-torchvision`` does.

Sizes: ``FULL`` (one GPU) and ``TINY`` (``--tiny``: toy models, batches and data, the same code paths). On the CPU
torch.compile runs with the ``aot_eager`` backend (dynamo and AOTAutograd, without inductor's C++ build, which
would take minutes on a small CPU); on a GPU the default (inductor) backend runs.
"""
from __future__ import annotations

import gc
import gzip
import json
import multiprocessing
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ddp_resnet import bench, build, plainloop, rundir
from ddp_resnet import data as data_mod
from ddp_resnet.config import DataConfig
from ddp_resnet.data import cifar
from ddp_resnet.data.cifar_from_images import write_cifar_batches
from ddp_resnet.data.synthetic import make_synthetic

REPO = Path(__file__).resolve().parents[1]
FAST_RECIPE = REPO / "configs" / "cifar10_resnet18_fast.yaml"
CPU_COMPILE_BACKEND = "aot_eager"
DEVICE_TRACE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")

FULL: dict[str, dict] = {
    "resnet50_224": dict(model="resnet50", res=224, batch=256, warmup=5, steps=10, windows=4, profile_steps=3),
    "resnet18_cifar_loader": dict(model="resnet18", res=32, batch=512, warmup=10, steps=30, windows=5,
                                  synthetic_train=50000),
    "fast_recipe": dict(overrides=[]),
    "seeds_pipeline_epoch": dict(model="resnet18", batch=128, workers=4, ours_batch=512, ours_warmup=10, windows=2,
                                 random_train=50000, random_test=10000),
    "imagefolder_decode": dict(model="resnet50", res=224, batch=256, files=10000, val_files=500, classes=100,
                               side=[400, 350], warmup=5, steps=8, windows=4, workers=0),  # 0: every core
}
TINY: dict[str, dict] = {
    "resnet50_224": dict(model="resnet18", stem="imagenet", res=32, batch=8, warmup=1, steps=2, windows=2,
                         profile_steps=2),
    "resnet18_cifar_loader": dict(model="resnet18", res=16, batch=8, warmup=1, steps=2, windows=2,
                                  synthetic_train=64),
    "fast_recipe": dict(overrides=["model.name=resnet20", "train.epochs=2", "data.batch_size=32",
                                   "data.eval_batch_size=64", "train.log_every=5"]),
    "seeds_pipeline_epoch": dict(model="resnet20", batch=32, workers=2, ours_batch=32, ours_warmup=1, windows=2),
    "imagefolder_decode": dict(model="resnet18", stem="imagenet", res=32, batch=8, files=48, val_files=8, classes=4,
                               side=[80, 70], warmup=1, steps=2, windows=2, workers=2),
}
TINY_CIFAR = dict(per_batch=64, test=64)  # 320 training, 64 test images


class ItemSkipped(RuntimeError):
    """An item that cannot run here (its reason in one line)."""


# --------------------------------------------------------------------------------------------- the context
@dataclass
class Context:
    """What every item gets: where to write, the device, the sizes, the budget clock and the shared findings."""

    out: Path
    scratch: Path
    env: object  # distributed.DistEnv
    tiny: bool
    cifar_root: Path | None
    deadline: float  # time.monotonic() at which the budget ends
    note: Callable[[str], None] = print
    shared: dict = field(default_factory=dict)  # figures one item leaves for a later one

    @property
    def device(self) -> torch.device:
        """The device the suite measures."""
        return self.env.device

    def sizes(self, item: str) -> dict:
        """The item's sizes in this mode."""
        return (TINY if self.tiny else FULL)[item]

    def left(self) -> float:
        """Seconds of the budget left."""
        return self.deadline - time.monotonic()

    def release(self) -> None:
        """Free what the last measurement held: compiled graphs, cached device memory, loader workers."""
        gc.collect()
        import torch._dynamo

        torch._dynamo.reset()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def compile_backend(self) -> str:
        """The torch.compile backend in use here."""
        return CPU_COMPILE_BACKEND if self.device.type == "cpu" else "inductor"


def sync(device: torch.device) -> None:
    """Wait for the device's queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    return a / b if a is not None and b else None


# --------------------------------------------------------------------------------------------- bench reuse
@dataclass
class BenchSetup:
    """A bench command line, parsed and validated the way ``python -m ddp_resnet.bench`` does."""

    argv: list[str]
    args: object
    cfg: object
    mode: str
    info: object

    @property
    def command(self) -> str:
        """The equivalent shell command."""
        return "python -m ddp_resnet.bench " + shlex.join(self.argv)

    def settings(self, env) -> dict:
        """The bench's settings record."""
        return bench.settings_of(self.cfg, self.info, env, self.mode, self.args)


def bench_setup(argv: list[str]) -> BenchSetup:
    """Parse ``argv`` as bench arguments, resolve the config and describe the data (raises ConfigError); on the CPU
    torch.compile gets the CPU backend (``train.compile_backend``, see the module docstring)."""
    if "--device" in argv and argv[argv.index("--device") + 1] == "cpu":
        argv = [*argv, f"train.compile_backend={CPU_COMPILE_BACKEND}"]
    args = bench.build_parser().parse_args(argv)
    cfg, mode = bench.bench_config(args, 1)
    info = bench.fixed_info(cfg, args.classes) if mode == "fixed" else data_mod.describe(cfg.data)
    build.apply_torch_flags(cfg)
    return BenchSetup(list(argv), args, cfg, mode, info)


def common_argv(ctx: Context, z: dict) -> list[str]:
    """The bench flags every item shares: device and timing windows."""
    return ["--device", ctx.device.type, "--warmup", str(z["warmup"]), "--steps", str(z["steps"]),
            "--windows", str(z["windows"])]


def timed_pair(setup: BenchSetup, ctx: Context, which: tuple[str, ...] = ("ours", "torchvision"),
               extra_steps: int = 0) -> tuple[dict, dict]:
    """Build and warm up each network in turn, then time alternating windows (ours first in even windows, the
    peer first in odd ones); ``(results by name, runners by name)``."""
    a = setup.args
    total = a.warmup + a.steps * a.windows + extra_steps + 2
    runners = {}
    for name in which:
        runner = bench.Runner(name, setup.cfg, setup.info, ctx.env, setup.mode, total, ctx.note)
        runner.warm_up(a.warmup)
        runners[name] = runner
    if len(runners) > 1 and any(r.parts.compiled == "fallback" for r in runners.values()):
        for runner in runners.values():  # a fallback reset dynamo's caches: recompile the others before timing
            runner.warm_up(1)
    order = list(runners.values())
    for w in range(a.windows):
        for runner in order if w % 2 == 0 else order[::-1]:
            runner.window(a.steps)
    sync(ctx.device)
    return {name: r.result(setup.cfg.data.batch_size, a.steps) for name, r in runners.items()}, runners


def median_ips(result: dict) -> float:
    """The median images/s of a bench result."""
    return result["images_per_s"]["median"]


# --------------------------------------------------------------------------------------------- profiling
def kernel_gaps(events: list[dict], top: int = 5) -> dict:
    """Device busy time, idle share and the largest idle gaps between kernels in a Chrome trace's events."""
    kernels = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in DEVICE_TRACE_CATS),
                     key=lambda e: e["ts"])
    if not kernels:
        return {"kernels": 0, "note": "no device kernels in the trace (a CPU run): see the operator table"}
    busy, gaps, totals = 0.0, [], {}
    start, end = kernels[0]["ts"], kernels[0]["ts"] + kernels[0].get("dur", 0)
    first, previous = start, kernels[0]["name"]
    for e in kernels:
        totals[e["name"]] = totals.get(e["name"], 0.0) + e.get("dur", 0)
        s, t = e["ts"], e["ts"] + e.get("dur", 0)
        if s > end:
            gaps.append((s - end, previous))
            busy += end - start
            start, end = s, t
        else:
            end = max(end, t)
        previous = e["name"]
    busy += end - start
    span = max(end - first, 1e-9)
    big = [g for g in gaps if g[0] > 10]
    return {"kernels": len(kernels), "span_ms": span / 1e3, "busy_ms": busy / 1e3, "idle_share": 1 - busy / span,
            "gaps_over_10us": len(big), "idle_in_gaps_over_10us_ms": sum(g for g, _ in big) / 1e3,
            "largest_gaps": [{"gap_us": g, "after": name[:100]} for g, name in sorted(gaps, reverse=True)[:top]],
            "top_kernels": [{"name": n[:100], "total_us": t}
                            for n, t in sorted(totals.items(), key=lambda kv: -kv[1])[:top]]}


def format_gaps(gaps: dict) -> str:
    """The gap summary as text, for the profile file."""
    if not gaps["kernels"]:
        return gaps["note"]
    lines = [f"device: {gaps['kernels']} kernels over {gaps['span_ms']:.2f} ms, busy {gaps['busy_ms']:.2f} ms, "
             f"idle {100 * gaps['idle_share']:.1f}% ({gaps['gaps_over_10us']} gaps > 10 us, "
             f"{gaps['idle_in_gaps_over_10us_ms']:.2f} ms: the device waited for the host)", "largest idle gaps:"]
    lines += [f"  {g['gap_us']:9.1f} us after {g['after']}" for g in gaps["largest_gaps"]]
    lines += ["top kernels by total time:"] + [f"  {k['total_us'] / 1e3:9.3f} ms {k['name']}"
                                             for k in gaps["top_kernels"]]
    return "\n".join(lines)


def profile_runner(runner, steps: int, stem: Path, ctx: Context, title: str) -> dict:
    """A torch.profiler record of ``steps`` steps: ``STEM.txt`` (operator table, device gaps) and
    ``STEM.trace.json.gz`` (Chrome / Perfetto trace); returns the gap summary and the file names."""
    from torch.profiler import ProfilerActivity, profile

    cuda = ctx.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(ctx.device)
    with profile(activities=activities) as prof:
        runner.window(steps)
        sync(ctx.device)
    raw = stem.with_name(f".{stem.name}.{os.getpid()}.json")
    prof.export_chrome_trace(str(raw))
    trace = json.loads(raw.read_text())
    trace_path = stem.with_name(stem.name + ".trace.json.gz")
    with open(raw, "rb") as src, gzip.open(trace_path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    gaps = kernel_gaps(trace.get("traceEvents", []) if isinstance(trace, dict) else trace)
    table = prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=25)
    text = (f"{title}: {steps} steps under torch.profiler (trace: {trace_path.name})\n\n{format_gaps(gaps)}\n\n"
            f"operators by self {'device' if cuda else 'CPU'} time:\n{table}\n")
    rundir.write_text_atomic(stem.with_name(stem.name + ".txt"), text)
    return {"table": stem.name + ".txt", "trace": trace_path.name, "steps": steps, **gaps}


# --------------------------------------------------------------------------------------------- 1. resnet50_224
def resnet50_224(ctx: Context) -> dict:
    """ResNet-50 at 224 px, bf16, channels_last, synthetic input: ours vs torchvision, eager and compiled."""
    z = ctx.sizes("resnet50_224")
    base = [*common_argv(ctx, z), "--model", z["model"], "--res", str(z["res"]), "--batch", str(z["batch"]),
            "--amp", "bf16", "--channels-last", "--compare-torchvision",
            *(["--stem", z["stem"]] if "stem" in z else [])]
    variants, commands, settings, profile = {}, [], {}, None
    for name, flag in (("eager", "--no-compile"), ("compile", "--compile")):
        setup = bench_setup([*base, flag])
        commands.append(setup.command)
        settings[name] = setup.settings(ctx.env)
        results, runners = timed_pair(setup, ctx, extra_steps=z["profile_steps"])
        if name == "compile":
            profile = profile_runner(runners["ours"], z["profile_steps"], ctx.out / "profile_resnet50", ctx,
                                     f"{z['model']} {z['res']} px batch {z['batch']} bf16 channels_last, ours "
                                     f"compiled ({ctx.compile_backend()})")
        del runners
        ctx.release()
        variants[name] = {**results, "ratio": ratio(median_ips(results["ours"]), median_ips(results["torchvision"]))}
        ctx.note(f"  {name}: ours {median_ips(results['ours']):.1f} img/s, torchvision "
                 f"{median_ips(results['torchvision']):.1f} img/s, ratio {variants[name]['ratio']:.3f}")
    ctx.shared["step_img_per_s_eager"] = median_ips(variants["eager"]["ours"])
    ours, peer = median_ips(variants["compile"]["ours"]), median_ips(variants["compile"]["torchvision"])
    return {"figure": "training img/s, compiled", "unit": "img/s", "ours": ours, "peer": peer,
            "peer_name": f"torchvision {z['model']}, compiled", "ratio": ratio(ours, peer),
            "holds": ratio(ours, peer) >= 1.0, "aim": {"img_per_s": 8000, "met": ours >= 8000},
            "commands": commands, "settings": settings, "compile_backend": ctx.compile_backend(),
            "variants": variants, "profile": profile}


# --------------------------------------------------------------------------------------------- 2. cifar loader
def resnet18_cifar_loader(ctx: Context) -> dict:
    """ResNet-18 (CIFAR stem) at 32 px, batch 512, compiled, fed by the device-resident loader with augmentation."""
    z = ctx.sizes("resnet18_cifar_loader")
    if ctx.cifar_root is not None:
        root, source = cifar_data(ctx, for_accuracy=False)
        data = ["--data", "cifar10", "--root", str(root)]
    else:
        data = ["--data", "synthetic", "--loader", "gpu", "--classes", "10"]
        source = (f"synthetic uint8 images ({z['synthetic_train']} generated in memory; no --cifar-root) in the same "
                  f"device-resident loader with crop+flip")
    argv = [*common_argv(ctx, z), "--config", str(FAST_RECIPE), "--model", z["model"], "--stem", "cifar", "--res",
            str(z["res"]), "--batch", str(z["batch"]), "--amp", "bf16", "--channels-last", "--compile",
            "--compare-torchvision", *data]
    if ctx.cifar_root is None:
        argv.append(f"data.synthetic_train_size={z['synthetic_train']}")
    setup = bench_setup(argv)
    results, runners = timed_pair(setup, ctx)
    del runners
    ctx.release()
    loader = bench.loader_ceiling(bench.make_batches(setup.cfg, setup.info, ctx.env, setup.mode),
                                  setup.cfg.data.batch_size, ctx.env, setup.args)
    ours, peer = median_ips(results["ours"]), median_ips(results["torchvision"])
    return {"figure": "training img/s, compiled, loader + augmentation timed", "unit": "img/s", "ours": ours,
            "peer": peer, "peer_name": f"torchvision {z['model']} (CIFAR stem), same loader",
            "ratio": ratio(ours, peer),
            "holds": ours >= 60000, "data": source, "augment": setup.info.augment, "loader": setup.mode,
            "loader_alone": loader, "command": setup.command, "settings": setup.settings(ctx.env),
            "compile_backend": ctx.compile_backend(), "variants": {"compile": results}}


# --------------------------------------------------------------------------------------------- CIFAR data
def write_tiny_cifar(root: Path, per_batch: int = TINY_CIFAR["per_batch"], n_test: int = TINY_CIFAR["test"]) -> Path:
    """A small learnable dataset (``data.synthetic`` patterns) in CIFAR-10's python layout under ``root``."""
    tx, ty, vx, vy = make_synthetic(5 * per_batch, n_test, 10, 32)
    return write_cifar_batches(root, (tx, ty), (vx, vy), [f"class_{i}" for i in range(10)]).parent


def write_random_cifar(root: Path, n_train: int, n_test: int) -> Path:
    """Random uint8 images in CIFAR-10's layout (for timing only: nothing to learn)."""
    rng = np.random.default_rng(0)
    split = [(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)) for n in (n_train, n_test)]
    return write_cifar_batches(root, split[0], split[1], [f"class_{i}" for i in range(10)]).parent


def write_cifar_subset(src: Path, root: Path, n_train: int, n_test: int) -> Path:
    """The first images of a real CIFAR-10 copy, in its layout under ``root`` (tiny runs with --cifar-root)."""
    tx, ty = cifar.read_cifar_split(src, "cifar10", train=True)
    vx, vy = cifar.read_cifar_split(src, "cifar10", train=False)
    names = cifar.read_class_names(src, "cifar10")
    return write_cifar_batches(root, (tx[:n_train], ty[:n_train]), (vx[:n_test], vy[:n_test]), names).parent


def cifar_data(ctx: Context, for_accuracy: bool) -> tuple[Path, str]:
    """``(root holding cifar-10-batches-py/, what it is)``. Full sizes: --cifar-root, else random CIFAR-format images
    under the scratch directory (timing only; an accuracy item is skipped). Tiny: a small copy under the scratch
    directory, the first images of --cifar-root, else a learnable generated one."""
    n_train, n_test = 5 * TINY_CIFAR["per_batch"], TINY_CIFAR["test"]
    if ctx.tiny:
        root = ctx.scratch / ("tiny_cifar_subset" if ctx.cifar_root else "tiny_cifar_generated")
        if ctx.cifar_root is not None:
            write_cifar_subset(ctx.cifar_root, root, n_train, n_test)  # cheap; rewritten (the root may differ)
            return root, f"the first {n_train} train, {n_test} test images of CIFAR-10 from {ctx.cifar_root} (tiny)"
        if not (root / "cifar-10-batches-py" / "batches.meta").is_file():
            write_tiny_cifar(root)
        return root, f"generated tiny CIFAR-format data ({n_train} train, {n_test} test; no --cifar-root)"
    if ctx.cifar_root is not None:
        return ctx.cifar_root, f"CIFAR-10 from {ctx.cifar_root}"
    if for_accuracy:
        raise ItemSkipped("needs real CIFAR-10 (--cifar-root DIR holding cifar-10-batches-py/)")
    z = ctx.sizes("seeds_pipeline_epoch")
    root = ctx.scratch / "random_cifar"
    if not (root / "cifar-10-batches-py" / "batches.meta").is_file():
        write_random_cifar(root, z["random_train"], z["random_test"])
    return root, f"random CIFAR-format images ({z['random_train']} train; no --cifar-root), for timing only"


# --------------------------------------------------------------------------------------------- 3. fast recipe
def fast_recipe_command(ctx: Context, root: Path, out: Path) -> list[str]:
    """The training command of the fast recipe (tiny: its toy version)."""
    z = ctx.sizes("fast_recipe")
    cpu = ["train.compile=false", "dist.backend=gloo"] if ctx.device.type == "cpu" else []
    return [sys.executable, "-m", "ddp_resnet.train", "--config", str(FAST_RECIPE), f"data.root={root}",
            f"output_dir={out}", "ckpt.resume=none", "ckpt.overwrite=true", f"train.device={ctx.device.type}",
            *z["overrides"], *cpu]


def fast_recipe(ctx: Context) -> dict:
    """configs/cifar10_resnet18_fast.yaml trained to the end: test accuracy and training seconds."""
    root, source = cifar_data(ctx, for_accuracy=True)
    out = ctx.out / "fast_recipe"
    cmd = fast_recipe_command(ctx, root, out)
    log_path = ctx.out / "fast_recipe.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if ctx.device.type == "cpu":
        env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    timed_out = False
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            code = proc.wait(timeout=max(ctx.left(), 1.0))
        except subprocess.TimeoutExpired:
            proc.kill()
            code, timed_out = proc.wait(), True
    shutil.rmtree(out / rundir.CHECKPOINTS, ignore_errors=True)  # tens of MB, not needed for the figures
    records = rundir.read_metrics(out)
    if code != 0 and not timed_out:
        tail = log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"the training run exited {code}: {tail[0][:200]} (see {log_path.name})")
    tested = [r for r in records if "test_acc" in r]
    times = [r["epoch_time_s"] for r in records]
    acc = tested[-1]["test_acc"] if tested else None
    train_s, after_first = sum(times), sum(times[1:])
    record = {"figure": "test accuracy (%) after the run; training seconds", "unit": "%", "ours": acc,
              "peer": None, "ratio": None, "train_s": train_s, "train_s_without_first_epoch": after_first,
              "epochs": len(records), "data": source, "command": shlex.join(["python", *cmd[1:]]),
              "log": log_path.name, "metrics": str((out / rundir.METRICS).relative_to(ctx.out)),
              "holds": acc is not None and acc >= 91.0 and train_s <= 30.0,
              "holds_without_first_epoch": acc is not None and acc >= 91.0 and after_first <= 30.0,
              "per_epoch": [{k: r.get(k) for k in ("epoch", "test_acc", "epoch_time_s", "img_per_s")}
                            for r in records]}
    if timed_out:
        record.update(status="timeout", reason=f"the training run was stopped when the budget ran out, after "
                                               f"{len(records)} epoch(s)", holds=False)
    return record


# --------------------------------------------------------------------------------------------- 4. seeds' pipeline
def seeds_pipeline_epoch(ctx: Context) -> dict:
    """One CIFAR-10 epoch of the seeds' plain loop (PIL in workers, fp32, batch 128) vs ours (fast recipe)."""
    z = ctx.sizes("seeds_pipeline_epoch")
    root, source = cifar_data(ctx, for_accuracy=False)
    plain_settings = plainloop.PlainSettings(root=str(root), model=z["model"], epochs=1, batch=z["batch"], lr=0.1,
                                             momentum=0.9, weight_decay=5e-4, workers=z["workers"],
                                             device=ctx.device.type)
    plain = plainloop.build(plain_settings)
    probe = bench_setup(["--device", ctx.device.type, "--config", str(FAST_RECIPE), "--data", "cifar10", "--root",
                         str(root), "--model", z["model"], "--batch", str(z["ours_batch"])])
    per_epoch = build.steps_per_epoch(probe.cfg, probe.info, 1)
    setup = bench_setup(["--device", ctx.device.type, "--warmup", str(z["ours_warmup"]), "--steps", str(per_epoch),
                         "--windows", str(z["windows"]), *probe.argv[2:]])
    plain_runs = []
    runner = bench.Runner("ours", setup.cfg, setup.info, ctx.env, setup.mode,
                          z["ours_warmup"] + per_epoch * z["windows"] + 2, ctx.note)
    runner.warm_up(z["ours_warmup"])
    for w in range(z["windows"]):  # ours, seeds, seeds, ours, ...
        for who in ("ours", "plain") if w % 2 == 0 else ("plain", "ours"):
            if who == "ours":
                runner.window(per_epoch)
            else:
                plain_runs.append(plainloop.train_epoch(plain))
    sync(ctx.device)
    ours_runs = runner.seconds()
    plain_source = plain.source
    del runner, plain
    ctx.release()
    ours_s, plain_s = statistics.median(ours_runs), statistics.median(r["epoch_time_s"] for r in plain_runs)
    images = per_epoch * setup.cfg.data.batch_size
    plain_cmd = (f"python -m ddp_resnet.plainloop --root {shlex.quote(str(root))} --model {z['model']} --epochs 1 "
                 f"--batch {z['batch']} --lr 0.1 --momentum 0.9 --wd 5e-4 --workers {z['workers']}")
    return {"figure": "seconds per training epoch", "unit": "s", "ours": ours_s, "peer": plain_s,
            "peer_name": f"seeds' plain loop ({z['workers']} PIL workers, fp32, batch {z['batch']})",
            "plain_precision": "fp32 (on CUDA, convolutions in TF32: PyTorch's default)",
            "ratio": ratio(plain_s, ours_s), "holds": ours_s <= 0.8, "data": source,
            "plain_dataset": plain_source,
            "ours_epoch_seconds": ours_runs, "plain_epoch_seconds": [r["epoch_time_s"] for r in plain_runs],
            "ours_img_per_s": images / ours_s, "plain_img_per_s": plain_runs[0]["images"] / plain_s,
            "command": setup.command, "plain_command": plain_cmd, "settings": setup.settings(ctx.env),
            "compile_backend": ctx.compile_backend()}


# --------------------------------------------------------------------------------------------- 5. imagefolder decode
def _write_jpeg(job: tuple[str, int, tuple[int, int]]) -> int:
    """One generated JPEG (smooth colour field plus noise, size jittered +-15%); its size in bytes."""
    from PIL import Image

    path, index, (width, height) = job
    rng = np.random.default_rng(index)
    w, h = (int(v * rng.uniform(0.85, 1.15)) for v in (width, height))
    coarse = Image.fromarray(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
    return os.path.getsize(path)


def make_jpeg_tree(root: Path, n_train: int, n_val: int, classes: int, side: list[int], workers: int) -> dict:
    """An ImageFolder tree of generated JPEGs (``train/`` and ``val/``), written by ``workers`` processes; reused
    when a complete one of the same shape exists (its manifest is written last)."""
    want = {"train": n_train, "val": n_val, "classes": classes, "side": list(side), "version": 1}
    manifest = root / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("shape") == want:
        return {**json.loads(manifest.read_text()), "generated_now": False}
    shutil.rmtree(root, ignore_errors=True)
    jobs = []
    for split, count, offset in (("train", n_train, 0), ("val", n_val, n_train)):
        for c in range(classes):
            (root / split / f"class_{c:03d}").mkdir(parents=True, exist_ok=True)
        jobs += [(str(root / split / f"class_{i % classes:03d}" / f"{i:06d}.jpg"), offset + i, side)
                 for i in range(count)]
    tick = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        sizes = list(pool.imap_unordered(_write_jpeg, jobs, chunksize=max(1, len(jobs) // (8 * workers))))
    made = {"shape": want, "files": len(jobs), "seconds": time.perf_counter() - tick, "processes": workers,
            "mean_kib": sum(sizes) / len(sizes) / 1024}
    rundir.write_text_atomic(manifest, json.dumps(made))
    return {**made, "generated_now": True}


class WaitClock:
    """A bench batch source that adds up the host time the step spent waiting in ``next()``."""

    def __init__(self, inner) -> None:
        self.inner, self.waited = inner, 0.0
        self.steps_per_epoch = inner.steps_per_epoch

    def next(self) -> list:
        """The inner source's next micro-batches, timed."""
        tick = time.perf_counter()
        batch = self.inner.next()
        self.waited += time.perf_counter() - tick
        return batch


def decode_run(setup: BenchSetup, ctx: Context) -> dict:
    """One decode mode on its own: warm-up, its windows back to back, then the loader alone."""
    a = setup.args
    runner = bench.Runner("ours", setup.cfg, setup.info, ctx.env, setup.mode, a.warmup + a.steps * a.windows + 2,
                          ctx.note)
    runner.batches = clock = WaitClock(runner.batches)
    runner.warm_up(a.warmup)
    clock.waited = 0.0
    for _ in range(a.windows):
        runner.window(a.steps)
    sync(ctx.device)
    result = runner.result(setup.cfg.data.batch_size, a.steps)
    result["data_wait_share"] = clock.waited / max(sum(runner.seconds()), 1e-9)
    del runner, clock
    ctx.release()
    result["loader_alone"] = bench.loader_ceiling(bench.make_batches(setup.cfg, setup.info, ctx.env, setup.mode),
                                                  setup.cfg.data.batch_size, ctx.env, a)
    ctx.release()
    return result


def decode_advice(results: dict, workers: int, step_rate: float | None) -> tuple[str, str]:
    """``(faster mode, advice)`` from both modes' figures and the model step's own rate (when item 1 measured it)."""
    wk, dev = median_ips(results["workers"]), median_ips(results["device"])
    faster = "device" if dev > wk else "workers"
    per_worker = results["workers"]["loader_alone"]["images_per_s"]["median"] / max(workers, 1)
    step = step_rate or max(wk, dev)
    need = step / max(per_worker, 1e-9)
    advice = (f"data.decode={faster} is {max(wk, dev) / max(min(wk, dev), 1e-9):.2f}x faster here ({workers} "
              f"workers on {os.cpu_count()} cores). PIL decoding delivers ~{per_worker:.0f} img/s per worker, so "
              f"feeding the step's {'' if step_rate else '>= '}{step:.0f} img/s takes ~{need:.2g} worker cores per GPU")
    advice += ("; with fewer cores per GPU use data.decode=device (workers only read the files)." if need > 1 else
               "; a core or two per GPU suffice either way.")
    return faster, advice


def imagefolder_decode(ctx: Context) -> dict:
    """ImageFolder JPEGs at ImageNet sizes, ResNet-50 bf16: data.decode=workers vs device."""
    z = ctx.sizes("imagefolder_decode")
    cores = os.cpu_count() or 1
    tree = make_jpeg_tree(ctx.scratch / "imagefolder", z["files"], z["val_files"], z["classes"], z["side"], cores)
    workers = z["workers"] or cores
    results, commands = {}, {}
    for mode in ("workers", "device"):
        setup = bench_setup([*common_argv(ctx, z), "--model", z["model"], "--res", str(z["res"]), "--batch",
                             str(z["batch"]), "--amp", "bf16", "--channels-last", "--no-compile", "--data",
                             "imagefolder", "--root", str(ctx.scratch / "imagefolder"), "--decode", mode,
                             *(["--stem", z["stem"]] if "stem" in z else []), f"data.workers={workers}"])
        commands[mode] = setup.command
        results[mode] = decode_run(setup, ctx)
        ctx.note(f"  decode={mode}: {median_ips(results[mode]):.1f} img/s, waits for data "
                 f"{100 * results[mode]['data_wait_share']:.0f}% of the time")
    faster, advice = decode_advice(results, workers, ctx.shared.get("step_img_per_s_eager"))
    default = DataConfig().decode
    ours, peer = median_ips(results["device"]), median_ips(results["workers"])
    return {"figure": "training img/s, decode=device (ours) vs decode=workers (PIL)", "unit": "img/s", "ours": ours,
            "peer": peer, "peer_name": f"data.decode=workers ({workers} PIL workers)", "ratio": ratio(ours, peer),
            "faster": faster, "default": default, "holds": faster == default,
            "action": None if faster == default else f"make data.decode={faster} the default (ddp_resnet/config.py)",
            "advice": advice, "tree": tree, "commands": commands, "variants": results,
            "order": "Each mode timed on its own, back to back: a DataLoader idle during the other mode's windows "
                     "would prefetch ahead and flatter itself", "compile": "off (eager)"}
