"""SLURM through submitit: ``sweep`` (the one sweep parser), ``submit`` (the submitting side, ``python -m
ddp_resnet.slurm``) and ``job`` (what runs on the compute nodes, and the one requeue policy)."""
