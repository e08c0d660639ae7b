"""``python -m ddp_resnet.search``."""
from ddp_resnet.search.cli import cli

if __name__ == "__main__":
    cli()
