"""Backward Triton kernel of the fused op (see ``shared.py`` for the layout and the tiling).

With ``g_z`` the gradient at the conv output (``g_y / count`` for avg, ``g_y`` at the argmax
the forward saved for max, zero outside the grid),

    grad_x[i, j]  = residual * g_z[i, j] + sum_{u,v} w[u, v] * g_z[i - u + p, j - v + p]
    grad_w[u, v]  = sum_{b,i,j} g_z[i, j] * x[i + u - p, j + v - p]
    grad_bias     = sum_{b, windows} g_y

A program owns the same window tile as in the forward and writes the four grad_x positions of
each window. Weight and bias gradients are written as per-program partial sums, one row per
program along axis 0, which the caller reduces in a fixed order (bitwise reproducible).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .shared import (LaunchConfig, acc_dtype, conv_tap, launch_config, pick, program_tile,
                     window_extent, x_tile)


@triton.jit
def _grad_z(gy_base, gy_stride_t, am_base, wi, wj, py: tl.constexpr, px: tl.constexpr, wc, KC,
            H, W, OW, p_mask, c_mask, POOL_MAX: tl.constexpr, ACC: tl.constexpr):
    """g_z at grid position (2*wi + py, 2*wj + px): the pool's gradient routed back to z.

    Zero where that position lies outside the grid (then its window may not exist either).
    """
    row = 2 * wi + py
    col = 2 * wj + px
    ok = p_mask & (row >= 0) & (row < H) & (col >= 0) & (col < W)
    m = ok[:, None] & c_mask[None, :]
    widx = (wi * OW + wj).to(tl.int64)
    g = tl.load(gy_base + widx[:, None] * gy_stride_t + wc[None, :], mask=m, other=0.0).to(ACC)
    if POOL_MAX:
        code = tl.load(am_base + widx[:, None] * KC + wc[None, :], mask=m, other=255)
        g = tl.where(code.to(tl.int32) == py * 2 + px, g, 0.0)
    else:
        _, _, count = window_extent(wi, wj, H, W)
        g = g / count.to(ACC)[:, None]
    return g


@triton.jit
def _store_grad_x(gx_base, gx, prefix, row, col, H, W, C, c, p_mask, c_mask):
    ok = p_mask & (row < H) & (col < W)
    tok = (prefix + row * W + col).to(tl.int64)
    tl.store(gx_base + tok[:, None] * C + c[None, :], gx.to(gx_base.dtype.element_ty),
             mask=ok[:, None] & c_mask[None, :])


@triton.jit
def fused_aggregate_bwd_kernel(
    gy_ptr, gy_stride_b, gy_stride_t,
    argmax_ptr,
    x_ptrs, x_stride_b, x_stride_t,
    w_ptr,
    gx_ptrs, gx_stride_b,
    gw_part_ptr, gb_part_ptr,
    C, H, W, OW, n_windows, prefix,
    KSIZE: tl.constexpr, NUM_LAYERS: tl.constexpr,
    RESIDUAL: tl.constexpr, POOL_MAX: tl.constexpr,
    NEED_X: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr, ACC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    PAD: tl.constexpr = KSIZE // 2
    KC = NUM_LAYERS * C
    pid0, layer, b, p, c, p_mask, c_mask, oi, oj = program_tile(C, OW, n_windows, BLOCK_P,
                                                                BLOCK_C)
    wc = layer * C + c
    gy_base = gy_ptr + b * gy_stride_b
    am_base = argmax_ptr + b * n_windows * KC

    if NEED_X:
        # grad_x at the 4 positions (dy, dx) of each window gathers g_z from the positions
        # (sy, sx) in [-p, p+1]^2 around the window's top-left corner through the tap
        # w[dy - sy + p, dx - sx + p] (a transposed conv); the residual at (sy, sx) = (dy, dx).
        gx00 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        gx01 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        gx10 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        gx11 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        for sy_i in tl.static_range(KSIZE + 1):
            for sx_i in tl.static_range(KSIZE + 1):
                # (sy, sx) = (sy_i - PAD, sx_i - PAD) lies in window (oi + sy // 2, oj + sx // 2)
                gz = _grad_z(gy_base, gy_stride_t, am_base,
                             oi + (sy_i - PAD) // 2, oj + (sx_i - PAD) // 2,
                             (sy_i - PAD) % 2, (sx_i - PAD) % 2, wc, KC, H, W, OW,
                             p_mask, c_mask, POOL_MAX, ACC)
                u0 = 2 * PAD - sy_i
                v0 = 2 * PAD - sx_i
                gx00 = conv_tap(gx00, gz, w_ptr, wc, c_mask, KC, u0, v0, KSIZE, RESIDUAL, ACC)
                gx01 = conv_tap(gx01, gz, w_ptr, wc, c_mask, KC, u0, v0 + 1, KSIZE, RESIDUAL,
                                ACC)
                gx10 = conv_tap(gx10, gz, w_ptr, wc, c_mask, KC, u0 + 1, v0, KSIZE, RESIDUAL,
                                ACC)
                gx11 = conv_tap(gx11, gz, w_ptr, wc, c_mask, KC, u0 + 1, v0 + 1, KSIZE,
                                RESIDUAL, ACC)
        gx_base = pick(gx_ptrs, layer, NUM_LAYERS) + b * gx_stride_b
        _store_grad_x(gx_base, gx00, prefix, 2 * oi, 2 * oj, H, W, C, c, p_mask, c_mask)
        _store_grad_x(gx_base, gx01, prefix, 2 * oi, 2 * oj + 1, H, W, C, c, p_mask, c_mask)
        _store_grad_x(gx_base, gx10, prefix, 2 * oi + 1, 2 * oj, H, W, C, c, p_mask, c_mask)
        _store_grad_x(gx_base, gx11, prefix, 2 * oi + 1, 2 * oj + 1, H, W, C, c, p_mask, c_mask)

    if NEED_W:
        gz00 = _grad_z(gy_base, gy_stride_t, am_base, oi, oj, 0, 0, wc, KC, H, W, OW, p_mask,
                       c_mask, POOL_MAX, ACC)
        gz01 = _grad_z(gy_base, gy_stride_t, am_base, oi, oj, 0, 1, wc, KC, H, W, OW, p_mask,
                       c_mask, POOL_MAX, ACC)
        gz10 = _grad_z(gy_base, gy_stride_t, am_base, oi, oj, 1, 0, wc, KC, H, W, OW, p_mask,
                       c_mask, POOL_MAX, ACC)
        gz11 = _grad_z(gy_base, gy_stride_t, am_base, oi, oj, 1, 1, wc, KC, H, W, OW, p_mask,
                       c_mask, POOL_MAX, ACC)
        x_base = pick(x_ptrs, layer, NUM_LAYERS) + b * pick(x_stride_b, layer, NUM_LAYERS)
        st = pick(x_stride_t, layer, NUM_LAYERS)
        part = pid0.to(tl.int64) * (KSIZE * KSIZE) * KC
        for u in tl.static_range(KSIZE):
            for v in tl.static_range(KSIZE):
                r0 = 2 * oi + (u - PAD)
                c0 = 2 * oj + (v - PAD)
                prod = gz00 * x_tile(x_base, st, prefix, r0, c0, H, W, c, p_mask, c_mask, ACC)
                prod += gz01 * x_tile(x_base, st, prefix, r0, c0 + 1, H, W, c, p_mask, c_mask,
                                      ACC)
                prod += gz10 * x_tile(x_base, st, prefix, r0 + 1, c0, H, W, c, p_mask, c_mask,
                                      ACC)
                prod += gz11 * x_tile(x_base, st, prefix, r0 + 1, c0 + 1, H, W, c, p_mask,
                                      c_mask, ACC)
                tl.store(gw_part_ptr + part + (u * KSIZE + v) * KC + wc, tl.sum(prod, axis=0),
                         mask=c_mask)

    if NEED_B:
        g = tl.load(gy_base + p.to(tl.int64)[:, None] * gy_stride_t + wc[None, :],
                    mask=p_mask[:, None] & c_mask[None, :], other=0.0).to(ACC)
        tl.store(gb_part_ptr + pid0.to(tl.int64) * KC + wc, tl.sum(g, axis=0), mask=c_mask)


def bwd_launch(spec, grad_out: torch.Tensor, layers: Sequence[torch.Tensor],
               weight: torch.Tensor, argmax: Optional[torch.Tensor],
               grad_layers: Sequence[torch.Tensor], weight_parts: Optional[torch.Tensor],
               bias_parts: Optional[torch.Tensor], cfg: LaunchConfig):
    """(grid, runtime args, constexprs) of the backward kernel. Unneeded outputs are None
    (or empty, for ``grad_layers``)."""
    unused = grad_out  # any pointer: the kernel never touches an output it was told to skip
    grid = (spec.batch * triton.cdiv(spec.out_tokens, cfg.block_p),
            triton.cdiv(spec.channels, cfg.block_c), spec.num_layers)
    args = (
        grad_out, grad_out.stride(0), grad_out.stride(1),
        argmax if argmax is not None else unused,
        tuple(layers), tuple(x.stride(0) for x in layers), tuple(x.stride(1) for x in layers),
        weight,
        tuple(grad_layers) if grad_layers else (unused,) * spec.num_layers,
        spec.tokens * spec.channels,
        weight_parts if weight_parts is not None else unused,
        bias_parts if bias_parts is not None else unused,
        spec.channels, spec.height, spec.width, spec.out_width, spec.out_tokens,
        spec.num_prefix_tokens,
    )
    consts = dict(
        KSIZE=spec.kernel_size, NUM_LAYERS=spec.num_layers, RESIDUAL=spec.residual,
        POOL_MAX=spec.pool == "max", NEED_X=bool(grad_layers), NEED_W=weight_parts is not None,
        NEED_B=bias_parts is not None, ACC=acc_dtype(layers[0].dtype), BLOCK_P=cfg.block_p,
        BLOCK_C=cfg.block_c,
    )
    return grid, args, consts


def partial_rows(spec, cfg: LaunchConfig) -> int:
    """Rows of the weight/bias partial sums: one per (image, tile of windows)."""
    return spec.batch * triton.cdiv(spec.out_tokens, cfg.block_p)


def fused_aggregate_bwd(spec, needs, grad_out: torch.Tensor, layers: Sequence[torch.Tensor],
                        weight: torch.Tensor, argmax: Optional[torch.Tensor],
                        grad_layers: Sequence[torch.Tensor]):
    """Write ``grad_layers`` (contiguous [B, T, C]; empty when not needed) and return the
    weight partial sums [rows, k*k, K*C] and bias partial sums [rows, K*C] in the compute
    dtype, each None when ``needs`` does not ask for it.

    ``grad_out`` and ``layers``: channel stride 1; ``weight``: [k*k, K*C] in the compute dtype;
    ``argmax``: contiguous, for max pooling.
    """
    cfg = launch_config(spec.out_tokens, spec.channels)
    rows = partial_rows(spec, cfg)
    acc = weight.dtype
    weight_parts = (grad_out.new_empty((rows, spec.taps, spec.out_channels), dtype=acc)
                    if needs.weight else None)
    bias_parts = grad_out.new_empty((rows, spec.out_channels), dtype=acc) if needs.bias else None
    grid, args, consts = bwd_launch(spec, grad_out, layers, weight, argmax, grad_layers,
                                    weight_parts, bias_parts, cfg)
    fused_aggregate_bwd_kernel[grid](*args, **consts, num_warps=cfg.num_warps)
    return weight_parts, bias_parts
