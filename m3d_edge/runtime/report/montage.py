"""A PNG montage of a result's box and mask: axial slices through the region plus a coronal and a sagittal
reformat through its centre, in radiological orientation, with orientation letters and a millimetre scale bar.

Drawn on the source grid when the result carries its study and preprocessing record (the mask through
:func:`mask_to_source`, the box through :func:`box_to_source`, i.e. exactly what the NIfTI / DICOM SEG writers
write), otherwise on the 32x256x256 model grid (identity geometry, 1 mm spacing). Pillow only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from m3d_edge.errors import StudyError
from m3d_edge.fileio import atomic_path
from m3d_edge.runtime.imaging.geometry import TARGET_SHAPE, Geometry, box_to_source, mask_to_source
from m3d_edge.runtime.imaging.preprocess import PreprocessRecord
from m3d_edge.runtime.report.orientation import Canonical, canonical_axes

MASK_COLOUR = (0, 229, 255)  # cyan outline
BOX_COLOUR = (255, 214, 0)  # yellow rectangle
SCALE_COLOUR = (255, 255, 255)
LETTER_COLOUR = (255, 200, 120)
TEXT_COLOUR = (225, 225, 225)
MUTED_COLOUR = (150, 150, 160)
BACKGROUND = (22, 22, 26)

PANEL = 280  # the largest patient extent of the volume fills this many pixels
MAX_AXIAL = 6
COLUMNS = 4
GAP = 8
CAPTION_H = 22
LETTER_M = 20  # margin around the image holding the orientation letters
FOOTER_H = 24
HEADER_H = 30
OUTLINE_PX = 2
LETTER_FONT = 18
BOX_PX = 2
ZOOM_MIN_MM = 60.0  # smallest field of view of a zoomed axial view
ZOOM_CONTEXT = 2.5  # zoomed field of view = this times the region's in-plane size (at least ZOOM_MIN_MM)
ZOOM_BELOW = 0.7  # zoom only when that field of view is below this fraction of the slice
SOFT_TISSUE = (40.0 - 200.0, 40.0 + 200.0)  # W400 / L40
NICE_MM = (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000)

_AXIS_NAMES = ("z", "y", "x")
_VIEW_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}  # canonical axis the view slices along
_POSITION_LETTERS = {0: ("S", "I", 2), 1: ("P", "A", 1), 2: ("L", "R", 0)}  # (+, -, LPS component)


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
class _Scene:
    volume: np.ndarray  # (z, y, x)
    geometry: Geometry
    window: tuple[float, float]
    window_label: str
    mask: np.ndarray | None  # (z, y, x) bool
    box: tuple[tuple[int, int, int], tuple[int, int, int]] | None  # inclusive (z, y, x) voxel range
    grid: str
    notes: list[str]


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def identity_record(shape: tuple[int, int, int] = TARGET_SHAPE) -> PreprocessRecord:
    """A record mapping the model grid onto itself (identity geometry, 1 mm spacing)."""
    return PreprocessRecord(
        source_shape=tuple(shape),
        crop_start=(0, 0, 0),
        crop_stop=tuple(shape),
        target_shape=tuple(shape),
        zoom=(1.0, 1.0, 1.0),
        source_geometry=Geometry.identity(shape),
        window="none",
        identity=True,
    )


def _has_source(result: Any) -> bool:
    study, record = getattr(result, "study", None), getattr(result, "record", None)
    hu = getattr(study, "hu", None)
    return (
        record is not None
        and hu is not None
        and getattr(study, "geometry", None) is not None
        and tuple(np.shape(hu)) == tuple(record.source_shape)
    )


def _scene(result: Any) -> _Scene:
    notes: list[str] = []
    if _has_source(result):
        study, record = result.study, result.record
        volume = np.asarray(study.hu)
        geometry = record.source_geometry
        normalized = bool(getattr(study, "preprocessed", False) or record.identity)
        window, wlabel = ((0.0, 1.0), "0..1") if normalized else (SOFT_TISSUE, "W400 L40")
        grid = "source"
    else:
        record = identity_record()
        geometry = record.source_geometry
        if result.volume is not None:
            volume = np.asarray(result.volume, dtype=np.float32).reshape(TARGET_SHAPE)
        else:
            volume = np.zeros(TARGET_SHAPE, np.float32)
            notes.append("no image volume in the result; outlines drawn on black")
        window, wlabel, grid = (0.0, 1.0), "0..1", "model"
    mask = None
    if result.mask is not None:
        mask = mask_to_source(result.mask, record).astype(bool)
    box = None
    if result.box is not None:
        try:
            sb = box_to_source(result.box, record)
            box = (sb.source_min, sb.source_max)
        except StudyError as exc:
            notes.append(f"box not drawn: {exc}")
    return _Scene(volume, geometry, window, wlabel, mask, box, grid, notes)


def _bbox(mask: np.ndarray) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    lo, hi = [], []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        idx = np.nonzero(mask.any(axis=other))[0]
        if len(idx) == 0:
            return None
        lo.append(int(idx[0]))
        hi.append(int(idx[-1]))
    return tuple(lo), tuple(hi)


def _nearest(n_src: int, n_disp: int) -> np.ndarray:
    """Display pixel -> source cell (nearest neighbour, pixel centres)."""
    idx = np.floor((np.arange(n_disp) + 0.5) * n_src / n_disp).astype(np.int64)
    return np.clip(idx, 0, n_src - 1)


def _erode(m: np.ndarray) -> np.ndarray:
    p = np.pad(m, 1, constant_values=False)
    return p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def outline(m: np.ndarray, width: int = OUTLINE_PX) -> np.ndarray:
    """The inner boundary band (``width`` pixels, 4-connected) of a 2D boolean mask."""
    inner = m
    for _ in range(width):
        inner = _erode(inner)
    return m & ~inner


def _span(idx: np.ndarray, lo: int, hi: int) -> tuple[int, int] | None:
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


def _slices(can: Canonical, region: tuple[tuple[int, int, int], tuple[int, int, int]]) -> list[int]:
    lo, hi = region[0][0], region[1][0]
    n = min(MAX_AXIAL, hi - lo + 1)
    ks = sorted({int(round(v)) for v in np.linspace(lo, hi, n)}, reverse=True)  # superior first
    return ks


def _text_center(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font, fill) -> None:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    x = xy[0] - (x1 - x0) / 2 - x0
    y = xy[1] - (y1 - y0) / 2 - y0
    for dx, dy in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        draw.text((x + dx, y + dy), text, font=font, fill=(0, 0, 0))
    draw.text((x, y), text, font=font, fill=fill)


def build_montage(result: Any) -> Montage | None:
    """The montage in memory (``None`` without a box and a non-empty mask); see :func:`render_montage`."""
    if result.box is None and (result.mask is None or not np.any(result.mask)):
        return None
    sc = _scene(result)
    can = canonical_axes(sc.geometry.affine, sc.volume.shape)
    vol = can.view(sc.volume)
    msk = can.view(sc.mask) if sc.mask is not None else None
    box = can.box_to_canonical(*sc.box) if sc.box is not None else None

    regions = []
    if box is not None:
        regions.append(box)
    if msk is not None:
        mb = _bbox(msk)
        if mb is not None:
            regions.append(mb)
    if not regions:  # an empty mask and a box that could not be mapped
        regions.append(((0, 0, 0), tuple(n - 1 for n in can.shape)))
    region = (
        tuple(min(r[0][c] for r in regions) for c in range(3)),
        tuple(max(r[1][c] for r in regions) for c in range(3)),
    )
    centre = tuple((region[0][c] + region[1][c]) // 2 for c in range(3))

    n0, n1, n2 = can.shape
    sp = can.spacing
    extent = [can.shape[c] * sp[c] for c in range(3)]
    mm_per_px = max(extent) / PANEL
    # axial slices zoom onto the region when it is small against the field of view (the reformats keep it)
    full = (0, 0, n1, n2)
    ax_crop, ax_mpp = full, mm_per_px
    reg_mm = max((region[1][c] - region[0][c] + 1) * sp[c] for c in (1, 2))
    fov = max(ZOOM_MIN_MM, ZOOM_CONTEXT * reg_mm)
    if fov < ZOOM_BELOW * max(extent[1], extent[2]):
        nr, nc = min(n1, int(np.ceil(fov / sp[1]))), min(n2, int(np.ceil(fov / sp[2])))
        r0 = min(max(centre[1] - nr // 2, 0), n1 - nr)
        c0 = min(max(centre[2] - nc // 2, 0), n2 - nc)
        ax_crop, ax_mpp = (r0, c0, nr, nc), max(nr * sp[1], nc * sp[2]) / PANEL

    # (view, 2D CT, 2D mask, box rows, box cols, row spacing, col spacing, canonical slice, crop, mm/px)
    views: list[tuple] = []
    for k in _slices(can, region):
        in_box = box is not None and box[0][0] <= k <= box[1][0]
        views.append(
            (
                "axial",
                vol[k],
                None if msk is None else msk[k],
                (box[0][1], box[1][1]) if in_box else None,
                (box[0][2], box[1][2]) if in_box else None,
                (sp[1], sp[2]),
                k,
                ax_crop,
                ax_mpp,
            )
        )
    flip_rows = lambda r: (n0 - 1 - r[1], n0 - 1 - r[0])  # noqa: E731  (S at the top: rows reversed)
    j = centre[1]
    in_box = box is not None and box[0][1] <= j <= box[1][1]
    views.append(
        (
            "coronal",
            vol[::-1, j, :],
            None if msk is None else msk[::-1, j, :],
            flip_rows((box[0][0], box[1][0])) if in_box else None,
            (box[0][2], box[1][2]) if in_box else None,
            (sp[0], sp[2]),
            j,
            (0, 0, n0, n2),
            mm_per_px,
        )
    )
    i = centre[2]
    in_box = box is not None and box[0][2] <= i <= box[1][2]
    views.append(
        (
            "sagittal",
            vol[::-1, :, i],
            None if msk is None else msk[::-1, :, i],
            flip_rows((box[0][0], box[1][0])) if in_box else None,
            (box[0][1], box[1][1]) if in_box else None,
            (sp[0], sp[1]),
            i,
            (0, 0, n0, n1),
            mm_per_px,
        )
    )

    cols = min(COLUMNS, len(views))
    rows_n = -(-len(views) // cols)
    cell_w = PANEL + 2 * LETTER_M
    cell_h = CAPTION_H + PANEL + 2 * LETTER_M + FOOTER_H
    width = cols * cell_w + (cols + 1) * GAP
    height = HEADER_H + rows_n * cell_h + (rows_n + 1) * GAP
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    f_caption, f_letter, f_small = _font(15), _font(LETTER_FONT), _font(14)

    # header: legend
    x = GAP
    y = HEADER_H // 2 + 2
    if msk is not None:
        draw.line([(x, y), (x + 22, y)], fill=MASK_COLOUR, width=OUTLINE_PX)
        draw.text((x + 28, y - 8), "mask outline", font=f_small, fill=TEXT_COLOUR)
        x += 28 + int(draw.textlength("mask outline", font=f_small)) + 18
    if box is not None:
        draw.rectangle([x, y - 6, x + 20, y + 6], outline=BOX_COLOUR, width=BOX_PX)
        draw.text((x + 28, y - 8), "box", font=f_small, fill=TEXT_COLOUR)
        x += 28 + int(draw.textlength("box", font=f_small)) + 18
    shape_txt = "x".join(str(s) for s in sc.volume.shape)
    if sc.grid == "source":
        sp_txt = "spacing " + "x".join(f"{s:.3g}" for s in sc.geometry.spacing) + " mm"
    else:
        sp_txt = "no patient geometry (1 voxel = 1 unit, letters nominal)"
    info = f"{sc.grid} grid {shape_txt} (z,y,x), {sp_txt}, window {sc.window_label}"
    if ax_crop != full:
        info += "  |  axial views zoomed on the region"
    info += "  |  model output, not a diagnosis"
    draw.text((x, y - 8), info, font=f_small, fill=MUTED_COLOUR)

    lo_w, hi_w = sc.window
    unit = "mm" if sc.grid == "source" else "voxels"
    panels: list[Panel] = []
    for n, (view, ct2d, m2d, brow, bcol, (sr, scol), k, (r0, c0, nr, nc), mpp) in enumerate(views):
        cx = GAP + (n % cols) * (cell_w + GAP)
        cy = HEADER_H + GAP + (n // cols) * (cell_h + GAP)
        ct2d = ct2d[r0 : r0 + nr, c0 : c0 + nc]
        h_px = max(1, int(round(nr * sr / mpp)))
        w_px = max(1, int(round(nc * scol / mpp)))
        x0 = cx + LETTER_M + (PANEL - w_px) // 2
        y0 = cy + CAPTION_H + LETTER_M + (PANEL - h_px) // 2
        # the image area (letterboxed in black)
        draw.rectangle(
            [
                cx + LETTER_M,
                cy + CAPTION_H + LETTER_M,
                cx + LETTER_M + PANEL - 1,
                cy + CAPTION_H + LETTER_M + PANEL - 1,
            ],
            fill=(0, 0, 0),
        )
        ct = np.clip((np.asarray(ct2d, dtype=np.float32) - lo_w) / (hi_w - lo_w), 0.0, 1.0) * 255.0
        tile = Image.fromarray(np.ascontiguousarray(ct, dtype=np.float32)).resize(
            (w_px, h_px), Image.Resampling.BILINEAR
        )
        grey = np.clip(np.asarray(tile) + 0.5, 0, 255).astype(np.uint8)
        rgb = np.repeat(grey[:, :, None], 3, axis=2)
        rows_i, cols_i = r0 + _nearest(nr, h_px), c0 + _nearest(nc, w_px)  # indices into the full slice
        if m2d is not None:
            md = np.asarray(m2d)[np.ix_(rows_i, cols_i)]
            rgb[outline(md)] = MASK_COLOUR
        img.paste(Image.fromarray(rgb), (x0, y0))
        box_px = None
        if brow is not None and bcol is not None:
            rs, cs = _span(rows_i, *brow), _span(cols_i, *bcol)
            if rs is not None and cs is not None:
                box_px = (x0 + cs[0], y0 + rs[0], x0 + cs[1], y0 + rs[1])
                draw.rectangle(list(box_px), outline=BOX_COLOUR, width=BOX_PX)

        # caption
        axis = _VIEW_AXIS[view]
        slice_axis = can.perm[axis]
        centre_c = list(centre)
        centre_c[axis] = k
        src_idx = can.to_source(tuple(centre_c))
        pos_letter_pos, pos_letter_neg, comp = _POSITION_LETTERS[axis]
        pos = float(sc.geometry.zyx_to_lps(src_idx)[comp])
        label = f"{view.capitalize()}  {_AXIS_NAMES[slice_axis]} {src_idx[slice_axis]}"
        if sc.grid == "source":
            label += f"  ·  {pos_letter_pos if pos >= 0 else pos_letter_neg} {abs(pos):.1f} mm"
        draw.text((cx + LETTER_M, cy + 3), label, font=f_caption, fill=TEXT_COLOUR)

        # orientation letters, just outside the image edges
        letters = can.letters(view)
        mx, my = x0 + w_px / 2, y0 + h_px / 2
        _text_center(draw, (mx, y0 - LETTER_M / 2), letters["top"], f_letter, LETTER_COLOUR)
        _text_center(draw, (mx, y0 + h_px + LETTER_M / 2), letters["bottom"], f_letter, LETTER_COLOUR)
        _text_center(draw, (x0 - LETTER_M / 2, my), letters["left"], f_letter, LETTER_COLOUR)
        _text_center(draw, (x0 + w_px + LETTER_M / 2, my), letters["right"], f_letter, LETTER_COLOUR)

        # scale bar (pixels are square: one mm per pixel for the panel)
        scale_mm = nice_scale_mm(mpp, PANEL)
        scale_px = int(round(scale_mm / mpp))
        bx, by = cx + LETTER_M, cy + CAPTION_H + PANEL + 2 * LETTER_M + 6
        draw.rectangle([bx, by, bx + scale_px - 1, by + 3], fill=SCALE_COLOUR)
        draw.text((bx + scale_px + 8, by - 6), f"{scale_mm:g} {unit}", font=f_small, fill=TEXT_COLOUR)

        panels.append(
            Panel(
                view=view,
                label=label,
                slice_index=int(src_idx[slice_axis]),
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
                scale_xy=(bx, by),
                box_px=box_px,
            )
        )
    return Montage(image=img, panels=panels, grid=sc.grid, window=sc.window, notes=sc.notes)


def render_montage(result: Any, path: Path | str) -> Path | None:
    """Write the montage PNG of a result's box/mask to ``path`` (atomically); ``None`` when there is nothing
    to show (no box and no or an empty mask)."""
    m = build_montage(result)
    if m is None:
        return None
    path = Path(path)
    with atomic_path(path) as tmp:
        m.image.save(tmp, format="PNG", optimize=False)
    return path
