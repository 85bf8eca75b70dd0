"""The reference configurations (docs/op.md section 3): the vision towers and projector
sizes saep-kernels is built and measured for. Tests, benchmarks and scripts take them from
here.

    >>> from saep_kernels.configs import REFERENCE_CONFIGS
    >>> cfg = REFERENCE_CONFIGS["llava15-7b"]
    >>> cfg.tokens, cfg.out_tokens        # (577, 144)
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec import num_output_tokens

__all__ = ["Config", "REFERENCE_CONFIGS", "REFERENCE_BATCHES", "ImageMix", "IMAGE_MIXES"]


@dataclass(frozen=True)
class Config:
    name: str
    tower: str
    height: int  # patch grid
    width: int
    channels: int  # C of each layer
    prefix: int  # tokens before the grid (CLIP's CLS)
    layers: int  # K
    llm_dim: int  # D
    crops: int = 1  # images are split into this many crops, each a batch entry

    @property
    def tokens(self) -> int:
        return self.prefix + self.height * self.width

    @property
    def out_tokens(self) -> int:
        return num_output_tokens(self.height, self.width)


REFERENCE_CONFIGS = {
    c.name: c
    for c in [
        Config("llava15-7b", "CLIP ViT-L/14-336", 24, 24, 1024, 1, 4, 4096),
        Config("llava15-13b", "CLIP ViT-L/14-336", 24, 24, 1024, 1, 4, 5120),
        Config("siglip-so400m", "SigLIP so400m/14-384", 27, 27, 1152, 0, 4, 4096),
        Config("anyres-5crop", "CLIP ViT-L/14-336, 5 crops", 24, 24, 1024, 1, 4, 4096, crops=5),
    ]
}

# Images per batch the configurations are measured at (bf16 first, then fp16 and fp32).
REFERENCE_BATCHES = (1, 8, 32)


@dataclass(frozen=True)
class ImageMix:
    """Images of different sizes in one batch, as a native-resolution tower packs them
    (``fused_aggregate_varlen``): one patch grid (H, W) per image."""

    name: str
    tower: str
    channels: int  # C of each layer
    layers: int  # K
    grids: tuple  # ((H, W), ...)
    description: str

    @property
    def tokens(self) -> int:
        return sum(h * w for h, w in self.grids)

    @property
    def out_tokens(self) -> int:
        return sum(num_output_tokens(h, w) for h, w in self.grids)


IMAGE_MIXES = {
    m.name: m
    for m in [
        # Pixtral-12B's tower: 16-pixel patches, C=1024; its processor sizes every image in
        # steps of 32 pixels (2x2-merged tokens), so the grids are even.
        ImageMix("pixtral-mix8", "Pixtral ViT (16 px patches)", 1024, 4,
                 ((32, 24), (24, 32), (32, 32), (18, 32), (32, 18), (16, 16), (22, 32), (12, 20)),
                 "8 images, longest edge <= 512 px: 4:3 and 3:4 photos, a square, 16:9 and 9:16 "
                 "frames, a 256 px icon, a 3:2 photo, a 192x320 crop (4912 patches; the largest "
                 "grid is 32x32, so padding every image to it makes 8192)"),
    ]
}
