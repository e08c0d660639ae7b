"""`python -m ddp_resnet.bench suite --out DIR`: a timed benchmark suite that fits a short GPU window.

    python -m ddp_resnet.bench suite --out DIR [--budget-s 480] [--cifar-root DIR] [--only a,b] [--scratch DIR]
    python -m ddp_resnet.bench suite --out DIR --device cpu --tiny          # every item at toy sizes, on the CPU

Items, in priority order (``ddp_resnet.suite_items`` measures them; targets are for one H200 in bf16):

1. ``resnet50_224``: ResNet-50, 224 px, batch 256, bf16, channels_last, synthetic input, ours vs torchvision's
   model, eager and compiled: img/s, TFLOP/s, share of the dense bf16 peak, peak memory, and a torch.profiler
   table of our compiled steps (``DIR/profile_resnet50.txt``, trace beside it).
2. ``resnet18_cifar_loader``: ResNet-18 (CIFAR stem), 32 px, batch 512, compiled, the device-resident loader and
   its crop+flip inside the timing; ours vs torchvision's resnet18 with the same stem, fed by the same loader.
3. ``fast_recipe``: ``configs/cifar10_resnet18_fast.yaml`` trained to the end (``python -m ddp_resnet.train``,
   output under ``DIR/fast_recipe``): test accuracy, training seconds with and without the first (compiling) epoch.
4. ``seeds_pipeline_epoch``: one CIFAR-10 epoch of the seeds' plain loop (``ddp_resnet.plainloop``: PIL transforms
   in 4 DataLoader workers, fp32, batch 128) against ours (the fast recipe's loader and step): seconds per epoch.
5. ``imagefolder_decode``: a generated ImageFolder tree of JPEGs at ImageNet sizes, ResNet-50 bf16 with
   ``data.decode=workers`` vs ``device``: img/s, the share of time the step waits for data, which is faster, and
   the advice for fewer cores per GPU.

The budget: before each item the time left is compared with the item's estimate (``ESTIMATES_S``); an item that
no longer fits is skipped, with one line saying so, and the skip and its reason are recorded. After every item
``DIR/suite.json`` (every figure, the machine, the command-equivalent settings) and ``DIR/suite.md`` (a table of
figures, targets and verdicts, then each item's details) are rewritten atomically, so a run cut short keeps what
it measured. Generated data (JPEG tree, CIFAR-format files) goes to ``--scratch`` (default ``DIR/scratch``).

Without ``--cifar-root``: item 2 feeds synthetic uint8 images to the same device-resident loader, item 3 is skipped,
item 4 times random CIFAR-format images (``--tiny``: a small generated CIFAR-format dataset serves items 3 and 4).

Exit codes: 0 every selected item measured or skipped; 1 an item failed (its error is recorded); 2 bad arguments
(one line on stderr).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ddp_resnet import distributed, rundir, suite_items
from ddp_resnet.config import ConfigError
from ddp_resnet.data import cifar
from ddp_resnet.exitcodes import FAILED as EXIT_FAILED
from ddp_resnet.exitcodes import OK as EXIT_OK
from ddp_resnet.exitcodes import USAGE as EXIT_USAGE
from ddp_resnet.suite_items import Context, ItemSkipped

DEFAULT_BUDGET_S = 480.0


@dataclass(frozen=True)
class Item:
    """One measurement of the suite: its name, what it is, its target, its time estimates, its function."""

    name: str
    title: str
    target: str
    estimate_s: dict  # {"full": seconds on one GPU, "tiny": seconds at toy sizes}
    run: Callable[[Context], dict]


ITEMS: tuple[Item, ...] = (
    Item("resnet50_224", "ResNet-50 224 px, batch 256, bf16, channels_last: ours vs torchvision, eager and compiled",
         ">= 1.0x torchvision+compile; aim 8,000 img/s", {"full": 180, "tiny": 30}, suite_items.resnet50_224),
    Item("resnet18_cifar_loader", "ResNet-18 CIFAR stem, 32 px, batch 512, compiled, device-resident loader + "
         "augmentation timed", ">= 60,000 img/s with augmentation", {"full": 80, "tiny": 20},
         suite_items.resnet18_cifar_loader),
    Item("fast_recipe", "configs/cifar10_resnet18_fast.yaml trained to the end on CIFAR-10",
         ">= 91.0% in <= 30 s of training", {"full": 90, "tiny": 25}, suite_items.fast_recipe),
    Item("seeds_pipeline_epoch", "one CIFAR-10 epoch: the seeds' plain loop (PIL in 4 workers, fp32, batch 128) vs "
         "ours (fast recipe)", "<= 0.8 s per epoch", {"full": 60, "tiny": 30}, suite_items.seeds_pipeline_epoch),
    Item("imagefolder_decode", "ImageFolder JPEGs at ImageNet sizes, ResNet-50 bf16: data.decode=workers vs device",
         "faster decoder becomes the default", {"full": 60, "tiny": 15}, suite_items.imagefolder_decode),
)
NAMES = tuple(item.name for item in ITEMS)
ESTIMATES_S = {item.name: item.estimate_s for item in ITEMS}


# --------------------------------------------------------------------------------------------- the CLI
class UsageError(ValueError):
    """A bad command line, in one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The suite's arguments."""
    p = _Parser(prog="python -m ddp_resnet.bench suite", description=__doc__.splitlines()[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for suite.json, suite.md and the items' files")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help=f"seconds the whole suite may take (default {DEFAULT_BUDGET_S:g})")
    p.add_argument("--cifar-root", help="directory holding cifar-10-batches-py/ (items 2-4 use real CIFAR-10)")
    p.add_argument("--only", help=f"comma-separated items to run (in priority order): {', '.join(NAMES)}")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    p.add_argument("--tiny", action="store_true", help="toy sizes (the same code paths), e.g. on the CPU")
    p.add_argument("--scratch", help="where generated data goes (default OUT/scratch)")
    return p


def select(only: str | None) -> list[Item]:
    """The items ``--only`` names (all without it), in priority order; raises UsageError for an unknown name."""
    if only is None:
        return list(ITEMS)
    wanted = [name.strip() for name in only.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in NAMES]
    if unknown or not wanted:
        what = f"unknown item {unknown[0]!r}" if unknown else "no item named"
        raise UsageError(f"--only: {what}; valid choices: {', '.join(NAMES)}")
    return [item for item in ITEMS if item.name in wanted]


def check_args(args: argparse.Namespace) -> torch.device:
    """The device to measure on; raises UsageError for impossible arguments."""
    if args.budget_s < 0:
        raise UsageError(f"--budget-s: must be >= 0, got {args.budget_s:g}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available on this machine (use --device cpu --tiny)")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        raise UsageError("the full sizes need a GPU; on the CPU add --tiny (toy sizes, the same code paths)")
    if args.cifar_root is not None:
        try:
            cifar.ensure_cifar(args.cifar_root, "cifar10", download=False)
        except ConfigError as exc:
            raise UsageError(str(exc).replace("data.root", "--cifar-root")) from None
    if distributed.read_env().world_size > 1:
        raise UsageError("the suite runs as one process (not under torchrun or srun)")
    return device


# --------------------------------------------------------------------------------------------- the machine
def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        return out.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def machine_info(device: torch.device) -> dict:
    """GPU name and driver, torch / CUDA / cuDNN versions, CPU cores: what the figures depend on."""
    import torchvision

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "cores_usable": cores, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpus=torch.cuda.device_count(), driver=_driver(),
                    gpu_memory_gib=props.total_memory / 2**30, capability=f"{props.major}.{props.minor}")
    return info


def describe_machine(m: dict) -> str:
    """One line naming the machine."""
    gpu = (f"{m['gpu']} (driver {m['driver']}, {m['gpu_memory_gib']:.0f} GiB, {m['gpus']} visible)"
           if "gpu" in m else f"CPU only ({m['cpu']})")
    return (f"{gpu}, {m['cores']} CPU cores ({m['cores_usable']} usable) | torch {m['torch']}, torchvision "
            f"{m['torchvision']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}, Python {m['python']} | host {m['host']}")


# --------------------------------------------------------------------------------------------- the run
def target_of(item: Item, ctx: Context) -> str:
    """The item's target, or why it does not apply here."""
    if ctx.device.type == "cpu":
        return "n/a on CPU"
    return "n/a at --tiny sizes" if ctx.tiny else item.target


def base_record(item: Item, ctx: Context, machine: dict) -> dict:
    """The fields every record has, before the item runs."""
    return {"name": item.name, "title": item.title, "status": "pending", "target": target_of(item, ctx),
            "estimate_s": item.estimate_s["tiny" if ctx.tiny else "full"], "sizes": ctx.sizes(item.name),
            "machine": machine}


def run_item(item: Item, ctx: Context, record: dict) -> None:
    """Skip the item when it does not fit the time left, else run it; fills ``record`` in place."""
    left = ctx.left()
    if record["estimate_s"] > left:
        record.update(status="skipped", reason=f"needs ~{record['estimate_s']:.0f} s, {max(left, 0):.0f} s of the "
                                               f"budget left")
        print(f"suite: skipped {item.name}: {record['reason']}", flush=True)
        return
    print(f"suite: {item.name} (estimate ~{record['estimate_s']:.0f} s, {left:.0f} s left): {item.title}",
          flush=True)
    tick = time.monotonic()
    try:
        figures = item.run(ctx)
        record.update({"status": "ok", **figures})
    except ItemSkipped as exc:
        record.update(status="skipped", reason=str(exc))
    except Exception as exc:  # noqa: BLE001 - one item's failure is recorded; the others still run
        traceback.print_exc()
        first = str(exc).strip().splitlines()
        record.update(status="failed", reason=f"{type(exc).__name__}: {first[0][:300] if first else ''}")
    finally:
        ctx.release()
    record["seconds"] = time.monotonic() - tick
    if record["target"].startswith("n/a"):  # the figures are kept; verdicts only where the target applies
        record.update({key: None for key in record if key.startswith("holds")})
    else:
        record["holds"] = record.get("holds")
    print(f"suite: {item.name} {record['status']} in {record['seconds']:.0f} s: {summary_text(record)}", flush=True)


def summary_text(r: dict) -> str:
    """One line of the item's headline figures (or why there are none)."""
    if r["status"] not in ("ok", "timeout"):
        return r.get("reason", "")
    ours = format_value(r.get("ours"), r.get("unit"))
    peer = f", {r['peer_name']} {format_value(r['peer'], r.get('unit'))}" if r.get("peer") is not None else ""
    rat = f", ratio {r['ratio']:.2f}x" if r.get("ratio") is not None else ""
    verdict = {True: "holds", False: "misses", None: "n/a"}[r.get("holds")]
    return f"ours {ours}{peer}{rat} | target {r['target']}: {verdict}"


def format_value(value, unit: str | None) -> str:
    """A figure with its unit, e.g. ``7,912 img/s``, ``91.30%``, ``0.78 s``."""
    if value is None:
        return "-"
    if unit == "img/s":
        return f"{value:,.0f} img/s" if value >= 100 else f"{value:.1f} img/s"
    if unit == "%":
        return f"{value:.2f}%"
    return f"{value:.2f} {unit}" if unit else f"{value:g}"


def main(argv: list[str] | None = None) -> int:
    """Parse, then run the selected items within the budget, writing the results after each; the exit code."""
    start = time.monotonic()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
        items = select(args.only)
        device = check_args(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(args.scratch) if args.scratch else out / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    if device.type == "cpu":  # a functional check: one intra-op thread, so a busy machine's neighbours do not
        torch.set_num_threads(1)  # slow it down tenfold by oversubscription
    env = distributed.init(device.type)
    ctx = Context(out, scratch, env, args.tiny, Path(args.cifar_root) if args.cifar_root else None,
                  start + args.budget_s, note=lambda line: print(line, flush=True))
    machine = machine_info(device)
    header = {"command": "python -m ddp_resnet.bench suite " + shlex.join(argv),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "budget_s": args.budget_s, "tiny": args.tiny, "device": str(device), "machine": machine,
              "cifar_root": args.cifar_root, "selected": [i.name for i in items],
              "intra_op_threads": torch.get_num_threads()}
    records = [base_record(item, ctx, machine) for item in items]
    print(f"suite: {len(items)} item(s), budget {args.budget_s:g} s, {'tiny sizes' if args.tiny else 'full sizes'} "
          f"on {device} | {describe_machine(machine)}", flush=True)
    write_results(out, header, records, time.monotonic() - start)
    for item, record in zip(items, records):
        run_item(item, ctx, record)
        write_results(out, header, records, time.monotonic() - start)
    failed = [r["name"] for r in records if r["status"] == "failed"]
    print(f"suite: done in {time.monotonic() - start:.0f} s: {out / 'suite.md'}, {out / 'suite.json'}"
          + (f" | failed: {', '.join(failed)}" if failed else ""), flush=True)
    return EXIT_FAILED if failed else EXIT_OK


# --------------------------------------------------------------------------------------------- the files
def write_results(out: Path, header: dict, records: list[dict], elapsed_s: float) -> None:
    """Rewrite suite.json and suite.md (each atomically: a temporary file, then a rename)."""
    doc = {"suite": {**header, "elapsed_s": elapsed_s}, "items": records}
    rundir.write_text_atomic(out / "suite.json", json.dumps(doc, indent=2, default=str) + "\n")
    rundir.write_text_atomic(out / "suite.md", render_markdown(doc))


def render_markdown(doc: dict) -> str:
    """suite.md: the machine, a table of every item's figures against its target, skips, then the details."""
    from ddp_resnet import suite_report

    return suite_report.render(doc, describe_machine)


if __name__ == "__main__":
    sys.exit(main())
