"""Which backend runs a call of ``fused_aggregate``: the registry and the selection policy.

``reference`` (plain PyTorch, ``saep_kernels/reference.py``) runs everywhere and is not
dispatched through the registry: ``fused_aggregate`` calls it directly so that autograd and
``torch.compile`` see ordinary ops. The fused backends (``FUSED``) share one flow around their
kernels (``fused.py``); their adapters say where they run and what they compute:

* ``triton`` (``triton.py``): the Triton kernels, on CUDA tensors (and on CPU tensors under
  ``TRITON_INTERPRET=1``, for tests);
* ``cpu`` / ``cuda`` (``extension.py``): the C++ and CUDA kernels of ``saep_kernels._C``.

Selection: ``backend="auto"`` takes the first backend in ``AUTO_ORDER`` for the device type of
the inputs that can run there and ``supports`` the call; naming a backend that cannot raises
``BackendUnavailable`` saying why (not installed, not built, wrong device, unsupported call).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ..spec import AggregateSpec
from .extension import ExtensionBackend
from .fused import FusedBackend
from .triton import TritonBackend

BACKENDS = ("reference", "triton", "cpu", "cuda")

# Fastest first, per device type; the reference closes each list. Triton's CPU interpreter is
# for tests and never listed.
AUTO_ORDER: Dict[str, Tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}

FUSED: Dict[str, FusedBackend] = {
    "triton": TritonBackend(),
    "cpu": ExtensionBackend("cpu"),
    "cuda": ExtensionBackend("cuda"),
}


class BackendUnavailable(ValueError):
    """Raised when a backend is asked for explicitly but cannot run on the given inputs."""


def _check_name(backend) -> None:
    if not isinstance(backend, str) or backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")


def fused_backend(name: str) -> FusedBackend:
    """The fused backend called ``name``."""
    if name not in FUSED:
        raise ValueError(f"{name!r} is not a fused backend (one of {tuple(FUSED)})")
    return FUSED[name]


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """None when backend ``name`` can run tensors on ``device``, else a sentence saying why not."""
    _check_name(name)
    return None if name == "reference" else fused_backend(name).unavailable_reason(device)


def available_backends(device=None) -> Tuple[str, ...]:
    """Backends that can run here.

    With ``device`` (a ``torch.device`` or string): those that run tensors on that device.
    Without: those that run on the CPU or, when CUDA is available, on the GPU.
    """
    if device is None:
        devices = [torch.device("cpu")]
        if torch.cuda.is_available():
            devices.append(torch.device("cuda"))
    else:
        devices = [torch.device(device)]
    return tuple(name for name in BACKENDS
                 if any(unavailable_reason(name, d) is None for d in devices))


@torch.compiler.assume_constant_result
def _runnable(device: torch.device) -> Tuple[str, ...]:
    """``available_backends(device)``; under ``torch.compile`` it runs once at trace time and
    its answer is a constant of the graph (it imports modules, which Dynamo need not trace)."""
    return available_backends(device)


def resolve_backend(backend: str, device: torch.device,
                    spec: Optional[AggregateSpec] = None) -> str:
    """The concrete backend name for ``backend`` (possibly ``"auto"``) on ``device``, for the
    call ``spec`` (without one: for any call the backends support)."""
    _check_name(backend)
    runnable = _runnable(device)

    def reason(name):
        if name not in runnable:
            return unavailable_reason(name, device)
        return None if name == "reference" or spec is None else FUSED[name].supports(spec)

    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ()):
            if name in runnable and reason(name) is None:
                return name
        return "reference"
    why = reason(backend)
    if why is not None:
        raise BackendUnavailable(f"backend={backend!r} is unavailable: {why}")
    return backend
