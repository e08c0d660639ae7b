"""Configuration: documented dataclasses, YAML recipes, dotted command-line overrides, validation.

Every key is documented once, next to its default; keys with a fixed set of values declare it once, as a
``Literal`` type, from which validation and the tools' argparse ``choices`` (``choices(key)``) derive.
``resolve(path, overrides, base)`` (``load`` without a base) returns a validated, frozen ``Config``;
anything wrong raises ``ConfigError`` with a one-line message that names the key and, where there is a fixed set,
the valid choices. Validation runs before any process group or device work.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ddp_resnet.pipelines import PIPELINES, resolve_augment


class ConfigError(ValueError):
    """A configuration problem, described in one line (every rank meets the same one: rank 0 prints it)."""


class RankError(ConfigError):
    """A problem of one rank's own environment (its GPU, say): printed by the rank that meets it."""


class _Loader(yaml.SafeLoader):
    """YAML without 1.1's base-60 numbers: ``profile_steps: 2:5`` stays the text "2:5", not the integer 125."""


_NUMBERS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _NUMBERS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _tag, _pattern in (  # PyYAML's own patterns, less their base-60 alternatives
        ("int", r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
        ("float", r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9_]+(?:[eE][-+][0-9]+)?"
                  r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")):
    _Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(_pattern), list("-+0123456789."))


def yaml_load(text: str):
    """Parse YAML as configs are parsed (safe, without base-60 numbers)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


WorkerCount = typing.Union[int, Literal["auto"]]  # a number, or a word chosen for the machine
MAX_TIMEOUT_S = 365 * 24 * 3600
MAX_INT = 2**53  # integers above this (or non-finite numbers) are refused: no key means such a value
# Keys holding paths: ``~`` is expanded when the config is resolved (``os.path.expanduser``, as the SLURM side does).
PATH_KEYS = ("output_dir", "data.root", "ckpt.resume", "finetune.checkpoint")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet18"  # any name from ddp_resnet.models.list_models()
    stem: Literal["auto", "cifar", "imagenet"] = "auto"  # auto: cifar for inputs up to 64 px, imagenet otherwise
    zero_init_residual: bool = False  # last BN gamma of each residual block starts at 0
    blurpool: bool = False  # anti-aliased downsampling (Zhang 2019, as FFCV applies it): a fixed 3x3 binomial blur
    #   before every strided convolution with >= 16 input channels; no parameters, state_dict keys unchanged
    head_dropout: float = 0.0  # dropout probability before the classifier fc (state_dict keys unchanged); 0 = off


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["cifar10", "cifar100", "imagefolder", "synthetic"] = "synthetic"
    root: str = "data"  # cifar: dir holding cifar-10-batches-py/; imagefolder: dir holding train/ and val/ or test/
    download: bool = False  # cifar only: download (checksummed) when the files are missing
    batch_size: int = 128  # GLOBAL batch per optimizer step, split evenly over ranks (and accumulation steps)
    eval_batch_size: int = 0  # global eval batch; 0 = 2 x batch_size
    loader: Literal["auto", "dataloader", "gpu"] = "auto"  # auto: gpu (device-resident uint8 data) for cifar/synthetic
    #   on CUDA, else dataloader (worker processes)
    workers: WorkerCount = "auto"  # DataLoader worker processes per rank; auto: the node's cores shared by its
    #   ranks, less one for the rank itself, at most 16 (0, loading in the main process, on a core or less per rank)
    decode: Literal["workers", "device"] = "workers"  # imagefolder: workers (PIL decodes in DataLoader workers) or
    #   device (workers read the files; JPEGs are decoded in batches on the training device, nvJPEG on CUDA)
    max_rank_batch: int = 0  # at most this many images per rank per micro-step: where the global batch over the ranks
    #   is larger (an elastic job that lost nodes), the step accumulates more micro-steps; 0 = no bound
    max_bad_images: int = 100  # unreadable or undecodable training samples tolerated per epoch, all ranks together
    #   (each named once and replaced by the next readable one, the same on every rank and after a resume); past it
    #   the run writes a checkpoint of the last good step and stops (exit 76)
    pin_memory: bool = True  # pinned host memory for DataLoader batches (CUDA only)
    persistent_workers: bool = True  # keep DataLoader workers alive between epochs
    prefetch_factor: int = 2  # batches prefetched per DataLoader worker
    image_size: int = 0  # training crop size; 0 = dataset default (32 for cifar, 224 for imagefolder)
    eval_resize: int = 0  # imagefolder eval: resize shorter side to this, then center-crop; 0 = image_size*8/7
    augment: Literal["auto", "none", "flip", "crop_flip", "rrc_flip"] = "auto"  # auto: crop_flip for in-memory data
    #   (cifar, synthetic), rrc_flip (random resized crop + flip) for imagefolder
    crop_padding: int = 4  # crop_flip: pixels of zero padding before the random crop
    auto_augment: Literal["none", "trivialaugment", "randaugment", "autoaugment"] = "none"  # torchvision v2 policy
    #   after crop/flip, in the DataLoader workers (TrivialAugmentWide, RandAugment, AutoAugment; bilinear)
    randaugment_ops: int = 2  # randaugment: operations per image (num_ops)
    randaugment_magnitude: int = 9  # randaugment: magnitude, 0..30
    autoaugment_policy: Literal["imagenet", "cifar10", "svhn"] = "imagenet"  # autoaugment: which learned policy
    random_erasing: float = 0.0  # probability of torchvision's RandomErasing (mean-colour fill), the last step; 0 = off
    cutout: int = 0  # side in px of a mean-coloured square at a uniform centre (DeVries & Taylor 2017: 16); 0 = off
    color_jitter: float = 0.0  # brightness, contrast, saturation factors uniform in [1-s, 1+s], in that order; 0 = off
    rotate_degrees: float = 0.0  # random rotation uniform in [-d, d] degrees (DataLoader path); 0 = off
    scale_jitter: float = 0.0  # random zoom uniform in [1-s, 1+s] about the centre, with the rotation; 0 = off
    repeated_aug: int = 1  # repeated augmentation: each drawn image k times per epoch, on different ranks, each with
    #   its own augmentation; the epoch keeps its length (N/k images per epoch, all N over k epochs); 1 = off
    res_start: int = 0  # progressive resizing: training side until the ramp; 0 = off (image_size throughout)
    res_end: int = 0  # progressive resizing: training side after the ramp
    res_ramp_start: float = 0.75  # the ramp starts once this fraction of the run's epochs is done (FFCV: 0.75)
    res_ramp_end: float = 0.875  # the ramp ends once this fraction is done (FFCV: 0.875)
    res_step: int = 32  # sizes on the ramp are rounded (half to even) to multiples of this
    eval_size: int = 0  # evaluation side (imagefolder: the center crop); 0 = image_size
    mixup_alpha: float = 0.0  # > 0 enables mixup with Beta(alpha, alpha)
    cutmix_alpha: float = 0.0  # > 0 enables cutmix; with mixup too, one of the two is picked per batch
    synthetic_train_size: int = 2048  # synthetic: number of training images
    synthetic_test_size: int = 512  # synthetic: number of test images
    synthetic_classes: int = 10  # synthetic: number of classes
    synthetic_image_size: int = 32  # synthetic: image side in pixels


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "adamw", "lars", "lamb"] = "sgd"  # lars: SGD momentum with a layer-wise trust ratio (You et
    #   al. 2017, MLPerf's ResNet-50); lamb: AdamW with a layer-wise trust ratio (You et al. 2019, timm's RSB recipes)
    lr: float = 0.1  # peak learning rate (for the global batch, before the optional linear scaling)
    momentum: float = 0.9  # sgd momentum
    nesterov: bool = False  # sgd Nesterov momentum
    betas: tuple = (0.9, 0.999)  # adamw, lamb betas
    eps: float = 0.0  # adamw, lamb epsilon; 0 = the optimizer's default (adamw 1e-8, lamb 1e-6)
    trust_coefficient: float = 0.001  # lars: eta in the layer's rate eta * |w| / (|g| + weight_decay * |w|)
    weight_decay: float = 5e-4  # L2 / decoupled weight decay
    no_wd_bn_bias: bool = False  # exclude BatchNorm parameters and biases from weight decay (and, with lars or
    #   lamb, from the trust ratio, as MLPerf and RSB do)
    lr_scale_ref_batch: int = 0  # linear scaling rule: lr *= batch_size / this; 0 = off
    schedule: Literal["cosine", "multistep", "onecycle", "constant", "linear", "cyclic", "poly"] = "cosine"  # stepped
    #   per iteration; linear: from the peak straight down to min_lr at the end; cyclic: triangles min_lr -> peak ->
    #   min_lr; poly: min_lr + (peak - min_lr) * (1 - progress) ** poly_power after the warmup (MLPerf)
    poly_power: float = 2.0  # poly: the decay's power (MLPerf ResNet-50: 2)
    warmup_epochs: float = 0.0  # linear warmup length in epochs (fractions allowed)
    warmup_start_factor: float = 0.1  # warmup starts at lr * this
    milestones: tuple = ()  # multistep: decay points, in units of `milestones_unit`
    milestones_unit: Literal["epoch", "step"] = "epoch"
    gamma: float = 0.1  # multistep: factor applied at each milestone
    min_lr: float = 0.0  # cosine, linear, poly: final learning rate; cyclic: the bottom of each triangle
    cycle_period: float = 10.0  # cyclic: length of one triangle, in units of `cycle_unit`
    cycle_unit: Literal["epoch", "step"] = "epoch"  # cyclic: what cycle_period counts
    clip_grad_norm: float = 0.0  # > 0 clips the global gradient norm (after unscaling)
    accum_steps: int = 1  # gradient accumulation micro-steps per optimizer step
    ema_decay: float = 0.0  # > 0 keeps an exponential moving average of the weights (evaluated too)
    fused: Literal["auto", "true", "false"] = "auto"  # fused optimizer kernels (auto: on CUDA), else foreach


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10  # training length in epochs (ignored when max_steps > 0)
    max_steps: int = 0  # training length in optimizer steps; 0 = epochs x steps per epoch
    run_steps: int = 0  # this invocation trains at most N more steps, then checkpoints and exits 0
    seed: int = 0  # seeds weights, data order and augmentation
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["none", "bf16", "fp16"] = "none"  # fp16 uses a GradScaler
    channels_last: bool = False  # NHWC memory format for model and inputs
    compile: bool = False  # torch.compile the model
    compile_backend: str = "inductor"  # torch.compile's backend: inductor (generated kernels), or e.g. aot_eager
    #   (graph capture and AOTAutograd without code generation: compiles in seconds, e.g. to test on a small CPU)
    sync_bn: bool = False  # synchronize BatchNorm statistics across ranks
    label_smoothing: float = 0.0  # label smoothing (of the cross-entropy, or of bce's targets)
    loss: Literal["ce", "bce"] = "ce"  # ce: softmax cross-entropy; bce: a sigmoid binary cross-entropy per class on
    #   one-hot (or mixup/cutmix-mixed) targets, as "ResNet strikes back" trains
    bce_target_thresh: float = 0.0  # bce: mixed targets above this become 1, the rest 0 (RSB: 0.2); 0 = off
    eval_every: int = 1  # evaluate every N epochs (and always after the last)
    log_every: int = 50  # every N steps: a progress line, a steps.jsonl record and TensorBoard points (one host read)
    profile_steps: str = ""  # START:END writes a torch.profiler trace of global steps START..END-1 into profile/
    profile_ranks: Literal["0", "all"] = "0"  # which ranks write a profile trace
    nonfinite: Literal["stop", "skip"] = "stop"  # a non-finite loss (or gradient norm with clipping): stop every rank
    #   without writing a checkpoint (exit 65), or skip that step's update on every rank (one host read per step)
    max_skipped_steps: int = 10  # nonfinite=skip: stop (exit 65) once more steps than this were skipped
    deterministic: bool = False  # deterministic algorithms (slower on GPU)
    cudnn_benchmark: bool = True  # cudnn autotuner (off when deterministic)
    trial: str = ""  # set by python -m ddp_resnet.search: the trial's JSON file (study journal, trial number, metric);
    #   each evaluated epoch's metric is reported to the study, and a trial it prunes stops after that epoch (exit 79)


@dataclass(frozen=True)
class CheckpointConfig:
    resume: str = "auto"  # auto (newest valid checkpoint in output_dir) | none | PATH
    every_steps: int = 0  # also write last.pt every N steps; 0 = only at epoch ends
    keep: int = 3  # periodic epoch files kept (epoch_XXXX.pt); 0 = keep none, only last.pt/best.pt
    overwrite: bool = False  # with resume=none: start over in a directory that holds a run (its files are moved
    #   aside into replaced-<time>/, not deleted)
    allow_changes: tuple[str, ...] = ()  # keys whose value may differ from the checkpoint's on resume, e.g.
    #   [optim.lr, optim.weight_decay]: the new values take effect and changes.jsonl records them


@dataclass(frozen=True)
class DistConfig:
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    timeout_s: int = 300  # collective timeout; a failed rank ends the job within this
    bucket_cap_mb: float = 0.0  # DDP gradient bucket size in MiB; 0 = DDP's default (a 1 MiB first bucket, then 25)
    static_graph: bool = False  # DDP static_graph (same parameters used every step); not with optim.accum_steps > 1
    gradient_as_bucket_view: bool = True  # gradients are views into DDP's buckets (saves a copy and memory)
    comm_hook: Literal["none", "fp16", "bf16", "powersgd"] = "none"  # DDP communication hook: gradients all-reduced
    #   as fp16 or bf16 (half the bytes), or PowerSGD's low-rank approximation with error feedback (its state is
    #   checkpointed: resume stays exact)
    powersgd_rank: int = 1  # powersgd: rank of the approximation (PyTorch's matrix_approximation_rank)
    powersgd_warmup_steps: int = 1000  # powersgd: plain all-reduce for this many steps first (start_powerSGD_iter)
    forward_sync_buffers: bool = False  # re-send rank 0's BN buffers before every forward (DDP's broadcast_buffers);
    #   not needed here: rank 0's buffers are sent to every rank before each evaluation


@dataclass(frozen=True)
class FinetuneConfig:
    checkpoint: str = ""  # local checkpoint (torchvision or ddp_resnet) to start from; the head is replaced
    freeze: Literal["none", "backbone"] = "none"  # backbone: train only the classifier head
    stage_lr: dict = field(default_factory=dict)  # per-stage learning rates, e.g. {layer4: 1e-4, fc: 1e-3}


@dataclass(frozen=True)
class Config:
    output_dir: str = "runs/default"  # the run directory: config.yaml, metrics.jsonl, tb/, checkpoints/
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


# ----------------------------------------------------------------------------------------------- conversion
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any, default: Any) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise ConfigError naming the key."""
    if typing.get_origin(tp) is typing.Union:  # e.g. WorkerCount: its words first, then the number
        words = [a for a in typing.get_args(tp) if typing.get_origin(a) is Literal]
        allowed = [w for a in words for w in typing.get_args(a)]
        if isinstance(value, str) and value in allowed:
            return value
        try:
            return _coerce(key, value, int, None)
        except ConfigError:
            raise ConfigError(f"{key}: expected an integer or one of {', '.join(allowed)}, got {value!r}") from None
    if typing.get_origin(tp) is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool):  # YAML reads a bare true/false (e.g. optim.fused=false) as a bool
            value = "true" if value else "false"
        text = _coerce(key, value, str, default)
        if text not in allowed:
            raise ConfigError(f"{key}: unknown value '{text}'; valid choices: {', '.join(allowed)}")
        return text
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp in (int, float):
        return _coerce_number(key, value, tp)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        text = "" if value is None else str(value)
        return os.path.expanduser(text) if key in PATH_KEYS else text
    if typing.get_origin(tp) is tuple:  # tuple[str, ...]: a list of that element type
        return _coerce(key, value, tuple, (typing.get_args(tp)[0](),))
    if tp is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("[]() ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        element = type(default[0]) if default else float
        return tuple(_coerce(key, v, element, None) for v in value)
    if tp is dict:
        if isinstance(value, str):
            value = yaml_load(value) if value.strip() else {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(f"{key}.{k}", v, float, None) for k, v in value.items()}
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _coerce_number(key: str, value: Any, tp: type) -> int | float:
    """An int or float key's value: finite, in range, of the right kind (a bool is not a number)."""
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not math.isfinite(number) or abs(number) > MAX_INT:
            raise ConfigError(f"{key}: expected an integer of at most {MAX_INT}, got {value!r}")
        if float(number) != int(number):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(number)
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    except OverflowError:  # an integer too large for a float
        raise ConfigError(f"{key}: expected a finite number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return number


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}'; valid keys here: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a section (mapping), got {value!r}")
            kwargs[key] = _build(tp, value, dotted + ".")
        else:
            default = next(f for f in dataclasses.fields(cls) if f.name == key)
            default_value = default.default if default.default is not dataclasses.MISSING else default.default_factory()
            kwargs[key] = _coerce(dotted, value, tp, default_value)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split a `key.sub=value` override; the value is parsed as YAML (so 0.1, true, [1, 2] work)."""
    if "=" not in text or text.startswith("="):
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (lists for tuples) of a config, suitable for YAML and checkpoints."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, dict):
            value = dict(value)
        out[f.name] = value
    return out


def from_dict(tree: dict) -> Config:
    """Build and validate a Config from a nested dict (as written to config.yaml or a checkpoint)."""
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


def _read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return tree


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def resolve(path: str | Path | None = None, overrides: list[str] | tuple = (), base: dict | None = None) -> Config:
    """The one way every tool builds its Config: ``base`` (e.g. a checkpoint's config), then the YAML recipe
    merged over it, then the dotted overrides; validated."""
    tree = copy.deepcopy(base) if base else {}
    if path:
        _merge(tree, _read_yaml(path))
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return from_dict(tree)


def load(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Read a YAML recipe (optional), apply dotted overrides, and return a validated Config."""
    return resolve(path, overrides)


def choices(key: str) -> tuple[str, ...]:
    """The valid values of a dotted key with a fixed set of choices (for argparse), e.g. choices('train.amp')."""
    cls: Any = Config
    *sections, name = key.split(".")
    for section in sections:
        cls = typing.get_type_hints(cls)[section]
    return typing.get_args(typing.get_type_hints(cls)[name])


def replace(cfg: Config, **sections: dict) -> Config:
    """Return a copy of cfg with keys of some sections replaced, e.g. replace(cfg, train={'epochs': 3})."""
    tree = to_dict(cfg)
    for section, values in sections.items():
        if isinstance(values, dict):
            tree[section].update(values)
        else:
            tree[section] = values
    return from_dict(tree)


def save_yaml(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------------------------- validation
def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Check every value that can be checked without touching data or devices; raise ConfigError."""
    from ddp_resnet.models import list_models

    if not cfg.output_dir.strip():
        raise ConfigError("output_dir: must not be empty (it would write into the current directory)")
    if cfg.model.name not in list_models():
        raise ConfigError(f"model.name: unknown model '{cfg.model.name}'; valid choices: {', '.join(list_models())}")
    d, o, t = cfg.data, cfg.optim, cfg.train
    _positive("data.batch_size", d.batch_size)
    _positive("data.eval_batch_size", d.eval_batch_size, allow_zero=True)
    if d.workers != "auto":
        _positive("data.workers", d.workers, allow_zero=True)
    _positive("data.image_size", d.image_size, allow_zero=True)
    _positive("data.crop_padding", d.crop_padding, allow_zero=True)
    _positive("data.mixup_alpha", d.mixup_alpha, allow_zero=True)
    _positive("data.cutmix_alpha", d.cutmix_alpha, allow_zero=True)
    for key in ("synthetic_train_size", "synthetic_test_size", "synthetic_classes", "synthetic_image_size"):
        _positive(f"data.{key}", getattr(d, key))
    if d.synthetic_classes < 2:
        raise ConfigError(f"data.synthetic_classes: need at least 2 classes, got {d.synthetic_classes}")
    _validate_augment(d)
    _validate_resolution(d, t)
    if not 0 <= cfg.model.head_dropout < 1:
        raise ConfigError(f"model.head_dropout: must be in [0, 1), got {cfg.model.head_dropout}")
    _validate_optim(o)
    if not 0 <= t.label_smoothing < 1:
        raise ConfigError(f"train.label_smoothing: must be in [0, 1), got {t.label_smoothing}")
    _in_range("train.bce_target_thresh", t.bce_target_thresh, 0, 1, closed=False)
    if t.bce_target_thresh and t.loss != "bce":
        raise ConfigError(f"train.bce_target_thresh: applies to train.loss=bce only, got train.loss={t.loss}")
    if t.epochs <= 0 and t.max_steps <= 0:
        raise ConfigError("train.epochs: must be > 0 (or set train.max_steps)")
    _positive("train.max_steps", t.max_steps, allow_zero=True)
    _positive("train.run_steps", t.run_steps, allow_zero=True)
    _positive("train.eval_every", t.eval_every)
    _positive("train.log_every", t.log_every)
    _positive("train.max_skipped_steps", t.max_skipped_steps, allow_zero=True)
    window = re.fullmatch(r"(\d+):(\d+)", t.profile_steps)
    if t.profile_steps and (not window or int(window[1]) >= int(window[2])):
        raise ConfigError(f"train.profile_steps: expected START:END with START < END (global steps), "
                          f"got '{t.profile_steps}'")
    _positive("ckpt.every_steps", cfg.ckpt.every_steps, allow_zero=True)
    _positive("ckpt.keep", cfg.ckpt.keep, allow_zero=True)
    _positive("dist.timeout_s", cfg.dist.timeout_s)
    if cfg.dist.timeout_s > MAX_TIMEOUT_S:
        raise ConfigError(f"dist.timeout_s: must be at most {MAX_TIMEOUT_S} (a year), got {cfg.dist.timeout_s}")
    _positive("dist.bucket_cap_mb", cfg.dist.bucket_cap_mb, allow_zero=True)
    from ddp_resnet.comm_hooks import check_config  # dist.comm_hook and powersgd_* (that module imports this one)
    check_config(cfg)
    _positive("data.max_rank_batch", cfg.data.max_rank_batch, allow_zero=True)
    if cfg.dist.static_graph and o.accum_steps > 1:  # pytorch/pytorch#143580: an internal assert, or wrong grads
        raise ConfigError("dist.static_graph: DDP's static graph breaks under no_sync, so it cannot be combined with "
                          f"optim.accum_steps={o.accum_steps}; use one or the other")
    if cfg.train.device == "cpu" and cfg.dist.backend == "nccl":
        raise ConfigError("dist.backend: nccl needs CUDA; use gloo (or auto) with train.device=cpu")
    if cfg.train.amp == "fp16" and cfg.train.device == "cpu":
        raise ConfigError("train.amp: fp16 needs CUDA; valid choices on CPU: none, bf16")
    if world_size is not None:
        validate_world(cfg, world_size)


def _validate_optim(o: OptimConfig) -> None:
    """The optimizer and schedule keys."""
    _positive("optim.cycle_period", o.cycle_period)
    _positive("optim.lr", o.lr)
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    _positive("optim.momentum", o.momentum, allow_zero=True)
    _positive("optim.accum_steps", o.accum_steps)
    _positive("optim.clip_grad_norm", o.clip_grad_norm, allow_zero=True)
    _positive("optim.warmup_epochs", o.warmup_epochs, allow_zero=True)
    if not 0 <= o.ema_decay < 1:
        raise ConfigError(f"optim.ema_decay: must be in [0, 1), got {o.ema_decay}")
    if o.schedule == "multistep" and not o.milestones:
        raise ConfigError("optim.milestones: the multistep schedule needs at least one milestone")
    if list(o.milestones) != sorted(o.milestones):
        raise ConfigError(f"optim.milestones: must be increasing, got {list(o.milestones)}")
    if len(o.betas) != 2:
        raise ConfigError(f"optim.betas: expected two numbers, got {list(o.betas)}")
    _positive("optim.eps", o.eps, allow_zero=True)
    _positive("optim.trust_coefficient", o.trust_coefficient)
    _positive("optim.poly_power", o.poly_power)
    if o.fused == "true" and o.name in ("lars", "lamb"):
        raise ConfigError(f"optim.fused: {o.name} has no fused kernel (it runs foreach ops); use optim.fused=auto")


def _in_range(key: str, value: float, low: float, high: float, closed: bool = True) -> None:
    if not (low <= value <= high if closed else low <= value < high):
        raise ConfigError(f"{key}: must be in [{low}, {high}{']' if closed else ')'}, got {value}")


def _validate_augment(d: DataConfig) -> None:
    """The augmentation keys of the data section."""
    _in_range("data.randaugment_ops", d.randaugment_ops, 0, 16)
    _in_range("data.randaugment_magnitude", d.randaugment_magnitude, 0, 30)
    _in_range("data.random_erasing", d.random_erasing, 0, 1)
    _positive("data.cutout", d.cutout, allow_zero=True)
    _in_range("data.color_jitter", d.color_jitter, 0, 1)
    _in_range("data.rotate_degrees", d.rotate_degrees, 0, 180)
    _in_range("data.scale_jitter", d.scale_jitter, 0, 1, closed=False)
    _positive("data.repeated_aug", d.repeated_aug)
    _positive("data.eval_size", d.eval_size, allow_zero=True)
    if d.decode == "device":
        refusal = PIPELINES["device_decode"].refusal(d, resolve_augment(d.dataset, d.augment))
        if refusal:
            raise ConfigError(refusal)


def _validate_resolution(d: DataConfig, t: TrainConfig) -> None:
    """Progressive resizing keys; binds the run length (epochs, max_steps) the loaders' schedules refer to."""
    _positive("data.res_step", d.res_step)
    if bool(d.res_start) != bool(d.res_end) or min(d.res_start, d.res_end) < 0:
        raise ConfigError(f"data.res_start, data.res_end: set both (> 0) for progressive resizing, or neither; "
                          f"got {d.res_start}, {d.res_end}")
    for key in ("res_start", "res_end"):
        if getattr(d, key) % d.res_step:
            raise ConfigError(f"data.{key}: must be a multiple of data.res_step={d.res_step}, got {getattr(d, key)}")
    _in_range("data.res_ramp_start", d.res_ramp_start, 0, 1)
    _in_range("data.res_ramp_end", d.res_ramp_end, d.res_ramp_start, 1)
    if d.res_start and d.dataset != "imagefolder" and d.augment != "rrc_flip":
        raise ConfigError(f"data.res_start: progressive resizing of in-memory data ({d.dataset}) needs "
                          f"data.augment=rrc_flip, got {d.augment}")


def accumulation(cfg: Config, world_size: int) -> int:
    """Micro-steps per optimizer step on ``world_size`` ranks: ``optim.accum_steps``, or with ``data.max_rank_batch``
    the smallest count at least that which splits the global batch evenly into micro-batches of at most that many
    images per rank (so a job that shrinks accumulates more, and one that grows back less); ConfigError if none."""
    batch, accum, bound = cfg.data.batch_size, cfg.optim.accum_steps, cfg.data.max_rank_batch
    if not bound:
        if batch % (world_size * accum):
            raise ConfigError(f"data.batch_size: global batch {batch} is not divisible by world size {world_size} "
                              f"x optim.accum_steps {accum}")
        return accum
    for steps in range(accum, max(batch // world_size, accum) + 1):
        if batch % (world_size * steps) == 0 and batch // (world_size * steps) <= bound:
            return steps
    raise ConfigError(f"data.max_rank_batch: global batch {batch} on world size {world_size} cannot be split into "
                      f"micro-batches of at most {bound} images per rank with optim.accum_steps >= {accum} "
                      f"(the batch must divide evenly over ranks x accumulation steps)")


def validate_world(cfg: Config, world_size: int) -> None:
    """Checks that depend on the number of processes."""
    accum = accumulation(cfg, world_size)
    if cfg.dist.static_graph and accum > 1:  # data.max_rank_batch made this world size accumulate
        raise ConfigError(f"dist.static_graph: DDP's static graph breaks under no_sync, and world size {world_size} "
                          f"accumulates {accum} micro-steps (data.max_rank_batch={cfg.data.max_rank_batch}); "
                          f"use one or the other")
    eval_batch = cfg.data.eval_batch_size or 2 * cfg.data.batch_size
    if eval_batch < world_size:
        raise ConfigError(f"data.eval_batch_size: {eval_batch} is smaller than world size {world_size}")


# ----------------------------------------------------------------------------------------------- discovery
def _field_docs(cls: type) -> dict[str, str]:
    """Each field's comment in the class's source (``name: type = default  # doc``, and ``#   more`` lines)."""
    import inspect

    docs: dict[str, str] = {}
    name = None
    for line in inspect.getsource(cls).splitlines():
        field_line = re.match(r"\s+(\w+): [^=]+=.*?(?:  # (.*))?$", line)
        more = re.match(r"\s+#\s+(.*)$", line)
        if field_line:
            name = field_line.group(1)
            docs[name] = (field_line.group(2) or "").strip()
        elif more and name:
            docs[name] = f"{docs[name]} {more.group(1).strip()}".strip()
    return docs


def keys(cls: type = Config, prefix: str = "") -> list[dict]:
    """Every key: ``{key, type, default, choices, doc}``, in declaration order (``python -m ddp_resnet.config
    --keys``)."""
    hints, docs, rows = typing.get_type_hints(cls), _field_docs(cls), []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += keys(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        args = typing.get_args(tp)
        if typing.get_origin(tp) is Literal:
            kind, options = "choice", list(args)
        elif typing.get_origin(tp) is typing.Union:
            kind = " | ".join(_type_name(a) if typing.get_origin(a) is not Literal else "/".join(typing.get_args(a))
                              for a in args)
            options = []
        else:
            kind, options = _type_name(tp), []
        rows.append({"key": f"{prefix}{f.name}", "type": kind, "default": default, "choices": options,
                     "doc": docs.get(f.name, "")})
    return rows


def format_keys(rows: list[dict]) -> str:
    """The ``--keys`` listing: one line per key (type, default, choices), its documentation below it."""
    lines = []
    for row in rows:
        choices = f"  choices: {', '.join(row['choices'])}" if row["choices"] else ""
        default = "''" if row["default"] == "" else row["default"]
        lines.append(f"{row['key']}  ({row['type']}, default {default}){choices}")
        if row["doc"]:
            lines.append(f"    {row['doc']}")
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    """``python -m ddp_resnet.config [--config X] [overrides] [--keys]``: the resolved config as YAML, or every key
    with its type, default, choices and documentation."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m ddp_resnet.config", description=cli.__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML recipe (see configs/)")
    parser.add_argument("--keys", action="store_true", help="list every key with its type, default and choices")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.2")
    args = parser.parse_args(argv)
    if args.keys:
        print(format_keys(keys()))
        return 0
    try:
        cfg = load(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())


# ----------------------------------------------------------------------------------------------- resuming
# Keys that do not change what a run computes (how it loads, logs, checkpoints, is launched, or runs equally on
# another device or loader); every other key does, and differing from the checkpoint's value refuses a resume.
RUN_KEYS = frozenset({
    "output_dir", "data.root", "data.download", "data.workers", "data.pin_memory", "data.persistent_workers",
    "data.prefetch_factor", "data.eval_batch_size", "data.loader", "data.decode", "data.max_bad_images",
    "data.max_rank_batch",
    "train.run_steps", "train.device", "train.compile", "train.compile_backend", "train.log_every",
    "train.eval_every", "train.profile_steps", "train.profile_ranks", "train.nonfinite", "train.max_skipped_steps",
    "train.deterministic", "train.cudnn_benchmark", "train.channels_last", "train.trial",
    "ckpt.resume", "ckpt.every_steps", "ckpt.keep", "ckpt.overwrite", "ckpt.allow_changes",
    "dist.backend", "dist.timeout_s", "dist.bucket_cap_mb", "dist.static_graph", "dist.gradient_as_bucket_view",
    "dist.forward_sync_buffers",
})
# Keys that shape the checkpoint's state (its tensors and optimizer groups): no switch changes them on resume.
STRUCTURE_KEYS = frozenset({"model.name", "model.stem", "model.blurpool", "data.dataset", "data.batch_size",
                            "optim.name", "optim.no_wd_bn_bias", "optim.accum_steps", "finetune.stage_lr",
                            "finetune.freeze", "data.synthetic_train_size", "data.synthetic_classes"})
LENGTH_KEYS = ("train.epochs", "train.max_steps")  # a longer run: allowed when the schedule does not depend on it
LENGTH_FREE_SCHEDULES = ("constant", "multistep", "cyclic")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and f"{prefix}{key}" not in ("finetune.stage_lr",):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: dict, cfg: Config) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, new value)`` for every key that changes what the run computes (RUN_KEYS aside)."""
    old, new = _flat(saved), _flat(to_dict(cfg))
    keys = [k for k in new if k not in RUN_KEYS and k not in ("finetune.checkpoint",)]
    return [(k, old.get(k), new[k]) for k in keys if k in old and _plain(old[k]) != _plain(new[k])]


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def check_resume(saved: dict, cfg: Config, path: str | Path) -> list[tuple[str, Any, Any]]:
    """The changes a resume of ``path`` (written with config ``saved``) into ``cfg`` makes, all allowed; raise
    ConfigError in one line listing every key that differs without ``ckpt.allow_changes`` (or cannot change)."""
    allowed = set(cfg.ckpt.allow_changes)
    unknown = sorted(k for k in allowed if k not in {r["key"] for r in keys()})
    if unknown:
        raise ConfigError(f"ckpt.allow_changes: unknown key {', '.join(unknown)}")
    changes = config_changes(saved, cfg)
    fixed = [c for c in changes if c[0] in STRUCTURE_KEYS]
    if fixed:
        raise ConfigError(f"checkpoint {path} cannot resume with {_listing(fixed)}: the checkpoint's weights or "
                          f"optimizer state do not fit; use another output_dir, or ckpt.resume=none "
                          f"ckpt.overwrite=true to start over")
    length_free = cfg.optim.schedule in LENGTH_FREE_SCHEDULES
    refused = [c for c in changes if c[0] not in allowed and not (c[0] in LENGTH_KEYS and length_free)]
    if refused:
        raise ConfigError(f"checkpoint {path} was written with another recipe: {_listing(refused)}; resume with the "
                          f"checkpoint's values, name the keys in ckpt.allow_changes=[...] to change them from here "
                          f"on, or use another output_dir")
    return changes


def _listing(changes: list) -> str:
    return ", ".join(f"{key}={new!r} (checkpoint: {old!r})" for key, old, new in changes)
