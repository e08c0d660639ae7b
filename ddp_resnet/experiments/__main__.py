"""`python -m ddp_resnet.experiments`: see ``ddp_resnet.experiments.cli``."""
from ddp_resnet.experiments.cli import cli

cli()
