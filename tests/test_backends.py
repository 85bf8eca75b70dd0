"""Which backends run, which one ``auto`` picks, and what the shared fused-backend flow hands
the kernels: the gradients a call asks for (a frozen vision tower asks for none of the
inputs'), and the layers read where they lie."""

from __future__ import annotations

import pytest
import torch

import saep_kernels
from saep_kernels import FusedAggregateFunction, SAEPProjector, aggregate_spec, fused_aggregate
from saep_kernels.backends import FUSED, extension, resolve_backend, triton
from saep_kernels.spec import GradsNeeded
from conftest import DEVICES, expected_backends, target_params
from helpers import make_layers, make_params


def _without_extension(monkeypatch):
    monkeypatch.setattr(extension, "EXTENSION", None)
    monkeypatch.setattr(extension, "MISSING_REASON", "not built (test)")


def test_expected_backends_are_present():
    """A backend this machine should have (a compiler was there to build it, triton is
    installed) must run: a broken build fails here instead of vanishing from the suite."""
    for device in DEVICES:
        missing = {name: saep_kernels.backends.unavailable_reason(name, torch.device(device))
                   for name in expected_backends(device)
                   if name not in saep_kernels.available_backends(device)}
        assert not missing, f"backends expected on {device} but unavailable: {missing}"


def test_available_backends_are_exactly_those_that_run(monkeypatch):
    want = ["reference"] + [n for n in ("triton", "cpu") if n in expected_backends("cpu")]
    assert sorted(saep_kernels.available_backends("cpu")) == sorted(want)
    # without the extension and without triton, the reference alone is left
    _without_extension(monkeypatch)
    monkeypatch.setattr(triton, "_import_triton_kernels", lambda: (None, "not installed (test)"))
    assert saep_kernels.available_backends("cpu") == ("reference",)


def _spec(layers, w):
    return aggregate_spec(layers, w, None, num_prefix_tokens=1)


def test_auto_picks_the_compiled_cpu_backend_then_the_reference(monkeypatch):
    layers = make_layers(1, 4, 4, 2, 2, prefix=1)
    w, _ = make_params(2, 2, 3)
    cpu = torch.device("cpu")
    if "cpu" in expected_backends("cpu"):
        assert resolve_backend("auto", cpu, _spec(layers, w)) == "cpu"
    _without_extension(monkeypatch)
    assert resolve_backend("auto", cpu, _spec(layers, w)) == "reference"


def test_auto_never_picks_the_triton_interpreter(monkeypatch):
    """Triton runs CPU tensors in its interpreter (for tests): with the compiled CPU kernels
    gone, ``auto`` must fall back to the reference, not to the interpreter."""
    if "triton" not in saep_kernels.available_backends("cpu"):
        pytest.skip("triton's interpreter is not available here")
    _without_extension(monkeypatch)
    layers = make_layers(1, 4, 4, 2, 2, prefix=1)
    w, _ = make_params(2, 2, 3)
    assert "triton" in saep_kernels.available_backends("cpu")
    assert resolve_backend("auto", torch.device("cpu"), _spec(layers, w)) == "reference"


class KernelSpy:
    """Wraps a fused backend's kernel launches and records what the shared flow hands them."""

    def __init__(self, monkeypatch, name):
        self.backend = FUSED[name]
        self.forward_layers, self.backward_layers, self.needs = [], [], []
        launch_forward, launch_backward = self.backend.launch_forward, self.backend.launch_backward

        def forward(spec, layers, *args):
            self.forward_layers.append(list(layers))
            return launch_forward(spec, layers, *args)

        def backward(spec, grad_out, layers, weight, argmax, grad_layers, weight_parts,
                     bias_parts):
            self.needs.append(GradsNeeded(bool(grad_layers), weight_parts is not None,
                                          bias_parts is not None))
            self.backward_layers.append(list(layers))
            return launch_backward(spec, grad_out, layers, weight, argmax, grad_layers,
                                   weight_parts, bias_parts)

        monkeypatch.setattr(self.backend, "launch_forward", forward)
        monkeypatch.setattr(self.backend, "launch_backward", backward)


def _frozen_tower_paths(backend, device):
    """The three ways a model calls the op; each returns the loss of one call."""
    layers = make_layers(2, 4, 4, 4, 2, prefix=1, device=device)  # a frozen vision tower
    w, b = make_params(2, 4, 3, device=device, requires_grad=True)
    proj = SAEPProjector(vision_dim=4, num_layers=2, llm_dim=8, pool="max",
                         backend=backend).to(device)
    spec = aggregate_spec(layers, w, b, num_prefix_tokens=1, pool="max")
    return {
        "fused_aggregate": lambda: fused_aggregate(layers, w, b, num_prefix_tokens=1, pool="max",
                                                   backend=backend).sum(),
        "FusedAggregateFunction": lambda: FusedAggregateFunction.apply(spec, backend, w, b,
                                                                       *layers).sum(),
        "SAEPProjector": lambda: proj(layers, num_prefix_tokens=1).sum(),
    }, layers


@pytest.mark.parametrize("target", target_params())
@pytest.mark.parametrize("path", ["fused_aggregate", "FusedAggregateFunction", "SAEPProjector"])
def test_frozen_tower_asks_for_no_input_gradient(monkeypatch, target, path):
    backend, device = target
    spy = KernelSpy(monkeypatch, backend)
    paths, layers = _frozen_tower_paths(backend, device)
    paths[path]().backward()
    assert len(spy.needs) == 1
    assert spy.needs[0].input is False and spy.needs[0].weight and spy.needs[0].bias
    # the same call with a trainable layer asks for the input gradients
    layers[1].requires_grad_()
    paths[path]().backward()
    assert spy.needs[1].input is True
    assert layers[1].grad is not None and layers[0].grad is None


@pytest.mark.parametrize("target", target_params())
@pytest.mark.parametrize("pool", ["avg", "max"])
def test_layers_are_read_in_place(monkeypatch, target, pool):
    """Layers with channel stride 1 (slices of a wider, longer buffer) reach the kernels as
    they are, forward and backward; a transposed layer is copied once, where the shared flow
    prepares it."""
    backend, device = target
    spy = KernelSpy(monkeypatch, backend)
    sliced = make_layers(2, 4, 4, 3, 2, prefix=1, device=device, layout="slice",
                         requires_grad=True)
    transposed = make_layers(2, 4, 4, 3, 1, prefix=1, device=device, layout="transposed",
                             requires_grad=True)
    layers = sliced + transposed
    w, b = make_params(3, 3, 3, device=device, requires_grad=True)
    fused_aggregate(layers, w, b, num_prefix_tokens=1, pool=pool, backend=backend).sum().backward()
    for seen in (spy.forward_layers[0], spy.backward_layers[0]):
        assert [x.data_ptr() for x in seen[:2]] == [x.data_ptr() for x in sliced]
        assert seen[2].data_ptr() != transposed[0].data_ptr() and seen[2].stride(2) == 1


@pytest.mark.parametrize("target", target_params(compiled_only=True))
def test_compiled_kernels_copy_no_layer(target):
    """Inside the compiled ops nothing copies a layer: the profiler sees no copy of a
    [B, T, C]-shaped tensor during a forward and backward of sliced layers."""
    backend, device = target
    layers = make_layers(2, 4, 4, 3, 2, prefix=1, device=device, layout="slice",
                         requires_grad=True)
    w, b = make_params(2, 3, 3, device=device, requires_grad=True)
    layer_shape = list(layers[0].shape)
    with torch.profiler.profile(record_shapes=True) as prof:
        fused_aggregate(layers, w, b, num_prefix_tokens=1, backend=backend).sum().backward()
    copies = [e for e in prof.events()
              if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")
              and any(list(s) == layer_shape for s in e.input_shapes)]
    assert not copies, [(e.name, e.input_shapes) for e in copies]
