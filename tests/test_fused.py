"""Every fused backend against the reference: forward, gradients, layouts, edge cases.

Fused backends: Triton (on CUDA, or in its CPU interpreter when there is no GPU), and the
compiled CPU/CUDA kernels when built. Triton's interpreter is slow, so its cases form a
covering set (each dtype, K, k, pool mode, residual, prefix, layout and odd/even/non-square
grid appears, combined differently) rather than the full product.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from saep_kernels import (FusedAggregateFunction, aggregate_spec, fused_aggregate,
                          fused_aggregate_reference, num_output_tokens)
from conftest import target_params
from helpers import (assert_forward_close, assert_grad_close, check_forward_and_grads,
                     deterministic_algorithms, grads, make_layers, make_params)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@dataclasses.dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    layers: int
    ksize: int
    pool: str
    residual: bool
    height: int
    width: int
    prefix: int
    layout: str = "contiguous"
    batch: int = 2
    channels: int = 8
    bias: bool = True

    def __str__(self):
        d = {F32: "f32", F16: "f16", BF16: "bf16"}[self.dtype]
        return (f"{d}-K{self.layers}-k{self.ksize}-{self.pool}-{'res' if self.residual else 'nores'}"
                f"-{self.height}x{self.width}-P{self.prefix}-{self.layout}-B{self.batch}"
                f"-C{self.channels}{'' if self.bias else '-nobias'}")


CASES = [
    Case(F32, 1, 3, "avg", True, 4, 4, 0),
    Case(F32, 2, 5, "max", True, 5, 7, 1, "slice"),
    Case(F32, 4, 1, "avg", False, 6, 6, 1, "transposed", batch=1, channels=3),
    Case(F32, 2, 7, "avg", True, 3, 5, 0, batch=1),
    Case(F32, 1, 3, "max", True, 27, 27, 1, "slice", batch=1, channels=4),
    Case(F32, 2, 3, "avg", True, 1, 5, 0, channels=130),
    Case(F16, 2, 3, "max", False, 5, 5, 0, "slice", bias=False),
    Case(F16, 1, 7, "max", True, 4, 6, 1, batch=1),
    Case(F16, 4, 5, "avg", True, 7, 3, 1, "transposed", batch=1, channels=4),
    Case(F16, 1, 3, "avg", True, 24, 24, 1, batch=1, channels=4),
    Case(BF16, 2, 3, "avg", True, 5, 7, 1),
    Case(BF16, 1, 3, "avg", True, 27, 27, 0, batch=1, channels=4),
    Case(BF16, 1, 1, "max", False, 1, 1, 0, batch=3),
    Case(BF16, 2, 7, "avg", False, 2, 9, 1, "slice", batch=1, bias=False),
    Case(BF16, 4, 3, "max", True, 6, 5, 0, batch=1, channels=1),
    Case(BF16, 2, 5, "max", False, 3, 3, 2, "transposed", batch=1),
]


def _inputs(case: Case, device: str, requires_grad: bool = False):
    layers = make_layers(case.batch, case.height, case.width, case.channels, case.layers,
                         prefix=case.prefix, dtype=case.dtype, device=device, layout=case.layout,
                         requires_grad=requires_grad)
    w, b = make_params(case.layers, case.channels, case.ksize, dtype=case.dtype, device=device,
                       bias=case.bias, requires_grad=requires_grad)
    return layers, w, b


def _kwargs(case: Case):
    return dict(grid=(case.height, case.width), num_prefix_tokens=case.prefix,
                residual=case.residual, pool=case.pool)


@dataclasses.dataclass(frozen=True)
class InputVariant:
    """How the inputs of a case are laid out and sized, apart from the main axes."""

    layout: str
    batch: int
    channels: int
    bias: bool


# Each variant meets every dtype x kernel size x pool mode of FULL_CASES
# (test_full_product_covers_every_input_variant): every layout with and without a bias,
# channel counts below a 16-byte vector (3), at one (8) and across a 64-channel block (70).
INPUT_VARIANTS = (
    InputVariant("contiguous", batch=1, channels=8, bias=True),
    InputVariant("slice", batch=2, channels=3, bias=True),
    InputVariant("transposed", batch=1, channels=70, bias=True),
    InputVariant("contiguous", batch=2, channels=70, bias=False),
    InputVariant("slice", batch=1, channels=8, bias=False),
    InputVariant("transposed", batch=2, channels=3, bias=False),
)

# The full product of the main axes for the compiled backends (milliseconds a case), each case
# with the next input variant in turn.
FULL_CASES = [
    Case(dtype, layers, ksize, pool, residual, grid[0], grid[1], prefix,
         **dataclasses.asdict(INPUT_VARIANTS[i % len(INPUT_VARIANTS)]))
    for i, (dtype, layers, ksize, pool, residual, grid, prefix) in enumerate(itertools.product(
        [F32, F16, BF16], [1, 2, 4], [1, 3, 5, 7], ["avg", "max"], [True, False],
        [(4, 4), (5, 7), (1, 3), (27, 27)], [0, 1]))
]


def test_full_product_covers_every_input_variant():
    seen = {(c.dtype, c.ksize, c.pool, InputVariant(c.layout, c.batch, c.channels, c.bias))
            for c in FULL_CASES}
    for dtype, ksize, pool, variant in itertools.product([F32, F16, BF16], [1, 3, 5, 7],
                                                         ["avg", "max"], INPUT_VARIANTS):
        assert (dtype, ksize, pool, variant) in seen


@pytest.mark.parametrize("target", target_params(compiled_only=True))
@pytest.mark.parametrize("case", FULL_CASES, ids=str)
def test_full_product_forward_and_backward(target, case):
    backend, device = target
    layers, w, b = _inputs(case, device, requires_grad=True)
    check_forward_and_grads(backend, layers, w, b, _kwargs(case), str(case))


@pytest.mark.parametrize("target", target_params())
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_matches_reference(target, case):
    backend, device = target
    layers, w, b = _inputs(case, device)
    got = fused_aggregate(layers, w, b, **_kwargs(case), backend=backend)
    want = fused_aggregate_reference(layers, w, b, **_kwargs(case))
    assert got.shape == (case.batch, num_output_tokens(case.height, case.width),
                         case.layers * case.channels)
    assert_forward_close(got, want, str(case))


@pytest.mark.parametrize("target", target_params())
@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_matches_reference(target, case):
    backend, device = target
    layers, w, b = _inputs(case, device, requires_grad=True)
    inputs = [*layers, w, b]
    got_out = fused_aggregate(layers, w, b, **_kwargs(case), backend=backend)
    gy = torch.randn_like(got_out)
    got = grads(got_out, inputs, gy)
    want = grads(fused_aggregate_reference(layers, w, b, **_kwargs(case)), inputs, gy)
    for i in range(case.layers):
        assert_grad_close(got[i], want[i], f"grad hidden_states[{i}] {case}")
    assert_grad_close(got[-2], want[-2], f"grad weight {case}", reduction=True)
    assert_grad_close(got[-1], want[-1], f"grad bias {case}", reduction=True)


@pytest.mark.parametrize("target", target_params())
@pytest.mark.parametrize("which", ["params_only", "inputs_only", "one_layer"])
def test_partial_requires_grad(target, which):
    """A frozen vision tower (only the projector trains), frozen projector params, or one
    layer needing grad: exactly the requested gradients, equal to the reference's."""
    backend, device = target
    case = Case(F32, 3, 3, "max", True, 5, 4, 1)
    layers, w, b = _inputs(case, device)
    if which == "params_only":
        w.requires_grad_()
        b.requires_grad_()
    elif which == "inputs_only":
        layers = [h.requires_grad_() for h in layers]
    else:
        layers[1].requires_grad_()
    inputs = [*layers, w, b]
    out = fused_aggregate(layers, w, b, **_kwargs(case), backend=backend)
    gy = torch.randn_like(out)
    got = grads(out, inputs, gy)
    want = grads(fused_aggregate_reference(layers, w, b, **_kwargs(case)), inputs, gy)
    for i, (g, r) in enumerate(zip(got, want)):
        assert_grad_close(g, r, f"input {i}", reduction=i >= case.layers)


@pytest.mark.parametrize("target", target_params())
def test_mixed_precision_fp32_params_bf16_activations(target):
    backend, device = target
    case = Case(BF16, 2, 3, "avg", True, 4, 5, 1)
    layers, _, _ = _inputs(case, device, requires_grad=True)
    w, b = make_params(2, case.channels, 3, dtype=F32, device=device, requires_grad=True)
    out = fused_aggregate(layers, w, b, **_kwargs(case), backend=backend)
    ref = fused_aggregate_reference(layers, w, b, **_kwargs(case))
    assert out.dtype == BF16
    assert_forward_close(out, ref)
    gy = torch.randn_like(out)
    got, want = grads(out, [w, b], gy), grads(ref, [w, b], gy)
    assert got[0].dtype == F32
    assert_grad_close(got[0], want[0], "weight", reduction=True)
    assert_grad_close(got[1], want[1], "bias", reduction=True)


@pytest.mark.parametrize("target", target_params())
def test_empty_batch(target):
    backend, device = target
    layers = make_layers(0, 3, 3, 4, 2, prefix=1, device=device, requires_grad=True)
    w, b = make_params(2, 4, 3, device=device, requires_grad=True)
    out = fused_aggregate(layers, w, b, num_prefix_tokens=1, backend=backend)
    assert out.shape == (0, 4, 8)
    out.sum().backward()
    assert layers[0].grad.shape == layers[0].shape
    assert torch.count_nonzero(w.grad) == 0 and torch.count_nonzero(b.grad) == 0


@pytest.mark.parametrize("target", target_params())
def test_expanded_grad_out(target):
    """out.sum().backward() hands the backward a stride-0 gradient."""
    backend, device = target
    layers = make_layers(2, 3, 4, 4, 2, device=device, requires_grad=True)
    w, b = make_params(2, 4, 3, device=device, requires_grad=True)
    fused_aggregate(layers, w, b, grid=(3, 4), backend=backend).sum().backward()
    got = [h.grad for h in layers] + [w.grad, b.grad]
    for t in (*layers, w, b):
        t.grad = None
    fused_aggregate_reference(layers, w, b, grid=(3, 4)).sum().backward()
    want = [h.grad for h in layers] + [w.grad, b.grad]
    for i, (g, r) in enumerate(zip(got, want)):
        assert_grad_close(g, r, f"input {i}", reduction=i >= 2)


@pytest.mark.parametrize("target", target_params())
@pytest.mark.parametrize("pool", ["avg", "max"])
def test_deterministic_weight_and_bias_grads(target, pool):
    backend, device = target
    case = Case(F32, 2, 3, pool, True, 6, 5, 1, batch=3)
    layers, w, b = _inputs(case, device, requires_grad=True)
    gy = torch.randn(3, num_output_tokens(6, 5), 2 * case.channels, device=device)
    with deterministic_algorithms():
        first = grads(fused_aggregate(layers, w, b, **_kwargs(case), backend=backend),
                      [*layers, w, b], gy)
        second = grads(fused_aggregate(layers, w, b, **_kwargs(case), backend=backend),
                       [*layers, w, b], gy)
    for g1, g2 in zip(first, second):
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("target", target_params())
@pytest.mark.parametrize("pool", ["avg", "max"])
def test_gradcheck_fp64(target, pool):
    backend, device = target
    layers = make_layers(1, 3, 3, 2, 2, prefix=1, dtype=torch.float64, device=device,
                         requires_grad=True)
    w, b = make_params(2, 2, 3, dtype=torch.float64, device=device, requires_grad=True)

    def fn(*args):
        return fused_aggregate(list(args[:2]), args[2], args[3], num_prefix_tokens=1, pool=pool,
                               backend=backend)

    # Triton's interpreter: fast_mode checks random projections of the Jacobian (a few calls
    # instead of one per input element, which would take minutes); the rest: the full check.
    fast = backend == "triton" and device == "cpu"
    assert torch.autograd.gradcheck(fn, (*layers, w, b), fast_mode=fast)


@pytest.mark.parametrize("target", target_params())
@pytest.mark.parametrize("pool", ["avg", "max"])
def test_autograd_function_matches_reference(target, pool):
    backend, device = target
    case = Case(F32, 2, 3, pool, True, 5, 4, 1, bias=True)
    layers, w, b = _inputs(case, device, requires_grad=True)
    spec = aggregate_spec(layers, w, b, **_kwargs(case))
    out = FusedAggregateFunction.apply(spec, backend, w, b, *layers)
    ref = fused_aggregate_reference(layers, w, b, **_kwargs(case))
    assert_forward_close(out, ref)
    gy = torch.randn_like(out)
    got, want = grads(out, [*layers, w, b], gy), grads(ref, [*layers, w, b], gy)
    for i, (g, r) in enumerate(zip(got, want)):
        assert_grad_close(g, r, f"input {i}", reduction=i >= 2)


@pytest.mark.parametrize("target", target_params())
def test_offsets_beyond_int32(target):
    """Two images 2^31 elements apart in one buffer: element offsets need 64 bits. The
    untouched pages of the 4 GiB buffer are never materialised."""
    backend, device = target
    batch, height, width, channels, prefix = 2, 3, 3, 8, 1
    tokens = prefix + height * width
    stride_b = 2**31 + 16
    storage = torch.empty(stride_b + tokens * channels, dtype=torch.bfloat16, device=device)
    x = storage.as_strided((batch, tokens, channels), (stride_b, channels, 1))
    storage[:tokens * channels].copy_(torch.randn(tokens * channels))
    storage[stride_b:].copy_(torch.randn(tokens * channels))
    w, b = make_params(1, channels, 3, dtype=torch.bfloat16, device=device, requires_grad=True)
    layer = x.detach().requires_grad_()
    got = fused_aggregate([layer], w, b, num_prefix_tokens=prefix, backend=backend)
    dense = x.contiguous().detach().requires_grad_()
    want = fused_aggregate_reference([dense], w, b, num_prefix_tokens=prefix)
    assert_forward_close(got, want)
    gy = torch.randn_like(want)
    g_got = grads(got, [layer, w, b], gy)
    g_want = grads(want, [dense, w, b], gy)
    for i, (g, r) in enumerate(zip(g_got, g_want)):
        assert_grad_close(g, r, f"input {i}", reduction=i > 0)
    del storage, x
