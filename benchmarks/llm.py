"""What fewer visual tokens buy on the LLM side: the forward time of a few Llama decoder
layers (transformers, random weights) over a projector's image tokens plus text tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class LLMConfig:
    dim: int
    layers: int
    text_tokens: int = 64

    @property
    def describe(self) -> str:
        return (f"{self.layers} Llama decoder layers, D={self.dim}, heads={self.dim // 128}, "
                f"random weights, + {self.text_tokens} text tokens")


# Llama-2-7B's width on a GPU; a quarter of it on a CPU, where a 7B layer would dominate
DEFAULT_LLM = {"cuda": LLMConfig(dim=4096, layers=4), "cpu": LLMConfig(dim=1024, layers=2)}


def llm_forward(llm: LLMConfig, batch: int, image_tokens: int, dtype: torch.dtype,
                device: torch.device) -> Callable[[], torch.Tensor]:
    """A function running the decoder layers once over [batch, image_tokens + text, D]."""
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(hidden_size=llm.dim, intermediate_size=int(llm.dim * 11008 / 4096),
                      num_hidden_layers=llm.layers, num_attention_heads=llm.dim // 128,
                      num_key_value_heads=llm.dim // 128, vocab_size=256,
                      max_position_embeddings=8192)
    model = LlamaModel(cfg).to(device=device, dtype=dtype).eval()
    x = torch.randn(batch, image_tokens + llm.text_tokens, llm.dim, device=device, dtype=dtype)

    def run():
        with torch.no_grad():
            return model(inputs_embeds=x).last_hidden_state

    return run


def transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True
