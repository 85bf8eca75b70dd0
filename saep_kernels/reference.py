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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic runs in: fp32 for fp16/bf16/fp32, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    geo = check_inputs(hidden_states, weight, bias, grid, num_prefix_tokens, residual, pool)
    return _reference_unchecked(hidden_states, weight, bias, geo.height, geo.width,
                                num_prefix_tokens, residual, pool)


def _reference_unchecked(hidden_states, weight, bias, height, width, num_prefix_tokens,
                         residual, pool):
    dtype = hidden_states[0].dtype
    cdtype = compute_dtype(dtype)
    batch = hidden_states[0].shape[0]
    x = torch.cat([h[:, num_prefix_tokens:, :] for h in hidden_states], dim=-1).to(cdtype)
    channels = x.shape[-1]
    x = x.transpose(1, 2).reshape(batch, channels, height, width)
    kernel_size = weight.shape[-1]
    z = F.conv2d(
        x,
        weight.to(cdtype),
        None if bias is None else bias.to(cdtype),
        padding=kernel_size // 2,
        groups=channels,
    )
    if residual:
        z = z + x
    if pool == "avg":
        y = F.avg_pool2d(z, kernel_size=2, stride=2, ceil_mode=True)
    else:
        y = F.max_pool2d(z, kernel_size=2, stride=2, ceil_mode=True)
    return y.flatten(2).transpose(1, 2).to(dtype)
