"""``python -m ddp_resnet.models NAME [--stem S] [--input PX] [--num-classes N]``: per-stage summary table."""
from .summary import main

if __name__ == "__main__":
    raise SystemExit(main())
