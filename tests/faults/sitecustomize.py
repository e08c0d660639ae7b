"""Fault injection for the tests, installed into child processes through Python's ``sitecustomize`` hook.

The tests put this folder on PYTHONPATH (``conftest.child_env``, the SLURM launcher helper); Python imports this
module at start-up in every process (torchrun's workers, srun's tasks, submitit's jobs). It does nothing unless
a ``DDP_RESNET_TEST_*`` variable is set; the package itself reads none of them.

* ``DDP_RESNET_TEST_FAIL_AT=RANK:STEP``: that rank raises once the run has done STEP steps;
* ``DDP_RESNET_TEST_STEP_DELAY_S=S``: every rank sleeps S seconds after each step (so a test can signal or kill a
  run mid-training, whatever the machine's speed);
* ``DDP_RESNET_TEST_SLOW_SAVE_S=S``: a checkpoint write sleeps S seconds between writing its temporary file and
  renaming it (a slow disk, to kill a write half-way);
* ``DDP_RESNET_TEST_SCAN_LOG=FILE``: each walk of an ImageFolder tree appends the walking rank to FILE;
* ``DDP_RESNET_TEST_SLOW_RANK=RANK:S``: that rank's forward passes each take S seconds longer (a slow GPU);
* ``DDP_RESNET_TEST_NAN_AT=RANK:STEP``: that rank's input is multiplied by NaN in step STEP (0-based), once;
* ``DDP_RESNET_TEST_UNDO_AT=STEP``: every rank puts weights, buffers, optimizer and EMA back as they were before
  step STEP once it is done: a run in which that step's update never happened (the scheduler still advances).

How they are installed: the trainer's own seam, ``trainer.Callback`` objects passed to ``trainer.run`` (which
``ddp_resnet.train`` calls by module attribute); ``trainer.run`` is wrapped to add the ``Faults`` callback, whose
``on_fit_start`` adds the forward hooks (slow rank, NaN input) to the model and whose ``on_step_end`` fails, sleeps
or undoes a step. The checkpoint writer's ``os.replace`` and the ImageFolder walk are wrapped for the other two.
"""
import os

_FAIL_AT = os.environ.get("DDP_RESNET_TEST_FAIL_AT", "")
_STEP_DELAY = float(os.environ.get("DDP_RESNET_TEST_STEP_DELAY_S", "0") or 0)
_SLOW_SAVE = float(os.environ.get("DDP_RESNET_TEST_SLOW_SAVE_S", "0") or 0)
_SCAN_LOG = os.environ.get("DDP_RESNET_TEST_SCAN_LOG", "")
_SLOW_RANK = os.environ.get("DDP_RESNET_TEST_SLOW_RANK", "")
_NAN_AT = os.environ.get("DDP_RESNET_TEST_NAN_AT", "")
_UNDO_AT = os.environ.get("DDP_RESNET_TEST_UNDO_AT", "")


def _pair(text: str, kind=int) -> tuple:
    rank, value = text.split(":")
    return int(rank), kind(value)


def _install() -> None:
    import copy
    import time

    from ddp_resnet import checkpoint, trainer
    from ddp_resnet.data import imagefolder

    fail_rank, fail_step = _pair(_FAIL_AT) if _FAIL_AT else (-1, -1)
    slow_rank, slow_s = _pair(_SLOW_RANK, float) if _SLOW_RANK else (-1, 0.0)
    nan_rank, nan_step = _pair(_NAN_AT) if _NAN_AT else (-1, -1)
    undo_step = int(_UNDO_AT) if _UNDO_AT else -1

    def forward_faults(run: trainer.Trainer):
        def hook(module, inputs):
            if run.env.rank == slow_rank:
                time.sleep(slow_s)
            if run.env.rank == nan_rank and run.state.step == nan_step and module.training:
                return (inputs[0] * float("nan"),)
            return None

        return hook

    class Faults(trainer.Callback):
        saved = None

        def on_fit_start(self, run: trainer.Trainer) -> None:
            if _SLOW_RANK or _NAN_AT:
                run.train_step.bare.register_forward_pre_hook(forward_faults(run))

        def on_step_end(self, run: trainer.Trainer) -> None:
            step, parts = run.state.step, run.train_step
            if run.env.rank == fail_rank and step == fail_step:
                raise RuntimeError(f"injected failure on rank {run.env.rank} at step {step}")
            if step == undo_step:  # the state before step `undo_step`
                self.saved = copy.deepcopy((parts.bare.state_dict(), parts.optimizer.state_dict(),
                                            parts.ema.state_dict() if parts.ema is not None else None))
            elif step == undo_step + 1 and self.saved is not None:
                model, optimizer, ema = self.saved
                parts.bare.load_state_dict(model)
                parts.optimizer.load_state_dict(optimizer)  # its momentum; the learning rate stays scheduled:
                for group, lr in zip(parts.optimizer.param_groups, parts.scheduler.get_last_lr()):
                    group["lr"] = lr
                if ema is not None:
                    parts.ema.load_state_dict(ema)
            if _STEP_DELAY:
                time.sleep(_STEP_DELAY)

    real_run = trainer.run

    def run_with_faults(plan, env, callbacks=()):
        return real_run(plan, env, [*callbacks, Faults()])

    trainer.run = run_with_faults

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


if any((_FAIL_AT, _STEP_DELAY, _SLOW_SAVE, _SCAN_LOG, _SLOW_RANK, _NAN_AT, _UNDO_AT)):
    _install()
