"""The public op ``fused_aggregate``: torch.library registration, autograd, backend dispatch.

Two custom ops carry the fused backends through the dispatcher, their schemas generated from
the spec's argument fields (``saep_kernels.spec``):

* ``saep::fused_aggregate``          -> (out, argmax)
* ``saep::fused_aggregate_backward`` -> (grad_hidden_states, grad_weight, grad_bias)

Each has a fake (meta) implementation for ``torch.compile``/export, and the forward op has
its autograd formula registered, so ``torch.compile(fullgraph=True)`` sees one opaque node per
direction with no graph break. ``FusedAggregateFunction`` is the same forward/backward as a
public ``torch.autograd.Function``. Both autograd paths save the same context and decide the
gradients they need in ``spec.grads_needed``.

``argmax`` is the window position (0..3, uint8) of each max-pool output, saved by the forward
when ``pool="max"`` and a gradient will be needed; the backward routes ``grad_out`` through
it. For ``pool="avg"`` it is an empty tensor. The [B, H*W, K*C] concat is never saved.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import backends
from ._checks import check_inputs
from .backends.fused import forward_outputs, input_grad_buffers
from .reference import reference_unchecked
from .spec import (NO_GRADS, OP_ARGUMENTS, AggregateSpec, GradsNeeded, compute_dtype,
                   grads_needed, schema_arguments)

__all__ = ["fused_aggregate", "FusedAggregateFunction", "aggregate_spec"]

_N_SPEC = len(OP_ARGUMENTS)
_NEEDS = ", ".join(f"bool need_{name}_grad" for name in GradsNeeded._fields)

# --------------------------------------------------------------------------------------------
# the custom ops: (tensors, the spec's argument fields, backend, ...)
# --------------------------------------------------------------------------------------------


def _forward_impl(hidden_states, weight, bias, *args):
    spec_args, (backend, save_argmax) = args[:_N_SPEC], args[_N_SPEC:]
    spec = AggregateSpec.of(hidden_states, weight, *spec_args)
    return backends.fused_backend(backend).forward(spec, hidden_states, weight, bias,
                                                   save_argmax)


def _forward_fake(hidden_states, weight, bias, *args):
    spec_args, (_backend, save_argmax) = args[:_N_SPEC], args[_N_SPEC:]
    spec = AggregateSpec.of(hidden_states, weight, *spec_args)
    return forward_outputs(spec, hidden_states[0], save_argmax)


_forward_op = torch.library.custom_op(
    "saep::fused_aggregate", _forward_impl, mutates_args=(),
    schema=(f"(Tensor[] hidden_states, Tensor weight, Tensor? bias, {schema_arguments()}, "
            "str backend, bool save_argmax) -> (Tensor, Tensor)"))
_forward_op.register_fake(_forward_fake)


def _split_backward_args(hidden_states, weight, args):
    spec = AggregateSpec.of(hidden_states, weight, *args[:_N_SPEC])
    return spec, args[_N_SPEC], GradsNeeded(*args[_N_SPEC + 1:])


def _backward_impl(grad_out, hidden_states, weight, argmax, *args):
    spec, backend, needs = _split_backward_args(hidden_states, weight, args)
    grad_xs, grad_w, grad_b = backends.fused_backend(backend).backward(
        spec, needs, grad_out, hidden_states, weight, argmax)
    # A custom op returns tensors, never None: a gradient nobody asked for is an empty tensor.
    empty = weight.new_empty((0,), dtype=compute_dtype(hidden_states[0].dtype))
    return (list(grad_xs),
            grad_w if grad_w is not None else empty,
            grad_b if grad_b is not None else empty.clone())


def _backward_fake(grad_out, hidden_states, weight, argmax, *args):
    spec, _backend, needs = _split_backward_args(hidden_states, weight, args)
    acc = compute_dtype(hidden_states[0].dtype)
    grad_xs = input_grad_buffers(spec, hidden_states[0]) if needs.input else []
    grad_w = weight.new_empty(weight.shape if needs.weight else (0,), dtype=acc)
    grad_b = weight.new_empty((spec.out_channels,) if needs.bias else (0,), dtype=acc)
    return grad_xs, grad_w, grad_b


_backward_op = torch.library.custom_op(
    "saep::fused_aggregate_backward", _backward_impl, mutates_args=(),
    schema=(f"(Tensor grad_out, Tensor[] hidden_states, Tensor weight, Tensor argmax, "
            f"{schema_arguments()}, str backend, {_NEEDS}) -> (Tensor[], Tensor, Tensor)"))
_backward_op.register_fake(_backward_fake)

# --------------------------------------------------------------------------------------------
# forward / backward shared by the registered autograd and FusedAggregateFunction
# --------------------------------------------------------------------------------------------


def _forward(spec: AggregateSpec, backend: str, hidden_states: Sequence[Tensor], weight: Tensor,
             bias: Optional[Tensor], needs: GradsNeeded):
    """(out, argmax) through the forward op; the argmax is kept only for a max-pool backward."""
    return torch.ops.saep.fused_aggregate(list(hidden_states), weight, bias, *spec.op_args(),
                                          backend, spec.pool == "max" and needs.any())


def _save_context(ctx, spec: AggregateSpec, backend: str, hidden_states, weight: Tensor,
                  bias: Optional[Tensor], argmax: Tensor) -> None:
    ctx.save_for_backward(weight, argmax, *hidden_states)
    ctx.spec, ctx.backend = spec, backend
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out: Tensor, needs: GradsNeeded):
    """([grad or None per hidden state], grad_weight or None, grad_bias or None) for what
    ``needs`` asks."""
    weight, argmax, *hidden_states = ctx.saved_tensors
    if not needs.any():
        return [None] * len(hidden_states), None, None
    grad_xs, grad_w, grad_b = torch.ops.saep.fused_aggregate_backward(
        grad_out, hidden_states, weight, argmax, *ctx.spec.op_args(), ctx.backend, *needs)
    return (grad_xs if needs.input else [None] * len(hidden_states),
            grad_w.to(weight.dtype) if needs.weight else None,
            grad_b.to(ctx.bias_dtype) if needs.bias else None)


def _op_setup_context(ctx, inputs, output):
    hidden_states, weight, bias, *args = inputs
    spec = AggregateSpec.of(hidden_states, weight, *args[:_N_SPEC])
    _save_context(ctx, spec, args[_N_SPEC], hidden_states, weight, bias, output[1])


def _op_backward(ctx, grad_out, _grad_argmax):
    hidden_states, weight, bias = ctx.needs_input_grad[:3]  # hidden_states: a flag per layer
    grad_xs, grad_w, grad_b = _backward(ctx, grad_out, grads_needed(hidden_states, weight, bias))
    return (grad_xs, grad_w, grad_b) + (None,) * (len(ctx.needs_input_grad) - 3)


torch.library.register_autograd("saep::fused_aggregate", _op_backward,
                                setup_context=_op_setup_context)


class FusedAggregateFunction(torch.autograd.Function):
    """``fused_aggregate`` of a fused backend as a ``torch.autograd.Function``.

    ``FusedAggregateFunction.apply(spec, backend, weight, bias, *hidden_states)`` with the
    ``spec`` of ``aggregate_spec`` (which checks the arguments) and a concrete backend name
    (``"triton"``, ``"cpu"``, ``"cuda"``). Forward and backward are the registered ``saep::``
    ops, as in ``fused_aggregate``.
    """

    @staticmethod
    def forward(ctx, spec, backend, weight, bias, *hidden_states):
        need = ctx.needs_input_grad
        out, argmax = _forward(spec, backend, hidden_states, weight, bias,
                               grads_needed(need[4:], need[2], need[3]))
        _save_context(ctx, spec, backend, hidden_states, weight, bias, argmax)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        need = ctx.needs_input_grad
        grad_xs, grad_w, grad_b = _backward(ctx, grad_out, grads_needed(need[4:], need[2], need[3]))
        return (None, None, grad_w, grad_b, *grad_xs)


# --------------------------------------------------------------------------------------------
# the public functions
# --------------------------------------------------------------------------------------------


def aggregate_spec(hidden_states: Sequence[Tensor], weight: Tensor, bias: Optional[Tensor] = None,
                   *, grid=None, num_prefix_tokens: int = 0, residual: bool = True,
                   pool: str = "avg") -> AggregateSpec:
    """Check the arguments of ``fused_aggregate`` (same names and rules) and return the call's
    ``AggregateSpec``; raises ``ValueError``/``TypeError`` naming a bad argument."""
    return check_inputs(hidden_states, weight, bias, grid, num_prefix_tokens, residual, pool)


def fused_aggregate(
    hidden_states: Sequence[Tensor],
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    grid=None,
    num_prefix_tokens: int = 0,
    residual: bool = True,
    pool: str = "avg",
    backend: str = "auto",
) -> Tensor:
    """SAEP multi-layer aggregation: virtual concat of K layers, depthwise conv (+bias,
    +residual), 2x2 ceil-mode pool, in one fused pass.

    Args:
        hidden_states: K tensors [B, T, C] (same shape, dtype, device; any strides).
        weight: depthwise kernel [K*C, 1, k, k], k in {1, 3, 5, 7} (``nn.Conv2d`` layout).
        bias: [K*C] or None.
        grid: (H, W) of the patch tokens; None for a square grid.
        num_prefix_tokens: tokens skipped at the front of each layer (1 for CLIP's CLS).
        residual: add the unconvolved input to the conv output.
        pool: ``"avg"`` or ``"max"`` over 2x2 windows, stride 2, ceil mode.
        backend: ``"auto"``, ``"reference"``, ``"triton"``, ``"cpu"`` or ``"cuda"``.

    Returns:
        [B, ceil(H/2)*ceil(W/2), K*C] in the dtype of ``hidden_states``.
    """
    spec = check_inputs(hidden_states, weight, bias, grid, num_prefix_tokens, residual, pool)
    name = backends.resolve_backend(backend, hidden_states[0].device, spec)
    if name == "reference":
        return reference_unchecked(spec, hidden_states, weight, bias)
    needs = NO_GRADS
    if torch.is_grad_enabled():
        needs = grads_needed([h.requires_grad for h in hidden_states], weight.requires_grad,
                             bias is not None and bias.requires_grad)
    out, _ = _forward(spec, name, hidden_states, weight, bias, needs)
    return out
