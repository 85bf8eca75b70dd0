"""Strided parameters and non-finite inputs, with every backend: the cases docs/op.md states
(section 1, "Layouts" and "Non-finite values"); the fuzz test (test_fuzz.py) draws them at
random as well."""

import pytest
import torch

from conftest import target_params
from helpers import GRAD_LAYOUTS, PARAM_LAYOUTS, check_forward_and_grads, make_layers, make_params
from saep_kernels import fused_aggregate, fused_aggregate_reference
from saep_kernels.testing import assert_nonfinite_agree

BACKENDS = [pytest.param("reference", id="reference")] + [
    pytest.param(p.values[0][0], id=p.id, marks=p.marks) for p in target_params()
    if p.values[0][1] == "cpu"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_bias_is_read_with_its_stride(backend):
    x = [torch.zeros(1, 16, 2)]
    w = torch.zeros(2, 1, 3, 3)
    bias = torch.arange(4.0)[::2]  # [0, 2]: a stride-2 view
    out = fused_aggregate(x, w, bias, backend=backend)
    assert out[0, 0].tolist() == [0.0, 2.0]


@pytest.mark.parametrize("target", target_params())
@pytest.mark.parametrize("param_layout", PARAM_LAYOUTS)
@pytest.mark.parametrize("grad_layout", GRAD_LAYOUTS)
@pytest.mark.parametrize("pool", ["avg", "max"])
def test_every_argument_at_any_stride(target, param_layout, grad_layout, pool):
    backend, device = target
    layers = make_layers(2, 5, 3, 8, 2, prefix=1, device=device, layout="transposed",
                         requires_grad=True)
    w, b = make_params(2, 8, 3, device=device, requires_grad=True, layout=param_layout)
    check_forward_and_grads(backend, layers, w, b,
                            dict(grid=(5, 3), num_prefix_tokens=1, pool=pool),
                            f"{param_layout} weight/bias, {grad_layout} grad_out",
                            grad_layout=grad_layout)


def _one_inf_layer(device, value=float("inf")):
    x = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(0))
    x[0, 5, 1] = value  # grid position (1, 1), channel 1
    return [x.to(device)]


def _mixed_sign_weight(device):
    w = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(1))
    w[1, 0] = torch.tensor([[0.5, -1.0, 0.5], [0.5, -2.0, 0.5], [0.5, 0.5, 0.5]])
    return w.to(device)


@pytest.mark.parametrize("target", target_params())
@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nonfinite_inputs_as_documented(target, pool, value):
    backend, device = target
    layers = [t.requires_grad_() for t in _one_inf_layer(device, float(value))]
    w = _mixed_sign_weight(device).requires_grad_()
    b = torch.randn(4, device=device, requires_grad=True)
    for residual in (True, False):
        check_forward_and_grads(backend, layers, w, b,
                                dict(pool=pool, residual=residual),
                                f"{value} input, {pool}, residual={residual}", nonfinite=True)


@pytest.mark.parametrize("target", target_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_max_forward_without_argmax_keeps_nonfinite(target, dtype):
    """The max forward with nothing to backpropagate saves no argmax (the CPU kernels then take
    a faster max that must fall back where a position's sum is NaN): the very same NaN/Inf as
    the reference, and bitwise the forward that saves the argmax. 64 channels (full vector
    groups) and an 8x7 grid (windows inside and at the edge)."""
    from saep_kernels import aggregate_spec

    backend, device = target
    gen = torch.Generator().manual_seed(3)
    layers = [torch.randn(2, 56, 64, generator=gen) for _ in range(2)]
    for i, value in enumerate([float("nan"), float("inf"), float("-inf")] * 6):
        x = layers[i % 2]
        x[i % 2, int(torch.randint(56, (1,), generator=gen)),
          int(torch.randint(64, (1,), generator=gen))] = value
    layers = [x.to(device, dtype) for x in layers]
    w = (torch.randn(128, 1, 3, 3, generator=gen) / 3).to(device, dtype)
    b = torch.randn(128, generator=gen).to(device, dtype)
    kwargs = dict(grid=(8, 7), pool="max")
    want = fused_aggregate_reference(layers, w, b, **kwargs)
    got = fused_aggregate(layers, w, b, backend=backend, **kwargs)
    assert not torch.isfinite(want).all()
    assert_nonfinite_agree(got, want, "max output without the argmax", exact=True)
    spec = aggregate_spec(layers, w, b, **kwargs)
    saved, _ = torch.ops.saep.fused_aggregate(layers, w, b, *spec.op_args(), backend, True)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(got.view(bits), saved.view(bits))


@pytest.mark.parametrize("target", target_params())
def test_avg_pooling_folds_inf_times_mixed_weights_to_inf(target):
    """The documented divergence: with avg pooling a fused backend may give +-Inf where the
    reference gives NaN (conv, residual and average folded into one stride-2 conv:
    Inf * (w1 + w2) instead of Inf * w1 + Inf * w2 with w1 < 0 < w2)."""
    backend, device = target
    layers, w = _one_inf_layer(device), _mixed_sign_weight(device)
    want = fused_aggregate_reference(layers, w, None, residual=True)
    got = fused_aggregate(layers, w, None, residual=True, backend=backend)
    assert torch.isnan(want[0, 0, 1])  # Inf*(-2+1) = -Inf at (1,1), +Inf at the others
    assert torch.isinf(got[0, 0, 1])
    assert_nonfinite_agree(got, want, "avg output", exact=False)
    # max pooling: the very same NaN/Inf as the reference
    want = fused_aggregate_reference(layers, w, None, residual=True, pool="max")
    got = fused_aggregate(layers, w, None, residual=True, pool="max", backend=backend)
    assert torch.isnan(want[0, 0, 1]) and torch.isnan(got[0, 0, 1])
    assert_nonfinite_agree(got, want, "max output", exact=True)


@pytest.mark.parametrize("target", target_params())
def test_backward_op_reads_a_strided_argmax(target):
    """saep::fused_aggregate_backward takes the saved argmax as an argument: any strides give
    the contiguous argmax's gradients."""
    from saep_kernels import aggregate_spec

    backend, device = target
    layers = make_layers(2, 5, 3, 8, 2, prefix=1, device=device)
    w, b = make_params(2, 8, 3, device=device)
    spec = aggregate_spec(layers, w, b, grid=(5, 3), num_prefix_tokens=1, pool="max")
    out, argmax = torch.ops.saep.fused_aggregate(layers, w, b, *spec.op_args(), backend, True)
    B, N, KC = argmax.shape
    strided = argmax.new_empty((B, KC, N)).transpose(1, 2).copy_(argmax)
    assert not strided.is_contiguous()
    grad_out = torch.randn_like(out)
    args = (*spec.op_args(), backend, True, True, True)
    want = torch.ops.saep.fused_aggregate_backward(grad_out, layers, w, argmax, *args)
    got = torch.ops.saep.fused_aggregate_backward(grad_out, layers, w, strided, *args)
    for g, e in zip([*got[0], got[1], got[2]], [*want[0], want[1], want[2]]):
        assert torch.equal(g, e)
