"""A PNG montage of a result's box and mask: axial slices through the region plus a coronal and a sagittal
reformat through its centre, in radiological orientation, with orientation letters and a millimetre scale bar.

Drawn on the source grid when the result carries its study and preprocessing record (the mask through
:func:`mask_to_source`, the box through :func:`box_to_source`, i.e. exactly what the NIfTI / DICOM SEG writers
write), otherwise on the 32x256x256 model grid (identity geometry, 1 mm spacing). Pillow only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont

from m3d_edge.fileio import atomic_path
from m3d_edge.runtime.report.montage_views import (
    PANEL,
    SOFT_TISSUE,
    ZOOM_BELOW,
    ZOOM_CONTEXT,
    ZOOM_MIN_MM,
    Scene,
    View,
    Voxel,
    axial_crop,
    axial_views,
    centre_of,
    reformat_views,
    region,
    scene,
)
from m3d_edge.runtime.report.orientation import Canonical, canonical_axes

if TYPE_CHECKING:
    from m3d_edge.runtime.result import Result

MASK_COLOUR = (0, 229, 255)  # cyan outline
BOX_COLOUR = (255, 214, 0)  # yellow rectangle
SCALE_COLOUR = (255, 255, 255)
LETTER_COLOUR = (255, 200, 120)
TEXT_COLOUR = (225, 225, 225)
MUTED_COLOUR = (150, 150, 160)
BACKGROUND = (22, 22, 26)

COLUMNS = 4
GAP = 8
CAPTION_H = 22
LETTER_M = 20  # margin around the image holding the orientation letters
FOOTER_H = 24
HEADER_H = 30
OUTLINE_PX = 2
LETTER_FONT = 18
BOX_PX = 2
NICE_MM = (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000)
CELL_W = PANEL + 2 * LETTER_M
CELL_H = CAPTION_H + PANEL + 2 * LETTER_M + FOOTER_H

_AXIS_NAMES = ("z", "y", "x")
_VIEW_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}  # canonical axis the view slices along
_POSITION_LETTERS = {0: ("S", "I", 2), 1: ("P", "A", 1), 2: ("L", "R", 0)}  # (+, -, LPS component)

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
Colour = tuple[int, int, int]
__all__ = ["SOFT_TISSUE", "ZOOM_BELOW", "ZOOM_CONTEXT", "ZOOM_MIN_MM", "Montage", "Panel", "build_montage"]


@dataclass
class Panel:
    """One image in the montage, with what is needed to find things in it (used by the tests)."""

    view: str  # "axial" | "coronal" | "sagittal"
    label: str
    slice_index: int  # index along the source array axis ``slice_axis``
    slice_axis: str  # "z", "y" or "x" of the source array
    position_mm: float  # patient coordinate of the slice centre along the view normal (S, P or L positive)
    x0: int  # image origin (top-left) in montage pixels
    y0: int
    width: int  # image size in pixels
    height: int
    mm_per_px: float
    crop: tuple[int, int, int, int]  # (row0, col0, rows, cols) of the 2D slice shown (zoomed axial views)
    rows: np.ndarray  # display row -> row of the full 2D slice (nearest neighbour)
    cols: np.ndarray  # display column -> column of the full 2D slice
    letters: dict[str, str]
    scale_mm: float
    scale_px: int
    scale_xy: tuple[int, int]  # left end of the scale bar (montage pixels), bar is 4 px tall from there
    box_px: tuple[int, int, int, int] | None = None  # (left, top, right, bottom) inclusive, montage pixels


@dataclass
class Montage:
    image: Image.Image
    panels: list[Panel]
    grid: str  # "source" | "model"
    window: tuple[float, float]
    notes: list[str] = field(default_factory=list)


@dataclass
class _Fonts:
    caption: Font
    letter: Font
    small: Font


def _font(size: int) -> Font:
    return ImageFont.load_default(size=size)


def _nearest(n_src: int, n_disp: int) -> NDArray[np.int64]:
    """Display pixel -> source cell (nearest neighbour, pixel centres)."""
    idx = np.floor((np.arange(n_disp) + 0.5) * n_src / n_disp).astype(np.int64)
    clipped: NDArray[np.int64] = np.clip(idx, 0, n_src - 1)
    return clipped


def _erode(m: NDArray[np.bool_]) -> NDArray[np.bool_]:
    p = np.pad(m, 1, constant_values=False)
    eroded: NDArray[np.bool_] = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return eroded


def outline(m: NDArray[np.bool_], width: int = OUTLINE_PX) -> NDArray[np.bool_]:
    """The inner boundary band (``width`` pixels, 4-connected) of a 2D boolean mask."""
    inner = m
    for _ in range(width):
        inner = _erode(inner)
    return m & ~inner


def _span(idx: NDArray[np.int64], lo: int, hi: int) -> tuple[int, int] | None:
    hit = np.nonzero((idx >= lo) & (idx <= hi))[0]
    return (int(hit[0]), int(hit[-1])) if len(hit) else None


def nice_scale_mm(mm_per_px: float, width_px: int) -> float:
    """The largest 'round' length that stays within about a third of the image width (at least one)."""
    target = max(width_px * 0.34, 12) * mm_per_px
    best = NICE_MM[0]
    for v in NICE_MM:
        if v <= target:
            best = v
    return float(best)


def _text_center(
    draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font: Font, fill: Colour
) -> None:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    x = xy[0] - (x1 - x0) / 2 - x0
    y = xy[1] - (y1 - y0) / 2 - y0
    for dx, dy in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        draw.text((x + dx, y + dy), text, font=font, fill=(0, 0, 0))
    draw.text((x, y), text, font=font, fill=fill)


def build_montage(result: Result) -> Montage | None:
    """The montage in memory (``None`` without a box and a non-empty mask); see :func:`render_montage`."""
    if result.box is None and (result.mask is None or not np.any(result.mask)):
        return None
    sc = scene(result)
    can = canonical_axes(sc.geometry.affine, sc.volume.shape)
    vol = can.view(sc.volume)
    msk = can.view(sc.mask) if sc.mask is not None else None
    box = can.box_to_canonical(*sc.box) if sc.box is not None else None
    reg = region(can.shape, box, msk)
    centre = centre_of(reg)
    crop = axial_crop(can, reg, centre)
    views = axial_views(can, vol, msk, box, reg, crop) + reformat_views(can, vol, msk, box, centre)

    cols = min(COLUMNS, len(views))
    rows_n = -(-len(views) // cols)
    width = cols * CELL_W + (cols + 1) * GAP
    height = HEADER_H + rows_n * CELL_H + (rows_n + 1) * GAP
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    fonts = _Fonts(_font(15), _font(LETTER_FONT), _font(14))
    zoomed = crop[0] != (0, 0, can.shape[1], can.shape[2])
    _draw_header(draw, sc, msk is not None, box is not None, zoomed, fonts.small)
    panels = []
    for n, v in enumerate(views):
        cell = (GAP + (n % cols) * (CELL_W + GAP), HEADER_H + GAP + (n // cols) * (CELL_H + GAP))
        panels.append(_draw_panel(img, draw, sc, can, centre, v, cell, fonts))
    return Montage(image=img, panels=panels, grid=sc.grid, window=sc.window, notes=sc.notes)


def _draw_header(
    draw: ImageDraw.ImageDraw, sc: Scene, mask: bool, box: bool, zoomed: bool, font: Font
) -> None:
    """The legend (mask outline, box) and a line on the grid, spacing and window."""
    x = GAP
    y = HEADER_H // 2 + 2
    if mask:
        draw.line([(x, y), (x + 22, y)], fill=MASK_COLOUR, width=OUTLINE_PX)
        draw.text((x + 28, y - 8), "mask outline", font=font, fill=TEXT_COLOUR)
        x += 28 + int(draw.textlength("mask outline", font=font)) + 18
    if box:
        draw.rectangle([x, y - 6, x + 20, y + 6], outline=BOX_COLOUR, width=BOX_PX)
        draw.text((x + 28, y - 8), "box", font=font, fill=TEXT_COLOUR)
        x += 28 + int(draw.textlength("box", font=font)) + 18
    shape_txt = "x".join(str(s) for s in sc.volume.shape)
    if sc.grid == "source":
        sp_txt = "spacing " + "x".join(f"{s:.3g}" for s in sc.geometry.spacing) + " mm"
    else:
        sp_txt = "no patient geometry (1 voxel = 1 unit, letters nominal)"
    info = f"{sc.grid} grid {shape_txt} (z,y,x), {sp_txt}, window {sc.window_label}"
    if zoomed:
        info += "  |  axial views zoomed on the region"
    info += "  |  model output, not a diagnosis"
    draw.text((x, y - 8), info, font=font, fill=MUTED_COLOUR)


def _tile(
    v: View, window: tuple[float, float], size: tuple[int, int]
) -> tuple[NDArray[np.uint8], NDArray[np.int64], NDArray[np.int64]]:
    """(RGB pixels with the mask outline, display row -> slice row, display column -> slice column)."""
    r0, c0, nr, nc = v.crop
    w_px, h_px = size
    lo_w, hi_w = window
    ct2d = v.ct[r0 : r0 + nr, c0 : c0 + nc]
    ct = np.clip((np.asarray(ct2d, dtype=np.float32) - lo_w) / (hi_w - lo_w), 0.0, 1.0) * 255.0
    tile = Image.fromarray(np.ascontiguousarray(ct, dtype=np.float32)).resize(
        (w_px, h_px), Image.Resampling.BILINEAR
    )
    grey = np.clip(np.asarray(tile) + 0.5, 0, 255).astype(np.uint8)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    rows_i, cols_i = r0 + _nearest(nr, h_px), c0 + _nearest(nc, w_px)  # indices into the full slice
    if v.mask is not None:
        md = np.asarray(v.mask)[np.ix_(rows_i, cols_i)]
        rgb[outline(md)] = MASK_COLOUR
    return rgb, rows_i, cols_i


def _caption(sc: Scene, can: Canonical, centre: Voxel, v: View) -> tuple[str, int, int, float]:
    """(caption, source slice index, source array axis, patient position mm) of one view."""
    axis = _VIEW_AXIS[v.view]
    slice_axis = can.perm[axis]
    centre_c = list(centre)
    centre_c[axis] = v.index
    src_idx = can.to_source((centre_c[0], centre_c[1], centre_c[2]))
    pos_letter_pos, pos_letter_neg, comp = _POSITION_LETTERS[axis]
    pos = float(sc.geometry.zyx_to_lps(src_idx)[comp])
    label = f"{v.view.capitalize()}  {_AXIS_NAMES[slice_axis]} {src_idx[slice_axis]}"
    if sc.grid == "source":
        label += f"  ·  {pos_letter_pos if pos >= 0 else pos_letter_neg} {abs(pos):.1f} mm"
    return label, int(src_idx[slice_axis]), slice_axis, pos


def _draw_letters(
    draw: ImageDraw.ImageDraw, letters: dict[str, str], xy: tuple[int, int], size: tuple[int, int], font: Font
) -> None:
    """Orientation letters just outside the image edges."""
    (x0, y0), (w_px, h_px) = xy, size
    mx, my = x0 + w_px / 2, y0 + h_px / 2
    _text_center(draw, (mx, y0 - LETTER_M / 2), letters["top"], font, LETTER_COLOUR)
    _text_center(draw, (mx, y0 + h_px + LETTER_M / 2), letters["bottom"], font, LETTER_COLOUR)
    _text_center(draw, (x0 - LETTER_M / 2, my), letters["left"], font, LETTER_COLOUR)
    _text_center(draw, (x0 + w_px + LETTER_M / 2, my), letters["right"], font, LETTER_COLOUR)


def _draw_scale(
    draw: ImageDraw.ImageDraw, mpp: float, cell: tuple[int, int], unit: str, font: Font
) -> tuple[float, int, tuple[int, int]]:
    """The scale bar under the image (pixels are square); returns (mm, pixels, left end)."""
    cx, cy = cell
    scale_mm = nice_scale_mm(mpp, PANEL)
    scale_px = round(scale_mm / mpp)
    bx, by = cx + LETTER_M, cy + CAPTION_H + PANEL + 2 * LETTER_M + 6
    draw.rectangle([bx, by, bx + scale_px - 1, by + 3], fill=SCALE_COLOUR)
    draw.text((bx + scale_px + 8, by - 6), f"{scale_mm:g} {unit}", font=font, fill=TEXT_COLOUR)
    return scale_mm, scale_px, (bx, by)


def _draw_panel(
    img: Image.Image,
    draw: ImageDraw.ImageDraw,
    sc: Scene,
    can: Canonical,
    centre: Voxel,
    v: View,
    cell: tuple[int, int],
    fonts: _Fonts,
) -> Panel:
    """One view in its cell: the letterboxed image, box, caption, orientation letters and scale bar."""
    cx, cy = cell
    r0, c0, nr, nc = v.crop
    mpp = v.mm_per_px
    h_px = max(1, round(nr * v.spacing[0] / mpp))
    w_px = max(1, round(nc * v.spacing[1] / mpp))
    x0 = cx + LETTER_M + (PANEL - w_px) // 2
    y0 = cy + CAPTION_H + LETTER_M + (PANEL - h_px) // 2
    top = cy + CAPTION_H + LETTER_M
    draw.rectangle([cx + LETTER_M, top, cx + LETTER_M + PANEL - 1, top + PANEL - 1], fill=(0, 0, 0))
    rgb, rows_i, cols_i = _tile(v, sc.window, (w_px, h_px))
    img.paste(Image.fromarray(rgb), (x0, y0))
    box_px = None
    if v.box_rows is not None and v.box_cols is not None:
        rs, cs = _span(rows_i, *v.box_rows), _span(cols_i, *v.box_cols)
        if rs is not None and cs is not None:
            box_px = (x0 + cs[0], y0 + rs[0], x0 + cs[1], y0 + rs[1])
            draw.rectangle(list(box_px), outline=BOX_COLOUR, width=BOX_PX)
    label, slice_index, slice_axis, pos = _caption(sc, can, centre, v)
    draw.text((cx + LETTER_M, cy + 3), label, font=fonts.caption, fill=TEXT_COLOUR)
    letters = can.letters(v.view)
    _draw_letters(draw, letters, (x0, y0), (w_px, h_px), fonts.letter)
    unit = "mm" if sc.grid == "source" else "voxels"
    scale_mm, scale_px, scale_xy = _draw_scale(draw, mpp, cell, unit, fonts.small)
    return Panel(
        view=v.view,
        label=label,
        slice_index=slice_index,
        slice_axis=_AXIS_NAMES[slice_axis],
        position_mm=pos,
        x0=x0,
        y0=y0,
        width=w_px,
        height=h_px,
        mm_per_px=mpp,
        crop=(r0, c0, nr, nc),
        rows=rows_i,
        cols=cols_i,
        letters=letters,
        scale_mm=scale_mm,
        scale_px=scale_px,
        scale_xy=scale_xy,
        box_px=box_px,
    )


def render_montage(result: Result, path: Path | str) -> Path | None:
    """Write the montage PNG of a result's box/mask to ``path`` (atomically); ``None`` when there is nothing
    to show (no box and no or an empty mask)."""
    m = build_montage(result)
    if m is None:
        return None
    path = Path(path)
    with atomic_path(path) as tmp:
        m.image.save(tmp, format="PNG", optimize=False)
    return path
