"""The LLaVA-codebase integration (saep_kernels.integrations.llava) on tiny offline models:
the CLIPVisionTower-compatible tower, the projector builder, select layers from a command
line, patch_llava on a stand-in of LLaVA's modules. The real LLaVA package runs in
tests/test_llava_codebase.py."""

from __future__ import annotations

import dataclasses
import sys
import types
from types import SimpleNamespace
from typing import Optional

import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the tiny models here are built with transformers>=5", allow_module_level=True)

from saep_kernels import SAEPProjector  # noqa: E402
from saep_kernels.integrations import llava  # noqa: E402
from saep_kernels.integrations.llava import (MultiLayerVisionTower, VisionFeatures,  # noqa: E402
                                             build_vision_projector, build_vision_tower,
                                             parse_select_layers, patch_llava)
from examples import tiny_llava  # noqa: E402


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    """A tiny CLIP tower saved as LLaVA names one: a path with the model and its processor."""
    path = tmp_path_factory.mktemp("clip-tiny")
    torch.manual_seed(0)
    transformers.CLIPVisionModel(tiny_llava.clip_config()).save_pretrained(path)  # 56/14: 4x4
    transformers.CLIPImageProcessor(size={"shortest_edge": 56},
                                    crop_size={"height": 56, "width": 56}).save_pretrained(path)
    return str(path)


def llava_args(path, **overrides):
    return SimpleNamespace(**{"mm_vision_tower": path, "mm_vision_select_layer": "-2,-3",
                              "mm_vision_select_feature": "patch", "mm_projector_type": "saep",
                              **overrides})


def test_llava_builder_switches_by_config():
    from types import SimpleNamespace

    vision = tiny_llava.build_llava()[0].model.vision_tower
    tower = MultiLayerVisionTower(vision, select_layer=[-2, -3])
    feats = tower(torch.randn(2, 3, 56, 56))
    assert isinstance(feats, VisionFeatures) and feats.num_prefix_tokens == 1
    assert feats.grid == (4, 4) and len(feats.hidden_states) == 2
    base = dict(mm_hidden_size=32, hidden_size=64, mm_vision_select_layer=[-2, -3])
    saep = build_vision_projector(SimpleNamespace(mm_projector_type="saep", **base))
    assert saep(feats).shape == (2, 4, 64)
    torch.testing.assert_close(saep(feats), SAEPProjector.forward(
        saep, list(feats.hidden_states), grid=(4, 4), num_prefix_tokens=1))
    mlp = build_vision_projector(SimpleNamespace(mm_projector_type="mlp2x_gelu", **base))
    assert list(mlp.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]  # LLaVA's
    assert mlp(feats).shape == (2, 16, 64)
    torch.testing.assert_close(mlp(feats), mlp(feats.patches()))
    assert build_vision_projector(SimpleNamespace(mm_projector_type="linear", **base))(
        feats).shape == (2, 16, 64)
    assert build_vision_projector(SimpleNamespace(mm_projector_type="identity", **base))(
        feats).shape == (2, 16, 64)
    with pytest.raises(ValueError, match="Unknown projector type"):
        build_vision_projector(SimpleNamespace(mm_projector_type="qformer", **base))


def test_llava_builders_name_what_is_wrong():
    from types import SimpleNamespace

    vision = tiny_llava.build_llava()[0].model.vision_tower  # 4 layers: 5 hidden states
    with pytest.raises(ValueError, match=r"select_layer: -9 is not a hidden state .*5 entries"):
        MultiLayerVisionTower(vision, select_layer=[-9])
    for missing in ("mm_hidden_size", "hidden_size"):
        config = dict(mm_projector_type="saep", mm_hidden_size=32, hidden_size=64)
        del config[missing]
        with pytest.raises(ValueError, match=rf"config.{missing} .* is missing"):
            build_vision_projector(SimpleNamespace(**config))
    assert isinstance(build_vision_projector(SimpleNamespace(mm_projector_type="identity")),
                      torch.nn.Module)


@pytest.mark.parametrize("value, want", [
    ("-2,-5,-8,-11", (-2, -5, -8, -11)), ("-2", (-2,)), ("[-2, -5]", (-2, -5)),
    (" -1 , -3 ", (-1, -3)), (-2, (-2,)), ([-2, -3], (-2, -3)), ((0,), (0,))])
def test_select_layers_parse_ints_lists_and_command_line_strings(value, want):
    assert parse_select_layers(value) == want


@pytest.mark.parametrize("value, error", [
    ("a,b", ValueError), ("", ValueError), ("-2;-3", ValueError), (True, TypeError),
    ([], TypeError), ([-2, "x"], TypeError), (None, TypeError), (-2.0, TypeError)])
def test_select_layers_name_the_argument_on_bad_values(value, error):
    with pytest.raises(error, match="mm_vision_select_layer"):
        parse_select_layers(value)


def test_tower_has_llavas_interface_and_loads_lazily(clip_path):
    tower = build_vision_tower(llava_args(clip_path), delay_load=True)
    assert isinstance(tower, MultiLayerVisionTower) and not tower.is_loaded
    assert tower.select_layer == (-2, -3) and tower.image_processor is None
    assert tower.hidden_size == 32 and tower.config.image_size == 56
    assert tower.num_patches_per_side == 2 and tower.num_patches == 4  # 4x4 pooled to 2x2
    with pytest.raises(RuntimeError, match="not loaded; call load_model"):
        tower.dtype
    tower.load_model()
    loaded = tower.vision_tower
    tower.load_model()  # again: nothing changes
    assert tower.is_loaded and tower.vision_tower is loaded
    assert isinstance(tower.image_processor, transformers.CLIPImageProcessor)
    assert tower.dtype == torch.float32 and tower.device == torch.device("cpu")
    assert tower.dummy_feature.shape == (1, 32)
    assert not any(p.requires_grad for p in tower.parameters())  # frozen, as LLaVA does
    pixels = torch.randn(2, 3, 56, 56, requires_grad=True)
    feats = tower(pixels)
    assert isinstance(feats, VisionFeatures) and feats.grid == (4, 4)
    assert feats.num_prefix_tokens == 1 and len(feats.hidden_states) == 2
    assert not feats.hidden_states[0].requires_grad  # a frozen tower records no graph
    want = loaded(pixels, output_hidden_states=True).hidden_states
    assert all(torch.equal(h, want[i]) for h, i in zip(feats.hidden_states, (-2, -3)))
    per_image = tower([pixels[0], pixels[1]])  # a list, one VisionFeatures per image
    assert len(per_image) == 2 and all(torch.allclose(a, b[1:2], atol=1e-5) for a, b in
                                       zip(per_image[1].hidden_states, feats.hidden_states))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        half = tower(pixels.detach().to(torch.bfloat16))  # features come back in the input's dtype
    assert half.hidden_states[0].dtype == torch.bfloat16


def test_tower_grid_counts_follow_the_projector_and_the_feature_choice(clip_path):
    linear = build_vision_tower(llava_args(clip_path, mm_projector_type="mlp2x_gelu"))
    assert linear.num_patches_per_side == 4 and linear.num_patches == 16
    saep = build_vision_tower(llava_args(clip_path))
    pixels = torch.randn(2, 3, 56, 56)
    # LLaVA's tensor for LLaVA's projectors (any nn.Linear works, a quantised one too)
    out = linear(pixels)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 16, 64)
    assert torch.equal(out, saep(pixels).patches())
    full = build_vision_tower(llava_args(clip_path, mm_vision_select_feature="cls_patch"))
    with pytest.raises(ValueError, match="17 tokens with select_feature='cls_patch' .*CLS"):
        full(torch.randn(1, 3, 56, 56))


def test_unfrozen_tower_records_gradients(clip_path):
    tower = build_vision_tower(llava_args(clip_path, unfreeze_mm_vision_tower=True),
                               delay_load=True)
    assert tower.is_loaded and all(p.requires_grad for p in tower.parameters())
    feats = tower(torch.randn(1, 3, 56, 56))
    feats.hidden_states[0].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.parameters())


def test_tower_refuses_what_it_cannot_load(clip_path, tmp_path):
    with pytest.raises(ValueError, match=r"mm_vision_select_layer: -9 is not a hidden state"):
        build_vision_tower(llava_args(clip_path, mm_vision_select_layer="-2,-9"),
                           delay_load=True)
    with pytest.raises(ValueError, match="mm_vision_select_layer: '-2,x'"):
        build_vision_tower(llava_args(clip_path, mm_vision_select_layer="-2,x"))
    with pytest.raises(ValueError, match="names no vision tower"):
        build_vision_tower(SimpleNamespace(mm_vision_select_layer=-2))
    text = tmp_path / "llama"
    tiny_llava.text_config().save_pretrained(text)
    with pytest.raises(ValueError, match="is a 'llama' model; MultiLayerVisionTower loads"):
        build_vision_tower(llava_args(str(text)))
    with pytest.raises(ValueError, match="mm_vision_select_feature must be 'patch' or"):
        build_vision_tower(llava_args(clip_path, mm_vision_select_feature="cls"))
    with pytest.raises(TypeError, match="vision_tower must be a model name"):
        MultiLayerVisionTower(3)
    vision = tiny_llava.build_llava()[0].model.vision_tower
    with pytest.raises(TypeError, match="args must be LLaVA's config .* select_layer="):
        MultiLayerVisionTower(vision, [-2, -3])  # the layers given where args go


def test_tower_wraps_a_module_without_a_config():
    class Tower(torch.nn.Module):
        def forward(self, images, output_hidden_states=True, return_dict=True):
            x = images.flatten(2).transpose(1, 2)  # [B, H*W, 3]
            return SimpleNamespace(hidden_states=(x, 2 * x, 3 * x))

    tower = MultiLayerVisionTower(Tower(), select_layer=[-1, -2], select_feature="cls_patch")
    assert tower.config is None
    tower.vision_tower.register_parameter("p", torch.nn.Parameter(torch.zeros(1)))
    feats = tower(torch.randn(2, 3, 4, 4))
    assert feats.grid == (4, 4) and torch.equal(feats.hidden_states[0], 1.5 *
                                                feats.hidden_states[1])


def test_siglip_tower_by_name(tmp_path):
    torch.manual_seed(0)
    transformers.SiglipVisionModel(tiny_llava.siglip_config()).save_pretrained(tmp_path)
    transformers.SiglipImageProcessor(size={"height": 54, "width": 54}).save_pretrained(tmp_path)
    tower = build_vision_tower(llava_args(str(tmp_path), mm_vision_select_feature="cls_patch",
                                          mm_vision_select_layer=[-1, -2]))
    assert isinstance(tower.image_processor, transformers.SiglipImageProcessor)
    assert tower.num_patches_per_side == 14  # 54/2 = 27, pooled to 14
    projector = build_vision_projector(SimpleNamespace(
        mm_projector_type="saep", mm_hidden_size=16, hidden_size=64,
        mm_vision_select_layer=[-1, -2]))
    assert projector(tower(torch.randn(1, 3, 54, 54))).shape == (1, tower.num_patches, 64)


def test_saep_projector_takes_the_one_tensor_llavas_tower_returns():
    torch.manual_seed(0)
    config = dict(mm_projector_type="saep", mm_hidden_size=8, hidden_size=16,
                  mm_saep_backend="reference")
    one = build_vision_projector(SimpleNamespace(mm_vision_select_layer=-2, **config))
    layers = [torch.randn(2, 17, 8) for _ in range(3)]  # CLS + 4x4
    for tokens in (layers[0][:, 1:], layers[0]):  # LLaVA's 'patch' / 'cls_patch' output
        torch.testing.assert_close(one(tokens), SAEPProjector.forward(
            one, [layers[0]], grid=(4, 4), num_prefix_tokens=1), rtol=0, atol=0)
    three = build_vision_projector(SimpleNamespace(mm_vision_select_layer="-2,-5,-8", **config))
    concat = torch.cat(layers, dim=-1)  # K layers concatenated along channels, read as views
    torch.testing.assert_close(three(concat), three(VisionFeatures(tuple(layers), 1, (4, 4))),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"features: a tensor \[B, T, 24\].*got \(2, 17, 8\)"):
        three(layers[0])
    with pytest.raises(ValueError, match="features: 12 tokens are not a square grid"):
        one(torch.randn(2, 12, 8))


def stand_in_llava(monkeypatch):
    """The modules of LLaVA that patch_llava touches, with LLaVA's names and train.py's
    ModelArguments field (an Optional[int] select layer)."""
    @dataclasses.dataclass
    class ModelArguments:
        vision_tower: Optional[str] = dataclasses.field(default=None)
        mm_vision_select_layer: Optional[int] = dataclasses.field(default=-1)
        mm_projector_type: Optional[str] = dataclasses.field(default="linear")

    modules = {}
    for name in ("llava", "llava.model", "llava.model.llava_arch", "llava.model.multimodal_encoder",
                 "llava.model.multimodal_encoder.builder", "llava.model.multimodal_projector",
                 "llava.model.multimodal_projector.builder", "llava.train", "llava.train.train"):
        modules[name] = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, modules[name])
    for name in ("llava.model.llava_arch", "llava.model.multimodal_encoder.builder"):
        modules[name].build_vision_tower = "LLaVA's"
    for name in ("llava.model.llava_arch", "llava.model.multimodal_projector.builder"):
        modules[name].build_vision_projector = "LLaVA's"
    modules["llava.train.train"].ModelArguments = ModelArguments
    return modules


def test_patch_llava_points_llavas_builders_here_and_takes_a_layer_list(monkeypatch):
    modules = stand_in_llava(monkeypatch)
    parser = transformers.HfArgumentParser(modules["llava.train.train"].ModelArguments)
    with pytest.raises(SystemExit):  # stock train.py: an int
        parser.parse_args_into_dataclasses(args=["--mm_vision_select_layer=-2,-5,-8,-11"])
    patch_llava()
    patch_llava()  # twice: the same
    assert modules["llava.model.llava_arch"].build_vision_tower is build_vision_tower
    assert modules["llava.model.multimodal_encoder.builder"].build_vision_tower is \
        build_vision_tower
    assert modules["llava.model.llava_arch"].build_vision_projector is build_vision_projector
    assert modules["llava.model.multimodal_projector.builder"].build_vision_projector is \
        build_vision_projector
    parser = transformers.HfArgumentParser(modules["llava.train.train"].ModelArguments)
    (args,) = parser.parse_args_into_dataclasses(
        args=["--mm_vision_select_layer=-2,-5,-8,-11", "--mm_projector_type", "saep"])
    assert llava.select_layers(args) == (-2, -5, -8, -11)
    (args,) = parser.parse_args_into_dataclasses(args=[])
    assert llava.select_layers(args) == (-1,)


def test_patch_llava_without_training_dependencies(monkeypatch):
    modules = stand_in_llava(monkeypatch)
    monkeypatch.setitem(sys.modules, "llava.train.train", None)  # import fails
    with pytest.raises(ImportError):
        patch_llava()
    assert modules["llava.model.llava_arch"].build_vision_projector == "LLaVA's"  # untouched
    patch_llava(command_line=False)
    assert modules["llava.model.llava_arch"].build_vision_projector is build_vision_projector
