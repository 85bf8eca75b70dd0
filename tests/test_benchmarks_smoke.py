"""The benchmark tools never rot: the main job's CLI and the pytest-benchmark file run end to
end on tiny shapes (one short timing each; the numbers mean nothing)."""

import csv
import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the benchmarks never time the interpreter
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_main_job_quick(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--device", "cpu",
                           "--out", str(tmp_path)], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=1000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "fused_aggregate" in out and "projectors" in out and "sweep" in out
    data = json.loads((tmp_path / "results_cpu.json").read_text())
    assert data["metadata"]["device"] and data["metadata"]["torch"]
    if platform.libc_ver()[0] == "glibc":
        assert data["metadata"]["malloc"] == {"mmap_threshold": 32 * 2**20,
                                              "trim_threshold": 2**30}
    kinds = {r["kind"] for r in data["rows"]}
    assert {"op", "projector", "sweep"} <= kinds
    with open(tmp_path / "results_cpu.csv") as f:
        header = next(csv.reader(f))
    for col in ["name", "kind", "backend", "config", "batch", "dtype", "device", "torch",
                "triton", "fwd_ms", "fwd_bwd_ms", "peak_mem_mb", "params", "out_tokens", "gbps",
                "copy_gbps", "bw_fraction"]:
        assert col in header
    # the bandwidth fractions are against the copy timed in each problem's own rounds
    timed = [r for r in data["rows"] if r["kind"] in ("op", "varlen")]
    assert {r["kind"] for r in timed} == {"op", "varlen"}
    for r in timed:
        assert r["copy_gbps"] > 0
        assert r["bw_fraction"] == pytest.approx(r["gbps"] / r["copy_gbps"], rel=1e-9)
    for kind in ("op", "varlen"):  # one copy per problem, shared by its rows
        problems = {(r["config"], r["batch"], r["dtype"]) for r in timed if r["kind"] == kind}
        copies = {(r["config"], r["batch"], r["dtype"], r["copy_gbps"]) for r in timed
                  if r["kind"] == kind}
        assert len(copies) == len(problems)
    assert data["metadata"]["process"] == "fresh per op and varlen problem"
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(pngs) >= 2, pngs
    assert all((tmp_path / p).stat().st_size > 10_000 for p in pngs)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_fixed_malloc_thresholds_take_effect():
    """fix_malloc_thresholds changes where malloc puts a large block: a fresh process maps a
    16 MiB block with mmap (the default threshold starts at 128 KiB), and after the call a
    24 MiB block comes from the heap."""
    code = textwrap.dedent("""
        import ctypes

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                "uordblks", "fordblks", "keepcost")]

        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        libc.malloc.restype = ctypes.c_void_p

        def mapped_by(nbytes):  # bytes malloc mapped for one block of nbytes (kept)
            before = libc.mallinfo2().hblkhd
            assert libc.malloc(nbytes)
            return libc.mallinfo2().hblkhd - before

        print(mapped_by(16 << 20))
        from benchmarks.harness import fix_malloc_thresholds
        assert fix_malloc_thresholds() is not None
        print(mapped_by(24 << 20))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    default_mapped, fixed_mapped = (int(x) for x in proc.stdout.split())
    assert default_mapped >= 16 << 20
    assert fixed_mapped == 0


def test_run_in_fresh_process():
    """A problem timed in a fresh process runs in another process, with this one's torch
    thread count, and its errors come back here."""
    from benchmarks.harness import run_in_fresh_process

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert run_in_fresh_process(torch.get_num_threads) == 1
    finally:
        torch.set_num_threads(threads)
    assert run_in_fresh_process(os.getpid) != os.getpid()
    assert run_in_fresh_process(divmod, 7, 2) == (3, 1)
    with pytest.raises(ValueError, match="invalid literal"):
        run_in_fresh_process(int, "seven")


def test_pytest_benchmark_file(tmp_path):
    pytest.importorskip("pytest_benchmark")
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "-q",
                           "--benchmark-disable", "--bench-quick", "-p", "no:cacheprovider"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout


@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_pytorch_baseline_computes_the_op(pool, dtype):
    """The benchmark's eager/compile baseline (plain PyTorch in the input dtype) computes the
    op: it matches the reference within the dtype's rounding (one rounding per conv, residual
    and pool step in bf16, so a few bf16 ulps)."""
    from benchmarks.op_bench import op_function
    from saep_kernels import fused_aggregate_reference
    from saep_kernels.configs import Config

    cfg = Config("tiny", "tiny", 5, 7, 16, 1, 2, 32)
    torch.manual_seed(0)
    layers = [torch.randn(2, cfg.tokens, cfg.channels, dtype=dtype) for _ in range(cfg.layers)]
    w = (torch.randn(cfg.layers * cfg.channels, 1, 3, 3) / 3).to(dtype)
    b = torch.randn(cfg.layers * cfg.channels, dtype=dtype)
    got = op_function("eager", cfg, pool, torch.device("cpu"))(layers, w, b)
    want = fused_aggregate_reference(layers, w, b, grid=(cfg.height, cfg.width),
                                     num_prefix_tokens=cfg.prefix, pool=pool)
    assert got.dtype == dtype and got.shape == want.shape
    tol = 1e-5 if dtype == torch.float32 else 4 / 128
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
