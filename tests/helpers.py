"""Input builders and checks shared by the tests (tolerances: saep_kernels.testing)."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from saep_kernels.testing import assert_forward_close, assert_grad_close, assert_nonfinite_agree

# how the weight and the bias, and grad_out, may be laid out (make_params, make_grad_out)
PARAM_LAYOUTS = ("contiguous", "strided", "permuted")
GRAD_LAYOUTS = ("contiguous", "strided", "transposed", "expanded")


def make_layers(batch: int, height: int, width: int, channels: int, num_layers: int,
                prefix: int = 0, dtype=torch.float32, device="cpu", layout: str = "contiguous",
                requires_grad: bool = False) -> List[torch.Tensor]:
    """K hidden states [B, prefix + H*W, C] laid out as a model would hand them over.

    layout: "contiguous"; "slice" (each layer a view into a wider, longer shared buffer, as
    ``hidden_states[i][:, start:, :]`` or a channel slice: batch/token strides differ from the
    shape, channel stride 1); "transposed" (channel stride != 1: [B, C, T] storage viewed as
    [B, T, C]).
    """
    tokens = prefix + height * width
    layers = []
    if layout == "slice":
        # one shared buffer holding all layers with padding on every axis
        buf = torch.randn(batch + 1, num_layers, tokens + 3, channels + 5, dtype=torch.float32)
        buf = buf.to(device=device, dtype=dtype)
        for i in range(num_layers):
            layers.append(buf[1:, i, 2:2 + tokens, 3:3 + channels])
    else:
        for _ in range(num_layers):
            if layout == "contiguous":
                t = torch.randn(batch, tokens, channels)
            elif layout == "transposed":
                t = torch.randn(batch, channels, tokens).transpose(1, 2)
            else:
                raise ValueError(layout)
            layers.append(t.to(device=device, dtype=dtype))
    if requires_grad:
        # leaf views keep their strides: detach() shares storage, requires_grad_ makes a leaf
        layers = [t.detach().requires_grad_() for t in layers]
    return layers


def make_params(num_layers: int, channels: int, ksize: int, dtype=torch.float32, device="cpu",
                bias: bool = True, requires_grad: bool = False, layout: str = "contiguous"):
    """The depthwise weight [K*C, 1, k, k] and bias [K*C] (or None).

    layout: "contiguous"; "strided" (every other channel of a larger parameter: weight[::2],
    bias[::2]); "permuted" (weight stored tap-major, [k, k, 1, K*C] viewed as [K*C, 1, k, k];
    bias a column of a [K*C, 3] matrix)."""
    kc = num_layers * channels
    if layout == "contiguous":
        w = torch.randn(kc, 1, ksize, ksize)
        b = torch.randn(kc)
    elif layout == "strided":
        w = torch.randn(2 * kc, 1, ksize, ksize)[::2]
        b = torch.randn(2 * kc)[::2]
    elif layout == "permuted":
        w = torch.randn(ksize, ksize, 1, kc).permute(3, 2, 0, 1)
        b = torch.randn(kc, 3)[:, 1]
    else:
        raise ValueError(layout)
    w = (w / ksize).to(device=device, dtype=dtype)
    b = b.to(device=device, dtype=dtype) if bias else None
    if requires_grad:
        w = w.detach().requires_grad_()
        if b is not None:
            b = b.detach().requires_grad_()
    return w, b


def make_grad_out(like: torch.Tensor, layout: str = "contiguous") -> torch.Tensor:
    """A random gradient for an output shaped like ``like`` [B, N, K*C]: "contiguous";
    "strided" (every other channel of a wider buffer); "transposed" ([B, K*C, N] storage);
    "expanded" (one row broadcast with stride 0, as the gradient of a weighted sum)."""
    B, N, KC = like.shape
    make = dict(dtype=like.dtype, device=like.device)
    if layout == "contiguous":
        return torch.randn(B, N, KC, **make)
    if layout == "strided":
        return torch.randn(B, N, 2 * KC, **make)[..., ::2]
    if layout == "transposed":
        return torch.randn(B, KC, N, **make).transpose(1, 2)
    if layout == "expanded":
        return torch.randn(1, 1, KC, **make).expand(B, N, KC)
    raise ValueError(layout)


def grads(out: torch.Tensor, inputs: Sequence[Optional[torch.Tensor]], grad_out: torch.Tensor):
    """torch.autograd.grad over the inputs that require grad (None for the others)."""
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
    return [next(got) if (t is not None and t.requires_grad) else None for t in inputs]


def check_forward_and_grads(backend: str, layers, weight, bias, kwargs: dict, label: str,
                            grad_layout: str = "contiguous", nonfinite: bool = False) -> None:
    """The backend's output and every gradient (hidden states, weight, bias) against the
    reference's, for a random grad_out laid out as ``grad_layout``. ``nonfinite``: the inputs
    hold NaN/Inf; compare as docs/op.md promises for them (``assert_nonfinite_agree``)."""
    from saep_kernels import fused_aggregate, fused_aggregate_reference

    got_out = fused_aggregate(layers, weight, bias, backend=backend, **kwargs)
    want_out = fused_aggregate_reference(layers, weight, bias, **kwargs)
    if nonfinite:
        assert_nonfinite_agree(got_out, want_out, label, exact=kwargs.get("pool") == "max")
    else:
        assert_forward_close(got_out, want_out, label)
    gy = make_grad_out(want_out, grad_layout)
    inputs = [*layers, weight, bias]
    for i, (g, r) in enumerate(zip(grads(got_out, inputs, gy), grads(want_out, inputs, gy))):
        name, reduction = f"input {i} of {label}", i >= len(layers)
        if nonfinite and r is not None and g is not None:
            assert_nonfinite_agree(g, r, name, exact=False, reduction=reduction)
        else:
            assert_grad_close(g, r, name, reduction=reduction)


class deterministic_algorithms:
    """Context manager for torch.use_deterministic_algorithms(True)."""

    def __enter__(self):
        self._was = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self._was)
