"""Is a DICOM series one regular volume? Checked before SimpleITK stacks its files.

SimpleITK's series reader stacks whatever files it is given: a series with a missing slice, a
slice stored twice or a few files of another orientation comes out as a volume of the right
size with the wrong geometry (ITK prints "Non uniform sampling or missing slices detected" and
spreads the slices evenly), so anatomy is silently stretched. :func:`check_series` reads every
file's header (not its pixels) and refuses a series unless

- every slice has the same rows and columns,
- every slice has the same orientation (Image Orientation Patient, within ``DIRECTION_TOL``),
- along the slice normal ``n = row x column``, the positions ``d_i = IPP_i . n`` sorted hold no
  two slices closer than ``DUPLICATE_FRACTION`` of the typical spacing ``m`` (the median gap),
  no gap wider than ``GAP_FACTOR * m`` (a missing slice) and no gap off ``m`` by more than
  ``UNEVEN_FRACTION`` (slices that do not make one regular grid).

A series whose files carry no position at all (old secondary captures) cannot be checked and is
left to SimpleITK; one where only some files have a position is refused.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import PCLSegError

POSITION_TAG = "0020|0032"
ORIENTATION_TAG = "0020|0037"
DIRECTION_TOL = 1e-3
DUPLICATE_FRACTION = 0.05
GAP_FACTOR = 1.5
UNEVEN_FRACTION = 0.1
_SPLIT = "remove the odd files or move them into their own folder"


def _numbers(text: str, count: int) -> np.ndarray | None:
    try:
        values = np.array([float(v) for v in text.strip().split("\\")])
    except ValueError:
        return None
    return values if values.shape == (count,) else None


def _header(path: str, source: str) -> tuple[tuple[int, int, int], np.ndarray | None,
                                             np.ndarray | None]:
    """``(size, position, orientation)`` of one DICOM file, from its header only."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1][:160]
        raise PCLSegError(f"{source}: cannot read {Path(path).name} ({reason})") from None

    def tag(key: str, count: int) -> np.ndarray | None:
        return _numbers(reader.GetMetaData(key), count) if reader.HasMetaDataKey(key) else None

    return tuple(reader.GetSize()), tag(POSITION_TAG, 3), tag(ORIENTATION_TAG, 6)  # type: ignore[return-value]


def _names(files: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(Path(f).name for f in files[:limit])
    return shown + (f" and {len(files) - limit} more" if len(files) > limit else "")


def check_series(files: Sequence[str], source: str) -> None:
    """Raise :class:`PCLSegError` (naming ``source`` and the odd files) unless ``files`` make one
    regular volume; see the module docstring for the rules."""
    if len(files) < 2:
        return
    headers = [_header(f, source) for f in files]
    sizes = Counter(size[:2] for size, _, _ in headers)
    if len(sizes) > 1:
        usual = sizes.most_common(1)[0][0]
        odd = [f for f, (size, _, _) in zip(files, headers, strict=True) if size[:2] != usual]
        counts = ", ".join(f"{n} of {w} x {h} pixels" for (w, h), n in sizes.most_common())
        raise PCLSegError(
            f"{source}: slices of different sizes in one series ({counts}; odd: {_names(odd)}); "
            f"{_SPLIT}"
        )
    if any(size[2] > 1 for size, _, _ in headers):
        return  # multi-frame files: the frames' positions live in per-frame sequences
    positions = [p for _, p, _ in headers]
    orientations = [o for _, _, o in headers]
    if all(p is None for p in positions):
        return
    lacking = [f for f, p, o in zip(files, positions, orientations, strict=True)
               if p is None or o is None]
    if lacking:
        raise PCLSegError(
            f"{source}: {len(lacking)} of {len(files)} files have no slice position or "
            f"orientation ({_names(lacking)}); {_SPLIT}"
        )
    first = orientations[0]
    odd = [f for f, o in zip(files, orientations, strict=True)
           if np.abs(o - first).max() > DIRECTION_TOL]  # type: ignore[operator]
    if odd:
        raise PCLSegError(
            f"{source}: mixed orientations in one series ({len(odd)} of {len(files)} files are "
            f"oriented differently from {Path(files[0]).name}: {_names(odd)}); {_SPLIT}"
        )
    _check_positions(files, positions, first, source)  # type: ignore[arg-type]


def _check_positions(
    files: Sequence[str], positions: Sequence[np.ndarray], orientation: np.ndarray, source: str
) -> None:
    normal = np.cross(orientation[:3], orientation[3:])
    distance = np.array([float(p @ normal) for p in positions])
    order = np.argsort(distance, kind="stable")
    d = distance[order]
    gaps = np.diff(d)
    apart = gaps[gaps > 1e-4]
    typical = float(np.median(apart)) if len(apart) else 0.0
    repeated = np.flatnonzero(gaps <= DUPLICATE_FRACTION * typical)
    if len(repeated):
        k = int(repeated[0])
        twins = [files[order[k]], files[order[k + 1]]]
        raise PCLSegError(
            f"{source}: duplicated slice: position {d[k]:.2f} mm along the slice normal is in "
            f"{_names(twins)} ({len(repeated)} repeat(s) in {len(files)} files); remove the "
            "copies"
        )
    wide = np.flatnonzero(gaps > GAP_FACTOR * typical)
    if len(wide):
        k = int(wide[0])
        missing = round(gaps[k] / typical) - 1
        raise PCLSegError(
            f"{source}: missing slice(s): a gap of {gaps[k]:.2f} mm between {d[k]:.2f} and "
            f"{d[k + 1]:.2f} mm (after {Path(files[order[k]]).name}) where slices are "
            f"{typical:.2f} mm apart, about {max(1, missing)} missing; add the missing "
            "files, or split the series at the gap"
        )
    uneven = np.abs(gaps - typical) > UNEVEN_FRACTION * typical
    if uneven.any():
        raise PCLSegError(
            f"{source}: uneven slice spacing ({gaps.min():.2f} to {gaps.max():.2f} mm, usually "
            f"{typical:.2f}); the files do not make one regular volume: resample the series "
            "to a regular spacing first"
        )
