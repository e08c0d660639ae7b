"""`python -m ddp_resnet.train --config configs/X.yaml [key=value ...]`: the distributed training job.

Works the same under torchrun, under srun (SLURM tasks), and as a plain single process (world size 1, no
process group): parse -> config -> plan (checks, checkpoint) -> lock the output directory -> init -> train.
Exit codes are ``ddp_resnet.exitcodes``: 0 done, 1 a rank failed, 2 bad configuration, 65 non-finite training,
70 no progress (the watchdog), 74 a checkpoint write failed, 75 stopped by a signal with a checkpoint written
(resume with the same command), 76 too many unreadable samples, 79 a search trial its study pruned (``train.trial``
set by ``python -m ddp_resnet.search``: it stopped after that epoch's checkpoint). Code that trains in-process with
hooks of its own calls ``trainer.run(plan, env, callbacks)``.
"""
from __future__ import annotations

import argparse
import contextlib
import sys

from ddp_resnet import checkpoint as ckpt
from ddp_resnet import config as config_mod
from ddp_resnet import distributed, rundir, trainer
from ddp_resnet.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    """``--config`` and the dotted overrides."""
    parser = argparse.ArgumentParser(prog="python -m ddp_resnet.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML recipe (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.2 train.epochs=5")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, validate, initialise, train; returns the process exit code."""
    args = build_parser().parse_args(argv)
    launch = distributed.read_env()
    with contextlib.ExitStack() as held:  # the output directory's lock, released when main returns
        return distributed.guarded(lambda: _train(args, launch, held), launch.rank, "training",
                                   (ConfigError, ckpt.CheckpointError))


def _train(args: argparse.Namespace, launch: distributed.LaunchInfo, held: contextlib.ExitStack) -> int:
    cfg = config_mod.load(args.config, args.overrides)
    plan = trainer.plan_run(cfg, launch)
    callbacks = []
    if cfg.train.trial:  # a search trial: report each epoch to its study, stop when the study prunes it
        from ddp_resnet.search.reporter import reporter  # needs Optuna only here

        callbacks.append(reporter(cfg.train.trial))
    if launch.rank == 0:
        held.enter_context(rundir.RunLock(cfg.output_dir))
    env = distributed.init(cfg.train.device, cfg.dist.backend, cfg.dist.timeout_s, launch)
    code = trainer.run(plan, env, callbacks)
    distributed.cleanup()
    return code


def cli() -> None:
    """Console entry point."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
