"""SegVol, M3D's segmentation head, in plain torch with the released state-dict names.

``image_encoder`` is a ViT without cls; ``prompt_encoder`` turns the (projected) [SEG] hidden state into one
sparse prompt token, uses ``no_mask_embed`` as the dense prompt and a random-Fourier positional encoding
from the stored ``positional_encoding_gaussian_matrix``; ``mask_decoder`` is SAM's two-way transformer in
3D. Only the text-prompt path M3D uses is implemented; modules for points, boxes and mask prompts exist
so that the released weights load strictly.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from m3d_edge.export.vit import ViT3D


class LayerNorm2d(nn.Module):
    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps


class PositionEmbeddingRandom(nn.Module):
    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn((3, num_pos_feats)))

    def forward(self, size: tuple[int, int, int]) -> torch.Tensor:
        """Dense encoding ``[C, h, w, d]`` of the grid of voxel centres."""
        h, w, d = size
        m = self.positional_encoding_gaussian_matrix
        along0, along1, along2 = torch.meshgrid(
            (torch.arange(h, dtype=m.dtype) + 0.5) / h,
            (torch.arange(w, dtype=m.dtype) + 0.5) / w,
            (torch.arange(d, dtype=m.dtype) + 0.5) / d,
            indexing="ij",
        )
        # SegVol's order: the coordinate that varies along axis 1 first, then axis 0, then axis 2
        coords = torch.stack([along1, along0, along2], dim=-1)
        coords = 2 * math.pi * ((2 * coords - 1) @ m)
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1).permute(3, 0, 1, 2)


class PromptEncoder(nn.Module):
    def __init__(self, embed_dim: int, embedding_size: tuple[int, int, int], mask_in_chans: int = 16) -> None:
        super().__init__()
        self.embedding_size = tuple(embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def dense_pe(self) -> torch.Tensor:
        return self.pe_layer(self.embedding_size).unsqueeze(0)

    def forward(self, text_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sparse = text_embedding.unsqueeze(1)
        dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(
            text_embedding.shape[0], -1, *self.embedding_size
        )
        return sparse, dense


class MLPBlock(nn.Module):
    def __init__(self, dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.relu(self.lin1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.heads = heads
        inner = dim // downsample_rate
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q_proj(q)), self._split(self.k_proj(k)), self._split(self.v_proj(v))
        attn = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1]), dim=-1)
        out = (attn @ v).transpose(1, 2)
        return self.out_proj(out.reshape(out.shape[0], out.shape[1], -1))


class TwoWayAttentionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, skip_first_layer_pe: bool) -> None:
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, heads, downsample_rate=2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, heads, downsample_rate=2)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries, keys, query_pe, key_pe):
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TwoWayAttentionBlock(dim, heads, mlp_dim, i == 0) for i in range(depth))
        self.final_attn_token_to_image = Attention(dim, heads, downsample_rate=2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image_embedding, image_pe, point_embedding):
        keys = image_embedding.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        q, k = queries + point_embedding, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys


class MLP(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(
            nn.Linear(n, k) for n, k in zip(dims, [*dims[1:], output_dim], strict=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return x


class MaskDecoder(nn.Module):
    def __init__(
        self, dim: int, embedding_size: tuple[int, int, int], num_multimask_outputs: int = 3
    ) -> None:
        super().__init__()
        self.transformer = TwoWayTransformer(depth=2, dim=dim, heads=8, mlp_dim=2048)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        up = tuple(2 * s for s in embedding_size)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(dim, dim // 4, kernel_size=2, stride=2),
            nn.LayerNorm((dim // 4, *up)),
            nn.GELU(),
            nn.ConvTranspose3d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(dim, 256, self.num_mask_tokens, 3)
        self.txt_align_upscaled_embedding = nn.Linear(dim, dim // 8)

    def forward(self, image_embeddings, text_embedding, image_pe, sparse, dense) -> torch.Tensor:
        """Low-resolution logits of the first mask ``[B, 1, 4h, 4w, 4d]``, text-similarity term added."""
        tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat((tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse), dim=1)
        src = image_embeddings + dense
        pos_src = image_pe.expand(tokens.shape[0], -1, -1, -1, -1)
        b, c, h, w, d = src.shape
        hs, src = self.transformer(src, pos_src, tokens)
        src = src.transpose(1, 2).reshape(b, c, h, w, d)
        up = self.output_upscaling(src)
        b, c, h, w, d = up.shape
        up = up.reshape(b, c, h * w * d)
        hyper = self.output_hypernetworks_mlps[0](hs[:, 1, :]).unsqueeze(1)  # first mask only
        sim = self.txt_align_upscaled_embedding(text_embedding).unsqueeze(1)
        return ((hyper + sim) @ up).reshape(b, 1, h, w, d)


class SegVol(nn.Module):
    """``image_encoder`` + ``prompt_encoder`` + ``mask_decoder``; logits at the input resolution."""

    def __init__(
        self, img_size, patch_size, hidden: int = 768, mlp_dim: int = 3072, layers: int = 12, heads: int = 12
    ) -> None:
        super().__init__()
        self.img_size = tuple(img_size)
        self.grid = tuple(i // p for i, p in zip(img_size, patch_size, strict=True))
        self.image_encoder = ViT3D(img_size, patch_size, hidden, mlp_dim, layers, heads, classification=False)
        self.prompt_encoder = PromptEncoder(hidden, self.grid)
        self.mask_decoder = MaskDecoder(hidden, self.grid)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        x = self.image_encoder(image)
        return x.transpose(1, 2).reshape(x.shape[0], -1, *self.grid)

    def decode(self, image_embedding: torch.Tensor, text_embedding: torch.Tensor) -> torch.Tensor:
        sparse, dense = self.prompt_encoder(text_embedding)
        low = self.mask_decoder(
            image_embedding, text_embedding, self.prompt_encoder.dense_pe(), sparse, dense
        )
        return F.interpolate(low, size=self.img_size, mode="trilinear", align_corners=False)

    def forward(self, image: torch.Tensor, text_embedding: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(image), text_embedding)
