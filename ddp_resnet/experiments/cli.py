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
* ``augment_ablation``: the seeds' tips one at a time on the ResNet-18 recipe (a baseline, then cutout, random
  erasing, colour jitter, rotation/scaling, mixup, cutmix, AutoAugment, TrivialAugment, head dropout, label
  smoothing, warm-up, cyclic lr; ``registry.AUGMENT_TIPS``), and two more baseline seeds whose ensemble with the
  baseline (``python -m ddp_resnet.evaluate --checkpoint`` of the three) is the ensembles tip:
  ``augment_ablation.md`` / ``.csv`` (final and best test error, change against the baseline) and
  ``augment_ablation.png``. It runs a list of points rather than a product, so ``--slurm`` submits one job each.

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
import shlex
import sys

from ddp_resnet import plots
from ddp_resnet.config import ConfigError
from ddp_resnet.exitcodes import USAGE as EXIT_USAGE
from ddp_resnet.experiments.analyses import analyze
from ddp_resnet.experiments.registry import EXPERIMENTS
from ddp_resnet.experiments.runner import (
    EXIT_OK,
    UsageError,
    make_plan,
    slurm_argvs,
    submit_to_slurm,
    train_command,
    train_runs,
)
from ddp_resnet.slurm.sweep import SweepError


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


def print_list() -> None:
    """``--list``: every experiment, its recipe and its runs or sweep."""
    for e in EXPERIMENTS.values():
        sweep = " ".join(f"{k}={','.join(v)}" for k, v in e.sweep)
        runs = f"runs {', '.join(label for label, _ in e.points)}" if e.points else f"sweep {sweep}"
        print(f"{e.name:<16} {e.description}\n{'':<16} configs/experiments/{e.recipe}, {runs}")


def print_dry_run(plan, nproc_per_node: int) -> None:
    """``--dry-run`` without ``--slurm``: the commands that would train, nothing run."""
    experiment = plan.experiment
    print(f"# {experiment.name}: {experiment.description}")
    print(f"# recipe {plan.recipe}; output {plan.out}")
    for run in plan.runs if experiment.trains else ():
        print(shlex.join(train_command(run, nproc_per_node)))
    if not experiment.trains:
        print(f"# computed here at initialisation, no training: {', '.join(r.label for r in plan.runs)}")
    print("# dry run: nothing trained")


def main(argv: list[str] | None = None) -> int:
    """Run one experiment; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    slurm_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, slurm_args = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_intermixed_args(argv)
    if args.list:
        print_list()
        return EXIT_OK
    try:
        if not args.name:
            raise UsageError("name an experiment (--list shows them)")
        if slurm_args and not args.slurm:
            raise UsageError("options after '--' are for --slurm")
        if args.nproc_per_node < 1:
            raise UsageError(f"--nproc-per-node: must be > 0, got {args.nproc_per_node}")
        plan = make_plan(args)
        if plan.experiment.analysis != "depth_table" and not args.dry_run and not (
                args.slurm and plan.experiment.trains):
            plots.require_matplotlib()  # before hours of training, not after
    except (plots.MissingMatplotlib, UsageError, SweepError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    experiment = plan.experiment
    again = (f"python -m ddp_resnet.experiments {experiment.name} --out {plan.out}{' --smoke' if args.smoke else ''} "
             f"--analyze-only")
    if args.slurm and experiment.trains and not args.analyze_only:
        for argv in slurm_argvs(plan, slurm_args):
            print(shlex.join(["python", "-m", "ddp_resnet.slurm", *argv]), flush=True)
        if args.dry_run:
            print(f"# dry run: nothing submitted; afterwards: {again}")
            return EXIT_OK
        code, submitted = submit_to_slurm(plan, slurm_args)
        if code != 0 or submitted.dry_run:
            return code
        if not submitted.wait:
            print(f"when the jobs are done: {again}", flush=True)
            return code
        args.analyze_only = True  # the jobs have finished (--wait): draw from their runs
    elif args.dry_run:
        print_dry_run(plan, args.nproc_per_node)
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
