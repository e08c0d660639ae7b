"""Inside a trial's training process: report each evaluated epoch to the study and stop when it prunes.

``ddp_resnet.train`` installs ``TrialReporter`` when ``train.trial`` is set. At the end of every evaluated epoch,
rank 0 reports the epoch's metric to the trial (step = epochs trained) and asks the study's pruner; a pruned
trial gets the user attribute ``pruned_epoch`` and asks the trainer to stop after this epoch
(``Trainer.stop_after_epoch``): the epoch's checkpoint is written, the ranks agree in one all-reduce, and every
rank exits with ``exitcodes.PRUNED`` (79). The decision is taken here, in the trial, so it is the same for a
local trial and a SLURM job, and does not depend on when the driver looks. After a resume, an epoch already
reported is not reported again (Optuna ignores it; the resumed run computes the same value anyway).
"""
from __future__ import annotations

import warnings

from ddp_resnet import exitcodes, trainer
from ddp_resnet.config import ConfigError
from ddp_resnet.search import study as study_mod
from ddp_resnet.search.trial import read_trial_file


class TrialReporter(trainer.Callback):
    """Reports ``info["metric"]`` at each evaluated epoch end (rank 0) and stops the run when the trial is pruned."""

    def __init__(self, info: dict):
        self.info = info
        self.trial = None  # rank 0's optuna Trial, once the run starts

    def on_fit_start(self, run: trainer.Trainer) -> None:
        if not run.env.is_main:
            return
        optuna = study_mod.require_optuna()
        store, name, number = study_mod.storage(self.info["journal"]), self.info["study"], int(self.info["number"])
        study = study_mod.open_study(store, self.info["direction"], optuna.samplers.RandomSampler(),
                                     study_mod.make_pruner(self.info["pruner"]), name=name)
        state = store.get_trial(study_mod.trial_id(store, number, name)).state
        if state != optuna.trial.TrialState.RUNNING:
            trainer.log(run.env, f"note: trial {number} is {state.name} in its study: its epochs are not reported")
            return
        self.trial = study_mod.trial_handle(study, store, number, name)

    def on_epoch_end(self, run: trainer.Trainer, record: dict) -> None:
        metric = self.info["metric"]
        if self.trial is None or record.get(metric) is None:
            return
        epoch, value = int(record["epoch"]) + 1, float(record[metric])
        with warnings.catch_warnings():  # an epoch reported before a resume: ignored, with a warning
            warnings.simplefilter("ignore")
            self.trial.report(value, epoch)
        if self.trial.should_prune():
            self.trial.set_user_attr("pruned_epoch", epoch)
            trainer.log(run.env, f"search: the study prunes trial {self.info['number']} at epoch {epoch} ({metric} "
                                 f"{value:.4g}); it stops after this epoch's checkpoint (exit {exitcodes.PRUNED})")
            run.stop_after_epoch(exitcodes.PRUNED)


def reporter(path: str) -> TrialReporter:
    """The callback for ``train.trial=PATH`` (every rank: a missing file or Optuna is a ConfigError on all)."""
    info = read_trial_file(path)
    try:
        study_mod.require_optuna()
    except study_mod.MissingOptuna as exc:
        raise ConfigError(f"train.trial: {exc}") from None
    return TrialReporter(info)
