"""fused_aggregate_varlen: packed images of different grids, against the per-image reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saep_kernels import (BackendUnavailable, fused_aggregate, fused_aggregate_reference,
                          fused_aggregate_varlen)
from saep_kernels.backends import available_backends, fused_backend
from saep_kernels.varlen import VarlenSpec, image_table
from conftest import expected_backends
from helpers import assert_forward_close, assert_grad_close, make_params

# the backends that take packed grids, on CPU tensors (Triton in its interpreter); each one
# expected here must be present (tests/test_backends.py says why one is not)
VARLEN_BACKENDS = ["reference"] + [b for b in ("triton", "cpu") if b in expected_backends("cpu")]
# the fused ones, compared with the reference backend
VARLEN_KERNELS = VARLEN_BACKENDS[1:]
for _name in VARLEN_KERNELS:
    if _name not in available_backends("cpu"):
        pytest.fail(f"the {_name} backend is expected here (tests/test_backends.py says why "
                    "not)", pytrace=False)


def _needs_gpu(backend):
    return pytest.mark.skipif(
        not torch.cuda.is_available() or backend not in available_backends("cuda"),
        reason=f"needs a GPU and the {backend} backend on it")


# (backend, device) of each set of fused kernels: on CPU tensors the C++ kernels and Triton's
# interpreter; on a GPU the Triton and CUDA kernels
KERNELS = [pytest.param(b, "cpu", id=b) for b in VARLEN_KERNELS] + [
    pytest.param(b, "cuda", id=f"{b}-gpu", marks=_needs_gpu(b)) for b in ("triton", "cuda")]

MIXES = {
    "single": [(5, 7)],
    "odd-nonsquare": [(5, 7), (4, 4), (1, 9), (6, 2), (3, 3)],
    "rows-and-columns": [(1, 1), (9, 1), (1, 6), (2, 2)],
    "even": [(4, 6), (2, 2), (6, 4)],
}


def to_merge_2x2(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """An image's row-major tokens [H*W, C] in Qwen2-VL's merge order, written out loop by
    loop (each 2x2 window's four tokens consecutive, windows row-major)."""
    rows = []
    for wi in range(height // 2):
        for wj in range(width // 2):
            for dy in range(2):
                for dx in range(2):
                    rows.append(tokens[(2 * wi + dy) * width + 2 * wj + dx])
    return torch.stack(rows)


def make_packed(grids, prefixes, channels, num_layers, dtype=torch.float32, layout="row_major"):
    """(packed layers [N, C], per-image row-major layers [1, P_i + H_i*W_i, C])."""
    images = [[torch.randn(1, p + h * w, channels, dtype=torch.float64).to(dtype)
               for _ in range(num_layers)] for p, (h, w) in zip(prefixes, grids)]
    packed = []
    for layer in range(num_layers):
        parts = []
        for p, (h, w), image in zip(prefixes, grids, images):
            x = image[layer][0]
            grid_tokens = x[p:] if layout == "row_major" else to_merge_2x2(x[p:], h, w)
            parts += [x[:p], grid_tokens]
        packed.append(torch.cat(parts))
    return packed, images


def per_image_reference(images, grids, prefixes, weight, bias, pool, residual=True):
    return torch.cat([
        fused_aggregate_reference(image, weight, bias, grid=g, num_prefix_tokens=p, pool=pool,
                                  residual=residual)[0]
        for image, g, p in zip(images, grids, prefixes)])


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("layout", ["row_major", "merge_2x2"])
@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize("backend", VARLEN_BACKENDS)
def test_matches_per_image_reference(mix, layout, pool, backend):
    grids = MIXES[mix]
    if layout == "merge_2x2" and any(h % 2 or w % 2 for h, w in grids):
        pytest.skip("merge_2x2 takes even grids")
    prefixes = [i % 2 for i in range(len(grids))]
    packed, images = make_packed(grids, prefixes, 6, 2, layout=layout)
    packed = [x.requires_grad_() for x in packed]
    w, b = make_params(2, 6, 3, requires_grad=True)
    out, offsets = fused_aggregate_varlen(packed, w, b, grids=grids, num_prefix_tokens=prefixes,
                                          layout=layout, pool=pool, backend=backend)
    images = [[x.requires_grad_() for x in image] for image in images]
    expected = per_image_reference(images, grids, prefixes, w, b, pool)
    assert_forward_close(out, expected)
    assert offsets.tolist() == [0] + list(torch.tensor(
        [((h + 1) // 2) * ((w_ + 1) // 2) for h, w_ in grids]).cumsum(0).tolist())
    gy = torch.randn_like(out)
    got = torch.autograd.grad(out, packed + [w, b], gy)
    want = torch.autograd.grad(expected, [x for image in images for x in image] + [w, b], gy)
    # the per-image gradients, packed as the inputs are
    k = len(packed)
    for layer in range(k):
        parts = []
        for i, (p, (h, w_)) in enumerate(zip(prefixes, grids)):
            g = want[i * k + layer][0]
            parts += [g[:p], g[p:] if layout == "row_major" else to_merge_2x2(g[p:], h, w_)]
        assert_grad_close(got[layer], torch.cat(parts), f"grad_hidden_states[{layer}]")
    assert_grad_close(got[k], want[-2], "grad_weight", reduction=True)
    assert_grad_close(got[k + 1], want[-1], "grad_bias", reduction=True)


def kernel_cases():
    """(backend, device, dtype, ksize): every kernel size in every dtype; in Triton's
    interpreter (seconds a call at k=7) every dtype at k=3 and k=1 in fp32 (the widest reach,
    k=7, is in test_no_tap_crosses_an_image)."""
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    cases = []
    for kernels in KERNELS:
        backend, device = kernels.values
        interpreted = backend == "triton" and device == "cpu"
        for dtype in dtypes:
            for ksize in (1, 3, 5, 7):
                if not interpreted or ksize == 3 or (dtype == torch.float32 and ksize == 1):
                    cases.append(pytest.param(backend, device, dtype, ksize, marks=kernels.marks,
                                              id=f"{kernels.id}-{str(dtype)[6:]}-k{ksize}"))
    return cases


@pytest.mark.parametrize("backend,device,dtype,ksize", kernel_cases())
@pytest.mark.parametrize("pool", ["avg", "max"])
def test_kernels_match_reference_backend(backend, device, dtype, ksize, pool):
    grids, prefixes = MIXES["odd-nonsquare"], [1, 0, 2, 0, 1]
    if not (backend == "triton" and device == "cpu"):  # (the interpreter: seconds a tile)
        # a grid of several CUDA tiles both ways next to grids smaller than one
        grids, prefixes = grids + [(13, 17)], prefixes + [0]
    packed, _ = make_packed(grids, prefixes, 8, 3, dtype=dtype)
    packed = [x.to(device) for x in packed]
    w, b = make_params(3, 8, ksize, device=device, requires_grad=True)
    results = {}
    for name in ("reference", backend):
        xs = [x.detach().clone().requires_grad_() for x in packed]
        out, _ = fused_aggregate_varlen(xs, w, b, grids=grids, num_prefix_tokens=prefixes,
                                        pool=pool, backend=name)
        gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
        results[name] = (out, torch.autograd.grad(out, xs + [w, b], gy))
    (ref, ref_grads), (got, got_grads) = results["reference"], results[backend]
    assert_forward_close(got, ref)
    for i, (g, r) in enumerate(zip(got_grads, ref_grads)):
        assert_grad_close(g, r, f"grad {i}", reduction=i >= len(packed))


@pytest.mark.parametrize("backend", VARLEN_BACKENDS)
@pytest.mark.parametrize("pool", ["avg", "max"])
def test_gradcheck_fp64(backend, pool):
    grids, prefixes = [(3, 2), (1, 3), (2, 2)], [1, 0, 0]
    packed, _ = make_packed(grids, prefixes, 2, 2, dtype=torch.float64)
    w, b = make_params(2, 2, 3, dtype=torch.float64)

    def f(x0, x1, weight, bias):
        return fused_aggregate_varlen([x0, x1], weight, bias, grids=grids,
                                      num_prefix_tokens=prefixes, pool=pool, backend=backend)[0]

    inputs = [t.detach().requires_grad_() for t in (*packed, w, b)]
    # Triton's interpreter: one directional derivative per input (a full Jacobian is ~200 calls)
    assert torch.autograd.gradcheck(f, inputs, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", VARLEN_BACKENDS)
@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize("image", [0, 1, 2])
def test_no_tap_crosses_an_image(backend, pool, image):
    """An image's outputs and gradients stay the same when its neighbours' tokens change, and
    its output gradient reaches no other image's tokens."""
    if backend == "triton" and image == 1:
        pytest.skip("Triton's interpreter is slow: the first and the last image cover reads "
                    "past either end")
    grids, prefixes = [(3, 5), (4, 3), (2, 7)], [0, 0, 0]
    layers = 1 if backend == "triton" else 2  # the interpreter: a program per layer
    packed, _ = make_packed(grids, prefixes, 4, layers)
    w, b = make_params(layers, 4, 7)  # the widest kernel reaches furthest
    table, offsets = image_table(grids, prefixes)
    first = int(table[image, 2])
    last = first + grids[image][0] * grids[image][1]
    lo, hi = int(offsets[image]), int(offsets[image + 1])
    changed = [x.clone() for x in packed]
    for x in changed:
        x[:first] = 1e3 * torch.randn_like(x[:first])
        x[last:] = -1e3 * torch.randn_like(x[last:])
    results = []
    for xs in (packed, changed):
        xs = [x.clone().requires_grad_() for x in xs]
        out, _ = fused_aggregate_varlen(xs, w, b, grids=grids, pool=pool, backend=backend)
        gy = torch.zeros_like(out)
        gy[lo:hi] = 1.0
        grad = torch.autograd.grad(out, xs, gy)
        results.append((out[lo:hi], [g[first:last] for g in grad],
                        [torch.cat([g[:first], g[last:]]) for g in grad]))
    (out0, grad0, _), (out1, grad1, outside) = results
    assert torch.equal(out0, out1)
    for g0, g1, g_out in zip(grad0, grad1, outside):
        assert torch.equal(g0, g1)
        assert not g_out.any(), "a gradient reached another image's tokens"


@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grid", [(5, 6), (13, 17)])
@pytest.mark.parametrize("kernels,device", KERNELS)
def test_fixed_grid_batch_bitwise_equal(kernels, device, grid, pool, dtype):
    """A batch of one grid gives bitwise the same output and gradients through either op."""
    if kernels == "triton" and device == "cpu" and grid == (13, 17):
        pytest.skip("Triton's interpreter takes seconds a tile: the multi-tile grid runs on GPUs")
    (height, width), batch, prefix = grid, 3, 1
    layers = [torch.randn(batch, prefix + height * width, 8).to(device, dtype)
              for _ in range(2)]
    w, b = make_params(2, 8, 3, device=device, requires_grad=True)
    fixed_xs = [x.clone().requires_grad_() for x in layers]
    fixed = fused_aggregate(fixed_xs, w, b, grid=(height, width), num_prefix_tokens=prefix,
                            pool=pool, backend=kernels)
    packed_xs = [x.reshape(1, -1, 8).clone().requires_grad_() for x in layers]
    packed, _ = fused_aggregate_varlen(packed_xs, w, b, grids=[(height, width)] * batch,
                                       num_prefix_tokens=prefix, pool=pool, backend=kernels)
    assert packed.shape == (1, batch * fixed.shape[1], fixed.shape[2])
    assert torch.equal(packed.reshape(fixed.shape), fixed)
    gy = torch.randn(fixed.shape).to(fixed)
    g_fixed = torch.autograd.grad(fixed, fixed_xs + [w, b], gy)
    g_packed = torch.autograd.grad(packed, packed_xs + [w, b], gy.reshape(packed.shape))
    for gf, gp in zip(g_fixed, g_packed):
        assert torch.equal(gp.reshape(gf.shape), gf)


def check_random_mix(data, backend):
    n = data.draw(st.integers(1, 5))
    grids = [(data.draw(st.integers(1, 7)), data.draw(st.integers(1, 7))) for _ in range(n)]
    prefixes = [data.draw(st.integers(0, 2)) for _ in range(n)]
    ksize = data.draw(st.sampled_from([1, 3, 5]))
    pool = data.draw(st.sampled_from(["avg", "max"]))
    residual = data.draw(st.booleans())
    channels, num_layers = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 3))
    packed, images = make_packed(grids, prefixes, channels, num_layers)
    w, b = make_params(num_layers, channels, ksize)
    expected = per_image_reference(images, grids, prefixes, w, b, pool, residual)
    out, _ = fused_aggregate_varlen(packed, w, b, grids=grids, num_prefix_tokens=prefixes,
                                    pool=pool, residual=residual, backend=backend)
    assert_forward_close(out, expected)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_random_mixes_cpu(data):
    check_random_mix(data, "cpu")


@pytest.mark.skipif("triton" not in VARLEN_KERNELS, reason="triton is not installed")
@settings(max_examples=6, deadline=None)  # the interpreter: seconds an example
@given(data=st.data())
def test_random_mixes_triton(data):
    check_random_mix(data, "triton")


def test_grids_as_tensor_and_3d_inputs():
    grids = [(3, 4), (2, 5)]
    packed, _ = make_packed(grids, [0, 0], 4, 2)
    w, b = make_params(2, 4, 3)
    out2d, off = fused_aggregate_varlen(packed, w, b, grids=grids)
    out3d, off3 = fused_aggregate_varlen([x[None] for x in packed], w, b,
                                         grids=torch.tensor(grids))
    assert out3d.shape == (1,) + out2d.shape
    assert torch.equal(out3d[0], out2d) and torch.equal(off, off3)


def test_errors_name_the_argument():
    grids = [(3, 4), (2, 5)]
    packed, _ = make_packed(grids, [0, 0], 4, 2)
    w, b = make_params(2, 4, 3)
    with pytest.raises(ValueError, match="grids hold 21 tokens .* N = 22"):
        fused_aggregate_varlen(packed, w, b, grids=[(3, 4), (3, 3)])
    with pytest.raises(ValueError, match=r"grids\[1\] must be positive"):
        fused_aggregate_varlen(packed, w, b, grids=[(3, 4), (0, 5)])
    with pytest.raises(TypeError, match="mixed layouts"):
        fused_aggregate_varlen(packed, w, b, grids=grids, layout=["row_major", "merge_2x2"])
    with pytest.raises(ValueError, match="layout must be one of"):
        fused_aggregate_varlen(packed, w, b, grids=grids, layout="column_major")
    with pytest.raises(ValueError, match=r"merge_2x2.*grids\[0\] = \(3, 4\)"):
        fused_aggregate_varlen(packed, w, b, grids=grids, layout="merge_2x2")
    with pytest.raises(ValueError, match="num_prefix_tokens must be an int or one int per image"):
        fused_aggregate_varlen(packed, w, b, grids=grids, num_prefix_tokens=[0])
    with pytest.raises(ValueError, match="weight must have K.C"):
        fused_aggregate_varlen(packed, make_params(3, 4, 3)[0], None, grids=grids)
    with pytest.raises(ValueError, match=r"hidden_states\[0\] must be packed tokens"):
        fused_aggregate_varlen([x.reshape(2, 11, 4) for x in packed], w, b, grids=grids)



def test_every_fused_backend_takes_packed_grids_and_one_without_says_so():
    """triton, cpu and cuda take packed grids; a fused backend without packed kernels says
    so (FusedBackend.supports), and the CUDA kernels cannot run CPU tensors."""
    from saep_kernels.backends.fused import FusedBackend

    spec = VarlenSpec(residual=True, pool="avg", num_images=2, tokens=22, out_tokens=7,
                      channels=4, num_layers=2, kernel_size=3)
    for name in ("triton", "cpu", "cuda"):
        assert fused_backend(name).supports(spec) is None, name

    class FixedGridOnly(FusedBackend):
        name = "fixed-grid-only"

    assert "does not take packed grids" in FixedGridOnly().supports(spec)
    packed, _ = make_packed([(3, 4), (2, 5)], [0, 0], 4, 2)
    w, b = make_params(2, 4, 3)
    with pytest.raises(BackendUnavailable, match="backend='cuda' is unavailable"):
        fused_aggregate_varlen(packed, w, b, grids=[(3, 4), (2, 5)], backend="cuda")


def test_kernel_op_rejects_a_bad_image_table():
    """The compiled op is public: a table whose images overlap or overrun N is an error."""
    grids = [(3, 4), (2, 5)]
    packed, _ = make_packed(grids, [0, 0], 4, 2)
    w = torch.randn(9, 8)
    out = torch.empty(1, 4 + 3, 8)
    layers = [x[None] for x in packed]
    table, _ = image_table(grids, [0, 0])
    torch.ops.saep_C.fused_aggregate_varlen_fwd(layers, w, None, table, out, None, True, "avg")
    for row, col, value, match in [(1, 2, 5, "overlap"), (1, 2, 13, "pass the N"),
                                   (1, 0, 0, "empty grid"), (1, 3, 5, "must start at output")]:
        bad = table.clone()
        bad[row, col] = value
        with pytest.raises(RuntimeError, match=match):
            torch.ops.saep_C.fused_aggregate_varlen_fwd(layers, w, None, bad, out, None, True,
                                                        "avg")


@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize("backend", VARLEN_KERNELS)
def test_opcheck(backend, pool):
    grids = [(3, 4), (2, 5)]
    packed, _ = make_packed(grids, [1, 0], 4, 2)
    layers = [x[None].requires_grad_() for x in packed]
    w, b = make_params(2, 4, 3, requires_grad=True)
    table, offsets = image_table(grids, [1, 0])
    out_tokens = int(offsets[-1])
    args = (layers, w, b, table, out_tokens, True, pool, backend, pool == "max")
    torch.library.opcheck(torch.ops.saep.fused_aggregate_varlen.default, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor", "test_aot_dispatch_dynamic"))
    _, argmax = torch.ops.saep.fused_aggregate_varlen(*args[:-1], True)
    gy = torch.randn(1, out_tokens, 8)
    bargs = ([x.detach() for x in layers], w.detach(), argmax, table, out_tokens, True, pool,
             backend, True, True, True)
    torch.library.opcheck(torch.ops.saep.fused_aggregate_varlen_backward.default, (gy,) + bargs,
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph():
    grids = [(3, 4), (2, 5)]
    packed, _ = make_packed(grids, [0, 0], 4, 2)
    xs = [x.requires_grad_() for x in packed]
    w, b = make_params(2, 4, 3, requires_grad=True)

    def f(x0, x1, weight, bias):
        return fused_aggregate_varlen([x0, x1], weight, bias, grids=grids, backend="cpu")[0]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(*xs, w, b)
    expected = f(*xs, w, b)
    assert torch.equal(out, expected)
    gy = torch.randn_like(out)
    for g, e in zip(torch.autograd.grad(out, xs + [w, b], gy),
                    torch.autograd.grad(expected, xs + [w, b], gy)):
        assert torch.equal(g, e)



@pytest.mark.skipif("triton" not in VARLEN_KERNELS, reason="triton is not installed")
def test_triton_rejects_a_bad_image_table():
    """The custom op is public and the Triton kernels trust their table: the launch checks
    it on the host first (as the compiled op does), naming ``images``."""
    grids = [(3, 4), (2, 5)]
    packed, _ = make_packed(grids, [0, 0], 4, 2)
    layers = [x[None] for x in packed]
    w, _ = make_params(2, 4, 3)
    table, _ = image_table(grids, [0, 0])
    op = torch.ops.saep.fused_aggregate_varlen
    op(layers, w, None, table, 7, True, "avg", "triton", False)
    for row, col, value, match in [(1, 2, 5, "overlap"), (1, 2, 13, "pass the N"),
                                   (1, 0, 0, "empty"), (1, 3, 5, "first window")]:
        bad = table.clone()
        bad[row, col] = value
        with pytest.raises(ValueError, match=rf"images\[{row}\] .*{match}"):
            op(layers, w, None, bad, 7, True, "avg", "triton", False)
    with pytest.raises(ValueError, match="images hold 7 output tokens, but out_tokens is 8"):
        op(layers, w, None, table, 8, True, "avg", "triton", False)
    with pytest.raises(ValueError, match="images must be a contiguous int64 CPU tensor"):
        op(layers, w, None, table.int(), 7, True, "avg", "triton", False)


def test_tile_table_covers_each_image_once():
    """Triton's tiles of packed grids: each image's windows in tiles of block_p, in order,
    none spanning two images, none empty (written out loop by loop here)."""
    pytest.importorskip("triton")
    from saep_kernels.triton_kernels.shared import tile_table

    grids = [(5, 7), (1, 1), (9, 1), (4, 4), (1, 9), (2, 2)]
    table, _ = image_table(grids, [1, 0, 0, 2, 0, 0])
    for block_p in (1, 2, 4, 16):
        expected = [[i, first] for i, (h, w) in enumerate(grids)
                    for first in range(0, ((h + 1) // 2) * ((w + 1) // 2), block_p)]
        assert tile_table(table, block_p).tolist() == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_triton_on_gpu_never_synchronises():
    """The image and tile tables are built on the host and copied without waiting: a packed
    forward and backward on the GPU make no synchronising call, and match the reference."""
    grids, prefixes = [(5, 7), (4, 4), (1, 9), (6, 2)], [1, 0, 2, 0]
    packed, _ = make_packed(grids, prefixes, 8, 2)
    w, b = make_params(2, 8, 3, requires_grad=True)
    cuda_params = [t.detach().cuda().requires_grad_() for t in (w, b)]
    results = []
    for backend, device in (("reference", "cpu"), ("triton", "cuda"), ("triton", "cuda")):
        xs = [x.to(device).requires_grad_() for x in packed]
        params = [w, b] if device == "cpu" else cuda_params
        checked = len(results) == 2  # the last call: its kernels are compiled already
        torch.cuda.synchronize()
        if checked:
            torch.cuda.set_sync_debug_mode("error")
        try:
            out, _ = fused_aggregate_varlen(xs, *params, grids=grids, num_prefix_tokens=prefixes,
                                            backend=backend)
            grads = torch.autograd.grad(out, xs + params, torch.ones_like(out))
        finally:
            torch.cuda.set_sync_debug_mode(0)
        results.append((out, grads))
    (ref, ref_grads), _, (got, got_grads) = results
    assert_forward_close(got, ref)
    for i, (g, r) in enumerate(zip(got_grads, ref_grads)):
        assert_grad_close(g, r, f"grad {i}", reduction=i >= len(packed))
