"""DICOM Structured Report for one answer: Comprehensive 3D SR on TID 1500 (Measurement Report).

    write_dicom_sr(result, study, "out/result_sr.dcm", bundle_id=..., seg_path="out/result_seg.dcm")
    read_dicom_sr("out/result_sr.dcm")   # -> SRContent(question, text, notice, box corners, SEG UID, ...)

Content tree (under the TID 1500 root, device observer = m3d-edge):

* measurement group ``answer`` (TID 1501) with the algorithm identification (TID 4019: name ``m3d-edge``,
  version = m3d-edge version, parameters = ``bundle=<id>``, ``precision=<graph:precision,...>``) and three
  TEXT items: the question (``(question, 99M3DEDGE, "Question")``), the generated text
  (``(answer, 99M3DEDGE, "Generated text")``) and the "not a diagnosis" notice (``(121106, DCM, "Comment")``);
* measurement group ``box`` (TID 1411), when the answer has a box and the study has patient space: a volume
  surface of six closed SCOORD3D polygons (the faces of the box) in the source series' frame of reference.
  The box covers the source voxels ``source_min..source_max`` (inclusive) to their outer edges, so face 0
  is the z-low face with vertices (z,y,x) = (lo,lo,lo), (lo,lo,hi), (lo,hi,hi), (lo,hi,lo) in voxel-edge
  coordinates, face 1 the z-high face in the same order; :func:`read_dicom_sr` inverts that;
* measurement group ``mask`` (TID 1411), when a DICOM SEG was written: a reference to its segment 1.

The source series is referenced by UID (evidence and the volume surface's source series). Source files that
omit Type 2 patient/study attributes (de-identified series often do) are completed with empty values in
the copies handed to highdicom; the source datasets are never changed.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset

from m3d_edge import __version__
from m3d_edge.errors import StudyError
from m3d_edge.fileio import atomic_path

if TYPE_CHECKING:  # pragma: no cover
    from highdicom.sr import CodedConcept

    from m3d_edge.runtime.imaging.geometry import Geometry

SCHEME = "99M3DEDGE"  # local coding scheme (DICOM PS3.16: designators starting "99" are private)
QUESTION = ("question", "Question")
ANSWER = ("answer", "Generated text")
NOTICE_CODE = ("121106", "DCM", "Comment")
TRACK_ANSWER, TRACK_BOX, TRACK_MASK = "answer", "box", "mask"
NOTICE = (
    "Not a diagnosis. Generated automatically by a machine-learning model (M3D-LaMed, run by m3d-edge); "
    "not for clinical use: the text, box and mask can be wrong and must be reviewed by a qualified "
    "professional."
)

# Type 2 attributes of the patient/study/equipment modules that highdicom copies from the evidence
_TYPE2 = (
    ("PatientName", ""),
    ("PatientID", ""),
    ("PatientBirthDate", ""),
    ("PatientSex", ""),
    ("StudyDate", ""),
    ("StudyTime", ""),
    ("ReferringPhysicianName", ""),
    ("StudyID", ""),
    ("AccessionNumber", ""),
)
PIXEL_DATA = 0x7FE00010
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass(frozen=True)
class SRContent:
    """What :func:`read_dicom_sr` recovers from an SR written here."""

    question: str
    text: str
    notice: str
    algorithm: dict[str, Any]  # name, version, parameters
    box_corners_lps: np.ndarray | None  # [8, 3] float, voxel-edge corners in (z,y,x) lo/hi product order
    frame_of_reference_uid: str | None
    seg_sop_instance_uid: str | None
    study_instance_uid: str
    source_series_instance_uid: str | None
    sop_instance_uid: str


def clean_text(text: str) -> str:
    """Text as a DICOM UT value: control characters other than TAB, LF, CR become spaces."""
    return _CONTROL.sub(" ", str(text))


def _evidence(datasets: list[Any]) -> list[Any]:
    """Copies of the source headers with absent Type 2 attributes present and empty (pixels dropped)."""
    out = []
    for ds in datasets:
        c = Dataset({e.tag: e for e in ds if e.tag != PIXEL_DATA})  # new top level; elements shared
        for key, empty in _TYPE2:
            if key not in c:
                setattr(c, key, empty)
        out.append(c)
    return out


def _code(value: str, scheme: str, meaning: str) -> CodedConcept:
    import highdicom as hd

    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def box_faces(corners: np.ndarray) -> list[np.ndarray]:
    """Six closed polygons (5 points each) from 8 corners in (z,y,x) lo/hi product order."""
    c = {key: corners[i] for i, key in enumerate(itertools.product((0, 1), repeat=3))}
    quads = [
        [(0, 0, 0), (0, 0, 1), (0, 1, 1), (0, 1, 0)],  # z low
        [(1, 0, 0), (1, 0, 1), (1, 1, 1), (1, 1, 0)],  # z high
        [(0, 0, 0), (0, 0, 1), (1, 0, 1), (1, 0, 0)],  # y low
        [(0, 1, 0), (0, 1, 1), (1, 1, 1), (1, 1, 0)],  # y high
        [(0, 0, 0), (0, 1, 0), (1, 1, 0), (1, 0, 0)],  # x low
        [(0, 0, 1), (0, 1, 1), (1, 1, 1), (1, 0, 1)],  # x high
    ]
    return [np.array([c[k] for k in q] + [c[q[0]]], dtype=np.float64) for q in quads]


def box_corners(source_min: Sequence[int], source_max: Sequence[int], geometry: Geometry) -> np.ndarray:
    """The 8 voxel-edge corners (LPS mm) of the voxels ``source_min..source_max``, lo/hi product order."""
    lo = np.asarray(source_min, dtype=np.float64) - 0.5
    hi = np.asarray(source_max, dtype=np.float64) + 0.5
    pts = [[(lo, hi)[b][a] for a, b in enumerate(bits)] for bits in itertools.product((0, 1), repeat=3)]
    return geometry.zyx_to_lps(np.asarray(pts))


def write_dicom_sr(
    result: Any,
    study: Any,
    path: Path | str,
    *,
    bundle_id: str,
    seg_path: Path | str | None = None,
    series_number: int = 902,
) -> Path:
    """Write ``result`` (question, text, box, SEG reference) as a Comprehensive 3D SR, atomically."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    path = Path(path)
    name = f"series {study.series_number}" if getattr(study, "series_number", None) is not None else "study"
    if getattr(study, "kind", None) != "dicom" or not getattr(study, "source_datasets", None):
        raise StudyError(f"{name}: a DICOM SR needs a DICOM source series (this study is {study.kind})")
    evidence = _evidence(list(study.source_datasets))
    first = evidence[0]
    frame_uid = getattr(first, "FrameOfReferenceUID", None)

    precisions = result.provenance.get("precision") or {}
    params = [f"bundle={bundle_id}"[:64]]
    if precisions:
        params.append(("precision=" + ",".join(f"{k}:{v}" for k, v in sorted(precisions.items())))[:64])
    algo = hd.sr.AlgorithmIdentification(name="m3d-edge", version=__version__, parameters=params)

    answer = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=TRACK_ANSWER),
        algorithm_id=algo,
    )
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    for (value, meaning), text in ((QUESTION, result.question), (ANSWER, result.text)):
        item = hd.sr.TextContentItem(
            _code(value, SCHEME, meaning), clean_text(text), relationship_type=contains
        )
        answer[0].ContentSequence.append(item)
    answer[0].ContentSequence.append(
        hd.sr.TextContentItem(_code(*NOTICE_CODE), NOTICE, relationship_type=contains)
    )
    groups: list[Any] = [answer]

    source_series = hd.sr.SourceSeriesForSegmentation(study.series_instance_uid)
    if result.box and result.has_patient_space() and frame_uid:
        from m3d_edge.runtime.imaging.mapping import box_to_source

        sb = box_to_source(result.box, result.record)
        corners = box_corners(sb.source_min, sb.source_max, result.record.source_geometry)
        surface = hd.sr.VolumeSurface(
            graphic_type=hd.sr.GraphicTypeValues3D.POLYGON,
            graphic_data=box_faces(corners),
            frame_of_reference_uid=frame_uid,
            source_series=source_series,
        )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=TRACK_BOX),
                referenced_volume_surface=surface,
                algorithm_id=algo,
            )
        )
    if seg_path is not None:
        seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=TRACK_MASK),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=seg.SOPClassUID,
                    sop_instance_uid=seg.SOPInstanceUID,
                    segment_number=1,
                    source_series=source_series,
                ),
                algorithm_id=algo,
            )
        )
        evidence.append(seg)

    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name="m3d-edge", manufacturer_name="m3d-edge", model_name=str(bundle_id)[:64]
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups,
    )
    try:
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report[0],
            series_instance_uid=hd.UID(),
            series_number=int(series_number),
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="m3d-edge",
            series_description="M3D answer (not a diagnosis)",
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise StudyError(f"{name}: cannot build a DICOM SR: {exc}") from exc
    sr.SpecificCharacterSet = "ISO_IR 192"  # the generated text may hold any character
    with atomic_path(path) as tmp:
        sr.save_as(tmp, enforce_file_format=True)
    return path


def read_dicom_sr(path: Path | str) -> SRContent:
    """Read an SR written by :func:`write_dicom_sr` with highdicom; raises StudyError if it is not one."""
    import highdicom as hd

    path = Path(path)
    try:
        sr = hd.sr.srread(path)
        content = sr.content  # typed as highdicom's ContentSequence base; here a TID 1500 MeasurementReport
        image_groups = content.get_image_measurement_groups()  # type: ignore[attr-defined]
        roi_groups = content.get_volumetric_roi_measurement_groups()  # type: ignore[attr-defined]
        groups = {str(g.tracking_identifier): g for g in image_groups}
        groups.update({str(g.tracking_identifier): g for g in roi_groups})
    except Exception as exc:
        raise StudyError(f"{path}: cannot read a DICOM SR ({type(exc).__name__}: {exc})") from exc
    if TRACK_ANSWER not in groups:
        raise StudyError(f"{path}: not an m3d-edge SR (no '{TRACK_ANSWER}' measurement group)")
    items = list(_walk(groups[TRACK_ANSWER]))
    texts = {_concept(i): str(i.TextValue) for i in items if i.ValueType == "TEXT"}
    algorithm = {
        "name": texts.get(("111001", "DCM")),
        "version": texts.get(("111003", "DCM")),
        "parameters": [
            str(i.TextValue) for i in items if i.ValueType == "TEXT" and _concept(i) == ("111002", "DCM")
        ],
    }
    corners = frame_uid = seg_uid = None
    series_uid = _uidref(_walk(sr.ContentSequence), ("121232", "DCM")) or _source_series(sr)
    box = groups.get(TRACK_BOX)
    if box is not None:
        faces = [
            np.asarray(s.GraphicData, dtype=np.float64).reshape(-1, 3)
            for s in box.roi
            if s.ValueType == "SCOORD3D"
        ]
        if len(faces) != 6 or any(f.shape != (5, 3) for f in faces):
            raise StudyError(f"{path}: the box surface is not six closed quadrilaterals")
        order = [0, 1, 3, 2]  # face vertex index of (y, x) lo/hi in product order
        corners = np.array(
            [faces[bz][order[2 * by + bx]] for bz, by, bx in itertools.product((0, 1), repeat=3)]
        )
        frame_uid = str(box.roi[0].ReferencedFrameOfReferenceUID)
    mask = groups.get(TRACK_MASK)
    if mask is not None:
        seg_uid = str(mask.referenced_segment[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    return SRContent(
        question=texts.get((QUESTION[0], SCHEME), ""),
        text=texts.get((ANSWER[0], SCHEME), ""),
        notice=texts.get(NOTICE_CODE[:2], ""),
        algorithm=algorithm,
        box_corners_lps=corners,
        frame_of_reference_uid=frame_uid,
        seg_sop_instance_uid=seg_uid,
        study_instance_uid=str(sr.StudyInstanceUID),
        source_series_instance_uid=series_uid,
        sop_instance_uid=str(sr.SOPInstanceUID),
    )


def box_source_voxels(corners: np.ndarray, geometry: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Invert :func:`box_corners`: the inclusive (z, y, x) source voxel range of a box read back."""
    inv = np.linalg.inv(geometry.affine)
    xyz = (np.c_[corners, np.ones(len(corners))] @ inv.T)[:, :3]
    zyx = xyz[:, ::-1]
    lo = np.rint(zyx.min(axis=0) + 0.5).astype(int)
    hi = np.rint(zyx.max(axis=0) - 0.5).astype(int)
    return tuple(int(v) for v in lo), tuple(int(v) for v in hi)


def _walk(items: Iterable[Any]) -> Iterator[Any]:
    for item in items:
        yield item
        yield from _walk(getattr(item, "ContentSequence", []))


def _concept(item: Any) -> tuple[str, str]:
    c = item.ConceptNameCodeSequence[0]
    return str(c.CodeValue), str(c.CodingSchemeDesignator)


def _source_series(sr: Any) -> str | None:
    """The evidence series that is not a Segmentation (the source images), from the evidence sequence."""
    for study in getattr(sr, "CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.ReferencedSeriesSequence:
            if any(i.ReferencedSOPClassUID != SEG_STORAGE for i in series.ReferencedSOPSequence):
                return str(series.SeriesInstanceUID)
    return None


def _uidref(items: Iterable[Any], code: tuple[str, str]) -> str | None:
    for i in items:
        if i.ValueType == "UIDREF" and _concept(i) == code:
            return str(i.UID)
    return None
