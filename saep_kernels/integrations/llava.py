"""SAEP for LLaVA-style training code (haotian-liu/LLaVA and its forks), switched by config.

Such code builds its projector with ``build_vision_projector(config)`` from
``config.mm_projector_type`` and selects one vision layer with
``config.mm_vision_select_layer``. Here:

* ``build_vision_projector(config)`` knows ``"linear"``, ``"mlp<N>x_gelu"``, ``"identity"``
  and ``"saep"`` (``mm_saep_kernel_size``, ``mm_saep_pool``, ``mm_saep_residual`` tune it);
* ``mm_vision_select_layer`` may be a list of layers;
* ``MultiLayerVisionTower`` wraps a Hugging Face vision model (CLIP, SigLIP) and returns the
  selected layers as ``VisionFeatures``, which every projector built here accepts: SAEP reads
  the layers in place (CLS skipped by offset), the others get LLaVA's input (patch tokens of
  one layer, or the channel concat of several).

So ``image_features = mm_projector(vision_tower(images))`` keeps working, and switching a
training run to SAEP is ``mm_projector_type="saep"`` and a list of layers.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple, Sequence, Tuple, Union

import torch
from torch import nn

from ..modules import SAEPProjector

__all__ = ["VisionFeatures", "MultiLayerVisionTower", "build_vision_projector",
           "select_layers"]


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


def select_layers(config) -> Tuple[int, ...]:
    """``mm_vision_select_layer`` as a tuple (LLaVA's default: -2)."""
    layers = getattr(config, "mm_vision_select_layer", -2)
    return (int(layers),) if isinstance(layers, int) else tuple(int(i) for i in layers)


class MultiLayerVisionTower(nn.Module):
    """A vision model returning the selected layers' hidden states as ``VisionFeatures``.

    ``select_feature`` follows LLaVA: ``"patch"`` drops the CLS token (CLIP), ``"cls_patch"``
    keeps every token (use it for towers without CLS, e.g. SigLIP).
    """

    def __init__(self, vision_model: nn.Module, select_layer: Union[int, Sequence[int]] = -2,
                 select_feature: str = "patch"):
        super().__init__()
        if select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"select_feature must be 'patch' or 'cls_patch', got "
                             f"{select_feature!r}")
        self.vision_model = vision_model
        self.select_layer = (select_layer,) if isinstance(select_layer, int) else \
            tuple(select_layer)
        self.select_feature = select_feature
        n = getattr(getattr(vision_model, "config", None), "num_hidden_layers", None)
        if isinstance(n, int):
            for i in self.select_layer:
                check_hidden_state_index("select_layer", i, n + 1)

    @property
    def hidden_size(self) -> int:
        return self.vision_model.config.hidden_size

    def forward(self, images: torch.Tensor) -> VisionFeatures:
        out = self.vision_model(images, output_hidden_states=True, return_dict=True)
        for i in self.select_layer:
            check_hidden_state_index("select_layer", i, len(out.hidden_states))
        hidden = tuple(out.hidden_states[i] for i in self.select_layer)
        prefix = 1 if self.select_feature == "patch" else 0
        side = math.isqrt(hidden[0].shape[1] - prefix)
        if side * side != hidden[0].shape[1] - prefix:
            raise ValueError(f"{hidden[0].shape[1]} tokens with select_feature="
                             f"{self.select_feature!r} do not form a square grid")
        return VisionFeatures(hidden, prefix, (side, side))


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
    def forward(self, features):
        return _as_tensor(features)


class _SAEPFeatureProjector(SAEPProjector):
    """``SAEPProjector`` taking ``VisionFeatures`` (or the arguments of SAEPProjector)."""

    def forward(self, features, grid=None, num_prefix_tokens: int = 0):
        if isinstance(features, VisionFeatures):
            return super().forward(list(features.hidden_states), grid=features.grid,
                                   num_prefix_tokens=features.num_prefix_tokens)
        return super().forward(features, grid=grid, num_prefix_tokens=num_prefix_tokens)


def build_vision_projector(config, **kwargs) -> nn.Module:
    """LLaVA's ``build_vision_projector`` with ``mm_projector_type="saep"`` and multi-layer
    selection. ``config`` needs ``mm_hidden_size`` (the tower's width) and ``hidden_size``
    (the LLM's); ``mm_vision_select_layer`` may be a list."""
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
