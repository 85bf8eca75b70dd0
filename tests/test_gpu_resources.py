"""The GPU kernels, compiled offline for sm_90 (no GPU needed), spill no register, keep the
forward within half an SM's warps, and move channels 16 bytes at a time
(scripts/gpu_resources.py: the covering set here, every variant with `make gpu-resources`).

The compile runs in a subprocess: the Triton interpreter the other CPU tests use must be off.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_resources  # noqa: E402

BACKENDS = ["triton"] + (["cuda"] if shutil.which("nvcc") else [])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_resources.py"),
                           "--json", str(out), "--backends", *BACKENDS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc


def test_every_kernel_passes(report):
    data, proc = report
    assert not data["failed"], "\n".join(data["failed"])
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_the_covering_set_is_complete(report):
    data, _ = report
    seen = {(r["backend"], r["kernel"], r["pool"], r["ksize"], r["dtype"]) for r in data["rows"]}
    for pool in ("avg", "max"):
        for k in (1, 3, 5, 7):
            for dtype in ("bf16", "fp32"):
                for kernel in ("fwd", "bwd_input", "bwd_weight"):
                    assert ("triton", kernel, pool, k, dtype) in seen
                    if "cuda" in BACKENDS:
                        assert ("cuda", kernel, "any", k, dtype) in seen
    packed = {(r["kernel"], r["pool"], r["ksize"], r["dtype"]) for r in data["rows"]
              if r["varlen"]}
    for pool in ("avg", "max"):
        for dtype in ("bf16", "fp32"):
            for kernel in ("fwd", "bwd_input", "bwd_weight"):
                assert (kernel, pool, 7, dtype) in packed


def _row(**changes):
    variant = gpu_resources.Variant("triton", "fwd", "avg", 3, "bf16", 90, "16x64x4")
    res = gpu_resources.Resources(registers=56, threads=128, occupancy=0.56, ld128=4, st128=1)
    for name, value in changes.items():
        setattr(res, name, value)
    return variant, res


@pytest.mark.parametrize("changes,pattern", [
    (dict(stack=8, local_ops=2), "spills"),
    (dict(spill_bytes=16), "spills"),
    (dict(registers=80, occupancy=0.38), "occupancy 38%"),
    (dict(ld128=0), "no 16-byte global loads"),
    (dict(st128=0), "no 16-byte global stores"),
    (dict(error="ptxas failed"), "ptxas failed"),
])
def test_checks_fail_on_each_defect(changes, pattern):
    assert gpu_resources.checks([_row()]) == []
    failed = gpu_resources.checks([_row(**changes)])
    assert len(failed) == 1 and pattern in failed[0], failed


def test_occupancy_arithmetic():
    # 64 registers x 128 threads: 8 blocks of 4 warps = 32 of 64 warps
    assert gpu_resources.occupancy(64, 128, 0, 90) == 0.5
    assert gpu_resources.occupancy(65, 128, 0, 90) < 0.5
    assert gpu_resources.occupancy(32, 128, 0, 90) == 1.0
    # shared memory bound: 100 KiB blocks, two fit in 228 KiB
    assert gpu_resources.occupancy(32, 128, 100 * 1024, 90) == 2 * 4 / 64
