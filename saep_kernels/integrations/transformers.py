"""SAEP in Hugging Face ``transformers`` models: LLaVA and LLaVA-NeXT (a fixed patch grid per
image or crop), and the native-resolution models whose towers pack images of different sizes
into one sequence: Mistral 3, LLaVA with a Pixtral tower, Qwen2-VL (``packed_towers``).

    from saep_kernels.integrations.transformers import apply_saep, adapt_processor

    model = LlavaForConditionalGeneration.from_pretrained(...)
    apply_saep(model, layers=(-2, -5, -8, -11))       # in place; returns the model
    adapt_processor(processor, model)                 # image tokens: 576 -> 144
    model.generate(**processor(images=image, text=prompt, return_tensors="pt"))

``apply_saep`` replaces the multimodal projector by ``SAEPProjector``, sets the model's
``vision_feature_layer`` to the chosen layers, and routes those layers' hidden states to the
fused op as they are (no ``torch.cat``), skipping the CLS token when the model's
``vision_feature_select_strategy`` is ``"default"`` (CLIP) and keeping every token when it is
``"full"`` (SigLIP has no CLS). The settings are stored in ``config.saep``, and the model
and its config are re-labelled as the SAEP classes (``SAEPLlavaForConditionalGeneration``,
model_type "saep_llava"; the LLaVA-NeXT twins), so ``save_pretrained`` writes a checkpoint
that ``AutoModelForImageTextToText.from_pretrained`` or the SAEP class
itself rebuilds, once this module is imported (it registers the SAEP config and model
classes with transformers' Auto classes). ``config.image_seq_length`` counts SAEP's tokens.
The same classes build an SAEP model from a config for training from scratch
(``saep_config``). Applying SAEP again with the same settings keeps the trained projector.

``adapt_processor`` makes the processor insert as many image tokens as SAEP emits: the
2x2-pooled grid (ceil mode), e.g. 24x24 -> 12x12 = 144 for CLIP-L/14-336, 27x27 -> 14x14 = 196
for SigLIP-384, per crop for LLaVA-NeXT (see ``PooledPatchSize``); for a LLaVA with a Pixtral
tower, (H/2) x (W/2) per image (the processor's ``spatial_merge_size`` becomes 2).

Native-resolution models (``packed_towers``): in Mistral 3 and a LLaVA with a Pixtral tower the
SAEP projector replaces the multimodal projector (Mistral 3's RMSNorm, 2x2 patch merger and
MLP) and takes the selected layers of the packed tokens; in Qwen2-VL it replaces the vision
tower's ``PatchMerger`` (``model.visual.merger``) and ``layers`` index the tower's hidden
states (0: the patch embeddings, i: block i's output). SAEP pools 2x2 as Mistral 3's and
Qwen2-VL's mergers do, so their processors need no change; each frame of a video is its own
grid. The SAEP classes: ``SAEPMistral3ForConditionalGeneration`` ("saep_mistral3"),
``SAEPQwen2VLForConditionalGeneration`` ("saep_qwen2_vl"), their base models, and the SAEP LLaVA
classes for LLaVA with a Pixtral tower.

Needs transformers >= 5.0 (``LlavaModel.get_image_features`` returning a
``BaseModelOutputWithPooling``); the core package never imports transformers.
"""

from __future__ import annotations

import functools
import math
import operator
import types
from typing import Sequence, Union

import torch

from ..modules import SAEPProjector
from . import packed_towers
from .llava import check_hidden_state_index

try:
    import transformers
    from transformers import (LlavaConfig, LlavaForConditionalGeneration, LlavaModel,
                              LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextModel, LlavaNextProcessor, LlavaProcessor,
                              Mistral3Config, Mistral3ForConditionalGeneration, Mistral3Model,
                              Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLModel)
    from transformers.models.llava_next.modeling_llava_next import (get_anyres_image_grid_shape,
                                                                    image_size_to_num_patches,
                                                                    unpad_image)
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError("saep_kernels.integrations.transformers needs transformers>=5.0: "
                      "pip install 'saep-kernels[transformers]'") from exc

if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"saep_kernels.integrations.transformers needs transformers>=5.0, found "
                      f"{transformers.__version__}")

__all__ = ["apply_saep", "adapt_processor", "saep_config", "saep_image_tokens", "PooledPatchSize",
           "image_features", "compile_image_features",
           "SAEPLlavaConfig", "SAEPLlavaNextConfig",
           "SAEPLlavaForConditionalGeneration", "SAEPLlavaNextForConditionalGeneration",
           "SAEPLlavaModel", "SAEPLlavaNextModel", "SAEPLlavaProcessor",
           "SAEPLlavaNextProcessor", "SAEPMistral3Config", "SAEPMistral3ForConditionalGeneration",
           "SAEPMistral3Model", "SAEPQwen2VLConfig", "SAEPQwen2VLForConditionalGeneration",
           "SAEPQwen2VLModel", "SAEPQwen2VLMerger"]

SAEPQwen2VLMerger = packed_towers.SAEPQwen2VLMerger

DEFAULT_LAYERS = (-2, -5, -8, -11)


# ------------------------------------------------------------------------------ geometry


def _family(config) -> str:
    """Which model family a (stock or SAEP) config describes: "qwen2_vl", "mistral3",
    "llava_next", "llava_pixtral" (LLaVA with a Pixtral tower) or "llava"."""
    if isinstance(config, Qwen2VLConfig):
        return "qwen2_vl"
    if isinstance(config, Mistral3Config):
        return "mistral3"
    if isinstance(config, LlavaNextConfig):
        return "llava_next"
    if getattr(config.vision_config, "model_type", None) == "pixtral":
        return "llava_pixtral"
    return "llava"


# families whose towers pack images of different grids into one sequence
_PACKED = ("qwen2_vl", "mistral3", "llava_pixtral")


def _hidden_states(config) -> int:
    """Entries of the vision tower's hidden_states: the embeddings and each layer's output."""
    v = config.vision_config
    return (v.depth if _family(config) == "qwen2_vl" else v.num_hidden_layers) + 1


def _patch_grid(config) -> int:
    """Side of the tower's square patch grid (image_size // patch_size)."""
    v = config.vision_config
    return v.image_size // v.patch_size


def _prefix(strategy: str) -> int:
    if strategy == "default":
        return 1  # the CLS token
    if strategy == "full":
        return 0
    raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got "
                     f"{strategy!r}")


def saep_image_tokens(config) -> int:
    """Image tokens SAEP emits per image (per crop for LLaVA-NeXT): ceil(H/2) * ceil(W/2)."""
    side = _patch_grid(config)
    return SAEPProjector.num_output_tokens(side)


# ------------------------------------------------------------------------------ config


def saep_config(config, layers: Sequence[int] = DEFAULT_LAYERS, kernel_size: int = 3,
                pool: str = "avg", residual: bool = True, backend: str = "auto"):
    """A copy of a LLaVA / LLaVA-NeXT / Mistral 3 / Qwen2-VL config describing its SAEP version
    (``config.saep``, and the list-valued ``vision_feature_layer`` where the model has one);
    build the model with the SAEP classes."""
    config = _SAEP_CONFIGS.get(type(config), type(config)).from_dict(config.to_dict())
    _set_saep(config, _layer_list(layers), kernel_size, pool, residual, backend)
    return config


def _set_saep(config, layers, kernel_size, pool, residual, backend):
    layers = [int(i) for i in layers]
    if not layers:
        raise ValueError("layers must name at least one vision layer")
    family = _family(config)
    if family != "qwen2_vl":  # Qwen2-VL has no vision_feature_layer: config.saep only
        config.vision_feature_layer = layers
    if family in ("llava", "llava_next") and hasattr(config, "image_seq_length"):
        config.image_seq_length = saep_image_tokens(config)  # per image (per crop for NeXT)
    config.saep = dict(layers=layers, kernel_size=kernel_size, pool=pool, residual=residual,
                       backend=backend)


# ------------------------------------------------------------------------------ image features


def _tower_layers(inner, pixel_values, layers, kwargs):
    kwargs = {k: v for k, v in kwargs.items() if k not in ("output_hidden_states", "return_dict")}
    out = inner.vision_tower(pixel_values, output_hidden_states=True, return_dict=True, **kwargs)
    return out, [out.hidden_states[i] for i in layers]


def _project(inner, hidden_states, strategy):
    side = _patch_grid(inner.config)
    prefix = _prefix(strategy)
    tokens = hidden_states[0].shape[1]
    if tokens - prefix != side * side:
        wanted = f"the config's {side}x{side} patch grid"
        if tokens - (1 - prefix) == side * side:  # the CLS token counted wrongly
            raise ValueError(
                f"the vision tower gave {tokens} tokens per image, but {wanted} with "
                f"vision_feature_select_strategy={strategy!r} needs {side * side + prefix}; use "
                f"'default' for towers with a CLS token and 'full' for towers without (SigLIP)")
        raise ValueError(
            f"the vision tower gave {tokens} tokens per image ({prefix} before the grid), not "
            f"{wanted} (vision_config.image_size / patch_size): SAEP pools the grid of images "
            f"at the tower's own resolution; images of other sizes (interpolate_pos_encoding"
            f"=True) are not supported, resize them to vision_config.image_size")
    return inner.multi_modal_projector(hidden_states, grid=(side, side), num_prefix_tokens=prefix)


def _resolve(inner, vision_feature_layer, vision_feature_select_strategy):
    layers = inner.config.vision_feature_layer if vision_feature_layer is None \
        else vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    strategy = vision_feature_select_strategy or inner.config.vision_feature_select_strategy
    return layers, strategy


def _finish(out, features, kwargs):
    out.pooler_output = features
    if kwargs.get("return_dict") is False:
        return out.to_tuple()
    return out


def _llava_image_features(self, pixel_values, vision_feature_layer=None,
                          vision_feature_select_strategy=None, image_sizes=None, **kwargs):
    """LlavaModel.get_image_features with SAEP: the selected layers go to the fused op."""
    layers, strategy = _resolve(self, vision_feature_layer, vision_feature_select_strategy)
    if image_sizes is not None:
        kwargs["image_sizes"] = image_sizes
    out, hidden = _tower_layers(self, pixel_values, layers, kwargs)
    features = _project(self, hidden, strategy)
    return _finish(out, list(features), kwargs)  # transformers wants one entry per image


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The image-feature path of an SAEP LLaVA model as one tensor [B, tokens, D]: the vision
    tower, the selected layers, the SAEP projector. Unlike ``get_image_features`` (whose
    per-image list fixes the batch size in a traced graph) it compiles once for every batch
    size under ``torch.compile(dynamic=True)``."""
    inner = _inner(model)
    layers, strategy = _resolve(inner, None, None)
    _, hidden = _tower_layers(inner, pixel_values, layers, {})
    return _project(inner, hidden, strategy)


def compile_image_features(model, **compile_kwargs):
    """``torch.compile(lambda pixel_values: image_features(model, pixel_values),
    **compile_kwargs)``, ready for ``fullgraph=True``: transformers installs its
    output-capturing hooks on a tower's first call, in a context manager Dynamo cannot trace,
    so this first runs the tower once eagerly on one blank image of the tower's size."""
    inner = _inner(model)
    size = inner.config.vision_config.image_size
    ref = next(inner.vision_tower.parameters())
    with torch.no_grad():
        image_features(model, torch.zeros(1, 3, size, size, device=ref.device, dtype=ref.dtype))
    return torch.compile(functools.partial(image_features, model), **compile_kwargs)


def _pack_crops(self, features, image_sizes, side):
    """LLaVA-NeXT's spatial_unpad layout of one image's crop features, on SAEP's grid: the base
    image's tokens, then the crops' tokens arranged as one picture, cut back to the image's
    aspect ratio, with an ``image_newline`` token closing each row."""
    newline = self.image_newline
    packed = []
    for feat, size in zip(features, image_sizes):
        if feat.shape[0] == 1:
            packed.append(torch.cat((feat[0], newline[None].to(feat)), dim=0))
            continue
        rows, cols = get_anyres_image_grid_shape(size, self.config.image_grid_pinpoints,
                                                 self.config.vision_config.image_size)
        crops = feat[1:].view(rows, cols, side, side, -1)
        picture = crops.permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # [D, rows*s, cols*s]
        picture = unpad_image(picture, size)
        picture = torch.cat((picture, newline[:, None, None].expand(*picture.shape[:-1], 1)
                             .to(picture)), dim=-1)
        packed.append(torch.cat((feat[0], picture.flatten(1, 2).transpose(0, 1)), dim=0))
    return packed


def _llava_next_image_features(self, pixel_values, image_sizes, vision_feature_layer=None,
                               vision_feature_select_strategy=None, **kwargs):
    """LlavaNextModel.get_image_features with SAEP: every crop through the fused op, then
    LLaVA-NeXT's packing on the pooled grid."""
    layers, strategy = _resolve(self, vision_feature_layer, vision_feature_select_strategy)
    crops_per_image = [image_size_to_num_patches(image_size=s,
                                                 grid_pinpoints=self.config.image_grid_pinpoints,
                                                 patch_size=self.config.vision_config.image_size)
                       for s in image_sizes]
    if pixel_values.dim() == 5:
        pixel_values = torch.cat([p[:n] for p, n in zip(pixel_values, crops_per_image)], dim=0)
    elif pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must have 4 or 5 dimensions, got {tuple(pixel_values.shape)}")
    out, hidden = _tower_layers(self, pixel_values, layers, kwargs)
    features = torch.split(_project(self, hidden, strategy), crops_per_image, dim=0)
    side = math.isqrt(features[0].shape[1])
    return _finish(out, _pack_crops(self, features, image_sizes, side), kwargs)


def _install(model) -> None:
    """Swap the projector (Qwen2-VL: the tower's patch merger) and the image-feature path of a
    model per ``model.config.saep``."""
    config = model.config
    settings = config.saep
    inner = _inner(model)
    family = _family(config)
    if family == "qwen2_vl":
        old = inner.visual.merger
        ref = next(old.parameters(), None)
        merger = packed_towers.qwen2_vl_merger(
            inner.visual, settings["layers"], settings, llm_dim=config.vision_config.hidden_size,
            device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
        if hasattr(model, "_init_weights"):
            with torch.no_grad():
                merger.apply(model._init_weights)
        inner.visual.merger = merger
        return
    old = inner.multi_modal_projector
    ref = next(old.parameters(), None)
    projector = SAEPProjector(
        vision_dim=config.vision_config.hidden_size, num_layers=len(settings["layers"]),
        llm_dim=config.text_config.hidden_size, kernel_size=settings["kernel_size"],
        pool=settings["pool"], residual=settings["residual"], backend=settings["backend"],
        device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
    if hasattr(model, "_init_weights"):  # the model's own initialisation (initializer_range)
        with torch.no_grad():
            projector.apply(model._init_weights)
    inner.multi_modal_projector = projector
    inner.config.vision_feature_layer = list(settings["layers"])
    impl = {"llava": _llava_image_features, "llava_next": _llava_next_image_features,
            "llava_pixtral": packed_towers.pixtral_image_features,
            "mistral3": packed_towers.pixtral_image_features}[family]
    inner.get_image_features = types.MethodType(impl, inner)


_BASE_MODELS = (LlavaModel, LlavaNextModel, Mistral3Model, Qwen2VLModel)
_MODEL_CLASSES = (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
                  Mistral3ForConditionalGeneration, Qwen2VLForConditionalGeneration) + _BASE_MODELS


def _check_model(model) -> None:
    if not isinstance(model, _MODEL_CLASSES):
        raise TypeError("apply_saep takes a LLaVA, LLaVA-NeXT, Mistral 3 or Qwen2-VL model ("
                        + ", ".join(c.__name__ for c in _MODEL_CLASSES) + f"), got "
                        f"{type(model).__name__}")


def _inner(model):
    """The base model (LlavaModel, ..., Qwen2VLModel) holding the tower and the projector."""
    return model if isinstance(model, _BASE_MODELS) else model.model


def _saep_module(model):
    """The module SAEP replaces: the multimodal projector, or Qwen2-VL's patch merger."""
    inner = _inner(model)
    return inner.visual.merger if _family(model.config) == "qwen2_vl" \
        else inner.multi_modal_projector


def apply_saep(model, layers: Union[int, Sequence[int]] = DEFAULT_LAYERS, kernel_size: int = 3,
               pool: str = "avg", residual: bool = True, backend: str = "auto",
               processor=None):
    """Turn a LLaVA / LLaVA-NeXT / Mistral 3 / Qwen2-VL model (or a LLaVA with a Pixtral tower)
    into its SAEP version, in place, and return it.

    ``layers``: the vision layers to aggregate, an int or a sequence of ints (indices into the
    tower's ``hidden_states``, as ``vision_feature_layer``). The new projector is freshly
    initialised (train it, or load an SAEP checkpoint). On a model that already has an SAEP
    projector with the same layers, kernel size, pool and residual, the projector and its
    weights are kept (only ``backend`` changes); other settings raise, since they would discard
    its weights. Pass the model's ``processor`` to adapt its image-token count too (see
    ``adapt_processor``).
    """
    _check_model(model)
    layers = _layer_list(layers)
    for i in layers:
        check_hidden_state_index("layers", i, _hidden_states(model.config))
    current = getattr(model.config, "saep", None)
    projector = _saep_module(model)
    keep = isinstance(projector, SAEPProjector) and current is not None
    if keep:
        wanted = dict(layers=layers, kernel_size=kernel_size, pool=pool, residual=residual)
        have = {key: current[key] for key in wanted}
        if have != wanted:
            raise ValueError(
                f"the model already has an SAEP projector ({have}); apply_saep with {wanted} "
                "would replace it and its weights with a fresh one: start from the base model "
                "instead, or pass the model's own settings")
    _set_saep(model.config, layers, kernel_size, pool, residual, backend)
    if keep:
        projector.backend = backend  # the trained projector stays, with its weights
    else:
        _install(model)
    _as_saep_classes(model)
    if processor is not None:
        adapt_processor(processor, model)
    return model


def _layer_list(layers) -> list:
    """``layers`` as a list of ints: one int, or a sequence of them."""
    items = list(layers) if isinstance(layers, (list, tuple)) else [layers]
    try:
        if any(isinstance(i, bool) for i in items):
            raise TypeError
        return [operator.index(i) for i in items]
    except TypeError:
        raise TypeError(f"layers must be an int or a sequence of ints, got {layers!r}") from None


class PooledPatchSize(int):
    """A processor ``patch_size`` that counts SAEP tokens: ``pixels // patch_size`` is the
    number of 2x2-pooled tokens along a side of ``pixels`` pixels, ceil((pixels // p) / 2).

    LLaVA processors count image tokens as ``(height // patch_size) * (width // patch_size)``
    (LLaVA-NeXT per crop and for the unpadded picture), so with this value they count
    exactly what SAEP emits, odd grids included. It is an ``int`` (p) everywhere else.
    """

    def __rfloordiv__(self, pixels):
        return -(-(pixels // int(self)) // 2)

    def __repr__(self):
        return f"PooledPatchSize({int(self)})"


class _SAEPProcessor:
    """A LLaVA processor counting SAEP's image tokens (``patch_size`` a ``PooledPatchSize``),
    saved with its own ``processor_class`` so that ``AutoProcessor`` and pipelines load it
    back counting them."""

    # A data descriptor over the instance's own ``patch_size`` (which the processor's
    # __init__ sets and save_pretrained writes as the tower's int).
    @property
    def patch_size(self):
        value = self.__dict__.get("patch_size")
        return None if value is None else PooledPatchSize(int(value))

    @patch_size.setter
    def patch_size(self, value):
        self.__dict__["patch_size"] = value


class SAEPLlavaProcessor(_SAEPProcessor, LlavaProcessor):
    """LlavaProcessor of an SAEP model (what ``adapt_processor`` makes of a LlavaProcessor)."""


class SAEPLlavaNextProcessor(_SAEPProcessor, LlavaNextProcessor):
    """LlavaNextProcessor of an SAEP model."""


_SAEP_PROCESSORS = {LlavaProcessor: SAEPLlavaProcessor, LlavaNextProcessor: SAEPLlavaNextProcessor}


def adapt_processor(processor, model_or_config):
    """Make a LLaVA(-NeXT) processor insert SAEP's number of image tokens (in place): 576 ->
    144 for CLIP-L/14-336, 27x27 -> 196 for SigLIP-384. The processor becomes an
    ``SAEPLlavaProcessor`` / ``SAEPLlavaNextProcessor``, which ``save_pretrained`` records, so
    ``AutoProcessor.from_pretrained`` and pipelines load it back adapted. A LLaVA with a Pixtral
    tower: the ``PixtralProcessor``'s ``spatial_merge_size`` becomes 2 (saved with it). Mistral 3
    and Qwen2-VL processors are returned unchanged: they count 2x2-merged tokens already."""
    config = getattr(model_or_config, "config", model_or_config)
    if getattr(config, "saep", None) is None:
        raise ValueError("the model has no SAEP projector: call apply_saep first (or build it "
                         "from saep_config)")
    family = _family(config)
    if family == "llava_pixtral":  # (H/2) x (W/2) tokens per image, images in steps of 2 patches
        processor.spatial_merge_size = 2
        return processor
    if family in _PACKED:  # Mistral 3 and Qwen2-VL processors already count 2x2-merged tokens
        return processor
    patch = int(getattr(processor, "patch_size", None) or config.vision_config.patch_size)
    processor.patch_size = PooledPatchSize(patch)
    saep = _SAEP_PROCESSORS.get(type(processor))
    if saep is not None:
        processor.__class__ = saep
    return processor


# ------------------------------------------------------------------------------ model classes


class _SAEPFromConfig:
    """Builds the base model, then swaps in the SAEP projector its config asks for (the
    defaults where the config has no ``saep`` settings)."""

    def __init__(self, config):
        super().__init__(config)
        if getattr(config, "saep", None) is None:
            _set_saep(config, DEFAULT_LAYERS, 3, "avg", True, "auto")
        _install(self)


class SAEPLlavaConfig(LlavaConfig):
    """LlavaConfig of an SAEP model (``model_type`` "saep_llava", registered with AutoConfig
    when this module is imported)."""

    model_type = "saep_llava"


class SAEPLlavaNextConfig(LlavaNextConfig):
    """LlavaNextConfig of an SAEP model (``model_type`` "saep_llava_next")."""

    model_type = "saep_llava_next"


class SAEPLlavaForConditionalGeneration(_SAEPFromConfig, LlavaForConditionalGeneration):
    """LLaVA with an SAEP projector, built from a config that has ``saep`` settings
    (``saep_config``), or loaded with ``from_pretrained`` (or ``AutoModelForImageTextToText``)
    from a checkpoint saved after ``apply_saep``."""

    config_class = SAEPLlavaConfig


class SAEPLlavaNextForConditionalGeneration(_SAEPFromConfig, LlavaNextForConditionalGeneration):
    """LLaVA-NeXT with an SAEP projector (every anyres crop through the fused op)."""

    config_class = SAEPLlavaNextConfig


class SAEPLlavaModel(_SAEPFromConfig, LlavaModel):
    """The base LlavaModel (no LM head) with an SAEP projector (``AutoModel``)."""

    config_class = SAEPLlavaConfig


class SAEPLlavaNextModel(_SAEPFromConfig, LlavaNextModel):
    """The base LlavaNextModel with an SAEP projector (``AutoModel``)."""

    config_class = SAEPLlavaNextConfig


class SAEPMistral3Config(Mistral3Config):
    """Mistral3Config of an SAEP model (``model_type`` "saep_mistral3")."""

    model_type = "saep_mistral3"


class SAEPQwen2VLConfig(Qwen2VLConfig):
    """Qwen2VLConfig of an SAEP model (``model_type`` "saep_qwen2_vl")."""

    model_type = "saep_qwen2_vl"


class SAEPMistral3ForConditionalGeneration(_SAEPFromConfig, Mistral3ForConditionalGeneration):
    """Mistral 3 with an SAEP projector in place of its patch merger and MLP (each image on its
    own grid)."""

    config_class = SAEPMistral3Config


class SAEPMistral3Model(_SAEPFromConfig, Mistral3Model):
    """The base Mistral3Model with an SAEP projector (``AutoModel``)."""

    config_class = SAEPMistral3Config


class SAEPQwen2VLForConditionalGeneration(_SAEPFromConfig, Qwen2VLForConditionalGeneration):
    """Qwen2-VL with an SAEP merger in its vision tower (``SAEPQwen2VLMerger``)."""

    config_class = SAEPQwen2VLConfig


class SAEPQwen2VLModel(_SAEPFromConfig, Qwen2VLModel):
    """The base Qwen2VLModel with an SAEP merger (``AutoModel``)."""

    config_class = SAEPQwen2VLConfig


# the stock class of a model -> its SAEP class (apply_saep re-labels the model with it)
_SAEP_CLASSES = {LlavaForConditionalGeneration: SAEPLlavaForConditionalGeneration,
                 LlavaNextForConditionalGeneration: SAEPLlavaNextForConditionalGeneration,
                 LlavaModel: SAEPLlavaModel, LlavaNextModel: SAEPLlavaNextModel,
                 Mistral3ForConditionalGeneration: SAEPMistral3ForConditionalGeneration,
                 Mistral3Model: SAEPMistral3Model,
                 Qwen2VLForConditionalGeneration: SAEPQwen2VLForConditionalGeneration,
                 Qwen2VLModel: SAEPQwen2VLModel}
_SAEP_CONFIGS = {stock.config_class: saep.config_class for stock, saep in _SAEP_CLASSES.items()}


def _as_saep_classes(model) -> None:
    """Re-label a stock LLaVA(-NeXT) model and its config as their SAEP subclasses (which add
    no state), so that ``save_pretrained`` writes the SAEP ``architectures`` and
    ``model_type`` and the Auto classes load it back as SAEP."""
    saep = _SAEP_CLASSES.get(type(model))
    if saep is not None:
        model.__class__ = saep
        model.config.__class__ = _SAEP_CONFIGS.get(type(model.config), type(model.config))


def _register_auto_classes() -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

    for cls, base, processor in (
            (SAEPLlavaForConditionalGeneration, SAEPLlavaModel, SAEPLlavaProcessor),
            (SAEPLlavaNextForConditionalGeneration, SAEPLlavaNextModel, SAEPLlavaNextProcessor),
            (SAEPMistral3ForConditionalGeneration, SAEPMistral3Model, None),
            (SAEPQwen2VLForConditionalGeneration, SAEPQwen2VLModel, None)):
        AutoConfig.register(cls.config_class.model_type, cls.config_class, exist_ok=True)
        AutoModelForImageTextToText.register(cls.config_class, cls, exist_ok=True)
        AutoModel.register(cls.config_class, base, exist_ok=True)
        if processor is not None:  # the others keep their stock processors
            AutoProcessor.register(cls.config_class, processor, exist_ok=True)


def _share_checkpoint_layout() -> None:
    """Load and save SAEP checkpoints with the key renames transformers applies to LLaVA
    checkpoints (it skips them for classes defined outside the library unless registered)."""
    try:
        from transformers.conversion_mapping import (get_checkpoint_conversion_mapping,
                                                     register_checkpoint_conversion_mapping)
    except ImportError:  # a transformers without conversion mappings renames nothing
        return
    for cls, model_type in ((SAEPLlavaForConditionalGeneration, "llava"),
                            (SAEPLlavaNextForConditionalGeneration, "llava_next"),
                            (SAEPMistral3ForConditionalGeneration, "mistral3"),
                            (SAEPQwen2VLForConditionalGeneration, "qwen2_vl")):
        mapping = get_checkpoint_conversion_mapping(model_type)
        if mapping is not None:
            for name in (cls.__name__, cls.config_class.model_type):
                register_checkpoint_conversion_mapping(name, mapping, overwrite=True)


_share_checkpoint_layout()
_register_auto_classes()
