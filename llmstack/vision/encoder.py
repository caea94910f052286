"""The image side of the vision-language model: a small ViT and the projector into the LM's embedding space.

An image (3, S, S) is cut into (S / patch)^2 patches, each embedded by one strided convolution, given a
learned position, and mixed by a few pre-norm Transformer blocks (``nn.TransformerEncoderLayer``: the
encoder attends both ways, unlike the LM's causal blocks, so ``llmstack.model`` has nothing to reuse).
The projector, an MLP (LLaVA-1.5's two layers with a GELU), maps each patch to one soft token of the
LM's width: an image becomes ``n_tokens`` embeddings that take the place of as many placeholder tokens.

What is not here: a pretrained encoder (none is available offline; the encoder learns from the
rendered images in ``data.py``), several resolutions, audio.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 32  # pixels per side; images are resized to it (``images.to_tensor``)
    patch: int = 8  # pixels per patch side: (32 / 8)^2 = 16 patches = 16 soft tokens
    dim: int = 96  # the encoder's width
    n_layer: int = 2
    n_head: int = 4

    def __post_init__(self) -> None:
        if self.image_size % self.patch:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch {self.patch}")
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} is not a multiple of n_head {self.n_head}")

    @property
    def n_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class ImageEncoder(nn.Module):
    """(B, 3, S, S) pixels in [-1, 1] -> (B, N, dim) patch features."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.dim, kernel_size=cfg.patch, stride=cfg.patch)
        self.pos = nn.Parameter(torch.randn(1, cfg.n_tokens, cfg.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.dim, cfg.n_head, 4 * cfg.dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.n_layer, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        x_BDhw = self.patch_embed(images_BCHW)
        x_BND = x_BDhw.flatten(2).transpose(1, 2) + self.pos
        return self.norm(self.blocks(x_BND))


class Projector(nn.Module):
    """(B, N, dim) patch features -> (B, N, n_embd) soft tokens in the LM's embedding space."""

    def __init__(self, dim: int, n_embd: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, n_embd)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(n_embd, n_embd)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x_BND)))
