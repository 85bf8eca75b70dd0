"""``SAEPProjector``: the SAEP vision-language projector as an ``nn.Module``."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .backends import BACKENDS
from .ops import fused_aggregate
from .varlen import fused_aggregate_varlen
from .spec import KERNEL_SIZES, POOL_MODES, num_output_tokens


class SAEPProjector(nn.Module):
    """Multi-layer aggregation + spatial depthwise conv + 2x2 token pooling + pointwise MLP.

    ``forward(hidden_states)`` takes K ViT layers [B, T, C] and returns [B, Ho*Wo, llm_dim]:
    ``fused_aggregate`` (its depthwise weight and bias are ``dwconv.weight``/``dwconv.bias``)
    followed by ``mlp`` = Linear(K*C, D), GELU, Linear(D, D) (named like LLaVA's
    ``mlp2x_gelu`` projector: ``mlp.0``, ``mlp.2``). The state_dict does not depend on the
    backend, so a checkpoint trained with one loads with any other.

    ``dwconv`` is an ``nn.Conv2d(K*C, K*C, k, groups=K*C)`` used as a parameter container (it
    gets PyTorch's default initialisation); it is never called as a module.
    """

    def __init__(
        self,
        vision_dim: int,
        num_layers: int,
        llm_dim: int,
        kernel_size: int = 3,
        pool: str = "avg",
        residual: bool = True,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, value in (("vision_dim", vision_dim), ("num_layers", num_layers),
                            ("llm_dim", llm_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if kernel_size not in KERNEL_SIZES:
            raise ValueError(f"kernel_size must be one of {KERNEL_SIZES}, got {kernel_size!r}")
        if pool not in POOL_MODES:
            raise ValueError(f"pool must be one of {POOL_MODES}, got {pool!r}")
        if backend not in ("auto",) + BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
        factory = {"device": device, "dtype": dtype}
        channels = vision_dim * num_layers
        self.vision_dim = vision_dim
        self.num_layers = num_layers
        self.llm_dim = llm_dim
        self.kernel_size = kernel_size
        self.pool = pool
        self.residual = residual
        self.backend = backend
        self.dwconv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2,
                                groups=channels, **factory)
        self.mlp = nn.Sequential(
            nn.Linear(channels, llm_dim, **factory),
            nn.GELU(),
            nn.Linear(llm_dim, llm_dim, **factory),
        )

    def aggregate(self, hidden_states: Sequence[torch.Tensor], grid=None,
                  num_prefix_tokens: int = 0) -> torch.Tensor:
        """The fused part alone: [B, Ho*Wo, K*C]."""
        return fused_aggregate(hidden_states, self.dwconv.weight, self.dwconv.bias, grid=grid,
                               num_prefix_tokens=num_prefix_tokens, residual=self.residual,
                               pool=self.pool, backend=self.backend)

    def forward(self, hidden_states: Sequence[torch.Tensor], grid=None,
                num_prefix_tokens: int = 0) -> torch.Tensor:
        return self.mlp(self.aggregate(hidden_states, grid, num_prefix_tokens))

    def aggregate_varlen(self, hidden_states: Sequence[torch.Tensor], grids,
                         num_prefix_tokens=0, layout: str = "row_major") -> torch.Tensor:
        """The fused part over packed images of different grids (``fused_aggregate_varlen``):
        layers [N, C] or [1, N, C], one (H, W) per image; the pooled tokens of all images,
        packed: [M, K*C] (or [1, M, K*C])."""
        return fused_aggregate_varlen(hidden_states, self.dwconv.weight, self.dwconv.bias,
                                      grids=grids, num_prefix_tokens=num_prefix_tokens,
                                      layout=layout, residual=self.residual, pool=self.pool,
                                      backend=self.backend)[0]

    def forward_varlen(self, hidden_states: Sequence[torch.Tensor], grids,
                       num_prefix_tokens=0, layout: str = "row_major") -> torch.Tensor:
        """The projector over packed images of different grids: [M, llm_dim] (or
        [1, M, llm_dim]), image i's ceil(H_i/2) * ceil(W_i/2) tokens after image i-1's."""
        return self.mlp(self.aggregate_varlen(hidden_states, grids, num_prefix_tokens, layout))

    @staticmethod
    def num_output_tokens(height: int, width: Optional[int] = None) -> int:
        """Tokens out for an H x W patch grid: ceil(H/2) * ceil(W/2)."""
        return num_output_tokens(height, height if width is None else width)

    def extra_repr(self) -> str:
        return (f"vision_dim={self.vision_dim}, num_layers={self.num_layers}, "
                f"llm_dim={self.llm_dim}, kernel_size={self.kernel_size}, pool={self.pool!r}, "
                f"residual={self.residual}, backend={self.backend!r}")
