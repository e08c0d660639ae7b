"""`python -m ddp_resnet.slurm`: submit training to SLURM (see ``ddp_resnet.slurm.submit``)."""
import sys

from ddp_resnet.slurm.submit import main

sys.exit(main())
