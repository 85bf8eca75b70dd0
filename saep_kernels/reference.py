"""The pure-PyTorch definition of ``fused_aggregate``: the oracle every backend is tested against.

It does literally what docs/op.md says (``torch.cat`` of the layers, a depthwise ``conv2d``,
the residual, a ceil-mode 2x2 pool), in fp32 for fp16/bf16 inputs, so it is obviously right
and differentiable by PyTorch's own autograd. It is also the "eager" and (under
``torch.compile``) the "compile" baseline of the benchmarks.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ._checks import check_inputs
from .spec import AggregateSpec, compute_dtype


def fused_aggregate_reference(
    hidden_states: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    grid=None,
    num_prefix_tokens: int = 0,
    residual: bool = True,
    pool: str = "avg",
) -> torch.Tensor:
    """cat -> depthwise conv (+bias, +residual) -> 2x2 ceil-mode pool, in plain PyTorch.

    Returns ``[B, Ho*Wo, K*C]`` in the dtype of ``hidden_states``.
    """
    spec = check_inputs(hidden_states, weight, bias, grid, num_prefix_tokens, residual, pool)
    return reference_unchecked(spec, hidden_states, weight, bias)


def reference_unchecked(spec: AggregateSpec, hidden_states: Sequence[torch.Tensor],
                        weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The reference for arguments already checked into ``spec``."""
    dtype = hidden_states[0].dtype
    cdtype = compute_dtype(dtype)
    prefix = spec.num_prefix_tokens
    x = torch.cat([h[:, prefix:, :] for h in hidden_states], dim=-1).to(cdtype)
    channels = x.shape[-1]
    x = x.transpose(1, 2).reshape(spec.batch, channels, spec.height, spec.width)
    z = F.conv2d(
        x,
        weight.to(cdtype),
        None if bias is None else bias.to(cdtype),
        padding=spec.kernel_size // 2,
        groups=channels,
    )
    if spec.residual:
        z = z + x
    if spec.pool == "avg":
        y = F.avg_pool2d(z, kernel_size=2, stride=2, ceil_mode=True)
    else:
        y = F.max_pool2d(z, kernel_size=2, stride=2, ceil_mode=True)
    return y.flatten(2).transpose(1, 2).to(dtype)
