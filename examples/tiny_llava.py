"""Small LLaVA models with random weights, built offline (no model hub): a word-level
tokenizer made in memory, a CLIP or SigLIP tower, a Llama language model, the matching
processor. Used by the example and by the tests."""

from __future__ import annotations

from typing import Sequence

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
import transformers
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaNextConfig,
                          LlavaNextForConditionalGeneration, LlavaNextProcessor, LlavaProcessor,
                          PreTrainedTokenizerFast, SiglipVisionConfig)


def _image_processor(name: str):
    """transformers' PIL image processor when torchvision is missing (no fallback warning)."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return getattr(transformers, name + "Pil", getattr(transformers, name))
    return getattr(transformers, name)


WORDS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:", "what", "is", "in",
         "this", "picture", "a", "the", "photo", "of", "an", "astronaut", "flag", "space",
         "suit", "and", "person", "smiling"]
IMAGE_TOKEN_ID = WORDS.index("<image>")


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<image>", "<s>", "</s>", "<pad>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def text_config(hidden: int = 64, layers: int = 2) -> LlamaConfig:
    return LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=max(hidden // 32, 1),
                       num_key_value_heads=max(hidden // 32, 1), vocab_size=len(WORDS),
                       pad_token_id=0, bos_token_id=2, eos_token_id=3)


def clip_config(image_size: int = 56, patch_size: int = 14, hidden: int = 32,
                layers: int = 4) -> CLIPVisionConfig:
    return CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=hidden,
                            intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=max(hidden // 16, 1))


def siglip_config(image_size: int = 54, patch_size: int = 2, hidden: int = 16,
                  layers: int = 3) -> SiglipVisionConfig:
    return SiglipVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=hidden,
                              intermediate_size=2 * hidden, num_hidden_layers=layers,
                              num_attention_heads=max(hidden // 8, 1))


def build_llava(vision=None, text=None, layer: int = -2, seed: int = 0):
    """(model, processor) for LLaVA-1.5: CLIP tower (CLS dropped, strategy 'default') or SigLIP
    (no CLS, 'full')."""
    vision = vision or clip_config()
    siglip = isinstance(vision, SiglipVisionConfig)
    strategy = "full" if siglip else "default"
    config = LlavaConfig(vision_config=vision, text_config=text or text_config(),
                         image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=layer,
                         vision_feature_select_strategy=strategy)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    size = vision.image_size
    if siglip:
        image_processor = _image_processor("SiglipImageProcessor")(size={"height": size, "width": size})
    else:
        image_processor = _image_processor("CLIPImageProcessor")(size={"shortest_edge": size},
                                             crop_size={"height": size, "width": size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(),
                               patch_size=vision.patch_size, vision_feature_select_strategy=strategy,
                               num_additional_image_tokens=0 if siglip else 1,
                               image_token="<image>")
    return model, processor


def build_llava_next(vision=None, pinpoints: Sequence[Sequence[int]] = None, seed: int = 0):
    """(model, processor) for LLaVA-NeXT with anyres crops."""
    vision = vision or clip_config()
    s = vision.image_size
    pinpoints = [list(p) for p in (pinpoints or [[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]])]
    config = LlavaNextConfig(vision_config=vision, text_config=text_config(),
                             image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=-2,
                             vision_feature_select_strategy="default",
                             image_grid_pinpoints=pinpoints)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    image_processor = _image_processor("LlavaNextImageProcessor")(size={"shortest_edge": s},
                                              crop_size={"height": s, "width": s},
                                              image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=build_tokenizer(),
                                   patch_size=vision.patch_size,
                                   vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1, image_token="<image>")
    return model, processor
