"""GPU-only checks: the reference configurations (docs/op.md) at full channel width, CUDA graph
capture and replay, and compile with CUDA graphs. Skipped without a CUDA device."""

import pytest
import torch

from saep_kernels import SAEPProjector
from saep_kernels.configs import REFERENCE_CONFIGS
from conftest import HAS_CUDA, fused_targets
from helpers import assert_grad_close, check_forward_and_grads, make_layers, make_params

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]

GPU_BACKENDS = [name for name, device in fused_targets() if device == "cuda"] or ["triton"]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("config", list(REFERENCE_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("pool", ["avg", "max"])
def test_reference_configs(backend, config, dtype, pool):
    # the geometry and channel width of the configuration, two images (crops) a batch
    cfg = REFERENCE_CONFIGS[config]
    layers = make_layers(2 * cfg.crops, cfg.height, cfg.width, cfg.channels, cfg.layers,
                         prefix=cfg.prefix, dtype=dtype, device="cuda", requires_grad=True)
    w, b = make_params(cfg.layers, cfg.channels, 3, dtype=dtype, device="cuda",
                       requires_grad=True)
    check_forward_and_grads(backend, layers, w, b,
                            dict(num_prefix_tokens=cfg.prefix, pool=pool), config)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture_and_replay(backend):
    proj = SAEPProjector(vision_dim=256, num_layers=4, llm_dim=512, backend=backend).cuda()
    layers = make_layers(4, 24, 24, 256, 4, prefix=1, dtype=torch.float32, device="cuda")
    static_in = [h.clone() for h in layers]
    # warm up on a side stream (compiles kernels, allocates workspaces), then capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            proj.zero_grad(set_to_none=False)
            proj(static_in, num_prefix_tokens=1).sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    proj.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        static_out = proj(static_in, num_prefix_tokens=1)
        static_out.sum().backward()
    fresh = make_layers(4, 24, 24, 256, 4, prefix=1, device="cuda")
    for dst, src in zip(static_in, fresh):
        dst.copy_(src)
    proj.zero_grad(set_to_none=False)
    graph.replay()
    torch.cuda.synchronize()
    eager = SAEPProjector(vision_dim=256, num_layers=4, llm_dim=512, backend="reference").cuda()
    eager.load_state_dict(proj.state_dict())
    want = eager(fresh, num_prefix_tokens=1)
    want.sum().backward()
    torch.testing.assert_close(static_out, want, rtol=1e-4, atol=1e-4)
    assert_grad_close(proj.dwconv.weight.grad, eager.dwconv.weight.grad, "dwconv.weight",
                      reduction=True)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compile_reduce_overhead_cuda_graphs(backend):
    torch._dynamo.reset()
    proj = SAEPProjector(vision_dim=128, num_layers=4, llm_dim=256, backend=backend).cuda()
    proj = proj.to(torch.bfloat16)
    compiled = torch.compile(proj, fullgraph=True, mode="reduce-overhead")
    layers = make_layers(2, 24, 24, 128, 4, prefix=1, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        for _ in range(3):
            out = compiled(layers, num_prefix_tokens=1)
        want = proj(layers, num_prefix_tokens=1)
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)


def test_patched_llava_image_path_compiled_and_graphed_bf16():
    """The SAEP LLaVA image-feature path on GPU in bf16: torch.compile and CUDA graphs."""
    pytest.importorskip("transformers")
    from examples import tiny_llava
    from saep_kernels.integrations import transformers as hf

    vision = tiny_llava.clip_config(image_size=336, patch_size=14, hidden=256, layers=6)
    model, _ = tiny_llava.build_llava(vision)
    hf.apply_saep(model, layers=(-2, -3, -5, -6))
    model = model.cuda().to(torch.bfloat16).eval()
    pixels = torch.randn(4, 3, 336, 336, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = hf.image_features(model, pixels)
        hf.image_features(model, pixels)  # transformers' hooks install on the first call
        compiled = torch.compile(lambda p: hf.image_features(model, p), fullgraph=True,
                                 mode="reduce-overhead")  # CUDA graphs
        for _ in range(3):
            out = compiled(pixels)
    assert out.shape == (4, 144, model.config.text_config.hidden_size)
    torch.testing.assert_close(out.float(), eager.float(), rtol=5e-2, atol=5e-2)
