"""The ``triton`` backend: the Triton kernels of ``triton_kernels/`` (installed as
``saep_kernels.triton_kernels``) behind the shared fused-backend flow.

They run on CUDA tensors, or on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``,
for tests). On a GPU the forward picks its tiles by autotuning on first use of each problem
shape; ``TritonBackend.autotune`` turns that off (read once from ``SAEP_TRITON_AUTOTUNE=0`` at
import). Every launch runs under a guard for the inputs' device, on its current stream.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from typing import Optional

import torch

from .fused import FusedBackend


@functools.lru_cache(maxsize=None)
def _import_triton_kernels():
    """The Triton kernels' modules (forward, backward, shared), or None and the reason they
    cannot be imported."""
    try:
        modules = tuple(importlib.import_module(f"saep_kernels.triton_kernels.{name}")
                        for name in ("fused_aggregate_fwd", "fused_aggregate_bwd", "shared"))
    except ImportError as exc:  # triton missing or broken
        return None, f"the Triton kernels could not be imported ({exc}); pip install 'triton>=3.6'"
    return modules, None


def _kernels():
    modules, reason = _import_triton_kernels()
    if modules is None:
        raise RuntimeError(f"backend 'triton' is unavailable: {reason}")
    return modules


def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class TritonBackend(FusedBackend):
    name = "triton"
    autotune = os.environ.get("SAEP_TRITON_AUTOTUNE", "1") != "0"
    takes_packed_grids = True

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        modules, reason = _import_triton_kernels()
        if modules is None:
            return reason
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "CUDA is not available"
        if device.type == "cpu" and modules[2].interpreting():
            return None
        return (f"Triton kernels run on CUDA tensors (or on CPU tensors under "
                f"TRITON_INTERPRET=1), got a {device.type} tensor")

    def launch_forward(self, spec, layers, weight, bias, out, argmax):
        forward, _, shared = _kernels()
        with _device_guard(out.device):
            forward.fused_aggregate_fwd(spec, layers, weight, bias, out, argmax,
                                        autotune=self.autotune and not shared.interpreting())

    def launch_backward(self, spec, grad_out, layers, weight, argmax, grad_layers, weight_parts,
                        bias_parts):
        _, backward, _ = _kernels()
        with _device_guard(grad_out.device):
            backward.fused_aggregate_bwd(spec, grad_out, layers, weight, argmax, grad_layers,
                                         weight_parts, bias_parts)

    def launch_forward_varlen(self, spec, layers, weight, bias, images, out, argmax):
        from ..varlen import check_image_table  # varlen imports the backends

        forward, _, _ = _kernels()
        check_image_table(images, spec.tokens, spec.out_tokens)
        with _device_guard(out.device):
            forward.fused_aggregate_fwd(spec, layers, weight, bias, out, argmax, autotune=False,
                                        images=images)

    def launch_backward_varlen(self, spec, grad_out, layers, weight, argmax, images,
                               grad_layers, weight_parts, bias_parts):
        from ..varlen import check_image_table

        _, backward, _ = _kernels()
        check_image_table(images, spec.tokens, spec.out_tokens)
        with _device_guard(grad_out.device):
            backward.fused_aggregate_bwd(spec, grad_out, layers, weight, argmax, grad_layers,
                                         weight_parts, bias_parts, images=images)
