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

Packed grids (``fused_aggregate_varlen``, ``VARLEN``): the images of different grids are one
packed row of tokens ([1, N, C]) and of outputs; every program reads its image's grid and
offsets from the image table (``image_geometry``) where a fixed grid computes them from the
program id, and the rest of each kernel is the same code. The window-tiled kernels
(``program_tile``) take a tile table built on the host (``tile_table``: image, first window of
each tile; each image's windows in tiles of their own, so no tile spans two images and none is
padding) and copied with the image table in one non-blocking copy (``packed_grids``): an O(1)
lookup per program, no search, no synchronisation. The tables are the kernels' last arguments
and ``VARLEN`` is a constexpr, so the fixed-grid kernels compile as without them.

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
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from saep_kernels.varlen import IMAGE_FIELDS as _FIELDS

# the image table's columns (csrc/fused_aggregate.h ImageField), as the kernels index them
IMAGE_FIELDS = tl.constexpr(len(_FIELDS))
IMAGE_HEIGHT = tl.constexpr(_FIELDS.index("height"))
IMAGE_WIDTH = tl.constexpr(_FIELDS.index("width"))
IMAGE_FIRST_TOKEN = tl.constexpr(_FIELDS.index("first_token"))
IMAGE_FIRST_WINDOW = tl.constexpr(_FIELDS.index("first_window"))


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


class PackedGrids(NamedTuple):
    """Packed grids as the kernels take them, on their device: the image table [n, 4] and the
    tile table [tiles, 2] (``tile_table``), views of one buffer; the largest image's windows."""
    images: torch.Tensor
    tiles: torch.Tensor
    max_windows: int

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_tiles(self) -> int:
        return int(self.tiles.shape[0])


def image_windows(images: torch.Tensor) -> torch.Tensor:
    """The pooling windows of each image of a host image table (ceil mode)."""
    return ((images[:, 0] + 1) // 2) * ((images[:, 1] + 1) // 2)


def tile_table(images: torch.Tensor, block_p: int) -> torch.Tensor:
    """The window tiles of packed grids, int64 [tiles, 2] on the host: (image, its first
    window) of each tile of ``block_p`` windows, image by image, ``ceil(windows_i / block_p)``
    tiles for image i (as flash-attention's varlen kernels map their blocks to sequences): no
    tile spans two images and none is padding. Vectorised over the images."""
    tiles = (image_windows(images) + block_p - 1) // block_p
    image = torch.repeat_interleave(torch.arange(len(images)), tiles)
    first_tile = torch.repeat_interleave(torch.cumsum(tiles, 0) - tiles, tiles)
    return torch.stack([image, (torch.arange(len(image)) - first_tile) * block_p], 1)


def packed_grids(images: torch.Tensor, block_p: int, device: torch.device) -> PackedGrids:
    """The host image table and its tile table for tiles of ``block_p`` windows, on
    ``device`` by one copy (from pinned memory: it does not wait for the device)."""
    tiles = tile_table(images, block_p)
    buffer = torch.cat([images.reshape(-1), tiles.reshape(-1)])
    if device.type == "cuda":
        buffer = buffer.pin_memory().to(device, non_blocking=True)
    n = images.shape[0] * images.shape[1]
    return PackedGrids(buffer[:n].view(images.shape), buffer[n:].view(tiles.shape),
                       int(image_windows(images).max()))


def packed_launch(images: torch.Tensor, channels: int, element_size: int,
                  device: torch.device) -> Tuple[LaunchConfig, PackedGrids]:
    """The fixed tiles of packed grids (``launch_config`` for the largest image) and their
    tables on ``device``."""
    cfg = launch_config(int(image_windows(images).max()), channels, element_size)
    return cfg, packed_grids(images, cfg.block_p, device)


def geometry_args(spec, packed: Optional[PackedGrids],
                  unused: torch.Tensor) -> Tuple[tuple, tuple]:
    """The kernels' image arguments: (``C, H, W, OW, n_windows, prefix``, ``images_ptr,
    tiles_ptr``): the call's grid (``spec`` an ``AggregateSpec``; the tables unused, any
    pointer), or the packed grids' tables (the grid arguments unused). The tables come last
    in the kernels' signatures, so the fixed grid's other arguments keep their places."""
    if packed is None:
        return ((spec.channels, spec.height, spec.width, spec.out_width, spec.out_tokens,
                 spec.num_prefix_tokens), (unused, unused))
    return (spec.channels, 0, 0, 0, 0, 0), (packed.images, packed.tiles)


def window_tiles(spec, packed: Optional[PackedGrids], block_p: int) -> int:
    """Programs along axis 0 of the window-tiled kernels (``program_tile``)."""
    return spec.batch * triton.cdiv(spec.out_tokens, block_p) if packed is None \
        else packed.num_tiles


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
def image_geometry(i, H, W, OW, n_windows, prefix, images_ptr, VARLEN: tl.constexpr):
    """Image i of the call: (b, H, W, OW, windows, token0, window0), the batch row its tokens
    and outputs are in, its grid, its windows, the token of its pixel (0, 0) within that row
    and the output token of its window (0, 0) within that row.

    Fixed grid: image i is batch row i, every image the call's grid (token0 = prefix,
    window0 = 0). Packed grids (``VARLEN``): every image is in the one packed row b = 0, its
    grid and offsets from row i of the image table (``images_ptr``, int64 [n, 4], the columns
    of ``saep_kernels.varlen.IMAGE_FIELDS``); the call's H, W, OW, n_windows, prefix are
    unused."""
    if VARLEN:
        row = images_ptr + i.to(tl.int64) * IMAGE_FIELDS
        H = tl.load(row + IMAGE_HEIGHT).to(tl.int32)
        W = tl.load(row + IMAGE_WIDTH).to(tl.int32)
        token0 = tl.load(row + IMAGE_FIRST_TOKEN)
        window0 = tl.load(row + IMAGE_FIRST_WINDOW)
        OW = (W + 1) // 2
        n_windows = ((H + 1) // 2) * OW
        b = tl.zeros([], dtype=tl.int64)
    else:
        b = i.to(tl.int64)
        token0 = prefix
        window0 = 0
    return b, H, W, OW, n_windows, token0, window0


@triton.jit
def program_tile(C, H, W, OW, n_windows, prefix, images_ptr, tiles_ptr, VARLEN: tl.constexpr,
                 BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's share of the work, the same in the forward and the backward:
    axis 0 = a tile of BLOCK_P windows of one image, axis 1 = block of BLOCK_C channels,
    axis 2 = layer. Fixed grid: tile pid0 is tile pid0 % tiles of image pid0 // tiles (tiles
    = ceil(windows / BLOCK_P) per image). Packed grids: row pid0 of the tile table
    (``tiles_ptr``, int64 [tiles, 2]: image, first window; ``tile_table``), so the tiles of
    each image follow one another and none spans two images.
    Returns (layer, the image's b, H, W, OW, windows, token0, window0 (``image_geometry``),
    window ids, channels, masks, window rows/cols)."""
    pid0 = tl.program_id(0)
    layer = tl.program_id(2)
    if VARLEN:
        image = tl.load(tiles_ptr + 2 * pid0.to(tl.int64))
        first = tl.load(tiles_ptr + 2 * pid0.to(tl.int64) + 1).to(tl.int32)
    else:
        n_window_tiles = tl.cdiv(n_windows, BLOCK_P)
        image = pid0 // n_window_tiles
        first = (pid0 % n_window_tiles) * BLOCK_P
    b, H, W, OW, n_windows, token0, window0 = image_geometry(image, H, W, OW, n_windows, prefix,
                                                             images_ptr, VARLEN)
    p = first + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return (layer, b, H, W, OW, n_windows, token0, window0, p, c, p < n_windows, c < C,
            p // OW, p % OW)


@triton.jit
def window_extent(oi, oj, H, W):
    """(has a second row, has a second column, in-grid positions) of window (oi, oj): the
    last row/column of windows of an odd grid is partial (ceil mode)."""
    has_down = (2 * oi + 1) < H
    has_right = (2 * oj + 1) < W
    return has_down, has_right, tl.where(has_down, 2, 1) * tl.where(has_right, 2, 1)


@triton.jit
def x_tile(base, stride_t, token0, row, col, H, W, c, p_mask, c_mask, ACC: tl.constexpr):
    """x[row, col, c] for a tile of grid positions (zero outside the grid), as ACC; pixel
    (0, 0) is token ``token0``."""
    ok = p_mask & (row >= 0) & (row < H) & (col >= 0) & (col < W)
    tok = (token0 + row * W + col).to(tl.int64)
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
