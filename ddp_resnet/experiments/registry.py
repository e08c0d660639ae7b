"""The experiments: each a recipe in ``configs/experiments/``, the keys it sweeps, and the analysis of its runs."""
from __future__ import annotations

from dataclasses import dataclass

# --smoke: synthetic 16 px data, 2 steps per epoch, 4 steps, no epoch checkpoint files.
SMOKE = (
    "data.dataset=synthetic", "data.synthetic_train_size=64", "data.synthetic_test_size=32",
    "data.synthetic_image_size=16", "data.batch_size=32", "data.eval_batch_size=32", "data.workers=0",
    "train.max_steps=4", "optim.milestones_unit=step", "optim.milestones=[2,3]", "train.log_every=1000",
    "ckpt.keep=0", "dist.timeout_s=120",
)
# He et al. 2015, Table 6: CIFAR-10 test error (%) of the CIFAR ResNets (110: best of 5 runs; mean 6.61).
PAPER_CIFAR10_ERROR = {"resnet20": 8.75, "resnet32": 7.51, "resnet44": 7.17, "resnet56": 6.97, "resnet110": 6.43,
                       "resnet1202": 7.93}
# The seeds' advanced tips, one run each on top of the ResNet-18 CIFAR recipe (crop + flip, cosine, 200 epochs);
# the baseline is trained with three seeds, whose ensemble (averaged probabilities) is the "ensembles" tip.
AUGMENT_TIPS = (
    ("baseline", ()),
    ("cutout", ("data.cutout=16",)),
    ("random_erasing", ("data.random_erasing=0.5",)),
    ("color_jitter", ("data.color_jitter=0.4",)),
    ("rotate_scale", ("data.rotate_degrees=15", "data.scale_jitter=0.1")),
    ("mixup", ("data.mixup_alpha=1.0",)),
    ("cutmix", ("data.cutmix_alpha=1.0",)),
    ("autoaugment", ("data.auto_augment=autoaugment", "data.autoaugment_policy=cifar10")),
    ("trivialaugment", ("data.auto_augment=trivialaugment",)),
    ("head_dropout", ("model.head_dropout=0.3",)),
    ("label_smoothing", ("train.label_smoothing=0.1",)),
    ("warmup", ("optim.warmup_epochs=5",)),
    ("cyclic_lr", ("optim.schedule=cyclic", "optim.cycle_period=40")),
    ("baseline_seed1", ("train.seed=1",)),
    ("baseline_seed2", ("train.seed=2",)),
)
ENSEMBLE_OF = ("baseline", "baseline_seed1", "baseline_seed2")


@dataclass(frozen=True)
class Experiment:
    """One experiment: a recipe, the swept keys, and what is drawn from the runs."""

    name: str
    recipe: str  # file name under configs/experiments/
    sweep: tuple  # ((key, (value, ...)), ...): the runs are the product, in order
    analysis: str  # degradation | gradient_flow | wd_ablation | depth_table | augment_ablation
    description: str
    trains: bool = True  # gradient_flow computes at initialisation without training
    points: tuple = ()  # ((label, (override, ...)), ...): the runs instead of a product sweep


EXPERIMENTS = {
    e.name: e for e in (
        Experiment("degradation", "degradation.yaml",
                   (("model.name", ("plain20", "plain56", "resnet20", "resnet56")),), "degradation",
                   "plain vs residual nets of 20 and 56 layers, paper recipe: training/test error curves "
                   "(He et al. Fig. 6)"),
        Experiment("gradient_flow", "gradient_flow.yaml", (("model.name", ("plain56", "resnet56")),),
                   "gradient_flow", "per-block gradient norms of plain56 vs resnet56 at initialisation, one batch",
                   trains=False),
        Experiment("wd_ablation", "wd_ablation.yaml", (("optim.weight_decay", ("5e-4", "1e-4")),), "wd_ablation",
                   "weight decay 5e-4 vs 1e-4 on the seeds' CIFAR-10 ResNet-18 recipe"),
        Experiment("depth_sweep", "depth_sweep.yaml",
                   (("model.name", ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")),), "depth_table",
                   "CIFAR ResNets 20/32/44/56/110, paper recipe: test error vs depth table"),
        Experiment("augment_ablation", "augment_ablation.yaml", (), "augment_ablation",
                   "the seeds' tips one at a time on the CIFAR-10 ResNet-18 recipe (cutout, random erasing, colour "
                   "jitter, rotation/scaling, mixup, cutmix, AutoAugment, TrivialAugment, head dropout, label "
                   "smoothing, warm-up, cyclic lr) and an ensemble of three baseline seeds", points=AUGMENT_TIPS),
    )
}


