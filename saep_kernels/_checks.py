"""Argument checking for ``fused_aggregate``: done once, at the public boundary.

Every error names the argument and states the expected versus the given value, so a user
who passes the wrong layer list or the wrong depthwise weight sees what to fix.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from .spec import FLOAT_DTYPES, KERNEL_SIZES, POOL_MODES, AggregateSpec


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _square_side(n) -> Optional[int]:
    """The side of a square of n cells, or None. Written with operations Dynamo traces on a
    SymInt too (torch.compile with dynamic shapes), where math.isqrt does not."""
    approx = int(math.sqrt(n)) if n > 0 else 0
    for side in (approx - 1, approx, approx + 1):  # float rounding is at most one off
        if side >= 0 and side * side == n:
            return side
    return None


def resolve_grid(grid, tokens: int, num_prefix_tokens: int) -> Tuple[int, int]:
    """(H, W) from ``grid`` or, when it is None, the square grid of the non-prefix tokens."""
    patch_tokens = tokens - num_prefix_tokens
    if grid is None:
        side = _square_side(patch_tokens)
        if side is None or side == 0:
            raise ValueError(
                f"grid=None needs a square number of patch tokens, but hidden_states have "
                f"T - num_prefix_tokens = {tokens} - {num_prefix_tokens} = {patch_tokens}; "
                f"pass grid=(H, W) explicitly"
            )
        return side, side
    if not isinstance(grid, (tuple, list)) or len(grid) != 2 or not all(_is_int(g) for g in grid):
        raise TypeError(f"grid must be None or a pair of ints (H, W), got {grid!r}")
    height, width = int(grid[0]), int(grid[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"grid must be positive, got grid=({height}, {width})")
    if height * width != patch_tokens:
        raise ValueError(
            f"grid=({height}, {width}) holds {height * width} tokens but hidden_states have "
            f"T - num_prefix_tokens = {tokens} - {num_prefix_tokens} = {patch_tokens}"
        )
    return height, width


def check_options(residual, pool) -> None:
    """``residual`` and ``pool``, as every variant of the op takes them."""
    if not isinstance(residual, bool):
        raise TypeError(f"residual must be a bool, got {residual!r}")
    if pool not in POOL_MODES:
        raise ValueError(f"pool must be one of {POOL_MODES}, got {pool!r}")


def check_weight_and_bias(weight, bias, num_layers: int, channels: int,
                          device: torch.device) -> int:
    """The depthwise weight [K*C, 1, k, k] and the bias [K*C] or None, on ``device``; returns
    the kernel size k."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if weight.device != device:
        raise ValueError(
            f"weight must be on the device of hidden_states ({device}), got {weight.device}"
        )
    if weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3]:
        raise ValueError(
            f"weight must have shape [K*C, 1, k, k] (a depthwise nn.Conv2d weight), "
            f"got {tuple(weight.shape)}"
        )
    kernel_size = int(weight.shape[2])
    if kernel_size % 2 == 0:
        raise ValueError(
            f"weight must have an odd kernel size k in {KERNEL_SIZES}, got an even k={kernel_size}"
        )
    if kernel_size not in KERNEL_SIZES:
        raise ValueError(f"weight kernel size k must be one of {KERNEL_SIZES}, got k={kernel_size}")
    if weight.shape[0] != num_layers * channels:
        raise ValueError(
            f"weight must have K*C = {num_layers}*{channels} = {num_layers * channels} channels "
            f"(dim 0), got {weight.shape[0]}"
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be None or a torch.Tensor, got {type(bias).__name__}")
        if not bias.is_floating_point():
            raise TypeError(f"bias must be a floating-point tensor, got {bias.dtype}")
        if bias.device != device:
            raise ValueError(
                f"bias must be on the device of hidden_states ({device}), got {bias.device}"
            )
        if tuple(bias.shape) != (num_layers * channels,):
            raise ValueError(
                f"bias must have shape [K*C] = [{num_layers * channels}], got {tuple(bias.shape)}"
            )
    return kernel_size


def check_inputs(
    hidden_states: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    grid,
    num_prefix_tokens: int,
    residual: bool,
    pool: str,
) -> AggregateSpec:
    """Validate the arguments of ``fused_aggregate`` and return the call's spec."""
    if isinstance(hidden_states, torch.Tensor) or not isinstance(hidden_states, (list, tuple)):
        raise TypeError(
            "hidden_states must be a list or tuple of K tensors of shape [B, T, C], "
            f"got {type(hidden_states).__name__}"
        )
    if len(hidden_states) == 0:
        raise ValueError("hidden_states must hold at least one tensor, got an empty sequence")
    first = hidden_states[0]
    for i, h in enumerate(hidden_states):
        if not isinstance(h, torch.Tensor):
            raise TypeError(f"hidden_states[{i}] must be a torch.Tensor, got {type(h).__name__}")
        if h.dim() != 3:
            raise ValueError(
                f"hidden_states[{i}] must have shape [B, T, C], got {tuple(h.shape)}"
            )
        if h.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"hidden_states[{i}] must be float16, bfloat16, float32 or float64, got {h.dtype}"
            )
        if h.dtype != first.dtype:
            raise TypeError(
                f"hidden_states must share one dtype: hidden_states[0] is {first.dtype}, "
                f"hidden_states[{i}] is {h.dtype}"
            )
        if h.device != first.device:
            raise ValueError(
                f"hidden_states must share one device: hidden_states[0] is on {first.device}, "
                f"hidden_states[{i}] is on {h.device}"
            )
        if h.shape != first.shape:
            raise ValueError(
                f"hidden_states must share one shape [B, T, C]: hidden_states[0] is "
                f"{tuple(first.shape)}, hidden_states[{i}] is {tuple(h.shape)}"
            )
    tokens, channels = int(first.shape[1]), int(first.shape[2])
    num_layers = len(hidden_states)
    if channels == 0:
        raise ValueError("hidden_states must have at least one channel (C >= 1), got shape "
                         f"{tuple(first.shape)}")
    if tokens == 0:
        raise ValueError("hidden_states must have at least one token (T = num_prefix_tokens + "
                         f"H*W >= 1), got shape {tuple(first.shape)}")

    if not _is_int(num_prefix_tokens) or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
    if num_prefix_tokens >= tokens:
        raise ValueError(
            f"num_prefix_tokens must be smaller than the token count T={tokens}, "
            f"got {num_prefix_tokens}"
        )
    check_options(residual, pool)
    check_weight_and_bias(weight, bias, num_layers, channels, first.device)

    height, width = resolve_grid(grid, tokens, num_prefix_tokens)
    return AggregateSpec.of(hidden_states, weight, height=height, width=width,
                            num_prefix_tokens=num_prefix_tokens, residual=residual, pool=pool)
