"""Forward Triton kernel of the fused op (see ``shared.py`` for the layout and the tiling).

Each window needs the (k+1) x (k+1) input patch rows ``2*oi-p .. 2*oi+1+p``; every patch
element is loaded once and feeds the four conv outputs of the window (four accumulators), so
partial windows of odd grids are exact (the out-of-grid accumulators are simply left out of
the average / max). Max pooling can store the argmax (window position 0..3) for the backward.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .shared import (LaunchConfig, acc_dtype, conv_tap, launch_config, pick, program_tile,
                     window_extent, x_tile)


@triton.jit
def _take_max(best, code, z, idx: tl.constexpr):
    """Running max in window order 00, 01, 10, 11; NaN wins (as in torch.max_pool2d)."""
    upd = (z > best) | (z != z)
    return tl.where(upd, z, best), tl.where(upd, idx, code)


@triton.jit
def fused_aggregate_fwd_kernel(
    x_ptrs, x_stride_b, x_stride_t,
    w_ptr, bias_ptr,
    out_ptr, argmax_ptr,
    C, H, W, OW, n_windows, prefix,
    KSIZE: tl.constexpr, NUM_LAYERS: tl.constexpr,
    HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, POOL_MAX: tl.constexpr,
    SAVE_ARGMAX: tl.constexpr, ACC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    PAD: tl.constexpr = KSIZE // 2
    KC = NUM_LAYERS * C
    _, layer, b, p, c, p_mask, c_mask, oi, oj = program_tile(C, OW, n_windows, BLOCK_P, BLOCK_C)
    has_down, has_right, count = window_extent(oi, oj, H, W)
    wc = layer * C + c
    base = pick(x_ptrs, layer, NUM_LAYERS) + b * pick(x_stride_b, layer, NUM_LAYERS)
    stride_t = pick(x_stride_t, layer, NUM_LAYERS)

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
            xv = x_tile(base, stride_t, prefix, row, col, H, W, c, p_mask, c_mask, ACC)
            acc00 = conv_tap(acc00, xv, w_ptr, wc, c_mask, KC, a, e, KSIZE, RESIDUAL, ACC)
            acc01 = conv_tap(acc01, xv, w_ptr, wc, c_mask, KC, a, e - 1, KSIZE, RESIDUAL, ACC)
            acc10 = conv_tap(acc10, xv, w_ptr, wc, c_mask, KC, a - 1, e, KSIZE, RESIDUAL, ACC)
            acc11 = conv_tap(acc11, xv, w_ptr, wc, c_mask, KC, a - 1, e - 1, KSIZE, RESIDUAL,
                             ACC)

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
        y = s / count.to(ACC)[:, None]
    if HAS_BIAS:
        y += tl.load(bias_ptr + wc, mask=c_mask, other=0.0).to(ACC)[None, :]

    offs = ((b * n_windows + p.to(tl.int64)) * KC)[:, None] + wc[None, :]
    io_mask = p_mask[:, None] & c_mask[None, :]
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=io_mask)
    if SAVE_ARGMAX:
        tl.store(argmax_ptr + offs, code.to(tl.uint8), mask=io_mask)


# Forward tiles tried on first use of each problem shape. The key holds no batch size: one
# tuning serves every batch (and the forward's result does not depend on the tiles: each
# output is the same sum in the same order).
FWD_AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w)
    for p, c, w in [(16, 64, 4), (32, 64, 4), (32, 128, 4), (64, 64, 4), (64, 128, 8),
                    (16, 128, 4), (32, 32, 2), (64, 32, 4), (128, 64, 8)]
]

fused_aggregate_fwd_autotuned = triton.autotune(
    configs=FWD_AUTOTUNE_CONFIGS,
    key=["C", "n_windows", "OW", "KSIZE", "NUM_LAYERS", "POOL_MAX", "SAVE_ARGMAX"],
)(fused_aggregate_fwd_kernel)


def fwd_launch(spec, layers: Sequence[torch.Tensor], weight: torch.Tensor,
               bias: Optional[torch.Tensor], out: torch.Tensor, argmax: Optional[torch.Tensor],
               cfg: Optional[LaunchConfig]):
    """(grid, runtime args, constexprs) of the forward kernel. With ``cfg`` None the tile
    sizes are left to the autotuner and the grid is a function of them."""

    def grid(meta):
        return (spec.batch * triton.cdiv(spec.out_tokens, meta["BLOCK_P"]),
                triton.cdiv(spec.channels, meta["BLOCK_C"]), spec.num_layers)

    args = (
        tuple(layers), tuple(x.stride(0) for x in layers), tuple(x.stride(1) for x in layers),
        weight, bias if bias is not None else weight,
        out, argmax if argmax is not None else out,
        spec.channels, spec.height, spec.width, spec.out_width, spec.out_tokens,
        spec.num_prefix_tokens,
    )
    consts = dict(
        KSIZE=spec.kernel_size, NUM_LAYERS=spec.num_layers, HAS_BIAS=bias is not None,
        RESIDUAL=spec.residual, POOL_MAX=spec.pool == "max", SAVE_ARGMAX=argmax is not None,
        ACC=acc_dtype(layers[0].dtype),
    )
    if cfg is not None:
        consts.update(BLOCK_P=cfg.block_p, BLOCK_C=cfg.block_c)
        return grid(consts), args, consts
    return grid, args, consts


def fused_aggregate_fwd(spec, layers: Sequence[torch.Tensor], weight: torch.Tensor,
                        bias: Optional[torch.Tensor], out: torch.Tensor,
                        argmax: Optional[torch.Tensor], autotune: bool) -> None:
    """Write ``out`` [B, Ho*Wo, K*C] (and ``argmax``, uint8 of the same shape, when given).

    ``layers``: channel stride 1; ``weight``: [k*k, K*C] and ``bias``: [K*C] in the compute
    dtype, contiguous. ``autotune``: pick the tiles by autotuning (on a GPU), else the fixed
    ``launch_config``.
    """
    if autotune:
        grid, args, consts = fwd_launch(spec, layers, weight, bias, out, argmax, None)
        fused_aggregate_fwd_autotuned[grid](*args, **consts)
        return
    cfg = launch_config(spec.out_tokens, spec.channels)
    grid, args, consts = fwd_launch(spec, layers, weight, bias, out, argmax, cfg)
    fused_aggregate_fwd_kernel[grid](*args, **consts, num_warps=cfg.num_warps)
