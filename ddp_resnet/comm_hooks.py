"""DDP communication hooks (``dist.comm_hook``): PyTorch's own hooks on the trainer's DDP wrapper, PowerSGD's
per-rank state in the checkpoint, and the bytes each hook hands to the all-reduce.

* ``fp16`` / ``bf16``: ``default_hooks.fp16_compress_hook`` / ``bf16_compress_hook``: each gradient bucket is cast to
  16 bits (divided by the world size first), all-reduced, cast back. Half the bytes; stateless.
* ``powersgd``: ``powerSGD_hook`` with a ``PowerSGDState`` (rank ``dist.powersgd_rank``, error feedback and warm
  start on, plain all-reduce for the first ``dist.powersgd_warmup_steps`` steps). Its state is per rank (each rank's
  own error feedback per bucket) and is saved in the checkpoint (``gather_state``, ``restore_state``).

``build.wrap_ddp`` registers the hook after ``build.settle_buckets``: the settling pass neither runs it nor counts
as one of PowerSGD's iterations, and the buckets it sees (their index is PowerSGD's key) are already the final ones,
in a fresh process and in a resumed one alike. ``CommHook`` is built once per ``engine.TrainStep`` and registered on
each of its DDP wrappers (the torch.compile fallback wraps again), so they share one state; ``hook_of(ddp)`` finds
it.

What each setup can do, measured with torch 2.14 (2 processes, gloo on the CPU): fp16, bf16 and PowerSGD all
train. bf16 is refused by DDP itself when torch was built without CUDA/NCCL (``check_config`` says so in planning).
PowerSGD chains its bucket's three all-reduces (uncompressed tensors, then P, then Q) in future callbacks; gloo runs
those callbacks on its own threads, so with more than one bucket the ranks issued the next bucket's all-reduce and
the chained ones in different orders (gloo aborted: "Received data size doesn't match expected size"). On gloo the
hook therefore waits for its bucket's chain before returning (``_gloo_powersgd_hook``): correct, without overlap of
communication and the rest of the backward. NCCL (not measured here) completes a work's future once its kernel is
queued, so the callbacks run at once, in order, in the calling thread: PyTorch's own tests run PowerSGD there.

Refused in one line (``check_config``): PowerSGD with fewer than 2 warm-up steps (PyTorch's ``start_powerSGD_iter >
1`` with error feedback), with ``train.amp=fp16`` (the GradScaler's scaled, and on an overflow infinite, gradients
enter the error feedback and every later step stays non-finite: measured with a NaN on one rank) and with
``train.nonfinite=skip`` (the same: a skipped step's non-finite gradient stays in the error feedback). PowerSGD with
``dist.static_graph``, with gradient accumulation (``no_sync``: the hook runs on the step's last micro-batch only) and
with torch.compile trains; with the first two it resumes bit for bit (2 ranks, gloo).
"""
from __future__ import annotations

import contextlib
import copy
import weakref
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ddp_resnet.config import Config, ConfigError

HOOKS = ("none", "fp16", "bf16", "powersgd")
PAYLOAD_KEY = "comm_hook"  # the checkpoint's entry: {"name", "matrix_rank", "world_size", "ranks": [state per rank]}
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # DDP wrapper -> its CommHook


# --------------------------------------------------------------------------------------------- planning
def bf16_hook_supported() -> bool:
    """Whether DDP accepts ``bf16_compress_hook`` in this torch build (its own check: a CUDA or ROCm build with
    NCCL 2.10+, or XPU with XCCL; the backend in use does not matter)."""
    try:
        gpu_build = torch.version.cuda is not None or torch.version.hip is not None
        nccl = dist.is_available() and dist.is_nccl_available() and torch.cuda.nccl.version() >= (2, 10)
    except (AttributeError, RuntimeError):
        gpu_build = nccl = False
    xpu = dist.is_available() and getattr(dist, "is_xccl_available", lambda: False)() and torch.xpu.is_available()
    return bool((gpu_build and nccl) or xpu)


def check_config(cfg: Config) -> None:
    """The hook settings that cannot work, refused in one line before any process group exists."""
    d, hook = cfg.dist, cfg.dist.comm_hook
    for key, value, least in (("powersgd_rank", d.powersgd_rank, 1),
                              ("powersgd_warmup_steps", d.powersgd_warmup_steps, 0)):
        if value < least:
            raise ConfigError(f"dist.{key}: must be {'> 0' if least else '>= 0'}, got {value}")
    if hook == "bf16" and not bf16_hook_supported():
        raise ConfigError("dist.comm_hook: this torch build's DDP refuses the bf16 hook (it needs a CUDA build with "
                          "NCCL 2.10+, whatever the backend); use fp16")
    if hook != "powersgd":
        return
    if d.powersgd_warmup_steps < 2:
        raise ConfigError(f"dist.powersgd_warmup_steps: PowerSGD's error feedback needs at least 2 plain all-reduce "
                          f"steps first (PyTorch's start_powerSGD_iter > 1), got {d.powersgd_warmup_steps}")
    if cfg.train.amp == "fp16":
        raise ConfigError("dist.comm_hook: powersgd cannot be combined with train.amp=fp16: the GradScaler's scaled "
                          "(on an overflow infinite) gradients would enter PowerSGD's error feedback and keep every "
                          "later step non-finite; use train.amp=bf16 or none")
    if cfg.train.nonfinite == "skip":
        raise ConfigError("dist.comm_hook: powersgd cannot be combined with train.nonfinite=skip: a skipped step's "
                          "non-finite gradient would stay in PowerSGD's error feedback; use train.nonfinite=stop")


def single_process_note(cfg: Config, distributed: bool) -> str | None:
    """One line for a hook configured in a run without a process group (world size 1), where it has no effect."""
    if distributed or cfg.dist.comm_hook == "none":
        return None
    return (f"note: dist.comm_hook={cfg.dist.comm_hook} has no effect in a single process (no gradients are "
            f"all-reduced); it applies when the run has more than one process")


# --------------------------------------------------------------------------------------------- the hook
def _gloo_powersgd_hook(state, bucket):
    """``powerSGD_hook``, waited for before the backward goes on: under gloo its chained all-reduces are issued
    from gloo's threads, and waiting keeps every rank's collectives in the same order (see the module's doc)."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    future = powerSGD_hook.powerSGD_hook(state, bucket)
    future.wait()
    return future


class CommHook:
    """The run's communication hook and its state (a ``PowerSGDState`` for powersgd, else none)."""

    def __init__(self, cfg: Config):
        self.name, self.matrix_rank = cfg.dist.comm_hook, cfg.dist.powersgd_rank
        self.seed = cfg.train.seed % 2**32
        self.state = None
        if self.name == "powersgd":
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

            # the same seed on every rank: the ranks' first random projections Q must be equal
            self.state = powerSGD_hook.PowerSGDState(
                process_group=None, matrix_approximation_rank=cfg.dist.powersgd_rank,
                start_powerSGD_iter=cfg.dist.powersgd_warmup_steps, random_seed=self.seed)

    def register(self, ddp: nn.Module) -> None:
        """Register on a DDP wrapper (once its buckets are settled); none leaves DDP's built-in all-reduce."""
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

        _ATTACHED[ddp] = self
        if self.name == "fp16":
            ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        elif self.name == "bf16":
            ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
        elif self.name == "powersgd":
            gloo = dist.get_backend(ddp.process_group) == "gloo"
            ddp.register_comm_hook(self.state, _gloo_powersgd_hook if gloo else powerSGD_hook.powerSGD_hook)

    def state_dict(self) -> dict:
        """This rank's PowerSGD state as plain values and CPU tensors: everything that shapes the next step."""
        s = self.state
        _, keys, pos, has_gauss, cached = s.rng.get_state()
        cpu = {name: {int(i): t.detach().to("cpu", copy=True) for i, t in getattr(s, name).items()}
               for name in ("error_dict", "p_memory_dict", "q_memory_dict")}
        return {"iter": int(s.iter), **cpu,
                "rng": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                        "cached_gaussian": float(cached)},
                "stats": [int(s.total_numel_before_compression), int(s.total_numel_after_compression),
                          int(s.next_stats_report)]}

    def load_state_dict(self, saved: dict, device: torch.device) -> None:
        """The inverse of ``state_dict``, tensors onto ``device``."""
        s = self.state
        s.iter = int(saved["iter"])
        for name in ("error_dict", "p_memory_dict", "q_memory_dict"):
            setattr(s, name, {int(i): t.to(device) for i, t in saved[name].items()})
        rng = saved["rng"]
        s.rng.set_state(("MT19937", rng["keys"].numpy().astype(np.uint32), rng["pos"], rng["has_gauss"],
                         rng["cached_gaussian"]))
        s.total_numel_before_compression, s.total_numel_after_compression, s.next_stats_report = saved["stats"]

    def start_at(self, step: int) -> None:
        """A fresh state (in place: DDP holds it) that counts from the run's ``step``, so that the warm-up ends at
        the same global step."""
        s = self.state
        s.error_dict, s.p_memory_dict, s.q_memory_dict = {}, {}, {}
        s.rng = np.random.RandomState(self.seed)
        s.iter = step


def hook_of(ddp: nn.Module | None) -> CommHook | None:
    """The CommHook registered on a DDP wrapper (None without DDP)."""
    return _ATTACHED.get(ddp) if ddp is not None else None


# --------------------------------------------------------------------------------------------- checkpoints
def gather_state(ddp: nn.Module | None, env, control) -> dict | None:
    """Every rank's hook state on rank 0, for the checkpoint's ``PAYLOAD_KEY`` (None elsewhere, and for a hook
    without state). A collective over the gloo ``control`` group when the hook has state: call on every rank."""
    hook = hook_of(ddp)
    if hook is None or hook.state is None:
        return None
    mine = hook.state_dict()
    ranks = [None] * env.world_size if env.is_main else None
    dist.gather_object(mine, ranks, dst=0, group=control)
    if not env.is_main:
        return None
    return {"name": hook.name, "matrix_rank": hook.matrix_rank, "world_size": env.world_size, "ranks": ranks}


def _unusable(saved, hook: CommHook, world_size: int, ddp: nn.Module) -> str | None:
    """Why a checkpoint's hook state cannot continue this run exactly, or None."""
    if not isinstance(saved, dict) or saved.get("name") != hook.name:
        return "the checkpoint holds no PowerSGD state"
    if int(saved["world_size"]) != world_size:
        return f"PowerSGD's state (each rank's error feedback) was written by {saved['world_size']} processes"
    if int(saved["matrix_rank"]) != hook.matrix_rank:
        return f"PowerSGD's state was written with dist.powersgd_rank={saved['matrix_rank']}"
    sizes = bucket_sizes(ddp)
    errors = saved["ranks"][0]["error_dict"]
    if any(i >= len(sizes) or t.numel() != sizes[i] for i, t in errors.items()):
        return "the checkpoint's gradient buckets differ from this run's (dist.bucket_cap_mb changed?)"
    return None


def restore_state(ddp: nn.Module | None, payload: dict, env, note) -> None:
    """This rank's own hook state from the checkpoint; where it cannot continue exactly (another world size, no
    saved state, another rank or bucket layout) a fresh state counting from the checkpoint's step and one note."""
    hook = hook_of(ddp)
    if hook is None or hook.state is None:
        return
    saved, step = payload.get(PAYLOAD_KEY), int(payload["step"])
    why = _unusable(saved, hook, env.world_size, ddp)
    if why is None:
        hook.load_state_dict(saved["ranks"][env.rank], env.device)
        return
    hook.start_at(step)
    note(f"note: {why}: PowerSGD starts afresh at step {step} (no error feedback yet, new random projections); "
         f"the run continues, but not bitwise as an uninterrupted one would")


def bucket_sizes(ddp: nn.Module) -> list[int]:
    """The elements of each of the DDP wrapper's gradient buckets, in bucket-index order."""
    return [b.buffer().numel() for b in ddp.reducer._get_zeros_like_grad_buckets()]


# --------------------------------------------------------------------------------------------- bytes
@contextlib.contextmanager
def counting_all_reduce():
    """Within: every tensor handed to ``torch.distributed.all_reduce`` (by any hook, from any thread), counted in
    bytes into the yielded list. For measurements only (``measure_bytes``), never while training."""
    counted: list[int] = []
    real = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        counted.append(tensor.numel() * tensor.element_size())
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        yield counted
    finally:
        dist.all_reduce = real


@contextlib.contextmanager
def _some_group(env, store_dir: str):
    """The run's process group, or (single process) a temporary 1-process gloo group: DDP needs one."""
    if env.distributed:
        yield env
        return
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=0, world_size=1)
    try:
        yield SimpleNamespace(distributed=True, device=env.device, rank=0, world_size=1, is_main=True)
    finally:
        dist.destroy_process_group()


def measure_bytes(bare: nn.Module, cfg: Config, env, image_size: int, store_dir: str, steps: int = 3) -> dict:
    """Bytes each rank hands to the all-reduce per step, for every hook, counted in real DDP steps of a copy of
    ``bare`` (the config's DDP options and buckets; PowerSGD with a 2-step warm-up, so step 0 is its plain
    all-reduce and step 2 compressed). Under a launcher it uses the run's process group (every rank calls it),
    alone a temporary 1-process gloo group. ``{hook: {"buckets", "bytes": [per step], "collectives": [...]}}``."""
    from ddp_resnet import config as config_mod

    results = {}
    with _some_group(env, store_dir) as group_env:
        for name in HOOKS:
            hook_cfg = config_mod.replace(cfg, dist={"comm_hook": name, "powersgd_warmup_steps": 2})
            results[name] = _step_bytes(copy.deepcopy(bare), hook_cfg, group_env, image_size, steps)
    return results


def _step_bytes(model: nn.Module, cfg: Config, env, image_size: int, steps: int) -> dict:
    """``steps`` forward/backward passes of ``model`` under a new DDP wrapper with ``cfg``'s hook, counted."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from ddp_resnet import build

    ddp = build.wrap_ddp(model, cfg, env, image_size)
    if cfg.dist.comm_hook == "none":  # DDP's built-in all-reduce, as the Python hook that does the same
        ddp.register_comm_hook(None, default_hooks.allreduce_hook)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    counts = []
    for _ in range(steps):
        images = torch.randn(2, 3, image_size, image_size, generator=generator).to(env.device)
        with counting_all_reduce() as counted:
            ddp(images).float().mean().backward()
        counts.append(counted)
        model.zero_grad(set_to_none=True)
    return {"buckets": len(bucket_sizes(ddp)), "bytes": [sum(c) for c in counts],
            "collectives": [len(c) for c in counts]}
