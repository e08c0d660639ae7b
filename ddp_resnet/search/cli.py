"""`python -m ddp_resnet.search`: hyper-parameter search over any recipe with Optuna.

    python -m ddp_resnet.search --config RECIPE [key=value ...] --space KEY=KIND:ARGS ... --trials N --out DIR
        [--parallel K] [--sampler tpe|random|grid] [--pruner median|asha|none] [--prune-after E]
        [--pruner-startup S] [--metric test_acc] [--direction maximize|minimize] [--nproc-per-trial P]
        [--seed S] [--enqueue KEY=VALUE,...] [--smoke] [--slurm SLURM OPTIONS ...]

Each trial is an ordinary ``python -m ddp_resnet.train`` run in ``DIR/trials/NNNN`` (local processes, at most K
at once; P > 1 runs each under torchrun), or a SLURM job (what follows ``--slurm``, up to the next option of
the search, goes to ``python -m ddp_resnet.slurm``, e.g. ``--slurm --gpus-per-node 1 --time 240``). The study
is ``DIR/study.journal``; running the same command again continues it (see ``driver``). Results:
``DIR/search.md``, ``search.csv``, ``best.yaml`` (train the winner with ``python -m ddp_resnet.train --config
DIR/best.yaml``), ``plots/``.

Every argument, the space, the recipe at each range's end points and the SLURM options are checked before
anything is written or started: a problem is one line on stderr and exit 2 (so is a missing Optuna). Exit codes:
0 all trials finished (at least one complete), 1 none completed, 2 usage, 75 stopped by SIGTERM or Ctrl-C with
every running trial checkpointed (run the same command again), 130 a second signal.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ddp_resnet import config as config_mod
from ddp_resnet.config import ConfigError
from ddp_resnet.exitcodes import USAGE as EXIT_USAGE
from ddp_resnet.experiments.registry import SMOKE
from ddp_resnet.search import study as study_mod
from ddp_resnet.search.space import OWNED, Param, SpaceError, check_recipe, parse_enqueue, parse_space
from ddp_resnet.search.trial import TRIAL_FILE, trial_dir
from ddp_resnet.slurm.sweep import SweepError

# --smoke: the experiments' synthetic 16 px data, 2 steps per epoch, 3 epochs (so a pruner has epochs to act on)
SEARCH_SMOKE = (*SMOKE, "train.max_steps=6")
SEARCH_FILE = "search.json"
RESTART_KEYS = ("config", "overrides", "space", "metric", "direction", "sampler", "pruner", "seed")  # must match


class UsageError(ValueError):
    """A bad command line, in one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m ddp_resnet.search", description=__doc__.splitlines()[0],
                epilog="Example: python -m ddp_resnet.search --config configs/cifar10_resnet18.yaml data.root=data "
                       "--space optim.lr=log:0.01:1.0 optim.weight_decay=log:1e-5:1e-3 --trials 32 --parallel 4 "
                       "--out runs/search_r18. After --slurm, the options up to the next option of the search go to "
                       "python -m ddp_resnet.slurm.")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the recipe, for every trial")
    p.add_argument("--config", help="YAML recipe (as for python -m ddp_resnet.train)")
    p.add_argument("--space", nargs="+", action="extend", default=[], metavar="KEY=KIND:ARGS", required=True,
                   help="log:LO:HI, float:LO:HI[:STEP], int:LO:HI[:STEP] or choice:V1,V2,... for any config key")
    p.add_argument("--trials", type=int, help="trials in the study (the grid sampler: default, every point)")
    p.add_argument("--parallel", type=int, default=1, help="trials running at once (default 1)")
    p.add_argument("--sampler", choices=study_mod.SAMPLERS, default="tpe", help="default tpe")
    p.add_argument("--pruner", choices=study_mod.PRUNERS, default="median", help="default median")
    p.add_argument("--prune-after", type=int, default=1, metavar="E",
                   help="no trial is pruned before it has trained E epochs (asha: its first rung; default 1)")
    p.add_argument("--pruner-startup", type=int, default=5, metavar="S",
                   help="median: no pruning before S trials have completed (default 5)")
    p.add_argument("--metric", default="test_acc", choices=sorted(study_mod.METRIC_DIRECTIONS),
                   help="the metrics.jsonl key a trial is judged by (its best epoch); default test_acc")
    p.add_argument("--direction", choices=("maximize", "minimize"),
                   help="default: maximize for accuracies, minimize for losses")
    p.add_argument("--nproc-per-trial", type=int, default=1, metavar="P", help="processes per local trial")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed (default 0)")
    p.add_argument("--enqueue", action="append", default=[], metavar="KEY=VALUE,...",
                   help="a point to try first (repeatable; keys left out are sampled); used when the study starts")
    p.add_argument("--smoke", action="store_true", help="synthetic 16 px data, 2 steps per epoch, 3 epochs")
    p.add_argument("--out", required=True, help="the search directory (the study, the trials, the results)")
    return p


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str] | None]:
    """The search's own arguments, and the SLURM options after ``--slurm`` (None without it): every argument after
    it up to the next option of the search itself (``--out``, ``--trials``, ...), or to the end."""
    parser, slurm = build_parser(), None
    if "--slurm" in argv:
        own = {flag for action in parser._actions for flag in action.option_strings} - {"--config"}
        cut = argv.index("--slurm")
        end = next((i for i in range(cut + 1, len(argv)) if argv[i].split("=")[0] in own), len(argv))
        argv, slurm = argv[:cut] + argv[end:], argv[cut + 1:end]
    return parser.parse_intermixed_args(argv), slurm


@dataclass
class SearchSpec:
    """A validated search."""

    config: str | None  # absolute
    overrides: list  # --smoke's, then the user's
    params: list  # [Param]
    trials: int
    parallel: int
    sampler: str
    pruner: str
    pruner_info: dict
    metric: str
    direction: str
    nproc: int
    seed: int
    out: Path  # absolute
    device: str  # the recipe's train.device
    enqueue: list = field(default_factory=list)  # [{key: value}]
    slurm_args: list | None = None
    command: str = ""

    def fingerprint(self) -> dict:
        """What a later start of the search must repeat (search.json): the overrides of keys that do not change what
        a run computes (``config.RUN_KEYS``: data.root, loader workers, ...) may differ."""
        computed = [o for o in self.overrides if config_mod.parse_override(o)[0] not in config_mod.RUN_KEYS]
        return {"config": self.config, "overrides": computed, "space": [p.text for p in self.params],
                "metric": self.metric, "direction": self.direction, "sampler": self.sampler,
                "pruner": self.pruner_info, "seed": self.seed}

    def train_overrides(self, folder: Path, params: list[str]) -> list[str]:
        """A trial's overrides for ``ddp_resnet.train``: the search's, the trial's, its directory and trial file."""
        return [*self.overrides, *params, "ckpt.resume=auto", f"output_dir={folder}",
                f"train.trial={folder / TRIAL_FILE}"]


def _check_numbers(args: argparse.Namespace) -> None:
    for flag, value, low in (("--trials", args.trials, 1), ("--parallel", args.parallel, 1),
                             ("--nproc-per-trial", args.nproc_per_trial, 1), ("--prune-after", args.prune_after, 0),
                             ("--pruner-startup", args.pruner_startup, 0)):
        if value is not None and value < low:
            raise UsageError(f"{flag}: must be at least {low}, got {value}")


def _overrides(args: argparse.Namespace, params: list[Param]) -> list[str]:
    searched = {p.key for p in params}
    for text in args.overrides:
        key, _ = config_mod.parse_override(text)
        if key == "output_dir":
            raise UsageError("output_dir: use --out (each trial trains in DIR/trials/NNNN)")
        if key in OWNED:
            raise UsageError(f"{key}: cannot be set for a search ({OWNED[key]})")
        if key in searched:
            raise UsageError(f"{key}: given as an override and in --space; drop one")
    return [*(SEARCH_SMOKE if args.smoke else ()), *args.overrides]


def _trial_count(args: argparse.Namespace, params: list[Param]) -> int:
    if args.sampler != "grid":
        if args.trials is None:
            raise UsageError("--trials: required (how many trials the study runs)")
        return args.trials
    continuous = [p.text for p in params if p.grid() is None]
    if continuous:
        raise UsageError(f"--sampler grid: {', '.join(continuous)} is continuous; use choice:, int: or "
                         f"float:LO:HI:STEP")
    size = math.prod(len(p.grid()) for p in params)
    if args.trials is not None and args.trials > size:
        raise UsageError(f"--trials {args.trials}: the grid has only {size} points")
    return args.trials or size


def _check_slurm(spec: SearchSpec) -> int:
    """The SLURM options and one trial's submission, checked (nothing submitted); returns the world size."""
    from ddp_resnet.search.launch import slurm_argv
    from ddp_resnet.slurm import submit

    own = submit.parse_args(list(spec.slurm_args))
    for flag, value in (("--config", own.config), ("--sweep", own.sweep), ("--local", own.local),
                        ("--dry-run", own.dry_run), ("--wait", own.wait)):
        if value:
            raise UsageError(f"--slurm: {flag} is not for a search (the search gives each trial its own job)")
    if own.overrides:
        raise UsageError(f"--slurm: {own.overrides[0]}: key=value overrides go before --slurm")
    if spec.nproc != 1:
        raise UsageError("--nproc-per-trial: for local trials; with --slurm the tasks come from --nodes and "
                         "--tasks-per-node/--gpus-per-node")
    folder = trial_dir(spec.out, 0)
    sample = spec.train_overrides(folder, [p.override(p.end_points()[0]) for p in spec.params])
    plan = submit.make_plan(submit.parse_args(slurm_argv(spec, sample)))
    return plan.world_size


def _check_out(spec: SearchSpec) -> None:
    """DIR is new, empty, or this very search (its search.json matches); nothing is written here."""
    out = spec.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: not a directory")
    saved_path = out / SEARCH_FILE
    if not saved_path.is_file():
        stray = [p.name for p in out.iterdir() if p.name != ".lock"] if out.is_dir() else []
        if stray:
            raise UsageError(f"--out {out}: holds files but no search ({SEARCH_FILE} is missing); choose another --out")
        return
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"--out {out}: cannot read {SEARCH_FILE}: {exc}") from None
    now = spec.fingerprint()
    differ = [k for k in RESTART_KEYS if saved.get(k) != now[k]]
    if differ:
        shown = "; ".join(f"{k}: {saved.get(k)!r} there, {now[k]!r} now" for k in differ)
        raise UsageError(f"--out {out} holds another search ({shown}); repeat its command or choose another --out")


def make_spec(args: argparse.Namespace, slurm_args: list[str] | None, argv: list[str]) -> SearchSpec:
    """Check everything; raise UsageError, SpaceError, ConfigError (each one line)."""
    _check_numbers(args)
    params = parse_space(args.space)
    overrides = _overrides(args, params)
    config = str(Path(os.path.expanduser(args.config)).absolute()) if args.config else None
    base = config_mod.load(config, overrides)
    direction = args.direction or study_mod.METRIC_DIRECTIONS[args.metric]
    spec = SearchSpec(config, overrides, params, _trial_count(args, params), args.parallel, args.sampler, args.pruner,
                      study_mod.pruner_info(args.pruner, args.prune_after, args.pruner_startup), args.metric,
                      direction, args.nproc_per_trial, args.seed, Path(os.path.expanduser(args.out)).absolute(),
                      base.train.device, slurm_args=slurm_args,
                      command=shlex.join(["python", "-m", "ddp_resnet.search", *argv]))
    spec.enqueue = [parse_enqueue(text, params) for text in args.enqueue]
    if len(spec.enqueue) > spec.trials:
        raise UsageError(f"--enqueue: {len(spec.enqueue)} points for {spec.trials} trials")
    world = _check_slurm(spec) if slurm_args is not None else spec.nproc
    config_mod.validate_world(base, world)
    check_recipe(config, overrides, params, world)
    _check_out(spec)
    return spec


def main(argv: list[str] | None = None) -> int:
    """Parse, check, run the search; returns the exit code."""
    from ddp_resnet.slurm.submit import UsageError as SlurmUsageError

    argv = list(sys.argv[1:] if argv is None else argv)
    errors = (UsageError, SpaceError, ConfigError, SweepError, SlurmUsageError, study_mod.MissingOptuna)
    try:
        args, slurm_args = parse_args(argv)
        study_mod.require_optuna()
        spec = make_spec(args, slurm_args, argv)
    except errors as exc:
        print(f"ddp_resnet.search: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from ddp_resnet.search.driver import Search

    try:
        return Search(spec).run()
    except ConfigError as exc:  # DIR is in use by another search
        print(f"ddp_resnet.search: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def cli() -> None:
    """Console entry point (ddp-resnet-search)."""
    sys.exit(main())
