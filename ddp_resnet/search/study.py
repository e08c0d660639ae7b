"""The study on disk: Optuna's JournalStorage over ``DIR/study.journal``, the sampler and the pruner.

The journal is an append-only log of operations, readable and writable by many processes at once (the driver and
every trial's rank 0, also on other nodes when DIR is on a shared file system). Writers take
``JournalFileOpenLock``: an ``O_CREAT | O_EXCL`` lock file, which Optuna documents for NFSv3 and later (its
alternative, the symlink lock, is only for NFSv2); a lock left by a killed process is broken after 30 s.
"""
from __future__ import annotations

from pathlib import Path

INSTALL_HINT = 'the search needs Optuna: pip install -e ".[search]" (or pip install "optuna>=4.0")'
JOURNAL = "study.journal"
STUDY_NAME = "search"
METRIC_DIRECTIONS = {  # metrics.jsonl keys a search can optimize, and their natural direction
    "test_acc": "maximize", "test_top5": "maximize", "test_acc_ema": "maximize", "train_acc": "maximize",
    "test_loss": "minimize", "test_loss_ema": "minimize", "train_loss": "minimize",
}
PRUNERS = ("asha", "median", "none")
SAMPLERS = ("tpe", "random", "grid")
ASHA_REDUCTION = 3  # successive halving keeps the best third of the trials at each rung


class MissingOptuna(ImportError):
    """Optuna is not installed; the message says how to install it."""


def require_optuna():
    """The optuna module, or MissingOptuna (one line with the install command)."""
    try:
        import optuna
    except ImportError:
        raise MissingOptuna(INSTALL_HINT) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def storage(journal: str | Path):
    """A JournalStorage over the journal file (created if missing)."""
    optuna = require_optuna()
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path = str(journal)
    return optuna.storages.JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))


def pruner_info(name: str, prune_after: int, startup: int) -> dict:
    """What a trial process needs to build the same pruner (it is written into every trial's JSON file)."""
    return {"name": name, "prune_after": prune_after, "startup": startup}


def make_pruner(info: dict):
    """The pruner of ``pruner_info``: median (after ``startup`` completed trials and ``prune_after`` epochs),
    asha (successive halving from rung ``prune_after`` epochs, reduction factor 3), or none."""
    optuna = require_optuna()
    if info["name"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=info["startup"], n_warmup_steps=info["prune_after"])
    if info["name"] == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, info["prune_after"]),
                                                      reduction_factor=ASHA_REDUCTION)
    return optuna.pruners.NopPruner()


def make_sampler(name: str, params, seed: int):
    """TPE (constant liar for trials running in parallel), random, or grid over the discrete space."""
    optuna = require_optuna()
    if name == "grid":
        class Grid(optuna.samplers.GridSampler):
            def after_trial(self, study, trial, state, values) -> None:
                """Nothing: GridSampler's would call ``study.stop()``, which only works inside ``optimize``; the
                search stops at ``--trials`` (at most the grid's size) itself."""

        return Grid({p.key: p.grid() for p in params}, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def open_study(store, direction: str, sampler=None, pruner=None, create: bool = False, name: str = STUDY_NAME):
    """The study in the storage (created with ``create``)."""
    optuna = require_optuna()
    if create:
        return optuna.create_study(storage=store, study_name=name, direction=direction, sampler=sampler,
                                   pruner=pruner, load_if_exists=True)
    return optuna.load_study(storage=store, study_name=name, sampler=sampler, pruner=pruner)


def trial_id(store, number: int, name: str = STUDY_NAME) -> int:
    """The storage's id of trial ``number``."""
    return store.get_trial_id_from_study_id_trial_number(store.get_study_id_from_name(name), number)


def trial_handle(study, store, number: int, name: str = STUDY_NAME):
    """The live ``optuna.trial.Trial`` of a RUNNING trial, by number (what ``study.ask()`` returned for it)."""
    return require_optuna().trial.Trial(study, trial_id(store, number, name))
