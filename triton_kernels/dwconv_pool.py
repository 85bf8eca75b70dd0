"""Triton kernels of the SAEP fused op: depthwise conv (+bias, +residual) and a 2x2 pool.

The op (docs/op.md): K layers ``x_l`` of shape [B, T, C] are read in place
(one pointer and one stride triple per layer, no concat), the tokens after ``prefix`` form an
H x W grid, channel ``l*C + c`` of the virtual concat is channel c of layer l, and

    z = dwconv_k(x) + bias (+ x if residual),     y = pool_2x2_ceil(z)   -> [B, Ho*Wo, K*C]

Tiling: a program owns BLOCK_P pooling windows (flattened ``oi*Wo + oj``) of one image and
BLOCK_C channels, and walks the K layers with ``tl.static_range``. Tiles are channel-contiguous
so loads and stores coalesce (and vectorise when the channel stride is 1, which Triton
specialises on). All offsets are int64.

Forward: each window needs the (k+1) x (k+1) input patch rows ``2*oi-p .. 2*oi+1+p``; every
patch element is loaded once and feeds the four conv outputs of the window (four
accumulators), so partial windows of odd grids are exact (the out-of-grid accumulators are
simply left out of the average / max).

Backward: with ``g_z`` the gradient at the conv output (``g_y / count`` for avg, ``g_y`` at
the argmax the forward saved for max, zero outside the grid),

    grad_x[i, j]  = residual * g_z[i, j] + sum_{u,v} w[u, v] * g_z[i - u + p, j - v + p]
    grad_w[u, v]  = sum_{b,i,j} g_z[i, j] * x[i + u - p, j + v - p]
    grad_bias     = sum_{b, windows} g_y

A program owns the same window tile as in the forward and writes the four grad_x positions of
each window. Weight and bias gradients are written as per-program partial sums and reduced
by the caller in a fixed order, so they are bitwise reproducible.
"""

from __future__ import annotations

import os
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

# --------------------------------------------------------------------------------------------
# shared index helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _pick(values, index, N: tl.constexpr):
    """values[index] for a tuple of N scalars (pointers or ints) and a runtime index."""
    out = values[0]
    for i in tl.static_range(1, N):
        out = tl.where(index == i, values[i], out)
    return out


@triton.jit
def _program_tile(C, OW, n_windows, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
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
def _x_tile(base, stride_t, prefix, row, col, H, W, c, p_mask, c_mask, ACC: tl.constexpr):
    """x[row, col, c] for a tile of grid positions (zero outside the grid), as ACC.
    The channel stride is 1 (the launcher guarantees it)."""
    ok = p_mask & (row >= 0) & (row < H) & (col >= 0) & (col < W)
    tok = (prefix + row * W + col).to(tl.int64)
    v = tl.load(base + tok[:, None] * stride_t + c[None, :], mask=ok[:, None] & c_mask[None, :],
                other=0.0)
    return v.to(ACC)


@triton.jit
def _conv_tap(acc, xv, w_ptr, wc, c_mask, w_stride_c, w_stride_u, w_stride_v,
              u: tl.constexpr, v: tl.constexpr, KSIZE: tl.constexpr, RESIDUAL: tl.constexpr,
              ACC: tl.constexpr):
    """acc += w[wc, 0, u, v] * xv when (u, v) is a tap of the kernel; + xv at the centre if
    residual. (u, v) are compile-time constants: taps outside the kernel generate no code."""
    if u >= 0:
        if u < KSIZE:
            if v >= 0:
                if v < KSIZE:
                    w = tl.load(w_ptr + wc.to(tl.int64) * w_stride_c + u * w_stride_u
                                + v * w_stride_v, mask=c_mask, other=0.0)
                    acc += xv * w.to(ACC)[None, :]
    if RESIDUAL:
        if u == KSIZE // 2:
            if v == KSIZE // 2:
                acc += xv
    return acc


@triton.jit
def _take_max(best, code, z, idx: tl.constexpr):
    """Running max in window order 00, 01, 10, 11; NaN wins (as in torch.max_pool2d)."""
    upd = (z > best) | (z != z)
    return tl.where(upd, z, best), tl.where(upd, idx, code)


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _dwconv_pool_fwd_kernel(
    x_ptrs, x_stride_b, x_stride_t,
    w_ptr, w_stride_c, w_stride_u, w_stride_v,
    bias_ptr,
    out_ptr, argmax_ptr,
    C, H, W, OW, n_windows, prefix,
    KSIZE: tl.constexpr, NUM_LAYERS: tl.constexpr,
    HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, POOL_MAX: tl.constexpr,
    SAVE_ARGMAX: tl.constexpr, ACC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    PAD: tl.constexpr = KSIZE // 2
    _, layer, b, p, c, p_mask, c_mask, oi, oj = _program_tile(C, OW, n_windows, BLOCK_P, BLOCK_C)
    has_down = (2 * oi + 1) < H
    has_right = (2 * oj + 1) < W
    wc = layer * C + c
    base = _pick(x_ptrs, layer, NUM_LAYERS) + b * _pick(x_stride_b, layer, NUM_LAYERS)
    stride_t = _pick(x_stride_t, layer, NUM_LAYERS)

    # The (k+1) x (k+1) patch of each window, each element loaded once, feeds the window's
    # four conv outputs z[2oi+dy, 2oj+dx] through tap (a - dy, e - dx).
    acc00 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    acc01 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    acc10 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    acc11 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    for a in tl.static_range(KSIZE + 1):
        row = 2 * oi + (a - PAD)
        for e in tl.static_range(KSIZE + 1):
            col = 2 * oj + (e - PAD)
            xv = _x_tile(base, stride_t, prefix, row, col, H, W, c, p_mask, c_mask, ACC)
            acc00 = _conv_tap(acc00, xv, w_ptr, wc, c_mask, w_stride_c, w_stride_u, w_stride_v,
                              a, e, KSIZE, RESIDUAL, ACC)
            acc01 = _conv_tap(acc01, xv, w_ptr, wc, c_mask, w_stride_c, w_stride_u, w_stride_v,
                              a, e - 1, KSIZE, RESIDUAL, ACC)
            acc10 = _conv_tap(acc10, xv, w_ptr, wc, c_mask, w_stride_c, w_stride_u, w_stride_v,
                              a - 1, e, KSIZE, RESIDUAL, ACC)
            acc11 = _conv_tap(acc11, xv, w_ptr, wc, c_mask, w_stride_c, w_stride_u, w_stride_v,
                              a - 1, e - 1, KSIZE, RESIDUAL, ACC)

    # Positions of a partial window (odd H or W) outside the grid take no part in the pool.
    if POOL_MAX:
        neg_inf = float("-inf")
        best = acc00
        code = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.int32)
        best, code = _take_max(best, code, tl.where(has_right[:, None], acc01, neg_inf), 1)
        best, code = _take_max(best, code, tl.where(has_down[:, None], acc10, neg_inf), 2)
        best, code = _take_max(best, code,
                               tl.where((has_down & has_right)[:, None], acc11, neg_inf), 3)
        y = best
    else:
        s = acc00 + tl.where(has_right[:, None], acc01, 0.0)
        s += tl.where(has_down[:, None], acc10, 0.0)
        s += tl.where((has_down & has_right)[:, None], acc11, 0.0)
        count = (1 + has_down.to(tl.int32)) * (1 + has_right.to(tl.int32))
        y = s / count.to(ACC)[:, None]
    if HAS_BIAS:
        y += tl.load(bias_ptr + wc, mask=c_mask, other=0.0).to(ACC)[None, :]

    offs = ((b * n_windows + p.to(tl.int64)) * (NUM_LAYERS * C))[:, None] + wc[None, :]
    io_mask = p_mask[:, None] & c_mask[None, :]
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=io_mask)
    if SAVE_ARGMAX:
        tl.store(argmax_ptr + offs, code.to(tl.uint8), mask=io_mask)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _grad_z(gy_base, gy_stride_t, gy_stride_c, am_base, wi, wj, py: tl.constexpr,
            px: tl.constexpr, wc, KC, H, W, OW, p_mask, c_mask,
            POOL_MAX: tl.constexpr, ACC: tl.constexpr):
    """g_z at grid position (2*wi + py, 2*wj + px): the pool's gradient routed back to z.

    Zero where that position lies outside the grid (then its window may not exist either).
    """
    row = 2 * wi + py
    col = 2 * wj + px
    ok = p_mask & (row >= 0) & (row < H) & (col >= 0) & (col < W)
    m = ok[:, None] & c_mask[None, :]
    widx = (wi * OW + wj).to(tl.int64)
    g = tl.load(gy_base + widx[:, None] * gy_stride_t + wc[None, :].to(tl.int64) * gy_stride_c,
                mask=m, other=0.0).to(ACC)
    if POOL_MAX:
        code = tl.load(am_base + widx[:, None] * KC + wc[None, :], mask=m, other=255)
        g = tl.where(code.to(tl.int32) == py * 2 + px, g, 0.0)
    else:
        count = (1 + ((2 * wi + 1) < H).to(tl.int32)) * (1 + ((2 * wj + 1) < W).to(tl.int32))
        g = g / count.to(ACC)[:, None]
    return g


@triton.jit
def _store_grad_x(gx_base, gx, prefix, row, col, H, W, C, c, p_mask, c_mask):
    ok = p_mask & (row < H) & (col < W)
    tok = (prefix + row * W + col).to(tl.int64)
    tl.store(gx_base + tok[:, None] * C + c[None, :], gx.to(gx_base.dtype.element_ty),
             mask=ok[:, None] & c_mask[None, :])


@triton.jit
def _dwconv_pool_bwd_kernel(
    gy_ptr, gy_stride_b, gy_stride_t, gy_stride_c,
    argmax_ptr,
    x_ptrs, x_stride_b, x_stride_t,
    w_ptr, w_stride_c, w_stride_u, w_stride_v,
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
    pid0, layer, b, p, c, p_mask, c_mask, oi, oj = _program_tile(C, OW, n_windows, BLOCK_P,
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
                gz = _grad_z(gy_base, gy_stride_t, gy_stride_c, am_base,
                             oi + (sy_i - PAD) // 2, oj + (sx_i - PAD) // 2,
                             (sy_i - PAD) % 2, (sx_i - PAD) % 2, wc, KC, H, W, OW,
                             p_mask, c_mask, POOL_MAX, ACC)
                gx00 = _conv_tap(gx00, gz, w_ptr, wc, c_mask, w_stride_c, w_stride_u,
                                 w_stride_v, 2 * PAD - sy_i, 2 * PAD - sx_i, KSIZE,
                                 RESIDUAL, ACC)
                gx01 = _conv_tap(gx01, gz, w_ptr, wc, c_mask, w_stride_c, w_stride_u,
                                 w_stride_v, 2 * PAD - sy_i, 2 * PAD + 1 - sx_i, KSIZE,
                                 RESIDUAL, ACC)
                gx10 = _conv_tap(gx10, gz, w_ptr, wc, c_mask, w_stride_c, w_stride_u,
                                 w_stride_v, 2 * PAD + 1 - sy_i, 2 * PAD - sx_i, KSIZE,
                                 RESIDUAL, ACC)
                gx11 = _conv_tap(gx11, gz, w_ptr, wc, c_mask, w_stride_c, w_stride_u,
                                 w_stride_v, 2 * PAD + 1 - sy_i, 2 * PAD + 1 - sx_i, KSIZE,
                                 RESIDUAL, ACC)
        gx_base = _pick(gx_ptrs, layer, NUM_LAYERS) + b * gx_stride_b
        _store_grad_x(gx_base, gx00, prefix, 2 * oi, 2 * oj, H, W, C, c, p_mask, c_mask)
        _store_grad_x(gx_base, gx01, prefix, 2 * oi, 2 * oj + 1, H, W, C, c, p_mask, c_mask)
        _store_grad_x(gx_base, gx10, prefix, 2 * oi + 1, 2 * oj, H, W, C, c, p_mask, c_mask)
        _store_grad_x(gx_base, gx11, prefix, 2 * oi + 1, 2 * oj + 1, H, W, C, c, p_mask, c_mask)

    if NEED_W:
        gz00 = _grad_z(gy_base, gy_stride_t, gy_stride_c, am_base, oi, oj, 0, 0, wc, KC, H, W,
                       OW, p_mask, c_mask, POOL_MAX, ACC)
        gz01 = _grad_z(gy_base, gy_stride_t, gy_stride_c, am_base, oi, oj, 0, 1, wc, KC, H, W,
                       OW, p_mask, c_mask, POOL_MAX, ACC)
        gz10 = _grad_z(gy_base, gy_stride_t, gy_stride_c, am_base, oi, oj, 1, 0, wc, KC, H, W,
                       OW, p_mask, c_mask, POOL_MAX, ACC)
        gz11 = _grad_z(gy_base, gy_stride_t, gy_stride_c, am_base, oi, oj, 1, 1, wc, KC, H, W,
                       OW, p_mask, c_mask, POOL_MAX, ACC)
        x_base = _pick(x_ptrs, layer, NUM_LAYERS) + b * _pick(x_stride_b, layer, NUM_LAYERS)
        st = _pick(x_stride_t, layer, NUM_LAYERS)
        part = pid0.to(tl.int64) * (KSIZE * KSIZE) * KC
        for u in tl.static_range(KSIZE):
            for v in tl.static_range(KSIZE):
                r0 = 2 * oi + (u - PAD)
                c0 = 2 * oj + (v - PAD)
                prod = gz00 * _x_tile(x_base, st, prefix, r0, c0, H, W, c, p_mask, c_mask, ACC)
                prod += gz01 * _x_tile(x_base, st, prefix, r0, c0 + 1, H, W, c, p_mask, c_mask,
                                       ACC)
                prod += gz10 * _x_tile(x_base, st, prefix, r0 + 1, c0, H, W, c, p_mask, c_mask,
                                       ACC)
                prod += gz11 * _x_tile(x_base, st, prefix, r0 + 1, c0 + 1, H, W, c, p_mask,
                                       c_mask, ACC)
                tl.store(gw_part_ptr + part + (u * KSIZE + v) * KC + wc, tl.sum(prod, axis=0),
                         mask=c_mask)

    if NEED_B:
        g = tl.load(gy_base + p.to(tl.int64)[:, None] * gy_stride_t
                    + wc[None, :].to(tl.int64) * gy_stride_c,
                    mask=p_mask[:, None] & c_mask[None, :], other=0.0).to(ACC)
        tl.store(gb_part_ptr + pid0.to(tl.int64) * KC + wc, tl.sum(g, axis=0), mask=c_mask)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class LaunchConfig(NamedTuple):
    block_p: int
    block_c: int
    num_warps: int


def launch_config(n_windows: int, channels: int, interpret: Optional[bool] = None) -> LaunchConfig:
    """Tile sizes for a problem: a function of its shape only (never of the batch), so the
    partial sums of the weight gradient, and hence its bits, are the same on every call."""
    if interpret if interpret is not None else interpreting():
        # The interpreter pays per program and per op, not per element: use big tiles.
        return LaunchConfig(min(triton.next_power_of_2(n_windows), 64),
                            min(triton.next_power_of_2(channels), 128), 1)
    return LaunchConfig(min(triton.next_power_of_2(n_windows), 32),
                        min(triton.next_power_of_2(channels), 64), 4)


def autotuning() -> bool:
    """Whether the forward picks its tiles by autotuning (on a GPU; SAEP_TRITON_AUTOTUNE=0
    turns it off). The backward never autotunes: its tiles decide how the weight gradient's
    partial sums are split, and those must not change between runs."""
    return not interpreting() and os.environ.get("SAEP_TRITON_AUTOTUNE", "1") != "0"


# Forward tiles tried on first use of each problem shape. The key holds no batch size: one
# tuning serves every batch (and the forward's result does not depend on the tiles: each
# output is the same sum in the same order).
FWD_AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w)
    for p, c, w in [(16, 64, 4), (32, 64, 4), (32, 128, 4), (64, 64, 4), (64, 128, 8),
                    (16, 128, 4), (32, 32, 2), (64, 32, 4), (128, 64, 8)]
]

_dwconv_pool_fwd_autotuned = triton.autotune(
    configs=FWD_AUTOTUNE_CONFIGS,
    key=["C", "n_windows", "OW", "KSIZE", "NUM_LAYERS", "POOL_MAX", "SAVE_ARGMAX"],
)(_dwconv_pool_fwd_kernel)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _channel_contiguous(xs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """The layers as the kernels read them: in place when the channel stride is 1 (any batch
    and token strides: slices, prefixes, views of a model's hidden_states), else a copy."""
    return [x if x.stride(2) == 1 or x.shape[2] == 1 else x.contiguous() for x in xs]


def fwd_launch(xs, weight, bias, out, argmax, height, width, num_prefix_tokens, residual, pool,
               store_argmax, cfg: Optional[LaunchConfig]):
    """(grid, runtime args, constexprs) of the forward kernel. With ``cfg`` None the tile
    sizes are left to the autotuner and the grid is a function of them."""
    batch, _, channels = xs[0].shape
    ow = (width + 1) // 2
    n_windows = ((height + 1) // 2) * ow

    def grid(meta):
        return (batch * triton.cdiv(n_windows, meta["BLOCK_P"]),
                triton.cdiv(channels, meta["BLOCK_C"]), len(xs))

    args = (
        tuple(xs), tuple(x.stride(0) for x in xs), tuple(x.stride(1) for x in xs),
        weight, weight.stride(0), weight.stride(2), weight.stride(3),
        bias if bias is not None else weight,
        out, argmax if store_argmax else out,
        channels, height, width, ow, n_windows, num_prefix_tokens,
    )
    consts = dict(
        KSIZE=weight.shape[-1], NUM_LAYERS=len(xs), HAS_BIAS=bias is not None,
        RESIDUAL=residual, POOL_MAX=pool == "max", SAVE_ARGMAX=store_argmax,
        ACC=_acc_dtype(xs[0].dtype),
    )
    if cfg is not None:
        consts.update(BLOCK_P=cfg.block_p, BLOCK_C=cfg.block_c)
        return grid(consts), args, consts
    return grid, args, consts


def bwd_launch(grad_out, xs, weight, argmax, grad_xs, gw_part, gb_part, height, width,
               num_prefix_tokens, residual, pool, cfg: LaunchConfig):
    """(grid, runtime args, constexprs) of the backward kernel. Unneeded outputs are None."""
    batch, tokens, channels = xs[0].shape
    ow = (width + 1) // 2
    n_windows = ((height + 1) // 2) * ow
    n_tiles = triton.cdiv(n_windows, cfg.block_p)
    unused = grad_out  # any pointer: the kernel never touches an output it was told to skip
    grid = (batch * n_tiles, triton.cdiv(channels, cfg.block_c), len(xs))
    args = (
        grad_out, grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        argmax if pool == "max" else unused,
        tuple(xs), tuple(x.stride(0) for x in xs), tuple(x.stride(1) for x in xs),
        weight, weight.stride(0), weight.stride(2), weight.stride(3),
        tuple(grad_xs) if grad_xs else (unused,) * len(xs), tokens * channels,
        gw_part if gw_part is not None else unused,
        gb_part if gb_part is not None else unused,
        channels, height, width, ow, n_windows, num_prefix_tokens,
    )
    consts = dict(
        KSIZE=weight.shape[-1], NUM_LAYERS=len(xs), RESIDUAL=residual, POOL_MAX=pool == "max",
        NEED_X=bool(grad_xs), NEED_W=gw_part is not None, NEED_B=gb_part is not None,
        ACC=_acc_dtype(xs[0].dtype), BLOCK_P=cfg.block_p, BLOCK_C=cfg.block_c,
    )
    return grid, args, consts


def dwconv_pool_fwd(
    xs: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    height: int,
    width: int,
    num_prefix_tokens: int,
    residual: bool,
    pool: str,
    save_argmax: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. Inputs are already checked; ``xs`` may have any strides.

    Returns ``out`` [B, Ho*Wo, K*C] (dtype of ``xs``) and ``argmax`` (uint8, same shape, the
    window position 0..3 of each max) when ``pool == "max"`` and ``save_argmax``; otherwise an
    empty uint8 tensor.
    """
    x0 = xs[0]
    batch, _, channels = x0.shape
    n_windows = ((height + 1) // 2) * ((width + 1) // 2)
    out = x0.new_empty((batch, n_windows, len(xs) * channels))
    store_argmax = pool == "max" and save_argmax
    argmax = x0.new_empty(out.shape if store_argmax else (0,), dtype=torch.uint8)
    if batch == 0:
        return out, argmax
    xs = _channel_contiguous(xs)
    if autotuning():
        grid, args, consts = fwd_launch(xs, weight, bias, out, argmax, height, width,
                                        num_prefix_tokens, residual, pool, store_argmax, None)
        _dwconv_pool_fwd_autotuned[grid](*args, **consts)
        return out, argmax
    cfg = launch_config(n_windows, channels)
    grid, args, consts = fwd_launch(xs, weight, bias, out, argmax, height, width,
                                    num_prefix_tokens, residual, pool, store_argmax, cfg)
    _dwconv_pool_fwd_kernel[grid](*args, **consts, num_warps=cfg.num_warps)
    return out, argmax


def dwconv_pool_bwd(
    grad_out: torch.Tensor,
    xs: Sequence[torch.Tensor],
    weight: torch.Tensor,
    argmax: torch.Tensor,
    height: int,
    width: int,
    num_prefix_tokens: int,
    residual: bool,
    pool: str,
    need_input_grad: bool,
    need_weight_grad: bool,
    need_bias_grad: bool,
) -> Tuple[List[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launch the backward.

    Returns (grads of ``xs`` as contiguous [B, T, C] tensors, or [] when not needed;
    grad of ``weight`` [K*C, 1, k, k] and of the bias [K*C] in the compute dtype (fp32, or
    fp64 for fp64 inputs), or None when not needed).
    """
    if pool == "max" and argmax.shape != grad_out.shape:
        raise ValueError("max-pool backward needs the argmax saved by the forward "
                         f"(shape {tuple(grad_out.shape)}), got {tuple(argmax.shape)}")
    x0 = xs[0]
    batch, tokens, channels = x0.shape
    kc = len(xs) * channels
    ksize = weight.shape[-1]
    n_windows = ((height + 1) // 2) * ((width + 1) // 2)
    acc_dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
    cfg = launch_config(n_windows, channels)
    n_parts = batch * triton.cdiv(n_windows, cfg.block_p)

    grad_xs: List[torch.Tensor] = []
    if need_input_grad:
        grad_xs = [x0.new_empty((batch, tokens, channels)) for _ in xs]
        if num_prefix_tokens:
            for g in grad_xs:
                g[:, :num_prefix_tokens].zero_()
    gw_part = (x0.new_empty((n_parts, ksize * ksize, kc), dtype=acc_dtype)
               if need_weight_grad else None)
    gb_part = x0.new_empty((n_parts, kc), dtype=acc_dtype) if need_bias_grad else None

    if batch > 0 and (need_input_grad or need_weight_grad or need_bias_grad):
        xs = _channel_contiguous(xs)
        grid, args, consts = bwd_launch(grad_out, xs, weight, argmax, grad_xs, gw_part, gb_part,
                                        height, width, num_prefix_tokens, residual, pool, cfg)
        _dwconv_pool_bwd_kernel[grid](*args, **consts, num_warps=cfg.num_warps)

    # Fixed-order reductions of the per-program partials: bitwise reproducible.
    grad_w = None
    if gw_part is not None:
        grad_w = gw_part.sum(0).t().contiguous().view(kc, 1, ksize, ksize)
    grad_b = gb_part.sum(0) if gb_part is not None else None
    return grad_xs, grad_w, grad_b
