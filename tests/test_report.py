"""Report rendering (montage PNG, study HTML, batch index) on synthetic studies, without running any model."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from m3d_edge.runtime.imaging.geometry import Geometry
from m3d_edge.runtime.imaging.mapping import box_from_mask, box_to_source, mask_to_source
from m3d_edge.runtime.imaging.preprocess import preprocess
from m3d_edge.runtime.imaging.study import Study
from m3d_edge.runtime.report import (
    build_montage,
    canonical_axes,
    direction_letters,
    orientation_letters,
    render_montage,
    write_batch_index,
    write_study_report,
)
from m3d_edge.runtime.report import montage as mt
from m3d_edge.runtime.result import Result

SHAPE = (20, 64, 64)  # (z, y, x)
SPACING = (2.5, 0.8, 0.7)  # anisotropic on purpose: (z, y, x) mm
ORIGIN = np.array([-20.0, -30.0, -100.0])
PROV = {
    "bundle_id": "tiny-phi3@0123abcd",
    "family": "phi3",
    "provider": {"vision": "CPUExecutionProvider", "decoder": "CPUExecutionProvider"},
    "precision": {"vision": "fp32", "decoder": "int8"},
}
TIMINGS = {"vision": 0.5, "prefill": 0.25, "decode_steps": [0.01] * 10, "total": 1.0}


def lps_affine(flip_x: bool = False, flip_y: bool = False) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, 0] = [-SPACING[2] if flip_x else SPACING[2], 0, 0]  # column direction * column spacing
    aff[:3, 1] = [0, -SPACING[1] if flip_y else SPACING[1], 0]
    aff[:3, 2] = [0, 0, SPACING[0]]
    aff[:3, 3] = ORIGIN
    return aff


def phantom() -> np.ndarray:
    _z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    hu = np.full(SHAPE, -1000.0, np.float32)
    hu[(x / 0.85) ** 2 + (y / 0.7) ** 2 < 1] = 40.0
    hu[((x - 0.3) / 0.2) ** 2 + (y / 0.2) ** 2 < 1] = 300.0
    return hu


def make_study(affine: np.ndarray) -> tuple[Study, np.ndarray, object]:
    geom = Geometry.from_affine(affine, SHAPE)
    hu = phantom()
    vol, rec = preprocess(hu, geometry=geom)
    study = Study(hu=hu, geometry=geom, kind="nifti", source_path=Path("phantom.nii.gz"))
    return study, vol[0], rec


def model_mask(w_range: tuple[int, int] = (60, 120)) -> np.ndarray:
    m = np.zeros((32, 256, 256), bool)
    m[10:22, 90:160, w_range[0] : w_range[1]] = True
    return m


def result(study=None, volume=None, record=None, box=None, mask=None, text="ok", question="q?") -> Result:
    return Result(
        question=question,
        task=None,
        text=text,
        tokens=[1, 2, 3],
        stop_reason="eos",
        box=box,
        mask=mask,
        timings=dict(TIMINGS),
        provenance=dict(PROV),
        volume=volume,
        study=study,
        record=record,
    )


@pytest.fixture(scope="module")
def lps():
    return make_study(lps_affine())


def rgb(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def is_colour(a: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    return np.all(a == np.asarray(colour, np.uint8), axis=-1)


def nearest(n_src: int, n_disp: int) -> np.ndarray:
    """The spec: display pixel p shows source cell floor((p + 0.5) * n_src / n_disp)."""
    return np.minimum(np.floor((np.arange(n_disp) + 0.5) * n_src / n_disp).astype(int), n_src - 1)


OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}


def lettered(a: np.ndarray) -> np.ndarray:
    """Pixels of the (orange) orientation letters, antialiasing included."""
    a = a.astype(int)
    return (a[..., 0] > 120) & (a[..., 0] - a[..., 2] > 50)


def panel_pixels(m, p) -> np.ndarray:
    return rgb(m.image)[p.y0 : p.y0 + p.height, p.x0 : p.x0 + p.width]


# ------------------------------------------------------------------------------------------ orientation


def test_direction_letters():
    assert direction_letters((1, 0, 0)) == "L"
    assert direction_letters((-1, 0, 0)) == "R"
    assert direction_letters((0, -1, 0)) == "A"
    assert direction_letters((0, 0, 2)) == "S"
    assert direction_letters((-0.866, -0.5, 0)) == "RA"
    assert direction_letters((0.99, 0.1, 0)) == "L"  # small components are left out


IDENTITY_LETTERS = {
    "axial": {"left": "R", "right": "L", "top": "A", "bottom": "P"},
    "coronal": {"left": "R", "right": "L", "top": "S", "bottom": "I"},
    "sagittal": {"left": "A", "right": "P", "top": "S", "bottom": "I"},
}


@pytest.mark.parametrize("flip_x, flip_y", [(False, False), (True, False), (True, True)])
def test_letters_are_radiological_for_flipped_lps_series(flip_x, flip_y):
    aff = lps_affine(flip_x, flip_y)
    assert orientation_letters(aff, SHAPE) == IDENTITY_LETTERS
    can = canonical_axes(aff, SHAPE)
    assert can.perm == (0, 1, 2)
    assert can.flip == (False, flip_y, flip_x)
    assert can.spacing == SPACING


def test_letters_for_a_coronal_acquisition_and_an_oblique_one():
    # slices step anterior -> posterior, rows go superior -> inferior, columns right -> left
    aff = np.eye(4)
    aff[:3, 0] = [1, 0, 0]
    aff[:3, 1] = [0, 0, -1]
    aff[:3, 2] = [0, 1, 0]
    can = canonical_axes(aff, (30, 40, 50))
    assert can.perm == (1, 0, 2) and can.flip == (True, False, False) and can.shape == (40, 30, 50)
    assert orientation_letters(aff, (30, 40, 50)) == IDENTITY_LETTERS
    # axial, rotated 30 degrees about the S axis: corners are oblique
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    aff = np.eye(4)
    aff[:3, 0] = [c, s, 0]
    aff[:3, 1] = [-s, c, 0]
    ax = orientation_letters(aff)["axial"]
    assert ax == {"left": "RA", "right": "LP", "top": "AL", "bottom": "PR"}


# ------------------------------------------------------------------------------------------ montage


def test_nothing_to_show_gives_none(tmp_path, lps):
    study, vol, rec = lps
    assert render_montage(result(study, vol, rec), tmp_path / "m.png") is None
    empty = np.zeros((32, 256, 256), bool)
    assert render_montage(result(study, vol, rec, mask=empty), tmp_path / "m.png") is None
    assert not (tmp_path / "m.png").exists()


def test_montage_png_written_atomically(tmp_path, lps):
    study, vol, rec = lps
    out = render_montage(result(study, vol, rec, mask=model_mask()), tmp_path / "sub" / "m.png")
    assert out == tmp_path / "sub" / "m.png"
    with Image.open(out) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.width > 600
    assert [p.name for p in out.parent.iterdir()] == ["m.png"]


def test_mask_outline_on_source_grid_not_filled(lps):
    study, vol, rec = lps
    mask = model_mask()
    m = build_montage(result(study, vol, rec, mask=mask))
    assert m.grid == "source" and m.window == (-160.0, 240.0)
    src = mask_to_source(mask, rec).astype(bool)
    views = [p.view for p in m.panels]
    assert views[-2:] == ["coronal", "sagittal"] and set(views[:-2]) == {"axial"}
    zs = [p.slice_index for p in m.panels if p.view == "axial"]
    zlo, zhi = np.nonzero(src.any(axis=(1, 2)))[0][[0, -1]]
    assert zs == sorted(zs, reverse=True) and zs[0] == zhi and zs[-1] == zlo and 2 <= len(zs) <= 6
    for p in m.panels:
        px = panel_pixels(m, p)
        if p.view == "axial":
            s2 = src[p.slice_index]
        elif p.view == "coronal":
            s2 = src[::-1, p.slice_index, :]  # superior at the top
        else:
            s2 = src[::-1, :, p.slice_index]
        disp = s2[np.ix_(nearest(s2.shape[0], p.height), nearest(s2.shape[1], p.width))]
        expected = mt.outline(disp, mt.OUTLINE_PX)
        got = is_colour(px, mt.MASK_COLOUR)
        assert disp.any(), p.label
        assert np.array_equal(got, expected), p.label
        interior = disp & ~expected
        assert interior.any(), p.label
        inner = px[interior]
        assert np.all(inner[:, 0] == inner[:, 1]) and np.all(inner[:, 1] == inner[:, 2]), "mask is filled"


def test_box_drawn_on_the_slices_it_spans(lps):
    study, vol, rec = lps
    mask = model_mask()
    mask[4:28, 100:140, 80:100] = True  # the mask reaches beyond the box in z
    box = (12 / 32, 100 / 256, 70 / 256, 18 / 32, 150 / 256, 110 / 256)
    m = build_montage(result(study, vol, rec, box=box, mask=mask))
    sb = box_to_source(box, rec)
    (z0, y0, x0), (z1, y1, x1) = sb.source_min, sb.source_max
    axial = [p for p in m.panels if p.view == "axial"]
    assert any(z0 <= p.slice_index <= z1 for p in axial)
    assert any(not z0 <= p.slice_index <= z1 for p in axial)
    for p in axial:
        px = panel_pixels(m, p)
        boxpx = is_colour(px, mt.BOX_COLOUR)
        if not z0 <= p.slice_index <= z1:
            assert p.box_px is None and not boxpx.any(), p.label
            continue
        rows, cols = nearest(SHAPE[1], p.height), nearest(SHAPE[2], p.width)
        r_in, c_in = np.nonzero((rows >= y0) & (rows <= y1))[0], np.nonzero((cols >= x0) & (cols <= x1))[0]
        top, bottom, left, right = r_in[0], r_in[-1], c_in[0], c_in[-1]
        assert p.box_px == (p.x0 + left, p.y0 + top, p.x0 + right, p.y0 + bottom)
        mid_r, mid_c = (top + bottom) // 2, (left + right) // 2
        for r, c in [(mid_r, left), (mid_r, right), (top, mid_c), (bottom, mid_c)]:
            assert boxpx[r, c], (p.label, r, c)
        assert not boxpx[mid_r, left - 1] and not boxpx[mid_r, right + 1]
        assert not boxpx[mid_r, mid_c]  # a rectangle, not a filled block
        # the box is drawn to scale: its width in pixels is its width in mm / (mm per pixel)
        assert abs((right - left + 1) - (x1 - x0 + 1) * SPACING[2] / p.mm_per_px) <= 1.5
        assert abs((bottom - top + 1) - (y1 - y0 + 1) * SPACING[1] / p.mm_per_px) <= 1.5
    cor = next(p for p in m.panels if p.view == "coronal")
    rows = nearest(SHAPE[0], cor.height)
    r_in = np.nonzero((SHAPE[0] - 1 - rows >= z0) & (SHAPE[0] - 1 - rows <= z1))[0]  # rows run S -> I
    assert cor.box_px is not None and cor.box_px[1] == cor.y0 + r_in[0] and cor.box_px[3] == cor.y0 + r_in[-1]


def test_reformats_and_scale_bar_respect_anisotropic_spacing(lps):
    study, vol, rec = lps
    m = build_montage(result(study, vol, rec, mask=model_mask()))
    extents = [n * s for n, s in zip(SHAPE, SPACING, strict=True)]  # 50, 51.2, 44.8 mm
    mm_px = max(extents) / mt.PANEL
    img = rgb(m.image)
    for p in m.panels:
        assert p.mm_per_px == pytest.approx(mm_px)
        h_mm, w_mm = {"axial": (extents[1], extents[2]), "coronal": (extents[0], extents[2])}.get(
            p.view, (extents[0], extents[1])
        )
        assert p.height == round(h_mm / mm_px) and p.width == round(w_mm / mm_px), p.label
        # bar length in pixels = labelled mm / mm per pixel
        assert p.scale_px == round(p.scale_mm / p.mm_per_px)
        assert p.scale_mm in mt.NICE_MM and 0.15 * mt.PANEL <= p.scale_px <= 0.4 * mt.PANEL
        bx, by = p.scale_xy
        row = is_colour(img[by + 1, bx - 2 : bx + p.scale_px + 4], mt.SCALE_COLOUR)
        assert row.sum() == p.scale_px and row[2 : 2 + p.scale_px].all()
    coronal = next(p for p in m.panels if p.view == "coronal")
    assert coronal.label.startswith("Coronal  y ") and "mm" in coronal.label
    ax = next(p for p in m.panels if p.view == "axial")
    z_mm = ORIGIN[2] + ax.slice_index * SPACING[0]
    assert ax.label.endswith(f"{'S' if z_mm >= 0 else 'I'} {abs(z_mm):.1f} mm")
    assert ax.label.startswith(f"Axial  z {ax.slice_index}")


@pytest.mark.parametrize("flip_x", [False, True])
def test_orientation_on_screen(flip_x):
    """Model-grid columns 0..40 are the patient's right (the model's voxel order), whatever the stored x."""
    study, vol, rec = make_study(lps_affine(flip_x=flip_x))
    m = build_montage(result(study, vol, rec, mask=model_mask((10, 50))))
    img = rgb(m.image)
    font = mt._font(mt.LETTER_FONT)
    for p in m.panels:
        assert p.letters == IDENTITY_LETTERS[p.view]
        if p.view == "axial":
            cols = np.nonzero(is_colour(panel_pixels(m, p), mt.MASK_COLOUR).any(axis=0))[0]
            on_right = cols.mean() > p.width / 2  # patient left is on image right
            assert not on_right, p.label
        # each letter is drawn centred just outside its image edge: compare with a reference rendering
        cx, cy = p.x0 + p.width / 2, p.y0 + p.height / 2
        spots = {
            "left": (p.x0 - mt.LETTER_M / 2, cy),
            "right": (p.x0 + p.width + mt.LETTER_M / 2, cy),
            "top": (cx, p.y0 - mt.LETTER_M / 2),
            "bottom": (cx, p.y0 + p.height + mt.LETTER_M / 2),
        }
        for side, (x, y) in spots.items():
            win = np.s_[int(y) - 12 : int(y) + 12, int(x) - 12 : int(x) + 12]
            got = lettered(img[win])
            for letter in (p.letters[side], OPPOSITE[p.letters[side]]):
                ref = Image.fromarray(np.zeros_like(img))
                mt._text_center(ImageDraw.Draw(ref), (x, y), letter, font, mt.LETTER_COLOUR)
                want = lettered(np.asarray(ref)[win])
                iou = (got & want).sum() / max(1, (got | want).sum())
                assert want.sum() > 10 and (iou > 0.9) == (letter == p.letters[side]), (p.label, side, letter)


def test_model_grid_fallback(lps):
    _, vol, _ = lps
    mask = model_mask()
    box = tuple(box_from_mask(mask))
    m = build_montage(result(volume=vol, box=box, mask=mask))
    assert m.grid == "model" and m.window == (0.0, 1.0)
    ax = next(p for p in m.panels if p.view == "axial")
    assert "mm" not in ax.label  # no patient geometry: no millimetre positions
    # a small region on a 256-voxel slice: the axial views zoom (square crop around the region)
    r0, c0, nr, nc = ax.crop
    fov = max(mt.ZOOM_MIN_MM, mt.ZOOM_CONTEXT * 70)  # the region is 70 x 60 voxels in-plane
    assert nr == nc == int(np.ceil(fov)) < 256 and ax.width == ax.height == mt.PANEL
    assert r0 <= 90 and r0 + nr >= 160 and c0 <= 60 and c0 + nc >= 120  # the region is inside
    assert ax.mm_per_px == pytest.approx(nr / mt.PANEL)
    assert ax.scale_px == round(ax.scale_mm / ax.mm_per_px)
    s2 = mask[ax.slice_index]
    disp = s2[np.ix_(r0 + nearest(nr, ax.height), c0 + nearest(nc, ax.width))]
    got = is_colour(panel_pixels(m, ax), mt.MASK_COLOUR)
    # the box (drawn over the mask) hides the outline where they coincide; elsewhere they match exactly
    boxpx = is_colour(panel_pixels(m, ax), mt.BOX_COLOUR)
    assert np.array_equal(got, mt.outline(disp) & ~boxpx) and boxpx.any()
    assert (ax.box_px[2] - ax.box_px[0] + 1) == pytest.approx(
        (box_hi(box, 2) - box_lo(box, 2) + 1) / ax.mm_per_px, abs=1.5
    )
    cor = next(p for p in m.panels if p.view == "coronal")
    assert cor.crop == (0, 0, 32, 256) and cor.mm_per_px == pytest.approx(256 / mt.PANEL)
    assert cor.height == round(32 / cor.mm_per_px)  # 1 unit per voxel on every axis


def box_lo(box, ax: int) -> int:
    return round(box[ax] * (32, 256, 256)[ax])


def box_hi(box, ax: int) -> int:
    return round(box[ax + 3] * (32, 256, 256)[ax])


# ------------------------------------------------------------------------------------------ html


def test_study_report_is_escaped_self_contained_and_complete(tmp_path, lps):
    study, vol, rec = lps
    mask = model_mask()
    box = (12 / 32, 100 / 256, 70 / 256, 18 / 32, 150 / 256, 110 / 256)
    evil = "<script>alert('x')</script> & <img src=http://example.com/x.png>"
    results = [
        result(study, vol, rec, box=box, text=evil, question="Where? <b>bold</b>"),
        result(study, vol, rec, mask=mask, text="It is [SEG]."),
        result(study, vol, rec, text="Just text."),
    ]
    path = write_study_report(results, tmp_path / "s1", title="Study <1>")
    assert path == tmp_path / "s1" / "report.html"
    page = path.read_text(encoding="utf-8")
    assert "<script" not in page.lower() and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "<b>bold</b>" not in page and "Study &lt;1&gt;" in page
    assert 'src="http' not in page and "<img src=http" not in page
    assert not re.search(r"""<[^>]*\s(src|href)\s*=\s*["']?\s*(https?:|//)""", page, re.I)  # in real tags
    assert "<link" not in page.lower() and "@import" not in page and "url(" not in page
    assert page.count('src="data:image/png;base64,') == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["montage-0.png", "montage-1.png", "report.html"]
    assert "not a diagnosis" in page.lower()
    # box: normalized and patient millimetres from box_to_source
    sb = box_to_source(box, rec)
    assert "(0.375, 0.391, 0.273, 0.562, 0.586, 0.430)" in page
    assert "(" + ", ".join(f"{v:.1f}" for v in sb.mm_center) + ")" in page
    assert f"{sb.source_min} – {sb.source_max}" in page
    # mask: voxel counts and mL on the source spacing
    n_src = int(mask_to_source(mask, rec).sum())
    assert f"{n_src:,}" in page and f"{int(mask.sum()):,}" in page
    assert f"{n_src * np.prod(SPACING) / 1000:.2f} mL" in page
    # provenance and timings
    for s in ("tiny-phi3@0123abcd", "CPUExecutionProvider", "int8", "500.0 ms", "100.0 ms (10 steps"):
        assert s in page, s
    # no patient name fields: nothing is read from DICOM headers
    assert "PatientName" not in page and "patient name" not in page.lower()


def test_study_report_with_given_montages(tmp_path, lps):
    study, vol, rec = lps
    r = result(study, vol, rec, mask=model_mask())
    png = render_montage(r, tmp_path / "mine.png")
    path = write_study_report([r, result(study, vol, rec)], tmp_path / "out", montages=[png, None])
    page = path.read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.html"]
    with pytest.raises(ValueError, match="2 results"):
        write_study_report([r, r], tmp_path / "bad", montages=[png])


def test_model_grid_report_has_no_mm(tmp_path, lps):
    _, vol, _ = lps
    r = result(volume=vol, box=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6), mask=model_mask())
    page = write_study_report([r], tmp_path).read_text(encoding="utf-8")
    assert "unknown (no source geometry)" in page and "LPS mm" not in page
    assert "(3, 51, 77) – (13, 128, 154)" in page


def test_batch_index_lists_failures(tmp_path):
    entries = [
        {"name": "study-a", "status": "ok", "report": "study-a/report.html", "error": None},
        {"name": "study b <x>", "status": "failed", "report": None, "error": "StudyError: <missing> slices"},
        {"name": "c", "status": "ok", "report": "c dir/report.html", "error": None},
    ]
    page = write_batch_index(entries, tmp_path).read_text(encoding="utf-8")
    assert (tmp_path / "index.html").exists()
    assert 'href="study-a/report.html"' in page and 'href="c%20dir/report.html"' in page
    assert "3 studies: 2 ok, 1 failed" in page
    failures = page[page.index('id="failures"') :]
    assert "study b &lt;x&gt;" in failures and "StudyError: &lt;missing&gt; slices" in failures
    assert "study-a" not in failures
    assert "<missing>" not in page and not re.search(r"""href\s*=\s*["']?https?:""", page)


def test_report_package_is_light():
    code = (
        "import sys, m3d_edge.runtime.report\n"
        "bad = [m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
