"""SAEP inside the real LLaVA codebase (``llava-torch`` 1.2.2.post1 with the transformers it
pins), through ``patch_llava()``.

Run by tests/test_llava_codebase.py with ``PYTHONPATH`` on the environment ``make llava-site``
installs (LLaVA and transformers 4.36 ahead of this machine's transformers); also runnable by
hand: ``PYTHONPATH=build/llava-site python tests/llava_codebase_check.py`` (``--edited`` on a
copy of LLaVA edited as the README shows, instead of ``patch_llava()``). Tiny random
models built offline: a CLIP tower of 70 px / patch 14 (a 5x5 grid, pooled to 3x3: the odd
side), a two-layer Llama. Exits non-zero on the first failed check.
"""

from __future__ import annotations

import sys
import tempfile
from types import SimpleNamespace

import numpy as np
import torch
import transformers
from PIL import Image

from saep_kernels import SAEPProjector
from saep_kernels.integrations.llava import (MultiLayerVisionTower, VisionFeatures,
                                             build_vision_projector, patch_llava)

# --edited: LLaVA's builder files and train.py carry the README's edit instead of the patch.
if "--edited" not in sys.argv:
    patch_llava()
# from_pretrained lists the tower's weights as unused: LLaVA loads the tower itself
# (load_model), with SAEP as without.
transformers.logging.set_verbosity_error()

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402
from llava.mm_utils import process_images  # noqa: E402
from llava.model import LlavaConfig, LlavaLlamaForCausalLM  # noqa: E402
from llava.model.llava_arch import unpad_image  # noqa: E402
from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower  # noqa: E402
from llava.train.train import ModelArguments  # noqa: E402

IMAGE, PATCH, WIDTH, DEPTH = 70, 14, 32, 4
LAYERS = (-2, -3, -4)
SIDE = (IMAGE // PATCH + 1) // 2  # the pooled grid: 5 -> 3
PINPOINTS = [[IMAGE, 2 * IMAGE], [2 * IMAGE, IMAGE], [2 * IMAGE, 2 * IMAGE]]
IMAGE_SIZES = [(130, 60), (60, 150), (70, 70)]  # (width, height), as PIL reports them
TEXT = [[1, 5, 6, IMAGE_TOKEN_INDEX, 7, 8, 9], [1, IMAGE_TOKEN_INDEX, 10, 11],
        [1, 12, IMAGE_TOKEN_INDEX, 13, 14, 15, 16, 17]]


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"FAILED: {what}")
    print(f"ok: {what}")


def save_tower(path: str) -> None:
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(image_size=IMAGE, patch_size=PATCH, hidden_size=WIDTH,
                                           intermediate_size=2 * WIDTH, num_hidden_layers=DEPTH,
                                           num_attention_heads=2)
    transformers.CLIPVisionModel(config).save_pretrained(path)
    transformers.CLIPImageProcessor(size={"shortest_edge": IMAGE},
                                    crop_size={"height": IMAGE, "width": IMAGE}).save_pretrained(path)


def command_line(tower: str, merge: str) -> ModelArguments:
    """LLaVA's own argument parsing of a train.py command line."""
    parser = transformers.HfArgumentParser(ModelArguments)
    (args,) = parser.parse_args_into_dataclasses(args=[
        f"--vision_tower={tower}", "--mm_projector_type", "saep",
        "--mm_vision_select_layer=-2,-3,-4", "--mm_patch_merge_type", merge])
    return args


def build_model(tower: str, merge: str) -> LlavaLlamaForCausalLM:
    """As llava/train/train.py does: an LLM, then initialize_vision_modules(model_args)."""
    torch.manual_seed(0)
    config = LlavaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=32,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlavaLlamaForCausalLM(config)
    model.get_model().initialize_vision_modules(model_args=command_line(tower, merge))
    model.config.image_aspect_ratio = "anyres"
    model.config.image_grid_pinpoints = PINPOINTS
    return model.eval()


def images_and_sizes(model):
    rng = np.random.default_rng(0)
    pil = [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for w, h in IMAGE_SIZES]
    processor = model.get_vision_tower().image_processor
    return process_images(pil, processor, model.config), [im.size for im in pil]


def expected_image_tokens(merge: str, tiles: int, size) -> int:
    """What LLaVA's prepare_inputs_labels_for_multimodal gives an image of `tiles` crops
    (the base image first) on SAEP's pooled grid."""
    if merge == "flat":
        return tiles * SIDE * SIDE
    from llava.mm_utils import get_anyres_image_grid_shape
    cols, rows = get_anyres_image_grid_shape(size, PINPOINTS, IMAGE)
    unpadded = unpad_image(torch.zeros(1, rows * SIDE, cols * SIDE), size)
    return SIDE * SIDE + unpadded.shape[1] * (unpadded.shape[2] + 1)


def batch():
    width = max(len(t) for t in TEXT)
    ids = torch.zeros(len(TEXT), width, dtype=torch.long)
    mask = torch.zeros(len(TEXT), width, dtype=torch.bool)
    for i, t in enumerate(TEXT):
        ids[i, :len(t)] = torch.tensor(t)
        mask[i, :len(t)] = True
    labels = torch.where(mask & (ids >= 0), ids, torch.full_like(ids, IGNORE_INDEX))
    return ids, mask, labels


def run(tower_path: str, merge: str, tmp: str) -> None:
    print(f"--- mm_patch_merge_type={merge!r}")
    model = build_model(tower_path, merge)
    tower, projector = model.get_vision_tower(), model.get_model().mm_projector
    check(isinstance(tower, MultiLayerVisionTower) and tower.select_layer == LAYERS,
          f"train.py arguments build MultiLayerVisionTower with layers {LAYERS}")
    check(isinstance(projector, SAEPProjector) and projector.num_layers == len(LAYERS),
          "mm_projector_type='saep' builds the SAEP projector")
    check(tower.num_patches_per_side == SIDE and tower.num_patches == SIDE * SIDE,
          f"num_patches_per_side {tower.num_patches_per_side} = pooled side of the 5x5 grid")
    check(model.config.mm_hidden_size == WIDTH, "mm_hidden_size is one layer's width")

    images, sizes = images_and_sizes(model)
    tiles = [x.shape[0] for x in images]
    check(all(t > 1 for t in tiles), f"anyres crops per image (base included): {tiles}")

    # The projector sees the layers the config names, CLS skipped, and computes SAEP.
    crops = torch.cat(list(images)) if isinstance(images, list) else images.flatten(0, 1)
    with torch.no_grad():
        got = model.encode_images(crops)
        hidden = tower.vision_tower(crops, output_hidden_states=True).hidden_states
        reference = SAEPProjector(WIDTH, len(LAYERS), 64, backend="reference")
        reference.load_state_dict(projector.state_dict())
        want = reference([hidden[i] for i in LAYERS], num_prefix_tokens=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    check(got.shape == (crops.shape[0], SIDE * SIDE, 64),
          f"encode_images {tuple(got.shape)} equals the reference SAEP on layers {LAYERS}")

    ids, mask, labels = batch()
    _, _, new_mask, _, embeds, new_labels = model.prepare_inputs_labels_for_multimodal(
        ids, None, mask, None, labels, images, image_sizes=sizes)
    lengths = new_mask.sum(1).tolist()
    want_lengths = [len(t) - 1 + expected_image_tokens(merge, n, s)
                    for t, n, s in zip(TEXT, tiles, sizes)]
    check(lengths == want_lengths,
          f"prepare_inputs_labels_for_multimodal: sequence lengths {lengths}")

    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, images=images,
                image_sizes=sizes)
    check(bool(torch.isfinite(out.loss)), f"forward with labels: loss {out.loss.item():.4f}")
    out.loss.backward()
    grads = {n: p.grad for n, p in projector.named_parameters()}
    check(all(g is not None and g.abs().sum() > 0 for g in grads.values()),
          f"backward: gradients for {sorted(grads)}")
    check(all(p.grad is None for p in tower.parameters()), "the frozen tower gets no gradient")
    model.eval()

    with torch.no_grad():
        generated = model.generate(ids[:1, :len(TEXT[0])], images=images[:1],
                                   image_sizes=sizes[:1], max_new_tokens=4, do_sample=False,
                                   min_new_tokens=4, pad_token_id=0)
    # transformers 4.36 starts a sequence generated from embeddings with a BOS of its own
    check(generated.shape[0] == 1 and generated.shape[1] - int(generated[0, 0] == 1) == 4,
          f"generate, 4 new tokens: {generated.tolist()}")

    # Saved and loaded as load_pretrained_model does: __init__ from the saved config (string
    # layers, delay-loaded tower), then load_model().
    path = f"{tmp}/llava-saep-{merge}"
    model.save_pretrained(path)
    loaded = LlavaLlamaForCausalLM.from_pretrained(path).eval()
    loaded_tower = loaded.get_vision_tower()
    check(not loaded_tower.is_loaded and loaded_tower.num_patches_per_side == SIDE,
          "from_pretrained builds the tower delay-loaded, pooled grid known from the config")
    loaded_tower.load_model()
    a, b = model.state_dict(), loaded.state_dict()
    check(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
          "save/from_pretrained: every weight bitwise equal")
    with torch.no_grad():
        same = torch.equal(model(input_ids=ids, attention_mask=mask, images=images,
                                 image_sizes=sizes).logits,
                           loaded(input_ids=ids, attention_mask=mask, images=images,
                                  image_sizes=sizes).logits)
    check(same, "the loaded model's logits are identical")


def stock_tower(tower_path: str) -> None:
    """LLaVA's own CLIPVisionTower (one int layer, one tensor out) with the SAEP builder."""
    print("--- LLaVA's CLIPVisionTower with mm_projector_type='saep'")
    args = SimpleNamespace(mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                           mm_projector_type="saep")
    stock = CLIPVisionTower(tower_path, args=args)
    ours = MultiLayerVisionTower(tower_path, args=args)
    config = SimpleNamespace(mm_projector_type="saep", mm_hidden_size=WIDTH, hidden_size=64,
                             mm_vision_select_layer=-2)
    torch.manual_seed(0)
    projector = build_vision_projector(config)
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        from_tensor = projector(stock(pixels))
        from_features = projector(ours(pixels))
    check(isinstance(ours(pixels), VisionFeatures) and torch.equal(from_tensor, from_features),
          f"one tensor from CLIPVisionTower {tuple(stock(pixels).shape)} gives the same "
          f"tokens {tuple(from_tensor.shape)}")


def main() -> int:
    how = "edited builder files" if "--edited" in sys.argv else "patch_llava()"
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {how}")
    with tempfile.TemporaryDirectory() as tmp:
        tower_path = f"{tmp}/clip-tiny"
        save_tower(tower_path)
        for merge in ("flat", "spatial_unpad"):
            run(tower_path, merge, tmp)
        stock_tower(tower_path)
    print("all LLaVA-codebase checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
