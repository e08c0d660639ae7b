"""The launch environment: torchrun, srun and plain processes read correctly; devices and backends resolved."""
from __future__ import annotations

import pytest
import torch

from ddp_resnet import distributed
from ddp_resnet.config import ConfigError


def test_plain_process_is_rank_0_of_1():
    info = distributed.read_env({})
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (0, 1, 0, "single")


def test_torchrun_variables():
    info = distributed.read_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                                 "MASTER_ADDR": "n1", "MASTER_PORT": "29500", "GROUP_RANK": "1"})
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (5, 8, 1, 4)
    assert info.launcher == "torchrun"
    assert (info.master_addr, info.master_port, info.node_id) == ("n1", 29500, 1)


def test_srun_variables_give_rank_world_and_master_from_the_node_list():
    env = {"SLURM_PROCID": "9", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_JOB_ID": "123456"}
    info = distributed.read_env(env)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size, info.launcher) == (9, 16, 1, 8, "slurm")
    assert info.master_addr == "gpu07"
    assert info.master_port == distributed.slurm_port("123456")
    assert distributed.slurm_port("123456") != distributed.slurm_port("123457")


def test_a_batch_script_shell_without_srun_is_a_single_process():
    assert distributed.read_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"}).world_size == 1


def test_torchrun_takes_precedence_over_slurm_inside_an_allocation():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}
    assert distributed.read_env(env).launcher == "torchrun"


@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
    ("a[8-10]b", ["a8b", "a9b", "a10b"]),
    ("x[001-002],y[1]", ["x001", "x002", "y1"]),
])
def test_hostlist_expansion(nodelist, hosts):
    assert distributed.expand_hostlist(nodelist) == hosts


def test_device_and_backend_resolution():
    assert distributed.resolve_device("cpu", 3) == torch.device("cpu")
    assert distributed.resolve_backend("auto", torch.device("cpu")) == "gloo"
    assert distributed.resolve_backend("auto", torch.device("cuda", 0)) == "nccl"
    if not torch.cuda.is_available():
        assert distributed.resolve_device("auto", 0) == torch.device("cpu")
        with pytest.raises(ConfigError, match="CUDA is not available"):
            distributed.resolve_device("cuda", 0)


def test_single_process_init_creates_no_process_group():
    env = distributed.init("cpu", "auto", 30, distributed.LaunchInfo())
    assert not env.distributed and env.backend == "" and env.is_main
    assert not torch.distributed.is_initialized()
    assert distributed.any_rank(True, env.device) and not distributed.any_rank(False, env.device)
