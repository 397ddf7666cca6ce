"""SNOMED CT codes and display colours for DICOM SEG segments, from a free-text target ("left kidney").

The codes come from pydicom's code dictionary (``pydicom.sr.codedict.codes.SCT``), never typed in here:
the label's words are matched, longest phrase first, against the CamelCase keywords of the structures
below (``"inferior vena cava"`` -> ``InferiorVenaCava``; M3D-Seg's organ and lesion names). An organ gets
the category "Anatomical Structure"; a lesion, tumour, mass, nodule or cyst the category "Morphologically
Abnormal Structure", with the organ it names as anatomic region ("liver tumor"). A label with no known
term keeps the generic "Morphologically Abnormal Structure" pair. "Left"/"right" become a laterality
modifier (SegmentedPropertyTypeModifierCodeSequence).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_ABNORMAL = frozenset(
    [
        "Lesion",
        "Tumor",
        "Neoplasm",
        "Mass",
        "Nodule",
        "Cyst",
        "Metastasis",
        "Abscess",
        "Hematoma",
        "Hemorrhage",
        "Edema",
        "Effusion",
    ]
)
_ORGANS = frozenset(
    [
        "Liver",
        "Kidney",
        "Spleen",
        "Pancreas",
        "Aorta",
        "InferiorVenaCava",
        "AdrenalGland",
        "Gallbladder",
        "Esophagus",
        "Stomach",
        "Duodenum",
        "Bladder",
        "Lung",
        "Colon",
        "Heart",
        "Brain",
        "Prostate",
        "Uterus",
        "Bone",
        "Rectum",
        "SmallIntestine",
        "Spine",
        "Trachea",
        "Thyroid",
        "PortalVein",
        "SplenicVein",
        "Skull",
        "Rib",
        "Femur",
        "Humerus",
        "Muscle",
        "Pleura",
        "PulmonaryArtery",
        "Artery",
        "Vein",
        "Larynx",
        "Mandible",
        "Clavicle",
        "Sternum",
        "Scapula",
        "Sacrum",
        "Hip",
        "Pelvis",
        "Vertebra",
        "CervicalSpine",
        "ThoracicSpine",
        "LumbarSpine",
        "Ureter",
        "BileDuct",
        "Pharynx",
        "OpticNerve",
        "OpticChiasm",
        "ParotidGland",
        "Eye",
        "Eyeball",
        "IliacArtery",
        "IliacVein",
        "RenalArtery",
        "CarotidArtery",
        "Atrium",
        "Ventricle",
        "Appendix",
        "Ovary",
        "Testis",
        "Breast",
        "LymphNode",
    ]
)
_SPELLING = {
    "tumour": "tumor",
    "tumors": "tumor",
    "oesophagus": "esophagus",
    "haemorrhage": "hemorrhage",
    "kidneys": "kidney",
    "lungs": "lung",
    "lesions": "lesion",
    "postcava": "inferior vena cava",
    "suprarenal": "adrenal",
}
_STOP = {"the", "a", "an", "of", "in", "this", "image", "and", "with", "on", "at", "to"}

#: display colour (sRGB) per SNOMED keyword; others cycle through _PALETTE (Slicer-like organ colours)
_COLOURS: dict[str, tuple[int, int, int]] = {
    "Liver": (221, 130, 101),
    "Kidney": (185, 102, 83),
    "Spleen": (157, 108, 162),
    "Pancreas": (249, 180, 111),
    "Aorta": (224, 97, 76),
    "InferiorVenaCava": (0, 151, 206),
    "Gallbladder": (139, 150, 98),
    "Stomach": (216, 132, 105),
    "Lung": (197, 165, 145),
    "Lesion": (255, 255, 0),
    "Tumor": (255, 255, 0),
}
_PALETTE = ((128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210), (216, 101, 79))


@dataclass(frozen=True)
class SegmentCoding:
    category: Any  # pydicom Code
    type: Any
    laterality: Any | None
    region: Any | None  # the organ a lesion is in, when the label names one
    rgb: tuple[int, int, int]


def _words(label: str) -> list[str]:
    words = " ".join(_SPELLING.get(w, w) for w in re.findall(r"[a-z]+", label.lower())).split()
    return [w for w in words if w not in _STOP]


def _find(words: list[str], allowed: frozenset[str]) -> str | None:
    """The allowed keyword of the longest phrase in ``words`` ("gall bladder" -> Gallbladder)."""
    for n in range(min(4, len(words)), 0, -1):
        for i in range(len(words) - n + 1):
            key = "".join(w.capitalize() for w in words[i : i + n])
            if key in allowed:
                return key
            if n > 1 and key.capitalize() in allowed:  # "gall bladder" -> "Gallbladder"
                return key.capitalize()
    return None


def segment_coding(label: str, segment_number: int = 1) -> SegmentCoding:
    """Category, type, laterality and colour of a segment named ``label``."""
    from pydicom.sr.codedict import codes

    words = _words(label)
    laterality = None
    for side, code in (("left", codes.SCT.Left), ("right", codes.SCT.Right)):
        if side in words:
            laterality = code
    words = [w for w in words if w not in ("left", "right")]
    n = (segment_number - 1) % len(_PALETTE)
    abnormal, organ = _find(words, _ABNORMAL), _find(words, _ORGANS)
    if abnormal is not None:
        region = getattr(codes.SCT, organ) if organ else None
        rgb = _COLOURS.get(abnormal, _PALETTE[n])
        return SegmentCoding(codes.SCT.MorphologicallyAbnormalStructure, getattr(codes.SCT, abnormal),
                             laterality, region, rgb)  # fmt: skip
    if organ is not None:
        return SegmentCoding(codes.SCT.AnatomicalStructure, getattr(codes.SCT, organ), laterality, None,
                             _COLOURS.get(organ, _PALETTE[n]))  # fmt: skip
    generic = codes.SCT.MorphologicallyAbnormalStructure
    return SegmentCoding(generic, generic, laterality, None, _PALETTE[n])
