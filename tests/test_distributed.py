"""SAEPProjector trains under torch.distributed on CPU (gloo, 2 processes): DDP gradients equal
single-process gradients on the whole batch, and so do FSDP2 (fully_shard) gradients where
this torch has it.

The workers are bounded in time: the process group has a short timeout, the parent waits for
the workers up to a deadline and then ends them, and a worker that hangs prints its Python
stacks first (faulthandler). The rendezvous uses a file store in the test's own directory (no
port to race for) and gloo is pinned to the loopback interface. Only a failure before both
ranks have joined the group (the transport's set-up, not the code under test) is retried.

The workers leave with ``os._exit`` once both ranks have passed a final barrier, without tearing
the process group down: torch's gloo group can deadlock in its destructor (it joins its work
thread holding the GIL while that thread frees a finished work item whose saved thread state
needs the GIL), in about one run in ten on this kind of machine, whichever backend computes the
op; FSDP2 runs also ended in ``terminate called without an active exception`` there.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from saep_kernels import SAEPProjector

WORLD = 2
BATCH = 4  # split evenly: each rank takes BATCH // WORLD images
GROUP_TIMEOUT_S = 60  # any collective (set-up included) that waits longer raises
WORKERS_DEADLINE_S = 180  # normally ~10 s: two spawned interpreters, one tiny step
SETUP_ATTEMPTS = 3


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


def _worker(rank: int, run_dir: str, mode: str, backend: str):
    faulthandler.dump_traceback_later(WORKERS_DEADLINE_S - 20, exit=False)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # no hostname look-up
    store = dist.FileStore(os.path.join(run_dir, "store"), WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    Path(run_dir, f"joined{rank}").touch()
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
            torch.save(grads, os.path.join(run_dir, "grads.pt"))
        dist.barrier()  # no rank leaves while the other still needs it
        status = 0
    except BaseException:
        traceback.print_exc()
        status = 1
    faulthandler.cancel_dump_traceback_later()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # no process-group teardown (see the module docstring)


def _join(context, deadline: float) -> None:
    """Wait for the workers; past the deadline end them and raise (never hang the suite)."""
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in context.processes:
                if proc.is_alive():
                    proc.terminate()
                    proc.join(5)
                    if proc.is_alive():
                        proc.kill()
            raise TimeoutError(f"the {WORLD} workers did not finish within {WORKERS_DEADLINE_S} s "
                               "(their stacks are printed above)")


def _run_workers(mode: str, backend: str, tmp_path: Path) -> Path:
    """Run the workers; return the file rank 0 saved its gradients to."""
    for attempt in range(1, SETUP_ATTEMPTS + 1):
        run_dir = tmp_path / f"attempt{attempt}"
        run_dir.mkdir()
        context = mp.start_processes(_worker, args=(str(run_dir), mode, backend), nprocs=WORLD,
                                     join=False, start_method="spawn")
        try:
            _join(context, time.monotonic() + WORKERS_DEADLINE_S)
            return run_dir / "grads.pt"
        except (TimeoutError, mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            joined = all((run_dir / f"joined{r}").exists() for r in range(WORLD))
            if joined or attempt == SETUP_ATTEMPTS:
                raise
            warnings.warn(f"gloo process group set-up failed (attempt {attempt} of "
                          f"{SETUP_ATTEMPTS}), retrying: {exc}")
    raise AssertionError("unreachable")


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
    got = torch.load(_run_workers(mode, backend, tmp_path))
    want = _reference_grads(backend)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
