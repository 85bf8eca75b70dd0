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

__all__ = ["Config", "REFERENCE_CONFIGS", "REFERENCE_BATCHES"]


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
