"""The one batch engine (docs/architecture.md §2): study discovery, result keys, resume, lock, error log, privacy mode.

Local ``m3d-edge batch``, Ray batch, ``index build`` and the DICOM node are thin adapters over
:func:`run_batch`; this package holds no CLI code (progress is reported through a callback).
"""

from m3d_edge.jobs.batch import BatchEvent, run_batch
from m3d_edge.jobs.discovery import STUDY_SUFFIXES, discover
from m3d_edge.jobs.partials import remove_stale_partials

__all__ = ["STUDY_SUFFIXES", "BatchEvent", "discover", "remove_stale_partials", "run_batch"]
