"""Drop-in integrations, offline on tiny random models: Hugging Face LLaVA / LLaVA-NeXT
(`apply_saep`), the LLaVA-style projector builder, torch.compile of the image-feature path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the transformers integration needs transformers>=5", allow_module_level=True)

from PIL import Image  # noqa: E402

from saep_kernels import SAEPProjector  # noqa: E402
from saep_kernels.integrations import transformers as hf  # noqa: E402
from examples import tiny_llava  # noqa: E402

PROMPT = "USER: <image> what is in this picture ASSISTANT:"


def image(h=70, w=120, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


def n_image_tokens(inputs):
    return int((inputs["input_ids"] == tiny_llava.IMAGE_TOKEN_ID).sum())


@pytest.fixture
def llava():
    model, processor = tiny_llava.build_llava()
    hf.apply_saep(model, layers=(-2, -3, -4), processor=processor)
    return model, processor


def test_image_tokens_and_logits(llava):
    model, processor = llava
    inputs = processor(images=image(), text=PROMPT, return_tensors="pt")
    assert n_image_tokens(inputs) == 4  # 56/14 = 4x4 patches -> 2x2
    out = model(**inputs)
    assert out.logits.shape == (1, inputs["input_ids"].shape[1], len(tiny_llava.WORDS))


def test_image_features_equal_projector_on_the_hidden_states(llava):
    model, processor = llava
    pixels = processor(images=image(), text=PROMPT, return_tensors="pt")["pixel_values"]
    proj = model.model.multi_modal_projector
    assert isinstance(proj, SAEPProjector)
    reference = SAEPProjector(vision_dim=32, num_layers=3, llm_dim=64, backend="reference")
    reference.load_state_dict(proj.state_dict())
    with torch.no_grad():
        feats = torch.stack(model.model.get_image_features(pixel_values=pixels).pooler_output)
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        want = reference([hidden[i] for i in (-2, -3, -4)], num_prefix_tokens=1)
    torch.testing.assert_close(feats, want, rtol=1e-5, atol=1e-5)
    assert model.config.vision_feature_layer == [-2, -3, -4]
    assert model.config.saep["layers"] == [-2, -3, -4]


def test_generate_runs(llava):
    model, processor = llava
    inputs = processor(images=image(), text=PROMPT, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)


def test_save_and_load_round_trip_bitwise(llava, tmp_path):
    model, processor = llava
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = hf.SAEPLlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("multi_modal_projector.dwconv.weight") for k in a)
    inputs = processor(images=image(), text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)


def test_build_from_config_for_training():
    model, _ = tiny_llava.build_llava()
    config = hf.saep_config(model.config, layers=(-1, -2), kernel_size=5, pool="max")
    scratch = hf.SAEPLlavaForConditionalGeneration(config)
    proj = scratch.model.multi_modal_projector
    assert isinstance(proj, SAEPProjector) and proj.kernel_size == 5 and proj.pool == "max"
    assert proj.num_layers == 2
    assert model.config.saep is None if hasattr(model.config, "saep") else True


def test_build_llava_next_from_config():
    model, _ = tiny_llava.build_llava_next()
    scratch = hf.SAEPLlavaNextForConditionalGeneration(hf.saep_config(model.config, layers=(-2, -3)))
    proj = scratch.model.multi_modal_projector
    assert isinstance(proj, SAEPProjector) and proj.num_layers == 2
    # no saep settings in the config: the default layers
    default = hf.SAEPLlavaNextForConditionalGeneration(model.config.__class__.from_dict(
        model.config.to_dict()))
    assert default.model.multi_modal_projector.num_layers == len(hf.DEFAULT_LAYERS)


def test_llava_next_multi_crop():
    model, processor = tiny_llava.build_llava_next()
    before = n_image_tokens(processor(images=image(), text=PROMPT, return_tensors="pt"))
    hf.apply_saep(model, layers=(-2, -3), processor=processor, backend="reference")
    inputs = processor(images=image(), text=PROMPT, return_tensors="pt")
    after = n_image_tokens(inputs)
    assert inputs["pixel_values"].shape[1] > 1  # the base image and its crops
    assert after < before / 3
    out = model(**inputs)  # raises if the features and the image tokens disagree
    assert out.logits.shape[1] == inputs["input_ids"].shape[1]
    model.generate(**inputs, max_new_tokens=2, do_sample=False)


def test_siglip_like_odd_grid_without_cls():
    model, processor = tiny_llava.build_llava(tiny_llava.siglip_config(), layer=-1)
    before = n_image_tokens(processor(images=image(), text=PROMPT, return_tensors="pt"))
    hf.apply_saep(model, layers=(-1, -2), processor=processor)
    inputs = processor(images=image(), text=PROMPT, return_tensors="pt")
    assert (before, n_image_tokens(inputs)) == (27 * 27, 14 * 14)
    assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_wrong_strategy_is_a_clear_error():
    model, processor = tiny_llava.build_llava(tiny_llava.siglip_config(), layer=-1)
    hf.apply_saep(model, layers=(-1,), processor=processor)
    model.config.vision_feature_select_strategy = "default"  # SigLIP has no CLS to drop
    pixels = processor(images=image(), text=PROMPT, return_tensors="pt")["pixel_values"]
    with pytest.raises(ValueError, match="use 'default' for towers with a CLS token"):
        model.model.get_image_features(pixel_values=pixels)


def test_apply_saep_checks_its_arguments():
    model, _ = tiny_llava.build_llava()
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        hf.apply_saep(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="layers: -9 is not a hidden state"):
        hf.apply_saep(model, layers=(-9,))
    with pytest.raises(ValueError, match="call apply_saep first"):
        hf.adapt_processor(tiny_llava.build_llava()[1], tiny_llava.build_llava()[0])


def test_compile_image_feature_path_fullgraph_dynamic_batch(llava):
    """The tower + fused op + MLP path compiles without graph breaks, once for all batches
    (hf.image_features; get_image_features returns transformers' per-image list)."""
    model, processor = llava
    pixels = processor(images=[image(seed=i) for i in range(4)], text=[PROMPT] * 4,
                       return_tensors="pt")["pixel_values"].repeat(5, 1, 1, 1)
    def features(pixel_values):
        return hf.image_features(model, pixel_values)

    torch._dynamo.reset()
    # Dynamo (graph capture, graph breaks, guards) is what this checks; aot_eager traces the
    # fake/autograd path of the op without paying Inductor's C++ build for a whole tower.
    # The model was never called: compile_image_features runs the warm-up transformers needs
    # (with transformers 5.x a plain torch.compile of it fails: "Unsupported context manager").
    compiled = hf.compile_image_features(model, fullgraph=True, dynamic=True,
                                         backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(pixels[:2]), features(pixels[:2]), rtol=1e-4,
                                   atol=1e-5)
        # one graph for every batch size >= 2 (PyTorch specialises sizes 0 and 1)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for batch in (3, 4, 20):
                torch.testing.assert_close(compiled(pixels[:batch]), features(pixels[:batch]),
                                           rtol=1e-4, atol=1e-5)


def test_compile_projector_inductor_dynamic_batch():
    torch._dynamo.reset()
    proj = SAEPProjector(vision_dim=8, num_layers=2, llm_dim=16)
    compiled = torch.compile(proj, fullgraph=True, dynamic=True)
    layers = [torch.randn(4, 17, 8) for _ in range(2)]
    with torch.no_grad():
        compiled([h[:2] for h in layers], num_prefix_tokens=1)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for batch in (3, 4):
                torch.testing.assert_close(
                    compiled([h[:batch] for h in layers], num_prefix_tokens=1),
                    proj([h[:batch] for h in layers], num_prefix_tokens=1), rtol=1e-5,
                    atol=1e-5)


def test_example_script_runs():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "examples" / "llava_saep_demo.py")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "image tokens: 576 -> 144 (25%)" in proc.stdout
    assert "generate, 8 new tokens" in proc.stdout


def test_core_package_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, saep_kernels; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_apply_saep_takes_an_int_layer():
    model, processor = tiny_llava.build_llava()
    hf.apply_saep(model, layers=-2, processor=processor)
    assert model.config.saep["layers"] == [-2]
    inputs = processor(images=image(), text=PROMPT, return_tensors="pt")
    assert model(**inputs).logits.isfinite().all()
    with pytest.raises(TypeError, match="layers must be an int or a sequence of ints"):
        hf.apply_saep(tiny_llava.build_llava()[0], layers="-2")


def test_apply_saep_twice_keeps_the_trained_projector(llava):
    model, processor = llava
    with torch.no_grad():
        for p in model.model.multi_modal_projector.parameters():
            p.add_(1.0)  # "trained"
    before = {k: v.clone() for k, v in model.model.multi_modal_projector.state_dict().items()}
    projector = model.model.multi_modal_projector
    hf.apply_saep(model, layers=(-2, -3, -4), processor=processor, backend="reference")
    assert model.model.multi_modal_projector is projector
    assert projector.backend == "reference" and model.config.saep["backend"] == "reference"
    after = projector.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="already has an SAEP projector"):
        hf.apply_saep(model, layers=(-2,))
    assert all(torch.equal(before[k], v) for k, v in projector.state_dict().items())


@pytest.mark.parametrize("build", ["build_llava", "build_llava_next"])
def test_saved_saep_model_loads_through_the_auto_classes(build, tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    model, processor = getattr(tiny_llava, build)()
    hf.apply_saep(model, layers=(-2, -3), processor=processor)
    assert model.config.image_seq_length == hf.saep_image_tokens(model.config)
    model.eval().save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.architectures == [type(model).__name__] and config.model_type.startswith("saep_")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.model.multi_modal_projector, SAEPProjector)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    inputs = processor(images=image(), text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)


def projected_image_features(out):
    """The projector's image features of a Llava model output, one tensor per image or one for
    the batch: ``image_outputs.pooler_output`` (a list, one per image) where transformers has
    it, else ``image_hidden_states`` (deprecated there, and to become the vision tower's hidden
    states)."""
    image_outputs = getattr(out, "image_outputs", None)
    features = (image_outputs.pooler_output if image_outputs is not None
                else out.image_hidden_states)
    return list(features) if isinstance(features, (list, tuple)) else [features]


@pytest.mark.parametrize("build", ["build_llava", "build_llava_next"])
def test_apply_saep_to_the_base_model(build):
    """LlavaModel / LlavaNextModel (no LM head) as well as the generation classes."""
    full, processor = getattr(tiny_llava, build)()
    base = full.model
    assert type(base).__name__ in ("LlavaModel", "LlavaNextModel")
    hf.apply_saep(base, layers=(-2, -3), processor=processor)
    assert isinstance(base.multi_modal_projector, SAEPProjector)
    inputs = processor(images=image(), text=PROMPT, return_tensors="pt")
    out = base(**inputs)
    assert out.last_hidden_state.shape[:2] == inputs["input_ids"].shape
    if build == "build_llava":  # NeXT packs crops and newlines into one sequence per image
        per_image = projected_image_features(out)
        assert per_image
        for features in per_image:
            assert features.shape[-2] == hf.saep_image_tokens(base.config)


@pytest.mark.parametrize("build", ["build_llava", "build_llava_next"])
def test_saved_base_model_loads_through_automodel(build, tmp_path):
    from transformers import AutoModel

    full, processor = getattr(tiny_llava, build)()
    base = full.model.eval()
    hf.apply_saep(base, layers=(-2, -3), processor=processor)
    assert type(base).__name__.startswith("SAEPLlava") and type(base).__name__.endswith("Model")
    base.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(base)
    a, b = base.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    inputs = processor(images=image(), text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(base(**inputs).last_hidden_state, loaded(**inputs).last_hidden_state)


def test_projector_follows_the_models_initialisation():
    """As transformers' test_initialization checks: with a near-zero initializer_range every
    projector parameter starts at 0 (weights) or 0/1 (biases, norms) like the stock one."""
    model, _ = tiny_llava.build_llava()
    config = hf.saep_config(model.config, layers=(-2, -3))
    config.text_config.initializer_range = 1e-10
    config.initializer_range = 1e-10
    scratch = hf.SAEPLlavaForConditionalGeneration(config)
    for name, p in scratch.model.multi_modal_projector.named_parameters():
        mean = round(float(p.detach().mean()) * 1e9) / 1e9
        assert mean in (0.0, 1.0), (name, mean)


def test_images_at_another_resolution_get_a_message_that_says_so(llava):
    model, processor = llava
    pixels = torch.randn(1, 3, 84, 84)  # the tower's config is 56x56: 6x6 patches, not 4x4
    with pytest.raises(ValueError, match="images of other sizes .*interpolate_pos_encoding"):
        model.model.get_image_features(pixels, interpolate_pos_encoding=True)



@pytest.mark.parametrize("build", ["build_llava", "build_llava_next"])
def test_saved_model_and_processor_load_into_a_pipeline(build, tmp_path):
    """save_pretrained of the model and its adapted processor; AutoProcessor and
    pipeline("image-text-to-text") load both as SAEP and generate what the saved pair does."""
    from transformers import AutoProcessor, pipeline

    model, processor = getattr(tiny_llava, build)()
    hf.apply_saep(model, layers=(-2, -3), processor=processor)
    assert type(processor).__name__.startswith("SAEPLlava")
    model.eval().save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is type(processor) and isinstance(loaded.patch_size, hf.PooledPatchSize)
    inputs = processor(images=image(), text=PROMPT, return_tensors="pt")
    again = loaded(images=image(), text=PROMPT, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], again["input_ids"])
    pipe = pipeline("image-text-to-text", model=str(tmp_path))
    assert isinstance(pipe.model, type(model)) and type(pipe.processor) is type(processor)
    out = pipe(images=image(), text=PROMPT, max_new_tokens=4, do_sample=False)
    want = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    new = processor.decode(want[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert new.strip() and out[0]["generated_text"].endswith(new), (out, new)
