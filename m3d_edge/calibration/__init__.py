"""INT8/INT4 calibration: calibration data, quantizers, accuracy reports and gates (docs/architecture.md §6).

``calibrate_bundle("bundle/", "studies/", method="minmax", samples=8)`` quantizes the bundle's graphs,
writes ``calibration/<graph>.<precision>.json`` reports and records the variants that pass their gate in
the manifest; ``report.summary()`` is a readable account of what happened.
"""

from m3d_edge.calibration.calibrate import CalibrationError, calibrate_bundle
from m3d_edge.calibration.data import CalibrationData, find_studies, load_calibration_data
from m3d_edge.calibration.variants import CalibrationReport, Gates, VariantReport

__all__ = [
    "CalibrationData",
    "CalibrationError",
    "CalibrationReport",
    "Gates",
    "VariantReport",
    "calibrate_bundle",
    "find_studies",
    "load_calibration_data",
]
