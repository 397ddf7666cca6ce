"""HTTP errors with stable codes, and the mapping of library errors to statuses (like the CLI's exit codes).

Every refusal is JSON: ``{"error": {"code": "queue_full", "status": 503, "message": "..."}}``.
``code`` is stable (clients switch on it); ``message`` is for people and may change.
"""

from __future__ import annotations

from m3d_edge.errors import BackendError, BundleError, GenerationError, M3DEdgeError, PromptError, StudyError

# library error -> (HTTP status, code); the CLI maps the same classes to exit codes 3, 2, 7, 5, 4
LIBRARY_ERRORS: tuple[tuple[type[M3DEdgeError], int, str], ...] = (
    (StudyError, 422, "bad_study"),
    (PromptError, 400, "bad_request"),
    (GenerationError, 413, "context_too_long"),
    (BackendError, 500, "backend_error"),
    (BundleError, 500, "bundle_error"),
)


class ApiError(Exception):
    """A refusal with its status, stable code and message (and optional extra headers)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def body(self) -> dict:
        return {"error": {"code": self.code, "status": self.status, "message": self.message}}


def from_library(exc: M3DEdgeError, scrub: dict[str, str] | None = None) -> ApiError:
    """The ApiError for a library error; ``scrub`` replaces server paths in the message (folder -> name)."""
    message = str(exc)
    for path, name in (scrub or {}).items():
        message = message.replace(path, name)
    for cls, status, code in LIBRARY_ERRORS:
        if isinstance(exc, cls):
            return ApiError(status, code, message)
    return ApiError(500, "internal_error", message)
