"""SAEPProjector trains under torch.distributed on CPU (gloo, 2 processes): DDP gradients equal
single-process gradients on the whole batch, and so do FSDP2 (fully_shard) gradients where
this torch has it."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from saep_kernels import SAEPProjector

WORLD = 2
BATCH = 4  # split evenly: each rank takes BATCH // WORLD images


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_and_data(backend: str):
    torch.manual_seed(0)
    model = SAEPProjector(vision_dim=8, num_layers=3, llm_dim=16, pool="max", backend=backend)
    layers = [torch.randn(BATCH, 1 + 5 * 5, 8) for _ in range(3)]
    return model, layers


def _loss(model, layers):
    return model(layers, num_prefix_tokens=1).square().mean()


def _reference_grads(backend: str):
    model, layers = _model_and_data(backend)
    _loss(model, layers).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _worker(rank: int, port: int, mode: str, backend: str, out_path: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model, layers = _model_and_data(backend)
        shard = [h[rank * BATCH // WORLD:(rank + 1) * BATCH // WORLD] for h in layers]
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(model)
            _loss(wrapped, shard).backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
            _loss(model, shard).backward()
            grads = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}
        if rank == 0:
            torch.save(grads, out_path)
    finally:
        dist.destroy_process_group()


def _fused_or_reference():
    import saep_kernels

    return "cpu" if "cpu" in saep_kernels.available_backends("cpu") else "reference"


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_distributed_gradients_equal_single_process(mode, tmp_path):
    if mode == "fsdp2":
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401
        except ImportError:
            pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    backend = _fused_or_reference()
    out = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(_free_port(), mode, backend, out), nprocs=WORLD, join=True)
    got = torch.load(out)
    want = _reference_grads(backend)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
