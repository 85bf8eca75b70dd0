"""The ``cpu`` and ``cuda`` backends: the C++ and CUDA kernels of the compiled extension
``saep_kernels._C`` (``csrc/``), registered as the ops ``torch.ops.saep_C.fused_aggregate_fwd``
/ ``fused_aggregate_bwd`` with a CPU and a CUDA kernel each; the dispatcher picks by device.

The extension tells what it was built with (``HAS_CPU``, ``HAS_CUDA``) and the most layers its
kernels take (``MAX_LAYERS``: they hold the K layer pointers in a fixed-size table). It is
loaded once, with the package; without it the package still imports and these backends say
why they are unavailable.
"""

from __future__ import annotations

import importlib
from typing import Optional

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

    def supports(self, spec) -> Optional[str]:
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
