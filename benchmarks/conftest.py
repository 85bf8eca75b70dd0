"""Options of the pytest-benchmark file (test_op_benchmarks.py):

    pytest benchmarks --benchmark-only --bench-config siglip-so400m --bench-batch 32
    pytest benchmarks --benchmark-disable --bench-quick      # a smoke test (what CI runs)
"""

from saep_kernels.configs import REFERENCE_CONFIGS


def pytest_addoption(parser):
    group = parser.getgroup("saep-kernels benchmarks")
    group.addoption("--bench-config", default="llava15-7b", choices=list(REFERENCE_CONFIGS),
                    help="reference configuration (docs/op.md section 3)")
    group.addoption("--bench-batch", type=int, default=8, help="images per batch")
    group.addoption("--bench-dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    group.addoption("--bench-quick", action="store_true",
                    help="a tiny problem: a smoke test, not a measurement")
