"""The reference configurations (docs/op.md section 3)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    name: str
    tower: str
    height: int
    width: int
    channels: int
    prefix: int
    layers: int
    llm_dim: int
    crops: int = 1  # images are split into this many crops, each a batch entry

    @property
    def tokens(self) -> int:
        return self.prefix + self.height * self.width

    @property
    def out_tokens(self) -> int:
        return ((self.height + 1) // 2) * ((self.width + 1) // 2)


CONFIGS = {
    c.name: c
    for c in [
        Config("llava15-7b", "CLIP ViT-L/14-336", 24, 24, 1024, 1, 4, 4096),
        Config("llava15-13b", "CLIP ViT-L/14-336", 24, 24, 1024, 1, 4, 5120),
        Config("siglip-so400m", "SigLIP so400m/14-384", 27, 27, 1152, 0, 4, 4096),
        Config("anyres-5crop", "CLIP ViT-L/14-336, 5 crops", 24, 24, 1024, 1, 4, 4096, crops=5),
    ]
}
