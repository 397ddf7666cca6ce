"""Human-readable output: PNG montages of boxes and masks, a self-contained HTML report per study,
a batch index.

Pillow only (no matplotlib, no torch); fonts come from Pillow's built-in scalable default font.
"""

from m3d_edge.runtime.report.html_report import DISCLAIMER, mask_stats, write_batch_index, write_study_report
from m3d_edge.runtime.report.montage import Montage, Panel, build_montage, render_montage
from m3d_edge.runtime.report.orientation import canonical_axes, direction_letters, orientation_letters

__all__ = [
    "DISCLAIMER",
    "Montage",
    "Panel",
    "build_montage",
    "canonical_axes",
    "direction_letters",
    "mask_stats",
    "orientation_letters",
    "render_montage",
    "write_batch_index",
    "write_study_report",
]
