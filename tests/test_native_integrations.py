"""SAEP in the native-resolution models of transformers, offline on tiny random models: Mistral 3,
LLaVA with a Pixtral tower, Qwen2-VL (``apply_saep``; saep_kernels.integrations.packed_towers).
Every batch holds images of different sizes, which the towers pack into one sequence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the transformers integration needs transformers>=5", allow_module_level=True)

from PIL import Image  # noqa: E402

from saep_kernels import SAEPProjector  # noqa: E402
from saep_kernels.integrations import transformers as hf  # noqa: E402
from saep_kernels.testing import assert_forward_close  # noqa: E402
from examples import tiny_native  # noqa: E402

LAYERS = (-1, -3, 1)
MODELS = ["mistral3", "llava_pixtral", "qwen2_vl"]
PROMPTS = {"mistral3": tiny_native.PIXTRAL_PROMPT, "llava_pixtral": tiny_native.PIXTRAL_PROMPT,
           "qwen2_vl": tiny_native.QWEN_PROMPT}
# three images of different sizes and aspect ratios, one batch
SIZES = [(40, 64), (64, 30), (24, 24)]


def image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


def images():
    return [image(h, w, seed) for seed, (h, w) in enumerate(SIZES)]


def build(name, saep=True, **kwargs):
    model, processor = getattr(tiny_native, f"build_{name}")()
    if saep:
        hf.apply_saep(model, layers=LAYERS, processor=processor, **kwargs)
    return model, processor


def batch(name, processor):
    return processor(images=images(), text=[PROMPTS[name]] * len(SIZES), return_tensors="pt",
                     padding=True)


def tower_hidden_states(name, model, inputs):
    """The tower's hidden states for the batch, and each image's (or frame's) patch grid."""
    inner = model.model
    with torch.no_grad():
        if name == "qwen2_vl":
            out = inner.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"],
                               output_hidden_states=True)
            grids = [(h, w) for t, h, w in inputs["image_grid_thw"].tolist() for _ in range(t)]
        else:
            out = inner.vision_tower(inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                     output_hidden_states=True)
            p = inner.vision_tower.patch_size
            grids = [(h // p, w // p) for h, w in inputs["image_sizes"].tolist()]
    return out.hidden_states, grids


def unmerge(tokens, h, w):
    """Qwen2-VL's 2x2-merge order (windows row-major, the four tokens of a window
    consecutive) back to row-major order."""
    c = tokens.shape[-1]
    return tokens.view(h // 2, w // 2, 2, 2, c).permute(0, 2, 1, 3, 4).reshape(h * w, c)


@pytest.mark.parametrize("name", MODELS)
def test_forward_with_labels_backward_and_generate(name):
    model, processor = build(name)
    module = hf._saep_module(model)
    assert isinstance(module, SAEPProjector)
    inputs = batch(name, processor)
    model.train()
    out = model(**inputs, labels=inputs["input_ids"])
    assert out.loss.isfinite()
    out.loss.backward()
    for pname, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    tower = model.model.visual if name == "qwen2_vl" else model.model.vision_tower
    first_block = next(p for n, p in tower.named_parameters() if ".0." in n and p.requires_grad)
    assert first_block.grad is not None and first_block.grad.abs().sum() > 0  # through layer 1
    model.eval()
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape == (len(SIZES), inputs["input_ids"].shape[1] + 3)


@pytest.mark.parametrize("name", MODELS)
def test_image_features_equal_the_projector_on_each_image_alone(name):
    """Each image's features are the fixed-grid reference projector on that image's own
    tokens and grid: nothing leaks between the images packed in one sequence."""
    model, processor = build(name)
    module = hf._saep_module(model)
    reference = SAEPProjector(vision_dim=module.vision_dim, num_layers=module.num_layers,
                              llm_dim=module.llm_dim, backend="reference")
    reference.load_state_dict(module.state_dict())
    inputs = batch(name, processor)
    hidden, grids = tower_hidden_states(name, model, inputs)
    assert len(set(grids)) == len(SIZES)  # the images really differ in size
    with torch.no_grad():
        if name == "qwen2_vl":
            got = model.model.get_image_features(inputs["pixel_values"],
                                                 inputs["image_grid_thw"]).pooler_output
        else:
            got = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                 image_sizes=inputs["image_sizes"]).pooler_output
        assert len(got) == len(grids)
        start = 0
        for (h, w), features in zip(grids, got):
            layers = [hidden[i].reshape(-1, hidden[i].shape[-1])[start:start + h * w]
                      for i in LAYERS]
            if name == "qwen2_vl":
                layers = [unmerge(x, h, w) for x in layers]
            # the merger's output order is row-major over windows, as the fixed-grid op's
            want = reference([x[None] for x in layers], grid=(h, w))[0]
            assert features.shape == (math.ceil(h / 2) * math.ceil(w / 2), module.llm_dim)
            assert_forward_close(features, want, f"image {h}x{w}")
            start += h * w


@pytest.mark.parametrize("name", MODELS)
def test_image_token_counts_match_the_processor(name):
    """The processor's image tokens (adapted for LLaVA + Pixtral, stock for the others) are
    exactly the features SAEP emits per image."""
    model, processor = build(name)
    inputs = batch(name, processor)
    token = model.config.image_token_id
    per_prompt = (inputs["input_ids"] == token).sum(1).tolist()
    _, grids = tower_hidden_states(name, model, inputs)
    assert per_prompt == [math.ceil(h / 2) * math.ceil(w / 2) for h, w in grids]


def test_llava_pixtral_processor_is_adapted_to_2x2():
    model, processor = build("llava_pixtral", saep=False)
    before = (batch("llava_pixtral", processor)["input_ids"] == model.config.image_token_id).sum()
    hf.apply_saep(model, layers=LAYERS, processor=processor)
    assert processor.spatial_merge_size == 2
    after = (batch("llava_pixtral", processor)["input_ids"] == model.config.image_token_id).sum()
    assert after * 4 == before  # the images are sized in steps of two patches already here


def test_the_input_helpers_are_what_the_processors_make():
    """tiny_native's stand-ins for PixtralProcessor and Qwen2VLProcessor (which need
    torchvision) against the real processors, where torchvision is installed."""
    pytest.importorskip("torchvision")
    for name in MODELS:
        _, helper = build(name, saep=False)
        want = batch(name, helper)
        got = batch(name, helper.processor())
        for key in want:
            assert torch.equal(torch.as_tensor(got[key]), want[key]), (name, key)


@pytest.mark.parametrize("name", MODELS)
def test_save_and_load_round_trip_bitwise(name, tmp_path):
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    model, processor = build(name)
    model.eval().save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.model_type.startswith("saep_") and config.saep["layers"] == list(LAYERS)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert type(hf._saep_module(loaded)) is type(hf._saep_module(model))
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    inputs = batch(name, processor)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base).__name__.startswith("SAEP") and type(base).__name__.endswith("Model")


def test_qwen2_vl_video_frames_are_separate_grids():
    """A video of t frames is t grids of h x w: the features of a 2-frame video are each
    frame's features alone."""
    model, _ = build("qwen2_vl")
    visual = model.model.visual
    merger = visual.merger
    p, t, h, w = 4, 2, 6, 8
    patch_dim = 3 * 2 * p * p  # channels * temporal_patch_size * patch * patch
    torch.manual_seed(0)
    video = torch.randn(t * h * w, patch_dim)
    with torch.no_grad():
        both = visual(video, grid_thw=torch.tensor([[t, h, w]])).pooler_output
        hidden = visual(video, grid_thw=torch.tensor([[t, h, w]]),
                        output_hidden_states=True).hidden_states
    assert both.shape == (t * h * w // 4, merger.llm_dim)
    reference = SAEPProjector(vision_dim=merger.vision_dim, num_layers=merger.num_layers,
                              llm_dim=merger.llm_dim, backend="reference")
    reference.load_state_dict(merger.state_dict())
    with torch.no_grad():
        for f in range(t):
            frame = [unmerge(hidden[i][f * h * w:(f + 1) * h * w], h, w)[None] for i in LAYERS]
            want = reference(frame, grid=(h, w))[0]
            assert_forward_close(both[f * h * w // 4:(f + 1) * h * w // 4], want, f"frame {f}")


def test_qwen2_vl_merger_outside_its_tower_is_a_clear_error():
    model, _ = build("qwen2_vl")
    with pytest.raises(RuntimeError, match="inside the Qwen2-VL vision tower"):
        model.model.visual.merger(torch.randn(16, 32))


def test_qwen2_vl_layers_are_checked_against_the_towers_depth():
    model, _ = build("qwen2_vl", saep=False)
    depth = model.config.vision_config.depth
    with pytest.raises(ValueError, match=r"layers: %d is not .*hidden_states has %d entries" % (depth + 1, depth + 1)):
        hf.apply_saep(model, layers=(depth + 1,))


@pytest.mark.parametrize("name", MODELS)
def test_apply_saep_twice_keeps_the_trained_module(name):
    model, processor = build(name)
    module = hf._saep_module(model)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    hf.apply_saep(model, layers=LAYERS, processor=processor, backend="reference")
    assert hf._saep_module(model) is module and module.backend == "reference"
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    with pytest.raises(ValueError, match="already has an SAEP projector"):
        hf.apply_saep(model, layers=(-2,))


def test_mistral3_without_image_sizes_is_a_clear_error():
    model, processor = build("mistral3")
    inputs = batch("mistral3", processor)
    with pytest.raises(ValueError, match="image_sizes is required"):
        model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=None)


@pytest.mark.parametrize("name", MODELS)
def test_gradient_checkpointing_gives_the_same_gradients(name):
    """With the tower's blocks checkpointed (recomputed in the backward), SAEP's gradients are
    those of the plain run, and nothing is kept from the recompute."""
    grads = []
    for checkpointing in (False, True):
        model, processor = build(name)
        model.train()
        if checkpointing:
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        inputs = batch(name, processor)
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        module = hf._saep_module(model)
        grads.append([p.grad.clone() for p in module.parameters()])
        assert not getattr(module, "_kept", {})
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
