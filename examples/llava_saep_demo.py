"""LLaVA -> SAEP in one call, end to end on one real image, offline.

Builds a small LLaVA-1.5 with random weights (a CLIP ViT tower at 336 px / patch 14, so the
24x24 patch grid of the real model, but narrow; a small Llama), runs the shipped image
through the processor and ``generate()``, converts the model with ``apply_saep`` and does it
again, printing the image-token counts (576 -> 144) and the time of each part.

    python examples/llava_saep_demo.py [--image PATH] [--layers -2 -5 -8 -11]

The weights are random, so the generated words are noise: the point is the plumbing and the
token counts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples import tiny_llava  # noqa: E402
from saep_kernels.backends import resolve_backend  # noqa: E402
from saep_kernels.integrations.transformers import apply_saep, image_features  # noqa: E402

PROMPT = "USER: <image> what is in this picture ASSISTANT:"


def timed(fn, repeats=3):
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return out, (time.perf_counter() - start) / repeats * 1e3


def report(title, model, processor, img):
    inputs = processor(images=img, text=PROMPT, return_tensors="pt")
    n_image = int((inputs["input_ids"] == tiny_llava.IMAGE_TOKEN_ID).sum())
    inner = model.model
    pixels = inputs["pixel_values"]
    with torch.no_grad():
        tower = lambda: inner.vision_tower(pixels, output_hidden_states=True)  # noqa: E731
        hidden, t_tower = timed(tower)
        if hasattr(inner.multi_modal_projector, "dwconv"):
            layers = [hidden.hidden_states[i] for i in model.config.vision_feature_layer]
            project = lambda: inner.multi_modal_projector(layers, num_prefix_tokens=1)  # noqa: E731
        else:
            patches = hidden.hidden_states[model.config.vision_feature_layer][:, 1:]
            project = lambda: inner.multi_modal_projector(patches)  # noqa: E731
        feats, t_proj = timed(project)
        _, t_forward = timed(lambda: model(**inputs))
        generated, t_generate = timed(
            lambda: model.generate(**inputs, max_new_tokens=8, do_sample=False), repeats=1)
    text = processor.tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:])
    print(f"\n== {title}")
    print(f"image tokens in the prompt : {n_image}  (projector output {tuple(feats.shape)})")
    print(f"prompt length              : {inputs['input_ids'].shape[1]} tokens")
    print(f"vision tower               : {t_tower:8.2f} ms")
    print(f"projector                  : {t_proj:8.2f} ms  ({type(inner.multi_modal_projector).__name__})")
    print(f"full forward (prefill)     : {t_forward:8.2f} ms")
    print(f"generate, 8 new tokens     : {t_generate:8.2f} ms")
    print(f"generated (random weights) : {text!r}")
    return n_image


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path,
                        default=Path(__file__).parent / "assets" / "astronaut.png")
    parser.add_argument("--layers", type=int, nargs="+", default=[-2, -5, -8, -11])
    args = parser.parse_args(argv)

    torch.set_grad_enabled(False)
    img = Image.open(args.image).convert("RGB")
    vision = tiny_llava.clip_config(image_size=336, patch_size=14, hidden=64, layers=12)
    model, processor = tiny_llava.build_llava(vision, tiny_llava.text_config(hidden=256, layers=4))
    print(f"image {args.image.name} {img.size[0]}x{img.size[1]}; tower: CLIP ViT, 336 px, "
          f"patch 14 ({vision.image_size // vision.patch_size}x"
          f"{vision.image_size // vision.patch_size} grid + CLS), width {vision.hidden_size}")

    before = report("LLaVA-1.5 (mlp2x_gelu projector, layer -2)", model, processor, img)
    apply_saep(model, layers=args.layers, processor=processor)
    backend = resolve_backend(model.model.multi_modal_projector.backend, torch.device("cpu"))
    after = report(f"SAEP (layers {args.layers}, backend {backend!r})", model, processor, img)
    feats = image_features(model, processor(images=img, text=PROMPT,
                                            return_tensors="pt")["pixel_values"])
    print(f"\nimage tokens: {before} -> {after} ({after / before:.0%}); "
          f"SAEP features {tuple(feats.shape)}")


if __name__ == "__main__":
    main()
