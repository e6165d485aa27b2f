"""Which slice should the user annotate next: the ones the model is least sure of, spread apart.

Two pure steps, both unit-testable without a model:

1. :func:`slice_uncertainty` scores each slice from the softmax probabilities ``p`` of shape
   ``(S, C, H, W)``. Per pixel, the normalised entropy

   .. math:: u(x) = -\\frac{1}{\\log C} \\sum_c p_c(x) \\log p_c(x) \\in [0, 1]

   is averaged over the slice's *region of interest* ``R_s``: the pixels where the model gives
   any foreground class at least ``roi_threshold`` probability. Background far from every organ
   is confidently background in every slice and would only dilute the score, so it is left out.
   A slice with a speck of doubtful foreground should not outrank one with a large doubtful
   organ boundary, so the mean is taken over at least ``min_area`` pixels (a fraction of the
   slice):

   .. math:: \\text{score}_s = \\frac{\\sum_{x \\in R_s} u(x)}{\\max(|R_s|,\\ a_{min} H W)}

2. :func:`pick_spread` picks ``k`` non-annotated slices by score with greedy non-maximum
   suppression: after a slice is picked, slices within ``min_gap`` of it (and of every annotated
   slice) are passed over, so suggestions cover different parts of the volume instead of
   clustering on one hard region. If that leaves fewer than ``k`` candidates, the gap to the
   annotated slices is dropped first, then the gap between suggestions.

The simpler rule a user follows without a model, :func:`largest_gap_middles`, asks for the
middle of the largest stretch of unannotated slices inside the structures' range (the slices
where the annotations or the prediction hold a structure). ``benchmarks/annotation_effort.py``
measures both in a simulated annotation loop.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from .errors import PCLSegError


def pixel_entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """Normalised entropy in [0, 1] over the class axis 1: ``(S, C, H, W) -> (S, H, W)``."""
    num_classes = probabilities.shape[1]
    p = probabilities.float().clamp_min(1e-12)
    return -(p * p.log()).sum(dim=1) / float(np.log(num_classes))


def slice_uncertainty(
    probabilities: np.ndarray | torch.Tensor,
    roi_threshold: float = 0.05,
    min_area: float = 0.01,
) -> np.ndarray:
    """One uncertainty score per slice (higher = less sure), see the module docstring.

    Args:
        probabilities: softmax output ``(S, C, H, W)``, class 0 background.
        roi_threshold: a pixel joins the region of interest when some foreground class has at
            least this probability.
        min_area: the smallest denominator, as a fraction of the slice's pixels.

    Returns:
        ``(S,)`` float64 scores in [0, 1]; 0 for slices with no region of interest.
    """
    p = torch.as_tensor(probabilities)
    if p.ndim != 4 or p.shape[1] < 2:
        raise PCLSegError(f"probabilities must have shape (S, C>=2, H, W), got {tuple(p.shape)}")
    entropy = pixel_entropy(p)
    roi = p[:, 1:].amax(dim=1) >= roi_threshold
    area = roi.flatten(1).sum(dim=1).double()
    floor = min_area * p.shape[2] * p.shape[3]
    total = (entropy * roi).flatten(1).sum(dim=1).double()
    return (total / area.clamp_min(max(floor, 1.0))).numpy()


def pick_spread(
    scores: np.ndarray,
    annotated: Iterable[int],
    k: int,
    min_gap: int | None = None,
) -> list[int]:
    """The ``k`` highest-scoring non-annotated slices, at least ``min_gap`` apart.

    Args:
        scores: ``(S,)`` uncertainty per slice.
        annotated: slice indices the user already annotated (never suggested).
        k: how many slices to suggest (fewer when fewer slices are left).
        min_gap: the smallest index distance between two suggestions, and between a
            suggestion and an annotated slice; default ``max(1, S // (2 (k + 1)))``.

    Returns:
        Slice indices, most uncertain first.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise PCLSegError(f"scores must be one value per slice, got shape {scores.shape}")
    if k < 1:
        raise PCLSegError(f"k must be at least 1, got {k}")
    num_slices = len(scores)
    gap = max(1, num_slices // (2 * (k + 1))) if min_gap is None else int(min_gap)
    if gap < 1:
        raise PCLSegError(f"min_gap must be at least 1, got {min_gap}")
    taken = {int(i) for i in annotated}
    # Stable sort: ties go to the lower index, so the result is deterministic.
    order = [int(i) for i in np.argsort(-scores, kind="stable") if int(i) not in taken]
    picked: list[int] = []
    for avoid_annotated, spacing in ((True, gap), (False, gap), (False, 1)):
        for index in order:
            if len(picked) == k:
                return picked
            blockers = picked + (sorted(taken) if avoid_annotated else [])
            if index not in picked and all(abs(index - b) >= spacing for b in blockers):
                picked.append(index)
    return picked


def suggest_slices(
    probabilities: np.ndarray | torch.Tensor,
    annotated: Iterable[int],
    k: int,
    min_gap: int | None = None,
) -> list[int]:
    """The ``k`` non-annotated slices the model is least sure of, spread apart."""
    return pick_spread(slice_uncertainty(probabilities), annotated, k, min_gap)


def spread_over_extent(label: np.ndarray, k: int) -> list[int]:
    """Where to annotate first: the centres of ``k`` equal parts of the slice range that holds
    any label voxel of ``label`` ``(S, H, W)``, as a user spreads a few slices over an organ.

    Used by the demo and the benchmarks to stand in for a user (and for "Fill between slices",
    which needs the same kind of spread)."""
    filled = np.flatnonzero(np.asarray(label).reshape(len(label), -1).any(axis=1))
    if k < 1 or not len(filled):
        raise PCLSegError("need k >= 1 and a label map with at least one label voxel")
    first, last = int(filled[0]), int(filled[-1])
    width = (last - first + 1) / k
    return sorted({min(last, int(first + (j + 0.5) * width)) for j in range(k)})


def structure_range(*label_maps: np.ndarray) -> tuple[int, int] | None:
    """First and last slice holding a structure in any of the ``(S, H, W)`` label maps."""
    holding = np.zeros(len(label_maps[0]), dtype=bool)
    for label in label_maps:
        holding |= np.asarray(label).reshape(len(label), -1).any(axis=1)
    filled = np.flatnonzero(holding)
    return (int(filled[0]), int(filled[-1])) if len(filled) else None


def largest_gap_middles(
    annotated: Iterable[int], extent: tuple[int, int], k: int = 1
) -> list[int]:
    """The middles of the ``k`` largest stretches of unannotated slices inside ``extent``
    (first and last slice of the structures, both included), largest first.

    The ends of the extent count as stretches too: with annotations at 10 and 20 in an extent
    of 4..30, the stretches are 4..9, 11..19 and 21..30, and the first pick is 25.
    """
    if k < 1:
        raise PCLSegError(f"k must be at least 1, got {k}")
    first, last = extent
    taken = sorted({int(i) for i in annotated})
    picked: list[int] = []
    for _ in range(k):
        blocked = sorted({*taken, *picked})
        stretches, start = [], first
        for index in [*[b for b in blocked if first <= b <= last], last + 1]:
            if index > start:
                stretches.append((index - start, -start, start, index - 1))
            start = max(start, index + 1)
        if not stretches:
            break
        _, _, low, high = max(stretches)
        picked.append((low + high) // 2)
    return picked
