"""The seeds' experiments: ``registry`` (what each one trains), ``runner`` (planning, training, SLURM submission),
``analyses`` (figures and tables), ``cli`` (``python -m ddp_resnet.experiments``)."""
from ddp_resnet.experiments.cli import main
from ddp_resnet.experiments.registry import EXPERIMENTS

__all__ = ["EXPERIMENTS", "main"]
