"""Finding, reading and writing volumes, and the canonical orientation every module works in.

Reading goes through SimpleITK, so NIfTI, NRRD, MHA/MHD, MINC, GIPL, Analyze and DICOM series
all work. A volume is handed to the rest of the engine as a :class:`Volume`: a float32 array of
shape ``(S, H, W)`` in the *canonical* orientation, with enough of the file's geometry to put
an array of that shape back on the file's exact voxel grid.

Canonical orientation
    SimpleITK describes a grid by its size, spacing, origin and a direction matrix ``D``
    (3 x 3, column ``j`` = the unit vector of index axis ``j`` in LPS patient coordinates, mm).
    Each index axis ``j`` is paired with the physical axis (L, P or S) it points along most: the
    pairing is the permutation ``p`` that maximises ``sum_j |D[p(j), j]|``, which also pairs
    oblique axes (a gantry tilt, a rotated acquisition) without two axes claiming the same
    physical axis. The canonical array then has

    - axis 0, the *slice axis*: the through-plane axis (largest spacing; among ties, the one
      closest to S), or the axis along S, P or L when ``slice_axis`` is ``"axial"``,
      ``"coronal"`` or ``"sagittal"``;
    - axes 1 and 2 (rows, columns): the two other axes, the later of L, P, S first;

    and every axis runs towards +L, +P or +S. For an axial stack that is: ``array[k]`` is the
    k-th slice from inferior to superior, rows anterior to posterior, columns patient right to
    left (the radiological view). Only axis permutations and flips are used, never
    interpolation, so :meth:`Volume.to_image` returns any canonical array to the file's grid
    voxel for voxel.

Folders
    :func:`discover_volumes` lists what can be tried in a folder (recursively, in sorted order,
    hidden files and folders left out). Files with an image suffix are candidates; DICOM files
    (``.dcm``, ``.ima`` or the ``DICM`` marker) are grouped into series, one candidate per
    series: the folder itself when it holds one series, ``folder::SeriesInstanceUID`` for each
    series when it holds several. Files that are plainly not volumes (documents, tables, code,
    pictures, archives, the raw data beside ``.mhd``/``.nhdr`` headers, Slicer ``.seg.nrrd``
    segmentations) are ignored without a word. Any other file is a candidate too, so that a
    file nobody can read is *reported* as skipped (by :func:`scan_folder`) rather than silently
    dropped.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk

from .config import SliceAxis
from .dicom_series import check_series
from .errors import PCLSegError
from .integrity import check_header, restore_nonfinite
from .skipped import Skipped
from .volume_checks import check_size, mask_nonfinite, pick_component

#: Suffixes of volume formats SimpleITK reads (longest first where one ends another).
VOLUME_SUFFIXES: tuple[str, ...] = (
    ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".mnc", ".gipl.gz", ".gipl", ".hdr",
)
#: Suffixes of files that are plainly not volumes: ignored without being reported.
IGNORED_SUFFIXES: tuple[str, ...] = (
    ".seg.nrrd", ".raw", ".raw.gz", ".zraw", ".img", ".img.gz",
    ".json", ".jsonl", ".txt", ".csv", ".tsv", ".md", ".rst", ".html", ".htm", ".xml",
    ".yaml", ".yml",
    ".toml", ".ini", ".cfg", ".log", ".pdf", ".doc", ".docx", ".xls", ".xlsx",
    ".py", ".ipynb", ".sh", ".bat", ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".svg",
    ".zip", ".tar", ".tar.gz", ".tgz", ".7z", ".mrml", ".mrb", ".fcsv", ".md5", ".sha256", ".db",
    ".pt", ".pth", ".safetensors", ".npy", ".npz",
)
DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom", ".ima")
#: Separates a folder from the SeriesInstanceUID of one of its DICOM series.
SERIES_SEPARATOR = "::"

#: Physical axis index in LPS coordinates, and the slice-axis name of each.
_PHYSICAL_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}
_AXIS_NAME = {v: k for k, v in _PHYSICAL_AXIS.items()}

#: Grids closer than these are the same grid (float32 headers, rounding between tools).
SPACING_RTOL = 1e-3
ORIGIN_TOL_VOXELS = 0.05
DIRECTION_TOL = 1e-3



# --------------------------------------------------------------------------------------------
# Geometry and the canonical orientation


@dataclass(frozen=True)
class Geometry:
    """A file's 3D voxel grid and how its index axes map to the canonical array axes.

    ``size``, ``spacing`` are in the file's index order (SimpleITK's ``i, j, k``), ``origin``
    is the LPS position (mm) of voxel ``(0, 0, 0)`` and ``direction`` the row-major 3 x 3 matrix
    whose column ``j`` is index axis ``j`` in LPS. Canonical axis ``c`` (0 slice, 1 row,
    2 column) is index axis ``axes[c]``, reversed when ``flips[c]``; it runs along physical axis
    ``physical[c]`` (0 L, 1 P, 2 S).
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    physical: tuple[int, int, int]

    @classmethod
    def from_grid(
        cls,
        size: Sequence[int],
        spacing: Sequence[float],
        origin: Sequence[float],
        direction: Sequence[float],
        slice_axis: SliceAxis = "auto",
    ) -> Geometry:
        """The canonical orientation of a 3D grid (see the module docstring for the rule)."""
        if slice_axis not in ("auto", *_PHYSICAL_AXIS):
            raise PCLSegError(
                f"slice axis must be auto, axial, coronal or sagittal, got {slice_axis!r}"
            )
        d = np.asarray(direction, dtype=float).reshape(3, 3)
        # physical[j] for index axis j: the pairing that keeps the most of each axis.
        pairing = max(
            itertools.permutations(range(3)),
            key=lambda p: sum(abs(d[p[j], j]) for j in range(3)),
        )
        forward = [d[pairing[j], j] > 0 for j in range(3)]
        if slice_axis == "auto":
            largest = max(spacing)
            tied = [j for j in range(3) if spacing[j] >= largest * (1 - SPACING_RTOL)]
            slice_index = max(tied, key=lambda j: (abs(d[2, j]), pairing[j]))
        else:
            slice_index = pairing.index(_PHYSICAL_AXIS[slice_axis])
        col_index, row_index = sorted(
            (j for j in range(3) if j != slice_index), key=lambda j: pairing[j]
        )
        axes = (slice_index, row_index, col_index)
        return cls(
            size=tuple(int(s) for s in size),  # type: ignore[arg-type]
            spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
            origin=tuple(float(o) for o in origin),  # type: ignore[arg-type]
            direction=tuple(float(v) for v in d.ravel()),
            axes=axes,
            flips=tuple(not forward[j] for j in axes),  # type: ignore[arg-type]
            physical=tuple(pairing[j] for j in axes),  # type: ignore[arg-type]
        )

    @classmethod
    def from_image(cls, image: sitk.Image, slice_axis: SliceAxis = "auto") -> Geometry:
        """The canonical orientation of a 3D SimpleITK image's grid."""
        if image.GetDimension() != 3:
            raise PCLSegError(f"expected a 3D image, got {image.GetDimension()}D")
        return cls.from_grid(
            image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection(),
            slice_axis,
        )

    # numpy holds a SimpleITK image as (k, j, i): index axis j is numpy axis 2 - j.
    @property
    def _transpose(self) -> tuple[int, int, int]:
        return tuple(2 - j for j in self.axes)  # type: ignore[return-value]

    @property
    def _flip_axes(self) -> tuple[int, ...]:
        return tuple(c for c in range(3) if self.flips[c])

    @property
    def shape(self) -> tuple[int, int, int]:
        """Canonical array shape ``(S, H, W)``."""
        return tuple(self.size[j] for j in self.axes)  # type: ignore[return-value]

    @property
    def canonical_spacing(self) -> tuple[float, float, float]:
        """Voxel spacing (mm) along the canonical axes ``(slice, row, column)``."""
        return tuple(self.spacing[j] for j in self.axes)  # type: ignore[return-value]

    @property
    def slice_axis_name(self) -> str:
        return _AXIS_NAME[self.physical[0]]

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """``(k, j, i)`` array (as SimpleITK gives it) -> canonical ``(S, H, W)`` (a view)."""
        return np.flip(np.transpose(array, self._transpose), self._flip_axes)

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        """Canonical ``(S, H, W)`` array -> the file's ``(k, j, i)`` order (a view)."""
        return np.transpose(np.flip(array, self._flip_axes), np.argsort(self._transpose))

    def file_index(self, canonical_index: Sequence[float]) -> np.ndarray:
        """Continuous file index ``(i, j, k)`` of a canonical ``(s, r, c)`` index."""
        index = np.zeros(3)
        for c, j in enumerate(self.axes):
            value = float(canonical_index[c])
            index[j] = self.size[j] - 1 - value if self.flips[c] else value
        return index

    def to_lps(self, canonical_index: Sequence[float]) -> tuple[float, float, float]:
        """LPS position (mm) of a (continuous) canonical index: ``origin + D diag(sp) idx``."""
        index = self.file_index(canonical_index)
        point = np.asarray(self.origin) + self.direction_matrix @ (np.asarray(self.spacing) * index)
        return tuple(float(v) for v in point)  # type: ignore[return-value]

    def canonical_axes_lps(self) -> np.ndarray:
        """3 x 3 matrix whose column ``c`` is canonical axis ``c``'s unit vector in LPS."""
        d = self.direction_matrix
        signs = [-1.0 if flip else 1.0 for flip in self.flips]
        columns = [d[:, j] * sign for j, sign in zip(self.axes, signs, strict=True)]
        return np.stack(columns, 1)

    def same_grid(self, other: Geometry) -> str | None:
        """``None`` when ``other`` has the same canonical voxel grid; else what differs.

        Compared canonically, so a label stored with another index order or flipped axes still
        matches its image when its voxels sit at the same places.
        """
        if self.shape != other.shape:
            return f"canonical shape {other.shape} differs from the image's {self.shape}"
        ours, theirs = np.asarray(self.canonical_spacing), np.asarray(other.canonical_spacing)
        if not np.allclose(ours, theirs, rtol=SPACING_RTOL, atol=0):
            return (
                f"spacing {tuple(theirs.round(4))} differs from the image's {tuple(ours.round(4))}"
            )
        axes_ours, axes_theirs = self.canonical_axes_lps(), other.canonical_axes_lps()
        if not np.allclose(axes_ours, axes_theirs, atol=DIRECTION_TOL):
            return "direction differs from the image's"
        shift = np.linalg.norm(np.subtract(self.to_lps((0, 0, 0)), other.to_lps((0, 0, 0))))
        if shift > ORIGIN_TOL_VOXELS * min(self.spacing):
            return f"origin is {shift:.3g} mm away from the image's"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {name: list(getattr(self, name)) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Geometry:
        return cls(**{name: tuple(data[name]) for name in cls.__dataclass_fields__})


# --------------------------------------------------------------------------------------------
# Volumes


@dataclass(eq=False)
class Volume:
    """One 3D volume in canonical orientation (see the module docstring).

    Attributes:
        array: float32 ``(S, H, W)``; axis 0 is the slice axis.
        spacing: voxel spacing (mm) along ``(slice, row, column)``.
        source: the file, DICOM folder or ``folder::SeriesInstanceUID`` it was read from.
        frame: the frame (time point) of a 4D file, ``None`` for a 3D one.
        geometry: the file's grid and the canonical mapping, for :meth:`to_image`.
        invalid: ``(S, H, W)`` mask of the voxels that were NaN or infinite in the file (they
            hold the lowest finite value in ``array``; preprocessing leaves them out of its
            statistics), ``None`` when every voxel was finite.
        notes: what the user should know about this volume (e.g. masked voxels), one line each,
            naming the file; the faces show them.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    source: str
    frame: int | None
    geometry: Geometry = field(repr=False)
    invalid: np.ndarray | None = field(default=None, repr=False)
    notes: tuple[str, ...] = ()

    @classmethod
    def from_image(
        cls,
        image: sitk.Image,
        source: str = "",
        slice_axis: SliceAxis = "auto",
        frame: int | None = None,
    ) -> Volume:
        """A volume from a 3D single-component SimpleITK image (e.g. from an MRML node)."""
        geometry = Geometry.from_image(image, slice_axis)
        array = sitk.GetArrayFromImage(image)
        if image.GetNumberOfComponentsPerPixel() != 1:
            array = pick_component(array, image, source or "image", None)
        return _volume(array, geometry, source or "image", frame)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.array.shape  # type: ignore[return-value]

    @property
    def slice_axis_name(self) -> str:
        """``"axial"``, ``"coronal"`` or ``"sagittal"``: what the slices are."""
        return self.geometry.slice_axis_name

    @property
    def name(self) -> str:
        """The source's name without volume suffixes (plus ``_tN`` for frame N of a 4D file)."""
        base = volume_name(self.source)
        return base if self.frame is None else f"{base}_t{self.frame}"

    def slice_center_lps(self, index: int) -> tuple[float, float, float]:
        """LPS position (mm) of the centre of canonical slice ``index``."""
        slices, rows, cols = self.shape
        if not 0 <= index < slices:
            raise PCLSegError(f"slice {index} is outside 0..{slices - 1} of {self.source}")
        return self.geometry.to_lps((index, (rows - 1) / 2, (cols - 1) / 2))

    def to_image(
        self, array: np.ndarray, like: Literal["label", "float"] | None = None
    ) -> sitk.Image:
        """An array in canonical order put back on the file's exact grid.

        Args:
            array: ``(S, H, W)`` like :attr:`array`, or ``(C, S, H, W)`` (e.g. class
                probabilities), which becomes a C-component image.
            like: ``"label"`` stores the smallest unsigned integer type that holds the values
                (UInt8, UInt16, else Int32); ``"float"`` stores float32. Default: ``"label"``
                for integer and boolean arrays, ``"float"`` otherwise.
        """
        array = np.asarray(array)
        vector = array.ndim == 4
        if array.shape[vector:] != self.shape or array.ndim not in (3, 4):
            raise PCLSegError(
                f"array of shape {array.shape} does not fit {self.source} (canonical shape "
                f"{self.shape}, optionally with a leading channel axis)"
            )
        if like is None:
            like = "label" if array.dtype.kind in "biu" else "float"
        if like == "label":
            array = array.astype(_label_dtype(array), copy=False)
        elif like == "float":
            array = array.astype(np.float32, copy=False)
        else:
            raise PCLSegError(f"like must be 'label' or 'float', got {like!r}")
        if vector:
            file_order = np.stack([self.geometry.from_canonical(a) for a in array], axis=-1)
        else:
            file_order = self.geometry.from_canonical(array)
        image = sitk.GetImageFromArray(np.ascontiguousarray(file_order), isVector=vector)
        image.SetSpacing(self.geometry.spacing)
        image.SetOrigin(self.geometry.origin)
        image.SetDirection(self.geometry.direction)
        return image


def _label_dtype(array: np.ndarray) -> type:
    low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
    if low < 0:
        return np.int32
    return np.uint8 if high < 2**8 else np.uint16 if high < 2**16 else np.int32


def _volume(array: np.ndarray, geometry: Geometry, source: str, frame: int | None) -> Volume:
    """Check one frame's voxels and make it a canonical float32 volume."""
    where = source if frame is None else f"{source} (frame {frame})"
    if array.dtype.kind == "c":
        raise PCLSegError(f"{where}: complex voxels are not supported")
    if array.size == 0:
        raise PCLSegError(f"{where}: the image is empty")
    check_size(geometry.shape, geometry.slice_axis_name, where)
    canonical = np.ascontiguousarray(geometry.to_canonical(array), dtype=np.float32)
    invalid, note = mask_nonfinite(canonical, where)  # float32 overflow counts as infinite too
    if canonical.min() == canonical.max():
        raise PCLSegError(f"{where}: every voxel has the same value ({canonical.flat[0]:g})")
    notes = (note,) if note else ()
    return Volume(canonical, geometry.canonical_spacing, source, frame, geometry, invalid, notes)


# --------------------------------------------------------------------------------------------
# Reading


def _split_series(path: str | os.PathLike[str]) -> tuple[Path, str | None]:
    text = os.fspath(path)
    if SERIES_SEPARATOR in text:
        folder, uid = text.rsplit(SERIES_SEPARATOR, 1)
        return Path(folder), uid
    return Path(text), None


def _short_reason(exc: Exception) -> str:
    """One line out of SimpleITK's multi-line exception text."""
    text = str(exc)
    if "Unable to determine ImageIO reader" in text:
        return "not an image format SimpleITK can read"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Exception thrown", "sitk::ERROR"))]
    reason = (useful or lines or ["unknown error"])[-1]
    return reason[:200]


def dicom_series_files(folder: Path, uid: str | None = None) -> list[str]:
    """The files of one DICOM series in ``folder`` (the only one unless ``uid`` names one)."""
    reader = sitk.ImageSeriesReader
    uids = list(reader.GetGDCMSeriesIDs(str(folder)))
    if not uids:
        raise PCLSegError(f"{folder}: no DICOM series in this folder")
    if uid is None:
        if len(uids) > 1:
            raise PCLSegError(
                f"{folder}: holds {len(uids)} DICOM series; name one as "
                f"{folder}{SERIES_SEPARATOR}<SeriesInstanceUID> ({', '.join(sorted(uids)[:3])}...)"
            )
        uid = uids[0]
    elif uid not in uids:
        raise PCLSegError(f"{folder}: no DICOM series {uid}")
    return list(reader.GetGDCMSeriesFileNames(str(folder), uid))


def read_image(path: str | os.PathLike[str]) -> sitk.Image:
    """The SimpleITK image of a file, a DICOM series folder or ``folder::SeriesInstanceUID``."""
    folder, uid = _split_series(path)
    source = os.fspath(path)
    if uid is None and not folder.exists():
        raise PCLSegError(f"{source}: no such file or folder")
    try:
        if uid is not None or folder.is_dir():
            files = dicom_series_files(folder, uid)
            check_series(files, source)
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            return reader.Execute()
        return _read_verified(folder)
    except RuntimeError as exc:
        if "Unknown PixelType" in str(exc):  # ITK reads tensors and matrices SimpleITK cannot
            raise PCLSegError(
                f"{source}: holds several values per voxel (tensors or matrices) in a form "
                "SimpleITK cannot read; save the value you need as a single-channel volume"
            ) from exc
        raise PCLSegError(f"{source}: cannot read ({_short_reason(exc)})") from exc


def _read_verified(path: Path) -> sitk.Image:
    """``sitk.ReadImage`` once :mod:`pclseg.integrity` has found every declared voxel in the file.

    The check comes first, so SimpleITK never sees a damaged file (it would fill the gaps with
    zeros, or print to stderr, or allocate what a broken header claims). Its streaming pass
    reads the file from disk; SimpleITK then reads it from the operating system's page cache,
    so the disk is read once and the cost is one more decompression (for the 20 CHAOS volumes,
    about 0.5 s of CPU on top of 0.9 s of reading; docs/decisions.md, 9). Verifying in a second
    thread while SimpleITK reads was measured slower on a busy 2-core machine, and lets damaged
    data reach SimpleITK, so it is not done.
    """
    pending = check_header(path)
    hidden = pending.verify() if pending is not None else 0
    image = sitk.ReadImage(str(path))
    return restore_nonfinite(image, pending) if hidden and pending is not None else image


def _frames(
    image: sitk.Image, source: str, component: int | None = None
) -> Iterator[tuple[np.ndarray, int | None]]:
    """Each 3D frame of an image as a ``(k, j, i)`` array: one per time point of a 4D file;
    the chosen ``component`` of a vector image (none chosen: an error saying what it holds)."""
    dimension = image.GetDimension()
    components = image.GetNumberOfComponentsPerPixel()
    if dimension < 3:
        raise PCLSegError(f"{source}: a {dimension}D image; need a 3D volume")
    if dimension > 4 or (dimension == 4 and components > 1):
        raise PCLSegError(f"{source}: images with more than four dimensions are not supported")
    array = sitk.GetArrayFromImage(image)
    if dimension == 4:  # (t, k, j, i)
        if array.shape[0] == 1:
            yield array[0], None
        else:
            yield from ((array[t], t) for t in range(array.shape[0]))
    elif components > 1:  # (k, j, i, c)
        yield pick_component(array, image, source, component), None
    else:
        yield array, None


def _geometry_3d(image: sitk.Image, slice_axis: SliceAxis) -> Geometry:
    """The spatial (first three axes') grid of a 3D or 4D image."""
    n = image.GetDimension()
    direction = np.asarray(image.GetDirection()).reshape(n, n)[:3, :3]
    return Geometry.from_grid(
        image.GetSize()[:3], image.GetSpacing()[:3], image.GetOrigin()[:3], direction.ravel(),
        slice_axis,
    )


def read_volumes(
    path: str | os.PathLike[str], slice_axis: SliceAxis = "auto", component: int | None = None
) -> list[Volume]:
    """Every 3D volume in one file or DICOM series: one for a 3D image, one per frame for 4D.

    Args:
        component: which value to read from files with several per voxel (RGB, vectors,
            tensors); without it such files are refused. Files with one value ignore it.

    Raises:
        PCLSegError: the file cannot be read, is damaged, 2D, empty, constant, smaller than
            :data:`~pclseg.volume_checks.MIN_SLICES` slices or
            :data:`~pclseg.volume_checks.MIN_INPLANE` pixels a side, holds several values per
            voxel and no ``component`` is named, or is mostly NaN or infinite (the message
            names the file and why). Fewer non-finite voxels are masked
            (:func:`~pclseg.volume_checks.mask_nonfinite`), with a note in :attr:`Volume.notes`.
    """
    source = os.fspath(path)
    image = read_image(path)
    frames = list(_frames(image, source, component))
    geometry = _geometry_3d(image, slice_axis)
    return [_volume(array, geometry, source, frame) for array, frame in frames]


def read_volume(
    path: str | os.PathLike[str],
    slice_axis: SliceAxis = "auto",
    frame: int | None = None,
    component: int | None = None,
) -> Volume:
    """One volume: the file's only one, or frame ``frame`` of a 4D file (``component`` as in
    :func:`read_volumes`)."""
    volumes = read_volumes(path, slice_axis, component)
    if frame is None:
        if len(volumes) > 1:
            raise PCLSegError(f"{os.fspath(path)}: a 4D image with {len(volumes)} frames; pick one")
        return volumes[0]
    for volume in volumes:
        if volume.frame == frame:
            return volume
    raise PCLSegError(f"{os.fspath(path)}: no frame {frame}")


def read_label(path: str | os.PathLike[str], like: Volume) -> np.ndarray:
    """A label map on ``like``'s voxel grid as an int64 canonical ``(S, H, W)`` array.

    The label's grid must be the image's (same voxels in space; it may be stored with another
    index order or flipped axes). Values must be non-negative integers (float files holding
    whole numbers are accepted).
    """
    source = os.fspath(path)
    image = read_image(path)
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
        raise PCLSegError(f"{source}: a label map must be a 3D image with one value per voxel")
    geometry = Geometry.from_image(image, like.slice_axis_name)  # type: ignore[arg-type]
    mismatch = like.geometry.same_grid(geometry)
    if mismatch:
        raise PCLSegError(f"{source}: not on the grid of {like.source}: {mismatch}")
    array = geometry.to_canonical(sitk.GetArrayFromImage(image))
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or not np.array_equal(array, np.round(array)):
            raise PCLSegError(f"{source}: label values must be whole numbers")
    elif array.dtype.kind not in "biu":
        raise PCLSegError(f"{source}: label values must be whole numbers, got {array.dtype}")
    labels = np.ascontiguousarray(array, dtype=np.int64)
    if labels.size and labels.min() < 0:
        raise PCLSegError(f"{source}: label values must not be negative (found {labels.min()})")
    return labels


# --------------------------------------------------------------------------------------------
# Finding volumes in folders


def _suffix(name: str, suffixes: Iterable[str]) -> str | None:
    lower = name.lower()
    return next((s for s in suffixes if lower.endswith(s)), None)


def volume_name(path: str | os.PathLike[str]) -> str:
    """A volume's name: the file name without its volume suffix (``ct_01.nii.gz`` -> ``ct_01``);
    a DICOM folder's name; ``folder_UID`` for one of several series in a folder."""
    folder, uid = _split_series(path)
    name = folder.name
    suffix = _suffix(name, (".seg.nrrd", *VOLUME_SUFFIXES))
    if suffix:
        name = name[: -len(suffix)]
    elif "." in name and not folder.is_dir():
        name = name.rsplit(".", 1)[0]
    return f"{name}_{uid}" if uid else name


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _dicom_candidates(folder: Path) -> tuple[list[str], set[str]]:
    """``(candidates, files in a series)`` for the DICOM files directly in ``folder``."""
    uids = sorted(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    used: set[str] = set()
    for uid in uids:
        used.update(os.path.abspath(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(
            str(folder), uid))
    if len(uids) == 1:
        return [str(folder)], used
    return [f"{folder}{SERIES_SEPARATOR}{uid}" for uid in uids], used


def discover_volumes(folder: str | os.PathLike[str]) -> list[Path]:
    """Everything under ``folder`` worth trying to read, sorted (see the module docstring).

    DICOM series come back as their folder, or as ``Path("folder::SeriesInstanceUID")`` when a
    folder holds several; :func:`read_volumes` takes either.

    Raises:
        PCLSegError: ``folder`` is not a folder or holds no candidate.
    """
    root = Path(folder)
    if not root.is_dir():
        raise PCLSegError(f"{root}: not a folder")
    found: list[str] = []
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        visible = sorted(f for f in files if not f.startswith("."))
        dicom, others = [], []
        for name in visible:
            path = Path(here) / name
            if _suffix(name, IGNORED_SUFFIXES):
                continue
            if _suffix(name, VOLUME_SUFFIXES):
                others.append(str(path))
            elif _is_dicom_file(path):
                dicom.append(str(path))
            else:
                others.append(str(path))
        if dicom:
            series, used = _dicom_candidates(Path(here))
            found += series
            others += [f for f in dicom if os.path.abspath(f) not in used]
        found += others
    if not found:
        raise PCLSegError(
            f"{root}: no volumes found (looked for NIfTI, NRRD, MHA/MHD and DICOM series)"
        )
    return [Path(p) for p in sorted(found)]


def find_volume_files(path: str | os.PathLike[str]) -> list[Path]:
    """``[path]`` for a file, :func:`discover_volumes` for a folder."""
    path = Path(path)
    if path.is_file():
        return [path]
    if SERIES_SEPARATOR in os.fspath(path) or (path.is_dir() and _holds_only_dicom(path)):
        return [path]
    return discover_volumes(path)


def _holds_only_dicom(folder: Path) -> bool:
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    return bool(entries) and all(p.is_file() and _is_dicom_file(p) for p in entries)


def iter_volumes(
    paths: Iterable[str | os.PathLike[str]],
    skipped: list[Skipped],
    slice_axis: SliceAxis = "auto",
    component: int | None = None,
    warn: Callable[[str], None] | None = None,
) -> Iterator[Volume]:
    """Read ``paths`` one at a time; what cannot be used goes to ``skipped`` as it is met, and
    each volume's :attr:`~Volume.notes` go to ``warn`` (e.g. a progress reporter's message).

    Only one file's volumes are in memory at a time, so a folder of thousands of volumes
    streams through.
    """
    for path in paths:
        try:
            volumes = read_volumes(path, slice_axis, component)
        except PCLSegError as exc:
            skipped.append(skipped_item(path, exc))
            continue
        for volume in volumes:
            for note in volume.notes if warn is not None else ():
                warn(note)
            yield volume


def skipped_item(path: str | os.PathLike[str], error: PCLSegError) -> Skipped:
    """The :class:`Skipped` record of a candidate that ``error`` refused (its reason without the
    leading path, which the record holds)."""
    source = os.fspath(path)
    return Skipped(source, str(error).removeprefix(f"{source}: "))


def scan_folder(
    folder: str | os.PathLike[str], slice_axis: SliceAxis = "auto", component: int | None = None
) -> tuple[Iterator[Volume], list[Skipped]]:
    """``(volumes, skipped)`` for a folder: a lazy iterator over its usable volumes and the list
    of the candidates it could not use, filled while the iterator runs.

    Example:
        >>> volumes, skipped = scan_folder("scans")  # doctest: +SKIP
        >>> shapes = [v.shape for v in volumes]       # reads one file at a time
        >>> [s.reason for s in skipped]               # complete once ``volumes`` is exhausted
    """
    skipped: list[Skipped] = []
    return iter_volumes(discover_volumes(folder), skipped, slice_axis, component), skipped


def source_stat(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What identifies a candidate's content cheaply: path, total size and newest mtime.

    Covers the data files beside ``.mhd``/``.nhdr`` headers and every file in a DICOM series'
    folder, so a cache keyed on it notices a changed volume.
    """
    folder, uid = _split_series(path)
    if uid is not None or folder.is_dir():  # a DICOM series: the files of its folder
        files = sorted(p for p in folder.glob("*") if p.is_file() and not p.name.startswith("."))
    else:
        files = [folder]
        if _suffix(folder.name, (".mhd", ".nhdr", ".hdr")):
            stem = folder.name.rsplit(".", 1)[0]
            files += sorted(p for p in folder.parent.glob(f"{stem}.*") if p != folder)
    stats = [f.stat() for f in files if f.exists()]
    return {
        "path": os.path.abspath(os.fspath(path)),
        "size": sum(s.st_size for s in stats),
        "mtime_ns": max((s.st_mtime_ns for s in stats), default=0),
        "files": len(stats),
    }


# --------------------------------------------------------------------------------------------
# Writing


def write_image(image: sitk.Image, path: str | os.PathLike[str], compress: bool = True) -> Path:
    """Write an image atomically (all or nothing at ``path``), creating parent folders.

    SimpleITK writes into a fresh hidden folder beside ``path`` under the final file name (so
    the writer is chosen by the real suffix and a ``.mhd`` header names the right data file);
    the files are then moved into place with :func:`os.replace`, the header or single file last.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        try:
            sitk.WriteImage(image, str(staging / target.name), compress)
        except RuntimeError as exc:
            raise PCLSegError(f"{target}: cannot write ({_short_reason(exc)})") from exc
        written = sorted(staging.iterdir(), key=lambda p: p.name == target.name)
        for item in written:
            os.replace(item, target.parent / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def pair_files(images: str | os.PathLike[str], labels: str | os.PathLike[str],
               options: tuple[str, str] = ("--images", "--labels")) -> list[tuple[Path, Path]]:
    """``(image, label)`` files matched by volume name (``ct_01.nii.gz`` <-> ``ct_01.nrrd``).

    A file on both sides pairs directly. Images without a label are left out; no pair at all
    is an error (naming the two paths by their command-line ``options``).
    """
    images, labels = Path(images), Path(labels)
    for what, path in zip(options, (images, labels), strict=True):
        if not path.exists():
            raise PCLSegError(f"{what} {path}: no such file or folder")
    if images.is_file() and labels.is_file():
        return [(images, labels)]
    by_name = {volume_name(p): p for p in find_volume_files(labels)}
    pairs = [(p, by_name[volume_name(p)]) for p in find_volume_files(images)
             if volume_name(p) in by_name]
    if not pairs:
        raise PCLSegError(f"{images}: no image shares a file name with a label map in {labels}")
    return pairs
