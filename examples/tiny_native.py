"""Small native-resolution multimodal models with random weights, built offline (no model
hub): Mistral 3 (Pixtral tower, patch merger), LLaVA with a Pixtral tower, and Qwen2-VL, each
with a word-level tokenizer made in memory and the model's own processor. Every image keeps
its own size: the towers pack the patch tokens of all images of a batch into one sequence.
Used by the tests."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
import transformers
from transformers import (BatchFeature, LlavaConfig, LlavaForConditionalGeneration,
                          MistralConfig, Mistral3Config, Mistral3ForConditionalGeneration,
                          PixtralVisionConfig, PreTrainedTokenizerFast, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration)
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

from .tiny_llava import _image_processor

WORDS = ["<pad>", "<unk>", "<s>", "</s>", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "<|image_pad|>",
         "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "USER:", "ASSISTANT:", "what",
         "is", "in", "this", "picture", "a", "the", "photo", "of", "an", "astronaut", "flag",
         "space", "suit", "and", "person", "smiling"]
SPECIAL = WORDS[:11]
PIXTRAL_IMAGE_TOKEN_ID = WORDS.index("[IMG]")
QWEN_IMAGE_TOKEN_ID = WORDS.index("<|image_pad|>")
QWEN_VIDEO_TOKEN_ID = WORDS.index("<|video_pad|>")
QWEN_VISION_START_ID = WORDS.index("<|vision_start|>")

PIXTRAL_PROMPT = "USER: [IMG] what is in this picture ASSISTANT:"
QWEN_PROMPT = "USER: <|vision_start|><|image_pad|><|vision_end|> what is in this picture ASSISTANT:"


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def text_config(hidden: int = 64, layers: int = 2) -> MistralConfig:
    return MistralConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                         head_dim=hidden // 2, vocab_size=len(WORDS), pad_token_id=0,
                         bos_token_id=2, eos_token_id=3)


def pixtral_config(patch_size: int = 4, hidden: int = 32, layers: int = 4,
                   image_size: int = 64) -> PixtralVisionConfig:
    """A Pixtral tower: no CLS token, 2D rotary positions, images up to ``image_size`` pixels
    on their longest edge, each at its own size."""
    return PixtralVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                               num_hidden_layers=layers, num_attention_heads=2,
                               head_dim=hidden // 2, image_size=image_size, patch_size=patch_size)


class PixtralInputs:
    """What ``PixtralProcessor`` makes of images and prompts, for machines without torchvision
    (which that processor needs): the image processor resizes each image to fit
    ``image_size`` in multiples of ``patch_size * spatial_merge_size`` pixels, and every
    ``[IMG]`` in a prompt becomes the image's rows of ``[IMG]`` tokens, each row closed by
    ``[IMG_BREAK]``, the last by ``[IMG_END]``. ``processor()`` returns the real processor
    where torchvision is installed."""

    def __init__(self, vision: PixtralVisionConfig, spatial_merge_size: int):
        self.vision = vision
        self.patch_size = vision.patch_size
        self.spatial_merge_size = spatial_merge_size
        self.tokenizer = build_tokenizer()
        self.image_processor = _image_processor("PixtralImageProcessor")(
            size={"longest_edge": vision.image_size},
            patch_size={"height": vision.patch_size, "width": vision.patch_size})

    def __call__(self, images, text, return_tensors="pt", padding=True):
        step = self.patch_size * self.spatial_merge_size
        pixels = self.image_processor(images, patch_size={"height": step, "width": step},
                                      return_tensors="pt")
        sizes = iter(pixels["image_sizes"].tolist())
        prompts = []
        for prompt in ([text] if isinstance(text, str) else text):
            pieces = prompt.split("[IMG]")
            for i in range(1, len(pieces)):
                h, w = next(sizes)
                rows = [["[IMG]"] * (w // step) + ["[IMG_BREAK]"] for _ in range(h // step)]
                tokens = [t for row in rows for t in row]
                tokens[-1] = "[IMG_END]"
                pieces[i] = " ".join(tokens) + pieces[i]
            prompts.append("".join(pieces))
        tokens = self.tokenizer(prompts, return_tensors=return_tensors, padding=padding)
        return BatchFeature({**tokens, **pixels})

    def processor(self):
        from transformers.models.pixtral.processing_pixtral import PixtralProcessor
        return PixtralProcessor(image_processor=self.image_processor, tokenizer=self.tokenizer,
                                patch_size=self.patch_size,
                                spatial_merge_size=self.spatial_merge_size)


def build_mistral3(vision=None, seed: int = 0):
    """(model, processor) for Mistral 3: a Pixtral tower, its RMSNorm + 2x2 patch merger +
    MLP projector; the processor counts (H/2) x (W/2) image tokens per image."""
    vision = vision or pixtral_config()
    config = Mistral3Config(vision_config=vision, text_config=text_config(),
                            image_token_index=PIXTRAL_IMAGE_TOKEN_ID, vision_feature_layer=-1,
                            spatial_merge_size=2)
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(config).eval()
    return model, PixtralInputs(vision, spatial_merge_size=2)


def build_llava_pixtral(vision=None, seed: int = 0):
    """(model, processor) for LLaVA with a Pixtral tower (as Pixtral-12B is published): every
    patch token reaches the projector, H x W image tokens per image."""
    vision = vision or pixtral_config()
    config = LlavaConfig(vision_config=vision, text_config=text_config(),
                         image_token_id=PIXTRAL_IMAGE_TOKEN_ID, vision_feature_layer=-1,
                         vision_feature_select_strategy="full")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    return model, PixtralInputs(vision, spatial_merge_size=1)


def build_qwen2_vl(depth: int = 4, embed_dim: int = 32, patch_size: int = 4, seed: int = 0):
    """(model, processor) for Qwen2-VL: patches in its 2x2-merge order, one grid (t, h, w) per
    image or video, a LayerNorm + MLP patch merger."""
    hidden = 64
    config = Qwen2VLConfig(
        vision_config=dict(depth=depth, embed_dim=embed_dim, hidden_size=hidden, num_heads=2,
                           mlp_ratio=2, patch_size=patch_size, spatial_merge_size=2,
                           temporal_patch_size=2, in_channels=3),
        text_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=len(WORDS),
                         rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
                         pad_token_id=0, bos_token_id=2, eos_token_id=3),
        image_token_id=QWEN_IMAGE_TOKEN_ID, video_token_id=QWEN_VIDEO_TOKEN_ID,
        vision_start_token_id=QWEN_VISION_START_ID)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    return model, QwenInputs(patch_size)


class QwenInputs:
    """What ``Qwen2VLProcessor`` makes of images and prompts, for machines without torchvision
    (which that processor needs): the image processor resizes each image to multiples of
    ``2 * patch_size`` pixels and flattens its patches in the 2x2-merge order, one grid
    (t, h, w) per image, and every ``<|image_pad|>`` in a prompt becomes t*h*w/4 of them.
    ``processor()`` returns the real processor where torchvision is installed."""

    def __init__(self, patch_size: int):
        self.tokenizer = build_tokenizer()
        self.image_processor = _image_processor("Qwen2VLImageProcessor")(
            patch_size=patch_size, merge_size=2, temporal_patch_size=2,
            min_pixels=(4 * patch_size) ** 2, max_pixels=(16 * patch_size) ** 2)

    def __call__(self, images, text, return_tensors="pt", padding=True):
        pixels = self.image_processor(images, return_tensors="pt")
        counts = iter((pixels["image_grid_thw"].prod(-1) // 4).tolist())
        prompts = []
        for prompt in ([text] if isinstance(text, str) else text):
            pieces = prompt.split("<|image_pad|>")
            for i in range(1, len(pieces)):
                pieces[i] = "<|image_pad|>" * next(counts) + pieces[i]
            prompts.append("".join(pieces))
        tokens = self.tokenizer(prompts, return_tensors=return_tensors, padding=padding)
        # the modality of each token, for the multimodal rotary positions: 1 for image tokens
        tokens["mm_token_type_ids"] = (tokens["input_ids"] == QWEN_IMAGE_TOKEN_ID).long()
        return BatchFeature({**tokens, **pixels})

    def processor(self):
        return Qwen2VLProcessor(image_processor=self.image_processor, tokenizer=self.tokenizer)
