"""Plan an experiment's runs (one per sweep point), train them here or under torchrun, or submit them to SLURM."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ddp_resnet import config as config_mod
from ddp_resnet import rundir
from ddp_resnet.config import ConfigError
from ddp_resnet.exitcodes import OK as EXIT_OK
from ddp_resnet.experiments.registry import EXPERIMENTS, SMOKE, Experiment
from ddp_resnet.slurm.sweep import parse_sweeps, point_names, slug


class UsageError(ValueError):
    """A bad command line, in one line."""


def point_label(overrides: list[str]) -> str:
    """A legend label: the model name itself, other keys as ``last_part=value``."""
    parts = []
    for text in overrides:
        key, _, value = text.partition("=")
        parts.append(value if key == "model.name" else f"{key.split('.')[-1]}={value}")
    return " ".join(parts) or "run"


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
    sweeps: list  # [(key, [value, ...]), ...]
    runs: tuple


def find_recipe(experiment: Experiment, config: str | None) -> Path:
    """``--config``, else configs/experiments/<recipe> under the working directory, else next to the package."""
    if config:
        path = Path(config)
        if not path.is_file():
            raise UsageError(f"--config: file not found: {path}")
        return path.absolute()
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
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
    sweeps = parse_sweeps(args.sweep) if args.sweep else [(key, list(values)) for key, values in experiment.sweep]
    points = [(list(overrides), slug(label), label) for label, overrides in experiment.points]
    if args.sweep or not points:
        points = [(overrides, name, point_label(overrides)) for overrides, name in point_names(sweeps)]
    else:
        sweeps = []  # explicit points: not a product sweep (SLURM gets one job per point)
    if args.out:
        out = Path(args.out)
    else:
        out = Path(config_mod.load(recipe).output_dir)
        if args.smoke:
            out = out.with_name(out.name + "-smoke")
    out = out.absolute()
    runs = []
    for overrides, dirname, label in points:
        run_out = out / dirname
        argv = ["--config", str(recipe), *base, *overrides, f"output_dir={run_out}"]
        try:
            config_mod.load(recipe, argv[2:])
        except ConfigError as exc:
            raise ConfigError(f"{exc} (run {' '.join(overrides)})") from None
        runs.append(Run(label, tuple(overrides), run_out, tuple(argv)))
    return ExperimentPlan(experiment, recipe, out, tuple(base), sweeps, tuple(runs))


def train_command(run: Run, nproc: int) -> list[str]:
    """The shell command that trains one run."""
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "ddp_resnet.train", *run.argv]
    return [sys.executable, "-m", "ddp_resnet.train", *run.argv]


def _with_gpus(argv: list[str], slurm_args: list[str]) -> list[str]:
    if not any(a == "--gpus-per-node" or a.startswith("--gpus-per-node=") for a in slurm_args):
        argv += ["--gpus-per-node", "1"]
    return argv + list(slurm_args)


def slurm_argv(plan: ExperimentPlan, slurm_args: list[str]) -> list[str]:
    """The arguments of ``python -m ddp_resnet.slurm`` that submit the experiment as one sweep."""
    argv = ["--config", str(plan.recipe), *plan.base_overrides, f"output_dir={plan.out}"]
    for key, values in plan.sweeps:
        argv += ["--sweep", f"{key}={','.join(values)}"]
    return _with_gpus(argv, slurm_args)


def slurm_argvs(plan: ExperimentPlan, slurm_args: list[str]) -> list[list[str]]:
    """The ``python -m ddp_resnet.slurm`` argument lists: one sweep, or one job per point of a points experiment."""
    if plan.sweeps or not plan.experiment.points:
        return [slurm_argv(plan, slurm_args)]
    return [_with_gpus(["--config", str(plan.recipe), *plan.base_overrides, *run.point_overrides,
                        f"output_dir={run.out}"], slurm_args) for run in plan.runs]


def submit_to_slurm(plan: ExperimentPlan, slurm_args: list[str]):
    """Submit through ``ddp_resnet.slurm.submit``; returns (exit code, the last submission's parsed arguments)."""
    from ddp_resnet.slurm import submit

    code, args = EXIT_OK, None
    for argv in slurm_argvs(plan, slurm_args):
        try:
            args = submit.parse_args(argv)
        except submit.UsageError as exc:
            print(f"ddp_resnet.slurm: error: {exc}", file=sys.stderr)
            return submit.EXIT_USAGE, None
        code = submit.execute(args)
        if code != EXIT_OK:
            return code, args
    return code, args


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
        records = rundir.read_metrics(path)
        if records:
            found.append((run, path, records))
        else:
            warn(f"warning: no metrics in {path} ({run.label}): left out")
    if not found:
        raise UsageError(f"no run of '{plan.experiment.name}' under {plan.out} has metrics yet")
    return found


