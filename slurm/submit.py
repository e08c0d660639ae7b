#!/usr/bin/env python
"""Submit training to SLURM from a checkout, without installing the package.

    python slurm/submit.py --config configs/X.yaml output_dir=runs/x --nodes 2 --gpus-per-node 8 \\
        --partition P --time 240 [...]

Same arguments as ``python -m ddp_resnet.slurm`` (see --help). The checkout is put on PYTHONPATH so the
submitted job imports the same code, whatever directory it is submitted from.
"""
import os
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, ROOT)
_paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, *_paths])

from ddp_resnet.slurm.submit import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
