"""The ``cpu`` and ``cuda`` backends: the C++ and CUDA kernels of the compiled extension
``saep_kernels._C`` (``csrc/``), registered as the ops ``torch.ops.saep_C.fused_aggregate_fwd``
/ ``fused_aggregate_bwd`` with a CPU and a CUDA kernel each; the dispatcher picks by device.

The extension tells what it was built with (``HAS_CPU``, ``HAS_CUDA``) and the most layers its
kernels take (``MAX_LAYERS``: they hold the K layer pointers in a fixed-size table). It is
loaded once, with the package; without it the package still imports and these backends say
why they are unavailable.

The CPU kernels are compiled for several instruction sets ("default", "avx2", "avx512" on
x86-64); the best one this CPU runs is used unless ``SAEP_CPU_CAPABILITY`` (read at load, like
PyTorch's ``ATEN_CPU_CAPABILITY``) or ``set_cpu_capability`` picks another.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Optional, Tuple

import torch

from .fused import FusedBackend


def _load_extension():
    """The compiled extension ``saep_kernels._C``, or None and why it is missing."""
    try:
        return importlib.import_module("saep_kernels._C"), None
    except ImportError as exc:
        return None, (f"the C++ extension saep_kernels._C is not built ({exc}); "
                      "reinstall with a C++ compiler (and nvcc for CUDA): pip install .")


EXTENSION, MISSING_REASON = _load_extension()

CPU_CAPABILITY_ENV = "SAEP_CPU_CAPABILITY"
# every name the kernels know, lowest first ("default", "avx2", "avx512")
CPU_CAPABILITY_NAMES = tuple(EXTENSION.CPU_CAPABILITY_NAMES) if EXTENSION is not None else ()


def cpu_capabilities() -> Tuple[str, ...]:
    """The instruction sets the CPU kernels are compiled for and this CPU runs, best last
    (empty without the compiled extension)."""
    return tuple(EXTENSION.cpu_capabilities()) if EXTENSION is not None else ()


def cpu_capability() -> Optional[str]:
    """The instruction set whose CPU kernels run now (None without the compiled extension)."""
    return EXTENSION.cpu_capability() if EXTENSION is not None else None


def set_cpu_capability(name: str) -> None:
    """Run the CPU kernels compiled for ``name`` (one of ``cpu_capabilities()``) from now on,
    in every thread."""
    if EXTENSION is None:
        raise RuntimeError(MISSING_REASON)
    EXTENSION.set_cpu_capability(name)


def _apply_capability_env() -> None:
    """``SAEP_CPU_CAPABILITY``: an unknown name is an error; a known one this CPU does not run
    gives the best one below it, with a warning."""
    wanted = os.environ.get(CPU_CAPABILITY_ENV)
    if not wanted or EXTENSION is None:
        return
    if wanted not in CPU_CAPABILITY_NAMES:
        raise ValueError(f"{CPU_CAPABILITY_ENV} must be one of {CPU_CAPABILITY_NAMES}, "
                         f"got {wanted!r}")
    runnable = cpu_capabilities()
    rank = CPU_CAPABILITY_NAMES.index
    usable = [c for c in runnable if rank(c) <= rank(wanted)]
    if usable[-1] != wanted:
        warnings.warn(f"{CPU_CAPABILITY_ENV}={wanted!r}: not run by this CPU or not compiled "
                      f"here (available: {runnable}); using {usable[-1]!r}")
    set_cpu_capability(usable[-1])


_apply_capability_env()


class ExtensionBackend(FusedBackend):
    def __init__(self, name: str):
        self.name = name  # "cpu" or "cuda": the device its kernels run on

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if device.type != self.name:
            return f"backend {self.name!r} runs on {self.name} tensors, got a {device.type} tensor"
        if EXTENSION is None:
            return MISSING_REASON
        if not getattr(EXTENSION, f"HAS_{self.name.upper()}", False):
            return f"saep_kernels._C was built without {self.name} kernels"
        return None

    takes_packed_grids = True  # the CPU and CUDA kernels take the image table

    def supports(self, spec) -> Optional[str]:
        why = super().supports(spec)
        if why is not None:
            return why
        if EXTENSION is not None and spec.num_layers > EXTENSION.MAX_LAYERS:
            return (f"the compiled kernels take at most {EXTENSION.MAX_LAYERS} layers, got "
                    f"{spec.num_layers}")
        return None

    def launch_forward(self, spec, layers, weight, bias, out, argmax):
        torch.ops.saep_C.fused_aggregate_fwd(layers, weight, bias, out, argmax, *spec.op_args())

    def launch_backward(self, spec, grad_out, layers, weight, argmax, grad_layers, weight_parts,
                        bias_parts):
        torch.ops.saep_C.fused_aggregate_bwd(grad_out, layers, weight, argmax, grad_layers,
                                             weight_parts, bias_parts, *spec.op_args())

    def launch_forward_varlen(self, spec, layers, weight, bias, images, out, argmax):
        torch.ops.saep_C.fused_aggregate_varlen_fwd(layers, weight, bias, images, out, argmax,
                                                    spec.residual, spec.pool)

    def launch_backward_varlen(self, spec, grad_out, layers, weight, argmax, images,
                               grad_layers, weight_parts, bias_parts):
        torch.ops.saep_C.fused_aggregate_varlen_bwd(grad_out, layers, weight, argmax, images,
                                                    grad_layers, weight_parts, bias_parts,
                                                    spec.residual, spec.pool)
