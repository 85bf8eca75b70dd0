"""What every fused backend (Triton, the C++ CPU kernels, the CUDA kernels) does around its
kernels, written once: the layout its kernels read, the buffers they write, the reductions
after them.

* Tensors reach the kernels channel-contiguous: the layers and ``grad_out`` are read in place
  when their channel stride is 1 (slices of a model's ``hidden_states``, any batch and token
  strides), else copied once (``channel_contiguous``). The weight goes in tap-major,
  channel-contiguous and in the compute dtype (``tap_weights``: [k*k, K*C]), the bias in the
  compute dtype (``kernel_bias``).
* The outputs are allocated here (``forward_outputs``, ``input_grad_buffers``; the custom ops'
  fake implementations use the same functions): the input gradients are [B, T, C] with the
  prefix rows zeroed, since the kernels write the grid tokens only.
* Weight and bias gradients come back from the kernels as partial sums, one row per image
  (``partial_buffers``: [B, k*k, K*C] and [B, K*C] in the compute dtype, whatever the
  backend); ``reduce_partials`` sums them in a fixed order (bitwise reproducible).

A backend subclasses ``FusedBackend`` and provides ``unavailable_reason``, optionally
``supports``, and the two kernel launches.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ..spec import AggregateSpec, GradsNeeded, compute_dtype

Tensor = torch.Tensor


def channel_contiguous(t: Tensor) -> Tensor:
    """``t`` itself when its last (channel) dimension is contiguous, else a contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def tap_weights(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """The depthwise weight [K*C, 1, k, k] as the kernels read it: [k*k, K*C] in ``dtype``,
    so that the K*C channels of one tap are contiguous. One copy converts and transposes at
    once (a ``.to`` then ``.contiguous()`` would make two passes over the weight)."""
    taps = weight.reshape(weight.shape[0], -1).t()
    return torch.empty(taps.shape, dtype=dtype, device=weight.device).copy_(taps)


def kernel_bias(bias: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if bias is None else bias.to(dtype).contiguous()


def forward_outputs(spec: AggregateSpec, like: Tensor, save_argmax: bool) -> Tuple[Tensor, Tensor]:
    """(out [B, Ho*Wo, K*C] in the dtype of ``like``, argmax): the argmax (uint8 window position
    0..3 of each max) has the shape of ``out`` when max pooling saves it, else it is empty."""
    out = like.new_empty(spec.out_shape)
    stored = spec.pool == "max" and save_argmax
    return out, like.new_empty(spec.out_shape if stored else (0,), dtype=torch.uint8)


def input_grad_buffers(spec: AggregateSpec, like: Tensor) -> List[Tensor]:
    """K contiguous [B, T, C] gradients; the prefix tokens take no part in the op and get
    zeros, the kernels write the rest."""
    grads = [like.new_empty((spec.batch, spec.tokens, spec.channels))
             for _ in range(spec.num_layers)]
    if spec.num_prefix_tokens:
        for g in grads:
            g[:, :spec.num_prefix_tokens].zero_()
    return grads


def partial_buffers(spec, needs: GradsNeeded, like: Tensor,
                    dtype: torch.dtype) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """The kernels' weight and bias partial sums, one row per image, for what ``needs`` asks
    (None otherwise). ``spec``: an ``AggregateSpec`` or a ``VarlenSpec``."""
    rows = spec.batch if isinstance(spec, AggregateSpec) else spec.num_images
    weight = like.new_empty((rows, spec.taps, spec.out_channels), dtype=dtype) \
        if needs.weight else None
    bias = like.new_empty((rows, spec.out_channels), dtype=dtype) if needs.bias else None
    return weight, bias


def reduce_partials(spec: AggregateSpec, weight_parts: Optional[Tensor],
                    bias_parts: Optional[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Weight [K*C, 1, k, k] and bias [K*C] gradients from the kernels' partial sums
    ([rows, k*k, K*C] and [rows, K*C]), summed over the rows in a fixed order."""
    grad_w = None
    if weight_parts is not None:
        k = spec.kernel_size
        grad_w = weight_parts.sum(0).t().reshape(spec.out_channels, 1, k, k).contiguous()
    return grad_w, (bias_parts.sum(0) if bias_parts is not None else None)


class FusedBackend:
    """A fused backend: the shared flow above around a backend's two kernel launches."""

    name: str = ""

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        """None when this backend can run tensors on ``device``, else a sentence saying why not."""
        raise NotImplementedError

    def supports(self, spec) -> Optional[str]:
        """None when this backend computes ``spec`` (an ``AggregateSpec``, or a ``VarlenSpec``
        of packed grids), else a sentence saying why not."""
        if not isinstance(spec, AggregateSpec) and not self.takes_packed_grids:
            return f"backend {self.name!r} does not take packed grids (fused_aggregate_varlen) yet"
        return None

    # whether launch_forward_varlen / launch_backward_varlen exist
    takes_packed_grids: bool = False

    def launch_forward(self, spec: AggregateSpec, layers: Sequence[Tensor], weight: Tensor,
                       bias: Optional[Tensor], out: Tensor, argmax: Optional[Tensor]) -> None:
        """Write ``out`` (and ``argmax`` when given). Inputs as prepared by ``forward``."""
        raise NotImplementedError

    def launch_backward(self, spec: AggregateSpec, grad_out: Tensor, layers: Sequence[Tensor],
                        weight: Tensor, argmax: Optional[Tensor], grad_layers: Sequence[Tensor],
                        weight_parts: Optional[Tensor], bias_parts: Optional[Tensor]) -> None:
        """Write the gradients asked for: ``grad_layers`` (empty when not needed) and the
        weight and bias partial sums (None when not needed)."""
        raise NotImplementedError

    def launch_forward_varlen(self, spec, layers: Sequence[Tensor], weight: Tensor,
                              bias: Optional[Tensor], images: Tensor, out: Tensor,
                              argmax: Optional[Tensor]) -> None:
        """Packed grids: write ``out`` [1, out_tokens, K*C] (and ``argmax``). ``images`` is the
        host image table (saep_kernels.varlen.image_table)."""
        raise NotImplementedError

    def launch_backward_varlen(self, spec, grad_out: Tensor, layers: Sequence[Tensor],
                               weight: Tensor, argmax: Optional[Tensor], images: Tensor,
                               grad_layers: Sequence[Tensor], weight_parts: Optional[Tensor],
                               bias_parts: Optional[Tensor]) -> None:
        """Packed grids: the gradients asked for, partial sums one row per image."""
        raise NotImplementedError

    def forward(self, spec: AggregateSpec, hidden_states: Sequence[Tensor], weight: Tensor,
                bias: Optional[Tensor], save_argmax: bool) -> Tuple[Tensor, Tensor]:
        """(out, argmax) of checked arguments; see ``forward_outputs``."""
        x0 = hidden_states[0]
        out, argmax = forward_outputs(spec, x0, save_argmax)
        if spec.batch > 0:
            acc = compute_dtype(x0.dtype)
            self.launch_forward(spec, [channel_contiguous(x) for x in hidden_states],
                                tap_weights(weight, acc), kernel_bias(bias, acc), out,
                                argmax if argmax.numel() else None)
        return out, argmax

    def backward(self, spec: AggregateSpec, needs: GradsNeeded, grad_out: Tensor,
                 hidden_states: Sequence[Tensor], weight: Tensor, argmax: Tensor
                 ) -> Tuple[List[Tensor], Optional[Tensor], Optional[Tensor]]:
        """(grads of the hidden states or [], grad of the weight or None, of the bias or None)
        for what ``needs`` asks; weight and bias gradients in the compute dtype."""
        if spec.pool == "max" and tuple(argmax.shape) != tuple(grad_out.shape):
            raise ValueError("max-pool backward needs the argmax saved by the forward "
                             f"(shape {tuple(grad_out.shape)}), got {tuple(argmax.shape)}")
        x0 = hidden_states[0]
        acc = compute_dtype(x0.dtype)
        grad_layers = input_grad_buffers(spec, x0) if needs.input else []
        weight_parts, bias_parts = partial_buffers(spec, needs, x0, acc)
        if spec.batch > 0 and needs.any():  # no image: no rows, zero weight and bias gradients
            self.launch_backward(
                spec, channel_contiguous(grad_out), [channel_contiguous(x) for x in hidden_states],
                tap_weights(weight, acc), argmax.contiguous() if spec.pool == "max" else None,
                grad_layers, weight_parts, bias_parts)
        grad_w, grad_b = reduce_partials(spec, weight_parts, bias_parts)
        return grad_layers, grad_w, grad_b

    def forward_varlen(self, spec, layers: Sequence[Tensor], weight: Tensor,
                       bias: Optional[Tensor], images: Tensor, out: Tensor,
                       argmax: Optional[Tensor]) -> None:
        """Packed grids (a ``VarlenSpec``, layers [1, N, C]): writes ``out`` and ``argmax``,
        allocated by the caller."""
        acc = compute_dtype(layers[0].dtype)
        self.launch_forward_varlen(spec, [channel_contiguous(x) for x in layers],
                                   tap_weights(weight, acc), kernel_bias(bias, acc), images, out,
                                   argmax)

    def backward_varlen(self, spec, needs: GradsNeeded, grad_out: Tensor,
                        layers: Sequence[Tensor], weight: Tensor, argmax: Tensor, images: Tensor,
                        grad_layers: Sequence[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """Packed grids: writes ``grad_layers`` (when given) and returns the weight and bias
        gradients asked for (compute dtype)."""
        if spec.pool == "max" and tuple(argmax.shape) != tuple(grad_out.shape):
            raise ValueError("max-pool backward needs the argmax saved by the forward "
                             f"(shape {tuple(grad_out.shape)}), got {tuple(argmax.shape)}")
        acc = compute_dtype(layers[0].dtype)
        weight_parts, bias_parts = partial_buffers(spec, needs, layers[0], acc)
        if needs.any():
            self.launch_backward_varlen(
                spec, channel_contiguous(grad_out), [channel_contiguous(x) for x in layers],
                tap_weights(weight, acc), argmax.contiguous() if spec.pool == "max" else None,
                images, grad_layers, weight_parts, bias_parts)
        return reduce_partials(spec, weight_parts, bias_parts)
