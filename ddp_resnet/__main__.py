"""`python -m ddp_resnet` is `python -m ddp_resnet.train`."""
from ddp_resnet.train import cli

cli()
