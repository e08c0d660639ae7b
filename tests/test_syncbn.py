"""GlooSyncBatchNorm on 2 CPU processes equals BatchNorm over the full batch, forward and backward."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ddp_resnet.syncbn import GlooSyncBatchNorm, convert_sync_batchnorm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, x: torch.Tensor, grad: torch.Tensor, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    bn = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), torch.device("cpu"))[0]
    assert isinstance(bn, GlooSyncBatchNorm)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    shard = x.chunk(world)[rank].clone().requires_grad_(True)
    out = bn(shard)
    out.backward(grad.chunk(world)[rank])
    results[rank] = (out.detach(), shard.grad, bn.weight.grad, bn.bias.grad, bn.running_mean.clone(),
                     bn.running_var.clone())
    dist.destroy_process_group()


def test_gloo_sync_batchnorm_equals_full_batch_batchnorm():
    torch.manual_seed(1)
    x = torch.randn(8, 3, 5, 5) * 3 + 1
    grad = torch.randn(8, 3, 5, 5)
    ref = nn.BatchNorm2d(3)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        ref.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    xr = x.clone().requires_grad_(True)
    out_ref = ref(xr)
    out_ref.backward(grad)

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), x, grad, results), nprocs=2, join=True)
    out = torch.cat([results[0][0], results[1][0]])
    xgrad = torch.cat([results[0][1], results[1][1]])
    torch.testing.assert_close(out, out_ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xgrad, xr.grad, atol=1e-5, rtol=1e-5)
    # parameter grads are per-rank partial sums (DDP sums/averages them): their sum is the full-batch grad
    torch.testing.assert_close(results[0][2] + results[1][2], ref.weight.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(results[0][3] + results[1][3], ref.bias.grad, atol=1e-4, rtol=1e-5)
    for rank in (0, 1):
        torch.testing.assert_close(results[rank][4], ref.running_mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(results[rank][5], ref.running_var, atol=1e-5, rtol=1e-5)


def test_conversion_keeps_weights_and_uses_plain_batchnorm_without_a_process_group():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with torch.no_grad():
        model[1].weight.fill_(2.0)
    converted = convert_sync_batchnorm(model, torch.device("cpu"))
    assert isinstance(converted[1], GlooSyncBatchNorm)
    assert torch.equal(converted[1].weight, torch.full((4,), 2.0))
    x = torch.randn(4, 3, 8, 8)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ref.load_state_dict(converted.state_dict())
    torch.testing.assert_close(converted(x), ref(x))
