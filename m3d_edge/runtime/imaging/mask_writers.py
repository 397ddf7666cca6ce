"""The mask writers: NIfTI on the source grid, and DICOM SEG referencing the source slices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from m3d_edge.errors import StudyError
from m3d_edge.fileio import atomic_path
from m3d_edge.runtime.imaging.geometry import Geometry
from m3d_edge.runtime.imaging.study import Study

#: Type 2 patient/study attributes highdicom copies from the source: they must be present, may be empty
TYPE2_SOURCE_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
)


def write_nifti_mask(mask: np.ndarray, geometry: Geometry, path: Path | str) -> Path:
    """Write a source-grid ``(z, y, x)`` mask as uint8 NIfTI with the source affine (RAS), atomically."""
    import nibabel as nib

    path = Path(path)
    m = np.asarray(mask)
    if tuple(m.shape) != tuple(geometry.shape):
        raise StudyError(
            f"{path.name}: mask shape {tuple(m.shape)} does not match the source {geometry.shape}"
        )
    data = np.ascontiguousarray((m != 0).astype(np.uint8).transpose(2, 1, 0))  # -> (x, y, z)
    # nibabel's Nifti1Image and its header methods carry no annotations
    img = nib.Nifti1Image(data, geometry.affine_ras)  # type: ignore[no-untyped-call]
    img.set_sform(geometry.affine_ras, code=1)  # type: ignore[no-untyped-call]
    img.set_qform(geometry.affine_ras, code=1)  # type: ignore[no-untyped-call]
    img.header.set_xyzt_units("mm")  # type: ignore[no-untyped-call]
    suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"
    with atomic_path(path) as tmp:
        real_tmp = tmp.with_name(tmp.name + suffix)  # nibabel picks compression from the suffix
        try:
            nib.save(img, str(real_tmp))
            real_tmp.replace(tmp)
        finally:
            if real_tmp.exists():
                real_tmp.unlink()
    return path


def with_type2_attributes(ds: Any) -> Any:
    """``ds`` itself when every Type 2 source attribute is present, else a copy with the absent ones empty.

    De-identification tools often drop them; the standard allows them empty (zero length) in the SEG.
    """
    missing = [k for k in TYPE2_SOURCE_ATTRIBUTES if k not in ds]
    if not missing:
        return ds
    import copy

    ds = copy.deepcopy(ds)
    for k in missing:
        setattr(ds, k, "")
    return ds


def write_dicom_seg(
    mask: np.ndarray,
    study: Study,
    path: Path | str,
    label: str,
    bundle_id: str,
    bundle_version: str,
    series_number: int = 901,
) -> Path:
    """Write a source-grid ``(z, y, x)`` mask as a BINARY DICOM Segmentation referencing the source series."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from m3d_edge.runtime.imaging.seg_codes import segment_coding

    path = Path(path)
    name = f"series {study.series_number}" if study.series_number is not None else str(study.source_path)
    if study.kind != "dicom" or not study.source_datasets:
        raise StudyError(f"{name}: a DICOM SEG needs a DICOM source series (this study is {study.kind})")
    if study.resampled:
        raise StudyError(f"{name}: the series was resampled onto a uniform grid; a SEG cannot reference it")
    m = (np.asarray(mask) != 0).astype(np.uint8)
    if tuple(m.shape) != tuple(study.geometry.shape):
        raise StudyError(
            f"{name}: mask shape {tuple(m.shape)} does not match the series {study.geometry.shape}"
        )

    multiframe = "NumberOfFrames" in study.source_datasets[0] and len(study.source_datasets) == 1
    if multiframe:
        # pixel_array must follow the frame order of the single multi-frame source image
        frames = np.zeros((int(study.source_datasets[0].NumberOfFrames), *m.shape[1:]), np.uint8)
        for z, fn in enumerate(study.source_frame_numbers):
            if fn is None:
                raise StudyError(f"{name}: slice {z} has no frame number in its multi-frame source")
            frames[int(fn) - 1] = m[z]
        pixel_array = frames
    elif len(study.source_datasets) == m.shape[0]:
        pixel_array = m
    else:
        raise StudyError(f"{name}: SEG output for series of several multi-frame instances is not supported")

    label = (" ".join(str(label).split()) or "segment").replace("\\", "/")[:64]
    coding = segment_coding(label)
    algo = hd.AlgorithmIdentificationSequence(
        name=str(bundle_id)[:64],
        family=codes.cid7162.ArtificialIntelligence,
        version=str(bundle_version)[:64],
    )
    desc = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label,
        segmented_property_category=coding.category,
        segmented_property_type=coding.type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algo,
        anatomic_regions=[coding.region] if coding.region is not None else None,
        display_color=hd.color.CIELabColor.from_rgb(*coding.rgb),
    )
    if coding.laterality is not None:
        desc.SegmentedPropertyTypeModifierCodeSequence = [hd.sr.CodedConcept.from_code(coding.laterality)]
    try:
        seg = hd.seg.Segmentation(
            source_images=[with_type2_attributes(ds) for ds in study.source_datasets],
            pixel_array=pixel_array,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[desc],
            series_instance_uid=hd.UID(),
            series_number=int(series_number),
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="m3d-edge",
            manufacturer_model_name=str(bundle_id)[:64],
            software_versions=str(bundle_version)[:64],
            device_serial_number="0",
            series_description="M3D segmentation",
            omit_empty_frames=bool(m.any()),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise StudyError(f"{name}: cannot build a DICOM SEG: {exc}") from exc
    with atomic_path(path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return path
