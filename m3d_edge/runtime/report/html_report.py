"""Self-contained HTML reports: one page per study (``report.html``) and a batch index (``index.html``).

Everything is inline (CSS, montages as base64 PNG data URIs); nothing is fetched when the page is opened.
All text coming from the model or the user is HTML-escaped. No patient identifiers are shown: a
:class:`Result` carries none, and nothing is read from DICOM headers here.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

import m3d_edge
from m3d_edge.errors import StudyError
from m3d_edge.fileio import atomic_write_text
from m3d_edge.runtime.imaging.mapping import box_to_source, mask_to_source
from m3d_edge.runtime.report.montage import BOX_COLOUR, MASK_COLOUR, render_montage
from m3d_edge.runtime.result import identity_record

DISCLAIMER = (
    "These values were produced automatically by a machine-learning model (M3D-LaMed, run by m3d-edge). "
    "They are not a diagnosis and not for clinical use: the text, boxes, masks and volumes can be wrong "
    "and must be reviewed by a qualified professional."
)

_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  margin: 0; background: #f4f5f7; color: #1d1f23; line-height: 1.45; font-size: 15px; }
main { max-width: 1320px; margin: 0 auto; padding: 20px 24px 40px; }
h1 { font-size: 24px; margin: 4px 0 6px; }
h2 { font-size: 19px; margin: 0 0 10px; }
h3 { font-size: 13px; text-transform: uppercase; letter-spacing: .06em; color: #5b6270; margin: 16px 0 6px; }
.meta { color: #5b6270; font-size: 13px; }
.notice { background: #fff4d6; border: 1px solid #e2b93b; border-left: 6px solid #d99a00; padding: 10px 14px;
  border-radius: 6px; margin: 14px 0 18px; font-size: 14px; }
.card { background: #fff; border: 1px solid #dde0e6; border-radius: 8px; padding: 16px 20px; margin: 0 0 18px;
  box-shadow: 0 1px 2px rgba(0,0,0,.04); }
.qa { display: grid; grid-template-columns: 110px 1fr; gap: 6px 14px; margin-bottom: 6px; }
.qa .k { color: #5b6270; font-weight: 600; }
.answer { white-space: pre-wrap; word-break: break-word; background: #f7f8fa; border: 1px solid #e6e8ec;
  border-radius: 6px; padding: 8px 10px; margin: 0; font-family: inherit; }
.cols { display: grid; grid-template-columns: repeat(auto-fit, minmax(300px, 1fr)); gap: 0 28px; }
table { border-collapse: collapse; width: 100%; font-size: 13.5px; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #eceef1; vertical-align: top; }
th { color: #5b6270; font-weight: 600; width: 38%; }
td.num, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600;
  background: #e8eaf0; color: #3a4050; vertical-align: middle; margin-left: 8px; }
.ok { background: #dcf2e3; color: #17663a; }
.failed { background: #fbe0e0; color: #a11d1d; }
.swatch { display: inline-block; width: 14px; height: 10px; vertical-align: middle; margin: 0 4px 0 10px; }
figure { margin: 12px 0 0; }
figure img { width: 100%; height: auto; display: block; border-radius: 6px; background: #16161a; }
figcaption { font-size: 12.5px; color: #5b6270; margin-top: 6px; }
.none { color: #8a909c; font-style: italic; }
footer { color: #8a909c; font-size: 12px; margin-top: 24px; }
a { color: #1f5fbf; }
"""


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _range(lo: object, hi: object) -> str:
    """``lo`` to ``hi`` in monospace (the first and last voxel of a range)."""
    return f'<span class="mono">{_e(lo)} – {_e(hi)}</span>'


def _num(v: float, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{float(v):.{nd}f}"


def _tuple(vals: Sequence[float], nd: int = 1) -> str:
    return "(" + ", ".join(_num(v, nd) if isinstance(v, float) else str(v) for v in vals) + ")"


def _rows(rows: Sequence[tuple[str, str]]) -> str:
    return "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)


def _table(rows: Sequence[tuple[str, str]]) -> str:
    return f"<table>{_rows(rows)}</table>" if rows else '<p class="none">none</p>'


def _value(v: Any) -> str:
    """A provenance value as escaped HTML: dicts as ``name: value`` lines, lists comma-joined."""
    if isinstance(v, Mapping):
        if not v:
            return '<span class="none">none</span>'
        return "<br>".join(f'<span class="mono">{_e(k)}</span>: {_value(x)}' for k, x in v.items())
    if isinstance(v, list | tuple):
        return _e(", ".join(str(x) for x in v))
    if v is None:
        return '<span class="none">n/a</span>'
    return _e(v)


def _png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _record(result: Any) -> Any:
    return getattr(result, "record", None)


def _box_rows(result: Any) -> tuple[list[tuple[str, str]], list[str]]:
    rows: list[tuple[str, str]] = []
    notes: list[str] = []
    box = result.box
    rows.append(("normalized [d1, h1, w1, d2, h2, w2]", f'<span class="mono">{_e(_tuple(box, 3))}</span>'))
    rec = _record(result)
    if rec is None:
        try:
            sb = box_to_source(box, identity_record())
        except StudyError as exc:
            notes.append(f"box could not be mapped: {exc}")
            return rows, notes
        rows.append(
            (
                "model grid voxels (z, y, x)",
                _range(sb.grid_min, sb.grid_max),
            )
        )
        notes.append("no source geometry: no patient (mm) coordinates for the box")
        return rows, notes
    try:
        sb = box_to_source(box, rec)
    except StudyError as exc:
        notes.append(f"box could not be mapped: {exc}")
        return rows, notes
    sp = rec.source_geometry.spacing
    size = tuple((sb.source_max[a] - sb.source_min[a] + 1) * sp[a] for a in range(3))
    rows += [
        ("model grid voxels (z, y, x)", _range(sb.grid_min, sb.grid_max)),
        ("source voxels (z, y, x)", _range(sb.source_min, sb.source_max)),
        ("first voxel centre, LPS mm", f'<span class="mono">{_e(_tuple(sb.mm_min))}</span>'),
        ("last voxel centre, LPS mm", f'<span class="mono">{_e(_tuple(sb.mm_max))}</span>'),
        ("centre, LPS mm", f'<span class="mono">{_e(_tuple(sb.mm_center))}</span>'),
        ("extent (z, y, x) mm", f'<span class="mono">{_e(_tuple(size))}</span>'),
    ]
    if rec.identity:
        notes.append("the input was already on the model grid; millimetres use its nominal spacing")
    return rows, notes


def mask_stats(result: Any) -> dict[str, Any]:
    """Voxel counts (model and source grid) and volume in mL (source spacing) of a result's mask."""
    m = np.asarray(result.mask)
    out: dict[str, Any] = {"model_voxels": int((m > 0.5).sum() if m.dtype.kind == "f" else (m != 0).sum())}
    rec = _record(result)
    if rec is not None:
        src = mask_to_source(m, rec)
        sp = rec.source_geometry.spacing
        out["source_voxels"] = int(src.sum())
        out["voxel_mm3"] = float(np.prod(sp))
        out["volume_ml"] = out["source_voxels"] * out["voxel_mm3"] / 1000.0
    return out


def _mask_rows(result: Any) -> tuple[list[tuple[str, str]], list[str]]:
    st = mask_stats(result)
    rows = [("voxels on the model grid", f"{st['model_voxels']:,}")]
    notes: list[str] = []
    if "source_voxels" in st:
        rows.append(("voxels on the source grid", f"{st['source_voxels']:,}"))
        rows.append(("voxel size", f"{st['voxel_mm3']:.4g} mm³"))
        rows.append(("volume", f"<b>{st['volume_ml']:.2f} mL</b>"))
        if _record(result).identity:
            notes.append("the input was already on the model grid; the volume uses its nominal spacing")
    else:
        rows.append(("volume", '<span class="none">unknown (no source geometry)</span>'))
    return rows, notes


def _timing_rows(result: Any) -> list[tuple[str, str]]:
    t = dict(result.timings or {})
    steps = t.pop("decode_steps", None)
    t.pop("cached_study", None)  # shown as "reused" on the encoder rows instead
    rows: list[tuple[str, str]] = []
    order = ["vision", "prefill", "seg_encoder", "seg_decoder", "total"]
    for k in order + sorted(k for k in t if k not in order):
        v = t.get(k)
        if k in ("vision", "seg_encoder") and v == 0.0:
            rows.append((k, '<span class="none">reused from an earlier question on this study</span>'))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            rows.append((k, f'<span class="mono">{float(v) * 1000:.1f} ms</span>'))
        elif v is not None:
            rows.append((k, _value(v)))
    if isinstance(steps, list | tuple):
        total = float(sum(steps))
        rate = f", {len(steps) / total:.1f} tokens/s" if steps and total > 0 else ""
        rows.insert(
            min(2, len(rows)),
            ("decode", f'<span class="mono">{total * 1000:.1f} ms ({len(steps)} steps{rate})</span>'),
        )
    return rows


def _study_rows(result: Any) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    study, rec = getattr(result, "study", None), _record(result)
    if study is not None:
        rows.append(("input kind", _e(getattr(study, "kind", "?"))))
        if getattr(study, "series_number", None) is not None:
            rows.append(("series number", _e(study.series_number)))
    if rec is not None:
        g = rec.source_geometry
        rows.append(("source grid (z, y, x)", f'<span class="mono">{_e(tuple(rec.source_shape))}</span>'))
        rows.append(("spacing (z, y, x) mm", f'<span class="mono">{_e(_tuple(g.spacing, 3))}</span>'))
        rows.append(
            (
                "crop (z, y, x)",
                _range(tuple(rec.crop_start), tuple(rec.crop_stop)),
            )
        )
        rows.append(("preprocessing window", _e(rec.window)))
    if not rows:
        rows.append(("input", "model-grid volume (no source geometry)"))
    return rows


def _result_section(i: int, result: Any, montage: Path | None, out_dir: Path) -> str:
    parts = [f'<section class="card" id="q{i + 1}">']
    task = f'<span class="badge">{_e(result.task)}</span>' if getattr(result, "task", None) else ""
    parts.append(f"<h2>Question {i + 1}{task}</h2>")
    parts.append('<div class="qa">')
    parts.append(f'<div class="k">Question</div><div>{_e(result.question)}</div>')
    parts.append(f'<div class="k">Answer</div><pre class="answer">{_e(result.text)}</pre>')
    stop = getattr(result, "stop_reason", None)
    n_tok = len(getattr(result, "tokens", []) or [])
    parts.append(f'<div class="k">Generation</div><div class="meta">{n_tok} tokens, stop: {_e(stop)}</div>')
    parts.append("</div>")

    notes: list[str] = []
    left = ["<h3>Box</h3>"]
    if result.box is not None:
        rows, n = _box_rows(result)
        notes += n
        left.append(_table(rows))
    else:
        left.append('<p class="none">no box in the answer</p>')
    left.append("<h3>Mask</h3>")
    if result.mask is not None:
        rows, n = _mask_rows(result)
        notes += n
        left.append(_table(rows))
    else:
        left.append('<p class="none">no mask (the answer has no [SEG] token)</p>')

    right = ["<h3>Provenance</h3>"]
    prov = dict(getattr(result, "provenance", None) or {})
    prov_rows = []
    for key, label in (("bundle_id", "bundle"), ("family", "model family"), ("producer", "producer")):
        if key in prov:
            prov_rows.append((label, _value(prov.pop(key))))
    for key, label in (("provider", "providers"), ("precision", "precisions")):
        if key in prov:
            prov_rows.append((label, _value(prov.pop(key))))
    prov_rows += [(k, _value(v)) for k, v in prov.items()]
    right.append(_table(prov_rows))
    right.append("<h3>Timings</h3>")
    right.append(_table(_timing_rows(result)))
    parts.append(f'<div class="cols"><div>{"".join(left)}</div><div>{"".join(right)}</div></div>')
    if notes:
        parts.append("".join(f'<p class="meta">Note: {_e(n)}</p>' for n in notes))

    if montage is not None and Path(montage).exists():
        if getattr(result, "record", None) is not None and getattr(result, "study", None) is not None:
            orient = "source grid, radiological orientation: patient right on image left"
        else:
            orient = "model grid, no patient geometry: orientation letters are nominal"
        parts.append(
            f'<figure><img alt="Montage for question {i + 1}: axial slices, coronal and sagittal reformats" '
            f'src="{_png_data_uri(Path(montage))}">'
            f"<figcaption>Axial slices through the region, coronal and sagittal reformats through its centre "
            f"({orient})."
            f'<span class="swatch" style="background:rgb{MASK_COLOUR}"></span>mask outline'
            f'<span class="swatch" style="background:rgb{BOX_COLOUR}"></span>box</figcaption></figure>'
        )
    elif montage is not None:
        parts.append(f'<p class="meta">Montage missing: {_e(Path(montage).name)}</p>')
    elif result.box is not None or result.mask is not None:
        parts.append('<p class="none">no montage (nothing to show)</p>')
    parts.append("</section>")
    return "".join(parts)


def _page(title: str, body: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        "style-src 'unsafe-inline'\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>"
        f"{body}"
        f"<footer>Generated {stamp} by m3d-edge {_e(m3d_edge.__version__)}. {_e(DISCLAIMER)}</footer>"
        "</main></body></html>\n"
    )


def write_study_report(
    results: Sequence[Any],
    out_dir: Path | str,
    *,
    montages: Sequence[Path | None] | None = None,
    title: str | None = None,
) -> Path:
    """Write ``out_dir/report.html`` for the answers on one study (self-contained; returns its path).

    ``montages[i]`` is the PNG of ``results[i]`` (None: no picture); when ``montages`` is not given they are
    rendered into ``out_dir/montage-<i>.png`` (i from 0; results without box or mask get none).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = list(results)
    if montages is None:
        montages = [render_montage(r, out_dir / f"montage-{i}.png") for i, r in enumerate(results)]
    elif len(montages) != len(results):
        raise ValueError(f"{len(montages)} montages given for {len(results)} results")
    title = title or "M3D-LaMed study report"
    body = [f"<h1>{_e(title)}</h1>"]
    body.append(f'<div class="notice" role="note"><b>Not a diagnosis.</b> {_e(DISCLAIMER)}</div>')
    if results:
        body.append(f'<section class="card"><h2>Study</h2>{_table(_study_rows(results[0]))}')
        body.append(
            f'<p class="meta">{len(results)} question{"s" if len(results) != 1 else ""}: '
            + ", ".join(f'<a href="#q{i + 1}">{i + 1}</a>' for i in range(len(results)))
            + "</p></section>"
        )
    else:
        body.append('<p class="none">no results</p>')
    for i, (r, m) in enumerate(zip(results, montages, strict=True)):
        body.append(_result_section(i, r, m, out_dir))
    path = out_dir / "report.html"
    atomic_write_text(path, _page(title, "".join(body)))
    return path


def write_batch_index(entries: Sequence[Mapping[str, Any]], out_dir: Path | str) -> Path:
    """Write ``out_dir/index.html`` linking every study's report; failed studies are listed with their error.

    Each entry: ``{"name", "status": "ok" | "failed", "report": path relative to out_dir or None,
    "error": str or None}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = list(entries)
    n_ok = sum(1 for e in entries if e.get("status") == "ok")
    failed = [e for e in entries if e.get("status") != "ok"]
    body = ["<h1>M3D-LaMed batch</h1>"]
    body.append(f'<div class="notice" role="note"><b>Not a diagnosis.</b> {_e(DISCLAIMER)}</div>')
    body.append(
        f'<p class="meta">{len(entries)} studies: {n_ok} ok, {len(failed)} failed.</p>'
        '<section class="card"><table><tr><th style="width:auto">Study</th><th style="width:90px">Status</th>'
        '<th style="width:auto">Report / error</th></tr>'
    )
    for e in entries:
        name = str(e.get("name", "?"))
        status = str(e.get("status", "failed"))
        cls = "ok" if status == "ok" else "failed"
        report = e.get("report")
        if report:
            href = quote(Path(report).as_posix(), safe="/")
            link = f'<a href="{_e(href)}">{_e(Path(report).as_posix())}</a>'
        else:
            link = '<span class="none">no report</span>'
        err = f'<div class="mono">{_e(e["error"])}</div>' if e.get("error") else ""
        body.append(
            f'<tr><td>{_e(name)}</td><td><span class="badge {cls}">{_e(status)}</span></td>'
            f"<td>{link}{err}</td></tr>"
        )
    body.append("</table></section>")
    if failed:
        body.append('<section class="card" id="failures"><h2>Failures</h2><table>')
        body.append(_rows([(str(e.get("name", "?")), _e(e.get("error") or "unknown error")) for e in failed]))
        body.append("</table></section>")
    path = out_dir / "index.html"
    atomic_write_text(path, _page("M3D-LaMed batch", "".join(body)))
    return path
