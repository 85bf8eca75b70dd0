"""Backend registry and selection for ``fused_aggregate``.

A backend is a pair of launchers with one contract (see ``triton_kernels/dwconv_pool.py``):

    forward(xs, weight, bias, H, W, prefix, residual, pool, save_argmax) -> (out, argmax)
    backward(grad_out, xs, weight, argmax, H, W, prefix, residual, pool,
             need_input_grad, need_weight_grad, need_bias_grad) -> (grad_xs, grad_w, grad_b)

``reference`` is plain PyTorch and is not dispatched through this table: ``fused_aggregate``
calls it directly so that autograd and ``torch.compile`` see ordinary ops.

Selection: ``backend="auto"`` takes the first available backend in ``AUTO_ORDER`` for the
device of the inputs; naming a backend that cannot run there raises a ``ValueError`` that
says why (not installed, not built, wrong device).
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable, Dict, Optional, Tuple

import torch

BACKENDS = ("reference", "triton", "cpu", "cuda")

# Fastest first, per device type. The reference runs everywhere and closes each list.
AUTO_ORDER: Dict[str, Tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}


class BackendUnavailable(ValueError):
    """Raised when a backend is asked for explicitly but cannot run on the given inputs."""


@functools.lru_cache(maxsize=None)
def _import_triton_kernels():
    """The Triton launchers, or the reason they cannot be imported."""
    try:
        module = importlib.import_module("saep_kernels.triton_kernels")
    except ImportError as exc:  # triton missing or broken
        return None, f"the Triton kernels could not be imported ({exc}); pip install 'triton>=3.6'"
    return module, None


@functools.lru_cache(maxsize=None)
def _import_extension():
    """The compiled extension ``saep_kernels._C`` (C++/CUDA kernels), or why it is missing."""
    try:
        module = importlib.import_module("saep_kernels._C")
    except ImportError as exc:
        return None, (f"the C++ extension saep_kernels._C is not built ({exc}); "
                      "reinstall with a C++ compiler (and nvcc for CUDA): pip install .")
    return module, None


def _triton_reason(device: torch.device) -> Optional[str]:
    module, reason = _import_triton_kernels()
    if module is None:
        return reason
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu" and module.interpreting():
        return None
    return (f"Triton kernels run on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1), "
            f"got a {device.type} tensor")


def _extension_reason(name: str, device: torch.device) -> Optional[str]:
    if device.type != name:
        return f"backend {name!r} runs on {name} tensors, got a {device.type} tensor"
    module, reason = _import_extension()
    if module is None:
        return reason
    if not getattr(module, f"HAS_{name.upper()}", False):
        return f"saep_kernels._C was built without {name} kernels"
    return None


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """None when backend ``name`` can run on ``device``, else a sentence saying why not."""
    if name == "reference":
        return None
    if name == "triton":
        return _triton_reason(device)
    if name in ("cpu", "cuda"):
        return _extension_reason(name, device)
    raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")


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


# The compiled kernels take the K layers as a fixed-size table (csrc/dwconv_pool.h).
EXTENSION_MAX_LAYERS = 16


def _problem_reason(name: str, num_layers: int) -> Optional[str]:
    """None when backend ``name`` handles ``num_layers`` layers, else why not."""
    if name in ("cpu", "cuda") and num_layers > EXTENSION_MAX_LAYERS:
        return (f"the compiled kernels take at most {EXTENSION_MAX_LAYERS} layers, got "
                f"{num_layers}")
    return None


@torch.compiler.assume_constant_result
def resolve_backend(backend: str, device: torch.device, num_layers: int = 1) -> str:
    """The concrete backend name for ``backend`` (possibly ``"auto"``) on ``device``, for a
    problem of ``num_layers`` layers.

    Under ``torch.compile`` this runs once at trace time and its answer is a constant of the
    graph (it imports modules, which Dynamo need not trace)."""
    if not isinstance(backend, str) or backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            if unavailable_reason(name, device) is None and \
                    _problem_reason(name, num_layers) is None:
                return name
        return "reference"
    reason = unavailable_reason(backend, device) or _problem_reason(backend, num_layers)
    if reason is not None:
        raise BackendUnavailable(f"backend={backend!r} is unavailable: {reason}")
    return backend


_POOL_CODES = {"avg": 0, "max": 1}


def _extension_fwd(xs, weight, bias, height, width, num_prefix_tokens, residual, pool,
                   save_argmax):
    # torch.ops.saep_C: one op, a CPU and a CUDA kernel; the dispatcher picks by device
    return torch.ops.saep_C.dwconv_pool_fwd(list(xs), weight, bias, height, width,
                                            num_prefix_tokens, residual, _POOL_CODES[pool],
                                            save_argmax)


def _extension_bwd(grad_out, xs, weight, argmax, height, width, num_prefix_tokens, residual,
                   pool, need_input_grad, need_weight_grad, need_bias_grad):
    grad_xs, grad_w, grad_b = torch.ops.saep_C.dwconv_pool_bwd(
        grad_out, list(xs), weight, argmax, height, width, num_prefix_tokens, residual,
        _POOL_CODES[pool], need_input_grad, need_weight_grad, need_bias_grad)
    return (list(grad_xs), grad_w if need_weight_grad else None,
            grad_b if need_bias_grad else None)


def launchers(name: str) -> Tuple[Callable, Callable]:
    """(forward, backward) launchers of a fused backend."""
    if name == "triton":
        module, reason = _import_triton_kernels()
        if module is None:
            raise BackendUnavailable(f"backend='triton' is unavailable: {reason}")
        return module.dwconv_pool_fwd, module.dwconv_pool_bwd
    if name in ("cpu", "cuda"):
        module, reason = _import_extension()
        if module is None:
            raise BackendUnavailable(f"backend={name!r} is unavailable: {reason}")
        return _extension_fwd, _extension_bwd
    raise ValueError(f"{name!r} is not a fused backend")
