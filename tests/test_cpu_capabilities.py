"""The cpu backend's correctness tests under every instruction set its kernels are compiled
for and this CPU runs (x86-64: "default", "avx2", "avx512"; the best one runs in the main
session, the others here, each in a pytest subprocess with SAEP_CPU_CAPABILITY set), and the
capability switch itself."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import saep_kernels
from conftest import expected_backends
from saep_kernels.backends.extension import CPU_CAPABILITY_ENV, CPU_CAPABILITY_NAMES

ROOT = Path(__file__).resolve().parent.parent
# the cpu backend's cases of these modules (their ids end in "cpu-cpu")
CORRECTNESS_TESTS = ["tests/test_fused.py", "tests/test_fuzz.py"]

needs_cpu_backend = pytest.mark.skipif("cpu" not in expected_backends("cpu"),
                                       reason="no C++ compiler here: no cpu backend to test")


@needs_cpu_backend
def test_baseline_is_always_compiled_and_run():
    assert "default" in saep_kernels.cpu_capabilities()
    assert saep_kernels.cpu_capability() in saep_kernels.cpu_capabilities()


@needs_cpu_backend
def test_set_cpu_capability_switches_and_rejects_unknown_names():
    before = saep_kernels.cpu_capability()
    try:
        for name in saep_kernels.cpu_capabilities():
            saep_kernels.set_cpu_capability(name)
            assert saep_kernels.cpu_capability() == name
    finally:
        saep_kernels.set_cpu_capability(before)
    with pytest.raises(ValueError, match="cpu capability must be one of"):
        saep_kernels.set_cpu_capability("sse9")
    assert saep_kernels.cpu_capability() == before


def test_capability_in_use_is_the_one_asked_for():
    """Run in the subprocesses below: SAEP_CPU_CAPABILITY took effect."""
    wanted = os.environ.get(CPU_CAPABILITY_ENV)
    if not wanted:
        pytest.skip(f"{CPU_CAPABILITY_ENV} is not set")
    assert saep_kernels.cpu_capability() == wanted


def test_unknown_capability_in_the_environment_is_an_error():
    env = dict(os.environ, **{CPU_CAPABILITY_ENV: "sse9"})
    run = subprocess.run([sys.executable, "-c", "import saep_kernels"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    if saep_kernels.cpu_capabilities():
        assert run.returncode != 0 and f"{CPU_CAPABILITY_ENV} must be one of" in run.stderr
    else:  # no extension: nothing to choose
        assert run.returncode == 0, run.stderr


@needs_cpu_backend
@pytest.mark.parametrize("capability", CPU_CAPABILITY_NAMES)
def test_cpu_backend_correct_under(capability):
    if capability not in saep_kernels.cpu_capabilities():
        pytest.skip(f"{capability!r} is not compiled here or not run by this CPU "
                    f"(available: {saep_kernels.cpu_capabilities()})")
    if capability == saep_kernels.cpu_capability():
        pytest.skip(f"{capability!r} is the one in use: the main session runs these tests")
    env = dict(os.environ, **{CPU_CAPABILITY_ENV: capability})
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           *CORRECTNESS_TESTS, __file__ + "::test_capability_in_use_is_the_one_asked_for",
           "-k", "cpu-cpu or capability_in_use"]
    run = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    tail = run.stdout[-4000:] + run.stderr[-2000:]
    assert run.returncode == 0, f"cpu tests under {capability!r} failed:\n{tail}"
    assert " passed" in run.stdout and " failed" not in run.stdout, tail


def test_capability_the_cpu_cannot_run_falls_back_with_a_warning(monkeypatch):
    from saep_kernels.backends import extension

    chosen = []
    monkeypatch.setenv(CPU_CAPABILITY_ENV, "avx512")
    monkeypatch.setattr(extension, "EXTENSION", object())  # any loaded extension
    monkeypatch.setattr(extension, "cpu_capabilities", lambda: ("default", "avx2"))
    monkeypatch.setattr(extension, "set_cpu_capability", chosen.append)
    with pytest.warns(UserWarning, match=r"SAEP_CPU_CAPABILITY='avx512'.*using 'avx2'"):
        extension._apply_capability_env()
    assert chosen == ["avx2"]
