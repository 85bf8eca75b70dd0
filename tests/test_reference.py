"""The reference itself against a naive loop written straight from docs/op.md, and its
algebraic facts (avg folding) that the CPU kernels rely on."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from saep_kernels import fused_aggregate, fused_aggregate_reference
from saep_kernels.spec import pooled_size
from helpers import make_layers, make_params


def naive_aggregate(hidden_states, weight, bias, height, width, prefix, residual, pool):
    """Loops over output windows, window positions and taps, per docs/op.md section 1, steps 1-5."""
    x = torch.cat([h[:, prefix:, :].double() for h in hidden_states], dim=-1)  # [B, HW, KC]
    batch, _, kc = x.shape
    k = weight.shape[-1]
    p = k // 2
    w = weight.double().reshape(kc, k, k)
    b = bias.double() if bias is not None else torch.zeros(kc, dtype=torch.float64)
    oh, ow = pooled_size(height, width)
    out = torch.empty(batch, oh * ow, kc, dtype=torch.float64)

    def z_at(i, j):
        acc = b.expand(batch, kc).clone()
        for u, v in itertools.product(range(k), range(k)):
            r, c = i + u - p, j + v - p
            if 0 <= r < height and 0 <= c < width:
                acc += w[:, u, v] * x[:, r * width + c, :]
        if residual:
            acc += x[:, i * width + j, :]
        return acc

    for oi, oj in itertools.product(range(oh), range(ow)):
        zs = [z_at(i, j) for i in (2 * oi, 2 * oi + 1) for j in (2 * oj, 2 * oj + 1)
              if i < height and j < width]
        stack = torch.stack(zs)
        out[:, oi * ow + oj] = stack.mean(0) if pool == "avg" else stack.max(0).values
    return out


@pytest.mark.parametrize("height,width", [(4, 4), (5, 7), (3, 1), (1, 1), (6, 3)])
@pytest.mark.parametrize("ksize", [1, 3, 5, 7])
@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("prefix", [0, 1])
def test_reference_matches_naive_loops(height, width, ksize, pool, residual, prefix):
    layers = make_layers(2, height, width, 3, 2, prefix=prefix, dtype=torch.float64)
    w, b = make_params(2, 3, ksize, dtype=torch.float64)
    got = fused_aggregate_reference(layers, w, b, grid=(height, width), num_prefix_tokens=prefix,
                                    residual=residual, pool=pool)
    want = naive_aggregate(layers, w, b, height, width, prefix, residual, pool)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_channel_order_is_layer_major():
    # Layer l fills channels [l*C, (l+1)*C): with an identity conv, each output block is the
    # pooled layer itself.
    layers = make_layers(1, 4, 4, 2, 3, dtype=torch.float64)
    w = torch.zeros(6, 1, 3, 3, dtype=torch.float64)
    out = fused_aggregate_reference(layers, w, None, residual=True, pool="avg")
    for i, h in enumerate(layers):
        pooled = F.avg_pool2d(h.transpose(1, 2).reshape(1, 2, 4, 4), 2).flatten(2).transpose(1, 2)
        torch.testing.assert_close(out[..., 2 * i:2 * i + 2], pooled)


def test_ceil_mode_partial_windows_divide_by_in_bounds_count():
    # 3x3 grid of ones, no conv: every window, full or partial, averages to exactly 1.
    layers = [torch.ones(1, 9, 1, dtype=torch.float64)]
    w = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    out = fused_aggregate_reference(layers, w, None, pool="avg")
    assert out.shape == (1, 4, 1)
    torch.testing.assert_close(out, torch.ones_like(out))


@pytest.mark.parametrize("ksize", [1, 3, 5, 7])
def test_avg_folding_is_one_stride2_conv_on_even_grids(ksize):
    # Spec section 4: conv (+residual) then 2x2 avg pool == one stride-2 (k+1)x(k+1) depthwise
    # conv whose kernel folds the k x k kernel, its four shifts and the residual.
    torch.manual_seed(1)
    c, h = 3, 6
    x = torch.randn(2, c, h, h, dtype=torch.float64)
    w = torch.randn(c, 1, ksize, ksize, dtype=torch.float64)
    p = ksize // 2
    direct = F.avg_pool2d(F.conv2d(x, w, padding=p, groups=c) + x, 2)
    folded = torch.zeros(c, 1, ksize + 1, ksize + 1, dtype=torch.float64)
    centre = torch.zeros_like(w)
    centre[..., p, p] = 1.0
    for dy, dx in itertools.product((0, 1), (0, 1)):
        folded[..., dy:dy + ksize, dx:dx + ksize] += (w + centre) / 4
    via_fold = F.conv2d(F.pad(x, (p, p + 1, p, p + 1)), folded, stride=2, groups=c)
    torch.testing.assert_close(via_fold, direct, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_half_inputs_compute_in_fp32(dtype):
    layers = make_layers(2, 5, 5, 4, 2, dtype=dtype)
    w, b = make_params(2, 4, 3, dtype=dtype)
    got = fused_aggregate_reference(layers, w, b)
    want = fused_aggregate_reference([h.double() for h in layers], w.double(), b.double())
    assert got.dtype == dtype
    # a single rounding of an fp32 result: within one ulp of the fp64 truth
    ulp = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=ulp, atol=1e-6)


def test_backend_reference_is_the_reference():
    layers = make_layers(2, 4, 6, 3, 2, prefix=1)
    w, b = make_params(2, 3, 3)
    a = fused_aggregate(layers, w, b, grid=(4, 6), num_prefix_tokens=1, backend="reference")
    r = fused_aggregate_reference(layers, w, b, grid=(4, 6), num_prefix_tokens=1)
    assert torch.equal(a, r)
