"""Input builders and checks shared by the tests (tolerances: saep_kernels.testing)."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from saep_kernels.testing import assert_forward_close, assert_grad_close


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
                bias: bool = True, requires_grad: bool = False):
    kc = num_layers * channels
    w = (torch.randn(kc, 1, ksize, ksize) / ksize).to(device=device, dtype=dtype)
    b = torch.randn(kc).to(device=device, dtype=dtype) if bias else None
    if requires_grad:
        w.requires_grad_()
        if b is not None:
            b.requires_grad_()
    return w, b


def grads(out: torch.Tensor, inputs: Sequence[Optional[torch.Tensor]], grad_out: torch.Tensor):
    """torch.autograd.grad over the inputs that require grad (None for the others)."""
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
    return [next(got) if (t is not None and t.requires_grad) else None for t in inputs]


def check_forward_and_grads(backend: str, layers, weight, bias, kwargs: dict, label: str) -> None:
    """The backend's output and every gradient (hidden states, weight, bias) against the
    reference's, for a random grad_out."""
    from saep_kernels import fused_aggregate, fused_aggregate_reference

    got_out = fused_aggregate(layers, weight, bias, backend=backend, **kwargs)
    want_out = fused_aggregate_reference(layers, weight, bias, **kwargs)
    assert_forward_close(got_out, want_out, label)
    gy = torch.randn_like(want_out)
    inputs = [*layers, weight, bias]
    for i, (g, r) in enumerate(zip(grads(got_out, inputs, gy), grads(want_out, inputs, gy))):
        assert_grad_close(g, r, f"input {i} of {label}", reduction=i >= len(layers))


class deterministic_algorithms:
    """Context manager for torch.use_deterministic_algorithms(True)."""

    def __enter__(self):
        self._was = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self._was)
