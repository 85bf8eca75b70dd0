"""SAEP behind the vision towers of ``transformers`` that pack the patch tokens of all images of
a batch into one sequence, each image at its own resolution (its own patch grid). The SAEP
projector runs ``fused_aggregate_varlen`` over them: one launch for all images, each image
convolved and pooled on its own grid.

* **Pixtral towers** (Mistral 3, LLaVA with a Pixtral tower): tokens row-major per image,
  image i's grid ``image_sizes[i] // patch_size``, no CLS token. ``pixtral_image_features``
  replaces the model's ``get_image_features``; the SAEP projector takes the place of the
  multimodal projector (for Mistral 3: its RMSNorm, 2x2 patch merger and MLP).
* **Qwen2-VL**: tokens in the processor's 2x2-merge order (the four tokens of each 2x2 window
  consecutive), one grid (t, h, w) per image or video, that is t frames of h x w patches.
  ``SAEPQwen2VLMerger`` replaces the tower's ``PatchMerger``: the tower calls it with its last
  hidden state as before, and it reads the other selected layers from the tower's blocks
  (forward hooks) and the grids from the tower's call, so every path through the tower
  (images, videos, ``generate``) runs SAEP unchanged.

Both pool 2x2 like the mergers they replace, so the processors' image-token counts stay valid
(they size images in multiples of two patches: the grids are even). The wiring into the model
classes, configs and checkpoints is in ``integrations.transformers``.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from ..modules import SAEPProjector
from ..spec import num_output_tokens

Tensor = torch.Tensor


def pixtral_grids(image_sizes, patch_size: int) -> List[Tuple[int, int]]:
    """Patch grids of a Pixtral tower's images from their sizes in pixels ([n, 2] tensor or
    pairs): (H // patch_size, W // patch_size), as the tower cuts them."""
    if image_sizes is None:
        raise ValueError("image_sizes is required: a Pixtral tower takes each image at its own "
                         "size, and SAEP pools each image on its own patch grid")
    sizes = image_sizes.tolist() if isinstance(image_sizes, Tensor) else image_sizes
    return [(int(h) // patch_size, int(w) // patch_size) for h, w in sizes]


def pixtral_image_features(self, pixel_values, image_sizes=None, vision_feature_layer=None,
                           vision_feature_select_strategy=None, **kwargs):
    """``get_image_features`` of a Mistral 3 model or a LLaVA with a Pixtral tower, with SAEP:
    the selected layers of the packed tokens go to ``SAEPProjector.forward_varlen`` (no
    ``torch.cat``), one entry of ceil(H/2) * ceil(W/2) tokens per image."""
    layers = self.config.vision_feature_layer if vision_feature_layer is None \
        else vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    return_dict = kwargs.pop("return_dict", True)
    kwargs.pop("output_hidden_states", None)
    grids = pixtral_grids(image_sizes, self.vision_tower.patch_size)
    out = self.vision_tower(pixel_values, image_sizes=image_sizes, output_hidden_states=True,
                            return_dict=True, **kwargs)
    hidden = [out.hidden_states[i] for i in layers]
    features = self.multi_modal_projector.forward_varlen(hidden, grids, layout="row_major")
    out.pooler_output = torch.split(features.reshape(-1, features.shape[-1]),
                                    [num_output_tokens(h, w) for h, w in grids])
    return out if return_dict else out.to_tuple()


def qwen2_vl_frames(grid_thw) -> List[Tuple[int, int]]:
    """One (h, w) grid per frame from Qwen2-VL's (t, h, w) rows: t frames of h x w patches,
    their tokens one after another."""
    rows = grid_thw.tolist() if isinstance(grid_thw, Tensor) else grid_thw
    return [(int(h), int(w)) for t, h, w in rows for _ in range(int(t))]


class SAEPQwen2VLMerger(SAEPProjector):
    """SAEP in place of Qwen2-VL's ``PatchMerger`` (``model.visual.merger``).

    The tower calls ``merger(last_hidden_state)``; this module also needs the other selected
    layers and the grids of the call. ``attach(visual)`` registers hooks on the tower that
    hand them over: a pre-hook on the tower keeps ``grid_thw``, hooks on the blocks keep the
    selected hidden states (index 0: the patch embeddings entering block 0; index i: the output
    of block i-1, as in the tower's ``hidden_states``). They are dropped once the merger has
    used them. ``forward`` returns [sum of t*h*w/4, llm_dim] in the merger's token order.
    """

    def __init__(self, layers: Sequence[int], depth: int, **projector_kwargs):
        super().__init__(num_layers=len(layers), **projector_kwargs)
        self.layers = [int(i) % (depth + 1) for i in layers]  # indices into hidden_states
        self.depth = depth
        self._kept: Dict[int, Tensor] = {}
        self._grid_thw = None
        self._hooks: list = []

    def attach(self, visual) -> None:
        """Hook this merger to the Qwen2-VL vision tower ``visual`` (idempotent)."""
        self.detach()
        self._hooks.append(visual.register_forward_pre_hook(self._keep_grids, with_kwargs=True))
        for index in sorted(set(self.layers)):
            if index == 0:
                self._hooks.append(visual.blocks[0].register_forward_pre_hook(
                    lambda module, args, index=0: self._keep(index, args[0])))
            elif index < self.depth:  # the last layer is the merger's own input
                self._hooks.append(visual.blocks[index - 1].register_forward_hook(
                    lambda module, args, output, index=index: self._keep(index, output)))

    def detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _keep_grids(self, module, args, kwargs):
        self._kept.clear()
        self._grid_thw = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]

    def _keep(self, index: int, hidden: Tensor) -> None:
        if self._grid_thw is None:  # not inside a tower call (a checkpointed block's recompute)
            return
        self._kept[index] = hidden[0] if isinstance(hidden, (tuple, list)) else hidden

    def forward(self, last_hidden_state: Tensor) -> Tensor:  # type: ignore[override]
        if self._grid_thw is None:
            raise RuntimeError("SAEPQwen2VLMerger runs inside the Qwen2-VL vision tower it is "
                               "attached to (attach(visual)); call the tower, not the merger")
        try:
            hidden = [last_hidden_state if i == self.depth else self._kept[i]
                      for i in self.layers]
            grids = qwen2_vl_frames(self._grid_thw)
        finally:
            self._kept.clear()
            self._grid_thw = None
        return self.forward_varlen(hidden, grids, layout="merge_2x2")

    def extra_repr(self) -> str:
        return f"layers={self.layers}, " + super().extra_repr()


def qwen2_vl_merger(visual, layers: Sequence[int], settings: dict, llm_dim: int,
                    device=None, dtype=None) -> SAEPQwen2VLMerger:
    """An ``SAEPQwen2VLMerger`` for the tower ``visual``, attached to it."""
    config = visual.config
    merger = SAEPQwen2VLMerger(
        layers=layers, depth=config.depth, vision_dim=config.embed_dim, llm_dim=llm_dim,
        kernel_size=settings["kernel_size"], pool=settings["pool"],
        residual=settings["residual"], backend=settings["backend"], device=device, dtype=dtype)
    merger.attach(visual)
    return merger

