"""Vision-language projectors users pick today, written from their papers and reference code,
for side-by-side timing with SAEP. Each takes the vision tower's patch tokens [B, H*W, C]
(CLS already dropped; SAEP takes its K layers) and returns LLM tokens [B, N, D].

Hyperparameters follow the source named in each docstring (read from the public code). Parameter counts for C=1024, D=4096 are pinned in
tests/test_projector_baselines.py.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from saep_kernels import SAEPProjector

# ------------------------------------------------------------------------------ LLaVA-1.5


class MLP2xGELU(nn.Module):
    """LLaVA-1.5 ``mlp2x_gelu`` (haotian-liu/LLaVA, multimodal_projector/builder.py):
    Linear(C, D), GELU, Linear(D, D) on every patch token. 576 tokens for CLIP-L/14-336."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(),
                                  nn.Linear(llm_dim, llm_dim))

    def forward(self, x: torch.Tensor, grid=None) -> torch.Tensor:
        return self.proj(x)


# ------------------------------------------------------------------------------ Qwen-VL


def sincos_2d(embed_dim: int, grid: int) -> np.ndarray:
    """2D sin-cos position embedding [grid*grid, embed_dim] (MAE style, as Qwen-VL uses): half
    the channels encode the row, half the column, each as sin/cos of geometric frequencies."""

    def one_axis(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.arange(grid, dtype=np.float32)
    w, h = np.meshgrid(g, g)  # w varies along columns
    return np.concatenate([one_axis(embed_dim // 2, h), one_axis(embed_dim // 2, w)], axis=1)


class QwenVLResampler(nn.Module):
    """Qwen-VL's vision-to-LLM resampler (Qwen/Qwen-VL ``visual.py``: ``Resampler`` plus the
    ``ln_post`` and ``proj`` of ``VisionTransformer``): learnable queries (256 in Qwen-VL, 144
    here as an option), keys from Linear(C, D, no bias) + LayerNorm, one
    ``nn.MultiheadAttention(D, D // 128 heads)`` with fixed 2D sin-cos positions on queries and
    keys (the query grid's table resized bicubically to the key grid), then LayerNorm and a DxD
    projection (no bias). No FFN."""

    def __init__(self, vision_dim: int, llm_dim: int, num_queries: int = 256):
        super().__init__()
        side = math.isqrt(num_queries)
        if side * side != num_queries:
            raise ValueError(f"num_queries must be a square, got {num_queries}")
        self.side = side
        self.register_buffer("pos_embed", torch.from_numpy(sincos_2d(llm_dim, side)).float(),
                             persistent=False)
        self.query = nn.Parameter(torch.zeros(num_queries, llm_dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.kv_proj = nn.Linear(vision_dim, llm_dim, bias=False)
        self.attn = nn.MultiheadAttention(llm_dim, llm_dim // 128, batch_first=True)
        self.ln_q = nn.LayerNorm(llm_dim)
        self.ln_kv = nn.LayerNorm(llm_dim)
        self.ln_post = nn.LayerNorm(llm_dim)
        self.proj = nn.Parameter(llm_dim ** -0.5 * torch.randn(llm_dim, llm_dim))

    def _key_pos(self, tokens: int, grid) -> torch.Tensor:
        h, w = grid
        if h * w != tokens:
            raise ValueError(f"grid {grid} does not hold {tokens} tokens")
        table = self.pos_embed.reshape(1, self.side, self.side, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(table.float(), size=(h, w), mode="bicubic", align_corners=False)
        return resized.permute(0, 2, 3, 1).reshape(h * w, -1)

    def forward(self, x: torch.Tensor, grid=None) -> torch.Tensor:
        grid = grid or (math.isqrt(x.shape[1]),) * 2
        kv = self.ln_kv(self.kv_proj(x))
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        pos_k = self._key_pos(x.shape[1], grid).to(kv.dtype)
        out = self.attn(q + self.pos_embed.to(q.dtype), kv + pos_k, kv, need_weights=False)[0]
        return self.ln_post(out) @ self.proj


# ------------------------------------------------------------------------------ Honeybee


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of [B, C, H, W] (timm's LayerNorm2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class ConvNormAct(nn.Sequential):
    def __init__(self, cin, cout, k, groups=1, act=True):
        super().__init__(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
                         LayerNorm2d(cout, eps=1e-6), nn.SiLU() if act else nn.Identity())


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        s = self.fc2(F.silu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class RegBottleneck(nn.Module):
    """timm RegNet ``Bottleneck`` as Honeybee configures it: 1x1 conv-LN-SiLU, depthwise
    3x3-LN-SiLU (group size 1), squeeze-excite (0.25 of the input channels), 1x1 conv-LN,
    identity shortcut, SiLU. No conv biases, LayerNorm eps 1e-6."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = ConvNormAct(channels, channels, 1)
        self.conv2 = ConvNormAct(channels, channels, 3, groups=channels)
        self.se = SqueezeExcite(channels, int(round(channels * 0.25)))
        self.conv3 = ConvNormAct(channels, channels, 1, act=False)

    def forward(self, x):
        return F.silu(self.conv3(self.se(self.conv2(self.conv1(x)))) + x)


class CAbstractor(nn.Module):
    """Honeybee's C-Abstractor (kakaobrain/honeybee ``projectors.py``, ``CAbstractor`` with
    depth 3, mlp_depth 2, hidden size C): a learnable position embedding on the input tokens,
    RegStage of 3 bottlenecks, AdaptiveAvgPool2d to the query grid (12x12 = 144), another
    RegStage of 3, then Linear(C, D), SiLU, Linear(D, D). Square grids only (as upstream)."""

    def __init__(self, vision_dim: int, llm_dim: int, num_input_tokens: int = 576,
                 num_queries: int = 144, depth: int = 3):
        super().__init__()
        self.hw = math.isqrt(num_queries)
        self.pos_emb = nn.Parameter(torch.zeros(1, num_input_tokens, vision_dim))
        nn.init.trunc_normal_(self.pos_emb, std=0.02)
        self.s1 = nn.Sequential(*[RegBottleneck(vision_dim) for _ in range(depth)])
        self.s2 = nn.Sequential(*[RegBottleneck(vision_dim) for _ in range(depth)])
        self.readout = nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.SiLU(),
                                     nn.Linear(llm_dim, llm_dim))

    def forward(self, x: torch.Tensor, grid=None) -> torch.Tensor:
        b, n, c = x.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError("C-Abstractor needs a square grid")
        x = (x + self.pos_emb).transpose(1, 2).reshape(b, c, side, side)
        x = self.s2(F.adaptive_avg_pool2d(self.s1(x), (self.hw, self.hw)))
        return self.readout(x.flatten(2).transpose(1, 2))


# ------------------------------------------------------------------------------ MobileVLM


class LDPv2(nn.Module):
    """MobileVLM V2's LDPv2 (Meituan-AutoML/MobileVLM ``vision_projector.py``,
    ``LDPNetV2Projector``): Linear(C, D), GELU, Linear(D, D); AdaptiveAvgPool2d to 12x12;
    positional encoding = depthwise 3x3 conv (with bias) + residual."""

    def __init__(self, vision_dim: int, llm_dim: int, out_grid: int = 12):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(),
                                 nn.Linear(llm_dim, llm_dim))
        self.out_grid = out_grid
        self.peg = nn.Conv2d(llm_dim, llm_dim, 3, padding=1, groups=llm_dim)

    def forward(self, x: torch.Tensor, grid=None) -> torch.Tensor:
        b, n, _ = x.shape
        h, w = grid or (math.isqrt(n),) * 2
        x = self.mlp(x).transpose(1, 2).reshape(b, -1, h, w)
        x = F.adaptive_avg_pool2d(x, (self.out_grid, self.out_grid))
        x = x + self.peg(x)
        return x.flatten(2).transpose(1, 2)


# ------------------------------------------------------------------------------ InternVL


def internvl_pixel_shuffle(x: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """InternVL's ``pixel_shuffle`` (ps_version v2) on [N, W, H, C]: 2x2 space-to-depth with
    the channel order its view/permute sequence produces."""
    n, w, h, c = x.shape
    x = x.view(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


class PixelShuffleMLP(nn.Module):
    """InternVL's connector (OpenGVLab/InternVL ``modeling_internvl_chat.py``): pixel shuffle
    (downsample ratio 0.5, 4C channels), then LayerNorm(4C), Linear(4C, D), GELU, Linear(D, D).
    Even grids only (the view needs it)."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.mlp1 = nn.Sequential(nn.LayerNorm(4 * vision_dim), nn.Linear(4 * vision_dim, llm_dim),
                                  nn.GELU(), nn.Linear(llm_dim, llm_dim))

    def forward(self, x: torch.Tensor, grid=None) -> torch.Tensor:
        b, n, c = x.shape
        h, w = grid or (math.isqrt(n),) * 2
        x = internvl_pixel_shuffle(x.reshape(b, h, w, c))
        return self.mlp1(x.reshape(b, -1, 4 * c))


# ------------------------------------------------------------------------------ Qwen2-VL


class PatchMerger(nn.Module):
    """Qwen2-VL's ``PatchMerger`` (transformers ``models/qwen2_vl``): LayerNorm(C, eps 1e-6) per
    token, each 2x2 block of tokens concatenated (4C), Linear(4C, 4C), GELU, Linear(4C, D).
    Qwen2-VL's tower emits tokens already grouped by 2x2 block; here the row-major grid is
    regrouped first. Even grids only."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.ln_q = nn.LayerNorm(vision_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(4 * vision_dim, 4 * vision_dim), nn.GELU(),
                                 nn.Linear(4 * vision_dim, llm_dim))

    def forward(self, x: torch.Tensor, grid=None) -> torch.Tensor:
        b, n, c = x.shape
        h, w = grid or (math.isqrt(n),) * 2
        x = self.ln_q(x).reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5)
        return self.mlp(x.reshape(b, (h // 2) * (w // 2), 4 * c))


# ------------------------------------------------------------------------------ SAEP


class SAEP(nn.Module):
    """SAEP (saep_kernels.SAEPProjector) over K layers: ``hidden_states`` is the tuple of
    layers with their prefix tokens; the other projectors get the last layer's patch tokens."""

    multi_layer = True

    def __init__(self, vision_dim: int, llm_dim: int, num_layers: int = 4,
                 backend: str = "reference"):
        super().__init__()
        self.proj = SAEPProjector(vision_dim, num_layers, llm_dim, backend=backend)

    def forward(self, layers: Sequence[torch.Tensor], grid=None, num_prefix_tokens: int = 0):
        return self.proj(list(layers), grid=grid, num_prefix_tokens=num_prefix_tokens)


# ------------------------------------------------------------------------------ registry

# name -> (factory(vision_dim, llm_dim, num_input_tokens), needs an even grid, needs a square)
BASELINES: Dict[str, tuple] = {
    "mlp2x_gelu": (lambda c, d, n: MLP2xGELU(c, d), False, False),
    "resampler-256": (lambda c, d, n: QwenVLResampler(c, d, 256), False, False),
    "resampler-144": (lambda c, d, n: QwenVLResampler(c, d, 144), False, False),
    "c-abstractor": (lambda c, d, n: CAbstractor(c, d, num_input_tokens=n), False, True),
    "ldpv2": (lambda c, d, n: LDPv2(c, d), False, False),
    "pixel-shuffle": (lambda c, d, n: PixelShuffleMLP(c, d), True, False),
    "patch-merger": (lambda c, d, n: PatchMerger(c, d), True, False),
}


def saep_variants(device: torch.device) -> List[str]:
    """SAEP rows: eager (reference backend), compiled, and every fused backend available."""
    import saep_kernels

    fused = [b for b in saep_kernels.available_backends(device) if b != "reference"]
    if device.type == "cpu":
        fused = [b for b in fused if b != "triton"]  # the interpreter is for tests
    return ["saep-eager", "saep-compile"] + [f"saep-{b}" for b in fused]


def supports(name: str, height: int, width: int) -> Optional[str]:
    """None if projector ``name`` runs on an HxW grid, else why not."""
    if name.startswith("saep"):
        return None
    _, even, square = BASELINES[name]
    if even and (height % 2 or width % 2):
        return "needs an even grid"
    if square and height != width:
        return "needs a square grid"
    return None


def build(name: str, vision_dim: int, llm_dim: int, height: int, width: int,
          num_layers: int = 4) -> nn.Module:
    if name.startswith("saep"):
        backend = name.split("-", 1)[1]
        backend = "reference" if backend in ("eager", "compile") else backend
        return SAEP(vision_dim, llm_dim, num_layers, backend=backend)
    return BASELINES[name][0](vision_dim, llm_dim, height * width)


def trainable_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
