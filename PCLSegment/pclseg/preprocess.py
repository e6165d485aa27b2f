"""From a canonical volume to network-sized slices, and back.

The chain for an image volume ``(S, H, W)`` (:func:`prepare_volume`):

1. :func:`normalize`: clip to the volume's own ``(p_low, p_high)`` percentiles, then z-score
   over the whole volume, ``x' = (clip(x) - mean) / std`` (the paper's per-volume rule).
2. In-plane resampling (only with a target spacing ``t``): ``(H, W) -> (H1, W1)`` with
   ``H1 = round(H * s_row / t)``, ``W1 = round(W * s_col / t)``; edge-to-edge, so the new pixel
   spacing is ``H * s_row / H1 ~ t``.
3. Centred padding into a ``L x L`` square, ``L = max(H1, W1)`` (and, with a target spacing,
   at least ``size``: a slice whose field of view fits in ``size * t`` is only padded, so every
   such volume keeps the same physical pixel size; a larger one is shrunk to fit, never cropped).
   Images are padded with the volume's lowest value (background), labels with 0.
4. Resizing ``L x L -> size x size`` (bilinear with anti-aliasing for images, nearest for
   labels).

With a region of interest (:mod:`pclseg.roi`), the slices are first cropped to it in-plane
(after the z-score, so the intensities do not depend on the crop), and steps 2-4 fit the crop.

A :class:`SliceGeometry` records the numbers of steps 2-4 and the crop; :func:`unfit_slices`
runs them backwards (resize to ``L``, unpad, resize to ``(H, W)``, put the crop back) so a
prediction made on the network's grid lands on the volume's canonical grid. Nearest-neighbour
resizing uses pixel centres (``nearest-exact``), which makes ``unfit(fit(labels)) == labels``
exactly whenever the network grid is at least as fine as the volume's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .config import PreprocessConfig
from .errors import PCLSegError
from .io import Volume

Order = Literal[0, 1]
#: Slices resized per call, to bound the memory of one interpolation.
_CHUNK = 64


def normalize(
    array: np.ndarray,
    clip_percentiles: tuple[float, float] = (1.0, 99.0),
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """Per-volume percentile clip and z-score, as float32.

    ``x' = (clip(x, P_lo, P_hi) - mu) / sigma`` with ``mu``, ``sigma`` of the clipped volume.
    A constant volume (``sigma == 0``) becomes all zeros rather than NaN. Voxels where
    ``exclude`` is true (those that were NaN or infinite, :attr:`pclseg.io.Volume.invalid`) are
    clipped and scaled like the others but left out of ``P``, ``mu`` and ``sigma``.
    """
    array = np.asarray(array, dtype=np.float32)
    low, high = clip_percentiles
    if not 0 <= low < high <= 100:
        raise PCLSegError(
            f"clip percentiles must satisfy 0 <= low < high <= 100, got {low}, {high}"
        )
    if array.size == 0:
        raise PCLSegError("cannot normalize an empty array")
    kept = array if exclude is None else array[~exclude]
    p_low, p_high = np.percentile(kept, [low, high]).astype(np.float32)
    clipped = np.clip(array, p_low, p_high)  # float32 bounds keep float32 (NEP 50)
    statistics = clipped if exclude is None else clipped[~exclude]
    mean, std = float(statistics.mean(dtype=np.float64)), float(statistics.std(dtype=np.float64))
    if std <= 1e-12 * max(1.0, abs(mean)):
        return np.zeros_like(clipped)
    clipped -= mean
    clipped /= std
    return clipped


def _resize(array: np.ndarray, shape_hw: tuple[int, int], order: Order) -> np.ndarray:
    """Resize the last two axes of ``(N, H, W)`` to ``shape_hw``; keeps the dtype.

    ``order`` 1: bilinear, pixel-area aligned (``align_corners=False``), anti-aliased when
    shrinking; ``order`` 0: nearest by pixel centre (``nearest-exact``).
    """
    n, h, w = array.shape
    if (h, w) == tuple(shape_hw):
        return array.copy()
    out = np.empty((n, *shape_hw), dtype=array.dtype)
    shrinking = shape_hw[0] < h or shape_hw[1] < w
    for start in range(0, n, _CHUNK):
        chunk = torch.from_numpy(np.ascontiguousarray(array[start : start + _CHUNK], np.float32))
        chunk = chunk[:, None]
        if order == 0:
            resized = F.interpolate(chunk, size=shape_hw, mode="nearest-exact")
        else:
            resized = F.interpolate(
                chunk, size=shape_hw, mode="bilinear", align_corners=False, antialias=shrinking
            )
        out[start : start + _CHUNK] = resized[:, 0].numpy().astype(array.dtype, copy=False)
    return out


def _check_order(order: int) -> Order:
    if order not in (0, 1):
        raise PCLSegError(f"interpolation order must be 0 (nearest) or 1 (linear), got {order}")
    return order  # type: ignore[return-value]


def _check_stack(array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 3 or min(array.shape) < 1:
        raise PCLSegError(f"{what} must be a non-empty (S, H, W) array, got shape {array.shape}")
    return array


def inplane_shape(
    shape_hw: Sequence[int], spacing_rc: Sequence[float], target: float
) -> tuple[int, int]:
    """``(H1, W1)``: the in-plane shape at ``target`` mm spacing, ``round(H * s_row / t)``."""
    if target <= 0 or min(spacing_rc) <= 0:
        raise PCLSegError(f"spacings must be positive, got target {target} and {tuple(spacing_rc)}")
    pairs = zip(shape_hw, spacing_rc, strict=True)
    return tuple(max(1, round(n * s / target)) for n, s in pairs)  # type: ignore[return-value]


def resample_inplane(
    data: Volume | np.ndarray,
    spacing_rc: Sequence[float] | None,
    target: float,
    order: int = 1,
) -> np.ndarray:
    """Resample every slice of ``(S, H, W)`` to ``target`` mm pixels (linear or nearest).

    Args:
        data: a :class:`~pclseg.io.Volume` or an ``(S, H, W)`` array.
        spacing_rc: the slices' (row, column) spacing in mm; ``None`` takes a volume's own.
        target: the new pixel spacing (mm), the same along rows and columns.
        order: 1 for images (bilinear), 0 for label maps (nearest).
    """
    if isinstance(data, Volume):
        array = data.array
        spacing_rc = data.spacing[1:] if spacing_rc is None else spacing_rc
    else:
        array = _check_stack(data, "resample_inplane input")
    if spacing_rc is None or len(spacing_rc) != 2:
        raise PCLSegError(f"spacing_rc must be (row, column) spacing, got {spacing_rc}")
    shape = inplane_shape(array.shape[1:], spacing_rc, target)
    return _resize(array, shape, _check_order(order))


@dataclass(frozen=True)
class SliceGeometry:
    """How slices of one volume were fitted to the network grid, to undo it exactly.

    Attributes:
        shape: ``(H, W)`` of the canonical slices.
        resampled: ``(H1, W1)`` of the (cropped) slices after in-plane resampling (their
            shape when there was none).
        side: ``L``, the square the resampled slice was padded into.
        offset: ``(top, left)`` of the resampled slice inside the square.
        size: the network's slice side.
        crop: ``(top, left, height, width)`` of the region of interest in the canonical slice,
            or ``None`` for the whole slice.
    """

    shape: tuple[int, int]
    resampled: tuple[int, int]
    side: int
    offset: tuple[int, int]
    size: int
    crop: tuple[int, int, int, int] | None = None

    @property
    def cropped_shape(self) -> tuple[int, int]:
        """``(H, W)`` of the region the network sees (the whole slice without a crop)."""
        return self.shape if self.crop is None else (self.crop[2], self.crop[3])

    def cut(self, array: np.ndarray) -> np.ndarray:
        """The region of interest of ``(..., H, W)`` slices (a view)."""
        if self.crop is None:
            return array
        top, left, height, width = self.crop
        return array[..., top : top + height, left : left + width]

    @property
    def pixel_spacing_scale(self) -> float:
        """Network pixel size over resampled pixel size, ``L / size``."""
        return self.side / self.size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SliceGeometry:
        return cls(
            shape=tuple(data["shape"]),  # type: ignore[arg-type]
            resampled=tuple(data["resampled"]),  # type: ignore[arg-type]
            side=int(data["side"]),
            offset=tuple(data["offset"]),  # type: ignore[arg-type]
            size=int(data["size"]),
            crop=tuple(data["crop"]) if data.get("crop") else None,  # type: ignore[arg-type]
        )


def plan_fit(
    shape_hw: Sequence[int],
    size: int,
    spacing_rc: Sequence[float] | None = None,
    target_spacing: float | None = None,
    crop: Sequence[int] | None = None,
) -> SliceGeometry:
    """The :class:`SliceGeometry` for ``(H, W)`` slices (see the module docstring, steps 2-4),
    of their ``crop`` ``(top, left, height, width)`` when one is given."""
    if size < 1:
        raise PCLSegError(f"size must be positive, got {size}")
    full = (int(shape_hw[0]), int(shape_hw[1]))
    box = None
    if crop is not None:
        box = tuple(int(v) for v in crop)
        top, left, height, width = box
        if top < 0 or left < 0 or height < 1 or width < 1 or top + height > full[0] \
                or left + width > full[1]:
            raise PCLSegError(f"crop {box} does not lie inside slices of shape {full}")
    shape = full if box is None else (box[2], box[3])
    if target_spacing is None:
        resampled, side = shape, max(shape)
    else:
        if spacing_rc is None:
            raise PCLSegError("a target spacing needs the slices' (row, column) spacing")
        resampled = inplane_shape(shape, spacing_rc, target_spacing)
        side = max(*resampled, size)
    offset = ((side - resampled[0]) // 2, (side - resampled[1]) // 2)
    return SliceGeometry(full, resampled, side, offset, size, box)  # type: ignore[arg-type]


def fit_slices(
    array: np.ndarray,
    size: int | SliceGeometry,
    order: int = 1,
    pad_value: float = 0.0,
) -> tuple[np.ndarray, SliceGeometry]:
    """Pad ``(S, H, W)`` slices to a centred square and resize them to ``size x size``.

    Args:
        array: the slices (an image, or a label map with ``order=0``).
        size: the output side, or a :class:`SliceGeometry` to repeat (e.g. from the image,
            to fit its label map the same way; its resampling step is applied too).
        order: 1 bilinear (images), 0 nearest (labels).
        pad_value: the value of the padding.

    Returns:
        ``(slices (S, size, size), geometry)``; float32 for ``order=1``, the input dtype for 0.
    """
    array = _check_stack(array, "fit_slices input")
    order = _check_order(order)
    geometry = size if isinstance(size, SliceGeometry) else plan_fit(array.shape[1:], size)
    if tuple(array.shape[1:]) != geometry.shape:
        raise PCLSegError(
            f"slices of shape {array.shape[1:]} do not match the geometry's {geometry.shape}"
        )
    if order == 1:
        array = np.asarray(array, dtype=np.float32)
    resampled = _resize(np.ascontiguousarray(geometry.cut(array)), geometry.resampled, order)
    top, left = geometry.offset
    height, width = geometry.resampled
    square = np.full((array.shape[0], geometry.side, geometry.side), pad_value, dtype=array.dtype)
    square[:, top : top + height, left : left + width] = resampled
    return _resize(square, (geometry.size, geometry.size), order), geometry


def unfit_slices(
    array: np.ndarray, geometry: SliceGeometry, order: int | None = None
) -> np.ndarray:
    """The inverse of :func:`fit_slices`: network-grid slices back to the volume's ``(H, W)``.

    Args:
        array: ``(S, size, size)`` (a label map or one probability map) or ``(C, S, size, size)``
            (per-class probabilities).
        geometry: the :class:`SliceGeometry` the volume was fitted with.
        order: 0 nearest, 1 bilinear; default nearest for integer/boolean arrays, else bilinear.

    Returns:
        ``(S, H, W)`` or ``(C, S, H, W)``, in the input dtype (float32 for floats). Outside a
        crop, ``(S, H, W)`` arrays are 0 and ``(C, S, H, W)`` probabilities are background
        (1 in channel 0, 0 elsewhere).
    """
    array = np.asarray(array)
    if array.ndim not in (3, 4) or array.shape[-2:] != (geometry.size, geometry.size):
        raise PCLSegError(
            f"expected (S, {geometry.size}, {geometry.size}) or (C, S, {geometry.size}, "
            f"{geometry.size}) slices, got shape {array.shape}"
        )
    if order is None:
        order = 0 if array.dtype.kind in "biu" else 1
    order = _check_order(order)
    if array.dtype == np.bool_:
        return unfit_slices(array.astype(np.uint8), geometry, order).astype(np.bool_)
    if order == 1 or array.dtype.kind == "f":
        array = array.astype(np.float32, copy=False)
    lead = array.shape[:-2]
    flat = array.reshape(-1, geometry.size, geometry.size)
    square = _resize(flat, (geometry.side, geometry.side), order)
    top, left = geometry.offset
    height, width = geometry.resampled
    cropped = square[:, top : top + height, left : left + width]
    restored = _resize(np.ascontiguousarray(cropped), geometry.cropped_shape, order)
    restored = restored.reshape(*lead, *geometry.cropped_shape)
    if geometry.crop is None:
        return restored
    full = np.zeros((*lead, *geometry.shape), dtype=restored.dtype)
    if len(lead) == 2:  # (C, S, H, W) class probabilities: background outside the crop
        full[0] = 1
    geometry.cut(full)[...] = restored
    return full


def prepare_volume(
    volume: Volume, cfg: PreprocessConfig, crop: Sequence[int] | None = None
) -> tuple[np.ndarray, SliceGeometry]:
    """A volume's network-ready slices: normalize, crop (with ``crop``: ``(top, left, height,
    width)``), resample in-plane (with ``cfg.spacing``), fit.

    Returns:
        ``(slices float32 (S, size, size), geometry)``; ``geometry`` maps predictions back with
        :func:`unfit_slices` and fits label maps with :func:`prepare_label`.
    """
    normalized = normalize(volume.array, cfg.clip_percentiles, volume.invalid)
    geometry = plan_fit(normalized.shape[1:], cfg.size, volume.spacing[1:], cfg.spacing, crop)
    slices, _ = fit_slices(normalized, geometry, order=1, pad_value=float(normalized.min()))
    return slices, geometry


def prepare_label(label: np.ndarray, geometry: SliceGeometry) -> np.ndarray:
    """A canonical ``(S, H, W)`` label map fitted like its image (nearest), as int64."""
    label = _check_stack(label, "label map")
    if label.dtype.kind not in "biu":
        raise PCLSegError(f"a label map must hold integers, got {label.dtype}")
    fitted, _ = fit_slices(label.astype(np.int64, copy=False), geometry, order=0, pad_value=0)
    return fitted
