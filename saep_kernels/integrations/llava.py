"""SAEP for the LLaVA codebase (haotian-liu/LLaVA, ``llava-torch`` on PyPI) and its forks.

LLaVA builds its vision tower with ``build_vision_tower(config)`` and its projector with
``build_vision_projector(config)``, then computes ``mm_projector(vision_tower(images))``.
This module gives both builders, with the same signatures:

* ``build_vision_tower`` returns a ``MultiLayerVisionTower``: LLaVA's ``CLIPVisionTower``
  interface (built from ``(vision_tower, args)``, lazy ``load_model``, ``image_processor``,
  ``is_loaded``, ``dtype``, ``device``, ``config``, ``hidden_size``, ``num_patches``,
  ``num_patches_per_side``, ``dummy_feature``), for CLIP towers (and SigLIP, with
  transformers >= 4.37), returning the selected layers as ``VisionFeatures`` for SAEP (no
  concatenation: SAEP reads the layers in place and skips the CLS token by offset) and as
  LLaVA's one tensor for the other projector types. With ``mm_projector_type="saep"``, ``num_patches_per_side``
  and ``num_patches`` count the tokens the LLM sees, the 2x2-pooled grid (24 -> 12), which is
  what LLaVA-1.6's ``spatial_unpad`` reshapes with.
* ``build_vision_projector`` knows ``"saep"`` (tuned by ``mm_saep_kernel_size``,
  ``mm_saep_pool``, ``mm_saep_residual``, ``mm_saep_backend``) next to LLaVA's ``"linear"``,
  ``"mlp<N>x_gelu"`` and ``"identity"`` (same parameter names, so LLaVA checkpoints load).
  Each takes ``VisionFeatures`` and the single tensor LLaVA's own ``CLIPVisionTower``
  returns (for SAEP: one layer, or K layers concatenated along channels).
* ``mm_vision_select_layer`` may be an int, a sequence of ints or a string of them,
  ``"-2,-5,-8,-11"`` (what a command line gives).

``patch_llava()`` points LLaVA's modules at these builders and lets ``train.py`` take a list
of layers from the command line (``--mm_vision_select_layer=-2,-5,-8,-11``); with
``--mm_projector_type saep`` the rest of LLaVA (training, ``load_pretrained_model``,
``generate``, anyres with ``flat`` or ``spatial_unpad``) runs unmodified. Nothing here needs
a particular transformers version (LLaVA pins 4.36-4.37); transformers is imported only to
load a tower by name.
"""

from __future__ import annotations

import math
import re
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..modules import SAEPProjector
from ..spec import pooled_size

__all__ = ["VisionFeatures", "MultiLayerVisionTower", "build_vision_tower",
           "build_vision_projector", "parse_select_layers", "select_layers", "patch_llava"]


class VisionFeatures(NamedTuple):
    """Hidden states of the selected vision layers, as the tower produced them."""

    hidden_states: Tuple[torch.Tensor, ...]  # K tensors [B, T, C]
    num_prefix_tokens: int                   # CLS / register tokens ahead of the grid
    grid: Tuple[int, int]                    # (H, W) of the patch tokens

    def patches(self) -> torch.Tensor:
        """LLaVA's projector input: the layers' patch tokens, concatenated along channels."""
        tokens = [h[:, self.num_prefix_tokens:] for h in self.hidden_states]
        return tokens[0] if len(tokens) == 1 else torch.cat(tokens, dim=-1)


def check_hidden_state_index(argument: str, index: int, entries: int) -> None:
    """A ValueError naming ``argument`` unless ``index`` picks one of a tower's ``entries``
    hidden states (the embeddings and each layer's output; negative from the end)."""
    if not -entries <= index < entries:
        raise ValueError(f"{argument}: {index} is not a hidden state of the vision tower "
                         f"(hidden_states has {entries} entries)")


def parse_select_layers(value, argument: str = "mm_vision_select_layer") -> Tuple[int, ...]:
    """Selected layers as a tuple of ints from an int, a sequence of ints, or a string of
    comma-separated ints (``"-2"``, ``"-2,-5,-8,-11"``, ``"[-2, -5]"``)."""
    if isinstance(value, str):
        items = [s for s in re.split(r"[\s,]+", value.strip().strip("[]()")) if s]
        try:
            layers = tuple(int(s) for s in items)
        except ValueError:
            layers = ()
        if not layers:
            raise ValueError(f"{argument}: {value!r} is not a comma-separated list of layer "
                             f"indices such as '-2,-5,-8,-11'")
        return layers
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, Sequence) and value and all(
            isinstance(i, int) and not isinstance(i, bool) for i in value):
        return tuple(value)
    raise TypeError(f"{argument} must be an int, a sequence of ints or a string such as "
                    f"'-2,-5,-8,-11', got {value!r}")


def select_layers(config) -> Tuple[int, ...]:
    """``mm_vision_select_layer`` of a LLaVA config or argument set (LLaVA's default: -2)."""
    return parse_select_layers(getattr(config, "mm_vision_select_layer", -2))


# The tower families a name can load: (vision model, its config, image processor) classes.
_TOWER_CLASSES = {
    "clip": ("CLIPVisionModel", "CLIPVisionConfig", "CLIPImageProcessor"),
    "siglip": ("SiglipVisionModel", "SiglipVisionConfig", "SiglipImageProcessor"),
}


def _tower_classes(name: str):
    import transformers

    model_type = transformers.AutoConfig.from_pretrained(name).model_type
    family = model_type.removesuffix("_vision_model")
    if family not in _TOWER_CLASSES:
        raise ValueError(f"vision_tower {name!r} is a {model_type!r} model; "
                         f"MultiLayerVisionTower loads {sorted(_TOWER_CLASSES)} towers")
    missing = [c for c in _TOWER_CLASSES[family] if not hasattr(transformers, c)]
    if missing:
        raise ValueError(f"vision_tower {name!r}: transformers {transformers.__version__} "
                         f"has no {', '.join(missing)}")
    return tuple(getattr(transformers, c) for c in _TOWER_CLASSES[family])


class MultiLayerVisionTower(nn.Module):
    """LLaVA's ``CLIPVisionTower`` interface, returning the selected layers as
    ``VisionFeatures``.

    ``vision_tower`` is a model name or path, loaded like LLaVA does (lazily with
    ``delay_load=True``, frozen unless ``args.unfreeze_mm_vision_tower``), or a vision model
    already built. ``args`` is LLaVA's config or model arguments: ``mm_vision_select_layer``
    (int, list or string), ``mm_vision_select_feature`` (``"patch"`` drops the CLS token,
    ``"cls_patch"`` keeps every token, for towers without CLS such as SigLIP) and
    ``mm_projector_type`` (``"saep"`` makes ``num_patches_per_side`` the pooled grid). The
    keywords ``select_layer`` / ``select_feature`` override ``args``.
    """

    def __init__(self, vision_tower: Union[str, nn.Module], args=None, delay_load: bool = False,
                 *, select_layer=None, select_feature: Optional[str] = None,
                 projector_type: Optional[str] = None):
        super().__init__()
        if isinstance(args, (int, str, list, tuple)):
            raise TypeError(f"args must be LLaVA's config or model arguments, got {args!r}: pass "
                            f"layers as select_layer=...")
        # (value, the argument it came from) for every setting, so errors name what was set
        if select_layer is not None:
            layers, self._layer_argument = select_layer, "select_layer"
        else:
            layers = getattr(args, "mm_vision_select_layer", -2)
            self._layer_argument = "mm_vision_select_layer"
        self.select_layer = parse_select_layers(layers, self._layer_argument)
        if select_feature is not None:
            self.select_feature, feature_argument = select_feature, "select_feature"
        else:
            self.select_feature = getattr(args, "mm_vision_select_feature", "patch")
            feature_argument = "mm_vision_select_feature"
        if self.select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"{feature_argument} must be 'patch' or 'cls_patch', got "
                             f"{self.select_feature!r}")
        # LLaVA's default projector is "linear"; a tower built without LLaVA's arguments is
        # SAEP's
        self.projector_type = projector_type or (
            getattr(args, "mm_projector_type", None) or "linear" if args is not None else "saep")
        self.is_loaded = False
        self.image_processor = None
        if isinstance(vision_tower, nn.Module):
            self.vision_tower_name = getattr(getattr(vision_tower, "config", None),
                                             "_name_or_path", None)
            self.vision_tower = vision_tower
            self.is_loaded = True
            self._check_layers()
        elif isinstance(vision_tower, str):
            self.vision_tower_name = vision_tower
            self._unfreeze = bool(getattr(args, "unfreeze_mm_vision_tower", False))
            if not delay_load or self._unfreeze:
                self.load_model()
            else:
                self.cfg_only = _tower_classes(vision_tower)[1].from_pretrained(vision_tower)
                self._check_layers()
        else:
            raise TypeError(f"vision_tower must be a model name, a path or an nn.Module, got "
                            f"{type(vision_tower).__name__}")

    def load_model(self, device_map=None):
        """Load the tower and its image processor (``from_pretrained``), frozen as LLaVA does."""
        if self.is_loaded:
            return
        model_class, _, processor_class = _tower_classes(self.vision_tower_name)
        self.image_processor = processor_class.from_pretrained(self.vision_tower_name)
        self.vision_tower = model_class.from_pretrained(self.vision_tower_name,
                                                        device_map=device_map)
        self.vision_tower.requires_grad_(getattr(self, "_unfreeze", False))
        self.is_loaded = True
        self._check_layers()

    def _check_layers(self):
        layers = getattr(self.config, "num_hidden_layers", None)
        if isinstance(layers, int):
            for i in self.select_layer:
                check_hidden_state_index(self._layer_argument, i, layers + 1)

    def _require_loaded(self, what: str):
        if not self.is_loaded:
            raise RuntimeError(f"MultiLayerVisionTower.{what}: the tower "
                               f"{self.vision_tower_name!r} is not loaded; call load_model()")

    def feature_select(self, outputs) -> VisionFeatures:
        hidden_states = outputs.hidden_states
        for i in self.select_layer:
            check_hidden_state_index(self._layer_argument, i, len(hidden_states))
        hidden = tuple(hidden_states[i] for i in self.select_layer)
        prefix = 1 if self.select_feature == "patch" else 0
        side = math.isqrt(hidden[0].shape[1] - prefix)
        if side * side != hidden[0].shape[1] - prefix:
            raise ValueError(f"{hidden[0].shape[1]} tokens with select_feature="
                             f"{self.select_feature!r} do not form a square grid ('patch' drops "
                             f"a CLS token, 'cls_patch' is for towers without one)")
        return VisionFeatures(hidden, prefix, (side, side))

    def _encode(self, images: torch.Tensor):
        out = self.vision_tower(images.to(device=self.device, dtype=self.dtype),
                                output_hidden_states=True, return_dict=True)
        features = self.feature_select(out)
        features = features._replace(hidden_states=tuple(h.to(images.dtype)
                                                         for h in features.hidden_states))
        return features if self.projector_type == "saep" else features.patches()

    def forward(self, images: Union[torch.Tensor, List[torch.Tensor]]):
        """For SAEP, ``VisionFeatures`` (the selected layers, read in place by the projector);
        for LLaVA's other projectors, LLaVA's tensor [B, T, K*C] (the layers' tokens,
        concatenated along channels), so any projector module takes it. A list of images
        gives a list, one per image, as LLaVA's tower does. Gradients are recorded only when
        a tower parameter requires one (LLaVA's frozen tower runs without)."""
        self._require_loaded("forward")
        trainable = any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            if isinstance(images, (list, tuple)):
                return [self._encode(image.unsqueeze(0)) for image in images]
            return self._encode(images)

    @property
    def dummy_feature(self) -> torch.Tensor:
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        self._require_loaded("dtype")
        return next(self.vision_tower.parameters()).dtype

    @property
    def device(self) -> torch.device:
        self._require_loaded("device")
        return next(self.vision_tower.parameters()).device

    @property
    def config(self):
        """The vision model's config (None for a module built without one)."""
        return getattr(self.vision_tower, "config", None) if self.is_loaded else self.cfg_only

    @property
    def hidden_size(self) -> int:
        """One layer's width (LLaVA's ``mm_hidden_size``)."""
        return self.config.hidden_size

    @property
    def num_patches_per_side(self) -> int:
        """The side of the grid the LLM sees: the tower's, 2x2-pooled for SAEP."""
        side = self.config.image_size // self.config.patch_size
        return pooled_size(side, side)[0] if self.projector_type == "saep" else side

    @property
    def num_patches(self) -> int:
        """Image tokens per image the LLM sees."""
        return self.num_patches_per_side ** 2


def build_vision_tower(vision_tower_cfg, **kwargs) -> MultiLayerVisionTower:
    """LLaVA's ``build_vision_tower``: the tower named by ``mm_vision_tower`` (or
    ``vision_tower``) of a config or LLaVA's model arguments."""
    name = getattr(vision_tower_cfg, "mm_vision_tower",
                   getattr(vision_tower_cfg, "vision_tower", None))
    if not name:
        raise ValueError("build_vision_tower: the config names no vision tower "
                         "(mm_vision_tower or vision_tower)")
    return MultiLayerVisionTower(name, args=vision_tower_cfg, **kwargs)


def _as_tensor(features):
    return features.patches() if isinstance(features, VisionFeatures) else features


# LLaVA's projector modules (same parameter names, so LLaVA projector checkpoints load) that
# also accept VisionFeatures.
class _Linear(nn.Linear):
    def forward(self, features):
        return super().forward(_as_tensor(features))


class _Sequential(nn.Sequential):
    def forward(self, features):
        return super().forward(_as_tensor(features))


class _Identity(nn.Module):
    def forward(self, features, *args, **kwargs):
        return _as_tensor(features)

    @property
    def config(self):
        return {"mm_projector_type": "identity"}


def _square_grid(tokens: int) -> Tuple[int, int]:
    """(num_prefix_tokens, side) of ``tokens`` that are a square grid, after at most one
    CLS token."""
    for prefix in (0, 1):
        side = math.isqrt(max(tokens - prefix, 0))
        if side > 0 and side * side == tokens - prefix:
            return prefix, side
    raise ValueError(f"features: {tokens} tokens are not a square grid (with or without one "
                     f"CLS token); pass VisionFeatures or grid= for other grids")


class _SAEPFeatureProjector(SAEPProjector):
    """``SAEPProjector`` taking ``VisionFeatures``, a list of K layers, or one tensor: the
    patch tokens of one layer or of K layers concatenated along channels (read in place)."""

    def forward(self, features, grid=None, num_prefix_tokens: int = 0):
        if isinstance(features, VisionFeatures):
            return super().forward(list(features.hidden_states), grid=features.grid,
                                   num_prefix_tokens=features.num_prefix_tokens)
        if isinstance(features, torch.Tensor):
            if features.dim() != 3 or features.shape[-1] != self.vision_dim * self.num_layers:
                raise ValueError(
                    f"features: a tensor [B, T, {self.vision_dim * self.num_layers}] "
                    f"({self.num_layers} layer(s) of {self.vision_dim} channels, concatenated) "
                    f"was expected, got {tuple(features.shape)}")
            if grid is None:
                num_prefix_tokens, side = _square_grid(features.shape[1])
                grid = (side, side)
            features = list(features.split(self.vision_dim, dim=-1))
        return super().forward(features, grid=grid, num_prefix_tokens=num_prefix_tokens)


def build_vision_projector(config, delay_load: bool = False, **kwargs) -> nn.Module:
    """LLaVA's ``build_vision_projector`` with ``mm_projector_type="saep"`` and multi-layer
    selection. ``config`` needs ``mm_hidden_size`` (one tower layer's width) and
    ``hidden_size`` (the LLM's); ``mm_vision_select_layer`` may name several layers, whose
    channels the non-SAEP projectors take concatenated."""
    projector_type = getattr(config, "mm_projector_type", "linear")
    if projector_type == "identity":
        return _Identity()
    for name, what in (("mm_hidden_size", "the vision tower's width"),
                       ("hidden_size", "the LLM's width")):
        if getattr(config, name, None) is None:
            raise ValueError(f"config.{name} ({what}) is missing: build_vision_projector needs "
                             f"it for mm_projector_type={projector_type!r}")
    layers = select_layers(config)
    in_dim = config.mm_hidden_size * len(layers)  # the channel concat for non-SAEP types
    out_dim = config.hidden_size
    if projector_type == "saep":
        return _SAEPFeatureProjector(
            vision_dim=config.mm_hidden_size, num_layers=len(layers), llm_dim=out_dim,
            kernel_size=getattr(config, "mm_saep_kernel_size", 3),
            pool=getattr(config, "mm_saep_pool", "avg"),
            residual=getattr(config, "mm_saep_residual", True),
            backend=getattr(config, "mm_saep_backend", "auto"))
    if projector_type == "linear":
        return _Linear(in_dim, out_dim)
    match = re.match(r"^mlp(\d+)x_gelu$", projector_type)
    if match:
        modules = [nn.Linear(in_dim, out_dim)]
        for _ in range(1, int(match.group(1))):
            modules += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        return _Sequential(*modules)
    raise ValueError(f"Unknown projector type: {projector_type!r} (known: 'linear', "
                     f"'mlp<N>x_gelu', 'identity', 'saep')")


def patch_llava(command_line: bool = True) -> None:
    """Point the installed LLaVA package (``llava``) at this module's builders.

    Afterwards ``LlavaLlamaForCausalLM`` and the other LLaVA models build
    ``MultiLayerVisionTower`` and, with ``mm_projector_type="saep"``, the SAEP projector,
    in ``__init__`` (from a saved config) and in ``initialize_vision_modules`` (training).
    With ``command_line`` (default), ``llava.train.train.ModelArguments`` takes
    ``mm_vision_select_layer`` as a string, so ``--mm_vision_select_layer=-2,-5,-8,-11``
    works (importing ``llava.train.train`` needs LLaVA's training dependencies; pass
    ``command_line=False`` where they are missing). Call it before building a model;
    calling it again changes nothing.
    """
    import importlib

    arch, encoder, projector = (importlib.import_module(f"llava.model.{name}") for name in (
        "llava_arch", "multimodal_encoder.builder", "multimodal_projector.builder"))
    train = importlib.import_module("llava.train.train") if command_line else None
    # every import done: nothing is patched when one of them fails
    arch.build_vision_tower = encoder.build_vision_tower = build_vision_tower
    arch.build_vision_projector = projector.build_vision_projector = build_vision_projector
    if train is not None:
        train.ModelArguments.__annotations__["mm_vision_select_layer"] = Optional[str]
        train.ModelArguments.__dataclass_fields__["mm_vision_select_layer"].type = Optional[str]
