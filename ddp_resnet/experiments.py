"""`python -m ddp_resnet.experiments NAME`: the seeds' experiments, one command each, with their figures/tables.

    python -m ddp_resnet.experiments NAME [key=value ...] [--data-root DIR] [--out DIR] [--smoke] [--dry-run]
        [--sweep key=v1,v2] [--config X.yaml] [--nproc-per-node N] [--analyze-only]
    python -m ddp_resnet.experiments NAME --slurm [--dry-run] [-- SLURM OPTIONS, e.g. --gpus-per-node 1 --time 600]
    python -m ddp_resnet.experiments --list

Experiments (recipes in ``configs/experiments/NAME.yaml``: ordinary training configs, the sweep is defined here):

* ``degradation``: plain20 / plain56 / resnet20 / resnet56 on CIFAR-10 with the paper's recipe (lr 0.1, wd 1e-4,
  batch 128, x0.1 at 32k and 48k iterations, 64k iterations): ``degradation.png`` draws the training (dashed)
  and test (solid) error of all four against iterations, plain nets left, ResNets right (He et al. Fig. 6).
* ``gradient_flow``: plain56 vs resnet56 at initialisation, one batch: the gradient norm of every block's
  parameters (stem, each residual/plain block, classifier) on a log scale (``gradient_flow.png``, ``.csv``).
  No training: it runs here in seconds (also with ``--slurm``).
* ``wd_ablation``: weight decay 5e-4 vs 1e-4 on the seeds' CIFAR-10 ResNet-18 recipe (cosine, 200 epochs):
  ``wd_ablation.png`` (error and loss curves) and ``results.md``.
* ``depth_sweep``: the paper's CIFAR ResNets 20/32/44/56/110: ``depth_table.md`` and ``depth_table.csv`` (test
  error vs depth, parameters, the paper's numbers for CIFAR-10) and ``depth_sweep.png``.

Each run trains with ``ddp_resnet.train.main`` into ``OUT/<point>`` (the directory names of
``python -m ddp_resnet.slurm --sweep``, e.g. ``OUT/nameresnet56``), one after the other in this process
(``--nproc-per-node N``: each under torchrun with N processes). An interrupted experiment continues where it
stopped (``ckpt.resume=auto``); finished runs are not trained again. ``--slurm`` builds the equivalent
``python -m ddp_resnet.slurm --config RECIPE ... --sweep KEY=V1,V2,...`` command and submits it (options after
``--`` go to the launcher; ``--gpus-per-node 1`` unless given); once the jobs are done,
``--analyze-only`` draws the figures from the runs. ``--dry-run`` prints the commands and validates every
configuration without training. ``--smoke`` shrinks every run to synthetic 16 px data and 4 steps (a CPU check
of the whole pipeline); its default output directory gets a ``-smoke`` suffix.

The figures need matplotlib (``pip install "ddp_resnet[plots]"``). Exit codes: 0 done, 2 bad usage or
configuration (one line), otherwise the failing run's exit code.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ddp_resnet import config as config_mod
from ddp_resnet import plots
from ddp_resnet.config import ConfigError

EXIT_OK, EXIT_USAGE = 0, 2
CURVES_FIGSIZE_PER_PANEL = (6.0, 4.5)  # degradation.png / wd_ablation.png: 600 x 450 px per panel
GRADIENT_FIGSIZE = (12.0, 5.0)  # gradient_flow.png: 1200 x 500
DEPTH_FIGSIZE = (6.0, 4.5)  # depth_sweep.png: 600 x 450

# --smoke: synthetic 16 px data, 2 steps per epoch, 4 steps, no epoch checkpoint files.
SMOKE = (
    "data.dataset=synthetic", "data.synthetic_train_size=64", "data.synthetic_test_size=32",
    "data.synthetic_image_size=16", "data.batch_size=32", "data.eval_batch_size=32", "data.workers=0",
    "train.max_steps=4", "optim.milestones_unit=step", "optim.milestones=[2,3]", "train.log_every=1000",
    "ckpt.keep=0", "dist.timeout_s=120",
)
# He et al. 2015, Table 6: CIFAR-10 test error (%) of the CIFAR ResNets (110: best of 5 runs; mean 6.61).
PAPER_CIFAR10_ERROR = {"resnet20": 8.75, "resnet32": 7.51, "resnet44": 7.17, "resnet56": 6.97, "resnet110": 6.43,
                       "resnet1202": 7.93}


@dataclass(frozen=True)
class Experiment:
    """One experiment: a recipe, the swept keys, and what is drawn from the runs."""

    name: str
    recipe: str  # file name under configs/experiments/
    sweep: tuple  # ((key, (value, ...)), ...): the runs are the product, in order
    analysis: str  # degradation | gradient_flow | wd_ablation | depth_table
    description: str
    trains: bool = True  # gradient_flow computes at initialisation without training


EXPERIMENTS = {
    e.name: e for e in (
        Experiment("degradation", "degradation.yaml",
                   (("model.name", ("plain20", "plain56", "resnet20", "resnet56")),), "degradation",
                   "plain vs residual nets of 20 and 56 layers, paper recipe: training/test error curves "
                   "(He et al. Fig. 6)"),
        Experiment("gradient_flow", "gradient_flow.yaml", (("model.name", ("plain56", "resnet56")),),
                   "gradient_flow", "per-block gradient norms of plain56 vs resnet56 at initialisation, one batch",
                   trains=False),
        Experiment("wd_ablation", "wd_ablation.yaml", (("optim.weight_decay", ("5e-4", "1e-4")),), "wd_ablation",
                   "weight decay 5e-4 vs 1e-4 on the seeds' CIFAR-10 ResNet-18 recipe"),
        Experiment("depth_sweep", "depth_sweep.yaml",
                   (("model.name", ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")),), "depth_table",
                   "CIFAR ResNets 20/32/44/56/110, paper recipe: test error vs depth table"),
    )
}


class UsageError(ValueError):
    """A bad command line, in one line."""


# ---------------------------------------------------------------------------------------------------- points
def split_values(text: str) -> list[str]:
    """``v1,v2,[1,2]`` -> ``['v1', 'v2', '[1,2]']`` (commas inside brackets kept)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[({"
        depth -= ch in "])}"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + [cur.strip()]


def parse_sweep(items: list[str]) -> tuple:
    """``--sweep key=v1,v2`` items -> ((key, (v1, v2)), ...)."""
    sweeps = []
    for item in items:
        key, sep, raw = item.partition("=")
        values = tuple(split_values(raw)) if sep else ()
        if not key.strip() or not values or "" in values:
            raise UsageError(f"--sweep '{item}': expected key=v1,v2,...")
        if key.strip() == "output_dir":
            raise UsageError("--sweep output_dir: not allowed (each run gets its own directory)")
        sweeps.append((key.strip(), values))
    if len({k for k, _ in sweeps}) != len(sweeps):
        raise UsageError("--sweep: a key is given twice; list all its values in one --sweep")
    return tuple(sweeps)


def _point_names_fallback(sweeps: list) -> list:
    lasts = [k.split(".")[-1] for k, _ in sweeps]
    labels = [k.split(".")[-1] if lasts.count(k.split(".")[-1]) == 1 else k for k, _ in sweeps]
    slug = lambda text: re.sub(r"[^A-Za-z0-9._+=-]+", "-", text).strip("-") or "x"  # noqa: E731
    points = []
    for combo in itertools.product(*[values for _, values in sweeps]):
        overrides = [f"{key}={value}" for (key, _), value in zip(sweeps, combo)]
        points.append((overrides, "_".join(slug(f"{label}{value}") for label, value in zip(labels, combo))))
    names = [n for _, n in points]
    if len(set(names)) != len(names):
        width = len(str(len(points) - 1))
        points = [(o, f"{i:0{width}d}_{n}") for i, (o, n) in enumerate(points)]
    return points


def sweep_points(sweeps: tuple) -> list[tuple[list[str], str]]:
    """[(overrides, directory name)] of the sweep, named as ``python -m ddp_resnet.slurm --sweep`` names them."""
    as_lists = [(key, list(values)) for key, values in sweeps]
    try:
        from ddp_resnet.slurm import point_names
    except Exception:  # noqa: BLE001 - the launcher is optional here; the fallback names the same way
        return _point_names_fallback(as_lists)
    return [(list(o), n) for o, n in point_names(as_lists)]


def point_label(overrides: list[str]) -> str:
    """A legend label: the model name itself, other keys as ``last_part=value``."""
    parts = []
    for text in overrides:
        key, _, value = text.partition("=")
        parts.append(value if key == "model.name" else f"{key.split('.')[-1]}={value}")
    return " ".join(parts) or "run"


# ---------------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Run:
    """One training run of an experiment."""

    label: str
    point_overrides: tuple
    out: Path
    argv: tuple  # for ddp_resnet.train.main


@dataclass(frozen=True)
class ExperimentPlan:
    experiment: Experiment
    recipe: Path
    out: Path
    base_overrides: tuple  # smoke, data root, the user's overrides (in this order)
    sweeps: tuple
    runs: tuple


def find_recipe(experiment: Experiment, config: str | None) -> Path:
    """``--config``, else configs/experiments/<recipe> under the working directory, else next to the package."""
    if config:
        path = Path(config)
        if not path.is_file():
            raise UsageError(f"--config: file not found: {path}")
        return path.absolute()
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        path = root / "configs" / "experiments" / experiment.recipe
        if path.is_file():
            return path.absolute()
    raise UsageError(f"recipe configs/experiments/{experiment.recipe} not found (run from the repository root or "
                     f"give --config)")


def make_plan(args: argparse.Namespace) -> ExperimentPlan:
    """Resolve the recipe, the runs and their output directories; validate every run's configuration."""
    if args.name not in EXPERIMENTS:
        raise UsageError(f"unknown experiment '{args.name}'; valid choices: {', '.join(EXPERIMENTS)}")
    experiment = EXPERIMENTS[args.name]
    recipe = find_recipe(experiment, args.config)
    base = list(SMOKE) if args.smoke else []
    if args.data_root:
        base.append(f"data.root={args.data_root}")
    for text in args.overrides:
        key, _ = config_mod.parse_override(text)
        if key == "output_dir":
            raise UsageError("use --out instead of output_dir= (each run gets a directory under it)")
        base.append(text)
    sweeps = parse_sweep(args.sweep) if args.sweep else experiment.sweep
    if args.out:
        out = Path(args.out)
    else:
        out = Path(config_mod.load(recipe).output_dir)
        if args.smoke:
            out = out.with_name(out.name + "-smoke")
    out = out.absolute()
    runs = []
    for overrides, dirname in sweep_points(sweeps):
        run_out = out / dirname
        argv = ["--config", str(recipe), *base, *overrides, f"output_dir={run_out}"]
        try:
            config_mod.load(recipe, argv[2:])
        except ConfigError as exc:
            raise ConfigError(f"{exc} (run {' '.join(overrides)})") from None
        runs.append(Run(point_label(overrides), tuple(overrides), run_out, tuple(argv)))
    return ExperimentPlan(experiment, recipe, out, tuple(base), sweeps, tuple(runs))


def train_command(run: Run, nproc: int) -> list[str]:
    """The shell command that trains one run."""
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "ddp_resnet.train", *run.argv]
    return [sys.executable, "-m", "ddp_resnet.train", *run.argv]


def slurm_command(plan: ExperimentPlan, slurm_args: list[str]) -> list[str]:
    """``python -m ddp_resnet.slurm --config RECIPE [overrides] output_dir=OUT --sweep k=v1,v2 [launcher options]``."""
    cmd = ["python", "-m", "ddp_resnet.slurm", "--config", str(plan.recipe), *plan.base_overrides,
           f"output_dir={plan.out}"]
    for key, values in plan.sweeps:
        cmd += ["--sweep", f"{key}={','.join(values)}"]
    if not any(a == "--gpus-per-node" or a.startswith("--gpus-per-node=") for a in slurm_args):
        cmd += ["--gpus-per-node", "1"]
    return cmd + list(slurm_args)


# ---------------------------------------------------------------------------------------------------- running
def train_runs(plan: ExperimentPlan, nproc: int, log=print) -> int:
    """Train every run, one after the other; stop at the first failure and return its exit code."""
    from ddp_resnet import train

    for i, run in enumerate(plan.runs, 1):
        log(f"[{plan.experiment.name} {i}/{len(plan.runs)}] {run.label} -> {run.out}")
        if nproc > 1:
            code = subprocess.run(train_command(run, nproc)).returncode
        else:
            code = train.main(list(run.argv))
        if code != 0:
            log(f"[{plan.experiment.name}] run {run.label} exited with {code}; stopping")
            return code
    return EXIT_OK


def read_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl of a run (empty when missing)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_dirs(plan: ExperimentPlan) -> list[tuple[Run, Path]]:
    """Each run with its directory (from the launcher's sweep.json when it recorded other directories)."""
    index = plan.out / "sweep.json"
    recorded = {}
    if index.is_file():
        try:
            recorded = {tuple(j["overrides"]): Path(j["output_dir"]) for j in json.loads(index.read_text())["jobs"]}
        except (ValueError, KeyError, TypeError):
            recorded = {}
    return [(run, recorded.get(run.point_overrides, run.out)) for run in plan.runs]


def collect(plan: ExperimentPlan, warn=print) -> list[tuple[Run, Path, list[dict]]]:
    """The runs that have metrics; a missing run is reported and left out. Raises UsageError when none has."""
    found = []
    for run, path in run_dirs(plan):
        records = read_records(path)
        if records:
            found.append((run, path, records))
        else:
            warn(f"warning: no metrics in {path} ({run.label}): left out")
    if not found:
        raise UsageError(f"no run of '{plan.experiment.name}' under {plan.out} has metrics yet")
    return found


def _tested(records: list[dict]) -> list[dict]:
    return [r for r in records if "test_acc" in r]


def run_summary(run: Run, path: Path, records: list[dict]) -> dict:
    """Best / final test error, final train error, steps, training time of one run."""
    tested = _tested(records)
    best = max(tested, key=lambda r: r["test_acc"]) if tested else None
    return {
        "run": run.label, "dir": str(path), "steps": records[-1].get("step", 0), "epochs": len(records),
        "best_test_error": 100 - best["test_acc"] if best else None,
        "best_epoch": best["epoch"] + 1 if best else None,
        "final_test_error": 100 - tested[-1]["test_acc"] if tested else None,
        "final_train_error": 100 - records[-1]["train_acc"],
        "train_time_s": sum(float(r.get("epoch_time_s", 0.0)) for r in records),
    }


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def write_results(path: Path, title: str, summaries: list[dict]) -> Path:
    """results.md: one row per run."""
    lines = [f"# {title}", "",
             "| run | best test error (%) | at epoch | final test error (%) | final train error (%) | steps | "
             "training time (s) |", "|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['run']} | {_fmt(s['best_test_error'])} | {s['best_epoch'] or '-'} | "
                     f"{_fmt(s['final_test_error'])} | {_fmt(s['final_train_error'])} | {s['steps']} | "
                     f"{s['train_time_s']:.1f} |")
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------- analyses
def _family(label: str) -> str:
    return re.sub(r"\d.*$", "", label) or label


def analyze_degradation(plan: ExperimentPlan, warn=print) -> list[Path]:
    """degradation.png: train (dashed) / test (solid) error vs iterations, one panel per family (plain, resnet)."""
    found = collect(plan, warn)
    families = list(dict.fromkeys(_family(run.label) for run, _, _ in found))
    w, h = CURVES_FIGSIZE_PER_PANEL
    fig = plots.new_figure(w * len(families), h)
    axes = fig.subplots(1, len(families), squeeze=False, sharey=True)[0]
    depths = sorted({int(re.sub(r"\D", "", run.label) or 0) for run, _, _ in found})
    colors = {d: f"C{i}" for i, d in enumerate(depths)}
    for ax, family in zip(axes, families):
        members = [(run, records) for run, _, records in found if _family(run.label) == family]
        plots.error_curves(ax, [(run.label, records) for run, records in members], x_key="step",
                           colors=[colors[int(re.sub(r"\D", "", run.label) or 0)] for run, _ in members])
        ax.set_title({"plain": "plain nets", "resnet": "ResNets"}.get(family, family or "runs"))
    fig.suptitle("CIFAR-10 degradation: training error (dashed) and test error (solid)"
                 if _dataset(found) == "cifar10" else "training error (dashed) and test error (solid)")
    fig.tight_layout()
    paths = [plots.save(fig, plan.out / "degradation.png")]
    paths.append(write_results(plan.out / "results.md", "Degradation: plain vs residual nets",
                               [run_summary(run, path, records) for run, path, records in found]))
    return paths


def analyze_wd_ablation(plan: ExperimentPlan, warn=print) -> list[Path]:
    """wd_ablation.png: error curves and loss curves per epoch for each weight decay; results.md."""
    found = collect(plan, warn)
    w, h = CURVES_FIGSIZE_PER_PANEL
    fig = plots.new_figure(2 * w, h)
    ax_err, ax_loss = fig.subplots(1, 2)
    plots.error_curves(ax_err, [(run.label, records) for run, _, records in found], x_key="epoch")
    ax_err.set_title("error: train (dashed), test (solid)")
    for i, (run, _, records) in enumerate(found):
        color = f"C{i}"
        ax_loss.plot([r["epoch"] + 1 for r in records], [r["train_loss"] for r in records], "--", color=color,
                     label=f"{run.label} train")
        tested = _tested(records)
        ax_loss.plot([r["epoch"] + 1 for r in tested], [r["test_loss"] for r in tested], "-", color=color,
                     label=f"{run.label} test")
    from matplotlib.ticker import MaxNLocator

    ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_loss.set_title("loss")
    ax_loss.grid(True, alpha=0.3)
    ax_loss.legend(fontsize=8)
    fig.suptitle("weight decay ablation")
    fig.tight_layout()
    paths = [plots.save(fig, plan.out / "wd_ablation.png")]
    paths.append(write_results(plan.out / "results.md", "Weight decay ablation",
                               [run_summary(run, path, records) for run, path, records in found]))
    return paths


def _dataset(found) -> str:
    import yaml

    for _, path, _ in found:
        cfg_path = path / "config.yaml"
        if cfg_path.is_file():
            return ((yaml.safe_load(cfg_path.read_text()) or {}).get("data") or {}).get("dataset", "")
    return ""


def count_parameters(run_dir: Path) -> int | None:
    """Trainable-parameter count of a run's network, from its last checkpoint (None without one)."""
    from ddp_resnet import checkpoint as ckpt

    path = run_dir / "checkpoints" / "last.pt"
    if not path.is_file():
        return None
    try:
        state = ckpt.load(path, "cpu")["model"]
    except ckpt.CheckpointError:
        return None
    return sum(v.numel() for k, v in state.items()
               if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))


def analyze_depth(plan: ExperimentPlan, warn=print) -> list[Path]:
    """depth_table.md / depth_table.csv (test error vs depth) and, with matplotlib, depth_sweep.png."""
    found = collect(plan, warn)
    paper = _dataset(found) == "cifar10"
    rows = []
    for run, path, records in found:
        s = run_summary(run, path, records)
        digits = re.sub(r"\D", "", run.label)
        params = count_parameters(path)
        rows.append({"model": run.label, "depth": int(digits) if digits else None,
                     "params_M": params / 1e6 if params is not None else None,
                     "best_test_error": s["best_test_error"], "final_test_error": s["final_test_error"],
                     "final_train_error": s["final_train_error"], "steps": s["steps"],
                     "paper_test_error": PAPER_CIFAR10_ERROR.get(run.label) if paper else None})
    rows.sort(key=lambda r: (r["depth"] is None, r["depth"] or 0))
    keys = ["model", "depth", "params_M", "best_test_error", "final_test_error", "final_train_error", "steps",
            "paper_test_error"]
    with open(plan.out / "depth_table.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(keys)
        for r in rows:
            writer.writerow(["" if r[k] is None else (f"{r[k]:.4f}" if isinstance(r[k], float) else r[k])
                             for k in keys])
    lines = ["# Test error vs depth", "",
             "| model | depth | params (M) | best test error (%) | final test error (%) | final train error (%) | "
             "steps | He et al. 2015 (%) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['depth'] or '-'} | {_fmt(r['params_M'], 3)} | "
                     f"{_fmt(r['best_test_error'])} | {_fmt(r['final_test_error'])} | "
                     f"{_fmt(r['final_train_error'])} | {r['steps']} | {_fmt(r['paper_test_error'])} |")
    if paper:
        lines += ["", "He et al. 2015, Table 6 (CIFAR-10; ResNet-110: best of 5 runs, mean 6.61)."]
    (plan.out / "depth_table.md").write_text("\n".join(lines) + "\n")
    paths = [plan.out / "depth_table.md", plan.out / "depth_table.csv"]
    try:
        fig = plots.new_figure(*DEPTH_FIGSIZE)
    except plots.MissingMatplotlib as exc:
        warn(f"warning: depth_sweep.png skipped: {exc}")
        return paths
    ax = fig.add_subplot(1, 1, 1)
    drawn = [r for r in rows if r["depth"] is not None and r["final_test_error"] is not None]
    ax.plot([r["depth"] for r in drawn], [r["final_test_error"] for r in drawn], "o-", label="final test error")
    ax.plot([r["depth"] for r in drawn], [r["best_test_error"] for r in drawn], "s--", label="best test error")
    with_paper = [r for r in drawn if r["paper_test_error"] is not None]
    if with_paper:
        ax.plot([r["depth"] for r in with_paper], [r["paper_test_error"] for r in with_paper], "k^:",
                label="He et al. 2015")
    ax.set_xlabel("depth (layers)")
    ax.set_ylabel("test error (%)")
    ax.set_xticks([r["depth"] for r in drawn])
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("test error vs depth")
    fig.tight_layout()
    paths.append(plots.save(fig, plan.out / "depth_sweep.png"))
    return paths


# ---------------------------------------------------------------------------------------------------- gradient flow
def block_groups(model: torch.nn.Module) -> list[tuple[str, list[torch.nn.Parameter]]]:
    """Parameters grouped per block, input to output: stem, layerS.B for every block, then the head."""
    groups: dict[str, list] = {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        if parts[0].startswith("layer") and len(parts) > 2:
            key = ".".join(parts[:2])
        elif parts[0] == "fc":
            key = "fc"
        else:
            key = "stem"
        groups.setdefault(key, []).append(param)
    ordered = [k for k in groups if k == "stem"] + [k for k in groups if k not in ("stem", "fc")]
    return [(k, groups[k]) for k in ordered + [k for k in groups if k == "fc"]]


def gradient_norms(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[list, float]:
    """([(block, L2 norm of its parameters' gradient)], loss) after one forward/backward in training mode."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    norms = []
    for key, params in block_groups(model):
        grads = [p.grad.detach().double() for p in params if p.grad is not None]
        norms.append((key, math.sqrt(sum(float((g * g).sum()) for g in grads)) if grads else 0.0))
    return norms, loss.item()


def run_gradient_flow(plan: ExperimentPlan, log=print) -> list[Path]:
    """Per-block gradient norms of each run's network at initialisation on the first test batch (no training)."""
    from ddp_resnet import data as data_mod
    from ddp_resnet import distributed
    from ddp_resnet.models import build_model
    from ddp_resnet.train import resolve_stem

    results = []
    for run in plan.runs:
        cfg = config_mod.load(plan.recipe, list(run.argv[2:]))
        info = data_mod.describe(cfg.data)
        device = distributed.resolve_device(cfg.train.device, 0)
        data_cfg = config_mod.replace(cfg, data={"eval_batch_size": cfg.data.batch_size, "workers": 0}).data
        images, labels = next(iter(data_mod.build_eval_loader(data_cfg, info, 0, 1, device)))
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model.name, num_classes=info.num_classes, stem=resolve_stem(cfg, info),
                            zero_init_residual=cfg.model.zero_init_residual).to(device)
        norms, loss = gradient_norms(model, images, labels)
        log(f"[gradient_flow] {run.label}: loss {loss:.4f}, gradient norm first block {norms[1][1]:.3e}, "
            f"last block {norms[-2][1]:.3e} ({len(norms)} groups, batch {labels.shape[0]})")
        results.append((run, norms, loss, int(labels.shape[0])))
    plan.out.mkdir(parents=True, exist_ok=True)
    with open(plan.out / "gradient_flow.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "index", "block", "grad_norm"])
        for run, norms, _, _ in results:
            for i, (key, norm) in enumerate(norms):
                writer.writerow([run.label, i, key, f"{norm:.6e}"])
    (plan.out / "gradient_flow.json").write_text(json.dumps(
        {run.label: {"loss": loss, "batch": batch, "blocks": [k for k, _ in norms], "grad_norm": [n for _, n in norms]}
         for run, norms, loss, batch in results}, indent=1))
    fig = plots.new_figure(*GRADIENT_FIGSIZE)
    ax = fig.add_subplot(1, 1, 1)
    longest = max(results, key=lambda r: len(r[1]))[1]
    for i, (run, norms, _, _) in enumerate(results):
        ax.plot(range(len(norms)), [max(n, 1e-30) for _, n in norms], "o-", markersize=3, color=f"C{i}",
                label=run.label)
    ax.set_yscale("log")
    step = max(1, len(longest) // 30)
    ax.set_xticks(range(0, len(longest), step))
    ax.set_xticklabels([k for k, _ in longest][::step], rotation=70, fontsize=7)
    ax.set_xlabel("block (input -> output)")
    ax.set_ylabel("gradient L2 norm of the block's parameters")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("gradient flow at initialisation (one batch, training-mode BatchNorm)")
    fig.tight_layout()
    return [plots.save(fig, plan.out / "gradient_flow.png"), plan.out / "gradient_flow.csv",
            plan.out / "gradient_flow.json"]


ANALYSES = {"degradation": analyze_degradation, "wd_ablation": analyze_wd_ablation, "depth_table": analyze_depth}


# ---------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ddp_resnet.experiments", description=__doc__.splitlines()[0],
                                     epilog="Options after a lone '--' go to python -m ddp_resnet.slurm (--slurm).")
    parser.add_argument("name", nargs="?", help=f"one of: {', '.join(EXPERIMENTS)}")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. train.amp=bf16")
    parser.add_argument("--list", action="store_true", help="list the experiments and exit")
    parser.add_argument("--data-root", help="data.root for every run (the directory holding cifar-10-batches-py/)")
    parser.add_argument("--out", help="experiment directory (default: the recipe's output_dir)")
    parser.add_argument("--config", help="another recipe instead of configs/experiments/NAME.yaml")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                        help="replace the experiment's sweep, e.g. --sweep model.name=resnet20,resnet32")
    parser.add_argument("--smoke", action="store_true", help="synthetic 16 px data, 4 steps per run (a CPU check)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, validate, train nothing")
    parser.add_argument("--analyze-only", action="store_true", help="only draw the figures/tables from the runs")
    parser.add_argument("--nproc-per-node", type=int, default=1, help="train each run under torchrun with N processes")
    parser.add_argument("--slurm", action="store_true", help="submit the sweep with python -m ddp_resnet.slurm")
    return parser


def analyze(plan: ExperimentPlan, log=print) -> list[Path]:
    """Draw the experiment's figures and tables from its runs."""
    plan.out.mkdir(parents=True, exist_ok=True)
    if plan.experiment.analysis == "gradient_flow":
        return run_gradient_flow(plan, log)
    return ANALYSES[plan.experiment.analysis](plan, log)


def main(argv: list[str] | None = None) -> int:
    """Run one experiment; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    slurm_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, slurm_args = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_intermixed_args(argv)
    if args.list:
        for e in EXPERIMENTS.values():
            sweep = " ".join(f"{k}={','.join(v)}" for k, v in e.sweep)
            print(f"{e.name:<14} {e.description}\n{'':<14} configs/experiments/{e.recipe}, sweep {sweep}")
        return EXIT_OK
    try:
        if not args.name:
            raise UsageError("name an experiment (--list shows them)")
        if slurm_args and not args.slurm:
            raise UsageError("options after '--' are for --slurm")
        if args.nproc_per_node < 1:
            raise UsageError(f"--nproc-per-node: must be > 0, got {args.nproc_per_node}")
        plan = make_plan(args)
        experiment = plan.experiment
        needs_plots = experiment.analysis != "depth_table"
        if needs_plots and not args.dry_run and not (args.slurm and experiment.trains):
            plots.require_matplotlib()  # before hours of training, not after
    except (plots.MissingMatplotlib, UsageError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    if args.slurm and experiment.trains and not args.analyze_only:
        cmd = slurm_command(plan, slurm_args)
        print(shlex.join(cmd), flush=True)
        if args.dry_run:
            print(f"# dry run: nothing submitted; afterwards: python -m ddp_resnet.experiments {experiment.name} "
                  f"--out {plan.out}{' --smoke' if args.smoke else ''} --analyze-only")
            return EXIT_OK
        try:
            from ddp_resnet import slurm
        except ImportError as exc:
            print(f"error: the SLURM launcher is not available ({exc})", file=sys.stderr)
            return EXIT_USAGE
        code = slurm.main(cmd[3:])
        if code != 0 or "--wait" not in slurm_args or "--dry-run" in slurm_args:
            if code == 0 and "--dry-run" not in slurm_args:
                print(f"when the jobs are done: python -m ddp_resnet.experiments {experiment.name} --out {plan.out}"
                      f"{' --smoke' if args.smoke else ''} --analyze-only", flush=True)
            return code
        args.analyze_only = True  # the jobs have finished (--wait): draw from their runs
    elif args.dry_run:
        print(f"# {experiment.name}: {experiment.description}")
        print(f"# recipe {plan.recipe}; output {plan.out}")
        if experiment.trains:
            for run in plan.runs:
                print(shlex.join(train_command(run, args.nproc_per_node)))
        else:
            print(f"# computed here at initialisation, no training: {', '.join(r.label for r in plan.runs)}")
        print("# dry run: nothing trained")
        return EXIT_OK
    elif args.slurm and not experiment.trains:
        print(f"note: {experiment.name} trains nothing and takes seconds: computing it here instead of on SLURM")

    if experiment.trains and not args.analyze_only:
        code = train_runs(plan, args.nproc_per_node)
        if code != 0:
            return code
    try:
        paths = analyze(plan)
    except (plots.MissingMatplotlib, UsageError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"[{experiment.name}] wrote {', '.join(str(p) for p in paths)}", flush=True)
    return EXIT_OK


def cli() -> None:
    """Console entry point."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
