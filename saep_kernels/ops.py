"""The public op ``fused_aggregate``: torch.library registration, autograd, backend dispatch.

Two custom ops carry the fused backends through the dispatcher:

* ``saep::fused_aggregate``          -> (out, argmax)
* ``saep::fused_aggregate_backward`` -> (grad_hidden_states, grad_weight, grad_bias)

Each has a fake (meta) implementation for ``torch.compile``/export, and the forward op has
its autograd formula registered, so ``torch.compile(fullgraph=True)`` sees one opaque node per
direction with no graph break, and CUDA graphs capture them (no host syncs inside).
``FusedAggregateFunction`` is the same forward/backward as a public ``torch.autograd.Function``.

``argmax`` is the window position (0..3, uint8) of each max-pool output, saved by the forward
when ``pool="max"`` and a gradient will be needed; the backward routes ``grad_out`` through
it. For ``pool="avg"`` it is an empty tensor. The [B, H*W, K*C] concat is never saved.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import backends
from ._checks import check_inputs
from .reference import _reference_unchecked, compute_dtype

__all__ = ["fused_aggregate", "FusedAggregateFunction"]


# --------------------------------------------------------------------------------------------
# the custom ops
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("saep::fused_aggregate", mutates_args=())
def _fused_aggregate_op(
    hidden_states: List[Tensor],
    weight: Tensor,
    bias: Optional[Tensor],
    height: int,
    width: int,
    num_prefix_tokens: int,
    residual: bool,
    pool: str,
    backend: str,
    save_argmax: bool,
) -> Tuple[Tensor, Tensor]:
    forward, _ = backends.launchers(backend)
    return forward(hidden_states, weight, bias, height, width, num_prefix_tokens, residual, pool,
                   save_argmax)


@_fused_aggregate_op.register_fake
def _fused_aggregate_fake(hidden_states, weight, bias, height, width, num_prefix_tokens, residual,
                          pool, backend, save_argmax):
    x0 = hidden_states[0]
    n_windows = ((height + 1) // 2) * ((width + 1) // 2)
    out = x0.new_empty((x0.shape[0], n_windows, len(hidden_states) * x0.shape[2]))
    argmax_shape = out.shape if (pool == "max" and save_argmax) else (0,)
    return out, x0.new_empty(argmax_shape, dtype=torch.uint8)


@torch.library.custom_op("saep::fused_aggregate_backward", mutates_args=())
def _fused_aggregate_backward_op(
    grad_out: Tensor,
    hidden_states: List[Tensor],
    weight: Tensor,
    argmax: Tensor,
    height: int,
    width: int,
    num_prefix_tokens: int,
    residual: bool,
    pool: str,
    backend: str,
    need_input_grad: bool,
    need_weight_grad: bool,
    need_bias_grad: bool,
) -> Tuple[List[Tensor], Tensor, Tensor]:
    _, backward = backends.launchers(backend)
    grad_xs, grad_w, grad_b = backward(
        grad_out, hidden_states, weight, argmax, height, width, num_prefix_tokens, residual, pool,
        need_input_grad, need_weight_grad, need_bias_grad)
    # A custom op returns tensors, never None: a gradient nobody asked for is an empty tensor.
    empty = weight.new_empty((0,), dtype=compute_dtype(hidden_states[0].dtype))
    return (list(grad_xs),
            grad_w if grad_w is not None else empty,
            grad_b if grad_b is not None else empty.clone())


@_fused_aggregate_backward_op.register_fake
def _fused_aggregate_backward_fake(grad_out, hidden_states, weight, argmax, height, width,
                                   num_prefix_tokens, residual, pool, backend, need_input_grad,
                                   need_weight_grad, need_bias_grad):
    acc = compute_dtype(hidden_states[0].dtype)
    grad_xs = [h.new_empty(h.shape) for h in hidden_states] if need_input_grad else []
    grad_w = weight.new_empty(weight.shape if need_weight_grad else (0,), dtype=acc)
    grad_b = weight.new_empty((weight.shape[0],) if need_bias_grad else (0,), dtype=acc)
    return grad_xs, grad_w, grad_b


# --------------------------------------------------------------------------------------------
# forward / backward shared by the registered autograd and FusedAggregateFunction
# --------------------------------------------------------------------------------------------


def _backward(grad_out: Tensor, hidden_states: Sequence[Tensor], weight: Tensor,
              argmax: Tensor, has_bias: bool, bias_dtype, height: int, width: int,
              num_prefix_tokens: int, residual: bool, pool: str, backend: str,
              need_input_grad: bool, need_weight_grad: bool, need_bias_grad: bool):
    """Gradients (grad_xs or None, grad_weight or None, grad_bias or None)."""
    need_bias_grad = need_bias_grad and has_bias
    if not (need_input_grad or need_weight_grad or need_bias_grad):
        return None, None, None
    grad_xs, grad_w, grad_b = torch.ops.saep.fused_aggregate_backward(
        grad_out, list(hidden_states), weight, argmax, height, width, num_prefix_tokens,
        residual, pool, backend, need_input_grad, need_weight_grad, need_bias_grad)
    return (grad_xs if need_input_grad else None,
            grad_w.to(weight.dtype) if need_weight_grad else None,
            grad_b.to(bias_dtype) if need_bias_grad else None)


def _setup_context(ctx, inputs, output):
    (hidden_states, weight, bias, height, width, num_prefix_tokens, residual, pool, backend,
     _save_argmax) = inputs
    _, argmax = output
    ctx.save_for_backward(weight, argmax, *hidden_states)
    ctx.config = (bias is not None, None if bias is None else bias.dtype, height, width,
                  num_prefix_tokens, residual, pool, backend)


def _op_backward(ctx, grad_out, _grad_argmax):
    weight, argmax, *hidden_states = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], \
        ctx.needs_input_grad[2]
    grad_xs, grad_w, grad_b = _backward(grad_out, hidden_states, weight, argmax, *ctx.config,
                                        need_input_grad=bool(need_x), need_weight_grad=need_w,
                                        need_bias_grad=need_b)
    return grad_xs, grad_w, grad_b, None, None, None, None, None, None, None


torch.library.register_autograd("saep::fused_aggregate", _op_backward,
                                setup_context=_setup_context)


class FusedAggregateFunction(torch.autograd.Function):
    """``fused_aggregate`` of a fused backend as a ``torch.autograd.Function``.

    ``FusedAggregateFunction.apply(weight, bias, height, width, num_prefix_tokens, residual,
    pool, backend, *hidden_states)`` with a concrete backend name (``"triton"``, ``"cpu"``,
    ``"cuda"``); arguments are not checked here, use ``fused_aggregate`` for that. Forward and
    backward are the registered ``saep::`` ops, as in ``fused_aggregate``.
    """

    @staticmethod
    def forward(ctx, weight, bias, height, width, num_prefix_tokens, residual, pool, backend,
                *hidden_states):
        out, argmax = torch.ops.saep.fused_aggregate(
            list(hidden_states), weight, bias, height, width, num_prefix_tokens, residual, pool,
            backend, pool == "max")
        ctx.save_for_backward(weight, argmax, *hidden_states)
        ctx.config = (bias is not None, None if bias is None else bias.dtype, height, width,
                      num_prefix_tokens, residual, pool, backend)
        ctx.mark_non_differentiable(argmax)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, argmax, *hidden_states = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_xs, grad_w, grad_b = _backward(grad_out, hidden_states, weight, argmax, *ctx.config,
                                            need_input_grad=any(need[8:]),
                                            need_weight_grad=need[0], need_bias_grad=need[1])
        grad_xs = grad_xs if grad_xs is not None else [None] * len(hidden_states)
        return (grad_w, grad_b, None, None, None, None, None, None, *grad_xs)


# --------------------------------------------------------------------------------------------
# the public function
# --------------------------------------------------------------------------------------------


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
    geo = check_inputs(hidden_states, weight, bias, grid, num_prefix_tokens, residual, pool)
    name = backends.resolve_backend(backend, hidden_states[0].device, geo.num_layers)
    if name == "reference":
        return _reference_unchecked(hidden_states, weight, bias, geo.height, geo.width,
                                    num_prefix_tokens, residual, pool)
    hidden_states = list(hidden_states)
    save_argmax = pool == "max" and torch.is_grad_enabled() and (
        weight.requires_grad or (bias is not None and bias.requires_grad)
        or any(h.requires_grad for h in hidden_states))
    out, _ = torch.ops.saep.fused_aggregate(hidden_states, weight, bias, geo.height, geo.width,
                                            num_prefix_tokens, residual, pool, name, save_argmax)
    return out
