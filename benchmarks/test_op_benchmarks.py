"""pytest-benchmark microbenchmarks of the fused op, forward and forward+backward, for every
implementation on the present device (eager and torch.compile of the reference, each fused
backend):

    pytest benchmarks --benchmark-only                          # llava15-7b, batch 8, bf16
    pytest benchmarks --benchmark-only --benchmark-autosave     # save the run ...
    pytest benchmarks --benchmark-only --benchmark-compare      # ... and compare with it
    SAEP_BENCH_CONFIG=siglip-so400m SAEP_BENCH_BATCH=32 pytest benchmarks --benchmark-only

SAEP_BENCH_QUICK=1 shrinks the problem to a smoke test (what CI runs, with
--benchmark-disable). On a GPU each call is synchronised so the timer sees the kernels.
"""

import os

import pytest
import torch

from benchmarks.configs import CONFIGS, Config
from benchmarks.op_bench import DTYPES, available_impls, make_inputs, op_function

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if os.environ.get("SAEP_BENCH_QUICK", "0") not in ("", "0"):
    CONFIG, BATCH, DTYPE = Config("quick", "tiny", 6, 6, 16, 1, 2, 32), 2, "fp32"
else:
    CONFIG = CONFIGS[os.environ.get("SAEP_BENCH_CONFIG", "llava15-7b")]
    BATCH = int(os.environ.get("SAEP_BENCH_BATCH", "8"))
    DTYPE = os.environ.get("SAEP_BENCH_DTYPE", "bf16")


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(0)
    layers, w, b = make_inputs(CONFIG, BATCH * CONFIG.crops, DTYPES[DTYPE], DEVICE,
                               requires_grad=True)
    gy = torch.randn(BATCH * CONFIG.crops, CONFIG.out_tokens, CONFIG.layers * CONFIG.channels,
                     device=DEVICE, dtype=DTYPES[DTYPE])
    return layers, w, b, gy


@pytest.mark.parametrize("impl", available_impls(DEVICE))
@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
def test_fused_aggregate(benchmark, inputs, impl, direction):
    layers, w, b, gy = inputs
    fn = op_function(impl, CONFIG, "avg", DEVICE)
    benchmark.group = f"{CONFIG.name} B={BATCH} {DTYPE} {direction}"
    benchmark.extra_info.update(config=CONFIG.name, batch=BATCH, dtype=DTYPE,
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
