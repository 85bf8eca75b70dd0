"""Each bad input of docs/op.md raises a clear error that names the argument."""

import pytest
import torch

import saep_kernels
from saep_kernels import BackendUnavailable, SAEPProjector, fused_aggregate
from saep_kernels.backends import extension, triton
from conftest import target_params
from helpers import make_layers, make_params


@pytest.fixture
def good():
    layers = make_layers(2, 4, 4, 3, 2, prefix=1)
    w, b = make_params(2, 3, 3)
    return layers, w, b


def call(layers, w, b=None, **kw):
    kw.setdefault("num_prefix_tokens", 1)
    kw.setdefault("backend", "reference")
    return fused_aggregate(layers, w, b, **kw)


@pytest.mark.parametrize("fn", [fused_aggregate, saep_kernels.fused_aggregate_reference])
def test_wrong_kc_in_weight(good, fn):
    layers, _, _ = good
    w, _ = make_params(3, 3, 3)  # 9 channels, want 6
    with pytest.raises(ValueError, match=r"weight must have K\*C = 2\*3 = 6 channels.*got 9"):
        fn(layers, w, None, num_prefix_tokens=1)


def test_token_count_not_grid(good):
    layers, w, b = good
    with pytest.raises(ValueError, match=r"grid=\(4, 5\) holds 20 tokens.*T - num_prefix_tokens = 17 - 1 = 16"):
        call(layers, w, b, grid=(4, 5))


def test_non_square_without_grid():
    layers = make_layers(1, 3, 5, 2, 1)
    w, _ = make_params(1, 2, 3)
    with pytest.raises(ValueError, match=r"grid=None needs a square number of patch tokens.*15"):
        call(layers, w, num_prefix_tokens=0)


def test_prefix_not_skipped_makes_grid_wrong(good):
    layers, w, b = good
    with pytest.raises(ValueError, match="square number of patch tokens"):
        call(layers, w, b, num_prefix_tokens=0)  # 17 tokens: CLS not dropped


def test_mixed_dtypes(good):
    layers, w, b = good
    layers = [layers[0], layers[1].double()]
    with pytest.raises(TypeError, match=r"hidden_states\[0\] is torch.float32, hidden_states\[1\] is torch.float64"):
        call(layers, w, b)


def test_mixed_shapes(good):
    layers, w, b = good
    layers = [layers[0], layers[1][:1]]
    with pytest.raises(ValueError, match=r"hidden_states\[1\] is \(1, 17, 3\)"):
        call(layers, w, b)


def test_mixed_devices(good):
    layers, w, b = good
    layers = [layers[0], layers[1].to("meta")]
    with pytest.raises(ValueError, match=r"hidden_states\[1\] is on meta"):
        call(layers, w, b)


def test_weight_on_other_device(good):
    layers, w, b = good
    with pytest.raises(ValueError, match="weight must be on the device of hidden_states"):
        call(layers, w.to("meta"), b)


def test_bias_on_other_device(good):
    layers, w, b = good
    with pytest.raises(ValueError, match="bias must be on the device of hidden_states"):
        call(layers, w, b.to("meta"))


def test_even_kernel_size(good):
    layers, _, _ = good
    w = torch.randn(6, 1, 4, 4)
    with pytest.raises(ValueError, match="weight must have an odd kernel size.*even k=4"):
        call(layers, w)


def test_unsupported_odd_kernel_size(good):
    layers, _, _ = good
    with pytest.raises(ValueError, match=r"kernel size k must be one of \(1, 3, 5, 7\), got k=9"):
        call(layers, torch.randn(6, 1, 9, 9))


@pytest.mark.parametrize("shape", [(6, 3, 3), (6, 2, 3, 3), (6, 1, 3, 5)])
def test_weight_not_depthwise_layout(good, shape):
    layers, _, _ = good
    with pytest.raises(ValueError, match=r"weight must have shape \[K\*C, 1, k, k\]"):
        call(layers, torch.randn(*shape))


def test_bias_wrong_shape(good):
    layers, w, _ = good
    with pytest.raises(ValueError, match=r"bias must have shape \[K\*C\] = \[6\], got \(5,\)"):
        call(layers, w, torch.randn(5))


def test_unknown_pool(good):
    layers, w, b = good
    with pytest.raises(ValueError, match=r"pool must be one of \('avg', 'max'\), got 'mean'"):
        call(layers, w, b, pool="mean")


def test_unknown_backend(good):
    layers, w, b = good
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'tpu'"):
        call(layers, w, b, backend="tpu")


def test_unavailable_backend_says_why(good):
    layers, w, b = good
    # CUDA kernels never run on CPU tensors
    with pytest.raises(BackendUnavailable, match=r"backend='cuda' is unavailable: .*cpu tensor"):
        call(layers, w, b, backend="cuda")


def test_triton_on_cpu_without_interpreter_says_why(good, monkeypatch):
    layers, w, b = good
    modules, _ = triton._import_triton_kernels()
    if modules is None:
        pytest.skip("triton not installed")
    _, _, shared = modules
    monkeypatch.setattr(shared, "interpreting", lambda: False)
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        call(layers, w, b, backend="triton")


def test_too_many_layers_for_the_compiled_kernels():
    if extension.EXTENSION is None:
        pytest.skip("the C++ extension is not built")
    n = extension.EXTENSION.MAX_LAYERS + 1
    layers = make_layers(1, 2, 2, 2, n)
    w, _ = make_params(n, 2, 1)
    with pytest.raises(BackendUnavailable, match=f"at most {n - 1} layers, got {n}"):
        fused_aggregate(layers, w, backend="cpu")
    # "auto" steps over the compiled kernels
    assert fused_aggregate(layers, w).shape == (1, 1, 2 * n)


def test_missing_extension_says_why(good, monkeypatch):
    layers, w, b = good
    monkeypatch.setattr(extension, "EXTENSION", None)
    monkeypatch.setattr(extension, "MISSING_REASON",
                        "the C++ extension saep_kernels._C is not built (test)")
    with pytest.raises(BackendUnavailable, match=r"backend='cpu' is unavailable: the C\+\+ extension"):
        call(layers, w, b, backend="cpu")


@pytest.mark.parametrize("value,exc,pattern", [
    (torch.randn(2, 17, 3), TypeError, "hidden_states must be a list or tuple"),
    ([], ValueError, "at least one tensor"),
    ([torch.randn(17, 3)], ValueError, r"hidden_states\[0\] must have shape \[B, T, C\]"),
    ([torch.ones(2, 17, 3, dtype=torch.int64)], TypeError, r"hidden_states\[0\] must be float16"),
    (["x"], TypeError, r"hidden_states\[0\] must be a torch.Tensor"),
])
def test_bad_hidden_states(value, exc, pattern):
    w, _ = make_params(1, 3, 3)
    with pytest.raises(exc, match=pattern):
        call(value, w)


@pytest.mark.parametrize("prefix,pattern", [(-1, "num_prefix_tokens must be an int >= 0"),
                                            (17, "num_prefix_tokens must be smaller than"),
                                            (1.0, "num_prefix_tokens must be an int")])
def test_bad_prefix(good, prefix, pattern):
    layers, w, b = good
    with pytest.raises(ValueError, match=pattern):
        call(layers, w, b, num_prefix_tokens=prefix)


@pytest.mark.parametrize("grid,exc", [((4,), TypeError), ((4.0, 4), TypeError),
                                      ((0, 16), ValueError), ("4x4", TypeError)])
def test_bad_grid(good, grid, exc):
    layers, w, b = good
    with pytest.raises(exc, match="grid"):
        call(layers, w, b, grid=grid)


def test_bad_residual(good):
    layers, w, b = good
    with pytest.raises(TypeError, match="residual must be a bool"):
        call(layers, w, b, residual=1)


def test_integer_weight(good):
    layers, _, _ = good
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        call(layers, torch.ones(6, 1, 3, 3, dtype=torch.int32))


@pytest.mark.parametrize("kw,pattern", [
    (dict(kernel_size=4), "kernel_size must be one of"),
    (dict(pool="sum"), "pool must be one of"),
    (dict(backend="tpu"), "backend must be one of"),
    (dict(vision_dim=0), "vision_dim must be a positive int"),
])
def test_projector_bad_config(kw, pattern):
    args = dict(vision_dim=4, num_layers=2, llm_dim=8)
    args.update(kw)
    with pytest.raises(ValueError, match=pattern):
        SAEPProjector(**args)


EMPTY_AXIS_BACKENDS = ["reference"] + [p.values[0][0] for p in target_params()
                                       if p.values[0][1] == "cpu"]


@pytest.mark.parametrize("backend", EMPTY_AXIS_BACKENDS)
@pytest.mark.parametrize("shape, grid, prefix, pattern", [
    ((2, 17, 0), None, 1, r"at least one channel \(C >= 1\), got shape \(2, 17, 0\)"),
    ((2, 0, 3), (0, 4), 0, r"at least one token .*got shape \(2, 0, 3\)"),
    ((2, 0, 3), None, 0, r"at least one token .*got shape \(2, 0, 3\)"),
], ids=["C=0", "H=0", "T=0"])
def test_empty_channel_or_token_axis_is_a_clear_error(backend, shape, grid, prefix, pattern):
    """C = 0 and T = 0 (no grid) raise the same ValueError naming hidden_states with every
    backend (B = 0 gives an empty result: test_fused.py)."""
    layers = [torch.randn(shape) for _ in range(2)]
    w = torch.randn(2 * shape[2], 1, 3, 3)
    with pytest.raises(ValueError, match=r"hidden_states must have " + pattern):
        fused_aggregate(layers, w, None, grid=grid, num_prefix_tokens=prefix, backend=backend)
