"""Slice positions and the positive-pair rules of the three contrastive methods.

A slice's position is its relative place along the canonical slice axis of its own volume,
``pos = (i + 1) / N`` for slice ``i`` of ``N``, so ``pos`` lies in ``(0, 1]`` and means the same
anatomical height in every volume (the volumes share one canonical orientation).

Which slices of a batch are positives of each other (Zeng et al., "Positional Contrastive
Learning for Volumetric Medical Image Segmentation", MICCAI 2021):

- **PCL**: slices ``a`` and ``b`` (from any volumes) are positives when
  ``|pos_a - pos_b| < threshold`` (strict; 0.1 for CT and 0.35 for cardiac MRI in the paper).
  A fixed fraction means one thing for a 100-slice CT and another for a 10-slice cardiac MRI
  (there 0.1 leaves only slices at the same index as positives), so the threshold may grow with
  the volume: with a *reach* ``r`` in *units* (slices or millimetres) and ``u_a`` the length of
  one unit in ``a``'s relative positions (``1 / N_a`` per slice, ``1 / (N_a * spacing_a)`` per
  mm), the pair's threshold is ``max(threshold, r * max(u_a, u_b))``: slices of the coarser of
  the two volumes that are fewer than ``r`` units apart are positives.
- **SimCLR** (Chen et al., 2020): only a slice itself (its other augmented view) is positive.
- **GCL** (Chaitanya et al., NeurIPS 2020): each volume is cut into ``S`` equal partitions along
  the axis; slices in the same partition index (of any volume) are positives.

With views that are crops of their slices (``PretrainConfig.inplane_threshold``), a view's
place has two more coordinates, the centre of its crop in fractions of the slice's height and
width; positives must then also lie within the in-plane threshold of each other in both
(:func:`inplane_positive_mask`), the positional rule in three dimensions.

Every mask here is ``(B, B)`` bool with ``mask[a, b]`` True when ``a`` and ``b`` are positives. The
diagonal is always True: the two augmented views of one slice are positives.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import PCLSegError

#: Positions are rationals ``(i + 1) / N`` computed in floating point; differences that are
#: exactly ``threshold`` in exact arithmetic may land a few ulps below it (``0.3 - 0.2 < 0.1`` in
#: float64). Comparisons give way by this much so that the strict rule holds as written.
POSITION_TOLERANCE = 1e-6


def slice_positions(n: int) -> np.ndarray:
    """Positions ``(i + 1) / n`` of the ``n`` slices of one volume, float64 of shape ``(n,)``."""
    if n < 1:
        raise PCLSegError(f"a volume needs at least one slice to have positions, got {n}")
    return np.arange(1, n + 1, dtype=np.float64) / n


def _check_positions(positions: torch.Tensor) -> None:
    if positions.ndim != 1:
        raise ValueError(f"positions must have shape (B,), got {tuple(positions.shape)}")


def _as_float(positions: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays: MPS has no float64, and float32 already resolves
    positions to ~1e-7, well inside :data:`POSITION_TOLERANCE`)."""
    return positions.detach().to(torch.promote_types(positions.dtype, torch.float32))


def _check_threshold(threshold: float) -> None:
    if not 0 < threshold <= 1:
        raise PCLSegError(f"PCL threshold must be in (0, 1], got {threshold}")


def _check_reach(reach: float) -> None:
    if not reach > 0:
        raise PCLSegError(f"PCL reach must be positive, got {reach}")


def pair_thresholds(
    units: torch.Tensor, threshold: float, reach: float
) -> torch.Tensor:
    """Each pair's PCL threshold when it follows the volumes: ``max(threshold, r * max(u_a, u_b))``.

    Args:
        units: ``(B,)`` length of one unit (a slice, a millimetre) in each slice's relative
            positions, ``u = 1 / N`` or ``1 / (N * slice spacing)`` for a volume of ``N`` slices.
        threshold: the fixed threshold, the least any pair gets, in ``(0, 1]``.
        reach: ``r``, in units: slices fewer than ``r`` units apart (in the coarser volume of
            the pair) are positives.

    Returns:
        ``(B, B)`` float thresholds, symmetric.
    """
    _check_positions(units)
    _check_threshold(threshold)
    _check_reach(reach)
    u = _as_float(units)
    coarser = torch.maximum(u[:, None], u[None, :])
    return (reach * coarser).clamp_min(threshold)


def pcl_positive_mask(
    positions: torch.Tensor,
    threshold: float,
    units: torch.Tensor | None = None,
    reach: float | None = None,
) -> torch.Tensor:
    """PCL positives: ``mask[a, b] = |pos_a - pos_b| < t_ab``, across volumes.

    ``t_ab`` is ``threshold`` (the paper), or with ``units`` and ``reach`` the pair's
    :func:`pair_thresholds`, ``max(threshold, reach * max(u_a, u_b))``.

    Args:
        positions: ``(B,)`` slice positions in ``(0, 1]``.
        threshold: the positional distance below which two slices are positives, in ``(0, 1]``.
        units: ``(B,)`` length of one slice (or millimetre) in each slice's relative positions.
        reach: how many units apart positives may be; ``None`` keeps the fixed threshold.

    Returns:
        ``(B, B)`` bool mask; a distance of exactly the threshold is *not* positive.
    """
    _check_positions(positions)
    _check_threshold(threshold)
    pos = _as_float(positions)
    distance = (pos[:, None] - pos[None, :]).abs()
    if reach is None:
        return distance < threshold - POSITION_TOLERANCE
    if units is None or units.shape != positions.shape:
        raise ValueError(
            f"units must have shape {tuple(positions.shape)} with a reach, got "
            f"{None if units is None else tuple(units.shape)}"
        )
    limit = pair_thresholds(units.to(pos.device), threshold, reach)
    return distance < limit - POSITION_TOLERANCE


def simclr_positive_mask(batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """SimCLR positives: the identity, ``(B, B)`` bool (each slice is positive only with itself)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    return torch.eye(batch_size, dtype=torch.bool, device=device)


def gcl_partition(positions: torch.Tensor, partitions: int) -> torch.Tensor:
    """GCL partition index of each slice: ``ceil(pos * S) - 1``, long in ``[0, S - 1]``.

    Partition ``k`` holds the positions in ``(k / S, (k + 1) / S]``, the half-open intervals that
    match ``pos`` in ``(0, 1]``: with ``N = 8`` slices and ``S = 4`` each partition holds exactly
    two consecutive slices.

    Args:
        positions: ``(B,)`` slice positions in ``(0, 1]``.
        partitions: ``S``, the number of equal parts each volume is cut into.
    """
    _check_positions(positions)
    if partitions < 1:
        raise PCLSegError(f"GCL partitions must be at least 1, got {partitions}")
    scaled = _as_float(positions) * partitions
    index = torch.ceil(scaled - POSITION_TOLERANCE).long() - 1
    return index.clamp_(0, partitions - 1)


def gcl_positive_mask(positions: torch.Tensor, partitions: int) -> torch.Tensor:
    """GCL positives: ``mask[a, b] = partition(a) == partition(b)``, ``(B, B)`` bool."""
    index = gcl_partition(positions, partitions)
    return index[:, None] == index[None, :]


def inplane_positive_mask(centres: torch.Tensor, threshold: float) -> torch.Tensor:
    """Crops near each other in the slice plane: ``mask[a, b] = max |c_a - c_b| < threshold``
    over the two in-plane axes, ``(B, B)`` bool; ``centres`` ``(B, 2)`` in fractions of the
    slice's height and width. Two views of one slice share their crop, so the diagonal holds.
    """
    if centres.ndim != 2 or centres.shape[1] != 2:
        raise ValueError(f"centres must have shape (B, 2), got {tuple(centres.shape)}")
    _check_threshold(threshold)
    c = _as_float(centres)
    distance = (c[:, None, :] - c[None, :, :]).abs().amax(dim=-1)
    return distance < threshold - POSITION_TOLERANCE
