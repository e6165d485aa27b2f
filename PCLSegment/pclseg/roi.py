"""The region of interest: where the annotations say the structures are, in-plane.

Fine-tuning and prediction work on a crop around the annotated structures instead of the whole
field of view, so the network's pixels are spent on the structures (a small organ in a large
field of view keeps its edges). The crop is the in-plane bounding box of every annotated label
voxel, grown on each side by ``margin`` times the box's larger side: an organ is often wider
on a slice nobody annotated than on the ones that were. On CHAOS T2 (liver, kidneys, spleen),
with k slices spread over the organs, the whole organs reach at most 0.18 (k = 2), 0.08
(k = 3) and 0.06 (k = 4) of the box's larger side beyond the box; the default margin is 0.25.

The region is stored as fractions of the canonical slice (``top``, ``left``, ``bottom``,
``right`` in [0, 1]), so a model can apply it to another volume of the same kind.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .errors import PCLSegError

#: Default margin, as a fraction of the annotations' larger in-plane extent.
DEFAULT_MARGIN = 0.25


@dataclass(frozen=True)
class RegionOfInterest:
    """An in-plane box as fractions of the slice: rows ``top..bottom``, columns
    ``left..right`` (``0 <= top < bottom <= 1``, likewise for columns)."""

    top: float
    left: float
    bottom: float
    right: float

    def __post_init__(self) -> None:
        if not (0 <= self.top < self.bottom <= 1 and 0 <= self.left < self.right <= 1):
            raise PCLSegError(f"region of interest must lie inside the slice, got {self}")

    @classmethod
    def whole(cls) -> RegionOfInterest:
        return cls(0.0, 0.0, 1.0, 1.0)

    @property
    def is_whole(self) -> bool:
        return self == RegionOfInterest.whole()

    def pixels(self, shape_hw: Sequence[int]) -> tuple[int, int, int, int]:
        """``(top, left, height, width)`` in a slice of ``shape_hw`` pixels (at least 1 x 1)."""
        height, width = int(shape_hw[0]), int(shape_hw[1])
        top, left = math.floor(self.top * height), math.floor(self.left * width)
        bottom = max(top + 1, math.ceil(self.bottom * height))
        right = max(left + 1, math.ceil(self.right * width))
        return top, left, min(bottom, height) - top, min(right, width) - left

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RegionOfInterest:
        if not data:
            return cls.whole()
        return cls(float(data["top"]), float(data["left"]), float(data["bottom"]),
                   float(data["right"]))


def annotation_box(label: np.ndarray, slices: Iterable[int]) -> tuple[int, int, int, int] | None:
    """``(top, left, bottom, right)`` pixel bounds (exclusive ends) of the label voxels on
    ``slices`` of ``label`` ``(S, H, W)``; ``None`` when they hold none."""
    chosen = sorted({int(i) for i in slices})
    plane = (np.asarray(label)[chosen] > 0).any(axis=0) if chosen else None
    if plane is None or not plane.any():
        return None
    rows, cols = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def region_from_boxes(
    boxes: Iterable[tuple[tuple[int, int, int, int], Sequence[int]]],
    margin: float = DEFAULT_MARGIN,
) -> RegionOfInterest:
    """The union of pixel boxes ``(top, left, bottom, right)`` of slices of the given shapes,
    each grown by ``margin`` times its larger side, as one fractional region."""
    if margin < 0:
        raise PCLSegError(f"region margin must not be negative, got {margin}")
    parts = []
    for (top, left, bottom, right), (height, width) in boxes:
        grow = margin * max(bottom - top, right - left)
        parts.append((max(0.0, (top - grow) / height), max(0.0, (left - grow) / width),
                      min(1.0, (bottom + grow) / height), min(1.0, (right + grow) / width)))
    if not parts:
        return RegionOfInterest.whole()
    tops, lefts, bottoms, rights = zip(*parts, strict=True)
    return RegionOfInterest(min(tops), min(lefts), max(bottoms), max(rights))


def region_of_annotations(
    label: np.ndarray, slices: Iterable[int], margin: float = DEFAULT_MARGIN
) -> RegionOfInterest:
    """The region of interest of one volume's annotations (the whole slice without any)."""
    box = annotation_box(label, slices)
    if box is None:
        return RegionOfInterest.whole()
    return region_from_boxes([(box, np.asarray(label).shape[1:])], margin)
