"""What interpolation already knows: "Fill between slices" as a shape prior for the network.

Slicer's *Fill between slices* is ITK's morphological contour interpolation (Albu et al., 2008;
the ``itk-morphologicalcontourinterpolation`` module): between two annotated slices it morphs
one slice's contours into the other's, per label. It is a strong guess between annotated slices
and says nothing outside them. The network gets that guess as extra input channels, one per
foreground class (:func:`prior_channels`), so it learns how far to trust it from the image.

Interpolation says nothing beyond the first and last annotated slices. With ``beyond``, the
prior there is a copy of the nearest annotated slice (:func:`shape_prior`): a rough guess that
fades in value with distance, which the network learns to weigh against the image.

Training must see what prediction will see. At prediction time, a slice's prior comes from the
annotated slices around it; an annotated slice's own prior would be its label, which teaches
nothing. So a training slice gets the prior made from the *other* annotated slices
(:func:`leave_one_out_priors`): a middle slice sees an interpolation from neighbours twice as
far as prediction will use; an end slice sees a copy of its nearest annotated neighbour (with
``beyond``) or nothing, as slices outside the annotated range will.

ITK runs in a child process of its own (:mod:`pclseg.contour_process`): it does not share a
process with PyTorch safely. Its modules take seconds to load, once per engine process.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import contour_process
from .errors import PCLSegError


def fill_between_slices(label: np.ndarray, annotated: Sequence[int]) -> np.ndarray:
    """ITK's morphological contour interpolation between the ``annotated`` slices (axis 0).

    Args:
        label: ``(S, H, W)`` label map; only the annotated slices are read.
        annotated: the slices to interpolate between.

    Returns:
        ``(S, H, W)`` uint8 label map: the annotated slices as given, the slices between two
        annotated slices of a label interpolated, nothing elsewhere.
    """
    label = np.asarray(label)
    if label.ndim != 3:
        raise PCLSegError(f"label map must be (S, H, W), got shape {label.shape}")
    if label.size and label.max() > 255:
        raise PCLSegError("fill between slices handles up to 255 labels")
    sparse = np.zeros(label.shape, dtype=np.uint8)
    chosen = sorted({int(i) for i in annotated})
    sparse[chosen] = label[chosen]
    if len(chosen) < 2 or not sparse.any():
        return sparse
    filled = np.array(contour_process.interpolate(sparse), dtype=np.uint8)
    filled[chosen] = sparse[chosen]  # the user's slices exactly
    return filled


def shape_prior(label: np.ndarray, annotated: Sequence[int], beyond: bool = False) -> np.ndarray:
    """Fill between the ``annotated`` slices; with ``beyond``, the slices before the first and
    after the last annotated slice get a copy of it. ``(S, H, W)`` uint8."""
    prior = fill_between_slices(label, annotated)
    chosen = sorted({int(i) for i in annotated})
    if beyond and chosen:
        prior[: chosen[0]] = prior[chosen[0]]
        prior[chosen[-1] + 1 :] = prior[chosen[-1]]
    return prior


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice] | None:
    """The in-plane rows and columns holding any voxel of ``mask`` ``(S, H, W)``."""
    plane = mask.any(axis=0)
    if not plane.any():
        return None
    rows, cols = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def leave_one_out_priors(
    label: np.ndarray, annotated: Sequence[int], beyond: bool = False
) -> np.ndarray:
    """For each annotated slice, the :func:`shape_prior` of the *other* annotated slices there.

    Args:
        label: ``(S, H, W)`` label map holding the annotations.
        annotated: the annotated slices (``k`` of them).
        beyond: outside the others' range, copy the nearest other annotated slice.

    Returns:
        ``(k, H, W)`` uint8, in the order of ``sorted(annotated)``.
    """
    label = np.asarray(label)
    chosen = sorted({int(i) for i in annotated})
    priors = np.zeros((len(chosen), *label.shape[1:]), dtype=np.uint8)
    box = _bounding_box(label[chosen] > 0)
    if box is None or len(chosen) < 2:
        return priors
    rows, cols = box  # interpolate inside the annotations' box only: same result, less work
    cropped = label[:, rows, cols]
    for n, index in enumerate(chosen):
        others = [i for i in chosen if i != index]
        if others[0] < index < others[-1]:
            priors[n, rows, cols] = fill_between_slices(cropped, others)[index]
        elif beyond:
            nearest = others[0] if index < others[0] else others[-1]
            priors[n] = label[nearest]
    return priors


def prior_channels(prior: np.ndarray, num_classes: int) -> np.ndarray:
    """The network's prior channels: the one-hot foreground channels of a prior label map,
    ``(..., H, W)`` -> ``(..., C - 1, H, W)`` float32 (class 0, background, has no channel).
    A soft prior (float: each foreground class's share, ``(..., C - 1, H, W)``) already is
    those channels."""
    prior = np.asarray(prior)
    if np.issubdtype(prior.dtype, np.floating):
        return prior.astype(np.float32, copy=False)
    classes = np.arange(1, num_classes, dtype=prior.dtype).reshape(-1, 1, 1)
    return (prior[..., None, :, :] == classes).astype(np.float32)
