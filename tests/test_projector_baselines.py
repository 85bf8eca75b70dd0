"""The baseline projectors of the benchmarks match their papers/repositories for the
llava15-7b configuration (CLIP ViT-L/14-336: 24x24 patches of C=1024, LLM D=4096): trainable
parameter counts worked out from the upstream code (see benchmarks/projectors.py) and the
number of tokens each hands the LLM."""

import pytest
import torch

from benchmarks import projectors as P

C, D, GRID = 1024, 4096, 24

EXPECTED = {
    # name: (trainable parameters, output tokens)
    "mlp2x_gelu": (20_979_712, 576),      # C*D + D + D*D + D
    "resampler-256": (89_169_920, 256),   # queries 256*D, kv_proj C*D, MHA 4*D*D + 4*D,
    "resampler-144": (88_711_168, 144),   #   3 LayerNorms 6*D, proj D*D (no bias)
    "c-abstractor": (37_398_016, 144),    # pos_emb 576*C, 6 RegNet bottlenecks, C->D->D MLP
    "ldpv2": (21_020_672, 144),           # mlp2x_gelu + depthwise 3x3 PEG (9*D + D)
    "pixel-shuffle": (33_570_816, 144),   # LN(4C) + 4C*D + D + D*D + D
    "patch-merger": (33_564_672, 144),    # LN(C) + 4C*4C + 4C + 4C*D + D
    "saep-eager": (33_603_584, 144),      # dwconv 4C*9 + 4C, 4C*D + D + D*D + D
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_parameters_and_output_tokens(name):
    torch.manual_seed(0)
    module = P.build(name, C, D, GRID, GRID, num_layers=4)
    params, tokens = EXPECTED[name]
    assert P.trainable_params(module) == params
    with torch.no_grad():
        if name.startswith("saep"):
            out = module([torch.randn(1, 1 + GRID * GRID, C) for _ in range(4)],
                         num_prefix_tokens=1)
        else:
            out = module(torch.randn(1, GRID * GRID, C), grid=(GRID, GRID))
    assert out.shape == (1, tokens, D)


def test_internvl_pixel_shuffle_channel_order():
    # InternVL's view/permute sequence on [N, W, H, C]: the 2x2 block of output (i, j) holds
    # input rows 2i, 2i+1 and columns 2j, 2j+1, in the order its reshapes produce
    x = torch.arange(4 * 4 * 2, dtype=torch.float32).reshape(1, 4, 4, 2)
    y = P.internvl_pixel_shuffle(x)
    assert y.shape == (1, 2, 2, 8)
    # block (0, 0): first all channels of x[0, 0, 0:2] then x[0, 1, 0:2] (the h pair varies
    # inside the w pair), as InternVL lays it out
    assert y[0, 0, 0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11]


def test_unsupported_grids_are_reported():
    assert P.supports("pixel-shuffle", 27, 27) == "needs an even grid"
    assert P.supports("patch-merger", 27, 27) == "needs an even grid"
    assert P.supports("c-abstractor", 24, 12) == "needs a square grid"
    assert P.supports("saep-eager", 27, 27) is None
