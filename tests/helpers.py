"""Input builders and tolerances shared by the tests."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

# Tolerances (torch.testing.assert_close: |actual - expected| <= atol + rtol * |expected|).
#
# Every backend and the reference compute in fp32 (fp64 for fp64) from the same inputs and
# round once to the output dtype, so a result may differ from the reference by one rounding
# of that dtype, i.e. one ulp: rtol = 2^-10 for fp16 and 2^-7 for bf16 (the unit roundoff
# doubled, since the two roundings may fall on either side). The fp32 arithmetic itself
# differs only in summation order: at most a few dozen taps of O(1) values, ~1e-6, which
# atol covers; for fp32 outputs that is the whole budget.
FWD_TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2.0**-10, atol=1e-5),
    torch.bfloat16: dict(rtol=2.0**-7, atol=1e-5),
}

# Weight and bias gradients are sums over B*H*W products, accumulated in fp32 (fp64) in a
# different order than the reference: the error grows like N*eps*sum|terms|, so atol scales
# with the magnitude of the gradient (see assert_grad_close). Gradients stored in fp16/bf16
# (a fp16/bf16 weight) also take one rounding of that dtype.
REDUCTION_RTOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 2.0**-10 + 1e-4,
    torch.bfloat16: 2.0**-7 + 1e-4,
}


def assert_fwd_close(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual.cpu(), expected.cpu(), **FWD_TOL[expected.dtype],
                               msg=lambda m: f"{msg}\n{m}")


def assert_grad_close(actual: Optional[torch.Tensor], expected: Optional[torch.Tensor],
                      name: str, reduction: bool = False) -> None:
    if expected is None:
        assert actual is None, f"{name}: expected no gradient"
        return
    assert actual is not None, f"{name}: gradient missing"
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    if not reduction:
        assert_fwd_close(actual, expected, name)
        return
    rtol = REDUCTION_RTOL[expected.dtype]
    scale = max(float(expected.detach().abs().max().float()), 1.0)
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=rtol, atol=rtol * scale,
                               msg=lambda m: f"{name}\n{m}")


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


def out_tokens(height: int, width: int) -> int:
    return ((height + 1) // 2) * ((width + 1) // 2)


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
    assert_fwd_close(got_out, want_out, label)
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
