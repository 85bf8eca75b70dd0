"""torch.library registration (opcheck), torch.compile without graph breaks, the module."""

from __future__ import annotations

import pytest
import torch

from saep_kernels import SAEPProjector, fused_aggregate, fused_aggregate_reference
from conftest import target_params
from helpers import assert_forward_close, assert_grad_close, grads, make_layers, make_params

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor",
                 "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("target", target_params())
@pytest.mark.parametrize("pool,bias", [("avg", True), ("max", False)])
def test_opcheck_forward(target, pool, bias):
    backend, device = target
    layers = make_layers(2, 3, 4, 4, 2, prefix=1, device=device, requires_grad=True)
    w, b = make_params(2, 4, 3, device=device, bias=bias, requires_grad=True)
    args = (layers, w, b, 3, 4, 1, True, pool, backend, pool == "max")
    torch.library.opcheck(torch.ops.saep.fused_aggregate.default, args, test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("target", target_params())
@pytest.mark.parametrize("pool", ["avg", "max"])
def test_opcheck_backward(target, pool):
    backend, device = target
    layers = make_layers(2, 3, 4, 4, 2, prefix=1, device=device)
    w, b = make_params(2, 4, 3, device=device)
    _, argmax = torch.ops.saep.fused_aggregate(layers, w, b, 3, 4, 1, True, pool, backend, True)
    gy = torch.randn(2, 4, 8, device=device)
    args = (gy, layers, w, argmax, 3, 4, 1, True, pool, backend, True, True, True)
    torch.library.opcheck(torch.ops.saep.fused_aggregate_backward.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("target", target_params())
def test_compile_fullgraph_function(target):
    backend, device = target
    layers = make_layers(2, 4, 4, 4, 2, prefix=1, device=device, requires_grad=True)
    w, b = make_params(2, 4, 3, device=device, requires_grad=True)

    def fn(layers, w, b):
        return fused_aggregate(layers, w, b, num_prefix_tokens=1, pool="max",
                               backend=backend).square().mean()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    got = compiled(layers, w, b)
    got_grads = torch.autograd.grad(got, [*layers, w, b])
    want = fused_aggregate_reference(layers, w, b, num_prefix_tokens=1, pool="max").square().mean()
    want_grads = torch.autograd.grad(want, [*layers, w, b])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for i, (g, r) in enumerate(zip(got_grads, want_grads)):
        assert_grad_close(g, r, f"input {i}", reduction=True)


def _check_compiled_module(backend, device):
    torch._dynamo.reset()
    proj = SAEPProjector(vision_dim=4, num_layers=2, llm_dim=16, backend=backend).to(device)
    layers = make_layers(2, 4, 4, 4, 2, prefix=1, device=device)
    eager = proj(layers, num_prefix_tokens=1)
    compiled = torch.compile(proj, fullgraph=True)
    out = compiled(layers, num_prefix_tokens=1)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert proj.dwconv.weight.grad is not None and proj.mlp[0].weight.grad is not None


@pytest.mark.parametrize("target", target_params())
def test_compile_fullgraph_module(target):
    _check_compiled_module(*target)


def test_compile_fullgraph_module_auto_backend():
    _check_compiled_module("auto", "cpu")


def test_projector_shapes_and_state_dict_names():
    proj = SAEPProjector(vision_dim=8, num_layers=3, llm_dim=32)
    layers = make_layers(2, 5, 7, 8, 3, prefix=1)
    out = proj(layers, grid=(5, 7), num_prefix_tokens=1)
    assert out.shape == (2, 3 * 4, 32)
    assert SAEPProjector.num_output_tokens(24) == 144
    assert SAEPProjector.num_output_tokens(27) == 196
    assert list(proj.state_dict()) == ["dwconv.weight", "dwconv.bias", "mlp.0.weight",
                                       "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]
    out.sum().backward()
    assert all(p.grad is not None for p in proj.parameters())


@pytest.mark.parametrize("target", target_params())
def test_projector_backends_share_checkpoints(target):
    backend, device = target
    ref = SAEPProjector(vision_dim=4, num_layers=2, llm_dim=16, pool="max", backend="reference")
    fused = SAEPProjector(vision_dim=4, num_layers=2, llm_dim=16, pool="max", backend=backend)
    fused.load_state_dict(ref.state_dict())
    ref, fused = ref.to(device), fused.to(device)
    layers = make_layers(2, 3, 5, 4, 2, prefix=1, device=device, requires_grad=True)
    a = ref(layers, grid=(3, 5), num_prefix_tokens=1)
    b = fused(layers, grid=(3, 5), num_prefix_tokens=1)
    assert_forward_close(b, a)
    gy = torch.randn_like(a)
    ga = grads(a, [*layers, *ref.parameters()], gy)
    gb = grads(b, [*layers, *fused.parameters()], gy)
    for i, (x, y) in enumerate(zip(gb, ga)):
        assert_grad_close(x, y, f"grad {i}", reduction=True)


def test_projector_dtype_and_device_factory_kwargs():
    proj = SAEPProjector(vision_dim=4, num_layers=2, llm_dim=8, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in proj.parameters())
    out = proj(make_layers(1, 4, 4, 4, 2, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
