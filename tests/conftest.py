"""Shared test set-up.

Without a GPU, Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET must be set
before triton (and so saep_kernels) is imported, hence here. With a GPU they run for real on
CUDA tensors and the interpreter stays off.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from saep_kernels import available_backends  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def fused_targets():
    """(backend, device) pairs of the fused backends that run on this machine."""
    targets = []
    for device in ["cpu"] + (["cuda"] if HAS_CUDA else []):
        for name in available_backends(device):
            if name != "reference":
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
