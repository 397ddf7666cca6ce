"""The one exception hierarchy of m3d-edge (docs/architecture.md §7).

Every error a user can cause derives from :class:`M3DEdgeError`; the CLI turns each family into one
readable line and its own exit code. Messages name the file, series or graph and the cause.
"""

from __future__ import annotations


class M3DEdgeError(Exception):
    """Base class of every error m3d-edge raises on purpose."""

    exit_code = 1


class StudyError(M3DEdgeError):
    """A study (DICOM folder, NIfTI, npy) cannot be read or is not usable."""

    exit_code = 3


class BundleError(M3DEdgeError):
    """A bundle is missing, corrupted, or of a schema this runtime does not understand."""

    exit_code = 4


class BackendError(M3DEdgeError):
    """An inference backend failed or the requested provider is unavailable."""

    exit_code = 5


class ExportError(M3DEdgeError):
    """A checkpoint cannot be read or exported."""

    exit_code = 6


class GenerationError(M3DEdgeError):
    """Generation cannot proceed (for example the context length would be exceeded)."""

    exit_code = 7


class CalibrationError(M3DEdgeError):
    """INT8/INT4 calibration cannot run (no usable data, bad arguments, a quantizer failure)."""

    exit_code = 8


class PromptError(M3DEdgeError, ValueError):
    """A task was asked with a missing or malformed argument."""

    exit_code = 2


class OutputLockedError(M3DEdgeError):
    """Another batch holds the output folder's lock (the message says which process, host and since when)."""

    exit_code = 11


class OutputError(M3DEdgeError):
    """Outputs cannot be written: disk full, quota, file too large, read-only file system."""

    exit_code = 12
