"""Radiological display orientation (moved to :mod:`m3d_edge.runtime.imaging.orientation`; re-exported)."""

from m3d_edge.runtime.imaging.orientation import (
    VIEWS,
    Canonical,
    canonical_axes,
    direction_letters,
    orientation_letters,
)

__all__ = ["VIEWS", "Canonical", "canonical_axes", "direction_letters", "orientation_letters"]
