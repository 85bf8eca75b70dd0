"""``fused_aggregate_varlen``: the fused op over packed images of different grids.

Native-resolution towers (Pixtral, Mistral 3, Qwen2-VL) pack the patch tokens of all images of
a batch into one sequence, each image with its own (H_i, W_i) grid. This op takes the K layers
as packed tensors ([N, C] or [1, N, C]), the grids, optional prefix tokens per image, and
computes ``fused_aggregate`` on each image's own grid: zero padding and partial windows at its
own edges, no tap reading a neighbouring image. It returns the pooled tokens of all images,
packed the same way, and the output offsets (docs/op.md section 6).

One kernel launch per direction covers all images: the kernels take a table with one row per
image (``image_table``: height, width, first token, first output token), built on the host
from the grids the caller passes, so the op itself never synchronises with the device. The
``reference`` backend loops over images with ``fused_aggregate_reference`` (the oracle); the
``triton``, ``cpu`` and ``cuda`` backends run the packed kernels (``backend="auto"`` picks
them in the fixed-grid op's order for the device).

Token layouts: ``"row_major"`` (token ``i*W + j`` of an image is row i, column j: Pixtral,
CLIP, SigLIP) and ``"merge_2x2"`` (Qwen2-VL's processor order: the four tokens of each 2x2
window are consecutive, windows in row-major order; even grids only). Outputs are one token
per 2x2 window in row-major window order, which for ``"merge_2x2"`` is the order of the
model's own patch merger.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import backends
from ._checks import check_options, check_weight_and_bias
from .reference import reference_unchecked
from .spec import (FLOAT_DTYPES, NO_GRADS, AggregateSpec, GradsNeeded, compute_dtype,
                   grads_needed)

__all__ = ["fused_aggregate_varlen", "VarlenSpec", "LAYOUTS", "image_table",
           "check_image_table"]

LAYOUTS = ("row_major", "merge_2x2")

# columns of the image table (csrc/fused_aggregate.h, ImageField)
IMAGE_FIELDS = ("height", "width", "first_token", "first_window")


@dataclasses.dataclass(frozen=True)
class VarlenSpec:
    """One call of ``fused_aggregate_varlen`` but for the per-image grids (in the image table):
    the options and the sizes read off the tensors."""

    residual: bool
    pool: str
    num_images: int
    tokens: int       # N, the packed tokens of each layer
    out_tokens: int   # the pooled tokens of all images
    channels: int     # C of each layer
    num_layers: int   # K
    kernel_size: int  # k

    @property
    def out_channels(self) -> int:
        return self.num_layers * self.channels

    @property
    def taps(self) -> int:
        return self.kernel_size * self.kernel_size


def _check_grids(grids, num_prefix_tokens, tokens: int) -> Tuple[List[Tuple[int, int]], List[int]]:
    """The grids as a list of (H, W) ints and the prefix tokens of each image."""
    if isinstance(grids, Tensor):
        if grids.dim() != 2 or grids.shape[1] != 2 or grids.is_floating_point():
            raise ValueError(f"grids must be an integer tensor [n, 2] of (H, W), got "
                             f"{grids.dtype} {tuple(grids.shape)}")
        grids = grids.tolist()  # a device tensor synchronises here; pass host grids to avoid it
    if not isinstance(grids, (list, tuple)) or len(grids) == 0:
        raise ValueError(f"grids must be a non-empty list of (H, W) pairs or an int tensor "
                         f"[n, 2], got {grids!r}")
    out = []
    for i, g in enumerate(grids):
        if (not isinstance(g, (list, tuple)) or len(g) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in g)):
            raise TypeError(f"grids[{i}] must be a pair of ints (H, W), got {g!r}")
        if g[0] <= 0 or g[1] <= 0:
            raise ValueError(f"grids[{i}] must be positive, got a zero-size grid {tuple(g)}")
        out.append((int(g[0]), int(g[1])))
    if isinstance(num_prefix_tokens, int) and not isinstance(num_prefix_tokens, bool):
        prefixes = [num_prefix_tokens] * len(out)
    elif isinstance(num_prefix_tokens, (list, tuple)):
        prefixes = list(num_prefix_tokens)
        if len(prefixes) != len(out):
            raise ValueError(f"num_prefix_tokens must be an int or one int per image "
                             f"({len(out)} grids), got {len(prefixes)} values")
    else:
        raise TypeError(f"num_prefix_tokens must be an int or a list of ints, got "
                        f"{num_prefix_tokens!r}")
    for i, p in enumerate(prefixes):
        if not isinstance(p, int) or isinstance(p, bool) or p < 0:
            raise ValueError(f"num_prefix_tokens[{i}] must be an int >= 0, got {p!r}")
    total = sum(p + h * w for p, (h, w) in zip(prefixes, out))
    if total != tokens:
        raise ValueError(f"grids hold {total} tokens (sum of num_prefix_tokens + H*W over "
                         f"{len(out)} images) but hidden_states have N = {tokens} tokens")
    return out, prefixes


def image_table(grids: Sequence[Tuple[int, int]], prefixes: Sequence[int]) -> Tuple[Tensor, Tensor]:
    """(table, out_offsets) on the host: the kernels' image table, int64 [n, 4] with the
    columns ``IMAGE_FIELDS``, and the output offsets, int64 [n + 1] (image i's pooled tokens
    are ``out[out_offsets[i]:out_offsets[i + 1]]``)."""
    hw = torch.tensor(grids, dtype=torch.int64).reshape(-1, 2)
    prefix = torch.tensor(prefixes, dtype=torch.int64)
    sizes = prefix + hw[:, 0] * hw[:, 1]
    first_token = torch.cumsum(sizes, 0) - sizes + prefix
    windows = ((hw[:, 0] + 1) // 2) * ((hw[:, 1] + 1) // 2)
    out_offsets = torch.cat([windows.new_zeros(1), torch.cumsum(windows, 0)])
    table = torch.stack([hw[:, 0], hw[:, 1], first_token, out_offsets[:-1]], 1).contiguous()
    return table, out_offsets


def check_image_table(images, tokens: int, out_tokens: int) -> None:
    """Raise ``ValueError`` unless ``images`` is an image table the kernels can take for N =
    ``tokens`` packed tokens and ``out_tokens`` outputs: int64 [n, 4] contiguous on the host,
    every grid positive, the images' tokens in order without overlap inside [0, N), their
    outputs one after the other from 0 up to ``out_tokens`` (the rules of the compiled op's
    ``packed_geometry``, csrc/binding.h, for kernels that do not check the table themselves).
    Vectorised over the images; the table is on the host, so it does not synchronise."""
    if (not isinstance(images, Tensor) or images.dim() != 2 or images.shape[0] == 0
            or images.shape[1] != len(IMAGE_FIELDS) or images.dtype != torch.int64
            or images.device.type != "cpu" or not images.is_contiguous()):
        described = (f"{images.dtype} {tuple(images.shape)} on {images.device}"
                     if isinstance(images, Tensor) else type(images).__name__)
        raise ValueError(f"images must be a contiguous int64 CPU tensor [n >= 1, "
                         f"{len(IMAGE_FIELDS)}] {IMAGE_FIELDS}, got {described}")
    height, width, first, first_window = images.unbind(1)

    def fail(bad, message):
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"images[{i}] = {images[i].tolist()} {IMAGE_FIELDS}: {message}")

    fail((height <= 0) | (width <= 0) | (height > tokens) | (width > tokens) | (first < 0),
         f"the grid is empty or does not fit the N = {tokens} tokens")
    end = first + height * width
    fail((first < torch.cat([end.new_zeros(1), end[:-1]])) | (end > tokens),
         f"its tokens overlap the previous image's or pass the N = {tokens} tokens")
    windows = ((height + 1) // 2) * ((width + 1) // 2)
    fail(first_window != torch.cumsum(windows, 0) - windows,
         "its first window must follow the previous image's windows")
    if int(windows.sum()) != out_tokens:
        raise ValueError(f"images hold {int(windows.sum())} output tokens, but out_tokens is "
                         f"{out_tokens}")


def merge_2x2_order(table: Tensor, tokens: int) -> Tensor:
    """The gather index that turns packed tokens in Qwen2-VL's merge order into row-major
    order: ``row_major = merged[index]`` along the token dimension (prefix tokens stay)."""
    index = torch.arange(tokens, dtype=torch.int64)
    h, w, first = table[:, 0], table[:, 1], table[:, 2]
    counts = h * w
    image = torch.repeat_interleave(torch.arange(len(table)), counts)
    local = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    width = w[image]
    r, c = local // width, local % width
    merged = ((r // 2) * (width // 2) + c // 2) * 4 + (r % 2) * 2 + c % 2
    index[first[image] + local] = first[image] + merged
    return index


def _check_varlen(hidden_states, weight, bias, grids, num_prefix_tokens, layout, residual, pool
                  ) -> Tuple[VarlenSpec, Tensor, Tensor, List[Tensor]]:
    """(spec, image table, output offsets, the layers as [1, N, C])."""
    if isinstance(hidden_states, Tensor) or not isinstance(hidden_states, (list, tuple)):
        raise TypeError("hidden_states must be a list or tuple of K packed tensors [N, C] or "
                        f"[1, N, C], got {type(hidden_states).__name__}")
    if len(hidden_states) == 0:
        raise ValueError("hidden_states must hold at least one tensor, got an empty sequence")
    first = hidden_states[0]
    for i, h in enumerate(hidden_states):
        if not isinstance(h, Tensor):
            raise TypeError(f"hidden_states[{i}] must be a torch.Tensor, got {type(h).__name__}")
        if not (h.dim() == 2 or (h.dim() == 3 and h.shape[0] == 1)):
            raise ValueError(f"hidden_states[{i}] must be packed tokens [N, C] or [1, N, C], got "
                             f"{tuple(h.shape)}")
        if h.dtype not in FLOAT_DTYPES:
            raise TypeError(f"hidden_states[{i}] must be float16, bfloat16, float32 or float64, "
                            f"got {h.dtype}")
        if h.dtype != first.dtype or h.device != first.device or h.shape != first.shape:
            raise ValueError(f"hidden_states must share one shape, dtype and device: "
                             f"hidden_states[0] is {tuple(first.shape)} {first.dtype} on "
                             f"{first.device}, hidden_states[{i}] is {tuple(h.shape)} {h.dtype} "
                             f"on {h.device}")
    layers = [h if h.dim() == 3 else h.unsqueeze(0) for h in hidden_states]
    tokens, channels = int(layers[0].shape[1]), int(layers[0].shape[2])
    if channels == 0 or tokens == 0:
        raise ValueError(f"hidden_states must have at least one token and one channel, got "
                         f"shape {tuple(first.shape)}")
    if not isinstance(layout, str):
        raise TypeError(f"layout must be one of {LAYOUTS} for all images (mixed layouts are "
                        f"not supported), got {layout!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    check_options(residual, pool)
    kernel_size = check_weight_and_bias(weight, bias, len(layers), channels, first.device)
    grid_list, prefixes = _check_grids(grids, num_prefix_tokens, tokens)
    if layout == "merge_2x2":
        for i, (h, w) in enumerate(grid_list):
            if h % 2 or w % 2:
                raise ValueError(f"layout='merge_2x2' needs even grids, got grids[{i}] = "
                                 f"({h}, {w})")
    table, out_offsets = image_table(grid_list, prefixes)
    spec = VarlenSpec(residual=residual, pool=pool, num_images=len(grid_list), tokens=tokens,
                      out_tokens=int(out_offsets[-1]), channels=channels,
                      num_layers=len(layers), kernel_size=kernel_size)
    return spec, table, out_offsets, layers


# --------------------------------------------------------------------------------------------
# the reference: fused_aggregate_reference per image
# --------------------------------------------------------------------------------------------


def varlen_reference(spec: VarlenSpec, table: Tensor, layers: Sequence[Tensor], weight: Tensor,
                     bias: Optional[Tensor]) -> Tensor:
    """[1, out_tokens, K*C]: each image through the fixed-grid reference (row-major layers)."""
    outs = []
    for height, width, first, _ in table.tolist():
        image = [x[:, first:first + height * width] for x in layers]
        image_spec = AggregateSpec.of(image, weight, height=height, width=width,
                                      num_prefix_tokens=0, residual=spec.residual,
                                      pool=spec.pool)
        outs.append(reference_unchecked(image_spec, image, weight, bias))
    return torch.cat(outs, dim=1)


# --------------------------------------------------------------------------------------------
# the custom ops of the fused backends
# --------------------------------------------------------------------------------------------

_SPEC_ARGS = "SymInt out_tokens, bool residual, str pool"


def _spec_of(layers, weight, images, out_tokens, residual, pool) -> VarlenSpec:
    return VarlenSpec(residual=residual, pool=pool, num_images=int(images.shape[0]),
                      tokens=layers[0].shape[1], out_tokens=out_tokens,
                      channels=layers[0].shape[2], num_layers=len(layers),
                      kernel_size=weight.shape[-1])


def _varlen_outputs(spec: VarlenSpec, like: Tensor, save_argmax: bool) -> Tuple[Tensor, Tensor]:
    shape = (1, spec.out_tokens, spec.out_channels)
    out = like.new_empty(shape)
    stored = spec.pool == "max" and save_argmax
    return out, like.new_empty(shape if stored else (0,), dtype=torch.uint8)


def _varlen_grad_buffers(spec: VarlenSpec, like: Tensor, prefixed: bool) -> List[Tensor]:
    """K [1, N, C] gradients; zeros when some tokens are prefixes (the kernels write the grid
    tokens only)."""
    make = like.new_zeros if prefixed else like.new_empty
    return [make((1, spec.tokens, spec.channels)) for _ in range(spec.num_layers)]


def _forward_impl(layers, weight, bias, images, out_tokens, residual, pool, backend, save_argmax):
    spec = _spec_of(layers, weight, images, out_tokens, residual, pool)
    out, argmax = _varlen_outputs(spec, layers[0], save_argmax)
    fused = backends.fused_backend(backend)
    fused.forward_varlen(spec, layers, weight, bias, images, out,
                         argmax if argmax.numel() else None)
    return out, argmax


def _forward_fake(layers, weight, bias, images, out_tokens, residual, pool, backend, save_argmax):
    spec = _spec_of(layers, weight, images, out_tokens, residual, pool)
    return _varlen_outputs(spec, layers[0], save_argmax)


_forward_op = torch.library.custom_op(
    "saep::fused_aggregate_varlen", _forward_impl, mutates_args=(),
    schema=(f"(Tensor[] hidden_states, Tensor weight, Tensor? bias, Tensor images, {_SPEC_ARGS}, "
            "str backend, bool save_argmax) -> (Tensor, Tensor)"))
_forward_op.register_fake(_forward_fake)

_NEEDS = ", ".join(f"bool need_{name}_grad" for name in GradsNeeded._fields)


def _prefixed(spec: VarlenSpec, images: Tensor) -> bool:
    """Whether some packed tokens belong to no grid (prefix tokens)."""
    return int((images[:, 0] * images[:, 1]).sum()) != spec.tokens


def _backward_impl(grad_out, layers, weight, argmax, images, out_tokens, residual, pool, backend,
                   need_input, need_weight, need_bias):
    spec = _spec_of(layers, weight, images, out_tokens, residual, pool)
    needs = GradsNeeded(need_input, need_weight, need_bias)
    grad_xs = _varlen_grad_buffers(spec, layers[0], _prefixed(spec, images)) if needs.input else []
    grad_w, grad_b = backends.fused_backend(backend).backward_varlen(
        spec, needs, grad_out, layers, weight, argmax, images, grad_xs)
    empty = weight.new_empty((0,), dtype=compute_dtype(layers[0].dtype))
    return (grad_xs, grad_w if grad_w is not None else empty,
            grad_b if grad_b is not None else empty.clone())


def _backward_fake(grad_out, layers, weight, argmax, images, out_tokens, residual, pool, backend,
                   need_input, need_weight, need_bias):
    spec = _spec_of(layers, weight, images, out_tokens, residual, pool)
    acc = compute_dtype(layers[0].dtype)
    grad_xs = ([layers[0].new_empty((1, spec.tokens, spec.channels))
                for _ in range(spec.num_layers)] if need_input else [])
    grad_w = weight.new_empty(weight.shape if need_weight else (0,), dtype=acc)
    grad_b = weight.new_empty((spec.out_channels,) if need_bias else (0,), dtype=acc)
    return grad_xs, grad_w, grad_b


_backward_op = torch.library.custom_op(
    "saep::fused_aggregate_varlen_backward", _backward_impl, mutates_args=(),
    schema=(f"(Tensor grad_out, Tensor[] hidden_states, Tensor weight, Tensor argmax, "
            f"Tensor images, {_SPEC_ARGS}, str backend, {_NEEDS}) -> (Tensor[], Tensor, Tensor)"))
_backward_op.register_fake(_backward_fake)


def _setup_context(ctx, inputs, output):
    layers, weight, bias, images, out_tokens, residual, pool, backend, _save = inputs
    ctx.save_for_backward(weight, output[1], images, *layers)
    ctx.args = (out_tokens, residual, pool, backend)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out, _grad_argmax):
    weight, argmax, images, *layers = ctx.saved_tensors
    flags, need_weight, need_bias = ctx.needs_input_grad[:3]
    needs = grads_needed(flags, need_weight, need_bias)
    nothing = (None,) * (len(ctx.needs_input_grad) - 3)
    if not needs.any():
        return ([None] * len(layers), None, None) + nothing
    grad_xs, grad_w, grad_b = torch.ops.saep.fused_aggregate_varlen_backward(
        grad_out, layers, weight, argmax, images, *ctx.args, *needs)
    return ((grad_xs if needs.input else [None] * len(layers)),
            grad_w.to(weight.dtype) if needs.weight else None,
            grad_b.to(ctx.bias_dtype) if needs.bias else None) + nothing


torch.library.register_autograd("saep::fused_aggregate_varlen", _backward,
                                setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# the public function
# --------------------------------------------------------------------------------------------


def fused_aggregate_varlen(
    hidden_states: Sequence[Tensor],
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    grids,
    num_prefix_tokens=0,
    layout: str = "row_major",
    residual: bool = True,
    pool: str = "avg",
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """``fused_aggregate`` over packed images of different grids, in one launch per direction.

    Args:
        hidden_states: K packed tensors [N, C] or [1, N, C] (same shape, dtype, device; channel
            stride 1 is read in place): image i's tokens follow image i-1's, its prefix tokens
            first, then its H_i*W_i grid tokens in ``layout`` order.
        weight, bias, residual, pool: as in ``fused_aggregate``.
        grids: the (H_i, W_i) of each image, a list of int pairs or an int tensor [n, 2] (host
            grids keep the op free of device synchronisation); frames of a video are separate
            grids.
        num_prefix_tokens: tokens before each image's grid: one int for all images, or one per
            image.
        layout: ``"row_major"`` or ``"merge_2x2"`` (Qwen2-VL's order, even grids).
        backend: ``"auto"``, ``"reference"``, ``"triton"``, ``"cpu"`` or ``"cuda"``.

    Returns:
        (out, out_offsets): the pooled tokens of all images, [sum_i ceil(H_i/2)*ceil(W_i/2),
        K*C] ([1, ..., K*C] for 3-D inputs) in the input dtype, one token per 2x2 window in
        row-major window order; and int64 [n + 1] output offsets on the host.
    """
    spec, table, out_offsets, layers = _check_varlen(hidden_states, weight, bias, grids,
                                                     num_prefix_tokens, layout, residual, pool)
    if layout == "merge_2x2":
        index = merge_2x2_order(table, spec.tokens).to(layers[0].device, non_blocking=True)
        layers = [x.index_select(1, index) for x in layers]
    name = backends.resolve_backend(backend, layers[0].device, spec)
    if name == "reference":
        out = varlen_reference(spec, table, layers, weight, bias)
    else:
        needs = NO_GRADS
        if torch.is_grad_enabled():
            needs = grads_needed([x.requires_grad for x in layers], weight.requires_grad,
                                 bias is not None and bias.requires_grad)
        out, _ = torch.ops.saep.fused_aggregate_varlen(
            layers, weight, bias, table, spec.out_tokens, residual, pool, name,
            pool == "max" and needs.any())
    return (out if hidden_states[0].dim() == 3 else out[0]), out_offsets
