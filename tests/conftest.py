"""Shared test set-up.

Without a GPU, Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET must be set
before triton (and so saep_kernels) is imported, hence here. With a GPU they run for real on
CUDA tensors and the interpreter stays off.

The fused backends under test are the ones this machine should have (``expected_backends``:
the compiled ones wherever a compiler was there to build them), not merely the ones that
loaded: a backend that should have been built and was not fails its tests, and
test_backends.py says which one and why, instead of its cases silently disappearing.
"""

import importlib.util
import os
import shutil

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from saep_kernels import available_backends  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def _has_cxx() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is not None


def _has_nvcc() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def expected_backends(device: str):
    """The fused backends that should run on ``device`` here: ``cpu`` wherever a C++ compiler
    is (setup.py builds the extension with it), ``cuda`` where nvcc and a GPU are, ``triton``
    wherever triton is installed (on CPU tensors through its interpreter)."""
    expected = []
    if importlib.util.find_spec("triton") is not None:
        expected.append("triton")
    if device == "cpu" and _has_cxx():
        expected.append("cpu")
    if device == "cuda" and _has_nvcc():
        expected.append("cuda")
    return expected


def fused_targets():
    """(backend, device) pairs of the fused backends under test: those expected here, and any
    other that runs."""
    targets = []
    for device in DEVICES:
        names = set(expected_backends(device)) | set(available_backends(device))
        for name in ("triton", "cpu", "cuda"):
            if name in names:
                targets.append((name, device))
    return targets


def target_params(compiled_only=False):
    """pytest params of the fused targets; compiled_only keeps the C++/CUDA backends alone
    (for the large parametrisations: the Triton interpreter is slow, and real Triton would
    compile a kernel variant for nearly every case)."""
    params = []
    for name, device in fused_targets():
        if compiled_only and name == "triton":
            continue
        marks = [pytest.mark.gpu] if device == "cuda" else []
        params.append(pytest.param((name, device), id=f"{name}-{device}", marks=marks))
    return params


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
