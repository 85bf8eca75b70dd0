"""The spec of one ``fused_aggregate`` call, built once from the checked arguments.

``AggregateSpec`` holds everything about a call but the tensors' data: the grid, the options
(prefix tokens, residual, pool) and the sizes read off the tensors, with the derived counts
(pooled grid, output tokens, output channels). Every layer takes it: the custom ops carry its
argument fields (their schemas are generated from them, see ``schema_arguments``), both
autograd paths save it, and each backend's launcher reads it. ``grads_needed`` is the one
function that decides which gradients a call needs.

The pooled-grid arithmetic (2x2 windows, stride 2, ceil mode) lives here alone:
``pooled_size`` and ``num_output_tokens``.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, NamedTuple, Sequence, Tuple, Union

import torch

POOL_MODES = ("avg", "max")
KERNEL_SIZES = (1, 3, 5, 7)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def pooled_size(height, width) -> Tuple[int, int]:
    """(Ho, Wo) of an H x W grid after 2x2 pooling with stride 2 in ceil mode: odd sides keep
    a last row/column of partial windows."""
    return (height + 1) // 2, (width + 1) // 2


def num_output_tokens(height, width) -> int:
    """Tokens out for an H x W patch grid: ceil(H/2) * ceil(W/2) (24x24 -> 144, 27x27 -> 196)."""
    out_height, out_width = pooled_size(height, width)
    return out_height * out_width


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic runs in: fp32 for fp16/bf16/fp32 inputs, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _op_argument(schema_type: str):
    """A field the custom ops carry as an argument, with its type in a torch schema."""
    return dataclasses.field(metadata={"schema": schema_type})


IntLike = Union[int, torch.SymInt]


@dataclasses.dataclass(frozen=True)
class AggregateSpec:
    """One call of ``fused_aggregate``: grid, options and sizes (docs/op.md section 1).

    Sizes are ints, or SymInts under ``torch.compile`` with dynamic shapes.
    """

    # the op's arguments: the custom ops carry these, in this order (schema_arguments)
    height: IntLike = _op_argument("SymInt")
    width: IntLike = _op_argument("SymInt")
    num_prefix_tokens: IntLike = _op_argument("SymInt")
    residual: bool = _op_argument("bool")
    pool: str = _op_argument("str")
    # read off the tensors
    batch: IntLike
    tokens: IntLike  # T = num_prefix_tokens + H*W
    channels: IntLike  # C of each layer
    num_layers: int  # K
    kernel_size: IntLike  # k

    @classmethod
    def of(cls, hidden_states: Sequence[torch.Tensor], weight: torch.Tensor, *op_args,
           **named_op_args) -> "AggregateSpec":
        """The spec of already checked arguments: the tensors, then the argument fields (in
        schema order, or by name)."""
        batch, tokens, channels = hidden_states[0].shape
        return cls(*op_args, **named_op_args, batch=batch, tokens=tokens, channels=channels,
                   num_layers=len(hidden_states), kernel_size=weight.shape[-1])

    def op_args(self) -> tuple:
        """The argument fields' values, in schema order."""
        return tuple(getattr(self, name) for name, _ in OP_ARGUMENTS)

    @property
    def out_height(self) -> IntLike:
        return pooled_size(self.height, self.width)[0]

    @property
    def out_width(self) -> IntLike:
        return pooled_size(self.height, self.width)[1]

    @property
    def out_tokens(self) -> IntLike:
        return num_output_tokens(self.height, self.width)

    @property
    def out_channels(self) -> IntLike:
        """K*C: channel l*C + c of the output is channel c of layer l."""
        return self.num_layers * self.channels

    @property
    def out_shape(self) -> tuple:
        return (self.batch, self.out_tokens, self.out_channels)

    @property
    def taps(self) -> IntLike:
        return self.kernel_size * self.kernel_size


OP_ARGUMENTS: Tuple[Tuple[str, str], ...] = tuple(
    (f.name, f.metadata["schema"]) for f in dataclasses.fields(AggregateSpec)
    if "schema" in f.metadata)


def schema_arguments() -> str:
    """The spec's argument fields as they appear in a custom op's schema."""
    return ", ".join(f"{schema_type} {name}" for name, schema_type in OP_ARGUMENTS)


class GradsNeeded(NamedTuple):
    """Which gradients a call needs: of the hidden states (all K, or none), the weight, the
    bias."""

    input: bool
    weight: bool
    bias: bool

    def any(self) -> bool:
        return self.input or self.weight or self.bias


NO_GRADS = GradsNeeded(False, False, False)


def grads_needed(hidden_states: Union[bool, Iterable[bool]], weight: bool,
                 bias: bool) -> GradsNeeded:
    """The gradients a call needs, from what autograd says of each input: a flag per hidden
    state (or one for all of them), one for the weight, one for the bias (False when there is
    none). Both autograd paths and the forward (which saves the argmax only when a gradient
    will be needed) decide here."""
    if not isinstance(hidden_states, bool):
        hidden_states = any(bool(flag) for flag in hidden_states)
    return GradsNeeded(input=hidden_states, weight=bool(weight), bias=bool(bias))
