"""A SegVol head for the demo model whose mask follows an intensity band (the phantom's liver).

A random SegVol marks almost every voxel, so a montage cannot show whether masks are mapped back right.
:func:`set_band_head` sets the tiny SegVol's weights by hand, without training, so that its mask is the
set of voxels whose local mean intensity lies in a band:

* image encoder: channel ``k < 8`` of each patch token is the mean of the patch's sub-block ``k``
  (2 x 8 x 8 voxels); the other channels are balanced constants ``+-K`` that dominate every LayerNorm, so the
  LayerNorms stay linear; the transformer blocks add nothing (zero output projections);
* mask decoder: the two-way transformer leaves the image embedding as it is (zero image-to-token
  attention output); the first upscaling step puts each sub-block mean at its own position and builds four
  ramps ``GELU(A (m - t_i))``; the second makes the band ``[t2, t3]`` out of them; the hypernetwork and the
  text term are constants, so logits > 0 inside the band.

The graphs, the export and the runtime are the ordinary ones: only weights differ.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

K = 10.0  # the constant channels that dominate the LayerNorm statistics
GAIN = 500.0  # ramp slope per unit of normalised intensity (kept low: the export compares graphs in absolute terms)


def _pattern(n: int) -> torch.Tensor:
    return torch.tensor([K if i % 2 == 0 else -K for i in range(n)])


def _outputs(module: torch.nn.Module) -> list[torch.nn.Linear]:
    """The last Linear of a module (an attention's output projection, an MLP's second layer)."""
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)][-1:]


@torch.no_grad()
def set_band_head(seg, band: tuple[float, float], ramp: float) -> None:
    """Make ``seg`` (:class:`~m3d_edge.export.segvol.SegVol`) mark voxels whose local mean is in ``band``.

    ``band`` is in model-input units ([0, 1] after preprocessing); ``ramp`` is the width of each edge.
    """
    _encode_block_means(seg)
    _decode_band(seg.mask_decoder, _layer_norm_scale(seg), band, ramp)


def _encode_block_means(seg) -> None:
    """The encoder passes the means of each patch's eight sub-blocks through (channels 0-7), constants
    on the others; attention, MLP and the decoder's image-to-token updates contribute nothing."""
    enc, dec = seg.image_encoder, seg.mask_decoder
    dim = enc.norm.weight.shape[0]
    pd, ph, pw = enc.patch_embedding.patch_size
    lin = enc.patch_embedding.patch_embeddings[1]
    lin.weight.zero_()
    idx = torch.arange(pd * ph * pw).reshape(pd, ph, pw)
    for k in range(8):
        a, b, c = k // 4, (k // 2) % 2, k % 2
        block = idx[
            a * pd // 2 : (a + 1) * pd // 2, b * ph // 2 : (b + 1) * ph // 2, c * pw // 2 : (c + 1) * pw // 2
        ]
        lin.weight[k, block.flatten()] = 1.0 / block.numel()
    lin.bias.zero_()
    lin.bias[8:] = _pattern(dim - 8)
    enc.patch_embedding.position_embeddings.zero_()
    for blk in enc.blocks:
        for out in _outputs(blk.attn) + _outputs(blk.mlp):
            out.weight.zero_()
            out.bias.zero_()
    enc.norm.weight.fill_(1.0)
    enc.norm.bias.zero_()
    seg.prompt_encoder.no_mask_embed.weight.zero_()
    for layer in dec.transformer.layers:
        layer.cross_attn_image_to_token.out_proj.weight.zero_()
        layer.cross_attn_image_to_token.out_proj.bias.zero_()
        layer.norm4.weight.fill_(1.0)
        layer.norm4.bias.zero_()


def _layer_norm_scale(seg) -> float:
    """The scale of the LayerNorms the sub-block means pass through (linear: constants dominate)."""
    dim = seg.image_encoder.norm.weight.shape[0]
    probe = torch.cat([torch.full((8,), 0.5), _pattern(dim - 8)])
    x = probe
    for _ in range(1 + len(seg.mask_decoder.transformer.layers)):
        x = F.layer_norm(x, (dim,), eps=1e-5)
    return float(x[0] / 0.5)


def _decode_band(dec, scale: float, band: tuple[float, float], ramp: float) -> None:
    """The upscaling turns each sub-block mean into a bump: > 0 inside ``band``, <= 0 outside."""
    up1, ln, up2 = dec.output_upscaling[0], dec.output_upscaling[1], dec.output_upscaling[3]
    c1 = up1.weight.shape[1]
    up1.weight.zero_()
    up1.bias.zero_()
    for k in range(8):  # sub-block k sits at kernel offset (a, b, c): channels 0-3 = m, 4-7 = -m
        a, b, c = k // 4, (k // 2) % 2, k % 2
        up1.weight[k, 0:4, a, b, c] = 1.0 / scale
        up1.weight[k, 4:8, a, b, c] = -1.0 / scale  # cancels the global mean of channels 0-3
    up1.bias[8:] = _pattern(c1 - 8)
    s1 = float(torch.sqrt((_pattern(c1 - 8) ** 2).sum() / c1))  # the global LayerNorm's scale
    lo, hi = band
    ln.weight.zero_()
    ln.bias.zero_()
    for r, t in enumerate((lo - ramp, lo, hi, hi + ramp)):
        ln.weight[r] = GAIN * s1
        ln.bias[r] = -GAIN * t
    up2.weight.zero_()
    up2.bias.zero_()
    for r, sign in enumerate((1.0, -1.0, -1.0, 1.0)):  # plateau GAIN * ramp inside the band, 0 outside
        up2.weight[r, 0] = sign
    ts = torch.tensor((lo - ramp, lo, hi, hi + ramp), dtype=torch.float64)
    signs = torch.tensor((1.0, -1.0, -1.0, 1.0), dtype=torch.float64)
    edge = float((signs * F.gelu(GAIN * (lo - ts))).sum())  # the bump's value at the band's edge
    up2.bias[0] = -edge  # > 0 inside the band, <= 0 outside
    up2.bias[1] = 1.0  # GELU(1): a constant channel for the offset
    hyper = dec.output_hypernetworks_mlps[0].layers[-1]
    hyper.weight.zero_()
    hyper.bias.zero_()
    hyper.bias[0], hyper.bias[1] = 1.0, -1e-3
    dec.txt_align_upscaled_embedding.weight.zero_()
    dec.txt_align_upscaled_embedding.bias.zero_()


def phantom_liver_band(volume_hu, target_hu: float = 60.0, half_width_hu: float = 12.0, ramp_hu: float = 6.0):
    """(band, ramp) in model-input units for the phantom's liver, from the same preprocessing as the runtime."""
    import numpy as np

    from m3d_edge.runtime.imaging.preprocess import WINDOWS

    lo, hi = WINDOWS["m3d"]
    v = np.clip(np.asarray(volume_hu, dtype=np.float64), lo, hi)
    vmin, vmax = float(v.min()), float(v.max())
    to_unit = lambda hu: (hu - vmin) / (vmax - vmin)  # noqa: E731
    band = (to_unit(target_hu - half_width_hu), to_unit(target_hu + half_width_hu))
    return band, ramp_hu / (vmax - vmin)
