"""Backward Triton kernels of the fused op (see ``shared.py`` for the layout and the tiling).

With ``g_z`` the gradient at the conv output (``g_y / count`` for avg, ``g_y`` at the argmax
the forward saved for max, zero outside the grid),

    grad_x[i, j]  = residual * g_z[i, j] + sum_{u,v} w[u, v] * g_z[i - u + p, j - v + p]
    grad_w[u, v]  = sum_{b,i,j} g_z[i, j] * x[i + u - p, j + v - p]
    grad_bias     = sum_{b, windows} g_y

Two kernels, each launched only when its gradients are needed (a frozen vision tower runs the
second alone):

* input gradients: a program owns the forward's window tile and writes the four pixels of
  each window, one after another, each a kxk transposed conv of g_z (runtime loops, as in the
  forward);
* weight and bias gradients: a program owns an image, a block of channels and a layer, and
  walks the image's windows and their positions in order; for each it loads x under all k*k
  taps at once (a [taps, channels] tile, one row per tap) and accumulates g_z * x into a
  [taps, channels] accumulator, so no reduction runs inside the loop. Each image writes one row
  of partial sums ([B, k*k, K*C] and [B, K*C]: the buffer grows with the batch, not with the
  tiles), which the caller sums in a fixed order: bitwise reproducible.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .shared import (PackedGrids, acc_dtype, aligned, channel_alignment, geometry_args,
                     image_geometry, interpreting, launch_config, packed_launch, pick,
                     program_tile, tap, trip_count, window_extent, window_tiles)


@triton.jit
def _grad_z(gy_base, gy_stride_t, am_base, row, col, wc, KC, H, W, OW, p_mask, c_mask,
            POOL_MAX: tl.constexpr, ACC: tl.constexpr):
    """g_z at grid positions (row, col) of a tile (zero outside the grid): the pool's gradient
    of their window, divided by the window's count (avg) or where its argmax points (max)."""
    ok = p_mask & (row >= 0) & (row < H) & (col >= 0) & (col < W)
    m = ok[:, None] & c_mask[None, :]
    wi = row // 2
    wj = col // 2
    widx = (wi * OW + wj).to(tl.int64)
    g = tl.load(gy_base + widx[:, None] * gy_stride_t + wc[None, :], mask=m, other=0.0).to(ACC)
    if POOL_MAX:
        code = tl.load(am_base + widx[:, None] * KC + wc[None, :], mask=m, other=255)
        g = tl.where(code.to(tl.int32) == ((row % 2) * 2 + col % 2)[:, None], g, 0.0)
    else:
        _, _, count = window_extent(wi, wj, H, W)
        g = g / count.to(ACC)[:, None]
    return g


@triton.jit
def fused_aggregate_bwd_input_kernel(
    gy_ptr, gy_stride_b, gy_stride_t,
    argmax_ptr,
    w_ptr,
    gx_ptrs, gx_stride_b,
    C, H, W, OW, n_windows, prefix, ksize,
    images_ptr, tiles_ptr,
    KSIZE: tl.constexpr, NUM_LAYERS: tl.constexpr,
    RESIDUAL: tl.constexpr, POOL_MAX: tl.constexpr, ACC: tl.constexpr,
    CH_ALIGN: tl.constexpr, VARLEN: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    PAD: tl.constexpr = KSIZE // 2
    C = aligned(C, CH_ALIGN)
    KC = NUM_LAYERS * C
    gy_stride_t = aligned(gy_stride_t, CH_ALIGN)
    (layer, b, H, W, OW, n_windows, token0, window0, p, c, p_mask, c_mask, oi,
     oj) = program_tile(C, H, W, OW, n_windows, prefix, images_ptr, tiles_ptr, VARLEN, BLOCK_P,
                        BLOCK_C)
    wc = layer * C + c
    gy_base = gy_ptr + b * aligned(gy_stride_b, CH_ALIGN) + window0 * gy_stride_t
    am_base = argmax_ptr + (b * n_windows + window0) * KC
    gx_base = pick(gx_ptrs, layer, NUM_LAYERS) + b * aligned(gx_stride_b, CH_ALIGN)
    for d in tl.range(4, loop_unroll_factor=1):
        i = 2 * oi + d // 2
        j = 2 * oj + d % 2
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        for t in tl.range(trip_count(ksize * ksize, KSIZE * KSIZE, INTERPRET),
                          loop_unroll_factor=1):
            u = t // KSIZE
            v = t % KSIZE
            gz = _grad_z(gy_base, gy_stride_t, am_base, i - u + PAD, j - v + PAD, wc, KC, H, W,
                         OW, p_mask, c_mask, POOL_MAX, ACC)
            acc += gz * tap(w_ptr, wc, c_mask, KC, u, v, KSIZE, RESIDUAL).to(ACC)[None, :]
        ok = p_mask & (i < H) & (j < W)
        tok = (token0 + i * W + j).to(tl.int64)
        tl.store(gx_base + tok[:, None] * C + c[None, :], acc.to(gx_base.dtype.element_ty),
                 mask=ok[:, None] & c_mask[None, :])


@triton.jit
def fused_aggregate_bwd_weight_kernel(
    gy_ptr, gy_stride_b, gy_stride_t,
    argmax_ptr,
    x_ptrs, x_stride_b, x_stride_t,
    gw_part_ptr, gb_part_ptr,
    C, H, W, OW, n_windows, prefix,
    images_ptr, tiles_ptr,
    KSIZE: tl.constexpr, NUM_LAYERS: tl.constexpr, POOL_MAX: tl.constexpr,
    NEED_W: tl.constexpr, NEED_B: tl.constexpr, ACC: tl.constexpr,
    CH_ALIGN: tl.constexpr, TAPS: tl.constexpr, BLOCK_C: tl.constexpr,
    VARLEN: tl.constexpr, INTERPRET: tl.constexpr, N_WINDOWS: tl.constexpr,
):
    PAD: tl.constexpr = KSIZE // 2
    C = aligned(C, CH_ALIGN)
    KC = NUM_LAYERS * C
    gy_stride_t = aligned(gy_stride_t, CH_ALIGN)
    image = tl.program_id(0)  # its row of the partial sums
    b, H, W, OW, n_windows, token0, window0 = image_geometry(image, H, W, OW, n_windows, prefix,
                                                             images_ptr, VARLEN)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    layer = tl.program_id(2)
    c_mask = c < C
    wc = layer * C + c
    t = tl.arange(0, TAPS)  # tap u*k + v of the kernel (rows past k*k are padding)
    u = t // KSIZE
    v = t % KSIZE
    t_mask = t < KSIZE * KSIZE
    gy_base = gy_ptr + b * aligned(gy_stride_b, CH_ALIGN) + window0 * gy_stride_t
    am_base = argmax_ptr + (b * n_windows + window0) * KC
    x_base = pick(x_ptrs, layer, NUM_LAYERS) + b * aligned(pick(x_stride_b, layer, NUM_LAYERS),
                                                           CH_ALIGN)
    stride_t = aligned(pick(x_stride_t, layer, NUM_LAYERS), CH_ALIGN)
    acc = tl.zeros([TAPS, BLOCK_C], dtype=ACC)
    bias_acc = tl.zeros([BLOCK_C], dtype=ACC)
    # one runtime loop over (window, position) pairs, the window's g_y reloaded (from L1) for
    # each of its four positions: a thread holds one x tile at a time
    for q in tl.range(trip_count(n_windows * 4, N_WINDOWS * 4, INTERPRET), loop_unroll_factor=1):
        w = q // 4
        d = q % 4
        live = c_mask
        if INTERPRET:  # the constant trip count covers the largest image: the rest idles
            # (compared as a block: the interpreter's load rejects a broadcast scalar mask)
            live = live & ((tl.zeros_like(c) + q) < n_windows * 4)
        g = tl.load(gy_base + w * gy_stride_t + wc, mask=live, other=0.0).to(ACC)
        if NEED_B:
            bias_acc += tl.where(d == 0, g, 0.0)
        if NEED_W:
            oi = w // OW
            oj = w % OW
            i = 2 * oi + d // 2
            j = 2 * oj + d % 2
            if POOL_MAX:
                code = tl.load(am_base + w * KC + wc, mask=live, other=255)
                gz = tl.where(code.to(tl.int32) == d, g, 0.0)
            else:
                _, _, count = window_extent(oi, oj, H, W)
                gz = g / count.to(ACC)
            rows = i + u - PAD
            cols = j + v - PAD
            # a partial window's missing pixel (i >= H or j >= W) takes no part: no 0 * x, x
            # may be Inf (the last two terms are i < H and j < W per tap)
            ok = (t_mask & (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)
                  & (rows < H + u - PAD) & (cols < W + v - PAD))
            tok = (token0 + rows * W + cols).to(tl.int64)
            xv = tl.load(x_base + tok[:, None] * stride_t + c[None, :],
                         mask=ok[:, None] & live[None, :], other=0.0).to(ACC)
            acc += xv * gz[None, :]
    if NEED_W:
        tl.store(gw_part_ptr + (image.to(tl.int64) * (KSIZE * KSIZE) + t[:, None]) * KC
                 + wc[None, :], acc, mask=t_mask[:, None] & c_mask[None, :])
    if NEED_B:
        tl.store(gb_part_ptr + image.to(tl.int64) * KC + wc, bias_acc, mask=c_mask)


def input_launch(spec, grad_out: torch.Tensor, argmax: Optional[torch.Tensor],
                 weight: torch.Tensor, grad_layers: Sequence[torch.Tensor], cfg,
                 packed: Optional[PackedGrids] = None):
    """(grid, runtime args, constexprs) of the input-gradient kernel, for the call's grid or
    for ``packed`` grids (tables for tiles of ``cfg.block_p`` windows)."""
    grid = (window_tiles(spec, packed, cfg.block_p), triton.cdiv(spec.channels, cfg.block_c),
            spec.num_layers)
    geometry = geometry_args(spec, packed, grad_out)
    args = (
        grad_out, grad_out.stride(0), grad_out.stride(1),
        argmax if argmax is not None else grad_out,
        weight,
        tuple(grad_layers), spec.tokens * spec.channels,
        *geometry[0], spec.kernel_size, *geometry[1],
    )
    tensors = [grad_out, weight, *grad_layers] + ([argmax] if argmax is not None else [])
    consts = dict(KSIZE=spec.kernel_size, NUM_LAYERS=spec.num_layers, RESIDUAL=spec.residual,
                  POOL_MAX=spec.pool == "max", ACC=acc_dtype(grad_layers[0].dtype),
                  CH_ALIGN=channel_alignment(spec.channels, grad_out.element_size(), tensors,
                                             [grad_out.stride(0), grad_out.stride(1)]),
                  VARLEN=packed is not None, INTERPRET=interpreting(), BLOCK_P=cfg.block_p,
                  BLOCK_C=cfg.block_c)
    return grid, args, consts


def weight_launch(spec, grad_out: torch.Tensor, argmax: Optional[torch.Tensor],
                  layers: Sequence[torch.Tensor], weight_parts: Optional[torch.Tensor],
                  bias_parts: Optional[torch.Tensor], cfg, packed: Optional[PackedGrids] = None):
    """(grid, runtime args, constexprs) of the weight/bias-gradient kernel, for the call's
    grid or for ``packed`` grids; an output not needed is None."""
    unused = grad_out  # any pointer: the kernel never touches an output it was told to skip
    taps = triton.next_power_of_2(spec.taps)
    # the [taps, channels] accumulator and x tile: at most 16 elements a thread each on a GPU
    block_c = cfg.block_c if interpreting() else min(cfg.block_c, 16 * 32 * cfg.num_warps // taps)
    images = spec.batch if packed is None else packed.num_images
    grid = (images, triton.cdiv(spec.channels, block_c), spec.num_layers)
    geometry = geometry_args(spec, packed, unused)
    args = (
        grad_out, grad_out.stride(0), grad_out.stride(1),
        argmax if argmax is not None else unused,
        tuple(layers), tuple(x.stride(0) for x in layers), tuple(x.stride(1) for x in layers),
        weight_parts if weight_parts is not None else unused,
        bias_parts if bias_parts is not None else unused,
        *geometry[0], *geometry[1],
    )
    tensors = [grad_out, *layers] + [t for t in (argmax, weight_parts, bias_parts) if t is not None]
    strides = [grad_out.stride(0), grad_out.stride(1)] + [
        st for x in layers for st in (x.stride(0), x.stride(1))]
    # the windows of the largest image, as a constant only where it bounds a loop (interpreter)
    max_windows = spec.out_tokens if packed is None else packed.max_windows
    consts = dict(KSIZE=spec.kernel_size, NUM_LAYERS=spec.num_layers,
                  POOL_MAX=spec.pool == "max", NEED_W=weight_parts is not None,
                  NEED_B=bias_parts is not None, ACC=acc_dtype(layers[0].dtype),
                  CH_ALIGN=channel_alignment(spec.channels, layers[0].element_size(), tensors,
                                             strides),
                  TAPS=taps, BLOCK_C=block_c, VARLEN=packed is not None,
                  INTERPRET=interpreting(), N_WINDOWS=max_windows if interpreting() else 0)
    return grid, args, consts


def fused_aggregate_bwd(spec, grad_out: torch.Tensor, layers: Sequence[torch.Tensor],
                        weight: torch.Tensor, argmax: Optional[torch.Tensor],
                        grad_layers: Sequence[torch.Tensor], weight_parts: Optional[torch.Tensor],
                        bias_parts: Optional[torch.Tensor],
                        images: Optional[torch.Tensor] = None) -> None:
    """Write the gradients asked for: ``grad_layers`` (contiguous [B, T, C]; empty when not
    needed) and the weight and bias partial sums ([B, k*k, K*C] and [B, K*C] in the compute
    dtype, one row per image; None when not needed).

    ``grad_out`` and ``layers``: channel stride 1; ``weight``: [k*k, K*C] in the compute dtype;
    ``argmax``: contiguous, for max pooling.

    Packed grids: ``spec`` a ``VarlenSpec``, ``images`` the host image table, ``grad_out``,
    ``argmax`` and ``grad_layers`` as the forward's out, argmax and layers; the partial sums
    [n, k*k, K*C] and [n, K*C], one row per image. One launch per kernel for all images.
    """
    size = layers[0].element_size()
    if images is not None:
        cfg, packed = packed_launch(images, spec.channels, size, grad_out.device)
    else:
        cfg, packed = launch_config(spec.out_tokens, spec.channels, size), None
    if grad_layers:
        grid, args, consts = input_launch(spec, grad_out, argmax, weight, grad_layers, cfg,
                                          packed)
        fused_aggregate_bwd_input_kernel[grid](*args, **consts, num_warps=cfg.num_warps)
    if weight_parts is not None or bias_parts is not None:
        grid, args, consts = weight_launch(spec, grad_out, argmax, layers, weight_parts,
                                           bias_parts, cfg, packed)
        fused_aggregate_bwd_weight_kernel[grid](*args, **consts, num_warps=cfg.num_warps)
