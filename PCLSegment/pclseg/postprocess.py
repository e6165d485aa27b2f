"""Post-processing a radiologist expects: no structure where the annotations say it cannot be.

A network that sees one slice at a time can label a patch of bowel "spleen" ten slices away
from any spleen. Two rules, per structure, after the user's slices are put in place:

1. **Supported components.** A 3D connected component (26-connectivity) of the prediction is
   kept when it touches a voxel the user labelled with that structure, or a voxel "Fill between
   slices" gives it (:mod:`pclseg.interpolate`); any other component is dropped. Annotated
   slices are the user's, so a component on the far side of an annotated slice that lacks the
   structure is cut off from the annotated ones.
2. **Slice range.** Nothing more than one annotation gap beyond the slices that hold the
   structure's annotations: the margin is the largest distance between consecutive annotated
   slices (the user's own spacing says how far a structure may run on unseen), so it follows
   the data, not a constant. With a single annotated slice there is no gap to measure and no
   limit.

Dropped voxels become background. Voxels on annotated slices are never changed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

#: 26-connectivity in 3D: voxels sharing a face, an edge or a corner belong together.
CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


def with_annotations(
    prediction: np.ndarray, annotation: np.ndarray, annotated: Sequence[int]
) -> np.ndarray:
    """``prediction`` with the user's labels on the annotated slices (a copy)."""
    out = np.array(prediction, copy=True)
    if len(annotated):
        out[list(annotated)] = annotation[list(annotated)]
    return out


def keep_supported_components(
    prediction: np.ndarray, annotation: np.ndarray, annotated: Sequence[int], prior: np.ndarray
) -> np.ndarray:
    """Rule 1 of the module docstring, on a prediction that holds the user's slices."""
    out = np.array(prediction, copy=True)
    chosen = list(annotated)
    user = np.zeros(prediction.shape, dtype=bool)
    for value in np.unique(out):
        if value == 0:
            continue
        mask = out == value
        components, count = ndimage.label(mask, structure=CONNECTIVITY)
        if count <= 1 and not chosen:
            continue
        user[:] = False
        if chosen:
            user[chosen] = annotation[chosen] == value
        anchors = user | (prior == value)
        kept = np.unique(components[anchors & mask])
        drop = mask & ~np.isin(components, kept[kept > 0])
        out[drop] = 0
    return out


def slice_range_margin(annotated: Sequence[int]) -> int | None:
    """The largest gap between consecutive annotated slices (None with fewer than two)."""
    chosen = sorted({int(i) for i in annotated})
    if len(chosen) < 2:
        return None
    return int(np.diff(chosen).max())


def limit_slice_range(
    prediction: np.ndarray, annotation: np.ndarray, annotated: Sequence[int]
) -> np.ndarray:
    """Rule 2 of the module docstring."""
    margin = slice_range_margin(annotated)
    out = np.array(prediction, copy=True)
    if margin is None:
        return out
    chosen = sorted({int(i) for i in annotated})
    slices = np.arange(len(out))[:, None, None]
    for value in np.unique(annotation[chosen]):
        if value == 0:
            continue
        holding = [i for i in chosen if (annotation[i] == value).any()]
        low, high = holding[0] - margin, holding[-1] + margin
        out[(out == value) & ((slices < low) | (slices > high))] = 0
    return out


def clean_prediction(
    prediction: np.ndarray,
    annotation: np.ndarray,
    annotated: Sequence[int],
    prior: np.ndarray,
) -> np.ndarray:
    """Both rules; the user's slices exactly as they annotated them."""
    out = with_annotations(prediction, annotation, annotated)
    out = keep_supported_components(out, annotation, annotated, prior)
    out = limit_slice_range(out, annotation, annotated)
    return with_annotations(out, annotation, annotated)
