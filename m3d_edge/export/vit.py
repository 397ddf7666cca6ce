"""3D ViT in plain torch with MONAI's state-dict names (the M3D vision tower and the SegVol encoder).

M3D builds both with MONAI's ``ViT`` (perceptron patch embedding, pre-LN blocks, exact GELU, qkv without
bias). MONAI >= 1.4 renamed its arguments and the original code no longer builds, so we keep our own copy of
the computation with the same parameter names: ``patch_embedding.patch_embeddings.1``,
``patch_embedding.position_embeddings``, ``blocks.N.{norm1,attn.qkv,attn.out_proj,norm2,mlp.linear1,
mlp.linear2}``, ``norm`` and, for the tower, ``cls_token``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class PatchEmbedding(nn.Module):
    """Non-overlapping 3D patches -> Linear -> + learned position embeddings (MONAI "perceptron")."""

    def __init__(self, img_size, patch_size, hidden: int, in_channels: int = 1) -> None:
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.grid = tuple(i // p for i, p in zip(img_size, patch_size, strict=True))
        n = math.prod(self.grid)
        patch_dim = in_channels * math.prod(self.patch_size)
        # index 0 is MONAI's (parameter-free) Rearrange, kept so the Linear sits at key ".1"
        self.patch_embeddings = nn.Sequential(nn.Identity(), nn.Linear(patch_dim, hidden))
        self.position_embeddings = nn.Parameter(torch.zeros(1, n, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        (p1, p2, p3), (g1, g2, g3) = self.patch_size, self.grid
        # "b c (h p1) (w p2) (d p3) -> b (h w d) (p1 p2 p3 c)"
        x = x.reshape(b, c, g1, p1, g2, p2, g3, p3).permute(0, 2, 4, 6, 3, 5, 7, 1)
        x = x.reshape(b, g1 * g2 * g3, p1 * p2 * p3 * c)
        return self.patch_embeddings(x) + self.position_embeddings


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # "b h (qkv l d) -> qkv b l h d"
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        out = attn.softmax(dim=-1) @ v
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, hidden: int, mlp_dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(hidden, mlp_dim)
        self.linear2 = nn.Linear(mlp_dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(nn.functional.gelu(self.linear1(x)))


class Block(nn.Module):
    def __init__(self, hidden: int, mlp_dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.attn = SelfAttention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden)
        self.mlp = Mlp(hidden, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT3D(nn.Module):
    """MONAI-compatible ViT; ``classification=True`` adds the cls token (kept in the output)."""

    def __init__(
        self,
        img_size,
        patch_size,
        hidden: int = 768,
        mlp_dim: int = 3072,
        layers: int = 12,
        heads: int = 12,
        classification: bool = False,
    ) -> None:
        super().__init__()
        self.patch_embedding = PatchEmbedding(img_size, patch_size, hidden)
        self.blocks = nn.ModuleList(Block(hidden, mlp_dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        if classification:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(x)
        if hasattr(self, "cls_token"):
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)
