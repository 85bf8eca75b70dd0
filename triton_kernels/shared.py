"""What the forward and backward Triton kernels of the fused op share: the program tile, the
index helpers, the launch tiles.

The op (docs/op.md): K layers ``x_l`` of shape [B, T, C] are read in place (one pointer and
one batch/token stride pair per layer, channel stride 1, no concat), the tokens after
``prefix`` form an H x W grid, channel ``l*C + c`` of the virtual concat is channel c of layer
l, and

    z = dwconv_k(x) + bias (+ x if residual),     y = pool_2x2_ceil(z)   -> [B, Ho*Wo, K*C]

Tiling: a program owns BLOCK_P pooling windows (flattened ``oi*Wo + oj``) of one image and
BLOCK_C channels of one layer. Tiles are channel-contiguous so loads and stores coalesce and
vectorise (the channel stride is 1): the default tiles give each thread one window and 16
bytes of channels (8 x bf16/fp16, 4 x fp32). All offsets are int64. The weight comes
tap-major, ``w[(u*k + v) * K*C + l*C + c]`` in the compute dtype, so a tap's channels are
contiguous.

Registers. The loops over the kernel's taps are runtime loops: one flat loop over the taps
whose trip count comes from ``ksize``, the kernel size passed again as a runtime value
(``trip_count``), with ``loop_unroll_factor=1`` (a loop with a constant trip count is unrolled
by LLVM all the same).
Unrolled, the compiler issues every tap's loads up front and a thread holds them all (180-255
registers and spills at k=7); as a loop, a thread holds one tap's operands and its
accumulators, and the forward's tiles stay within 64 registers (half the warps of an SM
resident). ``scripts/gpu_resources.py`` checks this offline.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def acc_dtype(dtype: torch.dtype):
    """The Triton type arithmetic runs in for inputs of ``dtype``."""
    return tl.float64 if dtype == torch.float64 else tl.float32


class LaunchConfig(NamedTuple):
    block_p: int
    block_c: int
    num_warps: int


def launch_config(n_windows: int, channels: int, element_size: int,
                  interpret: Optional[bool] = None) -> LaunchConfig:
    """Tile sizes for a problem of inputs with ``element_size`` bytes: 16 windows by 16 bytes
    of channels a thread (4 warps), smaller for small problems. In the interpreter, which pays
    per program and per op rather than per element, big tiles."""
    if interpret if interpret is not None else interpreting():
        return LaunchConfig(min(triton.next_power_of_2(n_windows), 64),
                            min(triton.next_power_of_2(channels), 128), 1)
    return LaunchConfig(min(triton.next_power_of_2(n_windows), 16),
                        min(triton.next_power_of_2(channels), 8 * 16 // element_size), 4)


def channel_alignment(channels: int, element_size: int, tensors, strides) -> int:
    """Channels in a 16-byte vector when the channel count, every stride (elements) and every
    tensor's address allow 16-byte accesses at each token's channel run, else 1. The kernels
    pass it to the compiler (``aligned``), which cannot see it when C is not a multiple of 16
    (Triton marks only ints divisible by 16)."""
    vec = 16 // element_size
    ok = (channels % vec == 0 and all(s % vec == 0 for s in strides)
          and all(t.data_ptr() % 16 == 0 for t in tensors))
    return vec if ok else 1


@triton.jit
def aligned(value, CH_ALIGN: tl.constexpr):
    """``value`` (a channel count or a stride, in elements, a multiple of CH_ALIGN) rewritten as
    ``(value // CH_ALIGN) * CH_ALIGN``: the same number, whose divisibility the compiler reads
    off the product (``tl.multiple_of`` marks nothing on a kernel argument)."""
    if CH_ALIGN > 1:
        value = (value // CH_ALIGN) * CH_ALIGN
    return value


@triton.jit
def trip_count(runtime_value, constant: tl.constexpr, INTERPRET: tl.constexpr):
    """The trip count of a loop kept rolled: ``runtime_value``, an int known at run time only,
    on a GPU (LLVM unrolls a loop whose trip count is a constant, whatever loop_unroll_factor
    says); ``constant``, the same number, in the CPU interpreter (Triton 3.6's cannot take a
    run-time value as a loop bound with numpy >= 2.4)."""
    if INTERPRET:
        return constant
    return runtime_value


@triton.jit
def pick(values, index, N: tl.constexpr):
    """values[index] for a tuple of N scalars (pointers or ints) and a runtime index."""
    out = values[0]
    for i in tl.static_range(1, N):
        out = tl.where(index == i, values[i], out)
    return out


@triton.jit
def program_tile(C, OW, n_windows, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's share of the work, the same in the forward and the backward:
    axis 0 = (image b, tile of BLOCK_P windows), axis 1 = block of BLOCK_C channels,
    axis 2 = layer. Returns (pid0, layer, b, window ids, channels, masks, window rows/cols)."""
    n_window_tiles = tl.cdiv(n_windows, BLOCK_P)
    pid0 = tl.program_id(0)
    layer = tl.program_id(2)
    b = (pid0 // n_window_tiles).to(tl.int64)
    p = (pid0 % n_window_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return pid0, layer, b, p, c, p < n_windows, c < C, p // OW, p % OW


@triton.jit
def window_extent(oi, oj, H, W):
    """(has a second row, has a second column, in-grid positions) of window (oi, oj): the
    last row/column of windows of an odd grid is partial (ceil mode)."""
    has_down = (2 * oi + 1) < H
    has_right = (2 * oj + 1) < W
    return has_down, has_right, tl.where(has_down, 2, 1) * tl.where(has_right, 2, 1)


@triton.jit
def x_tile(base, stride_t, prefix, row, col, H, W, c, p_mask, c_mask, ACC: tl.constexpr):
    """x[row, col, c] for a tile of grid positions (zero outside the grid), as ACC."""
    ok = p_mask & (row >= 0) & (row < H) & (col >= 0) & (col < W)
    tok = (prefix + row * W + col).to(tl.int64)
    v = tl.load(base + tok[:, None] * stride_t + c[None, :], mask=ok[:, None] & c_mask[None, :],
                other=0.0)
    return v.to(ACC)


@triton.jit
def tap(w_ptr, wc, c_mask, KC, u, v, KSIZE: tl.constexpr, RESIDUAL: tl.constexpr):
    """Weight (u, v) of the tile's channels, zero when (u, v) is not a tap of the kernel; with
    ``RESIDUAL``, plus 1 at the centre (the residual is the identity tap)."""
    ok = (u >= 0) & (u < KSIZE) & (v >= 0) & (v < KSIZE)
    w = tl.load(w_ptr + (u * KSIZE + v) * KC + wc, mask=tl.where(ok, c_mask, False), other=0.0)
    if RESIDUAL:
        w += tl.where((u == KSIZE // 2) & (v == KSIZE // 2), 1.0, 0.0)
    return w
