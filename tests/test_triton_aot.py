"""The Triton kernels compile for real GPUs (sm_80, sm_90) on any machine, and the PTX shows
what the design promises: 16-byte vector loads of channel-contiguous tiles and vector stores,
no spills to local memory. Runs Triton's compiler and ptxas (no GPU) in a subprocess, because
the interpreter that the other CPU tests use must be off for it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _triton_aot import CONFIGS  # noqa: E402


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(HERE / "_triton_aot.py")], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_forward_autotune_configs_compile(compiled):
    tuned = {k: v for k, v in compiled.items() if k.startswith("autotune-")}
    from saep_kernels.triton_kernels.fused_aggregate_fwd import FWD_AUTOTUNE_CONFIGS

    assert len(tuned) == len(FWD_AUTOTUNE_CONFIGS)
    for name, stats in tuned.items():
        assert "error" not in stats, (name, stats.get("error"))
        assert stats["ld_global_v4"] > 0, name


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kernel_compiles_with_vector_loads_and_no_spills(compiled, name):
    stats = compiled[name]
    assert "error" not in stats, stats.get("error")
    assert stats["local"] == 0, "registers spilled to local memory"
    # the (k+1)^2 input tiles of a window are each read with 16-byte vector loads
    assert stats["ld_global_v4"] >= (3 + 1) ** 2, stats
    if "fwd" in name:
        assert stats["st_global_v"] > 0, stats
