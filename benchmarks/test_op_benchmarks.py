"""pytest-benchmark microbenchmarks of the fused op, forward and forward+backward, for every
implementation on the present device (eager and torch.compile of the reference, each fused
backend):

    pytest benchmarks --benchmark-only                          # llava15-7b, batch 8, bf16
    pytest benchmarks --benchmark-only --benchmark-autosave     # save the run ...
    pytest benchmarks --benchmark-only --benchmark-compare      # ... and compare with it
    pytest benchmarks --benchmark-only --bench-config siglip-so400m --bench-batch 32

--bench-quick shrinks the problem to a smoke test (what CI runs, with --benchmark-disable);
the options are in benchmarks/conftest.py. On a GPU each call is synchronised so the timer
sees the kernels.
"""

import pytest
import torch

from benchmarks.op_bench import DTYPES, available_impls, make_inputs, op_function
from saep_kernels.configs import REFERENCE_CONFIGS, Config

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = Config("quick", "tiny", 6, 6, 16, 1, 2, 32)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def problem(pytestconfig):
    """(config, batch, dtype name) from the command-line options."""
    if pytestconfig.getoption("--bench-quick"):
        return QUICK, 2, "fp32"
    return (REFERENCE_CONFIGS[pytestconfig.getoption("--bench-config")],
            pytestconfig.getoption("--bench-batch"), pytestconfig.getoption("--bench-dtype"))


@pytest.fixture(scope="module")
def inputs(problem):
    cfg, batch, dtype = problem
    torch.manual_seed(0)
    layers, w, b = make_inputs(cfg, batch * cfg.crops, DTYPES[dtype], DEVICE, requires_grad=True)
    gy = torch.randn(batch * cfg.crops, cfg.out_tokens, cfg.layers * cfg.channels,
                     device=DEVICE, dtype=DTYPES[dtype])
    return layers, w, b, gy


@pytest.mark.parametrize("impl", available_impls(DEVICE))
@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
def test_fused_aggregate(benchmark, problem, inputs, impl, direction):
    cfg, batch, dtype = problem
    layers, w, b, gy = inputs
    fn = op_function(impl, cfg, "avg", DEVICE)
    benchmark.group = f"{cfg.name} B={batch} {dtype} {direction}"
    benchmark.extra_info.update(config=cfg.name, batch=batch, dtype=dtype,
                                device=str(DEVICE), threads=torch.get_num_threads())

    if direction == "fwd":
        def run():
            with torch.no_grad():
                out = fn(layers, w, b)
            _sync()
            return out
    else:
        def run():
            grads = torch.autograd.grad(fn(layers, w, b), [*layers, w, b], gy)
            _sync()
            return grads

    run()  # compile / warm up outside the measurement
    result = benchmark(run)
    assert result is not None
