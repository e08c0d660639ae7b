"""The process exit codes of every ddp_resnet command, defined once.

The trainer, the watchdog, the checkpoint writer, the SLURM job side (``slurm/train.sbatch`` too: a test checks
that its copy agrees) and every CLI use these names; README's "Exit codes" table lists the same set. The numbers
follow sysexits.h where one fits.
"""
from __future__ import annotations

OK = 0  # finished (or ``train.run_steps`` reached, after a checkpoint)
FAILED = 1  # a rank failed (its traceback is printed)
USAGE = 2  # bad arguments or configuration, an unusable checkpoint: one line, nothing written
NO_REQUEUE = 3  # ``python -m ddp_resnet.slurm.job``'s answer "do not requeue"
NONFINITE = 65  # EX_DATAERR: the loss or gradient norm became non-finite (``train.nonfinite``); no checkpoint after it
NO_INPUT = 66  # EX_NOINPUT: predict could decode not one of its input files (nothing written)
HUNG = 70  # EX_SOFTWARE: the watchdog saw no progress for ``dist.timeout_s`` (a peer stopped, died or deadlocked)
BAD_DATA = 76  # more than data.max_bad_images samples could not be read or decoded; a checkpoint of the last good
#   step was written (fix or remove the files, then resume)
PRUNED = 79  # a search trial the study pruned: it stopped at an epoch boundary after that epoch's checkpoint
INTERRUPTED = 130  # a second Ctrl-C (SIGINT) ended the process at once; the last good checkpoint is untouched
IO_ERROR = 74  # EX_IOERR: the environment failed (a checkpoint write, a full or read-only disk)
STOPPED = 75  # EX_TEMPFAIL: a stop signal arrived, the ranks agreed, last.pt was written: resume with the same command

DESCRIPTIONS = {
    OK: "finished (or train.run_steps reached, after a checkpoint)",
    FAILED: "a rank failed (its traceback is printed)",
    USAGE: "bad arguments, configuration or checkpoint (one line; nothing written)",
    NO_REQUEUE: "slurm.job: do not requeue",
    NONFINITE: "non-finite loss or gradient norm (train.nonfinite); no checkpoint written after the bad step",
    NO_INPUT: "predict: not one input file could be decoded (nothing written)",
    HUNG: "no progress for dist.timeout_s (the watchdog)",
    IO_ERROR: "the environment failed: a checkpoint write or the disk",
    STOPPED: "stopped by a signal with last.pt written: rerun or requeue to resume exactly",
    BAD_DATA: "more than data.max_bad_images unreadable samples; last.pt of the last good step written",
    PRUNED: "search: the study pruned this trial at an epoch boundary (its checkpoint written)",
    INTERRUPTED: "a second Ctrl-C: ended at once, the last good checkpoint untouched",
}
