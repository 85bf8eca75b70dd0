"""Forward Triton kernel of the fused op (see ``shared.py`` for the layout and the tiling).

Each thread computes a window's pooled value for its channels; the kernels' taps and the
window's positions are runtime loops (``shared.py``: registers). Partial windows of odd grids
(last row/column) leave their out-of-grid positions out of the average / max.

avg: the conv, the residual and the 2x2 average are one stride-2 (k+1)x(k+1) conv (docs/op.md
section 4): each patch element x[2oi + a - p, 2oj + e - p] is loaded once and multiplied by the
folded tap, the sum of the kernel's taps (a - dy, e - dx) over the window's in-grid positions
(dy, dx) (plus the residual's identity), divided by their count at the end.
max: the window's positions one after another, each a kxk conv (the residual its centre tap),
kept when larger than the best so far; the argmax (window position 0..3) is saved for the
backward when asked.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .shared import (LaunchConfig, PackedGrids, acc_dtype, aligned, channel_alignment,
                     geometry_args, interpreting, launch_config, packed_launch, pick,
                     program_tile, tap, trip_count, window_extent, window_tiles, x_tile)


@triton.jit
def fused_aggregate_fwd_kernel(
    x_ptrs, x_stride_b, x_stride_t,
    w_ptr, bias_ptr,
    out_ptr, argmax_ptr,
    C, H, W, OW, n_windows, prefix, ksize,
    images_ptr, tiles_ptr,
    KSIZE: tl.constexpr, NUM_LAYERS: tl.constexpr,
    HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, POOL_MAX: tl.constexpr,
    SAVE_ARGMAX: tl.constexpr, ACC: tl.constexpr, CH_ALIGN: tl.constexpr,
    VARLEN: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    PAD: tl.constexpr = KSIZE // 2
    C = aligned(C, CH_ALIGN)
    KC = NUM_LAYERS * C
    (layer, b, H, W, OW, n_windows, token0, window0, p, c, p_mask, c_mask, oi,
     oj) = program_tile(C, H, W, OW, n_windows, prefix, images_ptr, tiles_ptr, VARLEN, BLOCK_P,
                        BLOCK_C)
    has_down, has_right, count = window_extent(oi, oj, H, W)
    wc = layer * C + c
    base = pick(x_ptrs, layer, NUM_LAYERS) + b * aligned(pick(x_stride_b, layer, NUM_LAYERS),
                                                         CH_ALIGN)
    stride_t = aligned(pick(x_stride_t, layer, NUM_LAYERS), CH_ALIGN)

    if POOL_MAX:
        best = tl.full([BLOCK_P, BLOCK_C], float("-inf"), dtype=ACC)
        code = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.int8)
        # window order 00, 01, 10, 11; a NaN wins, as in torch.max_pool2d
        for d in tl.range(4, loop_unroll_factor=1):
            dy = d // 2
            dx = d % 2
            z = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
            for t in tl.range(trip_count(ksize * ksize, KSIZE * KSIZE, INTERPRET),
                              loop_unroll_factor=1):
                u = t // KSIZE
                v = t % KSIZE
                xv = x_tile(base, stride_t, token0, 2 * oi + dy + u - PAD,
                            2 * oj + dx + v - PAD, H, W, c, p_mask, c_mask, ACC)
                w = tap(w_ptr, wc, c_mask, KC, u, v, KSIZE, False)
                z += xv * w.to(ACC)[None, :]
                if RESIDUAL:  # added, not folded into the centre tap: Inf - Inf stays NaN
                    if t == (KSIZE * KSIZE) // 2:
                        z += xv
            in_window = ((dy == 0) | has_down) & ((dx == 0) | has_right)
            take = in_window[:, None] & ((z > best) | (z != z))
            best = tl.where(take, z, best)
            code = tl.where(take, d, code).to(tl.int8)
        y = best
    else:
        hd = has_down.to(ACC)[:, None]
        hr = has_right.to(ACC)[:, None]
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        for t in tl.range(trip_count((ksize + 1) * (ksize + 1), (KSIZE + 1) * (KSIZE + 1),
                                     INTERPRET), loop_unroll_factor=1):
            a = t // (KSIZE + 1)
            e = t % (KSIZE + 1)
            xv = x_tile(base, stride_t, token0, 2 * oi + a - PAD, 2 * oj + e - PAD, H, W, c,
                        p_mask, c_mask, ACC)
            wf = tap(w_ptr, wc, c_mask, KC, a, e, KSIZE, RESIDUAL).to(ACC)[None, :]
            wf += hr * tap(w_ptr, wc, c_mask, KC, a, e - 1, KSIZE, RESIDUAL).to(ACC)[None, :]
            wf += hd * tap(w_ptr, wc, c_mask, KC, a - 1, e, KSIZE, RESIDUAL).to(ACC)[None, :]
            wf += (hd * hr) * tap(w_ptr, wc, c_mask, KC, a - 1, e - 1, KSIZE,
                                  RESIDUAL).to(ACC)[None, :]
            acc += xv * wf
        y = acc / count.to(ACC)[:, None]
    if HAS_BIAS:
        y += tl.load(bias_ptr + wc, mask=c_mask, other=0.0).to(ACC)[None, :]

    offs = ((b * n_windows + window0 + p.to(tl.int64)) * KC)[:, None] + wc[None, :]
    io_mask = p_mask[:, None] & c_mask[None, :]
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=io_mask)
    if SAVE_ARGMAX:
        tl.store(argmax_ptr + offs, code.to(tl.uint8), mask=io_mask)


# Forward tiles tried on first use of each problem shape (windows, channels, warps). The key
# holds no batch size: one tuning serves every batch (and the result does not depend on the
# tiles: each output is the same sum in the same order). A problem tries the tiles that give a
# thread one 16-byte vector of its dtype (``one_vector_per_thread``): more would take a
# thread past 64 registers (scripts/gpu_resources.py).
FWD_TILES = [(8, 32, 2), (16, 32, 2), (8, 64, 4), (16, 32, 4), (16, 64, 4), (32, 32, 4),
             (8, 128, 8), (16, 64, 8)]
FWD_AUTOTUNE_CONFIGS = [triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w)
                        for p, c, w in FWD_TILES]


def one_vector_per_thread(block_p: int, block_c: int, num_warps: int, element_size: int) -> bool:
    return block_p * block_c * element_size == 16 * 32 * num_warps


def _prune_configs(configs, named_args, **_):
    size = named_args["out_ptr"].element_size()
    return [cfg for cfg in configs if one_vector_per_thread(
        cfg.kwargs["BLOCK_P"], cfg.kwargs["BLOCK_C"], cfg.num_warps, size)]


fused_aggregate_fwd_autotuned = triton.autotune(
    configs=FWD_AUTOTUNE_CONFIGS,
    key=["C", "n_windows", "OW", "KSIZE", "NUM_LAYERS", "POOL_MAX", "SAVE_ARGMAX", "CH_ALIGN"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(fused_aggregate_fwd_kernel)


def fwd_launch(spec, layers: Sequence[torch.Tensor], weight: torch.Tensor,
               bias: Optional[torch.Tensor], out: torch.Tensor, argmax: Optional[torch.Tensor],
               cfg: Optional[LaunchConfig], packed: Optional[PackedGrids] = None):
    """(grid, runtime args, constexprs) of the forward kernel, for the call's grid or for
    ``packed`` grids (tables for tiles of ``cfg.block_p`` windows). With ``cfg`` None (fixed
    grid only) the tile sizes are left to the autotuner and the grid is a function of them."""

    def grid(meta):
        return (window_tiles(spec, packed, meta["BLOCK_P"]),
                triton.cdiv(spec.channels, meta["BLOCK_C"]), spec.num_layers)

    geometry = geometry_args(spec, packed, out)
    args = (
        tuple(layers), tuple(x.stride(0) for x in layers), tuple(x.stride(1) for x in layers),
        weight, bias if bias is not None else weight,
        out, argmax if argmax is not None else out,
        *geometry[0], spec.kernel_size, *geometry[1],
    )
    consts = dict(
        KSIZE=spec.kernel_size, NUM_LAYERS=spec.num_layers, HAS_BIAS=bias is not None,
        RESIDUAL=spec.residual, POOL_MAX=spec.pool == "max", SAVE_ARGMAX=argmax is not None,
        ACC=acc_dtype(layers[0].dtype), CH_ALIGN=channel_alignment(
            spec.channels, layers[0].element_size(),
            [*layers, out, weight] + [t for t in (bias, argmax) if t is not None],
            [st for x in layers for st in (x.stride(0), x.stride(1))]),
        VARLEN=packed is not None, INTERPRET=interpreting(),
    )
    if cfg is not None:
        consts.update(BLOCK_P=cfg.block_p, BLOCK_C=cfg.block_c)
        return grid(consts), args, consts
    return grid, args, consts


def fused_aggregate_fwd(spec, layers: Sequence[torch.Tensor], weight: torch.Tensor,
                        bias: Optional[torch.Tensor], out: torch.Tensor,
                        argmax: Optional[torch.Tensor], autotune: bool,
                        images: Optional[torch.Tensor] = None) -> None:
    """Write ``out`` [B, Ho*Wo, K*C] (and ``argmax``, uint8 of the same shape, when given).

    ``layers``: channel stride 1; ``weight``: [k*k, K*C] and ``bias``: [K*C] in the compute
    dtype, contiguous. ``autotune``: pick the tiles by autotuning (on a GPU; fp64 takes the
    fixed tiles), else the fixed ``launch_config``.

    Packed grids: ``spec`` a ``VarlenSpec``, ``images`` the host image table, layers
    [1, N, C], ``out`` [1, out_tokens, K*C]; one launch for all images, at the fixed tiles
    (the tile table depends on the tiles, so the autotuner is not asked).
    """
    size = layers[0].element_size()
    if images is not None:
        cfg, packed = packed_launch(images, spec.channels, size, out.device)
    elif autotune and any(one_vector_per_thread(*tile, size) for tile in FWD_TILES):
        grid, args, consts = fwd_launch(spec, layers, weight, bias, out, argmax, None)
        fused_aggregate_fwd_autotuned[grid](*args, **consts)
        return
    else:
        cfg, packed = launch_config(spec.out_tokens, spec.channels, size), None
    grid, args, consts = fwd_launch(spec, layers, weight, bias, out, argmax, cfg, packed)
    fused_aggregate_fwd_kernel[grid](*args, **consts, num_warps=cfg.num_warps)
