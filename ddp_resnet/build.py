"""From a Config to runnable pieces: the one place train, bench, evaluate, report and experiments build them.

* ``seed_everything``, ``apply_torch_flags``, ``accumulation``, ``micro_batch``: the run's seeds, torch backend
  flags, accumulation steps and per-rank micro-batch at a world size;
* ``resolve_stem``, ``build_network`` (model, fine-tuning preparation, then ``place``: SyncBatchNorm and memory
  format on the device), ``network_from_weights`` (a checkpoint's or an export's weights in the config's network);
* ``wrap_ddp`` and ``build_step``: optimizer, schedule, GradScaler, EMA, DDP (with ``dist.comm_hook``:
  ``comm_hooks``) and torch.compile in the engine's ``TrainStep``, whose first call falls back to eager (re-wrapped
  by ``wrap_ddp``, with the same hook state) when compiling fails.
"""
from __future__ import annotations

import inspect
import math
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_resnet import checkpoint as ckpt
from ddp_resnet import comm_hooks
from ddp_resnet.config import Config, ConfigError, accumulation  # accumulation: micro-steps per step at a world size
from ddp_resnet.engine import StepSettings, TrainStep, first_line
from ddp_resnet.models import build_model, is_cifar_only
from ddp_resnet.optim import ModelEma, build_optimizer, build_scheduler
from ddp_resnet.syncbn import convert_sync_batchnorm


# --------------------------------------------------------------------------------------------- process state
def seed_everything(seed: int, rank: int) -> None:
    """Same weights on every rank (torch seed), distinct python/numpy streams per rank."""
    torch.manual_seed(seed)
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)


def apply_torch_flags(cfg: Config) -> None:
    """Deterministic algorithms and the cudnn autotuner as the config asks."""
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark and not cfg.train.deterministic


def micro_batch(cfg: Config, world_size: int) -> int:
    """Images per rank per micro-step: the global batch over ranks and accumulation steps."""
    return cfg.data.batch_size // (world_size * accumulation(cfg, world_size))


# --------------------------------------------------------------------------------------------- networks
def resolve_stem(cfg: Config, info) -> str | None:
    """model.stem=auto: the CIFAR stem for small images, the ImageNet stem otherwise."""
    if cfg.model.stem != "auto":
        return cfg.model.stem
    if is_cifar_only(cfg.model.name):
        return None
    return "cifar" if info.image_size <= 64 else "imagenet"


def place(model: nn.Module, cfg: Config, device: torch.device, distributed: bool) -> nn.Module:
    """SyncBatchNorm (with a process group and ``train.sync_bn``) and the memory format, on the device."""
    if cfg.train.sync_bn and distributed:
        model = convert_sync_batchnorm(model, device)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    return model.to(device, memory_format=memory_format)


def _bare_network(cfg: Config, info) -> nn.Module:
    try:
        return build_model(cfg.model.name, num_classes=info.num_classes, stem=resolve_stem(cfg, info),
                           zero_init_residual=cfg.model.zero_init_residual, blurpool=cfg.model.blurpool,
                           head_dropout=cfg.model.head_dropout)
    except ValueError as exc:  # e.g. a CIFAR-only net with the ImageNet stem
        raise ConfigError(f"model: {exc}") from None


def build_network(cfg: Config, info, env) -> nn.Module:
    """The bare model to train, on its device: built, fine-tune-prepared, SyncBN-converted, in its memory format."""
    model = _bare_network(cfg, info)
    if cfg.finetune.checkpoint or cfg.finetune.freeze != "none":
        from ddp_resnet.finetune import prepare

        prepare(model, cfg.finetune, info.num_classes)
    return place(model, cfg, env.device, env.distributed)


def network_from_weights(cfg: Config, info, state: dict, path: str | Path, device: torch.device) -> nn.Module:
    """The config's network holding ``state`` (a checkpoint's ``model`` or ``ema``), on the device, in eval mode."""
    ckpt.check_compatible({"model": state}, cfg.model.name, info.num_classes, path)
    model = _bare_network(cfg, info)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ckpt.CheckpointError(f"checkpoint {path} does not fit model {cfg.model.name} "
                                   f"({' '.join(line.strip() for line in first[:2])[:200]})") from None
    return place(model, cfg, device, distributed=False).eval()


# --------------------------------------------------------------------------------------------- the step
def wrap_ddp(bare: nn.Module, cfg: Config, env, image_size: int = 64,
             hook: comm_hooks.CommHook | None = None) -> DDP | None:
    """DDP around the bare model with the config's options, when there is a process group (else None), its
    gradient buckets already settled (``settle_buckets``), then ``dist.comm_hook`` registered: ``hook`` (the step's
    one, shared by every wrapper of it: PowerSGD's state), or a new one. Registered after the settling pass, the
    hook neither runs in it nor counts it, and sees the final buckets from its first call on, fresh or resumed."""
    if not env.distributed:
        return None
    d = cfg.dist
    # torch >= 2.13 renamed broadcast_buffers (now deprecated, with a warning) to forward_sync_buffers
    renamed = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    options = {"forward_sync_buffers" if renamed else "broadcast_buffers": d.forward_sync_buffers}
    if d.bucket_cap_mb > 0:  # passing any size, even DDP's default 25, also drops DDP's small first bucket
        options["bucket_cap_mb"] = d.bucket_cap_mb
    ddp = DDP(bare, device_ids=[env.device.index] if env.device.type == "cuda" else None,
              static_graph=d.static_graph, gradient_as_bucket_view=d.gradient_as_bucket_view, **options)
    settle_buckets(ddp, bare, image_size, env.device)
    (hook or comm_hooks.CommHook(cfg)).register(ddp)
    return ddp


def settle_buckets(ddp: DDP, bare: nn.Module, image_size: int, device: torch.device) -> None:
    """One forward and backward of two blank images through a new DDP wrapper (two with ``static_graph``, whose
    first backward records the graph and not the gradients' order), then DDP's re-bucketing, so that its gradient
    buckets are final before the first training step; weights, buffers, gradients and random streams are left as
    they were.

    DDP reduces its first backward's gradients as one bucket, then re-buckets them in the order they became ready.
    With three or more ranks a gradient element's sum depends on where it lies in its bucket (a ring all-reduce
    adds each chunk in a different rank order), so a resumed process, whose first step would be reduced as one
    bucket, would drift (in the last bits) from the run it continues. Every process spends that first pass here.
    """
    saved = [b.detach().clone() for b in bare.buffers()]
    cuda = [device] if device.type == "cuda" else []  # the CPU generator is always forked
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        blank = torch.zeros(2, 3, image_size, image_size, device=device)
        for _ in range(2 if ddp.static_graph else 1):
            ddp(blank).float().mean().backward()
            ddp.reducer._rebuild_buckets()  # what the next forward would do first (DDP's Join does the same)
    with torch.no_grad():
        for buffer, value in zip(bare.buffers(), saved):
            buffer.copy_(value)
    for param in bare.parameters():
        param.grad = None


def steps_per_epoch(cfg: Config, info, world_size: int) -> int:
    """Optimizer steps per epoch: each rank's whole micro-batches of its shard, grouped by accumulation (what
    every training loader yields)."""
    return info.train_size // world_size // micro_batch(cfg, world_size) // accumulation(cfg, world_size)


def run_length(cfg: Config, info, world_size: int) -> tuple[int, int]:
    """``(total optimizer steps, total epochs)`` of the run: ``train.max_steps`` or ``train.epochs``."""
    per_epoch = max(steps_per_epoch(cfg, info, world_size), 1)
    total = cfg.train.max_steps or cfg.train.epochs * per_epoch
    return total, math.ceil(total / per_epoch)


def compile_options(cfg: Config, total_epochs: int) -> dict:
    """``torch.compile`` keyword arguments. With progressive resizing, ``dynamic=False``: each of the schedule's few
    training sides is compiled once as its own static specialization (no dynamic-shape graph); dynamo's recompile
    limit is raised to cover them (evaluation runs the uncompiled module, at its own side)."""
    from ddp_resnet.data.loaders import train_schedule

    schedule = train_schedule(cfg.data, total_epochs)
    if schedule is None or len(schedule.sizes()) < 2:
        return {}
    import torch._dynamo

    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    needed = len(schedule.sizes()) + 1  # one specialization per side, and a spare
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), needed))
    return {"dynamic": False}


def build_step(cfg: Config, info, env, bare: nn.Module, total_steps: int, steps_per_epoch: int, total_epochs: int,
               note: Callable[[str], None] = print) -> TrainStep:
    """The ``engine.TrainStep`` around ``bare``: optimizer, scheduler, scaler, EMA, DDP and torch.compile."""
    optimizer = build_optimizer(bare, cfg, env.device)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps, steps_per_epoch)
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.train.amp == "fp16")
    ema = ModelEma(bare, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    hook = comm_hooks.CommHook(cfg) if env.distributed else None
    if (single := comm_hooks.single_process_note(cfg, env.distributed)) is not None:
        note(single)
    ddp = wrap_ddp(bare, cfg, env, info.image_size, hook)
    model: nn.Module = ddp or bare
    compiled = "off"
    if cfg.train.compile:
        try:
            model = torch.compile(model, backend=cfg.train.compile_backend, **compile_options(cfg, total_epochs))
            compiled = "on"
        except Exception as exc:  # noqa: BLE001 - any compile failure means: run eagerly
            note(f"note: torch.compile failed ({first_line(exc)}); falling back to eager")
            compiled = "fallback"
    settings = StepSettings(device=env.device, amp=cfg.train.amp, label_smoothing=cfg.train.label_smoothing,
                            clip_grad_norm=cfg.optim.clip_grad_norm, num_classes=info.num_classes,
                            mixup_alpha=cfg.data.mixup_alpha, cutmix_alpha=cfg.data.cutmix_alpha,
                            seed=cfg.train.seed, rank=env.rank, skip_nonfinite=cfg.train.nonfinite == "skip",
                            loss=cfg.train.loss, bce_target_thresh=cfg.train.bce_target_thresh)
    return TrainStep(bare, optimizer, scheduler, scaler, settings, ema=ema, model=model, ddp=ddp, compiled=compiled,
                     rewrap=lambda: wrap_ddp(bare, cfg, env, info.image_size, hook), note=note)
