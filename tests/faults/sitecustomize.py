"""Fault injection for the tests, installed into child processes through Python's ``sitecustomize`` hook.

The tests put this folder on PYTHONPATH (``conftest.child_env``, the SLURM launcher helper); Python imports this
module at start-up in every process (torchrun's workers, srun's tasks, submitit's jobs). It does nothing unless
a ``DDP_RESNET_TEST_*`` variable is set; the package itself reads none of them.

* ``DDP_RESNET_TEST_FAIL_AT=RANK:STEP``: that rank raises once the run has done STEP steps;
* ``DDP_RESNET_TEST_STEP_DELAY_S=S``: every rank sleeps S seconds after each step (so a test can signal or kill a
  run mid-training, whatever the machine's speed);
* ``DDP_RESNET_TEST_SLOW_SAVE_S=S``: a checkpoint write sleeps S seconds between writing its temporary file and
  renaming it (a slow disk, to kill a write half-way);
* ``DDP_RESNET_TEST_SCAN_LOG=FILE``: each walk of an ImageFolder tree appends the walking rank to FILE.
"""
import os

_FAIL_AT = os.environ.get("DDP_RESNET_TEST_FAIL_AT", "")
_STEP_DELAY = float(os.environ.get("DDP_RESNET_TEST_STEP_DELAY_S", "0") or 0)
_SLOW_SAVE = float(os.environ.get("DDP_RESNET_TEST_SLOW_SAVE_S", "0") or 0)
_SCAN_LOG = os.environ.get("DDP_RESNET_TEST_SCAN_LOG", "")


def _install() -> None:
    import time

    from ddp_resnet import checkpoint, trainer
    from ddp_resnet.data import imagefolder

    fail_rank, fail_step = (int(v) for v in _FAIL_AT.split(":")) if _FAIL_AT else (-1, -1)

    class Faults(trainer.Callback):
        def on_step_end(self, run: trainer.Trainer) -> None:
            if run.env.rank == fail_rank and run.step == fail_step:
                raise RuntimeError(f"injected failure on rank {run.env.rank} at step {run.step}")
            if _STEP_DELAY:
                time.sleep(_STEP_DELAY)

    original_init = trainer.Trainer.__init__

    def init_with_faults(self, *args, **kwargs) -> None:
        original_init(self, *args, **kwargs)
        self.callbacks.append(Faults())

    trainer.Trainer.__init__ = init_with_faults

    if _SLOW_SAVE:
        real_replace = checkpoint.os.replace

        def slow_replace(src, dst, *args, **kwargs):
            if ".tmp." in os.path.basename(str(src)):
                time.sleep(_SLOW_SAVE)
            return real_replace(src, dst, *args, **kwargs)

        checkpoint.os.replace = slow_replace

    if _SCAN_LOG:
        real_scan = imagefolder.scan_imagefolder

        def logged_scan(root):
            with open(_SCAN_LOG, "a") as log:
                log.write(f"{os.environ.get('RANK', '0')}\n")
            return real_scan(root)

        imagefolder.scan_imagefolder = logged_scan


if _FAIL_AT or _STEP_DELAY or _SLOW_SAVE or _SCAN_LOG:
    _install()
